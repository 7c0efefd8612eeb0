//! One mailbox's calendar: the current events, an append-only change log that lets any old but
//! unexpired delta token be answered exactly, and deterministic generation and mutation.

use std::collections::{BTreeMap, HashSet};

use base64::Engine;
use chrono::{DateTime, Duration, DurationRound, Utc};
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
    pub attendees: Vec<(String, String)>,
    pub location: String,
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
            .map(|(name, address)| {
                json!({
                    "type": "required",
                    "status": {"response": "none", "time": "0001-01-01T00:00:00Z"},
                    "emailAddress": {"name": name, "address": address}
                })
            })
            .collect();
        json!({
            "@odata.type": "#microsoft.graph.event",
            "@odata.etag": format!("W/\"{}\"", self.change_key),
            "id": self.id,
            "createdDateTime": graph_utc(self.last_modified - Duration::days(3)),
            "lastModifiedDateTime": graph_utc(self.last_modified),
            "changeKey": self.change_key,
            "categories": [],
            "transactionId": null,
            "originalStartTimeZone": "UTC",
            "originalEndTimeZone": "UTC",
            "iCalUId": self.ical_uid,
            "reminderMinutesBeforeStart": 15,
            "isReminderOn": !self.is_all_day,
            "hasAttachments": false,
            "subject": self.subject,
            "bodyPreview": "",
            "importance": "normal",
            "sensitivity": self.sensitivity,
            "isAllDay": self.is_all_day,
            "isCancelled": self.is_cancelled,
            "isOrganizer": false,
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
            "responseStatus": {"response": "notResponded", "time": "0001-01-01T00:00:00Z"},
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
        })
    }
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
}

pub struct MailboxCalendar {
    pub address: String,
    events: BTreeMap<String, Event>,
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
            log: Vec::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed),
            range,
            counter: 0,
        };
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

    fn people(&mut self) -> ((String, String), Vec<(String, String)>) {
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
                (format!("Person {k}"), format!("person{k}@{domain}"))
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
        }
    }

    /// A weekly or daily series expanded into occurrences; a few become exceptions. The master
    /// itself is not listed because calendarView returns instances, not masters.
    fn add_series(&mut self, count: usize, now: DateTime<Utc>) {
        let master_id = self.new_id();
        let ical = self.new_uid();
        let first = self.random_start(false);
        let step = if self.rng.gen_bool(0.5) {
            Duration::days(1)
        } else {
            Duration::weeks(1)
        };
        let len = Duration::minutes(30 * self.rng.gen_range(1..=4));
        let subject = format!(
            "{} (recurring)",
            SUBJECTS[self.rng.gen_range(0..SUBJECTS.len())]
        );
        let (organizer, attendees) = self.people();
        for i in 0..count {
            let mut start = first + step * i as i32;
            let exception = self.rng.gen_range(0..10) == 0;
            if exception {
                start += Duration::hours(1);
            }
            let ev = Event {
                id: self.new_id(),
                ical_uid: ical.clone(),
                change_key: self.new_change_key(),
                last_modified: now,
                subject: subject.clone(),
                start,
                end: start + len,
                is_all_day: false,
                is_cancelled: false,
                show_as: "busy",
                sensitivity: "normal",
                kind: if exception {
                    EventType::Exception
                } else {
                    EventType::Occurrence
                },
                series_master_id: Some(master_id.clone()),
                organizer: organizer.clone(),
                attendees: attendees.clone(),
                location: "Teams".into(),
            };
            self.insert(ev);
        }
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
    pub fn read_page(
        &self,
        window: &Window,
        since: u64,
        upto: u64,
        offset: usize,
        page_size: usize,
    ) -> PageRead {
        let ids = self.changed_ids(since, upto);
        let mut items = Vec::new();
        let mut pos = offset.min(ids.len());
        while pos < ids.len() && items.len() < page_size {
            let id = ids[pos];
            pos += 1;
            match self.events.get(id) {
                Some(ev) if ev.overlaps(window) => {
                    items.push(DeltaItem::Present(ev.to_graph_json()));
                }
                _ if since == 0 => {}
                _ => items.push(DeltaItem::Removed(id.to_string())),
            }
        }
        let next_offset = (pos < ids.len()).then_some(pos);
        PageRead { items, next_offset }
    }

    /// Applies one random mutation and returns what it did.
    pub fn mutate(&mut self, now: DateTime<Utc>) -> Option<(MutationKind, String)> {
        let roll = self.rng.gen_range(0..100);
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
        let seq = self.next_seq();
        self.log.push((seq, id.to_string()));
        true
    }
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
            let p = cal.read_page(w, since, upto, offset, 7);
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
    }

    #[test]
    fn incremental_round_reports_exactly_the_changes() {
        let now = Utc::now();
        let w = window();
        let mut cal = MailboxCalendar::generate("u@t.example", 3, 1, 40, w, now);
        let initial = round(&cal, &w, 0);
        assert_eq!(initial.len(), cal.truth(Some(&w)).len());
        let mark = cal.current_seq();
        let mut touched = HashSet::new();
        for _ in 0..15 {
            if let Some((_, id)) = cal.mutate(now) {
                touched.insert(id);
            }
        }
        let inc = round(&cal, &w, mark);
        let ids: HashSet<String> = inc
            .iter()
            .map(|i| match i {
                DeltaItem::Present(v) => v["id"].as_str().unwrap_or_default().to_string(),
                DeltaItem::Removed(id) => id.clone(),
            })
            .collect();
        assert_eq!(ids, touched);
        assert!(round(&cal, &w, cal.current_seq()).is_empty());
    }

    #[test]
    fn date_format_has_seven_digits() {
        let t = DateTime::parse_from_rfc3339("2026-12-09T20:30:00.123456789Z")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(graph_local(t), "2026-12-09T20:30:00.1234567");
    }
}
