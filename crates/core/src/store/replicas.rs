//! The replica registry: every running calsync process sharing the store has a row with its
//! heartbeat and the share of the fleet-wide request rates it keeps to, so the replicas can
//! split Graph's app-wide and per-tenant limits between them (see
//! [`crate::scheduler::fleet`]). A write is one statement, committed before the caller reads
//! the others: of two replicas starting together, at least one sees the other.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::contract::*;
use super::sqlite::{parse_ts, ts};
use super::{PgStore, SqliteStore, Store, StoreError};

/// A replica's row, as the others see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub replica_id: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// From `heartbeat_at` on, its requests stay within `limit / n` in every 1-second window;
    /// `None`: it sends none.
    pub keeps_share_of: Option<u32>,
}

fn share_of(n: Option<i64>) -> Option<u32> {
    n.map(|n| u32::try_from(n.max(1)).unwrap_or(u32::MAX))
}

impl Store {
    /// Writes this replica's heartbeat and promise, creating its row.
    pub async fn replica_heartbeat(
        &self,
        id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
        keeps_share_of: Option<u32>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                s.replica_heartbeat(id, started_at, now, keeps_share_of)
                    .await
            }
            Store::Postgres(s) => {
                s.replica_heartbeat(id, started_at, now, keeps_share_of)
                    .await
            }
        }
    }

    /// Replicas whose last heartbeat is later than `live_after`, by id.
    pub async fn live_replicas(
        &self,
        live_after: DateTime<Utc>,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.live_replicas(live_after).await,
            Store::Postgres(s) => s.live_replicas(live_after).await,
        }
    }

    /// Removes a replica's row (at a clean stop); whether it existed.
    pub async fn remove_replica(&self, id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.remove_replica(id).await,
            Store::Postgres(s) => s.remove_replica(id).await,
        }
    }

    /// Deletes the rows of replicas whose last heartbeat is before `before` (dead ones');
    /// returns how many.
    pub async fn forget_replicas(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.forget_replicas(before).await,
            Store::Postgres(s) => s.forget_replicas(before).await,
        }
    }
}

impl ReplicaStore for SqliteStore {
    async fn replica_heartbeat(
        &self,
        id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
        keeps_share_of: Option<u32>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (replica_id, started_at, heartbeat_at, keeps_share_of)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (replica_id) DO UPDATE
                 SET heartbeat_at = excluded.heartbeat_at, keeps_share_of = excluded.keeps_share_of",
        )
        .bind(id)
        .bind(ts(started_at))
        .bind(ts(now))
        .bind(keeps_share_of.map(i64::from))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn live_replicas(
        &self,
        live_after: DateTime<Utc>,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        // The writer: a reader's snapshot could predate a heartbeat just committed there.
        let rows = sqlx::query(
            "SELECT replica_id, started_at, heartbeat_at, keeps_share_of FROM replicas
             WHERE heartbeat_at > ?1 ORDER BY replica_id",
        )
        .bind(ts(live_after))
        .fetch_all(&self.writer)
        .await?;
        rows.iter()
            .map(|row| {
                let started: String = row.try_get("started_at")?;
                let heartbeat: String = row.try_get("heartbeat_at")?;
                Ok(ReplicaRecord {
                    replica_id: row.try_get("replica_id")?,
                    started_at: parse_ts("started_at", &started)?,
                    heartbeat_at: parse_ts("heartbeat_at", &heartbeat)?,
                    keeps_share_of: share_of(row.try_get("keeps_share_of")?),
                })
            })
            .collect()
    }

    async fn remove_replica(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM replicas WHERE replica_id = ?1")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn forget_replicas(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM replicas WHERE heartbeat_at < ?1")
            .bind(ts(before))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

impl ReplicaStore for PgStore {
    async fn replica_heartbeat(
        &self,
        id: &str,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
        keeps_share_of: Option<u32>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (replica_id, started_at, heartbeat_at, keeps_share_of)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (replica_id) DO UPDATE
                 SET heartbeat_at = excluded.heartbeat_at, keeps_share_of = excluded.keeps_share_of",
        )
        .bind(id)
        .bind(started_at)
        .bind(now)
        .bind(keeps_share_of.map(|n| i32::try_from(n).unwrap_or(i32::MAX)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn live_replicas(
        &self,
        live_after: DateTime<Utc>,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT replica_id, started_at, heartbeat_at, keeps_share_of FROM replicas
             WHERE heartbeat_at > $1 ORDER BY replica_id",
        )
        .bind(live_after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let n: Option<i32> = row.try_get("keeps_share_of")?;
                Ok(ReplicaRecord {
                    replica_id: row.try_get("replica_id")?,
                    started_at: row.try_get("started_at")?,
                    heartbeat_at: row.try_get("heartbeat_at")?,
                    keeps_share_of: share_of(n.map(i64::from)),
                })
            })
            .collect()
    }

    async fn remove_replica(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM replicas WHERE replica_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn forget_replicas(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM replicas WHERE heartbeat_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
