//! The admin API under `/v1`: the main app registers and removes mailboxes, asks for an
//! immediate sync, and reads a mailbox's sync status and stored events. JSON in and out, a
//! bearer token from `api.token`, and every error as `{"error":{"code","message",...}}`.
//! Described by `docs/openapi.json`, served at `/v1/openapi.json`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, Utc};
use ring::hmac;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{appointments, AppState};
use crate::config::Settings;
use crate::graph::Event;
use crate::store::{MailboxId, MailboxRecord, StoreError};

/// Where the API is mounted.
pub const PREFIX: &str = "/v1";
/// The OpenAPI 3.1 description, served as is.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");
const OPENAPI_PATH: &str = "/openapi.json";

/// Longest `[start, end)` one events request may cover.
pub const MAX_EVENTS_SPAN_DAYS: i64 = 366;
/// Events returned by one request unless `limit` says otherwise, and the most it may say.
pub const DEFAULT_EVENTS_LIMIT: usize = 1000;
pub const MAX_EVENTS_LIMIT: usize = 5000;
/// Mailboxes in one page of the list.
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 1000;
pub use crate::config::MAX_MAILBOX_LEN;
/// Request bodies are two short strings.
const BODY_LIMIT: usize = 16 * 1024;
/// A store that does not answer this fast gets the request a 503 instead of a hang.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API needs from the settings, prepared once: the token as an HMAC tag (compared in
/// constant time, whatever the length presented) and the configured tenants. Holds no token.
pub struct AdminApi {
    key: hmac::Key,
    expected: Option<hmac::Tag>,
    tenants: BTreeSet<String>,
    /// Tenants the application may write to (`tenants[].writes`).
    write_tenants: BTreeSet<String>,
    max_write_body: usize,
}

impl AdminApi {
    pub fn new(settings: &Settings) -> Self {
        // A per-process random key: the tag is only a fixed-length stand-in for the token so
        // that comparing it takes the same time for every guess.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &rand::random::<[u8; 32]>());
        let expected = settings
            .api
            .token
            .as_ref()
            .map(|token| hmac::sign(&key, token.expose_secret().as_bytes()));
        Self {
            key,
            expected,
            tenants: settings.tenants.iter().map(|t| t.name.clone()).collect(),
            write_tenants: settings
                .tenants
                .iter()
                .filter(|t| t.writes)
                .map(|t| t.name.clone())
                .collect(),
            max_write_body: settings.writes.max_body_bytes,
        }
    }

    pub fn writes_allowed(&self, tenant: &str) -> bool {
        self.write_tenants.contains(tenant)
    }

    pub fn max_write_body(&self) -> usize {
        self.max_write_body
    }

    pub fn enabled(&self) -> bool {
        self.expected.is_some()
    }
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("enabled", &self.enabled())
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

/// The guarded routes, relative to [`PREFIX`]. The router is built from this table, so
/// [`route_paths`] is exactly what it serves (the OpenAPI test relies on that).
fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/mailboxes", get(list_mailboxes).post(register_mailbox)),
        (
            "/mailboxes/{id}",
            get(mailbox_status).delete(remove_mailbox),
        ),
        ("/mailboxes/{id}/sync", post(request_sync)),
        (
            "/mailboxes/{id}/events",
            get(mailbox_events).post(appointments::create_event),
        ),
        (
            "/mailboxes/{id}/events/{external_id}",
            get(appointments::read_event)
                .patch(appointments::update_event)
                .delete(appointments::cancel_event),
        ),
        ("/writes/{id}", get(appointments::write_status)),
        ("/mailboxes/{id}/quarantine", get(mailbox_quarantine)),
    ]
}

/// Every path the API serves, with [`PREFIX`], in OpenAPI template form.
pub fn route_paths() -> Vec<String> {
    routes()
        .into_iter()
        .map(|(path, _)| path)
        .chain([OPENAPI_PATH])
        .map(|path| format!("{PREFIX}{path}"))
        .collect()
}

