//! Prometheus metrics. Every metric name and label is defined here, nowhere else.
//!
//! Two kinds, rendered together at `/metrics`:
//! - **events** (jobs, token and Graph requests, retries, breaker transitions, events written):
//!   counters and histograms recorded through the `metrics` facade into one process-wide
//!   [`PrometheusRecorder`](metrics_exporter_prometheus::PrometheusRecorder), installed once by
//!   [`install`]. Until it is installed (unit tests, tools) recording is a no-op.
//! - **state** (breakers, lag, due and running jobs): read from the Application's own worker and
//!   store at scrape time by [`render_state`], so each Application reports only itself even when
//!   a test process runs many of them.
//!
//! Labels are bounded: tenant names from the config, a dependency, an outcome or a reason from a
//! fixed list, a status class. Never a mailbox id, an error message, or anything secret.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::auth::{AuthError, AuthFailureClass};
use crate::graph::GraphError;
use crate::http::Health;
use crate::resilience::breaker::BreakerState;
use crate::resilience::guard::Dependency;
use crate::store::{MailboxRecord, RunOutcome, StoreError};
use crate::sync::{SyncError, SyncReport};

pub const JOBS_STARTED: &str = "calsync_jobs_started_total";
pub const JOBS_FINISHED: &str = "calsync_jobs_finished_total";
pub const JOB_FAILURES: &str = "calsync_job_failures_total";
pub const JOBS_DEFERRED: &str = "calsync_jobs_deferred_total";
pub const JOB_DURATION: &str = "calsync_job_duration_seconds";
pub const SYNC_LAG: &str = "calsync_sync_lag_seconds";
pub const EVENTS_UPSERTED: &str = "calsync_events_upserted_total";
pub const EVENTS_DELETED: &str = "calsync_events_deleted_total";
pub const PAGES: &str = "calsync_pages_total";
pub const RESYNCS: &str = "calsync_resyncs_total";
pub const TOKEN_REQUESTS: &str = "calsync_token_requests_total";
pub const TOKEN_GRACE: &str = "calsync_token_grace_served_total";
pub const GRAPH_REQUESTS: &str = "calsync_graph_requests_total";
pub const GRAPH_THROTTLED: &str = "calsync_graph_throttled_total";
pub const GRAPH_RETRIES: &str = "calsync_graph_retries_total";
pub const RETRY_AFTER_SECONDS: &str = "calsync_retry_after_seconds_total";
pub const BREAKER_TRANSITIONS: &str = "calsync_breaker_transitions_total";
pub const ITEMS_QUARANTINED: &str = "calsync_items_quarantined_total";
pub const FRESH_ROUNDS_FORCED: &str = "calsync_fresh_rounds_forced_total";
pub const HTTP_CONNECTIONS_REFUSED: &str = "calsync_http_connections_refused_total";
pub const HTTP_RATE_LIMITED: &str = "calsync_http_rate_limited_total";
pub const HTTP_TIMEOUTS: &str = "calsync_http_timeouts_total";
pub const HTTP_OPEN_CONNECTIONS: &str = "calsync_http_open_connections";
pub const ADMIN_AUTH_FAILURES: &str = "calsync_admin_auth_failures_total";
pub const NOTIFICATIONS_RECEIVED: &str = "calsync_notifications_received_total";
pub const NOTIFICATION_BATCHES_REFUSED: &str = "calsync_notification_batches_refused_total";

/// Every event metric, for checks that dashboards and alert rules name only real series.
pub const EVENT_COUNTERS: [&str; 23] = [
    JOBS_STARTED,
    JOBS_FINISHED,
    JOB_FAILURES,
    JOBS_DEFERRED,
    EVENTS_UPSERTED,
    EVENTS_DELETED,
    PAGES,
    RESYNCS,
    TOKEN_REQUESTS,
    TOKEN_GRACE,
    GRAPH_REQUESTS,
    GRAPH_THROTTLED,
    GRAPH_RETRIES,
    RETRY_AFTER_SECONDS,
    BREAKER_TRANSITIONS,
    ITEMS_QUARANTINED,
    FRESH_ROUNDS_FORCED,
    HTTP_CONNECTIONS_REFUSED,
    HTTP_RATE_LIMITED,
    HTTP_TIMEOUTS,
    ADMIN_AUTH_FAILURES,
    NOTIFICATIONS_RECEIVED,
    NOTIFICATION_BATCHES_REFUSED,
];
pub const EVENT_HISTOGRAMS: [&str; 2] = [JOB_DURATION, SYNC_LAG];

