//! The flows: outbound capture (15001), inbound HBONE (15008) and inbound plaintext (15006).
//!
//! Every flow runs the same pipeline:
//!
//! ```text
//! capture ──► route ──► connect ──► splice ──► report
//! (socket)   (route.rs,  (SocketFactory,  (crate::splice)  (FlowReport: metrics
//!             pure)       HBONE pool)                       and access log)
//! ```
//!
//! [`route`] decides from the [`State`] snapshot alone where the flow goes, or why it may not
//! (a [`FlowError`], which fixes the HBONE status and the response flag); the paths in
//! `outbound` and `inbound` then connect through the [`SocketFactory`], copy with
//! [`crate::splice`], and describe the flow once in a [`FlowReport`]. Every flow looks up the
//! current snapshot once at its start, so it never sees two different views of the mesh.

pub mod connections;
mod error;
mod inbound;
mod outbound;
pub mod route;

#[cfg(test)]
mod tests;

pub use error::{FlowError, Response};

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::drain::Drain;
use crate::hbone::client::Pool;
use crate::socket::{reset_on_close, SocketFactory};
use crate::splice::{self, Transferred};
use crate::state::{Service, State, Workload};
use crate::telemetry::{ConnMeter, Failure, FlowReport, Metrics};
use crate::workers::Workers;
use route::Node;

/// Shared context of all flows.
#[derive(Debug)]
pub struct Proxy {
    node: Node,
    /// Istio root namespace (mesh-wide policies).
    root_namespace: String,
    state: watch::Receiver<Arc<State>>,
    pool: Pool,
    sockets: Arc<dyn SocketFactory>,
    metrics: Arc<Metrics>,
    connections: Arc<connections::Connections>,
}

/// The captured listeners a [`Proxy`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captured {
    /// Connections leaving enrolled pods (15001).
    Outbound,
    /// Plaintext connections to enrolled pods (15006).
    InboundPlaintext,
}

/// How a refused client learns of it.
enum Refuse<'a> {
    /// A TCP client: reset its connection.
    Reset(&'a TcpStream),
    /// An HBONE client: answer the stream with the error's status.
    Stream(crate::hbone::server::Responder),
    /// Nobody left to tell (the stream broke while being answered).
    Gone,
}

impl Proxy {
    /// A proxy for `node` reading state from `state`, tunnelling through `pool`, connecting
    /// through `sockets`, counting into `metrics`.
    pub fn new(
        node: Node,
        root_namespace: &str,
        state: watch::Receiver<Arc<State>>,
        pool: Pool,
        sockets: Arc<dyn SocketFactory>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Proxy {
            node,
            root_namespace: root_namespace.to_string(),
            state,
            pool,
            sockets,
            metrics,
            connections: Arc::default(),
        })
    }

    /// Re-checks open inbound flows against `state` (after a state change) and closes those
    /// the new policies deny.
    pub fn recheck_connections(&self, state: &State) {
        let n = self.connections.recheck(state, &self.root_namespace);
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

    /// Serves a captured listener: each connection on the least busy data-plane worker, and
    /// counted for `drain` until its flow ends.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Captured,
        workers: Arc<Workers>,
        drain: Drain,
    ) {
        // One accept loop per kind, each with its own flow type: a task is sized for the
        // largest future it may run, so a task that could run either flow would be.
        match kind {
            Captured::Outbound => {
                let flow = |p: Arc<Self>, tcp, peer| async move { p.outbound(tcp, peer).await };
                self.accept(listener, "outbound", &workers, &drain, flow)
                    .await
            }
            Captured::InboundPlaintext => {
                let flow =
                    |p: Arc<Self>, tcp, peer| async move { p.inbound_plaintext(tcp, peer).await };
                self.accept(listener, "inbound_plaintext", &workers, &drain, flow)
                    .await
            }
        }
    }

    async fn accept<F, Fut>(
        self: Arc<Self>,
        listener: TcpListener,
        name: &'static str,
        workers: &Workers,
        drain: &Drain,
        flow: F,
    ) where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // The flow's future is made inside the async block, not moved into it: a future moved
        // in and then awaited is stored twice in the task (about 5 KiB more per held
        // connection, `bench conns`).
        let serve = move |tcp, peer, guard| {
            let (this, flow) = (self.clone(), flow.clone());
            async move {
                flow(this, tcp, peer).await;
                drop(guard);
            }
        };
        workers.accept_loop(listener, name, drain, serve).await
    }

    /// Refuses a flow: counted and logged for each of `reports` (a same-node flow reports
    /// for both ends), then the client is told.
    fn refuse(&self, reports: &[&FlowReport<'_>], err: &FlowError, to: Refuse<'_>) {
        let response = match to {
            Refuse::Reset(_) => Some(Response::Reset),
            Refuse::Stream(_) => Some(Response::Status(err.status())),
            Refuse::Gone => None,
        };
        if let (FlowError::Denied(reason), Some(r)) = (err, reports.first()) {
            tracing::info!(
                src_addr = %r.src,
                dst_addr = %r.dst,
                src_identity = r.src_identity.map(ToString::to_string).unwrap_or_default(),
                policy = reason.policy().unwrap_or(""),
                %reason,
                response = response.map(|r| r.to_string()),
                "connection denied"
            );
        }
        let error = match response {
            Some(response) => format!("{response}: {err}"),
            None => err.to_string(),
        };
        for r in reports {
            r.refused(
                &self.metrics,
                Failure {
                    flag: err.flag(),
                    error: &error,
                    deny_reason: err.deny_reason().map(|d| d as _),
                },
            );
        }
        match to {
            Refuse::Reset(tcp) => reset_on_close(tcp),
            Refuse::Stream(responder) => responder.refuse(err.status()),
            Refuse::Gone => {}
        }
    }
}

/// The original destination of a captured connection: capture assigns the SYN to the
/// listener without rewriting it, so it is the accepted socket's local address.
fn original_destination(tcp: &TcpStream, src: SocketAddr, path: &str) -> Option<SocketAddr> {
    match tcp.local_addr() {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(%src, error = %e, path, "no original destination");
            None
        }
    }
}

/// The service a flow reports: the one dialled, else the first selecting the destination pod.
fn reported_service<'a>(
    state: &'a State,
    dialled: Option<&'a Service>,
    dst: Option<&Workload>,
) -> Option<&'a Service> {
    dialled.or_else(|| state.service_of(dst?.ip).map(|s| &**s))
}

/// Counts and logs a finished splice for every reporter, each with its meter; a flow a policy
/// change revoked ([`splice::aborted`]) reports that as its deny reason too.
fn closed(
    reports: &[&FlowReport<'_>],
    meters: impl IntoIterator<Item = ConnMeter>,
    bytes: Transferred,
    err: Option<std::io::Error>,
) {
    let err = err.as_ref();
    let revoked = err.and_then(splice::aborted);
    for (r, m) in reports.iter().zip(meters) {
        r.closed(
            m,
            bytes,
            err.map(|e| e as _),
            revoked.as_ref().map(|e| e as _),
        );
    }
}
