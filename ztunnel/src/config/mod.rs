//! The daemon's one validated configuration.
//!
//! Settings come from three places, strongest first: command-line flags, `ZTUNNEL_*`
//! environment variables, and an optional YAML file (`--config`), read by [`parse`]. Each is
//! declared once, as a field of [`RunArgs`] (`args`) with its flag, variable and default (which
//! `--help` shows); its value type ([`values`]) parses every source alike. [`Config::resolve`]
//! (`resolve`) then checks what one value alone cannot show (ports in use twice, marks sharing
//! bits, ranges), before any socket is bound or any program is loaded, so that a typo stops the
//! daemon with a message naming the setting instead of half-starting it.

mod args;
mod cni;
mod inbound;
mod parse;
mod resolve;
pub mod values;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::identity::{CaError, CertificateAuthority, FileCa, RemoteCa};

pub use args::RunArgs;
pub use cni::{
    CniConfig, CniDirArgs, CniInstall, CniInstallArgs, CniOwner, DEFAULT_CNI_BIN_DIR,
    DEFAULT_CNI_CONF_DIR,
};
pub use inbound::InboundLimits;
pub use parse::parse;
pub use values::{Congestion, Dur, LogFormat, Mark, Size, SourceKind, Upstream};

/// Default SPIFFE trust domain (also of `ztunnel ca init` and `ztunnel authz check`).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default lifetime of issued certificates (also of `ztunnel ca issue`).
pub const DEFAULT_CERT_TTL: Dur = Dur::hours(24);
/// The pod's service-account token, where Kubernetes mounts it.
pub const DEFAULT_CA_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Default admin port (read-only).
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// Default admin socket (every admin route; also where `ztunnel status` looks).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/ztunnel/admin.sock";
/// Default hand-over socket (where a new daemon of the node asks the running one for its
/// sockets).
pub const DEFAULT_HANDOVER_SOCKET: &str = "/run/ztunnel/handover.sock";
/// Default socket of the CNI endpoint (the plugin's default too).
pub const DEFAULT_CNI_SOCKET: &str = ztunnel_cni::DEFAULT_SOCKET;

/// A setting that failed validation. The message names the flag, its environment variable and
/// its file key, so the operator can find it wherever it was set.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a bad or missing value.
    #[error("invalid setting --{flag} (env {env}, config key `{flag}`): {message}")]
    Invalid {
        /// Long flag name, which is also the config file key.
        flag: String,
        /// Environment variable name.
        env: String,
        /// What is wrong and what would be right.
        message: String,
    },
    /// The `--config` file could not be read or parsed, or holds a bad value.
    #[error("config file {path}: {message}")]
    File {
        /// Path of the file.
        path: PathBuf,
        /// Read or parse error, with the offending key when known.
        message: String,
    },
    /// The command line is not one clap accepts, or asks for `--help` or `--version`:
    /// `clap::Error::exit` prints it and exits as clap does.
    #[error("{0}")]
    Usage(clap::Error),
}

fn invalid(flag: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag: flag.into(),
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
    /// Per-pod and node limits of the DNS sockets.
    pub limits: crate::dns::limits::Limits,
}

/// Capture settings; `None` in [`Config::capture`] when capture is off.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureConfig {
    /// Interfaces facing other nodes; empty: discovered from the routing table.
    pub uplinks: Vec<String>,
    /// The node's own traffic to enrolled pods is left alone (`--exempt-node-traffic`).
    pub exempt_node_traffic: bool,
    /// Mark set on steered packets.
    pub capture_mark: u32,
    /// Routing table of the local route for marked packets.
    pub route_table: u32,
    /// bpffs directory of the pinned capture state.
    pub pin_dir: PathBuf,
    /// Remove capture when the daemon stops (else it stays, failing closed).
    pub detach_on_exit: bool,
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
    /// The most a stream's HTTP/2 flow-control window grows to (`--hbone-stream-window`).
    pub stream_window: u32,
    /// The window streams start with (`--hbone-stream-window-start`); equal to
    /// `stream_window`: fixed windows.
    pub stream_window_start: u32,
    /// The most a stream may queue in h2 for sending (`--hbone-send-buffer`).
    pub send_buffer: u32,
    /// HTTP/2 flow-control window of a whole connection ([`connection_window`]).
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// TCP congestion control of HBONE sockets (`None`: the node's default).
    pub tcp_congestion: Option<String>,
    /// `TCP_NOTSENT_LOWAT` of HBONE sockets (`--hbone-notsent-lowat`; `None`: not set).
    pub notsent_lowat: Option<u32>,
}

