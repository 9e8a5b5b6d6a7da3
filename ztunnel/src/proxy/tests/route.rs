//! The pure routing decisions: outbound routes and the inbound checks, and how each refusal
//! maps to an HBONE status and a response flag.

use std::net::{IpAddr, SocketAddr};

use http::StatusCode;

use super::{pod, service, state, NAMESPACES};
use crate::proxy::route::{self, Node, Outbound, Reason, Route};
use crate::proxy::{FlowError, Response};
use crate::state::State;
use crate::telemetry::ResponseFlag;

// Node n1: a, c (mesh), p (plain namespace). Node n2: b (mesh), d (mesh, opted out), v6 (mesh).
const A: &str = "10.0.1.1";
const C: &str = "10.0.1.3";
const P: &str = "10.0.1.9";
const B: &str = "10.0.2.2";
const D: &str = "10.0.2.4";
const V6: &str = "fd00::2:6";

fn mesh() -> State {
    let mut y = NAMESPACES.to_string();
    y += &pod("a", "mesh", "n1", A, "app: a", &[]);
    y += &pod("c", "mesh", "n1", C, "app: c", &[("web", 8080)]);
    y += &pod("p", "plain", "n1", P, "app: p", &[]);
    y += &pod("b", "mesh", "n2", B, "app: b", &[("web", 8080)]);
    y += &pod("b2", "mesh", "n2", "10.0.2.3", "app: b", &[("web", 8081)]);
    y += &pod(
        "d",
        "mesh",
        "n2",
        D,
        "app: d, istio.io/dataplane-mode: none",
        &[],
    );
    y += &pod("v6", "mesh", "n2", V6, "app: v6", &[]);
    y += &service(
        "svc-b",
        "mesh",
        "10.96.0.2",
        "b",
        &[(80, "web"), (81, "9090")],
    );
    y += &service("svc-c", "mesh", "10.96.0.3", "c", &[(80, "web")]);
    y += &service("svc-d", "mesh", "10.96.0.4", "d", &[(80, "8080")]);
    y += &service("svc-none", "mesh", "10.96.0.9", "nobody", &[(80, "80")]);
    y += &service("svc-p", "plain", "10.96.1.1", "p", &[(80, "8080")]);
    state(&y)
}

