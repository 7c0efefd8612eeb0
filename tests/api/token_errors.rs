//! Token endpoint failures, one per class the identity platform sends: the job fails with the
//! error recorded on the mailbox, permanent and transient failures are told apart, and Graph is
//! never called without a token. Plus the `ext_expires_in` grace while the endpoint is down.

use std::time::Duration;

use calsync::auth::{AuthError, AuthFailureClass, TokenProvider};
use calsync::store::RunOutcome;
use chrono::Utc;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

fn provider(app: &TestApp) -> TokenProvider {
    let http = calsync::net::http_client(Duration::from_secs(1), Duration::from_secs(2))
        .expect("http client");
    TokenProvider::new(
        &app.settings.tenants[0],
        &app.settings.graph,
        &app.settings.resilience,
        http,
    )
    .expect("provider")
}

/// Mounts `failure` as the token endpoint's only answer and a Graph that must not be called,
/// runs Alice's job and asks a fresh provider directly. Returns the job's stored error.
async fn token_failure_fails_the_job(
    failure: ResponseTemplate,
    class: AuthFailureClass,
    names: &[&str],
) -> (String, AuthError) {
    token_failure_ends_the_job(failure, class, names, RunOutcome::Failed).await
}

async fn token_failure_ends_the_job(
    failure: ResponseTemplate,
    class: AuthFailureClass,
    names: &[&str],
    outcome: RunOutcome,
) -> (String, AuthError) {
    let app = spawn_app().await;
    // The job asks once for a permanent failure (no hammering) and at most once per allowed
    // retry for a transient one; `provider` below asks once more.
    let retries = u64::from(app.settings.resilience.retries_per_request);
    let token_requests = match class {
        AuthFailureClass::Permanent => 2..=2,
        AuthFailureClass::Transient => 2..=2 + retries,
    };
    Mock::given(method("POST"))
        .and(path(token_path()))
        .respond_with(failure)
        .expect(token_requests)
        .mount(&app.graph)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .named("Graph, which must not be called without a token")
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;

    assert_eq!(result.outcome, outcome, "{:?}", result.error);
    let mailbox = app.mailbox(ALICE).await;
    let stored = mailbox.last_error.clone().expect("last_error is recorded");
    assert_eq!(Some(&stored), result.error.as_ref());
    for name in names {
        assert!(stored.contains(name), "`{stored}` should name {name}");
    }
    let class_words = match class {
        AuthFailureClass::Permanent => "rejected the app permanently",
        AuthFailureClass::Transient => "failed transiently",
    };
    assert!(stored.contains(class_words), "`{stored}` is {class:?}");
    // A deferral (told to come back later) is not counted as a failure of the mailbox.
    let failures = u32::from(outcome == RunOutcome::Failed);
    assert_eq!(mailbox.consecutive_failures, failures);
    assert_eq!(mailbox.lease_owner, None, "the lease is released");
    assert!(mailbox.next_run_at > Utc::now(), "retried later, not now");
    assert!(app.events(ALICE).await.is_empty());

    let error = provider(&app).token().await.expect_err("no token");
    assert_eq!(error.class(), class, "{error}");
    (stored, error)
}

fn identity(status: u16, error: &str, code: u64, description: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(identity_error(error, code, description))
}

