//! The simulator over real sockets with reqwest as the client.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use calsync::sim::{
    self, Endpoint, FaultKind, FaultRule, RetryAfter, SimConfig, SimHandle, GRAPH_SCOPE, JWT_BEARER,
};
use chrono::{DateTime, Utc};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const START: &str = "2020-01-01T00:00:00Z";
const END: &str = "2040-01-01T00:00:00Z";

struct TestSim {
    sim: SimHandle,
    http: Client,
}

async fn spawn_with(config: SimConfig) -> TestSim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim = sim::start(config, listener).await.expect("start");
    let http = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    TestSim { sim, http }
}

async fn spawn() -> TestSim {
    spawn_with(SimConfig::generated(2, 2, 37, 42)).await
}

impl TestSim {
    fn mailbox(&self, tenant: usize, n: usize) -> String {
        self.sim.tenants()[tenant].mailboxes[n].clone()
    }

    async fn token_request(&self, tenant: usize, form: &[(&str, &str)]) -> reqwest::Response {
        let t = &self.sim.tenants()[tenant];
        self.http
            .post(self.sim.token_url(&t.tenant_id))
            .form(form)
            .send()
            .await
            .expect("token request")
    }

    async fn token(&self, tenant: usize) -> String {
        let t = self.sim.tenants()[tenant].clone();
        let resp = self
            .token_request(
                tenant,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", &t.client_id),
                    ("client_secret", &t.client_secret),
                    ("scope", GRAPH_SCOPE),
                ],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_string()
    }

    fn delta_url(&self, mailbox: &str) -> String {
        format!(
            "{}/users/{mailbox}/calendarView/delta?startDateTime={START}&endDateTime={END}",
            self.sim.graph_base_url()
        )
    }

    async fn get(&self, url: &str, token: &str, page: usize) -> reqwest::Response {
        self.http
            .get(url)
            .bearer_auth(token)
            .header("Prefer", format!("odata.maxpagesize={page}"))
            .send()
            .await
            .expect("graph request")
    }

    /// Follows nextLinks to the deltaLink, returning every page body.
    async fn round(&self, url: &str, token: &str, page: usize) -> (Vec<Value>, String) {
        let mut pages = Vec::new();
        let mut url = url.to_string();
        for _ in 0..1000 {
            let resp = self.get(&url, token, page).await;
            assert_eq!(resp.status(), StatusCode::OK, "url {url}");
            let body: Value = resp.json().await.expect("json page");
            pages.push(body.clone());
            if let Some(next) = body["@odata.nextLink"].as_str() {
                assert!(body.get("@odata.deltaLink").is_none());
                url = next.to_string();
            } else {
                let delta = body["@odata.deltaLink"].as_str().expect("deltaLink");
                return (pages, delta.to_string());
            }
        }
        panic!("round did not end");
    }
}

fn items(pages: &[Value]) -> Vec<Value> {
    pages
        .iter()
        .flat_map(|p| p["value"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The calendar entries of delta items: everything but series masters.
fn instances(values: &[Value]) -> Vec<Value> {
    values
        .iter()
        .filter(|v| v["type"] != "seriesMaster")
        .cloned()
        .collect()
}

/// An event as calendarView delta sends it: an occurrence as the seven-property stub real
/// Graph sends, anything else in full.
fn as_sent_in_delta(event: &Value) -> Value {
    if event["type"] != "occurrence" {
        return event.clone();
    }
    let keys = [
        "@odata.type",
        "@odata.etag",
        "id",
        "seriesMasterId",
        "type",
        "start",
        "end",
    ];
    Value::Object(
        keys.iter()
            .map(|k| (k.to_string(), event[*k].clone()))
            .collect(),
    )
}

fn ids(values: &[Value]) -> HashSet<String> {
    values
        .iter()
        .map(|v| v["id"].as_str().expect("id").to_string())
        .collect()
}

fn window() -> (DateTime<Utc>, DateTime<Utc>) {
    (START.parse().expect("start"), END.parse().expect("end"))
}

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("error json");
    body["error"]["code"].as_str().expect("code").to_string()
}

#[tokio::test]
async fn token_success_has_the_identity_platform_fields() {
    let t = spawn().await;
    let tenant = t.sim.tenants()[0].clone();
    // The tenant may be named by id or by name.
    for key in [&tenant.tenant_id, &tenant.name] {
        let resp = t
            .http
            .post(t.sim.token_url(key))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", tenant.client_id.as_str()),
                ("client_secret", tenant.client_secret.as_str()),
                ("scope", GRAPH_SCOPE),
            ])
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3599);
        assert_eq!(body["ext_expires_in"], 3599);
        let token = body["access_token"].as_str().expect("access_token");
        assert_eq!(token.split('.').count(), 3, "looks like a JWT");
    }
    assert_eq!(t.sim.stats().tenants["tenant1"].token_by_status[&200], 2);
}

#[tokio::test]
async fn token_errors_use_identity_platform_shape() {
    let t = spawn().await;
    let a = t.sim.tenants()[0].clone();
    let b = t.sim.tenants()[1].clone();
    // (tenant, form, status, error, AADSTS code)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str, u64);
    let cases: Vec<Case> = vec![
        (
            a.tenant_id.clone(),
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &a.client_id),
                ("client_secret", "wrong"),
                ("scope", GRAPH_SCOPE),
            ],
            401,
            "invalid_client",
            7000215,
        ),
        (
            a.tenant_id.clone(),
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &b.client_id),
                ("client_secret", &b.client_secret),
                ("scope", GRAPH_SCOPE),
            ],
            400,
            "unauthorized_client",
            700016,
        ),
        (
            "00000000-0000-0000-0000-000000000000".into(),
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &a.client_id),
                ("client_secret", &a.client_secret),
                ("scope", GRAPH_SCOPE),
            ],
            400,
            "invalid_request",
            90002,
        ),
        (
            a.tenant_id.clone(),
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &a.client_id),
                ("client_secret", &a.client_secret),
                ("scope", "https://graph.microsoft.com/Calendars.Read"),
            ],
            400,
            "invalid_scope",
            70011,
        ),
        (
            // Neither a secret nor an assertion.
            a.tenant_id.clone(),
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &a.client_id),
                ("scope", GRAPH_SCOPE),
            ],
            401,
            "invalid_client",
            7000216,
        ),
    ];
    for (tenant, form, status, error, code) in cases {
        let resp = t
            .http
            .post(t.sim.token_url(&tenant))
            .header("client-request-id", "corr-1")
            .form(&form)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), status, "{error}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"], error);
        assert_eq!(body["error_codes"], json!([code]));
        assert!(body["error_description"]
            .as_str()
            .expect("description")
            .starts_with(&format!("AADSTS{code}: ")));
        for field in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
            assert!(body[field].is_string(), "{field} missing for {error}");
        }
        assert_eq!(body["correlation_id"], "corr-1");
    }
}

#[tokio::test]
async fn bearer_checks_missing_garbled_expired_and_wrong_tenant() {
    let t = spawn().await;
    let url = t.delta_url(&t.mailbox(0, 0));
    let missing = t.http.get(&url).send().await.expect("send");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(missing).await, "InvalidAuthenticationToken");

    let garbled = t.get(&url, "not-a-token", 10).await;
    assert_eq!(garbled.status(), StatusCode::UNAUTHORIZED);

    let token_b = t.token(1).await;
    let wrong = t.get(&url, &token_b, 10).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(wrong).await, "InvalidAuthenticationToken");
    let v = t.sim.stats().violations.wrong_tenant;
    assert_eq!(v.count, 1);
    assert_eq!(v.examples[0]["token_tenant"], "tenant2");

    let token = t.token(0).await;
    assert_eq!(t.get(&url, &token, 10).await.status(), StatusCode::OK);
    t.sim.advance_clock(Duration::from_secs(3600));
    let expired = t.get(&url, &token, 10).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    assert!(expired.headers().contains_key("www-authenticate"));
    assert_eq!(error_code(expired).await, "InvalidAuthenticationToken");
}

