//! Delta rounds against a mocked Graph: paging, idempotent apply, incremental changes.

use calsync::store::RunOutcome;
use chrono::{NaiveDate, TimeZone, Utc};
use wiremock::matchers::{header, header_exists, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

#[tokio::test]
async fn initial_round_pages_through_empty_pages_and_duplicates() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    mount_initial_round(&app).await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert_eq!(result.report.pages, 3);
    assert!(result.report.full_round);
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=allday1",
            "AAMkAGI2TG93AAA=exc1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1",
        ],
        "the duplicate of single1 on page 3 is stored once"
    );
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(
        mailbox.cursor.delta_link.as_deref(),
        Some(format!("{}/users/alice@contoso.com/calendarView/delta?$deltatoken=R0usmci39OQxqJrxK4-round1", app.base()).as_str())
    );
    assert_eq!(mailbox.cursor.next_link, None);
    assert!(mailbox.last_success_at.is_some());
}

#[tokio::test]
async fn events_are_stored_with_normalised_fields() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    mount_initial_round(&app).await;
    app.sync_alice().await;

    let events = app.events(ALICE).await;
    let by_id = |id: &str| events.iter().find(|e| e.id == id).expect(id).clone();

    let single = by_id("AAMkAGI2TG93AAA=single1");
    assert_eq!(
        single.start_utc,
        Utc.with_ymd_and_hms(2026, 12, 9, 20, 30, 0).unwrap()
    );
    assert_eq!(
        single.end_utc,
        Utc.with_ymd_and_hms(2026, 12, 9, 21, 30, 0).unwrap()
    );
    assert!(!single.is_all_day);
    assert_eq!(single.start_date, None);
    assert_eq!(single.show_as.as_deref(), Some("busy"));
    assert_eq!(single.event_type.as_deref(), Some("singleInstance"));

    let all_day = by_id("AAMkAGI2TG93AAA=allday1");
    assert!(all_day.is_all_day);
    assert_eq!(all_day.start_date, NaiveDate::from_ymd_opt(2026, 12, 24));
    assert_eq!(all_day.end_date, NaiveDate::from_ymd_opt(2026, 12, 26));

    let occurrence = by_id("AAMkAGI2TG93AAA=occ1");
    assert_eq!(occurrence.event_type.as_deref(), Some("occurrence"));
    assert_eq!(
        occurrence.series_master_id.as_deref(),
        Some("AAMkAGI2TG93AAA=series1")
    );
    // Graph sent a stub; the series master on the same page filled it in.
    assert_eq!(occurrence.subject.as_deref(), Some("Weekly 1:1"));
    assert_eq!(occurrence.sensitivity.as_deref(), Some("private"));
    assert_eq!(occurrence.location.as_deref(), Some("Teams"));
    assert_eq!(
        occurrence.organizer_address.as_deref(),
        Some("alice@contoso.com")
    );
    assert_eq!(
        occurrence.start_utc,
        Utc.with_ymd_and_hms(2026, 12, 1, 15, 0, 0).unwrap()
    );
    assert!(
        events.iter().all(|e| e.id != "AAMkAGI2TG93AAA=series1"),
        "the series master is not a calendar entry"
    );

    let exception = by_id("AAMkAGI2TG93AAA=exc1");
    assert_eq!(exception.event_type.as_deref(), Some("exception"));
    assert_eq!(
        exception.start_utc,
        Utc.with_ymd_and_hms(2026, 12, 8, 16, 0, 0).unwrap()
    );
    assert!(
        exception.raw.contains("someFieldGraphAddsLater"),
        "unknown fields are accepted and kept in the raw JSON"
    );
}

#[tokio::test]
async fn requests_carry_graph_headers() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(header("authorization", "Bearer eyJ0eXAiOiJKV1QiLCJub25jZSI6IlRFU1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20ifQ.c2lnbmF0dXJl"))
        .and(|r: &wiremock::Request| {
            let prefer: Vec<_> = r.headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).collect();
            prefer.contains(&"odata.maxpagesize=50") && prefer.contains(&"outlook.timezone=\"UTC\"")
        })
        .and(header_exists("client-request-id"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "value": [],
            "@odata.deltaLink": format!("{}/users/alice@contoso.com/calendarView/delta?$deltatoken=x", app.base()),
        })))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
}

#[tokio::test]
async fn incremental_round_applies_updates_and_removals_inside_the_window_only() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    mount_initial_round(&app).await;
    app.sync_alice().await;

    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$deltatoken", "R0usmci39OQxqJrxK4-round1"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/incremental.json")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;
    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert!(!result.report.full_round);
    assert_eq!(
        app.event_ids(ALICE).await,
        vec![
            "AAMkAGI2TG93AAA=exc1",
            "AAMkAGI2TG93AAA=occ1",
            "AAMkAGI2TG93AAA=single1"
        ],
        "allday1 removed; the removal of an event never held is harmless"
    );
    let single = app
        .events(ALICE)
        .await
        .into_iter()
        .find(|e| e.id == "AAMkAGI2TG93AAA=single1")
        .expect("single1 kept");
    assert_eq!(
        single.subject.as_deref(),
        Some("Quarterly planning (room changed)")
    );
    assert_eq!(
        single.start_utc,
        Utc.with_ymd_and_hms(2026, 12, 9, 21, 0, 0).unwrap()
    );
    assert!(app
        .mailbox(ALICE)
        .await
        .cursor
        .delta_link
        .is_some_and(|l| l.ends_with("round2")));
}
