//! PostgreSQL store: one database shared by any number of replicas.
//!
//! Replica safety rests on two things. A claim is one conditional `UPDATE` (under READ
//! COMMITTED a concurrent claim waits for the row lock and re-checks the lease on the row it
//! then sees), so exactly one claimant wins. Every write of a job checks `lease_owner` (and,
//! for a page, the round) under the mailbox row's lock inside its transaction, so once another
//! replica's claim has committed, nothing from the old owner can commit after it. Clocks only
//! decide when a lease may be taken over, never whether a write is accepted.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

// The contract's traits: a backend implements them, a caller reaches them through `Store`.
use super::contract::*;
use super::{
    link_parts, migrations, Cursor, DueMailbox, JobRecord, Lease, MailboxId, MailboxRecord,
    MasterWrite, PageApplied, PageWrite, QuarantinedItem, RunOutcome, StoreError, StoredMaster,
    SyncRun, RUNS_KEPT_PER_MAILBOX,
};
use crate::graph::model::RejectedItem;
use crate::graph::{DeltaItem, Event, PageLink, Window};

/// Serialises `sync_config_mailboxes` of replicas starting together (an arbitrary constant,
/// "calsync" in ASCII).
const CONFIG_SYNC_LOCK: i64 = 0x63_616c_7379_6e63;

/// PostgreSQL text cannot hold NUL; Graph data and error bodies can. A NUL is stored as U+FFFD
/// rather than failing the page (or the job's record) forever.
pub(super) fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn opt_text(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(text)
}

