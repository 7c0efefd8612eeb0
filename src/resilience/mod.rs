//! Small, pure resilience pieces with no knowledge of Graph: `Retry-After` parsing and the
//! backoff schedule.

pub mod backoff;
pub mod breaker;
pub mod retry_after;
