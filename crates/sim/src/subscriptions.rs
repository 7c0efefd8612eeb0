//! Graph change notifications, as Graph does them: `POST/GET/PATCH/DELETE
//! /v1.0/subscriptions[/{id}]` and `POST /v1.0/subscriptions/{id}/reauthorize` for
//! `/users/{id}/events` (45 to 10,080 minutes, a shorter expiry lifted to 45; the
//! notification URL is validated with a `validationToken` request before the 201), change
//! notifications POSTed to `notificationUrl` with the subscription's clientState whenever a
//! mailbox's events change, and lifecycle events (`reauthorizationRequired`,
//! `subscriptionRemoved`, `missed`) sent on request to `lifecycleNotificationUrl`.
//!
//! Unlike Graph, a failed delivery is not retried (it is recorded); an expired subscription
//! just stops receiving notifications.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::calendar::MutationKind;
use super::reply::{finish, graph_error, Delivery, Reply, RequestIds};
use super::state::{lock, MailboxEntry, Shared};

/// Graph's limit for Outlook event subscriptions.
pub const MAX_EXPIRATION_MINUTES: i64 = 10_080;
/// Graph sets an expiry under this many minutes from the request to exactly this many.
pub const MIN_EXPIRATION_MINUTES: i64 = 45;
/// Graph's limit on clientState.
const MAX_CLIENT_STATE: usize = 128;
/// Graph gives the validation request 10 s.
const VALIDATION_DEADLINE: Duration = Duration::from_secs(10);
/// Graph expects a notification answered within 3 s; a slower endpoint counts as failed here.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(3);
const DELIVERIES_KEPT: usize = 10_000;

/// A subscription the simulator holds.
#[derive(Clone, Debug, Serialize)]
pub struct SimSubscription {
    pub id: String,
    /// The mailbox address as configured.
    pub mailbox: String,
    pub tenant_id: String,
    pub resource: String,
    pub change_types: Vec<String>,
    pub notification_url: String,
    pub lifecycle_url: Option<String>,
    #[serde(skip)]
    pub client_state: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// PATCHes that extended it.
    pub renewals: u32,
    /// `POST /subscriptions/{id}/reauthorize` calls.
    pub reauthorizations: u32,
}

/// One POST the simulator made to a client.
#[derive(Clone, Debug, Serialize)]
pub struct SentNotification {
    pub subscription_id: String,
    pub mailbox: String,
    /// `validation`, `change` or the lifecycle event's name.
    pub kind: String,
    pub items: usize,
    /// The client's status; `None` when it did not answer in time or could not be reached.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
    pub took_ms: u64,
}

pub struct Subscriptions {
    by_id: Mutex<HashMap<String, SimSubscription>>,
    sent: Mutex<Vec<SentNotification>>,
    http: reqwest::Client,
    /// The next n subscription requests fail with this status (tests of client backoff).
    failures: Mutex<(u32, u16)>,
}

impl Subscriptions {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(VALIDATION_DEADLINE)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            by_id: Mutex::new(HashMap::new()),
            sent: Mutex::new(Vec::new()),
            http,
            failures: Mutex::new((0, 503)),
        }
    }

    pub fn list(&self) -> Vec<SimSubscription> {
        let mut all: Vec<SimSubscription> = lock(&self.by_id).values().cloned().collect();
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    pub fn sent(&self) -> Vec<SentNotification> {
        lock(&self.sent).clone()
    }

    pub fn fail_next(&self, n: u32, status: u16) {
        *lock(&self.failures) = (n, status);
    }

    pub fn failures_left(&self) -> u32 {
        lock(&self.failures).0
    }

    fn take_failure(&self) -> Option<u16> {
        let mut f = lock(&self.failures);
        (f.0 > 0).then(|| {
            f.0 -= 1;
            f.1
        })
    }

    fn record(&self, n: SentNotification) {
        let mut sent = lock(&self.sent);
        if sent.len() >= DELIVERIES_KEPT {
            sent.remove(0);
        }
        sent.push(n);
    }

    /// Live subscriptions of a mailbox.
    fn live_for(&self, mailbox: &str, now: DateTime<Utc>) -> Vec<SimSubscription> {
        lock(&self.by_id)
            .values()
            .filter(|s| s.mailbox.eq_ignore_ascii_case(mailbox) && s.expires_at > now)
            .cloned()
            .collect()
    }
}

impl Default for Subscriptions {
    fn default() -> Self {
        Self::new()
    }
}

