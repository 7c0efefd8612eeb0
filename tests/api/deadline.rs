//! No stuck work: a Graph that accepts and never answers, or answers too slowly for the job to
//! finish, ends the job within its deadline and leaves the store consistent (lease released,
//! next run set, a `sync_runs` row, committed pages kept, nothing doubled on resume).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calsync::store::RunOutcome;
use chrono::Utc;
use tokio::time::Instant;
use wiremock::MockServer;

use crate::helpers::*;
use crate::raw_graph::{RawGraph, Reply};

/// Slack over the job deadline for the job to be cut off and its end recorded.
const MARGIN: Duration = Duration::from_millis(1500);

/// An app whose Graph is `raw` (the token endpoint stays on a wiremock server).
async fn app_on(raw: &RawGraph, request_timeout: &str, job_deadline: &str) -> TestApp {
    let token_server = MockServer::start().await;
    let token_uri = token_server.uri();
    let raw_uri = raw.uri().to_string();
    let (request_timeout, job_deadline) = (request_timeout.to_string(), job_deadline.to_string());
    let app = spawn_app_on(token_server, move |toml| {
        toml.replace(
            &format!("base_url = \"{token_uri}/v1.0\""),
            &format!("base_url = \"{raw_uri}/v1.0\""),
        )
        .replace(
            "request_timeout = \"2s\"",
            &format!("request_timeout = \"{request_timeout}\""),
        )
        .replace(
            "job_deadline = \"5s\"",
            &format!("job_deadline = \"{job_deadline}\""),
        )
    })
    .await;
    assert_eq!(
        app.settings.graph.base_url.as_str(),
        format!("{}/v1.0", raw.uri())
    );
    app.mount_token_ok().await;
    app
}

/// Runs Alice's job, asserting it ended by the deadline bound; returns it and how long it took.
async fn timed_job(app: &TestApp) -> (calsync::scheduler::JobResult, Duration) {
    let started = Instant::now();
    let result = app.sync_alice().await;
    let took = started.elapsed();
    assert!(
        took <= app.settings.sync.job_deadline + MARGIN,
        "the job took {took:?}; its deadline is {:?}",
        app.settings.sync.job_deadline
    );
    (result, took)
}

/// After a job that did not finish: lease released, next run in the future, failure counted,
/// and the run recorded with its outcome.
async fn assert_cut_off_job_recorded(app: &TestApp, result: &calsync::scheduler::JobResult) {
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(mailbox.lease_owner, None, "lease released");
    assert_eq!(mailbox.lease_until, None);
    assert!(mailbox.next_run_at > Utc::now(), "next run scheduled");
    assert_eq!(mailbox.consecutive_failures, 1);
    assert_eq!(mailbox.last_error, result.error);
    let runs = app.store.runs(mailbox.id, 10).await.expect("runs");
    assert_eq!(runs[0].outcome, result.outcome.as_str());
    assert_eq!(runs[0].error, result.error);
}

fn kept_event() -> serde_json::Value {
    event(
        "AAMkAGI2TG93AAA=kept",
        "Board meeting",
        "2026-12-11T14:00:00.0000000",
        "2026-12-11T16:00:00.0000000",
    )
}

#[tokio::test]
async fn a_graph_that_accepts_and_never_answers_ends_the_job_within_its_deadline() {
    let raw = RawGraph::start(|base, target| {
        if target.contains("startDateTime") {
            Reply::Json(
                Duration::ZERO,
                delta_page(base, vec![kept_event()], "round1", true),
            )
        } else {
            Reply::Hang
        }
    })
    .await;
    let app = app_on(&raw, "1s", "2s").await;
    let first = app.sync_alice().await;
    assert_eq!(first.outcome, RunOutcome::Ok, "{:?}", first.error);
    let before = app.events(ALICE).await;
    let delta_before = app.mailbox(ALICE).await.cursor.delta_link;

    let (result, _) = timed_job(&app).await;

    let error = result.error.clone().expect("an error");
    match result.outcome {
        RunOutcome::DeadlineExceeded => assert!(error.contains("deadline"), "{error}"),
        RunOutcome::Failed => assert!(error.contains("timed out"), "{error}"),
        other => panic!("a silent Graph cannot end the job with {other:?}"),
    }
    assert!(
        raw.requests()
            .iter()
            .any(|t| t.contains("$deltatoken=round1")),
        "the job reached the silent peer: {:?}",
        raw.requests()
    );
    assert_cut_off_job_recorded(&app, &result).await;
    assert_eq!(app.events(ALICE).await, before, "events unchanged");
    assert_eq!(app.mailbox(ALICE).await.cursor.delta_link, delta_before);
    let runs = app
        .store
        .runs(app.mailbox(ALICE).await.id, 10)
        .await
        .expect("runs");
    assert_eq!(runs.len(), 2, "one row per job");
}

#[tokio::test]
async fn a_graph_that_trickles_its_answer_ends_the_job_within_its_deadline() {
    let raw = RawGraph::start(|base, target| {
        if target.contains("startDateTime") {
            Reply::Json(
                Duration::ZERO,
                delta_page(base, vec![kept_event()], "round1", true),
            )
        } else {
            // A whole page that would take minutes to arrive, every byte of it on time.
            Reply::Trickle(
                Duration::from_millis(100),
                delta_page(
                    base,
                    vec![event(
                        "AAMkAGI2TG93AAA=late",
                        "Never arrives",
                        "2026-12-12T09:00:00.0000000",
                        "2026-12-12T10:00:00.0000000",
                    )],
                    "round2",
                    true,
                ),
            )
        }
    })
    .await;
    let app = app_on(&raw, "1s", "2s").await;
    let first = app.sync_alice().await;
    assert_eq!(first.outcome, RunOutcome::Ok, "{:?}", first.error);
    let before = app.events(ALICE).await;

    let (result, _) = timed_job(&app).await;

    assert!(
        matches!(
            result.outcome,
            RunOutcome::Failed | RunOutcome::DeadlineExceeded
        ),
        "{:?}: {:?}",
        result.outcome,
        result.error
    );
    assert_cut_off_job_recorded(&app, &result).await;
    assert_eq!(app.events(ALICE).await, before, "nothing of the slow page");
    assert!(app
        .mailbox(ALICE)
        .await
        .cursor
        .delta_link
        .is_some_and(|l| l.ends_with("round1")));
}

