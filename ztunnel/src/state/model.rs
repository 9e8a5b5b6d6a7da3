//! The mutable side of the state: Kubernetes objects applied and deleted one at a time, and
//! [`State`] snapshots taken from them.
//!
//! Each object is translated once, when it arrives (a pod into its [`Workload`], a service
//! into its VIPs and ports), and the indexes a snapshot is made of (workloads by IP, services
//! by name and VIP) are updated in place: a change re-selects the endpoints of its own
//! namespace only, and policies are compiled again only after a policy changed. Waypoint
//! attachment is derived the same way: a Gateway, or a waypoint label on a Namespace, Service
//! or Pod, re-derives its own namespace (which pods are a waypoint's and so not captured, which
//! waypoint each Service and pod uses, each waypoint's ready pods). A snapshot
//! then costs a copy of the indexes' pointers, not a re-translation of the cluster. Both sources use it:
//! the API-server watch applies each event, the file source applies whole files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::waypoint::{UseWaypoint, Waypoint, WaypointRef, DEFAULT_WAYPOINT_PORT};
use super::{
    workload_name, Service, ServicePort, State, TargetPort, Workload, DATAPLANE_MODE_LABEL,
    DNS_CAPTURE_ANNOTATION, GATEWAY_MANAGED_LABEL, GATEWAY_NAME_LABEL, MESH_CONTROLLER,
};
use crate::authz::Registry;
use crate::identity::SpiffeId;
use crate::k8s::core::{Pod, Service as ServiceObject};
use crate::k8s::gateway::{Gateway, HttpRoute, WaypointFor};
use crate::k8s::security::{AuthorizationPolicyObject, PeerAuthenticationObject};
use crate::k8s::{IntOrString, Object, ObjectMeta};

/// `(namespace, name)` of a namespaced object.
type Key = (String, String);

/// A pod as translated on arrival.
#[derive(Debug)]
struct PodEntry {
    /// `None` while the pod has no IP, is not running, or uses the host network.
    workload: Option<Arc<Workload>>,
    /// Labelled `istio.io/dataplane-mode=none`.
    opted_out: bool,
    /// Its own `istio.io/use-waypoint` labels.
    use_waypoint: UseWaypoint,
    /// `gateway.networking.k8s.io/gateway-name`: the Gateway it serves, when that is a
    /// waypoint of its namespace.
    gateway: Option<String>,
    /// Labelled as a waypoint by Istio's gateway controller.
    managed_waypoint: bool,
}

/// A service as translated on arrival; endpoints are selected when its namespace changes.
#[derive(Debug)]
struct ServiceEntry {
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    selector: Option<BTreeMap<String, String>>,
    /// Its own `istio.io/use-waypoint` labels.
    use_waypoint: UseWaypoint,
    /// A waypoint's own Service (labelled with a Gateway's name or as controller-managed):
    /// it never has a waypoint of its own.
    of_waypoint: bool,
}

/// A namespace's labels that matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NamespaceEntry {
    /// Labelled `istio.io/dataplane-mode=ambient`.
    ambient: bool,
    /// Its `istio.io/use-waypoint` labels, the default of its Services and pods.
    use_waypoint: UseWaypoint,
}

/// A waypoint Gateway as translated on arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GatewayEntry {
    traffic: WaypointFor,
    port: u16,
}

/// Every object the daemon knows, translated, keyed by kind and `namespace/name`, and the
/// indexes a [`State`] is made of, kept up to date as objects come and go.
#[derive(Debug)]
pub struct Model {
    trust_domain: String,
    /// Namespace name -> its enrollment and waypoint labels.
    namespaces: HashMap<String, NamespaceEntry>,
    /// Ordered, so a namespace's pods and services are a range.
    pods: BTreeMap<Key, PodEntry>,
    services: BTreeMap<Key, ServiceEntry>,
    /// Shared with every snapshot until a policy changes (then copied once: pointers).
    authz_policies: Arc<BTreeMap<Key, Arc<AuthorizationPolicyObject>>>,
    /// HTTPRoutes, for the waypoint; shared with snapshots like the policies.
    http_routes: Arc<BTreeMap<Key, Arc<HttpRoute>>>,
    /// Namespace name -> labelled ambient, for the snapshot; copied only when a namespace's
    /// enrollment changes.
    namespace_ambient: Arc<BTreeMap<String, bool>>,
    peer_authentications: BTreeMap<Key, PeerAuthenticationObject>,
    /// Gateways of class `istio-waypoint` (others are not the daemon's business).
    gateways: BTreeMap<Key, GatewayEntry>,

