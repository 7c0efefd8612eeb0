//! WAL checkpoints off the writer's path.
//!
//! In WAL mode a commit appends pages to the WAL, and a checkpoint copies them into the
//! database file and syncs both files. SQLite runs the checkpoint in the connection whose
//! commit took the WAL past `wal_autocheckpoint` frames: with the default of 1,000, the one
//! writer that every page write waits for stopped for the disk every 8 MiB written (a quarter
//! of its time in `calsync bench`, blocked in `fsync`). Here a connection of its own
//! checkpoints after every few uses of the writer, beside the writer's next commits.
//!
//! What it cannot do while the writer keeps committing: a checkpoint that has not reached the
//! WAL's last frame (the writer appended more meanwhile) does not sync the database file, and
//! the WAL starts again from its beginning only after one that has. So under a sustained write
//! load the writer still checkpoints itself at [`Checkpoints::writer_frames`], copying only
//! what came since the last background checkpoint, and syncing; under any lighter load the
//! background checkpoints reach the end and the writer never does.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Who checkpoints a store's WAL.
#[derive(Clone, Copy, Debug)]
pub(super) struct Checkpoints {
    /// A connection of the store's own checkpoints after this many uses of the writer (`None`
    /// only in tests). Counted in uses, not in time, so that what a write costs does not
    /// depend on the machine's speed (`calsync bench --instructions` counts it). 128 against
    /// 32: the same initial sync, and idle rounds that copy their few hot pages less often
    /// (349,496 instructions per idle mailbox round against 354,901; 345,609 before).
    pub background_every: Option<u32>,
    /// WAL frames past which a commit checkpoints in the committing connection itself
    /// (`wal_autocheckpoint`), and so the WAL's size: 16,000 frames of an 8 KiB page are
    /// 125 MiB. Measured with `calsync bench --sync-only`: with 4,000, the background
    /// checkpoints saved the initial sync a third less time (BENCHMARKS.md).
    pub writer_frames: u32,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            background_every: Some(128),
            writer_frames: 16_000,
        }
    }
}

/// Uses of the writer since the last checkpoint was asked for.
#[derive(Debug)]
struct Uses {
    every: u32,
    since: AtomicU32,
    due: Notify,
}

impl Uses {
    /// Counts one use; asks for a checkpoint at every `every`th.
    fn count(&self) -> bool {
        let n = self.since.fetch_add(1, Ordering::Relaxed) + 1;
        if n < self.every {
            return false;
        }
        self.since.store(0, Ordering::Relaxed);
        self.due.notify_one();
        true
    }
}

