//! The fleet: replicas sharing one store share Graph's app-wide and per-tenant request rates.
//!
//! Each replica has a row in the replica registry ([`Store::replica_heartbeat`]), written every
//! `sync.replica_heartbeat`; a row whose heartbeat is older than `sync.lease_ttl` is a dead
//! replica's (a clean stop removes it at once). A replica with `n` live replicas (itself
//! included) takes [`Share::Of`] `n` of each rate, sized so that its requests in any 1-second
//! window stay within `limit / n` ([`quota_for`](crate::resilience::limits::quota_for)).
//!
//! Sizes alone do not keep the sum within the limit while the fleet changes: a replica that
//! just joined would send its share while the others, not having seen it yet, still send theirs.
//! So each row also carries a promise, `keeps_share_of`: "from the time this row was written,
//! my requests stay within `limit / keeps_share_of` in every 1-second window" (none: "I send
//! nothing"). [`Membership`] keeps these rules:
//! - **Shrink at once** when more replicas are live than the share was sized for; raise the
//!   promise to the new share only one window later, when the old share's requests have left
//!   every window that is still to come.
//! - **Grow, or start sending, only after telling**: first write a promise weak enough to
//!   cover the larger share, then, on a read made after that write, grow only if every other
//!   live replica promises to keep to the same share or less, and the weaker promise has stood
//!   for one window (so a replica that left, or died, has no requests left in any window this
//!   one now fills). Writes are committed before the read that follows them, so of a replica
//!   that grows and one that joins at the same time, at least one sees the other.
//! - **A stale heartbeat stops the sending**: a replica whose last successful heartbeat is
//!   older than the lease minus one heartbeat sends nothing more ([`hold_share_until`]),
//!   before the others can count it dead: its running jobs stop at their next request and
//!   release their mailboxes to the others, it takes no new ones, and it joins again (from
//!   "sends nothing") once a heartbeat succeeds.
//!
//! [`hold_share_until`]: crate::resilience::limits::RateLimits::hold_share_until
//!
//! Hence, whoever joins, leaves or dies, the sum of the promises of the replicas sending at any
//! moment keeps within the limit, and so do their requests in every 1-second window (as they
//! leave the process: clocks, and the network between calsync and Graph, are the operator's to
//! keep well within the lease, and the configured limit a little under Graph's). A joining
//! replica sends after about one heartbeat and one window; a dead one's share returns one lease
//! period after its last heartbeat, plus about two heartbeats and one window.
//!
//! On SQLite one process works on a file (its leftover rows are removed at start, as its
//! leases are released), so a replica starts with the whole rates; it follows the same rules
//! should another process register there.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::resilience::limits::{Share, LIMIT_WINDOW};
use crate::store::{Backend, Store, StoreError};
use crate::tenants::Tenants;

/// What a promise allows: smaller allows more; `None` (sends nothing) allows least.
fn strictness(promise: Option<u32>) -> u64 {
    promise.map_or(u64::MAX, u64::from)
}

/// One replica's view of the fleet and the share it may use, by the rules in the module
/// documentation. Pure: time is passed in, the store is the caller's.
#[derive(Clone, Debug)]
pub struct Membership {
    window: Duration,
    /// A heartbeat older than this may already be given up by the others.
    stale_after: Duration,
    /// What this replica's rates are sized for.
    applied: Share,
    /// The promise last written (`None` inside: sends nothing), if one was.
    written: Option<Option<u32>>,
    last_written_at: Option<Instant>,
    /// When the written promise last came to allow more than before.
    lowered_at: Option<Instant>,
    /// When the share last shrank (its promise follows one window later).
    shrunk_at: Option<Instant>,
    /// Live replicas at the last look, this one included (0: not looked yet).
    live: u32,
}

impl Membership {
    /// A replica starting among others: it sends nothing until admitted.
    pub fn joining(stale_after: Duration) -> Self {
        Self {
            window: LIMIT_WINDOW,
            stale_after,
            applied: Share::Nothing,
            written: None,
            last_written_at: None,
            lowered_at: None,
            shrunk_at: None,
            live: 0,
        }
    }

