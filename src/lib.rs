//! calsync: a dedicated Office 365 calendar-sync worker service over Microsoft Graph.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod bench;
pub mod config;
pub mod console;
pub mod demo;
pub mod drill;
pub mod graph;
pub mod http;
pub mod metrics;
pub mod net;
pub mod notifications;
pub mod resilience;
pub mod scheduler;
pub mod sim;
pub mod store;
pub mod sync;
pub mod telemetry;

/// An error and its causes on one line, `outer: cause: root cause`, for logs and stored errors.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
