//! The real `Application` (HTTP + worker) against failing tenants: `/livez`, `/readyz` and
//! `/healthz` answer with the right shape, and no client secret or access token shows up in
//! them, even when the token endpoint or Graph echoes what it was sent.

use std::time::Duration;

use calsync::config::Settings;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::*;

const FABRIKAM_SECRET: &str = "fabrikam-Secret~0123456789abcdef";
const NORTHWIND_SECRET: &str = "northwind-Secret~fedcba9876543210";
const FABRIKAM_TOKEN: &str = "eyJ0eXAiOiJKV1QifQ.fabrikam-access-token.c2ln";

/// A broken proxy in front of the token endpoint: 400 with a non-JSON body that echoes the
/// request, raw and decoded, between control characters and markup.
struct EchoingProxy;

impl Respond for EchoingProxy {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let raw = String::from_utf8_lossy(&request.body).to_string();
        let secret = url::form_urlencoded::parse(&request.body)
            .find(|(k, _)| k == "client_secret")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        ResponseTemplate::new(400).set_body_raw(
            format!("\u{7}<b>Bad Request</b> secret={secret}\r\n\u{0}echo: {raw}</html>"),
            "text/html",
        )
    }
}

/// Graph (or a proxy before it) answering 400 with the Authorization header in the message.
struct EchoingGraph;

impl Respond for EchoingGraph {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let authorization = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        ResponseTemplate::new(400).set_body_json(graph_error(
            "BadRequest",
            &format!("Header 'Authorization: {authorization}' is not allowed here"),
        ))
    }
}

fn settings(graph: &MockServer, dir: &tempfile::TempDir) -> Settings {
    let db = dir.path().join("calsync.db");
    let toml = format!(
        r#"{}
[[tenants]]
name = "fabrikam"
tenant_id = "fabrikam.onmicrosoft.com"
client_id = "ffffffff-bbbb-cccc-dddd-eeeeeeeeeeee"
client_secret = "{FABRIKAM_SECRET}"
mailboxes = ["bob@fabrikam.com"]

[[tenants]]
name = "northwind"
tenant_id = "northwind.onmicrosoft.com"
client_id = "99999999-bbbb-cccc-dddd-eeeeeeeeeeee"
client_secret = "{NORTHWIND_SECRET}"
mailboxes = ["carol@northwind.com"]
"#,
        base_config(&graph.uri(), &db.display().to_string())
    );
    Settings::from_toml_str(&toml).expect("valid")
}

fn secrets() -> Vec<String> {
    let mut all = Vec::new();
    for secret in [
        CLIENT_SECRET,
        FABRIKAM_SECRET,
        NORTHWIND_SECRET,
        FABRIKAM_TOKEN,
    ] {
        all.push(secret.to_string());
        all.push(url::form_urlencoded::byte_serialize(secret.as_bytes()).collect());
    }
    all
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in secrets() {
        assert!(!text.contains(&secret), "{what} leaks `{secret}`: {text}");
    }
}

async fn mount_failing_tenants(graph: &MockServer) {
    // contoso: the token endpoint is behind a proxy that echoes the request.
    Mock::given(method("POST"))
        .and(path(token_path()))
        .respond_with(EchoingProxy)
        .mount(graph)
        .await;
    // northwind: the identity platform itself quotes the secret in its description.
    Mock::given(method("POST"))
        .and(path("/northwind.onmicrosoft.com/oauth2/v2.0/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(identity_error(
            "invalid_client",
            7000215,
            &format!("Invalid client secret provided: '{NORTHWIND_SECRET}'."),
        )))
        .mount(graph)
        .await;
    // fabrikam: a token, and then Graph quoting the bearer back.
    Mock::given(method("POST"))
        .and(path("/fabrikam.onmicrosoft.com/oauth2/v2.0/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(
            FABRIKAM_TOKEN,
            3599,
            3599,
        )))
        .mount(graph)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1.0/users/bob@fabrikam.com/calendarView/delta"))
        .respond_with(EchoingGraph)
        .mount(graph)
        .await;
}

