//! Microsoft Graph client: the one request path every Graph call takes (delta pages, series
//! masters, subscriptions), with a deadline, a size cap, request ids, redaction of what was sent
//! and error classification. Retrying is the caller's decision.

pub mod model;

use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

pub use model::{Attendees, DeltaItem, DeltaPage, Event, OccurrenceStub, PageItem, PageLink};

use crate::auth::AccessToken;
use crate::config::GraphSettings;
use crate::net;
use crate::resilience::retry_after;

/// Error codes meaning "your delta state is gone, start over", compared case-insensitively.
const RESYNC_CODES: [&str; 4] = [
    "syncstatenotfound",
    "resyncrequired",
    "invaliddeltatoken",
    "syncstateinvalid",
];
/// Error bodies are read only this far.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A URL calsync may send its bearer token to: built on the configured Graph base, or a link
/// Graph gave that passed the same-origin check. Only [`GraphClient`] makes one, so no request
/// can go to a URL that was not checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedLink(Url);

impl CheckedLink {
    pub fn as_url(&self) -> &Url {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The same URL with query parameters added (same origin, still checked).
    pub fn with_query(mut self, pairs: &[(&str, &str)]) -> Self {
        {
            let mut query = self.0.query_pairs_mut();
            for (key, value) in pairs {
                query.append_pair(key, value);
            }
        }
        self
    }
}

impl std::fmt::Display for CheckedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// The time range a delta state covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Ids Graph puts on every response, for support cases. Logged with every failure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestIds {
    pub request_id: Option<String>,
    pub client_request_id: String,
}

impl std::fmt::Display for RequestIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "request-id {}, client-request-id {}",
            self.request_id.as_deref().unwrap_or("-"),
            self.client_request_id
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("Graph answered 401 ({code}); the access token was refused [{ids}]")]
    Unauthorized { code: String, ids: RequestIds },
    #[error(
        "Graph throttled the request (HTTP {status} {code}), {} [{ids}]", retry_after.map_or("no Retry-After".to_string(), |d| format!("retry after {}s", d.as_secs_f64()))
    )]
    Throttled {
        status: u16,
        code: String,
        retry_after: Option<Duration>,
        ids: RequestIds,
    },
    #[error("Graph says the delta state is gone (HTTP {status} {code}); a full resync is needed [{ids}]")]
    ResyncRequired {
        status: u16,
        code: String,
        ids: RequestIds,
    },
    /// No answer: the connection could not be made or was cut (refused, reset, closed).
    #[error("Graph could not be reached: {reason} [{ids}]")]
    Unreachable { reason: String, ids: RequestIds },
    #[error("Graph failed transiently: {reason} [{ids}]")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
        ids: RequestIds,
    },
    /// 404: the item (a series master, a subscription) does not exist (any more).
    #[error("Graph has no such item (HTTP 404 {code}) [{ids}]")]
    NotFound { code: String, ids: RequestIds },
    #[error("Graph refused the request (HTTP {status} {code}): {message} [{ids}]")]
    Permanent {
        status: u16,
        code: String,
        message: String,
        ids: RequestIds,
    },
    #[error("Graph sent an unusable response: {reason} [{ids}]")]
    Malformed { reason: String, ids: RequestIds },
    /// A create whose `transactionId` already made an event (`ErrorDuplicateTransactionId`):
    /// the event exists, and Graph may name it (`@event.existingEventId`).
    #[error("Graph already made an event with this transactionId (HTTP {status} ErrorDuplicateTransactionId) [{ids}]")]
    DuplicateTransaction {
        status: u16,
        existing_event_id: Option<String>,
        ids: RequestIds,
    },
    #[error("refused to follow a link to `{host}`: the bearer token is only sent to the configured Graph host")]
    ForeignLink { host: String },
    #[error("link `{0}` is not a valid URL")]
    BadLink(String),
}

