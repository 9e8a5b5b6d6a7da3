//! The one registry of workloads and services the data path reads.
//!
//! A [`State`] is an immutable snapshot built from Kubernetes objects; the source publishes a
//! new snapshot on every accepted change (through a `tokio::sync::watch` channel), so a flow
//! always sees one consistent view and readers never take a lock on the hot path.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::identity::SpiffeId;
use crate::k8s::gateway::HttpRoute;
use crate::k8s::security::AuthorizationPolicyObject;
use crate::k8s::{Labels, Object, ObjectMeta, SharedStr};

#[cfg(test)]
mod attach_tests;
mod model;
mod waypoint;

pub use model::Model;
pub use waypoint::{
    TrafficKind, UseWaypoint, Waypoint, WaypointRef, DEFAULT_WAYPOINT_PORT, GATEWAY_MANAGED_LABEL,
    GATEWAY_NAME_LABEL, MESH_CONTROLLER, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL,
};

/// Namespace label that enrolls a namespace's pods, and pod label value that opts one out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Pod annotation: `"false"` keeps an enrolled pod's DNS out of the daemon's DNS proxy.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// A pod as the data plane sees it.
///
/// What many pods repeat (namespace, node, service account, identity, labels, workload name)
/// is shared between them (interned by the [`Model`]): with 10,000 pods this struct and its
/// allocations are most of the daemon's memory.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: SharedStr,
    /// Service account (default `default`).
    pub service_account: SharedStr,
    /// Node the pod runs on.
    pub node: SharedStr,
    /// Primary pod IP (`status.podIP`).
    pub ip: IpAddr,
    /// Every pod IP, the primary first: a dual-stack pod has one IPv4 and one IPv6 address,
    /// and a flow to or from either is the pod's.
    pub ips: Box<[IpAddr]>,
    /// Pod labels.
    pub labels: Labels,
    /// In the mesh: namespace labelled ambient, pod not opted out, not host-network, not a
    /// waypoint's pod. Enrolled workloads are reached over HBONE and their outbound traffic is
    /// captured. A waypoint's pods speak HBONE themselves: capturing them would send their
    /// flows back into a daemon (and the flows addressed to their 15008 into the wrong one).
    pub enrolled: bool,
    /// The waypoint traffic addressed to this pod goes through, as its labels and its
    /// namespace's attach it (resolve it with [`State::workload_waypoint`]); `None` for a
    /// waypoint's own pods.
    pub waypoint: Option<WaypointRef>,
    /// Receives Service traffic: `Ready` and not terminating. An unready pod keeps its
    /// identity, capture and open flows; only new Service flows skip it.
    pub ready: bool,
    /// Named container ports, for services' named `targetPort`.
    pub named_ports: NamedPorts,
    /// SPIFFE identity (one per namespace and service account, shared by their pods).
    pub identity: Arc<SpiffeId>,
    /// Workload name as Istio's telemetry reports it (the Deployment of a ReplicaSet-owned
    /// pod, else the owner, else the `app.kubernetes.io/name`/`app` label, else the pod name).
    pub workload_name: SharedStr,
    /// Whether the pod's DNS goes to the DNS proxy when enrolled (annotation
    /// [`DNS_CAPTURE_ANNOTATION`] not `"false"`).
    pub dns_capture: bool,
    /// `spec.dnsPolicy` (`None` here means the Kubernetes default, `ClusterFirst`). Interned:
    /// the API server writes `ClusterFirst` into every pod that does not set it.
    pub dns_policy: Option<SharedStr>,
    /// `spec.dnsConfig.searches`.
    pub dns_searches: Box<[String]>,
}

/// A pod's named container ports, as a small slice (a map's smallest node is ~300 bytes).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct NamedPorts(Box<[(SharedStr, u16)]>);

impl NamedPorts {
    /// The port named `name`.
    pub fn get(&self, name: &str) -> Option<u16> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, p)| *p)
    }
}

impl FromIterator<(SharedStr, u16)> for NamedPorts {
    fn from_iter<I: IntoIterator<Item = (SharedStr, u16)>>(it: I) -> Self {
        NamedPorts(it.into_iter().collect())
    }
}

