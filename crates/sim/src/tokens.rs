//! Opaque tokens the simulator hands out: access tokens and delta/skip tokens. Both are
//! base64url JSON with an HMAC under a per-process random key, so a client can neither forge
//! nor edit them, and the server needs no table to answer them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use ring::hmac;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub struct Signer {
    key: hmac::Key,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not well formed")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
}

impl Signer {
    pub fn random() -> Self {
        let rng = ring::rand::SystemRandom::new();
        // Generation failing means the OS has no entropy source; nothing sensible remains.
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| hmac::Key::new(hmac::HMAC_SHA256, uuid::Uuid::new_v4().as_bytes()));
        Self { key }
    }

    fn seal_parts<T: Serialize>(&self, prefix: &str, claims: &T) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signed = format!("{prefix}{body}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn open_parts<T: DeserializeOwned>(&self, prefix: &str, token: &str) -> Result<T, TokenError> {
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let body = signed.strip_prefix(prefix).ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)
    }

    /// Looks like a JWT (header.payload.signature) because real Entra tokens do.
    pub fn seal_access(&self, claims: &AccessClaims) -> String {
        self.seal_parts(ACCESS_PREFIX, claims)
    }

    pub fn open_access(&self, token: &str) -> Result<AccessClaims, TokenError> {
        self.open_parts(ACCESS_PREFIX, token)
    }

    pub fn seal_position(&self, pos: &DeltaPosition) -> String {
        self.seal_parts("", pos)
    }

    pub fn open_position(&self, token: &str) -> Result<DeltaPosition, TokenError> {
        self.open_parts("", token)
    }
}

/// `{"typ":"JWT","alg":"HS256"}` base64url, then a dot.
const ACCESS_PREFIX: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessClaims {
    /// Tenant id (GUID) the token was issued in.
    pub tid: String,
    pub appid: String,
    pub aud: String,
    /// Issue and expiry, Unix milliseconds on the simulator clock.
    pub iat: i64,
    pub exp: i64,
    pub uti: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum LinkKind {
    #[serde(rename = "s")]
    Skip,
    #[serde(rename = "d")]
    Delta,
}

/// Everything a delta or skip token means. Short field names keep links short.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeltaPosition {
    pub k: LinkKind,
    /// Mailbox address, lower-cased: a token is only valid for the mailbox it came from.
    pub m: String,
    /// Window start/end, Unix seconds.
    pub ws: i64,
    pub we: i64,
    /// The round covers changes with sequence in `(s, u]`; for a delta token `s` is where the
    /// next round starts and `u` is unused.
    pub s: u64,
    pub u: u64,
    /// Offset into the round's change list.
    pub o: usize,
    /// Issue time, Unix milliseconds on the simulator clock.
    pub iat: i64,
    /// Page size the round was started with, so later pages keep it if `Prefer` is dropped.
    pub p: usize,
    /// Injected faults riding on the round: remaining empty pages and the endless-link loop.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub e: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub l: bool,
    /// Nonce so that otherwise identical links differ (the endless-loop fault needs new links).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub n: u64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// The bearer token of a Graph request, checked: signed by this simulator and not expired.
pub fn check_bearer(
    signer: &Signer,
    now: DateTime<Utc>,
    headers: &axum::http::HeaderMap,
) -> Result<AccessClaims, &'static str> {
    let raw = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("Access token is empty.")?;
    let token = raw
        .strip_prefix("Bearer ")
        .or_else(|| raw.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or("Access token is empty.")?;
    let claims = signer.open_access(token).map_err(|e| match e {
        TokenError::Malformed => "IDX14100: JWT is not well formed.",
        TokenError::BadSignature => "Access token validation failure. Invalid signature.",
    })?;
    if now.timestamp_millis() >= claims.exp {
        return Err("Lifetime validation failed, the token is expired.");
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let s = Signer::random();
        let claims = AccessClaims {
            tid: "t".into(),
            appid: "a".into(),
            aud: "https://graph.microsoft.com".into(),
            iat: 1,
            exp: 2,
            uti: "x".into(),
        };
        let tok = s.seal_access(&claims);
        assert_eq!(tok.split('.').count(), 3);
        assert_eq!(s.open_access(&tok), Ok(claims));
        let mut tampered = tok.clone();
        tampered.insert(40, 'A');
        assert!(s.open_access(&tampered).is_err());
        let other = Signer::random();
        assert_eq!(other.open_access(&tok), Err(TokenError::BadSignature));
        assert_eq!(s.open_position("garbage"), Err(TokenError::Malformed));
    }
}
