//! The CA service (`ztunnel ca serve`) next to a real API server, with each node's daemon on
//! `--ca-address`: what the CA-service and fault tests set up alike.
//!
//! Each daemon's token is bound to a pod `istio-system/ztunnel-node<n>` scheduled on its node,
//! as a DaemonSet's projected token is, so the CA can tell which node asks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::app::SendOpts;
use crate::cluster::{in_netns, message, Cluster, ClusterSpec, PodSpec, API_ADDRESS};
use crate::testkit::{at, node_http, ok};

/// The CA service's port.
pub const CA_PORT: u16 = 15012;
/// How long the CA service's log is waited on.
pub const LOG_WAIT: Duration = Duration::from_secs(15);
/// Identity of pod `mesh/a` (node 1).
pub const CLIENT: &str = "spiffe://cluster.local/ns/mesh/sa/client";
/// Identity of pod `mesh/b` (node 2).
pub const SERVER: &str = "spiffe://cluster.local/ns/mesh/sa/server";

/// The CA service process, stopped on drop.
#[derive(Debug)]
pub struct CaService {
    dir: PathBuf,
    kubeconfig: PathBuf,
    fabric: String,
    log: PathBuf,
    child: Option<Child>,
}

impl CaService {
    /// Starts it and waits for `CA service ready`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "CA service already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("CA log file");
        let skip = self.lines().len();
        let listen = format!("{API_ADDRESS}:{CA_PORT}");
        let child = in_netns(&self.fabric, crate::ztunnel_bin())
            .args(["ca", "serve", "--ca-dir"])
            .arg(&self.dir)
            .args(["--listen", &listen, "--san", &API_ADDRESS.to_string()])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("ztunnel ca serve starts");
        self.child = Some(child);
        self.wait_for(skip, |l| message(l) == "CA service ready")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its JSON log lines so far.
    pub fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first log line after `skip` matching `pred`, waiting up to [`LOG_WAIT`].
    pub fn wait_for(&self, skip: usize, pred: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            if let Some(l) = self.lines().into_iter().skip(skip).find(|l| pred(l)) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("CA service log never matched; log:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        self.stop();
    }
}

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
        format!("https://{API_ADDRESS}:{CA_PORT}")
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
    let kubeconfig = api
        .service_account_kubeconfig("istio-system", "ztunnel-ca")
        .expect("the CA's service account (deploy/rbac/ztunnel-ca.yaml)");
    let mut ca = CaService {
        dir: ca_dir,
        kubeconfig,
        fabric: cluster.fabric_netns(),
        log: work.join("ca-service.log"),
        child: None,
    };
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
