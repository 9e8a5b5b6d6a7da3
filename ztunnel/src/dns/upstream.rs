//! Forwarding of names the mesh does not own to the upstream resolvers: the pod's question is
//! sent as a recursive query over UDP (TCP when the answer comes back truncated), servers are
//! tried in order within one overall timeout after which the pod gets SERVFAIL, and answers are
//! cached for their TTL.
//!
//! This is a plain stub forwarder written on `hickory-proto`'s message codec rather than
//! `hickory-resolver`: the daemon relays what the cluster's resolver says and needs none of a
//! full resolver's machinery (server ranking, connection pools, search lists), which was a
//! noticeable share of its resident code.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

/// Entries kept by the upstream cache.
const CACHE_SIZE: usize = 512;
/// Longest time an answer is cached, whatever its TTL says.
const MAX_CACHE_TTL: u32 = 86_400;
/// UDP payload size offered to the upstream (the DNS flag day value; larger goes over TCP).
const EDNS_PAYLOAD: u16 = 1232;

/// What an upstream said about a query.
#[derive(Debug, Clone)]
pub enum Forwarded {
    /// An answer (possibly NXDOMAIN or NOERROR without records) to relay.
    Answer {
        /// Response code to relay.
        rcode: ResponseCode,
        /// Answer records (CNAME chains included).
        answers: Vec<Record>,
        /// Authority records (the SOA of negative answers).
        authority: Vec<Record>,
    },
    /// No usable answer (timeout, unreachable, upstream failure): SERVFAIL.
    Failed(String),
}

/// Something that answers queries the mesh does not own. The daemon uses [`Resolver`]; the
/// unit tests of the query path use a stand-in.
pub trait Upstream: Send + Sync {
    /// Resolves one question.
    fn forward(&self, query: Query) -> BoxFuture<'_, Forwarded>;
}

/// Why the upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No resolver configured and none in resolv.conf.
    #[error(
        "no upstream DNS resolver: --dns-upstream is not set and {path} lists no nameserver \
         ({reason}); set --dns-upstream or --dns-capture=false"
    )]
    NoResolver {
        /// resolv.conf path.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// The real upstream: the configured servers, tried in order, with a TTL-honouring cache.
#[derive(Debug)]
pub struct Resolver {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    cache: Mutex<Cache>,
}

impl Resolver {
    /// A resolver for `servers` (tried in order, UDP then TCP on truncation), failing after
    /// `timeout` per query.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Resolver {
        Resolver {
            servers: servers.to_vec(),
            timeout,
            cache: Mutex::new(Cache::default()),
        }
    }

    async fn resolve(&self, query: Query) -> Forwarded {
        let key = (
            query.name().to_lowercase(),
            query.query_type(),
            query.query_class(),
        );
        if let Some(hit) = self.cache().get(&key, Instant::now()) {
            return hit;
        }
        let deadline = Instant::now() + self.timeout;
        let mut last = "no upstream DNS server configured".to_string();
        for (i, server) in self.servers.iter().enumerate() {
            // Each server gets an equal share of the time that is left.
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(self.servers.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, exchange(*server, &query)).await {
                Err(_) => last = format!("{server}: no answer within {share:?}"),
                Ok(Err(e)) => last = format!("{server}: {e}"),
                Ok(Ok(mut resp)) => match resp.response_code() {
                    rcode @ (ResponseCode::NoError | ResponseCode::NXDomain) => {
                        let answer = Forwarded::Answer {
                            rcode,
                            answers: resp.take_answers(),
                            authority: resp.take_name_servers(),
                        };
                        self.cache().put(key, answer.clone(), Instant::now());
                        return answer;
                    }
                    rcode => last = format!("{server}: answered {rcode}"),
                },
            }
        }
        Forwarded::Failed(last)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Upstream for Resolver {
    fn forward(&self, query: Query) -> BoxFuture<'_, Forwarded> {
        Box::pin(self.resolve(query))
    }
}

/// One query to one server: UDP, then TCP when the answer does not fit in a datagram.
async fn exchange(server: SocketAddr, query: &Query) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    msg.set_edns(edns);
    let out = msg.to_vec().map_err(std::io::Error::other)?;

    let local: SocketAddr = match server.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let udp = UdpSocket::bind(local).await?;
    udp.connect(server).await?;
    udp.send(&out).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    let resp = loop {
        let n = udp.recv(&mut buf).await?;
        // Anything that is not the answer to this question (late answers to earlier
        // queries, spoofing attempts) is ignored; the timeout bounds the wait.
        if let Some(m) = answer_to(&buf[..n], id, query) {
            break m;
        }
    };
    if !resp.truncated() {
        return Ok(resp);
    }
    let mut tcp = TcpStream::connect(server).await?;
    super::server::write_tcp_message(&mut tcp, &out).await?;
    let len = usize::from(tcp.read_u16().await?);
    tcp.read_exact(&mut buf[..len]).await?;
    answer_to(&buf[..len], id, query).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "TCP answer does not match the question",
        )
    })
}

