//! Writing the application's appointments into Outlook: `POST /v1/mailboxes/{id}/events`
//! (create), `PATCH` and `DELETE .../events/{external_id}` (update, cancel), each with an
//! `Idempotency-Key`; `GET .../events/{external_id}` reads back what Outlook holds and
//! `GET /v1/writes/{id}` a write's state. A write is checked here, stored (the outbox) and
//! answered 202; the mailbox's next sync job delivers it. Bodies hold personal data: they are
//! never logged, only ids and states are.

use axum::body::{to_bytes, Body};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use super::admin::{mailbox_id, store_call, truncate, ApiError, EventView, PREFIX};
use super::AppState;
use crate::store::{Enqueued, EventLink, MailboxId, NewWrite, WriteOp, WriteRecord};

/// Longest `external_id` and `Idempotency-Key`, in characters.
pub const MAX_KEY_LEN: usize = 255;
const MAX_SUBJECT_LEN: usize = 255;
const MAX_TEXT_LEN: usize = 255;
const MAX_ATTENDEES: usize = 500;
const MAX_CATEGORIES: usize = 50;
/// Writes of one appointment shown with it, newest first.
const WRITES_SHOWN: u32 = 20;

/// `POST /v1/mailboxes/{id}/events`: `{"external_id": "...", <event properties>}`.
pub(super) async fn create_event(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mailbox = mailbox_id(path)?;
    let key = idempotency_key(&headers)?;
    let mut members = json_object(&state, body, true).await?;
    let external_id = match members.remove("external_id") {
        Some(Value::String(id)) => checked_external_id(&id, ApiError::field_error)?,
        None | Some(Value::Null) => {
            return Err(ApiError::field(
                "missing_field",
                "external_id",
                "`external_id` is required: the application's own id for this appointment",
            ))
        }
        Some(_) => {
            return Err(ApiError::field(
                "invalid_field",
                "external_id",
                "`external_id` must be a string",
            ))
        }
    };
    let event = Appointment::parse(members, WriteOp::Create)?;
    enqueue(&state, mailbox, &external_id, WriteOp::Create, &key, event).await
}

/// `PATCH /v1/mailboxes/{id}/events/{external_id}`: only the properties that change.
pub(super) async fn update_event(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (mailbox, external_id) = event_path(path)?;
    let key = idempotency_key(&headers)?;
    let members = json_object(&state, body, true).await?;
    let event = Appointment::parse(members, WriteOp::Update)?;
    enqueue(&state, mailbox, &external_id, WriteOp::Update, &key, event).await
}

/// `DELETE /v1/mailboxes/{id}/events/{external_id}`, optionally `{"comment": "..."}` for the
/// attendees of a meeting.
pub(super) async fn cancel_event(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (mailbox, external_id) = event_path(path)?;
    let key = idempotency_key(&headers)?;
    let mut members = json_object(&state, body, false).await?;
    let mut cancel = Map::new();
    match members.remove("comment") {
        None | Some(Value::Null) => {}
        Some(Value::String(comment)) if comment.chars().count() <= 2000 => {
            cancel.insert("comment".into(), Value::String(comment));
        }
        Some(_) => {
            return Err(ApiError::field(
                "invalid_field",
                "comment",
                "`comment` must be a string of at most 2000 characters",
            ))
        }
    }
    if let Some(unknown) = members.keys().next() {
        return Err(unknown_field(unknown, "`comment`"));
    }
    enqueue(
        &state,
        mailbox,
        &external_id,
        WriteOp::Cancel,
        &key,
        Value::Object(cancel),
    )
    .await
}

/// `GET /v1/mailboxes/{id}/events/{external_id}`: the appointment's link to its Outlook
/// event, its latest writes, and the event as the last sync read it.
pub(super) async fn read_event(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<AppointmentView>, ApiError> {
    let (mailbox, external_id) = event_path(path)?;
    let link = store_call("event_link", state.store.event_link(mailbox, &external_id))
        .await?
        .ok_or_else(|| no_such_appointment(mailbox, &external_id))?;
    let writes = store_call(
        "writes_of_event",
        state
            .store
            .writes_of_event(mailbox, &external_id, WRITES_SHOWN),
    )
    .await?;
    let event = match &link.graph_event_id {
        Some(event_id) if !link.cancelled => {
            store_call("event_by_id", state.store.event_by_id(mailbox, event_id)).await?
        }
        _ => None,
    };
    Ok(Json(AppointmentView::of(
        link,
        writes,
        event.map(EventView::of),
    )))
}

/// `GET /v1/writes/{id}`.
pub(super) async fn write_status(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<WriteRecord>, ApiError> {
    let invalid = || {
        ApiError::parameter(
            "invalid_parameter",
            "id",
            "`id` must be a write id, as returned when the write was accepted",
        )
    };
    let Path(id) = path.map_err(|_| invalid())?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid());
    }
    store_call("write_by_id", state.store.write_by_id(&id))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "write_not_found",
                format!("no write with id {id}"),
            )
        })
}

