//! Every socket the daemon serves, bound (or taken over from the daemon running before this
//! one on the node, [`crate::handover`]) before capture attaches, with a duplicate of each
//! kept for the next daemon.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::{TcpListener, UdpSocket};

use super::AppError;
use crate::admin;
use crate::admin::socket::{SocketError, SocketFile};
use crate::config::Config;
use crate::dns;
use crate::handover::{names, Inherited, Offer};
use crate::socket::{Leg, SocketFactory};

/// Every socket the daemon serves, all bound before capture attaches, so that no captured SYN
/// or DNS datagram finds its listener missing.
pub(super) struct Listeners {
    pub(super) data_plane: DataPlaneListeners,
    pub(super) admin: admin::Listeners,
    /// The socket files, removed when dropped.
    pub(super) files: SocketFiles,
    /// Only when the DNS proxy is on.
    pub(super) dns: Option<DnsSockets>,
    /// The CNI endpoint's socket, unless `--cni-socket` is empty.
    pub(super) cni: Option<std::os::unix::net::UnixListener>,
    /// The hand-over socket (when on) and what it can give a successor.
    pub(super) handover: Option<(std::os::unix::net::UnixListener, Offer)>,
}

/// The unix sockets' files: removed when the daemon stops, unless a successor took them.
pub(super) struct SocketFiles {
    _admin: SocketFile,
    cni: Option<SocketFile>,
    handover: Option<SocketFile>,
}

impl SocketFiles {
    /// Leaves the files in place for the successor that serves on them.
    pub(super) fn keep(self) {
        self._admin.keep();
        for f in [self.cni, self.handover].into_iter().flatten() {
            f.keep();
        }
    }
}

/// The captured ports, served by the data plane.
pub(super) struct DataPlaneListeners {
    /// Outbound capture (15001).
    pub(super) outbound: TcpListener,
    /// Inbound plaintext capture (15006).
    pub(super) inbound_plaintext: TcpListener,
    /// HBONE (15008).
    pub(super) hbone: TcpListener,
    /// The same three on IPv6 (`[::1]`, `[::1]`, `[::]`), when the node has IPv6.
    pub(super) ipv6: Option<Ipv6Listeners>,
}

/// The IPv6 twins of the captured ports: capture steers IPv6 packets to IPv6 sockets.
pub(super) struct Ipv6Listeners {
    pub(super) outbound: TcpListener,
    pub(super) inbound_plaintext: TcpListener,
    pub(super) hbone: TcpListener,
}

/// The DNS proxy's sockets (15053).
pub(super) struct DnsSockets {
    pub(super) udp: UdpSocket,
    pub(super) tcp: TcpListener,
    /// `[::1]:15053`, UDP and TCP, when the node has IPv6.
    pub(super) ipv6: Option<(UdpSocket, TcpListener)>,
}

