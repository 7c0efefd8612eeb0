//! Garbage on page 2 of an incremental round: the job fails saying the response was unusable,
//! nothing of the bad page is applied, the cursor stays on the last committed link, and the
//! next job resumes from there; the same garbage at the same link a few times in a row starts a
//! fresh round instead. A page that is fine but for some items it carries is applied, those
//! items set aside in quarantine.

use calsync::store::RunOutcome;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const NEW_ON_PAGE_1: &str = "AAMkAGI2TG93AAA=inc-new1";

fn fixture_text(app: &TestApp, name: &str) -> String {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .expect("fixture")
        .replace("{{BASE}}", &app.base())
}

async fn bad_second_page_changes_nothing(bad_page: impl FnOnce(&TestApp) -> ResponseTemplate) {
    let app = spawn_app().await;
    complete_initial_round(&app).await;
    let before = app.events(ALICE).await;
    let delta_before = app.mailbox(ALICE).await.cursor.delta_link;
    assert!(delta_before
        .as_deref()
        .is_some_and(|l| l.ends_with("round1")));

    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmci39OQxqJrxK4-round1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(delta_page(
            &app.base(),
            vec![event(
                NEW_ON_PAGE_1,
                "Lunch",
                "2026-12-04T12:00:00.0000000",
                "2026-12-04T13:00:00.0000000",
            )],
            "inc-page2",
            false,
        )))
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$skiptoken", "inc-page2"))
        .respond_with(bad_page(&app))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    assert_eq!(result.report.pages, 1, "page 1 committed, page 2 did not");
    let mailbox = app.mailbox(ALICE).await;
    let error = mailbox.last_error.clone().expect("last_error");
    assert!(error.contains("unusable response"), "{error}");
    let after: Vec<_> = app
        .events(ALICE)
        .await
        .into_iter()
        .filter(|e| e.id != NEW_ON_PAGE_1)
        .collect();
    assert_eq!(
        after, before,
        "the events held before are untouched, field for field"
    );
    assert!(
        app.event_ids(ALICE)
            .await
            .contains(&NEW_ON_PAGE_1.to_string()),
        "page 1 stays committed"
    );
    assert_eq!(
        mailbox.cursor.next_link.as_deref(),
        Some(
            format!(
                "{}/users/alice@contoso.com/calendarView/delta?$skiptoken=inc-page2",
                app.base()
            )
            .as_str()
        ),
        "the cursor points at the page that failed"
    );
    assert_eq!(mailbox.cursor.delta_link, delta_before);

    // Graph recovers: the next job asks for page 2 again, not for the whole round.
    app.graph.verify().await;
    app.graph.reset().await;
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$skiptoken", "inc-page2"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/incremental.json")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;
    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=exc1",
            "AAMkAGI2TG93AAA=inc-new1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1",
        ]
    );
}

#[tokio::test]
async fn malformed_json_on_page_2_applies_nothing() {
    bad_second_page_changes_nothing(|app| {
        let body = format!(
            r#"{{"value":[{{"id":"AAMkAGI2TG93AAA=single1" "subject":"Quarterly planning (room changed)"}},{{"id":"AAMkAGI2TG93AAA=allday1","@removed":{{"reason":"deleted"}}}}],"@odata.deltaLink":"{}/users/alice@contoso.com/calendarView/delta?$deltatoken=bad"}}"#,
            app.base()
        );
        ResponseTemplate::new(200).set_body_raw(body, "application/json")
    })
    .await;
}

#[tokio::test]
async fn truncated_json_on_page_2_applies_nothing() {
    bad_second_page_changes_nothing(|app| {
        let full = fixture_text(app, "graph/incremental.json");
        // Cut after the removal of allday1, mid-way through the next item.
        let cut = full.find("outside-window").expect("marker");
        ResponseTemplate::new(200).set_body_raw(full[..cut].to_string(), "application/json")
    })
    .await;
}

#[tokio::test]
async fn html_error_page_with_status_200_on_page_2_applies_nothing() {
    bad_second_page_changes_nothing(|_| {
        ResponseTemplate::new(200).set_body_raw(
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
            "text/html",
        )
    })
    .await;
}

/// Items calsync cannot store faithfully, as Graph could send them.
fn unusable_items() -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({
            "id": "AAMkAGI2TG93AAA=pst1",
            "subject": "Not in UTC",
            "type": "singleInstance",
            "start": {"dateTime": "2026-12-05T09:00:00.0000000", "timeZone": "Pacific Standard Time"},
            "end": {"dateTime": "2026-12-05T10:00:00.0000000", "timeZone": "Pacific Standard Time"}
        }),
        serde_json::json!({"id": "AAMkAGI2TG93AAA=nostart", "subject": "No start",
                           "end": {"dateTime": "2026-12-05T10:00:00.0000000", "timeZone": "UTC"}}),
        event(
            "AAMkAGI2TG93AAA=backwards",
            "Ends before it starts",
            "2026-12-06T10:00:00.0000000",
            "2026-12-06T09:00:00.0000000",
        ),
    ]
}