fn change_type(kind: MutationKind) -> &'static str {
    match kind {
        MutationKind::Create => "created",
        MutationKind::Update | MutationKind::Move | MutationKind::RenameSeries => "updated",
        MutationKind::Delete | MutationKind::DeleteSeries => "deleted",
    }
}

/// Sends change notifications for `changes` of `entry` to each live subscription that wants
/// them, one POST per subscription, in the background.
pub fn notify_changes(sim: &Shared, entry: &MailboxEntry, changes: &[(MutationKind, String)]) {
    if changes.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let tenant_id = sim.tenants[entry.tenant].tenant_id.clone();
    // Graph names the user by object id and tenant id, never by the address subscribed to
    // (change-notifications-delivery-webhooks doc): a client must map by subscriptionId.
    let user = format!("{}@{tenant_id}", entry.object_id);
    for sub in sim.subscriptions.live_for(&entry.address, sim.now()) {
        let items: Vec<Value> = changes
            .iter()
            .filter(|(kind, _)| sub.change_types.iter().any(|c| c == change_type(*kind)))
            .map(|(kind, id)| {
                json!({
                    "subscriptionId": sub.id,
                    "subscriptionExpirationDateTime": graph_time(sub.expires_at),
                    "changeType": change_type(*kind),
                    "resource": format!("users/{user}/events/{id}"),
                    "resourceData": {
                        "@odata.type": "#Microsoft.Graph.Event",
                        "@odata.id": format!("Users/{user}/Events/{id}"),
                        "@odata.etag": format!("W/\"{}\"", uuid::Uuid::new_v4().simple()),
                        "id": id,
                    },
                    "clientState": sub.client_state,
                    "tenantId": tenant_id,
                })
            })
            .collect();
        if items.is_empty() {
            continue;
        }
        let subs = Arc::clone(&sim.subscriptions);
        runtime.spawn(async move {
            let url = sub.notification_url.clone();
            deliver(&subs, &sub, &url, "change", items).await;
        });
    }
}

/// Sends `event` to the lifecycle URL of every live subscription of `mailbox` (with
/// `subscriptionRemoved`, the subscription is dropped first). Returns how many were sent.
pub async fn send_lifecycle(sim: &Shared, mailbox: &str, event: &str) -> usize {
    let now = sim.now();
    let subs = sim.subscriptions.live_for(mailbox, now);
    if event == "subscriptionRemoved" {
        let mut by_id = lock(&sim.subscriptions.by_id);
        for s in &subs {
            by_id.remove(&s.id);
        }
    }
    let tenant_id = sim
        .mailbox(mailbox)
        .map(|e| sim.tenants[e.tenant].tenant_id.clone())
        .unwrap_or_default();
    let mut sent = 0;
    for sub in subs {
        let Some(url) = sub.lifecycle_url.clone() else {
            continue;
        };
        let item = json!({
            "subscriptionId": sub.id,
            "subscriptionExpirationDateTime": graph_time(sub.expires_at),
            "tenantId": tenant_id,
            "clientState": sub.client_state,
            "lifecycleEvent": event,
        });
        deliver(&sim.subscriptions, &sub, &url, event, vec![item]).await;
        sent += 1;
    }
    sent
}

async fn deliver(
    subs: &Subscriptions,
    sub: &SimSubscription,
    url: &str,
    kind: &str,
    items: Vec<Value>,
) {
    let started = tokio::time::Instant::now();
    let n = items.len();
    let result = subs
        .http
        .post(url)
        .timeout(DELIVERY_DEADLINE)
        .json(&json!({ "value": items }))
        .send()
        .await;
    let (status, error) = match result {
        Ok(r) => (Some(r.status().as_u16()), None),
        Err(e) => (
            None,
            Some(if e.is_timeout() {
                "timed out".to_string()
            } else {
                e.to_string()
            }),
        ),
    };
    subs.record(SentNotification {
        subscription_id: sub.id.clone(),
        mailbox: sub.mailbox.clone(),
        kind: kind.to_string(),
        items: n,
        status,
        error,
        at: Utc::now(),
        took_ms: started.elapsed().as_millis() as u64,
    });
}

fn graph_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

// ---- routes ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    change_type: Option<String>,
    notification_url: Option<String>,
    lifecycle_notification_url: Option<String>,
    resource: Option<String>,
    expiration_date_time: Option<String>,
    client_state: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PatchBody {
    expiration_date_time: Option<String>,
}

fn reply(status: u16, body: &Value, ids: &RequestIds) -> Response {
    let r = Reply::json(status, "application/json", body)
        .header("request-id", ids.request_id.clone())
        .header("client-request-id", ids.client_request_id.clone());
    finish(r, &Delivery::default())
}

