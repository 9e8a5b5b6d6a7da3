//! No plaintext window at pod start: pods created through a real CNI chain (Debian's `ptp` +
//! `host-local`, then `ztunnel-cni`, run as a container runtime runs them) are captured when
//! ADD returns, before the daemon's state shows them (docs/CNI.md). The chain is the node's
//! conflist as the installer leaves it: the primary CNI's file with `ptp` alone, `ztunnel-cni`
//! added by `ztunnel cni install` (or the daemon's `--cni-install`) and run from the node's
//! CNI binary directory where the installer copied it.
//!
//! - the daemon started with `--cni-install` before the primary CNI has written its conflist
//!   adds the plugin once it appears, adds it back within seconds when the primary CNI
//!   rewrites the file without it, the pods of the installed chain are captured, and `ztunnel
//!   uninstall` leaves the primary's conflist as it was and removes the binary;
//! - with `--cni-owner` (on `--source kube`), a daemon that stops while its DaemonSet exists
//!   leaves the plugin in place (a restart, an upgrade), and one that stops after the
//!   DaemonSet was deleted removes it from the node, also when its binding and service account
//!   went with it (as `helm uninstall` deletes them);
//! - an enrolled pod connecting to a pod on the other node at once after ADD returns (the
//!   connect starts within 1 ms) is captured: the fabric carries only TLS on 15008 and never
//!   the payload; the connection is held until the state names the pod, then carries its
//!   identity; DEL removes the capture;
//! - with the node's daemon stopped, ADD in an enrolled namespace fails with a CNI error
//!   naming the cause, and DEL (as the runtime runs it after a failed ADD) succeeds;
//! - a pod of a namespace that is not enrolled starts and is not captured.
//!
//! Needs root, a built `ztunnel` and `ztunnel-cni`, and `containernetworking-plugins`;
//! `cargo xtask test` provides them. Never skips.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, CniSandbox, PodSpec};
use mesh_tests::testkit::{node_http, ok, start_with_daemons};
use nix::sched::CloneFlags;
use serde_json::Value;

const PORT: u16 = 8080;
const HBONE: u16 = 15008;
const WAIT: Duration = Duration::from_secs(15);

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("plain", false)
        .pod(PodSpec::new("mesh/b", 2).sa("server"))
}

/// Runs `f` on a scoped thread that joined the sandbox's network namespace (as the pod's
/// first process would be), so it can run the CNI chain (whose plugins enter the node's
/// namespace themselves) and connect the moment ADD returns.
fn in_sandbox<T: Send>(sandbox: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{sandbox}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in the sandbox panicked"))?
    })
}

/// The enrolled pod addresses node `node`'s capture shows (`/config_dump`).
fn enrolled(c: &Cluster, node: usize) -> Vec<String> {
    let (status, body) = node_http(c, node, 15000, "GET", "/config_dump").expect("config dump");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["capture"]["enrolled"]
        .as_array()
        .unwrap_or_else(|| panic!("no capture.enrolled in {}", v["capture"]))
        .iter()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// Runs the chain's ADD, asserting both plugins succeeded.
fn add_ok(c: &Cluster, sandbox: &mut CniSandbox) {
    let outs = c.cni_add(sandbox).expect("CNI chain runs");
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.success),
        "ADD failed: {outs:?}"
    );
}

