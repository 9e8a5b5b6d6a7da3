//! Capture fails closed and binds a pod's identity to its interface (ebpf/README.md,
//! ARCHITECTURE.md "Capture lifecycle"):
//!
//! - while no daemon runs on a node (killed, or stopped without `--detach-on-exit`), an
//!   enrolled pod's connections are held: nothing of them crosses the fabric in clear, and a
//!   restarted daemon adopts the pinned programs (same count per interface) and serves them
//!   with no manual step;
//! - `--detach-on-exit` and `ztunnel uninstall` remove programs, pins, ip rule and route;
//! - a packet from one pod's interface carrying a neighbour's address is dropped and counted,
//!   and never reaches the destination as the neighbour.
//!
//! Needs root and a built `ztunnel`; `cargo xtask test` provides both. Never skips.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, Pod, PodSpec};
use mesh_tests::testkit::{at, capture_drops, eventually, ok, pod_veth, start_with_daemons};

const HBONE: u16 = 15008;
const WAIT: Duration = Duration::from_secs(15);

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/c", 1).sa("neighbour"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"))
}

/// Programs per TCX hook in node `node`'s namespace (`tcx/ingress veth0` -> 1).
fn tcx_programs(cluster: &Cluster, node: usize) -> BTreeMap<String, usize> {
    mesh_tests::bpf::tcx_programs(&cluster.node_netns(node)).expect("query attached programs")
}

/// `ip rule` / `ip route show table all` lines of node 1 that belong to capture.
fn capture_routing(cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for args in [
        &["-4", "rule"][..],
        &["-4", "route", "show", "table", "1501"][..],
    ] {
        let o = cluster.node_exec(1, "ip", args).expect("ip runs");
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("1501"))
                .map(str::to_string),
        );
        // `ip route show table 1501` prints the routes of that table without naming it.
        if args.len() > 2 {
            out.extend(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| format!("table 1501: {l}")),
            );
        }
    }
    out
}

/// For 5 s while node 1 has no daemon: every connection from `a` to `b` fails, and the fabric
/// carries nothing between them but port 15008 (the dead daemon's HBONE sockets closing) and
/// never the payload marker.
fn assert_held(cluster: &Cluster, a: &Pod, b: &Pod, marker: &str, when: &str) {
    let capture = cluster.capture_fabric("").expect("capture");
    let start = Instant::now();
    let mut attempts = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let r = a
            .send(&SendOpts::to(&at(b, 8080)).marker(marker).timeout(1.0))
            .expect("runs");
        assert!(
            !r.success && r.conns.iter().all(|c| !c.ok),
            "{when}: a connection succeeded while node1 had no daemon: {r}"
        );
        attempts += 1;
    }
    let pcap = capture.stop().expect("capture stops");
    let stray = pcap.between_outside_tcp_port(a.ip, b.ip, HBONE);
    assert!(
        stray.is_empty(),
        "{when}: {attempts} attempts; packets between a and b outside HBONE: {stray:?}\n{}",
        pcap.summary()
    );
    assert!(
        !pcap.contains(marker.as_bytes()),
        "{when}: the payload crossed the fabric in clear"
    );
}

#[test]
fn no_daemon_holds_traffic_and_a_restart_adopts_capture() {
    let cluster = start_with_daemons(spec());
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "before",
    );
    let before = tcx_programs(&cluster, 1);
    assert!(
        before.len() >= 3 && before.values().all(|n| *n == 1),
        "one program on eth0 and each pod veth: {before:?}"
    );

    // SIGKILL: nothing runs on node 1's data path but the pinned program.
    cluster.daemon(1).kill().expect("SIGKILL");
    assert_held(&cluster, &a, &b, "MARKER-AFTER-KILL", "after SIGKILL");
    assert_eq!(
        tcx_programs(&cluster, 1),
        before,
        "the programs stay attached"
    );
    // A connection opened now waits (its SYN is dropped and retried) and completes once a
    // daemon is back, without anyone touching the node.
    let held = a
        .spawn_send(&SendOpts::to(&at(&b, 8080)).timeout(40.0))
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    cluster.daemon(1).restart().expect("restarted daemon ready");
    ok(held.wait().expect("runs"), "connection held across restart");
    assert_eq!(
        tcx_programs(&cluster, 1),
        before,
        "after restart: same program count per interface (adopted, not duplicated)"
    );
    let adopted = cluster
        .daemon(1)
        .log_lines()
        .iter()
        .filter(|l| message(l) == "capture link adopted")
        .count();
    assert_eq!(adopted, before.len(), "every link adopted");
    let r = ok(
        a.send(&SendOpts::to(&at(&b, 8080)).conns(3)).expect("runs"),
        "after restart",
    );
    assert_eq!(r.peer_ips(), [IpAddr::from(a.ip)].into(), "{r}");
    assert!(
        capture_drops(&cluster, 1, "no_daemon") > 0,
        "the drops while no daemon ran are counted"
    );

    // SIGTERM without --detach-on-exit: drained, exits 0, capture stays (fail closed).
    let status = cluster.daemon(1).terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_held(&cluster, &a, &b, "MARKER-AFTER-TERM", "after SIGTERM");
    assert_eq!(tcx_programs(&cluster, 1), before);
    cluster.daemon(1).restart().expect("restarted daemon ready");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "after the second restart",
    );
    assert_eq!(tcx_programs(&cluster, 1), before);
}

