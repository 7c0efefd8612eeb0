//! What unauthenticated traffic may cost in logs: failed authentication, forged notifications,
//! refused connections and rate-limited requests are counted in metrics every time, but logged
//! at most once per interval per source and kind, with the number of events the line stands for.
//! A flood of wrong tokens writes one line a minute, not one line per request.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use tokio::time::Instant;

/// Default spacing of log lines per source and kind.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Sources remembered at once; past this, new sources are counted in metrics but not logged
/// until old entries expire (an attacker with many addresses cannot grow the map without bound).
const MAX_TRACKED: usize = 10_000;

/// Where a request comes from, as limits and logs see it: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64, so counting its addresses apart would let it walk round
/// every per-source limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The request's source, when the server recorded the peer (`None` under a server that does
/// not, e.g. a test calling the router directly).
pub struct Peer(pub Option<Source>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| Source::of(addr.ip())),
        ))
    }
}

struct Entry {
    logged_at: Instant,
    /// Events since the last line.
    unlogged: u64,
}

/// Decides which events of a kind and source get a log line.
pub struct LogThrottle {
    interval: Duration,
    entries: Mutex<HashMap<(&'static str, Option<Source>), Entry>>,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Notes one event. `Some(n)`: write a line now, standing for `n` events (this one and
    /// those not logged since the previous line of this kind and source); `None`: stay quiet.
    pub fn note(&self, kind: &'static str, source: Option<Source>, now: Instant) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(&(kind, source)) {
            entry.unlogged += 1;
            if now.duration_since(entry.logged_at) < self.interval {
                return None;
            }
            let count = entry.unlogged;
            *entry = Entry {
                logged_at: now,
                unlogged: 0,
            };
            return Some(count);
        }
        if entries.len() >= MAX_TRACKED {
            let interval = self.interval;
            entries.retain(|_, e| now.duration_since(e.logged_at) < interval);
            if entries.len() >= MAX_TRACKED {
                return None;
            }
        }
        entries.insert(
            (kind, source),
            Entry {
                logged_at: now,
                unlogged: 0,
            },
        );
        Some(1)
    }
}

/// Writes `$msg` at WARN with the source and count, at most once per interval per source:
/// `throttled_warn!(throttle, "kind", source, "message"; field = value, other = %display)`.
#[macro_export]
macro_rules! throttled_warn {
    ($throttle:expr, $kind:expr, $source:expr, $msg:literal $(; $($fields:tt)*)?) => {{
        let source: Option<$crate::http::abuse::Source> = $source;
        if let Some(count) = $throttle.note($kind, source, tokio::time::Instant::now()) {
            let shown = source.map_or_else(|| "unknown".to_string(), |s| s.to_string());
            tracing::warn!(
                source = %shown,
                count,
                per_seconds = $throttle.interval_secs(),
                $($($fields)*,)?
                $msg
            );
        }
    }};
}

impl LogThrottle {
    pub fn interval_secs(&self) -> u64 {
        self.interval.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        assert_eq!(Source::of(a), Source::of(b));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(Source::of(mapped).to_string(), "192.0.2.7");
    }

    #[test]
    fn one_line_per_interval_per_source_with_the_count() {
        let throttle = LogThrottle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = Some(Source::of("192.0.2.1".parse().expect("ip")));
        let b = Some(Source::of("192.0.2.2".parse().expect("ip")));
        assert_eq!(throttle.note("auth", a, t0), Some(1));
        let quiet = (1..1000)
            .filter_map(|i| throttle.note("auth", a, t0 + Duration::from_millis(i * 50)))
            .count();
        assert_eq!(quiet, 0, "nothing more within the interval");
        assert_eq!(throttle.note("auth", b, t0), Some(1), "another source");
        assert_eq!(throttle.note("forged", a, t0), Some(1), "another kind");
        assert_eq!(
            throttle.note("auth", a, t0 + Duration::from_secs(60)),
            Some(1000),
            "the next line carries every event since the last one"
        );
        assert_eq!(throttle.note("auth", a, t0 + Duration::from_secs(61)), None);
    }
}
