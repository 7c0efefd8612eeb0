//! `/metrics` and `/` on the real `Application` against the simulator: jobs, requests and
//! breakers are counted per tenant; a tenant whose breaker is open has its due mailboxes
//! counted apart from the runnable backlog; a `Retry-After` past the deadline is a deferral,
//! not a backlog; labels stay bounded (no mailbox, no secret, no error text).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use calsync::sim::{Endpoint, FaultKind, FaultRule, RetryAfter, SimConfig};
use tokio::time::Instant;

use crate::helpers::sim::{fast, sim_settings, start_sim, world};
use crate::helpers::{start_app, Jobs};

/// Label keys a calsync metric may carry (`le` for histogram buckets).
const ALLOWED_LABELS: [&str; 13] = [
    "tenant",
    // A write's operation (create, update, cancel) and final state (delivered, failed, conflict).
    "op",
    "state",
    "dependency",
    "outcome",
    "reason",
    "status",
    "result",
    "how",
    "to",
    // The HTTP side's: which listener, which timeout, which notification endpoint.
    "listener",
    "kind",
    "endpoint",
];

#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (what this exporter writes: no timestamps, no escapes in
/// tenant names used by the tests).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label is k=\"v\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Sum of the samples named `name` whose labels include all of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

pub async fn scrape(http: &reqwest::Client, base: &str) -> (String, Vec<Sample>) {
    let response = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.expect("body");
    let samples = parse(&text);
    (text, samples)
}

