//! A breaker shared by the calls of one (tenant, dependency), logging every state change.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use tokio::time::Instant;

use super::breaker::{
    slice_of, Breaker, BreakerConfig, BreakerState, Call, CallOutcome, Rejected, Transition,
};

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
    /// Successes of the closed breaker not yet in its window: a success cannot change a closed
    /// breaker's state, so it is counted here without the lock and moved into the window the
    /// next time the lock is taken (before any failure is weighed).
    late: LateSuccesses,
    /// The window's slicing (see [`Breaker::window_slicing`]): which slice a late success
    /// belongs to.
    slicing: (Instant, u64),
}

/// Bits of [`LateSuccesses`] that count; the rest hold the slice (plus one: zero is empty).
const COUNT_BITS: u32 = 24;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

/// Successes that ended in one slice of a breaker's window, in one atomic word: the slice
/// number plus one in the high bits, their count in the low [`COUNT_BITS`].
#[derive(Default)]
struct LateSuccesses(AtomicU64);

impl LateSuccesses {
    /// Counts a success of `slice`; false when it must be recorded under the lock instead
    /// (successes of another slice are waiting, or the count is full).
    fn add(&self, slice: u64) -> bool {
        let Some(tag) = slice.checked_add(1).filter(|t| *t < 1 << (64 - COUNT_BITS)) else {
            return false;
        };
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let next = if current == 0 {
                tag << COUNT_BITS | 1
            } else if current >> COUNT_BITS == tag && current & COUNT_MAX < COUNT_MAX {
                current + 1
            } else {
                return false;
            };
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// The waiting successes' slice and count, leaving none.
    fn take(&self) -> Option<(u64, u64)> {
        if self.0.load(Ordering::Acquire) == 0 {
            return None;
        }
        let taken = self.0.swap(0, Ordering::AcqRel);
        (taken != 0).then(|| ((taken >> COUNT_BITS) - 1, taken & COUNT_MAX))
    }
}

impl GuardedBreaker {
    pub fn new(tenant: &str, dependency: Dependency, config: BreakerConfig) -> Self {
        let breaker = Breaker::new(config, Instant::now());
        Self {
            tenant: tenant.to_string(),
            dependency,
            slicing: breaker.window_slicing(),
            inner: Mutex::new((breaker, 0)),
            closed: AtomicBool::new(true),
            late: LateSuccesses::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Breaker, &mut u64) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update; the breaker's state is still
        // a valid state machine, so keep using it.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (breaker, trips) = &mut *guard;
        if let Some((slice, calls)) = self.late.take() {
            breaker.record_successes_in_slice(slice, calls);
        }
        let result = f(breaker, trips);
        self.closed
            .store(breaker.state() == BreakerState::Closed, Ordering::Release);
        result
    }

    /// Reserves a call, or says until when the breaker refuses. The call's outcome goes to
    /// the returned [`Reservation`]; dropped without one (its future was cancelled, e.g. at the
    /// job deadline), it gives its probe back.
    pub fn reserve(&self) -> Result<Reservation<'_>, Rejected> {
        let call = self.admit()?;
        Ok(Reservation {
            breaker: self,
            call,
            settled: false,
        })
    }

    /// Reserves a call: an ordinary one, or a half-open breaker's probe.
    fn admit(&self) -> Result<Call, Rejected> {
        // A closed breaker lets every call out whenever it comes, without the lock or the
        // clock (the dearest step of a call on some machines).
        if self.closed.load(Ordering::Acquire) {
            return Ok(Call::Closed);
        }
        let (transition, call) = self.with(|b, _| {
            if b.state() == BreakerState::Closed {
                return Ok((None, Call::Closed));
            }
            let t = b.acquire(Instant::now())?;
            Ok((t, b.call()))
        })?;
        if let Some(t) = transition {
            self.log(t, None);
        }
        Ok(call)
    }

    pub fn would_allow(&self) -> Result<(), Rejected> {
        self.with(|b, _| b.would_allow(Instant::now()))
    }

    /// Records an outcome at `now` that no reservation carries (a failure counted for
    /// several): evidence while closed, nothing while half-open.
    pub fn record_at(&self, outcome: CallOutcome, now: Instant) {
        self.record_call(outcome, now, Call::Closed);
    }

    /// Records how `call` ended, at `now` (the caller's reading of the clock when it ended).
    fn record_call(&self, outcome: CallOutcome, now: Instant, call: Call) {
        if outcome == CallOutcome::Success
            && self.closed.load(Ordering::Acquire)
            && self.late.add(slice_of(self.slicing.0, self.slicing.1, now))
        {
            return;
        }
        let (transition, until) = self.with(|b, trips| {
            let t = b.record(outcome, now, call);
            if t.is_some_and(|t| t.to == BreakerState::Open) {
                *trips += 1;
            }
            (t, b.open_until())
        });
        if let Some(t) = transition {
            self.log(t, until.map(|u| u.saturating_duration_since(now)));
        }
    }

    /// A reserved call that never reached the dependency (e.g. no token): frees its place if
    /// it is a probe.
    fn release(&self, call: Call) {
        if let Call::Probe(_) = call {
            self.with(|b, _| b.release(call));
        }
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
    call: Call,
    settled: bool,
}

impl Reservation<'_> {
    pub fn record(self, outcome: CallOutcome) {
        self.record_at(outcome, Instant::now());
    }

