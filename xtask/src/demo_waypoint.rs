//! The demo's waypoint part: Service `reviews` (10.96.0.20:80) is labelled
//! `istio.io/use-waypoint: waypoint`, a Gateway of class `istio-waypoint` names the `waypoint`
//! pod, an HTTPRoute splits `reviews` 90/10 between `reviews-v1` and `reviews-v2`, and an
//! AuthorizationPolicy attached to `reviews` allows GET only. The client sends many GETs (the
//! split), one GET (allowed) and one POST (denied), and the report shows what a user checks:
//! requests per version, the two answers, and the waypoint's access lines.
//!
//! ```text
//! node1: client, reviews-v2        node2: waypoint, reviews-v1
//! client -> 10.96.0.20:80 --HBONE--> waypoint --HBONE--> reviews-v1 (90%) | reviews-v2 (10%)
//! ```

use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::cluster::{field, Cluster, ClusterSpec, PodSpec, SvcSpec, WaypointProc};
use mesh_tests::web::{CurlRun, HttpServer, HttpVersion};
use serde_json::Value;

/// The VIP of `reviews`, the Service with the waypoint.
pub const REVIEWS: &str = "10.96.0.20";
const WAYPOINT_POD: &str = "demo/waypoint";
/// GETs sent to show the split.
const SPLIT_REQUESTS: usize = 500;
const POLICY: &str = "demo/reviews-get-only";
const DENIED_BODY: &str = "RBAC: access denied";

/// The waypoint's Gateway, the 90/10 route and the GET-only policy.
const STATE_YAML: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 80, weight: 90}
    - {name: reviews-v2, port: 80, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get-only, namespace: demo}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

fn reviews_pod(key: &str, node: usize, version: &str) -> PodSpec {
    PodSpec::new(key, node)
        .sa("reviews")
        .label("app", "reviews")
        .label("version", version)
}

/// Adds the waypoint part's pods and Services to the demo's spec (after the others, so their
/// addresses stay as they were).
pub fn add_to(spec: ClusterSpec) -> ClusterSpec {
    spec.pod(reviews_pod("demo/reviews-v2", 1, "v2"))
        .pod(
            PodSpec::new(WAYPOINT_POD, 2)
                .sa("waypoint")
                .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
        )
        .pod(reviews_pod("demo/reviews-v1", 2, "v1"))
        .service(
            SvcSpec::new("demo/reviews", REVIEWS)
                .select("app", "reviews")
                .port(80, 8080)
                .label("istio.io/use-waypoint", "waypoint"),
        )
        .service(
            SvcSpec::new("demo/reviews-v1", "10.96.0.21")
                .select("version", "v1")
                .port(80, 8080),
        )
        .service(
            SvcSpec::new("demo/reviews-v2", "10.96.0.22")
                .select("version", "v2")
                .port(80, 8080),
        )
}

/// The running waypoint part: the waypoint process and the two versions (stopped on drop).
pub struct Running {
    waypoint: WaypointProc,
    _v1: HttpServer,
    _v2: HttpServer,
}

/// Writes the Gateway, route and policy (state files, which the waypoint reads, and with an
/// API server there too, which the daemons follow), then starts the waypoint and both versions.
pub fn start(cluster: &mut Cluster) -> Result<Running> {
    cluster.write_state_file("waypoint.yaml", STATE_YAML)?;
    if let Some(cp) = cluster.kube_api() {
        cp.api
            .apply(STATE_YAML)
            .context("applying the waypoint's Gateway, HTTPRoute and policy")?;
    }
    let waypoint = cluster.start_waypoint(WAYPOINT_POD, &[])?;
    let v1 = cluster.pod("demo/reviews-v1").serve_http(8080, "v1")?;
    let v2 = cluster.pod("demo/reviews-v2").serve_http(8080, "v2")?;
    Ok(Running {
        waypoint,
        _v1: v1,
        _v2: v2,
    })
}

/// One request sent with curl: status and body.
pub struct Answer {
    status: u16,
    body: String,
    error: String,
}

/// What the waypoint part observed.
pub struct Report {
    split: CurlRun,
    get: Answer,
    post: Answer,
    /// The waypoint's access lines of the single GET and the POST.
    lines: Vec<Value>,
    /// The split's requests the waypoint logged.
    split_logged: usize,
    /// Whether the client's node daemon logged a flow handed to the waypoint.
    handed_off: bool,
}

