//! Every path into an enrolled pod is checked (ebpf/README.md "Node-local path",
//! ARCHITECTURE.md "Data path decisions"):
//!
//! - a host-network process's connection to an enrolled pod of its node goes through the
//!   daemon's inbound plaintext path: refused under STRICT, access-logged otherwise, and
//!   subject to AuthorizationPolicy by the node's source address;
//! - without `--uplink` the daemon finds the node's uplink from the routes and captures there;
//! - a pod whose capture is not in place shows as not captured (status, config dump, metric)
//!   and keeps the daemon not ready until it is.
//!
//! Needs root and a built `ztunnel`; `cargo xtask test` provides both. Never skips.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::bpf::netns_programs;
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, Daemon, Pod, PodSpec};
use mesh_tests::testkit::{
    apply_policies as apply, at, eventually, istio_policy as policy, node_http, ok, pod_veth,
    refused, start_with_daemons, ztunnel_cli,
};
use serde_json::Value;

const ADMIN: u16 = 15000;
const METRICS: u16 = 15020;
const READINESS: u16 = 15021;
const WAIT: Duration = Duration::from_secs(15);

/// The first log line after `skip` with `msg` whose `src_addr` is `src`'s address and whose
/// `dst_addr` is `dst`'s.
fn flow_line(d: &Daemon, skip: usize, msg: &str, src: &Pod, dst: &Pod) -> Value {
    d.wait_for_log_after(
        skip,
        |l| {
            let ip = |f| field(l, f).parse::<SocketAddr>().map(|a| a.ip()).ok();
            message(l) == msg
                && ip("src_addr") == Some(src.ip.into())
                && ip("dst_addr") == Some(dst.ip.into())
        },
        WAIT,
    )
    .unwrap_or_else(|e| panic!("waiting for `{msg}` {} -> {}: {e:#}", src.key(), dst.key()))
}

fn config_dump(cluster: &Cluster, node: usize) -> Value {
    let (status, body) = node_http(cluster, node, ADMIN, "GET", "/config_dump").expect("dump");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config dump is JSON")
}

