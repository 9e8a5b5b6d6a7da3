//! The DNS proxy's sockets.
//!
//! - UDP: one `IP_TRANSPARENT` socket on `127.0.0.1:<dns port>` (and, on a node with IPv6,
//!   an `IPV6_TRANSPARENT` one on `[::1]:<dns port>` for queries sent over IPV6) receives the datagrams capture
//!   assigns to it, read in batches (`recvmmsg`); `IP_RECVORIGDSTADDR` tells which resolver
//!   address the pod asked. The answer
//!   must come from exactly that address and port (resolvers drop anything else), so it is sent
//!   from a short-lived transparent socket bound to the original destination.
//! - TCP: a transparent listener on the same port; accepted connections keep the original
//!   destination as their local address, so replies need nothing special. Length-prefixed
//!   messages, several per connection, closed after the idle timeout without a query.
//!
//! Both loops ask the [`Gate`] first, before parsing anything, so one pod's flood costs the
//! others nothing but the receive calls (see [`super::limits`]).

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    recvmmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn,
    SockaddrIn6, SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::limits::{ConnPermit, Gate};
use super::{Handler, Transport};
use crate::accept::AcceptErrors;

/// Datagrams read per `recvmmsg`: a flood is drained in batches, one system call and one wake-up
/// per batch rather than per datagram.
const BATCH: usize = 32;
/// Largest query read; a longer datagram is cut there and answered FORMERR (no real query is
/// near it: stub resolvers send a few hundred bytes).
const MAX_QUERY: usize = 4096;
/// Receive buffer asked for (capped by the kernel's `rmem_max`): room for bursts while the
/// loop is busy elsewhere on its thread.
const RCVBUF: usize = 1 << 20;

/// Binds the UDP socket (of `addr`'s family): transparent, daemon mark, original
/// destination reported.
pub fn bind_udp(addr: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let s = udp_socket(addr)?;
    s.set_nonblocking(true)?;
    s.set_mark(mark)?;
    // Best effort: the default is kept when the kernel refuses.
    let _ = s.set_recv_buffer_size(RCVBUF);
    match addr {
        SocketAddr::V4(_) => setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true),
        SocketAddr::V6(_) => setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true),
    }
    .map_err(io::Error::from)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// One datagram of a batch: where its bytes are, who sent it, which resolver it asked.
#[derive(Debug, Clone, Copy)]
struct Received {
    /// Index of its buffer.
    at: usize,
    len: usize,
    src: SocketAddr,
    orig_dst: Option<SocketAddr>,
}

/// Serves UDP queries forever; `gate` admits each before it is parsed.
pub async fn run_udp(sock: UdpSocket, handler: Handler, mark: u32, gate: Arc<Gate>) {
    let mut bufs = vec![[0u8; MAX_QUERY]; BATCH];
    let mut got: Vec<Received> = Vec::with_capacity(BATCH);
    loop {
        if let Err(e) = recv_batch(&sock, &mut bufs, &mut got).await {
            tracing::warn!(error = %e, "dns: udp receive failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        for r in &got {
            let Received {
                at,
                len,
                src,
                orig_dst,
            } = *r;
            let Some(orig_dst) = orig_dst else {
                tracing::debug!(%src, "dns: datagram without original destination; dropped");
                continue;
            };
            // Refused: dropped, counted and logged by the gate (the stub resolver retries).
            let Ok(permit) = gate.admit_udp(src.ip()) else {
                continue;
            };
            let Some(packet) = bufs.get(at).and_then(|b| b.get(..len)) else {
                continue;
            };
            let packet = packet.to_vec();
            let handler = handler.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Some(reply) = handler.handle(src.ip(), &packet, Transport::Udp).await else {
                    return;
                };
                if let Err(e) = send_from(orig_dst, src, &reply, mark) {
                    tracing::debug!(%src, %orig_dst, error = %e, "dns: cannot send udp answer");
                }
            });
        }
    }
}