    /// Pod IP -> the pod holding it (the one applied last, when two claim it).
    ip_owner: HashMap<IpAddr, Key>,
    /// The snapshot's workloads by IP.
    workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The snapshot's services by `namespace/name`, and by VIP.
    resolved: BTreeMap<String, Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    /// The snapshot's waypoints by `namespace/name`.
    waypoints: BTreeMap<String, Arc<Waypoint>>,
    /// Namespaces whose services' endpoints must be selected again before the next snapshot.
    dirty: HashSet<String>,
    /// Compiled policies; `None` after a policy changed, until the next snapshot.
    authz: Option<Arc<Registry>>,
}

impl Model {
    /// An empty model for identities in `trust_domain`.
    pub fn new(trust_domain: &str) -> Model {
        Model {
            trust_domain: trust_domain.to_string(),
            namespaces: HashMap::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            authz_policies: Arc::default(),
            http_routes: Arc::default(),
            namespace_ambient: Arc::default(),
            peer_authentications: BTreeMap::new(),
            gateways: BTreeMap::new(),
            ip_owner: HashMap::new(),
            workloads: HashMap::new(),
            resolved: BTreeMap::new(),
            by_vip: HashMap::new(),
            waypoints: BTreeMap::new(),
            dirty: HashSet::new(),
            authz: None,
        }
    }

