//! The worker pool: picks due mailboxes fairly across tenants (skipping tenants whose breaker
//! is open, capping each tenant's share), runs each job under a hard deadline enforced from
//! outside the job with a heartbeat on its lease, frees the slot of a job that does not stop
//! when cancelled, and writes each outcome with the next run time.

pub mod fair;
pub mod fleet;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{HumanDuration, ResilienceSettings, Settings, SyncSettings, WriteSettings};
use crate::graph::GraphClient;
use crate::resilience::backoff::BackoffSchedule;
use crate::resilience::guard::BreakerSnapshot;
use crate::resilience::retry::RetryPolicy;
use crate::resilience::{after_retry_after, RunningJobCount};
use crate::store::{JobRecord, Lease, MailboxId, MailboxRecord, RunOutcome, Store};
use crate::sync::writes::WritePolicy;
use crate::sync::{self, RoundContext, SyncError, SyncReport};
use crate::tenants::Tenants;

/// Stuck jobs remembered for health output.
const STUCK_KEPT: usize = 20;

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

/// A worker slot and the tenant's running-job count, held by a job. The stuck-job detector can
/// take it from a job that does not stop, so the slot serves new work.
struct JobSlot {
    _permit: OwnedSemaphorePermit,
    _count: RunningJobCount,
}

type SharedSlot = Arc<Mutex<Option<JobSlot>>>;

struct RunningJob {
    tenant: String,
    mailbox: String,
    started: Instant,
    deadline: Instant,
    slot: SharedSlot,
}

/// A job that ran past its deadline plus `sync.stuck_grace` without stopping.
#[derive(Clone, Debug, Serialize)]
pub struct StuckJob {
    pub tenant: String,
    pub mailbox: String,
    pub detected_at: DateTime<Utc>,
    pub running_seconds: f64,
    /// Set if the job did end later (it was blocking, not lost).
    pub finished_after_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunningJobInfo {
    pub tenant: String,
    pub mailbox: String,
    pub running_seconds: f64,
}

/// The worker's view for `/healthz`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    pub workers: usize,
    pub busy_slots: usize,
    pub running: Vec<RunningJobInfo>,
    pub longest_running_seconds: f64,
    pub stuck_total: u64,
    pub stuck_recent: Vec<StuckJob>,
}

pub struct Worker {
    store: Store,
    graph: GraphClient,
    tenants: Arc<Tenants>,
    sync: SyncSettings,
    resilience: ResilienceSettings,
    writes: WriteSettings,
    max_pages_per_round: u32,
    page_failure_limit: u32,
    /// When a failed job's mailbox runs again.
    failure_retry: RetryPolicy,
    /// Retries of one Graph request within a job.
    request_retry: RetryPolicy,
    owner: String,
    job_seq: AtomicU64,
    slots: Arc<Semaphore>,
    running: Mutex<HashMap<u64, RunningJob>>,
    stuck: Mutex<(u64, Vec<StuckJob>)>,
}

