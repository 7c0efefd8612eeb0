//! What health reports about each tenant's mailboxes, computed by the store: counts and
//! extremes per tenant, and each tenant's few worst mailboxes. Health used to read every
//! mailbox's full record and count them in Rust; with 100,000 mailboxes that took 1.5-2 s per
//! request and listed 25 MiB of JSON. Here the work stays in the database and what comes back
//! grows with the tenants, not with the mailboxes.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::contract::*;
use super::{count_of, MailboxRecord, PgStore, SqliteStore, Store, StoreError};

/// One tenant's enabled mailboxes, summed up.
#[derive(Clone, Debug, Default)]
pub struct TenantSummary {
    pub tenant: String,
    pub mailboxes: u64,
    pub never_synced: u64,
    /// Mailboxes whose last job failed (a deferral is not a failure).
    pub failing: u64,
    /// The earliest time any of them has been behind since (its last success, or its
    /// registration when it never had one): the tenant's largest lag.
    pub behind_since: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    /// Due (`next_run_at` passed) and not leased to a job.
    pub due: u64,
    /// The earliest `next_run_at` of those.
    pub oldest_due_at: Option<DateTime<Utc>>,
    /// Items set aside in quarantine, all mailboxes together.
    pub quarantined: u64,
    /// At most the number asked for, worst first ([`WORST_FIRST`]).
    pub worst: Vec<ListedMailbox>,
}

/// A mailbox of a [`TenantSummary`]'s list, with its quarantined items.
#[derive(Clone, Debug)]
pub struct ListedMailbox {
    pub record: MailboxRecord,
    pub quarantined: u64,
}

/// The order of [`TenantSummary::worst`]: first the mailboxes whose last job failed or was
/// deferred (an error newer than their last success), the most recent error first; then the
/// others, the most behind first.
pub const WORST_FIRST: &str = "erring DESC, error_at DESC NULLS LAST, behind_since, id";

impl Store {
    /// Per tenant with an enabled mailbox, by name: counts and extremes, and at most `listed`
    /// of its mailboxes, worst first. Two statements (plus the listed rows' when `listed` is
    /// not 0), each one pass over the mailboxes in the database.
    pub async fn tenant_summaries(
        &self,
        now: DateTime<Utc>,
        listed: u32,
    ) -> Result<Vec<TenantSummary>, StoreError> {
        match self {
            Store::Sqlite(s) => s.tenant_summaries(now, listed).await,
            Store::Postgres(s) => s.tenant_summaries(now, listed).await,
        }
    }
}

/// Each tenant's worst mailboxes in one statement: all of them ranked in one pass, at most the
/// bound limit of each (`limit` is its placeholder) with their quarantined items.
/// `mailboxes` names the table as the backend reads it best; `enabled` is its test.
fn worst_statement(mailboxes: &str, enabled: &str, limit: &str) -> String {
    format!(
        "WITH ranked (mailbox, of_tenant, rank) AS (
             SELECT id, tenant, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY {WORST_FIRST})
             FROM (SELECT id, tenant,
                       COALESCE(last_error IS NOT NULL
                           AND (last_success_at IS NULL OR last_error_at > last_success_at),
                           FALSE) AS erring,
                       last_error_at AS error_at,
                       COALESCE(last_success_at, created_at) AS behind_since
                   FROM {mailboxes} WHERE {enabled}) AS candidates)
         SELECT {columns},
             (SELECT COUNT(*) FROM quarantine q WHERE q.mailbox_id = mailboxes.id) AS quarantined
         FROM ranked JOIN mailboxes ON mailboxes.id = ranked.mailbox
         WHERE ranked.rank <= {limit}
         ORDER BY ranked.of_tenant, ranked.rank",
        columns = super::mailbox_columns!(),
    )
}

/// Reads a row's timestamp column as its backend stores it.
type ReadTime<R> = fn(&R, &str) -> Result<Option<DateTime<Utc>>, StoreError>;

