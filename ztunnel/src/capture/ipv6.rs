//! IPv6 capture, beside the IPv4 code it mirrors: the `zt_enrolled6` map (key: the pod's
//! 16-byte IPv6 address as it sits in the packet; value: the same `struct zt_pod` as the IPv4
//! map, flags and the ifindex of the pod's node-side interface). A dual-stack pod has one
//! entry in each map with the same value: its interface is found from its IPv4 route, and its
//! IPv6 route must agree. An IPv6-only pod has its entry here alone, its interface found from
//! its IPv6 route ([`LocalPod::interface`]). The program's IPv6 path (`ebpf/capture_v6.h`)
//! steers to the daemon's `[::1]`/`[::]` listeners, and the `ip -6` rule and local route
//! (`routes`) deliver what it assigns.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use tracing::warn;

use super::pins::PinDir;
use super::routes::RouteTable;
use super::{CaptureError, LocalPod, PodValue, ENROLLED_MAX, POD_DNS, POD_ENROLLED};

/// The IPv6 enrolled map (`zt_enrolled6` in `ebpf/capture_v6.h`).
pub(super) const ENROLLED6_MAP: &str = "zt_enrolled6";

/// Replaces a pinned IPv6 map of another shape (key 16 bytes, value 8).
pub(super) fn drop_incompatible(pins: &PinDir) -> Result<(), CaptureError> {
    if pins.drop_incompatible_map(ENROLLED6_MAP, 16, 8, ENROLLED_MAX)? {
        warn!(pin_dir = %pins.path().display(), "pinned IPv6 enrolled-pod map had another \
              shape (older build); replaced, pods are enrolled again at the first sync");
    }
    Ok(())
}

/// The IPv6 enrolled map and what the daemon wrote into it.
pub(super) struct Enrolled6 {
    map: BpfHashMap<MapData, [u8; 16], PodValue>,
    written: BTreeMap<Ipv6Addr, PodValue>,
}

impl Enrolled6 {
    /// Takes the map out of the loaded object; what a previous daemon wrote stays in force
    /// until the first sync.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Enrolled6, CaptureError> {
        let map = ebpf
            .take_map(ENROLLED6_MAP)
            .ok_or_else(|| CaptureError::ObjectMismatch(format!("map {ENROLLED6_MAP}")))?;
        let map: BpfHashMap<MapData, [u8; 16], PodValue> =
            BpfHashMap::try_from(map).map_err(|error| CaptureError::MapV6 {
                ip: Ipv6Addr::UNSPECIFIED,
                error,
            })?;
        let written = map
            .iter()
            .flatten()
            .map(|(k, v)| (Ipv6Addr::from(k), v))
            .collect();
        Ok(Enrolled6 { map, written })
    }

    /// Addresses in the map (their traffic is captured).
    pub(super) fn addresses(&self) -> Vec<Ipv6Addr> {
        self.written.keys().copied().collect()
    }

    /// What the map holds for `ip`.
    pub(super) fn get(&self, ip: Ipv6Addr) -> Option<PodValue> {
        self.written.get(&ip).copied()
    }

    /// Sets the map to exactly `want` (diff against what was written).
    pub(super) fn sync(
        &mut self,
        want: BTreeMap<Ipv6Addr, (&str, PodValue)>,
        problems: &mut Vec<(String, CaptureError)>,
    ) {
        super::sync_pod_map(
            &mut self.map,
            &mut self.written,
            want,
            |ip| ip.octets(),
            |ip, error| CaptureError::MapV6 { ip, error },
            problems,
        );
    }
}

impl LocalPod {
    /// A pod as capture sees it, from all its addresses: the first of each family. `None` for
    /// a pod without any address (nothing to capture yet).
    pub fn new(
        name: String,
        ips: &[IpAddr],
        enrolled: bool,
        dns_capture: bool,
    ) -> Option<LocalPod> {
        let (mut ipv4, mut ipv6) = (None, None);
        for ip in ips {
            match ip {
                IpAddr::V4(a) => ipv4 = ipv4.or(Some(*a)),
                IpAddr::V6(a) => ipv6 = ipv6.or(Some(*a)),
            }
        }
        if ipv4.is_none() && ipv6.is_none() {
            return None;
        }
        Some(LocalPod {
            name,
            ipv4,
            ipv6,
            enrolled,
            dns_capture,
        })
    }

