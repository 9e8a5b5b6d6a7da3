//! DNS proxy for enrolled pods (the capture side: ARCHITECTURE.md, "Data path decisions").
//!
//! Capture steers an enrolled pod's DNS (UDP and TCP port 53, any resolver address) to the
//! daemon's DNS sockets on `127.0.0.1:<dns port>` with the pod's IP as source, so the proxy
//! knows which pod asked. A and AAAA queries for mesh services are answered from the state
//! (see [`names`] for the name forms and the pod's search list), authoritatively with TTL 30 s;
//! everything else, names of the cluster domain the mesh does not know included (pod
//! hostnames, SRV records, anything the cluster's DNS serves), and other record types of mesh
//! names, is forwarded to the upstream resolvers ([`upstream`]). Malformed queries get
//! FORMERR, or are dropped when not even the header can be read; the server keeps serving
//! either way. [`server`] owns the sockets; [`limits`] keeps one pod from starving the others.

pub mod limits;
pub mod names;
pub mod server;
pub mod upstream;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use serde::Serialize;
use tokio::sync::watch;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::state::State;
use names::Resolution;
use upstream::{Forwarded, Upstream};

/// TTL of answers for mesh services (seconds).
pub const MESH_TTL: u32 = 30;
/// Largest UDP payload we announce with EDNS and send.
const EDNS_PAYLOAD: u16 = 1232;

/// Upper bounds (seconds) of the upstream latency histogram buckets.
const LATENCY_BUCKETS_S: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// DNS counters. prometheus-client metrics are atomics inside, so the hot path takes no lock;
/// [`DnsStats::register`] exports them, and the config dump shows a snapshot.
#[derive(Debug)]
pub struct DnsStats {
    /// Queries received (UDP and TCP), well-formed or not.
    pub requests: Counter,
    /// Queries answered from the mesh state (including NXDOMAIN / NOERROR-empty).
    pub local_answers: Counter,
    /// Queries forwarded upstream.
    pub upstream_requests: Counter,
    /// Upstream queries that failed (timeout, unreachable): answered SERVFAIL.
    pub upstream_errors: Counter,
    /// Malformed queries: answered FORMERR or dropped.
    pub malformed: Counter,
    /// Upstream round-trip time in seconds.
    pub upstream_latency: Histogram,
    /// Queries and TCP connections refused by the per-pod limits, by reason.
    pub refused: limits::Refused,
    /// TCP connections closed after `--dns-tcp-idle-timeout` without a query.
    pub tcp_idle_closed: Counter,
}

impl Default for DnsStats {
    fn default() -> Self {
        DnsStats {
            requests: Counter::default(),
            local_answers: Counter::default(),
            upstream_requests: Counter::default(),
            upstream_errors: Counter::default(),
            malformed: Counter::default(),
            upstream_latency: Histogram::new(LATENCY_BUCKETS_S),
            refused: limits::Refused::default(),
            tcp_idle_closed: Counter::default(),
        }
    }
}

/// A point-in-time copy of [`DnsStats`] (config dump).
#[derive(Debug, Serialize)]
pub struct DnsStatsSnapshot {
    /// See [`DnsStats::requests`].
    pub requests: u64,
    /// See [`DnsStats::local_answers`].
    pub local_answers: u64,
    /// See [`DnsStats::upstream_requests`].
    pub upstream_requests: u64,
    /// See [`DnsStats::upstream_errors`].
    pub upstream_errors: u64,
    /// See [`DnsStats::malformed`].
    pub malformed: u64,
    /// See [`DnsStats::refused`]: reason -> count, every reason listed.
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    /// See [`DnsStats::tcp_idle_closed`].
    pub tcp_idle_closed: u64,
}

impl DnsStats {
    fn inc(c: &Counter) {
        c.inc();
    }

