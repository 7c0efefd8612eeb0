//! The outbox of two-way sync (issue 14): the application's creates, updates and cancels of its
//! appointments, stored durably when accepted and delivered to Graph in order by the mailbox's
//! sync job, which records each result under its lease. An appointment's link to its Graph event
//! (`event_links`) keeps the `transactionId` its create carries, so a create sent twice makes one
//! event.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::contract::*;
use super::{Lease, MailboxId, Store, StoreError};

/// What a write does to its appointment's Graph event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteOp {
    Create,
    Update,
    Cancel,
}

impl WriteOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Cancel => "cancel",
        }
    }

    /// `create`, `update` or `cancel`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Self::Create),
            "update" => Some(Self::Update),
            "cancel" => Some(Self::Cancel),
            _ => None,
        }
    }
}

/// Where a write stands: queued until delivery ends it one of the three other ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteState {
    Queued,
    Delivered,
    Failed,
    Conflict,
}

impl WriteState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Conflict => "conflict",
        }
    }

    /// `queued`, `delivered`, `failed` or `conflict`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "delivered" => Some(Self::Delivered),
            "failed" => Some(Self::Failed),
            "conflict" => Some(Self::Conflict),
            _ => None,
        }
    }

    /// Delivery is over for it: its body is no longer kept.
    pub fn is_final(self) -> bool {
        self != Self::Queued
    }
}

/// A write the application asks for, to be stored and queued.
#[derive(Clone, Debug)]
pub struct NewWrite<'a> {
    /// The write's id (a uuid chosen by the caller), shown by the API.
    pub id: &'a str,
    pub mailbox: MailboxId,
    /// The application's id of the appointment.
    pub external_id: &'a str,
    pub op: WriteOp,
    pub idempotency_key: &'a str,
    /// A digest of the request: the same key with another request is refused.
    pub request_hash: &'a str,
    /// JSON text of what to write (personal data).
    pub body: &'a str,
    /// Graph `transactionId` of a create (becomes its link's); unused by updates and cancels.
    pub transaction_id: &'a str,
    pub now: DateTime<Utc>,
}

/// What [`enqueue_write`](Store::enqueue_write) did.
#[derive(Clone, Debug)]
pub enum Enqueued {
    /// Stored and queued; the mailbox was asked to sync.
    New(WriteRecord),
    /// The same mailbox, idempotency key and request hash as an earlier write: that write,
    /// nothing stored.
    Replay(WriteRecord),
    /// The key was used before with another request: that write, nothing stored.
    KeyReused(WriteRecord),
    NoMailbox,
    /// The mailbox exists but is disabled.
    MailboxDisabled,
    /// A create for an appointment that already has a link (cancelled or not).
    EventExists,
    /// An update or cancel for an appointment never created.
    NoSuchEvent,
    /// An update or cancel after the appointment's cancel was queued or delivered.
    EventCancelled,
}

/// A write as the API shows it (without its body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WriteRecord {
    pub id: String,
    pub mailbox_id: MailboxId,
    pub external_id: String,
    pub op: WriteOp,
    pub state: WriteState,
    /// Tries that failed and were left for a later job.
    pub attempts: u32,
    pub graph_event_id: Option<String>,
    pub last_error: Option<String>,
    /// Why Outlook's version was kept (state `conflict`).
    pub conflict: Option<String>,
    /// What delivery remarked on a delivered write (e.g. the event was already gone).
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A queued write with its appointment's link, for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingWrite {
    pub id: String,
    /// The delivery order.
    pub seq: i64,
    pub external_id: String,
    pub op: WriteOp,
    pub body: String,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub transaction_id: String,
    pub graph_event_id: Option<String>,
    pub change_key: Option<String>,
    pub etag: Option<String>,
    /// The event's content (the properties calsync writes) as calsync last wrote or saw it.
    pub fingerprint: Option<String>,
}

