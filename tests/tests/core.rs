//! Acceptance tests of the daemon's user-visible behaviour, written against docs/CONTRACTS.md
//! (CLI, log lines, YAML state) and ARCHITECTURE.md (data path, HBONE). Each test builds its own
//! small cluster and asserts only what a user of the mesh could observe: bytes arriving intact,
//! who answered, which source address the server saw, what crossed the fabric, and the log.
//!
//! Needs root and a built `ztunnel` (ZTUNNEL_BIN or `<target>/debug/ztunnel`); `cargo xtask
//! test` provides both. Without root the tests fail, they never skip.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::bpf::{netns_programs, Attachment};
use mesh_tests::cluster::{
    field, message, Cluster, ClusterSpec, Daemon, Pod, PodSpec, SvcSpec, DATAPLANE_MODE, PODS_FILE,
    SERVICES_FILE,
};
use mesh_tests::pcap::{Pcap, TCP};
use mesh_tests::testkit::{at, eventually, ok, start_with_daemons};
use serde_json::{json, Value};

const HBONE: u16 = 15008;
const LOG_WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1024 * 1024;

fn start(spec: ClusterSpec) -> Cluster {
    Cluster::start(spec).expect("cluster starts")
}

fn ip_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

fn is_access(l: &Value) -> bool {
    message(l) == "access"
}

fn has_error(l: &Value) -> bool {
    l.get("error")
        .is_some_and(|e| !e.is_null() && e != &json!(""))
}

/// Waits for a `state applied` line after `skip` lines satisfying `pred`.
fn wait_applied(d: &Daemon, skip: usize, pred: impl Fn(&Value) -> bool) -> Value {
    d.wait_for_log_after(skip, |l| message(l) == "state applied" && pred(l), LOG_WAIT)
        .unwrap_or_else(|e| panic!("waiting for `state applied`: {e:#}"))
}

/// Number of non-empty lines `ss` prints (one per socket).
fn ss_count(cluster: &Cluster, node: usize, filter: &[&str]) -> usize {
    let mut args = vec!["-tnH", "state", "established"];
    args.extend_from_slice(filter);
    let out = cluster.node_exec(node, "ss", &args).expect("ss runs");
    assert!(
        out.status.success(),
        "ss {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn pod_ss_count(pod: &Pod, filter: &str) -> usize {
    let out = pod
        .exec("ss", ["-tnH", "state", "established", filter])
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Node (192.168.200.0/24) or pod (10.244.0.0/16) address.
fn cluster_addr(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    (o[0], o[1]) == (10, 244) || (o[0], o[1], o[2]) == (192, 168, 200)
}

/// Every IPv4 packet between node and pod addresses on the fabric is TCP to or from port
/// 15008. (Link-level chatter such as ARP or multicast is not the daemon's and not checked.)
fn assert_only_hbone(pcap: &Pcap) {
    let stray: Vec<String> = pcap
        .packets
        .iter()
        .filter(|p| cluster_addr(p.src) && cluster_addr(p.dst))
        .filter(|p| p.proto != TCP || !p.has_port(HBONE))
        .map(|p| {
            format!(
                "{}:{} -> {}:{} proto {}",
                p.src, p.sport, p.dst, p.dport, p.proto
            )
        })
        .collect();
    assert!(
        stray.is_empty(),
        "fabric carried non-HBONE packets: {:?}\nflows:\n{}",
        &stray[..stray.len().min(10)],
        pcap.summary()
    );
}

fn two_pods(ambient: bool) -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", ambient)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"))
}

