//! Expired delta state: Graph says the state is gone (410 `SyncStateNotFound`, or 400 with
//! `resyncRequired` / `syncStateNotFound`); calsync runs a fresh full round and then deletes the
//! events the fresh round did not return.

use calsync::store::RunOutcome;
use chrono::{TimeZone, Utc};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

async fn expired_state_triggers_a_reconciling_resync(status: u16, code: &str) {
    let app = spawn_app().await;
    complete_initial_round(&app).await;
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=allday1",
            "AAMkAGI2TG93AAA=exc1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1",
        ]
    );
    let round_before = app.mailbox(ALICE).await.cursor.round_id;

    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmci39OQxqJrxK4-round1"))
        .respond_with(ResponseTemplate::new(status).set_body_json(graph_error(
            code,
            "The sync state generation is not found. Please restart the sync.",
        )))
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(has_param("startDateTime"))
        .and(has_param("endDateTime"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/resync_page1.json")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$skiptoken", "R0usmcCM996atia_s-resync2"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/resync_page2.json")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert!(
        result.report.resynced,
        "{status} {code} must trigger a resync"
    );
    assert!(result.report.full_round);
    assert_eq!(result.report.pages, 2);
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=new1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1",
        ],
        "allday1 and exc1 were not returned by the fresh round, so they are gone"
    );
    assert_eq!(result.report.deleted, 2, "both by reconciliation");
    let single = app
        .events(ALICE)
        .await
        .into_iter()
        .find(|e| e.id == "AAMkAGI2TG93AAA=single1")
        .expect("single1 kept");
    assert_eq!(
        single.subject.as_deref(),
        Some("Quarterly planning (moved to Thursday)")
    );
    assert_eq!(
        single.start_utc,
        Utc.with_ymd_and_hms(2026, 12, 10, 20, 30, 0).unwrap()
    );

    let mailbox = app.mailbox(ALICE).await;
    assert!(mailbox.cursor.round_id > round_before, "a new round id");
    assert!(!mailbox.cursor.full, "the full round is complete");
    assert_eq!(mailbox.cursor.next_link, None);
    assert!(mailbox
        .cursor
        .delta_link
        .is_some_and(|l| l.ends_with("$deltatoken=R0usmci39OQxqJrxK4-resynced")));
    assert_eq!(mailbox.last_error, None);
    let runs = app.store.runs(mailbox.id, 1).await.expect("runs");
    assert_eq!(runs[0].outcome, "ok");
    assert!(runs[0].full_round);
    assert_eq!(runs[0].deleted, 2);
}

#[tokio::test]
async fn gone_sync_state_not_found_resyncs_and_reconciles() {
    expired_state_triggers_a_reconciling_resync(410, "SyncStateNotFound").await;
}

#[tokio::test]
async fn bad_request_resync_required_resyncs_and_reconciles() {
    expired_state_triggers_a_reconciling_resync(400, "resyncRequired").await;
}

#[tokio::test]
async fn bad_request_lower_case_sync_state_not_found_resyncs_and_reconciles() {
    expired_state_triggers_a_reconciling_resync(400, "syncStateNotFound").await;
}

#[tokio::test]
async fn a_second_expiry_right_after_the_resync_fails_the_job_instead_of_looping() {
    let app = spawn_app().await;
    complete_initial_round(&app).await;
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .respond_with(
            ResponseTemplate::new(410).set_body_json(graph_error("SyncStateNotFound", "gone")),
        )
        .expect(2)
        .mount(&app.graph)
        .await;
    let before = app.events(ALICE).await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    assert!(
        result
            .error
            .as_deref()
            .is_some_and(|e| e.contains("resync")),
        "{:?}",
        result.error
    );
    assert_eq!(
        app.events(ALICE).await,
        before,
        "nothing is reconciled away without a completed round"
    );
}

#[tokio::test]
async fn a_stale_next_link_mid_round_restarts_the_round_from_scratch() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    // Page 1 of the initial round commits; its nextLink has gone stale by the time it is used.
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(has_param("startDateTime"))
        .respond_with(InTurn::new(vec![
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/initial_page1.json")),
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/resync_page1.json")),
        ]))
        .expect(2)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$skiptoken", "R0usmcCM996atia_s-page2"))
        .respond_with(
            ResponseTemplate::new(410).set_body_json(graph_error("SyncStateNotFound", "stale")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$skiptoken", "R0usmcCM996atia_s-resync2"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/resync_page2.json")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert!(result.report.resynced);
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=new1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1",
        ],
        "allday1 came only from the abandoned round and is reconciled away"
    );
}
