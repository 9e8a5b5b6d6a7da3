//! Start-up, steady state and shutdown of the daemon.
//!
//! Order matters: the CA and the first state are loaded and every listener is bound *before*
//! capture is attached, so no captured SYN ever finds its listener missing; readiness turns on
//! only when the first complete state is loaded, certificates for all local workloads exist and
//! capture is attached. On SIGTERM, SIGINT or admin `/quitquitquit` the daemon drains (see
//! [`crate::drain`]), then detaches capture (traffic then flows directly again) and exits.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admin::{self, Readiness, Reply};
use crate::capture::{Capture, CaptureError, CaptureSettings, LocalPod};
use crate::config::Config;
use crate::dns::{self, DnsStats};
use crate::drain::Drain;
use crate::hbone::client::Pool;
use crate::hbone::server::Server;
use crate::identity::{CaError, CertError, CertManager, FileCa, SpiffeId};
use crate::proxy::Proxy;
use crate::socket;
use crate::source::{self, FileSource, SourceError};
use crate::state::State;
use crate::telemetry::metrics::gauge;
use crate::telemetry::{self, Metrics};
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
}

fn bind(
    what: &'static str,
    ip: IpAddr,
    port: u16,
    transparent: bool,
    mark: u32,
    congestion: Option<&str>,
) -> Result<tokio::net::TcpListener, AppError> {
    let addr = SocketAddr::new(ip, port);
    socket::listener(addr, transparent, mark, congestion).map_err(|error| AppError::Bind {
        what,
        addr,
        error,
    })
}

/// How often capture is re-checked against the state without a state change.
const CAPTURE_RESYNC: Duration = Duration::from_secs(2);

/// What the admin API and metrics show of capture; updated by the main task.
#[derive(Debug, Default, Clone)]
struct CaptureView {
    interfaces: Vec<String>,
    enrolled: Vec<Ipv4Addr>,
}

