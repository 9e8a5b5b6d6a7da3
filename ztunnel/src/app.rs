//! Start-up, steady state and shutdown of the daemon.
//!
//! Order matters: the CA and the first state are loaded and every listener is bound *before*
//! capture is attached, so no captured SYN ever finds its listener missing; readiness turns on
//! only when certificates for all local workloads exist and capture is attached. On SIGTERM or
//! SIGINT capture is detached first (traffic then flows directly again), then the process exits.

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
use crate::hbone::client::Pool;
use crate::hbone::server::Server;
use crate::identity::{CaError, CertError, CertManager, FileCa, SpiffeId};
use crate::proxy::Proxy;
use crate::socket;
use crate::source::{self, FileSource, SourceError};
use crate::state::State;

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
) -> Result<tokio::net::TcpListener, AppError> {
    let addr = SocketAddr::new(ip, port);
    socket::listener(addr, transparent, mark).map_err(|error| AppError::Bind { what, addr, error })
}

/// How often capture is re-checked against the state without a state change.
const CAPTURE_RESYNC: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let cfg = Arc::new(cfg);
    let ca = FileCa::load_or_create(&cfg.ca_dir, &cfg.trust_domain)?;
    let certs = CertManager::new(Arc::new(ca), cfg.cert_ttl)?;

    let mut source = FileSource::new(&cfg.state_path, &cfg.trust_domain);
    let first = source.poll()?.unwrap_or_default();
    source::log_applied(&first);
    let (state_tx, mut state_rx) = watch::channel(Arc::new(first));

    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mark = cfg.daemon_mark;
    let p = cfg.ports;
    let outbound = bind("outbound", local, p.outbound, true, mark)?;
    let plaintext = bind("inbound-plaintext", local, p.inbound_plaintext, true, mark)?;
    let hbone = bind("hbone", any, p.hbone, true, mark)?;
    let admin_l = bind("admin", cfg.admin_addr, p.admin, false, mark)?;
    let ready_l = bind("readiness", any, p.readiness, false, mark)?;

    let pool = Pool::new(cfg.hbone.clone(), mark, certs.clone());
    let proxy = Proxy::new(cfg.clone(), state_rx.clone(), pool.clone());
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
    let attached: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let r = readiness.clone();
        tokio::spawn(admin::serve(ready_l, move |path| match path {
            "/healthz/ready" if r.is_ready() => Reply::text(200, "ready\n"),
            "/healthz/ready" => Reply::text(503, "not ready\n"),
            _ => Reply::text(404, "not found\n"),
        }));
        let (cfg, rx, certs, pool, attached) = (
            cfg.clone(),
            state_rx.clone(),
            certs.clone(),
            pool.clone(),
            attached.clone(),
        );
        tokio::spawn(admin::serve(admin_l, move |path| match path {
            "/config_dump" => {
                let state = rx.borrow().clone();
                let certificates: Vec<_> = certs
                    .snapshot()
                    .into_iter()
                    .map(|(id, c)| json!({"identity": id, "certificate": c}))
                    .collect();
                let dump = json!({
                    "config": &*cfg,
                    "state": &*state,
                    "certificates": certificates,
                    "hbone_pool": pool.stats(),
                    "capture_attached": *attached.lock().unwrap_or_else(|p| p.into_inner()),
                });
                Reply::json(serde_json::to_string_pretty(&dump).unwrap_or_default())
            }
            _ => Reply::text(404, "not found\n"),
        }));
    }

    let state = state_rx.borrow_and_update().clone();
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
            capture_mark: c.capture_mark,
            daemon_mark: mark,
            route_table: c.route_table,
            uplinks: c.uplinks.clone(),
        })?),
        None => None,
    };
    sync_capture(&cfg, capture.as_mut(), &state, &attached, true);
    readiness.set_ready();
    tracing::info!(node = %cfg.node_name, generation = state.generation, "ready");
    release_startup_heap();

    tokio::spawn(source.run(cfg.state_poll_interval, state_tx));
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    // Re-sync capture now and then: a pod's veth may appear after its object does.
    let mut resync = tokio::time::interval(CAPTURE_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = resync.tick() => {
                let state = state_rx.borrow().clone();
                sync_capture(&cfg, capture.as_mut(), &state, &attached, false);
            }
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let state = state_rx.borrow_and_update().clone();
                update_certificates(&cfg, &certs, &state);
                sync_capture(&cfg, capture.as_mut(), &state, &attached, true);
            }
            _ = term.recv() => { tracing::info!("SIGTERM received; shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT received; shutting down"); break; }
        }
    }
    if let Some(c) = capture {
        c.shutdown()?;
    }
    tracing::info!("capture removed; exiting");
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
    attached: &Mutex<Vec<String>>,
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
    let mut last = attached.lock().unwrap_or_else(|p| p.into_inner());
    let enrolled = pods.iter().filter(|p| p.enrolled).count();
    if state_changed || *last != now {
        tracing::info!(
            generation = state.generation,
            enrolled,
            interfaces = now.len(),
            "capture updated"
        );
    }
    *last = now;
}

/// Hands the heap that start-up left free (parsed YAML, CA and certificate work, eBPF object
/// loading) back to the kernel, so the idle daemon's resident size is what it keeps, not what
/// it once needed. glibc keeps freed memory otherwise.
fn release_startup_heap() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it is
    // thread-safe and takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
