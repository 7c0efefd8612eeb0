//! Simulator configuration: what tenants exist, how big their calendars are, and which Outlook
//! limits apply. Every field has a default so a TOML/JSON file may set any subset.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One Entra tenant with one app registration and the mailboxes that app may read.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SimTenant {
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    pub mailboxes: Vec<String>,
    /// PEM certificate (or `PUBLIC KEY` / `RSA PUBLIC KEY`) of the app; when set, client
    /// assertions must carry a valid PS256 or RS256 signature made with the matching key, and a
    /// certificate's `x5t#S256` / `x5t` thumbprints, when sent, must name it.
    pub certificate_pem: Option<String>,
}

impl Default for SimTenant {
    fn default() -> Self {
        Self {
            name: "tenant1".into(),
            tenant_id: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            mailboxes: Vec::new(),
            certificate_pem: None,
        }
    }
}

// The secret must never reach logs, so Debug is written by hand.
impl std::fmt::Debug for SimTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTenant")
            .field("name", &self.name)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("mailboxes", &self.mailboxes.len())
            .finish()
    }
}

/// A calendar bound: an absolute instant, or whole days from the simulator's start (UTC midnight).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum CalendarBound {
    DaysFromNow(i64),
    At(DateTime<Utc>),
}

impl CalendarBound {
    pub fn resolve(self, today_midnight: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            CalendarBound::DaysFromNow(d) => today_midnight + chrono::Duration::days(d),
            CalendarBound::At(t) => t,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    pub seed: u64,
    pub tenants: Vec<SimTenant>,
    pub events_per_mailbox: usize,
    pub calendar_start: CalendarBound,
    pub calendar_end: CalendarBound,
    pub mutations_per_second: f64,
    #[serde(with = "duration_text")]
    pub access_token_lifetime: Duration,
    /// `None` means the same as `access_token_lifetime`.
    #[serde(with = "opt_duration_text")]
    pub access_token_ext_lifetime: Option<Duration>,
    #[serde(with = "duration_text")]
    pub delta_token_max_age: Duration,
    pub mailbox_concurrency: usize,
    pub mailbox_requests_per_window: u32,
    #[serde(with = "duration_text")]
    pub mailbox_window: Duration,
    /// Retry-After (seconds) sent with the MailboxConcurrency 429.
    pub concurrency_retry_after_secs: u64,
    /// Page size when the client sends no `Prefer: odata.maxpagesize`.
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Series masters are listed in calendarView delta (dated at their first occurrence), as
    /// reported of Graph. Off: never listed, so clients must fetch them (`GET /events/{id}`).
    pub masters_in_delta: bool,
    /// Graph's app-wide limit across all tenants: at most this many Graph requests per
    /// `app_window` (sliding), over it 429 `ApplicationThrottled`. `None`: not enforced (the
    /// requests per second are measured all the same). GRAPH.md gives 2,000 per second;
    /// Microsoft's throttling page gives a global 130,000 per 10 seconds.
    pub app_requests_per_window: Option<u32>,
    #[serde(with = "duration_text")]
    pub app_window: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            tenants: Vec::new(),
            events_per_mailbox: 50,
            calendar_start: CalendarBound::DaysFromNow(-30),
            calendar_end: CalendarBound::DaysFromNow(180),
            mutations_per_second: 0.0,
            access_token_lifetime: Duration::from_secs(3599),
            access_token_ext_lifetime: None,
            delta_token_max_age: Duration::from_secs(7 * 24 * 3600),
            mailbox_concurrency: 4,
            mailbox_requests_per_window: 10_000,
            mailbox_window: Duration::from_secs(600),
            concurrency_retry_after_secs: 1,
            default_page_size: 10,
            max_page_size: 100,
            masters_in_delta: true,
            app_requests_per_window: None,
            app_window: Duration::from_secs(1),
        }
    }
}

impl SimConfig {
    /// Deterministic tenants `tenant{M}` with mailboxes `user{N}@tenant{M}.example`; ids and
    /// secrets derive from the seed so two runs with one seed accept the same credentials.
    pub fn generated(
        tenants: usize,
        mailboxes_per_tenant: usize,
        events_per_mailbox: usize,
        seed: u64,
    ) -> Self {
        let tenants = (1..=tenants)
            .map(|m| {
                let name = format!("tenant{m}");
                SimTenant {
                    tenant_id: derived_guid(seed, &format!("tenant-id-{m}")),
                    client_id: derived_guid(seed, &format!("client-id-{m}")),
                    client_secret: derived_secret(seed, m),
                    mailboxes: (1..=mailboxes_per_tenant)
                        .map(|n| format!("user{n}@{name}.example"))
                        .collect(),
                    certificate_pem: None,
                    name,
                }
            })
            .collect();
        Self {
            seed,
            tenants,
            events_per_mailbox,
            ..Self::default()
        }
    }

