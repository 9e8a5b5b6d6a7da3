//! Per-pod fairness of the DNS proxy.
//!
//! Every enrolled pod's queries arrive on the same UDP socket and TCP listener, so without
//! limits one pod sending queries as fast as it can fills the socket's receive queue and the
//! proxy's in-flight slots, and its neighbours' lookups time out. The [`Gate`] decides, right
//! after a datagram is read or a connection accepted and before any parsing, whether the
//! source pod may have it:
//!
//! - a token bucket per pod (`--dns-pod-max-qps`, bursts of one second's worth): a query over
//!   the rate costs the proxy its share of a batched receive call and one map look-up, so the
//!   receive loop drains the socket faster than one pod can fill it;
//! - UDP queries in flight per pod (`--dns-pod-max-inflight`) and on the node
//!   (`--dns-max-inflight`): a pod whose names are slow upstream cannot hold every slot;
//! - TCP connections per pod (`--dns-pod-max-tcp-connections`) and on the node
//!   (`--dns-max-tcp-connections`), each closed after `--dns-tcp-idle-timeout` without a query.
//!
//! A refused UDP query is dropped (the stub resolver retries; answering would cost more than
//! the query did), a refused TCP query gets REFUSED, a refused TCP connection is closed. Each
//! refusal is counted by reason ([`DropReason`]) and logged at most once per pod every
//! [`LOG_EVERY`], with the number refused since the last line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A pod's refusals are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Sources tracked at once; a new source beyond this is refused ([`DropReason::TooManySources`]).
/// A node runs a few hundred pods; only local processes could forge more.
const MAX_SOURCES: usize = 4096;
/// A source without queries or connections for this long is forgotten.
const SOURCE_IDLE: Duration = Duration::from_secs(60);

