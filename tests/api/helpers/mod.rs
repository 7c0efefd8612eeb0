//! The test harness. Every app a test starts is built by [`start_app`]: the real wiring
//! (`Application::build`), its own store, its HTTP served on free ports, and its worker either
//! run by the service (`Jobs::Loop`) or left to the test to drive a step at a time
//! (`Jobs::ByTest`). [`spawn_app`] points it at a mock Graph (wiremock, this file),
//! [`sim::sim_app`] at the simulator; [`store`] runs one store test on both backends.

pub mod api;
pub mod sim;
pub mod store;

use std::ops::Deref;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use calsync::app::Application;
use calsync::config::Settings;
use calsync::graph::Event;
use calsync::scheduler::{JobResult, Worker};
use calsync::store::{MailboxRecord, Store};
use calsync::tenants::Tenants;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub const TENANT: &str = "contoso";
pub const TENANT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "s3cr3t-Value~that-must-never-leak";
pub const ALICE: &str = "alice@contoso.com";
pub const DELTA_PATH: &str = "/v1.0/users/alice@contoso.com/calendarView/delta";

/// Who runs the jobs of an app a test starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jobs {
    /// The service's own worker loop, as in production.
    Loop,
    /// The test, a step at a time (`worker.run_pass`, `Dispatcher`).
    ByTest,
}

/// A started service: its HTTP on free ports, its store and worker. Dropping it asks it to
/// stop; [`Running::stop`] also waits for a clean stop.
#[allow(dead_code)] // each test file uses the parts it needs
pub struct Running {
    /// `http://127.0.0.1:{port}` of the internal listener (health, metrics, status, admin API).
    pub internal: String,
    pub internal_port: u16,
    /// The public (notification) listener, when notifications are on.
    pub public: Option<String>,
    pub public_port: Option<u16>,
    pub store: Store,
    pub worker: Arc<Worker>,
    /// The configured tenants (token providers, breakers), by name.
    pub tenants: Arc<Tenants>,
    /// Store calls the notification endpoints have made.
    pub store_calls: Arc<AtomicU64>,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Builds the service from `settings` with the real wiring and serves its HTTP.
pub async fn start_app(settings: Settings, jobs: Jobs) -> Running {
    try_start_app(settings, jobs).await.expect("app builds")
}

/// [`start_app`], for a test that handles the service failing to build (a port taken).
pub async fn try_start_app(settings: Settings, jobs: Jobs) -> anyhow::Result<Running> {
    let app = Application::build(settings).await?;
    let internal_port = app.port();
    let public_port = app.public_port();
    let store = app.store().clone();
    let worker = app.worker();
    let tenants = Arc::clone(worker.tenants());
    let store_calls = app.notification_store_calls();
    let shutdown = CancellationToken::new();
    let run: Run = match jobs {
        Jobs::Loop => Box::pin(app.run_until_stopped(shutdown.clone())),
        Jobs::ByTest => Box::pin(app.serve_until_stopped(shutdown.clone())),
    };
    let task = tokio::spawn(run);
    Ok(Running {
        internal: format!("http://127.0.0.1:{internal_port}"),
        internal_port,
        public: public_port.map(|p| format!("http://127.0.0.1:{p}")),
        public_port,
        store,
        worker,
        tenants,
        store_calls,
        http: reqwest::Client::new(),
        shutdown,
        task: Some(task),
    })
}

type Run = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// How long a stopping service may take: its grace, with room for a loaded machine.
const STOP_PATIENCE: Duration = Duration::from_secs(30);

#[allow(dead_code)] // each test file uses the parts it needs
impl Running {
    /// `internal` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.internal)
    }

    /// The public listener's `path`; panics when notifications are off.
    pub fn public_url(&self, path: &str) -> String {
        let public = self.public.as_deref().expect("notifications are on");
        format!("{public}{path}")
    }

