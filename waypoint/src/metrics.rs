//! The waypoint's request metrics, the minimum Istio dashboards read from an L7 proxy:
//! `istio_requests_total` and `istio_request_duration_milliseconds`, labelled with who asked,
//! which Service, and the answer, in the shared `ztunnel::telemetry::Metrics` registry; and
//! the port that serves them to Prometheus (`/metrics`, `/stats/prometheus`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;
use ztunnel::telemetry::Metrics;

/// Labels of one request series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_principal: String,
    source_workload_namespace: String,
    destination_service: String,
    request_protocol: &'static str,
    response_code: u16,
    response_flags: &'static str,
}

/// What one finished request is counted by.
#[derive(Debug, Clone)]
pub struct RequestRecord<'a> {
    /// The client's SPIFFE identity.
    pub source_principal: String,
    /// The client's namespace.
    pub source_namespace: &'a str,
    /// `name.namespace.svc.<domain>` of the destination Service, or the pod's address.
    pub destination_service: String,
    /// Response status.
    pub status: StatusCode,
    /// Whether the waypoint answered itself (no route, timeout, no endpoint) rather than an
    /// endpoint.
    pub local: bool,
}

/// The request families, registered once per process.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
}

fn duration_histogram() -> Histogram {
    // Istio's default buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

impl RequestMetrics {
    /// Registers the families in `metrics`.
    pub fn new(metrics: &Metrics) -> Arc<RequestMetrics> {
        let m = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        };
        metrics.register(|r| {
            r.register(
                "istio_requests",
                "Requests served by the waypoint",
                m.requests.clone(),
            );
            r.register(
                "istio_request_duration_milliseconds",
                "Request durations at the waypoint",
                m.duration.clone(),
            );
        });
        Arc::new(m)
    }

    /// Counts one finished request that took `elapsed`.
    pub fn record(&self, r: &RequestRecord<'_>, elapsed: Duration) {
        let code = r.status.as_u16();
        let labels = RequestLabels {
            reporter: "waypoint",
            source_principal: r.source_principal.clone(),
            source_workload_namespace: r.source_namespace.to_string(),
            destination_service: r.destination_service.clone(),
            request_protocol: "http",
            response_code: code,
            response_flags: match (r.local, code) {
                (false, _) => "-",
                (true, 404) => "NR",
                (true, 504) => "UT",
                (true, 503) => "UF",
                (true, _) => "-",
            },
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
    }
}

/// Serves `metrics` in the Prometheus text format on every connection `listener` accepts.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => (StatusCode::OK, metrics.encode()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
