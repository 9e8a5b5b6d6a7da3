//! Faults a node daemon must ride out, on the namespace cluster: the CA going away (the CA
//! service `ztunnel ca serve` stopped, with daemons on `--ca-address`), and the state
//! directory going away or holding a file the daemon cannot read. What a user notices is
//! asserted: flows keep working and policies keep being enforced on the last good state and
//! certificates, the problem is logged once per change and counted, `ztunnel status` names it,
//! readiness turns on only after a first good state, and everything recovers on its own.
//!
//! Needs root and a built `ztunnel`; the CA test also etcd and kube-apiserver (its name
//! contains `kube`). `cargo xtask test` provides all of them. Fails, never skips.

use std::path::PathBuf;
use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::ca_service::{cross_node_flow, issued_serial, setup, CLIENT, SERVER};
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, Daemon, PodSpec};
use mesh_tests::testkit::{at, denied_line, eventually, node_http, ok, refused, ztunnel_cli};
use serde_json::Value;

const LOG_WAIT: Duration = Duration::from_secs(15);
const POLICY_FILE: &str = "policies.yaml";
const UNREADABLE: &str = "state source unreadable; keeping last good state";

/// Log lines of `d` after `skip` with message `msg`.
fn lines_after(d: &Daemon, skip: usize, msg: &str) -> Vec<Value> {
    d.log_lines()
        .into_iter()
        .skip(skip)
        .filter(|l| message(l) == msg)
        .collect()
}

/// The value of an unlabelled counter or gauge on node `node`'s metrics port.
fn metric(c: &Cluster, node: usize, name: &str) -> f64 {
    let (_, text) = node_http(c, node, 15020, "GET", "/metrics").expect("scrape");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

fn ready(c: &Cluster, node: usize) -> u16 {
    node_http(c, node, 15021, "GET", "/healthz/ready")
        .map(|(code, _)| code)
        .unwrap_or(0)
}

#[test]
fn kube_ca_outage_keeps_certificates_backs_off_and_recovers() {
    // 70 s certificates (backdated a minute by the CA) are renewed about every 5 s.
    let mut s = setup("70s");
    let before = [
        issued_serial(&s.cluster, 1, CLIENT),
        issued_serial(&s.cluster, 2, SERVER),
    ];
    let marks: Vec<usize> = (1..=2)
        .map(|n| s.cluster.daemon(n).log_lines().len())
        .collect();
    s.ca.stop();

    // Renewal fails, is retried with a doubling wait, and each attempt is logged with the
    // current certificate still valid.
    let d1 = s.cluster.daemon(1);
    let failed = |l: &Value| message(l).starts_with("certificate issuance failed");
    eventually(
        Duration::from_secs(40),
        "three failed renewals on node1",
        || {
            d1.log_lines()
                .iter()
                .skip(marks[0])
                .filter(|l| failed(l))
                .count()
                >= 3
        },
    );
    let fails: Vec<Value> = d1
        .log_lines()
        .into_iter()
        .skip(marks[0])
        .filter(failed)
        .take(3)
        .collect();
    let backoff: Vec<&str> = fails.iter().map(|l| field(l, "retry_in")).collect();
    assert_eq!(backoff, ["500ms", "1s", "2s"], "{fails:?}");
    let attempts: Vec<Option<u64>> = fails.iter().map(|l| l["attempts"].as_u64()).collect();
    assert_eq!(attempts, [Some(1), Some(2), Some(3)], "{fails:?}");
    assert!(fails.iter().all(|l| l["still_valid"] == true), "{fails:?}");

    // Counted, and named by `ztunnel status`, while the daemon stays ready.
    let counted = metric(&s.cluster, 1, "ztunnel_certificate_issuance_failures_total");
    assert!(counted >= 3.0, "failures counted: {counted}");
    let status = ztunnel_cli(&s.cluster, 1, &["status"]);
    assert!(
        status.contains("certificate authority: failing for 1 identity") && status.contains(CLIENT),
        "{status}"
    );
    assert_eq!(ready(&s.cluster, 1), 200, "ready while the CA is away");

    // The certificates in hand keep serving flows.
    cross_node_flow(&s.cluster);
    let held = [
        issued_serial(&s.cluster, 1, CLIENT),
        issued_serial(&s.cluster, 2, SERVER),
    ];
    assert_eq!(held, before, "the current certificates are kept");

    // The CA is back: renewal succeeds on the next retry, the status clears.
    let marks: Vec<usize> = (1..=2)
        .map(|n| s.cluster.daemon(n).log_lines().len())
        .collect();
    s.ca.start();
    for (n, skip) in [(1, marks[0]), (2, marks[1])] {
        let line = s
            .cluster
            .daemon(n)
            .wait_for_log_after(
                skip,
                |l| message(l) == "certificate issuance recovered",
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("node{n} renews once the CA is back: {e:#}"));
        assert!(line["failed_attempts"].as_u64() >= Some(1), "{line}");
    }
    let status = ztunnel_cli(&s.cluster, 1, &["status"]);
    assert!(
        status.contains("certificate authority: in sync"),
        "{status}"
    );
    let after = [
        issued_serial(&s.cluster, 1, CLIENT),
        issued_serial(&s.cluster, 2, SERVER),
    ];
    assert_ne!(after[0], before[0], "node1 renewed");
    assert_ne!(after[1], before[1], "node2 renewed");
    cross_node_flow(&s.cluster);
}

/// `a` (sa client) and `c` (sa intruder) on node 1, `b` (app b) on node 2; only `client`
/// may reach `b`.
fn policy_cluster(extra: &[&str]) -> Cluster {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/c", 1).sa("intruder"))
        .pod(PodSpec::new("mesh/b", 2).sa("server").label("app", "b"));
    let mut c = Cluster::start(spec).expect("cluster starts");
    c.write_state_file(POLICY_FILE, &allow(&["cluster.local/ns/mesh/sa/client"]))
        .expect("policy");
    for n in 1..=2 {
        c.start_daemon(n, extra).expect("daemon ready");
    }
    c
}

fn allow(principals: &[&str]) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow, namespace: mesh}}\nspec: {{selector: {{matchLabels: {{app: b}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [{}]}}}}]}}]}}\n",
        principals.join(", ")
    )
}

