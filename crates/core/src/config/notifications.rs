//! `[notifications]`: Graph change notifications, off unless `public_url` is set.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::{bounded, http_url, lenient_number, ConfigError, HumanDuration, DAY};

/// The longest an Outlook event subscription may last: 10,080 minutes.
pub const MAX_EVENT_SUBSCRIPTION: Duration = Duration::from_secs(10_080 * 60);
/// Graph's limit on `clientState`.
const CLIENT_STATE_MAX_LEN: usize = 128;
const CLIENT_STATE_MIN_LEN: usize = 16;

#[derive(Clone, Debug)]
pub struct NotificationSettings {
    /// Where Graph reaches calsync: notifications go to `{public_url}/notifications`, lifecycle
    /// events to `{public_url}/notifications/lifecycle`. `None`: notifications are off.
    pub public_url: Option<Url>,
    /// One clientState for every subscription. `None` (preferred): a random one per
    /// subscription, stored with it.
    pub client_state: Option<SecretString>,
    /// Subscriptions are renewed this long before they expire.
    pub renew_before: Duration,
    /// Lifetime asked for when creating or renewing (at most 10,080 minutes for events).
    pub expiration: Duration,
    /// How often the store is checked for subscriptions to create or renew.
    pub check_interval: Duration,
    /// How often Graph's list of the app's subscriptions is compared with the store, to delete
    /// those no row knows (left by a store that was re-created or restored).
    pub reconcile_interval: Duration,
    /// Subscription requests in flight at once.
    pub max_concurrent: usize,
    /// First wait after a failed create or renew; doubles per failure up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl NotificationSettings {
    pub fn enabled(&self) -> bool {
        self.public_url.is_some()
    }

    /// `{public_url}/{path}`.
    pub fn endpoint(&self, path: &str) -> Option<String> {
        self.public_url
            .as_ref()
            .map(|u| format!("{}/{path}", u.as_str().trim_end_matches('/')))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNotifications {
    public_url: Option<String>,
    client_state: Option<SecretString>,
    renew_before: HumanDuration,
    expiration: HumanDuration,
    check_interval: HumanDuration,
    reconcile_interval: HumanDuration,
    #[serde(deserialize_with = "lenient_number")]
    max_concurrent: u64,
    retry_initial: HumanDuration,
    retry_max: HumanDuration,
}

impl Default for RawNotifications {
    fn default() -> Self {
        Self {
            public_url: None,
            client_state: None,
            renew_before: HumanDuration(Duration::from_secs(12 * 3600)),
            expiration: HumanDuration(Duration::from_secs(3 * 86_400)),
            check_interval: HumanDuration(Duration::from_secs(30)),
            reconcile_interval: HumanDuration(Duration::from_secs(6 * 3600)),
            max_concurrent: 4,
            retry_initial: HumanDuration(Duration::from_secs(30)),
            retry_max: HumanDuration(Duration::from_secs(1800)),
        }
    }
}

impl RawNotifications {
    pub(super) fn validate(self) -> Result<NotificationSettings, ConfigError> {
        let public_url = self
            .public_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| http_url("notifications.public_url", u))
            .transpose()?;
        let client_state = match self.client_state {
            Some(state) => {
                let len = state.expose_secret().chars().count();
                if !(CLIENT_STATE_MIN_LEN..=CLIENT_STATE_MAX_LEN).contains(&len) {
                    return Err(ConfigError::new(
                        "notifications.client_state",
                        format!(
                            "must be {CLIENT_STATE_MIN_LEN} to {CLIENT_STATE_MAX_LEN} characters \
                             (or leave it out: a random one per subscription is preferred)"
                        ),
                    ));
                }
                Some(state)
            }
            None => None,
        };
        let renew_before = bounded(
            "notifications.renew_before",
            self.renew_before,
            MAX_EVENT_SUBSCRIPTION,
        )?;
        if self.expiration.0 > MAX_EVENT_SUBSCRIPTION {
            return Err(ConfigError::new(
                "notifications.expiration",
                format!(
                    "must be at most 10080m (7d), Graph's limit for event subscriptions, got {}",
                    self.expiration
                ),
            ));
        }
        let expiration = bounded(
            "notifications.expiration",
            self.expiration,
            MAX_EVENT_SUBSCRIPTION,
        )?;
        if renew_before >= expiration {
            return Err(ConfigError::new(
                "notifications.renew_before",
                format!(
                    "must be shorter than notifications.expiration ({}), got {}",
                    self.expiration, self.renew_before
                ),
            ));
        }
        let retry_initial = bounded("notifications.retry_initial", self.retry_initial, 7 * DAY)?;
        let retry_max = bounded("notifications.retry_max", self.retry_max, 7 * DAY)?;
        if retry_max < retry_initial {
            return Err(ConfigError::new(
                "notifications.retry_max",
                "must not be shorter than notifications.retry_initial",
            ));
        }
        Ok(NotificationSettings {
            public_url,
            client_state,
            renew_before,
            expiration,
            check_interval: bounded("notifications.check_interval", self.check_interval, DAY)?,
            reconcile_interval: bounded(
                "notifications.reconcile_interval",
                self.reconcile_interval,
                7 * DAY,
            )?,
            max_concurrent: super::in_range(
                "notifications.max_concurrent",
                self.max_concurrent,
                1,
                256,
            )?,
            retry_initial,
            retry_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    fn load(section: &str) -> Result<Settings, String> {
        Settings::from_toml_str(&format!("[notifications]\n{section}")).map_err(|e| e.to_string())
    }

    #[test]
    fn off_by_default_and_on_with_a_public_url() {
        let s = Settings::from_toml_str("").expect("defaults load");
        assert!(!s.notifications.enabled());
        let s = load("public_url = \"https://calsync.example.com/hooks/\"").expect("valid");
        assert_eq!(
            s.notifications.endpoint("notifications").as_deref(),
            Some("https://calsync.example.com/hooks/notifications")
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (section, key) in [
            ("public_url = \"http://calsync.example.com\"", "public_url"),
            ("public_url = \"https://x.example.com/?a=b\"", "public_url"),
            ("expiration = \"10081m\"", "expiration"),
            ("renew_before = \"3d\"\nexpiration = \"2d\"", "renew_before"),
            ("client_state = \"short\"", "client_state"),
            ("max_concurrent = 0", "max_concurrent"),
            ("colour = \"blue\"", "colour"),
        ] {
            let e = load(section).expect_err(section);
            assert!(e.contains(key), "{section}: {e}");
        }
        load("public_url = \"http://127.0.0.1:8080\"\nexpiration = \"10080m\"")
            .expect("loopback http and the maximum lifetime are fine");
    }
}
