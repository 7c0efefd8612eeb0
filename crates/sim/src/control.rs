//! `/_sim/*`: the control API a drill or a human uses to inject faults and read ground truth.
//! These routes are never subject to faults or limits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::calendar::parse_graph_datetime;
use super::calendar::Window;
use super::faults::FaultRule;
use super::state::{lock, Shared};

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response()
}

/// One rule or an array of rules.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum RulesBody {
    Many(Vec<FaultRule>),
    One(Box<FaultRule>),
}

impl RulesBody {
    fn into_vec(self) -> Vec<FaultRule> {
        match self {
            RulesBody::Many(v) => v,
            RulesBody::One(r) => vec![*r],
        }
    }
}

fn parse_rules(body: &[u8]) -> Result<Vec<FaultRule>, String> {
    let rules: RulesBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid fault rule JSON: {e}"))?;
    let rules = rules.into_vec();
    for (i, r) in rules.iter().enumerate() {
        r.validate().map_err(|e| format!("rule {i}: {e}"))?;
    }
    Ok(rules)
}

pub async fn list_faults(State(sim): State<Arc<Shared>>) -> Response {
    Json(json!({"value": lock(&sim.faults).list()})).into_response()
}

pub async fn add_faults(State(sim): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let rules = match parse_rules(&body) {
        Ok(r) => r,
        Err(msg) => return bad_request(msg),
    };
    let now = tokio::time::Instant::now();
    let mut set = lock(&sim.faults);
    let ids: Vec<u64> = rules.into_iter().map(|r| set.add(r, now)).collect();
    (StatusCode::CREATED, Json(json!({"ids": ids}))).into_response()
}

pub async fn replace_faults(State(sim): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let rules = match parse_rules(&body) {
        Ok(r) => r,
        Err(msg) => return bad_request(msg),
    };
    let now = tokio::time::Instant::now();
    let mut set = lock(&sim.faults);
    set.clear();
    let ids: Vec<u64> = rules.into_iter().map(|r| set.add(r, now)).collect();
    Json(json!({"ids": ids})).into_response()
}

pub async fn clear_faults(State(sim): State<Arc<Shared>>) -> StatusCode {
    lock(&sim.faults).clear();
    StatusCode::NO_CONTENT
}

pub async fn delete_fault(State(sim): State<Arc<Shared>>, Path(id): Path<u64>) -> StatusCode {
    if lock(&sim.faults).remove(id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

pub fn truth_of(sim: &Shared, mailbox: &str, window: Option<&Window>) -> Option<Vec<Value>> {
    let entry = sim.mailbox(mailbox)?;
    let st = lock(&entry.state);
    Some(st.calendar.truth(window))
}

pub async fn truth(
    State(sim): State<Arc<Shared>>,
    Path(mailbox): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let q: HashMap<String, String> = q
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let window = match (q.get("startdatetime"), q.get("enddatetime")) {
        (Some(s), Some(e)) => match (parse_graph_datetime(s), parse_graph_datetime(e)) {
            (Some(start), Some(end)) => Some(Window { start, end }),
            _ => return bad_request("startDateTime/endDateTime must be ISO 8601".into()),
        },
        (None, None) => None,
        _ => return bad_request("give both startDateTime and endDateTime, or neither".into()),
    };
    match truth_of(&sim, &mailbox, window.as_ref()) {
        Some(v) => Json(json!({"value": v})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("unknown mailbox {mailbox}")})),
        )
            .into_response(),
    }
}

pub async fn stats(State(sim): State<Arc<Shared>>) -> Response {
    Json(super::snapshot_stats(&sim)).into_response()
}

#[derive(Deserialize)]
pub struct RateBody {
    per_second: f64,
}

pub async fn set_mutations(State(sim): State<Arc<Shared>>, Json(b): Json<RateBody>) -> Response {
    if !(b.per_second >= 0.0 && b.per_second.is_finite()) {
        return bad_request("per_second must be a finite number >= 0".into());
    }
    sim.mutation_rate.send_replace(b.per_second);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
pub struct MutateBody {
    #[serde(default = "one")]
    n: usize,
}
fn one() -> usize {
    1
}

pub async fn mutate(
    State(sim): State<Arc<Shared>>,
    Path(mailbox): Path<String>,
    Json(b): Json<MutateBody>,
) -> Response {
    match sim.mailbox(&mailbox) {
        Some(entry) => Json(json!({"applied": sim.mutate_mailbox(entry, b.n)})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "unknown mailbox"})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
pub struct ClockBody {
    advance_ms: u64,
}

pub async fn advance_clock(State(sim): State<Arc<Shared>>, Json(b): Json<ClockBody>) -> Response {
    sim.advance_clock(Duration::from_millis(b.advance_ms));
    Json(json!({"now": sim.now().to_rfc3339()})).into_response()
}

/// The tenants with their credentials: this is a simulator, and drills need them.
pub async fn tenants(State(sim): State<Arc<Shared>>) -> Response {
    let v: Vec<Value> = sim
        .tenants
        .iter()
        .map(|t| {
            json!({"name": t.name, "tenant_id": t.tenant_id, "client_id": t.client_id,
                   "client_secret": t.client_secret, "mailboxes": t.mailboxes})
        })
        .collect();
    Json(json!({"value": v})).into_response()
}

fn unknown_mailbox(mailbox: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": "ErrorInvalidUser", "message": format!("unknown mailbox {mailbox}")}})),
    )
        .into_response()
}

/// `POST /_sim/outlook/{mailbox}/events/{id}` with a Graph event body: the owner edits the
/// event in Outlook (new changeKey, in delta). 200 with the event; errors as Graph's.
pub async fn outlook_edit(
    State(sim): State<Arc<Shared>>,
    Path((mailbox, id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(entry) = sim.mailbox(&mailbox) else {
        return unknown_mailbox(&mailbox);
    };
    match super::writes::outlook_edit(&sim, entry, &id, &body) {
        Ok(event) => Json(event).into_response(),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            Json(json!({"error": {"code": e.code, "message": e.message}})),
        )
            .into_response(),
    }
}

/// `DELETE /_sim/outlook/{mailbox}/events/{id}`: the owner deletes the event in Outlook.
pub async fn outlook_delete(
    State(sim): State<Arc<Shared>>,
    Path((mailbox, id)): Path<(String, String)>,
) -> Response {
    let Some(entry) = sim.mailbox(&mailbox) else {
        return unknown_mailbox(&mailbox);
    };
    if super::writes::outlook_delete(&sim, entry, &id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "ErrorItemNotFound", "message": "The specified object was not found in the store."}})),
        )
            .into_response()
    }
}
