//! The waypoint hand-off: which outbound flows go to a waypoint (pure decisions over YAML
//! states), and a real flow from a pod through a daemon's outbound side to a waypoint's HBONE
//! listener, which must see the original destination as the authority and the source pod's
//! identity, and prove the waypoint pod's identity.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{pod, service, state, NAMESPACES};
use crate::drain::Drain;
use crate::hbone::client::Pool;
use crate::hbone::server::{Handler, InboundRequest, Responder, Server};
use crate::identity::{CertManager, FileCa, SpiffeId};
use crate::proxy::route::{self, Node, Outbound, Reason, Route};
use crate::proxy::{FlowError, Proxy};
use crate::socket::{Leg, PlainSockets, SocketFactory};
use crate::state::{ResolveError, State};
use crate::telemetry::Metrics;

// Node n1: a (client), c; node n2: b, b2 (backends), wp-1 (the waypoint's pod, n2), w (a pod
// whose waypoint takes workload traffic).
const A: &str = "10.0.1.1";
const C: &str = "10.0.1.3";
const B: &str = "10.0.2.2";
const WP: &str = "10.0.2.100";
const W: &str = "10.0.2.7";

fn gateway(name: &str, ns: &str, waypoint_for: &str, port: u16) -> String {
    format!(
        "---\n{{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{name: {name}, namespace: {ns}, \
         labels: {{istio.io/waypoint-for: {waypoint_for}}}}}, spec: {{gatewayClassName: istio-waypoint, \
         listeners: [{{name: mesh, port: {port}, protocol: HBONE}}]}}}}\n"
    )
}

/// A Service document like [`service`] with `istio.io/use-waypoint: <wp>`.
fn labelled_service(name: &str, vip: &str, selector: &str, port: (u16, &str), wp: &str) -> String {
    service(name, "mesh", vip, selector, &[port]).replace(
        "namespace: mesh}",
        &format!("namespace: mesh, labels: {{istio.io/use-waypoint: {wp}}}}}"),
    )
}

