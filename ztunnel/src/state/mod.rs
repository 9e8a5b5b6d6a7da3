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
use crate::k8s::security::{AuthorizationPolicyObject, PeerAuthenticationObject};
use crate::k8s::{IntOrString, Object, ObjectMeta};

/// Namespace label that enrolls a namespace's pods, and pod label value that opts one out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Pod annotation: `"false"` keeps an enrolled pod's DNS out of the daemon's DNS proxy.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// A pod as the data plane sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Service account (default `default`).
    pub service_account: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// In the mesh: namespace labelled ambient, pod not opted out, not host-network. Enrolled
    /// workloads are reached over HBONE and their outbound traffic is captured.
    pub enrolled: bool,
    /// Named container ports, for services' named `targetPort`.
    pub named_ports: BTreeMap<String, u16>,
    /// SPIFFE identity.
    pub identity: SpiffeId,
    /// Workload name as Istio's telemetry reports it (the Deployment of a ReplicaSet-owned
    /// pod, else the owner, else the `app.kubernetes.io/name`/`app` label, else the pod name).
    pub workload_name: String,
    /// Whether the pod's DNS goes to the DNS proxy when enrolled (annotation
    /// [`DNS_CAPTURE_ANNOTATION`] not `"false"`).
    pub dns_capture: bool,
    /// `spec.dnsPolicy` (`None` here means the Kubernetes default, `ClusterFirst`).
    pub dns_policy: Option<String>,
    /// `spec.dnsConfig.searches`.
    pub dns_searches: Vec<String>,
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

    fn first_label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter()
            .find_map(|k| self.labels.get(*k))
            .map(String::as_str)
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
    /// Ready pods selected by the service.
    pub endpoints: Vec<Arc<Workload>>,
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
        let sp = self.ports.iter().find(|p| p.port == port)?;
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let w = &self.endpoints[(start + i) % n];
            let target = match &sp.target {
                TargetPort::Number(p) => *p,
                TargetPort::Named(name) => *w.named_ports.get(name)?,
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
    /// Valid AuthorizationPolicies and PeerAuthentications.
    pub authz: Arc<crate::authz::Registry>,
}

impl State {
    /// Builds a snapshot from objects. Later objects with the same identity replace earlier ones.
    pub fn build(generation: u64, trust_domain: &str, objects: &[Object]) -> State {
        let mut namespaces = HashMap::new();
        let mut pods = BTreeMap::new();
        let mut services = BTreeMap::new();
        let mut authz_policies = Vec::new();
        let mut peer_auths = Vec::new();
        for o in objects {
            match o {
                Object::Namespace(n) => {
                    let ambient = n
                        .metadata
                        .labels
                        .get(DATAPLANE_MODE_LABEL)
                        .map(String::as_str)
                        == Some("ambient");
                    namespaces.insert(n.metadata.name.clone(), ambient);
                }
                Object::Pod(p) => {
                    let ns = p.metadata.namespace.clone().unwrap_or_default();
                    pods.insert((ns, p.metadata.name.clone()), p);
                }
                Object::Service(s) => {
                    let ns = s.metadata.namespace.clone().unwrap_or_default();
                    services.insert((ns, s.metadata.name.clone()), s);
                }
                Object::AuthorizationPolicy(p) => authz_policies.push(p),
                Object::PeerAuthentication(p) => peer_auths.push(p),
            }
        }
        let authz = Arc::new(build_authz(authz_policies, peer_auths));

        let mut workloads = HashMap::new();
        for ((ns, name), p) in &pods {
            let (Some(ip), Some("Running")) = (p.status.pod_ip, p.status.phase.as_deref()) else {
                continue;
            };
            if p.spec.host_network {
                continue;
            }
            let opted_out = p
                .metadata
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .map(String::as_str)
                == Some("none");
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
                name: name.clone(),
                namespace: ns.clone(),
                identity: SpiffeId::new(trust_domain, ns, &service_account),
                service_account,
                node: p.spec.node_name.clone().unwrap_or_default(),
                ip,
                labels: p.metadata.labels.clone(),
                enrolled: namespaces.get(ns).copied().unwrap_or(false) && !opted_out,
                named_ports,
                workload_name: workload_name(&p.metadata),
                dns_capture: p
                    .metadata
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
            if let Some(prev) = workloads.insert(ip, Arc::new(w)) {
                tracing::warn!(ip = %ip, pod = %prev.key(), "two running pods share an IP; the later one wins");
            }
        }

        let mut by_key = BTreeMap::new();
        let mut by_vip = HashMap::new();
        for ((ns, name), s) in services {
            let mut endpoints: Vec<Arc<Workload>> = match &s.spec.selector {
                Some(sel) if !sel.is_empty() => workloads
                    .values()
                    .filter(|w| {
                        w.namespace == ns && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            };
            endpoints.sort_by_key(|w| w.ip);
            let vips: Vec<IpAddr> = s
                .spec
                .cluster_ip
                .iter()
                .chain(&s.spec.cluster_ips)
                .filter_map(|v| v.parse().ok())
                .fold(Vec::new(), |mut acc, ip| {
                    if !acc.contains(&ip) {
                        acc.push(ip);
                    }
                    acc
                });
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
            let svc = Arc::new(Service {
                name: name.clone(),
                namespace: ns.clone(),
                vips,
                ports,
                endpoints,
                next: AtomicUsize::new(0),
            });
            for vip in &svc.vips {
                by_vip.insert(*vip, svc.clone());
            }
            by_key.insert(svc.key(), svc);
        }
        State {
            generation,
            workloads,
            services: by_key,
            by_vip,
            authz,
        }
    }

    /// The service owning virtual IP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The first service (by `namespace/name`) whose endpoints include the pod at `ip`; what
    /// telemetry reports as the destination service of a flow addressed to a pod directly.
    pub fn service_of(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services
            .values()
            .find(|s| s.endpoints.iter().any(|w| w.ip == ip))
    }

    /// The workload with pod IP `ip`.
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    /// Resolves an original destination: a service VIP picks an endpoint and maps the port to
    /// the target port; a pod IP is that pod; anything else is outside the mesh.
    pub fn resolve(&self, dst: SocketAddr) -> Result<Destination, ResolveError> {
        if let Some(svc) = self.by_vip.get(&dst.ip()) {
            return svc
                .pick(dst.port())
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

    /// Pods scheduled on `node`, sorted by IP: what capture and certificates are about.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        let mut v: Vec<_> = self.workloads.values().filter(|w| w.node == node).collect();
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

/// Compiles the policies, logging each dropped one (with object and field) and each caveat.
/// Later objects with the same `namespace/name` replace earlier ones, as for other kinds.
fn build_authz(
    authz: Vec<&AuthorizationPolicyObject>,
    peer: Vec<&PeerAuthenticationObject>,
) -> crate::authz::Registry {
    fn dedup<T>(v: Vec<&T>, meta: impl Fn(&T) -> &ObjectMeta) -> Vec<&T> {
        let mut by_key = BTreeMap::new();
        for o in v {
            let m = meta(o);
            by_key.insert((m.namespace.clone(), m.name.clone()), o);
        }
        by_key.into_values().collect()
    }
    let (reg, report) =
        crate::authz::Registry::build(dedup(authz, |o| &o.metadata), dedup(peer, |o| &o.metadata));
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
}