#[tokio::test]
async fn initial_round_pages_through_the_window_and_matches_truth() {
    let t = spawn().await;
    let mailbox = t.mailbox(0, 1);
    let token = t.token(0).await;
    let first = t
        .http
        .get(t.delta_url(&mailbox))
        .bearer_auth(&token)
        .header("Prefer", "odata.maxpagesize=10")
        .header("client-request-id", "abc-123")
        .send()
        .await
        .expect("send");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.headers()["preference-applied"],
        "odata.track-changes, odata.maxpagesize=10"
    );
    assert_eq!(first.headers()["client-request-id"], "abc-123");
    assert!(first.headers().contains_key("request-id"));
    let body: Value = first.json().await.expect("json");
    assert!(body["@odata.context"].is_string());
    let next = body["@odata.nextLink"].as_str().expect("nextLink");
    assert!(next.starts_with(&format!("{}/users/", t.sim.graph_base_url())));
    assert!(next.contains("$skiptoken="));

    let (pages, delta) = t.round(&t.delta_url(&mailbox), &token, 10).await;
    assert!(pages.len() >= 4, "37 events over pages of 10");
    assert!(pages
        .iter()
        .all(|p| p["value"].as_array().map_or(0, Vec::len) <= 10));
    assert!(delta.contains("$deltatoken="));
    let all = items(&pages);
    let got = instances(&all);
    let truth = t.sim.truth(&mailbox, Some(window()));
    assert_eq!(got.len(), truth.len(), "no duplicates, nothing missing");
    let by_id: HashMap<&str, &Value> = got
        .iter()
        .map(|v| (v["id"].as_str().expect("id"), v))
        .collect();
    for e in &truth {
        assert_eq!(
            by_id.get(e["id"].as_str().expect("id")).copied(),
            Some(&as_sent_in_delta(e)),
            "the truth's JSON, an occurrence as a stub"
        );
    }
    // Each series with an instance in the window is listed once, as its master in full.
    let masters: Vec<&Value> = all.iter().filter(|v| v["type"] == "seriesMaster").collect();
    let series: HashSet<&str> = truth
        .iter()
        .filter_map(|e| e["seriesMasterId"].as_str())
        .collect();
    assert!(!series.is_empty(), "the world has recurring series");
    assert_eq!(masters.len(), series.len());
    for master in &masters {
        assert!(series.contains(master["id"].as_str().expect("id")));
        assert!(master["subject"].is_string() && master["recurrence"].is_object());
    }
    // Shape of the generated events.
    let e = &truth[0];
    assert!(e["id"].as_str().expect("id").starts_with("AAMk"));
    assert_eq!(
        e["@odata.etag"],
        format!("W/\"{}\"", e["changeKey"].as_str().expect("ck"))
    );
    assert_eq!(e["start"]["timeZone"], "UTC");
    assert_eq!(e["start"]["dateTime"].as_str().expect("dt").len(), 27);

    // The HTTP truth endpoint agrees.
    let http_truth: Value = t
        .http
        .get(format!(
            "{}/_sim/truth/{mailbox}?startDateTime={START}&endDateTime={END}",
            t.sim.authority()
        ))
        .send()
        .await
        .expect("truth")
        .json()
        .await
        .expect("json");
    assert_eq!(http_truth["value"], json!(truth));

    // Nothing changed: the next round is empty.
    let (pages, _) = t.round(&delta, &token, 10).await;
    assert!(items(&pages).is_empty());
}

#[tokio::test]
async fn incremental_round_returns_exactly_the_mutations() {
    let t = spawn().await;
    let mailbox = t.mailbox(1, 0);
    let token = t.token(1).await;
    let (pages, delta) = t.round(&t.delta_url(&mailbox), &token, 25).await;
    let mut local: HashMap<String, Value> = instances(&items(&pages))
        .into_iter()
        .map(|v| (v["id"].as_str().expect("id").to_string(), v))
        .collect();
    let before: HashMap<String, Value> = t
        .sim
        .truth(&mailbox, None)
        .into_iter()
        .map(|v| (v["id"].as_str().expect("id").to_string(), v))
        .collect();

    t.sim.mutate_now(&mailbox, 12);
    let after: HashMap<String, Value> = t
        .sim
        .truth(&mailbox, None)
        .into_iter()
        .map(|v| (v["id"].as_str().expect("id").to_string(), v))
        .collect();
    let changed: HashSet<String> = before
        .keys()
        .chain(after.keys())
        .filter(|id| before.get(*id) != after.get(*id))
        .cloned()
        .collect();
    assert!(!changed.is_empty());

    let (pages, delta2) = t.round(&delta, &token, 5).await;
    let inc = items(&pages);
    let reported = ids(&inc);
    assert!(reported.is_superset(&changed), "every change is reported");
    for extra in reported.difference(&changed) {
        // Only an event created and deleted again between the two rounds, or the master of a
        // changed or deleted series, may add to the set.
        let item = inc
            .iter()
            .find(|i| i["id"] == extra.as_str())
            .expect("item");
        assert!(
            item["type"] == "seriesMaster"
                || (item.get("@removed").is_some() && !before.contains_key(extra))
        );
    }
    for item in &inc {
        let id = item["id"].as_str().expect("id");
        if item.get("@removed").is_some() {
            assert_eq!(item["@removed"]["reason"], "deleted");
            assert_eq!(item["@odata.type"], "#microsoft.graph.event");
            local.remove(id);
        } else if item["type"] != "seriesMaster" {
            let current = after.get(id).map(as_sent_in_delta);
            assert_eq!(Some(item), current.as_ref(), "the current representation");
            local.insert(id.to_string(), item.clone());
        }
    }
    let truth = t.sim.truth(&mailbox, Some(window()));
    assert_eq!(ids(&local.into_values().collect::<Vec<_>>()), ids(&truth));

    let (pages, _) = t.round(&delta2, &token, 5).await;
    assert!(
        items(&pages).is_empty(),
        "no changes since the newest deltaLink"
    );
    // The old deltaLink is still valid and still yields the same changes.
    let (pages, _) = t.round(&delta, &token, 50).await;
    assert_eq!(ids(&items(&pages)), reported);
}

