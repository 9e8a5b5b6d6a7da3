//! The mutable side of the state: Kubernetes objects applied and deleted one at a time, and
//! [`State`] snapshots taken from them.
//!
//! Each object is translated once, when it arrives (a pod into its [`Workload`], a service
//! into its VIPs and ports, policies compiled only when a policy changed), so a snapshot after
//! one change costs an index pass, not a re-translation of the cluster. Both sources use it:
//! the API-server watch applies each event, the file source applies whole files.

use std::collections::{BTreeMap, HashMap};
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

/// A pod as translated on arrival. `enrolled` is decided at snapshot time, since it also
/// depends on the pod's namespace.
#[derive(Debug)]
struct PodEntry {
    /// `None` while the pod has no IP, is not running, or uses the host network.
    workload: Option<Arc<Workload>>,
    /// Labelled `istio.io/dataplane-mode=none`.
    opted_out: bool,
}

/// A service as translated on arrival; endpoints are selected at snapshot time.
#[derive(Debug)]
struct ServiceEntry {
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    selector: Option<BTreeMap<String, String>>,
}

/// Every object the daemon knows, translated, keyed by kind and `namespace/name`.
#[derive(Debug)]
pub struct Model {
    trust_domain: String,
    /// Namespace name -> labelled `istio.io/dataplane-mode=ambient`.
    namespaces: HashMap<String, bool>,
    pods: HashMap<Key, PodEntry>,
    services: BTreeMap<Key, ServiceEntry>,
    authz_policies: BTreeMap<Key, AuthorizationPolicyObject>,
    peer_authentications: BTreeMap<Key, PeerAuthenticationObject>,
    /// Compiled policies; `None` after a policy changed, until the next snapshot.
    authz: Option<Arc<Registry>>,
}

impl Model {
    /// An empty model for identities in `trust_domain`.
    pub fn new(trust_domain: &str) -> Model {
        Model {
            trust_domain: trust_domain.to_string(),
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            services: BTreeMap::new(),
            authz_policies: BTreeMap::new(),
            peer_authentications: BTreeMap::new(),
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
                self.namespaces.insert(n.metadata.name, ambient);
            }
            Object::Pod(p) => {
                let entry = self.translate_pod(&p);
                self.pods.insert(key(&p.metadata), entry);
            }
            Object::Service(s) => {
                self.services
                    .insert(key(&s.metadata), translate_service(&s));
            }
            Object::AuthorizationPolicy(p) => {
                self.authz_policies.insert(key(&p.metadata), p);
                self.authz = None;
            }
            Object::PeerAuthentication(p) => {
                self.peer_authentications.insert(key(&p.metadata), p);
                self.authz = None;
            }
        }
    }

    /// Removes the object of `kind` (as [`Object::kind`] names it) at `namespace/name`
    /// (`namespace` empty for namespaces). Unknown objects are ignored.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) {
        let k = (namespace.to_string(), name.to_string());
        match kind {
            "Namespace" => {
                self.namespaces.remove(name);
            }
            "Pod" => {
                self.pods.remove(&k);
            }
            "Service" => {
                self.services.remove(&k);
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

    /// Removes every object (a full re-list replaces what was known).
    pub fn clear(&mut self) {
        *self = Model::new(&self.trust_domain);
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

    /// An immutable snapshot of the current objects.
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

        let mut workloads: HashMap<IpAddr, Arc<Workload>> = HashMap::with_capacity(self.pods.len());
        // Ordered by pod key, so which of two pods sharing an IP wins does not depend on
        // hashing.
        let mut pods: Vec<(&Key, &mut PodEntry)> = self.pods.iter_mut().collect();
        pods.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for ((ns, _), entry) in pods {
            let Some(w) = entry.workload.as_mut() else {
                continue;
            };
            let enrolled = self.namespaces.get(ns).copied().unwrap_or(false) && !entry.opted_out;
            if w.enrolled != enrolled {
                Arc::make_mut(w).enrolled = enrolled;
            }
            if let Some(prev) = workloads.insert(w.ip, w.clone()) {
                tracing::warn!(ip = %w.ip, pod = %prev.key(), "two running pods share an IP; the later one wins");
            }
        }

        // Endpoints are selected among the pods of the service's own namespace only.
        let mut by_namespace: HashMap<&str, Vec<&Arc<Workload>>> = HashMap::new();
        for w in workloads.values().filter(|w| w.ready) {
            by_namespace
                .entry(w.namespace.as_str())
                .or_default()
                .push(w);
        }
        let mut services = BTreeMap::new();
        let mut by_vip = HashMap::new();
        for ((ns, name), s) in &self.services {
            let mut endpoints: Vec<Arc<Workload>> = match &s.selector {
                Some(sel) if !sel.is_empty() => by_namespace
                    .get(ns.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .map(|w| (*w).clone())
                    .collect(),
                _ => Vec::new(),
            };
            endpoints.sort_by_key(|w| w.ip);
            let svc = Arc::new(Service {
                name: name.clone(),
                namespace: ns.clone(),
                vips: s.vips.clone(),
                ports: s.ports.clone(),
                endpoints,
                next: AtomicUsize::new(0),
            });
            for vip in &svc.vips {
                by_vip.insert(*vip, svc.clone());
            }
            services.insert(svc.key(), svc);
        }
        State {
            generation,
            workloads,
            services,
            by_vip,
            authz,
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
