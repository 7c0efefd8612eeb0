//! Classifying token-endpoint failures as permanent or transient, from the HTTP status and the
//! identity platform's `error` / `error_codes` (never from the human-readable description).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{AuthError, AuthFailureClass};
use crate::resilience::retry_after;

/// What a row of [`TABLE`] matches in the identity platform's error body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Matcher {
    /// An AADSTS number in `error_codes`.
    Code(u64),
    /// The OAuth `error` string, for a body that carries no `error_codes`.
    Error(&'static str),
}

/// One row of GRAPH.md's token-endpoint lists.
#[derive(Clone, Copy, Debug)]
struct Rule {
    matcher: Matcher,
    class: AuthFailureClass,
    /// Microsoft's name or meaning, for the reader (sources: `fixtures/identity/README.md`).
    meaning: &'static str,
}

const fn rule(matcher: Matcher, class: AuthFailureClass, meaning: &'static str) -> Rule {
    Rule {
        matcher,
        class,
        meaning,
    }
}

use AuthFailureClass::{Permanent, Transient};
use Matcher::{Code, Error};

/// How a token-endpoint answer that is not 429/5xx is classified. The AADSTS codes decide when
/// the body has any: a transient code wins over everything (Microsoft calls these transient
/// whatever `error` they come with), then a permanent one. A code in neither list is not proof
/// of a permanent fault: it counts as transient (the breaker's doubling break), and only the
/// listed permanent codes get `breaker_permanent_break`. A body without codes is classified by
/// its `error`, unknown ones as transient.
const TABLE: &[Rule] = &[
    rule(
        Code(90024),
        Transient,
        "RequestBudgetExceededError: a transient error, try again",
    ),
    rule(
        Code(90033),
        Transient,
        "MsodsServiceUnavailable: the directory service is unavailable",
    ),
    rule(Code(7000215), Permanent, "invalid client secret"),
    rule(
        Code(7000216),
        Permanent,
        "no client secret and no client assertion was sent",
    ),
    rule(
        Code(7000222),
        Permanent,
        "InvalidClientSecretExpiredKeysProvided: the secret expired",
    ),
    rule(
        Code(700016),
        Permanent,
        "UnauthorizedClient_DoesNotMatchRequest: app not in the tenant",
    ),
    rule(
        Code(90002),
        Permanent,
        "InvalidTenantName: tenant not found",
    ),
    rule(Code(70011), Permanent, "InvalidScope: the scope is invalid"),
    rule(
        Code(700027),
        Permanent,
        "client assertion failed signature validation",
    ),
    rule(
        Code(700024),
        Permanent,
        "client assertion is not within its valid time range",
    ),
    rule(
        Error("invalid_client"),
        Permanent,
        "client authentication failed",
    ),
    rule(
        Error("unauthorized_client"),
        Permanent,
        "client not authorized for this grant",
    ),
    rule(
        Error("invalid_request"),
        Permanent,
        "protocol error, such as a missing parameter",
    ),
    rule(
        Error("temporarily_unavailable"),
        Transient,
        "the server is temporarily too busy",
    ),
    rule(Error("server_error"), Transient, "the server failed"),
    rule(
        Error("slow_down"),
        Transient,
        "the client is asked to slow down",
    ),
];

/// The row that decides `error`, if any (`None`: unknown, treated as transient).
fn rule_for(error: &IdentityError) -> Option<&'static Rule> {
    let by_code = |class: AuthFailureClass| {
        TABLE.iter().find(|r| {
            r.class == class && matches!(r.matcher, Code(code) if error.error_codes.contains(&code))
        })
    };
    if !error.error_codes.is_empty() {
        return by_code(Transient).or_else(|| by_code(Permanent));
    }
    TABLE
        .iter()
        .find(|r| matches!(r.matcher, Error(name) if name == error.error))
}

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
        // The first line of the description carries the AADSTS code and a reason; the rest is
        // trace ids and timestamps already kept apart.
        let description: Option<String> = self
            .error_description
            .as_deref()
            .and_then(|d| d.lines().next())
            .map(|d| d.chars().take(200).collect());
        match rule_for(&self) {
            Some(Rule {
                class: Permanent, ..
            }) => AuthError::Permanent {
                error: self.error,
                codes: self.error_codes,
                description,
                trace_id: self.trace_id,
            },
            Some(Rule {
                class: Transient,
                meaning,
                ..
            }) => AuthError::Transient {
                reason: format!("{} {:?} ({meaning})", self.error, self.error_codes),
                retry_after,
            },
            // Said in full: an operator has to look this code up.
            None => AuthError::Transient {
                reason: format!(
                    "{} {:?}, not a code known to be permanent{}",
                    self.error,
                    self.error_codes,
                    description.map(|d| format!(": {d}")).unwrap_or_default()
                ),
                retry_after,
            },
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
            (401, "invalid_client", 7000216),
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

    fn with_codes(error: &str, codes: &[u64]) -> String {
        serde_json::json!({"error": error, "error_codes": codes, "error_description": "AADSTS0: x"})
            .to_string()
    }

    #[test]
    fn a_transient_code_wins_whatever_error_it_comes_with() {
        for error in ["invalid_request", "invalid_client", "unauthorized_client"] {
            for code in [90024, 90033] {
                let e = classify(400, &with_codes(error, &[code]));
                assert_eq!(e.class(), AuthFailureClass::Transient, "{error} {code}");
            }
        }
        let both = classify(401, &with_codes("invalid_client", &[7000215, 90033]));
        assert_eq!(both.class(), AuthFailureClass::Transient);
    }

    #[test]
    fn a_permanent_code_wins_over_a_transient_error_name() {
        let e = classify(400, &with_codes("temporarily_unavailable", &[7000222]));
        assert_eq!(e.class(), AuthFailureClass::Permanent);
    }

    #[test]
    fn an_unknown_code_is_transient_and_named_with_its_description() {
        let body = serde_json::json!({
            "error": "invalid_request",
            "error_codes": [9_999_999],
            "error_description": "AADSTS9999999: Something new.\r\nTrace ID: t",
        })
        .to_string();
        let e = classify(400, &body);
        assert_eq!(e.class(), AuthFailureClass::Transient);
        let text = e.to_string();
        assert!(
            text.contains("9999999") && text.contains("Something new."),
            "{text}"
        );
        assert!(!text.contains("Trace ID"), "{text}");
    }

    #[test]
    fn without_codes_the_error_name_decides() {
        let no_codes = |error: &str| serde_json::json!({ "error": error }).to_string();
        for error in ["invalid_client", "unauthorized_client", "invalid_request"] {
            assert_eq!(
                classify(400, &no_codes(error)).class(),
                AuthFailureClass::Permanent
            );
        }
        for error in [
            "temporarily_unavailable",
            "server_error",
            "slow_down",
            "invalid_grant",
        ] {
            assert_eq!(
                classify(400, &no_codes(error)).class(),
                AuthFailureClass::Transient
            );
        }
    }

    #[test]
    fn the_table_names_each_code_and_error_once() {
        let mut seen = std::collections::HashSet::new();
        for r in TABLE {
            assert!(seen.insert(r.matcher), "{:?} is listed twice", r.matcher);
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
