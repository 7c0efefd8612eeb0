//! Request rate limits with `governor`: per mailbox (Outlook: 10,000 requests per 10 minutes),
//! per tenant and per app. Waiting for a permit happens inside the job, so it counts against
//! the job's deadline; a wait that would pass the deadline is returned to the caller instead.
//!
//! The app-wide and per-tenant rates are Graph's for the whole application, so replicas sharing
//! a store split them: each takes [`Share::Of`] the live replicas (see
//! [`crate::scheduler::fleet`], which decides when a share may change). A share is sized so that
//! no 1-second window holds more than `limit / replicas` of this replica's requests
//! ([`quota_for`]). The per-mailbox rate is not shared: a mailbox is synced by the replica
//! holding its lease. A job takes its mailbox's limiter once ([`RateLimits::mailbox`]), so its
//! calls pass no lock and no map on the way.
//!
//! The limiters read tokio's clock, once per call for all three (see [`CallClock`]): a clock
//! read is the dearest step of a permit on some machines, and tokio's clock is the one paused
//! time drives in tests.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Serialize;
use tokio::time::Instant;

use super::ResilienceSettings;

const TEN_MINUTES: Duration = Duration::from_secs(600);

/// The window Graph's per-second limits are counted in.
pub const LIMIT_WINDOW: Duration = Duration::from_secs(1);

/// When a job stopped for want of a share is due again (for whichever replica has one: this
/// one takes no jobs until it has a share again).
const NO_SHARE_RETRY: Duration = Duration::from_millis(50);

thread_local! {
    /// The time of the permits being taken on this thread, while [`at`] runs: the epoch of
    /// the clocks it is for, and the nanoseconds since.
    static CALL_NOW: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// Runs `f` with every [`CallClock`] of `clock`'s epoch on this thread reading `now`: the
/// three limiters of one call share one clock read. `f` must not await: the time is the
/// thread's, not the task's.
fn at<T>(clock: &CallClock, now: Instant, f: impl FnOnce() -> T) -> T {
    at_nanos(clock, nanos_since(clock.epoch, now), f)
}

/// [`at`], with the time already in nanoseconds since `clock`'s epoch.
fn at_nanos<T>(clock: &CallClock, nanos: u64, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<(Instant, u64)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CALL_NOW.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CALL_NOW.with(|c| c.replace(Some((clock.epoch, nanos)))));
    f()
}

/// The rate limiters' clock: tokio's, in nanoseconds since the epoch of their [`RateLimits`],
/// read from [`at`]'s time when one is set (governor reads its clock once per `check`, and a
/// call checks three limiters).
#[derive(Clone, Debug)]
pub struct CallClock {
    epoch: Instant,
}

impl Clock for CallClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(match CALL_NOW.with(Cell::get) {
            Some((epoch, nanos)) if epoch == self.epoch => nanos,
            _ => nanos_since(self.epoch, Instant::now()),
        })
    }
}

/// Mailbox ids are the store's own sequence numbers, not outside input: a multiplicative hash
/// spreads them, at a fraction of SipHash's cost.
#[derive(Default, Clone, Copy)]
pub struct MailboxIdHasher(u64);

impl Hasher for MailboxIdHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_i64(&mut self, id: i64) {
        self.0 ^= id as u64;
    }
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, CallClock, NoOpMiddleware<Nanos>>;

/// One mailbox's rate limiter, as its job holds it: taken from [`RateLimits`] once per job
/// ([`RateLimits::mailbox`]), so each of the job's calls checks it without the lock and the
/// map lookup of a keyed limiter. Its state outlives the job: the next job of the mailbox on
/// this replica gets the same limiter until it has fully replenished and no job holds it.
#[derive(Clone)]
pub struct MailboxRate(Arc<MailboxState>);

struct MailboxState {
    id: i64,
    limiter: DirectLimiter,
    /// Nanoseconds (of the limiters' clock) of the last permit taken: the limiter is as new
    /// once the burst has replenished since.
    last_permit: AtomicU64,
}