/// The background checkpoints of one store: told of each use of the writer, stopped when the
/// store is closed or its last clone dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    uses: Arc<Uses>,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Checkpointer {
    /// Starts checkpointing the database of `options` on a connection of its own, after every
    /// `every` uses of the writer.
    pub(super) async fn start(
        options: &SqliteConnectOptions,
        every: u32,
    ) -> Result<Self, sqlx::Error> {
        let connection = SqliteConnection::connect_with(options).await?;
        let uses = Arc::new(Uses {
            every: every.max(1),
            since: AtomicU32::new(0),
            due: Notify::new(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(connection, Arc::clone(&uses), stop.clone()));
        Ok(Self {
            uses,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// What the writer's pool calls each time the writer is released.
    pub(super) fn on_release(&self) -> impl Fn() + Send + Sync + 'static {
        let uses = Arc::clone(&self.uses);
        move || {
            uses.count();
        }
    }

    /// Stops checkpointing (a checkpoint under way is finished) and closes the connection.
    pub(super) async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut task| task.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(mut connection: SqliteConnection, uses: Arc<Uses>, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = uses.due.notified() => {}
        }
        // PASSIVE: copies what no reader still needs, waits for no one, and leaves the writer
        // free to commit meanwhile.
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut connection)
            .await
        {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("WAL checkpoints work again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(
                    %error,
                    "WAL checkpoint failed; the writer checkpoints itself when the WAL grows past its limit"
                );
            }
            Err(error) => tracing::debug!(%error, "WAL checkpoint failed again"),
        }
    }
    let _ = connection.close().await;
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::store::contract::Lifecycle;
    use crate::store::sqlite::SqliteStore;

    /// Rows of 6,000 bytes: one to an 8 KiB page, so `ROWS` rows are about as many WAL frames.
    const ROWS: i64 = 2_000;
    const ROW_BYTES: i64 = 6_000;

    async fn store(path: &Path, checkpoints: Checkpoints) -> SqliteStore {
        let url = format!("sqlite://{}", path.display());
        let store = SqliteStore::open(&url, 2, checkpoints)
            .await
            .expect("store opens");
        store.migrate().await.expect("store migrates");
        store
    }

    /// `ROWS` rows written in one transaction through the writer, as page writes are.
    async fn write_rows(store: &SqliteStore) {
        sqlx::query("CREATE TABLE IF NOT EXISTS filler (b BLOB NOT NULL)")
            .execute(&store.writer)
            .await
            .expect("table");
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO filler SELECT randomblob(?2) FROM n",
        )
        .bind(ROWS)
        .bind(ROW_BYTES)
        .execute(&store.writer)
        .await
        .expect("rows written");
    }

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    fn wal(path: &Path) -> PathBuf {
        PathBuf::from(format!("{}-wal", path.display()))
    }

    const WRITTEN: u64 = (ROWS * ROW_BYTES) as u64;

    /// The writer alone checkpoints, past `writer_frames`.
    fn writer_only(writer_frames: u32) -> Checkpoints {
        Checkpoints {
            background_every: None,
            writer_frames,
        }
    }

    /// Waits until `done`, for at most 60 s; `what` says what was awaited and what was seen.
    async fn wait_until(mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{} in 60 s", what());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SQLite's default would have checkpointed in the writer's commit after 1,000 frames; the
    /// writer now leaves them in the WAL (for the background checkpoints, off here).
    #[tokio::test]
    async fn the_writer_does_not_checkpoint_below_its_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("w.db");
        let store = store(&path, writer_only(Checkpoints::default().writer_frames)).await;
        let before = len(&path);
        write_rows(&store).await;
        assert!(len(&wal(&path)) > WRITTEN, "the rows are in the WAL");
        assert_eq!(len(&path), before, "and not yet in the database file");
        store.close().await;
    }

    /// Past its limit the writer checkpoints itself: the WAL stays bounded when nothing else
    /// checkpoints.
    #[tokio::test]
    async fn past_its_limit_the_writer_checkpoints_itself() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("l.db");
        let store = store(&path, writer_only(500)).await;
        let before = len(&path);
        write_rows(&store).await;
        assert!(
            len(&path) >= before + WRITTEN,
            "the commit copied the rows into the database file"
        );
        store.close().await;
    }

    /// The writer asks for a checkpoint at every `every`th use, not before.
    #[test]
    fn a_checkpoint_is_asked_for_every_so_many_uses() {
        let uses = Uses {
            every: 3,
            since: AtomicU32::new(0),
            due: Notify::new(),
        };
        let asked: Vec<bool> = (0..7).map(|_| uses.count()).collect();
        assert_eq!(asked, [false, false, true, false, false, true, false]);
    }

    /// With nothing but the writer's uses, the rows reach the database file: the background
    /// connection checkpointed them.
    #[tokio::test]
    async fn the_background_connection_copies_the_wal_into_the_database() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("b.db");
        let checkpoints = Checkpoints::default();
        let store = store(&path, checkpoints).await;
        let before = len(&path);
        write_rows(&store).await;
        // Uses enough for a checkpoint, whatever the migration and the rows took.
        for _ in 0..checkpoints
            .background_every
            .expect("background checkpoints")
        {
            sqlx::query("SELECT 1")
                .execute(&store.writer)
                .await
                .expect("writer used");
        }
        wait_until(
            || len(&path) >= before + WRITTEN,
            || {
                format!(
                    "no checkpoint (the database file has {} bytes, the WAL {})",
                    len(&path),
                    len(&wal(&path))
                )
            },
        )
        .await;
        store.close().await;
    }

    /// A store dropped without `close` stops its checkpoints: the task ends (and drops its
    /// connection) instead of outliving every handle to the store.
    #[tokio::test]
    async fn a_dropped_store_stops_its_checkpoints() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("d.db");
        let store = store(&path, Checkpoints::default()).await;
        write_rows(&store).await;
        let task_alive = Arc::downgrade(
            &store
                .checkpointer
                .as_ref()
                .expect("background checkpoints")
                .uses,
        );
        drop(store);
        wait_until(
            || task_alive.upgrade().is_none(),
            || "the checkpoints task still runs after the store was dropped".into(),
        )
        .await;
    }
}
