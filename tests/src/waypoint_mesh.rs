//! The mesh the waypoint acceptance tests share: node daemons, a `waypoint` process in a pod,
//! `meshhttp` backends and curl clients, with the waypoint's Gateway and an HTTPRoute.
//!
//! Layout (2 nodes):
//!
//! ```text
//! node1: client 10.244.1.11 (sa client), v2 10.244.1.12, other 10.244.1.13 (sa other)
//! node2: waypoint 10.244.2.11, v1 10.244.2.12
//! reviews 10.96.0.20:80 (use-waypoint: waypoint) -> HTTPRoute: 90 reviews-v1 / 10 reviews-v2
//! direct  10.96.0.23:80 (no label)                -> v1 or v2, straight from the client's daemon
//! ```

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::cluster::{Cluster, ClusterSpec, PodSpec, SvcSpec, WaypointProc};
use crate::web::{CurlRun, HttpServer, HttpVersion};

/// VIP of `mesh/reviews`, the Service attached to the waypoint.
pub const REVIEWS: &str = "10.96.0.20";
/// VIP of `mesh/direct`: the same pods, no waypoint.
pub const DIRECT: &str = "10.96.0.23";
/// The waypoint's identity.
pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/waypoint";
/// The identity of `mesh/client`.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";
/// The identity of `mesh/other`, a second client.
pub const OTHER_ID: &str = "spiffe://cluster.local/ns/mesh/sa/other";

/// The Gateway naming the waypoint.
pub const GATEWAY_YAML: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: mesh}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

/// The route splitting `reviews` 90/10, with a rule retrying `/flaky` on 503, one giving
/// `/slow` 1 s in all, and `/public/self` sent to `reviews` itself (the Service the waypoint fronts).
pub const ROUTE_YAML: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 1s}
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    retry: {attempts: 2, codes: [503]}
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /public/self}}]
    backendRefs: [{name: reviews, port: 80}]
  - backendRefs:
    - {name: reviews-v1, port: 80, weight: 90}
    - {name: reviews-v2, port: 80, weight: 10}
"#;

/// The running mesh; everything stops when it is dropped.
pub struct WaypointMesh {
    /// Cluster and daemons.
    pub cluster: Cluster,
    /// The waypoint in `mesh/waypoint`.
    pub waypoint: WaypointProc,
    /// The backend in `mesh/v1`.
    pub v1: HttpServer,
    /// The backend in `mesh/v2`.
    pub v2: HttpServer,
}

fn reviews_pod(key: &str, node: usize, version: &str) -> PodSpec {
    PodSpec::new(key, node)
        .sa("reviews")
        .label("app", "reviews")
        .label("version", version)
}

/// The layout above: namespace `mesh` (ambient), the pods and the Services.
pub fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/client", 1).sa("client"))
        .pod(reviews_pod("mesh/v2", 1, "v2"))
        .pod(PodSpec::new("mesh/other", 1).sa("other"))
        .pod(
            PodSpec::new("mesh/waypoint", 2)
                .sa("waypoint")
                .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
        )
        .pod(reviews_pod("mesh/v1", 2, "v1"))
        .service(
            SvcSpec::new("mesh/reviews", REVIEWS)
                .select("app", "reviews")
                .port(80, 8080)
                .label("istio.io/use-waypoint", "waypoint"),
        )
        .service(
            SvcSpec::new("mesh/reviews-v1", "10.96.0.21")
                .select("version", "v1")
                .port(80, 8080),
        )
        .service(
            SvcSpec::new("mesh/reviews-v2", "10.96.0.22")
                .select("version", "v2")
                .port(80, 8080),
        )
        .service(
            SvcSpec::new("mesh/direct", DIRECT)
                .select("app", "reviews")
                .port(80, 8080),
        )
}

impl WaypointMesh {
    /// The mesh on state files: the Gateway, the route and `extra` YAML (policies) written as
    /// `waypoint.yaml`, daemons ready, the waypoint ready, backends serving.
    pub fn start(extra: &str) -> WaypointMesh {
        WaypointMesh::start_spec(spec(), extra)
    }

    /// Like [`WaypointMesh::start`] on another layout: [`spec`] made dual stack, for one.
    pub fn start_spec(spec: ClusterSpec, extra: &str) -> WaypointMesh {
        let mut cluster = Cluster::start(spec).expect("cluster starts");
        cluster
            .write_state_file(
                "waypoint.yaml",
                &format!("{GATEWAY_YAML}---{ROUTE_YAML}{extra}"),
            )
            .expect("waypoint state");
        cluster.start_all_daemons().expect("daemons become ready");
        WaypointMesh::with_waypoint(cluster, &[])
    }

    /// Starts the waypoint (with `flags`) and the backends on a cluster whose daemons run.
    pub fn with_waypoint(mut cluster: Cluster, flags: &[&str]) -> WaypointMesh {
        let waypoint = cluster
            .start_waypoint("mesh/waypoint", flags)
            .expect("waypoint starts");
        let v1 = cluster.pod("mesh/v1").serve_http(8080, "v1").expect("v1");
        let v2 = cluster.pod("mesh/v2").serve_http(8080, "v2").expect("v2");
        WaypointMesh {
            cluster,
            waypoint,
            v1,
            v2,
        }
    }

    /// `count` curl requests from `mesh/client` to `reviews` + `path` on one connection.
    pub fn curl(&self, version: HttpVersion, path: &str, count: usize) -> CurlRun {
        let url = format!("http://{REVIEWS}{path}");
        self.cluster
            .pod("mesh/client")
            .curl(version, &url, count, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("curl {url}: {e:#}"))
    }

    /// `count` HTTP/2 requests on one connection (`meshhttp get`; curl cannot reuse one).
    pub fn h2_get(&self, path: &str, count: usize) -> CurlRun {
        let url = format!("http://{REVIEWS}{path}");
        self.cluster
            .pod("mesh/client")
            .http_get(HttpVersion::Http2, &url, count, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("meshhttp get {url}: {e:#}"))
    }

    /// One request from pod `from` to `reviews` + `path`: status and body.
    pub fn request(&self, from: &str, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
        let url = format!("http://{REVIEWS}{path}");
        self.cluster
            .pod(from)
            .request(method, &url, headers, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{method} {url} from {from}: {e:#}"))
    }

    /// IP of pod `key`.
    pub fn ip(&self, key: &str) -> Ipv4Addr {
        self.cluster.pod(key).ip
    }

    /// Every request the two backends answered.
    pub fn backend_requests(&self) -> Vec<serde_json::Value> {
        [&self.v1, &self.v2]
            .iter()
            .flat_map(|s| s.requests())
            .collect()
    }
}