/// The same for JSON stored as jsonb, which refuses `\u0000` in strings and keys.
fn json_without_nul(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(text(s).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(json_without_nul).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (text(k).into_owned(), json_without_nul(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[derive(Clone, Debug)]
pub struct PgStore {
    pub(super) pool: PgPool,
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, libpq-style query options such as
    /// `options[search_path]=schema` accepted).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?;
        if options.get_application_name().is_none() {
            options = options.application_name("calsync");
        }
        // A transaction of calsync never waits on anything outside the database, so one left
        // idle is a frozen or cut-off replica: the server ends it and frees its row locks.
        if !options
            .get_options()
            .is_some_and(|o| o.contains("idle_in_transaction_session_timeout"))
        {
            options = options.options([("idle_in_transaction_session_timeout", "60s")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

impl Lifecycle for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        migrations::migrator(migrations::POSTGRES)
            .await?
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    // No `release_stale_leases`: other replicas hold live leases in this database.
}

impl MailboxStore for PgStore {
    async fn sync_config_mailboxes(
        &self,
        mailboxes: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CONFIG_SYNC_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE mailboxes SET enabled = false WHERE source = 'config' AND enabled")
            .execute(&mut *tx)
            .await?;
        for (tenant, user_id) in mailboxes {
            sqlx::query(
                "INSERT INTO mailboxes (tenant, user_id, source, enabled, next_run_at, created_at)
                 VALUES ($1, $2, 'config', true, $3, $3)
                 ON CONFLICT (tenant, user_id) DO UPDATE SET enabled = true",
            )
            .bind(text(tenant))
            .bind(text(user_id))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_candidates(
        &self,
        now: DateTime<Utc>,
        per_tenant: u32,
    ) -> Result<Vec<DueMailbox>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, next_run_at, requested FROM (
                 SELECT id, tenant, next_run_at, sync_requested_at IS NOT NULL AS requested,
                        ROW_NUMBER() OVER (PARTITION BY tenant
                            ORDER BY sync_requested_at IS NULL, next_run_at, id) AS rank
                 FROM mailboxes
                 WHERE enabled AND next_run_at <= $1
                   AND (lease_until IS NULL OR lease_until < $1)) AS due
             WHERE rank <= $2
             ORDER BY requested DESC, next_run_at, id",
        )
        .bind(now)
        .bind(i64::from(per_tenant))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DueMailbox {
                    id: row.try_get("id")?,
                    tenant: row.try_get("tenant")?,
                    next_run_at: row.try_get("next_run_at")?,
                    requested: row.try_get("requested")?,
                })
            })
            .collect()
    }

    async fn claim(
        &self,
        id: MailboxId,
        owner: &str,
        now: DateTime<Utc>,
        lease_for: Duration,
        only_if_due: bool,
    ) -> Result<Option<MailboxRecord>, StoreError> {
        let until = now + chrono::Duration::from_std(lease_for).unwrap_or(chrono::Duration::MAX);
        // One statement. The row is locked with SKIP LOCKED: a row another transaction holds
        // (a page being committed, another claim) is not waited for, so a dispatcher never
        // stalls behind another replica; it is simply not claimed this time. A row updated
        // since the statement's snapshot is re-checked as it now is.
        let row = sqlx::query(concat!(
            "UPDATE mailboxes SET lease_owner = $1, lease_until = $2, sync_requested_at = NULL
             WHERE id = (
                 SELECT id FROM mailboxes
                 WHERE id = $3 AND (lease_until IS NULL OR lease_until < $4)
                   AND (NOT $5 OR (enabled AND next_run_at <= $4))
                 FOR UPDATE SKIP LOCKED)
             RETURNING ",
            super::mailbox_columns!()
        ))
        .bind(owner)
        .bind(until)
        .bind(id)
        .bind(now)
        .bind(only_if_due)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(mailbox_from_row).transpose()
    }

    async fn renew_lease(&self, lease: &Lease, until: DateTime<Utc>) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE mailboxes SET lease_until = $1 WHERE id = $2 AND lease_owner = $3")
                .bind(until)
                .bind(lease.mailbox)
                .bind(&lease.owner)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_job(&self, lease: &Lease, job: &JobRecord) -> Result<(), StoreError> {
        let ok = job.outcome == RunOutcome::Ok;
        // A deferral (open breaker, Retry-After past the deadline) is not a failure of the
        // mailbox: its failure count stays, but the reason is shown.
        let failed = matches!(
            job.outcome,
            RunOutcome::Failed | RunOutcome::DeadlineExceeded
        );
        let error = opt_text(&job.error);
        let request_id = opt_text(&job.request_id);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE mailboxes SET lease_owner = NULL, lease_until = NULL,
                 next_run_at = CASE WHEN sync_requested_at IS NOT NULL
                     THEN LEAST($1, sync_requested_at) ELSE $1 END,
                 last_attempt_at = $2,
                 last_success_at = CASE WHEN $3 THEN $4 ELSE last_success_at END,
                 last_error = CASE WHEN $3 THEN last_error ELSE $5 END,
                 last_error_at = CASE WHEN $3 THEN last_error_at ELSE $4 END,
                 last_request_id = COALESCE($6, last_request_id),
                 consecutive_failures = CASE WHEN $3 THEN 0
                     WHEN $9 THEN consecutive_failures + 1 ELSE consecutive_failures END
             WHERE id = $7 AND lease_owner = $8",
        )
        .bind(job.next_run_at)
        .bind(job.started_at)
        .bind(ok)
        .bind(job.finished_at)
        .bind(&error)
        .bind(&request_id)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .bind(failed)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO sync_runs (mailbox_id, started_at, finished_at, outcome, full_round,
                 pages, upserted, deleted, error, request_id)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
             WHERE EXISTS (SELECT 1 FROM mailboxes WHERE id = $1)",
        )
        .bind(lease.mailbox)
        .bind(job.started_at)
        .bind(job.finished_at)
        .bind(job.outcome.as_str())
        .bind(job.full_round)
        .bind(i64::try_from(job.pages).unwrap_or(i64::MAX))
        .bind(i64::try_from(job.upserted).unwrap_or(i64::MAX))
        .bind(i64::try_from(job.deleted).unwrap_or(i64::MAX))
        .bind(&error)
        .bind(&request_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM sync_runs WHERE mailbox_id = $1 AND id <= (
                 SELECT id FROM sync_runs WHERE mailbox_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        )
        .bind(lease.mailbox)
        .bind(RUNS_KEPT_PER_MAILBOX)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn mailboxes(&self) -> Result<Vec<MailboxRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            super::mailbox_columns!(),
            " FROM mailboxes WHERE enabled ORDER BY tenant, user_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(mailbox_from_row).collect()
    }

    async fn mailbox(
        &self,
        tenant: &str,
        user_id: &str,
    ) -> Result<Option<MailboxRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            super::mailbox_columns!(),
            " FROM mailboxes WHERE tenant = $1 AND user_id = $2"
        ))
        .bind(text(tenant))
        .bind(text(user_id))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(mailbox_from_row).transpose()
    }

    async fn mailbox_by_id(&self, id: MailboxId) -> Result<Option<MailboxRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            super::mailbox_columns!(),
            " FROM mailboxes WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(mailbox_from_row).transpose()
    }

    async fn register_mailbox(
        &self,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(MailboxRecord, bool), StoreError> {
        let (tenant, user_id) = (text(tenant), text(user_id));
        // Insert, else re-enable; a delete racing in between makes the next attempt insert.
        for _ in 0..3 {
            let added = sqlx::query(concat!(
                "INSERT INTO mailboxes (tenant, user_id, source, enabled, next_run_at, created_at)
                 VALUES ($1, $2, 'api', true, $3, $3)
                 ON CONFLICT (tenant, user_id) DO NOTHING RETURNING ",
                super::mailbox_columns!()
            ))
            .bind(&tenant)
            .bind(&user_id)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = added {
                return Ok((mailbox_from_row(&row)?, true));
            }
            let existing = sqlx::query(concat!(
                "UPDATE mailboxes SET source = 'api', enabled = true,
                     next_run_at = CASE WHEN enabled THEN next_run_at ELSE $3 END
                 WHERE tenant = $1 AND user_id = $2 RETURNING ",
                super::mailbox_columns!()
            ))
            .bind(&tenant)
            .bind(&user_id)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = existing {
                return Ok((mailbox_from_row(&row)?, false));
            }
        }
        Err(StoreError::Corrupt(format!(
            "mailbox {tenant}/{user_id} kept disappearing while being registered"
        )))
    }

    async fn remove_mailbox(&self, id: MailboxId) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Its Graph subscription outlives the row until deleted at Graph.
        sqlx::query(super::retired::PG_RETIRE_OF_MAILBOX)
            .bind(id)
            .bind(Utc::now())
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM mailboxes WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn request_sync(
        &self,
        id: MailboxId,
        now: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError> {
        let queued = sqlx::query(
            "UPDATE mailboxes SET sync_requested_at = $2, next_run_at = LEAST(next_run_at, $2)
             WHERE id = $1 AND enabled AND sync_requested_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if queued.rows_affected() == 1 {
            return Ok(Some(true));
        }
        let pending = sqlx::query("SELECT 1 FROM mailboxes WHERE id = $1 AND enabled")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(pending.map(|_| false))
    }

    async fn runs(&self, mailbox: MailboxId, limit: u32) -> Result<Vec<SyncRun>, StoreError> {
        let rows =
            sqlx::query("SELECT started_at, finished_at, outcome, full_round, pages, upserted, deleted, error, request_id FROM sync_runs WHERE mailbox_id = $1 ORDER BY id DESC LIMIT $2")
                .bind(mailbox)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                Ok(SyncRun {
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                    outcome: row.try_get("outcome")?,
                    full_round: row.try_get("full_round")?,
                    pages: row.try_get("pages")?,
                    upserted: row.try_get("upserted")?,
                    deleted: row.try_get("deleted")?,
                    error: row.try_get("error")?,
                    request_id: row.try_get("request_id")?,
                })
            })
            .collect()
    }
}