fn curl(cluster: &Cluster, method: &str, path: &str) -> Result<Answer> {
    let mut cmd = cluster.pod("demo/client").command("curl");
    cmd.args(["-sS", "--http1.1", "--max-time", "10", "-X", method]);
    if method == "POST" {
        cmd.args([
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"stars":5}"#,
        ]);
    }
    let out: Output = cmd
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://{REVIEWS}{path}"))
        .stdin(Stdio::null())
        .output()
        .context("running curl in demo/client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok(Answer {
        status: code.trim().parse().unwrap_or(0),
        body: body.trim().to_string(),
        error: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Sends the split, the GET and the POST from `demo/client`.
pub fn drive(cluster: &Cluster, running: &Running) -> Result<Report> {
    let skip = running.waypoint.requests().len();
    let client = cluster.pod("demo/client");
    let split = client.http_get(
        HttpVersion::Http1,
        &format!("http://{REVIEWS}/reviews/split-"),
        SPLIT_REQUESTS,
        Duration::from_secs(120),
    )?;
    let get = curl(cluster, "GET", "/reviews/1")?;
    let post = curl(cluster, "POST", "/reviews/1")?;
    // A line is written when its response ends, a moment after the client has it.
    let lines = running
        .waypoint
        .wait_for_requests(skip + SPLIT_REQUESTS + 2, Duration::from_secs(5))
        .unwrap_or_else(|_| running.waypoint.requests());
    let new = &lines[skip.min(lines.len())..];
    let split_logged = new
        .iter()
        .filter(|l| field(l, "path").starts_with("/reviews/split-"))
        .count();
    let lines = new
        .iter()
        .filter(|l| field(l, "path") == "/reviews/1")
        .cloned()
        .collect();
    let handed_off = cluster
        .daemon(client.node)
        .access_logs()
        .iter()
        .any(|l| field(l, "waypoint") == WAYPOINT_POD);
    Ok(Report {
        split,
        get,
        post,
        lines,
        split_logged,
        handed_off,
    })
}

fn v1_share(r: &Report) -> (usize, usize, f64) {
    let b = r.split.backends();
    let v1 = b.get("v1").copied().unwrap_or(0);
    let v2 = b.get("v2").copied().unwrap_or(0);
    (v1, v2, v1 as f64 / SPLIT_REQUESTS as f64)
}

fn print_answer(what: &str, a: &Answer) {
    let body = if a.body.is_empty() { "-" } else { &a.body };
    println!("    {what:<20} -> {} {body}", a.status);
    if !a.error.is_empty() {
        println!("      curl: {}", a.error);
    }
}

/// Prints the waypoint part of the report, each item with what to expect.
pub fn print(r: &Report) {
    println!("\n[W] client -> reviews {REVIEWS}:80 through the waypoint (L7: HTTPRoute + AuthorizationPolicy)");
    println!("    route       reviews-v1 weight 90, reviews-v2 weight 10; policy {POLICY}: ALLOW methods [GET]");
    let (v1, v2, share) = v1_share(r);
    println!(
        "    {SPLIT_REQUESTS} GETs        v1 {v1} ({:.1}%), v2 {v2} ({:.1}%), statuses {:?}",
        share * 100.0,
        v2 as f64 / SPLIT_REQUESTS as f64 * 100.0,
        r.split.statuses()
    );
    println!("      expect: about 90% v1 and 10% v2, all 200");
    print_answer("GET /reviews/1", &r.get);
    println!("      expect: 200 with the body v1 or v2 (the version that answered)");
    print_answer("POST /reviews/1", &r.post);
    println!("      expect: 403 with the body `{DENIED_BODY}` (the policy allows GET only)");
    println!(
        "    waypoint access log ({} lines for the {SPLIT_REQUESTS} GETs; the GET and the POST:)",
        r.split_logged
    );
    for l in &r.lines {
        let f = |k: &str| match field(l, k) {
            "" => "-".to_string(),
            s => s.to_string(),
        };
        let status = l.get("status").and_then(Value::as_u64).unwrap_or(0);
        println!(
            "      {} {} {status} authz={} route={} upstream={} src={} {}",
            f("method"),
            f("path"),
            f("authz"),
            f("route"),
            f("upstream"),
            f("src_identity"),
            match field(l, "authz_reason") {
                "" => String::new(),
                why => format!("reason=\"{why}\""),
            }
        );
    }
    println!(
        "      expect: the GET authz=ALLOW by {POLICY}, route demo/reviews#0, upstream a v1 or v2 pod; \
         the POST authz=DENY, no route, because no ALLOW rule of {POLICY} matched"
    );
}

/// The waypoint part's PASS/FAIL checks.
pub fn checks(r: &Report) -> Vec<(bool, String)> {
    let (v1, v2, share) = v1_share(r);
    let all_200 = r.split.statuses().get(&200).copied() == Some(SPLIT_REQUESTS);
    let logged = |method: &str, pred: &dyn Fn(&Value) -> bool| {
        r.lines
            .iter()
            .any(|l| field(l, "method") == method && pred(l))
    };
    vec![
        (
            r.handed_off,
            "the client's daemon handed reviews' flows to the waypoint".into(),
        ),
        (
            all_200 && (0.85..=0.95).contains(&share),
            format!(
                "HTTPRoute 90/10: v1 {v1}, v2 {v2} of {SPLIT_REQUESTS} GETs (v1 within 85-95%), all 200"
            ),
        ),
        (
            r.split_logged == SPLIT_REQUESTS,
            format!("the waypoint logged each of the {SPLIT_REQUESTS} GETs"),
        ),
        (
            r.get.status == 200 && (r.get.body == "v1" || r.get.body == "v2"),
            "GET /reviews/1 allowed: 200 from a version".into(),
        ),
        (
            r.post.status == 403 && r.post.body == DENIED_BODY,
            format!("POST /reviews/1 denied: 403 `{DENIED_BODY}`"),
        ),
        (
            logged("POST", &|l| {
                field(l, "authz") == "DENY" && field(l, "authz_reason").contains(POLICY)
            }) && logged("GET", &|l| {
                field(l, "authz") == "ALLOW" && field(l, "route") == "demo/reviews#0"
            }),
            format!(
                "the waypoint's access log: GET ALLOW by {POLICY} via demo/reviews#0, POST DENY (no ALLOW rule matched)"
            ),
        ),
    ]
}

/// Commands to poke the waypoint part by hand.
pub fn poke(cluster: &Cluster) -> Vec<String> {
    let client = cluster.pod("demo/client");
    vec![
        format!(
            "ip netns exec {} curl -s http://{REVIEWS}/reviews/1          # 200 from v1 (90%) or v2 (10%)",
            client.netns
        ),
        format!(
            "ip netns exec {} curl -s -X POST http://{REVIEWS}/reviews/1  # 403 RBAC: access denied",
            client.netns
        ),
        format!(
            "{} check --state {} --from demo/client --to {REVIEWS}:80 --method POST",
            mesh_tests::waypoint_bin().display(),
            cluster.state_dir(1).display()
        ),
    ]
}
