//! The one way calsync builds HTTP clients and reads response bodies: every client has a connect
//! timeout and a total deadline and follows no redirects; every body is read under a size cap.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("reading the response body failed: {0}")]
    Transport(#[source] reqwest::Error),
}

impl BodyError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Transport(e) if e.is_timeout())
    }
}

/// Redirects are never followed: a bearer token or client secret must not be replayed to
/// whatever host a redirect names.
pub fn http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("calsync/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// Reads the body chunk by chunk so an oversized or endless body is cut off at `limit` bytes
/// instead of filling memory.
///
/// Each byte is copied once: the chunks are kept as they come and joined into a buffer of the
/// final size, instead of growing one buffer (whose doublings copy a page of events again and
/// leave up to half of it unused).
pub async fn read_body_limited(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut chunks = Vec::new();
    let mut len = 0usize;
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        len += chunk.len();
        if len > limit {
            return Err(BodyError::TooLarge { limit });
        }
        chunks.push(chunk);
    }
    let mut body = Vec::with_capacity(len);
    for chunk in &chunks {
        body.extend_from_slice(chunk);
    }
    Ok(body)
}

/// `body` with every form in which `secret` could be echoed back (as given, form-encoded as
/// calsync sends it, JSON-escaped) replaced by `[REDACTED]`. Applied to error bodies before any
/// message is made from them, and before any excerpt could cut a secret in half.
pub fn redact(body: &[u8], secret: &str) -> Vec<u8> {
    if secret.is_empty() {
        return body.to_vec();
    }
    let mut text = String::from_utf8_lossy(body).into_owned();
    let form_encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let json_escaped = serde_json::to_string(secret).unwrap_or_default();
    let json_escaped = json_escaped.trim_matches('"');
    for form in [secret, form_encoded.as_str(), json_escaped] {
        if !form.is_empty() {
            text = text.replace(form, "[REDACTED]");
        }
    }
    text.into_bytes()
}

/// A short, printable excerpt of a body for error messages (never of a request we sent).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.chars().filter(|c| !c.is_control()).collect()
}

/// A transport error without the request URL (which may carry delta tokens): what failed and
/// the underlying causes.
/// The connection itself failed (refused, reset, closed, TLS): not a slow answer. A timeout may
/// be one slow mailbox; a connection that cannot be made or is cut is the path to the service.
pub fn is_connection_failure(e: &reqwest::Error) -> bool {
    !e.is_timeout()
}

pub fn describe_transport(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    match std::error::Error::source(e) {
        Some(cause) => format!("{what}: {}", crate::error_chain(cause)),
        None => what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_blanks_every_form_a_secret_is_echoed_in() {
        let secret = "a~b\"c d";
        let body = format!(
            "raw {secret} form {} json {}",
            url::form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>(),
            serde_json::to_string(secret).expect("json")
        );
        let redacted = String::from_utf8(redact(body.as_bytes(), secret)).expect("utf-8");
        assert_eq!(
            redacted,
            "raw [REDACTED] form [REDACTED] json \"[REDACTED]\""
        );
        assert_eq!(redact(b"nothing here", ""), b"nothing here");
    }

    /// A peer on a real socket that answers one request with `body` in chunked transfer
    /// encoding (so no Content-Length announces its size), one HTTP chunk per part, each
    /// part written after the previous one was flushed.
    async fn chunked_peer(parts: Vec<Vec<u8>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for part in parts {
                let mut chunk = format!("{:x}\r\n", part.len()).into_bytes();
                chunk.extend_from_slice(&part);
                chunk.extend_from_slice(b"\r\n");
                if socket.write_all(&chunk).await.is_err() || socket.flush().await.is_err() {
                    return;
                }
            }
            let _ = socket.write_all(b"0\r\n\r\n").await;
        });
        format!("http://{addr}/")
    }

    async fn read_from(parts: Vec<Vec<u8>>, limit: usize) -> Result<Vec<u8>, BodyError> {
        let url = chunked_peer(parts).await;
        let client = http_client(Duration::from_secs(5), Duration::from_secs(30)).expect("client");
        let mut response = client.get(url).send().await.expect("response");
        assert_eq!(
            response.content_length(),
            None,
            "chunked: no size announced"
        );
        read_body_limited(&mut response, limit).await
    }

    #[tokio::test]
    async fn a_body_in_many_chunks_is_read_whole_and_in_order() {
        let parts: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![b'a' + i % 26; 1_000 + usize::from(i) * 37])
            .collect();
        let expected = parts.concat();
        let body = read_from(parts, expected.len())
            .await
            .expect("within the limit");
        assert_eq!(body.len(), expected.len());
        assert!(body == expected, "the chunks joined in the order sent");
    }

    #[tokio::test]
    async fn an_unannounced_body_past_the_limit_is_cut_off() {
        let parts = vec![vec![b'x'; 6_000], vec![b'y'; 6_000]];
        match read_from(parts, 10_000).await {
            Err(BodyError::TooLarge { limit }) => assert_eq!(limit, 10_000),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}
