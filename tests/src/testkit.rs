//! Small helpers the integration tests share, so each test file reads as the behaviour it
//! checks rather than as plumbing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::app::SendReport;
use crate::bpf::in_netns;
use crate::cluster::{field, message, Cluster, ClusterSpec, Daemon, Pod};

/// A cluster with every node's daemon started and ready.
pub fn start_with_daemons(spec: ClusterSpec) -> Cluster {
    let mut c = Cluster::start(spec).expect("cluster starts");
    c.start_all_daemons().expect("daemons become ready");
    c
}

/// `<pod ip>:<port>` (`[<ipv6>]:<port>` for an IPv6-only pod), the form `SendOpts::to`
/// takes.
pub fn at(pod: &Pod, port: u16) -> String {
    SocketAddr::new(pod.addr(), port).to_string()
}

/// The report, after asserting every connection in it carried its bytes intact.
pub fn ok(r: SendReport, what: &str) -> SendReport {
    if let Err(e) = r.check() {
        panic!("{what}: {e}");
    }
    r
}

/// The report, after asserting that every connection in it was refused (none echoed).
pub fn refused(r: SendReport, what: &str) -> SendReport {
    assert!(
        !r.success && r.conns.iter().all(|c| !c.ok),
        "{what}: expected the connection to be refused, got {r}"
    );
    r
}

/// Polls `cond` every 100 ms until it holds; fails the test after `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ztunnel_capture_dropped_packets_total{reason}` of node `node`'s daemon (0 when absent).
pub fn capture_drops(cluster: &Cluster, node: usize, reason: &str) -> u64 {
    let series = format!("ztunnel_capture_dropped_packets_total{{reason=\"{reason}\"}}");
    node_metric(cluster, node, &series).unwrap_or(0)
}

/// The value of `series` (a metric name with its labels, exactly as exposed) on node `node`'s
/// metrics port; `None` when the daemon does not expose it.
pub fn node_metric(cluster: &Cluster, node: usize, series: &str) -> Option<u64> {
    let (status, body) = node_http(cluster, node, 15020, "GET", "/metrics").expect("scrape");
    assert_eq!(status, 200, "metrics of node {node}");
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// One HTTP/1.1 request to `127.0.0.1:<port>` inside node `node`'s network namespace (the
/// daemon's admin, metrics and readiness ports): (status, body).
pub fn node_http(
    c: &Cluster,
    node: usize,
    port: u16,
    method: &str,
    path: &str,
) -> Result<(u16, String)> {
    let (method, path) = (method.to_string(), path.to_string());
    in_netns(&c.node_netns(node), move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        exchange(&mut tcp, &method, &path)
    })
}

/// `ztunnel <args>` (an operator command: `status`, `workloads`, ...) in node `node`'s
/// namespace against its admin socket; its stdout, after asserting it succeeded.
pub fn ztunnel_cli(c: &Cluster, node: usize, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.node_netns(node)])
        .arg(crate::ztunnel_bin())
        .args(args)
        .env("ZTUNNEL_ADMIN_SOCKET", c.admin_socket(node))
        .output()
        .expect("ztunnel runs");
    assert!(
        out.status.success(),
        "ztunnel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One HTTP/1.1 request on node `node`'s admin socket (every admin route, the ones that
/// change the daemon included): (status, body).
pub fn admin_socket_http(
    c: &Cluster,
    node: usize,
    method: &str,
    path: &str,
) -> Result<(u16, String)> {
    let socket = c.admin_socket(node);
    let mut unix = UnixStream::connect(&socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    unix.set_read_timeout(Some(Duration::from_secs(10)))?;
    exchange(&mut unix, method, path)
}

/// Writes one request (`connection: close`) and reads the response to EOF.
fn exchange<S: Read + Write>(s: &mut S, method: &str, path: &str) -> Result<(u16, String)> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_string()))
}

/// The `connection denied` line `d` logs after its first `skip` lines for a flow from `src`
/// (waits up to 10 s; fails the test without one).
pub fn denied_line(d: &Daemon, skip: usize, src: &Pod) -> serde_json::Value {
    d.wait_for_log_after(
        skip,
        |l| {
            message(l) == "connection denied"
                && field(l, "src_addr")
                    .parse::<SocketAddr>()
                    .map(|a| a.ip())
                    .ok()
                    == Some(src.addr())
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("waiting for `connection denied` from {}: {e:#}", src.key()))
}

/// Runs `promtool check metrics` on `text` and fails the test on any problem but the lines in
/// `tolerated` (exact lines of promtool's report, each to be justified by the caller).
pub fn promtool_check(text: &str, tolerated: &[&str]) {
    use std::process::{Command, Stdio};
    crate::require_tool("promtool", "prometheus").unwrap_or_else(|e| panic!("{e:#}"));
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .expect("writing to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !tolerated.contains(l))
        .collect();
    // Exit status 3 is promtool's "lint problems only"; anything else it exits 1 for.
    let only_lint = out.status.code() == Some(3) && !tolerated.is_empty();
    assert!(
        (out.status.success() || only_lint) && problems.is_empty(),
        "promtool check metrics: {:?}\n{report}\n--- metrics ---\n{text}",
        out.status
    );
}

/// An Istio security object (`AuthorizationPolicy`, `PeerAuthentication`) as one YAML document.
pub fn istio_policy(kind: &str, ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// Writes `yaml` as every node's `policies.yaml` state file and waits until each daemon applied
/// it; returns each node's `state applied` line.
pub fn apply_policies(cluster: &Cluster, yaml: &str) -> Vec<serde_json::Value> {
    let wait = Duration::from_secs(10);
    let skips: Vec<usize> = (1..=cluster.spec().nodes)
        .map(|n| cluster.daemon(n).log_lines().len())
        .collect();
    cluster
        .write_state_file("policies.yaml", yaml)
        .expect("policy file written");
    (1..=cluster.spec().nodes)
        .map(|n| {
            cluster
                .daemon(n)
                .wait_for_log_after(skips[n - 1], |l| message(l) == "state applied", wait)
                .unwrap_or_else(|e| panic!("waiting for `state applied` on node{n}: {e:#}"))
        })
        .collect()
}

/// The node-side veth of `pod`, from its node's route to it.
pub fn pod_veth(cluster: &Cluster, pod: &Pod) -> String {
    let (family, host) = match pod.addr() {
        std::net::IpAddr::V4(a) => ("-4", format!("{a}/32")),
        std::net::IpAddr::V6(a) => ("-6", format!("{a}/128")),
    };
    let route = cluster
        .node_exec(pod.node, "ip", &[family, "route", "show", &host])
        .expect("ip route");
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| panic!("no dev in {route:?}"))
        .to_string()
}
