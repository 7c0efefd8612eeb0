//! calsync against the Graph simulator over real sockets: each test gets its own simulator, its
//! own SQLite file and a service started by [`start_app`] from `demo::demo_settings`, tuned per
//! test, whose jobs the test runs.

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use calsync::config::Settings;
use calsync::graph::model::parse_event;
use calsync::graph::Window;
use calsync::scheduler::{JobResult, Worker};
use calsync::sim::{self, SimConfig, SimHandle, WriteStats};
use calsync::store::{MailboxRecord, RunOutcome, Store, UserView};

use tempfile::TempDir;

pub use super::{start_app, Jobs, Running};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub struct SimApp {
    pub sim: SimHandle,
    pub settings: Settings,
    pub running: Running,
    /// Keeps the SQLite file alive for the test.
    #[allow(dead_code)]
    pub dir: TempDir,
}

impl Deref for SimApp {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

pub async fn start_sim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the simulator");
    sim::start(config, listener)
        .await
        .expect("simulator starts")
}

/// Event writes the simulator counted over all mailboxes: `creates`, `deduplicated` (POSTs
/// answered from their `transactionId`), `updates`, `deletes`, `cancels`,
/// `precondition_failed` (412s) and `duplicates` (events a POST made twice).
pub fn write_stats(sim: &SimHandle) -> WriteStats {
    sim.stats().writes
}

/// The same counts for one mailbox (all zero for an unknown one).
pub fn mailbox_write_stats(sim: &SimHandle, mailbox: &str) -> WriteStats {
    sim.stats()
        .mailboxes
        .get(mailbox)
        .map(|m| m.writes)
        .unwrap_or_default()
}

/// Settings for the simulator with `tune` applied, and the SQLite file's directory.
pub fn sim_settings(
    sim: &SimHandle,
    config: &SimConfig,
    tune: impl FnOnce(&mut Settings),
) -> (Settings, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = calsync::demo::demo_settings(sim, config, &dir.path().join("calsync.db"))
        .expect("demo settings are valid");
    tune(&mut settings);
    (settings, dir)
}

/// A simulator with `config` and a worker on it, its settings changed by `tune`.
pub async fn sim_app(config: SimConfig, tune: impl FnOnce(&mut Settings)) -> SimApp {
    let sim = start_sim(config.clone()).await;
    let (settings, dir) = sim_settings(&sim, &config, tune);
    let running = start_app(settings.clone(), Jobs::ByTest).await;
    SimApp {
        sim,
        settings,
        running,
        dir,
    }
}

/// Millisecond timings: a request may take 300 ms; retries wait tens of milliseconds;
/// breakers break for a few hundred. Small pages, so rounds have several. A job may run 3 s:
/// a healthy full round of a few pages must fit in one on a loaded machine too (1 s did not).
pub fn fast(s: &mut Settings) {
    s.graph.page_size = 10;
    s.graph.connect_timeout = Duration::from_millis(200);
    s.graph.request_timeout = Duration::from_millis(300);
    s.graph.max_response_bytes = 64 * 1024;
    s.sync.job_deadline = Duration::from_secs(3);
    s.sync.interval = Duration::from_secs(60);
    s.sync.jitter = Duration::ZERO;
    s.sync.poll_interval = Duration::from_millis(20);
    s.sync.failure_backoff_initial = Duration::from_millis(50);
    s.sync.failure_backoff_max = Duration::from_millis(200);
    s.sync.stuck_grace = Duration::from_millis(100);
    s.resilience.retries_per_request = 3;
    s.resilience.retry_initial = Duration::from_millis(20);
    s.resilience.retry_max = Duration::from_millis(100);
    s.resilience.slow_call = Duration::from_secs(1);
    let b = &mut s.resilience.breaker;
    b.window = Duration::from_secs(10);
    // One mailbox failing among a tenant's many does not open the tenant's breaker; tests of
    // the breaker itself lower this.
    b.min_calls = 20;
    b.base_break = Duration::from_millis(300);
    b.max_break = Duration::from_secs(1);
    b.permanent_break = Duration::from_secs(2);
    b.validate().expect("breaker settings are valid");
}