    pub fn ext_lifetime(&self) -> Duration {
        self.access_token_ext_lifetime
            .unwrap_or(self.access_token_lifetime)
    }

    /// Rejects settings that would make the simulator meaningless, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.mailbox_concurrency >= 1,
            "mailbox_concurrency must be >= 1"
        );
        anyhow::ensure!(self.max_page_size >= 1, "max_page_size must be >= 1");
        anyhow::ensure!(
            self.default_page_size >= 1,
            "default_page_size must be >= 1"
        );
        anyhow::ensure!(
            self.mutations_per_second >= 0.0 && self.mutations_per_second.is_finite(),
            "mutations_per_second must be a finite number >= 0"
        );
        anyhow::ensure!(!self.mailbox_window.is_zero(), "mailbox_window must be > 0");
        anyhow::ensure!(!self.app_window.is_zero(), "app_window must be > 0");
        anyhow::ensure!(
            self.app_requests_per_window != Some(0),
            "app_requests_per_window must be >= 1 (leave it out for no app-wide limit)"
        );
        let mut seen = std::collections::HashSet::new();
        for t in &self.tenants {
            anyhow::ensure!(!t.tenant_id.is_empty(), "tenants.tenant_id must be set");
            anyhow::ensure!(!t.client_id.is_empty(), "tenants.client_id must be set");
            for m in &t.mailboxes {
                anyhow::ensure!(
                    seen.insert(m.to_ascii_lowercase()),
                    "mailbox {m} appears twice in tenants.mailboxes"
                );
            }
        }
        Ok(())
    }
}

fn derived_bytes(seed: u64, label: &str, n: usize) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed.to_le_bytes());
    let mut out = Vec::with_capacity(n);
    let mut counter = 0u32;
    while out.len() < n {
        let tag = ring::hmac::sign(&key, format!("{label}/{counter}").as_bytes());
        out.extend_from_slice(tag.as_ref());
        counter += 1;
    }
    out.truncate(n);
    out
}

pub(crate) fn derived_guid(seed: u64, label: &str) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&derived_bytes(seed, label, 16));
    uuid::Builder::from_random_bytes(b)
        .into_uuid()
        .hyphenated()
        .to_string()
}

fn derived_secret(seed: u64, tenant: usize) -> String {
    // Entra secrets are ~40 chars with a `~` in them; mimic that so clients handle the charset.
    use base64::Engine;
    let raw = derived_bytes(seed, &format!("secret-{tenant}"), 30);
    let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    format!("{}~{}", &s[..3], &s[3..])
}

/// Durations in config files: a number of seconds (`3599`, `0.05`) or text (`"500ms"`, `"10m"`).
pub(crate) fn parse_duration_text(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 500ms, 10m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationRepr {
    Secs(f64),
    Text(String),
}

impl DurationRepr {
    fn into_duration(self) -> Result<Duration, String> {
        match self {
            DurationRepr::Secs(s) => {
                Duration::try_from_secs_f64(s).map_err(|e| format!("invalid duration {s}: {e}"))
            }
            DurationRepr::Text(t) => parse_duration_text(&t),
        }
    }
}

pub(crate) mod duration_text {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        DurationRepr::deserialize(d)?
            .into_duration()
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) mod opt_duration_text {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<DurationRepr>::deserialize(d)?
            .map(DurationRepr::into_duration)
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_is_deterministic_and_distinct() {
        let a = SimConfig::generated(2, 3, 10, 7);
        let b = SimConfig::generated(2, 3, 10, 7);
        let c = SimConfig::generated(2, 3, 10, 8);
        assert_eq!(a.tenants, b.tenants);
        assert_ne!(a.tenants[0].client_secret, c.tenants[0].client_secret);
        assert_ne!(a.tenants[0].tenant_id, a.tenants[1].tenant_id);
        assert_eq!(a.tenants[1].mailboxes[2], "user3@tenant2.example");
        a.validate().expect("generated config is valid");
    }

    #[test]
    fn partial_toml_keeps_defaults() {
        let c: SimConfig = toml::from_str(
            "seed = 9\naccess_token_lifetime = \"500ms\"\ncalendar_start = -5\ncalendar_end = \"2027-01-01T00:00:00Z\"\n",
        )
        .expect("parses");
        assert_eq!(c.seed, 9);
        assert_eq!(c.access_token_lifetime, Duration::from_millis(500));
        assert_eq!(c.calendar_start, CalendarBound::DaysFromNow(-5));
        assert!(matches!(c.calendar_end, CalendarBound::At(_)));
        assert_eq!(c.mailbox_concurrency, 4);
        assert!(parse_duration_text("3x").is_err());
    }
}