/// The limits, from the daemon's settings (`config::DnsConfig`; the config dump shows them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// UDP queries in flight on the node.
    pub max_inflight: usize,
    /// UDP queries of one pod in flight.
    pub pod_max_inflight: usize,
    /// Queries (UDP and TCP) one pod may send per second, in bursts of as many; 0: no limit.
    pub pod_max_qps: u32,
    /// TCP connections open on the node.
    pub max_tcp: usize,
    /// TCP connections of one pod.
    pub pod_max_tcp: usize,
    /// A TCP connection without a query for this long is closed.
    #[serde(with = "crate::config::duration_str")]
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight: 1024,
            pod_max_inflight: 64,
            pod_max_qps: 2000,
            max_tcp: 256,
            pod_max_tcp: 16,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Why a query or connection was refused: the `reason` label of `ztunnel_dns_refused_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// The pod is over `--dns-pod-max-qps`.
    PodRate,
    /// The pod has `--dns-pod-max-inflight` UDP queries in flight.
    PodInflight,
    /// The node has `--dns-max-inflight` UDP queries in flight.
    NodeInflight,
    /// The pod has `--dns-pod-max-tcp-connections` open.
    PodTcp,
    /// The node has `--dns-max-tcp-connections` open.
    NodeTcp,
    /// More distinct sources than the proxy tracks.
    TooManySources,
}

impl DropReason {
    /// Every reason, for the config dump.
    pub const ALL: [DropReason; 6] = [
        DropReason::PodRate,
        DropReason::PodInflight,
        DropReason::NodeInflight,
        DropReason::PodTcp,
        DropReason::NodeTcp,
        DropReason::TooManySources,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PodRate => "pod_rate",
            DropReason::PodInflight => "pod_inflight",
            DropReason::NodeInflight => "node_inflight",
            DropReason::PodTcp => "pod_tcp_connections",
            DropReason::NodeTcp => "node_tcp_connections",
            DropReason::TooManySources => "too_many_sources",
        }
    }
}

impl EncodeLabelValue for DropReason {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(e, self.as_str())
    }
}

/// Label set of the refusal counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// See [`DropReason`].
    pub reason: DropReason,
}

/// Refusals by reason (`ztunnel_dns_refused_total{reason}`).
pub type Refused = Family<DropLabels, Counter>;

/// One source's share.
#[derive(Debug)]
struct Source {
    tokens: f64,
    refilled: Instant,
    inflight: usize,
    tcp: usize,
    last_seen: Instant,
    /// Refusals not logged yet, and when the next line may be written.
    unlogged: u64,
    log_after: Instant,
}

/// What all sources hold together.
#[derive(Debug, Default)]
struct Totals {
    inflight: usize,
    tcp: usize,
}

#[derive(Debug)]
struct Inner {
    sources: HashMap<IpAddr, Source>,
    totals: Totals,
    next_prune: Instant,
    /// While the table is full, it is pruned at most this often (not once per packet).
    next_full_prune: Instant,
}

/// Admission of queries and connections per source pod. Shared by the UDP loop, the TCP
/// loop and their tasks; one uncontended lock per query.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    inner: Mutex<Inner>,
    /// One counter per reason, in [`DropReason::ALL`]'s order, taken from the family once so
    /// a refusal costs one atomic add.
    refused: [Counter; 6],
}

/// A UDP query's slot; released on drop.
#[derive(Debug)]
pub struct QueryPermit {
    gate: Arc<Gate>,
    src: IpAddr,
}

/// A TCP connection's slot; released on drop.
#[derive(Debug)]
pub struct ConnPermit {
    gate: Arc<Gate>,
    src: IpAddr,
}

impl Gate {
    /// A gate with `limits`, counting refusals into `refused`.
    pub fn new(limits: Limits, refused: Refused) -> Arc<Gate> {
        let refused =
            DropReason::ALL.map(|reason| refused.get_or_create(&DropLabels { reason }).clone());
        Arc::new(Gate {
            limits,
            inner: Mutex::new(Inner {
                sources: HashMap::new(),
                totals: Totals::default(),
                next_prune: Instant::now() + SOURCE_IDLE,
                next_full_prune: Instant::now(),
            }),
            refused,
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one UDP query from `src`: a rate token and an in-flight slot.
    pub fn admit_udp(self: &Arc<Self>, src: IpAddr) -> Result<QueryPermit, DropReason> {
        self.admit(src, Instant::now(), |totals, s, l| {
            if totals.inflight >= l.max_inflight {
                return Err(DropReason::NodeInflight);
            }
            if s.inflight >= l.pod_max_inflight {
                return Err(DropReason::PodInflight);
            }
            take_token(s, l)?;
            s.inflight += 1;
            totals.inflight += 1;
            Ok(())
        })?;
        Ok(QueryPermit {
            gate: self.clone(),
            src,
        })
    }

    /// Admits one query on an open TCP connection of `src` (a rate token).
    pub fn admit_tcp_query(self: &Arc<Self>, src: IpAddr) -> Result<(), DropReason> {
        self.admit(src, Instant::now(), |_, s, l| take_token(s, l))
    }

    /// Admits one TCP connection from `src`.
    pub fn admit_tcp(self: &Arc<Self>, src: IpAddr) -> Result<ConnPermit, DropReason> {
        self.admit(src, Instant::now(), |totals, s, l| {
            if totals.tcp >= l.max_tcp {
                return Err(DropReason::NodeTcp);
            }
            if s.tcp >= l.pod_max_tcp {
                return Err(DropReason::PodTcp);
            }
            s.tcp += 1;
            totals.tcp += 1;
            Ok(())
        })?;
        Ok(ConnPermit {
            gate: self.clone(),
            src,
        })
    }

    fn admit(
        &self,
        src: IpAddr,
        now: Instant,
        decide: impl FnOnce(&mut Totals, &mut Source, &Limits) -> Result<(), DropReason>,
    ) -> Result<(), DropReason> {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let full = inner.sources.len() >= MAX_SOURCES;
        if now >= inner.next_prune || (full && now >= inner.next_full_prune) {
            prune(inner, now);
        }
        if !inner.sources.contains_key(&src) && inner.sources.len() >= MAX_SOURCES {
            drop(guard);
            self.count(DropReason::TooManySources);
            return Err(DropReason::TooManySources);
        }
        let burst = f64::from(self.limits.pod_max_qps.max(1));
        let source = inner.sources.entry(src).or_insert(Source {
            tokens: burst,
            refilled: now,
            inflight: 0,
            tcp: 0,
            last_seen: now,
            unlogged: 0,
            log_after: now,
        });
        source.last_seen = now;
        let verdict = decide(&mut inner.totals, source, &self.limits);
        let log = match verdict {
            Err(reason) => {
                source.unlogged += 1;
                (now >= source.log_after).then(|| {
                    source.log_after = now + LOG_EVERY;
                    (
                        reason,
                        std::mem::take(&mut source.unlogged),
                        source.inflight,
                        source.tcp,
                    )
                })
            }
            Ok(()) => None,
        };
        drop(guard);
        if let Err(reason) = verdict {
            self.count(reason);
        }
        if let Some((reason, refused, inflight, tcp)) = log {
            tracing::warn!(
                %src,
                reason = reason.as_str(),
                refused,
                inflight,
                tcp_connections = tcp,
                every_secs = LOG_EVERY.as_secs(),
                "dns: pod over its limits; queries refused"
            );
        }
        verdict
    }

    fn count(&self, reason: DropReason) {
        self.refused[reason as usize].inc();
    }

    fn release(&self, src: IpAddr, udp: bool) {
        let mut inner = self.inner();
        if udp {
            inner.totals.inflight = inner.totals.inflight.saturating_sub(1);
        } else {
            inner.totals.tcp = inner.totals.tcp.saturating_sub(1);
        }
        if let Some(s) = inner.sources.get_mut(&src) {
            if udp {
                s.inflight = s.inflight.saturating_sub(1);
            } else {
                s.tcp = s.tcp.saturating_sub(1);
            }
        }
    }

    /// UDP queries and TCP connections open now, and sources tracked (config dump, tests).
    pub fn usage(&self) -> (usize, usize, usize) {
        let inner = self.inner();
        (inner.totals.inflight, inner.totals.tcp, inner.sources.len())
    }
}

/// Refills `s`'s bucket and takes one token.
fn take_token(s: &mut Source, l: &Limits) -> Result<(), DropReason> {
    if l.pod_max_qps == 0 {
        return Ok(());
    }
    let rate = f64::from(l.pod_max_qps);
    let now = s.last_seen;
    let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
    s.tokens = (s.tokens + elapsed * rate).min(rate);
    s.refilled = now;
    if s.tokens < 1.0 {
        return Err(DropReason::PodRate);
    }
    s.tokens -= 1.0;
    Ok(())
}

/// Forgets sources that hold nothing and have been quiet for [`SOURCE_IDLE`].
fn prune(inner: &mut Inner, now: Instant) {
    inner.sources.retain(|_, s| {
        s.inflight > 0 || s.tcp > 0 || now.saturating_duration_since(s.last_seen) < SOURCE_IDLE
    });
    inner.next_prune = now + SOURCE_IDLE;
    inner.next_full_prune = now + Duration::from_secs(1);
}

impl Drop for QueryPermit {
    fn drop(&mut self) {
        self.gate.release(self.src, true);
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.gate.release(self.src, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: Limits) -> Arc<Gate> {
        Gate::new(limits, Refused::default())
    }

    fn refused(g: &Gate, reason: DropReason) -> u64 {
        g.refused[reason as usize].get()
    }

    #[test]
    fn reasons_index_their_counters() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn one_pods_inflight_limit_leaves_room_for_others() {
        let g = gate(Limits {
            max_inflight: 5,
            pod_max_inflight: 3,
            pod_max_qps: 0,
            ..Limits::default()
        });
        let held: Vec<_> = (0..3).map(|_| g.admit_udp(A).expect("within")).collect();
        assert_eq!(g.admit_udp(A).err(), Some(DropReason::PodInflight));
        let b: Vec<_> = (0..2).map(|_| g.admit_udp(B).expect("B's own")).collect();
        assert_eq!(g.admit_udp(B).err(), Some(DropReason::NodeInflight));
        drop(held);
        assert!(g.admit_udp(A).is_ok(), "slots come back on drop");
        drop(b);
        assert_eq!(g.usage().0, 0);
        assert_eq!(refused(&g, DropReason::PodInflight), 1);
        assert_eq!(refused(&g, DropReason::NodeInflight), 1);
    }

    #[test]
    fn rate_is_per_pod_and_refills() {
        let g = gate(Limits {
            pod_max_qps: 10,
            ..Limits::default()
        });
        for _ in 0..10 {
            drop(g.admit_udp(A).expect("burst"));
        }
        assert_eq!(g.admit_udp(A).err(), Some(DropReason::PodRate));
        assert_eq!(
            g.admit_tcp_query(A),
            Err(DropReason::PodRate),
            "TCP shares it"
        );
        assert!(g.admit_udp(B).is_ok(), "another pod has its own bucket");
        std::thread::sleep(Duration::from_millis(250));
        assert!(g.admit_udp(A).is_ok(), "refilled at 10/s");
        assert_eq!(refused(&g, DropReason::PodRate), 2);
    }

    #[test]
    fn tcp_connections_per_pod_and_node() {
        let g = gate(Limits {
            max_tcp: 3,
            pod_max_tcp: 2,
            ..Limits::default()
        });
        let a: Vec<_> = (0..2).map(|_| g.admit_tcp(A).expect("within")).collect();
        assert_eq!(g.admit_tcp(A).err(), Some(DropReason::PodTcp));
        let _b = g.admit_tcp(B).expect("B");
        assert_eq!(g.admit_tcp(B).err(), Some(DropReason::NodeTcp));
        drop(a);
        assert_eq!(g.usage().1, 1);
    }

    #[test]
    fn idle_sources_are_forgotten_and_their_number_is_bounded() {
        let g = gate(Limits::default());
        let t0 = Instant::now();
        let mut inner = g.inner();
        for i in 0..MAX_SOURCES {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
            inner.sources.insert(
                ip,
                Source {
                    tokens: 1.0,
                    refilled: t0,
                    inflight: 0,
                    tcp: 0,
                    last_seen: t0,
                    unlogged: 0,
                    log_after: t0,
                },
            );
        }
        drop(inner);
        let new = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(g.admit_udp(new).err(), Some(DropReason::TooManySources));
        // Once they have been idle long enough, they make room.
        let later = t0 + SOURCE_IDLE + Duration::from_secs(1);
        assert!(g.admit(new, later, |_, _, _| Ok(())).is_ok());
        assert_eq!(g.usage().2, 1);
    }
}
