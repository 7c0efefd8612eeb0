//! Wiring: builds the store, clients, token providers, worker and HTTP servers from settings.
//! `Application::build` binds the listeners first, so tests can use port 0 and read `port()`
//! (internal: health, metrics, status page, admin API) and `public_port()` (notifications).

use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ServerSettings, Settings};
use crate::graph::GraphClient;
use crate::http::server::{self, Exposure, Limits};
use crate::http::{self, AppState};
use crate::net;
use crate::notifications::SubscriptionUpkeep;
use crate::scheduler::fleet::Fleet;
use crate::scheduler::Worker;
use crate::store::Store;
use crate::tenants::Tenants;

pub struct Application {
    /// Health, metrics, status page, admin API.
    listener: TcpListener,
    /// The notification endpoints; bound only when notifications are on.
    public: Option<TcpListener>,
    server: ServerSettings,
    state: AppState,
    worker: Arc<Worker>,
    /// This replica in the replica registry: its heartbeat and its share of the request rates.
    fleet: Arc<Fleet>,
    /// Keeps Graph subscriptions when `notifications.public_url` is set.
    subscriptions: Option<Arc<SubscriptionUpkeep>>,
}

/// Opens the store, runs migrations, and makes the configured mailboxes the enabled ones.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let store = Store::connect(&settings.store.url, settings.store.max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot open the store at {}",
                redact_url(&settings.store.url)
            )
        })?;
    store.migrate().await.context("store migration failed")?;
    let released = store.release_stale_leases().await?;
    if released > 0 {
        tracing::info!(released, "released leases left by a previous run");
    }
    let mailboxes: Vec<(String, String)> = settings
        .tenants
        .iter()
        .flat_map(|t| t.mailboxes.iter().map(|m| (t.name.clone(), m.clone())))
        .collect();
    store.sync_config_mailboxes(&mailboxes, Utc::now()).await?;
    Ok(store)
}

/// Builds the worker over an open store.
pub fn build_worker(
    settings: &Settings,
    store: Store,
) -> anyhow::Result<(Arc<Worker>, Arc<Tenants>)> {
    let graph_http = net::http_client(
        settings.graph.connect_timeout,
        settings.graph.request_timeout,
    )
    .context("cannot build the Graph HTTP client")?;
    let token_http = net::http_client(
        settings.graph.connect_timeout,
        settings.graph.request_timeout,
    )
    .context("cannot build the token HTTP client")?;
    let tenants = Arc::new(Tenants::build(settings, token_http)?);
    let graph = GraphClient::new(&settings.graph, graph_http);
    let worker = Worker::new(settings, store, graph, Arc::clone(&tenants))?;
    Ok((Arc::new(worker), tenants))
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        crate::metrics::install();
        let store = open_store(&settings).await?;
        let (worker, tenants) = build_worker(&settings, store.clone())?;
        let fleet = Arc::new(Fleet::new(
            &settings,
            store.clone(),
            tenants,
            worker.owner(),
        ));
        let subscriptions = SubscriptionUpkeep::new(&settings, store.clone(), Arc::clone(&worker))?;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
        let public = match &subscriptions {
            Some(_) => Some(
                TcpListener::bind(settings.server.public_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} (server.public_listen)",
                            settings.server.public_listen
                        )
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            listener,
            public,
            server: settings.server.clone(),
            state: AppState::new(&settings, store, Arc::clone(&worker)),
            worker,
            fleet,
            subscriptions,
        })
    }

    /// The internal listener's port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The public (notification) listener's port, when notifications are on.
    pub fn public_port(&self) -> Option<u16> {
        self.public
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// Store calls the notification endpoints have made (their cost, for tests and probes).
    pub fn notification_store_calls(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.state.notification_store_calls)
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    pub fn worker(&self) -> Arc<Worker> {
        Arc::clone(&self.worker)
    }

    /// Serves HTTP and runs the worker until `shutdown`; then stops taking jobs, lets running
    /// ones finish or hit their deadline, and stops the HTTP servers last, waiting at most
    /// `server.shutdown_grace` for their requests in flight.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run(shutdown, true).await
    }

    /// Like [`run_until_stopped`](Self::run_until_stopped) without the worker loop: whoever
    /// holds [`worker`](Self::worker) runs its jobs a step at a time (the tests do).
    pub async fn serve_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run(shutdown, false).await
    }

    async fn run(self, shutdown: CancellationToken, with_worker: bool) -> anyhow::Result<()> {
        match &self.public {
            Some(public) => tracing::info!(
                addr = %self.listener.local_addr()?,
                public_addr = %public.local_addr()?,
                "calsync serving"
            ),
            None => tracing::info!(addr = %self.listener.local_addr()?, "calsync serving"),
        }
        // The heartbeat outlives the worker: a replica keeps its share while its last jobs
        // finish, and gives it back (removes its row) once it sends no more.
        let fleet_stop = CancellationToken::new();
        let fleet = tokio::spawn(Arc::clone(&self.fleet).run(fleet_stop.clone()));
        let worker =
            with_worker.then(|| tokio::spawn(Arc::clone(&self.worker).run(shutdown.clone())));
        let http_stop = CancellationToken::new();
        let throttle = Arc::clone(&self.state.throttle);
        let (internal_limits, public_limits) = fit_descriptors(
            Limits::internal(&self.server),
            Limits::public(&self.server),
            self.state.store_connections,
            open_files_limit(),
        );
        let mut servers = tokio::task::JoinSet::new();
        if let Some(public) = self.public {
            servers.spawn(server::serve(
                public,
                http::public_router(self.state.clone()),
                public_limits,
                Exposure::Public,
                Arc::clone(&throttle),
                http_stop.clone(),
            ));
        }
        servers.spawn(server::serve(
            self.listener,
            http::router(self.state),
            internal_limits,
            Exposure::Internal,
            throttle,
            http_stop.clone(),
        ));
        // After the server: creating a subscription makes Graph call us back first.
        let subscriptions = self
            .subscriptions
            .map(|s| tokio::spawn(s.run(shutdown.clone())));
        shutdown.cancelled().await;
        if let Some(task) = worker {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "worker task failed");
            }
        }
        if let Some(task) = subscriptions {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "subscription task failed");
            }
        }
        fleet_stop.cancel();
        if let Err(e) = fleet.await {
            tracing::error!(error = %e, "replica heartbeat task failed");
        }
        http_stop.cancel();
        while let Some(done) = servers.join_next().await {
            done.context("HTTP server task failed")?;
        }
        tracing::info!("calsync stopped");
        Ok(())
    }
}

