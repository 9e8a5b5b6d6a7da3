//! The command line, and putting the waypoint together: identity and certificate from the
//! CA (the file CA or a CA service), state from the node daemon's sources (the YAML files or
//! the API server), the HBONE pool towards endpoints, the HBONE server on 15008,
//! drain on SIGTERM.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use ztunnel::config::{
    self, CaConfig, ConfigError, Dur, HboneConfig, LogFormat, Size, SourceConfig, SourceKind,
    DEFAULT_CA_TOKEN_PATH,
};
use ztunnel::drain::Drain;
use ztunnel::hbone::client::Pool;
use ztunnel::hbone::server::Server;
use ztunnel::identity::{CaError, CertError, CertManager, SpiffeId};
use ztunnel::socket::{Leg, PlainSockets, SocketFactory};
use ztunnel::source::SourceError;
use ztunnel::telemetry::metrics::CLUSTER;
use ztunnel::telemetry::Metrics;

use crate::admin::{self, AdminView, Readiness};
use crate::forward::Forwarder;
use crate::metrics::RequestMetrics;
use crate::server::Waypoint;
use crate::snapshot::{self, Snapshot};
use crate::upstream::Upstreams;

/// `waypoint` command line. Every flag is also an environment variable; the pod's own names
/// come from the downward API variables a Deployment sets.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "waypoint",
    version,
    about = "Ambient-mesh waypoint: L7 proxy behind HBONE",
    after_help = "Explain a request without sending it: waypoint check --help"
)]
pub struct Args {
    /// Where cluster state comes from, as for the node daemon: `file` (the Kubernetes YAML of
    /// `--state`) or `kube` (watches on the Kubernetes API server: `--kubeconfig`, else the
    /// pod's service account).
    #[arg(long, env = "WAYPOINT_SOURCE", default_value_t = SourceKind::File)]
    pub source: SourceKind,
    /// With `--source file`: file or directory of Kubernetes YAML (`.yaml`, `.yml`, `.json`),
    /// watched for changes. Required there.
    #[arg(long, env = "WAYPOINT_STATE")]
    pub state: Option<PathBuf>,
    /// With `--source file`: how often the files are checked for changes.
    #[arg(long, env = "WAYPOINT_STATE_POLL_INTERVAL", default_value_t = Dur::millis(500))]
    pub state_poll_interval: Dur,
    /// With `--source file`: the largest state file read; a bigger one keeps its last good
    /// content and is reported, naming the file.
    #[arg(long, env = "WAYPOINT_STATE_MAX_FILE_SIZE", default_value_t = Size::mib(16))]
    pub state_max_file_size: Size,
    /// With `--source kube`: kubeconfig file to reach the API server. Unset: the in-cluster
    /// service account.
    #[arg(long, env = "WAYPOINT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of the file CA, shared with the node daemons (`ztunnel ca init`). Exactly one
    /// of this and --ca-address is required.
    #[arg(long, env = "WAYPOINT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// A CA speaking Istio's certificate protocol (`ztunnel ca serve`, istiod), as
    /// `https://host:port`: the waypoint asks it for its own identity with its service-account
    /// token, and never holds the root key.
    #[arg(long, env = "WAYPOINT_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// With --ca-address: the service-account token presented to the CA, read on every
    /// request (projected tokens rotate).
    #[arg(long, env = "WAYPOINT_CA_TOKEN_PATH", default_value = DEFAULT_CA_TOKEN_PATH)]
    pub ca_token_path: PathBuf,
    /// With --ca-address: the mesh's root certificate (PEM), trusted for the CA's serving
    /// certificate and for peers' certificates. Required there.
    #[arg(long, env = "WAYPOINT_CA_ROOT_CERT")]
    pub ca_root_cert: Option<PathBuf>,
    /// SPIFFE trust domain.
    #[arg(long, env = "WAYPOINT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The waypoint pod's namespace (its identity's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The waypoint pod's service account (its identity's last segment).
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    pub service_account: String,
    /// The waypoint pod's name, sent in `baggage` to endpoints.
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pub pod_name: String,
    /// The waypoint pod's IPs, at most one per family: the sources of its connections to
    /// endpoints (a flow goes on in the family it came in), and the families it listens in by
    /// default. Repeat the flag, or give them comma-separated as the downward API's
    /// `status.podIPs` has them (`POD_IP=10.244.2.11,fd00:10:244:2::11`).
    #[arg(
        long = "pod-ip",
        env = "POD_IP",
        value_delimiter = ',',
        required = true
    )]
    pub pod_ip: Vec<IpAddr>,
    /// Cluster DNS domain, for the destination Service names in metrics.
    #[arg(long, env = "WAYPOINT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Name of the waypoint's Gateway (in --namespace), whose attached AuthorizationPolicies
    /// it enforces; by default the service account's name, as Istio names a waypoint's
    /// service account after its Gateway.
    #[arg(long, env = "WAYPOINT_GATEWAY_NAME")]
    pub gateway_name: Option<String>,
    /// Where `/config_dump` is served (keep it on loopback: it shows every policy).
    #[arg(long, env = "WAYPOINT_ADMIN_LISTEN", default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,
    /// Where `/healthz/ready` is served.
    #[arg(
        long,
        env = "WAYPOINT_READINESS_LISTEN",
        default_value = "0.0.0.0:15021"
    )]
    pub readiness_listen: SocketAddr,
    /// Where Prometheus scrapes `/metrics` (and `/stats/prometheus`).
    #[arg(long, env = "WAYPOINT_METRICS_LISTEN", default_value = "0.0.0.0:15020")]
    pub metrics_listen: SocketAddr,
    /// Where HBONE is accepted; repeatable (or comma-separated). Unset: port 15008 on the
    /// wildcard address of each family of --pod-ip (`0.0.0.0:15008`, and `[::]:15008` when the
    /// pod has an IPv6 address), so a dual-stack pod is reached in either family.
    #[arg(long, env = "WAYPOINT_LISTEN", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// The HBONE port dialled on endpoint pods.
    #[arg(long, env = "WAYPOINT_HBONE_PORT", default_value_t = 15008)]
    pub hbone_port: u16,
    /// Lifetime of the waypoint's certificate (renewed at half of it).
    #[arg(long, env = "WAYPOINT_CERT_TTL", default_value_t = Dur::hours(24))]
    pub cert_ttl: Dur,
    /// How long a stream may stay silent before it is taken for a server-first protocol and
    /// forwarded as bytes; HTTP clients speak first.
    #[arg(long, env = "WAYPOINT_SNIFF_TIMEOUT", default_value_t = Dur::secs(1))]
    pub sniff_timeout: Dur,
    /// Timeout of TCP connect plus TLS handshake to an endpoint.
    #[arg(long, env = "WAYPOINT_CONNECT_TIMEOUT", default_value_t = Dur::secs(5))]
    pub connect_timeout: Dur,
    /// On SIGTERM, how long streams in progress may finish.
    #[arg(long, env = "WAYPOINT_DRAIN_TIMEOUT", default_value_t = Dur::secs(30))]
    pub drain_timeout: Dur,
    /// HTTP/2 flow-control window of each HBONE stream.
    #[arg(long, env = "WAYPOINT_HBONE_STREAM_WINDOW", default_value_t = Size::mib(4))]
    pub hbone_stream_window: Size,
    /// Log format: `text` or `json`.
    #[arg(long, env = "WAYPOINT_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,access=warn`.
    #[arg(long, env = "WAYPOINT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Why the waypoint cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    /// A flag has a bad or missing value, or flags contradict each other.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The CA is unusable (file CA directory, CA service address or root certificate).
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    /// The certificate manager cannot start or issue.
    #[error("certificate: {0}")]
    Cert(#[from] CertError),
    /// The state source cannot be read at all.
    #[error(transparent)]
    State(#[from] SourceError),
    /// An HBONE listener cannot be bound.
    #[error("listen on {addr}: {error}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        error: std::io::Error,
    },
}

