//! The resilience guarantees of DESIGN.md under faults the simulator injects on real sockets:
//! every job ends by its deadline and frees its slot (1), a tenant's outage stays that tenant's
//! (2), `Retry-After` is obeyed and never slept on a slot (3), nothing is lost or doubled once
//! the fault clears (4), and the state shows in health output (5). Millisecond settings.

use std::sync::Arc;
use std::time::Duration;

use calsync::resilience::breaker::BreakerState;
use calsync::resilience::guard::{BreakerSnapshot, Dependency};
use calsync::sim::{Endpoint, FaultKind, FaultRule, RetryAfter, SimHandle};
use calsync::store::RunOutcome;
use chrono::Utc;
use tokio::time::Instant;

use crate::helpers::sim::*;

/// Slack over a job deadline for the cut-off job to write its end.
const MARGIN: Duration = Duration::from_millis(500);
const TARGET: &str = "user1@tenant1.example";

fn breaker(app: &SimApp, tenant: &str, dependency: Dependency) -> BreakerSnapshot {
    app.worker
        .breakers(tenant)
        .into_iter()
        .find(|b| b.dependency == dependency)
        .expect("the tenant has that breaker")
}

/// Until when the tenant's token breaker refuses calls, if it does.
fn token_open_until(app: &SimApp, tenant: &str) -> Option<Instant> {
    app.worker.tenants()[tenant]
        .tokens
        .endpoint_available()
        .err()
        .map(|r| r.until)
}

fn running_of(app: &SimApp, tenant: &str) -> usize {
    app.worker
        .status()
        .running
        .iter()
        .filter(|j| j.tenant == tenant)
        .count()
}

async fn health(app: &SimApp) -> serde_json::Value {
    let listed = calsync::health::MAILBOX_DETAIL_PER_TENANT;
    let health = calsync::health::current(&app.store, &app.worker, listed)
        .await
        .expect("store reads");
    serde_json::to_value(health).expect("health serializes")
}

fn tenant_health<'a>(health: &'a serde_json::Value, tenant: &str) -> &'a serde_json::Value {
    health["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["name"] == tenant)
        .expect("tenant in health")
}

// ---- 5: network faults on one mailbox's Graph requests ----

/// One mailbox's Graph requests all fail with `kind`: its job ends by the deadline, frees its
/// slot and keeps its events; the other mailboxes (same tenant too) sync as if nothing
/// happened; after the fault clears, one pass brings the mailbox to ground truth.
async fn graph_fault_on_one_mailbox_is_contained(kind: FaultKind) {
    let app = sim_app(world(2, 2, 30), fast).await;
    app.pass_ok().await;
    let before = app.stored(TARGET).await;
    for mailbox in app.mailbox_names() {
        app.sim.mutate_now(&mailbox, 6);
    }
    let rule = app.sim.add_fault(
        FaultRule::new(kind.clone())
            .endpoint(Endpoint::Graph)
            .mailbox(TARGET),
    );
    let deadline = app.settings.sync.job_deadline;

    let started = Instant::now();
    let results = app.pass().await;
    let took = started.elapsed();

    assert!(
        took <= deadline + MARGIN,
        "{kind:?}: the pass took {took:?}; job deadline {deadline:?}"
    );
    let status = app.worker.status();
    assert_eq!(status.busy_slots, 0, "{kind:?}: every slot released");
    assert!(status.running.is_empty());
    let target = &results[TARGET];
    assert_ne!(target.outcome, RunOutcome::Ok, "{kind:?}");
    assert!(target.error.is_some());
    let fired = app.sim.stats().faults_fired[&rule];
    let attempts = 1 + u64::from(app.settings.resilience.retries_per_request);
    assert!(
        (1..=attempts).contains(&fired),
        "{kind:?}: {fired} requests hit the fault; retries are bounded by {attempts}"
    );
    let record = app.record(TARGET).await;
    assert_eq!(record.lease_owner, None, "lease released");
    let run = &app.store.runs(record.id, 1).await.expect("runs")[0];
    let ran = (run.finished_at - run.started_at)
        .to_std()
        .expect("ends after it starts");
    assert!(ran <= deadline + MARGIN, "{kind:?}: job ran {ran:?}");
    assert_eq!(run.outcome, target.outcome.as_str());
    assert_eq!(
        app.stored(TARGET).await,
        before,
        "{kind:?}: nothing of a failed page applied"
    );
    for (mailbox, result) in &results {
        if mailbox != TARGET {
            assert_eq!(
                result.outcome,
                RunOutcome::Ok,
                "{mailbox}: {:?}",
                result.error
            );
            app.assert_matches_truth(mailbox).await;
        }
    }
    for tenant in ["tenant1", "tenant2"] {
        assert_eq!(
            breaker(&app, tenant, Dependency::Graph).state,
            BreakerState::Closed,
            "one mailbox's trouble does not open {tenant}'s breaker"
        );
    }

    // Requests the client gave up on may still be in flight at the server (a slow answer).
    assert!(app.sim.remove_fault(rule));
    wait_for("abandoned requests end", Duration::from_secs(3), || {
        app.sim.stats().mailboxes[TARGET].in_flight == 0
    })
    .await;
    app.pass_ok().await;
    app.assert_all_match_truth().await;
    let violations = app.sim.stats().violations;
    assert_eq!(violations.early_retry.count, 0, "{kind:?}");
    assert_eq!(violations.over_concurrency.count, 0, "{kind:?}");
    eprintln!(
        "graph fault {kind:?}: pass {took:?}, target job {ran:?} ({}), {fired} faulted requests",
        target.outcome.as_str()
    );
}

#[tokio::test]
async fn graph_hang_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::Hang).await;
}

#[tokio::test]
async fn graph_trickle_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::Trickle {
        bytes_per_second: 20,
    })
    .await;
}

#[tokio::test]
async fn graph_reset_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::Reset).await;
}

#[tokio::test]
async fn graph_latency_past_the_request_timeout_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::Latency { ms: 700 }).await;
}

#[tokio::test]
async fn graph_malformed_json_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::MalformedJson).await;
}

#[tokio::test]
async fn graph_truncated_json_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::TruncatedJson).await;
}

