//! Inbound: flows arriving for a pod of this node.
//!
//! - HBONE (15008): the client identity comes from its certificate; the `:authority` must be
//!   the pod the connection was addressed to (the pod whose certificate was presented), or
//!   the request is refused with 400, so one pod's certificate can never open a flow to another.
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
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tokio::net::TcpStream;

use super::connections::{dup, FlowAttrs, Registration};
use super::{splice_plain, Access, Proxy};
use crate::authz::Decision;
use crate::hbone::server::{Handler, InboundRequest, Responder};
use crate::hbone::{self, reset_on_close, Transferred};
use crate::identity::SpiffeId;
use crate::socket;
use crate::state::{Service, State, Workload};

impl Handler for Proxy {
    fn identity_for(&self, local: SocketAddr) -> Option<SpiffeId> {
        let state = self.snapshot();
        self.local_enrolled(&state, local.ip())
            .map(|w| w.identity.clone())
    }

    fn drain(&self) -> &crate::drain::Drain {
        Proxy::drain(self)
    }

    fn workers(&self) -> &crate::workers::Workers {
        Proxy::workers(self)
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
        let dst_w = self.local_enrolled(&state, req.authority.ip());
        let src_w = state.workload(req.peer.ip()).cloned();
        let mut access = Access {
            reporter: "destination",
            protocol: "HBONE",
            src: req.peer,
            dst: req.authority,
            src_workload: src_w.as_deref(),
            dst_workload: dst_w.as_deref(),
            src_identity: Some(&req.peer_identity),
            dst_identity: None,
            service: None,
            start,
            deny_reason: None,
        };
        let Some(dst_w) = dst_w.as_deref() else {
            access.refuse(
                self,
                &state,
                "NR",
                &format!("503: {} is not an enrolled pod of this node", req.authority),
            );
            responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        };
        access.dst_identity = Some(&dst_w.identity);
        if req.authority.ip() != req.local.ip() {
            access.refuse(
                self,
                &state,
                "NR",
                &format!(
                    "400: authority {} does not match the connection's destination {}",
                    req.authority, req.local
                ),
            );
            responder.refuse(StatusCode::BAD_REQUEST);
            return;
        }
        let (mut reg, decision) = self.authorize(FlowAttrs {
            src: req.peer,
            src_identity: Some(req.peer_identity.clone()),
            dst: req.authority,
            plaintext: false,
        });
        if let Some(d) = decision.filter(|d| !d.allowed()) {
            access.deny_reason = Some(d.reason.to_string());
            access.refuse(self, &state, "DENY", &format!("401: {}", d.reason));
            responder.refuse(StatusCode::UNAUTHORIZED);
            return;
        }
        let pod = match self.dial_pod(req.peer, req.authority).await {
            Ok(p) => p,
            Err(e) => {
                access.refuse(self, &state, "UF", &format!("503: {e}"));
                responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
        match responder.accept() {
            Ok((send, recv)) => {
                let meter = access.open(self, &state);
                let sockets = dup(&pod).into_iter().collect();
                let sink = meter.server_side();
                let splice = pin!(hbone::splice(pod, send, recv, &sink));
                match reg.run(splice, sockets).await {
                    Ok((bytes, err)) => {
                        // The socket side here is the server: what it sent went to the client.
                        let bytes = Transferred {
                            to_tunnel: bytes.from_tunnel,
                            from_tunnel: bytes.to_tunnel,
                        };
                        access.close(meter, bytes, err.as_ref().map(|e| e as _));
                    }
                    Err(reason) => {
                        access.deny_reason = Some(reason.clone());
                        access.close(meter, Transferred::default(), Some(&reason));
                    }
                }
            }
            Err(e) => access.refuse(self, &state, "UF", &e),
        }
    }

    pub(super) async fn inbound_plaintext(self: Arc<Self>, tcp: TcpStream, src: SocketAddr) {
        let start = Instant::now();
        let dst = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%src, error = %e, "inbound plaintext: no original destination");
                return;
            }
        };
        let state = self.snapshot();
        let dst_w = self.local_enrolled(&state, dst.ip());
        let src_w = state.workload(src.ip()).cloned();
        let mut access = Access {
            reporter: "destination",
            protocol: "TCP",
            src,
            dst,
            src_workload: src_w.as_deref(),
            dst_workload: dst_w.as_deref(),
            src_identity: None,
            dst_identity: dst_w.as_ref().map(|w| &w.identity),
            service: None,
            start,
            deny_reason: None,
        };
        if dst_w.is_none() {
            access.refuse(
                &self,
                &state,
                "NR",
                &format!("{dst} is not an enrolled pod of this node"),
            );
            reset_on_close(&tcp);
            return;
        }
        let (reg, decision) = self.authorize(FlowAttrs {
            src,
            src_identity: None,
            dst,
            plaintext: true,
        });
        if let Some(d) = decision.filter(|d| !d.allowed()) {
            access.deny_reason = Some(d.reason.to_string());
            access.refuse(&self, &state, "DENY", &format!("reset: {}", d.reason));
            reset_on_close(&tcp);
            return;
        }
        self.to_pod(tcp, &state, &mut [&mut access], reg).await;
    }

    /// Same-node mesh flow: from the outbound side straight to the destination pod, counted
    /// and logged for both reporters.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn local(
        self: Arc<Self>,
        tcp: TcpStream,
        src: SocketAddr,
        src_w: &Workload,
        dst_w: &Workload,
        port: u16,
        service: Option<&Service>,
        start: Instant,
    ) {
        let state: Arc<State> = self.snapshot();
        let dst = SocketAddr::new(dst_w.ip, port);
        let mut access = Access {
            reporter: "destination",
            protocol: "HBONE",
            src,
            dst,
            src_workload: Some(src_w),
            dst_workload: Some(dst_w),
            src_identity: Some(&src_w.identity),
            dst_identity: Some(&dst_w.identity),
            service,
            start,
            deny_reason: None,
        };
        let mut source = Access {
            reporter: "source",
            deny_reason: None,
            ..access
        };
        // Both identities are known first-hand: the source pod is on this node.
        let (reg, decision) = self.authorize(FlowAttrs {
            src,
            src_identity: Some(src_w.identity.clone()),
            dst,
            plaintext: false,
        });
        if let Some(d) = decision.filter(|d| !d.allowed()) {
            reset_on_close(&tcp);
            let reason = format!("reset: {}", d.reason);
            for a in [&mut access, &mut source] {
                a.deny_reason = Some(d.reason.to_string());
                a.refuse(&self, &state, "DENY", &reason);
            }
            return;
        }
        self.to_pod(tcp, &state, &mut [&mut access, &mut source], reg)
            .await;
    }

    /// Registers the flow, then decides it on the current state (taken after registering, so a
    /// policy change is either seen here or re-checked on the registered flow). Logs denials,
    /// dry-run outcomes and audits. `None`: the destination is not an enrolled pod any more.
    fn authorize(&self, attrs: FlowAttrs) -> (Registration, Option<Decision>) {
        let reg = self.connections.register(attrs.clone());
        let state = self.snapshot();
        let decision = attrs.decide(&state, &self.cfg.root_namespace);
        if let Some(d) = &decision {
            if !d.allowed() {
                tracing::info!(
                    src_addr = %attrs.src,
                    dst_addr = %attrs.dst,
                    src_identity = attrs.src_identity.as_ref().map(ToString::to_string).unwrap_or_default(),
                    policy = d.reason.policy().unwrap_or(""),
                    reason = %d.reason,
                    response = if attrs.plaintext { "reset" } else { "401" },
                    "connection denied"
                );
            }
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
        }
        (reg, decision)
    }

    /// Connects to the pod from the client's IP and splices until both sides are done or a
    /// policy change revokes the flow; counts and logs the flow for every reporter in `reports`
    /// (the destination, and for same-node flows also the source).
    async fn to_pod(
        &self,
        tcp: TcpStream,
        state: &State,
        reports: &mut [&mut Access<'_>],
        mut reg: Registration,
    ) {
        let (src, dst) = (reports[0].src, reports[0].dst);
        let pod = match self.dial_pod(src, dst).await {
            Ok(pod) => pod,
            Err(e) => {
                reset_on_close(&tcp);
                for a in reports.iter() {
                    a.refuse(self, state, "UF", &e);
                }
                return;
            }
        };
        let meters: Vec<_> = reports.iter().map(|a| a.open(self, state)).collect();
        let sink = meters
            .iter()
            .map(|m| m.client_side())
            .reduce(|a, b| a.join(b))
            .unwrap_or_default();
        let sockets = [dup(&tcp), dup(&pod)].into_iter().flatten().collect();
        let splice = pin!(splice_plain(tcp, pod, &sink));
        let (bytes, err) = match reg.run(splice, sockets).await {
            Ok((bytes, err)) => (bytes, err.map(|e| e.to_string())),
            Err(reason) => {
                for a in reports.iter_mut() {
                    a.deny_reason = Some(reason.clone());
                }
                (Transferred::default(), Some(reason))
            }
        };
        for (a, m) in reports.iter().zip(meters) {
            a.close(m, bytes, err.as_ref().map(|e| e as _));
        }
    }

    /// The last hop into a local pod, from the client's own IP.
    async fn dial_pod(&self, client: SocketAddr, pod: SocketAddr) -> std::io::Result<TcpStream> {
        socket::connect(
            Some(client.ip()),
            pod,
            self.cfg.daemon_mark,
            self.cfg.pod_tcp_congestion.as_deref(),
            self.cfg.hbone.connect_timeout,
        )
        .await
    }
}
