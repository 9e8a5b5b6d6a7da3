//! Acceptance tests of the waypoint hand-off: node daemons and a `waypoint` process in a pod,
//! state from the YAML files (a Gateway of class `istio-waypoint`, an HTTPRoute, a Service
//! labelled `istio.io/use-waypoint`), HTTP/1.1 and HTTP/2 from `curl` in a client pod to
//! `meshhttp` backends.
//!
//! Layout: `mesh_tests::waypoint_mesh` (2 nodes; `reviews` labelled for the waypoint, split
//! 90/10 by the route; `direct`, the same pods without the label).
//!
//! Needs root and the built binaries (`cargo xtask test`); fails, never skips, without them.

use std::time::{Duration, Instant};

use mesh_tests::cluster::{field, message, WaypointProc};
use mesh_tests::pcap::TCP;
use mesh_tests::testkit::{eventually, node_http};
use mesh_tests::waypoint_mesh::{WaypointMesh, CLIENT_ID, DIRECT, REVIEWS, WAYPOINT_ID};
use mesh_tests::web::{CurlRun, HttpVersion};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const REQUESTS: usize = 1000;

fn start() -> WaypointMesh {
    WaypointMesh::start("")
}

/// The share of `v1` among `run`'s answers must be 90% within ±5 points.
fn assert_split(run: &CurlRun, what: &str) {
    let b = run.backends();
    let v1 = b.get("v1").copied().unwrap_or(0);
    let v2 = b.get("v2").copied().unwrap_or(0);
    assert_eq!(
        v1 + v2,
        REQUESTS,
        "{what}: every request answered by v1 or v2: {b:?}"
    );
    let share = v1 as f64 / REQUESTS as f64;
    eprintln!(
        "{what}: v1 {v1}, v2 {v2} ({:.1}% / {:.1}%)",
        share * 100.0,
        (1.0 - share) * 100.0
    );
    assert!(
        (0.85..=0.95).contains(&share),
        "{what}: v1 got {v1} of {REQUESTS}, v2 {v2}; the route says 90/10"
    );
}

fn all_ok(run: &CurlRun, what: &str) {
    let statuses = run.statuses();
    assert_eq!(
        statuses.get(&200).copied(),
        Some(REQUESTS),
        "{what}: statuses {statuses:?}; curl: {}",
        run.stderr
    );
}

/// Requests the waypoint logged after the first `skip`, whose path starts with `prefix`.
fn logged(w: &WaypointProc, skip: usize, prefix: &str) -> Vec<Value> {
    w.requests()
        .into_iter()
        .skip(skip)
        .filter(|l| field(l, "path").starts_with(prefix))
        .collect()
}