/// Sync lag buckets: from a few seconds (the drill, tests) to a day; the default interval is 5m.
const LAG_BUCKETS: [f64; 14] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 420.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 86400.0,
];
/// Job duration buckets, up to past the default 2m job deadline.
const DURATION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder the first time; later calls (more Applications in one
/// process) reuse it. `None` if something else installed a global recorder first: the event
/// metrics then go there and `/metrics` shows the state metrics only.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(SYNC_LAG.into()), &LAG_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(JOB_DURATION.into()), &DURATION_BUCKETS)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!(error = %e, "metrics: bad histogram buckets; event metrics are off");
                    return None;
                }
            };
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("metrics: another recorder is installed; /metrics shows state metrics only");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(JOBS_STARTED, "Sync jobs started, by tenant.");
    describe_counter!(
        JOBS_FINISHED,
        "Sync jobs finished, by tenant and outcome (ok, failed, deadline_exceeded, deferred)."
    );
    describe_counter!(
        JOB_FAILURES,
        "Failed sync jobs by tenant and reason (the error's class, never its text)."
    );
    describe_counter!(
        JOBS_DEFERRED,
        "Sync jobs that stopped early and were rescheduled without holding a worker, by reason."
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "Sync job wall time, by tenant and outcome."
    );
    describe_histogram!(
        SYNC_LAG,
        Unit::Seconds,
        "Age of a mailbox's data when a job brought it up to date (time since its previous success)."
    );
    describe_counter!(EVENTS_UPSERTED, "Events inserted or updated, by tenant.");
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "HTTP connections closed at accept, by listener and reason (per_source: the source holds its cap)."
    );
    describe_counter!(
        HTTP_RATE_LIMITED,
        "HTTP requests answered 429 by the per-source rate limit, by listener."
    );
    describe_counter!(
        HTTP_TIMEOUTS,
        "HTTP connections or requests cut by a timeout, by listener and kind (header, idle, request)."
    );
    metrics::describe_gauge!(
        HTTP_OPEN_CONNECTIONS,
        "HTTP connections being served, by listener."
    );
    describe_counter!(
        ADMIN_AUTH_FAILURES,
        "Admin API requests refused for a missing or wrong bearer token, by reason."
    );
    describe_counter!(
        NOTIFICATIONS_RECEIVED,
        "Change-notification items received, by endpoint and result (accepted, unknown_subscription, wrong_client_state, incomplete)."
    );
    describe_counter!(
        NOTIFICATION_BATCHES_REFUSED,
        "Notification batches refused whole, by endpoint and reason (malformed, too_many_items)."
    );
    describe_counter!(
        EVENTS_DELETED,
        "Events deleted (@removed or reconciliation), by tenant."
    );
    describe_counter!(PAGES, "Delta pages committed, by tenant.");
    describe_counter!(
        RESYNCS,
        "Full resyncs after Graph expired the delta state, by tenant."
    );
    describe_counter!(
        TOKEN_REQUESTS,
        "Requests to the token endpoint, by tenant and result (ok, transient, permanent)."
    );
    describe_counter!(
        TOKEN_GRACE,
        "Token refreshes that failed transiently while the cached token was still served (ext_expires_in grace)."
    );
    describe_counter!(
        GRAPH_REQUESTS,
        "Graph delta requests, by tenant and status (2xx, 401, 429, 4xx, 5xx, none = no HTTP answer)."
    );
    describe_counter!(GRAPH_THROTTLED, "Graph 429 answers, by tenant.");
    describe_counter!(
        GRAPH_RETRIES,
        "Graph requests retried within a job, by tenant."
    );
    describe_counter!(
        RETRY_AFTER_SECONDS,
        "Seconds Graph asked calsync to wait (Retry-After), by tenant and how: waited in the job, or deferred (job ended, mailbox rescheduled)."
    );
    describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker state changes, by tenant, dependency and new state."
    );
    describe_counter!(
        ITEMS_QUARANTINED,
        "Items of delta pages calsync could not understand and set aside (the rest of each page was applied), by tenant."
    );
    describe_counter!(
        FRESH_ROUNDS_FORCED,
        "Fresh delta rounds started because the same page kept failing the same way, by tenant."
    );
}

