//! Socket set-up the data path depends on.
//!
//! - Capture listeners need `IP_TRANSPARENT` before `bind()`: the eBPF programs assign packets
//!   addressed to pod IPs to them, and the kernel only completes such handshakes on transparent
//!   sockets.
//! - Connections made on behalf of a pod bind to that pod's IP (transparent, port chosen at
//!   connect time) so peers see pod addresses, never the node's.
//! - Every daemon socket carries the daemon mark, which the capture programs skip and which
//!   must not match the capture route's mark.
//!
//! The flows get their sockets through a [`SocketFactory`] ([`factory`]), so the same flow code
//! runs with these privileged sockets in the daemon and with plain loopback sockets in tests.

mod factory;

pub use factory::{Leg, PlainSockets, SocketFactory, TransparentSockets};

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Binds a listener; `transparent` sockets may accept connections to any address. Accepted
/// sockets inherit `congestion` (`None`: the node's default) and have Nagle's algorithm off.
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    mark: u32,
    congestion: Option<&str>,
) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Linux copies this to every socket the listener accepts: no `setsockopt` per connection.
    s.set_tcp_nodelay(true)?;
    set_mark(&s, mark)?;
    if let Some(cc) = congestion {
        s.set_tcp_congestion(cc.as_bytes())?;
    }
    if transparent {
        set_transparent(&s, addr.ip())?;
    }
    if addr.is_ipv6() {
        // `[::]:15008` beside `0.0.0.0:15008`: each family has its own socket, and an IPv4
        // connection never shows up as an IPv4-mapped IPv6 address.
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Sets `SO_MARK` (which needs `CAP_NET_ADMIN`); 0 means no mark and is left unset.
fn set_mark(s: &Socket, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    s.set_mark(mark)
}

fn set_transparent(s: &Socket, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => s.set_ip_transparent_v4(true),
        IpAddr::V6(_) => s.set_ip_transparent_v6(true),
    }
}

/// Connects to `dst` with source address `src` (any address, not only the node's own: the
/// socket is transparent), the daemon mark and `congestion` (`None`: the node's default),
/// within `timeout`.
pub async fn connect(
    src: Option<IpAddr>,
    dst: SocketAddr,
    mark: u32,
    congestion: Option<&str>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = tcp_socket(dst)?;
    {
        let s = SockRef::from(&sock);
        set_mark(&s, mark)?;
        s.set_tcp_nodelay(true)?;
        if let Some(cc) = congestion {
            s.set_tcp_congestion(cc.as_bytes())?;
        }
        if let Some(ip) = src {
            set_transparent(&s, ip)?;
            bind_address_no_port(&sock)?;
            sock.bind(SocketAddr::new(ip, 0))?;
        }
    }
    tokio::time::timeout(timeout, sock.connect(dst))
        .await
        .map_err(|_| timed_out(dst, timeout))?
}

/// An unbound TCP socket of `addr`'s family.
fn tcp_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

fn timed_out(dst: SocketAddr, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connect to {dst} timed out after {timeout:?}"),
    )
}

/// Makes the next close send RST instead of FIN, so the application sees a failure.
pub fn reset_on_close(tcp: &impl std::os::fd::AsFd) {
    let _ = SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Sets `TCP_NOTSENT_LOWAT`: the socket then reports itself writable, and takes more data, only
/// while fewer than `bytes` of what was written are still unsent, so data waits in the writer
/// instead of in the kernel's send queue.
pub fn set_notsent_lowat(sock: &impl AsRawFd, bytes: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int(sock, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, v)
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet (`SIOCOUTQ`): what is
/// queued in the kernel towards a destination that has not taken it.
pub fn unacked_bytes(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) on an open TCP socket writes one int through the pointer,
    // which points at a live local of that type.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Fails when the kernel cannot give a socket congestion control `name` (not built in, module
/// not loaded, or not allowed), so a bad setting stops the daemon before it binds anything.
pub fn check_congestion(name: &str) -> io::Result<()> {
    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?
        .set_tcp_congestion(name.as_bytes())
}

/// Whether this network namespace has IPv6: the loopback address `::1` is configured (it is
/// whenever IPv6 is enabled and `lo` is up). The daemon then binds its captured ports on
/// IPv6 too, with no setting: a node without IPv6 simply has no IPv6 pods to capture.
pub fn host_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| has_ipv6_loopback(&t))
}

/// `/proc/net/if_inet6` lists `::1` (32 hex digits, then index, prefix, scope, flags, name).
fn has_ipv6_loopback(if_inet6: &str) -> bool {
    if_inet6
        .lines()
        .any(|l| l.starts_with("00000000000000000000000000000001 "))
}

