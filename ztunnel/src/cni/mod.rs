//! The CNI endpoint: pods announced by the chained CNI plugin (`ztunnel-cni`) are captured
//! before their first packet, instead of once the state source shows them.
//!
//! The plugin runs while the runtime sets the pod's network up and connects to a unix socket
//! only root may open (`--cni-socket`, [`server`]). Each request reaches the main task (which
//! owns capture) as an [`Announcement`]; [`answer`] decides and acts there:
//!
//! - **enrollment** comes from the pod's namespace in the current state (labelled
//!   `istio.io/dataplane-mode=ambient`); a namespace the state does not know yet fails the ADD
//!   as "try again later" (the runtime retries), since guessing "not enrolled" could let an
//!   enrolled pod start in clear. A pod's own opt-out label (`istio.io/dataplane-mode=none`)
//!   is not known at ADD (the runtime passes only namespace and name): such a pod is captured
//!   from ADD until its object arrives, then released (it errs towards capture, never clear);
//! - **capture** is installed at once: the pod joins the pods the capture sync sees
//!   ([`Pending::merge`]), so its address enters the enrolled map with its interface's index
//!   and the program is attached to its veth, and the plugin gets its answer only after
//!   [`Capture`] shows both;
//! - **reconciliation**: once the state shows a pod of this node with the same name and
//!   address, the announcement is dropped and the state's entry carries on (same map entry, so
//!   no gap and no duplicate); an announcement the state never confirms within
//!   `--cni-pending-timeout` (default 2 minutes) is dropped and its capture removed, logged as
//!   a warning; DEL drops it at once.
//!
//! Until the pod is in the state its identity (service account) is unknown, so the daemon
//! cannot present a certificate for it: its outbound connections are held by the proxy until
//! the state names the pod (then they go out over HBONE with its identity) and reset if it
//! does not in time; connections to it are refused, since the daemon cannot prove who it is.
//! Nothing of the pod goes out in clear either way.
//!
//! [`install`] puts the plugin on the node (`--cni-install`, `ztunnel cni install`): the binary
//! into the CNI binary directory and its entry into the chain of the node's configuration
//! ([`conflist`]), kept there when the primary CNI rewrites the file.

pub mod conflist;
pub mod install;
pub mod server;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use ztunnel_cni::{Action, Reply, Request};

use crate::capture::{interface_index, Capture, LocalPod};
use crate::state::State;

/// One plugin request, waiting for the main task's answer.
#[derive(Debug)]
pub struct Announcement {
    /// What the plugin asked.
    pub request: Request,
    /// Where the answer goes (the connection's task writes it to the plugin).
    pub reply: oneshot::Sender<Reply>,
}

/// Plugin requests answered: `ztunnel_cni_requests_total{action, result}` (`result`:
/// `captured`, `not_captured`, `removed`, `failed`), so an operator sees ADDs failing (and
/// pods not starting) on a node.
#[derive(Debug, Clone, Default)]
pub struct CniStats {
    requests: Family<CniLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    action: &'static str,
    result: &'static str,
}

impl CniStats {
    /// Adds the counter to the daemon's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztunnel_cni_requests",
            "Requests of the chained CNI plugin answered, by action (add, del, check) and result \
             (captured, not_captured, removed, failed: the pod's ADD fails)",
            self.requests.clone(),
        );
    }

    /// Requests of `action` answered with `result` so far.
    pub fn count(&self, action: Action, result: &'static str) -> u64 {
        self.counter(action, result).get()
    }

    fn counter(&self, action: Action, result: &'static str) -> Counter {
        self.requests
            .get_or_create(&CniLabels {
                action: action_name(action),
                result,
            })
            .clone()
    }

    fn counted(&self, action: Action, reply: Reply) -> Reply {
        let result = match &reply {
            Reply::Captured { .. } => "captured",
            Reply::NotCaptured { .. } => "not_captured",
            Reply::Removed => "removed",
            Reply::Failed { .. } => "failed",
        };
        self.counter(action, result).inc();
        reply
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Add => "add",
        Action::Del => "del",
        Action::Check => "check",
    }
}

/// A pod announced at ADD and not yet confirmed by the state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Announced {
    /// The pod as capture takes it (`name` is `namespace/name`): its addresses from
    /// `prevResult`, one per family, enrolled.
    pod: LocalPod,
    container_id: String,
    since: Instant,
}