impl Workload {
    /// `namespace/name`, the form logs and tools use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Istio's canonical service of the pod (its first label of
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the workload
    /// name): the `*_app` metric labels and the `service.name` of the HBONE `baggage`.
    pub fn canonical_app(&self) -> &str {
        self.first_label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or(&self.workload_name)
    }

    /// Istio's canonical revision (`service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`).
    pub fn canonical_version(&self) -> &str {
        self.first_label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or("latest")
    }

    /// The pod's address in the family of `like` (IPv4 or IPv6), `None` when it has none: a
    /// flow keeps one family end to end, so a pod reached from an IPv6 address is dialled on
    /// its IPv6 address.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv6() == like.is_ipv6())
    }

    /// The address to dial the pod at for a flow to `like` (the original destination, whose
    /// family is the source pod's: the flow is dialled from the pod's address of that
    /// family). `State::resolve` picks only endpoints that have one; a pod without gets its
    /// primary address.
    pub fn dial_ip(&self, like: IpAddr) -> IpAddr {
        self.ip_like(like).unwrap_or(self.ip)
    }

    /// Whether `ip` is one of the pod's addresses.
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    fn first_label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.labels.get(k))
    }
}

/// How a service port maps onto its pods.
#[derive(Debug, Clone, Serialize)]
pub struct ServicePort {
    /// Port on the virtual IP.
    pub port: u16,
    /// Port on the pods: a number, or a container port name resolved per pod.
    pub target: TargetPort,
}

/// A service `targetPort`.
#[derive(Debug, Clone, Serialize)]
pub enum TargetPort {
    /// Same number on every pod.
    Number(u16),
    /// Container port name, looked up in each endpoint pod.
    Named(String),
}

/// A service with its endpoints resolved.
#[derive(Debug, Serialize)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Virtual IPs; empty for headless services.
    pub vips: Vec<IpAddr>,
    /// TCP ports.
    pub ports: Vec<ServicePort>,
    /// Ready, non-terminating pods selected by the service.
    pub endpoints: Vec<Arc<Workload>>,
    /// The waypoint traffic to the VIP goes through, as the Service's labels and its
    /// namespace's attach it (resolve it with [`State::service_waypoint`]).
    pub waypoint: Option<WaypointRef>,
    /// Round-robin cursor over endpoints.
    #[serde(skip)]
    next: AtomicUsize,
}

impl Service {
    /// `name.namespace.svc.<domain>` is built by DNS; this is `namespace/name` for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Picks the next endpoint (round robin) that serves `port`, and the pod port to dial.
    pub fn pick(&self, port: u16) -> Option<(Arc<Workload>, u16)> {
        self.pick_where(port, |_| true)
    }

    /// Like [`Service::pick`], among the endpoints with an address in the family of `vip` (the
    /// VIP dialled): a flow to an IPv6 VIP goes to a pod's IPv6 address.
    pub fn pick_like(&self, port: u16, vip: IpAddr) -> Option<(Arc<Workload>, u16)> {
        self.pick_where(port, |w| w.ip_like(vip).is_some())
    }

    fn pick_where(
        &self,
        port: u16,
        eligible: impl Fn(&Workload) -> bool,
    ) -> Option<(Arc<Workload>, u16)> {
        let sp = self.ports.iter().find(|p| p.port == port)?;
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let w = &self.endpoints[(start + i) % n];
            if !eligible(w) {
                return None;
            }
            let target = match &sp.target {
                TargetPort::Number(p) => *p,
                TargetPort::Named(name) => w.named_ports.get(name)?,
            };
            Some((w.clone(), target))
        })
    }
}

/// Where a destination address leads.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A pod, and the port to dial on it.
    Workload(Arc<Workload>, u16),
    /// Not known to the mesh: passed through unchanged.
    External(SocketAddr),
}