#[tokio::test]
async fn wrong_client_secret_7000215_is_permanent() {
    let (stored, _) = token_failure_fails_the_job(
        identity(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee'."),
        AuthFailureClass::Permanent,
        &["invalid_client", "7000215"],
    )
    .await;
    assert!(
        !stored.contains("Correlation ID"),
        "only the description's first line is kept: {stored}"
    );
}

#[tokio::test]
async fn expired_client_secret_7000222_is_permanent() {
    token_failure_fails_the_job(
        identity(401, "invalid_client", 7000222, "The provided client secret keys for app 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee' are expired. Visit the Azure portal to create new keys for your app."),
        AuthFailureClass::Permanent,
        &["invalid_client", "7000222"],
    )
    .await;
}

#[tokio::test]
async fn app_not_in_tenant_700016_is_permanent() {
    token_failure_fails_the_job(
        identity(400, "unauthorized_client", 700016, "Application with identifier 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee' was not found in the directory 'contoso'."),
        AuthFailureClass::Permanent,
        &["unauthorized_client", "700016"],
    )
    .await;
}

#[tokio::test]
async fn tenant_not_found_90002_is_permanent() {
    token_failure_fails_the_job(
        identity(
            400,
            "invalid_request",
            90002,
            "Tenant '11111111-2222-3333-4444-555555555555' not found.",
        ),
        AuthFailureClass::Permanent,
        &["invalid_request", "90002"],
    )
    .await;
}

#[tokio::test]
async fn temporarily_unavailable_is_transient() {
    token_failure_fails_the_job(
        identity(
            400,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        ),
        AuthFailureClass::Transient,
        &["temporarily_unavailable", "90033"],
    )
    .await;
}

#[tokio::test]
async fn internal_server_error_500_is_transient() {
    token_failure_fails_the_job(
        identity(500, "server_error", 90100, "An internal error occurred."),
        AuthFailureClass::Transient,
        &["HTTP 500", "server_error"],
    )
    .await;
}

#[tokio::test]
async fn service_unavailable_503_is_transient() {
    token_failure_fails_the_job(
        ResponseTemplate::new(503)
            .insert_header("content-type", "text/html")
            .set_body_string("<html><body><h1>Service Unavailable</h1></body></html>"),
        AuthFailureClass::Transient,
        &["HTTP 503"],
    )
    .await;
}

#[tokio::test]
async fn throttled_429_is_transient_and_its_retry_after_sets_the_next_run() {
    // 120s is past the job's deadline: the job ends as deferred instead of waiting in a slot.
    let (_, error) = token_failure_ends_the_job(
        ResponseTemplate::new(429).insert_header("retry-after", "120"),
        AuthFailureClass::Transient,
        &["HTTP 429", "120"],
        RunOutcome::Deferred,
    )
    .await;
    assert_eq!(error.retry_after(), Some(Duration::from_secs(120)));
}

#[tokio::test]
async fn retry_after_from_the_token_endpoint_is_obeyed_for_the_next_run() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path(token_path()))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "315"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let before = Utc::now();
    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Deferred, "{:?}", result.error);
    let wait = (result.next_run_at - before).num_seconds();
    assert!(
        (315..=318).contains(&wait),
        "next run in {wait}s; Retry-After said 315s (never earlier, a little jitter after)"
    );
    let stored = app.mailbox(ALICE).await.next_run_at;
    assert!(
        (stored - result.next_run_at).num_milliseconds().abs() <= 1,
        "stored {stored}, job said {}",
        result.next_run_at
    );
}

/// Moves the paused tokio clock forward, then lets it run again so real sockets are not raced
/// by auto-advance.
async fn jump(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

#[tokio::test]
async fn cached_token_is_kept_up_to_ext_expires_in_while_refreshes_fail_transiently() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path(token_path()))
        .respond_with(InTurn::new(vec![
            ResponseTemplate::new(200).set_body_json(token_body("token-A", 3600, 7200)),
            ResponseTemplate::new(503).set_body_string("upstream connect error"),
        ]))
        // The first fetch, a failed refresh just past half-life, one past expires_in, one past
        // ext_expires_in.
        .expect(4)
        .mount(&app.graph)
        .await;
    let tokens = provider(&app);

    let first = tokens.token().await.expect("first token");
    assert_eq!(first.bearer_header(), "Bearer token-A");
    // Before half-life: served from the cache, no request.
    jump(Duration::from_secs(1700)).await;
    assert_eq!(
        tokens.token().await.expect("cached").bearer_header(),
        "Bearer token-A"
    );

    // Past half-life (1800s): the refresh fails with 503, the old token is still served.
    jump(Duration::from_secs(200)).await;
    let kept = tokens.token().await.expect("kept during the outage");
    assert_eq!(kept.bearer_header(), "Bearer token-A");
    let status = tokens.status().await;
    assert!(status.cached);
    assert!(!status.using_extended_lifetime);
    assert!(status
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("HTTP 503")));
    // A failed refresh is not repeated on every call: the next one waits a while.
    assert_eq!(
        tokens.token().await.expect("cached").bearer_header(),
        "Bearer token-A"
    );

    // Past expires_in (3600s), inside ext_expires_in (7200s): extended lifetime.
    jump(Duration::from_secs(1800)).await;
    let extended = tokens.token().await.expect("extended lifetime");
    assert_eq!(extended.bearer_header(), "Bearer token-A");
    assert!(tokens.status().await.using_extended_lifetime);

    // Past ext_expires_in: no token any more.
    jump(Duration::from_secs(3700)).await;
    let error = tokens.token().await.expect_err("the grace is over");
    assert_eq!(error.class(), AuthFailureClass::Transient);
    assert!(error.to_string().contains("HTTP 503"), "{error}");
}

#[tokio::test]
async fn a_permanent_refresh_failure_drops_the_cached_token_at_once() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path(token_path()))
        .respond_with(InTurn::new(vec![
            ResponseTemplate::new(200).set_body_json(token_body("token-A", 3600, 7200)),
            identity(
                401,
                "invalid_client",
                7000222,
                "The provided client secret keys for app are expired.",
            ),
        ]))
        .expect(2)
        .mount(&app.graph)
        .await;
    let tokens = provider(&app);
    tokens.token().await.expect("first token");

    jump(Duration::from_secs(1801)).await;
    let error = tokens
        .token()
        .await
        .expect_err("no grace for a revoked credential");
    assert_eq!(error.class(), AuthFailureClass::Permanent);
    assert!(!tokens.status().await.cached);
}
