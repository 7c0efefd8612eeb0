//! Fault rules: what can go wrong, where, how often and when. Rules are data (JSON/TOML), so the
//! same shape serves the in-process API, `/_sim/faults` and scenario files.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub type FaultId = u64;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Token,
    /// Every Graph endpoint: calendarView delta, single events and event writes.
    Graph,
    /// `calendarView/delta` only.
    Delta,
    /// `GET /users/{id}/events/{id}` only (series master fetches).
    Events,
    /// Event writes only: create, update, delete, cancel.
    Writes,
    #[default]
    Any,
}

impl Endpoint {
    /// A rule for `self` applies to a request to `target`.
    pub fn covers(self, target: Endpoint) -> bool {
        self == Self::Any
            || self == target
            || (self == Self::Graph && matches!(target, Self::Delta | Self::Events | Self::Writes))
    }
}

/// How a 429/5xx tells the client to wait.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RetryAfter {
    #[default]
    None,
    /// `Retry-After: N`
    Seconds(u64),
    /// `Retry-After: <HTTP-date N seconds from now>`
    HttpDate(u64),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FaultKind {
    /// Delay, then answer normally (the request counts as in flight meanwhile).
    Latency {
        ms: u64,
    },
    /// Read the request and never answer; the socket stays open.
    Hang,
    /// Send the normal response slowly.
    Trickle {
        bytes_per_second: u32,
    },
    /// Abort the TCP connection with RST.
    Reset,
    /// Writes: apply the write, then never answer (the socket stays open), as when Graph
    /// commits and the answer is lost. Elsewhere the same as `Hang`.
    CommitThenHang,
    /// Writes: apply the write, then abort the connection with RST. Elsewhere the same as
    /// `Reset`.
    CommitThenReset,
    /// An error response. On Graph `graph_code` is `error.code`; on the token endpoint it is the
    /// OAuth `error` and `aadsts` the AADSTS number. Both get sensible defaults per status.
    Status {
        code: u16,
        #[serde(default)]
        graph_code: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        aadsts: Option<u32>,
        #[serde(default)]
        retry_after: RetryAfter,
    },
    MalformedJson,
    TruncatedJson,
    /// A valid JSON body padded to about `bytes`.
    Oversized {
        bytes: usize,
    },
    /// Delta only: the round never ends, identical pages with fresh nextLinks.
    NextLinkLoop,
    /// Delta only: pages three times the requested size.
    OversizedPage,
    /// Delta only: `n` empty pages with nextLinks at the start of a round.
    EmptyPages {
        n: u32,
    },
    /// Delta only: items repeat within the round.
    Duplicates,
    /// Delta only: the page is computed from the calendar as it is now, then held back (the
    /// request stays in flight) until the rule is removed, when it is sent as computed: a round
    /// stopped mid-page, for a test to change the calendar behind it. `holding` in the rule's
    /// listing counts the requests held now.
    Hold {
        /// The rule that fired, filled in by the simulator.
        #[serde(skip)]
        rule: FaultId,
    },
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FaultRule {
    /// Assigned by the simulator; ignored on input.
    #[serde(default)]
    pub id: FaultId,
    /// Tenant name or tenant id; `None` matches every tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Mailbox address; a rule with a mailbox never matches the token endpoint.
    #[serde(default)]
    pub mailbox: Option<String>,
    #[serde(default)]
    pub endpoint: Endpoint,
    #[serde(default = "one")]
    pub probability: f64,
    /// Active from `after_ms` after the rule was added, for `for_ms` (forever if absent).
    #[serde(default)]
    pub after_ms: u64,
    #[serde(default)]
    pub for_ms: Option<u64>,
    /// Absolute bounds on the simulator clock, combined with the relative ones.
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
    #[serde(default)]
    pub not_after: Option<DateTime<Utc>>,
    /// Fires at most this many times.
    #[serde(default)]
    pub max_count: Option<u64>,
    pub kind: FaultKind,
}

impl FaultRule {
    /// A rule that always fires on every endpoint, to be narrowed with the builder methods.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            id: 0,
            tenant: None,
            mailbox: None,
            endpoint: Endpoint::Any,
            probability: 1.0,
            after_ms: 0,
            for_ms: None,
            not_before: None,
            not_after: None,
            max_count: None,
            kind,
        }
    }
    pub fn tenant(mut self, t: impl Into<String>) -> Self {
        self.tenant = Some(t.into());
        self
    }
    pub fn mailbox(mut self, m: impl Into<String>) -> Self {
        self.mailbox = Some(m.into());
        self
    }
    pub fn endpoint(mut self, e: Endpoint) -> Self {
        self.endpoint = e;
        self
    }
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }
    pub fn window_ms(mut self, after_ms: u64, for_ms: Option<u64>) -> Self {
        self.after_ms = after_ms;
        self.for_ms = for_ms;
        self
    }
    pub fn max_count(mut self, n: u64) -> Self {
        self.max_count = Some(n);
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.probability) {
            return Err(format!(
                "probability must be within 0..=1, got {}",
                self.probability
            ));
        }
        if let FaultKind::Trickle { bytes_per_second } = self.kind {
            if bytes_per_second == 0 {
                return Err("trickle.bytes_per_second must be > 0".into());
            }
        }
        if let FaultKind::Status { code, .. } = self.kind {
            if !(100..=599).contains(&code) {
                return Err(format!("status.code must be an HTTP status, got {code}"));
            }
        }
        Ok(())
    }
}