impl Worker {
    pub fn new(
        settings: &Settings,
        store: Store,
        graph: GraphClient,
        tenants: Arc<Tenants>,
    ) -> anyhow::Result<Self> {
        let failure_backoff = BackoffSchedule::new(
            settings.sync.failure_backoff_initial,
            settings.sync.failure_backoff_max,
        )?;
        let retry_backoff = BackoffSchedule::new(
            settings.resilience.retry_initial,
            settings.resilience.retry_max,
        )?;
        Ok(Self {
            store,
            graph,
            tenants,
            sync: settings.sync.clone(),
            resilience: settings.resilience.clone(),
            writes: settings.writes.clone(),
            max_pages_per_round: settings.graph.max_pages_per_round,
            page_failure_limit: settings.graph.page_failure_limit,
            failure_retry: RetryPolicy::new(0, failure_backoff),
            request_retry: RetryPolicy::new(settings.resilience.retries_per_request, retry_backoff),
            owner: format!("calsync-{}", uuid::Uuid::new_v4()),
            job_seq: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(settings.sync.workers)),
            running: Mutex::new(HashMap::new()),
            stuck: Mutex::new((0, Vec::new())),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Each job leases its mailbox under its own name, so a write from a job that lost its
    /// lease (stuck, then reclaimed) is refused even within this process. Mailboxes claimed
    /// together share a batch name; a job's lease is that name and its mailbox's id (see
    /// [`Store::claim_many`]).
    fn batch_owner(&self) -> String {
        let batch = self.job_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}/{batch}:", self.owner)
    }

    /// Starts the job of `mailbox`, claimed in `batch`, in `permit`'s slot; `false` (its lease
    /// left to run out) for a tenant no longer configured.
    fn start_job(
        self: &Arc<Self>,
        jobs: &mut JoinSet<JobResult>,
        batch: &str,
        mailbox: MailboxRecord,
        permit: OwnedSemaphorePermit,
    ) -> bool {
        let Some(tenant) = self.tenants.get(&mailbox.tenant) else {
            return false;
        };
        // The job's number in this worker (for the running-job registry) and its lease's name.
        let seq = self.job_seq.fetch_add(1, Ordering::Relaxed);
        let owner = format!("{batch}{}", mailbox.id);
        let slot = JobSlot {
            _permit: permit,
            _count: tenant.guard.start_job(),
        };
        let worker = Arc::clone(self);
        jobs.spawn(async move { worker.execute(mailbox, seq, owner, slot).await });
        true
    }

    /// How many jobs of `tenant` may start now (see [`Tenant::allowance`]).
    fn allowance(&self, tenant: &str) -> usize {
        self.tenants
            .get(tenant)
            .map_or(0, |t| t.allowance(self.sync.max_jobs_per_tenant))
    }

    /// Claims due mailboxes for the free slots, fairly across tenants, and starts their jobs
    /// in `jobs`. Returns how many were started.
    pub async fn dispatch_due(
        self: &Arc<Self>,
        jobs: &mut JoinSet<JobResult>,
    ) -> anyhow::Result<usize> {
        let free = self.slots.available_permits();
        // Without a share of the request rates (not admitted by the fleet yet, or a stale
        // heartbeat) a job could only wait: leave the mailboxes to the replicas that have one.
        if free == 0 || !self.tenants.limits().has_share() {
            return Ok(0);
        }
        let now = Utc::now();
        let candidates = self
            .store
            .due_candidates(now, self.sync.max_jobs_per_tenant as u32)
            .await?;
        // A slot for each pick first, so that every mailbox claimed has one to run in.
        let mut permits = Vec::new();
        let mut ids = Vec::new();
        for due in fair::pick(candidates, free, |t| self.allowance(t)) {
            let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
                break;
            };
            permits.push(permit);
            ids.push(due.id);
        }
        // One statement for all of them: each claim is a write, and on SQLite a write is a
        // commit and a round trip to the store's one writer.
        let batch = self.batch_owner();
        let claimed = self
            .store
            .claim_many(&ids, &batch, now, self.sync.lease_ttl, true)
            .await?;
        let mut started = 0;
        for (mailbox, permit) in claimed.into_iter().zip(permits) {
            started += usize::from(self.start_job(jobs, &batch, mailbox, permit));
        }
        Ok(started)
    }

