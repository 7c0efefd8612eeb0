//! Graph change notifications end to end: the real service (its own HTTP server as the
//! notification URL, on loopback) against the simulator, which creates subscriptions only after
//! validating that URL, and POSTs notifications and lifecycle events to it. The periodic
//! interval is an hour, so any round after the first was triggered by a notification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use calsync::config::Settings;
use calsync::sim::{Endpoint, FaultKind, FaultRule};
use calsync::sim::{SimConfig, SimHandle};
use calsync::store::{MailboxRecord, Store, SubscriptionSaved};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::json;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::helpers::sim::*;
use crate::helpers::store::on_postgres;
use crate::helpers::try_start_app;

struct Service {
    sim: SimHandle,
    running: Running,
    dir: TempDir,
}

impl std::ops::Deref for Service {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

/// A free loopback port: the service's public URL must be known before it is built.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Periodic rounds an hour apart, subscriptions checked every 50 ms, `tune` on top.
async fn service(config: SimConfig, tune: impl FnOnce(&mut Settings)) -> Service {
    let sim = start_sim(config.clone()).await;
    let (settings, dir) = sim_settings(&sim, &config, |s| {
        fast(s);
        s.sync.interval = Duration::from_secs(3600);
        let n = &mut s.notifications;
        n.check_interval = Duration::from_millis(50);
        n.retry_initial = Duration::from_millis(100);
        n.retry_max = Duration::from_millis(400);
        tune(s);
    });
    // The public URL names the port before the service binds it, and between the two another
    // test's connection may take that port (CI saw it): then the service is built on another.
    for attempt in 1.. {
        let port = free_port();
        let mut settings = settings.clone();
        settings.server.public_listen = ([127, 0, 0, 1], port).into();
        settings.notifications.public_url =
            Some(format!("http://127.0.0.1:{port}").parse().expect("a URL"));
        match try_start_app(settings, Jobs::Loop).await {
            Ok(running) => return Service { sim, running, dir },
            Err(e) if attempt < 10 && port_taken(&e) => continue,
            Err(e) => panic!("app builds: {e:?}"),
        }
    }
    unreachable!("the loop returns or panics")
}

fn port_taken(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}

impl Service {
    /// Stops the service (cleanly, in time) and leaves its store and simulator to be checked.
    async fn stop(self) -> Stopped {
        let store = self.running.store.clone();
        self.running.stop().await;
        Stopped {
            sim: self.sim,
            store,
            dir: self.dir,
        }
    }

    fn check(&self) -> Truth<'_> {
        Truth {
            sim: &self.sim,
            store: &self.running.store,
        }
    }

    fn mailboxes(&self) -> Vec<String> {
        self.check().mailbox_names()
    }

    async fn record(&self, mailbox: &str) -> MailboxRecord {
        self.check().record(mailbox).await
    }

    async fn runs(&self, mailbox: &str) -> usize {
        let id = self.record(mailbox).await.id;
        self.store.runs(id, 50).await.expect("store reads").len()
    }

    /// Waits for a round of `mailbox` that started after `after` and ended well: the first
    /// that must include a change made at `after`. (A round already running then may have
    /// read the changed page before the change, and counting rounds cannot tell them apart.)
    async fn wait_for_round_after(&self, what: &str, mailbox: &str, after: DateTime<Utc>) {
        let id = self.record(mailbox).await.id;
        wait_async(what, Duration::from_secs(20), || async {
            self.store
                .runs(id, 50)
                .await
                .expect("store reads")
                .iter()
                .any(|r| r.started_at > after && r.outcome == "ok")
        })
        .await;
    }

    /// Change notifications the simulator sent that calsync accepted.
    fn accepted_changes(&self) -> usize {
        self.sim
            .notifications_sent()
            .iter()
            .filter(|n| n.kind == "change" && n.status == Some(202))
            .count()
    }

    /// Every mailbox synced once and subscribed, the store agreeing with the simulator.
    async fn wait_until_subscribed(&self) {
        let mailboxes = self.mailboxes();
        wait_async(
            "every mailbox synced and subscribed",
            Duration::from_secs(10),
            || async {
                let synced = self
                    .store
                    .mailboxes()
                    .await
                    .expect("store reads")
                    .iter()
                    .all(|m| m.last_success_at.is_some());
                let stored = self.store.subscriptions().await.expect("store reads");
                let live = self.sim.subscriptions();
                synced
                    && mailboxes.iter().all(|m| {
                        stored.iter().any(|s| {
                            &s.user_id == m
                                && s.subscription_id.as_ref().is_some_and(|id| {
                                    live.iter().any(|l| &l.id == id && &l.mailbox == m)
                                })
                        })
                    })
            },
        )
        .await;
    }

    async fn subscription_id(&self, mailbox: &str) -> String {
        self.stored_subscription_id(mailbox)
            .await
            .expect("a stored subscription")
    }

