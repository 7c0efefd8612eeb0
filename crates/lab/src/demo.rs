//! `calsync demo`: the simulator and the service in one process on loopback, several tenants
//! and mailboxes, live progress, a few appointments booked through the admin API, and a
//! closing comparison of the store with the simulator's ground truth.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bookings::{self, AdminApi, Booking};
use crate::console::{progress_bar, short_duration, LiveView};
use calsync_core::app::Application;
use calsync_core::config::{HumanDuration, Settings};
use calsync_core::graph::model::parse_event;
use calsync_core::store::{MailboxId, MailboxRecord, Store, UserView, WriteState};
use calsync_core::sync::window_at;
use calsync_sim::{self as sim, SimConfig, SimHandle};

/// How long the initial sync and the final convergence may take before the demo gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
const REDRAW: Duration = Duration::from_millis(250);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the live phase runs, with the simulator changing calendars.
    #[arg(long, default_value = "20s", value_parser = HumanDuration::parse)]
    pub duration: HumanDuration,
    /// Number of tenants.
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
    /// Mailboxes per tenant.
    #[arg(long, default_value_t = 4)]
    pub mailboxes: usize,
    /// Generated events per mailbox.
    #[arg(long, default_value_t = 150)]
    pub events: usize,
    /// Calendar changes per second during the live phase (all mailboxes together).
    #[arg(long, default_value_t = 8.0)]
    pub mutations_per_second: f64,
    /// SQLite file to keep the store in (default: a temporary file, removed afterwards).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Seed of the generated calendars.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print a machine-readable summary on stdout instead of the live view.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct DemoSummary {
    pub matched: bool,
    pub tenants: usize,
    pub mailboxes: usize,
    pub initial_sync_seconds: f64,
    pub live_seconds: f64,
    pub converge_seconds: f64,
    pub events_in_store: usize,
    pub events_in_truth: usize,
    pub missing: usize,
    pub extra: usize,
    pub different: usize,
    /// Occurrences of recurring series stored (Graph sends them as stubs; each is compared
    /// field by field like every other event).
    pub occurrences_in_store: usize,
    /// Series renamed and series deleted during the live phase.
    pub series_renamed: usize,
    pub series_deleted: usize,
    /// The appointments booked through the admin API and where each ended up.
    pub appointments: AppointmentCheck,
    pub examples: Vec<String>,
    pub per_tenant: Vec<TenantSummary>,
    pub store: String,
}

/// The appointments the demo books (one in each tenant's first mailbox), checked one by one.
#[derive(Debug, Serialize, Clone, Default)]
pub struct AppointmentCheck {
    pub booked: usize,
    /// Their writes' state is `delivered`.
    pub delivered: usize,
    /// In the simulator's calendar (Outlook).
    pub in_outlook: usize,
    /// Stored by calsync: the appointment's link leads to a stored event with its subject.
    pub stored: usize,
    /// Not delivered, not in Outlook or not stored.
    pub missing: usize,
    /// More than one event with its subject in Outlook or in the store.
    pub doubled: usize,
    /// The slowest from acceptance to delivery.
    pub slowest_delivery_seconds: f64,
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct TenantSummary {
    pub tenant: String,
    pub mailboxes: usize,
    pub events_in_store: usize,
    pub events_in_truth: usize,
    pub missing: usize,
    pub extra: usize,
    pub different: usize,
    pub failed_mailboxes: usize,
}

/// Runs the demo and returns its summary; the caller decides the exit code from `matched`.
pub async fn run(args: DemoArgs) -> anyhow::Result<DemoSummary> {
    if args.tenants == 0 || args.mailboxes == 0 {
        anyhow::bail!("--tenants and --mailboxes must be at least 1");
    }
    let mut view = LiveView::new(!args.json);
    let temp = match &args.store {
        Some(_) => None,
        None => Some(tempfile_dir()?),
    };
    let store_path = match (&args.store, &temp) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join("calsync-demo.db"),
        (None, None) => unreachable!("a temporary directory is made when --store is absent"),
    };

