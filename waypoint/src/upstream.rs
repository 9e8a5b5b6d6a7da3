//! Connections to endpoint pods, and HTTP over them.
//!
//! An enrolled endpoint is reached over HBONE through the ztunnel pool (the pool multiplexes
//! CONNECT streams on shared mTLS connections); a pod outside the mesh over plain TCP. On top,
//! one HTTP connection per stream: HTTP/1.1 connections are kept in a small idle list per
//! endpoint and reused request after request (one request at a time each), an HTTP/2
//! connection is shared by all concurrent requests to the endpoint. Either way a request
//! normally costs no new CONNECT.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use ztunnel::hbone::client::{ConnectRequest, Pool, PoolKey};
use ztunnel::identity::SpiffeId;
use ztunnel::socket::{Leg, SocketFactory};
use ztunnel::state::Workload;

use crate::io::H2Io;

/// Boxed error of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the waypoint forwards or makes.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A byte stream to an endpoint: an HBONE stream or a TCP connection.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The HTTP version spoken to endpoints: the one the client spoke, since the client chose it
/// for this destination (an HTTP/2 prior-knowledge client talks to an h2c server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 without TLS (prior knowledge).
    Http2,
}

/// An endpoint pod, the address it is reached at and the port to reach on it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The pod.
    pub workload: Arc<Workload>,
    /// The pod's address in the flow's family (a dual-stack pod has one of each): an IPv6
    /// flow goes on to the pod's IPv6 address.
    pub ip: IpAddr,
    /// Target port on the pod.
    pub port: u16,
}

