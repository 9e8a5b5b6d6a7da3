//! Per-pod capture state (what status, metrics and readiness show) and the node interfaces
//! capture attaches to: uplinks (configured, or discovered from the routing table on every
//! sync) and `lo`.

use std::net::IpAddr;

use tracing::info;

use super::routes::RouteTable;
use super::{Capture, CaptureError, LocalPod, LOOPBACK};

/// One enrolled pod's capture as of the last sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCapture {
    /// `ns/name`.
    pub name: String,
    /// The pod's addresses, IPv4 first (one per family it has).
    pub ips: Vec<IpAddr>,
    /// Whether its traffic is captured: in the enrolled map with its interface, and the
    /// programs attached to that interface. A pod that is not is fail-closed (its packets are
    /// dropped as spoofed) but not served; the daemon is not ready meanwhile.
    pub captured: bool,
    /// Why not (the last sync's error), when not captured.
    pub problem: Option<String>,
}

impl Capture {
    /// Node interfaces that get `zt_capture` at ingress: the uplinks in force, and `lo` (the
    /// node-local path) unless node traffic is exempt.
    pub(super) fn node_ifaces(&self) -> Vec<String> {
        let mut out = self.uplink_names.clone();
        if !self.settings.exempt_node_traffic {
            out.push(LOOPBACK.to_string());
        }
        out
    }

    /// Whether `iface` is one of [`Capture::node_ifaces`].
    pub(super) fn is_node_iface(&self, iface: &str) -> bool {
        self.uplink_names.iter().any(|u| u == iface)
            || (!self.settings.exempt_node_traffic && iface == LOOPBACK)
    }

    /// Re-reads the uplinks from `table` (no `--uplink` given): attaches new ones, detaches
    /// those that no longer carry routes, and re-attaches one whose device was re-created.
    pub(super) fn rediscover_uplinks(
        &mut self,
        table: &RouteTable,
        pods: &[LocalPod],
        problems: &mut Vec<(String, CaptureError)>,
    ) {
        let local: Vec<IpAddr> = pods.iter().flat_map(LocalPod::addresses).collect();
        let found = table.uplinks(&local);
        if found != self.uplink_names {
            info!(uplinks = ?found, previous = ?self.uplink_names, "uplinks discovered from the routing table");
            let gone: Vec<String> = self
                .uplink_names
                .iter()
                .filter(|u| !found.contains(u))
                .cloned()
                .collect();
            self.uplink_names = found;
            for iface in gone {
                if let Some(att) = self.uplinks.remove(&iface) {
                    if let Err(e) = self.detach_link(&iface, att) {
                        problems.push((format!("uplink {iface}"), e));
                    }
                }
            }
        }
        for iface in self.node_ifaces() {
            if let Err(e) = self.ensure_attached(&iface, true) {
                problems.push((format!("uplink {iface}"), e));
            }
        }
    }

    /// Each enrolled pod's state after a sync that reported `problems`.
    pub(super) fn pod_states(
        &self,
        pods: &[LocalPod],
        problems: &[(String, CaptureError)],
    ) -> Vec<PodCapture> {
        let mut out: Vec<PodCapture> = pods
            .iter()
            .filter(|p| p.enrolled)
            .map(|pod| {
                let reported = problems
                    .iter()
                    .find(|(name, _)| *name == pod.name || name == "*")
                    .map(|(_, e)| e.to_string());
                let problem = reported.or_else(|| self.incomplete(pod));
                PodCapture {
                    name: pod.name.clone(),
                    ips: pod.addresses(),
                    captured: problem.is_none(),
                    problem,
                }
            })
            .collect();
        out.sort_by(|a, b| a.ips.cmp(&b.ips));
        out
    }

    /// What is missing of an enrolled pod's capture, if anything: each of its addresses must
    /// be in its family's enrolled map with the same known interface, and the programs on it.
    fn incomplete(&self, pod: &LocalPod) -> Option<String> {
        let mut index = None;
        for ip in pod.addresses() {
            let Some([_, idx]) = self.written(ip) else {
                return Some(format!("{ip} is not in the enrolled-pod map"));
            };
            if idx == 0 {
                return Some("its node-side interface is not known".to_string());
            }
            match index {
                Some(i) if i != idx => {
                    return Some(format!(
                        "its addresses are bound to different interfaces (indexes {i} and {idx})"
                    ))
                }
                _ => index = Some(idx),
            }
        }
        let idx = index?;
        let on = |t: &std::collections::BTreeMap<String, super::Attachment>| {
            t.values().any(|a| a.ifindex == idx)
        };
        if !on(&self.pod_ifaces) {
            return Some(format!("no capture program on interface index {idx}"));
        }
        if !self.settings.exempt_node_traffic && !on(&self.pod_egress) {
            return Some(format!(
                "no node-local redirect program on interface index {idx}"
            ));
        }
        None
    }
}
