//! Persistent state: mailboxes with their delta cursors and schedule, events, sync history.
//! A page of changes and the link after it commit in one transaction.
//!
//! Two backends behind one type: SQLite for a single instance, PostgreSQL for replicas sharing
//! one database. [`Store`] is an enum over them rather than a trait object: an `async fn` trait
//! is not object-safe without boxing every call, the callers need one cloneable concrete type,
//! and each delegating method calls the same-named method on both backends, so a backend that
//! drifts from the interface fails to compile.

pub mod contract;
mod mailbox_list;
mod migrations;
mod postgres;
mod replicas;
mod retired;
mod sqlite;
mod subscriptions;
mod summaries;
mod writes;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

pub use contract::{
    Lifecycle, MailboxPages, MailboxStore, MailboxSummaries, ReplicaStore, RetiredStore,
    RoundStore, SubscriptionStore, WriteStore,
};
pub use postgres::PgStore;
pub use replicas::ReplicaRecord;
pub use retired::RetiredSubscription;
pub use sqlite::SqliteStore;
pub use subscriptions::{
    SubscriptionCounts, SubscriptionDue, SubscriptionRecord, SubscriptionSaved,
};
pub use summaries::{ListedMailbox, TenantSummary, WORST_FIRST};
pub use writes::{
    Enqueued, EventLink, NewWrite, PendingWrite, WriteCounts, WriteOp, WriteRecord, WriteResult,
    WriteState,
};

use crate::graph::model::RejectedItem;
use crate::graph::{DeltaItem, Event, PageLink, Window};

/// A row's integer column as a count (never negative), on either backend.
pub(crate) fn count_of<R>(row: &R, column: &str) -> Result<u64, StoreError>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(row.try_get::<i64, _>(column)?.max(0) as u64)
}

/// The store the service runs on, chosen by the scheme of `store.url`.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Which database a store URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sqlite:...` or `postgres://` / `postgresql://`; anything else is `None`.
    pub fn of_url(url: &str) -> Option<Self> {
        let url = url.trim();
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The columns a [`MailboxRecord`] is read from. Named, never `*`: a statement prepared
/// against a table that another connection (or a newer calsync's migration) has since widened
/// would otherwise return columns the reader does not expect. `writes_queued` is one probe of
/// the partial index of queued writes: a claim tells the job whether it has writes to deliver,
/// so an idle job does not look them up.
macro_rules! mailbox_columns {
    () => {
        "id, tenant, user_id, source, enabled, window_start, window_end, delta_link, next_link, \
         round_id, round_full, last_success_at, last_attempt_at, last_error, last_error_at, \
         last_request_id, consecutive_failures, next_run_at, lease_owner, lease_until, \
         created_at, sync_requested_at, fresh_rounds_forced, \
         EXISTS (SELECT 1 FROM writes w WHERE w.mailbox_id = mailboxes.id \
             AND w.state = 'queued') AS writes_queued"
    };
}
pub(crate) use mailbox_columns;

/// The columns an [`Event`] is read back from (see [`mailbox_columns`]).
macro_rules! event_columns {
    () => {
        "event_id, ical_uid, change_key, etag, last_modified, subject, start_utc, end_utc, \
         start_date, end_date, is_all_day, is_cancelled, show_as, sensitivity, event_type, \
         series_master_id, organizer_name, organizer_address, attendees, location, categories, \
         web_link, raw"
    };
}
pub(crate) use event_columns;

/// The `next_run_at` a sync request, a change notification or an accepted write sets, with the
/// time of the request as parameter 2: now, unless the mailbox is due sooner, and never before
/// a wait Graph imposed (`hold_until`, which `finish_job` keeps).
macro_rules! requested_next_run {
    (sqlite) => {
        "CASE WHEN hold_until IS NULL THEN MIN(next_run_at, ?2)
             ELSE MAX(MIN(next_run_at, ?2), hold_until) END"
    };
    (postgres) => {
        "CASE WHEN hold_until IS NULL THEN LEAST(next_run_at, $2)
             ELSE GREATEST(LEAST(next_run_at, $2), hold_until) END"
    };
}
pub(crate) use requested_next_run;

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Sqlite($store) => $call,
            Store::Postgres($store) => $call,
        }
    };
}

