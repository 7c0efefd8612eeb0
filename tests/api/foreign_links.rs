//! The bearer token only goes to the configured Graph host: a nextLink or deltaLink naming any
//! other origin is refused, nothing of that page is applied, and the cursor is not poisoned.

use calsync::store::RunOutcome;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

fn page_with_link(items: Vec<serde_json::Value>, key: &str, link: String) -> serde_json::Value {
    serde_json::json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(event)",
        key: link,
        "value": items,
    })
}

fn one_event() -> Vec<serde_json::Value> {
    vec![event(
        "AAMkAGI2TG93AAA=lured",
        "Standup",
        "2026-12-02T09:00:00.0000000",
        "2026-12-02T09:15:00.0000000",
    )]
}

/// Mounts the first page of Alice's initial round with `link` under `key`, runs the job and
/// checks it was refused naming `host`, with nothing stored.
async fn link_is_refused(app: &TestApp, key: &str, link: String, host: &str) {
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(has_param("startDateTime"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page_with_link(
            one_event(),
            key,
            link,
        )))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    let error = result.error.expect("an error");
    assert!(error.contains("refused"), "{error}");
    assert!(error.contains(host), "`{error}` should name {host}");
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(mailbox.last_error.as_deref(), Some(error.as_str()));
    assert_eq!(
        (mailbox.cursor.next_link, mailbox.cursor.delta_link),
        (None, None),
        "the foreign link is not stored as the cursor"
    );
    assert!(
        app.events(ALICE).await.is_empty(),
        "nothing of the page is applied"
    );
}

#[tokio::test]
async fn next_link_to_another_server_is_refused_and_that_server_gets_nothing() {
    let app = spawn_app().await;
    let evil = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .named("the foreign server")
        .mount(&evil)
        .await;
    let link = format!(
        "{}/v1.0/users/alice@contoso.com/calendarView/delta?$skiptoken=stolen",
        evil.uri()
    );
    let evil_host = evil.uri().trim_start_matches("http://").to_string();

    link_is_refused(&app, "@odata.nextLink", link, &evil_host).await;
}

#[tokio::test]
async fn next_link_to_a_foreign_https_host_is_refused() {
    let app = spawn_app().await;
    link_is_refused(
        &app,
        "@odata.nextLink",
        "https://evil.example/v1.0/users/alice@contoso.com/calendarView/delta?$skiptoken=x".into(),
        "evil.example",
    )
    .await;
}

#[tokio::test]
async fn delta_link_to_a_foreign_host_is_refused_before_it_becomes_the_cursor() {
    let app = spawn_app().await;
    link_is_refused(
        &app,
        "@odata.deltaLink",
        "https://evil.example/v1.0/users/alice@contoso.com/calendarView/delta?$deltatoken=x".into(),
        "evil.example",
    )
    .await;
}

#[tokio::test]
async fn after_a_refused_link_the_next_job_starts_over_and_completes() {
    let app = spawn_app().await;
    link_is_refused(
        &app,
        "@odata.nextLink",
        "https://evil.example/v1.0/users/alice@contoso.com/calendarView/delta?$skiptoken=x".into(),
        "evil.example",
    )
    .await;
    app.graph.verify().await;
    app.graph.reset().await;

    complete_initial_round(&app).await;

    assert_eq!(app.event_ids(ALICE).await.len(), 4);
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(mailbox.consecutive_failures, 0);
    assert!(mailbox.cursor.delta_link.is_some());
}
