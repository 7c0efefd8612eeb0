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

mod checkpoints;
mod job_ends;
mod mailboxes;
mod rounds;
mod writes;

pub(in crate::store) use mailboxes::mailbox_from_row;

/// `2026-12-09T20:30:00.000Z`: fixed width, so text order is time order. Written digit by
/// digit (chrono's writer goes through `fmt`, several times the cost, and a job writes a few of
/// these per statement); a year outside 0..=9999 or a leap second is left to chrono.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let chrono_ts = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    // Once: each accessor of a `DateTime` converts it to local time again.
    let (date, time) = (t.date_naive(), t.time());
    let (Ok(year @ 0..=9999), nanos @ 0..=999_999_999) =
        (u32::try_from(date.year()), time.nanosecond())
    else {
        return chrono_ts(t);
    };
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (at, n) in [
        (0..4, year),
        (5..7, date.month()),
        (8..10, date.day()),
        (11..13, time.hour()),
        (14..16, time.minute()),
        (17..19, time.second()),
        (20..23, nanos / 1_000_000),
    ] {
        let mut n = n;
        for digit in text[at].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    String::from_utf8(text.to_vec()).unwrap_or_else(|_| chrono_ts(t))
}

/// Reads what [`ts`] writes without chrono's general parser (which handles every RFC 3339
/// form, at several times the cost); anything else goes to that parser.
pub(super) fn parse_ts(column: &str, text: &str) -> Result<DateTime<Utc>, StoreError> {
    if let Some(t) = fixed_ts(text) {
        return Ok(t);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("{column} `{text}`: {e}")))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` exactly, and a valid date and time; else `None`.
fn fixed_ts(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() != 24 || b[23] != b'Z' {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        b[from..to].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ];
    if separators.iter().any(|&(at, c)| b[at] != c) {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(number(0, 4)?).ok()?,
        number(5, 7)?,
        number(8, 10)?,
    )?;
    let time = chrono::NaiveTime::from_hms_milli_opt(
        number(11, 13)?,
        number(14, 16)?,
        number(17, 19)?,
        number(20, 23)?,
    )?;
    // `:60` (a leap second) is no valid time here: chrono's parser takes it.
    Some(date.and_time(time).and_utc())
}

/// Ids (text or integers) as a JSON array, for `IN (SELECT value FROM json_each(?))`.
pub(super) fn json_list<S: serde::Serialize>(ids: &[S]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())
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
    /// Job ends waiting for the writer, committed together.
    ends: std::sync::Arc<job_ends::JobEnds>,
    /// Checkpoints the WAL beside the writer, so that the writer does not wait for the disk.
    checkpointer: Option<std::sync::Arc<checkpoints::Checkpointer>>,
}

impl SqliteStore {
    // Write transactions start with BEGIN IMMEDIATE: a deferred transaction that reads first
    // and writes later gets SQLITE_BUSY at once when another writer got there in between (the
    // busy timeout does not apply to that upgrade), which would fail jobs under load.

    /// Opens (creating if missing) the database at `url` (`sqlite://PATH`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::open(url, max_connections, checkpoints::Checkpoints::default()).await
    }

    async fn open(
        url: &str,
        max_connections: u32,
        checkpoints: checkpoints::Checkpoints,
    ) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // 8 KiB pages for new stores: a stored event with its raw JSON is ~2 KB, so 4 KiB
            // pages split often during a sync; 16 KiB made each idle round's commits write
            // (and checksum) 16 KiB WAL frames. Measured with `calsync bench --instructions`.
            .page_size(8192)
            // Temporary data in memory: a page's multi-row upsert keeps a statement journal
            // (to undo half a statement), which past 64 KiB SQLite otherwise spilled to a new
            // file in the temporary directory, created and deleted again for nearly every page
            // write, and a write failed where that directory was full or not writable.
            .pragma("temp_store", "memory")
            .pragma("wal_autocheckpoint", checkpoints.writer_frames.to_string())
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
        let checkpointer = match checkpoints.background_every {
            Some(every) => Some(std::sync::Arc::new(
                checkpoints::Checkpointer::start(&options, every).await?,
            )),
            None => None,
        };
        // Waiting for the writer is bounded by the job deadline around every job.
        let mut writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .test_before_acquire(false);
        if let Some(checkpointer) = &checkpointer {
            let released = checkpointer.on_release();
            writer = writer.after_release(move |_, _| {
                released();
                Box::pin(std::future::ready(Ok(true)))
            });
        }
        let writer = writer.connect_with(options).await?;
        Ok(Self {
            pool,
            writer,
            ends: Default::default(),
            checkpointer,
        })
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
        let latest = migrations::SQLITE.latest();
        migrations::migrator(migrations::SQLITE)
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
        self.writer.close().await;
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.stop().await;
        }
    }
}