#[tokio::test]
async fn moved_out_of_window_is_reported_removed_and_old_tokens_expire() {
    let t = spawn().await;
    let mailbox = t.mailbox(0, 0);
    let token = t.token(0).await;
    let (_, delta) = t.round(&t.delta_url(&mailbox), &token, 100).await;
    let victim = t.sim.truth(&mailbox, Some(window()))[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(t.sim.move_event(
        &mailbox,
        &victim,
        "2050-01-01T09:00:00Z".parse().expect("dt")
    ));
    let (pages, delta2) = t.round(&delta, &token, 100).await;
    assert_eq!(
        items(&pages),
        vec![
            json!({"@odata.type": "#microsoft.graph.event", "id": victim, "@removed": {"reason": "deleted"}})
        ]
    );

    // A token signed by someone else is state this server does not have.
    let forged = format!("{}x", delta2);
    let resp = t.get(&forged, &token, 10).await;
    assert_eq!(resp.status(), StatusCode::GONE);

    t.sim.advance_clock(Duration::from_secs(7 * 24 * 3600 + 60));
    let token = t.token(0).await;
    let resp = t.get(&delta2, &token, 10).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert_eq!(error_code(resp).await, "SyncStateNotFound");
}

#[tokio::test]
async fn stale_skiptoken_is_gone_too() {
    let t = spawn().await;
    let mailbox = t.mailbox(0, 0);
    let token = t.token(0).await;
    let body: Value = t
        .get(&t.delta_url(&mailbox), &token, 5)
        .await
        .json()
        .await
        .expect("json");
    let next = body["@odata.nextLink"].as_str().expect("next").to_string();
    t.sim.advance_clock(Duration::from_secs(8 * 24 * 3600));
    let token = t.token(0).await;
    let resp = t.get(&next, &token, 5).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert_eq!(error_code(resp).await, "SyncStateNotFound");
}

#[tokio::test]
async fn sdk_url_forms_are_accepted() {
    let t = spawn().await;
    let mailbox = t.mailbox(0, 1);
    let token = t.token(0).await;
    let encoded = mailbox.replace('@', "%40");
    let base = t.sim.graph_base_url();
    let window = format!("startDateTime={START}&endDateTime={END}");
    let expected = ids(&t.sim.truth(&mailbox, Some(self::window())));
    for url in [
        format!("{base}/users/{encoded}/calendarView/delta()?{window}"),
        format!("{base}/users/{encoded}/calendarView/delta?{window}"),
        format!("{base}/users/{mailbox}/calendarView/delta()?{window}"),
        format!("{base}/users/{encoded}/calendars/AAMkAGI2calendar=/calendarView/delta()?{window}"),
    ] {
        let (pages, delta) = t.round(&url, &token, 9).await;
        assert_eq!(ids(&instances(&items(&pages))), expected, "{url}");
        let path = url.split('?').next().expect("path");
        assert!(
            delta.starts_with(path),
            "links replay the form used: {delta}"
        );
    }
    let resp = t
        .get(
            &format!("{base}/users/{encoded}/calendarView/delta"),
            &token,
            9,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "ErrorInvalidParameter");
    assert!(body["error"]["innerError"]["request-id"].is_string());
    assert!(body["error"]["innerError"]["date"].is_string());
}

#[tokio::test]
async fn faults_are_scoped_by_tenant_mailbox_and_endpoint() {
    let t = spawn().await;
    let token_a = t.token(0).await;
    let a = t.sim.tenants()[0].name.clone();
    t.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 503,
            graph_code: None,
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .tenant(a)
        .endpoint(Endpoint::Token),
    );
    let x = t.mailbox(0, 0);
    let y = t.mailbox(0, 1);
    t.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 504,
            graph_code: None,
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .mailbox(&x)
        .endpoint(Endpoint::Graph),
    );
    // Tenant A's token endpoint fails with the identity-platform shape...
    let tenant = t.sim.tenants()[0].clone();
    let resp = t
        .token_request(
            0,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &tenant.client_id),
                ("client_secret", &tenant.client_secret),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(body["error_codes"].is_array());
    // ...tenant B's does not.
    t.token(1).await;
    // Mailbox X's Graph calls fail, Y's do not.
    let resp = t.get(&t.delta_url(&x), &token_a, 10).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(resp).await, "UnknownError");
    assert_eq!(
        t.get(&t.delta_url(&y), &token_a, 10).await.status(),
        StatusCode::OK
    );

    t.sim.clear_faults();
    assert_eq!(
        t.get(&t.delta_url(&x), &token_a, 10).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn fault_probability_and_time_span() {
    let t = spawn().await;
    let token = t.token(0).await;
    let url = t.delta_url(&t.mailbox(0, 0));
    let id = t.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 500,
            graph_code: None,
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .probability(0.5),
    );
    let mut failures = 0;
    for _ in 0..60 {
        if t.get(&url, &token, 1).await.status() == StatusCode::INTERNAL_SERVER_ERROR {
            failures += 1;
        }
    }
    assert!((15..=45).contains(&failures), "failures {failures}");
    assert_eq!(t.sim.stats().faults_fired[&id], failures);
    t.sim.clear_faults();

    // Active from 2 s after it was added, for 2 s: each request below has about 2 s to land in
    // its phase, so a loaded machine does not move it into the next one.
    t.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 502,
            graph_code: None,
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .window_ms(2_000, Some(2_000)),
    );
    let added = Instant::now();
    assert_eq!(t.get(&url, &token, 1).await.status(), StatusCode::OK);
    assert!(
        added.elapsed() < Duration::from_secs(2),
        "the first request was before the window"
    );
    tokio::time::sleep_until((added + Duration::from_millis(2_050)).into()).await;
    assert_eq!(
        t.get(&url, &token, 1).await.status(),
        StatusCode::BAD_GATEWAY
    );
    tokio::time::sleep_until((added + Duration::from_millis(4_050)).into()).await;
    assert_eq!(t.get(&url, &token, 1).await.status(), StatusCode::OK);
}

