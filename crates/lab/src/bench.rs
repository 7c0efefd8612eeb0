//! `calsync bench`: speed and memory on this machine, against the simulator running as a
//! separate process on loopback (so CPU time and RSS are calsync's own):
//! initial-sync throughput, the cost of an idle incremental round, the raw ceiling (the same
//! delta page requests by a bare reqwest loop, same concurrency, no parsing or storing),
//! peak RSS, and the memory and scheduling cost of many registered mailboxes. With
//! `--replicas 1,2,4 --postgres URL`, also initial-sync throughput of that many `calsync serve`
//! processes sharing one PostgreSQL schema (a fresh one per count, dropped afterwards), with
//! the CPU per stored event of those processes and of the PostgreSQL server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use calsync_core::app;
use calsync_core::config::Settings;
use calsync_core::store::RunOutcome;
use calsync_sim::SimConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Tenants in the simulator.
    #[arg(long, default_value_t = 10)]
    pub tenants: usize,
    /// Mailboxes per tenant.
    #[arg(long, default_value_t = 100)]
    pub mailboxes: usize,
    /// Events per mailbox.
    #[arg(long, default_value_t = 200)]
    pub events: usize,
    /// Concurrent sync jobs (and concurrent requests of the raw loop).
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Mailboxes registered for the scheduling and memory measurement.
    #[arg(long, default_value_t = 100_000)]
    pub registered: usize,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replica mode: also time the initial sync by this many `calsync serve` processes on one
    /// PostgreSQL schema, for each count given (e.g. `1,2,4`); each has `--workers` workers.
    #[arg(long, value_delimiter = ',', requires = "postgres")]
    pub replicas: Vec<usize>,
    /// PostgreSQL database for the replica mode (`postgres://user@host:port/db`); each replica
    /// count gets a schema of its own in it, dropped afterwards.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Calendar changes timed from the change to the stored event, via change notification and
    /// via polling (0 skips the measurement).
    #[arg(long, default_value_t = 20)]
    pub latency_samples: usize,
    /// The polling service's sync interval in the latency measurement.
    #[arg(long, default_value = "2s", value_parser = calsync_core::config::HumanDuration::parse)]
    pub latency_poll_interval: calsync_core::config::HumanDuration,
    /// Only the initial sync and the idle rounds after it (no raw ceiling, registered
    /// mailboxes, replicas or latency): what `--instructions` runs under callgrind.
    #[arg(long, conflicts_with_all = ["replicas", "instructions"])]
    pub sync_only: bool,
    /// Instructions per stored event and per idle mailbox round, counted by valgrind's
    /// callgrind (independent of the machine's load): sync-only runs of 20 mailboxes, with 100
    /// and 300 events each, and with 1 event each and 1 or more idle rounds.
    #[arg(long, conflicts_with = "replicas")]
    pub instructions: bool,
    /// Sync-only: idle rounds after the initial sync (their CPU is averaged).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), requires = "sync_only")]
    pub idle_rounds: u32,
    /// Only this many Graph calls through the resilience pipeline's success path (no Graph,
    /// no store), then a JSON report: what `--instructions` runs under callgrind for its
    /// instructions per call.
    #[arg(long, hide = true, conflicts_with_all = ["replicas", "instructions", "sync_only"])]
    pub pipeline_calls: Option<u64>,
}

/// `--sync-only`: the initial sync and one idle round.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SyncOnlyReport {
    pub mailboxes: usize,
    pub initial_events: u64,
    pub initial_pages: u64,
    pub initial_seconds: f64,
    pub initial_cpu_seconds: f64,
    pub cpu_us_per_stored_event: f64,
    pub idle_rounds: u32,
    pub idle_round_cpu_ms_per_mailbox: f64,
    pub failed_jobs: usize,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub mailboxes: usize,
    pub events_per_mailbox: usize,
    pub workers: usize,
    pub initial_seconds: f64,
    pub initial_events: u64,
    pub initial_pages: u64,
    /// Graph requests per mailbox for its initial round: delta pages and series-master fetches.
    pub initial_requests_per_mailbox: f64,
    pub initial_master_requests_per_mailbox: f64,
    pub events_per_second: f64,
    pub mailboxes_per_second: f64,
    pub pages_per_second: f64,
    pub raw_pages: u64,
    pub raw_seconds: f64,
    pub raw_pages_per_second: f64,
    /// CPU seconds of calsync and of the simulator during the initial sync and the raw loop: on a
    /// small machine both compete for the same cores.
    pub initial_cpu_seconds: f64,
    /// calsync's CPU per stored event during the initial sync, in microseconds.
    pub cpu_us_per_stored_event: f64,
    pub initial_sim_cpu_seconds: f64,
    pub raw_cpu_seconds: f64,
    pub raw_sim_cpu_seconds: f64,
    pub ratio_to_raw: f64,
    pub idle_round_requests_per_mailbox: f64,
    pub idle_round_cpu_ms_per_mailbox: f64,
    pub idle_round_seconds: f64,
    pub peak_rss_mib: f64,
    pub registered_mailboxes: usize,
    pub rss_per_registered_mailbox_bytes: f64,
    pub dispatch_selection_ms: f64,
    pub claims_per_second: f64,
    /// One health model as `/healthz` and the status page build it (counts and each tenant's
    /// worst mailboxes) with every registered mailbox in the store, each as wide as a synced
    /// one: its time and its JSON's size.
    pub health_check_ms: f64,
    pub health_json_bytes: usize,
    /// The same without the mailboxes, as `/metrics` builds it.
    pub metrics_health_ms: f64,
    /// Why the health model could not be built (the store did not answer within the check's
    /// timeout), if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
    pub failed_jobs: usize,
    /// Replica mode, one entry per replica count (empty without `--replicas`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replica_runs: Vec<ReplicaRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_to_stored: Option<LatencySummary>,
    pub window_moves: WindowMoves,
}