    fn observe_upstream(&self, took: Duration) {
        self.upstream_latency.observe(took.as_secs_f64());
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> DnsStatsSnapshot {
        DnsStatsSnapshot {
            requests: self.requests.get(),
            local_answers: self.local_answers.get(),
            upstream_requests: self.upstream_requests.get(),
            upstream_errors: self.upstream_errors.get(),
            malformed: self.malformed.get(),
            refused: limits::DropReason::ALL
                .iter()
                .map(|&reason| {
                    let c = self.refused.get_or_create(&limits::DropLabels { reason });
                    (reason.as_str(), c.get())
                })
                .collect(),
            tcp_idle_closed: self.tcp_idle_closed.get(),
        }
    }

    /// Adds the DNS metric families to `registry`, with the names Istio's ztunnel uses
    /// (`istio_dns_requests_total`, `istio_dns_upstream_requests_total`,
    /// `istio_dns_upstream_failures_total`, `istio_dns_upstream_request_duration_seconds`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_dns_requests",
            "DNS queries received from captured pods",
            self.requests.clone(),
        );
        registry.register(
            "istio_dns_local_answers",
            "DNS queries answered from the mesh registry",
            self.local_answers.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to upstream resolvers",
            self.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded DNS queries that failed (answered SERVFAIL)",
            self.upstream_errors.clone(),
        );
        registry.register(
            "istio_dns_malformed_requests",
            "DNS queries that could not be parsed (FORMERR or dropped)",
            self.malformed.clone(),
        );
        registry.register(
            "istio_dns_upstream_request_duration_seconds",
            "Round-trip time of forwarded DNS queries",
            self.upstream_latency.clone(),
        );
        registry.register(
            "ztunnel_dns_refused",
            "DNS queries dropped (UDP), answered REFUSED (TCP) or TCP connections closed by the \
             per-pod limits, by reason",
            self.refused.clone(),
        );
        registry.register(
            "ztunnel_dns_tcp_idle_closed",
            "DNS TCP connections closed after the idle timeout without a query",
            self.tcp_idle_closed.clone(),
        );
    }
}

/// How the query arrived: decides the largest response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: 512 bytes, or the client's EDNS size (at most 1232); larger answers are truncated.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// The query path: bytes in, bytes out (or nothing: dropped). Cheap to clone.
#[derive(Clone)]
pub struct Handler {
    state: watch::Receiver<Arc<State>>,
    cluster_domain: String,
    upstream: Arc<dyn Upstream>,
    stats: Arc<DnsStats>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("cluster_domain", &self.cluster_domain)
            .finish_non_exhaustive()
    }
}

