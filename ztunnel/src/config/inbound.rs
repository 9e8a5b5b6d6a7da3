//! The `--hbone-inbound-*` settings: what the HBONE server lets peers hold
//! ([`crate::hbone::limits`]) and how it finds dead ones.

use std::time::Duration;

use serde::Serialize;

use super::{duration_str, invalid, ConfigError, RunArgs};

/// What the HBONE server (inbound 15008) lets one peer, and all peers together, hold; and how
/// it finds dead peers. Defaults are those of the `--hbone-inbound-*` settings.
#[derive(Debug, Clone, Serialize)]
pub struct InboundLimits {
    /// Connections in their TLS and HTTP/2 handshakes at once.
    pub max_handshakes: usize,
    /// Connections open at once, handshakes included.
    pub max_connections: usize,
    /// Streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams: u32,
    /// Connections per client identity, and per source address.
    pub peer_max_connections: usize,
    /// Streams per client identity, and per source address.
    pub peer_max_streams: usize,
    /// Descriptors kept free below the open-file limit.
    pub fd_headroom: usize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: u32,
    /// TCP accept to the end of the HTTP/2 preface.
    #[serde(with = "duration_str")]
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval.
    #[serde(with = "duration_str")]
    pub keepalive_interval: Duration,
    /// Time to answer a PING.
    #[serde(with = "duration_str")]
    pub keepalive_timeout: Duration,
    /// TCP keepalive idle time.
    #[serde(with = "duration_str")]
    pub tcp_keepalive: Duration,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            max_handshakes: 1024,
            max_connections: 16384,
            max_streams: 100,
            peer_max_connections: 1024,
            peer_max_streams: 8192,
            fd_headroom: 2048,
            max_header_list_size: 64 * 1024,
            handshake_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

/// The `--hbone-inbound-*` settings: every count at least 1, the header list at least 16 KiB
/// (what HTTP/2 requires a peer to accept for a frame) and the keepalive answered within the
/// interval.
pub(super) fn inbound_limits(a: &RunArgs) -> Result<InboundLimits, ConfigError> {
    for (flag, n) in [
        (
            "hbone-inbound-max-handshakes",
            a.hbone_inbound_max_handshakes,
        ),
        (
            "hbone-inbound-max-connections",
            a.hbone_inbound_max_connections,
        ),
        (
            "hbone-inbound-max-streams",
            a.hbone_inbound_max_streams as usize,
        ),
        (
            "hbone-inbound-peer-max-connections",
            a.hbone_inbound_peer_max_connections,
        ),
        (
            "hbone-inbound-peer-max-streams",
            a.hbone_inbound_peer_max_streams,
        ),
    ] {
        if n == 0 {
            return Err(invalid(flag, "must be at least 1"));
        }
    }
    if a.hbone_inbound_max_handshakes > a.hbone_inbound_max_connections {
        return Err(invalid(
            "hbone-inbound-max-handshakes",
            format!(
                "{} is more than --hbone-inbound-max-connections ({}), which handshakes count in",
                a.hbone_inbound_max_handshakes, a.hbone_inbound_max_connections
            ),
        ));
    }
    let header_list = a.hbone_inbound_max_header_list_size.0;
    if header_list < 16 * 1024 {
        return Err(invalid(
            "hbone-inbound-max-header-list-size",
            format!(
                "`{}`: expected at least 16KiB",
                a.hbone_inbound_max_header_list_size
            ),
        ));
    }
    if a.hbone_inbound_keepalive_timeout > a.hbone_inbound_keepalive_interval {
        return Err(invalid(
            "hbone-inbound-keepalive-timeout",
            format!(
                "{} is longer than --hbone-inbound-keepalive-interval ({})",
                a.hbone_inbound_keepalive_timeout, a.hbone_inbound_keepalive_interval
            ),
        ));
    }
    Ok(InboundLimits {
        max_handshakes: a.hbone_inbound_max_handshakes,
        max_connections: a.hbone_inbound_max_connections,
        max_streams: a.hbone_inbound_max_streams,
        peer_max_connections: a.hbone_inbound_peer_max_connections,
        peer_max_streams: a.hbone_inbound_peer_max_streams,
        fd_headroom: a.hbone_inbound_fd_headroom,
        max_header_list_size: header_list,
        handshake_timeout: a.hbone_inbound_handshake_timeout.0,
        keepalive_interval: a.hbone_inbound_keepalive_interval.0,
        keepalive_timeout: a.hbone_inbound_keepalive_timeout.0,
        tcp_keepalive: a.hbone_inbound_tcp_keepalive.0,
    })
}