fn chain_has_reset(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionReset {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[tokio::test]
async fn reset_is_a_real_tcp_reset() {
    let t = spawn().await;
    let token = t.token(0).await;
    t.sim.add_fault(
        FaultRule::new(FaultKind::Reset)
            .endpoint(Endpoint::Graph)
            .max_count(1),
    );
    let err = t
        .http
        .get(t.delta_url(&t.mailbox(0, 0)))
        .bearer_auth(&token)
        .send()
        .await
        .expect_err("connection must fail");
    assert!(!err.is_timeout());
    assert!(chain_has_reset(&err), "expected ECONNRESET, got {err:?}");
    // max_count 1: the next request goes through.
    let ok = t.get(&t.delta_url(&t.mailbox(0, 0)), &token, 5).await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn hang_never_answers() {
    let t = spawn().await;
    t.sim
        .add_fault(FaultRule::new(FaultKind::Hang).endpoint(Endpoint::Token));
    let tenant = t.sim.tenants()[0].clone();
    let started = Instant::now();
    let err = t
        .http
        .post(t.sim.token_url(&tenant.tenant_id))
        .timeout(Duration::from_millis(400))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect_err("must time out");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The hung request reached the simulator (it was read, not refused).
    assert_eq!(t.sim.stats().tenants["tenant1"].token_by_status[&0], 1);
}

#[tokio::test]
async fn trickle_sends_the_body_slowly() {
    let t = spawn().await;
    t.sim.add_fault(
        FaultRule::new(FaultKind::Trickle {
            bytes_per_second: 1000,
        })
        .endpoint(Endpoint::Token),
    );
    let tenant = t.sim.tenants()[0].clone();
    let started = Instant::now();
    let mut resp = t
        .token_request(
            0,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &tenant.client_id),
                ("client_secret", &tenant.client_secret),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = Vec::new();
    let mut chunks = 0;
    while let Some(c) = resp.chunk().await.expect("chunk") {
        chunks += 1;
        body.extend_from_slice(&c);
    }
    let elapsed = started.elapsed();
    // 1000 B/s in 10-byte steps: a ~500-byte body takes about half a second.
    let min = Duration::from_millis((body.len() as u64 / 10 - 1) * 10);
    assert!(elapsed >= min, "{elapsed:?} for {} bytes", body.len());
    assert!(chunks > 10, "{chunks} chunks");
    let v: Value = serde_json::from_slice(&body).expect("intact body");
    assert!(v["access_token"].is_string());
}

#[tokio::test]
async fn concurrency_limit_and_early_retry_are_enforced_and_counted() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    t.sim.add_fault(
        FaultRule::new(FaultKind::Latency { ms: 500 })
            .mailbox(&mailbox)
            .endpoint(Endpoint::Graph),
    );
    let url = t.delta_url(&mailbox);
    let reqs = (0..6).map(|_| {
        let http = t.http.clone();
        let url = url.clone();
        let token = token.clone();
        async move {
            let r = http
                .get(url)
                .bearer_auth(token)
                .header("client-request-id", "crid-7")
                .send()
                .await
                .expect("send");
            let header = |name: &str| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let ids = (header("request-id"), header("client-request-id"));
            let ra = header("retry-after");
            (r.status(), ra, r.text().await.expect("body"), ids)
        }
    });
    let results = futures_util::future::join_all(reqs).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    let throttled: Vec<_> = results
        .iter()
        .filter(|r| r.0 == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!((ok, throttled.len()), (4, 2), "{results:?}");
    for (_, ra, body, (request_id, client_request_id)) in &throttled {
        assert_eq!(ra.as_deref(), Some("1"));
        // The body users report (magodo/terraform-provider-outlook#21): no innerError.
        let v: Value = serde_json::from_str(body).expect("json");
        assert_eq!(
            v,
            json!({"error": {"code": "ApplicationThrottled",
                             "message": "Application is over its MailboxConcurrency limit."}})
        );
        assert!(request_id.is_some(), "request-id header");
        assert_eq!(client_request_id.as_deref(), Some("crid-7"));
    }
    let stats = t.sim.stats();
    assert_eq!(stats.violations.over_concurrency.count, 2);
    assert!(stats.mailboxes[&mailbox].max_in_flight >= 5);
    assert_eq!(stats.violations.early_retry.count, 0);

    // Retry-After was 1 s; retrying at once is throttled again and counted.
    t.sim.clear_faults();
    let again = t.get(&url, &token, 10).await;
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(again.headers().contains_key("retry-after"));
    assert_eq!(t.sim.stats().violations.early_retry.count, 1);
    // Another mailbox is unaffected.
    let other = t.get(&t.delta_url(&t.mailbox(0, 1)), &token, 10).await;
    assert_eq!(other.status(), StatusCode::OK);
}

#[tokio::test]
async fn retry_after_forms_and_window_limit() {
    let mut config = SimConfig::generated(1, 3, 5, 9);
    config.mailbox_requests_per_window = 3;
    config.mailbox_window = Duration::from_secs(120);
    let t = spawn_with(config).await;
    let token = t.token(0).await;
    let m0 = t.mailbox(0, 0);
    let m1 = t.mailbox(0, 1);
    let m2 = t.mailbox(0, 2);
    let status_429 = |ra| FaultKind::Status {
        code: 429,
        graph_code: None,
        message: None,
        aadsts: None,
        retry_after: ra,
    };
    t.sim.add_fault(
        FaultRule::new(status_429(RetryAfter::HttpDate(30)))
            .mailbox(&m0)
            .max_count(1),
    );
    t.sim.add_fault(
        FaultRule::new(status_429(RetryAfter::None))
            .mailbox(&m1)
            .max_count(1),
    );
    let r = t.get(&t.delta_url(&m0), &token, 10).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let date = r.headers()["retry-after"].to_str().expect("ascii");
    let at = DateTime::parse_from_rfc2822(&date.replace("GMT", "+0000")).expect("HTTP-date");
    assert!((at.with_timezone(&Utc) - Utc::now()).num_seconds() > 20);
    // No Retry-After: no early-retry rule either.
    let r = t.get(&t.delta_url(&m1), &token, 10).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(!r.headers().contains_key("retry-after"));
    assert_eq!(
        t.get(&t.delta_url(&m1), &token, 10).await.status(),
        StatusCode::OK
    );
    // The date form is honoured by the early-retry rule.
    assert_eq!(
        t.get(&t.delta_url(&m0), &token, 10).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(t.sim.stats().violations.early_retry.count, 1);

    // Three requests per window, then 429 with the rest of the window as Retry-After.
    for _ in 0..3 {
        assert_eq!(
            t.get(&t.delta_url(&m2), &token, 10).await.status(),
            StatusCode::OK
        );
    }
    let r = t.get(&t.delta_url(&m2), &token, 10).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((100..=120).contains(&secs), "{secs}");
}

#[tokio::test]
async fn delta_shape_faults() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let expected = ids(&t.sim.truth(&mailbox, Some(window())));

    // Empty pages with nextLinks first, then the real round.
    let id = t
        .sim
        .add_fault(FaultRule::new(FaultKind::EmptyPages { n: 3 }).mailbox(&mailbox));
    let (pages, _) = t.round(&t.delta_url(&mailbox), &token, 10).await;
    for p in &pages[..3] {
        assert_eq!(p["value"], json!([]));
        assert!(p["@odata.nextLink"].is_string());
    }
    assert_eq!(ids(&instances(&items(&pages))), expected);
    t.sim.remove_fault(id);

    // Oversized pages: more than maxpagesize.
    let id = t
        .sim
        .add_fault(FaultRule::new(FaultKind::OversizedPage).mailbox(&mailbox));
    let (pages, _) = t.round(&t.delta_url(&mailbox), &token, 5).await;
    assert!(pages[0]["value"].as_array().map_or(0, Vec::len) > 5);
    assert_eq!(ids(&instances(&items(&pages))), expected);
    t.sim.remove_fault(id);

    // Duplicates within a round.
    let id = t
        .sim
        .add_fault(FaultRule::new(FaultKind::Duplicates).mailbox(&mailbox));
    let (pages, _) = t.round(&t.delta_url(&mailbox), &token, 10).await;
    let all = instances(&items(&pages));
    assert!(all.len() > expected.len());
    assert_eq!(ids(&all), expected);
    t.sim.remove_fault(id);

    // A nextLink loop: identical pages, new links, no end.
    t.sim.add_fault(
        FaultRule::new(FaultKind::NextLinkLoop)
            .mailbox(&mailbox)
            .max_count(1),
    );
    let mut url = t.delta_url(&mailbox);
    let mut seen_links = HashSet::new();
    let mut first_page = None;
    for _ in 0..6 {
        let body: Value = t.get(&url, &token, 10).await.json().await.expect("json");
        let page = body["value"].clone();
        assert_eq!(first_page.get_or_insert(page.clone()), &page);
        let next = body["@odata.nextLink"].as_str().expect("loop continues");
        assert!(seen_links.insert(next.to_string()), "links differ");
        url = next.to_string();
    }
}

#[tokio::test]
async fn body_faults_break_the_json() {
    let t = spawn().await;
    let token = t.token(0).await;
    let url = t.delta_url(&t.mailbox(0, 0));
    for kind in [FaultKind::MalformedJson, FaultKind::TruncatedJson] {
        let id = t
            .sim
            .add_fault(FaultRule::new(kind.clone()).endpoint(Endpoint::Graph));
        let r = t.get(&url, &token, 10).await;
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.expect("body");
        assert!(
            text.starts_with("{\"@odata.context\""),
            "{kind:?} looks like a page"
        );
        assert!(
            serde_json::from_str::<Value>(&text).is_err(),
            "{kind:?} must not parse"
        );
        t.sim.remove_fault(id);
    }
    t.sim.add_fault(
        FaultRule::new(FaultKind::Oversized { bytes: 3_000_000 }).endpoint(Endpoint::Graph),
    );
    let body = t.get(&url, &token, 10).await.bytes().await.expect("body");
    assert!(body.len() >= 3_000_000);
    let v: Value = serde_json::from_slice(&body).expect("still valid JSON");
    assert!(v["value"].is_array());
}

#[tokio::test]
async fn control_api_over_http() {
    let t = spawn().await;
    let base = t.sim.authority();
    let rule = json!({"tenant": "tenant2", "endpoint": "token",
                      "kind": {"type": "status", "code": 401, "graph_code": "invalid_client", "aadsts": 7000222}});
    let r = t
        .http
        .post(format!("{base}/_sim/faults"))
        .json(&rule)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::CREATED);
    let listed: Value = t
        .http
        .get(format!("{base}/_sim/faults"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["value"][0]["kind"]["aadsts"], 7000222);
    let tenant = t.sim.tenants()[1].clone();
    let resp = t
        .token_request(
            1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &tenant.client_id),
                ("client_secret", &tenant.client_secret),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000222]));

    let bad = t
        .http
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"probability": 3, "kind": {"type": "hang"}}))
        .send()
        .await
        .expect("post");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let del = t
        .http
        .delete(format!("{base}/_sim/faults"))
        .send()
        .await
        .expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    t.token(1).await;

    let stats: Value = t
        .http
        .get(format!("{base}/_sim/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["tenants"]["tenant2"]["token_by_status"]["401"], 1);
    assert_eq!(stats["tenants"]["tenant2"]["token_by_status"]["200"], 1);
    assert_eq!(stats["violations"]["early_retry"]["count"], 0);
    assert_eq!(stats["mailboxes"][t.mailbox(0, 0)]["events"], 37);
}

#[tokio::test]
async fn scenario_file_is_a_timeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outage.toml");
    std::fs::write(
        &path,
        r#"
[[faults]]
tenant = "tenant1"
endpoint = "token"
after_ms = 2000
for_ms = 10000
kind = { type = "status", code = 503 }
"#,
    )
    .expect("write");
    let rules = sim::load_scenario(&path).expect("scenario");
    let t = spawn().await;
    let started = Instant::now();
    t.sim.add_faults(rules);
    t.token(0).await;
    // 2 s before the outage: room for a loaded machine, not a race.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first token was before the outage"
    );
    tokio::time::sleep_until((started + Duration::from_millis(2_050)).into()).await;
    let tenant = t.sim.tenants()[0].clone();
    let r = t
        .token_request(
            0,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &tenant.client_id),
                ("client_secret", &tenant.client_secret),
                ("scope", GRAPH_SCOPE),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    t.token(1).await;
}

