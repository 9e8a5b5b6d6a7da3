//! The flows: outbound capture (15001), inbound HBONE (15008) and inbound plaintext (15006).
//!
//! Every flow looks up the current [`State`] snapshot once at its start, so a flow never sees
//! two different views of the mesh.

pub mod connections;
mod inbound;
mod outbound;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Config;
use crate::drain::Drain;
use crate::hbone::client::Pool;
use crate::hbone::{reset_on_close, Transferred};
use crate::identity::SpiffeId;
use crate::state::{Service, State, Workload};
use crate::telemetry::metrics::ConnInfo;
use crate::telemetry::{ByteSink, ConnLabels, ConnMeter, Metrics};
use crate::workers::Workers;

/// Shared context of all flows.
#[derive(Debug)]
pub struct Proxy {
    cfg: Arc<Config>,
    state: watch::Receiver<Arc<State>>,
    pool: Pool,
    metrics: Arc<Metrics>,
    drain: Drain,
    connections: Arc<connections::Connections>,
    workers: Arc<Workers>,
}

impl Proxy {
    /// A proxy reading state from `state`, counting into `metrics`, stopping on `drain`,
    /// serving flows on `workers`.
    pub fn new(
        cfg: Arc<Config>,
        state: watch::Receiver<Arc<State>>,
        pool: Pool,
        metrics: Arc<Metrics>,
        drain: Drain,
        workers: Arc<Workers>,
    ) -> Arc<Self> {
        Arc::new(Proxy {
            cfg,
            state,
            pool,
            metrics,
            drain,
            connections: Arc::default(),
            workers,
        })
    }

    /// Drain state, for the HBONE server's streams.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Re-checks open inbound flows against `state` (after a state change) and closes those
    /// the new policies deny.
    pub fn recheck_connections(&self, state: &State) {
        let n = self.connections.recheck(state, &self.cfg.root_namespace);
        if n > 0 {
            tracing::info!(
                closed = n,
                generation = state.generation,
                "connections re-checked"
            );
        }
    }

    fn snapshot(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// A workload on this node that is in the mesh.
    fn local_enrolled(&self, state: &State, ip: std::net::IpAddr) -> Option<Arc<Workload>> {
        state
            .workload(ip)
            .filter(|w| w.enrolled && w.node == self.cfg.node_name)
            .cloned()
    }

    /// Runs an accept loop, handing each connection to `handle` on the least busy data-plane
    /// worker; the flow counts for the drain until `handle` returns.
    async fn accept_loop<F, Fut>(
        self: Arc<Self>,
        listener: TcpListener,
        name: &'static str,
        handle: F,
    ) where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        // The flow's future is made inside the async block, not moved into it: a future moved
        // in and then awaited is stored twice in the task (about 5 KiB more per held
        // connection, `bench conns`).
        let serve = move |tcp, peer, guard| {
            let (this, handle) = (this.clone(), handle.clone());
            async move {
                handle(this, tcp, peer).await;
                drop(guard);
            }
        };
        self.workers
            .accept_loop(listener, name, &self.drain, serve)
            .await
    }

    /// Serves outbound captured connections.
    pub async fn run_outbound(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(listener, "outbound", |p, tcp, peer| p.outbound(tcp, peer))
            .await
    }

    /// Serves inbound plaintext captured connections.
    pub async fn run_inbound_plaintext(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(listener, "inbound_plaintext", |p, tcp, peer| {
            p.inbound_plaintext(tcp, peer)
        })
        .await
    }

    /// The data-plane workers, for the HBONE server's connections.
    pub fn workers(&self) -> &Workers {
        &self.workers
    }
}

/// Copies both ways between two TCP sockets (`a` is the side [`Transferred::to_tunnel`] is
/// read from), reporting bytes to `sink` as they move. A clean EOF half-closes the other side;
/// an error on either side resets both.
async fn splice_plain(
    mut a: TcpStream,
    mut b: TcpStream,
    sink: &ByteSink,
) -> (Transferred, Option<io::Error>) {
    let mut bytes = Transferred::default();
    let err = {
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let up = copy_counted(&mut ar, &mut bw, &mut bytes.to_tunnel, |n| {
            sink.to_tunnel(n)
        });
        let down = copy_counted(&mut br, &mut aw, &mut bytes.from_tunnel, |n| {
            sink.from_tunnel(n)
        });
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut up => match r { Ok(()) => (&mut down).await.err(), Err(e) => Some(e) },
            r = &mut down => match r { Ok(()) => (&mut up).await.err(), Err(e) => Some(e) },
        }
    };
    if err.is_some() {
        reset_on_close(&a);
        reset_on_close(&b);
    }
    (bytes, err)
}

