//! Replicas under kill -9: three real `calsync serve` processes on one PostgreSQL schema sync
//! the simulator's mailboxes while their calendars change. A replica that is running a job is
//! killed with SIGKILL at a random moment, again and again, and a replacement started each
//! time. Then the changes stop and the replicas converge, and the test checks that every
//! orphaned lease was taken over within about one lease period, every mailbox kept syncing,
//! no mailbox was synced by two replicas at once, and the store equals ground truth (nothing
//! lost, nothing doubled, every change key and time as the simulator has it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use calsync::config::Settings;
use calsync::sim::{Endpoint, FaultKind, FaultRule, SimConfig, SimHandle};
use calsync::store::{MailboxId, MailboxRecord, Store};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::helpers::sim::{start_sim, Truth};
use crate::helpers::store::in_postgres_schema;

const REPLICAS: usize = 3;
const KILLS: usize = 15;
const LEASE_TTL: Duration = Duration::from_secs(1);
/// Scheduling slack on a loaded two-core machine, on top of the lease period.
const SLACK: Duration = Duration::from_secs(1);
/// Graph answers this late, so a job spans several requests' worth of time and a kill lands
/// inside one, and two replicas syncing one mailbox at once would overlap at the simulator.
const GRAPH_LATENCY_MS: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_killed_at_random_lose_nothing_and_hand_over_within_a_lease() {
    in_postgres_schema(kill_replicas).await;
}

async fn kill_replicas(url: String) {
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = StdRng::seed_from_u64(seed);
    let config = SimConfig::generated(2, 5, 40, 23);
    let sim = start_sim(config.clone()).await;
    sim.add_fault(
        FaultRule::new(FaultKind::Latency {
            ms: GRAPH_LATENCY_MS,
        })
        .endpoint(Endpoint::Graph),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = replica_toml(&sim, &config, &url);
    let config_path = dir.path().join("calsync.toml");
    std::fs::write(&config_path, &toml).expect("write the replicas' config");
    let settings = Settings::from_toml_str(&toml).expect("the replicas' config is valid");
    // Tables and mailboxes exist before any replica starts, so the observer sees everything.
    let store = calsync::app::open_store(&settings)
        .await
        .expect("the store opens");
    let ids: Vec<MailboxId> = store
        .mailboxes()
        .await
        .expect("store reads")
        .iter()
        .map(|m| m.id)
        .collect();

    let stop = CancellationToken::new();
    let (snapshots, observer) = observe(store.clone(), stop.clone());
    let runs = tokio::spawn(collect_runs(store.clone(), ids.clone(), stop.clone()));
    let mut cluster = Cluster {
        config: config_path,
        dir: dir.path().to_path_buf(),
        snapshots: snapshots.clone(),
        replicas: Vec::new(),
        started: 0,
        logs: Vec::new(),
    };
    sim.set_mutations(60.0);
    for _ in 0..REPLICAS {
        cluster.start_replica().await;
    }

    let mut kills = Vec::new();
    let mut takeovers = tokio::task::JoinSet::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(600..1800))).await;
        let kill = cluster.kill_one_mid_job(&store, &mut rng).await;
        takeovers.spawn(watch_takeover(kill.clone(), snapshots.clone()));
        kills.push(kill);
        cluster.start_replica().await;
    }
    let last_kill = kills.last().map(|k| k.wall).expect("kills happened");
    // Long enough for the last kill's leases to run out and be taken over under change.
    tokio::time::sleep(LEASE_TTL * 2).await;

    sim.set_mutations(0.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quiet = Utc::now();
    let converged = converge(&store, quiet, Duration::from_secs(20)).await;
    stop.cancel();
    observer.await.expect("the observer ends");
    let runs = runs.await.expect("the run collector ends");
    cluster.kill_all().await;

    // Every orphaned lease was taken over within about one lease period, and its mailbox
    // synced again soon after.
    let mut taken = Vec::new();
    while let Some(done) = takeovers.join_next().await {
        taken.extend(done.expect("a takeover watcher does not panic"));
    }
    let mid_job = kills.iter().filter(|k| !k.orphans.is_empty()).count();
    let mid_round: usize = kills.iter().map(|k| k.mid_round).sum();
    let takeover_max = taken
        .iter()
        .map(|t| t.taken_after)
        .max()
        .unwrap_or_default();
    let success_max = taken
        .iter()
        .map(|t| t.synced_after)
        .max()
        .unwrap_or_default();
    let stats = sim.stats();
    let max_in_flight = stats
        .mailboxes
        .values()
        .map(|m| m.max_in_flight)
        .max()
        .unwrap_or(0);
    let total_runs: usize = runs.values().map(Vec::len).sum();
    let _ = writeln!(
        std::io::stderr(),
        "kill -9 test (seed {seed}): {} kills, {mid_job} mid-job, {} orphaned leases \
         ({mid_round} mid-round, after some of its pages committed); \
         takeover after kill: median {:?}, max {:?}; next success after kill: max {:?}; \
         {total_runs} job runs seen; max requests in flight per mailbox {max_in_flight}",
        kills.len(),
        taken.len(),
        median(taken.iter().map(|t| t.taken_after).collect()),
        takeover_max,
        success_max,
    );
    assert_eq!(kills.len(), KILLS);
    assert!(
        mid_job * 2 >= KILLS,
        "only {mid_job} of {KILLS} kills hit a replica holding a lease"
    );
    let orphans: usize = kills.iter().map(|k| k.orphans.len()).sum();
    assert_eq!(
        taken.len(),
        orphans,
        "every orphaned lease was taken over: {taken:?}"
    );
    for t in &taken {
        assert!(
            t.taken_after <= LEASE_TTL + SLACK,
            "{}: taken over {:?} after its replica died (lease {LEASE_TTL:?})",
            t.mailbox,
            t.taken_after
        );
        assert!(
            t.synced_after <= LEASE_TTL + SLACK * 3,
            "{}: synced again {:?} after its replica died",
            t.mailbox,
            t.synced_after
        );
    }

    // Every mailbox kept syncing, by one replica at a time.
    for m in &converged {
        assert!(
            m.last_success_at.is_some_and(|t| t > last_kill),
            "{}: no success after the last kill",
            m.user_id
        );
    }
    for (id, mailbox_runs) in &runs {
        assert_one_at_a_time_and_steady(*id, mailbox_runs);
    }
    assert_eq!(
        max_in_flight,
        1,
        "a mailbox had requests from two syncs at once: {:?}",
        stats
            .mailboxes
            .iter()
            .filter(|(_, m)| m.max_in_flight > 1)
            .map(|(name, m)| (name, m.max_in_flight))
            .collect::<Vec<_>>()
    );
    assert_eq!(stats.violations.over_concurrency.count, 0);

    // Nothing lost, nothing doubled.
    Truth {
        sim: &sim,
        store: &store,
    }
    .assert_all_match_truth()
    .await;
    drop(cluster);
}

