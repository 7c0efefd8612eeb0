//! The Graph side: `calendarView/delta`, `GET /users/{id}/events/{id}` and the event writes,
//! with Outlook's per-mailbox limits, bearer checks and the Graph-endpoint faults.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::Extension;
use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::calendar::parse_graph_datetime;
use super::calendar::{DeltaItem, Window};
use super::conn::ConnCtl;
use super::faults::{Endpoint, FaultKind, RetryAfter, Target};
use super::reply::{
    default_graph_code, finish, graph_error, Delivery, Reply, RequestIds, GRAPH_JSON,
    MAILBOX_CONCURRENCY,
};
use super::state::{lock, MailboxEntry, Shared};
use super::stats::ViolationKind;
use super::tokens::{check_bearer, DeltaPosition, LinkKind, TokenError};
use super::writes::{self, Write};

/// What the request pipeline decided before the delta logic runs.
pub enum Outcome {
    Reply(Reply),
    Hang,
    Reset,
}

/// Holds a mailbox's in-flight slot for the life of a request.
struct InFlight<'a> {
    sim: &'a Shared,
    entry: &'a MailboxEntry,
}

impl<'a> InFlight<'a> {
    fn enter(sim: &'a Shared, entry: &'a MailboxEntry) -> (Self, usize) {
        let n = {
            let mut st = lock(&entry.state);
            st.in_flight += 1;
            st.in_flight
        };
        if let Some(m) = lock(&sim.stats).mailboxes.get_mut(&entry.address) {
            m.in_flight = n;
            m.max_in_flight = m.max_in_flight.max(n);
            m.arrived(tokio::time::Instant::now());
        }
        (Self { sim, entry }, n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = {
            let mut st = lock(&self.entry.state);
            st.in_flight = st.in_flight.saturating_sub(1);
            st.in_flight
        };
        if let Some(m) = lock(&self.sim.stats).mailboxes.get_mut(&self.entry.address) {
            m.in_flight = n;
        }
    }
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What a Graph request asks for, after the checks every Graph request passes.
enum GraphOp<'a> {
    /// `calendarView/{func}`: `delta` or `delta()`.
    Delta { func: &'a str },
    /// `events/{id}`, with the query's `$select`.
    Event { id: &'a str },
    /// `POST events`, `PATCH|DELETE events/{id}`, `POST events/{id}/cancel`.
    Write(Write<'a>),
}

impl GraphOp<'_> {
    fn endpoint(&self) -> Endpoint {
        match self {
            Self::Delta { .. } => Endpoint::Delta,
            Self::Event { .. } => Endpoint::Events,
            Self::Write(_) => Endpoint::Writes,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Delta { .. } => "delta",
            Self::Event { .. } => "event",
            Self::Write(w) => w.label(),
        }
    }
}

pub async fn delta(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(params): Path<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let func = params.get("func").map(String::as_str).unwrap_or_default();
    serve(sim, conn, &params, GraphOp::Delta { func }, uri, headers).await
}

/// `GET /v1.0/users/{id}/events/{id}`: one event or series master in full, `$select` applied.
pub async fn event(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(params): Path<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    serve(sim, conn, &params, GraphOp::Event { id }, uri, headers).await
}

/// `POST /v1.0/users/{id}/events` (also `/calendar/events`, `/calendars/{id}/events`).
pub async fn create_event(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(params): Path<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op = GraphOp::Write(Write::Create { body: &body });
    serve(sim, conn, &params, op, uri, headers).await
}

/// `PATCH /v1.0/users/{id}/events/{id}`.
pub async fn update_event(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(params): Path<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let op = GraphOp::Write(Write::Update { id, body: &body });
    serve(sim, conn, &params, op, uri, headers).await
}

/// `DELETE /v1.0/users/{id}/events/{id}`.
pub async fn delete_event(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(params): Path<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let op = GraphOp::Write(Write::Delete { id });
    serve(sim, conn, &params, op, uri, headers).await
}

/// `POST /v1.0/users/{id}/events/{id}/cancel`.
pub async fn cancel_event(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(params): Path<HashMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let op = GraphOp::Write(Write::Cancel { id, body: &body });
    serve(sim, conn, &params, op, uri, headers).await
}

async fn serve(
    sim: Arc<Shared>,
    conn: Arc<ConnCtl>,
    params: &HashMap<String, String>,
    op: GraphOp<'_>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let ids = RequestIds::from_headers(&headers);
    let user = params.get("user").map(String::as_str).unwrap_or_default();
    let entry = sim.mailbox(user);
    let tenant = entry.map(|e| &sim.tenants[e.tenant]);
    let label = op.label();
    let (outcome, delivery) = pipeline(&sim, entry, user, op, &uri, &headers, &ids).await;
    let status = match &outcome {
        Outcome::Reply(r) => r.status,
        Outcome::Hang | Outcome::Reset => 0,
    };
    lock(&sim.stats).graph_response(
        tenant.map(|t| t.name.as_str()),
        entry.map(|e| e.address.as_str()),
        label,
        status,
    );
    match outcome {
        Outcome::Reply(reply) => {
            let reply = reply
                .header("request-id", ids.request_id.clone())
                .header("client-request-id", ids.client_request_id.clone());
            finish(reply, &delivery)
        }
        Outcome::Hang => std::future::pending().await,
        Outcome::Reset => {
            conn.order_reset();
            std::future::pending().await
        }
    }
}

async fn pipeline(
    sim: &Shared,
    entry: Option<&MailboxEntry>,
    user: &str,
    op: GraphOp<'_>,
    uri: &Uri,
    headers: &HeaderMap,
    ids: &RequestIds,
) -> (Outcome, Delivery) {
    let no_delivery = Delivery::default();
    let tenant = entry.map(|e| &sim.tenants[e.tenant]);
    let is_write = matches!(op, GraphOp::Write(_));
    let mut _slot = None;
    if let Some(entry) = entry {
        // Concurrency first: a request sent alongside the one that got a 429 is over the
        // limit, not a retry; only later requests can be early retries.
        let (slot, n) = InFlight::enter(sim, entry);
        _slot = Some(slot);
        if n > sim.config.mailbox_concurrency {
            let wait = sim.config.concurrency_retry_after_secs;
            lock(&sim.stats).violation(
                ViolationKind::OverConcurrency,
                json!({"mailbox": entry.address, "in_flight": n, "limit": sim.config.mailbox_concurrency,
                       "at": Utc::now().to_rfc3339(), "client-request-id": ids.client_request_id}),
            );
            set_not_before(entry, Duration::from_secs(wait));
            let reply = graph_error(429, "ApplicationThrottled", MAILBOX_CONCURRENCY, ids)
                .retry_after(RetryAfter::Seconds(wait));
            return (Outcome::Reply(reply), no_delivery);
        }
        if let Some(reply) = early_retry_check(sim, entry, ids) {
            return (Outcome::Reply(reply), no_delivery);
        }
        if let Some(reply) = window_check(sim, entry, ids) {
            return (Outcome::Reply(reply), no_delivery);
        }
    }

    let kinds = {
        let target = Target {
            endpoint: op.endpoint(),
            tenant_name: tenant.map(|t| t.name.as_str()),
            tenant_id: tenant.map(|t| t.tenant_id.as_str()),
            mailbox: Some(entry.map(|e| e.address.as_str()).unwrap_or(user)),
        };
        lock(&sim.faults).fire(&target, Instant::now(), sim.now())
    };
    let latency: u64 = kinds
        .iter()
        .map(|k| match k {
            FaultKind::Latency { ms } => *ms,
            _ => 0,
        })
        .sum();
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    for k in &kinds {
        match k {
            // A hung or reset request no longer occupies a concurrency slot: the client gave up.
            FaultKind::Hang => return (Outcome::Hang, no_delivery),
            FaultKind::Reset => return (Outcome::Reset, no_delivery),
            // A write commits first (below); anything else has nothing to commit.
            FaultKind::CommitThenHang if !is_write => return (Outcome::Hang, no_delivery),
            FaultKind::CommitThenReset if !is_write => return (Outcome::Reset, no_delivery),
            FaultKind::Status {
                code,
                graph_code,
                message,
                retry_after,
                ..
            } => {
                let (dc, dm) = default_graph_code(*code);
                let reply = graph_error(
                    *code,
                    graph_code.as_deref().unwrap_or(dc),
                    message.as_deref().unwrap_or(dm),
                    ids,
                )
                .retry_after(*retry_after);
                if let (Some(entry), Some(wait)) = (entry, retry_after_duration(*retry_after)) {
                    set_not_before(entry, wait);
                }
                return (Outcome::Reply(reply), Delivery::from_faults(&kinds));
            }
            _ => {}
        }
    }
    let delivery = Delivery::from_faults(&kinds);
    let shape = DeltaShape::from_faults(&kinds);

    let claims = match check_bearer(&sim.signer, sim.now(), headers) {
        Ok(c) => c,
        Err(msg) => return (Outcome::Reply(unauthorized(msg, ids)), delivery),
    };
    let (Some(entry), Some(tenant)) = (entry, tenant) else {
        let reply = graph_error(
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{user}' is invalid."),
            ids,
        );
        return (Outcome::Reply(reply), delivery);
    };
    if !claims.tid.eq_ignore_ascii_case(&tenant.tenant_id) {
        let token_tenant = sim
            .tenant_by_key(&claims.tid)
            .map(|i| sim.tenants[i].name.clone());
        lock(&sim.stats).violation(
            ViolationKind::WrongTenant,
            json!({"mailbox": entry.address, "mailbox_tenant": tenant.name,
                   "token_tenant": token_tenant, "at": Utc::now().to_rfc3339()}),
        );
        return (
            Outcome::Reply(unauthorized(
                "Access token validation failure. Invalid audience or tenant.",
                ids,
            )),
            delivery,
        );
    }
    let reply = match op {
        GraphOp::Delta { func } => {
            if !(func.eq_ignore_ascii_case("delta") || func.eq_ignore_ascii_case("delta()")) {
                let reply = graph_error(
                    400,
                    "BadRequest",
                    &format!("Resource not found for the segment '{func}'."),
                    ids,
                );
                return (Outcome::Reply(reply), delivery);
            }
            match delta_page(sim, entry, uri, headers, ids, &shape) {
                Ok(r) | Err(r) => r,
            }
        }
        GraphOp::Event { id } => event_reply(entry, id, uri, headers, ids),
        GraphOp::Write(write) => writes::apply(sim, entry, write, headers, ids),
    };
    super::faults::hold(&sim.faults, &kinds).await;
    for k in &kinds {
        match k {
            FaultKind::CommitThenHang => return (Outcome::Hang, no_delivery),
            FaultKind::CommitThenReset => return (Outcome::Reset, no_delivery),
            _ => {}
        }
    }
    (Outcome::Reply(reply), delivery)
}

/// Properties `$select` never removes.
const ALWAYS_SENT: &[&str] = &["@odata.etag", "id"];

fn event_reply(
    entry: &MailboxEntry,
    id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    ids: &RequestIds,
) -> Reply {
    let Some(mut item) = lock(&entry.state).calendar.item(id) else {
        return graph_error(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
            ids,
        );
    };
    let select: Option<Vec<String>> = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k.eq_ignore_ascii_case("$select") || k.eq_ignore_ascii_case("select"))
            .map(|(_, v)| v.split(',').map(|p| p.trim().to_string()).collect())
    });
    if let (Some(select), Some(object)) = (&select, item.as_object_mut()) {
        object.retain(|key, _| {
            ALWAYS_SENT.contains(&key.as_str())
                || select.iter().any(|s| s.eq_ignore_ascii_case(key))
        });
    }
    let host = header_str(headers, "host").unwrap_or("localhost");
    let context = match &select {
        Some(select) => format!(
            "http://{host}/v1.0/$metadata#users('{}')/events({})/$entity",
            entry.address,
            select.join(",")
        ),
        None => format!(
            "http://{host}/v1.0/$metadata#users('{}')/events/$entity",
            entry.address
        ),
    };
    if let Some(object) = item.as_object_mut() {
        object.insert("@odata.context".into(), context.into());
    }
    let (_, utc) = requested_page_size(headers);
    let reply = Reply::json(200, GRAPH_JSON, &item);
    if utc {
        reply.header("preference-applied", "outlook.timezone=\"UTC\"".to_string())
    } else {
        reply
    }
}