impl MailboxRate {
    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// One permit at the time [`at`] set for this thread.
    fn check_now(&self, clock: &CallClock) -> Result<(), Refused> {
        let state = &self.0;
        state
            .limiter
            .check()
            .map_err(|not_until| Refused::Wait(not_until.wait_time_from(clock.now())))?;
        state
            .last_permit
            .store(clock.now().as_u64(), Ordering::Relaxed);
        Ok(())
    }
}

impl std::fmt::Debug for MailboxRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MailboxRate").field(&self.0.id).finish()
    }
}

type MailboxRates = HashMap<i64, MailboxRate, BuildHasherDefault<MailboxIdHasher>>;

/// Why there is no permit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The next one is this far away.
    Wait(Duration),
    /// This replica has no share of the rate: not admitted by the fleet yet, or its heartbeat
    /// is too old. Waiting would hold the mailbox's lease for nothing.
    NoShare,
}

/// How much of a fleet-wide rate (the app's, a tenant's) this replica may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    /// An equal part of this many replicas' (1: the whole rate).
    Of(NonZeroU32),
    /// None at all: the fleet has not admitted this replica yet, or its heartbeat is too old.
    Nothing,
}

impl Share {
    /// The whole rate: a replica on its own.
    pub const WHOLE: Share = Share::Of(NonZeroU32::MIN);

    pub fn of(replicas: u32) -> Self {
        Share::Of(NonZeroU32::new(replicas).unwrap_or(NonZeroU32::MIN))
    }

    /// Requests per second this share allows of `per_second` (its 1-second window budget).
    pub fn per_second(self, per_second: u32) -> f64 {
        match self {
            Share::Of(n) => f64::from(per_second) / f64::from(n.get()),
            Share::Nothing => 0.0,
        }
    }
}

/// The quota for one replica's part of `per_second` shared by `replicas`: at most
/// `per_second / replicas` permits in any closed 1-second window, and as many as that allows
/// over time. A token bucket of burst `b` and rate `r` gives up to `b + r` permits in one
/// second (a full bucket, then a second's refill), so `Quota::per_second(n)` allows `2n`; here
/// the burst is 1 and the rate `share - 1` per second, so a second holds at most `share`
/// (the sum over replicas at most `per_second`) and a replica sustains `share - 1`. Below two
/// per second, one permit a little over a second apart. (Below one per second, i.e. fewer
/// requests allowed than replicas, each replica still gets one permit per `replicas /
/// per_second` seconds: the fleet then keeps the limit on average, not in every second.)
pub fn quota_for(per_second: u32, replicas: u32) -> Quota {
    const SECOND_NS: u128 = 1_000_000_000;
    let limit = u128::from(per_second.max(1));
    let n = u128::from(replicas.max(1));
    let period_ns = if limit >= 2 * n {
        // 1 s / (share - 1) = n s / (limit - n), rounded up: never a permit early.
        (n * SECOND_NS).div_ceil(limit - n)
    } else {
        // 1 s / share, but always more than a second.
        (n * SECOND_NS).div_ceil(limit).max(SECOND_NS + 1_000_000)
    };
    let period = Duration::from_nanos(u64::try_from(period_ns).unwrap_or(u64::MAX));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::MIN)
}

/// One fleet-wide rate (the app's, or one tenant's): this replica's part of it, resized when
/// its share changes. Taking a permit allocates nothing (a read lock and the limiter's atomic).
pub struct SharedRate {
    per_second: u32,
    clock: CallClock,
    limiter: RwLock<Option<DirectLimiter>>,
}

impl SharedRate {
    fn new(per_second: u32, share: Share, clock: CallClock) -> Self {
        Self {
            per_second,
            limiter: RwLock::new(limiter_for(per_second, share, &clock)),
            clock,
        }
    }

