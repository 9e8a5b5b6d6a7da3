//! The waypoint on a dual-stack cluster (`mesh_tests::waypoint_mesh`'s layout, every pod and
//! Service with an IPv4 and an IPv6 address): an HTTP request to the IPv6 VIP of a Service
//! bound to the waypoint is handed to the waypoint at its IPv6 address, routed, authorized per
//! request (an L7 DENY answers 403) and forwarded to an endpoint's IPv6 address; the bytes of
//! a 1 MiB body come back intact, only TLS on port 15008 crosses the fabric, the waypoint logs
//! the client's identity and IPv6 address. The IPv4 path of the same cluster keeps working.
//!
//! Needs root, the built binaries, curl and tcpdump (`cargo xtask test -p mesh-tests --test
//! waypoint_dual_stack`); fails, never skips, without them.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use mesh_tests::cluster::{field, message, vip6, Pod};
use mesh_tests::pcap::TCP;
use mesh_tests::waypoint_mesh::{self, WaypointMesh, CLIENT_ID, REVIEWS, WAYPOINT_ID};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const HBONE: u16 = 15008;
const MIB: usize = 1024 * 1024;

/// Requests to `reviews` whose path starts with `/admin` are denied at the waypoint.
const DENY_ADMIN: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: mesh}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin*]}}]
"#;

fn ip6(m: &WaypointMesh, key: &str) -> Ipv6Addr {
    m.cluster
        .pod(key)
        .ip6
        .unwrap_or_else(|| panic!("{key} has no IPv6 address"))
}

/// `http://[<IPv6 VIP of reviews>]<path>`.
fn reviews6_url(path: &str) -> String {
    let vip = vip6(REVIEWS.parse().expect("VIP"));
    format!("http://[{vip}]{path}")
}

