//! The daemon's one validated configuration.
//!
//! Settings come from three places, strongest first: command-line flags, `ZTUNNEL_*`
//! environment variables (clap reads both), and an optional YAML file (`--config`). Everything
//! is checked here, before any socket is bound or any program is loaded, so that a typo stops the
//! daemon with a message naming the setting instead of half-starting it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// Command line of the `ztunnel` binary.
#[derive(Debug, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Node-level ambient mesh tunnel daemon: captures enrolled pods' traffic with eBPF and \
             carries it between nodes in HBONE (HTTP/2 CONNECT over mutual TLS 1.3).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Operator commands; without one, the daemon runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Daemon settings.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands besides running the daemon.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the built-in file certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Summary of a running daemon: readiness, pods, captures, certificates, HBONE pool.
    Status(crate::status::StatusArgs),
    /// Workloads a running daemon knows, with enrollment and capture state.
    Workloads(crate::status::StatusArgs),
    /// Workload certificates a running daemon holds: identity, serial, expiry.
    Certificates(crate::status::StatusArgs),
    /// Explain authorization decisions (AuthorizationPolicy, PeerAuthentication).
    #[command(subcommand)]
    Authz(crate::authz::check::AuthzCommand),
}

/// `ztunnel ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the root key and certificate in --ca-dir unless they already exist.
    Init {
        /// Directory holding root-cert.pem and root-key.pem.
        #[arg(long, env = "ZTUNNEL_CA_DIR")]
        ca_dir: PathBuf,
        /// Trust domain written into the root certificate's subject.
        #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a workload certificate to files, for a peer outside the daemon (an Envoy sidecar
    /// joining the mesh, a test client). Creates the CA if absent.
    Issue {
        /// Directory holding root-cert.pem and root-key.pem.
        #[arg(long, env = "ZTUNNEL_CA_DIR")]
        ca_dir: PathBuf,
        /// SPIFFE identity, spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
        #[arg(long)]
        identity: String,
        /// Where to write the PEM certificate chain.
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the PEM private key (mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Certificate lifetime.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Every daemon setting as it may arrive from flags, environment or file. All optional here;
/// defaults and checks are applied by [`Config::resolve`].
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// YAML file with any of these settings (keys as the long flag names, e.g. `hbone-port: 15008`).
    /// Flags and environment variables override it.
    #[arg(long, env = "ZTUNNEL_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Kubernetes name of the node this daemon serves. Only pods with this `spec.nodeName` are
    /// captured and get certificates. Required.
    #[arg(long, env = "ZTUNNEL_NODE_NAME")]
    pub node_name: Option<String>,
    /// File or directory of Kubernetes YAML (Namespaces, Pods, Services), watched for changes.
    /// Required.
    #[arg(long, env = "ZTUNNEL_STATE")]
    pub state: Option<PathBuf>,
    /// How often the state source is checked for changes [default: 500ms].
    #[arg(long, env = "ZTUNNEL_STATE_POLL_INTERVAL")]
    pub state_poll_interval: Option<String>,
    /// Directory of the built-in file CA (root-cert.pem, root-key.pem; created when absent).
    /// Required.
    #[arg(long, env = "ZTUNNEL_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities [default: cluster.local].
    #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Istio root namespace: AuthorizationPolicy and PeerAuthentication objects there apply
    /// mesh-wide [default: istio-system].
    #[arg(long, env = "ZTUNNEL_ROOT_NAMESPACE")]
    pub root_namespace: Option<String>,
    /// Kubernetes cluster DNS domain [default: cluster.local].
    #[arg(long, env = "ZTUNNEL_CLUSTER_DOMAIN")]
    pub cluster_domain: Option<String>,
    /// Lifetime of issued workload certificates; renewed at half-life [default: 24h].
    #[arg(long, env = "ZTUNNEL_CERT_TTL")]
    pub cert_ttl: Option<String>,
    /// On SIGTERM or /quitquitquit, how long open connections may go on before the daemon
    /// detaches capture and exits [default: 30s].
    #[arg(long, env = "ZTUNNEL_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Node interfaces that face other nodes; inbound traffic is captured there
    /// (repeat or comma-separate) [default: eth0].
    #[arg(long, env = "ZTUNNEL_UPLINK", value_delimiter = ',')]
    #[serde(default)]
    pub uplink: Vec<String>,
    /// Load and attach the eBPF capture. `false` runs only the proxies (for debugging) [default: true].
    #[arg(long, env = "ZTUNNEL_CAPTURE")]
    pub capture: Option<bool>,
    /// Packet mark the capture programs set on steered packets; routed locally by an ip rule
    /// [default: 0x2000].
    #[arg(long, env = "ZTUNNEL_CAPTURE_MARK")]
    pub capture_mark: Option<String>,
    /// Socket mark on every socket of the daemon, so the capture never catches its own traffic
    /// [default: 0x539].
    #[arg(long, env = "ZTUNNEL_DAEMON_MARK")]
    pub daemon_mark: Option<String>,
    /// Routing table used for the local route of captured packets [default: 1501].
    #[arg(long, env = "ZTUNNEL_ROUTE_TABLE")]
    pub route_table: Option<u32>,
    /// Outbound capture listener (traffic leaving enrolled pods) [default: 15001].
    #[arg(long, env = "ZTUNNEL_OUTBOUND_PORT")]
    pub outbound_port: Option<u16>,
    /// Inbound plaintext capture listener (non-mesh sources to enrolled pods) [default: 15006].
    #[arg(long, env = "ZTUNNEL_INBOUND_PLAINTEXT_PORT")]
    pub inbound_plaintext_port: Option<u16>,
    /// HBONE (mTLS + HTTP/2 CONNECT) listener; also the port dialled on remote pods [default: 15008].
    #[arg(long, env = "ZTUNNEL_HBONE_PORT")]
    pub hbone_port: Option<u16>,
    /// Capture enrolled pods' DNS (UDP and TCP port 53) into the DNS proxy [default: true].
    #[arg(long, env = "ZTUNNEL_DNS_CAPTURE")]
    pub dns_capture: Option<bool>,
    /// DNS proxy listeners, UDP and TCP on 127.0.0.1 [default: 15053].
    #[arg(long, env = "ZTUNNEL_DNS_PORT")]
    pub dns_port: Option<u16>,
    /// Upstream resolvers for names outside the mesh, `ip` or `ip:port` (repeat or
    /// comma-separate) [default: the nameservers of /etc/resolv.conf].
    #[arg(long, env = "ZTUNNEL_DNS_UPSTREAM", value_delimiter = ',')]
    #[serde(default)]
    pub dns_upstream: Vec<String>,
    /// Time an upstream query may take before the pod gets SERVFAIL [default: 2s].
    #[arg(long, env = "ZTUNNEL_DNS_UPSTREAM_TIMEOUT")]
    pub dns_upstream_timeout: Option<String>,
    /// Admin API, bound to loopback [default: 15000].
    #[arg(long, env = "ZTUNNEL_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// Prometheus metrics [default: 15020].
    #[arg(long, env = "ZTUNNEL_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Readiness probe, `GET /healthz/ready` [default: 15021].
    #[arg(long, env = "ZTUNNEL_READINESS_PORT")]
    pub readiness_port: Option<u16>,
    /// Maximum concurrent flows on one pooled HBONE connection; never above what the peer
    /// allows [default: 100].
    #[arg(long, env = "ZTUNNEL_HBONE_MAX_STREAMS")]
    pub hbone_max_streams: Option<u32>,
    /// Connections to one destination from one source pod that concurrent flows get to
    /// themselves before they share one (up to --hbone-max-streams each): flows sharing a
    /// connection queue behind each other's bytes [default: 4].
    #[arg(long, env = "ZTUNNEL_HBONE_SPREAD")]
    pub hbone_spread: Option<u32>,
    /// A pooled HBONE connection without flows is closed after this long [default: 60s].
    #[arg(long, env = "ZTUNNEL_HBONE_IDLE_TIMEOUT")]
    pub hbone_idle_timeout: Option<String>,
    /// HTTP/2 flow-control window of each HBONE stream (one flow): how much a sender may have in
    /// flight before the receiving daemon has passed it on, which must cover the TCP buffers on
    /// the way or the flow stalls on it; also what a flow whose destination stops reading may
    /// hold in the receiving daemon. Bytes, or with KiB/MiB [default: 8MiB].
    #[arg(long, env = "ZTUNNEL_HBONE_STREAM_WINDOW")]
    #[serde(default, deserialize_with = "size_in_file")]
    pub hbone_stream_window: Option<String>,
    /// HTTP/2 flow-control window of each HBONE connection, shared by its streams; at least the
    /// stream window [default: 32MiB].
    #[arg(long, env = "ZTUNNEL_HBONE_CONNECTION_WINDOW")]
    #[serde(default, deserialize_with = "size_in_file")]
    pub hbone_connection_window: Option<String>,
    /// Unsent bytes an HBONE socket may hold in the kernel (`TCP_NOTSENT_LOWAT`); beyond it
    /// data waits in HTTP/2, where the flows sharing the connection take turns, instead of in
    /// the socket's single queue, where every flow waits behind what is already there. `0`
    /// leaves the kernel's default (no limit). Bytes, or with KiB/MiB [default: 128KiB].
    #[arg(long, env = "ZTUNNEL_HBONE_NOTSENT_LOWAT")]
    #[serde(default, deserialize_with = "size_in_file")]
    pub hbone_notsent_lowat: Option<String>,
    /// Timeout for TCP connect plus TLS handshake to a peer or a pod [default: 5s].
    #[arg(long, env = "ZTUNNEL_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. `info` or `info,ztunnel::hbone=debug` [default: info].
    #[arg(long, env = "ZTUNNEL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Data-plane worker threads, each serving whole flows on its own [default: one per CPU].
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// TCP congestion control of the daemon's sockets to and from pods of this node (captured
    /// outbound connections, the last hop into a pod); `default` keeps the node's. These legs
    /// only cross a veth, where pacing (BBR) only adds timer wake-ups [default: cubic].
    #[arg(long, env = "ZTUNNEL_POD_TCP_CONGESTION")]
    pub pod_tcp_congestion: Option<String>,
    /// TCP congestion control of HBONE connections between nodes, which cross the real
    /// network; `default` keeps the node's [default: default].
    #[arg(long, env = "ZTUNNEL_HBONE_TCP_CONGESTION")]
    pub hbone_tcp_congestion: Option<String>,
}

/// A setting that failed validation. The message names the flag, its environment variable and
/// its file key, so the operator can find it wherever it was set.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a bad or missing value.
    #[error("invalid setting --{flag} (env {env}, config key `{flag}`): {message}")]
    Invalid {
        /// Long flag name, which is also the config file key.
        flag: &'static str,
        /// Environment variable name.
        env: String,
        /// What is wrong and what would be right.
        message: String,
    },
    /// The `--config` file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// Path of the file.
        path: PathBuf,
        /// Read or parse error, with the offending key when known.
        message: String,
    },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        env: format!("ZTUNNEL_{}", flag.replace('-', "_").to_uppercase()),
        message: message.into(),
    }
}

