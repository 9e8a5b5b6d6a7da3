//! The `istio` path of `cargo xtask bench`: Istio's own ztunnel as the baseline the project's
//! aims are stated against, measured in the same run as the other paths. Opt-in: it runs only
//! when [`BIN_ENV`] names a ztunnel binary built from Istio's repository with its `testing`
//! feature (docs/BENCHMARKS.md, "Method", says how to build one).
//!
//! Istio's ztunnel runs here in its *dedicated* mode, one instance per pod inside the pod's
//! network namespace, as a sidecar would: workloads and identities from a static local config
//! (no control plane), each instance signing its own certificate with the built-in test root
//! (`FAKE_CA`), HBONE mTLS between the two on port 15008. The client pod's outbound connections
//! to the server's measured ports are redirected to the instance's outbound listener (15001)
//! by an iptables `REDIRECT` rule that exempts the proxy's own uid, the sidecar-style capture
//! Istio uses in this mode; the server side needs no capture (HBONE arrives on 15008 and the
//! instance connects to the application on the pod's own address).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Pod;
use serde_json::{json, Value};

/// The environment variable naming Istio's ztunnel binary; unset, the path is not measured.
pub const BIN_ENV: &str = "ISTIO_ZTUNNEL_BIN";
/// The uid the instances run as. Istio's sidecar proxies run as 1337 and their capture exempts
/// that uid, so the proxy's own upstream connections are not redirected back into it.
const PROXY_UID: u32 = 1337;
/// Istio ztunnel's fixed ports: outbound capture, Prometheus metrics, readiness.
const OUTBOUND_PORT: u16 = 15001;
const METRICS_PORT: u16 = 15020;
const READY_PORT: u16 = 15021;
/// Worker threads per instance: what Istio's ztunnel picks by itself on a host of up to 8
/// CPUs (a quarter of the CPUs, at least 2), and the concurrency the Envoy sidecars get; set
/// explicitly so the figure does not move with the host.
pub const WORKER_THREADS: u32 = 2;
/// The counter of connections an instance opened (outbound and inbound).
const OPENED_METRIC: &str = "istio_tcp_connections_opened_total";

/// The binary named by [`BIN_ENV`], `None` when the variable is unset. A name that is not a
/// file is an error, so a typo does not silently drop the path from the results.
pub fn binary() -> Result<Option<PathBuf>> {
    let Some(raw) = std::env::var_os(BIN_ENV) else {
        return Ok(None);
    };
    let bin = PathBuf::from(raw);
    if !bin.is_file() {
        bail!(
            "{BIN_ENV}={} is not a file: build Istio's ztunnel with \
             `cargo build --release --features testing` (docs/BENCHMARKS.md, \"Method\") and \
             point {BIN_ENV} at target/release/ztunnel, or unset it to skip the istio path",
            bin.display()
        );
    }
    Ok(Some(bin))
}

/// Installs what the path needs besides the binary: iptables (the capture), nftables (its
/// removal), curl (readiness and metrics) and util-linux (`setpriv`, to run as [`PROXY_UID`]).
pub fn prepare() -> Result<()> {
    crate::test::install_packages(&["iptables", "nftables", "curl", "util-linux"])
}

/// The name each node has in the local config (only recorded, nothing routes by it).
fn node_name(node: usize) -> String {
    format!("node{node}")
}

/// What the local config says of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// Node, 1-based.
    pub node: usize,
}

impl From<&Pod> for Workload {
    fn from(p: &Pod) -> Self {
        Workload {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            service_account: p.service_account.clone(),
            ip: p.ip,
            node: p.node,
        }
    }
}

/// The static local config every instance loads (JSON, which Istio's ztunnel reads as YAML):
/// one HBONE workload per pod, with its address, namespace and service account (its SPIFFE
/// identity in `cluster.local`), no services and no authorization policies (all allowed).
pub fn local_config(pods: &[Workload]) -> Value {
    let workloads: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({
                "uid": format!("Kubernetes//Pod/{}/{}", p.namespace, p.name),
                "name": p.name,
                "namespace": p.namespace,
                "serviceAccount": p.service_account,
                "trustDomain": "cluster.local",
                "workloadIps": [p.ip.to_string()],
                "protocol": "HBONE",
                "node": node_name(p.node),
                "services": {},
            })
        })
        .collect();
    json!({"workloads": workloads, "services": [], "policies": []})
}

