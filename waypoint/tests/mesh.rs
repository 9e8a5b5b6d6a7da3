//! The waypoint in a mesh: HBONE in from a client pod, HTTP routed per request, HBONE out to
//! the backends' node daemon (see `common` for the layout). Every test takes its own
//! 127.78.`net`.0/24.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SPLIT_90_10: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: mesh, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-added, value: by-route}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: header-match}]}}
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: reviews, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;

fn h2_request(path: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(format!("http://reviews.mesh.svc.cluster.local{path}"))
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

#[tokio::test]
async fn http1_requests_arrive_intact_with_forwarding_headers_on_reused_connections() {
    let mesh = Mesh::start(1, "").await;
    let mut client = mesh.http1().await;
    let mut backends = BTreeMap::new();
    for (i, len) in [0, 1, 1000, 70_000, 300_000, 5].into_iter().enumerate() {
        let body = payload(len, i as u8);
        let mut req = request(&format!("/echo/{i}?q=a%20b"), body.clone());
        req.headers_mut().insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        client.ready().await.expect("ready");
        let resp = tokio::time::timeout(WAIT, client.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        let got = answer(resp).await;
        assert_eq!(got.status, 200);
        assert!(
            got.body == body,
            "body of {len} bytes differs ({} back)",
            got.body.len()
        );
        assert_eq!(got.header("x-seen-path"), format!("/echo/{i}?q=a%20b"));
        assert_eq!(got.header("x-seen-host"), "reviews.mesh.svc.cluster.local");
        assert_eq!(got.header("x-seen-xff"), mesh.ip(A).to_string());
        assert_eq!(got.header("x-seen-xfp"), "http");
        assert_eq!(got.header("x-seen-version"), "HTTP/1.1");
        assert_eq!(
            got.header("x-seen-traceparent"),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        *backends
            .entry(got.header("x-backend").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        backends.len(),
        2,
        "no route: the Service's endpoints in turn: {backends:?}"
    );
    let (idle_http1, _) = mesh.waypoint.upstreams().kept();
    assert!(
        idle_http1 <= 2,
        "one kept connection per endpoint, not one per request: {idle_http1}"
    );
    mesh.waypoint
        .upstreams()
        .reap(Instant::now() + Duration::from_secs(61));
    assert_eq!(
        mesh.waypoint.upstreams().kept(),
        (0, 0),
        "idle connections are closed"
    );
}

#[tokio::test]
async fn http2_requests_are_multiplexed_and_arrive_intact() {
    let mesh = Mesh::start(2, "").await;
    let client = mesh.http2().await;
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = payload(usize::from(i) * 5000, i);
            client.ready().await.expect("ready");
            let resp = client
                .send_request(h2_request(&format!("/h2/{i}"), body.clone()))
                .await;
            let got = answer(resp.expect("response")).await;
            assert_eq!(got.status, 200);
            assert!(got.body == body, "request {i}: body differs");
            assert_eq!(got.header("x-seen-version"), "HTTP/2.0");
            assert_eq!(got.header("x-seen-host"), "reviews.mesh.svc.cluster.local");
            got.header("x-backend").to_string()
        }));
    }
    let mut seen = BTreeMap::new();
    for t in tasks {
        let backend = tokio::time::timeout(WAIT, t)
            .await
            .expect("in time")
            .expect("task");
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.values().sum::<i32>(), 40);
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (_, shared_http2) = mesh.waypoint.upstreams().kept();
    assert!(
        shared_http2 <= 2,
        "one HTTP/2 connection per endpoint: {shared_http2}"
    );
}

#[tokio::test]
async fn a_90_10_route_splits_1000_requests_within_tolerance() {
    let mesh = Mesh::start(3, SPLIT_90_10).await;
    let mut client = mesh.http1().await;
    let mut v2 = 0;
    for i in 0..1000 {
        client.ready().await.expect("ready");
        let resp = tokio::time::timeout(
            WAIT,
            client.send_request(request(&format!("/split/{i}"), Vec::new())),
        )
        .await
        .expect("in time")
        .expect("response");
        let got = answer(resp).await;
        assert_eq!(got.status, 200);
        if got.header("x-backend") == "v2" {
            v2 += 1;
        }
    }
    // 100 expected, standard deviation about 9.5: the bounds are more than four away.
    assert!((60..=140).contains(&v2), "v2 got {v2} of 1000");
    let text = mesh.metrics.encode();
    // One series per answering endpoint (v1 and v2): together, every request.
    let counted: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"waypoint\"")
                && l.contains("destination_service=\"reviews.mesh.svc.cluster.local\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/mesh/sa/a\"")
                && l.contains("response_code=\"200\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 1000.0, "request counters in\n{text}");
    for family in [
        "istio_request_bytes",
        "istio_response_bytes",
        "istio_request_duration_milliseconds",
    ] {
        let count: f64 = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}_count{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(count, 1000.0, "{family} in\n{text}");
    }
}

