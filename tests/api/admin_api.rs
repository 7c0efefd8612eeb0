//! The admin API (`/v1`) over real sockets: the bearer token, registration, sync requests
//! ahead of periodic work, status, stored events against the simulator, removal, every 400
//! naming its field or parameter, 404s, and the OpenAPI description against the router.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use calsync::config::Settings;
use calsync::http::admin;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use wiremock::MockServer;

use crate::helpers::api::{Api, TOKEN, WRONG};
use crate::helpers::sim::{fast, sim_settings, start_sim, world, Dispatcher, Truth};
use crate::helpers::store::in_postgres_schema;
use crate::helpers::{base_config, ALICE, TENANT};

/// The test harness's config (one tenant `contoso` with Alice, Graph on a mock that answers
/// nothing useful) with the admin API on, and a second tenant without mailboxes.
async fn mock_settings(graph: &MockServer, dir: &tempfile::TempDir, token: bool) -> Settings {
    let db = dir.path().join("calsync.db");
    let mut toml = base_config(&graph.uri(), &db.display().to_string());
    toml.push_str(
        r#"
[[tenants]]
name = "fabrikam"
tenant_id = "fabrikam.onmicrosoft.com"
client_id = "ffffffff-bbbb-cccc-dddd-eeeeeeeeeeee"
client_secret = "fabrikam-Secret~0123456789abcdef"
"#,
    );
    if token {
        toml.push_str(&format!("[api]\ntoken = \"{TOKEN}\"\n"));
    }
    Settings::from_toml_str(&toml).expect("valid")
}

async fn mock_api(token: bool) -> (Api, MockServer, tempfile::TempDir) {
    let graph = MockServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::start(mock_settings(&graph, &dir, token).await).await;
    (api, graph, dir)
}

