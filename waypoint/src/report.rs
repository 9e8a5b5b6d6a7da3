//! One record per request, written when its response ends: the metrics
//! ([`crate::metrics`]) and the one `access` log line, both with the final byte counts and
//! duration. The response body is wrapped ([`Metered`]) so the record is written when the
//! last byte has gone to the client, or when the client goes away first (flag `DC`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use ztunnel::telemetry::metrics::ResponseFlag;

use crate::metrics::{RequestLabels, RequestMetrics};
use crate::upstream::{Body, BoxError};

/// What the access line says beyond the metric labels.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    /// Method.
    pub method: String,
    /// Path (normalized) and query.
    pub path: String,
    /// Host the client asked for.
    pub authority: String,
    /// Client address.
    pub client: String,
    /// Client identity.
    pub src_identity: String,
    /// Original destination (Service or pod).
    pub destination: String,
    /// `namespace/name#rule` of the HTTPRoute rule that routed it, or `-`.
    pub route: String,
    /// Endpoint that answered (`ip:port`), or `-` when the waypoint answered.
    pub upstream: String,
    /// `ALLOW` or `DENY`.
    pub authz: &'static str,
    /// `namespace/name` of the deciding policy, or `-`.
    pub policy: String,
    /// Index of the deciding rule, or `-`.
    pub rule: String,
    /// Why authorization decided as it did.
    pub authz_reason: String,
    /// W3C trace ID of the request, or `-`.
    pub trace_id: String,
}

/// A request waiting for its response to end.
#[derive(Debug)]
pub struct Report {
    metrics: Arc<RequestMetrics>,
    labels: RequestLabels,
    start: Instant,
    received: Arc<AtomicU64>,
    log: AccessLog,
}

impl Report {
    /// A report of a request that started at `start`, whose body bytes are counted into
    /// `received` ([`Counted`]).
    pub fn new(
        metrics: Arc<RequestMetrics>,
        labels: RequestLabels,
        start: Instant,
        received: Arc<AtomicU64>,
        log: AccessLog,
    ) -> Report {
        Report {
            metrics,
            labels,
            start,
            received,
            log,
        }
    }

    /// Wraps `body` so that the record is written when it ends.
    pub fn attach(self, body: Body) -> Body {
        Metered {
            inner: body,
            sent: 0,
            report: Some(self),
        }
        .boxed_unsync()
    }

    /// Writes the metrics and the access line: `sent` response bytes went out, `complete`
    /// unless the response was cut short.
    fn finish(mut self, sent: u64, complete: bool) {
        if !complete && self.labels.conn.response_flags == ResponseFlag::None {
            self.labels.conn.response_flags = ResponseFlag::DownstreamTerminated;
        }
        let elapsed = self.start.elapsed();
        let received = self.received.load(Ordering::Relaxed);
        self.metrics.record(&self.labels, elapsed, received, sent);
        let (l, c) = (&self.log, &self.labels.conn);
        tracing::info!(
            target: "access",
            method = %l.method,
            path = %l.path,
            authority = %l.authority,
            status = self.labels.response_code,
            response_flags = %c.response_flags,
            duration_ms = elapsed.as_millis() as u64,
            bytes_received = received,
            bytes_sent = sent,
            client = %l.client,
            src_identity = %l.src_identity,
            src_workload = %c.source_workload,
            destination = %l.destination,
            dst_service = %c.destination_service,
            dst_workload = %c.destination_workload,
            route = %l.route,
            upstream = %l.upstream,
            authz = l.authz,
            policy = %l.policy,
            rule = %l.rule,
            authz_reason = %l.authz_reason,
            trace_id = %l.trace_id,
            "request"
        );
    }
}

/// A response body that counts its bytes and finishes its [`Report`] at its end, or when it
/// is dropped before.
struct Metered {
    inner: Body,
    sent: u64,
    report: Option<Report>,
}

impl Metered {
    fn done(&mut self, complete: bool) {
        if let Some(r) = self.report.take() {
            r.finish(self.sent, complete);
        }
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.done(true);
                }
            }
            Some(Err(_)) => self.done(false),
            None => self.done(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.done(complete);
    }
}

/// A request body that counts the bytes read from it into a shared counter.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    /// `inner`, counted into `count`.
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, count }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(d) = f.data_ref() {
                self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
