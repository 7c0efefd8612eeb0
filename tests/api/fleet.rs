//! A fleet shares Graph's app-wide limit: three real `calsync serve` processes on one
//! PostgreSQL schema sync the simulator's mailboxes while the simulator enforces a low app-wide
//! limit, one that binds (the initial sync takes several seconds because of it). One replica
//! is killed with SIGKILL mid-sync. The simulator must see no second over its limit and give no
//! app-limit 429, every mailbox must complete its first round, and the survivors' shares of the
//! rate must grow once the dead replica's registry row has run out.
//!
//! calsync's limiter counts a request when it leaves; the simulator counts it when it arrives.
//! On a loaded machine a request can take a while between the two, so calsync is configured a
//! little under the simulator's limit, as an operator would configure it under Graph's.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use calsync::sim::{SimConfig, SimHandle};
use calsync::store::Store;
use serde_json::Value;
use tokio::process::Child;
use tokio::time::Instant;

use crate::helpers::sim::start_sim;
use crate::helpers::store::in_postgres_schema;

const REPLICAS: usize = 3;
/// The simulator's app-wide limit: requests per second.
const SIM_LIMIT: u32 = 20;
/// calsync's `resilience.app_requests_per_second`: the simulator's limit less a margin for the
/// time between a request leaving calsync and arriving.
const APP_LIMIT: u32 = 16;
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Deadlines for conditions, generous for a loaded two-core machine; the test waits for the
/// conditions, never for time.
const PATIENCE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_share_the_app_limit_through_a_kill() {
    in_postgres_schema(share_the_limit).await;
}

