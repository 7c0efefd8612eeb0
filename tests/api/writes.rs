//! Two-way sync over real sockets against the simulator: the application's appointments are
//! checked, stored, delivered to Outlook exactly once (through a lost answer, a reset, and a
//! kill -9 of calsync between delivery and recording), in order through retries, with
//! conflicts recorded under each policy, and read back; a tenant in an outage keeps its writes
//! queued while another tenant's are delivered.

use std::collections::HashMap;
use std::time::Duration;

use calsync::config::{ConflictPolicy, Settings};
use calsync::scheduler::JobResult;
use calsync::sim::{Endpoint, FaultKind, FaultRule, RetryAfter, SimHandle};
use calsync::store::Store;
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::helpers::api::{Api, Reply, TOKEN};
use crate::helpers::sim::{fast, sim_settings, start_sim, wait_for, world, Truth};
use crate::helpers::{start_app, Jobs};

/// A service on a simulator of two tenants with two mailboxes each; `writers` lists the tenants
/// (by index) that allow writes. Its jobs are run by the test.
struct Writing {
    api: Api,
    sim: SimHandle,
    _dir: TempDir,
}

impl Writing {
    async fn start(conflict: ConflictPolicy, writers: &[usize]) -> Self {
        Self::start_with(conflict, writers, |_| {}).await
    }

    async fn start_with(
        conflict: ConflictPolicy,
        writers: &[usize],
        tune: impl FnOnce(&mut Settings),
    ) -> Self {
        let config = world(2, 2, 3);
        let sim = start_sim(config.clone()).await;
        let (settings, dir) = sim_settings(&sim, &config, |s| {
            fast(s);
            s.api.token = Some(SecretString::from(TOKEN));
            for &i in writers {
                s.tenants[i].writes = true;
            }
            s.writes.conflict_policy = conflict;
            tune(s);
        });
        let api = Api::new(start_app(settings, Jobs::ByTest).await);
        Self {
            api,
            sim,
            _dir: dir,
        }
    }

