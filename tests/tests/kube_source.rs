//! Acceptance tests of `--source kube`: daemons on the namespace cluster follow a real
//! kube-apiserver (with etcd, TLS, RBAC and a service-account token; see `mesh_tests::kube`)
//! instead of state files. What a user would check after `kubectl label`, `kubectl apply` or an
//! API-server outage: enrollment, policies, endpoint health, and the last state kept while the
//! server is away.
//!
//! Needs root, a built `ztunnel`, etcd and kube-apiserver 1.20 (`cargo xtask test` provides
//! them all). Fails, never skips. Every test name contains `kube`, so `cargo xtask test --
//! kube` runs the API-server tests alone.

use std::time::{Duration, Instant};

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, PodSpec, SvcSpec, DATAPLANE_MODE};
use mesh_tests::kube::RoleRef;
use mesh_tests::pcap::Pcap;
use mesh_tests::testkit::{at, denied_line, eventually, node_http, ok, refused};
use serde_json::Value;

const HBONE: u16 = 15008;
const LOG_WAIT: Duration = Duration::from_secs(10);

fn start(spec: ClusterSpec) -> Cluster {
    let mut c = Cluster::start_kube(spec).expect("cluster with an API server starts");
    c.start_all_daemons()
        .expect("daemons on --source kube become ready");
    c
}

/// Log position of every node's daemon, to wait for what comes after a change.
fn marks(c: &Cluster) -> Vec<usize> {
    (1..=c.spec().nodes)
        .map(|n| c.daemon(n).log_lines().len())
        .collect()
}

/// Waits on every node for a `state applied` line after `skips` that satisfies `pred`.
fn wait_applied(c: &Cluster, skips: &[usize], pred: impl Fn(&Value) -> bool) {
    for (i, skip) in skips.iter().enumerate() {
        c.daemon(i + 1)
            .wait_for_log_after(
                *skip,
                |l| message(l) == "state applied" && pred(l),
                LOG_WAIT,
            )
            .unwrap_or_else(|e| panic!("node{}: waiting for `state applied`: {e:#}", i + 1));
    }
}

fn kubectl(c: &Cluster, args: &[&str]) -> String {
    c.kube()
        .api
        .kubectl(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"))
}

fn apply(c: &Cluster, yaml: &str) {
    c.kube()
        .api
        .apply(yaml)
        .unwrap_or_else(|e| panic!("kubectl apply: {e:#}\n{yaml}"));
}

fn config_dump(c: &Cluster, node: usize) -> Value {
    let (code, body) = node_http(c, node, 15000, "GET", "/config_dump").expect("admin answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("config dump is JSON")
}

/// Labelling a namespace through the API enrolls its pods on every node within a second;
/// removing the label stops it. An AuthorizationPolicy created through the API is enforced
/// (401) and deleting it re-allows; a PeerAuthentication STRICT refuses plaintext.
#[test]
fn kube_source_follows_labels_and_policies() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", false)
        .namespace("plain", false)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/c", 1).sa("intruder"))
        .pod(PodSpec::new("plain/d", 1))
        .pod(PodSpec::new("mesh/b", 2).sa("server").label("app", "b"));
    let mut cluster = start(spec);
    let (a, b, c, d) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b").clone(),
        cluster.pod("mesh/c").clone(),
        cluster.pod("plain/d").clone(),
    );
    let _sb = b.serve(8080, "b").expect("serve b");
    let marker = format!("ZTKUBE-{}", cluster.prefix());
    let round = |cluster: &Cluster| -> Pcap {
        let capture = cluster.capture_fabric("tcp").expect("capture");
        let opts = SendOpts::to(&at(&b, 8080)).bytes(64 * 1024).marker(&marker);
        ok(a.send(&opts).expect("runs"), "a -> b");
        capture.stop().expect("capture stops")
    };
    let ports = |p: &Pcap| p.payload_ports_between(a.ip, b.ip);
    assert_eq!(
        ports(&round(&cluster)),
        [8080].into(),
        "not enrolled yet: direct"
    );

    let skips = marks(&cluster);
    cluster
        .set_namespace_label("mesh", DATAPLANE_MODE, Some("ambient"))
        .expect("kubectl label");
    let labelled = Instant::now();
    wait_applied(&cluster, &skips, |l| l["enrolled"].as_u64() == Some(3));
    let took = labelled.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the label took {took:?} to reach both daemons"
    );
    // Tolerance for the capture maps to follow the logged state.
    std::thread::sleep(Duration::from_millis(300));
    let pcap = round(&cluster);
    assert_eq!(ports(&pcap), [HBONE].into(), "{}", pcap.summary());
    assert!(
        !pcap.contains(marker.as_bytes()),
        "enrolled traffic crossed in clear"
    );

    // An ALLOW policy through the API: the named client passes, another gets 401.
    let skips = marks(&cluster);
    apply(
        &cluster,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: mesh}\n\
         spec: {selector: {matchLabels: {app: b}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]}\n",
    );
    wait_applied(&cluster, &skips, |_| true);
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "named client",
    );
    let skip2 = cluster.daemon(2).log_lines().len();
    refused(
        c.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
            .expect("runs"),
        "another client",
    );
    let line = denied_line(cluster.daemon(2), skip2, &c);
    assert_eq!(field(&line, "response"), "401", "{line}");
    assert!(
        field(&line, "reason").contains("mesh/allow-client"),
        "{line}"
    );

    let skips = marks(&cluster);
    kubectl(
        &cluster,
        &[
            "delete",
            "authorizationpolicy",
            "-n",
            "mesh",
            "allow-client",
        ],
    );
    wait_applied(&cluster, &skips, |_| true);
    ok(
        c.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "re-allowed after delete",
    );

    // The same policy with `principal:` (a typo) through the API: kept and failing closed, so
    // the client it was meant to admit is refused too.
    let skips = marks(&cluster);
    apply(
        &cluster,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-typo, namespace: mesh}\n\
         spec: {selector: {matchLabels: {app: b}}, action: ALLOW, rules: [{from: [{source: {principal: [cluster.local/ns/mesh/sa/client]}}]}]}\n",
    );
    wait_applied(&cluster, &skips, |_| true);
    let skip2 = cluster.daemon(2).log_lines().len();
    refused(
        a.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
            .expect("runs"),
        "client of an ALLOW policy with a misspelled key",
    );
    let line = denied_line(cluster.daemon(2), skip2, &a);
    assert!(
        field(&line, "reason").starts_with(
            "denied: policy mesh/allow-typo failed validation (field \
             `spec.rules[0].from[0].source.principal`"
        ),
        "{line}"
    );
    let skips = marks(&cluster);
    kubectl(
        &cluster,
        &["delete", "authorizationpolicy", "-n", "mesh", "allow-typo"],
    );
    wait_applied(&cluster, &skips, |_| true);

    // PeerAuthentication STRICT (v1beta1, to use both versions): plaintext is refused.
    ok(
        d.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "plaintext before STRICT",
    );
    let skips = marks(&cluster);
    apply(
        &cluster,
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: mesh}\nspec: {mtls: {mode: STRICT}}\n",
    );
    wait_applied(&cluster, &skips, |_| true);
    refused(
        d.send(&SendOpts::to(&at(&b, 8080)).timeout(10.0))
            .expect("runs"),
        "plaintext under STRICT",
    );

    // Removing the label stops capture.
    let skips = marks(&cluster);
    cluster
        .set_namespace_label("mesh", DATAPLANE_MODE, None)
        .expect("kubectl label");
    wait_applied(&cluster, &skips, |l| l["enrolled"].as_u64() == Some(0));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ports(&round(&cluster)),
        [8080].into(),
        "label removed: direct again"
    );
}

