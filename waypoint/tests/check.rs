//! `waypoint check` as an operator runs it: the built binary on a state directory holding the
//! mesh test's cluster and policies (`common::state_yaml`, `common::POLICIES`), asked about
//! the requests the mesh test sends; the decisions must be the same.

mod common;

use std::process::Command;

use common::{state_yaml, POLICIES};

const NET: u8 = 200;
const ROUTE: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /public/old}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /public/new}}}]
  - matches: [{path: {type: PathPrefix, value: /public}}]
    backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn has(&self, line: &str) -> bool {
        self.stdout.lines().any(|l| l == line)
    }
}

fn state(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = state_yaml(NET, [(8080, 9000), (8080, 9000)]) + extra;
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write state");
    dir
}

fn check(dir: &tempfile::TempDir, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .arg("check")
        .arg("--state")
        .arg(dir.path())
        .args(args)
        .output()
        .expect("waypoint runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const REVIEWS: &str = "reviews.mesh.svc.cluster.local:80";

#[test]
fn decisions_agree_with_the_mesh_test() {
    let dir = state(POLICIES);
    let get = |from: &str, path: &str, extra: &[&str]| {
        let mut args = vec!["--from", from, "--to", REVIEWS, "--path", path];
        args.extend_from_slice(extra);
        check(&dir, &args)
    };

    let r = get("mesh/a", "/public/page", &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.has("ALLOW: allowed by mesh/public-get rule 0"),
        "{}",
        r.stdout
    );
    assert!(r.has("policy: mesh/public-get rule 0"), "{}", r.stdout);
    assert!(r.has("route: mesh/reviews:80 weight 1"), "{}", r.stdout);

    let r = get("mesh/a", "/public/page", &["--method", "POST"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.has("DENY: no ALLOW policy matched (attached: mesh/public-get)"),
        "{}",
        r.stdout
    );
    assert!(
        r.has("route: none (403 RBAC: access denied)"),
        "{}",
        r.stdout
    );

    assert_eq!(get("mesh/a", "/private", &[]).code, 1);
    assert_eq!(get("mesh/a", "/public/../private", &[]).code, 1);
    assert_eq!(get("mesh/b", "/public/page", &[]).code, 1);

    let r = get("mesh/a", "/public/page", &["--header", "x-block: yes"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.has("DENY: denied by mesh/block-header rule 0"),
        "{}",
        r.stdout
    );
    assert!(r.has("policy: mesh/block-header rule 0"), "{}", r.stdout);

    // The same Service by its VIP, the client by its IP.
    let vip = format!("127.78.{NET}.50:80");
    let r = check(
        &dir,
        &[
            "--from",
            &format!("127.78.{NET}.1"),
            "--to",
            &vip,
            "--path",
            "/public/x",
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

#[test]
fn every_backend_is_listed_with_its_weight() {
    let dir = state(ROUTE);
    let r = check(
        &dir,
        &["--from", "mesh/a", "--to", REVIEWS, "--path", "/public/a"],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.has("ALLOW: no ALLOW policy attached (default allow)"),
        "{}",
        r.stdout
    );
    assert!(r.has("route: mesh/reviews-v1:80 weight 90"), "{}", r.stdout);
    assert!(r.has("route: mesh/reviews-v2:80 weight 10"), "{}", r.stdout);
    assert!(r.has("rule: mesh/split#1"), "{}", r.stdout);

    let r = check(
        &dir,
        &["--from", "mesh/a", "--to", REVIEWS, "--path", "/elsewhere"],
    );
    assert_eq!(r.code, 0, "allowed, though no rule matches: {}", r.stdout);
    assert!(
        r.has("route: none (404 no HTTPRoute rule matches)"),
        "{}",
        r.stdout
    );

    let r = check(
        &dir,
        &[
            "--from",
            "mesh/a",
            "--to",
            REVIEWS,
            "--path",
            "/public/old/x",
        ],
    );
    assert!(
        r.has("route: none (301 redirect to http://reviews.mesh.svc.cluster.local/public/new/x)"),
        "{}",
        r.stdout
    );

    // A pod addressed directly is not routed.
    let pod = format!("127.78.{NET}.2:8080");
    let r = check(&dir, &["--from", "mesh/a", "--to", &pod]);
    assert!(
        r.has(&format!("route: pod mesh/v1 {pod} weight 1")),
        "{}",
        r.stdout
    );
}

#[test]
fn bad_input_exits_2_naming_what_is_wrong() {
    let dir = state(POLICIES);
    let cases: [(&[&str], &str); 6] = [
        (
            &["--from", "mesh/nobody", "--to", REVIEWS],
            "--from `mesh/nobody`",
        ),
        (
            &[
                "--from",
                "mesh/a",
                "--to",
                "ratings.mesh.svc.cluster.local:80",
            ],
            "no Service mesh/ratings",
        ),
        (
            &["--from", "mesh/a", "--to", "reviews:80"],
            "HOST must be an IP address",
        ),
        (
            &[
                "--from",
                "mesh/a",
                "--to",
                "reviews.mesh.svc.cluster.local:81",
            ],
            "not a port of a Service",
        ),
        (
            &["--from", "mesh/a", "--to", REVIEWS, "--header", "no-colon"],
            "--header `no-colon`",
        ),
        (
            &["--from", "mesh/a", "--to", REVIEWS, "--gateway", "waypoint"],
            "--gateway `waypoint`",
        ),
    ];
    for (args, message) in cases {
        let r = check(&dir, args);
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(message), "{args:?}: {}", r.stderr);
    }
    let missing = tempfile::tempdir().expect("tempdir");
    let r = check(&missing, &["--from", "mesh/a", "--to", REVIEWS]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no Gateway of class istio-waypoint"),
        "{}",
        r.stderr
    );
}
