//! Checks of the harness itself, without any daemon: the topology of CONTRACTS.md carries
//! traffic directly, isolates the cluster, and teardown removes it. If these fail, no other
//! acceptance test result means anything.

use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{Cluster, ClusterSpec, PodSpec, SvcSpec};

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("plain", false)
        .pod(PodSpec::new("plain/a", 1))
        .pod(PodSpec::new("plain/b", 2))
        .pod(PodSpec::new("plain/c", 1))
        .service(
            SvcSpec::new("plain/svc", "10.96.0.10")
                .select("app", "b")
                .port(80, 8080),
        )
}

#[test]
fn direct_pod_connectivity_without_daemons() {
    let cluster = Cluster::start(spec()).expect("cluster starts");
    let a = cluster.pod("plain/a").clone();
    let b = cluster.pod("plain/b").clone();
    let c = cluster.pod("plain/c").clone();
    assert_eq!(a.ip.to_string(), "10.244.1.11");
    assert_eq!(b.ip.to_string(), "10.244.2.11");
    assert_eq!(c.ip.to_string(), "10.244.1.12");

    let _sb = b.serve(8080, "b").expect("serve b");
    let _sc = c.serve(8080, "c").expect("serve c");
    let capture = cluster.capture_fabric("").expect("capture");

    // Cross-node and same-node, with the source address preserved (no NAT anywhere).
    let r = a
        .send(
            &SendOpts::to("10.244.2.11:8080")
                .bytes(256 * 1024)
                .marker("PLAINMARK")
                .conns(3),
        )
        .expect("runs");
    r.check().expect("cross-node transfer");
    assert_eq!(r.servers(), ["b".to_string()].into());
    assert_eq!(r.peer_ips(), [a.ip.into()].into(), "{r}");
    let r = a.send(&SendOpts::to("10.244.1.12:8080")).expect("runs");
    r.check().expect("same-node transfer");
    assert_eq!(r.peer_ips(), [a.ip.into()].into(), "{r}");
    let r = b.send(&SendOpts::to("10.244.1.11:8080")).expect("runs");
    assert!(!r.success, "nothing listens on a: {r}");

    // Without daemons the fabric carries the plain flow, marker visible: the capture works.
    let pcap = capture.stop().expect("capture stops");
    assert!(
        pcap.payload_ports_between(a.ip, b.ip).contains(&8080),
        "{}",
        pcap.summary()
    );
    assert!(
        pcap.contains(b"PLAINMARK"),
        "marker must be visible in clear without a mesh"
    );
    // The fabric is quiet apart from our traffic (no IGMP from the bridge, no IPv6 chatter
    // parsed as IPv4): captures in the acceptance tests show only what the cluster sent.
    let noise: Vec<_> = pcap.packets.iter().filter(|p| p.proto != 6).collect();
    assert!(
        noise.is_empty(),
        "non-TCP IPv4 packets on the fabric: {noise:?}"
    );
    assert!(
        !pcap.packets.iter().any(|p| p.src == a.ip && p.dst == c.ip),
        "same-node traffic must not cross the fabric"
    );

    // Nothing routes out of the cluster: no default route, outside addresses unreachable.
    let routes = a
        .exec("ip", ["-4", "route", "show", "default"])
        .expect("ip route");
    assert!(routes.stdout.is_empty(), "pod has a default route");
    let node = cluster
        .node_exec(1, "ip", &["-4", "route", "show", "default"])
        .expect("ip route");
    assert!(node.stdout.is_empty(), "node has a default route");
    let out = a
        .connect(
            "192.0.2.1:80".parse().expect("addr"),
            Duration::from_secs(2),
        )
        .expect("connect runs");
    assert_eq!(out.result, "unreachable", "{out:?}");

    // The state the daemons would read is on disk, one directory per node.
    let pods = std::fs::read_to_string(cluster.state_path(2, "pods.yaml")).expect("pods.yaml");
    assert!(pods.contains("podIP: 10.244.1.12") && pods.contains("nodeName: node2"));
}

