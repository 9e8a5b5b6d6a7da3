//! Dual stack: the core behaviour over IPv6 on a cluster whose pods, nodes and Services have
//! IPv4 and IPv6 addresses (ULA prefixes, static routes, no default route): bytes intact
//! across nodes to a pod's and a Service's IPv6 address, only TLS on port 15008 on the
//! fabric, the client's identity and IPv6 address at the destination, an AuthorizationPolicy
//! with an IPv6 `ipBlocks`, and DNS AAAA answers (over IPv4 and over IPv6). TCP behind an
//! IPv6 extension header is dropped and counted, never passed around the daemon. The node's
//! own IPv6 connections to a local pod go through the daemon's inbound path. Pods with an
//! IPv6 address alone (no IPv4 one) are captured like the others: their node-side interface
//! comes from the node's IPv6 route to them.
//!
//! Needs root, `tcpdump` and `dig`; `cargo xtask test -p mesh-tests --test dual_stack`.
//! Without them the tests fail, they never skip.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{field, message, vip6, Cluster, ClusterSpec, Pod, PodSpec, SvcSpec};
use mesh_tests::pcap::{Pcap, TCP};
use mesh_tests::testkit::{
    apply_policies, at, capture_drops, denied_line, eventually, istio_policy, node_http,
    node_metric, ok, pod_veth, refused, start_with_daemons,
};
use serde_json::Value;

const HBONE: u16 = 15008;
const LOG_WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1024 * 1024;
const VIP: &str = "10.96.0.10";

/// Client `a` and `c` (another service account) on node 1, server `b` on node 2 behind
/// Service `srv` (IPv4 and IPv6 VIPs).
fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .dual_stack()
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/c", 1).sa("intruder"))
        .pod(PodSpec::new("mesh/b", 2).sa("server").label("app", "b"))
        .service(
            SvcSpec::new("mesh/srv", VIP)
                .select("app", "b")
                .port(80, 8080),
        )
}

fn ip6(pod: &Pod) -> Ipv6Addr {
    pod.ip6
        .unwrap_or_else(|| panic!("{} has no IPv6 address", pod.key()))
}