/// `a -> b` is admitted and `c -> b` refused (and logged as denied on node 2).
fn policy_holds(c: &Cluster, what: &str) {
    let (a, b, intruder) = (c.pod("mesh/a"), c.pod("mesh/b"), c.pod("mesh/c"));
    ok(a.send(&SendOpts::to(&at(b, 8080))).expect("runs"), what);
    let skip = c.daemon(2).log_lines().len();
    refused(
        intruder.send(&SendOpts::to(&at(b, 8080))).expect("runs"),
        what,
    );
    denied_line(c.daemon(2), skip, intruder);
}

/// The state directory of node `n` moved away (as a deleted ConfigMap volume would be), and
/// back on drop.
struct Moved(PathBuf, PathBuf);

impl Moved {
    fn away(c: &Cluster, n: usize) -> Moved {
        let dir = c.state_dir(n);
        let aside = dir.with_extension("moved");
        std::fs::rename(&dir, &aside).expect("move the state directory away");
        Moved(dir, aside)
    }
}

impl Drop for Moved {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.1, &self.0);
    }
}

#[test]
fn state_dir_gone_keeps_the_last_state_logs_once_and_stays_ready() {
    let c = policy_cluster(&[]);
    let _b = c.pod("mesh/b").serve(8080, "b").expect("serve b");
    policy_holds(&c, "before");

    let skips: Vec<usize> = (1..=2).map(|n| c.daemon(n).log_lines().len()).collect();
    let moved: Vec<Moved> = (1..=2).map(|n| Moved::away(&c, n)).collect();
    for n in 1..=2 {
        c.daemon(n)
            .wait_for_log_after(skips[n - 1], |l| message(l) == UNREADABLE, LOG_WAIT)
            .unwrap_or_else(|e| panic!("node{n} logs the missing directory: {e:#}"));
    }
    // A few seconds of 500 ms polls: still one line each (logged per change, not per poll).
    std::thread::sleep(Duration::from_secs(3));
    for n in 1..=2 {
        let lines = lines_after(c.daemon(n), skips[n - 1], UNREADABLE);
        assert_eq!(lines.len(), 1, "node{n}: {lines:?}");
        let dir = c.state_dir(n).display().to_string();
        assert!(field(&lines[0], "error").contains(&dir), "{}", lines[0]);
    }

    // The last state stays in force: flows work, the policy is enforced, the daemons stay
    // ready, and the staleness shows.
    policy_holds(&c, "state directory gone");
    for n in 1..=2 {
        assert_eq!(ready(&c, n), 200, "node{n} stays ready");
        let status = ztunnel_cli(&c, n, &["status"]);
        assert!(status.contains("state source: file, stale for"), "{status}");
        assert_eq!(metric(&c, n, "ztunnel_state_source_in_sync"), 0.0);
    }

    // Back: current again, logged, and the state is the same.
    drop(moved);
    for n in 1..=2 {
        c.daemon(n)
            .wait_for_log_after(
                skips[n - 1],
                |l| message(l) == "state source current again",
                LOG_WAIT,
            )
            .unwrap_or_else(|e| panic!("node{n} recovers: {e:#}"));
        let status = ztunnel_cli(&c, n, &["status"]);
        assert!(status.contains("state source: file, in sync"), "{status}");
    }
    policy_holds(&c, "state directory back");
}

