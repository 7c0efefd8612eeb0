//! Logging: `RUST_LOG` wins over `log.level`; pretty or JSON by `log.format`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

pub fn init(settings: &LogSettings) {
    // RUST_LOG wins, but only if it is a filter that still shows calsync's lines: a word
    // EnvFilter takes for a target (`warning`) would silently turn every line off.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| match crate::config::validate_log_filter(&v) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("calsync: RUST_LOG ignored, using log.level instead: {e}");
                None
            }
        });
    let directives = from_env.as_deref().unwrap_or(&settings.level);
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    // A second init (tests, or a command that already set one) keeps the first subscriber.
    drop(result);
}

/// Puts the ids of the latest Graph response on the current `sync_job` span, so every line the
/// job logs from here on carries them (Graph support asks for both).
pub fn record_request_ids(request_id: Option<&str>, client_request_id: &str) {
    let span = tracing::Span::current();
    span.record("request_id", request_id.unwrap_or("-"));
    span.record("client_request_id", client_request_id);
}
