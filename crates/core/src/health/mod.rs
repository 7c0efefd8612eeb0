//! Health: one model of how calsync is doing (per tenant: counts, lag, breakers, quarantined
//! items and its worst mailboxes with their last success and error; jobs), built in one place
//! and rendered three ways: the `/healthz` JSON, the status page ([`status_page`]) and the
//! Prometheus gauges ([`prometheus`]). The store sums the mailboxes up
//! ([`Store::tenant_summaries`]): a request reads no mailbox record but the few it lists, and
//! its size grows with the tenants, not the mailboxes. It holds no secrets: errors are
//! calsync's own messages, tokens are never shown.

pub mod prometheus;
pub mod shared;
pub mod status_page;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::TokenStatus;
use crate::resilience::breaker::BreakerState;
use crate::resilience::guard::{BreakerSnapshot, Dependency};
use crate::resilience::limits::ShareStatus;
use crate::scheduler::{Worker, WorkerStatus};
use crate::store::{ListedMailbox, Store, TenantSummary, WriteCounts};

/// A store that does not answer this fast is reported unreachable.
pub const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Mailboxes listed per tenant in `/healthz` and on the status page, worst first. The others
/// are counted (`mailbox_detail_omitted`); the admin API lists every mailbox a page at a time.
pub const MAILBOX_DETAIL_PER_TENANT: u32 = 20;

#[derive(Serialize)]
pub struct Health {
    pub status: &'static str,
    pub checked_at: DateTime<Utc>,
    /// This replica's id in the replica registry (its leases are held as `{replica}/{job}`).
    pub replica: String,
    pub jobs: JobsHealth,
    /// This replica's share of Graph's app-wide and per-tenant request rates.
    pub fleet: ShareStatus,
    pub tenants: Vec<TenantHealth>,
}

#[derive(Serialize)]
pub struct JobsHealth {
    #[serde(flatten)]
    pub worker: WorkerStatus,
    /// Age of the oldest job that is due and allowed to run now (breakers closed).
    pub oldest_due_seconds: i64,
    /// Due mailboxes held back because their tenant's breaker is open (not a backlog of ours).
    pub deferred_by_breaker: u64,
}

#[derive(Serialize)]
pub struct TenantHealth {
    pub name: String,
    pub status: &'static str,
    pub breakers: Vec<BreakerSnapshot>,
    /// The token endpoint rejected the app's credentials (wrong or expired secret, app not in
    /// the tenant): an operator must act.
    pub auth_failing_permanently: bool,
    pub mailboxes: u64,
    pub never_synced: u64,
    pub failing: u64,
    pub max_lag_seconds: i64,
    /// The tenant's most recent successful sync.
    pub last_success_at: Option<DateTime<Utc>>,
    /// Items Graph sent that could not be understood, set aside (the rest was applied).
    pub quarantined: u64,
    /// Its due mailboxes: runnable now, or held back by its open breaker.
    pub due: DueJobs,
    /// The application's writes to Outlook not delivered: queued (and since when), failed,
    /// kept as conflicts.
    pub writes: WriteCounts,
    pub token: Option<TokenStatus>,
    /// At most [`MAILBOX_DETAIL_PER_TENANT`] of its mailboxes, worst first: those whose last
    /// job failed or was deferred (the most recent first), then the most behind.
    pub mailbox_detail: Vec<MailboxHealth>,
    /// Its mailboxes not in `mailbox_detail` (the admin API lists every one).
    pub mailbox_detail_omitted: u64,
}

#[derive(Serialize)]
pub struct MailboxHealth {
    pub mailbox: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub lag_seconds: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_request_id: Option<String>,
    pub consecutive_failures: u32,
    pub next_run_at: DateTime<Utc>,
    pub running: bool,
    pub quarantined: u64,
    /// Fresh rounds started because the same page kept failing the same way.
    pub fresh_rounds_forced: u64,
}

impl MailboxHealth {
    fn of(listed: &ListedMailbox, now: DateTime<Utc>) -> Self {
        let m = &listed.record;
        Self {
            mailbox: m.user_id.clone(),
            last_success_at: m.last_success_at,
            lag_seconds: m.lag_seconds(now),
            last_error: m.last_error.clone(),
            last_error_at: m.last_error_at,
            last_request_id: m.last_request_id.clone(),
            consecutive_failures: m.consecutive_failures,
            next_run_at: m.next_run_at,
            running: m.is_running(now),
            quarantined: listed.quarantined,
            fresh_rounds_forced: m.fresh_rounds_forced,
        }
    }
}

/// Per tenant: the due mailboxes that may run now, their oldest age, and the due ones held back
/// by an open breaker (those wait for the breaker's probe time, not for a worker: counted apart
/// so a long outage does not look like a backlog). Mailboxes waiting out a `Retry-After` or a
/// failure backoff have `next_run_at` in the future and are not due at all.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DueJobs {
    pub eligible: u64,
    pub oldest_eligible_seconds: i64,
    pub deferred_by_breaker: u64,
}

