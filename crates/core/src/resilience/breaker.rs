//! Circuit breaker state machine, one per (tenant, dependency). Pure: the caller passes the
//! time, so tests drive it without sleeping.
//!
//! closed → open when, within the sliding window, at least `min_calls` calls ended and the
//! failure rate reached `failure_rate` (timeouts and slow calls count as failures); or when
//! the last `min_calls` calls all failed, however far apart (a dependency called rarely, like
//! the token endpoint, must trip too); or at once on a permanent failure (wrong secret, app
//! not in tenant), for `permanent_break`.
//! open → half-open when the break time has passed; the break time doubles with each trip in
//! a row (plus up to 25 % jitter, never less), capped at `max_break`.
//! half-open → closed after `probes` successful probe calls; → open again on any probe's
//! failure. The outcome of a call let out before the trip, or of a probe of an earlier
//! half-open period, arrives too late to say how the dependency is now and is ignored.

use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub window: Duration,
    pub min_calls: u32,
    pub failure_rate: f64,
    pub base_break: Duration,
    pub max_break: Duration,
    pub probes: u32,
    pub permanent_break: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BreakerConfigError {
    #[error("failure_rate must be in (0, 1], got {0}")]
    FailureRate(f64),
    #[error("min_calls and probes must be at least 1")]
    ZeroCount,
    #[error("base_break must be > 0 and not above max_break")]
    BreakBounds,
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), BreakerConfigError> {
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(BreakerConfigError::FailureRate(self.failure_rate));
        }
        if self.min_calls == 0 || self.probes == 0 {
            return Err(BreakerConfigError::ZeroCount);
        }
        if self.base_break.is_zero() || self.base_break > self.max_break {
            return Err(BreakerConfigError::BreakBounds);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    Success,
    /// Transient failure: 5xx, 429, timeout, reset, slow call.
    Failure,
    /// A failure no retry will fix (credentials): opens the breaker for `permanent_break`.
    Permanent,
}

/// Which call an outcome is of: one let out while the breaker was closed, or a probe of its
/// `n`th half-open period. Only the probes of the period under way close or reopen it: a call
/// that started before the trip and ends while half-open, or a probe of an earlier period, says
/// nothing about the dependency now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Closed,
    Probe(u64),
}

/// A refused call: the breaker is open until `until` (or half-open with all probes out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub until: Instant,
}

/// A state change, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// When open: until when. When half-open: unused.
    open_until: Instant,
    probes_in_flight: u32,
    probe_successes: u32,
    /// Half-open periods so far: the number of the one under way while half-open.
    half_open_periods: u64,
    /// Trips in a row without a full recovery; grows the break time.
    consecutive_trips: u32,
    permanent: bool,
    outcomes: OutcomeWindow,
    failures_in_a_row: u32,
    last_change: Instant,
}

impl Breaker {
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        Self {
            outcomes: OutcomeWindow::new(config.window, now),
            config,
            state: BreakerState::Closed,
            open_until: now,
            probes_in_flight: 0,
            probe_successes: 0,
            half_open_periods: 0,
            consecutive_trips: 0,
            permanent: false,
            failures_in_a_row: 0,
            last_change: now,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// True when the last trip was caused by a permanent failure.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    pub fn since(&self) -> Instant {
        self.last_change
    }

    /// When an open breaker lets the next probe through (`None` unless open).
    pub fn open_until(&self) -> Option<Instant> {
        (self.state == BreakerState::Open).then_some(self.open_until)
    }