/// The API, to be nested at [`PREFIX`]. Everything but the OpenAPI document needs the token.
pub fn router(state: &AppState) -> Router<AppState> {
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        })
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route(OPENAPI_PATH, get(openapi))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_such_route)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

// ---- errors ----

/// An API error: status, a stable `code`, a message for people, and the body field or the
/// path/query parameter at fault when there is one.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    parameter: Option<&'static str>,
    challenge: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<&'a str>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            parameter: None,
            challenge: None,
        }
    }

    pub(super) fn field(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    pub(super) fn parameter(
        code: &'static str,
        parameter: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            parameter: Some(parameter),
            ..Self::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    /// [`field`](Self::field) in the shape of a plain function.
    pub(super) fn field_error(code: &'static str, field: &str, message: String) -> Self {
        Self::field(code, field, message)
    }

    /// A request header missing or malformed (400).
    pub(super) fn header(name: &'static str, message: &str) -> Self {
        Self::parameter("invalid_header", name, message)
    }

    #[cfg(test)]
    pub(super) fn field_name(&self) -> Option<&str> {
        self.field.as_deref()
    }

    #[cfg(test)]
    pub(super) fn code(&self) -> &str {
        self.code
    }

    pub(super) fn mailbox_not_found(id: MailboxId) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "mailbox_not_found",
            format!("no mailbox with id {id}"),
        )
    }

    /// The detail goes to the log; the caller learns only that the store failed.
    fn store(what: &'static str, error: &StoreError) -> Self {
        let unavailable = matches!(
            error,
            StoreError::Database(
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
            )
        );
        tracing::error!(error = %error, what, "admin API: store call failed");
        if unavailable {
            Self::store_unavailable()
        } else {
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see calsync's log",
            )
        }
    }

    fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the store is not answering; retry later",
        )
    }

    fn from_json(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ),
            rejection if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {BODY_LIMIT} bytes"),
            ),
            rejection => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                rejection.body_text(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
                parameter: self.parameter,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

// ---- authentication ----

/// `Authorization: Bearer <api.token>`, or 401 with a `WWW-Authenticate` challenge (RFC 6750).
/// Nothing of what was presented is logged or echoed.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let api = &state.admin;
    let Some(expected) = api.expected.as_ref() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_not_configured",
            "the admin API is disabled: set api.token or api.token_file in calsync's configuration",
        )
        .into_response();
    };
    let source = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| super::abuse::Source::of(info.0.ip()));
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    let challenge = match presented {
        None => {
            crate::metrics::admin_auth_failure("missing");
            crate::throttled_warn!(
                state.throttle,
                "admin_auth_missing",
                source,
                "admin API: requests without a bearer token refused"
            );
            ApiError {
                challenge: Some(r#"Bearer realm="calsync""#),
                ..ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send `Authorization: Bearer <token>` with calsync's api.token",
                )
            }
        }
        Some(token) if hmac::verify(&api.key, token.as_bytes(), expected.as_ref()).is_ok() => {
            let mut response = next.run(request).await;
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return response;
        }
        Some(_) => {
            crate::metrics::admin_auth_failure("wrong");
            crate::throttled_warn!(
                state.throttle,
                "admin_auth_wrong",
                source,
                "admin API: requests with a wrong bearer token refused"
            );
            ApiError {
                challenge: Some(r#"Bearer realm="calsync", error="invalid_token""#),
                ..ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the bearer token is not calsync's api.token",
                )
            }
        }
    };
    challenge.into_response()
}

/// The token of an `Authorization: Bearer ...` value (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

// ---- fallbacks and the description ----

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn no_such_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /v1/openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /v1/openapi.json",
    )
}

// ---- input ----

