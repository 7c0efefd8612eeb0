//! Graph change notifications, receiving side: `POST /notifications` and
//! `POST /notifications/lifecycle`.
//!
//! Both answer Graph's validation handshake (`?validationToken=` → 200 `text/plain` with the
//! decoded token). A notification is checked against the clientState stored with its
//! subscription (constant time; a wrong or unknown one is ignored and triggers nothing), then
//! its mailbox's immediate sync is persisted (`Store::request_sync`) and Graph gets 202, all
//! inside Graph's 3-second budget. Lifecycle events: `reauthorizationRequired` marks the
//! subscription for renewal, `subscriptionRemoved` forgets it (so it is recreated) and asks for
//! a sync, `missed` asks for a sync.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use secrecy::ExposeSecret;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::abuse::{Peer, Source};
use super::AppState;
use crate::notifications::same_secret;
use crate::store::{Store, StoreError, SubscriptionRecord};

/// Graph batches notifications; a batch is far below this.
const BODY_LIMIT: usize = 1024 * 1024;
/// Items accepted in one batch. Graph sends a handful at a time; a batch past this is refused
/// whole, before any lookup.
pub const MAX_ITEMS_PER_BATCH: usize = 1000;
/// Graph's subscription ids are GUIDs; an id longer than this, or with control characters, is
/// not one of ours and is refused without a lookup.
const MAX_SUBSCRIPTION_ID: usize = 128;
/// Graph wants an answer within 3 s; the store work must be done well before that, or Graph
/// gets a 503 and redelivers.
const STORE_BUDGET: Duration = Duration::from_millis(2500);
/// Graph's validation tokens are short; this bounds what is echoed back.
const MAX_VALIDATION_TOKEN: usize = 4096;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/notifications", post(notification))
        .route("/notifications/lifecycle", post(lifecycle))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

#[derive(Deserialize)]
struct Batch {
    #[serde(deserialize_with = "at_most_max_items")]
    value: Vec<Item>,
}

const TOO_MANY: &str = "too many notifications in one batch";

/// Stops reading at the first item past [`MAX_ITEMS_PER_BATCH`].
fn at_most_max_items<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Item>, D::Error> {
    struct Capped;
    impl<'de> Visitor<'de> for Capped {
        type Value = Vec<Item>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {MAX_ITEMS_PER_BATCH} notifications")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Item>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                if items.len() == MAX_ITEMS_PER_BATCH {
                    return Err(serde::de::Error::custom(TOO_MANY));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    deserializer.deserialize_seq(Capped)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    subscription_id: Option<String>,
    client_state: Option<String>,
    change_type: Option<String>,
    lifecycle_event: Option<String>,
}

async fn notification(
    State(state): State<AppState>,
    Peer(source): Peer,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    receive(&state, source, &query, &body, Kind::Change).await
}

async fn lifecycle(
    State(state): State<AppState>,
    Peer(source): Peer,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    receive(&state, source, &query, &body, Kind::Lifecycle).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Change,
    Lifecycle,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Change => "change",
            Self::Lifecycle => "lifecycle",
        }
    }
}

