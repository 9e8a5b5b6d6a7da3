//! The admin routes: `/config_dump` (the JSON that `ztunnel status`, `workloads` and
//! `certificates` read, see [`crate::status`]), `/logging` (read, or with `POST ?level=`
//! change, the log filter) and `POST /quitquitquit` (start the drain, as SIGTERM does).
//!
//! Served twice: on the TCP admin port (15000, loopback), which every process of the node's
//! network namespace reaches and which therefore only reads (a change answers 403 naming the
//! socket), and on the admin socket, which only the daemon's user may open, with every route.
//! Nothing here shows a secret: certificates appear as identity, serial and validity, never a
//! key, and the configuration holds paths, not contents.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;

use hyper::Method;

use super::{read_only, CaptureView, Readiness, Reply, Request};
use crate::config::Config;
use crate::dns::DnsStats;
use crate::drain::Drain;
use crate::hbone::client::Pool;
use crate::identity::CertManager;
use crate::source::SourceHealth;
use crate::state::State;
use crate::telemetry;

/// What the admin routes read (and, for `/quitquitquit`, start).
#[derive(Debug)]
pub struct AdminRoutes {
    /// The configuration in force, dumped as is.
    pub cfg: Arc<Config>,
    /// The latest state.
    pub state: watch::Receiver<Arc<State>>,
    /// Managed certificates.
    pub certs: Arc<CertManager>,
    /// HBONE pool statistics.
    pub pool: Pool,
    /// Capture as last synced.
    pub capture: Arc<CaptureView>,
    /// Whether the daemon is ready.
    pub readiness: Arc<Readiness>,
    /// Draining flag and open flows; `/quitquitquit` starts the drain.
    pub drain: Drain,
    /// DNS proxy counters.
    pub dns: Arc<DnsStats>,
    /// How current the state source's view is.
    pub source: Arc<SourceHealth>,
}

impl AdminRoutes {
    /// Answers a request that came in `via` the port or the socket.
    pub fn route(&self, req: &Request<'_>, via: Via) -> Reply {
        let level = level(req.query);
        match (req.path, via) {
            ("/config_dump", _) => read_only(req, || {
                Reply::json(serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default())
            }),
            ("/logging", _) if req.is_read() && level.is_none() => Reply::text(
                200,
                format!(
                    "level: {}\n",
                    telemetry::current_log_level().unwrap_or_default()
                ),
            ),
            ("/logging" | "/quitquitquit", Via::Port) => {
                tracing::debug!(path = req.path, method = %req.method, "admin: change refused on the TCP port");
                self.use_the_socket()
            }
            ("/logging", Via::Socket) => match (req.method, level) {
                (&Method::POST, Some(level)) => set_level(&level),
                (&Method::POST, None) => Reply::text(400, "missing ?level=<filter>\n"),
                _ => Reply {
                    allow: Some("GET, HEAD, POST"),
                    ..Reply::text(405, "changing the log level takes POST\n")
                },
            },
            ("/quitquitquit", Via::Socket) => match *req.method {
                Method::POST => {
                    self.drain.start();
                    Reply::text(200, "draining\n")
                }
                _ => Reply::method_not_allowed("POST"),
            },
            _ => Reply::not_found(),
        }
    }

    /// 403 for a change asked on the TCP port, saying where it is served.
    fn use_the_socket(&self) -> Reply {
        let socket = self.cfg.admin_socket.display();
        Reply::text(
            403,
            format!(
                "this port only reads: changing the log level and /quitquitquit are served with \
                 POST on the admin socket {socket}, which only the daemon's user can open, e.g. \
                 curl --unix-socket {socket} -X POST 'http://localhost/logging?level=debug'\n"
            ),
        )
    }

    fn config_dump(&self) -> serde_json::Value {
        let state = self.state.borrow().clone();
        let view = self.capture.snapshot();
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
                let state = view.pod(w.ip);
                json!({
                    "pod": w.key(),
                    "ip": w.ip,
                    "ips": w.ips,
                    "workload": w.workload_name,
                    "identity": w.identity,
                    "enrolled": w.enrolled,
                    "captured": state.is_some_and(|p| p.captured),
                    "capture_problem": state.and_then(|p| p.problem.clone()),
                })
            })
            .collect();
        let mut workloads: Vec<_> = state.pods().collect();
        workloads.sort_by_key(|w| w.key());
        json!({
            "node": self.cfg.node_name,
            "ready": self.readiness.is_ready(),
            "not_ready_reason": self.readiness.not_ready_reason(),
            "draining": self.drain.is_draining(),
            "active_flows": self.drain.active(),
            "config": &*self.cfg,
            "generation": state.generation,
            "workloads": workloads,
            "services": state.services,
            "policy_problems": state.authz.problems,
            "enrolled_pods": enrolled_pods,
            "certificates": certificates,
            "ca": self.certs.health().snapshot(),
            "hbone_pool": self.pool.stats(),
            // `enrolled`: every address in the enrolled map, pods the CNI plugin announced
            // before the state shows them included.
            "capture": {
                "attached_interfaces": view.interfaces,
                "uplinks": view.uplinks,
                "enrolled": view.enrolled,
                "pods_captured": view.pods.iter().filter(|p| p.captured).count(),
                "pods_not_captured": view.pods.iter().filter(|p| !p.captured).count(),
            },
            "dns": self.dns.snapshot(),
            "source": self.source.snapshot(),
        })
    }
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The TCP admin port: reads only.
    Port,
    /// The admin socket: every route.
    Socket,
}

/// The `level` of a query, decoded (log filters contain `=` and `,`, sent `%`-encoded).
fn level(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("level="))
        .map(decode)
}

/// `POST /logging?level=`: a new log filter.
fn set_level(level: &str) -> Reply {
    match telemetry::set_log_level(level) {
        Ok(now) => {
            tracing::info!(level = %now, "log level changed");
            Reply::text(200, format!("level: {now}\n"))
        }
        Err(e) => Reply::text(400, format!("{e}\n")),
    }
}

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Decodes a query value: `+` is a space, `%XX` a byte; a `%` not followed by two hex digits
/// stays as it is.
fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