fn no_content(ids: &RequestIds) -> Response {
    send(
        Reply::empty(204)
            .header("request-id", ids.request_id.clone())
            .header("client-request-id", ids.client_request_id.clone()),
    )
}

fn error(status: u16, code: &str, message: &str, ids: &RequestIds) -> Response {
    send(error_reply(status, code, message, ids))
}

fn error_reply(status: u16, code: &str, message: &str, ids: &RequestIds) -> Reply {
    graph_error(status, code, message, ids)
        .header("request-id", ids.request_id.clone())
        .header("client-request-id", ids.client_request_id.clone())
}

fn send(reply: Reply) -> Response {
    finish(reply, &Delivery::default())
}

fn to_json(s: &SimSubscription) -> Value {
    json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
        "id": s.id,
        "resource": s.resource,
        "applicationId": "00000000-0000-0000-0000-000000000000",
        "changeType": s.change_types.join(","),
        "clientState": s.client_state,
        "notificationUrl": s.notification_url,
        "lifecycleNotificationUrl": s.lifecycle_url,
        "expirationDateTime": graph_time(s.expires_at),
        "creatorId": "00000000-0000-0000-0000-000000000000",
        "latestSupportedTlsVersion": "v1_2",
        "notificationContentType": null,
        "includeResourceData": false,
    })
}

/// Graph wants https; plain http is accepted for loopback only (tests).
fn acceptable_url(text: &str) -> bool {
    let Ok(url) = url::Url::parse(text) else {
        return false;
    };
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    url.scheme() == "https" || (url.scheme() == "http" && loopback)
}

fn check_expiration(
    sim: &Shared,
    text: Option<&str>,
    ids: &RequestIds,
) -> Result<DateTime<Utc>, Reply> {
    let Some(at) = text.and_then(super::calendar::parse_graph_datetime) else {
        return Err(error_reply(
            400,
            "InvalidRequest",
            "expirationDateTime is missing or not an ISO 8601 date-time.",
            ids,
        ));
    };
    let now = sim.now();
    // What Graph answers for a past time is not documented or reported: refused here.
    if at <= now {
        return Err(error_reply(
            400,
            "InvalidRequest",
            "Subscription expiration must be in the future.",
            ids,
        ));
    }
    // The code and message users report (microsoft-graph-docs#2988), with the event limit.
    if at > now + chrono::Duration::minutes(MAX_EXPIRATION_MINUTES) {
        return Err(error_reply(
            400,
            "ExtensionError",
            &format!("Subscription expiration can only be {MAX_EXPIRATION_MINUTES} minutes in the future."),
            ids,
        ));
    }
    // The subscription resource doc: "any request with expirationDateTime set to under 45
    // minutes after the time of the request is automatically set to 45 minutes after".
    Ok(at.max(now + chrono::Duration::minutes(MIN_EXPIRATION_MINUTES)))
}

