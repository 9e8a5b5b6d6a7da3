//! A Kubernetes API server as the cluster's state source ([`super::Cluster::start_kube`]).
//!
//! etcd and kube-apiserver run in the fabric namespace, on [`API_ADDRESS`] on the bridge, so
//! every node reaches them over its uplink as a real node reaches its control plane. The
//! cluster's objects are server-side applied as the state files are written, and each pod's
//! status (phase, IP, `Ready`) is then patched in, as a kubelet would. Daemons follow it with
//! `--source kube` and the `ztunnel` service account of `deploy/rbac/ztunnel.yaml`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::spec::{node_ip, ClusterSpec};
use super::{render_docs, run, Pod};
use crate::kube::{ApiServer, Options};

/// The API server's address on the fabric bridge.
pub const API_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 250);

/// The API server and the credentials the daemons use.
#[derive(Debug)]
pub struct ControlPlane {
    /// The running server.
    pub api: ApiServer,
    /// Kubeconfig of the `istio-system/ztunnel` service account.
    pub daemon_kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver in `fabric` and sets up the daemons' service account.
    pub fn start(fabric: &str) -> Result<ControlPlane> {
        let cidr = format!("{API_ADDRESS}/24");
        run(Command::new("ip").args(["-n", fabric, "addr", "add", &cidr, "dev", "br0"]))
            .context("an address for the API server on the fabric bridge")?;
        let api = ApiServer::start_with(Options {
            netns: Some(fabric.to_string()),
            address: IpAddr::V4(API_ADDRESS),
            ..Options::default()
        })?;
        api.ensure_namespace("istio-system")?;
        api.apply_path(&crate::kube::deploy_dir().join("rbac"))
            .context("applying deploy/rbac")?;
        let daemon_kubeconfig = api.service_account_kubeconfig("istio-system", "ztunnel")?;
        Ok(ControlPlane {
            api,
            daemon_kubeconfig,
        })
    }

    /// Server-side applies the spec's namespaces, pods and services (state files rendered as
    /// objects an API server accepts: no `uid`, no `status`), and, with `statuses`, patches
    /// every pod's status in.
    pub fn apply_spec(&self, spec: &ClusterSpec, statuses: bool) -> Result<()> {
        let mut docs = Vec::new();
        for (_, text) in spec.render_all()? {
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let mut v = Value::deserialize(doc).context("rendered state is YAML")?;
                if v.is_null() {
                    continue;
                }
                if let Some(o) = v.as_object_mut() {
                    o.remove("status");
                }
                if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("uid");
                }
                docs.push(v);
            }
        }
        if !docs.is_empty() {
            self.api.apply(&render_docs(docs)?)?;
        }
        if statuses {
            for (p, _, ip) in spec.placements() {
                self.set_pod_status(&p.namespace, &p.name, ip, p.node, true)?;
            }
        }
        Ok(())
    }

    /// Lets `pod` reach the API server as a pod reaches its control plane: a route from the
    /// pod through its node to [`API_ADDRESS`], and one back from the fabric to the pod's IP
    /// through its node. For pods that watch the API server themselves (a waypoint).
    pub fn route_pod(&self, fabric: &str, pod: &Pod) -> Result<()> {
        let api = format!("{API_ADDRESS}/32");
        run(Command::new("ip").args([
            "-n",
            &pod.netns,
            "route",
            "add",
            &api,
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ]))
        .with_context(|| format!("a route from pod {} to the API server", pod.key()))?;
        let back = format!("{}/32", pod.ip);
        let via = node_ip(pod.node).to_string();
        run(Command::new("ip").args(["-n", fabric, "route", "add", &back, "via", &via]))
            .with_context(|| format!("a route from the API server to pod {}", pod.key()))
            .map(drop)
    }

    /// Reports pod `namespace/name` running at `ip` on `node`, `Ready` or not.
    pub fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        node: usize,
        ready: bool,
    ) -> Result<()> {
        let ready = if ready { "True" } else { "False" };
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": node_ip(node).to_string(),
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": ready},
                {"type": "ContainersReady", "status": ready},
            ],
        }});
        self.api
            .patch_status("pods", namespace, name, &status)
            .map(drop)
            .with_context(|| format!("patching the status of pod {namespace}/{name}"))
    }
}
