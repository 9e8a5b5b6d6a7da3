//! The mutable side of the state: Kubernetes objects applied and deleted one at a time, and
//! [`State`] snapshots taken from them.
//!
//! Each object is translated once, when it arrives (a pod into its [`Workload`], a service
//! into its VIPs and ports), and the indexes a snapshot is made of (workloads by IP, services
//! by name and VIP) are updated in place: a change re-selects the endpoints of its own
//! namespace only, and policies are compiled again only after a policy changed. A snapshot
//! then costs a copy of the indexes' pointers, not a re-translation of the cluster. Both sources use it:
//! the API-server watch applies each event, the file source applies whole files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::{
    workload_name, Service, ServicePort, State, TargetPort, Workload, DATAPLANE_MODE_LABEL,
    DNS_CAPTURE_ANNOTATION,
};
use crate::authz::Registry;
use crate::identity::SpiffeId;
use crate::k8s::core::{Pod, Service as ServiceObject};
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
}

/// A service as translated on arrival; endpoints are selected when its namespace changes.
#[derive(Debug)]
struct ServiceEntry {
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    selector: Option<BTreeMap<String, String>>,
}

/// Every object the daemon knows, translated, keyed by kind and `namespace/name`, and the
/// indexes a [`State`] is made of, kept up to date as objects come and go.
#[derive(Debug)]
pub struct Model {
    trust_domain: String,
    /// Namespace name -> labelled `istio.io/dataplane-mode=ambient`.
    namespaces: HashMap<String, bool>,
    /// Ordered, so a namespace's pods and services are a range.
    pods: BTreeMap<Key, PodEntry>,
    services: BTreeMap<Key, ServiceEntry>,
    authz_policies: BTreeMap<Key, AuthorizationPolicyObject>,
    peer_authentications: BTreeMap<Key, PeerAuthenticationObject>,

