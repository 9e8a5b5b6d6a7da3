//! [`RunArgs`]: the daemon's settings as clap declares them, each field once with its flag,
//! `ZTUNNEL_*` environment variable, `--config` file key, default and `--help` text.

use std::path::PathBuf;

use clap::{ArgAction, Args};

use super::{
    CniInstallArgs, Congestion, Dur, LogFormat, Mark, Size, SourceKind, Upstream,
    DEFAULT_ADMIN_PORT, DEFAULT_ADMIN_SOCKET, DEFAULT_CA_TOKEN_PATH, DEFAULT_CERT_TTL,
    DEFAULT_CNI_SOCKET, DEFAULT_HANDOVER_SOCKET, DEFAULT_TRUST_DOMAIN,
};

/// Every daemon setting, as flag (`--name`), environment variable (`ZTUNNEL_NAME`) and config
/// file key (`name`), with its default. Settings without a default are optional or checked by
/// [`Config::resolve`](super::Config::resolve).
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
    /// hold in the receiving daemon. A connection's own window is this times the most streams
    /// it may carry, so that flows whose destinations stop reading never hold up the others on
    /// their connection. Bytes, or with KiB/MiB, from 65535 bytes.
    #[arg(long, env = "ZTUNNEL_HBONE_STREAM_WINDOW", default_value_t = Size::mib(8))]
    pub hbone_stream_window: Size,
    /// HTTP/2 flow-control window each HBONE stream starts with. A connection's window doubles,
    /// up to --hbone-stream-window, each time one of its flows has passed two windows on to a
    /// destination that keeps up; it never shrinks (h2 would strand streams), so a flow whose
    /// destination reads slowly holds about this much in the receiving daemon unless another
    /// flow of its connection grew the window first. At or above --hbone-stream-window: fixed
    /// windows of that size. Bytes, or with KiB/MiB, from 65535 bytes.
    #[arg(
        long,
        env = "ZTUNNEL_HBONE_STREAM_WINDOW_START",
        default_value_t = Size::kib(256)
    )]
    pub hbone_stream_window_start: Size,
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