#[derive(Serialize)]
pub struct AppointmentView {
    pub external_id: String,
    pub mailbox_id: MailboxId,
    /// Graph's id of the event, once the create was delivered.
    pub graph_event_id: Option<String>,
    /// A cancel was accepted for it.
    pub cancelled: bool,
    /// Newest first.
    pub writes: Vec<WriteRecord>,
    /// The event as the mailbox's last sync read it from Outlook (`null` before that, or once
    /// cancelled).
    pub event: Option<EventView>,
}

impl AppointmentView {
    fn of(link: EventLink, writes: Vec<WriteRecord>, event: Option<EventView>) -> Self {
        Self {
            external_id: link.external_id,
            mailbox_id: link.mailbox_id,
            graph_event_id: link.graph_event_id,
            cancelled: link.cancelled,
            writes,
            event,
        }
    }
}

async fn enqueue(
    state: &AppState,
    mailbox: MailboxId,
    external_id: &str,
    op: WriteOp,
    key: &str,
    body: Value,
) -> Result<Response, ApiError> {
    let record = store_call("mailbox_by_id", state.store.mailbox_by_id(mailbox))
        .await?
        .ok_or_else(|| ApiError::mailbox_not_found(mailbox))?;
    if !state.admin.writes_allowed(&record.tenant) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "writes_not_enabled",
            format!(
                "tenant `{}` does not allow writes: once its administrator has granted calsync's \
                 app the Calendars.ReadWrite application permission, set `writes = true` on the \
                 tenant in calsync's configuration",
                record.tenant
            ),
        ));
    }
    // serde_json's map is ordered by key, so the same request always hashes the same.
    let text = body.to_string();
    let hash = request_hash(op, external_id, &text);
    let id = uuid::Uuid::new_v4().to_string();
    let transaction_id = uuid::Uuid::new_v4().to_string();
    let write = NewWrite {
        id: &id,
        mailbox,
        external_id,
        op,
        idempotency_key: key,
        request_hash: &hash,
        body: &text,
        transaction_id: &transaction_id,
        now: Utc::now(),
    };
    let (status, record, replayed) = match store_call(
        "enqueue_write",
        state.store.enqueue_write(&write),
    )
    .await?
    {
        Enqueued::New(record) => {
            tracing::info!(write = %record.id, mailbox, op = op.as_str(), "admin API: write queued");
            (StatusCode::ACCEPTED, record, false)
        }
        Enqueued::Replay(record) => (StatusCode::ACCEPTED, record, true),
        Enqueued::KeyReused(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request on this mailbox; \
                     use a new key for a new request",
            ))
        }
        Enqueued::NoMailbox => return Err(ApiError::mailbox_not_found(mailbox)),
        Enqueued::MailboxDisabled => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "mailbox_disabled",
                format!("mailbox {mailbox} is disabled (no longer in the configuration)"),
            ))
        }
        Enqueued::EventExists => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "event_exists",
                format!(
                    "an appointment with external_id `{}` was already created in mailbox \
                         {mailbox}; update it with PATCH",
                    truncate(external_id, 64)
                ),
            ))
        }
        Enqueued::NoSuchEvent => return Err(no_such_appointment(mailbox, external_id)),
        Enqueued::EventCancelled => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "event_cancelled",
                format!(
                    "the appointment `{}` was cancelled; it cannot be changed any more",
                    truncate(external_id, 64)
                ),
            ))
        }
    };
    let mut response = (status, Json(record.clone())).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("{PREFIX}/writes/{}", record.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn request_hash(op: WriteOp, external_id: &str, body: &str) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [op.as_str(), external_id, body] {
        context.update(part.as_bytes());
        context.update(&[0]);
    }
    crate::hex(context.finish().as_ref())
}

