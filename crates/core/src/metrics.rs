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
pub const WRITES_FINISHED: &str = "calsync_writes_total";
pub const WRITE_ATTEMPTS_FAILED: &str = "calsync_write_attempts_failed_total";

/// Every event metric, for checks that dashboards and alert rules name only real series.
pub const EVENT_COUNTERS: [&str; 25] = [
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
    WRITES_FINISHED,
    WRITE_ATTEMPTS_FAILED,
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
        WRITES_FINISHED,
        "The application's writes to Outlook that reached a final state, by tenant, op (create, update, cancel) and state (delivered, conflict, failed)."
    );
    describe_counter!(
        WRITE_ATTEMPTS_FAILED,
        "Attempts to deliver a write that stopped on a failure of Graph or the tenant (the write stays queued), by tenant and reason."
    );
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

/// The end of one sync job, as the metrics see it.
pub struct JobEnd<'a> {
    pub tenant: &'a str,
    /// `ok`, `failed`, `deadline_exceeded`, `deferred`.
    pub outcome: &'static str,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// When the mailbox's data was last up to date before this job, if it succeeded.
    pub lag_since: Option<DateTime<Utc>>,
    pub upserted: u64,
    pub deleted: u64,
    pub pages: u64,
    pub resynced: bool,
}

/// A job's end: outcome, duration, what it wrote and, on success, how stale the mailbox was.
pub fn job_finished(end: &JobEnd<'_>) {
    let tenant = end.tenant.to_string();
    counter!(JOBS_FINISHED, "tenant" => tenant.clone(), "outcome" => end.outcome).increment(1);
    histogram!(JOB_DURATION, "tenant" => tenant.clone(), "outcome" => end.outcome)
        .record(seconds_between(end.started_at, end.finished_at));
    if let Some(previous) = end.lag_since {
        histogram!(SYNC_LAG, "tenant" => tenant.clone())
            .record(seconds_between(previous, end.finished_at));
    }
    if end.upserted > 0 {
        counter!(EVENTS_UPSERTED, "tenant" => tenant.clone()).increment(end.upserted);
    }
    if end.deleted > 0 {
        counter!(EVENTS_DELETED, "tenant" => tenant.clone()).increment(end.deleted);
    }
    if end.pages > 0 {
        counter!(PAGES, "tenant" => tenant.clone()).increment(end.pages);
    }
    if end.resynced {
        counter!(RESYNCS, "tenant" => tenant).increment(1);
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_milliseconds().max(0) as f64) / 1000.0
}

/// A job that failed, by the class of its error (its label, never its message; deadline and
/// lost-lease ends are counted by their outcome).
pub fn job_failed(tenant: &str, reason: &'static str) {
    counter!(JOB_FAILURES, "tenant" => tenant.to_string(), "reason" => reason).increment(1);
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

/// One Graph request and how it ended, by status class (`2xx`, `401`, `429`, `4xx`, `5xx`,
/// `none` for no HTTP answer).
pub fn graph_request(tenant: &str, status: &'static str) {
    counter!(GRAPH_REQUESTS, "tenant" => tenant.to_string(), "status" => status).increment(1);
    if status == "429" {
        counter!(GRAPH_THROTTLED, "tenant" => tenant.to_string()).increment(1);
    }
}

/// A write reached a final state.
pub fn write_finished(tenant: &str, op: &'static str, state: &'static str) {
    counter!(WRITES_FINISHED, "tenant" => tenant.to_string(), "op" => op, "state" => state)
        .increment(1);
}

/// A write's delivery stopped on a failure that leaves it queued.
pub fn write_attempt_failed(tenant: &str, reason: &'static str) {
    counter!(WRITE_ATTEMPTS_FAILED, "tenant" => tenant.to_string(), "reason" => reason)
        .increment(1);
}

/// A 401 answered before the token was refreshed and the request sent again.
pub fn graph_unauthorized(tenant: &str) {
    counter!(GRAPH_REQUESTS, "tenant" => tenant.to_string(), "status" => "401").increment(1);
}

/// An HTTP status as its metric class.
pub fn status_class(status: u16) -> &'static str {
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

/// A request to the token endpoint and its result (`ok`, `transient`, `permanent`).
pub fn token_request(tenant: &str, result: &'static str) {
    counter!(TOKEN_REQUESTS, "tenant" => tenant.to_string(), "result" => result).increment(1);
}

pub fn token_grace_served(tenant: &str) {
    counter!(TOKEN_GRACE, "tenant" => tenant.to_string()).increment(1);
}

pub fn breaker_transition(tenant: &str, dependency: &'static str, to: &'static str) {
    counter!(
        BREAKER_TRANSITIONS,
        "tenant" => tenant.to_string(),
        "dependency" => dependency,
        "to" => to
    )
    .increment(1);
}

/// Prometheus text exposition, just the parts the state metrics need (rendered at scrape time
/// by the health module).
#[derive(Default)]
pub struct Text(String);

impl Text {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", help.replace('\\', "\\\\"));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
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

impl Text {
    pub fn into_string(self) -> String {
        self.0
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

    #[test]
    fn label_values_are_escaped() {
        let mut text = Text::default();
        text.sample("m", &[("tenant", "a\"b\\c\nd")], 1.0);
        assert_eq!(text.0, "m{tenant=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
