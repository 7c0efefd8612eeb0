//! A Microsoft Graph + identity-platform simulator for calendar sync: the token endpoint,
//! `calendarView/delta` with Outlook's limits, switchable faults down to the TCP level, and ground
//! truth plus a record of what clients did. It plays Microsoft, so it depends on no client code.
//!
//! Routes: `POST /{tenant}/oauth2/v2.0/token`; `GET /v1.0/users/{id}/calendarView/delta[()]` (also
//! under `/calendars/{cal}/`); control: `GET|POST|PUT|DELETE /_sim/faults`, `DELETE
//! /_sim/faults/{id}`, `GET /_sim/truth/{mailbox}?startDateTime=&endDateTime=`, `GET /_sim/stats`,
//! `GET /_sim/tenants`, `POST /_sim/mutations {"per_second"}`, `POST /_sim/mutate/{mailbox}
//! {"n"}`, `POST /_sim/clock {"advance_ms"}`. Change notifications: `POST|GET /v1.0/subscriptions`,
//! `GET|PATCH|DELETE /v1.0/subscriptions/{id}`, `POST /v1.0/subscriptions/{id}/reauthorize`;
//! control `POST /_sim/lifecycle {"mailbox","event"}`, `GET /_sim/subscriptions`. Event writes:
//! `POST /v1.0/users/{id}/events` (also `/calendar/events`, `/calendars/{cal}/events`;
//! `transactionId` deduplicates), `PATCH|DELETE /v1.0/users/{id}/events/{id}` (`If-Match`
//! checked), `POST .../events/{id}/cancel`; the owner editing in Outlook: `POST|DELETE
//! /_sim/outlook/{mailbox}/events/{id}`. Every Graph route (`/v1.0/...`) passes the app-wide
//! limit (`app_requests_per_window` per `app_window`, off by default) and is counted per second.

mod app_limit;
mod calendar;
mod config;
mod conn;
mod control;
mod faults;
mod graph;
mod locks;
mod reply;
mod state;
mod stats;
mod subscriptions;
mod token;
mod tokens;
mod writes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::routing::{delete, get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use app_limit::AppRequestStats;
pub use calendar::MutationKind;
pub use config::{CalendarBound, SimConfig, SimTenant};
pub use faults::{
    load_scenario, parse_scenario, Endpoint, FaultId, FaultKind, FaultRule, RetryAfter,
};
pub use stats::{MailboxStats, SimStats, TenantStats, Violation, Violations, WriteStats};
pub use subscriptions::{SentNotification, SimSubscription, MAX_EXPIRATION_MINUTES};
pub use token::{
    check_assertion, rsa_public_key_from_pem, AssertionClaims, GRAPH_SCOPE, JWT_BEARER,
};

use calendar::Window;
use state::{lock, Shared};

/// A running simulator. Clones share it; `shutdown` stops it for all.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn router(shared: Arc<Shared>) -> Router {
    let delta = get(graph::delta);
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token::token))
        .route("/v1.0/users/{user}/calendarView/{func}", delta.clone())
        .route("/v1.0/users/{user}/calendarview/{func}", delta.clone())
        .route(
            "/v1.0/users/{user}/calendars/{cal}/calendarView/{func}",
            delta.clone(),
        )
        .route(
            "/v1.0/users/{user}/calendars/{cal}/calendarview/{func}",
            delta.clone(),
        )
        .route("/v1.0/users/{user}/calendar/calendarView/{func}", delta)
        .route(
            "/v1.0/users/{user}/events/{id}",
            get(graph::event)
                .patch(graph::update_event)
                .delete(graph::delete_event),
        )
        .route(
            "/v1.0/users/{user}/calendar/events/{id}",
            get(graph::event)
                .patch(graph::update_event)
                .delete(graph::delete_event),
        )
        .route("/v1.0/users/{user}/events", post(graph::create_event))
        .route(
            "/v1.0/users/{user}/calendar/events",
            post(graph::create_event),
        )
        .route(
            "/v1.0/users/{user}/calendars/{cal}/events",
            post(graph::create_event),
        )
        .route(
            "/v1.0/users/{user}/events/{id}/cancel",
            post(graph::cancel_event),
        )
        .route(
            "/_sim/outlook/{mailbox}/events/{id}",
            post(control::outlook_edit).delete(control::outlook_delete),
        )
        .route(
            "/_sim/faults",
            get(control::list_faults)
                .post(control::add_faults)
                .put(control::replace_faults)
                .delete(control::clear_faults),
        )
        .route("/_sim/faults/{id}", delete(control::delete_fault))
        .route("/_sim/truth/{mailbox}", get(control::truth))
        .route("/_sim/stats", get(control::stats))
        .route("/_sim/tenants", get(control::tenants))
        .route("/_sim/mutations", post(control::set_mutations))
        .route("/_sim/mutate/{mailbox}", post(control::mutate))
        .route("/_sim/clock", post(control::advance_clock))
        .route(
            "/v1.0/subscriptions",
            post(subscriptions::create).get(subscriptions::list),
        )
        .route(
            "/v1.0/subscriptions/{id}",
            get(subscriptions::get_one)
                .patch(subscriptions::renew)
                .delete(subscriptions::delete),
        )
        .route(
            "/v1.0/subscriptions/{id}/reauthorize",
            post(subscriptions::reauthorize),
        )
        .route("/_sim/lifecycle", post(subscriptions::control_lifecycle))
        .route("/_sim/subscriptions", get(subscriptions::control_list))
        .fallback(graph::not_found)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            app_limit::app_limit,
        ))
        .with_state(shared)
}

