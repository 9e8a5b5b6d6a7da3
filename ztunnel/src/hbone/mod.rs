//! HBONE: TCP flows carried as HTTP/2 CONNECT streams over mutual TLS 1.3 (Istio's wire
//! protocol, port 15008). `client` pools outgoing connections, `server` terminates incoming
//! ones; this module holds what both sides share: header names, the splice between a TCP socket
//! and an HTTP/2 stream, and errors.

pub mod client;
pub mod server;

use std::future::poll_fn;
use std::io;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::HboneConfig;

/// Header carrying the original client address: `for="ip:port"`.
pub const FORWARDED: &str = "forwarded";
/// W3C baggage with the source's Kubernetes names (Istio uses it for telemetry).
pub const BAGGAGE: &str = "baggage";
/// W3C trace context, so a trace can follow a flow through the tunnel.
pub const TRACEPARENT: &str = "traceparent";

/// Socket read buffer under TLS. rustls asks its transport for 4 KiB at a time, which unbuffered
/// would cost a `read` syscall per 4 KiB of tunnel data; one large read feeds many records.
const TLS_READ_BUF: usize = 64 * 1024;
/// Encrypted bytes rustls may queue before it writes them out: one `writev` per this much
/// plaintext (rustls' default of 64 KiB means four syscalls per 256 KiB chunk).
const TLS_WRITE_BUF: usize = 256 * 1024;

/// Length of an HTTP/2 frame header, which h2 writes in front of each DATA payload.
const DATA_FRAME_HEADER: usize = 9;

/// The transport under TLS on HBONE connections: TCP with buffered reads.
pub type Transport = tokio::io::BufReader<TcpStream>;

/// Wraps a connected socket for use under TLS, with the socket options HBONE wants: a bound on
/// unsent data in the kernel (`--hbone-notsent-lowat`), so the flows of a connection are
/// interleaved by HTTP/2 rather than queued behind each other in the socket.
pub fn transport(tcp: TcpStream, cfg: &HboneConfig) -> Transport {
    if let Some(n) = cfg.notsent_lowat {
        if let Err(e) = crate::socket::set_notsent_lowat(&tcp, n) {
            tracing::warn!(error = %e, bytes = n, "cannot set TCP_NOTSENT_LOWAT on an HBONE socket");
        }
    }
    tokio::io::BufReader::with_capacity(TLS_READ_BUF, tcp)
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

/// Bytes moved by a finished splice, counted from the TCP side's point of view.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// Read from the TCP socket and sent into the tunnel.
    pub to_tunnel: u64,
    /// Received from the tunnel and written to the TCP socket.
    pub from_tunnel: u64,
}

/// Copies both ways between a TCP socket and an HTTP/2 stream until both directions end.
/// A clean EOF on one side half-closes the other; an error on either side aborts both (the TCP
/// side is reset, the stream cancelled) so that neither application mistakes a failure for a
/// clean end of data. Bytes are reported to `sink` as they move, so metrics advance during
/// long transfers.
pub async fn splice(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    sink: &crate::telemetry::ByteSink,
) -> (Transferred, Option<io::Error>) {
    let (mut rd, mut wr) = tcp.into_split();
    let mut to_tunnel = 0u64;
    let mut from_tunnel = 0u64;
    let err = {
        let up = async {
            let mut reader = crate::burst::BurstReader::with_header(&mut rd, DATA_FRAME_HEADER);
            loop {
                let Some(mut chunk) = reader.next().await? else {
                    send.send_data(Bytes::new(), true).map_err(h2_io)?;
                    return Ok::<_, io::Error>(());
                };
                // Each pass reserves the rest of the chunk and sends all the capacity granted:
                // h2's poll_capacity wakes only when capacity *increases*, so granted capacity
                // left unsent here would never be reported again and the flow would stall.
                while !chunk.is_empty() {
                    send.reserve_capacity(chunk.len());
                    let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(c)) => c,
                        Some(Err(e)) => return Err(h2_io(e)),
                        None => {
                            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))
                        }
                    };
                    if cap == 0 {
                        continue;
                    }
                    let part = chunk.split_to(cap.min(chunk.len()));
                    to_tunnel += part.len() as u64;
                    sink.to_tunnel(part.len());
                    send.send_data(part, false).map_err(h2_io)?;
                }
            }
        };
        let down = async {
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.map_err(h2_io)?;
                wr.write_all(&chunk).await?;
                from_tunnel += chunk.len() as u64;
                sink.from_tunnel(chunk.len());
                // An error here only means the stream is already gone; data() reports it next.
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            wr.shutdown().await
        };
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut up => match r { Ok(()) => (&mut down).await.err(), Err(e) => Some(e) },
            r = &mut down => match r { Ok(()) => (&mut up).await.err(), Err(e) => Some(e) },
        }
    };
    if err.is_some() {
        send.send_reset(h2::Reason::CANCEL);
        if let Ok(tcp) = rd.reunite(wr) {
            reset_on_close(&tcp);
        }
    }
    (
        Transferred {
            to_tunnel,
            from_tunnel,
        },
        err,
    )
}

/// Makes the next close send RST instead of FIN, so the application sees a failure.
pub fn reset_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}
