//! Real flows through two daemons' proxies in one process: node n1 (pods a, c, and e outside
//! the mesh) and node n2 (pods b, b3), real TLS 1.3 and HTTP/2 between them, real TCP to the
//! apps. Each app answers `peer=<the source IP it saw>\n` and then echoes what it reads.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{pod, service, state, NAMESPACES};
use crate::config::HboneConfig;
use crate::drain::Drain;
use crate::hbone::client::{ConnectRequest, Pool, PoolKey};
use crate::hbone::server::Server;
use crate::hbone::HboneError;
use crate::identity::{CertManager, FileCa, SpiffeId};
use crate::proxy::route::Node;
use crate::proxy::Proxy;
use crate::socket::{Leg, PlainSockets, SocketFactory};
use crate::state::State;
use crate::telemetry::Metrics;

const WAIT: Duration = Duration::from_secs(10);

pub(super) fn hbone_config() -> HboneConfig {
    HboneConfig {
        max_streams: 100,
        spread: 4,
        idle_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        stream_window: 1 << 20,
        stream_window_start: 64 << 10,
        send_buffer: 1 << 20,
        connection_window: crate::config::connection_window(100, 1 << 20).expect("fits"),
        max_frame_size: 1 << 20,
        tcp_congestion: None,
        notsent_lowat: None,
    }
}

/// Two nodes' proxies on loopback. Every test takes its own 127.77.`net`.0/24, so tests
/// running side by side never share an address.
struct Mesh {
    net: u8,
    n1: Arc<Proxy>,
    n2: Arc<Proxy>,
    m1: Arc<Metrics>,
    m2: Arc<Metrics>,
    state_tx: watch::Sender<Arc<State>>,
    yaml: String,
    /// Ports of the apps on b, c and the address outside the mesh.
    app: [u16; 3],
    hbone_port: u16,
    sockets: Arc<dyn SocketFactory>,
    _ca_dir: tempfile::TempDir,
}

const A: u8 = 1;
const B: u8 = 2;
const C: u8 = 3;
const B3: u8 = 4;
const E: u8 = 5;
const OUTSIDE: u8 = 9;
const VIP: u8 = 50;

impl Mesh {
    async fn start(net: u8) -> Mesh {
        Mesh::start_with(net, hbone_config()).await
    }

    /// The same with both proxies' HBONE settings `cfg`.
    async fn start_with(net: u8, cfg: HboneConfig) -> Mesh {
        let sockets: Arc<dyn SocketFactory> = Arc::new(PlainSockets {
            connect_timeout: Duration::from_secs(5),
        });
        let ip = |host| IpAddr::V4(Ipv4Addr::new(127, 77, net, host));
        let mut app = [0; 3];
        for (i, host) in [B, C, OUTSIDE].into_iter().enumerate() {
            let l = sockets
                .listen(Leg::Node, SocketAddr::new(ip(host), 0), false)
                .expect("app listener");
            app[i] = l.local_addr().expect("addr").port();
            tokio::spawn(echo(l));
        }
        let hbone = sockets
            .listen(Leg::Hbone, SocketAddr::new(ip(B), 0), false)
            .expect("HBONE listener");
        let hbone_port = hbone.local_addr().expect("addr").port();

        let mut yaml = NAMESPACES.to_string();
        for (name, ns, node, host) in [
            ("a", "mesh", "n1", A),
            ("c", "mesh", "n1", C),
            ("e", "plain", "n1", E),
            ("b", "mesh", "n2", B),
            ("b3", "mesh", "n2", B3),
        ] {
            yaml += &pod(
                name,
                ns,
                node,
                &ip(host).to_string(),
                &format!("app: {name}"),
                &[],
            );
        }
        let target = app[0].to_string();
        yaml += &service("svc-b", "mesh", &ip(VIP).to_string(), "b", &[(80, &target)]);
        let (state_tx, state_rx) = watch::channel(Arc::new(state(&yaml)));

        let ca_dir = tempfile::tempdir().expect("tempdir");
        let ca = FileCa::load_or_create(ca_dir.path(), "cluster.local").expect("CA");
        let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600)).expect("certs");
        let ids: BTreeSet<SpiffeId> = ["a", "b", "b3", "c"]
            .into_iter()
            .map(|sa| SpiffeId::new("cluster.local", "mesh", sa))
            .collect();
        certs.set_identities(&ids);

        let proxy = |name: &str, metrics: &Arc<Metrics>| {
            let node = Node {
                name: name.into(),
                hbone_port,
                own_ports: vec![hbone_port],
            };
            let pool = Pool::new(cfg.clone(), certs.clone(), sockets.clone());
            Proxy::new(
                node,
                "istio-system",
                state_rx.clone(),
                pool,
                sockets.clone(),
                metrics.clone(),
            )
        };
        let (m1, m2) = (Metrics::new("cluster.local"), Metrics::new("cluster.local"));
        let (n1, n2) = (proxy("n1", &m1), proxy("n2", &m2));
        let server = Server::new(
            cfg.clone(),
            "cluster.local",
            certs.clone(),
            n2.clone(),
            Drain::default(),
        );
        tokio::spawn(server.run(hbone));
        Mesh {
            net,
            n1,
            n2,
            m1,
            m2,
            state_tx,
            yaml,
            app,
            hbone_port,
            sockets,
            _ca_dir: ca_dir,
        }
    }

    fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 77, self.net, host))
    }

    fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(host), port)
    }

    /// A connection from pod `src` as a captured listener would hand it over: the proxy side
    /// is served by `serve`, the client side is returned.
    async fn captured<F, Fut>(&self, src: u8, serve: F) -> TcpStream
    where
        F: FnOnce(TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = self
            .sockets
            .listen(Leg::Node, self.addr(99, 0), false)
            .expect("capture stand-in");
        let client = self
            .sockets
            .connect(Leg::Pod, Some(self.ip(src)), l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, peer) = l.accept().await.expect("accept");
        tokio::spawn(serve(tcp, peer));
        client
    }

    /// Opens an outbound flow from pod `src` to `dst` through node n1.
    async fn outbound(&self, src: u8, dst: SocketAddr) -> TcpStream {
        let n1 = self.n1.clone();
        self.captured(src, move |tcp, peer| async move {
            n1.outbound_to(tcp, peer, dst).await
        })
        .await
    }

    /// Sends `payload` from pod `src` to `dst` through n1, half-closes, and reads the answer.
    async fn send(&self, src: u8, dst: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
        exchange(self.outbound(src, dst).await, payload).await
    }

    /// Replaces the state with the base objects plus `extra` and re-checks open flows.
    fn publish(&self, extra: &str) {
        let s = Arc::new(state(&format!("{}{extra}", self.yaml)));
        self.state_tx.send_replace(s.clone());
        self.n1.recheck_connections(&s);
        self.n2.recheck_connections(&s);
    }
}