impl Endpoint {
    /// `pod ip:port` (`[ip]:port` for IPv6), the CONNECT authority.
    pub fn authority(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// Why an attempt failed before a response came back.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The HBONE or TCP connection could not be opened.
    #[error("connect to {authority}: {error}")]
    Connect {
        /// Endpoint.
        authority: SocketAddr,
        /// Cause.
        error: String,
    },
    /// The HTTP handshake on a fresh connection failed.
    #[error("HTTP handshake with {authority}: {error}")]
    Handshake {
        /// Endpoint.
        authority: SocketAddr,
        /// Cause.
        error: hyper::Error,
    },
    /// The request failed on the connection (reset, closed before the response).
    #[error("request to {authority}: {error}")]
    Request {
        /// Endpoint.
        authority: SocketAddr,
        /// Cause.
        error: hyper::Error,
    },
}

/// The idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_HTTP1: usize = 32;
/// A kept connection unused this long is closed (it holds an HBONE stream, and its endpoint
/// may be long gone).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often kept connections are checked for [`IDLE_TIMEOUT`].
const REAP_EVERY: Duration = Duration::from_secs(5);

type Key = (SocketAddr, SpiffeId);
/// Idle HTTP/1.1 connections per endpoint, each with the time it went idle.
type Idle1 = HashMap<Key, Vec<(http1::SendRequest<Body>, Instant)>>;
/// The shared HTTP/2 connection per endpoint, with the time of its last request.
type Shared2 = HashMap<Key, (http2::SendRequest<Body>, Instant)>;

/// Where the waypoint's upstream connections come from and are kept.
#[derive(Debug)]
pub struct Upstreams {
    pool: Pool,
    sockets: Arc<dyn SocketFactory>,
    identity: SpiffeId,
    /// The waypoint pod's addresses, at most one per family, never empty.
    srcs: Vec<IpAddr>,
    hbone_port: u16,
    baggage: String,
    http1: Mutex<Idle1>,
    http2: Mutex<Shared2>,
}

impl Upstreams {
    /// Upstreams presenting `identity` from the pod addresses `srcs` (one per family the pod
    /// has; the first is used when a flow's family has none), dialling endpoints' HBONE on
    /// `hbone_port`, with `baggage` naming the waypoint in each CONNECT.
    ///
    /// # Panics
    /// When `srcs` is empty: the waypoint's flags require at least one address.
    pub fn new(
        pool: Pool,
        sockets: Arc<dyn SocketFactory>,
        identity: SpiffeId,
        srcs: Vec<IpAddr>,
        hbone_port: u16,
        baggage: String,
    ) -> Arc<Upstreams> {
        assert!(!srcs.is_empty(), "a waypoint has at least one pod address");
        let upstreams = Arc::new(Upstreams {
            pool,
            sockets,
            identity,
            srcs,
            hbone_port,
            baggage,
            http1: Mutex::new(HashMap::new()),
            http2: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&upstreams);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                let Some(upstreams) = weak.upgrade() else {
                    return;
                };
                upstreams.reap(Instant::now());
            }
        });
        upstreams
    }

    /// The waypoint's own address for a flow to `like`: its pod address of the same family, so
    /// a flow stays in one family from the client to the endpoint; a waypoint given addresses
    /// of one family only forwards every flow in that family.
    pub fn source_for(&self, like: IpAddr) -> IpAddr {
        self.srcs
            .iter()
            .copied()
            .find(|ip| ip.is_ipv6() == like.is_ipv6())
            .unwrap_or(self.srcs[0])
    }

    /// Drops kept connections that are closed or have been unused for [`IDLE_TIMEOUT`] at
    /// `now`; a task runs it every few seconds.
    pub fn reap(&self, now: Instant) {
        let fresh = |since: &Instant| now.duration_since(*since) < IDLE_TIMEOUT;
        self.lock_http1().retain(|_, list| {
            list.retain(|(s, since)| !s.is_closed() && fresh(since));
            !list.is_empty()
        });
        self.lock_http2()
            .retain(|_, (s, since)| !s.is_closed() && fresh(since));
    }

    /// Opens a byte stream to `ep`: HBONE with the endpoint's identity expected when it is
    /// enrolled, TCP otherwise. `client` goes into the CONNECT's `forwarded`.
    pub async fn connect(
        &self,
        ep: &Endpoint,
        client: SocketAddr,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let authority = ep.authority();
        let err = |error: String| UpstreamError::Connect { authority, error };
        let src = self.source_for(ep.ip);
        if ep.workload.enrolled {
            let key = PoolKey {
                src_identity: self.identity.clone(),
                src_ip: src,
                dst_identities: vec![(*ep.workload.identity).clone()],
                dst: SocketAddr::new(ep.ip, self.hbone_port),
            };
            let req = ConnectRequest {
                authority,
                client,
                baggage: self.baggage.clone(),
            };
            let flow = self
                .pool
                .connect(&key, &req)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok(Box::new(H2Io::from_flow(flow)))
        } else {
            let tcp = self
                .sockets
                .connect(Leg::Node, Some(src), authority)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok(Box::new(tcp))
        }
    }

    /// Sends `req` to `ep` in `proto`, on a kept connection when one is free.
    pub async fn send(
        self: &Arc<Self>,
        ep: &Endpoint,
        proto: Proto,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let authority = ep.authority();
        let key = (authority, (*ep.workload.identity).clone());
        let request_err = |error| UpstreamError::Request { authority, error };
        match proto {
            Proto::Http1 => {
                let mut sender = match self.idle_http1(&key).await {
                    Some(s) => s,
                    None => {
                        let io = self.connect(ep, self.own_addr(ep)).await?;
                        let (sender, conn) = http1::handshake(TokioIo::new(io))
                            .await
                            .map_err(|error| UpstreamError::Handshake { authority, error })?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(%authority, error = %e, "upstream HTTP/1.1 connection ended");
                            }
                        });
                        sender
                    }
                };
                let resp = sender.send_request(req).await.map_err(request_err)?;
                let back = Some((self.clone(), key, sender));
                Ok(resp.map(|body| Checkin::new(body, back).boxed_unsync()))
            }
            Proto::Http2 => {
                let mut sender = match self.shared_http2(&key) {
                    Some(s) => s,
                    None => {
                        let io = self.connect(ep, self.own_addr(ep)).await?;
                        let (sender, conn) =
                            http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                                .await
                                .map_err(|error| UpstreamError::Handshake { authority, error })?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(%authority, error = %e, "upstream HTTP/2 connection ended");
                            }
                        });
                        self.lock_http2()
                            .insert(key, (sender.clone(), Instant::now()));
                        sender
                    }
                };
                sender.ready().await.map_err(request_err)?;
                let resp = sender.send_request(req).await.map_err(request_err)?;
                Ok(resp.map(|body| body.map_err(BoxError::from).boxed_unsync()))
            }
        }
    }

    /// The waypoint's address towards `ep`: the client the endpoint's daemon is told of for a
    /// request the waypoint makes (HTTP is terminated here; the original client travels in
    /// `x-forwarded-for`).
    fn own_addr(&self, ep: &Endpoint) -> SocketAddr {
        SocketAddr::new(self.source_for(ep.ip), 0)
    }

    /// A kept HTTP/1.1 connection to `key` that is ready for a request.
    async fn idle_http1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        loop {
            let (mut sender, _) = self.lock_http1().get_mut(key).and_then(Vec::pop)?;
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, key: Key, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock_http1();
        let list = idle.entry(key).or_default();
        list.retain(|(s, _)| !s.is_closed());
        if list.len() < MAX_IDLE_HTTP1 {
            list.push((sender, Instant::now()));
        }
    }

    fn shared_http2(&self, key: &Key) -> Option<http2::SendRequest<Body>> {
        let mut shared = self.lock_http2();
        match shared.get_mut(key) {
            Some((s, used)) if !s.is_closed() => {
                *used = Instant::now();
                Some(s.clone())
            }
            Some(_) => {
                shared.remove(key);
                None
            }
            None => None,
        }
    }

    fn lock_http1(&self) -> std::sync::MutexGuard<'_, Idle1> {
        self.http1.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_http2(&self) -> std::sync::MutexGuard<'_, Shared2> {
        self.http2.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kept connections (HTTP/1.1 idle, HTTP/2 shared), for logs and tests.
    pub fn kept(&self) -> (usize, usize) {
        let h1 = self.lock_http1().values().map(Vec::len).sum();
        (h1, self.lock_http2().len())
    }
}

/// A response body that hands its HTTP/1.1 connection back to the idle list once the body
/// has been read to its end (a body dropped halfway leaves the connection unusable, so it is
/// dropped with it).
struct Checkin {
    inner: Incoming,
    back: Option<(Arc<Upstreams>, Key, http1::SendRequest<Body>)>,
}

impl Checkin {
    fn new(
        inner: Incoming,
        back: Option<(Arc<Upstreams>, Key, http1::SendRequest<Body>)>,
    ) -> Checkin {
        let mut body = Checkin { inner, back };
        if body.inner.is_end_stream() {
            body.done();
        }
        body
    }

    fn done(&mut self) {
        if let Some((upstreams, key, sender)) = self.back.take() {
            upstreams.checkin(key, sender);
        }
    }
}

impl hyper::body::Body for Checkin {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.done(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.done(),
            _ => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