#[tokio::test]
async fn a_header_match_routes_to_v2_with_its_filters() {
    let mesh = Mesh::start(4, SPLIT_90_10).await;
    let client = mesh.http2().await;
    for i in 0..20 {
        let mut req = h2_request(&format!("/h/{i}"), b"x".to_vec());
        req.headers_mut()
            .insert("x-version", http::HeaderValue::from_static("v2"));
        let mut client = client.clone();
        client.ready().await.expect("ready");
        let got = answer(client.send_request(req).await.expect("response")).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("x-backend"), "v2");
        assert_eq!(got.header("x-seen-added"), "by-route");
        assert_eq!(got.header("x-route"), "header-match");
    }
}

#[tokio::test]
async fn a_retry_turns_a_first_503_into_200() {
    let mesh = Mesh::start(5, "").await;
    let mut client = mesh.http1().await;
    client.ready().await.expect("ready");
    let resp = client
        .send_request(request("/flaky", b"again".to_vec()))
        .await;
    let got = answer(resp.expect("response")).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        &got.body[..],
        b"again",
        "the body is sent again on the retry"
    );
    assert_eq!(mesh.flaky_hits.load(std::sync::atomic::Ordering::SeqCst), 2);

    // With retries off, the 503 comes through.
    mesh.set_routes(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: no-retry, namespace: mesh}\n\
         spec: {parentRefs: [{kind: Service, name: reviews}], rules: [{retry: {attempts: 0}, backendRefs: [{name: reviews, port: 80}]}]}\n",
    );
    client.ready().await.expect("ready");
    let got = answer(
        client
            .send_request(request("/flaky", Vec::new()))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 503);
}