/// Listener ports inside the node's network namespace.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ports {
    /// Outbound capture.
    pub outbound: u16,
    /// Inbound plaintext capture.
    pub inbound_plaintext: u16,
    /// HBONE inbound, and the port dialled on destination pods.
    pub hbone: u16,
    /// Admin API (loopback).
    pub admin: u16,
    /// Prometheus metrics.
    pub metrics: u16,
    /// Readiness probe.
    pub readiness: u16,
    /// DNS proxy (UDP and TCP).
    pub dns: u16,
}

/// DNS proxy settings; `None` in [`Config::dns`] when DNS capture is off.
#[derive(Debug, Clone, Serialize)]
pub struct DnsConfig {
    /// Upstream resolvers; empty means those of /etc/resolv.conf, read at start.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Upstream query timeout.
    #[serde(with = "duration_str")]
    pub upstream_timeout: Duration,
}

/// Capture settings; `None` in [`Config::capture`] when capture is off.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureConfig {
    /// Interfaces facing other nodes.
    pub uplinks: Vec<String>,
    /// Mark set on steered packets.
    pub capture_mark: u32,
    /// Routing table of the local route for marked packets.
    pub route_table: u32,
}

/// HBONE client pool and connection settings.
#[derive(Debug, Clone, Serialize)]
pub struct HboneConfig {
    /// Stream cap per pooled connection.
    pub max_streams: u32,
    /// Connections per pool key that concurrent flows get to themselves before sharing.
    pub spread: u32,
    /// Idle pooled connections are released after this.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// TCP connect + TLS handshake timeout.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// HTTP/2 stream flow-control window (`--hbone-stream-window`), sent in both directions;
    /// also the most a stream may queue in h2 for sending.
    pub stream_window: u32,
    /// HTTP/2 connection flow-control window (`--hbone-connection-window`).
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// TCP congestion control of HBONE sockets (`None`: the node's default).
    pub tcp_congestion: Option<String>,
    /// `TCP_NOTSENT_LOWAT` of HBONE sockets (`--hbone-notsent-lowat`; `None`: not set).
    pub notsent_lowat: Option<u32>,
}