    /// Sizes the rate for `share`. The new limiter starts empty: its first permit comes one
    /// period from now, so the permits of the old one in the last second and the new one's
    /// never add up to more than the larger of the two shares allows.
    pub fn resize(&self, share: Share) {
        let limiter = limiter_for(self.per_second, share, &self.clock);
        if let Some(fresh) = &limiter {
            let _ = fresh.check();
        }
        match self.limiter.write() {
            Ok(mut current) => *current = limiter,
            Err(poisoned) => *poisoned.into_inner() = limiter,
        }
    }

    /// One permit now, or why not.
    pub fn check(&self) -> Result<(), Refused> {
        at(&self.clock, Instant::now(), || self.check_now())
    }

    /// One permit at the time [`at`] set for this thread (or the clock's, if none).
    fn check_now(&self) -> Result<(), Refused> {
        let current = match self.limiter.read() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        match current.as_ref() {
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| Refused::Wait(not_until.wait_time_from(self.clock.now()))),
            None => Err(Refused::NoShare),
        }
    }
}

fn limiter_for(per_second: u32, share: Share, clock: &CallClock) -> Option<DirectLimiter> {
    match share {
        Share::Of(n) => Some(RateLimiter::direct_with_clock(
            quota_for(per_second, n.get()),
            clock.clone(),
        )),
        Share::Nothing => None,
    }
}

/// This replica's share of the fleet-wide rates, for `/healthz` and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ShareStatus {
    /// Replicas whose heartbeat is within the lease, this one included, as last seen (1
    /// without a fleet).
    pub live_replicas: u32,
    /// Live replicas the rates are split between (none while this replica has no share).
    pub replicas: Option<u32>,
    /// This replica's part of `resilience.app_requests_per_second`.
    pub app_requests_per_second: f64,
    /// Its part of `resilience.tenant_requests_per_second`, for each tenant.
    pub tenant_requests_per_second: f64,
    pub app_limit_per_second: u32,
    pub tenant_limit_per_second: u32,
}

pub struct RateLimits {
    mailbox_quota: Quota,
    mailboxes: Mutex<MailboxRates>,
    app: SharedRate,
    tenant_per_second: u32,
    share: Mutex<Share>,
    live_replicas: AtomicU32,
    /// Milliseconds after the clock's epoch until which the share holds without a new
    /// heartbeat (`u64::MAX`: no fleet, no expiry).
    valid_until_ms: AtomicU64,
    clock: CallClock,
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
    /// The whole app and tenant rates, until a fleet says otherwise.
    pub fn new(settings: &ResilienceSettings) -> Self {
        // Burst half the window's allowance and replenish the other half evenly: no 10-minute
        // window can then see more than the limit.
        let per_window = settings.mailbox_requests_per_10min.max(2);
        let half = per_window / 2;
        let mailbox_quota = Quota::with_period(TEN_MINUTES / half)
            .unwrap_or_else(|| Quota::per_second(nonzero(1)))
            .allow_burst(nonzero(half));
        let clock = CallClock {
            epoch: Instant::now(),
        };
        Self {
            mailbox_quota,
            mailboxes: Mutex::new(MailboxRates::default()),
            app: SharedRate::new(
                settings.app_requests_per_second,
                Share::WHOLE,
                clock.clone(),
            ),
            tenant_per_second: settings.tenant_requests_per_second,
            share: Mutex::new(Share::WHOLE),
            live_replicas: AtomicU32::new(1),
            valid_until_ms: AtomicU64::new(u64::MAX),
            clock,
        }
    }

    /// A tenant's rate, at the current share.
    pub fn tenant_limiter(&self) -> SharedRate {
        SharedRate::new(self.tenant_per_second, self.share(), self.clock.clone())
    }

    pub fn share(&self) -> Share {
        self.share.lock().map_or(Share::Nothing, |s| *s)
    }

    /// Sets the app rate's share (the caller resizes the tenants' rates: see
    /// [`Tenants::set_share`](crate::tenants::Tenants::set_share)).
    pub fn set_share(&self, share: Share) {
        match self.share.lock() {
            Ok(mut s) => *s = share,
            Err(poisoned) => *poisoned.into_inner() = share,
        }
        self.app.resize(share);
    }