/// The event metrics, or an empty string before [`install`].
pub fn render_events() -> String {
    match HANDLE.get().and_then(Option::as_ref) {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

// ---- recording helpers: one call at each place something happens ----

/// A connection refused at accept (`reason`: `per_source`).
pub fn http_connection_refused(listener: &'static str, reason: &'static str) {
    counter!(HTTP_CONNECTIONS_REFUSED, "listener" => listener, "reason" => reason).increment(1);
}

/// A request answered 429 by the per-source rate limit.
pub fn http_rate_limited(listener: &'static str) {
    counter!(HTTP_RATE_LIMITED, "listener" => listener).increment(1);
}

/// A connection or request cut by a timeout (`kind`: `header`, `idle`, `request`).
pub fn http_timeout(listener: &'static str, kind: &'static str) {
    counter!(HTTP_TIMEOUTS, "listener" => listener, "kind" => kind).increment(1);
}

pub fn http_connection_opened(listener: &'static str) {
    metrics::gauge!(HTTP_OPEN_CONNECTIONS, "listener" => listener).increment(1.0);
}

pub fn http_connection_closed(listener: &'static str) {
    metrics::gauge!(HTTP_OPEN_CONNECTIONS, "listener" => listener).decrement(1.0);
}

/// An admin API request without the right bearer token (`reason`: `missing`, `wrong`).
pub fn admin_auth_failure(reason: &'static str) {
    counter!(ADMIN_AUTH_FAILURES, "reason" => reason).increment(1);
}

/// Notification items by endpoint (`change`, `lifecycle`) and result (`accepted`,
/// `unknown_subscription`, `wrong_client_state`, `incomplete`).
pub fn notifications_received(endpoint: &'static str, result: &'static str, n: u64) {
    if n > 0 {
        counter!(NOTIFICATIONS_RECEIVED, "endpoint" => endpoint, "result" => result).increment(n);
    }
}

/// A notification batch refused whole (`reason`: `malformed`, `too_many_items`).
pub fn notification_batch_refused(endpoint: &'static str, reason: &'static str) {
    counter!(NOTIFICATION_BATCHES_REFUSED, "endpoint" => endpoint, "reason" => reason).increment(1);
}

pub fn job_started(tenant: &str) {
    counter!(JOBS_STARTED, "tenant" => tenant.to_string()).increment(1);
}

/// A job's end: outcome, duration, what it wrote and, on success, how stale the mailbox was.
pub fn job_finished(
    mailbox: &MailboxRecord,
    outcome: RunOutcome,
    report: &SyncReport,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
) {
    let tenant = mailbox.tenant.clone();
    counter!(JOBS_FINISHED, "tenant" => tenant.clone(), "outcome" => outcome.as_str()).increment(1);
    histogram!(JOB_DURATION, "tenant" => tenant.clone(), "outcome" => outcome.as_str())
        .record(seconds_between(started_at, finished_at));
    if outcome == RunOutcome::Ok {
        let previous = mailbox.last_success_at.unwrap_or(mailbox.created_at);
        histogram!(SYNC_LAG, "tenant" => tenant.clone())
            .record(seconds_between(previous, finished_at));
    }
    if report.upserted > 0 {
        counter!(EVENTS_UPSERTED, "tenant" => tenant.clone()).increment(report.upserted);
    }
    if report.deleted > 0 {
        counter!(EVENTS_DELETED, "tenant" => tenant.clone()).increment(report.deleted);
    }
    if report.pages > 0 {
        counter!(PAGES, "tenant" => tenant.clone()).increment(report.pages);
    }
    if report.resynced {
        counter!(RESYNCS, "tenant" => tenant).increment(1);
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_milliseconds().max(0) as f64) / 1000.0
}

/// A job that failed with `error` (deadline and lost-lease ends are counted by their outcome).
pub fn job_failed(tenant: &str, error: &SyncError) {
    counter!(JOB_FAILURES, "tenant" => tenant.to_string(), "reason" => failure_reason(error))
        .increment(1);
}

/// The class of a job's error, as a label.
pub fn failure_reason(error: &SyncError) -> &'static str {
    match error {
        SyncError::Auth(e) => match e.class() {
            AuthFailureClass::Permanent => "auth_permanent",
            AuthFailureClass::Transient => "auth_transient",
        },
        SyncError::Graph(e) => match e {
            GraphError::Unauthorized { .. } => "graph_unauthorized",
            GraphError::Throttled { .. } => "graph_throttled",
            GraphError::ResyncRequired { .. } => "graph_resync_required",
            GraphError::Transient { .. } => "graph_transient",
            GraphError::Unreachable { .. } => "graph_unreachable",
            GraphError::NotFound { .. } => "graph_not_found",
            GraphError::Permanent { .. } => "graph_permanent",
            GraphError::Malformed { .. } => "graph_malformed",
            GraphError::ForeignLink { .. } | GraphError::BadLink(_) => "graph_bad_link",
        },
        SyncError::Store(StoreError::LeaseLost(_)) => "lease_lost",
        SyncError::Store(_) => "store",
        SyncError::RoundTooLong { .. } => "round_too_long",
        SyncError::PageLoop { .. } => "page_loop",
        SyncError::ResyncLoop => "resync_loop",
        SyncError::PageKeepsFailing { .. } => "page_keeps_failing",
        SyncError::Deferred { .. } => "deferred",
    }
}

/// Why a job stopped early and was rescheduled instead of waiting in a worker slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeferReason {
    RateLimit,
    GraphBreaker,
    TokenBreaker,
    RetryAfter,
}