    let mut sim_config = SimConfig::generated(args.tenants, args.mailboxes, args.events, args.seed);
    sim_config.mutations_per_second = 0.0;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the simulator")?;
    let sim = sim::start(sim_config.clone(), listener).await?;
    view.say(&format!(
        "calsync demo: simulated Microsoft Graph at {} with {} tenants x {} mailboxes x {} events",
        sim.graph_base_url(),
        args.tenants,
        args.mailboxes,
        args.events
    ));

    let mut settings = demo_settings(&sim, &sim_config, &store_path)?;
    let token = bookings::enable_writes(&mut settings);
    let (window_past, window_future) = (settings.sync.window_past, settings.sync.window_future);
    let app = Application::build(settings).await?;
    let store = app.store().clone();
    let api = AdminApi::new(app.port(), token)?;
    view.say(&format!(
        "calsync serving on http://127.0.0.1:{}/healthz, store {}",
        app.port(),
        store_path.display()
    ));
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let total = args.tenants * args.mailboxes;

    // Phase 1: every mailbox completes its first (full) round.
    let started = Instant::now();
    wait_until(&store, &mut view, "initial sync", total, started, |m| {
        m.last_success_at.is_some()
    })
    .await?;
    let initial_sync = started.elapsed();

    // Phase 2: calendars change while calsync keeps up; in each tenant's first mailbox one
    // recurring series is renamed and another deleted, on top of the random changes.
    let now = Utc::now();
    let covered = calsync_core::graph::Window {
        start: now - chrono::Duration::from_std(window_past).unwrap_or_default(),
        end: now + chrono::Duration::from_std(window_future).unwrap_or_default(),
    };
    let (series_renamed, series_deleted) = change_series(&sim, covered);
    sim.set_mutations(args.mutations_per_second);
    let live_start = Instant::now();
    while live_start.elapsed() < args.duration.0 {
        let lines = live_frame(&store, &sim, "live changes", live_start, args.duration.0).await?;
        view.draw(&lines);
        tokio::time::sleep(REDRAW).await;
    }
    let lines = live_frame(&store, &sim, "live changes", live_start, args.duration.0).await?;
    view.finish(&lines);

    // Phase 3: changes stop (so none touches the appointments); the application books one
    // appointment in each tenant's first mailbox; once they are delivered, every mailbox
    // completes a round that started after the last change and after its delivery.
    sim.set_mutations(0.0);
    let converge_start = Instant::now();
    let booked = book_appointments(&api, &store, &sim).await?;
    view.say(&format!(
        "booked {} appointments through the admin API",
        booked.len()
    ));
    let stopped_at = Utc::now();
    let delivered = wait_for_delivery(&store, &mut view, &booked, converge_start).await?;
    wait_until(
        &store,
        &mut view,
        "converge",
        total,
        converge_start,
        move |m| {
            let after = delivered
                .get(&m.id)
                .map_or(stopped_at, |d| stopped_at.max(*d));
            m.last_attempt_at.is_some_and(|a| a > after)
                && m.consecutive_failures == 0
                && m.last_success_at.is_some_and(|s| s > after)
        },
    )
    .await?;
    let converge = converge_start.elapsed();

    shutdown.cancel();
    service.await.context("service task failed")??;
    let mut summary = compare(&store, &sim, window_past, window_future).await?;
    let (appointments, problems) = check_appointments(&store, &sim, &booked).await?;
    summary.matched &= appointments.missing == 0 && appointments.doubled == 0;
    summary.appointments = appointments;
    for problem in problems {
        push_example(&mut summary.examples, problem);
    }
    sim.shutdown().await;
    summary.initial_sync_seconds = initial_sync.as_secs_f64();
    summary.live_seconds = args.duration.0.as_secs_f64();
    summary.converge_seconds = converge.as_secs_f64();
    summary.series_renamed = series_renamed;
    summary.series_deleted = series_deleted;
    summary.store = store_path.display().to_string();
    if let Some(dir) = temp {
        let _ = std::fs::remove_dir_all(&dir);
        summary.store = "(temporary, removed)".into();
    }
    Ok(summary)
}

