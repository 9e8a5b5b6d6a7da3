//! One HTTP request, from arrival to answer: normalize its path ([`crate::normalize`]),
//! authorize it ([`crate::authz`]), route it ([`crate::routing`]), apply the rule's filters,
//! pick an endpoint of the chosen Service, forward over [`Upstreams`], retry what the policy
//! allows, give up with 504 when `timeouts.request` passes, and report it
//! ([`crate::report`]) when its response has ended.
//!
//! Errors the waypoint answers itself: 403 denied by policy, 404 no rule matched, 500 a rule
//! the waypoint cannot apply (unsupported filter, unknown backend), 503 no ready endpoint or
//! the endpoint failed, 504 timeout.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use tokio::sync::watch;
use ztunnel::identity::SpiffeId;
use ztunnel::telemetry::metrics::{Protocol, Reporter, ResponseFlag};
use ztunnel::telemetry::FlowReport;

use crate::authz::{evaluate, Decision, Http, Request as AuthzRequest, DENIED_BODY};
use crate::metrics::RequestMetrics;
use crate::report::{AccessLog, Counted, Report};
use crate::routing::filters::{Filter, RequestUrl};
use crate::routing::{Lookup, RequestInfo, RetryPolicy, Rule};
use crate::snapshot::Snapshot;
use crate::upstream::{Body, BoxError, Endpoint, Proto, UpstreamError, Upstreams};

/// Request bodies up to this size are kept so that a failed attempt can be retried; larger
/// or streamed bodies get one attempt.
const MAX_REPLAY: u64 = 64 * 1024;

/// Where the HBONE stream was addressed (its CONNECT authority).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A Service VIP: `namespace/name` and the Service port.
    Service {
        /// `namespace/name`.
        key: String,
        /// Service port.
        port: u16,
    },
    /// A pod directly.
    Pod(SocketAddr),
}

/// What a request's connection says about it.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// The original destination.
    pub dest: Dest,
    /// The CONNECT authority: the host of requests that name none (HTTP/1.0 without `Host`).
    pub authority: SocketAddr,
    /// The original client's address (the CONNECT's `forwarded`, else the HBONE peer).
    pub client: SocketAddr,
    /// The client's identity from its certificate.
    pub identity: SpiffeId,
    /// The HTTP version the client speaks, also spoken to the endpoint.
    pub proto: Proto,
}

/// Where a request goes after routing.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Service(String, u16),
    Pod(SocketAddr),
}

/// Serves requests; one per waypoint, shared by every connection.
#[derive(Debug)]
pub struct Forwarder {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    upstreams: Arc<Upstreams>,
    metrics: Arc<RequestMetrics>,
    gateway: String,
}

/// A failure answered by the waypoint.
struct Local(StatusCode, String);

