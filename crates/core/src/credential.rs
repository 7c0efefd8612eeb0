//! Certificate credentials: the app proves itself with a JWT client assertion signed by the
//! private key of a certificate registered on the app (RS256, `x5t` / `x5t#S256` thumbprints).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How long an assertion is valid; Entra accepts up to 10 minutes of clock skew around it.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM CERTIFICATE block")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key block (PRIVATE KEY or RSA PRIVATE KEY)")]
    NoKey { path: String },
    #[error("{path}: the private key is not a usable RSA key ({reason}); Entra app certificates are RSA")]
    BadKey { path: String, reason: String },
    #[error("signing the client assertion failed")]
    Sign,
}

pub struct ClientCertificate {
    key: RsaKeyPair,
    x5t: String,
    x5t_s256: String,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientCertificate(x5t {})", self.x5t)
    }
}

impl ClientCertificate {
    pub fn from_pem_file(path: &Path) -> Result<Self, CertificateError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| CertificateError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_pem(&pem, &shown)
    }

    pub fn from_pem(pem: &[u8], shown: &str) -> Result<Self, CertificateError> {
        let cert = CertificateDer::pem_slice_iter(pem)
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| CertificateError::NoCertificate {
                path: shown.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| CertificateError::NoKey {
            path: shown.to_string(),
        })?;
        let bad = |reason: String| CertificateError::BadKey {
            path: shown.to_string(),
            reason,
        };
        let key = match &key {
            PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
            _ => return Err(bad("only PKCS#8 or PKCS#1 RSA keys are supported".into())),
        }
        .map_err(|e| bad(e.to_string()))?;
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
        let sha256 = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        Ok(Self {
            key,
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
            x5t_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
        })
    }

    /// Base64url SHA-1 thumbprint, as Entra shows it in `x5t`; safe to log.
    pub fn thumbprint(&self) -> &str {
        &self.x5t
    }

    /// A signed client assertion for `audience` (the token endpoint URL).
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<String, CertificateError> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| CertificateError::Sign)?
            .as_secs();
        let header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t": self.x5t,
            "x5t#S256": self.x5t_s256,
        });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": iat,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| CertificateError::Sign)?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}
