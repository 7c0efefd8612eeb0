//! The calsync lab: the demo, the outage drill, the benchmarks and the change-to-stored latency
//! measurement, each running the service (`calsync-core`) against the Graph simulator
//! (`calsync-sim`). Not part of the production build.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bookings;
pub mod console;
pub mod demo;
pub mod drill;
pub mod instructions;
pub mod latency;