#[test]
fn pod_is_captured_before_the_state_knows_it() {
    let mut c = start_with_daemons(spec());
    let b = c.pod("mesh/b").clone();
    let _server = b.serve(PORT, "b").expect("server");
    let mut sandbox = c
        .cni_sandbox(PodSpec::new("mesh/newcomer", 1).sa("newcomer"))
        .expect("sandbox");
    let marker = "CNI-FIRST-PACKET-MARKER";
    let capture = c.capture_fabric("").expect("fabric capture");

    // ADD, then connect at once from inside the pod; the state has not heard of the pod.
    let to = SocketAddr::from((b.ip, PORT));
    let netns = sandbox.netns.clone();
    let (gap, stream) = in_sandbox(&netns, || {
        let outs = c.cni_add(&mut sandbox)?;
        let returned = Instant::now();
        anyhow::ensure!(
            outs.len() == 2 && outs.iter().all(|o| o.success),
            "ADD failed: {outs:?}"
        );
        // The SYN leaves in this connect() call.
        let connecting = Instant::now();
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5));
        Ok((connecting - returned, stream))
    })
    .expect("ADD and connect");
    eprintln!("connect started {gap:?} after ADD returned");
    assert!(
        gap < Duration::from_millis(1),
        "connect started {gap:?} after ADD"
    );
    let mut stream = stream.expect("the connect is accepted (by the daemon's outbound listener)");
    let pod = c.cni_pod(&sandbox).expect("pod address");
    assert!(
        enrolled(&c, 1).contains(&pod.ip.to_string()),
        "ADD returned before {} was enrolled",
        pod.ip
    );
    let state = node_http(&c, 1, 15000, "GET", "/config_dump")
        .expect("dump")
        .1;
    let v: Value = serde_json::from_str(&state).expect("json");
    assert!(
        !v["workloads"].to_string().contains(&pod.ip.to_string()),
        "the state should not know the pod yet"
    );
    stream
        .write_all(marker.repeat(40).as_bytes())
        .expect("payload written");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    // Held: nothing of the flow crosses the fabric while the state does not know the pod.
    std::thread::sleep(Duration::from_millis(1000));
    let before = capture.stop().expect("capture");
    assert!(
        !before
            .tuples()
            .iter()
            .any(|(s, d, _)| *s == pod.ip || *d == pod.ip),
        "nothing of the new pod on the fabric before the state knows it:\n{}",
        before.summary()
    );
    assert!(!before.contains(marker.as_bytes()), "{}", before.summary());
    let capture = c.capture_fabric("").expect("fabric capture");
    let published = Instant::now();
    c.publish_cni_pod(&sandbox)
        .expect("pod published to the state");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut hello = String::new();
    reader
        .read_line(&mut hello)
        .expect("greeting arrives once the pod is known");
    eprintln!(
        "held connection went through {:?} after the pod was published",
        published.elapsed()
    );
    assert!(
        hello.starts_with("HELLO b ") && hello.contains(&format!("{}:", pod.ip)),
        "the server sees the new pod's own address: {hello:?}"
    );
    let mut echo = vec![0u8; marker.len() * 40];
    reader.read_exact(&mut echo).expect("echo");
    assert_eq!(echo, marker.repeat(40).as_bytes());
    drop(reader);
    drop(stream);

    // The held connection carried the pod's identity: the certificate node2 verified, and
    // node1's own report of it.
    let from_pod = |l: &Value, reporter: &str| {
        message(l) == "access"
            && field(l, "reporter") == reporter
            && field(l, "src_addr").starts_with(&format!("{}:", pod.ip))
    };
    let line = c
        .daemon(2)
        .wait_for_log(|l| from_pod(l, "destination"), WAIT)
        .expect("node2 logs the flow");
    assert_eq!(field(&line, "src_identity"), pod.identity(), "{line}");
    assert_eq!(field(&line, "protocol"), "HBONE", "{line}");
    let line = c
        .daemon(1)
        .wait_for_log(|l| from_pod(l, "source"), WAIT)
        .expect("node1 logs the flow");
    assert_eq!(field(&line, "src_identity"), pod.identity(), "{line}");
    assert_eq!(field(&line, "src_workload"), "mesh/newcomer", "{line}");
    // A second connection, now that the state has the pod, carries its identity too.
    ok(
        pod.send(&SendOpts::to(&format!("{}:{PORT}", b.ip)).marker(marker))
            .expect("send"),
        "second connection",
    );
    let pcap = capture.stop().expect("capture");
    assert!(
        !pcap.contains(marker.as_bytes()),
        "marker in clear on the fabric:\n{}",
        pcap.summary()
    );
    let ports = pcap.payload_ports_between(pod.ip, b.ip);
    assert_eq!(
        ports,
        [HBONE].into(),
        "between the new pod and b only HBONE:\n{}",
        pcap.summary()
    );

    let (_, metrics) = node_http(&c, 1, 15020, "GET", "/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"ztunnel_cni_requests_total{action="add",result="captured"} 1"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("cni"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // DEL: the CNI chain tears the pod down; its announcement is gone.
    let outs = c.cni_del(&sandbox).expect("DEL runs");
    assert!(outs.iter().all(|o| o.success), "{outs:?}");
    c.daemon(1)
        .wait_for_log(
            |l| message(l) == "cni: DEL" && field(l, "pod") == "mesh/newcomer",
            WAIT,
        )
        .expect("node1 got the DEL");
}

