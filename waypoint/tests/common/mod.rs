//! A small mesh in one process, as a normal user: a client pod `a`, the waypoint, and two
//! backend pods `v1` and `v2` behind a node daemon's inbound side (ztunnel's `Proxy` as the
//! HBONE handler), each pod on a loopback address of its own (127.78.`net`.x), real TLS 1.3
//! with certificates from a file CA, real HTTP/2 CONNECT between every hop.
//!
//! Services: `reviews` (VIP .50) selects both backends, `reviews-v1` (.51) and `reviews-v2`
//! (.52) one each; port 80 goes to the pods' `http` port, 9000 to their `tcp` echo port.
//!
//! The backend app answers every request 200 with `x-backend: v1|v2`, the request's body
//! echoed, and what it saw as `x-seen-*` headers; `/flaky` answers 503 on odd hits (counted
//! across both backends, so a retry on either gets 200); `/slow` waits 3 s first.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use waypoint::app::{build, hbone_config, Settings};
use waypoint::io::H2Io;
use waypoint::server::Waypoint;
use waypoint::snapshot::Snapshot;
use ztunnel::drain::Drain;
use ztunnel::hbone::client::{ConnectRequest, Pool, PoolKey};
use ztunnel::hbone::server::Server;
use ztunnel::hbone::HboneError;
use ztunnel::identity::{CertManager, FileCa, SpiffeId};
use ztunnel::proxy::route::Node;
use ztunnel::proxy::Proxy;
use ztunnel::socket::{Leg, PlainSockets, SocketFactory};
use ztunnel::state::State;
use ztunnel::telemetry::Metrics;

pub const A: u8 = 1;
pub const V1: u8 = 2;
pub const V2: u8 = 3;
pub const B: u8 = 4;
pub const WAYPOINT: u8 = 10;
pub const VIP: u8 = 50;

/// How long any single exchange may take before a test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Mesh {
    pub net: u8,
    pub waypoint: Arc<Waypoint>,
    pool: Pool,
    hbone_port: u16,
    snapshots: watch::Sender<Arc<Snapshot>>,
    yaml: String,
    /// The waypoint's metrics.
    pub metrics: Arc<Metrics>,
    /// The waypoint's drain.
    pub drain: Drain,
    /// Hits of `/flaky`, both backends together.
    pub flaky_hits: Arc<AtomicUsize>,
    _ca_dir: tempfile::TempDir,
}

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 78, net, host))
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "mesh", sa)
}