/// Scrapes until `check` holds (bounded): the worker polls every 20 ms in these tests.
async fn scrape_until(
    http: &reqwest::Client,
    base: &str,
    what: &str,
    check: impl Fn(&[Sample]) -> bool,
) -> (String, Vec<Sample>) {
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        let (text, samples) = scrape(http, base).await;
        if check(&samples) {
            return (text, samples);
        }
        assert!(Instant::now() < give_up, "{what}: not within 15s:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Tenant names of their own: the event counters are process-wide, shared by every test.
fn unique_world() -> SimConfig {
    let mut config = world(2, 3, 12);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    config.tenants[0].name = format!("obs{}a", &tag[..8]);
    config.tenants[1].name = format!("obs{}b", &tag[..8]);
    config
}

#[tokio::test]
async fn metrics_count_per_tenant_and_keep_breaker_held_mailboxes_apart() {
    let config = unique_world();
    let a = config.tenants[0].name.clone();
    let b = config.tenants[1].name.clone();
    let sim = start_sim(config.clone()).await;
    let (settings, _dir) = sim_settings(&sim, &config, |s| {
        fast(s);
        s.sync.interval = Duration::from_millis(300);
        s.resilience.breaker.min_calls = 3;
        // Open long enough to be seen holding A's due mailboxes.
        s.resilience.breaker.base_break = Duration::from_secs(30);
        s.resilience.breaker.max_break = Duration::from_secs(30);
    });
    let job_deadline = settings.sync.job_deadline.as_secs_f64();
    let service = start_app(settings, Jobs::Loop).await;
    let (base, store, http) = (&service.internal, &service.store, &service.http);

    // Healthy: every mailbox synced, counted under its tenant.
    let (_, healthy) = scrape_until(http, base, "all mailboxes synced", |s| {
        value(s, "calsync_mailboxes_never_synced", &[]) == 0.0
            && value(s, "calsync_mailboxes", &[]) == 6.0
            && value(s, "calsync_sync_lag_seconds_count", &[("tenant", &a)]) >= 3.0
    })
    .await;
    let ok = [("tenant", a.as_str()), ("outcome", "ok")];
    assert!(value(&healthy, "calsync_jobs_finished_total", &ok) >= 3.0);
    assert!(value(&healthy, "calsync_jobs_started_total", &[("tenant", &a)]) >= 3.0);
    assert!(value(&healthy, "calsync_events_upserted_total", &[("tenant", &a)]) >= 36.0);
    assert!(
        value(
            &healthy,
            "calsync_graph_requests_total",
            &[("tenant", &a), ("status", "2xx")]
        ) >= 3.0
    );
    assert!(
        value(
            &healthy,
            "calsync_token_requests_total",
            &[("tenant", &a), ("result", "ok")]
        ) >= 1.0
    );
    assert_eq!(
        value(&healthy, "calsync_breaker_state", &[("tenant", &a)]),
        0.0
    );
    assert!(
        value(
            &healthy,
            "calsync_last_success_timestamp_seconds",
            &[("tenant", &a)]
        ) > 0.0
    );
    assert_eq!(
        value(&healthy, "calsync_job_deadline_seconds", &[]),
        job_deadline
    );

    // Tenant A's Graph fails; one of B's mailboxes is told to come back after the deadline.
    sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 503,
            graph_code: Some("serviceNotAvailable".into()),
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .tenant(a.clone())
        .endpoint(Endpoint::Graph),
    );
    let throttled_mailbox = config.tenants[1].mailboxes[0].clone();
    sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 429,
            graph_code: Some("ApplicationThrottled".into()),
            message: None,
            aadsts: None,
            retry_after: RetryAfter::Seconds(5),
        })
        .mailbox(throttled_mailbox.clone())
        .endpoint(Endpoint::Graph),
    );
    scrape_until(http, base, "A's Graph breaker opens", |s| {
        value(
            s,
            "calsync_breaker_state",
            &[("tenant", &a), ("dependency", "graph")],
        ) == 2.0
    })
    .await;
    // A's mailboxes are asked for now: due, but held by the open breaker (30 s).
    for m in store.mailboxes().await.expect("mailboxes") {
        if m.tenant == a {
            store
                .request_sync(m.id, chrono::Utc::now())
                .await
                .expect("request sync");
        }
    }
    let (text, during) = scrape_until(http, base, "A's breaker holds its due mailboxes", |s| {
        value(s, "calsync_due_jobs_deferred_by_breaker", &[("tenant", &a)]) == 3.0
            && value(
                s,
                "calsync_jobs_deferred_total",
                &[("tenant", &b), ("reason", "retry_after")],
            ) >= 1.0
    })
    .await;
    // Held by the breaker: not a backlog, so not in the oldest-due age.
    assert_eq!(
        value(
            &during,
            "calsync_oldest_due_job_age_seconds",
            &[("tenant", &a)]
        ),
        0.0
    );
    assert_eq!(value(&during, "calsync_due_jobs", &[("tenant", &a)]), 0.0);
    assert!(
        value(
            &during,
            "calsync_graph_requests_total",
            &[("tenant", &a), ("status", "5xx")]
        ) >= 3.0
    );
    // A's jobs that ran into the outage either failed on the 503s or, once the breaker opened
    // under them, were deferred to its probe time (a mailbox not yet due when it opened never
    // started).
    let failed = value(
        &during,
        "calsync_job_failures_total",
        &[("tenant", &a), ("reason", "graph_transient")],
    );
    let deferred = value(
        &during,
        "calsync_jobs_deferred_total",
        &[("tenant", &a), ("reason", "graph_breaker")],
    );
    assert!(
        failed + deferred >= 1.0,
        "failed {failed}, deferred {deferred}"
    );
    assert_eq!(
        value(
            &during,
            "calsync_jobs_finished_total",
            &[("tenant", &a), ("outcome", "failed")]
        ) + value(
            &during,
            "calsync_jobs_finished_total",
            &[("tenant", &a), ("outcome", "deferred")]
        ),
        failed + deferred,
        "every unfinished job of A is counted once, by its reason"
    );
    assert!(
        value(
            &during,
            "calsync_breaker_transitions_total",
            &[("tenant", &a), ("dependency", "graph"), ("to", "open")]
        ) >= 1.0
    );
    assert!(value(&during, "calsync_graph_retries_total", &[("tenant", &a)]) >= 1.0);
    // B: the 429 is counted and its Retry-After deferred, its breaker untouched.
    assert!(value(&during, "calsync_graph_throttled_total", &[("tenant", &b)]) >= 1.0);
    assert!(
        value(
            &during,
            "calsync_retry_after_seconds_total",
            &[("tenant", &b), ("how", "deferred")]
        ) >= 5.0
    );
    assert_eq!(
        value(&during, "calsync_breaker_state", &[("tenant", &b)]),
        0.0
    );
    // The same split in /healthz.
    let health: serde_json::Value = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert!(health["jobs"]["deferred_by_breaker"].as_u64().unwrap_or(0) >= 3);

    // Bounded labels: no mailbox, no secret, no error text.
    for s in during.iter().filter(|s| s.name.starts_with("calsync_")) {
        for key in s.labels.keys() {
            assert!(
                ALLOWED_LABELS.contains(&key.as_str()) || key == "le",
                "{} has label {key}",
                s.name
            );
        }
    }
    for tenant in &config.tenants {
        assert!(!text.contains(&tenant.client_secret), "secret in /metrics");
        for mailbox in &tenant.mailboxes {
            assert!(!text.contains(mailbox.as_str()), "{mailbox} in /metrics");
        }
    }
    let reasons: BTreeSet<&str> = during
        .iter()
        .filter_map(|s| s.labels.get("reason").map(String::as_str))
        .collect();
    assert!(
        reasons
            .iter()
            .all(|r| r.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
        "{reasons:?}"
    );
    promtool_accepts(&text);
    deploy_files_name_only_exported_metrics(&during);

    // The status page says the same thing.
    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .expect("status page");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains(&format!("data-tenant=\"{a}\" data-status=\"degraded\"")));
    assert!(html.contains("data-breaker=\"graph\" data-state=\"open\""));
    assert!(html.contains("<table id=\"errors\">"), "{html}");
    assert!(html.contains(&config.tenants[0].mailboxes[0]), "{html}");
    for tenant in &config.tenants {
        assert!(!html.contains(&tenant.client_secret), "secret on the page");
    }

    service.stop().await;
    sim.shutdown().await;
}