/// A pod whose `Ready` condition turns false leaves its Service within a second, while a
/// flow already open to it completes.
#[test]
fn kube_source_unready_pod_leaves_its_service_open_flow_completes() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b1", 2).label("app", "b"))
        .pod(PodSpec::new("mesh/b2", 2).label("app", "b"))
        .service(
            SvcSpec::new("mesh/b", "10.96.0.20")
                .select("app", "b")
                .port(80, 8080),
        );
    let cluster = start(spec);
    let (a, b1, b2) = (
        cluster.pod("mesh/a").clone(),
        cluster.pod("mesh/b1").clone(),
        cluster.pod("mesh/b2").clone(),
    );
    let (_s1, _s2) = (
        b1.serve(8080, "b1").expect("serve"),
        b2.serve(8080, "b2").expect("serve"),
    );
    let vip = "10.96.0.20:80";
    let r = ok(
        a.send(&SendOpts::to(vip).conns(8)).expect("runs"),
        "both ready",
    );
    assert_eq!(
        r.servers(),
        ["b1".to_string(), "b2".to_string()].into(),
        "{r}"
    );

    // A flow to b1 stays open (held 4 s) while b1 turns unready.
    let open = a
        .spawn_send(&SendOpts::to(&at(&b1, 8080)).bytes(256 * 1024).hold(4.0))
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    let skips = marks(&cluster);
    cluster
        .kube()
        .set_pod_status("mesh", "b1", b1.ip, 2, false)
        .expect("b1 unready");
    let patched = Instant::now();
    wait_applied(&cluster, &skips, |_| true);
    assert!(
        patched.elapsed() < Duration::from_secs(1),
        "took {:?}",
        patched.elapsed()
    );
    let r = ok(
        a.send(&SendOpts::to(vip).conns(8)).expect("runs"),
        "b1 unready",
    );
    assert_eq!(
        r.servers(),
        ["b2".to_string()].into(),
        "only the ready pod: {r}"
    );
    let r = ok(
        open.wait().expect("open flow"),
        "flow open to b1 when it turned unready",
    );
    assert_eq!(r.servers(), ["b1".to_string()].into());
}

