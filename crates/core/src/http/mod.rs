//! The HTTP side, on two listeners: the internal one serves liveness, readiness, health
//! detail, Prometheus metrics, the status page and the admin API (`/v1`) ([`router`]); the
//! public one only Graph's change notifications ([`public_router`]). [`server`] serves both with
//! timeouts and connection limits.

pub mod abuse;
pub mod admin;
pub mod notifications;
pub mod server;
pub mod status_page;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::TokenStatus;
use crate::resilience::breaker::BreakerState;
use crate::resilience::guard::{BreakerSnapshot, Dependency};
use crate::scheduler::{Worker, WorkerStatus};
use crate::store::{MailboxId, MailboxRecord, Store};

/// A store that does not answer this fast is reported unreachable.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub worker: Arc<Worker>,
    /// The admin API's token check and configured tenants.
    pub admin: Arc<admin::AdminApi>,
    /// Whether Graph change notifications are on (`notifications.public_url` set).
    pub notifications: bool,
    /// Log lines about unauthenticated traffic, at most one per interval per source.
    pub throttle: Arc<abuse::LogThrottle>,
    /// Store calls made by the notification endpoints (their cost, in a test or a probe).
    pub notification_store_calls: Arc<std::sync::atomic::AtomicU64>,
    /// The store's pool size, for the descriptor budget of the listeners.
    pub store_connections: u32,
}

impl AppState {
    pub fn new(settings: &crate::config::Settings, store: Store, worker: Arc<Worker>) -> Self {
        Self {
            store,
            worker,
            admin: Arc::new(admin::AdminApi::new(settings)),
            notifications: settings.notifications.public_url.is_some(),
            throttle: Arc::default(),
            notification_store_calls: Arc::default(),
            store_connections: settings.store.max_connections,
        }
    }
}

/// The internal listener's routes: health, metrics, status page, admin API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(status))
        .nest(admin::PREFIX, admin::router(&state))
        .layer(axum::middleware::map_response(nosniff))
        .with_state(state)
}

/// The public listener's routes: the notification endpoints and nothing else.
pub fn public_router(state: AppState) -> Router {
    notifications::routes()
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(axum::middleware::map_response(nosniff))
        .with_state(state)
}

/// No answer of calsync's is to be sniffed into another type (an echoed validation token
/// must stay text).
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The process is up and serving. Never depends on Graph or Entra: an Azure outage must not
/// get calsync restarted.
async fn livez() -> &'static str {
    "ok"
}

/// calsync can work: its store answers.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "store": e.to_string()})),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "store": "timed out"})),
        ),
    }
}

#[derive(Serialize)]
pub struct Health {
    pub status: &'static str,
    pub checked_at: DateTime<Utc>,
    pub jobs: JobsHealth,
    pub tenants: Vec<TenantHealth>,
}

#[derive(Serialize)]
pub struct JobsHealth {
    #[serde(flatten)]
    pub worker: WorkerStatus,
    /// Age of the oldest job that is due and allowed to run now (breakers closed).
    pub oldest_due_seconds: i64,
    /// Due mailboxes held back because their tenant's breaker is open (not a backlog of ours).
    pub deferred_by_breaker: usize,
}

#[derive(Serialize)]
pub struct TenantHealth {
    pub name: String,
    pub status: &'static str,
    pub breakers: Vec<BreakerSnapshot>,
    /// The token endpoint rejected the app's credentials (wrong or expired secret, app not in
    /// the tenant): an operator must act.
    pub auth_failing_permanently: bool,
    pub mailboxes: usize,
    pub never_synced: usize,
    pub failing: usize,
    pub max_lag_seconds: i64,
    /// Items Graph sent that could not be understood, set aside (the rest was applied).
    pub quarantined: u64,
    pub token: Option<TokenStatus>,
    pub mailbox_detail: Vec<MailboxHealth>,
}

#[derive(Serialize)]
pub struct MailboxHealth {
    pub mailbox: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub lag_seconds: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_request_id: Option<String>,
    pub consecutive_failures: u32,
    pub next_run_at: DateTime<Utc>,
    pub running: bool,
    pub quarantined: u64,
    /// Fresh rounds started because the same page kept failing the same way.
    pub fresh_rounds_forced: u64,
}

/// Per tenant and mailbox: last success, lag, last error; breakers; job ages. `degraded` while
/// a breaker is not closed, a mailbox's last job failed, or a stuck job has not ended. Holds
/// no secrets: errors are calsync's own messages, tokens are never shown.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let mailboxes = match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.store.mailboxes()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return unavailable(e.to_string()),
        Err(_) => return unavailable("store timed out".into()),
    };
    let quarantined = quarantine_counts(&state).await;
    let health = build_health(&mailboxes, &quarantined, &state.worker, Utc::now()).await;
    let mut body = serde_json::to_value(health).unwrap_or_default();
    if state.notifications {
        // Subscriptions are a trigger only (delta stays the source of truth), so their state is
        // shown but does not make calsync degraded.
        let enabled = mailboxes.iter().filter(|m| m.enabled).count();
        let subscriptions = tokio::time::timeout(
            STORE_CHECK_TIMEOUT,
            crate::notifications::subscription_health(&state.store, enabled),
        )
        .await;
        body["notifications"] = match subscriptions {
            Ok(Ok(h)) => serde_json::to_value(h).unwrap_or_default(),
            Ok(Err(e)) => serde_json::json!({"error": e.to_string()}),
            Err(_) => serde_json::json!({"error": "store timed out"}),
        };
    }
    (StatusCode::OK, Json(body))
}