/// Why a destination could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// The VIP belongs to a service that has no ready endpoint for the port.
    #[error("service {service} has no ready endpoint for port {port}")]
    NoEndpoint {
        /// `namespace/name`.
        service: String,
        /// Service port asked for.
        port: u16,
    },
    /// The destination's waypoint has no ready pod. The flow fails rather than skip the
    /// waypoint: its policies must not be bypassed.
    #[error("waypoint {waypoint} of {target} has no ready pod")]
    NoWaypointPod {
        /// `namespace/name` of the waypoint.
        waypoint: String,
        /// The Service (`namespace/name`) or pod address it fronts.
        target: String,
    },
    /// The destination's waypoint has ready pods, but none with an address in the flow's
    /// family (an IPv6 flow, IPv4-only waypoint pods): a flow keeps its address family from
    /// the client to the endpoint, and the waypoint is never bypassed.
    #[error("waypoint {waypoint} of {target} has no ready pod with an {family} address")]
    NoWaypointPodInFamily {
        /// `namespace/name` of the waypoint.
        waypoint: String,
        /// The Service (`namespace/name`) or pod address it fronts.
        target: String,
        /// `IPv4` or `IPv6`: the flow's family.
        family: &'static str,
    },
}

/// An immutable snapshot of everything the daemon knows.
#[derive(Debug, Default, Serialize)]
pub struct State {
    /// Increases with every accepted change.
    pub generation: u64,
    /// Workloads by pod IP.
    pub workloads: HashMap<IpAddr, Arc<Workload>>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Services by virtual IP.
    #[serde(skip)]
    by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Waypoints (Gateways of class `istio-waypoint`) by `namespace/name`.
    pub waypoints: BTreeMap<String, Arc<Waypoint>>,
    /// Valid AuthorizationPolicies and PeerAuthentications.
    pub authz: Arc<crate::authz::Registry>,
    /// Every AuthorizationPolicy as received, by `(namespace, name)`: the waypoint compiles
    /// the ones attached by `targetRefs` (L7) from the same delivery as the endpoints. The
    /// same `Arc` as the previous snapshot's while no policy changed.
    #[serde(skip)]
    pub authz_policies: Arc<BTreeMap<(String, String), Arc<AuthorizationPolicyObject>>>,
    /// Every Gateway API HTTPRoute as received, by `(namespace, name)`, for the waypoint's
    /// routing; the same `Arc` as the previous snapshot's while no route changed.
    #[serde(skip)]
    pub http_routes: Arc<BTreeMap<(String, String), Arc<HttpRoute>>>,
    /// Every Namespace received, by name -> labelled `istio.io/dataplane-mode=ambient`: what
    /// the CNI endpoint decides a pod's enrollment by before the pod itself is in the state.
    #[serde(skip)]
    pub namespace_ambient: Arc<BTreeMap<String, bool>>,
}

impl State {
    /// Builds a snapshot from objects. Later objects with the same identity replace earlier ones.
    pub fn build(generation: u64, trust_domain: &str, objects: &[Object]) -> State {
        let mut model = Model::new(trust_domain);
        for o in objects {
            model.apply(o.clone());
        }
        model.snapshot(generation)
    }

