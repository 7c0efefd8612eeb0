//! Serving HTTP on a listener with hard edges, instead of `axum::serve` (which has no
//! header-read or idle timeout and accepts every connection it can): at most `max_connections`
//! at once (further clients wait in the kernel's backlog and cost no descriptor), headers
//! within `header_read_timeout`, no connection idle past `idle_timeout`, every request answered
//! or cut within `request_timeout`, optional per-source connection caps and request rates, and
//! a shutdown that waits at most `shutdown_grace` for requests in flight.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::abuse::{LogThrottle, Source};
use crate::config::ServerSettings;

/// Which listener: names it in metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Health, metrics, status page, admin API.
    Internal,
    /// The notification endpoints, reachable from the internet.
    Public,
}

impl Exposure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Public => "public",
        }
    }
}

/// What bounds one listener.
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// 0: no cap.
    pub max_connections_per_source: usize,
    /// 0: no limit.
    pub requests_per_source_per_second: u32,
}

impl Limits {
    pub fn internal(s: &ServerSettings) -> Self {
        Self {
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            request_timeout: s.request_timeout,
            shutdown_grace: s.shutdown_grace,
            max_connections: s.max_connections,
            max_connections_per_source: 0,
            requests_per_source_per_second: 0,
        }
    }

    pub fn public(s: &ServerSettings) -> Self {
        Self {
            request_timeout: s.public_request_timeout,
            max_connections: s.public_max_connections,
            max_connections_per_source: s.public_max_connections_per_source,
            requests_per_source_per_second: s.public_requests_per_source_per_second,
            ..Self::internal(s)
        }
    }
}

/// Serves `router` on `listener` until `stop`, then closes the listener, lets requests in
/// flight finish for at most `shutdown_grace`, and cuts the connections still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    exposure: Exposure,
    throttle: Arc<LogThrottle>,
    stop: CancellationToken,
) {
    let shared = Arc::new(Shared {
        router,
        exposure,
        throttle,
        per_source: Mutex::new(HashMap::new()),
        rate: NonZeroU32::new(limits.requests_per_source_per_second)
            .map(|n| RateLimiter::keyed(Quota::per_second(n))),
        limits,
    });
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut forget_rates_at = Instant::now() + Duration::from_secs(60);
    loop {
        while connections.try_join_next().is_some() {}
        // The permit comes first: at the limit nothing is accepted, so waiting clients hold
        // no descriptor of ours and the other listener keeps its own.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    crate::throttled_warn!(shared.throttle, "accept_failed", None,
                        "HTTP accept failed"; listener = exposure.as_str(), error = %e);
                    // Typically EMFILE: wait for descriptors to come back instead of spinning.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stop.cancelled() => break,
                    }
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let source = Source::of(peer.ip());
        let Some(held) = shared.hold(source) else {
            crate::metrics::http_connection_refused(exposure.as_str(), "per_source");
            crate::throttled_warn!(shared.throttle, "connections_per_source", Some(source),
                "connection refused: this source holds too many"; listener = exposure.as_str());
            continue;
        };
        if let Some(rate) = &shared.rate {
            if Instant::now() >= forget_rates_at {
                rate.retain_recent();
                forget_rates_at = Instant::now() + Duration::from_secs(60);
            }
        }
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let closing = closing.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _held = held;
            serve_connection(stream, peer, source, shared, closing).await;
        });
    }
    drop(listener);
    closing.cancel();
    let grace = tokio::time::timeout(shared.limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if grace.is_err() {
        tracing::warn!(
            listener = exposure.as_str(),
            cut = connections.len(),
            "shutdown grace over: closing connections with requests still in flight"
        );
        connections.shutdown().await;
    }
}

struct Shared {
    router: Router,
    exposure: Exposure,
    throttle: Arc<LogThrottle>,
    limits: Limits,
    per_source: Mutex<HashMap<Source, usize>>,
    rate: Option<DefaultKeyedRateLimiter<Source>>,
}

