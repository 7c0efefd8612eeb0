//! calsync, the service: a dedicated Office 365 calendar-sync worker over Microsoft Graph. This
//! crate is what production runs; the simulator and the lab are crates of their own.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod credential;
pub mod graph;
pub mod health;
pub mod http;
pub mod metrics;
pub mod net;
pub mod notifications;
pub mod resilience;
pub mod scheduler;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tenants;

/// Lower-case hex of `bytes` (digests shown as text: ids, signatures, keys).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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