/// The API server is stopped for 10 s in the middle of a flow: the flow completes, new flows
/// work on the last state, the daemons say their view is stale, and a change made once the
/// server is back is applied.
#[test]
fn kube_source_outage_keeps_last_state_and_catches_up() {
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("later", false)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("later/l", 1))
        .pod(PodSpec::new("mesh/b", 2).sa("server"));
    let mut cluster = start(spec);
    let (a, b) = (cluster.pod("mesh/a").clone(), cluster.pod("mesh/b").clone());
    let _sb = b.serve(8080, "b").expect("serve b");

    let open = a
        .spawn_send(
            &SendOpts::to(&at(&b, 8080))
                .bytes(1024 * 1024)
                .hold(13.0)
                .timeout(30.0),
        )
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    let outage = Instant::now();
    cluster
        .kube_mut()
        .api
        .stop_apiserver()
        .expect("API server stops");
    // New flows work on the last state while the server is away.
    let capture = cluster.capture_fabric("tcp").expect("capture");
    ok(
        a.send(&SendOpts::to(&at(&b, 8080))).expect("runs"),
        "during the outage",
    );
    let pcap = capture.stop().expect("capture stops");
    assert_eq!(
        pcap.payload_ports_between(a.ip, b.ip),
        [HBONE].into(),
        "{}",
        pcap.summary()
    );
    eventually(
        Duration::from_secs(15),
        "node1 to report its view stale",
        || config_dump(&cluster, 1)["source"]["in_sync"] == Value::Bool(false),
    );
    let (_, metrics) = node_http(&cluster, 1, 15020, "GET", "/metrics").expect("metrics");
    assert!(
        metrics.contains("ztunnel_state_source_in_sync 0"),
        "{metrics}"
    );
    if let Some(rest) = Duration::from_secs(10).checked_sub(outage.elapsed()) {
        std::thread::sleep(rest);
    }
    cluster
        .kube_mut()
        .api
        .restart_apiserver()
        .expect("API server restarts");

    let r = ok(open.wait().expect("open flow"), "flow across the outage");
    assert_eq!(r.conns[0].bytes, 1024 * 1024);

    // A change after the outage is applied once the watches are back.
    let skips = marks(&cluster);
    cluster
        .set_namespace_label("later", DATAPLANE_MODE, Some("ambient"))
        .expect("kubectl label");
    for (i, skip) in skips.iter().enumerate() {
        cluster
            .daemon(i + 1)
            .wait_for_log_after(
                *skip,
                |l| message(l) == "state applied" && l["enrolled"].as_u64() == Some(3),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("node{}: the change after the outage: {e:#}", i + 1));
    }
    eventually(
        Duration::from_secs(10),
        "node1 to report its view current",
        || config_dump(&cluster, 1)["source"]["in_sync"] == Value::Bool(true),
    );
}

/// A daemon whose service account may not list pods says exactly that, and stays not ready.
#[test]
fn kube_source_missing_permission_is_named_and_keeps_the_daemon_unready() {
    let mut cluster = Cluster::start_kube(
        ClusterSpec::new(1)
            .namespace("mesh", true)
            .pod(PodSpec::new("mesh/a", 1)),
    )
    .expect("cluster starts");
    let api = &cluster.kube().api;
    api.apply(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: ztunnel-no-pods}\nrules:\n\
         - {apiGroups: [''], resources: [namespaces, services], verbs: [get, list, watch]}\n\
         - {apiGroups: [security.istio.io], resources: [authorizationpolicies, peerauthentications], verbs: [get, list, watch]}\n\
         - {apiGroups: [gateway.networking.k8s.io], resources: [gateways, httproutes], verbs: [get, list, watch]}\n",
    )
    .expect("role");
    let kubeconfig = api
        .create_service_account(
            "istio-system",
            "no-pods",
            RoleRef::ClusterRole("ztunnel-no-pods"),
        )
        .expect("service account");
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let d = cluster
        .start_daemon_unready(1, &["--kubeconfig", &kubeconfig])
        .expect("daemon starts");
    let line = d
        .wait_for_log_after(
            0,
            |l| message(l).contains("watch failed") && field(l, "kind") == "Pod",
            LOG_WAIT,
        )
        .expect("the failed pod watch is logged");
    let error = field(&line, "error");
    assert!(
        error.contains("forbidden") && error.contains("list and watch on pods"),
        "{line}"
    );
    assert!(
        error.contains("system:serviceaccount:istio-system:no-pods"),
        "{line}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (code, _) = node_http(&cluster, 1, 15021, "GET", "/healthz/ready").expect("readiness");
    assert_eq!(code, 503, "not ready without the pod list");
    let src = &config_dump(&cluster, 1)["source"];
    assert_eq!(src["in_sync"], Value::Bool(false), "{src}");
    assert!(
        src["failing"]["Pod"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("forbidden"),
        "{src}"
    );
}