#[tokio::test]
async fn graph_oversized_body_on_one_mailbox_is_contained() {
    graph_fault_on_one_mailbox_is_contained(FaultKind::Oversized { bytes: 4 << 20 }).await;
}

fn status(code: u16) -> FaultKind {
    FaultKind::Status {
        code,
        graph_code: None,
        message: None,
        aadsts: None,
        retry_after: RetryAfter::None,
    }
}

#[tokio::test]
async fn graph_5xx_on_one_mailbox_is_contained() {
    for code in [500, 502, 503, 504] {
        graph_fault_on_one_mailbox_is_contained(status(code)).await;
    }
}

// ---- one mailbox Graph cannot serve: its own backoff, never its tenant's breaker ----

fn unknown_error_504() -> FaultKind {
    FaultKind::Status {
        code: 504,
        graph_code: Some("UnknownError".into()),
        message: None,
        aadsts: None,
        retry_after: RetryAfter::None,
    }
}

/// Graph answers 504 to every page of one mailbox (calendars with endless recurrences are a
/// known case). With a breaker that three failures would trip, the tenant's breaker stays
/// closed, also while the tenant is quiet and only that mailbox's backed-off retries run (no
/// success in between): retries of one request are one piece of evidence, and failures of one
/// mailbox are not spread evidence. The mailbox backs off on its own; its neighbours sync.
#[tokio::test]
async fn a_mailbox_answering_504_to_every_page_holds_back_only_itself() {
    let app = sim_app(world(1, 4, 20), |s| {
        fast(s);
        s.resilience.breaker.min_calls = 3;
    })
    .await;
    app.pass_ok().await;
    let names = app.mailbox_names();
    let bad = names[0].clone();
    app.sim.add_fault(
        FaultRule::new(unknown_error_504())
            .endpoint(Endpoint::Graph)
            .mailbox(&bad),
    );

    // A quiet tenant: the others are not due (interval 60 s); the bad one, asked to sync now,
    // then runs whenever its own backoff (50-200 ms) lets it.
    let bad_id = app.record(&bad).await.id;
    app.store
        .request_sync(bad_id, chrono::Utc::now())
        .await
        .expect("store writes");
    let mut d = Dispatcher::new(app.worker.clone());
    let mut failures = 0;
    d.step_until(
        "six failed jobs of the 504 mailbox",
        Duration::from_secs(20),
        Duration::from_millis(10),
        |d| {
            failures = d
                .finished
                .iter()
                .filter(|(_, r)| r.mailbox == bad && r.outcome == RunOutcome::Failed)
                .count();
            failures >= 6
        },
    )
    .await;
    d.drain().await;
    assert!(
        d.finished.iter().all(|(_, r)| r.mailbox == bad),
        "the others were not due"
    );
    let graph = breaker(&app, "tenant1", Dependency::Graph);
    assert_eq!(graph.state, BreakerState::Closed);
    assert_eq!(
        graph.trips, 0,
        "{failures} failed jobs in a row did not trip it"
    );
    let record = app.record(&bad).await;
    assert!(record.consecutive_failures >= 6, "its own failure count");
    assert!(
        record.next_run_at > record.last_error_at.expect("failed"),
        "it waits its own backoff"
    );

    // Its neighbours sync as usual meanwhile.
    for mailbox in &names[1..] {
        app.sim.mutate_now(mailbox, 2);
    }
    let results = app.pass().await;
    assert_eq!(results[&bad].outcome, RunOutcome::Failed);
    for mailbox in &names[1..] {
        assert_eq!(
            results[mailbox].outcome,
            RunOutcome::Ok,
            "{mailbox}: {:?}",
            results[mailbox].error
        );
        app.assert_matches_truth(mailbox).await;
    }
    assert_eq!(breaker(&app, "tenant1", Dependency::Graph).trips, 0);
}

/// The same 504s on every mailbox of the tenant are evidence that Graph fails the tenant: its
/// breaker opens (a failure rate over calls of several mailboxes, one per request).
#[tokio::test]
async fn failures_spread_over_mailboxes_open_the_tenant_breaker() {
    let app = sim_app(world(1, 4, 20), |s| {
        fast(s);
        s.resilience.breaker.min_calls = 3;
    })
    .await;
    app.pass_ok().await;
    let names = app.mailbox_names();
    for bad in &names {
        app.sim.add_fault(
            FaultRule::new(unknown_error_504())
                .endpoint(Endpoint::Graph)
                .mailbox(bad),
        );
    }
    for _ in 0..3 {
        app.pass().await;
        if breaker(&app, "tenant1", Dependency::Graph).trips > 0 {
            break;
        }
    }
    assert!(
        breaker(&app, "tenant1", Dependency::Graph).trips >= 1,
        "failing mailboxes open the tenant's breaker"
    );
}

/// A connection Graph resets is evidence against Graph at once, from a single mailbox: in the
/// same quiet tenant as the 504 case above, where only that mailbox's jobs run, its breaker
/// opens.
#[tokio::test]
async fn connection_failures_count_against_the_tenant_from_one_mailbox() {
    let app = sim_app(world(1, 4, 20), |s| {
        fast(s);
        s.resilience.breaker.min_calls = 3;
    })
    .await;
    app.pass_ok().await;
    let bad = app.mailbox_names()[0].clone();
    app.sim.add_fault(
        FaultRule::new(FaultKind::Reset)
            .endpoint(Endpoint::Graph)
            .mailbox(&bad),
    );
    let bad_id = app.record(&bad).await.id;
    app.store
        .request_sync(bad_id, chrono::Utc::now())
        .await
        .expect("store writes");
    let mut d = Dispatcher::new(app.worker.clone());
    d.step_until(
        "the tenant's Graph breaker opens",
        Duration::from_secs(20),
        Duration::from_millis(10),
        |_| breaker(&app, "tenant1", Dependency::Graph).trips >= 1,
    )
    .await;
    d.drain().await;
    assert!(
        d.finished.iter().all(|(_, r)| r.mailbox == bad),
        "only the reset mailbox ran"
    );
}

// ---- 10: a fault in the middle of a full round ----

