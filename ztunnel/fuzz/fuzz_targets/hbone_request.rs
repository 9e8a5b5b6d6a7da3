//! The HBONE server's request path after TLS: the bytes an HBONE client sends (the HTTP/2
//! client preface is prepended, so every input is a frame sequence) go into h2's server as the
//! daemon configures it, and every request through the daemon's own checks:
//! `hbone::server::connect_authority` (CONNECT to `ip:port`, else 400) and
//! `proxy::route::inbound_hbone` (a local enrolled pod, the one the connection was made to,
//! not a daemon port). The answer's status is sent back, as the server does.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::hbone::server::connect_authority;
use ztunnel::proxy::route::{inbound_hbone, Node};
use ztunnel::state::State;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const STATE: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh}, spec: {nodeName: n1, serviceAccountName: a}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: b, namespace: mesh}, spec: {nodeName: n1, serviceAccountName: b}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: c, namespace: mesh}, spec: {nodeName: n2}, status: {podIP: 10.0.0.3, phase: Running}}
"#;

struct Fixture {
    rt: tokio::runtime::Runtime,
    state: State,
    node: Node,
    /// The connection's local address: pod b's HBONE port.
    local: SocketAddr,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let objects = ztunnel::k8s::parse_file(Path::new("fuzz.yaml"), STATE).expect("state");
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            state: State::build(1, "cluster.local", &objects),
            node: Node {
                name: "n1".into(),
                hbone_port: 15008,
                own_ports: vec![15001, 15006, 15008, 15053],
            },
            local: "10.0.0.2:15008".parse().expect("addr"),
        }
    })
}

/// The status the daemon answers a request with.
fn decide(f: &Fixture, method: &http::Method, uri: &http::Uri) -> StatusCode {
    match connect_authority(method, uri) {
        None => StatusCode::BAD_REQUEST,
        Some(authority) => match inbound_hbone(&f.state, &f.node, f.local, authority) {
            Ok(pod) => {
                assert_eq!(pod.ip, authority.ip(), "admitted for another pod");
                assert_eq!(
                    authority.ip(),
                    f.local.ip(),
                    "authority is not the local pod"
                );
                StatusCode::OK
            }
            Err(e) => e.status(),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut rd, mut wr) = tokio::io::split(client);
    let send = async move {
        let _ = wr.write_all(PREFACE).await;
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let drain = async move {
        let mut buf = [0u8; 4096];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let serve = async move {
        let Ok(mut conn) = h2::server::Builder::new()
            .max_concurrent_streams(1000)
            .handshake::<_, Bytes>(server)
            .await
        else {
            return;
        };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let status = decide(f, req.method(), req.uri());
            if let Ok(resp) = Response::builder().status(status).body(()) {
                let _ = respond.send_response(resp, status != StatusCode::OK);
            }
        }
    };
    f.rt.block_on(async {
        tokio::join!(send, drain, serve);
    });
});
