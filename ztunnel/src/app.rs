//! Start-up, steady state and shutdown of the daemon.
//!
//! [`run`] is a sequence of phases, each a function below:
//!
//! 1. `check_host`: the configured TCP congestion controls exist; the open-file limit is raised.
//! 2. The state source ([`crate::source`]): its first read, published on a `watch` channel.
//! 3. `start_identity`: the CA and the certificate manager.
//! 4. `Listeners::bind`: every socket the daemon serves.
//! 5. `start_dns`, `start_data_plane`: the DNS proxy; the workers, HBONE pool, proxy, HBONE
//!    server and the accept loops of 15001, 15006 and 15008.
//! 6. `serve_admin`: admin, metrics and readiness (answering 503 until ready), and the admin
//!    socket, on a thread of their own.
//! 7. `first_complete_state`, then `issue_first_certificates` for the local workloads.
//! 8. `attach_capture`, then `become_ready`; the source then polls on its own.
//! 9. `steady_state`: state changes, capture resyncs and the CNI plugin's announcements
//!    ([`crate::cni`]), until a signal or `/quitquitquit`.
//! 10. `drain_and_exit`.
//!
//! Order matters: the CA and the first state are loaded and every listener is bound *before*
//! capture is attached, so no captured SYN ever finds its listener missing; readiness turns on
//! only when the first complete state is loaded, certificates for all local workloads exist and
//! capture is attached. On SIGTERM, SIGINT or admin `/quitquitquit` the daemon drains (see
//! [`crate::drain`]) and exits. Capture stays in place (pinned) by default, so enrolled pods'
//! traffic is held, never sent in clear, until the next daemon adopts it; with
//! `--detach-on-exit` the daemon removes it (traffic then flows directly again).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::accept::AcceptErrors;
use crate::admin::metrics::MetricsRoutes;
use crate::admin::routes::AdminRoutes;
use crate::admin::socket::{SocketError, SocketFile};
use crate::admin::{self, CaptureView, Readiness};
use crate::capture::{Capture, CaptureError, CaptureSettings, LocalPod};
use crate::cni::{Announcement, CniStats, Pending};
use crate::config::Config;
use crate::dns::{self, DnsStats};
use crate::drain::Drain;
use crate::hbone::client::Pool;
use crate::hbone::limits::Limits;
use crate::hbone::server::Server;
use crate::identity::{CaError, CertError, CertManager, SpiffeId};
use crate::proxy::route::Node;
use crate::proxy::{Captured, Proxy};
use crate::socket::{self, Leg, SocketFactory, TransparentSockets};
use crate::source::{self, SourceError, SourceHealth, StateSource};
use crate::state::State;
use crate::telemetry::Metrics;
use crate::workers::Workers;

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The certificate authority is unusable.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Certificates could not be set up.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The state source is unreadable at start.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {error}; is another daemon running in this network namespace, or the port taken? (set --{what}-port)")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        error: std::io::Error,
    },
    /// Capture could not be set up.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A configured TCP congestion control is not available.
    #[error("TCP congestion control {name:?} (--{flag}) is not available: {error}; load its module, pick one of /proc/sys/net/ipv4/tcp_available_congestion_control, or set `default`")]
    Congestion {
        /// The setting.
        flag: &'static str,
        /// The algorithm asked for.
        name: String,
        /// The kernel's answer.
        error: std::io::Error,
    },
    /// The data-plane worker threads could not be started.
    #[error("cannot start the data-plane worker threads: {0}")]
    Workers(std::io::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    /// The admin socket could not be bound.
    #[error("admin socket {0}")]
    AdminSocket(#[from] SocketError),
    /// The CNI endpoint's socket could not be bound or served.
    #[error("CNI socket (--cni-socket) {0}")]
    CniSocket(SocketError),
    /// The thread of the admin, metrics and readiness ports could not be started.
    #[error("cannot start the admin thread: {0}")]
    Admin(std::io::Error),
}

/// How often capture is re-checked against the state without a state change.
const CAPTURE_RESYNC: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGTERM/SIGINT (or admin `/quitquitquit`), then drains.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let cfg = Arc::new(cfg);
    check_host(&cfg)?;
    let mut source = source::from_config(&cfg);
    let (state_tx, mut state_rx) = watch::channel(Arc::new(source.initial()?));
    let certs = start_identity(&cfg)?;
    let sockets = daemon_sockets(&cfg);
    let listeners = Listeners::bind(&cfg, &*sockets)?;

    // Removes the socket files when the daemon stops, however it stops.
    let _admin_socket = listeners.admin_socket_file;
    let (cni_rx, _cni_socket) = match listeners.cni {
        Some((l, file)) => (Some(serve_cni(&cfg, l)?), Some(file)),
        None => (None, None),
    };

    let shared = Shared::new(cfg, state_rx.clone(), certs, sockets, source.health());
    let dns = start_dns(&shared, listeners.dns);
    let data_plane = start_data_plane(&shared, listeners.data_plane)?;
    serve_admin(&shared, listeners.admin, &data_plane, dns)?;

    let mut signals = Signals::install()?;
    let first = first_complete_state(&mut *source, &state_tx, &mut state_rx, &mut signals);
    let Some(state) = first.await else {
        return Ok(());
    };
    issue_first_certificates(&shared, &state).await?;
    let mut pending = Pending::new(
        shared
            .cfg
            .cni
            .as_ref()
            .map_or(Duration::from_secs(120), |c| c.pending_timeout),
    );
    let mut capture = attach_capture(&shared, &state, &mut pending)?;
    become_ready(&shared, &state);

    tokio::spawn(source.run(state_tx));
    let cni_stats = CniStats::default();
    shared.metrics.register(|r| cni_stats.register(r));
    let main = MainLoop {
        capture: &mut capture,
        pending,
        cni: cni_rx,
        cni_stats,
    };
    steady_state(&shared, &data_plane, main, state_rx, &mut signals).await;
    drain_and_exit(&shared, capture, &mut signals).await
}