/// Writes `payload`, half-closes, reads to EOF (bounded in time).
async fn exchange(mut tcp: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let io = async {
        tcp.write_all(payload).await?;
        tcp.shutdown().await?;
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await?;
        Ok(got)
    };
    tokio::time::timeout(WAIT, io)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The app: `peer=<ip>\n`, then an echo until EOF.
async fn echo(l: TcpListener) {
    while let Ok((mut tcp, peer)) = l.accept().await {
        tokio::spawn(async move {
            let _ = tcp
                .write_all(format!("peer={}\n", peer.ip()).as_bytes())
                .await;
            let (mut rd, mut wr) = tcp.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// What the app at the far end answers to `payload` from `src`.
fn answer(src: IpAddr, payload: &[u8]) -> Vec<u8> {
    let mut v = format!("peer={src}\n").into_bytes();
    v.extend_from_slice(payload);
    v
}

/// The line of metric `name` whose labels contain every one of `labels`.
fn metric(m: &Metrics, name: &str, labels: &[&str]) -> Option<String> {
    m.encode()
        .lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .map(str::to_string)
}

fn has_metric(m: &Metrics, name: &str, labels: &[&str]) -> bool {
    metric(m, name, labels).is_some()
}

#[tokio::test]
async fn a_flow_to_a_pod_on_another_node_crosses_hbone_intact_from_the_pods_ip() {
    let mesh = Mesh::start(1).await;
    let data = payload(3 << 20);
    let got = mesh
        .send(A, mesh.addr(B, mesh.app[0]), &data)
        .await
        .expect("flow");
    assert!(
        got == answer(mesh.ip(A), &data),
        "bytes differ ({} received)",
        got.len()
    );
    let sent = format!("}} {}", data.len());
    let received = metric(
        &mesh.m2,
        "istio_tcp_received_bytes_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    )
    .expect("destination byte counter");
    assert!(received.ends_with(&sent), "{received}");
    assert!(has_metric(
        &mesh.m1,
        "istio_tcp_connections_closed_total",
        &[
            "reporter=\"source\"",
            "source_principal=\"spiffe://cluster.local/ns/mesh/sa/a\"",
            "destination_principal=\"spiffe://cluster.local/ns/mesh/sa/b\"",
            "response_flags=\"-\""
        ]
    ));
}

#[tokio::test]
async fn a_vip_reaches_the_endpoint_on_its_target_port_and_reports_the_service() {
    let mesh = Mesh::start(2).await;
    let got = mesh
        .send(A, mesh.addr(VIP, 80), b"via vip")
        .await
        .expect("flow");
    assert_eq!(got, answer(mesh.ip(A), b"via vip"));
    let svc = "destination_service=\"svc-b.mesh.svc.cluster.local\"";
    assert!(has_metric(
        &mesh.m1,
        "istio_tcp_connections_opened_total",
        &["reporter=\"source\"", svc]
    ));
    assert!(has_metric(
        &mesh.m2,
        "istio_tcp_connections_opened_total",
        &["reporter=\"destination\"", svc]
    ));
}

#[tokio::test]
async fn a_flow_to_a_pod_of_the_same_node_is_served_in_process_and_reported_twice() {
    let mesh = Mesh::start(3).await;
    let got = mesh
        .send(A, mesh.addr(C, mesh.app[1]), b"same node")
        .await
        .expect("flow");
    assert_eq!(got, answer(mesh.ip(A), b"same node"));
    for reporter in ["source", "destination"] {
        let r = format!("reporter=\"{reporter}\"");
        assert!(
            has_metric(
                &mesh.m1,
                "istio_tcp_received_bytes_total",
                &[&r, "mutual_tls"]
            ),
            "{reporter}:\n{}",
            mesh.m1.encode()
        );
    }
    assert_eq!(
        metric(&mesh.m2, "istio_tcp_connections_opened_total", &[]),
        None
    );
}

#[tokio::test]
async fn an_address_outside_the_mesh_is_reached_in_plain_tcp_from_the_pods_ip() {
    let mesh = Mesh::start(4).await;
    let got = mesh
        .send(A, mesh.addr(OUTSIDE, mesh.app[2]), b"outside")
        .await
        .expect("flow");
    assert_eq!(got, answer(mesh.ip(A), b"outside"));
    assert!(has_metric(
        &mesh.m1,
        "istio_tcp_connections_closed_total",
        &[
            "connection_security_policy=\"none\"",
            "destination_workload=\"unknown\""
        ]
    ));
}

#[tokio::test]
async fn plaintext_from_outside_the_mesh_reaches_an_enrolled_pod_from_the_clients_ip() {
    let mesh = Mesh::start(5).await;
    let n1 = mesh.n1.clone();
    let dst = mesh.addr(C, mesh.app[1]);
    let client = mesh
        .captured(E, move |tcp, peer| async move {
            n1.inbound_plaintext_to(tcp, peer, dst).await
        })
        .await;
    let got = exchange(client, b"plain").await.expect("flow");
    assert_eq!(got, answer(mesh.ip(E), b"plain"));
    assert!(has_metric(
        &mesh.m1,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"e\"",
            "connection_security_policy=\"none\""
        ]
    ));
}

const DENY_A: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: deny-a, namespace: mesh}\n\
    spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/a]}}]}]}\n";