#[tokio::test]
async fn background_mutations_follow_the_rate() {
    let mut config = SimConfig::generated(1, 2, 5, 3);
    config.mutations_per_second = 0.0;
    let t = spawn_with(config).await;
    assert_eq!(t.sim.stats().mutations_applied, 0);
    t.sim.set_mutations(200.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.sim.stats().mutations_applied < 20 {
        assert!(Instant::now() < deadline, "mutation stream stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.sim.set_mutations(0.0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let paused = t.sim.stats().mutations_applied;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.sim.stats().mutations_applied, paused);
    t.sim.shutdown().await;
}

// --- client assertions (certificate credentials) ---

const TEST_KEY: &str = include_str!("../../fixtures/sim/sim_test_key.pem");
const TEST_CERT: &str = include_str!("../../fixtures/sim/sim_test_cert.pem");

/// An RS256 assertion naming no certificate (no `x5t`), signed by the tenant's key.
fn signed_assertion(client_id: &str, aud: &str) -> String {
    sign_assertion(
        &json!({"alg": "RS256", "typ": "JWT"}),
        client_id,
        aud,
        TEST_KEY,
    )
}

/// A client-credentials token request that authenticates with `assertion` instead of a secret.
async fn request_token_with_assertion(
    http: &reqwest::Client,
    url: &str,
    client_id: &str,
    assertion: &str,
) -> reqwest::Response {
    http.post(url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", GRAPH_SCOPE),
        ])
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn certificate_assertions_are_verified() {
    let mut config = SimConfig::generated(1, 1, 3, 5);
    config.tenants[0].certificate_pem = Some(TEST_CERT.to_string());
    let t = spawn_with(config).await;
    let tenant = t.sim.tenants()[0].clone();
    let url = t.sim.token_url(&tenant.tenant_id);
    let good = signed_assertion(&tenant.client_id, &url);
    let post = |assertion: String| {
        let (http, url, client_id) = (t.http.clone(), url.clone(), tenant.client_id.clone());
        async move { request_token_with_assertion(&http, &url, &client_id, &assertion).await }
    };
    let r = post(good.clone()).await;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);

    // Flip one signature byte: rejected.
    let (head, sig) = good.rsplit_once('.').expect("jwt");
    let mut raw = URL_SAFE_NO_PAD.decode(sig).expect("sig");
    raw[10] ^= 1;
    let r = post(format!("{head}.{}", URL_SAFE_NO_PAD.encode(raw))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([700027]));

    // Wrong audience: rejected.
    let r = post(signed_assertion(
        &tenant.client_id,
        "https://example.com/token",
    ))
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([700212]));

    // A malformed assertion is a request error, not a client-authentication one: still 400.
    let r = post("not.a-jwt".into()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "invalid_request");
}

/// The PEM block `label` of `pem` as DER (a file may hold a key and a certificate).
fn pem_block(pem: &str, label: &str) -> Vec<u8> {
    let begin = format!("-----BEGIN {label}-----");
    let start = pem.find(&begin).expect("BEGIN") + begin.len();
    let stop = pem[start..].find("-----END").expect("END") + start;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(b64).expect("pem base64")
}

/// An assertion as the certificate-credentials doc describes it (PS256, `x5t#S256`), or the
/// older RS256 + `x5t` form, signed by the PKCS#8 key in `key_pem`.
fn assertion_signed(ps256: bool, client_id: &str, aud: &str, key_pem: &str) -> String {
    let cert = pem_block(TEST_CERT, "CERTIFICATE");
    let header = if ps256 {
        let s256 = ring::digest::digest(&ring::digest::SHA256, &cert);
        json!({"alg": "PS256", "typ": "JWT", "x5t#S256": URL_SAFE_NO_PAD.encode(s256)})
    } else {
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert);
        json!({"alg": "RS256", "typ": "JWT", "x5t": URL_SAFE_NO_PAD.encode(sha1)})
    };
    sign_assertion(&header, client_id, aud, key_pem)
}

/// A client assertion with `header` (its `alg` picks the padding: PS256 PSS, else PKCS#1),
/// valid for ten minutes, signed by the PKCS#8 key in `key_pem`.
fn sign_assertion(header: &Value, client_id: &str, aud: &str, key_pem: &str) -> String {
    let now = Utc::now().timestamp();
    let claims = json!({"iss": client_id, "sub": client_id, "aud": aud,
                        "exp": now + 600, "nbf": now, "jti": "x"});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let padding: &'static dyn ring::signature::RsaEncoding = if header["alg"] == "PS256" {
        &ring::signature::RSA_PSS_SHA256
    } else {
        &ring::signature::RSA_PKCS1_SHA256
    };
    let key =
        ring::signature::RsaKeyPair::from_pkcs8(&pem_block(key_pem, "PRIVATE KEY")).expect("key");
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        padding,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[tokio::test]
async fn ps256_assertions_get_a_token_and_another_key_is_refused_like_rs256() {
    // Another app's key: the signature cannot verify with the tenant's certificate.
    const OTHER_KEY: &str = include_str!("../../fixtures/certs/test-app.pem");
    let mut config = SimConfig::generated(1, 1, 3, 5);
    config.tenants[0].certificate_pem = Some(TEST_CERT.to_string());
    let t = spawn_with(config).await;
    let tenant = t.sim.tenants()[0].clone();
    let url = t.sim.token_url(&tenant.tenant_id);
    let post = |assertion: String| {
        let (http, url, client_id) = (t.http.clone(), url.clone(), tenant.client_id.clone());
        async move {
            let r = request_token_with_assertion(&http, &url, &client_id, &assertion).await;
            let status = r.status();
            (status, r.json::<Value>().await.expect("json"))
        }
    };

    let (status, body) = post(assertion_signed(true, &tenant.client_id, &url, TEST_KEY)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["access_token"].as_str().is_some_and(|a| !a.is_empty()));
    let (status, body) = post(assertion_signed(false, &tenant.client_id, &url, TEST_KEY)).await;
    assert_eq!(status, StatusCode::OK, "RS256 is still accepted: {body}");

    let (ps_status, ps) = post(assertion_signed(true, &tenant.client_id, &url, OTHER_KEY)).await;
    let (rs_status, rs) = post(assertion_signed(false, &tenant.client_id, &url, OTHER_KEY)).await;
    assert_eq!(ps_status, StatusCode::UNAUTHORIZED);
    assert_eq!(ps["error"], "invalid_client");
    assert_eq!(ps["error_codes"], json!([700027]));
    assert_eq!(
        (ps_status, &ps["error"], &ps["error_codes"]),
        (rs_status, &rs["error"], &rs["error_codes"]),
        "a bad PS256 signature fails as a bad RS256 one does"
    );
}