/// A small generated world: `tenants` x `mailboxes` x `events`, fixed seed.
pub fn world(tenants: usize, mailboxes: usize, events: usize) -> SimConfig {
    SimConfig::generated(tenants, mailboxes, events, 7)
}

impl SimApp {
    /// The ground-truth checks on this app's store.
    pub fn check(&self) -> Truth<'_> {
        Truth {
            sim: &self.sim,
            store: &self.running.store,
        }
    }

    pub fn mailbox_names(&self) -> Vec<String> {
        self.check().mailbox_names()
    }

    pub fn tenant_of(&self, mailbox: &str) -> String {
        self.check().tenant_of(mailbox)
    }

    pub async fn record(&self, mailbox: &str) -> MailboxRecord {
        self.check().record(mailbox).await
    }

    pub async fn stored(&self, mailbox: &str) -> HashMap<String, Fingerprint> {
        self.check().stored(mailbox).await
    }

    pub async fn truth(&self, mailbox: &str) -> HashMap<String, Fingerprint> {
        self.check().truth(mailbox).await
    }

    pub async fn diff(&self, mailbox: &str) -> Diff {
        self.check().diff(mailbox).await
    }

    pub async fn assert_matches_truth(&self, mailbox: &str) {
        self.check().assert_matches_truth(mailbox).await
    }

    pub async fn assert_all_match_truth(&self) {
        self.check().assert_all_match_truth().await
    }

    /// One `sync_all_once` pass; results by mailbox.
    pub async fn pass(&self) -> HashMap<String, JobResult> {
        let results = self.worker.sync_all_once().await.expect("sync pass runs");
        results
            .into_iter()
            .map(|r| (r.mailbox.clone(), r))
            .collect()
    }

    /// A pass that must succeed for every mailbox.
    pub async fn pass_ok(&self) -> HashMap<String, JobResult> {
        let results = self.pass().await;
        assert_eq!(results.len(), self.mailbox_names().len());
        for (mailbox, r) in &results {
            assert_eq!(r.outcome, RunOutcome::Ok, "{mailbox}: {:?}", r.error);
        }
        results
    }

    /// Token requests the simulator received for `tenant`.
    pub fn token_requests(&self, tenant: &str) -> u64 {
        self.sim.stats().tenants[tenant].token_requests
    }

    /// Graph requests the simulator received for `mailbox`, by HTTP status (0 = no answer).
    pub fn graph_statuses(&self, mailbox: &str) -> HashMap<u16, u64> {
        self.sim.stats().mailboxes[mailbox]
            .by_endpoint
            .get("delta")
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

/// The ground-truth checks: what a store holds against what the simulator holds, for any store
/// and simulator (the service's, or replicas' sharing one).
pub struct Truth<'a> {
    pub sim: &'a SimHandle,
    pub store: &'a Store,
}