    /// The share holds until `until` unless extended again (each heartbeat extends it): a
    /// replica whose heartbeat stops sends nothing from then on, before the others, who stop
    /// counting it one lease period after its last heartbeat, take its share.
    pub fn hold_share_until(&self, until: Instant) {
        let ms = until
            .saturating_duration_since(self.clock.epoch)
            .as_millis();
        self.valid_until_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX - 1), Ordering::SeqCst);
    }

    /// Replicas live at the last heartbeat, this one included (for the status).
    pub fn note_live_replicas(&self, live: u32) {
        self.live_replicas.store(live, Ordering::Relaxed);
    }

    /// This replica may send now: it has a share and its heartbeat is recent enough.
    pub fn has_share(&self) -> bool {
        self.share() != Share::Nothing && !self.share_expired(Instant::now())
    }

    fn share_expired(&self, now: Instant) -> bool {
        self.share_expired_at(nanos_since(self.clock.epoch, now))
    }

    /// [`share_expired`](Self::share_expired) at `nanos` since the epoch.
    fn share_expired_at(&self, nanos: u64) -> bool {
        let until = self.valid_until_ms.load(Ordering::Relaxed);
        until != u64::MAX && nanos / 1_000_000 > until
    }

    pub fn status(&self) -> ShareStatus {
        let share = if self.share_expired(Instant::now()) {
            Share::Nothing
        } else {
            self.share()
        };
        ShareStatus {
            live_replicas: self.live_replicas.load(Ordering::Relaxed),
            replicas: match share {
                Share::Of(n) => Some(n.get()),
                Share::Nothing => None,
            },
            app_requests_per_second: share.per_second(self.app.per_second),
            tenant_requests_per_second: share.per_second(self.tenant_per_second),
            app_limit_per_second: self.app.per_second,
            tenant_limit_per_second: self.tenant_per_second,
        }
    }

    /// Waits for one permit from each limiter in turn (mailbox, tenant, app), each consumed
    /// exactly once, unless a wait would end after `deadline`. Without a wait it reads the
    /// clock once.
    pub async fn acquire(
        &self,
        mailbox: &MailboxRate,
        tenant: &SharedRate,
        deadline: Instant,
    ) -> Result<Instant, NotBeforeDeadline> {
        match self.try_acquire(mailbox, tenant, deadline) {
            Permits::Taken(now) => Ok(now),
            Permits::NotBeforeDeadline(refused) => Err(refused),
            Permits::Wait(pending) => self.acquire_after(pending, mailbox, tenant, deadline).await,
        }
    }

    /// The permits of a call if they are there now (the usual case, taken without a future:
    /// see [`TenantGuard::admit_now`](super::TenantGuard::admit_now)), or the wait before the
    /// next one, for [`acquire_after`](Self::acquire_after).
    pub fn try_acquire(
        &self,
        mailbox: &MailboxRate,
        tenant: &SharedRate,
        deadline: Instant,
    ) -> Permits {
        self.permits_at(Stage::Mailbox, mailbox, tenant, deadline, Instant::now())
    }

    /// Waits out `pending` and takes the permits it still lacks, as [`acquire`](Self::acquire).
    pub async fn acquire_after(
        &self,
        mut pending: PendingPermits,
        mailbox: &MailboxRate,
        tenant: &SharedRate,
        deadline: Instant,
    ) -> Result<Instant, NotBeforeDeadline> {
        loop {
            tokio::time::sleep(pending.wait).await;
            match self.permits_at(pending.from, mailbox, tenant, deadline, Instant::now()) {
                Permits::Taken(now) => return Ok(now),
                Permits::NotBeforeDeadline(refused) => return Err(refused),
                Permits::Wait(next) => pending = next,
            }
        }
    }

    fn permits_at(
        &self,
        from: Stage,
        mailbox: &MailboxRate,
        tenant: &SharedRate,
        deadline: Instant,
        now: Instant,
    ) -> Permits {
        match self.permits_from(from, mailbox, tenant, now) {
            Ok(()) => Permits::Taken(now),
            // The job stops, its lease is released, and a replica with a share takes the
            // mailbox.
            Err((_, Refused::NoShare)) => Permits::NotBeforeDeadline(NotBeforeDeadline {
                ready_in: NO_SHARE_RETRY,
            }),
            Err((_, Refused::Wait(wait))) if now + wait > deadline => {
                Permits::NotBeforeDeadline(NotBeforeDeadline { ready_in: wait })
            }
            Err((stage, Refused::Wait(wait))) => {
                Permits::Wait(PendingPermits { from: stage, wait })
            }
        }
    }

    /// Takes the permits of `from` and the stages after it, in order, at `now`; the stage that
    /// refused, and why (the permits before it are taken).
    fn permits_from(
        &self,
        from: Stage,
        mailbox: &MailboxRate,
        tenant: &SharedRate,
        now: Instant,
    ) -> Result<(), (Stage, Refused)> {
        // One subtraction for the limiters and the share's expiry.
        let nanos = nanos_since(self.clock.epoch, now);
        at_nanos(&self.clock, nanos, || {
            if from == Stage::Mailbox {
                mailbox
                    .check_now(&self.clock)
                    .map_err(|refused| (Stage::Mailbox, refused))?;
            }
            if from != Stage::App {
                tenant
                    .check_now()
                    .map_err(|refused| (Stage::Tenant, refused))?;
            }
            if self.share_expired_at(nanos) {
                return Err((Stage::App, Refused::NoShare));
            }
            self.app
                .check_now()
                .map_err(|refused| (Stage::App, refused))
        })
    }

    /// `mailbox`'s rate limiter, for its job to take each call's permit from (the same one for
    /// every job of the mailbox on this replica, until [`shrink`](Self::shrink) drops it).
    pub fn mailbox(&self, mailbox: i64) -> MailboxRate {
        self.lock_mailboxes()
            .entry(mailbox)
            .or_insert_with(|| {
                MailboxRate(Arc::new(MailboxState {
                    id: mailbox,
                    limiter: RateLimiter::direct_with_clock(self.mailbox_quota, self.clock.clone()),
                    last_permit: AtomicU64::new(self.clock.now().as_u64()),
                }))
            })
            .clone()
    }

    /// Drops the limiters of mailboxes that no job holds and that have fully replenished: they
    /// are as new (memory stays proportional to the mailboxes active recently, not to all
    /// registered ones).
    pub fn shrink(&self) {
        let now = self.clock.now().as_u64();
        let replenished = u64::try_from(self.mailbox_quota.burst_size_replenished_in().as_nanos())
            .unwrap_or(u64::MAX);
        let mut mailboxes = self.lock_mailboxes();
        mailboxes.retain(|_, rate| {
            Arc::strong_count(&rate.0) > 1
                || now.saturating_sub(rate.0.last_permit.load(Ordering::Relaxed)) < replenished
        });
        mailboxes.shrink_to_fit();
    }

    fn lock_mailboxes(&self) -> std::sync::MutexGuard<'_, MailboxRates> {
        // Poisoned only by a panic while inserting or retaining: the map is still a map.
        self.mailboxes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call's permits, tried now.