impl DueJobs {
    /// A tenant's due mailboxes (`due`, the oldest due since `oldest_due_at`), split by whether
    /// one of its `breakers` is open and not yet probing.
    pub fn split(
        due: u64,
        oldest_due_at: Option<DateTime<Utc>>,
        breakers: &[BreakerSnapshot],
        now: DateTime<Utc>,
    ) -> Self {
        let blocked = breakers
            .iter()
            .any(|b| b.state == BreakerState::Open && b.probe_in_seconds.unwrap_or(0) > 0);
        if blocked {
            Self {
                deferred_by_breaker: due,
                ..Self::default()
            }
        } else {
            Self {
                eligible: due,
                oldest_eligible_seconds: oldest_due_at
                    .map_or(0, |at| (now - at).num_seconds().max(0)),
                deferred_by_breaker: 0,
            }
        }
    }
}

/// The health of the Application whose store and worker these are, with at most `listed`
/// mailboxes of each tenant (0 for none: the metrics need only the counts), or why the store
/// could not say.
pub async fn current(store: &Store, worker: &Worker, listed: u32) -> Result<Health, String> {
    let now = Utc::now();
    let summaries = match tokio::time::timeout(
        STORE_CHECK_TIMEOUT,
        store.tenant_summaries(now, listed),
    )
    .await
    {
        Ok(Ok(summaries)) => summaries,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("store timed out".into()),
    };
    let mut health = build(summaries, worker, now).await;
    // Detail: none known when the store is slow to give them.
    if let Ok(Ok(writes)) = tokio::time::timeout(STORE_CHECK_TIMEOUT, store.write_counts()).await {
        for tenant in &mut health.tenants {
            tenant.writes = writes.get(&tenant.name).copied().unwrap_or_default();
        }
    }
    Ok(health)
}

/// Per tenant: counts, lag, breakers, token, its worst mailboxes; job ages. `degraded` while a
/// breaker is not closed, a mailbox's last job failed, or a stuck job has not ended. Every
/// tenant of the configuration appears, with or without mailboxes.
pub async fn build(summaries: Vec<TenantSummary>, worker: &Worker, now: DateTime<Utc>) -> Health {
    let registry = worker.tenants();
    let mut by_tenant: BTreeMap<String, TenantSummary> = registry
        .names()
        .map(|name| {
            let summary = TenantSummary {
                tenant: name.to_string(),
                ..TenantSummary::default()
            };
            (name.to_string(), summary)
        })
        .collect();
    for summary in summaries {
        by_tenant.insert(summary.tenant.clone(), summary);
    }
    let mut tenants = Vec::with_capacity(by_tenant.len());
    for (name, summary) in by_tenant {
        let breakers = worker.breakers(&name);
        let detail: Vec<MailboxHealth> = summary
            .worst
            .iter()
            .map(|listed| MailboxHealth::of(listed, now))
            .collect();
        let token = match registry.get(&name) {
            Some(tenant) => Some(tenant.tokens.status().await),
            None => None,
        };
        let breakers_closed = breakers.iter().all(|b| b.state == BreakerState::Closed);
        tenants.push(TenantHealth {
            status: if summary.failing == 0 && breakers_closed {
                "ok"
            } else {
                "degraded"
            },
            auth_failing_permanently: breakers
                .iter()
                .any(|b| b.dependency == Dependency::Token && b.permanent),
            due: DueJobs::split(summary.due, summary.oldest_due_at, &breakers, now),
            breakers,
            mailboxes: summary.mailboxes,
            never_synced: summary.never_synced,
            failing: summary.failing,
            max_lag_seconds: summary
                .behind_since
                .map_or(0, |since| (now - since).num_seconds().max(0)),
            last_success_at: summary.last_success_at,
            quarantined: summary.quarantined,
            writes: WriteCounts::default(),
            token,
            mailbox_detail_omitted: summary.mailboxes.saturating_sub(detail.len() as u64),
            mailbox_detail: detail,
            name,
        });
    }
    let oldest_due_seconds = tenants
        .iter()
        .map(|t| t.due.oldest_eligible_seconds)
        .max()
        .unwrap_or(0);
    let deferred_by_breaker = tenants.iter().map(|t| t.due.deferred_by_breaker).sum();
    let worker_status = worker.status();
    let stuck_now = worker_status
        .stuck_recent
        .iter()
        .any(|s| s.finished_after_seconds.is_none());
    let degraded = stuck_now || tenants.iter().any(|t| t.status != "ok");
    Health {
        status: if degraded { "degraded" } else { "ok" },
        checked_at: now,
        replica: worker.owner().to_string(),
        jobs: JobsHealth {
            worker: worker_status,
            oldest_due_seconds,
            deferred_by_breaker,
        },
        fleet: registry.limits().status(),
        tenants,
    }
}