/// Pods announced by the plugin that the state does not show yet, by address (the one their
/// interface is found from: IPv4 if they have one, else IPv6).
#[derive(Debug)]
pub struct Pending {
    pods: BTreeMap<IpAddr, Announced>,
    timeout: Duration,
}

impl Pending {
    /// No pod announced; announcements expire after `timeout` without the state confirming.
    pub fn new(timeout: Duration) -> Pending {
        Pending {
            pods: BTreeMap::new(),
            timeout,
        }
    }

    /// Pods announced and not yet in the state.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether no announcement is pending.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Adds the announced pods to `pods` (every pod of this node in the state), after dropping
    /// the announcements the state now confirms (a pod of `pods` with the same name and
    /// address: it carries on from the state) and those older than the timeout. An announced
    /// address also held by another pod of the state replaces that pod: the plugin has just
    /// been told the address belongs to the new pod.
    pub fn merge(&mut self, pods: &mut Vec<LocalPod>, now: Instant) {
        let timeout = self.timeout;
        self.pods.retain(|ip, a| {
            let key = &a.pod.name;
            if pods.iter().any(|p| p.primary() == Some(*ip) && p.name == *key) {
                tracing::info!(pod = %key, pod_ip = %ip, waited = ?now.saturating_duration_since(a.since), "cni: announced pod is in the state; capture carries on from it");
                return false;
            }
            if now.saturating_duration_since(a.since) > timeout {
                tracing::warn!(pod = %key, pod_ip = %ip, container = %a.container_id, ?timeout, "cni: announced pod never appeared in the state; its capture is removed (--cni-pending-timeout)");
                return false;
            }
            true
        });
        for (ip, a) in &self.pods {
            pods.retain(|p| p.primary() != Some(*ip));
            pods.push(a.pod.clone());
        }
    }

    /// Forgets what the ADD of the same sandbox announced. By sandbox only: when a pod's
    /// sandbox is replaced, the runtime may DEL the old one after the new one's ADD, and the
    /// pod's name is the same in both. (A DEL without a sandbox id goes by the pod's name.)
    fn remove(&mut self, req: &Request) -> usize {
        let key = pod_key(req);
        let before = self.pods.len();
        self.pods.retain(|_, a| {
            if req.container_id.is_empty() {
                a.pod.name != key
            } else {
                a.container_id != req.container_id
            }
        });
        before - self.pods.len()
    }
}

fn pod_key(req: &Request) -> String {
    format!("{}/{}", req.namespace, req.name)
}

/// Answers one plugin request on the main task (and counts it in `stats`). `sync` brings
/// capture in line with the state and `pending` (the daemon's capture sync); it runs before an
/// ADD or DEL is answered, so an ADD answered `Captured` has its capture in place.
pub fn answer(
    req: &Request,
    state: &State,
    node: &str,
    pending: &mut Pending,
    capture: Option<&mut Capture>,
    sync: impl Fn(&mut Capture, &mut Pending),
    stats: &CniStats,
) -> Reply {
    stats.counted(
        req.action,
        decide_and_act(req, state, node, pending, capture, sync),
    )
}

fn decide_and_act(
    req: &Request,
    state: &State,
    node: &str,
    pending: &mut Pending,
    capture: Option<&mut Capture>,
    sync: impl Fn(&mut Capture, &mut Pending),
) -> Reply {
    let key = pod_key(req);
    if req.action == Action::Del {
        let removed = pending.remove(req);
        if let (Some(c), true) = (capture, removed > 0) {
            sync(c, pending);
        }
        tracing::info!(pod = %key, container = %req.container_id, removed, "cni: DEL");
        return Reply::Removed;
    }
    let decided = decide(req, state, node);
    let pod = match decided {
        Ok(pod) => pod,
        Err(reply) => {
            tracing::info!(pod = %key, action = ?req.action, reply = ?reply, "cni: pod not captured");
            return reply;
        }
    };
    let Some(capture) = capture else {
        return Reply::NotCaptured {
            reason: "capture is off on this node (--capture=false)".into(),
        };
    };
    let Some(ip) = pod.primary() else {
        return Reply::Failed {
            message: format!("prevResult gives pod {key} no address"),
            retry: false,
        };
    };
    if req.action == Action::Add {
        pending.pods.insert(
            ip,
            Announced {
                pod,
                container_id: req.container_id.clone(),
                since: Instant::now(),
            },
        );
        sync(capture, pending);
    }
    let reply = verify(capture, ip, req.host_interface.as_deref());
    match &reply {
        Reply::Captured { interface, ifindex } => {
            tracing::info!(pod = %key, pod_ip = %ip, interface, ifindex, action = ?req.action, "cni: pod captured");
        }
        _ => {
            tracing::warn!(pod = %key, pod_ip = %ip, action = ?req.action, reply = ?reply, "cni: pod not captured");
            if req.action == Action::Add && pending.pods.remove(&ip).is_some() {
                sync(capture, pending);
            }
        }
    }
    reply
}