impl Truth<'_> {
    pub fn mailbox_names(&self) -> Vec<String> {
        self.sim
            .tenants()
            .iter()
            .flat_map(|t| t.mailboxes.clone())
            .collect()
    }

    pub fn tenant_of(&self, mailbox: &str) -> String {
        self.sim
            .tenants()
            .iter()
            .find(|t| t.mailboxes.iter().any(|m| m == mailbox))
            .map(|t| t.name.clone())
            .expect("a simulator mailbox")
    }

    pub async fn record(&self, mailbox: &str) -> MailboxRecord {
        self.store
            .mailbox(&self.tenant_of(mailbox), mailbox)
            .await
            .expect("store reads")
            .expect("mailbox registered")
    }

    /// The stored events of `mailbox` as (id -> fingerprint), failing on a duplicate id.
    pub async fn stored(&self, mailbox: &str) -> HashMap<String, Fingerprint> {
        let record = self.record(mailbox).await;
        let events = self.store.events(record.id).await.expect("store reads");
        let mut out = HashMap::new();
        for e in events {
            let fp = calsync::store::UserView::of_event(&e);
            assert!(
                out.insert(e.id.clone(), fp).is_none(),
                "{mailbox}: event {} stored twice",
                e.id
            );
        }
        out
    }

    /// Ground truth of `mailbox` over the window its cursor covers.
    pub async fn truth(&self, mailbox: &str) -> HashMap<String, Fingerprint> {
        let window: Window = self
            .record(mailbox)
            .await
            .cursor
            .window
            .expect("the mailbox has synced a window");
        let mut out = HashMap::new();
        for item in self.sim.truth(mailbox, Some((window.start, window.end))) {
            let e = parse_event(item).expect("ground truth parses");
            let fp = UserView::of_event(&e);
            assert!(
                out.insert(e.id.clone(), fp).is_none(),
                "truth repeats {}",
                e.id
            );
        }
        out
    }

    pub async fn diff(&self, mailbox: &str) -> Diff {
        let stored = self.stored(mailbox).await;
        let truth = self.truth(mailbox).await;
        let mut diff = Diff {
            truth: truth.len(),
            stored: stored.len(),
            ..Diff::default()
        };
        for (id, want) in &truth {
            match stored.get(id) {
                None => diff.missing.push(id.clone()),
                Some(have) if have != want => diff.different.push(id.clone()),
                Some(_) => {}
            }
        }
        let truth_ids: HashSet<&String> = truth.keys().collect();
        diff.extra = stored
            .keys()
            .filter(|id| !truth_ids.contains(id))
            .cloned()
            .collect();
        diff
    }

    pub async fn assert_matches_truth(&self, mailbox: &str) {
        let diff = self.diff(mailbox).await;
        assert!(
            diff.is_empty(),
            "{mailbox}: store ({} events) differs from ground truth: {diff:?}",
            diff.stored
        );
        assert!(
            diff.truth > 0,
            "{mailbox}: an empty calendar proves nothing"
        );
    }

    pub async fn assert_all_match_truth(&self) {
        for mailbox in self.mailbox_names() {
            self.assert_matches_truth(&mailbox).await;
        }
    }
}

/// What a stopped service leaves behind: its store and simulator, for the ground-truth checks.
pub struct Stopped {
    pub sim: SimHandle,
    pub store: Store,
    /// Keeps the SQLite file alive.
    #[allow(dead_code)]
    pub dir: TempDir,
}

impl Stopped {
    pub fn check(&self) -> Truth<'_> {
        Truth {
            sim: &self.sim,
            store: &self.store,
        }
    }
}

/// The fields a user reads, as the store holds them and as Graph holds them.
pub type Fingerprint = UserView;

#[derive(Debug, Default)]
pub struct Diff {
    pub truth: usize,
    pub stored: usize,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub different: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }
}

/// Drives the worker's dispatcher step by step, as `Worker::run` does, keeping every result.
pub struct Dispatcher {
    pub worker: Arc<Worker>,
    jobs: JoinSet<JobResult>,
    pub finished: Vec<(Instant, JobResult)>,
}

impl Dispatcher {
    pub fn new(worker: Arc<Worker>) -> Self {
        Self {
            worker,
            jobs: JoinSet::new(),
            finished: Vec::new(),
        }
    }

    /// Starts due jobs, collects ended ones; returns how many started.
    pub async fn step(&mut self) -> usize {
        let started = self
            .worker
            .dispatch_due(&mut self.jobs)
            .await
            .expect("dispatch works");
        self.collect();
        started
    }

    pub fn collect(&mut self) {
        while let Some(done) = self.jobs.try_join_next() {
            self.finished
                .push((Instant::now(), done.expect("a job does not panic")));
        }
    }

    /// Waits for every started job to end (each ends by its deadline).
    pub async fn drain(&mut self) {
        while let Some(done) = self.jobs.join_next().await {
            self.finished
                .push((Instant::now(), done.expect("a job does not panic")));
        }
    }

    /// Steps every `every` until `done` holds, failing after `limit`.
    pub async fn step_until(
        &mut self,
        what: &str,
        limit: Duration,
        every: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) {
        let give_up = Instant::now() + limit;
        loop {
            self.step().await;
            if done(self) {
                return;
            }
            assert!(Instant::now() < give_up, "{what}: not within {limit:?}");
            tokio::time::sleep(every).await;
        }
    }
}

/// Polls `check` every 5 ms until it holds, failing after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let give_up = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < give_up, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
