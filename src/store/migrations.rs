//! Migrations embedded in the binary (a container has no source tree), run through sqlx's
//! migrator so applied versions and checksums are tracked in `_sqlx_migrations`.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

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
        6,
        "retired subscriptions",
        include_str!("../../migrations/sqlite/0006_retired_subscriptions.sql"),
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
        6,
        "retired subscriptions",
        include_str!("../../migrations/postgres/0006_retired_subscriptions.sql"),
    ),
]);

pub async fn migrator(source: Embedded) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(source).await
}