/// A connection counted against its source; released on drop.
struct Held {
    shared: Option<Arc<Shared>>,
    source: Source,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            let mut map = shared.per_source.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.source);
                }
            }
        }
    }
}

impl Shared {
    fn hold(self: &Arc<Self>, source: Source) -> Option<Held> {
        let cap = self.limits.max_connections_per_source;
        if cap == 0 {
            return Some(Held {
                shared: None,
                source,
            });
        }
        let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(source).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Held {
            shared: Some(Arc::clone(self)),
            source,
        })
    }
}

/// One connection: HTTP/1.1 with the header-read timeout in hyper, the idle timeout watched
/// here, the request timeout and the per-source rate around each request.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    source: Source,
    shared: Arc<Shared>,
    closing: CancellationToken,
) {
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let io = Watched {
        stream,
        started,
        activity: Arc::clone(&activity),
    };
    let listener = shared.exposure.as_str();
    crate::metrics::http_connection_opened(listener);
    let service_shared = Arc::clone(&shared);
    let service_busy = Arc::clone(&busy);
    let service_activity = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        let shared = Arc::clone(&service_shared);
        let busy = Arc::clone(&service_busy);
        let activity = Arc::clone(&service_activity);
        async move {
            // While a handler works, silence on the wire is ours, not the client's: the
            // request timeout bounds it instead of the idle timeout.
            busy.fetch_add(1, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = shared.answer(request, source).await;
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            activity.store(ms, Ordering::Relaxed);
            busy.fetch_sub(1, Ordering::Relaxed);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let idle = shared.limits.idle_timeout;
    let mut shutting_down = false;
    loop {
        let last = started + Duration::from_millis(activity.load(Ordering::Relaxed));
        // While a handler works, look again an idle period later (the request timeout bounds
        // the handler), rather than at a deadline already past.
        let check_at = if busy.load(Ordering::Relaxed) > 0 {
            Instant::now() + idle
        } else {
            last + idle
        };
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    if e.is_timeout() {
                        crate::metrics::http_timeout(listener, "header");
                    }
                    tracing::debug!(listener, error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            _ = closing.cancelled(), if !shutting_down => {
                // Finishes the request in flight, then closes; idle connections close now.
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            _ = tokio::time::sleep_until(check_at) => {
                let moved = started + Duration::from_millis(activity.load(Ordering::Relaxed));
                if moved == last && busy.load(Ordering::Relaxed) == 0 {
                    // Not a byte either way: a client that stopped sending its body or stopped
                    // reading the answer. Dropping the connection closes the socket.
                    crate::metrics::http_timeout(listener, "idle");
                    tracing::debug!(listener, "HTTP connection idle too long; closed");
                    break;
                }
            }
        }
    }
    crate::metrics::http_connection_closed(listener);
}

impl Shared {
    async fn answer(
        &self,
        request: Request<hyper::body::Incoming>,
        source: Source,
    ) -> Response<Body> {
        let listener = self.exposure.as_str();
        if let Some(rate) = &self.rate {
            if rate.check_key(&source).is_err() {
                crate::metrics::http_rate_limited(listener);
                crate::throttled_warn!(self.throttle, "rate_limited", Some(source),
                    "requests refused: over the per-source rate"; listener);
                return plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many requests from this source; retry later\n",
                    Some("1"),
                );
            }
        }
        let mut router = self.router.clone();
        let call = tower_service::Service::call(&mut router, request.map(Body::new));
        match tokio::time::timeout(self.limits.request_timeout, call).await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => {
                crate::metrics::http_timeout(listener, "request");
                crate::throttled_warn!(self.throttle, "request_timeout", Some(source),
                    "request cut: not read and answered within the request timeout"; listener);
                let mut response = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the request took too long\n",
                    None,
                );
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        }
    }
}

fn plain(
    status: StatusCode,
    text: &'static str,
    retry_after: Option<&'static str>,
) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    response
}

/// The socket, noting when a byte last moved either way (milliseconds since `started`).
struct Watched {
    stream: TcpStream,
    started: Instant,
    activity: Arc<AtomicU64>,
}

impl Watched {
    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
