//! Graph `calendarView/delta` payloads, parsed strictly where calsync depends on a field and
//! leniently everywhere else (Graph adds fields over time; unknown ones are ignored).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Deserialize;
use std::borrow::Cow;

/// One page of a delta round, as Graph sent it.
#[derive(Debug)]
pub struct DeltaPage {
    pub items: Vec<PageItem>,
    /// Items calsync cannot understand: quarantined, while the rest of the page is applied.
    pub rejected: Vec<RejectedItem>,
    pub link: PageLink,
}

/// An item that could not be understood, kept as Graph sent it with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedItem {
    /// Its Graph id, when it has one.
    pub id: Option<String>,
    pub raw: String,
    pub reason: String,
}

impl RejectedItem {
    /// A stable key for the item: its id, or a digest of what Graph sent when it has none.
    pub fn key(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => {
                let digest = ring::digest::digest(&ring::digest::SHA256, self.raw.as_bytes());
                format!("sha256:{}", crate::hex(&digest.as_ref()[..16]))
            }
        }
    }
}

/// An item of a delta page. Graph sends occurrences of a recurring series as stubs and the
/// series master as an event of its own: neither is a calendar entry as it stands.
#[derive(Debug)]
pub enum PageItem {
    /// A single event, an exception, or an occurrence Graph sent in full: stored as it is.
    Event(Box<Event>),
    /// An occurrence as calendarView delta sends it (id, seriesMasterId, start, end): stored
    /// once filled in from its series master.
    Occurrence(Box<OccurrenceStub>),
    /// A series master (`type: seriesMaster`), dated at its first occurrence: kept apart, never
    /// stored as a calendar entry.
    Master(Box<Event>),
    Removed {
        id: String,
    },
}

impl PageItem {
    pub fn id(&self) -> &str {
        match self {
            Self::Event(e) | Self::Master(e) => &e.id,
            Self::Occurrence(o) => &o.id,
            Self::Removed { id } => id,
        }
    }
}

/// An occurrence stub: what Graph's calendarView delta sends for an occurrence of a series.
/// Its times are kept as sent until the master says whether the series is all-day.
#[derive(Clone, Debug, PartialEq)]
pub struct OccurrenceStub {
    pub id: String,
    pub series_master_id: String,
    pub etag: Option<String>,
    start: GraphDateTime,
    end: GraphDateTime,
    /// The item exactly as Graph sent it.
    pub raw: String,
}

/// A `dateTimeTimeZone` as Graph sent it, checked to be a date-time.
#[derive(Clone, Debug, PartialEq)]
struct GraphDateTime {
    date_time: NaiveDateTime,
    time_zone: Option<String>,
}

impl OccurrenceStub {
    /// The occurrence as the user sees it: what the series master says, at the occurrence's own
    /// time. `iCalUId` is left out: Graph gives each occurrence its own, which the stub lacks.
    pub fn hydrate(&self, master: &Event) -> Result<Event, PayloadError> {
        let all_day = master.is_all_day;
        let (start_utc, start_date) = event_time(&self.id, "start", &self.start, all_day)?;
        let (end_utc, end_date) = event_time(&self.id, "end", &self.end, all_day)?;
        if end_utc < start_utc {
            return Err(PayloadError(format!(
                "event {}: `end` is before `start`",
                self.id
            )));
        }
        Ok(Event {
            id: self.id.clone(),
            ical_uid: None,
            change_key: master.change_key.clone(),
            etag: self.etag.clone(),
            last_modified: master.last_modified,
            subject: master.subject.clone(),
            start_utc,
            end_utc,
            start_date,
            end_date,
            is_all_day: all_day,
            is_cancelled: master.is_cancelled,
            show_as: master.show_as.clone(),
            sensitivity: master.sensitivity.clone(),
            event_type: Some(OCCURRENCE.to_string()),
            series_master_id: Some(self.series_master_id.clone()),
            organizer_name: master.organizer_name.clone(),
            organizer_address: master.organizer_address.clone(),
            attendees: master.attendees.clone(),
            location: master.location.clone(),
            categories: master.categories.clone(),
            web_link: master.web_link.clone(),
            raw: self.raw.clone(),
        })
    }
}

