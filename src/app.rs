//! Wiring: builds the store, clients, token providers, worker and HTTP servers from settings.
//! `Application::build` binds the listeners first, so tests can use port 0 and read `port()`
//! (internal: health, metrics, status page, admin API) and `public_port()` (notifications).

use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{TokenProvider, TokenProviders};
use crate::config::{ServerSettings, Settings};
use crate::graph::GraphClient;
use crate::http::server::{self, Exposure, Limits};
use crate::http::{self, AppState};
use crate::net;
use crate::notifications::SubscriptionUpkeep;
use crate::scheduler::Worker;
use crate::store::Store;

pub struct Application {
    /// Health, metrics, status page, admin API.
    listener: TcpListener,
    /// The notification endpoints; bound only when notifications are on.
    public: Option<TcpListener>,
    server: ServerSettings,
    state: AppState,
    worker: Arc<Worker>,
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
) -> anyhow::Result<(Arc<Worker>, Arc<TokenProviders>)> {
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
    let mut tokens = TokenProviders::new();
    for tenant in &settings.tenants {
        let provider = TokenProvider::new(
            tenant,
            &settings.graph,
            &settings.resilience,
            token_http.clone(),
        )
        .with_context(|| format!("tenant `{}`: bad token endpoint URL", tenant.name))?;
        tokens.insert(tenant.name.clone(), Arc::new(provider));
    }
    let graph = GraphClient::new(&settings.graph, graph_http);
    let worker = Worker::new(settings, store, graph, tokens.clone())?;
    Ok((Arc::new(worker), Arc::new(tokens)))
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        crate::metrics::install();
        let store = open_store(&settings).await?;
        let (worker, _) = build_worker(&settings, store.clone())?;
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
        match &self.public {
            Some(public) => tracing::info!(
                addr = %self.listener.local_addr()?,
                public_addr = %public.local_addr()?,
                "calsync serving"
            ),
            None => tracing::info!(addr = %self.listener.local_addr()?, "calsync serving"),
        }
        let worker = tokio::spawn(Arc::clone(&self.worker).run(shutdown.clone()));
        let http_stop = CancellationToken::new();
        let throttle = Arc::clone(&self.state.throttle);
        let mut servers = tokio::task::JoinSet::new();
        if let Some(public) = self.public {
            servers.spawn(server::serve(
                public,
                http::public_router(self.state.clone()),
                Limits::public(&self.server),
                Exposure::Public,
                Arc::clone(&throttle),
                http_stop.clone(),
            ));
        }
        servers.spawn(server::serve(
            self.listener,
            http::router(self.state),
            Limits::internal(&self.server),
            Exposure::Internal,
            throttle,
            http_stop.clone(),
        ));
        // After the server: creating a subscription makes Graph call us back first.
        let subscriptions = self
            .subscriptions
            .map(|s| tokio::spawn(s.run(shutdown.clone())));
        shutdown.cancelled().await;
        if let Err(e) = worker.await {
            tracing::error!(error = %e, "worker task failed");
        }
        if let Some(task) = subscriptions {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "subscription task failed");
            }
        }
        http_stop.cancel();
        while let Some(done) = servers.join_next().await {
            done.context("HTTP server task failed")?;
        }
        tracing::info!("calsync stopped");
        Ok(())
    }
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