impl Store {
    /// Opens the store at `url`: `sqlite://PATH` (created if missing) or `postgres://...`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        match Backend::of_url(url) {
            Some(Backend::Sqlite) => Ok(Self::Sqlite(
                SqliteStore::connect(url, max_connections).await?,
            )),
            Some(Backend::Postgres) => Ok(Self::Postgres(
                PgStore::connect(url, max_connections).await?,
            )),
            None => Err(StoreError::UnsupportedUrl),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the backend's pending migrations (embedded in the binary). Safe to run from
    /// several replicas at once: sqlx's migrator holds a lock while it runs.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.migrate().await)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.ping().await)
    }

    /// Closes the connections gracefully (waits for those in use to be returned).
    pub async fn close(&self) {
        delegate!(self, s => s.close().await)
    }

    /// Releases every lease at start, on SQLite only: a SQLite file has one process working on
    /// it, so leases still held are a dead process's (and so are rows in the replica registry).
    /// On PostgreSQL other replicas hold live leases, so nothing is released and a dead
    /// replica's leases and row simply run out (one lease period); `PgStore` has no such method
    /// on purpose.
    pub async fn release_stale_leases(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite(s) => s.release_stale_leases().await,
            Self::Postgres(_) => Ok(0),
        }
    }

    /// Makes the configured mailboxes exactly the enabled config-sourced ones: new ones are
    /// added (due now), removed ones disabled (their events stay until deleted by an operator).
    pub async fn sync_config_mailboxes(
        &self,
        mailboxes: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.sync_config_mailboxes(mailboxes, now).await)
    }

    /// Due, unleased mailboxes, at most `per_tenant` of each tenant: those with a sync request
    /// first, then oldest due first. The dispatcher picks among them fairly and claims with
    /// [`claim`](Self::claim).
    pub async fn due_candidates(
        &self,
        now: DateTime<Utc>,
        per_tenant: u32,
    ) -> Result<Vec<DueMailbox>, StoreError> {
        delegate!(self, s => s.due_candidates(now, per_tenant).await)
    }

    /// Leases one mailbox to `owner` until `now + lease_for`, if no live lease is held on it
    /// (and, with `only_if_due`, if it is enabled and due), in one conditional UPDATE: of
    /// several workers or replicas claiming at once, exactly one gets it. `None` when someone
    /// else has it. A pending sync request is served by the claimed job and cleared here, so
    /// one made from now on is a new request that [`finish_job`](Self::finish_job) keeps.
    pub async fn claim(
        &self,
        id: MailboxId,
        owner: &str,
        now: DateTime<Utc>,
        lease_for: Duration,
        only_if_due: bool,
    ) -> Result<Option<MailboxRecord>, StoreError> {
        delegate!(self, s => s.claim(id, owner, now, lease_for, only_if_due).await)
    }

    /// [`claim`](Self::claim) for several mailboxes in one statement: each of `ids` still free
    /// (and due, with `only_if_due`) is leased to its own job, `owner_prefix` followed by its
    /// id. Returns the mailboxes claimed.
    pub async fn claim_many(
        &self,
        ids: &[MailboxId],
        owner_prefix: &str,
        now: DateTime<Utc>,
        lease_for: Duration,
        only_if_due: bool,
    ) -> Result<Vec<MailboxRecord>, StoreError> {
        delegate!(self, s => s.claim_many(ids, owner_prefix, now, lease_for, only_if_due).await)
    }

    /// Extends a lease still held by its owner; `false` when it was lost.
    pub async fn renew_lease(
        &self,
        lease: &Lease,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.renew_lease(lease, until).await)
    }

    /// Begins a full round over `window`: the old delta state is dropped and events not seen
    /// by the time the round completes are deleted then. Returns the new round id.
    pub async fn start_full_round(
        &self,
        lease: &Lease,
        window: &Window,
    ) -> Result<i64, StoreError> {
        delegate!(self, s => s.start_full_round(lease, window).await)
    }

    /// Applies one page and moves the cursor past it, atomically, only while `lease` is held
    /// and the round is `cursor.round_id` ([`StoreError::LeaseLost`] otherwise, nothing
    /// written). The page's series masters are written first (a changed one re-fills every
    /// stored occurrence of its series), series Graph no longer has are deleted, then the
    /// items in the page's order. With a deltaLink that ends a full round, events the round did
    /// not return are deleted (reconciliation), and masters no stored event belongs to.
    pub async fn apply_page(
        &self,
        lease: &Lease,
        cursor: &Cursor,
        page: PageWrite<'_>,
        link: &PageLink,
        now: DateTime<Utc>,
    ) -> Result<PageApplied, StoreError> {
        delegate!(self, s => s.apply_page(lease, cursor, page, link, now).await)
    }

    /// Counts a page that failed the same way at the same link (`signature`) once more; at
    /// `limit` in a row the mailbox's cursor is reset so its next job starts a fresh round (and
    /// `fresh_rounds_forced` counts it). Returns the count and whether the cursor was reset.
    pub async fn note_page_failure(
        &self,
        lease: &Lease,
        signature: &str,
        limit: u32,
    ) -> Result<(u32, bool), StoreError> {
        delegate!(self, s => s.note_page_failure(lease, signature, limit).await)
    }

    /// A mailbox's quarantined items, most recently seen first, at most `limit`.
    pub async fn quarantined(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<QuarantinedItem>, StoreError> {
        delegate!(self, s => s.quarantined(mailbox, limit).await)
    }

    /// The stored series masters of `mailbox` among `ids`, by id.
    pub async fn series_masters(
        &self,
        mailbox: MailboxId,
        ids: &[&str],
    ) -> Result<HashMap<String, StoredMaster>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        delegate!(self, s => s.series_masters(mailbox, ids).await)
    }

    /// Ends a job: releases the lease, sets the next run and the mailbox's last success or
    /// error, moves the cursor to the deltaLink of a round that ended on an empty page
    /// ([`JobRecord::round_end`]), and appends to the sync history (keeping
    /// [`RUNS_KEPT_PER_MAILBOX`]). The mailbox's row, cursor included, is written only while
    /// `lease` is held (and the cursor only in its round). A sync
    /// request made before the job was claimed was served by it (the claim cleared it); one
    /// made while it ran is still set, and keeps the mailbox due at once: the job may have read
    /// the changed page before the change.
    pub async fn finish_job(&self, lease: &Lease, job: &JobRecord) -> Result<(), StoreError> {
        delegate!(self, s => s.finish_job(lease, job).await)
    }

    /// The enabled mailboxes, by tenant and user.
    pub async fn mailboxes(&self) -> Result<Vec<MailboxRecord>, StoreError> {
        delegate!(self, s => s.mailboxes().await)
    }

    /// The enabled mailboxes' ids, tenants and users, by tenant and user: [`mailboxes`]
    /// without reading (and copying) each one's cursor and state.
    ///
    /// [`mailboxes`]: Self::mailboxes
    pub async fn mailbox_keys(&self) -> Result<Vec<MailboxKey>, StoreError> {
        delegate!(self, s => s.mailbox_keys().await)
    }

    pub async fn mailbox(
        &self,
        tenant: &str,
        user_id: &str,
    ) -> Result<Option<MailboxRecord>, StoreError> {
        delegate!(self, s => s.mailbox(tenant, user_id).await)
    }

    /// A mailbox by id, enabled or not.
    pub async fn mailbox_by_id(&self, id: MailboxId) -> Result<Option<MailboxRecord>, StoreError> {
        delegate!(self, s => s.mailbox_by_id(id).await)
    }

    /// Registers a mailbox at run time (source `api`, which a config reload does not
    /// disable): added due now, or re-enabled (due now) if it was disabled. Returns the record
    /// and whether it was added.
    pub async fn register_mailbox(
        &self,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(MailboxRecord, bool), StoreError> {
        delegate!(self, s => s.register_mailbox(tenant, user_id, now).await)
    }

    /// Deletes a mailbox with its events and history; a job running on it has its next write
    /// refused. A config-seeded mailbox comes back at the next start unless it leaves the
    /// config. Returns whether it existed.
    pub async fn remove_mailbox(&self, id: MailboxId) -> Result<bool, StoreError> {
        delegate!(self, s => s.remove_mailbox(id).await)
    }

    /// Asks for an immediate sync of an enabled mailbox: it becomes due now and is dispatched
    /// ahead of periodic work. `Some(true)` when queued, `Some(false)` when a request no job
    /// has claimed yet is already pending (deduplicated: that job serves both), `None` when
    /// there is no such enabled mailbox.
    pub async fn request_sync(
        &self,
        id: MailboxId,
        now: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError> {
        delegate!(self, s => s.request_sync(id, now).await)
    }

    /// A mailbox's events, by start.
    pub async fn events(&self, mailbox: MailboxId) -> Result<Vec<Event>, StoreError> {
        delegate!(self, s => s.events(mailbox).await)
    }

    /// A mailbox's events that overlap `[start, end)` (an instant event at `start` included),
    /// by start.
    pub async fn events_between(
        &self,
        mailbox: MailboxId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Event>, StoreError> {
        delegate!(self, s => s.events_between(mailbox, start, end).await)
    }

    /// One stored event of a mailbox, by Graph id.
    pub async fn event_by_id(
        &self,
        mailbox: MailboxId,
        event_id: &str,
    ) -> Result<Option<Event>, StoreError> {
        delegate!(self, s => s.event_by_id(mailbox, event_id).await)
    }

    /// Events held per mailbox.
    pub async fn event_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError> {
        delegate!(self, s => s.event_counts().await)
    }

    /// A mailbox's latest sync runs, newest first.
    pub async fn runs(&self, mailbox: MailboxId, limit: u32) -> Result<Vec<SyncRun>, StoreError> {
        delegate!(self, s => s.runs(mailbox, limit).await)
    }
}

pub type MailboxId = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the store holds migration {version}, which this calsync does not have (its newest is \
         {latest}): a newer calsync has migrated it. Run that release or a later one; to run \
         this one, see README.md, \"Rolling back a release\""
    )]
    NewerStore { version: i64, latest: i64 },
    #[error(
        "the store's migration {version} is not this calsync's migration {version}: a build with \
         other text for it has migrated the store. Run that build; see README.md, \"Rolling back \
         a release\""
    )]
    ChangedMigration { version: i64 },
    #[error("mailbox {0} is no longer leased by this worker; its write was refused")]
    LeaseLost(MailboxId),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("the write was not made: {0}")]
    Interrupted(&'static str),
    #[error("store.url must start with sqlite:, postgres:// or postgresql://")]
    UnsupportedUrl,
}

