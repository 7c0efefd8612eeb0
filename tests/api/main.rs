//! One integration-test binary (one link step) with a module per subject.

mod helpers;
mod sync_rounds;