#[test]
fn add_fails_closed_without_the_daemon_and_del_succeeds() {
    let mut c = start_with_daemons(spec());
    c.daemon(1).terminate().expect("node1 daemon stops");
    let mut sandbox = c
        .cni_sandbox(PodSpec::new("mesh/orphan", 1))
        .expect("sandbox");
    let outs = c.cni_add(&mut sandbox).expect("CNI chain runs");
    let last = outs.last().expect("plugins ran");
    assert_eq!(last.plugin, "ztunnel-cni", "{outs:?}");
    assert!(!last.success, "ADD must fail without the daemon: {outs:?}");
    let (code, msg) = last
        .error()
        .unwrap_or_else(|| panic!("no CNI error: {last:?}"));
    assert_eq!(code, 11, "try again later: {msg}");
    let socket = c.cni_socket(1).display().to_string();
    assert!(
        msg.contains("unreachable") && msg.contains(&socket),
        "the error names the cause: {msg}"
    );
    // The runtime runs DEL after a failed ADD; it must succeed with the daemon still away.
    let outs = c.cni_del(&sandbox).expect("DEL runs");
    assert!(
        outs.len() == 2 && outs.iter().all(|o| o.success && o.stdout.is_empty()),
        "DEL must always succeed: {outs:?}"
    );
}

#[test]
fn pod_of_a_namespace_not_enrolled_starts_uncaptured() {
    let mut c = start_with_daemons(spec());
    let b = c.pod("mesh/b").clone();
    let _server = b.serve(PORT, "b").expect("server");
    let mut sandbox = c
        .cni_sandbox(PodSpec::new("plain/outsider", 1))
        .expect("sandbox");
    add_ok(&c, &mut sandbox);
    let pod = c.publish_cni_pod(&sandbox).expect("published");
    assert!(
        !enrolled(&c, 1).contains(&pod.ip.to_string()),
        "{} must not be captured",
        pod.ip
    );
    let marker = "NOT-ENROLLED-PLAINTEXT";
    let capture = c.capture_fabric("").expect("fabric capture");
    ok(
        pod.send(&SendOpts::to(&format!("{}:{PORT}", b.ip)).marker(marker))
            .expect("send"),
        "plaintext connection",
    );
    let pcap = capture.stop().expect("capture");
    // Not captured on node1: it leaves in clear, to b's own port (node2 takes it in as
    // plaintext to an enrolled pod, as for any non-mesh client).
    assert!(pcap.contains(marker.as_bytes()), "{}", pcap.summary());
    assert_eq!(
        pcap.payload_ports_between(pod.ip, b.ip),
        [PORT].into(),
        "{}",
        pcap.summary()
    );
    let outs = c.cni_del(&sandbox).expect("DEL runs");
    assert!(outs.iter().all(|o| o.success), "{outs:?}");
}

/// Node 1's conflist when it is `ptp` followed by the `ztunnel-cni` entry.
fn installed(c: &Cluster) -> Option<Value> {
    let list = c.cni_conflist(1).ok()?;
    let plugins = list["plugins"].as_array()?;
    (plugins.len() == 2 && plugins[1]["type"] == "ztunnel-cni").then_some(list.clone())
}