/// The validated configuration the daemon runs with. Serialized for the admin config dump.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// This node's Kubernetes name.
    pub node_name: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Cluster DNS domain.
    pub cluster_domain: String,
    /// Istio root namespace (mesh-wide policies).
    pub root_namespace: String,
    /// State source (file or directory).
    pub state_path: PathBuf,
    /// State poll interval.
    #[serde(with = "duration_str")]
    pub state_poll_interval: Duration,
    /// File CA directory.
    pub ca_dir: PathBuf,
    /// Workload certificate lifetime.
    #[serde(with = "duration_str")]
    pub cert_ttl: Duration,
    /// Longest graceful drain on shutdown.
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
    /// Listener ports.
    pub ports: Ports,
    /// Address the admin API binds.
    pub admin_addr: IpAddr,
    /// eBPF capture, or `None` when disabled.
    pub capture: Option<CaptureConfig>,
    /// SO_MARK of every daemon socket.
    pub daemon_mark: u32,
    /// DNS proxy, or `None` when DNS capture is off.
    pub dns: Option<DnsConfig>,
    /// HBONE settings.
    pub hbone: HboneConfig,
    /// `text` or `json`.
    pub log_json: bool,
    /// tracing filter directive.
    pub log_level: String,
    /// Data-plane worker threads (one per CPU unless set).
    pub worker_threads: usize,
    /// TCP congestion control of sockets to and from local pods (`None`: the node's default).
    pub pod_tcp_congestion: Option<String>,
}

