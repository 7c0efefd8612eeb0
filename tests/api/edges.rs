//! Issue 11, the HTTP side: two listeners, each with header-read, idle and request timeouts and
//! a connection limit; per-source limits on the public one; notification batches that cost one
//! store lookup whatever they carry; a bounded shutdown. Every network fault here comes from a
//! real socket (a client that sends nothing, trickles its headers or its body), and every wait
//! is for a condition, with a generous limit for a busy machine.

use std::sync::atomic::Ordering;
use std::time::Duration;

use calsync::config::Settings;
use calsync::store::SubscriptionSaved;
use chrono::Utc;
use secrecy::SecretString;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::helpers::*;

/// Far above what any assertion here needs, so a loaded machine does not fail a test.
const PATIENCE: Duration = Duration::from_secs(20);

/// The service with both listeners (its files kept with it).
struct Both {
    running: Running,
    _dir: TempDir,
}

impl std::ops::Deref for Both {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

/// The real service with notifications on (Graph unreachable: nothing here needs it), both
/// listeners on port 0, `tune` applied to the settings.
async fn start(tune: impl FnOnce(&mut Settings)) -> Both {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("calsync.db");
    let mut settings = Settings::from_toml_layers(&[
        &base_config("http://127.0.0.1:9", &db.display().to_string()),
        "[server]\npublic_listen = \"127.0.0.1:0\"\n[notifications]\npublic_url = \"https://calsync.example.com\"\ncheck_interval = \"1h\"\n",
    ])
    .expect("valid settings");
    tune(&mut settings);
    Both {
        running: start_app(settings, Jobs::Loop).await,
        _dir: dir,
    }
}

impl Both {
    /// The public (notification) listener's address.
    fn public(&self) -> &str {
        self.running.public.as_deref().expect("a public listener")
    }

    fn public_port(&self) -> u16 {
        self.running.public_port.expect("a public listener")
    }

    async fn stop(self) {
        self.running.stop().await;
    }
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects")
}

/// Reads until the peer closes; how long it took, and what came.
async fn until_closed(stream: &mut TcpStream) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {PATIENCE:?}"),
        }
    }
}

