//! The DNS proxy's query path: one packet, as a pod sent it over UDP or TCP (the first input
//! byte picks which), through `dns::Handler::handle` against a mesh state, with an upstream
//! stand-in answering everything that is not the mesh's. Every answer must parse, be a
//! response with the query's id, and fit the transport.
#![no_main]

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use libfuzzer_sys::fuzz_target;
use ztunnel::dns::upstream::{Forwarded, Upstream};
use ztunnel::dns::{Handler, Transport};
use ztunnel::state::State;

const STATE: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: a}}, spec: {nodeName: n1, dnsConfig: {searches: [corp.example]}}, status: {podIP: 10.0.0.1, phase: Running, conditions: [{type: Ready, status: "True"}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: web, namespace: mesh}, spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: db, namespace: mesh}, spec: {clusterIP: None, selector: {app: a}, ports: [{port: 5432}]}}
"#;

/// Answers one A record for any name, as a resolver outside the mesh would.
struct Stub;

impl Upstream for Stub {
    fn forward(&self, query: Query) -> BoxFuture<'_, Forwarded> {
        Box::pin(async move {
            Forwarded::Answer {
                rcode: ResponseCode::NoError,
                answers: vec![Record::from_rdata(
                    query.name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, 1)),
                )],
                authority: Vec::new(),
            }
        })
    }
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    handler: Handler,
    // Keeps the state channel open.
    _tx: tokio::sync::watch::Sender<Arc<State>>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let objects = ztunnel::k8s::parse_file(Path::new("fuzz.yaml"), STATE).expect("state");
        let (tx, rx) =
            tokio::sync::watch::channel(Arc::new(State::build(1, "cluster.local", &objects)));
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            handler: Handler::new(rx, "cluster.local", Arc::new(Stub), Arc::default()),
            _tx: tx,
        }
    })
}

const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

fuzz_target!(|data: &[u8]| {
    let Some((&first, packet)) = data.split_first() else {
        return;
    };
    let (transport, limit) = if first & 1 == 0 {
        (Transport::Udp, 1232)
    } else {
        (Transport::Tcp, usize::from(u16::MAX))
    };
    let f = fixture();
    let Some(answer) = f.rt.block_on(f.handler.handle(POD, packet, transport)) else {
        return;
    };
    let m = Message::from_vec(&answer).expect("the daemon's answers parse");
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.id(), u16::from_be_bytes([packet[0], packet[1]]));
    assert!(
        answer.len() <= limit,
        "answer of {} bytes over {limit}",
        answer.len()
    );
});
