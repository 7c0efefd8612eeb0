//! Configuration: embedded defaults < TOML file (`--config`) < `CALSYNC_*` environment variables.
//! Loaded and validated once at start; every error names the key and what is allowed.

mod duration;
mod log_level;
mod notifications;
mod server;
mod writes;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use url::Url;

pub use duration::HumanDuration;
pub use log_level::validate as validate_log_filter;
pub use notifications::{NotificationSettings, MAX_EVENT_SUBSCRIPTION};
pub use server::ServerSettings;
pub use writes::{ConflictPolicy, WriteSettings};

use crate::credential::ClientCertificate;

const DEFAULTS: &str = include_str!("defaults.toml");
const ENV_PREFIX: &str = "CALSYNC_";
/// The top-level tables: a setting's variable is `CALSYNC_<TABLE>__<KEY>`.
const SECTIONS: [&str; 10] = [
    "server",
    "store",
    "graph",
    "sync",
    "log",
    "resilience",
    "api",
    "notifications",
    "writes",
    "tenants",
];

/// Every setting lives in a table, so its variable has a `__`. Other `CALSYNC_*` variables are
/// flags of the CLI (`CALSYNC_CONFIG`, `CALSYNC_URL`) or of the test suite, not settings; but
/// one that starts like a table with a single `_`, or whose `__` are misplaced, is a typo for a
/// setting, and is refused naming the variable it should be.
fn env_setting(name: &str) -> Result<bool, ConfigError> {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(false);
    };
    let upper = rest.to_ascii_uppercase();
    let first = upper.split("__").next().unwrap_or_default();
    let known = SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(first));
    let misplaced = if known {
        // `CALSYNC_TENANTS__0_CLIENT_SECRET`: the index needs its own `__` on both sides.
        let parts: Vec<&str> = upper.split("__").collect();
        first == "TENANTS"
            && !(parts.len() >= 3 && parts[1].bytes().all(|b| b.is_ascii_digit()))
            && parts
                .get(1)
                .is_some_and(|p| p.starts_with(|c: char| c.is_ascii_digit()))
    } else {
        SECTIONS.iter().any(|s| {
            first
                .strip_prefix(&s.to_ascii_uppercase())
                .is_some_and(|r| r.starts_with('_'))
        })
    };
    if !misplaced {
        if !known && upper.contains("__") {
            return Err(ConfigError::new(
                name,
                format!(
                    "`{first}` is not a section; settings are CALSYNC_<SECTION>__<KEY> with \
                     SECTION one of {}",
                    SECTIONS.join(", ").to_ascii_uppercase()
                ),
            ));
        }
        return Ok(known && upper.contains("__"));
    }
    let message = match env_fix(&upper) {
        Some(fix) => format!(
            "looks like a setting but its `__` are misplaced: write {fix} \
             (CALSYNC_<SECTION>__<KEY>, or CALSYNC_TENANTS__<INDEX>__<KEY>)"
        ),
        None => "looks like a setting but is not CALSYNC_<SECTION>__<KEY> \
                 (or CALSYNC_TENANTS__<INDEX>__<KEY>)"
            .to_string(),
    };
    Err(ConfigError::new(name, message))
}

/// The variable a misspelt setting name meant: `TENANTS_0_CLIENT_SECRET` (after the prefix)
/// becomes `CALSYNC_TENANTS__0__CLIENT_SECRET`, `SYNC_WORKERS` `CALSYNC_SYNC__WORKERS`.
fn env_fix(rest: &str) -> Option<String> {
    let section = SECTIONS.iter().map(|s| s.to_ascii_uppercase()).find(|s| {
        rest.strip_prefix(s.as_str())
            .is_some_and(|r| r.starts_with('_'))
    })?;
    let remainder = rest[section.len()..].trim_start_matches('_');
    let key = |text: &str| {
        let key = text.trim_matches('_').replace("__", "_");
        (!key.is_empty()).then_some(key)
    };
    if section == "TENANTS" {
        let digits = remainder.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let index = &remainder[..digits];
        let key = key(&remainder[digits..])?;
        return Some(format!("{ENV_PREFIX}TENANTS__{index}__{key}"));
    }
    Some(format!("{ENV_PREFIX}{section}__{}", key(remainder)?))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    pub graph: GraphSettings,
    pub sync: SyncSettings,
    pub log: LogSettings,
    pub resilience: ResilienceSettings,
    pub tenants: Vec<TenantSettings>,
    pub api: ApiSettings,
    pub notifications: NotificationSettings,
    pub writes: WriteSettings,
}

