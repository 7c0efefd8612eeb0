//! A breaker shared by the calls of one (tenant, dependency), logging every state change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use tokio::time::Instant;

use super::breaker::{Breaker, BreakerConfig, BreakerState, CallOutcome, Rejected, Transition};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dependency {
    Token,
    Graph,
}

impl Dependency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Graph => "graph",
        }
    }
}

/// A breaker's state for health output and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct BreakerSnapshot {
    pub dependency: Dependency,
    pub state: BreakerState,
    pub permanent: bool,
    pub since_seconds: u64,
    /// Seconds until the next probe may start, while open.
    pub probe_in_seconds: Option<u64>,
    pub trips: u64,
}

pub struct GuardedBreaker {
    tenant: String,
    dependency: Dependency,
    inner: Mutex<(Breaker, u64)>,
    /// The breaker is closed: a copy of its state kept under the lock, so that letting a call
    /// out of a closed breaker (every call, on a good day) takes no lock. A call let out just
    /// as another call's failure trips the breaker is a call that started before the trip.
    closed: AtomicBool,
}

impl GuardedBreaker {
    pub fn new(tenant: &str, dependency: Dependency, config: BreakerConfig) -> Self {
        Self {
            tenant: tenant.to_string(),
            dependency,
            inner: Mutex::new((Breaker::new(config, Instant::now()), 0)),
            closed: AtomicBool::new(true),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Breaker, &mut u64) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update; the breaker's state is still
        // a valid state machine, so keep using it.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (breaker, trips) = &mut *guard;
        let result = f(breaker, trips);
        self.closed
            .store(breaker.state() == BreakerState::Closed, Ordering::Release);
        result
    }

    /// Reserves a call, or says until when the breaker refuses. The call's outcome goes to
    /// the returned [`Reservation`]; dropped without one (its future was cancelled, e.g. at the
    /// job deadline), it gives its probe back.
    pub fn reserve(&self) -> Result<Reservation<'_>, Rejected> {
        let probe = self.admit()?;
        Ok(Reservation {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// Reserves a call, or says until when the breaker refuses.
    pub fn acquire(&self) -> Result<(), Rejected> {
        self.admit().map(|_| ())
    }

    /// Reserves a call; true when it is a half-open breaker's probe.
    fn admit(&self) -> Result<bool, Rejected> {
        // A closed breaker lets every call out whenever it comes, without the lock or the
        // clock (the dearest step of a call on some machines).
        if self.closed.load(Ordering::Acquire) {
            return Ok(false);
        }
        let (transition, probe) = self.with(|b, _| {
            if b.state() == BreakerState::Closed {
                return Ok((None, false));
            }
            let t = b.acquire(Instant::now())?;
            Ok((t, b.state() == BreakerState::HalfOpen))
        })?;
        if let Some(t) = transition {
            self.log(t, None);
        }
        Ok(probe)
    }

    pub fn would_allow(&self) -> Result<(), Rejected> {
        self.with(|b, _| b.would_allow(Instant::now()))
    }

    pub fn record(&self, outcome: CallOutcome) {
        let now = Instant::now();
        let (transition, until) = self.with(|b, trips| {
            let t = b.record(outcome, now);
            if t.is_some_and(|t| t.to == BreakerState::Open) {
                *trips += 1;
            }
            (t, b.open_until())
        });
        if let Some(t) = transition {
            self.log(t, until.map(|u| u.saturating_duration_since(now)));
        }
    }

    /// A reserved call that never reached the dependency (e.g. no token): frees a probe.
    pub fn release(&self) {
        self.with(|b, _| b.release());
    }

    pub fn state(&self) -> BreakerState {
        self.with(|b, _| b.state())
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        self.with(|b, trips| BreakerSnapshot {
            dependency: self.dependency,
            state: b.state(),
            permanent: b.is_permanent() && b.state() != BreakerState::Closed,
            since_seconds: now.saturating_duration_since(b.since()).as_secs(),
            probe_in_seconds: b
                .open_until()
                .map(|u| u.saturating_duration_since(now).as_secs()),
            trips: *trips,
        })
    }

    fn log(&self, t: Transition, open_for: Option<std::time::Duration>) {
        crate::metrics::breaker_transition(&self.tenant, self.dependency.as_str(), t.to.as_str());
        let permanent = self.with(|b, _| b.is_permanent());
        match t.to {
            BreakerState::Open => tracing::warn!(
                tenant = %self.tenant,
                dependency = self.dependency.as_str(),
                from = t.from.as_str(),
                to = t.to.as_str(),
                permanent,
                open_for_secs = open_for.map(|d| d.as_secs_f64()),
                "circuit breaker opened"
            ),
            _ => tracing::info!(
                tenant = %self.tenant,
                dependency = self.dependency.as_str(),
                from = t.from.as_str(),
                to = t.to.as_str(),
                "circuit breaker changed state"
            ),
        }
    }
}

/// A call reserved on a breaker, settled by [`record`](Self::record) or
/// [`release`](Self::release). A half-open breaker lets only `probes` calls out and waits for
/// them to report: a probe whose future is dropped (a job cut off at its deadline while the
/// probe hung) would otherwise hold its place forever, and the breaker would refuse every
/// later call of the tenant.
pub struct Reservation<'a> {
    breaker: &'a GuardedBreaker,
    probe: bool,
    settled: bool,
}

impl Reservation<'_> {
    pub fn record(mut self, outcome: CallOutcome) {
        self.settled = true;
        self.breaker.record(outcome);
    }

    /// The call never reached the dependency (e.g. no token): frees a probe.
    pub fn release(mut self) {
        self.settled = true;
        self.breaker.release();
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_gives_its_place_back() {
        let config = BreakerConfig {
            window: Duration::from_secs(60),
            min_calls: 1,
            failure_rate: 1.0,
            base_break: Duration::from_secs(1),
            max_break: Duration::from_secs(1),
            probes: 1,
            permanent_break: Duration::from_secs(60),
        };
        let b = GuardedBreaker::new("t", Dependency::Graph, config);
        b.reserve().expect("closed").record(CallOutcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(2)).await;
        let probe = b.reserve().expect("half-open lets one probe out");
        assert!(b.reserve().is_err(), "only one");
        drop(probe);
        let probe = b
            .reserve()
            .expect("the cancelled probe's place is free again");
        probe.record(CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
