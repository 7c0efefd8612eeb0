//! Job ends committed together (group commit). Every job ends with a write (its lease released,
//! its next run, its history), and on a quiet day that write is most of an idle round's cost:
//! a transaction of its own means a WAL commit (frames written and checksummed, the WAL index
//! locked and updated) and five round trips to SQLite's connection thread. Jobs that end while
//! another job's end is being committed wait for it and are then committed together, in one
//! transaction, one round trip each. Nothing waits for company: a job that ends alone is
//! committed at once.
//!
//! Each job's statements are fenced on its own lease, as alone. If the shared transaction
//! fails, each end is tried again in a transaction of its own, so that one end's error is that
//! job's alone.

use std::sync::{Arc, Mutex};

use sqlx::SqlitePool;
use tokio::sync::oneshot;

use super::ts;
use crate::store::{JobRecord, Lease, RunOutcome, StoreError, RUNS_KEPT_PER_MAILBOX};

/// A job's end, waiting for its commit.
struct Pending {
    lease: Lease,
    job: JobRecord,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The ends waiting to be committed, and the turn to commit them.
#[derive(Default)]
pub(super) struct JobEnds {
    waiting: Mutex<Vec<Pending>>,
    /// Held while a batch is committed (by a spawned task, so that a caller dropped mid-commit,
    /// as at shutdown, does not abandon the other ends of its batch).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for JobEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEnds").finish_non_exhaustive()
    }
}