    /// The service owning virtual IP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The first service (by `namespace/name`) whose endpoints include the pod at `ip`; what
    /// telemetry reports as the destination service of a flow addressed to a pod directly.
    /// A service selects pods of its own namespace only, so only that namespace's services
    /// are looked at: this runs for every new flow, and a scan of every service cost 1-3 ms
    /// per flow with 2,000 of them.
    pub fn service_of(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        let prefix = format!("{}/", self.workload(ip)?.namespace);
        self.services
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(_, svc)| svc)
            .find(|s| s.endpoints.iter().any(|w| w.has_ip(ip)))
    }

    /// The waypoint that takes traffic to `svc`'s VIP: the one its labels attach, when that
    /// Gateway exists and is `waypoint-for` `service` or `all`. A label naming a Gateway that
    /// does not exist (yet) attaches nothing, as in Istio.
    pub fn service_waypoint(&self, svc: &Service) -> Option<&Arc<Waypoint>> {
        self.waypoint(svc.waypoint.as_ref()?, TrafficKind::Service)
    }

    /// The waypoint that takes traffic addressed to pod `w` directly: the one its labels
    /// attach, when that Gateway exists and is `waypoint-for` `workload` or `all`.
    pub fn workload_waypoint(&self, w: &Workload) -> Option<&Arc<Waypoint>> {
        self.waypoint(w.waypoint.as_ref()?, TrafficKind::Workload)
    }

    fn waypoint(&self, r: &WaypointRef, kind: TrafficKind) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(&r.key()).filter(|w| w.takes(kind))
    }

    /// Whether pods of namespace `ns` are enrolled by their namespace's label; `None` while the
    /// Namespace object is not in the state.
    pub fn namespace_enrolled(&self, ns: &str) -> Option<bool> {
        self.namespace_ambient.get(ns).copied()
    }

    /// The workload with pod IP `ip` (any of its addresses).
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// Resolves an original destination: a service VIP picks an endpoint (one with an address
    /// of the VIP's family) and maps the port to the target port; a pod IP is that pod;
    /// anything else is outside the mesh. Dial the pod at `w.ip_like(dst.ip())`.
    pub fn resolve(&self, dst: SocketAddr) -> Result<Destination, ResolveError> {
        if let Some(svc) = self.by_vip.get(&dst.ip()) {
            return svc
                .pick_like(dst.port(), dst.ip())
                .map(|(w, port)| Destination::Workload(w, port))
                .ok_or_else(|| ResolveError::NoEndpoint {
                    service: svc.key(),
                    port: dst.port(),
                });
        }
        Ok(match self.workloads.get(&dst.ip()) {
            Some(w) => Destination::Workload(w.clone(), dst.port()),
            None => Destination::External(dst),
        })
    }

    /// Every workload once (the IP index holds a dual-stack pod under each of its addresses):
    /// each under the first of its addresses that leads to it.
    pub fn pods(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter().filter_map(|(ip, w)| {
            // A pod with one address is under it once; only the others need a lookup (this
            // runs over every pod several times per state change).
            if w.ips.len() < 2 {
                return Some(w);
            }
            let first = w
                .ips
                .iter()
                .find(|i| self.workloads.get(i).is_some_and(|o| Arc::ptr_eq(o, w)));
            (first == Some(ip)).then_some(w)
        })
    }

    /// Pods scheduled on `node`, sorted by IP: what capture and certificates are about.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        let mut v: Vec<_> = self.pods().filter(|w| w.node == node).collect();
        v.sort_by_key(|w| w.ip);
        v.into_iter()
    }
}