    fn check(&self) -> Truth<'_> {
        Truth {
            sim: &self.sim,
            store: &self.api.store,
        }
    }

    fn mailbox(&self, tenant: usize, n: usize) -> String {
        self.sim.tenants()[tenant].mailboxes[n].clone()
    }

    async fn id(&self, mailbox: &str) -> i64 {
        self.check().record(mailbox).await.id
    }

    /// One pass over every due mailbox; results by mailbox.
    async fn pass(&self) -> HashMap<String, JobResult> {
        let results = self
            .api
            .worker
            .sync_all_once()
            .await
            .expect("sync pass runs");
        results
            .into_iter()
            .map(|r| (r.mailbox.clone(), r))
            .collect()
    }

    async fn send(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
        self.api
            .send_with(method, path, &[("Idempotency-Key", key)], body)
            .await
    }

    async fn book(&self, mailbox: i64, external_id: &str, subject: &str, key: &str) -> Reply {
        self.send(
            Method::POST,
            &format!("/v1/mailboxes/{mailbox}/events"),
            key,
            Some(booking(external_id, subject)),
        )
        .await
    }

    async fn change(&self, mailbox: i64, external_id: &str, body: Value, key: &str) -> Reply {
        self.send(
            Method::PATCH,
            &format!("/v1/mailboxes/{mailbox}/events/{external_id}"),
            key,
            Some(body),
        )
        .await
    }

    async fn cancel(&self, mailbox: i64, external_id: &str, key: &str) -> Reply {
        self.send(
            Method::DELETE,
            &format!("/v1/mailboxes/{mailbox}/events/{external_id}"),
            key,
            Some(json!({"comment": "Rescheduled"})),
        )
        .await
    }

    /// `GET /v1/writes/{id}`.
    async fn state_of(&self, write: &Reply) -> Value {
        let id = write.body["id"].as_str().expect("a write id");
        let reply = self.api.get(&format!("/v1/writes/{id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    /// The simulator's events of `mailbox` with this subject.
    fn in_outlook(&self, mailbox: &str, subject: &str) -> Vec<Value> {
        self.sim
            .truth(mailbox, None)
            .into_iter()
            .filter(|e| e["subject"] == subject)
            .collect()
    }

    fn writes_stats(&self) -> calsync::sim::WriteStats {
        self.sim.stats().writes
    }
}

/// Graph answering 503 to every write of `mailbox` (reads work).
fn writes_unavailable(mailbox: &str) -> FaultRule {
    writes_answer(mailbox, 503, "ServiceUnavailable")
}

/// Graph's answer to a stale `If-Match`.
fn writes_precondition_failed(mailbox: &str) -> FaultRule {
    writes_answer(mailbox, 412, "ErrorIrresolvableConflict")
}

/// The mailbox's writes answered with `code` and Graph's error `graph_code`.
fn writes_answer(mailbox: &str, code: u16, graph_code: &str) -> FaultRule {
    FaultRule::new(FaultKind::Status {
        code,
        graph_code: Some(graph_code.into()),
        message: None,
        aadsts: None,
        retry_after: RetryAfter::None,
    })
    .endpoint(Endpoint::Writes)
    .mailbox(mailbox.to_string())
}

fn booking(external_id: &str, subject: &str) -> Value {
    json!({
        "external_id": external_id,
        "subject": subject,
        "start": {"dateTime": "2026-12-03T14:00:00", "timeZone": "UTC"},
        "end": {"dateTime": "2026-12-03T14:30:00", "timeZone": "UTC"},
        "attendees": [{"emailAddress": {"address": "student@contoso.edu", "name": "A Student"}}],
    })
}

#[tokio::test]
async fn a_booking_is_checked_stored_delivered_once_and_read_back() {
    let w = Writing::start(ConflictPolicy::OutlookWins, &[0]).await;
    let alice = w.mailbox(0, 0);
    let id = w.id(&alice).await;
    let other = w.id(&w.mailbox(1, 0)).await;
    let path = format!("/v1/mailboxes/{id}/events");

    // Refused before anything is stored, each naming what is wrong.
    let no_key = w
        .api
        .send_with(Method::POST, &path, &[], Some(booking("b-1", "Advising")))
        .await;
    assert_eq!(no_key.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_key.body["error"]["parameter"], "Idempotency-Key");
    let not_allowed = w.book(other, "b-1", "Advising", "k-0").await;
    assert_eq!(not_allowed.status, StatusCode::FORBIDDEN);
    assert_eq!(not_allowed.code(), "writes_not_enabled");
    let mut typo = booking("b-1", "Advising");
    typo["subjet"] = json!("typo");
    let typo = w.send(Method::POST, &path, "k-0", Some(typo)).await;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    assert_eq!(typo.body["error"]["field"], "subjet");
    let mut no_id = booking("b-1", "Advising");
    no_id.as_object_mut().expect("object").remove("external_id");
    let no_id = w.send(Method::POST, &path, "k-0", Some(no_id)).await;
    assert_eq!(no_id.body["error"]["field"], "external_id");
    let mut huge = booking("b-1", "Advising");
    huge["body"] = json!({"contentType": "text", "content": "x".repeat(40_000)});
    let huge = w.send(Method::POST, &path, "k-0", Some(huge)).await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(w.writes_stats().creates, 0);

    // Accepted, stored, and the mailbox asked to sync.
    let accepted = w.book(id, "b-1", "Advising", "k-1").await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    assert_eq!(accepted.body["state"], "queued");
    let write_id = accepted.body["id"].as_str().expect("id").to_string();
    assert_eq!(
        accepted.headers["location"],
        format!("/v1/writes/{write_id}").as_str()
    );
    assert!(w.check().record(&alice).await.sync_requested_at.is_some());
    // The same request again is the same write; the same key for another request is refused.
    let replay = w.book(id, "b-1", "Advising", "k-1").await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert_eq!(replay.body["id"], write_id.as_str());
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let reused = w.book(id, "b-1", "Advising (moved)", "k-1").await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.code(), "idempotency_key_reused");
    let twice = w.book(id, "b-1", "Advising", "k-2").await;
    assert_eq!(twice.status, StatusCode::CONFLICT);
    assert_eq!(twice.code(), "event_exists");
    let unknown = w.change(id, "b-404", json!({"subject": "x"}), "k-3").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.code(), "event_not_found");

    // Delivered by the mailbox's job, then read back by its delta round.
    let results = w.pass().await;
    assert_eq!(
        results[&alice].report.writes_delivered, 1,
        "{:?}",
        results[&alice]
    );
    let state = w.state_of(&accepted).await;
    assert_eq!(state["state"], "delivered", "{state}");
    let graph_id = state["graph_event_id"]
        .as_str()
        .expect("graph id")
        .to_string();
    let made = w.in_outlook(&alice, "Advising");
    assert_eq!(made.len(), 1, "exactly one event in Outlook");
    assert_eq!(made[0]["id"], graph_id.as_str());
    assert!(
        made[0]["transactionId"].is_string(),
        "the create carried a transactionId: {}",
        made[0]
    );
    let read = w.api.get(&format!("/v1/mailboxes/{id}/events/b-1")).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(read.body["graph_event_id"], graph_id.as_str());
    assert_eq!(read.body["event"]["subject"], "Advising");
    assert_eq!(read.body["writes"][0]["state"], "delivered");
    w.check().assert_matches_truth(&alice).await;

    // Cancelled: gone from Outlook, and the appointment is closed.
    let cancel = w.cancel(id, "b-1", "k-4").await;
    assert_eq!(cancel.status, StatusCode::ACCEPTED, "{}", cancel.body);
    let after = w.change(id, "b-1", json!({"subject": "x"}), "k-5").await;
    assert_eq!(after.code(), "event_cancelled");
    w.pass().await;
    assert_eq!(w.state_of(&cancel).await["state"], "delivered");
    assert!(w.in_outlook(&alice, "Advising").is_empty());
    let stats = w.writes_stats();
    assert_eq!((stats.creates, stats.cancels, stats.duplicates), (1, 1, 0));
    w.check().assert_matches_truth(&alice).await;
    w.api.assert_token_never_seen();
}