impl JobEnds {
    /// Commits `job`'s end, with whatever other ends are waiting when its turn comes.
    pub(super) async fn finish(
        &self,
        writer: &SqlitePool,
        lease: &Lease,
        job: &JobRecord,
    ) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.lock().push(Pending {
            lease: lease.clone(),
            job: job.clone(),
            done,
        });
        let turn = Arc::clone(&self.turn).lock_owned().await;
        // Empty when the batch committed before this turn took this end along.
        let batch = std::mem::take(&mut *self.lock());
        if !batch.is_empty() {
            let writer = writer.clone();
            tokio::spawn(async move {
                commit(&writer, batch).await;
                drop(turn);
            });
        }
        committed.await.unwrap_or_else(|_| {
            Err(StoreError::Interrupted(
                "the job's end was dropped before it was committed (the runtime is shutting down)",
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        // A poisoned lock only means a panic elsewhere while pushing or taking: the list is
        // still a list.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn commit(writer: &SqlitePool, batch: Vec<Pending>) {
    if batch.len() > 1 && end_all(writer, &batch).await.is_ok() {
        for end in batch {
            // The caller may be gone (dropped at shutdown); its end is committed regardless.
            let _ = end.done.send(Ok(()));
        }
        return;
    }
    for end in batch {
        let result = end_all(writer, std::slice::from_ref(&end)).await;
        let _ = end.done.send(result);
    }
}

/// Writes `ends` in one transaction.
async fn end_all(writer: &SqlitePool, ends: &[Pending]) -> Result<(), StoreError> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    for Pending { lease, job, .. } in ends {
        end_one(&mut tx, lease, job).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One job's end, in one round trip to the connection's thread: the mailbox's row, fenced on
/// the lease; the run appended to the history; the history pruned to
/// [`RUNS_KEPT_PER_MAILBOX`]. SQLite runs the three statements in turn, and sqlx binds each
/// one's numbered parameters from the one list. (It also steps a count through the list for
/// every number a statement skips, and stops binding once that count passes the list's end:
/// the numbering below keeps the skips, 6 + 0 + 9, within the 18 values.)
async fn end_one(
    tx: &mut sqlx::SqliteConnection,
    lease: &Lease,
    job: &JobRecord,
) -> Result<(), StoreError> {
    let ok = job.outcome == RunOutcome::Ok;
    let failed = job.outcome.counts_as_failure();
    sqlx::query(
        "UPDATE mailboxes SET lease_owner = NULL, lease_until = NULL,
             next_run_at = CASE WHEN sync_requested_at IS NOT NULL AND ?16 IS NULL
                 THEN MIN(?12, sync_requested_at) ELSE ?12 END,
             hold_until = ?16,
             last_attempt_at = ?2,
             last_success_at = CASE WHEN ?13 THEN ?3 ELSE last_success_at END,
             last_error = CASE WHEN ?13 THEN last_error ELSE ?9 END,
             last_error_at = CASE WHEN ?13 THEN last_error_at ELSE ?3 END,
             last_request_id = COALESCE(?10, last_request_id),
             consecutive_failures = CASE WHEN ?13 THEN 0
                 WHEN ?15 THEN consecutive_failures + 1 ELSE consecutive_failures END,
             next_link = CASE WHEN round_id = ?18 THEN NULL ELSE next_link END,
             delta_link = CASE WHEN round_id = ?18 THEN ?17 ELSE delta_link END,
             failing_link = CASE WHEN round_id = ?18 THEN NULL ELSE failing_link END,
             failing_link_count = CASE WHEN round_id = ?18 THEN 0 ELSE failing_link_count END
         WHERE id = ?1 AND lease_owner = ?14;
         INSERT INTO sync_runs (mailbox_id, started_at, finished_at, outcome, full_round,
             pages, upserted, deleted, error, request_id)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10
         WHERE EXISTS (SELECT 1 FROM mailboxes WHERE id = ?1);
         DELETE FROM sync_runs WHERE mailbox_id = ?1 AND id <= (
             SELECT id FROM sync_runs WHERE mailbox_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?11)",
    )
    .bind(lease.mailbox)
    .bind(ts(job.started_at))
    .bind(ts(job.finished_at))
    .bind(job.outcome.as_str())
    .bind(job.full_round)
    .bind(job.pages as i64)
    .bind(job.upserted as i64)
    .bind(job.deleted as i64)
    .bind(&job.error)
    .bind(&job.request_id)
    .bind(RUNS_KEPT_PER_MAILBOX)
    .bind(ts(job.next_run_at))
    .bind(ok)
    .bind(&lease.owner)
    .bind(failed)
    .bind(job.hold_until.map(ts))
    .bind(job.round_end.as_ref().map(|end| &end.delta_link))
    // No round end: no round id matches, and the cursor stays.
    .bind(job.round_end.as_ref().map(|end| end.round_id))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use sqlx::Connection;

    use super::*;
    use crate::store::contract::{Lifecycle, MailboxStore};
    use crate::store::sqlite::SqliteStore;
    use crate::store::MailboxId;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_790_000_000 + secs, 0).expect("a valid time")
    }

    fn job(outcome: RunOutcome, next_run_at: DateTime<Utc>) -> JobRecord {
        JobRecord {
            started_at: at(0),
            finished_at: at(1),
            outcome,
            full_round: false,
            pages: 1,
            upserted: 0,
            deleted: 0,
            error: (outcome != RunOutcome::Ok).then(|| "it failed".into()),
            request_id: None,
            next_run_at,
            hold_until: None,
            round_end: None,
        }
    }

    /// A store with `n` mailboxes, each leased to `job-<id>`.
    async fn leased(dir: &tempfile::TempDir, n: usize) -> (SqliteStore, Vec<Lease>) {
        let store = super::super::migrated_store(&dir.path().join("ends.db"), 2).await;
        let users: Vec<(String, String)> = (0..n).map(|i| ("t".into(), format!("u{i}"))).collect();
        store
            .sync_config_mailboxes(&users, at(0))
            .await
            .expect("mailboxes");
        let mut leases = Vec::new();
        for (_, user) in &users {
            let id = store
                .mailbox("t", user)
                .await
                .expect("reads")
                .expect("registered")
                .id;
            let owner = format!("job-{id}");
            store
                .claim(id, &owner, at(0), Duration::from_secs(60), false)
                .await
                .expect("claims")
                .expect("free");
            leases.push(Lease { mailbox: id, owner });
        }
        (store, leases)
    }

    /// Commits `ends` as one batch and returns each end's result, in order.
    async fn commit_batch(
        store: &SqliteStore,
        ends: Vec<(Lease, JobRecord)>,
    ) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::new();
        let mut batch = Vec::new();
        for (lease, job) in ends {
            let (done, result) = oneshot::channel();
            batch.push(Pending { lease, job, done });
            results.push(result);
        }
        commit(&store.writer, batch).await;
        let mut out = Vec::new();
        for result in results {
            out.push(result.await.expect("every end is answered"));
        }
        out
    }

    async fn state(store: &SqliteStore, id: MailboxId) -> (Option<String>, DateTime<Utc>, usize) {
        let m = store
            .mailbox_by_id(id)
            .await
            .expect("reads")
            .expect("exists");
        let runs = store.runs(id, 10).await.expect("runs").len();
        (m.lease_owner, m.next_run_at, runs)
    }

    /// Ends committed in one transaction land each on its own mailbox, each fenced on its
    /// own lease: a stale one among them writes nothing to the mailbox.
    #[tokio::test]
    async fn a_batch_lands_each_end_on_its_own_mailbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, leases) = leased(&dir, 4).await;
        let stale = Lease {
            mailbox: leases[3].mailbox,
            owner: "an-old-job".into(),
        };
        let ends = vec![
            (leases[0].clone(), job(RunOutcome::Ok, at(100))),
            (leases[1].clone(), job(RunOutcome::Failed, at(200))),
            (leases[2].clone(), job(RunOutcome::Ok, at(300))),
            (stale, job(RunOutcome::Ok, at(400))),
        ];
        let results = commit_batch(&store, ends).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(state(&store, leases[0].mailbox).await, (None, at(100), 1));
        assert_eq!(state(&store, leases[1].mailbox).await, (None, at(200), 1));
        let failed = store
            .mailbox_by_id(leases[1].mailbox)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(
            (failed.consecutive_failures, failed.last_error.as_deref()),
            (1, Some("it failed"))
        );
        assert_eq!(state(&store, leases[2].mailbox).await, (None, at(300), 1));
        let (owner, next_run_at, _) = state(&store, leases[3].mailbox).await;
        assert_eq!(
            (owner.as_deref(), next_run_at),
            (Some(leases[3].owner.as_str()), at(0)),
            "the stale end left the holder's lease and schedule"
        );
        store.close().await;
    }

