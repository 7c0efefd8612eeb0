//! The identity-platform token endpoint (client credentials, secret or certificate assertion).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::config::SimTenant;
use super::conn::ConnCtl;
use super::faults::{Endpoint, FaultKind, RetryAfter, Target};
use super::graph::Outcome;
use super::reply::{aad_defaults, aad_error, finish, Delivery, Reply};
use super::state::{lock, Shared};
use super::stats::ViolationKind;
use super::tokens::AccessClaims;

pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
const GRAPH_APP_SCOPE: &str = "00000003-0000-0000-c000-000000000000/.default";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub async fn token(
    State(sim): State<Arc<Shared>>,
    Extension(conn): Extension<Arc<ConnCtl>>,
    Path(tenant_key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let correlation = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let tenant = sim.tenant_by_key(&tenant_key);
    let (outcome, delivery) =
        pipeline(&sim, tenant, &tenant_key, &headers, &body, &correlation).await;
    let status = match &outcome {
        Outcome::Reply(r) => r.status,
        Outcome::Hang | Outcome::Reset => 0,
    };
    lock(&sim.stats).token_response(tenant.map(|t| sim.tenants[t].name.as_str()), status);
    match outcome {
        Outcome::Reply(r) => finish(r, &delivery),
        Outcome::Hang => std::future::pending().await,
        Outcome::Reset => {
            conn.order_reset();
            std::future::pending().await
        }
    }
}

async fn pipeline(
    sim: &Shared,
    tenant: Option<usize>,
    tenant_key: &str,
    headers: &HeaderMap,
    body: &[u8],
    correlation: &str,
) -> (Outcome, Delivery) {
    let none = Delivery::default();
    if let Some(ti) = tenant {
        let now = Instant::now();
        let remaining = {
            let mut nb = lock(&sim.token_not_before);
            match nb.get(&ti) {
                Some(until) if now < *until => Some(*until - now),
                Some(_) => {
                    nb.remove(&ti);
                    None
                }
                None => None,
            }
        };
        if let Some(rem) = remaining {
            lock(&sim.stats).violation(
                ViolationKind::EarlyRetry,
                json!({"tenant": sim.tenants[ti].name, "endpoint": "token",
                       "remaining_ms": rem.as_millis() as u64, "at": chrono::Utc::now().to_rfc3339()}),
            );
            let secs = rem.as_secs() + u64::from(rem.subsec_nanos() > 0);
            let (err, code, text) = aad_defaults(429, None, None);
            let reply = aad_error(429, &err, code, &text, correlation)
                .retry_after(RetryAfter::Seconds(secs.max(1)));
            return (Outcome::Reply(reply), none);
        }
    }
    let t = tenant.map(|i| &sim.tenants[i]);
    let kinds = {
        let target = Target {
            endpoint: Endpoint::Token,
            tenant_name: t.map(|t| t.name.as_str()),
            tenant_id: Some(t.map(|t| t.tenant_id.as_str()).unwrap_or(tenant_key)),
            mailbox: None,
        };
        lock(&sim.faults).fire(&target, Instant::now(), sim.now())
    };
    let latency: u64 = kinds
        .iter()
        .map(|k| match k {
            FaultKind::Latency { ms } => *ms,
            _ => 0,
        })
        .sum();
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let delivery = Delivery::from_faults(&kinds);
    for k in &kinds {
        match k {
            FaultKind::Hang | FaultKind::CommitThenHang => return (Outcome::Hang, none),
            FaultKind::Reset | FaultKind::CommitThenReset => return (Outcome::Reset, none),
            FaultKind::Status {
                code,
                graph_code,
                message,
                aadsts,
                retry_after,
            } => {
                let (err, n, text) = aad_defaults(*code, graph_code.as_deref(), *aadsts);
                let text = message.clone().unwrap_or(text);
                let reply = aad_error(*code, &err, n, &text, correlation).retry_after(*retry_after);
                if let (Some(ti), RetryAfter::Seconds(s) | RetryAfter::HttpDate(s)) =
                    (tenant, retry_after)
                {
                    lock(&sim.token_not_before)
                        .insert(ti, Instant::now() + Duration::from_secs(*s));
                }
                return (Outcome::Reply(reply), delivery);
            }
            _ => {}
        }
    }
    let reply = match issue(sim, t, tenant_key, headers, body, correlation) {
        Ok(r) | Err(r) => r,
    };
    (Outcome::Reply(reply), delivery)
}

fn form_get<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Entra answers `invalid_client` (client authentication failed) with 401 and the other
/// request errors with 400, as public reports of the token endpoint show.
fn status_for(error: &str) -> u16 {
    if error == "invalid_client" {
        401
    } else {
        400
    }
}

fn issue(
    sim: &Shared,
    tenant: Option<&SimTenant>,
    tenant_key: &str,
    headers: &HeaderMap,
    body: &[u8],
    correlation: &str,
) -> Result<Reply, Reply> {
    let err = |error: &str, code: u32, text: &str| {
        aad_error(status_for(error), error, code, text, correlation)
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let Some(tenant) = tenant else {
        return Err(err(
            "invalid_request",
            90002,
            &format!("Tenant '{tenant_key}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."),
        ));
    };
    match form_get(&form, "grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(err(
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            ))
        }
        None => {
            return Err(err(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            ))
        }
    }
    let assertion = form_get(&form, "client_assertion");
    let assertion_claims = match assertion {
        Some(a) => {
            if form_get(&form, "client_assertion_type") != Some(JWT_BEARER) {
                return Err(err(
                    "invalid_request",
                    700023,
                    "Client assertion type is invalid; expected 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.",
                ));
            }
            let host = headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost");
            let token_url = format!("http://{host}/{tenant_key}/oauth2/v2.0/token");
            Some(
                check_assertion(a, tenant, &token_url, sim.now().timestamp())
                    .map_err(|(error, code, text)| err(error, code, &text))?,
            )
        }
        None => None,
    };
    let client_id = form_get(&form, "client_id")
        .map(str::to_string)
        .or_else(|| assertion_claims.as_ref().map(|c| c.sub.clone()));
    let Some(client_id) = client_id else {
        return Err(err(
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        ));
    };
    if let Some(c) = &assertion_claims {
        if c.sub != client_id {
            return Err(err(
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            ));
        }
    }
    if !client_id.eq_ignore_ascii_case(&tenant.client_id) {
        return Err(err(
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.", tenant.name),
        ));
    }
    if assertion_claims.is_none() {
        match form_get(&form, "client_secret") {
            None => {
                return Err(err(
                    "invalid_client",
                    7000216,
                    "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
                ))
            }
            Some(s) if s != tenant.client_secret => {
                return Err(err(
                    "invalid_client",
                    7000215,
                    &format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."),
                ))
            }
            Some(_) => {}
        }
    }
    match form_get(&form, "scope") {
        Some(GRAPH_SCOPE) | Some(GRAPH_APP_SCOPE) => {}
        Some(other) => {
            return Err(err(
                "invalid_scope",
                70011,
                &format!("The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {other} is not valid."),
            ))
        }
        None => {
            return Err(err(
                "invalid_request",
                90014,
                "The required field 'scope' is missing from the credential. Ensure that you have all the necessary parameters for the login request.",
            ))
        }
    }
    let now = sim.now();
    let lifetime = sim.config.access_token_lifetime;
    let claims = AccessClaims {
        tid: tenant.tenant_id.clone(),
        appid: client_id,
        aud: "https://graph.microsoft.com".into(),
        iat: now.timestamp_millis(),
        exp: now.timestamp_millis() + lifetime.as_millis() as i64,
        uti: uuid::Uuid::new_v4().simple().to_string(),
    };
    let body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": sim.config.ext_lifetime().as_secs(),
        "access_token": sim.signer.seal_access(&claims),
    });
    Ok(Reply::json(200, "application/json; charset=utf-8", &body)
        .header("cache-control", "no-store, no-cache")
        .header("client-request-id", correlation.to_string()))
}