/// One direction of a plain splice: read, write all, count, until EOF; then half-close.
async fn copy_counted<R, W>(
    rd: R,
    wr: &mut W,
    total: &mut u64,
    count: impl Fn(usize),
) -> io::Result<()>
where
    R: crate::burst::Readable,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut reader = crate::burst::BurstReader::new(rd);
    while let Some(chunk) = reader.next().await? {
        wr.write_all(&chunk).await?;
        *total += chunk.len() as u64;
        count(chunk.len());
    }
    wr.shutdown().await
}

/// One connection's telemetry: its metric labels and the access-log line written when it
/// closes (the `access` message operators and tests read). Byte counts follow Istio:
/// `bytes_received` came from the client, `bytes_sent` went to it.
#[derive(Debug, Clone)]
struct Access<'a> {
    reporter: &'static str,
    protocol: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    src_workload: Option<&'a Workload>,
    dst_workload: Option<&'a Workload>,
    src_identity: Option<&'a SpiffeId>,
    dst_identity: Option<&'a SpiffeId>,
    /// The service dialled (VIP) or, when `None`, the first service selecting the destination.
    service: Option<&'a Service>,
    start: Instant,
    /// Why authorization refused or revoked the flow.
    deny_reason: Option<String>,
}

impl Access<'_> {
    fn labels(&self, p: &Proxy, state: &State, flags: &'static str) -> ConnLabels {
        let service = self.service.or_else(|| {
            self.dst_workload
                .and_then(|w| state.service_of(w.ip))
                .map(|s| &**s)
        });
        ConnLabels::new(&ConnInfo {
            reporter: self.reporter,
            src: self.src_workload,
            src_identity: self.src_identity,
            dst: self.dst_workload,
            dst_identity: self.dst_identity,
            service,
            cluster_domain: &p.cfg.cluster_domain,
            mtls: self.protocol == "HBONE",
            flags,
        })
    }

    /// Counts the connection as opened; bytes go to the returned meter as they move.
    fn open(&self, p: &Proxy, state: &State) -> ConnMeter {
        p.metrics.open(&self.labels(p, state, "-"))
    }

    /// A connection that ended before data could flow (no route, upstream failure, denied):
    /// counted opened and closed with `flags`, and logged with the reason.
    fn refuse(&self, p: &Proxy, state: &State, flags: &'static str, error: &dyn std::fmt::Display) {
        drop(p.metrics.open(&self.labels(p, state, flags)));
        self.emit(flags, Transferred::default(), Some(error));
    }

    /// A connection that carried data has closed.
    fn close(&self, meter: ConnMeter, bytes: Transferred, error: Option<&dyn std::fmt::Display>) {
        // Count the close before the log line, so whoever reads the log sees the metric too.
        drop(meter);
        self.emit("-", bytes, error);
    }

    fn emit(&self, flags: &'static str, bytes: Transferred, error: Option<&dyn std::fmt::Display>) {
        let name = |w: Option<&Workload>| w.map(Workload::key).unwrap_or_default();
        let id = |i: Option<&SpiffeId>| i.map(ToString::to_string).unwrap_or_default();
        let error = error.map(ToString::to_string);
        tracing::info!(
            target: "access",
            reporter = self.reporter,
            protocol = self.protocol,
            src_addr = %self.src,
            dst_addr = %self.dst,
            src_workload = name(self.src_workload),
            dst_workload = name(self.dst_workload),
            src_identity = id(self.src_identity),
            dst_identity = id(self.dst_identity),
            bytes_received = bytes.to_tunnel,
            bytes_sent = bytes.from_tunnel,
            duration_ms = self.start.elapsed().as_millis() as u64,
            response_flags = flags,
            error,
            deny_reason = self.deny_reason.as_deref(),
            "access"
        );
    }
}

/// `baggage` with the source's Kubernetes names, as Istio peers expect.
fn baggage(w: &Workload, cluster: &str) -> String {
    format!(
        "k8s.cluster.name={cluster},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        w.namespace,
        w.name,
        w.labels
            .get("app")
            .or_else(|| w.labels.get("app.kubernetes.io/name"))
            .map(String::as_str)
            .unwrap_or(&w.name),
        w.labels
            .get("version")
            .map(String::as_str)
            .unwrap_or("latest"),
    )
}
