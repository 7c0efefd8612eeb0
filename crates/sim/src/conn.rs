//! Connection serving. Connections are accepted and served here rather than by `axum::serve`
//! because some faults act on the connection itself: a reset must be a real TCP RST, and a hang
//! must keep the socket open without answering.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// Per-connection switch a handler uses to order an abortive close.
#[derive(Default)]
pub struct ConnCtl {
    reset: AtomicBool,
    notify: Notify,
}

impl ConnCtl {
    pub fn order_reset(&self) {
        self.reset.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// The socket as hyper sees it; on drop after a reset order it sets SO_LINGER to zero, so the
/// kernel sends RST instead of FIN.
struct ResettableStream {
    stream: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.ctl.reset.load(Ordering::SeqCst) {
            if let Err(e) = self.stream.set_zero_linger() {
                tracing::warn!(error = %e, "could not set SO_LINGER 0; reset degrades to close");
            }
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts until `shutdown` flips; each connection is served until it ends, a reset is ordered
/// or the simulator shuts down (which drops hung requests with their sockets).
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Typically EMFILE under load; back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_one(stream, router.clone(), shutdown.clone()));
            }
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

async fn serve_one(stream: TcpStream, router: Router, mut shutdown: watch::Receiver<bool>) {
    let ctl = Arc::new(ConnCtl::default());
    let io = ResettableStream {
        stream,
        ctl: ctl.clone(),
    };
    let req_ctl = ctl.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(req_ctl.clone());
            let mut router = router.clone();
            async move { tower_service::Service::call(&mut router, req).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        res = conn => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with error");
            }
        }
        _ = ctl.notify.notified() => {}
        _ = shutdown.changed() => {}
    }
}
