//! The flows: outbound capture (15001), inbound HBONE (15008) and inbound plaintext (15006).
//!
//! Every flow looks up the current [`State`] snapshot once at its start, so a flow never sees
//! two different views of the mesh.

pub mod connections;
mod inbound;
mod outbound;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Config;
use crate::hbone::client::Pool;
use crate::hbone::{reset_on_close, Transferred};
use crate::identity::SpiffeId;
use crate::state::{State, Workload};

/// Buffer per direction for plain TCP splices.
const PLAIN_BUF: usize = 256 * 1024;

/// Shared context of all flows.
#[derive(Debug)]
pub struct Proxy {
    cfg: Arc<Config>,
    state: watch::Receiver<Arc<State>>,
    pool: Pool,
    connections: Arc<connections::Connections>,
}

impl Proxy {
    /// A proxy reading state from `state`.
    pub fn new(cfg: Arc<Config>, state: watch::Receiver<Arc<State>>, pool: Pool) -> Arc<Self> {
        Arc::new(Proxy {
            cfg,
            state,
            pool,
            connections: Arc::default(),
        })
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

    /// Runs an accept loop, handing each connection to `handle`.
    pub async fn accept_loop<F, Fut>(
        self: Arc<Self>,
        listener: TcpListener,
        name: &'static str,
        handle: F,
    ) where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(handle(self.clone(), tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
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
}

/// Copies both ways between two TCP sockets; on error both are reset.
async fn splice_plain(mut a: TcpStream, mut b: TcpStream) -> (Transferred, Option<std::io::Error>) {
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, PLAIN_BUF, PLAIN_BUF).await {
        Ok((up, down)) => (
            Transferred {
                to_tunnel: up,
                from_tunnel: down,
            },
            None,
        ),
        Err(e) => {
            reset_on_close(&a);
            reset_on_close(&b);
            (Transferred::default(), Some(e))
        }
    }
}

/// One access-log line per closed connection (the `access` message operators and tests read).
/// Byte counts follow Istio: `bytes_received` came from the client, `bytes_sent` went to it.
#[derive(Debug)]
struct Access<'a> {
    reporter: &'static str,
    protocol: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    src_workload: Option<&'a Workload>,
    dst_workload: Option<&'a Workload>,
    src_identity: Option<&'a SpiffeId>,
    dst_identity: Option<&'a SpiffeId>,
    start: Instant,
    /// Why authorization refused or revoked the flow.
    deny_reason: Option<String>,
}

impl Access<'_> {
    fn log(&self, bytes: Transferred, error: Option<&dyn std::fmt::Display>) {
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