/// The `{id}` of a mailbox route: the positive number returned at registration.
pub(super) fn mailbox_id(path: Result<Path<String>, PathRejection>) -> Result<MailboxId, ApiError> {
    let invalid = || {
        ApiError::parameter(
            "invalid_parameter",
            "id",
            "`id` must be the mailbox's numeric id, as returned when it was registered",
        )
    };
    let Path(text) = path.map_err(|_| invalid())?;
    // Any int64 the OpenAPI allows (up to 19 digits) is an id that may or may not exist.
    if text.is_empty() || text.len() > 64 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match text.parse::<MailboxId>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(invalid()),
    }
}

/// Query parameters, each at most once and each one of `allowed`.
fn query_params(
    raw: Option<String>,
    allowed: &[&'static str],
) -> Result<HashMap<&'static str, String>, ApiError> {
    let mut params = HashMap::new();
    let raw = raw.unwrap_or_default();
    for (name, value) in url::form_urlencoded::parse(raw.as_bytes()) {
        let Some(known) = allowed.iter().copied().find(|a| *a == name) else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_parameter",
                format!(
                    "unknown query parameter `{}`; this route takes {}",
                    truncate(&name, 64),
                    allowed
                        .iter()
                        .map(|a| format!("`{a}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if params.insert(known, value.into_owned()).is_some() {
            return Err(ApiError::parameter(
                "invalid_parameter",
                known,
                format!("`{known}` is given more than once"),
            ));
        }
    }
    Ok(params)
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn instant_param(
    params: &HashMap<&'static str, String>,
    name: &'static str,
) -> Result<DateTime<Utc>, ApiError> {
    let text = params.get(name).ok_or_else(|| {
        ApiError::parameter(
            "missing_parameter",
            name,
            format!("`{name}` is required: an RFC 3339 instant such as 2026-12-01T00:00:00Z"),
        )
    })?;
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::parameter(
                "invalid_parameter",
                name,
                format!(
                    "`{name}` must be an RFC 3339 instant such as 2026-12-01T00:00:00Z \
                     (percent-encode a `+` offset as %2B)"
                ),
            )
        })
}

fn limit_param(
    params: &HashMap<&'static str, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let Some(text) = params.get("limit") else {
        return Ok(default);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::parameter(
            "invalid_parameter",
            "limit",
            format!("`limit` must be a whole number from 1 to {max}"),
        )),
    }
}

/// `{"tenant": "...", "mailbox": "..."}`, checked member by member so that the error names
/// the one at fault.
struct Registration {
    tenant: String,
    mailbox: String,
}

impl Registration {
    fn parse(body: Value, tenants: &BTreeSet<String>) -> Result<Self, ApiError> {
        let Value::Object(mut members) = body else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                r#"the body must be a JSON object: {"tenant": "...", "mailbox": "..."}"#,
            ));
        };
        let mut text = |name: &'static str| match members.remove(name) {
            None | Some(Value::Null) => Err(ApiError::field(
                "missing_field",
                name,
                format!("`{name}` is required"),
            )),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(ApiError::field(
                "invalid_field",
                name,
                format!("`{name}` must be a string"),
            )),
        };
        let tenant = text("tenant")?;
        let mailbox = text("mailbox")?;
        if let Some(unknown) = members.keys().next() {
            return Err(ApiError::field(
                "unknown_field",
                &truncate(unknown, 64),
                format!(
                    "unknown field `{}`; the body has `tenant` and `mailbox`",
                    truncate(unknown, 64)
                ),
            ));
        }
        if !tenants.contains(&tenant) {
            return Err(ApiError::field(
                "unknown_tenant",
                "tenant",
                format!(
                    "`tenant` must be a tenant of calsync's configuration (its credentials live \
                     there); `{}` is not",
                    truncate(&tenant, 64)
                ),
            ));
        }
        // The config's rule for `tenants[].mailboxes`, exactly (both trim surrounding blanks).
        let mailbox = mailbox.trim().to_string();
        if let Err(why) = crate::config::check_mailbox(&mailbox) {
            return Err(ApiError::field(
                "invalid_field",
                "mailbox",
                format!("`mailbox` {why}"),
            ));
        }
        Ok(Self { tenant, mailbox })
    }
}