/// Starts serving on `listener` (bind port 0 in tests) and the mutation stream.
pub async fn start(
    config: SimConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<SimHandle> {
    let shared = Shared::new(config).context("invalid simulator config")?;
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    let (shutdown, rx) = watch::channel(false);
    let server = tokio::spawn(conn::serve(listener, router(shared.clone()), rx.clone()));
    let mutations = tokio::spawn(state::mutation_loop(shared.clone(), rx));
    Ok(SimHandle {
        shared,
        addr,
        shutdown,
        tasks: Arc::new(Mutex::new(vec![server, mutations])),
    })
}

pub(crate) fn snapshot_stats(shared: &Shared) -> SimStats {
    let mut s = lock(&shared.stats).clone();
    s.faults_fired = lock(&shared.faults).fired_counts();
    for entry in shared.mailboxes.values() {
        let n = lock(&entry.state).calendar.event_count();
        if let Some(m) = s.mailboxes.get_mut(&entry.address) {
            m.events = n;
        }
    }
    s
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Token endpoint is `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn graph_base_url(&self) -> String {
        format!("http://{}/v1.0", self.addr)
    }

    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority())
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    pub fn tenants(&self) -> &[SimTenant] {
        &self.shared.tenants
    }

    /// Current events as Graph JSON (what a full delta round would return), overlapping
    /// `window` when given; empty for an unknown mailbox.
    pub fn truth(
        &self,
        mailbox: &str,
        window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Vec<Value> {
        let window = window.map(|(start, end)| Window { start, end });
        control::truth_of(&self.shared, mailbox, window.as_ref()).unwrap_or_default()
    }

    pub fn stats(&self) -> SimStats {
        snapshot_stats(&self.shared)
    }

    /// Replaces all rules; their `after_ms`/`for_ms` count from now.
    pub fn set_faults(&self, faults: Vec<FaultRule>) -> Vec<FaultId> {
        let now = tokio::time::Instant::now();
        let mut set = lock(&self.shared.faults);
        set.clear();
        faults.into_iter().map(|f| set.add(f, now)).collect()
    }

    pub fn add_fault(&self, f: FaultRule) -> FaultId {
        lock(&self.shared.faults).add(f, tokio::time::Instant::now())
    }

    /// Adds a scenario's rules at once, so their offsets form one timeline starting now.
    pub fn add_faults(&self, faults: Vec<FaultRule>) -> Vec<FaultId> {
        let now = tokio::time::Instant::now();
        let mut set = lock(&self.shared.faults);
        faults.into_iter().map(|f| set.add(f, now)).collect()
    }

    pub fn remove_fault(&self, id: FaultId) -> bool {
        lock(&self.shared.faults).remove(id)
    }

    /// Answers creates retried with their transactionId with `ErrorDuplicateTransactionId`
    /// (naming the event in `@event.existingEventId`) instead of 201 with the event.
    pub fn refuse_transaction_retries(&self, refuse: bool) {
        self.shared
            .refuse_transaction_retries
            .store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Requests the `Hold` rule `id` is holding now; removing the rule releases them.
    pub fn held(&self, id: FaultId) -> usize {
        lock(&self.shared.faults).holding(id)
    }

    /// Sets the background mutation rate; 0 pauses the stream.
    pub fn set_mutations(&self, per_second: f64) {
        let rate = if per_second.is_finite() {
            per_second.max(0.0)
        } else {
            0.0
        };
        self.shared.mutation_rate.send_replace(rate);
    }

    /// Applies `n` deterministic mutations to `mailbox` now; unknown mailboxes are ignored.
    pub fn mutate_now(&self, mailbox: &str, n: usize) {
        if let Some(entry) = self.shared.mailbox(mailbox) {
            self.shared.mutate_mailbox(entry, n);
        }
    }

    /// Moves one event so that it starts at `start` (e.g. out of a client's window).
    pub fn move_event(&self, mailbox: &str, event_id: &str, start: DateTime<Utc>) -> bool {
        let now = self.shared.now();
        let Some(entry) = self.shared.mailbox(mailbox) else {
            return false;
        };
        let moved = lock(&entry.state).calendar.move_event(event_id, start, now);
        if moved {
            let change = [(MutationKind::Update, event_id.to_string())];
            subscriptions::notify_changes(&self.shared, entry, &change);
        }
        moved
    }

    /// Changes an event as its owner would in Outlook: `patch` is a Graph event body with the
    /// properties to set. The event gets a new changeKey (so a client's `If-Match` goes stale)
    /// and shows up in delta. Returns the event, or `None` for an unknown mailbox or event or
    /// a patch Graph would refuse.
    pub fn outlook_edit(&self, mailbox: &str, event_id: &str, patch: &Value) -> Option<Value> {
        let entry = self.shared.mailbox(mailbox)?;
        let body = serde_json::to_vec(patch).ok()?;
        writes::outlook_edit(&self.shared, entry, event_id, &body).ok()
    }

    /// Deletes an event as its owner would in Outlook; false if there was none.
    pub fn outlook_delete(&self, mailbox: &str, event_id: &str) -> bool {
        self.shared
            .mailbox(mailbox)
            .is_some_and(|entry| writes::outlook_delete(&self.shared, entry, event_id))
    }

    /// The ids of `mailbox`'s recurring series (their masters), in id order.
    pub fn series(&self, mailbox: &str) -> Vec<String> {
        self.shared
            .mailbox(mailbox)
            .map(|entry| lock(&entry.state).calendar.master_ids())
            .unwrap_or_default()
    }

    /// Renames a series as an organizer editing the entire series does (new subject, busy
    /// status, location, categories): the master and every occurrence are re-sent in delta.
    pub fn rename_series(&self, mailbox: &str, master_id: &str) -> bool {
        self.series_change(mailbox, master_id, MutationKind::RenameSeries)
    }

    /// Deletes a whole series: `@removed` for the master and each of its instances.
    pub fn delete_series(&self, mailbox: &str, master_id: &str) -> bool {
        self.series_change(mailbox, master_id, MutationKind::DeleteSeries)
    }

    fn series_change(&self, mailbox: &str, master_id: &str, kind: MutationKind) -> bool {
        let now = self.shared.now();
        let Some(entry) = self.shared.mailbox(mailbox) else {
            return false;
        };
        let done = {
            let mut st = lock(&entry.state);
            match kind {
                MutationKind::RenameSeries => st.calendar.rename_series(master_id, now),
                _ => st.calendar.delete_series(master_id),
            }
        };
        if done {
            subscriptions::notify_changes(&self.shared, entry, &[(kind, master_id.to_string())]);
        }
        done
    }

    /// Change-notification subscriptions the simulator holds (expired ones included).
    pub fn subscriptions(&self) -> Vec<SimSubscription> {
        self.shared.subscriptions.list()
    }

    /// Every validation request, notification and lifecycle event sent to clients, oldest first.
    pub fn notifications_sent(&self) -> Vec<SentNotification> {
        self.shared.subscriptions.sent()
    }

    /// Sends a lifecycle event (`reauthorizationRequired`, `subscriptionRemoved` — which drops
    /// the subscription first — or `missed`) for every live subscription of `mailbox`; returns
    /// how many were delivered.
    pub async fn lifecycle(&self, mailbox: &str, event: &str) -> usize {
        subscriptions::send_lifecycle(&self.shared, mailbox, event).await
    }

    /// The Entra object id Graph's change notifications name `mailbox`'s user by.
    pub fn user_object_id(&self, mailbox: &str) -> Option<String> {
        self.shared.mailbox(mailbox).map(|e| e.object_id.clone())
    }

    /// The next `n` requests to `/subscriptions` fail with HTTP `status`.
    pub fn fail_subscription_requests(&self, n: u32, status: u16) {
        self.shared.subscriptions.fail_next(n, status);
    }

    /// How many of the failures ordered by `fail_subscription_requests` are still to come.
    pub fn subscription_failures_left(&self) -> u32 {
        self.shared.subscriptions.failures_left()
    }

    /// Moves the simulator clock forward: access tokens and delta tokens age without sleeping.
    pub fn advance_clock(&self, by: std::time::Duration) {
        self.shared.advance_clock(by);
    }

    /// Moves the simulator clock back: Graph's clock behind the client's, as with a client
    /// whose clock runs fast.
    pub fn move_clock_back(&self, by: std::time::Duration) {
        self.shared.move_clock_back(by);
    }

    /// Stops accepting, drops every open connection (hung ones included) and the mutation stream.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// `calsync sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// TOML (or .json) SimConfig; flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Generate this many tenants (replaces the config file's tenants).
    #[arg(long)]
    pub tenants: Option<usize>,
    /// Mailboxes per generated tenant.
    #[arg(long)]
    pub mailboxes: Option<usize>,
    /// Events per mailbox.
    #[arg(long)]
    pub events: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub mutations_per_second: Option<f64>,
    /// Fault timeline (TOML or JSON) started when the simulator starts.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Graph's app-wide limit: at most this many Graph requests per `--app-window-ms`
    /// (over it: 429 ApplicationThrottled). Off unless given.
    #[arg(long)]
    pub app_limit: Option<u32>,
    /// The app-wide limit's window, in milliseconds.
    #[arg(long)]
    pub app_window_ms: Option<u64>,
}

/// Builds the config `calsync sim` would run with.
pub fn config_from_args(args: &SimArgs) -> anyhow::Result<SimConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"))
            {
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
            } else {
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
        }
        None => SimConfig::default(),
    };
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(e) = args.events {
        config.events_per_mailbox = e;
    }
    if args.tenants.is_some() || args.mailboxes.is_some() || config.tenants.is_empty() {
        let g = SimConfig::generated(
            args.tenants.unwrap_or(2),
            args.mailboxes.unwrap_or(3),
            config.events_per_mailbox,
            config.seed,
        );
        config.tenants = g.tenants;
    }
    if let Some(m) = args.mutations_per_second {
        config.mutations_per_second = m;
    }
    if let Some(limit) = args.app_limit {
        config.app_requests_per_window = Some(limit);
    }
    if let Some(ms) = args.app_window_ms {
        config.app_window = std::time::Duration::from_millis(ms);
    }
    config.validate()?;
    Ok(config)
}