/// Where a request is going, for matching rules.
pub struct Target<'a> {
    pub endpoint: Endpoint,
    pub tenant_name: Option<&'a str>,
    pub tenant_id: Option<&'a str>,
    pub mailbox: Option<&'a str>,
}

struct ActiveRule {
    rule: FaultRule,
    added: Instant,
    fired: u64,
}

pub struct FaultSet {
    rules: Vec<ActiveRule>,
    rng: StdRng,
    next_id: FaultId,
    /// Requests held now, by `Hold` rule.
    holding: BTreeMap<FaultId, usize>,
    /// Bumped whenever rules are removed, to wake held requests.
    removed: tokio::sync::watch::Sender<()>,
}

impl FaultSet {
    pub fn new(seed: u64) -> Self {
        Self {
            rules: Vec::new(),
            rng: StdRng::seed_from_u64(seed ^ 0xfa17),
            next_id: 1,
            holding: BTreeMap::new(),
            removed: tokio::sync::watch::Sender::new(()),
        }
    }

    pub fn add(&mut self, mut rule: FaultRule, now: Instant) -> FaultId {
        rule.id = self.next_id;
        self.next_id += 1;
        let id = rule.id;
        self.rules.push(ActiveRule {
            rule,
            added: now,
            fired: 0,
        });
        id
    }

    pub fn remove(&mut self, id: FaultId) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.rule.id != id);
        self.removed.send_replace(());
        before != self.rules.len()
    }

    pub fn clear(&mut self) {
        self.rules.clear();
        self.removed.send_replace(());
    }

    /// Requests a `Hold` rule is holding now.
    pub fn holding(&self, id: FaultId) -> usize {
        self.holding.get(&id).copied().unwrap_or(0)
    }

    pub fn list(&self) -> Vec<Value> {
        self.rules
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(&r.rule).unwrap_or(Value::Null);
                v["fired"] = r.fired.into();
                if matches!(r.rule.kind, FaultKind::Hold { .. }) {
                    v["holding"] = self.holding(r.rule.id).into();
                }
                v
            })
            .collect()
    }

    pub fn fired_counts(&self) -> BTreeMap<FaultId, u64> {
        self.rules.iter().map(|r| (r.rule.id, r.fired)).collect()
    }

    /// The rules that fire for this request, in the order they were added. Each firing counts
    /// toward `max_count`; the probability draw uses the seeded RNG, so a fixed request order
    /// gives a fixed outcome.
    pub fn fire(
        &mut self,
        target: &Target<'_>,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Vec<FaultKind> {
        let mut out = Vec::new();
        for r in &mut self.rules {
            let rule = &r.rule;
            let endpoint_ok = rule.endpoint.covers(target.endpoint);
            let tenant_ok = rule.tenant.as_deref().is_none_or(|t| {
                target
                    .tenant_name
                    .is_some_and(|n| n.eq_ignore_ascii_case(t))
                    || target.tenant_id.is_some_and(|n| n.eq_ignore_ascii_case(t))
            });
            let mailbox_ok = rule
                .mailbox
                .as_deref()
                .is_none_or(|m| target.mailbox.is_some_and(|t| t.eq_ignore_ascii_case(m)));
            let elapsed = now.saturating_duration_since(r.added).as_millis() as u64;
            let time_ok = elapsed >= rule.after_ms
                && rule
                    .for_ms
                    .is_none_or(|f| elapsed < rule.after_ms.saturating_add(f))
                && rule.not_before.is_none_or(|t| wall >= t)
                && rule.not_after.is_none_or(|t| wall < t);
            let count_ok = rule.max_count.is_none_or(|m| r.fired < m);
            if !(endpoint_ok && tenant_ok && mailbox_ok && time_ok && count_ok) {
                continue;
            }
            let hit = if rule.probability >= 1.0 {
                true
            } else if rule.probability <= 0.0 {
                false
            } else {
                self.rng.gen_bool(rule.probability)
            };
            if hit {
                r.fired += 1;
                out.push(match rule.kind {
                    FaultKind::Hold { .. } => FaultKind::Hold { rule: rule.id },
                    ref kind => kind.clone(),
                });
            }
        }
        out
    }
}