/// Waits for [`installed`], saying how long it took.
fn wait_installed(c: &Cluster, what: &str) -> Value {
    let since = Instant::now();
    while since.elapsed() < WAIT {
        if let Some(list) = installed(c) {
            eprintln!("{what}: entry in place {:?} after", since.elapsed());
            return list;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: no ztunnel-cni entry in {:?}", c.cni_conflist(1));
}

#[test]
fn the_daemon_installs_the_plugin_and_keeps_it_in_the_conflist() {
    let mut c = Cluster::start(ClusterSpec::new(1).namespace("mesh", true)).expect("cluster");
    let conf_dir = c.cni_conf_dir(1);
    let binary = c.cni_bin_dir(1).join("ztunnel-cni");
    std::fs::create_dir_all(c.cni_bin_dir(1)).expect("bin dir");
    // The daemon may start before the node's primary CNI has written its configuration.
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    let plugin = mesh_tests::cni_plugin_bin();
    let plugin = plugin.to_str().expect("utf-8 path");
    c.start_daemon(1, &["--cni-install", "--cni-plugin-binary", plugin])
        .expect("daemon ready");
    c.daemon(1)
        .wait_for_log(
            |l| {
                message(l) == "cni install: ztunnel-cni is not installed on the node"
                    && field(l, "error").contains("no CNI network configuration")
            },
            WAIT,
        )
        .expect("the daemon says it waits for the primary CNI");
    let primary = c.cni_primary(1).expect("primary conflist");
    let list = wait_installed(&c, "primary written");
    assert_eq!(
        list["plugins"][0], primary["plugins"][0],
        "ptp kept as it was"
    );
    let entry = &list["plugins"][1];
    assert_eq!(entry["socket"], c.cni_socket(1).display().to_string());
    assert_eq!(entry["failOpen"], false);
    assert_eq!(
        entry["excludeNamespaces"],
        serde_json::json!(["kube-system"])
    );
    assert_eq!(
        std::fs::read(&binary).expect("installed binary"),
        std::fs::read(plugin).expect("built binary"),
        "the binary is the built plugin"
    );

    // The primary CNI rewrites its conflist (a restart, an upgrade): the entry comes back.
    c.cni_primary(1).expect("rewritten");
    let restored = Instant::now();
    wait_installed(&c, "primary rewritten");
    assert!(
        restored.elapsed() < Duration::from_secs(10),
        "restored within the 2 s check (on a busy host): {:?}",
        restored.elapsed()
    );
    let (_, metrics) = node_http(&c, 1, 15020, "GET", "/metrics").expect("metrics");
    for line in [
        "ztunnel_cni_plugin_installed 1",
        r#"ztunnel_cni_install_writes_total{file="config"} 2"#,
        r#"ztunnel_cni_install_writes_total{file="binary"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // A pod created through the installed chain is captured when ADD returns.
    let mut sandbox = c
        .cni_sandbox(PodSpec::new("mesh/installed", 1))
        .expect("sandbox");
    add_ok(&c, &mut sandbox);
    let pod = c.cni_pod(&sandbox).expect("pod address");
    assert!(
        enrolled(&c, 1).contains(&pod.ip.to_string()),
        "{} captured through the installed chain",
        pod.ip
    );
    let outs = c.cni_del(&sandbox).expect("DEL runs");
    assert!(outs.iter().all(|o| o.success), "{outs:?}");

    // The entry stays when the daemon stops (the plugin fails closed); uninstall removes it.
    c.daemon(1).terminate().expect("daemon stops");
    assert!(installed(&c).is_some(), "the entry outlives the daemon");
    let out = c.daemon(1).uninstall().expect("ztunnel uninstall");
    assert!(out.contains("cni plugin uninstalled"), "{out}");
    assert_eq!(
        c.cni_conflist(1).expect("conflist"),
        primary,
        "the primary CNI's chain as it wrote it"
    );
    assert!(!binary.exists(), "binary removed");
}

const DAEMONSET: &str = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: ztunnel, \
     namespace: istio-system}\nspec:\n  selector: {matchLabels: {app: ztunnel}}\n  template:\n    \
     metadata: {labels: {app: ztunnel}}\n    spec: {containers: [{name: ztunnel, image: \
     localhost/ztunnel}]}\n";

/// Stops node 1's daemon and returns why it said it removed the plugin (its `reason`), or
/// `None` when it said the plugin stays.
fn stop_and_wait_verdict(c: &Cluster) -> Option<String> {
    let skip = c.daemon(1).log_lines().len();
    c.daemon(1).terminate().expect("daemon stops");
    let line = c
        .daemon(1)
        .wait_for_log_after(
            skip,
            |l| message(l).starts_with("cni install: the DaemonSet"),
            WAIT,
        )
        .expect("the daemon checked its DaemonSet");
    (message(&line) == "cni install: the DaemonSet is gone; ztunnel-cni removed from the node")
        .then(|| field(&line, "reason").to_string())
}

#[test]
fn the_plugin_leaves_the_node_with_its_daemonset_kube() {
    let mut c = Cluster::start_kube(ClusterSpec::new(1).namespace("mesh", true))
        .expect("cluster with an API server");
    let create_daemonset = |c: &Cluster| {
        c.kube()
            .api
            .apply(DAEMONSET)
            .expect("the DaemonSet object (no kubelet runs it)");
    };
    create_daemonset(&c);
    let binary = c.cni_bin_dir(1).join("ztunnel-cni");
    std::fs::create_dir_all(c.cni_bin_dir(1)).expect("bin dir");
    let primary = c.cni_primary(1).expect("primary conflist");
    let plugin = mesh_tests::cni_plugin_bin();
    let flags = [
        "--cni-install",
        "--cni-owner",
        "istio-system/ztunnel",
        "--cni-plugin-binary",
        plugin.to_str().expect("utf-8 path"),
    ];
    let removed = |c: &Cluster, what: &str| {
        assert_eq!(
            c.cni_conflist(1).expect("conflist"),
            primary,
            "{what}: the primary CNI's chain as it wrote it"
        );
        assert!(!binary.exists(), "{what}: binary removed");
    };

    // A restart or an upgrade: the DaemonSet is still there, so the plugin stays.
    c.start_daemon(1, &flags).expect("daemon ready");
    wait_installed(&c, "first start");
    assert_eq!(stop_and_wait_verdict(&c), None, "kept across a restart");
    assert!(
        installed(&c).is_some() && binary.exists(),
        "kept across a restart"
    );

    // The DaemonSet deleted: the daemon finds it gone and takes the plugin away.
    c.start_daemon(1, &flags).expect("daemon ready again");
    c.kube()
        .api
        .kubectl(&["delete", "daemonset", "ztunnel", "-n", "istio-system"])
        .expect("deleting the DaemonSet");
    let reason = stop_and_wait_verdict(&c).expect("removed once the DaemonSet is deleted");
    assert_eq!(reason, "not found");
    removed(&c, "DaemonSet deleted");

    // `helm uninstall` deletes the DaemonSet, the daemon's binding and its service account
    // together, so its read may be refused by the time it stops: that counts as gone too.
    create_daemonset(&c);
    c.start_daemon(1, &flags)
        .expect("daemon ready a third time");
    wait_installed(&c, "third start");
    for args in [
        &["delete", "daemonset", "ztunnel", "-n", "istio-system"][..],
        &["delete", "clusterrolebinding", "ztunnel"],
        &["delete", "serviceaccount", "ztunnel", "-n", "istio-system"],
    ] {
        c.kube().api.kubectl(args).expect("kubectl delete");
    }
    let reason = stop_and_wait_verdict(&c).expect("removed after the release's deletion");
    eprintln!("removed after the release's deletion because: {reason}");
    assert!(
        reason.contains("403") || reason.contains("401") || reason == "not found",
        "{reason}"
    );
    removed(&c, "release deleted");
}