impl GraphError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } | Self::Transient { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The class of this error as a metric label (never its message).
    pub fn reason_label(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. } => "graph_unauthorized",
            Self::Throttled { .. } => "graph_throttled",
            Self::ResyncRequired { .. } => "graph_resync_required",
            Self::Transient { .. } => "graph_transient",
            Self::Unreachable { .. } => "graph_unreachable",
            Self::NotFound { .. } => "graph_not_found",
            Self::Permanent { .. } => "graph_permanent",
            Self::Malformed { .. } => "graph_malformed",
            Self::DuplicateTransaction { .. } => "graph_duplicate_transaction",
            Self::ForeignLink { .. } | Self::BadLink(_) => "graph_bad_link",
        }
    }

    /// The HTTP status class of the answer behind this error, as a metric label (`none`: no
    /// HTTP answer).
    pub fn status_label(&self) -> &'static str {
        use crate::metrics::status_class;
        match self {
            Self::Unauthorized { .. } => "401",
            Self::NotFound { .. } => "4xx",
            Self::Throttled { status: 429, .. } => "429",
            Self::Throttled { status, .. }
            | Self::ResyncRequired { status, .. }
            | Self::Permanent { status, .. }
            | Self::DuplicateTransaction { status, .. } => status_class(*status),
            // Transient failures with an answer are worded "HTTP {status} {code}" by the
            // classifier.
            Self::Transient { reason, .. } => reason
                .strip_prefix("HTTP ")
                .and_then(|rest| rest.split(' ').next())
                .and_then(|code| code.parse::<u16>().ok())
                .map_or("none", status_class),
            Self::Malformed { .. } => "2xx",
            Self::Unreachable { .. } | Self::ForeignLink { .. } | Self::BadLink(_) => "none",
        }
    }

    pub fn request_ids(&self) -> Option<&RequestIds> {
        match self {
            Self::Unauthorized { ids, .. }
            | Self::Throttled { ids, .. }
            | Self::ResyncRequired { ids, .. }
            | Self::Transient { ids, .. }
            | Self::Unreachable { ids, .. }
            | Self::NotFound { ids, .. }
            | Self::Permanent { ids, .. }
            | Self::DuplicateTransaction { ids, .. }
            | Self::Malformed { ids, .. } => Some(ids),
            Self::ForeignLink { .. } | Self::BadLink(_) => None,
        }
    }
}

#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
    page_size: u32,
    max_body: usize,
    /// Bounds every call from outside, body included, whatever the HTTP client was built with.
    deadline: Duration,
}

/// One request to Graph. Its URL is one calsync built on the configured base or a link that
/// passed [`GraphClient::check_link`].
pub struct GraphRequest<'a> {
    method: http::Method,
    url: CheckedLink,
    body: Option<serde_json::Value>,
    /// Statuses that mean success; anything else is classified as an error.
    success: &'a [u16],
    max_body: usize,
    /// A secret the body carries (a subscription's clientState), redacted from error answers.
    secret: Option<&'a SecretString>,
    page_size: Option<u32>,
    /// Longer than the client's own deadline, for a call Graph answers only after work of its
    /// own (a subscription create waits for Graph's validation request).
    deadline: Option<Duration>,
    /// `If-Match`: the etag the item must still have (an update that must not overwrite a
    /// change it has not seen).
    if_match: Option<String>,
}

impl<'a> GraphRequest<'a> {
    fn new(method: http::Method, url: CheckedLink, success: &'a [u16], max_body: usize) -> Self {
        Self {
            method,
            url,
            body: None,
            success,
            max_body,
            secret: None,
            page_size: None,
            deadline: None,
            if_match: None,
        }
    }

    /// Sent only if the item still has `etag`; Graph answers 412 otherwise.
    pub fn if_match(mut self, etag: &str) -> Self {
        self.if_match = Some(etag.to_string());
        self
    }

    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Reads a successful answer's body up to `bytes` (a list larger than one item).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// A JSON body; `secret`, if it holds one, is redacted from whatever Graph answers.
    pub fn json(mut self, body: serde_json::Value, secret: Option<&'a SecretString>) -> Self {
        self.body = Some(body);
        self.secret = secret;
        self
    }
}

/// A successful answer.
pub struct GraphResponse {
    pub status: u16,
    pub body: Vec<u8>,
    pub ids: RequestIds,
}