    /// Adds an object, or replaces the one of the same kind and `namespace/name`.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Namespace(n) => {
                let labels = &n.metadata.labels;
                let name = n.metadata.name.clone();
                let entry = NamespaceEntry {
                    ambient: labels.get(DATAPLANE_MODE_LABEL).map(String::as_str)
                        == Some("ambient"),
                    use_waypoint: UseWaypoint::from_labels(labels, &name),
                };
                if self.namespace_ambient.get(&name) != Some(&entry.ambient) {
                    Arc::make_mut(&mut self.namespace_ambient).insert(name.clone(), entry.ambient);
                }
                if self.namespaces.insert(name.clone(), entry.clone()) != Some(entry) {
                    self.reenroll(&name);
                }
            }
            Object::Pod(p) => {
                let entry = self.translate_pod(&p);
                self.put_pod(key(&p.metadata), Some(entry));
            }
            Object::Service(s) => {
                let k = key(&s.metadata);
                self.dirty.insert(k.0.clone());
                self.services.insert(k, translate_service(&s));
            }
            Object::AuthorizationPolicy(p) => {
                Arc::make_mut(&mut self.authz_policies).insert(key(&p.metadata), Arc::new(p));
                self.authz = None;
            }
            Object::PeerAuthentication(p) => {
                self.peer_authentications.insert(key(&p.metadata), p);
                self.authz = None;
            }
            Object::Gateway(g) => {
                let k = key(&g.metadata);
                let changed = match translate_gateway(&g) {
                    Some(entry) => self.gateways.insert(k.clone(), entry.clone()) != Some(entry),
                    // A Gateway of another class (perhaps no longer a waypoint).
                    None => self.gateways.remove(&k).is_some(),
                };
                if changed {
                    self.reenroll(&k.0);
                }
            }
            // Only carried to the snapshot, for the waypoint.
            Object::HttpRoute(r) => {
                Arc::make_mut(&mut self.http_routes).insert(key(&r.metadata), Arc::new(r));
            }
        }
    }

    /// Removes the object of `kind` (as [`Object::kind`] names it) at `namespace/name`
    /// (`namespace` empty for namespaces). Unknown objects are ignored.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) {
        let k = (namespace.to_string(), name.to_string());
        if kind == "Namespace" && self.namespace_ambient.contains_key(name) {
            Arc::make_mut(&mut self.namespace_ambient).remove(name);
        }
        match kind {
            "Namespace"
                if self
                    .namespaces
                    .remove(name)
                    .is_some_and(|e| e != Default::default()) =>
            {
                self.reenroll(name)
            }
            "Pod" => self.put_pod(k, None),
            "Service" if self.services.remove(&k).is_some() => {
                self.dirty.insert(k.0);
            }
            "AuthorizationPolicy" if self.authz_policies.contains_key(&k) => {
                Arc::make_mut(&mut self.authz_policies).remove(&k);
                self.authz = None;
            }
            "HTTPRoute" if self.http_routes.contains_key(&k) => {
                Arc::make_mut(&mut self.http_routes).remove(&k);
            }
            "PeerAuthentication" if self.peer_authentications.remove(&k).is_some() => {
                self.authz = None;
            }
            "Gateway" if self.gateways.remove(&k).is_some() => self.reenroll(namespace),
            _ => {}
        }
    }

    /// Number of objects held, for logs.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.pods.len()
            + self.services.len()
            + self.authz_policies.len()
            + self.peer_authentications.len()
            + self.gateways.len()
            + self.http_routes.len()
    }

    /// Whether the model holds no object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An immutable snapshot of the current objects. Costs a copy of the indexes (pointers),
    /// plus endpoint selection in the namespaces that changed and, after a policy change,
    /// compiling the policies.
    pub fn snapshot(&mut self, generation: u64) -> State {
        let authz = match &self.authz {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(compile_policies(
                    self.authz_policies.values().map(|p| &**p).collect(),
                    self.peer_authentications.values().collect(),
                ));
                self.authz = Some(a.clone());
                a
            }
        };
        for ns in std::mem::take(&mut self.dirty) {
            self.select_endpoints(&ns);
        }
        State {
            generation,
            workloads: self.workloads.clone(),
            services: self.resolved.clone(),
            by_vip: self.by_vip.clone(),
            waypoints: self.waypoints.clone(),
            authz,
            authz_policies: self.authz_policies.clone(),
            http_routes: self.http_routes.clone(),
            namespace_ambient: self.namespace_ambient.clone(),
        }
    }

    /// Replaces (or with `None` removes) a pod, keeping the IP index and enrollment current.
    fn put_pod(&mut self, k: Key, entry: Option<PodEntry>) {
        self.dirty.insert(k.0.clone());
        let old = match entry {
            Some(mut e) => {
                let (enrolled, waypoint) = self.derive_pod(&k.0, &e);
                if let Some(w) = e.workload.as_mut() {
                    let m = Arc::make_mut(w);
                    m.enrolled = enrolled;
                    m.waypoint = waypoint;
                    for ip in &w.ips {
                        if let Some(prev) = self.ip_owner.insert(*ip, k.clone()) {
                            if prev != k {
                                tracing::warn!(ip = %ip, pod = %format!("{}/{}", k.0, k.1), previous = %format!("{}/{}", prev.0, prev.1), "two running pods share an IP; the one applied last wins");
                            }
                        }
                        self.workloads.insert(*ip, w.clone());
                    }
                }
                self.pods.insert(k.clone(), e)
            }
            None => self.pods.remove(&k),
        };
        let new_ips: Vec<IpAddr> = self
            .pods
            .get(&k)
            .and_then(|e| e.workload.as_ref())
            .map(|w| w.ips.clone())
            .unwrap_or_default();
        for old_ip in old
            .and_then(|e| e.workload)
            .map(|w| w.ips.clone())
            .unwrap_or_default()
        {
            if !new_ips.contains(&old_ip) && self.ip_owner.get(&old_ip) == Some(&k) {
                self.release_ip(old_ip);
            }
        }
    }

    /// The owner of `ip` is gone: another pod claiming it takes it over, else it is free.
    fn release_ip(&mut self, ip: IpAddr) {
        self.ip_owner.remove(&ip);
        self.workloads.remove(&ip);
        let heir = self
            .pods
            .iter()
            .find_map(|(k, e)| e.workload.as_ref().filter(|w| w.has_ip(ip)).map(|w| (k, w)));
        if let Some((k, w)) = heir {
            self.ip_owner.insert(ip, k.clone());
            self.workloads.insert(ip, w.clone());
            self.dirty.insert(k.0.clone());
        }
    }

    /// Whether a pod of `ns` is enrolled, and the waypoint it uses. A waypoint's pod is never
    /// enrolled (it speaks HBONE itself) and has no waypoint of its own.
    fn derive_pod(&self, ns: &str, e: &PodEntry) -> (bool, Option<WaypointRef>) {
        let namespace = self.namespaces.get(ns);
        let serves_waypoint = e.managed_waypoint
            || e.gateway
                .as_ref()
                .is_some_and(|g| self.gateways.contains_key(&(ns.to_string(), g.to_string())));
        if serves_waypoint {
            return (false, None);
        }
        let enrolled = namespace.is_some_and(|n| n.ambient) && !e.opted_out;
        let waypoint = match namespace {
            Some(n) => e.use_waypoint.resolve(&n.use_waypoint),
            None => e.use_waypoint.resolve(&UseWaypoint::Unset),
        };
        (enrolled, waypoint)
    }

    /// A namespace's labels or waypoint Gateways changed: its pods' enrollment and waypoint
    /// follow, and its Services and waypoints are derived again before the next snapshot.
    fn reenroll(&mut self, ns: &str) {
        let keys: Vec<Key> = namespace_range(&self.pods, ns)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let Some(e) = self.pods.get(&k) else { continue };
            let derived = self.derive_pod(ns, e);
            let Some(e) = self.pods.get_mut(&k) else {
                continue;
            };
            let Some(w) = e
                .workload
                .as_mut()
                .filter(|w| (w.enrolled, &w.waypoint) != (derived.0, &derived.1))
            else {
                continue;
            };
            let m = Arc::make_mut(w);
            (m.enrolled, m.waypoint) = derived;
            for ip in &w.ips {
                if self.ip_owner.get(ip) == Some(&k) {
                    self.workloads.insert(*ip, w.clone());
                }
            }
        }
        self.dirty.insert(ns.to_string());
    }

    /// Selects the endpoints of every service of `ns` again, replacing them in the indexes.
    fn select_endpoints(&mut self, ns: &str) {
        let stale: Vec<String> = self
            .resolved
            .range(format!("{ns}/")..)
            .take_while(|(k, _)| k.strip_prefix(ns).is_some_and(|r| r.starts_with('/')))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(svc) = self.resolved.remove(&k) {
                for vip in &svc.vips {
                    if self.by_vip.get(vip).is_some_and(|s| Arc::ptr_eq(s, &svc)) {
                        self.by_vip.remove(vip);
                    }
                }
            }
        }
        let ready: Vec<Arc<Workload>> = namespace_range(&self.pods, ns)
            .filter_map(|(k, e)| e.workload.as_ref().filter(|w| w.ready).map(|w| (k, w)))
            .filter(|(k, w)| self.ip_owner.get(&w.ip) == Some(*k))
            .map(|(_, w)| w.clone())
            .collect();
        let ns_waypoint = self
            .namespaces
            .get(ns)
            .map(|n| n.use_waypoint.clone())
            .unwrap_or_default();
        for ((_, name), s) in namespace_range(&self.services, ns) {
            let mut endpoints: Vec<Arc<Workload>> = match &s.selector {
                Some(sel) if !sel.is_empty() => ready
                    .iter()
                    .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            };
            endpoints.sort_by_key(|w| w.ip);
            let svc = Arc::new(Service {
                name: name.clone(),
                namespace: ns.to_string(),
                vips: s.vips.clone(),
                ports: s.ports.clone(),
                endpoints,
                waypoint: if s.of_waypoint {
                    None
                } else {
                    s.use_waypoint.resolve(&ns_waypoint)
                },
                next: AtomicUsize::new(0),
            });
            for vip in &svc.vips {
                self.by_vip.insert(*vip, svc.clone());
            }
            self.resolved.insert(svc.key(), svc);
        }
        self.select_waypoints(ns, &ready);
    }

    /// Derives the waypoints of `ns` again: each waypoint Gateway with the `ready` pods of the
    /// namespace labelled with its name.
    fn select_waypoints(&mut self, ns: &str, ready: &[Arc<Workload>]) {
        let prefix = format!("{ns}/");
        let stale: Vec<String> = self
            .waypoints
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.waypoints.remove(&k);
        }
        for ((_, name), g) in namespace_range(&self.gateways, ns) {
            let endpoints = ready
                .iter()
                .filter(|w| w.labels.get(GATEWAY_NAME_LABEL) == Some(name))
                .cloned()
                .collect();
            let wp = Waypoint {
                name: name.clone(),
                namespace: ns.to_string(),
                traffic: g.traffic,
                port: g.port,
                endpoints,
                next: AtomicUsize::new(0),
            };
            self.waypoints.insert(wp.key(), Arc::new(wp));
        }
    }

    fn translate_pod(&self, p: &Pod) -> PodEntry {
        let meta = &p.metadata;
        let ns = meta.namespace.clone().unwrap_or_default();
        let mut entry = PodEntry {
            workload: None,
            opted_out: meta.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none"),
            use_waypoint: UseWaypoint::from_labels(&meta.labels, &ns),
            gateway: meta.labels.get(GATEWAY_NAME_LABEL).cloned(),
            managed_waypoint: meta.labels.get(GATEWAY_MANAGED_LABEL).map(String::as_str)
                == Some(MESH_CONTROLLER),
        };
        let ips = p.status.ips();
        let (Some(&ip), Some("Running")) = (ips.first(), p.status.phase.as_deref()) else {
            return entry;
        };
        if p.spec.host_network {
            return entry;
        }
        let service_account = p
            .spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let named_ports = p
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|cp| Some((cp.name.clone()?, cp.container_port)))
            .collect();
        let w = Workload {
            name: meta.name.clone(),
            identity: SpiffeId::new(&self.trust_domain, &ns, &service_account),
            namespace: ns,
            service_account,
            node: p.spec.node_name.clone().unwrap_or_default(),
            ip,
            ips,
            labels: meta.labels.clone(),
            enrolled: false,
            waypoint: None,
            ready: p.status.ready() && meta.deletion_timestamp.is_none(),
            named_ports,
            workload_name: workload_name(meta),
            dns_capture: meta
                .annotations
                .get(DNS_CAPTURE_ANNOTATION)
                .is_none_or(|v| !v.eq_ignore_ascii_case("false")),
            dns_policy: p.spec.dns_policy.clone(),
            dns_searches: p
                .spec
                .dns_config
                .as_ref()
                .map(|c| c.searches.clone())
                .unwrap_or_default(),
        };
        entry.workload = Some(Arc::new(w));
        entry
    }
}