/// Health detail for this Application, or why the store could not give it.
async fn current_health(state: &AppState) -> Result<Health, String> {
    let mailboxes = match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.store.mailboxes()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("store timed out".into()),
    };
    let quarantined = quarantine_counts(state).await;
    Ok(build_health(&mailboxes, &quarantined, &state.worker, Utc::now()).await)
}

/// Quarantined items per mailbox; none known when the store does not answer in time (the
/// store's trouble shows in `/readyz`).
async fn quarantine_counts(state: &AppState) -> HashMap<MailboxId, u64> {
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.store.quarantine_counts()).await {
        Ok(Ok(counts)) => counts,
        _ => HashMap::new(),
    }
}

/// Prometheus text: the process's event counters and this Application's state. Without the
/// store, only the event counters (the store's trouble shows in `/readyz`).
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = crate::metrics::render_events();
    if let Ok(health) = current_health(&state).await {
        let sync = state.worker.settings();
        let limits = crate::metrics::Limits {
            job_deadline: sync.job_deadline,
            interval: sync.interval,
        };
        body.push_str(&crate::metrics::render_state(
            &health,
            limits,
            health.checked_at,
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// The status page: server-rendered HTML that refreshes itself.
async fn status(State(state): State<AppState>) -> impl IntoResponse {
    let (code, html) = match current_health(&state).await {
        Ok(health) => (StatusCode::OK, status_page::render(&health)),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            status_page::render_unavailable(&reason),
        ),
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                status_page::CONTENT_SECURITY_POLICY,
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        html,
    )
}

fn unavailable(reason: String) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"status": "unavailable", "store": reason})),
    )
}

pub async fn build_health(
    mailboxes: &[MailboxRecord],
    quarantined: &HashMap<MailboxId, u64>,
    worker: &Worker,
    now: DateTime<Utc>,
) -> Health {
    let tokens = worker.tokens();
    let mut by_tenant: std::collections::BTreeMap<&str, Vec<&MailboxRecord>> = Default::default();
    for name in tokens.keys() {
        by_tenant.entry(name.as_str()).or_default();
    }
    for m in mailboxes {
        by_tenant.entry(m.tenant.as_str()).or_default().push(m);
    }
    let mut tenants = Vec::with_capacity(by_tenant.len());
    for (name, list) in by_tenant {
        let breakers = worker.breakers(name);
        let detail: Vec<MailboxHealth> = list
            .iter()
            .map(|m| MailboxHealth {
                mailbox: m.user_id.clone(),
                last_success_at: m.last_success_at,
                lag_seconds: (now - m.last_success_at.unwrap_or(m.created_at))
                    .num_seconds()
                    .max(0),
                last_error: m.last_error.clone(),
                last_error_at: m.last_error_at,
                last_request_id: m.last_request_id.clone(),
                consecutive_failures: m.consecutive_failures,
                next_run_at: m.next_run_at,
                running: m.lease_until.is_some_and(|until| until > now),
                quarantined: quarantined.get(&m.id).copied().unwrap_or(0),
                fresh_rounds_forced: m.fresh_rounds_forced,
            })
            .collect();
        let failing = detail.iter().filter(|m| m.consecutive_failures > 0).count();
        let token = match tokens.get(name) {
            Some(provider) => Some(provider.status().await),
            None => None,
        };
        let breakers_closed = breakers.iter().all(|b| b.state == BreakerState::Closed);
        tenants.push(TenantHealth {
            name: name.to_string(),
            status: if failing == 0 && breakers_closed {
                "ok"
            } else {
                "degraded"
            },
            auth_failing_permanently: breakers
                .iter()
                .any(|b| b.dependency == Dependency::Token && b.permanent),
            breakers,
            mailboxes: detail.len(),
            never_synced: detail
                .iter()
                .filter(|m| m.last_success_at.is_none())
                .count(),
            failing,
            max_lag_seconds: detail.iter().map(|m| m.lag_seconds).max().unwrap_or(0),
            quarantined: detail.iter().map(|m| m.quarantined).sum(),
            token,
            mailbox_detail: detail,
        });
    }
    let due: Vec<_> = tenants.iter().map(|t| t.due_jobs(now)).collect();
    let oldest_due_seconds = due
        .iter()
        .map(|d| d.oldest_eligible_seconds)
        .max()
        .unwrap_or(0);
    let deferred_by_breaker = due.iter().map(|d| d.deferred_by_breaker).sum();
    let worker_status = worker.status();
    let stuck_now = worker_status
        .stuck_recent
        .iter()
        .any(|s| s.finished_after_seconds.is_none());
    let degraded = stuck_now || tenants.iter().any(|t| t.status != "ok");
    Health {
        status: if degraded { "degraded" } else { "ok" },
        checked_at: now,
        jobs: JobsHealth {
            worker: worker_status,
            oldest_due_seconds,
            deferred_by_breaker,
        },
        tenants,
    }
}