impl Handler {
    /// A handler over the live state.
    pub fn new(
        state: watch::Receiver<Arc<State>>,
        cluster_domain: &str,
        upstream: Arc<dyn Upstream>,
        stats: Arc<DnsStats>,
    ) -> Handler {
        Handler {
            state,
            cluster_domain: cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
            upstream,
            stats,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<DnsStats> {
        &self.stats
    }

    /// Answers one DNS message from `src`. `None`: drop it (too short for a header, or a
    /// response rather than a query).
    pub async fn handle(
        &self,
        src: IpAddr,
        packet: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        DnsStats::inc(&self.stats.requests);
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            DnsStats::inc(&self.stats.malformed);
            tracing::debug!(%src, len = packet.len(), "dns: dropped unparseable packet");
            return None;
        }
        let id = u16::from_be_bytes([packet[0], packet[1]]);
        let req = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(e) => {
                DnsStats::inc(&self.stats.malformed);
                tracing::debug!(%src, error = %e, "dns: malformed query");
                return encode(&Message::error_msg(
                    id,
                    OpCode::Query,
                    ResponseCode::FormErr,
                ));
            }
        };
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(req.max_payload().min(EDNS_PAYLOAD)),
        };
        let resp = self.respond(src, &req).await;
        fit(resp, limit)
    }

    async fn respond(&self, src: IpAddr, req: &Message) -> Message {
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(true);
        if req.extensions().is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            resp.set_edns(edns);
        }
        if req.op_code() != OpCode::Query {
            resp.set_response_code(ResponseCode::NotImp);
            return resp;
        }
        let [query] = req.queries() else {
            DnsStats::inc(&self.stats.malformed);
            resp.set_response_code(ResponseCode::FormErr);
            return resp;
        };
        resp.add_query(query.clone());

        let qname = query.name().to_ascii().to_ascii_lowercase();
        let qname = qname.trim_end_matches('.');
        // The mesh knows addresses only; other types of mesh names (SRV, TXT, ...) are the
        // cluster DNS's to answer.
        let address = matches!(query.query_type(), RecordType::A | RecordType::AAAA);
        let resolution = if query.query_class() == DNSClass::IN && address {
            let state = self.state.borrow().clone();
            let asker = state.workload(src).cloned();
            names::resolve(&state, &self.cluster_domain, asker.as_deref(), qname)
        } else {
            Resolution::NotOurs
        };
        match resolution {
            Resolution::Known(ips) => {
                DnsStats::inc(&self.stats.local_answers);
                resp.set_authoritative(true);
                resp.add_answers(records(query, &ips));
            }
            Resolution::NotOurs => self.forward(query, &mut resp).await,
        }
        tracing::debug!(%src, name = qname, qtype = %query.query_type(), rcode = %resp.response_code(), answers = resp.answers().len(), "dns query");
        resp
    }

    async fn forward(&self, query: &Query, resp: &mut Message) {
        DnsStats::inc(&self.stats.upstream_requests);
        let start = Instant::now();
        let result = self.upstream.forward(query.clone()).await;
        self.stats.observe_upstream(start.elapsed());
        match result {
            Forwarded::Answer {
                rcode,
                answers,
                authority,
            } => {
                resp.set_response_code(rcode);
                resp.add_answers(answers);
                resp.add_name_servers(authority);
            }
            Forwarded::Failed(reason) => {
                DnsStats::inc(&self.stats.upstream_errors);
                tracing::debug!(name = %query.name(), %reason, "dns: upstream failed");
                resp.set_response_code(ResponseCode::ServFail);
            }
        }
    }
}

/// REFUSED for a query the per-pod limits turned away (TCP: the client would otherwise wait
/// for an answer). `None` when not even the header is there.
pub fn refused(packet: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*packet.first()?, *packet.get(1)?]);
    encode(&Message::error_msg(
        id,
        OpCode::Query,
        ResponseCode::Refused,
    ))
}

/// A/AAAA records of the asked family (none for other types: NOERROR without answers).
fn records(query: &Query, ips: &[IpAddr]) -> Vec<Record> {
    let name = query.name().clone();
    ips.iter()
        .filter_map(|ip| match (ip, query.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(name.clone(), MESH_TTL, rdata))
        .collect()
}

fn encode(m: &Message) -> Option<Vec<u8>> {
    match m.to_vec() {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "dns: cannot encode response");
            None
        }
    }
}

/// Encodes `resp`; too large for `limit` -> only header and question with TC set (the client
/// retries over TCP). Unencodable (an upstream record we cannot write) -> SERVFAIL.
fn fit(mut resp: Message, limit: usize) -> Option<Vec<u8>> {
    match resp.to_vec() {
        Ok(v) if v.len() <= limit => Some(v),
        Ok(_) => {
            resp.take_answers();
            resp.take_name_servers();
            resp.take_additionals();
            resp.set_truncated(true);
            encode(&resp)
        }
        Err(e) => {
            tracing::debug!(error = %e, "dns: cannot encode response; SERVFAIL");
            resp.take_answers();
            resp.take_name_servers();
            resp.take_additionals();
            resp.set_response_code(ResponseCode::ServFail);
            encode(&resp)
        }
    }
}

#[cfg(test)]
mod tests;
