//! One Graph call's way through the resilience pipeline when Graph answers, as
//! `sync::call_graph` takes it, with no HTTP, no token and no metrics: only what the resilience
//! code adds to each call. What the pipeline's benches measure, in time
//! (`cargo bench -p calsync-core --bench pipeline`) and in instructions
//! (`calsync bench --instructions`).

use std::hint::black_box;
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::CallOutcome;
use super::limits::{MailboxRate, RateLimits};
use super::{Admission, Evidence, ResilienceSettings, TenantGuard};

/// The mailbox the calls are made for.
const MAILBOX: i64 = 42;

/// A tenant's guard, the rate limits and a mailbox's limiter as a job holds it.
pub struct SuccessPath {
    limits: RateLimits,
    guard: TenantGuard,
    mailbox: MailboxRate,
    deadline: Instant,
}

impl SuccessPath {
    /// `settings` with rate limits so high that the limiters count every call but never make
    /// one wait: a wait would need a runtime, and would measure the limit, not the code.
    pub fn unlimited(settings: ResilienceSettings) -> ResilienceSettings {
        ResilienceSettings {
            mailbox_requests_per_10min: u32::MAX,
            tenant_requests_per_second: 1_000_000_000,
            app_requests_per_second: 1_000_000_000,
            ..settings
        }
    }

    pub fn new(settings: &ResilienceSettings) -> Self {
        let limits = RateLimits::new(settings);
        let guard = TenantGuard::new("bench", settings, &limits);
        Self {
            mailbox: limits.mailbox(MAILBOX),
            limits,
            guard,
            deadline: Instant::now() + Duration::from_secs(3600),
        }
    }

    /// One call: admitted (the permits at one clock read, a place on the breaker), answered
    /// (the caller's clock read when the answer came, which also times the call against
    /// `slow_call`; the success on the breaker; the retry budget credited). False if it was not
    /// admitted at once (a limiter would make it wait, or the breaker is open).
    pub fn call(&self) -> bool {
        let Admission::Decided(Ok(call)) =
            self.guard
                .admit_now(&self.limits, black_box(&self.mailbox), self.deadline)
        else {
            return false;
        };
        let ended = Instant::now();
        black_box(ended.saturating_duration_since(call.admitted_at));
        self.guard.answered(
            call.reservation,
            MAILBOX,
            black_box(Evidence::Healthy),
            ended,
        );
        true
    }

    /// The breaker alone: a place reserved, the success recorded. False if it is open.
    pub fn breaker_only(&self) -> bool {
        match self.guard.graph.reserve() {
            Ok(reservation) => {
                reservation.record(CallOutcome::Success);
                true
            }
            Err(_) => false,
        }
    }

    pub fn guard(&self) -> &TenantGuard {
        &self.guard
    }
}