#[test]
fn cross_node_bytes_intact_and_encrypted() {
    let cluster = start_with_daemons(two_pods(true));
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sa = a.serve(8080, "a").expect("serve a");
    let _sb = b.serve(8080, "b").expect("serve b");
    let marker = format!("ZTSECRET-{}", cluster.prefix());
    let capture = cluster.capture_fabric("").expect("capture");

    let r = ok(
        a.send(&SendOpts::to(&at(&b, 8080)).bytes(MIB).marker(&marker))
            .expect("runs"),
        "a -> b",
    );
    assert_eq!(r.servers(), ["b".to_string()].into());
    let r = ok(
        b.send(&SendOpts::to(&at(&a, 8080)).bytes(MIB).marker(&marker))
            .expect("runs"),
        "b -> a",
    );
    assert_eq!(r.servers(), ["a".to_string()].into());

    let pcap = capture.stop().expect("capture stops");
    assert_only_hbone(&pcap);
    // The echoed 2 x 1 MiB must have crossed inside the tunnel (plus TLS overhead). Half of
    // that is the floor: it rules out another path while tolerating a capture that missed
    // packets on a loaded machine.
    let hbone_bytes = pcap.payload_bytes_on_port(HBONE) as u64;
    assert!(
        hbone_bytes >= 2 * MIB,
        "expected the 2 x 1 MiB echo inside port 15008, saw {hbone_bytes} B:\n{}",
        pcap.summary()
    );
    assert_eq!(
        pcap.payload_ports_between(a.ip, b.ip),
        [HBONE].into(),
        "pod-to-pod flows must use port 15008 only:\n{}",
        pcap.summary()
    );
    assert!(
        !pcap.contains(marker.as_bytes()),
        "marker crossed the fabric in clear"
    );
}

#[test]
fn service_vip_reaches_both_endpoints_with_target_port() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/client", 1).sa("client"))
        .pod(
            PodSpec::new("mesh/srv-1", 1)
                .sa("server")
                .label("app", "srv"),
        )
        .pod(
            PodSpec::new("mesh/srv-2", 2)
                .sa("server")
                .label("app", "srv"),
        )
        .service(
            SvcSpec::new("mesh/srv", "10.96.0.10")
                .select("app", "srv")
                .port(80, 8080),
        );
    let cluster = start_with_daemons(spec);
    let _s1 = cluster
        .pod("mesh/srv-1")
        .serve(8080, "srv-1")
        .expect("serve");
    let _s2 = cluster
        .pod("mesh/srv-2")
        .serve(8080, "srv-2")
        .expect("serve");
    let client = cluster.pod("mesh/client").clone();

    let r = client
        .send(&SendOpts::to("10.96.0.10:80").bytes(4096).conns(20))
        .expect("runs");
    let r = ok(r, "client -> VIP");
    assert_eq!(r.conns.len(), 20);
    assert_eq!(
        r.servers(),
        ["srv-1".to_string(), "srv-2".to_string()].into(),
        "{r}"
    );
    assert_eq!(r.peer_ips(), [IpAddr::from(client.ip)].into(), "{r}");
}

#[test]
fn server_reports_client_identity() {
    let cluster = start_with_daemons(two_pods(true));
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "a -> b",
    );

    let dst = cluster
        .daemon(2)
        .wait_for_log(
            |l| {
                is_access(l)
                    && field(l, "reporter") == "destination"
                    && !field(l, "src_identity").is_empty()
            },
            LOG_WAIT,
        )
        .expect("node2 logs the inbound connection");
    assert_eq!(
        field(&dst, "src_identity"),
        "spiffe://cluster.local/ns/mesh/sa/client",
        "{dst}"
    );
    assert_eq!(
        field(&dst, "dst_identity"),
        "spiffe://cluster.local/ns/mesh/sa/server",
        "{dst}"
    );
    assert_eq!(field(&dst, "protocol"), "HBONE", "{dst}");
    assert_eq!(field(&dst, "src_workload"), "mesh/a", "{dst}");
    assert_eq!(field(&dst, "dst_workload"), "mesh/b", "{dst}");
    assert!(!has_error(&dst), "{dst}");

    let src = cluster
        .daemon(1)
        .wait_for_log(
            |l| is_access(l) && field(l, "reporter") == "source",
            LOG_WAIT,
        )
        .expect("node1 logs the outbound connection");
    assert_eq!(field(&src, "dst_identity"), b.identity(), "{src}");
    assert_eq!(field(&src, "src_identity"), a.identity(), "{src}");
    assert_eq!(ip_of(field(&src, "dst_addr")), Some(b.ip.into()), "{src}");
}