fn no_such_appointment(mailbox: MailboxId, external_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "event_not_found",
        format!(
            "mailbox {mailbox} has no appointment with external_id `{}` created through this API",
            truncate(external_id, 64)
        ),
    )
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let bad = |message: &str| ApiError::header("Idempotency-Key", message);
    let value = headers.get("idempotency-key").ok_or_else(|| {
        bad("the `Idempotency-Key` header is required: a unique value per intended write (a UUID), sent again unchanged when the request is retried")
    })?;
    let text = value
        .to_str()
        .map_err(|_| bad("`Idempotency-Key` must be visible ASCII"))?
        .trim();
    if text.is_empty() || text.len() > MAX_KEY_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(&format!(
            "`Idempotency-Key` must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(text.to_string())
}

fn event_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(MailboxId, String), ApiError> {
    let Path((id, external_id)) = path.map_err(|_| {
        ApiError::parameter(
            "invalid_parameter",
            "external_id",
            "the path must be /mailboxes/{id}/events/{external_id}",
        )
    })?;
    let mailbox = mailbox_id(Ok(Path(id)))?;
    let external_id = checked_external_id(&external_id, |code, _, message| {
        ApiError::parameter(code, "external_id", message)
    })?;
    Ok((mailbox, external_id))
}

/// 1 to 255 characters, no control characters.
fn checked_external_id(
    id: &str,
    error: impl Fn(&'static str, &str, String) -> ApiError,
) -> Result<String, ApiError> {
    if id.is_empty() || id.chars().count() > MAX_KEY_LEN || id.chars().any(char::is_control) {
        return Err(error(
            "invalid_field",
            "external_id",
            format!(
                "`external_id` must be 1 to {MAX_KEY_LEN} characters without control characters"
            ),
        ));
    }
    Ok(id.to_string())
}

/// The body as a JSON object, read up to `writes.max_body_bytes` (413 beyond). An empty body
/// is an empty object where `required` is false.
async fn json_object(
    state: &AppState,
    body: Body,
    required: bool,
) -> Result<Map<String, Value>, ApiError> {
    let limit = state.admin.max_write_body();
    let bytes = to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes (writes.max_body_bytes)"),
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) && !required {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(members)) => Ok(members),
        // The parser's message quotes no input, only where it stopped.
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
        )),
    }
}

fn unknown_field(name: &str, allowed: &str) -> ApiError {
    ApiError::field(
        "unknown_field",
        &truncate(name, 64),
        format!(
            "unknown field `{}`; this request takes {allowed}",
            truncate(name, 64)
        ),
    )
}

/// The event properties an appointment may set, checked one by one so that an error names the
/// property at fault, and written out as the Graph event body.
struct Appointment;

const PROPERTIES: [&str; 13] = [
    "subject",
    "body",
    "start",
    "end",
    "isAllDay",
    "location",
    "attendees",
    "showAs",
    "sensitivity",
    "categories",
    "isReminderOn",
    "reminderMinutesBeforeStart",
    "importance",
];

impl Appointment {
    fn parse(mut members: Map<String, Value>, op: WriteOp) -> Result<Value, ApiError> {
        let mut event = Map::new();
        for name in PROPERTIES {
            let Some(value) = members.remove(name) else {
                continue;
            };
            let checked = match name {
                "subject" => text(name, value, MAX_SUBJECT_LEN)?,
                "body" => item_body(value)?,
                "start" | "end" => date_time(name, value)?,
                "isAllDay" | "isReminderOn" => boolean(name, value)?,
                "location" => location(value)?,
                "attendees" => attendees(value)?,
                "showAs" => choice(
                    name,
                    value,
                    &["free", "tentative", "busy", "oof", "workingElsewhere", "unknown"],
                )?,
                "sensitivity" => {
                    choice(name, value, &["normal", "personal", "private", "confidential"])?
                }
                "importance" => choice(name, value, &["low", "normal", "high"])?,
                "categories" => categories(value)?,
                "reminderMinutesBeforeStart" => match value.as_u64() {
                    Some(minutes) if minutes <= 40_320 => Value::from(minutes),
                    _ => {
                        return Err(ApiError::field(
                            "invalid_field",
                            name,
                            "`reminderMinutesBeforeStart` must be a whole number of minutes from 0 to 40320 (4 weeks)",
                        ))
                    }
                },
                _ => value,
            };
            event.insert(name.to_string(), checked);
        }
        if let Some(unknown) = members.keys().next() {
            let properties = PROPERTIES
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let allowed = match op {
                WriteOp::Create => format!("`external_id` and the event properties {properties}"),
                _ => format!("the event properties {properties}"),
            };
            return Err(unknown_field(unknown, &allowed));
        }
        match op {
            WriteOp::Create => {
                for name in ["start", "end"] {
                    if !event.contains_key(name) {
                        return Err(ApiError::field(
                            "missing_field",
                            name,
                            format!("`{name}` is required to create an appointment"),
                        ));
                    }
                }
            }
            _ if event.is_empty() => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "empty_update",
                    "the body changes nothing: give at least one event property",
                ))
            }
            _ => {}
        }
        if let (Some(start), Some(end)) = (event.get("start"), event.get("end")) {
            if start["timeZone"] == end["timeZone"] {
                let at = |v: &Value| v["dateTime"].as_str().and_then(|t| parse_local(t).ok());
                if let (Some(start), Some(end)) = (at(start), at(end)) {
                    if end <= start {
                        return Err(ApiError::field(
                            "invalid_field",
                            "end",
                            "`end` must be after `start`",
                        ));
                    }
                }
            }
        }
        Ok(Value::Object(event))
    }
}