/// Books one appointment in each tenant's first mailbox, through the admin API.
async fn book_appointments(
    api: &AdminApi,
    store: &Store,
    sim: &SimHandle,
) -> anyhow::Result<Vec<Booking>> {
    let mailboxes = store.mailboxes().await?;
    let tomorrow = Utc::now() + chrono::Duration::days(1);
    let mut booked = Vec::new();
    for tenant in sim.tenants() {
        let Some(first) = tenant.mailboxes.first() else {
            continue;
        };
        let mailbox = mailboxes
            .iter()
            .find(|m| &m.user_id == first)
            .with_context(|| format!("{first} is not in the store"))?;
        let subject = format!("demo booking {}", tenant.name);
        let external_id = format!("demo-{}", tenant.name);
        booked.push(api.book(mailbox, &external_id, &subject, tomorrow).await?);
    }
    Ok(booked)
}

/// Waits until no booking's write is queued any more; returns when each mailbox's was
/// delivered.
async fn wait_for_delivery(
    store: &Store,
    view: &mut LiveView,
    booked: &[Booking],
    started: Instant,
) -> anyhow::Result<HashMap<MailboxId, DateTime<Utc>>> {
    loop {
        let mut delivered = HashMap::new();
        let mut done = 0;
        for b in booked {
            let write = store.write_by_id(&b.write_id).await?;
            if let Some(w) = write.filter(|w| w.state.is_final()) {
                done += 1;
                if let Some(at) = w.delivered_at {
                    delivered.insert(b.mailbox_id, at);
                }
            }
        }
        let line = format!(
            "{}  {}",
            progress_bar("appointments", done, booked.len(), 30),
            short_duration(started.elapsed().as_secs_f64())
        );
        if done == booked.len() {
            view.finish(&[line]);
            return Ok(delivered);
        }
        view.draw(&[line]);
        if started.elapsed() > PHASE_TIMEOUT {
            anyhow::bail!(
                "the appointments were not delivered within {}",
                short_duration(PHASE_TIMEOUT.as_secs_f64())
            );
        }
        tokio::time::sleep(REDRAW / 5).await;
    }
}

/// Each booking: delivered, once in the simulator's calendar, and stored by calsync (its link
/// leads to a stored event with its subject, the only one so named); with what is wrong.
async fn check_appointments(
    store: &Store,
    sim: &SimHandle,
    booked: &[Booking],
) -> anyhow::Result<(AppointmentCheck, Vec<String>)> {
    let mut check = AppointmentCheck {
        booked: booked.len(),
        ..AppointmentCheck::default()
    };
    let mut problems = Vec::new();
    for outcome in bookings::outcomes(store, sim, booked).await? {
        let b = &outcome.booking;
        let delivered = outcome.state == WriteState::Delivered;
        let graph_id = store
            .event_link(b.mailbox_id, &b.external_id)
            .await?
            .and_then(|link| link.graph_event_id);
        let linked = match &graph_id {
            Some(id) => store.event_by_id(b.mailbox_id, id).await?,
            None => None,
        };
        let stored = linked.is_some_and(|e| e.subject.as_deref() == Some(b.subject.as_str()));
        let stored_copies = store
            .events(b.mailbox_id)
            .await?
            .iter()
            .filter(|e| e.subject.as_deref() == Some(b.subject.as_str()))
            .count();
        check.delivered += usize::from(delivered);
        check.in_outlook += usize::from(outcome.in_outlook > 0);
        check.stored += usize::from(stored);
        check.slowest_delivery_seconds = check
            .slowest_delivery_seconds
            .max(outcome.latency_seconds().unwrap_or(0.0));
        if !(delivered && outcome.in_outlook > 0 && stored) {
            check.missing += 1;
            problems.push(format!(
                "{}: appointment {} is {}, {} times in Outlook, {}",
                b.mailbox,
                b.external_id,
                outcome.state.as_str(),
                outcome.in_outlook,
                if stored { "stored" } else { "not stored" }
            ));
        }
        if outcome.in_outlook > 1 || stored_copies > 1 {
            check.doubled += 1;
            problems.push(format!(
                "{}: appointment {} doubled: {} times in Outlook, {} in the store",
                b.mailbox, b.external_id, outcome.in_outlook, stored_copies
            ));
        }
    }
    Ok((check, problems))
}