/// `type` values of recurring items.
pub const OCCURRENCE: &str = "occurrence";
pub const SERIES_MASTER: &str = "seriesMaster";

/// The properties a series master is fetched with (`GET /users/{id}/events/{id}?$select=`):
/// those an occurrence takes from it.
pub const MASTER_SELECT: &str = "subject,isAllDay,isCancelled,showAs,sensitivity,organizer,\
attendees,location,categories,changeKey,lastModifiedDateTime,webLink,type,start,end";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageLink {
    /// More pages follow in this round.
    Next(String),
    /// The round is complete; replay this link for the next round.
    Delta(String),
}

/// A change the store applies: an event to upsert (complete) or an id to delete.
#[derive(Clone, Debug)]
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
    pub attendees: Attendees,
    pub location: Option<String>,
    pub categories: Vec<String>,
    pub web_link: Option<String>,
    /// The item exactly as Graph sent it.
    pub raw: String,
}

/// An event's attendees as JSON text in one canonical form,
/// `[{"address":..,"name":..,"response":..,"type":..}]` (keys sorted, no spaces: what
/// `serde_json::Value` writes), so equal attendees are equal text. Kept as text because that is
/// what the store writes and the sync path never looks inside: no tree built per event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attendees(String);

impl Default for Attendees {
    fn default() -> Self {
        Self("[]".into())
    }
}

impl Attendees {
    /// The canonical form of any JSON value (what a store or a test holds).
    pub fn from_value(value: &serde_json::Value) -> Self {
        Self(value.to_string())
    }

