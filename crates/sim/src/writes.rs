//! Writing events as Graph does: create (with `transactionId` deduplication), update (with
//! `If-Match`), delete and cancel. Every write lands in the mailbox's change log, so delta,
//! ground truth and change notifications see it like any other change.

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::calendar::{
    parse_graph_datetime, Attendee, Created, EventPatch, MutationKind, Rejected,
};
use super::reply::{graph_error, Reply, RequestIds, GRAPH_JSON};
use super::state::{lock, MailboxEntry, Shared};
use super::stats::WriteCount;
use super::subscriptions::notify_changes;

/// A write the Graph pipeline has let through (token, limits and faults checked).
pub enum Write<'a> {
    Create { body: &'a [u8] },
    Update { id: &'a str, body: &'a [u8] },
    Delete { id: &'a str },
    Cancel { id: &'a str, body: &'a [u8] },
}

impl Write<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Update { .. } => "update",
            Self::Delete { .. } => "delete",
            Self::Cancel { .. } => "cancel",
        }
    }
}

const SHOW_AS: &[&str] = &[
    "free",
    "tentative",
    "busy",
    "oof",
    "workingElsewhere",
    "unknown",
];
const SENSITIVITY: &[&str] = &["normal", "personal", "private", "confidential"];
const ATTENDEE_TYPES: &[&str] = &["required", "optional", "resource"];