#[tokio::test]
async fn a_denied_flow_gets_401_and_the_deny_flag_and_the_client_a_reset() {
    let mesh = Mesh::start(6).await;
    mesh.publish(DENY_A);
    let r = mesh.send(A, mesh.addr(B, mesh.app[0]), b"x").await;
    assert!(r.is_err(), "a denied client must see a failure, got {r:?}");
    assert!(has_metric(
        &mesh.m2,
        "istio_tcp_connections_closed_total",
        &["reporter=\"destination\"", "response_flags=\"DENY\""]
    ));
    assert!(has_metric(
        &mesh.m1,
        "istio_tcp_connections_closed_total",
        &["reporter=\"source\"", "response_flags=\"UF\""]
    ));
    // The wire answer itself.
    let e = tunnel(&mesh, "b", B, mesh.addr(B, mesh.app[0])).await;
    assert!(
        matches!(e, Some(HboneError::Status { status, .. }) if status == 401),
        "{e:?}"
    );
}

/// Opens an HBONE stream from pod a to the pod at `to` asking for `authority`; the error, if
/// refused.
async fn tunnel(mesh: &Mesh, to_sa: &str, to: u8, authority: SocketAddr) -> Option<HboneError> {
    let key = PoolKey {
        src_identity: SpiffeId::new("cluster.local", "mesh", "a"),
        src_ip: mesh.ip(A),
        dst_identities: vec![SpiffeId::new("cluster.local", "mesh", to_sa)],
        dst: mesh.addr(to, mesh.hbone_port),
    };
    let req = ConnectRequest {
        authority,
        client: mesh.addr(A, 40000),
        baggage: String::new(),
    };
    mesh.n1.pool.connect(&key, &req).await.err()
}