/// What one page writes: its events and removals, and what it learnt of recurring series.
#[derive(Clone, Debug, Default)]
pub struct PageWrite<'a> {
    /// Complete events to upsert (occurrences already filled in) and removals, in page order.
    /// Owned, so that a backend can move the events' text into its statements instead of
    /// copying it (SQLite's driver copies every borrowed value once more).
    pub items: Vec<DeltaItem>,
    /// Series masters met in this round (in the page, or fetched for its occurrences).
    pub masters: &'a [MasterWrite],
    /// Series Graph no longer has (its master answered 404): the master and every event of
    /// the series are deleted.
    pub gone_series: &'a [String],
    /// The delta round the masters were seen or fetched in (see [`Cursor::round_marker`]).
    pub round: &'a str,
    /// Items that could not be understood: kept in quarantine, the rest of the page applied.
    pub quarantined: &'a [RejectedItem],
}

impl<'a> PageWrite<'a> {
    /// A page of events and removals only.
    pub fn items(items: impl Into<Vec<DeltaItem>>) -> Self {
        Self {
            items: items.into(),
            ..Self::default()
        }
    }

    /// Nothing but the cursor to write (an idle round's page).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
            && self.masters.is_empty()
            && self.gone_series.is_empty()
            && self.quarantined.is_empty()
    }
}

