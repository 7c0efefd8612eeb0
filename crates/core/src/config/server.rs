//! `[server]`: the two HTTP listeners and what bounds them.
//!
//! The internal listener (`listen`) serves health, metrics, the status page and the admin API;
//! the public one (`public_listen`) only the change-notification endpoints, and is bound only
//! when `notifications.public_url` is set. Both close connections that send their headers too
//! slowly, sit idle or take too long, and take at most `max_connections` at once.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{bounded, in_range, lenient_number, ConfigError, HumanDuration};

#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Internal: health, metrics, status page, admin API.
    pub listen: SocketAddr,
    /// Internet-facing: `/notifications` and `/notifications/lifecycle` only.
    pub public_listen: SocketAddr,
    /// Longest wait for in-flight HTTP requests at shutdown; then their connections are closed.
    pub shutdown_grace: Duration,
    /// A request's headers must have arrived this long after the connection became ready for
    /// them (a new or idle keep-alive connection included).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
    /// Longest time to read a request's body and produce the answer (internal listener).
    pub request_timeout: Duration,
    /// The same for the public listener (Graph wants an answer within 3 s).
    pub public_request_timeout: Duration,
    /// Connections served at once on the internal listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections served at once on the public listener.
    pub public_max_connections: usize,
    /// Connections one source may hold open on the public listener (0: no cap).
    pub public_max_connections_per_source: usize,
    /// Requests per second one source may make on the public listener, with a burst of as many
    /// (0: no limit). A source is an IPv4 address or an IPv6 /64.
    pub public_requests_per_source_per_second: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: String,
    public_listen: String,
    shutdown_grace: HumanDuration,
    header_read_timeout: HumanDuration,
    idle_timeout: HumanDuration,
    request_timeout: HumanDuration,
    public_request_timeout: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    max_connections: u64,
    #[serde(deserialize_with = "lenient_number")]
    public_max_connections: u64,
    #[serde(deserialize_with = "lenient_number")]
    public_max_connections_per_source: u64,
    #[serde(deserialize_with = "lenient_number")]
    public_requests_per_source_per_second: u64,
}

const HOUR: Duration = Duration::from_secs(3600);

fn address(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("`{text}` is not an address:port such as 0.0.0.0:8080"),
        )
    })
}

impl RawServer {
    pub(super) fn validate(self) -> Result<ServerSettings, ConfigError> {
        let listen = address("server.listen", &self.listen)?;
        let public_listen = address("server.public_listen", &self.public_listen)?;
        if listen == public_listen && listen.port() != 0 {
            return Err(ConfigError::new(
                "server.public_listen",
                format!(
                    "must differ from server.listen ({listen}): the public listener serves only \
                     the notification endpoints"
                ),
            ));
        }
        let max_connections = in_range("server.max_connections", self.max_connections, 1, 65_536)?;
        let public_max_connections = in_range(
            "server.public_max_connections",
            self.public_max_connections,
            1,
            65_536,
        )?;
        Ok(ServerSettings {
            listen,
            public_listen,
            shutdown_grace: bounded("server.shutdown_grace", self.shutdown_grace, HOUR)?,
            header_read_timeout: bounded(
                "server.header_read_timeout",
                self.header_read_timeout,
                Duration::from_secs(300),
            )?,
            idle_timeout: bounded("server.idle_timeout", self.idle_timeout, HOUR)?,
            request_timeout: bounded("server.request_timeout", self.request_timeout, HOUR)?,
            public_request_timeout: bounded(
                "server.public_request_timeout",
                self.public_request_timeout,
                Duration::from_secs(300),
            )?,
            max_connections,
            public_max_connections,
            public_max_connections_per_source: in_range(
                "server.public_max_connections_per_source",
                self.public_max_connections_per_source,
                0,
                public_max_connections as u64,
            )?,
            public_requests_per_source_per_second: in_range(
                "server.public_requests_per_source_per_second",
                self.public_requests_per_source_per_second,
                0,
                1_000_000,
            )?,
        })
    }
}