/// What the waypoint runs with, however it was configured.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The waypoint's identity.
    pub identity: SpiffeId,
    /// The pod's addresses, at most one per family, never empty: the source IPs of
    /// connections to endpoints, one family per flow.
    pub pod_ips: Vec<IpAddr>,
    /// `baggage` of the CONNECTs to endpoints.
    pub baggage: String,
    /// HBONE port of endpoint pods.
    pub hbone_port: u16,
    /// HBONE client and server settings.
    pub hbone: HboneConfig,
    /// See [`Args::sniff_timeout`].
    pub sniff_timeout: Duration,
    /// Cluster DNS domain.
    pub cluster_domain: String,
    /// Name of the waypoint's Gateway, in the identity's namespace.
    pub gateway: String,
}

impl Settings {
    /// `namespace/name` of the waypoint's Gateway.
    pub fn gateway_key(&self) -> String {
        format!("{}/{}", self.identity.namespace, self.gateway)
    }
}

impl Args {
    /// The state source these flags describe, checked as the daemon checks its own.
    pub fn source_config(&self) -> Result<SourceConfig, ConfigError> {
        config::source_config(
            self.source,
            self.state.clone(),
            self.state_poll_interval,
            self.state_max_file_size,
            self.kubeconfig.clone(),
        )
        .map_err(waypoint_env)
    }