/// Runs the daemon until SIGTERM/SIGINT (or admin `/quitquitquit`), then drains.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let cfg = Arc::new(cfg);
    let ca = FileCa::load_or_create(&cfg.ca_dir, &cfg.trust_domain)?;
    let certs = CertManager::new(Arc::new(ca), cfg.cert_ttl)?;
    let metrics = Metrics::new();
    let drain = Drain::default();

    let mut source = FileSource::new(&cfg.state_path, &cfg.trust_domain);
    let first = source.poll()?.unwrap_or_default();
    let (state_tx, mut state_rx) = watch::channel(Arc::new(first));

    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mark = cfg.daemon_mark;
    let p = cfg.ports;
    let (pod_cc, hbone_cc) = (
        cfg.pod_tcp_congestion.as_deref(),
        cfg.hbone.tcp_congestion.as_deref(),
    );
    for (flag, name) in [
        ("pod-tcp-congestion", pod_cc),
        ("hbone-tcp-congestion", hbone_cc),
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
    // Captured outbound connections come from pods of this node; plaintext inbound ones may
    // come from anywhere, so they keep the node's congestion control.
    let outbound = bind("outbound", local, p.outbound, true, mark, pod_cc)?;
    let plaintext = bind(
        "inbound-plaintext",
        local,
        p.inbound_plaintext,
        true,
        mark,
        None,
    )?;
    let hbone = bind("hbone", any, p.hbone, true, mark, hbone_cc)?;
    let admin_l = bind("admin", cfg.admin_addr, p.admin, false, mark, None)?;
    let metrics_l = bind("metrics", any, p.metrics, false, mark, None)?;
    let ready_l = bind("readiness", any, p.readiness, false, mark, None)?;
    let dns_stats = Arc::new(DnsStats::default());
    metrics.register(|r| dns_stats.register(r));
    if let Some(d) = &cfg.dns {
        start_dns(&cfg, d, state_rx.clone(), dns_stats.clone())?;
    }

    let pool = Pool::new(cfg.hbone.clone(), mark, certs.clone());
    let workers = Arc::new(Workers::start(cfg.worker_threads).map_err(AppError::Workers)?);
    let proxy = Proxy::new(
        cfg.clone(),
        state_rx.clone(),
        pool.clone(),
        metrics.clone(),
        drain.clone(),
        workers.clone(),
    );
    let server = Server::new(
        cfg.hbone.clone(),
        &cfg.trust_domain,
        certs.clone(),
        proxy.clone(),
    );
    tokio::spawn(proxy.clone().run_outbound(outbound));
    tokio::spawn(proxy.clone().run_inbound_plaintext(plaintext));
    tokio::spawn(server.run(hbone));

    let readiness = Arc::new(Readiness::default());
    let view: Arc<Mutex<CaptureView>> = Arc::default();
    {
        let r = readiness.clone();
        tokio::spawn(admin::serve(ready_l, move |path| match path {
            "/healthz/ready" if r.is_ready() => Reply::text(200, "ready\n"),
            "/healthz/ready" => Reply::text(503, "not ready\n"),
            _ => Reply::text(404, "not found\n"),
        }));
        let (m_certs, m_pool, m_view, metrics) =
            (certs.clone(), pool.clone(), view.clone(), metrics.clone());
        let m_workers = workers.clone();
        tokio::spawn(admin::serve(metrics_l, move |path| {
            let (certs, pool, view) = (&m_certs, &m_pool, &m_view);
            match path.split('?').next().unwrap_or("") {
                "/metrics" | "/stats/prometheus" => {
                    let stats = pool.stats();
                    metrics.pool_connections.set(gauge(stats.connections));
                    metrics.pool_streams.set(gauge(stats.streams));
                    let v = view.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    metrics.capture_enrolled_pods.set(gauge(v.enrolled.len()));
                    metrics
                        .capture_attached_programs
                        .set(gauge(v.interfaces.len()));
                    metrics.set_certificates(&certs.snapshot());
                    metrics.set_worker_loads(&m_workers.loads());
                    Reply::new(200, telemetry::metrics::CONTENT_TYPE, metrics.encode())
                }
                _ => Reply::text(404, "not found\n"),
            }
        }));
        let admin = AdminContext {
            cfg: cfg.clone(),
            state: state_rx.clone(),
            certs: certs.clone(),
            pool: pool.clone(),
            view: view.clone(),
            readiness: readiness.clone(),
            drain: drain.clone(),
            dns: dns_stats.clone(),
        };
        tokio::spawn(admin::serve(admin_l, move |path| admin.route(path)));
    }

    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;

    // The first state counts as loaded once every file in the source has parsed; until then
    // the daemon is not ready (a pod file that never parsed leaves its pods unknown).
    while !source.complete() {
        tokio::select! {
            _ = tokio::time::sleep(cfg.state_poll_interval) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
        match source.poll() {
            Ok(Some(s)) => {
                state_tx.send_replace(Arc::new(s));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "state source unreadable; not ready"),
        }
    }
    let state = state_rx.borrow_and_update().clone();
    source::log_applied(&state);
    update_certificates(&cfg, &certs, &state);
    for id in local_identities(&cfg, &state) {
        // Wait for first issuance so the first flows don't race it; renewal goes on after.
        certs.fetch(&id, Duration::from_secs(30)).await?;
    }
    let mut capture = match &cfg.capture {
        Some(c) => Some(Capture::start(&CaptureSettings {
            outbound_port: p.outbound,
            inbound_plaintext_port: p.inbound_plaintext,
            hbone_port: p.hbone,
            dns_port: if cfg.dns.is_some() { p.dns } else { 0 },
            capture_mark: c.capture_mark,
            daemon_mark: mark,
            route_table: c.route_table,
            uplinks: c.uplinks.clone(),
        })?),
        None => None,
    };
    sync_capture(&cfg, capture.as_mut(), &state, &view, true);
    readiness.set_ready();
    tracing::info!(node = %cfg.node_name, generation = state.generation, "ready");
    let released = crate::memory::release_startup_memory(cfg.release_code_pages);
    tracing::debug!(bytes = released, "start-up memory released");

    tokio::spawn(source.run(cfg.state_poll_interval, state_tx));
    // Re-sync capture now and then: a pod's veth may appear after its object does.
    let mut resync = tokio::time::interval(CAPTURE_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = resync.tick() => {
                let state = state_rx.borrow().clone();
                sync_capture(&cfg, capture.as_mut(), &state, &view, false);
            }
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let state = state_rx.borrow_and_update().clone();
                proxy.recheck_connections(&state);
                update_certificates(&cfg, &certs, &state);
                sync_capture(&cfg, capture.as_mut(), &state, &view, true);
            }
            _ = term.recv() => { tracing::info!("SIGTERM received; draining"); break; }
            _ = int.recv() => { tracing::info!("SIGINT received; draining"); break; }
            _ = drain.started() => { tracing::info!("drain requested through the admin API"); break; }
        }
    }
    drain.start();
    let active = drain.active();
    tracing::info!(
        active,
        timeout = ?cfg.drain_timeout,
        "draining: new connections refused, waiting for open ones"
    );
    let left = tokio::select! {
        n = drain.wait_idle(cfg.drain_timeout) => n,
        _ = term.recv() => drain.active(),
        _ = int.recv() => drain.active(),
    };
    tracing::info!(left, "drain finished");
    if let Some(c) = capture {
        c.shutdown()?;
    }
    tracing::info!("capture removed; exiting");
    Ok(())
}

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the admin API (15000) reads.
struct AdminContext {
    cfg: Arc<Config>,
    state: watch::Receiver<Arc<State>>,
    certs: Arc<CertManager>,
    pool: Pool,
    view: Arc<Mutex<CaptureView>>,
    readiness: Arc<Readiness>,
    drain: Drain,
    dns: Arc<DnsStats>,
}

