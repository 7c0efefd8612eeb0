//! One integration-test binary (one link step) with a module per subject.

mod admin_api;
mod certificate;
mod config;
mod deadline;
mod e2e;
mod edges;
mod faults;
mod fleet;
mod foreign_links;
mod health;
mod helpers;
mod malformed;
mod notifications;
mod observability;
mod page_loops;
mod raw_graph;
mod recurring;
mod replicas;
mod resync;
mod sim;
mod status_page;
mod store_suite;
mod sync_rounds;
mod token_codes;
mod token_errors;
mod token_refresh;