/// Raises the soft limit on open files to the hard limit and returns it. Every proxied flow
/// holds two or three descriptors, and container runtimes commonly start processes with a soft
/// limit of 1024 (and a much higher hard one), which would cap a node at a few hundred flows.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Lets the kernel pick the source port at connect time, by 4-tuple: many flows from one pod
/// IP to different destinations then never run out of ports.
fn bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    set_int(sock, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// An integer socket option that socket2 has no setter for.
fn set_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: plain setsockopt on an open socket, with a correctly sized int argument.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(v).cast(),
            std::mem::size_of_val(&v) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_there_when_loopback_has_it() {
        let with = "00000000000000000000000000000001 01 80 10 80       lo\nfd000000000000000000000000000001 02 40 00 80 eth0\n";
        assert!(has_ipv6_loopback(with));
        assert!(!has_ipv6_loopback(
            "fd000000000000000000000000000001 02 40 00 80 eth0\n"
        ));
        assert!(!has_ipv6_loopback(""));
    }

    /// A transparent connect from an IPv6 source keeps it (`IP_BIND_ADDRESS_NO_PORT` applies
    /// to IPv6 sockets too); here the source is `::1`, the one IPv6 address a test has. The
    /// accepted socket has Nagle's algorithm off without a `setsockopt` of its own.
    #[tokio::test]
    async fn ipv6_listener_and_connect_from_a_chosen_source() {
        if !host_has_ipv6() {
            panic!("this test needs IPv6 on loopback (::1)");
        }
        let l = listener("[::1]:0".parse().expect("addr"), false, 0, None).expect("listen");
        let dst = l.local_addr().expect("addr");
        let src: IpAddr = "::1".parse().expect("ip");
        let sock = tcp_socket(dst).expect("socket");
        bind_address_no_port(&sock).expect("IP_BIND_ADDRESS_NO_PORT on IPv6");
        sock.bind(SocketAddr::new(src, 0)).expect("bind");
        let _c = sock.connect(dst).await.expect("connect");
        let (t, peer) = l.accept().await.expect("accept");
        assert_eq!(peer.ip(), src);
        assert_eq!(t.local_addr().expect("local"), dst, "original destination");
        assert!(
            t.nodelay().expect("TCP_NODELAY"),
            "inherited from the listener"
        );
        let v6only = SockRef::from(&l).only_v6().expect("IPV6_V6ONLY");
        assert!(v6only, "IPv6 listeners leave IPv4 to their twin");
    }

    fn congestion_of(s: &impl std::os::fd::AsFd) -> String {
        let name = SockRef::from(s).tcp_congestion().expect("TCP_CONGESTION");
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_string()
    }

    /// Real loopback sockets: the accepted side inherits the listener's algorithm and the
    /// connecting side gets its own, whatever the node's default is. Two algorithms that any
    /// user may set (`tcp_allowed_congestion_control`), so the test needs no privilege.
    #[tokio::test]
    async fn congestion_control_is_set_on_both_ends() {
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .expect("allowed congestion controls");
        let allowed: Vec<&str> = allowed.split_whitespace().collect();
        let [one, two, ..] = allowed[..] else {
            panic!("this test needs two allowed congestion controls, the kernel allows {allowed:?}")
        };
        let l =
            listener("127.0.0.1:0".parse().expect("addr"), false, 0, Some(one)).expect("listener");
        let addr = l.local_addr().expect("addr");
        let c = connect(None, addr, 0, Some(two), Duration::from_secs(5))
            .await
            .expect("connect");
        let (a, _) = l.accept().await.expect("accept");
        assert_eq!(congestion_of(&a), one);
        assert_eq!(congestion_of(&c), two);
        assert!(check_congestion(two).is_ok());
        assert!(check_congestion("no-such-cc").is_err());
    }

    /// A real loopback socket: the kernel reports back the bound that was set.
    #[tokio::test]
    async fn notsent_lowat_is_set() {
        let l = listener("127.0.0.1:0".parse().expect("addr"), false, 0, None).expect("listener");
        let addr = l.local_addr().expect("addr");
        let c = connect(None, addr, 0, None, Duration::from_secs(5))
            .await
            .expect("connect");
        set_notsent_lowat(&c, 128 * 1024).expect("set");
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
        // SAFETY: getsockopt into a correctly sized int on an open socket.
        let rc = unsafe {
            libc::getsockopt(
                c.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                std::ptr::addr_of_mut!(v).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, v), (0, 128 * 1024));
    }

    /// The real limit of this test process: lowered a little (tests running alongside keep
    /// plenty), then raised back to the hard limit.
    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let hard = raise_fd_limit().expect("limit");
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).expect("lower");
        assert_eq!(raise_fd_limit().expect("raise"), hard);
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("get");
        assert_eq!(soft, hard);
    }
}