impl RoundStore for PgStore {
    async fn start_full_round(&self, lease: &Lease, window: &Window) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "UPDATE mailboxes SET round_id = round_id + 1, round_full = true, next_link = NULL,
                 delta_link = NULL, window_start = $1, window_end = $2
             WHERE id = $3 AND lease_owner = $4 RETURNING round_id",
        )
        .bind(window.start)
        .bind(window.end)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        Ok(row.try_get("round_id")?)
    }

    async fn apply_page(
        &self,
        lease: &Lease,
        cursor: &Cursor,
        page: &PageWrite<'_>,
        link: &PageLink,
        now: DateTime<Utc>,
    ) -> Result<PageApplied, StoreError> {
        let window = cursor
            .window
            .ok_or_else(|| StoreError::Corrupt("cursor without a window".into()))?;
        let mut tx = self.pool.begin().await?;
        // The fence: the row lock is held to commit, so a claim by another replica either
        // committed before (and this page is refused) or waits until this page has committed.
        let fence = sqlx::query(
            "SELECT 1 FROM mailboxes WHERE id = $1 AND lease_owner = $2 AND round_id = $3
             FOR UPDATE",
        )
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .bind(cursor.round_id)
        .fetch_optional(&mut *tx)
        .await?;
        if fence.is_none() {
            return Err(StoreError::LeaseLost(lease.mailbox));
        }
        let mut applied = PageApplied::default();
        for write in page.masters {
            upsert_master(&mut tx, lease.mailbox, write, page.round, now).await?;
        }
        if !page.gone_series.is_empty() {
            let gone: Vec<Cow<'_, str>> = page.gone_series.iter().map(|s| text(s)).collect();
            let done = sqlx::query(
                "DELETE FROM events WHERE mailbox_id = $1 AND series_master_id = ANY($2)",
            )
            .bind(lease.mailbox)
            .bind(&gone)
            .execute(&mut *tx)
            .await?;
            applied.deleted += done.rows_affected();
            sqlx::query("DELETE FROM series_masters WHERE mailbox_id = $1 AND master_id = ANY($2)")
                .bind(lease.mailbox)
                .bind(&gone)
                .execute(&mut *tx)
                .await?;
        }
        for rejected in page.quarantined {
            quarantine(&mut tx, lease.mailbox, rejected, cursor.round_id, now).await?;
        }
        if !page.items.is_empty() {
            // An item that is understood now leaves quarantine.
            let ids: Vec<Cow<'_, str>> = page.items.iter().map(|i| text(i.id())).collect();
            sqlx::query("DELETE FROM quarantine WHERE mailbox_id = $1 AND item_key = ANY($2)")
                .bind(lease.mailbox)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        // One statement per run of consecutive upserts or removals (a round trip per item made
        // a page five times slower than on SQLite); runs keep the page's order between them.
        for run in page.items.chunk_by(|a, b| is_removal(a) == is_removal(b)) {
            let removals: Vec<Cow<'_, str>> = run
                .iter()
                .filter_map(|item| match item {
                    DeltaItem::Removed { id } => Some(text(id)),
                    DeltaItem::Upsert(_) => None,
                })
                .collect();
            if removals.is_empty() {
                let events: Vec<&Event> = run
                    .iter()
                    .filter_map(|item| match item {
                        DeltaItem::Upsert(event) => Some(event.as_ref()),
                        DeltaItem::Removed { .. } => None,
                    })
                    .collect();
                upsert_events(&mut tx, lease.mailbox, &events, cursor.round_id, now).await?;
                applied.upserted += events.len() as u64;
            } else {
                // Graph also reports changes outside the window as removals: only an event
                // held inside this window is deleted.
                let done = sqlx::query(
                    "DELETE FROM events WHERE mailbox_id = $1 AND event_id = ANY($2)
                       AND start_utc < $3 AND end_utc >= $4",
                )
                .bind(lease.mailbox)
                .bind(&removals)
                .bind(window.end)
                .bind(window.start)
                .execute(&mut *tx)
                .await?;
                applied.deleted += done.rows_affected();
                // A removed master is only forgotten: its occurrences go by their own
                // removals, and a later stub of the series fetches it again.
                sqlx::query(
                    "DELETE FROM series_masters WHERE mailbox_id = $1 AND master_id = ANY($2)",
                )
                .bind(lease.mailbox)
                .bind(&removals)
                .execute(&mut *tx)
                .await?;
            }
        }
        let (next_link, delta_link) = link_parts(link);
        if delta_link.is_some() && cursor.full {
            let done = sqlx::query("DELETE FROM events WHERE mailbox_id = $1 AND seen_round <> $2")
                .bind(lease.mailbox)
                .bind(cursor.round_id)
                .execute(&mut *tx)
                .await?;
            applied.deleted += done.rows_affected();
            sqlx::query(
                "DELETE FROM series_masters m WHERE m.mailbox_id = $1 AND NOT EXISTS (
                     SELECT 1 FROM events e WHERE e.mailbox_id = $1
                       AND e.series_master_id = m.master_id)",
            )
            .bind(lease.mailbox)
            .execute(&mut *tx)
            .await?;
            // What the full round did not return any more is no longer in quarantine either.
            sqlx::query("DELETE FROM quarantine WHERE mailbox_id = $1 AND seen_round <> $2")
                .bind(lease.mailbox)
                .bind(cursor.round_id)
                .execute(&mut *tx)
                .await?;
        }
        match (next_link, delta_link) {
            (Some(next), _) => {
                sqlx::query(
                    "UPDATE mailboxes SET next_link = $1, failing_link = NULL,
                         failing_link_count = 0 WHERE id = $2",
                )
                .bind(text(next))
                .bind(lease.mailbox)
                .execute(&mut *tx)
                .await?;
            }
            (None, delta) => {
                sqlx::query(
                    "UPDATE mailboxes SET next_link = NULL, delta_link = $1, round_full = false,
                         failing_link = NULL, failing_link_count = 0
                     WHERE id = $2",
                )
                .bind(delta.map(text))
                .bind(lease.mailbox)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn note_page_failure(
        &self,
        lease: &Lease,
        signature: &str,
        limit: u32,
    ) -> Result<(u32, bool), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE mailboxes SET failing_link_count = CASE WHEN failing_link = $1
                     THEN failing_link_count + 1 ELSE 1 END,
                 failing_link = $1
             WHERE id = $2 AND lease_owner = $3 RETURNING failing_link_count",
        )
        .bind(signature)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        let count: i32 = row.try_get("failing_link_count")?;
        let count = u32::try_from(count).unwrap_or(0);
        let reset = count >= limit;
        if reset {
            sqlx::query(
                "UPDATE mailboxes SET window_start = NULL, window_end = NULL, next_link = NULL,
                     delta_link = NULL, round_full = true, failing_link = NULL,
                     failing_link_count = 0, fresh_rounds_forced = fresh_rounds_forced + 1
                 WHERE id = $1",
            )
            .bind(lease.mailbox)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((count, reset))
    }

    async fn series_masters(
        &self,
        mailbox: MailboxId,
        ids: &[&str],
    ) -> Result<HashMap<String, StoredMaster>, StoreError> {
        let ids: Vec<Cow<'_, str>> = ids.iter().map(|id| text(id)).collect();
        let rows = sqlx::query(
            "SELECT master_id, change_key, checked_round, raw FROM series_masters
             WHERE mailbox_id = $1 AND master_id = ANY($2)",
        )
        .bind(mailbox)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let master = StoredMaster {
                    master_id: row.try_get("master_id")?,
                    change_key: row.try_get("change_key")?,
                    checked_round: row.try_get("checked_round")?,
                    raw: row.try_get("raw")?,
                };
                Ok((master.master_id.clone(), master))
            })
            .collect()
    }

    async fn events(&self, mailbox: MailboxId) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            super::event_columns!(),
            " FROM events WHERE mailbox_id = $1 ORDER BY start_utc, event_id"
        ))
        .bind(mailbox)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn events_between(
        &self,
        mailbox: MailboxId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            super::event_columns!(),
            " FROM events WHERE mailbox_id = $1 AND start_utc < $3
                 AND (end_utc > $2 OR start_utc >= $2)
             ORDER BY start_utc, event_id"
        ))
        .bind(mailbox)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn event_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError> {
        let rows = sqlx::query("SELECT mailbox_id, COUNT(*) AS n FROM events GROUP BY mailbox_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("mailbox_id")?,
                    u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
                ))
            })
            .collect()
    }

    async fn quarantine_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError> {
        let rows =
            sqlx::query("SELECT mailbox_id, COUNT(*) AS n FROM quarantine GROUP BY mailbox_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("mailbox_id")?,
                    row.try_get::<i64, _>("n")?.max(0) as u64,
                ))
            })
            .collect()
    }

    async fn quarantined(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<QuarantinedItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT item_key, item_id, reason, first_seen, last_seen, times_seen, raw
             FROM quarantine WHERE mailbox_id = $1 ORDER BY last_seen DESC, item_key
             LIMIT $2",
        )
        .bind(mailbox)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(QuarantinedItem {
                    item_key: row.try_get("item_key")?,
                    item_id: row.try_get("item_id")?,
                    reason: row.try_get("reason")?,
                    first_seen: row.try_get("first_seen")?,
                    last_seen: row.try_get("last_seen")?,
                    times_seen: row.try_get::<i64, _>("times_seen")?.max(0) as u64,
                    raw: row.try_get("raw")?,
                })
            })
            .collect()
    }
}