/// Runs a store call with a deadline; its failure is logged and answered without detail.
pub(super) async fn store_call<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(STORE_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::store(what, &e)),
        Err(_) => {
            tracing::error!(what, "admin API: store call timed out");
            Err(ApiError::store_unavailable())
        }
    }
}

// ---- output ----

/// A mailbox as the API shows it.
#[derive(Serialize)]
pub struct MailboxView {
    pub id: MailboxId,
    pub tenant: String,
    pub mailbox: String,
    /// `config` (seeded from the config file) or `api` (registered here).
    pub source: String,
    /// `false` once the config no longer lists a config-seeded mailbox: it is not synced.
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub status: SyncStatus,
}

#[derive(Serialize)]
pub struct SyncStatus {
    /// `disabled`, `never_synced`, `ok` (the last job succeeded) or `failing`.
    pub state: &'static str,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// Seconds since the last success (since registration when there was none).
    pub lag_seconds: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Graph's `request-id` of the last job, for support cases.
    pub last_request_id: Option<String>,
    pub consecutive_failures: u32,
    pub next_run_at: DateTime<Utc>,
    /// A job holds the mailbox's lease now (on this replica or another).
    pub running: bool,
    /// An immediate sync was asked for and no job has started since.
    pub sync_requested: bool,
    pub sync_requested_at: Option<DateTime<Utc>>,
}

impl MailboxView {
    pub fn of(m: &MailboxRecord, now: DateTime<Utc>) -> Self {
        let state = if !m.enabled {
            "disabled"
        } else if m.consecutive_failures > 0 {
            "failing"
        } else if m.last_success_at.is_none() {
            "never_synced"
        } else {
            "ok"
        };
        Self {
            id: m.id,
            tenant: m.tenant.clone(),
            mailbox: m.user_id.clone(),
            source: m.source.clone(),
            enabled: m.enabled,
            created_at: m.created_at,
            status: SyncStatus {
                state,
                last_success_at: m.last_success_at,
                last_attempt_at: m.last_attempt_at,
                lag_seconds: m.lag_seconds(now),
                last_error: m.last_error.clone(),
                last_error_at: m.last_error_at,
                last_request_id: m.last_request_id.clone(),
                consecutive_failures: m.consecutive_failures,
                next_run_at: m.next_run_at,
                running: m.is_running(now),
                sync_requested: m.sync_requested_at.is_some(),
                sync_requested_at: m.sync_requested_at,
            },
        }
    }
}

/// An event as stored: every column, and the item exactly as Graph sent it. An occurrence
/// carries its series master's fields; its `raw` is the stub Graph sent.
#[derive(Serialize)]
pub struct EventView {
    pub event_id: String,
    pub ical_uid: Option<String>,
    pub change_key: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<DateTime<Utc>>,
    pub subject: Option<String>,
    pub location: Option<String>,
    pub categories: Vec<String>,
    pub web_link: Option<String>,
    pub sensitivity: Option<String>,
    pub show_as: Option<String>,
    pub start_utc: DateTime<Utc>,
    pub end_utc: DateTime<Utc>,
    pub start_date: Option<NaiveDate>,
    pub end_date: Option<NaiveDate>,
    pub is_all_day: bool,
    pub is_cancelled: bool,
    pub event_type: Option<String>,
    pub series_master_id: Option<String>,
    pub organizer_name: Option<String>,
    pub organizer_address: Option<String>,
    pub attendees: Value,
    /// The item exactly as Graph sent it.
    pub raw: Option<Box<RawValue>>,
}