impl AdminContext {
    fn route(&self, target: &str) -> Reply {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        match path {
            "/config_dump" => {
                Reply::json(serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default())
            }
            "/logging" => {
                let level = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .map(percent_decode);
                match level {
                    None => Reply::text(
                        200,
                        format!(
                            "level: {}\n",
                            telemetry::current_log_level().unwrap_or_default()
                        ),
                    ),
                    Some(l) => match telemetry::set_log_level(&l) {
                        Ok(now) => {
                            tracing::info!(level = %now, "log level changed");
                            Reply::text(200, format!("level: {now}\n"))
                        }
                        Err(e) => Reply::text(400, format!("{e}\n")),
                    },
                }
            }
            "/quitquitquit" => {
                self.drain.start();
                Reply::text(200, "draining\n")
            }
            _ => Reply::text(404, "not found\n"),
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        let state = self.state.borrow().clone();
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let certificates: Vec<_> = self
            .certs
            .snapshot()
            .into_iter()
            .map(|(id, c)| match c {
                Some(c) => json!({
                    "identity": id,
                    "state": "issued",
                    "serial": c.serial,
                    "not_before": unix_secs(c.not_before),
                    "not_after": unix_secs(c.not_after),
                    "expires_in_secs": telemetry::metrics::seconds_until(c.not_after),
                }),
                None => json!({"identity": id, "state": "pending"}),
            })
            .collect();
        let mut local: Vec<_> = state.local_workloads(&self.cfg.node_name).collect();
        local.sort_by_key(|w| w.key());
        let enrolled_pods: Vec<_> = local
            .iter()
            .map(|w| {
                let captured = matches!(w.ip, IpAddr::V4(ip) if view.enrolled.contains(&ip));
                json!({
                    "pod": w.key(),
                    "ip": w.ip,
                    "workload": w.workload_name,
                    "identity": w.identity,
                    "enrolled": w.enrolled,
                    "captured": captured,
                })
            })
            .collect();
        let mut workloads: Vec<_> = state.workloads.values().collect();
        workloads.sort_by_key(|w| w.key());
        json!({
            "node": self.cfg.node_name,
            "ready": self.readiness.is_ready(),
            "draining": self.drain.is_draining(),
            "active_flows": self.drain.active(),
            "config": &*self.cfg,
            "generation": state.generation,
            "workloads": workloads,
            "services": state.services,
            "enrolled_pods": enrolled_pods,
            "certificates": certificates,
            "hbone_pool": self.pool.stats(),
            "capture": {"attached_interfaces": view.interfaces},
            "dns": self.dns.snapshot(),
        })
    }
}

/// Decodes `%XX` and `+` in a query value (log directives contain `=` and `,`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Binds the DNS proxy's UDP and TCP sockets (before capture, like every listener) and starts
/// serving. Upstreams default to /etc/resolv.conf; without any, forwarded names get SERVFAIL.
fn start_dns(
    cfg: &Config,
    d: &crate::config::DnsConfig,
    state: watch::Receiver<Arc<State>>,
    stats: Arc<DnsStats>,
) -> Result<(), AppError> {
    let addr = dns::server::listen_addr(cfg.ports.dns);
    let udp = dns::server::bind_udp(addr, cfg.daemon_mark).map_err(|error| AppError::Bind {
        what: "dns",
        addr,
        error,
    })?;
    let tcp = bind("dns", addr.ip(), addr.port(), true, cfg.daemon_mark, None)?;
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
    tracing::info!(port = addr.port(), upstreams = ?upstreams, "dns proxy listening");
    let upstream = Arc::new(dns::upstream::Resolver::new(&upstreams, d.upstream_timeout));
    let handler = dns::Handler::new(state, &cfg.cluster_domain, upstream, stats);
    tokio::spawn(dns::server::run_udp(udp, handler.clone(), cfg.daemon_mark));
    tokio::spawn(dns::server::run_tcp(tcp, handler));
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
    view: &Mutex<CaptureView>,
    state_changed: bool,
) {
    let Some(capture) = capture else { return };
    let pods: Vec<LocalPod> = state
        .local_workloads(&cfg.node_name)
        .filter_map(|w| match w.ip {
            IpAddr::V4(ip) => Some(LocalPod {
                name: w.key(),
                ip,
                enrolled: w.enrolled,
                dns_capture: w.dns_capture,
            }),
            IpAddr::V6(_) => None,
        })
        .collect();
    let problems = capture.sync(&pods);
    for (pod, error) in &problems {
        // Warn once per state change; the periodic retries stay quiet.
        if state_changed {
            tracing::warn!(%pod, %error, "capture not in place for pod; retrying");
        } else {
            tracing::debug!(%pod, %error, "capture still not in place for pod");
        }
    }
    let now = capture.attached();
    let mut last = view.lock().unwrap_or_else(|p| p.into_inner());
    let enrolled = pods.iter().filter(|p| p.enrolled).count();
    if state_changed || last.interfaces != now {
        tracing::info!(
            generation = state.generation,
            enrolled,
            interfaces = now.len(),
            "capture updated"
        );
    }
    last.interfaces = now;
    last.enrolled = capture.enrolled();
}
