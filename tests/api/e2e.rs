//! End to end: calsync's real wiring against the Graph simulator over real sockets, checked
//! against the simulator's ground truth (ids, change keys, subjects, start, end, cancelled; no
//! event missing, none extra, none stored twice).

use std::time::Duration;

use calsync::sim::{Endpoint, FaultKind, FaultRule, SimConfig};
use calsync::store::RunOutcome;
use chrono::Utc;

use crate::helpers::sim::*;

#[tokio::test]
async fn a_demo_sized_run_of_the_real_service_ends_equal_to_ground_truth() {
    let config = SimConfig::generated(3, 4, 100, 42);
    let sim = start_sim(config.clone()).await;
    let (mut settings, _dir) = sim_settings(&sim, &config, |s| {
        // Several pages per mailbox; the service's own loop does the scheduling.
        s.graph.page_size = 25;
        s.sync.interval = Duration::from_secs(60);
        s.sync.poll_interval = Duration::from_millis(20);
    });
    settings.sync.workers = 8;
    let app = start_app(settings, Jobs::Loop).await;
    let store = app.store.clone();
    let worker = app.worker.clone();

    let started = tokio::time::Instant::now();
    let limit = Duration::from_secs(20);
    loop {
        let mailboxes = store.mailboxes().await.expect("store reads");
        if mailboxes.iter().all(|m| m.last_success_at.is_some()) {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "not every mailbox synced within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();

    let health: serde_json::Value = reqwest::get(app.url("/healthz"))
        .await
        .expect("healthz answers")
        .json()
        .await
        .expect("healthz is JSON");
    app.stop().await;

    assert_eq!(health["status"], "ok", "{health:#}");
    let tenants = health["tenants"].as_array().expect("tenants");
    assert_eq!(tenants.len(), 3);
    for t in tenants {
        assert_eq!(t["status"], "ok", "{t:#}");
        assert_eq!(t["never_synced"], 0, "{t:#}");
        assert_eq!(t["auth_failing_permanently"], false);
    }
    assert_eq!(worker.status().busy_slots, 0);

    let check = Truth {
        sim: &sim,
        store: &store,
    };
    let mut total = 0;
    for mailbox in check.mailbox_names() {
        check.assert_matches_truth(&mailbox).await;
        total += check.stored(&mailbox).await.len();
    }
    assert!(total > 12 * 50, "a demo-sized calendar set: {total} events");
    // Within Outlook's limits, and no early retries, on the simulator's own count.
    let stats = sim.stats();
    assert_eq!(stats.violations.early_retry.count, 0);
    assert_eq!(stats.violations.over_concurrency.count, 0);
    assert_eq!(stats.violations.wrong_tenant.count, 0);
    eprintln!(
        "demo-sized run: 12 mailboxes, {total} events, all synced in {took:?}, {} Graph requests, {} token requests",
        stats.graph_requests, stats.token_requests
    );
}

#[tokio::test]
async fn changes_made_while_rounds_run_converge_after_one_more_pass() {
    let app = sim_app(world(2, 2, 60), |s| {
        fast(s);
        s.sync.job_deadline = Duration::from_secs(5);
        s.graph.request_timeout = Duration::from_secs(2);
    })
    .await;
    // Slow pages, so changes land while rounds are between pages.
    app.sim
        .add_fault(FaultRule::new(FaultKind::Latency { ms: 25 }).endpoint(Endpoint::Graph));
    app.sim.set_mutations(150.0);
    let mut during = 0;
    for _ in 0..3 {
        let before = app.sim.stats().mutations_applied;
        app.pass_ok().await;
        during += app.sim.stats().mutations_applied - before;
    }
    app.sim.set_mutations(0.0);
    for mailbox in app.mailbox_names() {
        app.sim.mutate_now(&mailbox, 3);
    }
    assert!(during >= 20, "only {during} changes landed during passes");
    let mut stale = 0;
    for mailbox in app.mailbox_names() {
        stale += usize::from(!app.diff(&mailbox).await.is_empty());
    }
    assert!(
        stale > 0,
        "the store should lag the changes before the last pass"
    );

    let last = app.pass_ok().await;

    app.assert_all_match_truth().await;
    assert!(last.values().all(|r| !r.report.full_round), "incremental");
    let stats = app.sim.stats();
    assert_eq!(stats.violations.early_retry.count, 0);
    assert_eq!(stats.violations.over_concurrency.count, 0);
    eprintln!(
        "mutations: {} applied in all, {during} during passes; {stale}/4 mailboxes stale before the last pass",
        stats.mutations_applied
    );
}

#[tokio::test]
async fn an_access_token_expiring_mid_round_is_refreshed_once_and_the_round_completes() {
    let app = sim_app(world(1, 1, 60), |s| {
        fast(s);
        s.sync.job_deadline = Duration::from_secs(5);
        s.graph.request_timeout = Duration::from_secs(2);
    })
    .await;
    let mailbox = app.mailbox_names().remove(0);
    let tenant = app.tenant_of(&mailbox);
    app.sim.add_fault(
        FaultRule::new(FaultKind::Latency { ms: 40 })
            .endpoint(Endpoint::Graph)
            .mailbox(&mailbox),
    );

    let pass = {
        let worker = app.worker.clone();
        tokio::spawn(async move { worker.sync_all_once().await })
    };
    // After the first page is served, the simulator's clock passes the token's expiry: the
    // next page's request carries an expired token.
    wait_for("the first page", Duration::from_secs(5), || {
        app.graph_statuses(&mailbox).get(&200).copied().unwrap_or(0) >= 1
    })
    .await;
    app.sim.advance_clock(Duration::from_secs(2 * 3600));
    let results = pass.await.expect("no panic").expect("pass runs");

    let result = &results[0];
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert!(result.report.full_round && result.report.completed);
    let statuses = app.graph_statuses(&mailbox);
    assert_eq!(
        statuses.get(&401),
        Some(&1),
        "one refused page: {statuses:?}"
    );
    assert!(
        statuses[&200] == result.report.pages && result.report.pages >= 5,
        "every page once: {statuses:?}, {} pages",
        result.report.pages
    );
    assert_eq!(app.token_requests(&tenant), 2, "one fetch, one refresh");
    app.assert_matches_truth(&mailbox).await;
}

#[tokio::test]
async fn a_delta_token_past_its_max_age_resyncs_and_reconciles() {
    let mut config = world(1, 1, 60);
    config.delta_token_max_age = Duration::from_secs(3600);
    let app = sim_app(config, fast).await;
    let mailbox = app.mailbox_names().remove(0);
    let first = app.pass_ok().await;
    assert!(first[&mailbox].report.full_round);
    app.assert_matches_truth(&mailbox).await;

    // One event leaves the window (a fresh round will not mention it) and others change.
    let stored = app.stored(&mailbox).await;
    let gone = stored.keys().next().expect("an event").clone();
    assert!(app
        .sim
        .move_event(&mailbox, &gone, Utc::now() + chrono::Duration::days(800)));
    app.sim.mutate_now(&mailbox, 10);
    app.sim.advance_clock(Duration::from_secs(2 * 3600));

    let second = app.pass_ok().await;

    let report = &second[&mailbox].report;
    assert!(report.resynced && report.full_round, "{report:?}");
    assert!(report.deleted >= 1, "{report:?}");
    assert_eq!(app.graph_statuses(&mailbox).get(&410), Some(&1));
    assert!(!app.stored(&mailbox).await.contains_key(&gone));
    app.assert_matches_truth(&mailbox).await;

    // The state after the resync is good: the next round is incremental again.
    app.sim.mutate_now(&mailbox, 5);
    let third = app.pass_ok().await;
    assert!(!third[&mailbox].report.full_round);
    app.assert_matches_truth(&mailbox).await;
}