/// `ztunnel_capture_pods{state="<state>"}` of node `node`.
fn capture_pods(cluster: &Cluster, node: usize, state: &str) -> Option<u64> {
    let (_, body) = node_http(cluster, node, METRICS, "GET", "/metrics").expect("scrape");
    let prefix = format!("ztunnel_capture_pods{{state=\"{state}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn node_traffic_to_enrolled_pods_goes_through_the_inbound_path() {
    let spec = ClusterSpec::new(2)
        .namespace("strict", true)
        .namespace("mesh", true)
        .pod(PodSpec::new("strict/s", 1).sa("s"))
        .pod(PodSpec::new("mesh/p", 1).sa("p"))
        .pod(PodSpec::new("mesh/r", 2).sa("r"));
    let cluster = start_with_daemons(spec);
    let (s, p, r) = (
        cluster.pod("strict/s").clone(),
        cluster.pod("mesh/p").clone(),
        cluster.pod("mesh/r").clone(),
    );
    let host = cluster.host_network(1);
    let d1 = cluster.daemon(1);
    let _ss = s.serve(8080, "s").expect("serve s");
    let _sp = p.serve(8080, "p").expect("serve p");

    apply(
        &cluster,
        &policy(
            "PeerAuthentication",
            "strict",
            "mtls",
            "{mtls: {mode: STRICT}}",
        ),
    );

    // STRICT: the node's plaintext connection is refused by the daemon, with the reason.
    let skip = d1.log_lines().len();
    refused(
        host.send(&SendOpts::to(&at(&s, 8080)).timeout(10.0))
            .expect("runs"),
        "node -> STRICT pod",
    );
    let line = flow_line(d1, skip, "connection denied", &host, &s);
    assert_eq!(field(&line, "policy"), "strict/mtls", "{line}");

    // Not STRICT: served through the inbound plaintext path, access-logged with no identity;
    // the pod sees the node's address.
    let skip = d1.log_lines().len();
    let sent = ok(
        host.send(&SendOpts::to(&at(&p, 8080)).marker("NODE-TO-POD"))
            .expect("runs"),
        "node -> mesh pod",
    );
    assert_eq!(sent.servers(), ["p".to_string()].into(), "{sent}");
    assert_eq!(sent.peer_ips(), [host.ip.into()].into(), "{sent}");
    let line = flow_line(d1, skip, "access", &host, &p);
    assert_eq!(field(&line, "src_identity"), "", "{line}");
    assert_eq!(field(&line, "dst_workload"), "mesh/p", "{line}");

    // A DENY policy on the node's address refuses it.
    apply(
        &cluster,
        &format!(
            "{}{}",
            policy(
                "PeerAuthentication",
                "strict",
                "mtls",
                "{mtls: {mode: STRICT}}"
            ),
            policy(
                "AuthorizationPolicy",
                "mesh",
                "deny-node",
                "{action: DENY, rules: [{from: [{source: {ipBlocks: [169.254.1.1/32]}}]}]}",
            )
        ),
    );
    let skip = d1.log_lines().len();
    refused(
        host.send(&SendOpts::to(&at(&p, 8080)).timeout(10.0))
            .expect("runs"),
        "node -> mesh pod under a DENY of the node's address",
    );
    let line = flow_line(d1, skip, "connection denied", &host, &p);
    assert_eq!(field(&line, "policy"), "mesh/deny-node", "{line}");
    // Mesh traffic from the other node is not caught by that policy.
    ok(
        r.send(&SendOpts::to(&at(&p, 8080))).expect("runs"),
        "r -> p with the node denied",
    );

    // The daemon's own connections are untouched: its last hop into p comes from the
    // client's address and still works (above), and the programs on p's veth are one per
    // hook.
    let hooks: Vec<String> = netns_programs(&cluster.node_netns(1))
        .expect("programs")
        .into_iter()
        .filter(|a| a.hook.starts_with("tcx/"))
        .map(|a| {
            assert_eq!(a.prog_ids.len(), 1, "{a:?}");
            a.hook
        })
        .collect();
    assert!(hooks.contains(&"tcx/ingress lo".to_string()), "{hooks:?}");
    assert!(
        hooks
            .iter()
            .filter(|h| h.starts_with("tcx/egress veth"))
            .count()
            >= 2,
        "an egress program on each pod veth: {hooks:?}"
    );
}

/// Without `--uplink` (the harness gives none) the daemons find eth0 from their routes,
/// attach there, and traffic from the other node is captured on arrival.
#[test]
fn uplinks_are_discovered_from_the_routes() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("mesh/a", 1).sa("a"))
        .pod(PodSpec::new("legacy/l", 2));
    let cluster = start_with_daemons(spec);
    let (a, l) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("legacy/l").clone(),
    );
    for node in 1..=2 {
        let dump = config_dump(&cluster, node);
        assert_eq!(
            dump["capture"]["uplinks"],
            serde_json::json!(["eth0"]),
            "node{node}: {}",
            dump["capture"]
        );
        assert_eq!(dump["config"]["capture"]["uplinks"], serde_json::json!([]));
        let hooks: Vec<String> = netns_programs(&cluster.node_netns(node))
            .expect("programs")
            .into_iter()
            .map(|a| a.hook)
            .collect();
        assert!(
            hooks.contains(&"tcx/ingress eth0".to_string()),
            "node{node}: {hooks:?}"
        );
    }
    let status = ztunnel_cli(&cluster, 1, &["status"]);
    assert!(status.contains("capture uplinks: eth0"), "{status}");

    // A non-mesh pod on node 2 to a on node 1: node 2 does not capture it (neither end is
    // its enrolled pod), so only node 1's uplink program brings it to the daemon.
    let _sa = a.serve(8080, "a").expect("serve a");
    let skip = cluster.daemon(1).log_lines().len();
    ok(
        l.send(&SendOpts::to(&at(&a, 8080))).expect("runs"),
        "l -> a",
    );
    let line = flow_line(cluster.daemon(1), skip, "access", &l, &a);
    assert_eq!(field(&line, "src_identity"), "", "{line}");
    let uplink_attach = cluster
        .daemon(1)
        .log_lines()
        .into_iter()
        .any(|l| message(&l) == "capture attached" && field(&l, "iface") == "eth0");
    assert!(uplink_attach, "node1 attached to eth0 itself");
}