/// Applies `write` to `entry`'s calendar and answers as Graph does.
pub fn apply(
    sim: &Shared,
    entry: &MailboxEntry,
    write: Write<'_>,
    headers: &HeaderMap,
    ids: &RequestIds,
) -> Reply {
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let context = format!(
        "http://{host}/v1.0/$metadata#users('{}')/events/$entity",
        entry.address
    );
    let event_reply = |status: u16, mut event: Value| {
        if let Some(object) = event.as_object_mut() {
            object.insert("@odata.context".into(), context.clone().into());
        }
        Reply::json(status, GRAPH_JSON, &event)
    };
    let now = sim.now();
    let result = match write {
        Write::Create { body } => parse_event(body).and_then(|(patch, tid)| {
            let refuse = sim
                .refuse_transaction_retries
                .load(std::sync::atomic::Ordering::Relaxed);
            let created = lock(&entry.state)
                .calendar
                .create(patch, tid, refuse, now)?;
            Ok(match created {
                Created::New { event, duplicate } => {
                    count(sim, entry, WriteCount::Create { duplicate });
                    changed(sim, entry, MutationKind::Create, &event);
                    event_reply(201, event)
                }
                Created::Existing(event) => {
                    count(sim, entry, WriteCount::Deduplicated);
                    event_reply(201, event)
                }
            })
        }),
        Write::Update { id, body } => parse_event(body).and_then(|(patch, _)| {
            // transactionId cannot be changed after creation; Graph ignores it on PATCH.
            let if_match = headers.get("if-match").and_then(|v| v.to_str().ok());
            let updated = lock(&entry.state).calendar.update(id, patch, if_match, now);
            match updated {
                Ok(event) => {
                    count(sim, entry, WriteCount::Update);
                    changed(sim, entry, MutationKind::Update, &event);
                    Ok(event_reply(200, event))
                }
                Err(e) if e.is_precondition_failed() => {
                    count(sim, entry, WriteCount::PreconditionFailed);
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }),
        Write::Delete { id } => {
            if lock(&entry.state).calendar.delete(id) {
                count(sim, entry, WriteCount::Delete);
                notify_changes(sim, entry, &[(MutationKind::Delete, id.to_string())]);
                Ok(Reply::empty(204))
            } else {
                Err(Rejected::new(
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                ))
            }
        }
        Write::Cancel { id, body } => parse_object(body, true).and_then(|_| {
            lock(&entry.state).calendar.cancel(id)?;
            count(sim, entry, WriteCount::Cancel);
            notify_changes(sim, entry, &[(MutationKind::Delete, id.to_string())]);
            Ok(Reply::empty(202))
        }),
    };
    result.unwrap_or_else(|e| {
        let reply = graph_error(e.status, e.code, &e.message, ids);
        match &e.existing_event_id {
            Some(id) => {
                if e.code == "ErrorDuplicateTransactionId" {
                    count(sim, entry, WriteCount::DuplicateTransaction);
                }
                reply.with_error_member("@event.existingEventId", id)
            }
            None => reply,
        }
    })
}

/// The mailbox owner changes an event in Outlook: no token, limits, faults or write counts.
pub fn outlook_edit(
    sim: &Shared,
    entry: &MailboxEntry,
    id: &str,
    body: &[u8],
) -> Result<Value, Rejected> {
    let (patch, _) = parse_event(body)?;
    let event = lock(&entry.state)
        .calendar
        .update(id, patch, None, sim.now())?;
    changed(sim, entry, MutationKind::Update, &event);
    Ok(event)
}

/// The mailbox owner deletes an event in Outlook.
pub fn outlook_delete(sim: &Shared, entry: &MailboxEntry, id: &str) -> bool {
    let deleted = lock(&entry.state).calendar.delete(id);
    if deleted {
        notify_changes(sim, entry, &[(MutationKind::Delete, id.to_string())]);
    }
    deleted
}

fn count(sim: &Shared, entry: &MailboxEntry, what: WriteCount) {
    lock(&sim.stats).write(&entry.address, what);
}

fn changed(sim: &Shared, entry: &MailboxEntry, kind: MutationKind, event: &Value) {
    if let Some(id) = event["id"].as_str() {
        notify_changes(sim, entry, &[(kind, id.to_string())]);
    }
}

fn bad_json() -> Rejected {
    Rejected::new(
        400,
        "BadRequest",
        "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.",
    )
}

fn invalid(message: String) -> Rejected {
    Rejected::new(400, "ErrorInvalidRequest", message)
}

/// The request body as a JSON object; an empty body is an empty object when `empty_ok`.
fn parse_object(body: &[u8], empty_ok: bool) -> Result<Map<String, Value>, Rejected> {
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(bad_json()),
    }
}

/// A Graph event body (POST or PATCH) as the properties it sets, and its `transactionId`.
/// Unknown properties are ignored; a property sent as `null` is treated as absent.
pub fn parse_event(body: &[u8]) -> Result<(EventPatch, Option<String>), Rejected> {
    let object = parse_object(body, false)?;
    let get = |name: &str| object.get(name).filter(|v| !v.is_null());
    let string = |name: &str| -> Result<Option<String>, Rejected> {
        match get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(format!("The property '{name}' must be a string."))),
        }
    };
    let choice = |name: &str, allowed: &[&'static str], odata_type: &str| {
        string(name)?
            .map(|v| {
                allowed
                    .iter()
                    .find(|a| a.eq_ignore_ascii_case(&v))
                    .copied()
                    .ok_or_else(|| {
                        Rejected::new(
                            400,
                            "BadRequest",
                            format!("Cannot convert the literal '{v}' to the expected type '{odata_type}'."),
                        )
                    })
            })
            .transpose()
    };
    if get("recurrence").is_some() {
        return Err(invalid(
            "The simulator does not create or change recurring series: send 'recurrence' as null or leave it out.".into(),
        ));
    }
    let patch = EventPatch {
        subject: string("subject")?,
        body: get("body").map(parse_item_body).transpose()?,
        start: get("start").map(|v| parse_time(v, "start")).transpose()?,
        end: get("end").map(|v| parse_time(v, "end")).transpose()?,
        location: get("location")
            .map(|v| match v.get("displayName") {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(invalid(
                    "The property 'location.displayName' must be a string.".into(),
                )),
            })
            .transpose()?,
        attendees: get("attendees").map(parse_attendees).transpose()?,
        is_all_day: get("isAllDay")
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| invalid("The property 'isAllDay' must be a boolean.".into()))
            })
            .transpose()?,
        show_as: choice("showAs", SHOW_AS, "microsoft.graph.freeBusyStatus")?,
        sensitivity: choice("sensitivity", SENSITIVITY, "microsoft.graph.sensitivity")?,
        categories: get("categories")
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|c| c.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        invalid("The property 'categories' must be an array of strings.".into())
                    })
            })
            .transpose()?,
    };
    Ok((patch, string("transactionId")?))
}

