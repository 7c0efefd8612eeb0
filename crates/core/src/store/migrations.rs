//! Migrations embedded in the binary (a container has no source tree), run through sqlx's
//! migrator so applied versions and checksums are tracked in `_sqlx_migrations`.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

use super::StoreError;

#[derive(Debug)]
pub struct Embedded(pub &'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

pub const SQLITE: Embedded = Embedded(&[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "sync requests",
        include_str!("../../migrations/sqlite/0002_sync_requests.sql"),
    ),
    (
        3,
        "subscriptions",
        include_str!("../../migrations/sqlite/0003_subscriptions.sql"),
    ),
    (
        4,
        "recurring series",
        include_str!("../../migrations/sqlite/0004_recurring_series.sql"),
    ),
    (
        6,
        "retired subscriptions",
        include_str!("../../migrations/sqlite/0006_retired_subscriptions.sql"),
    ),
    (
        7,
        "quarantine",
        include_str!("../../migrations/sqlite/0007_quarantine.sql"),
    ),
    (
        8,
        "replicas",
        include_str!("../../migrations/sqlite/0008_replicas.sql"),
    ),
    (
        9,
        "writes",
        include_str!("../../migrations/sqlite/0009_writes.sql"),
    ),
    (
        10,
        "due by tenant",
        include_str!("../../migrations/sqlite/0010_due_by_tenant.sql"),
    ),
]);

pub const POSTGRES: Embedded = Embedded(&[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "sync requests",
        include_str!("../../migrations/postgres/0002_sync_requests.sql"),
    ),
    (
        3,
        "subscriptions",
        include_str!("../../migrations/postgres/0003_subscriptions.sql"),
    ),
    (
        4,
        "recurring series",
        include_str!("../../migrations/postgres/0004_recurring_series.sql"),
    ),
    (
        6,
        "retired subscriptions",
        include_str!("../../migrations/postgres/0006_retired_subscriptions.sql"),
    ),
    (
        7,
        "quarantine",
        include_str!("../../migrations/postgres/0007_quarantine.sql"),
    ),
    (
        8,
        "replicas",
        include_str!("../../migrations/postgres/0008_replicas.sql"),
    ),
    (
        9,
        "writes",
        include_str!("../../migrations/postgres/0009_writes.sql"),
    ),
    (
        10,
        "due by tenant",
        include_str!("../../migrations/postgres/0010_due_by_tenant.sql"),
    ),
    (
        11,
        "lz4 for the stored json",
        include_str!("../../migrations/postgres/0011_lz4_raw.sql"),
    ),
]);

pub async fn migrator(source: Embedded) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(source).await
}

impl Embedded {
    /// The newest migration this binary carries.
    pub fn latest(&self) -> i64 {
        self.0
            .iter()
            .map(|(version, ..)| *version)
            .max()
            .unwrap_or(0)
    }
}