/// POSTs the file `body` from `pod` to `url` with curl (`--http1.1` or
/// `--http2-prior-knowledge`); the status and what came back.
fn post_file(pod: &Pod, proto: &str, url: &str, body: &Path) -> (u16, Vec<u8>) {
    let out_file = body.with_extension(format!("out{}", proto.len()));
    let out = pod
        .command("curl")
        .args(["-sS", proto, "--max-time", "60", "-w", "%{http_code}"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .args(["-H", "content-type: application/octet-stream", "-o"])
        .arg(&out_file)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert_ne!(
        code,
        0,
        "POST {url} ({proto}): no answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, std::fs::read(&out_file).unwrap_or_default())
}

/// The waypoint's request lines after the first `skip` whose path starts with `prefix`, once
/// there are `n` of them.
fn wait_lines(m: &WaypointMesh, skip: usize, prefix: &str, n: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    mesh_tests::testkit::eventually(WAIT, "the waypoint logs the requests", || {
        lines = m
            .waypoint
            .requests()
            .into_iter()
            .skip(skip)
            .filter(|l| field(l, "path").starts_with(prefix))
            .collect();
        lines.len() >= n
    });
    lines
}

fn addr_ip(l: &Value, key: &str) -> Option<IpAddr> {
    field(l, key).parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[test]
fn http_over_ipv6_goes_through_the_waypoint_in_ipv6_with_policy_and_identity() {
    let m = WaypointMesh::start_spec(waypoint_mesh::spec().dual_stack(), DENY_ADMIN);
    let client = m.cluster.pod("mesh/client").clone();
    let (client6, waypoint6) = (ip6(&m, "mesh/client"), ip6(&m, "mesh/waypoint"));
    let backends6: Vec<IpAddr> = vec![ip6(&m, "mesh/v1").into(), ip6(&m, "mesh/v2").into()];
    let marker = format!("WP6-PLAINTEXT-{}", m.cluster.prefix());
    let capture = m.cluster.capture_fabric("tcp").expect("capture");

    // 1 MiB, marker included, echoed by the backend through the waypoint in HTTP/1.1 and
    // HTTP/2: every byte comes back.
    let dir = tempfile::tempdir().expect("tempdir");
    let body_path = dir.path().join("body.bin");
    let mut body: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4099) as u8).collect();
    body[MIB / 2..MIB / 2 + marker.len()].copy_from_slice(marker.as_bytes());
    std::fs::write(&body_path, &body).expect("body written");
    let skip = m.waypoint.requests().len();
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let (status, echoed) = post_file(&client, proto, &reviews6_url("/echo"), &body_path);
        assert_eq!(status, 200, "POST /echo over IPv6 ({proto})");
        assert!(
            echoed == body,
            "{proto}: {} bytes came back of {MIB}, or changed",
            echoed.len()
        );
    }
    let echo_lines = wait_lines(&m, skip, "/echo", 2);
    for l in &echo_lines {
        assert_eq!(field(l, "src_identity"), CLIENT_ID, "{l}");
        assert_eq!(
            field(l, "client").parse::<IpAddr>().ok(),
            Some(client6.into()),
            "the waypoint sees the client's IPv6 address: {l}"
        );
        let upstream = addr_ip(l, "upstream");
        assert!(
            upstream.is_some_and(|ip| backends6.contains(&ip)),
            "forwarded to an endpoint's IPv6 address: {l}"
        );
        assert_eq!(l["bytes_received"].as_u64(), Some(MIB as u64), "{l}");
        assert_eq!(l["bytes_sent"].as_u64(), Some(MIB as u64), "{l}");
    }
    // The backends got the bodies from the waypoint's IPv6 address.
    let at_backends: Vec<Value> = m
        .backend_requests()
        .into_iter()
        .filter(|r| r["path"] == "/echo")
        .collect();
    assert_eq!(at_backends.len(), 2, "{at_backends:?}");
    for r in &at_backends {
        let peer = r["peer"]
            .as_str()
            .and_then(|p| p.parse::<SocketAddr>().ok());
        assert_eq!(
            peer.map(|p| p.ip()),
            Some(waypoint6.into()),
            "the backend's client is the waypoint, over IPv6: {r}"
        );
        assert_eq!(r["body_bytes"].as_u64(), Some(MIB as u64), "{r}");
    }

    // An allowed GET and a denied one, over IPv6.
    let url = reviews6_url("/public/v6");
    let (status, answer) = client
        .request("GET", &url, &[], Duration::from_secs(30))
        .expect("GET over IPv6");
    assert_eq!(status, 200, "GET {url}: {answer}");
    assert!(answer == "v1\n" || answer == "v2\n", "{answer:?}");
    let skip = m.waypoint.requests().len();
    let url = reviews6_url("/admin/users");
    let (status, answer) = client
        .request("GET", &url, &[], Duration::from_secs(30))
        .expect("denied GET over IPv6");
    assert_eq!(status, 403, "GET {url}: {answer}");
    assert_eq!(answer, "RBAC: access denied");
    let denied = &wait_lines(&m, skip, "/admin", 1)[0];
    assert_eq!(field(denied, "authz"), "DENY", "{denied}");
    assert_eq!(field(denied, "policy"), "mesh/deny-admin", "{denied}");
    assert_eq!(field(denied, "src_identity"), CLIENT_ID, "{denied}");
    assert_eq!(
        field(denied, "client").parse::<IpAddr>().ok(),
        Some(client6.into()),
        "{denied}"
    );

    // The IPv4 path of the same cluster: the same answers, in IPv4 end to end.
    let skip = m.waypoint.requests().len();
    let (status, answer) = m.request("mesh/client", "GET", "/public/v4", &[]);
    assert_eq!(status, 200, "GET over IPv4: {answer}");
    let (status, _) = m.request("mesh/client", "GET", "/admin/v4", &[]);
    assert_eq!(status, 403, "denied GET over IPv4");
    let v4 = wait_lines(&m, skip, "/public/v4", 1);
    assert_eq!(
        field(&v4[0], "client").parse::<IpAddr>().ok(),
        Some(client.ip.into()),
        "{}",
        v4[0]
    );
    assert!(
        addr_ip(&v4[0], "upstream").is_some_and(|ip| ip.is_ipv4()),
        "IPv4 flows go on in IPv4: {}",
        v4[0]
    );

    // The fabric carried only TLS on 15008, the IPv6 requests between the client's and the
    // waypoint's IPv6 addresses, and never the marker in clear.
    let pcap = capture.stop().expect("capture stops");
    assert!(
        !pcap.contains(marker.as_bytes()),
        "the marker crossed the fabric in clear"
    );
    let stray6: Vec<String> = pcap
        .packets6
        .iter()
        .filter(|p| p.proto == TCP && !p.payload.is_empty() && !p.has_port(HBONE))
        .map(|p| format!("[{}]:{} -> [{}]:{}", p.src, p.sport, p.dst, p.dport))
        .collect();
    assert!(stray6.is_empty(), "IPv6 payload off 15008: {stray6:?}");
    let stray4: Vec<_> = pcap
        .packets
        .iter()
        .filter(|p| p.proto == TCP && !p.payload.is_empty() && !p.has_port(HBONE))
        .collect();
    assert!(
        stray4.is_empty(),
        "IPv4 payload off 15008:\n{}",
        pcap.summary()
    );
    let to_waypoint: usize = pcap
        .packets6
        .iter()
        .filter(|p| p.proto == TCP && p.src == client6 && p.dst == waypoint6 && p.dport == HBONE)
        .map(|p| p.payload.len())
        .sum();
    assert!(
        to_waypoint >= 2 * MIB,
        "the two bodies went to the waypoint's IPv6 15008 in TLS, saw {to_waypoint} B"
    );

    // The client's daemon handed the IPv6 flows to the waypoint and says so.
    let vip6_80 = SocketAddr::new(vip6(REVIEWS.parse().expect("VIP")).into(), 80);
    let handed: Vec<Value> = m
        .cluster
        .daemon(1)
        .access_logs()
        .into_iter()
        .filter(|l| field(l, "reporter") == "source" && field(l, "dst_addr") == vip6_80.to_string())
        .collect();
    assert!(!handed.is_empty(), "node1 logs the IPv6 hand-offs");
    for l in &handed {
        assert_eq!(message(l), "access", "{l}");
        assert_eq!(field(l, "waypoint"), "mesh/waypoint", "{l}");
        assert_eq!(field(l, "dst_identity"), WAYPOINT_ID, "{l}");
        assert_eq!(
            addr_ip(l, "src_addr"),
            Some(client6.into()),
            "the flow left from the client's IPv6 address: {l}"
        );
    }

    // Metrics count the denied IPv6 request with the client's identity.
    let metrics = m.waypoint.metrics().expect("metrics");
    let denied_count = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| {
            l.contains("response_code=\"403\"")
                && l.contains(&format!("source_principal=\"{CLIENT_ID}\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>();
    assert!(
        denied_count >= 2.0,
        "403s counted: {denied_count}\n{metrics}"
    );
}