/// What the host must provide, checked before anything is read or bound: the configured TCP
/// congestion controls exist. Also raises the open-file limit to the hard limit.
fn check_host(cfg: &Config) -> Result<(), AppError> {
    for (flag, name) in [
        ("pod-tcp-congestion", cfg.pod_tcp_congestion.as_deref()),
        ("hbone-tcp-congestion", cfg.hbone.tcp_congestion.as_deref()),
    ] {
        if let Some(name) = name {
            socket::check_congestion(name).map_err(|error| AppError::Congestion {
                flag,
                name: name.to_string(),
                error,
            })?;
        }
    }
    match socket::raise_fd_limit() {
        Ok(limit) if limit < 65_536 => tracing::warn!(
            limit,
            "open file limit is low: each proxied flow holds two or three descriptors; \
             raise the hard limit (e.g. LimitNOFILE or the container runtime's default)"
        ),
        Ok(limit) => tracing::info!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open file limit"),
    }
    Ok(())
}

/// The CA (the file CA, created on first use, or a client of a CA service, which connects
/// lazily so a CA that is down only delays certificates) and the certificate manager;
/// certificates are issued once the first complete state names the local workloads
/// (`issue_first_certificates`).
fn start_identity(cfg: &Config) -> Result<Arc<CertManager>, AppError> {
    let ca = cfg.ca.authority(&cfg.trust_domain)?;
    Ok(CertManager::new(ca, cfg.cert_ttl)?)
}

/// The daemon's sockets: transparent, with the daemon mark, congestion control per leg.
fn daemon_sockets(cfg: &Config) -> Arc<dyn SocketFactory> {
    Arc::new(TransparentSockets {
        mark: cfg.daemon_mark,
        pod_congestion: cfg.pod_tcp_congestion.clone(),
        hbone_congestion: cfg.hbone.tcp_congestion.clone(),
        connect_timeout: cfg.hbone.connect_timeout,
    })
}

