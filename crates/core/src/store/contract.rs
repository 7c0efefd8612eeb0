//! The store's contract, written down: one trait per subject, each implemented by both
//! backends ([`SqliteStore`](super::SqliteStore), [`PgStore`](super::PgStore)). The cloneable
//! [`Store`](super::Store) handle dispatches to the backend it wraps, so a backend that drifts
//! from the contract fails to compile. Every write of a job is fenced on its lease.
// Used with the two concrete backends only, whose futures are Send.
#![allow(async_fn_in_trait)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{
    Cursor, DueMailbox, JobRecord, Lease, MailboxId, MailboxKey, MailboxRecord, PageApplied,
    PageWrite, QuarantinedItem, ReplicaRecord, RetiredSubscription, StoreError, StoredMaster,
    SubscriptionDue, SubscriptionRecord, SubscriptionSaved, SyncRun,
};
use super::{Enqueued, EventLink, NewWrite, PendingWrite, WriteCounts, WriteRecord, WriteResult};
use crate::graph::{Event, PageLink, Window};

/// Opening and closing: the store's tables, its health.
pub trait Lifecycle {
    /// Applies the backend's pending migrations (embedded in the binary). Safe to run from
    /// several replicas at once: sqlx's migrator holds a lock while it runs.
    async fn migrate(&self) -> Result<(), StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the connections gracefully (waits for those in use to be returned).
    async fn close(&self);
}