    /// The CA these flags describe, checked as the daemon checks its own.
    pub fn ca_config(&self) -> Result<CaConfig, ConfigError> {
        config::ca_config(
            self.ca_dir.clone(),
            self.ca_address.clone(),
            self.ca_token_path.clone(),
            self.ca_root_cert.clone(),
        )
        .map_err(waypoint_env)
    }

    /// The pod's addresses: at least one, at most one per family.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            flag: "pod-ip".into(),
            env: "POD_IP".into(),
            message,
        };
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in &self.pod_ip {
            if ip.is_unspecified() {
                return Err(invalid(format!("{ip} is not a pod address")));
            }
            if let Some(other) = ips.iter().find(|o| o.is_ipv6() == ip.is_ipv6()) {
                return Err(invalid(format!(
                    "{other} and {ip} are of the same family; give one address per family \
                     (a dual-stack pod's IPv4 and IPv6 addresses)"
                )));
            }
            ips.push(*ip);
        }
        if ips.is_empty() {
            return Err(invalid("at least one address is required".into()));
        }
        Ok(ips)
    }

    /// Where HBONE is accepted: `--listen`, else port 15008 on the wildcard address of each
    /// family of `pod_ips`.
    pub fn listen_addrs(&self, pod_ips: &[IpAddr]) -> Vec<SocketAddr> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        pod_ips
            .iter()
            .map(|ip| {
                let any = if ip.is_ipv6() {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                };
                SocketAddr::new(any, DEFAULT_HBONE_PORT)
            })
            .collect()
    }

    /// The settings these flags describe.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let window = self.hbone_stream_window.0.max(65_535);
        if config::connection_window(STREAMS, window).is_none() {
            return Err(ConfigError::Invalid {
                flag: "hbone-stream-window".into(),
                env: "WAYPOINT_HBONE_STREAM_WINDOW".into(),
                message: format!(
                    "{window} bytes for each of up to {STREAMS} streams of a connection is more \
                     than an HTTP/2 connection window can hold (2 GiB - 1)"
                ),
            });
        }
        Ok(Settings {
            identity: SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account),
            pod_ips: self.pod_ips()?,
            baggage: format!(
                "k8s.cluster.name={CLUSTER},k8s.namespace.name={},k8s.pod.name={},service.name={},service.version=latest",
                self.namespace, self.pod_name, self.service_account
            ),
            hbone_port: self.hbone_port,
            hbone: hbone_config(window, self.connect_timeout.0),
            sniff_timeout: self.sniff_timeout.0,
            cluster_domain: self.cluster_domain.clone(),
            gateway: self
                .gateway_name
                .clone()
                .unwrap_or_else(|| self.service_account.clone()),
        })
    }
}

/// The port HBONE is accepted on when `--listen` is not given.
const DEFAULT_HBONE_PORT: u16 = 15008;

/// The daemon's checks name its `ZTUNNEL_*` variables; the waypoint's are `WAYPOINT_*`.
fn waypoint_env(e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Invalid { flag, message, .. } => ConfigError::Invalid {
            env: format!("WAYPOINT_{}", flag.replace('-', "_").to_uppercase()),
            flag,
            message,
        },
        other => other,
    }
}

/// Streams on one of the waypoint's HBONE connections.
const STREAMS: u32 = 100;

/// HBONE settings for a waypoint: the daemon's defaults, with a fixed `window` per stream, and all
/// streams to one endpoint on one connection (up to [`STREAMS`]) before another is dialled:
/// the waypoint's streams carry kept HTTP connections, not bulk flows that would hold each
/// other up.
pub fn hbone_config(window: u32, connect_timeout: Duration) -> HboneConfig {
    HboneConfig {
        max_streams: STREAMS,
        spread: 1,
        idle_timeout: Duration::from_secs(60),
        connect_timeout,
        stream_window: window,
        stream_window_start: window,
        send_buffer: window,
        connection_window: config::connection_window(STREAMS, window).unwrap_or(config::MAX_WINDOW),
        max_frame_size: 1 << 20,
        tcp_congestion: None,
        notsent_lowat: None,
    }
}