fn parse_item_body(v: &Value) -> Result<(&'static str, String), Rejected> {
    let content_type = match v.get("contentType").and_then(Value::as_str) {
        None => "text",
        Some(t) if t.eq_ignore_ascii_case("text") => "text",
        Some(t) if t.eq_ignore_ascii_case("html") => "html",
        Some(t) => {
            return Err(Rejected::new(
                400,
                "BadRequest",
                format!(
                "Cannot convert the literal '{t}' to the expected type 'microsoft.graph.bodyType'."
            ),
            ))
        }
    };
    let content = v.get("content").and_then(Value::as_str).unwrap_or_default();
    Ok((content_type, content.to_string()))
}

/// A `dateTimeTimeZone`. The simulator keeps every time in UTC, so a zone other than UTC is
/// read as if it were UTC.
fn parse_time(v: &Value, property: &str) -> Result<chrono::DateTime<chrono::Utc>, Rejected> {
    let Some(raw) = v.get("dateTime").and_then(Value::as_str) else {
        return Err(invalid(format!(
            "Your request can't be completed. The property '{property}.dateTime' is required."
        )));
    };
    parse_graph_datetime(raw).ok_or_else(|| {
        invalid(format!(
            "Your request can't be completed. The value '{raw}' of '{property}.dateTime' is not a valid date and time."
        ))
    })
}

fn parse_attendees(v: &Value) -> Result<Vec<Attendee>, Rejected> {
    let bad = || {
        invalid(
            "The property 'attendees' must be an array of attendees with an emailAddress.address."
                .into(),
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|a| {
            let email = a.get("emailAddress").ok_or_else(bad)?;
            let address = email
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            let name = email
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(address);
            let kind = match a.get("type").and_then(Value::as_str) {
                None => "required",
                Some(t) => ATTENDEE_TYPES
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(t))
                    .copied()
                    .ok_or_else(|| {
                        Rejected::new(
                            400,
                            "BadRequest",
                            format!("Cannot convert the literal '{t}' to the expected type 'microsoft.graph.attendeeType'."),
                        )
                    })?,
            };
            Ok(Attendee {
                name: name.to_string(),
                address: address.to_string(),
                kind,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_body_becomes_a_patch() {
        let body = br#"{"subject":"Plan","body":{"contentType":"HTML","content":"<b>hi</b>"},
            "start":{"dateTime":"2026-12-09T20:30:00.0000000","timeZone":"UTC"},
            "end":{"dateTime":"2026-12-09T21:00:00","timeZone":"UTC"},
            "location":{"displayName":"Room 1"},"showAs":"tentative","isAllDay":false,
            "attendees":[{"emailAddress":{"address":"a@x.example","name":"A"},"type":"optional"}],
            "categories":["Blue category"],"transactionId":"t-1","someNewField":1,"recurrence":null}"#;
        let (patch, tid) = parse_event(body).expect("valid");
        assert_eq!(tid.as_deref(), Some("t-1"));
        assert_eq!(patch.subject.as_deref(), Some("Plan"));
        assert_eq!(patch.body, Some(("html", "<b>hi</b>".to_string())));
        assert_eq!(patch.show_as, Some("tentative"));
        assert_eq!(patch.attendees.expect("attendees")[0].kind, "optional");
        let start = patch.start.expect("start");
        assert_eq!(start.to_rfc3339(), "2026-12-09T20:30:00+00:00");
        let partial = parse_event(br#"{"subject":"only this"}"#).expect("valid").0;
        assert_eq!(partial.start, None);
        assert_eq!(partial.location, None);
    }

    #[test]
    fn bad_bodies_are_graph_errors() {
        let code = |b: &[u8]| parse_event(b).map(|_| ()).unwrap_err().code;
        assert_eq!(code(b"not json"), "BadRequest");
        assert_eq!(code(br#"{"showAs":"sleeping"}"#), "BadRequest");
        assert_eq!(
            code(br#"{"start":{"timeZone":"UTC"}}"#),
            "ErrorInvalidRequest"
        );
        assert_eq!(
            code(br#"{"end":{"dateTime":"soon"}}"#),
            "ErrorInvalidRequest"
        );
        assert_eq!(
            code(br#"{"recurrence":{"pattern":{}}}"#),
            "ErrorInvalidRequest"
        );
    }
}
