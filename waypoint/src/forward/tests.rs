//! The per-request decisions of [`super`]: forwarding headers, routing, and the answers the
//! waypoint makes itself.

use super::*;

#[test]
fn forwarding_headers_are_appended_and_hop_by_hop_ones_dropped() {
    let mut h = HeaderMap::new();
    h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
    h.insert("connection", HeaderValue::from_static("close, x-private"));
    h.insert("x-private", HeaderValue::from_static("p"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("traceparent", HeaderValue::from_static("00-ab-cd-01"));
    append_forwarded_for(&mut h, "10.0.0.1".parse().expect("ip"));
    strip_hop_by_hop(&mut h);
    assert_eq!(
        h.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"1.1.1.1, 10.0.0.1"[..])
    );
    assert!(h.get("connection").is_none() && h.get("x-private").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("traceparent").is_some());
}

#[test]
fn host_is_taken_from_the_uri_then_the_header() {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("reviews:9080"));
    assert_eq!(host_of(&"/a".parse().expect("uri"), &h), "reviews:9080");
    assert_eq!(host_of(&"http://x.y/a".parse().expect("uri"), &h), "x.y");
    assert_eq!(host_only("reviews:9080"), "reviews");
    assert_eq!(host_only("[fd00::1]:80"), "[fd00::1]");
}

const STATE: &str = r#"
{apiVersion: v1, kind: Service, metadata: {name: svc, namespace: ns}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules:
  - matches: [{path: {value: /api}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: "1"}]}}
    - {type: URLRewrite, urlRewrite: {hostname: other, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    backendRefs: [{name: other, port: 8080}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301, hostname: new}}]
  - matches: [{path: {type: Exact, value: /mirror}}]
    filters: [{type: RequestMirror}]
    backendRefs: [{name: svc}]
"#;

fn routed(dest: Dest, path: &str) -> (Routed, http::request::Parts) {
    let objs = ztunnel::k8s::parse_file(std::path::Path::new("t.yaml"), STATE)
        .unwrap_or_else(|e| panic!("{e}"));
    let snap = Snapshot::build(1, "cluster.local", &objs);
    let (mut parts, ()) = Request::builder()
        .uri(path)
        .header("host", "svc.ns:80")
        .body(())
        .expect("request")
        .into_parts();
    let down = Downstream {
        dest,
        authority: "10.96.0.1:80".parse().expect("addr"),
        client: "10.0.0.9:1234".parse().expect("addr"),
        identity: SpiffeId::new("cluster.local", "ns", "client"),
        proto: Proto::Http1,
    };
    (route(&snap, &mut parts, &down), parts)
}

fn svc() -> Dest {
    Dest::Service {
        key: "ns/svc".into(),
        port: 80,
    }
}

#[test]
fn a_matched_rule_edits_headers_rewrites_and_picks_its_backend() {
    let (r, parts) = routed(svc(), "/api/x?q=1");
    let Routed::Forward(f) = r else {
        panic!("forwarded: {r:?}")
    };
    assert!(matches!(&f.target, Target::Service(k, 8080) if k == "ns/other"));
    assert_eq!((f.host.as_str(), f.path.as_str()), ("other", "/v2/x"));
    assert_eq!(
        parts.headers.get("x-set").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(f.rule.is_some());
}

#[test]
fn waypoint_answers_redirects_404_and_unusable_rules() {
    let status = |path| match routed(svc(), path).0 {
        Routed::Answer(resp, _) => (
            resp.status().as_u16(),
            resp.headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        ),
        Routed::Forward(f) => panic!("{path} forwarded to {f:?}"),
    };
    assert_eq!(status("/old?a=b"), (301, "http://new/old?a=b".into()));
    assert_eq!(status("/elsewhere").0, 404);
    assert_eq!(status("/mirror").0, 500);
}

#[test]
fn pods_and_unrouted_services_go_straight_to_their_endpoints() {
    let pod: SocketAddr = "10.0.0.5:9090".parse().expect("addr");
    let Routed::Forward(f) = routed(Dest::Pod(pod), "/old").0 else {
        panic!("pods are not routed")
    };
    assert!(matches!(f.target, Target::Pod(a) if a == pod));
    let unrouted = Dest::Service {
        key: "ns/plain".into(),
        port: 81,
    };
    let Routed::Forward(f) = routed(unrouted, "/api").0 else {
        panic!("no routes: the Service itself")
    };
    assert!(matches!(&f.target, Target::Service(k, 81) if k == "ns/plain"));
    assert!(f.rule.is_none());
}
