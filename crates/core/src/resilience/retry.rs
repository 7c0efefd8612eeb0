//! The retry policy: one pure decision, made the same way for every Graph call (delta pages,
//! series masters, subscriptions) and for rescheduling failed work (jobs, subscriptions).
//! Like tower's `Policy`, it decides; the caller waits and calls.

use std::time::Duration;

use super::after_retry_after;
use super::backoff::BackoffSchedule;

/// What a failed attempt tells the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Worth another attempt (throttling, 5xx, timeouts, resets); a permanent refusal is not.
    pub retryable: bool,
    /// How long the server asked us to wait (`Retry-After`), if it did.
    pub retry_after: Option<Duration>,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this wait (within the time left).
    Retry { wait: Duration, told: bool },
    /// The server asked for a wait past the time left: stop, and start again after it
    /// (holding nothing meanwhile).
    Defer { wait: Duration },
    /// Stop with the error.
    GiveUp,
}

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Retries of one request (attempts = retries + 1).
    pub max_retries: u32,
    pub backoff: BackoffSchedule,
}

impl RetryPolicy {
    pub fn new(max_retries: u32, backoff: BackoffSchedule) -> Self {
        Self {
            max_retries,
            backoff,
        }
    }

    /// After failed attempt `attempt` (0 = the first try), with `remaining` time before the
    /// work's deadline and `budget_left` saying whether the tenant's retry budget allows one
    /// more. `Retry-After` is obeyed exactly (plus jitter, never less); without it the wait is
    /// exponential backoff with jitter. No wait ends past the deadline.
    pub fn decide(
        &self,
        failure: Failure,
        attempt: u32,
        remaining: Duration,
        budget_left: bool,
    ) -> Decision {
        if !failure.retryable {
            return Decision::GiveUp;
        }
        let (wait, told) = match failure.retry_after {
            Some(retry_after) => (after_retry_after(retry_after), true),
            None => (self.backoff.delay(attempt), false),
        };
        if told && wait >= remaining {
            return Decision::Defer { wait };
        }
        if attempt >= self.max_retries || wait >= remaining || !budget_left {
            return Decision::GiveUp;
        }
        Decision::Retry { wait, told }
    }

    /// When to try failed work again (a job, a subscription call) after `failures` failures in
    /// a row: the backoff for that many failures, and never before the server's `Retry-After`
    /// (plus jitter).
    pub fn reschedule(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff.delay(failures);
        match retry_after {
            Some(wait) => after_retry_after(wait).max(backoff),
            None => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn policy(rng: &mut StdRng) -> RetryPolicy {
        let initial = Duration::from_millis(rng.gen_range(1..2_000));
        let max = initial + Duration::from_millis(rng.gen_range(0..60_000));
        RetryPolicy::new(
            rng.gen_range(0..6),
            BackoffSchedule::new(initial, max).expect("valid schedule"),
        )
    }

    fn failure(rng: &mut StdRng) -> Failure {
        Failure {
            retryable: rng.gen_bool(0.8),
            retry_after: rng
                .gen_bool(0.4)
                .then(|| Duration::from_millis(rng.gen_range(0..400_000))),
        }
    }

    /// Properties over many random cases: a retry never ends past the deadline, never comes
    /// before `Retry-After`, never exceeds the attempts or the budget; a permanent failure is
    /// never retried; a `Retry-After` past the deadline defers instead of waiting.
    #[test]
    fn decisions_keep_their_promises() {
        let mut rng = StdRng::seed_from_u64(20261202);
        for case in 0..20_000 {
            let p = policy(&mut rng);
            let f = failure(&mut rng);
            let attempt = rng.gen_range(0..8);
            let remaining = Duration::from_millis(rng.gen_range(0..300_000));
            let budget = rng.gen_bool(0.9);
            let d = p.decide(f, attempt, remaining, budget);
            match d {
                Decision::Retry { wait, told } => {
                    assert!(f.retryable, "case {case}: {d:?}");
                    assert!(wait < remaining, "case {case}: {d:?} past the deadline");
                    assert!(attempt < p.max_retries && budget, "case {case}: {d:?}");
                    assert_eq!(told, f.retry_after.is_some(), "case {case}");
                    if let Some(asked) = f.retry_after {
                        assert!(wait >= asked, "case {case}: {d:?} before Retry-After");
                        assert!(wait <= asked + Duration::from_secs(1), "case {case}: {d:?}");
                    }
                }
                Decision::Defer { wait } => {
                    let asked = f.retry_after.expect("only Retry-After defers");
                    assert!(
                        f.retryable && wait >= asked && wait >= remaining,
                        "case {case}"
                    );
                }
                Decision::GiveUp => {
                    let told_past = f.retry_after.is_some_and(|a| a >= remaining);
                    assert!(
                        !f.retryable
                            || (!told_past
                                && (attempt >= p.max_retries
                                    || !budget
                                    || p.backoff.ceiling(attempt) >= remaining
                                    || f.retry_after.is_some_and(|a| {
                                        a + Duration::from_secs(1) >= remaining
                                    }))),
                        "case {case}: gave up on {f:?} attempt {attempt} remaining {remaining:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn rescheduling_obeys_retry_after_and_backs_off_otherwise() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            let p = policy(&mut rng);
            let failures = rng.gen_range(0..20);
            let asked = Duration::from_millis(rng.gen_range(0..400_000));
            let rescheduled = p.reschedule(failures, Some(asked));
            assert!(rescheduled >= asked);
            assert!(
                rescheduled <= (asked + Duration::from_secs(1)).max(p.backoff.ceiling(failures))
            );
            let backoff = p.reschedule(failures, None);
            assert!(backoff <= p.backoff.delay(64).max(Duration::from_secs(3600)));
            assert!(!backoff.is_zero());
        }
    }
}