/// `packet` parsed, if it is a response with `id` to exactly `query`.
fn answer_to(packet: &[u8], id: u16, query: &Query) -> Option<Message> {
    let m = Message::from_vec(packet).ok()?;
    // `Query` equality compares names case-insensitively, as DNS does.
    let matches = m.id() == id
        && m.message_type() == MessageType::Response
        && matches!(m.queries(), [q] if q == query);
    matches.then_some(m)
}

type CacheKey = (hickory_proto::rr::Name, RecordType, DNSClass);

/// Answers by lowercased name, type and class, each until its TTL runs out; at most [`CACHE_SIZE`].
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<CacheKey, (Instant, Instant, Forwarded)>,
}

impl Cache {
    /// A cached answer, its TTLs lowered by the time it has been cached.
    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Forwarded> {
        let (stored, expires, answer) = self.entries.get(key)?;
        if now >= *expires {
            self.entries.remove(key);
            return None;
        }
        let age = u32::try_from(now.duration_since(*stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = answer.clone();
        if let Forwarded::Answer {
            answers, authority, ..
        } = &mut answer
        {
            for r in answers.iter_mut().chain(authority.iter_mut()) {
                r.set_ttl(r.ttl().saturating_sub(age));
            }
        }
        Some(answer)
    }

    fn put(&mut self, key: CacheKey, answer: Forwarded, now: Instant) {
        let Some(ttl) = cache_ttl(&answer) else {
            return;
        };
        if self.entries.len() >= CACHE_SIZE && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, expires, _)| *expires > now);
            // Still full: the entry closest to expiry makes room.
            if self.entries.len() >= CACHE_SIZE {
                let first = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, expires, _))| *expires)
                    .map(|(k, _)| k.clone());
                if let Some(k) = first {
                    self.entries.remove(&k);
                }
            }
        }
        let expires = now + Duration::from_secs(u64::from(ttl));
        self.entries.insert(key, (now, expires, answer));
    }
}

/// How long an answer may be cached: the smallest TTL of its answer records, or for a negative
/// answer the SOA's (RFC 2308: the smaller of its TTL and its MINIMUM). `None`: not at all.
fn cache_ttl(answer: &Forwarded) -> Option<u32> {
    let Forwarded::Answer {
        answers, authority, ..
    } = answer
    else {
        return None;
    };
    let ttl = if answers.is_empty() {
        authority.iter().find_map(|r| match r.data() {
            RData::SOA(soa) => Some(r.ttl().min(soa.minimum())),
            _ => None,
        })?
    } else {
        answers.iter().map(Record::ttl).min()?
    };
    (ttl > 0).then_some(ttl.min(MAX_CACHE_TTL))
}

