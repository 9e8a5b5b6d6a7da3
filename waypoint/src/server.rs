//! The waypoint's side of HBONE: every CONNECT stream the ztunnel HBONE server accepts for
//! the waypoint comes here. The authority names the original destination (a Service VIP or a
//! pod); the stream is then sniffed and served as HTTP/1.1, as HTTP/2 with prior knowledge,
//! or forwarded as opaque bytes to an endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use ztunnel::drain::Drain;
use ztunnel::hbone::server::{Handler, InboundRequest, Responder};
use ztunnel::hbone::FORWARDED;
use ztunnel::identity::SpiffeId;
use ztunnel::state::State;

use crate::forward::{Dest, Downstream, Forwarder};
use crate::io::{sniff_stream, H2Io, Sniffed};
use crate::snapshot::Snapshot;
use crate::upstream::{Proto, Upstreams};

/// The HBONE stream handler of a waypoint.
#[derive(Debug)]
pub struct Waypoint {
    identity: SpiffeId,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    forwarder: Arc<Forwarder>,
    upstreams: Arc<Upstreams>,
    sniff_timeout: Duration,
    drain: Drain,
}

impl Waypoint {
    /// A waypoint proving `identity`, routing on `snapshots`, sending through `upstreams`;
    /// a stream whose client has said nothing for `sniff_timeout` is taken as opaque (a
    /// server-first protocol). Once `drain` starts, HTTP connections are closed after their
    /// requests in progress (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY). Requests are
    /// handed to `forwarder`.
    pub fn new(
        identity: SpiffeId,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        upstreams: Arc<Upstreams>,
        forwarder: Arc<Forwarder>,
        sniff_timeout: Duration,
        drain: Drain,
    ) -> Arc<Waypoint> {
        Arc::new(Waypoint {
            identity,
            forwarder,
            snapshots,
            upstreams,
            sniff_timeout,
            drain,
        })
    }

    /// The connection cache, for logs and tests.
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    async fn serve_stream(self: Arc<Self>, req: InboundRequest, responder: Responder) {
        if self.drain.is_draining() {
            // A client that opens a stream on a connection from before the GOAWAY, or on a
            // new one, is told to go elsewhere.
            responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        let snap = self.snapshots.borrow().clone();
        let Some(dest) = destination(&snap.state, req.authority) else {
            tracing::info!(authority = %req.authority, client = %req.peer_identity,
                "HBONE stream refused: not a Service port or pod the waypoint knows");
            responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        };
        let client = forwarded_for(&req).unwrap_or(req.peer);
        let (send, mut recv) = match responder.accept() {
            Ok(halves) => halves,
            Err(e) => {
                tracing::debug!(error = %e, "HBONE stream gone before it was answered");
                return;
            }
        };
        let mut seen = BytesMut::new();
        let sniffed =
            tokio::time::timeout(self.sniff_timeout, sniff_stream(&mut recv, &mut seen)).await;
        let kind = match sniffed {
            Ok(Ok(kind)) => kind,
            Err(_) => Sniffed::Opaque,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HBONE stream failed before its first bytes");
                return;
            }
        };
        let io = TokioIo::new(H2Io::new(send, recv, seen.freeze()));
        let proto = match kind {
            Sniffed::Http1 => Proto::Http1,
            Sniffed::Http2 => Proto::Http2,
            Sniffed::Opaque | Sniffed::NeedMore => {
                let decision = self.forwarder.authorize_stream(
                    &snap,
                    &dest,
                    req.authority,
                    client,
                    &req.peer_identity,
                );
                if !decision.allowed() {
                    // Dropping the stream resets it: a TCP client sees its connection reset.
                    tracing::info!(target: "access", ?dest, %client, src_identity = %req.peer_identity,
                        authz = "DENY", policy = decision.reason.policy().unwrap_or("-"),
                        authz_reason = %decision.reason, "opaque stream denied");
                    return;
                }
                return self
                    .forward_opaque(&snap, dest, req.authority, client, io.into_inner())
                    .await;
            }
        };
        let down = Arc::new(Downstream {
            dest,
            authority: req.authority,
            client,
            identity: req.peer_identity,
            proto,
        });
        let fwd = self.forwarder.clone();
        let service = service_fn(move |r| {
            let (fwd, down) = (fwd.clone(), down.clone());
            async move { fwd.handle(r, &down).await }
        });
        let served = match proto {
            Proto::Http1 => {
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                until_drained(conn, &self.drain, |c| c.graceful_shutdown()).await
            }
            Proto::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service);
                until_drained(conn, &self.drain, |c| c.graceful_shutdown()).await
            }
        };
        if let Err(e) = served {
            tracing::debug!(%client, error = %e, "downstream HTTP connection ended");
        }
    }

    /// Copies an opaque stream to an endpoint of `dest`, reached in the family of
    /// `authority` (the address the client dialled).
    async fn forward_opaque(
        &self,
        snap: &Snapshot,
        dest: Dest,
        authority: SocketAddr,
        client: SocketAddr,
        mut io: H2Io,
    ) {
        let like = self.upstreams.source_for(authority.ip());
        let ep = match Forwarder::endpoint(snap, &dest, like) {
            Ok(ep) => ep,
            Err((_, why)) => {
                tracing::info!(?dest, %client, error = %why, "opaque stream dropped");
                return;
            }
        };
        let mut up = match self.upstreams.connect(&ep, client).await {
            Ok(up) => up,
            Err(e) => {
                tracing::info!(?dest, %client, error = %e, "opaque stream dropped");
                return;
            }
        };
        let result = tokio::io::copy_bidirectional(&mut io, &mut up).await;
        match result {
            Ok((sent, received)) => tracing::info!(
                target: "access", ?dest, %client, upstream = %ep.authority(), sent, received, "opaque stream"
            ),
            Err(e) => tracing::info!(
                target: "access", ?dest, %client, upstream = %ep.authority(), error = %e, "opaque stream"
            ),
        }
    }
}

impl Handler for Waypoint {
    fn identity_for(&self, _local: SocketAddr) -> Option<SpiffeId> {
        Some(self.identity.clone())
    }

    fn serve(
        self: Arc<Self>,
        req: InboundRequest,
        responder: Responder,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.serve_stream(req, responder))
    }
}

/// Runs `conn` to its end; when `drain` starts first, asks it to `shutdown` gracefully and
/// lets it finish what it has in progress.
async fn until_drained<C, E>(
    conn: C,
    drain: &Drain,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => return done,
        _ = drain.started() => shutdown(conn.as_mut()),
    }
    conn.await
}

/// What a CONNECT authority names: a port of a Service VIP, or a known pod.
pub fn destination(state: &State, authority: SocketAddr) -> Option<Dest> {
    if let Some(svc) = state.service_by_vip(authority.ip()) {
        return svc
            .ports
            .iter()
            .any(|p| p.port == authority.port())
            .then(|| Dest::Service {
                key: svc.key(),
                port: authority.port(),
            });
    }
    state.workload(authority.ip()).map(|_| Dest::Pod(authority))
}

/// The original client from the CONNECT's `forwarded: for="ip:port"`.
fn forwarded_for(req: &InboundRequest) -> Option<SocketAddr> {
    let v = req.headers.get(FORWARDED)?.to_str().ok()?;
    v.split(';')
        .flat_map(|p| p.split(','))
        .find_map(|p| p.trim().strip_prefix("for="))
        .map(|f| f.trim_matches('"'))
        .and_then(|f| f.parse().ok())
}