    /// Asks the service to stop and waits until it has, cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("not stopped yet");
        tokio::time::timeout(STOP_PATIENCE, task)
            .await
            .expect("the service stops in time")
            .expect("the service task does not panic")
            .expect("the service stops cleanly");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[allow(dead_code)] // `settings` and `dir` are for tests that need them; `dir` keeps the files alive
pub struct TestApp {
    pub graph: MockServer,
    pub settings: Settings,
    pub running: Running,
    pub dir: TempDir,
}

impl Deref for TestApp {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

/// The TOML every test starts from; `extra` is appended (later keys of a table win by merge).
pub fn base_config(graph_uri: &str, db: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://{db}"
[graph]
base_url = "{graph_uri}/v1.0"
authority = "{graph_uri}"
page_size = 50
connect_timeout = "1s"
request_timeout = "2s"
[sync]
interval = "1m"
jitter = "0s"
window_past = "3650d"
window_future = "3650d"
workers = 4
job_deadline = "5s"
failure_backoff_initial = "1s"
failure_backoff_max = "10s"
poll_interval = "50ms"
[resilience]
retry_initial = "10ms"
retry_max = "50ms"
[[tenants]]
name = "{TENANT}"
tenant_id = "{TENANT_ID}"
client_id = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
client_secret = "{CLIENT_SECRET}"
mailboxes = ["{ALICE}"]
"#
    )
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|toml| toml).await
}

/// Like [`spawn_app`], with the config text rewritten by `edit` first.
pub async fn spawn_app_with(edit: impl FnOnce(String) -> String) -> TestApp {
    let graph = MockServer::start().await;
    spawn_app_on(graph, edit).await
}

pub async fn spawn_app_on(graph: MockServer, edit: impl FnOnce(String) -> String) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("calsync.db");
    let toml = edit(base_config(&graph.uri(), &db.display().to_string()));
    let settings = Settings::from_toml_str(&toml).expect("test config is valid");
    let running = start_app(settings.clone(), Jobs::ByTest).await;
    TestApp {
        graph,
        settings,
        running,
        dir,
    }
}

impl TestApp {
    pub fn base(&self) -> String {
        format!("{}/v1.0", self.graph.uri())
    }

    /// A fixture from `fixtures/`, with `{{BASE}}` pointing at this test's mock Graph.
    pub fn fixture(&self, name: &str) -> serde_json::Value {
        let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text.replace("{{BASE}}", &self.base())).expect("fixture is JSON")
    }

    pub async fn mount_token_ok(&self) {
        Mock::given(method("POST"))
            .and(path(format!("/{TENANT_ID}/oauth2/v2.0/token")))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(self.fixture("token/success.json")),
            )
            .mount(&self.graph)
            .await;
    }

    pub async fn sync_once(&self) -> Vec<JobResult> {
        self.worker.sync_all_once().await.expect("sync pass runs")
    }

    pub async fn sync_alice(&self) -> JobResult {
        let mut results = self.sync_once().await;
        assert_eq!(results.len(), 1);
        results.remove(0)
    }

    pub async fn mailbox(&self, user: &str) -> MailboxRecord {
        self.store
            .mailbox(TENANT, user)
            .await
            .expect("store reads")
            .expect("mailbox registered")
    }

    pub async fn events(&self, user: &str) -> Vec<Event> {
        let mailbox = self.mailbox(user).await;
        self.store.events(mailbox.id).await.expect("store reads")
    }

    pub async fn event_ids(&self, user: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.events(user).await.into_iter().map(|e| e.id).collect();
        ids.sort();
        ids
    }
}

/// Matches a request whose query string has a parameter called `name`.
pub fn has_param(name: &'static str) -> impl Fn(&wiremock::Request) -> bool + Send + Sync {
    move |request: &wiremock::Request| request.url.query_pairs().any(|(k, _)| k == name)
}

/// Matches a request whose query parameter `name` equals `value`.
pub fn param(
    name: &'static str,
    value: &'static str,
) -> impl Fn(&wiremock::Request) -> bool + Send + Sync {
    move |request: &wiremock::Request| {
        request
            .url
            .query_pairs()
            .any(|(k, v)| k == name && v == value)
    }
}

/// Mounts the three-page initial round of `fixtures/graph/initial_page*.json` for Alice.
pub async fn mount_initial_round(app: &TestApp) {
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .and(has_param("startDateTime"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(app.fixture("graph/initial_page1.json")),
        )
        .expect(1)
        .mount(&app.graph)
        .await;
    for (token, page) in [
        ("R0usmcCM996atia_s-page2", "graph/initial_page2.json"),
        ("R0usmcCM996atia_s-page3", "graph/initial_page3.json"),
    ] {
        Mock::given(method("GET"))
            .and(path(DELTA_PATH))
            .and(param("$skiptoken", token))
            .respond_with(ResponseTemplate::new(200).set_body_json(app.fixture(page)))
            .expect(1)
            .mount(&app.graph)
            .await;
    }
}

pub fn token_path() -> String {
    format!("/{TENANT_ID}/oauth2/v2.0/token")
}

/// A successful token response carrying `access_token`.
pub fn token_body(access_token: &str, expires_in: u64, ext_expires_in: u64) -> serde_json::Value {
    serde_json::json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "ext_expires_in": ext_expires_in,
        "access_token": access_token,
    })
}

