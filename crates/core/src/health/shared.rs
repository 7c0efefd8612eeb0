//! One build of the health model for every request that arrives while it is being built.
//!
//! During an incident many people open the status page at once, each refreshing every few
//! seconds, while the store is at its busiest. Each request building its own model would ask
//! the store for the same counts again and again; here a request waits for the build under
//! way and, if that build started before the request arrived (it may miss what changed since),
//! for the next one, which serves everyone who arrived meanwhile. However many ask at once,
//! the store builds at most two models, and no request gets one started before it arrived.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Mutex;

pub struct SharedBuild<T> {
    /// Requests so far: each takes the next number when it arrives.
    arrivals: AtomicU64,
    /// The last model built, with the number of requests that had arrived when its build
    /// started (it serves those numbered below).
    last: Mutex<Option<(u64, Arc<T>)>>,
}

impl<T> Default for SharedBuild<T> {
    fn default() -> Self {
        Self {
            arrivals: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }
}

impl<T> SharedBuild<T> {
    /// A value built after this call began: the last one, if its build started since, or a
    /// new one from `build`. A failed build is not kept: the next request builds again.
    pub async fn get<E, F, Fut>(&self, build: F) -> Result<Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let ticket = self.arrivals.fetch_add(1, Ordering::SeqCst);
        let mut last = self.last.lock().await;
        if let Some((serves_below, value)) = last.as_ref() {
            if ticket < *serves_below {
                return Ok(Arc::clone(value));
            }
        }
        let serves_below = self.arrivals.load(Ordering::SeqCst);
        let value = Arc::new(build().await?);
        *last = Some((serves_below, Arc::clone(&value)));
        Ok(value)
    }

    /// Requests that have arrived so far.
    #[cfg(test)]
    fn arrived(&self) -> u64 {
        self.arrivals.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    use tokio::sync::Notify;

    /// Five requests arriving while a build is held up share one more build; none gets the
    /// build that started before it arrived.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_during_a_build_share_the_next_one() {
        let shared = Arc::new(SharedBuild::<u32>::default());
        let builds = Arc::new(AtomicU32::new(0));
        let gate = Arc::new(Notify::new());
        let build = |builds: Arc<AtomicU32>, gate: Arc<Notify>| async move {
            let n = builds.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                gate.notified().await;
            }
            Ok::<u32, ()>(n)
        };
        let first = {
            let (shared, builds, gate) = (shared.clone(), builds.clone(), gate.clone());
            tokio::spawn(async move { shared.get(|| build(builds, gate)).await })
        };
        while builds.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let later: Vec<_> = (0..5)
            .map(|_| {
                let (shared, builds, gate) = (shared.clone(), builds.clone(), gate.clone());
                tokio::spawn(async move { shared.get(|| build(builds, gate)).await })
            })
            .collect();
        while shared.arrived() < 6 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(*first.await.expect("joins").expect("built"), 1);
        for request in later {
            assert_eq!(*request.await.expect("joins").expect("built"), 2);
        }
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    /// A request after a build has finished gets a new one; a failed build is not kept.
    #[tokio::test(flavor = "current_thread")]
    async fn a_later_request_builds_again_and_failures_are_not_kept() {
        let shared = SharedBuild::<u32>::default();
        let one = shared.get(|| async { Ok::<u32, ()>(1) }).await;
        assert_eq!(one.as_deref(), Ok(&1));
        let failed = shared
            .get(|| async { Err::<u32, &str>("store timed out") })
            .await;
        assert_eq!(failed.err(), Some("store timed out"));
        let three = shared.get(|| async { Ok::<u32, ()>(3) }).await;
        assert_eq!(three.as_deref(), Ok(&3));
    }
}