/// Polls `/healthz` until every mailbox has a recorded error (bounded; the worker polls every
/// 50 ms and each job fails on its first request).
async fn health_after_failures(client: &reqwest::Client, base: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz answers");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("body");
        assert_no_secret("/healthz", &text);
        let health: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let failed = health["tenants"]
            .as_array()
            .expect("tenants")
            .iter()
            .flat_map(|t| t["mailbox_detail"].as_array().cloned().unwrap_or_default())
            .filter(|m| m["last_error"].is_string())
            .count();
        if failed == 3 {
            return health;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the three mailboxes did not all fail in time: {health:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_endpoints_report_failures_without_secrets_and_the_app_stops_on_cancel() {
    let graph = MockServer::start().await;
    mount_failing_tenants(&graph).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_app(settings(&graph, &dir), Jobs::Loop).await;
    let base = app.internal.clone();
    let client = app.http.clone();

    let health = health_after_failures(&client, &base).await;

    assert_eq!(health["status"], "degraded", "{health:#}");
    let tenants = health["tenants"].as_array().expect("tenants");
    let mut names: Vec<&str> = tenants
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["contoso", "fabrikam", "northwind"]);
    for tenant in tenants {
        assert_eq!(tenant["status"], "degraded", "{tenant:#}");
        let mailboxes = tenant["mailbox_detail"].as_array().expect("mailbox_detail");
        assert_eq!(mailboxes.len(), 1);
        let mailbox = &mailboxes[0];
        assert!(mailbox["mailbox"].is_string(), "{mailbox:#}");
        assert!(
            mailbox["lag_seconds"].as_i64().is_some_and(|l| l >= 0),
            "{mailbox:#}"
        );
        assert!(mailbox["last_error"].is_string(), "{mailbox:#}");
        assert!(mailbox["consecutive_failures"]
            .as_u64()
            .is_some_and(|n| n >= 1));
    }
    let error_of = |name: &str| {
        tenants
            .iter()
            .find(|t| t["name"] == name)
            .and_then(|t| t["mailbox_detail"][0]["last_error"].as_str())
            .expect("an error")
            .to_string()
    };
    assert!(
        error_of("contoso").contains("HTTP 400"),
        "{}",
        error_of("contoso")
    );
    assert!(
        error_of("northwind").contains("7000215"),
        "{}",
        error_of("northwind")
    );
    assert!(
        error_of("fabrikam").contains("BadRequest"),
        "{}",
        error_of("fabrikam")
    );

    for name in ["contoso", "northwind", "fabrikam"] {
        assert!(
            error_of(name).contains("[REDACTED]"),
            "the echo reached the error and was blanked: {}",
            error_of(name)
        );
    }

    let live = client
        .get(format!("{base}/livez"))
        .send()
        .await
        .expect("livez");
    assert_eq!(live.status(), 200);
    assert_eq!(live.text().await.expect("body"), "ok");
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let ready: serde_json::Value = ready.json().await.expect("JSON");
    assert_eq!(ready["status"], "ready");

    // `calsync health`, the container's HEALTHCHECK: exit 0 while the service answers, even
    // degraded (an Azure outage must not get the container restarted).
    let check = health_command(&base).await;
    assert!(check.status.success(), "{check:?}");
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "degraded");

    app.stop().await;
    assert!(
        client.get(format!("{base}/livez")).send().await.is_err(),
        "the listener is closed after shutdown"
    );
    let check = health_command(&base).await;
    assert!(!check.status.success(), "no service, no health: {check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains("unreachable"));
}

async fn health_command(base: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_calsync"))
        .args(["health", "--url", base])
        .env_remove("CALSYNC_CONFIG")
        .output()
        .await
        .expect("calsync health runs")
}

/// With more mailboxes than it lists, `/healthz` shows each tenant's worst (the failing ones
/// first, most recent first) and counts the rest; the counts, the metrics and the status page
/// cover every mailbox, not only the listed ones.
#[tokio::test]
async fn healthz_lists_each_tenants_worst_mailboxes_and_counts_them_all() {
    use calsync::store::{JobRecord, Lease, RunOutcome};
    let graph = MockServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_app(settings(&graph, &dir), Jobs::ByTest).await;
    let now = chrono::Utc::now();
    let mut ids = Vec::new();
    for i in 0..30 {
        let (record, _) = app
            .store
            .register_mailbox("contoso", &format!("user{i}@contoso.com"), now)
            .await
            .expect("registers");
        ids.push(record.id);
    }
    // Two fail, user7 after user3: user7 comes first.
    for (id, secs) in [(ids[3], 10), (ids[7], 5)] {
        let owner = format!("test/{id}");
        let at = now - chrono::Duration::seconds(secs);
        app.store
            .claim(id, &owner, at, Duration::from_secs(60), false)
            .await
            .expect("claims")
            .expect("free");
        let job = JobRecord {
            started_at: at,
            finished_at: at,
            outcome: RunOutcome::Failed,
            full_round: false,
            pages: 0,
            upserted: 0,
            deleted: 0,
            error: Some(format!("failure {id}")),
            request_id: None,
            next_run_at: now + chrono::Duration::seconds(600),
            hold_until: None,
            round_end: None,
        };
        let lease = Lease { mailbox: id, owner };
        app.store.finish_job(&lease, &job).await.expect("job ends");
    }

    let health: serde_json::Value = app
        .http
        .get(format!("{}/healthz", app.internal))
        .send()
        .await
        .expect("healthz answers")
        .json()
        .await
        .expect("JSON");
    let contoso = health["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["name"] == "contoso")
        .expect("contoso");
    let listed = contoso["mailbox_detail"].as_array().expect("detail");
    assert_eq!(listed.len(), 20, "{contoso:#}");
    assert_eq!(contoso["mailboxes"], 31, "the config's mailbox and 30 more");
    assert_eq!(contoso["mailbox_detail_omitted"], 11);
    assert_eq!(
        (&contoso["failing"], &contoso["never_synced"]),
        (&2.into(), &31.into())
    );
    let first: Vec<&str> = listed[..2]
        .iter()
        .map(|m| m["mailbox"].as_str().expect("name"))
        .collect();
    assert_eq!(first, ["user7@contoso.com", "user3@contoso.com"]);
    assert_eq!(
        contoso["due"]["eligible"], 29,
        "all but the two waiting out their backoff"
    );

    let metrics = app
        .http
        .get(format!("{}/metrics", app.internal))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("text");
    for line in [
        "calsync_mailboxes{tenant=\"contoso\"} 31",
        "calsync_mailboxes_failing{tenant=\"contoso\"} 2",
        "calsync_due_jobs{tenant=\"contoso\"} 29",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    let page = app
        .http
        .get(format!("{}/", app.internal))
        .send()
        .await
        .expect("status page answers")
        .text()
        .await
        .expect("html");
    assert!(page.contains("id=\"omitted\""), "{page}");
    assert!(
        page.contains("failure"),
        "the errors are on the page: {page}"
    );
    app.stop().await;
}
