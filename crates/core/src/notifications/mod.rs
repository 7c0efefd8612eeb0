//! Graph change notifications, client side: a subscription per enabled mailbox, created,
//! renewed before it expires and recreated when Graph drops it ([`SubscriptionUpkeep`]); the
//! HTTP endpoints that receive notifications are in `http::notifications`.
//!
//! A notification is only a trigger: it asks for an immediate delta round of its mailbox
//! (`Store::request_sync`), and delta stays the source of truth. So a lost notification costs
//! latency (the periodic round still comes), never data.

pub mod client;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::RngCore;
use secrecy::SecretString;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use client::{NewSubscription, Subscription, SubscriptionClient, SubscriptionError};

use crate::config::{NotificationSettings, Settings};
use crate::graph::GraphError;
use crate::resilience::backoff::BackoffSchedule;
use crate::resilience::retry::RetryPolicy;
use crate::resilience::Evidence;
use crate::scheduler::Worker;
use crate::store::{Store, SubscriptionDue, SubscriptionSaved};

/// Path of the notification endpoint under `notifications.public_url`.
pub const NOTIFICATION_PATH: &str = "notifications";
/// Path of the lifecycle endpoint under `notifications.public_url`.
pub const LIFECYCLE_PATH: &str = "notifications/lifecycle";