    /// The address the pod's interface is found from: its IPv4 one, else its IPv6 one.
    pub fn primary(&self) -> Option<IpAddr> {
        self.ipv4
            .map(IpAddr::V4)
            .or_else(|| self.ipv6.map(IpAddr::V6))
    }

    /// The pod's addresses, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = self.ipv4.map(IpAddr::V4);
        v4.into_iter().chain(self.ipv6.map(IpAddr::V6)).collect()
    }

    /// The pod's node-side interface, from the route to its [`LocalPod::primary`] address.
    /// For a dual-stack pod whose IPv6 route leads directly to another interface, the IPv4
    /// one is kept and the disagreement is returned beside it, to be reported (the pod's IPv6
    /// packets are dropped as spoofed, and the pod is shown not captured, until they agree). An IPv6 route that leads to no pod interface at
    /// all (not installed yet) is no disagreement: no IPv6 packet reaches the pod meanwhile.
    pub(super) fn interface(
        &self,
        table: &RouteTable,
        uplinks: &[String],
    ) -> Result<(String, Option<CaptureError>), CaptureError> {
        let lookup = |ip: IpAddr| {
            table
                .pod_interface(ip, uplinks)
                .map_err(|reason| CaptureError::NoPodInterface {
                    pod: self.name.clone(),
                    ip,
                    reason,
                })
        };
        let (ipv4, ipv6) = match (self.ipv4, self.ipv6) {
            (Some(v4), Some(v6)) => (v4, v6),
            (Some(v4), None) => return Ok((lookup(v4.into())?, None)),
            (None, Some(v6)) => return Ok((lookup(v6.into())?, None)),
            (None, None) => {
                return Err(CaptureError::NoPodInterface {
                    pod: self.name.clone(),
                    ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    reason: "the pod has no address".to_string(),
                })
            }
        };
        let iface4 = lookup(ipv4.into())?;
        let mismatch = match table.pod_interface(ipv6.into(), uplinks) {
            // Reported like any capture problem (logged by the sync's caller, the pod shown
            // not captured), not logged here on every sync.
            Ok(iface6) if iface6 != iface4 => Some(CaptureError::InterfaceMismatch {
                pod: self.name.clone(),
                ipv4,
                iface4: iface4.clone(),
                ipv6,
                iface6,
            }),
            _ => None,
        };
        Ok((iface4, mismatch))
    }
}

