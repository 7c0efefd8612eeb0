//! Garbage on page 2 of an incremental round: the job fails saying the response was unusable,
//! nothing of the bad page is applied, the cursor stays on the last committed link, and the
//! next job resumes from there.

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
        .filter(|e| e.event_id != NEW_ON_PAGE_1)
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

#[tokio::test]
async fn one_unusable_event_on_page_2_applies_none_of_the_page() {
    bad_second_page_changes_nothing(|app| {
        let mut page = app.fixture("graph/incremental.json");
        page["value"]
            .as_array_mut()
            .expect("value")
            .push(serde_json::json!({
                "id": "AAMkAGI2TG93AAA=pst1",
                "subject": "Not in UTC",
                "start": {"dateTime": "2026-12-05T09:00:00.0000000", "timeZone": "Pacific Standard Time"},
                "end": {"dateTime": "2026-12-05T10:00:00.0000000", "timeZone": "Pacific Standard Time"}
            }));
        ResponseTemplate::new(200).set_body_json(page)
    })
    .await;
}