async fn livez_within(base: &str, limit: Duration) -> Duration {
    let client = reqwest::Client::builder()
        .timeout(limit)
        .build()
        .expect("client");
    let started = Instant::now();
    let response = client
        .get(format!("{base}/livez"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("/livez did not answer within {limit:?}: {e}"));
    assert_eq!(response.status(), 200);
    started.elapsed()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_or_trickles_its_headers_is_closed() {
    let app = start(|s| {
        s.server.header_read_timeout = Duration::from_millis(300);
        s.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    for port in [app.internal_port, app.public_port()] {
        // Idle from the start.
        let mut idle = connect(port).await;
        let (took, _) = until_closed(&mut idle).await;
        assert!(
            took >= Duration::from_millis(250),
            "closed too early: {took:?}"
        );

        // Headers one byte every 50 ms (a 20 s trickle): cut long before they could end.
        let slow = connect(port).await;
        let (mut reader, mut writer) = slow.into_split();
        let trickle = tokio::spawn(async move {
            let header = format!(
                "GET /livez HTTP/1.1\r\nHost: calsync\r\nX-Slow: {}",
                "a".repeat(400)
            );
            for byte in header.bytes() {
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(PATIENCE, reader.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!("a trickling client kept its connection for {PATIENCE:?}"),
            }
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(15), "closed only after {took:?}");
        assert!(
            !String::from_utf8_lossy(&got).contains("200 OK"),
            "no answer to an incomplete request"
        );
        trickle.abort();

        // An idle keep-alive connection after an answered request.
        let mut kept = connect(port).await;
        kept.write_all(b"GET /livez HTTP/1.1\r\nHost: calsync\r\n\r\n")
            .await
            .expect("writes");
        let (took, _) = until_closed(&mut kept).await;
        assert!(took < PATIENCE);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_cut_at_the_request_timeout() {
    let app = start(|s| {
        s.server.public_request_timeout = Duration::from_millis(500);
        s.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let mut stream = connect(app.public_port()).await;
    stream
        .write_all(b"POST /notifications HTTP/1.1\r\nHost: calsync\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"value\":[")
        .await
        .expect("writes");
    let started = Instant::now();
    // A byte every 100 ms keeps the connection from being idle; only the request timeout can
    // end it (1000 bytes would take 100 s).
    let reader = tokio::spawn(async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return answer,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stream.write_all(b" ").await.is_err() {
                        return answer;
                    }
                }
            }
            assert!(
                started.elapsed() < PATIENCE,
                "still open after {PATIENCE:?}"
            );
        }
    });
    let answer = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("cut in time")
        .expect("reader");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    app.stop().await;
}

/// The finding: idle connections held on the service made `/livez` time out. Now the
/// public listener takes at most its limit (the rest wait in the kernel's backlog) and the
/// internal one has its own, so the liveness probe answers while the public side is flooded.
#[tokio::test]
async fn livez_answers_while_the_public_listener_is_flooded() {
    let app = start(|s| {
        s.server.public_max_connections = 16;
        s.server.public_max_connections_per_source = 0;
        s.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    // 16 served, the rest waiting in the listen backlog (kept under its 128, past which the
    // kernel drops the SYNs and our own connects would stall).
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(connect(app.public_port()).await);
    }
    // Past the limit, a complete request is not even read.
    let mut extra = connect(app.public_port()).await;
    extra
        .write_all(b"POST /notifications?validationToken=x HTTP/1.1\r\nHost: calsync\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("writes");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf))
            .await
            .is_err(),
        "a connection past public_max_connections was served"
    );
    for _ in 0..5 {
        let took = livez_within(&app.internal, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    // Freeing slots lets the waiting client in.
    held.clear();
    let read = tokio::time::timeout(PATIENCE, extra.read(&mut buf))
        .await
        .expect("served once slots are free")
        .expect("reads");
    assert!(String::from_utf8_lossy(&buf[..read]).starts_with("HTTP/1.1 200"));
    app.stop().await;
}

#[tokio::test]
async fn one_source_is_held_to_its_connection_cap_and_request_rate() {
    let app = start(|s| {
        s.server.public_max_connections_per_source = 4;
        s.server.public_requests_per_source_per_second = 5;
        s.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(app.public_port()).await);
    }
    // The fifth connection of this source is closed at once, without an answer.
    let mut fifth = connect(app.public_port()).await;
    let (_, got) = until_closed(&mut fifth).await;
    assert!(got.is_empty());
    held.clear();

    let client = reqwest::Client::new();
    // The server releases the four slots as it sees them close: until then, this source is
    // still at its cap.
    let give_up = Instant::now() + PATIENCE;
    while client
        .post(format!(
            "{}/notifications?validationToken=abc",
            app.public()
        ))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < give_up,
            "the closed connections were never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..100 {
        let r = client
            .post(format!(
                "{}/notifications?validationToken=abc",
                app.public()
            ))
            .send()
            .await
            .expect("answers");
        if r.status() == 429 {
            assert_eq!(
                r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
                Some("1")
            );
        }
        statuses.push(r.status().as_u16());
    }
    // A burst of 5, then 5 a second: however slow the machine, no more got through.
    let allowed = 6.0 + 5.0 * started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (ok as f64) <= allowed,
        "{ok} answered, at most {allowed} allowed"
    );
    assert_eq!(ok + statuses.iter().filter(|s| **s == 429).count(), 100);
    assert!(ok < 100, "some were refused: {statuses:?}");
    app.stop().await;
}

#[tokio::test]
async fn each_listener_serves_only_its_own_routes() {
    let app = start(|_| {}).await;
    let client = reqwest::Client::new();
    let on_public = client
        .get(format!("{}/livez", app.public()))
        .send()
        .await
        .expect("answers");
    assert_eq!(on_public.status(), 404);
    for path in [
        "/metrics",
        "/healthz",
        "/",
        "/v1/mailboxes",
        "/v1/openapi.json",
    ] {
        let r = client
            .get(format!("{}{path}", app.public()))
            .send()
            .await
            .expect("answers");
        assert_eq!(r.status(), 404, "{path} must not be on the public listener");
    }
    let on_internal = client
        .post(format!(
            "{}/notifications?validationToken=abc",
            app.internal
        ))
        .send()
        .await
        .expect("answers");
    assert!(on_internal.status().is_client_error());

    // The validation echo is text and must stay text.
    let echo = client
        .post(format!(
            "{}/notifications?validationToken=%3Cb%3Ehi",
            app.public()
        ))
        .send()
        .await
        .expect("answers");
    assert_eq!(echo.status(), 200);
    assert_eq!(echo.headers()["x-content-type-options"], "nosniff");
    assert_eq!(echo.text().await.expect("text"), "<b>hi");

    let page = client
        .get(format!("{}/", app.internal))
        .send()
        .await
        .expect("answers");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    app.stop().await;
}

/// A request in flight when shutdown comes gets `shutdown_grace`, not forever.
#[tokio::test]
async fn shutdown_waits_for_requests_in_flight_at_most_the_grace() {
    let app = start(|s| {
        s.server.shutdown_grace = Duration::from_millis(300);
        s.server.public_request_timeout = Duration::from_secs(300);
        s.server.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let mut stream = connect(app.public_port()).await;
    stream
        .write_all(b"POST /notifications HTTP/1.1\r\nHost: calsync\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("writes");
    // hyper answers `100 Continue` when the handler starts reading the body: the request is
    // in flight from here on.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("100 Continue in time")
        .expect("reads");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"));
    stream.write_all(b"{").await.expect("writes");
    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    let (_, _) = until_closed(&mut stream).await;
}

fn batch(items: &[(String, String)]) -> String {
    let value: Vec<serde_json::Value> = items
        .iter()
        .map(|(id, state)| serde_json::json!({"subscriptionId": id, "clientState": state}))
        .collect();
    serde_json::json!({ "value": value }).to_string()
}

fn forged(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| (uuid::Uuid::new_v4().to_string(), "x".into()))
        .collect()
}

/// The forged batch: 12,800 made-up ids in 1 MiB cost 12,800 store lookups. Now a
/// batch costs at most one lookup, and a batch past the item cap none.
#[tokio::test]
async fn a_forged_batch_costs_one_store_lookup_and_an_oversized_one_none() {
    let app = start(|s| {
        s.server.public_requests_per_source_per_second = 0;
        // The worker looks for due mailboxes once, at start: the sync asked for below stays
        // pending for the test to see.
        s.sync.poll_interval = Duration::from_secs(3600);
    })
    .await;
    let client = reqwest::Client::new();
    let post = |body: String| {
        client
            .post(format!("{}/notifications", app.public()))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let huge = batch(&forged(12_800));
    assert!(huge.len() < 1024 * 1024, "{}", huge.len());
    let r = post(huge).await.expect("answers");
    assert_eq!(r.status(), 400);
    assert_eq!(
        app.store_calls.load(Ordering::SeqCst),
        0,
        "refused before any lookup"
    );

    let r = post(batch(&forged(1000))).await.expect("answers");
    assert_eq!(r.status(), 202);
    assert_eq!(
        app.store_calls.load(Ordering::SeqCst),
        1,
        "one lookup for 1000 ids"
    );

    // Items without an id or clientState, or with an id that cannot be Graph's: no lookup.
    let junk = serde_json::json!({"value": [
        {"subscriptionId": "x"}, {"clientState": "y"}, {},
        {"subscriptionId": "z".repeat(500), "clientState": "y"},
    ]});
    let r = post(junk.to_string()).await.expect("answers");
    assert_eq!(r.status(), 202);
    assert_eq!(app.store_calls.load(Ordering::SeqCst), 1);

    // A genuine item among forged ones: the lookup, then one write for the sync it asks for.
    let alice = app
        .store
        .mailbox(TENANT, ALICE)
        .await
        .expect("reads")
        .expect("alice");
    let now = Utc::now();
    // Creates the row (the running keeper may hold the claim already; the row is what counts).
    app.store
        .claim_subscription(alice.id, now, now)
        .await
        .expect("claims");
    let state = SecretString::from("the-real-client-state-of-alice".to_string());
    app.store
        .subscription_saved(
            alice.id,
            &SubscriptionSaved {
                subscription_id: "sub-alice",
                client_state: Some(&state),
                expires_at: now + chrono::Duration::days(1),
                created: true,
            },
            now,
        )
        .await
        .expect("saves");
    let mut items = forged(500);
    items.push(("sub-alice".into(), "the-real-client-state-of-alice".into()));
    items.push(("sub-alice".into(), "a-wrong-client-state".into()));
    let sent_at = Utc::now();
    let r = post(batch(&items)).await.expect("answers");
    assert_eq!(r.status(), 202);
    assert_eq!(app.store_calls.load(Ordering::SeqCst), 3);
    // The sync is pending, or a job that started after the batch has served it already.
    let record = app
        .store
        .mailbox_by_id(alice.id)
        .await
        .expect("reads")
        .expect("alice");
    let served = app
        .store
        .runs(alice.id, 50)
        .await
        .expect("reads")
        .iter()
        .any(|r| r.started_at >= sent_at);
    assert!(
        record.sync_requested_at.is_some() || served,
        "the genuine item asked for a sync"
    );
    app.stop().await;
}

/// A connection on which nothing moves is closed at `idle_timeout`, even when the header-read
/// timeout is longer.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_idle_timeout() {
    let app = start(|s| {
        s.server.header_read_timeout = Duration::from_secs(120);
        s.server.idle_timeout = Duration::from_millis(300);
    })
    .await;
    for port in [app.internal_port, app.public_port()] {
        let mut silent = connect(port).await;
        let (took, got) = until_closed(&mut silent).await;
        assert!(got.is_empty());
        assert!(took >= Duration::from_millis(250), "{took:?}");
        // Between requests too.
        let mut kept = connect(port).await;
        kept.write_all(b"GET /livez HTTP/1.1\r\nHost: calsync\r\n\r\n")
            .await
            .expect("writes");
        let (_, got) = until_closed(&mut kept).await;
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 "));
    }
    app.stop().await;
}

const API_TOKEN: &str = "edges-test-admin-token-0123456789abcdef";

/// Ids follow the OpenAPI's int64: any of them is looked up (404), only what int64 cannot hold
/// is a 400. Mailboxes with Unicode spaces or invisible characters are refused as the config
/// refuses them; the list pages by id from the store.
#[tokio::test]
async fn admin_ids_mailbox_rules_and_keyset_pages() {
    let app = start(|s| s.api.token = Some(SecretString::from(API_TOKEN))).await;
    let client = reqwest::Client::new();
    let get = |path: String| {
        client
            .get(format!("{}{path}", app.internal))
            .bearer_auth(API_TOKEN)
            .send()
    };
    for (id, status) in [
        ("9223372036854775807", 404),
        ("1000000000000000000", 404),
        ("9223372036854775808", 400),
        ("0", 400),
        ("-1", 400),
    ] {
        let r = get(format!("/v1/mailboxes/{id}")).await.expect("answers");
        assert_eq!(r.status().as_u16(), status, "{id}");
    }
    let register = |mailbox: String| {
        client
            .post(format!("{}/v1/mailboxes", app.internal))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({"tenant": TENANT, "mailbox": mailbox}))
            .send()
    };
    for bad in [
        "bob\u{00A0}@contoso.com",
        "bob\u{2028}@contoso.com",
        "bob\u{202E}@contoso.com",
        "bob\u{200B}@contoso.com",
    ] {
        let r = register(bad.to_string()).await.expect("answers");
        assert_eq!(r.status(), 400, "{bad:?}");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["error"]["field"], "mailbox");
        assert!(calsync::config::check_mailbox(bad).is_err());
    }
    let long = format!("{}@contoso.com", "b".repeat(320));
    assert_eq!(register(long).await.expect("answers").status(), 400);

    for i in 0..5 {
        let r = register(format!("user{i}@contoso.com"))
            .await
            .expect("answers");
        assert_eq!(r.status(), 201);
    }
    // Alice (from the config) and the five: pages of two, in id order, each read by keyset.
    let mut seen = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/mailboxes?limit=2&after={a}"),
            None => "/v1/mailboxes?limit=2".to_string(),
        };
        let page: serde_json::Value = get(path)
            .await
            .expect("answers")
            .json()
            .await
            .expect("json");
        let ids: Vec<i64> = page["mailboxes"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|m| m["id"].as_i64().expect("id"))
            .collect();
        assert!(ids.len() <= 2);
        seen.extend(ids);
        match page["next_after"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    let in_store = app
        .store
        .mailboxes_page(Some(TENANT), seen[1], 3)
        .await
        .expect("reads");
    assert_eq!(
        in_store.iter().map(|m| m.id).collect::<Vec<_>>(),
        seen[2..5].to_vec()
    );
    app.stop().await;
}

/// `calsync serve` as a process, its stderr lines collected.
struct Process {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Process {
    fn start(extra: &str) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("calsync.toml");
        let db = dir.path().join("calsync.db");
        std::fs::write(
            &file,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\npublic_listen = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{}\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n{extra}",
                db.display()
            ),
        )
        .expect("write");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_calsync"))
            .env_clear()
            .arg("--config")
            .arg(&file)
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("calsync starts");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("lines").push(line);
            }
        });
        Self {
            child,
            lines,
            _dir: dir,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The `calsync serving` line's addresses: (internal, public).
    async fn addresses(&self) -> (String, String) {
        let give_up = Instant::now() + PATIENCE;
        loop {
            for line in self.lines() {
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if json["message"] == "calsync serving" {
                    let at = |k: &str| format!("http://{}", json[k].as_str().expect("address"));
                    return (at("addr"), at("public_addr"));
                }
            }
            assert!(Instant::now() < give_up, "not serving: {:?}", self.lines());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The flood: every wrong-token request wrote a log line, and every forged batch a
/// WARN. Now each is counted in the metrics and logged once per minute per source, with the
/// number of events the line stands for.
#[tokio::test]
async fn auth_failures_and_forged_notifications_are_counted_and_logged_once_per_source() {
    let process = Process::start(&format!(
        "[api]\ntoken = \"{API_TOKEN}\"\n[notifications]\npublic_url = \"https://calsync.example.com\"\n"
    ));
    let (internal, public) = process.addresses().await;
    let client = reqwest::Client::new();
    for i in 0..500 {
        let r = client
            .get(format!("{internal}/v1/mailboxes"))
            .bearer_auth(format!("wrong-token-{i}"))
            .send()
            .await
            .expect("answers");
        assert_eq!(r.status(), 401);
    }
    for _ in 0..100 {
        let r = client
            .get(format!("{internal}/v1/mailboxes"))
            .send()
            .await
            .expect("answers");
        assert_eq!(r.status(), 401);
    }
    let forged = batch(&forged(3));
    for _ in 0..40 {
        let r = client
            .post(format!("{public}/notifications"))
            .header("content-type", "application/json")
            .body(forged.clone())
            .send()
            .await
            .expect("answers");
        assert_eq!(r.status(), 202);
    }
    let metrics = client
        .get(format!("{internal}/metrics"))
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in {metrics}"))
    };
    assert_eq!(
        value("calsync_admin_auth_failures_total{reason=\"wrong\"}"),
        500.0
    );
    assert_eq!(
        value("calsync_admin_auth_failures_total{reason=\"missing\"}"),
        100.0
    );
    assert_eq!(
        value("calsync_notifications_received_total{endpoint=\"change\",result=\"unknown_subscription\"}"),
        120.0
    );
    // Each first line was written before its request was answered; the forged batches came
    // last, so once their line has been read from the pipe, so have all the others.
    let give_up = Instant::now() + PATIENCE;
    while !process
        .lines()
        .iter()
        .any(|l| l.contains("unknown subscription or a wrong clientState"))
    {
        assert!(Instant::now() < give_up, "{:#?}", process.lines());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lines = process.lines();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("wrong bearer token"), 1, "{lines:#?}");
    assert_eq!(count("without a bearer token"), 1, "{lines:#?}");
    assert_eq!(
        count("unknown subscription or a wrong clientState"),
        1,
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains("wrong-token-")),
        "a presented token was logged"
    );
}