/// The environment of `pod`'s instance (`config` is [`local_config`] rendered).
fn env(pod: &Workload, config: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PROXY_MODE", "dedicated".into()),
        (
            "PROXY_WORKLOAD_INFO",
            format!("{}/{}/{}", pod.namespace, pod.name, pod.service_account),
        ),
        ("LOCAL_XDS", config.into()),
        // No control plane: the local config is the whole state.
        ("XDS_ADDRESS", String::new()),
        ("FAKE_CA", "true".into()),
        ("CLUSTER_ID", "Kubernetes".into()),
        ("NODE_NAME", node_name(pod.node)),
        ("ZTUNNEL_WORKER_THREADS", WORKER_THREADS.to_string()),
        // Inbound connects to the application from the pod's own address: keeping the
        // client's would need the policy routing Istio installs for that, without which the
        // application's replies leave the pod.
        ("ENABLE_ORIG_SRC", "false".into()),
        // Pods have IPv4 addresses only.
        ("IPV6_ENABLED", "false".into()),
    ]
}

/// One running Istio ztunnel in a pod. Killed on drop.
pub struct Proxy {
    child: super::KillOnDrop,
    /// The ztunnel's pid (`ip netns exec` and `setpriv` exec it, so this is ztunnel itself).
    pub pid: u32,
}