    /// The only replica there can be (SQLite): the whole rates from the start.
    pub fn alone(stale_after: Duration) -> Self {
        Self {
            applied: Share::WHOLE,
            written: Some(Some(1)),
            live: 1,
            ..Self::joining(stale_after)
        }
    }

    pub fn applied(&self) -> Share {
        self.applied
    }

    /// Live replicas at the last look, this one included.
    pub fn live(&self) -> u32 {
        self.live
    }

    /// The promise to write now.
    pub fn promise(&self, now: Instant) -> Option<u32> {
        match self.applied {
            Share::Nothing if self.live == 0 => None,
            // Not sending: any promise holds; this one lets it be admitted.
            Share::Nothing => Some(self.live),
            // Before growing, tell.
            Share::Of(d) if d.get() > self.live => Some(self.live),
            Share::Of(d) => {
                let settled = self.shrunk_at.is_none_or(|t| now >= t + self.window);
                if settled {
                    Some(d.get())
                } else {
                    // The old, larger share's requests are still in the window.
                    self.written.unwrap_or(Some(1))
                }
            }
        }
    }

    /// `promise` was written at `at`. Returns the new share if it changed: none, when the
    /// previous heartbeat is so old that the others may have counted this replica dead (it
    /// joins again).
    pub fn written(&mut self, promise: Option<u32>, at: Instant) -> Option<Share> {
        let mut change = None;
        let stale = self
            .last_written_at
            .is_some_and(|last| at.saturating_duration_since(last) > self.stale_after);
        if stale && self.applied != Share::Nothing {
            self.applied = Share::Nothing;
            self.shrunk_at = None;
            change = Some(Share::Nothing);
        }
        let before = self.written.unwrap_or(None);
        if self.written.is_none() || stale || strictness(promise) < strictness(before) {
            self.lowered_at = Some(at);
        }
        self.written = Some(promise);
        self.last_written_at = Some(at);
        change
    }

    /// A look at the fleet, made after the last write: `live` replicas (this one included);
    /// `others_keep`, the smallest share another live replica promises to keep to (`u32::MAX`
    /// for none, or when none sends). Returns the new share if it changed.
    pub fn observe(&mut self, now: Instant, live: u32, others_keep: u32) -> Option<Share> {
        let n = live.max(1);
        self.live = n;
        let mut change = None;
        if let Share::Of(d) = self.applied {
            if d.get() < n {
                self.applied = Share::of(n);
                self.shrunk_at = Some(now);
                change = Some(self.applied);
            }
        }
        let wants_more = match self.applied {
            Share::Nothing => true,
            Share::Of(d) => d.get() > n,
        };
        let told = matches!(self.written, Some(Some(p)) if p <= n);
        let settled = self.lowered_at.is_some_and(|t| now >= t + self.window);
        if wants_more && told && settled && others_keep >= n {
            self.applied = Share::of(n);
            change = Some(self.applied);
        }
        change
    }

    /// When the next heartbeat is worth making before the regular one: at once if the
    /// promise to write has changed, or when a window this replica waits for has passed.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        if self.written != Some(self.promise(now)) {
            return Some(now);
        }
        let raise = match self.applied {
            Share::Of(_) => self.shrunk_at.map(|t| t + self.window),
            Share::Nothing => None,
        };
        let grow = match self.applied {
            Share::Nothing => true,
            Share::Of(d) => d.get() > self.live,
        }
        .then(|| self.lowered_at.map(|t| t + self.window))
        .flatten();
        [raise, grow]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
    }
}

/// This replica in the registry: its heartbeat, and the shares it takes.
pub struct Fleet {
    store: Store,
    tenants: Arc<Tenants>,
    id: String,
    started_at: DateTime<Utc>,
    heartbeat: Duration,
    lease: Duration,
    /// Ended writes are pruned this long after they ended (`writes.retention`).
    write_retention: Duration,
    membership: Mutex<Membership>,
    live: AtomicU32,
}

