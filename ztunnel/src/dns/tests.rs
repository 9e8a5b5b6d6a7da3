//! Query-path tests: answers, FORMERR/drop, truncation, and a bounded seeded fuzz loop that
//! runs in CI (`cargo test -p ztunnel dns::`).

use std::path::Path;

use futures::future::BoxFuture;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::*;
use crate::k8s;

/// Upstream stand-in for unit tests (the integration tests use a real dnsmasq): names under
/// `fail.` fail, `big.` gives a long TXT answer, everything else one A record.
struct FakeUpstream;

impl Upstream for FakeUpstream {
    fn forward(&self, query: Query) -> BoxFuture<'_, Forwarded> {
        Box::pin(async move {
            let n = query.name().to_ascii();
            if n.ends_with("fail.") {
                return Forwarded::Failed("fake failure".into());
            }
            let rdata = if n.ends_with("big.") {
                RData::TXT(TXT::new(vec!["x".repeat(200); 10]))
            } else {
                RData::A(A::new(192, 0, 2, 1))
            };
            Forwarded::Answer {
                rcode: ResponseCode::NoError,
                answers: vec![Record::from_rdata(query.name().clone(), 60, rdata)],
                authority: Vec::new(),
            }
        })
    }
}

const YAML: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: a}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: web, namespace: mesh}, spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}}
"#;

fn handler() -> Handler {
    let objs = k8s::parse_file(Path::new("t.yaml"), YAML).expect("parses");
    let state = State::build(1, "cluster.local", &objs);
    let (_tx, rx) = watch::channel(Arc::new(state));
    Handler::new(rx, "cluster.local", Arc::new(FakeUpstream), Arc::default())
}

const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

fn query(name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x1234)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    m.to_vec().expect("encode")
}

fn run(packet: &[u8], t: Transport) -> Option<Message> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let h = handler();
    rt.block_on(h.handle(POD, packet, t))
        .map(|b| Message::from_vec(&b).expect("our answers parse"))
}

#[test]
fn answers_mesh_names_authoritatively() {
    let r = run(&query("web.", RecordType::A), Transport::Udp).expect("answer");
    assert_eq!(r.id(), 0x1234);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.authoritative());
    assert_eq!(r.answers().len(), 1);
    assert_eq!(r.answers()[0].ttl(), MESH_TTL);
    assert_eq!(r.answers()[0].data(), &RData::A(A::new(10, 96, 0, 1)));

    let r = run(
        &query("web.mesh.svc.cluster.local.", RecordType::AAAA),
        Transport::Udp,
    )
    .expect("answer");
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.answers().is_empty(), "no IPv6 VIP: NOERROR, no answer");
}

#[test]
fn unknown_cluster_names_and_other_types_go_upstream() {
    // Pod hostnames, SRV records: the cluster DNS knows names the mesh does not.
    for (name, t) in [
        ("nope.mesh.svc.cluster.local.", RecordType::A),
        ("10-0-0-1.mesh.pod.cluster.local.", RecordType::A),
        ("web.mesh.svc.cluster.local.", RecordType::SRV),
    ] {
        let r = run(&query(name, t), Transport::Udp).expect("answer");
        assert_eq!(r.response_code(), ResponseCode::NoError, "{name} {t}");
        assert!(!r.authoritative(), "{name} {t}: the upstream's answer");
        assert_eq!(
            r.answers()[0].data(),
            &RData::A(A::new(192, 0, 2, 1)),
            "{name} {t}"
        );
    }
}

#[test]
fn refused_answer_keeps_the_id() {
    let r = refused(&query("web.", RecordType::A)).expect("answer");
    let m = Message::from_vec(&r).expect("parses");
    assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::Refused));
    assert!(refused(&[7]).is_none());
}

#[test]
fn forwards_and_fails_over_to_servfail() {
    let r = run(&query("example.org.", RecordType::A), Transport::Udp).expect("answer");
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(!r.authoritative());
    assert_eq!(r.answers().len(), 1);
    let r = run(&query("x.fail.", RecordType::A), Transport::Udp).expect("answer");
    assert_eq!(r.response_code(), ResponseCode::ServFail);
}

#[test]
fn large_answers_truncate_on_udp_only() {
    let r = run(&query("x.big.", RecordType::TXT), Transport::Udp).expect("answer");
    assert!(r.truncated() && r.answers().is_empty());
    let r = run(&query("x.big.", RecordType::TXT), Transport::Tcp).expect("answer");
    assert!(!r.truncated() && r.answers().len() == 1);
}

