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

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::AppState;
use crate::notifications::same_secret;
use crate::store::{Store, StoreError, SubscriptionRecord};

/// Graph batches notifications; a batch is far below this.
const BODY_LIMIT: usize = 1024 * 1024;
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
    value: Vec<Item>,
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
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    receive(&state.store, &query, &body, Kind::Change).await
}

async fn lifecycle(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    receive(&state.store, &query, &body, Kind::Lifecycle).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Change,
    Lifecycle,
}

async fn receive(
    store: &Store,
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
            return (
                StatusCode::BAD_REQUEST,
                format!("not a notification batch: {e}"),
            )
                .into_response()
        }
    };
    match tokio::time::timeout(STORE_BUDGET, apply(store, &batch, kind)).await {
        Ok(Ok(counts)) => {
            if counts.rejected > 0 {
                tracing::warn!(
                    rejected = counts.rejected,
                    accepted = counts.accepted,
                    "ignored notifications with an unknown subscription or a wrong clientState"
                );
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
    accepted: usize,
    rejected: usize,
}

async fn apply(store: &Store, batch: &Batch, kind: Kind) -> Result<Counts, StoreError> {
    let now = Utc::now();
    let mut counts = Counts::default();
    let mut known: HashMap<&str, Option<SubscriptionRecord>> = HashMap::new();
    let mut syncs = BTreeSet::new();
    for item in &batch.value {
        let (Some(id), Some(given)) = (item.subscription_id.as_deref(), &item.client_state) else {
            counts.rejected += 1;
            continue;
        };
        if !known.contains_key(id) {
            known.insert(id, store.subscription_by_id(id).await?);
        }
        let Some(Some(record)) = known.get(id) else {
            counts.rejected += 1;
            continue;
        };
        let good = record
            .client_state
            .as_ref()
            .is_some_and(|s| same_secret(s.expose_secret().as_bytes(), given.as_bytes()));
        if !good {
            counts.rejected += 1;
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
                tracing::info!(mailbox = %user, subscription = id, event, "lifecycle notification");
                match event {
                    "reauthorizationRequired" => {
                        store.subscription_needs_work(id, false, now).await?;
                    }
                    "subscriptionRemoved" => {
                        store.subscription_needs_work(id, true, now).await?;
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
    for mailbox in syncs {
        store.request_sync(mailbox, now).await?;
    }
    Ok(counts)
}