#[tokio::test]
async fn a_slow_backend_beyond_the_request_timeout_gives_504() {
    let mesh = Mesh::start(6, SPLIT_90_10).await;
    let mut client = mesh.http1().await;
    client.ready().await.expect("ready");
    let start = Instant::now();
    let got = answer(
        client
            .send_request(request("/slow", Vec::new()))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 504);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    // The connection still serves requests after the timeout.
    client.ready().await.expect("ready");
    let got = answer(
        client
            .send_request(request("/fine", Vec::new()))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn redirects_and_unmatched_requests_are_answered_by_the_waypoint() {
    let only_exact =
        SPLIT_90_10.replace("type: PathPrefix, value: /}", "type: Exact, value: /home}");
    let mesh = Mesh::start(7, &only_exact).await;
    let mut client = mesh.http1().await;
    client.ready().await.expect("ready");
    let got = answer(
        client
            .send_request(request("/old/page?x=1", Vec::new()))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 302);
    assert_eq!(
        got.header("location"),
        "http://reviews.mesh.svc.cluster.local/new/page?x=1"
    );
    client.ready().await.expect("ready");
    let got = answer(
        client
            .send_request(request("/nowhere", Vec::new()))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 404);
}

#[tokio::test]
async fn a_stream_that_is_not_http_is_forwarded_as_bytes() {
    let mesh = Mesh::start(8, SPLIT_90_10).await;
    let mut io = mesh
        .connect(SocketAddr::new(mesh.ip(VIP), 9000))
        .await
        .expect("HBONE");
    let data = payload(200_000, 3);
    let exchange = async {
        io.write_all(b"\x00\x01binary").await?;
        io.write_all(&data).await?;
        io.shutdown().await?;
        let mut got = Vec::new();
        io.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    let got = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&got[..8], b"\x00\x01binary");
    assert!(
        got[8..] == data[..],
        "echo differs ({} bytes back)",
        got.len()
    );
}

#[tokio::test]
async fn a_stream_for_an_unknown_destination_is_refused() {
    let mesh = Mesh::start(9, "").await;
    let err = mesh
        .connect(SocketAddr::new(mesh.ip(99), 80))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, ztunnel::hbone::HboneError::Status { status, .. } if status == 503),
        "{err}"
    );
    let err = mesh
        .connect(SocketAddr::new(mesh.ip(VIP), 81))
        .await
        .expect_err("port the Service does not have");
    assert!(
        matches!(err, ztunnel::hbone::HboneError::Status { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn draining_closes_idle_http_connections_and_refuses_new_streams() {
    let mesh = Mesh::start(10, "").await;
    let mut client = mesh.http1().await;
    client.ready().await.expect("ready");
    let got = answer(
        client
            .send_request(request("/before", Vec::new()))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 200);
    mesh.drain.start();
    let closed = tokio::time::timeout(WAIT, async {
        while !client.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the idle HTTP/1.1 connection is closed on drain"
    );
    assert!(
        mesh.connect(SocketAddr::new(mesh.ip(VIP), 80))
            .await
            .is_err(),
        "no new streams"
    );
}

/// Sends `req` on `client` and reads the whole answer.
async fn exchange(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Answer {
    client.ready().await.expect("ready");
    let resp = tokio::time::timeout(WAIT, client.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    answer(resp).await
}

#[tokio::test]
async fn authorization_policies_decide_each_request() {
    let mesh = Mesh::start(11, POLICIES).await;
    let mut a = mesh.http1().await;
    let got = exchange(&mut a, request("/public/page", Vec::new())).await;
    assert_eq!(got.status, 200, "a may GET /public/*");
    assert_eq!(got.header("x-seen-path"), "/public/page");

    let mut post = request("/public/page", b"x".to_vec());
    *post.method_mut() = http::Method::POST;
    let got = exchange(&mut a, post).await;
    assert_eq!(got.status, 403, "POST is not allowed");
    assert_eq!(&got.body[..], b"RBAC: access denied");

    let got = exchange(&mut a, request("/private", Vec::new())).await;
    assert_eq!(got.status, 403, "only /public/*");
    let got = exchange(&mut a, request("/public/../private", Vec::new())).await;
    assert_eq!(
        got.status, 403,
        "the path is normalized before the decision"
    );

    let mut blocked = request("/public/page", Vec::new());
    blocked
        .headers_mut()
        .insert("x-block", http::HeaderValue::from_static("yes"));
    let got = exchange(&mut a, blocked).await;
    assert_eq!(got.status, 403, "the DENY on the header wins");
    let got = exchange(&mut a, request("/public/again", Vec::new())).await;
    assert_eq!(got.status, 200, "the connection serves on after a 403");

    let mut b = mesh.http1_as("b", B).await;
    let got = exchange(&mut b, request("/public/page", Vec::new())).await;
    assert_eq!(got.status, 403, "another principal is not allowed");

    let text = mesh.metrics.encode();
    let denied: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"403\"")
                && l.contains("response_flags=\"DENY\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(denied, 5.0, "{text}");
    assert!(
        text.contains("source_principal=\"spiffe://cluster.local/ns/mesh/sa/b\""),
        "{text}"
    );
}

/// Runs `promtool check metrics` on `text`. The one problem tolerated is the unit lint on
/// `istio_request_duration_milliseconds`: the name is Istio's, which dashboards query.
fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package `prometheus`; `cargo xtask test` installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            *l != "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\""
        })
        .collect();
    let only_lint = out.status.code() == Some(3);
    assert!(
        (out.status.success() || only_lint) && problems.is_empty(),
        "promtool check metrics: {:?}\n{report}\n--- metrics ---\n{text}",
        out.status
    );
}

#[tokio::test]
async fn the_metrics_port_serves_what_promtool_accepts() {
    let mesh = Mesh::start(12, &format!("{SPLIT_90_10}{POLICIES}")).await;
    let mut a = mesh.http1().await;
    for path in ["/public/1", "/private", "/public/slow-not", "/public/x"] {
        exchange(&mut a, request(path, payload(100, 1))).await;
    }
    let listener = tokio::net::TcpListener::bind((mesh.ip(WAYPOINT), 0))
        .await
        .expect("metrics listener");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(waypoint::admin::serve(
        listener,
        "metrics",
        waypoint::admin::metrics(mesh.metrics.clone(), None),
    ));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut scrape, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/stats/prometheus")
        .header("host", "metrics")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let got = exchange(&mut scrape, req).await;
    assert_eq!(got.status, 200);
    let text = String::from_utf8_lossy(&got.body).into_owned();
    for family in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{family}{{"))
                    && l.contains("reporter=\"waypoint\"")),
            "{family} in\n{text}"
        );
    }
    assert!(text.contains("request_protocol=\"http\""), "{text}");
    promtool_check(&text);
}

/// Bytes sent by `a` to `reviews:9000` (the echo port), and what came back.
async fn echo_through(mesh: &Mesh) -> std::io::Result<Vec<u8>> {
    let mut io = mesh
        .connect(SocketAddr::new(mesh.ip(VIP), 9000))
        .await
        .map_err(std::io::Error::other)?;
    io.write_all(b"\x00\x01bytes").await?;
    io.shutdown().await?;
    let mut got = Vec::new();
    io.read_to_end(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn opaque_streams_are_authorized_on_l4_attributes() {
    let mesh = Mesh::start(13, POLICIES).await;
    // The only ALLOW is on HTTP attributes: no stream can match it.
    let got = tokio::time::timeout(WAIT, echo_through(&mesh))
        .await
        .expect("in time");
    assert!(
        got.as_ref().map_or(true, Vec::is_empty),
        "denied stream echoed {got:?}"
    );
    let tcp_allowed = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: tcp, namespace: mesh}\n\
        spec: {targetRefs: [{kind: Service, group: '', name: reviews}], rules: [{from: [{source: {namespaces: [mesh]}}], to: [{operation: {ports: ['9000']}}]}]}\n";
    // POLICIES' DENY on a header cannot be evaluated on a stream, so it would deny every
    // stream to `reviews` (fail closed): without it, the L4 ALLOW admits the stream.
    let without_header_deny = POLICIES
        .split_once("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: block-header")
        .map(|(keep, _)| keep)
        .expect("POLICIES ends with block-header");
    mesh.set_routes(&format!("{without_header_deny}{tcp_allowed}"));
    let got = tokio::time::timeout(WAIT, echo_through(&mesh))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&got[..], b"\x00\x01bytes");
}