    /// Whether a call could start now, without reserving it (for the dispatcher).
    pub fn would_allow(&self, now: Instant) -> Result<(), Rejected> {
        match self.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open if now >= self.open_until => Ok(()),
            BreakerState::Open => Err(Rejected {
                until: self.open_until,
            }),
            BreakerState::HalfOpen if self.probes_in_flight < self.config.probes => Ok(()),
            BreakerState::HalfOpen => Err(Rejected {
                until: now + self.config.base_break,
            }),
        }
    }

    /// Reserves a call. In half-open only `probes` calls may be out at once; which call it is
    /// is [`call`](Self::call) right after.
    pub fn acquire(&mut self, now: Instant) -> Result<Option<Transition>, Rejected> {
        self.would_allow(now)?;
        let transition = if self.state == BreakerState::Open {
            self.half_open_periods += 1;
            Some(self.change(BreakerState::HalfOpen, now))
        } else {
            None
        };
        if self.state == BreakerState::HalfOpen {
            self.probes_in_flight += 1;
        }
        Ok(transition)
    }

    /// What a call reserved now is: a probe of this half-open period, or an ordinary call.
    pub fn call(&self) -> Call {
        match self.state {
            BreakerState::HalfOpen => Call::Probe(self.half_open_periods),
            _ => Call::Closed,
        }
    }

    /// Records how a reserved call ended.
    pub fn record(&mut self, outcome: CallOutcome, now: Instant, call: Call) -> Option<Transition> {
        match self.state {
            BreakerState::HalfOpen => {
                if call != self.call() {
                    // Not one of this period's probes: its place was never taken.
                    return None;
                }
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                match outcome {
                    CallOutcome::Success => {
                        self.probe_successes += 1;
                        if self.probe_successes >= self.config.probes {
                            self.consecutive_trips = 0;
                            self.permanent = false;
                            self.outcomes.clear();
                            return Some(self.change(BreakerState::Closed, now));
                        }
                        None
                    }
                    CallOutcome::Failure => Some(self.trip(now, false)),
                    CallOutcome::Permanent => Some(self.trip(now, true)),
                }
            }
            BreakerState::Closed => {
                if outcome == CallOutcome::Permanent {
                    return Some(self.trip(now, true));
                }
                let ok = outcome == CallOutcome::Success;
                self.failures_in_a_row = if ok { 0 } else { self.failures_in_a_row + 1 };
                self.outcomes.push(ok, now);
                let (calls, failures) = (self.outcomes.calls, self.outcomes.failures);
                let rate_tripped = calls >= u64::from(self.config.min_calls)
                    && failures as f64 / calls as f64 >= self.config.failure_rate;
                if rate_tripped || self.failures_in_a_row >= self.config.min_calls {
                    return Some(self.trip(now, false));
                }
                None
            }
            // A call that started before the trip and ends while open changes nothing.
            BreakerState::Open => None,
        }
    }

    /// Records `calls` successes that ended in slice `slice` of the window (see
    /// [`Breaker::window_slicing`]), reported late: while closed, as [`record`](Self::record)
    /// would have; in any other state, nothing (they are calls let out while it was closed,
    /// not probes).
    pub fn record_successes_in_slice(&mut self, slice: u64, calls: u64) {
        if self.state == BreakerState::Closed && calls > 0 {
            self.failures_in_a_row = 0;
            self.outcomes.push_successes(slice, calls);
        }
    }

    /// The window's slices: their origin and length in nanoseconds. A time's slice is
    /// [`slice_of`]; both stay fixed for the breaker's life.
    pub fn window_slicing(&self) -> (Instant, u64) {
        (self.outcomes.origin, self.outcomes.slice_nanos)
    }

    /// A reserved call that ended without an outcome for this dependency: a probe of this
    /// period gives its place back.
    pub fn release(&mut self, call: Call) {
        if self.state == BreakerState::HalfOpen && call == self.call() {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    fn trip(&mut self, now: Instant, permanent: bool) -> Transition {
        self.consecutive_trips += 1;
        self.permanent = permanent;
        let base = if permanent {
            self.config.permanent_break
        } else {
            let doublings = (self.consecutive_trips - 1).min(20);
            self.config
                .base_break
                .saturating_mul(1u32 << doublings)
                .min(self.config.max_break)
        };
        // Jitter is only ever added: probes of many tenants spread out, none comes early.
        let jitter = base.mul_f64(rand::thread_rng().gen_range(0.0..0.25));
        self.open_until = now + base + jitter;
        self.probes_in_flight = 0;
        self.probe_successes = 0;
        self.outcomes.clear();
        self.failures_in_a_row = 0;
        self.change(BreakerState::Open, now)
    }

    fn change(&mut self, to: BreakerState, now: Instant) -> Transition {
        let from = self.state;
        self.state = to;
        self.last_change = now;
        Transition { from, to }
    }
}

/// The slice of a breaker's window that `now` falls in (see [`Breaker::window_slicing`]).
pub fn slice_of(origin: Instant, slice_nanos: u64, now: Instant) -> u64 {
    let elapsed = now.saturating_duration_since(origin).as_nanos();
    u64::try_from(elapsed).unwrap_or(u64::MAX) / slice_nanos
}

/// Slices of the sliding window: a call is forgotten at most `window / SLICES` early.
const SLICES: usize = 60;

/// How many calls ended within the window, and how many of them failed, kept as counts per
/// slice of `window / SLICES` rather than one entry per call: its size does not grow with the
/// call rate, so recording a call neither allocates nor scans earlier calls. A call is forgotten
/// between `window - window / SLICES` and `window` after it ended, never later.
#[derive(Debug)]
struct OutcomeWindow {
    slices: [Slice; SLICES],
    slice_nanos: u64,
    origin: Instant,
    /// The number of the newest slice, counted from `origin`.
    newest: u64,
    calls: u64,
    failures: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slice {
    calls: u64,
    failures: u64,
}

impl OutcomeWindow {
    fn new(window: Duration, now: Instant) -> Self {
        let slice = window / SLICES as u32;
        Self {
            slices: [Slice::default(); SLICES],
            slice_nanos: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX).max(1),
            origin: now,
            newest: 0,
            calls: 0,
            failures: 0,
        }
    }

    fn push(&mut self, ok: bool, now: Instant) {
        self.forget_before(slice_of(self.origin, self.slice_nanos, now));
        let slice = &mut self.slices[(self.newest % SLICES as u64) as usize];
        slice.calls += 1;
        self.calls += 1;
        if !ok {
            slice.failures += 1;
            self.failures += 1;
        }
    }

    fn push_successes(&mut self, slice: u64, calls: u64) {
        self.forget_before(slice);
        self.slices[(self.newest % SLICES as u64) as usize].calls += calls;
        self.calls += calls;
    }

    /// Drops the slices that left the window by slice `index`. A call reported with an
    /// earlier time than one already recorded counts in the newest slice.
    fn forget_before(&mut self, index: u64) {
        if index <= self.newest {
            return;
        }
        if index - self.newest >= SLICES as u64 {
            self.clear();
        } else {
            for i in self.newest + 1..=index {
                let slice = std::mem::take(&mut self.slices[(i % SLICES as u64) as usize]);
                self.calls -= slice.calls;
                self.failures -= slice.failures;
            }
        }
        self.newest = index;
    }

    fn clear(&mut self) {
        self.slices = [Slice::default(); SLICES];
        self.calls = 0;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(30),
            min_calls: 4,
            failure_rate: 0.5,
            base_break: Duration::from_secs(10),
            max_break: Duration::from_secs(60),
            probes: 2,
            permanent_break: Duration::from_secs(1800),
        }
    }

    #[test]
    fn validates_its_config() {
        assert!(config().validate().is_ok());
        let mut bad = config();
        bad.failure_rate = 0.0;
        assert_eq!(bad.validate(), Err(BreakerConfigError::FailureRate(0.0)));
        let mut bad = config();
        bad.base_break = Duration::from_secs(120);
        assert_eq!(bad.validate(), Err(BreakerConfigError::BreakBounds));
    }

    #[test]
    fn opens_only_after_min_calls_at_the_failure_rate() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(), t0);
        for _ in 0..3 {
            assert_eq!(
                b.record(CallOutcome::Failure, t0, Call::Closed),
                None,
                "below min_calls"
            );
        }
        let t = b
            .record(CallOutcome::Failure, t0, Call::Closed)
            .expect("trips at the 4th call");
        assert_eq!(
            t,
            Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            }
        );
        assert!(b.acquire(t0 + Duration::from_secs(9)).is_err());
    }

    #[test]
    fn successes_keep_it_closed_and_old_failures_expire() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(), t0);
        b.record(CallOutcome::Failure, t0, Call::Closed);
        b.record(CallOutcome::Success, t0, Call::Closed);
        b.record(CallOutcome::Success, t0, Call::Closed);
        assert_eq!(
            b.record(CallOutcome::Success, t0, Call::Closed),
            None,
            "1 of 4 failed: below 0.5"
        );
        assert_eq!(
            b.record(CallOutcome::Failure, t0, Call::Closed),
            None,
            "2 of 5 failed: below 0.5"
        );
        assert!(
            b.record(CallOutcome::Failure, t0, Call::Closed).is_some(),
            "3 of 6 failed: 0.5 trips"
        );
        let mut b = Breaker::new(config(), t0);
        b.record(CallOutcome::Failure, t0, Call::Closed);
        b.record(CallOutcome::Success, t0, Call::Closed);
        b.record(CallOutcome::Failure, t0, Call::Closed);
        // 40 s later those calls are outside the 30 s window: 1 of 2 recent calls failed.
        let later = t0 + Duration::from_secs(40);
        assert_eq!(b.record(CallOutcome::Success, later, Call::Closed), None);
        assert_eq!(b.record(CallOutcome::Failure, later, Call::Closed), None);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_call_leaves_the_window_by_its_end_and_at_most_a_slice_early() {
        let t0 = Instant::now();
        let window = config().window;
        let slice = window / SLICES as u32;
        let mut b = Breaker::new(config(), t0);
        b.record(CallOutcome::Failure, t0, Call::Closed);
        let still_in = t0 + window - slice - Duration::from_millis(1);
        b.record(CallOutcome::Success, still_in, Call::Closed);
        b.record(CallOutcome::Success, still_in, Call::Closed);
        assert!(
            b.record(CallOutcome::Failure, still_in, Call::Closed)
                .is_some(),
            "2 of 4 failed: the first failure still counts"
        );
        let mut b = Breaker::new(config(), t0);
        b.record(CallOutcome::Failure, t0, Call::Closed);
        let gone = t0 + window + Duration::from_millis(1);
        b.record(CallOutcome::Success, gone, Call::Closed);
        b.record(CallOutcome::Success, gone, Call::Closed);
        assert_eq!(
            b.record(CallOutcome::Failure, gone, Call::Closed),
            None,
            "1 of 3 failed: the first failure has left the window"
        );
    }

    #[test]
    fn failures_in_a_row_trip_even_when_far_apart() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(), t0);
        for minute in 0..3 {
            assert_eq!(
                b.record(
                    CallOutcome::Failure,
                    t0 + Duration::from_secs(60 * minute),
                    Call::Closed
                ),
                None
            );
        }
        assert!(
            b.record(
                CallOutcome::Failure,
                t0 + Duration::from_secs(180),
                Call::Closed
            )
            .is_some(),
            "4 in a row"
        );
    }

    #[test]
    fn half_open_lets_limited_probes_through_then_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(), t0);
        for _ in 0..4 {
            b.record(CallOutcome::Failure, t0, Call::Closed);
        }
        let until = b.open_until().expect("open");
        assert!(
            until >= t0 + Duration::from_secs(10),
            "never earlier than the break time"
        );
        assert!(
            until <= t0 + Duration::from_millis(12_500),
            "jitter at most 25 %"
        );
        let t1 = until;
        assert_eq!(
            b.acquire(t1),
            Ok(Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            }))
        );
        assert_eq!(b.acquire(t1), Ok(None));
        assert!(b.acquire(t1).is_err(), "only 2 probes at once");
        let probe = b.call();
        assert_eq!(probe, Call::Probe(1));
        assert_eq!(b.record(CallOutcome::Success, t1, probe), None);
        assert_eq!(
            b.record(CallOutcome::Success, t1, probe),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
    }

    #[test]
    fn break_time_grows_with_repeated_trips_and_is_capped() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(), t0);
        for _ in 0..4 {
            b.record(CallOutcome::Failure, t0, Call::Closed);
        }
        let mut now = t0;
        let mut breaks = Vec::new();
        for _ in 0..5 {
            let until = b.open_until().expect("open");
            breaks.push(until - now);
            now = until;
            b.acquire(now).expect("probe allowed");
            b.record(CallOutcome::Failure, now, b.call());
        }
        let secs: Vec<u64> = breaks.iter().map(|d| d.as_secs()).collect();
        for (got, base) in secs.iter().zip([10u64, 20, 40, 60, 60]) {
            assert!(*got >= base && *got <= base + base / 4, "{secs:?}");
        }
    }

    #[test]
    fn permanent_failure_opens_at_once_for_long() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config(), t0);
        assert!(b.record(CallOutcome::Permanent, t0, Call::Closed).is_some());
        assert!(b.is_permanent());
        assert!(b.open_until().expect("open") >= t0 + Duration::from_secs(1800));
    }
}
