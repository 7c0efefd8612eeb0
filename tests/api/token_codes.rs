//! Every identity-platform error body in `fixtures/identity/` through the classifier and through
//! a token provider on a real (wiremock) token endpoint: listed permanent codes open the
//! tenant's token breaker at once for the long permanent break; transient and unknown ones open
//! it for the doubling break. Resets and a silent endpoint, on the simulator's real sockets,
//! break like transient codes.

use std::time::{Duration, SystemTime};

use calsync::auth::{classify_token_failure, AuthFailureClass, TokenProvider};
use calsync::config::Settings;
use calsync::resilience::breaker::BreakerState;
use calsync::sim::{Endpoint, FaultKind, FaultRule};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::sim::*;
use crate::helpers::*;

use AuthFailureClass::{Permanent, Transient};

/// One answer of the token endpoint: a fixture body (or none) with a status.
struct Case {
    fixture: Option<&'static str>,
    status: u16,
    retry_after: Option<&'static str>,
    class: AuthFailureClass,
}

const fn case(fixture: &'static str, status: u16, class: AuthFailureClass) -> Case {
    Case {
        fixture: Some(fixture),
        status,
        retry_after: None,
        class,
    }
}

/// The expectations, written from GRAPH.md's lists independently of `src/auth/classify.rs`.
const CASES: &[Case] = &[
    case("7000215.json", 401, Permanent),
    case("7000222.json", 401, Permanent),
    case("700016.json", 400, Permanent),
    case("90002.json", 400, Permanent),
    case("70011.json", 400, Permanent),
    case("700027.json", 401, Permanent),
    case("700024.json", 401, Permanent),
    case("invalid_request.json", 400, Permanent),
    // Transient whatever `error` they come with: these two carry `invalid_request`.
    case("90024.json", 400, Transient),
    case("90033.json", 400, Transient),
    case("temporarily_unavailable.json", 400, Transient),
    case("server_error.json", 500, Transient),
    // Unknown code under a permanent `error`: the doubling break, not the long one.
    case("unknown-code.json", 400, Transient),
    Case {
        fixture: None,
        status: 503,
        retry_after: None,
        class: Transient,
    },
    Case {
        fixture: None,
        status: 429,
        retry_after: Some("120"),
        class: Transient,
    },
];

const BASE_BREAK: Duration = Duration::from_secs(60);
const PERMANENT_BREAK: Duration = Duration::from_secs(7200);

/// One failure opens the breaker, so each class shows its break after a single answer.
fn one_failure_opens(settings: &mut Settings) {
    let b = &mut settings.resilience.breaker;
    b.min_calls = 1;
    b.base_break = BASE_BREAK;
    b.max_break = Duration::from_secs(3600);
    b.permanent_break = PERMANENT_BREAK;
    b.validate().expect("breaker settings are valid");
}

fn provider(settings: &Settings) -> TokenProvider {
    let http = calsync::net::http_client(Duration::from_millis(500), Duration::from_millis(500))
        .expect("http client");
    TokenProvider::new(
        &settings.tenants[0],
        &settings.graph,
        &settings.resilience,
        http,
    )
    .expect("provider")
}

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/identity")
}

fn body_of(case: &Case) -> Vec<u8> {
    match case.fixture {
        Some(name) => {
            let path = fixture_dir().join(name);
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }
        None => b"<html><body><h1>Service Unavailable</h1></body></html>".to_vec(),
    }
}

fn name_of(case: &Case) -> String {
    format!("{} ({})", case.fixture.unwrap_or("no body"), case.status)
}

/// Moves the paused tokio clock forward, then lets it run again so real sockets are not raced
/// by auto-advance.
async fn jump(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// Seconds until the token breaker's next probe; asserts it is open and of the given kind.
fn open_for(tokens: &TokenProvider, permanent: bool, what: &str) -> u64 {
    let b = tokens.breaker();
    assert_eq!(b.state, BreakerState::Open, "{what}: {b:?}");
    assert_eq!(b.permanent, permanent, "{what}: {b:?}");
    b.probe_in_seconds
        .expect("an open breaker has a probe time")
}

#[test]
fn every_fixture_has_a_case() {
    let mut files: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("fixtures/identity exists")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".json"))
        .collect();
    files.sort();
    let mut cased: Vec<String> = CASES
        .iter()
        .filter_map(|c| c.fixture.map(str::to_string))
        .collect();
    cased.sort();
    assert_eq!(files, cased, "each fixture needs exactly one case here");
}