#[test]
fn identity_mismatch_refused() {
    let mut cluster = start(two_pods(true));
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    // node1 believes b runs as `mallory`; node2 (b's node) issues b a `server` certificate.
    let mut lie = cluster.spec().clone();
    lie.pod_mut("mesh/b").expect("b").service_account = "mallory".into();
    cluster
        .write_node_state_file(1, PODS_FILE, &lie.render_pods().expect("render"))
        .expect("write");
    cluster.start_all_daemons().expect("daemons ready");
    let _sb = b.serve(8080, "b").expect("serve b");

    let r = a
        .send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
        .expect("runs");
    assert!(
        !r.success,
        "connection to an unexpected identity must fail: {r}"
    );
    let line = cluster
        .daemon(1)
        .wait_for_log(|l| is_access(l) && has_error(l), LOG_WAIT)
        .expect("node1 logs the refused connection with an error");
    assert_eq!(ip_of(field(&line, "dst_addr")), Some(b.ip.into()), "{line}");
    let err = field(&line, "error");
    assert!(
        err.contains("spiffe://cluster.local/ns/mesh/sa/server")
            && err.contains("is not the expected spiffe://cluster.local/ns/mesh/sa/mallory"),
        "the refusal must be the identity check: {line}"
    );

    // Control: with the truth restored on node1 the same connection works.
    let skip = cluster.daemon(1).log_lines().len();
    let truth = cluster.spec().render_pods().expect("render");
    cluster
        .write_node_state_file(1, PODS_FILE, &truth)
        .expect("write");
    wait_applied(cluster.daemon(1), skip, |_| true);
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "after fixing node1's state",
    );

    // Trust-domain mismatch: node2 issues certificates for other.local from the same CA.
    let status = cluster.daemon(2).terminate().expect("node2 stops");
    assert!(status.success(), "SIGTERM exit status {status}");
    cluster
        .start_daemon(2, &["--trust-domain", "other.local"])
        .expect("node2 ready");
    let skip = cluster.daemon(1).log_lines().len();
    let r = a
        .send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
        .expect("runs");
    assert!(
        !r.success,
        "a peer from another trust domain must be refused: {r}"
    );
    // The client verifies the server first (TLS 1.3), so node1 refuses b's foreign identity.
    let line = cluster
        .daemon(1)
        .wait_for_log_after(skip, |l| is_access(l) && has_error(l), LOG_WAIT)
        .expect("node1 logs the refused connection");
    assert!(
        field(&line, "error").contains("server identity spiffe://other.local/ns/mesh/sa/"),
        "the refusal must name the foreign identity: {line}"
    );
}

#[test]
fn passthrough_and_plaintext_inbound() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("legacy/l", 2));
    let cluster = start_with_daemons(spec);
    let (a, l) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("legacy/l").clone(),
    );
    let _sa = a.serve(8080, "a").expect("serve a");
    let _sl = l.serve(8080, "l").expect("serve l");

    let r = ok(
        a.send(&SendOpts::to(&at(&l, 8080))).expect("runs"),
        "enrolled -> legacy",
    );
    assert_eq!(r.servers(), ["l".to_string()].into());
    assert_eq!(r.peer_ips(), [IpAddr::from(a.ip)].into(), "{r}");

    let r = ok(
        l.send(&SendOpts::to(&at(&a, 8080))).expect("runs"),
        "legacy -> enrolled",
    );
    assert_eq!(r.servers(), ["a".to_string()].into());
    assert_eq!(r.peer_ips(), [IpAddr::from(l.ip)].into(), "{r}");
    let line = cluster
        .daemon(1)
        .wait_for_log(
            |x| {
                is_access(x)
                    && field(x, "reporter") == "destination"
                    && ip_of(field(x, "src_addr")) == Some(l.ip.into())
            },
            LOG_WAIT,
        )
        .expect("node1 logs the plaintext inbound connection");
    assert_eq!(field(&line, "protocol"), "TCP", "{line}");
    assert_eq!(
        field(&line, "src_identity"),
        "",
        "no peer identity on plaintext: {line}"
    );
    assert_eq!(field(&line, "dst_workload"), "mesh/a", "{line}");
    assert!(!has_error(&line), "{line}");
}

