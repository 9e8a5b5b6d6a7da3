//! The CA service (`ztunnel ca serve`) next to a real API server, with each node's daemon on
//! `--ca-address`: what the CA-service and fault tests set up alike.
//!
//! Each daemon's token is bound to a pod `istio-system/ztunnel-node<n>` scheduled on its node,
//! as a DaemonSet's projected token is, so the CA can tell which node asks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::app::SendOpts;
use crate::cluster::{in_netns, CaService, Cluster, ClusterSpec, PodSpec};
use crate::testkit::{at, node_http, ok};

/// How long the CA service's log is waited on.
pub const LOG_WAIT: Duration = Duration::from_secs(15);
/// Identity of pod `mesh/a` (node 1).
pub const CLIENT: &str = "spiffe://cluster.local/ns/mesh/sa/client";
/// Identity of pod `mesh/b` (node 2).
pub const SERVER: &str = "spiffe://cluster.local/ns/mesh/sa/server";

/// A cluster on a real API server, the CA service next to it, and each node's credentials.
#[derive(Debug)]
pub struct Setup {
    /// Two nodes, pod `mesh/a` (sa `client`) on node 1 and `mesh/b` (sa `server`) on node 2.
    pub cluster: Cluster,
    /// The CA service.
    pub ca: CaService,
    /// The root certificate the nodes were given.
    pub root_cert: PathBuf,
    /// Each node's token file.
    pub tokens: Vec<PathBuf>,
}

impl Setup {
    /// `https://<API address>:15012`.
    pub fn address() -> String {
        CaService::address()
    }

    /// The flags that put node `n`'s daemon on the CA service.
    pub fn daemon_flags(&self, n: usize, cert_ttl: &str) -> Vec<String> {
        vec![
            "--ca-address".into(),
            Self::address(),
            "--ca-root-cert".into(),
            path(&self.root_cert),
            "--ca-token-path".into(),
            path(&self.tokens[n - 1]),
            "--cert-ttl".into(),
            cert_ttl.into(),
        ]
    }

    /// `ztunnel ca request` in node `node`'s namespace with `token`, for `identity`.
    pub fn request(&self, node: usize, token: &Path, identity: &str) -> std::process::Output {
        let out = self.cluster.workdir().join("requested");
        std::fs::create_dir_all(&out).expect("output dir");
        in_netns(&self.cluster.node_netns(node), crate::ztunnel_bin())
            .args(["ca", "request", "--ca-address", &Self::address()])
            .arg("--ca-root-cert")
            .arg(&self.root_cert)
            .arg("--ca-token-path")
            .arg(token)
            .args(["--identity", identity, "--cert"])
            .arg(out.join("cert.pem"))
            .arg("--key")
            .arg(out.join("key.pem"))
            .output()
            .expect("ztunnel ca request runs")
    }
}

/// `p` as a UTF-8 string.
pub fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// The cluster, the CA service and both daemons on it, certificates living `cert_ttl`.
pub fn setup(cert_ttl: &str) -> Setup {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let cluster = Cluster::start_kube(spec).expect("cluster with an API server starts");
    let work = cluster.workdir().to_path_buf();

    // The CA's root: created by `ztunnel ca init` in the CA service's own directory. Nodes get
    // a copy of the certificate alone.
    let ca_dir = work.join("ca-service");
    let init = Command::new(crate::ztunnel_bin())
        .args(["ca", "init", "--ca-dir"])
        .arg(&ca_dir)
        .status()
        .expect("ztunnel ca init runs");
    assert!(init.success(), "ztunnel ca init");
    let trust = work.join("node-trust");
    std::fs::create_dir_all(&trust).expect("trust dir");
    let root_cert = trust.join("root-cert.pem");
    std::fs::copy(ca_dir.join("root-cert.pem"), &root_cert).expect("copy root certificate");

    let api = &cluster.kube().api;
    let mut ca = CaService::new(&cluster, ca_dir).expect("the CA service's set-up");
    ca.start();

    // One daemon pod per node, and a token bound to it, as a DaemonSet's projected token.
    let mut tokens = Vec::new();
    for n in 1..=2 {
        let pod = format!("ztunnel-node{n}");
        api.apply(&format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: istio-system
spec:
  serviceAccountName: ztunnel
  nodeName: node{n}
  containers:
  - name: ztunnel
    image: ztunnel
"
        ))
        .expect("daemon pod");
        let token = api
            .kubectl(&[
                "create",
                "token",
                "ztunnel",
                "-n",
                "istio-system",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                &pod,
                "--duration",
                "3600s",
            ])
            .expect("a token bound to the daemon pod");
        let file = trust.join(format!("node{n}-token"));
        std::fs::write(&file, token.trim()).expect("token file");
        tokens.push(file);
    }
    let mut setup = Setup {
        cluster,
        ca,
        root_cert,
        tokens,
    };
    for n in 1..=2 {
        let flags = setup.daemon_flags(n, cert_ttl);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        setup
            .cluster
            .start_daemon(n, &flags)
            .unwrap_or_else(|e| panic!("node{n} daemon on the CA service becomes ready: {e:#}"));
    }
    setup
}

/// Node `node`'s certificates as its config dump lists them (asserting it runs on the CA service).
pub fn certificates(c: &Cluster, node: usize) -> Vec<Value> {
    let (code, body) = node_http(c, node, 15000, "GET", "/config_dump").expect("admin answers");
    assert_eq!(code, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).expect("config dump is JSON");
    assert_eq!(
        dump["config"]["ca"]["kind"], "remote",
        "node{node} runs on the CA service: {}",
        dump["config"]["ca"]
    );
    dump["certificates"].as_array().cloned().unwrap_or_default()
}

/// The serial of node `node`'s issued certificate for `identity`.
pub fn issued_serial(c: &Cluster, node: usize, identity: &str) -> String {
    certificates(c, node)
        .iter()
        .find(|e| e["identity"] == identity && e["state"] == "issued")
        .and_then(|e| e["serial"].as_str())
        .unwrap_or_else(|| panic!("node{node} holds no certificate for {identity}"))
        .to_string()
}

/// 256 KiB from `mesh/a` to `mesh/b` across the nodes, intact.
pub fn cross_node_flow(c: &Cluster) {
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _server = b.serve(8080, "b").expect("serve b");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080)).bytes(256 * 1024))
            .expect("meshapp runs"),
        "a -> b through the daemons",
    );
}