/// Whether the pod must be captured: the pod as capture takes it (its addresses from
/// `prevResult`, IPv4, IPv6 or both), or the answer to give at once.
fn decide(req: &Request, state: &State, node: &str) -> Result<LocalPod, Reply> {
    let key = pod_key(req);
    match state.namespace_enrolled(&req.namespace) {
        None => {
            return Err(Reply::Failed {
                message: format!(
                    "namespace {} is not in this daemon's state yet, so whether it is \
                     enrolled is unknown",
                    req.namespace
                ),
                retry: true,
            })
        }
        Some(false) => {
            return Err(Reply::NotCaptured {
                reason: format!(
                    "namespace {} is not enrolled (istio.io/dataplane-mode=ambient)",
                    req.namespace
                ),
            })
        }
        Some(true) => {}
    }
    // The state may know the pod already (opted out, or a waypoint's pod): it decides then.
    let known = state
        .local_workloads(node)
        .find(|w| w.key() == key && req.ips.contains(&w.ip));
    if let Some(w) = known.filter(|w| !w.enrolled) {
        return Err(Reply::NotCaptured {
            reason: format!("pod {} is not enrolled in the state (opted out)", w.key()),
        });
    }
    LocalPod::new(key.clone(), &req.ips, true, true).ok_or_else(|| Reply::Failed {
        message: format!(
            "prevResult gives pod {key} no address (no `ips`); capture needs one to find the \
             pod's interface"
        ),
        retry: false,
    })
}

