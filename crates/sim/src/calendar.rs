//! One mailbox's calendar: the current events, an append-only change log that lets any old but
//! unexpired delta token be answered exactly, and deterministic generation and mutation.

use std::collections::{BTreeMap, HashSet};

use base64::Engine;
use chrono::{DateTime, Duration, DurationRound, NaiveDate, NaiveDateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A half-open time window `[start, end)` as calendarView uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    SingleInstance,
    Occurrence,
    Exception,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::SingleInstance => "singleInstance",
            EventType::Occurrence => "occurrence",
            EventType::Exception => "exception",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub ical_uid: String,
    pub change_key: String,
    pub last_modified: DateTime<Utc>,
    pub subject: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub is_all_day: bool,
    pub is_cancelled: bool,
    pub show_as: &'static str,
    pub sensitivity: &'static str,
    pub kind: EventType,
    pub series_master_id: Option<String>,
    pub organizer: (String, String),
    pub attendees: Vec<Attendee>,
    pub location: String,
    pub categories: Vec<String>,
    /// `None` for generated events, which report a creation three days before their last
    /// change; written events keep the instant they were created.
    pub created: Option<DateTime<Utc>>,
    /// `body.contentType` (`text` or `html`) and `body.content`.
    pub body: (&'static str, String),
    /// The mailbox owner organizes it (events a client or the owner created).
    pub is_organizer: bool,
    pub transaction_id: Option<String>,
    /// Subject, start and end as a POST created it, for telling a retry from a duplicate.
    pub posted: Option<Posted>,
}

/// An attendee: display name, address and `type` (`required`, `optional`, `resource`).
#[derive(Debug, Clone, PartialEq)]
pub struct Attendee {
    pub name: String,
    pub address: String,
    pub kind: &'static str,
}

/// What a POST created: two POSTs with equal `Posted` made the same event twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Posted {
    pub subject: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// A recurring series' master: what its occurrences show, and when the series began. Graph
/// dates a master at its first occurrence, which may lie long before any window.
#[derive(Debug, Clone)]
pub struct Master {
    pub id: String,
    pub ical_uid: String,
    pub change_key: String,
    pub last_modified: DateTime<Utc>,
    pub subject: String,
    pub first_start: DateTime<Utc>,
    pub first_end: DateTime<Utc>,
    pub step_days: i64,
    pub count: usize,
    pub is_all_day: bool,
    pub show_as: &'static str,
    pub sensitivity: &'static str,
    pub organizer: (String, String),
    pub attendees: Vec<Attendee>,
    pub location: String,
    pub categories: Vec<String>,
}

impl Master {
    /// The master as `GET /events/{id}` and calendarView delta return it: a full event of type
    /// `seriesMaster` at the first occurrence's start and end, with its recurrence.
    pub fn to_graph_json(&self) -> Value {
        let first = Event {
            id: self.id.clone(),
            ical_uid: self.ical_uid.clone(),
            change_key: self.change_key.clone(),
            last_modified: self.last_modified,
            subject: self.subject.clone(),
            start: self.first_start,
            end: self.first_end,
            is_all_day: self.is_all_day,
            is_cancelled: false,
            show_as: self.show_as,
            sensitivity: self.sensitivity,
            kind: EventType::SingleInstance,
            series_master_id: None,
            organizer: self.organizer.clone(),
            attendees: self.attendees.clone(),
            location: self.location.clone(),
            categories: self.categories.clone(),
            ..Event::generated_extras()
        };
        let mut json = first.to_graph_json();
        json["type"] = "seriesMaster".into();
        json["seriesMasterId"] = Value::Null;
        let (pattern, interval) = if self.step_days % 7 == 0 {
            ("weekly", self.step_days / 7)
        } else {
            ("daily", self.step_days)
        };
        let weekday = self
            .first_start
            .format("%A")
            .to_string()
            .to_ascii_lowercase();
        json["recurrence"] = json!({
            "pattern": {
                "type": pattern,
                "interval": interval,
                "month": 0,
                "dayOfMonth": 0,
                "daysOfWeek": if pattern == "weekly" { json!([weekday]) } else { json!([]) },
                "firstDayOfWeek": "sunday",
                "index": "first"
            },
            "range": {
                "type": "numbered",
                "startDate": self.first_start.format("%Y-%m-%d").to_string(),
                "endDate": "0001-01-01",
                "recurrenceTimeZone": "UTC",
                "numberOfOccurrences": self.count
            }
        });
        json
    }
}

impl Event {
    /// calendarView semantics: an event overlaps when it starts before the window ends and ends
    /// after it starts; a zero-length event counts when its instant lies inside.
    pub fn overlaps(&self, w: &Window) -> bool {
        if self.start == self.end {
            self.start >= w.start && self.start < w.end
        } else {
            self.start < w.end && self.end > w.start
        }
    }

    pub fn to_graph_json(&self) -> Value {
        let attendees: Vec<Value> = self
            .attendees
            .iter()
            .map(|a| {
                json!({
                    "type": a.kind,
                    "status": {"response": "none", "time": "0001-01-01T00:00:00Z"},
                    "emailAddress": {"name": a.name, "address": a.address}
                })
            })
            .collect();
        let mut event = json!({
            "@odata.type": "#microsoft.graph.event",
            "@odata.etag": format!("W/\"{}\"", self.change_key),
            "id": self.id,
            "createdDateTime": graph_utc(
                self.created.unwrap_or(self.last_modified - Duration::days(3))
            ),
            "lastModifiedDateTime": graph_utc(self.last_modified),
            "changeKey": self.change_key,
            "categories": self.categories,
            "transactionId": self.transaction_id,
            "originalStartTimeZone": "UTC",
            "originalEndTimeZone": "UTC",
            "iCalUId": self.ical_uid,
            "reminderMinutesBeforeStart": 15,
            "isReminderOn": !self.is_all_day,
            "hasAttachments": false,
            "subject": self.subject,
            "bodyPreview": body_preview(self.body.0, &self.body.1),
            "importance": "normal",
            "sensitivity": self.sensitivity,
            "isAllDay": self.is_all_day,
            "isCancelled": self.is_cancelled,
            "isOrganizer": self.is_organizer,
            "responseRequested": true,
            "seriesMasterId": self.series_master_id,
            "showAs": self.show_as,
            "type": self.kind.as_str(),
            "webLink": format!(
                "https://outlook.office365.com/owa/?itemid={}&exvsurl=1&path=/calendar/item",
                url::form_urlencoded::byte_serialize(self.id.as_bytes()).collect::<String>()
            ),
            "onlineMeetingUrl": null,
            "isOnlineMeeting": false,
            "onlineMeetingProvider": "unknown",
            "allowNewTimeProposals": true,
            "responseStatus": {
                "response": if self.is_organizer { "organizer" } else { "notResponded" },
                "time": "0001-01-01T00:00:00Z"
            },
            "start": {"dateTime": graph_local(self.start), "timeZone": "UTC"},
            "end": {"dateTime": graph_local(self.end), "timeZone": "UTC"},
            "location": {
                "displayName": self.location,
                "locationType": "default",
                "uniqueIdType": "unknown"
            },
            "locations": [],
            "recurrence": null,
            "attendees": attendees,
            "organizer": {"emailAddress": {"name": self.organizer.0, "address": self.organizer.1}},
            "onlineMeeting": null
        });
        event["body"] = json!({"contentType": self.body.0, "content": self.body.1});
        event
    }

    /// The fields generation leaves at their defaults (an event someone else organizes).
    fn generated_extras() -> Self {
        Event {
            id: String::new(),
            ical_uid: String::new(),
            change_key: String::new(),
            last_modified: DateTime::<Utc>::MIN_UTC,
            subject: String::new(),
            start: DateTime::<Utc>::MIN_UTC,
            end: DateTime::<Utc>::MIN_UTC,
            is_all_day: false,
            is_cancelled: false,
            show_as: "busy",
            sensitivity: "normal",
            kind: EventType::SingleInstance,
            series_master_id: None,
            organizer: (String::new(), String::new()),
            attendees: Vec::new(),
            location: String::new(),
            categories: Vec::new(),
            created: None,
            body: ("html", String::new()),
            is_organizer: false,
            transaction_id: None,
            posted: None,
        }
    }
}

/// Graph's `bodyPreview`: the body as text, at most 255 characters.
fn body_preview(content_type: &str, content: &str) -> String {
    let text = if content_type == "html" {
        let mut out = String::new();
        let mut in_tag = false;
        for c in content.chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out
    } else {
        content.to_string()
    };
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(255)
        .collect()
}

/// `2026-12-09T20:30:00.0000000`: Graph's dateTimeTimeZone format, 7 digits, zone kept apart.
pub fn graph_local(t: DateTime<Utc>) -> String {
    format!(
        "{}{:07}",
        t.format("%Y-%m-%dT%H:%M:%S."),
        t.timestamp_subsec_nanos() / 100
    )
}

/// `2026-12-09T20:30:00.1234567Z` as Graph writes `lastModifiedDateTime`.
pub fn graph_utc(t: DateTime<Utc>) -> String {
    format!("{}Z", graph_local(t))
}

/// An occurrence as calendarView delta sends it: only these seven properties (reported since
/// 2017: microsoft-graph-docs issues 1716 and 7632, microsoft-graph-docs-contrib issue 34).
pub fn occurrence_stub_json(ev: &Event) -> Value {
    json!({
        "@odata.type": "#microsoft.graph.event",
        "@odata.etag": format!("W/\"{}\"", ev.change_key),
        "id": ev.id,
        "seriesMasterId": ev.series_master_id,
        "type": "occurrence",
        "start": {"dateTime": graph_local(ev.start), "timeZone": "UTC"},
        "end": {"dateTime": graph_local(ev.end), "timeZone": "UTC"},
    })
}

pub fn removed_json(id: &str) -> Value {
    json!({"@odata.type": "#microsoft.graph.event", "id": id, "@removed": {"reason": "deleted"}})
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeltaItem {
    Present(Value),
    Removed(String),
}

impl DeltaItem {
    pub fn into_json(self) -> Value {
        match self {
            DeltaItem::Present(v) => v,
            DeltaItem::Removed(id) => removed_json(&id),
        }
    }
}

/// Result of reading one page of a round.
pub struct PageRead {
    pub items: Vec<DeltaItem>,
    /// Offset into the round's stable change list where the next page starts; `None` when done.
    pub next_offset: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MutationKind {
    Create,
    Update,
    Move,
    Delete,
    /// A series master changed (renamed, rescheduled in place): it and every occurrence are
    /// re-sent.
    RenameSeries,
    /// A whole series deleted: the master and all its instances are removed.
    DeleteSeries,
}

pub struct MailboxCalendar {
    pub address: String,
    events: BTreeMap<String, Event>,
    masters: BTreeMap<String, Master>,
    deleted_masters: HashSet<String>,
    /// Every change ever made, `(seq, event id)`, seq strictly increasing; ids repeat.
    log: Vec<(u64, String)>,
    seq: u64,
    rng: StdRng,
    range: Window,
    counter: u64,
}

const SUBJECTS: &[&str] = &[
    "Standup",
    "1:1",
    "Design review",
    "Quarterly planning",
    "Lunch",
    "Customer call",
    "Interview",
    "Focus time",
    "Offsite",
    "Budget sync",
];
const LOCATIONS: &[&str] = &["", "Room 1", "Teams", "Building 7 / 2.14", "Café"];
const SHOW_AS: &[&str] = &[
    "busy",
    "busy",
    "tentative",
    "free",
    "oof",
    "workingElsewhere",
];
const SENSITIVITY: &[&str] = &["normal", "normal", "normal", "private", "personal"];
const CATEGORIES: &[&str] = &[
    "Blue category",
    "Green category",
    "Orange category",
    "Customer",
];

impl MailboxCalendar {
    /// Builds a deterministic calendar for `address`: `seed` and `index` fix the content;
    /// `now` only stamps `lastModifiedDateTime`.
    pub fn generate(
        address: &str,
        seed: u64,
        index: u64,
        n_events: usize,
        range: Window,
        now: DateTime<Utc>,
    ) -> Self {
        let mut cal = Self {
            address: address.to_string(),
            events: BTreeMap::new(),
            masters: BTreeMap::new(),
            deleted_masters: HashSet::new(),
            log: Vec::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed),
            range,
            counter: 0,
        };
        // Every calendar of some size has the recurring shapes Graph makes hard: a series begun
        // before the window and a recurring all-day series (random series come below).
        if n_events >= 40 {
            let step = Duration::weeks(1);
            let count = (n_events / 4).clamp(8, 40);
            let offset = Duration::minutes(30 * cal.rng.gen_range(16..40));
            let first = cal.range.start + offset - step * (count / 2) as i32;
            cal.add_series_at(first, step, count, false, now);
            let first = cal.random_start(true);
            cal.add_series_at(first, Duration::days(1), 4, true, now);
        }
        while cal.events.len() < n_events {
            let remaining = n_events - cal.events.len();
            let roll = cal.rng.gen_range(0..100);
            if roll < 12 && remaining >= 3 {
                let count = cal.rng.gen_range(3..=remaining.min(12));
                cal.add_series(count, now);
            } else {
                let ev = cal.new_single(now, roll < 25, (25..30).contains(&roll));
                cal.insert(ev);
            }
        }
        cal
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn insert(&mut self, ev: Event) {
        let seq = self.next_seq();
        self.log.push((seq, ev.id.clone()));
        self.events.insert(ev.id.clone(), ev);
    }

    fn new_id(&mut self) -> String {
        // Real ids are ~150 chars of base64 with `-`/`_`, which stresses URL handling in clients.
        self.counter += 1;
        let mut raw = vec![0u8; 96];
        self.rng.fill(&mut raw[..]);
        raw[..8].copy_from_slice(&self.counter.to_be_bytes());
        format!(
            "AAMkAD{}AAA=",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        )
    }

    fn new_change_key(&mut self) -> String {
        let mut raw = [0u8; 21];
        self.rng.fill(&mut raw[..]);
        format!(
            "DwAAABYAAA{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    fn new_uid(&mut self) -> String {
        let mut raw = [0u8; 28];
        self.rng.fill(&mut raw[..]);
        let hex: String = raw.iter().map(|b| format!("{b:02X}")).collect();
        format!("040000008200E00074C5B7101A82E008{hex}")
    }

    fn random_start(&mut self, all_day: bool) -> DateTime<Utc> {
        let span = (self.range.end - self.range.start).num_minutes().max(60);
        let offset = self.rng.gen_range(0..span);
        let t = self.range.start + Duration::minutes(offset);
        if all_day {
            t.duration_trunc(Duration::days(1)).unwrap_or(t)
        } else {
            t.duration_trunc(Duration::minutes(30)).unwrap_or(t)
        }
    }

    fn people(&mut self) -> ((String, String), Vec<Attendee>) {
        let domain = self
            .address
            .split_once('@')
            .map(|(_, d)| d.to_string())
            .unwrap_or_else(|| "example.com".into());
        let org_n = self.rng.gen_range(1..50);
        let organizer = (format!("Person {org_n}"), format!("person{org_n}@{domain}"));
        let n = self.rng.gen_range(0..4);
        let attendees = (0..n)
            .map(|_| {
                let k = self.rng.gen_range(1..50);
                Attendee {
                    name: format!("Person {k}"),
                    address: format!("person{k}@{domain}"),
                    kind: "required",
                }
            })
            .collect();
        (organizer, attendees)
    }

    fn new_single(&mut self, now: DateTime<Utc>, all_day: bool, cancelled: bool) -> Event {
        let start = self.random_start(all_day);
        let end = if all_day {
            start + Duration::days(self.rng.gen_range(1..=3))
        } else {
            start + Duration::minutes(30 * self.rng.gen_range(1..=6))
        };
        let (organizer, attendees) = self.people();
        Event {
            id: self.new_id(),
            ical_uid: self.new_uid(),
            change_key: self.new_change_key(),
            last_modified: now,
            subject: SUBJECTS[self.rng.gen_range(0..SUBJECTS.len())].to_string(),
            start,
            end,
            is_all_day: all_day,
            is_cancelled: cancelled,
            show_as: if all_day {
                "free"
            } else {
                SHOW_AS[self.rng.gen_range(0..SHOW_AS.len())]
            },
            sensitivity: SENSITIVITY[self.rng.gen_range(0..SENSITIVITY.len())],
            kind: EventType::SingleInstance,
            series_master_id: None,
            organizer,
            attendees,
            location: LOCATIONS[self.rng.gen_range(0..LOCATIONS.len())].to_string(),
            categories: self.random_categories(),
            ..Event::generated_extras()
        }
    }

    fn random_categories(&mut self) -> Vec<String> {
        let n = self.rng.gen_range(0..3usize);
        let mut out: Vec<String> = (0..n)
            .map(|_| CATEGORIES[self.rng.gen_range(0..CATEGORIES.len())].to_string())
            .collect();
        out.dedup();
        out
    }

    /// A weekly or daily series at a random time in the range.
    fn add_series(&mut self, count: usize, now: DateTime<Utc>) {
        let first = self.random_start(false);
        let step = if self.rng.gen_bool(0.5) {
            Duration::days(1)
        } else {
            Duration::weeks(1)
        };
        self.add_series_at(first, step, count, false, now);
    }

    /// A series: its master, then its instances, a few of which are exceptions (moved by an
    /// hour, own subject). calendarView expands a series into instances; delta also lists the
    /// master, dated at the first occurrence.
    fn add_series_at(
        &mut self,
        first: DateTime<Utc>,
        step: Duration,
        count: usize,
        all_day: bool,
        now: DateTime<Utc>,
    ) {
        let master_id = self.new_id();
        let len = if all_day {
            Duration::days(1)
        } else {
            Duration::minutes(30 * self.rng.gen_range(1..=4))
        };
        let subject = format!(
            "{} (recurring)",
            SUBJECTS[self.rng.gen_range(0..SUBJECTS.len())]
        );
        let (organizer, attendees) = self.people();
        let master = Master {
            id: master_id.clone(),
            ical_uid: self.new_uid(),
            change_key: self.new_change_key(),
            last_modified: now,
            subject,
            first_start: first,
            first_end: first + len,
            step_days: step.num_days().max(1),
            count,
            is_all_day: all_day,
            show_as: if all_day { "free" } else { "busy" },
            sensitivity: SENSITIVITY[self.rng.gen_range(0..SENSITIVITY.len())],
            organizer,
            attendees,
            location: LOCATIONS[self.rng.gen_range(1..LOCATIONS.len())].to_string(),
            categories: self.random_categories(),
        };
        let seq = self.next_seq();
        self.log.push((seq, master_id.clone()));
        for i in 0..count {
            let mut start = first + step * i as i32;
            let exception = !all_day && self.rng.gen_range(0..10) == 0;
            if exception {
                start += Duration::hours(1);
            }
            let mut ev = self.occurrence_of(&master, start, len);
            if exception {
                ev.kind = EventType::Exception;
                ev.change_key = self.new_change_key();
                ev.subject = format!("{} (moved)", master.subject);
            }
            self.insert(ev);
        }
        self.masters.insert(master_id, master);
    }

    /// An occurrence of `master` at `start`: the master's fields, its own id and iCalUId (Graph
    /// gives each occurrence its own) and the master's changeKey.
    fn occurrence_of(&mut self, master: &Master, start: DateTime<Utc>, len: Duration) -> Event {
        Event {
            id: self.new_id(),
            ical_uid: self.new_uid(),
            change_key: master.change_key.clone(),
            last_modified: master.last_modified,
            subject: master.subject.clone(),
            start,
            end: start + len,
            is_all_day: master.is_all_day,
            is_cancelled: false,
            show_as: master.show_as,
            sensitivity: master.sensitivity,
            kind: EventType::Occurrence,
            series_master_id: Some(master.id.clone()),
            organizer: master.organizer.clone(),
            attendees: master.attendees.clone(),
            location: master.location.clone(),
            categories: master.categories.clone(),
            ..Event::generated_extras()
        }
    }

    /// The series of `master_id` has an instance overlapping `window`.
    fn series_in(&self, master_id: &str, window: &Window) -> bool {
        self.events
            .values()
            .any(|e| e.series_master_id.as_deref() == Some(master_id) && e.overlaps(window))
    }

    /// One event or series master in full, as `GET /users/{id}/events/{id}` returns it.
    pub fn item(&self, id: &str) -> Option<Value> {
        match (self.events.get(id), self.masters.get(id)) {
            (Some(ev), _) => Some(ev.to_graph_json()),
            (None, Some(master)) => Some(master.to_graph_json()),
            (None, None) => None,
        }
    }

    /// Master ids, in id order.
    pub fn master_ids(&self) -> Vec<String> {
        self.masters.keys().cloned().collect()
    }

    /// Changes a series master (subject, busy status, location, categories) as an organizer
    /// editing "the entire series" does: the master and every occurrence get a new changeKey
    /// and are re-sent; exceptions keep their own fields.
    pub fn rename_series(&mut self, master_id: &str, now: DateTime<Utc>) -> bool {
        let change_key = self.new_change_key();
        let subject_n = self.rng.gen_range(0..SUBJECTS.len());
        let location = LOCATIONS[self.rng.gen_range(1..LOCATIONS.len())].to_string();
        let categories = self.random_categories();
        let Some(master) = self.masters.get_mut(master_id) else {
            return false;
        };
        master.change_key = change_key;
        master.last_modified = now;
        master.subject = format!("{} (recurring, renamed)", SUBJECTS[subject_n]);
        if !master.is_all_day {
            master.show_as = if master.show_as == "busy" {
                "tentative"
            } else {
                "busy"
            };
        }
        master.location = location;
        master.categories = categories;
        self.resend_series(master_id, now);
        true
    }

    /// Logs a changed master and copies its fields to every occurrence (exceptions keep their
    /// own), so the master and the occurrences are re-sent in delta.
    fn resend_series(&mut self, master_id: &str, now: DateTime<Utc>) {
        let Some(master) = self.masters.get(master_id).cloned() else {
            return;
        };
        let seq = self.next_seq();
        self.log.push((seq, master.id.clone()));
        let ids: Vec<String> = self
            .events
            .values()
            .filter(|e| {
                e.kind == EventType::Occurrence && e.series_master_id.as_deref() == Some(master_id)
            })
            .map(|e| e.id.clone())
            .collect();
        for id in ids {
            if let Some(ev) = self.events.get_mut(&id) {
                ev.change_key = master.change_key.clone();
                ev.last_modified = now;
                ev.subject = master.subject.clone();
                ev.show_as = master.show_as;
                ev.sensitivity = master.sensitivity;
                ev.location = master.location.clone();
                ev.categories = master.categories.clone();
                ev.attendees = master.attendees.clone();
            }
            let seq = self.next_seq();
            self.log.push((seq, id));
        }
    }

    /// Deletes a whole series: the master and every instance, exceptions included.
    pub fn delete_series(&mut self, master_id: &str) -> bool {
        if self.masters.remove(master_id).is_none() {
            return false;
        }
        self.deleted_masters.insert(master_id.to_string());
        let seq = self.next_seq();
        self.log.push((seq, master_id.to_string()));
        let ids: Vec<String> = self
            .events
            .values()
            .filter(|e| e.series_master_id.as_deref() == Some(master_id))
            .map(|e| e.id.clone())
            .collect();
        for id in ids {
            self.events.remove(&id);
            let seq = self.next_seq();
            self.log.push((seq, id));
        }
        true
    }

    pub fn current_seq(&self) -> u64 {
        self.seq
    }

    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Current events as Graph JSON, overlapping `window` when given, ordered by start then id.
    pub fn truth(&self, window: Option<&Window>) -> Vec<Value> {
        let mut evs: Vec<&Event> = self
            .events
            .values()
            .filter(|e| window.is_none_or(|w| e.overlaps(w)))
            .collect();
        evs.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| a.id.cmp(&b.id)));
        evs.into_iter().map(Event::to_graph_json).collect()
    }

    /// Distinct ids changed in `(since, upto]`, in order of first change. The log is append-only,
    /// so this list is the same on every page of a round, which keeps offsets stable.
    fn changed_ids(&self, since: u64, upto: u64) -> Vec<&str> {
        let from = self.log.partition_point(|(s, _)| *s <= since);
        let mut seen = HashSet::new();
        self.log[from..]
            .iter()
            .take_while(|(s, _)| *s <= upto)
            .filter(|(_, id)| seen.insert(id.as_str()))
            .map(|(_, id)| id.as_str())
            .collect()
    }

    /// Reads one page of the round `(since, upto]` for `window` starting at `offset`.
    /// An initial round (`since == 0`) lists only events that exist in the window. An
    /// incremental round lists every changed event: its full body when it is in the window now,
    /// otherwise `@removed`, which covers deletion, moves out of the window and changes outside.
    ///
    /// As Graph does: an occurrence is sent as a stub, an exception in full, and a series
    /// master in full (dated at its first occurrence) when its series has an instance in the
    /// window. With `masters_in_delta` off, masters are never listed (as some clients report
    /// for incremental rounds), so a client must fetch them.
    pub fn read_page(
        &self,
        window: &Window,
        since: u64,
        upto: u64,
        offset: usize,
        page_size: usize,
        masters_in_delta: bool,
    ) -> PageRead {
        let ids = self.changed_ids(since, upto);
        let mut items = Vec::new();
        let mut pos = offset.min(ids.len());
        while pos < ids.len() && items.len() < page_size {
            let id = ids[pos];
            pos += 1;
            if let Some(master) = self.masters.get(id) {
                if !masters_in_delta {
                    continue;
                }
                if self.series_in(id, window) {
                    items.push(DeltaItem::Present(master.to_graph_json()));
                } else if since != 0 {
                    items.push(DeltaItem::Removed(id.to_string()));
                }
                continue;
            }
            match self.events.get(id) {
                Some(ev) if ev.overlaps(window) => {
                    items.push(DeltaItem::Present(match ev.kind {
                        EventType::Occurrence => occurrence_stub_json(ev),
                        _ => ev.to_graph_json(),
                    }));
                }
                _ if since == 0 => {}
                _ if !masters_in_delta && self.was_master(id) => {}
                _ => items.push(DeltaItem::Removed(id.to_string())),
            }
        }
        let next_offset = (pos < ids.len()).then_some(pos);
        PageRead { items, next_offset }
    }

    fn was_master(&self, id: &str) -> bool {
        self.deleted_masters.contains(id)
    }

    /// Applies one random mutation and returns what it did.
    pub fn mutate(&mut self, now: DateTime<Utc>) -> Option<(MutationKind, String)> {
        let roll = self.rng.gen_range(0..100);
        if (60..64).contains(&roll) && !self.masters.is_empty() {
            let idx = self.rng.gen_range(0..self.masters.len());
            let id = self.masters.keys().nth(idx)?.clone();
            self.rename_series(&id, now);
            return Some((MutationKind::RenameSeries, id));
        }
        if roll == 64 && !self.masters.is_empty() {
            let idx = self.rng.gen_range(0..self.masters.len());
            let id = self.masters.keys().nth(idx)?.clone();
            self.delete_series(&id);
            return Some((MutationKind::DeleteSeries, id));
        }
        if roll < 25 || self.events.is_empty() {
            let all_day = self.rng.gen_range(0..5) == 0;
            let ev = self.new_single(now, all_day, false);
            let id = ev.id.clone();
            self.insert(ev);
            return Some((MutationKind::Create, id));
        }
        let idx = self.rng.gen_range(0..self.events.len());
        let id = self.events.keys().nth(idx)?.clone();
        if roll < 45 {
            self.events.remove(&id);
            let seq = self.next_seq();
            self.log.push((seq, id.clone()));
            return Some((MutationKind::Delete, id));
        }
        let change_key = self.new_change_key();
        let kind = if roll < 60 {
            // Sometimes far enough to leave any reasonable sync window.
            let days = if self.rng.gen_bool(0.5) {
                self.rng.gen_range(-3..=3)
            } else {
                self.rng.gen_range(200..400) * if self.rng.gen_bool(0.5) { 1 } else { -1 }
            };
            (MutationKind::Move, days)
        } else {
            (MutationKind::Update, 0)
        };
        let subject_n = self.rng.gen_range(0..SUBJECTS.len());
        let show_as = SHOW_AS[self.rng.gen_range(0..SHOW_AS.len())];
        let cancel = self.rng.gen_range(0..8) == 0;
        let ev = self.events.get_mut(&id)?;
        ev.change_key = change_key;
        ev.last_modified = now;
        if ev.kind == EventType::Occurrence {
            ev.kind = EventType::Exception;
        }
        match kind {
            (MutationKind::Move, days) => {
                let shift = if days == 0 {
                    Duration::hours(1)
                } else {
                    Duration::days(days)
                };
                ev.start += shift;
                ev.end += shift;
            }
            _ => {
                ev.subject = format!("{} (edited)", SUBJECTS[subject_n]);
                if !ev.is_all_day {
                    ev.show_as = show_as;
                }
                ev.is_cancelled = ev.is_cancelled || cancel;
            }
        }
        let seq = self.next_seq();
        self.log.push((seq, id.clone()));
        Some((kind.0, id))
    }

    /// Moves one event to `start` (tests use it to push an event out of a window on purpose).
    pub fn move_event(&mut self, id: &str, start: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let change_key = self.new_change_key();
        let Some(ev) = self.events.get_mut(id) else {
            return false;
        };
        let len = ev.end - ev.start;
        ev.start = start;
        ev.end = start + len;
        ev.change_key = change_key;
        ev.last_modified = now;
        if ev.kind == EventType::Occurrence {
            ev.kind = EventType::Exception;
        }
        let seq = self.next_seq();
        self.log.push((seq, id.to_string()));
        true
    }

    /// The mailbox owner as an organizer: the address's local part as display name.
    fn owner(&self) -> (String, String) {
        let name = self.address.split('@').next().unwrap_or_default();
        (name.to_string(), self.address.clone())
    }

    /// `POST /events`: a new single event organized by the owner, unless `transaction_id`
    /// names an event this mailbox already has: then that event, when the POST asks for the
    /// same subject, start and end (a retry) and `refuse_retries` is off, or an
    /// `ErrorDuplicateTransactionId` naming the event (`@event.existingEventId`) otherwise
    /// (what clients report Graph answering to retries too).
    pub fn create(
        &mut self,
        patch: EventPatch,
        transaction_id: Option<String>,
        refuse_retries: bool,
        now: DateTime<Utc>,
    ) -> Result<Created, Rejected> {
        let start = patch.start.ok_or_else(|| Rejected::missing("start"))?;
        let end = patch.end.ok_or_else(|| Rejected::missing("end"))?;
        let is_all_day = patch.is_all_day.unwrap_or(false);
        check_times(start, end, is_all_day)?;
        let subject = patch.subject.unwrap_or_default();
        let posted = Posted {
            subject: subject.clone(),
            start,
            end,
        };
        if let Some(tid) = &transaction_id {
            if let Some(ev) = self
                .events
                .values()
                .find(|e| e.transaction_id.as_ref() == Some(tid))
            {
                return if ev.posted.as_ref() == Some(&posted) && !refuse_retries {
                    Ok(Created::Existing(ev.to_graph_json()))
                } else {
                    Err(Rejected {
                        existing_event_id: Some(ev.id.clone()),
                        ..Rejected::new(
                            400,
                            "ErrorDuplicateTransactionId",
                            "Your request can't be completed. The TransactionId specified in the request has already been used to create a different event.",
                        )
                    })
                };
            }
        }
        let duplicate = self
            .events
            .values()
            .any(|e| e.posted.as_ref() == Some(&posted));
        let ev = Event {
            id: self.new_id(),
            ical_uid: self.new_uid(),
            change_key: self.new_change_key(),
            last_modified: now,
            subject,
            start,
            end,
            is_all_day,
            is_cancelled: false,
            show_as: patch.show_as.unwrap_or("busy"),
            sensitivity: patch.sensitivity.unwrap_or("normal"),
            kind: EventType::SingleInstance,
            series_master_id: None,
            organizer: self.owner(),
            attendees: patch.attendees.unwrap_or_default(),
            location: patch.location.unwrap_or_default(),
            categories: patch.categories.unwrap_or_default(),
            created: Some(now),
            body: patch.body.unwrap_or(("html", String::new())),
            is_organizer: true,
            transaction_id,
            posted: Some(posted),
        };
        let json = ev.to_graph_json();
        self.insert(ev);
        Ok(Created::New {
            event: json,
            duplicate,
        })
    }

    /// `PATCH /events/{id}`: sets the given properties, moves the changeKey. With `if_match`
    /// (an etag or a bare changeKey) the event must still have that changeKey (else 412). A
    /// series master takes all but its times, and its occurrences follow.
    pub fn update(
        &mut self,
        id: &str,
        patch: EventPatch,
        if_match: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Value, Rejected> {
        let change_key = self.new_change_key();
        if let Some(master) = self.masters.get_mut(id) {
            check_if_match(if_match, &master.change_key)?;
            if patch.start.is_some() || patch.end.is_some() || patch.is_all_day.is_some() {
                return Err(Rejected::new(
                    400,
                    "ErrorInvalidRequest",
                    "The simulator does not reschedule recurring series: patch start, end and isAllDay of single events only.",
                ));
            }
            master.change_key = change_key;
            master.last_modified = now;
            set(&mut master.subject, patch.subject);
            set(&mut master.show_as, patch.show_as);
            set(&mut master.sensitivity, patch.sensitivity);
            set(&mut master.location, patch.location);
            set(&mut master.attendees, patch.attendees);
            set(&mut master.categories, patch.categories);
            let json = master.to_graph_json();
            self.resend_series(id, now);
            return Ok(json);
        }
        let ev = self.events.get_mut(id).ok_or_else(Rejected::not_found)?;
        check_if_match(if_match, &ev.change_key)?;
        let start = patch.start.unwrap_or(ev.start);
        let end = patch.end.unwrap_or(ev.end);
        let is_all_day = patch.is_all_day.unwrap_or(ev.is_all_day);
        check_times(start, end, is_all_day)?;
        ev.start = start;
        ev.end = end;
        ev.is_all_day = is_all_day;
        set(&mut ev.subject, patch.subject);
        set(&mut ev.body, patch.body);
        set(&mut ev.show_as, patch.show_as);
        set(&mut ev.sensitivity, patch.sensitivity);
        set(&mut ev.location, patch.location);
        set(&mut ev.attendees, patch.attendees);
        set(&mut ev.categories, patch.categories);
        ev.change_key = change_key;
        ev.last_modified = now;
        if ev.kind == EventType::Occurrence {
            ev.kind = EventType::Exception;
        }
        let json = ev.to_graph_json();
        let seq = self.next_seq();
        self.log.push((seq, id.to_string()));
        Ok(json)
    }

    /// `DELETE /events/{id}`: the event leaves the calendar (a master takes its series along).
    pub fn delete(&mut self, id: &str) -> bool {
        if self.masters.contains_key(id) {
            return self.delete_series(id);
        }
        if self.events.remove(id).is_none() {
            return false;
        }
        let seq = self.next_seq();
        self.log.push((seq, id.to_string()));
        true
    }

    /// `POST /events/{id}/cancel`: as a delete, for the organizer only.
    pub fn cancel(&mut self, id: &str) -> Result<(), Rejected> {
        let organizer = match (self.events.get(id), self.masters.contains_key(id)) {
            (Some(ev), _) => ev.is_organizer,
            // Generated series are organized by someone else.
            (None, true) => false,
            (None, false) => return Err(Rejected::not_found()),
        };
        if !organizer {
            return Err(Rejected::new(
                400,
                "ErrorAccessDenied",
                "Your request can't be completed. You need to be an organizer to cancel a meeting.",
            ));
        }
        self.delete(id);
        Ok(())
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// Properties a write sets; `None` leaves a property as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPatch {
    pub subject: Option<String>,
    /// `contentType` (`text` or `html`) and `content`.
    pub body: Option<(&'static str, String)>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub location: Option<String>,
    pub attendees: Option<Vec<Attendee>>,
    pub is_all_day: Option<bool>,
    pub show_as: Option<&'static str>,
    pub sensitivity: Option<&'static str>,
    pub categories: Option<Vec<String>>,
}

/// What a create did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// A new event; `duplicate` when another POST already made one with its subject and times.
    New { event: Value, duplicate: bool },
    /// The event an earlier POST with the same `transactionId` made; nothing was created.
    Existing(Value),
}

/// A write Graph refuses: HTTP status and `error.code`/`error.message`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// `@event.existingEventId` in the error: the event an already used transactionId made.
    pub existing_event_id: Option<String>,
}

impl Rejected {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            existing_event_id: None,
        }
    }

    fn not_found() -> Self {
        Self::new(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        )
    }

    fn missing(property: &str) -> Self {
        Self::new(
            400,
            "ErrorInvalidRequest",
            format!("Your request can't be completed. The property '{property}' is required to create an event."),
        )
    }

    pub fn is_precondition_failed(&self) -> bool {
        self.status == 412
    }
}

/// Graph refuses an end before the start, and an all-day event that does not start and end at
/// midnight (reported as `ErrorPropertyValidationFailure`).
fn check_times(start: DateTime<Utc>, end: DateTime<Utc>, is_all_day: bool) -> Result<(), Rejected> {
    let midnight = |t: DateTime<Utc>| t.time() == chrono::NaiveTime::MIN;
    if end < start || (is_all_day && (!midnight(start) || !midnight(end) || end == start)) {
        return Err(Rejected::new(
            400,
            "ErrorPropertyValidationFailure",
            "At least one property failed validation.",
        ));
    }
    Ok(())
}

/// `If-Match` against the current changeKey: `*`, `W/"<changeKey>"`, `"<changeKey>"` or the
/// bare changeKey, or a comma-separated list of them.
fn check_if_match(if_match: Option<&str>, change_key: &str) -> Result<(), Rejected> {
    let Some(header) = if_match else {
        return Ok(());
    };
    let matches = header.split(',').any(|tag| {
        let tag = tag.trim();
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag.trim_matches('"') == change_key
    });
    if matches {
        Ok(())
    } else {
        Err(Rejected::new(
            412,
            "ErrorIrresolvableConflict",
            "The send or update operation could not be performed because the change key passed in the request does not match the current change key for the item.",
        ))
    }
}

/// Graph accepts ISO 8601 with or without offset (no offset means UTC) and plain dates.
pub fn parse_graph_datetime(s: &str) -> Option<DateTime<Utc>> {
    // `+` in an unencoded query string arrives as a space.
    let s = s.trim().replace(' ', "+");
    if let Ok(t) = DateTime::parse_from_rfc3339(&s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&s, f) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    NaiveDate::parse_from_str(&s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| Utc.from_utc_datetime(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        let start = DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        Window {
            start,
            end: start + Duration::days(60),
        }
    }

    fn round(cal: &MailboxCalendar, w: &Window, since: u64) -> Vec<DeltaItem> {
        let upto = cal.current_seq();
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let p = cal.read_page(w, since, upto, offset, 7, true);
            out.extend(p.items);
            match p.next_offset {
                Some(o) => offset = o,
                None => return out,
            }
        }
    }

    #[test]
    fn generation_is_deterministic_and_mixed() {
        let now = Utc::now();
        let a = MailboxCalendar::generate("u@t.example", 3, 1, 200, window(), now);
        let b = MailboxCalendar::generate("u@t.example", 3, 1, 200, window(), now);
        assert_eq!(a.truth(None), b.truth(None));
        assert_eq!(a.event_count(), 200);
        let all = a.truth(None);
        let has = |f: &dyn Fn(&Value) -> bool| all.iter().any(f);
        assert!(has(
            &|e| e["type"] == "occurrence" && e["seriesMasterId"].is_string()
        ));
        assert!(has(&|e| e["type"] == "exception"));
        assert!(has(&|e| e["isAllDay"] == true
            && e["start"]["dateTime"]
                .as_str()
                .is_some_and(|s| s.ends_with("T00:00:00.0000000"))));
        assert!(has(&|e| e["isCancelled"] == true));
        // The shapes recurring series take: an all-day series and one begun before the range.
        assert!(has(&|e| e["type"] == "occurrence" && e["isAllDay"] == true));
        let masters: Vec<Value> = a.master_ids().iter().filter_map(|id| a.item(id)).collect();
        assert!(masters.iter().any(|m| m["start"]["dateTime"]
            .as_str()
            .is_some_and(|s| s < "2026-11-01")));
    }

    fn item_id(item: &DeltaItem) -> String {
        match item {
            DeltaItem::Present(v) => v["id"].as_str().unwrap_or_default().to_string(),
            DeltaItem::Removed(id) => id.clone(),
        }
    }

    #[test]
    fn incremental_round_reports_exactly_the_changes() {
        let now = Utc::now();
        let w = window();
        let mut cal = MailboxCalendar::generate("u@t.example", 3, 1, 40, w, now);
        let initial = round(&cal, &w, 0);
        let instances = initial
            .iter()
            .filter(|i| !matches!(i, DeltaItem::Present(v) if v["type"] == "seriesMaster"))
            .count();
        assert_eq!(instances, cal.truth(Some(&w)).len());
        let series_of: std::collections::HashMap<String, String> = cal
            .truth(None)
            .iter()
            .filter_map(|e| {
                Some((
                    e["id"].as_str()?.into(),
                    e["seriesMasterId"].as_str()?.into(),
                ))
            })
            .collect();
        let mark = cal.current_seq();
        let mut touched = HashSet::new();
        let mut series_touched = HashSet::new();
        for _ in 0..40 {
            match cal.mutate(now) {
                Some((MutationKind::RenameSeries | MutationKind::DeleteSeries, id)) => {
                    series_touched.insert(id.clone());
                    touched.insert(id);
                }
                Some((_, id)) => {
                    touched.insert(id);
                }
                None => {}
            }
        }
        let ids: HashSet<String> = round(&cal, &w, mark).iter().map(item_id).collect();
        assert!(ids.is_superset(&touched), "every change is reported");
        for id in ids.difference(&touched) {
            let series = series_of.get(id).expect("an instance of a touched series");
            assert!(series_touched.contains(series), "{id}");
        }
        assert!(round(&cal, &w, cal.current_seq()).is_empty());
    }

    #[test]
    fn a_renamed_series_resends_master_and_occurrences_as_stubs() {
        let now = Utc::now();
        let w = window();
        let mut cal = MailboxCalendar::generate("u@t.example", 3, 1, 60, w, now);
        let master = cal
            .truth(Some(&w))
            .iter()
            .find(|e| e["type"] == "occurrence")
            .and_then(|e| e["seriesMasterId"].as_str())
            .expect("a series in the window")
            .to_string();
        let mark = cal.current_seq();
        assert!(cal.rename_series(&master, now));
        let items = round(&cal, &w, mark);
        let master_json = items
            .iter()
            .find_map(|i| match i {
                DeltaItem::Present(v) if v["id"] == master.as_str() => Some(v.clone()),
                _ => None,
            })
            .expect("the master is re-sent");
        assert_eq!(master_json["type"], "seriesMaster");
        assert!(master_json["subject"]
            .as_str()
            .is_some_and(|s| s.contains("renamed")));
        let stubs: Vec<&Value> = items
            .iter()
            .filter_map(|i| match i {
                DeltaItem::Present(v) if v["type"] == "occurrence" => Some(v),
                _ => None,
            })
            .collect();
        assert!(!stubs.is_empty());
        for stub in stubs {
            assert_eq!(stub.as_object().map(|o| o.len()), Some(7), "{stub}");
            assert_eq!(stub["seriesMasterId"], master.as_str());
            assert_eq!(
                stub["@odata.etag"],
                format!(
                    "W/\"{}\"",
                    master_json["changeKey"].as_str().unwrap_or_default()
                )
            );
        }
        // Deleting the series removes the master and every instance.
        let mark = cal.current_seq();
        let before: Vec<String> = cal
            .truth(None)
            .iter()
            .filter(|e| e["seriesMasterId"] == master.as_str())
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        assert!(cal.delete_series(&master));
        let removed: HashSet<String> = round(&cal, &w, mark).iter().map(item_id).collect();
        assert!(removed.contains(&master));
        assert!(before.iter().all(|id| removed.contains(id)));
        assert!(cal.item(&master).is_none());
    }

    #[test]
    fn date_format_has_seven_digits() {
        let t = DateTime::parse_from_rfc3339("2026-12-09T20:30:00.123456789Z")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(graph_local(t), "2026-12-09T20:30:00.1234567");
    }
}
