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

fn issue(
    sim: &Shared,
    tenant: Option<&SimTenant>,
    tenant_key: &str,
    headers: &HeaderMap,
    body: &[u8],
    correlation: &str,
) -> Result<Reply, Reply> {
    let err = |status: u16, error: &str, code: u32, text: &str| {
        aad_error(status, error, code, text, correlation)
    };
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let Some(tenant) = tenant else {
        return Err(err(
            400,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant_key}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."),
        ));
    };
    match form_get(&form, "grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(err(
                400,
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            ))
        }
        None => {
            return Err(err(
                400,
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
                    400,
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
                    .map_err(|(error, code, text)| err(400, error, code, &text))?,
            )
        }
        None => None,
    };
    let client_id = form_get(&form, "client_id")
        .map(str::to_string)
        .or_else(|| assertion_claims.as_ref().map(|c| c.sub.clone()));
    let Some(client_id) = client_id else {
        return Err(err(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        ));
    };
    if let Some(c) = &assertion_claims {
        if c.sub != client_id {
            return Err(err(
                400,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            ));
        }
    }
    if !client_id.eq_ignore_ascii_case(&tenant.client_id) {
        return Err(err(
            400,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.", tenant.name),
        ));
    }
    if assertion_claims.is_none() {
        match form_get(&form, "client_secret") {
            None => {
                return Err(err(
                    401,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                ))
            }
            Some(s) if s != tenant.client_secret => {
                return Err(err(
                    401,
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
                400,
                "invalid_scope",
                70011,
                &format!("The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {other} is not valid."),
            ))
        }
        None => {
            return Err(err(
                400,
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
}

type AssertionError = (&'static str, u32, String);

/// Checks a client assertion: RS256, `iss` = `sub` = the app, `aud` = this token URL, within its
/// time range, and signed by the tenant's certificate when one is configured.
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
    if header.alg != "RS256" || sig.is_empty() {
        return Err((
            "invalid_client",
            5002738,
            "The client assertion must be signed with RS256.".into(),
        ));
    }
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
        let key = rsa_public_key_from_pem(pem).ok_or((
            "invalid_client",
            700027,
            "The certificate configured for the app could not be read.".to_string(),
        ))?;
        let signed = &jwt[..h.len() + 1 + p.len()];
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &key)
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
    match label {
        "CERTIFICATE" => cert_to_rsa(&der_bytes),
        "PUBLIC KEY" => {
            let (_, spki, _) = der(&der_bytes)?;
            spki_to_rsa(spki)
        }
        "RSA PUBLIC KEY" => Some(der_bytes),
        _ => None,
    }
}
