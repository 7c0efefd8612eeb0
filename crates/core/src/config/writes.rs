//! `[writes]`: how appointments the application books are written into Outlook (two-way sync).
//! Whether a tenant may be written to at all is the tenant's own `writes = true`.

use std::time::Duration;

use serde::Deserialize;

use super::{bounded, lenient_number, ConfigError, HumanDuration, DAY};

/// Largest `writes.max_body_bytes` accepted: an appointment is a few kilobytes.
const MAX_BODY_CAP: u64 = 1024 * 1024;

/// What happens when the event was changed in Outlook since calsync last wrote or saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The application's update is written over the Outlook change; the write is delivered and
    /// notes the conflict.
    ApplicationWins,
    /// The Outlook change stays; the write is not sent and is reported as `conflict`.
    OutlookWins,
}

impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApplicationWins => "application_wins",
            Self::OutlookWins => "outlook_wins",
        }
    }
}

#[derive(Clone, Debug)]
pub struct WriteSettings {
    pub conflict_policy: ConflictPolicy,
    /// A write request's body is refused (413) above this size.
    pub max_body_bytes: usize,
    /// Queued writes one sync job delivers before its delta round; the rest wait for the
    /// mailbox's next job, which is due at once.
    pub per_job: u32,
    /// Ended writes (delivered, failed, conflict) are deleted this long after they ended.
    pub retention: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWrites {
    conflict_policy: ConflictPolicy,
    #[serde(deserialize_with = "lenient_number")]
    max_body_bytes: u64,
    #[serde(deserialize_with = "lenient_number")]
    per_job: u64,
    retention: HumanDuration,
}

impl Default for RawWrites {
    fn default() -> Self {
        Self {
            conflict_policy: ConflictPolicy::OutlookWins,
            max_body_bytes: 32 * 1024,
            per_job: 50,
            retention: HumanDuration(Duration::from_secs(30 * 86_400)),
        }
    }
}

impl RawWrites {
    pub(super) fn validate(self) -> Result<WriteSettings, ConfigError> {
        if !(1024..=MAX_BODY_CAP).contains(&self.max_body_bytes) {
            return Err(ConfigError::new(
                "writes.max_body_bytes",
                format!(
                    "must be from 1024 to {MAX_BODY_CAP}, got {}",
                    self.max_body_bytes
                ),
            ));
        }
        if !(1..=1000).contains(&self.per_job) {
            return Err(ConfigError::new(
                "writes.per_job",
                format!("must be from 1 to 1000, got {}", self.per_job),
            ));
        }
        Ok(WriteSettings {
            conflict_policy: self.conflict_policy,
            max_body_bytes: self.max_body_bytes as usize,
            per_job: self.per_job as u32,
            retention: bounded("writes.retention", self.retention, 3650 * DAY)?,
        })
    }
}
