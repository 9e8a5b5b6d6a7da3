//! Incoming HBONE: accept TCP on 15008, terminate mutual TLS with the certificate of the pod
//! the connection was addressed to, then serve each HTTP/2 CONNECT stream with a [`Handler`].
//!
//! The certificate is chosen by the connection's local address: capture delivers connections
//! for `<pod ip>:15008` with that pod IP as the local address, so the server proves exactly the
//! identity the client expects for that pod.
//!
//! What a peer may hold is bounded ([`super::limits`]): connections are admitted at accept
//! (handshakes and connections in total, per source address), TLS and the HTTP/2 preface have
//! one deadline together, the identity is counted once known, every stream is admitted before
//! the handler sees it, and HTTP/2 itself caps streams per connection
//! (SETTINGS_MAX_CONCURRENT_STREAMS) and the request header list
//! (SETTINGS_MAX_HEADER_LIST_SIZE: h2 answers a larger request 431 and resets the stream,
//! before any of it reaches this code). Idle peers are pinged (HTTP/2 PING) and probed (TCP
//! keepalive), so dead ones are released.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::limits::{Admitted, Limits, OpenMark, Reason};
use super::window::{pinger, resized, Ended, Window};
use crate::config::{HboneConfig, InboundLimits};
use crate::drain::Drain;
use crate::identity::{CertManager, SpiffeId};
use crate::tls;

/// A served HBONE connection.
type ServerConn = h2::server::Connection<tokio_rustls::server::TlsStream<super::Transport>, Bytes>;

/// A connection past its handshakes: the HTTP/2 connection, the client's identity, the local
/// address it came to, and its adaptive receive window.
type Handshaken = (ServerConn, SpiffeId, SocketAddr, Option<Arc<Window>>);

/// One CONNECT stream, validated as far as HBONE itself goes.
#[derive(Debug)]
pub struct InboundRequest {
    /// TCP peer of the HBONE connection.
    pub peer: SocketAddr,
    /// Local address the connection was made to (the destination pod's IP and 15008).
    pub local: SocketAddr,
    /// Identity from the client certificate.
    pub peer_identity: SpiffeId,
    /// Parsed `:authority`.
    pub authority: SocketAddr,
    /// All request headers.
    pub headers: HeaderMap,
}

/// Answers to an inbound stream: either a status that ends it, or 200 and the two halves.
#[derive(Debug)]
pub struct Responder {
    respond: SendResponse<Bytes>,
    /// Data from the client.
    pub recv: RecvStream,
    /// The connection's adaptive receive window, told how the stream's data is taken
    /// ([`crate::splice::hbone`]).
    pub window: Option<Arc<Window>>,
    /// Tells the limits the stream's descriptors are open once it is accepted.
    opened: Option<OpenMark>,
}

impl Responder {
    /// Refuses the stream with `status` (400, 401, 503, …).
    pub fn refuse(mut self, status: StatusCode) {
        let resp = Response::builder().status(status).body(());
        if let Ok(resp) = resp {
            let _ = self.respond.send_response(resp, true);
        }
    }

    /// Accepts the stream; returns the send half.
    pub fn accept(mut self) -> Result<(SendStream<Bytes>, RecvStream), h2::Error> {
        if let Some(mark) = self.opened.take() {
            mark.mark();
        }
        let resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .map_err(|_| h2::Error::from(h2::Reason::INTERNAL_ERROR))?;
        let send = self.respond.send_response(resp, false)?;
        Ok((send, self.recv))
    }
}