fn checked_link(base: &Url, link: &str) -> Result<CheckedLink, GraphError> {
    let url = Url::parse(link).map_err(|_| GraphError::BadLink(truncate(link, 120)))?;
    let same_origin = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default();
    if !same_origin {
        // With the port: a link to another port of the same host is just as foreign.
        let host = &url[url::Position::BeforeHost..url::Position::AfterPort];
        return Err(GraphError::ForeignLink {
            host: if host.is_empty() { "(none)" } else { host }.to_string(),
        });
    }
    Ok(CheckedLink(url))
}

/// A link that begins with the base's origin exactly as the URL parser writes it, then `/`,
/// has that origin: the parser reads the host up to that slash, and nothing after it can fail
/// to parse. Anything else (another case, a default port spelt out, a foreign host) takes the
/// full check. Parsing a long deltaLink is most of the check's cost.
fn accepted_link(base: &Url, link: &str) -> Result<(), GraphError> {
    let origin = &base[..url::Position::BeforePath];
    if link
        .strip_prefix(origin)
        .is_some_and(|rest| rest.starts_with('/'))
    {
        return Ok(());
    }
    checked_link(base, link).map(drop)
}

/// Small answers (an event, a subscription) are read only this far.
const MAX_ITEM_BODY: usize = 1024 * 1024;

/// A random (version 4) UUID for `client-request-id`, from the thread's generator (a CSPRNG
/// seeded from the OS): `Uuid::new_v4` asks the OS for 16 bytes each time, a system call per
/// Graph request.
fn new_client_request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

impl GraphClient {
    pub fn new(settings: &GraphSettings, http: reqwest::Client) -> Self {
        Self {
            http,
            base: settings.base_url.clone(),
            page_size: settings.page_size,
            max_body: settings.max_response_bytes,
            deadline: settings.request_timeout,
        }
    }

    /// `{base}/{segments...}`, each segment percent-encoded.
    pub fn url(&self, segments: &[&str]) -> CheckedLink {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        CheckedLink(url)
    }

