//! A Graph stand-in on a real TCP socket, for faults a mock cannot fake: a peer that accepts
//! the connection, reads the request and then never answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

pub enum Reply {
    /// Keep the connection open and never send a byte.
    Hang,
    /// Answer `200` with this JSON body after `delay`.
    Json(Duration, serde_json::Value),
    /// Send the head at once, then the body one byte per interval.
    Trickle(Duration, serde_json::Value),
}

type Router = dyn Fn(&str, &str) -> Reply + Send + Sync;

pub struct RawGraph {
    uri: String,
    requests: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RawGraph {
    /// Listens on 127.0.0.1:0; `route(base, target)` decides each request by its target (path
    /// and query); `base` is this server's Graph base URL (`http://127.0.0.1:port/v1.0`).
    pub async fn start(route: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let uri = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let route: Arc<Router> = Arc::new(route);
        let seen = Arc::clone(&requests);
        let base = format!("{uri}/v1.0");
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (route, seen, base) = (Arc::clone(&route), Arc::clone(&seen), base.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    loop {
                        let mut request_line = String::new();
                        if read.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut header = String::new();
                            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if header == "\r\n" {
                                break;
                            }
                        }
                        let target = request_line
                            .split_whitespace()
                            .nth(1)
                            .unwrap_or_default()
                            .to_string();
                        seen.lock().expect("lock").push(target.clone());
                        match route(&base, &target) {
                            // The connection stays open (this task holds it) until the test ends.
                            Reply::Hang => std::future::pending::<()>().await,
                            Reply::Trickle(interval, body) => {
                                let body = body.to_string();
                                let head = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                                    body.len()
                                );
                                if write.write_all(head.as_bytes()).await.is_err() {
                                    return;
                                }
                                for byte in body.as_bytes() {
                                    tokio::time::sleep(interval).await;
                                    if write.write_all(&[*byte]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Reply::Json(delay, body) => {
                                tokio::time::sleep(delay).await;
                                let body = body.to_string();
                                let head = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nrequest-id: raw-{}\r\n\r\n",
                                    body.len(),
                                    seen.lock().expect("lock").len()
                                );
                                if write.write_all(head.as_bytes()).await.is_err()
                                    || write.write_all(body.as_bytes()).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            uri,
            requests,
            accept,
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Request targets received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

impl Drop for RawGraph {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