/// What the proxy layer (the node daemon's inbound side, or a waypoint) supplies to the
/// server: which certificate to present, and what to do with each stream.
pub trait Handler: Send + Sync + 'static {
    /// Identity whose certificate to present for connections to `local`; `None` refuses the
    /// connection (no local enrolled pod has that address).
    fn identity_for(&self, local: SocketAddr) -> Option<SpiffeId>;
    /// Serves one stream to the end.
    fn serve(
        self: Arc<Self>,
        req: InboundRequest,
        responder: Responder,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The HBONE server: TLS and HTTP/2 handshakes, stream validation, GOAWAY on drain. It does
/// not accept connections itself: the caller's accept loop hands each one to [`Server::serve`]
/// (the daemon places connections on its data-plane workers; [`Server::run`] is the simple
/// loop for everyone else).
pub struct Server<H> {
    cfg: HboneConfig,
    limits: Arc<Limits>,
    trust_domain: String,
    certs: Arc<CertManager>,
    handler: Arc<H>,
    drain: Drain,
    /// Server configs by identity and certificate serial, rebuilt on renewal.
    configs: Mutex<HashMap<SpiffeId, (String, Arc<ServerConfig>)>>,
}

impl<H: Handler> Server<H> {
    /// A server presenting certificates from `certs`, trusting clients of `trust_domain`,
    /// and sending GOAWAY once `drain` starts, with the default [`InboundLimits`]. Every
    /// stream holds a drain guard while it runs.
    pub fn new(
        cfg: HboneConfig,
        trust_domain: &str,
        certs: Arc<CertManager>,
        handler: Arc<H>,
        drain: Drain,
    ) -> Arc<Self> {
        let limits = Limits::new(InboundLimits::default());
        Self::with_limits(cfg, limits, trust_domain, certs, handler, drain)
    }

    /// [`Server::new`] with the given limits (shared with whoever samples descriptors and
    /// serves the metrics).
    pub fn with_limits(
        cfg: HboneConfig,
        limits: Arc<Limits>,
        trust_domain: &str,
        certs: Arc<CertManager>,
        handler: Arc<H>,
        drain: Drain,
    ) -> Arc<Self> {
        Arc::new(Server {
            cfg,
            limits,
            trust_domain: trust_domain.to_string(),
            certs,
            handler,
            drain,
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts connections forever, each served on a task of its own. `listener` comes from a
    /// [`crate::socket::SocketFactory`], so what it accepts has Nagle's algorithm off: an
    /// HTTP/2 response often leaves in two writes (HEADERS, then DATA), and with Nagle the
    /// second waits for the peer's ACK of the first.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let errors = crate::accept::AcceptErrors::new();
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    tokio::spawn(self.clone().serve(tcp, peer));
                }
                Err(e) => {
                    errors.handle(&listener, "hbone", e).await;
                }
            }
        }
    }

    /// The server's limits and counts.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Serves one accepted connection to its end, if the limits admit it (else it is closed
    /// at once, counted and logged). A connection does not count for the drain itself (its
    /// streams do, each from its start): draining sends it GOAWAY and waits for the streams.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        match self.limits.admit(peer.ip()) {
            Ok(admitted) => self.serve_admitted(tcp, peer, admitted).await,
            Err(reason) => self
                .limits
                .refused_connection(reason, peer, "closed at accept"),
        }
    }

    /// Serves a connection the caller's accept loop has already admitted with
    /// [`Limits::admit`] (so that a refused one is closed before it is handed to a worker).
    pub async fn serve_admitted(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
    ) {
        if let Err((reason, detail)) = self.serve_connection(tcp, peer, admitted).await {
            self.limits.refused_connection(reason, peer, &detail);
        }
    }

    async fn tls_config(&self, id: &SpiffeId) -> Result<Arc<ServerConfig>, String> {
        let cert = self
            .certs
            .fetch(id, self.cfg.connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((serial, cfg)) = configs.get(id) {
            if *serial == cert.serial {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(
            tls::server_config(
                cert.certified.clone(),
                self.certs.roots(),
                &self.trust_domain,
            )
            .map_err(|e| e.to_string())?,
        );
        configs.insert(id.clone(), (cert.serial.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// TLS and HTTP/2 handshakes of an accepted connection: the connection, its client's
    /// identity and its local address.
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<Handshaken, (Reason, String)> {
        let failed = |e: String| (Reason::HandshakeFailed, e);
        let local = tcp.local_addr().map_err(|e| failed(e.to_string()))?;
        let id = self.handler.identity_for(local).ok_or_else(|| {
            (
                Reason::NoWorkload,
                format!("no local enrolled workload at {local}"),
            )
        })?;
        let acceptor = TlsAcceptor::from(self.tls_config(&id).await.map_err(failed)?);
        super::set_tcp_keepalive(&tcp, self.limits.config().tcp_keepalive);
        let lim = self.limits.config();
        let bounds = self.cfg.window_bounds();
        let mut tls_stream = acceptor
            .accept(super::transport(tcp, &self.cfg))
            .await
            .map_err(|e| failed(format!("TLS handshake failed: {e}")))?;
        super::tune(tls_stream.get_mut().1);
        let peer_identity = tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
            .ok_or_else(|| failed("client certificate has no SPIFFE identity".to_string()))?;
        let conn = h2::server::Builder::new()
            .initial_window_size(bounds.start)
            .initial_connection_window_size(self.cfg.connection_window)
            .max_frame_size(self.cfg.max_frame_size)
            .max_send_buffer_size(self.cfg.send_buffer as usize)
            .max_concurrent_streams(lim.max_streams)
            .max_header_list_size(lim.max_header_list_size)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|e| failed(format!("HTTP/2 handshake failed: {e}")))?;
        tracing::debug!(%peer, %local, client = %peer_identity, "HBONE connection accepted");
        Ok((conn, peer_identity, local, Window::new(bounds)))
    }

    async fn serve_connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        mut admitted: Admitted,
    ) -> Result<(), (Reason, String)> {
        let lim = self.limits.config();
        // Boxed: the handshakes' state (2 KiB) would otherwise size the connection's task for
        // its whole life. One deadline for TLS and the HTTP/2 preface together.
        let handshake = Box::pin(tokio::time::timeout(
            lim.handshake_timeout,
            self.handshake(tcp, peer),
        ));
        let (mut conn, peer_identity, local, window) = tokio::select! {
            r = handshake => match r {
                Ok(r) => r?,
                Err(_) => {
                    return Err((
                        Reason::HandshakeTimeout,
                        format!("no TLS and HTTP/2 handshake within {:?}", lim.handshake_timeout),
                    ))
                }
            },
            _ = admitted.evicted() => {
                return Err((
                    Reason::Handshakes,
                    "the oldest handshake, closed to make room for a newer one".to_string(),
                ))
            }
        };
        admitted
            .handshaken(&peer_identity)
            .map_err(|r| (r, format!("client {peer_identity}")))?;
        let keepalive = keepalive(
            conn.ping_pong(),
            window.clone(),
            lim.keepalive_interval,
            lim.keepalive_timeout,
        );
        let mut keepalive = std::pin::pin!(keepalive);
        let drain = &self.drain;
        let mut goaway_sent = false;
        loop {
            let next = tokio::select! {
                n = conn.accept() => n,
                _ = drain.started(), if !goaway_sent => {
                    // Streams in progress go on; the client opens no new ones here.
                    conn.graceful_shutdown();
                    goaway_sent = true;
                    tracing::debug!(%peer, "HBONE connection draining: GOAWAY sent");
                    continue;
                }
                () = resized(window.as_deref()) => {
                    if let Some(w) = &window {
                        w.apply(|n| conn.set_initial_window_size(n));
                    }
                    continue;
                }
                _ = &mut keepalive => {
                    // Dropping the connection closes the socket and ends its streams.
                    return Err((
                        Reason::KeepaliveTimeout,
                        format!("no PING answer within {:?}; closed", lim.keepalive_timeout),
                    ));
                }
            };
            let Some(next) = next else { break };
            let (request, respond) = match next {
                Ok(r) => r,
                Err(e) if e.is_go_away() && e.is_library() => {
                    // h2 closed the connection for a protocol violation of the client's.
                    return Err((Reason::ProtocolError, e.to_string()));
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HBONE connection ended");
                    break;
                }
            };
            let (parts, recv) = request.into_parts();
            let mut responder = Responder {
                respond,
                recv,
                window: window.clone(),
                opened: None,
            };
            let authority = match connect_authority(&parts.method, &parts.uri) {
                Some(a) => a,
                None => {
                    tracing::info!(%peer, method = %parts.method, uri = %parts.uri,
                        "HBONE request refused: not CONNECT to ip:port");
                    responder.refuse(StatusCode::BAD_REQUEST);
                    continue;
                }
            };
            let counted = match admitted.open_stream() {
                Ok(g) => {
                    responder.opened = Some(g.open_mark());
                    g
                }
                Err(reason) => {
                    self.limits.refused_stream(reason, peer, &peer_identity);
                    responder.refuse(reason.status());
                    continue;
                }
            };
            let req = InboundRequest {
                peer,
                local,
                peer_identity: peer_identity.clone(),
                authority,
                headers: parts.headers,
            };
            let guard = drain.guard();
            let stream = self.handler.clone().serve(req, responder);
            tokio::spawn(async move {
                stream.await;
                drop((guard, counted));
            });
        }
        let closed = poll_fn(|cx| conn.poll_closed(cx)).await;
        if let Err(e) = closed {
            tracing::debug!(%peer, error = %e, "HBONE connection ended with an error");
        }
        Ok(())
    }
}

/// Pings the client every `interval` (HTTP/2 PING; at each answer, an adaptive `window`
/// change not yet in force is asked for again); resolves when one is not answered within
/// `timeout`. Pending forever if the connection offers no pinger (it always does once) or has
/// ended (`accept` reports that).
async fn keepalive(
    ping: Option<h2::PingPong>,
    window: Option<Arc<Window>>,
    interval: Duration,
    timeout: Duration,
) {
    let Some(ping) = ping else {
        return std::future::pending().await;
    };
    if pinger(ping, window, interval, timeout).await == Ended::Closed {
        std::future::pending().await
    }
}

/// The target of an HBONE request: a `CONNECT` whose authority is `ip:port` (IPv6 as
/// `[v6]:port`). Anything else is refused with 400.
pub fn connect_authority(method: &Method, uri: &Uri) -> Option<SocketAddr> {
    if method != Method::CONNECT {
        return None;
    }
    uri.authority()?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(method: Method, uri: &str) -> Option<SocketAddr> {
        connect_authority(&method, &uri.parse().expect("uri"))
    }

    #[test]
    fn only_connect_to_an_ip_and_port_is_a_stream() {
        assert_eq!(
            authority(Method::CONNECT, "10.0.0.2:8080"),
            Some("10.0.0.2:8080".parse().expect("addr"))
        );
        assert_eq!(
            authority(Method::CONNECT, "[fd00::2]:80"),
            Some("[fd00::2]:80".parse().expect("addr"))
        );
        assert_eq!(authority(Method::GET, "10.0.0.2:8080"), None);
        assert_eq!(authority(Method::CONNECT, "reviews.default:9080"), None);
        assert_eq!(authority(Method::CONNECT, "10.0.0.2"), None);
        assert_eq!(authority(Method::CONNECT, "/path"), None);
    }

    /// The client writes the authority with `SocketAddr`'s `Display` (`[v6]:port`): the
    /// server reads back the same address for both families, and a bare or zoned IPv6 address
    /// is no stream.
    #[test]
    fn the_clients_authority_round_trips_for_both_families() {
        for a in ["10.0.0.2:8080", "[fd00:10:244:1::11]:8080", "[::1]:1"] {
            let addr: SocketAddr = a.parse().expect("addr");
            assert_eq!(authority(Method::CONNECT, &addr.to_string()), Some(addr));
        }
        for bad in ["fd00::2:80", "[fd00::2]", "[fd00::2%eth0]:80"] {
            let parsed = bad.parse::<Uri>().ok();
            let got = parsed.and_then(|u| connect_authority(&Method::CONNECT, &u));
            assert_eq!(got, None, "{bad}");
        }
    }
}