#[test]
fn malformed_gets_formerr_or_is_dropped() {
    assert!(
        run(&[1, 2, 3], Transport::Udp).is_none(),
        "no header: dropped"
    );
    let mut q = query("web.", RecordType::A);
    q.truncate(q.len() - 3);
    let r = run(&q, Transport::Udp).expect("formerr");
    assert_eq!((r.id(), r.response_code()), (0x1234, ResponseCode::FormErr));
    let mut resp = query("web.", RecordType::A);
    resp[2] |= 0x80;
    assert!(
        run(&resp, Transport::Udp).is_none(),
        "responses are never answered"
    );
}

/// xorshift64*: deterministic, so a failure reproduces with the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

/// Random and mutated packets through the whole query path: never a panic, and every answer
/// is a well-formed response to the query's id.
#[test]
fn fuzz_query_path_bounded() {
    const ITERATIONS: usize = 20_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let h = handler();
    let seeds = [
        query("web.", RecordType::A),
        query("web.mesh.svc.cluster.local.", RecordType::AAAA),
        query("nope.cluster.local.", RecordType::A),
        query("example.org.", RecordType::MX),
        query("x.big.", RecordType::TXT),
    ];
    let seed = 0x5eed_d115_u64;
    let mut rng = Rng(seed);
    for i in 0..ITERATIONS {
        let mut p = if rng.below(4) == 0 {
            let len = rng.below(300);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..rng.below(6) {
            match rng.below(3) {
                0 if !p.is_empty() => {
                    let at = rng.below(p.len());
                    p[at] = rng.next() as u8;
                }
                1 if !p.is_empty() => p.truncate(rng.below(p.len())),
                _ => p.push(rng.next() as u8),
            }
        }
        let out = rt.block_on(h.handle(POD, &p, Transport::Udp));
        if let Some(bytes) = out {
            let m = Message::from_vec(&bytes)
                .unwrap_or_else(|e| panic!("seed {seed:#x} iteration {i}: bad answer: {e}"));
            assert_eq!(m.message_type(), MessageType::Response);
            assert_eq!(m.id(), u16::from_be_bytes([p[0], p[1]]), "iteration {i}");
            assert!(bytes.len() <= 1232, "iteration {i}: UDP answer too large");
        }
    }
    let s = h.stats().snapshot();
    assert_eq!(s.requests, ITERATIONS as u64);
    assert!(s.malformed > 0 && s.local_answers > 0 && s.upstream_requests > 0);
}

const DUAL_YAML: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: mesh, labels: {app: a}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}], phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: web, namespace: mesh}, spec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, "fd00:96::1"], ipFamilies: [IPv4, IPv6], selector: {app: a}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: db, namespace: mesh}, spec: {clusterIP: None, selector: {app: a}, ports: [{port: 5432}]}}
"#;

/// A dual-stack Service answers A with its IPv4 VIP and AAAA with its IPv6 one, a headless
/// one with its pods' addresses of the asked family; a pod asking from its IPv6 address gets
/// its own namespace's search list like from its IPv4 one.
#[test]
fn dual_stack_names_answer_a_and_aaaa() {
    let objs = k8s::parse_file(Path::new("t.yaml"), DUAL_YAML).expect("parses");
    let state = State::build(1, "cluster.local", &objs);
    let (_tx, rx) = watch::channel(Arc::new(state));
    let h = Handler::new(rx, "cluster.local", Arc::new(FakeUpstream), Arc::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ask = |from: &str, name: &str, t: RecordType| {
        let from: IpAddr = from.parse().expect("ip");
        let r = rt
            .block_on(h.handle(from, &query(name, t), Transport::Udp))
            .map(|b| Message::from_vec(&b).expect("parses"))
            .expect("answer");
        assert!(r.authoritative(), "{name} {t}");
        r.answers()
            .iter()
            .map(|a| a.data().clone())
            .collect::<Vec<_>>()
    };
    let v6 = |s: &str| RData::AAAA(AAAA(s.parse().expect("v6")));
    for from in ["10.0.0.1", "fd00::1"] {
        assert_eq!(
            ask(from, "web.", RecordType::A),
            [RData::A(A::new(10, 96, 0, 1))]
        );
        assert_eq!(ask(from, "web.", RecordType::AAAA), [v6("fd00:96::1")]);
    }
    assert_eq!(
        ask("fd00::1", "db.mesh.svc.cluster.local.", RecordType::AAAA),
        [v6("fd00::1")]
    );
    assert_eq!(
        ask("fd00::1", "db.mesh.svc.cluster.local.", RecordType::A),
        [RData::A(A::new(10, 0, 0, 1))]
    );
}
