//! Graph subscriptions that outlived their mailbox (removed through the API, or disabled by
//! leaving the config): kept until Graph confirms their deletion, so Graph stops notifying us
//! about a mailbox we no longer hold, and a later row for the same mailbox starts clean.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::contract::*;
use super::sqlite::ts;
use super::{PgStore, SqliteStore, Store, StoreError};

/// A subscription to delete at Graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiredSubscription {
    pub subscription_id: String,
    pub tenant: String,
    pub user_id: String,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// Binds the mailbox id (1) and now (2).
pub(super) const SQLITE_RETIRE_OF_MAILBOX: &str =
    "INSERT INTO retired_subscriptions (subscription_id, tenant, user_id, retired_at, next_attempt_at)
     SELECT s.subscription_id, m.tenant, m.user_id, ?2, ?2
     FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id
     WHERE s.mailbox_id = ?1 AND s.subscription_id IS NOT NULL
     ON CONFLICT (subscription_id) DO NOTHING";
pub(super) const PG_RETIRE_OF_MAILBOX: &str =
    "INSERT INTO retired_subscriptions (subscription_id, tenant, user_id, retired_at, next_attempt_at)
     SELECT s.subscription_id, m.tenant, m.user_id, $2, $2
     FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id
     WHERE s.mailbox_id = $1 AND s.subscription_id IS NOT NULL
     ON CONFLICT (subscription_id) DO NOTHING";

fn failures(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

impl Store {
    /// Moves the live subscriptions of disabled mailboxes to the retired list (their rows
    /// forget them); returns how many.
    pub async fn retire_disabled_subscriptions(
        &self,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.retire_disabled_subscriptions(now).await,
            Store::Postgres(s) => s.retire_disabled_subscriptions(now).await,
        }
    }

    /// Retired subscriptions not claimed or backing off, oldest first, at most `limit`.
    pub async fn retired_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<RetiredSubscription>, StoreError> {
        match self {
            Store::Sqlite(s) => s.retired_due(now, limit).await,
            Store::Postgres(s) => s.retired_due(now, limit).await,
        }
    }

    /// Claims a retired subscription until `until`: of several replicas, one gets `true`.
    pub async fn claim_retired(
        &self,
        id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.claim_retired(id, now, until).await,
            Store::Postgres(s) => s.claim_retired(id, now, until).await,
        }
    }

    /// Graph deleted it (or no longer had it): forgotten.
    pub async fn retired_deleted(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.retired_deleted(id).await,
            Store::Postgres(s) => s.retired_deleted(id).await,
        }
    }

    /// The deletion failed: try again at `retry_at`.
    pub async fn retired_failed(
        &self,
        id: &str,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.retired_failed(id, error, retry_at).await,
            Store::Postgres(s) => s.retired_failed(id, error, retry_at).await,
        }
    }

    /// Retires a subscription Graph has and no row knows (left by a re-created store).
    pub async fn retire_orphan(
        &self,
        id: &str,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.retire_orphan(id, tenant, user_id, now).await,
            Store::Postgres(s) => s.retire_orphan(id, tenant, user_id, now).await,
        }
    }

    /// Every retired subscription still to delete.
    pub async fn retired_subscriptions(&self) -> Result<Vec<RetiredSubscription>, StoreError> {
        self.retired_due(Utc::now() + chrono::Duration::days(36_500), u32::MAX)
            .await
    }
}

fn error_text(error: &str) -> String {
    error.chars().take(1000).filter(|c| *c != '\0').collect()
}

