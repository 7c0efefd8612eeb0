//! `calsync drill`: replays the incident on the simulator, compressed in time. Tenant A's
//! identity platform and Graph degrade for the outage span (latency, resets, requests that
//! are never answered, token failures), the other tenants stay healthy, one mailbox gets a 429
//! storm; then everything recovers. The same run without faults is the baseline. During the
//! outage span the application books appointments in every tenant through the admin API; the
//! report says, per tenant and phase, what the outage did to sync and to those writes, and
//! checks the targets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bookings::{self, AdminApi, Booking, BookingOutcome};
use crate::console::{progress_bar, short_duration, LiveView};
use crate::demo::sim_service_settings;
use calsync_core::app::Application;
use calsync_core::config::Settings;
use calsync_core::resilience::guard::Dependency;
use calsync_core::scheduler::Worker;
use calsync_core::store::{MailboxRecord, Store, WriteState};
use calsync_sim::{self as sim, Endpoint, FaultKind, FaultRule, RetryAfter, SimConfig, SimHandle};

const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The incident, in real time: 22 minutes of outage.
const INCIDENT: Duration = Duration::from_secs(22 * 60);

#[derive(clap::Args, Debug, Clone)]
pub struct DrillArgs {
    /// Time compression: 60 replays each real minute in one second (22 min outage = 22 s).
    #[arg(long, default_value_t = 60.0)]
    pub scale: f64,
    /// Tenants (tenant1 is the one whose identity platform fails).
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Mailboxes per tenant.
    #[arg(long, default_value_t = 6)]
    pub mailboxes: usize,
    /// Generated events per mailbox.
    #[arg(long, default_value_t = 40)]
    pub events: usize,
    /// Appointments booked per mailbox during the outage span, through the admin API, in every
    /// tenant at the same pace (0 books none).
    #[arg(long, default_value_t = 2)]
    pub writes: usize,
    /// Skip the baseline run without the outage (then the lag comparison is not checked).
    #[arg(long)]
    pub no_baseline: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Timings of one drill, derived from the scale.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timeline {
    pub before: Duration,
    pub outage: Duration,
    pub after: Duration,
    pub interval: Duration,
    pub job_deadline: Duration,
}

impl Timeline {
    pub fn scaled(scale: f64) -> anyhow::Result<Self> {
        if !(1.0..=3600.0).contains(&scale) {
            anyhow::bail!("--scale must be between 1 and 3600, got {scale}");
        }
        let s = |real: Duration| real.div_f64(scale);
        Ok(Self {
            before: s(Duration::from_secs(8 * 60)),
            outage: s(INCIDENT),
            after: s(Duration::from_secs(20 * 60)),
            interval: s(Duration::from_secs(5 * 60)),
            job_deadline: s(Duration::from_secs(120)),
        })
    }

