//! What capture needs to know about the daemon (its listener ports, the marks, the routing
//! table, the uplinks and the bpffs pin directory), and the checks [`super::Capture::start`]
//! makes on it before anything is loaded.

use std::path::PathBuf;

use super::CaptureError;

/// What capture needs to know about the daemon. The ports are those of the daemon's listeners,
/// which must be `IP_TRANSPARENT` (set before `bind`) and carry `SO_MARK = daemon_mark`:
/// outbound and inbound plaintext on 127.0.0.1, HBONE on 0.0.0.0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSettings {
    /// SYNs leaving an enrolled pod are assigned to `127.0.0.1:<outbound_port>` (15001).
    pub outbound_port: u16,
    /// SYNs to a local enrolled pod from a non-mesh source: `127.0.0.1:<port>` (15006).
    pub inbound_plaintext_port: u16,
    /// SYNs to `<local enrolled pod ip>:<hbone_port>` (from other nodes): the HBONE listener (15008).
    pub hbone_port: u16,
    /// UDP and TCP to port 53 from enrolled pods whose
    /// [`LocalPod::dns_capture`](super::LocalPod::dns_capture) is set go to
    /// `127.0.0.1:<dns_port>` (15053; UDP socket transparent with `IP_RECVORIGDSTADDR`).
    /// `0` turns DNS capture off for the whole node.
    pub dns_port: u16,
    /// Mark set on every packet the programs assign; routed locally by the capture ip rule.
    /// Must not share bits with `daemon_mark`.
    pub capture_mark: u32,
    /// `SO_MARK` of the daemon's own sockets; the programs never touch packets carrying any of
    /// its bits.
    pub daemon_mark: u32,
    /// Routing table for `ip rule fwmark <capture_mark> lookup <table>` and
    /// `local default dev lo`. Must be owned by us (not 253-255, the kernel's).
    pub route_table: u32,
    /// Node interfaces facing other nodes (e.g. `eth0`): inbound traffic for local pods.
    /// Empty: discovered from the routing table on every sync (the interfaces of the default
    /// route, of routes via a gateway, and of connected subnets no local pod is on).
    pub uplinks: Vec<String>,
    /// Leave the node's own traffic to enrolled pods alone (no `zt_host_redirect`): it reaches
    /// the pods in plaintext without policy or logs, as before capture. Off by default.
    pub exempt_node_traffic: bool,
    /// bpffs directory of this node's pinned maps, program and links (created if absent; its
    /// nearest existing ancestor must be on bpffs).
    pub pin_dir: PathBuf,
}

/// Checks what the settings must hold before anything is loaded (ports distinct and set, marks
/// disjoint, a routing table of our own, valid uplink names).
pub(super) fn validate(s: &CaptureSettings) -> Result<(), CaptureError> {
    let bad = |m: String| Err(CaptureError::InvalidSettings(m));
    let ports = [
        ("outbound_port", s.outbound_port),
        ("inbound_plaintext_port", s.inbound_plaintext_port),
        ("hbone_port", s.hbone_port),
        ("dns_port", s.dns_port),
    ];
    for (i, (name, port)) in ports.iter().enumerate() {
        if *port == 0 && *name == "dns_port" {
            continue;
        }
        if *port == 0 {
            return bad(format!("{name} must not be 0"));
        }
        if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
            return bad(format!("{name} and {other} are both {port}"));
        }
    }
    if s.capture_mark == 0 || s.daemon_mark == 0 {
        return bad("capture_mark and daemon_mark must be non-zero".to_string());
    }
    if s.capture_mark & s.daemon_mark != 0 {
        return bad(format!(
            "capture_mark {:#x} and daemon_mark {:#x} share bits: the daemon's own packets \
             would be routed to itself",
            s.capture_mark, s.daemon_mark
        ));
    }
    if s.route_table == 0 || (253..=255).contains(&s.route_table) {
        return bad(format!(
            "route_table {} is reserved (0, 253 default, 254 main, 255 local)",
            s.route_table
        ));
    }
    for u in &s.uplinks {
        if u.is_empty() || u.len() > 15 || u.contains(['/', ' ', '\0']) {
            return bad(format!("uplink {u:?} is not a valid interface name"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CaptureSettings {
        CaptureSettings {
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            dns_port: 15053,
            capture_mark: 0x1000,
            daemon_mark: 0x539,
            route_table: 100,
            uplinks: vec!["eth0".into()],
            exempt_node_traffic: false,
            pin_dir: PathBuf::from("/sys/fs/bpf/ztunnel/node1"),
        }
    }

    #[test]
    fn validates_settings() {
        assert!(validate(&settings()).is_ok());
        let mut s = settings();
        s.capture_mark = 0x1;
        assert!(validate(&s).is_err(), "0x1 overlaps 0x539");
        let mut s = settings();
        s.hbone_port = 15001;
        assert!(validate(&s).is_err());
        let mut s = settings();
        s.route_table = 254;
        assert!(validate(&s).is_err());
    }
}