/// The replicas' configuration: the simulator's tenants, the shared schema, one-second
/// leases, sub-second intervals, small pages (a round spans several requests), two jobs per
/// replica (so every replica gets work).
fn replica_toml(sim: &SimHandle, config: &SimConfig, url: &str) -> String {
    let mut toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "{url}"
max_connections = 4
[graph]
base_url = "{base}"
authority = "{authority}"
page_size = 2
connect_timeout = "1s"
request_timeout = "3s"
[sync]
interval = "400ms"
jitter = "100ms"
workers = 2
max_jobs_per_tenant = 2
job_deadline = "5s"
lease_ttl = "{lease_ms}ms"
poll_interval = "20ms"
failure_backoff_initial = "50ms"
failure_backoff_max = "500ms"
stuck_grace = "500ms"
[resilience]
retry_initial = "20ms"
retry_max = "200ms"
breaker_min_calls = 20
breaker_base_break = "300ms"
breaker_max_break = "1s"
[log]
level = "warn"
"#,
        base = sim.graph_base_url(),
        authority = sim.authority(),
        lease_ms = LEASE_TTL.as_millis(),
    );
    toml.push_str(&calsync::demo::tenants_toml(config));
    toml
}

/// The mailboxes table as last read, and every replica name (lease owner up to its `/`) seen
/// in it so far.
struct Snapshot {
    at: Instant,
    mailboxes: Vec<MailboxRecord>,
    owners: BTreeSet<String>,
}

fn replica_of(lease_owner: &str) -> &str {
    lease_owner.split('/').next().unwrap_or(lease_owner)
}

