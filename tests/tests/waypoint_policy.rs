//! Acceptance tests of the waypoint's L7 authorization, its `waypoint check` command and its
//! metrics, and of a waypoint following the API server: node daemons and a `waypoint` process
//! in a pod (`mesh_tests::waypoint_mesh`), curl in two client pods with different service
//! accounts, `meshhttp` backends.
//!
//! Needs root, the built binaries, curl and promtool; the `kube` test also etcd and
//! kube-apiserver (`cargo xtask test` provides them all). Fails, never skips.

use std::process::Command;
use std::time::Duration;

use mesh_tests::cluster::{field, message, CaService, Cluster};
use mesh_tests::kube::RoleRef;
use mesh_tests::testkit::{eventually, promtool_check};
use mesh_tests::waypoint_mesh::{
    self, WaypointMesh, CLIENT_ID, GATEWAY_YAML, OTHER_ID, REVIEWS, ROUTE_YAML, WAYPOINT_ID,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// `GET /public/*` from `mesh/client` only, on the Service; any request with `x-block: yes`
/// denied, on the waypoint's Gateway.
const POLICIES: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-get, namespace: mesh}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]
    to: [{operation: {methods: [GET], paths: [/public/*]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-header, namespace: mesh}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#;

/// One request of the test: who sends what, and what the client must get.
struct Case {
    from: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static [&'static str],
    status: u16,
    /// What the waypoint's line must name as deciding (policy, or the reason's policy).
    names: &'static str,
}

const CASES: &[Case] = &[
    Case {
        from: "mesh/client",
        method: "GET",
        path: "/public/a",
        headers: &[],
        status: 200,
        names: "mesh/public-get",
    },
    Case {
        from: "mesh/client",
        method: "POST",
        path: "/public/a",
        headers: &[],
        status: 403,
        names: "mesh/public-get",
    },
    Case {
        from: "mesh/other",
        method: "GET",
        path: "/public/a",
        headers: &[],
        status: 403,
        names: "mesh/public-get",
    },
    Case {
        from: "mesh/client",
        method: "GET",
        path: "/public/b",
        headers: &["x-block: yes"],
        status: 403,
        names: "mesh/block-header",
    },
    Case {
        from: "mesh/client",
        method: "GET",
        path: "/private",
        headers: &[],
        status: 403,
        names: "mesh/public-get",
    },
];

/// The value of `istio_requests_total` summed over the series with every label in `labels`.
fn requests_total(metrics: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// `waypoint check` on `cluster`'s node-2 state directory (the one the waypoint reads):
/// exit code and output.
fn check(cluster: &Cluster, c: &Case) -> (i32, String) {
    let mut cmd = Command::new(mesh_tests::waypoint_bin());
    cmd.arg("check")
        .arg("--state")
        .arg(cluster.state_dir(2))
        .args(["--from", c.from, "--to", &format!("{REVIEWS}:80")])
        .args(["--method", c.method, "--path", c.path]);
    for h in c.headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().expect("waypoint check runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn l7_policies_decide_each_request_and_waypoint_check_metrics_and_logs_agree() {
    let m = WaypointMesh::start(POLICIES);
    let skip = m.waypoint.requests().len();
    for c in CASES {
        let (status, body) = m.request(c.from, c.method, c.path, c.headers);
        let body = body.trim();
        let what = format!("{} {} {} {:?}", c.from, c.method, c.path, c.headers);
        assert_eq!(status, c.status, "{what}: body {body:?}");
        match status {
            200 => assert!(body == "v1" || body == "v2", "{what}: {body:?}"),
            _ => assert_eq!(body, "RBAC: access denied", "{what}"),
        }

        // `waypoint check` on the same state directory decides the same.
        let (code, out) = check(&m.cluster, c);
        let expected = if c.status == 200 { 0 } else { 1 };
        assert_eq!(code, expected, "waypoint check for {what}:\n{out}");
        assert!(out.contains(c.names), "waypoint check for {what}:\n{out}");
    }

    // One access line per request, naming the policy that decided.
    let lines = m
        .waypoint
        .wait_for_requests(skip + CASES.len(), WAIT)
        .expect("the waypoint logs each request");
    let lines = &lines[skip..];
    assert_eq!(lines.len(), CASES.len(), "{lines:#?}");
    for (c, l) in CASES.iter().zip(lines) {
        let what = format!("{} {} {}", c.from, c.method, c.path);
        assert_eq!(field(l, "method"), c.method, "{l}");
        assert_eq!(field(l, "path"), c.path, "{l}");
        assert_eq!(
            l["status"].as_u64(),
            Some(u64::from(c.status)),
            "{what}: {l}"
        );
        let id = if c.from == "mesh/other" {
            OTHER_ID
        } else {
            CLIENT_ID
        };
        assert_eq!(field(l, "src_identity"), id, "{l}");
        let named = format!("{} {}", field(l, "policy"), field(l, "authz_reason"));
        assert!(
            named.contains(c.names),
            "{what}: the line names {}: {l}",
            c.names
        );
        if c.status == 403 {
            assert_eq!(field(l, "authz"), "DENY", "{l}");
            assert_eq!(field(l, "response_flags"), "DENY", "{l}");
        }
    }

    // The metrics count them by response code, and promtool accepts the scrape.
    let denied = CASES.iter().filter(|c| c.status == 403).count() as u64;
    let mut metrics = String::new();
    eventually(WAIT, "istio_requests_total counts every request", || {
        metrics = m.waypoint.metrics().expect("waypoint metrics");
        requests_total(&metrics, &["reporter=\"waypoint\""]) == CASES.len() as u64
    });
    assert_eq!(
        requests_total(&metrics, &["response_code=\"200\""]),
        1,
        "{metrics}"
    );
    assert_eq!(
        requests_total(
            &metrics,
            &["response_code=\"403\"", "response_flags=\"DENY\""]
        ),
        denied,
        "{metrics}"
    );
    assert_eq!(
        requests_total(
            &metrics,
            &[
                "response_code=\"403\"",
                &format!("source_principal=\"{OTHER_ID}\"")
            ]
        ),
        1,
        "the other client's refusal: {metrics}"
    );
    // promtool's only complaint is the unit lint on this name, which it makes wherever the
    // metric is exported. The name is Istio's own: its dashboards query
    // istio_request_duration_milliseconds, so it stays.
    promtool_check(
        &metrics,
        &[
            "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"",
        ],
    );

    // The config dump shows the source as the daemon's does, current.
    let dump = m.waypoint.config_dump().expect("config dump");
    assert_eq!(dump["source"]["source"], "file", "{dump:#}");
    assert_eq!(dump["source"]["in_sync"], true, "{dump:#}");
    assert_eq!(
        dump["policies"].as_array().map(Vec::len),
        Some(2),
        "{dump:#}"
    );

    // A request the route sends to `reviews` itself, the Service this waypoint fronts: the
    // waypoint sends it to an endpoint, not back to a waypoint. One line at the waypoint (a
    // second hop would be a second line, from the waypoint's own identity), and the backend
    // hears the waypoint.
    let skip = m.waypoint.requests().len();
    let (status, body) = m.request("mesh/client", "GET", "/public/self/1", &[]);
    assert_eq!(status, 200, "{body}");
    m.waypoint
        .wait_for_requests(skip + 1, WAIT)
        .expect("logged");
    std::thread::sleep(Duration::from_millis(500));
    let lines: Vec<Value> = m.waypoint.requests().into_iter().skip(skip).collect();
    assert_eq!(lines.len(), 1, "one hop through the waypoint: {lines:#?}");
    assert_eq!(field(&lines[0], "src_identity"), CLIENT_ID);
    assert_eq!(field(&lines[0], "route"), "mesh/reviews#2", "{}", lines[0]);
    let waypoint_ip = m.ip("mesh/waypoint").to_string();
    let at_backend: Vec<Value> = m
        .backend_requests()
        .into_iter()
        .filter(|r| r["path"] == "/public/self/1")
        .collect();
    assert_eq!(at_backend.len(), 1, "{at_backend:?}");
    assert!(
        at_backend[0]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{waypoint_ip}:"))),
        "the backend hears the waypoint: {at_backend:?}"
    );
    assert!(
        !m.waypoint
            .log_lines()
            .iter()
            .any(|l| field(l, "src_identity") == WAYPOINT_ID),
        "the waypoint received a stream from itself"
    );
}

/// The waypoint and the daemons on `--source kube`: the Gateway and the HTTPRoute are
/// applied through the API server, a request follows the route through the waypoint, and a
/// route added later is followed too. The waypoint's certificate comes from the CA service.
#[test]
fn kube_source_waypoint_routes_by_an_httproute_from_the_api_server() {
    let mut cluster =
        Cluster::start_kube(waypoint_mesh::spec()).expect("cluster with an API server");
    cluster
        .kube()
        .api
        .apply(&format!("{GATEWAY_YAML}---{ROUTE_YAML}"))
        .expect("Gateway and HTTPRoute applied");
    cluster
        .start_all_daemons()
        .expect("daemons on --source kube become ready");

    // The waypoint's certificate comes from the CA service (signing from the cluster's CA
    // directory, which the daemons' file CA shares, so they trust it); the waypoint is given
    // the root certificate and its service account's token, never the root key.
    let ca_dir = cluster.ca_dir().expect("cluster CA");
    let mut ca = CaService::new(&cluster, ca_dir.clone()).expect("CA service set-up");
    ca.start();
    let api = &cluster.kube().api;
    api.create_service_account("mesh", "waypoint", RoleRef::ClusterRole("ztunnel-waypoint"))
        .expect("the waypoint's service account");
    let token = api
        .service_account_token("mesh", "waypoint", Duration::from_secs(3600))
        .expect("a token of the waypoint's service account");
    let trust = cluster.workdir().join("waypoint-trust");
    std::fs::create_dir_all(&trust).expect("trust dir");
    let (token_file, root) = (trust.join("token"), trust.join("root-cert.pem"));
    std::fs::write(&token_file, token).expect("token file");
    std::fs::copy(ca_dir.join("root-cert.pem"), &root).expect("root certificate");
    let (token_arg, root_arg) = (token_file.display().to_string(), root.display().to_string());
    let address = CaService::address();
    let flags = [
        "--ca-address",
        &address,
        "--ca-root-cert",
        &root_arg,
        "--ca-token-path",
        &token_arg,
    ];
    let m = WaypointMesh::with_waypoint(cluster, &flags);
    ca.wait_for(0, |l| {
        message(l) == "certificate request"
            && field(l, "decision") == "allow"
            && field(l, "caller") == "mesh/waypoint"
            && field(l, "requested") == WAYPOINT_ID
    })
    .unwrap_or_else(|e| panic!("the waypoint's own identity granted: {e:#}"));

    let dump = m.waypoint.config_dump().expect("config dump");
    assert_eq!(dump["source"]["source"], "kube", "{dump:#}");
    assert_eq!(dump["source"]["in_sync"], true, "{dump:#}");
    assert!(dump["routes"]["mesh/reviews"].is_array(), "{dump:#}");

    // The route's retry rule: the first attempt gets 503 at v1, the retry 200.
    let (status, body) = m.request("mesh/client", "GET", "/flaky/kube", &[]);
    assert_eq!((status, body.trim()), (200, "v1"));
    let lines = m.waypoint.wait_for_requests(1, WAIT).expect("logged");
    let l = lines.last().expect("a line");
    assert_eq!(field(l, "route"), "mesh/reviews#1", "{l}");
    assert_eq!(field(l, "src_identity"), CLIENT_ID, "{l}");

    // A second route applied now sends /only-v2 to v2 alone.
    let skip = m.waypoint.log_lines().len();
    m.cluster
        .kube()
        .api
        .apply(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: only-v2, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /only-v2}}]
    backendRefs: [{name: reviews-v2, port: 80}]
"#,
        )
        .expect("second HTTPRoute applied");
    eventually(WAIT, "the waypoint compiles the new route", || {
        m.waypoint
            .log_lines()
            .iter()
            .skip(skip)
            .any(|l| message(l) == "routes and policies compiled")
    });
    for i in 0..10 {
        let (status, body) = m.request("mesh/client", "GET", &format!("/only-v2/{i}"), &[]);
        assert_eq!((status, body.trim()), (200, "v2"), "request {i}");
    }
}