/// A series master to keep.
#[derive(Clone, Debug)]
pub struct MasterWrite {
    pub master: Event,
    /// Its `changeKey` differs from the stored one (or none was stored): every stored
    /// occurrence of the series takes its fields again.
    pub refill_occurrences: bool,
}

impl MasterWrite {
    /// The last write of each master in `writes` (its id as `key` gives it), and of those the
    /// last that refills its occurrences: what applying the writes one by one would leave.
    pub(crate) fn last_of_each<'w, K: Eq + std::hash::Hash + Clone>(
        writes: &'w [MasterWrite],
        key: impl Fn(&'w MasterWrite) -> K,
    ) -> (Vec<&'w MasterWrite>, Vec<&'w MasterWrite>) {
        let last = |refills_only: bool| -> Vec<&'w MasterWrite> {
            let kept = writes
                .iter()
                .filter(|w| !refills_only || w.refill_occurrences);
            last_of_each_key(kept, &key)
                .into_iter()
                .map(|(_, write, _)| write)
                .collect()
        };
        (last(false), last(true))
    }
}

/// The last of `items` for each key, in order of the key's first appearance, with the key and
/// how many items had it: what applying the items one by one would leave, for a backend that
/// writes them all in one statement (which may touch a row only once).
pub(crate) fn last_of_each_key<'a, T, K: Eq + std::hash::Hash + Clone>(
    items: impl IntoIterator<Item = &'a T>,
    key: impl Fn(&'a T) -> K,
) -> Vec<(K, &'a T, usize)> {
    let mut at: foldhash::HashMap<K, usize> = foldhash::HashMapExt::new();
    let mut out: Vec<(K, &'a T, usize)> = Vec::new();
    for item in items {
        let k = key(item);
        match at.get(&k) {
            Some(&i) => {
                out[i].1 = item;
                out[i].2 += 1;
            }
            None => {
                at.insert(k.clone(), out.len());
                out.push((k, item, 1));
            }
        }
    }
    out
}

/// An item of a delta page that could not be understood, set aside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuarantinedItem {
    /// The Graph id, or `sha256:<hex>` of the item when it has none.
    pub item_key: String,
    pub item_id: Option<String>,
    pub reason: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub times_seen: u64,
    /// The item as Graph sent it.
    pub raw: String,
}