async fn alice_id(api: &Api) -> i64 {
    api.store
        .mailbox(TENANT, ALICE)
        .await
        .expect("store reads")
        .expect("Alice is seeded from the config")
        .id
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn the_api_token_is_validated_and_never_shown() {
    let base = base_config("http://127.0.0.1:9", "/tmp/unused.db");
    let with = |api: &str| Settings::from_toml_layers(&[&base, api]);
    let off = with("").expect("valid without [api]");
    assert!(off.api.token.is_none(), "no token: the API is disabled");

    let on = with(&format!("[api]\ntoken = \"{TOKEN}\"")).expect("valid");
    assert!(on.api.token.is_some());
    assert!(!format!("{on:?}").contains(TOKEN), "Debug shows no token");

    for (api, key) in [
        ("[api]\ntoken = \"short-token\"", "api.token"),
        ("[api]\ntoken = \"\"", "api.token"),
        (
            "[api]\ntoken = \"has a space in it 0123456789abcdefghij\"",
            "api.token",
        ),
        (
            "[api]\ntoken = \"0123456789abcdef0123456789abcdef\"\ntoken_file = \"/x\"",
            "api.token",
        ),
        (
            "[api]\ntoken_file = \"/nonexistent/calsync-token\"",
            "api.token_file",
        ),
        ("[api]\ntokn = \"0123456789abcdef0123456789abcdef\"", "api"),
    ] {
        let error = with(api).expect_err(api);
        assert!(error.key.starts_with(key), "{api}: {error}");
        assert!(
            !error.to_string().contains("0123456789abcdef0123"),
            "{error}"
        );
    }
    let error = with("[api]\ntoken = \"short-token\"").expect_err("short");
    assert!(error.message.contains("at least 32"), "{error}");
    assert!(!error.to_string().contains("short-token"), "{error}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("  {TOKEN}\n")).expect("write");
    let from_file = with(&format!("[api]\ntoken_file = \"{}\"", file.display())).expect("valid");
    assert!(from_file.api.token.is_some());

    let env = Settings::load_from(
        None,
        [("CALSYNC_API__TOKEN".to_string(), "tiny".to_string())],
    )
    .expect_err("too short from the environment");
    assert_eq!(env.key, "api.token");
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn requests_without_the_token_get_401_and_the_token_is_never_echoed() {
    let (api, _graph, _dir) = mock_api(true).await;
    let id = alice_id(&api).await;
    let routes = [
        (Method::GET, "/v1/mailboxes".to_string()),
        (Method::POST, "/v1/mailboxes".to_string()),
        (Method::GET, format!("/v1/mailboxes/{id}")),
        (Method::DELETE, format!("/v1/mailboxes/{id}")),
        (Method::POST, format!("/v1/mailboxes/{id}/sync")),
        (
            Method::GET,
            format!(
                "/v1/mailboxes/{id}/events?start=2026-01-01T00:00:00Z&end=2026-02-01T00:00:00Z"
            ),
        ),
    ];
    for (method, path) in &routes {
        let body = (*method == Method::POST).then(|| json!({"tenant": TENANT, "mailbox": ALICE}));
        let none = api.send(method.clone(), path, None, body.clone()).await;
        assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(none.code(), "unauthorized");
        assert_eq!(
            none.headers["www-authenticate"], r#"Bearer realm="calsync""#,
            "{method} {path}"
        );
        let wrong = api
            .send(method.clone(), path, Some(WRONG), body.clone())
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(
            wrong.headers["www-authenticate"],
            r#"Bearer realm="calsync", error="invalid_token""#
        );
        // A prefix of the token, the token with something after it, another scheme.
        for header in [
            format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
            format!("Bearer {TOKEN}x"),
            format!("Basic {TOKEN}"),
            TOKEN.to_string(),
        ] {
            let response = api
                .http
                .request(method.clone(), api.url(path))
                .header("authorization", header.clone())
                .send()
                .await
                .expect("answers");
            let reply = api.reply(response).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{header}");
        }
    }
    // Nothing was changed by the refused requests.
    let alice = api
        .store
        .mailbox_by_id(id)
        .await
        .expect("reads")
        .expect("still there");
    assert!(alice.sync_requested_at.is_none());

    // With the token: through. The scheme is case-insensitive.
    let ok = api.get(&format!("/v1/mailboxes/{id}")).await;
    assert_eq!(ok.status, StatusCode::OK, "{:#}", ok.body);
    assert_eq!(ok.headers["cache-control"], "no-store");
    let response = api
        .http
        .get(api.url(&format!("/v1/mailboxes/{id}")))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .expect("answers");
    assert_eq!(api.reply(response).await.status, StatusCode::OK);

    // The description needs no token.
    let doc = api.send(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(doc.status, StatusCode::OK);

    // Nor does the rest of calsync (unchanged by the API).
    let health = api.send(Method::GET, "/healthz", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    api.assert_token_never_seen();
    api.stop().await;
}

#[tokio::test]
async fn without_a_configured_token_the_api_answers_503_not_configured() {
    let (api, _graph, _dir) = mock_api(false).await;
    let id = alice_id(&api).await;
    for (method, path) in [
        (Method::GET, "/v1/mailboxes".to_string()),
        (Method::GET, format!("/v1/mailboxes/{id}")),
        (Method::POST, format!("/v1/mailboxes/{id}/sync")),
        (Method::DELETE, format!("/v1/mailboxes/{id}")),
    ] {
        for token in [None, Some(TOKEN)] {
            let reply = api.send(method.clone(), &path, token, None).await;
            assert_eq!(
                reply.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{method} {path}"
            );
            assert_eq!(reply.code(), "api_not_configured", "{:#}", reply.body);
        }
    }
    assert!(
        api.store.mailbox_by_id(id).await.expect("reads").is_some(),
        "nothing was removed"
    );
    let doc = api.send(Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(doc.status, StatusCode::OK);
    api.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Register, sync, status, events, remove: against the simulator, on SQLite and PostgreSQL

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_register_sync_read_events_and_remove() {
    register_sync_read_events_and_remove(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_register_sync_read_events_and_remove() {
    in_postgres_schema(|url| register_sync_read_events_and_remove(Some(url))).await;
}

/// The config names the simulator's tenants but no mailboxes: the API registers one, it syncs
/// at once, its events read through the API equal the store's and the simulator's ground
/// truth, and its removal takes it (and its events) away.
async fn register_sync_read_events_and_remove(store_url: Option<String>) {
    let config = world(1, 2, 40);
    let sim = start_sim(config.clone()).await;
    let (settings, _dir) = sim_settings(&sim, &config, |s| {
        fast(s);
        s.sync.job_deadline = Duration::from_secs(5);
        for tenant in &mut s.tenants {
            tenant.mailboxes.clear();
        }
        if let Some(url) = store_url {
            s.store.url = url;
        }
        s.api.token = Some(SecretString::from(TOKEN));
    });
    let tenant = sim.tenants()[0].name.clone();
    let mailbox = sim.tenants()[0].mailboxes[0].clone();
    let api = Api::start(settings).await;
    assert!(api.store.mailboxes().await.expect("reads").is_empty());

    let created = api.register(&tenant, &format!("  {mailbox} ")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:#}", created.body);
    let id = created.body["id"].as_i64().expect("a numeric id");
    assert_eq!(
        created.headers["location"],
        format!("/v1/mailboxes/{id}").as_str()
    );
    assert_eq!(created.body["tenant"], tenant.as_str());
    assert_eq!(created.body["mailbox"], mailbox.as_str(), "trimmed");
    assert_eq!(created.body["source"], "api");
    assert_eq!(created.body["enabled"], true);
    assert_eq!(created.body["status"]["state"], "never_synced");

    let again = api.register(&tenant, &mailbox).await;
    assert_eq!(again.status, StatusCode::OK, "idempotent: {:#}", again.body);
    assert_eq!(again.body["id"], id);

    // The running worker picks it up at once (it is due now).
    let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        let reply = api.get(&format!("/v1/mailboxes/{id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
        if reply.body["status"]["state"] == "ok" {
            break reply.body;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "not synced in time: {:#}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let s = &status["status"];
    assert!(s["last_success_at"].is_string(), "{status:#}");
    assert!(s["lag_seconds"].as_i64().is_some_and(|l| l >= 0));
    assert!(s["last_error"].is_null());
    assert_eq!(s["consecutive_failures"], 0);
    assert!(s["next_run_at"].is_string());
    assert_eq!(s["sync_requested"], false);
    assert!(s["running"].is_boolean());

    let list = api.get(&format!("/v1/mailboxes?tenant={tenant}")).await;
    assert_eq!(list.status, StatusCode::OK, "{:#}", list.body);
    assert_eq!(list.body["mailboxes"][0]["id"], id);
    assert!(list.body["next_after"].is_null());

    // Events over the whole synced window equal the store's, which equal ground truth.
    let record = api
        .store
        .mailbox_by_id(id)
        .await
        .expect("reads")
        .expect("there");
    let window = record.cursor.window.expect("a synced window");
    Truth {
        sim: &sim,
        store: &api.store,
    }
    .assert_matches_truth(&mailbox)
    .await;
    let events_path = |start: DateTime<Utc>, end: DateTime<Utc>, extra: &str| {
        let q = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        format!(
            "/v1/mailboxes/{id}/events?start={}&end={}{extra}",
            q(start),
            q(end)
        )
    };
    let all = api.get(&events_path(window.start, window.end, "")).await;
    assert_eq!(all.status, StatusCode::OK, "{:#}", all.body);
    let stored = api
        .store
        .events_between(id, window.start, window.end)
        .await
        .expect("reads");
    assert!(!stored.is_empty());
    let listed = all.body["events"].as_array().expect("events");
    assert_eq!(all.body["count"], stored.len());
    assert_eq!(all.body["truncated"], false);
    assert_eq!(listed.len(), stored.len());
    for (got, want) in listed.iter().zip(&stored) {
        assert_eq!(got["event_id"], want.id.as_str());
        assert_eq!(got["subject"], json!(want.subject));
        assert_eq!(got["change_key"], json!(want.change_key));
        assert_eq!(got["ical_uid"], json!(want.ical_uid));
        assert_eq!(
            at(got["start_utc"].as_str().expect("start")),
            want.start_utc
        );
        assert_eq!(at(got["end_utc"].as_str().expect("end")), want.end_utc);
        assert_eq!(got["is_all_day"], want.is_all_day);
        assert_eq!(got["is_cancelled"], want.is_cancelled);
        assert_eq!(got["show_as"], json!(want.show_as));
        assert_eq!(got["event_type"], json!(want.event_type));
        assert_eq!(got["organizer_address"], json!(want.organizer_address));
        let raw: Value = serde_json::from_str(&want.raw).expect("raw is JSON");
        assert_eq!(got["raw"], raw, "the event as Graph sent it");
        assert_eq!(got["organizer_name"], json!(want.organizer_name));
        assert_eq!(got["sensitivity"], json!(want.sensitivity));
        assert_eq!(got["attendees"], want.attendees.to_value());
        assert_eq!(got["categories"], json!(want.categories));
        if want.event_type.as_deref() == Some("occurrence") {
            // Graph sent a stub; the API serves the occurrence filled in from its series.
            assert!(raw.get("subject").is_none(), "raw is the stub: {raw}");
            assert!(got["subject"].is_string(), "hydrated: {got}");
            assert!(got["organizer_address"].is_string(), "hydrated: {got}");
        }
    }
    assert!(
        listed.iter().any(|e| e["event_type"] == "occurrence"),
        "the generated calendar has occurrences"
    );

    // A narrower range, with a `+01:00` offset (percent-encoded), and a limit.
    let (from, to) = (stored[0].start_utc, stored[stored.len() / 2].end_utc);
    let within = api.store.events_between(id, from, to).await.expect("reads");
    let offset = |t: DateTime<Utc>| {
        t.with_timezone(&chrono::FixedOffset::east_opt(3600).expect("offset"))
            .to_rfc3339()
            .replace('+', "%2B")
    };
    let reply = api
        .get(&format!(
            "/v1/mailboxes/{id}/events?end={}&start={}",
            offset(to),
            offset(from)
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
    let ids: Vec<&str> = reply.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_id"].as_str().expect("id"))
        .collect();
    let want: Vec<&str> = within.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, want);
    let one = api
        .get(&events_path(window.start, window.end, "&limit=1"))
        .await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(
        (one.body["count"].clone(), one.body["truncated"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(one.body["events"][0]["event_id"], stored[0].id.as_str());

    // Removal: 204, then the mailbox and its events are gone and every route says 404.
    let removed = api.delete(&format!("/v1/mailboxes/{id}")).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{:#}", removed.body);
    assert!(api.store.events(id).await.expect("reads").is_empty());
    for (method, path) in [
        (Method::GET, format!("/v1/mailboxes/{id}")),
        (Method::DELETE, format!("/v1/mailboxes/{id}")),
        (Method::POST, format!("/v1/mailboxes/{id}/sync")),
        (Method::GET, events_path(window.start, window.end, "")),
    ] {
        let reply = api.send(method.clone(), &path, Some(TOKEN), None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(reply.code(), "mailbox_not_found", "{:#}", reply.body);
    }
    api.assert_token_never_seen();
    api.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Sync requests go ahead of periodic work, once

/// One worker slot, every mailbox due again; the mailbox due last is asked for through the
/// API (twice: the second is deduplicated), and the next job the dispatcher starts is its.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_requested_sync_is_dispatched_before_periodic_work_and_deduplicated() {
    let app = crate::helpers::sim::sim_app(world(1, 4, 10), |s| {
        fast(s);
        s.sync.workers = 1;
        s.sync.interval = Duration::from_millis(1);
        s.api.token = Some(SecretString::from(TOKEN));
    })
    .await;
    app.pass_ok().await;

    // The service's API; its jobs are the test's: the test drives the dispatcher itself.
    let client = &app.http;
    let base = &app.internal;
    let request_sync = |id: i64| {
        client
            .post(format!("{base}/v1/mailboxes/{id}/sync"))
            .bearer_auth(TOKEN)
            .send()
    };

    tokio::time::sleep(Duration::from_millis(5)).await;
    let mailboxes = app.store.mailboxes().await.expect("reads");
    assert_eq!(mailboxes.len(), 4);
    assert!(
        mailboxes.iter().all(|m| m.next_run_at <= Utc::now()),
        "all due again"
    );
    let last = mailboxes
        .iter()
        .max_by_key(|m| (m.next_run_at, m.id))
        .expect("a mailbox");
    let first_due = mailboxes
        .iter()
        .min_by_key(|m| (m.next_run_at, m.id))
        .expect("a mailbox");
    assert_ne!(last.id, first_due.id);

    let reply = request_sync(last.id).await.expect("answers");
    assert_eq!(reply.status(), StatusCode::ACCEPTED);
    let body: Value = reply.json().await.expect("JSON");
    assert_eq!(
        (
            body["id"].clone(),
            body["queued"].clone(),
            body["already_queued"].clone()
        ),
        (json!(last.id), json!(true), json!(false)),
        "{body:#}"
    );
    assert!(body["requested_at"].is_string(), "{body:#}");
    let reply = request_sync(last.id).await.expect("answers");
    assert_eq!(reply.status(), StatusCode::ACCEPTED);
    let again: Value = reply.json().await.expect("JSON");
    assert_eq!(again["already_queued"], true, "deduplicated: {again:#}");
    assert_eq!(
        again["requested_at"], body["requested_at"],
        "the first request stands"
    );

    let status: Value = client
        .get(format!("{base}/v1/mailboxes/{}", last.id))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(status["status"]["sync_requested"], true, "{status:#}");

    let mut dispatcher = Dispatcher::new(app.worker.clone());
    assert_eq!(dispatcher.step().await, 1, "one slot");
    dispatcher.drain().await;
    let (_, first) = &dispatcher.finished[0];
    assert_eq!(
        first.mailbox, last.user_id,
        "the requested mailbox went first, ahead of {} due since {}",
        first_due.user_id, first_due.next_run_at
    );
    assert_eq!(
        first.outcome,
        calsync::store::RunOutcome::Ok,
        "{:?}",
        first.error
    );

    // Served once: the request is cleared, and the next job is periodic work.
    let served = app
        .store
        .mailbox_by_id(last.id)
        .await
        .expect("reads")
        .expect("there");
    assert!(served.sync_requested_at.is_none());
    assert!(served.last_success_at > last.last_success_at);
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(dispatcher.step().await, 1);
    dispatcher.drain().await;
    assert_ne!(
        dispatcher.finished[1].1.mailbox, last.user_id,
        "not served twice"
    );

    // A new request after the served one is queued anew.
    let reply = request_sync(last.id).await.expect("answers");
    let body: Value = reply.json().await.expect("JSON");
    assert_eq!(body["already_queued"], false, "{body:#}");
}

// ---------------------------------------------------------------------------------------------
// Bad requests

#[tokio::test]
async fn every_bad_request_is_a_400_naming_its_field_or_parameter() {
    let (api, _graph, _dir) = mock_api(true).await;
    let id = alice_id(&api).await;

    // Body members: (body, code, field).
    let long = format!("{}@contoso.com", "a".repeat(400));
    for (body, code, field) in [
        (json!({"mailbox": ALICE}), "missing_field", "tenant"),
        (
            json!({"tenant": null, "mailbox": ALICE}),
            "missing_field",
            "tenant",
        ),
        (
            json!({"tenant": 5, "mailbox": ALICE}),
            "invalid_field",
            "tenant",
        ),
        (json!({"tenant": TENANT}), "missing_field", "mailbox"),
        (
            json!({"tenant": TENANT, "mailbox": ["a"]}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": ""}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": "   "}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": "bob smith@contoso.com"}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": "../../admin"}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": "bob?x=1"}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": "bob\u{0}@contoso.com"}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": TENANT, "mailbox": long}),
            "invalid_field",
            "mailbox",
        ),
        (
            json!({"tenant": "northwind", "mailbox": ALICE}),
            "unknown_tenant",
            "tenant",
        ),
        (
            json!({"tenant": "CONTOSO", "mailbox": ALICE}),
            "unknown_tenant",
            "tenant",
        ),
        (
            json!({"tenant": TENANT, "mailbox": ALICE, "enabled": true}),
            "unknown_field",
            "enabled",
        ),
    ] {
        let reply = api.post("/v1/mailboxes", Some(body.clone())).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {:#}",
            reply.body
        );
        assert_eq!(reply.code(), code, "{body}: {:#}", reply.body);
        assert_eq!(
            reply.body["error"]["field"], field,
            "{body}: {:#}",
            reply.body
        );
        assert!(reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(field)));
    }
    for body in [json!([1, 2]), json!("alice"), json!(null)] {
        let reply = api.post("/v1/mailboxes", Some(body.clone())).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.code(), "invalid_json", "{body}");
    }
    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut request = api
            .http
            .post(api.url("/v1/mailboxes"))
            .bearer_auth(TOKEN)
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    let reply = api
        .reply(
            raw("{\"tenant\": \"contoso\",", Some("application/json"))
                .await
                .expect("answers"),
        )
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    let reply = api.reply(raw("{}", None).await.expect("answers")).await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let big = format!(
        r#"{{"tenant":"contoso","mailbox":"{}"}}"#,
        "a".repeat(64 * 1024)
    );
    let response = api
        .http
        .post(api.url("/v1/mailboxes"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("answers");
    let reply = api.reply(response).await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    // `{id}`: anything but a positive whole number, on every route that takes it.
    for bad in [
        "abc",
        "0",
        "-1",
        "1.5",
        "%20",
        "99999999999999999999",
        "1e3",
        "+7",
    ] {
        for (method, path) in [
            (Method::GET, format!("/v1/mailboxes/{bad}")),
            (Method::DELETE, format!("/v1/mailboxes/{bad}")),
            (Method::POST, format!("/v1/mailboxes/{bad}/sync")),
            (
                Method::GET,
                format!("/v1/mailboxes/{bad}/events?start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z"),
            ),
        ] {
            let reply = api.send(method.clone(), &path, Some(TOKEN), None).await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method} {path}");
            assert_eq!(reply.code(), "invalid_parameter", "{method} {path}");
            assert_eq!(reply.body["error"]["parameter"], "id", "{method} {path}");
        }
    }

    // Query parameters of the events: (query, code, parameter).
    for (query, code, parameter) in [
        ("end=2026-01-02T00:00:00Z", "missing_parameter", "start"),
        ("start=2026-01-01T00:00:00Z", "missing_parameter", "end"),
        (
            "start=yesterday&end=2026-01-02T00:00:00Z",
            "invalid_parameter",
            "start",
        ),
        (
            "start=2026-01-01&end=2026-01-02T00:00:00Z",
            "invalid_parameter",
            "start",
        ),
        (
            "start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00",
            "invalid_parameter",
            "end",
        ),
        // An unencoded `+` arrives as a space.
        (
            "start=2026-01-01T00:00:00+01:00&end=2026-01-02T00:00:00Z",
            "invalid_parameter",
            "start",
        ),
        (
            "start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z",
            "invalid_parameter",
            "end",
        ),
        (
            "start=2026-01-01T00:00:00Z&end=2026-01-01T00:00:00Z",
            "invalid_parameter",
            "end",
        ),
        (
            "start=2026-01-01T00:00:00Z&end=2027-01-03T00:00:00Z",
            "invalid_parameter",
            "end",
        ),
        (
            "start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z&limit=0",
            "invalid_parameter",
            "limit",
        ),
        (
            "start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z&limit=5001",
            "invalid_parameter",
            "limit",
        ),
        (
            "start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z&limit=ten",
            "invalid_parameter",
            "limit",
        ),
        (
            "start=2026-01-01T00:00:00Z&start=2026-01-01T01:00:00Z&end=2026-01-02T00:00:00Z",
            "invalid_parameter",
            "start",
        ),
    ] {
        let reply = api.get(&format!("/v1/mailboxes/{id}/events?{query}")).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{query}: {:#}",
            reply.body
        );
        assert_eq!(reply.code(), code, "{query}: {:#}", reply.body);
        assert_eq!(
            reply.body["error"]["parameter"], parameter,
            "{query}: {:#}",
            reply.body
        );
    }
    let reply = api
        .get(&format!(
            "/v1/mailboxes/{id}/events?from=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z"
        ))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::BAD_REQUEST, "unknown_parameter")
    );
    assert!(reply.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("`from`")));
    // Just under the longest span is fine.
    let reply = api
        .get(&format!(
            "/v1/mailboxes/{id}/events?start=2026-01-01T00:00:00Z&end=2027-01-02T00:00:00Z"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
    assert_eq!(reply.body["count"], 0);

    // The list's parameters.
    for (query, parameter) in [
        ("tenant=northwind", "tenant"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=first", "after"),
    ] {
        let reply = api.get(&format!("/v1/mailboxes?{query}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(
            reply.body["error"]["parameter"], parameter,
            "{query}: {:#}",
            reply.body
        );
    }

    // 404s: no such mailbox, no such route; 405 for a method a route does not take.
    for (method, path) in [
        (Method::GET, "/v1/mailboxes/424242".to_string()),
        (Method::DELETE, "/v1/mailboxes/424242".to_string()),
        (Method::POST, "/v1/mailboxes/424242/sync".to_string()),
        (
            Method::GET,
            "/v1/mailboxes/424242/events?start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z"
                .to_string(),
        ),
    ] {
        let reply = api.send(method.clone(), &path, Some(TOKEN), None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(reply.code(), "mailbox_not_found");
    }
    let reply = api.get("/v1/calendars").await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let reply = api
        .send(Method::PUT, "/v1/mailboxes", Some(TOKEN), None)
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );

    // A mailbox the config dropped: shown as disabled, takes no sync request (409), and
    // registering it again enables it.
    api.store
        .sync_config_mailboxes(&[], Utc::now())
        .await
        .expect("config reload without Alice");
    let reply = api.post(&format!("/v1/mailboxes/{id}/sync"), None).await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::CONFLICT, "mailbox_disabled")
    );
    let reply = api.get(&format!("/v1/mailboxes/{id}")).await;
    assert_eq!(reply.body["enabled"], false);
    assert_eq!(reply.body["status"]["state"], "disabled");
    let list = api.get("/v1/mailboxes").await;
    assert_eq!(
        list.body["mailboxes"],
        json!([]),
        "the list shows enabled mailboxes"
    );
    let reply = api.register(TENANT, ALICE).await;
    assert_eq!(reply.status, StatusCode::OK, "{:#}", reply.body);
    assert_eq!(
        (reply.body["id"].clone(), reply.body["enabled"].clone()),
        (json!(id), json!(true))
    );
    let reply = api.post(&format!("/v1/mailboxes/{id}/sync"), None).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:#}", reply.body);

    // The list pages by id.
    for n in 0..3 {
        let reply = api
            .register("fabrikam", &format!("user{n}@fabrikam.com"))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .get(&format!("/v1/mailboxes?limit=2&after={after}"))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{:#}", page.body);
        for m in page.body["mailboxes"].as_array().expect("mailboxes") {
            seen.push(m["mailbox"].as_str().expect("mailbox").to_string());
        }
        match page.body["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(
        seen,
        [
            ALICE,
            "user0@fabrikam.com",
            "user1@fabrikam.com",
            "user2@fabrikam.com"
        ]
    );
    let fabrikam = api.get("/v1/mailboxes?tenant=fabrikam").await;
    assert_eq!(fabrikam.body["mailboxes"].as_array().map(Vec::len), Some(3));

    api.assert_token_never_seen();
    api.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI description

/// The served description is the file in the repo, and it describes exactly the routes and
/// methods the router serves (found by asking the router: a method it does not route is a
/// 405), and every `$ref` in it resolves.
#[tokio::test]
async fn the_openapi_description_is_served_and_matches_the_router() {
    let (api, _graph, _dir) = mock_api(true).await;
    let file = std::fs::read_to_string(format!("{}/docs/openapi.json", env!("CARGO_MANIFEST_DIR")))
        .expect("docs/openapi.json");
    let response = api
        .http
        .get(api.url("/v1/openapi.json"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        response.text().await.expect("body"),
        file,
        "served as in the repo"
    );
    let doc: Value = serde_json::from_str(&file).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");

    let methods = ["get", "post", "put", "patch", "delete"];
    let described: BTreeMap<String, BTreeSet<String>> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let ops = methods
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| m.to_string())
                .collect();
            (path.clone(), ops)
        })
        .collect();
    let served_paths: BTreeSet<String> = admin::route_paths().into_iter().collect();
    assert_eq!(
        described.keys().cloned().collect::<BTreeSet<_>>(),
        served_paths,
        "the description's paths are the router's"
    );
    for path in &served_paths {
        let concrete = path.replace("{id}", "424242");
        let mut served = BTreeSet::new();
        for method in methods {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let reply = api.send(method.clone(), &concrete, Some(TOKEN), None).await;
            if reply.status != StatusCode::METHOD_NOT_ALLOWED {
                assert_ne!(reply.code(), "not_found", "{method} {concrete} is routed");
                served.insert(method.as_str().to_lowercase());
            }
        }
        assert_eq!(&served, &described[path], "methods of {path}");
    }

    // Every guarded operation documents 401; every `$ref` points at something.
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in &described[path] {
            let op = &item[method];
            let open = op.get("security").is_some_and(|s| s == &json!([]));
            assert_eq!(
                op["responses"].get("401").is_some(),
                !open,
                "{method} {path}: 401 documented iff the token is needed"
            );
            assert!(op["operationId"].is_string(), "{method} {path}");
        }
    }
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 10);
    for reference in refs {
        let pointer = reference.strip_prefix('#').expect("a local $ref");
        assert!(doc.pointer(pointer).is_some(), "{reference} resolves");
    }
    api.stop().await;
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}