#[test]
fn detach_on_exit_and_uninstall_remove_everything() {
    let spec = ClusterSpec::new(1)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1));
    let mut cluster = Cluster::start(spec).expect("cluster");
    let nothing_left = |cluster: &Cluster, when: &str| {
        let left = tcx_programs(cluster, 1);
        assert!(left.is_empty(), "{when}: programs left: {left:?}");
        let pins = cluster.pins();
        assert!(pins.is_empty(), "{when}: pins left: {pins:?}");
        let routing = capture_routing(cluster);
        assert!(routing.is_empty(), "{when}: routing left: {routing:?}");
    };

    cluster
        .start_daemon(1, &["--detach-on-exit"])
        .expect("daemon ready");
    assert!(!tcx_programs(&cluster, 1).is_empty());
    assert!(!cluster.pins().is_empty(), "capture is pinned");
    assert_eq!(
        capture_routing(&cluster).len(),
        2,
        "ip rule and local route"
    );
    let status = cluster.daemon(1).terminate().expect("SIGTERM");
    assert_eq!(status.code(), Some(0));
    nothing_left(&cluster, "after SIGTERM with --detach-on-exit");

    // Default: a killed (or stopped) daemon leaves capture; `ztunnel uninstall` removes it.
    cluster.start_daemon(1, &[]).expect("daemon ready");
    cluster.daemon(1).kill().expect("SIGKILL");
    assert!(!tcx_programs(&cluster, 1).is_empty(), "still attached");
    let out = cluster.daemon(1).uninstall().expect("ztunnel uninstall");
    assert!(out.contains("capture uninstalled"), "{out}");
    nothing_left(&cluster, "after ztunnel uninstall");
    // Idempotent.
    cluster.daemon(1).uninstall().expect("second uninstall");
}

/// A pod that puts its neighbour's address on its own interface gets nowhere as the neighbour.
#[test]
fn spoofed_source_address_is_dropped_and_counted() {
    let cluster = start_with_daemons(spec());
    let (a, b, c) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b").clone(),
        cluster.pod("mesh/c").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    let neighbour = format!("spiffe://cluster.local/ns/mesh/sa/{}", c.service_account);
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "a as itself",
    );
    let skip = cluster.daemon(2).log_lines().len();
    let spoofed_before = capture_drops(&cluster, 1, "spoofed_source");

    // From a's network namespace: c's address on a's eth0, a connection bound to it.
    let c_addr = format!("{}/32", c.ip);
    let o = a
        .exec("ip", ["addr", "add", c_addr.as_str(), "dev", "eth0"])
        .expect("ip runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = format!(
        "import socket,sys\n\
         s=socket.socket()\n\
         s.settimeout(3)\n\
         s.bind(('{c}',0))\n\
         try:\n s.connect(('{b}',8080)); s.sendall(b'SPOOF'); print('connected'); sys.exit(0)\n\
         except Exception as e:\n print('failed', e); sys.exit(1)\n",
        c = c.ip,
        b = b.ip
    );
    let o = a
        .exec("python3", ["-c", script.as_str()])
        .expect("python3 runs");
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        !o.status.success(),
        "a connection spoofing c's address got through: {said}"
    );
    eventually(WAIT, "the spoofed SYNs counted", || {
        capture_drops(&cluster, 1, "spoofed_source") > spoofed_before
    });
    let as_neighbour: Vec<_> = cluster
        .daemon(2)
        .log_lines()
        .into_iter()
        .skip(skip)
        .filter(|l| {
            message(l) == "access"
                && (field(l, "src_identity") == neighbour
                    || field(l, "src_addr").starts_with(&format!("{}:", c.ip)))
        })
        .collect();
    assert!(
        as_neighbour.is_empty(),
        "node2 saw a flow as the neighbour: {as_neighbour:?}"
    );

    // Control: c itself is served, as c, so the check above could have seen it.
    ok(
        c.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "c as itself",
    );
    cluster
        .daemon(2)
        .wait_for_log_after(
            skip,
            |l| message(l) == "access" && field(l, "src_identity") == neighbour,
            WAIT,
        )
        .expect("node2 logs c's own flow with c's identity");
}