    /// Runs until `shutdown`: then takes no new jobs and waits for running ones, each of which
    /// ends by its deadline.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let watchdog = tokio::spawn(Arc::clone(&self).watch_for_stuck_jobs(shutdown.clone()));
        let mut jobs = JoinSet::new();
        let mut last_shrink = Instant::now();
        loop {
            if let Err(e) = self.dispatch_due(&mut jobs).await {
                tracing::error!(error = %crate::error_chain(e.as_ref()), "could not claim due mailboxes");
            }
            if last_shrink.elapsed() > Duration::from_secs(60) {
                self.tenants.limits().shrink();
                last_shrink = Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.sync.poll_interval) => {}
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    reap_ended(&mut jobs, done);
                }
            }
        }
        tracing::info!(
            running = jobs.len(),
            "shutting down: no new jobs; waiting for running ones"
        );
        while let Some(done) = jobs.join_next().await {
            log_join(done);
        }
        watchdog.abort();
    }

    /// One pass over every enabled mailbox, whatever its schedule (`calsync sync-once`).
    pub async fn sync_all_once(self: &Arc<Self>) -> anyhow::Result<Vec<JobResult>> {
        let mut mailboxes = Vec::new();
        for mailbox in self.store.mailbox_keys().await? {
            if self.tenants.get(&mailbox.tenant).is_none() {
                tracing::warn!(tenant = %mailbox.tenant, "skipped: tenant not configured");
                continue;
            }
            mailboxes.push(mailbox);
        }
        // Claimed in batches of half the slots, each once its slots are free: few claim
        // statements, and no lease held by a mailbox still waiting for a slot.
        let batch_size = (self.sync.workers / 2).max(1);
        let mut jobs = JoinSet::new();
        for batch in mailboxes.chunks(batch_size) {
            let mut permits = Vec::with_capacity(batch.len());
            for _ in batch {
                permits.push(Arc::clone(&self.slots).acquire_owned().await?);
            }
            let ids: Vec<MailboxId> = batch.iter().map(|m| m.id).collect();
            let batch_owner = self.batch_owner();
            let claimed = self
                .store
                .claim_many(&ids, &batch_owner, Utc::now(), self.sync.lease_ttl, false)
                .await?;
            for mailbox in batch {
                if !claimed.iter().any(|c| c.id == mailbox.id) {
                    tracing::warn!(mailbox = %mailbox.user_id, "skipped: leased by another worker");
                }
            }
            for (claimed, permit) in claimed.into_iter().zip(permits) {
                self.start_job(&mut jobs, &batch_owner, claimed, permit);
            }
        }
        let mut results = Vec::new();
        while let Some(done) = jobs.join_next().await {
            results.push(done?);
        }
        Ok(results)
    }

    /// Runs one claimed mailbox's job under the job deadline and records how it ended. The
    /// deadline wraps the whole job future, so nothing inside can outlive it; the lease is
    /// renewed while the job runs.
    async fn execute(
        &self,
        mailbox: MailboxRecord,
        seq: u64,
        owner: String,
        slot: JobSlot,
    ) -> JobResult {
        let span = tracing::info_span!(
            "sync_job",
            tenant = %mailbox.tenant,
            mailbox = %mailbox.user_id,
            attempt = mailbox.consecutive_failures + 1,
            request_id = tracing::field::Empty,
            client_request_id = tracing::field::Empty,
        );
        crate::metrics::job_started(&mailbox.tenant);
        let slot: SharedSlot = Arc::new(Mutex::new(Some(slot)));
        let (started, deadline) = self.track(seq, &mailbox.tenant, &mailbox.user_id, &slot);
        let result = self
            .run_job(
                &mailbox,
                Lease {
                    mailbox: mailbox.id,
                    owner,
                },
                deadline,
            )
            .instrument(span)
            .await;
        self.untrack(seq, &mailbox.user_id, started, &slot);
        result
    }

    /// Registers a started job with the stuck-job detector; returns its start and deadline.
    fn track(
        &self,
        seq: u64,
        tenant: &str,
        mailbox: &str,
        slot: &SharedSlot,
    ) -> (Instant, Instant) {
        let started = Instant::now();
        let deadline = started + self.sync.job_deadline;
        if let Ok(mut running) = self.running.lock() {
            running.insert(
                seq,
                RunningJob {
                    tenant: tenant.to_string(),
                    mailbox: mailbox.to_string(),
                    started,
                    deadline,
                    slot: Arc::clone(slot),
                },
            );
        }
        (started, deadline)
    }

    /// A tracked job ended: its slot is released (unless the detector already took it).
    fn untrack(&self, seq: u64, mailbox: &str, started: Instant, slot: &SharedSlot) {
        let was_running = self
            .running
            .lock()
            .map(|mut r| r.remove(&seq).is_some())
            .unwrap_or(true);
        if !was_running {
            self.note_stuck_job_finished(mailbox, started.elapsed());
        }
        drop(slot.lock().map(|mut s| s.take()));
    }

    /// Test seam: runs `job` in place of a sync round as a job of `tenant` on `mailbox`,
    /// tracked like a real one (worker slot, tenant count, stuck-job detector, cut off at the
    /// job deadline), so a test can give the pool a job that blocks its thread, which no
    /// network fault can make a real job do. `None` without a free slot or for an unknown
    /// tenant; else whether the job ended by itself (`false`: cut off at the deadline).
    #[doc(hidden)]
    pub async fn run_in_slot_for_test(
        &self,
        tenant: &str,
        mailbox: &str,
        job: impl std::future::Future<Output = ()>,
    ) -> Option<bool> {
        let guard = &self.tenants.get(tenant)?.guard;
        let slot = JobSlot {
            _permit: Arc::clone(&self.slots).try_acquire_owned().ok()?,
            _count: guard.start_job(),
        };
        let seq = self.job_seq.fetch_add(1, Ordering::Relaxed);
        let slot: SharedSlot = Arc::new(Mutex::new(Some(slot)));
        let (started, deadline) = self.track(seq, tenant, mailbox, &slot);
        let ended = tokio::time::timeout_at(deadline, job).await.is_ok();
        self.untrack(seq, mailbox, started, &slot);
        Some(ended)
    }

    async fn run_job(&self, mailbox: &MailboxRecord, lease: Lease, deadline: Instant) -> JobResult {
        let started_at = Utc::now();
        // The job ended on a wait the server named (Retry-After): see `JobRecord::hold_until`.
        let mut graph_wait = false;
        let mut report = SyncReport::default();
        let result: Result<(), (RunOutcome, String, Option<Duration>)> = match self
            .tenants
            .get(&mailbox.tenant)
        {
            Some(tenant) => {
                let ctx = RoundContext {
                    graph: &self.graph,
                    store: &self.store,
                    tokens: &tenant.tokens,
                    guard: &tenant.guard,
                    limits: self.tenants.limits(),
                    mailbox_rate: self.tenants.limits().mailbox(mailbox.id),
                    lease: &lease,
                    window_past: self.sync.window_past,
                    window_future: self.sync.window_future,
                    max_pages_per_round: self.max_pages_per_round,
                    page_failure_limit: self.page_failure_limit,
                    deadline,
                    retry: self.request_retry,
                    slow_call: self.resilience.slow_call,
                };
                let writes = WritePolicy {
                    allowed: tenant.writes,
                    conflict: self.writes.conflict_policy,
                    per_job: self.writes.per_job,
                };
                let job = tokio::time::timeout_at(deadline, async {
                    // The application's writes first: the round that follows reads back
                    // what Outlook made of them.
                    let writes_failed =
                        match sync::writes::deliver(&ctx, mailbox, &writes, &mut report).await {
                            Ok(()) => None,
                            Err(e) if e.stops_the_job() => return Err(e),
                            Err(e) => Some(e),
                        };
                    sync::run_round(&ctx, mailbox, started_at, &mut report).await?;
                    writes_failed.map_or(Ok(()), Err)
                });
                let outcome = tokio::select! {
                    outcome = job => Some(outcome),
                    () = self.heartbeat(&lease) => None,
                };
                match outcome {
                    Some(Ok(Ok(()))) => Ok(()),
                    Some(Ok(Err(SyncError::Deferred {
                        wait,
                        reason,
                        by_graph,
                    }))) => {
                        graph_wait = by_graph;
                        Err((RunOutcome::Deferred, reason, Some(wait)))
                    }
                    Some(Ok(Err(e))) => {
                        crate::metrics::job_failed(&mailbox.tenant, e.reason_label());
                        if let Some(id) = e.request_ids().and_then(|i| i.request_id.clone()) {
                            report.last_request_id = Some(id);
                        }
                        graph_wait = e.retry_after().is_some();
                        Err((RunOutcome::Failed, crate::error_chain(&e), e.retry_after()))
                    }
                    Some(Err(_elapsed)) => Err((
                        RunOutcome::DeadlineExceeded,
                        format!(
                            "job deadline of {} exceeded; the job was cancelled",
                            HumanDuration(self.sync.job_deadline)
                        ),
                        None,
                    )),
                    None => Err((
                        RunOutcome::Failed,
                        "lost the mailbox's lease; the job was stopped".into(),
                        None,
                    )),
                }
            }
            None => Err((
                RunOutcome::Failed,
                format!("tenant `{}` is not configured", mailbox.tenant),
                None,
            )),
        };
        let finished_at = Utc::now();
        let (outcome, error, wait) = match result {
            Ok(()) => (RunOutcome::Ok, None, None),
            Err((outcome, message, wait)) => (outcome, Some(message), wait),
        };
        let next_run_at = self.next_run(mailbox, outcome, wait, finished_at);
        crate::metrics::job_finished(&crate::metrics::JobEnd {
            tenant: &mailbox.tenant,
            outcome: outcome.as_str(),
            started_at,
            finished_at,
            lag_since: (outcome == RunOutcome::Ok).then(|| mailbox.behind_since()),
            upserted: report.upserted,
            deleted: report.deleted,
            pages: report.pages,
            resynced: report.resynced,
        });
        match &error {
            None => tracing::info!(
                pages = report.pages,
                upserted = report.upserted,
                deleted = report.deleted,
                full = report.full_round,
                "sync job done"
            ),
            Some(message) => tracing::warn!(
                outcome = outcome.as_str(),
                error = %message,
                request_id = report.last_request_id.as_deref().unwrap_or("-"),
                next_run_at = %next_run_at,
                "sync job did not complete"
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
            // The server's Retry-After: a sync request, a notification or a write arriving
            // meanwhile must not bring the next run before it. (calsync's own waits, a breaker's
            // probe time or a rate limit, may be cut short: the job is simply deferred again.)
            hold_until: graph_wait.then_some(next_run_at),
            round_end: report.round_end.take(),
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

    /// Renews the lease every third of its length; returns only when the lease was lost.
    async fn heartbeat(&self, lease: &Lease) {
        let every = self.sync.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let until = Utc::now()
                + chrono::Duration::from_std(self.sync.lease_ttl).unwrap_or(chrono::Duration::MAX);
            match self.store.renew_lease(lease, until).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(error = %e, "could not renew the lease; will try again"),
            }
        }
    }

    /// Success: one interval later, plus jitter so mailboxes do not march in step. Deferred:
    /// when the breaker, `Retry-After` or rate limit allows (never earlier). Failure: the
    /// server's `Retry-After` if it gave one, else exponential backoff by consecutive failures.
    fn next_run(
        &self,
        mailbox: &MailboxRecord,
        outcome: RunOutcome,
        wait: Option<Duration>,
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
            RunOutcome::Deferred => after_retry_after(wait.unwrap_or(self.sync.poll_interval)),
            RunOutcome::Failed | RunOutcome::DeadlineExceeded => self
                .failure_retry
                .reschedule(mailbox.consecutive_failures, wait),
        };
        now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::days(1))
    }

    /// Frees the slot of any job still running `sync.stuck_grace` after its deadline: the
    /// deadline cancels every job that yields, so such a job is blocking its thread (a bug, or
    /// blocking code). Its slot goes back to the pool; the job is counted and reported.
    async fn watch_for_stuck_jobs(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.sync.stuck_grace.min(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.free_stuck_slots(Instant::now());
        }
    }

    /// One pass of the stuck-job detector; returns how many jobs it freed.
    pub fn free_stuck_slots(&self, now: Instant) -> usize {
        let stuck: Vec<RunningJob> = match self.running.lock() {
            Ok(mut running) => {
                let ids: Vec<u64> = running
                    .iter()
                    .filter(|(_, job)| now > job.deadline + self.sync.stuck_grace)
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| running.remove(id)).collect()
            }
            Err(_) => return 0,
        };
        for job in &stuck {
            drop(job.slot.lock().map(|mut s| s.take()));
            let running_seconds = now.duration_since(job.started).as_secs_f64();
            tracing::error!(
                tenant = %job.tenant,
                mailbox = %job.mailbox,
                running_seconds,
                "stuck job: still running past its deadline; its worker slot was freed"
            );
            if let Ok(mut log) = self.stuck.lock() {
                log.0 += 1;
                log.1.push(StuckJob {
                    tenant: job.tenant.clone(),
                    mailbox: job.mailbox.clone(),
                    detected_at: Utc::now(),
                    running_seconds,
                    finished_after_seconds: None,
                });
                if log.1.len() > STUCK_KEPT {
                    log.1.remove(0);
                }
            }
        }
        stuck.len()
    }

    fn note_stuck_job_finished(&self, mailbox: &str, after: Duration) {
        tracing::warn!(
            mailbox,
            seconds = after.as_secs_f64(),
            "a stuck job finished at last"
        );
        if let Ok(mut log) = self.stuck.lock() {
            if let Some(entry) = log
                .1
                .iter_mut()
                .rev()
                .find(|s| s.mailbox == mailbox && s.finished_after_seconds.is_none())
            {
                entry.finished_after_seconds = Some(after.as_secs_f64());
            }
        }
    }

    pub fn status(&self) -> WorkerStatus {
        let now = Instant::now();
        let mut running: Vec<RunningJobInfo> = self
            .running
            .lock()
            .map(|r| {
                r.values()
                    .map(|j| RunningJobInfo {
                        tenant: j.tenant.clone(),
                        mailbox: j.mailbox.clone(),
                        running_seconds: now.duration_since(j.started).as_secs_f64(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        running.sort_by(|a, b| b.running_seconds.total_cmp(&a.running_seconds));
        let (stuck_total, stuck_recent) = self
            .stuck
            .lock()
            .map(|s| (s.0, s.1.clone()))
            .unwrap_or_default();
        WorkerStatus {
            workers: self.sync.workers,
            busy_slots: self.sync.workers - self.slots.available_permits(),
            longest_running_seconds: running.first().map_or(0.0, |j| j.running_seconds),
            running,
            stuck_total,
            stuck_recent,
        }
    }

    /// Breaker states of a tenant: token endpoint and Graph (none for an unknown tenant).
    pub fn breakers(&self, tenant: &str) -> Vec<BreakerSnapshot> {
        self.tenants
            .get(tenant)
            .map(|t| t.breakers())
            .unwrap_or_default()
    }

    /// Every configured tenant: its tokens, breakers, rate, budget and running jobs.
    pub fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    pub fn settings(&self) -> &SyncSettings {
        &self.sync
    }
}

/// Takes `first` and every other job of `jobs` that has ended by now, without waiting for
/// one still running; returns how many. Jobs often end together (a backlog draining after an
/// outage): the dispatcher then selects and claims due mailboxes once for all of their slots,
/// not once per job.
fn reap_ended<T: 'static>(
    jobs: &mut JoinSet<T>,
    first: Result<T, tokio::task::JoinError>,
) -> usize {
    log_join(first);
    let mut reaped = 1;
    while let Some(done) = jobs.try_join_next() {
        log_join(done);
        reaped += 1;
    }
    reaped
}

fn log_join<T>(done: Result<T, tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a sync job panicked; its lease will run out and it will be retried");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the current-thread runtime a job that has sent its message has also ended before
    /// this task runs again, so the test waits for that condition, not for time.
    #[tokio::test]
    async fn ended_jobs_are_reaped_together_and_running_ones_are_not_waited_for() {
        let mut jobs = JoinSet::new();
        let (ended, mut endings) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..3 {
            let ended = ended.clone();
            jobs.spawn(async move {
                let _ = ended.send(n);
                n
            });
        }
        jobs.spawn(std::future::pending());
        for _ in 0..3 {
            endings.recv().await.expect("the job sends before it ends");
        }
        let first = jobs.join_next().await.expect("an ended job");
        assert_eq!(
            reap_ended(&mut jobs, first),
            3,
            "all three ended jobs at once"
        );
        assert_eq!(jobs.len(), 1, "the running job is left running");
    }
}