/// A pod whose node-side route is gone (its veth cannot be found) is not captured: it shows so
/// in `ztunnel status`, the config dump and `ztunnel_capture_pods`, and readiness answers 503
/// with the reason. Once the route is back the pod is captured and the daemon ready again.
#[test]
fn a_pod_without_capture_keeps_the_daemon_not_ready() {
    let spec = ClusterSpec::new(1)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1))
        .pod(PodSpec::new("mesh/b", 1));
    let cluster = start_with_daemons(spec);
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let ready = || node_http(&cluster, 1, READINESS, "GET", "/healthz/ready").expect("probe");
    assert_eq!(ready().0, 200);
    assert_eq!(capture_pods(&cluster, 1, "captured"), Some(2));
    assert_eq!(capture_pods(&cluster, 1, "not_captured"), Some(0));

    // Removing the route to a's veth hides the veth from the daemon.
    let veth = pod_veth(&cluster, &a);
    let ip_route = |verb: &str| {
        let host = format!("{}/32", a.ip);
        let o = cluster
            .node_exec(
                1,
                "ip",
                &["route", verb, &host, "dev", &veth, "scope", "link"],
            )
            .expect("ip runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ip_route("del");

    eventually(WAIT, "readiness 503 naming the pod", || {
        let (status, body) = ready();
        status == 503 && body.contains("mesh/a")
    });
    let (_, body) = ready();
    assert!(
        body.contains("no route") || body.contains("interface"),
        "{body}"
    );
    assert_eq!(capture_pods(&cluster, 1, "not_captured"), Some(1));
    assert_eq!(capture_pods(&cluster, 1, "captured"), Some(1));
    let dump = config_dump(&cluster, 1);
    assert_eq!(dump["ready"], false);
    let pods = dump["enrolled_pods"].as_array().expect("pods");
    let pod = |key: &str| {
        pods.iter()
            .find(|p| p["pod"] == key)
            .unwrap_or_else(|| panic!("{key} in {pods:?}"))
    };
    assert_eq!(pod("mesh/a")["captured"], false);
    assert!(pod("mesh/a")["capture_problem"].is_string(), "{pods:?}");
    assert_eq!(pod("mesh/b")["captured"], true);
    let status = ztunnel_cli(&cluster, 1, &["status"]);
    assert!(
        status.contains("ready: false (capture of pod mesh/a"),
        "{status}"
    );
    // Meanwhile b is served as before.
    let _sb = b.serve(8080, "b").expect("serve b");
    let host = cluster.host_network(1);
    ok(
        host.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "node -> b while a is not captured",
    );

    ip_route("add");
    eventually(WAIT, "ready again", || ready().0 == 200);
    assert_eq!(capture_pods(&cluster, 1, "not_captured"), Some(0));
    let dump = config_dump(&cluster, 1);
    assert_eq!(dump["ready"], true);
    let _sa = a.serve(8080, "a").expect("serve a");
    ok(
        b.send(&SendOpts::to(&at(&a, 8080))).expect("runs"),
        "b -> a once recaptured",
    );
}

/// `--exempt-node-traffic` is an opt-in: by default the node's connection to a STRICT pod is
/// refused; a daemon started with it removes the node-local path (also the links a previous
/// daemon pinned) and the node reaches the pod directly, past the daemon.
#[test]
fn exempt_node_traffic_is_opt_in() {
    let spec = ClusterSpec::new(1)
        .namespace("strict", true)
        .pod(PodSpec::new("strict/s", 1));
    let mut cluster = Cluster::start(spec).expect("cluster");
    cluster
        .write_state_file(
            "policies.yaml",
            &policy(
                "PeerAuthentication",
                "strict",
                "mtls",
                "{mtls: {mode: STRICT}}",
            ),
        )
        .expect("policy file");
    let s = cluster.pod("strict/s").clone();
    let host = cluster.host_network(1);
    let _ss = s.serve(8080, "s").expect("serve s");
    let node_local_hooks = |c: &Cluster| -> Vec<String> {
        netns_programs(&c.node_netns(1))
            .expect("programs")
            .into_iter()
            .map(|a| a.hook)
            .filter(|h| h.starts_with("tcx/egress") || h == "tcx/ingress lo")
            .collect()
    };

    cluster.start_daemon(1, &[]).expect("daemon ready");
    assert_eq!(node_local_hooks(&cluster).len(), 2, "lo and s's veth");
    refused(
        host.send(&SendOpts::to(&at(&s, 8080)).timeout(10.0))
            .expect("runs"),
        "by default",
    );
    let status = cluster.daemon(1).terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0));

    cluster
        .start_daemon(1, &["--exempt-node-traffic"])
        .expect("daemon ready");
    let left = node_local_hooks(&cluster);
    assert!(left.is_empty(), "node-local path removed: {left:?}");
    let skip = cluster.daemon(1).log_lines().len();
    let r = ok(
        host.send(&SendOpts::to(&at(&s, 8080))).expect("runs"),
        "exempt",
    );
    assert_eq!(r.peer_ips(), [host.ip.into()].into(), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    let through_daemon: Vec<Value> = cluster
        .daemon(1)
        .log_lines()
        .into_iter()
        .skip(skip)
        .filter(|l| field(l, "src_addr").starts_with("169.254.1.1:"))
        .collect();
    assert!(
        through_daemon.is_empty(),
        "exempt node traffic bypasses the daemon: {through_daemon:?}"
    );
}
