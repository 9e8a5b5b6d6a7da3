//! Outgoing HBONE with connection pooling.
//!
//! Flows share an HTTP/2 connection only when everything that shows on the wire or in the
//! handshake is the same: source identity (client certificate), source IP (the spoofed TCP
//! source), the set of identities accepted from the server, and the destination address. Each
//! connection carries at most `max_streams` flows; one dial per key runs at a time, so a burst
//! of new flows to one destination opens one connection, not a hundred. Connections without
//! flows are released after the idle timeout; broken ones (GOAWAY, I/O error) are dropped.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::window::{pinger, Ended, Window};
use super::{HboneError, BAGGAGE, FORWARDED, TRACEPARENT};
use crate::config::HboneConfig;
use crate::identity::{CertManager, SpiffeId};
use crate::socket::{Leg, SocketFactory};
use crate::tls;

/// What makes two flows eligible to share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Client certificate identity.
    pub src_identity: SpiffeId,
    /// Source IP of the TCP connection (the source pod's).
    pub src_ip: IpAddr,
    /// Server identities accepted, sorted.
    pub dst_identities: Vec<SpiffeId>,
    /// Where the connection goes (`<pod ip>:15008`).
    pub dst: SocketAddr,
}

/// Per-flow request data sent in the CONNECT headers.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// `:authority`: the destination pod address and target port.
    pub authority: SocketAddr,
    /// The original client address, for `forwarded`.
    pub client: SocketAddr,
    /// `baggage` value with the source's Kubernetes names.
    pub baggage: String,
}

/// One established flow: the stream halves plus a guard that returns the stream slot to the
/// pool when dropped.
#[derive(Debug)]
pub struct Flow {
    /// Data towards the destination.
    pub send: SendStream<Bytes>,
    /// Data from the destination.
    pub recv: RecvStream,
    /// Identity the server proved in the handshake.
    pub peer_identity: Option<SpiffeId>,
    /// The connection's adaptive receive window, told how the flow's data is taken
    /// ([`crate::splice::hbone`]).
    pub window: Option<Arc<Window>>,
    _slot: Slot,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    peer_identity: Option<SpiffeId>,
    active: AtomicUsize,
    /// The peer's concurrent stream limit, updated as its SETTINGS arrive.
    peer_max: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    window: Option<Arc<Window>>,
    idle_since: Mutex<Instant>,
    /// The data-plane worker driving the connection (the one that dialed it).
    worker: Option<usize>,
}

#[derive(Debug)]
struct Slot(Arc<Conn>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// How often a pooled connection is pinged, and how long the answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

type DialLocks = HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>;

/// The HBONE connection pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: HboneConfig,
    sockets: Arc<dyn SocketFactory>,
    certs: Arc<CertManager>,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    dialing: Mutex<DialLocks>,
    next_id: AtomicUsize,
}

/// Pool gauges for status and metrics.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PoolStats {
    /// Open connections.
    pub connections: usize,
    /// Flows in progress over them.
    pub streams: usize,
}

