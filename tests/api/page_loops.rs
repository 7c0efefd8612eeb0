//! Known Graph faults that would keep a round going forever: an endless nextLink chain of the
//! same page, a nextLink pointing back at itself, and endless distinct empty pages.

use std::sync::atomic::{AtomicUsize, Ordering};

use calsync::store::RunOutcome;
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::helpers::*;

/// Page after page with the same `items` and a new nextLink each time.
struct EndlessChain {
    base: String,
    items: Vec<serde_json::Value>,
    served: AtomicUsize,
}

impl Respond for EndlessChain {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.served.fetch_add(1, Ordering::SeqCst);
        ResponseTemplate::new(200).set_body_json(delta_page(
            &self.base,
            self.items.clone(),
            &format!("chain-{n}"),
            false,
        ))
    }
}

#[tokio::test]
async fn the_same_page_with_ever_new_next_links_stops_with_the_loop_error() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .respond_with(EndlessChain {
            base: app.base(),
            items: vec![
                event(
                    "AAMkAGI2TG93AAA=loop1",
                    "Recurring sync",
                    "2026-12-07T08:00:00.0000000",
                    "2026-12-07T08:30:00.0000000",
                ),
                serde_json::json!({"id": "AAMkAGI2TG93AAA=gone", "@removed": {"reason": "deleted"}}),
            ],
            served: AtomicUsize::new(0),
        })
        .expect(3)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    let error = result.error.expect("an error");
    assert!(
        error.contains("looping") && error.contains("3 times"),
        "{error}"
    );
    assert_eq!(
        result.report.pages, 2,
        "the repeat is caught before the third copy commits"
    );
    assert_eq!(
        app.event_ids(ALICE).await,
        vec!["AAMkAGI2TG93AAA=loop1"],
        "stored once"
    );
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(mailbox.last_error.as_deref(), Some(error.as_str()));
    assert_eq!(
        (
            mailbox.cursor.next_link,
            mailbox.cursor.delta_link,
            mailbox.cursor.full
        ),
        (None, None, true),
        "the link inside the endless chain is dropped: the next job starts a fresh full round"
    );
}

#[tokio::test]
async fn a_next_link_that_comes_back_again_stops_with_the_loop_error() {
    let app = spawn_app().await;
    app.mount_token_ok().await;
    let same = delta_page(&app.base(), vec![], "same-again", false);
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(has_param("startDateTime"))
        .respond_with(ResponseTemplate::new(200).set_body_json(same.clone()))
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(param("$skiptoken", "same-again"))
        .respond_with(ResponseTemplate::new(200).set_body_json(same))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    assert!(
        result
            .error
            .as_deref()
            .is_some_and(|e| e.contains("looping")),
        "{:?}",
        result.error
    );
}

#[tokio::test]
async fn max_pages_per_round_stops_endless_distinct_empty_pages() {
    let app = spawn_app_with(|toml| {
        toml.replace("page_size = 50", "page_size = 50\nmax_pages_per_round = 5")
    })
    .await;
    assert_eq!(app.settings.graph.max_pages_per_round, 5);
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .respond_with(EndlessChain {
            base: app.base(),
            items: vec![],
            served: AtomicUsize::new(0),
        })
        .expect(5)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    let error = result.error.expect("an error");
    assert!(
        error.contains("5 pages") && error.contains("graph.max_pages_per_round"),
        "{error}"
    );
    assert_eq!(result.report.pages, 5);
    assert_eq!(
        app.store
            .runs(app.mailbox(ALICE).await.id, 1)
            .await
            .expect("runs")[0]
            .pages,
        5
    );
}