async fn receive(
    state: &AppState,
    source: Option<Source>,
    query: &HashMap<String, String>,
    body: &[u8],
    kind: Kind,
) -> Response {
    if let Some(token) = query.get("validationToken") {
        // `Query` has already URL-decoded it.
        if token.len() > MAX_VALIDATION_TOKEN {
            return (StatusCode::BAD_REQUEST, "validationToken too long").into_response();
        }
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            token.clone(),
        )
            .into_response();
    }
    let batch: Batch = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            let (reason, message) = if e.to_string().starts_with(TOO_MANY) {
                (
                    "too_many_items",
                    format!("at most {MAX_ITEMS_PER_BATCH} notifications per batch"),
                )
            } else {
                ("malformed", format!("not a notification batch: {e}"))
            };
            crate::metrics::notification_batch_refused(kind.as_str(), reason);
            crate::throttled_warn!(state.throttle, "notification_refused", source,
                "notification batch refused"; endpoint = kind.as_str(), reason);
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    let calls = &state.notification_store_calls;
    match tokio::time::timeout(STORE_BUDGET, apply(&state.store, calls, &batch, kind)).await {
        Ok(Ok(counts)) => {
            counts.record(kind);
            let rejected = counts.incomplete + counts.unknown + counts.wrong_state;
            if rejected > 0 {
                crate::throttled_warn!(state.throttle, "notification_forged", source,
                    "ignored notifications with an unknown subscription or a wrong clientState";
                    endpoint = kind.as_str(), rejected, accepted = counts.accepted);
            }
            StatusCode::ACCEPTED.into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not record notifications; Graph will redeliver");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Err(_) => {
            tracing::error!("recording notifications took too long; Graph will redeliver");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

#[derive(Default)]
struct Counts {
    accepted: u64,
    /// No subscriptionId or clientState.
    incomplete: u64,
    unknown: u64,
    wrong_state: u64,
}

impl Counts {
    fn record(&self, kind: Kind) {
        let endpoint = kind.as_str();
        crate::metrics::notifications_received(endpoint, "accepted", self.accepted);
        crate::metrics::notifications_received(endpoint, "incomplete", self.incomplete);
        crate::metrics::notifications_received(endpoint, "unknown_subscription", self.unknown);
        crate::metrics::notifications_received(endpoint, "wrong_client_state", self.wrong_state);
    }
}

/// A store call of the notification endpoints, counted.
async fn counted<T>(
    calls: &AtomicU64,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    calls.fetch_add(1, Ordering::Relaxed);
    call.await
}

fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_SUBSCRIPTION_ID && !id.chars().any(char::is_control)
}

/// One lookup for every subscription the batch names, checks in memory, then one write asking
/// for the mailboxes' syncs. Only lifecycle events of genuine subscriptions write per item.
async fn apply(
    store: &Store,
    calls: &AtomicU64,
    batch: &Batch,
    kind: Kind,
) -> Result<Counts, StoreError> {
    let now = Utc::now();
    let mut counts = Counts::default();
    let ids: Vec<&str> = batch
        .value
        .iter()
        .filter(|item| item.client_state.is_some())
        .filter_map(|item| item.subscription_id.as_deref())
        .filter(|id| plausible_id(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known: HashMap<String, SubscriptionRecord> = if ids.is_empty() {
        HashMap::new()
    } else {
        counted(calls, store.subscriptions_by_ids(&ids))
            .await?
            .into_iter()
            .filter_map(|r| r.subscription_id.clone().map(|id| (id, r)))
            .collect()
    };
    let mut syncs = BTreeSet::new();
    let mut lifecycle_done = HashSet::new();
    for item in &batch.value {
        let (Some(id), Some(given)) = (item.subscription_id.as_deref(), &item.client_state) else {
            counts.incomplete += 1;
            continue;
        };
        let Some(record) = known.get(id) else {
            counts.unknown += 1;
            continue;
        };
        let good = record
            .client_state
            .as_ref()
            .is_some_and(|s| same_secret(s.expose_secret().as_bytes(), given.as_bytes()));
        if !good {
            counts.wrong_state += 1;
            continue;
        }
        let (mailbox, user) = (&record.mailbox_id, &record.user_id);
        counts.accepted += 1;
        match kind {
            Kind::Change => {
                tracing::debug!(mailbox = %user, subscription = id, change = item.change_type.as_deref().unwrap_or("-"), "change notification");
                syncs.insert(*mailbox);
            }
            Kind::Lifecycle => {
                let event = item.lifecycle_event.as_deref().unwrap_or_default();
                if !lifecycle_done.insert((id, event)) {
                    continue;
                }
                tracing::info!(mailbox = %user, subscription = id, event, "lifecycle notification");
                match event {
                    "reauthorizationRequired" => {
                        counted(calls, store.subscription_needs_work(id, false, now)).await?;
                    }
                    "subscriptionRemoved" => {
                        counted(calls, store.subscription_needs_work(id, true, now)).await?;
                        syncs.insert(*mailbox);
                    }
                    "missed" => {
                        syncs.insert(*mailbox);
                    }
                    other => tracing::warn!(event = other, "unknown lifecycle event ignored"),
                }
            }
        }
    }
    let syncs: Vec<_> = syncs.into_iter().collect();
    if !syncs.is_empty() {
        counted(calls, store.request_syncs(&syncs, now)).await?;
    }
    Ok(counts)
}