/// The HBONE server of a waypoint, ready for [`Server::run`] or [`Server::serve`]: certificates
/// for `settings.identity` from `certs`, endpoints dialled through `sockets`, requests counted
/// in `metrics`.
pub fn build(
    settings: &Settings,
    trust_domain: &str,
    certs: Arc<CertManager>,
    sockets: Arc<dyn SocketFactory>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: &Metrics,
    drain: Drain,
) -> (Arc<Server<Waypoint>>, Arc<Waypoint>) {
    certs.set_identities(&BTreeSet::from([settings.identity.clone()]));
    let pool = Pool::new(settings.hbone.clone(), certs.clone(), sockets.clone());
    let upstreams = Upstreams::new(
        pool,
        sockets,
        settings.identity.clone(),
        settings.pod_ips.clone(),
        settings.hbone_port,
        settings.baggage.clone(),
    );
    let forwarder = Forwarder::new(
        snapshots.clone(),
        upstreams.clone(),
        RequestMetrics::new(metrics, &settings.cluster_domain),
        &settings.gateway_key(),
    );
    let waypoint = Waypoint::new(
        settings.identity.clone(),
        snapshots,
        upstreams,
        forwarder,
        settings.sniff_timeout,
        drain.clone(),
    );
    let server = Server::new(
        settings.hbone.clone(),
        trust_domain,
        certs,
        waypoint.clone(),
        drain,
    );
    (server, waypoint)
}

/// Runs the waypoint until SIGTERM or Ctrl-C, then drains.
pub async fn run(args: Args) -> Result<(), WaypointError> {
    let settings = args.settings()?;
    let source_config = args.source_config()?;
    let ca = args.ca_config()?.authority(&args.trust_domain)?;
    let certs = CertManager::new(ca, args.cert_ttl.0)?;
    let mut source = ztunnel::source::open(&source_config, &args.trust_domain);
    let health = source.health();
    let (state_tx, state_rx) = watch::channel(Arc::new(source.initial()?));
    let first = Snapshot::from_state(state_rx.borrow().clone(), None);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(snapshot::follow(state_rx, tx));
    let drain = Drain::default();
    let ready = Readiness::new(drain.clone());
    let view = AdminView {
        identity: settings.identity.clone(),
        gateway: settings.gateway_key(),
        snapshots: rx.clone(),
        source: Some(health.clone()),
    };
    let sockets: Arc<dyn SocketFactory> = Arc::new(PlainSockets {
        connect_timeout: args.connect_timeout.0,
    });
    let metrics = Metrics::new(&args.cluster_domain);
    metrics.register(|r| health.register(r));
    let (server, _) = build(
        &settings,
        &args.trust_domain,
        certs.clone(),
        sockets.clone(),
        rx,
        &metrics,
        drain.clone(),
    );
    let listen = |addr: SocketAddr, leg| {
        sockets
            .listen(leg, addr, false)
            .map_err(|error| WaypointError::Listen { addr, error })
    };
    let mut listeners = Vec::new();
    for addr in args.listen_addrs(&settings.pod_ips) {
        listeners.push(listen(addr, Leg::Hbone)?);
    }
    let side_ports = [
        (
            args.metrics_listen,
            "metrics",
            admin::metrics(metrics, Some(health.clone())),
        ),
        (
            args.readiness_listen,
            "readiness",
            admin::readiness(ready.clone()),
        ),
        (args.admin_listen, "admin", admin::admin(view)),
    ];
    for (addr, port, answer) in side_ports {
        tokio::spawn(admin::serve(listen(addr, Leg::Node)?, port, answer));
    }
    // Not ready before the source holds a complete state: a Service or policy it has not
    // delivered yet would route or authorize wrongly.
    tokio::select! {
        biased;
        () = source.first_complete(&state_tx) => {}
        () = shutdown_signal() => {
            tracing::info!("stopped before the first complete state");
            return Ok(());
        }
    }
    ztunnel::source::log_applied(&state_tx.borrow(), None, None);
    ready.state_loaded();
    tokio::spawn(source.run(state_tx));
    certs
        .fetch(&settings.identity, args.connect_timeout.0.max(CERT_WAIT))
        .await?;
    ready.certificate_issued();
    let bound: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    let pod_ips: Vec<String> = settings.pod_ips.iter().map(ToString::to_string).collect();
    tracing::info!(listen = %bound.join(","), pod_ips = %pod_ips.join(","),
        identity = %settings.identity, "waypoint ready");
    let serving: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(server.clone().run(l)))
        .collect();
    shutdown_signal().await;
    tracing::info!("draining");
    drain.start();
    // No new connections; those open finish their streams (each holds a drain guard).
    for s in &serving {
        s.abort();
    }
    let left = drain.wait_idle(args.drain_timeout.0).await;
    tracing::info!(streams_cut = left, "waypoint stopped");
    Ok(())
}

