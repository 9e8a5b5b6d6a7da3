//! Acceptance tests of `ztunnel ca serve` with daemons on `--ca-address`: a real kube-apiserver
//! (TokenReview, bound service-account tokens, RBAC from deploy/rbac) and the CA service in
//! the fabric namespace next to it, where every node reaches it over its uplink. The daemons
//! hold only the root certificate and their own node's token; the root key stays with the
//! CA service.
//!
//! Each daemon's token is bound to a pod `istio-system/ztunnel-node<n>` scheduled on its node,
//! as a DaemonSet's projected token is, so the CA can tell which node asks.
//!
//! Needs root, a built `ztunnel`, etcd and kube-apiserver 1.20 (`cargo xtask test` provides
//! them). Every test name contains `kube`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{field, in_netns, message, CaService, Cluster, ClusterSpec, PodSpec};
use mesh_tests::testkit::{at, node_http, ok};
use serde_json::Value;

const LOG_WAIT: Duration = Duration::from_secs(15);
const CLIENT: &str = "spiffe://cluster.local/ns/mesh/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/mesh/sa/server";

/// A cluster on a real API server, the CA service next to it, and each node's credentials.
struct Setup {
    cluster: Cluster,
    ca: CaService,
    root_cert: PathBuf,
    tokens: Vec<PathBuf>,
}

impl Setup {
    fn address() -> String {
        CaService::address()
    }

    /// The flags that put node `n`'s daemon on the CA service.
    fn daemon_flags(&self, n: usize, cert_ttl: &str) -> Vec<String> {
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
    fn request(&self, node: usize, token: &Path, identity: &str) -> std::process::Output {
        let out = self.cluster.workdir().join("requested");
        std::fs::create_dir_all(&out).expect("output dir");
        in_netns(&self.cluster.node_netns(node), mesh_tests::ztunnel_bin())
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

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

fn setup(cert_ttl: &str) -> Setup {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let cluster = Cluster::start_kube(spec).expect("cluster with an API server starts");
    let work = cluster.workdir().to_path_buf();

    // The CA's root: created by `ztunnel ca init` in the CA service's own directory. Nodes get
    // a copy of the certificate alone.
    let ca_dir = work.join("ca-service");
    let init = Command::new(mesh_tests::ztunnel_bin())
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

fn certificates(c: &Cluster, node: usize) -> Vec<Value> {
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

fn issued_serial(c: &Cluster, node: usize, identity: &str) -> String {
    certificates(c, node)
        .iter()
        .find(|e| e["identity"] == identity && e["state"] == "issued")
        .and_then(|e| e["serial"].as_str())
        .unwrap_or_else(|| panic!("node{node} holds no certificate for {identity}"))
        .to_string()
}

fn cross_node_flow(c: &Cluster) {
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _server = b.serve(8080, "b").expect("serve b");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080)).bytes(256 * 1024))
            .expect("meshapp runs"),
        "a -> b through the daemons",
    );
}

#[test]
fn kube_ca_service_signs_only_for_pods_on_the_callers_node() {
    let s = setup("24h");
    let c = &s.cluster;

    // Both nodes hold their pod's certificate, signed by the CA service.
    issued_serial(c, 1, CLIENT);
    issued_serial(c, 2, SERVER);
    for (node, id) in [("node1", CLIENT), ("node2", SERVER)] {
        s.ca.wait_for(0, |l| {
            message(l) == "certificate request"
                && field(l, "decision") == "allow"
                && field(l, "caller") == "istio-system/ztunnel"
                && field(l, "node") == node
                && field(l, "requested") == id
        })
        .unwrap_or_else(|e| panic!("{node}'s request for {id} allowed: {e}"));
    }

    // A cross-node flow, both identities in the access logs.
    let skip = c.daemon(2).log_lines().len();
    cross_node_flow(c);
    let line = c
        .daemon(2)
        .wait_for_log_after(
            skip,
            |l| message(l) == "access" && field(l, "reporter") == "destination",
            LOG_WAIT,
        )
        .expect("node2 logs the inbound flow");
    assert_eq!(field(&line, "src_identity"), CLIENT, "{line}");
    assert_eq!(field(&line, "dst_identity"), SERVER, "{line}");

    // No node was given the root key: no --ca-dir, and nothing but the certificate and the
    // tokens in what the nodes were handed.
    for n in 1..=2 {
        let pid = c.daemon(n).pid().expect("daemon running");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains("--ca-dir"), "node{n}: {cmdline}");
        assert!(!cmdline.contains("ca-service"), "node{n}: {cmdline}");
    }
    let handed: Vec<String> = std::fs::read_dir(s.root_cert.parent().expect("dir"))
        .expect("trust dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        handed.iter().all(|f| !f.contains("key")),
        "node files: {handed:?}"
    );

