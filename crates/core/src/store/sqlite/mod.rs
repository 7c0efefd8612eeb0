//! SQLite store: the embedded default for a single instance.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

// The contract's traits: a backend implements them, a caller reaches them through `Store`.
use crate::store::contract::*;
use crate::store::{migrations, StoreError};

mod mailboxes;
mod rounds;
mod writes;

pub(in crate::store) use mailboxes::mailbox_from_row;

/// `2026-12-09T20:30:00.000Z`: fixed width, so text order is time order.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn parse_ts(column: &str, text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("{column} `{text}`: {e}")))
}

pub(super) fn parse_opt_ts(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| parse_ts(column, &t)).transpose()
}

fn parse_opt_date(row: &SqliteRow, column: &str) -> Result<Option<NaiveDate>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| {
        NaiveDate::parse_from_str(&t, "%Y-%m-%d")
            .map_err(|e| StoreError::Corrupt(format!("{column} `{t}`: {e}")))
    })
    .transpose()
}

#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Readers (WAL lets them run beside a write).
    pub(super) pool: SqlitePool,
    /// The one connection that writes. SQLite admits one writer at a time; queueing writers
    /// here, in order, beats letting them collide in SQLite, whose busy handler sleeps up to
    /// 100 ms per retry.
    pub(super) writer: SqlitePool,
}

impl SqliteStore {
    // Write transactions start with BEGIN IMMEDIATE: a deferred transaction that reads first
    // and writes later gets SQLITE_BUSY at once when another writer got there in between (the
    // busy timeout does not apply to that upgrade), which would fail jobs under load.

    /// Opens (creating if missing) the database at `url` (`sqlite://PATH`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // 8 KiB pages for new stores: a stored event with its raw JSON is ~2 KB, so 4 KiB
            // pages split often during a sync; 16 KiB made each idle round's commits write
            // (and checksum) 16 KiB WAL frames. Measured with `calsync bench --instructions`.
            .page_size(8192)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // No ping before each use: a connection here is a thread in this process, not a
        // socket that can go stale, and sqlx already pings it when it comes back to the pool
        // (dropping one that fails). The ping was a round trip to that thread per statement.
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        // Waiting for the writer is bounded by the job deadline around every job.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self { pool, writer })
    }

    /// A SQLite file has one process working on it, so leases left by an earlier process that
    /// died are released at start instead of waiting for them to run out, and its row in the
    /// replica registry is removed.
    pub async fn release_stale_leases(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE mailboxes SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL",
        )
        .execute(&self.writer)
        .await?;
        // Their replica rows too: a dead process's share of the request rates is free at once.
        sqlx::query("DELETE FROM replicas")
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

impl Lifecycle for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        migrations::migrator(migrations::SQLITE)
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
        self.writer.close().await;
    }
}