/// Renames one series and deletes another in each tenant's first mailbox (series with an
/// occurrence in the window); returns how many of each.
fn change_series(sim: &SimHandle, window: calsync_core::graph::Window) -> (usize, usize) {
    let (mut renamed, mut deleted) = (0, 0);
    for tenant in sim.tenants() {
        let Some(mailbox) = tenant.mailboxes.first() else {
            continue;
        };
        let mut series: Vec<String> = sim
            .truth(mailbox, Some((window.start, window.end)))
            .iter()
            .filter(|e| e["type"] == "occurrence")
            .filter_map(|e| e["seriesMasterId"].as_str().map(str::to_string))
            .collect();
        series.sort();
        series.dedup();
        if let Some(id) = series.first() {
            renamed += usize::from(sim.rename_series(mailbox, id));
        }
        if let Some(id) = series.get(1) {
            deleted += usize::from(sim.delete_series(mailbox, id));
        }
    }
    (renamed, deleted)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("calsync-demo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The service's configuration for the demo: the simulator's tenants and short intervals.
pub fn demo_settings(
    sim: &SimHandle,
    config: &SimConfig,
    store: &std::path::Path,
) -> anyhow::Result<Settings> {
    sim_service_settings(
        sim,
        config,
        store,
        r#"
[graph]
page_size = 50
connect_timeout = "2s"
request_timeout = "10s"
[sync]
interval = "2s"
jitter = "1s"
workers = 8
job_deadline = "30s"
failure_backoff_initial = "500ms"
failure_backoff_max = "5s"
poll_interval = "100ms"
"#,
    )
}

/// A calsync configuration pointed at `sim` with its tenants and credentials, a SQLite store
/// at `store`, quiet logs, and `overrides` (TOML) on top.
pub fn sim_service_settings(
    sim: &SimHandle,
    config: &SimConfig,
    store: &std::path::Path,
    overrides: &str,
) -> anyhow::Result<Settings> {
    let mut base = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://{store}"
[graph]
base_url = "{base}"
authority = "{authority}"
[log]
level = "warn"
"#,
        store = store.display(),
        base = sim.graph_base_url(),
        authority = sim.authority(),
    );
    base.push_str(&tenants_toml(config));
    Ok(Settings::from_toml_layers(&[&base, overrides])?)
}

/// The simulator's tenants as calsync `[[tenants]]` tables (TOML-quoted).
pub fn tenants_toml(config: &SimConfig) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = String::new();
    for tenant in &config.tenants {
        let mailboxes: Vec<String> = tenant.mailboxes.iter().map(|m| quote(m)).collect();
        out.push_str(&format!(
            "[[tenants]]\nname = {}\ntenant_id = {}\nclient_id = {}\nclient_secret = {}\nmailboxes = [{}]\n",
            quote(&tenant.name),
            quote(&tenant.tenant_id),
            quote(&tenant.client_id),
            quote(&tenant.client_secret),
            mailboxes.join(", ")
        ));
    }
    out
}

async fn wait_until(
    store: &Store,
    view: &mut LiveView,
    phase: &str,
    total: usize,
    started: Instant,
    done: impl Fn(&MailboxRecord) -> bool,
) -> anyhow::Result<()> {
    loop {
        let mailboxes = store.mailboxes().await?;
        let finished = mailboxes.iter().filter(|m| done(m)).count();
        let mut lines = vec![format!(
            "{}  {}",
            progress_bar(phase, finished, total, 30),
            short_duration(started.elapsed().as_secs_f64())
        )];
        lines.extend(tenant_table(store, &mailboxes).await?);
        if finished >= total {
            view.finish(&lines);
            return Ok(());
        }
        view.draw(&lines);
        if started.elapsed() > PHASE_TIMEOUT {
            anyhow::bail!(
                "{phase} did not finish within {}",
                short_duration(PHASE_TIMEOUT.as_secs_f64())
            );
        }
        tokio::time::sleep(REDRAW).await;
    }
}