/// Full rounds started by windows moving, per UTC hour of a simulated day.
#[derive(Debug, Clone, Serialize)]
pub struct WindowMoves {
    pub mailboxes: usize,
    pub interval_seconds: f64,
    pub per_hour: Vec<u32>,
    pub mean_per_hour: f64,
    pub busiest_hour: usize,
    /// The busiest hour's full rounds over the mean (1.0 = perfectly even; 24 = all in one hour).
    pub busiest_ratio: f64,
}

/// Simulates one UTC day of `mailboxes` (tenant, user) syncing every `interval` plus up to
/// `jitter`, each starting at a random phase, and counts the rounds that start a full round
/// because the window moved (the rule `sync::run_round` applies: a window other than the last
/// round's). No network: this is the schedule the windows impose.
pub fn window_moves(
    mailboxes: &[(String, String)],
    interval: Duration,
    jitter: Duration,
    past: Duration,
    future: Duration,
    seed: u64,
) -> WindowMoves {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let day_start = chrono::DateTime::from_timestamp(1_796_083_200, 0).unwrap_or_default(); // 2026-12-01
    let day_end = day_start + chrono::Duration::days(1);
    let step = |rng: &mut rand::rngs::StdRng| {
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            rng.gen_range(Duration::ZERO..=jitter)
        };
        chrono::Duration::from_std(interval + extra).unwrap_or(chrono::Duration::MAX)
    };
    let mut per_hour = vec![0u32; 24];
    for (tenant, user) in mailboxes {
        let phase = rng.gen_range(Duration::ZERO..interval.max(Duration::from_millis(1)));
        // One round before the day sets the window the day's first round compares with.
        let mut at =
            day_start + chrono::Duration::from_std(phase).unwrap_or_default() - step(&mut rng);
        let mut window = calsync_core::sync::window_at(at, past, future, tenant, user);
        while at < day_end {
            at += step(&mut rng);
            let now = calsync_core::sync::window_at(at, past, future, tenant, user);
            if now != window && at >= day_start && at < day_end {
                per_hour[((at - day_start).num_seconds() / 3600) as usize] += 1;
            }
            window = now;
        }
    }
    let total: u32 = per_hour.iter().sum();
    let mean_per_hour = f64::from(total) / 24.0;
    let (busiest_hour, busiest) = per_hour
        .iter()
        .enumerate()
        .max_by_key(|(_, n)| **n)
        .map(|(h, n)| (h, *n))
        .unwrap_or_default();
    WindowMoves {
        mailboxes: mailboxes.len(),
        interval_seconds: interval.as_secs_f64(),
        busiest_ratio: if total == 0 {
            0.0
        } else {
            f64::from(busiest) / mean_per_hour
        },
        per_hour,
        mean_per_hour,
        busiest_hour,
    }
}

/// The initial sync of every mailbox by `replicas` serving processes on one PostgreSQL schema:
/// from starting them until every mailbox has its first successful round (read from the store).
#[derive(Debug, Serialize)]
pub struct ReplicaRun {
    pub replicas: usize,
    pub workers_per_replica: usize,
    pub seconds: f64,
    pub events: u64,
    pub events_per_second: f64,
    pub mailboxes_per_second: f64,
    /// User + system CPU of the replica processes.
    pub replica_cpu_seconds: f64,
    /// `replica_cpu_seconds` per stored event, in µs.
    pub replica_cpu_us_per_event: f64,
    /// User + system CPU of the PostgreSQL server in the same time: every process named
    /// `postgres` (backends of all its clients, the bench's own poll included, and its
    /// background processes), and backends that exited meanwhile (reaped into the
    /// postmaster's children time). Other databases' work on the same server counts too.
    pub postgres_cpu_seconds: f64,
    /// `postgres_cpu_seconds` per stored event, in µs.
    pub postgres_cpu_us_per_event: f64,
    /// User + system CPU of the simulator process in the same time.
    pub sim_cpu_seconds: f64,
    /// How busy the machine's CPUs were (all processes, PostgreSQL's included), 0-100.
    pub machine_cpu_busy_percent: f64,
    /// Mailboxes with a failed job before their first success.
    pub mailboxes_with_errors: usize,
}

/// The bench's world: the simulator process with its generated calendars, and a scratch
/// directory for stores and configuration files; [`SimWorld::stop`] removes both.
struct SimWorld {
    config: SimConfig,
    addr: SocketAddr,
    sim: Child,
    dir: std::path::PathBuf,
    /// The simulator's `/proc/<pid>/stat`, for its CPU time.
    sim_stat: Option<String>,
}