fn retry_after_duration(ra: RetryAfter) -> Option<Duration> {
    match ra {
        RetryAfter::None => None,
        RetryAfter::Seconds(s) | RetryAfter::HttpDate(s) => Some(Duration::from_secs(s)),
    }
}

fn set_not_before(entry: &MailboxEntry, wait: Duration) {
    let until = Instant::now() + wait;
    let mut st = lock(&entry.state);
    st.not_before = Some(st.not_before.map_or(until, |nb| nb.max(until)));
}

/// Dev Proxy's rule: a request before the Retry-After the mailbox was given has passed is
/// throttled again and counted against the app.
fn early_retry_check(sim: &Shared, entry: &MailboxEntry, ids: &RequestIds) -> Option<Reply> {
    let now = Instant::now();
    let remaining = {
        let mut st = lock(&entry.state);
        match st.not_before {
            Some(nb) if now < nb => nb - now,
            Some(_) => {
                st.not_before = None;
                return None;
            }
            None => return None,
        }
    };
    lock(&sim.stats).violation(
        ViolationKind::EarlyRetry,
        json!({"mailbox": entry.address, "remaining_ms": remaining.as_millis() as u64,
               "at": Utc::now().to_rfc3339(), "client-request-id": ids.client_request_id}),
    );
    Some(
        graph_error(
            429,
            "ApplicationThrottled",
            "Application retried before the Retry-After interval elapsed.",
            ids,
        )
        .retry_after(RetryAfter::Seconds(secs_ceil(remaining).max(1))),
    )
}