    /// Reads stored text, checking it is JSON and making it canonical.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<serde_json::Value>(text).map(|v| Self::from_value(&v))
    }

    pub fn as_json(&self) -> &str {
        &self.0
    }

    pub fn into_json(self) -> String {
        self.0
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or_else(|_| serde_json::Value::Array(Vec::new()))
    }

    /// Graph's `attendees` as calsync keeps them: name, address, type and response.
    fn of_graph(attendees: &[RawAttendee<'_>]) -> Self {
        // Fields in key order: serialized, this is exactly `Value`'s canonical text.
        #[derive(serde::Serialize)]
        struct Kept<'a> {
            address: Option<&'a str>,
            name: Option<&'a str>,
            response: Option<&'a str>,
            #[serde(rename = "type")]
            kind: Option<&'a str>,
        }
        let kept: Vec<Kept<'_>> = attendees
            .iter()
            .map(|a| {
                let email = a.email_address.as_ref();
                Kept {
                    address: email.and_then(|e| e.address.as_deref()),
                    name: email.and_then(|e| e.name.as_deref()),
                    response: a.status.as_ref().and_then(|s| s.response.as_deref()),
                    kind: a.kind.as_deref(),
                }
            })
            .collect();
        Self(serde_json::to_string(&kept).unwrap_or_else(|_| "[]".into()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PayloadError(pub String);

/// An item as deserialized. The strings calsync only reads on the way to an [`Event`] (times,
/// attendees) are borrowed from the page body where they hold no escapes, not copied.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent<'a> {
    id: Option<String>,
    #[serde(rename = "@removed")]
    removed: Option<serde::de::IgnoredAny>,
    #[serde(rename = "iCalUId")]
    ical_uid: Option<String>,
    change_key: Option<String>,
    #[serde(rename = "@odata.etag")]
    etag: Option<String>,
    #[serde(borrow)]
    last_modified_date_time: Option<Cow<'a, str>>,
    subject: Option<String>,
    #[serde(borrow)]
    start: Option<RawDateTime<'a>>,
    #[serde(borrow)]
    end: Option<RawDateTime<'a>>,
    #[serde(default)]
    is_all_day: Option<bool>,
    #[serde(default)]
    is_cancelled: Option<bool>,
    show_as: Option<String>,
    sensitivity: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    series_master_id: Option<String>,
    #[serde(borrow)]
    organizer: Option<RawRecipient<'a>>,
    #[serde(default, borrow)]
    attendees: Option<Vec<RawAttendee<'a>>>,
    location: Option<RawLocation>,
    #[serde(default)]
    categories: Option<Vec<String>>,
    web_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDateTime<'a> {
    #[serde(borrow)]
    date_time: Cow<'a, str>,
    #[serde(borrow)]
    time_zone: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRecipient<'a> {
    #[serde(borrow)]
    email_address: Option<RawEmail<'a>>,
}

#[derive(Deserialize)]
struct RawEmail<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    address: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAttendee<'a> {
    #[serde(borrow)]
    email_address: Option<RawEmail<'a>>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    status: Option<RawResponse<'a>>,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(borrow)]
    response: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLocation {
    display_name: Option<String>,
}

/// Parses a page body. A body that is not a delta page fails as a whole (nothing of it is
/// applied); an item calsync cannot store faithfully is set aside as rejected, so one bad item
/// cannot stop its mailbox.
///
/// One pass over the body: each item of `value` is deserialized where it stands and its text
/// (kept as `raw`, exactly as sent) is the span the deserializer consumed. Only an item that is
/// not an event object is scanned a second time, to find where it ends.
pub fn parse_page(body: &[u8]) -> Result<DeltaPage, PayloadError> {
    let page_error = |e: &dyn std::fmt::Display| {
        PayloadError(format!("delta page is not the expected JSON: {e}"))
    };
    let text = std::str::from_utf8(body).map_err(|e| page_error(&e))?;
    let mut json = JsonCursor { text, pos: 0 };
    let mut items = None;
    let mut rejected = Vec::new();
    let (mut next_link, mut delta_link) = (None, None);
    json.expect(b'{').map_err(|e| page_error(&e))?;
    if !json.next_is(b'}') {
        loop {
            let key: std::borrow::Cow<'_, str> = json.value().map_err(|e| page_error(&e))?;
            json.expect(b':').map_err(|e| page_error(&e))?;
            let duplicate = match key.as_ref() {
                "value" => items
                    .replace(json.items(&mut rejected).map_err(|e| page_error(&e))?)
                    .is_some(),
                "@odata.nextLink" => next_link
                    .replace(json.value::<Option<String>>().map_err(|e| page_error(&e))?)
                    .is_some(),
                "@odata.deltaLink" => delta_link
                    .replace(json.value::<Option<String>>().map_err(|e| page_error(&e))?)
                    .is_some(),
                _ => {
                    json.value::<serde::de::IgnoredAny>()
                        .map_err(|e| page_error(&e))?;
                    false
                }
            };
            if duplicate {
                return Err(page_error(&format_args!("duplicate field `{key}`")));
            }
            if json.next_is(b',') {
                continue;
            }
            json.expect(b'}').map_err(|e| page_error(&e))?;
            break;
        }
    }
    json.end().map_err(|e| page_error(&e))?;
    let items = items.ok_or_else(|| page_error(&"missing field `value`"))?;
    let link = match (next_link.flatten(), delta_link.flatten()) {
        (Some(next), _) => PageLink::Next(next),
        (None, Some(delta)) => PageLink::Delta(delta),
        (None, None) => {
            return Err(PayloadError(
                "delta page has neither @odata.nextLink nor @odata.deltaLink".into(),
            ))
        }
    };
    Ok(DeltaPage {
        items,
        rejected,
        link,
    })
}

/// A position in a JSON text, for walking a delta page's outer object and its `value` array
/// while serde_json deserializes each member where it stands.
struct JsonCursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> JsonCursor<'a> {
    fn skip_whitespace(&mut self) {
        let rest = &self.text.as_bytes()[self.pos..];
        self.pos += rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
            .count();
    }

    /// Consumes `byte` (after whitespace) if it comes next.
    fn next_is(&mut self, byte: u8) -> bool {
        self.skip_whitespace();
        if self.text.as_bytes().get(self.pos) == Some(&byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.next_is(byte) {
            return Ok(());
        }
        Err(match self.text[self.pos..].chars().next() {
            Some(found) => format!(
                "expected `{}` at byte {}, found `{found}`",
                char::from(byte),
                self.pos
            ),
            None => format!("expected `{}`, found the end of the body", char::from(byte)),
        })
    }

    fn end(&mut self) -> Result<(), String> {
        self.skip_whitespace();
        match self.pos < self.text.len() {
            true => Err(format!("trailing characters at byte {}", self.pos)),
            false => Ok(()),
        }
    }

    /// Deserializes the value that starts here and moves past it; returns it with its text.
    fn spanned<T: serde::Deserialize<'a>>(&mut self) -> Result<(T, &'a str), serde_json::Error> {
        self.skip_whitespace();
        let rest = &self.text[self.pos..];
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<T>();
        let value = match stream.next() {
            Some(value) => value?,
            None => return Err(serde::de::Error::custom("a value was expected")),
        };
        let len = stream.byte_offset();
        self.pos += len;
        Ok((value, &rest[..len]))
    }

    fn value<T: serde::Deserialize<'a>>(&mut self) -> Result<T, serde_json::Error> {
        self.spanned().map(|(value, _)| value)
    }

    /// The `value` array: each item parsed, or set aside in `rejected` with its reason.
    fn items(&mut self, rejected: &mut Vec<RejectedItem>) -> Result<Vec<PageItem>, String> {
        self.expect(b'[')?;
        let mut items = Vec::with_capacity(128);
        if self.next_is(b']') {
            return Ok(items);
        }
        loop {
            let start = self.pos;
            match self.spanned::<RawEvent>() {
                Ok((raw, text)) => match parse_raw(raw, text) {
                    Ok(item) => items.push(item),
                    Err(e) => rejected.push(RejectedItem {
                        id: item_id(text),
                        raw: text.to_string(),
                        reason: e.0,
                    }),
                },
                Err(e) => {
                    // Not an event object: find where it ends, keep it as sent.
                    self.pos = start;
                    let (_, text) = self
                        .spanned::<serde::de::IgnoredAny>()
                        .map_err(|e| e.to_string())?;
                    rejected.push(RejectedItem {
                        id: item_id(text),
                        raw: text.to_string(),
                        reason: item_error(text, &e).0,
                    });
                }
            }
            if self.next_is(b',') {
                continue;
            }
            self.expect(b']')?;
            return Ok(items);
        }
    }
}

