//! Request rate limits with `governor`: per mailbox (Outlook: 10,000 requests per 10 minutes),
//! per tenant and per app. Waiting for a permit happens inside the job, so it counts against
//! the job's deadline; a wait that would pass the deadline is returned to the caller instead.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::ResilienceSettings;

const TEN_MINUTES: Duration = Duration::from_secs(600);

pub struct RateLimits {
    mailbox: DefaultKeyedRateLimiter<i64>,
    app: DefaultDirectRateLimiter,
    tenant_quota: Quota,
}

/// A permit is not available before the deadline; it will be at `ready_in` from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBeforeDeadline {
    pub ready_in: Duration,
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits {
    pub fn new(settings: &ResilienceSettings) -> Self {
        // Burst half the window's allowance and replenish the other half evenly: no 10-minute
        // window can then see more than the limit.
        let per_window = settings.mailbox_requests_per_10min.max(2);
        let half = per_window / 2;
        let mailbox_quota = Quota::with_period(TEN_MINUTES / half)
            .unwrap_or_else(|| Quota::per_second(nonzero(1)))
            .allow_burst(nonzero(half));
        Self {
            mailbox: RateLimiter::keyed(mailbox_quota),
            app: RateLimiter::direct(Quota::per_second(nonzero(settings.app_requests_per_second))),
            tenant_quota: Quota::per_second(nonzero(settings.tenant_requests_per_second)),
        }
    }

    pub fn tenant_limiter(&self) -> DefaultDirectRateLimiter {
        RateLimiter::direct(self.tenant_quota)
    }

    /// Waits for one permit from each limiter in turn (mailbox, tenant, app), each consumed
    /// exactly once, unless a wait would end after `deadline`.
    pub async fn acquire(
        &self,
        mailbox: i64,
        tenant: &DefaultDirectRateLimiter,
        deadline: Instant,
    ) -> Result<(), NotBeforeDeadline> {
        wait_for(|| self.mailbox.check_key(&mailbox), deadline).await?;
        wait_for(|| tenant.check(), deadline).await?;
        wait_for(|| self.app.check(), deadline).await
    }

    /// Drops per-mailbox state that has fully replenished (memory stays proportional to the
    /// mailboxes active recently, not to all registered ones).
    pub fn shrink(&self) {
        self.mailbox.retain_recent();
        self.mailbox.shrink_to_fit();
    }
}

type Permit = Result<(), governor::NotUntil<<DefaultClock as Clock>::Instant>>;

async fn wait_for(
    mut check: impl FnMut() -> Permit,
    deadline: Instant,
) -> Result<(), NotBeforeDeadline> {
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                if Instant::now() + wait > deadline {
                    return Err(NotBeforeDeadline { ready_in: wait });
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}
