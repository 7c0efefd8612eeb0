//! calsync: a dedicated Office 365 calendar-sync worker service over Microsoft Graph.
//!
//! The service lives in `calsync-core` (re-exported here), the Graph simulator in `calsync-sim`
//! and the demo, drill and benchmarks in `calsync-lab`; the last two only with the default `lab`
//! feature, which the production build leaves out.
#![forbid(unsafe_code)]

pub use calsync_core::*;

#[cfg(feature = "lab")]
pub use calsync_lab::{bench, console, demo, drill, instructions, latency};
#[cfg(feature = "lab")]
pub use calsync_sim as sim;
