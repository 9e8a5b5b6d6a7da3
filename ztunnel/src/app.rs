//! Start-up, steady state and shutdown of the daemon.
//!
//! [`run`] is a sequence of phases, each a function below or in a submodule (`data_plane`:
//! what serves traffic; `steady_state`: the daemon once ready; `listeners`: every socket):
//!
//! 1. `check_host`: the configured TCP congestion controls exist; the open-file limit is raised.
//! 2. The state source ([`crate::source`]): its first read, published on a `watch` channel.
//! 3. `start_identity`: the CA and the certificate manager.
//! 4. `take_over`, `Listeners::bind`: every socket the daemon serves, received from the
//!    daemon running on this node when there is one ([`crate::handover`]), else bound.
//! 5. `start_dns`, `start_data_plane`: the DNS proxy; the workers, HBONE pool, proxy, HBONE
//!    server and the accept loops of 15001, 15006 and 15008.
//! 6. `serve_admin`: admin, metrics and readiness (answering 503 until ready), and the admin
//!    socket, on a thread of their own.
//! 7. `first_complete_state`, then `issue_first_certificates` for the local workloads.
//! 8. `attach_capture`, then `become_ready` (a daemon that took over starts accepting only
//!    now, and tells its predecessor); the source then polls on its own.
//! 9. `steady_state`: state changes, capture resyncs and the CNI plugin's announcements
//!    ([`crate::cni`]), until a signal, `/quitquitquit` or a hand-over to a new daemon of
//!    the node.
//! 10. `drain_and_exit`.
//!
//! Order matters: the CA and the first state are loaded and every listener is bound *before*
//! capture is attached, so no captured SYN ever finds its listener missing; readiness turns on
//! only when the first complete state is loaded, certificates for all local workloads exist and
//! capture is attached. On SIGTERM, SIGINT or admin `/quitquitquit` the daemon drains (see
//! [`crate::drain`]) and exits. Capture stays in place (pinned) by default, so enrolled pods'
//! traffic is held, never sent in clear, until the next daemon adopts it; with
//! `--detach-on-exit` the daemon removes it (traffic then flows directly again).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::accept::AcceptErrors;
use crate::admin::metrics::MetricsRoutes;
use crate::admin::routes::AdminRoutes;
use crate::admin::socket::SocketError;
use crate::admin::{self, CaptureView, Readiness};
use crate::capture::{Capture, CaptureError, CaptureSettings};
use crate::cni::install::Keeper;
use crate::cni::{Announcement, CniStats, Pending};
use crate::config::Config;
use crate::dns::DnsStats;
use crate::drain::Drain;
use crate::handover::{self, HandoverError, Offer, Serving};
use crate::identity::{CaError, CertError, CertManager};
use crate::socket::{self, SocketFactory, TransparentSockets};
use crate::source::{self, SourceError, SourceHealth, StateSource};
use crate::state::State;
use crate::telemetry::Metrics;

mod data_plane;
mod listeners;
mod steady_state;