// Event writes: create, update, delete, cancel, and what a lost answer leaves behind.

use crate::helpers::sim::{mailbox_write_stats, write_stats};

fn new_event(subject: &str, transaction_id: Option<&str>) -> Value {
    let mut body = json!({
        "subject": subject,
        "body": {"contentType": "text", "content": "Agenda"},
        "start": {"dateTime": "2030-03-04T09:00:00", "timeZone": "UTC"},
        "end": {"dateTime": "2030-03-04T09:30:00", "timeZone": "UTC"},
        "location": {"displayName": "Room 7"},
        "attendees": [{"emailAddress": {"address": "bob@example.com", "name": "Bob"}, "type": "optional"}],
        "showAs": "tentative",
        "categories": ["Customer"]
    });
    if let Some(tid) = transaction_id {
        body["transactionId"] = tid.into();
    }
    body
}

impl TestSim {
    fn events_url(&self, mailbox: &str) -> String {
        format!("{}/users/{mailbox}/events", self.sim.graph_base_url())
    }

    fn event_url(&self, mailbox: &str, id: &str) -> String {
        format!("{}/users/{mailbox}/events/{id}", self.sim.graph_base_url())
    }

    async fn create(&self, mailbox: &str, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.events_url(mailbox))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("create request")
    }

    /// Creates `body` and returns the event Graph answered with.
    async fn created(&self, mailbox: &str, token: &str, body: &Value) -> Value {
        let resp = self.create(mailbox, token, body).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        resp.json().await.expect("event json")
    }

    async fn patch(
        &self,
        mailbox: &str,
        id: &str,
        token: &str,
        if_match: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .patch(self.event_url(mailbox, id))
            .bearer_auth(token)
            .json(body);
        if let Some(tag) = if_match {
            req = req.header("If-Match", tag);
        }
        req.send().await.expect("patch request")
    }

    /// A full round now; returns its deltaLink, from which the next round reads the changes.
    async fn delta_mark(&self, mailbox: &str, token: &str) -> String {
        self.round(&self.delta_url(mailbox), token, 50).await.1
    }

    /// The items of the round that follows `mark`.
    async fn changes_since(&self, mark: &str, token: &str) -> Vec<Value> {
        items(&self.round(mark, token, 50).await.0)
    }

    fn truth_by_id(&self, mailbox: &str, id: &str) -> Option<Value> {
        self.sim
            .truth(mailbox, None)
            .into_iter()
            .find(|e| e["id"] == id)
    }

    fn truth_with_subject(&self, mailbox: &str, subject: &str) -> Vec<Value> {
        self.sim
            .truth(mailbox, None)
            .into_iter()
            .filter(|e| e["subject"] == subject)
            .collect()
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is a string in {v}"))
}

fn is_removed(item: &Value, id: &str) -> bool {
    item["id"] == id && item["@removed"]["reason"] == "deleted"
}

#[tokio::test]
async fn a_created_event_is_a_full_graph_event_in_delta_and_truth() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let mark = t.delta_mark(&mailbox, &token).await;

    let ev = t
        .created(&mailbox, &token, &new_event("Kick-off", Some("tx-1")))
        .await;
    let id = str_of(&ev, "id");
    let change_key = str_of(&ev, "changeKey");
    assert_eq!(ev["@odata.etag"], format!("W/\"{change_key}\""));
    assert_eq!(ev["type"], "singleInstance");
    assert_eq!(ev["isOrganizer"], true);
    assert_eq!(ev["organizer"]["emailAddress"]["address"], mailbox.as_str());
    assert_eq!(ev["responseStatus"]["response"], "organizer");
    assert_eq!(ev["transactionId"], "tx-1");
    assert_eq!(ev["subject"], "Kick-off");
    assert_eq!(
        ev["body"],
        json!({"contentType": "text", "content": "Agenda"})
    );
    assert_eq!(ev["bodyPreview"], "Agenda");
    assert_eq!(ev["start"]["dateTime"], "2030-03-04T09:00:00.0000000");
    assert_eq!(ev["end"]["timeZone"], "UTC");
    assert_eq!(ev["location"]["displayName"], "Room 7");
    assert_eq!(ev["showAs"], "tentative");
    assert_eq!(ev["attendees"][0]["type"], "optional");
    assert_eq!(
        ev["attendees"][0]["emailAddress"]["address"],
        "bob@example.com"
    );
    assert_eq!(ev["createdDateTime"], ev["lastModifiedDateTime"]);
    assert!(str_of(&ev, "iCalUId").starts_with("040000008200E00074C5B7101A82E008"));
    assert!(ev["@odata.context"]
        .as_str()
        .is_some_and(|c| c.ends_with("/events/$entity")));

    // The next round carries it in full, as ground truth holds it.
    let changes = t.changes_since(&mark, &token).await;
    let sent = changes
        .iter()
        .find(|i| i["id"] == id)
        .expect("the created event is in the next round");
    assert_eq!(sent["changeKey"], change_key);
    let truth = t.truth_by_id(&mailbox, id).expect("in ground truth");
    assert_eq!(&truth, sent);
    assert_eq!(write_stats(&t.sim).creates, 1);
    assert_eq!(mailbox_write_stats(&t.sim, &mailbox).creates, 1);

    // The other create paths, and Graph's 400 for missing or impossible times.
    for path in ["calendar/events", "calendars/AAMkCal=/events"] {
        let url = format!("{}/users/{mailbox}/{path}", t.sim.graph_base_url());
        let resp = t
            .http
            .post(url)
            .bearer_auth(&token)
            .json(&new_event(path, None))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::CREATED, "{path}");
    }
    let mut no_start = new_event("No start", None);
    no_start.as_object_mut().expect("object").remove("start");
    let resp = t.create(&mailbox, &token, &no_start).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.expect("error json");
    assert_eq!(err["error"]["code"], "ErrorInvalidRequest");
    assert!(str_of(&err["error"], "message").contains("'start"), "{err}");
    let mut backwards = new_event("Backwards", None);
    backwards["end"]["dateTime"] = "2030-03-04T08:00:00".into();
    let resp = t.create(&mailbox, &token, &backwards).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "ErrorPropertyValidationFailure");
    assert_eq!(write_stats(&t.sim).creates, 3);
}

