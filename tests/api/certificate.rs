//! Certificate credentials: the token request carries a JWT client assertion signed with the
//! certificate's private key (`fixtures/certs/test-app.pem`, made once with the openssl CLI).

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use calsync::store::RunOutcome;
use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const CLIENT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn cert_path() -> String {
    format!("{}/fixtures/certs/test-app.pem", env!("CARGO_MANIFEST_DIR"))
}

/// One DER element at the start of `der`: its tag, its contents and what follows it.
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = der[0];
    let (len, header) = if der[1] < 0x80 {
        (usize::from(der[1]), 2)
    } else {
        let n = usize::from(der[1] & 0x7f);
        let len = der[2..2 + n]
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (len, 2 + n)
    };
    (tag, &der[header..header + len], &der[header + len..])
}

/// The certificate's RSAPublicKey (PKCS#1 DER), as ring wants it: Certificate → tbsCertificate
/// → subjectPublicKeyInfo → subjectPublicKey.
fn rsa_public_key(cert: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: [u8; 11] = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let (_, certificate, _) = der_element(cert);
    let (_, tbs, _) = der_element(certificate);
    let mut rest = tbs;
    let (tag, _, after_version) = der_element(rest);
    if tag == 0xa0 {
        rest = after_version;
    }
    // serialNumber, signature, issuer, validity, subject
    for _ in 0..5 {
        rest = der_element(rest).2;
    }
    let (_, spki, _) = der_element(rest);
    let (_, algorithm, after_algorithm) = der_element(spki);
    assert!(
        algorithm.starts_with(&RSA_ENCRYPTION),
        "the test certificate is RSA"
    );
    let (tag, bits, _) = der_element(after_algorithm);
    assert_eq!(
        (tag, bits[0]),
        (0x03, 0),
        "a BIT STRING with no unused bits"
    );
    bits[1..].to_vec()
}

fn decode_json(part: &str) -> serde_json::Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

#[tokio::test]
async fn token_request_carries_a_signed_client_assertion_instead_of_a_secret() {
    let app = spawn_app_with(|toml| {
        toml.replace(
            &format!("client_secret = \"{CLIENT_SECRET}\""),
            &format!("certificate_file = \"{}\"", cert_path()),
        )
    })
    .await;
    app.mount_token_ok().await;
    Mock::given(method("GET"))
        .and(path(DELTA_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(delta_page(
            &app.base(),
            vec![],
            "cert-round",
            true,
        )))
        .expect(1)
        .mount(&app.graph)
        .await;

    let result = app.sync_alice().await;
    assert_eq!(result.outcome, RunOutcome::Ok, "{:?}", result.error);

    let requests = app.graph.received_requests().await.expect("recording");
    let token_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.url.path() == token_path())
        .collect();
    assert_eq!(token_requests.len(), 1);
    let form: HashMap<String, String> = url::form_urlencoded::parse(&token_requests[0].body)
        .into_owned()
        .collect();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], CLIENT_ID);
    assert_eq!(form["scope"], "https://graph.microsoft.com/.default");
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert!(!form.contains_key("client_secret"), "{form:?}");
    assert!(
        token_requests[0].headers.get("authorization").is_none(),
        "no basic auth either"
    );

    let assertion = &form["client_assertion"];
    let parts: Vec<&str> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS");
    let header = decode_json(parts[0]);
    let claims = decode_json(parts[1]);

    let pem = std::fs::read(cert_path()).expect("cert fixture");
    let cert = CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("PEM");
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(
        header["x5t"].as_str(),
        Some(URL_SAFE_NO_PAD.encode(sha1.as_ref()).as_str()),
        "x5t is the certificate's SHA-1 thumbprint"
    );

    let token_url = format!("{}{}", app.graph.uri(), token_path());
    assert_eq!(claims["aud"].as_str(), Some(token_url.as_str()));
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], CLIENT_ID);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    let now = chrono::Utc::now().timestamp();
    let (nbf, exp) = (
        claims["nbf"].as_i64().expect("nbf"),
        claims["exp"].as_i64().expect("exp"),
    );
    assert!(
        nbf <= now && now < exp && exp - nbf <= 600,
        "nbf {nbf} exp {exp} now {now}"
    );

    let public_key = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, rsa_public_key(&cert));
    let signed = format!("{}.{}", parts[0], parts[1]);
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("base64url");
    public_key
        .verify(signed.as_bytes(), &signature)
        .expect("the signature verifies with the certificate's public key");
    let tampered = format!(
        "{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(b"{\"iss\":\"x\"}")
    );
    assert!(
        public_key.verify(tampered.as_bytes(), &signature).is_err(),
        "and only for what was signed"
    );
}

#[tokio::test]
async fn a_certificate_file_without_a_private_key_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = std::fs::read_to_string(cert_path()).expect("cert fixture");
    let cert_only: String = pem
        .split_inclusive('\n')
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .collect();
    let file = dir.path().join("cert-only.pem");
    std::fs::write(&file, cert_only).expect("write");
    let toml = base_config("http://127.0.0.1:9", "/tmp/unused.db").replace(
        &format!("client_secret = \"{CLIENT_SECRET}\""),
        &format!("certificate_file = \"{}\"", file.display()),
    );
    let error = calsync::config::Settings::from_toml_str(&toml).expect_err("no key");
    assert_eq!(error.key, "tenants[0].certificate_file");
    assert!(error.to_string().contains("private key"), "{error}");
}