/// Graph commits the create, then its answer never arrives (held, or the connection reset):
/// the retry carries the same transactionId and Graph answers with the event it made, or
/// (as clients report it doing too) refuses the transactionId naming that event.
#[tokio::test]
async fn a_create_whose_answer_is_lost_after_the_commit_is_made_once() {
    for (kind, refused) in [
        (FaultKind::CommitThenHang, false),
        (FaultKind::CommitThenReset, false),
        (FaultKind::CommitThenReset, true),
    ] {
        let w = Writing::start(ConflictPolicy::OutlookWins, &[0]).await;
        w.sim.refuse_transaction_retries(refused);
        let alice = w.mailbox(0, 0);
        let id = w.id(&alice).await;
        w.sim.add_fault(
            FaultRule::new(kind.clone())
                .endpoint(Endpoint::Writes)
                .mailbox(alice.clone())
                .max_count(1),
        );
        let accepted = w.book(id, "b-1", "Advising", "k-1").await;
        assert_eq!(accepted.status, StatusCode::ACCEPTED);
        w.pass().await;
        let state = w.state_of(&accepted).await;
        assert_eq!(state["state"], "delivered", "{kind:?}: {state}");
        let stats = w.writes_stats();
        assert_eq!(stats.creates, 1, "{kind:?}: one event made");
        if refused {
            assert_eq!(stats.duplicate_transaction, 1, "the retry was refused");
            assert!(
                state["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("transactionId")),
                "{state}"
            );
        } else {
            assert_eq!(
                stats.deduplicated, 1,
                "{kind:?}: the retry was deduplicated"
            );
        }
        assert_eq!(stats.duplicates, 0, "{kind:?}");
        let made = w.in_outlook(&alice, "Advising");
        assert_eq!(made.len(), 1, "{kind:?}");
        assert_eq!(made[0]["id"], state["graph_event_id"]);
    }
}

/// The event was changed in Outlook since calsync wrote it, seen by the read before the PATCH
/// or, when the change lands between that read and the PATCH, by Graph's 412 on `If-Match`:
/// Outlook's version stays, or the application's is written over it, as configured, and the
/// write says which. A changeKey that moves without any change of content (Exchange does that
/// by itself) is no conflict.
#[tokio::test]
async fn a_conflict_is_recorded_under_each_policy() {
    for policy in [ConflictPolicy::OutlookWins, ConflictPolicy::ApplicationWins] {
        // Room for a PATCH held a second by the simulator.
        let w = Writing::start_with(policy, &[0], |s| {
            s.graph.request_timeout = Duration::from_secs(5);
        })
        .await;
        let alice = w.mailbox(0, 0);
        let id = w.id(&alice).await;
        for (external_id, subject) in [("b-1", "Advising"), ("b-2", "Review"), ("b-3", "Check-in")]
        {
            let booked = w.book(id, external_id, subject, external_id).await;
            assert_eq!(booked.status, StatusCode::ACCEPTED, "{}", booked.body);
        }
        w.pass().await;
        let graph_id = |subject: &str| {
            let found = w.in_outlook(&alice, subject);
            assert_eq!(found.len(), 1, "one {subject} event");
            found[0]["id"].as_str().expect("id").to_string()
        };
        let (advising, review, check_in) = (
            graph_id("Advising"),
            graph_id("Review"),
            graph_id("Check-in"),
        );

        // b-1: the student moved it in Outlook before calsync's update.
        let edited = w.sim.outlook_edit(
            &alice,
            &advising,
            &json!({"subject": "Advising (moved by the student)"}),
        );
        assert!(edited.is_some(), "the simulator edits as the user");
        let stale = w
            .change(id, "b-1", json!({"subject": "Advising (app)"}), "u-1")
            .await;
        w.pass().await;

        // b-3: only the changeKey moved (before the read, and again between the read and the
        // PATCH: a 412 without any change of content).
        assert!(w.sim.outlook_edit(&alice, &check_in, &json!({})).is_some());
        w.sim
            .add_fault(writes_precondition_failed(&alice).max_count(1));
        let bumped = w
            .change(id, "b-3", json!({"subject": "Check-in (app)"}), "u-3")
            .await;
        w.pass().await;

        // b-2: the student edits while calsync's PATCH is on its way (held a second by the
        // simulator): Graph's If-Match check refuses the PATCH with a 412.
        let held = w.sim.add_fault(
            FaultRule::new(FaultKind::Latency { ms: 1000 })
                .endpoint(Endpoint::Writes)
                .mailbox(alice.clone())
                .max_count(1),
        );
        let raced = w
            .change(id, "b-2", json!({"subject": "Review (app)"}), "u-2")
            .await;
        let student = async {
            wait_for(
                "calsync's PATCH reached Graph",
                Duration::from_secs(20),
                || w.sim.stats().faults_fired.get(&held) == Some(&1),
            )
            .await;
            w.sim
                .outlook_edit(&alice, &review, &json!({"subject": "Review (student)"}))
                .expect("edited");
        };
        tokio::join!(w.pass(), student);

        let (stale, bumped, raced) = (
            w.state_of(&stale).await,
            w.state_of(&bumped).await,
            w.state_of(&raced).await,
        );
        assert_eq!(bumped["state"], "delivered", "{bumped}");
        assert!(bumped["note"].is_null(), "no conflict: {bumped}");
        assert_eq!(w.in_outlook(&alice, "Check-in (app)").len(), 1);
        match policy {
            ConflictPolicy::OutlookWins => {
                for write in [&stale, &raced] {
                    assert_eq!(write["state"], "conflict", "{write}");
                    assert!(write["conflict"]
                        .as_str()
                        .is_some_and(|c| c.contains("Outlook")));
                }
                assert_eq!(
                    w.in_outlook(&alice, "Advising (moved by the student)")
                        .len(),
                    1
                );
                assert_eq!(w.in_outlook(&alice, "Review (student)").len(), 1);
            }
            ConflictPolicy::ApplicationWins => {
                for write in [&stale, &raced] {
                    assert_eq!(write["state"], "delivered", "{write}");
                    assert!(write["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("Outlook")));
                }
                assert_eq!(w.in_outlook(&alice, "Advising (app)").len(), 1);
                assert_eq!(w.in_outlook(&alice, "Review (app)").len(), 1);
            }
        }
        assert!(
            w.writes_stats().precondition_failed >= 1,
            "the race was refused by If-Match at Graph"
        );
    }
}

/// Create, two updates and a cancel, queued before one job, through 503s that need retries
/// within the job and then a failure that outlasts it: delivered once each, in order.
#[tokio::test]
async fn writes_of_one_appointment_are_delivered_in_order_through_retries() {
    let w = Writing::start(ConflictPolicy::OutlookWins, &[0]).await;
    let alice = w.mailbox(0, 0);
    let id = w.id(&alice).await;
    let unavailable = |count| writes_unavailable(&alice).max_count(count);
    w.book(id, "a", "A v1", "k-1").await;
    w.change(id, "a", json!({"subject": "A v2"}), "k-2").await;
    w.change(id, "a", json!({"subject": "A v3"}), "k-3").await;
    w.book(id, "b", "B", "k-4").await;
    let cancel_b = w.cancel(id, "b", "k-5").await;
    // More failures in a row than one request's retries: the first job stops with the rest
    // queued; the next one goes on where it stopped.
    let fault = w.sim.add_fault(unavailable(8));
    let first = w.pass().await;
    assert_ne!(first[&alice].outcome, calsync::store::RunOutcome::Ok);
    w.sim.remove_fault(fault);
    w.sim.add_fault(unavailable(2));
    let mut passes = 0;
    while w.state_of(&cancel_b).await["state"] == "queued" {
        passes += 1;
        assert!(passes <= 5, "delivered within a few jobs");
        w.pass().await;
    }
    assert_eq!(
        w.in_outlook(&alice, "A v3").len(),
        1,
        "the last update wins"
    );
    assert!(w.in_outlook(&alice, "A v1").is_empty() && w.in_outlook(&alice, "A v2").is_empty());
    assert!(
        w.in_outlook(&alice, "B").is_empty(),
        "B was created, then cancelled"
    );
    let stats = w.writes_stats();
    assert_eq!(
        (
            stats.creates,
            stats.updates,
            stats.cancels,
            stats.duplicates
        ),
        (2, 2, 1, 0),
        "{stats:?}"
    );
    let read = w.api.get(&format!("/v1/mailboxes/{id}/events/a")).await;
    let states: Vec<&str> = read.body["writes"]
        .as_array()
        .expect("writes")
        .iter()
        .map(|w| w["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(states, ["delivered"; 3]);
    assert!(
        read.body["writes"][2]["attempts"].as_u64() >= Some(1),
        "the create was tried again after the failed job: {}",
        read.body
    );
}

/// Tenant A's token endpoint fails: its writes stay queued, its mailboxes hold no worker once
/// its breaker opens, and tenant B's writes go out meanwhile; after the outage A's are
/// delivered, once.
#[tokio::test]
async fn a_tenant_in_outage_keeps_its_writes_queued_and_sends_them_after() {
    let w = Writing::start(ConflictPolicy::OutlookWins, &[0, 1]).await;
    let (a, b) = (w.mailbox(0, 0), w.mailbox(1, 0));
    let tenant_a = w.sim.tenants()[0].name.clone();
    let (a_id, b_id) = (w.id(&a).await, w.id(&b).await);
    let outage = w.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 503,
            graph_code: Some("temporarily_unavailable".into()),
            message: None,
            aadsts: None,
            retry_after: RetryAfter::None,
        })
        .endpoint(Endpoint::Token)
        .tenant(tenant_a),
    );
    let in_a = w.book(a_id, "a-1", "A booking", "k-1").await;
    let in_b = w.book(b_id, "b-1", "B booking", "k-2").await;
    w.pass().await;
    assert_eq!(w.state_of(&in_b).await["state"], "delivered");
    let queued = w.state_of(&in_a).await;
    assert_eq!(queued["state"], "queued", "{queued}");
    assert!(queued["last_error"].is_string(), "{queued}");
    w.sim.remove_fault(outage);
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.state_of(&in_a).await["state"] == "queued" {
        assert!(Instant::now() < deadline, "delivered after the outage");
        w.pass().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.state_of(&in_a).await["state"], "delivered");
    assert_eq!(w.in_outlook(&a, "A booking").len(), 1);
    assert_eq!(w.writes_stats().duplicates, 0);
}

/// calsync is killed (SIGKILL) after Graph committed a create and before calsync recorded it:
/// the next calsync on the same store sends it again with the same transactionId, and Outlook
/// holds one event.
#[tokio::test]
async fn a_kill_between_delivery_and_recording_makes_one_event() {
    let config = world(1, 1, 2);
    let sim = start_sim(config.clone()).await;
    let mailbox = sim.tenants()[0].mailboxes[0].clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("calsync.db");
    let toml_path = dir.path().join("calsync.toml");
    let mut toml = format!(
        r#"
[store]
url = "sqlite://{db}"
[graph]
base_url = "{base}"
authority = "{authority}"
connect_timeout = "1s"
request_timeout = "30s"
[sync]
interval = "1h"
jitter = "0s"
poll_interval = "20ms"
job_deadline = "60s"
[api]
token = "{TOKEN}"
[log]
level = "warn"
"#,
        db = db.display(),
        base = sim.graph_base_url(),
        authority = sim.authority(),
    );
    toml.push_str(&calsync::demo::tenants_toml(&config));
    toml.push_str("writes = true\n");
    std::fs::write(&toml_path, toml).expect("write the config");
    // Graph takes the create and never answers: calsync waits (30 s deadline) with the write
    // committed at Graph and unrecorded in its store.
    let hold = sim.add_fault(
        FaultRule::new(FaultKind::CommitThenHang)
            .endpoint(Endpoint::Writes)
            .max_count(1),
    );

    let mut first = ServeProcess::start(&toml_path).await;
    let store = Store::connect(&format!("sqlite://{}", db.display()), 2)
        .await
        .expect("open the store");
    let id = store
        .mailbox(&sim.tenants()[0].name, &mailbox)
        .await
        .expect("store reads")
        .expect("seeded")
        .id;
    let accepted = first.book(id).await;
    let write_id = accepted["id"].as_str().expect("write id").to_string();
    let committed = Instant::now() + Duration::from_secs(20);
    while sim.stats().writes.creates == 0 {
        assert!(Instant::now() < committed, "Graph received the create");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.child.kill().await.expect("kill -9 calsync");
    let state = store
        .write_by_id(&write_id)
        .await
        .expect("store reads")
        .expect("the write");
    assert_eq!(
        state.state.as_str(),
        "queued",
        "not recorded before the kill"
    );
    sim.remove_fault(hold);

    let second = ServeProcess::start(&toml_path).await;
    let delivered = Instant::now() + Duration::from_secs(30);
    loop {
        let record = store
            .write_by_id(&write_id)
            .await
            .expect("reads")
            .expect("write");
        if record.state.as_str() == "delivered" {
            break;
        }
        assert!(
            Instant::now() < delivered,
            "delivered after the restart: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = sim.stats().writes;
    assert_eq!(
        (stats.creates, stats.deduplicated, stats.duplicates),
        (1, 1, 0)
    );
    let made: Vec<Value> = sim
        .truth(&mailbox, None)
        .into_iter()
        .filter(|e| e["subject"] == "Killed booking")
        .collect();
    assert_eq!(made.len(), 1, "one event in Outlook");
    drop(second);
}

/// `calsync serve` as its own process, with its admin API on a free port.
struct ServeProcess {
    child: tokio::process::Child,
    api: String,
    http: reqwest::Client,
}

impl ServeProcess {
    async fn start(config: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut command = crate::helpers::serve_command(config, None);
        command.env("CALSYNC_SERVER__LISTEN", format!("127.0.0.1:{port}"));
        let child = command.spawn().expect("start calsync serve");
        let process = Self {
            child,
            api: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let ready = Instant::now() + Duration::from_secs(30);
        while process
            .http
            .get(format!("{}/readyz", process.api))
            .send()
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            assert!(Instant::now() < ready, "calsync serve became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    async fn book(&self, mailbox: i64) -> Value {
        let response = self
            .http
            .post(format!("{}/v1/mailboxes/{mailbox}/events", self.api))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", "kill-1")
            .json(&booking("killed-1", "Killed booking"))
            .send()
            .await
            .expect("the API answers");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.expect("JSON")
    }
}

/// A job delivers at most `writes.per_job` writes before its delta round; with more queued the
/// mailbox is due again at once, and the next jobs go on in order.
#[tokio::test]
async fn a_backlog_of_writes_is_delivered_a_batch_per_job_in_order() {
    let w = Writing::start_with(ConflictPolicy::OutlookWins, &[0], |s| {
        s.writes.per_job = 2;
    })
    .await;
    let alice = w.mailbox(0, 0);
    let id = w.id(&alice).await;
    let mut accepted = Vec::new();
    for n in 0..5 {
        accepted.push(
            w.book(
                id,
                &format!("b-{n}"),
                &format!("Slot {n}"),
                &format!("k-{n}"),
            )
            .await,
        );
    }
    let mut delivered_per_job = Vec::new();
    for _ in 0..3 {
        let results = w.pass().await;
        delivered_per_job.push(results[&alice].report.writes_delivered);
        if delivered_per_job.len() < 3 {
            assert!(
                w.check().record(&alice).await.sync_requested_at.is_some(),
                "more are queued: the mailbox is due again at once"
            );
        }
    }
    assert_eq!(delivered_per_job, [2, 2, 1]);
    let mut delivered_at = Vec::new();
    for reply in &accepted {
        let state = w.state_of(reply).await;
        assert_eq!(state["state"], "delivered", "{state}");
        delivered_at.push(state["delivered_at"].as_str().expect("a time").to_string());
    }
    let mut sorted = delivered_at.clone();
    sorted.sort();
    assert_eq!(delivered_at, sorted, "delivered in the order accepted");
    for n in 0..5 {
        assert_eq!(w.in_outlook(&alice, &format!("Slot {n}")).len(), 1);
    }
}

/// Graph keeps failing one mailbox's writes (5xx) while its reads work: the write waits,
/// queued, and the job still syncs the mailbox's calendar before it ends failed (the mailbox
/// backs off), so a write cannot hold back what the application reads.
#[tokio::test]
async fn a_write_graph_keeps_failing_does_not_hold_back_the_mailboxs_reads() {
    let w = Writing::start(ConflictPolicy::OutlookWins, &[0]).await;
    let alice = w.mailbox(0, 0);
    let id = w.id(&alice).await;
    w.pass().await;
    w.sim.add_fault(writes_unavailable(&alice));
    let booked = w.book(id, "b-1", "Advising", "k-1").await;
    w.sim.mutate_now(&alice, 3);
    let results = w.pass().await;
    let job = &results[&alice];
    assert_eq!(job.outcome, calsync::store::RunOutcome::Failed, "{job:?}");
    assert!(job.report.completed, "the delta round ran: {job:?}");
    w.check().assert_matches_truth(&alice).await;
    let state = w.state_of(&booked).await;
    assert_eq!(state["state"], "queued", "{state}");
    assert_eq!(state["attempts"], 1, "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{state}"
    );
}

/// Graph applies an update and its answer is lost: the retry finds the event already holding
/// the application's version (its If-Match is stale by then, a 412). That is the write's own
/// success, not someone's change in Outlook: delivered, not a conflict, and applied once.
#[tokio::test]
async fn an_update_whose_answer_is_lost_is_delivered_not_a_conflict() {
    for kind in [FaultKind::CommitThenHang, FaultKind::CommitThenReset] {
        let w = Writing::start(ConflictPolicy::OutlookWins, &[0]).await;
        let alice = w.mailbox(0, 0);
        let id = w.id(&alice).await;
        w.book(id, "b-1", "Advising", "k-1").await;
        w.pass().await;
        w.sim.add_fault(
            FaultRule::new(kind.clone())
                .endpoint(Endpoint::Writes)
                .mailbox(alice.clone())
                .max_count(1),
        );
        let moved = w
            .change(
                id,
                "b-1",
                json!({
                    "subject": "Advising (room 2)",
                    "start": {"dateTime": "2026-12-03T15:00:00", "timeZone": "UTC"},
                    "end": {"dateTime": "2026-12-03T15:30:00", "timeZone": "UTC"},
                }),
                "k-2",
            )
            .await;
        w.pass().await;
        let state = w.state_of(&moved).await;
        assert_eq!(state["state"], "delivered", "{kind:?}: {state}");
        assert!(
            state["note"]
                .as_str()
                .is_some_and(|n| n.contains("already held")),
            "{kind:?}: {state}"
        );
        assert_eq!(
            w.in_outlook(&alice, "Advising (room 2)").len(),
            1,
            "{kind:?}"
        );
        assert_eq!(w.writes_stats().updates, 1, "{kind:?}: applied once");
        // The next update compares with what the lost answer would have said.
        let again = w
            .change(id, "b-1", json!({"subject": "Advising (room 3)"}), "k-3")
            .await;
        w.pass().await;
        assert_eq!(w.state_of(&again).await["state"], "delivered", "{kind:?}");
    }
}

/// An update Graph keeps refusing with 412 (the event moved under every attempt) stays queued
/// for a later job, and the appointment's later writes wait behind it: they are delivered
/// after it, in order, never before.
#[tokio::test]
async fn a_write_left_for_later_holds_back_the_appointments_next_writes() {
    let w = Writing::start(ConflictPolicy::OutlookWins, &[0]).await;
    let alice = w.mailbox(0, 0);
    let id = w.id(&alice).await;
    w.book(id, "b-1", "Advising", "k-1").await;
    w.book(id, "b-2", "Review", "k-2").await;
    w.pass().await;
    w.sim
        .add_fault(writes_precondition_failed(&alice).max_count(3));
    let first = w
        .change(id, "b-1", json!({"subject": "Advising v2"}), "k-3")
        .await;
    let second = w
        .change(id, "b-1", json!({"subject": "Advising v3"}), "k-4")
        .await;
    let other = w
        .change(id, "b-2", json!({"subject": "Review v2"}), "k-5")
        .await;
    w.pass().await;
    let state = w.state_of(&first).await;
    assert_eq!(state["state"], "queued", "{state}");
    assert_eq!(state["attempts"], 1, "{state}");
    assert_eq!(
        w.state_of(&second).await["state"],
        "queued",
        "waits behind the first"
    );
    assert_eq!(
        w.in_outlook(&alice, "Advising").len(),
        1,
        "b-1 untouched so far"
    );
    assert_eq!(
        w.state_of(&other).await["state"],
        "delivered",
        "other appointments go on"
    );
    w.pass().await;
    assert_eq!(w.state_of(&first).await["state"], "delivered");
    assert_eq!(w.state_of(&second).await["state"], "delivered");
    assert_eq!(
        w.in_outlook(&alice, "Advising v3").len(),
        1,
        "the last one wins"
    );
}