/// Derives the telemetry workload name of a pod. A ReplicaSet named `<deployment>-<hash>`
/// stands for its Deployment and a Job named `<cronjob>-<digits>` for its CronJob, so metrics
/// keep one series across rollouts.
fn workload_name(meta: &ObjectMeta) -> String {
    let owner = meta
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| meta.owner_references.first());
    if let Some(o) = owner {
        let strip = |suffix_ok: fn(&str) -> bool| match o.name.rsplit_once('-') {
            Some((base, suffix)) if !base.is_empty() && suffix_ok(suffix) => base.to_string(),
            _ => o.name.clone(),
        };
        return match o.kind.as_str() {
            "ReplicaSet" => strip(|s| s.chars().all(|c| c.is_ascii_alphanumeric())),
            "Job" => strip(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
            _ => o.name.clone(),
        };
    }
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| meta.labels.get(*k))
        .cloned()
        .unwrap_or_else(|| meta.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn workload_name_follows_owner_then_labels_then_pod() {
        let yaml = r#"
{apiVersion: v1, kind: Pod, metadata: {name: r-5d9f8c7b6-x2x9z, namespace: n, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5d9f8c7b6, controller: true, uid: u}]}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: j-abc, namespace: n, ownerReferences: [{kind: Job, name: backup-28012345, controller: true}]}, spec: {nodeName: n1}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: db-0, namespace: n, labels: {app: x}, ownerReferences: [{kind: StatefulSet, name: db}]}, spec: {nodeName: n1}, status: {podIP: 10.0.0.3, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: p1, namespace: n, labels: {app: web}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.4, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: lone, namespace: n}, spec: {nodeName: n1}, status: {podIP: 10.0.0.5, phase: Running}}
"#;
        let s = state(yaml);
        let name = |ip: &str| {
            s.workload(ip.parse().expect("ip"))
                .expect("workload")
                .workload_name
                .clone()
        };
        assert_eq!(name("10.0.0.1"), "reviews-v1");
        assert_eq!(name("10.0.0.2"), "backup");
        assert_eq!(name("10.0.0.3"), "db");
        assert_eq!(name("10.0.0.4"), "web");
        assert_eq!(name("10.0.0.5"), "lone");
    }

    fn state(yaml: &str) -> State {
        let objs = crate::k8s::parse_file(Path::new("t.yaml"), yaml).expect("parses");
        State::build(1, "cluster.local", &objs)
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: s}}, spec: {nodeName: n1, serviceAccountName: sa-a, containers: [{ports: [{name: web, containerPort: 8080}]}]}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: mesh, labels: {app: s, istio.io/dataplane-mode: none}}, spec: {nodeName: n2, containers: [{ports: [{name: web, containerPort: 9090}]}]}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: c, namespace: plain}, spec: {nodeName: n1}, status: {podIP: 10.0.0.3, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: d, namespace: mesh, labels: {app: s}}, spec: {nodeName: n1}, status: {phase: Pending}}
---
{apiVersion: v1, kind: Service, metadata: {name: s, namespace: mesh}, spec: {clusterIP: 10.96.0.1, selector: {app: s}, ports: [{port: 80, targetPort: web}]}}
"#;

    #[test]
    fn the_model_names_what_it_holds_of_each_kind_and_deleting_those_empties_it() {
        // A list source deletes what the model names and the new list did not bring; every
        // kind the sources deliver must be named under the key the source deletes by.
        let policy = "\n---\n{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: deny, namespace: mesh}, spec: {action: DENY, rules: [{}]}}";
        let objs = crate::k8s::parse_file(Path::new("t.yaml"), &format!("{BASE}{policy}"))
            .expect("parses");
        let mut m = model::Model::new("cluster.local");
        for o in objs {
            m.apply(o);
        }
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        assert_eq!(
            m.keys("Namespace"),
            [key("", "mesh"), key("", "plain")].into()
        );
        assert_eq!(m.keys("Pod").len(), 4, "the pending pod too");
        assert_eq!(m.keys("Service"), [key("mesh", "s")].into());
        assert_eq!(m.keys("AuthorizationPolicy"), [key("mesh", "deny")].into());
        for kind in ["Namespace", "Pod", "Service", "AuthorizationPolicy"] {
            for (ns, name) in m.keys(kind) {
                m.delete(kind, &ns, &name);
            }
        }
        assert!(m.is_empty());
    }

    #[test]
    fn enrollment_follows_labels() {
        let s = state(BASE);
        let ip = |x: &str| x.parse::<IpAddr>().expect("ip");
        assert!(s.workload(ip("10.0.0.1")).expect("a").enrolled);
        assert!(
            !s.workload(ip("10.0.0.2")).expect("b").enrolled,
            "pod opt-out"
        );
        assert!(
            !s.workload(ip("10.0.0.3")).expect("c").enrolled,
            "namespace not ambient"
        );
        assert_eq!(s.workloads.len(), 3, "pending pod without IP is skipped");
        assert_eq!(
            s.workload(ip("10.0.0.1")).expect("a").identity.to_string(),
            "spiffe://cluster.local/ns/mesh/sa/sa-a"
        );
        assert_eq!(
            s.workload(ip("10.0.0.3")).expect("c").identity.to_string(),
            "spiffe://cluster.local/ns/plain/sa/default"
        );
        assert_eq!(s.local_workloads("n1").count(), 2);
    }

    #[test]
    fn vip_round_robins_over_endpoints_with_named_target_port() {
        let s = state(BASE);
        let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            match s.resolve(vip).expect("resolves") {
                Destination::Workload(w, port) => {
                    seen.insert((w.name.clone(), port));
                }
                Destination::External(_) => panic!("vip is a service"),
            }
        }
        let want: std::collections::BTreeSet<_> =
            [("a".to_string(), 8080), ("b".to_string(), 9090)].into();
        assert_eq!(seen, want);
        assert!(matches!(
            s.resolve("10.96.0.1:81".parse().expect("addr")),
            Err(ResolveError::NoEndpoint { .. })
        ));
        assert!(matches!(
            s.resolve("1.2.3.4:80".parse().expect("addr")),
            Ok(Destination::External(_))
        ));
    }

    #[test]
    fn only_ready_running_pods_are_endpoints_but_all_keep_their_workload() {
        let yaml = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: ready, namespace: mesh, labels: {app: s}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, phase: Running, conditions: [{type: Ready, status: "True"}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: unready, namespace: mesh, labels: {app: s}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.2, phase: Running, conditions: [{type: PodScheduled, status: "True"}, {type: Ready, status: "False"}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: leaving, namespace: mesh, labels: {app: s}, deletionTimestamp: "2026-12-06T00:00:00Z"}, spec: {nodeName: n1}, status: {podIP: 10.0.0.3, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: other-ns, namespace: plain, labels: {app: s}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.4, phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: s, namespace: mesh}, spec: {clusterIP: 10.96.0.1, selector: {app: s}, ports: [{port: 80}]}}
"#;
        let s = state(yaml);
        let svc = s.services.get("mesh/s").expect("service");
        let names: Vec<&str> = svc.endpoints.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["ready"]);
        assert_eq!(
            s.workloads.len(),
            4,
            "unready and terminating pods stay known"
        );
        assert!(
            s.workload("10.0.0.2".parse().expect("ip"))
                .expect("unready")
                .enrolled
        );
    }

    #[test]
    fn model_applies_and_deletes_one_object_at_a_time() {
        let objs = crate::k8s::parse_file(Path::new("t.yaml"), BASE).expect("parses");
        let mut m = Model::new("cluster.local");
        for o in objs {
            m.apply(o);
        }
        let ip = |x: &str| x.parse::<IpAddr>().expect("ip");
        assert!(m.snapshot(1).workload(ip("10.0.0.1")).expect("a").enrolled);
        // Unlabelling the namespace un-enrolls its pods without re-sending them.
        let ns = r#"{apiVersion: v1, kind: Namespace, metadata: {name: mesh}}"#;
        for o in crate::k8s::parse_file(Path::new("ns.yaml"), ns).expect("parses") {
            m.apply(o);
        }
        let s = m.snapshot(2);
        assert!(!s.workload(ip("10.0.0.1")).expect("a").enrolled);
        assert_eq!(s.services["mesh/s"].endpoints.len(), 2);
        m.delete("Pod", "mesh", "a");
        let s = m.snapshot(3);
        assert!(s.workload(ip("10.0.0.1")).is_none());
        assert_eq!(s.services["mesh/s"].endpoints.len(), 1);
        m.delete("Service", "mesh", "s");
        assert!(m.snapshot(4).service_by_vip(ip("10.96.0.1")).is_none());
    }

    #[test]
    fn a_pod_taking_an_ip_over_gives_it_back_when_deleted() {
        let pod = |name: &str, app: &str| {
            format!("{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: mesh, labels: {{app: {app}}}}}, spec: {{nodeName: n1}}, status: {{podIP: 10.0.0.9, phase: Running}}}}")
        };
        let mut m = Model::new("cluster.local");
        for o in crate::k8s::parse_file(Path::new("t.yaml"), BASE).expect("parses") {
            m.apply(o);
        }
        for y in [pod("old", "x"), pod("new", "s")] {
            for o in crate::k8s::parse_file(Path::new("p.yaml"), &y).expect("parses") {
                m.apply(o);
            }
        }
        let ip = "10.0.0.9".parse::<IpAddr>().expect("ip");
        let s = m.snapshot(1);
        assert_eq!(s.workload(ip).expect("owner").name, "new");
        assert_eq!(s.services["mesh/s"].endpoints.len(), 3, "a, b and new");
        m.delete("Pod", "mesh", "new");
        let s = m.snapshot(2);
        assert_eq!(s.workload(ip).expect("heir").name, "old");
        assert_eq!(s.services["mesh/s"].endpoints.len(), 2);
    }

    const DUAL: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: s}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}], phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: mesh, labels: {app: s}}, spec: {nodeName: n2}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: c, namespace: mesh, labels: {app: t}}, spec: {nodeName: n1}, status: {podIP: "fd00::3", podIPs: [{ip: "fd00::3"}], phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: s, namespace: mesh}, spec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, "fd00:96::1"], ipFamilies: [IPv4, IPv6], selector: {app: s}, ports: [{port: 80, targetPort: 8080}]}}