impl SimWorld {
    async fn start(args: &BenchArgs) -> anyhow::Result<Self> {
        let seed = 99;
        let config = SimConfig::generated(args.tenants, args.mailboxes, args.events, seed);
        let addr = free_port()?;
        let sim = spawn_sim(args, addr, seed).await?;
        let dir = std::env::temp_dir().join(format!("calsync-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let sim_stat = sim.id().map(|pid| format!("/proc/{pid}/stat"));
        Ok(Self {
            config,
            addr,
            sim,
            dir,
            sim_stat,
        })
    }

    async fn stop(mut self) {
        let _ = self.sim.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let world = SimWorld::start(&args).await?;
    let (sim_config, addr, dir, sim_stat) =
        (&world.config, world.addr, &world.dir, &world.sim_stat);
    let mut result = measure(&args, sim_config, addr, dir, sim_stat).await;
    if let (Ok(report), Some(postgres)) = (&mut result, &args.postgres) {
        for &replicas in &args.replicas {
            let run = replica_run(&args, sim_config, addr, dir, postgres, replicas, sim_stat);
            match run.await {
                Ok(run) => report.replica_runs.push(run),
                Err(e) => {
                    result = Err(e.context(format!("replica mode with {replicas} replicas")));
                    break;
                }
            }
        }
    }
    world.stop().await;
    if let (Ok(report), true) = (&mut result, args.latency_samples > 0) {
        if !args.json {
            eprintln!(
                "change-to-stored latency: {} changes via notification and via polling...",
                args.latency_samples
            );
        }
        let latency =
            crate::latency::change_to_stored(args.latency_samples, args.latency_poll_interval.0)
                .await?;
        report.change_to_stored = Some(LatencySummary::of(&latency));
    }
    result
}

/// Change-to-stored times in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub samples: usize,
    pub poll_interval_ms: f64,
    pub notification_p50_ms: f64,
    pub notification_max_ms: f64,
    pub polling_p50_ms: f64,
    pub polling_max_ms: f64,
}

impl LatencySummary {
    fn of(l: &crate::latency::ChangeLatency) -> Self {
        let stats = |d: &[Duration]| {
            let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            let p50 = ms.get(ms.len() / 2).copied().unwrap_or(0.0);
            (p50, ms.last().copied().unwrap_or(0.0))
        };
        let (n50, nmax) = stats(&l.via_notification);
        let (p50, pmax) = stats(&l.via_polling);
        Self {
            samples: l.via_notification.len(),
            poll_interval_ms: l.poll_interval.as_secs_f64() * 1000.0,
            notification_p50_ms: n50,
            notification_max_ms: nmax,
            polling_p50_ms: p50,
            polling_max_ms: pmax,
        }
    }
}

async fn measure(
    args: &BenchArgs,
    config: &SimConfig,
    addr: SocketAddr,
    dir: &Path,
    sim_stat: &Option<String>,
) -> anyhow::Result<BenchReport> {
    let settings = bench_settings(config, addr, &dir.join("bench.db"), args.workers)?;
    let all_mailboxes: Vec<(String, String)> = config
        .tenants
        .iter()
        .flat_map(|t| t.mailboxes.iter().map(|m| (t.name.clone(), m.clone())))
        .collect();
    let window_moves = window_moves(
        &all_mailboxes,
        settings.sync.interval,
        settings.sync.jitter,
        settings.sync.window_past,
        settings.sync.window_future,
        7,
    );
    let store = app::open_store(&settings).await?;
    let (worker, tenants) = app::build_worker(&settings, store.clone())?;
    let mailboxes = args.tenants * args.mailboxes;
    let progress = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };

    // The simulator builds each page's JSON on first use; one unmeasured pass warms it, so
    // calsync and the raw loop below meet the same simulator.
    progress("warming the simulator...");
    raw_ceiling(&settings, config, &tenants, args.workers).await?;

    progress(&format!(
        "initial sync of {mailboxes} mailboxes x {} events...",
        args.events
    ));
    let sync = initial_and_idle(&worker, addr, sim_stat, 1, &progress).await?;

    progress("raw ceiling: the same initial rounds by a bare reqwest loop...");
    let cpu_at_start = (cpu_seconds()?, sim_cpu(sim_stat));
    let (raw_pages, raw_seconds) = raw_ceiling(&settings, config, &tenants, args.workers).await?;
    let raw_cpu_seconds = cpu_seconds()? - cpu_at_start.0;
    let raw_sim_cpu_seconds = sim_cpu(sim_stat) - cpu_at_start.1;
    let peak_rss_mib = status_kib("VmHWM:")? as f64 / 1024.0;

    progress(&format!(
        "registering {} mailboxes for the scheduling measurement...",
        args.registered
    ));
    let registered = registered_cost(&settings, dir, args.registered).await?;

    let pages_per_second = sync.initial_pages as f64 / sync.initial_seconds;
    let raw_pages_per_second = raw_pages as f64 / raw_seconds;
    Ok(BenchReport {
        machine: machine(),
        mailboxes,
        events_per_mailbox: args.events,
        workers: args.workers,
        initial_seconds: sync.initial_seconds,
        initial_events: sync.initial_events,
        initial_pages: sync.initial_pages,
        initial_requests_per_mailbox: sync.initial_requests as f64 / mailboxes as f64,
        initial_master_requests_per_mailbox: sync.initial_master_requests as f64 / mailboxes as f64,
        events_per_second: sync.initial_events as f64 / sync.initial_seconds,
        mailboxes_per_second: mailboxes as f64 / sync.initial_seconds,
        pages_per_second,
        raw_pages,
        raw_seconds,
        raw_pages_per_second,
        initial_cpu_seconds: sync.initial_cpu_seconds,
        cpu_us_per_stored_event: sync.cpu_us_per_stored_event(),
        initial_sim_cpu_seconds: sync.initial_sim_cpu_seconds,
        raw_cpu_seconds,
        raw_sim_cpu_seconds,
        ratio_to_raw: pages_per_second / raw_pages_per_second,
        idle_round_requests_per_mailbox: sync.idle_requests as f64 / mailboxes as f64,
        idle_round_cpu_ms_per_mailbox: sync.idle_cpu_seconds * 1000.0 / mailboxes as f64,
        idle_round_seconds: sync.idle_seconds,
        peak_rss_mib,
        registered_mailboxes: args.registered,
        rss_per_registered_mailbox_bytes: registered.rss_per_mailbox,
        dispatch_selection_ms: registered.selection_ms,
        claims_per_second: registered.claims_per_second,
        health_check_ms: registered.health_check_ms,
        health_json_bytes: registered.health_json_bytes,
        metrics_health_ms: registered.metrics_health_ms,
        health_error: registered.health_error,
        failed_jobs: sync.failed_jobs,
        replica_runs: Vec::new(),
        change_to_stored: None,
        window_moves,
    })
}

/// What the initial sync and the idle round after it measured.
struct SyncFigures {
    initial_seconds: f64,
    initial_events: u64,
    initial_pages: u64,
    initial_requests: u64,
    initial_master_requests: u64,
    initial_cpu_seconds: f64,
    initial_sim_cpu_seconds: f64,
    idle_seconds: f64,
    idle_cpu_seconds: f64,
    idle_requests: u64,
    failed_jobs: usize,
}

impl SyncFigures {
    fn cpu_us_per_stored_event(&self) -> f64 {
        self.initial_cpu_seconds * 1e6 / self.initial_events.max(1) as f64
    }
}

/// Every mailbox's initial round, then `idle_rounds` idle rounds, with their time, CPU and
/// requests (the idle figures are per round).
async fn initial_and_idle(
    worker: &Arc<calsync_core::scheduler::Worker>,
    addr: SocketAddr,
    sim_stat: &Option<String>,
    idle_rounds: u32,
    progress: &impl Fn(&str),
) -> anyhow::Result<SyncFigures> {
    let cpu_at_start = (cpu_seconds()?, sim_cpu(sim_stat));
    let requests_at_start = sim_requests(addr).await?;
    let started = Instant::now();
    let results = worker.sync_all_once().await?;
    let initial_seconds = started.elapsed().as_secs_f64();
    let initial_requests = sim_requests(addr).await?.saturating_sub(requests_at_start);
    let initial_cpu_seconds = cpu_seconds()? - cpu_at_start.0;
    let initial_sim_cpu_seconds = sim_cpu(sim_stat) - cpu_at_start.1;

    progress("idle incremental round...");
    let requests_before = sim_requests(addr).await?;
    let cpu_before = cpu_seconds()?;
    let started = Instant::now();
    let failed = |r: &[calsync_core::scheduler::JobResult]| {
        r.iter().filter(|r| r.outcome != RunOutcome::Ok).count()
    };
    let mut idle_failed = 0;
    for round in 1..=idle_rounds {
        let jobs = worker.sync_all_once().await?;
        // A mailbox is skipped while leased: fewer jobs than in the initial round means an
        // earlier job's end (which releases the lease) was not recorded, and the round's
        // figures would describe work that was not done.
        anyhow::ensure!(
            jobs.len() == results.len(),
            "idle round {round} ran {} jobs for {} mailboxes: a job's end was not recorded \
             (see the log)",
            jobs.len(),
            results.len()
        );
        idle_failed += failed(&jobs);
    }
    let rounds = f64::from(idle_rounds);
    let idle_seconds = started.elapsed().as_secs_f64() / rounds;
    let idle_cpu_seconds = (cpu_seconds()? - cpu_before) / rounds;
    let idle_requests =
        sim_requests(addr).await?.saturating_sub(requests_before) / u64::from(idle_rounds);
    Ok(SyncFigures {
        initial_seconds,
        initial_events: results.iter().map(|r| r.report.upserted).sum(),
        initial_pages: results.iter().map(|r| r.report.pages).sum(),
        initial_requests,
        initial_master_requests: results.iter().map(|r| r.report.master_requests).sum(),
        initial_cpu_seconds,
        initial_sim_cpu_seconds,
        idle_seconds,
        idle_cpu_seconds,
        idle_requests,
        failed_jobs: failed(&results) + idle_failed,
    })
}

/// `--sync-only`: the initial sync and `--idle-rounds` idle rounds of the simulated world,
/// nothing else.
pub async fn sync_only(args: &BenchArgs) -> anyhow::Result<SyncOnlyReport> {
    let world = SimWorld::start(args).await?;
    let result = async {
        let store_path = world.dir.join("bench.db");
        let settings = bench_settings(&world.config, world.addr, &store_path, args.workers)?;
        let store = app::open_store(&settings).await?;
        let (worker, _tenants) = app::build_worker(&settings, store.clone())?;
        let sync = initial_and_idle(
            &worker,
            world.addr,
            &world.sim_stat,
            args.idle_rounds,
            &|_| {},
        )
        .await?;
        store.close().await;
        let mailboxes = args.tenants * args.mailboxes;
        Ok(SyncOnlyReport {
            mailboxes,
            initial_events: sync.initial_events,
            initial_pages: sync.initial_pages,
            initial_seconds: sync.initial_seconds,
            initial_cpu_seconds: sync.initial_cpu_seconds,
            cpu_us_per_stored_event: sync.cpu_us_per_stored_event(),
            idle_rounds: args.idle_rounds,
            idle_round_cpu_ms_per_mailbox: sync.idle_cpu_seconds * 1000.0 / mailboxes as f64,
            failed_jobs: sync.failed_jobs,
        })
    }
    .await;
    world.stop().await;
    result
}

/// One replica-mode measurement in a fresh schema of `postgres`, dropped afterwards.
async fn replica_run(
    args: &BenchArgs,
    config: &SimConfig,
    addr: SocketAddr,
    dir: &Path,
    postgres: &str,
    replicas: usize,
    sim_stat: &Option<String>,
) -> anyhow::Result<ReplicaRun> {
    use sqlx::Connection;
    anyhow::ensure!(replicas >= 1, "--replicas counts must be at least 1");
    let mut admin = sqlx::PgConnection::connect(postgres)
        .await
        .with_context(|| format!("cannot connect to {}", app::redact_url(postgres)))?;
    let schema = format!("calsync_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .context("cannot create the bench schema")?;
    let mut url = url::Url::parse(postgres).context("--postgres is not a URL")?;
    url.query_pairs_mut()
        .append_pair("options[search_path]", &schema);
    let result =
        replicas_initial_sync(args, config, addr, dir, url.as_str(), replicas, sim_stat).await;
    let dropped = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await;
    let _ = admin.close().await;
    let run = result?;
    dropped.with_context(|| format!("cannot drop the bench schema {schema}"))?;
    Ok(run)
}

async fn replicas_initial_sync(
    args: &BenchArgs,
    config: &SimConfig,
    addr: SocketAddr,
    dir: &Path,
    store_url: &str,
    replicas: usize,
    sim_stat: &Option<String>,
) -> anyhow::Result<ReplicaRun> {
    let sim_cpu = || {
        sim_stat
            .as_deref()
            .and_then(|path| cpu_seconds_of(path).ok())
            .unwrap_or(0.0)
    };
    let mailboxes = args.tenants * args.mailboxes;
    if !args.json {
        eprintln!(
            "replica mode: {replicas} x calsync serve on PostgreSQL, initial sync of {mailboxes} mailboxes..."
        );
    }
    // A dispatcher that lost every claim to another replica waits a poll interval: shorter
    // than the default second, so the figure is not the poll interval's. Replicas starting
    // together are admitted to their shares of the request rates within a heartbeat or two
    // and a second: short heartbeats, so the figure is not the admission's either.
    let toml = bench_toml(
        config,
        addr,
        store_url,
        args.workers,
        "poll_interval = \"100ms\"\nreplica_heartbeat = \"200ms\"\n",
    );
    let settings = Settings::from_toml_str(&toml)?;
    // Tables and mailboxes first, so the clock measures syncing only.
    let store = app::open_store(&settings).await?;
    let config_path = dir.join(format!("replicas-{replicas}.toml"));
    std::fs::write(&config_path, &toml)?;
    let exe = std::env::current_exe().context("cannot find the calsync executable")?;
    let (sim_cpu_before, machine_before) = (sim_cpu(), machine_ticks());
    let postgres_cpu_before = postgres_cpu_seconds();
    let started_at = Utc::now();
    let started = Instant::now();
    let mut children = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let mut command = Command::new(&exe);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env("RUST_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CALSYNC_") {
                command.env_remove(key);
            }
        }
        children.push(command.spawn().context("cannot start calsync serve")?);
    }
    let done = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let records = store.mailboxes().await?;
        if records.len() == mailboxes && records.iter().all(|m| m.last_success_at.is_some()) {
            break records;
        }
        for child in &mut children {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("a replica exited during the initial sync: {status}");
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("the replicas did not sync every mailbox within 10 minutes");
        }
    };
    let (sim_cpu_seconds, machine_after) = (sim_cpu() - sim_cpu_before, machine_ticks());
    let postgres_cpu_seconds = (postgres_cpu_seconds() - postgres_cpu_before).max(0.0);
    let machine_cpu_busy_percent = match (machine_before, machine_after) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            (busy1 - busy0) as f64 * 100.0 / (total1 - total0) as f64
        }
        _ => 0.0,
    };
    let mut replica_cpu_seconds = 0.0;
    for child in &mut children {
        if let Some(pid) = child.id() {
            replica_cpu_seconds += cpu_seconds_of(&format!("/proc/{pid}/stat")).unwrap_or(0.0);
        }
        let _ = child.kill().await;
    }
    let finished_at = done
        .iter()
        .filter_map(|m| m.last_success_at)
        .max()
        .unwrap_or(started_at);
    let seconds =
        ((finished_at - started_at).num_microseconds().unwrap_or(0) as f64 / 1e6).max(f64::EPSILON);
    let events: u64 = store.event_counts().await?.values().sum();
    store.close().await;
    let us_per_event = |cpu_seconds: f64| cpu_seconds * 1e6 / events.max(1) as f64;
    Ok(ReplicaRun {
        replicas,
        workers_per_replica: args.workers,
        seconds,
        events,
        events_per_second: events as f64 / seconds,
        mailboxes_per_second: mailboxes as f64 / seconds,
        replica_cpu_seconds,
        replica_cpu_us_per_event: us_per_event(replica_cpu_seconds),
        postgres_cpu_seconds,
        postgres_cpu_us_per_event: us_per_event(postgres_cpu_seconds),
        sim_cpu_seconds,
        machine_cpu_busy_percent,
        mailboxes_with_errors: done.iter().filter(|m| m.last_error_at.is_some()).count(),
    })
}