    /// One end that the database refuses fails alone: the others of its batch are committed.
    #[tokio::test]
    async fn one_refused_end_does_not_fail_its_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, leases) = leased(&dir, 3).await;
        let refused = leases[1].mailbox;
        let url = format!("sqlite://{}", dir.path().join("ends.db").display());
        let mut raw = sqlx::SqliteConnection::connect(&url).await.expect("opens");
        sqlx::query(&format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON sync_runs WHEN NEW.mailbox_id = {refused}
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ))
        .execute(&mut raw)
        .await
        .expect("trigger");
        raw.close().await.expect("closes");
        let ends = leases
            .iter()
            .map(|l| (l.clone(), job(RunOutcome::Ok, at(100))))
            .collect();
        let results = commit_batch(&store, ends).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        let error = results[1].as_ref().expect_err("refused").to_string();
        assert!(error.contains("refused by the test"), "{error}");
        assert_eq!(state(&store, leases[0].mailbox).await, (None, at(100), 1));
        assert_eq!(state(&store, leases[2].mailbox).await, (None, at(100), 1));
        let (owner, _, runs) = state(&store, refused).await;
        assert_eq!(
            (owner.as_deref(), runs),
            (Some(leases[1].owner.as_str()), 0),
            "the refused end changed nothing"
        );
        store.close().await;
    }
}