impl HboneConfig {
    /// Where each connection's stream windows start and how far they may grow.
    pub fn window_bounds(&self) -> crate::hbone::window::Bounds {
        crate::hbone::window::Bounds {
            start: self.stream_window_start,
            max: self.stream_window,
        }
    }
}

/// Where the daemon's cluster state comes from, validated.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    /// Kubernetes YAML files, polled.
    File {
        /// File or directory.
        path: PathBuf,
        /// Poll interval.
        #[serde(with = "duration_str")]
        poll_interval: Duration,
        /// Largest file read, in bytes.
        max_file_size: u64,
    },
    /// Watches on a Kubernetes API server.
    Kube {
        /// Kubeconfig file; `None`: the in-cluster service account.
        kubeconfig: Option<PathBuf>,
    },
}

/// The HTTP/2 window of a whole HBONE connection that carries up to `streams` streams of
/// `stream_window` each: room for every stream's whole window, or `None` when that is more
/// than a window can be (2 GiB - 1). A stream whose destination stops reading keeps what it
/// was sent, and as much of the connection's window, in the receiving daemon until the
/// destination reads; with a smaller connection window a few such streams would hold all of it,
/// and the connection's other flows, whose destinations read, would wait for them forever.
/// Memory stays bounded by the stream windows (which only grow for destinations that keep up)
/// and the stream limits.
pub fn connection_window(streams: u32, stream_window: u32) -> Option<u32> {
    let w = u64::from(streams.max(1)) * u64::from(stream_window);
    u32::try_from(w).ok().filter(|&w| w <= MAX_WINDOW)
}

/// The largest HTTP/2 flow-control window (RFC 9113, section 6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Checks the state-source flags (`--source`, `--state`, `--state-poll-interval`,
/// `--kubeconfig`) together; the waypoint takes the same flags and calls this too.
pub fn source_config(
    kind: SourceKind,
    state: Option<PathBuf>,
    poll: Dur,
    max_file_size: Size,
    kubeconfig: Option<PathBuf>,
) -> Result<SourceConfig, ConfigError> {
    let exists = |flag: &'static str, p: &PathBuf| {
        if p.exists() {
            Ok(())
        } else {
            Err(invalid(flag, format!("{} does not exist", p.display())))
        }
    };
    match kind {
        SourceKind::File => {
            let path = state.ok_or_else(|| invalid("state", "is required with --source file"))?;
            exists("state", &path)?;
            if kubeconfig.is_some() {
                return Err(invalid("kubeconfig", "is only read with --source kube"));
            }
            Ok(SourceConfig::File {
                path,
                poll_interval: poll.0,
                max_file_size: u64::from(max_file_size.0),
            })
        }
        SourceKind::Kube => {
            if state.is_some() {
                return Err(invalid("state", "is only read with --source file"));
            }
            match &kubeconfig {
                Some(p) => exists("kubeconfig", p)?,
                None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() => {
                    return Err(invalid(
                        "kubeconfig",
                        "is required outside a pod (KUBERNETES_SERVICE_HOST is not set, so there \
                         is no in-cluster service account to use)",
                    ))
                }
                None => {}
            }
            Ok(SourceConfig::Kube { kubeconfig })
        }
    }
}

/// Where workload certificates come from, validated.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CaConfig {
    /// The built-in file CA (`--ca-dir`): the root key on this machine.
    File {
        /// Directory of root-cert.pem and root-key.pem.
        dir: PathBuf,
    },
    /// A CA service (`--ca-address`).
    Remote {
        /// `https://host:port`.
        address: String,
        /// Bearer token file.
        token_path: PathBuf,
        /// Trusted root certificate file.
        root_cert: PathBuf,
    },
}