/// A stored series master.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMaster {
    pub master_id: String,
    pub change_key: Option<String>,
    /// The round that last saw or fetched it.
    pub checked_round: String,
    /// The master as Graph sent it.
    pub raw: String,
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

impl Cursor {
    /// Names the delta round in progress: the full round's id and the deltaLink it continues
    /// from change with every round, and neither changes within one (a round split over several
    /// jobs keeps both), so a master fetched once in a round is not fetched again in it.
    pub fn round_marker(&self) -> String {
        // A stable digest: markers outlive the process (and its Rust version).
        let link = self.delta_link.as_deref().unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, link.as_bytes());
        format!("{}:{}", self.round_id, crate::hex(&digest.as_ref()[..8]))
    }
}

#[derive(Clone, Debug)]
pub struct MailboxRecord {
    pub id: MailboxId,
    pub tenant: String,
    pub user_id: String,
    /// `config` (seeded from the config file) or `api` (registered at run time).
    pub source: String,
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
    /// An immediate sync was asked for at this time and no job has started since.
    pub sync_requested_at: Option<DateTime<Utc>>,
    /// Fresh rounds started because the same page kept failing the same way.
    pub fresh_rounds_forced: u64,
    /// The application had writes queued for the mailbox when the record was read. A claimed
    /// record's is what its job delivers; a write queued after the claim also asks for a sync
    /// (see [`Store::enqueue_write`]), so the next job delivers it.
    pub writes_queued: bool,
}

impl MailboxRecord {
    /// Since when the mailbox has been behind: its last success, or its registration.
    pub fn behind_since(&self) -> DateTime<Utc> {
        self.last_success_at.unwrap_or(self.created_at)
    }

    /// Whole seconds behind at `now` (never negative): what health and the admin API report.
    pub fn lag_seconds(&self, now: DateTime<Utc>) -> i64 {
        (now - self.behind_since()).num_seconds().max(0)
    }

    /// A job holds the mailbox's lease at `now` (on this replica or another).
    pub fn is_running(&self, now: DateTime<Utc>) -> bool {
        self.lease_until.is_some_and(|until| until > now)
    }
}

/// Which mailbox a row is, without its state: what a pass over every mailbox needs to claim
/// them (the claim returns the full record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxKey {
    pub id: MailboxId,
    pub tenant: String,
    pub user_id: String,
}