"#;

    #[test]
    fn a_pods_service_is_one_of_its_own_namespace() {
        // `a` sorts before `a-b`, which sorts before `a/`: the namespace `a` must not stop
        // at, or take, the services of `a-b`.
        let s = state(
            r#"
{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a, labels: {app: x}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a-b, labels: {app: x}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: q, namespace: a, labels: {app: none}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.3, phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: s1, namespace: a-b}, spec: {clusterIP: 10.96.0.1, selector: {app: x}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: s2, namespace: a}, spec: {clusterIP: 10.96.0.2, selector: {app: x}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: s3, namespace: a}, spec: {clusterIP: 10.96.0.3, selector: {app: x}, ports: [{port: 80}]}}
"#,
        );
        let of = |ip: &str| {
            s.service_of(ip.parse().expect("ip"))
                .map(|svc| format!("{}/{}", svc.namespace, svc.name))
        };
        assert_eq!(of("10.0.0.1").as_deref(), Some("a/s2"), "first by name");
        assert_eq!(of("10.0.0.2").as_deref(), Some("a-b/s1"));
        assert_eq!(of("10.0.0.3"), None, "selected by no service");
        assert_eq!(of("10.0.0.9"), None, "no pod");
    }

    #[test]
    fn dual_stack_pods_are_found_by_either_address() {
        let s = state(DUAL);
        let ip = |x: &str| x.parse::<IpAddr>().expect("ip");
        let a = s.workload(ip("fd00::1")).expect("a by its IPv6 address");
        assert_eq!(a.name, "a");
        assert_eq!(a.ip, ip("10.0.0.1"), "podIP stays the primary address");
        assert_eq!(*a.ips, [ip("10.0.0.1"), ip("fd00::1")]);
        assert!(Arc::ptr_eq(a, s.workload(ip("10.0.0.1")).expect("a")));
        assert_eq!(a.ip_like(ip("fd00::9")), Some(ip("fd00::1")));
        assert_eq!(
            s.workload(ip("fd00::3")).expect("c, IPv6 only").ip,
            ip("fd00::3")
        );
        assert_eq!(s.pods().count(), 3, "each pod once, however many addresses");
        assert_eq!(s.local_workloads("n1").count(), 2);
        assert_eq!(s.service_of(ip("fd00::1")).expect("s").name, "s");
    }

    #[test]
    fn an_ipv6_vip_goes_to_an_endpoint_with_an_ipv6_address() {
        let s = state(DUAL);
        for _ in 0..4 {
            match s.resolve("[fd00:96::1]:80".parse().expect("addr")) {
                Ok(Destination::Workload(w, port)) => {
                    assert_eq!(
                        (w.name.as_str(), port),
                        ("a", 8080),
                        "b has no IPv6 address"
                    );
                    assert_eq!(
                        w.dial_ip("fd00:96::1".parse().expect("ip")),
                        "fd00::1".parse::<IpAddr>().expect("ip")
                    );
                }
                other => panic!("IPv6 VIP: {other:?}"),
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            if let Ok(Destination::Workload(w, _)) =
                s.resolve("10.96.0.1:80".parse().expect("addr"))
            {
                seen.insert(w.name.clone());
            }
        }
        assert_eq!(seen.len(), 2, "the IPv4 VIP keeps both endpoints: {seen:?}");
    }

    #[test]
    fn a_dual_stack_pod_changing_addresses_releases_the_old_ones() {
        let mut m = Model::new("cluster.local");
        for o in crate::k8s::parse_file(Path::new("t.yaml"), DUAL).expect("parses") {
            m.apply(o);
        }
        let moved = r#"{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: s}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::11"}], phase: Running}}"#;
        for o in crate::k8s::parse_file(Path::new("a.yaml"), moved).expect("parses") {
            m.apply(o);
        }
        let ip = |x: &str| x.parse::<IpAddr>().expect("ip");
        let s = m.snapshot(2);
        assert!(
            s.workload(ip("fd00::1")).is_none(),
            "old IPv6 address released"
        );
        assert_eq!(s.workload(ip("fd00::11")).expect("new").name, "a");
        m.delete("Pod", "mesh", "a");
        let s = m.snapshot(3);
        assert!(s.workload(ip("fd00::11")).is_none());
        assert!(s.workload(ip("10.0.0.1")).is_none());
        assert_eq!(s.pods().count(), 2);
    }
}