    /// `None` while the keeper has none stored, e.g. between a removal and its recreation.
    async fn stored_subscription_id(&self, mailbox: &str) -> Option<String> {
        self.store
            .subscriptions()
            .await
            .expect("store reads")
            .into_iter()
            .find(|s| s.user_id == mailbox)
            .and_then(|s| s.subscription_id)
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.public_url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("calsync answers")
    }
}

async fn wait_async<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < give_up, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_change_in_a_mailbox_is_notified_and_synced_at_once_not_at_the_next_interval() {
    let svc = service(world(2, 2, 40), |_| {}).await;
    svc.wait_until_subscribed().await;

    // Graph validated both URLs of every subscription before creating it.
    let sent = svc.sim.notifications_sent();
    let validations = sent.iter().filter(|n| n.kind == "validation").count();
    assert_eq!(validations, 2 * svc.mailboxes().len(), "{sent:#?}");
    assert!(sent
        .iter()
        .filter(|n| n.kind == "validation")
        .all(|n| n.status == Some(200)));

    let mailbox = svc.mailboxes()[0].clone();
    let other = svc.mailboxes()[1].clone();
    let before = svc.record(&mailbox).await.last_success_at;
    let (runs, other_runs) = (svc.runs(&mailbox).await, svc.runs(&other).await);
    let changed = Instant::now();
    svc.sim.mutate_now(&mailbox, 4);
    wait_async(
        "the notified mailbox synced again",
        Duration::from_secs(20),
        || async { svc.record(&mailbox).await.last_success_at > before },
    )
    .await;
    let took = changed.elapsed();
    let notified: Vec<_> = svc
        .sim
        .notifications_sent()
        .into_iter()
        .filter(|n| n.kind == "change")
        .collect();
    assert!(!notified.is_empty());
    assert!(
        notified
            .iter()
            .all(|n| n.status == Some(202) && n.mailbox == mailbox && n.took_ms < 3000),
        "{notified:#?}"
    );
    // Only the changed mailbox ran again.
    assert_eq!(svc.runs(&mailbox).await, runs + 1);
    assert_eq!(svc.runs(&other).await, other_runs);
    eprintln!("change to stored via notification: {took:?}");
    let app = svc.stop().await;
    app.check().assert_matches_truth(&mailbox).await;
    app.check().assert_matches_truth(&other).await;
}

