//! Admin (15000, loopback only): `/config_dump` (the JSON that `ztunnel status`, `workloads`
//! and `certificates` read, see [`crate::status`]), `/logging` (read or change the log
//! filter) and `/quitquitquit` (start the drain, as SIGTERM does).

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;

use super::{CaptureView, Readiness, Reply};
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
    /// Answers `target` (path and query).
    pub fn route(&self, target: &str) -> Reply {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        match path {
            "/config_dump" => {
                Reply::json(serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default())
            }
            "/logging" => logging(query),
            "/quitquitquit" => {
                self.drain.start();
                Reply::text(200, "draining\n")
            }
            _ => Reply::text(404, "not found\n"),
        }
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
            "source": self.source.snapshot(),
        })
    }
}

/// `/logging`: the current filter, or with `?level=` a new one.
fn logging(query: &str) -> Reply {
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

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decode_as_before() {
        assert_eq!(
            percent_decode("info%2Cztunnel%3Ddebug"),
            "info,ztunnel=debug"
        );
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        // A `%` without two bytes after it stays as is.
        assert_eq!(percent_decode("x%4"), "x%4");
        assert_eq!(percent_decode("x%41"), "xA");
    }
}