/// The admin API under `/v1`. `Debug` shows no token (`SecretString` redacts itself).
#[derive(Clone, Debug, Default)]
pub struct ApiSettings {
    /// The bearer token callers must present; `None` disables the API.
    pub token: Option<SecretString>,
}

/// Shortest admin API token accepted, in characters (`openssl rand -hex 32` gives 64).
pub const API_TOKEN_MIN_LEN: usize = 32;

/// The resilience policy (retries, breakers, budgets, rate limits), validated here.
pub use crate::resilience::ResilienceSettings;

#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Clone, Debug)]
pub struct GraphSettings {
    pub base_url: Url,
    pub authority: Url,
    pub scope: String,
    pub page_size: u32,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
    pub max_pages_per_round: u32,
    /// A page failing the same way at the same link this many times in a row starts a fresh
    /// round, instead of the mailbox fetching the same broken page forever.
    pub page_failure_limit: u32,
}

#[derive(Clone, Debug)]
pub struct SyncSettings {
    pub interval: Duration,
    pub jitter: Duration,
    pub window_past: Duration,
    pub window_future: Duration,
    pub workers: usize,
    pub job_deadline: Duration,
    pub failure_backoff_initial: Duration,
    pub failure_backoff_max: Duration,
    pub poll_interval: Duration,
    pub lease_ttl: Duration,
    /// How often a replica writes its heartbeat to the replica registry and looks at the
    /// others' (the fleet's shares of the request rates follow within a few of these).
    pub replica_heartbeat: Duration,
    /// Jobs of one tenant running at once (the bulkhead); never all workers.
    pub max_jobs_per_tenant: usize,
    pub stuck_grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Clone, Debug)]
pub struct TenantSettings {
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub credential: Credential,
    pub mailboxes: Vec<String>,
    /// The application may write events into this tenant's calendars: the tenant granted it
    /// `Calendars.ReadWrite`. Off unless set.
    pub writes: bool,
}

/// How a tenant's app proves itself to the token endpoint. `Debug` never shows the secret.
#[derive(Clone)]
pub enum Credential {
    Secret(SecretString),
    Certificate(Arc<ClientCertificate>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret([REDACTED])"),
            Self::Certificate(cert) => write!(f, "Certificate(thumbprint {})", cert.thumbprint()),
        }
    }
}

// ---- raw, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    server: server::RawServer,
    store: RawStore,
    graph: RawGraph,
    sync: RawSync,
    log: RawLog,
    resilience: RawResilience,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    notifications: notifications::RawNotifications,
    #[serde(default)]
    writes: writes::RawWrites,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    token: Option<SecretString>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResilience {
    #[serde(deserialize_with = "lenient_number")]
    retries_per_request: u64,
    retry_initial: HumanDuration,
    retry_max: HumanDuration,
    #[serde(deserialize_with = "lenient_float")]
    retry_budget_ratio: f64,
    #[serde(deserialize_with = "lenient_number")]
    retry_budget_min_per_second: u64,
    slow_call: HumanDuration,
    breaker_window: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    breaker_min_calls: u64,
    #[serde(deserialize_with = "lenient_float")]
    breaker_failure_rate: f64,
    breaker_base_break: HumanDuration,
    breaker_max_break: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    breaker_probes: u64,
    breaker_permanent_break: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    breaker_min_mailboxes: u64,
    #[serde(deserialize_with = "lenient_number")]
    mailbox_requests_per_10min: u64,
    #[serde(deserialize_with = "lenient_number")]
    tenant_requests_per_second: u64,
    #[serde(deserialize_with = "lenient_number")]
    app_requests_per_second: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: String,
    #[serde(deserialize_with = "lenient_number")]
    max_connections: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph {
    base_url: String,
    authority: String,
    scope: String,
    #[serde(deserialize_with = "lenient_number")]
    page_size: u64,
    connect_timeout: HumanDuration,
    request_timeout: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    max_response_bytes: u64,
    #[serde(deserialize_with = "lenient_number")]
    max_pages_per_round: u64,
    #[serde(deserialize_with = "lenient_number")]
    page_failure_limit: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    interval: HumanDuration,
    /// Unset: a tenth of the interval.
    jitter: Option<HumanDuration>,
    window_past: HumanDuration,
    window_future: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    workers: u64,
    job_deadline: HumanDuration,
    failure_backoff_initial: HumanDuration,
    failure_backoff_max: HumanDuration,
    poll_interval: HumanDuration,
    lease_ttl: HumanDuration,
    /// Unset: a tenth of the lease.
    replica_heartbeat: Option<HumanDuration>,
    #[serde(deserialize_with = "lenient_number")]
    max_jobs_per_tenant: u64,
    stuck_grace: HumanDuration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: LogFormat,
    level: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    tenant_id: String,
    client_id: String,
    client_secret: Option<SecretString>,
    client_secret_file: Option<PathBuf>,
    certificate_file: Option<PathBuf>,
    #[serde(default)]
    mailboxes: Vec<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    writes: bool,
}

/// Numbers may arrive as TOML integers or, from the environment, as strings.
fn lenient_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(n) => Ok(n),
        NumberOrText::Text(text) => text.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!("expected a whole number, got `{text}`"))
        }),
    }
}