    // node1's daemon asking for `server`, whose only pod runs on node2: PERMISSION_DENIED.
    let skip = s.ca.lines().len();
    let out = s.request(1, &s.tokens[0], SERVER);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    let denied =
        s.ca.wait_for(skip, |l| field(l, "decision") == "deny")
            .expect("the CA logs the refusal");
    assert_eq!(field(&denied, "caller"), "istio-system/ztunnel", "{denied}");
    assert_eq!(field(&denied, "node"), "node1", "{denied}");
    assert_eq!(field(&denied, "requested"), SERVER, "{denied}");
    // The same token for node1's own pod is fine.
    let out = s.request(1, &s.tokens[0], CLIENT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A token the API server rejects: UNAUTHENTICATED.
    let forged = c.workdir().join("forged-token");
    std::fs::write(&forged, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").expect("token file");
    let out = s.request(1, &forged, CLIENT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Unauthenticated"),
        "{stderr}"
    );
}

#[test]
fn kube_ca_service_restart_keeps_certificates_and_renewal_resumes() {
    // 70 s certificates (backdated a minute by the CA) are renewed about every 5 s.
    let mut s = setup("70s");
    let before: Vec<String> = vec![
        issued_serial(&s.cluster, 1, CLIENT),
        issued_serial(&s.cluster, 2, SERVER),
    ];

    s.ca.stop();
    let marks: Vec<usize> = (1..=2)
        .map(|n| s.cluster.daemon(n).log_lines().len())
        .collect();
    for (n, skip) in [(1, marks[0]), (2, marks[1])] {
        s.cluster
            .daemon(n)
            .wait_for_log_after(
                skip,
                |l| {
                    message(l).starts_with("certificate issuance failed")
                        && l["still_valid"] == true
                },
                LOG_WAIT,
            )
            .unwrap_or_else(|e| {
                panic!("node{n} keeps its certificate while the CA is down: {e:#}")
            });
    }
    // The certificates still serve while the CA is away.
    cross_node_flow(&s.cluster);
    let held = [
        issued_serial(&s.cluster, 1, CLIENT),
        issued_serial(&s.cluster, 2, SERVER),
    ];
    assert!(
        !held.iter().any(String::is_empty),
        "certificates kept: {held:?}"
    );

    let marks: Vec<usize> = (1..=2)
        .map(|n| s.cluster.daemon(n).log_lines().len())
        .collect();
    s.ca.start();
    for (n, skip) in [(1, marks[0]), (2, marks[1])] {
        s.cluster
            .daemon(n)
            .wait_for_log_after(
                skip,
                |l| message(l) == "workload certificate issued",
                Duration::from_secs(40),
            )
            .unwrap_or_else(|e| panic!("node{n} renews once the CA is back: {e:#}"));
    }
    let after = [
        issued_serial(&s.cluster, 1, CLIENT),
        issued_serial(&s.cluster, 2, SERVER),
    ];
    assert_ne!(after[0], before[0], "node1 renewed");
    assert_ne!(after[1], before[1], "node2 renewed");
    cross_node_flow(&s.cluster);
}
