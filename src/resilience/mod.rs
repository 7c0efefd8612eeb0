//! Small, pure resilience pieces with no knowledge of Graph: `Retry-After` parsing and the
//! backoff schedule.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod guard;
pub mod limits;
pub mod retry_after;
