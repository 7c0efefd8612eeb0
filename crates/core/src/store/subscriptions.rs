//! Graph change-notification subscriptions, one row per mailbox, on both backends.
//!
//! The row is the coordination point between replicas and between the HTTP side and the
//! subscription task: a lifecycle notification received by any replica marks the row
//! (renew, or forget and recreate), and whichever replica claims it next does the work.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::Row;

// The contract's traits: a backend implements them, a caller reaches them through `Store`.
use super::contract::*;
use super::sqlite::{parse_opt_ts, parse_ts, ts};
use super::{count_of, MailboxId, PgStore, SqliteStore, Store, StoreError};

/// A mailbox's subscription as stored. `client_state` is a secret: compared, never shown.
#[derive(Clone, Debug)]
pub struct SubscriptionRecord {
    pub mailbox_id: MailboxId,
    pub tenant: String,
    pub user_id: String,
    pub mailbox_enabled: bool,
    /// `None` until Graph accepted a subscription, and after it was removed.
    pub subscription_id: Option<String>,
    pub client_state: Option<SecretString>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    pub renewed_at: Option<DateTime<Utc>>,
    pub renew_requested: bool,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub next_attempt_at: DateTime<Utc>,
}

/// An enabled mailbox whose subscription must be created or renewed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionDue {
    pub mailbox_id: MailboxId,
    pub tenant: String,
    pub user_id: String,
    /// The subscription to renew; `None`: create one.
    pub subscription_id: Option<String>,
    /// The mailbox was subscribed before (Graph removed it): changes may have been missed.
    pub had_subscription: bool,
    pub consecutive_failures: u32,
}

/// The subscription rows of enabled mailboxes, counted (health shows these; an enabled mailbox
/// without a row has no subscription either).
#[derive(Clone, Debug, Default)]
pub struct SubscriptionCounts {
    pub rows: u64,
    /// With a subscription that has not expired.
    pub active: u64,
    /// With a subscription past its expiry (renewal failing or late).
    pub expired: u64,
    /// Without a subscription (not created yet, or removed by Graph).
    pub without: u64,
    /// Whose last create or renew failed.
    pub failing: u64,
    /// Some of the failing ones, by mailbox.
    pub failures: Vec<SubscriptionRecord>,
}

/// What a successful create or renew stores.
pub struct SubscriptionSaved<'a> {
    pub subscription_id: &'a str,
    /// `None` keeps the stored one (a renewal).
    pub client_state: Option<&'a SecretString>,
    pub expires_at: DateTime<Utc>,
    /// Created (else renewed).
    pub created: bool,
}

impl Store {
    /// Enabled mailboxes whose subscription is missing, removed, marked for renewal, or
    /// expiring by `renew_by`, and not claimed or backing off; at most `limit`, oldest expiry first.
    pub async fn subscriptions_due(
        &self,
        now: DateTime<Utc>,
        renew_by: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SubscriptionDue>, StoreError> {
        match self {
            Store::Sqlite(s) => s.subscriptions_due(now, renew_by, limit).await,
            Store::Postgres(s) => s.subscriptions_due(now, renew_by, limit).await,
        }
    }

    /// Claims a mailbox's subscription work until `until` (creating its row if needed): of
    /// several replicas claiming at once, exactly one gets `true`.
    pub async fn claim_subscription(
        &self,
        mailbox: MailboxId,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.claim_subscription(mailbox, now, until).await,
            Store::Postgres(s) => s.claim_subscription(mailbox, now, until).await,
        }
    }