/// Switches may arrive as TOML booleans or, from the environment, as `true`/`false`.
fn lenient_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrText {
        Bool(bool),
        Text(String),
    }
    match BoolOrText::deserialize(deserializer)? {
        BoolOrText::Bool(b) => Ok(b),
        BoolOrText::Text(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(serde::de::Error::custom(format!(
                "expected `true` or `false`, got `{text}`"
            ))),
        },
    }
}

/// Fractions may arrive as TOML floats or integers or, from the environment, as strings.
fn lenient_float<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum FloatOrText {
        Float(f64),
        Int(i64),
        Text(String),
    }
    match FloatOrText::deserialize(deserializer)? {
        FloatOrText::Float(f) => Ok(f),
        FloatOrText::Int(i) => Ok(i as f64),
        FloatOrText::Text(text) => text
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("expected a number, got `{text}`"))),
    }
}

impl Settings {
    /// Defaults, then the optional file, then `CALSYNC_*` variables from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut tree: toml::Table = toml::from_str(DEFAULTS)
            .map_err(|e| ConfigError::new("(embedded defaults)", e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            let overlay: toml::Table = toml::from_str(&text)
                .map_err(|e| toml_error(&path.display().to_string(), &text, &e))?;
            merge_tables(&mut tree, overlay);
        }
        let mut settings_env = Vec::new();
        for (name, value) in env {
            if env_setting(&name)? {
                settings_env.push((name, value));
            }
        }
        let mut env = settings_env;
        // Sorted so that TENANTS__0__ is created before TENANTS__1__.
        env.sort();
        for (name, value) in env {
            apply_env(&mut tree, &name, value)?;
        }
        Self::from_table(tree)
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_layers(&[text])
    }

    /// Defaults, then each TOML text in turn (later ones win, tables merge).
    pub fn from_toml_layers(layers: &[&str]) -> Result<Self, ConfigError> {
        let mut tree: toml::Table = toml::from_str(DEFAULTS)
            .map_err(|e| ConfigError::new("(embedded defaults)", e.to_string()))?;
        for text in layers {
            let overlay: toml::Table =
                toml::from_str(text).map_err(|e| toml_error("(toml)", text, &e))?;
            merge_tables(&mut tree, overlay);
        }
        Self::from_table(tree)
    }

    fn from_table(tree: toml::Table) -> Result<Self, ConfigError> {
        let raw: RawSettings =
            serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
                let key = e.path().to_string();
                let message = if is_secret_key(&key) {
                    // The message would quote the value ("invalid type: integer `123…`").
                    "has the wrong type: a string is expected (the value is not shown)".into()
                } else {
                    e.inner().to_string()
                };
                ConfigError::new(key, message)
            })?;
        raw.validate()
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantSettings> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// Keys whose values are never printed: credentials, and URLs that may carry a password.
fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit(['.', ']']).next().unwrap_or(key);
    matches!(last, "client_secret" | "token" | "client_state") || key == "store.url"
}