use serde_json::Value;

/// Holds a request while a `Hold` rule among `fired` is still in `faults` (see
/// [`FaultKind::Hold`]). Returns at once when none fired.
pub async fn hold(faults: &std::sync::Mutex<FaultSet>, fired: &[FaultKind]) {
    for kind in fired {
        let FaultKind::Hold { rule } = *kind else {
            continue;
        };
        let _held = Held::new(faults, rule);
        // Subscribed before the check, so a removal after it still wakes this request.
        let mut removed = lock(faults).removed.subscribe();
        while lock(faults).rules.iter().any(|r| r.rule.id == rule) {
            if removed.changed().await.is_err() {
                break;
            }
        }
    }
}

/// Counts a held request in [`FaultSet::holding`] while it lives (a client that gives up
/// drops it).
struct Held<'a> {
    faults: &'a std::sync::Mutex<FaultSet>,
    rule: FaultId,
}

impl<'a> Held<'a> {
    fn new(faults: &'a std::sync::Mutex<FaultSet>, rule: FaultId) -> Self {
        *lock(faults).holding.entry(rule).or_default() += 1;
        Self { faults, rule }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut set = lock(self.faults);
        if let Some(n) = set.holding.get_mut(&self.rule) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                set.holding.remove(&self.rule);
            }
        }
    }
}

use super::locks::lock;

/// A scenario file: `{"faults":[FaultRule...]}` (JSON) or `[[faults]]` tables (TOML), or a bare
/// JSON array. `after_ms`/`for_ms` become the timeline, counted from when the scenario is loaded
/// into a running simulator.
#[derive(Debug, Deserialize)]
struct ScenarioFile {
    #[serde(default, alias = "fault")]
    faults: Vec<FaultRule>,
}

pub fn parse_scenario(text: &str, json: bool) -> anyhow::Result<Vec<FaultRule>> {
    let rules = if json {
        let v: Value = serde_json::from_str(text)?;
        if v.is_array() {
            serde_json::from_value(v)?
        } else {
            serde_json::from_value::<ScenarioFile>(v)?.faults
        }
    } else {
        toml::from_str::<ScenarioFile>(text)?.faults
    };
    for (i, r) in rules.iter().enumerate() {
        r.validate()
            .map_err(|e| anyhow::anyhow!("faults[{i}]: {e}"))?;
    }
    Ok(rules)
}

