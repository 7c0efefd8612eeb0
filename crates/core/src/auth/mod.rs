//! Access tokens for Microsoft Graph through the OAuth2 client-credentials grant, one
//! [`TokenProvider`] per tenant: a cache refreshed at half-life, single-flight refreshes, and
//! the `ext_expires_in` grace while the token endpoint is failing transiently.

mod classify;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, ExtraTokenFields, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

pub use crate::credential::{CertificateError, ClientCertificate};
pub use classify::{classify_token_failure, IdentityError};

use crate::config::{Credential, GraphSettings, ResilienceSettings, TenantSettings};
use crate::net;
use crate::resilience::breaker::CallOutcome;
use crate::resilience::guard::{BreakerSnapshot, Dependency, GuardedBreaker};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Largest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailureClass {
    Permanent,
    Transient,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong or expired secret, app not in tenant, unknown tenant, bad scope: retrying will not help.
    #[error("token endpoint rejected the app permanently: {error} (codes {codes:?}){}", describe(.description, .trace_id))]
    Permanent {
        error: String,
        codes: Vec<u64>,
        description: Option<String>,
        trace_id: Option<String>,
    },
    /// 5xx, 429, `temporarily_unavailable`, timeouts, resets: worth retrying later.
    #[error("token endpoint failed transiently: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The tenant's token-endpoint breaker is open: no request was sent.
    #[error("token endpoint circuit is open{}; next probe in {}s{}", if *.permanent { " (credentials rejected)" } else { "" }, .retry_after.as_secs(), .last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    BreakerOpen {
        retry_after: Duration,
        permanent: bool,
        last_error: Option<String>,
    },
}

fn describe(description: &Option<String>, trace_id: &Option<String>) -> String {
    let mut out = String::new();
    if let Some(d) = description {
        out.push_str(": ");
        out.push_str(d);
    }
    if let Some(t) = trace_id {
        out.push_str(" [trace_id ");
        out.push_str(t);
        out.push(']');
    }
    out
}

impl AuthError {
    pub fn class(&self) -> AuthFailureClass {
        match self {
            Self::Permanent { .. }
            | Self::BreakerOpen {
                permanent: true, ..
            } => AuthFailureClass::Permanent,
            Self::Transient { .. } | Self::BreakerOpen { .. } => AuthFailureClass::Transient,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            Self::BreakerOpen { retry_after, .. } => Some(*retry_after),
            Self::Permanent { .. } => None,
        }
    }

    fn breaker_outcome(&self) -> CallOutcome {
        match self.class() {
            AuthFailureClass::Permanent => CallOutcome::Permanent,
            AuthFailureClass::Transient => CallOutcome::Failure,
        }
    }
}

/// A bearer token. `Debug` is redacted; the value is exposed only to build the header.
#[derive(Clone)]
pub struct AccessToken(Arc<SecretString>);

impl AccessToken {
    pub fn bearer_header(&self) -> String {
        format!("Bearer {}", self.0.expose_secret())
    }

    /// `body` without this token in it.
    pub(crate) fn redact_from(&self, body: &[u8]) -> Vec<u8> {
        net::redact(body, self.0.expose_secret())
    }