#[tokio::test]
async fn unusable_items_are_quarantined_and_the_rest_of_their_page_applied() {
    let app = spawn_app().await;
    complete_initial_round(&app).await;
    app.mount_token_ok().await;
    let mut page = app.fixture("graph/incremental.json");
    page["value"]
        .as_array_mut()
        .expect("value")
        .splice(0..0, unusable_items());
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmci39OQxqJrxK4-round1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert_eq!(result.report.quarantined, 3);
    assert!(
        result.report.completed,
        "the round ended: the cursor moved on"
    );
    let ids = app.event_ids(ALICE).await;
    assert!(
        !ids.contains(&"AAMkAGI2TG93AAA=allday1".to_string()),
        "the page's removal was applied"
    );
    let single = app
        .events(ALICE)
        .await
        .into_iter()
        .find(|e| e.id == "AAMkAGI2TG93AAA=single1")
        .expect("single1");
    assert_eq!(
        single.subject.as_deref(),
        Some("Quarterly planning (room changed)"),
        "the page's update was applied"
    );
    let mailbox = app.mailbox(ALICE).await;
    assert!(mailbox
        .cursor
        .delta_link
        .as_deref()
        .is_some_and(|l| l.ends_with("round2")));
    let held = app.store.quarantined(mailbox.id, 100).await.expect("reads");
    let mut reasons: Vec<(String, String)> = held
        .iter()
        .map(|q| (q.item_key.clone(), q.reason.clone()))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].0.ends_with("backwards") && reasons[0].1.contains("before"));
    assert!(reasons[1].0.ends_with("nostart") && reasons[1].1.contains("start"));
    assert!(reasons[2].0.ends_with("pst1") && reasons[2].1.contains("Pacific Standard Time"));
    assert!(held.iter().all(|q| q.raw.contains(&q.item_key)));

    // Health counts them for the tenant and the mailbox.
    let health = calsync::health::current(&app.store, &app.worker, 20)
        .await
        .expect("reads");
    assert_eq!(health.tenants[0].quarantined, 3);
    assert_eq!(health.tenants[0].mailbox_detail[0].quarantined, 3);

    // Graph sends one of them again, now in UTC: it leaves quarantine and is stored.
    app.graph.reset().await;
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmci39OQxqJrxK4-round2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(delta_page(
            &app.base(),
            vec![event(
                "AAMkAGI2TG93AAA=pst1",
                "Now in UTC",
                "2026-12-05T17:00:00.0000000",
                "2026-12-05T18:00:00.0000000",
            )],
            "round3",
            true,
        )))
        .expect(1)
        .mount(&app.graph)
        .await;
    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert!(app
        .event_ids(ALICE)
        .await
        .contains(&"AAMkAGI2TG93AAA=pst1".to_string()));
    let keys: Vec<String> = app
        .store
        .quarantined(mailbox.id, 100)
        .await
        .expect("reads")
        .into_iter()
        .map(|q| q.item_key)
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(!keys.iter().any(|k| k.ends_with("pst1")));
}

#[tokio::test]
async fn the_same_broken_page_three_times_starts_a_fresh_round() {
    let app = spawn_app().await;
    complete_initial_round(&app).await;
    assert_eq!(app.settings.graph.page_failure_limit, 3);
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmci39OQxqJrxK4-round1"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw("<html>502 Bad Gateway</html>", "text/html"),
        )
        .expect(3)
        .mount(&app.graph)
        .await;

    for attempt in 1..=2 {
        let result = app.sync_alice().await;
        assert_eq!(result.outcome, RunOutcome::Failed);
        let mailbox = app.mailbox(ALICE).await;
        assert!(
            mailbox.cursor.delta_link.is_some(),
            "attempt {attempt}: the cursor is kept"
        );
    }
    let third = app.sync_alice().await;
    assert_eq!(third.outcome, RunOutcome::Failed);
    let error = third.error.clone().unwrap_or_default();
    assert!(
        error.contains("3 times in a row") && error.contains("fresh round"),
        "{error}"
    );
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(mailbox.cursor.delta_link, None);
    assert_eq!(mailbox.cursor.next_link, None);
    assert_eq!(mailbox.fresh_rounds_forced, 1);
    let health = calsync::health::current(&app.store, &app.worker, 20)
        .await
        .expect("reads");
    assert_eq!(health.tenants[0].mailbox_detail[0].fresh_rounds_forced, 1);

    // The next job starts over with the window, not with the broken link.
    app.graph.verify().await;
    app.graph.reset().await;
    app.mount_token_ok().await;
    mount_initial_round(&app).await;
    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert!(result.report.full_round);
}