#[test]
fn source_ip_preserved() {
    let spec = two_pods(true).pod(PodSpec::new("mesh/c", 1).sa("server"));
    let cluster = start_with_daemons(spec);
    let (a, b, c) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b").clone(),
        cluster.pod("mesh/c").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    let _sc = c.serve(8080, "c").expect("serve c");
    for (to, what) in [(&b, "cross-node"), (&c, "same-node")] {
        let r = ok(
            a.send(&SendOpts::to(&at(to, 8080)).conns(3)).expect("runs"),
            what,
        );
        assert_eq!(r.peer_ips(), [IpAddr::from(a.ip)].into(), "{what}: {r}");
    }
}

#[test]
fn enrollment_follows_namespace_label() {
    let mut cluster = start_with_daemons(two_pods(false));
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    let marker = format!("ZTLABEL-{}", cluster.prefix());
    let round = |cluster: &Cluster| -> Pcap {
        let capture = cluster.capture_fabric("tcp").expect("capture");
        let opts = SendOpts::to(&at(&b, 8080)).bytes(64 * 1024).marker(&marker);
        let r = ok(a.send(&opts).expect("runs"), "a -> b");
        assert_eq!(r.peer_ips(), [IpAddr::from(a.ip)].into(), "{r}");
        capture.stop().expect("capture stops")
    };
    let direct = |pcap: &Pcap, when: &str| {
        let ports = pcap.payload_ports_between(a.ip, b.ip);
        assert_eq!(
            ports,
            [8080].into(),
            "{when}: expected a direct flow\n{}",
            pcap.summary()
        );
        assert!(
            pcap.contains(marker.as_bytes()),
            "{when}: direct traffic is plaintext"
        );
    };
    // Label changes reach every node; wait until both applied the expected enrollment.
    let relabel = |cluster: &mut Cluster, value: Option<&str>, enrolled: u64| {
        let skips: Vec<usize> = (1..=2)
            .map(|n| cluster.daemon(n).log_lines().len())
            .collect();
        cluster
            .set_namespace_label("mesh", DATAPLANE_MODE, value)
            .expect("relabel");
        for n in 1..=2 {
            wait_applied(cluster.daemon(n), skips[n - 1], |l| {
                l["enrolled"].as_u64() == Some(enrolled)
            });
        }
        // Tolerance for the capture maps to follow the logged state.
        std::thread::sleep(Duration::from_millis(500));
    };

    direct(&round(&cluster), "before labelling");

    relabel(&mut cluster, Some("ambient"), 2);
    let pcap = round(&cluster);
    assert_eq!(
        pcap.payload_ports_between(a.ip, b.ip),
        [HBONE].into(),
        "{}",
        pcap.summary()
    );
    assert!(
        !pcap.contains(marker.as_bytes()),
        "enrolled traffic crossed in clear"
    );

    relabel(&mut cluster, None, 0);
    direct(&round(&cluster), "after removing the label");
}