/// A full round is cut by `kind` after a few pages have committed (calendars changing too):
/// the pages before it stay, the next job resumes from the stored nextLink instead of starting
/// over, and the mailbox ends equal to ground truth with no event lost or stored twice.
async fn a_round_cut_mid_way_resumes_without_loss_or_duplicates(kind: FaultKind) {
    let app = sim_app(world(1, 1, 90), fast).await;
    let mailbox = app.mailbox_names().remove(0);
    app.sim.add_fault(
        FaultRule::new(FaultKind::Latency { ms: 30 })
            .endpoint(Endpoint::Graph)
            .mailbox(&mailbox),
    );
    let pass = {
        let worker = app.worker.clone();
        tokio::spawn(async move { worker.sync_all_once().await })
    };
    wait_for("three pages served", Duration::from_secs(5), || {
        app.graph_statuses(&mailbox).get(&200).copied().unwrap_or(0) >= 3
    })
    .await;
    let fault = app.sim.add_fault(
        FaultRule::new(kind.clone())
            .endpoint(Endpoint::Graph)
            .mailbox(&mailbox),
    );
    app.sim.mutate_now(&mailbox, 10);
    let cut = pass.await.expect("no panic").expect("pass runs").remove(0);

    assert_ne!(cut.outcome, RunOutcome::Ok, "{kind:?}");
    assert!(cut.report.pages >= 3, "{kind:?}: {:?}", cut.report);
    let record = app.record(&mailbox).await;
    assert!(
        record.cursor.full && record.cursor.next_link.is_some(),
        "mid-round"
    );
    let partial = app.stored(&mailbox).await.len() as u64;
    assert_eq!(
        partial, cut.report.upserted,
        "{kind:?}: committed pages kept"
    );
    assert!(app.sim.remove_fault(fault));

    let resumed = app.pass_ok().await.remove(&mailbox).expect("result");
    assert!(resumed.report.full_round && resumed.report.completed);
    assert!(!resumed.report.resynced, "resumed, not restarted");
    let whole = app.truth(&mailbox).await.len() as u64;
    assert!(
        resumed.report.pages + cut.report.pages <= whole.div_ceil(10) + 2,
        "{kind:?}: {} + {} pages for {whole} events: the round was not started over",
        cut.report.pages,
        resumed.report.pages
    );
    // The changes made after the round began come with the next (incremental) round.
    let next = app.pass_ok().await.remove(&mailbox).expect("result");
    assert!(!next.report.full_round);
    app.assert_matches_truth(&mailbox).await;
    eprintln!(
        "round cut by {kind:?} after {} pages ({partial} events kept); resumed with {} more pages",
        cut.report.pages, resumed.report.pages
    );
}

#[tokio::test]
async fn a_round_cut_by_a_reset_resumes_without_loss_or_duplicates() {
    a_round_cut_mid_way_resumes_without_loss_or_duplicates(FaultKind::Reset).await;
}

#[tokio::test]
async fn a_round_cut_by_a_hang_resumes_without_loss_or_duplicates() {
    a_round_cut_mid_way_resumes_without_loss_or_duplicates(FaultKind::Hang).await;
}

#[tokio::test]
async fn a_round_cut_by_truncated_json_or_503_resumes_without_loss_or_duplicates() {
    a_round_cut_mid_way_resumes_without_loss_or_duplicates(FaultKind::TruncatedJson).await;
    a_round_cut_mid_way_resumes_without_loss_or_duplicates(status(503)).await;
}

// ---- 6: a tenant's token endpoint down ----

const TOKEN_BREAK: Duration = Duration::from_secs(3);