/// The `nameserver` lines of a resolv.conf, port 53.
pub fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, UpstreamError> {
    let err = |reason: String| UpstreamError::NoResolver {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let servers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // Link-local IPv6 with a zone (`fe80::1%eth0`) is not supported: skipped.
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if servers.is_empty() {
        return Err(err("no usable `nameserver` line".into()));
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;

    fn name(n: &str) -> Name {
        Name::from_ascii(n).expect("name")
    }

    fn a(ttl: u32) -> Record {
        Record::from_rdata(name("x.example."), ttl, RData::A(A::new(192, 0, 2, 1)))
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let soa = SOA::new(name("ns."), name("admin."), 1, 60, 60, 60, minimum);
        Record::from_rdata(name("example."), ttl, RData::SOA(soa))
    }

    fn answer(rcode: ResponseCode, answers: Vec<Record>, authority: Vec<Record>) -> Forwarded {
        Forwarded::Answer {
            rcode,
            answers,
            authority,
        }
    }

    #[test]
    fn cache_lifetime_follows_the_answers_ttls() {
        let ok = |ttls: &[u32]| {
            answer(
                ResponseCode::NoError,
                ttls.iter().map(|t| a(*t)).collect(),
                vec![],
            )
        };
        assert_eq!(cache_ttl(&ok(&[300, 30, 60])), Some(30));
        assert_eq!(cache_ttl(&ok(&[0, 30])), None, "TTL 0 is not cached");
        assert_eq!(cache_ttl(&ok(&[999_999])), Some(MAX_CACHE_TTL));
        // Negative answers: RFC 2308, the smaller of the SOA's TTL and MINIMUM; no SOA, no cache.
        let nx = |auth| answer(ResponseCode::NXDomain, vec![], auth);
        assert_eq!(cache_ttl(&nx(vec![soa(600, 45)])), Some(45));
        assert_eq!(cache_ttl(&nx(vec![soa(20, 45)])), Some(20));
        assert_eq!(cache_ttl(&nx(vec![])), None);
        assert_eq!(cache_ttl(&Forwarded::Failed("x".into())), None);
    }

    #[test]
    fn cached_answers_age_and_expire() {
        let mut cache = Cache::default();
        let t0 = Instant::now();
        let key = (name("x.example."), RecordType::A, DNSClass::IN);
        cache.put(
            key.clone(),
            answer(ResponseCode::NoError, vec![a(30)], vec![]),
            t0,
        );
        let Some(Forwarded::Answer { answers, .. }) = cache.get(&key, t0 + Duration::from_secs(10))
        else {
            panic!("cached answer expected");
        };
        assert_eq!(
            answers[0].ttl(),
            20,
            "TTL lowered by the time spent in the cache"
        );
        assert!(
            cache.get(&key, t0 + Duration::from_secs(30)).is_none(),
            "expired"
        );
        assert!(cache.entries.is_empty(), "expired entry dropped");
    }

    #[test]
    fn full_cache_drops_expired_then_soonest_to_expire() {
        let mut cache = Cache::default();
        let t0 = Instant::now();
        for i in 0..CACHE_SIZE {
            let key = (name(&format!("n{i}.example.")), RecordType::A, DNSClass::IN);
            let ttl = 100 + u32::try_from(i).expect("small");
            cache.put(key, answer(ResponseCode::NoError, vec![a(ttl)], vec![]), t0);
        }
        let new = (name("new.example."), RecordType::A, DNSClass::IN);
        cache.put(
            new.clone(),
            answer(ResponseCode::NoError, vec![a(10)], vec![]),
            t0,
        );
        assert_eq!(cache.entries.len(), CACHE_SIZE);
        assert!(cache.get(&new, t0).is_some());
        assert!(
            cache
                .get(&(name("n0.example."), RecordType::A, DNSClass::IN), t0)
                .is_none(),
            "soonest evicted"
        );
        assert!(cache
            .get(&(name("n1.example."), RecordType::A, DNSClass::IN), t0)
            .is_some());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# c\nsearch x\nnameserver 10.0.0.53\nnameserver ::1\nnameserver bad\n",
        )
        .expect("write");
        let s = read_resolv_conf(&p).expect("servers");
        assert_eq!(
            s,
            vec![
                "10.0.0.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
        std::fs::write(&p, "search x\n").expect("write");
        let e = read_resolv_conf(&p).expect_err("none").to_string();
        assert!(
            e.contains("resolv.conf") && e.contains("--dns-upstream"),
            "{e}"
        );
    }
}