impl Config {
    /// Merges flags/env with the optional config file and validates the result.
    pub fn resolve(args: RunArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => RunArgs::default(),
        };
        let a = merge(args, file);

        let node_name = a
            .node_name
            .ok_or_else(|| invalid("node-name", "is required"))?;
        if !is_dns_label_ish(&node_name) {
            return Err(invalid(
                "node-name",
                format!("`{node_name}` is not a valid Kubernetes node name"),
            ));
        }
        let trust_domain = a
            .trust_domain
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
        if !is_dns_label_ish(&trust_domain) {
            return Err(invalid(
                "trust-domain",
                format!("`{trust_domain}` must be lowercase letters, digits, '-', '.' and '_'"),
            ));
        }
        let cluster_domain = a.cluster_domain.unwrap_or_else(|| "cluster.local".into());
        if !is_dns_label_ish(&cluster_domain) {
            return Err(invalid(
                "cluster-domain",
                format!("`{cluster_domain}` is not a DNS domain"),
            ));
        }
        let root_namespace = a
            .root_namespace
            .unwrap_or_else(|| crate::authz::DEFAULT_ROOT_NAMESPACE.into());
        if root_namespace.is_empty() || !is_dns_label_ish(&root_namespace) {
            return Err(invalid(
                "root-namespace",
                format!("`{root_namespace}` is not a Kubernetes namespace name"),
            ));
        }
        let state_path = a.state.ok_or_else(|| invalid("state", "is required"))?;
        if !state_path.exists() {
            return Err(invalid(
                "state",
                format!("{} does not exist", state_path.display()),
            ));
        }
        let ca_dir = a.ca_dir.ok_or_else(|| invalid("ca-dir", "is required"))?;
        let ports = Ports {
            outbound: a.outbound_port.unwrap_or(15001),
            inbound_plaintext: a.inbound_plaintext_port.unwrap_or(15006),
            hbone: a.hbone_port.unwrap_or(15008),
            admin: a.admin_port.unwrap_or(15000),
            metrics: a.metrics_port.unwrap_or(15020),
            readiness: a.readiness_port.unwrap_or(15021),
            dns: a.dns_port.unwrap_or(15053),
        };
        check_ports(&ports)?;