impl CaConfig {
    /// The CA this describes: the file CA (created on first use), or a client of a CA service,
    /// which connects lazily so a CA that is down only delays certificates. The daemon and the
    /// waypoint both get theirs here.
    pub fn authority(&self, trust_domain: &str) -> Result<Arc<dyn CertificateAuthority>, CaError> {
        Ok(match self {
            CaConfig::File { dir } => Arc::new(FileCa::load_or_create(dir, trust_domain)?),
            CaConfig::Remote {
                address,
                token_path,
                root_cert,
            } => {
                tracing::info!(ca = %address, token = %token_path.display(),
                    "certificates come from a CA service");
                Arc::new(RemoteCa::new(address, token_path, root_cert)?)
            }
        })
    }
}

/// Checks the CA flags (`--ca-dir`, `--ca-address`, `--ca-token-path`, `--ca-root-cert`)
/// together; the waypoint takes the same flags and calls this too.
pub fn ca_config(
    dir: Option<PathBuf>,
    address: Option<String>,
    token_path: PathBuf,
    root_cert: Option<PathBuf>,
) -> Result<CaConfig, ConfigError> {
    match (dir, address) {
        (Some(_), Some(_)) => Err(invalid(
            "ca-address",
            "cannot be combined with --ca-dir: pick the file CA (root key on this node) or a CA \
             service, not both",
        )),
        (None, None) => Err(invalid(
            "ca-dir",
            "is required, or --ca-address for a CA service",
        )),
        (Some(dir), None) => {
            if root_cert.is_some() {
                return Err(invalid(
                    "ca-root-cert",
                    "is only read with --ca-address (the file CA has its root in --ca-dir)",
                ));
            }
            Ok(CaConfig::File { dir })
        }
        (None, Some(address)) => {
            if !address.starts_with("https://") {
                return Err(invalid(
                    "ca-address",
                    format!("`{address}`: expected https://host:port (the CA is reached over TLS)"),
                ));
            }
            let root_cert = root_cert
                .ok_or_else(|| invalid("ca-root-cert", "is required with --ca-address"))?;
            if !root_cert.exists() {
                return Err(invalid(
                    "ca-root-cert",
                    format!("{} does not exist", root_cert.display()),
                ));
            }
            Ok(CaConfig::Remote {
                address,
                token_path,
                root_cert,
            })
        }
    }
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
    /// Where cluster state comes from.
    pub source: SourceConfig,
    /// Where workload certificates are signed.
    pub ca: CaConfig,
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
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The hand-over socket, or `None` when hand-over is off (`--handover=false`).
    pub handover_socket: Option<PathBuf>,
    /// eBPF capture, or `None` when disabled.
    pub capture: Option<CaptureConfig>,
    /// The CNI endpoint, or `None` when `--cni-socket` is empty.
    pub cni: Option<CniConfig>,
    /// SO_MARK of every daemon socket.
    pub daemon_mark: u32,
    /// DNS proxy, or `None` when DNS capture is off.
    pub dns: Option<DnsConfig>,
    /// HBONE settings.
    pub hbone: HboneConfig,
    /// Limits of the HBONE server.
    pub hbone_inbound: InboundLimits,
    /// `text` or `json`.
    pub log_json: bool,
    /// tracing filter directive.
    pub log_level: String,
    /// Data-plane worker threads (one per CPU unless set).
    pub worker_threads: usize,
    /// TCP congestion control of sockets to and from local pods (`None`: the node's default).
    pub pod_tcp_congestion: Option<String>,
    /// Drop the mappings of code pages once ready (`memory::release_startup_memory`).
    pub release_code_pages: bool,
}

/// Durations print in the config dump as they are written in settings (`500ms`, `30s`, `24h`).
pub(crate) mod duration_str {
    use std::time::Duration;

    /// A duration as the settings write it (`500ms`, `10s`).
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::Dur(*d))
    }
}

#[cfg(test)]
mod tests;