fn window_check(sim: &Shared, entry: &MailboxEntry, ids: &RequestIds) -> Option<Reply> {
    let now = Instant::now();
    let window = sim.config.mailbox_window;
    let wait = {
        let mut st = lock(&entry.state);
        if now.saturating_duration_since(st.window_start) >= window {
            st.window_start = now;
            st.window_count = 0;
        }
        st.window_count = st.window_count.saturating_add(1);
        if st.window_count <= sim.config.mailbox_requests_per_window {
            return None;
        }
        (st.window_start + window).saturating_duration_since(now)
    };
    set_not_before(entry, wait);
    Some(
        graph_error(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxRequests limit.",
            ids,
        )
        .retry_after(RetryAfter::Seconds(secs_ceil(wait).max(1))),
    )
}

fn unauthorized(message: &str, ids: &RequestIds) -> Reply {
    graph_error(401, "InvalidAuthenticationToken", message, ids).header(
        "www-authenticate",
        "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
    )
}

/// Delta-only faults that change the shape of a round rather than a single response.
#[derive(Default)]
struct DeltaShape {
    next_link_loop: bool,
    oversized_page: bool,
    empty_pages: u32,
    duplicates: bool,
}

impl DeltaShape {
    fn from_faults(kinds: &[FaultKind]) -> Self {
        let mut s = Self::default();
        for k in kinds {
            match k {
                FaultKind::NextLinkLoop => s.next_link_loop = true,
                FaultKind::OversizedPage => s.oversized_page = true,
                FaultKind::EmptyPages { n } => s.empty_pages = s.empty_pages.max(*n),
                FaultKind::Duplicates => s.duplicates = true,
                _ => {}
            }
        }
        s
    }
}