        let daemon_mark = parse_mark("daemon-mark", a.daemon_mark.as_deref(), 0x539)?;
        let capture = if a.capture.unwrap_or(true) {
            let capture_mark = parse_mark("capture-mark", a.capture_mark.as_deref(), 0x2000)?;
            if capture_mark & daemon_mark != 0 {
                return Err(invalid(
                    "capture-mark",
                    format!(
                        "{capture_mark:#x} shares bits with --daemon-mark {daemon_mark:#x}; the \
                         daemon's own packets would be routed to loopback"
                    ),
                ));
            }
            let uplinks = if a.uplink.is_empty() {
                vec!["eth0".to_string()]
            } else {
                a.uplink
            };
            if let Some(bad) = uplinks.iter().find(|u| u.is_empty() || u.len() > 15) {
                return Err(invalid(
                    "uplink",
                    format!("`{bad}` is not an interface name (1 to 15 characters)"),
                ));
            }
            let route_table = a.route_table.unwrap_or(1501);
            if matches!(route_table, 0 | 253..=255) {
                return Err(invalid(
                    "route-table",
                    format!("{route_table} is a reserved routing table; pick another"),
                ));
            }
            Some(CaptureConfig {
                uplinks,
                capture_mark,
                route_table,
            })
        } else {
            None
        };

        let max_streams = a.hbone_max_streams.unwrap_or(100);
        if max_streams == 0 {
            return Err(invalid("hbone-max-streams", "must be at least 1"));
        }
        let stream_window = window("hbone-stream-window", a.hbone_stream_window, "8MiB")?;
        let connection_window = window(
            "hbone-connection-window",
            a.hbone_connection_window,
            "32MiB",
        )?;
        if connection_window < stream_window {
            return Err(invalid(
                "hbone-connection-window",
                format!(
                    "{connection_window} bytes is less than --hbone-stream-window \
                     ({stream_window} bytes): one flow could never use its whole window"
                ),
            ));
        }
        let spread = a.hbone_spread.unwrap_or(4);
        if spread == 0 {
            return Err(invalid("hbone-spread", "must be at least 1"));
        }
        let hbone = HboneConfig {
            max_streams,
            spread,
            idle_timeout: duration("hbone-idle-timeout", a.hbone_idle_timeout, "60s")?,
            connect_timeout: duration("connect-timeout", a.connect_timeout, "5s")?,
            stream_window,
            connection_window,
            max_frame_size: 1024 * 1024,
            tcp_congestion: congestion("hbone-tcp-congestion", a.hbone_tcp_congestion, "default")?,
            notsent_lowat: match size(
                "hbone-notsent-lowat",
                a.hbone_notsent_lowat,
                "128KiB",
                0,
                "a size up to 2047MiB (0: no limit)",
            )? {
                0 => None,
                n => Some(n),
            },
        };
        let dns = if a.dns_capture.unwrap_or(true) {
            let mut upstreams = Vec::new();
            for u in &a.dns_upstream {
                let addr = u
                    .parse::<std::net::SocketAddr>()
                    .or_else(|_| u.parse::<IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| {
                        invalid(
                            "dns-upstream",
                            format!("`{u}`: expected an IP address or ip:port"),
                        )
                    })?;
                upstreams.push(addr);
            }
            Some(DnsConfig {
                upstreams,
                upstream_timeout: duration("dns-upstream-timeout", a.dns_upstream_timeout, "2s")?,
            })
        } else {
            None
        };
        let cert_ttl = duration("cert-ttl", a.cert_ttl, "24h")?;
        if cert_ttl < Duration::from_secs(60) {
            return Err(invalid("cert-ttl", "must be at least 1m"));
        }
        let log_json = match a.log_format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log-format",
                    format!("`{other}`: expected `text` or `json`"),
                ))
            }
        };
        let log_level = a.log_level.unwrap_or_else(|| "info".into());
        if let Err(e) = crate::telemetry::parse_log_filter(&log_level) {
            return Err(invalid("log-level", e));
        }
        Ok(Config {
            node_name,
            trust_domain,
            cluster_domain,
            root_namespace,
            state_path,
            state_poll_interval: duration("state-poll-interval", a.state_poll_interval, "500ms")?,
            ca_dir,
            cert_ttl,
            drain_timeout: duration("drain-timeout", a.drain_timeout, "30s")?,
            ports,
            admin_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            capture,
            daemon_mark,
            dns,
            hbone,
            log_json,
            log_level,
            worker_threads: match a.worker_threads {
                Some(0) => return Err(invalid("worker-threads", "must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            pod_tcp_congestion: congestion("pod-tcp-congestion", a.pod_tcp_congestion, "cubic")?,
        })
    }
}

fn read_file(path: &Path) -> Result<RunArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.into(),
        message: e.to_string(),
    })?;
    let de = serde_yaml::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError::File {
        path: path.into(),
        message: format!("key `{}`: {}", e.path(), e.inner()),
    })
}

