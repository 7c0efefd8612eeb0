//! Building responses: Graph and identity-platform error shapes, and the body faults (malformed,
//! truncated, oversized, trickled) that are applied to an otherwise finished response.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use chrono::{DurationRound, Utc};
use futures_util::stream;
use serde_json::{json, Value};

use super::faults::{FaultKind, RetryAfter};

/// A response before delivery faults are applied.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

pub const GRAPH_JSON: &str =
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";

impl Reply {
    pub fn json(status: u16, content_type: &str, body: &Value) -> Self {
        Self {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    /// This error reply with `name: value` added to its `error` object.
    pub fn with_error_member(mut self, name: &str, value: &str) -> Self {
        if let Ok(mut body) = serde_json::from_slice::<Value>(&self.body) {
            if let Some(error) = body.get_mut("error").and_then(Value::as_object_mut) {
                error.insert(name.to_string(), Value::from(value));
                self.body = serde_json::to_vec(&body).unwrap_or(self.body);
            }
        }
        self
    }

    /// A response without a body (204, 202).
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn retry_after(self, ra: RetryAfter) -> Self {
        match ra {
            RetryAfter::None => self,
            RetryAfter::Seconds(s) => self.header("retry-after", s.to_string()),
            RetryAfter::HttpDate(s) => {
                // An HTTP-date has whole seconds; rounding down would name an instant before
                // the one the simulator enforces, and a client obeying it would be "early".
                let at = Utc::now() + chrono::Duration::seconds(s as i64);
                let at = at
                    .duration_round_up(chrono::Duration::seconds(1))
                    .unwrap_or(at);
                self.header(
                    "retry-after",
                    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
                )
            }
        }
    }
}

/// Per-request identifiers Graph returns in headers and in `innerError`.
#[derive(Clone)]
pub struct RequestIds {
    pub request_id: String,
    pub client_request_id: String,
}

impl RequestIds {
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Self {
        let request_id = uuid::Uuid::new_v4().to_string();
        let client_request_id = headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| request_id.clone());
        Self {
            request_id,
            client_request_id,
        }
    }
}

/// The message of Outlook's 429 for too many requests in flight on one mailbox.
pub const MAILBOX_CONCURRENCY: &str = "Application is over its MailboxConcurrency limit.";

pub fn graph_error(status: u16, code: &str, message: &str, ids: &RequestIds) -> Reply {
    // Users report this one throttling answer without `innerError`
    // (magodo/terraform-provider-outlook#21); the ids stay in the headers.
    if status == 429 && code == "ApplicationThrottled" && message == MAILBOX_CONCURRENCY {
        let body = json!({ "error": { "code": code, "message": message } });
        return Reply::json(status, "application/json", &body);
    }
    let body = json!({
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string(),
                "request-id": ids.request_id,
                "client-request-id": ids.client_request_id
            }
        }
    });
    Reply::json(status, "application/json", &body)
}

/// Graph's usual code for a bare status, used when a fault rule names none.
pub fn default_graph_code(status: u16) -> (&'static str, &'static str) {
    match status {
        401 => (
            "InvalidAuthenticationToken",
            "Lifetime validation failed, the token is expired.",
        ),
        403 => (
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ),
        404 => (
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
        ),
        410 => (
            "SyncStateNotFound",
            "The sync state generation is not found; generation=0.",
        ),
        429 => ("ApplicationThrottled", MAILBOX_CONCURRENCY),
        500 => ("InternalServerError", "An internal server error occurred."),
        502 => ("BadGateway", "The gateway received an invalid response."),
        503 => (
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
        ),
        504 => ("UnknownError", ""),
        _ => ("UnknownError", "An error occurred."),
    }
}

/// The identity-platform error body: branchable on `error` and `error_codes`.
pub fn aad_error(status: u16, error: &str, aadsts: u32, detail: &str, correlation: &str) -> Reply {
    let trace_id = uuid::Uuid::new_v4().to_string();
    let now = Utc::now();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{aadsts}: {detail} Trace ID: {trace_id} Correlation ID: {correlation} Timestamp: {}",
            now.format("%Y-%m-%d %H:%M:%SZ")
        ),
        "error_codes": [aadsts],
        "timestamp": now.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        "trace_id": trace_id,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}")
    });
    Reply::json(status, "application/json; charset=utf-8", &body)
        .header("x-ms-request-id", trace_id)
        .header("client-request-id", correlation.to_string())
}