/// Tenant A's token endpoint fails with `kind`. A's token breaker opens; while it is open A's
/// mailboxes are not claimed and the endpoint gets no request; tenant B syncs on schedule
/// throughout; after the break one probe goes out (half-open) and closes it, and A catches up.
async fn token_outage_is_contained_to_its_tenant(kind: FaultKind) {
    let (a, b) = ("tenant1", "tenant2");
    let app = sim_app(world(2, 2, 20), |s| {
        fast(s);
        s.sync.interval = Duration::from_millis(150);
        s.sync.job_deadline = Duration::from_millis(1500);
        s.sync.workers = 4;
        s.resilience.breaker.min_calls = 3;
        // B's rounds are counted while A's breaker is open: a break of seconds leaves room for
        // them on a loaded machine (under 0.7 s, B managed 3 of the 4 asked for).
        s.resilience.breaker.base_break = TOKEN_BREAK;
        s.resilience.breaker.max_break = TOKEN_BREAK * 2;
    })
    .await;
    let b_mailboxes: Vec<String> = app.sim.tenants()[1].mailboxes.clone();
    let a_mailboxes: Vec<String> = app.sim.tenants()[0].mailboxes.clone();
    let outage = app.sim.add_fault(
        FaultRule::new(kind.clone())
            .tenant(a)
            .endpoint(Endpoint::Token),
    );
    let mut d = Dispatcher::new(app.worker.clone());
    let mut states = vec![breaker(&app, a, Dependency::Token).state];
    let outage_started = Instant::now();
    let mut b_max_lag = chrono::Duration::zero();

    let step = Duration::from_millis(10);
    d.step_until(
        "A's token breaker opens",
        Duration::from_secs(10),
        step,
        |_| breaker(&app, a, Dependency::Token).state == BreakerState::Open,
    )
    .await;
    states.push(BreakerState::Open);
    let until = token_open_until(&app, a).expect("open: calls refused");
    let opened_after = outage_started.elapsed();
    let token_calls_at_open = app.token_requests(a);

    // A's jobs that were running when it opened end at once, deferred.
    let give_up = Instant::now() + Duration::from_secs(1);
    while running_of(&app, a) > 0 {
        assert!(Instant::now() < give_up, "A's jobs did not stop");
        tokio::time::sleep(Duration::from_millis(5)).await;
        d.collect();
    }
    // The open period: A is not claimed, holds no slot, and its endpoint hears nothing.
    let mut steps_while_open = 0;
    while Instant::now() + Duration::from_millis(30) < until {
        d.step().await;
        steps_while_open += 1;
        assert_eq!(
            running_of(&app, a),
            0,
            "A claimed while its breaker is open"
        );
        let busy = app.worker.status().busy_slots;
        assert!(busy <= b_mailboxes.len(), "only B holds slots: {busy}");
        for m in &b_mailboxes {
            if let Some(last) = app.record(m).await.last_success_at {
                b_max_lag = b_max_lag.max(Utc::now() - last);
            }
        }
        tokio::time::sleep(step).await;
    }
    d.collect();
    assert_eq!(
        app.token_requests(a),
        token_calls_at_open,
        "no token request while the breaker is open"
    );
    for m in &a_mailboxes {
        let r = app.record(m).await;
        assert_eq!(r.lease_owner, None, "{m} not claimed while open");
        assert_eq!(r.last_success_at, None);
    }
    let deferred = d
        .finished
        .iter()
        .filter(|(_, r)| r.tenant == a && r.outcome == RunOutcome::Deferred)
        .count();
    assert!(
        deferred >= 1,
        "A's jobs end deferred once the breaker is open"
    );
    assert!(steps_while_open >= 10, "the open period was observed");

    // B kept syncing on schedule during the outage.
    let b_ok = d
        .finished
        .iter()
        .filter(|(_, r)| r.tenant == b)
        .inspect(|(_, r)| assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error))
        .count();
    assert!(
        b_ok >= 2 * b_mailboxes.len(),
        "B synced {b_ok} times during the outage"
    );
    // Held back by A, B's lag would grow through the whole break; on schedule it stays near the
    // interval (about 0.2 s; more on a loaded machine).
    assert!(
        b_max_lag.to_std().unwrap_or_default() < TOKEN_BREAK / 2,
        "B's lag grew to {b_max_lag}"
    );
    for dep in [Dependency::Token, Dependency::Graph] {
        assert_eq!(breaker(&app, b, dep).state, BreakerState::Closed);
    }

    // Recovery: the endpoint answers (slowly, so the probe can be seen half-open).
    assert!(app.sim.remove_fault(outage));
    let slow = app.sim.add_fault(
        FaultRule::new(FaultKind::Latency { ms: 150 })
            .tenant(a)
            .endpoint(Endpoint::Token),
    );
    let mut max_a_running_half_open = 0;
    d.step_until(
        "A's token breaker closes again",
        Duration::from_secs(10),
        Duration::from_millis(5),
        |_| {
            let state = breaker(&app, a, Dependency::Token).state;
            if states.last() != Some(&state) {
                states.push(state);
            }
            if state == BreakerState::HalfOpen {
                max_a_running_half_open = max_a_running_half_open.max(running_of(&app, a));
            }
            state == BreakerState::Closed
        },
    )
    .await;
    assert_eq!(
        states,
        vec![
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::Closed
        ]
    );
    assert!(
        Instant::now() >= until,
        "no probe before the break time was over"
    );
    assert_eq!(max_a_running_half_open, 1, "one probe job while half-open");
    assert_eq!(
        app.token_requests(a),
        token_calls_at_open + 1,
        "exactly one probe"
    );
    app.sim.remove_fault(slow);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let mut synced = 0;
        for m in &a_mailboxes {
            synced += usize::from(app.record(m).await.last_success_at.is_some());
        }
        if synced == a_mailboxes.len() {
            break;
        }
        assert!(Instant::now() < give_up, "A did not catch up");
        d.step().await;
        tokio::time::sleep(step).await;
    }
    d.drain().await;
    assert_eq!(app.worker.status().busy_slots, 0);
    app.assert_all_match_truth().await;
    eprintln!(
        "token outage {kind:?}: breaker opened after {opened_after:?} with {token_calls_at_open} token requests; \
         {steps_while_open} dispatch steps while open, none claimed A; B synced {b_ok} times, max lag {} ms",
        b_max_lag.num_milliseconds()
    );
}

#[tokio::test]
async fn token_endpoint_hang_for_a_tenant_is_contained() {
    token_outage_is_contained_to_its_tenant(FaultKind::Hang).await;
}

#[tokio::test]
async fn token_endpoint_503_for_a_tenant_is_contained() {
    token_outage_is_contained_to_its_tenant(status(503)).await;
}

#[tokio::test]
async fn token_endpoint_reset_for_a_tenant_is_contained() {
    token_outage_is_contained_to_its_tenant(FaultKind::Reset).await;
}