use data_plane::{start_data_plane, start_dns, DataPlane};
use listeners::Listeners;
use steady_state::{
    local_identities, steady_state, sync_capture, update_certificates, MainLoop, Stop,
};

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
    /// The data-plane worker threads could not be started, or not given the listeners.
    #[error("cannot start the data-plane workers: {0}")]
    Workers(std::io::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    /// The admin socket could not be bound.
    #[error("admin socket {0}")]
    AdminSocket(#[from] SocketError),
    /// The hand-over socket could not be bound.
    #[error("hand-over socket {0}")]
    HandoverSocket(SocketError),
    /// The running daemon's sockets could not be taken over.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// The CNI endpoint's socket could not be bound or served.
    #[error("CNI socket (--cni-socket) {0}")]
    CniSocket(SocketError),
    /// The thread of the admin, metrics and readiness ports could not be started.
    #[error("cannot start the admin thread: {0}")]
    Admin(std::io::Error),
}

/// Runs the daemon until SIGTERM/SIGINT (or admin `/quitquitquit`), then drains.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let cfg = Arc::new(cfg);
    check_host(&cfg)?;
    let mut source = source::from_config(&cfg);
    let (state_tx, mut state_rx) = watch::channel(Arc::new(source.initial()?));
    let certs = start_identity(&cfg)?;
    let sockets = daemon_sockets(&cfg);
    let mut inherited = match &cfg.handover_socket {
        Some(path) => handover::take_over(path, &cfg.node_name).await?,
        None => None,
    };
    let listeners = Listeners::bind(&cfg, &*sockets, inherited.as_mut())?;

    // Removes the socket files when the daemon stops, however it stops (unless handed over).
    let files = listeners.files;

    // A daemon that took over accepts only once ready; its predecessor serves until then.
    let serving = Serving::new(inherited.is_none());
    let shared = Shared::new(
        cfg,
        state_rx.clone(),
        certs,
        sockets,
        source.health(),
        serving,
    );
    let dns = start_dns(&shared, listeners.dns);
    let data_plane = start_data_plane(&shared, listeners.data_plane)?;
    serve_admin(&shared, listeners.admin, &data_plane, dns)?;
    let mut handover = serve_handover(&shared, listeners.handover);
    let (cni_rx, cni_keeper) = match listeners.cni {
        Some(l) => {
            let (rx, keeper) = serve_cni(&shared, l)?;
            (Some(rx), keeper)
        }
        None => (None, None),
    };

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
    shared.serving.open();
    become_ready(&shared, &state);
    // Not kept past start-up: held for the daemon's life, the first snapshot would pin every
    // Service, endpoint list and workload it references once later changes replace them
    // (2.6 MiB after churn through a 10,000-pod state).
    drop(state);
    if let Some(inherited) = inherited.take() {
        inherited.complete(shared.handover_stats.clone());
    }

    tokio::spawn(source.run(state_tx));
    let cni_stats = CniStats::default();
    shared.metrics.register(|r| cni_stats.register(r));
    let main = MainLoop {
        capture: &mut capture,
        pending,
        cni: cni_rx,
        cni_stats,
    };
    let stop = steady_state(
        &shared,
        &data_plane,
        main,
        state_rx,
        &mut signals,
        &mut handover,
    )
    .await;
    if let (Some(keeper), Stop::Requested) = (&cni_keeper, stop) {
        // First, so that an uninstalled release's plugin does not hold the node's new pods.
        keeper.release_if_owner_gone().await;
    }
    drain_and_exit(&shared, capture, &mut signals, stop).await?;
    if stop == Stop::HandedOver {
        // The successor serves on them now.
        files.keep();
    }
    Ok(())
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
    /// Whether this process accepts: every accept loop runs inside it ([`crate::handover`]).
    serving: Serving,
    /// Hand-overs this process took part in.
    handover_stats: Arc<handover::Stats>,
}

