//! What a test cluster contains, and its rendering as the Kubernetes YAML the daemons read.
//!
//! Addresses are a pure function of the spec (CONTRACTS.md: pod j on node i is
//! `10.244.<i>.<10+j>`), so a test can render a variant of the state (say, a different service
//! account for one pod) for a single node without touching the running cluster.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Label that enrolls a namespace (value `ambient`) or opts a pod out (value `none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// File names of the state the harness writes (one multi-document file per kind).
pub const NAMESPACES_FILE: &str = "namespaces.yaml";
/// See [`NAMESPACES_FILE`].
pub const PODS_FILE: &str = "pods.yaml";
/// See [`NAMESPACES_FILE`].
pub const SERVICES_FILE: &str = "services.yaml";

/// The whole cluster: node count and the Kubernetes objects.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    /// Number of nodes (1-based names `node1` ...).
    pub nodes: usize,
    /// Namespaces.
    pub namespaces: Vec<NsSpec>,
    /// Pods, placed in order: the j-th pod of node i gets `10.244.<i>.<10+j>`.
    pub pods: Vec<PodSpec>,
    /// Services.
    pub services: Vec<SvcSpec>,
    /// Pods whose network the CNI chain set up ([`super::Cluster::cni_add`]), with the
    /// address its IPAM gave, once published to the state.
    pub cni_pods: Vec<(PodSpec, Ipv4Addr)>,
    /// Dual stack: every pod, node and Service also has an IPv6 address (ULA prefixes,
    /// [`pod_ip6`], [`node_ip6`], [`vip6`]), routed like the IPv4 ones.
    pub dual_stack: bool,
}

/// A namespace and its labels.
#[derive(Debug, Clone)]
pub struct NsSpec {
    /// Name.
    pub name: String,
    /// Labels; `istio.io/dataplane-mode: ambient` enrolls the namespace.
    pub labels: BTreeMap<String, String>,
}

/// A pod.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Node, 1-based.
    pub node: usize,
    /// Service account (identity `spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub service_account: String,
    /// Labels (service selectors match these).
    pub labels: BTreeMap<String, String>,
    /// IPv6 only ([`PodSpec::ipv6_only`]; dual-stack clusters): the pod has its IPv6 address
    /// alone, and its IPv4 one ([`ClusterSpec::placements`]) is reserved but assigned nowhere.
    pub ipv6_only: bool,
}

/// A ClusterIP service.
#[derive(Debug, Clone)]
pub struct SvcSpec {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The VIP, from 10.96.0.0/16.
    pub cluster_ip: Ipv4Addr,
    /// Pod selector.
    pub selector: BTreeMap<String, String>,
    /// `(port, targetPort)` pairs, TCP.
    pub ports: Vec<(u16, u16)>,
    /// Labels (`istio.io/use-waypoint` attaches a waypoint).
    pub labels: BTreeMap<String, String>,
}

/// Splits `"ns/name"`.
pub fn split_key(key: &str) -> Result<(&str, &str)> {
    key.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .with_context(|| format!("`{key}` is not of the form namespace/name"))
}

impl ClusterSpec {
    /// An empty cluster of `nodes` nodes.
    pub fn new(nodes: usize) -> Self {
        ClusterSpec {
            nodes,
            ..Default::default()
        }
    }

    /// Gives pods, nodes and Services IPv6 addresses too (pods made [`PodSpec::ipv6_only`]
    /// have only theirs).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// A pod's IPv6 address in a dual-stack cluster, by `"ns/name"`.
    pub fn pod_ip6(&self, key: &str) -> Option<Ipv6Addr> {
        let (ns, name) = split_key(key).ok()?;
        let mut per_node = vec![0usize; self.nodes + 1];
        for p in &self.pods {
            let j = per_node.get_mut(p.node).map(|n| {
                *n += 1;
                *n
            })?;
            if p.namespace == ns && p.name == name {
                return self.dual_stack.then(|| pod_ip6(p.node, j));
            }
        }
        None
    }

    /// Adds a namespace, enrolled when `ambient`.
    pub fn namespace(mut self, name: &str, ambient: bool) -> Self {
        self.namespaces.push(NsSpec::new(name, ambient));
        self
    }