/// The result of delivering one write, as [`record_write`](Store::record_write) stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// Graph has it. For a create or update: the event's id, changeKey and etag (stored on the
    /// link and the write). For a cancel: the event id as known, no changeKey or etag; the
    /// link stays cancelled.
    Delivered {
        graph_event_id: Option<String>,
        change_key: Option<String>,
        etag: Option<String>,
        /// The event's content as Graph answered it (kept on the link).
        fingerprint: Option<String>,
        note: Option<String>,
    },
    /// The event was changed in Outlook and Outlook wins: state `conflict` with `reason`; the
    /// link takes the fresh changeKey and etag. A cancel that ends so leaves the event standing,
    /// so its link is no longer cancelled.
    Conflict {
        reason: String,
        change_key: Option<String>,
        etag: Option<String>,
        fingerprint: Option<String>,
    },
    /// Given up for good (Graph refused it): state `failed`. A failed cancel leaves the event
    /// standing, so its link is no longer cancelled.
    Failed { reason: String },
    /// To be tried again by a later job: `attempts + 1`, still queued.
    Retry { reason: String },
}

/// An application appointment and the Graph event it became.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventLink {
    pub mailbox_id: MailboxId,
    pub external_id: String,
    pub transaction_id: String,
    /// Set once the create is delivered.
    pub graph_event_id: Option<String>,
    /// The last changeKey and etag calsync wrote or saw.
    pub change_key: Option<String>,
    pub etag: Option<String>,
    /// Its cancel is queued or delivered: no further writes are accepted for it.
    pub cancelled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A tenant's writes not delivered, for metrics and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WriteCounts {
    pub queued: u64,
    pub oldest_queued_at: Option<DateTime<Utc>>,
    pub failed: u64,
    pub conflict: u64,
}

/// What recording one result changes, the same on both backends. `None` keeps a column.
pub(super) struct Recorded<'a> {
    pub state: WriteState,
    /// Added to `attempts`.
    pub attempts: i32,
    pub last_error: Option<&'a str>,
    pub conflict: Option<&'a str>,
    pub note: Option<&'a str>,
    /// For the link, then the write (which takes the link's when it is `None`).
    pub graph_event_id: Option<&'a str>,
    pub change_key: Option<&'a str>,
    pub etag: Option<&'a str>,
    pub fingerprint: Option<&'a str>,
    pub cancelled: Option<bool>,
}

impl<'a> Recorded<'a> {
    pub fn of(result: &'a WriteResult, op: WriteOp) -> Self {
        let kept = Self {
            state: WriteState::Queued,
            attempts: 0,
            last_error: None,
            conflict: None,
            note: None,
            graph_event_id: None,
            change_key: None,
            etag: None,
            fingerprint: None,
            cancelled: None,
        };
        // A cancel that did not happen leaves the event in Outlook: the application may write
        // to it again (and cancel it again).
        let cancel_undone = (op == WriteOp::Cancel).then_some(false);
        match result {
            WriteResult::Delivered {
                graph_event_id,
                change_key,
                etag,
                fingerprint,
                note,
            } => Self {
                state: WriteState::Delivered,
                note: note.as_deref(),
                graph_event_id: graph_event_id.as_deref(),
                change_key: change_key.as_deref(),
                etag: etag.as_deref(),
                fingerprint: fingerprint.as_deref(),
                cancelled: (op == WriteOp::Cancel).then_some(true),
                ..kept
            },
            WriteResult::Conflict {
                reason,
                change_key,
                etag,
                fingerprint,
            } => Self {
                state: WriteState::Conflict,
                conflict: Some(reason),
                change_key: change_key.as_deref(),
                etag: etag.as_deref(),
                fingerprint: fingerprint.as_deref(),
                cancelled: cancel_undone,
                ..kept
            },
            WriteResult::Failed { reason } => Self {
                state: WriteState::Failed,
                last_error: Some(reason),
                cancelled: cancel_undone,
                ..kept
            },
            WriteResult::Retry { reason } => Self {
                attempts: 1,
                last_error: Some(reason),
                ..kept
            },
        }
    }

    /// The link has something to take.
    pub fn changes_link(&self) -> bool {
        self.graph_event_id.is_some()
            || self.change_key.is_some()
            || self.etag.is_some()
            || self.fingerprint.is_some()
            || self.cancelled.is_some()
    }
}