/// Every socket the daemon serves, all bound before capture attaches, so that no captured SYN
/// or DNS datagram finds its listener missing.
struct Listeners {
    data_plane: DataPlaneListeners,
    admin: admin::Listeners,
    /// The admin socket's file, removed when dropped.
    admin_socket_file: SocketFile,
    /// Only when the DNS proxy is on.
    dns: Option<DnsSockets>,
    /// The CNI endpoint's socket and its file, unless `--cni-socket` is empty.
    cni: Option<(std::os::unix::net::UnixListener, SocketFile)>,
}

/// The captured ports, served by the data plane.
struct DataPlaneListeners {
    /// Outbound capture (15001).
    outbound: TcpListener,
    /// Inbound plaintext capture (15006).
    inbound_plaintext: TcpListener,
    /// HBONE (15008).
    hbone: TcpListener,
    /// The same three on IPv6 (`[::1]`, `[::1]`, `[::]`), when the node has IPv6.
    ipv6: Option<Ipv6Listeners>,
}

/// The IPv6 twins of the captured ports: capture steers IPv6 packets to IPv6 sockets.
struct Ipv6Listeners {
    outbound: TcpListener,
    inbound_plaintext: TcpListener,
    hbone: TcpListener,
}

/// The DNS proxy's sockets (15053).
struct DnsSockets {
    udp: UdpSocket,
    tcp: TcpListener,
    /// `[::1]:15053`, UDP and TCP, when the node has IPv6.
    ipv6: Option<(UdpSocket, TcpListener)>,
}

