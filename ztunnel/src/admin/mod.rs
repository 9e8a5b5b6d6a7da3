//! The admin (15000, loopback), metrics (15020) and readiness (15021) ports, and the admin
//! socket.
//!
//! They serve probes, scrapers and operators, never the data path, on a thread of their own
//! ([`spawn`]): a slow scrape or a client holding connections never delays the accept loops
//! of the captured ports. The server is hyper with bounds on what one client may hold
//! ([`http`]). The routes of each port live in their own module: [`routes`] (admin:
//! `/config_dump`, `/logging`, `/quitquitquit`), [`metrics`] (`/metrics`,
//! `/stats/prometheus`) and [`readiness`] (`/healthz/ready`).
//!
//! The TCP admin port only reads. What changes the daemon (`POST /logging?level=`,
//! `POST /quitquitquit`) is served on the admin socket ([`socket`], a unix socket of mode
//! 0600): any process in the node's network namespace reaches the port, only the daemon's user
//! the socket.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub mod http;
pub mod metrics;
pub mod readiness;
pub mod routes;
pub mod socket;

pub use http::{Limits, Request};

pub use readiness::Readiness;

/// What the admin API and metrics show of capture; written by the main task after each sync.
#[derive(Debug, Default)]
pub struct CaptureView(Mutex<CaptureSnapshot>);

/// Capture as last synced.
#[derive(Debug, Default, Clone)]
pub struct CaptureSnapshot {
    /// Interfaces with programs attached.
    pub interfaces: Vec<String>,
    /// Pod addresses in the enrolled maps (IPv4, then IPv6).
    pub enrolled: Vec<IpAddr>,
    /// Pods with an address in the enrolled maps (a dual-stack pod counts once).
    pub enrolled_pods: usize,
    /// The programs' drop counters.
    pub drops: crate::capture::DropCounts,
    /// The uplinks in force (configured or discovered).
    pub uplinks: Vec<String>,
    /// Every enrolled pod's capture state.
    pub pods: Vec<crate::capture::PodCapture>,
}

impl CaptureSnapshot {
    /// The state of the enrolled pod with address `ip` (either family), if capture knows it.
    pub fn pod(&self, ip: IpAddr) -> Option<&crate::capture::PodCapture> {
        self.pods.iter().find(|p| p.ips.contains(&ip))
    }
}

impl CaptureView {
    /// A copy of the last recorded sync.
    pub fn snapshot(&self) -> CaptureSnapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a sync; returns whether the attached interfaces differ from the last one.
    pub fn update(&self, snapshot: CaptureSnapshot) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.interfaces != snapshot.interfaces;
        *last = snapshot;
        changed
    }
}

/// A response: status, content type, body, and for 405 the methods allowed.
#[derive(Debug)]
pub struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: Option<&'static str>,
}

impl Reply {
    /// A JSON 200.
    pub fn json(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body,
            allow: None,
        }
    }
    /// A reply with any content type.
    pub fn new(status: u16, content_type: &'static str, body: String) -> Reply {
        Reply {
            status,
            content_type,
            body,
            allow: None,
        }
    }
    /// A plain-text reply.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: None,
        }
    }
    /// 404.
    pub fn not_found() -> Reply {
        Reply::text(404, "not found\n")
    }
    /// 405 with the methods the path takes (`Allow`).
    pub fn method_not_allowed(allow: &'static str) -> Reply {
        Reply {
            allow: Some(allow),
            ..Reply::text(
                405,
                format!("method not allowed; this path takes {allow}\n"),
            )
        }
    }
    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }
    /// The body.
    pub fn body(&self) -> &str {
        &self.body
    }
}

/// A read-only route: `reply()` for `GET` and `HEAD`, 405 for any other method.
pub fn read_only(req: &Request<'_>, reply: impl FnOnce() -> Reply) -> Reply {
    if req.is_read() {
        reply()
    } else {
        Reply::method_not_allowed("GET, HEAD")
    }
}

/// The listeners of the admin thread, bound by start-up (before capture attaches).
#[derive(Debug)]
pub struct Listeners {
    /// Admin API, read-only (15000, loopback).
    pub admin: std::net::TcpListener,
    /// The admin socket (every admin route, the changing ones included).
    pub socket: std::os::unix::net::UnixListener,
    /// Prometheus metrics (15020).
    pub metrics: std::net::TcpListener,
    /// Readiness (15021).
    pub readiness: std::net::TcpListener,
}

/// What the ports answer from.
#[derive(Debug)]
pub struct Routes {
    /// The admin routes, on the port and the socket.
    pub admin: routes::AdminRoutes,
    /// The metrics routes.
    pub metrics: metrics::MetricsRoutes,
    /// Readiness.
    pub readiness: Arc<Readiness>,
}

/// Starts the thread `ztunnel-admin`, a single-threaded runtime of its own, serving `routes` on
/// `listeners` within `limits` while `serving` is open (a daemon taking over from another
/// accepts once ready, one handing over stops; [`crate::handover`]). Its own thread, so that
/// nothing the ports' clients do (many connections, slow reads, a large scrape) takes time
/// from the control runtime, where the accept loops of the captured ports run.
pub fn spawn(
    listeners: Listeners,
    routes: Routes,
    limits: Limits,
    serving: crate::handover::Serving,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered with this runtime's reactor, which the new thread drives.
    let (admin, socket, metrics, readiness) = {
        let _in = runtime.enter();
        (
            tokio::net::TcpListener::from_std(listeners.admin)?,
            tokio::net::UnixListener::from_std(listeners.socket)?,
            tokio::net::TcpListener::from_std(listeners.metrics)?,
            tokio::net::TcpListener::from_std(listeners.readiness)?,
        )
    };
    let admin_routes = Arc::new(routes.admin);
    let on_socket = admin_routes.clone();
    let (metrics_routes, ready) = (routes.metrics, routes.readiness);
    let s = serving;
    let serve = async move {
        tokio::join!(
            s.clone()
                .run(http::serve(readiness, "readiness", limits, move |req| {
                    readiness::route(&ready, req)
                })),
            s.clone()
                .run(http::serve(metrics, "metrics", limits, move |req| {
                    metrics_routes.route(req)
                })),
            s.clone()
                .run(http::serve(admin, "admin", limits, move |req| {
                    admin_routes.route(req, routes::Via::Port)
                })),
            s.run(http::serve(socket, "admin-socket", limits, move |req| {
                on_socket.route(req, routes::Via::Socket)
            })),
        );
    };
    std::thread::Builder::new()
        .name("ztunnel-admin".into())
        .spawn(move || runtime.block_on(serve))?;
    Ok(())
}