fn bench_settings(
    config: &SimConfig,
    addr: SocketAddr,
    store: &Path,
    workers: usize,
) -> anyhow::Result<Settings> {
    let url = format!("sqlite://{}", store.display());
    Ok(Settings::from_toml_str(&bench_toml(
        config, addr, &url, workers, "",
    ))?)
}

/// The bench's calsync configuration (TOML) for the simulator at `addr`, with `sync_extra`
/// lines added to its `[sync]` table.
fn bench_toml(
    config: &SimConfig,
    addr: SocketAddr,
    store_url: &str,
    workers: usize,
    sync_extra: &str,
) -> String {
    let mut toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "{store_url}"
max_connections = 8
[graph]
base_url = "http://{addr}/v1.0"
authority = "http://{addr}"
page_size = 100
[sync]
workers = {workers}
max_jobs_per_tenant = {workers}
{sync_extra}[log]
level = "error"
[resilience]
# Rate limits are policy, not client cost: raised so they do not cap the comparison.
tenant_requests_per_second = 100000
app_requests_per_second = 100000
"#
    );
    toml.push_str(&crate::demo::tenants_toml(config));
    toml
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

async fn spawn_sim(args: &BenchArgs, addr: SocketAddr, seed: u64) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the calsync executable")?;
    let child = Command::new(exe)
        .args([
            "sim",
            "--listen",
            &addr.to_string(),
            "--tenants",
            &args.tenants.to_string(),
            "--mailboxes",
            &args.mailboxes.to_string(),
            "--events",
            &args.events.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .env("RUST_LOG", "error")
        // The simulator stands in for Graph: a runtime size set for calsync
        // (`TOKIO_WORKER_THREADS`, read by tokio) must not shrink it too.
        .env_remove("TOKIO_WORKER_THREADS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the simulator process")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("the simulator did not start listening on {addr} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

async fn sim_requests(addr: SocketAddr) -> anyhow::Result<u64> {
    let client = calsync_core::net::http_client(Duration::from_secs(2), Duration::from_secs(10))?;
    let stats: serde_json::Value = client
        .get(format!("http://{addr}/_sim/stats"))
        .send()
        .await?
        .json()
        .await?;
    Ok(stats["graph_requests"].as_u64().unwrap_or(0))
}

/// Every mailbox's initial round, fetched with `workers` concurrent loops: a bearer token, a
/// GET, the nextLink found by a substring search, nothing parsed or stored.
async fn raw_ceiling(
    settings: &Settings,
    config: &SimConfig,
    tenants: &calsync_core::tenants::Tenants,
    workers: usize,
) -> anyhow::Result<(u64, f64)> {
    let http = calsync_core::net::http_client(
        settings.graph.connect_timeout,
        settings.graph.request_timeout,
    )?;
    let graph = calsync_core::graph::GraphClient::new(&settings.graph, http.clone());
    let mut work = Vec::new();
    for tenant in &config.tenants {
        let token = tenants
            .get(&tenant.name)
            .context("bench tenant is not configured")?
            .tokens
            .token()
            .await?;
        for mailbox in &tenant.mailboxes {
            let window = calsync_core::sync::window_at(
                Utc::now(),
                settings.sync.window_past,
                settings.sync.window_future,
                &tenant.name,
                mailbox,
            );
            work.push((
                graph.initial_link(mailbox, &window).to_string(),
                token.bearer_header(),
            ));
        }
    }
    let queue = Arc::new(tokio::sync::Mutex::new(work));
    let pages = Arc::new(AtomicU64::new(0));
    let page_size = settings.graph.page_size;
    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (queue, pages, http) = (Arc::clone(&queue), Arc::clone(&pages), http.clone());
        loops.spawn(async move {
            loop {
                let Some((mut url, bearer)) = queue.lock().await.pop() else {
                    return Ok::<(), anyhow::Error>(());
                };
                loop {
                    let body = http
                        .get(&url)
                        .header("Authorization", &bearer)
                        .header("Prefer", format!("odata.maxpagesize={page_size}"))
                        .send()
                        .await?
                        .text()
                        .await?;
                    pages.fetch_add(1, Ordering::Relaxed);
                    match next_link(&body) {
                        Some(next) => url = next,
                        None => break,
                    }
                }
            }
        });
    }
    while let Some(done) = loops.join_next().await {
        done??;
    }
    Ok((
        pages.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    ))
}

fn next_link(body: &str) -> Option<String> {
    let key = "\"@odata.nextLink\":\"";
    let start = body.find(key)? + key.len();
    let end = body[start..].find('"')? + start;
    Some(body[start..end].replace("\\/", "/"))
}

/// What many registered mailboxes cost (see [`registered_cost`]).
struct RegisteredCost {
    rss_per_mailbox: f64,
    selection_ms: f64,
    claims_per_second: f64,
    health_check_ms: f64,
    health_json_bytes: usize,
    metrics_health_ms: f64,
    health_error: Option<String>,
}

/// Registers `count` mailboxes in a fresh store and measures the process's RSS growth, the
/// dispatcher's due-selection query with all of them due, claims, and one health model.
async fn registered_cost(
    settings: &Settings,
    dir: &Path,
    count: usize,
) -> anyhow::Result<RegisteredCost> {
    let mut settings = settings.clone();
    settings.store.url = format!("sqlite://{}", dir.join("registered.db").display());
    let tenants: Vec<String> = settings.tenants.iter().map(|t| t.name.clone()).collect();
    settings
        .tenants
        .iter_mut()
        .for_each(|t| t.mailboxes.clear());
    let store = app::open_store(&settings).await?;
    let mailboxes: Vec<(String, String)> = (0..count)
        .map(|i| {
            (
                tenants[i % tenants.len()].clone(),
                format!("idle{i}@bench.example"),
            )
        })
        .collect();
    store.sync_config_mailboxes(&mailboxes, Utc::now()).await?;
    drop(mailboxes);
    let rss_before = status_kib("VmRSS:")?;
    let (worker, _) = app::build_worker(&settings, store.clone())?;
    // What a serving process does per poll: select due mailboxes, fairly per tenant.
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        store
            .due_candidates(Utc::now(), settings.sync.max_jobs_per_tenant as u32)
            .await?;
    }
    let selection_ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);
    // Claiming (the write per job start), a thousand times.
    let claims = 1000.min(count);
    let started = Instant::now();
    for id in 1..=claims as i64 {
        store
            .claim(
                id,
                worker.owner(),
                Utc::now(),
                Duration::from_secs(60),
                true,
            )
            .await?;
    }
    let claims_per_second = claims as f64 / started.elapsed().as_secs_f64();
    let rss_after = status_kib("VmRSS:")?;
    let per_mailbox = (rss_after.saturating_sub(rss_before) * 1024) as f64 / count as f64;
    // After the RSS reading: what `/healthz` builds and sends, once, over mailboxes as wide as
    // synced ones. It gives up when the store takes longer than the health check allows: that
    // is a finding, not a failed bench.
    as_if_synced(&settings.store.url).await?;
    let listed = calsync_core::health::MAILBOX_DETAIL_PER_TENANT;
    let started = Instant::now();
    let (health_json_bytes, health_error) =
        match calsync_core::health::current(&store, &worker, listed).await {
            Ok(health) => (serde_json::to_vec(&health)?.len(), None),
            Err(reason) => (0, Some(reason)),
        };
    let health_check_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    // Its failure, if any, is the same as the one above.
    let _ = calsync_core::health::current(&store, &worker, 0).await;
    let metrics_health_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(RegisteredCost {
        rss_per_mailbox: per_mailbox,
        selection_ms,
        claims_per_second,
        health_check_ms,
        health_json_bytes,
        metrics_health_ms,
        health_error,
    })
}

