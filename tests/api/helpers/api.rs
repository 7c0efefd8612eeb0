//! A client for the admin API of a running service: every call's body and headers are kept,
//! so a test can check that the token never appears in them.

use std::sync::Arc;

use calsync::config::Settings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{start_app, Jobs, Running};

pub const TOKEN: &str = "calsync-admin-Token~0123456789abcdefABCDEF";
pub const WRONG: &str = "calsync-admin-Token~0123456789abcdefABCDEX";

/// The running service and a client for its API.
pub struct Api {
    pub running: Running,
    /// Every response body and header value seen, to check that the token is in none.
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::ops::Deref for Api {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    pub async fn start(settings: Settings) -> Self {
        Self::new(start_app(settings, Jobs::Loop).await)
    }

    /// A client for a service the test started itself.
    pub fn new(running: Running) -> Self {
        Self {
            running,
            seen: Default::default(),
        }
    }

    /// Sends with `token` as the bearer (none when `None`) and, when given, `body` as JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        self.request(method, path, token, &[], body).await
    }

    /// Like [`send`](Self::send) with the token, plus `headers`.
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        self.request(method, path, Some(TOKEN), headers, body).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut request = self.http.request(method.clone(), self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        self.reply(response).await
    }

    pub async fn reply(&self, response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a body");
        {
            let mut seen = self.seen.lock().expect("lock");
            seen.push(text.clone());
            for value in headers.values() {
                seen.push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
        }
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, Some(TOKEN), None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> Reply {
        self.send(Method::POST, path, Some(TOKEN), body).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, Some(TOKEN), None).await
    }

    pub async fn register(&self, tenant: &str, mailbox: &str) -> Reply {
        self.post(
            "/v1/mailboxes",
            Some(json!({"tenant": tenant, "mailbox": mailbox})),
        )
        .await
    }

    pub fn assert_token_never_seen(&self) {
        let seen = self.seen.lock().expect("lock");
        assert!(!seen.is_empty());
        for text in seen.iter() {
            assert!(
                !text.contains(TOKEN),
                "a response carries the token: {text}"
            );
            assert!(!text.contains(WRONG), "a response echoes a token: {text}");
        }
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}
