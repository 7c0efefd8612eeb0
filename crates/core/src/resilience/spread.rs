//! How widely a tenant's Graph failures are spread over its mailboxes. One mailbox Graph
//! cannot serve (a calendar answering 504 on every page) is that mailbox's problem; failures
//! from several mailboxes within the window are evidence that Graph or the tenant is down.
//! Pure: the caller passes the time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// At most this many recent failures are remembered; a failure storm beyond it is spread
/// anyway.
const REMEMBERED: usize = 1024;

#[derive(Debug)]
pub struct FailureSpread {
    window: Duration,
    min_mailboxes: usize,
    /// (when, mailbox, already counted against the breaker)
    recent: VecDeque<(Instant, i64, bool)>,
}

impl FailureSpread {
    pub fn new(window: Duration, min_mailboxes: usize) -> Self {
        Self {
            window,
            min_mailboxes: min_mailboxes.max(1),
            recent: VecDeque::new(),
        }
    }

    /// Notes a failure of `mailbox` at `now`. Returns how many failures now count against the
    /// breaker: none while fewer than `min_mailboxes` mailboxes failed within the window; once
    /// they have, this one and every failure of the window not counted yet.
    pub fn note(&mut self, mailbox: i64, now: Instant) -> usize {
        while self
            .recent
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back((now, mailbox, false));
        let mut seen: Vec<i64> = self.recent.iter().map(|(_, m, _)| *m).collect();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() < self.min_mailboxes {
            return 0;
        }
        let mut newly = 0;
        for (_, _, counted) in self.recent.iter_mut().filter(|(_, _, c)| !c) {
            *counted = true;
            newly += 1;
        }
        newly
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_mailbox_failing_again_and_again_counts_for_nothing() {
        let mut spread = FailureSpread::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        for i in 0..100u64 {
            assert_eq!(spread.note(7, t0 + Duration::from_millis(i * 10)), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn once_a_second_mailbox_fails_the_window_counts() {
        let mut spread = FailureSpread::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        assert_eq!(spread.note(7, t0), 0);
        assert_eq!(spread.note(7, t0 + Duration::from_secs(1)), 0);
        assert_eq!(
            spread.note(8, t0 + Duration::from_secs(2)),
            3,
            "all three now"
        );
        assert_eq!(
            spread.note(7, t0 + Duration::from_secs(3)),
            1,
            "then one by one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_leave_the_window() {
        let mut spread = FailureSpread::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        assert_eq!(spread.note(1, t0), 0);
        assert_eq!(
            spread.note(2, t0 + Duration::from_secs(65)),
            0,
            "1 has left"
        );
        assert_eq!(spread.note(3, t0 + Duration::from_secs(70)), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn one_mailbox_is_enough_when_so_configured() {
        let mut spread = FailureSpread::new(Duration::from_secs(60), 1);
        assert_eq!(spread.note(1, Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let mut spread = FailureSpread::new(Duration::from_secs(3600), 2);
        let t0 = Instant::now();
        for i in 0..5000 {
            spread.note(i % 3, t0);
        }
        assert!(spread.recent.len() <= REMEMBERED);
        assert_eq!(spread.note(0, t0), 1);
    }
}