#[tokio::test]
async fn every_token_error_fixture_gets_its_class_and_its_break() {
    let mut app = spawn_app().await;
    one_failure_opens(&mut app.settings);
    let base = BASE_BREAK.as_secs();
    for case in CASES {
        let what = name_of(case);
        let body = body_of(case);

        let mut headers = http::HeaderMap::new();
        if let Some(value) = case.retry_after {
            headers.insert("retry-after", http::HeaderValue::from_static(value));
        }
        let classified = classify_token_failure(case.status, &headers, &body, SystemTime::now());
        assert_eq!(classified.class(), case.class, "{what}: {classified}");

        app.graph.reset().await;
        let mut answer = ResponseTemplate::new(case.status)
            .insert_header("content-type", "application/json; charset=utf-8")
            .set_body_bytes(body);
        if let Some(value) = case.retry_after {
            answer = answer.insert_header("retry-after", value);
        }
        Mock::given(method("POST"))
            .and(path(token_path()))
            .respond_with(answer)
            .mount(&app.graph)
            .await;
        let tokens = provider(&app.settings);
        let requests = || async {
            app.graph
                .received_requests()
                .await
                .unwrap_or_default()
                .len()
        };

        let error = tokens.token().await.expect_err("no token");
        assert_eq!(error.class(), case.class, "{what}: {error}");
        if let Some(value) = case.retry_after {
            assert_eq!(
                error.retry_after(),
                value.parse().ok().map(Duration::from_secs),
                "{what}"
            );
        }
        match case.class {
            Permanent => {
                let wait = open_for(&tokens, true, &what);
                let long = PERMANENT_BREAK.as_secs();
                assert!((long - 1..=long * 5 / 4).contains(&wait), "{what}: {wait}s");
                // Not hammered: the next call is refused without a request.
                let again = tokens.token().await.expect_err("still no token");
                assert_eq!(again.class(), Permanent, "{what}: {again}");
                assert_eq!(requests().await, 1, "{what}");
            }
            Transient => {
                let wait = open_for(&tokens, false, &what);
                assert!((base - 1..=base * 5 / 4).contains(&wait), "{what}: {wait}s");
                // The probe after the break fails the same way: the break doubles.
                jump(Duration::from_secs(wait + 1)).await;
                let probe = tokens.token().await.expect_err("the probe fails too");
                assert_eq!(probe.class(), Transient, "{what}: {probe}");
                assert_eq!(requests().await, 2, "{what}: one probe was sent");
                let doubled = open_for(&tokens, false, &what);
                assert!(
                    (2 * base - 1..=2 * base * 5 / 4).contains(&doubled),
                    "{what}: {doubled}s after the second trip"
                );
            }
        }
    }
}

/// A token endpoint that resets connections, then one that never answers: transient, the
/// doubling break, never the permanent one.
#[tokio::test]
async fn resets_and_a_silent_token_endpoint_break_like_transient_codes() {
    let app = sim_app(world(1, 1, 1), |s| {
        fast(s);
        one_failure_opens(s);
    })
    .await;
    for kind in [FaultKind::Reset, FaultKind::Hang] {
        app.sim.clear_faults();
        app.sim
            .add_fault(FaultRule::new(kind.clone()).endpoint(Endpoint::Token));
        let tokens = provider(&app.settings);
        let error = tokens.token().await.expect_err("no token");
        assert_eq!(error.class(), Transient, "{kind:?}: {error}");
        let wait = open_for(&tokens, false, &format!("{kind:?}"));
        assert!(
            wait <= BASE_BREAK.as_secs() * 5 / 4,
            "{kind:?}: open for {wait}s"
        );
    }
}
