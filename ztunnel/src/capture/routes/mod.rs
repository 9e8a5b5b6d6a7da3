//! Routing side of capture: which interface leads to a pod, and the policy route that delivers
//! assigned packets locally.
//!
//! - The pod's node-side veth is found from the routes to the pod's address, as the calling
//!   thread's network namespace has them (the one the programs attach in, even if the daemon
//!   entered the node namespace with `setns` on one thread only): IPv4 from the main table in
//!   `/proc/thread-self/net/route` ([`v4`]), IPv6 from `/proc/thread-self/net/ipv6_route`
//!   ([`v6`]). CNIs in the ptp/calico/cilium style install `<pod-ip> dev <veth>` for each of
//!   the pod's addresses; a bridge-style CNI a connected subnet on the bridge.
//! - `ip rule add pref <RULE_PRIORITY> fwmark <mark>/<mark> lookup <table>` plus
//!   `ip route replace local default dev lo table <table>`, for each family ([`rule`]):
//!   packets the programs assign carry the capture mark and are addressed to pod IPs, which are
//!   not local; this route makes the kernel deliver them locally (to the assigned socket)
//!   instead of forwarding them.

mod rule;
mod v4;
mod v6;

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

pub(crate) use rule::{install, remove};

use super::CaptureError;

/// Priority of the capture `ip rule`: before any table a CNI might consult for pod addresses
/// (e.g. AWS VPC CNI uses 512 and 1536) and before `main` (32766).
pub const RULE_PRIORITY: u32 = 100;

/// One route, of either family: a destination prefix reached through `iface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub iface: String,
    pub dest: IpAddr,
    /// Prefix length (0 for a default route; 32 or 128 for a host route).
    pub prefix: u8,
    pub gateway: bool,
    pub metric: u32,
}