/// Starts Istio's ztunnel `bin` in `pod` (config for all of `pods`, log under `workdir`) as
/// [`PROXY_UID`], and waits until it reports ready.
pub fn start(bin: &Path, workdir: &Path, pod: &Pod, pods: &[&Pod]) -> Result<Proxy> {
    let dir = workdir
        .join("istio-ztunnel")
        .join(format!("{}-{}", pod.namespace, pod.name));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let all: Vec<Workload> = pods.iter().map(|&p| p.into()).collect();
    let config = serde_json::to_string_pretty(&local_config(&all))?;
    // A copy for whoever reads the log; the instance gets it in its environment, so it needs
    // no access to the cluster's work directory.
    std::fs::write(dir.join("local-xds.yaml"), &config)?;
    let log = dir.join("ztunnel.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let uid = PROXY_UID.to_string();
    let mut cmd = pod.command("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(bin)
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .envs(env(&pod.into(), &config))
    .current_dir("/")
    .stdin(Stdio::null())
    .stdout(out.try_clone()?)
    .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting Istio's ztunnel in {}", pod.key()))?;
    let mut proxy = Proxy {
        pid: child.id(),
        child: super::KillOnDrop(child),
    };
    let ready = format!("http://127.0.0.1:{READY_PORT}/healthz/ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = pod.exec("curl", ["-sf", "-o", "/dev/null", "-m", "1", &ready])?;
        if probe.status.success() {
            return Ok(proxy);
        }
        if let Some(status) = proxy.child.0.try_wait()? {
            bail!(
                "Istio's ztunnel in {} exited ({status}); log {}:\n{}",
                pod.key(),
                log.display(),
                mesh_tests::tail_file(&log, 20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "Istio's ztunnel in {} was not ready within 30 s; log {}:\n{}",
                pod.key(),
                log.display(),
                mesh_tests::tail_file(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `iptables` rule (after `-A`) that sends `client`'s connections to `dst` on `ports`
/// into its instance's outbound listener, except the instance's own.
fn redirect_rule(dst: Ipv4Addr, ports: &[u16]) -> Vec<String> {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &dst.to_string(),
        "-m",
        "multiport",
        "--dports",
        &ports.join(","),
        "-m",
        "owner",
        "!",
        "--uid-owner",
        &PROXY_UID.to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        &OUTBOUND_PORT.to_string(),
    ]
    .map(String::from)
    .into()
}

/// The capture of one client pod while the path is up; removed on drop.
pub struct Capture {
    pod: Pod,
}

impl Capture {
    /// Redirects `pod`'s TCP connections to `dst` on `ports` to its instance. Only these
    /// ports, so the other paths' traffic from the same pod is never touched.
    pub fn install(pod: &Pod, dst: Ipv4Addr, ports: &[u16]) -> Result<Capture> {
        let mut args = vec!["-w".to_string(), "-t".into(), "nat".into(), "-A".into()];
        args.extend(redirect_rule(dst, ports));
        let out = pod.exec("iptables-nft", &args)?;
        if !out.status.success() {
            bail!(
                "iptables-nft in {} (apt install iptables): {}",
                pod.key(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Capture { pod: pod.clone() })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // The whole table goes, not just the rule: an empty NAT chain still keeps connection
        // tracking on for the pod, which the other paths must not pay for.
        if let Ok(out) = self.pod.exec("nft", ["delete", "table", "ip", "nat"]) {
            if !out.status.success() {
                eprintln!(
                    "bench: removing the istio capture in {}: {}",
                    self.pod.key(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
}

/// Connections `pod`'s instance has opened so far (its Prometheus counter, all label sets).
pub fn connections_opened(pod: &Pod) -> Result<f64> {
    let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
    let out = pod.exec("curl", ["-sf", "-m", "2", &url])?;
    if !out.status.success() {
        bail!("reading {url} in {}: curl {}", pod.key(), out.status);
    }
    Ok(sum_counter(
        &String::from_utf8_lossy(&out.stdout),
        OPENED_METRIC,
    ))
}

/// Sums every sample of counter `name` in a Prometheus text exposition.
fn sum_counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The istio path while it is up: an instance in every pod and the client pods' capture.
pub struct Mesh {
    /// Capture first, so it is removed before the instances stop.
    _captures: Vec<Capture>,
    /// The instances, in the order of [`Mesh::pids`].
    pub proxies: Vec<Proxy>,
}

impl Mesh {
    /// Pids of the instances, whose CPU and memory count.
    pub fn pids(&self) -> Vec<u32> {
        self.proxies.iter().map(|p| p.pid).collect()
    }
}

/// Brings the istio path up for `pairs` (client, server): an instance in each pod, the client
/// pods' outbound capture of the server's `ports`, and proof that it carries traffic: a
/// connection to the server's echo port `echo` must be counted by the client's instance and
/// reach the application from the server pod's own address (the server's instance).
pub fn bring_up(bin: &Path, workdir: &Path, pairs: &[(Pod, Pod)], ports: &[u16]) -> Result<Mesh> {
    let mut pods: Vec<&Pod> = pairs.iter().flat_map(|(c, s)| [c, s]).collect();
    pods.sort_by_key(|p| p.key());
    pods.dedup_by_key(|p| p.key());
    let proxies = pods
        .iter()
        .map(|p| start(bin, workdir, p, &pods))
        .collect::<Result<Vec<_>>>()?;
    let captures = pairs
        .iter()
        .map(|(c, s)| Capture::install(c, s.ip, ports))
        .collect::<Result<Vec<_>>>()?;
    let mesh = Mesh {
        _captures: captures,
        proxies,
    };
    let (c, s) = &pairs[0];
    let echo = ports.last().context("istio path without ports")?;
    let before = connections_opened(c)?;
    let report = c.send(&mesh_tests::app::SendOpts::to(&format!("{}:{echo}", s.ip)))?;
    report.check()?;
    let after = connections_opened(c)?;
    let peers = report.peer_ips();
    if after <= before || !peers.iter().all(|ip| *ip == std::net::IpAddr::V4(s.ip)) {
        bail!(
            "istio check: the transfer did not pass both instances ({OPENED_METRIC} in {} \
             {before} -> {after}; the server saw {peers:?}, not {})",
            c.key(),
            s.ip
        );
    }
    Ok(mesh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, sa: &str, ip: [u8; 4], node: usize) -> Workload {
        Workload {
            name: name.into(),
            namespace: "bench".into(),
            service_account: sa.into(),
            ip: Ipv4Addr::from(ip),
            node,
        }
    }

    #[test]
    fn local_config_has_one_hbone_workload_per_pod() {
        let (c, s) = (
            pod("client", "client", [10, 244, 1, 11], 1),
            pod("server", "server", [10, 244, 2, 11], 2),
        );
        let cfg = local_config(&[c, s.clone()]);
        let w = cfg["workloads"].as_array().expect("workloads");
        assert_eq!(w.len(), 2);
        assert_eq!(w[1]["workloadIps"], json!(["10.244.2.11"]));
        assert_eq!(w[1]["protocol"], "HBONE");
        assert_eq!(w[1]["serviceAccount"], "server");
        assert_eq!(w[1]["namespace"], "bench");
        assert_eq!(w[1]["trustDomain"], "cluster.local");
        assert_eq!(w[1]["node"], "node2");
        assert_eq!(w[1]["services"], json!({}));
        assert_eq!(cfg["policies"], json!([]));
        let e = env(&s, "{}");
        let get = |k: &str| e.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PROXY_MODE"), Some("dedicated"));
        assert_eq!(get("PROXY_WORKLOAD_INFO"), Some("bench/server/server"));
        assert_eq!(get("FAKE_CA"), Some("true"));
    }

    #[test]
    fn redirect_exempts_the_proxy_uid_and_names_only_the_measured_ports() {
        let r = redirect_rule(Ipv4Addr::new(10, 244, 2, 11), &[5204, 8083]).join(" ");
        assert_eq!(
            r,
            "OUTPUT -p tcp -d 10.244.2.11 -m multiport --dports 5204,8083 -m owner ! \
             --uid-owner 1337 -j REDIRECT --to-ports 15001"
        );
    }

    #[test]
    fn counter_sums_all_label_sets_and_skips_lookalikes() {
        let text = "# TYPE istio_tcp_connections_opened counter\n\
                    istio_tcp_connections_opened_total{reporter=\"source\"} 3\n\
                    istio_tcp_connections_opened_total{reporter=\"destination\"} 2\n\
                    istio_tcp_connections_opened_total_extra 9\n";
        assert_eq!(sum_counter(text, OPENED_METRIC), 5.0);
    }
}
