//! The worker pool: claims due mailboxes from the store, runs each job under a hard deadline
//! enforced from outside the job, and writes the outcome and the next run time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::TokenProviders;
use crate::config::{Settings, SyncSettings};
use crate::graph::GraphClient;
use crate::resilience::backoff::BackoffSchedule;
use crate::store::{JobRecord, Lease, MailboxRecord, RunOutcome, Store};
use crate::sync::{self, RoundContext, SyncReport};

/// Extra lease time past the job deadline, so the lease never runs out under a live job.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How one job ended.
#[derive(Clone, Debug, Serialize)]
pub struct JobResult {
    pub tenant: String,
    pub mailbox: String,
    pub outcome: RunOutcome,
    pub error: Option<String>,
    pub report: SyncReport,
    pub next_run_at: DateTime<Utc>,
}

pub struct Worker {
    store: Store,
    graph: GraphClient,
    tokens: TokenProviders,
    sync: SyncSettings,
    max_pages_per_round: u32,
    failure_backoff: BackoffSchedule,
    owner: String,
    slots: Arc<Semaphore>,
}

impl Worker {
    pub fn new(
        settings: &Settings,
        store: Store,
        graph: GraphClient,
        tokens: TokenProviders,
    ) -> anyhow::Result<Self> {
        let failure_backoff = BackoffSchedule::new(
            settings.sync.failure_backoff_initial,
            settings.sync.failure_backoff_max,
        )?;
        Ok(Self {
            store,
            graph,
            tokens,
            sync: settings.sync.clone(),
            max_pages_per_round: settings.graph.max_pages_per_round,
            failure_backoff,
            owner: format!("calsync-{}", uuid::Uuid::new_v4()),
            slots: Arc::new(Semaphore::new(settings.sync.workers)),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn lease_length(&self) -> Duration {
        self.sync.job_deadline + LEASE_MARGIN
    }

    /// Claims as many due mailboxes as there are free slots and starts their jobs in `jobs`.
    /// Returns how many were started.
    pub async fn dispatch_due(
        self: &Arc<Self>,
        jobs: &mut JoinSet<JobResult>,
    ) -> anyhow::Result<usize> {
        let free = self.slots.available_permits();
        if free == 0 {
            return Ok(0);
        }
        let due = self
            .store
            .claim_due(&self.owner, Utc::now(), self.lease_length(), free as u32)
            .await?;
        let started = due.len();
        for mailbox in due {
            let permit = Arc::clone(&self.slots).acquire_owned().await?;
            let worker = Arc::clone(self);
            jobs.spawn(async move {
                let _slot = permit;
                worker.execute(mailbox).await
            });
        }
        Ok(started)
    }

    /// Runs until `shutdown`: then takes no new jobs and waits for running ones, each of which
    /// ends by its deadline.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut jobs = JoinSet::new();
        loop {
            if let Err(e) = self.dispatch_due(&mut jobs).await {
                tracing::error!(error = %crate::error_chain(e.as_ref()), "could not claim due mailboxes");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.sync.poll_interval) => {}
                Some(done) = jobs.join_next(), if !jobs.is_empty() => log_join(done),
            }
        }
        tracing::info!(
            running = jobs.len(),
            "shutting down: no new jobs; waiting for running ones"
        );
        while let Some(done) = jobs.join_next().await {
            log_join(done);
        }
    }

    /// One pass over every enabled mailbox, whatever its schedule (`calsync sync-once`).
    pub async fn sync_all_once(self: &Arc<Self>) -> anyhow::Result<Vec<JobResult>> {
        let mut jobs = JoinSet::new();
        let mut results = Vec::new();
        for mailbox in self.store.mailboxes().await? {
            let Some(claimed) = self
                .store
                .claim(mailbox.id, &self.owner, Utc::now(), self.lease_length())
                .await?
            else {
                tracing::warn!(mailbox = %mailbox.user_id, "skipped: leased by another worker");
                continue;
            };
            let permit = Arc::clone(&self.slots).acquire_owned().await?;
            let worker = Arc::clone(self);
            jobs.spawn(async move {
                let _slot = permit;
                worker.execute(claimed).await
            });
        }
        while let Some(done) = jobs.join_next().await {
            results.push(done?);
        }
        Ok(results)
    }

    /// Runs one claimed mailbox's job under the job deadline and records how it ended. The
    /// deadline wraps the whole job future, so nothing inside can outlive it.
    pub async fn execute(&self, mailbox: MailboxRecord) -> JobResult {
        let span = tracing::info_span!("sync_job", tenant = %mailbox.tenant, mailbox = %mailbox.user_id, id = mailbox.id);
        async {
            let lease = Lease {
                mailbox: mailbox.id,
                owner: self.owner.clone(),
            };
            let started_at = Utc::now();
            let mut report = SyncReport::default();
            let result: Result<(), (RunOutcome, String, Option<Duration>)> =
                match self.tokens.get(&mailbox.tenant) {
                    None => Err((
                        RunOutcome::Failed,
                        format!("tenant `{}` is not configured", mailbox.tenant),
                        None,
                    )),
                    Some(tokens) => {
                        let ctx = RoundContext {
                            graph: &self.graph,
                            store: &self.store,
                            tokens,
                            lease: &lease,
                            window_past: self.sync.window_past,
                            window_future: self.sync.window_future,
                            max_pages_per_round: self.max_pages_per_round,
                        };
                        let job = sync::run_round(&ctx, &mailbox, started_at, &mut report);
                        match tokio::time::timeout(self.sync.job_deadline, job).await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => {
                                if let Some(id) = e.request_ids().and_then(|i| i.request_id.clone()) {
                                    report.last_request_id = Some(id);
                                }
                                Err((RunOutcome::Failed, crate::error_chain(&e), e.retry_after()))
                            }
                            Err(_) => Err((
                                RunOutcome::DeadlineExceeded,
                                format!(
                                    "job deadline of {} exceeded; the job was cancelled",
                                    crate::config::HumanDuration(self.sync.job_deadline)
                                ),
                                None,
                            )),
                        }
                    }
                };
            let finished_at = Utc::now();
            let (outcome, error, retry_after) = match result {
                Ok(()) => (RunOutcome::Ok, None, None),
                Err((outcome, message, retry)) => (outcome, Some(message), retry),
            };
            let next_run_at = self.next_run(&mailbox, outcome, retry_after, finished_at);
            match &error {
                None => tracing::info!(
                    pages = report.pages, upserted = report.upserted, deleted = report.deleted,
                    full = report.full_round, "sync job done"
                ),
                Some(message) => tracing::warn!(
                    outcome = outcome.as_str(), error = %message,
                    request_id = report.last_request_id.as_deref().unwrap_or("-"),
                    next_run_at = %next_run_at, "sync job failed"
                ),
            }
            let record = JobRecord {
                started_at,
                finished_at,
                outcome,
                full_round: report.full_round,
                pages: report.pages,
                upserted: report.upserted,
                deleted: report.deleted,
                error: error.clone(),
                request_id: report.last_request_id.clone(),
                next_run_at,
            };
            if let Err(e) = self.store.finish_job(&lease, &record).await {
                tracing::error!(error = %e, "could not record the job's end; its lease will run out");
            }
            JobResult {
                tenant: mailbox.tenant.clone(),
                mailbox: mailbox.user_id.clone(),
                outcome,
                error,
                report,
                next_run_at,
            }
        }
        .instrument(span)
        .await
    }

    /// Success: one interval later, plus jitter so mailboxes do not march in step. Failure: the
    /// server's `Retry-After` if it gave one, else exponential backoff by consecutive failures.
    fn next_run(
        &self,
        mailbox: &MailboxRecord,
        outcome: RunOutcome,
        retry_after: Option<Duration>,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let wait = match outcome {
            RunOutcome::Ok => {
                let jitter_ms = self.sync.jitter.as_millis() as u64;
                let jitter = if jitter_ms == 0 {
                    0
                } else {
                    rand::thread_rng().gen_range(0..jitter_ms)
                };
                self.sync.interval + Duration::from_millis(jitter)
            }
            RunOutcome::Failed | RunOutcome::DeadlineExceeded => retry_after
                .unwrap_or_else(|| self.failure_backoff.delay(mailbox.consecutive_failures)),
        };
        now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::days(1))
    }
}

fn log_join(done: Result<JobResult, tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a sync job panicked; its lease will run out and it will be retried");
    }
}
