//! Routing side of capture: which interface leads to a pod, and the policy route that delivers
//! assigned packets locally.
//!
//! - The pod's node-side veth is found from the main routing table, as read from
//!   `/proc/thread-self/net/route` (the calling thread's network namespace, which is the one
//!   the programs attach in, even if the daemon entered the node namespace with `setns` on one
//!   thread only). CNIs in the ptp/calico/cilium style install `<pod-ip> dev <veth>`.
//! - `ip rule add pref <RULE_PRIORITY> fwmark <mark>/<mark> lookup <table>` plus
//!   `ip route replace local default dev lo table <table>`: packets the programs assign carry the
//!   capture mark and are addressed to pod IPs, which are not local; this route makes the kernel
//!   deliver them locally (to the assigned socket) instead of forwarding them.
//!   Done by running `ip` (iproute2): a few commands at start and stop, not worth a netlink stack.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use super::CaptureError;

/// Priority of the capture `ip rule`: before any table a CNI might consult for pod addresses
/// (e.g. AWS VPC CNI uses 512 and 1536) and before `main` (32766).
pub const RULE_PRIORITY: u32 = 100;

const ROUTE_FILE: &str = "/proc/thread-self/net/route";
const RTF_GATEWAY: u32 = 0x2;

/// One IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: bool,
    pub metric: u32,
}

/// Snapshot of the main IPv4 routing table.
#[derive(Clone, Debug, Default)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
}

/// `/proc/net/route` prints addresses as the hex of the in-memory (network order) u32.
fn parse_hex_addr(s: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(s, 16).ok()?;
    Some(Ipv4Addr::from(v.to_ne_bytes()))
}

impl RouteTable {
    /// Reads the calling thread's main routing table.
    pub fn read() -> Result<RouteTable, CaptureError> {
        let text = std::fs::read_to_string(ROUTE_FILE).map_err(|error| CaptureError::Routes {
            path: ROUTE_FILE.to_string(),
            error,
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses the `/proc/net/route` format; malformed lines are skipped.
    pub fn parse(text: &str) -> RouteTable {
        let routes = text
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 8 {
                    return None;
                }
                let flags = u32::from_str_radix(f[3], 16).ok()?;
                Some(Route {
                    iface: f[0].to_string(),
                    dest: parse_hex_addr(f[1])?,
                    gateway: flags & RTF_GATEWAY != 0,
                    metric: f[6].parse().ok()?,
                    mask: parse_hex_addr(f[7])?,
                })
            })
            .collect();
        RouteTable { routes }
    }

    /// Longest-prefix match (lowest metric among equals), as the kernel would pick.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<&Route> {
        let ip = u32::from(ip);
        self.routes
            .iter()
            .filter(|r| ip & u32::from(r.mask) == u32::from(r.dest) & u32::from(r.mask))
            .max_by(|a, b| {
                u32::from(a.mask)
                    .count_ones()
                    .cmp(&u32::from(b.mask).count_ones())
                    .then(b.metric.cmp(&a.metric))
            })
    }

    /// The node-side interface of the pod with address `ip`: the interface of the best route to
    /// it, provided that route is a direct one (no gateway) and not via an uplink or `lo`.
    pub fn pod_interface(&self, ip: Ipv4Addr, uplinks: &[String]) -> Result<String, String> {
        let Some(r) = self.lookup(ip) else {
            return Err("no route to the pod IP in the main table".to_string());
        };
        let prefix = u32::from(r.mask).count_ones();
        if r.gateway {
            return Err(format!(
                "best route is {}/{prefix} via a gateway on {}, not a pod interface \
                 (pod not on this node, or its route is not installed yet)",
                r.dest, r.iface
            ));
        }
        if r.iface == "lo" || uplinks.contains(&r.iface) {
            return Err(format!(
                "best route is {}/{prefix} on {}, which is not a pod interface",
                r.dest, r.iface
            ));
        }
        Ok(r.iface.clone())
    }
}

impl RouteTable {
    /// The node's uplinks as the routes tell: the interfaces of the default route and of
    /// routes via a gateway (other nodes' pod CIDRs, the rest of the world), and of connected
    /// subnets (other nodes on the same link) unless a local pod (`local_pods`) is reached
    /// through that subnet (a bridge-style CNI's bridge is a pod interface, not an uplink).
    /// Never `lo`; sorted.
    pub fn uplinks(&self, local_pods: &[Ipv4Addr]) -> Vec<String> {
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
            let prefix = u32::from(r.mask).count_ones();
            let towards_others = r.gateway || prefix == 0;
            let subnet = prefix < 32 && !pod_ifaces.contains(r.iface.as_str());
            if towards_others || subnet {
                out.insert(r.iface.clone());
            }
        }
        out.into_iter().collect()
    }
}

