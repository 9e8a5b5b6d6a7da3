//! The waypoint's request metrics under Istio's names, so Istio's dashboards and Kiali read a
//! waypoint like any other L7 proxy: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes`,
//! in the shared `ztunnel::telemetry::Metrics` registry (served by [`crate::admin`]).
//!
//! The label set is the node daemon's TCP label set ([`ConnLabels`], built by the same
//! function, so a workload or Service is named identically in both) with `reporter="waypoint"`,
//! `request_protocol` `http` or `grpc`, and the response code added.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use ztunnel::telemetry::flow::FlowReport;
use ztunnel::telemetry::metrics::{ConnLabels, ResponseFlag};
use ztunnel::telemetry::Metrics;

/// Labels of one request series: the connection labels plus the response code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Istio's standard labels (source, destination, Service, flags, security policy).
    #[prometheus(flatten)]
    pub conn: ConnLabels,
    /// HTTP status sent to the client.
    pub response_code: u16,
}

/// Istio's buckets of `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Istio's buckets of the byte histograms: powers of ten from 1 to 10^8.
fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 10.0, 9))
}

/// The request families, registered once per process.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    cluster_domain: String,
}

impl RequestMetrics {
    /// Registers the families in `metrics`; Services are named in `cluster_domain`.
    pub fn new(metrics: &Metrics, cluster_domain: &str) -> Arc<RequestMetrics> {
        let m = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            cluster_domain: cluster_domain.to_string(),
        };
        metrics.register(|r| {
            r.register(
                "istio_requests",
                "Requests served by the waypoint",
                m.requests.clone(),
            );
            r.register(
                "istio_request_duration_milliseconds",
                "Request durations at the waypoint, until the response's last byte",
                m.duration.clone(),
            );
            r.register(
                "istio_request_bytes",
                "Request body sizes at the waypoint",
                m.request_bytes.clone(),
            );
            r.register(
                "istio_response_bytes",
                "Response body sizes at the waypoint",
                m.response_bytes.clone(),
            );
        });
        Arc::new(m)
    }

    /// The label set of a request `report` describes, answered with `code` and `flag`;
    /// `protocol` is `http` or `grpc`.
    pub fn labels(
        &self,
        report: &FlowReport<'_>,
        protocol: &'static str,
        code: u16,
        flag: ResponseFlag,
    ) -> RequestLabels {
        let mut conn = ConnLabels::new(report, flag, &self.cluster_domain);
        conn.request_protocol = protocol;
        RequestLabels {
            conn,
            response_code: code,
        }
    }

    /// Counts one finished request.
    pub fn record(&self, labels: &RequestLabels, elapsed: Duration, received: u64, sent: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        // Byte counts far below 2^53 are exact as f64.
        self.request_bytes
            .get_or_create(labels)
            .observe(received as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(sent as f64);
    }
}
