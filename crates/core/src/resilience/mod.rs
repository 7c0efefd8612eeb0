//! Resilience: small, pure pieces with no knowledge of Graph (`Retry-After` parsing, the
//! backoff schedule, the breaker state machine, the retry budget) and the per-tenant guard
//! that puts them together for the sync jobs.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod guard;
pub mod limits;
pub mod retry;
pub mod retry_after;
pub mod spread;
pub mod success_path;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use breaker::{CallOutcome, Rejected};
use budget::RetryBudget;
use guard::{Dependency, GuardedBreaker, Reservation};
use limits::{MailboxRate, NotBeforeDeadline, PendingPermits, Permits, RateLimits};

#[derive(Clone, Debug)]
pub struct ResilienceSettings {
    pub retries_per_request: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub retry_budget_ratio: f64,
    pub retry_budget_min_per_second: u32,
    pub slow_call: Duration,
    pub breaker: breaker::BreakerConfig,
    /// Failures of a tenant's Graph calls count against its breaker only once they come from
    /// this many mailboxes within the breaker's window (or the connection itself failed): one
    /// mailbox Graph cannot serve holds back that mailbox only.
    pub breaker_min_mailboxes: u32,
    pub mailbox_requests_per_10min: u32,
    pub tenant_requests_per_second: u32,
    pub app_requests_per_second: u32,
}

/// What one tenant's jobs share: the Graph breaker, the tenant's request rate, its retry
/// budget and the count of its running jobs (for the per-tenant cap).
pub struct TenantGuard {
    pub graph: GuardedBreaker,
    /// This replica's share of the tenant's request rate.
    pub rate: limits::SharedRate,
    budget: Mutex<RetryBudget>,
    /// The budget was full when last changed (a copy kept under its lock): a deposit into a
    /// full budget changes nothing, so it takes no lock. Time only fills it further.
    budget_full: AtomicBool,
    running: AtomicUsize,
    spread: Mutex<spread::FailureSpread>,
}

/// What a finished Graph call says about Graph's health for the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// Graph answered as designed (a page, a 429, a 404...).
    Healthy,
    /// Says nothing about Graph (no call made, a payload problem).
    Neutral,
    /// This mailbox's call failed (5xx, timeout, slow): evidence against Graph only when other
    /// mailboxes fail too.
    MailboxFailure,
    /// The connection itself failed (refused, reset): Graph or the path to it is down.
    GraphFailure,
}

/// A Graph call's admission, decided now or after a wait for a rate limit.
pub enum Admission<'a> {
    Decided(Result<GraphCall<'a>, Refused>),
    Wait(PendingPermits),
}

/// A Graph call let out: its place on the breaker, and when its permits were taken (the
/// clock read of its admission, for the caller's timing of it).
pub struct GraphCall<'a> {
    pub reservation: Reservation<'a>,
    pub admitted_at: Instant,
}

/// Why a Graph call was not let out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A rate limit has no permit before the deadline.
    RateLimit(NotBeforeDeadline),
    /// The tenant's Graph breaker is open, or its probes are all out.
    Breaker(Rejected),
}

impl TenantGuard {
    pub fn new(tenant: &str, settings: &ResilienceSettings, limits: &RateLimits) -> Self {
        let budget = RetryBudget::new(
            settings.retry_budget_ratio,
            settings.retry_budget_min_per_second,
            Instant::now(),
        );
        Self {
            graph: GuardedBreaker::new(tenant, Dependency::Graph, settings.breaker.clone()),
            rate: limits.tenant_limiter(),
            budget_full: AtomicBool::new(budget.is_full()),
            budget: Mutex::new(budget),
            running: AtomicUsize::new(0),
            spread: Mutex::new(spread::FailureSpread::new(
                settings.breaker.window,
                settings.breaker_min_mailboxes as usize,
            )),
        }
    }

