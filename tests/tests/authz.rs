//! Acceptance tests of L4 authorization (AuthorizationPolicy, PeerAuthentication) on the test
//! cluster: what a client sees (admitted, refused), what the daemons log (the 401 and the
//! deciding policy), that a policy change closes open flows, and that `ztunnel authz check`
//! agrees with real traffic in every case.
//!
//! Needs root and a built `ztunnel`; `cargo xtask test` provides both. Fails, never skips.

use std::process::Command;
use std::time::Duration;

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, PodSpec};
use mesh_tests::testkit::{
    apply_policies as apply, at, denied_line, istio_policy as policy, node_http, ok, refused,
    start_with_daemons,
};
use serde_json::Value;

const LOG_WAIT: Duration = Duration::from_secs(10);

/// `ztunnel authz check` on node `n`'s state; returns (exit code, stdout).
fn authz_check(
    cluster: &Cluster,
    node: usize,
    from: &str,
    to: &str,
    extra: &[&str],
) -> (i32, String) {
    let out = Command::new(mesh_tests::ztunnel_bin())
        .args(["authz", "check", "--state"])
        .arg(cluster.state_dir(node))
        .args(["--from", from, "--to", to])
        .args(extra)
        .output()
        .expect("ztunnel authz check runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Node `node` logs an `access` line with a `deny_reason` and the 401 after its first `skip`
/// lines.
fn expect_401_access_line(cluster: &Cluster, node: usize, skip: usize) {
    let access = cluster
        .daemon(node)
        .wait_for_log_after(
            skip,
            |l| message(l) == "access" && !field(l, "deny_reason").is_empty(),
            LOG_WAIT,
        )
        .expect("destination access line with deny_reason");
    assert!(field(&access, "error").starts_with("401"), "{access}");
}

fn expect_check(cluster: &Cluster, node: usize, from: &str, to: &str, want: i32, contains: &str) {
    let (code, out) = authz_check(cluster, node, from, to, &[]);
    assert_eq!(code, want, "authz check {from} -> {to}: {out}");
    assert!(
        out.contains(contains),
        "authz check {from} -> {to}: expected `{contains}` in:\n{out}"
    );
}

#[test]
fn allow_by_principal_admits_named_client_and_401s_another() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/c", 1).sa("intruder"))
        .pod(PodSpec::new("mesh/b", 2).sa("server").label("app", "b"));
    let cluster = start_with_daemons(spec);
    let (a, b, c) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b").clone(),
        cluster.pod("mesh/c").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    apply(
        &cluster,
        &policy(
            "AuthorizationPolicy",
            "mesh",
            "allow-client",
            "{selector: {matchLabels: {app: b}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]}",
        ),
    );

    let r = ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "named client",
    );
    assert_eq!(r.servers(), ["b".to_string()].into());

    let (skip1, skip2) = (
        cluster.daemon(1).log_lines().len(),
        cluster.daemon(2).log_lines().len(),
    );
    refused(
        c.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
            .expect("runs"),
        "another client",
    );
    // Destination: the refusal names the response and the policies that were checked.
    let line = denied_line(cluster.daemon(2), skip2, &c);
    assert_eq!(field(&line, "response"), "401", "{line}");
    assert!(
        field(&line, "reason").contains("no ALLOW policy matched"),
        "{line}"
    );
    assert!(
        field(&line, "reason").contains("mesh/allow-client"),
        "{line}"
    );
    assert_eq!(
        field(&line, "src_identity"),
        "spiffe://cluster.local/ns/mesh/sa/intruder",
        "{line}"
    );
    expect_401_access_line(&cluster, 2, skip2);
    // Client side: its daemon saw the CONNECT answered with 401.
    let src_line = cluster
        .daemon(1)
        .wait_for_log_after(
            skip1,
            |l| message(l) == "access" && field(l, "src_workload") == "mesh/c",
            LOG_WAIT,
        )
        .expect("source access line");
    assert!(
        field(&src_line, "error").contains("401"),
        "client side must see the 401: {src_line}"
    );

    expect_check(
        &cluster,
        2,
        "mesh/a",
        "mesh/b:8080",
        0,
        "ALLOW: allowed by mesh/allow-client rule 0",
    );
    expect_check(
        &cluster,
        2,
        "mesh/c",
        "mesh/b:8080",
        1,
        "DENY: no ALLOW policy matched",
    );
}