/// A reason as stored: at most 1000 characters, without NULs (PostgreSQL text holds none).
pub(super) fn reason_text(reason: Option<&str>) -> Option<String> {
    reason.map(|r| r.chars().filter(|c| *c != '\0').take(1000).collect())
}

pub(super) fn op_of(text: &str) -> Result<WriteOp, StoreError> {
    WriteOp::parse(text).ok_or_else(|| StoreError::Corrupt(format!("write op `{text}`")))
}

pub(super) fn state_of(text: &str) -> Result<WriteState, StoreError> {
    WriteState::parse(text).ok_or_else(|| StoreError::Corrupt(format!("write state `{text}`")))
}

pub(super) fn attempts_of(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// The columns a [`WriteRecord`] is read from (see `mailbox_columns`).
macro_rules! write_columns {
    () => {
        "id, mailbox_id, external_id, op, state, attempts, graph_event_id, last_error, conflict, \
         note, created_at, updated_at, delivered_at"
    };
}
pub(crate) use write_columns;

impl Store {
    /// Stores a write and asks for a sync of its mailbox, in one transaction, after the
    /// idempotency and link checks (see [`Enqueued`]); a cancel marks its link cancelled at
    /// once. Concurrent calls with one idempotency key store one write; the others replay it.
    pub async fn enqueue_write(&self, write: &NewWrite<'_>) -> Result<Enqueued, StoreError> {
        match self {
            Store::Sqlite(s) => s.enqueue_write(write).await,
            Store::Postgres(s) => s.enqueue_write(write).await,
        }
    }

    /// The mailbox's queued writes in delivery order with their links, at most `limit`.
    pub async fn pending_writes(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<PendingWrite>, StoreError> {
        match self {
            Store::Sqlite(s) => s.pending_writes(mailbox, limit).await,
            Store::Postgres(s) => s.pending_writes(mailbox, limit).await,
        }
    }

    /// Records the result of delivering a queued write of the leased mailbox, and what it
    /// teaches the link, only while `lease` is held ([`StoreError::LeaseLost`] otherwise,
    /// nothing written). A write that ends loses its body. No-op for a write not queued.
    pub async fn record_write(
        &self,
        lease: &Lease,
        write_id: &str,
        result: &WriteResult,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.record_write(lease, write_id, result, now).await,
            Store::Postgres(s) => s.record_write(lease, write_id, result, now).await,
        }
    }

    /// A write by its id.
    pub async fn write_by_id(&self, id: &str) -> Result<Option<WriteRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.write_by_id(id).await,
            Store::Postgres(s) => s.write_by_id(id).await,
        }
    }

    /// An appointment's link to its Graph event.
    pub async fn event_link(
        &self,
        mailbox: MailboxId,
        external_id: &str,
    ) -> Result<Option<EventLink>, StoreError> {
        match self {
            Store::Sqlite(s) => s.event_link(mailbox, external_id).await,
            Store::Postgres(s) => s.event_link(mailbox, external_id).await,
        }
    }

    /// Deletes the writes that ended (delivered, failed, conflict) before `before`; queued ones
    /// and the appointments' links stay. How many went.
    pub async fn prune_writes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.prune_writes(before).await,
            Store::Postgres(s) => s.prune_writes(before).await,
        }
    }

    /// Writes not delivered per tenant (tenants with none are absent).
    pub async fn write_counts(&self) -> Result<HashMap<String, WriteCounts>, StoreError> {
        match self {
            Store::Sqlite(s) => s.write_counts().await,
            Store::Postgres(s) => s.write_counts().await,
        }
    }

    /// An appointment's writes, newest first, at most `limit`.
    pub async fn writes_of_event(
        &self,
        mailbox: MailboxId,
        external_id: &str,
        limit: u32,
    ) -> Result<Vec<WriteRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.writes_of_event(mailbox, external_id, limit).await,
            Store::Postgres(s) => s.writes_of_event(mailbox, external_id, limit).await,
        }
    }
}