/// A failed run of the migrator, in words an operator can act on where the store is one this
/// binary cannot run on: one that a newer calsync migrated, or one whose applied migration
/// differs from this binary's. `latest` is this binary's newest migration.
///
/// The process stops on it: sqlx's migrator keeps its lock when it fails (on PostgreSQL, the
/// advisory lock of the pool connection it ran on), so the same pool must not migrate again.
pub fn refused(e: MigrateError, latest: i64) -> StoreError {
    match e {
        MigrateError::VersionMissing(version) => StoreError::NewerStore { version, latest },
        MigrateError::VersionMismatch(version) => StoreError::ChangedMigration { version },
        other => StoreError::Migrate(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// A store written by calsync before recurring series were filled in: occurrences stored
    /// with empty fields, a series master stored as a calendar entry at its first date, a
    /// completed round. Upgrading removes the master and makes every mailbox start a full
    /// round, whose reconciliation rewrites or removes everything else.
    #[tokio::test]
    async fn an_old_store_is_repaired_on_upgrade() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        let store = Store::connect(&url, 2).await.expect("opens");
        let Store::Sqlite(sqlite) = &store else {
            panic!("a SQLite store")
        };
        migrator(Embedded(&SQLITE.0[..3]))
            .await
            .expect("old migrations")
            .run(&sqlite.pool)
            .await
            .expect("run");
        for sql in [
            "INSERT INTO mailboxes (id, tenant, user_id, window_start, window_end, delta_link,
                 round_id, round_full, next_run_at, created_at)
             VALUES (1, 't', 'u', '2026-11-01T00:00:00.000Z', '2027-05-30T00:00:00.000Z',
                 'https://graph.microsoft.com/v1.0/delta?$deltatoken=x', 3, 0,
                 '2026-12-01T00:00:00.000Z', '2026-11-01T00:00:00.000Z')",
            "INSERT INTO events (mailbox_id, event_id, start_utc, end_utc, is_all_day, is_cancelled,
                 event_type, attendees, raw, seen_round, synced_at)
             VALUES (1, 'master', '2019-03-04T09:00:00.000Z', '2019-03-04T09:30:00.000Z', 0, 0,
                 'seriesMaster', '[]', '{}', 3, '2026-12-01T00:00:00.000Z'),
                    (1, 'occ', '2026-12-07T09:00:00.000Z', '2026-12-07T09:30:00.000Z', 0, 0,
                 'occurrence', '[]', '{}', 3, '2026-12-01T00:00:00.000Z')",
        ] {
            sqlx::query(sql)
                .execute(&sqlite.pool)
                .await
                .expect("old rows");
        }

        store.migrate().await.expect("upgrade");

        let mailbox = store.mailbox_by_id(1).await.expect("reads").expect("kept");
        // No window: run_round starts a full round, a new round id, and reconciles at its end.
        assert_eq!(mailbox.cursor.window, None, "the window is dropped");
        assert_eq!(mailbox.cursor.delta_link, None);
        assert!(mailbox.cursor.full, "the next round is a full one");
        let ids: Vec<String> = store
            .events(1)
            .await
            .expect("reads")
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["occ"], "the stored master is no calendar entry");
        assert_eq!(
            store.events(1).await.expect("reads")[0].categories,
            Vec::<String>::new()
        );
        store.close().await;
    }

    /// Each released migration's checksum (the first 8 bytes of sqlx's SHA-384 of its text),
    /// as every store migrated by a release holds it in `_sqlx_migrations`.
    const RELEASED_SQLITE: &[(i64, &str)] = &[
        (1, "e256486321ab9049"),
        (2, "6b5969d3a3c7d3b3"),
        (3, "a7ac479c449bf375"),
        (4, "aa41c9423a86e921"),
        (6, "eb1f14f7e7205e55"),
        (7, "0b393607d0d34654"),
        (8, "aed9f1968b97cafa"),
        (9, "1d1951560cd680e9"),
        (10, "8770900f17ec910a"),
    ];
    const RELEASED_POSTGRES: &[(i64, &str)] = &[
        (1, "ca1480c6377c46c5"),
        (2, "f4b01469862bbfa0"),
        (3, "d1e25be35e48d24d"),
        (4, "7c879c89d054b483"),
        (6, "051a623da06bfc78"),
        (7, "87846eb93ff607a8"),
        (8, "b6139d6c3ba8601f"),
        (9, "d070e156dd913fdd"),
        (10, "8ec3dfa4b0faded5"),
        (11, "e1893d81a8874b2d"),
    ];

    /// A migration never changes once released, not even a comment: sqlx compares the text of
    /// every applied migration with the binary's at start, so an edited one stops every store
    /// an earlier release migrated ([`StoreError::ChangedMigration`]). A change to the schema
    /// is a new migration; a new migration's checksum is added here when it is written.
    #[tokio::test]
    async fn released_migrations_never_change() {
        for (backend, source, released) in [
            ("SQLite", SQLITE, RELEASED_SQLITE),
            ("PostgreSQL", POSTGRES, RELEASED_POSTGRES),
        ] {
            let embedded: Vec<(i64, String)> = source
                .resolve()
                .await
                .expect("resolves")
                .iter()
                .map(|m| {
                    let prefix: String =
                        m.checksum[..8].iter().map(|b| format!("{b:02x}")).collect();
                    (m.version, prefix)
                })
                .collect();
            let released: Vec<(i64, String)> =
                released.iter().map(|(v, c)| (*v, c.to_string())).collect();
            assert_eq!(
                embedded, released,
                "{backend}: a released migration changed, or a new one has no checksum here yet"
            );
        }
    }
}
