//! Metrics (15020): `/metrics` and `/stats/prometheus`, Prometheus text format. Gauges that
//! mirror other modules' state (pool, capture, certificates, worker loads) are refreshed on
//! each scrape rather than kept current.

use std::sync::Arc;

use tokio::sync::watch;

use super::{read_only, CaptureView, Reply, Request};
use crate::hbone::client::Pool;
use crate::identity::CertManager;
use crate::state::State;
use crate::telemetry::metrics::{gauge, Metrics, CONTENT_TYPE};
use crate::workers::Workers;

/// What a scrape reads.
#[derive(Debug)]
pub struct MetricsRoutes {
    /// The registry, encoded on each scrape.
    pub metrics: Arc<Metrics>,
    /// Certificate expiry gauges.
    pub certs: Arc<CertManager>,
    /// HBONE pool gauges.
    pub pool: Pool,
    /// Capture gauges.
    pub capture: Arc<CaptureView>,
    /// Per-worker connection gauges.
    pub workers: Arc<Workers>,
    /// The latest state: its invalid policies (`ztunnel_policies_invalid`).
    pub state: watch::Receiver<Arc<State>>,
}

impl MetricsRoutes {
    /// Answers a request.
    pub fn route(&self, req: &Request<'_>) -> Reply {
        match req.path {
            "/metrics" | "/stats/prometheus" => read_only(req, || {
                self.refresh_gauges();
                Reply::new(200, CONTENT_TYPE, self.metrics.encode())
            }),
            _ => Reply::not_found(),
        }
    }

    fn refresh_gauges(&self) {
        let m = &self.metrics;
        let stats = self.pool.stats();
        m.pool_connections.set(gauge(stats.connections));
        m.pool_streams.set(gauge(stats.streams));
        let capture = self.capture.snapshot();
        m.capture_enrolled_pods.set(gauge(capture.enrolled_pods));
        m.capture_attached_programs
            .set(gauge(capture.interfaces.len()));
        let captured = capture.pods.iter().filter(|p| p.captured).count();
        m.set_capture_pods(captured, capture.pods.len() - captured);
        m.set_capture_drops(&[
            ("spoofed_source", capture.drops.spoofed_source),
            ("no_daemon", capture.drops.no_daemon),
            ("ipv6_extension_header", capture.drops.ipv6_extension_header),
        ]);
        m.set_certificates(&self.certs.snapshot());
        m.set_worker_loads(&self.workers.loads());
        m.set_heap(crate::memory::heap());
        m.set_invalid_policies(&self.state.borrow().authz.invalid_counts());
    }
}