/// The entries of namespace `ns` in a map keyed by `(namespace, name)`.
fn namespace_range<'a, V>(
    map: &'a BTreeMap<Key, V>,
    ns: &str,
) -> impl Iterator<Item = (&'a Key, &'a V)> {
    let ns = ns.to_string();
    map.range((ns.clone(), String::new())..)
        .take_while(move |(k, _)| k.0 == ns)
}

fn key(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone(),
    )
}

fn translate_service(s: &ServiceObject) -> ServiceEntry {
    let mut vips: Vec<IpAddr> = Vec::new();
    for ip in s
        .spec
        .cluster_ip
        .iter()
        .chain(&s.spec.cluster_ips)
        .filter_map(|v| v.parse().ok())
    {
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let ports = s
        .spec
        .ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| ServicePort {
            port: p.port,
            target: match &p.target_port {
                None => TargetPort::Number(p.port),
                Some(IntOrString::Int(n)) => TargetPort::Number(*n),
                Some(IntOrString::String(s)) => match s.parse() {
                    Ok(n) => TargetPort::Number(n),
                    Err(_) => TargetPort::Named(s.clone()),
                },
            },
        })
        .collect();
    let labels = &s.metadata.labels;
    ServiceEntry {
        vips,
        ports,
        selector: s.spec.selector.clone(),
        use_waypoint: UseWaypoint::from_labels(
            labels,
            s.metadata.namespace.as_deref().unwrap_or(""),
        ),
        of_waypoint: labels.contains_key(GATEWAY_NAME_LABEL)
            || labels.get(GATEWAY_MANAGED_LABEL).map(String::as_str) == Some(MESH_CONTROLLER),
    }
}