#[test]
fn http_through_the_waypoint_follows_the_route_and_only_tls_crosses_the_fabric() {
    let m = start();
    let (client, waypoint) = (m.ip("mesh/client"), m.ip("mesh/waypoint"));
    let marker = "PLAINTEXT-MARKER-4f1d9";
    let capture = m.cluster.capture_fabric("tcp").expect("capture");

    // HTTP/1.1: 1,000 requests on one connection, each logged by the waypoint.
    let skip = m.waypoint.requests().len();
    let h1 = m.curl(HttpVersion::Http1, &format!("/h1-{marker}-"), REQUESTS);
    all_ok(&h1, "HTTP/1.1");
    assert_split(&h1, "HTTP/1.1");
    let lines = m
        .waypoint
        .wait_for_requests(skip + REQUESTS, WAIT)
        .expect("the waypoint logs each request");
    let h1_lines: Vec<&Value> = lines[skip..]
        .iter()
        .filter(|l| field(l, "path").starts_with("/h1-"))
        .collect();
    assert_eq!(h1_lines.len(), REQUESTS, "one waypoint line per request");
    for l in &h1_lines {
        assert_eq!(field(l, "src_identity"), CLIENT_ID, "{l}");
        assert_eq!(l.get("status").and_then(Value::as_u64), Some(200), "{l}");
    }

    // HTTP/2 with prior knowledge: the same, and the backends are spoken to in HTTP/2.
    let skip = m.waypoint.requests().len();
    let h2 = m.h2_get(&format!("/h2-{marker}-"), REQUESTS);
    all_ok(&h2, "HTTP/2");
    assert_split(&h2, "HTTP/2");
    m.waypoint
        .wait_for_requests(skip + REQUESTS, WAIT)
        .expect("the waypoint logs each request");
    assert_eq!(logged(&m.waypoint, skip, "/h2-").len(), REQUESTS);
    let h2_at_backends: Vec<Value> = [&m.v1, &m.v2]
        .iter()
        .flat_map(|s| s.requests())
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/h2-")))
        .collect();
    assert_eq!(h2_at_backends.len(), REQUESTS);
    assert!(
        h2_at_backends.iter().all(|r| r["version"] == "HTTP/2.0"),
        "backends hear HTTP/2 from the waypoint"
    );
    // Every request reached its backend from the waypoint's address (its own HBONE).
    assert!(
        h2_at_backends.iter().all(|r| r["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{waypoint}:")))),
        "backends see the waypoint as their client"
    );

    // Between the nodes, only TLS on 15008: client -> waypoint, and waypoint -> v2.
    let pcap = capture.stop().expect("capture stops");
    assert!(
        !pcap.contains(marker.as_bytes()),
        "plaintext crossed the fabric"
    );
    for (a, b, what) in [
        (client, waypoint, "client -> waypoint"),
        (waypoint, m.ip("mesh/v2"), "waypoint -> v2"),
    ] {
        assert_eq!(
            pcap.payload_ports_between(a, b),
            [15008].into(),
            "{what}: only HBONE\n{}",
            pcap.summary()
        );
    }
    let other: Vec<_> = pcap
        .packets
        .iter()
        .filter(|p| p.proto == TCP && !p.payload.is_empty() && !p.has_port(15008))
        .collect();
    assert!(
        other.is_empty(),
        "payload off port 15008:\n{}",
        pcap.summary()
    );

    // The client's daemon handed both connections to the waypoint and says so.
    let n1 = m.cluster.daemon(1);
    let handed: Vec<Value> = n1
        .access_logs()
        .into_iter()
        .filter(|l| {
            field(l, "reporter") == "source" && field(l, "dst_addr") == format!("{REVIEWS}:80")
        })
        .collect();
    assert_eq!(handed.len(), 2, "one connection per curl run: {handed:?}");
    for l in &handed {
        assert_eq!(field(l, "waypoint"), "mesh/waypoint", "{l}");
        assert_eq!(field(l, "dst_workload"), "mesh/waypoint", "{l}");
        assert_eq!(field(l, "dst_identity"), WAYPOINT_ID, "{l}");
        assert_eq!(field(l, "response_flags"), "-", "{l}");
    }

    // The endpoints' daemons take the waypoint's tunnels as usual (its upstream connections
    // stay open, so their metrics, not their access lines, show them): the client they see is
    // the waypoint. The waypoint's own connections never come back to it: no daemon routes
    // anything from its address as a source (it is not captured).
    for node in [1, 2] {
        let (status, metrics) =
            node_http(&m.cluster, node, 15020, "GET", "/metrics").expect("metrics");
        assert_eq!(status, 200);
        let opened = |reporter: &str| {
            metrics
                .lines()
                .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
                .filter(|l| l.contains(&format!("reporter=\"{reporter}\"")))
                .filter(|l| l.contains("source_workload=\"waypoint\""))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let inbound = opened("destination");
        assert!(
            !inbound.is_empty(),
            "node{node}: tunnels from the waypoint\n{metrics}"
        );
        for l in &inbound {
            assert!(
                l.contains(&format!("source_principal=\"{WAYPOINT_ID}\"")),
                "node{node}: {l}"
            );
            assert!(
                l.contains("destination_workload=\"reviews\""),
                "node{node}: {l}"
            );
        }
        assert!(
            opened("source").is_empty(),
            "node{node} captured the waypoint's own flows"
        );
        let from_waypoint = m.cluster.daemon(node).access_logs().into_iter().any(|l| {
            field(&l, "reporter") == "source"
                && field(&l, "src_addr").starts_with(&format!("{waypoint}:"))
        });
        assert!(!from_waypoint, "node{node} routed a flow of the waypoint's");
    }

    // The same Service without the label: straight to a backend, the waypoint not involved.
    let skip = m.waypoint.requests().len();
    let direct = m
        .cluster
        .pod("mesh/client")
        .curl(
            HttpVersion::Http1,
            &format!("http://{DIRECT}/direct-"),
            20,
            Duration::from_secs(30),
        )
        .expect("curl");
    assert_eq!(
        direct.statuses().get(&200).copied(),
        Some(20),
        "{}",
        direct.stderr
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.waypoint.requests().len(), skip, "bypasses the waypoint");
    let direct_at_backends = [&m.v1, &m.v2]
        .iter()
        .flat_map(|s| s.requests())
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/direct-"))
        })
        .filter(|r| {
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(&format!("{client}:")))
        })
        .count();
    assert_eq!(direct_at_backends, 20, "the backends see the client itself");
    let l = n1
        .wait_for_log(
            |l| {
                message(l) == "access"
                    && field(l, "dst_addr").starts_with("10.244.")
                    && field(l, "reporter") == "source"
            },
            WAIT,
        )
        .expect("the direct flow's access line");
    assert_eq!(field(&l, "waypoint"), "", "{l}");
}

#[test]
fn the_waypoint_retries_a_503_and_answers_504_past_the_request_timeout() {
    let m = start();

    // The first attempt at /flaky/<key> gets 503 from v1, the retry 200.
    let skip = m.waypoint.requests().len();
    let flaky = m.curl(HttpVersion::Http1, "/flaky/one", 1);
    assert_eq!(flaky.answers, [(200, "v1".to_string())], "{}", flaky.stderr);
    let at_v1: Vec<u64> =
        m.v1.requests()
            .iter()
            .filter(|r| r["path"] == "/flaky/one")
            .filter_map(|r| r["status"].as_u64())
            .collect();
    assert_eq!(
        at_v1,
        [503, 200],
        "the backend saw the attempt and its retry"
    );
    let lines = m
        .waypoint
        .wait_for_requests(skip + 1, WAIT)
        .expect("logged");
    assert_eq!(lines[skip].get("status").and_then(Value::as_u64), Some(200));

    // The same over HTTP/2.
    let flaky = m.curl(HttpVersion::Http2, "/flaky/two", 1);
    assert_eq!(flaky.answers, [(200, "v1".to_string())], "{}", flaky.stderr);

    // /slow/3000 takes 3 s at the backend; the route allows 1 s.
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let started = Instant::now();
        let slow = m.curl(version, "/slow/3000", 1);
        let took = started.elapsed();
        assert_eq!(
            slow.answers.first().map(|a| a.0),
            Some(504),
            "{version:?}: {slow:?}"
        );
        assert!(
            took < Duration::from_millis(2500),
            "{version:?}: answered after {took:?}, the timeout is 1 s"
        );
    }
    eventually(WAIT, "the waypoint logs the timeouts", || {
        logged(&m.waypoint, 0, "/slow/")
            .iter()
            .filter(|l| l.get("status").and_then(Value::as_u64) == Some(504))
            .count()
            == 2
    });
}