/// The longest wait for the first certificate: a CA service may be restarting; the
/// certificate manager retries within it.
const CERT_WAIT: Duration = Duration::from_secs(30);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> Args {
        let base = ["waypoint", "--namespace", "ns", "--pod-ip", "10.0.0.1"];
        Args::parse_from(base.iter().chain(extra))
    }

    #[test]
    fn source_and_ca_flags_are_checked_as_the_daemon_checks_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8");
        let a = args(&["--state", d, "--ca-dir", d]);
        assert!(matches!(a.source_config(), Ok(SourceConfig::File { .. })));
        assert!(matches!(a.ca_config(), Ok(CaConfig::File { .. })));

        let err = |r: Result<(), ConfigError>| r.expect_err("refused").to_string();
        let both = args(&[
            "--state",
            d,
            "--ca-dir",
            d,
            "--ca-address",
            "https://ca:15012",
        ]);
        let e = err(both.ca_config().map(drop));
        assert!(
            e.contains("--ca-address") && e.contains("WAYPOINT_CA_ADDRESS"),
            "{e}"
        );
        let no_root = args(&["--state", d, "--ca-address", "https://ca:15012"]);
        let e = err(no_root.ca_config().map(drop));
        assert!(e.contains("--ca-root-cert"), "{e}");
        let kube_and_state = args(&["--source", "kube", "--state", d, "--ca-dir", d]);
        let e = err(kube_and_state.source_config().map(drop));
        assert!(e.contains("--state") && e.contains("WAYPOINT_STATE"), "{e}");
        let e = err(args(&["--ca-dir", d]).source_config().map(drop));
        assert!(e.contains("--state"), "{e}");
    }

    #[test]
    fn a_dual_stack_pod_gets_both_addresses_and_listens_in_both_families() {
        let ips = |a: &Args| a.pod_ips().map_err(|e| e.to_string());
        let one = args(&[]);
        assert_eq!(ips(&one), Ok(vec!["10.0.0.1".parse().expect("ip")]));
        assert_eq!(
            one.listen_addrs(&one.pod_ips().expect("ips")),
            ["0.0.0.0:15008".parse::<SocketAddr>().expect("addr")]
        );
        for dual in [
            args(&["--pod-ip", "fd00::1"]),
            Args::parse_from([
                "waypoint",
                "--namespace",
                "ns",
                "--pod-ip",
                "10.0.0.1,fd00::1",
            ]),
        ] {
            let got = dual.pod_ips().expect("two families");
            assert_eq!(
                got,
                [
                    "10.0.0.1".parse::<IpAddr>().expect("ip"),
                    "fd00::1".parse().expect("ip")
                ]
            );
            let listen: Vec<String> = dual
                .listen_addrs(&got)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(listen, ["0.0.0.0:15008", "[::]:15008"]);
            assert_eq!(dual.settings().expect("settings").pod_ips, got);
        }
        let explicit = args(&["--pod-ip", "fd00::1", "--listen", "[fd00::1]:15008"]);
        assert_eq!(
            explicit.listen_addrs(&explicit.pod_ips().expect("ips")),
            ["[fd00::1]:15008".parse::<SocketAddr>().expect("addr")]
        );
        let twice = ips(&args(&["--pod-ip", "10.0.0.2"])).expect_err("two IPv4");
        assert!(
            twice.contains("--pod-ip") && twice.contains("POD_IP") && twice.contains("same family"),
            "{twice}"
        );
        let any = ips(&Args::parse_from([
            "waypoint",
            "--namespace",
            "ns",
            "--pod-ip",
            "::",
        ]));
        assert!(any.is_err_and(|e| e.contains("not a pod address")));
    }
}