#[tokio::test]
async fn a_graph_too_slow_to_finish_the_round_hits_the_job_deadline() {
    // Every page is answered, each just under the request timeout, and each names a new page:
    // only the job deadline can end this.
    let served = AtomicUsize::new(0);
    let raw = RawGraph::start(move |base, _| {
        let n = served.fetch_add(1, Ordering::SeqCst);
        Reply::Json(
            Duration::from_millis(400),
            delta_page(base, vec![], &format!("slow-{n}"), false),
        )
    })
    .await;
    let app = app_on(&raw, "1s", "1500ms").await;

    let (result, took) = timed_job(&app).await;

    assert_eq!(
        result.outcome,
        RunOutcome::DeadlineExceeded,
        "{:?}",
        result.error
    );
    assert!(
        took >= app.settings.sync.job_deadline,
        "cut off at {took:?}, not before"
    );
    assert!(
        result
            .error
            .as_deref()
            .is_some_and(|e| e.contains("1500ms")),
        "{:?}",
        result.error
    );
    assert!(result.report.pages >= 2, "{:?}", result.report);
    assert_cut_off_job_recorded(&app, &result).await;
    let mailbox = app.mailbox(ALICE).await;
    let runs = app.store.runs(mailbox.id, 1).await.expect("runs");
    assert_eq!(
        runs[0].pages as u64, result.report.pages,
        "pages done before the cut are counted"
    );
    let last_committed = format!(
        "{}/v1.0/users/alice@contoso.com/calendarView/delta?$skiptoken=slow-{}",
        raw.uri(),
        result.report.pages - 1
    );
    assert_eq!(
        mailbox.cursor.next_link.as_deref(),
        Some(last_committed.as_str()),
        "the cursor is the last committed page's nextLink"
    );
}

#[tokio::test]
async fn page_1_commits_when_page_2_hangs_and_the_next_job_resumes_from_its_next_link() {
    let hang = Arc::new(AtomicBool::new(true));
    let hanging = Arc::clone(&hang);
    let raw = RawGraph::start(move |base, target| {
        let page = |name: &str| {
            let text = std::fs::read_to_string(format!(
                "{}/fixtures/graph/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("fixture");
            Reply::Json(
                Duration::ZERO,
                serde_json::from_str(&text.replace("{{BASE}}", base)).expect("JSON"),
            )
        };
        if target.contains("startDateTime") {
            page("initial_page1.json")
        } else if target.contains("page2") && hanging.load(Ordering::SeqCst) {
            Reply::Hang
        } else if target.contains("page2") {
            page("initial_page2.json")
        } else if target.contains("page3") {
            page("initial_page3.json")
        } else {
            Reply::Hang
        }
    })
    .await;
    let app = app_on(&raw, "1s", "2s").await;

    let (first, _) = timed_job(&app).await;

    assert_ne!(first.outcome, RunOutcome::Ok);
    assert_eq!(first.report.pages, 1);
    assert_cut_off_job_recorded(&app, &first).await;
    assert_eq!(
        app.event_ids(ALICE).await,
        vec!["AAMkAGI2TG93AAA=allday1", "AAMkAGI2TG93AAA=single1"],
        "page 1 is committed"
    );
    let page2 = format!(
        "{}/v1.0/users/alice@contoso.com/calendarView/delta?$skiptoken=R0usmcCM996atia_s-page2",
        raw.uri()
    );
    let cursor = app.mailbox(ALICE).await.cursor;
    assert_eq!(cursor.next_link.as_deref(), Some(page2.as_str()));
    assert!(cursor.full, "still inside the initial (full) round");

    hang.store(false, Ordering::SeqCst);
    let asked_before = raw.requests().len();
    let second = app.sync_alice().await;

    assert_eq!(second.outcome, RunOutcome::Ok, "{:?}", second.error);
    assert_eq!(second.report.pages, 2, "pages 2 and 3 only");
    let requests = raw.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|t| t.contains("startDateTime"))
            .count(),
        1,
        "the round was resumed, not restarted: {requests:?}"
    );
    assert!(
        requests[1..asked_before]
            .iter()
            .all(|t| t.contains("page2")),
        "the first job never got past page 2: {requests:?}"
    );
    let next_job: Vec<&str> = requests[asked_before..]
        .iter()
        .map(|t| t.rsplit('=').next().unwrap_or_default())
        .collect();
    assert_eq!(
        next_job,
        vec!["R0usmcCM996atia_s-page2", "R0usmcCM996atia_s-page3"],
        "the next job starts at the stored nextLink"
    );
    let events = app.events(ALICE).await;
    assert_eq!(events.len(), 4, "nothing doubled, nothing lost");
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=allday1",
            "AAMkAGI2TG93AAA=exc1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1",
        ],
        "page 1's events survive the end-of-round reconciliation"
    );
    let mailbox = app.mailbox(ALICE).await;
    assert!(!mailbox.cursor.full);
    assert!(mailbox
        .cursor
        .delta_link
        .is_some_and(|l| l.ends_with("round1")));
    assert_eq!(mailbox.consecutive_failures, 0);
}