impl Shared {
    fn new(
        cfg: Arc<Config>,
        state: watch::Receiver<Arc<State>>,
        certs: Arc<CertManager>,
        sockets: Arc<dyn SocketFactory>,
        source_health: Arc<SourceHealth>,
        serving: Serving,
    ) -> Shared {
        let metrics = Metrics::new(&cfg.cluster_domain);
        let handover_stats = Arc::new(handover::Stats::default());
        metrics.register(|r| handover_stats.register(r));
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
            serving,
            handover_stats,
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
    admin::spawn(
        listeners,
        routes,
        admin::Limits::DEFAULT,
        shared.serving.clone(),
    )
    .map_err(AppError::Admin)?;
    tracing::info!(socket = %shared.cfg.admin_socket.display(), "admin socket listening");
    Ok(())
}

/// Answers on the hand-over socket (while this daemon accepts): a new daemon of this node
/// gets the sockets, and this one stops accepting once it is ready. Returns what the main task
/// hears of it; `None` when hand-over is off.
fn serve_handover(
    shared: &Shared,
    socket: Option<(std::os::unix::net::UnixListener, Offer)>,
) -> Option<mpsc::UnboundedReceiver<handover::Event>> {
    let (listener, offer) = socket?;
    let netns = match handover::netns_id() {
        Ok(n) => n,
        Err(error) => {
            tracing::warn!(%error, "cannot read this daemon's network namespace; hand-over to a new daemon is off");
            return None;
        }
    };
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, "cannot serve the hand-over socket; hand-over to a new daemon is off");
            return None;
        }
    };
    let (events, rx) = mpsc::unbounded_channel();
    let server = handover::predecessor::Predecessor {
        node: shared.cfg.node_name.clone(),
        netns,
        offer,
        serving: shared.serving.clone(),
        drain: shared.drain.clone(),
        stats: shared.handover_stats.clone(),
        events,
    };
    tokio::spawn(server.serve(listener));
    Some(rx)
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
    source::log_applied(&state, None, None);
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
    shared: &Shared,
    listener: std::os::unix::net::UnixListener,
) -> Result<(tokio::sync::mpsc::Receiver<Announcement>, Option<Keeper>), AppError> {
    let cfg = &shared.cfg;
    let rx = crate::cni::server::spawn(listener, shared.serving.clone()).map_err(|error| {
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
    // Installed once the endpoint listens: the plugin's first ADD finds the daemon.
    let keeper = cfg
        .cni
        .as_ref()
        .and_then(|c| c.install.clone())
        .map(|install| {
            let stats = crate::cni::install::InstallStats::default();
            shared.metrics.register(|r| stats.register(r));
            crate::cni::install::Keeper::spawn(install, stats)
        });
    Ok((rx, keeper))
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
        exempt_node_traffic: c.exempt_node_traffic,
        pin_dir: c.pin_dir.clone(),
    })?;
    sync_capture(
        cfg,
        Some(&mut capture),
        state,
        pending,
        &shared.capture,
        &shared.readiness,
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

/// Drains (new connections refused, open flows awaited up to `--drain-timeout` or until
/// another signal), then, with `--detach-on-exit`, removes capture (traffic flows directly
/// again); otherwise leaves it pinned, failing closed until the next daemon. After a
/// hand-over no longer accepting is what stopped new flows, capture is the new daemon's
/// whatever `--detach-on-exit` says, and one signal (the orchestrator stopping this process)
/// does not cut the drain short: a second one does.
async fn drain_and_exit(
    shared: &Shared,
    capture: Option<Capture>,
    signals: &mut Signals,
    stop: Stop,
) -> Result<(), AppError> {
    let (cfg, drain) = (&shared.cfg, &shared.drain);
    drain.start();
    let active = drain.active();
    tracing::info!(
        active,
        timeout = ?cfg.drain_timeout,
        handed_over = stop == Stop::HandedOver,
        "draining: new connections refused, waiting for open ones"
    );
    let mut signals_to_end = if stop == Stop::HandedOver { 2 } else { 1 };
    let idle = drain.wait_idle(cfg.drain_timeout);
    tokio::pin!(idle);
    let left = loop {
        tokio::select! {
            n = &mut idle => break n,
            signal = signals.recv() => {
                signals_to_end -= 1;
                if signals_to_end == 0 {
                    break drain.active();
                }
                tracing::info!("{signal} received while draining after a hand-over; open \
                    flows go on (another signal ends the drain)");
            }
        }
    };
    tracing::info!(left, "drain finished");
    let detach = cfg.capture.as_ref().is_some_and(|c| c.detach_on_exit);
    match capture {
        Some(c) if stop == Stop::HandedOver => {
            drop(c);
            tracing::info!("capture left to the new daemon; exiting");
        }
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