impl Forwarder {
    /// A forwarder routing on the latest of `snapshots`, counting requests into `metrics`,
    /// enforcing the policies attached to the waypoint's `gateway` (`namespace/name`).
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        upstreams: Arc<Upstreams>,
        metrics: Arc<RequestMetrics>,
        gateway: &str,
    ) -> Arc<Self> {
        Arc::new(Forwarder {
            snapshots,
            upstreams,
            metrics,
            gateway: gateway.to_string(),
        })
    }

    /// The endpoint `dest` leads to now (a Service picks the next ready endpoint), reached
    /// in the family of `like` (see [`Upstreams::source_for`]).
    pub(crate) fn endpoint(
        snap: &Snapshot,
        dest: &Dest,
        like: IpAddr,
    ) -> Result<Endpoint, (StatusCode, String)> {
        let target = match dest {
            Dest::Service { key, port } => Target::Service(key.clone(), *port),
            Dest::Pod(addr) => Target::Pod(*addr),
        };
        resolve(snap, &target, like).map_err(|Local(s, m)| (s, m))
    }

    /// The decision for a stream that is not HTTP: the policies attached to the waypoint and
    /// to `dest`'s Service, on L4 attributes only (rules on HTTP attributes fail closed).
    pub fn authorize_stream(
        &self,
        snap: &Snapshot,
        dest: &Dest,
        authority: SocketAddr,
        client: SocketAddr,
        identity: &SpiffeId,
    ) -> Decision {
        let req = AuthzRequest {
            src_ip: client.ip(),
            src_identity: Some(identity),
            dst: authority,
            service: match dest {
                Dest::Service { key, .. } => Some(key.as_str()),
                Dest::Pod(_) => None,
            },
            http: None,
        };
        evaluate(&snap.policies, &self.gateway, &req)
    }

    /// Answers one request; never fails (errors become responses). Its metrics and its one
    /// `access` line are written when the response has ended.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        down: &Downstream,
    ) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let snap = self.snapshots.borrow().clone();
        let (mut parts, body) = req.into_parts();
        let received = Arc::new(AtomicU64::new(0));
        let body = Counted::new(body, received.clone());
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut log = AccessLog {
            method: parts.method.to_string(),
            authority: request_host(&parts, down),
            client: down.client.ip().to_string(),
            src_identity: down.identity.to_string(),
            destination: match &down.dest {
                Dest::Service { key, port } => format!("{key}:{port}"),
                Dest::Pod(addr) => addr.to_string(),
            },
            trace_id: trace_id(&parts.headers),
            authz: "ALLOW",
            ..AccessLog::default()
        };
        let normal = crate::normalize::uri(&mut parts.uri);
        log.path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
        let decision = authorize(&snap, &self.gateway, down, &parts);
        note_decision(&decision, down, &parts);
        log.authz = if decision.allowed() { "ALLOW" } else { "DENY" };
        log.policy = decision.reason.policy().unwrap_or("-").to_string();
        log.rule = decision
            .reason
            .rule()
            .map_or_else(|| "-".to_string(), |r| r.to_string());
        log.authz_reason = decision.reason.to_string();
        let (resp, upstream, rule, flag) = if !normal {
            let resp = local(StatusCode::BAD_REQUEST, "bad request path");
            (resp, None, None, ResponseFlag::NoRoute)
        } else if !decision.allowed() {
            (forbidden(), None, None, ResponseFlag::Denied)
        } else {
            match route(&snap, &mut parts, down) {
                Routed::Answer(resp, rule) => {
                    let flag = local_flag(resp.status());
                    (resp, None, rule, flag)
                }
                Routed::Forward(fwd) => {
                    let rule = fwd.rule.clone();
                    match self.forward(&snap, parts, body, down, fwd).await {
                        Ok((resp, ep)) => (resp, Some(ep), rule, ResponseFlag::None),
                        Err(Local(status, why)) => {
                            (local(status, &why), None, rule, local_flag(status))
                        }
                    }
                }
            }
        };
        log.route = rule
            .as_ref()
            .map_or_else(|| "-".to_string(), |r| format!("{}#{}", r.route, r.index));
        log.upstream = upstream
            .as_ref()
            .map_or_else(|| "-".to_string(), |ep| ep.authority().to_string());
        let src_workload = snap.state.workload(down.client.ip());
        let service = match &down.dest {
            Dest::Service { key, .. } => snap.state.services.get(key),
            Dest::Pod(addr) => snap.state.service_of(addr.ip()),
        };
        let dst_workload = upstream.as_ref().map(|ep| ep.workload.as_ref());
        let flow = FlowReport {
            reporter: Reporter::Waypoint,
            protocol: Protocol::Hbone,
            src: down.client,
            dst: upstream
                .as_ref()
                .map_or(down.authority, |ep| ep.authority()),
            src_workload: src_workload.map(Arc::as_ref),
            dst_workload,
            src_identity: Some(&down.identity),
            dst_identity: dst_workload.filter(|w| w.enrolled).map(|w| &*w.identity),
            service: service.map(Arc::as_ref),
            waypoint: None,
            start,
        };
        let protocol = if grpc { "grpc" } else { "http" };
        let labels = self
            .metrics
            .labels(&flow, protocol, resp.status().as_u16(), flag);
        let report = Report::new(self.metrics.clone(), labels, start, received, log);
        let (head, body) = resp.into_parts();
        Ok(Response::from_parts(head, report.attach(body)))
    }

    /// Sends the routed request, retrying as the rule allows within its timeout, and applies
    /// the rule's response filters. Returns the response and the endpoint that gave it.
    async fn forward(
        &self,
        snap: &Snapshot,
        parts: http::request::Parts,
        body: Counted<Incoming>,
        down: &Downstream,
        fwd: Forward,
    ) -> Result<(Response<Body>, Endpoint), Local> {
        let (uri, headers) =
            upstream_head(parts.headers, down, &fwd.host, &fwd.path, parts.uri.query())?;
        // The flow goes on in the family it came in (the client dialled the authority).
        let like = self.upstreams.source_for(down.authority.ip());
        let version = match down.proto {
            Proto::Http1 => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        };
        let build = |body: Body| {
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            *req.version_mut() = version;
            *req.headers_mut() = headers.clone();
            req
        };
        // A small body is kept so a failed attempt can be made again; a large or streamed
        // one goes out once.
        let (replay, mut streamed) = match body.size_hint().exact() {
            Some(n) if n <= MAX_REPLAY => {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| Local(StatusCode::BAD_REQUEST, format!("request body: {e}")))?
                    .to_bytes();
                (Some(bytes), None)
            }
            _ => (None, Some(body.map_err(BoxError::from).boxed_unsync())),
        };
        let rule = fwd.rule.as_deref();
        let policy = rule.map(|r| r.retry.clone()).unwrap_or_default();
        let retries = if replay.is_some() { policy.attempts } else { 0 };
        let attempts = async {
            let mut attempt = 0;
            loop {
                let ep = resolve(snap, &fwd.target, like)?;
                let body = match (&replay, streamed.take()) {
                    (Some(bytes), _) => full(bytes.clone()),
                    (None, Some(body)) => body,
                    (None, None) => {
                        return Err(Local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "request body already sent".into(),
                        ))
                    }
                };
                let sent = self.upstreams.send(&ep, down.proto, build(body));
                let result = match rule.and_then(|r| r.attempt_timeout) {
                    Some(t) => tokio::time::timeout(t, sent).await.unwrap_or_else(|_| {
                        Err(UpstreamError::Connect {
                            authority: ep.authority(),
                            error: format!("no response within {t:?}"),
                        })
                    }),
                    None => sent.await,
                };
                let retry = match &result {
                    Ok(resp) => policy.codes.contains(&resp.status().as_u16()),
                    Err(_) => true,
                };
                if !retry || attempt >= retries {
                    return match result {
                        Ok(resp) => Ok((resp, ep)),
                        Err(e) => Err(Local(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
                    };
                }
                attempt += 1;
                match &result {
                    Ok(resp) => {
                        tracing::debug!(upstream = %ep.authority(), status = resp.status().as_u16(), attempt, "retrying")
                    }
                    Err(e) => {
                        tracing::debug!(upstream = %ep.authority(), error = %e, attempt, "retrying")
                    }
                }
                drop(result);
                backoff(&policy, attempt).await;
            }
        };
        let (mut resp, upstream) = match rule.and_then(|r| r.timeout) {
            Some(limit) => tokio::time::timeout(limit, attempts)
                .await
                .unwrap_or_else(|_| {
                    Err(Local(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("no response within {limit:?}"),
                    ))
                }),
            None => attempts.await,
        }?;
        strip_hop_by_hop(resp.headers_mut());
        *resp.version_mut() = version;
        for f in rule.iter().flat_map(|r| &r.filters) {
            if let Filter::ResponseHeaders(edit) = f {
                edit.apply(resp.headers_mut());
            }
        }
        Ok((resp, upstream))
    }
}