impl Listeners {
    /// Binds everything, in a fixed order (the first that fails names its port).
    fn bind(cfg: &Config, sockets: &dyn SocketFactory) -> Result<Listeners, AppError> {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let p = cfg.ports;
        let bind = |what, ip, port, leg, capture| {
            let addr = SocketAddr::new(ip, port);
            sockets
                .listen(leg, addr, capture)
                .map_err(|error| AppError::Bind { what, addr, error })
        };
        // Captured outbound connections come from pods of this node; plaintext inbound ones may
        // come from anywhere, so they keep the node's congestion control.
        let mut data_plane = DataPlaneListeners {
            outbound: bind("outbound", local, p.outbound, Leg::Pod, true)?,
            inbound_plaintext: bind(
                "inbound-plaintext",
                local,
                p.inbound_plaintext,
                Leg::Node,
                true,
            )?,
            hbone: bind("hbone", any, p.hbone, Leg::Hbone, true)?,
            ipv6: None,
        };
        let ipv6 = crate::socket::host_has_ipv6();
        if ipv6 {
            let (any6, local6) = (
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            );
            data_plane.ipv6 = Some(Ipv6Listeners {
                outbound: bind("outbound", local6, p.outbound, Leg::Pod, true)?,
                inbound_plaintext: bind(
                    "inbound-plaintext",
                    local6,
                    p.inbound_plaintext,
                    Leg::Node,
                    true,
                )?,
                hbone: bind("hbone", any6, p.hbone, Leg::Hbone, true)?,
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
        let admin_port = bind("admin", cfg.admin_addr, p.admin, Leg::Node, false)?;
        let metrics = bind("metrics", any, p.metrics, Leg::Node, false)?;
        let readiness = bind("readiness", any, p.readiness, Leg::Node, false)?;
        let (socket, admin_socket_file) = admin::socket::bind(&cfg.admin_socket)?;
        let admin = admin::Listeners {
            admin: to_std(admin_port, "admin", p.admin)?,
            socket,
            metrics: to_std(metrics, "metrics", p.metrics)?,
            readiness: to_std(readiness, "readiness", p.readiness)?,
        };
        let dns = match cfg.dns {
            Some(_) => {
                let addr = dns::server::listen_addr(p.dns);
                let udp = dns::server::bind_udp(addr, cfg.daemon_mark).map_err(|error| {
                    AppError::Bind {
                        what: "dns",
                        addr,
                        error,
                    }
                })?;
                let tcp = bind("dns", addr.ip(), addr.port(), Leg::Node, true)?;
                let ipv6 = match ipv6 {
                    true => Some(bind_dns_v6(p.dns, cfg.daemon_mark, &bind)?),
                    false => None,
                };
                Some(DnsSockets { udp, tcp, ipv6 })
            }
            None => None,
        };
        let cni = match &cfg.cni {
            Some(c) => Some(admin::socket::bind(&c.socket).map_err(AppError::CniSocket)?),
            None => None,
        };
        Ok(Listeners {
            data_plane,
            admin,
            admin_socket_file,
            dns,
            cni,
        })
    }
}

/// The DNS proxy's sockets on `[::1]`.
fn bind_dns_v6(
    port: u16,
    mark: u32,
    bind: &dyn Fn(&'static str, IpAddr, u16, Leg, bool) -> Result<TcpListener, AppError>,
) -> Result<(UdpSocket, TcpListener), AppError> {
    let addr = dns::server::listen_addr_v6(port);
    let udp = dns::server::bind_udp(addr, mark).map_err(|error| AppError::Bind {
        what: "dns",
        addr,
        error,
    })?;
    Ok((udp, bind("dns", addr.ip(), port, Leg::Node, true)?))
}

/// The handles the phases after start-up's checks share; each is cheap to clone.
struct Shared {
    cfg: Arc<Config>,
    /// The latest state, for the data plane, DNS and the admin API (the main task follows
    /// changes on a receiver of its own).
    state: watch::Receiver<Arc<State>>,
    certs: Arc<CertManager>,
    sockets: Arc<dyn SocketFactory>,
    metrics: Arc<Metrics>,
    drain: Drain,
    /// Set once ready; read by readiness and the admin API.
    readiness: Arc<Readiness>,
    /// Written by the main task after each capture sync; read by metrics and the admin API.
    capture: Arc<CaptureView>,
    /// How current the state source's view is; read by metrics and the admin API.
    source_health: Arc<SourceHealth>,
    /// Failed accepts of every listener loop (data plane and DNS): one reserve descriptor,
    /// one counter, one log rate limit.
    accept_errors: Arc<AcceptErrors>,
}

impl Shared {
    fn new(
        cfg: Arc<Config>,
        state: watch::Receiver<Arc<State>>,
        certs: Arc<CertManager>,
        sockets: Arc<dyn SocketFactory>,
        source_health: Arc<SourceHealth>,
    ) -> Shared {
        let metrics = Metrics::new(&cfg.cluster_domain);
        metrics.register(|r| source_health.register(r));
        metrics.register(|r| certs.health().register(r));
        let accept_errors = AcceptErrors::new();
        metrics.register(|r| accept_errors.register(r));
        Shared {
            accept_errors,
            metrics,
            source_health,
            cfg,
            state,
            certs,
            sockets,
            drain: Drain::default(),
            readiness: Arc::default(),
            capture: Arc::default(),
        }
    }
}

/// The DNS proxy's counters (registered whether or not it runs), and the proxy itself when
/// configured. Upstreams default to /etc/resolv.conf; without any, forwarded names get
/// SERVFAIL.
fn start_dns(shared: &Shared, sockets: Option<DnsSockets>) -> Arc<DnsStats> {
    let stats = Arc::new(DnsStats::default());
    shared.metrics.register(|r| stats.register(r));
    let cfg = &shared.cfg;
    let (Some(d), Some(DnsSockets { udp, tcp, ipv6 })) = (&cfg.dns, sockets) else {
        return stats;
    };
    let upstreams = if d.upstreams.is_empty() {
        dns::upstream::read_resolv_conf(std::path::Path::new("/etc/resolv.conf")).unwrap_or_else(
            |e| {
                tracing::warn!(error = %e, "dns: no upstream; names outside the mesh get SERVFAIL");
                Vec::new()
            },
        )
    } else {
        d.upstreams.clone()
    };
    tracing::info!(port = cfg.ports.dns, upstreams = ?upstreams, "dns proxy listening");
    let upstream = Arc::new(dns::upstream::Resolver::new(&upstreams, d.upstream_timeout));
    let handler = dns::Handler::new(
        shared.state.clone(),
        &cfg.cluster_domain,
        upstream,
        stats.clone(),
    );
    let gate = dns::limits::Gate::new(d.limits, stats.refused.clone());
    for (udp, tcp) in std::iter::once((udp, tcp)).chain(ipv6) {
        tokio::spawn(dns::server::run_udp(
            udp,
            handler.clone(),
            cfg.daemon_mark,
            gate.clone(),
        ));
        tokio::spawn(dns::server::run_tcp(
            tcp,
            handler.clone(),
            gate.clone(),
            shared.accept_errors.clone(),
        ));
    }
    stats
}

/// What serves flows, as `start_data_plane` built it. The main task re-checks open flows
/// through the proxy on state changes; metrics and the admin API read the pool and workers.
struct DataPlane {
    /// HBONE connections to other nodes.
    pool: Pool,
    /// The data-plane worker threads.
    workers: Arc<Workers>,
    /// Outbound and inbound flows.
    proxy: Arc<Proxy>,
}

/// Starts the data plane on `listeners`: the worker threads, the HBONE pool, the proxy, the
/// HBONE server, and the accept loops of 15001, 15006 and 15008 (tasks of this runtime that
/// hand each accepted socket to a worker).
fn start_data_plane(shared: &Shared, listeners: DataPlaneListeners) -> Result<DataPlane, AppError> {
    let cfg = &shared.cfg;
    let (sockets, drain) = (&shared.sockets, &shared.drain);
    let pool = Pool::new(cfg.hbone.clone(), shared.certs.clone(), sockets.clone());
    let workers = Arc::new(
        Workers::start(cfg.worker_threads, shared.accept_errors.clone())
            .map_err(AppError::Workers)?,
    );
    let proxy = Proxy::new(
        Node::from_config(cfg),
        &cfg.root_namespace,
        shared.state.clone(),
        pool.clone(),
        sockets.clone(),
        shared.metrics.clone(),
    );
    let limits = Limits::new(cfg.hbone_inbound.clone());
    shared.metrics.register(|r| limits.register(r));
    tokio::spawn(watch_resources(limits.clone(), cfg.release_code_pages));
    let server = Server::with_limits(
        cfg.hbone.clone(),
        limits.clone(),
        &cfg.trust_domain,
        shared.certs.clone(),
        proxy.clone(),
        drain.clone(),
    );
    let mut captured = vec![
        (listeners.outbound, Captured::Outbound),
        (listeners.inbound_plaintext, Captured::InboundPlaintext),
    ];
    let mut hbone = vec![listeners.hbone];
    if let Some(v6) = listeners.ipv6 {
        captured.push((v6.outbound, Captured::Outbound));
        captured.push((v6.inbound_plaintext, Captured::InboundPlaintext));
        hbone.push(v6.hbone);
    }
    for (listener, kind) in captured {
        let serve = proxy
            .clone()
            .serve(listener, kind, workers.clone(), drain.clone());
        tokio::spawn(serve);
    }
    // An HBONE connection does not count for the drain itself: its streams do. Connections
    // are admitted at accept, so one over a limit is reset before a worker or TLS sees it.
    let admit = move |peer: SocketAddr| match limits.admit(peer.ip()) {
        Ok(admitted) => Some(admitted),
        Err(reason) => {
            limits.refused_connection(reason, peer, "reset at accept");
            None
        }
    };
    let serve = move |tcp, peer, guard, admitted| {
        drop(guard);
        server.clone().serve_admitted(tcp, peer, admitted)
    };
    for listener in hbone {
        let (w, d) = (workers.clone(), drain.clone());
        let (admit, serve) = (admit.clone(), serve.clone());
        tokio::spawn(async move {
            w.accept_loop_admitting(listener, "hbone", &d, admit, serve)
                .await
        });
    }
    Ok(DataPlane {
        pool,
        workers,
        proxy,
    })
}

/// How often descriptors are counted, held-back refusal lines written, and a drop in
/// connections checked for memory to give back.
const RESOURCE_TICK: Duration = Duration::from_secs(1);

/// Every [`RESOURCE_TICK`]: counts the process's descriptors for the HBONE limits, writes the
/// refusal summaries held back, and gives freed heap back to the kernel after a burst of
/// inbound connections ended ([`crate::memory::Reclaim`]).
async fn watch_resources(limits: Arc<Limits>, code_pages: bool) {
    let mut reclaim = crate::memory::Reclaim::default();
    let mut tick = tokio::time::interval(RESOURCE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let l = limits.clone();
        let counted = tokio::task::spawn_blocking(move || {
            l.sample_descriptors();
            l
        })
        .await;
        let Ok(l) = counted else { continue };
        l.flush_logs();
        if let Some(released) = reclaim.after(l.in_use(), code_pages) {
            tracing::debug!(
                bytes = released,
                "heap trimmed after a burst of HBONE connections"
            );
        }
    }
}

/// Serves readiness, metrics, the admin API and the admin socket ([`crate::admin`]) on the
/// admin thread. They start before the first complete state: readiness answers 503 until
/// then, the admin API shows what is loaded.
fn serve_admin(
    shared: &Shared,
    listeners: admin::Listeners,
    data_plane: &DataPlane,
    dns: Arc<DnsStats>,
) -> Result<(), AppError> {
    let metrics = MetricsRoutes {
        metrics: shared.metrics.clone(),
        certs: shared.certs.clone(),
        pool: data_plane.pool.clone(),
        capture: shared.capture.clone(),
        workers: data_plane.workers.clone(),
        state: shared.state.clone(),
    };
    let routes = AdminRoutes {
        cfg: shared.cfg.clone(),
        state: shared.state.clone(),
        certs: shared.certs.clone(),
        pool: data_plane.pool.clone(),
        capture: shared.capture.clone(),
        readiness: shared.readiness.clone(),
        drain: shared.drain.clone(),
        dns,
        source: shared.source_health.clone(),
    };
    let routes = admin::Routes {
        admin: routes,
        metrics,
        readiness: shared.readiness.clone(),
    };
    admin::spawn(listeners, routes, admin::Limits::DEFAULT).map_err(AppError::Admin)?;
    tracing::info!(socket = %shared.cfg.admin_socket.display(), "admin socket listening");
    Ok(())
}

/// SIGTERM and SIGINT. Installed once the daemon serves its ports; before, either ends the
/// process at once.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Signals, AppError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(AppError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(AppError::Signal)?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Waits until the source holds a complete state, and returns it; `None` when a signal came
/// first (nothing is captured yet, so the daemon just exits). Until then the daemon is not
/// ready: a pod file that never parsed leaves its pods unknown.
async fn first_complete_state(
    source: &mut dyn StateSource,
    tx: &watch::Sender<Arc<State>>,
    rx: &mut watch::Receiver<Arc<State>>,
    signals: &mut Signals,
) -> Option<Arc<State>> {
    tokio::select! {
        biased;
        () = source.first_complete(tx) => {}
        _ = signals.recv() => return None,
    }
    let state = rx.borrow_and_update().clone();
    source::log_applied(&state, None);
    Some(state)
}

/// Certificates for every enrolled local workload, awaited so the first flows don't race
/// their issuance; renewal goes on in the background after.
async fn issue_first_certificates(shared: &Shared, state: &State) -> Result<(), AppError> {
    update_certificates(&shared.cfg, &shared.certs, state);
    for id in local_identities(&shared.cfg, state) {
        shared.certs.fetch(&id, Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Serves the CNI plugin's requests (answered by the main task in `steady_state`).
fn serve_cni(
    cfg: &Config,
    listener: std::os::unix::net::UnixListener,
) -> Result<tokio::sync::mpsc::Receiver<Announcement>, AppError> {
    let rx = crate::cni::server::spawn(listener).map_err(|error| {
        AppError::CniSocket(SocketError::Io {
            path: cfg
                .cni
                .as_ref()
                .map(|c| c.socket.clone())
                .unwrap_or_default(),
            what: "serving",
            error,
        })
    })?;
    if let Some(c) = &cfg.cni {
        tracing::info!(socket = %c.socket.display(), "cni endpoint listening");
    }
    Ok(rx)
}

/// Loads and attaches the capture programs (when capture is on) and brings them in line with
/// `state`. Every listener is bound by now.
fn attach_capture(
    shared: &Shared,
    state: &State,
    pending: &mut Pending,
) -> Result<Option<Capture>, AppError> {
    let cfg = &shared.cfg;
    let Some(c) = &cfg.capture else {
        return Ok(None);
    };
    let p = cfg.ports;
    let mut capture = Capture::start(&CaptureSettings {
        outbound_port: p.outbound,
        inbound_plaintext_port: p.inbound_plaintext,
        hbone_port: p.hbone,
        dns_port: if cfg.dns.is_some() { p.dns } else { 0 },
        capture_mark: c.capture_mark,
        daemon_mark: cfg.daemon_mark,
        route_table: c.route_table,
        uplinks: c.uplinks.clone(),
        pin_dir: c.pin_dir.clone(),
    })?;
    sync_capture(
        cfg,
        Some(&mut capture),
        state,
        pending,
        &shared.capture,
        true,
    );
    Ok(Some(capture))
}

/// Turns readiness on, then lets go of the memory start-up no longer needs.
fn become_ready(shared: &Shared, state: &State) {
    shared.readiness.set_ready();
    tracing::info!(node = %shared.cfg.node_name, generation = state.generation, "ready");
    let released = crate::memory::release_startup_memory(shared.cfg.release_code_pages);
    tracing::debug!(bytes = released, "start-up memory released");
}

/// What the main task owns in `steady_state`: capture, the pods the CNI plugin announced,
/// and the plugin's requests.
struct MainLoop<'a> {
    capture: &'a mut Option<Capture>,
    pending: Pending,
    cni: Option<tokio::sync::mpsc::Receiver<Announcement>>,
    cni_stats: CniStats,
}

/// The next CNI request, or never without a CNI endpoint.
async fn next_announcement(
    rx: &mut Option<tokio::sync::mpsc::Receiver<Announcement>>,
) -> Option<Announcement> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Follows state changes (open flows re-checked, certificates, capture), answers the CNI
/// plugin ([`crate::cni::answer`]: capture in place before the answer) and re-syncs capture
/// now and then (a pod's veth may appear after its object does; announcements expire), until
/// SIGTERM, SIGINT or `/quitquitquit`.
async fn steady_state(
    shared: &Shared,
    data_plane: &DataPlane,
    main: MainLoop<'_>,
    mut state_rx: watch::Receiver<Arc<State>>,
    signals: &mut Signals,
) {
    let cfg = &shared.cfg;
    let MainLoop {
        capture,
        mut pending,
        cni: mut cni_rx,
        cni_stats,
    } = main;
    let mut resync = tokio::time::interval(CAPTURE_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = resync.tick() => {
                let state = state_rx.borrow().clone();
                sync_capture(cfg, capture.as_mut(), &state, &mut pending, &shared.capture, false);
            }
            changed = state_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let state = state_rx.borrow_and_update().clone();
                data_plane.proxy.recheck_connections(&state);
                update_certificates(cfg, &shared.certs, &state);
                sync_capture(cfg, capture.as_mut(), &state, &mut pending, &shared.capture, true);
            }
            Some(a) = next_announcement(&mut cni_rx) => {
                let state = state_rx.borrow().clone();
                let sync = |c: &mut Capture, p: &mut Pending| {
                    sync_capture(cfg, Some(c), &state, p, &shared.capture, true);
                };
                let reply = crate::cni::answer(
                    &a.request,
                    &state,
                    &cfg.node_name,
                    &mut pending,
                    capture.as_mut(),
                    sync,
                    &cni_stats,
                );
                // The plugin may have given up meanwhile; nothing to do then.
                let _ = a.reply.send(reply);
            }
            signal = signals.recv() => {
                tracing::info!("{signal} received; draining");
                return;
            }
            _ = shared.drain.started() => {
                tracing::info!("drain requested through the admin socket");
                return;
            }
        }
    }
}

/// Drains (new connections refused, open flows awaited up to `--drain-timeout` or until
/// another signal), then, with `--detach-on-exit`, removes capture (traffic flows directly
/// again); otherwise leaves it pinned, failing closed until the next daemon.
async fn drain_and_exit(
    shared: &Shared,
    capture: Option<Capture>,
    signals: &mut Signals,
) -> Result<(), AppError> {
    let (cfg, drain) = (&shared.cfg, &shared.drain);
    drain.start();
    let active = drain.active();
    tracing::info!(
        active,
        timeout = ?cfg.drain_timeout,
        "draining: new connections refused, waiting for open ones"
    );
    let left = tokio::select! {
        n = drain.wait_idle(cfg.drain_timeout) => n,
        _ = signals.recv() => drain.active(),
    };
    tracing::info!(left, "drain finished");
    let detach = cfg.capture.as_ref().is_some_and(|c| c.detach_on_exit);
    match capture {
        Some(c) if detach => {
            c.uninstall()?;
            tracing::info!("capture removed (--detach-on-exit); exiting");
        }
        Some(c) => {
            let pin_dir = cfg
                .capture
                .as_ref()
                .map(|c| c.pin_dir.display().to_string());
            drop(c);
            tracing::info!(
                pin_dir,
                "capture left in place: enrolled pods' traffic is held until a daemon adopts \
                 it (`ztunnel uninstall` removes it); exiting"
            );
        }
        None => tracing::info!("exiting"),
    }
    Ok(())
}

fn local_identities(cfg: &Config, state: &State) -> BTreeSet<SpiffeId> {
    state
        .local_workloads(&cfg.node_name)
        .filter(|w| w.enrolled)
        .map(|w| w.identity.clone())
        .collect()
}

fn update_certificates(cfg: &Config, certs: &Arc<CertManager>, state: &State) {
    certs.set_identities(&local_identities(cfg, state));
}

/// Brings capture in line with `state`. Logs `capture updated` after a state change, and after
/// a periodic resync only when the attached interfaces changed.
fn sync_capture(
    cfg: &Config,
    capture: Option<&mut Capture>,
    state: &State,
    pending: &mut Pending,
    view: &CaptureView,
    state_changed: bool,
) {
    let Some(capture) = capture else { return };
    let mut pods: Vec<LocalPod> = state
        .local_workloads(&cfg.node_name)
        .filter_map(|w| LocalPod::new(w.key(), &w.ips, w.enrolled, w.dns_capture))
        .collect();
    // Pods the CNI plugin announced that the state does not show yet.
    pending.merge(&mut pods, std::time::Instant::now());
    let problems = capture.sync(&pods);
    for (pod, error) in &problems {
        // Warn once per state change; the periodic retries stay quiet.
        if state_changed {
            tracing::warn!(%pod, %error, "capture not in place for pod; retrying");
        } else {
            tracing::debug!(%pod, %error, "capture still not in place for pod");
        }
    }
    let enrolled = pods.iter().filter(|p| p.enrolled).count();
    let interfaces = capture.attached();
    let attached = interfaces.len();
    let interfaces_changed = view.update(interfaces, capture.enrolled(), capture.drop_counts());
    if state_changed || interfaces_changed {
        tracing::info!(
            generation = state.generation,
            enrolled,
            interfaces = attached,
            "capture updated"
        );
    }
}