/// A fresh random clientState: 32 bytes, base64url (43 characters; Graph allows 128).
pub fn random_client_state() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    use base64::Engine as _;
    SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What one [`SubscriptionUpkeep::step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpkeepReport {
    pub created: usize,
    pub renewed: usize,
    /// A renewal found the subscription gone and created a new one (also counted in `created`).
    pub recreated: usize,
    pub failed: usize,
    /// Due, but their tenant's token or Graph breaker is not closed: left for later.
    pub skipped_breaker: usize,
    /// Subscriptions of removed or disabled mailboxes deleted at Graph.
    pub deleted: usize,
    /// Deletions that failed (tried again after a backoff).
    pub delete_failed: usize,
}

enum Done {
    Created { recreated: bool },
    Renewed,
    Failed,
}

/// Keeps every enabled mailbox subscribed. Works from the store, so any replica may do any
/// mailbox's work (a row is claimed first) and lifecycle events received by one replica are
/// acted on by whichever claims the row next.
pub struct SubscriptionUpkeep {
    store: Store,
    worker: Arc<Worker>,
    client: SubscriptionClient,
    settings: NotificationSettings,
    notification_url: String,
    lifecycle_url: String,
    /// When a failed subscription call is tried again.
    retry: RetryPolicy,
    /// How long a claimed row is ours: past the request deadline, with room to record.
    claim_for: Duration,
    slots: Arc<Semaphore>,
}

impl SubscriptionUpkeep {
    /// `None` when notifications are off (no `notifications.public_url`).
    pub fn new(
        settings: &Settings,
        store: Store,
        worker: Arc<Worker>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let n = &settings.notifications;
        let (Some(notification_url), Some(lifecycle_url)) =
            (n.endpoint(NOTIFICATION_PATH), n.endpoint(LIFECYCLE_PATH))
        else {
            return Ok(None);
        };
        let http = crate::net::http_client(
            settings.graph.connect_timeout,
            settings.graph.request_timeout,
        )?;
        // Graph answers a create only after its validation request to us: allow for that.
        let deadline = settings.graph.request_timeout + Duration::from_secs(10);
        let graph = crate::graph::GraphClient::new(&settings.graph, http);
        Ok(Some(Arc::new(Self {
            store,
            worker,
            client: SubscriptionClient::new(graph, deadline),
            notification_url,
            lifecycle_url,
            retry: RetryPolicy::new(0, BackoffSchedule::new(n.retry_initial, n.retry_max)?),
            claim_for: deadline * 2,
            slots: Arc::new(Semaphore::new(n.max_concurrent)),
            settings: n.clone(),
        })))
    }

    /// Steps every `check_interval` until `shutdown`. A step's requests each have a deadline,
    /// and the sync jobs never wait for this task.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(url = %self.notification_url, "keeping Graph subscriptions");
        let mut reconcile_at = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= reconcile_at {
                reconcile_at = tokio::time::Instant::now() + self.settings.reconcile_interval;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    done = self.reconcile() => if let Err(e) = done {
                        tracing::warn!(error = %crate::error_chain(e.as_ref()), "comparing Graph's subscriptions with the store failed; will try again");
                    },
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                report = self.step() => match report {
                    Ok(r) if r != UpkeepReport::default() => tracing::debug!(?r, "subscription upkeep"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %crate::error_chain(e.as_ref()), "subscription upkeep failed; will try again"),
                },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.check_interval) => {}
            }
        }
    }

    /// One pass: claims the subscriptions due for creation or renewal (skipping tenants whose
    /// breakers are not closed) and works on them, `max_concurrent` at a time.
    pub async fn step(&self) -> anyhow::Result<UpkeepReport> {
        let now = Utc::now();
        let mut report = UpkeepReport::default();
        self.retire(&mut report).await?;
        let renew_by = now + chrono_duration(self.settings.renew_before);
        let limit = (self.settings.max_concurrent * 16).min(4096) as u32;
        let due = self.store.subscriptions_due(now, renew_by, limit).await?;
        let mut work = JoinSet::new();
        for item in due {
            if !self.tenant_available(&item.tenant) {
                report.skipped_breaker += 1;
                continue;
            }
            let until = now + chrono_duration(self.claim_for);
            if !self
                .store
                .claim_subscription(item.mailbox_id, now, until)
                .await?
            {
                continue;
            }
            let permit = Arc::clone(&self.slots).acquire_owned().await?;
            let this = UpkeepCall {
                store: self.store.clone(),
                worker: Arc::clone(&self.worker),
                client: self.client.clone(),
                settings: self.settings.clone(),
                notification_url: self.notification_url.clone(),
                lifecycle_url: self.lifecycle_url.clone(),
                retry: self.retry,
            };
            work.spawn(async move {
                let done = this.work_on(&item).await;
                drop(permit);
                done
            });
        }
        while let Some(done) = work.join_next().await {
            match done {
                Ok(Done::Created { recreated }) => {
                    report.created += 1;
                    report.recreated += usize::from(recreated);
                }
                Ok(Done::Renewed) => report.renewed += 1,
                Ok(Done::Failed) => report.failed += 1,
                Err(e) => {
                    report.failed += 1;
                    tracing::error!(error = %e, "a subscription task panicked; its claim will run out");
                }
            }
        }
        Ok(report)
    }

    /// Finds the subscriptions Graph holds for our notification URL that no row knows (a store
    /// re-created or restored from a backup forgot them, and they would notify until they
    /// expire) and retires them, to be deleted by the next steps. Returns how many.
    pub async fn reconcile(&self) -> anyhow::Result<usize> {
        let now = Utc::now();
        let rows = self.store.subscriptions().await?;
        let mut known: std::collections::HashSet<String> = rows
            .iter()
            .filter_map(|r| r.subscription_id.clone())
            .collect();
        known.extend(
            self.store
                .retired_subscriptions()
                .await?
                .into_iter()
                .map(|r| r.subscription_id),
        );
        // A row claimed or backing off may have a create in flight whose id is not saved yet:
        // its mailbox's subscriptions are left for the next comparison.
        let busy: std::collections::HashSet<String> = rows
            .iter()
            .filter(|r| r.next_attempt_at > now)
            .map(|r| r.user_id.to_ascii_lowercase())
            .collect();
        let mut retired = 0;
        for tenant in self.worker.tenants().iter() {
            let (tenant, tokens) = (&tenant.name, &tenant.tokens);
            if !self.tenant_available(tenant) {
                continue;
            }
            let listed = match tokens.token().await {
                Ok(token) => self.client.list(&token).await.map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e)),
            };
            let listed = match listed {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %crate::error_chain(e.as_ref()), "cannot list the tenant's Graph subscriptions");
                    continue;
                }
            };
            for sub in listed {
                if sub.notification_url.as_deref() != Some(self.notification_url.as_str())
                    || known.contains(&sub.id)
                {
                    continue;
                }
                let user = sub
                    .resource
                    .trim_start_matches('/')
                    .strip_prefix("users/")
                    .and_then(|r| r.strip_suffix("/events"))
                    .unwrap_or(&sub.resource)
                    .to_string();
                if busy.contains(&user.to_ascii_lowercase()) {
                    continue;
                }
                tracing::info!(tenant = %tenant, mailbox = %user, subscription = %sub.id,
                    "Graph subscription no row knows (store re-created?): deleting it");
                self.store
                    .retire_orphan(&sub.id, tenant, &user, now)
                    .await?;
                retired += 1;
            }
        }
        Ok(retired)
    }

    /// Deletes at Graph the subscriptions of mailboxes that were removed (through the API) or
    /// disabled (left the config), so Graph stops notifying about them before they expire.
    async fn retire(&self, report: &mut UpkeepReport) -> anyhow::Result<()> {
        let now = Utc::now();
        self.store.retire_disabled_subscriptions(now).await?;
        let limit = (self.settings.max_concurrent * 16).min(4096) as u32;
        for item in self.store.retired_due(now, limit).await? {
            let id = &item.subscription_id;
            let Some(tokens) = self.worker.tenants().get(&item.tenant).map(|t| &t.tokens) else {
                // The tenant left the config with its credentials: Graph lets it expire.
                tracing::warn!(tenant = %item.tenant, mailbox = %item.user_id, subscription = %id,
                    "cannot delete the subscription of a tenant no longer configured; it will expire");
                self.store.retired_deleted(id).await?;
                continue;
            };
            if !self.tenant_available(&item.tenant) {
                report.skipped_breaker += 1;
                continue;
            }
            let until = now + chrono_duration(self.claim_for);
            if !self.store.claim_retired(id, now, until).await? {
                continue;
            }
            let deleted = match tokens.token().await {
                Ok(token) => self
                    .client
                    .delete(id, &token)
                    .await
                    .map_err(|e| (crate::error_chain(&e), e.retry_after())),
                Err(e) => Err((crate::error_chain(&e), e.retry_after())),
            };
            match deleted {
                Ok(()) => {
                    self.store.retired_deleted(id).await?;
                    report.deleted += 1;
                    tracing::info!(tenant = %item.tenant, mailbox = %item.user_id, subscription = %id,
                        "Graph subscription of a removed mailbox deleted");
                }
                Err((error, retry_after)) => {
                    let wait = self
                        .retry
                        .reschedule(item.consecutive_failures, retry_after);
                    tracing::warn!(tenant = %item.tenant, mailbox = %item.user_id, subscription = %id,
                        error = %error, retry_in_seconds = wait.as_secs_f64(),
                        "could not delete the Graph subscription of a removed mailbox");
                    self.store
                        .retired_failed(id, &error, Utc::now() + chrono_duration(wait))
                        .await?;
                    report.delete_failed += 1;
                }
            }
        }
        Ok(())
    }

    /// Subscriptions wait while the tenant's token endpoint or Graph is failing: the sync
    /// jobs' probes decide when it is back.
    fn tenant_available(&self, tenant: &str) -> bool {
        self.worker
            .tenants()
            .get(tenant)
            .is_some_and(|t| t.available())
    }
}

/// What one spawned create/renew needs (owned, so it can run as its own task).
struct UpkeepCall {
    store: Store,
    worker: Arc<Worker>,
    client: SubscriptionClient,
    settings: NotificationSettings,
    notification_url: String,
    lifecycle_url: String,
    /// When a failed subscription call is tried again.
    retry: RetryPolicy,
}

impl UpkeepCall {
    async fn work_on(&self, item: &SubscriptionDue) -> Done {
        let outcome = self.call_graph(item).await;
        let now = Utc::now();
        let recorded = match &outcome {
            Ok((subscription, client_state, created)) => {
                let saved = SubscriptionSaved {
                    subscription_id: &subscription.id,
                    client_state: client_state.as_ref(),
                    expires_at: subscription.expires_at,
                    created: created.is_some(),
                };
                self.store
                    .subscription_saved(item.mailbox_id, &saved, now)
                    .await
            }
            Err(message) => {
                let wait = self.retry.reschedule(item.consecutive_failures, message.1);
                tracing::warn!(
                    tenant = %item.tenant,
                    mailbox = %item.user_id,
                    error = %message.0,
                    failures = item.consecutive_failures + 1,
                    retry_in_seconds = wait.as_secs_f64(),
                    "could not keep the mailbox's Graph subscription"
                );
                self.store
                    .subscription_failed(
                        item.mailbox_id,
                        &message.0,
                        now,
                        now + chrono_duration(wait),
                    )
                    .await
            }
        };
        if let Err(e) = recorded {
            tracing::error!(mailbox = %item.user_id, error = %e, "could not record the subscription's state; its claim will run out");
        }
        match outcome {
            Ok((subscription, _, Some(recreated))) => {
                if recreated {
                    // "Recreate, then delta": what changed while unsubscribed is caught up now.
                    if let Err(e) = self.store.request_sync(item.mailbox_id, Utc::now()).await {
                        tracing::warn!(mailbox = %item.user_id, error = %e, "could not ask for a catch-up sync; the periodic round will do it");
                    }
                }
                tracing::info!(tenant = %item.tenant, mailbox = %item.user_id, subscription = %subscription.id, expires_at = %subscription.expires_at, recreated, "Graph subscription created");
                Done::Created { recreated }
            }
            Ok((subscription, _, None)) => {
                tracing::info!(tenant = %item.tenant, mailbox = %item.user_id, subscription = %subscription.id, expires_at = %subscription.expires_at, "Graph subscription renewed");
                Done::Renewed
            }
            Err(_) => Done::Failed,
        }
    }

    /// Renews the subscription, or creates one (also when a renewal finds it gone). Ok:
    /// Graph's answer, the new clientState when created, and `Some(recreated)` when created.
    #[allow(clippy::type_complexity)]
    async fn call_graph(
        &self,
        item: &SubscriptionDue,
    ) -> Result<(Subscription, Option<SecretString>, Option<bool>), (String, Option<Duration>)>
    {
        let Some(tokens) = self.worker.tenants().get(&item.tenant).map(|t| &t.tokens) else {
            return Err((format!("tenant `{}` is not configured", item.tenant), None));
        };
        let token = tokens
            .token()
            .await
            .map_err(|e| (crate::error_chain(&e), e.retry_after()))?;
        let expires_at = Utc::now() + chrono_duration(lifetime_to_ask(self.settings.expiration));
        let mut recreated = item.had_subscription;
        if let Some(id) = &item.subscription_id {
            match self
                .guarded(
                    &item.tenant,
                    item.mailbox_id,
                    self.client.renew(id, expires_at, &token),
                )
                .await?
            {
                // The clientState stays the one stored with the id.
                Ok(renewed) => return Ok((renewed, None, None)),
                Err(SubscriptionError::NotFound(_)) => recreated = true,
                Err(e) => return Err((crate::error_chain(&e), e.retry_after())),
            }
        }
        let client_state = self
            .settings
            .client_state
            .clone()
            .unwrap_or_else(random_client_state);
        let new = NewSubscription {
            mailbox: &item.user_id,
            notification_url: &self.notification_url,
            lifecycle_url: &self.lifecycle_url,
            expires_at,
            client_state: &client_state,
        };
        match self
            .guarded(
                &item.tenant,
                item.mailbox_id,
                self.client.create(&new, &token),
            )
            .await?
        {
            Ok(created) => Ok((created, Some(client_state), Some(recreated))),
            Err(e) => Err((crate::error_chain(&e), e.retry_after())),
        }
    }

    /// A subscription call counts in the tenant's Graph breaker like any Graph call: refused
    /// while it is open, and its failures are evidence of Graph's health.
    async fn guarded<T>(
        &self,
        tenant: &str,
        mailbox: i64,
        call: impl std::future::Future<Output = Result<T, SubscriptionError>>,
    ) -> Result<Result<T, SubscriptionError>, (String, Option<Duration>)> {
        let Some(guard) = self.worker.tenants().get(tenant).map(|t| &t.guard) else {
            return Err((format!("tenant `{tenant}` is not configured"), None));
        };
        let reservation = guard.graph.reserve().map_err(|rejected| {
            let wait = rejected
                .until
                .saturating_duration_since(tokio::time::Instant::now());
            ("the tenant's Graph circuit is open".to_string(), Some(wait))
        })?;
        let result = call.await;
        let evidence = match result.as_ref().map_err(SubscriptionError::graph) {
            Err(Some(GraphError::Unreachable { .. })) => Evidence::GraphFailure,
            Err(Some(GraphError::Transient { .. })) => Evidence::MailboxFailure,
            Err(Some(GraphError::Malformed { .. })) => Evidence::Neutral,
            _ => Evidence::Healthy,
        };
        guard.settle(reservation, mailbox, evidence, tokio::time::Instant::now());
        Ok(result)
    }
}

/// Subscriptions at a glance, for health output. No clientState, no subscription ids.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct SubscriptionHealth {
    /// Enabled mailboxes with a live subscription.
    pub active: usize,
    /// Enabled mailboxes whose last create or renew failed.
    pub failing: usize,
    /// Enabled mailboxes with no subscription (not yet created, or removed by Graph).
    pub missing: usize,
    /// Subscriptions already past their expiry (renewal is failing or late).
    pub expired: usize,
    /// The failing mailboxes (at most 20) with their last error.
    pub failures: Vec<SubscriptionFailure>,
}

#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct SubscriptionFailure {
    pub tenant: String,
    pub mailbox: String,
    pub error: String,
    pub consecutive_failures: u32,
    pub next_attempt_at: chrono::DateTime<Utc>,
}

/// Failing subscriptions listed in health (the others are counted).
const FAILURES_LISTED: u32 = 20;

/// Summarises the stored subscriptions of enabled mailboxes (`mailboxes` is how many are
/// enabled; those without a row count as missing), counted by the store.
pub async fn subscription_health(
    store: &Store,
    mailboxes: u64,
) -> Result<SubscriptionHealth, crate::store::StoreError> {
    let counts = store
        .subscription_counts(Utc::now(), FAILURES_LISTED)
        .await?;
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Ok(SubscriptionHealth {
        active: size(counts.active),
        failing: size(counts.failing),
        missing: size(counts.without + mailboxes.saturating_sub(counts.rows)),
        expired: size(counts.expired),
        failures: counts
            .failures
            .into_iter()
            .map(|r| SubscriptionFailure {
                tenant: r.tenant,
                mailbox: r.user_id,
                error: r.last_error.unwrap_or_default(),
                consecutive_failures: r.consecutive_failures,
                next_attempt_at: r.next_attempt_at,
            })
            .collect(),
    })
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(365))
}

/// How far calsync's clock may run ahead of Graph's without losing its subscriptions: Graph
/// judges `expirationDateTime` by its own clock and refuses one past its limit
/// (`ExtensionError`), so a lifetime asked from a fast clock at the limit is refused at every
/// create and renewal.
const CLOCK_AHEAD_ALLOWED: Duration = Duration::from_secs(5 * 60);

/// The lifetime to ask Graph for: the configured one, at most Graph's limit for event
/// subscriptions less [`CLOCK_AHEAD_ALLOWED`].
fn lifetime_to_ask(configured: Duration) -> Duration {
    configured.min(crate::config::MAX_EVENT_SUBSCRIPTION.saturating_sub(CLOCK_AHEAD_ALLOWED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_states_are_random_and_fit_graphs_limit() {
        use secrecy::ExposeSecret;
        let a = random_client_state();
        let b = random_client_state();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 43);
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(same_secret(b"", b""));
    }
}
