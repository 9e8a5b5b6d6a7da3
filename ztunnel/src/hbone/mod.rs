//! HBONE: TCP flows carried as HTTP/2 CONNECT streams over mutual TLS 1.3 (Istio's wire
//! protocol, port 15008). `client` pools outgoing connections, `server` terminates incoming
//! ones; this module holds what both sides share: header names, the transport under TLS, and
//! errors. The bytes of a flow are copied by [`crate::splice::hbone`].

pub mod client;
pub mod limits;
pub mod server;
pub mod transport;
pub mod window;

use std::io;

use tokio::net::TcpStream;

use crate::config::HboneConfig;

/// Header carrying the original client address: `for="ip:port"`.
pub const FORWARDED: &str = "forwarded";
/// W3C baggage with the source's Kubernetes names (Istio uses it for telemetry).
pub const BAGGAGE: &str = "baggage";
/// W3C trace context, so a trace can follow a flow through the tunnel.
pub const TRACEPARENT: &str = "traceparent";

/// Encrypted bytes rustls may queue before it writes them out: one `writev` per this much
/// plaintext (rustls' default of 64 KiB means four syscalls per 256 KiB chunk).
const TLS_WRITE_BUF: usize = 256 * 1024;

pub use transport::Transport;

/// Wraps a connected socket for use under TLS, with the socket options HBONE wants: a bound on
/// unsent data in the kernel (`--hbone-notsent-lowat`), so the flows of a connection are
/// interleaved by HTTP/2 rather than queued behind each other in the socket.
pub fn transport(tcp: TcpStream, cfg: &HboneConfig) -> Transport {
    if let Some(n) = cfg.notsent_lowat {
        if let Err(e) = crate::socket::set_notsent_lowat(&tcp, n) {
            tracing::warn!(error = %e, bytes = n, "cannot set TCP_NOTSENT_LOWAT on an HBONE socket");
        }
    }
    Transport::new(tcp)
}

/// Turns on TCP keepalive: after `idle` without traffic the kernel probes the peer three times
/// a third of `idle` apart, so a peer that vanished without a FIN or RST (powered off,
/// partitioned) is found out and its connection released.
pub fn set_tcp_keepalive(tcp: &TcpStream, idle: std::time::Duration) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(std::time::Duration::from_secs(1)))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on an HBONE socket");
    }
}

/// Sizes a handshaken TLS connection's write queue (see [`TLS_WRITE_BUF`]).
pub fn tune<D>(tls: &mut rustls::ConnectionCommon<D>) {
    tls.set_buffer_limit(Some(TLS_WRITE_BUF));
}

/// Errors of the HBONE layer, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// TCP connect to the peer failed.
    #[error("connect to {addr}: {error}")]
    Connect {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Cause.
        error: io::Error,
    },
    /// TLS handshake failed (wrong identity, unknown CA, protocol mismatch).
    #[error("TLS handshake with {addr}: {error}")]
    Tls {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Cause.
        error: io::Error,
    },
    /// HTTP/2 failure on the connection or stream.
    #[error("HTTP/2 with {addr}: {error}")]
    H2 {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Cause.
        error: h2::Error,
    },
    /// The peer answered the CONNECT with something other than 200.
    #[error("peer {addr} answered CONNECT {authority} with {status}")]
    Status {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Requested authority.
        authority: std::net::SocketAddr,
        /// Response status.
        status: http::StatusCode,
    },
    /// No certificate for the source identity.
    #[error(transparent)]
    Cert(#[from] crate::identity::CertError),
    /// Building the TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}
