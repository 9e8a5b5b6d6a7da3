//! Outbound: a connection leaving an enrolled pod, captured to 15001.
//!
//! The original destination is the accepted socket's local address (the capture assigns the
//! SYN without rewriting it). A service VIP picks an endpoint and maps the port to its target
//! port; an enrolled destination on another node is reached over HBONE at `<pod ip>:15008`;
//! one on this node goes straight to the inbound side in-process; anything else passes
//! through unchanged. The source pod's IP is kept on every connection the daemon makes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::{baggage, splice_plain, Access, Proxy};
use crate::hbone::client::{ConnectRequest, PoolKey};
use crate::hbone::{self, reset_on_close};
use crate::socket;
use crate::state::{Destination, State, Workload};

impl Proxy {
    pub(super) async fn outbound(self: Arc<Self>, tcp: TcpStream, src: SocketAddr) {
        let start = Instant::now();
        let orig_dst = match tcp.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%src, error = %e, "outbound: no original destination");
                return;
            }
        };
        let state = self.snapshot();
        let Some(src_w) = self.local_enrolled(&state, src.ip()) else {
            // Capture only steers enrolled pods here; anything else is a stale map entry or a
            // direct connection to the port. Refuse rather than proxy for an unknown source.
            tracing::warn!(%src, dst = %orig_dst, "outbound connection from a source that is not an enrolled pod of this node; refused");
            reset_on_close(&tcp);
            return;
        };
        let mut access = Access {
            reporter: "source",
            protocol: "TCP",
            src,
            dst: orig_dst,
            src_workload: Some(&src_w),
            dst_workload: None,
            src_identity: Some(&src_w.identity),
            dst_identity: None,
            service: state.service_by_vip(orig_dst.ip()).map(|s| &**s),
            start,
            deny_reason: None,
        };
        let dest = match state.resolve(orig_dst) {
            Ok(d) => d,
            Err(e) => {
                access.refuse(&self, &state, "NR", &e);
                reset_on_close(&tcp);
                return;
            }
        };
        match dest {
            Destination::External(addr) => self.passthrough(tcp, &state, &access, addr).await,
            Destination::Workload(w, port) if !w.enrolled => {
                access.dst_workload = Some(&w);
                self.passthrough(tcp, &state, &access, SocketAddr::new(w.ip, port))
                    .await
            }
            Destination::Workload(w, port) if w.node == self.cfg.node_name => {
                let service = access.service;
                self.clone()
                    .local(tcp, src, &src_w, &w, port, service, start)
                    .await
            }
            Destination::Workload(w, port) => {
                access.protocol = "HBONE";
                access.dst = SocketAddr::new(w.ip, port);
                access.dst_workload = Some(&w);
                access.dst_identity = Some(&w.identity);
                self.via_hbone(tcp, &state, &access, &src_w, &w, port).await
            }
        }
    }

    /// Plain TCP to a destination outside the mesh, from the pod's own IP.
    async fn passthrough(
        &self,
        tcp: TcpStream,
        state: &State,
        access: &Access<'_>,
        dst: SocketAddr,
    ) {
        let upstream = match socket::connect(
            Some(access.src.ip()),
            dst,
            self.cfg.daemon_mark,
            None, // may leave the node: the node's congestion control
            self.cfg.hbone.connect_timeout,
        )
        .await
        {
            Ok(u) => u,
            Err(e) => {
                access.refuse(self, state, "UF", &e);
                reset_on_close(&tcp);
                return;
            }
        };
        let meter = access.open(self, state);
        let (bytes, err) = splice_plain(tcp, upstream, &meter.client_side()).await;
        access.close(meter, bytes, err.as_ref().map(|e| e as _));
    }

    async fn via_hbone(
        &self,
        tcp: TcpStream,
        state: &State,
        access: &Access<'_>,
        src_w: &Workload,
        dst_w: &Workload,
        port: u16,
    ) {
        let key = PoolKey {
            src_identity: src_w.identity.clone(),
            src_ip: src_w.ip,
            dst_identities: vec![dst_w.identity.clone()],
            dst: SocketAddr::new(dst_w.ip, self.cfg.ports.hbone),
        };
        let req = ConnectRequest {
            authority: SocketAddr::new(dst_w.ip, port),
            client: access.src,
            baggage: baggage(src_w, "Kubernetes"),
        };
        match self.pool.connect(&key, &req).await {
            Ok(flow) => {
                let meter = access.open(self, state);
                let (bytes, err) =
                    hbone::splice(tcp, flow.send, flow.recv, &meter.client_side()).await;
                access.close(meter, bytes, err.as_ref().map(|e| e as _));
            }
            Err(e) => {
                access.refuse(self, state, "UF", &e);
                reset_on_close(&tcp);
            }
        }
    }
}