    /// Lets one Graph call of `mailbox` out: a permit from each rate limit (the mailbox's, the
    /// tenant's, the app's), then a place on the tenant's Graph breaker, decided now when no
    /// limiter makes the call wait (every call, below the limits). Otherwise
    /// [`Admission::Wait`], for [`admit_after`](Self::admit_after), which waits but never past
    /// `deadline`: a caller that awaits only then builds and moves no future on the success
    /// path. The [`GraphCall`] carries the time it was admitted. It allocates nothing.
    pub fn admit_now(
        &self,
        limits: &RateLimits,
        mailbox: &MailboxRate,
        deadline: Instant,
    ) -> Admission<'_> {
        match limits.try_acquire(mailbox, &self.rate, deadline) {
            Permits::Taken(now) => Admission::Decided(self.reserve(now)),
            Permits::NotBeforeDeadline(refused) => {
                Admission::Decided(Err(Refused::RateLimit(refused)))
            }
            Permits::Wait(pending) => Admission::Wait(pending),
        }
    }

    /// The rest of an [`Admission::Wait`]: waits for the permits, then the breaker.
    pub async fn admit_after(
        &self,
        limits: &RateLimits,
        pending: PendingPermits,
        mailbox: &MailboxRate,
        deadline: Instant,
    ) -> Result<GraphCall<'_>, Refused> {
        let now = limits
            .acquire_after(pending, mailbox, &self.rate, deadline)
            .await
            .map_err(Refused::RateLimit)?;
        self.reserve(now)
    }

    fn reserve(&self, admitted_at: Instant) -> Result<GraphCall<'_>, Refused> {
        let reservation = self.graph.reserve().map_err(Refused::Breaker)?;
        Ok(GraphCall {
            reservation,
            admitted_at,
        })
    }

    /// Settles a call Graph answered as asked: its evidence on the breaker, and the retries a
    /// success earns in the budget.
    /// `ended_at` is the caller's reading of the clock when the answer came.
    pub fn answered(
        &self,
        reservation: Reservation<'_>,
        mailbox: i64,
        evidence: Evidence,
        ended_at: Instant,
    ) {
        self.settle(reservation, mailbox, evidence, ended_at);
        self.deposit();
    }

    /// Settles a Graph call of `mailbox` on the tenant's breaker by what it says about Graph:
    /// a mailbox's own failure counts only once failures are spread over enough mailboxes
    /// (then with the window's earlier ones); no evidence releases the reservation.
    pub fn settle(
        &self,
        reservation: Reservation<'_>,
        mailbox: i64,
        evidence: Evidence,
        ended_at: Instant,
    ) {
        match evidence {
            Evidence::Healthy => reservation.record_at(CallOutcome::Success, ended_at),
            Evidence::Neutral => reservation.release(),
            Evidence::GraphFailure => reservation.record_at(CallOutcome::Failure, ended_at),
            Evidence::MailboxFailure => {
                let counted = self
                    .spread
                    .lock()
                    .map(|mut s| s.note(mailbox, ended_at))
                    .unwrap_or(1);
                if counted == 0 {
                    reservation.release();
                    return;
                }
                reservation.record_at(CallOutcome::Failure, ended_at);
                for _ in 1..counted {
                    self.graph.record_at(CallOutcome::Failure, ended_at);
                }
            }
        }
    }

    /// Takes one retry from the tenant's budget.
    pub fn try_retry(&self) -> bool {
        self.budget
            .lock()
            .map(|mut b| {
                let granted = b.withdraw(Instant::now());
                self.budget_full.store(b.is_full(), Ordering::Release);
                granted
            })
            .unwrap_or(false)
    }

    pub fn deposit(&self) {
        // A full budget (the usual case) earns nothing: no lock, no clock.
        if self.budget_full.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut b) = self.budget.lock() {
            b.deposit(Instant::now());
            self.budget_full.store(b.is_full(), Ordering::Release);
        }
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Counts a job as running until the returned guard is dropped.
    pub fn start_job(self: &std::sync::Arc<Self>) -> RunningJobCount {
        self.running.fetch_add(1, Ordering::SeqCst);
        RunningJobCount(std::sync::Arc::clone(self))
    }
}

pub struct RunningJobCount(std::sync::Arc<TenantGuard>);

impl Drop for RunningJobCount {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `Retry-After` plus a little jitter, never less: obeyed exactly, and clients told the same
/// wait do not all return at the same instant.
pub fn after_retry_after(retry_after: Duration) -> Duration {
    let spread = (retry_after / 10).min(Duration::from_secs(1));
    let extra = if spread.is_zero() {
        Duration::ZERO
    } else {
        spread.mul_f64(rand::thread_rng().gen_range(0.0..1.0))
    };
    retry_after + extra
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ResilienceSettings {
        crate::config::Settings::from_toml_str("")
            .expect("the embedded defaults load")
            .resilience
    }

    /// A Graph call on the success path (admitted, answered) allocates nothing: counted, not
    /// timed, on this thread only, so other tests running at once do not disturb the count.
    #[test]
    fn a_successful_call_allocates_nothing() {
        // Limits beyond what the configuration accepts: each share is paced to one request
        // per period (burst 1), and 10,000 calls in a loop must never wait for one.
        let path =
            success_path::SuccessPath::new(&success_path::SuccessPath::unlimited(defaults()));
        assert!(path.call(), "admitted at once");
        let mut admitted = 0;
        let counted = allocation_counter::measure(|| {
            admitted = (0..10_000).filter(|_| path.call()).count();
        });
        assert_eq!(
            admitted, 10_000,
            "no call waits: the limits are far above 10,000 calls"
        );
        assert_eq!(counted.count_total, 0, "{counted:?}");
        assert_eq!(path.guard().graph.state(), breaker::BreakerState::Closed);
    }

    /// A deposit into a full budget takes no lock; once a retry is taken, successes earn
    /// retries back again.
    #[tokio::test(start_paused = true)]
    async fn successes_refill_a_budget_that_was_full() {
        let settings = ResilienceSettings {
            retry_budget_ratio: 0.5,
            retry_budget_min_per_second: 0,
            ..defaults()
        };
        let limits = RateLimits::new(&settings);
        let guard = TenantGuard::new("tenant", &settings, &limits);
        guard.deposit();
        let banked = std::iter::from_fn(|| guard.try_retry().then_some(())).count();
        assert_eq!(banked, 10, "ten retries banked, none earned while full");
        guard.deposit();
        assert!(!guard.try_retry(), "half a retry per success");
        guard.deposit();
        guard.deposit();
        assert!(guard.try_retry());
    }

    #[test]
    fn retry_after_is_never_shortened() {
        for secs in [0u64, 1, 5, 315] {
            for _ in 0..100 {
                let wait = after_retry_after(Duration::from_secs(secs));
                assert!(wait >= Duration::from_secs(secs));
                assert!(wait <= Duration::from_secs(secs) + Duration::from_secs(1));
            }
        }
    }
}