#[test]
fn deny_by_namespace_refuses_cross_node_and_same_node() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("evil", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("evil/e1", 1))
        .pod(PodSpec::new("evil/e2", 2))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let cluster = start_with_daemons(spec);
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let (e1, e2) = (
        cluster.pod("evil/e1").clone(),
        cluster.pod("evil/e2").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    apply(
        &cluster,
        &policy(
            "AuthorizationPolicy",
            "mesh",
            "deny-evil",
            "{action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}",
        ),
    );
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "mesh -> mesh",
    );
    expect_check(&cluster, 2, "mesh/a", "mesh/b:8080", 0, "ALLOW");

    // Cross node (HBONE, 401) and same node (in-process, reset).
    for (e, what) in [(&e1, "cross-node"), (&e2, "same-node")] {
        let skip = cluster.daemon(2).log_lines().len();
        refused(
            e.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
                .expect("runs"),
            what,
        );
        let line = denied_line(cluster.daemon(2), skip, e);
        assert_eq!(field(&line, "policy"), "mesh/deny-evil", "{what}: {line}");
        assert_eq!(
            field(&line, "reason"),
            "denied by mesh/deny-evil rule 0",
            "{what}: {line}"
        );
        expect_check(
            &cluster,
            2,
            &e.key(),
            "mesh/b:8080",
            1,
            "DENY: denied by mesh/deny-evil rule 0",
        );
    }

    // A dry-run DENY of mesh/a is logged, not enforced.
    let dry = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry-deny-a, namespace: mesh, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]}\n";
    apply(&cluster, dry);
    let skip = cluster.daemon(2).log_lines().len();
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "dry-run DENY is not enforced",
    );
    let line = cluster
        .daemon(2)
        .wait_for_log_after(
            skip,
            |l| message(l) == "dry-run policy would change the decision (not enforced)",
            LOG_WAIT,
        )
        .expect("dry-run decision logged");
    assert_eq!(field(&line, "policy"), "mesh/dry-deny-a", "{line}");
    assert_eq!(field(&line, "dry_run"), "DENY", "{line}");
    expect_check(
        &cluster,
        2,
        "mesh/a",
        "mesh/b:8080",
        0,
        "dry-run policies would make it DENY",
    );
}

#[test]
fn strict_refuses_non_enrolled_pod_permissive_admits() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("legacy/l", 1))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let cluster = start_with_daemons(spec);
    let (l, b) = (
        cluster.pod("legacy/l").clone(),
        cluster.pod("mesh/b").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");

    apply(
        &cluster,
        &policy(
            "PeerAuthentication",
            "mesh",
            "mtls",
            "{mtls: {mode: STRICT}}",
        ),
    );
    let skip = cluster.daemon(2).log_lines().len();
    refused(
        l.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
            .expect("runs"),
        "STRICT",
    );
    let line = denied_line(cluster.daemon(2), skip, &l);
    assert_eq!(field(&line, "policy"), "mesh/mtls", "{line}");
    assert_eq!(field(&line, "response"), "reset", "{line}");
    expect_check(
        &cluster,
        2,
        "legacy/l",
        "mesh/b:8080",
        1,
        "requires mTLS (STRICT)",
    );

    apply(
        &cluster,
        &policy(
            "PeerAuthentication",
            "mesh",
            "mtls",
            "{mtls: {mode: PERMISSIVE}}",
        ),
    );
    let r = ok(
        l.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "PERMISSIVE",
    );
    assert_eq!(r.servers(), ["b".to_string()].into());
    expect_check(&cluster, 2, "legacy/l", "mesh/b:8080", 0, "ALLOW");
}