/// Flags and environment (already merged by clap) win over the file.
fn merge(cli: RunArgs, file: RunArgs) -> RunArgs {
    RunArgs {
        config: cli.config,
        node_name: cli.node_name.or(file.node_name),
        state: cli.state.or(file.state),
        state_poll_interval: cli.state_poll_interval.or(file.state_poll_interval),
        ca_dir: cli.ca_dir.or(file.ca_dir),
        trust_domain: cli.trust_domain.or(file.trust_domain),
        root_namespace: cli.root_namespace.or(file.root_namespace),
        cluster_domain: cli.cluster_domain.or(file.cluster_domain),
        cert_ttl: cli.cert_ttl.or(file.cert_ttl),
        drain_timeout: cli.drain_timeout.or(file.drain_timeout),
        uplink: if cli.uplink.is_empty() {
            file.uplink
        } else {
            cli.uplink
        },
        capture: cli.capture.or(file.capture),
        capture_mark: cli.capture_mark.or(file.capture_mark),
        daemon_mark: cli.daemon_mark.or(file.daemon_mark),
        route_table: cli.route_table.or(file.route_table),
        outbound_port: cli.outbound_port.or(file.outbound_port),
        inbound_plaintext_port: cli.inbound_plaintext_port.or(file.inbound_plaintext_port),
        hbone_port: cli.hbone_port.or(file.hbone_port),
        dns_capture: cli.dns_capture.or(file.dns_capture),
        dns_port: cli.dns_port.or(file.dns_port),
        dns_upstream: if cli.dns_upstream.is_empty() {
            file.dns_upstream
        } else {
            cli.dns_upstream
        },
        dns_upstream_timeout: cli.dns_upstream_timeout.or(file.dns_upstream_timeout),
        admin_port: cli.admin_port.or(file.admin_port),
        metrics_port: cli.metrics_port.or(file.metrics_port),
        readiness_port: cli.readiness_port.or(file.readiness_port),
        hbone_max_streams: cli.hbone_max_streams.or(file.hbone_max_streams),
        hbone_idle_timeout: cli.hbone_idle_timeout.or(file.hbone_idle_timeout),
        hbone_stream_window: cli.hbone_stream_window.or(file.hbone_stream_window),
        hbone_connection_window: cli.hbone_connection_window.or(file.hbone_connection_window),
        hbone_notsent_lowat: cli.hbone_notsent_lowat.or(file.hbone_notsent_lowat),
        hbone_spread: cli.hbone_spread.or(file.hbone_spread),
        connect_timeout: cli.connect_timeout.or(file.connect_timeout),
        log_format: cli.log_format.or(file.log_format),
        log_level: cli.log_level.or(file.log_level),
        worker_threads: cli.worker_threads.or(file.worker_threads),
        pod_tcp_congestion: cli.pod_tcp_congestion.or(file.pod_tcp_congestion),
        hbone_tcp_congestion: cli.hbone_tcp_congestion.or(file.hbone_tcp_congestion),
    }
}

