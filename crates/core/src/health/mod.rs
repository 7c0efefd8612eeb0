//! Health: one model of how calsync is doing (per tenant and mailbox: last success, lag, last
//! error, breakers, quarantined items; jobs), built in one place and rendered three ways: the
//! `/healthz` JSON, the status page ([`status_page`]) and the Prometheus gauges
//! ([`prometheus`]). It holds no secrets: errors are calsync's own messages, tokens are never
//! shown.

pub mod prometheus;
pub mod status_page;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::TokenStatus;
use crate::resilience::breaker::BreakerState;
use crate::resilience::guard::{BreakerSnapshot, Dependency};
use crate::resilience::limits::ShareStatus;
use crate::scheduler::{Worker, WorkerStatus};
use crate::store::{MailboxId, MailboxRecord, Store, WriteCounts};

/// A store that does not answer this fast is reported unreachable.
pub const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub deferred_by_breaker: usize,
}

#[derive(Serialize)]
pub struct TenantHealth {
    pub name: String,
    pub status: &'static str,
    pub breakers: Vec<BreakerSnapshot>,
    /// The token endpoint rejected the app's credentials (wrong or expired secret, app not in
    /// the tenant): an operator must act.
    pub auth_failing_permanently: bool,
    pub mailboxes: usize,
    pub never_synced: usize,
    pub failing: usize,
    pub max_lag_seconds: i64,
    /// Items Graph sent that could not be understood, set aside (the rest was applied).
    pub quarantined: u64,
    /// The application's writes to Outlook not delivered: queued (and since when), failed,
    /// kept as conflicts.
    pub writes: WriteCounts,
    pub token: Option<TokenStatus>,
    pub mailbox_detail: Vec<MailboxHealth>,
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

/// Per tenant: the due mailboxes that may run now, their oldest age, and the due ones held back
/// by an open breaker (those wait for the breaker's probe time, not for a worker: counted apart
/// so a long outage does not look like a backlog). Mailboxes waiting out a `Retry-After` or a
/// failure backoff have `next_run_at` in the future and are not due at all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DueJobs {
    pub eligible: usize,
    pub oldest_eligible_seconds: i64,
    pub deferred_by_breaker: usize,
}

impl TenantHealth {
    /// The tenant's due mailboxes, split into those that may run now and those its open
    /// breaker holds. `/healthz` totals these; the metrics report them per tenant.
    pub fn due_jobs(&self, now: DateTime<Utc>) -> DueJobs {
        let blocked = self
            .breakers
            .iter()
            .any(|b| b.state == BreakerState::Open && b.probe_in_seconds.unwrap_or(0) > 0);
        let mut due = DueJobs::default();
        for m in self
            .mailbox_detail
            .iter()
            .filter(|m| m.next_run_at <= now && !m.running)
        {
            if blocked {
                due.deferred_by_breaker += 1;
            } else {
                due.eligible += 1;
                due.oldest_eligible_seconds = due
                    .oldest_eligible_seconds
                    .max((now - m.next_run_at).num_seconds());
            }
        }
        due
    }
}

/// The health of the Application whose store and worker these are, or why the store could not
/// say.
pub async fn current(
    store: &Store,
    worker: &Worker,
) -> Result<(Health, Vec<MailboxRecord>), String> {
    let mailboxes = match tokio::time::timeout(STORE_CHECK_TIMEOUT, store.mailboxes()).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("store timed out".into()),
    };
    // Quarantine counts are detail: none known when the store is slow to give them.
    let quarantined =
        match tokio::time::timeout(STORE_CHECK_TIMEOUT, store.quarantine_counts()).await {
            Ok(Ok(counts)) => counts,
            _ => HashMap::new(),
        };
    let mut health = build(&mailboxes, &quarantined, worker, Utc::now()).await;
    // Detail too: none known when the store is slow to give them.
    if let Ok(Ok(writes)) = tokio::time::timeout(STORE_CHECK_TIMEOUT, store.write_counts()).await {
        for tenant in &mut health.tenants {
            tenant.writes = writes.get(&tenant.name).copied().unwrap_or_default();
        }
    }
    Ok((health, mailboxes))
}

/// Per tenant and mailbox: last success, lag, last error; breakers; job ages. `degraded` while
/// a breaker is not closed, a mailbox's last job failed, or a stuck job has not ended.
pub async fn build(
    mailboxes: &[MailboxRecord],
    quarantined: &HashMap<MailboxId, u64>,
    worker: &Worker,
    now: DateTime<Utc>,
) -> Health {
    let registry = worker.tenants();
    let mut by_tenant: std::collections::BTreeMap<&str, Vec<&MailboxRecord>> = Default::default();
    for name in registry.names() {
        by_tenant.entry(name).or_default();
    }
    for m in mailboxes {
        by_tenant.entry(m.tenant.as_str()).or_default().push(m);
    }
    let mut tenants = Vec::with_capacity(by_tenant.len());
    for (name, list) in by_tenant {
        let breakers = worker.breakers(name);
        let detail: Vec<MailboxHealth> = list
            .iter()
            .map(|m| MailboxHealth {
                mailbox: m.user_id.clone(),
                last_success_at: m.last_success_at,
                lag_seconds: m.lag_seconds(now),
                last_error: m.last_error.clone(),
                last_error_at: m.last_error_at,
                last_request_id: m.last_request_id.clone(),
                consecutive_failures: m.consecutive_failures,
                next_run_at: m.next_run_at,
                running: m.is_running(now),
                quarantined: quarantined.get(&m.id).copied().unwrap_or(0),
                fresh_rounds_forced: m.fresh_rounds_forced,
            })
            .collect();
        let failing = detail.iter().filter(|m| m.consecutive_failures > 0).count();
        let token = match registry.get(name) {
            Some(tenant) => Some(tenant.tokens.status().await),
            None => None,
        };
        let breakers_closed = breakers.iter().all(|b| b.state == BreakerState::Closed);
        tenants.push(TenantHealth {
            name: name.to_string(),
            status: if failing == 0 && breakers_closed {
                "ok"
            } else {
                "degraded"
            },
            auth_failing_permanently: breakers
                .iter()
                .any(|b| b.dependency == Dependency::Token && b.permanent),
            breakers,
            mailboxes: detail.len(),
            never_synced: detail
                .iter()
                .filter(|m| m.last_success_at.is_none())
                .count(),
            failing,
            max_lag_seconds: detail.iter().map(|m| m.lag_seconds).max().unwrap_or(0),
            quarantined: detail.iter().map(|m| m.quarantined).sum(),
            writes: WriteCounts::default(),
            token,
            mailbox_detail: detail,
        });
    }
    let due: Vec<_> = tenants.iter().map(|t| t.due_jobs(now)).collect();
    let oldest_due_seconds = due
        .iter()
        .map(|d| d.oldest_eligible_seconds)
        .max()
        .unwrap_or(0);
    let deferred_by_breaker = due.iter().map(|d| d.deferred_by_breaker).sum();
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