impl Pool {
    /// A pool presenting client certificates from `certs`, dialling through `sockets`.
    pub fn new(cfg: HboneConfig, certs: Arc<CertManager>, sockets: Arc<dyn SocketFactory>) -> Pool {
        let pool = Pool {
            inner: Arc::new(Inner {
                cfg,
                sockets,
                certs,
                conns: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
                next_id: AtomicUsize::new(1),
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let every = (pool.inner.cfg.idle_timeout / 2).min(Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.reap();
            }
        });
        pool
    }

    /// Opens a flow: reuses a pooled connection with a free slot, or dials one.
    pub async fn connect(&self, key: &PoolKey, req: &ConnectRequest) -> Result<Flow, HboneError> {
        // A pooled connection may turn out closed only when used; retry once on a fresh one.
        for attempt in 0..2 {
            let conn = match self.inner.take(key) {
                Some(c) => c,
                None => self.dial_or_reuse(key).await?,
            };
            let slot = Slot(conn.clone());
            match send_connect(&conn, key, req).await {
                Ok((send, recv)) => {
                    return Ok(Flow {
                        send,
                        recv,
                        peer_identity: conn.peer_identity.clone(),
                        window: conn.window.clone(),
                        _slot: slot,
                    })
                }
                Err(HboneError::H2 { error, .. }) if attempt == 0 && !error.is_reset() => {
                    tracing::debug!(conn = conn.id, %error, "pooled connection unusable; redialling");
                    conn.closed.store(true, Ordering::Release);
                }
                Err(e) => return Err(e),
            }
        }
        Err(HboneError::Connect {
            addr: key.dst,
            error: std::io::Error::other("connection closed twice in a row"),
        })
    }

    /// Waits for (or performs) the single dial for `key`, then takes a slot.
    async fn dial_or_reuse(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        let lock = {
            let mut d = self.inner.dialing.lock().unwrap_or_else(|p| p.into_inner());
            d.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(c) = self.inner.take(key) {
            return Ok(c);
        }
        // The lock entry stays while anyone may hold it: removing it here would let a flow that
        // arrives now create a second lock and dial in parallel with this one's waiters. The
        // reaper drops entries nobody holds. The dial (TCP, TLS and HTTP/2 handshakes, 4 KiB
        // of state) is boxed: inline it would size every flow's task for it, though most
        // flows take a pooled connection and all of them outlive the dial.
        let conn = Box::pin(self.inner.dial(key)).await?;
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    /// Whether the pool can present a certificate for `id` (issued, or being issued): the
    /// main task registers a new local pod's identity shortly after the state shows it.
    pub fn manages_identity(&self, id: &SpiffeId) -> bool {
        self.inner.certs.manages(id)
    }

    /// Current pool size.
    pub fn stats(&self) -> PoolStats {
        let conns = self.inner.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .values()
            .flatten()
            .fold(PoolStats::default(), |mut s, c| {
                s.connections += 1;
                s.streams += c.active.load(Ordering::Relaxed);
                s
            })
    }
}

impl Inner {
    /// Takes a slot on a live pooled connection for `key`, the one [`pick`] chooses, or
    /// returns `None` so that the caller dials one.
    fn take(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Acquire));
        let seen: Vec<Candidate> = list
            .iter()
            .map(|c| Candidate {
                worker: c.worker,
                active: c.active.load(Ordering::Acquire),
                max: (self.cfg.max_streams as usize).min(c.peer_max.load(Ordering::Relaxed)),
            })
            .collect();
        let conn = &list[pick(&seen, crate::workers::current(), self.cfg.spread as usize)?];
        // Only `take` adds flows, under the pool lock, so the count `pick` saw can only have
        // gone down since: the chosen connection still has room.
        conn.active.fetch_add(1, Ordering::AcqRel);
        Some(conn.clone())
    }

    async fn dial(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        let addr = key.dst;
        let cert = self
            .certs
            .fetch(&key.src_identity, self.cfg.connect_timeout)
            .await?;
        let tls_cfg = tls::client_config(
            cert.certified.clone(),
            self.certs.roots(),
            key.dst_identities.clone(),
        )?;
        let tcp = self
            .sockets
            .connect(Leg::Hbone, Some(key.src_ip), addr)
            .await
            .map_err(|error| HboneError::Connect { addr, error })?;
        let connector = TlsConnector::from(Arc::new(tls_cfg));
        let mut tls_stream = tokio::time::timeout(
            self.cfg.connect_timeout,
            connector.connect(
                ServerName::IpAddress(addr.ip().into()),
                super::transport(tcp, &self.cfg),
            ),
        )
        .await
        .map_err(|_| HboneError::Tls {
            addr,
            error: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        })?
        .map_err(|error| HboneError::Tls { addr, error })?;
        super::tune(tls_stream.get_mut().1);
        let peer_identity = tls::peer_identity(tls_stream.get_ref().1.peer_certificates());
        let bounds = self.cfg.window_bounds();
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(bounds.start)
            .initial_connection_window_size(self.cfg.connection_window)
            .max_frame_size(self.cfg.max_frame_size)
            .max_send_buffer_size(self.cfg.send_buffer as usize)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|error| HboneError::H2 { addr, error })?;
        let closed = Arc::new(AtomicBool::new(false));
        let window = Window::new(bounds);
        let peer_max = Arc::new(AtomicUsize::new(usize::MAX));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let mut connection = connection;
        if let Some(ping) = connection.ping_pong() {
            tokio::spawn(keepalive(ping, window.clone(), closed.clone(), id));
        }
        let (done, max, resize) = (closed.clone(), peer_max.clone(), window.clone());
        tokio::spawn(async move {
            // Drive the connection, tracking the peer's SETTINGS_MAX_CONCURRENT_STREAMS so the
            // pool never queues flows behind a limit the peer imposes, and putting in force the
            // stream windows its flows' progress asks for.
            let result = poll_fn(|cx| {
                if let Some(w) = &resize {
                    if w.poll_resize(cx).is_ready() {
                        w.apply(|n| connection.set_initial_window_size(n));
                    }
                }
                let r = Pin::new(&mut connection).poll(cx);
                max.store(connection.max_concurrent_send_streams(), Ordering::Relaxed);
                r
            })
            .await;
            if let Err(error) = result {
                tracing::debug!(conn = id, %addr, %error, "HBONE connection ended with an error");
            }
            done.store(true, Ordering::Release);
        });
        tracing::debug!(conn = id, %addr, src = %key.src_identity, "HBONE connection established");
        Ok(Arc::new(Conn {
            id,
            sender,
            peer_identity,
            active: AtomicUsize::new(1),
            peer_max,
            closed,
            window,
            idle_since: Mutex::new(Instant::now()),
            worker: crate::workers::current(),
        }))
    }

