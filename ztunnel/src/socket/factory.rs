//! Where the flows get their sockets.
//!
//! The proxy and the HBONE pool never create sockets themselves: they ask a [`SocketFactory`]
//! to connect from a given source address or to listen. The daemon uses
//! [`TransparentSockets`] (`IP_TRANSPARENT`, the daemon mark, per-leg congestion control:
//! needs `CAP_NET_ADMIN`); tests and other unprivileged users use [`PlainSockets`], which binds
//! the requested source only when it is one of the machine's own addresses (any of 127/8 is),
//! so the whole flow layer runs in-process over loopback without root, namespaces or eBPF.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// A connect in progress.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

/// What a socket is for, which decides its TCP congestion control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// To or from a pod of this node: crosses only a veth.
    Pod,
    /// An HBONE connection between nodes: crosses the real network.
    Hbone,
    /// Anything else (passthrough, admin): the node's default.
    Node,
}

/// Makes the sockets of the data path.
pub trait SocketFactory: Send + Sync + std::fmt::Debug {
    /// Connects to `dst` from `src` (a pod's IP, kept as the source so peers see pod
    /// addresses; `None`: the node's own address).
    fn connect(&self, leg: Leg, src: Option<IpAddr>, dst: SocketAddr) -> Connecting<'_>;
    /// Binds a listener on `addr`; a `capture` listener accepts connections addressed to any
    /// IP that the capture steers to it. What it accepts has Nagle's algorithm off.
    fn listen(&self, leg: Leg, addr: SocketAddr, capture: bool) -> io::Result<TcpListener>;
}

/// The daemon's sockets: transparent where a pod's address is used, the daemon mark on every
/// socket (so capture skips them), and per-leg congestion control.
#[derive(Debug, Clone)]
pub struct TransparentSockets {
    /// `SO_MARK` of every socket.
    pub mark: u32,
    /// Congestion control of pod legs (`None`: the node's).
    pub pod_congestion: Option<String>,
    /// Congestion control of HBONE legs (`None`: the node's).
    pub hbone_congestion: Option<String>,
    /// How long a connect may take.
    pub connect_timeout: Duration,
}

impl TransparentSockets {
    fn congestion(&self, leg: Leg) -> Option<&str> {
        match leg {
            Leg::Pod => self.pod_congestion.as_deref(),
            Leg::Hbone => self.hbone_congestion.as_deref(),
            Leg::Node => None,
        }
    }
}

impl SocketFactory for TransparentSockets {
    fn connect(&self, leg: Leg, src: Option<IpAddr>, dst: SocketAddr) -> Connecting<'_> {
        Box::pin(super::connect(
            src,
            dst,
            self.mark,
            self.congestion(leg),
            self.connect_timeout,
        ))
    }

    fn listen(&self, leg: Leg, addr: SocketAddr, capture: bool) -> io::Result<TcpListener> {
        super::listener(addr, capture, self.mark, self.congestion(leg))
    }
}

/// Unprivileged sockets: no marks, no `IP_TRANSPARENT`, the node's congestion control. A
/// source address is bound as asked, which works for the machine's own addresses (all of
/// 127/8 on loopback), so in-process tests give each pod a loopback address of its own.
#[derive(Debug, Clone)]
pub struct PlainSockets {
    /// How long a connect may take.
    pub connect_timeout: Duration,
}

impl SocketFactory for PlainSockets {
    fn connect(&self, _leg: Leg, src: Option<IpAddr>, dst: SocketAddr) -> Connecting<'_> {
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let sock = super::tcp_socket(dst)?;
            sock.set_nodelay(true)?;
            if let Some(ip) = src {
                sock.bind(SocketAddr::new(ip, 0))?;
            }
            tokio::time::timeout(timeout, sock.connect(dst))
                .await
                .map_err(|_| super::timed_out(dst, timeout))?
        })
    }

    fn listen(&self, _leg: Leg, addr: SocketAddr, _capture: bool) -> io::Result<TcpListener> {
        let sock = super::tcp_socket(addr)?;
        sock.set_reuseaddr(true)?;
        sock.set_nodelay(true)?;
        if addr.is_ipv6() {
            // As the daemon's listeners: `[::]:15008` beside `0.0.0.0:15008` (a dual-stack
            // waypoint), each family on its own socket, IPv4 peers never IPv4-mapped.
            socket2::SockRef::from(&sock).set_only_v6(true)?;
        }
        sock.bind(addr)?;
        sock.listen(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain sockets keep the requested loopback source, as the daemon keeps a pod's IP.
    #[tokio::test]
    async fn plain_sockets_keep_the_source_address() {
        let f = PlainSockets {
            connect_timeout: Duration::from_secs(5),
        };
        let l = f
            .listen(Leg::Node, "127.0.0.1:0".parse().expect("addr"), false)
            .expect("listen");
        let dst = l.local_addr().expect("addr");
        let src: IpAddr = "127.9.9.9".parse().expect("ip");
        let _c = f.connect(Leg::Pod, Some(src), dst).await.expect("connect");
        let (_, peer) = l.accept().await.expect("accept");
        assert_eq!(peer.ip(), src);
    }

    /// A plain IPv6 wildcard listener leaves IPv4 to its twin on the same port.
    #[tokio::test]
    async fn plain_ipv6_listeners_sit_beside_ipv4_ones() {
        let f = PlainSockets {
            connect_timeout: Duration::from_secs(5),
        };
        let v4 = f
            .listen(Leg::Hbone, "0.0.0.0:0".parse().expect("addr"), false)
            .expect("listen IPv4");
        let port = v4.local_addr().expect("addr").port();
        let v6 = f
            .listen(
                Leg::Hbone,
                SocketAddr::new("::".parse().expect("ip"), port),
                false,
            )
            .expect("the IPv6 wildcard on the same port");
        let _c = f
            .connect(
                Leg::Pod,
                None,
                SocketAddr::new("::1".parse().expect("ip"), port),
            )
            .await
            .expect("connect over IPv6");
        let (_, peer) = v6.accept().await.expect("accept");
        assert_eq!(peer.ip(), "::1".parse::<IpAddr>().expect("ip"));
    }
}