#[test]
fn malformed_yaml_rejected_keeps_state() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/client", 1).sa("client"))
        .pod(PodSpec::new("mesh/srv", 2).sa("server"))
        .service(
            SvcSpec::new("mesh/srv", "10.96.0.10")
                .select("app", "srv")
                .port(80, 8080),
        );
    let cluster = start_with_daemons(spec);
    let client = cluster.pod("mesh/client").clone();
    let _s = cluster.pod("mesh/srv").serve(8080, "srv").expect("serve");
    ok(
        client.send(&SendOpts::to("10.96.0.10:80")).expect("runs"),
        "before",
    );

    // Document 0: a valid new service; document 1: the existing one with a bad port.
    let mut next = cluster.spec().clone();
    next.services.insert(
        0,
        SvcSpec::new("mesh/extra", "10.96.0.11")
            .select("app", "srv")
            .port(81, 8080),
    );
    let good = next.render_services().expect("render");
    let bad = good.replace("port: 80\n", "port: abc\n");
    assert_ne!(good, bad, "test setup: the port line was not found");
    let skips: Vec<usize> = (1..=2)
        .map(|n| cluster.daemon(n).log_lines().len())
        .collect();
    cluster
        .write_state_file(SERVICES_FILE, &bad)
        .expect("write");

    for n in 1..=2 {
        let file = cluster.state_path(n, SERVICES_FILE).display().to_string();
        let line = cluster
            .daemon(n)
            .wait_for_log_after(skips[n - 1], |l| message(l) == "state rejected", LOG_WAIT)
            .expect("the bad file is rejected");
        assert_eq!(field(&line, "file"), file, "{line}");
        assert_eq!(line["document"].as_u64(), Some(1), "{line}");
        assert!(
            field(&line, "field").contains("spec.ports[0].port"),
            "{line}"
        );
        assert!(!field(&line, "error").is_empty(), "{line}");
        assert_eq!(
            line["level"].as_str().map(str::to_uppercase).as_deref(),
            Some("WARN")
        );
    }
    // The rejected document's last good version stays in force (the service keeps port 80);
    // the file's valid document is applied (documents are read one by one).
    let r = ok(
        client.send(&SendOpts::to("10.96.0.10:80")).expect("runs"),
        "after rejection",
    );
    assert_eq!(r.servers(), ["srv".to_string()].into());
    let extra = client
        .connect(
            "10.96.0.11:81".parse().expect("addr"),
            Duration::from_secs(3),
        )
        .expect("connect runs");
    assert_eq!(
        extra.result, "hello",
        "the valid document of a file with a malformed one was not applied: {extra:?}"
    );
}

#[test]
fn sigkill_restart_and_sigterm_cleanup() {
    let cluster = start_with_daemons(two_pods(true));
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "before",
    );

    // TCX links, sk_lookup and classic tc/XDP inside the node namespace (see mesh_tests::bpf
    // for why `bpftool net show` alone cannot see TCX here).
    let attached = |node: usize| -> Vec<Attachment> {
        netns_programs(&cluster.node_netns(node)).expect("query attached programs")
    };
    for n in 1..=2 {
        assert!(
            !attached(n).is_empty(),
            "node{n}: no eBPF program attached in the node namespace while the daemon runs"
        );
    }

    for n in 1..=2 {
        cluster.daemon(n).kill().expect("SIGKILL");
    }
    for n in 1..=2 {
        cluster
            .daemon(n)
            .restart()
            .expect("restarted daemon becomes ready");
    }
    let r = ok(
        a.send(&SendOpts::to(&at(&b, 8080)).conns(3)).expect("runs"),
        "after restart",
    );
    assert_eq!(r.peer_ips(), [IpAddr::from(a.ip)].into(), "{r}");
    cluster
        .daemon(2)
        .wait_for_log(
            |l| {
                is_access(l)
                    && field(l, "reporter") == "destination"
                    && field(l, "protocol") == "HBONE"
            },
            LOG_WAIT,
        )
        .expect("restarted node2 terminates HBONE");

    // SIGTERM leaves capture in place (it fails closed, tests/tests/capture.rs); `ztunnel
    // uninstall` removes every program.
    for n in 1..=2 {
        let status = cluster
            .daemon(n)
            .terminate()
            .expect("SIGTERM stops the daemon");
        assert_eq!(status.code(), Some(0), "node{n} exit status after SIGTERM");
        assert!(
            !attached(n).is_empty(),
            "node{n}: capture must stay attached after a plain SIGTERM"
        );
        cluster.daemon(n).uninstall().expect("ztunnel uninstall");
        let left = attached(n);
        assert!(
            left.is_empty(),
            "node{n}: programs left attached after uninstall: {left:?}"
        );
    }
}