/// `[v6]:port`, the form `SendOpts::to` takes.
fn at6(ip: Ipv6Addr, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

fn vip6_of() -> Ipv6Addr {
    vip6(VIP.parse().expect("vip"))
}

fn addr_ip(l: &Value, key: &str) -> Option<IpAddr> {
    field(l, key).parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// The fabric carried IPv6 TCP on port 15008 only (a captured flow is tunnelled), at least
/// `flows` x 1 MiB of payload in it, and never `marker` in clear.
fn assert_ipv6_hbone_only(pcap: &Pcap, flows: u64, marker: &str) {
    let stray: Vec<String> = pcap
        .packets6
        .iter()
        .filter(|p| p.proto == TCP && !p.has_port(HBONE))
        .map(|p| format!("[{}]:{} -> [{}]:{}", p.src, p.sport, p.dst, p.dport))
        .collect();
    assert!(
        stray.is_empty(),
        "IPv6 TCP on the fabric outside port 15008 (a flow bypassed the mesh): {:?}",
        &stray[..stray.len().min(10)]
    );
    let hbone = pcap.payload_bytes6_on_port(HBONE) as u64;
    assert!(
        hbone >= flows * MIB,
        "expected {flows} x 1 MiB echoed inside IPv6 port 15008, saw {hbone} B"
    );
    assert!(
        !pcap.contains(marker.as_bytes()),
        "marker crossed the fabric in clear"
    );
}

/// From `pod`, a TCP connection to `[dst]:port` whose packets all carry a destination-options
/// extension header (`IPV6_DSTOPTS`, one PadN option); sends `marker` if it connects. Returns
/// what the script printed: `connected` or `failed <error>`.
fn dstopts_connect(pod: &Pod, dst: Ipv6Addr, port: u16, marker: &str) -> String {
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0,0,1,4,0,0,0,0]))\n\
         s.settimeout(3)\n\
         try:\n s.connect(('{dst}',{port})); s.sendall(b'{marker}'); print('connected'); sys.exit(0)\n\
         except Exception as e:\n print('failed', e); sys.exit(1)\n"
    );
    let o = pod
        .exec("python3", ["-c", script.as_str()])
        .expect("python3 runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

#[test]
fn ipv6_flows_cross_nodes_in_tls_with_identity_and_source_kept() {
    let cluster = start_with_daemons(spec());
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    let marker = format!("ZT6SECRET-{}", cluster.prefix());
    let capture = cluster.capture_fabric("ip6").expect("capture");

    for (to, what) in [
        (at6(ip6(&b), 8080), "a -> b over IPv6"),
        (at6(vip6_of(), 80), "a -> the Service's IPv6 VIP"),
    ] {
        let r = ok(
            a.send(&SendOpts::to(&to).bytes(MIB).marker(&marker))
                .expect("runs"),
            what,
        );
        assert_eq!(r.servers(), ["b".to_string()].into(), "{what}: {r}");
        assert_eq!(
            r.peer_ips(),
            [IpAddr::from(ip6(&a))].into(),
            "{what}: the server sees the client's IPv6 address: {r}"
        );
    }
    // The IPv4 path is untouched by the IPv6 one.
    ok(
        a.send(&SendOpts::to(&format!("{VIP}:80")).bytes(4096))
            .expect("runs"),
        "a -> the Service's IPv4 VIP",
    );
    // TCP behind an IPv6 extension header (a destination-options header the kernel adds to
    // every packet of this socket) would pass by the capture program, which reads only TCP
    // right after the fixed header: it is dropped and counted instead, and nothing of it
    // reaches the fabric (checked with the rest of the capture below).
    let ext_before = capture_drops(&cluster, 1, "ipv6_extension_header");
    let said = dstopts_connect(&a, ip6(&b), 8080, &marker);
    assert!(
        said.starts_with("failed"),
        "TCP behind a destination-options header got through: {said}"
    );
    eventually(LOG_WAIT, "the extension-header SYNs counted", || {
        capture_drops(&cluster, 1, "ipv6_extension_header") > ext_before
    });

    let pcap = capture.stop().expect("capture stops");
    assert_ipv6_hbone_only(&pcap, 2, &marker);
    let between = pcap
        .packets6
        .iter()
        .filter(|p| p.proto == TCP)
        .all(|p| [p.src, p.dst] == [ip6(&a), ip6(&b)] || [p.src, p.dst] == [ip6(&b), ip6(&a)]);
    assert!(
        between,
        "the tunnel runs between the pods' own IPv6 addresses"
    );

    let dst = cluster
        .daemon(2)
        .wait_for_log(
            |l| {
                message(l) == "access"
                    && field(l, "reporter") == "destination"
                    && addr_ip(l, "src_addr") == Some(ip6(&a).into())
            },
            LOG_WAIT,
        )
        .expect("node2 logs the inbound IPv6 connection");
    assert_eq!(field(&dst, "src_identity"), a.identity(), "{dst}");
    assert_eq!(field(&dst, "dst_identity"), b.identity(), "{dst}");
    assert_eq!(field(&dst, "protocol"), "HBONE", "{dst}");
    assert_eq!(field(&dst, "src_workload"), "mesh/a", "{dst}");
    assert_eq!(addr_ip(&dst, "dst_addr"), Some(ip6(&b).into()), "{dst}");

    // The node's own IPv6 connection to a local enrolled pod takes the inbound plaintext path
    // like its IPv4 one: served, and access-logged without an identity.
    let _sa = a.serve(8080, "a").expect("serve a");
    let host = cluster.host_network(1);
    let skip = cluster.daemon(1).log_lines().len();
    let sent = ok(
        host.send(&SendOpts::to(&at6(ip6(&a), 8080))).expect("runs"),
        "node -> a over IPv6",
    );
    assert_eq!(sent.servers(), ["a".to_string()].into(), "{sent}");
    let line = cluster
        .daemon(1)
        .wait_for_log_after(
            skip,
            |l| {
                message(l) == "access"
                    && field(l, "dst_workload") == "mesh/a"
                    && addr_ip(l, "src_addr").is_some_and(|ip| ip.is_ipv6())
            },
            LOG_WAIT,
        )
        .expect("node1 logs the node's IPv6 connection to a");
    assert_eq!(field(&line, "src_identity"), "", "{line}");
}

#[test]
fn ipv6_ip_block_admits_one_client_and_401s_another() {
    let cluster = start_with_daemons(spec());
    let (a, b, c) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b").clone(),
        cluster.pod("mesh/c").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    let policy = format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: from-a, namespace: mesh}}\nspec: {{selector: {{matchLabels: {{app: b}}}}, action: ALLOW, rules: [{{from: [{{source: {{ipBlocks: [\"{}/128\"]}}}}]}}]}}\n",
        ip6(&a)
    );
    let skips: Vec<usize> = (1..=2)
        .map(|n| cluster.daemon(n).log_lines().len())
        .collect();
    cluster
        .write_state_file("policies.yaml", &policy)
        .expect("policy written");
    for n in 1..=2 {
        cluster
            .daemon(n)
            .wait_for_log_after(skips[n - 1], |l| message(l) == "state applied", LOG_WAIT)
            .unwrap_or_else(|e| panic!("node{n} applies the policy: {e:#}"));
    }

    let r = ok(
        a.send(&SendOpts::to(&at6(ip6(&b), 8080))).expect("runs"),
        "a, inside the IPv6 block",
    );
    assert_eq!(r.servers(), ["b".to_string()].into());
    let skip = cluster.daemon(2).log_lines().len();
    refused(
        c.send(&SendOpts::to(&at6(ip6(&b), 8080)).timeout(10.0))
            .expect("runs"),
        "c, outside the IPv6 block",
    );
    let line = cluster
        .daemon(2)
        .wait_for_log_after(
            skip,
            |l| message(l) == "connection denied" && addr_ip(l, "src_addr") == Some(ip6(&c).into()),
            LOG_WAIT,
        )
        .expect("node2 logs the denial");
    assert_eq!(field(&line, "response"), "401", "{line}");
    // Over IPv4 the same policy's only block is of the other family: a is refused too.
    refused(
        a.send(&SendOpts::to(&format!("{}:8080", b.ip)).timeout(10.0))
            .expect("runs"),
        "a over IPv4, outside every block of the policy",
    );
}

/// `dig +short` answers; panics on a failed dig.
fn dig(pod: &Pod, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short", "+tries=1", "+timeout=3"];
    all.extend_from_slice(args);
    let out = pod.exec("dig", &all).expect("dig runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("timed out"),
        "dig {args:?} from {}: {text}{}",
        pod.key(),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

#[test]
fn dns_answers_aaaa_for_a_dual_stack_service_over_both_families() {
    mesh_tests::require_tool("dig", "dnsutils").expect("dig");
    let cluster: Cluster = start_with_daemons(spec());
    let a = cluster.pod("mesh/a").clone();
    let name = "srv.mesh.svc.cluster.local";
    let v6 = vip6_of().to_string();
    let resolver6 = format!("@{v6}");
    for server in [format!("@{VIP}"), resolver6] {
        assert_eq!(dig(&a, &[&server, "AAAA", name]), [v6.as_str()], "{server}");
        assert_eq!(
            dig(&a, &[&server, "A", name]),
            [VIP.to_string()],
            "{server}"
        );
    }
}

const VIP_V6ONLY: &str = "10.96.0.20";

/// IPv6-only client `a6` on node 1; on node 2 IPv6-only server `b6` behind Service `srv6`
/// (its IPv6 VIP serves it) and dual-stack server `d`.
fn ipv6_only_spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .dual_stack()
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a6", 1).sa("client").ipv6_only())
        .pod(PodSpec::new("mesh/b6", 2).sa("server").ipv6_only())
        .pod(PodSpec::new("mesh/d", 2).sa("server"))
        .service(
            SvcSpec::new("mesh/srv6", VIP_V6ONLY)
                .select("app", "b6")
                .port(80, 8080),
        )
}

/// Node `node`'s `/config_dump`.
fn config_dump(cluster: &Cluster, node: usize) -> Value {
    let (status, body) = node_http(cluster, node, 15000, "GET", "/config_dump").expect("admin");
    assert_eq!(status, 200, "config_dump of node {node}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("config_dump: {e}: {body}"))
}

#[test]
fn ipv6_only_pods_are_captured_and_meshed_across_nodes() {
    mesh_tests::require_tool("dig", "dnsutils").expect("dig");
    let cluster = start_with_daemons(ipv6_only_spec());
    let (a6, b6, d) = (
        cluster.pod("mesh/a6").clone(),
        cluster.pod("mesh/b6").clone(),
        cluster.pod("mesh/d").clone(),
    );
    let _sb = b6.serve(8080, "b6").expect("serve b6");
    let _sd = d.serve(8080, "d").expect("serve d");
    let marker = format!("ZT6ONLY-{}", cluster.prefix());
    let vip6 = vip6(VIP_V6ONLY.parse().expect("vip"));
    let capture = cluster.capture_fabric("ip6").expect("capture");

    for (to, server, what) in [
        (at(&b6, 8080), "b6", "a6 -> b6, both IPv6-only"),
        (at6(ip6(&d), 8080), "d", "a6 -> d, dual stack"),
        (at6(vip6, 80), "b6", "a6 -> the Service's IPv6 VIP"),
    ] {
        let r = ok(
            a6.send(&SendOpts::to(&to).bytes(MIB).marker(&marker))
                .expect("runs"),
            what,
        );
        assert_eq!(r.servers(), [server.to_string()].into(), "{what}: {r}");
        assert_eq!(
            r.peer_ips(),
            [a6.addr()].into(),
            "{what}: the server sees the client's IPv6 address: {r}"
        );
    }

    let pcap = capture.stop().expect("capture stops");
    assert_ipv6_hbone_only(&pcap, 3, &marker);

    // The server's daemon names the client by its SPIFFE identity.
    let line = cluster
        .daemon(2)
        .wait_for_log(
            |l| {
                message(l) == "access"
                    && field(l, "reporter") == "destination"
                    && field(l, "dst_workload") == "mesh/b6"
                    && addr_ip(l, "src_addr") == Some(a6.addr())
            },
            LOG_WAIT,
        )
        .expect("node2 logs the inbound connection from the IPv6-only pod");
    assert_eq!(field(&line, "src_identity"), a6.identity(), "{line}");
    assert_eq!(field(&line, "protocol"), "HBONE", "{line}");

    // Capture status: the IPv6-only pods are in the IPv6 enrolled map and counted as captured
    // (a dual-stack pod counts once).
    for (node, pod, pods) in [(1, &a6, 1), (2, &b6, 2)] {
        let dump = config_dump(&cluster, node);
        let enrolled: Vec<&str> = dump["capture"]["enrolled"]
            .as_array()
            .expect("capture.enrolled")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            enrolled.contains(&pod.addr().to_string().as_str()),
            "node{node} enrolls {}: {enrolled:?}",
            pod.key()
        );
        let entry = dump["enrolled_pods"]
            .as_array()
            .expect("enrolled_pods")
            .iter()
            .find(|p| p["pod"] == pod.key().as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{} in node{node}'s enrolled_pods", pod.key()));
        assert_eq!(entry["captured"], true, "{entry}");
        let captured = node_metric(&cluster, node, r#"ztunnel_capture_pods{state="captured"}"#);
        assert_eq!(captured, Some(pods), "node{node}: ztunnel_capture_pods");
        let counted = node_metric(&cluster, node, "ztunnel_capture_enrolled_pods");
        assert_eq!(
            counted,
            Some(pods),
            "node{node}: ztunnel_capture_enrolled_pods"
        );
    }

    // DNS: the IPv6-only pod's query, sent to the Service's IPv6 VIP (nothing serves DNS
    // there), is captured and answered by the node's DNS proxy.
    let name = "srv6.mesh.svc.cluster.local";
    let resolver = format!("@{vip6}");
    assert_eq!(
        dig(&a6, &[&resolver, "AAAA", name]),
        [vip6.to_string()],
        "AAAA of {name}"
    );

    // A DENY policy naming the client's identity refuses it at the server's node.
    let deny = istio_policy(
        "AuthorizationPolicy",
        "mesh",
        "deny-client",
        "{selector: {matchLabels: {app: b6}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]}",
    );
    apply_policies(&cluster, &deny);
    let skip = cluster.daemon(2).log_lines().len();
    refused(
        a6.send(&SendOpts::to(&at(&b6, 8080)).timeout(10.0))
            .expect("runs"),
        "a6 -> b6 under the DENY policy",
    );
    let line = denied_line(cluster.daemon(2), skip, &a6);
    assert_eq!(field(&line, "policy"), "mesh/deny-client", "{line}");
    assert_eq!(field(&line, "response"), "401", "{line}");
    // The policy selects b6 only: d still serves the IPv6-only client.
    ok(
        a6.send(&SendOpts::to(&at6(ip6(&d), 8080))).expect("runs"),
        "a6 -> d, not selected by the policy",
    );
}

/// A dual-stack pod whose IPv6 route leads to another pod's veth is shown not captured, with
/// both interfaces named, and holds the daemon not ready until its routes agree again.
#[test]
fn a_dual_stack_pod_whose_routes_disagree_is_reported_until_they_agree() {
    let spec = ClusterSpec::new(1)
        .dual_stack()
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1))
        .pod(PodSpec::new("mesh/b6", 1).ipv6_only());
    let cluster = start_with_daemons(spec);
    let (a, b6) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b6").clone(),
    );
    let ready = || node_http(&cluster, 1, 15021, "GET", "/healthz/ready").expect("probe");
    assert_eq!(
        ready().0,
        200,
        "both pods captured, the IPv6-only one included"
    );
    let (veth_a, veth_b) = (pod_veth(&cluster, &a), pod_veth(&cluster, &b6));
    let route_a6 = |dev: &str| {
        let host = format!("{}/128", ip6(&a));
        let o = cluster
            .node_exec(1, "ip", &["-6", "route", "replace", &host, "dev", dev])
            .expect("ip runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };

    route_a6(&veth_b);
    let wait = Duration::from_secs(15);
    eventually(wait, "readiness 503 naming mesh/a", || {
        let (status, body) = ready();
        status == 503 && body.contains("mesh/a")
    });
    let (_, body) = ready();
    assert!(
        body.contains(&veth_a) && body.contains(&veth_b),
        "the reason names both interfaces: {body}"
    );
    let not_captured = r#"ztunnel_capture_pods{state="not_captured"}"#;
    assert_eq!(node_metric(&cluster, 1, not_captured), Some(1));
    let dump = config_dump(&cluster, 1);
    let pods = dump["enrolled_pods"].as_array().expect("enrolled_pods");
    let pod = |key: &str| {
        pods.iter()
            .find(|p| p["pod"] == key)
            .unwrap_or_else(|| panic!("{key} in {pods:?}"))
    };
    assert_eq!(pod("mesh/a")["captured"], false, "{pods:?}");
    assert_eq!(pod("mesh/b6")["captured"], true, "{pods:?}");

    route_a6(&veth_a);
    eventually(wait, "ready again once the routes agree", || {
        ready().0 == 200
    });
    assert_eq!(node_metric(&cluster, 1, not_captured), Some(0));
}
