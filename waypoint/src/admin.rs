//! The waypoint's side ports, each a small HTTP/1.1 responder: metrics (`/metrics` and
//! `/stats/prometheus`, 15020), readiness (`/healthz/ready`, 15021: 503 until the first state
//! is loaded and the certificate issued, and again while draining), and the admin port
//! (`/config_dump`, 15000, on loopback by default because it shows every route and policy).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use ztunnel::drain::Drain;
use ztunnel::identity::SpiffeId;
use ztunnel::source::SourceHealth;
use ztunnel::telemetry::metrics::CONTENT_TYPE;
use ztunnel::telemetry::Metrics;

use crate::snapshot::Snapshot;

/// What one request to a side port gets.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// How a side port answers a method and path.
pub type Answer = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// Serves `answer` on every connection `listener` accepts; `port` names it in logs.
pub async fn serve(listener: TcpListener, port: &'static str, answer: Answer) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = answer(req.method(), req.uri().path());
                let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
                *resp.status_mut() = reply.status;
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(reply.content_type),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                tracing::debug!(port, error = %e, "side-port connection ended");
            }
        });
    }
}

/// `/metrics` and `/stats/prometheus`: the Prometheus text format, with the state source's
/// staleness brought up to date at each scrape.
pub fn metrics(metrics: Arc<Metrics>, source: Option<Arc<SourceHealth>>) -> Answer {
    Arc::new(move |method, path| match (method, path) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            if let Some(h) = &source {
                h.refresh();
            }
            Reply {
                status: StatusCode::OK,
                content_type: CONTENT_TYPE,
                body: metrics.encode(),
            }
        }
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// Whether the waypoint may receive traffic.
#[derive(Debug)]
pub struct Readiness {
    state: AtomicBool,
    certificate: AtomicBool,
    drain: Drain,
}

impl Readiness {
    /// Not ready yet; not ready again once `drain` starts.
    pub fn new(drain: Drain) -> Arc<Readiness> {
        Arc::new(Readiness {
            state: AtomicBool::new(false),
            certificate: AtomicBool::new(false),
            drain,
        })
    }

    /// The first complete state is in.
    pub fn state_loaded(&self) {
        self.state.store(true, Ordering::Release);
    }

    /// The waypoint's certificate is issued.
    pub fn certificate_issued(&self) {
        self.certificate.store(true, Ordering::Release);
    }

    /// What is still missing; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.state.load(Ordering::Acquire) {
            missing.push("state");
        }
        if !self.certificate.load(Ordering::Acquire) {
            missing.push("certificate");
        }
        if self.drain.is_draining() {
            missing.push("draining");
        }
        missing
    }
}

/// `/healthz/ready`: 200 when ready, else 503 naming what is missing.
pub fn readiness(ready: Arc<Readiness>) -> Answer {
    Arc::new(move |method, path| match (method, path) {
        (&Method::GET, "/healthz/ready") => match ready.missing() {
            m if m.is_empty() => Reply::text(StatusCode::OK, "ready\n"),
            m => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", m.join(", ")),
            ),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// What the admin port shows.
#[derive(Debug, Clone)]
pub struct AdminView {
    /// The waypoint's identity.
    pub identity: SpiffeId,
    /// `namespace/name` of its Gateway.
    pub gateway: String,
    /// The state it serves.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// How current the state source is (`None` where there is no source, in tests).
    pub source: Option<Arc<SourceHealth>>,
}

/// The JSON of `/config_dump`: identity, Gateway, state generation and source health (as the
/// node daemon shows it), the compiled routes per Service and the attached policies.
pub fn config_dump(view: &AdminView) -> serde_json::Value {
    let snap = view.snapshots.borrow().clone();
    serde_json::json!({
        "identity": view.identity.to_string(),
        "gateway": view.gateway,
        "generation": snap.state.generation,
        "source": view.source.as_ref().map(|h| h.snapshot()),
        "services": snap.state.services.len(),
        "routes": snap.routes.dump(),
        "policies": snap.policies.policies,
    })
}

/// `/config_dump` (JSON).
pub fn admin(view: AdminView) -> Answer {
    Arc::new(move |method, path| match (method, path) {
        (&Method::GET, "/config_dump") => match serde_json::to_string_pretty(&config_dump(&view)) {
            Ok(body) => Reply {
                status: StatusCode::OK,
                content_type: "application/json",
                body: body + "\n",
            },
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_state_and_certificate_and_fails_on_drain() {
        let drain = Drain::default();
        let ready = Readiness::new(drain.clone());
        let answer = readiness(ready.clone());
        let get = || answer(&Method::GET, "/healthz/ready");
        let r = get();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.body, "not ready: state, certificate\n");
        ready.state_loaded();
        assert_eq!(get().body, "not ready: certificate\n");
        ready.certificate_issued();
        assert_eq!(get().status, StatusCode::OK);
        drain.start();
        assert_eq!(get().status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer(&Method::GET, "/other").status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn config_dump_shows_routes_and_attached_policies() {
        let yaml = r#"
{apiVersion: v1, kind: Service, metadata: {name: svc, namespace: ns}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules: [{matches: [{path: {value: /api}}], backendRefs: [{name: svc, port: 80}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  targetRefs: [{kind: Service, group: "", name: svc}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;
        let objs = ztunnel::k8s::parse_file(std::path::Path::new("t.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let (_tx, snapshots) = watch::channel(Arc::new(Snapshot::build(3, "cluster.local", &objs)));
        let view = AdminView {
            identity: SpiffeId::new("cluster.local", "ns", "waypoint"),
            gateway: "ns/waypoint".into(),
            snapshots,
            source: Some(Arc::new(SourceHealth::new("file", ["files"].into_iter()))),
        };
        let r = admin(view)(&Method::GET, "/config_dump");
        assert_eq!(r.status, StatusCode::OK);
        let dump: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(dump["generation"], 3);
        assert_eq!(dump["source"]["source"], "file");
        assert_eq!(dump["source"]["in_sync"], true);
        assert_eq!(dump["routes"]["ns/svc"][0]["path"]["prefix"], "/api/");
        assert_eq!(
            dump["routes"]["ns/svc"][0]["backends"][0]["service"],
            "ns/svc"
        );
        assert_eq!(dump["policies"][0]["name"], "p");
        assert_eq!(dump["policies"][0]["targets"][0]["Service"], "ns/svc");
        assert_eq!(
            dump["policies"][0]["rules"][0]["to"][0]["methods"]["values"][0]["Exact"],
            "GET"
        );
    }
}