    pub fn get(&self, url: CheckedLink) -> GraphRequest<'static> {
        GraphRequest::new(http::Method::GET, url, &[200], MAX_ITEM_BODY)
    }

    pub fn post<'a>(&self, url: CheckedLink, success: &'a [u16]) -> GraphRequest<'a> {
        GraphRequest::new(http::Method::POST, url, success, MAX_ITEM_BODY)
    }

    pub fn patch<'a>(&self, url: CheckedLink, success: &'a [u16]) -> GraphRequest<'a> {
        GraphRequest::new(http::Method::PATCH, url, success, MAX_ITEM_BODY)
    }

    pub fn delete<'a>(&self, url: CheckedLink, success: &'a [u16]) -> GraphRequest<'a> {
        GraphRequest::new(http::Method::DELETE, url, success, MAX_ITEM_BODY)
    }

    /// The first request of a round: `/users/{id}/calendarView/delta?startDateTime&endDateTime`.
    pub fn initial_link(&self, mailbox: &str, window: &Window) -> CheckedLink {
        self.url(&["users", mailbox, "calendarView", "delta"])
            .with_query(&[
                (
                    "startDateTime",
                    &window.start.to_rfc3339_opts(SecondsFormat::Secs, true),
                ),
                (
                    "endDateTime",
                    &window.end.to_rfc3339_opts(SecondsFormat::Secs, true),
                ),
            ])
    }

    /// A nextLink or deltaLink as Graph gave it, checked to point at the configured Graph origin.
    pub fn check_link(&self, link: &str) -> Result<CheckedLink, GraphError> {
        checked_link(&self.base, link)
    }

    /// The same check for a link that is stored now and fetched later (when it is checked
    /// again, into the URL sent): without building the URL when the link is plainly at the
    /// configured origin.
    pub fn accept_link(&self, link: &str) -> Result<(), GraphError> {
        accepted_link(&self.base, link)
    }

    /// Fetches one page. The URL must come from [`initial_link`](Self::initial_link) or
    /// [`check_link`](Self::check_link).
    pub async fn fetch_page(
        &self,
        url: &CheckedLink,
        token: &AccessToken,
    ) -> Result<(DeltaPage, RequestIds), GraphError> {
        let mut request = GraphRequest::new(http::Method::GET, url.clone(), &[200], self.max_body);
        request.page_size = Some(self.page_size);
        let answer = self.send(request, token).await?;
        model::parse_page(&answer.body)
            .map(|page| (page, answer.ids.clone()))
            .map_err(|e| GraphError::Malformed {
                reason: e.0,
                ids: answer.ids,
            })
    }

    /// `GET /users/{mailbox}/events/{id}?$select=...`: one event in full (a series master,
    /// whose fields its occurrences take). [`GraphError::NotFound`] when it is gone.
    pub async fn fetch_event(
        &self,
        mailbox: &str,
        id: &str,
        select: &str,
        token: &AccessToken,
    ) -> Result<(Event, RequestIds), GraphError> {
        let url = self
            .url(&["users", mailbox, "events", id])
            .with_query(&[("$select", select)]);
        let answer = self.send(self.get(url), token).await?;
        model::parse_event_text(&String::from_utf8_lossy(&answer.body))
            .map(|event| (event, answer.ids.clone()))
            .map_err(|e| GraphError::Malformed {
                reason: e.0,
                ids: answer.ids,
            })
    }

    /// Sends one request: bearer token, a fresh `client-request-id`, UTC times, the body read
    /// under its cap, all within the deadline; a failure classified, with the request ids and
    /// with anything secret that was sent redacted from what Graph answered.
    pub async fn send(
        &self,
        request: GraphRequest<'_>,
        token: &AccessToken,
    ) -> Result<GraphResponse, GraphError> {
        let client_request_id = new_client_request_id();
        let ids = RequestIds {
            request_id: None,
            client_request_id: client_request_id.clone(),
        };
        let deadline = request.deadline.unwrap_or(self.deadline);
        match tokio::time::timeout(deadline, self.exchange(request, token, ids.clone())).await {
            Ok(answer) => answer,
            Err(_) => Err(GraphError::Transient {
                reason: format!("no complete answer within {}ms", deadline.as_millis()),
                retry_after: None,
                ids,
            }),
        }
    }

    async fn exchange(
        &self,
        request: GraphRequest<'_>,
        token: &AccessToken,
        mut ids: RequestIds,
    ) -> Result<GraphResponse, GraphError> {
        let mut builder = self
            .http
            .request(request.method.clone(), request.url.as_url().clone())
            .header(http::header::AUTHORIZATION, token.bearer_header())
            .header(http::header::ACCEPT, "application/json")
            .header("Prefer", "outlook.timezone=\"UTC\"")
            .header("client-request-id", &ids.client_request_id);
        if let Some(etag) = &request.if_match {
            builder = builder.header(http::header::IF_MATCH, etag);
        }
        if let Some(size) = request.page_size {
            builder = builder.header("Prefer", format!("odata.maxpagesize={size}"));
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        if let Some(deadline) = request.deadline {
            builder = builder.timeout(deadline);
        }
        let mut response = match builder.send().await {
            Ok(r) => r,
            Err(e) => return Err(transport_error(&e, String::new(), ids)),
        };
        ids.request_id = response
            .headers()
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = response.status().as_u16();
        if request.success.contains(&status) {
            let body = net::read_body_limited(&mut response, request.max_body)
                .await
                .map_err(|e| body_error(e, ids.clone()))?;
            return Ok(GraphResponse { status, body, ids });
        }
        let headers = response.headers().clone();
        let body = net::read_body_limited(&mut response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        // An error message may quote the request back: its Authorization header, or a secret
        // its body carried.
        let mut body = token.redact_from(&body);
        if let Some(secret) = request.secret {
            body = net::redact(&body, secret.expose_secret());
        }
        Err(classify_failure(
            status,
            &headers,
            &body,
            ids,
            SystemTime::now(),
        ))
    }
}

fn body_error(e: net::BodyError, ids: RequestIds) -> GraphError {
    match e {
        net::BodyError::TooLarge { .. } => GraphError::Malformed {
            reason: e.to_string(),
            ids,
        },
        net::BodyError::Transport(ref inner) => {
            transport_error(inner, "reading the body: ".into(), ids)
        }
    }
}

/// A request that got no (complete) answer: unreachable when the connection failed, transient
/// when it was only too slow.
fn transport_error(e: &reqwest::Error, context: String, ids: RequestIds) -> GraphError {
    let reason = format!("{context}{}", net::describe_transport(e));
    if net::is_connection_failure(e) {
        GraphError::Unreachable { reason, ids }
    } else {
        GraphError::Transient {
            reason,
            retry_after: None,
            ids,
        }
    }
}

/// Graph's error body: `{"error":{"code","message","innerError":{..}}}`. The code is the most
/// specific one: an `innerError` may nest and carry a more specific `code` than the outer one
/// (the Graph errors doc), so the deepest non-empty code wins.
fn error_code_and_message(body: &[u8]) -> (String, String, Option<String>) {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &json["error"];
    let code = most_specific_code(error).unwrap_or_default();
    let message: String = error["message"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    let request_id = find_request_id(&error["innerError"]);
    (code, message, request_id)
}

fn most_specific_code(error: &serde_json::Value) -> Option<String> {
    let mut code = None;
    let mut level = Some(error);
    // Bounded: a body nests only so deep before it is not worth reading.
    for _ in 0..16 {
        let Some(current) = level else { break };
        if let Some(c) = current["code"].as_str().filter(|c| !c.trim().is_empty()) {
            code = Some(c.trim().to_string());
        }
        level = current
            .get("innerError")
            .or_else(|| current.get("innererror"));
    }
    code
}

fn find_request_id(inner: &serde_json::Value) -> Option<String> {
    inner["request-id"]
        .as_str()
        .map(str::to_string)
        .or_else(|| inner.get("innerError").and_then(find_request_id))
}

pub fn classify_failure(
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    mut ids: RequestIds,
    now: SystemTime,
) -> GraphError {
    let (code, message, body_request_id) = error_code_and_message(body);
    if ids.request_id.is_none() {
        ids.request_id = body_request_id;
    }
    let retry_after = retry_after::from_headers(headers, now);
    let code_lower = code.to_ascii_lowercase();
    if status == 410 || RESYNC_CODES.contains(&code_lower.as_str()) {
        return GraphError::ResyncRequired { status, code, ids };
    }
    if code_lower == "errorduplicatetransactionid" {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        return GraphError::DuplicateTransaction {
            status,
            existing_event_id: json["error"]["@event.existingEventId"]
                .as_str()
                .filter(|id| !id.is_empty() && id.len() <= 512)
                .map(str::to_string),
            ids,
        };
    }
    match status {
        401 => GraphError::Unauthorized { code, ids },
        404 => GraphError::NotFound { code, ids },
        429 => GraphError::Throttled {
            status,
            code,
            retry_after,
            ids,
        },
        500..=599 => GraphError::Transient {
            reason: format!("HTTP {status} {code}"),
            retry_after,
            ids,
        },
        408 => GraphError::Transient {
            reason: format!("HTTP {status} {code}"),
            retry_after,
            ids,
        },
        _ => GraphError::Permanent {
            status,
            code,
            message,
            ids,
        },
    }
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Graph documents `client-request-id` as a GUID: each one a well-formed random UUID,
    /// hyphenated, and no two alike.
    #[test]
    fn client_request_ids_are_distinct_random_uuids() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| new_client_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(id, &uuid.hyphenated().to_string());
        }
    }

    #[test]
    fn a_link_is_accepted_exactly_when_its_check_passes() {
        for base in [
            "https://graph.microsoft.com/v1.0",
            "http://127.0.0.1:8080/v1.0/",
        ] {
            let base = Url::parse(base).expect("base");
            let origin = &base[..url::Position::BeforePath];
            let links = [
                format!("{origin}/users/a/calendarView/delta?$deltatoken=abc"),
                format!("{origin}/"),
                origin.to_string(),
                format!("{origin}@evil.example/x"),
                format!("{origin}.evil.example/x"),
                format!("{origin}:9999/x"),
                format!("{origin}\t/x"),
                format!(" {origin}/x"),
                origin.to_uppercase() + "/x",
                "https://graph.microsoft.com:443/v1.0/x".into(),
                "http://127.0.0.1:8081/x".into(),
                "https://evil.example/https://graph.microsoft.com/".into(),
                "not a link".into(),
                String::new(),
            ];
            for link in &links {
                assert_eq!(
                    accepted_link(&base, link).is_ok(),
                    checked_link(&base, link).is_ok(),
                    "{link} against {base}"
                );
            }
            assert!(accepted_link(&base, &links[0]).is_ok());
            assert!(accepted_link(&base, &links[3]).is_err(), "{}", links[3]);
        }
    }

    fn ids() -> RequestIds {
        RequestIds {
            request_id: None,
            client_request_id: "c".into(),
        }
    }

    #[test]
    fn resync_codes_match_case_insensitively() {
        for (status, code) in [
            (410, "SyncStateNotFound"),
            (410, "syncStateNotFound"),
            (400, "resyncRequired"),
            (400, "InvalidDeltaToken"),
        ] {
            let body = format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
            let e = classify_failure(
                status,
                &http::HeaderMap::new(),
                body.as_bytes(),
                ids(),
                SystemTime::now(),
            );
            assert!(
                matches!(e, GraphError::ResyncRequired { .. }),
                "{status} {code}: {e}"
            );
        }
    }

    #[test]
    fn status_labels_come_from_the_classifier_wording() {
        let answered =
            classify_failure(503, &http::HeaderMap::new(), b"", ids(), SystemTime::now());
        assert_eq!(answered.status_label(), "5xx");
        let throttled =
            classify_failure(429, &http::HeaderMap::new(), b"", ids(), SystemTime::now());
        assert_eq!(throttled.status_label(), "429");
        let reset = GraphError::Unreachable {
            reason: "connection reset by peer".into(),
            ids: ids(),
        };
        assert_eq!(reset.status_label(), "none");
        let gone = classify_failure(410, &http::HeaderMap::new(), b"", ids(), SystemTime::now());
        assert_eq!(gone.status_label(), "4xx");
    }

    #[test]
    fn reason_labels_never_carry_the_message() {
        let e = GraphError::Permanent {
            status: 403,
            code: "ErrorAccessDenied".into(),
            message: "alice@contoso.com may not".into(),
            ids: ids(),
        };
        assert_eq!(e.reason_label(), "graph_permanent");
    }

    #[test]
    fn the_most_specific_nested_code_classifies() {
        let body = br#"{"error":{"code":"BadRequest","message":"m","innerError":{"code":"","innerError":{"code":"SyncStateNotFound","request-id":"r"}}}}"#;
        let e = classify_failure(400, &http::HeaderMap::new(), body, ids(), SystemTime::now());
        assert!(
            matches!(&e, GraphError::ResyncRequired { code, .. } if code == "SyncStateNotFound"),
            "{e}"
        );
        let body =
            br#"{"error":{"code":"","message":"m","innerError":{"code":"ErrorItemNotFound"}}}"#;
        let e = classify_failure(404, &http::HeaderMap::new(), body, ids(), SystemTime::now());
        assert!(
            matches!(&e, GraphError::NotFound { code, .. } if code == "ErrorItemNotFound"),
            "{e}"
        );
        let body =
            br#"{"error":{"code":"generalException","message":"m","innerError":{"date":"d"}}}"#;
        let e = classify_failure(500, &http::HeaderMap::new(), body, ids(), SystemTime::now());
        assert!(e.to_string().contains("generalException"), "{e}");
    }

    #[test]
    fn nested_inner_error_request_id_is_found() {
        let body = br#"{"error":{"code":"","message":"","innerError":{"innerError":{"request-id":"rid-9"}}}}"#;
        let e = classify_failure(500, &http::HeaderMap::new(), body, ids(), SystemTime::now());
        assert_eq!(
            e.request_ids()
                .and_then(|i| i.request_id.clone())
                .as_deref(),
            Some("rid-9")
        );
    }

    #[test]
    fn throttling_keeps_retry_after() {
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", http::HeaderValue::from_static("315"));
        let e = classify_failure(429, &headers, b"", ids(), SystemTime::now());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(315)));
        let e = classify_failure(503, &headers, b"", ids(), SystemTime::now());
        assert!(matches!(e, GraphError::Transient { .. }));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(315)));
    }
}