#[test]
fn teardown_removes_namespaces() {
    let cluster = Cluster::start(spec()).expect("cluster starts");
    let prefix = cluster.prefix().to_string();
    let workdir = cluster.workdir().to_path_buf();
    let b = cluster.pod("plain/b").clone();
    // A process left running in a pod must not keep anything alive.
    let _server = b.serve(8080, "b").expect("serve");
    let mut orphan = b.spawn("sleep", ["300"]).expect("spawn");
    drop(cluster);
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed.contains(&prefix),
        "namespaces left behind:\n{listed}"
    );
    assert!(!workdir.exists(), "work dir left behind");
    let status = orphan.wait().expect("orphan reaped");
    assert!(!status.success(), "the process in the pod was killed");
}

/// The detach check of the acceptance tests is only meaningful if it sees TCX links (which
/// Debian's bpftool does not): attach a trivial program with a TCX link ourselves and look.
#[test]
fn bpf_query_sees_tcx_links() {
    use std::os::fd::{FromRawFd, OwnedFd};

    let cluster = Cluster::start(ClusterSpec::new(1)).expect("cluster starts");
    let netns = cluster.node_netns(1);
    let before = mesh_tests::bpf::netns_programs(&netns).expect("query");
    assert!(
        before.is_empty(),
        "fresh namespace has programs: {before:?}"
    );

    // r0 = 0 (TC_ACT_OK); exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let link = mesh_tests::bpf::in_netns(&netns, move || {
        let mut load = [0u64; 16];
        load[0] = 3 | (2 << 32); // prog_type SCHED_CLS, insn_cnt 2
        load[1] = insns.as_ptr() as u64;
        load[2] = license.as_ptr() as u64;
        // SAFETY: a zeroed bpf_attr prefix with valid pointers to data that outlives the call.
        let prog = unsafe { libc::syscall(libc::SYS_bpf, 5, load.as_ptr(), 128) };
        anyhow::ensure!(
            prog >= 0,
            "BPF_PROG_LOAD: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this fd to us.
        let prog = unsafe { OwnedFd::from_raw_fd(i32::try_from(prog)?) };
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no eth0");
        let mut create = [0u64; 8];
        create[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&prog).unsigned_abs())
            | (u64::from(ifindex) << 32);
        create[1] = 46; // attach_type BPF_TCX_INGRESS, flags 0
                        // SAFETY: as above; BPF_LINK_CREATE (28) returns a link fd.
        let link = unsafe { libc::syscall(libc::SYS_bpf, 28, create.as_ptr(), 64) };
        anyhow::ensure!(
            link >= 0,
            "BPF_LINK_CREATE: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this fd to us.
        Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(link)?) })
    })
    .expect("attach a TCX program");
    let during = mesh_tests::bpf::netns_programs(&netns).expect("query");
    assert!(
        during
            .iter()
            .any(|a| a.hook == "tcx/ingress eth0" && a.prog_ids.len() == 1),
        "TCX link not seen: {during:?}"
    );
    drop(link);
    // The kernel releases a closed link asynchronously (deferred work); under load that takes
    // a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let after = loop {
        let after = mesh_tests::bpf::netns_programs(&netns).expect("query");
        if after.is_empty() || std::time::Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(after.is_empty(), "closed link still attached: {after:?}");
}

#[test]
fn stale_namespaces_of_dead_runs_are_removed() {
    // A pid that is not running: the namespace looks like the leftover of a killed run.
    let pid = (0x3f_fff0u32..0x3f_ffffu32)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let stale = format!("zt{pid:x}x0-n1");
    let st = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(st.success(), "creating {stale}");
    let _cluster = Cluster::start(ClusterSpec::new(1)).expect("cluster starts");
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(stale.as_str())),
        "{stale} survived"
    );
}