/// What the enrolled maps must hold, IPv4 and IPv6: every enrolled pod's address of each
/// family it has, with the same value (flags, and the index of its interface from
/// `ifindexes`, by [`LocalPod::primary`], else `fallback`'s, else 0: not known). An
/// IPv6-only pod has its IPv6 entry alone.
#[allow(clippy::type_complexity)]
pub(super) fn wanted<'a>(
    pods: &'a [LocalPod],
    ifindexes: &BTreeMap<IpAddr, u32>,
    fallback: impl Fn(IpAddr) -> Option<PodValue>,
) -> (
    BTreeMap<Ipv4Addr, (&'a str, PodValue)>,
    BTreeMap<Ipv6Addr, (&'a str, PodValue)>,
) {
    let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
    for p in pods.iter().filter(|p| p.enrolled) {
        let Some(primary) = p.primary() else {
            continue;
        };
        let flags = POD_ENROLLED | if p.dns_capture { POD_DNS } else { 0 };
        let idx = match ifindexes.get(&primary) {
            Some(i) => *i,
            None => fallback(primary).map_or(0, |v| v[1]),
        };
        let value = (p.name.as_str(), [flags, idx]);
        if let Some(a) = p.ipv4 {
            v4.insert(a, value);
        }
        if let Some(a) = p.ipv6 {
            v6.insert(a, value);
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn a_local_pod_takes_one_address_of_each_family() {
        let all = ips(&["fd00::1", "10.0.0.1", "fd00::2"]);
        let p = LocalPod::new("mesh/a".into(), &all, true, false).expect("has addresses");
        assert_eq!(
            (p.ipv4, p.ipv6),
            (Some(Ipv4Addr::new(10, 0, 0, 1)), "fd00::1".parse().ok())
        );
        assert_eq!(p.primary(), Some(all[1]), "IPv4 first");
        assert_eq!(p.addresses(), ips(&["10.0.0.1", "fd00::1"]));
        let v6 = LocalPod::new("mesh/v6".into(), &all[..1], true, false).expect("IPv6 only");
        assert_eq!((v6.ipv4, v6.primary()), (None, Some(all[0])));
        assert!(LocalPod::new("mesh/none".into(), &[], true, false).is_none());
    }

    /// Routes of a node: pod veths `veth1` (10.244.1.11, fd00:10:244:1::11), `veth2`
    /// (fd00:10:244:1::12 only) and `veth3` (10.244.1.13, whose IPv6 route goes to `veth4`).
    fn table() -> RouteTable {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask
eth0\t00C8A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF
veth1\t0B01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF
veth3\t0D01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF
";
        let route = |dest: &str, iface: &str| super::super::routes::Route {
            iface: iface.into(),
            dest: dest.parse().expect("ip"),
            prefix: 128,
            gateway: false,
            metric: 1024,
        };
        let mut routes = RouteTable::parse(v4).into_routes();
        routes.extend([
            route("fd00:10:244:1::11", "veth1"),
            route("fd00:10:244:1::12", "veth2"),
            route("fd00:10:244:1::13", "veth4"),
        ]);
        RouteTable::from_routes(routes)
    }

    fn pod(v4: Option<&str>, v6: Option<&str>) -> LocalPod {
        LocalPod {
            name: "mesh/p".into(),
            ipv4: v4.map(|s| s.parse().expect("v4")),
            ipv6: v6.map(|s| s.parse().expect("v6")),
            enrolled: true,
            dns_capture: true,
        }
    }

    #[test]
    fn an_ipv6_only_pod_gets_its_entry_in_the_ipv6_map_alone() {
        let mut b = pod(None, Some("fd00::2"));
        b.name = "mesh/b".into();
        let mut c = pod(Some("10.0.0.3"), Some("fd00::3"));
        (c.name, c.enrolled) = ("plain/c".into(), false);
        let pods = [pod(Some("10.0.0.1"), Some("fd00::1")), b, c];
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let ifindexes: BTreeMap<IpAddr, u32> = [(ip("10.0.0.1"), 7), (ip("fd00::2"), 8)].into();
        let (v4, v6) = wanted(&pods, &ifindexes, |_| None);
        let flags = POD_ENROLLED | POD_DNS;
        assert_eq!(
            v4,
            [(Ipv4Addr::new(10, 0, 0, 1), ("mesh/p", [flags, 7]))].into()
        );
        assert_eq!(
            v6,
            [
                ("fd00::1".parse().expect("v6"), ("mesh/p", [flags, 7])),
                ("fd00::2".parse().expect("v6"), ("mesh/b", [flags, 8])),
            ]
            .into(),
            "the dual-stack pod's IPv4 value under its IPv6 address; the IPv6-only pod's own"
        );
        // Interface unknown: the fallback (what the map held), else 0.
        let (_, v6) = wanted(&pods, &BTreeMap::new(), |a| {
            (a == ip("fd00::2")).then_some([1, 9])
        });
        assert_eq!(
            v6.get(&"fd00::2".parse().expect("v6")),
            Some(&("mesh/b", [flags, 9]))
        );
        assert_eq!(
            v6.get(&"fd00::1".parse().expect("v6")),
            Some(&("mesh/p", [flags, 0]))
        );
    }

    #[test]
    fn the_interface_comes_from_whichever_family_the_pod_has() {
        let (t, up) = (table(), ["eth0".to_string()]);
        let found = |p: LocalPod| p.interface(&t, &up).map(|(i, m)| (i, m.is_some()));
        assert_eq!(
            found(pod(Some("10.244.1.11"), Some("fd00:10:244:1::11"))).ok(),
            Some(("veth1".to_string(), false)),
            "dual stack, routes agree"
        );
        assert_eq!(
            found(pod(None, Some("fd00:10:244:1::12"))).ok(),
            Some(("veth2".to_string(), false)),
            "IPv6 only"
        );
        assert_eq!(
            found(pod(Some("10.244.1.13"), Some("fd00:10:244:1::13"))).ok(),
            Some(("veth3".to_string(), true)),
            "routes disagree: the IPv4 one wins, the disagreement is reported"
        );
        assert_eq!(
            found(pod(Some("10.244.1.11"), Some("fd00:10:244:1::99"))).ok(),
            Some(("veth1".to_string(), false)),
            "no IPv6 route yet: no disagreement"
        );
        let missing = pod(None, Some("fd00:10:244:1::99")).interface(&t, &up);
        assert!(
            matches!(&missing, Err(CaptureError::NoPodInterface { ip, .. }) if ip.is_ipv6()),
            "{missing:?}"
        );
    }
}