    fn total(&self) -> Duration {
        self.before + self.outage + self.after
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LagStats {
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
    pub samples: usize,
}

/// Seconds from a booking's acceptance to its delivery.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeliveryStats {
    pub p50_seconds: f64,
    pub p95_seconds: f64,
    pub max_seconds: f64,
    pub samples: usize,
}

/// What became of the appointments booked in one tenant during the outage span.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WriteReport {
    /// Accepted by the admin API.
    pub booked: usize,
    pub delivered: usize,
    /// Still queued when the drill ended.
    pub queued: usize,
    pub failed: usize,
    pub conflict: usize,
    /// Events the simulator's Graph made twice from one create (`writes.duplicates`).
    pub duplicated_creates: u64,
    /// Extra events with a booking's subject in the simulator's calendars at the end.
    pub doubled_in_outlook: usize,
    /// Bookings never seen in the simulator's calendars.
    pub never_in_outlook: usize,
    /// Accepted -> delivered, without the throttled mailbox.
    pub latency: DeliveryStats,
    /// The mailbox under the 429 storm (both runs), if it is this tenant's, and the latency
    /// of its bookings, which wait for the storm to end.
    pub throttled_mailbox: Option<String>,
    pub throttled_latency: Option<DeliveryStats>,
    /// The outage tenant: seconds from recovery until its last booking was delivered (0 when
    /// all were delivered before), and until the last was seen in the simulator's calendars.
    pub last_delivered_after_recovery_seconds: Option<f64>,
    pub last_in_outlook_after_recovery_seconds: Option<f64>,
}

impl WriteReport {
    pub fn duplicates(&self) -> u64 {
        self.duplicated_creates + self.doubled_in_outlook as u64
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TenantReport {
    pub tenant: String,
    pub faulted: bool,
    pub lag_before: LagStats,
    pub lag_during: LagStats,
    pub lag_after: LagStats,
    pub longest_slot_hold_seconds: f64,
    pub token_requests_during_outage: u64,
    pub graph_requests_during_outage: u64,
    pub token_breaker_trips_during_outage: u64,
    pub graph_breaker_trips_during_outage: u64,
    /// Seconds from the end of the outage until every mailbox of the tenant had synced again.
    pub drained_after_seconds: Option<f64>,
    pub jobs: BTreeMap<String, u64>,
    /// A mailbox of this tenant Graph answers 504 on every page for the whole run (the outage
    /// run only); its lag is not in this tenant's figures.
    pub poisoned_mailbox: Option<String>,
    /// The tenant's Graph breaker trips over the whole run.
    pub graph_breaker_trips: u64,
    pub writes: WriteReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub met: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub scale: f64,
    pub timeline: Timeline,
    pub tenants: Vec<TenantReport>,
    pub baseline: Option<Vec<TenantReport>>,
    pub violations: serde_json::Value,
    pub targets: Vec<Target>,
    pub all_targets_met: bool,
}

/// One run's raw observations.
struct RunObservations {
    tenants: Vec<TenantReport>,
    violations: serde_json::Value,
    violation_count: u64,
}

pub async fn run(args: DrillArgs) -> anyhow::Result<DrillReport> {
    if args.tenants < 2 || args.mailboxes == 0 {
        anyhow::bail!(
            "the drill needs at least 2 tenants (one faulted, one healthy) and 1 mailbox each"
        );
    }
    let timeline = Timeline::scaled(args.scale)?;
    let mut view = LiveView::new(!args.json);
    let baseline = if args.no_baseline {
        None
    } else {
        view.say("baseline run (no outage; the 429 storm only)...");
        Some(run_once(&args, timeline, false, &mut view).await?)
    };
    view.say("outage run...");
    let outage = run_once(&args, timeline, true, &mut view).await?;
    let targets = evaluate(&outage, baseline.as_ref(), timeline);
    let all_targets_met = targets.iter().all(|t| t.met);
    Ok(DrillReport {
        scale: args.scale,
        timeline,
        tenants: outage.tenants,
        baseline: baseline.map(|b| b.tenants),
        violations: outage.violations,
        targets,
        all_targets_met,
    })
}

/// The service's settings for a drill: the production defaults divided by the scale.
fn drill_settings(
    sim: &SimHandle,
    config: &SimConfig,
    store: &Path,
    t: Timeline,
    scale: f64,
) -> anyhow::Result<Settings> {
    let ms = |d: Duration| format!("\"{}ms\"", d.as_millis().max(1));
    let s = |real: Duration| ms(real.div_f64(scale));
    let overrides = format!(
        r#"
[graph]
page_size = 50
connect_timeout = {connect}
request_timeout = {request}
[sync]
interval = {interval}
jitter = {jitter}
workers = 8
job_deadline = {deadline}
failure_backoff_initial = {fb_initial}
failure_backoff_max = {fb_max}
poll_interval = "50ms"
lease_ttl = {lease}
stuck_grace = {grace}
[resilience]
retry_initial = {retry_initial}
retry_max = {retry_max}
slow_call = {slow}
breaker_window = {window}
breaker_min_calls = 3
breaker_base_break = {base_break}
breaker_max_break = {max_break}
breaker_permanent_break = {perm}
"#,
        connect = s(Duration::from_secs(5)),
        request = s(Duration::from_secs(30)),
        interval = ms(t.interval),
        jitter = s(Duration::from_secs(30)),
        deadline = ms(t.job_deadline),
        fb_initial = s(Duration::from_secs(30)),
        fb_max = s(Duration::from_secs(300)),
        lease = s(Duration::from_secs(60)),
        grace = s(Duration::from_secs(10)),
        retry_initial = s(Duration::from_secs(1)),
        retry_max = s(Duration::from_secs(30)),
        slow = s(Duration::from_secs(20)),
        window = s(Duration::from_secs(60)),
        base_break = s(Duration::from_secs(10)),
        // Never longer than an interval: the backlog must drain within two intervals.
        max_break = ms(t.interval),
        perm = s(Duration::from_secs(1800)),
    );
    sim_service_settings(sim, config, store, &overrides)
}

/// The mailbox Graph cannot serve in the outage run (504 on every page, the whole run): the
/// third tenant's first. Its tenant's other mailboxes must keep their baseline lag.
fn poisoned_mailbox(config: &SimConfig) -> Option<String> {
    config.tenants.get(2)?.mailboxes.first().cloned()
}

/// The mailbox Graph throttles (429) over the outage span, in both runs: the second tenant's
/// first.
fn storm_mailbox(config: &SimConfig) -> String {
    config.tenants[1].mailboxes[0].clone()
}

/// An appointment the drill books: when (from the start of the clock), where, its number in
/// its tenant.
#[derive(Clone, Debug, PartialEq)]
struct PlannedBooking {
    at: Duration,
    tenant: String,
    mailbox: String,
    n: usize,
}

impl PlannedBooking {
    fn subject(&self) -> String {
        format!("drill booking {}-{}", self.tenant, self.n)
    }

    fn external_id(&self) -> String {
        format!("drill-{}-{}", self.tenant, self.n)
    }
}

/// `per_mailbox` appointments in every mailbox but `skip`, spread evenly over the outage
/// span: a tenant's mailboxes one after another, every tenant at the same moments.
fn booking_plan(
    config: &SimConfig,
    t: Timeline,
    per_mailbox: usize,
    skip: Option<&str>,
) -> Vec<PlannedBooking> {
    let mut plan = Vec::new();
    for tenant in &config.tenants {
        let count = tenant.mailboxes.len();
        for round in 0..per_mailbox {
            for (j, mailbox) in tenant.mailboxes.iter().enumerate() {
                if Some(mailbox.as_str()) == skip {
                    continue;
                }
                let share = (round as f64 + (j as f64 + 0.5) / count as f64) / per_mailbox as f64;
                plan.push(PlannedBooking {
                    at: t.before + t.outage.mul_f64(share),
                    tenant: tenant.name.clone(),
                    mailbox: mailbox.clone(),
                    n: round * count + j + 1,
                });
            }
        }
    }
    plan.sort_by_key(|p| p.at);
    plan
}

/// Books the plan through the admin API, each at its time, sending each accepted booking on.
async fn book_on_schedule(
    api: AdminApi,
    plan: Vec<PlannedBooking>,
    mailboxes: HashMap<String, MailboxRecord>,
    started: Instant,
    booked: tokio::sync::mpsc::UnboundedSender<Booking>,
) -> anyhow::Result<()> {
    let tomorrow = Utc::now() + chrono::Duration::days(1);
    for p in plan {
        tokio::time::sleep_until(started + p.at).await;
        let mailbox = mailboxes
            .get(&p.mailbox)
            .with_context(|| format!("{} is not in the store", p.mailbox))?;
        let start = tomorrow + chrono::Duration::minutes(30 * p.n as i64);
        let booking = api
            .book(mailbox, &p.external_id(), &p.subject(), start)
            .await?;
        // The sampling loop is gone only once the run is over.
        let _ = booked.send(booking);
    }
    Ok(())
}

/// Marks, with the time, each booking whose event has appeared in its mailbox's calendar in
/// the simulator.
fn look_in_outlook(
    sim: &SimHandle,
    bookings: &[Booking],
    seen: &mut HashMap<String, DateTime<Utc>>,
) {
    let mut waiting: BTreeMap<&str, Vec<&Booking>> = BTreeMap::new();
    for b in bookings.iter().filter(|b| !seen.contains_key(&b.write_id)) {
        waiting.entry(b.mailbox.as_str()).or_default().push(b);
    }
    for (mailbox, waiting) in waiting {
        let subjects = bookings::subject_counts(sim, mailbox);
        let now = Utc::now();
        for b in waiting {
            if subjects.contains_key(&b.subject) {
                seen.insert(b.write_id.clone(), now);
            }
        }
    }
}

/// The 429 storm (in both runs) and, with `outage`, tenant A's outage, starting `before` from
/// now, and the poisoned mailbox (504 on every page for the whole run).
fn incident_faults(config: &SimConfig, t: Timeline, outage: bool) -> Vec<FaultRule> {
    let tenant_a = config.tenants[0].name.clone();
    let storm_mailbox = storm_mailbox(config);
    let start = t.before.as_millis() as u64;
    let span = Some(t.outage.as_millis() as u64);
    let on_a = |kind: FaultKind, endpoint: Endpoint, p: f64| {
        FaultRule::new(kind)
            .tenant(tenant_a.clone())
            .endpoint(endpoint)
            .probability(p)
            .window_ms(start, span)
    };
    let storm = FaultRule::new(FaultKind::Status {
        code: 429,
        graph_code: Some("ApplicationThrottled".into()),
        message: None,
        aadsts: None,
        retry_after: RetryAfter::Seconds(1),
    })
    .mailbox(storm_mailbox)
    .endpoint(Endpoint::Graph)
    .window_ms(start, span);
    if !outage {
        return vec![storm];
    }
    let poisoned = poisoned_mailbox(config).map(|mailbox| {
        FaultRule::new(FaultKind::Status {
            code: 504,
            graph_code: Some("UnknownError".into()),
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .mailbox(mailbox)
        .endpoint(Endpoint::Graph)
    });
    poisoned
        .into_iter()
        .chain([
            storm,
            // The identity platform: every token request fails one way or another.
            on_a(FaultKind::Hang, Endpoint::Token, 0.3),
            on_a(FaultKind::Reset, Endpoint::Token, 0.3),
            on_a(
                FaultKind::Status {
                    code: 503,
                    graph_code: Some("temporarily_unavailable".into()),
                    message: None,
                    aadsts: Some(50001),
                    retry_after: RetryAfter::None,
                },
                Endpoint::Token,
                1.0,
            ),
            // Graph for tenant A: packet loss, silence, latency.
            on_a(FaultKind::Reset, Endpoint::Graph, 0.25),
            on_a(FaultKind::Hang, Endpoint::Graph, 0.15),
            on_a(
                FaultKind::Latency {
                    ms: (t.job_deadline.as_millis() as u64 / 8).max(1),
                },
                Endpoint::Graph,
                0.5,
            ),
        ])
        .collect()
}

async fn run_once(
    args: &DrillArgs,
    t: Timeline,
    faults: bool,
    view: &mut LiveView,
) -> anyhow::Result<RunObservations> {
    let mut config = SimConfig::generated(args.tenants, args.mailboxes, args.events, 7);
    config.mutations_per_second =
        (args.tenants * args.mailboxes) as f64 / t.interval.as_secs_f64().max(0.001) / 4.0;
    // Tokens that need refreshing during the outage, so the identity failure is felt.
    config.access_token_lifetime = t.before + t.outage / 2;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the simulator")?;
    let sim = sim::start(config.clone(), listener).await?;
    let dir = std::env::temp_dir().join(format!("calsync-drill-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let mut settings = drill_settings(&sim, &config, &dir.join("drill.db"), t, args.scale)?;
    let token = bookings::enable_writes(&mut settings);
    let app = Application::build(settings).await?;
    let api = AdminApi::new(app.port(), token)?;
    let store = app.store().clone();
    let worker = app.worker();
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    // Start the clock once every mailbox has synced, so "before" is steady state.
    let warmup = Instant::now();
    loop {
        let m = store.mailboxes().await?;
        if m.iter().all(|m| m.last_success_at.is_some()) {
            break;
        }
        if warmup.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("initial sync did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let poisoned = if faults {
        poisoned_mailbox(&config)
    } else {
        None
    };
    // The poisoned mailbox is left out: Graph refuses every call for it, writes included.
    let plan = booking_plan(&config, t, args.writes, poisoned.as_deref());
    let records: HashMap<String, MailboxRecord> = store
        .mailboxes()
        .await?
        .into_iter()
        .map(|m| (m.user_id.clone(), m))
        .collect();
    sim.add_faults(incident_faults(&config, t, faults));
    let started = Instant::now();
    let start_wall = Utc::now();
    let outage_start = start_wall + chrono::Duration::from_std(t.before)?;
    let outage_end = outage_start + chrono::Duration::from_std(t.outage)?;
    let tenant_names: Vec<String> = config.tenants.iter().map(|t| t.name.clone()).collect();
    let (booked_tx, mut booked_rx) = tokio::sync::mpsc::unbounded_channel();
    let booker = tokio::spawn(book_on_schedule(api, plan, records, started, booked_tx));
    let mut bookings: Vec<Booking> = Vec::new();
    let mut seen: HashMap<String, DateTime<Utc>> = HashMap::new();
    let mut samples: BTreeMap<String, [Vec<f64>; 3]> = tenant_names
        .iter()
        .map(|n| (n.clone(), Default::default()))
        .collect();
    let mut at_outage_start: Option<Snapshot> = None;
    let mut at_outage_end: Option<Snapshot> = None;
    let mut drained: BTreeMap<String, f64> = BTreeMap::new();
    while started.elapsed() < t.total() {
        let now = Utc::now();
        let phase = if now < outage_start {
            0
        } else if now < outage_end {
            1
        } else {
            2
        };
        if phase >= 1 && at_outage_start.is_none() {
            at_outage_start = Some((
                serde_json::to_value(sim.stats())?,
                trips(&worker, &tenant_names),
            ));
        }
        if phase == 2 && at_outage_end.is_none() {
            at_outage_end = Some((
                serde_json::to_value(sim.stats())?,
                trips(&worker, &tenant_names),
            ));
        }
        while let Ok(booking) = booked_rx.try_recv() {
            bookings.push(booking);
        }
        look_in_outlook(&sim, &bookings, &mut seen);
        let mut mailboxes = store.mailboxes().await?;
        mailboxes.retain(|m| Some(&m.user_id) != poisoned.as_ref());
        for m in &mailboxes {
            let lag = (now - m.behind_since()).num_milliseconds() as f64 / 1000.0;
            if let Some(s) = samples.get_mut(&m.tenant) {
                s[phase].push(lag);
            }
        }
        if phase == 2 {
            for name in &tenant_names {
                if drained.contains_key(name) {
                    continue;
                }
                let all = mailboxes
                    .iter()
                    .filter(|m| &m.tenant == name)
                    .all(|m| m.last_success_at.is_some_and(|s| s > outage_end));
                if all {
                    drained.insert(
                        name.clone(),
                        (now - outage_end).num_milliseconds() as f64 / 1000.0,
                    );
                }
            }
        }
        let mut booked: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for b in &bookings {
            let e = booked.entry(b.tenant.clone()).or_default();
            e.0 += usize::from(seen.contains_key(&b.write_id));
            e.1 += 1;
        }
        view.draw(&frame(
            &mailboxes,
            &booked,
            started.elapsed(),
            t,
            phase,
            faults,
            &worker,
        ));
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    view.finish(&[format!(
        "{} done",
        if faults { "outage run" } else { "baseline run" }
    )]);
    booker.await.context("booking task failed")??;
    while let Ok(booking) = booked_rx.try_recv() {
        bookings.push(booking);
    }
    look_in_outlook(&sim, &bookings, &mut seen);
    let sim_stats = sim.stats();
    let stats_end = serde_json::to_value(&sim_stats)?;
    let trips_end = trips(&worker, &tenant_names);
    shutdown.cancel();
    service.await.context("service task failed")??;
    let outcomes = bookings::outcomes(&store, &sim, &bookings).await?;
    sim.shutdown().await;

    let (stats_a, trips_a) =
        at_outage_start.unwrap_or_else(|| (stats_end.clone(), trips(&worker, &tenant_names)));
    let (stats_b, trips_b) =
        at_outage_end.unwrap_or_else(|| (stats_end.clone(), trips(&worker, &tenant_names)));
    let holds = slot_holds(&store, start_wall).await?;
    let mut tenants = Vec::new();
    for (i, name) in tenant_names.iter().enumerate() {
        let phases = samples.remove(name).unwrap_or_default();
        let count = |stats: &serde_json::Value, key: &str| {
            stats["tenants"][name][key].as_u64().unwrap_or(0)
        };
        let (tb_a, gb_a) = trips_a.get(name).copied().unwrap_or_default();
        let (tb_b, gb_b) = trips_b.get(name).copied().unwrap_or_default();
        let (hold, jobs) = holds.get(name).cloned().unwrap_or_default();
        tenants.push(TenantReport {
            tenant: name.clone(),
            faulted: faults && i == 0,
            lag_before: lag_stats(&phases[0]),
            lag_during: lag_stats(&phases[1]),
            lag_after: lag_stats(&phases[2]),
            longest_slot_hold_seconds: hold,
            token_requests_during_outage: count(&stats_b, "token_requests")
                .saturating_sub(count(&stats_a, "token_requests")),
            graph_requests_during_outage: count(&stats_b, "graph_requests")
                .saturating_sub(count(&stats_a, "graph_requests")),
            token_breaker_trips_during_outage: tb_b.saturating_sub(tb_a),
            graph_breaker_trips_during_outage: gb_b.saturating_sub(gb_a),
            drained_after_seconds: drained.get(name).copied(),
            jobs,
            poisoned_mailbox: poisoned
                .clone()
                .filter(|p| config.tenants[i].mailboxes.contains(p)),
            graph_breaker_trips: trips_end.get(name).map_or(0, |t| t.1),
            writes: write_report(
                name,
                &outcomes,
                &seen,
                config.tenants[i]
                    .mailboxes
                    .iter()
                    .filter_map(|m| sim_stats.mailboxes.get(m))
                    .map(|m| m.writes.duplicates)
                    .sum(),
                Some(storm_mailbox(&config)).filter(|m| config.tenants[i].mailboxes.contains(m)),
                (faults && i == 0).then_some(outage_end),
            ),
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let v = &stats_end["violations"];
    let violation_count = ["early_retry", "over_concurrency", "wrong_tenant"]
        .iter()
        .map(|k| v[k]["count"].as_u64().unwrap_or(0))
        .sum();
    Ok(RunObservations {
        tenants,
        violations: v.clone(),
        violation_count,
    })
}

/// Breaker trips (token, Graph) per tenant.
type Trips = BTreeMap<String, (u64, u64)>;
/// The simulator's counters and the breakers' trips at one moment.
type Snapshot = (serde_json::Value, Trips);

fn trips(worker: &Arc<Worker>, tenants: &[String]) -> Trips {
    tenants
        .iter()
        .map(|t| {
            let b = worker.breakers(t);
            let of = |d: Dependency| b.iter().find(|s| s.dependency == d).map_or(0, |s| s.trips);
            (t.clone(), (of(Dependency::Token), of(Dependency::Graph)))
        })
        .collect()
}

/// Per tenant: the longest job (time a worker slot was held) and job counts by outcome.
async fn slot_holds(
    store: &Store,
    since: DateTime<Utc>,
) -> anyhow::Result<BTreeMap<String, (f64, BTreeMap<String, u64>)>> {
    let mut out: BTreeMap<String, (f64, BTreeMap<String, u64>)> = BTreeMap::new();
    for m in store.mailboxes().await? {
        let entry = out.entry(m.tenant.clone()).or_default();
        for run in store
            .runs(m.id, calsync_core::store::RUNS_KEPT_PER_MAILBOX as u32)
            .await?
        {
            if run.started_at < since {
                continue;
            }
            let held = (run.finished_at - run.started_at).num_milliseconds() as f64 / 1000.0;
            entry.0 = entry.0.max(held);
            *entry.1.entry(run.outcome.clone()).or_default() += 1;
        }
    }
    Ok(out)
}

/// One tenant's bookings: counts, latency, and with `recovery` (the outage tenant) how long
/// after it the last was delivered and seen in the simulator.
fn write_report(
    tenant: &str,
    outcomes: &[BookingOutcome],
    seen: &HashMap<String, DateTime<Utc>>,
    duplicated_creates: u64,
    throttled: Option<String>,
    recovery: Option<DateTime<Utc>>,
) -> WriteReport {
    let mine: Vec<&BookingOutcome> = outcomes
        .iter()
        .filter(|o| o.booking.tenant == tenant)
        .collect();
    let count = |state: WriteState| mine.iter().filter(|o| o.state == state).count();
    let latencies = |throttled_only: bool| -> Vec<f64> {
        mine.iter()
            .filter(|o| (Some(&o.booking.mailbox) == throttled.as_ref()) == throttled_only)
            .filter_map(|o| o.latency_seconds())
            .collect()
    };
    let (latency, throttled_latency) = (delivery_stats(&latencies(false)), latencies(true));
    let throttled = throttled.filter(|m| mine.iter().any(|o| &o.booking.mailbox == m));
    let since_recovery = |times: Vec<Option<DateTime<Utc>>>| -> Option<f64> {
        let recovery = recovery?;
        let last = times
            .into_iter()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()?;
        Some(((last - recovery).num_milliseconds() as f64 / 1000.0).max(0.0))
    };
    WriteReport {
        booked: mine.len(),
        delivered: count(WriteState::Delivered),
        queued: count(WriteState::Queued),
        failed: count(WriteState::Failed),
        conflict: count(WriteState::Conflict),
        duplicated_creates,
        doubled_in_outlook: mine.iter().map(|o| o.in_outlook.saturating_sub(1)).sum(),
        never_in_outlook: mine
            .iter()
            .filter(|o| !seen.contains_key(&o.booking.write_id))
            .count(),
        latency,
        throttled_latency: throttled
            .as_ref()
            .map(|_| delivery_stats(&throttled_latency)),
        throttled_mailbox: throttled,
        last_delivered_after_recovery_seconds: since_recovery(
            mine.iter().map(|o| o.delivered_at).collect(),
        ),
        last_in_outlook_after_recovery_seconds: since_recovery(
            mine.iter()
                .map(|o| seen.get(&o.booking.write_id).copied())
                .collect(),
        ),
    }
}

fn delivery_stats(samples: &[f64]) -> DeliveryStats {
    let sorted = sorted(samples);
    DeliveryStats {
        p50_seconds: quantile(&sorted, 0.50),
        p95_seconds: quantile(&sorted, 0.95),
        max_seconds: quantile(&sorted, 1.0),
        samples: sorted.len(),
    }
}

fn lag_stats(samples: &[f64]) -> LagStats {
    let sorted = sorted(samples);
    LagStats {
        p50_seconds: quantile(&sorted, 0.50),
        p99_seconds: quantile(&sorted, 0.99),
        max_seconds: quantile(&sorted, 1.0),
        samples: sorted.len(),
    }
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The `q` quantile of sorted samples (nearest rank); 0 without samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `booked`: per tenant, bookings seen in the simulator's calendars and bookings accepted.
fn frame(
    mailboxes: &[calsync_core::store::MailboxRecord],
    booked: &BTreeMap<String, (usize, usize)>,
    elapsed: Duration,
    t: Timeline,
    phase: usize,
    faults: bool,
    worker: &Arc<Worker>,
) -> Vec<String> {
    let phase_name = match (phase, faults) {
        (1, true) => "OUTAGE",
        (0, _) => "before",
        (1, false) => "during",
        _ => "after",
    };
    let now = Utc::now();
    let mut lines = vec![format!(
        "{}  {phase_name}",
        progress_bar(
            "drill",
            elapsed.as_millis() as usize,
            t.total().as_millis() as usize,
            30
        )
    )];
    lines.push(format!(
        "  {:<10} {:>9} {:>8} {:>8} {:>9}  breakers (token / graph)",
        "tenant", "max lag", "failing", "running", "bookings"
    ));
    let mut tenants: BTreeMap<&str, (i64, usize)> = BTreeMap::new();
    for m in mailboxes {
        let e = tenants.entry(m.tenant.as_str()).or_default();
        e.0 = e.0.max((now - m.behind_since()).num_milliseconds());
        e.1 += usize::from(m.consecutive_failures > 0);
    }
    let status = worker.status();
    for (tenant, (lag, failing)) in tenants {
        let running = status.running.iter().filter(|r| r.tenant == tenant).count();
        let b = worker.breakers(tenant);
        let state = |d: Dependency| {
            b.iter()
                .find(|s| s.dependency == d)
                .map_or("-", |s| s.state.as_str())
        };
        let (in_outlook, accepted) = booked.get(tenant).copied().unwrap_or_default();
        lines.push(format!(
            "  {:<10} {:>9} {:>8} {:>8} {:>9}  {} / {}",
            tenant,
            short_duration(lag as f64 / 1000.0),
            failing,
            running,
            format!("{in_outlook}/{accepted}"),
            state(Dependency::Token),
            state(Dependency::Graph)
        ));
    }
    lines
}

fn evaluate(
    outage: &RunObservations,
    baseline: Option<&RunObservations>,
    t: Timeline,
) -> Vec<Target> {
    let mut targets = Vec::new();
    let deadline = t.job_deadline.as_secs_f64();
    // Bookkeeping after the deadline fires (writing the outcome) is not slot time of the job.
    let tolerance = 0.1;
    let longest = outage
        .tenants
        .iter()
        .map(|r| r.longest_slot_hold_seconds)
        .fold(0.0, f64::max);
    targets.push(Target {
        name: "no job holds a slot longer than sync.job_deadline".into(),
        met: longest <= deadline + tolerance,
        detail: format!("longest {longest:.3}s, deadline {deadline:.3}s"),
    });
    match baseline {
        Some(base) => {
            for (r, b) in outage.tenants.iter().zip(&base.tenants).skip(1) {
                let limit = b.lag_during.p99_seconds * 1.10;
                targets.push(Target {
                    name: format!(
                        "{}: p99 lag during the outage within 10% of the baseline",
                        r.tenant
                    ),
                    met: r.lag_during.p99_seconds <= limit,
                    detail: format!(
                        "p99 {:.2}s vs baseline {:.2}s (limit {:.2}s)",
                        r.lag_during.p99_seconds, b.lag_during.p99_seconds, limit
                    ),
                });
            }
        }
        None => targets.push(Target {
            name: "other tenants' p99 lag vs baseline".into(),
            met: true,
            detail: "not checked (--no-baseline)".into(),
        }),
    }
    if let Some(r) = outage.tenants.iter().find(|r| r.poisoned_mailbox.is_some()) {
        let base = baseline.and_then(|b| b.tenants.iter().find(|b| b.tenant == r.tenant));
        let limit = base.map(|b| b.lag_during.p99_seconds * 1.10);
        let within = limit.is_none_or(|l| r.lag_during.p99_seconds <= l);
        targets.push(Target {
            name: format!(
                "{}: one mailbox answering 504 to every page holds back only itself",
                r.tenant
            ),
            met: r.graph_breaker_trips == 0 && within,
            detail: format!(
                "{} never synced; the tenant's Graph breaker tripped {} times; the other mailboxes' p99 lag {:.2}s{}",
                r.poisoned_mailbox.as_deref().unwrap_or("-"),
                r.graph_breaker_trips,
                r.lag_during.p99_seconds,
                match (base, limit) {
                    (Some(b), Some(l)) => format!(
                        " vs {:.2}s in the baseline without it (limit {l:.2}s)",
                        b.lag_during.p99_seconds
                    ),
                    _ => " (no baseline)".into(),
                }
            ),
        });
    }
    if let Some(a) = outage.tenants.first() {
        // Detection takes breaker_min_calls (3) failed calls; then one probe per half-open.
        let bound = 3 + a.token_breaker_trips_during_outage;
        targets.push(Target {
            name: format!(
                "{}: token requests during the outage no more than the breaker's probes",
                a.tenant
            ),
            met: a.token_requests_during_outage <= bound,
            detail: format!(
                "{} requests; bound {bound} (3 to detect + {} probes)",
                a.token_requests_during_outage, a.token_breaker_trips_during_outage
            ),
        });
        let limit = 2.0 * t.interval.as_secs_f64();
        targets.push(Target {
            name: format!(
                "{}: backlog drained within two sync intervals of recovery",
                a.tenant
            ),
            met: a.drained_after_seconds.is_some_and(|d| d <= limit),
            detail: match a.drained_after_seconds {
                Some(d) => format!("drained {d:.2}s after recovery (limit {limit:.2}s)"),
                None => "not drained before the drill ended".into(),
            },
        });
    }
    targets.extend(write_targets(outage, baseline, t));
    targets.push(Target {
        name: "zero rule violations (early retries, concurrency over 4, wrong tenant)".into(),
        met: outage.violation_count == 0,
        detail: format!("{} violations", outage.violation_count),
    });
    targets
}

/// The bookings' targets (none when the drill booked nothing): the outage tenant's are in
/// Outlook within two sync intervals of recovery, the other tenants' arrive at their normal
/// latency, and every one is delivered exactly once.
fn write_targets(
    outage: &RunObservations,
    baseline: Option<&RunObservations>,
    t: Timeline,
) -> Vec<Target> {
    let booked: usize = outage.tenants.iter().map(|r| r.writes.booked).sum();
    if booked == 0 {
        return Vec::new();
    }
    let mut targets = Vec::new();
    if let Some(a) = outage.tenants.first() {
        let w = &a.writes;
        let limit = 2.0 * t.interval.as_secs_f64();
        let last = w
            .last_delivered_after_recovery_seconds
            .zip(w.last_in_outlook_after_recovery_seconds)
            .map(|(d, o)| d.max(o));
        targets.push(Target {
            name: format!(
                "{}: its bookings in Outlook within two sync intervals of recovery",
                a.tenant
            ),
            met: w.delivered == w.booked
                && w.never_in_outlook == 0
                && last.is_some_and(|l| l <= limit),
            detail: match last {
                Some(l) => format!(
                    "{}/{} delivered and in the simulator's calendars, the last {l:.2}s after recovery (limit {limit:.2}s)",
                    w.delivered, w.booked
                ),
                None => format!(
                    "{}/{} delivered, {} never in the simulator's calendars when the drill ended",
                    w.delivered, w.booked, w.never_in_outlook
                ),
            },
        });
    }
    let limit = t.interval.as_secs_f64();
    let others = &outage.tenants[1.min(outage.tenants.len())..];
    let p95 = |rs: &[TenantReport]| -> Vec<String> {
        rs.iter()
            .map(|r| format!("{} {:.2}s", r.tenant, r.writes.latency.p95_seconds))
            .collect()
    };
    let base = baseline
        .map(|b| &b.tenants[1.min(b.tenants.len())..])
        .filter(|b| b.iter().any(|r| r.writes.booked > 0))
        .map_or(String::new(), |b| {
            format!(" (baseline {})", p95(b).join(", "))
        });
    targets.push(Target {
        name: "other tenants: bookings delivered at their normal latency (p95 accepted to delivered within one sync interval)".into(),
        met: others
            .iter()
            .all(|r| r.writes.latency.samples > 0 && r.writes.latency.p95_seconds <= limit),
        detail: format!("p95 {}; limit {limit:.2}s{base}", p95(others).join(", ")),
    });
    let sum = |f: fn(&WriteReport) -> u64| outage.tenants.iter().map(|r| f(&r.writes)).sum::<u64>();
    let delivered = sum(|w| w.delivered as u64);
    let made_twice = sum(|w| w.duplicated_creates);
    let doubled = sum(|w| w.doubled_in_outlook as u64);
    let never = sum(|w| w.never_in_outlook as u64);
    targets.push(Target {
        name: "every booking delivered exactly once, zero duplicates".into(),
        met: delivered == booked as u64 && made_twice + doubled == 0 && never == 0,
        detail: format!(
            "{delivered}/{booked} delivered ({} failed, {} conflict, {} still queued); duplicates: {made_twice} made twice by Graph, {doubled} extra in the calendars",
            sum(|w| w.failed as u64),
            sum(|w| w.conflict as u64),
            sum(|w| w.queued as u64),
        ),
    });
    targets
}

/// The report for people.
pub fn render(report: &DrillReport) -> String {
    let mut out = String::new();
    let t = report.timeline;
    out.push_str(&format!(
        "\nDrill at scale {}x: {} before, {} outage of {}, {} after; sync interval {}, job deadline {}\n\n",
        report.scale,
        short_duration(t.before.as_secs_f64()),
        short_duration(t.outage.as_secs_f64()),
        report.tenants.first().map_or("-", |r| r.tenant.as_str()),
        short_duration(t.after.as_secs_f64()),
        short_duration(t.interval.as_secs_f64()),
        short_duration(t.job_deadline.as_secs_f64()),
    ));
    out.push_str(&format!(
        "  {:<9} {:>21} {:>21} {:>21} {:>9} {:>7} {:>7} {:>8}\n",
        "tenant",
        "lag before p50/p99/max",
        "during p50/p99/max",
        "after p50/p99/max",
        "max hold",
        "token",
        "graph",
        "drained"
    ));
    let l = |s: &LagStats| {
        format!(
            "{:.1}/{:.1}/{:.1}s",
            s.p50_seconds, s.p99_seconds, s.max_seconds
        )
    };
    for r in &report.tenants {
        out.push_str(&format!(
            "  {:<9} {:>21} {:>21} {:>21} {:>8.2}s {:>7} {:>7} {:>8}\n",
            format!("{}{}", r.tenant, if r.faulted { "*" } else { "" }),
            l(&r.lag_before),
            l(&r.lag_during),
            l(&r.lag_after),
            r.longest_slot_hold_seconds,
            r.token_requests_during_outage,
            r.graph_requests_during_outage,
            r.drained_after_seconds
                .map_or("-".into(), |d| format!("{d:.1}s")),
        ));
    }
    out.push_str("  (* = the tenant whose identity platform and Graph failed; token/graph = requests during the outage)\n");
    for r in report
        .tenants
        .iter()
        .filter(|r| r.poisoned_mailbox.is_some())
    {
        out.push_str(&format!(
            "  {}: {} answers 504 to every page the whole run (not in its lag figures); Graph breaker trips {}\n",
            r.tenant,
            r.poisoned_mailbox.as_deref().unwrap_or("-"),
            r.graph_breaker_trips
        ));
    }
    if let Some(base) = &report.baseline {
        out.push_str("  baseline p99 lag during the same window: ");
        let parts: Vec<String> = base
            .iter()
            .map(|b| format!("{} {:.1}s", b.tenant, b.lag_during.p99_seconds))
            .collect();
        out.push_str(&parts.join(", "));
        out.push('\n');
    }
    render_writes(report, &mut out);
    out.push_str("\nTargets:\n");
    for target in &report.targets {
        out.push_str(&format!(
            "  [{}] {} — {}\n",
            if target.met { "PASS" } else { "FAIL" },
            target.name,
            target.detail
        ));
    }
    out.push_str(&format!(
        "\n{}\n",
        if report.all_targets_met {
            "All targets met."
        } else {
            "Some targets were missed."
        }
    ));
    out
}

/// The bookings table: what became of the appointments booked during the outage span.
fn render_writes(report: &DrillReport, out: &mut String) {
    if report.tenants.iter().all(|r| r.writes.booked == 0) {
        return;
    }
    out.push_str(&format!(
        "\n  {:<9} {:>7} {:>9} {:>7} {:>5} {:>22} {:>15}\n",
        "bookings",
        "booked",
        "delivered",
        "failed",
        "dups",
        "latency p50/p95/max",
        "after recovery"
    ));
    let l = |s: &DeliveryStats| {
        format!(
            "{:.1}/{:.1}/{:.1}s",
            s.p50_seconds, s.p95_seconds, s.max_seconds
        )
    };
    for r in &report.tenants {
        let w = &r.writes;
        out.push_str(&format!(
            "  {:<9} {:>7} {:>9} {:>7} {:>5} {:>22} {:>15}\n",
            format!("{}{}", r.tenant, if r.faulted { "*" } else { "" }),
            w.booked,
            w.delivered,
            w.failed + w.conflict,
            w.duplicates(),
            l(&w.latency),
            w.last_delivered_after_recovery_seconds
                .map_or("-".into(), |d| format!("{d:.1}s")),
        ));
    }
    out.push_str("  (booked through the admin API during the outage span; latency = accepted to delivered; after recovery = until the last was delivered)\n");
    for r in &report.tenants {
        if let (Some(m), Some(s)) = (&r.writes.throttled_mailbox, &r.writes.throttled_latency) {
            out.push_str(&format!(
                "  {}: {m} is throttled (429) over the outage span in both runs; its bookings waited for that, latency {} (not in the column)\n",
                r.tenant,
                l(s)
            ));
        }
    }
    if let Some(base) = report
        .baseline
        .as_ref()
        .filter(|b| b.iter().any(|r| r.writes.booked > 0))
    {
        let parts: Vec<String> = base
            .iter()
            .map(|b| format!("{} {:.1}s", b.tenant, b.writes.latency.p95_seconds))
            .collect();
        out.push_str(&format!(
            "  baseline p95 booking latency: {}\n",
            parts.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, writes: WriteReport) -> TenantReport {
        TenantReport {
            tenant: name.into(),
            faulted: name == "tenant1",
            lag_before: LagStats::default(),
            lag_during: LagStats::default(),
            lag_after: LagStats::default(),
            longest_slot_hold_seconds: 0.0,
            token_requests_during_outage: 0,
            graph_requests_during_outage: 0,
            token_breaker_trips_during_outage: 0,
            graph_breaker_trips_during_outage: 0,
            drained_after_seconds: Some(0.0),
            jobs: BTreeMap::new(),
            poisoned_mailbox: None,
            graph_breaker_trips: 0,
            writes,
        }
    }

    fn delivered(n: usize, p95: f64, after_recovery: Option<f64>) -> WriteReport {
        WriteReport {
            booked: n,
            delivered: n,
            latency: DeliveryStats {
                p50_seconds: p95 / 2.0,
                p95_seconds: p95,
                max_seconds: p95,
                samples: n,
            },
            last_delivered_after_recovery_seconds: after_recovery,
            last_in_outlook_after_recovery_seconds: after_recovery,
            ..WriteReport::default()
        }
    }

    fn met(targets: &[Target]) -> Vec<bool> {
        targets.iter().map(|t| t.met).collect()
    }

    #[test]
    fn bookings_are_spread_over_the_outage_at_the_same_pace_in_every_tenant() {
        let config = SimConfig::generated(3, 2, 1, 7);
        let t = Timeline::scaled(60.0).unwrap();
        let skip = config.tenants[2].mailboxes[0].clone();
        let plan = booking_plan(&config, t, 2, Some(&skip));

        assert_eq!(plan.len(), 3 * 2 * 2 - 2);
        assert!(plan
            .iter()
            .all(|p| p.at > t.before && p.at < t.before + t.outage && p.mailbox != skip));
        let mut subjects: Vec<String> = plan.iter().map(PlannedBooking::subject).collect();
        subjects.sort();
        subjects.dedup();
        assert_eq!(
            subjects.len(),
            plan.len(),
            "every booking has its own subject"
        );
        let times = |tenant: &str| -> Vec<Duration> {
            plan.iter()
                .filter(|p| p.tenant == tenant)
                .map(|p| p.at)
                .collect()
        };
        assert_eq!(times("tenant1"), times("tenant2"));
    }

    #[test]
    fn a_late_slow_or_doubled_booking_misses_its_target() {
        let t = Timeline::scaled(60.0).unwrap();
        let limit = t.interval.as_secs_f64();
        let run = |a: WriteReport, b: WriteReport| RunObservations {
            tenants: vec![tenant("tenant1", a), tenant("tenant2", b)],
            violations: serde_json::Value::Null,
            violation_count: 0,
        };
        let good = run(delivered(4, 9.0, Some(1.0)), delivered(4, 0.3, None));
        assert_eq!(met(&write_targets(&good, None, t)), [true, true, true]);

        let late = run(
            delivered(4, 9.0, Some(2.0 * limit + 0.5)),
            delivered(4, 0.3, None),
        );
        assert_eq!(met(&write_targets(&late, None, t)), [false, true, true]);

        let slow = run(
            delivered(4, 9.0, Some(1.0)),
            delivered(4, limit + 0.5, None),
        );
        assert_eq!(met(&write_targets(&slow, None, t)), [true, false, true]);

        let mut twice = delivered(4, 0.3, None);
        twice.duplicated_creates = 1;
        let doubled = run(delivered(4, 9.0, Some(1.0)), twice);
        assert_eq!(met(&write_targets(&doubled, None, t)), [true, true, false]);

        let none = run(WriteReport::default(), WriteReport::default());
        assert!(write_targets(&none, None, t).is_empty());
    }
}