    /// Records how the call ended, at `now`.
    pub fn record_at(mut self, outcome: CallOutcome, now: Instant) {
        self.settled = true;
        self.breaker.record_call(outcome, now, self.call);
    }

    /// The call never reached the dependency (e.g. no token): frees a probe.
    pub fn release(mut self) {
        self.settled = true;
        self.breaker.release(self.call);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.release(self.call);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(min_calls: u32, failure_rate: f64) -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(60),
            min_calls,
            failure_rate,
            base_break: Duration::from_secs(1),
            max_break: Duration::from_secs(1),
            probes: 1,
            permanent_break: Duration::from_secs(60),
        }
    }

    /// A success recorded without the lock still resets the failures in a row: without it,
    /// three failures with a success between them would trip a breaker of `min_calls` 3.
    #[tokio::test(start_paused = true)]
    async fn a_success_without_the_lock_breaks_a_run_of_failures() {
        let b = GuardedBreaker::new("t", Dependency::Graph, config(3, 1.0));
        let now = Instant::now();
        b.record_at(CallOutcome::Failure, now);
        b.record_at(CallOutcome::Failure, now);
        b.record_at(CallOutcome::Success, now);
        assert_ne!(
            b.late.0.load(Ordering::Relaxed),
            0,
            "the success waits in the atomic"
        );
        b.record_at(CallOutcome::Failure, now);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "3 failures in 4 calls, 1 in a row"
        );
        b.record_at(CallOutcome::Failure, now);
        b.record_at(CallOutcome::Failure, now);
        assert_eq!(b.state(), BreakerState::Open, "3 in a row");
    }

    /// Successes waiting in the atomic count in the failure rate, in the slice they ended in:
    /// within the window they keep a breaker closed, and they leave the window with it.
    #[tokio::test(start_paused = true)]
    async fn successes_without_the_lock_count_in_their_slice_of_the_window() {
        // Four successes at the start, then a success and two failures `after` it.
        let state_after = |after: Duration| {
            let b = GuardedBreaker::new("t", Dependency::Graph, config(3, 0.6));
            let t0 = Instant::now();
            for _ in 0..4 {
                b.record_at(CallOutcome::Success, t0);
            }
            for outcome in [
                CallOutcome::Success,
                CallOutcome::Failure,
                CallOutcome::Failure,
            ] {
                b.record_at(outcome, t0 + after);
            }
            b.state()
        };
        assert_eq!(
            state_after(Duration::from_secs(30)),
            BreakerState::Closed,
            "2 failures in 7 calls"
        );
        assert_eq!(
            state_after(Duration::from_secs(61)),
            BreakerState::Open,
            "the 4 successes left the window: 2 failures in 3 calls"
        );
    }

    /// A success of a call let out while the breaker was closed, counted only after it tripped,
    /// is neither a probe nor evidence for the new window.
    #[tokio::test(start_paused = true)]
    async fn late_successes_of_a_tripped_breaker_change_nothing() {
        let b = GuardedBreaker::new("t", Dependency::Graph, config(1, 1.0));
        // A success reaches the atomic just as another call's failure trips the breaker.
        assert!(b.late.add(0));
        b.record_at(CallOutcome::Failure, Instant::now());
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(2)).await;
        let probe = b.reserve().expect("half-open lets one probe out");
        // Another reaches it while the probe is out: it was let out closed, it is no probe.
        assert!(b.late.add(0));
        assert_eq!(b.state(), BreakerState::HalfOpen, "no probe has reported");
        assert!(b.reserve().is_err(), "the probe's place is still taken");
        probe.record(CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

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

    /// Calls let out while the breaker was closed that end while it is half-open are not
    /// probes: their failures neither reopen it nor free the probe's place, and a release of
    /// one gives back nothing. Only the probe decides.
    #[tokio::test(start_paused = true)]
    async fn calls_from_before_the_trip_do_not_decide_a_half_open_breaker() {
        let b = GuardedBreaker::new("t", Dependency::Graph, config(1, 1.0));
        let slow = b.reserve().expect("closed");
        let cancelled = b.reserve().expect("closed");
        b.reserve().expect("closed").record(CallOutcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(2)).await;
        let probe = b.reserve().expect("half-open lets one probe out");
        slow.record(CallOutcome::Failure);
        drop(cancelled);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "still waiting for the probe"
        );
        assert!(b.reserve().is_err(), "the probe's place is still taken");
        probe.record(CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().trips, 1, "one trip, not two");
    }

    /// A probe of an earlier half-open period (the breaker reopened and half-opened again
    /// while it hung) is not a probe of the new one.
    #[tokio::test(start_paused = true)]
    async fn a_probe_of_an_earlier_period_does_not_decide_the_next() {
        let config = BreakerConfig {
            probes: 2,
            ..config(1, 1.0)
        };
        let b = GuardedBreaker::new("t", Dependency::Graph, config);
        b.reserve().expect("closed").record(CallOutcome::Failure);
        tokio::time::advance(Duration::from_secs(2)).await;
        let hung = b.reserve().expect("first period's probe");
        b.reserve()
            .expect("its second probe")
            .record(CallOutcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(3)).await;
        let first = b.reserve().expect("second period's probe");
        hung.record(CallOutcome::Success);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "the old probe does not count"
        );
        let second = b.reserve().expect("the second place is still free");
        assert!(b.reserve().is_err(), "two probes out");
        first.record(CallOutcome::Success);
        second.record(CallOutcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