    fn same_as(&self, other: &AccessToken) -> bool {
        self.0.expose_secret() == other.0.expose_secret()
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken([REDACTED])")
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AzureTokenFields {
    #[serde(default)]
    ext_expires_in: Option<u64>,
}
impl ExtraTokenFields for AzureTokenFields {}

type AzureTokenResponse = StandardTokenResponse<AzureTokenFields, BasicTokenType>;
type IdentityClient = oauth2::Client<
    IdentityError,
    AzureTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

struct CachedToken {
    token: AccessToken,
    expires_at: Instant,
    /// The token may still be used up to here while the endpoint is down (5xx, 429, timeout).
    ext_expires_at: Instant,
    refresh_at: Instant,
}

/// What the provider knows right now, for health output. Never contains the token.
#[derive(Clone, Debug, Serialize)]
pub struct TokenStatus {
    pub cached: bool,
    pub expires_in_secs: Option<u64>,
    pub using_extended_lifetime: bool,
    pub last_error: Option<String>,
}

/// Token providers by tenant name.
pub type TokenProviders = std::collections::HashMap<String, Arc<TokenProvider>>;

pub struct TokenProvider {
    tenant: String,
    client: IdentityClient,
    client_id: String,
    token_url: String,
    credential: Credential,
    scope: String,
    http: reqwest::Client,
    cache: Mutex<Option<CachedToken>>,
    last_error: std::sync::Mutex<Option<String>>,
    breaker: GuardedBreaker,
    slow_call: Duration,
    /// After a failed refresh while the cached token is still usable, ask again this much later.
    refresh_retry: Duration,
}

impl TokenProvider {
    pub fn new(
        tenant: &TenantSettings,
        graph: &GraphSettings,
        resilience: &ResilienceSettings,
        http: reqwest::Client,
    ) -> Result<Self, url::ParseError> {
        let token_url = token_url(&graph.authority, &tenant.tenant_id)?;
        let mut client = oauth2::Client::new(ClientId::new(tenant.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(token_url.clone()))
            .set_auth_type(AuthType::RequestBody);
        if let Credential::Secret(secret) = &tenant.credential {
            client =
                client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
        }
        Ok(Self {
            tenant: tenant.name.clone(),
            client,
            client_id: tenant.client_id.clone(),
            token_url: token_url.to_string(),
            credential: tenant.credential.clone(),
            scope: graph.scope.clone(),
            http,
            cache: Mutex::new(None),
            last_error: std::sync::Mutex::new(None),
            breaker: GuardedBreaker::new(
                &tenant.name,
                Dependency::Token,
                resilience.breaker.clone(),
            ),
            slow_call: resilience.slow_call,
            refresh_retry: resilience.retry_initial,
        })
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// A usable token: the cached one until its refresh time, else a fresh one. Concurrent
    /// callers share one request to the endpoint (the cache lock is held across it).
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some(cached) = cache.as_ref() {
            // `refresh_at` lies past `expires_at` only after a transient refresh failure: then
            // the token is served up to its extended lifetime.
            if now < cached.refresh_at && now < cached.ext_expires_at {
                return Ok(cached.token.clone());
            }
        }
        let call = match self.breaker.reserve() {
            Ok(call) => call,
            Err(rejected) => {
                // The endpoint is known to be down: no request. Serve the cached token while
                // its extended lifetime lasts, and look again when the breaker allows a probe.
                if let Some(cached) = cache.as_mut().filter(|c| now < c.ext_expires_at) {
                    cached.refresh_at = rejected.until.min(cached.ext_expires_at);
                    return Ok(cached.token.clone());
                }
                return Err(AuthError::BreakerOpen {
                    retry_after: rejected.until.saturating_duration_since(now),
                    permanent: self.breaker.snapshot().permanent,
                    last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
                });
            }
        };
        let started = Instant::now();
        let fetched = self.fetch().await;
        crate::metrics::token_request(
            &self.tenant,
            match &fetched {
                Ok(_) => "ok",
                Err(e) => match e.class() {
                    AuthFailureClass::Permanent => "permanent",
                    AuthFailureClass::Transient => "transient",
                },
            },
        );
        call.record(match &fetched {
            Ok(_) if started.elapsed() > self.slow_call => CallOutcome::Failure,
            Ok(_) => CallOutcome::Success,
            Err(e) => e.breaker_outcome(),
        });
        match fetched {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cache = Some(fresh);
                self.set_last_error(None);
                Ok(token)
            }
            Err(error) => {
                self.set_last_error(Some(error.to_string()));
                let now = Instant::now();
                match (cache.as_mut(), error.class()) {
                    (Some(cached), AuthFailureClass::Transient) if now < cached.ext_expires_at => {
                        crate::metrics::token_grace_served(&self.tenant);
                        tracing::warn!(
                            tenant = %self.tenant,
                            error = %error,
                            grace_left_secs = (cached.ext_expires_at - now).as_secs(),
                            "token refresh failed transiently; keeping the cached token"
                        );
                        cached.refresh_at = (now
                            + error.retry_after().unwrap_or(self.refresh_retry))
                        .min(cached.ext_expires_at);
                        Ok(cached.token.clone())
                    }
                    _ => {
                        if error.class() == AuthFailureClass::Permanent {
                            *cache = None;
                        }
                        Err(error)
                    }
                }
            }
        }
    }

    /// Graph said 401 for `token`: drop it so the next [`token`](Self::token) fetches anew.
    /// A token already replaced by a concurrent refresh is left alone.
    pub async fn invalidate(&self, token: &AccessToken) {
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| c.token.same_as(token)) {
            *cache = None;
        }
    }

    pub fn breaker(&self) -> BreakerSnapshot {
        self.breaker.snapshot()
    }

    /// Whether a token request could be made now (false while the breaker is open).
    pub fn endpoint_available(&self) -> Result<(), crate::resilience::breaker::Rejected> {
        self.breaker.would_allow()
    }

    pub async fn status(&self) -> TokenStatus {
        let cache = self.cache.lock().await;
        let now = Instant::now();
        let last_error = self.last_error.lock().map(|e| e.clone()).unwrap_or(None);
        match cache.as_ref() {
            Some(c) => TokenStatus {
                cached: true,
                expires_in_secs: Some(c.expires_at.saturating_duration_since(now).as_secs()),
                using_extended_lifetime: now >= c.expires_at && now < c.ext_expires_at,
                last_error,
            },
            None => TokenStatus {
                cached: false,
                expires_in_secs: None,
                using_extended_lifetime: false,
                last_error,
            },
        }
    }

    fn set_last_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = error;
        }
    }

    async fn fetch(&self) -> Result<CachedToken, AuthError> {
        let started = Instant::now();
        let mut request = self
            .client
            .exchange_client_credentials()
            .add_scope(Scope::new(self.scope.clone()));
        if let Credential::Certificate(cert) = &self.credential {
            let assertion = cert
                .assertion(&self.client_id, &self.token_url, SystemTime::now())
                .map_err(|e| AuthError::Permanent {
                    error: "client_assertion".into(),
                    codes: Vec::new(),
                    description: Some(e.to_string()),
                    trace_id: None,
                })?;
            request = request
                .add_extra_param("client_assertion_type", ASSERTION_TYPE)
                .add_extra_param("client_assertion", assertion);
        }
        let transport = TokenTransport {
            http: self.http.clone(),
            secret: match &self.credential {
                Credential::Secret(secret) => Some(secret),
                Credential::Certificate(_) => None,
            },
        };
        let response = request
            .request_async(&transport)
            .await
            .map_err(|e| token_request_error(&self.tenant, e))?;
        let expires_in = response.expires_in().ok_or_else(|| AuthError::Transient {
            reason: "token response has no expires_in".into(),
            retry_after: None,
        })?;
        let ext_expires_in = response
            .extra_fields()
            .ext_expires_in
            .map(Duration::from_secs)
            .unwrap_or(expires_in)
            .max(expires_in);
        tracing::debug!(tenant = %self.tenant, expires_in = expires_in.as_secs(), "fetched access token");
        Ok(CachedToken {
            token: AccessToken(Arc::new(SecretString::from(
                response.access_token().secret().to_string(),
            ))),
            expires_at: started + expires_in,
            ext_expires_at: started + ext_expires_in,
            // Half-life refresh: a token endpoint outage shorter than half a token lifetime
            // (about 30 minutes for Entra's default hour) is not felt at all.
            refresh_at: started + expires_in / 2,
        })
    }
}