fn mesh() -> State {
    let mut y = NAMESPACES.to_string();
    y += &pod("a", "mesh", "n1", A, "app: a", &[]);
    y += &pod("c", "mesh", "n1", C, "app: c", &[]);
    y += &pod("b", "mesh", "n2", B, "app: b", &[("web", 8080)]);
    y += &pod("b2", "mesh", "n2", "10.0.2.3", "app: b", &[("web", 8080)]);
    y += &pod(
        "wp-1",
        "mesh",
        "n2",
        WP,
        "gateway.networking.k8s.io/gateway-name: wp",
        &[],
    );
    y += &pod(
        "w",
        "mesh",
        "n2",
        W,
        "app: w, istio.io/use-waypoint: wl",
        &[],
    );
    y += &gateway("wp", "mesh", "service", 15008);
    y += &gateway("wl", "mesh", "workload", 15008);
    y += &gateway("empty", "mesh", "all", 15008);
    y += &labelled_service("svc-b", "10.96.0.2", "b", (80, "web"), "wp");
    y += &service("plain-b", "mesh", "10.96.0.3", "b", &[(80, "web")]);
    y += &labelled_service("svc-c", "10.96.0.4", "c", (80, "8080"), "empty");
    y += &service("svc-w", "mesh", "10.96.0.5", "w", &[(80, "9000")]);
    y += &labelled_service("svc-wl", "10.96.0.6", "b", (80, "web"), "wl");
    // The waypoint's own Service, selecting its pods.
    y += "---\n{apiVersion: v1, kind: Service, metadata: {name: wp, namespace: mesh, labels: {gateway.networking.k8s.io/gateway-name: wp}}, \
          spec: {clusterIP: 10.96.0.9, selector: {gateway.networking.k8s.io/gateway-name: wp}, ports: [{port: 15008}]}}\n";
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

fn outbound(src: &str, dst: SocketAddr) -> Outbound {
    route::outbound(&mesh(), &node(), src.parse().expect("ip"), dst).expect("routed")
}

/// The waypoint route, or a panic naming the route found.
fn handed_off(out: &Outbound) -> (&route::HboneTarget, String) {
    match &out.route {
        Route::Waypoint { target, waypoint } => (target, waypoint.key()),
        other => panic!("expected a waypoint hand-off, got {other:?}"),
    }
}

#[test]
fn a_vip_of_a_service_with_a_waypoint_goes_to_a_waypoint_pod_with_the_vip_as_authority() {
    let out = outbound(A, addr("10.96.0.2", 80));
    let (t, wp) = handed_off(&out);
    assert_eq!(wp, "mesh/wp");
    assert_eq!(
        t.authority,
        addr("10.96.0.2", 80),
        "the original destination"
    );
    assert_eq!(t.connect, addr(WP, 15008));
    assert_eq!(t.workload.name, "wp-1");
    let ids: Vec<String> = t.identities.iter().map(ToString::to_string).collect();
    assert_eq!(
        ids,
        ["spiffe://cluster.local/ns/mesh/sa/wp-1"],
        "the waypoint's"
    );
    assert_eq!(out.reason, Reason::ServiceVip);
    assert_eq!(
        out.service.as_ref().map(|s| s.key()).as_deref(),
        Some("mesh/svc-b")
    );
}

#[test]
fn the_same_pods_behind_a_service_without_a_waypoint_are_reached_directly() {
    let out = outbound(A, addr("10.96.0.3", 80));
    assert!(matches!(out.route, Route::Hbone(_)), "{:?}", out.route);
    // And a pod IP of a service-only waypoint's Service is reached directly too.
    assert!(matches!(outbound(A, addr(B, 8080)).route, Route::Hbone(_)));
}

#[test]
fn a_port_the_service_does_not_have_is_not_handed_off() {
    let out = outbound(A, addr("10.96.0.2", 81));
    assert!(matches!(out.route, Route::NoRoute(_)), "{:?}", out.route);
}

#[test]
fn a_waypoint_without_a_ready_pod_fails_the_flow_instead_of_bypassing_it() {
    let out = outbound(A, addr("10.96.0.4", 80));
    let Route::NoRoute(e) = out.route else {
        panic!("expected no route, got {:?}", out.route)
    };
    assert!(matches!(e, ResolveError::NoWaypointPod { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "waypoint mesh/empty of mesh/svc-c has no ready pod"
    );
    let e = FlowError::NoRoute(e);
    assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn a_pod_with_a_workload_waypoint_is_handed_off_with_its_own_address() {
    // wl takes workload traffic but has no pod: the flow fails rather than skip it.
    let out = outbound(A, addr(W, 9000));
    let Route::NoRoute(ResolveError::NoWaypointPod { waypoint, target }) = out.route else {
        panic!("expected the waypoint's no route, got {:?}", out.route)
    };
    assert_eq!(
        (waypoint.as_str(), target.as_str()),
        ("mesh/wl", "10.0.2.7:9000")
    );
    // Through a VIP without a waypoint, the picked pod's waypoint applies.
    let out = outbound(A, addr("10.96.0.5", 80));
    assert!(
        matches!(&out.route, Route::NoRoute(ResolveError::NoWaypointPod { target, .. }) if target == "10.0.2.7:9000"),
        "{:?}",
        out.route
    );
    // A service-only label with a workload waypoint attaches nothing to the Service.
    assert!(matches!(
        outbound(A, addr("10.96.0.6", 80)).route,
        Route::Hbone(_)
    ));
}

#[test]
fn a_workload_waypoint_with_a_pod_gets_the_pod_address_as_authority() {
    let mut y = NAMESPACES.to_string();
    y += &pod("a", "mesh", "n1", A, "app: a", &[]);
    y += &pod(
        "w",
        "mesh",
        "n2",
        W,
        "app: w, istio.io/use-waypoint: wl",
        &[],
    );
    y += &pod(
        "wl-1",
        "mesh",
        "n1",
        "10.0.1.100",
        "gateway.networking.k8s.io/gateway-name: wl",
        &[],
    );
    y += &gateway("wl", "mesh", "all", 15008);
    let s = state(&y);
    let out = route::outbound(&s, &node(), A.parse().expect("ip"), addr(W, 9000)).expect("ok");
    let (t, wp) = handed_off(&out);
    assert_eq!(wp, "mesh/wl");
    assert_eq!(t.authority, addr(W, 9000));
    assert_eq!(
        t.connect,
        addr("10.0.1.100", 15008),
        "a waypoint pod of this node is dialled like any other (it is not captured)"
    );
    assert_eq!(out.reason, Reason::PodIp);
}

#[test]
fn a_waypoint_pod_is_not_captured_and_never_handed_back_to_its_waypoint() {
    let s = mesh();
    let wp = s.workload(WP.parse().expect("ip")).expect("waypoint pod");
    assert!(!wp.enrolled, "capture never enrolls a waypoint pod");
    // Capture steers only enrolled pods to the outbound side; were a waypoint pod's flow
    // to arrive there anyway, it is refused, never handed back to the waypoint.
    let n2 = Node {
        name: "n2".into(),
        ..node()
    };
    let r = route::outbound(&s, &n2, WP.parse().expect("ip"), addr("10.96.0.2", 80));
    assert!(
        matches!(r, Err(FlowError::UnknownSource(_))),
        "a waypoint pod is no source of captured flows: {r:?}"
    );
}

#[test]
fn a_node_daemon_accepts_a_waypoints_tunnel_to_a_pod_and_refuses_a_vip() {
    let s = mesh();
    let n2 = Node {
        name: "n2".into(),
        ..node()
    };
    // The waypoint's leg to an endpoint: CONNECT <pod>:<port> to the pod's 15008.
    let w = route::inbound_hbone(&s, &n2, addr(B, 15008), addr(B, 8080)).expect("accepted");
    assert_eq!(w.name, "b");
    // A VIP authority is the waypoint's to resolve, never a node daemon's.
    let e =
        route::inbound_hbone(&s, &n2, addr(B, 15008), addr("10.96.0.2", 80)).expect_err("refused");
    assert!(matches!(e, FlowError::NotLocal(_)), "{e}");
}

// ---------------------------------------------------------------------------------------
// A real flow: pod a's daemon hands a VIP flow to a stand-in waypoint over HBONE.

const WAIT: Duration = Duration::from_secs(10);

/// A waypoint stand-in: proves `identity`, answers every stream 200 with what it saw.
#[derive(Debug)]
struct StandIn {
    identity: SpiffeId,
    seen: Mutex<Vec<(SocketAddr, SpiffeId, IpAddr)>>,
}

impl Handler for StandIn {
    fn identity_for(&self, _local: SocketAddr) -> Option<SpiffeId> {
        Some(self.identity.clone())
    }

    fn serve(
        self: Arc<Self>,
        req: InboundRequest,
        responder: Responder,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let line = format!("authority={} client={}\n", req.authority, req.peer_identity);
            if let Ok(mut seen) = self.seen.lock() {
                seen.push((req.authority, req.peer_identity.clone(), req.peer.ip()));
            }
            if let Ok((mut send, _recv)) = responder.accept() {
                let _ = send.send_data(Bytes::from(line), true);
                // Keep the stream until the data is out.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }
}

struct HandoffMesh {
    n1: Arc<Proxy>,
    metrics: Arc<Metrics>,
    waypoint: Arc<StandIn>,
    sockets: Arc<dyn SocketFactory>,
    net: u8,
    _ca_dir: tempfile::TempDir,
}

impl HandoffMesh {
    /// Pod a (.1) on n1; the waypoint pod (.60, service account `wp-sa`) on n2, listening on
    /// an ephemeral port its Gateway names; Service svc (VIP .50) of pod b (.2) attached to it.
    /// The stand-in proves `proven` (the waypoint pod's identity unless a test says otherwise).
    async fn start(net: u8, proven: &str) -> HandoffMesh {
        let sockets: Arc<dyn SocketFactory> = Arc::new(PlainSockets {
            connect_timeout: Duration::from_secs(5),
        });
        let ip = |host: u8| IpAddr::V4(Ipv4Addr::new(127, 79, net, host));
        let listener = sockets
            .listen(Leg::Hbone, SocketAddr::new(ip(60), 0), false)
            .expect("waypoint listener");
        let port = listener.local_addr().expect("addr").port();
        let mut y = NAMESPACES.to_string();
        y += &pod("a", "mesh", "n1", &ip(1).to_string(), "app: a", &[]);
        y += &pod("b", "mesh", "n2", &ip(2).to_string(), "app: b", &[]);
        y += &pod(
            "wp-sa",
            "mesh",
            "n2",
            &ip(60).to_string(),
            "gateway.networking.k8s.io/gateway-name: wp",
            &[],
        );
        y += &gateway("wp", "mesh", "service", port);
        y += &labelled_service("svc", &ip(50).to_string(), "b", (80, "8080"), "wp");
        let (_tx, rx) = watch::channel(Arc::new(state(&y)));
        let ca_dir = tempfile::tempdir().expect("tempdir");
        let ca = FileCa::load_or_create(ca_dir.path(), "cluster.local").expect("CA");
        let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600)).expect("certs");
        let a_id = SpiffeId::new("cluster.local", "mesh", "a");
        let wp_id = SpiffeId::new("cluster.local", "mesh", proven);
        certs.set_identities(&BTreeSet::from([a_id, wp_id.clone()]));
        let waypoint = Arc::new(StandIn {
            identity: wp_id,
            seen: Mutex::new(Vec::new()),
        });
        let config = super::flows::hbone_config();
        let server = Server::new(
            config.clone(),
            "cluster.local",
            certs.clone(),
            waypoint.clone(),
            Drain::default(),
        );
        tokio::spawn(server.run(listener));
        let metrics = Metrics::new("cluster.local");
        let n1 = Proxy::new(
            Node {
                name: "n1".into(),
                hbone_port: 15008,
                own_ports: vec![15008],
            },
            "istio-system",
            rx,
            Pool::new(config, certs, sockets.clone()),
            sockets.clone(),
            metrics.clone(),
        );
        // The watch sender may go: the state never changes in these tests.
        HandoffMesh {
            n1,
            metrics,
            waypoint,
            sockets,
            net,
            _ca_dir: ca_dir,
        }
    }

    fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 79, self.net, host)), port)
    }

    /// A flow from pod a to `dst` through n1's outbound side; what came back before EOF.
    async fn send(&self, dst: SocketAddr) -> std::io::Result<Vec<u8>> {
        let l = self
            .sockets
            .listen(Leg::Node, self.addr(99, 0), false)
            .expect("capture stand-in");
        let mut client = self
            .sockets
            .connect(Leg::Pod, Some(self.addr(1, 0).ip()), l.local_addr()?)
            .await?;
        let (tcp, peer) = l.accept().await?;
        let n1 = self.n1.clone();
        tokio::spawn(async move { n1.outbound_to(tcp, peer, dst).await });
        let io = async {
            client.shutdown().await?;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await?;
            Ok(got)
        };
        tokio::time::timeout(WAIT, io)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
}

#[tokio::test]
async fn a_vip_flow_reaches_the_waypoint_with_the_original_destination_and_client_identity() {
    let m = HandoffMesh::start(1, "wp-sa").await;
    let vip = m.addr(50, 80);
    let got = m.send(vip).await.expect("flow through the waypoint");
    let text = String::from_utf8_lossy(&got);
    assert_eq!(
        text,
        format!("authority={vip} client=spiffe://cluster.local/ns/mesh/sa/a\n")
    );
    let seen = m.waypoint.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].2, m.addr(1, 0).ip(), "from the pod's own IP");
    // The source reporter names the waypoint pod as the destination workload, the original
    // Service as the destination service.
    let text = m.metrics.encode();
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"source\""))
        .unwrap_or_else(|| panic!("no opened metric:\n{text}"));
    assert!(line.contains("destination_workload=\"wp-sa\""), "{line}");
    assert!(
        line.contains("destination_principal=\"spiffe://cluster.local/ns/mesh/sa/wp-sa\""),
        "{line}"
    );
    assert!(
        line.contains("destination_service=\"svc.mesh.svc.cluster.local\""),
        "{line}"
    );
}