    /// Adds a pod.
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }

    /// Adds a service.
    pub fn service(mut self, svc: SvcSpec) -> Self {
        self.services.push(svc);
        self
    }

    /// Checks references and limits before anything is created.
    pub fn validate(&self) -> Result<()> {
        if !(1..=50).contains(&self.nodes) {
            bail!("a cluster needs 1..=50 nodes, not {}", self.nodes);
        }
        let has_ns = |ns: &str| self.namespaces.iter().any(|n| n.name == ns);
        for (i, pod) in self.pods.iter().enumerate() {
            if !(1..=self.nodes).contains(&pod.node) {
                bail!(
                    "pod {}/{}: node {} does not exist",
                    pod.namespace,
                    pod.name,
                    pod.node
                );
            }
            if !has_ns(&pod.namespace) {
                bail!(
                    "pod {}/{}: namespace not in the spec",
                    pod.namespace,
                    pod.name
                );
            }
            if pod.ipv6_only && !self.dual_stack {
                bail!(
                    "pod {}/{} is IPv6-only in a cluster without IPv6: add .dual_stack()",
                    pod.namespace,
                    pod.name
                );
            }
            let dup = self.pods[..i]
                .iter()
                .any(|p| p.name == pod.name && p.namespace == pod.namespace);
            if dup {
                bail!("pod {}/{} defined twice", pod.namespace, pod.name);
            }
        }
        for node in 1..=self.nodes {
            if self.pods.iter().filter(|p| p.node == node).count() > 200 {
                bail!("node {node}: more than 200 pods");
            }
        }
        for svc in &self.services {
            if !has_ns(&svc.namespace) {
                bail!(
                    "service {}/{}: namespace not in the spec",
                    svc.namespace,
                    svc.name
                );
            }
        }
        Ok(())
    }

    /// `(pod spec, 1-based index on its node, pod IP)` for every pod, in spec order. An
    /// IPv6-only pod's IPv4 address is reserved for it but assigned nowhere.
    pub fn placements(&self) -> Vec<(&PodSpec, usize, Ipv4Addr)> {
        let mut per_node = vec![0usize; self.nodes + 1];
        self.pods
            .iter()
            .map(|p| {
                let j = match per_node.get_mut(p.node) {
                    Some(n) => {
                        *n += 1;
                        *n
                    }
                    None => 0,
                };
                (p, j, pod_ip(p.node, j))
            })
            .collect()
    }

    /// The IPv4 address a pod gets, by `"ns/name"` (`None` for an IPv6-only pod).
    pub fn pod_ip(&self, key: &str) -> Option<Ipv4Addr> {
        let (ns, name) = split_key(key).ok()?;
        self.placements()
            .into_iter()
            .find(|(p, _, _)| p.namespace == ns && p.name == name)
            .filter(|(p, _, _)| !p.ipv6_only)
            .map(|(_, _, ip)| ip)
    }

    /// Mutable access to a pod spec by `"ns/name"` (to render variants).
    pub fn pod_mut(&mut self, key: &str) -> Option<&mut PodSpec> {
        let (ns, name) = split_key(key).ok()?;
        self.pods
            .iter_mut()
            .find(|p| p.namespace == ns && p.name == name)
    }

    /// The Namespace documents.
    pub fn render_namespaces(&self) -> Result<String> {
        let docs = self.namespaces.iter().map(|ns| {
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns.name, "labels": ns.labels},
            })
        });
        render_docs(docs)
    }

    /// The Pod documents, with `status.podIP` and `spec.nodeName` filled in as a kubelet would.
    pub fn render_pods(&self) -> Result<String> {
        let placed = self.placements().into_iter().map(|(p, j, ip)| {
            let v4 = (!p.ipv6_only).then_some(ip);
            let v6 = self.dual_stack.then(|| pod_ip6(p.node, j));
            (p, v4, v6)
        });
        // CNI pods: the address their IPAM gave (IPv4 only).
        let cni = self.cni_pods.iter().map(|(p, ip)| (p, Some(*ip), None));
        let docs = placed.chain(cni).map(|(p, v4, v6)| {
            let pod_ips: Vec<String> = v4
                .map(|a| a.to_string())
                .into_iter()
                .chain(v6.map(|a| a.to_string()))
                .collect();
            let primary = pod_ips.first().cloned().unwrap_or_default();
            let pod_ips: Vec<Value> = pod_ips.iter().map(|ip| json!({"ip": ip})).collect();
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": p.name,
                    "namespace": p.namespace,
                    "labels": p.labels,
                    "uid": format!("uid-{}-{}", p.namespace, p.name),
                },
                "spec": {
                    "nodeName": format!("node{}", p.node),
                    "serviceAccountName": p.service_account,
                    "containers": [{"name": "app", "image": "meshapp"}],
                },
                "status": {
                    "phase": "Running",
                    "hostIP": node_ip(p.node).to_string(),
                    "podIP": primary,
                    "podIPs": pod_ips,
                },
            })
        });
        render_docs(docs)
    }

    /// The Service documents.
    pub fn render_services(&self) -> Result<String> {
        let docs = self.services.iter().map(|s| {
            let ports: Vec<Value> = s
                .ports
                .iter()
                .map(|(port, target)| {
                    json!({"name": format!("tcp-{port}"), "port": port, "targetPort": target, "protocol": "TCP"})
                })
                .collect();
            let mut vips = vec![s.cluster_ip.to_string()];
            let mut families = vec!["IPv4"];
            if self.dual_stack {
                vips.push(vip6(s.cluster_ip).to_string());
                families.push("IPv6");
            }
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace, "labels": s.labels},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": s.cluster_ip.to_string(),
                    "clusterIPs": vips,
                    "ipFamilies": families,
                    "selector": s.selector,
                    "ports": ports,
                },
            })
        });
        render_docs(docs)
    }

    /// Every state file, as `(file name, contents)`.
    pub fn render_all(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            (NAMESPACES_FILE, self.render_namespaces()?),
            (PODS_FILE, self.render_pods()?),
            (SERVICES_FILE, self.render_services()?),
        ])
    }
}

