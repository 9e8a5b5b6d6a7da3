//! What the HBONE server lets peers hold, so that no peer, and no crowd of peers, can take
//! the memory or the descriptors every other pod of the node needs.
//!
//! - **Handshakes** and **connections** in total are capped at accept
//!   (`--hbone-inbound-max-handshakes`, `--hbone-inbound-max-connections`). A connection past
//!   the connection cap is closed before any TLS state exists for it. At the handshake cap the
//!   *oldest* handshake is closed to make room instead of the new one: peers that hold
//!   handshakes open cannot keep a real client (whose handshake takes milliseconds) out.
//! - **Per peer**: connections and streams are counted per client identity (from the
//!   certificate) and, separately, per source address (each pod dials from its own IP), each
//!   capped (`--hbone-inbound-peer-max-connections`, `--hbone-inbound-peer-max-streams`).
//! - **Descriptors**: every inbound connection holds one descriptor and every stream
//!   [`FDS_PER_STREAM`] (its connection to the pod). When fewer than
//!   `--hbone-inbound-fd-headroom` remain below the open-file limit, new connections and
//!   streams are refused to the identities and addresses holding at least an even share of
//!   the inbound descriptors: the abuser is refused first, peers with a few flows and the
//!   node's own outbound flows still get theirs.
//!   Descriptors in use are counted from `/proc/self/fd` once a second
//!   ([`Limits::sample_descriptors`]) and moved by the server's own opens and closes in
//!   between, so the check costs a few atomic loads.
//!
//! Accounting happens when a connection is admitted, when its handshake ends, and when a
//! stream opens or closes; never per chunk. The tables of peers are locked only at connection
//! open and close; a stream touches atomics only.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::config::InboundLimits;
use crate::identity::SpiffeId;
use crate::telemetry::throttle::Throttle;

/// Descriptors an inbound stream holds: its connection to the pod (a revocation ends the
/// flow through its splice, which owns that socket, so no second handle is kept).
pub const FDS_PER_STREAM: usize = 1;

/// How often each kind of refusal is logged at most (the rest are counted into the next line).
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why an inbound connection or stream was refused: the `reason` label of the refusal
/// counters and of the (rate-limited) log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `--hbone-inbound-max-handshakes` connections were in their handshakes and this one was
    /// the oldest: closed to make room for a newer one.
    Handshakes,
    /// `--hbone-inbound-max-connections` connections were already open.
    Connections,
    /// The client identity or source address already held
    /// `--hbone-inbound-peer-max-connections` connections.
    PeerConnections,
    /// The client identity or source address already held
    /// `--hbone-inbound-peer-max-streams` streams.
    PeerStreams,
    /// Descriptors ran low and the peer held at least its even share of them.
    Descriptors,
    /// TLS and HTTP/2 handshakes did not finish within `--hbone-inbound-handshake-timeout`.
    HandshakeTimeout,
    /// The TLS or HTTP/2 handshake failed, or the certificate carried no SPIFFE identity.
    HandshakeFailed,
    /// No local enrolled workload has the address the connection was made to.
    NoWorkload,
    /// The client stopped answering HTTP/2 PINGs.
    KeepaliveTimeout,
    /// The client broke the HTTP/2 protocol and the connection was closed with GOAWAY (for
    /// instance a header block far over the header list limit).
    ProtocolError,
}

/// Every reason, in the order of the log throttle's slots.
const REASONS: [Reason; 10] = [
    Reason::Handshakes,
    Reason::Connections,
    Reason::PeerConnections,
    Reason::PeerStreams,
    Reason::Descriptors,
    Reason::HandshakeTimeout,
    Reason::HandshakeFailed,
    Reason::NoWorkload,
    Reason::KeepaliveTimeout,
    Reason::ProtocolError,
];

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Handshakes => "max_handshakes",
            Reason::Connections => "max_connections",
            Reason::PeerConnections => "peer_max_connections",
            Reason::PeerStreams => "peer_max_streams",
            Reason::Descriptors => "fd_headroom",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::HandshakeFailed => "handshake_failed",
            Reason::NoWorkload => "no_workload",
            Reason::KeepaliveTimeout => "keepalive_timeout",
            Reason::ProtocolError => "protocol_error",
        }
    }

    fn slot(self) -> usize {
        REASONS.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// The status a refused stream is answered with: 429 when the peer is over its own
    /// limit or share, 503 otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::PeerStreams | Reason::PeerConnections | Reason::Descriptors => {
                StatusCode::TOO_MANY_REQUESTS
            }
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(e, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: Reason,
}