/// A congestion control algorithm name as the kernel takes it (`TCP_CONGESTION`, at most 15
/// bytes), or `None` for `default`. Whether the kernel has it is checked before binding.
fn congestion(
    flag: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Option<String>, ConfigError> {
    let v = value.unwrap_or_else(|| default.to_string());
    if v == "default" {
        return Ok(None);
    }
    let valid = !v.is_empty()
        && v.len() < 16
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(invalid(
            flag,
            format!("{v:?} is not a congestion control name (e.g. cubic, bbr, reno) or `default`"),
        ));
    }
    Ok(Some(v))
}

fn check_ports(p: &Ports) -> Result<(), ConfigError> {
    let all = [
        ("outbound-port", p.outbound),
        ("inbound-plaintext-port", p.inbound_plaintext),
        ("hbone-port", p.hbone),
        ("admin-port", p.admin),
        ("metrics-port", p.metrics),
        ("readiness-port", p.readiness),
        ("dns-port", p.dns),
    ];
    for (i, (flag, port)) in all.iter().enumerate() {
        if *port == 0 {
            return Err(invalid(flag, "port 0 is not allowed"));
        }
        if let Some((other, _)) = all[..i].iter().find(|(_, q)| q == port) {
            return Err(invalid(
                flag,
                format!("port {port} is already used by --{other}"),
            ));
        }
    }
    Ok(())
}

fn parse_mark(flag: &'static str, value: Option<&str>, default: u32) -> Result<u32, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    };
    match parsed {
        Ok(0) | Err(_) => Err(invalid(
            flag,
            format!("`{v}`: expected a non-zero mark such as 0x539"),
        )),
        Ok(m) => Ok(m),
    }
}

/// A size in the YAML file may be a string (`8MiB`) or a plain number of bytes.
fn size_in_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Text(String),
        Bytes(u64),
    }
    Ok(Option::<Size>::deserialize(d)?.map(|s| match s {
        Size::Text(t) => t,
        Size::Bytes(n) => n.to_string(),
    }))
}

/// An HTTP/2 flow-control window: between the protocol's initial 64 KiB and its maximum of
/// 2^31 - 1 bytes (RFC 9113, 6.9.1).
fn window(flag: &'static str, value: Option<String>, default: &str) -> Result<u32, ConfigError> {
    size(
        flag,
        value,
        default,
        65_535,
        "a size from 65535 bytes to 2047MiB",
    )
}

/// A size in bytes, or a whole number of KiB or MiB, from `min` to 2^31 - 1 bytes (what the
/// kernel and HTTP/2 take); `expected` says the range in the error.
fn size(
    flag: &'static str,
    value: Option<String>,
    default: &str,
    min: u64,
    expected: &str,
) -> Result<u32, ConfigError> {
    let v = value.unwrap_or_else(|| default.into());
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let scale: Option<u64> = match unit {
        "" => Some(1),
        "KiB" => Some(1024),
        "MiB" => Some(1024 * 1024),
        _ => None,
    };
    let bytes = scale.and_then(|k| num.parse::<u64>().ok()?.checked_mul(k));
    match bytes {
        Some(b) if (min..=i32::MAX as u64).contains(&b) => Ok(b as u32),
        _ => Err(invalid(
            flag,
            format!("`{v}`: expected {expected}, in bytes or with KiB or MiB (e.g. 4MiB)"),
        )),
    }
}

fn duration(
    flag: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or_else(|| default.into());
    parse_duration(&v).ok_or_else(|| {
        invalid(
            flag,
            format!("`{v}`: expected a duration such as 500ms, 30s, 5m or 24h"),
        )
    })
}

/// Parses `<number><unit>` with unit ms, s, m or h.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

fn is_dns_label_ish(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
}

/// Durations print as `<n>ms` in the config dump, the same form they are written in.
mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests;