async fn live_frame(
    store: &Store,
    sim: &SimHandle,
    phase: &str,
    started: Instant,
    length: Duration,
) -> anyhow::Result<Vec<String>> {
    let mailboxes = store.mailboxes().await?;
    let elapsed = started.elapsed().min(length);
    let stats = serde_json::to_value(sim.stats()).unwrap_or_default();
    let mut lines = vec![format!(
        "{}  simulator: {} mutations so far",
        progress_bar(
            phase,
            elapsed.as_secs() as usize,
            length.as_secs() as usize,
            30
        ),
        stats["mutations_applied"].as_u64().unwrap_or(0)
    )];
    lines.extend(tenant_table(store, &mailboxes).await?);
    Ok(lines)
}

async fn tenant_table(store: &Store, mailboxes: &[MailboxRecord]) -> anyhow::Result<Vec<String>> {
    let counts = store.event_counts().await?;
    let now = Utc::now();
    let mut rows: BTreeMap<&str, (usize, usize, u64, i64, usize)> = BTreeMap::new();
    for m in mailboxes {
        let row = rows.entry(m.tenant.as_str()).or_default();
        row.0 += 1;
        row.1 += usize::from(m.last_success_at.is_some());
        row.2 += counts.get(&m.id).copied().unwrap_or(0);
        let lag = (now - m.behind_since()).num_milliseconds();
        row.3 = row.3.max(lag);
        row.4 += usize::from(m.consecutive_failures > 0);
    }
    let mut lines = vec![format!(
        "  {:<12} {:>9} {:>8} {:>9} {:>7}",
        "tenant", "synced", "events", "max lag", "errors"
    )];
    for (tenant, (total, synced, events, lag_ms, errors)) in rows {
        lines.push(format!(
            "  {:<12} {:>9} {:>8} {:>9} {:>7}",
            tenant,
            format!("{synced}/{total}"),
            events,
            short_duration(lag_ms as f64 / 1000.0),
            errors
        ));
    }
    Ok(lines)
}