/// A TOML syntax error naming the file, line, column and key, but never quoting the line: the
/// line may be `client_secret = "..."` (toml's own message prints it whole).
fn toml_error(file: &str, text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(span) = error.span() else {
        return ConfigError::new(file, format!("not valid TOML: {message}"));
    };
    let offset = span.start.min(text.len());
    let before = text.get(..offset).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let key = toml_key_at(text, line);
    ConfigError::new(
        key.clone().unwrap_or_else(|| file.to_string()),
        format!(
            "not valid TOML ({file}, line {line}, column {column}{}): {message}",
            key.map(|k| format!(", key `{k}`")).unwrap_or_default()
        ),
    )
}

/// The dotted key set on `line` (1-based), with its table: `tenants[1].client_secret`.
fn toml_key_at(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    let mut arrays: BTreeMap<String, usize> = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if n + 1 == line {
            let (key, _) = trimmed.split_once('=')?;
            let key = key.trim().trim_matches('"');
            let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
            if key.is_empty() || !key.chars().all(bare) {
                return None;
            }
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        if let Some(name) = trimmed
            .strip_prefix("[[")
            .and_then(|r| r.split("]]").next())
        {
            let name = name.trim().to_string();
            let index = arrays.entry(name.clone()).or_insert(0);
            table = format!("{name}[{index}]");
            *index += 1;
        } else if let Some(name) = trimmed.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    None
}

fn merge_tables(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge_tables(existing, incoming)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `CALSYNC_SYNC__WORKERS=4` sets `sync.workers`; `CALSYNC_TENANTS__0__CLIENT_SECRET` sets the
/// first tenant's secret (an index equal to the array's length appends a tenant).
fn apply_env(tree: &mut toml::Table, name: &str, value: String) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    let dotted = path.join(".");
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::new(
            name,
            "malformed variable name; use `__` between keys, e.g. CALSYNC_SYNC__WORKERS",
        ));
    }
    if path.len() >= 3 && path[1].parse::<usize>().is_ok() {
        return apply_env_indexed(tree, &path, &dotted, value);
    }
    let (last, parents) = path
        .split_last()
        .ok_or_else(|| ConfigError::new(name, "empty"))?;
    let table = descend(tree, parents, &dotted)?;
    table.insert(last.clone(), toml::Value::String(value));
    Ok(())
}

fn descend<'t>(
    mut table: &'t mut toml::Table,
    keys: &[String],
    dotted: &str,
) -> Result<&'t mut toml::Table, ConfigError> {
    for key in keys {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(next) = entry else {
            return Err(ConfigError::new(
                dotted,
                format!("`{key}` is not a table, so it has no keys to set"),
            ));
        };
        table = next;
    }
    Ok(table)
}

fn apply_env_indexed(
    tree: &mut toml::Table,
    path: &[String],
    dotted: &str,
    value: String,
) -> Result<(), ConfigError> {
    let entry = tree
        .entry(path[0].clone())
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let toml::Value::Array(items) = entry else {
        return Err(ConfigError::new(
            dotted,
            format!("`{}` is not an array", path[0]),
        ));
    };
    let index: usize = path[1]
        .parse()
        .map_err(|_| ConfigError::new(dotted, "bad array index"))?;
    if index == items.len() {
        items.push(toml::Value::Table(toml::Table::new()));
    }
    let len = items.len();
    let Some(toml::Value::Table(item)) = items.get_mut(index) else {
        return Err(ConfigError::new(
            dotted,
            format!("index {index} is past the end (there are {len})"),
        ));
    };
    let (last, parents) = path[2..]
        .split_last()
        .ok_or_else(|| ConfigError::new(dotted, "names no key"))?;
    let table = descend(item, parents, dotted)?;
    let value = if last == "mailboxes" {
        // A list in one variable: comma-separated.
        toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| toml::Value::String(m.to_string()))
                .collect(),
        )
    } else {
        toml::Value::String(value)
    };
    table.insert(last.clone(), value);
    Ok(())
}

