//! Inbound: flows arriving for a pod of this node.
//!
//! - HBONE (15008): the client identity comes from its certificate; [`route::inbound_hbone`]
//!   checks the `:authority` (a local enrolled pod, the one whose certificate was presented,
//!   not one of the daemon's own ports).
//! - plaintext (15006): a non-mesh source; no identity.
//! - same node: an enrolled pod to an enrolled pod of this node is handed over in-process
//!   (both identities are known to this daemon first-hand, so nothing is gained by a TLS
//!   round trip through loopback; Istio's ztunnel takes the same shortcut).
//!
//! Every last hop into the pod uses the client's IP as source, so the app sees its real peer.
//!
//! Every flow is authorized here, at the destination ([`crate::authz`]): a denied HBONE stream
//! is answered 401, a denied plaintext or same-node connection is reset. Each admitted flow is
//! registered in [`super::connections`] so a policy change can close it later.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::connections::{FlowAttrs, Registration};
use super::route;
use super::{closed, original_destination, reported_service, FlowError, Proxy, Refuse};
use crate::hbone::server::{Handler, InboundRequest, Responder};
use crate::identity::SpiffeId;
use crate::socket::Leg;
use crate::splice;
use crate::telemetry::{FlowReport, Protocol, Reporter};

impl Handler for Proxy {
    fn identity_for(&self, local: SocketAddr) -> Option<SpiffeId> {
        let state = self.snapshot();
        self.node
            .local_enrolled(&state, local.ip())
            .map(|w| (*w.identity).clone())
    }

    fn serve(
        self: Arc<Self>,
        req: InboundRequest,
        responder: Responder,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move { self.inbound_hbone(req, responder).await })
    }
}

impl Proxy {
    async fn inbound_hbone(&self, req: InboundRequest, responder: Responder) {
        let start = Instant::now();
        let state = self.snapshot();
        let dst_w = self.node.local_enrolled(&state, req.authority.ip());
        let src_w = state.workload(req.peer.ip()).cloned();
        let report = FlowReport {
            reporter: Reporter::Destination,
            protocol: Protocol::Hbone,
            src: req.peer,
            dst: req.authority,
            src_workload: src_w.as_deref(),
            dst_workload: dst_w.as_deref(),
            src_identity: Some(&req.peer_identity),
            dst_identity: dst_w.as_ref().map(|w| &*w.identity),
            service: reported_service(&state, None, dst_w.as_deref()),
            waypoint: None,
            start,
        };
        if let Err(e) = route::inbound_hbone(&state, &self.node, req.local, req.authority) {
            return self.refuse(&[&report], &e, Refuse::Stream(responder));
        }
        let (mut reg, verdict) = self.authorize(FlowAttrs {
            src: req.peer,
            src_identity: Some(req.peer_identity.clone()),
            dst: req.authority,
            plaintext: false,
        });
        if let Err(e) = verdict {
            return self.refuse(&[&report], &e, Refuse::Stream(responder));
        }
        let pod = match self.dial_pod(req.peer, req.authority).await {
            Ok(p) => p,
            Err(e) => return self.refuse(&[&report], &e, Refuse::Stream(responder)),
        };
        let window = responder.window.clone();
        let (send, recv) = match responder.accept() {
            Ok(halves) => halves,
            Err(e) => return self.refuse(&[&report], &FlowError::Accept(e), Refuse::Gone),
        };
        let meter = report.open(&self.metrics);
        let sink = meter.server_side();
        let abort = reg.abort();
        let (bytes, err) = splice::hbone(pod, send, recv, window.as_deref(), &sink, abort).await;
        // The socket side here is the server: what it sent went to the client.
        closed(&[&report], [meter], bytes.reversed(), err);
    }

    /// Serves one captured plaintext connection from `src` to its end.
    pub async fn inbound_plaintext(&self, tcp: TcpStream, src: SocketAddr) {
        if let Some(dst) = original_destination(&tcp, src, "inbound plaintext") {
            self.inbound_plaintext_to(tcp, src, dst).await
        }
    }

