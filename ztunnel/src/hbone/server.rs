//! Incoming HBONE: accept TCP on 15008, terminate mutual TLS with the certificate of the pod
//! the connection was addressed to, then serve each HTTP/2 CONNECT stream with a [`Handler`].
//!
//! The certificate is chosen by the connection's local address: capture delivers connections
//! for `<pod ip>:15008` with that pod IP as the local address, so the server proves exactly the
//! identity the client expects for that pod.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::HboneConfig;
use crate::drain::Drain;
use crate::identity::{CertManager, SpiffeId};
use crate::tls;

/// A served HBONE connection.
type ServerConn = h2::server::Connection<tokio_rustls::server::TlsStream<super::Transport>, Bytes>;

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
    trust_domain: String,
    certs: Arc<CertManager>,
    handler: Arc<H>,
    drain: Drain,
    /// Server configs by identity and certificate serial, rebuilt on renewal.
    configs: Mutex<HashMap<SpiffeId, (String, Arc<ServerConfig>)>>,
}

impl<H: Handler> Server<H> {
    /// A server presenting certificates from `certs`, trusting clients of `trust_domain`,
    /// and sending GOAWAY once `drain` starts. Every stream holds a drain guard while it runs.
    pub fn new(
        cfg: HboneConfig,
        trust_domain: &str,
        certs: Arc<CertManager>,
        handler: Arc<H>,
        drain: Drain,
    ) -> Arc<Self> {
        Arc::new(Server {
            cfg,
            trust_domain: trust_domain.to_string(),
            certs,
            handler,
            drain,
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts connections forever, each served on a task of its own. Like the daemon's accept
    /// loops, it turns Nagle's algorithm off: an HTTP/2 response often leaves in two writes
    /// (HEADERS, then DATA), and with Nagle the second waits for the peer's ACK of the first.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(self.clone().serve(tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves one accepted connection to its end. A connection does not count for the drain
    /// itself (its streams do, each from its start): draining sends it GOAWAY and waits for
    /// the streams.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        if let Err(e) = self.serve_connection(tcp, peer).await {
            tracing::warn!(%peer, error = %e, "HBONE connection refused");
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
    ) -> Result<(ServerConn, SpiffeId, SocketAddr), String> {
        let local = tcp.local_addr().map_err(|e| e.to_string())?;
        let id = self
            .handler
            .identity_for(local)
            .ok_or_else(|| format!("no local enrolled workload at {local}"))?;
        let acceptor = TlsAcceptor::from(self.tls_config(&id).await?);
        let mut tls_stream = tokio::time::timeout(
            self.cfg.connect_timeout,
            acceptor.accept(super::transport(tcp, &self.cfg)),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
        super::tune(tls_stream.get_mut().1);
        let peer_identity = tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
            .ok_or_else(|| "client certificate has no SPIFFE identity".to_string())?;
        let conn = h2::server::Builder::new()
            .initial_window_size(self.cfg.stream_window)
            .initial_connection_window_size(self.cfg.connection_window)
            .max_frame_size(self.cfg.max_frame_size)
            .max_send_buffer_size(self.cfg.stream_window as usize)
            .max_concurrent_streams(1000)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
        tracing::debug!(%peer, %local, client = %peer_identity, "HBONE connection accepted");
        Ok((conn, peer_identity, local))
    }

    async fn serve_connection(&self, tcp: TcpStream, peer: SocketAddr) -> Result<(), String> {
        // Boxed: the handshakes' state (2 KiB) would otherwise size the connection's task for
        // its whole life.
        let (mut conn, peer_identity, local) = Box::pin(self.handshake(tcp, peer)).await?;
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
            };
            let Some(next) = next else { break };
            let (request, respond) = match next {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HBONE connection ended");
                    break;
                }
            };
            let (parts, recv) = request.into_parts();
            let responder = Responder { respond, recv };
            let authority = match connect_authority(&parts.method, &parts.uri) {
                Some(a) => a,
                None => {
                    tracing::info!(%peer, method = %parts.method, uri = %parts.uri,
                        "HBONE request refused: not CONNECT to ip:port");
                    responder.refuse(StatusCode::BAD_REQUEST);
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
                drop(guard);
            });
        }
        poll_fn(|cx| conn.poll_closed(cx))
            .await
            .map_err(|e| format!("HTTP/2 connection error: {e}"))
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
}