impl RawSettings {
    fn validate(self) -> Result<Settings, ConfigError> {
        let server = self.server.validate()?;
        let store_url = self.store.url.trim().to_string();
        if !(store_url.starts_with("sqlite:")
            || store_url.starts_with("postgres://")
            || store_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "store.url",
                "must start with sqlite:// (e.g. sqlite://calsync.db) or postgres://",
            ));
        }
        let max_connections =
            in_range("store.max_connections", self.store.max_connections, 1, 1000)?;

        let base_url = http_url("graph.base_url", &self.graph.base_url)?;
        let authority = http_url("graph.authority", &self.graph.authority)?;
        if self.graph.scope.trim().is_empty() {
            return Err(ConfigError::new("graph.scope", "must not be empty"));
        }
        let page_size = in_range("graph.page_size", self.graph.page_size, 1, 1000)?;
        let connect_timeout = bounded(
            "graph.connect_timeout",
            self.graph.connect_timeout,
            Duration::from_secs(300),
        )?;
        let request_timeout = bounded(
            "graph.request_timeout",
            self.graph.request_timeout,
            Duration::from_secs(3600),
        )?;
        let max_response_bytes = in_range(
            "graph.max_response_bytes",
            self.graph.max_response_bytes,
            64 * 1024,
            1 << 30,
        )?;
        let max_pages_per_round = in_range(
            "graph.max_pages_per_round",
            self.graph.max_pages_per_round,
            1,
            1_000_000,
        )?;
        let page_failure_limit = in_range(
            "graph.page_failure_limit",
            self.graph.page_failure_limit,
            1,
            1_000,
        )?;

        let s = &self.sync;
        let job_deadline = bounded("sync.job_deadline", s.job_deadline, DAY)?;
        if job_deadline <= request_timeout {
            return Err(ConfigError::new(
                "sync.job_deadline",
                format!(
                    "must be longer than graph.request_timeout ({}), got {}",
                    HumanDuration(request_timeout),
                    s.job_deadline
                ),
            ));
        }
        let failure_backoff_initial = bounded(
            "sync.failure_backoff_initial",
            s.failure_backoff_initial,
            7 * DAY,
        )?;
        let failure_backoff_max =
            bounded("sync.failure_backoff_max", s.failure_backoff_max, 7 * DAY)?;
        if failure_backoff_max < failure_backoff_initial {
            return Err(ConfigError::new(
                "sync.failure_backoff_max",
                "must not be shorter than sync.failure_backoff_initial",
            ));
        }
        let window_past = at_most("sync.window_past", s.window_past, MAX_WINDOW)?;
        let window_future = at_most("sync.window_future", s.window_future, MAX_WINDOW)?;
        if window_past + window_future < DAY {
            return Err(ConfigError::new(
                "sync.window_future",
                "sync.window_past + sync.window_future must cover at least 1d",
            ));
        }
        let interval = bounded("sync.interval", s.interval, 30 * DAY)?;
        let jitter = match s.jitter {
            // A tenth of the interval: mailboxes drift apart without syncing much less often.
            None => interval / 10,
            Some(jitter) => {
                let jitter = at_most("sync.jitter", jitter, interval).map_err(|_| {
                    ConfigError::new(
                        "sync.jitter",
                        format!(
                            "must not be longer than sync.interval ({}), got {jitter} \
                             (leave it out for a tenth of the interval)",
                            HumanDuration(interval)
                        ),
                    )
                })?;
                jitter
            }
        };
        let lease_ttl = bounded("sync.lease_ttl", s.lease_ttl, DAY)?;
        let replica_heartbeat = match s.replica_heartbeat {
            // A tenth of the lease: a replica that is alive never looks dead to the others.
            None => lease_ttl / 10,
            Some(every) => {
                let every = bounded("sync.replica_heartbeat", every, HOUR)?;
                if every > lease_ttl / 3 {
                    return Err(ConfigError::new(
                        "sync.replica_heartbeat",
                        format!(
                            "must be at most a third of sync.lease_ttl ({}), got {} (leave it \
                             out for a tenth of the lease)",
                            HumanDuration(lease_ttl / 3),
                            HumanDuration(every)
                        ),
                    ));
                }
                every
            }
        };
        let mut sync = SyncSettings {
            interval,
            jitter,
            window_past,
            window_future,
            workers: in_range("sync.workers", s.workers, 1, 4096)?,
            job_deadline,
            failure_backoff_initial,
            failure_backoff_max,
            poll_interval: bounded("sync.poll_interval", s.poll_interval, HOUR)?,
            lease_ttl,
            replica_heartbeat,
            max_jobs_per_tenant: 0,
            stuck_grace: bounded("sync.stuck_grace", s.stuck_grace, DAY)?,
        };
        let per_tenant: usize =
            in_range("sync.max_jobs_per_tenant", s.max_jobs_per_tenant, 0, 4096)?;
        // 0 = automatic: half the workers (at least one), so one tenant never holds every slot.
        sync.max_jobs_per_tenant = match per_tenant {
            0 => sync.workers.div_ceil(2).max(1),
            n => n.min(sync.workers),
        };
        let resilience = self.resilience.validate()?;
        let level = log_level::validate(&self.log.level)
            .map_err(|message| ConfigError::new("log.level", message))?;

        let mut names = HashSet::new();
        let mut tenants = Vec::with_capacity(self.tenants.len());
        for (index, raw) in self.tenants.into_iter().enumerate() {
            let tenant = raw.validate(index)?;
            // Case-insensitively: names end up in metrics labels, logs and URLs that people
            // read and type, where `Contoso` and `contoso` would be taken for one tenant.
            if !names.insert(tenant.name.to_ascii_lowercase()) {
                return Err(ConfigError::new(
                    format!("tenants[{index}].name"),
                    format!(
                        "`{}` is used by two tenants; names must be unique, ignoring case",
                        tenant.name
                    ),
                ));
            }
            tenants.push(tenant);
        }
        let api = self.api.validate()?;
        let notifications = self.notifications.validate()?;
        let writes = self.writes.validate()?;

        Ok(Settings {
            server,
            store: StoreSettings {
                url: store_url,
                max_connections,
            },
            graph: GraphSettings {
                base_url,
                authority,
                scope: self.graph.scope,
                page_size,
                connect_timeout,
                request_timeout,
                max_response_bytes,
                max_pages_per_round,
                page_failure_limit,
            },
            sync,
            log: LogSettings {
                format: self.log.format,
                level,
            },
            resilience,
            tenants,
            api,
            notifications,
            writes,
        })
    }
}