/// A program of the CNI's own (a classic tc filter behind ours, as a network-policy plugin
/// would attach) still runs for an enrolled pod's captured traffic: capture hands captured
/// packets on (TCX_NEXT) instead of ending the chain.
#[test]
fn another_tc_program_still_sees_captured_traffic() {
    mesh_tests::require_tool("clang", "clang").expect("clang");
    mesh_tests::require_tool("tc", "iproute2").expect("tc");
    let cluster = start_with_daemons(spec());
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _s80 = b.serve(8080, "b").expect("serve b:8080");
    let _s81 = b.serve(8081, "b").expect("serve b:8081");
    ok(
        a.send(&SendOpts::to(&at(&b, 8081))).expect("runs"),
        "b:8081 before the filter",
    );

    // The "CNI" program: drop TCP to port 8081.
    let src = cluster.workdir().join("drop8081.bpf.c");
    std::fs::write(
        &src,
        "#include <linux/bpf.h>\n#include <linux/if_ether.h>\n#include <linux/ip.h>\n\
         #include <linux/in.h>\n#include <linux/tcp.h>\n#include <linux/pkt_cls.h>\n\
         #include <bpf/bpf_helpers.h>\n#include <bpf/bpf_endian.h>\n\
         SEC(\"classifier\") int drop8081(struct __sk_buff *skb) {\n\
         void *d = (void *)(long)skb->data, *e = (void *)(long)skb->data_end;\n\
         struct ethhdr *eth = d; if ((void *)(eth + 1) > e) return TC_ACT_OK;\n\
         if (eth->h_proto != bpf_htons(ETH_P_IP)) return TC_ACT_OK;\n\
         struct iphdr *ip = (void *)(eth + 1); if ((void *)(ip + 1) > e) return TC_ACT_OK;\n\
         if (ip->protocol != IPPROTO_TCP || ip->ihl != 5) return TC_ACT_OK;\n\
         struct tcphdr *th = (void *)(ip + 1); if ((void *)(th + 1) > e) return TC_ACT_OK;\n\
         return th->dest == bpf_htons(8081) ? TC_ACT_SHOT : TC_ACT_OK; }\n\
         char LICENSE[] SEC(\"license\") = \"GPL\";\n",
    )
    .expect("write");
    let obj = src.with_extension("o");
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let out = std::process::Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", &multiarch, "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("clang");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let veth = pod_veth(&cluster, &a);
    let obj = obj.to_string_lossy().into_owned();
    for args in [
        vec!["qdisc", "add", "dev", veth.as_str(), "clsact"],
        vec![
            "filter",
            "add",
            "dev",
            veth.as_str(),
            "ingress",
            "bpf",
            "da",
            "obj",
            obj.as_str(),
            "sec",
            "classifier",
        ],
    ] {
        let o = cluster.node_exec(1, "tc", &args).expect("tc");
        assert!(
            o.status.success(),
            "tc {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    let r = a
        .send(&SendOpts::to(&at(&b, 8081)).timeout(3.0))
        .expect("runs");
    assert!(
        !r.success && r.conns.iter().all(|c| !c.ok),
        "the other program's drop of port 8081 must apply to captured traffic: {r}"
    );
    let r = ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "b:8080 with the filter",
    );
    assert_eq!(r.peer_ips(), [IpAddr::from(a.ip)].into(), "{r}");
    let programs = tcx_programs(&cluster, 1);
    assert_eq!(
        programs.get(&format!("tcx/ingress {veth}")),
        Some(&1),
        "ours is still the one TCX program there: {programs:?}"
    );
}