    /// Drops closed connections and those idle longer than the idle timeout.
    fn reap(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let idle = self.cfg.idle_timeout;
        for list in conns.values_mut() {
            list.retain(|c| {
                let unused = c.active.load(Ordering::Acquire) == 0;
                let stale = unused
                    && c.idle_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .elapsed()
                        >= idle;
                !(c.closed.load(Ordering::Acquire) || stale)
            });
        }
        conns.retain(|_, l| !l.is_empty());
        self.dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, lock| Arc::strong_count(lock) > 1 || conns.contains_key(k));
    }
}

/// What choosing a pooled connection looks at.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// The worker driving the connection.
    worker: Option<usize>,
    /// Flows on it.
    active: usize,
    /// Flows it may carry (`--hbone-max-streams` or the peer's limit, the lower).
    max: usize,
}

/// Which of a key's connections a new flow on worker `here` takes (an index), or `None` to
/// dial a new one on `here`. In order: an unused connection that `here` drives; none, while
/// the key has fewer than `spread` connections; any unused one; the one with the fewest flows
/// that has room, `here`'s first among equals. Flows that run at the same time get connections
/// of their own first because one connection is one byte stream: a request sharing it with a
/// bulk transfer waits behind everything the transfer has queued (milliseconds,
/// docs/BENCHMARKS.md "A request next to a bulk transfer"). And a flow on a connection driven
/// by another worker costs both threads a wake-up per chunk.
fn pick(conns: &[Candidate], here: Option<usize>, spread: usize) -> Option<usize> {
    let unused = |c: &Candidate| c.active == 0 && c.max > 0;
    if let Some(i) = conns.iter().position(|c| c.worker == here && unused(c)) {
        return Some(i);
    }
    if conns.len() < spread {
        return None;
    }
    if let Some(i) = conns.iter().position(unused) {
        return Some(i);
    }
    conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.active < c.max)
        .min_by_key(|(_, c)| (c.active, c.worker != here))
        .map(|(i, _)| i)
}

/// Pings the connection (keepalive; an idle one's adaptive `window` returns to its start);
/// one unanswered ping marks it closed so no new flow is put on a connection whose peer or
/// path has died.
async fn keepalive(
    ping: h2::PingPong,
    window: Option<Arc<Window>>,
    closed: Arc<AtomicBool>,
    id: u64,
) {
    if pinger(ping, window, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT).await == Ended::Silent {
        tracing::info!(
            conn = id,
            "HBONE keepalive failed; connection dropped from the pool"
        );
    }
    closed.store(true, Ordering::Release);
}