/// A mailbox waiting for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueMailbox {
    pub id: MailboxId,
    pub tenant: String,
    pub next_run_at: DateTime<Utc>,
    /// An immediate sync was asked for: dispatched ahead of periodic work.
    pub requested: bool,
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
    /// Whether the job adds to its mailbox's consecutive failures. A deferral (open breaker,
    /// Retry-After past the deadline) is not a failure of the mailbox: its failure count stays,
    /// but the reason is shown.
    pub fn counts_as_failure(self) -> bool {
        matches!(self, Self::Failed | Self::DeadlineExceeded)
    }

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
    /// Set when Graph imposed the wait until `next_run_at` (Retry-After): no sync request,
    /// notification or write may bring the next run before it.
    pub hold_until: Option<DateTime<Utc>>,
    /// The job's round ended on an empty page: its deltaLink is written here, with the record.
    pub round_end: Option<RoundEnd>,
}

/// An incremental round that ended on an empty page (an idle round): nothing to write but the
/// cursor, so [`Store::finish_job`] writes it with the job's record instead of a page write of
/// its own, fenced like a page: only while the lease is held and the round is `round_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    pub round_id: i64,
    pub delta_link: String,
}

/// The fields of an event a user reads in Outlook, to compare what is stored with what Graph
/// holds (the demo's and the tests' ground-truth checks).
#[derive(Clone, Debug, PartialEq)]
pub struct UserView {
    pub change_key: Option<String>,
    pub subject: Option<String>,
    pub start_utc: DateTime<Utc>,
    pub end_utc: DateTime<Utc>,
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
    pub attendees: serde_json::Value,
    pub location: Option<String>,
    pub categories: Vec<String>,
}

impl UserView {
    /// The fields a user reads of an event, stored or as Graph represents it in full.
    pub fn of_event(e: &Event) -> Self {
        Self {
            change_key: e.change_key.clone(),
            subject: e.subject.clone(),
            start_utc: e.start_utc,
            end_utc: e.end_utc,
            start_date: e.start_date,
            end_date: e.end_date,
            is_all_day: e.is_all_day,
            is_cancelled: e.is_cancelled,
            show_as: e.show_as.clone(),
            sensitivity: e.sensitivity.clone(),
            event_type: e.event_type.clone(),
            series_master_id: e.series_master_id.clone(),
            organizer_name: e.organizer_name.clone(),
            organizer_address: e.organizer_address.clone(),
            attendees: e.attendees.to_value(),
            location: e.location.clone(),
            categories: e.categories.clone(),
        }
    }
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

/// Applies the pending migrations of the store at `url` and closes it (`calsync migrate`).
pub async fn migrate(url: &str) -> Result<Backend, StoreError> {
    let store = Store::connect(url, 1).await?;
    let migrated = store.migrate().await;
    store.close().await;
    migrated.map(|()| store.backend())
}

/// How many sync runs are kept per mailbox.
pub const RUNS_KEPT_PER_MAILBOX: i64 = 50;

#[cfg(test)]
mod tests {
    use super::*;

    /// Applied one by one, the writes leave each master as its last write and its occurrences
    /// as its last write that refills them (a later write that does not refill leaves them).
    #[test]
    fn master_writes_keep_the_last_of_each_id_and_its_last_refill() {
        let write = |id: &str, subject: &str, refill: bool| MasterWrite {
            master: crate::graph::model::parse_event_text(
                &serde_json::json!({
                    "id": id,
                    "subject": subject,
                    "type": "seriesMaster",
                    "start": {"dateTime": "2026-12-01T10:00:00", "timeZone": "UTC"},
                    "end": {"dateTime": "2026-12-01T11:00:00", "timeZone": "UTC"},
                })
                .to_string(),
            )
            .expect("an event"),
            refill_occurrences: refill,
        };
        let writes = [
            write("a", "a1", true),
            write("b", "b1", false),
            write("a", "a2", false),
            write("c", "c1", true),
            write("b", "b2", true),
            write("c", "c2", true),
        ];
        let (masters, refills) = MasterWrite::last_of_each(&writes, |w| w.master.id.as_str());
        let subjects = |ws: Vec<&MasterWrite>| -> Vec<String> {
            ws.iter().filter_map(|w| w.master.subject.clone()).collect()
        };
        assert_eq!(subjects(masters), ["a2", "b2", "c2"]);
        assert_eq!(subjects(refills), ["a1", "c2", "b2"]);
    }
}
