//! eBPF traffic capture: loads `ebpf/capture.bpf.c`, attaches it to the node's uplinks and to
//! the node-side veth of every local pod, keeps the enrolled-pod map in step with the desired
//! state, and installs the policy route that delivers captured packets locally.
//!
//! How it works (see `ebpf/README.md` and ARCHITECTURE.md, "Data path decisions"):
//! - one TC ingress program (`zt_capture`, TCX link on kernels >= 6.6) where traffic enters the
//!   node's network namespace: pod veths (traffic leaving pods) and uplinks (from other nodes);
//! - TCP SYNs from an enrolled pod are `bpf_sk_assign`ed to the outbound listener, SYNs to an
//!   enrolled pod to the HBONE listener (HBONE port) or the inbound plaintext listener (any
//!   other port); later packets, and the replies of the daemon's own transparent connections,
//!   to the socket owning their 4-tuple;
//! - assigned packets carry `capture_mark`; `ip rule fwmark` + `local default dev lo` makes the
//!   kernel deliver them locally although their destination is a pod address.
//!
//! Capture fails closed: the maps and the TCX links (hence the program) are pinned in bpffs
//! ([`pins`]) and the ip rule and route stay, so they outlive the daemon process. While no
//! daemon listens, the program drops what it would have captured (a client's SYN is retried and
//! reaches the next daemon). [`Capture::start`] adopts what a previous daemon left, swapping
//! the new program into the existing links; dropping a [`Capture`] leaves everything in place;
//! only [`Capture::uninstall`] (or [`uninstall_pinned`] without a daemon) removes it.
//!
//! Identity is bound to the interface: each enrolled pod's map entry carries the ifindex of its
//! node-side interface, and a packet with the pod's source address arriving anywhere else is
//! dropped and counted ([`DropCounts`]).
//!
//! The node's own traffic to a local pod (any host-network process) leaves through the pod
//! veth's egress without entering the node: a second program there (`zt_host_redirect`) hands
//! TCP to enrolled pods to `lo`'s ingress, where `zt_capture` runs too, so it reaches the
//! inbound plaintext listener like traffic from any other non-mesh source.
//!
//! Uplinks are the configured ones, or else discovered from the routing table on every sync
//! ([`routes::RouteTable::uplinks`]). [`Capture::pods`] tells, per enrolled pod, whether its
//! capture is complete; the daemon is not ready while one is not.

mod announced;
mod devconf;
mod error;
mod ipv6;
mod links;
mod pins;
mod routes;
mod settings;
mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

pub use announced::interface_index;
pub use error::CaptureError;
use pins::{Hook, PinDir};
use routes::RouteTable;
pub use routes::RULE_PRIORITY;
use settings::validate;
pub use settings::CaptureSettings;
pub use status::PodCapture;

/// The compiled `ebpf/capture.bpf.c` (built by `build.rs`).
static CAPTURE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.bpf.o"));

/// Name of the TC program (its C function name; `bpftool net show` lists it).
pub const PROGRAM_NAME: &str = "zt_capture";
/// The program on pod veths' egress that sends the node's own traffic to enrolled pods
/// through `lo` (and so through `zt_capture`).
pub const HOST_PROGRAM_NAME: &str = "zt_host_redirect";
/// The loopback interface: `zt_capture` at its ingress sees what `zt_host_redirect` sends.
const LOOPBACK: &str = "lo";
const ENROLLED_MAP: &str = "zt_enrolled";
/// Entries of the enrolled map (`max_entries` in the C code).
const ENROLLED_MAX: u32 = 4096;
const STATS_MAP: &str = "zt_stats";
/// Slots of `zt_stats` (`ZT_STAT_*` in the C code).
const STAT_SPOOFED: u32 = 0;
const STAT_NO_DAEMON: u32 = 1;
const STAT_IPV6_EXT: u32 = 2;
const STAT_COUNT: u32 = 3;
/// Value flag in the enrolled map (`ZT_POD_ENROLLED` in the C code).
const POD_ENROLLED: u32 = 1;
/// Value flag: the pod's DNS (port 53) is steered to the DNS proxy (`ZT_POD_DNS`).
const POD_DNS: u32 = 2;

/// Packets the programs dropped since the maps were created (they survive daemon restarts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// Carrying an enrolled pod's source address but entering the node elsewhere than through
    /// that pod's interface.
    pub spoofed_source: u64,
    /// Would have been captured, but no daemon socket was there (daemon stopped or restarting).
    pub no_daemon: u64,
    /// IPv6 with an extension header from or to an enrolled pod: it could hide TCP from the
    /// capture program, so it is dropped rather than passed around the daemon.
    pub ipv6_extension_header: u64,
}

