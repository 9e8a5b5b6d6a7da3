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

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tokio::net::TcpStream;

use super::{splice_plain, Access, Proxy};
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
                let (bytes, err) = hbone::splice(pod, send, recv, &meter.server_side()).await;
                // The socket side here is the server: what it sent went to the client.
                let bytes = Transferred {
                    to_tunnel: bytes.from_tunnel,
                    from_tunnel: bytes.to_tunnel,
                };
                access.close(meter, bytes, err.as_ref().map(|e| e as _));
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
        let access = Access {
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
        match self.dial_pod(src, dst).await {
            Ok(pod) => {
                let meter = access.open(&self, &state);
                let (bytes, err) = splice_plain(tcp, pod, &meter.client_side()).await;
                access.close(meter, bytes, err.as_ref().map(|e| e as _));
            }
            Err(e) => {
                reset_on_close(&tcp);
                access.refuse(&self, &state, "UF", &e);
            }
        }
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
        let access = Access {
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
        };
        let source = Access {
            reporter: "source",
            ..access
        };
        match self.dial_pod(src, dst).await {
            Ok(pod) => {
                let (m_dst, m_src) = (access.open(&self, &state), source.open(&self, &state));
                let sink = m_dst.client_side().join(m_src.client_side());
                let (bytes, err) = splice_plain(tcp, pod, &sink).await;
                let err = err.as_ref().map(|e| e as _);
                access.close(m_dst, bytes, err);
                source.close(m_src, bytes, err);
            }
            Err(e) => {
                reset_on_close(&tcp);
                access.refuse(&self, &state, "UF", &e);
                source.refuse(&self, &state, "UF", &e);
            }
        }
    }

    /// The last hop into a local pod, from the client's own IP.
    async fn dial_pod(&self, client: SocketAddr, pod: SocketAddr) -> std::io::Result<TcpStream> {
        socket::connect(
            Some(client.ip()),
            pod,
            self.cfg.daemon_mark,
            self.cfg.hbone.connect_timeout,
        )
        .await
    }
}