/// Runs `ip <args>`. `Ok(false)` when it failed with a message containing one of `benign`.
fn ip(args: &[String], benign: &[&str]) -> Result<bool, CaptureError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CaptureError::Command {
            command: command.clone(),
            detail: format!("cannot run `ip` ({e}); install iproute2"),
        })?;
    if output.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if benign.iter().any(|b| stderr.contains(b)) {
        return Ok(false);
    }
    Err(CaptureError::Command {
        command,
        detail: format!("{}: {stderr}", output.status),
    })
}

fn rule_args(family: &str, verb: &str, mark: u32, table: u32) -> Vec<String> {
    vec![
        family.into(),
        "rule".into(),
        verb.into(),
        "pref".into(),
        RULE_PRIORITY.to_string(),
        "fwmark".into(),
        format!("{mark:#x}/{mark:#x}"),
        "lookup".into(),
        table.to_string(),
    ]
}

fn route_args(family: &str, verb: &str, table: u32) -> Vec<String> {
    [
        family, "route", verb, "local", "default", "dev", "lo", "table",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([table.to_string()])
    .collect()
}

/// The address families to route captured packets of: IPv4, and IPv6 when the node has it
/// (`ip -6` rule and `local default dev lo` route in the same table).
fn families() -> Vec<&'static str> {
    let mut f = vec!["-4"];
    if crate::socket::host_has_ipv6() {
        f.push("-6");
    }
    f
}

/// Installs the capture rule and local route of every family; both may already exist (a
/// previous instance that crashed), which is fine.
pub(crate) fn install(mark: u32, table: u32) -> Result<(), CaptureError> {
    for family in families() {
        ip(&route_args(family, "replace", table), &[])?;
        let added = ip(&rule_args(family, "add", mark, table), &["File exists"])?;
        tracing::info!(
            family,
            mark = format!("{mark:#x}"),
            table,
            priority = RULE_PRIORITY,
            already_present = !added,
            "capture routing installed"
        );
    }
    Ok(())
}

/// Removes the capture rules (every copy) and local routes of every family; absent ones are
/// fine.
pub(crate) fn remove(mark: u32, table: u32) -> Result<(), CaptureError> {
    for family in families() {
        remove_family(family, mark, table)?;
    }
    Ok(())
}

fn remove_family(family: &str, mark: u32, table: u32) -> Result<(), CaptureError> {
    let gone = [
        "No such file or directory",
        "No such process",
        "Cannot find",
        // The capture table was never filled (capture was off), or is already gone.
        "FIB table does not exist",
    ];
    let mut result = Ok(());
    for _ in 0..16 {
        match ip(&rule_args(family, "del", mark, table), &gone) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let route = ip(&route_args(family, "del", table), &gone);
    result?;
    route?;
    tracing::info!(
        family,
        mark = format!("{mark:#x}"),
        table,
        "capture routing removed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00C8A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0002F40A\t02C8A8C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
veth1\t0B01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
veth2\t0C01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    #[test]
    fn finds_pod_veth_by_longest_prefix() {
        let t = RouteTable::parse(SAMPLE);
        let up = vec!["eth0".to_string()];
        assert_eq!(
            t.pod_interface(Ipv4Addr::new(10, 244, 1, 11), &up),
            Ok("veth1".to_string())
        );
        assert_eq!(
            t.pod_interface(Ipv4Addr::new(10, 244, 1, 12), &up),
            Ok("veth2".to_string())
        );
        // Remote pod: gateway route.
        assert!(t.pod_interface(Ipv4Addr::new(10, 244, 2, 11), &up).is_err());
        // Node subnet: on the uplink.
        assert!(t
            .pod_interface(Ipv4Addr::new(192, 168, 200, 9), &up)
            .is_err());
        // Nothing.
        assert!(t.pod_interface(Ipv4Addr::new(10, 244, 1, 13), &up).is_err());
    }

    #[test]
    fn discovers_uplinks_from_routes() {
        let t = RouteTable::parse(SAMPLE);
        assert_eq!(t.uplinks(&[Ipv4Addr::new(10, 244, 1, 11)]), ["eth0"]);
        // A bridge-style CNI: pods on a connected /24 of cni0, default route on eth0.
        let bridge = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF
cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF
lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF
";
        let t = RouteTable::parse(bridge);
        assert_eq!(t.uplinks(&[Ipv4Addr::new(10, 244, 1, 5)]), ["eth0"]);
        // No pod yet: the bridge's subnet looks like a link to other hosts.
        assert_eq!(t.uplinks(&[]), ["cni0", "eth0"]);
    }
}
