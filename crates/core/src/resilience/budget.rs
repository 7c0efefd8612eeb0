//! Retry budget (after tower's): retries are paid from a balance that successes refill, plus a
//! small steady allowance, so a failing dependency cannot turn every call into several.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RetryBudget {
    balance: f64,
    max: f64,
    per_success: f64,
    per_second: f64,
    last_refill: Instant,
}

impl RetryBudget {
    /// `per_success` retries earned per successful call, `per_second` earned with time,
    /// at most ten seconds' worth plus ten retries banked.
    pub fn new(per_success: f64, per_second: u32, now: Instant) -> Self {
        let per_second = f64::from(per_second);
        let max = 10.0 + per_second * 10.0;
        Self {
            balance: max,
            max,
            per_success,
            per_second,
            last_refill: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill);
        self.balance = (self.balance + elapsed.as_secs_f64() * self.per_second).min(self.max);
        self.last_refill = now;
    }

    pub fn deposit(&mut self, now: Instant) {
        self.refill(now);
        self.balance = (self.balance + self.per_success).min(self.max);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.balance >= 1.0 {
            self.balance -= 1.0;
            true
        } else {
            false
        }
    }

    /// Nothing to earn: a deposit now or later changes nothing (time refills it no further).
    pub fn is_full(&self) -> bool {
        self.balance >= self.max
    }

    pub fn balance(&self) -> f64 {
        self.balance
    }
}

/// How long until a budget with `per_second` refill has one retry again (for messages).
pub fn refill_time(per_second: u32) -> Duration {
    if per_second == 0 {
        Duration::from_secs(60)
    } else {
        Duration::from_secs_f64(1.0 / f64::from(per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_then_earned_back() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.5, 0, t0);
        let granted = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(granted, 10, "only the banked retries");
        assert!(!b.withdraw(t0));
        b.deposit(t0);
        assert!(!b.withdraw(t0), "half a retry per success");
        b.deposit(t0);
        assert!(b.withdraw(t0));
    }

    #[test]
    fn time_refills_at_the_steady_rate() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(0.0, 2, t0);
        while b.withdraw(t0) {}
        let later = t0 + Duration::from_millis(1500);
        assert!(b.withdraw(later));
        assert!(b.withdraw(later));
        assert!(b.withdraw(later));
        assert!(!b.withdraw(later), "1.5 s at 2/s is 3 retries");
    }
}