async fn share_the_limit(url: String) {
    let started = Instant::now();
    let mut config = SimConfig::generated(2, 8, 40, 31);
    config.app_requests_per_window = Some(SIM_LIMIT);
    config.app_window = Duration::from_secs(1);
    let sim = start_sim(config.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = fleet_toml(&sim, &config, &url);
    let config_path = dir.path().join("calsync.toml");
    std::fs::write(&config_path, &toml).expect("write the replicas' config");
    let settings = calsync::config::Settings::from_toml_str(&toml).expect("the config is valid");
    // Tables and mailboxes exist before any replica starts.
    let store = calsync::app::open_store(&settings)
        .await
        .expect("the store opens");
    let mailboxes = store.mailboxes().await.expect("store reads").len();

    let mut fleet = Fleet {
        config: config_path,
        dir: dir.path().to_path_buf(),
        replicas: Vec::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client"),
    };
    for _ in 0..REPLICAS {
        fleet.start_replica();
    }
    // Every replica is admitted with a third of the rate.
    let shares = fleet
        .wait_for_shares("every replica to take a third", |share| {
            share.replicas == Some(REPLICAS as u64)
        })
        .await;
    let third = f64::from(APP_LIMIT) / REPLICAS as f64;
    for share in shares.values() {
        assert!((share.app - third).abs() < 1e-9, "{share:?}");
    }

    // Kill a replica mid-sync: some mailboxes synced, not all, and it holds a lease.
    let victim = fleet.victim_mid_sync(&store, mailboxes).await;
    let victim_id = fleet.replicas[victim].id.clone().expect("known by now");
    let mut killed = fleet.replicas.remove(victim);
    killed.child.kill().await.expect("kill -9 a replica");
    let killed_at = Instant::now();

    // The sync completes (every mailbox's first success), and the survivors take half each
    // once the dead replica's row has run out: both watched at once, each noted when it holds.
    let give_up = Instant::now() + PATIENCE;
    let (mut synced_after, mut grown_after) = (None, None);
    let mut grown = BTreeMap::new();
    while synced_after.is_none() || grown_after.is_none() {
        if synced_after.is_none() {
            let records = store.mailboxes().await.expect("store reads");
            if records.iter().all(|m| m.last_success_at.is_some()) {
                synced_after = Some(started.elapsed());
            } else {
                assert!(
                    Instant::now() < give_up,
                    "the sync did not complete: {:?}\n{}",
                    records
                        .iter()
                        .filter(|m| m.last_success_at.is_none())
                        .map(|m| (&m.user_id, &m.lease_owner, &m.last_error))
                        .collect::<Vec<_>>(),
                    fleet.logs()
                );
            }
        }
        if grown_after.is_none() {
            let shares = fleet.shares().await;
            if shares.len() == fleet.replicas.len()
                && shares
                    .values()
                    .all(|s| s.replicas == Some(REPLICAS as u64 - 1))
            {
                grown_after = Some(killed_at.elapsed());
                grown = shares;
            } else {
                assert!(
                    Instant::now() < give_up,
                    "the survivors' shares did not grow: {shares:?}\n{}",
                    fleet.logs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (synced_after, grown_after) = (
        synced_after.unwrap_or_default(),
        grown_after.unwrap_or_default(),
    );
    for share in grown.values() {
        assert!(share.app > third, "{share:?}");
        assert!(
            (share.app - f64::from(APP_LIMIT) / 2.0).abs() < 1e-9,
            "{share:?}"
        );
        assert_ne!(share.id, victim_id);
    }

    // The metrics say the same.
    let survivor = &fleet.replicas[0];
    let metrics = fleet
        .http
        .get(format!("http://127.0.0.1:{}/metrics", survivor.port))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics reads");
    for line in [
        "calsync_replicas_live 2".to_string(),
        format!(
            "calsync_app_share_requests_per_second {}",
            f64::from(APP_LIMIT) / 2.0
        ),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "/metrics lacks `{line}`"
        );
    }

    let stats = sim.stats();
    let app = &stats.app;
    let _ = writeln!(
        std::io::stderr(),
        "fleet test: {mailboxes} mailboxes, {} Graph requests, synced after {synced_after:?}; \
         most requests in one second {} (simulator's limit {SIM_LIMIT}, calsync's {APP_LIMIT}); \
         app-limit 429s {}; survivors' share grew {grown_after:?} after the kill (lease {LEASE_TTL:?})",
        stats.graph_requests, app.max_per_second, app.throttled,
    );
    assert_eq!(app.limit, Some(SIM_LIMIT));
    assert_eq!(
        app.throttled,
        0,
        "the simulator throttled the app\n{}",
        fleet.logs()
    );
    assert!(
        app.max_per_second <= u64::from(SIM_LIMIT),
        "{} requests arrived within one second; the limit is {SIM_LIMIT}",
        app.max_per_second
    );
    // The limit bound: the fleet used most of it at some point (the sync was limited by it).
    assert!(
        app.max_per_second >= u64::from(APP_LIMIT) / 2,
        "at most {} requests in a second: the limit did not bind",
        app.max_per_second
    );
    fleet.kill_all().await;
    drop(killed);
}

/// Three replicas' configuration: small pages (a round is many requests), one-hour interval
/// (the first round is all there is to do), a three-second lease with short heartbeats, and
/// enough jobs at once (twelve) that the fleet could send several times the limit.
fn fleet_toml(sim: &SimHandle, config: &SimConfig, url: &str) -> String {
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
page_size = 5
connect_timeout = "2s"
request_timeout = "5s"
[sync]
interval = "1h"
workers = 4
max_jobs_per_tenant = 4
job_deadline = "20s"
lease_ttl = "{lease_ms}ms"
replica_heartbeat = "200ms"
poll_interval = "50ms"
failure_backoff_initial = "100ms"
failure_backoff_max = "1s"
[resilience]
app_requests_per_second = {APP_LIMIT}
retry_initial = "50ms"
retry_max = "500ms"
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

/// One replica's share as its `/healthz` reports it.
#[derive(Clone, Debug)]
struct ShareSeen {
    id: String,
    replicas: Option<u64>,
    app: f64,
}

struct Replica {
    child: Child,
    port: u16,
    log: PathBuf,
    /// Its id in the replica registry, once its `/healthz` answered.
    id: Option<String>,
}

struct Fleet {
    config: PathBuf,
    dir: PathBuf,
    replicas: Vec<Replica>,
    http: reqwest::Client,
}

impl Fleet {
    fn start_replica(&mut self) {
        let n = self.replicas.len() + 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = self.dir.join(format!("replica-{n}.log"));
        let stderr = std::fs::File::create(&log).expect("create a replica log");
        let mut command = crate::helpers::serve_command(&self.config, Some(stderr));
        command.env("CALSYNC_SERVER__LISTEN", format!("127.0.0.1:{port}"));
        let child = command.spawn().expect("start calsync serve");
        self.replicas.push(Replica {
            child,
            port,
            log,
            id: None,
        });
    }

    /// Each running replica's share, from its `/healthz` (absent while it does not answer).
    async fn shares(&mut self) -> BTreeMap<usize, ShareSeen> {
        let mut seen = BTreeMap::new();
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            if let Ok(Some(status)) = replica.child.try_wait() {
                panic!("replica {} exited: {status}\n{}", i + 1, tail(&replica.log));
            }
            let url = format!("http://127.0.0.1:{}/healthz", replica.port);
            let Ok(response) = self.http.get(&url).send().await else {
                continue;
            };
            let Ok(health) = response.json::<Value>().await else {
                continue;
            };
            let fleet = &health["fleet"];
            let id = health["replica"].as_str().unwrap_or_default().to_string();
            replica.id = Some(id.clone());
            seen.insert(
                i,
                ShareSeen {
                    id,
                    replicas: fleet["replicas"].as_u64(),
                    app: fleet["app_requests_per_second"].as_f64().unwrap_or(-1.0),
                },
            );
        }
        seen
    }

    /// Waits until every running replica's share meets `wanted`.
    async fn wait_for_shares(
        &mut self,
        what: &str,
        wanted: impl Fn(&ShareSeen) -> bool,
    ) -> BTreeMap<usize, ShareSeen> {
        let give_up = Instant::now() + PATIENCE;
        loop {
            let shares = self.shares().await;
            if shares.len() == self.replicas.len() && shares.values().all(&wanted) {
                return shares;
            }
            assert!(
                Instant::now() < give_up,
                "waited {PATIENCE:?} for {what}: {shares:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the sync is under way (a mailbox synced, not all) and some replica holds a
    /// lease; returns that replica's index.
    async fn victim_mid_sync(&mut self, store: &Store, mailboxes: usize) -> usize {
        let give_up = Instant::now() + PATIENCE;
        loop {
            let records = store.mailboxes().await.expect("store reads");
            let synced = records
                .iter()
                .filter(|m| m.last_success_at.is_some())
                .count();
            assert!(
                synced < mailboxes,
                "the sync completed before a replica could be killed mid-sync: make it longer"
            );
            if synced > 0 {
                let holder = records
                    .iter()
                    .filter_map(|m| m.lease_owner.as_deref())
                    .filter_map(|owner| owner.split('/').next())
                    .find_map(|owner| {
                        self.replicas
                            .iter()
                            .position(|r| r.id.as_deref() == Some(owner))
                    });
                if let Some(victim) = holder {
                    return victim;
                }
            }
            assert!(
                Instant::now() < give_up,
                "no replica held a lease mid-sync\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn kill_all(&mut self) {
        for replica in &mut self.replicas {
            let _ = replica.child.kill().await;
        }
    }

    fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- replica {}:\n{}", i + 1, tail(&r.log)))
            .collect::<Vec<_>>()
            .join("\n")
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