impl DeferReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::GraphBreaker => "graph_breaker",
            Self::TokenBreaker => "token_breaker",
            Self::RetryAfter => "retry_after",
        }
    }
}

/// A job deferred for `wait`; a `Retry-After` deferral also counts the seconds asked for.
pub fn job_deferred(tenant: &str, reason: DeferReason, wait: Duration) {
    counter!(JOBS_DEFERRED, "tenant" => tenant.to_string(), "reason" => reason.as_str())
        .increment(1);
    if reason == DeferReason::RetryAfter {
        counter!(RETRY_AFTER_SECONDS, "tenant" => tenant.to_string(), "how" => "deferred")
            .increment(wait.as_secs());
    }
}

/// One Graph delta request and how it ended; `Err` without a Graph error (no token, a refused
/// link) sent nothing and is not counted.
pub fn graph_request<T>(tenant: &str, result: &Result<T, SyncError>) {
    let status = match result {
        Ok(_) => "2xx",
        Err(SyncError::Graph(e)) => graph_status(e),
        Err(_) => return,
    };
    counter!(GRAPH_REQUESTS, "tenant" => tenant.to_string(), "status" => status).increment(1);
    if status == "429" {
        counter!(GRAPH_THROTTLED, "tenant" => tenant.to_string()).increment(1);
    }
}

/// A 401 answered before the token was refreshed and the request sent again.
pub fn graph_unauthorized(tenant: &str) {
    counter!(GRAPH_REQUESTS, "tenant" => tenant.to_string(), "status" => "401").increment(1);
}