fn requested_page_size(headers: &HeaderMap) -> (Option<usize>, bool) {
    let mut size = None;
    let mut utc = false;
    for v in headers.get_all("prefer") {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(',') {
            let part = part.trim();
            let lower = part.to_ascii_lowercase();
            if let Some(n) = lower.strip_prefix("odata.maxpagesize=") {
                if let Ok(n) = n.trim().parse::<usize>() {
                    size = Some(n.max(1));
                }
            } else if lower == "outlook.timezone=\"utc\"" {
                utc = true;
            }
        }
    }
    (size, utc)
}

/// Query options Graph refuses on calendarView delta (`$top` has a message of its own).
const UNSUPPORTED: &[&str] = &["$select", "$filter", "$orderby", "$expand", "$search"];

fn delta_page(
    sim: &Shared,
    entry: &MailboxEntry,
    uri: &Uri,
    headers: &HeaderMap,
    ids: &RequestIds,
    shape: &DeltaShape,
) -> Result<Reply, Reply> {
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let get = |k: &str| {
        query
            .iter()
            .find(|(qk, _)| qk == k || qk.strip_prefix('$') == Some(k))
            .map(|(_, v)| v.as_str())
    };
    // `$top` is checked first: a request with `$select` and `$top` is reported to get this one.
    if query.iter().any(|(k, _)| k == "$top") {
        return Err(graph_error(
            400,
            "ErrorInvalidUrlQuery",
            "The '$top' parameter is not supported with change tracking over the 'CalendarView' resource as page size cannot be guaranteed. Express page size preferences using the Prefer: odata.maxpagesize= header instead.",
            ids,
        ));
    }
    if query.iter().any(|(k, _)| UNSUPPORTED.contains(&k.as_str())) {
        return Err(graph_error(
            400,
            "ErrorInvalidUrlQuery",
            "The following parameters are not supported with change tracking over the 'CalendarView' resource: '$orderby, $filter, $select, $expand, $search'.",
            ids,
        ));
    }
    let now = sim.now();
    let now_ms = now.timestamp_millis();
    let mailbox_key = entry.address.to_ascii_lowercase();
    let (requested, utc) = requested_page_size(headers);

    let token = get("$skiptoken")
        .map(|t| (t, LinkKind::Skip))
        .or_else(|| get("$deltatoken").map(|t| (t, LinkKind::Delta)));
    let mut pos = match token {
        Some((raw, expected_kind)) => {
            let pos = sim.signer.open_position(raw).map_err(|e| match e {
                // A well-formed token we cannot verify is state this server does not hold.
                TokenError::BadSignature => graph_error(
                    410,
                    "SyncStateNotFound",
                    "The sync state generation is not found; generation=0.",
                    ids,
                ),
                TokenError::Malformed => graph_error(
                    400,
                    "ErrorInvalidSyncStateData",
                    "Synchronization state data is corrupt or otherwise invalid.",
                    ids,
                ),
            })?;
            if pos.k != expected_kind || pos.m != mailbox_key {
                return Err(graph_error(
                    400,
                    "ErrorInvalidSyncStateData",
                    "Synchronization state data is corrupt or otherwise invalid.",
                    ids,
                ));
            }
            let max_age = sim.config.delta_token_max_age.as_millis() as i64;
            if now_ms.saturating_sub(pos.iat) > max_age {
                return Err(graph_error(
                    410,
                    "SyncStateNotFound",
                    &format!(
                        "The sync state generation is not found; generation={}.",
                        pos.s
                    ),
                    ids,
                ));
            }
            pos
        }
        None => {
            let (Some(s), Some(e)) = (get("startdatetime"), get("enddatetime")) else {
                return Err(graph_error(
                    400,
                    "ErrorInvalidParameter",
                    "This request requires a time window specified by the query string parameters StartDateTime and EndDateTime.",
                    ids,
                ));
            };
            let (Some(ws), Some(we)) = (parse_graph_datetime(s), parse_graph_datetime(e)) else {
                return Err(graph_error(
                    400,
                    "ErrorInvalidParameter",
                    "The parameter 'StartDateTime' or 'EndDateTime' is not a valid ISO 8601 date-time.",
                    ids,
                ));
            };
            if we <= ws {
                return Err(graph_error(
                    400,
                    "ErrorInvalidParameter",
                    "The parameter 'EndDateTime' must be later than 'StartDateTime'.",
                    ids,
                ));
            }
            DeltaPosition {
                k: LinkKind::Delta,
                m: mailbox_key,
                ws: ws.timestamp_millis(),
                we: we.timestamp_millis(),
                s: 0,
                u: 0,
                o: 0,
                iat: now_ms,
                p: 0,
                e: 0,
                l: false,
                n: 0,
            }
        }
    };
    let round_start = pos.k == LinkKind::Delta;
    let size_wanted = requested
        .or((pos.p > 0).then_some(pos.p))
        .unwrap_or(sim.config.default_page_size);
    let applied = size_wanted.min(sim.config.max_page_size);
    let window = Window {
        start: Utc
            .timestamp_millis_opt(pos.ws)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
        end: Utc
            .timestamp_millis_opt(pos.we)
            .single()
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    };

    let st = lock(&entry.state);
    if round_start {
        // A new round covers everything changed since the token up to now.
        pos.u = st.calendar.current_seq();
        pos.k = LinkKind::Skip;
        pos.o = 0;
    }
    pos.p = applied;
    pos.iat = now_ms;
    let nonce = || rand::thread_rng().gen_range(1..u64::MAX);

    let mut items: Vec<Value> = Vec::new();
    let next: Option<DeltaPosition>;
    if round_start && shape.empty_pages > 0 && !pos.l {
        next = Some(DeltaPosition {
            e: shape.empty_pages - 1,
            n: nonce(),
            ..pos.clone()
        });
    } else if pos.e > 0 {
        next = Some(DeltaPosition {
            e: pos.e - 1,
            n: nonce(),
            ..pos.clone()
        });
    } else {
        let page_size = if shape.oversized_page {
            applied * 3
        } else {
            applied
        };
        let page = st.calendar.read_page(
            &window,
            pos.s,
            pos.u,
            pos.o,
            page_size,
            sim.config.masters_in_delta,
        );
        let consumed = page.next_offset.unwrap_or(pos.o) - pos.o;
        items = page.items.into_iter().map(DeltaItem::into_json).collect();
        if shape.next_link_loop || pos.l {
            next = Some(DeltaPosition {
                l: true,
                n: nonce(),
                ..pos.clone()
            });
        } else {
            let mut next_offset = page.next_offset;
            if shape.duplicates && !items.is_empty() {
                let extra: Vec<Value> = items.iter().take(2).cloned().collect();
                items.extend(extra);
                // Step back one so the next page repeats this page's last entry too.
                if consumed > 1 {
                    next_offset = next_offset.map(|o| o - 1);
                }
            }
            next = next_offset.map(|o| DeltaPosition {
                o,
                n: 0,
                ..pos.clone()
            });
        }
    }
    drop(st);

    let host = header_str(headers, "host").unwrap_or("localhost");
    let base = format!("http://{host}{}", uri.path());
    let mut body = json!({
        "@odata.context": format!("http://{host}/v1.0/$metadata#Collection(event)"),
        "value": items,
    });
    match next {
        Some(p) => {
            body["@odata.nextLink"] =
                format!("{base}?$skiptoken={}", sim.signer.seal_position(&p)).into();
        }
        None => {
            let d = DeltaPosition {
                k: LinkKind::Delta,
                s: pos.u,
                u: 0,
                o: 0,
                e: 0,
                l: false,
                n: 0,
                ..pos
            };
            body["@odata.deltaLink"] =
                format!("{base}?$deltatoken={}", sim.signer.seal_position(&d)).into();
        }
    }
    // Every delta page says change tracking was applied, whether or not it was asked for.
    let mut applied_prefs = vec!["odata.track-changes".to_string()];
    if requested.is_some() {
        applied_prefs.push(format!("odata.maxpagesize={applied}"));
    }
    if utc {
        applied_prefs.push("outlook.timezone=\"UTC\"".to_string());
    }
    Ok(Reply::json(200, GRAPH_JSON, &body).header("preference-applied", applied_prefs.join(", ")))
}

