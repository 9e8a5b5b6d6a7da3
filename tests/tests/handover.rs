//! A rolling restart of a node's daemon loses nothing (ARCHITECTURE.md, "Hand-over"): a new
//! daemon started next to the running one takes its listening sockets over the node's
//! hand-over socket, adopts the pinned capture and starts accepting once ready; the old one
//! then stops accepting and drains, its open flows finishing on it, and exits (SIGTERM, as
//! the orchestrator sends once the new pod is ready, does not cut that drain short).
//!
//! Short connections run in both directions through the restarted daemon (out of its pod to
//! the other node, and into its pod from the other node) the whole time; long transfers in
//! both directions, started before the restart, are carried to their end by the old process.
//!
//! Needs root and built binaries; `cargo xtask test` provides both. Never skips.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::app::{PendingSend, SendOpts};
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, Daemon, Pod, PodSpec};
use mesh_tests::testkit::{at, node_http, ok};
use serde_json::Value;

const HBONE: u16 = 15008;
const METRICS: u16 = 15020;
const READINESS: u16 = 15021;
/// The old daemon's drain timeout: its long flows must end within it.
const DRAIN: Duration = Duration::from_secs(40);
/// Short connections per direction: `RATE` a second for `CHURN_SECS`.
const CHURN_RATE: u32 = 50;
const CHURN_SECS: u32 = 20;
/// Each long transfer: `LONG_BYTES` at `LONG_RATE` a second, echoed and compared.
const LONG_BYTES: u64 = 16 * 1024 * 1024;
const LONG_RATE: u64 = 1024 * 1024;

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"))
}