/// `Captured` when `ip` (either family) is in the enrolled map with its interface's index and
/// the program is attached to that interface (the one the plugin named, when it named one).
fn verify(capture: &Capture, ip: IpAddr, named: Option<&str>) -> Reply {
    let failed = |message: String| Reply::Failed {
        message,
        retry: false,
    };
    let index = match capture.enrolled_ifindex(ip) {
        None => return failed(format!("{ip} is not in the enrolled map")),
        Some(0) => {
            return failed(format!(
                "no node-side interface found for {ip} (no direct route to it through a \
                 pod interface)"
            ))
        }
        Some(i) => i,
    };
    let Some(interface) = capture.attached_interface(index) else {
        return failed(format!(
            "capture program not attached to interface index {index}"
        ));
    };
    if let Some(named) = named {
        match interface_index(named) {
            Ok(i) if i == index => {}
            Ok(i) => {
                return failed(format!(
                    "the route to {ip} leads to {interface} (index {index}), but the plugin \
                     reported {named} (index {i})"
                ))
            }
            Err(e) => return failed(e.to_string()),
        }
    }
    Reply::Captured {
        interface: interface.to_string(),
        ifindex: index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: [u8; 4], enrolled: bool) -> LocalPod {
        LocalPod {
            name: name.into(),
            ipv4: Some(ip.into()),
            ipv6: None,
            enrolled,
            dns_capture: true,
        }
    }

    fn announce(p: &mut Pending, key: &str, ip: [u8; 4], since: Instant) {
        p.pods.insert(
            IpAddr::from(ip),
            Announced {
                pod: pod(key, ip, true),
                container_id: format!("c-{key}"),
                since,
            },
        );
    }

    #[test]
    fn announced_pods_join_until_the_state_confirms_or_they_expire() {
        let t0 = Instant::now();
        let mut p = Pending::new(Duration::from_secs(60));
        announce(&mut p, "mesh/new", [10, 244, 1, 224], t0);
        announce(&mut p, "mesh/old", [10, 244, 1, 225], t0);
        // Not in the state: added, enrolled; another pod holding the address is replaced.
        let mut pods = vec![
            pod("mesh/a", [10, 244, 1, 11], true),
            pod("mesh/gone", [10, 244, 1, 225], false),
        ];
        p.merge(&mut pods, t0);
        let names: Vec<_> = pods.iter().map(|x| (x.name.as_str(), x.enrolled)).collect();
        assert_eq!(
            names,
            [("mesh/a", true), ("mesh/new", true), ("mesh/old", true)]
        );
        // The state shows mesh/new (here opted out: the state decides); mesh/old expires.
        let mut pods = vec![pod("mesh/new", [10, 244, 1, 224], false)];
        p.merge(&mut pods, t0 + Duration::from_secs(61));
        assert!(p.is_empty());
        assert_eq!(pods, [pod("mesh/new", [10, 244, 1, 224], false)]);
    }

    #[test]
    fn del_forgets_by_sandbox() {
        let mut p = Pending::new(Duration::from_secs(60));
        announce(&mut p, "mesh/a", [10, 244, 1, 224], Instant::now());
        let req = |c: &str, name: &str| Request {
            action: Action::Del,
            container_id: c.into(),
            namespace: "mesh".into(),
            name: name.into(),
            ips: vec![],
            host_interface: None,
            netns: None,
        };
        // An old sandbox of the same pod does not take the new one's announcement.
        assert_eq!(p.remove(&req("old-sandbox", "a")), 0);
        assert_eq!(p.remove(&req("c-mesh/a", "a")), 1);
        announce(&mut p, "mesh/a", [10, 244, 1, 224], Instant::now());
        assert_eq!(p.remove(&req("", "a")), 1);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn answers_are_counted() {
        let stats = CniStats::default();
        let mut p = Pending::new(Duration::from_secs(60));
        let state = State::default();
        let mut req = Request {
            action: Action::Del,
            container_id: "c".into(),
            namespace: "mesh".into(),
            name: "p".into(),
            ips: vec![],
            host_interface: None,
            netns: None,
        };
        let no_sync = |_: &mut Capture, _: &mut Pending| {};
        assert_eq!(
            answer(&req, &state, "node1", &mut p, None, no_sync, &stats),
            Reply::Removed
        );
        req.action = Action::Add;
        let reply = answer(&req, &state, "node1", &mut p, None, no_sync, &stats);
        assert!(
            matches!(reply, Reply::Failed { retry: true, .. }),
            "{reply:?}"
        );
        assert_eq!(stats.count(Action::Del, "removed"), 1);
        assert_eq!(stats.count(Action::Add, "failed"), 1);
    }

    #[test]
    fn enrollment_follows_the_namespace_in_the_state() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n";
        let objects = crate::k8s::parse_file(std::path::Path::new("t.yaml"), yaml).expect("parses");
        let state = State::build(1, "cluster.local", &objects);
        let req = |ns: &str, ips: &[&str]| Request {
            action: Action::Add,
            container_id: "c".into(),
            namespace: ns.into(),
            name: "p".into(),
            ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            host_interface: None,
            netns: None,
        };
        let decided = |ns, ips| decide(&req(ns, ips), &state, "node1").map(|p| p.addresses());
        assert_eq!(
            decided("mesh", &["fd00::1", "10.244.1.224"]),
            Ok(vec![
                "10.244.1.224".parse().expect("ip"),
                "fd00::1".parse().expect("ip")
            ])
        );
        assert_eq!(
            decided("mesh", &["fd00::1"]),
            Ok(vec!["fd00::1".parse().expect("ip")]),
            "an IPv6-only pod is captured too"
        );
        assert!(matches!(
            decide(&req("plain", &["10.244.1.224"]), &state, "node1"),
            Err(Reply::NotCaptured { .. })
        ));
        assert!(matches!(
            decide(&req("unknown", &["10.244.1.224"]), &state, "node1"),
            Err(Reply::Failed { retry: true, .. })
        ));
        assert!(matches!(
            decide(&req("mesh", &[]), &state, "node1"),
            Err(Reply::Failed { retry: false, .. })
        ));
    }
}