/// The `--<flag>-port` setting a socket named `name` ([`names`]) is bound by.
fn flag_of(name: &'static str) -> &'static str {
    match name {
        names::DNS_TCP | names::DNS_TCP6 | names::DNS_UDP | names::DNS_UDP6 => "dns",
        names::OUTBOUND6 => names::OUTBOUND,
        names::INBOUND_PLAINTEXT6 => names::INBOUND_PLAINTEXT,
        names::HBONE6 => names::HBONE,
        other => other,
    }
}

impl Listeners {
    /// Binds everything, in a fixed order (the first that fails names its port), or takes
    /// each from `inherited` (the sockets of the daemon this one takes over from) when it is
    /// there at the same address. Keeps a duplicate of each in the hand-over offer.
    pub(super) fn bind(
        cfg: &Config,
        sockets: &dyn SocketFactory,
        mut inherited: Option<&mut Inherited>,
    ) -> Result<Listeners, AppError> {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let p = cfg.ports;
        let mut offer = Offer::default();
        let mut bind = |what, ip, port, leg, capture| {
            let addr = SocketAddr::new(ip, port);
            let err = |error| AppError::Bind {
                what: flag_of(what),
                addr,
                error,
            };
            let got = inherited.as_deref_mut().and_then(|i| i.tcp(what, addr));
            let l = match got {
                Some(l) => {
                    l.set_nonblocking(true).map_err(err)?;
                    // Nagle off, as on the factory's listeners: a predecessor of an older
                    // version may not have set it.
                    socket2::SockRef::from(&l)
                        .set_tcp_nodelay(true)
                        .map_err(err)?;
                    TcpListener::from_std(l).map_err(err)?
                }
                None => sockets.listen(leg, addr, capture).map_err(err)?,
            };
            offer.add(what, None, &l);
            Ok::<_, AppError>(l)
        };
        // Captured outbound connections come from pods of this node; plaintext inbound ones may
        // come from anywhere, so they keep the node's congestion control.
        let mut data_plane = DataPlaneListeners {
            outbound: bind(names::OUTBOUND, local, p.outbound, Leg::Pod, true)?,
            inbound_plaintext: bind(
                names::INBOUND_PLAINTEXT,
                local,
                p.inbound_plaintext,
                Leg::Node,
                true,
            )?,
            hbone: bind(names::HBONE, any, p.hbone, Leg::Hbone, true)?,
            ipv6: None,
        };
        let ipv6 = crate::socket::host_has_ipv6();
        if ipv6 {
            let (any6, local6) = (
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            );
            data_plane.ipv6 = Some(Ipv6Listeners {
                outbound: bind(names::OUTBOUND6, local6, p.outbound, Leg::Pod, true)?,
                inbound_plaintext: bind(
                    names::INBOUND_PLAINTEXT6,
                    local6,
                    p.inbound_plaintext,
                    Leg::Node,
                    true,
                )?,
                hbone: bind(names::HBONE6, any6, p.hbone, Leg::Hbone, true)?,
            });
        }
        // Served by the admin thread's runtime: taken off this one's reactor.
        let to_std = |l: TcpListener, what, port| {
            l.into_std().map_err(|error| AppError::Bind {
                what,
                addr: SocketAddr::new(any, port),
                error,
            })
        };
        let admin_port = bind(names::ADMIN, cfg.admin_addr, p.admin, Leg::Node, false)?;
        let metrics = bind(names::METRICS, any, p.metrics, Leg::Node, false)?;
        let readiness = bind(names::READINESS, any, p.readiness, Leg::Node, false)?;
        let dns_tcp = match cfg.dns {
            Some(_) => {
                let addr = dns::server::listen_addr(p.dns);
                let tcp = bind(names::DNS_TCP, addr.ip(), p.dns, Leg::Node, true)?;
                let tcp6 = match ipv6 {
                    true => {
                        let addr = dns::server::listen_addr_v6(p.dns);
                        Some(bind(names::DNS_TCP6, addr.ip(), p.dns, Leg::Node, true)?)
                    }
                    false => None,
                };
                Some((tcp, tcp6))
            }
            None => None,
        };
        let (socket, admin_file) = inherited_unix(
            inherited.as_deref_mut(),
            names::ADMIN_SOCKET,
            &cfg.admin_socket,
        )
        .unwrap_or_else(|| admin::socket::bind(&cfg.admin_socket))?;
        offer.add(names::ADMIN_SOCKET, Some(&cfg.admin_socket), &socket);
        let admin = admin::Listeners {
            admin: to_std(admin_port, "admin", p.admin)?,
            socket,
            metrics: to_std(metrics, "metrics", p.metrics)?,
            readiness: to_std(readiness, "readiness", p.readiness)?,
        };
        let mut dns_udp = |name, addr: SocketAddr| {
            let err = |error| AppError::Bind {
                what: "dns",
                addr,
                error,
            };
            let got = inherited.as_deref_mut().and_then(|i| i.udp(name, addr));
            let udp = match got {
                Some(u) => {
                    u.set_nonblocking(true).map_err(err)?;
                    UdpSocket::from_std(u).map_err(err)?
                }
                None => dns::server::bind_udp(addr, cfg.daemon_mark).map_err(err)?,
            };
            offer.add(name, None, &udp);
            Ok::<_, AppError>(udp)
        };
        let dns = match dns_tcp {
            Some((tcp, tcp6)) => {
                let udp = dns_udp(names::DNS_UDP, dns::server::listen_addr(p.dns))?;
                let ipv6 = match tcp6 {
                    Some(tcp6) => Some((
                        dns_udp(names::DNS_UDP6, dns::server::listen_addr_v6(p.dns))?,
                        tcp6,
                    )),
                    None => None,
                };
                Some(DnsSockets { udp, tcp, ipv6 })
            }
            None => None,
        };
        let (cni, cni_file) = match &cfg.cni {
            Some(c) => {
                let (l, file) = inherited_unix(inherited.as_deref_mut(), names::CNI, &c.socket)
                    .unwrap_or_else(|| admin::socket::bind_for(&c.socket, "cni-socket"))
                    .map_err(AppError::CniSocket)?;
                offer.add(names::CNI, Some(&c.socket), &l);
                (Some(l), Some(file))
            }
            None => (None, None),
        };
        let (handover, handover_file) = match &cfg.handover_socket {
            Some(path) => {
                let (l, file) = inherited_unix(inherited, names::HANDOVER, path)
                    .unwrap_or_else(|| admin::socket::bind_for(path, "handover-socket"))
                    .map_err(AppError::HandoverSocket)?;
                offer.add(names::HANDOVER, Some(path), &l);
                (Some((l, offer)), Some(file))
            }
            None => (None, None),
        };
        Ok(Listeners {
            data_plane,
            admin,
            files: SocketFiles {
                _admin: admin_file,
                cni: cni_file,
                handover: handover_file,
            },
            dns,
            cni,
            handover,
        })
    }
}

/// The unix listener `name` at `path` from the daemon this one takes over from, with its file
/// now in this daemon's charge; `None` when there is none to take.
fn inherited_unix(
    inherited: Option<&mut Inherited>,
    name: &str,
    path: &std::path::Path,
) -> Option<Result<(std::os::unix::net::UnixListener, SocketFile), SocketError>> {
    let l = inherited?.unix(name, path)?;
    let adopted = l
        .set_nonblocking(true)
        .and_then(|()| SocketFile::adopt(path));
    Some(
        adopted
            .map(|file| (l, file))
            .map_err(|error| SocketError::Io {
                path: path.to_path_buf(),
                what: "taking over",
                error,
            }),
    )
}