/// Mailboxes: registration, due selection, leases, the end of a job, sync requests, history.
pub trait MailboxStore {
    /// Makes the configured mailboxes exactly the enabled config-sourced ones: new ones are
    /// added (due now), removed ones disabled (their events stay until deleted by an operator).
    async fn sync_config_mailboxes(
        &self,
        mailboxes: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Due, unleased mailboxes, at most `per_tenant` of each tenant: those with a sync request
    /// first, then oldest due first. The dispatcher picks among them fairly and claims with
    /// [`claim`](Self::claim).
    async fn due_candidates(
        &self,
        now: DateTime<Utc>,
        per_tenant: u32,
    ) -> Result<Vec<DueMailbox>, StoreError>;

    /// Leases one mailbox to `owner` until `now + lease_for`, if no live lease is held on it
    /// (and, with `only_if_due`, if it is enabled and due), in one conditional UPDATE: of
    /// several workers or replicas claiming at once, exactly one gets it. `None` when someone
    /// else has it. A pending sync request is served by the claimed job and cleared here, so
    /// one made from now on is a new request that [`finish_job`](Self::finish_job) keeps.
    async fn claim(
        &self,
        id: MailboxId,
        owner: &str,
        now: DateTime<Utc>,
        lease_for: Duration,
        only_if_due: bool,
    ) -> Result<Option<MailboxRecord>, StoreError>;

    /// [`claim`](Self::claim) for several mailboxes in one statement: each of `ids` that is
    /// free (and, with `only_if_due`, enabled and due) is leased to its own job, named
    /// `owner_prefix` followed by the mailbox's id. Returns the mailboxes claimed, in no
    /// particular order; the others are someone else's.
    async fn claim_many(
        &self,
        ids: &[MailboxId],
        owner_prefix: &str,
        now: DateTime<Utc>,
        lease_for: Duration,
        only_if_due: bool,
    ) -> Result<Vec<MailboxRecord>, StoreError>;

    /// Extends a lease still held by its owner; `false` when it was lost.
    async fn renew_lease(&self, lease: &Lease, until: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Ends a job: releases the lease, sets the next run and the mailbox's last success or
    /// error, and appends to the sync history (keeping [`RUNS_KEPT_PER_MAILBOX`]). A sync
    /// request made before the job was claimed was served by it (the claim cleared it); one
    /// made while it ran is still set, and keeps the mailbox due at once: the job may have read
    /// the changed page before the change.
    async fn finish_job(&self, lease: &Lease, job: &JobRecord) -> Result<(), StoreError>;

    /// The enabled mailboxes, by tenant and user.
    async fn mailboxes(&self) -> Result<Vec<MailboxRecord>, StoreError>;

    /// The same mailboxes in the same order as [`mailboxes`](Self::mailboxes), only which
    /// they are: `sync-once` lists every mailbox each pass and claims them, and the claim
    /// returns the full record.
    async fn mailbox_keys(&self) -> Result<Vec<MailboxKey>, StoreError>;

    async fn mailbox(
        &self,
        tenant: &str,
        user_id: &str,
    ) -> Result<Option<MailboxRecord>, StoreError>;

    /// A mailbox by id, enabled or not.
    async fn mailbox_by_id(&self, id: MailboxId) -> Result<Option<MailboxRecord>, StoreError>;

    /// Registers a mailbox at run time (source `api`, which a config reload does not
    /// disable): added due now, or re-enabled (due now) if it was disabled. Returns the record
    /// and whether it was added.
    async fn register_mailbox(
        &self,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(MailboxRecord, bool), StoreError>;

    /// Deletes a mailbox with its events and history; a job running on it has its next write
    /// refused. A config-seeded mailbox comes back at the next start unless it leaves the
    /// config. Returns whether it existed.
    async fn remove_mailbox(&self, id: MailboxId) -> Result<bool, StoreError>;

    /// Asks for an immediate sync of an enabled mailbox: it becomes due now and is dispatched
    /// ahead of periodic work. `Some(true)` when queued, `Some(false)` when a request no job
    /// has claimed yet is already pending (deduplicated: that job serves both), `None` when
    /// there is no such enabled mailbox.
    async fn request_sync(
        &self,
        id: MailboxId,
        now: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError>;

    /// A mailbox's latest sync runs, newest first.
    async fn runs(&self, mailbox: MailboxId, limit: u32) -> Result<Vec<SyncRun>, StoreError>;
}

/// Mailboxes a page at a time (the admin API's listing).
pub trait MailboxPages {
    /// Enabled mailboxes with an id above `after` (of `tenant` only, if given), by id, at most
    /// `limit`. One indexed range read, however many mailboxes the store holds.
    async fn mailboxes_page(
        &self,
        tenant: Option<&str>,
        after: MailboxId,
        limit: u32,
    ) -> Result<Vec<MailboxRecord>, StoreError>;
}

/// What health reports about each tenant's mailboxes, computed in the store
/// ([`super::summaries`]).
pub trait MailboxSummaries {
    /// Per tenant with an enabled mailbox, by name: counts and extremes, and at most `listed`
    /// of its mailboxes, worst first ([`super::summaries::WORST_FIRST`]).
    async fn tenant_summaries(
        &self,
        now: DateTime<Utc>,
        listed: u32,
    ) -> Result<Vec<super::TenantSummary>, StoreError>;
}

/// Delta rounds: a page and its cursor in one transaction, series masters, quarantine, the events a round keeps.
pub trait RoundStore {
    /// Begins a full round over `window`: the old delta state is dropped and events not seen
    /// by the time the round completes are deleted then. Returns the new round id.
    async fn start_full_round(&self, lease: &Lease, window: &Window) -> Result<i64, StoreError>;

    /// Applies one page and moves the cursor past it, atomically, only while `lease` is held
    /// and the round is `cursor.round_id` ([`StoreError::LeaseLost`] otherwise, nothing
    /// written). The page's series masters are written first (a changed one re-fills every
    /// stored occurrence of its series), series Graph no longer has are deleted, then the
    /// items in the page's order. With a deltaLink that ends a full round, events the round did
    /// not return are deleted (reconciliation), and masters no stored event belongs to.
    async fn apply_page(
        &self,
        lease: &Lease,
        cursor: &Cursor,
        page: PageWrite<'_>,
        link: &PageLink,
        now: DateTime<Utc>,
    ) -> Result<PageApplied, StoreError>;

    /// Counts a page that failed the same way at the same link (`signature`) once more; at
    /// `limit` in a row the mailbox's cursor is reset so its next job starts a fresh round (and
    /// `fresh_rounds_forced` counts it). Returns the count and whether the cursor was reset.
    async fn note_page_failure(
        &self,
        lease: &Lease,
        signature: &str,
        limit: u32,
    ) -> Result<(u32, bool), StoreError>;

    /// The stored series masters of `mailbox` among `ids`, by id.
    async fn series_masters(
        &self,
        mailbox: MailboxId,
        ids: &[&str],
    ) -> Result<HashMap<String, StoredMaster>, StoreError>;

    /// A mailbox's events, by start.
    async fn events(&self, mailbox: MailboxId) -> Result<Vec<Event>, StoreError>;

    /// A mailbox's events that overlap `[start, end)` (an instant event at `start` included),
    /// by start.
    async fn events_between(
        &self,
        mailbox: MailboxId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Event>, StoreError>;

    /// One stored event of a mailbox, by Graph id.
    async fn event_by_id(
        &self,
        mailbox: MailboxId,
        event_id: &str,
    ) -> Result<Option<Event>, StoreError>;

    /// Events held per mailbox.
    async fn event_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError>;

    /// A mailbox's quarantined items, most recently seen first, at most `limit`.
    async fn quarantined(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<QuarantinedItem>, StoreError>;
}

/// Graph change-notification subscriptions, one per mailbox, claimed so replicas share the work.
pub trait SubscriptionStore {
    /// Claims a mailbox's subscription work until `until` (creating its row if needed): of
    /// several replicas claiming at once, exactly one gets `true`.
    async fn claim_subscription(
        &self,
        mailbox: MailboxId,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// [`request_sync`](Store::request_sync) for several mailboxes in one statement; returns
    /// how many were newly queued.
    async fn request_syncs(
        &self,
        mailboxes: &[MailboxId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// The stored subscription with Graph id `subscription_id`.
    async fn subscription_by_id(
        &self,
        subscription_id: &str,
    ) -> Result<Option<SubscriptionRecord>, StoreError>;

    /// Records a failed create or renew and when to try again.
    async fn subscription_failed(
        &self,
        mailbox: MailboxId,
        error: &str,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Marks a subscription for work now: `forget` drops it (Graph removed it: create a new
    /// one), else it is renewed. `false` when no such subscription is stored.
    async fn subscription_needs_work(
        &self,
        subscription_id: &str,
        forget: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Records a created or renewed subscription; clears errors, backoff and renewal requests.
    async fn subscription_saved(
        &self,
        mailbox: MailboxId,
        saved: &SubscriptionSaved<'_>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Every subscription row, by mailbox.
    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// The subscriptions of enabled mailboxes counted in the store, with at most `failures`
    /// of those whose last create or renew failed (by mailbox).
    async fn subscription_counts(
        &self,
        now: DateTime<Utc>,
        failures: u32,
    ) -> Result<super::SubscriptionCounts, StoreError>;

    /// The stored subscriptions among `ids`, in one query (a notification batch costs one
    /// lookup, whatever it carries).
    async fn subscriptions_by_ids(
        &self,
        ids: &[&str],
    ) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// Enabled mailboxes whose subscription is missing, removed, marked for renewal, or
    /// expiring by `renew_by`, and not claimed or backing off; at most `limit`, oldest expiry first.
    async fn subscriptions_due(
        &self,
        now: DateTime<Utc>,
        renew_by: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SubscriptionDue>, StoreError>;
}

/// Subscriptions of removed mailboxes, kept until they are deleted at Graph.
pub trait RetiredStore {
    /// Moves the live subscriptions of disabled mailboxes to the retired list (their rows
    /// forget them); returns how many.
    async fn retire_disabled_subscriptions(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Retired subscriptions not claimed or backing off, oldest first, at most `limit`.
    async fn retired_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<RetiredSubscription>, StoreError>;

    /// Claims a retired subscription until `until`: of several replicas, one gets `true`.
    async fn claim_retired(
        &self,
        id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Graph deleted it (or no longer had it): forgotten.
    async fn retired_deleted(&self, id: &str) -> Result<(), StoreError>;

    /// The deletion failed: try again at `retry_at`.
    async fn retired_failed(
        &self,
        id: &str,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Retires a subscription Graph has and no row knows (left by a re-created store).
    async fn retire_orphan(
        &self,
        id: &str,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
}

/// The replica registry: the running calsync processes sharing the store, so they can share
/// Graph's request rates ([`crate::scheduler::fleet`]).
pub trait ReplicaStore {
    /// Writes this replica's heartbeat and what it keeps to (`keeps_share_of`: its requests stay
    /// within `limit / n` in every 1-second window from `now` on; `None`: it sends none),
    /// creating its row. One statement, committed when it returns: a replica that reads after
    /// it sees it.
    async fn replica_heartbeat(
        &self,
        id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
        keeps_share_of: Option<u32>,
    ) -> Result<(), StoreError>;

    /// Replicas whose last heartbeat is later than `live_after`, by id.
    async fn live_replicas(
        &self,
        live_after: DateTime<Utc>,
    ) -> Result<Vec<ReplicaRecord>, StoreError>;

    /// Removes a replica's row (at a clean stop); whether it existed.
    async fn remove_replica(&self, id: &str) -> Result<bool, StoreError>;

    /// Deletes the rows of replicas whose last heartbeat is before `before` (dead ones');
    /// returns how many.
    async fn forget_replicas(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// The outbox of two-way sync: the application's writes to its appointments, queued until the
/// mailbox's sync job delivers them, and each appointment's link to its Graph event.
pub trait WriteStore {
    /// Stores a write and asks for a sync of its mailbox (as [`request_sync`](MailboxStore::request_sync)
    /// would, even if one is pending), in one transaction, after the idempotency and link checks
    /// of [`Enqueued`]; a cancel marks its link cancelled at once. Concurrent calls with one
    /// idempotency key store one write; the others replay it.
    async fn enqueue_write(&self, write: &NewWrite<'_>) -> Result<Enqueued, StoreError>;

    /// The mailbox's queued writes in delivery order with their links, at most `limit`.
    async fn pending_writes(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<PendingWrite>, StoreError>;

    /// Records the result of delivering a queued write of the leased mailbox, and what it
    /// teaches the link, only while `lease` is held ([`StoreError::LeaseLost`] otherwise,
    /// nothing written). A write that ends loses its body. No-op for a write not queued.
    async fn record_write(
        &self,
        lease: &Lease,
        write_id: &str,
        result: &WriteResult,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// A write by its id.
    async fn write_by_id(&self, id: &str) -> Result<Option<WriteRecord>, StoreError>;

    /// An appointment's link to its Graph event.
    async fn event_link(
        &self,
        mailbox: MailboxId,
        external_id: &str,
    ) -> Result<Option<EventLink>, StoreError>;

    /// Deletes the writes that ended (delivered, failed, conflict) before `before`; queued ones
    /// and the appointments' links stay. How many went.
    async fn prune_writes(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Writes not delivered per tenant (tenants with none are absent).
    async fn write_counts(&self) -> Result<HashMap<String, WriteCounts>, StoreError>;

    /// An appointment's writes, newest first, at most `limit`.
    async fn writes_of_event(
        &self,
        mailbox: MailboxId,
        external_id: &str,
        limit: u32,
    ) -> Result<Vec<WriteRecord>, StoreError>;
}
