//! One integration-test binary (one link step) with a module per subject.

mod certificate;
mod config;
mod deadline;
mod foreign_links;
mod health;
mod helpers;
mod malformed;
mod page_loops;
mod raw_graph;
mod resync;
mod sim;
mod sync_rounds;
mod token_errors;
mod token_refresh;