    /// Records a created or renewed subscription; clears errors, backoff and renewal requests.
    pub async fn subscription_saved(
        &self,
        mailbox: MailboxId,
        saved: &SubscriptionSaved<'_>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.subscription_saved(mailbox, saved, now).await,
            Store::Postgres(s) => s.subscription_saved(mailbox, saved, now).await,
        }
    }

    /// Records a failed create or renew and when to try again.
    pub async fn subscription_failed(
        &self,
        mailbox: MailboxId,
        error: &str,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.subscription_failed(mailbox, error, now, retry_at).await,
            Store::Postgres(s) => s.subscription_failed(mailbox, error, now, retry_at).await,
        }
    }

    /// Marks a subscription for work now: `forget` drops it (Graph removed it: create a new
    /// one), else it is renewed. `false` when no such subscription is stored.
    pub async fn subscription_needs_work(
        &self,
        subscription_id: &str,
        forget: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => {
                s.subscription_needs_work(subscription_id, forget, now)
                    .await
            }
            Store::Postgres(s) => {
                s.subscription_needs_work(subscription_id, forget, now)
                    .await
            }
        }
    }

    /// The stored subscription with Graph id `subscription_id`.
    pub async fn subscription_by_id(
        &self,
        subscription_id: &str,
    ) -> Result<Option<SubscriptionRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.subscription_by_id(subscription_id).await,
            Store::Postgres(s) => s.subscription_by_id(subscription_id).await,
        }
    }

    /// The stored subscriptions among `ids`, in one query (a notification batch costs one
    /// lookup, whatever it carries).
    pub async fn subscriptions_by_ids(
        &self,
        ids: &[&str],
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Sqlite(s) => s.subscriptions_by_ids(ids).await,
            Store::Postgres(s) => s.subscriptions_by_ids(ids).await,
        }
    }

    /// [`request_sync`](Store::request_sync) for several mailboxes in one statement; returns
    /// how many were newly queued.
    pub async fn request_syncs(
        &self,
        mailboxes: &[MailboxId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        if mailboxes.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Sqlite(s) => s.request_syncs(mailboxes, now).await,
            Store::Postgres(s) => s.request_syncs(mailboxes, now).await,
        }
    }

    /// Every subscription row, by mailbox.
    pub async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.subscriptions().await,
            Store::Postgres(s) => s.subscriptions().await,
        }
    }

    /// The subscriptions of enabled mailboxes counted in the store, with at most `failures`
    /// of those whose last create or renew failed (by mailbox): what health shows, without
    /// reading every row.
    pub async fn subscription_counts(
        &self,
        now: DateTime<Utc>,
        failures: u32,
    ) -> Result<SubscriptionCounts, StoreError> {
        match self {
            Store::Sqlite(s) => s.subscription_counts(now, failures).await,
            Store::Postgres(s) => s.subscription_counts(now, failures).await,
        }
    }
}

const SELECT_RECORD: &str = "SELECT s.*, m.tenant, m.user_id, m.enabled AS mailbox_enabled
     FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id";

/// The counts' row (`rows`, `active`, `expired`, `without`, `failing`) with the failing
/// records listed.
fn counts_of<R>(
    row: &R,
    failures: Vec<SubscriptionRecord>,
) -> Result<SubscriptionCounts, StoreError>
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let count = |column| count_of(row, column);
    Ok(SubscriptionCounts {
        rows: count("rows")?,
        active: count("active")?,
        expired: count("expired")?,
        without: count("without")?,
        failing: count("failing")?,
        failures,
    })
}