/// The mailbox of `/users/{id}/events` (also `users/{id}/events`, `/users/{id}/calendar/events`).
fn resource_mailbox(resource: &str) -> Option<String> {
    let parts: Vec<&str> = resource.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        [users, id, events] | [users, id, _, events]
            if users.eq_ignore_ascii_case("users") && events.eq_ignore_ascii_case("events") =>
        {
            let decoded = percent_decode(id);
            Some(decoded)
        }
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

/// Bearer check shared with the delta endpoint; `Err` is the response to send.
fn authorize(sim: &Shared, headers: &HeaderMap, ids: &RequestIds) -> Result<String, Reply> {
    if let Some(status) = sim.subscriptions.take_failure() {
        let (code, message) = super::reply::default_graph_code(status);
        return Err(error_reply(status, code, message, ids));
    }
    super::tokens::check_bearer(&sim.signer, sim.now(), headers)
        .map(|claims| claims.tid)
        .map_err(|m| error_reply(401, "InvalidAuthenticationToken", m, ids))
}

pub async fn create(State(sim): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let ids = RequestIds::from_headers(&headers);
    let tid = match authorize(&sim, &headers, &ids) {
        Ok(t) => t,
        Err(r) => return send(r),
    };
    let Ok(body) = serde_json::from_slice::<CreateBody>(&body) else {
        return error(400, "BadRequest", "Invalid JSON in the request body.", &ids);
    };
    let change_types: Vec<String> = body
        .change_type
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    if change_types.is_empty()
        || change_types
            .iter()
            .any(|c| !["created", "updated", "deleted"].contains(&c.as_str()))
    {
        return error(
            400,
            "InvalidRequest",
            "changeType must list created, updated and/or deleted.",
            &ids,
        );
    }
    let Some(notification_url) = body.notification_url.filter(|u| acceptable_url(u)) else {
        return error(
            400,
            "InvalidRequest",
            "notificationUrl must be an https URL.",
            &ids,
        );
    };
    if body
        .lifecycle_notification_url
        .as_deref()
        .is_some_and(|u| !acceptable_url(u))
    {
        return error(
            400,
            "InvalidRequest",
            "lifecycleNotificationUrl must be an https URL.",
            &ids,
        );
    }
    if body
        .client_state
        .as_deref()
        .is_some_and(|c| c.chars().count() > MAX_CLIENT_STATE)
    {
        return error(
            400,
            "InvalidRequest",
            "clientState must be at most 128 characters.",
            &ids,
        );
    }
    let resource = body.resource.unwrap_or_default();
    let Some(user) = resource_mailbox(&resource) else {
        return error(
            400,
            "InvalidRequest",
            &format!("Resource '{resource}' is not supported."),
            &ids,
        );
    };
    let Some(entry) = sim.mailbox(&user) else {
        return error(
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
            &ids,
        );
    };
    let tenant = &sim.tenants[entry.tenant];
    if !tenant.tenant_id.eq_ignore_ascii_case(&tid) {
        return error(
            403,
            "ExtensionError",
            "Operation: Create; Exception: [Status Code: Forbidden; Reason: Access is denied.]",
            &ids,
        );
    }
    let expires_at = match check_expiration(&sim, body.expiration_date_time.as_deref(), &ids) {
        Ok(t) => t,
        Err(r) => return send(r),
    };
    let sub = SimSubscription {
        id: uuid::Uuid::new_v4().to_string(),
        mailbox: entry.address.clone(),
        tenant_id: tenant.tenant_id.clone(),
        resource,
        change_types,
        notification_url,
        lifecycle_url: body.lifecycle_notification_url,
        client_state: body.client_state,
        expires_at,
        created_at: sim.now(),
        renewals: 0,
        reauthorizations: 0,
    };
    // Graph validates each URL before it answers.
    let mut urls = vec![sub.notification_url.clone()];
    urls.extend(sub.lifecycle_url.clone());
    for url in urls {
        if let Err(why) = validate_endpoint(&sim, &sub, &url).await {
            return error(
                400,
                "ValidationError",
                &format!("Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request. ({why})"),
                &ids,
            );
        }
    }
    let body = to_json(&sub);
    lock(&sim.subscriptions.by_id).insert(sub.id.clone(), sub);
    reply(201, &body, &ids)
}

/// POSTs `{url}?validationToken=...` and wants 200, `text/plain`, the token back, within 10 s.
async fn validate_endpoint(sim: &Shared, sub: &SimSubscription, url: &str) -> Result<(), String> {
    // Real tokens carry spaces and colons, so a client that does not URL-decode fails.
    let token = format!(
        "Validation: Testing client application reachability for subscription Request-Id: {}",
        uuid::Uuid::new_v4()
    );
    let Ok(mut target) = url::Url::parse(url) else {
        return Err("bad URL".into());
    };
    target
        .query_pairs_mut()
        .append_pair("validationToken", &token);
    let started = tokio::time::Instant::now();
    let answer = sim
        .subscriptions
        .http
        .post(target)
        .header("content-type", "text/plain; charset=utf-8")
        .send()
        .await;
    let (status, error, outcome) = match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            let text_plain = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/plain"));
            let body = r.text().await.unwrap_or_default();
            let outcome = if status != 200 {
                Err(format!("HTTP {status}"))
            } else if !text_plain {
                Err("answer is not text/plain".to_string())
            } else if body != token {
                Err("answer is not the validation token".to_string())
            } else {
                Ok(())
            };
            (Some(status), outcome.as_ref().err().cloned(), outcome)
        }
        Err(e) => {
            let why = if e.is_timeout() {
                "timed out".to_string()
            } else {
                e.to_string()
            };
            (None, Some(why.clone()), Err(why))
        }
    };
    sim.subscriptions.record(SentNotification {
        subscription_id: sub.id.clone(),
        mailbox: sub.mailbox.clone(),
        kind: "validation".into(),
        items: 0,
        status,
        error,
        at: Utc::now(),
        took_ms: started.elapsed().as_millis() as u64,
    });
    outcome
}

fn live(sim: &Shared, id: &str) -> Option<SimSubscription> {
    let now = sim.now();
    lock(&sim.subscriptions.by_id)
        .get(id)
        .filter(|s| s.expires_at > now)
        .cloned()
}