#[derive(Debug, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    x5t: Option<String>,
    #[serde(default, rename = "x5t#S256")]
    x5t_s256: Option<String>,
}

type AssertionError = (&'static str, u32, String);

/// Checks a client assertion: PS256 (what the certificate-credentials doc asks for) or RS256
/// (still accepted), `iss` = `sub` = the app, `aud` = this token URL, within its time range, and,
/// when the tenant has a certificate, naming it by `x5t#S256` or `x5t` and signed by its key.
pub fn check_assertion(
    jwt: &str,
    tenant: &SimTenant,
    token_url: &str,
    now_secs: i64,
) -> Result<AssertionClaims, AssertionError> {
    let malformed = || {
        (
            "invalid_request",
            50027,
            "JWT token is invalid or malformed.".to_string(),
        )
    };
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let header: JwtHeader = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(malformed)?;
    let claims: AssertionClaims = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(malformed)?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| malformed())?;
    let algorithm: &'static dyn ring::signature::VerificationAlgorithm =
        match (header.alg.as_str(), sig.is_empty()) {
            ("PS256", false) => &ring::signature::RSA_PSS_2048_8192_SHA256,
            ("RS256", false) => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            _ => {
                return Err((
                    "invalid_client",
                    5002738,
                    "The client assertion must be signed with PS256 or RS256.".into(),
                ))
            }
        };
    if claims.iss != claims.sub {
        return Err((
            "invalid_client",
            700021,
            "Client assertion 'iss' and 'sub' must both be the application id.".into(),
        ));
    }
    if claims.aud.trim_end_matches('/') != token_url.trim_end_matches('/') {
        return Err((
            "invalid_client",
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience '{}'. The audience must be '{token_url}'.",
                claims.aud
            ),
        ));
    }
    // Entra allows a few minutes of clock skew either way.
    if claims.exp + 300 < now_secs || claims.nbf.is_some_and(|n| n - 300 > now_secs) {
        return Err((
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range.".into(),
        ));
    }
    if let Some(pem) = &tenant.certificate_pem {
        let key = registered_key_from_pem(pem).ok_or((
            "invalid_client",
            700027,
            "The certificate configured for the app could not be read.".to_string(),
        ))?;
        if let Some(cert) = &key.certificate {
            check_thumbprints(&header, cert)?;
        }
        let signed = &jwt[..h.len() + 1 + p.len()];
        ring::signature::UnparsedPublicKey::new(algorithm, &key.rsa)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| {
                (
                    "invalid_client",
                    700027,
                    "Client assertion failed signature validation.".to_string(),
                )
            })?;
    }
    Ok(claims)
}