    /// Pod IP -> the pod holding it (the one applied last, when two claim it).
    ip_owner: HashMap<IpAddr, Key>,
    /// The snapshot's workloads by IP.
    workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The snapshot's services by `namespace/name`, and by VIP.
    resolved: BTreeMap<String, Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
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
            authz_policies: BTreeMap::new(),
            peer_authentications: BTreeMap::new(),
            ip_owner: HashMap::new(),
            workloads: HashMap::new(),
            resolved: BTreeMap::new(),
            by_vip: HashMap::new(),
            dirty: HashSet::new(),
            authz: None,
        }
    }

    /// Adds an object, or replaces the one of the same kind and `namespace/name`.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Namespace(n) => {
                let ambient = n
                    .metadata
                    .labels
                    .get(DATAPLANE_MODE_LABEL)
                    .map(String::as_str)
                    == Some("ambient");
                let name = n.metadata.name;
                if self.namespaces.insert(name.clone(), ambient) != Some(ambient) {
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
                self.authz_policies.insert(key(&p.metadata), p);
                self.authz = None;
            }
            Object::PeerAuthentication(p) => {
                self.peer_authentications.insert(key(&p.metadata), p);
                self.authz = None;
            }
            // Read by the waypoint; attachment to the state comes later.
            Object::Gateway(_) | Object::HttpRoute(_) => {}
        }
    }

    /// Removes the object of `kind` (as [`Object::kind`] names it) at `namespace/name`
    /// (`namespace` empty for namespaces). Unknown objects are ignored.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) {
        let k = (namespace.to_string(), name.to_string());
        match kind {
            "Namespace" if self.namespaces.remove(name) == Some(true) => self.reenroll(name),
            "Pod" => self.put_pod(k, None),
            "Service" if self.services.remove(&k).is_some() => {
                self.dirty.insert(k.0);
            }
            "AuthorizationPolicy" if self.authz_policies.remove(&k).is_some() => {
                self.authz = None;
            }
            "PeerAuthentication" if self.peer_authentications.remove(&k).is_some() => {
                self.authz = None;
            }
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
                    self.authz_policies.values().collect(),
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
            authz,
        }
    }

    /// Replaces (or with `None` removes) a pod, keeping the IP index and enrollment current.
    fn put_pod(&mut self, k: Key, entry: Option<PodEntry>) {
        self.dirty.insert(k.0.clone());
        let old = match entry {
            Some(mut e) => {
                let enrolled = self.namespaces.get(&k.0).copied().unwrap_or(false) && !e.opted_out;
                if let Some(w) = e.workload.as_mut() {
                    Arc::make_mut(w).enrolled = enrolled;
                    if let Some(prev) = self.ip_owner.insert(w.ip, k.clone()) {
                        if prev != k {
                            tracing::warn!(ip = %w.ip, pod = %format!("{}/{}", k.0, k.1), previous = %format!("{}/{}", prev.0, prev.1), "two running pods share an IP; the one applied last wins");
                        }
                    }
                    self.workloads.insert(w.ip, w.clone());
                }
                self.pods.insert(k.clone(), e)
            }
            None => self.pods.remove(&k),
        };
        let new_ip = self
            .pods
            .get(&k)
            .and_then(|e| e.workload.as_ref())
            .map(|w| w.ip);
        if let Some(old_ip) = old.and_then(|e| e.workload).map(|w| w.ip) {
            if Some(old_ip) != new_ip && self.ip_owner.get(&old_ip) == Some(&k) {
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
            .find_map(|(k, e)| e.workload.as_ref().filter(|w| w.ip == ip).map(|w| (k, w)));
        if let Some((k, w)) = heir {
            self.ip_owner.insert(ip, k.clone());
            self.workloads.insert(ip, w.clone());
            self.dirty.insert(k.0.clone());
        }
    }

    /// A namespace's enrollment label changed: its pods' `enrolled` follow.
    fn reenroll(&mut self, ns: &str) {
        let ambient = self.namespaces.get(ns).copied().unwrap_or(false);
        for (k, e) in namespace_range_mut(&mut self.pods, ns) {
            let enrolled = ambient && !e.opted_out;
            let Some(w) = e.workload.as_mut().filter(|w| w.enrolled != enrolled) else {
                continue;
            };
            Arc::make_mut(w).enrolled = enrolled;
            if self.ip_owner.get(&w.ip) == Some(k) {
                self.workloads.insert(w.ip, w.clone());
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
        let ready: Vec<&Arc<Workload>> = namespace_range(&self.pods, ns)
            .filter_map(|(k, e)| e.workload.as_ref().filter(|w| w.ready).map(|w| (k, w)))
            .filter(|(k, w)| self.ip_owner.get(&w.ip) == Some(*k))
            .map(|(_, w)| w)
            .collect();
        for ((_, name), s) in namespace_range(&self.services, ns) {
            let mut endpoints: Vec<Arc<Workload>> = match &s.selector {
                Some(sel) if !sel.is_empty() => ready
                    .iter()
                    .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .map(|w| (*w).clone())
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
                next: AtomicUsize::new(0),
            });
            for vip in &svc.vips {
                self.by_vip.insert(*vip, svc.clone());
            }
            self.resolved.insert(svc.key(), svc);
        }
    }

    fn translate_pod(&self, p: &Pod) -> PodEntry {
        let meta = &p.metadata;
        let opted_out = meta.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none");
        let (Some(ip), Some("Running")) = (p.status.pod_ip, p.status.phase.as_deref()) else {
            return PodEntry {
                workload: None,
                opted_out,
            };
        };
        if p.spec.host_network {
            return PodEntry {
                workload: None,
                opted_out,
            };
        }
        let ns = meta.namespace.clone().unwrap_or_default();
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
            labels: meta.labels.clone(),
            enrolled: false,
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
        PodEntry {
            workload: Some(Arc::new(w)),
            opted_out,
        }
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

fn namespace_range_mut<'a, V>(
    map: &'a mut BTreeMap<Key, V>,
    ns: &str,
) -> impl Iterator<Item = (&'a Key, &'a mut V)> {
    let ns = ns.to_string();
    map.range_mut((ns.clone(), String::new())..)
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
    ServiceEntry {
        vips,
        ports,
        selector: s.spec.selector.clone(),
    }
}

/// Compiles the policies, logging each dropped one (with object and field) and each caveat.
fn compile_policies(
    authz: Vec<&AuthorizationPolicyObject>,
    peer: Vec<&PeerAuthenticationObject>,
) -> Registry {
    let (reg, report) = Registry::build(authz, peer);
    for e in &report.errors {
        tracing::warn!(
            kind = e.kind,
            policy = %format!("{}/{}", e.namespace, e.name),
            field = %e.field,
            error = %e.message,
            "policy rejected"
        );
    }
    for (what, w) in &report.warnings {
        tracing::warn!(policy = %what, warning = %w, "policy applied with a caveat");
    }
    reg
}