fn failures(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn sqlite_record(row: &sqlx::sqlite::SqliteRow) -> Result<SubscriptionRecord, StoreError> {
    let next: String = row.try_get("next_attempt_at")?;
    let client_state: Option<String> = row.try_get("client_state")?;
    Ok(SubscriptionRecord {
        mailbox_id: row.try_get("mailbox_id")?,
        tenant: row.try_get("tenant")?,
        user_id: row.try_get("user_id")?,
        mailbox_enabled: row.try_get("mailbox_enabled")?,
        subscription_id: row.try_get("subscription_id")?,
        client_state: client_state.map(SecretString::from),
        expires_at: parse_opt_ts(row, "expires_at")?,
        created_at: parse_opt_ts(row, "created_at")?,
        renewed_at: parse_opt_ts(row, "renewed_at")?,
        renew_requested: row.try_get("renew_requested")?,
        last_error: row.try_get("last_error")?,
        last_error_at: parse_opt_ts(row, "last_error_at")?,
        consecutive_failures: failures(row.try_get("consecutive_failures")?),
        next_attempt_at: parse_ts("next_attempt_at", &next)?,
    })
}

fn pg_record(row: &sqlx::postgres::PgRow) -> Result<SubscriptionRecord, StoreError> {
    let client_state: Option<String> = row.try_get("client_state")?;
    let n: i32 = row.try_get("consecutive_failures")?;
    Ok(SubscriptionRecord {
        mailbox_id: row.try_get("mailbox_id")?,
        tenant: row.try_get("tenant")?,
        user_id: row.try_get("user_id")?,
        mailbox_enabled: row.try_get("mailbox_enabled")?,
        subscription_id: row.try_get("subscription_id")?,
        client_state: client_state.map(SecretString::from),
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
        renewed_at: row.try_get("renewed_at")?,
        renew_requested: row.try_get("renew_requested")?,
        last_error: row.try_get("last_error")?,
        last_error_at: row.try_get("last_error_at")?,
        consecutive_failures: failures(i64::from(n)),
        next_attempt_at: row.try_get("next_attempt_at")?,
    })
}

/// Error text kept short, without NULs (PostgreSQL text cannot hold them).
fn error_text(error: &str) -> String {
    error.chars().take(1000).filter(|c| *c != '\0').collect()
}

impl SubscriptionStore for SqliteStore {
    async fn claim_subscription(
        &self,
        mailbox: MailboxId,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO subscriptions (mailbox_id, next_attempt_at)
             SELECT id, ?2 FROM mailboxes WHERE id = ?1 AND enabled = 1
             ON CONFLICT (mailbox_id) DO NOTHING",
        )
        .bind(mailbox)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(
            "UPDATE subscriptions SET next_attempt_at = ?3
             WHERE mailbox_id = ?1 AND next_attempt_at <= ?2",
        )
        .bind(mailbox)
        .bind(ts(now))
        .bind(ts(until))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(claimed.rows_affected() == 1)
    }

    async fn request_syncs(
        &self,
        mailboxes: &[MailboxId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(concat!(
            "UPDATE mailboxes SET sync_requested_at = ?2, next_run_at = ",
            crate::store::requested_next_run!(sqlite),
            " WHERE id IN (SELECT value FROM json_each(?1)) AND enabled = 1
               AND sync_requested_at IS NULL"
        ))
        .bind(serde_json::to_string(mailboxes).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        .bind(ts(now))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn subscription_by_id(
        &self,
        subscription_id: &str,
    ) -> Result<Option<SubscriptionRecord>, StoreError> {
        let row = sqlx::query(&format!("{SELECT_RECORD} WHERE s.subscription_id = ?1"))
            .bind(subscription_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(sqlite_record).transpose()
    }

    async fn subscription_failed(
        &self,
        mailbox: MailboxId,
        error: &str,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE subscriptions SET last_error = ?2, last_error_at = ?3,
                 consecutive_failures = consecutive_failures + 1, next_attempt_at = ?4
             WHERE mailbox_id = ?1",
        )
        .bind(mailbox)
        .bind(error_text(error))
        .bind(ts(now))
        .bind(ts(retry_at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn subscription_needs_work(
        &self,
        subscription_id: &str,
        forget: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = if forget {
            sqlx::query(
                "UPDATE subscriptions SET subscription_id = NULL, client_state = NULL,
                     expires_at = NULL, renew_requested = 0, next_attempt_at = ?2
                 WHERE subscription_id = ?1",
            )
        } else {
            sqlx::query(
                "UPDATE subscriptions SET renew_requested = 1, next_attempt_at = ?2
                 WHERE subscription_id = ?1",
            )
        }
        .bind(subscription_id)
        .bind(ts(now))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn subscription_saved(
        &self,
        mailbox: MailboxId,
        saved: &SubscriptionSaved<'_>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE subscriptions SET subscription_id = ?2,
                 client_state = COALESCE(?3, client_state), expires_at = ?4,
                 created_at = CASE WHEN ?5 THEN ?6 ELSE created_at END,
                 renewed_at = CASE WHEN ?5 THEN NULL ELSE ?6 END,
                 renew_requested = 0, last_error = NULL, last_error_at = NULL,
                 consecutive_failures = 0, next_attempt_at = ?6
             WHERE mailbox_id = ?1",
        )
        .bind(mailbox)
        .bind(saved.subscription_id)
        .bind(saved.client_state.map(|c| c.expose_secret()))
        .bind(ts(saved.expires_at))
        .bind(saved.created)
        .bind(ts(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT_RECORD} ORDER BY s.mailbox_id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(sqlite_record).collect()
    }

    async fn subscription_counts(
        &self,
        now: DateTime<Utc>,
        failures: u32,
    ) -> Result<SubscriptionCounts, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT COUNT(*) AS rows,
                 COALESCE(SUM(s.subscription_id IS NOT NULL AND s.expires_at > ?1), 0) AS active,
                 COALESCE(SUM(s.subscription_id IS NOT NULL
                              AND (s.expires_at IS NULL OR s.expires_at <= ?1)), 0) AS expired,
                 COALESCE(SUM(s.subscription_id IS NULL), 0) AS without,
                 COALESCE(SUM(s.last_error IS NOT NULL), 0) AS failing
             FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id
             WHERE m.enabled = 1",
        )
        .bind(ts(now))
        .fetch_one(&mut *tx)
        .await?;
        let failing = sqlx::query(&format!(
            "{SELECT_RECORD} WHERE m.enabled = 1 AND s.last_error IS NOT NULL
             ORDER BY s.mailbox_id LIMIT ?1"
        ))
        .bind(i64::from(failures))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        counts_of(
            &row,
            failing
                .iter()
                .map(sqlite_record)
                .collect::<Result<_, _>>()?,
        )
    }

    async fn subscriptions_by_ids(
        &self,
        ids: &[&str],
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        // One JSON array parameter, however many ids (SQLite caps bound parameters).
        let rows = sqlx::query(&format!(
            "{SELECT_RECORD} WHERE s.subscription_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sqlite_record).collect()
    }

    async fn subscriptions_due(
        &self,
        now: DateTime<Utc>,
        renew_by: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SubscriptionDue>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id, m.tenant, m.user_id, s.subscription_id,
                    s.created_at IS NOT NULL AS had_subscription,
                    COALESCE(s.consecutive_failures, 0) AS consecutive_failures
             FROM mailboxes m LEFT JOIN subscriptions s ON s.mailbox_id = m.id
             WHERE m.enabled = 1
               AND (s.mailbox_id IS NULL OR s.next_attempt_at <= ?1)
               AND (s.subscription_id IS NULL OR s.renew_requested = 1 OR s.expires_at <= ?2)
             ORDER BY s.expires_at IS NOT NULL, s.expires_at, m.id
             LIMIT ?3",
        )
        .bind(ts(now))
        .bind(ts(renew_by))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SubscriptionDue {
                    mailbox_id: row.try_get("id")?,
                    tenant: row.try_get("tenant")?,
                    user_id: row.try_get("user_id")?,
                    subscription_id: row.try_get("subscription_id")?,
                    had_subscription: row.try_get("had_subscription")?,
                    consecutive_failures: failures(row.try_get("consecutive_failures")?),
                })
            })
            .collect()
    }
}

impl SubscriptionStore for PgStore {
    async fn claim_subscription(
        &self,
        mailbox: MailboxId,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        sqlx::query(
            "INSERT INTO subscriptions (mailbox_id, next_attempt_at)
             SELECT id, $2 FROM mailboxes WHERE id = $1 AND enabled
             ON CONFLICT (mailbox_id) DO NOTHING",
        )
        .bind(mailbox)
        .bind(now)
        .execute(&self.pool)
        .await?;
        // Under READ COMMITTED a concurrent claim waits for the row lock and re-checks the
        // condition on the row it then sees: one winner.
        let claimed = sqlx::query(
            "UPDATE subscriptions SET next_attempt_at = $3
             WHERE mailbox_id = $1 AND next_attempt_at <= $2",
        )
        .bind(mailbox)
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    async fn request_syncs(
        &self,
        mailboxes: &[MailboxId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(concat!(
            "UPDATE mailboxes SET sync_requested_at = $2, next_run_at = ",
            crate::store::requested_next_run!(postgres),
            " WHERE id = ANY($1) AND enabled AND sync_requested_at IS NULL"
        ))
        .bind(mailboxes)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn subscription_by_id(
        &self,
        subscription_id: &str,
    ) -> Result<Option<SubscriptionRecord>, StoreError> {
        let row = sqlx::query(&format!("{SELECT_RECORD} WHERE s.subscription_id = $1"))
            .bind(subscription_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(pg_record).transpose()
    }

    async fn subscription_failed(
        &self,
        mailbox: MailboxId,
        error: &str,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE subscriptions SET last_error = $2, last_error_at = $3,
                 consecutive_failures = consecutive_failures + 1, next_attempt_at = $4
             WHERE mailbox_id = $1",
        )
        .bind(mailbox)
        .bind(error_text(error))
        .bind(now)
        .bind(retry_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn subscription_needs_work(
        &self,
        subscription_id: &str,
        forget: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = if forget {
            sqlx::query(
                "UPDATE subscriptions SET subscription_id = NULL, client_state = NULL,
                     expires_at = NULL, renew_requested = false, next_attempt_at = $2
                 WHERE subscription_id = $1",
            )
        } else {
            sqlx::query(
                "UPDATE subscriptions SET renew_requested = true, next_attempt_at = $2
                 WHERE subscription_id = $1",
            )
        }
        .bind(subscription_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn subscription_saved(
        &self,
        mailbox: MailboxId,
        saved: &SubscriptionSaved<'_>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE subscriptions SET subscription_id = $2,
                 client_state = COALESCE($3, client_state), expires_at = $4,
                 created_at = CASE WHEN $5 THEN $6 ELSE created_at END,
                 renewed_at = CASE WHEN $5 THEN NULL ELSE $6 END,
                 renew_requested = false, last_error = NULL, last_error_at = NULL,
                 consecutive_failures = 0, next_attempt_at = $6
             WHERE mailbox_id = $1",
        )
        .bind(mailbox)
        .bind(saved.subscription_id)
        .bind(saved.client_state.map(|c| c.expose_secret()))
        .bind(saved.expires_at)
        .bind(saved.created)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT_RECORD} ORDER BY s.mailbox_id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(pg_record).collect()
    }

    async fn subscription_counts(
        &self,
        now: DateTime<Utc>,
        failures: u32,
    ) -> Result<SubscriptionCounts, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(
            "SELECT COUNT(*) AS rows,
                 COUNT(*) FILTER (WHERE s.subscription_id IS NOT NULL AND s.expires_at > $1)
                     AS active,
                 COUNT(*) FILTER (WHERE s.subscription_id IS NOT NULL
                                    AND (s.expires_at IS NULL OR s.expires_at <= $1))
                     AS expired,
                 COUNT(*) FILTER (WHERE s.subscription_id IS NULL) AS without,
                 COUNT(*) FILTER (WHERE s.last_error IS NOT NULL) AS failing
             FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id
             WHERE m.enabled",
        )
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let failing = sqlx::query(&format!(
            "{SELECT_RECORD} WHERE m.enabled AND s.last_error IS NOT NULL
             ORDER BY s.mailbox_id LIMIT $1"
        ))
        .bind(i64::from(failures))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        counts_of(
            &row,
            failing.iter().map(pg_record).collect::<Result<_, _>>()?,
        )
    }

    async fn subscriptions_by_ids(
        &self,
        ids: &[&str],
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let ids: Vec<String> = ids.iter().map(|id| id.replace('\0', "")).collect();
        let rows = sqlx::query(&format!(
            "{SELECT_RECORD} WHERE s.subscription_id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pg_record).collect()
    }

    async fn subscriptions_due(
        &self,
        now: DateTime<Utc>,
        renew_by: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SubscriptionDue>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id, m.tenant, m.user_id, s.subscription_id,
                    s.created_at IS NOT NULL AS had_subscription,
                    COALESCE(s.consecutive_failures, 0) AS consecutive_failures
             FROM mailboxes m LEFT JOIN subscriptions s ON s.mailbox_id = m.id
             WHERE m.enabled
               AND (s.mailbox_id IS NULL OR s.next_attempt_at <= $1)
               AND (s.subscription_id IS NULL OR s.renew_requested OR s.expires_at <= $2)
             ORDER BY s.expires_at NULLS FIRST, m.id
             LIMIT $3",
        )
        .bind(now)
        .bind(renew_by)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let n: i32 = row.try_get("consecutive_failures")?;
                Ok(SubscriptionDue {
                    mailbox_id: row.try_get("id")?,
                    tenant: row.try_get("tenant")?,
                    user_id: row.try_get("user_id")?,
                    subscription_id: row.try_get("subscription_id")?,
                    had_subscription: row.try_get("had_subscription")?,
                    consecutive_failures: failures(i64::from(n)),
                })
            })
            .collect()
    }
}