impl RawApi {
    fn validate(self) -> Result<ApiSettings, ConfigError> {
        let (key, token) = match (self.token, self.token_file) {
            (None, None) => return Ok(ApiSettings::default()),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "api.token",
                    "set at most one of api.token, api.token_file",
                ))
            }
            (Some(token), None) => ("api.token", token),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(
                        "api.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                (
                    "api.token_file",
                    SecretString::from(text.trim().to_string()),
                )
            }
        };
        let text = token.expose_secret();
        // Visible ASCII only: it travels in an `Authorization` header, and a stray space or
        // newline would make a token that no client can send.
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                key,
                "must be visible ASCII characters only (no spaces or line breaks)",
            ));
        }
        if text.len() < API_TOKEN_MIN_LEN {
            return Err(ConfigError::new(
                key,
                format!(
                    "must be at least {API_TOKEN_MIN_LEN} characters (e.g. `openssl rand -hex 32`), got {}",
                    text.len()
                ),
            ));
        }
        Ok(ApiSettings { token: Some(token) })
    }
}

impl RawResilience {
    fn validate(self) -> Result<ResilienceSettings, ConfigError> {
        let retry_initial = bounded("resilience.retry_initial", self.retry_initial, HOUR)?;
        let retry_max = bounded("resilience.retry_max", self.retry_max, HOUR)?;
        if retry_max < retry_initial {
            return Err(ConfigError::new(
                "resilience.retry_max",
                "must not be shorter than resilience.retry_initial",
            ));
        }
        if !(0.0..=10.0).contains(&self.retry_budget_ratio) {
            return Err(ConfigError::new(
                "resilience.retry_budget_ratio",
                format!(
                    "must be between 0 and 10 (retries per successful request), got {}",
                    self.retry_budget_ratio
                ),
            ));
        }
        if !(self.breaker_failure_rate > 0.0 && self.breaker_failure_rate <= 1.0) {
            return Err(ConfigError::new(
                "resilience.breaker_failure_rate",
                format!("must be in (0, 1], got {}", self.breaker_failure_rate),
            ));
        }
        let base_break = bounded(
            "resilience.breaker_base_break",
            self.breaker_base_break,
            DAY,
        )?;
        let max_break = bounded("resilience.breaker_max_break", self.breaker_max_break, DAY)?;
        if max_break < base_break {
            return Err(ConfigError::new(
                "resilience.breaker_max_break",
                "must not be shorter than resilience.breaker_base_break",
            ));
        }
        Ok(ResilienceSettings {
            retries_per_request: in_range(
                "resilience.retries_per_request",
                self.retries_per_request,
                0,
                20,
            )?,
            retry_initial,
            retry_max,
            retry_budget_ratio: self.retry_budget_ratio,
            retry_budget_min_per_second: in_range(
                "resilience.retry_budget_min_per_second",
                self.retry_budget_min_per_second,
                0,
                100_000,
            )?,
            slow_call: bounded("resilience.slow_call", self.slow_call, HOUR)?,
            breaker: crate::resilience::breaker::BreakerConfig {
                window: bounded("resilience.breaker_window", self.breaker_window, DAY)?,
                min_calls: in_range(
                    "resilience.breaker_min_calls",
                    self.breaker_min_calls,
                    1,
                    10_000,
                )?,
                failure_rate: self.breaker_failure_rate,
                base_break,
                max_break,
                probes: in_range("resilience.breaker_probes", self.breaker_probes, 1, 100)?,
                permanent_break: bounded(
                    "resilience.breaker_permanent_break",
                    self.breaker_permanent_break,
                    7 * DAY,
                )?,
            },
            breaker_min_mailboxes: in_range(
                "resilience.breaker_min_mailboxes",
                self.breaker_min_mailboxes,
                1,
                10_000,
            )?,
            mailbox_requests_per_10min: in_range(
                "resilience.mailbox_requests_per_10min",
                self.mailbox_requests_per_10min,
                1,
                1_000_000,
            )?,
            tenant_requests_per_second: in_range(
                "resilience.tenant_requests_per_second",
                self.tenant_requests_per_second,
                1,
                1_000_000,
            )?,
            app_requests_per_second: in_range(
                "resilience.app_requests_per_second",
                self.app_requests_per_second,
                1,
                1_000_000,
            )?,
        })
    }
}