    /// Serves a plaintext connection from `src` that was addressed to the pod at `dst`.
    pub(super) async fn inbound_plaintext_to(
        &self,
        tcp: TcpStream,
        src: SocketAddr,
        dst: SocketAddr,
    ) {
        let start = Instant::now();
        let state = self.snapshot();
        let dst_w = self.node.local_enrolled(&state, dst.ip());
        let src_w = state.workload(src.ip()).cloned();
        let report = FlowReport {
            reporter: Reporter::Destination,
            protocol: Protocol::Tcp,
            src,
            dst,
            src_workload: src_w.as_deref(),
            dst_workload: dst_w.as_deref(),
            src_identity: None,
            dst_identity: dst_w.as_ref().map(|w| &*w.identity),
            service: reported_service(&state, None, dst_w.as_deref()),
            waypoint: None,
            start,
        };
        if let Err(e) = route::inbound_plaintext(&state, &self.node, dst) {
            return self.refuse(&[&report], &e, Refuse::Reset(&tcp));
        }
        let (reg, verdict) = self.authorize(FlowAttrs {
            src,
            src_identity: None,
            dst,
            plaintext: true,
        });
        if let Err(e) = verdict {
            return self.refuse(&[&report], &e, Refuse::Reset(&tcp));
        }
        self.to_pod(tcp, &[&report], reg).await;
    }

    /// Same-node mesh flow: from the outbound side straight to the destination pod, counted
    /// and logged for both reporters (`source` is the outbound side's report).
    pub(super) async fn same_node(&self, tcp: TcpStream, source: &FlowReport<'_>) {
        let destination = FlowReport {
            reporter: Reporter::Destination,
            ..*source
        };
        let reports = [&destination, source];
        // Both identities are known first-hand: the source pod is on this node.
        let (reg, verdict) = self.authorize(FlowAttrs {
            src: source.src,
            src_identity: source.src_identity.cloned(),
            dst: source.dst,
            plaintext: false,
        });
        if let Err(e) = verdict {
            return self.refuse(&reports, &e, Refuse::Reset(&tcp));
        }
        self.to_pod(tcp, &reports, reg).await;
    }

    /// Registers the flow, then decides it on the current state (taken after registering, so a
    /// policy change is either seen here or re-checked on the registered flow). Logs dry-run
    /// outcomes and audits; a flow whose destination is no longer an enrolled pod has nothing
    /// to enforce and goes on.
    fn authorize(&self, attrs: FlowAttrs) -> (Registration, Result<(), FlowError>) {
        let reg = self.connections.register(attrs.clone());
        let state = self.snapshot();
        let Some(d) = attrs.decide(&state, &self.root_namespace) else {
            return (reg, Ok(()));
        };
        if let Some((verdict, reason)) = &d.dry_run {
            tracing::info!(
                src_addr = %attrs.src,
                dst_addr = %attrs.dst,
                enforced = %d.verdict,
                dry_run = %verdict,
                policy = reason.policy().unwrap_or(""),
                reason = %reason,
                "dry-run policy would change the decision (not enforced)"
            );
        }
        for policy in &d.audited {
            tracing::info!(src_addr = %attrs.src, dst_addr = %attrs.dst, %policy, "authorization audit");
        }
        let verdict = if d.allowed() {
            Ok(())
        } else {
            Err(FlowError::Denied(d.reason))
        };
        (reg, verdict)
    }

    /// Connects to the pod from the client's IP and splices until both sides are done or a
    /// policy change revokes the flow; counts and logs the flow for every reporter in `reports`
    /// (the destination, and for same-node flows also the source).
    async fn to_pod(&self, tcp: TcpStream, reports: &[&FlowReport<'_>], mut reg: Registration) {
        let Some(first) = reports.first() else { return };
        let pod = match self.dial_pod(first.src, first.dst).await {
            Ok(pod) => pod,
            Err(e) => return self.refuse(reports, &e, Refuse::Reset(&tcp)),
        };
        let meters: Vec<_> = reports.iter().map(|r| r.open(&self.metrics)).collect();
        let sink = meters
            .iter()
            .map(|m| m.client_side())
            .reduce(|a, b| a.join(b))
            .unwrap_or_default();
        let (bytes, err) = splice::plain(tcp, pod, &sink, reg.abort()).await;
        closed(reports, meters, bytes, err);
    }

    /// The last hop into a local pod, from the client's own IP.
    async fn dial_pod(&self, client: SocketAddr, pod: SocketAddr) -> Result<TcpStream, FlowError> {
        Ok(self
            .sockets
            .connect(Leg::Pod, Some(client.ip()), pod)
            .await?)
    }
}
