//! Core `v1` kinds: Namespace, Pod and Service, with the fields the data plane uses.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::{IntOrString, ObjectMeta};

/// `v1/Namespace`.
#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    /// Metadata; labels carry `istio.io/dataplane-mode`.
    pub metadata: ObjectMeta,
}

/// `v1/Pod`.
#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status; the pod IP lives here.
    #[serde(default)]
    pub status: PodStatus,
}

/// The parts of a pod spec the daemon needs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Node the pod runs on; a daemon captures and certifies only its own node's pods.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Service account: the identity's last path segment.
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Host-network pods share the node's address and are never captured.
    #[serde(default)]
    pub host_network: bool,
    /// Containers, for named target ports.
    #[serde(default)]
    pub containers: Vec<Container>,
    /// `ClusterFirst` (default), `ClusterFirstWithHostNet`, `Default` or `None`: decides the
    /// DNS search list the DNS proxy strips from the pod's queries.
    #[serde(default)]
    pub dns_policy: Option<String>,
    /// Extra DNS settings; `searches` are added to (or, with policy `None`, are) the search list.
    #[serde(default)]
    pub dns_config: Option<PodDnsConfig>,
}

/// `spec.dnsConfig` of a pod (only what the DNS proxy uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodDnsConfig {
    /// Search domains, in the pod's resolv.conf order.
    #[serde(default)]
    pub searches: Vec<String>,
}

/// A container, for its named ports.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Container {
    /// Declared ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// A declared container port.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port name, referenced by Service `targetPort`.
    #[serde(default)]
    pub name: Option<String>,
    /// Port number.
    pub container_port: u16,
}

/// The parts of pod status the daemon needs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Primary pod IP; a pod without one is not routable yet.
    #[serde(default, rename = "podIP", deserialize_with = "empty_as_none")]
    pub pod_ip: Option<IpAddr>,
    /// Every pod IP, at most one per family (dual stack); the first is `podIP`.
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// Phase; only `Running` pods receive traffic.
    #[serde(default)]
    pub phase: Option<String>,
    /// Conditions; `Ready` decides whether the pod receives Service traffic.
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
}

/// One entry of `status.podIPs`.
#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: IpAddr,
}

impl PodStatus {
    /// The pod's addresses: `podIP` first, then the other `podIPs` (a dual-stack pod has one
    /// of each family). Empty while the pod has none.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.pod_ip.into_iter().collect();
        for p in &self.pod_ips {
            if !ips.contains(&p.ip) {
                ips.push(p.ip);
            }
        }
        ips
    }

    /// Whether the pod's `Ready` condition allows Service traffic. A pod with no conditions
    /// at all (hand-written state files) counts as ready; a kubelet always writes them.
    pub fn ready(&self) -> bool {
        self.conditions.is_empty()
            || self
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    }
}

/// One entry of `status.conditions`.
#[derive(Debug, Clone, Deserialize)]
pub struct PodCondition {
    /// `Ready`, `ContainersReady`, `PodScheduled`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    #[serde(default)]
    pub status: String,
}

/// `v1/Service`.
#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// The parts of a service spec the daemon needs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Pod selector; a service without one has no endpoints here.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// Virtual IP, `None` for headless services.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All virtual IPs (dual stack).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// A service port.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name.
    #[serde(default)]
    pub name: Option<String>,
    /// Port on the virtual IP.
    pub port: u16,
    /// Port on the pods; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// Only TCP is proxied.
    #[serde(default)]
    pub protocol: Option<String>,
}

fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}