#[tokio::test]
async fn a_repeated_transaction_id_returns_the_first_event_and_creates_nothing() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let first = t
        .created(&mailbox, &token, &new_event("Retry me", Some("tx-retry")))
        .await;
    let second = t
        .created(&mailbox, &token, &new_event("Retry me", Some("tx-retry")))
        .await;
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["changeKey"], second["changeKey"]);
    assert_eq!(t.truth_with_subject(&mailbox, "Retry me").len(), 1);
    let w = write_stats(&t.sim);
    assert_eq!((w.creates, w.deduplicated, w.duplicates), (1, 1, 0));

    // The same transactionId for a different event is refused.
    let resp = t
        .create(
            &mailbox,
            &token,
            &new_event("Something else", Some("tx-retry")),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "ErrorDuplicateTransactionId");
    assert!(t.truth_with_subject(&mailbox, "Something else").is_empty());
    // transactionIds are per mailbox.
    let other = t.mailbox(0, 1);
    let elsewhere = t
        .created(&other, &token, &new_event("Retry me", Some("tx-retry")))
        .await;
    assert_ne!(elsewhere["id"], first["id"]);
}

#[tokio::test]
async fn creates_without_transaction_id_leave_counted_duplicates() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let a = t.created(&mailbox, &token, &new_event("Twice", None)).await;
    let b = t.created(&mailbox, &token, &new_event("Twice", None)).await;
    assert_ne!(a["id"], b["id"]);
    assert_eq!(t.truth_with_subject(&mailbox, "Twice").len(), 2);
    let w = mailbox_write_stats(&t.sim, &mailbox);
    assert_eq!((w.creates, w.deduplicated, w.duplicates), (2, 0, 1));
    // A different subject at the same time is not a duplicate.
    t.created(&mailbox, &token, &new_event("Once", None)).await;
    assert_eq!(write_stats(&t.sim).duplicates, 1);
}

