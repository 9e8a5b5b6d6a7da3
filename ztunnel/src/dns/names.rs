//! Which mesh service a query name means, from the asking pod's point of view.
//!
//! Kubernetes names a service `name.ns.svc.<cluster-domain>`; a pod's resolver appends the
//! search suffixes of its resolv.conf to short names (`name`, `name.ns`, `name.ns.svc`). The
//! proxy therefore accepts, in this order:
//! 1. the FQDN `name.ns.svc.<cd>` itself;
//! 2. the query with one of the pod's search suffixes stripped, read as a relative name: `name`
//!    (the pod's namespace), `name.ns` or `name.ns.svc`. The search list is the one the pod's
//!    resolv.conf has: for `dnsPolicy` `ClusterFirst` (the default) `<ns>.svc.<cd>`,
//!    `svc.<cd>`, `<cd>` followed by `dnsConfig.searches`; for `None` and `Default` only
//!    `dnsConfig.searches` (the node's own search list is not known here);
//! 3. the query as a relative name (a resolver that sent the short name without suffix).
//!
//! A name that matches nothing is not ours and goes upstream, inside the cluster domain too:
//! the cluster's DNS also serves pod hostnames, SRV records and names the mesh has not seen
//! yet, and a search-list expansion it does not know comes back NXDOMAIN from there. Steps 2 and 3 answer only on a match, so an external
//! name such as `example.com` is never mistaken for service `example` in namespace `com` unless
//! that service exists.

use std::net::IpAddr;
use std::sync::Arc;

use crate::state::{Service, State, Workload};

/// What the mesh knows about a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A mesh service: its VIPs, or for a headless service its ready pods' IPs (may be empty
    /// for the asked family: NOERROR without answers).
    Known(Vec<IpAddr>),
    /// Not a mesh name: forward upstream.
    NotOurs,
}

/// Resolves `qname` (lowercase, without the trailing dot) for the pod `asker` (unknown source
/// addresses get FQDN matching only).
pub fn resolve(
    state: &State,
    cluster_domain: &str,
    asker: Option<&Workload>,
    qname: &str,
) -> Resolution {
    match find(state, cluster_domain, asker, qname) {
        Some(svc) => Resolution::Known(addresses(&svc)),
        None => Resolution::NotOurs,
    }
}

fn find(state: &State, cd: &str, asker: Option<&Workload>, qname: &str) -> Option<Arc<Service>> {
    let lookup = |name: &str, ns: &str| state.services.get(&format!("{ns}/{name}")).cloned();
    if let Some(prefix) = qname.strip_suffix(&format!(".svc.{cd}")) {
        if let Some((name, ns)) = prefix.split_once('.') {
            if !ns.contains('.') {
                if let Some(s) = lookup(name, ns) {
                    return Some(s);
                }
            }
        }
    }
    let asker = asker?;
    for suffix in search_list(asker, cd) {
        let Some(rel) = qname.strip_suffix(suffix.as_str()) else {
            continue;
        };
        let Some(rel) = rel.strip_suffix('.') else {
            continue;
        };
        if let Some(s) = relative(rel, &asker.namespace, &lookup) {
            return Some(s);
        }
    }
    relative(qname, &asker.namespace, &lookup)
}

/// `name`, `name.ns` or `name.ns.svc`.
fn relative(
    rel: &str,
    pod_ns: &str,
    lookup: &dyn Fn(&str, &str) -> Option<Arc<Service>>,
) -> Option<Arc<Service>> {
    let labels: Vec<&str> = rel.split('.').collect();
    match labels.as_slice() {
        [name] if !name.is_empty() => lookup(name, pod_ns),
        [name, ns] | [name, ns, "svc"] if !name.is_empty() && !ns.is_empty() => lookup(name, ns),
        _ => None,
    }
}

/// The pod's resolv.conf search list as Kubernetes writes it (see the module docs).
pub fn search_list(pod: &Workload, cd: &str) -> Vec<String> {
    let mut out = match pod.dns_policy.as_deref() {
        Some("None") | Some("Default") => Vec::new(),
        _ => vec![
            format!("{}.svc.{cd}", pod.namespace),
            format!("svc.{cd}"),
            cd.to_string(),
        ],
    };
    for s in &pod.dns_searches {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn addresses(svc: &Service) -> Vec<IpAddr> {
    if svc.vips.is_empty() {
        svc.endpoints
            .iter()
            .flat_map(|w| w.ips.iter().copied())
            .collect()
    } else {
        svc.vips.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s;
    use std::path::Path;

    const YAML: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: other}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: a}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: mesh, labels: {app: h}}, spec: {nodeName: n1, dnsPolicy: None, dnsConfig: {searches: [corp.example]}}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: web, namespace: mesh}, spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: db, namespace: other}, spec: {clusterIP: 10.96.0.2, ports: [{port: 5432}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: hl, namespace: mesh}, spec: {clusterIP: None, selector: {app: h}, ports: [{port: 80}]}}
"#;

    fn state() -> State {
        let objs = k8s::parse_file(Path::new("t.yaml"), YAML).expect("parses");
        State::build(1, "cluster.local", &objs)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn kubernetes_name_forms() {
        let s = state();
        let a = s.workload(ip("10.0.0.1")).cloned();
        let r = |q: &str| resolve(&s, "cluster.local", a.as_deref(), q);
        let web = Resolution::Known(vec![ip("10.96.0.1")]);
        assert_eq!(r("web"), web);
        assert_eq!(r("web.mesh"), web);
        assert_eq!(r("web.mesh.svc"), web);
        assert_eq!(r("web.mesh.svc.cluster.local"), web);
        assert_eq!(r("web.mesh.svc.cluster.local"), web);
        assert_eq!(
            r("web.mesh.mesh.svc.cluster.local"),
            web,
            "search suffix stripped"
        );
        assert_eq!(
            r("db.other.mesh.svc.cluster.local"),
            Resolution::Known(vec![ip("10.96.0.2")])
        );
        assert_eq!(r("db"), Resolution::NotOurs, "db is in another namespace");
        // Unknown names of the cluster domain are the cluster DNS's (pod hostnames, SRV).
        assert_eq!(r("db.mesh.svc.cluster.local"), Resolution::NotOurs);
        assert_eq!(r("nope.cluster.local"), Resolution::NotOurs);
        assert_eq!(r("example.com"), Resolution::NotOurs);
        assert_eq!(
            r("hl.mesh.svc.cluster.local"),
            Resolution::Known(vec![ip("10.0.0.2")]),
            "headless: pod IPs"
        );
        // Unknown asker: FQDN only.
        let u = |q: &str| resolve(&s, "cluster.local", None, q);
        assert_eq!(u("web.mesh.svc.cluster.local"), web);
        assert_eq!(u("web.mesh"), Resolution::NotOurs);
    }

    #[test]
    fn pod_search_list_is_used() {
        let s = state();
        let b = s.workload(ip("10.0.0.2")).cloned();
        let a = s.workload(ip("10.0.0.1")).cloned();
        assert_eq!(
            search_list(b.as_deref().expect("b"), "cluster.local"),
            ["corp.example"]
        );
        let web = Resolution::Known(vec![ip("10.96.0.1")]);
        assert_eq!(
            resolve(&s, "cluster.local", b.as_deref(), "web.corp.example"),
            web
        );
        assert_eq!(
            resolve(&s, "cluster.local", a.as_deref(), "web.corp.example"),
            Resolution::NotOurs
        );
    }
}