/// A pod on this node as capture sees it: one address of each family it has (IPv4 only,
/// IPv6 only, or dual stack), both captured on the same node-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// `ns/name`, for logs and problem reports.
    pub name: String,
    /// The pod's IPv4 address; when it has one, its node-side veth is found from the route
    /// to it.
    pub ipv4: Option<Ipv4Addr>,
    /// The pod's IPv6 address; an IPv6-only pod's veth is found from the route to it, a
    /// dual-stack pod's route must lead to the same veth as its IPv4 one.
    pub ipv6: Option<Ipv6Addr>,
    /// Whether the pod's traffic is captured into the mesh.
    pub enrolled: bool,
    /// Whether the pod's DNS is captured too (only when enrolled; pod annotation opt-out).
    pub dns_capture: bool,
}

/// One program attachment.
#[derive(Debug)]
struct Attachment {
    link: Link,
    ifindex: u32,
    hook: Hook,
}

#[derive(Debug)]
enum Link {
    /// A TCX link pinned at `pin`: stays attached after the daemon exits.
    Pinned { link: FdLink, pin: PathBuf },
    /// A clsact filter (kernels without TCX), owned by the loaded program.
    Netlink(SchedClassifierLinkId),
}

/// The enrolled map's value (`struct zt_pod`): flags, ifindex of the pod's interface.
type PodValue = [u32; 2];

/// Loaded capture program, its attachments and maps. Dropping it leaves the pinned state in
/// place (capture fails closed until a daemon adopts it); [`Capture::uninstall`] removes it.
pub struct Capture {
    ebpf: Ebpf,
    enrolled_map: BpfHashMap<MapData, u32, PodValue>,
    stats_map: PerCpuArray<MapData, u64>,
    pins: PinDir,
    settings: CaptureSettings,
    /// Uplinks and `lo` (`zt_capture` at ingress).
    uplinks: BTreeMap<String, Attachment>,
    /// Pod veths, `zt_capture` at ingress.
    pod_ifaces: BTreeMap<String, Attachment>,
    /// Pod veths, `zt_host_redirect` at egress.
    pod_egress: BTreeMap<String, Attachment>,
    /// The uplinks in force: the configured ones, or the last discovered.
    uplink_names: Vec<String>,
    /// What the enrolled map holds: pod IP -> value written.
    enrolled: BTreeMap<Ipv4Addr, PodValue>,
    /// The IPv6 enrolled map.
    enrolled6: ipv6::Enrolled6,
    /// Each enrolled pod's capture as of the last sync.
    pods: Vec<PodCapture>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("uplinks", &self.uplinks.keys().collect::<Vec<_>>())
            .field("pod_ifaces", &self.pod_ifaces.keys().collect::<Vec<_>>())
            .field("pod_egress", &self.pod_egress.keys().collect::<Vec<_>>())
            .field("enrolled", &self.enrolled)
            .finish_non_exhaustive()
    }
}

/// Interface index in the calling thread's network namespace.
fn ifindex(iface: &str) -> Result<u32, CaptureError> {
    let err = |error| CaptureError::Interface {
        iface: iface.to_string(),
        error,
    };
    let name =
        CString::new(iface).map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; if_nametoindex
    // only reads it.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(idx)
}

