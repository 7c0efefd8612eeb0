//! Graph `calendarView/delta` payloads, parsed strictly where calsync depends on a field and
//! leniently everywhere else (Graph adds fields over time; unknown ones are ignored).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Deserialize;

/// One page of a delta round.
#[derive(Debug)]
pub struct DeltaPage {
    pub items: Vec<DeltaItem>,
    pub link: PageLink,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageLink {
    /// More pages follow in this round.
    Next(String),
    /// The round is complete; replay this link for the next round.
    Delta(String),
}

#[derive(Debug)]
pub enum DeltaItem {
    Upsert(Box<Event>),
    Removed { id: String },
}

impl DeltaItem {
    pub fn id(&self) -> &str {
        match self {
            Self::Upsert(e) => &e.id,
            Self::Removed { id } => id,
        }
    }
}

/// An event as stored: times normalised to UTC, all-day events also as dates.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub ical_uid: Option<String>,
    pub change_key: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<DateTime<Utc>>,
    pub subject: Option<String>,
    pub start_utc: DateTime<Utc>,
    pub end_utc: DateTime<Utc>,
    /// For all-day events: the first day and the day after the last (exclusive), as Graph sends.
    pub start_date: Option<NaiveDate>,
    pub end_date: Option<NaiveDate>,
    pub is_all_day: bool,
    pub is_cancelled: bool,
    pub show_as: Option<String>,
    pub sensitivity: Option<String>,
    pub event_type: Option<String>,
    pub series_master_id: Option<String>,
    pub organizer_name: Option<String>,
    pub organizer_address: Option<String>,
    /// `[{"name","address","type","response"}]`
    pub attendees: serde_json::Value,
    pub location: Option<String>,
    pub web_link: Option<String>,
    /// The item exactly as Graph sent it.
    pub raw: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PayloadError(pub String);

#[derive(Deserialize)]
struct RawPage<'a> {
    /// Items stay raw JSON text until parsed one by one: each is stored exactly as sent, with
    /// no parse-to-tree and re-serialisation.
    #[serde(borrow)]
    value: Vec<&'a serde_json::value::RawValue>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent {
    id: Option<String>,
    #[serde(rename = "@removed")]
    removed: Option<serde::de::IgnoredAny>,
    #[serde(rename = "iCalUId")]
    ical_uid: Option<String>,
    change_key: Option<String>,
    #[serde(rename = "@odata.etag")]
    etag: Option<String>,
    last_modified_date_time: Option<String>,
    subject: Option<String>,
    start: Option<RawDateTime>,
    end: Option<RawDateTime>,
    #[serde(default)]
    is_all_day: Option<bool>,
    #[serde(default)]
    is_cancelled: Option<bool>,
    show_as: Option<String>,
    sensitivity: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    series_master_id: Option<String>,
    organizer: Option<RawRecipient>,
    #[serde(default)]
    attendees: Option<Vec<RawAttendee>>,
    location: Option<RawLocation>,
    web_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDateTime {
    date_time: String,
    time_zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRecipient {
    email_address: Option<RawEmail>,
}

#[derive(Deserialize)]
struct RawEmail {
    name: Option<String>,
    address: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAttendee {
    email_address: Option<RawEmail>,
    #[serde(rename = "type")]
    kind: Option<String>,
    status: Option<RawResponse>,
}

#[derive(Deserialize)]
struct RawResponse {
    response: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLocation {
    display_name: Option<String>,
}

/// Parses a page body. Any item calsync cannot store faithfully fails the whole page, so a page
/// is applied completely or not at all.
pub fn parse_page(body: &[u8]) -> Result<DeltaPage, PayloadError> {
    let raw: RawPage = serde_json::from_slice(body)
        .map_err(|e| PayloadError(format!("delta page is not the expected JSON: {e}")))?;
    let link = match (raw.next_link, raw.delta_link) {
        (Some(next), _) => PageLink::Next(next),
        (None, Some(delta)) => PageLink::Delta(delta),
        (None, None) => {
            return Err(PayloadError(
                "delta page has neither @odata.nextLink nor @odata.deltaLink".into(),
            ))
        }
    };
    let items = raw
        .value
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            parse_item(item.get()).map_err(|e| PayloadError(format!("value[{index}]: {}", e.0)))
        })
        .collect::<Result<_, _>>()?;
    Ok(DeltaPage { items, link })
}

/// Parses one event as Graph represents it (e.g. a simulator's ground truth) the way a page
/// item is parsed, so both sides of a comparison are normalised alike.
pub fn parse_event(item: serde_json::Value) -> Result<Event, PayloadError> {
    match parse_item(&item.to_string())? {
        DeltaItem::Upsert(event) => Ok(*event),
        DeltaItem::Removed { id } => Err(PayloadError(format!(
            "item {id} is a removal, not an event"
        ))),
    }
}

fn parse_item(text: &str) -> Result<DeltaItem, PayloadError> {
    // One pass over the item; a removal has only `id` and `@removed` of these fields.
    let raw: RawEvent = serde_json::from_str(text).map_err(|e| {
        let id = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string));
        match id {
            Some(id) => PayloadError(format!("event {id}: {e}")),
            None => PayloadError(format!("item is not an event object: {e}")),
        }
    })?;
    let id = raw
        .id
        .clone()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| PayloadError("item has no `id`".into()))?;
    if raw.removed.is_some() {
        return Ok(DeltaItem::Removed { id });
    }
    let raw_text = text.to_string();
    let is_all_day = raw.is_all_day.unwrap_or(false);
    let start = raw
        .start
        .ok_or_else(|| PayloadError(format!("event {id}: missing `start`")))?;
    let end = raw
        .end
        .ok_or_else(|| PayloadError(format!("event {id}: missing `end`")))?;
    let (start_utc, start_date) = event_time(&id, "start", &start, is_all_day)?;
    let (end_utc, end_date) = event_time(&id, "end", &end, is_all_day)?;
    if end_utc < start_utc {
        return Err(PayloadError(format!("event {id}: `end` is before `start`")));
    }
    let last_modified = raw
        .last_modified_date_time
        .as_deref()
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|e| PayloadError(format!("event {id}: lastModifiedDateTime `{t}`: {e}")))
        })
        .transpose()?;
    let (organizer_name, organizer_address) = raw
        .organizer
        .and_then(|o| o.email_address)
        .map(|e| (e.name, e.address))
        .unwrap_or((None, None));
    let attendees = raw
        .attendees
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            let (name, address) = a
                .email_address
                .map(|e| (e.name, e.address))
                .unwrap_or((None, None));
            serde_json::json!({
                "name": name,
                "address": address,
                "type": a.kind,
                "response": a.status.and_then(|s| s.response),
            })
        })
        .collect();
    Ok(DeltaItem::Upsert(Box::new(Event {
        id,
        ical_uid: raw.ical_uid,
        change_key: raw.change_key,
        etag: raw.etag,
        last_modified,
        subject: raw.subject,
        start_utc,
        end_utc,
        start_date,
        end_date,
        is_all_day,
        is_cancelled: raw.is_cancelled.unwrap_or(false),
        show_as: raw.show_as,
        sensitivity: raw.sensitivity,
        event_type: raw.event_type,
        series_master_id: raw.series_master_id,
        organizer_name,
        organizer_address,
        attendees: serde_json::Value::Array(attendees),
        location: raw
            .location
            .and_then(|l| l.display_name)
            .filter(|l| !l.is_empty()),
        web_link: raw.web_link,
        raw: raw_text,
    })))
}