#[tokio::test]
async fn a_waypoint_proving_another_identity_is_not_trusted() {
    let m = HandoffMesh::start(2, "impostor").await;
    let got = m.send(m.addr(50, 80)).await;
    assert!(
        got.as_ref().map_or(true, |b| b.is_empty()),
        "the flow must fail: {got:?}"
    );
    assert!(m.waypoint.seen.lock().expect("lock").is_empty());
}

/// In a dual-stack mesh, an IPv6 flow to a Service's IPv6 VIP is handed to a waypoint pod that
/// has an IPv6 address, dialled at that address, the IPv6 VIP and port as authority; an IPv4
/// flow stays IPv4. A waypoint whose ready pods are all IPv4-only fails an IPv6 flow (naming
/// the family) rather than switch families or bypass the waypoint.
#[test]
fn an_ipv6_flow_reaches_the_waypoint_at_an_ipv6_address() {
    let dual = |name: &str, node: &str, ips: &[&str], labels: &str| {
        let all: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
        format!(
            "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: mesh, labels: {{{labels}}}}}, \
             spec: {{nodeName: {node}, serviceAccountName: {name}}}, status: {{podIP: \"{}\", podIPs: [{}], phase: Running}}}}\n",
            ips[0],
            all.join(", ")
        )
    };
    let mut y = NAMESPACES.to_string();
    y += &dual("x", "n1", &["10.0.1.1", "fd00:1::1"], "app: x");
    y += &dual("y", "n2", &["10.0.2.1", "fd00:2::1"], "app: y");
    let wp_label = "gateway.networking.k8s.io/gateway-name";
    y += &dual("wp4", "n2", &["10.0.2.8"], &format!("{wp_label}: wp"));
    y += &dual(
        "wp6",
        "n2",
        &["10.0.2.9", "fd00:2::9"],
        &format!("{wp_label}: wp"),
    );
    y += &dual("old", "n2", &["10.0.2.10"], &format!("{wp_label}: v4only"));
    y += &gateway("wp", "mesh", "service", 15008);
    y += &gateway("v4only", "mesh", "service", 15008);
    for (name, v4, v6, wp) in [
        ("svc", "10.96.0.7", "fd00:96::7", "wp"),
        ("svc-o", "10.96.0.8", "fd00:96::8", "v4only"),
    ] {
        y += &format!(
            "---\n{{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: mesh, labels: {{istio.io/use-waypoint: {wp}}}}}, \
             spec: {{clusterIP: {v4}, clusterIPs: [{v4}, \"{v6}\"], selector: {{app: y}}, ports: [{{port: 80, targetPort: 8080}}]}}}}\n"
        );
    }
    let s = state(&y);
    let out = |src: &str, dst: SocketAddr| {
        route::outbound(&s, &node(), src.parse().expect("ip"), dst).expect("routed")
    };
    for _ in 0..4 {
        let o = out("fd00:1::1", addr("fd00:96::7", 80));
        let (t, wp) = handed_off(&o);
        assert_eq!(wp, "mesh/wp");
        assert_eq!(t.workload.name, "wp6", "only wp6 has an IPv6 address");
        assert_eq!(t.connect, addr("fd00:2::9", 15008));
        assert_eq!(t.authority, addr("fd00:96::7", 80));
        assert_eq!(
            t.identities,
            [SpiffeId::new("cluster.local", "mesh", "wp6")]
        );
    }
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        let o = out("10.0.1.1", addr("10.96.0.7", 80));
        let (t, _) = handed_off(&o);
        assert!(t.connect.is_ipv4(), "{}", t.connect);
        assert_eq!(t.authority, addr("10.96.0.7", 80));
        seen.insert(t.workload.name.to_string());
    }
    assert_eq!(seen, BTreeSet::from(["wp4".into(), "wp6".into()]));
    let o = out("fd00:1::1", addr("fd00:96::8", 80));
    let Route::NoRoute(e) = o.route else {
        panic!("expected no route, got {:?}", o.route)
    };
    assert_eq!(
        e.to_string(),
        "waypoint mesh/v4only of mesh/svc-o has no ready pod with an IPv6 address"
    );
    assert_eq!(
        FlowError::NoRoute(e).status(),
        http::StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(matches!(
        out("10.0.1.1", addr("10.96.0.8", 80)).route,
        Route::Waypoint { .. }
    ));
}
