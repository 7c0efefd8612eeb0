//! The backoff schedule. The `backoff` crate is unmaintained (RUSTSEC-2025-0012); it is used
//! only here, so replacing it touches this one file.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("initial backoff must be longer than 0")]
    ZeroInitial,
    #[error("maximum backoff ({max:?}) must not be shorter than the initial one ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
}

/// Exponential backoff with full-range jitter: attempt n waits a random time in
/// [base·2ⁿ·(1−r), base·2ⁿ·(1+r)], capped at `max`.
#[derive(Clone, Copy, Debug)]
pub struct BackoffSchedule {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    randomization: f64,
}

impl BackoffSchedule {
    pub fn new(initial: Duration, max: Duration) -> Result<Self, ScheduleError> {
        if initial.is_zero() {
            return Err(ScheduleError::ZeroInitial);
        }
        if max < initial {
            return Err(ScheduleError::MaxBelowInitial { initial, max });
        }
        Ok(Self {
            initial,
            max,
            multiplier: 2.0,
            randomization: 0.5,
        })
    }

    /// The longest [`delay`](Self::delay) can be for `attempt`: its base plus the jitter,
    /// capped at the maximum.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempt.min(64) as i32);
        let top = base * (1.0 + self.randomization);
        Duration::try_from_secs_f64(top)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The wait before retry number `attempt` (0 = the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let mut backoff = ExponentialBackoff {
            current_interval: self.initial,
            initial_interval: self.initial,
            randomization_factor: self.randomization,
            multiplier: self.multiplier,
            max_interval: self.max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let mut delay = self.initial;
        for _ in 0..=attempt.min(64) {
            delay = backoff.next_backoff().unwrap_or(self.max);
        }
        delay.min(self.max)
    }

    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_bounds() {
        assert_eq!(
            BackoffSchedule::new(Duration::ZERO, Duration::from_secs(1)).unwrap_err(),
            ScheduleError::ZeroInitial
        );
        assert!(BackoffSchedule::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn grows_within_jitter_bounds_and_caps() {
        let s =
            BackoffSchedule::new(Duration::from_secs(1), Duration::from_secs(60)).expect("valid");
        for attempt in 0..20u32 {
            for _ in 0..50 {
                let d = s.delay(attempt);
                let base = 2f64.powi(attempt as i32).min(60.0);
                assert!(
                    d <= Duration::from_secs(60),
                    "attempt {attempt}: {d:?} over cap"
                );
                assert!(
                    d.as_secs_f64() >= (base * 0.5).min(60.0 * 0.5) - 1e-9,
                    "attempt {attempt}: {d:?} under the jitter floor"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let s =
            BackoffSchedule::new(Duration::from_secs(10), Duration::from_secs(600)).expect("valid");
        let distinct: std::collections::HashSet<_> =
            (0..20).map(|_| s.delay(3).as_millis()).collect();
        assert!(
            distinct.len() > 5,
            "jitter must spread retries: {distinct:?}"
        );
    }
}
