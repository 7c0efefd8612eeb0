//! The HTTP side, on two listeners: the internal one serves liveness, readiness, health
//! detail, Prometheus metrics, the status page and the admin API (`/v1`) ([`router`]); the
//! public one only Graph's change notifications ([`public_router`]). [`server`] serves both with
//! timeouts and connection limits.

pub mod abuse;
pub mod admin;
pub mod appointments;
pub mod notifications;
pub mod server;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::health::shared::SharedBuild;
use crate::health::{self, status_page, Health, STORE_CHECK_TIMEOUT};
use crate::scheduler::Worker;
use crate::store::Store;

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
    /// The health model with each tenant's worst mailboxes (`/healthz`, the status page) and
    /// with counts only (`/metrics`), each built once for the requests that arrive together.
    pub health: Arc<SharedBuild<Health>>,
    pub health_counts: Arc<SharedBuild<Health>>,
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
            health: Arc::default(),
            health_counts: Arc::default(),
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

/// The health model with each tenant's worst mailboxes, shared by the requests that arrive
/// while it is built.
async fn with_mailboxes(state: &AppState) -> Result<Arc<Health>, String> {
    let listed = health::MAILBOX_DETAIL_PER_TENANT;
    state
        .health
        .get(|| health::current(&state.store, &state.worker, listed))
        .await
}

/// The health model as JSON, with the Graph subscriptions when notifications are on.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let health = match with_mailboxes(&state).await {
        Ok(current) => current,
        Err(reason) => return unavailable(reason),
    };
    let enabled: u64 = health.tenants.iter().map(|t| t.mailboxes).sum();
    let mut body = serde_json::to_value(&*health).unwrap_or_default();
    if state.notifications {
        // Subscriptions are a trigger only (delta stays the source of truth), so their state is
        // shown but does not make calsync degraded.
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

/// Prometheus text: the process's event counters and this Application's state. Without the
/// store, only the event counters (the store's trouble shows in `/readyz`).
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = crate::metrics::render_events();
    // Counts only: the gauges name no mailbox.
    let counts = state
        .health_counts
        .get(|| health::current(&state.store, &state.worker, 0))
        .await;
    if let Ok(health) = counts {
        let sync = state.worker.settings();
        let limits = health::prometheus::Limits {
            job_deadline: sync.job_deadline,
            interval: sync.interval,
        };
        body.push_str(&health::prometheus::render(
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
    let (code, html) = match with_mailboxes(&state).await {
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