impl Capture {
    /// Loads the program into the pinned maps (created on first start), installs the ip rule
    /// and local route (idempotently), adopts the links a previous daemon pinned (the new
    /// program replaces the old one in each, atomically) and attaches to every uplink.
    ///
    /// Must be called inside the node's network namespace (from the thread that is in it),
    /// after the daemon's listeners are bound: from the moment a link carries this program,
    /// a captured SYN that finds no listener is dropped.
    pub fn start(settings: &CaptureSettings) -> Result<Capture, CaptureError> {
        validate(settings)?;
        let pins = PinDir::open(&settings.pin_dir)?;
        // Key u32; values: struct zt_pod (8 bytes), a u64 per CPU.
        if pins.drop_incompatible_map(ENROLLED_MAP, 4, 8, ENROLLED_MAX)? {
            warn!(pin_dir = %pins.path().display(), "pinned enrolled-pod map had another shape \
                  (older build); replaced, pods are enrolled again at the first sync");
        }
        pins.drop_incompatible_map(STATS_MAP, 4, 8, STAT_COUNT)?;
        ipv6::drop_incompatible(&pins)?;
        let (enrolled_pin, stats_pin) = (pins.object(ENROLLED_MAP), pins.object(STATS_MAP));
        let enrolled6_pin = pins.object(ipv6::ENROLLED6_MAP);
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(ENROLLED_MAP, enrolled_pin.as_path())
            .map_pin_path(ipv6::ENROLLED6_MAP, enrolled6_pin.as_path())
            .map_pin_path(STATS_MAP, stats_pin.as_path())
            .override_global("zt_capture_mark", &settings.capture_mark, true)
            .override_global("zt_daemon_mark", &settings.daemon_mark, true)
            .override_global("zt_outbound_port", &settings.outbound_port.to_be(), true)
            .override_global(
                "zt_inbound_port",
                &settings.inbound_plaintext_port.to_be(),
                true,
            )
            .override_global("zt_hbone_port", &settings.hbone_port.to_be(), true)
            .override_global("zt_dns_port", &settings.dns_port.to_be(), true)
            .load(CAPTURE_OBJECT)
            .map_err(|error| CaptureError::Object { error })?;

        for name in [PROGRAM_NAME, HOST_PROGRAM_NAME] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|error| CaptureError::Program {
                    program: name,
                    error,
                })?;
        }
        let map_err = |error| CaptureError::Map {
            ip: Ipv4Addr::UNSPECIFIED,
            error,
        };
        let map = ebpf
            .take_map(ENROLLED_MAP)
            .ok_or_else(|| CaptureError::ObjectMismatch(format!("map {ENROLLED_MAP}")))?;
        let enrolled_map: BpfHashMap<MapData, u32, PodValue> =
            BpfHashMap::try_from(map).map_err(map_err)?;
        let map = ebpf
            .take_map(STATS_MAP)
            .ok_or_else(|| CaptureError::ObjectMismatch(format!("map {STATS_MAP}")))?;
        let stats_map = PerCpuArray::try_from(map).map_err(map_err)?;
        let enrolled6 = ipv6::Enrolled6::take(&mut ebpf)?;
        // What a previous daemon enrolled stays in force until the first sync corrects it.
        let enrolled = enrolled_map
            .iter()
            .flatten()
            .map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v))
            .collect();

        let mut capture = Capture {
            ebpf,
            enrolled_map,
            stats_map,
            pins,
            settings: settings.clone(),
            uplinks: BTreeMap::new(),
            pod_ifaces: BTreeMap::new(),
            pod_egress: BTreeMap::new(),
            uplink_names: settings.uplinks.clone(),
            enrolled,
            enrolled6,
            pods: Vec::new(),
        };
        capture.pin_program();
        routes::install(settings.capture_mark, settings.route_table)?;
        if !settings.exempt_node_traffic {
            devconf::accept_local_on_loopback().map_err(|error| CaptureError::Sysctl {
                path: "net.ipv4.conf.lo.accept_local".to_string(),
                error,
            })?;
        }
        if settings.uplinks.is_empty() {
            capture.uplink_names = RouteTable::read()?.uplinks(&[]);
        }
        let adopted = capture.adopt_links()?;
        for uplink in capture.node_ifaces() {
            capture.ensure_attached(&uplink, true)?;
        }
        info!(
            uplinks = ?capture.uplink_names,
            discovered = settings.uplinks.is_empty(),
            exempt_node_traffic = settings.exempt_node_traffic,
            adopted,
            pin_dir = %settings.pin_dir.display(),
            enrolled = capture.enrolled.len(),
            enrolled6 = capture.enrolled6.addresses().len(),
            outbound_port = settings.outbound_port,
            inbound_plaintext_port = settings.inbound_plaintext_port,
            hbone_port = settings.hbone_port,
            dns_port = settings.dns_port,
            capture_mark = format!("{:#x}", settings.capture_mark),
            daemon_mark = format!("{:#x}", settings.daemon_mark),
            "capture started"
        );
        Ok(capture)
    }

    /// Makes capture match the desired state: `pods` is every pod on this node.
    ///
    /// Attaches the program to the node-side veth of every pod, enrolled or not (its traffic
    /// to enrolled pods on this node, and the replies of enrolled pods, enter the node there),
    /// detaches from veths of pods that are gone, and sets the enrolled-pod map to exactly the
    /// enrolled pods, each with its interface. Idempotent and cheap when nothing changed (one
    /// read of the routing table, one interface-index lookup per pod). A pod whose veth is not
    /// there yet is reported, not fatal: call again later (meanwhile no packet is attributed to
    /// it). Returns `(pod name, problem)` pairs (the name is an interface for a failed detach,
    /// `*` if the routing table could not be read). Like `start`, call it from a thread in the
    /// node's network namespace.
    pub fn sync(&mut self, pods: &[LocalPod]) -> Vec<(String, CaptureError)> {
        let mut problems = Vec::new();
        let table = match RouteTable::read() {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(("*".to_string(), e));
                None
            }
        };

        // Desired interfaces (interface -> first pod using it, for reports), and each pod's
        // (by the address it is found from).
        let mut wanted: BTreeMap<String, &LocalPod> = BTreeMap::new();
        let mut pod_iface: BTreeMap<IpAddr, String> = BTreeMap::new();
        if let Some(table) = &table {
            if self.settings.uplinks.is_empty() {
                self.rediscover_uplinks(table, pods, &mut problems);
            }
            for pod in pods {
                let Some(primary) = pod.primary() else {
                    continue;
                };
                match pod.interface(table, &self.uplink_names) {
                    Ok((iface, mismatch)) => {
                        pod_iface.insert(primary, iface.clone());
                        wanted.entry(iface).or_insert(pod);
                        if let Some(e) = mismatch {
                            problems.push((pod.name.clone(), e));
                        }
                    }
                    Err(e) => problems.push((pod.name.clone(), e)),
                }
            }
            // Without a routing table we cannot tell which veths are still in use: keep them.
            let gone: BTreeSet<String> = self
                .pod_ifaces
                .keys()
                .chain(self.pod_egress.keys())
                .filter(|i| !wanted.contains_key(*i))
                .cloned()
                .collect();
            for iface in gone {
                if let Err(e) = self.detach_pod_iface(&iface) {
                    problems.push((iface.clone(), e));
                }
            }
        }

        for (iface, pod) in &wanted {
            if let Err(e) = self.ensure_attached(iface, false) {
                problems.push((pod.name.clone(), e));
            }
        }

        let ifindexes: BTreeMap<IpAddr, u32> = pod_iface
            .into_iter()
            .filter_map(|(ip, iface)| {
                let att = self.pod_ifaces.get(&iface)?;
                Some((ip, att.ifindex))
            })
            .collect();
        self.sync_enrolled(pods, &ifindexes, table.is_some(), &mut problems);
        for (pod, problem) in &problems {
            debug!(pod = %pod, error = %problem, "capture sync problem");
        }
        self.pods = self.pod_states(pods, &problems);
        problems
    }

    /// Interfaces a program is attached to now (uplinks, `lo` and pod veths), for status and
    /// readiness.
    pub fn attached(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self
            .uplinks
            .keys()
            .chain(self.pod_ifaces.keys())
            .chain(self.pod_egress.keys())
            .collect();
        set.into_iter().cloned().collect()
    }

    /// The uplinks in force (configured, or discovered at the last sync).
    pub fn uplinks(&self) -> &[String] {
        &self.uplink_names
    }

    /// Every enrolled pod's capture as of the last sync (sorted by IP): whether it is
    /// complete, and if not why. The daemon is not ready while one is not captured.
    pub fn pods(&self) -> &[PodCapture] {
        &self.pods
    }

    /// Pod addresses in the enrolled maps (their traffic is captured), IPv4 then IPv6, for
    /// status.
    pub fn enrolled(&self) -> Vec<IpAddr> {
        let v4 = self.enrolled.keys().map(|ip| IpAddr::V4(*ip));
        v4.chain(self.enrolled6.addresses().into_iter().map(IpAddr::V6))
            .collect()
    }

    /// Enrolled pods (as of the last sync) with an address in the enrolled maps, counted once
    /// whatever their number of addresses, for metrics.
    pub fn enrolled_pods(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| p.ips.iter().any(|ip| self.written(*ip).is_some()))
            .count()
    }

    /// What the enrolled map of `ip`'s family holds for it.
    fn written(&self, ip: IpAddr) -> Option<PodValue> {
        match ip {
            IpAddr::V4(a) => self.enrolled.get(&a).copied(),
            IpAddr::V6(a) => self.enrolled6.get(a),
        }
    }

    /// What the programs dropped so far (summed over CPUs; counted since the pinned maps were
    /// created, so across daemon restarts).
    pub fn drop_counts(&self) -> DropCounts {
        let sum = |slot: u32| {
            self.stats_map
                .get(&slot, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        DropCounts {
            spoofed_source: sum(STAT_SPOOFED),
            no_daemon: sum(STAT_NO_DAEMON),
            ipv6_extension_header: sum(STAT_IPV6_EXT),
        }
    }

    /// Removes capture for good: detaches every program, removes the pins (maps, program,
    /// links) and their directory, and the ip rule and route. Traffic flows directly again.
    pub fn uninstall(mut self) -> Result<(), CaptureError> {
        let mut first_err = None;
        let ifaces: BTreeSet<String> = self
            .pod_ifaces
            .keys()
            .chain(self.pod_egress.keys())
            .cloned()
            .collect();
        for iface in ifaces {
            if let Err(e) = self.detach_pod_iface(&iface) {
                first_err.get_or_insert(e);
            }
        }
        let uplinks = std::mem::take(&mut self.uplinks);
        for (iface, att) in uplinks {
            if let Err(e) = self.detach_link(&iface, att) {
                first_err.get_or_insert(e);
            }
        }
        let Capture {
            ebpf,
            pins,
            settings,
            ..
        } = self;
        drop(ebpf);
        let result = uninstall_pinned(pins.path(), settings.capture_mark, settings.route_table);
        if let Err(e) = result {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sets the enrolled maps to exactly the enrolled pods' addresses (each in its family's
    /// map, both with the same value), flags and interfaces (diff against what we wrote).
    /// `ifindexes` is by the address a pod's interface was found from
    /// ([`LocalPod::primary`]). Without a routing table (`routes_known` false) a pod keeps the
    /// interface it had.
    fn sync_enrolled(
        &mut self,
        pods: &[LocalPod],
        ifindexes: &BTreeMap<IpAddr, u32>,
        routes_known: bool,
        problems: &mut Vec<(String, CaptureError)>,
    ) {
        let (want, want6) = ipv6::wanted(pods, ifindexes, |ip| {
            // Without a routing table, a pod keeps the interface it had.
            (!routes_known).then(|| self.written(ip)).flatten()
        });
        self.enrolled6.sync(want6, problems);
        sync_pod_map(
            &mut self.enrolled_map,
            &mut self.enrolled,
            want,
            map_key,
            |ip, error| CaptureError::Map { ip, error },
            problems,
        );
    }
}

/// Removes the capture a daemon left pinned in `pin_dir` (links first, so the programs stop
/// before their maps go; then the directory) and the ip rule and route of `capture_mark` /
/// `route_table`. For `ztunnel uninstall` and `--detach-on-exit`; call it in the node's network
/// namespace. Idempotent: nothing there is fine. Returns how many pins were removed.
pub fn uninstall_pinned(
    pin_dir: &Path,
    capture_mark: u32,
    route_table: u32,
) -> Result<usize, CaptureError> {
    let removed = match PinDir::existing(pin_dir) {
        Some(dir) => dir.remove_all()?,
        None => 0,
    };
    routes::remove(capture_mark, route_table)?;
    info!(pin_dir = %pin_dir.display(), removed, "capture uninstalled");
    Ok(removed)
}

/// Sets an enrolled-pod map (IPv4 or IPv6) to exactly `want`, diffing against `written`
/// (what this daemon wrote, or found in the pinned map): stale addresses are removed, new or
/// changed ones written, and each failure is added to `problems` with its pod.
fn sync_pod_map<A, K>(
    map: &mut BpfHashMap<MapData, K, PodValue>,
    written: &mut BTreeMap<A, PodValue>,
    want: BTreeMap<A, (&str, PodValue)>,
    key: impl Fn(A) -> K,
    map_error: impl Fn(A, MapError) -> CaptureError,
    problems: &mut Vec<(String, CaptureError)>,
) where
    A: Copy + Ord + std::fmt::Display,
    K: aya::Pod,
{
    let stale: Vec<A> = written
        .keys()
        .filter(|ip| !want.contains_key(*ip))
        .copied()
        .collect();
    for ip in stale {
        match map.remove(&key(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => {
                written.remove(&ip);
                info!(pod_ip = %ip, "capture: pod no longer enrolled");
            }
            Err(error) => problems.push((ip.to_string(), map_error(ip, error))),
        }
    }
    for (ip, (name, value)) in want {
        if written.get(&ip) == Some(&value) {
            continue;
        }
        match map.insert(key(ip), value, 0) {
            Ok(()) => {
                written.insert(ip, value);
                info!(
                    pod = name,
                    pod_ip = %ip,
                    dns_capture = value[0] & POD_DNS != 0,
                    ifindex = value[1],
                    "capture: pod enrolled"
                );
            }
            Err(error) => problems.push((name.to_string(), map_error(ip, error))),
        }
    }
}

/// The map key: the address as it sits in the packet (network byte order).
fn map_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, CaptureError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| CaptureError::ObjectMismatch(format!("program {name}")))?;
    prog.try_into().map_err(|error| CaptureError::Program {
        program: name,
        error,
    })
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync + 'static>() {}
    is::<CaptureError>();
    is::<Capture>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_key_is_network_order() {
        assert_eq!(
            map_key(Ipv4Addr::new(10, 244, 1, 11)).to_ne_bytes(),
            [10, 244, 1, 11]
        );
    }
}