/// Zone names meaning UTC. calsync asks for UTC (`Prefer: outlook.timezone="UTC"`, also Graph's
/// default), so any other zone on a timed event is a payload it must not guess about.
const UTC_NAMES: [&str; 5] = [
    "UTC",
    "Etc/UTC",
    "tzone://Microsoft/Utc",
    "Coordinated Universal Time",
    "Etc/GMT",
];

fn event_time(
    id: &str,
    field: &str,
    value: &RawDateTime,
    all_day: bool,
) -> Result<(DateTime<Utc>, Option<NaiveDate>), PayloadError> {
    let text = value.date_time.trim();
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| DateTime::parse_from_rfc3339(text).map(|d| d.naive_utc()))
        .map_err(|_| {
            PayloadError(format!(
                "event {id}: `{field}.dateTime` `{text}` is not an ISO 8601 date-time"
            ))
        })?;
    if all_day {
        // All-day events are dates in whatever zone the event was made in; keep the date.
        let date = naive.date();
        return Ok((date.and_time(chrono::NaiveTime::MIN).and_utc(), Some(date)));
    }
    let zone = value.time_zone.as_deref().unwrap_or("UTC");
    if !UTC_NAMES.iter().any(|u| u.eq_ignore_ascii_case(zone)) {
        return Err(PayloadError(format!(
            "event {id}: `{field}.timeZone` is `{zone}`, expected UTC (calsync sends Prefer: outlook.timezone=\"UTC\")"
        )));
    }
    Ok((naive.and_utc(), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_without_any_link_is_rejected() {
        let err = parse_page(br#"{"value":[]}"#).unwrap_err();
        assert!(err.0.contains("neither"));
    }

    #[test]
    fn bad_time_names_the_event_and_field() {
        let body = br#"{"value":[{"id":"E1","start":{"dateTime":"soon","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T00:00:00","timeZone":"UTC"}}],"@odata.deltaLink":"x"}"#;
        let err = parse_page(body).unwrap_err();
        assert!(
            err.0.contains("event E1") && err.0.contains("start.dateTime"),
            "{}",
            err.0
        );
    }

    #[test]
    fn non_utc_timed_event_is_rejected_but_all_day_keeps_its_date() {
        let timed = br#"{"value":[{"id":"E2","start":{"dateTime":"2026-01-01T09:00:00.0000000","timeZone":"Pacific Standard Time"},"end":{"dateTime":"2026-01-01T10:00:00.0000000","timeZone":"Pacific Standard Time"}}],"@odata.deltaLink":"x"}"#;
        assert!(parse_page(timed)
            .unwrap_err()
            .0
            .contains("Pacific Standard Time"));
        let all_day = br#"{"value":[{"id":"E3","isAllDay":true,"start":{"dateTime":"2026-01-01T00:00:00.0000000","timeZone":"Pacific Standard Time"},"end":{"dateTime":"2026-01-02T00:00:00.0000000","timeZone":"Pacific Standard Time"}}],"@odata.deltaLink":"x"}"#;
        let page = parse_page(all_day).expect("all-day parses");
        let DeltaItem::Upsert(event) = &page.items[0] else {
            panic!("expected an event")
        };
        assert_eq!(event.start_date, NaiveDate::from_ymd_opt(2026, 1, 1));
        assert_eq!(event.end_date, NaiveDate::from_ymd_opt(2026, 1, 2));
    }
}