/// Receives up to [`BATCH`] datagrams into `bufs` (one each) with one `recvmmsg`, waiting for
/// the first; `got` says what each is.
async fn recv_batch(
    sock: &UdpSocket,
    bufs: &mut [[u8; MAX_QUERY]],
    got: &mut Vec<Received>,
) -> io::Result<()> {
    sock.async_io(Interest::READABLE, || {
        got.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        // Built per batch: the headers hold raw pointers, so they cannot live across an await
        // of this (sendable) task.
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
            slices.len(),
            Some(nix::cmsg_space!(libc::sockaddr_in6)),
        );
        let msgs = recvmmsg(
            sock.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        for (at, msg) in msgs.enumerate() {
            let Some(src) = msg.address.as_ref().and_then(socket_addr) else {
                continue;
            };
            let mut orig_dst = None;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                match c {
                    ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                        let o = SockaddrIn::from(sin);
                        orig_dst = Some(SocketAddr::V4(SocketAddrV4::new(o.ip(), o.port())));
                    }
                    ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                        let o = SockaddrIn6::from(sin6);
                        orig_dst = Some(SocketAddr::V6(SocketAddrV6::new(o.ip(), o.port(), 0, 0)));
                    }
                    _ => {}
                }
            }
            got.push(Received {
                at,
                len: msg.bytes.min(MAX_QUERY),
                src,
                orig_dst,
            });
        }
        Ok(())
    })
    .await
}

/// A datagram's source, IPv4 or IPv6.
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    let v6 = a.as_sockaddr_in6()?;
    Some(SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), 0, 0)))
}

/// A transparent UDP socket of `addr`'s family, address reuse on.
fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => s.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            s.set_only_v6(true)?;
            s.set_ip_transparent_v6(true)?;
        }
    }
    Ok(s)
}

/// Sends `reply` to `to` from `from` (a non-local address: the resolver the pod asked).
fn send_from(from: SocketAddr, to: SocketAddr, reply: &[u8], mark: u32) -> io::Result<()> {
    let s = udp_socket(from)?;
    s.set_reuse_port(true)?;
    s.set_mark(mark)?;
    s.bind(&from.into())?;
    s.send_to(reply, &to.into())?;
    Ok(())
}

/// Serves TCP DNS connections forever; `gate` admits each connection (a refused one is
/// closed at once) and each query on it.
pub async fn run_tcp(
    listener: TcpListener,
    handler: Handler,
    gate: Arc<Gate>,
    accept_errors: Arc<AcceptErrors>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, src)) => {
                let Ok(permit) = gate.admit_tcp(src.ip()) else {
                    drop(stream);
                    continue;
                };
                let handler = handler.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp(stream, src.ip(), handler, gate, permit).await {
                        tracing::debug!(%src, error = %e, "dns: tcp connection ended");
                    }
                });
            }
            Err(e) => {
                accept_errors.handle(&listener, "dns", e).await;
            }
        }
    }
}

async fn serve_tcp(
    mut stream: TcpStream,
    src: IpAddr,
    handler: Handler,
    gate: Arc<Gate>,
    _permit: ConnPermit,
) -> io::Result<()> {
    let idle = gate.limits().tcp_idle;
    let mut buf = vec![0u8; 65535];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Err(_) => {
                handler.stats().tcp_idle_closed.inc();
                tracing::debug!(%src, idle = ?idle, "dns: idle tcp connection closed");
                return Ok(());
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let n = usize::from(u16::from_be_bytes(len));
        let msg = buf.get_mut(..n).ok_or_else(|| io::Error::other("length"))?;
        tokio::time::timeout(idle, stream.read_exact(msg))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "partial query"))??;
        if gate.admit_tcp_query(src).is_err() {
            match super::refused(msg) {
                Some(reply) => write_tcp_message(&mut stream, &reply).await?,
                None => return Ok(()),
            }
            continue;
        }
        let Some(reply) = handler.handle(src, msg, Transport::Tcp).await else {
            // Not a query at all: the stream cannot be trusted to stay in sync.
            return Ok(());
        };
        write_tcp_message(&mut stream, &reply).await?;
    }
}

/// Writes one DNS message on a TCP stream: its two-byte length, then the message (RFC 1035
/// 4.2.2), in one write.
pub(crate) async fn write_tcp_message<W>(w: &mut W, msg: &[u8]) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("DNS message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await
}

/// `127.0.0.1:<port>`, where capture looks the DNS sockets up.
pub fn listen_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// `[::1]:<port>`, where capture looks the DNS sockets up for queries sent over IPv6.
pub fn listen_addr_v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)
}