/// Connections and streams one peer (an identity or an address) holds.
#[derive(Debug, Default)]
struct Usage {
    connections: AtomicUsize,
    streams: AtomicUsize,
}

impl Usage {
    /// Descriptors the peer holds on this side.
    fn descriptors(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
            + FDS_PER_STREAM * self.streams.load(Ordering::Relaxed)
    }
}

/// Peers of one kind with connections open, and how many there are.
#[derive(Debug)]
struct Table<K> {
    peers: Mutex<HashMap<K, Arc<Usage>>>,
    len: AtomicUsize,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            peers: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
        }
    }
}

impl<K: Hash + Eq + Clone> Table<K> {
    /// Counts a new connection of `key`, unless `check` refuses it.
    fn enter(
        &self,
        key: &K,
        check: impl FnOnce(&Usage) -> Result<(), Reason>,
    ) -> Result<Arc<Usage>, Reason> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let usage = match peers.get(key) {
            Some(u) => u.clone(),
            None => Arc::default(),
        };
        check(&usage)?;
        usage.connections.fetch_add(1, Ordering::Relaxed);
        if peers.insert(key.clone(), usage.clone()).is_none() {
            self.len.store(peers.len(), Ordering::Relaxed);
        }
        Ok(usage)
    }

    /// Counts a connection of `key` closed; forgets the peer after its last one (streams still
    /// open keep their own handle on its counts).
    fn leave(&self, key: &K, usage: &Arc<Usage>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if usage.connections.fetch_sub(1, Ordering::Relaxed) == 1
            && peers.get(key).is_some_and(|u| Arc::ptr_eq(u, usage))
        {
            peers.remove(key);
            self.len.store(peers.len(), Ordering::Relaxed);
        }
    }

    /// Whether `usage` is at least an even share of `total` inbound descriptors among the
    /// peers of this kind.
    fn at_or_above_share(&self, usage: &Usage, total: usize) -> bool {
        let held = usage.descriptors();
        held > 0 && held.saturating_mul(self.len.load(Ordering::Relaxed).max(1)) >= total
    }
}

/// The process's descriptors: its limit, and those not held by inbound connections and
/// streams, as of the last count of `/proc/self/fd`.
#[derive(Debug, Default)]
struct Descriptors {
    limit: AtomicUsize,
    /// The last count less the inbound connections and the streams whose pod connection was
    /// open then ([`Responder`](super::server::Responder) marks a stream open when it answers
    /// 200). Admitted streams still dialing are not subtracted: between counts a burst of
    /// them would otherwise be missed by both terms.
    others: AtomicUsize,
    /// Streams whose descriptors are open (answered 200 and not yet closed).
    open_streams: AtomicUsize,
}

/// The metric families of the limits (registered by [`Limits::register`]).
#[derive(Debug, Default)]
struct LimitMetrics {
    refused_connections: Family<ReasonLabels, Counter>,
    refused_streams: Family<ReasonLabels, Counter>,
    handshakes: Gauge<i64, AtomicI64>,
    connections: Gauge<i64, AtomicI64>,
    streams: Gauge<i64, AtomicI64>,
    open_fds: Gauge<i64, AtomicI64>,
    max_fds: Gauge<i64, AtomicI64>,
}

/// A connection in its handshake, as the queue of handshakes sees it.
#[derive(Debug, Default)]
struct Pending {
    /// Closes the handshake (it was the oldest at the cap).
    evict: Notify,
    /// The handshake ended (finished, failed or evicted): nothing to evict.
    done: std::sync::atomic::AtomicBool,
}