#[tokio::test]
async fn hbone_requests_for_another_pod_or_the_daemons_port_get_400() {
    let mesh = Mesh::start(7).await;
    // The connection proves b; the stream asks for b3 (also on n2).
    for authority in [mesh.addr(B3, 80), mesh.addr(B, mesh.hbone_port)] {
        let e = tunnel(&mesh, "b", B, authority).await;
        assert!(
            matches!(e, Some(HboneError::Status { status, .. }) if status == 400),
            "{authority}: {e:?}"
        );
    }
    assert!(has_metric(
        &mesh.m2,
        "istio_tcp_connections_closed_total",
        &["reporter=\"destination\"", "response_flags=\"NR\""]
    ));
}

#[tokio::test]
async fn a_pod_that_refuses_the_connection_gives_503_and_the_upstream_failure_flag() {
    let mesh = Mesh::start(8).await;
    // Nothing listens on port 1 of b.
    let e = tunnel(&mesh, "b", B, mesh.addr(B, 1)).await;
    assert!(
        matches!(e, Some(HboneError::Status { status, .. }) if status == 503),
        "{e:?}"
    );
    assert!(has_metric(
        &mesh.m2,
        "istio_tcp_connections_closed_total",
        &["reporter=\"destination\"", "response_flags=\"UF\""]
    ));
    assert!(mesh.send(A, mesh.addr(B, 1), b"x").await.is_err());
}

#[tokio::test]
async fn a_vip_without_an_endpoint_for_the_port_is_reset_with_no_route() {
    let mesh = Mesh::start(9).await;
    let r = mesh.send(A, mesh.addr(VIP, 81), b"x").await;
    assert!(r.is_err(), "{r:?}");
    assert!(has_metric(
        &mesh.m1,
        "istio_tcp_connections_closed_total",
        &[
            "reporter=\"source\"",
            "response_flags=\"NR\"",
            "destination_service_name=\"svc-b\""
        ]
    ));
}

#[tokio::test]
async fn a_source_that_is_not_an_enrolled_pod_of_the_node_is_refused_without_a_flow() {
    let mesh = Mesh::start(10).await;
    for src in [E, B] {
        let r = mesh.send(src, mesh.addr(B, mesh.app[0]), b"x").await;
        assert!(r.is_err(), "{src}: {r:?}");
    }
    assert_eq!(
        metric(&mesh.m1, "istio_tcp_connections_opened_total", &[]),
        None
    );
}

#[tokio::test]
async fn a_policy_change_closes_an_open_flow_it_now_denies() {
    let mesh = Mesh::start(11).await;
    let mut flow = mesh.outbound(A, mesh.addr(B, mesh.app[0])).await;
    let mut greeting = [0u8; 64];
    let n = tokio::time::timeout(WAIT, flow.read(&mut greeting))
        .await
        .expect("in time")
        .expect("greeting");
    assert!(greeting[..n].starts_with(b"peer="), "{:?}", &greeting[..n]);
    mesh.publish(DENY_A);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(WAIT, flow.read_to_end(&mut rest))
        .await
        .expect("the revoked flow ends in time");
    assert!(
        r.is_err(),
        "a revoked flow must end in a reset, not EOF: {r:?}"
    );
}

/// A flow whose client stops reading fills every hop with its echo, up to its stream's window
/// in the receiving daemon. Another flow on the same HBONE connection must still move: the
/// connection's window is never all taken by streams whose destinations do not read.
#[tokio::test]
async fn a_stalled_flow_does_not_stop_another_on_the_same_connection() {
    let cfg = HboneConfig {
        spread: 1,
        stream_window: 1 << 20,
        stream_window_start: 1 << 20,
        ..hbone_config()
    };
    let mesh = Mesh::start_with(12, cfg).await;
    let to = mesh.addr(B, mesh.app[0]);
    // The stalled flow: written to until nothing more is taken for half a second, never read.
    let mut stalled = mesh.outbound(A, to).await;
    let chunk = vec![0x3c; 64 << 10];
    let mut taken = 0;
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), stalled.write(&chunk)).await
    {
        taken += n;
    }
    assert!(
        taken > 2 << 20,
        "the stalled flow filled its hops: {taken} bytes"
    );
    let data = payload(256 << 10);
    let got = mesh
        .send(A, to, &data)
        .await
        .expect("the other flow completes");
    assert!(
        got == answer(mesh.ip(A), &data),
        "the other flow's bytes arrive intact"
    );
    drop(stalled);
}
