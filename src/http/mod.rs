//! The HTTP side: liveness, readiness and health detail.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::{TokenProviders, TokenStatus};
use crate::store::{MailboxRecord, Store};

/// A store that does not answer this fast is reported unreachable.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub tokens: Arc<TokenProviders>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .with_state(state)
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
    pub tenants: Vec<TenantHealth>,
}

#[derive(Serialize)]
pub struct TenantHealth {
    pub name: String,
    pub status: &'static str,
    pub mailboxes: usize,
    pub never_synced: usize,
    pub failing: usize,
    pub max_lag_seconds: i64,
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
}

/// Per tenant and mailbox: last success, lag, last error. `degraded` while any mailbox's last
/// job failed. Holds no secrets: errors are calsync's own messages, tokens are never shown.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let mailboxes = match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.store.mailboxes()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return unavailable(e.to_string()),
        Err(_) => return unavailable("store timed out".into()),
    };
    let health = build_health(&mailboxes, &state.tokens, Utc::now()).await;
    (
        StatusCode::OK,
        Json(serde_json::to_value(health).unwrap_or_default()),
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
    tokens: &TokenProviders,
    now: DateTime<Utc>,
) -> Health {
    let mut by_tenant: std::collections::BTreeMap<&str, Vec<&MailboxRecord>> = Default::default();
    for name in tokens.keys() {
        by_tenant.entry(name.as_str()).or_default();
    }
    for m in mailboxes {
        by_tenant.entry(m.tenant.as_str()).or_default().push(m);
    }
    let mut tenants = Vec::with_capacity(by_tenant.len());
    for (name, list) in by_tenant {
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
            })
            .collect();
        let failing = detail.iter().filter(|m| m.consecutive_failures > 0).count();
        let token = match tokens.get(name) {
            Some(provider) => Some(provider.status().await),
            None => None,
        };
        tenants.push(TenantHealth {
            name: name.to_string(),
            status: if failing > 0 { "degraded" } else { "ok" },
            mailboxes: detail.len(),
            never_synced: detail
                .iter()
                .filter(|m| m.last_success_at.is_none())
                .count(),
            failing,
            max_lag_seconds: detail.iter().map(|m| m.lag_seconds).max().unwrap_or(0),
            token,
            mailbox_detail: detail,
        });
    }
    let degraded = tenants.iter().any(|t| t.status != "ok");
    Health {
        status: if degraded { "degraded" } else { "ok" },
        checked_at: now,
        tenants,
    }
}
