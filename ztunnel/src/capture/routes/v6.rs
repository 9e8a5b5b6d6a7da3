//! IPv6 routes, from `/proc/thread-self/net/ipv6_route`.
//!
//! One line per route, no header: destination (32 hex digits), its prefix length (2 hex
//! digits), source and source prefix length, next hop (32 hex digits), then metric, reference
//! count, use count and flags (8 hex digits each) and the interface. The file lists the routes
//! of every table without saying which; kept are the unicast routes any table could send a
//! pod's packet by: local, anycast and reject (unreachable, blackhole, prohibit) entries,
//! multicast and link-local destinations, and source-specific routes are left out. A pod's
//! route is in the main table in every CNI this was written against; a policy-routing table
//! with a more specific direct route to a pod's address on another interface would mislead
//! the lookup.

use std::net::{IpAddr, Ipv6Addr};

use super::Route;

/// The calling thread's IPv6 routes (absent when the kernel has no IPv6).
pub(super) const ROUTE_FILE: &str = "/proc/thread-self/net/ipv6_route";
const RTF_GATEWAY: u32 = 0x0002;
const RTF_REJECT: u32 = 0x0200;
const RTF_ANYCAST: u32 = 0x0010_0000;
const RTF_LOCAL: u32 = 0x8000_0000;

fn parse_hex_addr(s: &str) -> Option<Ipv6Addr> {
    if s.len() != 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok().map(Ipv6Addr::from)
}

/// Parses the `/proc/net/ipv6_route` format, keeping the routes a pod lookup or uplink
/// discovery may use; malformed lines are skipped.
pub(super) fn parse(text: &str) -> Vec<Route> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Route> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    let dest = parse_hex_addr(f[0])?;
    let prefix = u8::from_str_radix(f[1], 16).ok().filter(|p| *p <= 128)?;
    let src_prefix = u8::from_str_radix(f[3], 16).ok()?;
    let metric = u32::from_str_radix(f[5], 16).ok()?;
    let flags = u32::from_str_radix(f[8], 16).ok()?;
    if flags & (RTF_LOCAL | RTF_ANYCAST | RTF_REJECT) != 0
        || src_prefix != 0
        || dest.is_multicast()
        || dest.is_unicast_link_local()
    {
        return None;
    }
    Some(Route {
        iface: f[9].to_string(),
        dest: IpAddr::V6(dest),
        prefix,
        gateway: flags & RTF_GATEWAY != 0,
        metric,
    })
}

#[cfg(test)]
mod tests {
    use super::super::RouteTable;
    use super::*;

    /// A node's `/proc/net/ipv6_route` as the kernel wrote it (uplink `eth0` on the node
    /// subnet, another node's pod prefix via it, pod veths `veth1` (a `/128`) and `veth2`,
    /// capture's `local default dev lo` in its own table, a policy table's route, and the
    /// kernel's local, anycast, unreachable, multicast and link-local entries).
    const SAMPLE: &str = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
20010db8000000000000000000000000 20 00000000000000000000000000000000 00 fd000192016802000000000000000003 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
fd000010024400010000000000000011 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000002 00000000 00000001    veth1
fd000010024400010000000000000012 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000002 00000000 00000001    veth2
fd000010024400020000000000000000 40 00000000000000000000000000000000 00 fd000192016802000000000000000002 00000400 00000001 00000000 00000003     eth0
fd000192016802000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001    veth1
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
fd000192016802000000000000000000 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 00300001     eth0
fd000192016802000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001     eth0
fe800000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001    veth1
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000005 00000000 00000001    veth1
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001     eth0
";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn keeps_only_unicast_routes() {
        let routes = parse(SAMPLE);
        let kept: Vec<String> = routes
            .iter()
            .map(|r| {
                format!(
                    "{}/{} {} gw={} m={}",
                    r.dest, r.prefix, r.iface, r.gateway, r.metric
                )
            })
            .collect();
        assert_eq!(
            kept,
            [
                "2001:db8::/32 eth0 gw=true m=1024",
                "fd00:10:244:1::11/128 veth1 gw=false m=1024",
                "fd00:10:244:1::12/128 veth2 gw=false m=1024",
                "fd00:10:244:2::/64 eth0 gw=true m=1024",
                "fd00:192:168:200::/64 eth0 gw=false m=256",
            ]
        );
    }

    #[test]
    fn skips_malformed_lines() {
        let text = "fd00 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000002 00000000 00000001 veth1
fd000010024400010000000000000011 81 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000002 00000000 00000001 veth1
fd000010024400010000000000000011 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000002 00000000
";
        assert_eq!(parse(text), []);
    }

    #[test]
    fn finds_an_ipv6_only_pods_veth() {
        let t = RouteTable::from_routes(parse(SAMPLE));
        let up = t.uplinks(&[ip("fd00:10:244:1::11")]);
        assert_eq!(
            up,
            ["eth0"],
            "an IPv6-only node's uplink comes from its IPv6 routes"
        );
        assert_eq!(
            t.pod_interface(ip("fd00:10:244:1::11"), &up),
            Ok("veth1".to_string())
        );
        assert_eq!(
            t.pod_interface(ip("fd00:10:244:1::12"), &up),
            Ok("veth2".to_string())
        );
        // Another node's pod: via a gateway.
        let remote = t.pod_interface(ip("fd00:10:244:2::11"), &up);
        assert!(
            remote.as_ref().is_err_and(|e| e.contains("gateway")),
            "{remote:?}"
        );
        // The node subnet: on the uplink.
        assert!(t.pod_interface(ip("fd00:192:168:200::9"), &up).is_err());
        // No route (capture's `local default` in its own table is not one).
        assert!(t.pod_interface(ip("fd00:10:244:1::13"), &up).is_err());
        // IPv4 addresses never match IPv6 routes.
        assert!(t.pod_interface(ip("10.244.1.11"), &up).is_err());
    }

    #[test]
    fn a_bridge_is_a_pod_interface_once_a_pod_is_behind_it() {
        let text = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fd000010024400010000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     cni0
";
        let t = RouteTable::from_routes(parse(text));
        assert_eq!(t.uplinks(&[ip("fd00:10:244:1::5")]), ["eth0"]);
        assert_eq!(t.uplinks(&[]), ["cni0", "eth0"]);
        assert_eq!(
            t.pod_interface(ip("fd00:10:244:1::5"), &["eth0".to_string()]),
            Ok("cni0".to_string())
        );
    }
}
