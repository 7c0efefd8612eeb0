//! Classifying token-endpoint failures as permanent or transient, from the HTTP status and the
//! identity platform's `error` / `error_codes` (never from the human-readable description).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::AuthError;
use crate::resilience::retry_after;

/// AADSTS codes that no retry will fix: wrong secret (7000215), expired secret (7000222), app
/// not found in the tenant (700016), tenant not found (90002), bad scope (70011), client
/// assertion signature invalid (700027) or outside its validity time (700024).
const PERMANENT_CODES: [u64; 7] = [7000215, 7000222, 700016, 90002, 70011, 700027, 700024];

/// The identity platform's error body. Unknown fields are ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityError {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub error_codes: Vec<u64>,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.error, self.error_codes)
    }
}

impl oauth2::ErrorResponse for IdentityError {}

impl IdentityError {
    pub(super) fn into_auth_error(self, retry_after: Option<Duration>) -> AuthError {
        let transient_error = matches!(
            self.error.as_str(),
            "temporarily_unavailable" | "server_error" | "slow_down"
        );
        let permanent_code = self.error_codes.iter().any(|c| PERMANENT_CODES.contains(c));
        if transient_error && !permanent_code {
            return AuthError::Transient {
                reason: format!("{} {:?}", self.error, self.error_codes),
                retry_after,
            };
        }
        // The first line of the description carries the AADSTS code and a reason; the rest is
        // trace ids and timestamps already kept apart.
        let description = self
            .error_description
            .as_deref()
            .and_then(|d| d.lines().next())
            .map(|d| d.chars().take(200).collect());
        AuthError::Permanent {
            error: self.error,
            codes: self.error_codes,
            description,
            trace_id: self.trace_id,
        }
    }
}

/// A non-200 answer from the token endpoint.
pub fn classify_token_failure(
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> AuthError {
    let retry_after = retry_after::from_headers(headers, now);
    if status == 429 || status >= 500 {
        let detail = serde_json::from_slice::<IdentityError>(body)
            .map(|e| format!(" ({} {:?})", e.error, e.error_codes))
            .unwrap_or_default();
        return AuthError::Transient {
            reason: format!("token endpoint answered HTTP {status}{detail}"),
            retry_after,
        };
    }
    match serde_json::from_slice::<IdentityError>(body) {
        Ok(error) => error.into_auth_error(retry_after),
        // A 4xx without the identity platform's JSON is a proxy or a misconfigured authority,
        // not an answer about our credentials: worth another try later.
        Err(_) => AuthError::Transient {
            reason: format!(
                "token endpoint answered HTTP {status} without an error body: {}",
                crate::net::excerpt(body)
            ),
            retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthFailureClass;

    fn classify(status: u16, body: &str) -> AuthError {
        classify_token_failure(
            status,
            &http::HeaderMap::new(),
            body.as_bytes(),
            SystemTime::now(),
        )
    }

    fn body(error: &str, code: u64) -> String {
        serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{code}: something.\r\nTrace ID: x"),
            "error_codes": [code],
            "trace_id": "t-1",
        })
        .to_string()
    }

    #[test]
    fn credential_and_tenant_errors_are_permanent() {
        for (status, error, code) in [
            (401, "invalid_client", 7000215),
            (401, "invalid_client", 7000222),
            (400, "unauthorized_client", 700016),
            (400, "invalid_request", 90002),
            (400, "invalid_scope", 70011),
        ] {
            let e = classify(status, &body(error, code));
            assert_eq!(e.class(), AuthFailureClass::Permanent, "{error} {code}");
            assert!(e.to_string().contains(&code.to_string()));
            assert!(
                !e.to_string().contains("Trace ID"),
                "only the first line is kept"
            );
        }
    }

    #[test]
    fn outages_are_transient() {
        let e = classify(400, &body("temporarily_unavailable", 50001));
        assert_eq!(e.class(), AuthFailureClass::Transient);
        for status in [500, 502, 503, 504, 429] {
            assert_eq!(
                classify(status, "<html>").class(),
                AuthFailureClass::Transient
            );
        }
    }

    #[test]
    fn retry_after_on_429_is_kept() {
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", http::HeaderValue::from_static("7"));
        let e = classify_token_failure(429, &headers, b"", SystemTime::now());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }
}