/// Joins objects into one multi-document YAML text.
pub fn render_docs(docs: impl IntoIterator<Item = Value>) -> Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&doc).context("rendering YAML")?);
    }
    Ok(out)
}

/// Node i's address on the fabric.
pub fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 200, octet(node))
}

/// Pod j of node i.
pub fn pod_ip(node: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(node), octet(10 + j))
}

/// Node i's IPv6 address on the fabric (dual stack): `fd00:192:168:200::<i>`.
pub fn node_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x200, 0, 0, 0, u16::from(octet(node)))
}

/// Pod j of node i, IPv6 (dual stack): `fd00:10:244:<i>::<10+j>` (hex digits written as the
/// IPv4 address's decimal ones), in node i's `fd00:10:244:<i>::/64`.
pub fn pod_ip6(node: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, hexlike(node), 0, 0, 0, hexlike(10 + j))
}

/// Node i's pod prefix, IPv6 (dual stack): `fd00:10:244:<i>::/64`.
pub fn pod_net6(node: usize) -> String {
    format!(
        "{}/64",
        Ipv6Addr::new(0xfd00, 0x10, 0x244, hexlike(node), 0, 0, 0, 0)
    )
}

/// The IPv6 VIP of a Service whose IPv4 VIP is `10.96.x.y` (dual stack): `fd00:10:96::x:y`.
pub fn vip6(v4: Ipv4Addr) -> Ipv6Addr {
    let o = v4.octets();
    Ipv6Addr::new(
        0xfd00,
        0x10,
        0x96,
        0,
        0,
        0,
        hexlike(o[2].into()),
        hexlike(o[3].into()),
    )
}

/// `n` written in decimal, read as hexadecimal (12 -> 0x12), so IPv6 addresses echo the IPv4
/// ones.
fn hexlike(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).unwrap_or(u16::MAX)
}