impl RawTenant {
    fn validate(self, index: usize) -> Result<TenantSettings, ConfigError> {
        let key = |field: &str| format!("tenants[{index}].{field}");
        let name = self.name.trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::new(
                key("name"),
                "must be non-empty and use only letters, digits, `-`, `_` or `.`",
            ));
        }
        let tenant_id = self.tenant_id.trim().to_string();
        if tenant_id.is_empty() || tenant_id.contains(['/', '?', '#', ' ']) {
            return Err(ConfigError::new(
                key("tenant_id"),
                "must be the directory (tenant) id GUID or a verified domain",
            ));
        }
        let client_id = self.client_id.trim().to_string();
        if client_id.is_empty() {
            return Err(ConfigError::new(
                key("client_id"),
                "must be the application (client) id",
            ));
        }
        let given = [
            self.client_secret.is_some(),
            self.client_secret_file.is_some(),
            self.certificate_file.is_some(),
        ]
        .iter()
        .filter(|given| **given)
        .count();
        if given != 1 {
            return Err(ConfigError::new(
                key("client_secret"),
                "set exactly one of client_secret, client_secret_file, certificate_file",
            ));
        }
        let credential = if let Some(secret) = self.client_secret {
            if secret.expose_secret().trim().is_empty() {
                return Err(ConfigError::new(key("client_secret"), "must not be empty"));
            }
            Credential::Secret(secret)
        } else if let Some(path) = self.client_secret_file {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(
                    key("client_secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let secret = text.trim();
            if secret.is_empty() {
                return Err(ConfigError::new(
                    key("client_secret_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Credential::Secret(SecretString::from(secret.to_string()))
        } else if let Some(path) = self.certificate_file {
            let cert = ClientCertificate::from_pem_file(&path)
                .map_err(|e| ConfigError::new(key("certificate_file"), e.to_string()))?;
            Credential::Certificate(Arc::new(cert))
        } else {
            unreachable!("exactly one credential was checked above")
        };
        let mut seen = BTreeMap::new();
        let mut mailboxes = Vec::with_capacity(self.mailboxes.len());
        for (i, mailbox) in self.mailboxes.into_iter().enumerate() {
            // Surrounding blanks are the file's layout; everything inside follows the API's rule.
            let mailbox = mailbox.trim().to_string();
            if let Err(why) = check_mailbox(&mailbox) {
                return Err(ConfigError::new(
                    format!("tenants[{index}].mailboxes[{i}]"),
                    why,
                ));
            }
            if seen.insert(mailbox.to_ascii_lowercase(), i).is_some() {
                return Err(ConfigError::new(
                    format!("tenants[{index}].mailboxes[{i}]"),
                    format!("`{mailbox}` is listed twice"),
                ));
            }
            mailboxes.push(mailbox);
        }
        Ok(TenantSettings {
            name,
            tenant_id,
            client_id,
            credential,
            mailboxes,
            writes: self.writes,
        })
    }
}

/// Longest mailbox (user id or UPN) accepted; a UPN is at most 113 characters, an address 320.
pub const MAX_MAILBOX_LEN: usize = 320;

/// The one rule for a mailbox, in the config and in the admin API: a user id (GUID) or user
/// principal name, which Entra writes in visible ASCII. So no space of any kind (NBSP, U+2028),
/// no control or invisible character (U+200B, U+202E), nothing that would change the Graph URL
/// it goes into (`/`, `?`, `#`), at most [`MAX_MAILBOX_LEN`] characters.
pub fn check_mailbox(mailbox: &str) -> Result<(), String> {
    let what = "must be a user id (GUID) or user principal name";
    if mailbox.is_empty() {
        return Err(format!("{what}; it is empty"));
    }
    if mailbox.len() > MAX_MAILBOX_LEN {
        return Err(format!(
            "{what} of at most {MAX_MAILBOX_LEN} characters; it has {}",
            mailbox.chars().count()
        ));
    }
    if let Some((at, c)) = mailbox
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_graphic() || matches!(c, '/' | '?' | '#'))
    {
        return Err(format!(
            "{what}: visible ASCII characters only, without `/`, `?` or `#`; character {} is {}",
            at + 1,
            if c.is_ascii_graphic() {
                format!("`{c}`")
            } else {
                format!("U+{:04X}", u32::from(c))
            }
        ));
    }
    Ok(())
}

fn in_range<T: TryFrom<u64>>(key: &str, value: u64, min: u64, max: u64) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    T::try_from(value).map_err(|_| ConfigError::new(key, "is too large for this platform"))
}

/// `text` with any `user:password@` of its authority replaced, for messages. Textual, so it
/// also works on what does not parse as a URL.
pub fn redact_url(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = text[authority_start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| authority_start + i);
    let authority = &text[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return text.to_string();
    };
    // The user name stays when a password follows it; alone, it may be a token.
    let kept = match authority[..at].find(':') {
        Some(colon) => &authority[..=colon],
        None => "",
    };
    format!(
        "{}{kept}REDACTED{}",
        &text[..authority_start],
        &text[authority_start + at..]
    )
}

const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);
/// The calendarView window reaches at most this far either side of today: dates stay far from
/// what date arithmetic can hold, and Graph is not asked for centuries of calendar.
pub const MAX_WINDOW: Duration = Duration::from_secs(3650 * 86_400);

/// A duration longer than 0 and at most `max`: every duration has a ceiling its use can hold
/// (timestamps, timers and sleeps are computed from them), so no configured value can panic.
fn bounded(key: &str, value: HumanDuration, max: Duration) -> Result<Duration, ConfigError> {
    if value.0.is_zero() {
        return Err(ConfigError::new(key, "must be longer than 0"));
    }
    at_most(key, value, max)
}

/// A duration of at most `max` (0 allowed).
fn at_most(key: &str, value: HumanDuration, max: Duration) -> Result<Duration, ConfigError> {
    if value.0 > max {
        return Err(ConfigError::new(
            key,
            format!("must be at most {}, got {value}", HumanDuration(max)),
        ));
    }
    Ok(value.0)
}

/// http(s) URL; plain http only for loopback (the simulator, tests), never for a real host;
/// never with a user or password (it would be sent, and printed, with every use).
fn http_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim_end_matches('/'))
        .map_err(|e| ConfigError::new(key, format!("`{}` is not a URL: {e}", redact_url(text))))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            key,
            "must not carry a user name or password (`user:password@`); calsync authenticates \
             with the tenant's credentials",
        ));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(ConfigError::new(
                key,
                format!(
                    "`{}` must be https:// (http:// only for localhost)",
                    redact_url(text)
                ),
            ))
        }
    }
    if url.host().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            key,
            format!(
                "`{}` must be a plain base URL without query or fragment",
                redact_url(text)
            ),
        ));
    }
    Ok(url)
}