/// Gives every mailbox of the SQLite store at `url` the state of one synced a few minutes
/// ago: a window, a deltaLink as long as Graph's (~550 characters), a request id; one in 50
/// with a failure after it. The health model reads whole rows, so their width is its cost.
async fn as_if_synced(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut db = sqlx::SqliteConnection::connect(url).await?;
    let now = Utc::now();
    let at = |secs: i64| {
        (now - chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let link = format!(
        "https://graph.microsoft.com/v1.0/users/idle@bench.example/calendarView/delta?$deltatoken={}",
        "x".repeat(460)
    );
    sqlx::query(
        "UPDATE mailboxes SET window_start = ?1, window_end = ?2, delta_link = ?3,
             last_success_at = ?4, last_attempt_at = ?4,
             last_request_id = 'c0ffee00-1234-4abc-9def-0123456789ab',
             lease_owner = NULL, lease_until = NULL,
             last_error = CASE WHEN id % 50 = 0 THEN 'Graph answered HTTP 503' END,
             last_error_at = CASE WHEN id % 50 = 0 THEN ?5 END,
             consecutive_failures = CASE WHEN id % 50 = 0 THEN 1 ELSE 0 END",
    )
    .bind(at(30 * 86_400))
    .bind(at(-90 * 86_400))
    .bind(link)
    .bind(at(240))
    .bind(at(60))
    .execute(&mut db)
    .await?;
    // As a running store's checkpoints keep it: the pages in the database, not in the WAL.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut db)
        .await?;
    db.close().await?;
    Ok(())
}

/// User + system CPU seconds of this process (Linux `/proc`, whose clock ticks are 1/100 s).
/// The simulator process's CPU seconds so far (0 if unknown).
fn sim_cpu(stat: &Option<String>) -> f64 {
    stat.as_deref()
        .and_then(|path| cpu_seconds_of(path).ok())
        .unwrap_or(0.0)
}

fn cpu_seconds() -> anyhow::Result<f64> {
    cpu_seconds_of("/proc/self/stat")
}

/// User + system CPU seconds from a `/proc/<pid>/stat` file.
fn cpu_seconds_of(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let (_, ticks) = stat_ticks(&stat);
    Ok((ticks(11) + ticks(12)) as f64 / 100.0)
}

/// The command name of a `/proc/<pid>/stat` line and its fields after it, by index from the
/// state field (0), as clock ticks (0 if absent).
fn stat_ticks(stat: &str) -> (&str, impl Fn(usize) -> u64 + '_) {
    // The command name is in parentheses and may contain spaces.
    let (head, rest) = stat.rsplit_once(')').unwrap_or_default();
    let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (comm, move |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    })
}

/// User + system CPU seconds of every `postgres` process on the machine, with the time of
/// their reaped children (a backend that ends is reaped by the postmaster, so the CPU of a
/// connection closed between two readings still shows in their difference).
fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks_total = 0;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        // A process may end between listing and reading.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (comm, ticks) = stat_ticks(&stat);
        if comm == "postgres" {
            ticks_total += ticks(11) + ticks(12) + ticks(13) + ticks(14);
        }
    }
    ticks_total as f64 / 100.0
}