#[tokio::test]
async fn the_endpoints_answer_the_handshake_and_ignore_a_wrong_client_state() {
    let svc = service(world(1, 1, 20), |_| {}).await;
    svc.wait_until_subscribed().await;
    let mailbox = svc.mailboxes()[0].clone();
    let id = svc.subscription_id(&mailbox).await;

    // Validation: the token URL-decoded, as text/plain.
    for path in ["/notifications", "/notifications/lifecycle"] {
        let r = svc
            .post(
                &format!("{path}?validationToken=Validation%3A%20Testing%20a%2Bb"),
                "",
            )
            .await;
        assert_eq!(r.status(), 200);
        let content_type = r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_string();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert_eq!(r.text().await.expect("body"), "Validation: Testing a+b");
    }

    let runs = svc.runs(&mailbox).await;
    let bad = |subscription: &str, state: &str| {
        json!({"value": [{
            "subscriptionId": subscription, "clientState": state, "changeType": "updated",
            "resource": format!("Users/{mailbox}/Events/x"), "tenantId": "t",
            "resourceData": {"id": "x"}
        }]})
        .to_string()
    };
    for body in [
        bad(&id, "not-the-client-state"),
        bad(&id, ""),
        bad("no-such-subscription", "whatever"),
        json!({"value": [{"subscriptionId": id, "changeType": "updated"}]}).to_string(),
    ] {
        let r = svc.post("/notifications", body.clone()).await;
        assert_eq!(r.status(), 202, "{body}");
        let r = svc
            .post(
                "/notifications/lifecycle",
                body.replace("changeType\":\"updated", "lifecycleEvent\":\"missed"),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    assert_eq!(
        svc.record(&mailbox).await.sync_requested_at,
        None,
        "nothing was triggered"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.runs(&mailbox).await, runs, "no round ran");

    // Malformed and oversized bodies.
    assert_eq!(svc.post("/notifications", "{not json").await.status(), 400);
    assert_eq!(svc.post("/notifications", "{}").await.status(), 400);
    let huge = format!(
        "{{\"value\":[],\"pad\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    assert_eq!(svc.post("/notifications", huge).await.status(), 413);
    svc.stop().await;
}

#[tokio::test]
async fn subscriptions_are_renewed_before_they_expire() {
    // Graph lifts an expiry under 45 minutes to 45 minutes, so a short lifetime cannot make
    // renewals come quickly: a renewal margin a second short of the lifetime does.
    let svc = service(world(1, 2, 10), |s| {
        s.notifications.expiration = Duration::from_secs(46 * 60);
        s.notifications.renew_before = Duration::from_secs(46 * 60 - 1);
    })
    .await;
    svc.wait_until_subscribed().await;
    let ids: Vec<String> = svc
        .sim
        .subscriptions()
        .iter()
        .map(|s| s.id.clone())
        .collect();
    wait_async("three renewals each", Duration::from_secs(30), || async {
        svc.sim.subscriptions().iter().all(|s| s.renewals >= 3)
    })
    .await;
    let subs = svc.sim.subscriptions();
    assert_eq!(
        subs.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        ids,
        "same subscriptions, not new ones"
    );
    // Each renewal asked for the configured lifetime again, from then.
    let now = Utc::now();
    for s in &subs {
        assert!(
            s.expires_at > now + chrono::Duration::minutes(45),
            "{} expires at {}",
            s.id,
            s.expires_at
        );
    }
    for s in svc.store.subscriptions().await.expect("store reads") {
        assert!(s.renewed_at.is_some());
        assert!(s.last_error.is_none());
    }
    svc.stop().await;
}

#[tokio::test]
async fn a_lifetime_under_45_minutes_is_stored_as_graph_granted_it() {
    // calsync's config allows it; Graph answers with 45 minutes, and that answer is what counts.
    let svc = service(world(1, 1, 5), |s| {
        s.notifications.expiration = Duration::from_secs(10 * 60);
        s.notifications.renew_before = Duration::from_secs(5 * 60);
    })
    .await;
    let asked_by = Utc::now() + chrono::Duration::minutes(10);
    svc.wait_until_subscribed().await;
    let granted = svc.sim.subscriptions()[0].expires_at;
    assert!(
        granted > asked_by + chrono::Duration::minutes(30),
        "{granted}"
    );
    let stored = svc.store.subscriptions().await.expect("store reads")[0].expires_at;
    assert_eq!(
        stored.map(|t| t.timestamp_millis()),
        Some(granted.timestamp_millis())
    );
    svc.stop().await;
}

/// Graph judges a subscription's expiry by its own clock and refuses one past its limit. With
/// the longest lifetime configured and calsync's clock two minutes ahead of Graph's, asking
/// for the lifetime from calsync's clock would be refused at every renewal: calsync asks for
/// a few minutes less than the limit, and the renewal goes through.
#[tokio::test]
async fn the_longest_lifetime_is_renewed_with_a_clock_ahead_of_graphs() {
    let svc = service(world(1, 1, 5), |s| {
        s.notifications.expiration = calsync::config::MAX_EVENT_SUBSCRIPTION;
    })
    .await;
    svc.wait_until_subscribed().await;
    let mailbox = svc.mailboxes()[0].clone();
    svc.sim.move_clock_back(Duration::from_secs(120));
    assert_eq!(
        svc.sim.lifecycle(&mailbox, "reauthorizationRequired").await,
        1
    );
    wait_async("renewed on request", Duration::from_secs(20), || async {
        svc.sim.subscriptions()[0].renewals == 1
    })
    .await;
    // The simulator counts the renewal when it answers; calsync stores the granted expiry
    // after it reads that answer.
    let granted = svc.sim.subscriptions()[0].expires_at;
    wait_async(
        "the granted expiry stored",
        Duration::from_secs(20),
        || async {
            svc.store.subscriptions().await.expect("store reads")[0]
                .expires_at
                .map(|t| t.timestamp_millis())
                == Some(granted.timestamp_millis())
        },
    )
    .await;
    let stored = &svc.store.subscriptions().await.expect("store reads")[0];
    assert!(stored.last_error.is_none(), "{:?}", stored.last_error);
    svc.stop().await;
}

#[tokio::test]
async fn lifecycle_events_renew_resync_and_recreate() {
    let svc = service(world(1, 1, 20), |_| {}).await;
    svc.wait_until_subscribed().await;
    let mailbox = svc.mailboxes()[0].clone();
    let first = svc.subscription_id(&mailbox).await;

    // reauthorizationRequired: renewed (the default lifetime is days: no renewal was due).
    assert_eq!(svc.sim.subscriptions()[0].renewals, 0);
    assert_eq!(
        svc.sim.lifecycle(&mailbox, "reauthorizationRequired").await,
        1
    );
    wait_async("renewed on request", Duration::from_secs(20), || async {
        svc.sim.subscriptions()[0].renewals == 1
    })
    .await;
    assert_eq!(svc.subscription_id(&mailbox).await, first);

    // missed: a delta round at once.
    let missed = Utc::now();
    assert_eq!(svc.sim.lifecycle(&mailbox, "missed").await, 1);
    svc.wait_for_round_after("a round after `missed`", &mailbox, missed)
        .await;

    // subscriptionRemoved: a new subscription, and a round for what may have been missed.
    let changed = Utc::now();
    svc.sim.mutate_now(&mailbox, 2); // notified on the old subscription
    svc.wait_for_round_after("the change's round", &mailbox, changed)
        .await;
    let removed = Utc::now();
    assert_eq!(svc.sim.lifecycle(&mailbox, "subscriptionRemoved").await, 1);
    wait_async("recreated", Duration::from_secs(20), || async {
        let live = svc.sim.subscriptions();
        live.len() == 1 && live[0].id != first
    })
    .await;
    wait_async("stored the new one", Duration::from_secs(20), || async {
        svc.stored_subscription_id(&mailbox).await.as_ref()
            == svc.sim.subscriptions().first().map(|s| &s.id)
    })
    .await;
    svc.wait_for_round_after("the catch-up round", &mailbox, removed)
        .await;
    let sent = svc.sim.notifications_sent();
    for event in ["reauthorizationRequired", "missed", "subscriptionRemoved"] {
        assert!(
            sent.iter()
                .any(|n| n.kind == event && n.status == Some(202)),
            "{event}: {sent:#?}"
        );
    }
    // The new subscription notifies too, and the round it starts stores the change: a round
    // still running from before may have read its page before the change.
    let accepted = svc.accepted_changes();
    let changed = Utc::now();
    svc.sim.mutate_now(&mailbox, 2);
    wait_async(
        "the change notified on the new subscription",
        Duration::from_secs(20),
        || async { svc.accepted_changes() > accepted },
    )
    .await;
    svc.wait_for_round_after("a round via the new subscription", &mailbox, changed)
        .await;
    let app = svc.stop().await;
    app.check().assert_matches_truth(&mailbox).await;
}

/// Issue 10's lost wake-up, made deterministic: the round a notification started is held
/// mid-page by the simulator (the page already computed), the next change is notified
/// meanwhile, then the round finishes without it. A round must start after that notification
/// and store the change; otherwise the next chance is the periodic round, an hour away.
#[tokio::test]
async fn a_change_notified_while_its_round_runs_gets_a_round_after_it() {
    let svc = service(world(1, 1, 20), |s| {
        // The held page is answered only when the test says so.
        s.graph.request_timeout = Duration::from_secs(30);
        s.sync.job_deadline = Duration::from_secs(60);
    })
    .await;
    svc.wait_until_subscribed().await;
    let mailbox = svc.mailboxes()[0].clone();
    let hold = svc.sim.add_fault(
        FaultRule::new(FaultKind::Hold { rule: 0 })
            .endpoint(Endpoint::Graph)
            .mailbox(&mailbox)
            .max_count(1),
    );

    // A first change: its notification queues a round, whose page the simulator holds.
    svc.sim.mutate_now(&mailbox, 1);
    wait_async(
        "the notified round held mid-page",
        Duration::from_secs(20),
        || async { svc.sim.held(hold) == 1 },
    )
    .await;

    // A second change while that round runs: the page it holds was computed before it.
    let accepted = svc.accepted_changes();
    let second = Utc::now();
    svc.sim.mutate_now(&mailbox, 1);
    wait_async(
        "the second change notified and accepted",
        Duration::from_secs(20),
        || async { svc.accepted_changes() > accepted },
    )
    .await;
    assert_eq!(svc.sim.held(hold), 1, "the first round is still held");

    svc.sim.remove_fault(hold);
    svc.wait_for_round_after(
        "a round that started after the second notification",
        &mailbox,
        second,
    )
    .await;
    let app = svc.stop().await;
    app.check().assert_matches_truth(&mailbox).await;
}

#[tokio::test]
async fn failed_subscription_requests_back_off_show_their_error_and_recover() {
    let config = world(1, 2, 10);
    let svc = service(config, |_| {}).await;
    svc.sim.fail_subscription_requests(1_000, 503);
    wait_async("a failure recorded", Duration::from_secs(20), || async {
        let subs = svc.store.subscriptions().await.expect("store reads");
        subs.len() == 2 && subs.iter().all(|s| s.consecutive_failures >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Backoff 100 ms doubling to 400 ms (±50 % jitter): at most ~8 attempts per mailbox in
    // this ~1.2 s, where one per 50 ms check would be ~24.
    let attempts = 1_000 - svc.sim.subscription_failures_left();
    assert!((2..=2 * 10).contains(&attempts), "{attempts} attempts");
    let health = calsync::notifications::subscription_health(&svc.store, 2)
        .await
        .expect("store reads");
    assert_eq!((health.active, health.failing, health.missing), (0, 2, 2));
    assert!(health.failures.iter().all(|f| f.error.contains("503")));
    let healthz: serde_json::Value = reqwest::get(format!("{}/healthz", svc.internal))
        .await
        .expect("healthz answers")
        .json()
        .await
        .expect("healthz is JSON");
    assert_eq!(healthz["notifications"]["failing"], 2, "{healthz}");
    assert_eq!(healthz["notifications"]["active"], 0);
    for s in svc.store.subscriptions().await.expect("store reads") {
        let error = s.last_error.expect("the error is kept");
        assert!(error.contains("503"), "{error}");
        assert!(s.subscription_id.is_none());
    }
    // Sync jobs were not held up.
    for m in svc.mailboxes() {
        assert!(svc.record(&m).await.last_success_at.is_some());
    }
    svc.sim.fail_subscription_requests(0, 503);
    svc.wait_until_subscribed().await;
    for s in svc.store.subscriptions().await.expect("store reads") {
        assert_eq!(s.consecutive_failures, 0);
        assert!(s.last_error.is_none());
    }
    let health = calsync::notifications::subscription_health(&svc.store, 2)
        .await
        .expect("store reads");
    assert_eq!((health.active, health.failing, health.missing), (2, 0, 0));
    let healthz: serde_json::Value = reqwest::get(format!("{}/healthz", svc.internal))
        .await
        .expect("healthz answers")
        .json()
        .await
        .expect("healthz is JSON");
    assert_eq!(healthz["notifications"]["active"], 2, "{healthz}");
    svc.stop().await;
}

/// `Bearer ...` for the simulator's first tenant.
async fn sim_bearer(sim: &SimHandle) -> String {
    let tenant = &sim.tenants()[0];
    let token: serde_json::Value = reqwest::Client::new()
        .post(sim.token_url(&tenant.tenant_id))
        .form(&[
            ("client_id", tenant.client_id.as_str()),
            ("client_secret", tenant.client_secret.as_str()),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .expect("token endpoint answers")
        .json()
        .await
        .expect("token JSON");
    format!(
        "Bearer {}",
        token["access_token"].as_str().expect("a token")
    )
}

type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// A notification endpoint on loopback: answers Graph's validation request and keeps every
/// notification body it is sent.
async fn notification_endpoint() -> (String, Received) {
    async fn receive(
        State(got): State<Received>,
        Query(query): Query<HashMap<String, String>>,
        body: axum::body::Bytes,
    ) -> Response {
        if let Some(token) = query.get("validationToken") {
            return ([("content-type", "text/plain")], token.clone()).into_response();
        }
        if let Ok(value) = serde_json::from_slice(&body) {
            got.lock().expect("not poisoned").push(value);
        }
        axum::http::StatusCode::ACCEPTED.into_response()
    }
    let got = Received::default();
    let app = axum::Router::new()
        .route("/n", axum::routing::post(receive))
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the endpoint");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/n"), got)
}

/// Status, `request-id` and `client-request-id` headers, and JSON body (`Null` when empty).
async fn answer(
    request: reqwest::RequestBuilder,
) -> (u16, Option<String>, Option<String>, serde_json::Value) {
    let r = request
        .header("client-request-id", "crid-1")
        .send()
        .await
        .expect("simulator answers");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (request_id, client_request_id) = (header("request-id"), header("client-request-id"));
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("body");
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, request_id, client_request_id, json)
}

fn expiry(body: &serde_json::Value) -> DateTime<Utc> {
    body["expirationDateTime"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .expect("expirationDateTime")
        .with_timezone(&Utc)
}

#[tokio::test]
async fn the_simulator_keeps_graphs_subscription_rules() {
    let sim = start_sim(world(1, 1, 5)).await;
    let tenant = sim.tenants()[0].clone();
    let mailbox = tenant.mailboxes[0].clone();
    let bearer = sim_bearer(&sim).await;
    let (url, received) = notification_endpoint().await;
    let http = reqwest::Client::new();
    let base = sim.graph_base_url();
    let at = |minutes: i64| (Utc::now() + chrono::Duration::minutes(minutes)).to_rfc3339();
    let min45 = chrono::Duration::minutes(45);
    let slack = chrono::Duration::seconds(1);
    let patch = |id: &str, expiration: String| {
        http.patch(format!("{base}/subscriptions/{id}"))
            .header("authorization", &bearer)
            .json(&json!({ "expirationDateTime": expiration }))
    };
    let create = |body: serde_json::Value| {
        http.post(format!("{base}/subscriptions"))
            .header("authorization", &bearer)
            .json(&body)
    };

    // Under 45 minutes from the request: 45 minutes (subscription resource doc).
    let before = Utc::now();
    let (status, _, _, created) = answer(create(json!({
        "changeType": "created,updated,deleted",
        "notificationUrl": url,
        "resource": format!("/users/{mailbox}/events"),
        "expirationDateTime": at(10),
        "clientState": "s".repeat(40),
    })))
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let granted = expiry(&created);
    assert!(
        granted >= before + min45 - slack && granted <= Utc::now() + min45 + slack,
        "{granted}"
    );
    assert!(
        (sim.subscriptions()[0].expires_at - granted)
            .num_milliseconds()
            .abs()
            < 1
    );

    // The same on renewal; a longer time within the limit is kept as sent.
    let before = Utc::now();
    let (status, _, _, renewed) = answer(patch(&id, at(5))).await;
    assert_eq!(status, 200, "{renewed}");
    let granted = expiry(&renewed);
    assert!(
        granted >= before + min45 - slack && granted <= Utc::now() + min45 + slack,
        "{granted}"
    );
    let asked = Utc::now() + chrono::Duration::minutes(10_079);
    let (status, _, _, renewed) = answer(patch(&id, asked.to_rfc3339())).await;
    assert_eq!(status, 200, "{renewed}");
    assert!(
        (expiry(&renewed) - asked).num_milliseconds().abs() < 1,
        "{renewed}"
    );

    // Over 10,080 minutes: the code and message users report.
    for (status, _, _, body) in [
        answer(patch(&id, at(10_081))).await,
        answer(create(json!({
            "changeType": "created",
            "notificationUrl": url,
            "resource": format!("/users/{mailbox}/events"),
            "expirationDateTime": at(10_081),
        })))
        .await,
    ] {
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "ExtensionError", "{body}");
        assert_eq!(
            body["error"]["message"],
            "Subscription expiration can only be 10080 minutes in the future.",
            "{body}"
        );
    }
    // A time already past is still refused.
    assert_eq!(answer(patch(&id, at(-1))).await.0, 400);

    // reauthorize: 204 with Graph's request ids, the expiry unchanged; 404 for an unknown id.
    let expires = sim.subscriptions()[0].expires_at;
    let reauthorize = |id: &str| {
        http.post(format!("{base}/subscriptions/{id}/reauthorize"))
            .header("authorization", &bearer)
    };
    let (status, request_id, client_request_id, _) = answer(reauthorize(&id)).await;
    assert_eq!(status, 204);
    assert!(request_id.is_some());
    assert_eq!(client_request_id.as_deref(), Some("crid-1"));
    let held = &sim.subscriptions()[0];
    assert_eq!((held.reauthorizations, held.expires_at), (1, expires));
    let (status, _, _, body) = answer(reauthorize("00000000-0000-0000-0000-000000000000")).await;
    assert_eq!(status, 404, "{body}");

    // Notifications name the user by object id and tenant id, not by the address subscribed to.
    let object_id = sim
        .user_object_id(&mailbox)
        .expect("the mailbox's object id");
    assert!(uuid::Uuid::parse_str(&object_id).is_ok(), "{object_id}");
    sim.mutate_now(&mailbox, 3);
    wait_async("notified", Duration::from_secs(10), || async {
        !received.lock().expect("not poisoned").is_empty()
    })
    .await;
    let bodies = received.lock().expect("not poisoned").clone();
    for item in bodies
        .iter()
        .flat_map(|b| b["value"].as_array().cloned().unwrap_or_default())
    {
        let event = item["resourceData"]["id"]
            .as_str()
            .expect("resourceData.id");
        let user = format!("{object_id}@{}", tenant.tenant_id);
        assert_eq!(item["subscriptionId"], id.as_str());
        assert_eq!(item["resource"], format!("users/{user}/events/{event}"));
        assert_eq!(
            item["resourceData"]["@odata.id"],
            format!("Users/{user}/Events/{event}")
        );
        assert!(!item.to_string().contains(&mailbox), "{item}");
    }

    // DELETE: 204 with Graph's request ids; then gone.
    let delete = || {
        http.delete(format!("{base}/subscriptions/{id}"))
            .header("authorization", &bearer)
    };
    let (status, request_id, client_request_id, _) = answer(delete()).await;
    assert_eq!(status, 204);
    assert!(request_id.is_some());
    assert_eq!(client_request_id.as_deref(), Some("crid-1"));
    assert_eq!(answer(delete()).await.0, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_simulator_refuses_bad_subscriptions() {
    let config = world(1, 1, 5);
    let sim = start_sim(config.clone()).await;
    let tenant = &sim.tenants()[0];
    let bearer = sim_bearer(&sim).await;
    let mailbox = tenant.mailboxes[0].clone();
    let create = |body: serde_json::Value| {
        let bearer = bearer.clone();
        let url = format!("{}/subscriptions", sim.graph_base_url());
        async move {
            reqwest::Client::new()
                .post(url)
                .header("authorization", bearer)
                .json(&body)
                .send()
                .await
                .expect("simulator answers")
                .status()
                .as_u16()
        }
    };
    let soon = |minutes: i64| (Utc::now() + chrono::Duration::minutes(minutes)).to_rfc3339();
    let good = json!({
        "changeType": "created,updated,deleted",
        "notificationUrl": "http://127.0.0.1:9/notifications",
        "resource": format!("/users/{mailbox}/events"),
        "expirationDateTime": soon(60),
        "clientState": "s".repeat(40),
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut body = good.clone();
        body[key] = value;
        body
    };
    assert_eq!(
        create(with("expirationDateTime", json!(soon(10_081)))).await,
        400
    );
    assert_eq!(
        create(with("expirationDateTime", json!(soon(-1)))).await,
        400
    );
    assert_eq!(
        create(with("changeType", json!("created,moved"))).await,
        400
    );
    assert_eq!(
        create(with("notificationUrl", json!("http://example.com/n"))).await,
        400
    );
    assert_eq!(
        create(with("clientState", json!("s".repeat(129)))).await,
        400
    );
    assert_eq!(
        create(with("resource", json!("/users/nobody@nowhere.test/events"))).await,
        404
    );
    // Nothing listens on port 9: the validation request fails, so no subscription.
    assert_eq!(create(good.clone()).await, 400);
    assert!(sim.subscriptions().is_empty());
    let unauthorized = reqwest::Client::new()
        .post(format!("{}/subscriptions", sim.graph_base_url()))
        .json(&good)
        .send()
        .await
        .expect("simulator answers");
    assert_eq!(unauthorized.status(), 401);
    sim.shutdown().await;
}

// ---- the store's subscription table, on both backends ----

async fn subscription_rows(store: Store) {
    let now = Utc::now();
    let mailboxes = vec![
        ("t".to_string(), "a@x.test".to_string()),
        ("t".to_string(), "b@x.test".to_string()),
    ];
    store
        .sync_config_mailboxes(&mailboxes, now)
        .await
        .expect("mailboxes");
    let later = now + chrono::Duration::hours(1);
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert_eq!(due.len(), 2);
    assert!(due.iter().all(|d| d.subscription_id.is_none()));
    let a = due[0].mailbox_id;
    let b = due[1].mailbox_id;

    // One claimant wins; the claim hides the row until it runs out.
    let until = now + chrono::Duration::seconds(30);
    assert!(store
        .claim_subscription(a, now, until)
        .await
        .expect("claim"));
    assert!(!store
        .claim_subscription(a, now, until)
        .await
        .expect("claim"));
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert_eq!(
        due.iter().map(|d| d.mailbox_id).collect::<Vec<_>>(),
        vec![b]
    );

    let state = SecretString::from("a-client-state-of-some-length");
    let expires = now + chrono::Duration::days(3);
    let saved = SubscriptionSaved {
        subscription_id: "sub-a",
        client_state: Some(&state),
        expires_at: expires,
        created: true,
    };
    store
        .subscription_saved(a, &saved, now)
        .await
        .expect("saved");
    let record = store
        .subscription_by_id("sub-a")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(record.mailbox_id, a);
    assert_eq!(record.user_id, "a@x.test");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(record.client_state.as_ref().expect("state")),
        "a-client-state-of-some-length"
    );
    assert_eq!(
        record.expires_at.map(|t| t.timestamp_millis()),
        Some(expires.timestamp_millis())
    );
    assert!(record.created_at.is_some() && record.renewed_at.is_none());
    // Not due until its expiry comes within the renewal margin.
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert!(due.iter().all(|d| d.mailbox_id != a));
    let due = store
        .subscriptions_due(now, expires + chrono::Duration::seconds(1), 10)
        .await
        .expect("due");
    assert!(due
        .iter()
        .any(|d| d.mailbox_id == a && d.subscription_id.as_deref() == Some("sub-a")));

    // reauthorizationRequired: due now, same subscription.
    assert!(store
        .subscription_needs_work("sub-a", false, now)
        .await
        .expect("mark"));
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert!(due
        .iter()
        .any(|d| d.mailbox_id == a && d.subscription_id.as_deref() == Some("sub-a")));
    // subscriptionRemoved: forgotten, to be created anew.
    assert!(store
        .subscription_needs_work("sub-a", true, now)
        .await
        .expect("forget"));
    assert!(store
        .subscription_by_id("sub-a")
        .await
        .expect("read")
        .is_none());
    assert!(!store
        .subscription_needs_work("sub-a", true, now)
        .await
        .expect("gone"));
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert!(due
        .iter()
        .any(|d| d.mailbox_id == a && d.subscription_id.is_none()));

    // A failure backs off and is kept until a success clears it.
    assert!(store
        .claim_subscription(b, now, until)
        .await
        .expect("claim"));
    let retry = now + chrono::Duration::minutes(5);
    store
        .subscription_failed(b, "HTTP 503 \0 ServiceUnavailable", now, retry)
        .await
        .expect("failed");
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert!(due.iter().all(|d| d.mailbox_id != b));
    let due = store
        .subscriptions_due(retry, later, 10)
        .await
        .expect("due");
    let row = due
        .iter()
        .find(|d| d.mailbox_id == b)
        .expect("due after the backoff");
    assert_eq!(row.consecutive_failures, 1);
    let all = store.subscriptions().await.expect("rows");
    let rb = all.iter().find(|r| r.mailbox_id == b).expect("row b");
    assert!(rb.last_error.as_deref().is_some_and(|e| e.contains("503")));
    assert!(store
        .claim_subscription(b, retry, retry + chrono::Duration::seconds(30))
        .await
        .expect("claim"));
    let saved = SubscriptionSaved {
        subscription_id: "sub-b",
        client_state: Some(&state),
        expires_at: expires,
        created: false,
    };
    store
        .subscription_saved(b, &saved, retry)
        .await
        .expect("saved");
    let rb = store
        .subscription_by_id("sub-b")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(
        (rb.consecutive_failures, rb.last_error.is_none()),
        (0, true)
    );
    assert!(rb.renewed_at.is_some());
    // A renewal keeps the stored clientState.
    let renewed = SubscriptionSaved {
        subscription_id: "sub-b",
        client_state: None,
        expires_at: expires + chrono::Duration::days(1),
        created: false,
    };
    store
        .subscription_saved(b, &renewed, retry)
        .await
        .expect("renewed");
    let rb = store
        .subscription_by_id("sub-b")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(
        rb.client_state
            .as_ref()
            .map(secrecy::ExposeSecret::expose_secret),
        Some("a-client-state-of-some-length")
    );
    // A forgotten subscription is known to have existed: its recreation is a catch-up.
    let due = store.subscriptions_due(now, later, 10).await.expect("due");
    assert!(due.iter().any(|d| d.mailbox_id == a && d.had_subscription));

    // A mailbox leaving the config is no longer kept subscribed.
    store
        .sync_config_mailboxes(&mailboxes[..1], now)
        .await
        .expect("mailboxes");
    let due = store
        .subscriptions_due(retry, expires + chrono::Duration::days(1), 10)
        .await
        .expect("due");
    assert!(due.iter().all(|d| d.mailbox_id != b));
    // Removing a mailbox removes its row.
    assert!(store.remove_mailbox(b).await.expect("removed"));
    assert!(store
        .subscription_by_id("sub-b")
        .await
        .expect("read")
        .is_none());
}

#[tokio::test]
async fn subscription_rows_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = Store::connect(&url, 4).await.expect("store opens");
    store.migrate().await.expect("migrations run");
    subscription_rows(store.clone()).await;
    store.close().await;
}

#[tokio::test]
async fn subscription_rows_on_postgres() {
    on_postgres(subscription_rows).await;
}

/// Both measurements complete. No bound on the times themselves: a loaded machine may take
/// longer than the polling interval for one notified change, and this test must not depend on
/// the machine's speed. What proves the notification path is the interval: the notified
/// service polls once an hour, so a change stored at all within `change_to_stored`'s limit
/// (the polling interval + 30 s, or it returns an error) was stored because of a notification.
#[tokio::test]
async fn change_to_stored_latency_is_measured_both_ways() {
    let poll = Duration::from_millis(800);
    let latency = calsync::latency::change_to_stored(3, poll)
        .await
        .expect("every change stored: by a notification on the service that polls hourly");
    assert_eq!(latency.via_notification.len(), 3, "{latency:?}");
    assert_eq!(latency.via_polling.len(), 3, "{latency:?}");
    assert_eq!(latency.poll_interval, poll);
    eprintln!("{latency:?}");
}

/// A removed mailbox's subscription is deleted at Graph (it would otherwise go on notifying
/// until it expires), and so is a config-disabled one's; the others stay.
#[tokio::test]
async fn removing_or_disabling_a_mailbox_deletes_its_graph_subscription() {
    let svc = service(world(1, 3, 10), |_| {}).await;
    svc.wait_until_subscribed().await;
    let mailboxes = svc.mailboxes();
    let (removed, disabled, kept) = (&mailboxes[0], &mailboxes[1], &mailboxes[2]);
    let live = |m: &str| svc.sim.subscriptions().iter().any(|s| s.mailbox == m);
    assert!(live(removed) && live(disabled) && live(kept));

    let id = svc.record(removed).await.id;
    assert!(svc.store.remove_mailbox(id).await.expect("removes"));
    wait_async(
        "the removed mailbox's subscription deleted at Graph",
        Duration::from_secs(10),
        || async { !live(removed) },
    )
    .await;

    let tenant = svc.sim.tenants()[0].name.clone();
    let still: Vec<(String, String)> = vec![(tenant.clone(), kept.clone())];
    svc.store
        .sync_config_mailboxes(&still, Utc::now())
        .await
        .expect("config applied");
    wait_async(
        "the disabled mailbox's subscription deleted at Graph",
        Duration::from_secs(10),
        || async { !live(disabled) },
    )
    .await;
    assert!(live(kept), "the kept mailbox keeps its subscription");
    wait_async(
        "the retired rows forgotten once Graph deleted them",
        Duration::from_secs(10),
        || async {
            svc.store
                .retired_subscriptions()
                .await
                .expect("reads")
                .is_empty()
        },
    )
    .await;
    svc.stop().await;
}

/// A store that lost a subscription (re-created, or restored from an old backup) does not
/// leave it at Graph: the keeper compares Graph's list for our URL with the store and deletes
/// what no row knows, while the mailbox gets a subscription of its own again.
#[tokio::test]
async fn subscriptions_no_row_knows_are_deleted_at_graph() {
    let svc = service(world(1, 2, 10), |s| {
        s.notifications.reconcile_interval = Duration::from_millis(100);
    })
    .await;
    svc.wait_until_subscribed().await;
    let mailbox = svc.mailboxes()[0].clone();
    let forgotten = svc.subscription_id(&mailbox).await;
    // The store forgets it; Graph still has it.
    assert!(svc
        .store
        .subscription_needs_work(&forgotten, true, Utc::now())
        .await
        .expect("store writes"));
    wait_async(
        "the forgotten subscription deleted and a new one made",
        Duration::from_secs(10),
        || async {
            let live: Vec<_> = svc
                .sim
                .subscriptions()
                .into_iter()
                .filter(|s| s.mailbox == mailbox)
                .collect();
            live.len() == 1 && live[0].id != forgotten
        },
    )
    .await;
    let other = svc.mailboxes()[1].clone();
    assert_eq!(
        svc.sim
            .subscriptions()
            .iter()
            .filter(|s| s.mailbox == other)
            .count(),
        1,
        "the other mailbox's subscription is left alone"
    );
    svc.stop().await;
}
