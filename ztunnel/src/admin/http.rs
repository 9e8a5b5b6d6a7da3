//! The HTTP/1.1 server behind the admin, metrics and readiness ports: hyper, with the bounds
//! that keep a slow or abusive client from holding a port.
//!
//! Every process in the node's network namespace (each host-network pod) can connect to these
//! ports, so what one client may hold is bounded ([`Limits`]):
//! - at most `max_connections` connections per port; more wait in the listen backlog until one
//!   ends (so the memory a port can hold is bounded too);
//! - a new connection, or a kept-alive one that has started its next request, must deliver the
//!   whole request head within `header_timeout`; a kept-alive connection may idle for
//!   `idle_timeout` between requests (longer than common scrape intervals, so Prometheus reuses
//!   its connection);
//! - a request head over `max_header_bytes` gets 431 and a body over `max_body_bytes` 413 (no
//!   route takes a body), a body that does not arrive within `body_timeout` 408, and a client
//!   that stops reading its response is dropped after `write_stall` without progress.
//!
//! `HEAD` is answered as `GET` without the body (hyper leaves it out); the routes answer 405
//! with an `Allow` header for other methods.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use super::Reply;

/// What one client may hold of a port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once per port.
    pub max_connections: usize,
    /// Time to deliver a request head, from the connection's start or the request's first byte.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time to deliver a request body.
    pub body_timeout: Duration,
    /// Time a response may make no progress because the client does not read it.
    pub write_stall: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Limits {
    /// The daemon's limits. A scrape, a probe or `ztunnel status` needs one or two connections
    /// and a head of a few hundred bytes.
    pub const DEFAULT: Limits = Limits {
        max_connections: 32,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(90),
        body_timeout: Duration::from_secs(10),
        write_stall: Duration::from_secs(10),
        max_header_bytes: 8 * 1024,
        max_body_bytes: 4 * 1024,
    };
}

/// A request as the routes see it.
#[derive(Debug)]
pub struct Request<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without `?` (empty when none).
    pub query: &'a str,
}

impl Request<'_> {
    /// Whether the request only reads (`GET` or `HEAD`).
    pub fn is_read(&self) -> bool {
        matches!(*self.method, Method::GET | Method::HEAD)
    }
}

/// A listener the server accepts on (TCP or unix socket).
pub trait Listen: Send + 'static {
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listen for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listen for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Serves `route` on `listener` for as long as the process runs, within `limits`. `port`
/// names the port in log lines.
pub async fn serve<L, F>(listener: L, port: &'static str, limits: Limits, route: F)
where
    L: Listen,
    F: Fn(&Request<'_>) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // Take a slot before accepting: beyond the cap, clients wait in the listen backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                // Out of descriptors or memory: let it pass rather than spin.
                tracing::debug!(port, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, limits, route).await {
                tracing::debug!(port, %error, "connection ended on an error");
            }
            drop(slot);
        });
    }
}