impl EventView {
    pub(super) fn of(e: Event) -> Self {
        Self {
            event_id: e.id,
            ical_uid: e.ical_uid,
            change_key: e.change_key,
            etag: e.etag,
            last_modified: e.last_modified,
            subject: e.subject,
            location: e.location,
            categories: e.categories,
            web_link: e.web_link,
            sensitivity: e.sensitivity,
            show_as: e.show_as,
            start_utc: e.start_utc,
            end_utc: e.end_utc,
            start_date: e.start_date,
            end_date: e.end_date,
            is_all_day: e.is_all_day,
            is_cancelled: e.is_cancelled,
            event_type: e.event_type,
            series_master_id: e.series_master_id,
            organizer_name: e.organizer_name,
            organizer_address: e.organizer_address,
            attendees: e.attendees.to_value(),
            raw: RawValue::from_string(e.raw).ok(),
        }
    }
}

#[derive(Serialize)]
struct MailboxList {
    mailboxes: Vec<MailboxView>,
    /// Pass as `after` for the next page; `null` on the last one.
    next_after: Option<MailboxId>,
}

#[derive(Serialize)]
struct EventList {
    mailbox_id: MailboxId,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    count: usize,
    /// More events overlap the range than `limit`: narrow the range to see the rest.
    truncated: bool,
    events: Vec<EventView>,
}

#[derive(Serialize)]
struct SyncQueued {
    id: MailboxId,
    queued: bool,
    already_queued: bool,
    requested_at: Option<DateTime<Utc>>,
}

// ---- handlers ----

