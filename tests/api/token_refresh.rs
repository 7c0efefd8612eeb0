//! Graph refuses the access token (401 `InvalidAuthenticationToken`): calsync drops it, fetches
//! a fresh one exactly once and retries the page with the new bearer; a second 401 fails the job.

use calsync::store::RunOutcome;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// The token endpoint hands out `token-1`, then `token-2`, and must be asked exactly twice.
async fn mount_two_tokens(app: &TestApp) {
    Mock::given(method("POST"))
        .and(path(token_path()))
        .respond_with(InTurn::new(vec![
            ResponseTemplate::new(200).set_body_json(token_body("token-1", 3599, 3599)),
            ResponseTemplate::new(200).set_body_json(token_body("token-2", 3599, 3599)),
            ResponseTemplate::new(200).set_body_json(token_body("token-3", 3599, 3599)),
        ]))
        .expect(2)
        .mount(&app.graph)
        .await;
}

fn unauthorized() -> ResponseTemplate {
    ResponseTemplate::new(401)
        .insert_header(
            "www-authenticate",
            "Bearer realm=\"\", error=\"invalid_token\"",
        )
        .insert_header("request-id", "rid-401")
        .set_body_json(graph_error(
            "InvalidAuthenticationToken",
            "Lifetime validation failed, the token is expired.",
        ))
}

#[tokio::test]
async fn refused_token_is_refreshed_once_and_the_page_retried_with_the_new_bearer() {
    let app = spawn_app().await;
    mount_two_tokens(&app).await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(header("authorization", "Bearer token-1"))
        .respond_with(unauthorized())
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(header("authorization", "Bearer token-2"))
        .and(has_param("startDateTime"))
        .respond_with(ResponseTemplate::new(200).set_body_json(delta_page(
            &app.base(),
            vec![event(
                "AAMkAGI2TG93AAA=after401",
                "Design review",
                "2026-12-03T10:00:00.0000000",
                "2026-12-03T11:00:00.0000000",
            )],
            "after-401",
            true,
        )))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);
    assert_eq!(app.event_ids(ALICE).await, vec!["AAMkAGI2TG93AAA=after401"]);
    let status = app.tenants[TENANT].tokens.status().await;
    assert!(status.cached);
    assert_eq!(status.last_error, None);
}

#[tokio::test]
async fn a_second_401_with_the_fresh_token_fails_the_job() {
    let app = spawn_app().await;
    mount_two_tokens(&app).await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .respond_with(unauthorized())
        .expect(2)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, RunOutcome::Failed);
    let error = result.error.expect("an error");
    assert!(
        error.contains("401") && error.contains("InvalidAuthenticationToken"),
        "{error}"
    );
    let mailbox = app.mailbox(ALICE).await;
    assert_eq!(mailbox.last_error.as_deref(), Some(error.as_str()));
    assert_eq!(mailbox.consecutive_failures, 1);
    assert_eq!(mailbox.lease_owner, None);
    assert!(app.events(ALICE).await.is_empty());
}