/// A request routed for forwarding.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) target: Target,
    /// Host for the upstream request (rewritten or the client's).
    host: String,
    /// Path for the upstream request (rewritten or the client's).
    path: String,
    /// The rule that decided, if a route matched.
    pub(crate) rule: Option<Arc<Rule>>,
}

/// The routing decision for one request.
#[derive(Debug)]
pub(crate) enum Routed {
    Forward(Forward),
    /// Answered by the waypoint (a redirect, 404, 500), with the rule that decided.
    Answer(Response<Body>, Option<Arc<Rule>>),
}

/// Routes a request to `down.dest`: a pod goes to that pod; a Service with no route to its
/// own endpoints; otherwise the matched rule's filters apply (request headers edited in
/// place) and a backend is drawn by weight.
pub(crate) fn route(
    snap: &Snapshot,
    parts: &mut http::request::Parts,
    down: &Downstream,
) -> Routed {
    let host = request_host(parts, down);
    let path = parts.uri.path().to_string();
    let plain = |target| {
        Routed::Forward(Forward {
            target,
            host: host.clone(),
            path: path.clone(),
            rule: None,
        })
    };
    let (key, port) = match &down.dest {
        Dest::Pod(addr) => return plain(Target::Pod(*addr)),
        Dest::Service { key, port } => (key, *port),
    };
    let info = RequestInfo {
        method: &parts.method,
        path: &path,
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let m = match snap.routes.lookup(key, port, &info) {
        Lookup::NoRoutes => return plain(Target::Service(key.clone(), port)),
        Lookup::NoMatch => {
            return Routed::Answer(local(StatusCode::NOT_FOUND, "no route matched"), None)
        }
        Lookup::Matched(m) => m,
    };
    let rule = m.rule;
    let fail = |why: &str| {
        Routed::Answer(
            local(StatusCode::INTERNAL_SERVER_ERROR, why),
            Some(rule.clone()),
        )
    };
    if let Some(why) = &rule.invalid {
        return fail(why);
    }
    let (mut host, mut path) = (host.clone(), path.clone());
    for f in &rule.filters {
        match f {
            Filter::RequestHeaders(edit) => edit.apply(&mut parts.headers),
            Filter::ResponseHeaders(_) => {}
            Filter::Redirect(redirect) => {
                let url = RequestUrl {
                    scheme: "http",
                    host: host_only(&host),
                    port,
                    path: &path,
                    query: parts.uri.query(),
                };
                let location = redirect.location(&url, m.prefix.as_deref());
                return match Response::builder()
                    .status(redirect.status)
                    .header(header::LOCATION, location)
                    .body(empty())
                {
                    Ok(resp) => Routed::Answer(resp, Some(rule.clone())),
                    Err(e) => fail(&e.to_string()),
                };
            }
            Filter::Rewrite(rw) => {
                if let Some(h) = &rw.hostname {
                    host = h.clone();
                }
                if let Some(change) = &rw.path {
                    path = change.apply(&path, m.prefix.as_deref());
                }
            }
        }
    }
    let Some(backend) = rule.pick_backend(rand::random()) else {
        return fail("rule has no backend");
    };
    Routed::Forward(Forward {
        target: Target::Service(backend.service.clone(), backend.port.unwrap_or(port)),
        host,
        path,
        rule: Some(rule.clone()),
    })
}

/// The authorization decision for a request to `down.dest` through the waypoint `gateway`
/// (`namespace/name`): the one function the data path and `waypoint check` call. `parts` has
/// its path normalized already.
pub fn authorize(
    snap: &Snapshot,
    gateway: &str,
    down: &Downstream,
    parts: &http::request::Parts,
) -> Decision {
    let host = request_host(parts, down);
    let service = match &down.dest {
        Dest::Service { key, .. } => Some(key.as_str()),
        Dest::Pod(_) => None,
    };
    let req = AuthzRequest {
        src_ip: down.client.ip(),
        src_identity: Some(&down.identity),
        dst: down.authority,
        service,
        http: Some(Http {
            method: parts.method.as_str(),
            host: &host,
            path: parts.uri.path(),
            headers: &parts.headers,
        }),
    };
    evaluate(&snap.policies, gateway, &req)
}

/// Logs what the decision enforces nothing about: matching AUDIT policies, and dry-run
/// policies that would have decided otherwise.
fn note_decision(d: &Decision, down: &Downstream, parts: &http::request::Parts) {
    if !d.audited.is_empty() {
        tracing::info!(
            policies = %d.audited.join(","), src_identity = %down.identity,
            method = %parts.method, path = parts.uri.path(), "authorization audit"
        );
    }
    if let Some((verdict, reason)) = &d.dry_run {
        tracing::info!(
            would = %verdict, reason = %reason, policy = reason.policy().unwrap_or("-"),
            enforced = %d.verdict, src_identity = %down.identity, method = %parts.method,
            path = parts.uri.path(), "dry-run policy would change the decision (not enforced)"
        );
    }
}

/// The response flag of an answer the waypoint made itself.
fn local_flag(status: StatusCode) -> ResponseFlag {
    match status.as_u16() {
        404 => ResponseFlag::NoRoute,
        503 => ResponseFlag::UpstreamFailure,
        504 => ResponseFlag::UpstreamTimeout,
        _ => ResponseFlag::None,
    }
}

/// The request's host: its own (`:authority` or `Host`), else the CONNECT authority.
fn request_host(parts: &http::request::Parts, down: &Downstream) -> String {
    let host = host_of(&parts.uri, &parts.headers);
    if host.is_empty() {
        down.authority.to_string()
    } else {
        host
    }
}

/// The W3C trace ID of `traceparent`, or `-`.
fn trace_id(headers: &HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split('-').nth(1))
        .unwrap_or("-")
        .to_string()
}