impl RetiredStore for SqliteStore {
    async fn retire_disabled_subscriptions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let moved = sqlx::query(
            "INSERT INTO retired_subscriptions (subscription_id, tenant, user_id, retired_at, next_attempt_at)
             SELECT s.subscription_id, m.tenant, m.user_id, ?1, ?1
             FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id
             WHERE m.enabled = 0 AND s.subscription_id IS NOT NULL
             ON CONFLICT (subscription_id) DO NOTHING",
        )
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE subscriptions SET subscription_id = NULL, client_state = NULL, expires_at = NULL
             WHERE subscription_id IS NOT NULL
               AND mailbox_id IN (SELECT id FROM mailboxes WHERE enabled = 0)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(moved.rows_affected())
    }

    async fn retired_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<RetiredSubscription>, StoreError> {
        let rows = sqlx::query(
            "SELECT subscription_id, tenant, user_id, consecutive_failures, last_error
             FROM retired_subscriptions WHERE next_attempt_at <= ?1
             ORDER BY retired_at, subscription_id LIMIT ?2",
        )
        .bind(ts(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RetiredSubscription {
                    subscription_id: row.try_get("subscription_id")?,
                    tenant: row.try_get("tenant")?,
                    user_id: row.try_get("user_id")?,
                    consecutive_failures: failures(row.try_get("consecutive_failures")?),
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    async fn claim_retired(
        &self,
        id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE retired_subscriptions SET next_attempt_at = ?3
             WHERE subscription_id = ?1 AND next_attempt_at <= ?2",
        )
        .bind(id)
        .bind(ts(now))
        .bind(ts(until))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn retired_deleted(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM retired_subscriptions WHERE subscription_id = ?1")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn retired_failed(
        &self,
        id: &str,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE retired_subscriptions SET last_error = ?2,
                 consecutive_failures = consecutive_failures + 1, next_attempt_at = ?3
             WHERE subscription_id = ?1",
        )
        .bind(id)
        .bind(error_text(error))
        .bind(ts(retry_at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn retire_orphan(
        &self,
        id: &str,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO retired_subscriptions (subscription_id, tenant, user_id, retired_at, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (subscription_id) DO NOTHING",
        )
        .bind(id)
        .bind(tenant)
        .bind(user_id)
        .bind(ts(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}

impl RetiredStore for PgStore {
    async fn retire_disabled_subscriptions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "INSERT INTO retired_subscriptions (subscription_id, tenant, user_id, retired_at, next_attempt_at)
             SELECT s.subscription_id, m.tenant, m.user_id, $1, $1
             FROM subscriptions s JOIN mailboxes m ON m.id = s.mailbox_id
             WHERE NOT m.enabled AND s.subscription_id IS NOT NULL
             ON CONFLICT (subscription_id) DO NOTHING",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE subscriptions SET subscription_id = NULL, client_state = NULL, expires_at = NULL
             WHERE subscription_id IS NOT NULL
               AND mailbox_id IN (SELECT id FROM mailboxes WHERE NOT enabled)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(moved.rows_affected())
    }

    async fn retired_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<RetiredSubscription>, StoreError> {
        let rows = sqlx::query(
            "SELECT subscription_id, tenant, user_id, consecutive_failures, last_error
             FROM retired_subscriptions WHERE next_attempt_at <= $1
             ORDER BY retired_at, subscription_id LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let n: i32 = row.try_get("consecutive_failures")?;
                Ok(RetiredSubscription {
                    subscription_id: row.try_get("subscription_id")?,
                    tenant: row.try_get("tenant")?,
                    user_id: row.try_get("user_id")?,
                    consecutive_failures: failures(i64::from(n)),
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    async fn claim_retired(
        &self,
        id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE retired_subscriptions SET next_attempt_at = $3
             WHERE subscription_id = $1 AND next_attempt_at <= $2",
        )
        .bind(id)
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn retired_deleted(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM retired_subscriptions WHERE subscription_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn retired_failed(
        &self,
        id: &str,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE retired_subscriptions SET last_error = $2,
                 consecutive_failures = consecutive_failures + 1, next_attempt_at = $3
             WHERE subscription_id = $1",
        )
        .bind(id)
        .bind(error_text(error))
        .bind(retry_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retire_orphan(
        &self,
        id: &str,
        tenant: &str,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO retired_subscriptions (subscription_id, tenant, user_id, retired_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (subscription_id) DO NOTHING",
        )
        .bind(id.replace('\0', ""))
        .bind(tenant)
        .bind(user_id.replace('\0', ""))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