impl Fleet {
    /// Not registered yet ([`run`](Self::run) does it); on PostgreSQL the rates are
    /// withheld from now until the fleet admits this replica.
    pub fn new(settings: &Settings, store: Store, tenants: Arc<Tenants>, id: &str) -> Self {
        let heartbeat = settings.sync.replica_heartbeat;
        let lease = settings.sync.lease_ttl;
        let stale_after = lease.saturating_sub(heartbeat);
        let membership = match store.backend() {
            Backend::Sqlite => Membership::alone(stale_after),
            Backend::Postgres => Membership::joining(stale_after),
        };
        tenants.set_share(membership.applied());
        tenants.limits().note_live_replicas(membership.live());
        Self {
            store,
            tenants,
            id: id.to_string(),
            started_at: Utc::now(),
            heartbeat,
            lease,
            write_retention: settings.writes.retention,
            membership: Mutex::new(membership),
            live: AtomicU32::new(0),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn membership(&self) -> MutexGuard<'_, Membership> {
        self.membership
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn apply(&self, share: Share) {
        tracing::info!(
            ?share,
            live = self.live.load(Ordering::Relaxed),
            "this replica's share of the request rates changed"
        );
        self.tenants.set_share(share);
    }

    /// One heartbeat: writes this replica's row and promise, then reads the live replicas
    /// and resizes the rates as [`Membership`] allows.
    pub async fn beat(&self) -> Result<(), StoreError> {
        let promise = self.membership().promise(Instant::now());
        let at = Instant::now();
        self.store
            .replica_heartbeat(&self.id, self.started_at, Utc::now(), promise)
            .await?;
        let change = self.membership().written(promise, at);
        if let Some(share) = change {
            self.apply(share);
        }
        let stale_after = self.membership().stale_after;
        self.tenants.limits().hold_share_until(at + stale_after);
        let live_after =
            Utc::now() - chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::MAX);
        let rows = self.store.live_replicas(live_after).await?;
        let others: Vec<_> = rows.iter().filter(|r| r.replica_id != self.id).collect();
        let others_keep = others
            .iter()
            .map(|r| r.keeps_share_of.unwrap_or(u32::MAX))
            .min()
            .unwrap_or(u32::MAX);
        let live = u32::try_from(others.len() + 1).unwrap_or(u32::MAX);
        self.live.store(live, Ordering::Relaxed);
        self.tenants.limits().note_live_replicas(live);
        let change = self.membership().observe(Instant::now(), live, others_keep);
        if let Some(share) = change {
            self.apply(share);
        }
        Ok(())
    }

    /// Heartbeats until `stop` (cancel it once this replica sends no more requests), then
    /// removes its row, so the others take its share without waiting for the lease.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut beats: u64 = 0;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
            // Bounded like every outbound call; a heartbeat slower than this is a failed one.
            let beat = tokio::time::timeout(self.lease, self.beat()).await;
            match beat {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "replica heartbeat failed; will try again")
                }
                Err(_) => tracing::warn!("replica heartbeat timed out; will try again"),
            }
            beats += 1;
            if beats % 100 == 0 {
                self.forget_dead().await;
                self.prune_writes().await;
            }
            let now = Instant::now();
            let regular = now + self.heartbeat;
            let soonest = now + self.heartbeat / 4;
            next = self
                .membership()
                .next_wake(now)
                .map_or(regular, |wake| wake.clamp(soonest, regular));
        }
        self.leave().await;
    }

    /// Removes the rows of replicas dead for ten leases (kept that long for the curious).
    async fn forget_dead(&self) {
        let before = Utc::now()
            - chrono::Duration::from_std(self.lease * 10).unwrap_or(chrono::Duration::MAX);
        if let Ok(Ok(n)) =
            tokio::time::timeout(self.lease, self.store.forget_replicas(before)).await
        {
            if n > 0 {
                tracing::info!(removed = n, "forgot dead replicas");
            }
        }
    }

    /// Deletes the application's writes that ended longer than `writes.retention` ago (any
    /// replica may: the delete is the same from each).
    async fn prune_writes(&self) {
        let before = Utc::now()
            - chrono::Duration::from_std(self.write_retention).unwrap_or(chrono::Duration::MAX);
        match tokio::time::timeout(self.lease, self.store.prune_writes(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "pruned ended writes"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not prune ended writes; will try again")
            }
            Err(_) => tracing::warn!("pruning ended writes timed out; will try again"),
        }
    }

    async fn leave(&self) {
        self.tenants.set_share(Share::Nothing);
        match tokio::time::timeout(self.lease, self.store.remove_replica(&self.id)).await {
            Ok(Ok(_)) => tracing::info!(replica = %self.id, "left the replica registry"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not leave the replica registry; the row runs out with its lease")
            }
            Err(_) => tracing::warn!(
                "leaving the replica registry timed out; the row runs out with its lease"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(27);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A fleet of memberships and their rows, stepped by hand: every heartbeat writes, then
    /// reads the others' rows as written so far.
    struct World {
        t0: Instant,
        members: Vec<(Membership, bool, Option<u32>)>,
    }

    impl World {
        fn new() -> Self {
            Self {
                t0: Instant::now(),
                members: Vec::new(),
            }
        }

        fn join(&mut self, m: Membership) -> usize {
            self.members.push((m, true, None));
            self.members.len() - 1
        }

        fn beat(&mut self, i: usize, at: Duration) -> Option<Share> {
            let now = self.t0 + at;
            let promise = self.members[i].0.promise(now);
            let mut change = self.members[i].0.written(promise, now);
            self.members[i].2 = promise;
            let live = self.members.iter().filter(|m| m.1).count() as u32;
            let others_keep = self
                .members
                .iter()
                .enumerate()
                .filter(|(j, m)| *j != i && m.1)
                .map(|(_, m)| m.2.unwrap_or(u32::MAX))
                .min()
                .unwrap_or(u32::MAX);
            if let Some(c) = self.members[i].0.observe(now, live, others_keep) {
                change = Some(c);
            }
            change
        }

        /// The sum of what the sending replicas may send in one window, as shares of 1.
        fn sending(&self) -> f64 {
            self.members
                .iter()
                .filter(|m| m.1)
                .map(|m| match m.0.applied() {
                    Share::Of(n) => 1.0 / f64::from(n.get()),
                    Share::Nothing => 0.0,
                })
                .sum()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_replica_on_postgres_is_admitted_after_one_window() {
        let mut w = World::new();
        let a = w.join(Membership::joining(STALE));
        assert_eq!(
            w.beat(a, ms(0)),
            None,
            "first it only says it sends nothing"
        );
        assert_eq!(w.members[a].0.promise(w.t0), Some(1));
        assert_eq!(
            w.beat(a, ms(100)),
            None,
            "told, but the window has not passed"
        );
        assert_eq!(
            w.members[a].0.next_wake(w.t0 + ms(100)),
            Some(w.t0 + ms(1100))
        );
        assert_eq!(w.beat(a, ms(1100)), Some(Share::WHOLE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_joiner_waits_until_the_others_have_shrunk_for_a_window() {
        let mut w = World::new();
        let a = w.join(Membership::alone(STALE));
        w.beat(a, ms(0));
        let b = w.join(Membership::joining(STALE));
        w.beat(b, ms(10));
        w.beat(b, ms(20)); // promises 2: "I may send half"
        assert_eq!(w.beat(b, ms(1500)), None, "A still promises the whole");
        assert_eq!(w.members[b].0.applied(), Share::Nothing);
        // A sees B: halves at once, but promises a half only a window later.
        assert_eq!(w.beat(a, ms(1600)), Some(Share::of(2)));
        assert_eq!(w.members[a].2, Some(1));
        assert_eq!(w.beat(b, ms(1700)), None, "A's promise is still the whole");
        assert_eq!(
            w.members[a].0.next_wake(w.t0 + ms(1600)),
            Some(w.t0 + ms(2600))
        );
        w.beat(a, ms(2600));
        assert_eq!(w.members[a].2, Some(2));
        assert_eq!(w.beat(b, ms(2700)), Some(Share::of(2)));
        assert!(w.sending() <= 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn survivors_grow_one_window_after_saying_so() {
        let mut w = World::new();
        let a = w.join(Membership::alone(STALE));
        let b = w.join(Membership::joining(STALE));
        for t in (0..5000).step_by(100) {
            w.beat(a, ms(t));
            w.beat(b, ms(t + 50));
        }
        assert_eq!(w.members[a].0.applied(), Share::of(2));
        assert_eq!(w.members[b].0.applied(), Share::of(2));
        // B dies: its row runs out.
        w.members[b].1 = false;
        assert_eq!(w.beat(a, ms(6000)), None);
        // First it says it may take the whole, at once.
        assert_eq!(w.members[a].0.promise(w.t0 + ms(6000)), Some(1));
        assert_eq!(
            w.members[a].0.next_wake(w.t0 + ms(6000)),
            Some(w.t0 + ms(6000))
        );
        assert_eq!(w.beat(a, ms(6100)), None);
        assert_eq!(w.members[a].2, Some(1));
        assert_eq!(w.beat(a, ms(6600)), None, "a window has not passed since");
        assert_eq!(w.beat(a, ms(7100)), Some(Share::WHOLE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_heartbeat_went_stale_joins_again() {
        let mut w = World::new();
        let a = w.join(Membership::alone(STALE));
        w.beat(a, ms(0));
        assert_eq!(w.beat(a, ms(28_000)), Some(Share::Nothing));
        assert_eq!(w.members[a].0.applied(), Share::Nothing);
        // Then it is admitted again, one window after saying it sends again.
        w.beat(a, ms(28_100));
        assert_eq!(w.beat(a, ms(29_100)), Some(Share::WHOLE));
    }

    /// Replicas joining and dying at random, heartbeats in random order: at every moment the
    /// replicas sending keep within the whole rate, and the fleet ends up sharing it evenly.
    #[tokio::test(start_paused = true)]
    async fn random_joins_and_deaths_never_oversubscribe() {
        use rand::{Rng, SeedableRng};
        for seed in 0..50u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut w = World::new();
            w.join(Membership::alone(STALE));
            let mut t = 0u64;
            for _ in 0..600 {
                t += rng.gen_range(1..60);
                match rng.gen_range(0..100) {
                    0..=3 => {
                        w.join(Membership::joining(STALE));
                    }
                    4..=5 => {
                        let alive: Vec<usize> =
                            (0..w.members.len()).filter(|i| w.members[*i].1).collect();
                        if alive.len() > 1 {
                            let victim = alive[rng.gen_range(0..alive.len())];
                            w.members[victim].1 = false;
                        }
                    }
                    _ => {
                        let alive: Vec<usize> =
                            (0..w.members.len()).filter(|i| w.members[*i].1).collect();
                        let i = alive[rng.gen_range(0..alive.len())];
                        w.beat(i, ms(t));
                    }
                }
                // A share counts until a window after it shrank: what the rows promise.
                let promised: f64 = w
                    .members
                    .iter()
                    .filter(|m| m.1)
                    .map(|m| match (m.0.applied(), m.2) {
                        (Share::Nothing, _) => 0.0,
                        (Share::Of(n), p) => {
                            let p = p.map_or(f64::INFINITY, f64::from);
                            1.0 / f64::from(n.get()).min(p)
                        }
                    })
                    .sum();
                assert!(w.sending() <= 1.0 + 1e-9, "seed {seed} at {t} ms");
                assert!(promised <= 1.0 + 1e-9, "seed {seed} at {t} ms: {promised}");
            }
            // Quiet: everyone beats for a while, and all share evenly.
            for _ in 0..40 {
                t += 100;
                for i in 0..w.members.len() {
                    if w.members[i].1 {
                        w.beat(i, ms(t));
                    }
                }
            }
            let live = w.members.iter().filter(|m| m.1).count() as u32;
            for m in w.members.iter().filter(|m| m.1) {
                assert_eq!(m.0.applied(), Share::of(live), "seed {seed}");
            }
        }
    }
}