fn is_removal(item: &DeltaItem) -> bool {
    matches!(item, DeltaItem::Removed { .. })
}

/// Upserts `events` in one statement over arrays. An id repeated within them keeps its last
/// version, as one-by-one upserts would (one statement cannot update a row twice).
async fn upsert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mailbox: MailboxId,
    events: &[&Event],
    round_id: i64,
    synced_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut latest: Vec<&Event> = events
        .iter()
        .rev()
        .filter(|e| seen.insert(text(&e.id)))
        .copied()
        .collect();
    latest.reverse();
    let texts = |f: fn(&Event) -> &Option<String>| -> Vec<Option<String>> {
        latest
            .iter()
            .map(|e| opt_text(f(e)).map(Cow::into_owned))
            .collect()
    };
    sqlx::query(
        "INSERT INTO events (mailbox_id, event_id, ical_uid, change_key, etag, last_modified,
             subject, start_utc, end_utc, start_date, end_date, is_all_day, is_cancelled, show_as,
             sensitivity, event_type, series_master_id, organizer_name, organizer_address,
             attendees, location, categories, web_link, raw, seen_round, synced_at)
         SELECT $1, page.*, $25, $26 FROM UNNEST($2::text[], $3::text[], $4::text[],
             $5::text[], $6::timestamptz[], $7::text[], $8::timestamptz[], $9::timestamptz[],
             $10::date[], $11::date[], $12::boolean[], $13::boolean[], $14::text[], $15::text[],
             $16::text[], $17::text[], $18::text[], $19::text[], $20::jsonb[], $21::text[],
             $22::jsonb[], $23::text[], $24::text[]) AS page
         ON CONFLICT (mailbox_id, event_id) DO UPDATE SET
             ical_uid = EXCLUDED.ical_uid, change_key = EXCLUDED.change_key, etag = EXCLUDED.etag,
             last_modified = EXCLUDED.last_modified, subject = EXCLUDED.subject,
             start_utc = EXCLUDED.start_utc, end_utc = EXCLUDED.end_utc,
             start_date = EXCLUDED.start_date, end_date = EXCLUDED.end_date,
             is_all_day = EXCLUDED.is_all_day, is_cancelled = EXCLUDED.is_cancelled,
             show_as = EXCLUDED.show_as, sensitivity = EXCLUDED.sensitivity,
             event_type = EXCLUDED.event_type, series_master_id = EXCLUDED.series_master_id,
             organizer_name = EXCLUDED.organizer_name, organizer_address = EXCLUDED.organizer_address,
             attendees = EXCLUDED.attendees, location = EXCLUDED.location,
             categories = EXCLUDED.categories, web_link = EXCLUDED.web_link, raw = EXCLUDED.raw,
             seen_round = EXCLUDED.seen_round, synced_at = EXCLUDED.synced_at",
    )
    .bind(mailbox)
    .bind(
        latest
            .iter()
            .map(|e| text(&e.id).into_owned())
            .collect::<Vec<_>>(),
    )
    .bind(texts(|e| &e.ical_uid))
    .bind(texts(|e| &e.change_key))
    .bind(texts(|e| &e.etag))
    .bind(latest.iter().map(|e| e.last_modified).collect::<Vec<_>>())
    .bind(texts(|e| &e.subject))
    .bind(latest.iter().map(|e| e.start_utc).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.end_utc).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.start_date).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.end_date).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.is_all_day).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.is_cancelled).collect::<Vec<_>>())
    .bind(texts(|e| &e.show_as))
    .bind(texts(|e| &e.sensitivity))
    .bind(texts(|e| &e.event_type))
    .bind(texts(|e| &e.series_master_id))
    .bind(texts(|e| &e.organizer_name))
    .bind(texts(|e| &e.organizer_address))
    .bind(
        latest
            .iter()
            .map(|e| json_without_nul(&e.attendees))
            .collect::<Vec<_>>(),
    )
    .bind(texts(|e| &e.location))
    .bind(
        latest
            .iter()
            .map(|e| categories_json(&e.categories))
            .collect::<Vec<_>>(),
    )
    .bind(texts(|e| &e.web_link))
    .bind(
        latest
            .iter()
            .map(|e| text(&e.raw).into_owned())
            .collect::<Vec<_>>(),
    )
    .bind(round_id)
    .bind(synced_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Keeps (or counts again) an item that could not be understood.
async fn quarantine(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mailbox: MailboxId,
    item: &RejectedItem,
    round_id: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO quarantine (mailbox_id, item_key, item_id, raw, reason, first_seen,
             last_seen, times_seen, seen_round)
         VALUES ($1, $2, $3, $4, $5, $6, $6, 1, $7)
         ON CONFLICT (mailbox_id, item_key) DO UPDATE SET item_id = EXCLUDED.item_id,
             raw = EXCLUDED.raw, reason = EXCLUDED.reason, last_seen = EXCLUDED.last_seen,
             times_seen = quarantine.times_seen + 1, seen_round = EXCLUDED.seen_round",
    )
    .bind(mailbox)
    .bind(text(&item.key()).into_owned())
    .bind(opt_text(&item.id))
    .bind(text(&item.raw))
    .bind(text(&item.reason))
    .bind(now)
    .bind(round_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn categories_json(categories: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        categories
            .iter()
            .map(|c| serde_json::Value::String(text(c).into_owned()))
            .collect(),
    )
}

/// Keeps a series master and, when it changed, gives every stored occurrence of its series the
/// master's fields again (their own id, times and stub stay).
async fn upsert_master(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mailbox: MailboxId,
    write: &MasterWrite,
    round: &str,
    synced_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let m = &write.master;
    sqlx::query(
        "INSERT INTO series_masters (mailbox_id, master_id, change_key, raw, checked_round, synced_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (mailbox_id, master_id) DO UPDATE SET change_key = EXCLUDED.change_key,
             raw = EXCLUDED.raw, checked_round = EXCLUDED.checked_round,
             synced_at = EXCLUDED.synced_at",
    )
    .bind(mailbox)
    .bind(text(&m.id))
    .bind(opt_text(&m.change_key))
    .bind(text(&m.raw))
    .bind(round)
    .bind(synced_at)
    .execute(&mut **tx)
    .await?;
    if !write.refill_occurrences {
        return Ok(());
    }
    // The same fields `OccurrenceStub::hydrate` takes from the master; an all-day series keeps
    // its occurrences' dates (their times are midnights).
    sqlx::query(
        "UPDATE events SET change_key = $3, last_modified = $4, subject = $5, is_all_day = $6,
             start_date = CASE WHEN $6 THEN (start_utc AT TIME ZONE 'UTC')::date END,
             end_date = CASE WHEN $6 THEN (end_utc AT TIME ZONE 'UTC')::date END,
             is_cancelled = $7, show_as = $8, sensitivity = $9, organizer_name = $10,
             organizer_address = $11, attendees = $12, location = $13, categories = $14,
             web_link = $15, synced_at = $16
         WHERE mailbox_id = $1 AND series_master_id = $2 AND event_type = 'occurrence'",
    )
    .bind(mailbox)
    .bind(text(&m.id))
    .bind(opt_text(&m.change_key))
    .bind(m.last_modified)
    .bind(opt_text(&m.subject))
    .bind(m.is_all_day)
    .bind(m.is_cancelled)
    .bind(opt_text(&m.show_as))
    .bind(opt_text(&m.sensitivity))
    .bind(opt_text(&m.organizer_name))
    .bind(opt_text(&m.organizer_address))
    .bind(json_without_nul(&m.attendees))
    .bind(opt_text(&m.location))
    .bind(categories_json(&m.categories))
    .bind(opt_text(&m.web_link))
    .bind(synced_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) fn mailbox_from_row(row: &PgRow) -> Result<MailboxRecord, StoreError> {
    let window = match (
        row.try_get::<Option<DateTime<Utc>>, _>("window_start")?,
        row.try_get::<Option<DateTime<Utc>>, _>("window_end")?,
    ) {
        (Some(start), Some(end)) => Some(Window { start, end }),
        _ => None,
    };
    Ok(MailboxRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        user_id: row.try_get("user_id")?,
        source: row.try_get("source")?,
        enabled: row.try_get("enabled")?,
        cursor: Cursor {
            round_id: row.try_get("round_id")?,
            full: row.try_get("round_full")?,
            window,
            next_link: row.try_get("next_link")?,
            delta_link: row.try_get("delta_link")?,
        },
        last_success_at: row.try_get("last_success_at")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        last_error: row.try_get("last_error")?,
        last_error_at: row.try_get("last_error_at")?,
        last_request_id: row.try_get("last_request_id")?,
        consecutive_failures: u32::try_from(row.try_get::<i32, _>("consecutive_failures")?)
            .unwrap_or(0),
        next_run_at: row.try_get("next_run_at")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_until: row.try_get("lease_until")?,
        created_at: row.try_get("created_at")?,
        sync_requested_at: row.try_get("sync_requested_at")?,
        fresh_rounds_forced: row.try_get::<i64, _>("fresh_rounds_forced")?.max(0) as u64,
    })
}

fn event_from_row(row: &PgRow) -> Result<Event, StoreError> {
    let categories: serde_json::Value = row.try_get("categories")?;
    Ok(Event {
        id: row.try_get("event_id")?,
        ical_uid: row.try_get("ical_uid")?,
        change_key: row.try_get("change_key")?,
        etag: row.try_get("etag")?,
        last_modified: row.try_get("last_modified")?,
        subject: row.try_get("subject")?,
        start_utc: row.try_get("start_utc")?,
        end_utc: row.try_get("end_utc")?,
        start_date: row.try_get("start_date")?,
        end_date: row.try_get("end_date")?,
        is_all_day: row.try_get("is_all_day")?,
        is_cancelled: row.try_get("is_cancelled")?,
        show_as: row.try_get("show_as")?,
        sensitivity: row.try_get("sensitivity")?,
        event_type: row.try_get("event_type")?,
        series_master_id: row.try_get("series_master_id")?,
        organizer_name: row.try_get("organizer_name")?,
        organizer_address: row.try_get("organizer_address")?,
        attendees: row.try_get("attendees")?,
        location: row.try_get("location")?,
        categories: serde_json::from_value(categories)
            .map_err(|e| StoreError::Corrupt(format!("categories: {e}")))?,
        web_link: row.try_get("web_link")?,
        raw: row.try_get("raw")?,
    })
}