/// The answer to a request authorization denied.
fn forbidden() -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(DENIED_BODY.as_bytes())));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The upstream request's target and headers: origin form and `Host` for HTTP/1.1, absolute
/// form (which becomes `:authority`) for HTTP/2; connection headers dropped; the client added
/// to `x-forwarded-for`; `x-forwarded-proto` set when absent. Everything else, `traceparent`
/// included, passes unchanged.
fn upstream_head(
    mut headers: HeaderMap,
    down: &Downstream,
    host: &str,
    path: &str,
    query: Option<&str>,
) -> Result<(Uri, HeaderMap), Local> {
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let uri: Uri = match down.proto {
        Proto::Http1 => path_and_query.parse(),
        Proto::Http2 => format!("http://{host}{path_and_query}").parse(),
    }
    .map_err(|e| Local(StatusCode::BAD_REQUEST, format!("bad request target: {e}")))?;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    if down.proto == Proto::Http1 {
        let value = HeaderValue::from_str(host)
            .map_err(|_| Local(StatusCode::BAD_REQUEST, format!("bad host `{host}`")))?;
        headers.insert(header::HOST, value);
    }
    append_forwarded_for(&mut headers, down.client.ip());
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    Ok((uri, headers))
}

/// The endpoint a target leads to now, at its address in the family of `like` (the
/// waypoint's own address for the flow): a Service's endpoints without one are skipped.
fn resolve(snap: &Snapshot, target: &Target, like: IpAddr) -> Result<Endpoint, Local> {
    let family = if like.is_ipv6() { "IPv6" } else { "IPv4" };
    match target {
        Target::Service(key, port) => {
            let svc = snap.state.services.get(key).ok_or_else(|| {
                Local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("backend Service {key} not found"),
                )
            })?;
            let (workload, port) = svc.pick_like(*port, like).ok_or_else(|| {
                Local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no ready endpoint of {key} for port {port} with an {family} address"),
                )
            })?;
            let ip = workload.dial_ip(like);
            Ok(Endpoint { workload, ip, port })
        }
        Target::Pod(addr) => {
            let w = snap.state.workload(addr.ip()).ok_or_else(|| {
                Local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("pod {addr} is gone"),
                )
            })?;
            let ip = w.ip_like(like).ok_or_else(|| {
                Local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("pod {addr} has no {family} address, the only family the waypoint has (--pod-ip)"),
                )
            })?;
            Ok(Endpoint {
                workload: w.clone(),
                ip,
                port: addr.port(),
            })
        }
    }
}

/// Exponential from the policy's base, capped at ten times it.
async fn backoff(policy: &RetryPolicy, attempt: u32) {
    let factor = 1u32 << attempt.saturating_sub(1).min(3);
    tokio::time::sleep((policy.backoff * factor).min(policy.backoff * 10)).await;
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let previous = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    let value = if previous.is_empty() {
        client.to_string()
    } else {
        format!("{previous}, {client}")
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Removes the headers that describe one connection rather than the request (RFC 9110
/// §7.6.1), including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(n);
    }
}

/// The request's host: the URI's authority (HTTP/2, absolute form), else `Host`.
fn host_of(uri: &Uri, headers: &HeaderMap) -> String {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// `host` without a port.
fn host_only(host: &str) -> &str {
    match host.parse::<http::uri::Authority>() {
        Ok(a) => &host[..a.host().len()],
        Err(_) => host,
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// A response made by the waypoint itself.
fn local(status: StatusCode, why: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(format!("{why}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

#[cfg(test)]
mod tests;