fn octet(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

impl NsSpec {
    /// A namespace, enrolled when `ambient`.
    pub fn new(name: &str, ambient: bool) -> Self {
        let mut labels = BTreeMap::new();
        if ambient {
            labels.insert(DATAPLANE_MODE.to_string(), "ambient".to_string());
        }
        NsSpec {
            name: name.to_string(),
            labels,
        }
    }

    /// Whether the namespace label enrolls its pods.
    pub fn is_ambient(&self) -> bool {
        self.labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
    }
}

impl PodSpec {
    /// Pod `"ns/name"` on `node` (1-based), service account `default`, label `app: <name>`.
    ///
    /// Panics on a malformed key: that is a mistake in the test itself.
    pub fn new(key: &str, node: usize) -> Self {
        let (ns, name) = split_key(key).unwrap_or_else(|e| panic!("{e}"));
        PodSpec {
            name: name.to_string(),
            namespace: ns.to_string(),
            node,
            service_account: "default".to_string(),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            ipv6_only: false,
        }
    }

    /// Gives the pod its IPv6 address alone (a dual-stack cluster's nodes route it): no IPv4
    /// address, route or `podIPs` entry.
    pub fn ipv6_only(mut self) -> Self {
        self.ipv6_only = true;
        self
    }

    /// Sets the service account.
    pub fn sa(mut self, sa: &str) -> Self {
        self.service_account = sa.to_string();
        self
    }

    /// Adds or replaces a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }
}

impl SvcSpec {
    /// Service `"ns/name"` with VIP `cluster_ip`, no selector or ports yet.
    ///
    /// Panics on a malformed key or VIP: those are mistakes in the test itself.
    pub fn new(key: &str, cluster_ip: &str) -> Self {
        let (ns, name) = split_key(key).unwrap_or_else(|e| panic!("{e}"));
        let cluster_ip = cluster_ip
            .parse()
            .unwrap_or_else(|e| panic!("service {key}: bad VIP `{cluster_ip}`: {e}"));
        SvcSpec {
            name: name.to_string(),
            namespace: ns.to_string(),
            cluster_ip,
            selector: BTreeMap::new(),
            ports: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds or replaces a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds a selector term.
    pub fn select(mut self, key: &str, value: &str) -> Self {
        self.selector.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds a port mapping.
    pub fn port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push((port, target_port));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_yaml_follow_the_contract() {
        let spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .pod(PodSpec::new("demo/a", 1).sa("client"))
            .pod(PodSpec::new("demo/b", 2))
            .pod(PodSpec::new("demo/c", 1))
            .service(
                SvcSpec::new("demo/s", "10.96.0.10")
                    .select("app", "b")
                    .port(80, 8080),
            );
        spec.validate().expect("valid");
        assert_eq!(spec.pod_ip("demo/a"), Some(Ipv4Addr::new(10, 244, 1, 11)));
        assert_eq!(spec.pod_ip("demo/b"), Some(Ipv4Addr::new(10, 244, 2, 11)));
        assert_eq!(spec.pod_ip("demo/c"), Some(Ipv4Addr::new(10, 244, 1, 12)));
        let pods = spec.render_pods().expect("renders");
        let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&pods)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0]["spec"]["serviceAccountName"].as_str(),
            Some("client")
        );
        assert_eq!(docs[2]["status"]["podIP"].as_str(), Some("10.244.1.12"));
        assert_eq!(docs[1]["spec"]["nodeName"].as_str(), Some("node2"));
        let ns = spec.render_namespaces().expect("renders");
        assert!(ns.contains("istio.io/dataplane-mode: ambient"), "{ns}");
        let svc = spec.render_services().expect("renders");
        assert!(svc.contains("targetPort: 8080"), "{svc}");
        assert!(ClusterSpec::new(1)
            .pod(PodSpec::new("x/a", 1))
            .validate()
            .is_err());
        assert_eq!(spec.pod_ip6("demo/c"), None, "single stack");
        let dual = spec.dual_stack();
        assert_eq!(
            dual.pod_ip6("demo/c").map(|a| a.to_string()).as_deref(),
            Some("fd00:10:244:1::12")
        );
        let pods = dual.render_pods().expect("renders");
        assert!(pods.contains("ip: fd00:10:244:2::11"), "{pods}");
        let svc = dual.render_services().expect("renders");
        assert!(
            svc.contains("fd00:10:96::0:10") || svc.contains("fd00:10:96::10"),
            "{svc}"
        );
    }

    #[test]
    fn an_ipv6_only_pod_has_its_ipv6_address_alone() {
        let pod = || PodSpec::new("demo/v6", 1).ipv6_only();
        let single = ClusterSpec::new(1).namespace("demo", true).pod(pod());
        assert!(single.validate().is_err(), "needs a dual-stack cluster");
        let spec = single.dual_stack().pod(PodSpec::new("demo/both", 1));
        spec.validate().expect("valid");
        assert_eq!(spec.pod_ip("demo/v6"), None);
        assert_eq!(
            spec.pod_ip("demo/both"),
            Some(Ipv4Addr::new(10, 244, 1, 12)),
            "addresses of the pods after it do not move"
        );
        let pods = spec.render_pods().expect("renders");
        let doc: serde_yaml_ng::Value = serde_yaml_ng::Deserializer::from_str(&pods)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .next()
            .expect("one pod");
        let status = &doc["status"];
        assert_eq!(status["podIP"].as_str(), Some("fd00:10:244:1::11"));
        let ips: Vec<&str> = status["podIPs"]
            .as_sequence()
            .expect("podIPs")
            .iter()
            .filter_map(|v| v["ip"].as_str())
            .collect();
        assert_eq!(ips, ["fd00:10:244:1::11"]);
    }
}