/// Entra finds the key by the thumbprint in the header, so one that names another certificate
/// is refused even before the signature is checked. Base64url, with or without padding.
fn check_thumbprints(header: &JwtHeader, cert: &[u8]) -> Result<(), AssertionError> {
    use ring::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY, SHA256};
    let given = [
        (header.x5t_s256.as_deref(), digest(&SHA256, cert)),
        (
            header.x5t.as_deref(),
            digest(&SHA1_FOR_LEGACY_USE_ONLY, cert),
        ),
    ];
    for (thumbprint, expected) in given {
        if let Some(t) = thumbprint {
            if t.trim_end_matches('=') != URL_SAFE_NO_PAD.encode(expected.as_ref()) {
                return Err((
                    "invalid_client",
                    700027,
                    format!("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{t}']"),
                ));
            }
        }
    }
    Ok(())
}

/// The app's registered key: the RSA public key, and the certificate (DER) when the PEM is one.
struct RegisteredKey {
    rsa: Vec<u8>,
    certificate: Option<Vec<u8>>,
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, head) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let content = input.get(head..head.checked_add(len)?)?;
    Some((tag, content, &input[head + len..]))
}

/// SubjectPublicKeyInfo contents -> PKCS#1 RSAPublicKey, which is what ring verifies with.
fn spki_to_rsa(spki: &[u8]) -> Option<Vec<u8>> {
    let (_, _alg, rest) = der(spki)?;
    let (tag, bits, _) = der(rest)?;
    (tag == 0x03).then(|| bits.get(1..).map(<[u8]>::to_vec))?
}

