//! PostgreSQL store: one database shared by any number of replicas.
//!
//! Replica safety rests on two things. A claim is one conditional `UPDATE` (under READ
//! COMMITTED a concurrent claim waits for the row lock and re-checks the lease on the row it
//! then sees), so exactly one claimant wins. Every write of a job checks `lease_owner` (and,
//! for a page, the round) under the mailbox row's lock inside its transaction, so once another
//! replica's claim has committed, nothing from the old owner can commit after it. Clocks only
//! decide when a lease may be taken over, never whether a write is accepted.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

// The contract's traits: a backend implements them, a caller reaches them through `Store`.
use crate::store::contract::*;
use crate::store::{migrations, StoreError};

mod mailboxes;
mod rounds;
mod writes;

pub(in crate::store) use mailboxes::mailbox_from_row;

/// Serialises `sync_config_mailboxes` of replicas starting together (an arbitrary constant,
/// "calsync" in ASCII).
const CONFIG_SYNC_LOCK: i64 = 0x63_616c_7379_6e63;

/// How long a pooled connection may have been idle and still be used without a ping first.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

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
            // A connection back from work a moment ago is not pinged before its next use
            // (sqlx pings every one by default): a ping is a round trip, as many as a page's
            // whole write. A connection that died meanwhile fails that use, is dropped, and the
            // job is retried like any other store error.
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

impl Lifecycle for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let latest = migrations::POSTGRES.latest();
        migrations::migrator(migrations::POSTGRES)
            .await?
            .run(&self.pool)
            .await
            .map_err(|e| migrations::refused(e, latest))
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