/// Graph down for all of tenant A's mailboxes (503): A's Graph breaker opens; while it is
/// open (probe at least a second away) A is not claimed and Graph hears nothing of A; B syncs
/// throughout; after the break one probe (seen half-open) closes it and A catches up.
#[tokio::test]
async fn graph_503_for_a_whole_tenant_opens_its_graph_breaker_and_spares_the_other() {
    let (a, b) = ("tenant1", "tenant2");
    let app = sim_app(world(2, 2, 20), |s| {
        fast(s);
        s.sync.interval = Duration::from_millis(150);
        s.sync.workers = 4;
        s.resilience.breaker.min_calls = 4;
        // Health shows the time to the probe in whole seconds: break long enough to see it.
        s.resilience.breaker.base_break = Duration::from_millis(2200);
        s.resilience.breaker.max_break = Duration::from_secs(4);
    })
    .await;
    let a_mailboxes = app.sim.tenants()[0].mailboxes.clone();
    let b_mailboxes = app.sim.tenants()[1].mailboxes.clone();
    let outage = app.sim.add_fault(
        FaultRule::new(status(503))
            .tenant(a)
            .endpoint(Endpoint::Graph),
    );
    let mut d = Dispatcher::new(app.worker.clone());
    let step = Duration::from_millis(10);
    d.step_until(
        "A's Graph breaker opens",
        Duration::from_secs(10),
        step,
        |_| breaker(&app, a, Dependency::Graph).state == BreakerState::Open,
    )
    .await;
    let give_up = Instant::now() + Duration::from_secs(1);
    while running_of(&app, a) > 0 {
        assert!(Instant::now() < give_up, "A's jobs did not stop");
        tokio::time::sleep(Duration::from_millis(5)).await;
        d.collect();
    }
    let graph_calls_at_open = app.sim.stats().tenants[a].graph_requests;
    let mut steps_while_open = 0;
    while breaker(&app, a, Dependency::Graph)
        .probe_in_seconds
        .is_some_and(|s| s >= 1)
    {
        d.step().await;
        steps_while_open += 1;
        assert_eq!(
            running_of(&app, a),
            0,
            "A claimed while its breaker is open"
        );
        for m in &a_mailboxes {
            assert_eq!(app.record(m).await.lease_owner, None);
        }
        tokio::time::sleep(step).await;
    }
    assert!(steps_while_open >= 20, "the open period was observed");
    assert_eq!(
        app.sim.stats().tenants[a].graph_requests,
        graph_calls_at_open,
        "no Graph request for A while its breaker is open"
    );
    let b_ok = d
        .finished
        .iter()
        .filter(|(_, r)| r.tenant == b)
        .inspect(|(_, r)| assert_eq!(r.outcome, RunOutcome::Ok, "{:?}", r.error))
        .count();
    assert!(b_ok >= 3 * b_mailboxes.len(), "B synced {b_ok} times");
    assert_eq!(
        breaker(&app, b, Dependency::Graph).state,
        BreakerState::Closed
    );

    assert!(app.sim.remove_fault(outage));
    let slow = app.sim.add_fault(
        FaultRule::new(FaultKind::Latency { ms: 150 })
            .tenant(a)
            .endpoint(Endpoint::Graph),
    );
    let mut states = vec![BreakerState::Open];
    let mut max_a_running_half_open = 0;
    d.step_until(
        "A's Graph breaker closes again",
        Duration::from_secs(10),
        Duration::from_millis(5),
        |_| {
            let state = breaker(&app, a, Dependency::Graph).state;
            if states.last() != Some(&state) {
                states.push(state);
            }
            if state == BreakerState::HalfOpen {
                max_a_running_half_open = max_a_running_half_open.max(running_of(&app, a));
            }
            state == BreakerState::Closed
        },
    )
    .await;
    assert_eq!(
        states,
        vec![
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::Closed
        ]
    );
    assert_eq!(max_a_running_half_open, 1, "one probe job while half-open");
    app.sim.remove_fault(slow);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let mut synced = 0;
        for m in &a_mailboxes {
            synced += usize::from(app.record(m).await.last_success_at.is_some());
        }
        if synced == a_mailboxes.len() {
            break;
        }
        assert!(Instant::now() < give_up, "A did not catch up");
        d.step().await;
        tokio::time::sleep(step).await;
    }
    d.drain().await;
    assert_eq!(app.worker.status().busy_slots, 0);
    app.assert_all_match_truth().await;
    eprintln!(
        "Graph 503 for tenant A: {graph_calls_at_open} Graph requests until open; {steps_while_open} dispatch steps while open, none claimed A; B synced {b_ok} times"
    );
}

// ---- 7: Retry-After ----

/// When the simulator answered each Graph request of `mailbox` (polled every millisecond).
/// When the simulator received a mailbox's requests, as it recorded them on arrival.
struct RequestClock {
    sim: SimHandle,
    mailbox: String,
    before: usize,
}

impl RequestClock {
    fn start(sim: &SimHandle, mailbox: &str) -> Self {
        let before = sim.stats().mailboxes[mailbox].arrivals.len();
        Self {
            sim: sim.clone(),
            mailbox: mailbox.to_string(),
            before,
        }
    }

    fn times(&self) -> Vec<Instant> {
        let arrivals = self.sim.stats().mailboxes[&self.mailbox].arrivals.clone();
        arrivals.into_iter().skip(self.before).collect()
    }
}

/// Arrival times are exact; this only absorbs the simulator's own bookkeeping before it
/// records the arrival.
const CLOCK_SLACK: Duration = Duration::from_millis(1);

async fn throttled_app(deadline: Duration) -> SimApp {
    sim_app(world(1, 1, 20), |s| {
        fast(s);
        s.graph.page_size = 50;
        s.sync.job_deadline = deadline;
        s.graph.request_timeout = Duration::from_millis(800);
        s.resilience.retry_initial = Duration::from_millis(200);
        s.resilience.retry_max = Duration::from_secs(1);
    })
    .await
}

fn throttle(retry_after: RetryAfter) -> FaultRule {
    FaultRule::new(FaultKind::Status {
        code: 429,
        graph_code: Some("ApplicationThrottled".into()),
        message: None,
        aadsts: None,
        retry_after,
    })
    .endpoint(Endpoint::Graph)
    .mailbox("user1@tenant1.example")
}

/// A 429 with `retry_after`: the job waits at least that long in the slot (it fits in the
/// deadline), retries once and completes; the simulator saw no early retry.
async fn retry_after_is_obeyed(retry_after: RetryAfter, at_least: Duration) -> Duration {
    let app = throttled_app(Duration::from_secs(4)).await;
    let mailbox = app.mailbox_names().remove(0);
    app.sim.add_fault(throttle(retry_after).max_count(1));
    let clock = RequestClock::start(&app.sim, &mailbox);

    let results = app.pass().await;

    let times = clock.times();
    assert_eq!(
        results[&mailbox].outcome,
        RunOutcome::Ok,
        "{:?}",
        results[&mailbox].error
    );
    let statuses = app.graph_statuses(&mailbox);
    assert_eq!(statuses.get(&429), Some(&1), "{statuses:?}");
    assert_eq!(app.sim.stats().violations.early_retry.count, 0);
    assert!(times.len() >= 2, "{times:?}");
    let gap = times[1] - times[0];
    assert!(
        gap + CLOCK_SLACK >= at_least,
        "{retry_after:?}: retried after {gap:?}"
    );
    app.assert_matches_truth(&mailbox).await;
    gap
}

