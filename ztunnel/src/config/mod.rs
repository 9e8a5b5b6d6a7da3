//! The daemon's one validated configuration.
//!
//! Settings come from three places, strongest first: command-line flags, `ZTUNNEL_*`
//! environment variables, and an optional YAML file (`--config`), read by [`parse`]. Each is
//! declared once, as a field of [`RunArgs`] with its flag, variable and default (which `--help`
//! shows); its value type ([`values`]) parses every source alike. [`Config::resolve`] then checks
//! what one value alone cannot show (ports in use twice, marks sharing bits, ranges), before any
//! socket is bound or any program is loaded, so that a typo stops the daemon with a message
//! naming the setting instead of half-starting it.

mod cni;
mod inbound;
mod parse;
pub mod values;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args};
use serde::Serialize;

use crate::identity::{CaError, CertificateAuthority, FileCa, RemoteCa};

use cni::cni_config;
pub use cni::{
    CniConfig, CniDirArgs, CniInstall, CniInstallArgs, CniOwner, DEFAULT_CNI_BIN_DIR,
    DEFAULT_CNI_CONF_DIR,
};
use inbound::inbound_limits;
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

/// Every daemon setting, as flag (`--name`), environment variable (`ZTUNNEL_NAME`) and config
/// file key (`name`), with its default. Settings without a default are optional or checked by
/// [`Config::resolve`].
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// YAML file with any of these settings (keys as the long flag names, e.g. `hbone-port: 15008`).
    /// Flags and environment variables override it.
    #[arg(long, env = "ZTUNNEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kubernetes name of the node this daemon serves. Only pods with this `spec.nodeName` are
    /// captured and get certificates. Required.
    #[arg(long, env = "ZTUNNEL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where cluster state comes from: `file` (the Kubernetes YAML of `--state`) or `kube`
    /// (watches on the Kubernetes API server: `--kubeconfig`, else the pod's service account).
    #[arg(long, env = "ZTUNNEL_SOURCE", default_value_t = SourceKind::File)]
    pub source: SourceKind,
    /// With `--source file`: file or directory of Kubernetes YAML (Namespaces, Pods, Services,
    /// policies), watched for changes. Required there.
    #[arg(long, env = "ZTUNNEL_STATE")]
    pub state: Option<PathBuf>,
    /// With `--source file`: how often the files are checked for changes.
    #[arg(long, env = "ZTUNNEL_STATE_POLL_INTERVAL", default_value_t = Dur::millis(500))]
    pub state_poll_interval: Dur,
    /// With `--source file`: a state file larger than this is not read (its last good content
    /// stays in force and the error names the file), so one runaway file cannot exhaust the
    /// daemon's memory. Bytes, or with KiB/MiB.
    #[arg(long, env = "ZTUNNEL_STATE_MAX_FILE_SIZE", default_value_t = Size::mib(16))]
    pub state_max_file_size: Size,
    /// With `--source kube`: kubeconfig file to reach the API server. Unset: the in-cluster
    /// service account (token and CA under /var/run/secrets/kubernetes.io/serviceaccount).
    #[arg(long, env = "ZTUNNEL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of the built-in file CA (root-cert.pem, root-key.pem; created when absent):
    /// the node holds the mesh's root key, so only for a single machine (bench, demo). Exactly
    /// one of this and --ca-address is required.
    #[arg(long, env = "ZTUNNEL_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// A CA speaking Istio's certificate protocol (`ztunnel ca serve`, istiod), as
    /// `https://host:port`: workload certificates are signed there and the node never holds
    /// the root key.
    #[arg(long, env = "ZTUNNEL_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// With --ca-address: the service-account token presented to the CA, read on every
    /// request (projected tokens rotate).
    #[arg(long, env = "ZTUNNEL_CA_TOKEN_PATH", default_value = DEFAULT_CA_TOKEN_PATH)]
    pub ca_token_path: PathBuf,
    /// With --ca-address: the mesh's root certificate (PEM), trusted for the CA's serving
    /// certificate and for peers' workload certificates. Required there.
    #[arg(long, env = "ZTUNNEL_CA_ROOT_CERT")]
    pub ca_root_cert: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Istio root namespace: AuthorizationPolicy and PeerAuthentication objects there apply
    /// mesh-wide.
    #[arg(long, env = "ZTUNNEL_ROOT_NAMESPACE", default_value = crate::authz::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Kubernetes cluster DNS domain.
    #[arg(long, env = "ZTUNNEL_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Lifetime of issued workload certificates (at least 1m); renewed at half-life.
    #[arg(long, env = "ZTUNNEL_CERT_TTL", default_value_t = DEFAULT_CERT_TTL)]
    pub cert_ttl: Dur,
    /// On SIGTERM or /quitquitquit, how long open connections may go on before the daemon
    /// detaches capture and exits.
    #[arg(long, env = "ZTUNNEL_DRAIN_TIMEOUT", default_value_t = Dur::secs(30))]
    pub drain_timeout: Dur,
    /// Node interfaces that face other nodes; inbound traffic is captured there
    /// (repeat or comma-separate). Unset: found from the routing table, and kept in step on
    /// every capture sync (the interfaces of the default route, of routes via a gateway, and
    /// of connected subnets no local pod is on).
    #[arg(long, env = "ZTUNNEL_UPLINK", value_delimiter = ',')]
    pub uplink: Vec<String>,
    /// Let the node's own traffic (host-network processes, kubelet probes) reach enrolled pods
    /// directly, in plaintext, without policy or access log. Off: it goes through the inbound
    /// plaintext path like any non-mesh source, so STRICT mTLS refuses it.
    #[arg(
        long,
        env = "ZTUNNEL_EXEMPT_NODE_TRAFFIC",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false
    )]
    pub exempt_node_traffic: bool,
    /// Load and attach the eBPF capture. `false` runs only the proxies (for debugging).
    #[arg(long, env = "ZTUNNEL_CAPTURE", action = ArgAction::Set, default_value_t = true)]
    pub capture: bool,
    /// Packet mark the capture programs set on steered packets; routed locally by an ip rule.
    #[arg(long, env = "ZTUNNEL_CAPTURE_MARK", default_value_t = Mark(0x2000))]
    pub capture_mark: Mark,
    /// Socket mark on every socket of the daemon, so the capture never catches its own traffic.
    #[arg(long, env = "ZTUNNEL_DAEMON_MARK", default_value_t = Mark(0x539))]
    pub daemon_mark: Mark,
    /// Routing table used for the local route of captured packets.
    #[arg(long, env = "ZTUNNEL_ROUTE_TABLE", default_value_t = 1501)]
    pub route_table: u32,
    /// bpffs directory where capture pins its maps, program and links, so that capture
    /// outlives the daemon and fails closed; its nearest existing ancestor must be on a bpf
    /// filesystem mounted where it outlives the daemon (the host's `/sys/fs/bpf`). Unset:
    /// `/sys/fs/bpf/ztunnel/<node-name>`.
    #[arg(long, env = "ZTUNNEL_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// On SIGTERM, SIGINT or /quitquitquit, remove capture after draining (programs, pins, ip
    /// rule and route): enrolled pods' traffic then flows directly, outside the mesh. Without
    /// it capture stays attached and the pods' traffic is held until a daemon adopts it again
    /// (fail closed); `ztunnel uninstall` removes it later.
    #[arg(
        long,
        env = "ZTUNNEL_DETACH_ON_EXIT",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false
    )]
    pub detach_on_exit: bool,
    /// Unix socket (mode 0600, directory 0700) where the chained CNI plugin `ztunnel-cni`
    /// announces each new pod, so it is captured before its first packet; the plugin's
    /// `socket` must name the same path. Empty: no CNI endpoint (pods are captured once the
    /// state shows them).
    #[arg(long, env = "ZTUNNEL_CNI_SOCKET", default_value = DEFAULT_CNI_SOCKET)]
    pub cni_socket: String,
    /// How long a pod announced by the CNI plugin stays captured without appearing in the
    /// state (as a pod of this node with that address); then its capture is removed.
    #[arg(long, env = "ZTUNNEL_CNI_PENDING_TIMEOUT", default_value_t = Dur::secs(120))]
    pub cni_pending_timeout: Dur,
    /// Install `ztunnel-cni` on the node and keep it installed: copy the binary into
    /// --cni-bin-dir and add the plugin (talking to --cni-socket) to the chain of the node's
    /// CNI configuration in --cni-conf-dir, then re-check every 2s and add it back when the
    /// primary CNI rewrites its file. The entry stays when the daemon stops (pods wait for the
    /// next daemon); `ztunnel uninstall` removes it.
    #[arg(
        long,
        env = "ZTUNNEL_CNI_INSTALL",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false
    )]
    pub cni_install: bool,
    /// With --cni-install and `--source kube`: the DaemonSet running this daemon, as
    /// `<namespace>/<name>`. When the daemon stops (not for a hand-over) and that DaemonSet is
    /// gone or being deleted (the release was uninstalled), the daemon removes the plugin from
    /// the node, so the node's pods no longer wait for a daemon that will not come back; it
    /// stays when the API server cannot tell. Unset: the plugin stays.
    #[arg(long, env = "ZTUNNEL_CNI_OWNER")]
    pub cni_owner: Option<String>,
    /// What --cni-install installs, and where.
    #[command(flatten)]
    pub cni: CniInstallArgs,
    /// Outbound capture listener (traffic leaving enrolled pods).
    #[arg(long, env = "ZTUNNEL_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound plaintext capture listener (non-mesh sources to enrolled pods).
    #[arg(long, env = "ZTUNNEL_INBOUND_PLAINTEXT_PORT", default_value_t = 15006)]
    pub inbound_plaintext_port: u16,
    /// HBONE (mTLS + HTTP/2 CONNECT) listener; also the port dialled on remote pods.
    #[arg(long, env = "ZTUNNEL_HBONE_PORT", default_value_t = 15008)]
    pub hbone_port: u16,
    /// Capture enrolled pods' DNS (UDP and TCP port 53) into the DNS proxy.
    #[arg(long, env = "ZTUNNEL_DNS_CAPTURE", action = ArgAction::Set, default_value_t = true)]
    pub dns_capture: bool,
    /// DNS proxy listeners, UDP and TCP on 127.0.0.1.
    #[arg(long, env = "ZTUNNEL_DNS_PORT", default_value_t = 15053)]
    pub dns_port: u16,
    /// Upstream resolvers for names outside the mesh, `ip` or `ip:port` (repeat or
    /// comma-separate). Unset: the nameservers of /etc/resolv.conf.
    #[arg(long, env = "ZTUNNEL_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<Upstream>,
    /// Time an upstream query may take before the pod gets SERVFAIL.
    #[arg(long, env = "ZTUNNEL_DNS_UPSTREAM_TIMEOUT", default_value_t = Dur::secs(2))]
    pub dns_upstream_timeout: Dur,
    /// DNS queries (UDP and TCP) one pod may send per second, in bursts of as many; more are
    /// dropped (UDP) or answered REFUSED (TCP), so one pod cannot starve its neighbours. `0`: no
    /// limit.
    #[arg(long, env = "ZTUNNEL_DNS_POD_MAX_QPS", default_value_t = 2000)]
    pub dns_pod_max_qps: u32,
    /// UDP DNS queries of one pod being answered at once (e.g. waiting for the upstream);
    /// more are dropped and the pod's resolver retries.
    #[arg(long, env = "ZTUNNEL_DNS_POD_MAX_INFLIGHT", default_value_t = 64)]
    pub dns_pod_max_inflight: usize,
    /// UDP DNS queries being answered at once on the node, all pods together.
    #[arg(long, env = "ZTUNNEL_DNS_MAX_INFLIGHT", default_value_t = 1024)]
    pub dns_max_inflight: usize,
    /// TCP DNS connections one pod may hold open; more are closed at once.
    #[arg(
        long,
        env = "ZTUNNEL_DNS_POD_MAX_TCP_CONNECTIONS",
        default_value_t = 16
    )]
    pub dns_pod_max_tcp_connections: usize,
    /// TCP DNS connections open on the node, all pods together.
    #[arg(long, env = "ZTUNNEL_DNS_MAX_TCP_CONNECTIONS", default_value_t = 256)]
    pub dns_max_tcp_connections: usize,
    /// A TCP DNS connection without a query (or with a query stalled half-way) for this long
    /// is closed.
    #[arg(long, env = "ZTUNNEL_DNS_TCP_IDLE_TIMEOUT", default_value_t = Dur::secs(10))]
    pub dns_tcp_idle_timeout: Dur,
    /// Admin API, bound to loopback; read-only (any process in the node's network namespace
    /// reaches it).
    #[arg(long, env = "ZTUNNEL_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT)]
    pub admin_port: u16,
    /// Unix socket (mode 0600) serving every admin route, including those that change the
    /// daemon (`POST /logging`, `POST /quitquitquit`); `ztunnel status` reads it. Its directory
    /// is created (mode 0700) when missing.
    #[arg(long, env = "ZTUNNEL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Hand over the listening sockets between daemons of this node (a rolling restart or
    /// upgrade without refused connections): at start, take them from the daemon answering on
    /// --handover-socket, if one does; while running, give them to the next daemon that asks.
    #[arg(long, env = "ZTUNNEL_HANDOVER", action = ArgAction::Set, default_value_t = true)]
    pub handover: bool,
    /// Unix socket (mode 0600, directory created 0700) of the hand-over. Both daemons must see
    /// the same file (a shared hostPath); each node's daemon needs its own.
    #[arg(long, env = "ZTUNNEL_HANDOVER_SOCKET", default_value = DEFAULT_HANDOVER_SOCKET)]
    pub handover_socket: PathBuf,
    /// Prometheus metrics.
    #[arg(long, env = "ZTUNNEL_METRICS_PORT", default_value_t = 15020)]
    pub metrics_port: u16,
    /// Readiness probe, `GET /healthz/ready`.
    #[arg(long, env = "ZTUNNEL_READINESS_PORT", default_value_t = 15021)]
    pub readiness_port: u16,
    /// Maximum concurrent flows on one pooled HBONE connection; never above what the peer
    /// allows.
    #[arg(long, env = "ZTUNNEL_HBONE_MAX_STREAMS", default_value_t = 100)]
    pub hbone_max_streams: u32,
    /// Connections to one destination from one source pod that concurrent flows get to
    /// themselves before they share one (up to --hbone-max-streams each): flows sharing a
    /// connection queue behind each other's bytes.
    #[arg(long, env = "ZTUNNEL_HBONE_SPREAD", default_value_t = 4)]
    pub hbone_spread: u32,
    /// A pooled HBONE connection without flows is closed after this long.
    #[arg(long, env = "ZTUNNEL_HBONE_IDLE_TIMEOUT", default_value_t = Dur::secs(60))]
    pub hbone_idle_timeout: Dur,
    /// HTTP/2 flow-control window of each HBONE stream (one flow): how much a sender may have in
    /// flight before the receiving daemon has passed it on, which must cover the TCP buffers on
    /// the way or the flow stalls on it; also what a flow whose destination stops reading may
    /// hold in the receiving daemon. Bytes, or with KiB/MiB, from 65535 bytes.
    #[arg(long, env = "ZTUNNEL_HBONE_STREAM_WINDOW", default_value_t = Size::mib(8))]
    pub hbone_stream_window: Size,
    /// HTTP/2 flow-control window each HBONE stream starts with. A connection's window doubles,
    /// up to --hbone-stream-window, each time one of its flows has passed two windows on to a
    /// destination that keeps up, and returns to this one when a destination stalls (a write
    /// to it waits 100 ms) or the connection idles; so a flow whose destination reads slowly
    /// holds about this much in the receiving daemon. At or above --hbone-stream-window: fixed
    /// windows of that size. Bytes, or with KiB/MiB, from 65535 bytes.
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_STREAM_WINDOW_START",
        default_value_t = Size::kib(256)
    )]
    pub hbone_stream_window_start: Size,
    /// HTTP/2 flow-control window of each HBONE connection, shared by its streams; at least the
    /// stream window.
    #[arg(long, env = "ZTUNNEL_HBONE_CONNECTION_WINDOW", default_value_t = Size::mib(32))]
    pub hbone_connection_window: Size,
    /// Bytes one HBONE stream may queue in the sending daemon beyond what its socket took: more
    /// lets a flow's sender run further ahead of a slow connection, at that much memory per
    /// busy flow; what a flow sends beyond it waits in the pod's own socket, as it would
    /// without a mesh. `0`: the stream window. Bytes, or with KiB/MiB, from 16 KiB.
    #[arg(long, env = "ZTUNNEL_HBONE_SEND_BUFFER", default_value_t = Size::kib(256))]
    pub hbone_send_buffer: Size,
    /// Unsent bytes an HBONE socket may hold in the kernel (`TCP_NOTSENT_LOWAT`); beyond it
    /// data waits in HTTP/2, where the flows sharing the connection take turns, instead of in
    /// the socket's single queue, where every flow waits behind what is already there. `0`
    /// leaves the kernel's default (no limit). Bytes, or with KiB/MiB.
    #[arg(long, env = "ZTUNNEL_HBONE_NOTSENT_LOWAT", default_value_t = Size::kib(128))]
    pub hbone_notsent_lowat: Size,
    /// Timeout for TCP connect plus TLS handshake to a peer or a pod.
    #[arg(long, env = "ZTUNNEL_CONNECT_TIMEOUT", default_value_t = Dur::secs(5))]
    pub connect_timeout: Dur,
    /// Inbound HBONE connections (15008) in their TLS and HTTP/2 handshakes at once; further
    /// connections are closed at accept until some finish. A handshake holds memory before
    /// the peer has proven anything, so this bounds what peers that never finish can take.
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_INBOUND_MAX_HANDSHAKES",
        default_value_t = 1024
    )]
    pub hbone_inbound_max_handshakes: usize,
    /// Inbound HBONE connections open at once, handshakes included; further connections are
    /// closed at accept.
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_INBOUND_MAX_CONNECTIONS",
        default_value_t = 16384
    )]
    pub hbone_inbound_max_connections: usize,
    /// Concurrent streams (flows) on one inbound HBONE connection, advertised to the client
    /// in HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    #[arg(long, env = "ZTUNNEL_HBONE_INBOUND_MAX_STREAMS", default_value_t = 100)]
    pub hbone_inbound_max_streams: u32,
    /// Inbound HBONE connections one client identity may hold, and, separately, one source
    /// address; further ones are refused.
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_INBOUND_PEER_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub hbone_inbound_peer_max_connections: usize,
    /// Inbound HBONE streams one client identity may hold open, and, separately, one source
    /// address; further ones are answered 429. Every stream holds a descriptor (its
    /// connection to the pod).
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_INBOUND_PEER_MAX_STREAMS",
        default_value_t = 8192
    )]
    pub hbone_inbound_peer_max_streams: usize,
    /// Open-file descriptors kept free for everyone else: once fewer than this are left
    /// below the process's limit, new inbound HBONE connections and streams are refused to
    /// the client identities and source addresses holding at least their even share of the
    /// inbound descriptors (the abuser first), while other peers and local pods' outbound
    /// flows still get descriptors.
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_INBOUND_FD_HEADROOM",
        default_value_t = 2048
    )]
    pub hbone_inbound_fd_headroom: usize,
    /// Largest HTTP/2 request header list an inbound HBONE stream may carry
    /// (SETTINGS_MAX_HEADER_LIST_SIZE); larger requests get 431. Bytes, or with KiB/MiB.
    #[arg(long, env = "ZTUNNEL_HBONE_INBOUND_MAX_HEADER_LIST_SIZE", default_value_t = Size::kib(64))]
    pub hbone_inbound_max_header_list_size: Size,
    /// Time an inbound HBONE client has from its TCP connection until its TLS handshake and
    /// HTTP/2 preface are done; then the connection is closed.
    #[arg(long, env = "ZTUNNEL_HBONE_INBOUND_HANDSHAKE_TIMEOUT", default_value_t = Dur::secs(5))]
    pub hbone_inbound_handshake_timeout: Dur,
    /// An inbound HBONE connection is sent an HTTP/2 PING this often; one that does not answer
    /// within --hbone-inbound-keepalive-timeout is closed with its streams.
    #[arg(long, env = "ZTUNNEL_HBONE_INBOUND_KEEPALIVE_INTERVAL", default_value_t = Dur::secs(30))]
    pub hbone_inbound_keepalive_interval: Dur,
    /// How long an inbound HBONE client has to answer a PING.
    #[arg(long, env = "ZTUNNEL_HBONE_INBOUND_KEEPALIVE_TIMEOUT", default_value_t = Dur::secs(10))]
    pub hbone_inbound_keepalive_timeout: Dur,
    /// TCP keepalive idle time of inbound HBONE sockets: after this long without traffic the
    /// kernel probes the peer (three probes a third of it apart), so a peer that vanished
    /// without a FIN (powered off, partitioned) is released even while HTTP/2 is stuck behind
    /// unacknowledged data.
    #[arg(long, env = "ZTUNNEL_HBONE_INBOUND_TCP_KEEPALIVE", default_value_t = Dur::secs(60))]
    pub hbone_inbound_tcp_keepalive: Dur,
    /// Log format: `text` or `json`.
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,ztunnel::hbone=debug`.
    #[arg(long, env = "ZTUNNEL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Data-plane worker threads, each serving whole flows on its own. Unset: one per CPU.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// TCP congestion control of the daemon's sockets to and from pods of this node (captured
    /// outbound connections, the last hop into a pod); `default` keeps the node's. These legs
    /// only cross a veth, where pacing (BBR) only adds timer wake-ups.
    #[arg(long, env = "ZTUNNEL_POD_TCP_CONGESTION", default_value_t = Congestion::named("cubic"))]
    pub pod_tcp_congestion: Congestion,
    /// TCP congestion control of HBONE connections between nodes, which cross the real
    /// network; `default` keeps the node's.
    #[arg(long, env = "ZTUNNEL_HBONE_TCP_CONGESTION", default_value_t = Congestion(None))]
    pub hbone_tcp_congestion: Congestion,
    /// Once ready, drop the mappings of the daemon's code pages (they fault back in from the
    /// page cache when run), so the idle daemon keeps resident only the code it uses. Set to
    /// `false` to profile the daemon or attach uprobes to it: dropped pages lose breakpoints and
    /// look unmapped to profilers.
    #[arg(long, env = "ZTUNNEL_RELEASE_CODE_PAGES", action = ArgAction::Set, default_value_t = true)]
    pub release_code_pages: bool,
}

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
    /// HTTP/2 connection flow-control window (`--hbone-connection-window`).
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

/// The DNS proxy's settings, with its limits checked.
fn dns_config(a: &RunArgs) -> Result<DnsConfig, ConfigError> {
    let at_least_one = |flag: &'static str, v: usize| {
        if v == 0 {
            Err(invalid(flag, "must be at least 1"))
        } else {
            Ok(v)
        }
    };
    let limits = crate::dns::limits::Limits {
        max_inflight: at_least_one("dns-max-inflight", a.dns_max_inflight)?,
        pod_max_inflight: at_least_one("dns-pod-max-inflight", a.dns_pod_max_inflight)?,
        pod_max_qps: a.dns_pod_max_qps,
        max_tcp: at_least_one("dns-max-tcp-connections", a.dns_max_tcp_connections)?,
        pod_max_tcp: at_least_one("dns-pod-max-tcp-connections", a.dns_pod_max_tcp_connections)?,
        tcp_idle: a.dns_tcp_idle_timeout.0,
    };
    if limits.tcp_idle.is_zero() {
        return Err(invalid("dns-tcp-idle-timeout", "must be above 0"));
    }
    Ok(DnsConfig {
        upstreams: a.dns_upstream.iter().map(|u| u.0).collect(),
        upstream_timeout: a.dns_upstream_timeout.0,
        limits,
    })
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

impl Config {
    /// Validates settings read by [`parse`] (which has merged the `--config` file into them).
    pub fn resolve(a: RunArgs) -> Result<Config, ConfigError> {
        let dns = if a.dns_capture {
            Some(dns_config(&a)?)
        } else {
            None
        };
        let hbone_inbound = inbound_limits(&a)?;
        let node_name = a
            .node_name
            .ok_or_else(|| invalid("node-name", "is required"))?;
        if !is_dns_label_ish(&node_name) {
            return Err(invalid(
                "node-name",
                format!("`{node_name}` is not a valid Kubernetes node name"),
            ));
        }
        let trust_domain = a.trust_domain;
        if !is_dns_label_ish(&trust_domain) {
            return Err(invalid(
                "trust-domain",
                format!("`{trust_domain}` must be lowercase letters, digits, '-', '.' and '_'"),
            ));
        }
        let cluster_domain = a.cluster_domain;
        if !is_dns_label_ish(&cluster_domain) {
            return Err(invalid(
                "cluster-domain",
                format!("`{cluster_domain}` is not a DNS domain"),
            ));
        }
        let root_namespace = a.root_namespace;
        if !is_dns_label_ish(&root_namespace) {
            return Err(invalid(
                "root-namespace",
                format!("`{root_namespace}` is not a Kubernetes namespace name"),
            ));
        }
        let source = source_config(
            a.source,
            a.state,
            a.state_poll_interval,
            a.state_max_file_size,
            a.kubeconfig,
        )?;
        let ca = ca_config(a.ca_dir, a.ca_address, a.ca_token_path, a.ca_root_cert)?;
        let ports = Ports {
            outbound: a.outbound_port,
            inbound_plaintext: a.inbound_plaintext_port,
            hbone: a.hbone_port,
            admin: a.admin_port,
            metrics: a.metrics_port,
            readiness: a.readiness_port,
            dns: a.dns_port,
        };
        check_ports(&ports)?;
        let admin_socket = unix_socket_path("admin-socket", a.admin_socket)?;
        let handover_socket = if a.handover {
            let path = unix_socket_path("handover-socket", a.handover_socket)?;
            if path == admin_socket {
                return Err(invalid(
                    "handover-socket",
                    format!(
                        "{} is also --admin-socket; pick another path",
                        path.display()
                    ),
                ));
            }
            Some(path)
        } else {
            None
        };

        let daemon_mark = a.daemon_mark.0;
        let capture = if a.capture {
            let capture_mark = a.capture_mark.0;
            if capture_mark & daemon_mark != 0 {
                return Err(invalid(
                    "capture-mark",
                    format!(
                        "{capture_mark:#x} shares bits with --daemon-mark {daemon_mark:#x}; the \
                         daemon's own packets would be routed to loopback"
                    ),
                ));
            }
            let uplinks = a.uplink;
            if let Some(bad) = uplinks.iter().find(|u| u.is_empty() || u.len() > 15) {
                return Err(invalid(
                    "uplink",
                    format!("`{bad}` is not an interface name (1 to 15 characters)"),
                ));
            }
            let route_table = a.route_table;
            if matches!(route_table, 0 | 253..=255) {
                return Err(invalid(
                    "route-table",
                    format!("{route_table} is a reserved routing table; pick another"),
                ));
            }
            let pin_dir = a
                .bpf_pin_dir
                .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/ztunnel/{node_name}")));
            if !pin_dir.is_absolute() {
                return Err(invalid("bpf-pin-dir", "must be an absolute path"));
            }
            Some(CaptureConfig {
                uplinks,
                exempt_node_traffic: a.exempt_node_traffic,
                capture_mark,
                route_table,
                pin_dir,
                detach_on_exit: a.detach_on_exit,
            })
        } else {
            None
        };

        let max_streams = a.hbone_max_streams;
        if max_streams == 0 {
            return Err(invalid("hbone-max-streams", "must be at least 1"));
        }
        let stream_window = window("hbone-stream-window", a.hbone_stream_window)?;
        // A start above the maximum is the maximum: fixed windows.
        let stream_window_start =
            window("hbone-stream-window-start", a.hbone_stream_window_start)?.min(stream_window);
        let connection_window = window("hbone-connection-window", a.hbone_connection_window)?;
        if connection_window < stream_window {
            return Err(invalid(
                "hbone-connection-window",
                format!(
                    "{connection_window} bytes is less than --hbone-stream-window \
                     ({stream_window} bytes): one flow could never use its whole window"
                ),
            ));
        }
        let send_buffer = match a.hbone_send_buffer.0 {
            0 => stream_window,
            n if n < 16 * 1024 => {
                return Err(invalid(
                    "hbone-send-buffer",
                    format!("{n} bytes is less than 16 KiB"),
                ))
            }
            n => n,
        };
        let spread = a.hbone_spread;
        if spread == 0 {
            return Err(invalid("hbone-spread", "must be at least 1"));
        }
        let hbone = HboneConfig {
            max_streams,
            spread,
            idle_timeout: a.hbone_idle_timeout.0,
            connect_timeout: a.connect_timeout.0,
            stream_window,
            stream_window_start,
            send_buffer,
            connection_window,
            max_frame_size: 1024 * 1024,
            tcp_congestion: a.hbone_tcp_congestion.0,
            notsent_lowat: match a.hbone_notsent_lowat.0 {
                0 => None,
                n => Some(n),
            },
        };
        let cert_ttl = a.cert_ttl.0;
        if cert_ttl < Duration::from_secs(60) {
            return Err(invalid("cert-ttl", "must be at least 1m"));
        }
        if let Err(e) = crate::telemetry::parse_log_filter(&a.log_level) {
            return Err(invalid("log-level", e));
        }
        let cni = cni_config(
            Path::new(&a.cni_socket),
            a.cni_pending_timeout.0,
            &admin_socket,
            a.cni_install.then_some(&a.cni),
            a.cni_owner.as_deref(),
            &source,
        )?;
        Ok(Config {
            node_name,
            trust_domain,
            cluster_domain,
            root_namespace,
            source,
            ca,
            cert_ttl,
            drain_timeout: a.drain_timeout.0,
            ports,
            admin_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            cni,
            admin_socket,
            handover_socket,
            capture,
            daemon_mark,
            dns,
            hbone,
            hbone_inbound,
            log_json: a.log_format == LogFormat::Json,
            log_level: a.log_level,
            worker_threads: match a.worker_threads {
                Some(0) => return Err(invalid("worker-threads", "must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            pod_tcp_congestion: a.pod_tcp_congestion.0,
            release_code_pages: a.release_code_pages,
        })
    }
}

/// A unix socket path: 1 to 107 bytes (`sun_path` holds 108 with the terminating NUL).
fn unix_socket_path(flag: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() || path.as_os_str().len() > 107 {
        return Err(invalid(
            flag,
            "must be a path of 1 to 107 bytes (the limit of a unix socket address)",
        ));
    }
    Ok(path)
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

/// An HTTP/2 flow-control window: between the protocol's initial 64 KiB and its maximum of
/// 2^31 - 1 bytes (RFC 9113, 6.9.1; [`Size`] checks the maximum).
fn window(flag: &str, size: Size) -> Result<u32, ConfigError> {
    if size.0 < 65_535 {
        return Err(invalid(
            flag,
            format!(
                "`{size}`: expected a size from 65535 bytes to 2047MiB, in bytes or with KiB or \
                 MiB (e.g. 4MiB)"
            ),
        ));
    }
    Ok(size.0)
}

fn is_dns_label_ish(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
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