/// The HBONE server's limits and counts; shared by all its connections.
#[derive(Debug)]
pub struct Limits {
    cfg: InboundLimits,
    /// Connections in their handshakes, oldest first (finished ones are dropped lazily).
    pending: Mutex<VecDeque<Arc<Pending>>>,
    identities: Table<SpiffeId>,
    addresses: Table<IpAddr>,
    fds: Descriptors,
    metrics: LimitMetrics,
    log: Throttle,
}

impl Limits {
    /// Limits as configured; reads the open-file limit and the descriptors in use now.
    pub fn new(cfg: InboundLimits) -> Arc<Limits> {
        let limits = Arc::new(Limits {
            cfg,
            pending: Mutex::new(VecDeque::new()),
            identities: Table::default(),
            addresses: Table::default(),
            fds: Descriptors::default(),
            metrics: LimitMetrics::default(),
            log: Throttle::new(REASONS.len(), LOG_INTERVAL),
        });
        limits.sample_descriptors();
        limits
    }

    /// The configured limits.
    pub fn config(&self) -> &InboundLimits {
        &self.cfg
    }

    /// Adds the families to `registry`: `ztunnel_hbone_inbound_refused_connections_total` and
    /// `ztunnel_hbone_inbound_refused_streams_total` by `reason`, the gauges
    /// `ztunnel_hbone_inbound_handshakes` (in flight), `ztunnel_hbone_inbound_connections`,
    /// `ztunnel_hbone_inbound_streams`, and the process's `ztunnel_open_fds` / `ztunnel_max_fds`.
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "ztunnel_hbone_inbound_refused_connections",
            "Inbound HBONE connections closed by a limit or a failed handshake, by reason",
            m.refused_connections.clone(),
        );
        registry.register(
            "ztunnel_hbone_inbound_refused_streams",
            "Inbound HBONE streams refused by a limit, by reason",
            m.refused_streams.clone(),
        );
        registry.register(
            "ztunnel_hbone_inbound_handshakes",
            "Inbound HBONE connections in their TLS and HTTP/2 handshakes",
            m.handshakes.clone(),
        );
        registry.register(
            "ztunnel_hbone_inbound_connections",
            "Inbound HBONE connections open, handshakes included",
            m.connections.clone(),
        );
        registry.register(
            "ztunnel_hbone_inbound_streams",
            "Inbound HBONE streams open",
            m.streams.clone(),
        );
        registry.register(
            "ztunnel_open_fds",
            "Open file descriptors of the process (sampled every second)",
            m.open_fds.clone(),
        );
        registry.register(
            "ztunnel_max_fds",
            "Open-file limit of the process",
            m.max_fds.clone(),
        );
    }

    /// Reads the open-file limit and counts the descriptors in use (`/proc/self/fd`); the
    /// daemon calls it every second off its accept loops.
    pub fn sample_descriptors(&self) {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(usize::MAX, |(soft, _)| {
                usize::try_from(soft).unwrap_or(usize::MAX)
            });
        let Ok(open) = std::fs::read_dir("/proc/self/fd").map(Iterator::count) else {
            return;
        };
        let f = &self.fds;
        let conns = usize::try_from(self.metrics.connections.get()).unwrap_or(0);
        let inbound_open = conns + FDS_PER_STREAM * f.open_streams.load(Ordering::Relaxed);
        f.limit.store(limit, Ordering::Relaxed);
        f.others
            .store(open.saturating_sub(inbound_open), Ordering::Relaxed);
        self.metrics
            .open_fds
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        self.metrics
            .max_fds
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Descriptors held by inbound connections and streams now.
    fn inbound_descriptors(&self) -> usize {
        let m = &self.metrics;
        let streams = usize::try_from(m.streams.get()).unwrap_or(0);
        usize::try_from(m.connections.get()).unwrap_or(0) + FDS_PER_STREAM * streams
    }

    /// Whether fewer than the headroom of descriptors are left: the others as last counted,
    /// plus what inbound connections and streams (admitted ones included) hold now.
    fn low_on_descriptors(&self) -> bool {
        let f = &self.fds;
        let in_use = f.others.load(Ordering::Relaxed) + self.inbound_descriptors();
        f.limit.load(Ordering::Relaxed).saturating_sub(in_use) < self.cfg.fd_headroom
    }

    /// Admits a new connection from `peer` (at accept, before any TLS state exists), or says
    /// why not. The connection counts as in its handshake until [`Admitted::handshaken`]; at
    /// the handshake cap the oldest handshake is evicted to make room.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Reason> {
        let m = &self.metrics;
        if usize::try_from(m.connections.inc()).unwrap_or(0) >= self.cfg.max_connections {
            m.connections.dec();
            return Err(Reason::Connections);
        }
        let total = self.inbound_descriptors();
        let address = self
            .addresses
            .enter(&peer, |u| self.check_connection(u, total, &self.addresses));
        let usage = match address {
            Ok(usage) => usage,
            Err(reason) => {
                m.connections.dec();
                return Err(reason);
            }
        };
        let in_handshake = usize::try_from(m.handshakes.inc()).unwrap_or(0);
        let pending = Arc::new(Pending::default());
        {
            let mut queue = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if in_handshake >= self.cfg.max_handshakes {
                while let Some(oldest) = queue.pop_front() {
                    if !oldest.done.swap(true, Ordering::Relaxed) {
                        oldest.evict.notify_one();
                        break;
                    }
                }
            }
            while queue
                .front()
                .is_some_and(|p| p.done.load(Ordering::Relaxed))
            {
                queue.pop_front();
            }
            queue.push_back(pending.clone());
        }
        Ok(Admitted {
            limits: self.clone(),
            address: (peer, usage),
            identity: None,
            pending: Some(pending),
        })
    }

    fn check_connection<K: Hash + Eq + Clone>(
        &self,
        usage: &Usage,
        total: usize,
        table: &Table<K>,
    ) -> Result<(), Reason> {
        if usage.connections.load(Ordering::Relaxed) >= self.cfg.peer_max_connections {
            return Err(Reason::PeerConnections);
        }
        if self.low_on_descriptors() && table.at_or_above_share(usage, total) {
            return Err(Reason::Descriptors);
        }
        Ok(())
    }

    /// Counts and logs (at most one line per reason per [`LOG_INTERVAL`]) a refused
    /// connection.
    pub fn refused_connection(&self, reason: Reason, peer: SocketAddr, detail: &str) {
        self.metrics
            .refused_connections
            .get_or_create(&ReasonLabels { reason })
            .inc();
        if let Some(count) = self.log.hit(reason.slot()) {
            tracing::warn!(%reason, count, last_peer = %peer, last_error = detail,
                "HBONE connections refused (one line per reason every 10s; counts in ztunnel_hbone_inbound_refused_connections_total)");
        }
    }

    /// Counts and logs (rate-limited like connections) a refused stream.
    pub fn refused_stream(&self, reason: Reason, peer: SocketAddr, identity: &SpiffeId) {
        self.metrics
            .refused_streams
            .get_or_create(&ReasonLabels { reason })
            .inc();
        if let Some(count) = self.log.hit(reason.slot()) {
            tracing::warn!(%reason, count, last_peer = %peer, last_identity = %identity,
                status = reason.status().as_u16(),
                "HBONE streams refused (one line per reason every 10s; counts in ztunnel_hbone_inbound_refused_streams_total)");
        }
    }

    /// Writes the summary lines of refusals held back for a whole interval (called with
    /// [`Limits::sample_descriptors`], so a burst that stopped is still reported).
    pub fn flush_logs(&self) {
        for (slot, count) in self.log.flush() {
            let reason = REASONS.get(slot).copied().unwrap_or(Reason::Handshakes);
            tracing::warn!(%reason, count, "HBONE connections or streams refused (summary of the last 10s)");
        }
    }

    /// Descriptors inbound connections and streams hold now.
    pub fn in_use(&self) -> usize {
        self.inbound_descriptors()
    }

    /// Inbound connections open now, handshakes included.
    pub fn connections(&self) -> usize {
        usize::try_from(self.metrics.connections.get()).unwrap_or(0)
    }

    /// Inbound connections in their handshakes now.
    pub fn handshakes(&self) -> usize {
        usize::try_from(self.metrics.handshakes.get()).unwrap_or(0)
    }
}