/// Reads the mailboxes table every 10 ms until `stop`.
fn observe(
    store: Store,
    stop: CancellationToken,
) -> (watch::Receiver<Arc<Snapshot>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot {
        at: Instant::now(),
        mailboxes: Vec::new(),
        owners: BTreeSet::new(),
    }));
    let task = tokio::spawn(async move {
        let mut owners = BTreeSet::new();
        while !stop.is_cancelled() {
            let mailboxes = store.mailboxes().await.expect("store reads");
            owners.extend(
                mailboxes
                    .iter()
                    .filter_map(|m| m.lease_owner.as_deref())
                    .map(|o| replica_of(o).to_string()),
            );
            tx.send_replace(Arc::new(Snapshot {
                at: Instant::now(),
                mailboxes,
                owners: owners.clone(),
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (rx, task)
}

/// One finished job of a mailbox, as its history records it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Run {
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    outcome: String,
    error: Option<String>,
}

/// Every job run recorded while the test runs (the store keeps the latest 50 per mailbox, so
/// it is read every second), by mailbox, in start order.
async fn collect_runs(
    store: Store,
    ids: Vec<MailboxId>,
    stop: CancellationToken,
) -> BTreeMap<MailboxId, Vec<Run>> {
    let mut seen: BTreeMap<MailboxId, BTreeSet<Run>> = BTreeMap::new();
    loop {
        let last = stop.is_cancelled();
        for id in &ids {
            for r in store.runs(*id, 50).await.expect("store reads") {
                seen.entry(*id).or_default().insert(Run {
                    started_at: r.started_at,
                    finished_at: r.finished_at,
                    outcome: r.outcome,
                    error: r.error,
                });
            }
        }
        if last {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    seen.into_iter()
        .map(|(id, runs)| (id, runs.into_iter().collect()))
        .collect()
}

/// A mailbox's recorded jobs never overlap (a job starts after it is claimed, which is after
/// the previous job released the lease), and it succeeded at least every few seconds from its
/// first success on, kills included.
fn assert_one_at_a_time_and_steady(id: MailboxId, runs: &[Run]) {
    for pair in runs.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at,
            "mailbox {id}: two jobs at once: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    let successes: Vec<DateTime<Utc>> = runs
        .iter()
        .filter(|r| r.outcome == "ok")
        .map(|r| r.finished_at)
        .collect();
    let longest = successes
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest <= chrono::Duration::seconds(5),
        "mailbox {id}: {longest} without a successful round"
    );
}

/// Waits for every mailbox to finish a successful round that started after `quiet`.
async fn converge(store: &Store, quiet: DateTime<Utc>, limit: Duration) -> Vec<MailboxRecord> {
    let give_up = Instant::now() + limit;
    loop {
        let mailboxes = store.mailboxes().await.expect("store reads");
        let settled = mailboxes.iter().all(|m| {
            m.last_attempt_at.is_some_and(|t| t > quiet)
                && m.last_success_at >= m.last_attempt_at
                && m.consecutive_failures == 0
        });
        if settled {
            return mailboxes;
        }
        assert!(
            Instant::now() < give_up,
            "not every mailbox completed a round after the changes stopped: {:?}",
            mailboxes
                .iter()
                .map(|m| (
                    &m.user_id,
                    m.last_attempt_at,
                    m.last_success_at,
                    &m.lease_owner,
                    &m.last_error
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A kill -9 and the leases its replica held at that moment.
#[derive(Clone, Debug)]
struct Kill {
    at: Instant,
    wall: DateTime<Utc>,
    /// (mailbox id, user id, the dead job's lease owner)
    orphans: Vec<(MailboxId, String, String)>,
    /// Orphaned mailboxes whose round was cut after some of its pages had committed.
    mid_round: usize,
}

#[derive(Debug)]
struct Takeover {
    mailbox: String,
    /// From the kill until another replica held the lease.
    taken_after: Duration,
    /// From the kill until the mailbox's next successful round ended.
    synced_after: Duration,
}

/// Follows a kill's orphaned leases until each is claimed by another replica and its mailbox
/// has synced again (or 15 s, after which the missing ones are simply absent).
async fn watch_takeover(
    kill: Kill,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) -> Vec<Takeover> {
    let mut taken: HashMap<MailboxId, Duration> = HashMap::new();
    let mut synced: HashMap<MailboxId, Duration> = HashMap::new();
    let give_up = kill.at + Duration::from_secs(15);
    while synced.len() < kill.orphans.len() && Instant::now() < give_up {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        for (id, _, dead_owner) in &kill.orphans {
            let Some(m) = snapshot.mailboxes.iter().find(|m| m.id == *id) else {
                continue;
            };
            let after = snapshot.at.saturating_duration_since(kill.at);
            if m.lease_owner.as_deref() != Some(dead_owner.as_str()) {
                taken.entry(*id).or_insert(after);
            }
            if m.last_success_at.is_some_and(|t| t > kill.wall) {
                synced.entry(*id).or_insert(after);
            }
        }
        if tokio::time::timeout(Duration::from_secs(1), snapshots.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            break;
        }
    }
    kill.orphans
        .iter()
        .filter_map(|(id, user, _)| {
            Some(Takeover {
                mailbox: user.clone(),
                taken_after: *taken.get(id)?,
                synced_after: *synced.get(id)?,
            })
        })
        .collect()
}

struct Replica {
    child: Child,
    name: String,
}

/// The `calsync serve` processes. Each is killed when dropped (SIGKILL); a failing test
/// prints the end of every replica's log.
struct Cluster {
    config: PathBuf,
    dir: PathBuf,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    replicas: Vec<Replica>,
    started: usize,
    /// Every replica's name and log, the killed ones' too.
    logs: Vec<(String, PathBuf)>,
}

impl Cluster {
    /// Starts a replica and waits until it holds its first lease, which tells its name.
    async fn start_replica(&mut self) {
        self.started += 1;
        let known = self.snapshots.borrow().owners.clone();
        let log = self.dir.join(format!("replica-{}.log", self.started));
        let stderr = std::fs::File::create(&log).expect("create a replica log");
        let mut command = crate::helpers::serve_command(&self.config, Some(stderr));
        let mut child = command.spawn().expect("start calsync serve");
        let give_up = Instant::now() + Duration::from_secs(20);
        let name = loop {
            let new = self
                .snapshots
                .borrow()
                .owners
                .difference(&known)
                .next()
                .cloned();
            if let Some(name) = new {
                break name;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("replica {} exited: {status}\n{}", self.started, tail(&log));
            }
            assert!(
                Instant::now() < give_up,
                "replica {} took no job within 20 s\n{}",
                self.started,
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        self.logs.push((name.clone(), log));
        self.replicas.push(Replica { child, name });
    }

    /// Waits for a moment when some replica is running a job, preferably one in the middle of
    /// a round (a page committed, more to come), kills one such replica at random with
    /// SIGKILL, and notes the leases it left behind.
    async fn kill_one_mid_job(&mut self, store: &Store, rng: &mut StdRng) -> Kill {
        let started = Instant::now();
        let victim = loop {
            let (mid_round, holding) = {
                let snapshot = self.snapshots.borrow();
                let held = |i: &usize, mid_round: bool| {
                    let name = self.replicas[*i].name.as_str();
                    snapshot.mailboxes.iter().any(|m| {
                        m.lease_owner.as_deref().map(replica_of) == Some(name)
                            && (!mid_round || m.cursor.next_link.is_some())
                    })
                };
                let all = 0..self.replicas.len();
                let mid_round: Vec<usize> = all.clone().filter(|i| held(i, true)).collect();
                let holding: Vec<usize> = all.filter(|i| held(i, false)).collect();
                (mid_round, holding)
            };
            let waited = started.elapsed();
            let pick = if !mid_round.is_empty() {
                mid_round
            } else if waited > Duration::from_secs(1) && !holding.is_empty() {
                holding
            } else if waited > Duration::from_secs(3) {
                (0..self.replicas.len()).collect()
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            break pick[rng.gen_range(0..pick.len())];
        };
        let mut replica = self.replicas.remove(victim);
        replica.child.kill().await.expect("kill -9 a replica");
        let (at, wall) = (Instant::now(), Utc::now());
        let orphaned: Vec<MailboxRecord> = store
            .mailboxes()
            .await
            .expect("store reads")
            .into_iter()
            .filter(|m| m.lease_owner.as_deref().map(replica_of) == Some(replica.name.as_str()))
            .collect();
        let mid_round = orphaned
            .iter()
            .filter(|m| m.cursor.next_link.is_some())
            .count();
        let orphans = orphaned
            .into_iter()
            .filter_map(|m| Some((m.id, m.user_id, m.lease_owner?)))
            .collect();
        Kill {
            at,
            wall,
            orphans,
            mid_round,
        }
    }

    async fn kill_all(&mut self) {
        for replica in &mut self.replicas {
            let _ = replica.child.kill().await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, log) in &self.logs {
                let _ = writeln!(
                    std::io::stderr(),
                    "--- replica {name} ({}):\n{}",
                    log.display(),
                    tail(log)
                );
            }
        }
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let Ok(file) = std::fs::File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}
