//! Prometheus metrics under Istio's names, so existing Grafana dashboards and Kiali work
//! unchanged, plus the daemon's own gauges (HBONE pool, capture, certificates).
//!
//! One [`Metrics`] per daemon holds the registry. Connection labels are resolved once per
//! connection ([`Metrics::open`]); the returned [`ConnMeter`] holds the counters of that label
//! set, so the copy loops add bytes with one atomic add per chunk and no allocation or lookup.
//! Other modules (DNS, …) register their own families with [`Metrics::register`].

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::flow::FlowReport;
use crate::identity::{SpiffeId, WorkloadCert};
use crate::splice::ByteSink;
use crate::state::Workload;

/// Content type of [`Metrics::encode`]'s output: Prometheus text format 0.0.4, which every
/// Prometheus version and `promtool check metrics` read.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A count as a gauge value (gauges are `i64`; a count beyond it saturates).
pub fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Istio's label value for anything not known.
const UNKNOWN: &str = "unknown";

/// Cluster name reported for every workload (Istio's default cluster ID).
pub const CLUSTER: &str = "Kubernetes";

/// Label enums: each variant's value is written once, for the metrics and the access log.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// The value as Istio writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    };
}

label_enum!(
    /// Which end of a flow reports it.
    Reporter {
        /// The daemon of the client's node.
        Source => "source",
        /// The daemon of the server's node.
        Destination => "destination",
        /// A waypoint (L7 proxy), per request.
        Waypoint => "waypoint",
    }
);

label_enum!(
    /// How a flow travels.
    Protocol {
        /// Plain TCP.
        Tcp => "TCP",
        /// Inside an HBONE tunnel (or handed over in-process between two enrolled pods).
        Hbone => "HBONE",
    }
);

label_enum!(
    /// Envoy-style response flags: why a connection ended before or without data.
    ResponseFlag {
        /// A normal connection.
        None => "-",
        /// No route: unknown or unreachable destination, or a malformed request.
        NoRoute => "NR",
        /// The upstream (pod, peer daemon) could not be reached or refused.
        UpstreamFailure => "UF",
        /// Refused by authorization.
        Denied => "DENY",
        /// The upstream did not answer in time (a waypoint's request timeout).
        UpstreamTimeout => "UT",
        /// The client went away before the response was complete.
        DownstreamTerminated => "DC",
    }
);

label_enum!(
    /// Whether the connection was protected by mutual TLS.
    SecurityPolicy {
        /// HBONE.
        MutualTls => "mutual_tls",
        /// Plain TCP.
        None => "none",
    }
);

impl From<Protocol> for SecurityPolicy {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Hbone => SecurityPolicy::MutualTls,
            Protocol::Tcp => SecurityPolicy::None,
        }
    }
}

/// Istio's standard TCP metric labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// Which end reports.
    pub reporter: Reporter,
    /// Source workload name (Deployment, …).
    pub source_workload: String,
    /// Source workload namespace.
    pub source_workload_namespace: String,
    /// Source SPIFFE identity.
    pub source_principal: String,
    /// Source canonical service (`app` label…).
    pub source_app: String,
    /// Source canonical revision (`version` label…).
    pub source_version: String,
    /// Source cluster.
    pub source_cluster: String,
    /// Destination service FQDN.
    pub destination_service: String,
    /// Destination service name.
    pub destination_service_name: String,
    /// Destination service namespace.
    pub destination_service_namespace: String,
    /// Destination workload name.
    pub destination_workload: String,
    /// Destination workload namespace.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE identity.
    pub destination_principal: String,
    /// Destination canonical service.
    pub destination_app: String,
    /// Destination canonical revision.
    pub destination_version: String,
    /// Destination cluster.
    pub destination_cluster: String,
    /// Always `tcp` here.
    pub request_protocol: &'static str,
    /// `-` for a normal connection, else why it ended.
    pub response_flags: ResponseFlag,
    /// `mutual_tls` for HBONE, `none` for plain TCP.
    pub connection_security_policy: SecurityPolicy,
}