/// A Gateway of class `istio-waypoint` as the data path needs it; `None` for other classes.
fn translate_gateway(g: &Gateway) -> Option<GatewayEntry> {
    if !g.is_waypoint() {
        return None;
    }
    let port = g
        .spec
        .listeners
        .iter()
        .find(|l| l.protocol.eq_ignore_ascii_case("HBONE"))
        .map(|l| l.port)
        .unwrap_or(DEFAULT_WAYPOINT_PORT);
    Some(GatewayEntry {
        traffic: g.waypoint_for(),
        port,
    })
}

/// Compiles the policies, logging each invalid one (kept, failing closed) with object, field
/// and what it means for traffic, and each caveat.
fn compile_policies(
    authz: Vec<&AuthorizationPolicyObject>,
    peer: Vec<&PeerAuthenticationObject>,
) -> Registry {
    let reg = Registry::build(authz, peer);
    for p in &reg.problems {
        if p.invalid {
            tracing::warn!(
                kind = p.kind,
                policy = %p.policy,
                action = p.action,
                field = %p.field,
                error = %p.message,
                effect = %p.effect,
                "policy invalid; enforced failing closed"
            );
        } else {
            tracing::warn!(
                kind = p.kind,
                policy = %p.policy,
                field = %p.field,
                warning = %p.message,
                "policy applied with a caveat"
            );
        }
    }
    reg
}
