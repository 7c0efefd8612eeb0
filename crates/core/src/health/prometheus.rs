//! The health model as Prometheus gauges, rendered at scrape time beside the event metrics.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{DueJobs, Health, TenantHealth};
use crate::metrics::Text;
use crate::resilience::breaker::BreakerState;

/// A gauge family's name, help and value per item.
type Family<T> = (&'static str, &'static str, fn(&T) -> f64);

/// 0 closed, 1 half-open, 2 open: `> 0` means "not healthy", and `max` picks the worst.
pub fn breaker_state_value(state: BreakerState) -> u8 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// Settings the alert rules compare against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub job_deadline: Duration,
    pub interval: Duration,
}

/// Prometheus text for the state of one Application: breakers, mailboxes, lag, due and running
/// jobs, token cache. Every tenant in the config appears, even with no mailbox.
pub fn render(health: &Health, limits: Limits, now: DateTime<Utc>) -> String {
    let mut out = Text::default();
    out.family(
        "calsync_breaker_state",
        "gauge",
        "Circuit breaker state per tenant and dependency: 0 closed, 1 half-open, 2 open.",
    );
    for t in &health.tenants {
        for b in &t.breakers {
            out.sample(
                "calsync_breaker_state",
                &[("tenant", &t.name), ("dependency", b.dependency.as_str())],
                f64::from(breaker_state_value(b.state)),
            );
        }
    }
    out.family(
        "calsync_breaker_permanent",
        "gauge",
        "1 while a breaker is open because the dependency refused us permanently (token endpoint: wrong or expired credentials).",
    );
    for t in &health.tenants {
        for b in &t.breakers {
            out.sample(
                "calsync_breaker_permanent",
                &[("tenant", &t.name), ("dependency", b.dependency.as_str())],
                if b.permanent { 1.0 } else { 0.0 },
            );
        }
    }
    out.family(
        "calsync_breaker_trips_total",
        "counter",
        "Times a breaker opened since calsync started.",
    );
    for t in &health.tenants {
        for b in &t.breakers {
            out.sample(
                "calsync_breaker_trips_total",
                &[("tenant", &t.name), ("dependency", b.dependency.as_str())],
                b.trips as f64,
            );
        }
    }
    let per_tenant: [Family<TenantHealth>; 8] = [
        (
            "calsync_writes_queued",
            "The application's writes to Outlook accepted and not yet delivered.",
            |t| t.writes.queued as f64,
        ),
        (
            "calsync_writes_failed",
            "The application's writes Graph refused for good (see GET /v1/writes/{id}).",
            |t| t.writes.failed as f64,
        ),
        (
            "calsync_writes_conflicted",
            "The application's updates not written because the event had been changed in Outlook (writes.conflict_policy = outlook_wins).",
            |t| t.writes.conflict as f64,
        ),
        ("calsync_mailboxes", "Enabled mailboxes.", |t| {
            t.mailboxes as f64
        }),
        (
            "calsync_quarantined_items",
            "Items in quarantine: sent by Graph, not understood, set aside (see GET /v1/mailboxes/{id}/quarantine).",
            |t| t.quarantined as f64,
        ),
        (
            "calsync_mailboxes_failing",
            "Mailboxes whose last job failed.",
            |t| t.failing as f64,
        ),
        (
            "calsync_mailboxes_never_synced",
            "Mailboxes without a successful sync yet.",
            |t| t.never_synced as f64,
        ),
        (
            "calsync_sync_lag_max_seconds",
            "Seconds since the least recently synced mailbox of the tenant last synced (or was added).",
            |t| t.max_lag_seconds as f64,
        ),
    ];
    for (name, help, value) in per_tenant {
        out.family(name, "gauge", help);
        for t in &health.tenants {
            out.sample(name, &[("tenant", &t.name)], value(t));
        }
    }
    out.family(
        "calsync_writes_oldest_queued_seconds",
        "gauge",
        "Age of the oldest write of the tenant still queued (0 when none is).",
    );
    for t in &health.tenants {
        let age = t.writes.oldest_queued_at.map_or(0.0, |at| {
            (now - at).num_milliseconds().max(0) as f64 / 1000.0
        });
        out.sample(
            "calsync_writes_oldest_queued_seconds",
            &[("tenant", &t.name)],
            age,
        );
    }
    out.family(
        "calsync_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the tenant's most recent successful sync (absent until one succeeds).",
    );
    for t in &health.tenants {
        if let Some(last) = t.last_success_at {
            out.sample(
                "calsync_last_success_timestamp_seconds",
                &[("tenant", &t.name)],
                last.timestamp_millis() as f64 / 1000.0,
            );
        }
    }
    let due: Vec<(&str, DueJobs)> = health
        .tenants
        .iter()
        .map(|t| (t.name.as_str(), t.due.clone()))
        .collect();
    let due_families: [Family<DueJobs>; 3] = [
        (
            "calsync_due_jobs",
            "Mailboxes due and allowed to run now (their tenant's breakers let them), not yet running.",
            |d| d.eligible as f64,
        ),
        (
            "calsync_oldest_due_job_age_seconds",
            "How long the oldest due, runnable mailbox has waited for a worker. Mailboxes held by a breaker or waiting out a Retry-After are not counted.",
            |d| d.oldest_eligible_seconds as f64,
        ),
        (
            "calsync_due_jobs_deferred_by_breaker",
            "Due mailboxes held back because their tenant's breaker is open (waiting for its probe, not for a worker).",
            |d| d.deferred_by_breaker as f64,
        ),
    ];
    for (name, help, value) in due_families {
        out.family(name, "gauge", help);
        for (tenant, d) in &due {
            out.sample(name, &[("tenant", tenant)], value(d));
        }
    }
    out.family(
        "calsync_jobs_running",
        "gauge",
        "Sync jobs running now, by tenant.",
    );
    for t in &health.tenants {
        let n = health
            .jobs
            .worker
            .running
            .iter()
            .filter(|j| j.tenant == t.name)
            .count();
        out.sample("calsync_jobs_running", &[("tenant", &t.name)], n as f64);
    }
    let worker = &health.jobs.worker;
    let fleet = &health.fleet;
    let single: [(&str, &str, &str, f64); 9] = [
        (
            "calsync_replicas_live",
            "gauge",
            "Replicas sharing the store whose heartbeat is within one lease period, this one included, as this replica last saw them.",
            f64::from(fleet.live_replicas),
        ),
        (
            "calsync_app_share_requests_per_second",
            "gauge",
            "This replica's share of resilience.app_requests_per_second (0 while it has none: not yet admitted by the fleet, or its heartbeat is stale).",
            fleet.app_requests_per_second,
        ),
        (
            "calsync_tenant_share_requests_per_second",
            "gauge",
            "This replica's share of resilience.tenant_requests_per_second, for each tenant.",
            fleet.tenant_requests_per_second,
        ),
        (
            "calsync_job_longest_running_seconds",
            "gauge",
            "Age of the longest-running job now (0 when idle). Never above the job deadline.",
            worker.longest_running_seconds,
        ),
        (
            "calsync_job_deadline_seconds",
            "gauge",
            "The configured hard deadline of a sync job (sync.job_deadline).",
            limits.job_deadline.as_secs_f64(),
        ),
        (
            "calsync_sync_interval_seconds",
            "gauge",
            "The configured sync interval (sync.interval).",
            limits.interval.as_secs_f64(),
        ),
        (
            "calsync_worker_slots",
            "gauge",
            "Sync jobs that may run at once (sync.workers).",
            worker.workers as f64,
        ),
        (
            "calsync_worker_slots_busy",
            "gauge",
            "Worker slots in use.",
            worker.busy_slots as f64,
        ),
        (
            "calsync_jobs_stuck_total",
            "counter",
            "Jobs found still running past deadline + sync.stuck_grace (their slot was freed). Must stay 0.",
            worker.stuck_total as f64,
        ),
    ];
    for (name, kind, help, value) in single {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    out.family(
        "calsync_token_extended_lifetime",
        "gauge",
        "1 while the tenant's token is served past expires_in within ext_expires_in (token endpoint failing).",
    );
    for t in &health.tenants {
        let extended = t.token.as_ref().is_some_and(|s| s.using_extended_lifetime);
        out.sample(
            "calsync_token_extended_lifetime",
            &[("tenant", &t.name)],
            if extended { 1.0 } else { 0.0 },
        );
    }
    out.into_string()
}