/// `meshload churn` from `from` to `to`: `CHURN_RATE * CHURN_SECS` short connections, each
/// echoing and comparing 2 KiB.
fn churn(from: &Pod, to: &Pod) -> Child {
    from.command(mesh_tests::meshload_bin())
        .args(["churn", "--to", &at(to, 8080)])
        .args(["--rate", &CHURN_RATE.to_string()])
        .args(["--secs", &CHURN_SECS.to_string()])
        .args(["--bytes", "2048", "--threads", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshload starts")
}

fn churn_result(c: Child, what: &str) -> Value {
    let out = c.wait_with_output().expect("meshload runs");
    assert!(
        out.status.success(),
        "{what}: meshload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("meshload JSON")
}

/// A long transfer from `from` to `to`, paced so that it spans the restart.
fn long_transfer(from: &Pod, to: &Pod) -> PendingSend {
    from.spawn_send(
        &SendOpts::to(&at(to, 8080))
            .bytes(LONG_BYTES)
            .rate(LONG_RATE)
            .timeout(60.0),
    )
    .expect("meshapp send starts")
}

/// The `access` line among `lines` of a flow from `src` (its IP: at the destination the port
/// is the HBONE connection's) to `dst` that carried at least `bytes` each way.
fn access_line<'a>(lines: &'a [Value], src: &Pod, dst: &str, bytes: u64) -> Option<&'a Value> {
    let src = format!("{}:", src.ip);
    lines.iter().find(|l| {
        message(l) == "access"
            && field(l, "src_addr").starts_with(&src)
            && field(l, "dst_addr") == dst
            && l["bytes_received"].as_u64() >= Some(bytes)
            && l["bytes_sent"].as_u64() >= Some(bytes)
    })
}

/// The value of the metric line starting with `prefix` on node `node`.
fn metric(cluster: &Cluster, node: usize, prefix: &str) -> Option<u64> {
    let (status, body) = node_http(cluster, node, METRICS, "GET", "/metrics").expect("scrape");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Every connection from `a` to `b` and back works, and the fabric carries nothing between
/// them but HBONE (port 15008), never the payload in clear.
fn assert_hbone_only(cluster: &Cluster, a: &Pod, b: &Pod, when: &str) {
    let capture = cluster.capture_fabric("").expect("capture");
    let marker = "MARKER-AFTER-HANDOVER";
    let ab = ok(
        a.send(&SendOpts::to(&at(b, 8080)).marker(marker).conns(3))
            .expect("runs"),
        when,
    );
    assert_eq!(ab.peer_ips(), [IpAddr::from(a.ip)].into(), "{when}: {ab}");
    let ba = ok(
        b.send(&SendOpts::to(&at(a, 8080)).marker(marker).conns(3))
            .expect("runs"),
        when,
    );
    assert_eq!(ba.peer_ips(), [IpAddr::from(b.ip)].into(), "{when}: {ba}");
    let pcap = capture.stop().expect("capture stops");
    let stray = pcap.between_outside_tcp_port(a.ip, b.ip, HBONE);
    assert!(
        stray.is_empty(),
        "{when}: packets between a and b outside HBONE: {stray:?}"
    );
    assert!(
        !pcap.contains(marker.as_bytes()),
        "{when}: the payload crossed the fabric in clear"
    );
    assert!(
        pcap.packets
            .iter()
            .any(|p| p.between(a.ip, b.ip) && p.has_port(HBONE)),
        "{when}: no HBONE packet seen; was the capture running?\n{}",
        pcap.summary()
    );
}

/// Programs per TCX hook in node `node`'s namespace (`tcx/ingress veth0` -> 1).
fn tcx_programs(cluster: &Cluster, node: usize) -> BTreeMap<String, usize> {
    mesh_tests::bpf::tcx_programs(&cluster.node_netns(node)).expect("query attached programs")
}

/// Waits until `d` logs a line satisfying `pred`; returns when the test saw it.
fn seen(d: &Daemon, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Instant {
    d.wait_for_log(pred, timeout).expect("log line");
    Instant::now()
}

#[test]
fn rolling_restart_loses_no_connection_and_old_flows_finish_on_the_old_daemon() {
    let mut cluster = Cluster::start(spec()).expect("cluster starts");
    let drain = format!("{}s", DRAIN.as_secs());
    cluster
        .start_daemon(1, &["--drain-timeout", &drain])
        .expect("node1 daemon ready");
    cluster.start_daemon(2, &[]).expect("node2 daemon ready");
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sa = a.serve(8080, "a").expect("serve a");
    let _sb = b.serve(8080, "b").expect("serve b");
    ok(a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"), "a->b");
    ok(b.send(&SendOpts::to(&at(&a, 8080))).expect("runs"), "b->a");
    let programs_before = tcx_programs(&cluster, 1);

    // Out of node1's pod and into it, long and short, all through node1's daemon.
    let mut long_ab = long_transfer(&a, &b);
    let mut long_ba = long_transfer(&b, &a);
    let churn_ab = churn(&a, &b);
    let churn_ba = churn(&b, &a);
    std::thread::sleep(Duration::from_secs(3));

    let started = Instant::now();
    let old = cluster
        .start_successor(1, &["--drain-timeout", &drain])
        .expect("the new daemon takes over and becomes ready");
    eprintln!("new daemon ready {:?} after it started", started.elapsed());
    let handed_over = seen(
        &old,
        |l| message(l).starts_with("handed over to the new daemon"),
        Duration::from_secs(15),
    );
    assert!(
        long_ab.is_running().expect("check") && long_ba.is_running().expect("check"),
        "the long transfers ended before the hand-over; the test proves nothing about them"
    );
    // The orchestrator stops the old pod once the new one is ready: one SIGTERM.
    old.sigterm().expect("SIGTERM");
    let status = old
        .wait_exit(DRAIN + Duration::from_secs(10))
        .expect("the old daemon exits");
    let drained_in = handed_over.elapsed();
    eprintln!("old daemon exited {drained_in:?} after the hand-over");
    assert_eq!(status.code(), Some(0), "{}", old.log_tail(20));
    assert!(
        drained_in < DRAIN,
        "the old daemon exited {drained_in:?} after the hand-over, beyond its drain timeout"
    );
    let old_log = old.log_lines();
    let finished = old_log
        .iter()
        .find(|l| message(l) == "drain finished")
        .expect("drain finished line");
    assert_eq!(
        finished["left"].as_u64(),
        Some(0),
        "every open flow ended on its own"
    );

    // Both long transfers: every byte echoed and compared, carried by the old process.
    for (pending, from, to, what) in [(long_ab, &a, &b, "a->b"), (long_ba, &b, &a, "b->a")] {
        let r = ok(pending.wait().expect("runs"), what);
        assert_eq!(r.conns[0].bytes, LONG_BYTES);
        assert!(
            access_line(&old_log, from, &at(to, 8080), LONG_BYTES).is_some(),
            "{what}: the old daemon logged no access line for the whole transfer"
        );
    }

    // Not one short connection failed, in either direction.
    let total = u64::from(CHURN_RATE * CHURN_SECS);
    for (c, what) in [(churn_ab, "a->b"), (churn_ba, "b->a")] {
        let r = churn_result(c, what);
        eprintln!("churn {what}: {r}");
        assert_eq!(
            (r["connections"].as_u64(), r["failed"].as_u64()),
            (Some(total), Some(0)),
            "{what}: {r}"
        );
    }

    // The new daemon: took the sockets, adopted capture, serves, counted the hand-over.
    let new = cluster.daemon(1);
    let new_log = new.log_lines();
    assert!(
        new_log
            .iter()
            .any(|l| message(l).starts_with("taking over the running daemon")),
        "the new daemon took the sockets over"
    );
    for (from, to) in [(&a, &b), (&b, &a)] {
        assert!(
            access_line(&new_log, from, &at(to, 8080), LONG_BYTES).is_none(),
            "a long transfer moved to the new daemon"
        );
    }
    let adopted = new_log
        .iter()
        .filter(|l| message(l) == "capture link adopted")
        .count();
    assert_eq!(adopted, programs_before.len(), "every pinned link adopted");
    assert_eq!(
        tcx_programs(&cluster, 1),
        programs_before,
        "one program per interface, as before the restart"
    );
    let (status, _) =
        node_http(&cluster, 1, READINESS, "GET", "/healthz/ready").expect("readiness");
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &cluster,
            1,
            "ztunnel_handovers_total{role=\"successor\",result=\"completed\"} "
        ),
        Some(1)
    );
    assert_hbone_only(&cluster, &a, &b, "after the old daemon exited");
}

/// A new daemon that fails before it is ready (here: capture cannot attach to an uplink that
/// does not exist) aborts the hand-over: the running daemon never stopped holding its sockets
/// and serves on, ready again, and not one connection fails meanwhile.
#[test]
fn a_successor_that_fails_to_start_leaves_the_running_daemon_serving() {
    let mut cluster = Cluster::start(spec()).expect("cluster starts");
    cluster.start_all_daemons().expect("daemons ready");
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sa = a.serve(8080, "a").expect("serve a");
    let _sb = b.serve(8080, "b").expect("serve b");
    ok(a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"), "a->b");
    let mut long = long_transfer(&a, &b);
    let churn_ab = churn(&a, &b);
    let churn_ba = churn(&b, &a);
    std::thread::sleep(Duration::from_secs(2));

    let failed = cluster
        .spawn_successor_unready(1, &["--uplink", "nope0"])
        .expect("the second daemon starts");
    let status = failed
        .wait_exit(Duration::from_secs(60))
        .expect("the second daemon gives up");
    assert!(!status.success(), "{}", failed.log_tail(10));
    assert!(
        failed
            .log_lines()
            .iter()
            .any(|l| message(l).starts_with("taking over the running daemon")),
        "it had taken the sockets: {}",
        failed.log_tail(10)
    );
    let old = cluster.daemon(1);
    old.wait_for_log(
        |l| message(l).starts_with("hand-over aborted"),
        Duration::from_secs(15),
    )
    .expect("the running daemon notices");
    assert!(old.is_running(), "the running daemon serves on");
    assert!(
        long.is_running().expect("check"),
        "the long transfer goes on"
    );

    for (c, what) in [(churn_ab, "a->b"), (churn_ba, "b->a")] {
        let r = churn_result(c, what);
        eprintln!("churn {what}: {r}");
        assert_eq!(
            (r["connections"].as_u64(), r["failed"].as_u64()),
            (Some(u64::from(CHURN_RATE * CHURN_SECS)), Some(0)),
            "{what}: {r}"
        );
    }
    ok(long.wait().expect("runs"), "the long transfer");
    let (status, _) =
        node_http(&cluster, 1, READINESS, "GET", "/healthz/ready").expect("readiness");
    assert_eq!(status, 200, "ready again");
    assert_eq!(
        metric(
            &cluster,
            1,
            "ztunnel_handovers_total{role=\"predecessor\",result=\"aborted\"} "
        ),
        Some(1)
    );
    assert_hbone_only(&cluster, &a, &b, "after the aborted hand-over");
}