#[tokio::test]
async fn patch_applies_only_with_a_current_if_match_or_none() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let ev = t
        .created(&mailbox, &token, &new_event("Original", None))
        .await;
    let id = str_of(&ev, "id");
    let stale_etag = str_of(&ev, "@odata.etag");

    // The owner edits it in Outlook: the client's etag is now stale.
    let edited = t
        .sim
        .outlook_edit(&mailbox, id, &json!({"subject": "moved by the user"}))
        .expect("outlook edit");
    let resp = t
        .patch(
            &mailbox,
            id,
            &token,
            Some(stale_etag),
            &json!({"subject": "Mine"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    let err: Value = resp.json().await.expect("error json");
    assert_eq!(err["error"]["code"], "ErrorIrresolvableConflict");
    assert_eq!(
        err["error"]["message"],
        "The send or update operation could not be performed because the change key passed in the request does not match the current change key for the item."
    );
    let now = t.truth_by_id(&mailbox, id).expect("still there");
    assert_eq!(now["subject"], "moved by the user");
    assert_eq!(now["changeKey"], edited["changeKey"]);
    assert_eq!(write_stats(&t.sim).precondition_failed, 1);

    // The current etag (W/"..." form) applies; only the given property changes.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let resp = t
        .patch(
            &mailbox,
            id,
            &token,
            Some(str_of(&edited, "@odata.etag")),
            &json!({"subject": "Mine"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let patched: Value = resp.json().await.expect("event json");
    assert_eq!(patched["subject"], "Mine");
    assert_eq!(patched["location"]["displayName"], "Room 7");
    assert_eq!(patched["start"], ev["start"]);
    assert_ne!(patched["changeKey"], edited["changeKey"]);
    assert_eq!(
        patched["@odata.etag"],
        format!("W/\"{}\"", str_of(&patched, "changeKey"))
    );
    assert!(str_of(&patched, "lastModifiedDateTime") > str_of(&edited, "lastModifiedDateTime"));
    assert_eq!(patched["createdDateTime"], ev["createdDateTime"]);

    // A bare changeKey works as If-Match too.
    let resp = t
        .patch(
            &mailbox,
            id,
            &token,
            Some(str_of(&patched, "changeKey")),
            &json!({"showAs": "busy"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Without If-Match a PATCH always applies, whoever changed the event last.
    t.sim
        .outlook_edit(&mailbox, id, &json!({"subject": "the user again"}))
        .expect("outlook edit");
    let resp = t
        .patch(&mailbox, id, &token, None, &json!({"subject": "Last word"}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        t.truth_by_id(&mailbox, id).expect("there")["subject"],
        "Last word"
    );
    let w = write_stats(&t.sim);
    assert_eq!((w.updates, w.precondition_failed), (3, 1));

    let resp = t
        .patch(
            &mailbox,
            "AAMkADnotthere=",
            &token,
            None,
            &json!({"subject": "x"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "ErrorItemNotFound");
}

#[tokio::test]
async fn delete_is_204_then_404_and_reported_removed() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let ev = t
        .created(&mailbox, &token, &new_event("Doomed", None))
        .await;
    let id = str_of(&ev, "id");
    let mark = t.delta_mark(&mailbox, &token).await;
    let url = t.event_url(&mailbox, id);
    let first = t
        .http
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    let second = t
        .http
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(second.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(second).await, "ErrorItemNotFound");
    assert!(t.truth_by_id(&mailbox, id).is_none());
    let changes = t.changes_since(&mark, &token).await;
    assert!(changes.iter().any(|i| is_removed(i, id)), "{changes:?}");
    assert_eq!(write_stats(&t.sim).deletes, 1);
}

#[tokio::test]
async fn cancel_is_for_the_organizer_and_removes_the_event() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let ev = t
        .created(&mailbox, &token, &new_event("Meeting", None))
        .await;
    let id = str_of(&ev, "id");
    let mark = t.delta_mark(&mailbox, &token).await;
    let cancel = |id: &str| {
        t.http
            .post(format!("{}/cancel", t.event_url(&mailbox, id)))
            .bearer_auth(&token)
            .json(&json!({"comment": "Cancelling for the holidays"}))
            .send()
    };
    let resp = cancel(id).await.expect("send");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert!(resp.bytes().await.expect("body").is_empty());
    assert!(t.truth_by_id(&mailbox, id).is_none());
    let changes = t.changes_since(&mark, &token).await;
    assert!(changes.iter().any(|i| is_removed(i, id)), "{changes:?}");

    // Generated events are organized by someone else: an attendee cannot cancel.
    let theirs = t
        .sim
        .truth(&mailbox, None)
        .into_iter()
        .find(|e| e["type"] == "singleInstance" && e["isOrganizer"] == false)
        .expect("an event organized by someone else");
    let resp = cancel(str_of(&theirs, "id")).await.expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.expect("error json");
    assert_eq!(
        err["error"]["message"],
        "Your request can't be completed. You need to be an organizer to cancel a meeting."
    );
    assert!(t.truth_by_id(&mailbox, str_of(&theirs, "id")).is_some());
    let gone = cancel(id).await.expect("send");
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(write_stats(&t.sim).cancels, 1);
}

#[tokio::test]
async fn commit_then_hang_applies_the_write_the_client_never_hears_of() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let rule = t.sim.add_fault(
        FaultRule::new(FaultKind::CommitThenHang)
            .mailbox(&mailbox)
            .endpoint(Endpoint::Writes),
    );
    // Reads are not writes: delta still answers.
    let ok = t.get(&t.delta_url(&mailbox), &token, 5).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let err = t
        .http
        .post(t.events_url(&mailbox))
        .bearer_auth(&token)
        .timeout(Duration::from_millis(400))
        .json(&new_event("Lost answer", Some("tx-lost")))
        .send()
        .await
        .expect_err("the answer never comes");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(t.truth_with_subject(&mailbox, "Lost answer").len(), 1);

    // The retry with the same transactionId finds it instead of making a second one.
    t.sim.remove_fault(rule);
    let retried = t
        .created(&mailbox, &token, &new_event("Lost answer", Some("tx-lost")))
        .await;
    let truth = t.truth_with_subject(&mailbox, "Lost answer");
    assert_eq!(truth.len(), 1);
    assert_eq!(truth[0]["id"], retried["id"]);
    let w = write_stats(&t.sim);
    assert_eq!((w.creates, w.deduplicated, w.duplicates), (1, 1, 0));
}

#[tokio::test]
async fn commit_then_reset_applies_the_write_and_resets_the_connection() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let ev = t.created(&mailbox, &token, &new_event("Reset", None)).await;
    let id = str_of(&ev, "id");
    t.sim.add_fault(
        FaultRule::new(FaultKind::CommitThenReset)
            .endpoint(Endpoint::Writes)
            .max_count(1),
    );
    let err = t
        .http
        .patch(t.event_url(&mailbox, id))
        .bearer_auth(&token)
        .json(&json!({"subject": "Applied anyway"}))
        .send()
        .await
        .expect_err("connection must fail");
    assert!(chain_has_reset(&err), "expected ECONNRESET, got {err:?}");
    assert_eq!(
        t.truth_by_id(&mailbox, id).expect("there")["subject"],
        "Applied anyway"
    );
    // A retry without transactionId after a reset create: two events.
    t.sim.add_fault(
        FaultRule::new(FaultKind::CommitThenReset)
            .endpoint(Endpoint::Writes)
            .max_count(1),
    );
    let err = t
        .http
        .post(t.events_url(&mailbox))
        .bearer_auth(&token)
        .json(&new_event("Made twice", None))
        .send()
        .await
        .expect_err("connection must fail");
    assert!(chain_has_reset(&err), "{err:?}");
    t.created(&mailbox, &token, &new_event("Made twice", None))
        .await;
    assert_eq!(t.truth_with_subject(&mailbox, "Made twice").len(), 2);
    assert_eq!(write_stats(&t.sim).duplicates, 1);

    // On a read it is a plain reset.
    t.sim.add_fault(
        FaultRule::new(FaultKind::CommitThenReset)
            .endpoint(Endpoint::Delta)
            .max_count(1),
    );
    let err = t
        .http
        .get(t.delta_url(&mailbox))
        .bearer_auth(&token)
        .send()
        .await
        .expect_err("reset");
    assert!(chain_has_reset(&err), "{err:?}");
}

#[tokio::test]
async fn an_outlook_edit_moves_the_change_key_and_shows_in_delta() {
    let t = spawn().await;
    let token = t.token(0).await;
    let mailbox = t.mailbox(0, 0);
    let ev = t
        .created(&mailbox, &token, &new_event("Planned", None))
        .await;
    let id = str_of(&ev, "id");
    let mark = t.delta_mark(&mailbox, &token).await;
    let url = format!("http://{}/_sim/outlook/{mailbox}/events/{id}", t.sim.addr());
    let resp = t
        .http
        .post(&url)
        .json(&json!({"subject": "moved by the user", "start": {"dateTime": "2030-03-04T10:00:00", "timeZone": "UTC"}, "end": {"dateTime": "2030-03-04T10:30:00", "timeZone": "UTC"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let edited: Value = resp.json().await.expect("json");
    assert_eq!(edited["subject"], "moved by the user");
    assert_eq!(edited["start"]["dateTime"], "2030-03-04T10:00:00.0000000");
    assert_ne!(edited["changeKey"], ev["changeKey"]);
    let changes = t.changes_since(&mark, &token).await;
    let sent = changes.iter().find(|i| i["id"] == id).expect("in delta");
    assert_eq!(sent["changeKey"], edited["changeKey"]);
    // The owner's edits are not client writes.
    assert_eq!(write_stats(&t.sim).updates, 0);

    let missing = format!(
        "http://{}/_sim/outlook/{mailbox}/events/AAMkADnone=",
        t.sim.addr()
    );
    let resp = t
        .http
        .post(&missing)
        .json(&json!({"subject": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let deleted = t.http.delete(&url).send().await.expect("send");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(t.truth_by_id(&mailbox, id).is_none());
}

#[tokio::test]
async fn writes_need_a_valid_token_and_share_the_mailbox_limits() {
    let t = spawn().await;
    let mailbox = t.mailbox(0, 0);
    let body = new_event("Unauthorized", None);
    let missing = t
        .http
        .post(t.events_url(&mailbox))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        t.create(&mailbox, "garbage", &body).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let token = t.token(0).await;
    t.sim.advance_clock(Duration::from_secs(3600));
    let expired = t.create(&mailbox, &token, &body).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    assert!(expired.headers().contains_key("www-authenticate"));
    assert_eq!(error_code(expired).await, "InvalidAuthenticationToken");
    let expired_delete = t
        .http
        .delete(t.event_url(&mailbox, "AAMkADany="))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(expired_delete.status(), StatusCode::UNAUTHORIZED);
    assert!(t.truth_with_subject(&mailbox, "Unauthorized").is_empty());
    assert_eq!(write_stats(&t.sim), Default::default());

    // More than 4 writes in flight for one mailbox: 429 MailboxConcurrency, as for reads.
    let token = t.token(0).await;
    t.sim.add_fault(
        FaultRule::new(FaultKind::Latency { ms: 500 })
            .mailbox(&mailbox)
            .endpoint(Endpoint::Writes),
    );
    let creates = (0..6).map(|i| {
        let body = new_event(&format!("Parallel {i}"), Some(&format!("tx-{i}")));
        let (t, mailbox, token) = (&t, &mailbox, &token);
        async move { t.create(mailbox, token, &body).await.status() }
    });
    let statuses = futures_util::future::join_all(creates).await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((created, throttled), (4, 2), "{statuses:?}");
    let stats = t.sim.stats();
    assert_eq!(stats.violations.over_concurrency.count, 2);
    assert_eq!(stats.mailboxes[&mailbox].by_endpoint["create"][&201], 4);
    assert_eq!(stats.writes.creates, 4);
}

#[tokio::test]
async fn delta_refuses_top_and_the_other_query_options_with_graphs_messages() {
    let t = spawn().await;
    let mailbox = t.mailbox(0, 0);
    let token = t.token(0).await;
    let top = "The '$top' parameter is not supported with change tracking over the 'CalendarView' resource as page size cannot be guaranteed. Express page size preferences using the Prefer: odata.maxpagesize= header instead.";
    let others = "The following parameters are not supported with change tracking over the 'CalendarView' resource: '$orderby, $filter, $select, $expand, $search'.";
    for (query, message) in [
        ("$top=10", top),
        ("%24top=10", top),
        // Reported: a request with both gets the `$top` message.
        ("$select=subject&$top=10", top),
        ("$select=subject", others),
        ("$filter=isAllDay%20eq%20true", others),
        ("$orderby=start", others),
    ] {
        let resp = t
            .get(&format!("{}&{query}", t.delta_url(&mailbox)), &token, 10)
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "ErrorInvalidUrlQuery", "{query}");
        assert_eq!(body["error"]["message"], message, "{query}");
    }
    // Without them the same request is served, and says change tracking was applied.
    let ok = t.get(&t.delta_url(&mailbox), &token, 10).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let ok = t
        .http
        .get(t.delta_url(&mailbox))
        .bearer_auth(&token)
        .header("Prefer", "outlook.timezone=\"UTC\"")
        .send()
        .await
        .expect("send");
    assert_eq!(
        ok.headers()["preference-applied"],
        "odata.track-changes, outlook.timezone=\"UTC\""
    );
}