fn cert_to_rsa(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let (tag, _, after_version) = der(tbs)?;
    let mut rest = if tag == 0xA0 { after_version } else { tbs };
    // serialNumber, signature, issuer, validity, subject
    for _ in 0..5 {
        rest = der(rest)?.2;
    }
    let (_, spki, _) = der(rest)?;
    spki_to_rsa(spki)
}

pub fn rsa_public_key_from_pem(pem: &str) -> Option<Vec<u8>> {
    registered_key_from_pem(pem).map(|k| k.rsa)
}

fn registered_key_from_pem(pem: &str) -> Option<RegisteredKey> {
    let begin = pem.find("-----BEGIN ")?;
    let label_end = pem[begin + 11..].find("-----")? + begin + 11;
    let label = &pem[begin + 11..label_end];
    let body_start = label_end + 5;
    let end = pem[body_start..].find("-----END")? + body_start;
    let b64: String = pem[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der_bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let (rsa, certificate) = match label {
        "CERTIFICATE" => (cert_to_rsa(&der_bytes)?, Some(der_bytes)),
        "PUBLIC KEY" => {
            let (_, spki, _) = der(&der_bytes)?;
            (spki_to_rsa(spki)?, None)
        }
        "RSA PUBLIC KEY" => (der_bytes, None),
        _ => return None,
    };
    Some(RegisteredKey { rsa, certificate })
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use ring::signature::{RsaEncoding, RsaKeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256};
    use serde_json::Value;

    use super::*;

    const KEY: &str = include_str!("../../../fixtures/sim/sim_test_key.pem");
    const CERT: &str = include_str!("../../../fixtures/sim/sim_test_cert.pem");
    // Another app's key and certificate.
    const OTHER: &str = include_str!("../../../fixtures/certs/test-app.pem");
    const APP: &str = "11111111-2222-3333-4444-555555555555";
    const URL: &str = "http://sim.test/t1/oauth2/v2.0/token";
    const NOW: i64 = 1_900_000_000;

    fn pem_block(pem: &str, label: &str) -> Vec<u8> {
        let begin = format!("-----BEGIN {label}-----");
        let start = pem.find(&begin).expect("BEGIN") + begin.len();
        let stop = pem[start..].find("-----END").expect("END") + start;
        let b64: String = pem[start..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        STANDARD.decode(b64).expect("base64")
    }

    fn thumbprints(cert_pem: &str) -> (String, String) {
        use ring::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY, SHA256};
        let der = pem_block(cert_pem, "CERTIFICATE");
        (
            URL_SAFE_NO_PAD.encode(digest(&SHA1_FOR_LEGACY_USE_ONLY, &der)),
            URL_SAFE_NO_PAD.encode(digest(&SHA256, &der)),
        )
    }

    /// A client assertion with `header`, signed with `padding` by the key in `key_pem`.
    fn assertion(header: Value, padding: &'static dyn RsaEncoding, key_pem: &str) -> String {
        let claims = json!({"aud": URL, "iss": APP, "sub": APP, "jti": "j",
                            "nbf": NOW, "iat": NOW, "exp": NOW + 600});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key = RsaKeyPair::from_pkcs8(&pem_block(key_pem, "PRIVATE KEY")).expect("key");
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(
            padding,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn tenant() -> SimTenant {
        SimTenant {
            client_id: APP.into(),
            certificate_pem: Some(CERT.into()),
            ..SimTenant::default()
        }
    }

    fn check(jwt: &str) -> Result<AssertionClaims, AssertionError> {
        check_assertion(jwt, &tenant(), URL, NOW)
    }

    fn code(result: Result<AssertionClaims, AssertionError>) -> (&'static str, u32) {
        let (error, code, _) = result.expect_err("refused");
        (error, code)
    }

    #[test]
    fn ps256_naming_the_certificate_by_x5t_s256_is_accepted() {
        let (_, s256) = thumbprints(CERT);
        let jwt = assertion(
            json!({"alg": "PS256", "typ": "JWT", "x5t#S256": s256}),
            &RSA_PSS_SHA256,
            KEY,
        );
        let claims = check(&jwt).expect("accepted");
        assert_eq!(claims.sub, APP);
    }

    #[test]
    fn rs256_with_x5t_is_still_accepted_alone_or_with_x5t_s256() {
        let (sha1, s256) = thumbprints(CERT);
        for header in [
            json!({"alg": "RS256", "typ": "JWT", "x5t": sha1}),
            json!({"alg": "RS256", "typ": "JWT", "x5t": sha1, "x5t#S256": s256}),
        ] {
            check(&assertion(header.clone(), &RSA_PKCS1_SHA256, KEY))
                .unwrap_or_else(|e| panic!("{header} refused: {e:?}"));
        }
    }

    #[test]
    fn ps256_signed_with_another_key_is_refused_like_a_bad_rs256_signature() {
        let (sha1, s256) = thumbprints(CERT);
        let ps = assertion(
            json!({"alg": "PS256", "x5t#S256": s256}),
            &RSA_PSS_SHA256,
            OTHER,
        );
        let rs = assertion(
            json!({"alg": "RS256", "x5t": sha1}),
            &RSA_PKCS1_SHA256,
            OTHER,
        );
        assert_eq!(code(check(&ps)), ("invalid_client", 700027));
        assert_eq!(code(check(&ps)), code(check(&rs)));
    }

    #[test]
    fn the_padding_must_be_the_one_alg_names() {
        // A PKCS#1 v1.5 signature under "PS256" and a PSS one under "RS256": both refused.
        let pkcs1_as_ps = assertion(json!({"alg": "PS256"}), &RSA_PKCS1_SHA256, KEY);
        let pss_as_rs = assertion(json!({"alg": "RS256"}), &RSA_PSS_SHA256, KEY);
        assert_eq!(code(check(&pkcs1_as_ps)), ("invalid_client", 700027));
        assert_eq!(code(check(&pss_as_rs)), ("invalid_client", 700027));
    }

    #[test]
    fn a_thumbprint_of_another_certificate_is_refused() {
        let (other_sha1, other_s256) = thumbprints(OTHER);
        let (sha1, s256) = thumbprints(CERT);
        for header in [
            json!({"alg": "PS256", "x5t#S256": other_s256}),
            json!({"alg": "RS256", "x5t": other_sha1}),
            // Both sent, one of them wrong.
            json!({"alg": "RS256", "x5t": sha1, "x5t#S256": other_s256}),
            json!({"alg": "PS256", "x5t": other_sha1, "x5t#S256": s256}),
        ] {
            let padding: &'static dyn RsaEncoding = if header["alg"] == "PS256" {
                &RSA_PSS_SHA256
            } else {
                &RSA_PKCS1_SHA256
            };
            let (error, code, text) = check(&assertion(header.clone(), padding, KEY))
                .expect_err("a thumbprint of another certificate");
            assert_eq!((error, code), ("invalid_client", 700027), "{header}");
            assert!(text.contains("The key was not found"), "{text}");
        }
    }

    #[test]
    fn other_algorithms_are_refused() {
        for alg in ["HS256", "ES256", "PS384", "none"] {
            let jwt = assertion(json!({"alg": alg}), &RSA_PSS_SHA256, KEY);
            assert_eq!(code(check(&jwt)), ("invalid_client", 5002738), "{alg}");
        }
    }

    #[test]
    fn invalid_client_is_401_and_other_errors_400() {
        assert_eq!(status_for("invalid_client"), 401);
        for error in [
            "invalid_request",
            "unauthorized_client",
            "invalid_scope",
            "unsupported_grant_type",
        ] {
            assert_eq!(status_for(error), 400, "{error}");
        }
    }
}