/// A file over `--state-max-file-size` (a comment is enough: the size is checked before any
/// parsing).
fn oversized() -> String {
    format!("# {}\n", "x".repeat(100 * 1024))
}

#[test]
fn unreadable_state_file_never_stops_the_others_and_blocks_only_the_first_readiness() {
    let mut c = policy_cluster(&["--state-max-file-size", "64KiB"]);
    let (a, b, intruder) = (
        c.pod("mesh/a").clone(),
        c.pod("mesh/b").clone(),
        c.pod("mesh/c").clone(),
    );
    let _b = b.serve(8080, "b").expect("serve b");
    let d2 = c.daemon(2);

    // An oversized file and one that is not UTF-8 appear; the policy file changes meanwhile.
    let skip = d2.log_lines().len();
    c.write_node_state_file(2, "big.yaml", &oversized())
        .expect("big file");
    std::fs::write(c.state_path(2, "junk.yaml"), b"kind: \xff\xfe\n").expect("junk file");
    c.write_node_state_file(
        2,
        POLICY_FILE,
        &allow(&[
            "cluster.local/ns/mesh/sa/client",
            "cluster.local/ns/mesh/sa/intruder",
        ]),
    )
    .expect("policy update");
    d2.wait_for_log_after(skip, |l| message(l) == "state applied", LOG_WAIT)
        .expect("the policy update is applied despite the bad files");
    std::thread::sleep(Duration::from_secs(2));
    let bad = lines_after(d2, skip, "state file unreadable");
    let big = c.state_path(2, "big.yaml").display().to_string();
    let junk = c.state_path(2, "junk.yaml").display().to_string();
    assert_eq!(bad.len(), 2, "one line per bad file, not per poll: {bad:?}");
    let big_line = bad
        .iter()
        .find(|l| field(l, "file") == big)
        .unwrap_or_else(|| panic!("{bad:?}"));
    assert!(
        field(big_line, "error").contains("65536-byte limit (--state-max-file-size)"),
        "{big_line}"
    );
    assert!(bad.iter().any(|l| field(l, "file") == junk), "{bad:?}");
    ok(
        intruder.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "the new policy admits the intruder",
    );
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "a -> b",
    );
    assert_eq!(ready(&c, 2), 200, "a running daemon stays ready");
    let status = ztunnel_cli(&c, 2, &["status"]);
    assert!(status.contains(&big) && status.contains(&junk), "{status}");
    std::fs::remove_file(c.state_path(2, "junk.yaml")).expect("rm junk");

    // A daemon started with the oversized file present is not ready: that file's pods could
    // be missing. Once the file is fixed it becomes ready.
    d2.terminate().expect("node2 stops");
    c.start_daemon_unready(2, &["--state-max-file-size", "64KiB"])
        .expect("node2 starts")
        .wait_for_log(|l| message(l) == "state file unreadable", LOG_WAIT)
        .expect("the big file is named at start");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ready(&c, 2), 503, "not ready before a complete first state");
    c.write_node_state_file(2, "big.yaml", "# fixed\n")
        .expect("fix the file");
    c.daemon(2)
        .wait_ready()
        .expect("ready once every file reads");
    ok(
        intruder.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "after restart",
    );
}
