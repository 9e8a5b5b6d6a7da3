//! Envoy as the waypoint arm of `cargo xtask bench waypoint`: the same L7 hop as this project's
//! waypoint, in the waypoint's pod, with the waypoint's identity, in the shape Istio gives a
//! waypoint's Envoy:
//!
//! ```text
//! <pod-ip>:15008  HBONE terminator: mTLS 1.3 (waypoint certificate, client certificate
//!                 required), HTTP/2 CONNECT, the tunnel's bytes handed to
//! main_internal   an internal listener: HTTP/1.1 or h2c (codec AUTO), route to the backend
//!                 cluster, file access log, upstream HTTP in the client's version, through
//! connect_originate  an internal listener: one HTTP/2 CONNECT per upstream connection over
//!                 mTLS 1.3 to the backend pod's 15008, the backend's SPIFFE ID required
//! ```
//!
//! Internal listeners (`envoy.bootstrap.internal_listener`) are how Istio chains those stages
//! inside one Envoy without loopback sockets. The HBONE sockets use the sidecar baseline's TLS
//! context ([`super::sidecar::tls_context`]) and lifted circuit breakers.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use serde_json::{json, Value};

use super::sidecar::{tls_context, unlimited_circuit_breakers};

/// The backend the Envoy waypoint routes every request to.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The endpoint pod's IP and application port (the CONNECT authority).
    pub endpoint: SocketAddrV4,
    /// The endpoint pod's SPIFFE ID, required of its node daemon's HBONE server.
    pub identity: String,
}

/// Endpoints of a cluster whose one endpoint is the internal listener `listener`.
fn internal_endpoints(listener: &str) -> Value {
    json!([{"lb_endpoints": [{"endpoint": {"address": {
        "envoy_internal_address": {"server_listener_name": listener}}}}]}])
}

fn router() -> Value {
    json!([{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}])
}

/// The configuration of Envoy as the waypoint at `pod_ip` (certificate, key and root in
/// `dir`), routing every HTTP request to `backend` and logging one JSON line per request to
/// `access_log`.
pub fn config(pod_ip: Ipv4Addr, dir: &Path, backend: &Backend, access_log: &Path) -> Value {
    let hbone_in = json!({
        "name": "hbone_inbound",
        "address": {"socket_address": {"address": pod_ip.to_string(), "port_value": 15008}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": tls_context(dir, json!({"prefix": "spiffe://cluster.local/"})),
            }},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "hbone",
                "codec_type": "HTTP2",
                "http2_protocol_options": {"allow_connect": true},
                "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                "route_config": {"virtual_hosts": [{"name": "connect", "domains": ["*"],
                    "routes": [{"match": {"connect_matcher": {}}, "route": {
                        "cluster": "main_internal",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
                "http_filters": router(),
            }}],
        }],
    });
    let fields = [
        ("method", "%REQ(:METHOD)%"),
        ("path", "%REQ(:PATH)%"),
        ("authority", "%REQ(:AUTHORITY)%"),
        ("protocol", "%PROTOCOL%"),
        ("status", "%RESPONSE_CODE%"),
        ("response_flags", "%RESPONSE_FLAGS%"),
        ("duration_ms", "%DURATION%"),
        ("bytes_received", "%BYTES_RECEIVED%"),
        ("bytes_sent", "%BYTES_SENT%"),
        ("upstream", "%UPSTREAM_HOST%"),
    ];
    let json_format: serde_json::Map<String, Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let http = json!({
        "name": "main_internal",
        "internal_listener": {},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "waypoint",
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                            "route": {"cluster": "backend", "timeout": "0s"}}]}]},
            "http_filters": router(),
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": access_log.display().to_string(),
                "log_format": {"json_format": json_format}}}],
        }}]}],
    });
    let originate = json!({
        "name": "connect_originate",
        "internal_listener": {},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "connect_originate",
            "cluster": "hbone_backend",
            "tunneling_config": {"hostname": backend.endpoint.to_string()},
        }}]}],
    });
    let unlimited = unlimited_circuit_breakers();
    let clusters = json!([
        {
            "name": "main_internal",
            "type": "STATIC",
            "connect_timeout": "1s",
            "circuit_breakers": unlimited,
            "load_assignment": {"cluster_name": "main_internal",
                "endpoints": internal_endpoints("main_internal")},
        },
        {
            "name": "backend",
            "type": "STATIC",
            "connect_timeout": "1s",
            "circuit_breakers": unlimited,
            // HTTP/1.1 clients are forwarded in HTTP/1.1, HTTP/2 clients in HTTP/2, as the
            // project's waypoint does.
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "use_downstream_protocol_config": {
                    "http_protocol_options": {}, "http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "backend",
                "endpoints": internal_endpoints("connect_originate")},
        },
        {
            "name": "hbone_backend",
            "type": "STATIC",
            "connect_timeout": "1s",
            "circuit_breakers": unlimited,
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "outbound",
                "common_tls_context": tls_context(dir, json!({"exact": backend.identity})),
            }},
            "load_assignment": {"cluster_name": "hbone_backend", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": backend.endpoint.ip().to_string(), "port_value": 15008}}}}]}]},
        },
    ]);
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}],
        "static_resources": {"listeners": [hbone_in, http, originate], "clusters": clusters},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hbone_in_http_routing_and_hbone_out_are_chained_through_internal_listeners() {
        let backend = Backend {
            endpoint: "10.244.1.12:8080".parse().expect("addr"),
            identity: "spiffe://cluster.local/ns/bench/sa/backend".into(),
        };
        let c = config(
            Ipv4Addr::new(10, 244, 2, 11),
            Path::new("/x"),
            &backend,
            Path::new("/x/access.log"),
        );
        let l = c["static_resources"]["listeners"].as_array().expect("list");
        let names: Vec<&str> = l.iter().filter_map(|l| l["name"].as_str()).collect();
        assert_eq!(
            names,
            ["hbone_inbound", "main_internal", "connect_originate"]
        );
        assert_eq!(
            l[2]["filter_chains"][0]["filters"][0]["typed_config"]["tunneling_config"]["hostname"],
            "10.244.1.12:8080"
        );
        let clusters = c["static_resources"]["clusters"].as_array().expect("list");
        let addr = |i: usize| {
            clusters[i]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                .clone()
        };
        assert_eq!(
            addr(0)["envoy_internal_address"]["server_listener_name"],
            "main_internal"
        );
        assert_eq!(
            addr(1)["envoy_internal_address"]["server_listener_name"],
            "connect_originate"
        );
        assert_eq!(addr(2)["socket_address"]["port_value"], 15008);
    }
}