#[tokio::test]
async fn retry_after_in_seconds_is_obeyed() {
    let gap = retry_after_is_obeyed(RetryAfter::Seconds(1), Duration::from_secs(1)).await;
    assert!(
        gap < Duration::from_millis(1300),
        "and not much more: {gap:?}"
    );
    eprintln!("Retry-After: 1 -> retried after {gap:?}");
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_obeyed() {
    // The date has whole seconds; the simulator rounds it up, so the date is never before
    // the instant it enforces, and obeying the date means waiting at least the 2 s.
    let gap = retry_after_is_obeyed(RetryAfter::HttpDate(2), Duration::from_secs(2)).await;
    assert!(
        gap < Duration::from_millis(3500),
        "and not much more: {gap:?}"
    );
    eprintln!("Retry-After: <date in 2 s> -> retried after {gap:?}");
}

#[tokio::test]
async fn retry_after_on_the_token_endpoint_is_obeyed() {
    let app = throttled_app(Duration::from_secs(4)).await;
    let mailbox = app.mailbox_names().remove(0);
    app.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 429,
            graph_code: None,
            message: None,
            aadsts: None,
            retry_after: RetryAfter::Seconds(1),
        })
        .tenant("tenant1")
        .endpoint(Endpoint::Token)
        .max_count(1),
    );

    let started = Instant::now();
    let results = app.pass().await;
    let took = started.elapsed();

    assert_eq!(
        results[&mailbox].outcome,
        RunOutcome::Ok,
        "{:?}",
        results[&mailbox].error
    );
    let stats = app.sim.stats();
    assert_eq!(stats.tenants["tenant1"].token_by_status.get(&429), Some(&1));
    assert_eq!(stats.tenants["tenant1"].token_requests, 2);
    assert_eq!(
        stats.violations.early_retry.count, 0,
        "{:?}",
        stats.violations
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    app.assert_matches_truth(&mailbox).await;
}