/// `promtool check metrics` on a scrape, when promtool is installed (CI installs it and sets
/// `CALSYNC_REQUIRE_TOOLS=1`, which turns a missing promtool into a failure).
fn promtool_accepts(text: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("CALSYNC_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "promtool is required (CALSYNC_REQUIRE_TOOLS=1) but cannot run: {e}"
            );
            eprintln!("SKIPPED promtool check metrics: promtool not installed ({e})");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// JSON log lines of this test binary's tenants named `obs...` (the other tests' lines are
/// dropped), collected by a process-wide subscriber in the format `log.format = "json"` selects.
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One event is one write of one line.
        if String::from_utf8_lossy(buf).contains("\"tenant\":\"obs") {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Lines {
    /// The lines that mention `tenant`.
    fn json(&self, tenant: &str) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("log buffer").clone();
        let needle = format!("\"{tenant}\"");
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// A global subscriber (a scoped one misses events other threads registered first).
fn captured_logs() -> &'static Lines {
    static LOGS: std::sync::OnceLock<Lines> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter("calsync_core::scheduler=info,calsync_core::resilience=info,calsync_core::sync=info")
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the test binary");
        lines
    })
}

/// Write bodies hold personal data: delivering a write logs its id, operation and state, never
/// what it carries (subject, attendees, body).
#[tokio::test]
async fn a_write_is_logged_by_id_and_state_never_by_its_content() {
    let lines = captured_logs();
    let config = unique_world();
    let tenant = config.tenants[0].name.clone();
    let mailbox = config.tenants[0].mailboxes[0].clone();
    let app = crate::helpers::sim::sim_app(config, |s| {
        fast(s);
        s.tenants[0].writes = true;
    })
    .await;
    let id = app.record(&mailbox).await.id;
    let body = serde_json::json!({
        "subject": "Counselling session for Jordan Doe",
        "body": {"contentType": "text", "content": "Discuss the medical leave"},
        "start": {"dateTime": "2026-12-03T14:00:00", "timeZone": "UTC"},
        "end": {"dateTime": "2026-12-03T15:00:00", "timeZone": "UTC"},
        "attendees": [{"emailAddress": {"address": "jordan.doe@students.example", "name": "Jordan Doe"}}],
    })
    .to_string();
    let write_id = uuid::Uuid::new_v4().to_string();
    let enqueued = app
        .store
        .enqueue_write(&calsync::store::NewWrite {
            id: &write_id,
            mailbox: id,
            external_id: "booking-77",
            op: calsync::store::WriteOp::Create,
            idempotency_key: "k-77",
            request_hash: "h-77",
            body: &body,
            transaction_id: "t-77",
            now: chrono::Utc::now(),
        })
        .await
        .expect("store writes");
    assert!(matches!(enqueued, calsync::store::Enqueued::New(_)));
    app.pass_ok().await;
    let record = app
        .store
        .write_by_id(&write_id)
        .await
        .expect("reads")
        .expect("write");
    assert_eq!(record.state.as_str(), "delivered");

    let logged: Vec<serde_json::Value> = lines
        .json(&tenant)
        .into_iter()
        .filter(|l| l["write"] == write_id.as_str())
        .collect();
    assert_eq!(logged.len(), 1, "the delivery is logged once, by write id");
    assert_eq!(logged[0]["state"], "delivered");
    let text = lines.text();
    for private in ["Jordan", "jordan.doe", "Counselling", "medical leave"] {
        assert!(!text.contains(private), "`{private}` reached the log");
    }
}

