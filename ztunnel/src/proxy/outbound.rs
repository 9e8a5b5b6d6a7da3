//! Outbound: a connection leaving an enrolled pod, captured to 15001.
//!
//! [`route::outbound`] decides where it goes; this file does the I/O. Every connection the
//! daemon makes for the flow keeps the source pod's IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::route::{self, HboneTarget, Outbound, Route};
use super::{closed, original_destination, reported_service, FlowError, Proxy, Refuse};
use crate::hbone::client::{ConnectRequest, PoolKey};
use crate::socket::{reset_on_close, Leg};
use crate::splice::{self, Abort};
use crate::state::{State, Workload};
use crate::telemetry::{FlowReport, Protocol, Reporter};

/// How long an outbound connection from a pod the state does not know yet (announced by the
/// CNI plugin, its object still on the way) is held before it is refused.
pub const SOURCE_WAIT: Duration = Duration::from_secs(10);

impl Proxy {
    /// Serves one captured outbound connection from `src` to its end.
    pub async fn outbound(&self, tcp: TcpStream, src: SocketAddr) {
        if let Some(orig_dst) = original_destination(&tcp, src, "outbound") {
            self.outbound_to(tcp, src, orig_dst).await
        }
    }

    /// Serves an outbound connection from `src` that was addressed to `orig_dst`.
    pub(super) async fn outbound_to(&self, tcp: TcpStream, src: SocketAddr, orig_dst: SocketAddr) {
        let start = Instant::now();
        let state = self.snapshot_knowing(src.ip()).await;
        let out = match route::outbound(&state, &self.node, src.ip(), orig_dst) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(%src, dst = %orig_dst, error = %e, "outbound connection refused");
                reset_on_close(&tcp);
                return;
            }
        };
        tracing::debug!(%src, dst = %orig_dst, reason = %out.reason, "outbound route");
        let (protocol, dst, dst_w) = match &out.route {
            Route::NoRoute(_) => (Protocol::Tcp, orig_dst, None),
            Route::Passthrough { workload, .. } => (Protocol::Tcp, orig_dst, workload.as_deref()),
            Route::SameNode { workload, port } => (
                Protocol::Hbone,
                SocketAddr::new(workload.dial_ip(orig_dst.ip()), *port),
                Some(&**workload),
            ),
            Route::Hbone(t) | Route::Waypoint { target: t, .. } => {
                (Protocol::Hbone, t.authority, Some(&*t.workload))
            }
        };
        // Handed to a waypoint, the flow reports the waypoint pod as its destination workload
        // (it is the peer proven) and the original destination's Service as its service.
        let (waypoint, service_of) = match &out.route {
            Route::Waypoint { waypoint, target } => (
                Some(&**waypoint),
                state.workload(target.authority.ip()).map(|w| &**w),
            ),
            _ => (None, dst_w),
        };
        let report = FlowReport {
            reporter: Reporter::Source,
            protocol,
            src,
            dst,
            src_workload: Some(&out.source),
            dst_workload: dst_w,
            src_identity: Some(&out.source.identity),
            // A mesh destination is known by its identity; a passthrough one is not.
            dst_identity: dst_w
                .filter(|_| protocol == Protocol::Hbone)
                .map(|w| &*w.identity),
            service: reported_service(&state, out.service.as_deref(), service_of),
            waypoint,
            start,
        };
        match &out.route {
            Route::NoRoute(e) => {
                let err = FlowError::NoRoute(e.clone());
                self.refuse(&[&report], &err, Refuse::Reset(&tcp));
            }
            Route::Passthrough { dst, .. } => self.passthrough(tcp, &report, *dst).await,
            Route::SameNode { .. } => self.same_node(tcp, &report).await,
            Route::Hbone(target) | Route::Waypoint { target, .. } => {
                self.via_hbone(tcp, &report, &out, target).await
            }
        }
    }

    /// The current state, once it knows the pod at `src`. A pod the CNI plugin announced is
    /// captured before its object reaches the state, and without it the daemon knows neither
    /// the pod's identity nor whether it is enrolled: its connection is held (the pod sees it
    /// established, nothing leaves the node) for up to [`SOURCE_WAIT`] until the state names
    /// it, then routed as usual; after that it is refused. Never sent in clear meanwhile.
    async fn snapshot_knowing(&self, src: IpAddr) -> Arc<State> {
        let state = self.snapshot();
        if state.workload(src).is_some() {
            return state;
        }
        tracing::debug!(%src, "outbound flow held until the state knows its source pod");
        let mut rx = self.state.clone();
        let known = rx.wait_for(|s| s.workload(src).is_some());
        let deadline = tokio::time::Instant::now() + SOURCE_WAIT;
        let _ = tokio::time::timeout_at(deadline, known).await;
        let state = self.snapshot();
        // The main task registers the pod's identity for certificates right after the state
        // change that named it; the flow may have woken first.
        if let Some(w) = state.workload(src).filter(|w| w.enrolled) {
            while !self.pool.manages_identity(&w.identity) && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        state
    }

    /// Plain TCP to a destination outside the mesh, from the pod's own IP.
    async fn passthrough(&self, tcp: TcpStream, report: &FlowReport<'_>, dst: SocketAddr) {
        // May leave the node: the node's congestion control.
        let upstream = match self
            .sockets
            .connect(Leg::Node, Some(report.src.ip()), dst)
            .await
        {
            Ok(u) => u,
            Err(e) => return self.refuse(&[report], &e.into(), Refuse::Reset(&tcp)),
        };
        let meter = report.open(&self.metrics);
        let (bytes, err) = splice::plain(tcp, upstream, &meter.client_side(), Abort::NEVER).await;
        closed(&[report], [meter], bytes, err);
    }

    async fn via_hbone(
        &self,
        tcp: TcpStream,
        report: &FlowReport<'_>,
        out: &Outbound,
        target: &HboneTarget,
    ) {
        let key = PoolKey {
            src_identity: (*out.source.identity).clone(),
            // The flow's own source: a dual-stack pod's IPv6 flow leaves from its IPv6 address.
            src_ip: report.src.ip(),
            dst_identities: target.identities.clone(),
            dst: target.connect,
        };
        let req = ConnectRequest {
            authority: target.authority,
            client: report.src,
            baggage: baggage(&out.source),
        };
        match self.pool.connect(&key, &req).await {
            Ok(flow) => {
                let meter = report.open(&self.metrics);
                let (bytes, err) = splice::hbone(
                    tcp,
                    flow.send,
                    flow.recv,
                    flow.window.as_deref(),
                    &meter.client_side(),
                    Abort::NEVER,
                )
                .await;
                closed(&[report], [meter], bytes, err);
            }
            Err(e) => self.refuse(&[report], &e.into(), Refuse::Reset(&tcp)),
        }
    }
}

/// Cluster name in `baggage` (Istio's default cluster ID).
const CLUSTER: &str = crate::telemetry::metrics::CLUSTER;

/// `baggage` with the source's Kubernetes names, as Istio peers expect.
fn baggage(w: &Workload) -> String {
    format!(
        "k8s.cluster.name={CLUSTER},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        w.namespace,
        w.name,
        w.canonical_app(),
        w.canonical_version(),
    )
}