/// Runs the simulator until ctrl-c, printing what a client needs to connect.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let config = config_from_args(&args)?;
    let scenario = args.scenario.as_ref().map(load_scenario).transpose()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let sim = start(config, listener).await?;
    if let Some(rules) = scenario {
        let n = rules.len();
        sim.add_faults(rules);
        println!("scenario: {n} fault rules scheduled from now");
    }
    println!("authority:      {}", sim.authority());
    println!("graph base url: {}", sim.graph_base_url());
    println!(
        "control:        {}/_sim/{{stats,faults,truth/<mailbox>,tenants}}",
        sim.authority()
    );
    for t in sim.tenants() {
        println!(
            "tenant {}: tenant_id={} client_id={} client_secret={} mailboxes={}",
            t.name,
            t.tenant_id,
            t.client_id,
            t.client_secret,
            t.mailboxes.join(",")
        );
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    sim.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn flags_generate_tenants_and_override() {
        let cli = Cli::parse_from([
            "sim",
            "--tenants",
            "3",
            "--mailboxes",
            "4",
            "--events",
            "7",
            "--seed",
            "11",
            "--mutations-per-second",
            "2.5",
        ]);
        assert_eq!(cli.sim.listen.port(), 8090);
        let c = config_from_args(&cli.sim).expect("config");
        assert_eq!(c.tenants.len(), 3);
        assert_eq!(c.tenants[2].mailboxes.len(), 4);
        assert_eq!(c.events_per_mailbox, 7);
        assert_eq!(c.seed, 11);
        assert_eq!(c.mutations_per_second, 2.5);
        assert_eq!(c.tenants, SimConfig::generated(3, 4, 7, 11).tenants);
    }
}