#[tokio::test]
async fn a_429_without_retry_after_backs_off_exponentially() {
    let app = throttled_app(Duration::from_secs(4)).await;
    let mailbox = app.mailbox_names().remove(0);
    app.sim.add_fault(throttle(RetryAfter::None).max_count(2));
    let clock = RequestClock::start(&app.sim, &mailbox);

    let results = app.pass().await;

    let times = clock.times();
    assert_eq!(
        results[&mailbox].outcome,
        RunOutcome::Ok,
        "{:?}",
        results[&mailbox].error
    );
    assert_eq!(app.graph_statuses(&mailbox).get(&429), Some(&2));
    assert!(times.len() >= 3, "{times:?}");
    let (first, second) = (times[1] - times[0], times[2] - times[1]);
    // retry_initial 200 ms with ±50 % jitter, doubling: [100, 300] ms then [200, 600] ms.
    assert!(
        first + CLOCK_SLACK >= Duration::from_millis(100),
        "{first:?}"
    );
    assert!(
        second + CLOCK_SLACK >= Duration::from_millis(200),
        "{second:?}"
    );
    assert_eq!(app.sim.stats().violations.early_retry.count, 0);
    app.assert_matches_truth(&mailbox).await;
    eprintln!("429 without Retry-After: backoff {first:?} then {second:?}");
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_defers_the_job_without_holding_its_slot() {
    let app = throttled_app(Duration::from_secs(1)).await;
    let mailbox = app.mailbox_names().remove(0);
    app.sim
        .add_fault(throttle(RetryAfter::Seconds(30)).max_count(1));

    let started_wall = Utc::now();
    let started = Instant::now();
    let results = app.pass().await;
    let took = started.elapsed();

    let result = &results[&mailbox];
    assert_eq!(result.outcome, RunOutcome::Deferred, "{:?}", result.error);
    assert!(
        took < Duration::from_millis(500),
        "the job ended at once instead of sleeping on its slot: {took:?}"
    );
    assert_eq!(app.worker.status().busy_slots, 0);
    assert!(
        result.next_run_at >= started_wall + chrono::Duration::seconds(30),
        "rescheduled for after the Retry-After: {} vs {started_wall}",
        result.next_run_at
    );
    let record = app.record(&mailbox).await;
    assert!(
        (record.next_run_at - result.next_run_at)
            .num_milliseconds()
            .abs()
            <= 1,
        "stored as scheduled (to the millisecond)"
    );
    assert_eq!(
        record.consecutive_failures, 0,
        "a deferral is not a failure"
    );
    assert_eq!(record.lease_owner, None);
    // The dispatcher leaves it alone until then; the simulator heard one request.
    let mut d = Dispatcher::new(app.worker.clone());
    assert_eq!(d.step().await, 0);
    assert_eq!(app.sim.stats().mailboxes[&mailbox].requests, 1);
    assert_eq!(app.sim.stats().violations.early_retry.count, 0);
}

// ---- 8: credentials rejected ----

#[tokio::test]
async fn rejected_credentials_open_the_token_breaker_as_permanent_and_stop_token_requests() {
    let (a, b) = ("tenant1", "tenant2");
    let permanent_break = Duration::from_millis(1500);
    let app = sim_app(world(2, 1, 20), |s| {
        fast(s);
        s.resilience.breaker.permanent_break = permanent_break;
        s.resilience.breaker.max_break = Duration::from_secs(1);
    })
    .await;
    let a_mailbox = app.sim.tenants()[0].mailboxes[0].clone();
    let rejected = app.sim.add_fault(
        FaultRule::new(FaultKind::Status {
            code: 401,
            graph_code: Some("invalid_client".into()),
            message: None,
            aadsts: Some(7000215),
            retry_after: RetryAfter::None,
        })
        .tenant(a)
        .endpoint(Endpoint::Token),
    );
    let mut d = Dispatcher::new(app.worker.clone());
    let closed_seen = Instant::now();
    d.step().await;
    d.drain().await;

    let snapshot = breaker(&app, a, Dependency::Token);
    assert_eq!(snapshot.state, BreakerState::Open);
    assert!(snapshot.permanent);
    let until = token_open_until(&app, a).expect("open");
    assert!(
        until >= closed_seen + permanent_break,
        "open for the permanent break time"
    );
    assert_eq!(app.token_requests(a), 1, "a rejection is not retried");
    let h = health(&app).await;
    assert_eq!(
        tenant_health(&h, a)["auth_failing_permanently"],
        true,
        "{h:#}"
    );
    assert_eq!(tenant_health(&h, a)["status"], "degraded");
    assert_eq!(tenant_health(&h, b)["auth_failing_permanently"], false);
    assert_eq!(tenant_health(&h, b)["status"], "ok");
    let error = app.record(&a_mailbox).await.last_error.expect("an error");
    assert!(error.contains("7000215"), "{error}");

    // Not the dispatcher, not even a forced pass, asks again while it is open.
    let forced = app.pass().await;
    assert_ne!(forced[&a_mailbox].outcome, RunOutcome::Ok);
    while Instant::now() + Duration::from_millis(30) < until {
        d.step().await;
        assert_eq!(running_of(&app, a), 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.token_requests(a),
        1,
        "no token request until the break is over"
    );

    // After it: one probe, still rejected, open again for the permanent break.
    d.step_until(
        "the probe after the permanent break",
        Duration::from_secs(3),
        Duration::from_millis(10),
        |_| app.token_requests(a) >= 2,
    )
    .await;
    d.drain().await;
    assert_eq!(app.token_requests(a), 2, "one probe");
    assert!(breaker(&app, a, Dependency::Token).permanent);

    // The secret is fixed: the next probe closes it and the mailbox syncs.
    assert!(app.sim.remove_fault(rejected));
    let give_up = Instant::now() + Duration::from_secs(5);
    while app.record(&a_mailbox).await.last_success_at.is_none() {
        assert!(Instant::now() < give_up, "A did not recover");
        d.step().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.drain().await;
    assert_eq!(
        breaker(&app, a, Dependency::Token).state,
        BreakerState::Closed
    );
    let h = health(&app).await;
    assert_eq!(tenant_health(&h, a)["auth_failing_permanently"], false);
    assert_eq!(app.token_requests(a), 3);
    app.assert_all_match_truth().await;
}

// ---- 9: a job that blocks its thread ----

/// Starts a job (through the worker's test seam) that blocks its runtime thread, so the
/// deadline cannot cancel it (it never yields), until the returned sender sends or is dropped,
/// or `at_most` has passed. Keep the sender for as long as the job must block.
fn spawn_blocking_job(
    worker: &Arc<calsync::scheduler::Worker>,
    tenant: &str,
    mailbox: &str,
    at_most: Duration,
) -> (
    tokio::task::JoinHandle<Option<bool>>,
    std::sync::mpsc::Sender<()>,
) {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (worker, tenant, mailbox) = (worker.clone(), tenant.to_string(), mailbox.to_string());
    let job = tokio::spawn(async move {
        worker
            .run_in_slot_for_test(&tenant, &mailbox, async move {
                let _ = released.recv_timeout(at_most);
            })
            .await
    });
    (job, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_blocking_its_thread_past_its_deadline_loses_its_slot_and_shows_in_health() {
    let app = sim_app(world(2, 1, 20), |s| {
        fast(s);
        s.sync.workers = 1;
        s.sync.job_deadline = Duration::from_millis(400);
        s.sync.stuck_grace = Duration::from_millis(100);
    })
    .await;
    let stuck_mailbox = app.sim.tenants()[0].mailboxes[0].clone();
    let started = Instant::now();
    // Blocks the whole 1.5 s: the sender is kept, never used.
    let (job, _blocking) = spawn_blocking_job(
        &app.worker,
        "tenant1",
        &stuck_mailbox,
        Duration::from_millis(1500),
    );
    wait_for(
        "the job holds the only slot",
        Duration::from_secs(1),
        || app.worker.status().busy_slots == 1,
    )
    .await;
    assert_eq!(
        app.worker.free_stuck_slots(Instant::now()),
        0,
        "not stuck within its deadline and grace"
    );

    let give_up = started + Duration::from_millis(1200);
    while app.worker.free_stuck_slots(Instant::now()) == 0 {
        assert!(Instant::now() < give_up, "the stuck job was not detected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let detected_after = started.elapsed();

    assert!(!job.is_finished(), "the job is still blocking its thread");
    assert!(
        detected_after >= Duration::from_millis(500),
        "{detected_after:?}"
    );
    let status = app.worker.status();
    assert_eq!(status.busy_slots, 0, "its slot went back to the pool");
    assert!(status.running.is_empty());
    assert_eq!(status.stuck_total, 1);
    assert_eq!(status.stuck_recent[0].mailbox, stuck_mailbox);
    assert_eq!(status.stuck_recent[0].finished_after_seconds, None);
    let h = health(&app).await;
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert_eq!(h["jobs"]["stuck_total"], 1);
    assert_eq!(
        h["jobs"]["stuck_recent"][0]["mailbox"],
        stuck_mailbox.as_str()
    );
    assert_eq!(h["jobs"]["busy_slots"], 0);

    // The freed slot serves new work while the stuck job still blocks its thread.
    let mut d = Dispatcher::new(app.worker.clone());
    assert_eq!(d.step().await, 1, "one job starts in the one freed slot");
    assert!(!job.is_finished());
    d.drain().await;
    assert!(d.finished.iter().all(|(_, r)| r.outcome == RunOutcome::Ok));

    // When it ends at last it is reported as such, and counted once.
    assert_eq!(job.await.expect("no panic"), Some(true));
    let status = app.worker.status();
    assert_eq!(status.stuck_total, 1);
    assert_eq!(status.busy_slots, 0, "its slot is not released twice");
    let finished_after = status.stuck_recent[0]
        .finished_after_seconds
        .expect("the stuck job's end is noted");
    assert!(finished_after >= 1.5, "{finished_after}");
    let h = health(&app).await;
    assert!(h["jobs"]["stuck_recent"][0]["finished_after_seconds"].is_number());
    eprintln!(
        "stuck job: detected {detected_after:?} after start (deadline 400 ms + grace 100 ms), ended after {finished_after:.2} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_service_frees_a_stuck_jobs_slot_and_reports_it_on_healthz() {
    let config = world(1, 1, 20);
    let sim = start_sim(config.clone()).await;
    let (settings, _dir) = sim_settings(&sim, &config, |s| {
        fast(s);
        s.sync.workers = 1;
        // Long enough for a real round on a loaded machine: the freed slot must sync one.
        s.sync.job_deadline = Duration::from_millis(1000);
        s.sync.stuck_grace = Duration::from_millis(100);
    });
    let app = calsync::app::Application::build(settings)
        .await
        .expect("app builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let worker = app.worker();
    let mailbox = config.tenants[0].mailboxes[0].clone();
    let started = Instant::now();
    // Blocks until the checks below, which wait for conditions while it blocks, are done.
    let (job, release) = spawn_blocking_job(&worker, "tenant1", &mailbox, Duration::from_secs(60));
    // The service starts only once the job holds the only slot: started together, the
    // service's own job for the mailbox could take it first (seen on CI's loaded machine).
    wait_for(
        "the blocking job holds the only slot",
        Duration::from_secs(30),
        || worker.status().busy_slots == 1,
    )
    .await;
    assert!(!job.is_finished(), "the blocking job got the slot");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let client = reqwest::Client::new();

    let health = loop {
        let h: serde_json::Value = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz answers while a thread is blocked")
            .json()
            .await
            .expect("JSON");
        if h["jobs"]["stuck_total"] == 1 {
            break h;
        }
        assert!(
            !job.is_finished(),
            "the job ended before it was reported stuck: {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reported_after = started.elapsed();

    assert!(!job.is_finished(), "still blocking");
    assert_eq!(health["status"], "degraded", "{health:#}");
    assert_eq!(
        health["jobs"]["stuck_recent"][0]["mailbox"],
        mailbox.as_str()
    );
    assert!(health["jobs"]["stuck_recent"][0]["finished_after_seconds"].is_null());
    // The service's own loop gets the freed slot: the mailbox syncs while the thread blocks.
    loop {
        let h: serde_json::Value = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz")
            .json()
            .await
            .expect("JSON");
        if h["tenants"][0]["never_synced"] == 0 {
            break;
        }
        assert!(
            !job.is_finished(),
            "no sync in the freed slot while the job blocked: {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !job.is_finished(),
        "synced while the stuck job still blocked"
    );
    release.send(()).expect("the job still waits");
    shutdown.cancel();
    running
        .await
        .expect("no panic")
        .expect("the service stops cleanly");
    assert_eq!(job.await.expect("no panic"), Some(true));
    eprintln!(
        "running service: stuck job reported on /healthz {reported_after:?} after it started"
    );
}

// ---- a probe cut off by the job deadline ----

/// A hanging dependency, and a breaker that opens at the first failure and breaks 50 ms: the
/// job's first call times out (300 ms) and opens it; its retry (after 100-300 ms) is the
/// half-open probe, and it hangs past the 650 ms job deadline, which cancels it. Once the
/// dependency is back, the tenant must sync again: a probe that was cancelled instead of
/// reporting must not leave the breaker half-open with its only probe "in flight" forever.
async fn a_probe_cut_off_by_the_deadline_does_not_wedge_the_breaker(endpoint: Endpoint) {
    let app = sim_app(world(1, 1, 20), |s| {
        fast(s);
        s.sync.job_deadline = Duration::from_millis(650);
        s.resilience.retry_initial = Duration::from_millis(200);
        s.resilience.retry_max = Duration::from_millis(300);
        s.resilience.breaker.min_calls = 1;
        s.resilience.breaker.base_break = Duration::from_millis(50);
        s.resilience.breaker.max_break = Duration::from_millis(400);
    })
    .await;
    let mailbox = app.mailbox_names().remove(0);
    let dependency = match endpoint {
        Endpoint::Token => Dependency::Token,
        _ => Dependency::Graph,
    };
    let hang = app.sim.add_fault(
        FaultRule::new(FaultKind::Hang)
            .tenant("tenant1")
            .endpoint(endpoint),
    );

    let results = app.pass().await;

    assert_eq!(
        results[&mailbox].outcome,
        RunOutcome::DeadlineExceeded,
        "{:?}",
        results[&mailbox].error
    );
    assert_eq!(
        app.sim.stats().faults_fired[&hang],
        2,
        "a call, then the probe"
    );
    assert!(app.sim.remove_fault(hang));
    let mut d = Dispatcher::new(app.worker.clone());
    let give_up = Instant::now() + Duration::from_secs(3);
    while app.record(&mailbox).await.last_success_at.is_none() {
        assert!(
            Instant::now() < give_up,
            "the tenant never synced again; its {dependency:?} breaker: {:?}",
            breaker(&app, "tenant1", dependency)
        );
        d.step().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.drain().await;
    assert_eq!(
        breaker(&app, "tenant1", dependency).state,
        BreakerState::Closed
    );
    app.assert_matches_truth(&mailbox).await;
}

#[tokio::test]
async fn a_graph_probe_cut_off_by_the_deadline_does_not_wedge_the_breaker() {
    a_probe_cut_off_by_the_deadline_does_not_wedge_the_breaker(Endpoint::Graph).await;
}

#[tokio::test]
async fn a_token_probe_cut_off_by_the_deadline_does_not_wedge_the_breaker() {
    a_probe_cut_off_by_the_deadline_does_not_wedge_the_breaker(Endpoint::Token).await;
}

/// Graph's 429 for too many requests in flight on one mailbox comes without `innerError`
/// (magodo/terraform-provider-outlook#21): calsync still sees throttling with its wait, and
/// takes the request id from the header.
#[test]
fn a_mailbox_concurrency_429_without_inner_error_is_throttling() {
    use calsync::graph::{classify_failure, GraphError, RequestIds};
    let body = br#"{"error":{"code":"ApplicationThrottled","message":"Application is over its MailboxConcurrency limit."}}"#;
    let mut headers = http::HeaderMap::new();
    headers.insert("retry-after", http::HeaderValue::from_static("7"));
    let ids = RequestIds {
        request_id: Some("rid-1".into()),
        client_request_id: "crid-1".into(),
    };
    let e = classify_failure(429, &headers, body, ids, std::time::SystemTime::now());
    assert!(
        matches!(&e, GraphError::Throttled { status: 429, code, retry_after: Some(wait), ids }
            if code == "ApplicationThrottled" && *wait == Duration::from_secs(7)
                && ids.request_id.as_deref() == Some("rid-1")),
        "{e:?}"
    );
    // No request-id header either: nothing to find in the body, and no failure over it.
    let ids = RequestIds {
        request_id: None,
        client_request_id: "crid-2".into(),
    };
    let e = classify_failure(429, &headers, body, ids, std::time::SystemTime::now());
    assert!(
        matches!(&e, GraphError::Throttled { code, ids, .. }
            if code == "ApplicationThrottled" && ids.request_id.is_none()),
        "{e:?}"
    );
}