#[tokio::test]
async fn json_logs_carry_the_job_span_with_request_ids_and_one_line_per_breaker_transition() {
    let lines = captured_logs();
    let config = unique_world();
    let a = config.tenants[0].name.clone();
    let app = crate::helpers::sim::sim_app(config.clone(), |s| {
        fast(s);
        s.resilience.breaker.min_calls = 3;
        s.resilience.breaker.base_break = Duration::from_secs(30);
        s.resilience.breaker.max_break = Duration::from_secs(30);
    })
    .await;
    app.pass_ok().await;

    let done: Vec<serde_json::Value> = lines
        .json(&a)
        .into_iter()
        .chain(lines.json(&config.tenants[1].name))
        .filter(|l| l["message"] == "sync job done")
        .collect();
    assert_eq!(done.len(), 6, "one line per job");
    for line in &done {
        let span = &line["span"];
        assert_eq!(span["name"], "sync_job", "{line}");
        assert!(
            span["tenant"].is_string() && span["mailbox"].is_string(),
            "{line}"
        );
        assert_eq!(span["attempt"], 1, "{line}");
        let request_id = span["request_id"].as_str().unwrap_or("-");
        assert!(request_id != "-" && !request_id.is_empty(), "{line}");
        let client_request_id = span["client_request_id"].as_str().unwrap_or_default();
        assert!(uuid::Uuid::parse_str(client_request_id).is_ok(), "{line}");
    }

    // A's Graph fails until its breaker opens: one line per transition, no more.
    sim_fault_graph_503(&app.sim, &a);
    app.pass().await;
    let trips = app
        .worker
        .breakers(&a)
        .into_iter()
        .find(|b| b.dependency == calsync::resilience::guard::Dependency::Graph)
        .map(|b| b.trips)
        .unwrap_or(0);
    assert!(trips >= 1, "A's Graph breaker opened");
    let all = lines.json(&a);
    let opened = all
        .iter()
        .filter(|l| l["message"] == "circuit breaker opened")
        .filter(|l| l["tenant"] == a.as_str() && l["dependency"] == "graph")
        .count();
    assert_eq!(opened as u64, trips, "one line per opening");
    let failed: Vec<&serde_json::Value> = all
        .iter()
        .filter(|l| {
            l["message"] == "sync job did not complete" && l["span"]["tenant"] == a.as_str()
        })
        .collect();
    // After a Graph answer, the job's lines carry its ids (a job deferred before any request
    // has none to carry).
    assert!(!failed.is_empty());
    assert!(
        failed.iter().any(|l| l["span"]["request_id"].is_string()),
        "{failed:#?}"
    );
    for line in failed.iter().filter(|l| l["outcome"] == "failed") {
        assert!(line["span"]["client_request_id"].is_string(), "{line}");
    }
    let retries: Vec<&serde_json::Value> = all
        .iter()
        .filter(|l| l["message"] == "retrying Graph request" && l["span"]["tenant"] == a.as_str())
        .collect();
    for line in retries {
        assert!(line["span"]["client_request_id"].is_string(), "{line}");
    }
    let text = lines.text();
    for tenant in &config.tenants {
        assert!(!text.contains(&tenant.client_secret), "secret in the logs");
    }
    app.sim.clone().shutdown().await;
}

fn sim_fault_graph_503(sim: &calsync::sim::SimHandle, tenant: &str) {
    sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 503,
            graph_code: Some("serviceNotAvailable".into()),
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .tenant(tenant.to_string())
        .endpoint(Endpoint::Graph),
    );
}

/// The alert rules and the dashboard name only series calsync exports: the state gauges in a
/// scrape, and the event counters and histograms it declares (present once they happened).
fn deploy_files_name_only_exported_metrics(scrape: &[Sample]) {
    let mut known: BTreeSet<String> = scrape.iter().map(|s| s.name.clone()).collect();
    known.extend(
        calsync::metrics::EVENT_COUNTERS
            .iter()
            .map(|n| n.to_string()),
    );
    for h in calsync::metrics::EVENT_HISTOGRAMS {
        for suffix in ["_bucket", "_sum", "_count"] {
            known.insert(format!("{h}{suffix}"));
        }
    }
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/calsync.json",
    ] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut named = BTreeSet::new();
        for (at, _) in text.match_indices("calsync_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            named.insert(name);
        }
        assert!(named.len() > 5, "{file} names calsync metrics");
        let unknown: Vec<&String> = named.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} names series calsync does not export: {unknown:?}"
        );
    }
}