pub fn token_url(authority: &Url, tenant_id: &str) -> Result<Url, url::ParseError> {
    let base = authority.as_str().trim_end_matches('/');
    Url::parse(&format!("{base}/{tenant_id}/oauth2/v2.0/token"))
}

struct TokenTransport<'s> {
    http: reqwest::Client,
    /// Blanked out of error bodies: a proxy that echoes the request must not put the secret
    /// into errors, logs or health output.
    secret: Option<&'s SecretString>,
}

impl<'c> oauth2::AsyncHttpClient<'c> for TokenTransport<'_> {
    type Error = TokenTransportError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, Self::Error>> + Send + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(send_token_request(&self.http, self.secret, request))
    }
}

/// The transport under the oauth2 crate: our deadline-bound client, a size cap, and every
/// non-200 answer classified here, so oauth2 only ever parses a success.
async fn send_token_request(
    http: &reqwest::Client,
    secret: Option<&SecretString>,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, TokenTransportError> {
    let request = reqwest::Request::try_from(request).map_err(|e| {
        TokenTransportError(AuthError::Permanent {
            error: "invalid_request".into(),
            codes: Vec::new(),
            description: Some(format!("could not build the token request: {e}")),
            trace_id: None,
        })
    })?;
    let mut response = http.execute(request).await.map_err(|e| {
        TokenTransportError(AuthError::Transient {
            reason: format!("token endpoint: {}", net::describe_transport(&e)),
            retry_after: None,
        })
    })?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = net::read_body_limited(&mut response, MAX_TOKEN_RESPONSE)
        .await
        .map_err(|e| {
            TokenTransportError(AuthError::Transient {
                reason: e.to_string(),
                retry_after: None,
            })
        })?;
    if status != reqwest::StatusCode::OK {
        let body = match secret {
            Some(secret) => net::redact(&body, secret.expose_secret()),
            None => body,
        };
        return Err(TokenTransportError(classify_token_failure(
            status.as_u16(),
            &headers,
            &body,
            SystemTime::now(),
        )));
    }
    let mut builder = http::Response::builder().status(status);
    for (name, value) in headers.iter() {
        builder = builder.header(name, value);
    }
    builder.body(body).map_err(|e| {
        TokenTransportError(AuthError::Transient {
            reason: format!("bad token response: {e}"),
            retry_after: None,
        })
    })
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TokenTransportError(AuthError);

fn token_request_error(
    tenant: &str,
    error: oauth2::RequestTokenError<TokenTransportError, IdentityError>,
) -> AuthError {
    use oauth2::RequestTokenError as E;
    let error = match error {
        E::Request(TokenTransportError(inner)) => inner,
        E::ServerResponse(body) => body.into_auth_error(None),
        E::Parse(e, _) => AuthError::Transient {
            reason: format!("token response is not valid JSON: {e}"),
            retry_after: None,
        },
        E::Other(message) => AuthError::Transient {
            reason: message,
            retry_after: None,
        },
    };
    tracing::warn!(tenant, error = %error, class = ?error.class(), "token request failed");
    error
}
