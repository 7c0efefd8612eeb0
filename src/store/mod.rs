//! Persistent state: mailboxes with their delta cursors and schedule, events, sync history.
//! A page of changes and the link after it commit in one transaction.

mod migrations;
mod sqlite;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

pub use sqlite::SqliteStore;

use crate::graph::{PageLink, Window};

/// The store the service runs on. (PostgreSQL joins SQLite behind this name.)
pub type Store = SqliteStore;

pub type MailboxId = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("mailbox {0} is no longer leased by this worker; its write was refused")]
    LeaseLost(MailboxId),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
}

/// Where a mailbox's sync stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub round_id: i64,
    /// The round in progress (or next) is a full one that reconciles at its end.
    pub full: bool,
    pub window: Option<Window>,
    pub next_link: Option<String>,
    pub delta_link: Option<String>,
}

#[derive(Clone, Debug)]
pub struct MailboxRecord {
    pub id: MailboxId,
    pub tenant: String,
    pub user_id: String,
    pub enabled: bool,
    pub cursor: Cursor,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_request_id: Option<String>,
    pub consecutive_failures: u32,
    pub next_run_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A mailbox waiting for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueMailbox {
    pub id: MailboxId,
    pub tenant: String,
    pub next_run_at: DateTime<Utc>,
}

/// A lease on a mailbox: writes are accepted only while it is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub mailbox: MailboxId,
    pub owner: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageApplied {
    pub upserted: u64,
    pub deleted: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Ok,
    Failed,
    DeadlineExceeded,
    /// Not run (or stopped early) because a breaker was open, Graph asked to wait past the
    /// job's deadline, or a rate limit had no permit before it: rescheduled for then.
    Deferred,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Deferred => "deferred",
        }
    }
}

/// The end of a job, written with the lease released in one statement.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: RunOutcome,
    pub full_round: bool,
    pub pages: u64,
    pub upserted: u64,
    pub deleted: u64,
    pub error: Option<String>,
    pub request_id: Option<String>,
    pub next_run_at: DateTime<Utc>,
}

/// An event row as the main app reads it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredEvent {
    pub event_id: String,
    pub ical_uid: Option<String>,
    pub change_key: Option<String>,
    pub subject: Option<String>,
    pub start_utc: DateTime<Utc>,
    pub end_utc: DateTime<Utc>,
    pub start_date: Option<NaiveDate>,
    pub end_date: Option<NaiveDate>,
    pub is_all_day: bool,
    pub is_cancelled: bool,
    pub show_as: Option<String>,
    pub event_type: Option<String>,
    pub series_master_id: Option<String>,
    pub organizer_address: Option<String>,
    pub location: Option<String>,
    pub raw: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SyncRun {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: String,
    pub full_round: bool,
    pub pages: i64,
    pub upserted: i64,
    pub deleted: i64,
    pub error: Option<String>,
    pub request_id: Option<String>,
}

/// What a page's link means for the cursor.
pub(crate) fn link_parts(link: &PageLink) -> (Option<&str>, Option<&str>) {
    match link {
        PageLink::Next(next) => (Some(next.as_str()), None),
        PageLink::Delta(delta) => (None, Some(delta.as_str())),
    }
}

/// How many sync runs are kept per mailbox.
pub const RUNS_KEPT_PER_MAILBOX: i64 = 50;