fn not_found(ids: &RequestIds) -> Response {
    error(404, "ResourceNotFound", "The object was not found.", ids)
}

pub async fn get_one(
    State(sim): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ids = RequestIds::from_headers(&headers);
    if let Err(r) = authorize(&sim, &headers, &ids) {
        return send(r);
    }
    match live(&sim, &id) {
        Some(s) => reply(200, &to_json(&s), &ids),
        None => not_found(&ids),
    }
}

pub async fn list(State(sim): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let ids = RequestIds::from_headers(&headers);
    let tid = match authorize(&sim, &headers, &ids) {
        Ok(t) => t,
        Err(r) => return send(r),
    };
    let now = sim.now();
    let value: Vec<Value> = sim
        .subscriptions
        .list()
        .iter()
        .filter(|s| s.expires_at > now && s.tenant_id.eq_ignore_ascii_case(&tid))
        .map(to_json)
        .collect();
    reply(200, &json!({ "value": value }), &ids)
}

pub async fn renew(
    State(sim): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ids = RequestIds::from_headers(&headers);
    if let Err(r) = authorize(&sim, &headers, &ids) {
        return send(r);
    }
    let Ok(body) = serde_json::from_slice::<PatchBody>(&body) else {
        return error(400, "BadRequest", "Invalid JSON in the request body.", &ids);
    };
    if live(&sim, &id).is_none() {
        return not_found(&ids);
    }
    let expires_at = match check_expiration(&sim, body.expiration_date_time.as_deref(), &ids) {
        Ok(t) => t,
        Err(r) => return send(r),
    };
    let mut by_id = lock(&sim.subscriptions.by_id);
    let Some(sub) = by_id.get_mut(&id) else {
        drop(by_id);
        return not_found(&ids);
    };
    sub.expires_at = expires_at;
    sub.renewals += 1;
    let body = to_json(sub);
    drop(by_id);
    reply(200, &body, &ids)
}

pub async fn delete(
    State(sim): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ids = RequestIds::from_headers(&headers);
    if let Err(r) = authorize(&sim, &headers, &ids) {
        return send(r);
    }
    if lock(&sim.subscriptions.by_id).remove(&id).is_some() {
        no_content(&ids)
    } else {
        not_found(&ids)
    }
}

/// `POST /subscriptions/{id}/reauthorize`: 204, the expiry unchanged
/// (change-notifications-lifecycle-events doc, subscription-reauthorize API).
pub async fn reauthorize(
    State(sim): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ids = RequestIds::from_headers(&headers);
    if let Err(r) = authorize(&sim, &headers, &ids) {
        return send(r);
    }
    let now = sim.now();
    let found = match lock(&sim.subscriptions.by_id)
        .get_mut(&id)
        .filter(|s| s.expires_at > now)
    {
        Some(sub) => {
            sub.reauthorizations += 1;
            true
        }
        None => false,
    };
    if found {
        no_content(&ids)
    } else {
        not_found(&ids)
    }
}

// ---- control ----

#[derive(Deserialize)]
pub struct LifecycleRequest {
    mailbox: String,
    event: String,
}

/// `POST /_sim/lifecycle {"mailbox","event"}`: sends a lifecycle event now.
pub async fn control_lifecycle(
    State(sim): State<Arc<Shared>>,
    Json(req): Json<LifecycleRequest>,
) -> Response {
    if !["reauthorizationRequired", "subscriptionRemoved", "missed"].contains(&req.event.as_str()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "event must be reauthorizationRequired, subscriptionRemoved or missed"})),
        )
            .into_response();
    }
    let sent = send_lifecycle(&sim, &req.mailbox, &req.event).await;
    Json(json!({ "sent": sent })).into_response()
}

/// `GET /_sim/subscriptions`: every subscription (without clientState) and the deliveries.
pub async fn control_list(State(sim): State<Arc<Shared>>) -> Response {
    Json(json!({
        "subscriptions": sim.subscriptions.list(),
        "sent": sim.subscriptions.sent(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_name_their_mailbox() {
        assert_eq!(
            resource_mailbox("/users/alice@contoso.com/events").as_deref(),
            Some("alice@contoso.com")
        );
        assert_eq!(
            resource_mailbox("users/alice%40contoso.com/calendar/events").as_deref(),
            Some("alice@contoso.com")
        );
        assert_eq!(resource_mailbox("/users/alice/messages"), None);
        assert!(acceptable_url("https://example.com/n"));
        assert!(acceptable_url("http://127.0.0.1:9/n"));
        assert!(!acceptable_url("http://example.com/n"));
    }
}