/// Busy and total CPU ticks of the whole machine, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}")
}

pub fn render(r: &BenchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!("\ncalsync bench on {}\n", r.machine));
    out.push_str(&format!(
        "  {} mailboxes x {} events, {} workers, simulator in a separate process on loopback\n\n",
        r.mailboxes, r.events_per_mailbox, r.workers
    ));
    let rows = [
        (
            "initial sync",
            format!(
                "{:.2} s for {} events in {} pages",
                r.initial_seconds, r.initial_events, r.initial_pages
            ),
        ),
        (
            "  requests/mailbox",
            format!(
                "{:.2}, of which {:.2} series-master fetches",
                r.initial_requests_per_mailbox, r.initial_master_requests_per_mailbox
            ),
        ),
        ("  events/s", format!("{:.0}", r.events_per_second)),
        ("  mailboxes/s", format!("{:.1}", r.mailboxes_per_second)),
        ("  pages/s", format!("{:.1}", r.pages_per_second)),
        (
            "raw ceiling pages/s",
            format!(
                "{:.1} ({} pages in {:.2} s)",
                r.raw_pages_per_second, r.raw_pages, r.raw_seconds
            ),
        ),
        (
            "ratio to raw",
            format!("{:.2} (target >= 0.70)", r.ratio_to_raw),
        ),
        (
            "CPU per stored event",
            format!("{:.1} us (target <= 8)", r.cpu_us_per_stored_event),
        ),
        (
            "CPU s, calsync / sim",
            format!(
                "initial sync {:.1} / {:.1}; raw loop {:.1} / {:.1}",
                r.initial_cpu_seconds,
                r.initial_sim_cpu_seconds,
                r.raw_cpu_seconds,
                r.raw_sim_cpu_seconds
            ),
        ),
        (
            "idle round",
            format!(
                "{:.2} s for {} mailboxes",
                r.idle_round_seconds, r.mailboxes
            ),
        ),
        (
            "  requests/mailbox",
            format!("{:.2}", r.idle_round_requests_per_mailbox),
        ),
        (
            "  CPU ms/mailbox",
            format!("{:.3} (target <= 0.2)", r.idle_round_cpu_ms_per_mailbox),
        ),
        ("peak RSS", format!("{:.1} MiB", r.peak_rss_mib)),
        (
            "registered mailboxes",
            format!("{}", r.registered_mailboxes),
        ),
        (
            "  RSS per mailbox",
            format!(
                "{:.0} bytes (target < 2048)",
                r.rss_per_registered_mailbox_bytes
            ),
        ),
        (
            "  due selection",
            format!("{:.1} ms per dispatch cycle", r.dispatch_selection_ms),
        ),
        ("  claims/s", format!("{:.0}", r.claims_per_second)),
        (
            "  health model",
            match &r.health_error {
                None => format!(
                    "{:.1} ms, {:.1} KiB of JSON (/healthz); {:.1} ms counts only (/metrics)",
                    r.health_check_ms,
                    r.health_json_bytes as f64 / 1024.0,
                    r.metrics_health_ms
                ),
                Some(reason) => format!(
                    "failed after {:.1} ms: {reason} (/healthz would answer 503)",
                    r.health_check_ms
                ),
            },
        ),
        ("failed jobs", format!("{}", r.failed_jobs)),
    ];
    for (name, value) in rows {
        out.push_str(&format!("  {name:<22} {value}\n"));
    }
    if !r.replica_runs.is_empty() {
        out.push_str(&format!(
            "\n  replicas on one PostgreSQL schema: initial sync of {} mailboxes x {} events, \
             calsync serve processes with {} workers each\n\n",
            r.mailboxes, r.events_per_mailbox, r.replica_runs[0].workers_per_replica
        ));
        out.push_str(&format!(
            "  {:>8} {:>9} {:>10} {:>12} {:>14} {:>13} {:>10} {:>13} {:>10} {:>11} {:>11}\n",
            "replicas",
            "seconds",
            "events/s",
            "mailboxes/s",
            "replica CPU s",
            "µs/event",
            "PG CPU s",
            "PG µs/event",
            "sim CPU s",
            "machine CPU",
            "mbx w/ err"
        ));
        for run in &r.replica_runs {
            out.push_str(&format!(
                "  {:>8} {:>9.2} {:>10.0} {:>12.1} {:>14.2} {:>13.1} {:>10.2} {:>13.1} {:>10.2} {:>10.0}% {:>11}\n",
                run.replicas,
                run.seconds,
                run.events_per_second,
                run.mailboxes_per_second,
                run.replica_cpu_seconds,
                run.replica_cpu_us_per_event,
                run.postgres_cpu_seconds,
                run.postgres_cpu_us_per_event,
                run.sim_cpu_seconds,
                run.machine_cpu_busy_percent,
                run.mailboxes_with_errors
            ));
        }
    }
    let w = &r.window_moves;
    out.push_str(&format!(
        "\n  window moves: full rounds per UTC hour over a simulated day, {} mailboxes synced every {:.0} s\n    {}\n    busiest hour {:02}:00 with {}, mean {:.1}: ratio {:.2} (target <= 2)\n",
        w.mailboxes,
        w.interval_seconds,
        w.per_hour.iter().map(|n| format!("{n:>3}")).collect::<Vec<_>>().join(""),
        w.busiest_hour,
        w.per_hour.get(w.busiest_hour).copied().unwrap_or(0),
        w.mean_per_hour,
        w.busiest_ratio
    ));
    if let Some(l) = &r.change_to_stored {
        out.push_str(&format!(
            "\n  change -> stored ({} changes)  via notification p50 {:.0} ms, max {:.0} ms; via polling every {:.0} ms p50 {:.0} ms, max {:.0} ms\n",
            l.samples, l.notification_p50_ms, l.notification_max_ms, l.poll_interval_ms, l.polling_p50_ms, l.polling_max_ms
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn a_day_of_1000_mailboxes_moves_their_windows_evenly() {
        let mailboxes: Vec<(String, String)> = (0..1000)
            .map(|n| {
                (
                    format!("tenant{}", n % 10),
                    format!("user{n}@tenant{}.example", n % 10),
                )
            })
            .collect();
        let day = Duration::from_secs(86_400);
        let moves = window_moves(
            &mailboxes,
            Duration::from_secs(300),
            Duration::from_secs(30),
            day * 30,
            day * 180,
            7,
        );
        assert_eq!(
            moves.per_hour.iter().sum::<u32>(),
            1000,
            "each mailbox once: {moves:?}"
        );
        assert!(moves.busiest_ratio <= 2.0, "{moves:?}");
    }

    #[test]
    fn replica_mode_takes_counts_and_needs_a_database() {
        let cli = Cli::try_parse_from([
            "bench",
            "--replicas",
            "1,2,4",
            "--postgres",
            "postgres://postgres@127.0.0.1:5432/test",
        ])
        .expect("replica mode parses");
        assert_eq!(cli.bench.replicas, [1, 2, 4]);
        assert!(Cli::try_parse_from(["bench", "--replicas", "2"]).is_err());
        let plain = Cli::try_parse_from(["bench"]).expect("defaults parse");
        assert!(plain.bench.replicas.is_empty() && plain.bench.postgres.is_none());
    }

    #[test]
    fn the_replica_table_is_rendered_only_in_replica_mode() {
        let mut report = BenchReport {
            machine: "test".into(),
            mailboxes: 10,
            events_per_mailbox: 5,
            workers: 2,
            initial_seconds: 1.0,
            initial_events: 50,
            initial_pages: 10,
            initial_requests_per_mailbox: 1.2,
            initial_master_requests_per_mailbox: 0.2,
            events_per_second: 50.0,
            mailboxes_per_second: 10.0,
            pages_per_second: 10.0,
            raw_pages: 10,
            raw_seconds: 0.5,
            raw_pages_per_second: 20.0,
            initial_cpu_seconds: 1.0,
            cpu_us_per_stored_event: 20.0,
            initial_sim_cpu_seconds: 1.0,
            raw_cpu_seconds: 0.1,
            raw_sim_cpu_seconds: 0.4,
            ratio_to_raw: 0.5,
            idle_round_requests_per_mailbox: 1.0,
            idle_round_cpu_ms_per_mailbox: 0.1,
            idle_round_seconds: 0.1,
            peak_rss_mib: 10.0,
            registered_mailboxes: 100,
            rss_per_registered_mailbox_bytes: 100.0,
            dispatch_selection_ms: 1.0,
            claims_per_second: 1000.0,
            health_check_ms: 1.0,
            health_json_bytes: 1000,
            metrics_health_ms: 1.0,
            health_error: None,
            failed_jobs: 0,
            replica_runs: Vec::new(),
            change_to_stored: None,
            window_moves: WindowMoves {
                mailboxes: 10,
                interval_seconds: 300.0,
                per_hour: vec![0; 24],
                mean_per_hour: 0.0,
                busiest_hour: 0,
                busiest_ratio: 0.0,
            },
        };
        assert!(!render(&report).contains("replicas on one PostgreSQL"));
        let json = serde_json::to_value(&report).expect("serialises");
        assert!(json.get("replica_runs").is_none());
        report.replica_runs.push(ReplicaRun {
            replicas: 2,
            workers_per_replica: 2,
            seconds: 2.0,
            events: 50,
            events_per_second: 25.0,
            mailboxes_per_second: 5.0,
            replica_cpu_seconds: 0.5,
            replica_cpu_us_per_event: 10_000.0,
            postgres_cpu_seconds: 0.25,
            postgres_cpu_us_per_event: 5_000.0,
            sim_cpu_seconds: 0.5,
            machine_cpu_busy_percent: 50.0,
            mailboxes_with_errors: 0,
        });
        let table = render(&report);
        assert!(table.contains("replicas on one PostgreSQL"), "{table}");
        assert!(table.contains("        2      2.00         25"), "{table}");
        let json = serde_json::to_value(&report).expect("serialises");
        assert_eq!(json["replica_runs"][0]["replicas"], 2);
        assert_eq!(json["replica_runs"][0]["postgres_cpu_us_per_event"], 5000.0);
        assert!(
            table.contains("10000.0") && table.contains("5000.0"),
            "{table}"
        );
    }

    #[test]
    fn a_proc_stat_line_gives_its_command_and_ticks() {
        let line = "2216 (postgres: x) S 1 2216 2216 0 -1 4194304 3964 13085 0 0 11 3 7 14 20 0";
        let (comm, ticks) = stat_ticks(line);
        assert_eq!(comm, "postgres: x");
        assert_eq!((ticks(11), ticks(12), ticks(13), ticks(14)), (11, 3, 7, 14));
        assert_eq!(ticks(99), 0);
    }
}