/// Seconds since midnight of a JSON log line's RFC 3339 `timestamp`.
fn log_time(line: &Value) -> f64 {
    let ts = field(line, "timestamp");
    let time = ts
        .split('T')
        .nth(1)
        .unwrap_or_else(|| panic!("no time in timestamp: {line}"))
        .trim_end_matches('Z');
    let parts: Vec<f64> = time
        .split(':')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("bad timestamp `{ts}`")))
        .collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[test]
fn deny_applied_during_long_transfer_closes_it_within_1s() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let cluster = start_with_daemons(spec);
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    // A transfer far longer than the test: 64 GiB echoed through the tunnel.
    let pending = a
        .spawn_send(&SendOpts::to(&at(&b, 8080)).bytes(64 << 30).timeout(60.0))
        .expect("send starts");
    // Let it run a moment so the flow is established and data is flowing.
    std::thread::sleep(Duration::from_millis(1500));
    let skip1 = cluster.daemon(1).log_lines().len();
    let skip2 = cluster.daemon(2).log_lines().len();
    let applied = apply(
        &cluster,
        &policy(
            "AuthorizationPolicy",
            "mesh",
            "deny-client",
            "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]}",
        ),
    );
    let r = pending.wait().expect("send finishes");
    refused(r, "transfer after DENY");

    let closed = cluster
        .daemon(2)
        .wait_for_log_after(
            skip2,
            |l| message(l) == "access" && field(l, "src_workload") == "mesh/a",
            LOG_WAIT,
        )
        .expect("destination access line of the closed flow");
    assert_eq!(
        field(&closed, "deny_reason"),
        "denied by a policy change",
        "{closed}"
    );
    let recheck = cluster
        .daemon(2)
        .wait_for_log_after(
            skip2,
            |l| message(l) == "open connection denied by policy change; closing",
            LOG_WAIT,
        )
        .expect("re-check line");
    assert_eq!(field(&recheck, "policy"), "mesh/deny-client", "{recheck}");
    let src_closed = cluster
        .daemon(1)
        .wait_for_log_after(
            skip1,
            |l| message(l) == "access" && field(l, "dst_workload") == "mesh/b",
            LOG_WAIT,
        )
        .expect("source access line of the closed flow");
    assert!(
        !field(&src_closed, "error").is_empty(),
        "client side must see a failure: {src_closed}"
    );

    // The bound README.md promises: closed within 1 s of the policy being applied, on both
    // the destination and the source daemon.
    let t0 = log_time(&applied[1]);
    for (what, line) in [("destination", &closed), ("source", &src_closed)] {
        let dt = log_time(line) - t0;
        eprintln!(
            "{what}: flow closed {:.0} ms after `state applied`",
            dt * 1000.0
        );
        assert!(
            (0.0..1.0).contains(&dt),
            "{what}: connection ended {dt:.3} s after `state applied` (must be < 1 s): {line}"
        );
    }
    expect_check(
        &cluster,
        2,
        "mesh/a",
        "mesh/b:8080",
        1,
        "DENY: denied by mesh/deny-client rule 0",
    );
}