pub fn load_scenario(path: impl AsRef<Path>) -> anyhow::Result<Vec<FaultRule>> {
    use anyhow::Context;
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading scenario {}", path.display()))?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse_scenario(&text, json).with_context(|| format!("parsing scenario {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target<'a>(endpoint: Endpoint, tenant: &'a str, mailbox: Option<&'a str>) -> Target<'a> {
        Target {
            endpoint,
            tenant_name: Some(tenant),
            tenant_id: None,
            mailbox,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scope_time_and_count() {
        let mut set = FaultSet::new(1);
        let t0 = Instant::now();
        set.add(
            FaultRule::new(FaultKind::Hang)
                .tenant("a")
                .endpoint(Endpoint::Token)
                .window_ms(10_000, Some(22_000)),
            t0,
        );
        set.add(
            FaultRule::new(FaultKind::Reset).mailbox("x@a").max_count(1),
            t0,
        );
        let wall = Utc::now();
        let tok_a = target(Endpoint::Token, "a", None);
        assert!(set.fire(&tok_a, t0, wall).is_empty(), "not yet active");
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        assert_eq!(set.fire(&tok_a, now, wall), vec![FaultKind::Hang]);
        assert!(set
            .fire(&target(Endpoint::Token, "b", None), now, wall)
            .is_empty());
        assert!(set
            .fire(&target(Endpoint::Delta, "a", Some("y@a")), now, wall)
            .is_empty());
        assert_eq!(
            set.fire(&target(Endpoint::Delta, "a", Some("X@a")), now, wall),
            vec![FaultKind::Reset]
        );
        assert!(set
            .fire(&target(Endpoint::Events, "a", Some("x@a")), now, wall)
            .is_empty());
        tokio::time::advance(Duration::from_secs(22)).await;
        assert!(set.fire(&tok_a, Instant::now(), wall).is_empty(), "expired");
    }

    #[tokio::test]
    async fn a_held_request_waits_until_its_rule_is_removed() {
        let faults = std::sync::Arc::new(std::sync::Mutex::new(FaultSet::new(1)));
        let id = lock(&faults).add(
            FaultRule::new(FaultKind::Hold { rule: 0 }).max_count(1),
            Instant::now(),
        );
        let t = target(Endpoint::Graph, "a", Some("m"));
        let fired = lock(&faults).fire(&t, Instant::now(), Utc::now());
        assert_eq!(fired, vec![FaultKind::Hold { rule: id }]);
        let held = tokio::spawn({
            let faults = std::sync::Arc::clone(&faults);
            async move { hold(&faults, &fired).await }
        });
        while lock(&faults).holding(id) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!held.is_finished());
        assert_eq!(lock(&faults).list()[0]["holding"], 1);
        assert!(lock(&faults).remove(id));
        held.await.expect("released");
        assert_eq!(lock(&faults).holding(id), 0);
    }

    #[test]
    fn probability_is_seeded() {
        let run = || {
            let mut set = FaultSet::new(5);
            let now = Instant::now();
            set.add(FaultRule::new(FaultKind::Hang).probability(0.3), now);
            let t = target(Endpoint::Delta, "a", Some("m"));
            (0..1000)
                .map(|_| !set.fire(&t, now, Utc::now()).is_empty())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let hits = a.iter().filter(|h| **h).count();
        assert!((230..370).contains(&hits), "hits {hits}");
    }

    #[test]
    fn scenario_formats() {
        let toml = r#"
            [[faults]]
            tenant = "tenant1"
            endpoint = "token"
            after_ms = 10000
            for_ms = 22000
            kind = { type = "hang" }

            [[faults]]
            endpoint = "graph"
            kind = { type = "status", code = 429, retry_after = { http_date = 5 } }
        "#;
        let rules = parse_scenario(toml, false).expect("toml scenario");
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].for_ms, Some(22_000));
        assert!(matches!(
            rules[1].kind,
            FaultKind::Status {
                code: 429,
                retry_after: RetryAfter::HttpDate(5),
                ..
            }
        ));
        let writes = r#"[{"endpoint":"writes","kind":{"type":"commit_then_hang"}},
                         {"kind":{"type":"commit_then_reset"}}]"#;
        let rules = parse_scenario(writes, true).expect("write faults");
        assert_eq!(rules[0].endpoint, Endpoint::Writes);
        assert_eq!(rules[0].kind, FaultKind::CommitThenHang);
        assert_eq!(rules[1].kind, FaultKind::CommitThenReset);
        assert!(Endpoint::Graph.covers(Endpoint::Writes));
        assert!(Endpoint::Any.covers(Endpoint::Writes));
        assert!(!Endpoint::Events.covers(Endpoint::Writes));
        assert!(!Endpoint::Writes.covers(Endpoint::Delta));
        let json = r#"[{"kind":{"type":"latency","ms":5},"probability":2.0}]"#;
        assert!(parse_scenario(json, true).is_err(), "probability checked");
    }
}