impl ConnLabels {
    /// The label set of one flow as `report` describes it, ended with `flag`.
    pub fn new(report: &FlowReport<'_>, flag: ResponseFlag, cluster_domain: &str) -> ConnLabels {
        let unknown = || UNKNOWN.to_string();
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            w.map_or_else(unknown, |w| f(w).to_string())
        };
        let principal = |id: Option<&SpiffeId>| id.map_or_else(unknown, ToString::to_string);
        let cluster = |w: Option<&Workload>| w.map_or_else(unknown, |_| CLUSTER.to_string());
        let (src, dst, service) = (report.src_workload, report.dst_workload, report.service);
        ConnLabels {
            reporter: report.reporter,
            source_workload: field(src, |w| &w.workload_name),
            source_workload_namespace: field(src, |w| &w.namespace),
            source_principal: principal(report.src_identity),
            source_app: field(src, Workload::canonical_app),
            source_version: field(src, Workload::canonical_version),
            source_cluster: cluster(src),
            destination_service: service.map_or_else(unknown, |s| {
                format!("{}.{}.svc.{}", s.name, s.namespace, cluster_domain)
            }),
            destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
            destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
            destination_workload: field(dst, |w| &w.workload_name),
            destination_workload_namespace: field(dst, |w| &w.namespace),
            destination_principal: principal(report.dst_identity),
            destination_app: field(dst, Workload::canonical_app),
            destination_version: field(dst, Workload::canonical_version),
            destination_cluster: cluster(dst),
            request_protocol: "tcp",
            response_flags: flag,
            connection_security_policy: report.protocol.into(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    kind: &'static str,
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeapLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaptureStateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// The daemon's metrics. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Cluster DNS domain, for the destination service's FQDN.
    cluster_domain: String,
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
    /// Open HBONE client connections in the pool.
    pub pool_connections: Gauge,
    /// Flows over pooled HBONE client connections.
    pub pool_streams: Gauge,
    /// Local pods in the capture's enrolled map.
    pub capture_enrolled_pods: Gauge,
    /// Interfaces (uplinks and pod veths) the capture program is attached to.
    pub capture_attached_programs: Gauge,
    cert_expiry: Family<IdentityLabels, Gauge>,
    worker_connections: Family<WorkerLabels, Gauge>,
    policies_invalid: Family<PolicyLabels, Gauge>,
    capture_drops: Family<DropLabels, Counter>,
    capture_pods: Family<CaptureStateLabels, Gauge>,
    heap: Family<HeapLabels, Gauge>,
}

impl Metrics {
    /// A registry with every family the daemon itself exports; services are named in the
    /// cluster DNS domain `cluster_domain`.
    pub fn new(cluster_domain: &str) -> Arc<Metrics> {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            cluster_domain: cluster_domain.to_string(),
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            pool_connections: Gauge::default(),
            pool_streams: Gauge::default(),
            capture_enrolled_pods: Gauge::default(),
            capture_attached_programs: Gauge::default(),
            cert_expiry: Family::default(),
            worker_connections: Family::default(),
            policies_invalid: Family::default(),
            capture_drops: Family::default(),
            capture_pods: Family::default(),
            heap: Family::default(),
        };
        // Counters get the `_total` suffix from the encoder.
        r.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (server to client direction), counted as they move",
            m.sent.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (client to server direction), counted as they move",
            m.received.clone(),
        );
        r.register(
            "ztunnel_hbone_pool_connections",
            "Open pooled HBONE client connections",
            m.pool_connections.clone(),
        );
        r.register(
            "ztunnel_hbone_pool_streams",
            "Flows in progress over pooled HBONE client connections",
            m.pool_streams.clone(),
        );
        r.register(
            "ztunnel_capture_enrolled_pods",
            "Local pods whose traffic is captured",
            m.capture_enrolled_pods.clone(),
        );
        r.register(
            "ztunnel_capture_attached_programs",
            "Interfaces the capture program is attached to (uplinks and pod veths)",
            m.capture_attached_programs.clone(),
        );
        r.register(
            "ztunnel_capture_pods",
            "Enrolled local pods by capture state: `captured`, or `not_captured` (its \
             interface or programs are not in place; the daemon is not ready meanwhile)",
            m.capture_pods.clone(),
        );
        r.register(
            "ztunnel_capture_dropped_packets",
            "Packets the capture programs dropped: `spoofed_source` (an enrolled pod's address \
             entering the node elsewhere than through its interface), `no_daemon` (to be \
             captured while no daemon listened), `ipv6_extension_header` (IPv6 from or to an \
             enrolled pod with an extension header, which could hide TCP from capture); \
             counted in pinned maps, so across restarts",
            m.capture_drops.clone(),
        );
        r.register(
            "ztunnel_workload_certificate_expiry_timestamp_seconds",
            "Expiry of each local workload's certificate, Unix seconds",
            m.cert_expiry.clone(),
        );
        r.register(
            "ztunnel_worker_connections",
            "Accepted connections each data-plane worker thread is serving (captured flows, inbound HBONE connections)",
            m.worker_connections.clone(),
        );
        r.register(
            "ztunnel_heap_bytes",
            "The allocator's heap: bytes in use, and bytes free but kept by it (given back to the kernel after bursts and as free heap grows)",
            m.heap.clone(),
        );
        r.register(
            "ztunnel_policies_invalid",
            "Policies in the current state that failed validation and are enforced failing closed, by kind and action (PeerAuthentication: the mode they are read as, STRICT)",
            m.policies_invalid.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("istio_build", "Istio component build info", build);
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        Arc::new(m)
    }

    /// Lets another module register its own metric families in the shared registry.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Counts a flow as opened, ending with `flag`, and returns the handles its bytes and
    /// close go to.
    pub fn open(&self, report: &FlowReport<'_>, flag: ResponseFlag) -> ConnMeter {
        let labels = &ConnLabels::new(report, flag, &self.cluster_domain);
        self.opened.get_or_create(labels).inc();
        ConnMeter {
            closed: self.closed.get_or_create_owned(labels),
            sent: self.sent.get_or_create_owned(labels),
            received: self.received.get_or_create_owned(labels),
        }
    }

    /// Replaces the certificate expiry gauges with `certs`.
    pub fn set_certificates(&self, certs: &[(SpiffeId, Option<Arc<WorkloadCert>>)]) {
        self.cert_expiry.clear();
        for (id, cert) in certs {
            let Some(cert) = cert else { continue };
            let secs = cert
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            self.cert_expiry
                .get_or_create(&IdentityLabels {
                    identity: id.to_string(),
                })
                .set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
    }

    /// Sets the per-worker connection gauge from [`crate::workers::Workers::loads`].
    pub fn set_worker_loads(&self, loads: &[usize]) {
        for (i, n) in loads.iter().enumerate() {
            self.worker_connections
                .get_or_create(&WorkerLabels {
                    worker: i.to_string(),
                })
                .set(gauge(*n));
        }
    }

    /// Sets the heap gauges from [`crate::memory::heap`].
    pub fn set_heap(&self, heap: crate::memory::Heap) {
        for (state, bytes) in [("in_use", heap.in_use), ("free", heap.free)] {
            self.heap
                .get_or_create(&HeapLabels { state })
                .set(gauge(bytes));
        }
    }

    /// Replaces the invalid-policy gauges with `counts` (by kind and action).
    pub fn set_invalid_policies(
        &self,
        counts: &std::collections::BTreeMap<(&'static str, &'static str), usize>,
    ) {
        self.policies_invalid.clear();
        for ((kind, action), n) in counts {
            self.policies_invalid
                .get_or_create(&PolicyLabels { kind, action })
                .set(gauge(*n));
        }
    }

    /// Sets the enrolled pods per capture state (both states always present).
    pub fn set_capture_pods(&self, captured: usize, not_captured: usize) {
        for (state, n) in [("captured", captured), ("not_captured", not_captured)] {
            self.capture_pods
                .get_or_create(&CaptureStateLabels { state })
                .set(gauge(n));
        }
    }

    /// Brings the capture drop counters up to the totals the eBPF maps hold (`reason` label).
    pub fn set_capture_drops(&self, totals: &[(&'static str, u64)]) {
        for (reason, total) in totals {
            let c = self.capture_drops.get_or_create(&DropLabels { reason });
            let now = c.get();
            if *total > now {
                c.inc_by(*total - now);
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            tracing::warn!("metrics encoding failed");
        }
        openmetrics_to_prometheus(&out)
    }
}

/// Turns the encoder's OpenMetrics text into Prometheus text format 0.0.4: a counter family's
/// HELP and TYPE name its samples (`x_total`, not `x`), and the OpenMetrics-only `# UNIT` and
/// `# EOF` lines go. Everything else is the same in both formats.
fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = header {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Seconds until `t`, negative when past (for status output).
pub fn seconds_until(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// One open connection's counters. Dropping it counts the connection closed.
#[derive(Debug)]
pub struct ConnMeter {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl ConnMeter {
    /// Where a splice whose TCP socket is the *client* reports: what it reads from the socket
    /// the client sent (received), what it writes back went to the client (sent).
    pub fn client_side(&self) -> ByteSink {
        ByteSink::new(vec![self.received.clone()], vec![self.sent.clone()])
    }

    /// Where a splice whose TCP socket is the *server* reports.
    pub fn server_side(&self) -> ByteSink {
        ByteSink::new(vec![self.sent.clone()], vec![self.received.clone()])
    }
}

impl Drop for ConnMeter {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_prometheus_text() {
        let m = Metrics::new("cluster.local");
        let report = FlowReport {
            reporter: Reporter::Source,
            protocol: Protocol::Tcp,
            src: "10.0.0.1:4000".parse().expect("addr"),
            dst: "10.0.0.2:80".parse().expect("addr"),
            src_workload: None,
            dst_workload: None,
            src_identity: None,
            dst_identity: None,
            service: None,
            waypoint: None,
            start: std::time::Instant::now(),
        };
        let meter = m.open(&report, ResponseFlag::UpstreamFailure);
        meter.client_side().to_tunnel(7);
        drop(meter);
        let text = m.encode();
        assert!(
            text.contains(
                "istio_tcp_received_bytes_total{reporter=\"source\",source_workload=\"unknown\""
            ),
            "{text}"
        );
        assert!(
            text.contains("response_flags=\"UF\",connection_security_policy=\"none\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE istio_tcp_connections_opened_total counter\n"));
        assert!(text.contains("# HELP istio_tcp_sent_bytes_total "));
        assert!(text.contains("# TYPE istio_build gauge\n"));
        assert!(!text.contains("# EOF"));
    }
}