async fn register_mailbox(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(ApiError::from_json)?;
    let wanted = Registration::parse(body, &state.admin.tenants)?;
    let now = Utc::now();
    let (record, added) = store_call(
        "register_mailbox",
        state
            .store
            .register_mailbox(&wanted.tenant, &wanted.mailbox, now),
    )
    .await?;
    if added {
        tracing::info!(tenant = %record.tenant, mailbox = %record.user_id, id = record.id, "admin API: mailbox registered");
    }
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(MailboxView::of(&record, now))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("{PREFIX}/mailboxes/{}", record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn list_mailboxes(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<MailboxList>, ApiError> {
    let params = query_params(query, &["tenant", "limit", "after"])?;
    let limit = limit_param(&params, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    let tenant = params.get("tenant");
    if let Some(tenant) = tenant {
        if !state.admin.tenants.contains(tenant) {
            return Err(ApiError::parameter(
                "unknown_tenant",
                "tenant",
                format!(
                    "`tenant` must be a tenant of calsync's configuration; `{}` is not",
                    truncate(tenant, 64)
                ),
            ));
        }
    }
    let after = match params.get("after") {
        None => 0,
        Some(text) => text.parse::<MailboxId>().map_err(|_| {
            ApiError::parameter(
                "invalid_parameter",
                "after",
                "`after` must be a mailbox id (the `next_after` of the previous page)",
            )
        })?,
    };
    // One more than a page tells whether another follows.
    let fetch = u32::try_from(limit + 1).unwrap_or(u32::MAX);
    let mut page = store_call(
        "mailboxes_page",
        state
            .store
            .mailboxes_page(tenant.map(String::as_str), after, fetch),
    )
    .await?;
    let more = page.len() > limit;
    page.truncate(limit);
    let now = Utc::now();
    Ok(Json(MailboxList {
        next_after: if more {
            page.last().map(|m| m.id)
        } else {
            None
        },
        mailboxes: page.iter().map(|m| MailboxView::of(m, now)).collect(),
    }))
}

async fn mailbox_status(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<MailboxView>, ApiError> {
    let id = mailbox_id(path)?;
    let record = store_call("mailbox_by_id", state.store.mailbox_by_id(id))
        .await?
        .ok_or_else(|| ApiError::mailbox_not_found(id))?;
    Ok(Json(MailboxView::of(&record, Utc::now())))
}

async fn remove_mailbox(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = mailbox_id(path)?;
    if store_call("remove_mailbox", state.store.remove_mailbox(id)).await? {
        tracing::info!(id, "admin API: mailbox removed");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::mailbox_not_found(id))
    }
}

async fn request_sync(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<SyncQueued>), ApiError> {
    let id = mailbox_id(path)?;
    let queued = store_call("request_sync", state.store.request_sync(id, Utc::now())).await?;
    let record = store_call("mailbox_by_id", state.store.mailbox_by_id(id)).await?;
    match (queued, record) {
        (Some(new), record) => Ok((
            StatusCode::ACCEPTED,
            Json(SyncQueued {
                id,
                queued: true,
                already_queued: !new,
                requested_at: record.and_then(|r| r.sync_requested_at),
            }),
        )),
        (None, Some(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "mailbox_disabled",
            format!("mailbox {id} is disabled (no longer in the configuration); register it again to sync it"),
        )),
        (None, None) => Err(ApiError::mailbox_not_found(id)),
    }
}

async fn mailbox_events(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventList>, ApiError> {
    let id = mailbox_id(path)?;
    let params = query_params(query, &["start", "end", "limit"])?;
    let start = instant_param(&params, "start")?;
    let end = instant_param(&params, "end")?;
    if end <= start {
        return Err(ApiError::parameter(
            "invalid_parameter",
            "end",
            "`end` must be after `start`",
        ));
    }
    if end - start > chrono::Duration::days(MAX_EVENTS_SPAN_DAYS) {
        return Err(ApiError::parameter(
            "invalid_parameter",
            "end",
            format!("`end` may be at most {MAX_EVENTS_SPAN_DAYS} days after `start`"),
        ));
    }
    let limit = limit_param(&params, DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)?;
    if store_call("mailbox_by_id", state.store.mailbox_by_id(id))
        .await?
        .is_none()
    {
        return Err(ApiError::mailbox_not_found(id));
    }
    let mut events =
        store_call("events_between", state.store.events_between(id, start, end)).await?;
    let truncated = events.len() > limit;
    events.truncate(limit);
    Ok(Json(EventList {
        mailbox_id: id,
        start,
        end,
        count: events.len(),
        truncated,
        events: events.into_iter().map(EventView::of).collect(),
    }))
}

#[derive(Serialize)]
struct QuarantineList {
    mailbox_id: MailboxId,
    count: usize,
    /// More items are quarantined than `limit`.
    truncated: bool,
    items: Vec<QuarantineView>,
}

#[derive(Serialize)]
struct QuarantineView {
    item_key: String,
    item_id: Option<String>,
    reason: String,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    times_seen: u64,
    /// The item exactly as Graph sent it (a string when it was not JSON calsync can embed).
    raw: Value,
}

/// Items Graph sent for the mailbox that calsync could not understand, set aside while the
/// rest of their pages was applied; most recently seen first.
async fn mailbox_quarantine(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<QuarantineList>, ApiError> {
    let id = mailbox_id(path)?;
    let params = query_params(query, &["limit"])?;
    let limit = limit_param(&params, DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)?;
    if store_call("mailbox_by_id", state.store.mailbox_by_id(id))
        .await?
        .is_none()
    {
        return Err(ApiError::mailbox_not_found(id));
    }
    let fetch = u32::try_from(limit).unwrap_or(u32::MAX).saturating_add(1);
    let mut items = store_call("quarantined", state.store.quarantined(id, fetch)).await?;
    let truncated = items.len() > limit;
    items.truncate(limit);
    Ok(Json(QuarantineList {
        mailbox_id: id,
        count: items.len(),
        truncated,
        items: items
            .into_iter()
            .map(|q| QuarantineView {
                raw: serde_json::from_str(&q.raw).unwrap_or(Value::String(q.raw)),
                item_key: q.item_key,
                item_id: q.item_id,
                reason: q.reason,
                first_seen: q.first_seen,
                last_seen: q.last_seen,
                times_seen: q.times_seen,
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header_value() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn the_openapi_document_is_json() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