/// Default `error` and AADSTS text for the identity-platform codes the faults can name.
pub fn aad_defaults(
    status: u16,
    error: Option<&str>,
    aadsts: Option<u32>,
) -> (String, u32, String) {
    let code = aadsts.unwrap_or(match (status, error) {
        (_, Some("invalid_client")) => 7000215,
        (_, Some("unauthorized_client")) => 700016,
        (_, Some("invalid_scope")) => 70011,
        (401, _) => 7000215,
        (400, _) => 90002,
        _ => 90033,
    });
    let err = error.map(str::to_string).unwrap_or_else(|| {
        match code {
            7000215 | 7000222 | 700027 | 7000216 | 7000218 => "invalid_client",
            700016 => "unauthorized_client",
            70011 => "invalid_scope",
            90002 | 90014 => "invalid_request",
            _ => "temporarily_unavailable",
        }
        .to_string()
    });
    let text = match code {
        7000215 => "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
        7000222 => "The provided client secret keys for app are expired. Visit the Azure portal to create new keys for your app.",
        700016 => "Application was not found in the directory. This can happen if the application has not been installed by the administrator of the tenant.",
        90002 => "Tenant not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
        70011 => "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid.",
        _ => "A transient error has occurred. Please try again.",
    };
    (err, code, text.to_string())
}

/// Which delivery fault, if any, shapes the body on the wire.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub body_fault: Option<FaultKind>,
    pub trickle_bps: Option<u32>,
}

impl Delivery {
    pub fn from_faults(kinds: &[FaultKind]) -> Self {
        let mut d = Delivery::default();
        for k in kinds {
            match k {
                FaultKind::MalformedJson
                | FaultKind::TruncatedJson
                | FaultKind::Oversized { .. }
                    if d.body_fault.is_none() =>
                {
                    d.body_fault = Some(k.clone());
                }
                FaultKind::Trickle { bytes_per_second } => {
                    d.trickle_bps.get_or_insert(*bytes_per_second);
                }
                _ => {}
            }
        }
        d
    }
}

const PAD_CHUNK: usize = 64 * 1024;

pub fn finish(reply: Reply, delivery: &Delivery) -> Response {
    let Reply {
        status,
        headers,
        mut body,
    } = reply;
    let mut padding = 0usize;
    match &delivery.body_fault {
        Some(FaultKind::MalformedJson) => {
            // Still starts like a Graph page, so only a real parser notices.
            if body.last() == Some(&b'}') {
                body.pop();
            }
            body.extend_from_slice(b",,\"value\":[{\"id\":}");
        }
        Some(FaultKind::TruncatedJson) => {
            body.truncate(body.len() / 2);
        }
        Some(FaultKind::Oversized { bytes }) => {
            padding = bytes.saturating_sub(body.len());
        }
        _ => {}
    }
    let body = if padding > 0 {
        padded_body(body, padding, delivery.trickle_bps)
    } else if let Some(bps) = delivery.trickle_bps {
        trickled(vec![Bytes::from(body)], bps)
    } else {
        Body::from(body)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().append(HeaderName::from_static(name), v);
        }
    }
    resp
}

/// The real JSON object with an extra string member of `padding` bytes, streamed so a huge body
/// costs no memory.
fn padded_body(mut body: Vec<u8>, padding: usize, trickle: Option<u32>) -> Body {
    let tail: &[u8] = if body.last() == Some(&b'}') {
        body.pop();
        b"\"}"
    } else {
        b"\""
    };
    let lead: &[u8] = if body.len() > 1 {
        b",\"x-sim-padding\":\""
    } else {
        b"\"x-sim-padding\":\""
    };
    body.extend_from_slice(lead);
    let head = Bytes::from(body);
    let full = padding / PAD_CHUNK;
    let rest = padding % PAD_CHUNK;
    let chunk = Bytes::from(vec![b'A'; PAD_CHUNK]);
    let mut parts = vec![head];
    if let Some(bps) = trickle {
        // Trickling megabytes is never what a test wants; cap the padding instead.
        parts.push(Bytes::from(vec![b'A'; padding.min(4096)]));
        parts.push(Bytes::from_static(tail));
        return trickled(parts, bps);
    }
    let chunks = std::iter::repeat_n(chunk, full)
        .chain(std::iter::once(Bytes::from(vec![b'A'; rest])))
        .chain(std::iter::once(Bytes::from_static(tail)));
    let all = parts.into_iter().chain(chunks).map(Ok::<_, std::io::Error>);
    Body::from_stream(stream::iter(all))
}

/// Sends the bytes a few at a time at about `bps` bytes per second (one byte per step when
/// `bps` <= 100), with the status and headers sent at once.
fn trickled(parts: Vec<Bytes>, bps: u32) -> Body {
    let all: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
    let bps = bps.max(1) as u64;
    let (step_bytes, step) = if bps <= 100 {
        (1usize, Duration::from_micros(1_000_000 / bps))
    } else {
        ((bps / 100) as usize, Duration::from_millis(10))
    };
    let s = stream::unfold((all, 0usize), move |(all, pos)| async move {
        if pos >= all.len() {
            return None;
        }
        if pos > 0 {
            tokio::time::sleep(step).await;
        }
        let end = (pos + step_bytes).min(all.len());
        let chunk = Bytes::copy_from_slice(&all[pos..end]);
        Some((Ok::<_, std::io::Error>(chunk), (all, end)))
    });
    Body::from_stream(s)
}