/// Descriptors kept for everything but HTTP connections: the listeners, the store's pool (twice:
/// SQLite's writer), outbound calls, logs.
const DESCRIPTOR_RESERVE: usize = 64;

/// The process's soft limit on open files (Linux: /proc/self/limits), if known.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Shrinks both listeners' connection limits, in proportion, so that together with the store
/// and a reserve they fit the open-files limit: a flood must meet our limit, never the
/// kernel's (at EMFILE every accept fails, the internal listener's and /livez's included).
pub fn fit_descriptors(
    mut internal: Limits,
    mut public: Limits,
    store_connections: u32,
    open_files: Option<usize>,
) -> (Limits, Limits) {
    let Some(open_files) = open_files else {
        return (internal, public);
    };
    let reserve = DESCRIPTOR_RESERVE + 2 * store_connections as usize;
    let available = open_files.saturating_sub(reserve).max(2);
    let wanted = internal.max_connections + public.max_connections;
    if wanted > available {
        let fit = |n: usize| (n * available / wanted).max(1);
        let (was_internal, was_public) = (internal.max_connections, public.max_connections);
        internal.max_connections = fit(was_internal);
        public.max_connections = fit(was_public);
        tracing::warn!(
            open_files,
            internal = internal.max_connections,
            public = public.max_connections,
            configured_internal = was_internal,
            configured_public = was_public,
            "connection limits lowered to fit the open-files limit (raise `ulimit -n` to serve more)"
        );
    }
    (internal, public)
}

/// A URL without any user or password in it, for messages.
pub fn redact_url(url: &str) -> String {
    crate::config::redact_url(url)
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize) -> Limits {
        Limits {
            header_read_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            request_timeout: std::time::Duration::from_secs(30),
            shutdown_grace: std::time::Duration::from_secs(30),
            max_connections,
            max_connections_per_source: 0,
            requests_per_source_per_second: 0,
        }
    }

    #[test]
    fn connection_limits_fit_the_open_files_limit() {
        // `ulimit -n 256`, the defaults (128 + 512), a pool of 8: both shrink, in proportion.
        let (internal, public) = fit_descriptors(limits(128), limits(512), 8, Some(256));
        let total = internal.max_connections + public.max_connections;
        assert!(total + DESCRIPTOR_RESERVE + 16 <= 256, "{total}");
        assert!(internal.max_connections >= 30 && public.max_connections >= 120);
        // Room enough, or unknown: as configured.
        let (internal, public) = fit_descriptors(limits(128), limits(512), 8, Some(20_000));
        assert_eq!(
            (internal.max_connections, public.max_connections),
            (128, 512)
        );
        let (internal, _) = fit_descriptors(limits(128), limits(512), 8, None);
        assert_eq!(internal.max_connections, 128);
    }
}