/// The counts' rows as summaries, with the quarantine's (`tenant`, `n`) rows added; `time`
/// reads the backend's timestamps.
fn summaries_of<R>(
    rows: &[R],
    quarantined: &[R],
    time: ReadTime<R>,
) -> Result<Vec<TenantSummary>, StoreError>
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut summaries = rows
        .iter()
        .map(|row| {
            Ok(TenantSummary {
                tenant: row.try_get("tenant")?,
                mailboxes: count_of(row, "mailboxes")?,
                never_synced: count_of(row, "never_synced")?,
                failing: count_of(row, "failing")?,
                behind_since: time(row, "behind_since")?,
                last_success_at: time(row, "last_success_at")?,
                due: count_of(row, "due")?,
                oldest_due_at: time(row, "oldest_due_at")?,
                quarantined: 0,
                worst: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    for row in quarantined {
        let tenant: String = row.try_get("tenant")?;
        if let Some(summary) = summaries.iter_mut().find(|s| s.tenant == tenant) {
            summary.quarantined = count_of(row, "n")?;
        }
    }
    Ok(summaries)
}

/// The worst mailboxes' rows ([`worst_statement`]) added to their tenants' summaries;
/// `record` reads the backend's mailbox row.
fn with_worst<R>(
    mut summaries: Vec<TenantSummary>,
    rows: &[R],
    record: fn(&R) -> Result<MailboxRecord, StoreError>,
) -> Result<Vec<TenantSummary>, StoreError>
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    for row in rows {
        let listed = ListedMailbox {
            record: record(row)?,
            quarantined: count_of(row, "quarantined")?,
        };
        if let Some(summary) = summaries
            .iter_mut()
            .find(|s| s.tenant == listed.record.tenant)
        {
            summary.worst.push(listed);
        }
    }
    Ok(summaries)
}

impl MailboxSummaries for SqliteStore {
    async fn tenant_summaries(
        &self,
        now: DateTime<Utc>,
        listed: u32,
    ) -> Result<Vec<TenantSummary>, StoreError> {
        use super::sqlite::{mailbox_from_row, parse_opt_ts, ts};
        // A snapshot: the counts and the list agree.
        let mut tx = self.pool.begin().await?;
        // `NOT INDEXED`: a table scan and one sort by tenant cost less than walking the
        // (tenant, user_id) index and fetching each row from it.
        let rows = sqlx::query(
            "SELECT m.tenant, COUNT(*) AS mailboxes,
                 SUM(m.last_success_at IS NULL) AS never_synced,
                 SUM(m.consecutive_failures > 0) AS failing,
                 MIN(COALESCE(m.last_success_at, m.created_at)) AS behind_since,
                 MAX(m.last_success_at) AS last_success_at,
                 SUM(m.next_run_at <= ?1 AND (m.lease_until IS NULL OR m.lease_until <= ?1))
                     AS due,
                 MIN(CASE WHEN m.next_run_at <= ?1
                               AND (m.lease_until IS NULL OR m.lease_until <= ?1)
                          THEN m.next_run_at END) AS oldest_due_at
             FROM mailboxes AS m NOT INDEXED
             WHERE m.enabled = 1
             GROUP BY m.tenant ORDER BY m.tenant",
        )
        .bind(ts(now))
        .fetch_all(&mut *tx)
        .await?;
        // From the quarantine's side (`CROSS JOIN` keeps SQLite's planner to that order):
        // reading every mailbox to probe the quarantine for it cost ~1 s with 100,000.
        let quarantined = sqlx::query(
            "SELECT m.tenant, COUNT(*) AS n
             FROM quarantine CROSS JOIN mailboxes AS m ON m.id = quarantine.mailbox_id
             WHERE m.enabled = 1 GROUP BY m.tenant",
        )
        .fetch_all(&mut *tx)
        .await?;
        let summaries = summaries_of(&rows, &quarantined, parse_opt_ts)?;
        if listed == 0 || summaries.is_empty() {
            return Ok(summaries);
        }
        let rows = sqlx::query(&worst_statement(
            "mailboxes NOT INDEXED",
            "enabled = 1",
            "?1",
        ))
        .bind(i64::from(listed))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        with_worst(summaries, &rows, mailbox_from_row)
    }
}

impl MailboxSummaries for PgStore {
    async fn tenant_summaries(
        &self,
        now: DateTime<Utc>,
        listed: u32,
    ) -> Result<Vec<TenantSummary>, StoreError> {
        use super::postgres::mailbox_from_row;
        // One snapshot for both statements: the counts and the list agree.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT m.tenant, COUNT(*) AS mailboxes,
                 COUNT(*) FILTER (WHERE m.last_success_at IS NULL) AS never_synced,
                 COUNT(*) FILTER (WHERE m.consecutive_failures > 0) AS failing,
                 MIN(COALESCE(m.last_success_at, m.created_at)) AS behind_since,
                 MAX(m.last_success_at) AS last_success_at,
                 COUNT(*) FILTER (WHERE m.next_run_at <= $1
                                    AND (m.lease_until IS NULL OR m.lease_until <= $1)) AS due,
                 MIN(m.next_run_at) FILTER (WHERE m.next_run_at <= $1
                                    AND (m.lease_until IS NULL OR m.lease_until <= $1))
                     AS oldest_due_at
             FROM mailboxes AS m
             WHERE m.enabled
             GROUP BY m.tenant ORDER BY m.tenant",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let quarantined = sqlx::query(
            "SELECT m.tenant, COUNT(*) AS n
             FROM quarantine JOIN mailboxes AS m ON m.id = quarantine.mailbox_id
             WHERE m.enabled GROUP BY m.tenant",
        )
        .fetch_all(&mut *tx)
        .await?;
        let time = |row: &sqlx::postgres::PgRow, column: &str| Ok(row.try_get(column)?);
        let summaries = summaries_of(&rows, &quarantined, time)?;
        if listed == 0 || summaries.is_empty() {
            tx.commit().await?;
            return Ok(summaries);
        }
        let rows = sqlx::query(&worst_statement("mailboxes", "enabled", "$1"))
            .bind(i64::from(listed))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        with_worst(summaries, &rows, mailbox_from_row)
    }
}