fn node() -> Node {
    Node {
        name: "n1".into(),
        hbone_port: 15008,
        own_ports: vec![15001, 15006, 15008, 15053],
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

fn ip(ip: &str) -> IpAddr {
    ip.parse().expect("ip")
}

fn outbound(src: &str, dst: SocketAddr) -> Outbound {
    route::outbound(&mesh(), &node(), ip(src), dst).expect("an enrolled local source")
}

/// The HBONE target of an outbound route, or a panic naming the route found.
fn hbone(out: &Outbound) -> &route::HboneTarget {
    match &out.route {
        Route::Hbone(t) => t,
        other => panic!("expected HBONE, got {other:?}"),
    }
}

#[test]
fn a_vip_picks_an_endpoint_and_its_named_target_port() {
    let out = outbound(A, addr("10.96.0.2", 80));
    let t = hbone(&out);
    let want_port = if t.workload.name == "b" { 8080 } else { 8081 };
    assert_eq!(t.authority, SocketAddr::new(t.workload.ip, want_port));
    assert_eq!(out.reason, Reason::ServiceVip);
    assert_eq!(
        out.service.as_ref().map(|s| s.key()),
        Some("mesh/svc-b".into())
    );
}

#[test]
fn a_vip_maps_a_numeric_target_port() {
    let out = outbound(A, addr("10.96.0.2", 81));
    assert_eq!(hbone(&out).authority.port(), 9090);
}

#[test]
fn a_vip_round_robins_over_its_endpoints() {
    let state = mesh();
    let seen: std::collections::BTreeSet<String> = (0..4)
        .map(|_| {
            let out = route::outbound(&state, &node(), ip(A), addr("10.96.0.2", 80)).expect("ok");
            hbone(&out).workload.name.clone()
        })
        .collect();
    assert_eq!(seen, ["b".to_string(), "b2".to_string()].into());
}

#[test]
fn hbone_goes_to_the_pods_hbone_port_expecting_its_identity() {
    let out = outbound(A, addr(B, 8080));
    let t = hbone(&out);
    assert_eq!(t.connect, addr(B, 15008));
    assert_eq!(t.authority, addr(B, 8080));
    let ids: Vec<String> = t.identities.iter().map(ToString::to_string).collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/mesh/sa/b"]);
}

#[test]
fn a_pod_ip_is_routed_to_that_pod_and_port() {
    let out = outbound(A, addr(B, 7000));
    assert_eq!(hbone(&out).authority, addr(B, 7000));
    assert_eq!(out.reason, Reason::PodIp);
    assert!(out.service.is_none(), "no VIP was dialled");
}

#[test]
fn the_hbone_port_follows_the_configuration() {
    let n = Node {
        hbone_port: 25008,
        ..node()
    };
    let out = route::outbound(&mesh(), &n, ip(A), addr(B, 80)).expect("ok");
    assert_eq!(hbone(&out).connect, addr(B, 25008));
}

#[test]
fn an_ipv6_pod_is_reached_at_its_v6_address() {
    let out = outbound(A, addr(V6, 443));
    let t = hbone(&out);
    assert_eq!(t.connect, addr(V6, 15008));
    assert_eq!(t.authority.to_string(), "[fd00::2:6]:443");
}

#[test]
fn an_address_outside_the_mesh_passes_through_unchanged() {
    let out = outbound(A, addr("192.0.2.10", 443));
    match out.route {
        Route::Passthrough { dst, workload } => {
            assert_eq!(dst, addr("192.0.2.10", 443));
            assert!(workload.is_none());
        }
        other => panic!("expected passthrough, got {other:?}"),
    }
    assert_eq!(out.reason, Reason::OutsideMesh);
}

#[test]
fn an_unknown_vip_is_just_an_address_outside_the_mesh() {
    let out = outbound(A, addr("10.96.0.77", 80));
    assert!(matches!(
        out.route,
        Route::Passthrough { workload: None, .. }
    ));
    assert!(out.service.is_none());
}

#[test]
fn a_pod_of_a_namespace_not_in_the_mesh_passes_through() {
    let out = outbound(A, addr(P, 8080));
    match &out.route {
        Route::Passthrough { dst, workload } => {
            assert_eq!(*dst, addr(P, 8080));
            assert_eq!(workload.as_ref().map(|w| w.key()), Some("plain/p".into()));
        }
        other => panic!("expected passthrough, got {other:?}"),
    }
    assert_eq!(out.reason, Reason::NotEnrolled);
}

#[test]
fn an_opted_out_pod_passes_through() {
    let out = outbound(A, addr(D, 9000));
    assert!(matches!(out.route, Route::Passthrough { .. }));
    assert_eq!(out.reason, Reason::NotEnrolled);
}

#[test]
fn a_vip_of_pods_outside_the_mesh_passes_through_to_an_endpoint_and_target_port() {
    for (vip, want) in [("10.96.1.1", addr(P, 8080)), ("10.96.0.4", addr(D, 8080))] {
        match outbound(A, addr(vip, 80)).route {
            Route::Passthrough { dst, workload } => {
                assert_eq!(dst, want, "{vip}");
                assert!(workload.is_some(), "{vip}");
            }
            other => panic!("{vip}: expected passthrough, got {other:?}"),
        }
    }
}

#[test]
fn an_enrolled_pod_of_this_node_is_served_in_process() {
    match outbound(A, addr(C, 8080)).route {
        Route::SameNode { workload, port } => {
            assert_eq!((workload.name.as_str(), port), ("c", 8080))
        }
        other => panic!("expected same-node, got {other:?}"),
    }
}

#[test]
fn a_vip_whose_endpoint_is_on_this_node_is_served_in_process() {
    let out = outbound(A, addr("10.96.0.3", 80));
    assert!(
        matches!(out.route, Route::SameNode { port: 8080, .. }),
        "{out:?}"
    );
    assert_eq!(out.reason, Reason::ServiceVip);
}

#[test]
fn a_vip_without_an_endpoint_for_the_port_has_no_route() {
    for dst in [addr("10.96.0.9", 80), addr("10.96.0.2", 82)] {
        let out = outbound(A, dst);
        let Route::NoRoute(e) = out.route else {
            panic!("{dst}: expected no route, got {:?}", out.route)
        };
        let e = FlowError::NoRoute(e);
        assert_eq!(
            (e.flag(), e.status()),
            (ResponseFlag::NoRoute, StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(e.to_string().contains("no ready endpoint"), "{e}");
    }
}

#[test]
fn the_source_must_be_an_enrolled_pod_of_this_node() {
    let state = mesh();
    // Not in the mesh, unknown, and enrolled but on another node.
    for src in [P, "10.0.1.200", B] {
        let r = route::outbound(&state, &node(), ip(src), addr(B, 80));
        assert!(
            matches!(r, Err(FlowError::UnknownSource(_))),
            "{src}: {r:?}"
        );
    }
}

#[test]
fn the_source_of_a_route_is_the_pod_itself() {
    let out = outbound(C, addr(B, 80));
    assert_eq!(out.source.key(), "mesh/c");
    assert_eq!(
        out.source.identity.to_string(),
        "spiffe://cluster.local/ns/mesh/sa/c"
    );
}

#[test]
fn inbound_hbone_for_the_pod_the_connection_was_made_to_is_accepted() {
    let w = route::inbound_hbone(&mesh(), &node(), addr(C, 15008), addr(C, 8080)).expect("ok");
    assert_eq!(w.key(), "mesh/c");
}

/// The refusal of an inbound HBONE request, with its status and flag.
fn refused_hbone(
    local: SocketAddr,
    authority: SocketAddr,
) -> (FlowError, StatusCode, ResponseFlag) {
    let e = route::inbound_hbone(&mesh(), &node(), local, authority).expect_err("refused");
    let (status, flag) = (e.status(), e.flag());
    (e, status, flag)
}

#[test]
fn inbound_hbone_for_an_unknown_address_is_503() {
    let (e, status, flag) = refused_hbone(addr(C, 15008), addr("10.0.1.77", 80));
    assert!(matches!(e, FlowError::NotLocal(_)));
    assert_eq!(
        (status, flag),
        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlag::NoRoute)
    );
}

#[test]
fn inbound_hbone_for_a_pod_of_another_node_is_503() {
    let (e, status, _) = refused_hbone(addr(B, 15008), addr(B, 8080));
    assert!(matches!(e, FlowError::NotLocal(_)), "{e}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn inbound_hbone_for_a_local_pod_outside_the_mesh_is_503() {
    let (e, status, _) = refused_hbone(addr(P, 15008), addr(P, 8080));
    assert!(matches!(e, FlowError::NotLocal(_)), "{e}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn inbound_hbone_for_another_pod_than_the_certificate_presented_is_400() {
    // The connection went to c (and got c's certificate); the stream asks for a.
    let (e, status, flag) = refused_hbone(addr(C, 15008), addr(A, 8080));
    assert!(matches!(e, FlowError::AuthorityMismatch { .. }), "{e}");
    assert_eq!(
        (status, flag),
        (StatusCode::BAD_REQUEST, ResponseFlag::NoRoute)
    );
    assert!(e.to_string().contains("does not match"), "{e}");
}

#[test]
fn inbound_hbone_to_the_daemons_own_ports_is_400() {
    for port in [15008, 15001, 15006, 15053] {
        let (e, status, _) = refused_hbone(addr(C, 15008), addr(C, port));
        assert!(matches!(e, FlowError::Loop(_)), "{port}: {e}");
        assert_eq!(status, StatusCode::BAD_REQUEST, "{port}");
    }
}

#[test]
fn inbound_plaintext_is_for_enrolled_pods_of_this_node_only() {
    let state = mesh();
    let w = route::inbound_plaintext(&state, &node(), addr(C, 8080)).expect("ok");
    assert_eq!(w.key(), "mesh/c");
    for dst in [addr(P, 8080), addr(B, 8080), addr("10.0.1.77", 80)] {
        let e = route::inbound_plaintext(&state, &node(), dst).expect_err("refused");
        assert!(matches!(e, FlowError::NotLocal(_)), "{dst}: {e}");
    }
}

#[test]
fn each_refusal_has_one_status_and_one_flag() {
    let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let denied = FlowError::Denied(crate::authz::Reason::NoAllowMatched {
        checked: vec!["mesh/allow".into()],
        invalid: None,
    });
    let cases = [
        (denied, StatusCode::UNAUTHORIZED, ResponseFlag::Denied),
        (
            FlowError::Connect(io()),
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::UpstreamFailure,
        ),
        (
            FlowError::Tunnel(crate::hbone::HboneError::Connect {
                addr: addr(B, 15008),
                error: io(),
            }),
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::UpstreamFailure,
        ),
        (
            FlowError::Loop(addr(C, 15008)),
            StatusCode::BAD_REQUEST,
            ResponseFlag::NoRoute,
        ),
    ];
    for (e, status, flag) in cases {
        assert_eq!((e.status(), e.flag()), (status, flag), "{e}");
    }
}

#[test]
fn a_refused_client_is_told_by_status_or_reset() {
    assert_eq!(
        Response::Status(StatusCode::UNAUTHORIZED).to_string(),
        "401"
    );
    assert_eq!(Response::Reset.to_string(), "reset");
    assert_eq!(ResponseFlag::Denied.to_string(), "DENY");
    assert_eq!(ResponseFlag::None.to_string(), "-");
}

/// A dual-stack client reaching a dual-stack Service over IPv6 is tunnelled to the endpoint's
/// IPv6 address (authority `[v6]:port`, HBONE to `[v6]:15008`); over IPv4 it stays IPv4.
/// An IPv4-only endpoint is never picked for the IPv6 VIP.
#[test]
fn a_dual_stack_flow_keeps_its_family() {
    let mut y = NAMESPACES.to_string();
    let dual = |name: &str, node: &str, v4: &str, v6: &str, app: &str| {
        format!(
            "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: mesh, labels: {{app: {app}}}}}, \
             spec: {{nodeName: {node}}}, status: {{podIP: \"{v4}\", podIPs: [{{ip: \"{v4}\"}}, {{ip: \"{v6}\"}}], phase: Running}}}}\n"
        )
    };
    y += &dual("x", "n1", "10.0.1.1", "fd00:1::1", "x");
    y += &dual("y", "n2", "10.0.2.1", "fd00:2::1", "y");
    y += &pod("y4", "mesh", "n2", "10.0.2.2", "app: y", &[]);
    y += "---\n{apiVersion: v1, kind: Service, metadata: {name: svc-y, namespace: mesh}, spec: {clusterIP: 10.96.0.7, clusterIPs: [10.96.0.7, \"fd00:96::7\"], selector: {app: y}, ports: [{port: 80, targetPort: 8080}]}}\n";
    let s = state(&y);
    for _ in 0..3 {
        let out =
            route::outbound(&s, &node(), ip("fd00:1::1"), addr("fd00:96::7", 80)).expect("ok");
        assert_eq!(out.source.name, "x", "the source pod by its IPv6 address");
        let t = hbone(&out);
        assert_eq!(t.authority.to_string(), "[fd00:2::1]:8080");
        assert_eq!(t.connect.to_string(), "[fd00:2::1]:15008");
        assert_eq!(out.reason, Reason::ServiceVip);
    }
    let out = route::outbound(&s, &node(), ip("fd00:1::1"), addr("fd00:2::1", 9000)).expect("ok");
    assert_eq!(hbone(&out).connect.to_string(), "[fd00:2::1]:15008");
    let out = route::outbound(&s, &node(), ip("10.0.1.1"), addr("10.0.2.1", 9000)).expect("ok");
    assert_eq!(hbone(&out).connect, addr("10.0.2.1", 15008));
    // Inbound at n2: the authority may be the pod's IPv6 address.
    let n2 = Node {
        name: "n2".into(),
        ..node()
    };
    let pod = route::inbound_hbone(&s, &n2, addr("fd00:2::1", 15008), addr("fd00:2::1", 8080))
        .expect("local pod by its IPv6 address");
    assert_eq!(pod.name, "y");
}