/// A store in a new file at `path`, migrated: what a test of this backend starts from.
#[cfg(test)]
pub(super) async fn migrated_store(path: &std::path::Path, connections: u32) -> SqliteStore {
    use crate::store::contract::Lifecycle;
    let url = format!("sqlite://{}", path.display());
    let store = SqliteStore::connect(&url, connections)
        .await
        .expect("store opens");
    store.migrate().await.expect("store migrates");
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timestamps written and read by hand are chrono's, for every millisecond of a few
    /// awkward days and for a spread of instants over the years a store meets.
    #[test]
    fn timestamps_are_written_and_read_as_chrono_does() {
        let chrono_ts = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut instants: Vec<DateTime<Utc>> = Vec::new();
        for day in [
            "1970-01-01",
            "1999-12-31",
            "2024-02-29",
            "2026-12-31",
            "9999-12-31",
        ] {
            let start = NaiveDate::parse_from_str(day, "%Y-%m-%d")
                .expect("date")
                .and_hms_opt(0, 0, 0)
                .expect("time")
                .and_utc();
            for ms in (0..86_400_000_i64).step_by(997) {
                instants.push(start + chrono::Duration::milliseconds(ms));
            }
            instants.push(start + chrono::Duration::milliseconds(86_399_999));
        }
        for secs in (-62_000_000_000_i64..253_000_000_000).step_by(1_234_567_891) {
            instants.extend(DateTime::from_timestamp(secs, 123_456_789));
        }
        for t in instants {
            let text = ts(t);
            assert_eq!(text, chrono_ts(t), "{t:?}");
            assert_eq!(
                parse_ts("c", &text).expect("reads back"),
                DateTime::parse_from_rfc3339(&text).expect("chrono reads it"),
                "{text}"
            );
        }
        // Outside the fixed form: chrono's parser, with its errors.
        for (text, read) in [
            (
                "2026-12-09T21:30:00.000+01:00",
                Some("2026-12-09T20:30:00.000Z"),
            ),
            ("2026-12-09T20:30:00Z", Some("2026-12-09T20:30:00.000Z")),
            ("2026-12-09T20:30:00.5Z", Some("2026-12-09T20:30:00.500Z")),
            ("2026-02-30T20:30:00.000Z", None),
            ("2026-12-09T24:30:00.000Z", None),
            ("2026-12-09 20:30:00.000Z", Some("2026-12-09T20:30:00.000Z")),
            ("2026-12-09T20:30:0x.000Z", None),
            ("+002026-12-09T20:30:00.000Z", None),
        ] {
            assert_eq!(parse_ts("c", text).ok().map(ts).as_deref(), read, "{text}");
        }
        // Beyond year 9999 and leap seconds, chrono writes.
        let far = DateTime::from_timestamp(300_000_000_000, 0).expect("year 11476");
        assert_eq!(ts(far), chrono_ts(far));
    }

    /// `.cargo/config.toml` reaches the bundled SQLite: it is built without memory statistics
    /// and without memory management (each a global mutex on a hot path otherwise). Fails if
    /// a build stops reading that file (a build context without it, a moved workspace root).
    #[tokio::test]
    async fn the_bundled_sqlite_takes_no_global_mutex_for_memory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = migrated_store(&dir.path().join("c.db"), 1).await;
        let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
            .fetch_all(&store.pool)
            .await
            .expect("compile options");
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "SQLite built with {options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "SQLite built with {options:?}"
        );
        store.close().await;
    }

    /// Every connection, the writer's and the readers', keeps SQLite's temporary data (a page
    /// write's statement journal, sorts) in memory (2 is `MEMORY`), so a page write creates no
    /// temporary file.
    #[tokio::test]
    async fn every_connection_keeps_temporary_data_in_memory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = migrated_store(&dir.path().join("t.db"), 2).await;
        for pool in [&store.writer, &store.pool] {
            let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
                .fetch_one(pool)
                .await
                .expect("temp_store");
            assert_eq!(temp_store, 2);
        }
        store.close().await;
    }
}