/// The identity platform's error body, as Entra sends it.
pub fn identity_error(error: &str, code: u64, description: &str) -> serde_json::Value {
    serde_json::json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description}\r\nTrace ID: 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\r\nCorrelation ID: 9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4\r\nTimestamp: 2026-11-27 10:00:00Z"
        ),
        "error_codes": [code],
        "timestamp": "2026-11-27 10:00:00Z",
        "trace_id": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        "correlation_id": "9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4",
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    })
}

/// Graph's error body: `{"error":{"code","message","innerError":{..}}}`.
pub fn graph_error(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": "2026-11-27T10:00:00",
                "request-id": "5c3b0f0e-8d1a-4d2b-9a51-1f2e3d4c5b6a",
                "client-request-id": "5c3b0f0e-8d1a-4d2b-9a51-1f2e3d4c5b6a"
            }
        }
    })
}

/// Answers with each template in turn, then repeats the last one.
pub struct InTurn {
    templates: Vec<ResponseTemplate>,
    calls: std::sync::atomic::AtomicUsize,
}

impl InTurn {
    pub fn new(templates: Vec<ResponseTemplate>) -> Self {
        assert!(!templates.is_empty());
        Self {
            templates,
            calls: Default::default(),
        }
    }
}

impl wiremock::Respond for InTurn {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.templates[n.min(self.templates.len() - 1)].clone()
    }
}

/// A delta page whose `@odata.nextLink` (or, with `last`, `@odata.deltaLink`) carries `token`.
pub fn delta_page(
    base: &str,
    items: Vec<serde_json::Value>,
    token: &str,
    last: bool,
) -> serde_json::Value {
    let (key, param) = if last {
        ("@odata.deltaLink", "$deltatoken")
    } else {
        ("@odata.nextLink", "$skiptoken")
    };
    serde_json::json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(event)",
        key: format!("{base}/users/alice@contoso.com/calendarView/delta?{param}={token}"),
        "value": items,
    })
}

/// A timed event in UTC as Graph sends it.
pub fn event(id: &str, subject: &str, start: &str, end: &str) -> serde_json::Value {
    serde_json::json!({
        "@odata.type": "#microsoft.graph.event",
        "@odata.etag": format!("W/\"{id}-{subject}\""),
        "id": id,
        "changeKey": format!("{id}-{subject}"),
        "lastModifiedDateTime": "2026-11-25T09:00:00Z",
        "subject": subject,
        "isAllDay": false,
        "isCancelled": false,
        "showAs": "busy",
        "type": "singleInstance",
        "start": {"dateTime": start, "timeZone": "UTC"},
        "end": {"dateTime": end, "timeZone": "UTC"},
    })
}

/// Runs the three-page initial round for Alice, checks it succeeded, and clears the mocks
/// (after verifying their expectations) so the test can mount the next round.
pub async fn complete_initial_round(app: &TestApp) {
    app.mount_token_ok().await;
    mount_initial_round(app).await;
    let result = app.sync_alice().await;
    assert_eq!(
        result.outcome,
        calsync::store::RunOutcome::Ok,
        "{:?}",
        result.error
    );
    app.graph.verify().await;
    app.graph.reset().await;
}

/// `calsync --config CONFIG serve` as a process of its own (killed if dropped), with none of
/// this test process's `CALSYNC_*` variables, `RUST_LOG=warn` and its stderr in `stderr`
/// (`None`: discarded). Add variables (e.g. `CALSYNC_SERVER__LISTEN`) before spawning it.
pub fn serve_command(
    config: &std::path::Path,
    stderr: Option<std::fs::File>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_calsync"));
    command
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr.map_or_else(std::process::Stdio::null, std::process::Stdio::from))
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CALSYNC_") {
            command.env_remove(key);
        }
    }
    command
}