fn snapshot(yaml: &str) -> Snapshot {
    let objs = ztunnel::k8s::parse_file(Path::new("mesh.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    Snapshot::build(1, "cluster.local", &objs)
}

/// Listeners on the same port of the waypoint and of both backends (the HBONE port is one
/// number for all pods), retried in the rare case that the port is taken on one of them.
fn hbone_listeners(sockets: &dyn SocketFactory, net: u8) -> (u16, Vec<TcpListener>) {
    for _ in 0..20 {
        let first = sockets
            .listen(Leg::Hbone, SocketAddr::new(ip(net, WAYPOINT), 0), false)
            .expect("waypoint listener");
        let port = first.local_addr().expect("addr").port();
        let rest: Result<Vec<_>, _> = [V1, V2]
            .iter()
            .map(|h| sockets.listen(Leg::Hbone, SocketAddr::new(ip(net, *h), port), false))
            .collect();
        if let Ok(mut rest) = rest {
            rest.insert(0, first);
            return (port, rest);
        }
    }
    panic!("no common free HBONE port");
}

/// The cluster of the mesh on 127.78.`net`.0/24: namespace `mesh` (ambient), pods `a`, `b`
/// (clients, node n1), `waypoint` (n1), `v1`, `v2` (backends on n2, with their `http` and
/// `tcp` container ports), Services `reviews`, `reviews-v1`, `reviews-v2`, and the waypoint's
/// Gateway `mesh/waypoint`.
pub fn state_yaml(net: u8, ports: [(u16, u16); 2]) -> String {
    let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n".to_string();
    let pods = [
        ("a", A, "n1", "app: a", (1, 1)),
        ("b", B, "n1", "app: b", (1, 1)),
        (
            "waypoint",
            WAYPOINT,
            "n1",
            "gateway.networking.k8s.io/gateway-name: waypoint",
            (1, 1),
        ),
        ("v1", V1, "n2", "app: reviews, version: v1", ports[0]),
        ("v2", V2, "n2", "app: reviews, version: v2", ports[1]),
    ];
    for (name, host, node, labels, (http, tcp)) in pods {
        yaml += &format!(
            "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: mesh, labels: {{{labels}}}}}, \
             spec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{ports: [{{name: http, containerPort: {http}}}, {{name: tcp, containerPort: {tcp}}}]}}]}}, \
             status: {{podIP: \"{}\", phase: Running}}}}\n",
            ip(net, host)
        );
    }
    for (name, vip, selector) in [
        ("reviews", VIP, "app: reviews"),
        ("reviews-v1", VIP + 1, "version: v1"),
        ("reviews-v2", VIP + 2, "version: v2"),
    ] {
        yaml += &format!(
            "---\n{{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: mesh}}, \
             spec: {{clusterIP: \"{}\", selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: tcp, port: 9000, targetPort: tcp}}]}}}}\n",
            ip(net, vip)
        );
    }
    yaml += "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: waypoint, namespace: mesh}\n\
             spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n";
    yaml
}

impl Mesh {
    /// The mesh with `routes` (more YAML documents) in its state.
    pub async fn start(net: u8, routes: &str) -> Mesh {
        let sockets: Arc<dyn SocketFactory> = Arc::new(PlainSockets {
            connect_timeout: Duration::from_secs(5),
        });
        let flaky_hits = Arc::new(AtomicUsize::new(0));
        let mut ports = Vec::new();
        for (host, name) in [(V1, "v1"), (V2, "v2")] {
            let http = sockets
                .listen(Leg::Node, SocketAddr::new(ip(net, host), 0), false)
                .expect("app listener");
            let tcp = sockets
                .listen(Leg::Node, SocketAddr::new(ip(net, host), 0), false)
                .expect("echo listener");
            ports.push((
                http.local_addr().expect("addr").port(),
                tcp.local_addr().expect("addr").port(),
            ));
            tokio::spawn(http_app(http, name, flaky_hits.clone()));
            tokio::spawn(echo_app(tcp));
        }
        let (hbone_port, mut listeners) = hbone_listeners(sockets.as_ref(), net);

        let yaml = state_yaml(net, [ports[0], ports[1]]);

        let ca_dir = tempfile::tempdir().expect("tempdir");
        let certs = || {
            let ca = FileCa::load_or_create(ca_dir.path(), "cluster.local").expect("CA");
            CertManager::new(Arc::new(ca), Duration::from_secs(3600)).expect("certs")
        };
        let (mesh_certs, waypoint_certs) = (certs(), certs());
        mesh_certs.set_identities(
            &["a", "b", "v1", "v2"]
                .into_iter()
                .map(id)
                .collect::<BTreeSet<_>>(),
        );

        // The backends' node: a daemon's inbound side, serving HBONE on each pod's address.
        let state = State::build(
            1,
            "cluster.local",
            &snapshot_objects(&format!("{yaml}{routes}")),
        );
        let (_, state_rx) = watch::channel(Arc::new(state));
        let node = Node {
            name: "n2".into(),
            hbone_port,
            own_ports: vec![hbone_port],
        };
        let n2_pool = Pool::new(
            hbone_config(1 << 20, Duration::from_secs(5)),
            mesh_certs.clone(),
            sockets.clone(),
        );
        let n2 = Proxy::new(
            node,
            "istio-system",
            state_rx,
            n2_pool,
            sockets.clone(),
            Metrics::new("cluster.local"),
        );
        let n2_server = Server::new(
            hbone_config(1 << 20, Duration::from_secs(5)),
            "cluster.local",
            mesh_certs.clone(),
            n2,
            Drain::default(),
        );
        for l in listeners.drain(1..) {
            tokio::spawn(n2_server.clone().run(l));
        }

        // The waypoint.
        let settings = Settings {
            identity: id("waypoint"),
            pod_ips: vec![ip(net, WAYPOINT)],
            baggage: "k8s.namespace.name=mesh,k8s.pod.name=waypoint".into(),
            hbone_port,
            hbone: hbone_config(1 << 20, Duration::from_secs(5)),
            sniff_timeout: Duration::from_millis(500),
            cluster_domain: "cluster.local".into(),
            gateway: "waypoint".into(),
        };
        let metrics = Metrics::new("cluster.local");
        let (snapshots, snap_rx) = watch::channel(Arc::new(snapshot(&format!("{yaml}{routes}"))));
        let drain = Drain::default();
        let (server, waypoint) = build(
            &settings,
            "cluster.local",
            waypoint_certs,
            sockets.clone(),
            snap_rx,
            &metrics,
            drain.clone(),
        );
        let listener = listeners.pop().expect("waypoint listener");
        tokio::spawn(server.run(listener));

        let pool = Pool::new(
            hbone_config(1 << 20, Duration::from_secs(5)),
            mesh_certs,
            sockets,
        );
        Mesh {
            net,
            waypoint,
            pool,
            hbone_port,
            snapshots,
            yaml,
            metrics,
            drain,
            flaky_hits,
            _ca_dir: ca_dir,
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        ip(self.net, host)
    }

    /// Replaces the routes in the waypoint's state.
    pub fn set_routes(&self, routes: &str) {
        self.snapshots
            .send_replace(Arc::new(snapshot(&format!("{}{routes}", self.yaml))));
    }

    /// An HBONE stream from pod `a` to the waypoint for `authority`, as a node daemon would
    /// open it.
    pub async fn connect(&self, authority: SocketAddr) -> Result<H2Io, HboneError> {
        self.connect_as("a", A, authority).await
    }

    /// An HBONE stream from the pod with service account `sa` on host `host`.
    pub async fn connect_as(
        &self,
        sa: &str,
        host: u8,
        authority: SocketAddr,
    ) -> Result<H2Io, HboneError> {
        let key = PoolKey {
            src_identity: id(sa),
            src_ip: self.ip(host),
            dst_identities: vec![id("waypoint")],
            dst: SocketAddr::new(self.ip(WAYPOINT), self.hbone_port),
        };
        let req = ConnectRequest {
            authority,
            client: SocketAddr::new(self.ip(host), 40000),
            baggage: String::new(),
        };
        let flow = tokio::time::timeout(WAIT, self.pool.connect(&key, &req))
            .await
            .expect("connect in time")?;
        Ok(H2Io::from_flow(flow))
    }

    /// An HTTP/1.1 client on a stream to `reviews:80` through the waypoint.
    pub async fn http1(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        self.http1_as("a", A).await
    }

    /// An HTTP/1.1 client of pod `sa` on `host` to `reviews:80` through the waypoint.
    pub async fn http1_as(
        &self,
        sa: &str,
        host: u8,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let io = self
            .connect_as(sa, host, SocketAddr::new(self.ip(VIP), 80))
            .await
            .expect("HBONE");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        sender
    }

    /// An HTTP/2 (prior knowledge) client on a stream to `reviews:80` through the waypoint.
    pub async fn http2(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let io = self
            .connect(SocketAddr::new(self.ip(VIP), 80))
            .await
            .expect("HBONE");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        sender
    }
}

fn snapshot_objects(yaml: &str) -> Vec<ztunnel::k8s::Object> {
    ztunnel::k8s::parse_file(Path::new("mesh.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// An HTTP/1.1 request (origin form) for `path` with `body`, addressed to the Service by
/// name in `Host`.
pub fn request(path: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "reviews.mesh.svc.cluster.local")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// A received response: status, headers and the whole body.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn answer(resp: Response<Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Bytes that are not text, of length `len`.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + usize::from(seed)) % 256) as u8)
        .collect()
}

async fn http_app(l: TcpListener, name: &'static str, flaky: Arc<AtomicUsize>) {
    while let Ok((tcp, _)) = l.accept().await {
        let flaky = flaky.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let flaky = flaky.clone();
                async move { Ok::<_, Infallible>(app_answer(name, req, &flaky).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn app_answer(
    name: &str,
    req: Request<Incoming>,
    flaky: &AtomicUsize,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut status = 200;
    match parts.uri.path() {
        "/flaky" if flaky.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) => status = 503,
        "/slow" => tokio::time::sleep(Duration::from_secs(3)).await,
        _ => {}
    }
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    let h = resp.headers_mut();
    h.insert(
        "x-backend",
        HeaderValue::from_static(if name == "v1" { "v1" } else { "v2" }),
    );
    let host = parts.headers.get("host").cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let seen = [
        ("x-seen-host", host),
        (
            "x-seen-path",
            HeaderValue::from_str(&parts.uri.to_string()).ok(),
        ),
        (
            "x-seen-version",
            HeaderValue::from_str(&format!("{:?}", parts.version)).ok(),
        ),
        ("x-seen-xff", parts.headers.get("x-forwarded-for").cloned()),
        (
            "x-seen-xfp",
            parts.headers.get("x-forwarded-proto").cloned(),
        ),
        (
            "x-seen-traceparent",
            parts.headers.get("traceparent").cloned(),
        ),
        ("x-seen-added", parts.headers.get("x-added").cloned()),
    ];
    for (n, v) in seen {
        if let Some(v) = v {
            h.insert(n, v);
        }
    }
    resp
}

async fn echo_app(l: TcpListener) {
    while let Ok((mut tcp, _)) = l.accept().await {
        tokio::spawn(async move {
            let (mut rd, mut wr) = tcp.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
    }
}

/// The authorization policies of the mesh test and the `waypoint check` test: `a` may GET
/// `/public/*` through the waypoint (nothing else is allowed, since an ALLOW is attached), and
/// any request to `reviews` with `x-block: yes` is denied.
pub const POLICIES: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-get, namespace: mesh}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/mesh/sa/a]}}]
    to: [{operation: {methods: [GET], paths: [/public/*]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-header, namespace: mesh}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#;
