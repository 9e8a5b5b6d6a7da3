//! IPv6 capture, beside the IPv4 code it mirrors: the `zt_enrolled6` map (key: the pod's
//! 16-byte IPv6 address as it sits in the packet; value: the same `struct zt_pod` as the IPv4
//! map, flags and the ifindex of the pod's node-side interface). A dual-stack pod has one
//! entry in each map with the same value: its interface is found once, from its IPv4 route.
//! The program's IPv6 path (`ebpf/capture_v6.h`) steers to the daemon's `[::1]`/`[::]`
//! listeners, and the `ip -6` rule and local route (`routes`) deliver what it assigns.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use tracing::warn;

use super::pins::PinDir;
use super::{CaptureError, LocalPod, PodValue, ENROLLED_MAX};

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
    /// A pod as capture sees it, from all its addresses: the first IPv4 one and, dual stack,
    /// the first IPv6 one. Capture finds the pod's interface from its IPv4 route, so a pod
    /// without an IPv4 address is not captured (`None`).
    pub fn new(
        name: String,
        ips: &[IpAddr],
        enrolled: bool,
        dns_capture: bool,
    ) -> Option<LocalPod> {
        let (mut v4, mut v6) = (None, None);
        for ip in ips {
            match ip {
                IpAddr::V4(a) => v4 = v4.or(Some(*a)),
                IpAddr::V6(a) => v6 = v6.or(Some(*a)),
            }
        }
        Some(LocalPod {
            name,
            ip: v4?,
            ipv6: v6,
            enrolled,
            dns_capture,
        })
    }
}

/// The IPv6 entries wanted: every enrolled pod's IPv6 address, with the value of its IPv4
/// entry in `v4` (the same flags and interface).
pub(super) fn wanted<'a>(
    pods: &'a [LocalPod],
    v4: &BTreeMap<Ipv4Addr, (&'a str, PodValue)>,
) -> BTreeMap<Ipv6Addr, (&'a str, PodValue)> {
    pods.iter()
        .filter_map(|p| Some((p.ipv6?, *v4.get(&p.ip)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_pod_gets_its_ipv4_entry_under_its_ipv6_address() {
        let pod = |name: &str, ip: [u8; 4], ipv6: Option<&str>, enrolled| LocalPod {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            ipv6: ipv6.map(|s| s.parse().expect("v6")),
            enrolled,
            dns_capture: true,
        };
        let pods = [
            pod("mesh/a", [10, 0, 0, 1], Some("fd00::1"), true),
            pod("mesh/b", [10, 0, 0, 2], None, true),
            pod("plain/c", [10, 0, 0, 3], Some("fd00::3"), false),
        ];
        let v4: BTreeMap<Ipv4Addr, (&str, PodValue)> = [
            (Ipv4Addr::new(10, 0, 0, 1), ("mesh/a", [3, 7])),
            (Ipv4Addr::new(10, 0, 0, 2), ("mesh/b", [3, 8])),
        ]
        .into();
        let want = wanted(&pods, &v4);
        let a: Ipv6Addr = "fd00::1".parse().expect("v6");
        assert_eq!(want.len(), 1, "{want:?}");
        assert_eq!(want.get(&a), Some(&("mesh/a", [3, 7])));
        assert_eq!(a.octets()[15], 1, "key: the address bytes as in the packet");
    }

    #[test]
    fn a_local_pod_takes_one_address_of_each_family() {
        let ips: Vec<IpAddr> = ["fd00::1", "10.0.0.1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let p = LocalPod::new("mesh/a".into(), &ips, true, false).expect("has IPv4");
        assert_eq!(
            (p.ip, p.ipv6),
            (Ipv4Addr::new(10, 0, 0, 1), "fd00::1".parse().ok())
        );
        assert!(LocalPod::new("mesh/v6".into(), &ips[..1], true, false).is_none());
    }
}