/// A policy the daemon cannot fully understand never widens access: an ALLOW whose only rule
/// has `principal:` (a typo of `principals:`) allows nothing, so the client it was meant to
/// admit is refused; the daemon logs the field, counts it, shows it in `ztunnel status`, and
/// `ztunnel analyze` and `ztunnel authz check` explain it. Fixing the typo admits the client.
#[test]
fn principal_typo_allow_policy_fails_closed() {
    const FIELD: &str = "spec.rules[0].from[0].source.principal";
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server").label("app", "b"));
    let cluster = start_with_daemons(spec);
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "before any policy",
    );

    let typo = |key: &str| {
        policy(
            "AuthorizationPolicy",
            "mesh",
            "allow-client",
            &format!("{{selector: {{matchLabels: {{app: b}}}}, action: ALLOW, rules: [{{from: [{{source: {{{key}: [cluster.local/ns/mesh/sa/client]}}}}]}}]}}"),
        )
    };
    let skip2 = cluster.daemon(2).log_lines().len();
    apply(&cluster, &typo("principal"));
    let invalid = cluster
        .daemon(2)
        .wait_for_log_after(
            skip2,
            |l| message(l) == "policy invalid; enforced failing closed",
            LOG_WAIT,
        )
        .expect("the invalid policy is logged");
    assert_eq!(field(&invalid, "kind"), "AuthorizationPolicy", "{invalid}");
    assert_eq!(field(&invalid, "policy"), "mesh/allow-client", "{invalid}");
    assert_eq!(field(&invalid, "action"), "ALLOW", "{invalid}");
    assert_eq!(field(&invalid, "field"), FIELD, "{invalid}");

    let skip2 = cluster.daemon(2).log_lines().len();
    refused(
        a.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
            .expect("runs"),
        "the client the invalid policy meant to admit",
    );
    let line = denied_line(cluster.daemon(2), skip2, &a);
    assert_eq!(field(&line, "response"), "401", "{line}");
    assert_eq!(field(&line, "policy"), "mesh/allow-client", "{line}");
    let reason = field(&line, "reason");
    assert!(
        reason.starts_with(&format!(
            "denied: policy mesh/allow-client failed validation (field `{FIELD}`: unknown field \
             `principal` (did you mean `principals`?)); it allows nothing"
        )),
        "{line}"
    );
    expect_401_access_line(&cluster, 2, skip2);

    // `authz check` gives the same explanation, `analyze` lists the policy (exit 1).
    let (code, out) = authz_check(&cluster, 2, "mesh/a", "mesh/b:8080", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!(
            "DENY: denied: policy mesh/allow-client failed validation (field `{FIELD}`"
        )),
        "{out}"
    );
    let (code, out) = analyze(&cluster, 2);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "INVALID   AuthorizationPolicy mesh/allow-client (ALLOW): field `{FIELD}`"
        )),
        "{out}"
    );
    assert!(out.contains("means: it allows nothing"), "{out}");

    // The metric and `ztunnel status` show it while it is in force.
    let gauge = r#"ztunnel_policies_invalid{kind="AuthorizationPolicy",action="ALLOW"} 1"#;
    let (_, metrics) = node_http(&cluster, 2, 15020, "GET", "/metrics").expect("scrape");
    assert!(metrics.contains(gauge), "{metrics}");
    let status = Command::new(mesh_tests::ztunnel_bin())
        .args(["status", "--admin-socket"])
        .arg(cluster.admin_socket(2))
        .output()
        .expect("ztunnel status runs");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains("POLICY PROBLEMS (1 invalid, enforced failing closed; 0 with a caveat)"),
        "{text}"
    );
    assert!(text.contains(FIELD), "{text}");

    // Fixed: the client is admitted, the gauge is gone and the state analyzes clean.
    apply(&cluster, &typo("principals"));
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "after the typo is fixed",
    );
    let (_, metrics) = node_http(&cluster, 2, 15020, "GET", "/metrics").expect("scrape");
    assert!(!metrics.contains("ztunnel_policies_invalid{"), "{metrics}");
    let (code, out) = analyze(&cluster, 2);
    assert_eq!(code, 0, "{out}");
}

/// `ztunnel analyze` on node `n`'s state; returns (exit code, stdout).
fn analyze(cluster: &Cluster, node: usize) -> (i32, String) {
    let out = Command::new(mesh_tests::ztunnel_bin())
        .args(["analyze", "--state"])
        .arg(cluster.state_dir(node))
        .output()
        .expect("ztunnel analyze runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