fn text(name: &str, value: Value, max: usize) -> Result<Value, ApiError> {
    match value {
        Value::String(s) if s.chars().count() <= max => Ok(Value::String(s)),
        _ => Err(ApiError::field(
            "invalid_field",
            name,
            format!("`{name}` must be a string of at most {max} characters"),
        )),
    }
}

fn boolean(name: &str, value: Value) -> Result<Value, ApiError> {
    match value {
        Value::Bool(_) => Ok(value),
        _ => Err(ApiError::field(
            "invalid_field",
            name,
            format!("`{name}` must be true or false"),
        )),
    }
}

fn choice(name: &str, value: Value, allowed: &[&str]) -> Result<Value, ApiError> {
    match value.as_str() {
        Some(s) if allowed.contains(&s) => Ok(value),
        _ => Err(ApiError::field(
            "invalid_field",
            name,
            format!("`{name}` must be one of {}", allowed.join(", ")),
        )),
    }
}

/// Members of a nested object, each at most once and each one of `allowed`.
fn object(name: &str, value: Value, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(members) = value else {
        return Err(ApiError::field(
            "invalid_field",
            name,
            format!("`{name}` must be an object"),
        ));
    };
    if let Some(unknown) = members.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::field(
            "unknown_field",
            &format!("{name}.{}", truncate(unknown, 64)),
            format!(
                "unknown field `{name}.{}`; `{name}` takes {}",
                truncate(unknown, 64),
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(members)
}

fn item_body(value: Value) -> Result<Value, ApiError> {
    let mut members = object("body", value, &["contentType", "content"])?;
    let content_type = members
        .remove("contentType")
        .unwrap_or_else(|| Value::from("text"));
    let content_type = choice("body.contentType", content_type, &["text", "html"])?;
    let content = text(
        "body.content",
        members.remove("content").unwrap_or_else(|| Value::from("")),
        64 * 1024,
    )?;
    Ok(serde_json::json!({ "contentType": content_type, "content": content }))
}

fn parse_local(text: &str) -> Result<NaiveDateTime, chrono::ParseError> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
}

/// Graph's `dateTimeTimeZone`: a local date-time without offset and the zone it is in.
fn date_time(name: &str, value: Value) -> Result<Value, ApiError> {
    let mut members = object(name, value, &["dateTime", "timeZone"])?;
    let date_time = match members.remove("dateTime") {
        Some(Value::String(t)) if parse_local(&t).is_ok() => t,
        _ => {
            return Err(ApiError::field(
                "invalid_field",
                &format!("{name}.dateTime"),
                format!("`{name}.dateTime` must be a local date and time like 2026-12-03T14:30:00, without an offset (the zone goes in `{name}.timeZone`)"),
            ))
        }
    };
    let zone = match members.remove("timeZone") {
        None | Some(Value::Null) => "UTC".to_string(),
        Some(Value::String(z))
            if !z.trim().is_empty() && z.len() <= 100 && !z.chars().any(char::is_control) =>
        {
            z
        }
        _ => {
            return Err(ApiError::field(
                "invalid_field",
                &format!("{name}.timeZone"),
                format!("`{name}.timeZone` must be a time zone name such as UTC or Europe/Berlin"),
            ))
        }
    };
    Ok(serde_json::json!({ "dateTime": date_time, "timeZone": zone }))
}

fn location(value: Value) -> Result<Value, ApiError> {
    let mut members = object("location", value, &["displayName"])?;
    let name = text(
        "location.displayName",
        members
            .remove("displayName")
            .unwrap_or_else(|| Value::from("")),
        MAX_TEXT_LEN,
    )?;
    Ok(serde_json::json!({ "displayName": name }))
}

fn categories(value: Value) -> Result<Value, ApiError> {
    let invalid = || {
        ApiError::field(
            "invalid_field",
            "categories",
            format!("`categories` must be a list of at most {MAX_CATEGORIES} strings of at most {MAX_TEXT_LEN} characters"),
        )
    };
    let Value::Array(items) = value else {
        return Err(invalid());
    };
    if items.len() > MAX_CATEGORIES
        || !items.iter().all(|c| {
            c.as_str()
                .is_some_and(|s| s.chars().count() <= MAX_TEXT_LEN)
        })
    {
        return Err(invalid());
    }
    Ok(Value::Array(items))
}

fn attendees(value: Value) -> Result<Value, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::field(
            "invalid_field",
            "attendees",
            format!("`attendees` must be a list of at most {MAX_ATTENDEES} attendees"),
        ));
    };
    if items.len() > MAX_ATTENDEES {
        return Err(ApiError::field(
            "invalid_field",
            "attendees",
            format!("`attendees` may list at most {MAX_ATTENDEES} attendees"),
        ));
    }
    let mut checked = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("attendees[{i}]");
        let mut members = object(&at, item, &["emailAddress", "type"])?;
        let mut email = object(
            &format!("{at}.emailAddress"),
            members.remove("emailAddress").unwrap_or(Value::Null),
            &["address", "name"],
        )?;
        let address = match email.remove("address") {
            Some(Value::String(a))
                if a.len() <= 320
                    && a.split_once('@')
                        .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
                    && !a.chars().any(char::is_whitespace) =>
            {
                a
            }
            _ => {
                return Err(ApiError::field(
                    "invalid_field",
                    &format!("{at}.emailAddress.address"),
                    format!("`{at}.emailAddress.address` must be an email address"),
                ))
            }
        };
        let mut out = Map::new();
        out.insert("address".into(), Value::String(address));
        if let Some(name) = email.remove("name") {
            out.insert(
                "name".into(),
                text(&format!("{at}.emailAddress.name"), name, MAX_TEXT_LEN)?,
            );
        }
        let kind = choice(
            &format!("{at}.type"),
            members
                .remove("type")
                .unwrap_or_else(|| Value::from("required")),
            &["required", "optional", "resource"],
        )?;
        checked.push(serde_json::json!({ "emailAddress": out, "type": kind }));
    }
    Ok(Value::Array(checked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value, op: WriteOp) -> Result<Value, ApiError> {
        let Value::Object(members) = json else {
            panic!("a test body is an object")
        };
        Appointment::parse(members, op)
    }

    #[test]
    fn a_create_needs_start_and_end_and_end_after_start() {
        let error = parse(serde_json::json!({"subject": "x"}), WriteOp::Create).unwrap_err();
        assert_eq!(error.field_name(), Some("start"));
        let error = parse(
            serde_json::json!({
                "start": {"dateTime": "2026-12-03T10:00:00", "timeZone": "UTC"},
                "end": {"dateTime": "2026-12-03T09:00:00", "timeZone": "UTC"},
            }),
            WriteOp::Create,
        )
        .unwrap_err();
        assert_eq!(error.field_name(), Some("end"));
        let ok = parse(
            serde_json::json!({
                "subject": "Advising",
                "start": {"dateTime": "2026-12-03T09:00:00"},
                "end": {"dateTime": "2026-12-03T09:30:00", "timeZone": "UTC"},
                "attendees": [{"emailAddress": {"address": "student@contoso.com"}}],
            }),
            WriteOp::Create,
        )
        .expect("a valid appointment");
        assert_eq!(ok["start"]["timeZone"], "UTC");
        assert_eq!(ok["attendees"][0]["type"], "required");
    }

    #[test]
    fn errors_name_the_property_at_fault() {
        for (body, field) in [
            (serde_json::json!({"subjet": "typo"}), "subjet"),
            (serde_json::json!({"transactionId": "x"}), "transactionId"),
            (serde_json::json!({"showAs": "away"}), "showAs"),
            (
                serde_json::json!({"start": {"dateTime": "tomorrow"}}),
                "start.dateTime",
            ),
            (
                serde_json::json!({"attendees": [{"emailAddress": {"address": "nobody"}}]}),
                "attendees[0].emailAddress.address",
            ),
            (
                serde_json::json!({"location": {"room": "2"}}),
                "location.room",
            ),
        ] {
            let error = parse(body.clone(), WriteOp::Update).unwrap_err();
            assert_eq!(error.field_name(), Some(field), "{body}");
        }
        let error = parse(serde_json::json!({}), WriteOp::Update).unwrap_err();
        assert_eq!(error.code(), "empty_update");
    }
}
