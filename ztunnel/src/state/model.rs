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
use crate::authz::{CompiledPolicy, Problem, Registry};
use crate::identity::SpiffeId;
use crate::k8s::core::{Pod, Service as ServiceObject};
use crate::k8s::gateway::{Gateway, HttpRoute, WaypointFor};
use crate::k8s::security::AuthorizationPolicyObject;
use crate::k8s::{IntOrString, Interner, Labels, Object, ObjectMeta, SharedStr};

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
    selector: Option<Labels>,
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
    /// Shared with every snapshot until a policy changes (then copied once: pointers). Empty
    /// unless `keep_policy_objects`.
    authz_policies: Arc<BTreeMap<Key, Arc<AuthorizationPolicyObject>>>,
    /// Keep each AuthorizationPolicy as received, for the waypoint (which compiles the L7
    /// ones itself); the node daemon needs only the compiled policies (about 2 KB less per
    /// policy).
    keep_policy_objects: bool,
    /// HTTPRoutes, for the waypoint; shared with snapshots like the policies.
    http_routes: Arc<BTreeMap<Key, Arc<HttpRoute>>>,
    /// Each AuthorizationPolicy and PeerAuthentication compiled on arrival: a policy change
    /// compiles that policy only, and the next snapshot assembles the registry from these.
    compiled_authz: BTreeMap<Key, CompiledPolicy>,
    compiled_peer: BTreeMap<Key, CompiledPolicy>,
    /// Namespace name -> labelled ambient, for the snapshot; copied only when a namespace's
    /// enrollment changes.
    namespace_ambient: Arc<BTreeMap<String, bool>>,
    /// Gateways of class `istio-waypoint` (others are not the daemon's business).
    gateways: BTreeMap<Key, GatewayEntry>,

    /// Shared texts of workloads and services (namespaces, nodes, labels...).
    interner: Interner,
    /// Identities by `(namespace, service account)`, shared by their pods.
    identities: HashMap<(SharedStr, SharedStr), Arc<SpiffeId>>,
    /// Identities held after the last sweep of unused ones.
    identities_swept: usize,
    /// The snapshot's workloads by IP: for each IP, the pod holding it (the one applied last,
    /// when two claim it).
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
            keep_policy_objects: true,
            http_routes: Arc::default(),
            compiled_authz: BTreeMap::new(),
            compiled_peer: BTreeMap::new(),
            namespace_ambient: Arc::default(),
            gateways: BTreeMap::new(),
            interner: Interner::default(),
            identities: HashMap::new(),
            identities_swept: 0,
            workloads: HashMap::new(),
            resolved: BTreeMap::new(),
            by_vip: HashMap::new(),
            waypoints: BTreeMap::new(),
            dirty: HashSet::new(),
            authz: None,
        }
    }

    /// Whether snapshots carry the AuthorizationPolicy objects as received
    /// ([`State::authz_policies`]); on by default, off in the node daemon (see the field).
    pub fn keep_policy_objects(&mut self, keep: bool) {
        self.keep_policy_objects = keep;
        if !keep {
            self.authz_policies = Arc::default();
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
                let entry = translate_service(&s, &mut self.interner);
                self.services.insert(k, entry);
            }
            Object::AuthorizationPolicy(p) => {
                let k = key(&p.metadata);
                let c = CompiledPolicy::authorization_policy(&p);
                log_problems(&c.problems);
                self.compiled_authz.insert(k.clone(), c);
                if self.keep_policy_objects {
                    Arc::make_mut(&mut self.authz_policies).insert(k, Arc::new(p));
                }
                self.authz = None;
            }
            Object::PeerAuthentication(p) => {
                let c = CompiledPolicy::peer_authentication(&p);
                log_problems(&c.problems);
                self.compiled_peer.insert(key(&p.metadata), c);
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
            "AuthorizationPolicy" if self.compiled_authz.remove(&k).is_some() => {
                if self.authz_policies.contains_key(&k) {
                    Arc::make_mut(&mut self.authz_policies).remove(&k);
                }
                self.authz = None;
            }
            "HTTPRoute" if self.http_routes.contains_key(&k) => {
                Arc::make_mut(&mut self.http_routes).remove(&k);
            }
            "PeerAuthentication" if self.compiled_peer.remove(&k).is_some() => {
                self.authz = None;
            }
            "Gateway" if self.gateways.remove(&k).is_some() => self.reenroll(namespace),
            _ => {}
        }
    }

    /// `(namespace, name)` of every object of `kind` the model holds: what a fresh list of
    /// the kind must bring again for it to stay. A source asks when a list begins, instead of
    /// keeping its own copy of 13,000 keys between lists.
    pub fn keys(&self, kind: &str) -> HashSet<Key> {
        fn of<V>(map: &BTreeMap<Key, V>) -> HashSet<Key> {
            map.keys().cloned().collect()
        }
        match kind {
            "Namespace" => self
                .namespaces
                .keys()
                .map(|name| (String::new(), name.clone()))
                .collect(),
            "Pod" => of(&self.pods),
            "Service" => of(&self.services),
            "AuthorizationPolicy" => of(&self.compiled_authz),
            "PeerAuthentication" => of(&self.compiled_peer),
            "Gateway" => of(&self.gateways),
            "HTTPRoute" => of(&self.http_routes),
            _ => HashSet::new(),
        }
    }

    /// Number of objects held, for logs.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.pods.len()
            + self.services.len()
            + self.compiled_authz.len()
            + self.compiled_peer.len()
            + self.gateways.len()
            + self.http_routes.len()
    }

    /// Whether the model holds no object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An immutable snapshot of the current objects. Costs a copy of the indexes (pointers),
    /// plus endpoint selection in the namespaces that changed and, after a policy change,
    /// assembling the registry from the policies compiled on arrival (pointers too).
    pub fn snapshot(&mut self, generation: u64) -> State {
        let authz = match &self.authz {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(Registry::assemble(
                    self.compiled_authz
                        .values()
                        .chain(self.compiled_peer.values()),
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
                        if let Some(prev) = self.workloads.get(ip) {
                            if !is(prev, &k) {
                                tracing::warn!(ip = %ip, pod = %format!("{}/{}", k.0, k.1), previous = %prev.key(), "two running pods share an IP; the one applied last wins");
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
            .map(|w| w.ips.to_vec())
            .unwrap_or_default();
        for old_ip in old
            .and_then(|e| e.workload)
            .map(|w| w.ips.to_vec())
            .unwrap_or_default()
        {
            if !new_ips.contains(&old_ip) && self.owns(old_ip, &k) {
                self.release_ip(old_ip);
            }
        }
    }

    /// The owner of `ip` is gone: another pod claiming it takes it over, else it is free.
    fn release_ip(&mut self, ip: IpAddr) {
        self.workloads.remove(&ip);
        let heir = self
            .pods
            .iter()
            .find_map(|(k, e)| e.workload.as_ref().filter(|w| w.has_ip(ip)).map(|w| (k, w)));
        if let Some((k, w)) = heir {
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
                if self.workloads.get(ip).is_some_and(|o| is(o, &k)) {
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
            .filter(|(k, w)| self.owns(w.ip, k))
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
                .filter(|w| w.labels.get(GATEWAY_NAME_LABEL) == Some(name.as_str()))
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

    fn translate_pod(&mut self, p: &Pod) -> PodEntry {
        let meta = &p.metadata;
        let ns = meta.namespace.as_deref().unwrap_or_default();
        let mut entry = PodEntry {
            workload: None,
            opted_out: meta.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none"),
            use_waypoint: UseWaypoint::from_labels(&meta.labels, ns),
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
        let sa = p
            .spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let i = &mut self.interner;
        let (namespace, service_account) = (i.intern(ns), i.intern(sa));
        let named_ports = p
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|cp| Some((i.intern(cp.name.as_deref()?), cp.container_port)))
            .collect();
        let w = Workload {
            name: meta.name.clone(),
            node: i.intern(p.spec.node_name.as_deref().unwrap_or_default()),
            ip,
            ips: ips.into(),
            labels: i.labels(&meta.labels),
            enrolled: false,
            waypoint: None,
            ready: p.status.ready() && meta.deletion_timestamp.is_none(),
            named_ports,
            workload_name: i.intern(&workload_name(meta)),
            dns_capture: meta
                .annotations
                .get(DNS_CAPTURE_ANNOTATION)
                .is_none_or(|v| !v.eq_ignore_ascii_case("false")),
            dns_policy: p.spec.dns_policy.as_deref().map(|s| i.intern(s)),
            dns_searches: p
                .spec
                .dns_config
                .as_ref()
                .map(|c| c.searches.as_slice().into())
                .unwrap_or_default(),
            identity: self.identity(&namespace, &service_account),
            namespace,
            service_account,
        };
        entry.workload = Some(Arc::new(w));
        entry
    }

    /// The shared identity of service account `sa` of namespace `ns` (interned texts).
    fn identity(&mut self, ns: &SharedStr, sa: &SharedStr) -> Arc<SpiffeId> {
        if let Some(id) = self.identities.get(&(ns.clone(), sa.clone())) {
            return id.clone();
        }
        if self.identities.len() >= 2 * self.identities_swept.max(1024) {
            self.identities.retain(|_, id| Arc::strong_count(id) > 1);
            self.identities_swept = self.identities.len();
        }
        let id = Arc::new(SpiffeId::new(&self.trust_domain, ns, sa));
        self.identities.insert((ns.clone(), sa.clone()), id.clone());
        id
    }

    /// Whether the pod at `k` holds `ip` (is the workload the snapshot has for it).
    fn owns(&self, ip: IpAddr, k: &Key) -> bool {
        self.workloads.get(&ip).is_some_and(|w| is(w, k))
    }
}

/// Whether workload `w` is the pod at `k`.
fn is(w: &Workload, k: &Key) -> bool {
    w.namespace == k.0 && w.name == k.1
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

fn translate_service(s: &ServiceObject, interner: &mut Interner) -> ServiceEntry {
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
        selector: s.spec.selector.as_ref().map(|m| interner.labels(m)),
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

/// Logs what compiling one policy found: an invalid policy (kept, failing closed) with object,
/// field and what it means for traffic, or a caveat. Once per version of the object.
fn log_problems(problems: &[Problem]) {
    for p in problems {
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
}
