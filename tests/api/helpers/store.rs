//! The store harness: a test body run against a fresh SQLite file or a fresh PostgreSQL
//! schema (dropped afterwards, even when the test fails), the same body on both backends.

use std::future::Future;
use std::io::Write;
use std::sync::Once;
use std::time::Duration;

use calsync::store::Store;
use sqlx::Connection;

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    on_sqlite_at(|store, _| test(store)).await;
}

/// [`on_sqlite`] for a test that also reads the database itself: it is given the store's URL.
pub async fn on_sqlite_at<F, Fut>(test: F)
where
    F: FnOnce(Store, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = Store::connect(&url, 8).await.expect("SQLite store opens");
    store.migrate().await.expect("SQLite migrations run");
    test(store.clone(), url).await;
    store.close().await;
}

pub async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    on_postgres_at(|store, _| test(store)).await;
}

/// [`on_postgres`] for a test that also reads the database itself: it is given the store's URL.
pub async fn on_postgres_at<F, Fut>(test: F)
where
    F: FnOnce(Store, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let outcome = match Store::connect(&schema.url, 8).await {
        Ok(store) => {
            let outcome = match store.migrate().await {
                Ok(()) => run_caught(test(store.clone(), schema.url.clone())).await,
                Err(e) => Err(Box::new(format!("PostgreSQL migrations: {e}")) as _),
            };
            store.close().await;
            outcome
        }
        Err(e) => Err(Box::new(format!("PostgreSQL store: {e}")) as _),
    };
    schema.drop_after(outcome).await;
}

/// Runs `test` against a schema of its own in the test database (`test` is given its URL), and
/// drops the schema afterwards, even when the test fails: for a PostgreSQL test that does not
/// start from a migrated [`Store`] as [`on_postgres`] gives. Without PostgreSQL it does what
/// [`TestSchema::create`] says.
pub async fn in_postgres_schema<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let outcome = run_caught(test(schema.url.clone())).await;
    schema.drop_after(outcome).await;
}

pub type Panic = Box<dyn std::any::Any + Send>;

/// Runs `test` as a task, so that its panic is caught and the schema still dropped.
pub async fn run_caught(test: impl Future<Output = ()> + Send + 'static) -> Result<(), Panic> {
    tokio::spawn(test).await.map_err(|e| {
        e.try_into_panic()
            .unwrap_or_else(|e| Box::new(format!("test task: {e}")))
    })
}

/// A schema of its own in the test database, for one test.
pub struct TestSchema {
    admin: sqlx::PgConnection,
    name: String,
    /// The database URL with this schema as the search path.
    pub url: String,
}

impl TestSchema {
    /// `None` when PostgreSQL is unreachable and not required (said once, on stderr).
    pub async fn create() -> Option<Self> {
        let base = std::env::var("CALSYNC_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string());
        let mut admin = match admin_connection(&base).await {
            Ok(admin) => admin,
            Err(reason) => {
                postgres_unavailable(&base, &reason);
                return None;
            }
        };
        let name = format!("calsync_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .expect("create the test's schema");
        let mut url = url::Url::parse(&base).expect("CALSYNC_TEST_POSTGRES_URL is a URL");
        url.query_pairs_mut()
            .append_pair("options[search_path]", &name);
        Some(Self {
            admin,
            name,
            url: url.to_string(),
        })
    }

    /// Drops the schema, then re-raises the test's panic if it had one.
    pub async fn drop_after(mut self, outcome: Result<(), Panic>) {
        let dropped = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&mut self.admin)
            .await;
        let _ = self.admin.close().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        dropped.expect("drop the test's schema");
    }
}

async fn admin_connection(url: &str) -> Result<sqlx::PgConnection, String> {
    match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no connection within 5s".into()),
    }
}

fn postgres_unavailable(url: &str, reason: &str) {
    let url = calsync::app::redact_url(url);
    if std::env::var("CALSYNC_REQUIRE_POSTGRES").as_deref() == Ok("1") {
        panic!(
            "PostgreSQL is required (CALSYNC_REQUIRE_POSTGRES=1) but {url} is unusable: {reason}"
        );
    }
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        // Straight to the process's stderr: the test harness captures `eprintln!` of passing
        // tests, and this must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** PostgreSQL tests were NOT run: {url}: {reason}\n*** (set \
             CALSYNC_TEST_POSTGRES_URL; CALSYNC_REQUIRE_POSTGRES=1 makes this a failure)\n"
        );
    });
}
