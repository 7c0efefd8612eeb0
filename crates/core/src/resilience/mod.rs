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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use breaker::CallOutcome;
use budget::RetryBudget;
use guard::{Dependency, GuardedBreaker};

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

impl TenantGuard {
    pub fn new(tenant: &str, settings: &ResilienceSettings, limits: &limits::RateLimits) -> Self {
        Self {
            graph: GuardedBreaker::new(tenant, Dependency::Graph, settings.breaker.clone()),
            rate: limits.tenant_limiter(),
            budget: Mutex::new(RetryBudget::new(
                settings.retry_budget_ratio,
                settings.retry_budget_min_per_second,
                Instant::now(),
            )),
            running: AtomicUsize::new(0),
            spread: Mutex::new(spread::FailureSpread::new(
                settings.breaker.window,
                settings.breaker_min_mailboxes as usize,
            )),
        }
    }

    /// Settles a Graph call of `mailbox` on the tenant's breaker by what it says about Graph:
    /// a mailbox's own failure counts only once failures are spread over enough mailboxes
    /// (then with the window's earlier ones); no evidence releases the reservation.
    pub fn settle(&self, reservation: guard::Reservation<'_>, mailbox: i64, evidence: Evidence) {
        match evidence {
            Evidence::Healthy => reservation.record(CallOutcome::Success),
            Evidence::Neutral => reservation.release(),
            Evidence::GraphFailure => reservation.record(CallOutcome::Failure),
            Evidence::MailboxFailure => {
                let counted = self
                    .spread
                    .lock()
                    .map(|mut s| s.note(mailbox, Instant::now()))
                    .unwrap_or(1);
                if counted == 0 {
                    reservation.release();
                    return;
                }
                reservation.record(CallOutcome::Failure);
                for _ in 1..counted {
                    self.graph.record(CallOutcome::Failure);
                }
            }
        }
    }

    /// Takes one retry from the tenant's budget.
    pub fn try_retry(&self) -> bool {
        self.budget
            .lock()
            .map(|mut b| b.withdraw(Instant::now()))
            .unwrap_or(false)
    }

    pub fn deposit(&self) {
        if let Ok(mut b) = self.budget.lock() {
            b.deposit(Instant::now());
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