/// The `id` of an item that may not be an event at all.
fn item_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: Option<serde_json::Value>,
    }
    let id = serde_json::from_str::<Id>(text).ok()?.id?;
    match id {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Parses one event as Graph represents it (e.g. a simulator's ground truth) the way a page
/// item is parsed, so both sides of a comparison are normalised alike.
pub fn parse_event(item: serde_json::Value) -> Result<Event, PayloadError> {
    parse_event_text(&item.to_string())
}

/// Parses one event object, such as the answer to `GET /users/{id}/events/{id}`: a series
/// master, an exception or a single event, in full.
pub fn parse_event_text(text: &str) -> Result<Event, PayloadError> {
    match parse_item(text)? {
        PageItem::Event(event) | PageItem::Master(event) => Ok(*event),
        PageItem::Occurrence(stub) => Err(PayloadError(format!(
            "event {}: an occurrence without its series' fields, not a whole event",
            stub.id
        ))),
        PageItem::Removed { id } => Err(PayloadError(format!(
            "item {id} is a removal, not an event"
        ))),
    }
}

fn parse_item(text: &str) -> Result<PageItem, PayloadError> {
    let raw: RawEvent = serde_json::from_str(text).map_err(|e| item_error(text, &e))?;
    parse_raw(raw, text)
}

/// Why an item did not deserialize as an event, naming it when it has an id.
fn item_error(text: &str, e: &serde_json::Error) -> PayloadError {
    match item_id(text) {
        Some(id) => PayloadError(format!("event {id}: {e}")),
        None => PayloadError(format!("item is not an event object: {e}")),
    }
}

/// An item deserialized from `text` (a removal has only `id` and `@removed` of these fields).
fn parse_raw(mut raw: RawEvent<'_>, text: &str) -> Result<PageItem, PayloadError> {
    let id = raw
        .id
        .take()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| PayloadError("item has no `id`".into()))?;
    if raw.removed.is_some() {
        return Ok(PageItem::Removed { id });
    }
    let raw_text = text.to_string();
    let is_occurrence = raw.event_type.as_deref() == Some(OCCURRENCE);
    // A stub carries none of the fields a user reads; an occurrence that does (a Graph fake, or
    // a future Graph) is whole as it stands.
    if is_occurrence && raw.subject.is_none() && raw.is_all_day.is_none() {
        return parse_stub(id, raw, raw_text).map(|stub| PageItem::Occurrence(Box::new(stub)));
    }
    let is_all_day = raw.is_all_day.unwrap_or(false);
    let start = raw
        .start
        .ok_or_else(|| PayloadError(format!("event {id}: missing `start`")))?;
    let end = raw
        .end
        .ok_or_else(|| PayloadError(format!("event {id}: missing `end`")))?;
    let start = graph_date_time(&id, "start", start)?;
    let end = graph_date_time(&id, "end", end)?;
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
        .map(|e| (e.name.map(Cow::into_owned), e.address.map(Cow::into_owned)))
        .unwrap_or((None, None));
    let attendees = Attendees::of_graph(raw.attendees.as_deref().unwrap_or_default());
    let is_master = raw.event_type.as_deref() == Some(SERIES_MASTER);
    let event = Box::new(Event {
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
        attendees,
        location: raw
            .location
            .and_then(|l| l.display_name)
            .filter(|l| !l.is_empty()),
        categories: raw.categories.unwrap_or_default(),
        web_link: raw.web_link,
        raw: raw_text,
    });
    Ok(if is_master {
        PageItem::Master(event)
    } else {
        PageItem::Event(event)
    })
}

fn parse_stub(
    id: String,
    raw: RawEvent<'_>,
    raw_text: String,
) -> Result<OccurrenceStub, PayloadError> {
    let series_master_id = raw
        .series_master_id
        .filter(|m| !m.is_empty())
        .ok_or_else(|| PayloadError(format!("occurrence {id}: missing `seriesMasterId`")))?;
    let start = raw
        .start
        .ok_or_else(|| PayloadError(format!("occurrence {id}: missing `start`")))?;
    let end = raw
        .end
        .ok_or_else(|| PayloadError(format!("occurrence {id}: missing `end`")))?;
    Ok(OccurrenceStub {
        start: graph_date_time(&id, "start", start)?,
        end: graph_date_time(&id, "end", end)?,
        id,
        series_master_id,
        etag: raw.etag,
        raw: raw_text,
    })
}

fn graph_date_time(
    id: &str,
    field: &str,
    value: RawDateTime<'_>,
) -> Result<GraphDateTime, PayloadError> {
    let text = value.date_time.trim();
    let date_time = fixed_date_time(text)
        .map(Ok)
        .unwrap_or_else(|| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f"))
        .or_else(|_| DateTime::parse_from_rfc3339(text).map(|d| d.naive_utc()))
        .map_err(|_| {
            PayloadError(format!(
                "event {id}: `{field}.dateTime` `{text}` is not an ISO 8601 date-time"
            ))
        })?;
    Ok(GraphDateTime {
        date_time,
        time_zone: value.time_zone.map(Cow::into_owned),
    })
}

/// `YYYY-MM-DDTHH:MM:SS` with an optional fraction of up to 9 digits, the form Graph sends
/// (`2026-12-09T20:30:00.0000000`), read without a format string; anything else is `None` and
/// goes to chrono's general parser.
fn fixed_date_time(text: &str) -> Option<NaiveDateTime> {
    let b = text.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let nanos = match &b[19..] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let n = num(20..b.len())?;
            n * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(num(0..4)?).ok()?, num(5..7)?, num(8..10)?)?;
    let time =
        chrono::NaiveTime::from_hms_nano_opt(num(11..13)?, num(14..16)?, num(17..19)?, nanos)?;
    Some(date.and_time(time))
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
    value: &GraphDateTime,
    all_day: bool,
) -> Result<(DateTime<Utc>, Option<NaiveDate>), PayloadError> {
    let naive = value.date_time;
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

    /// Times, attendees and the organizer are read borrowed from the body where they can be;
    /// a value with JSON escapes in it is unescaped the same as a plain one.
    #[test]
    fn escaped_strings_read_the_same_as_plain_ones() {
        let plain = br#"{"value":[{"id":"E1","start":{"dateTime":"2026-01-01T09:00:00","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"},"lastModifiedDateTime":"2026-01-01T08:00:00Z","organizer":{"emailAddress":{"name":"Ann \"A\" Lee","address":"ann@x.test"}},"attendees":[{"type":"required","status":{"response":"accepted"},"emailAddress":{"name":"Bo","address":"bo@x.test"}}]}],"@odata.deltaLink":"x"}"#;
        let escaped = br#"{"value":[{"id":"E1","start":{"dateTime":"2026-01-01T09\u003a00:00","timeZone":"\u0055TC"},"end":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"},"lastModifiedDateTime":"2026-01-01T08:00:00\u005a","organizer":{"emailAddress":{"name":"Ann \"A\" Lee","address":"ann\u0040x.test"}},"attendees":[{"type":"requ\u0069red","status":{"response":"accepted"},"emailAddress":{"name":"B\u006f","address":"bo@x.test"}}]}],"@odata.deltaLink":"x"}"#;
        let event = |body: &[u8]| match parse_page(body).expect("parses").items.pop() {
            Some(PageItem::Event(e)) => *e,
            other => panic!("one event expected: {other:?}"),
        };
        let (plain, escaped) = (event(plain), event(escaped));
        assert_eq!(escaped.organizer_name.as_deref(), Some("Ann \"A\" Lee"));
        assert_eq!(escaped.organizer_address.as_deref(), Some("ann@x.test"));
        assert_eq!(
            escaped.attendees.as_json(),
            r#"[{"address":"bo@x.test","name":"Bo","response":"accepted","type":"required"}]"#
        );
        assert_eq!(escaped.start_utc, plain.start_utc);
        assert_eq!(escaped.last_modified, plain.last_modified);
        assert_eq!(
            Event {
                raw: String::new(),
                ..escaped
            },
            Event {
                raw: String::new(),
                ..plain
            }
        );
    }

    #[test]
    fn bad_time_names_the_event_and_field() {
        let body = br#"{"value":[{"id":"E1","start":{"dateTime":"soon","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T00:00:00","timeZone":"UTC"}}],"@odata.deltaLink":"x"}"#;
        let page = parse_page(body).expect("the page parses; the item is set aside");
        assert!(page.items.is_empty());
        let rejected = &page.rejected[0];
        assert_eq!(rejected.id.as_deref(), Some("E1"));
        assert!(
            rejected.reason.contains("event E1") && rejected.reason.contains("start.dateTime"),
            "{}",
            rejected.reason
        );
    }

    #[test]
    fn a_bad_item_is_set_aside_and_the_rest_of_the_page_kept() {
        let body = br#"{"value":[
            {"id":"ok1","start":{"dateTime":"2026-01-01T09:00:00","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"}},
            {"id":"late","start":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T09:00:00","timeZone":"UTC"}},
            {"subject":"no id"},
            42,
            {"id":"nostart","subject":"x"},
            {"id":"gone","@removed":{"reason":"deleted"}}
        ],"@odata.nextLink":"x"}"#;
        let page = parse_page(body).expect("parses");
        let ids: Vec<&str> = page.items.iter().map(PageItem::id).collect();
        assert_eq!(ids, ["ok1", "gone"]);
        let rejected: Vec<(Option<&str>, &str)> = page
            .rejected
            .iter()
            .map(|r| (r.id.as_deref(), r.raw.as_str()))
            .collect();
        assert_eq!(rejected.len(), 4);
        assert_eq!(rejected[0].0, Some("late"));
        assert_eq!(rejected[1], (None, r#"{"subject":"no id"}"#));
        assert_eq!(rejected[2], (None, "42"));
        assert_eq!(rejected[3].0, Some("nostart"));
        assert!(page.rejected[0].reason.contains("before"));
        assert!(page.rejected[1].key().starts_with("sha256:"));
        assert_ne!(page.rejected[1].key(), page.rejected[2].key());
        assert_eq!(page.rejected[0].key(), "late");
    }

    #[test]
    fn non_utc_timed_event_is_rejected_but_all_day_keeps_its_date() {
        let timed = br#"{"value":[{"id":"E2","start":{"dateTime":"2026-01-01T09:00:00.0000000","timeZone":"Pacific Standard Time"},"end":{"dateTime":"2026-01-01T10:00:00.0000000","timeZone":"Pacific Standard Time"}}],"@odata.deltaLink":"x"}"#;
        assert!(parse_page(timed).expect("parses").rejected[0]
            .reason
            .contains("Pacific Standard Time"));
        let all_day = br#"{"value":[{"id":"E3","isAllDay":true,"start":{"dateTime":"2026-01-01T00:00:00.0000000","timeZone":"Pacific Standard Time"},"end":{"dateTime":"2026-01-02T00:00:00.0000000","timeZone":"Pacific Standard Time"}}],"@odata.deltaLink":"x"}"#;
        let page = parse_page(all_day).expect("all-day parses");
        let PageItem::Event(event) = &page.items[0] else {
            panic!("expected an event")
        };
        assert_eq!(event.start_date, NaiveDate::from_ymd_opt(2026, 1, 1));
        assert_eq!(event.end_date, NaiveDate::from_ymd_opt(2026, 1, 2));
    }

    #[test]
    fn attendees_are_kept_in_the_canonical_form_a_json_tree_writes() {
        let item = r#"{"id":"A1","subject":"s","start":{"dateTime":"2026-01-01T09:00:00","timeZone":"UTC"},
            "end":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"},"attendees":[
            {"type":"required","status":{"response":"accepted","time":"0001-01-01T00:00:00Z"},
             "emailAddress":{"name":"B\"ob \u00e9\u0000","address":"bob@contoso.com"}},
            {"emailAddress":{"address":"x@y"}},
            {}]}"#;
        let event = parse_event_text(item).expect("parses");
        let tree = serde_json::json!([
            {"name": "B\"ob \u{e9}\u{0}", "address": "bob@contoso.com", "type": "required", "response": "accepted"},
            {"name": null, "address": "x@y", "type": null, "response": null},
            {"name": null, "address": null, "type": null, "response": null},
        ]);
        assert_eq!(event.attendees, Attendees::from_value(&tree));
        assert_eq!(event.attendees.to_value(), tree);
        assert_eq!(
            Attendees::from_json(event.attendees.as_json()).expect("canonical text reads back"),
            event.attendees
        );
        assert_eq!(parse_event_text(r#"{"id":"A2","start":{"dateTime":"2026-01-01T09:00:00"},"end":{"dateTime":"2026-01-01T09:00:00"}}"#)
            .expect("parses").attendees.as_json(), "[]");
    }

    #[test]
    fn graph_date_times_read_without_a_format_string_match_chrono() {
        for text in [
            "2026-12-09T20:30:00.0000000",
            "2026-12-09T20:30:00",
            "2026-12-09T20:30:00.1",
            "2026-02-28T23:59:59.123456789",
            "0001-01-01T00:00:00.0000000",
        ] {
            let chrono = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").expect(text);
            assert_eq!(fixed_date_time(text), Some(chrono), "{text}");
        }
        // Not the fixed form: left to chrono's parser (which accepts or rejects them).
        for text in [
            "2026-02-30T00:00:00",
            "2026-12-09T20:30:00Z",
            "2026-12-09T20:30:00.",
            "2026-12-09T20:30:00.1234567890",
            "2026-12-09 20:30:00",
            "2026-1-09T20:30:00.000",
            "+2026-12-09T20:30:00",
            "2026-12-09T24:00:00",
        ] {
            assert_eq!(fixed_date_time(text), None, "{text}");
        }
    }

    #[test]
    fn a_page_is_walked_in_one_pass_whatever_the_order_of_its_members() {
        let body = br#" { "@odata.deltaLink" : "https://graph/delta?x=1" , "@odata.context":"c",
            "value" : [ {"id":"e\u0031","subject":"a\nb","start":{"dateTime":"2026-01-01T09:00:00","timeZone":"UTC"},"end":{"dateTime":"2026-01-01T10:00:00","timeZone":"UTC"},"extra":{"deep":[1,2,{"x":null}]}} ,
            [1,2], "text", null, {"id":"gone","@removed":{"reason":"deleted"}} ] , "n": 1.5e3 } "#;
        let page = parse_page(body).expect("parses");
        assert_eq!(page.link, PageLink::Delta("https://graph/delta?x=1".into()));
        let ids: Vec<&str> = page.items.iter().map(PageItem::id).collect();
        assert_eq!(ids, ["e1", "gone"]);
        let PageItem::Event(event) = &page.items[0] else {
            panic!("expected an event")
        };
        // The raw text is exactly what was sent, escapes and all.
        assert!(
            event.raw.starts_with(r#"{"id":"e\u0031","subject":"a\nb""#),
            "{}",
            event.raw
        );
        assert!(
            event.raw.ends_with(r#""extra":{"deep":[1,2,{"x":null}]}}"#),
            "{}",
            event.raw
        );
        assert_eq!(event.subject.as_deref(), Some("a\nb"));
        let rejected: Vec<&str> = page.rejected.iter().map(|r| r.raw.as_str()).collect();
        assert_eq!(rejected, ["[1,2]", "\"text\"", "null"]);

        for (body, wanted) in [
            (
                &br#"{"value":[],"@odata.deltaLink":"x"} trailing"#[..],
                "trailing",
            ),
            (
                br#"{"value":[],"value":[],"@odata.deltaLink":"x"}"#,
                "duplicate field `value`",
            ),
            (br#"{"@odata.deltaLink":"x"}"#, "missing field `value`"),
            (br#"{"value":[{"id":"a"},"#, "not the expected JSON"),
            (
                br#"{"value":[{"id":"a"} {"id":"b"}],"@odata.deltaLink":"x"}"#,
                "expected `]`",
            ),
            (br#"{"value":{},"@odata.deltaLink":"x"}"#, "expected `[`"),
            (br#"[]"#, "expected `{`"),
            (b"", "expected `{`"),
            (
                b"{\"value\":[],\"@odata.deltaLink\":\"\xff\"}",
                "not the expected JSON",
            ),
            (br#"{"value":[],"@odata.nextLink":null}"#, "neither"),
        ] {
            let err = parse_page(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                err.0.contains(wanted),
                "{}: {}",
                String::from_utf8_lossy(body),
                err.0
            );
        }
    }
}