async fn send_connect(
    conn: &Conn,
    key: &PoolKey,
    req: &ConnectRequest,
) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
    let addr = key.dst;
    let h2err = |error| HboneError::H2 { addr, error };
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .header(FORWARDED, format!("for=\"{}\"", req.client))
        .header(BAGGAGE, &req.baggage)
        .header(TRACEPARENT, traceparent())
        .body(())
        .map_err(|e| HboneError::Connect {
            addr,
            error: std::io::Error::other(e),
        })?;
    let mut sender = conn.sender.clone().ready().await.map_err(h2err)?;
    let (response, send) = sender.send_request(request, false).map_err(h2err)?;
    let response = response.await.map_err(h2err)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status {
            addr,
            authority: req.authority,
            status: response.status(),
        });
    }
    Ok((send, response.into_body()))
}

/// A fresh W3C trace context (sampled flag off): enough for a downstream tracer to join.
///
/// The IDs need to be unique, not secret: they come from a keyed hash (SipHash, keys drawn
/// once per thread from the OS) of a per-thread counter, so a new flow costs no `getrandom`
/// syscall, as drawing from the system's secure random source did.
fn traceparent() -> String {
    use std::cell::Cell;
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static IDS: (RandomState, Cell<u64>) = (RandomState::new(), Cell::new(0));
    }
    let [trace_hi, trace_lo, span] = IDS.with(|(keys, counter)| {
        [0, 1, 2].map(|_| {
            let n = counter.get();
            counter.set(n.wrapping_add(1));
            // All-zero IDs are invalid; the odds are 2^-64, the guard costs nothing.
            keys.hash_one(n).max(1)
        })
    });
    format!("00-{trace_hi:016x}{trace_lo:016x}-{span:016x}-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trace context has the W3C shape and a new trace ID per flow.
    #[test]
    fn each_flow_gets_a_well_formed_new_trace_context() {
        let (a, b) = (traceparent(), traceparent());
        for t in [&a, &b] {
            let parts: Vec<&str> = t.split('-').collect();
            assert_eq!(parts.len(), 4, "{t}");
            assert_eq!((parts[0], parts[3]), ("00", "00"), "{t}");
            assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{t}");
            assert!(t.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{t}");
        }
        assert_ne!(a[3..35], b[3..35], "trace IDs repeat");
    }

    fn conn(worker: usize, active: usize) -> Candidate {
        Candidate {
            worker: Some(worker),
            active,
            max: 100,
        }
    }

    #[test]
    fn an_unused_connection_of_the_own_worker_comes_first() {
        let conns = [conn(1, 0), conn(0, 3), conn(0, 0)];
        assert_eq!(pick(&conns, Some(0), 4), Some(2));
    }

    #[test]
    fn below_the_spread_a_flow_dials_on_its_worker_rather_than_cross_to_another() {
        let conns = [conn(1, 0), conn(0, 1)];
        assert_eq!(pick(&conns, Some(0), 4), None);
        assert_eq!(pick(&[], Some(0), 4), None);
    }

    #[test]
    fn at_the_spread_any_unused_connection_then_the_least_busy_own_first() {
        let unused_elsewhere = [conn(0, 1), conn(1, 0), conn(0, 2), conn(1, 1)];
        assert_eq!(pick(&unused_elsewhere, Some(0), 4), Some(1));
        let all_busy = [conn(1, 1), conn(0, 2), conn(0, 1), conn(1, 3)];
        assert_eq!(pick(&all_busy, Some(0), 4), Some(2));
        assert_eq!(pick(&all_busy, Some(1), 4), Some(0));
    }

    #[test]
    fn full_connections_are_never_chosen() {
        let full = Candidate {
            worker: Some(0),
            active: 4,
            max: 4,
        };
        let refused = Candidate {
            worker: Some(0),
            active: 0,
            max: 0,
        };
        assert_eq!(pick(&[full, refused], Some(0), 1), None);
        assert_eq!(pick(&[full, conn(1, 7)], Some(0), 2), Some(1));
    }
}