#[test]
fn hbone_pooling() {
    let spec = two_pods(true).pod(PodSpec::new("mesh/c", 1).sa("other"));
    let cluster = start_with_daemons(spec);
    let (a, b, c) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b").clone(),
        cluster.pod("mesh/c").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    let to_b = |src: &Pod| -> usize {
        let (s, d) = (src.ip.to_string(), b.ip.to_string());
        ss_count(&cluster, 1, &["src", &s, "dst", &d, "dport", "=", ":15008"])
    };

    let held_a = a
        .spawn_send(&SendOpts::to(&at(&b, 8080)).conns(10).hold(12.0))
        .expect("a");
    eventually(
        Duration::from_secs(8),
        "10 connections from a established at b",
        || pod_ss_count(&b, "sport = :8080") >= 10,
    );
    assert_eq!(
        to_b(&a),
        4,
        "a's 10 concurrent flows get 4 HBONE connections (--hbone-spread), then share them"
    );

    let held_c = c
        .spawn_send(&SendOpts::to(&at(&b, 8080)).conns(10).hold(3.0))
        .expect("c");
    eventually(
        Duration::from_secs(8),
        "20 connections established at b",
        || pod_ss_count(&b, "sport = :8080") >= 20,
    );
    assert_eq!(
        to_b(&c),
        4,
        "c (other identity) gets connections of its own, never a's"
    );
    assert_eq!(to_b(&a), 4, "a still has its 4");
    let all = ss_count(
        &cluster,
        1,
        &["dst", &b.ip.to_string(), "dport", "=", ":15008"],
    );
    assert_eq!(
        all, 8,
        "node1 holds 4 HBONE connections per source identity"
    );

    ok(held_c.wait().expect("c finishes"), "c's held connections");
    ok(held_a.wait().expect("a finishes"), "a's held connections");
}

#[test]
fn hbone_stream_cap_and_idle_release() {
    let mut cluster = start(two_pods(true));
    for n in 1..=2 {
        cluster
            .start_daemon(
                n,
                &[
                    "--hbone-max-streams",
                    "4",
                    "--hbone-spread",
                    "1",
                    "--hbone-idle-timeout",
                    "2s",
                ],
            )
            .expect("daemon ready");
    }
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    let to_b = || {
        let (s, d) = (a.ip.to_string(), b.ip.to_string());
        ss_count(&cluster, 1, &["src", &s, "dst", &d, "dport", "=", ":15008"])
    };

    let held = a
        .spawn_send(&SendOpts::to(&at(&b, 8080)).conns(10).hold(3.0))
        .expect("a");
    eventually(
        Duration::from_secs(8),
        "10 connections from a established at b",
        || pod_ss_count(&b, "sport = :8080") >= 10,
    );
    assert_eq!(
        to_b(),
        3,
        "10 flows at 4 streams per connection need 3 connections"
    );
    ok(held.wait().expect("a finishes"), "a's held connections");

    // Idle for longer than --hbone-idle-timeout: the pool lets the connections go.
    eventually(
        Duration::from_secs(10),
        "idle HBONE connections released",
        || to_b() == 0,
    );
    // And a new flow dials afresh.
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "after idle release",
    );
}