/// Any other Graph path: the error Graph gives for an unknown segment.
pub async fn not_found(uri: Uri, headers: HeaderMap) -> Response {
    let ids = RequestIds::from_headers(&headers);
    let reply = graph_error(
        400,
        "BadRequest",
        &format!("Resource not found for the segment '{}'.", uri.path()),
        &ids,
    )
    .header("request-id", ids.request_id.clone())
    .header("client-request-id", ids.client_request_id.clone());
    finish(reply, &Delivery::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_forms() {
        let want = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single();
        assert_eq!(parse_graph_datetime("2026-11-01T00:00:00Z"), want);
        assert_eq!(parse_graph_datetime("2026-11-01T00:00:00.0000000"), want);
        assert_eq!(parse_graph_datetime("2026-11-01"), want);
        assert_eq!(parse_graph_datetime("2026-11-01T01:00:00 01:00"), want);
        assert_eq!(parse_graph_datetime("yesterday"), None);
    }

    #[test]
    fn prefer_header_parsing() {
        let mut h = HeaderMap::new();
        h.append(
            "prefer",
            "odata.maxpagesize=50, outlook.timezone=\"UTC\""
                .parse()
                .expect("valid header"),
        );
        assert_eq!(requested_page_size(&h), (Some(50), true));
        assert_eq!(requested_page_size(&HeaderMap::new()), (None, false));
    }
}