/// Store against ground truth, mailbox by mailbox, on every field a user reads (occurrences
/// included: they must carry their series' subject, people, status and categories).
async fn compare(
    store: &Store,
    sim: &SimHandle,
    window_past: std::time::Duration,
    window_future: std::time::Duration,
) -> anyhow::Result<DemoSummary> {
    let mailboxes = store.mailboxes().await?;
    let mut per_tenant: BTreeMap<String, TenantSummary> = BTreeMap::new();
    let mut examples = Vec::new();
    let mut occurrences = 0;
    for m in &mailboxes {
        let row = per_tenant
            .entry(m.tenant.clone())
            .or_insert_with(|| TenantSummary {
                tenant: m.tenant.clone(),
                ..TenantSummary::default()
            });
        row.mailboxes += 1;
        row.failed_mailboxes += usize::from(m.consecutive_failures > 0);
        let stored: HashMap<String, UserView> = store
            .events(m.id)
            .await?
            .into_iter()
            .map(|e| (e.id.clone(), UserView::of_event(&e)))
            .collect();
        // Each mailbox's own window: windows move at each mailbox's own time of day.
        let window = m.cursor.window.unwrap_or_else(|| {
            window_at(
                Utc::now(),
                window_past,
                window_future,
                &m.tenant,
                &m.user_id,
            )
        });
        let mut truth: HashMap<String, UserView> = HashMap::new();
        for item in sim.truth(&m.user_id, Some((window.start, window.end))) {
            let event = parse_event(item)
                .map_err(|e| anyhow::anyhow!("ground truth of {}: {e}", m.user_id))?;
            truth.insert(event.id.clone(), UserView::of_event(&event));
        }
        row.events_in_store += stored.len();
        occurrences += stored
            .values()
            .filter(|e| e.event_type.as_deref() == Some("occurrence"))
            .count();
        row.events_in_truth += truth.len();
        for (id, expected) in &truth {
            match stored.get(id) {
                None => {
                    row.missing += 1;
                    push_example(&mut examples, format!("{}: missing {id}", m.user_id));
                }
                Some(actual) if actual != expected => {
                    row.different += 1;
                    push_example(&mut examples, format!("{}: {id} differs", m.user_id));
                }
                Some(_) => {}
            }
        }
        for id in stored.keys().filter(|id| !truth.contains_key(*id)) {
            row.extra += 1;
            push_example(&mut examples, format!("{}: extra {id}", m.user_id));
        }
    }
    let per_tenant: Vec<TenantSummary> = per_tenant.into_values().collect();
    let sum = |f: fn(&TenantSummary) -> usize| per_tenant.iter().map(f).sum::<usize>();
    let (missing, extra, different) = (sum(|t| t.missing), sum(|t| t.extra), sum(|t| t.different));
    Ok(DemoSummary {
        matched: missing == 0 && extra == 0 && different == 0 && sum(|t| t.failed_mailboxes) == 0,
        tenants: per_tenant.len(),
        mailboxes: mailboxes.len(),
        initial_sync_seconds: 0.0,
        live_seconds: 0.0,
        converge_seconds: 0.0,
        events_in_store: sum(|t| t.events_in_store),
        events_in_truth: sum(|t| t.events_in_truth),
        missing,
        extra,
        different,
        occurrences_in_store: occurrences,
        series_renamed: 0,
        series_deleted: 0,
        appointments: AppointmentCheck::default(),
        examples,
        per_tenant,
        store: String::new(),
    })
}

fn push_example(examples: &mut Vec<String>, example: String) {
    if examples.len() < 10 {
        examples.push(example);
    }
}

/// The closing report for people.
pub fn render_summary(summary: &DemoSummary) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\nGround truth check: {}\n",
        if summary.matched {
            "MATCH - every event present and equal in every field a user reads, none extra"
        } else {
            "MISMATCH"
        }
    ));
    out.push_str(&format!(
        "  {} tenants, {} mailboxes; initial sync {}, live changes {}, converged {} after changes stopped\n",
        summary.tenants,
        summary.mailboxes,
        short_duration(summary.initial_sync_seconds),
        short_duration(summary.live_seconds),
        short_duration(summary.converge_seconds)
    ));
    out.push_str(&format!(
        "  {:<12} {:>8} {:>8} {:>8} {:>6} {:>10} {:>7}\n",
        "tenant", "store", "truth", "missing", "extra", "different", "failed"
    ));
    for t in &summary.per_tenant {
        out.push_str(&format!(
            "  {:<12} {:>8} {:>8} {:>8} {:>6} {:>10} {:>7}\n",
            t.tenant,
            t.events_in_store,
            t.events_in_truth,
            t.missing,
            t.extra,
            t.different,
            t.failed_mailboxes
        ));
    }
    out.push_str(&format!(
        "  recurring: {} occurrences stored complete from their series (Graph sends them as stubs); {} series renamed, {} deleted while live\n",
        summary.occurrences_in_store, summary.series_renamed, summary.series_deleted
    ));
    let a = &summary.appointments;
    out.push_str(&format!(
        "  appointments: {} booked through the admin API, {} delivered (slowest {:.2}s after acceptance), {} in Outlook (simulator), {} stored by calsync; {}\n",
        a.booked,
        a.delivered,
        a.slowest_delivery_seconds,
        a.in_outlook,
        a.stored,
        if a.missing == 0 && a.doubled == 0 {
            "none missing or doubled".to_string()
        } else {
            format!("{} missing, {} doubled", a.missing, a.doubled)
        }
    ));
    for example in &summary.examples {
        out.push_str(&format!("  - {example}\n"));
    }
    out.push_str(&format!("  store: {}\n", summary.store));
    out
}