#[derive(Debug)]
pub enum Permits {
    /// All taken, at this time (the one clock read of the call's admission).
    Taken(Instant),
    /// Not before the deadline, or this replica has no share.
    NotBeforeDeadline(NotBeforeDeadline),
    /// Some are taken; the rest after a wait.
    Wait(PendingPermits),
}

/// The permits a call still lacks, and how long until the next is due.
#[derive(Debug)]
pub struct PendingPermits {
    from: Stage,
    wait: Duration,
}

/// Where a call's permits stand: the first limiter whose permit it does not have yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Mailbox,
    Tenant,
    App,
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// Permits a greedy caller gets from `quota` over `seconds`, asking again exactly when the
    /// limiter says the next one is due.
    fn greedy_permits(quota: Quota, seconds: u64, start_full: bool) -> Vec<Duration> {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
        if !start_full {
            let _ = limiter.check();
        }
        let mut at = Vec::new();
        let mut now = Duration::ZERO;
        while now < Duration::from_secs(seconds) {
            match limiter.check() {
                Ok(()) => at.push(now),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(clock.now());
                    clock.advance(wait);
                    now += wait;
                }
            }
        }
        at
    }

    /// The most permits in any closed window of one second.
    fn max_per_second(permits: &[Duration]) -> usize {
        let mut max = 0;
        for (i, start) in permits.iter().enumerate() {
            let n = permits[i..]
                .iter()
                .take_while(|t| **t <= *start + LIMIT_WINDOW)
                .count();
            max = max.max(n);
        }
        max
    }

    #[test]
    fn a_share_never_exceeds_its_part_of_the_limit_in_any_second() {
        for (limit, replicas) in [
            (30, 3),
            (24, 3),
            (2000, 1),
            (2000, 3),
            (200, 7),
            (5, 2),
            (10, 1),
        ] {
            let share = f64::from(limit) / f64::from(replicas);
            let permits = greedy_permits(quota_for(limit, replicas), 5, true);
            let max = max_per_second(&permits);
            assert!(
                max as f64 <= share,
                "{limit}/s over {replicas}: {max} in one second, share {share}"
            );
            // And it uses the share: at least share - 1 per second sustained.
            let sustained = permits.len() as f64 / 5.0;
            assert!(
                sustained >= (share - 1.0).max(0.9) - 0.3,
                "{limit}/s over {replicas}: only {sustained}/s sustained"
            );
        }
    }

    #[test]
    fn per_second_quota_would_allow_twice_the_limit() {
        // Why the burst is 1: governor's own per_second(n) lets a full bucket and a second's
        // refill through in one second.
        let permits = greedy_permits(Quota::per_second(nonzero(30)), 3, true);
        assert!(max_per_second(&permits) >= 59);
    }

    #[test]
    fn fewer_allowed_than_two_per_second_is_one_a_little_over_a_second_apart() {
        let permits = greedy_permits(quota_for(3, 2), 5, true);
        assert_eq!(max_per_second(&permits), 1, "{permits:?}");
        assert!(permits.len() >= 4);
    }

    #[tokio::test]
    async fn no_share_means_no_permit_and_a_resize_starts_empty() {
        let clock = CallClock {
            epoch: Instant::now(),
        };
        let rate = SharedRate::new(100, Share::Nothing, clock);
        assert_eq!(rate.check(), Err(Refused::NoShare));
        rate.resize(Share::of(2));
        // 50 per second: one permit per 1/49 s, the first one period after the resize.
        let Err(Refused::Wait(wait)) = rate.check() else {
            panic!("a resized limiter starts empty");
        };
        assert!(wait > Duration::from_millis(10) && wait <= Duration::from_millis(21));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_share_sends_nothing_until_extended() {
        let settings = crate::config::Settings::from_toml_str("").expect("defaults");
        let limits = RateLimits::new(&settings.resilience);
        let tenant = limits.tenant_limiter();
        let mailbox = limits.mailbox(1);
        let far = Instant::now() + Duration::from_secs(60);
        assert!(limits.acquire(&mailbox, &tenant, far).await.is_ok());
        limits.hold_share_until(Instant::now() + Duration::from_secs(1));
        assert!(limits.has_share());
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!limits.has_share());
        assert_eq!(limits.status().replicas, None);
        // Without a share the job stops at once, however far its deadline: it must not hold
        // its mailbox's lease while it cannot send.
        let before = Instant::now();
        let far = before + Duration::from_secs(60);
        assert_eq!(
            limits.acquire(&mailbox, &tenant, far).await,
            Err(NotBeforeDeadline {
                ready_in: NO_SHARE_RETRY
            })
        );
        assert_eq!(Instant::now(), before, "no wait");
        limits.hold_share_until(Instant::now() + Duration::from_secs(1));
        let far = Instant::now() + Duration::from_secs(60);
        assert!(limits.acquire(&mailbox, &tenant, far).await.is_ok());
    }

    /// The limiters keep tokio's time, so paused time paces them exactly: 3 requests a second
    /// for the tenant is a burst of 1 and one more every 1/2 s (see `quota_for`).
    #[tokio::test(start_paused = true)]
    async fn the_limiters_keep_tokios_time() {
        let settings = crate::config::Settings::from_toml_str("").expect("defaults");
        let settings = ResilienceSettings {
            tenant_requests_per_second: 3,
            ..settings.resilience
        };
        let limits = RateLimits::new(&settings);
        let tenant = limits.tenant_limiter();
        let mailbox = limits.mailbox(1);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(limits.acquire(&mailbox, &tenant, far).await.is_ok());
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2010),
            "{elapsed:?}"
        );
        // A wait past the deadline is not taken, and says when the permit comes.
        let near = Instant::now() + Duration::from_millis(100);
        let Err(NotBeforeDeadline { ready_in }) = limits.acquire(&mailbox, &tenant, near).await
        else {
            panic!("the next permit is half a second away");
        };
        assert!(ready_in > Duration::from_millis(490), "{ready_in:?}");
        assert_eq!(start.elapsed(), elapsed, "no wait");
    }

    /// A mailbox's limit is the mailbox's, not its job's: the next job of the mailbox gets the
    /// same spent limiter, and `shrink` drops it only once no job holds it and it has fully
    /// replenished (when a fresh one would be no different).
    #[tokio::test(start_paused = true)]
    async fn a_mailboxs_limit_outlives_its_job_until_replenished() {
        let settings = crate::config::Settings::from_toml_str("").expect("defaults");
        // 4 per 10 minutes: a burst of 2, then one every 5 minutes.
        let settings = ResilienceSettings {
            mailbox_requests_per_10min: 4,
            ..settings.resilience
        };
        let limits = RateLimits::new(&settings);
        let tenant = limits.tenant_limiter();
        let far = || Instant::now() + Duration::from_secs(60);
        let job = limits.mailbox(1);
        assert!(limits.acquire(&job, &tenant, far()).await.is_ok());
        assert!(limits.acquire(&job, &tenant, far()).await.is_ok());
        drop(job);
        limits.shrink();
        let next_job = limits.mailbox(1);
        let Err(NotBeforeDeadline { ready_in }) = limits.acquire(&next_job, &tenant, far()).await
        else {
            panic!("the mailbox's burst is spent, whichever job asks");
        };
        assert!(ready_in > Duration::from_secs(290), "{ready_in:?}");
        let other = limits.mailbox(2);
        assert!(limits.acquire(&other, &tenant, far()).await.is_ok());
        drop(other);

        // Ten minutes on, both have replenished; only the one still held stays.
        tokio::time::advance(Duration::from_secs(600)).await;
        limits.shrink();
        assert_eq!(
            limits.lock_mailboxes().keys().copied().collect::<Vec<_>>(),
            vec![1]
        );
        drop(next_job);
        limits.shrink();
        assert!(limits.lock_mailboxes().is_empty());
        // What comes back is a fresh limiter with its whole burst.
        let job = limits.mailbox(1);
        assert!(limits.acquire(&job, &tenant, far()).await.is_ok());
        assert!(limits.acquire(&job, &tenant, far()).await.is_ok());
    }

    #[test]
    fn status_shows_this_replicas_part() {
        let settings = crate::config::Settings::from_toml_str("").expect("defaults");
        let limits = RateLimits::new(&settings.resilience);
        assert_eq!(limits.status().replicas, Some(1));
        limits.set_share(Share::of(4));
        let status = limits.status();
        assert_eq!(status.replicas, Some(4));
        assert_eq!(status.app_requests_per_second, 500.0);
        assert_eq!(status.tenant_requests_per_second, 50.0);
        limits.set_share(Share::Nothing);
        assert_eq!(limits.status().app_requests_per_second, 0.0);
    }
}