impl Route {
    /// Whether `ip` is in this route's prefix (never across families).
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.dest, ip) {
            (IpAddr::V4(d), IpAddr::V4(a)) => {
                let mask = prefix_mask(self.prefix, 32) as u32;
                u32::from(d) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(d), IpAddr::V6(a)) => {
                let mask = prefix_mask(self.prefix, 128);
                u128::from(d) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Whether it reaches a single address (`/32`, `/128`).
    fn is_host(&self) -> bool {
        u32::from(self.prefix) == address_bits(self.dest)
    }
}

fn address_bits(ip: IpAddr) -> u32 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The mask of a `prefix`-bit prefix in an address of `bits` bits, right-aligned in a u128.
fn prefix_mask(prefix: u8, bits: u32) -> u128 {
    let prefix = u32::from(prefix).min(bits);
    if prefix == 0 {
        return 0;
    }
    let ones = u128::MAX >> (128 - bits);
    (ones << (bits - prefix)) & ones
}

/// Snapshot of the node's routes: the IPv4 main table and the IPv6 unicast routes.
#[derive(Clone, Debug, Default)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Reads the calling thread's routes of both families. A node without IPv6 (the kernel's
    /// file absent) has only IPv4 routes.
    pub fn read() -> Result<RouteTable, CaptureError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|error| CaptureError::Routes {
                path: path.to_string(),
                error,
            })
        };
        let mut routes = v4::parse(&read(v4::ROUTE_FILE)?);
        match read(v6::ROUTE_FILE) {
            Ok(text) => routes.extend(v6::parse(&text)),
            Err(CaptureError::Routes { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(RouteTable { routes })
    }

    /// A table of these routes (tests, and parsers' output).
    #[cfg(test)]
    pub fn from_routes(routes: Vec<Route>) -> RouteTable {
        RouteTable { routes }
    }

    /// The routes (tests).
    #[cfg(test)]
    pub fn into_routes(self) -> Vec<Route> {
        self.routes
    }

    /// Parses `/proc/net/route` text alone (IPv4 only).
    #[cfg(test)]
    pub fn parse(text: &str) -> RouteTable {
        RouteTable::from_routes(v4::parse(text))
    }

    /// Longest-prefix match among the routes of `ip`'s family (lowest metric among equals), as
    /// the kernel would pick.
    pub fn lookup(&self, ip: IpAddr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.contains(ip))
            .max_by(|a, b| a.prefix.cmp(&b.prefix).then(b.metric.cmp(&a.metric)))
    }

    /// The node-side interface of the pod with address `ip` (either family): the interface of
    /// the best route to it, provided that route is a direct one (no gateway) and not via an
    /// uplink or `lo`.
    pub fn pod_interface(&self, ip: IpAddr, uplinks: &[String]) -> Result<String, String> {
        let Some(r) = self.lookup(ip) else {
            let table = if ip.is_ipv4() {
                "the main IPv4 table"
            } else {
                "the IPv6 routes"
            };
            return Err(format!("no route to the pod IP in {table}"));
        };
        if r.gateway {
            return Err(format!(
                "best route is {}/{} via a gateway on {}, not a pod interface \
                 (pod not on this node, or its route is not installed yet)",
                r.dest, r.prefix, r.iface
            ));
        }
        if r.iface == "lo" || uplinks.contains(&r.iface) {
            return Err(format!(
                "best route is {}/{} on {}, which is not a pod interface",
                r.dest, r.prefix, r.iface
            ));
        }
        Ok(r.iface.clone())
    }

    /// The node's uplinks as the routes of both families tell: the interfaces of default
    /// routes and of routes via a gateway (other nodes' pod CIDRs, the rest of the world), and
    /// of connected subnets (other nodes on the same link) unless a local pod (`local_pods`,
    /// addresses of either family) is reached through that subnet (a bridge-style CNI's bridge
    /// is a pod interface, not an uplink). Never `lo`; sorted. An IPv6-only node's uplinks
    /// come from its IPv6 routes alone.
    pub fn uplinks(&self, local_pods: &[IpAddr]) -> Vec<String> {
        let pod_ifaces: BTreeSet<&str> = local_pods
            .iter()
            .filter_map(|ip| self.lookup(*ip))
            .filter(|r| !r.gateway)
            .map(|r| r.iface.as_str())
            .collect();
        let mut out = BTreeSet::new();
        for r in &self.routes {
            if r.iface == "lo" {
                continue;
            }
            let towards_others = r.gateway || r.prefix == 0;
            let subnet = !r.is_host() && !pod_ifaces.contains(r.iface.as_str());
            if towards_others || subnet {
                out.insert(r.iface.clone());
            }
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const SAMPLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00C8A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0002F40A\t02C8A8C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
veth1\t0B01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
veth2\t0C01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        Ipv4Addr::new(a, b, c, d).into()
    }

    #[test]
    fn finds_pod_veth_by_longest_prefix() {
        let t = RouteTable::parse(SAMPLE);
        let up = vec!["eth0".to_string()];
        assert_eq!(
            t.pod_interface(v4(10, 244, 1, 11), &up),
            Ok("veth1".to_string())
        );
        assert_eq!(
            t.pod_interface(v4(10, 244, 1, 12), &up),
            Ok("veth2".to_string())
        );
        // Remote pod: gateway route.
        assert!(t.pod_interface(v4(10, 244, 2, 11), &up).is_err());
        // Node subnet: on the uplink.
        assert!(t.pod_interface(v4(192, 168, 200, 9), &up).is_err());
        // Nothing.
        assert!(t.pod_interface(v4(10, 244, 1, 13), &up).is_err());
        // No IPv6 route at all: an IPv6 address matches no IPv4 route, not even a default.
        let ip6: IpAddr = "fd00:10:244:1::11".parse().expect("v6");
        let err = t.pod_interface(ip6, &up).expect_err("no IPv6 routes");
        assert!(err.contains("IPv6"), "{err}");
    }

    #[test]
    fn discovers_uplinks_from_routes() {
        let t = RouteTable::parse(SAMPLE);
        assert_eq!(t.uplinks(&[v4(10, 244, 1, 11)]), ["eth0"]);
        // A bridge-style CNI: pods on a connected /24 of cni0, default route on eth0.
        let bridge = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF
cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF
lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF
";
        let t = RouteTable::parse(bridge);
        assert_eq!(t.uplinks(&[v4(10, 244, 1, 5)]), ["eth0"]);
        // No pod yet: the bridge's subnet looks like a link to other hosts.
        assert_eq!(t.uplinks(&[]), ["cni0", "eth0"]);
    }

    #[test]
    fn prefixes_match_like_the_kernel() {
        let r = |dest: &str, prefix| Route {
            iface: "x".into(),
            dest: dest.parse().expect("ip"),
            prefix,
            gateway: false,
            metric: 0,
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(r("10.244.0.0", 16).contains(ip("10.244.255.1")));
        assert!(!r("10.244.0.0", 16).contains(ip("10.245.0.1")));
        assert!(r("0.0.0.0", 0).contains(ip("1.2.3.4")));
        assert!(
            !r("0.0.0.0", 0).contains(ip("::1")),
            "never across families"
        );
        assert!(r("fd00:10:244:1::", 64).contains(ip("fd00:10:244:1::11")));
        assert!(!r("fd00:10:244:1::", 64).contains(ip("fd00:10:244:2::11")));
        assert!(r("fd00:10:244::", 48).contains(ip("fd00:10:244:7::1")));
        assert!(r("::", 0).contains(ip("2001:db8::1")));
        assert!(r("fd00::11", 128).contains(ip("fd00::11")));
        assert!(!r("fd00::11", 128).contains(ip("fd00::12")));
        assert!(r("fd00::11", 128).is_host() && r("10.0.0.1", 32).is_host());
        assert!(!r("fd00::", 127).is_host());
    }
}
