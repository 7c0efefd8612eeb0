//! A tenant is one value: its token provider (with the token endpoint's breaker), its Graph
//! breaker, request rate, retry budget and running jobs. The scheduler, the subscription keeper
//! and health ask a [`Tenant`] instead of keeping parallel maps keyed by its name.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;

use crate::auth::TokenProvider;
use crate::config::Settings;
use crate::resilience::breaker::BreakerState;
use crate::resilience::guard::BreakerSnapshot;
use crate::resilience::limits::{RateLimits, Share};
use crate::resilience::TenantGuard;

pub struct Tenant {
    pub name: String,
    /// Access tokens, cached and refreshed, behind the token endpoint's breaker.
    pub tokens: Arc<TokenProvider>,
    /// The Graph breaker, the tenant's request rate, its retry budget, its running jobs.
    pub guard: Arc<TenantGuard>,
    /// The application may write events into this tenant's calendars (`tenants[].writes`).
    pub writes: bool,
}

impl Tenant {
    /// Both breakers, token endpoint first.
    pub fn breakers(&self) -> Vec<BreakerSnapshot> {
        vec![self.tokens.breaker(), self.guard.graph.snapshot()]
    }

    /// Both breakers closed: calls of the tenant go out freely.
    pub fn available(&self) -> bool {
        self.breakers()
            .iter()
            .all(|b| b.state == BreakerState::Closed)
    }

    /// How many of the tenant's jobs may start now, at most `cap` running: none while a breaker
    /// is open (they wait without a slot), one probe while one is half-open.
    pub fn allowance(&self, cap: usize) -> usize {
        if self.guard.graph.would_allow().is_err() || self.tokens.endpoint_available().is_err() {
            return 0;
        }
        let free = cap.saturating_sub(self.guard.running());
        let probing = self.guard.graph.state() != BreakerState::Closed
            || self.tokens.breaker().state != BreakerState::Closed;
        if probing {
            free.min(1)
        } else {
            free
        }
    }
}

/// Every configured tenant, by name, and the rate limits they share (per mailbox, per app).
pub struct Tenants {
    by_name: BTreeMap<String, Arc<Tenant>>,
    limits: RateLimits,
}

impl Tenants {
    /// The configured tenants; `token_http` is the token endpoint's HTTP client.
    pub fn build(settings: &Settings, token_http: reqwest::Client) -> anyhow::Result<Self> {
        let limits = RateLimits::new(&settings.resilience);
        let mut by_name = BTreeMap::new();
        for tenant in &settings.tenants {
            let tokens = TokenProvider::new(
                tenant,
                &settings.graph,
                &settings.resilience,
                token_http.clone(),
            )
            .with_context(|| format!("tenant `{}`: bad token endpoint URL", tenant.name))?;
            let guard = TenantGuard::new(&tenant.name, &settings.resilience, &limits);
            by_name.insert(
                tenant.name.clone(),
                Arc::new(Tenant {
                    name: tenant.name.clone(),
                    tokens: Arc::new(tokens),
                    guard: Arc::new(guard),
                    writes: tenant.writes,
                }),
            );
        }
        Ok(Self { by_name, limits })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name)
    }

    /// By name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_name.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The per-mailbox and app-wide request rates.
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Sizes the app-wide rate and every tenant's rate for this replica's `share` of them.
    pub fn set_share(&self, share: Share) {
        self.limits.set_share(share);
        for tenant in self.by_name.values() {
            tenant.guard.rate.resize(share);
        }
    }
}

impl std::ops::Index<&str> for Tenants {
    type Output = Tenant;

    /// The tenant called `name`; panics if there is none (for tests and known names).
    fn index(&self, name: &str) -> &Tenant {
        match self.by_name.get(name) {
            Some(tenant) => tenant,
            None => panic!("no tenant `{name}` is configured"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::limits::Refused;

    const TWO_TENANTS: &str = r#"
[resilience]
tenant_requests_per_second = 100
app_requests_per_second = 1000
[[tenants]]
name = "a"
tenant_id = "11111111-2222-3333-4444-555555555555"
client_id = "app"
client_secret = "not-a-real-secret"
[[tenants]]
name = "b"
tenant_id = "66666666-2222-3333-4444-555555555555"
client_id = "app"
client_secret = "not-a-real-secret"
"#;

    #[tokio::test]
    async fn a_share_resizes_the_app_rate_and_every_tenants_rate() {
        let settings = Settings::from_toml_str(TWO_TENANTS).expect("valid");
        let tenants = Tenants::build(&settings, reqwest::Client::new()).expect("builds");
        for t in tenants.iter() {
            assert!(t.guard.rate.check().is_ok(), "whole rate: a permit at once");
        }
        tenants.set_share(Share::Nothing);
        for t in tenants.iter() {
            assert!(
                t.guard.rate.check().is_err(),
                "{}: no share, no permit",
                t.name
            );
        }
        assert_eq!(tenants.limits().status().app_requests_per_second, 0.0);
        tenants.set_share(Share::of(4));
        let status = tenants.limits().status();
        assert_eq!(status.app_requests_per_second, 250.0);
        assert_eq!(status.tenant_requests_per_second, 25.0);
        for t in tenants.iter() {
            // 25 a second: the resized rate starts empty, its first permit 1/24 s away.
            let Err(Refused::Wait(wait)) = t.guard.rate.check() else {
                panic!("{}: the resized rate starts empty", t.name);
            };
            assert!(
                wait > std::time::Duration::from_millis(30),
                "{}: {wait:?}",
                t.name
            );
        }
    }
}