/// An admitted inbound connection, counted until dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<Limits>,
    address: (IpAddr, Arc<Usage>),
    identity: Option<(SpiffeId, Arc<Usage>)>,
    /// While in the handshake: its place in the queue of handshakes.
    pending: Option<Arc<Pending>>,
}

impl Admitted {
    /// The handshakes are done and the client is `id`: counts the connection for the
    /// identity, or refuses it when the identity is over its limit or share.
    pub fn handshaken(&mut self, id: &SpiffeId) -> Result<(), Reason> {
        self.end_handshake();
        let l = &self.limits;
        let total = l.inbound_descriptors();
        let usage = l
            .identities
            .enter(id, |u| l.check_connection(u, total, &l.identities))?;
        self.identity = Some((id.clone(), usage));
        Ok(())
    }

    fn end_handshake(&mut self) {
        if let Some(p) = self.pending.take() {
            p.done.store(true, Ordering::Relaxed);
            self.limits.metrics.handshakes.dec();
        }
    }

    /// Resolves when this connection's handshake was evicted to make room for a newer one
    /// (pending forever once the handshake is over).
    pub async fn evicted(&self) {
        match &self.pending {
            Some(p) => p.evict.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Opens a stream of this connection, or says why it may not be.
    pub fn open_stream(&self) -> Result<StreamGuard, Reason> {
        let l = &self.limits;
        let Some((_, id)) = &self.identity else {
            return Err(Reason::HandshakeFailed);
        };
        let addr = &self.address.1;
        let max = l.cfg.peer_max_streams;
        if id.streams.load(Ordering::Relaxed) >= max || addr.streams.load(Ordering::Relaxed) >= max
        {
            return Err(Reason::PeerStreams);
        }
        if l.low_on_descriptors() {
            let total = l.inbound_descriptors();
            if l.identities.at_or_above_share(id, total)
                || l.addresses.at_or_above_share(addr, total)
            {
                return Err(Reason::Descriptors);
            }
        }
        id.streams.fetch_add(1, Ordering::Relaxed);
        addr.streams.fetch_add(1, Ordering::Relaxed);
        l.metrics.streams.inc();
        Ok(StreamGuard {
            limits: l.clone(),
            identity: id.clone(),
            address: addr.clone(),
            open: Arc::default(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.end_handshake();
        let l = &self.limits;
        l.metrics.connections.dec();
        l.addresses.leave(&self.address.0, &self.address.1);
        if let Some((id, usage)) = &self.identity {
            l.identities.leave(id, usage);
        }
    }
}

/// An open inbound stream, counted for its identity and address until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    limits: Arc<Limits>,
    identity: Arc<Usage>,
    address: Arc<Usage>,
    /// Set once the stream's pod connection is open ([`OpenMark`]).
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl StreamGuard {
    /// What the stream's responder marks open when it answers 200.
    pub fn open_mark(&self) -> OpenMark {
        OpenMark {
            limits: self.limits.clone(),
            open: self.open.clone(),
        }
    }
}

/// Marks a stream's descriptors open, so the descriptor count knows them apart from streams
/// still dialing.
#[derive(Debug)]
pub struct OpenMark {
    limits: Arc<Limits>,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl OpenMark {
    /// The stream's pod connection is open.
    pub fn mark(self) {
        if !self.open.swap(true, Ordering::Relaxed) {
            self.limits.fds.open_streams.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.open.load(Ordering::Relaxed) {
            self.limits.fds.open_streams.fetch_sub(1, Ordering::Relaxed);
        }
        self.identity.streams.fetch_sub(1, Ordering::Relaxed);
        self.address.streams.fetch_sub(1, Ordering::Relaxed);
        self.limits.metrics.streams.dec();
    }
}

#[cfg(test)]
mod tests;