/// Serves one connection until the client closes it or breaks a limit.
async fn connection<S, F>(stream: S, limits: Limits, route: Arc<F>) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Request<'_>) -> Reply + Send + Sync + 'static,
{
    let phase = Arc::new(AtomicU8::new(HEAD));
    let io = Deadlines::new(stream, phase.clone(), limits);
    let service = hyper::service::service_fn(move |req| {
        let (route, phase) = (route.clone(), phase.clone());
        async move {
            phase.store(BUSY, Ordering::Relaxed);
            let response = respond(req, limits, &*route).await;
            phase.store(IDLE, Ordering::Relaxed);
            Ok::<_, Infallible>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_header_size(limits.max_header_bytes)
        // The deadlines are `Deadlines`' (hyper's own header timeout also counts idle time).
        .header_read_timeout(None)
        .serve_connection(io, service)
        .await
}

/// Reads (and discards) the body within the limits, then routes.
async fn respond<F>(req: hyper::Request<Incoming>, limits: Limits, route: &F) -> Response
where
    F: Fn(&Request<'_>) -> Reply,
{
    let (head, body) = req.into_parts();
    if let Err(refusal) = drain_body(body, limits).await {
        // The rest of the body is not read: the connection cannot carry another request.
        return response(refusal, true);
    }
    let request = Request {
        method: &head.method,
        path: head.uri.path(),
        query: head.uri.query().unwrap_or(""),
    };
    response(route(&request), false)
}

/// Reads a request body to its end, refusing one over `max_body_bytes` (413) or one that takes
/// longer than `body_timeout` (408).
async fn drain_body(mut body: Incoming, limits: Limits) -> Result<(), Reply> {
    let too_large = || Reply::text(413, "request body too large: these routes take no body\n");
    if body.size_hint().lower() > limits.max_body_bytes as u64 {
        return Err(too_large());
    }
    let read = async {
        let mut total = 0usize;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| Reply::text(400, format!("bad request body: {e}\n")))?;
            total += frame.data_ref().map_or(0, Bytes::len);
            if total > limits.max_body_bytes {
                return Err(too_large());
            }
        }
        Ok(())
    };
    tokio::time::timeout(limits.body_timeout, read)
        .await
        .unwrap_or_else(|_| Err(Reply::text(408, "request body timed out\n")))
}

type Response = hyper::Response<Full>;

fn response(reply: Reply, close: bool) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = hyper::Response::new(Full(Some(Bytes::from(reply.body))));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if let Some(allow) = reply.allow {
        headers.insert(ALLOW, HeaderValue::from_static(allow));
    }
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// A response body sent whole, with its length known up front (so it goes out with
/// `content-length`, and without a body for `HEAD`).
#[derive(Debug)]
pub struct Full(Option<Bytes>);

impl HttpBody for Full {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// Where a connection is, for its read deadline: waiting for a request head, being answered
/// (no read deadline: the body has its own), or idle between requests.
const HEAD: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// A connection's socket as hyper reads and writes it, with the deadlines of [`Limits`]: reads
/// fail with `TimedOut` once the head or the idle time is over, writes once the client has
/// read nothing for `write_stall`. hyper then closes the connection.
struct Deadlines<S> {
    io: S,
    /// Set by the service (answering, idle) and here (a new request's first byte).
    phase: Arc<AtomicU8>,
    /// The phase the read deadline was set for.
    seen: u8,
    read_deadline: Option<Instant>,
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
    limits: Limits,
}

impl<S> Deadlines<S> {
    fn new(io: S, phase: Arc<AtomicU8>, limits: Limits) -> Self {
        Deadlines {
            io,
            phase,
            seen: HEAD,
            read_deadline: Some(Instant::now() + limits.header_timeout),
            read_timer: None,
            write_timer: None,
            limits,
        }
    }

    /// Follows the phase: a new deadline whenever it changed since the last read.
    fn track_phase(&mut self) {
        let phase = self.phase.load(Ordering::Relaxed);
        if phase != self.seen {
            self.set_phase(phase);
        }
    }

    fn set_phase(&mut self, phase: u8) {
        self.seen = phase;
        self.phase.store(phase, Ordering::Relaxed);
        self.read_deadline = match phase {
            HEAD => Some(Instant::now() + self.limits.header_timeout),
            IDLE => Some(Instant::now() + self.limits.idle_timeout),
            _ => None,
        };
    }
}

/// Whether `deadline` has passed, registering `cx` to be woken when it does.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    let sleep = match timer {
        Some(sleep) => {
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            sleep
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    sleep.as_mut().poll(cx).is_ready()
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

impl<S: AsyncRead + Unpin> hyper::rt::Read for Deadlines<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.track_phase();
        // Read through a small buffer of our own: `put_slice` is the cursor's safe way in.
        let mut chunk = [0u8; 4096];
        let n = buf.remaining().min(chunk.len());
        let mut read = tokio::io::ReadBuf::new(&mut chunk[..n]);
        match Pin::new(&mut this.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                if this.seen == IDLE && !read.filled().is_empty() {
                    this.set_phase(HEAD);
                }
                buf.put_slice(read.filled());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.read_deadline {
                Some(d) if expired(&mut this.read_timer, d, cx) => {
                    Poll::Ready(Err(timed_out(if this.seen == IDLE {
                        "idle keep-alive connection"
                    } else {
                        "request head"
                    })))
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> Deadlines<S> {
    /// Runs a write-side operation; while it makes no progress, the write-stall deadline runs.
    fn stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match op(Pin::new(&mut self.io), cx) {
            Poll::Ready(r) => {
                self.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = match &self.write_timer {
                    Some(t) => t.deadline(),
                    None => Instant::now() + self.limits.write_stall,
                };
                if expired(&mut self.write_timer, deadline, cx) {
                    return Poll::Ready(Err(timed_out("response write")));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> hyper::rt::Write for Deadlines<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stalled(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .stalled(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stalled(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stalled(cx, |io, cx| io.poll_shutdown(cx))
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
