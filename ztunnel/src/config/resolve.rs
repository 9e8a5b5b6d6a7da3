//! [`Config::resolve`]: the checks that turn the settings as read ([`RunArgs`]) into the one
//! validated [`Config`], naming the setting when a value is wrong or two values disagree.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cni::cni_config;
use super::inbound::inbound_limits;
use super::{
    ca_config, connection_window, invalid, source_config, CaptureConfig, Config, ConfigError,
    DnsConfig, HboneConfig, LogFormat, Ports, RunArgs, Size,
};

impl Config {
    /// Validates settings read by [`parse`](fn@super::parse) (which has merged the `--config`
    /// file into them).
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
        let streams = max_streams.max(hbone_inbound.max_streams);
        let connection_window = connection_window(streams, stream_window).ok_or_else(|| {
            invalid(
                "hbone-stream-window",
                format!(
                    "{stream_window} bytes for each of up to {streams} streams of a connection \
                     (--hbone-max-streams, --hbone-inbound-max-streams) is more than an HTTP/2 \
                     connection window can hold (2 GiB - 1): lower one of them"
                ),
            )
        })?;
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