fn graph_status(error: &GraphError) -> &'static str {
    match error {
        GraphError::Unauthorized { .. } => "401",
        GraphError::NotFound { .. } => "4xx",
        GraphError::Throttled { status: 429, .. } => "429",
        GraphError::Throttled { status, .. }
        | GraphError::ResyncRequired { status, .. }
        | GraphError::Permanent { status, .. } => status_class(*status),
        // Transient failures with an answer are worded "HTTP {status} {code}" by the classifier.
        GraphError::Transient { reason, .. } => reason
            .strip_prefix("HTTP ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|code| code.parse::<u16>().ok())
            .map_or("none", status_class),
        GraphError::Malformed { .. } => "2xx",
        GraphError::Unreachable { .. } => "none",
        GraphError::ForeignLink { .. } | GraphError::BadLink(_) => "none",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        401 => "401",
        429 => "429",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Items set aside in quarantine by a committed page.
pub fn items_quarantined(tenant: &str, n: u64) {
    if n > 0 {
        counter!(ITEMS_QUARANTINED, "tenant" => tenant.to_string()).increment(n);
    }
}

/// A mailbox's cursor reset after the same page failed the same way too often.
pub fn fresh_round_forced(tenant: &str) {
    counter!(FRESH_ROUNDS_FORCED, "tenant" => tenant.to_string()).increment(1);
}

/// A retry within the job, after `retry_after` if Graph named the wait.
pub fn graph_retry(tenant: &str, retry_after: Option<Duration>) {
    counter!(GRAPH_RETRIES, "tenant" => tenant.to_string()).increment(1);
    if let Some(wait) = retry_after {
        counter!(RETRY_AFTER_SECONDS, "tenant" => tenant.to_string(), "how" => "waited")
            .increment(wait.as_secs());
    }
}

/// A request to the token endpoint and its result.
pub fn token_request<T>(tenant: &str, result: &Result<T, AuthError>) {
    let result = match result {
        Ok(_) => "ok",
        Err(e) => match e.class() {
            AuthFailureClass::Permanent => "permanent",
            AuthFailureClass::Transient => "transient",
        },
    };
    counter!(TOKEN_REQUESTS, "tenant" => tenant.to_string(), "result" => result).increment(1);
}

pub fn token_grace_served(tenant: &str) {
    counter!(TOKEN_GRACE, "tenant" => tenant.to_string()).increment(1);
}

pub fn breaker_transition(tenant: &str, dependency: Dependency, to: BreakerState) {
    counter!(
        BREAKER_TRANSITIONS,
        "tenant" => tenant.to_string(),
        "dependency" => dependency.as_str(),
        "to" => to.as_str()
    )
    .increment(1);
}

// ---- state metrics, read at scrape time ----

/// 0 closed, 1 half-open, 2 open: `> 0` means "not healthy", and `max` picks the worst.
pub fn breaker_state_value(state: BreakerState) -> u8 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
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

impl crate::http::TenantHealth {
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

/// Settings the alert rules compare against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub job_deadline: Duration,
    pub interval: Duration,
}

/// Prometheus text for the state of one Application: breakers, mailboxes, lag, due and running
/// jobs, token cache. Every tenant in the config appears, even with no mailbox.
pub fn render_state(health: &Health, limits: Limits, now: DateTime<Utc>) -> String {
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
    let per_tenant: [Family<crate::http::TenantHealth>; 5] = [
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
        "calsync_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the tenant's most recent successful sync (absent until one succeeds).",
    );
    for t in &health.tenants {
        if let Some(last) = t
            .mailbox_detail
            .iter()
            .filter_map(|m| m.last_success_at)
            .max()
        {
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
        .map(|t| (t.name.as_str(), t.due_jobs(now)))
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
    let single: [(&str, &str, &str, f64); 6] = [
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
    out.0
}

/// A gauge family's name, help and value per item.
type Family<T> = (&'static str, &'static str, fn(&T) -> f64);

/// Prometheus text exposition, just the parts the state metrics need.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", help.replace('\\', "\\\\"));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"{}\"", escape_label(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::RequestIds;

    fn ids() -> RequestIds {
        RequestIds {
            request_id: Some("r".into()),
            client_request_id: "c".into(),
        }
    }

    #[test]
    fn graph_status_classes_come_from_the_classifier_wording() {
        let answered = crate::graph::classify_failure(
            503,
            &http::HeaderMap::new(),
            b"",
            ids(),
            std::time::SystemTime::now(),
        );
        assert_eq!(graph_status(&answered), "5xx");
        let throttled = crate::graph::classify_failure(
            429,
            &http::HeaderMap::new(),
            b"",
            ids(),
            std::time::SystemTime::now(),
        );
        assert_eq!(graph_status(&throttled), "429");
        let reset = GraphError::Transient {
            reason: "connection reset by peer".into(),
            retry_after: None,
            ids: ids(),
        };
        assert_eq!(graph_status(&reset), "none");
        let gone = crate::graph::classify_failure(
            410,
            &http::HeaderMap::new(),
            b"",
            ids(),
            std::time::SystemTime::now(),
        );
        assert_eq!(graph_status(&gone), "4xx");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut text = Text::default();
        text.sample("m", &[("tenant", "a\"b\\c\nd")], 1.0);
        assert_eq!(text.0, "m{tenant=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn failure_reasons_never_carry_the_message() {
        let e = SyncError::Graph(GraphError::Permanent {
            status: 403,
            code: "ErrorAccessDenied".into(),
            message: "alice@contoso.com may not".into(),
            ids: ids(),
        });
        assert_eq!(failure_reason(&e), "graph_permanent");
    }
}
