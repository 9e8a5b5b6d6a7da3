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
//! Nothing is pinned to bpffs: the programs, links and maps live as long as the [`Capture`]
//! (the daemon process). A daemon that is killed leaves no program attached; only the ip rule
//! and route remain, and [`Capture::start`] adopts them.

mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfError, EbpfLoader};
use tracing::{debug, info, warn};

use routes::RouteTable;
pub use routes::RULE_PRIORITY;

/// The compiled `ebpf/capture.bpf.c` (built by `build.rs`).
static CAPTURE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.bpf.o"));

/// Name of the TC program (its C function name; `bpftool net show` lists it).
pub const PROGRAM_NAME: &str = "zt_capture";
const ENROLLED_MAP: &str = "zt_enrolled";
/// Value flag in the enrolled map (`ZT_POD_ENROLLED` in the C code).
const POD_ENROLLED: u32 = 1;
/// Value flag: the pod's DNS (port 53) is steered to the DNS proxy (`ZT_POD_DNS`).
const POD_DNS: u32 = 2;

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
    /// UDP and TCP to port 53 from enrolled pods whose [`LocalPod::dns_capture`] is set go to
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
    pub uplinks: Vec<String>,
}

/// A pod on this node as capture sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// `ns/name`, for logs and problem reports.
    pub name: String,
    /// The pod's IPv4 address; its node-side veth is found from the route to it.
    pub ip: Ipv4Addr,
    /// Whether the pod's traffic is captured into the mesh.
    pub enrolled: bool,
    /// Whether the pod's DNS is captured too (only when enrolled; pod annotation opt-out).
    pub dns_capture: bool,
}

/// Capture failures, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Settings that cannot work (the field is named).
    #[error("invalid capture settings: {0}")]
    InvalidSettings(String),
    /// The eBPF object could not be parsed or its maps created.
    #[error(
        "cannot load the capture eBPF object (needs root, or CAP_BPF + CAP_NET_ADMIN + \
         CAP_SYS_ADMIN, and a kernel with BTF): {error}"
    )]
    Object {
        /// What aya reported.
        error: EbpfError,
    },
    /// The object lacks a program or map this code expects (built from another source?).
    #[error("the embedded capture eBPF object has no {0}; rebuild ztunnel (ebpf/capture.bpf.c)")]
    ObjectMismatch(String),
    /// The kernel rejected the program; the message includes the verifier log.
    #[error("the kernel rejected eBPF program {program}: {error}")]
    Program {
        /// Program name.
        program: &'static str,
        /// Includes the verifier log for load failures.
        error: ProgramError,
    },
    /// Attaching to an interface failed.
    #[error("cannot attach capture program to interface {iface}: {error}")]
    Attach {
        /// Interface name.
        iface: String,
        /// What aya reported.
        error: ProgramError,
    },
    /// Detaching from an interface failed.
    #[error("cannot detach capture program from interface {iface}: {error}")]
    Detach {
        /// Interface name.
        iface: String,
        /// What aya reported.
        error: ProgramError,
    },
    /// An interface (uplink or pod veth) does not exist in this network namespace.
    #[error("interface {iface} not found in this network namespace: {error}")]
    Interface {
        /// Interface name.
        iface: String,
        /// Lookup error.
        error: io::Error,
    },
    /// No node-side interface could be found for a pod (yet); retried on the next sync.
    #[error("no node-side interface for pod {pod} ({ip}) yet: {reason}; will retry")]
    NoPodInterface {
        /// `ns/name`.
        pod: String,
        /// Pod IP.
        ip: Ipv4Addr,
        /// Why the route did not identify a veth.
        reason: String,
    },
    /// Updating the enrolled-pod map failed.
    #[error(
        "cannot update the enrolled-pod eBPF map for {ip}: {error} (map holds at most 4096 pods)"
    )]
    Map {
        /// Pod IP.
        ip: Ipv4Addr,
        /// What aya reported.
        error: MapError,
    },
    /// Reading the routing table failed.
    #[error("cannot read routing table {path}: {error}")]
    Routes {
        /// File read.
        path: String,
        /// Read error.
        error: io::Error,
    },
    /// An `ip` command (rule/route set-up) failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr, or why it could not run.
        detail: String,
    },
}

/// One program attachment.
#[derive(Debug)]
struct Attachment {
    link: SchedClassifierLinkId,
    ifindex: u32,
}

/// Loaded capture programs, their attachments and the enrollment map. Dropping it detaches
/// everything and removes the routing (best effort); prefer [`Capture::shutdown`] to see errors.
pub struct Capture {
    ebpf: Ebpf,
    enrolled_map: BpfHashMap<MapData, u32, u32>,
    settings: CaptureSettings,
    uplinks: BTreeMap<String, Attachment>,
    pod_ifaces: BTreeMap<String, Attachment>,
    /// What the enrolled map holds: pod IP -> flags written.
    enrolled: BTreeMap<Ipv4Addr, u32>,
    routing_installed: bool,
    closed: bool,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("uplinks", &self.uplinks.keys().collect::<Vec<_>>())
            .field("pod_ifaces", &self.pod_ifaces.keys().collect::<Vec<_>>())
            .field("enrolled", &self.enrolled)
            .finish_non_exhaustive()
    }
}

fn validate(s: &CaptureSettings) -> Result<(), CaptureError> {
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
    /// Loads the program, creates its maps, installs the ip rule and local route (idempotently:
    /// a crashed previous instance may have left them) and attaches to every uplink.
    ///
    /// Must be called inside the node's network namespace (from the thread that is in it).
    /// The daemon's listeners should exist before pods are enrolled with [`Capture::sync`]:
    /// a SYN that finds no listener is let through uncaptured.
    pub fn start(settings: &CaptureSettings) -> Result<Capture, CaptureError> {
        validate(settings)?;
        let mut ebpf = EbpfLoader::new()
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

        let prog = program(&mut ebpf)?;
        prog.load().map_err(|error| CaptureError::Program {
            program: PROGRAM_NAME,
            error,
        })?;
        let map = ebpf
            .take_map(ENROLLED_MAP)
            .ok_or_else(|| CaptureError::ObjectMismatch(format!("map {ENROLLED_MAP}")))?;
        let enrolled_map = BpfHashMap::try_from(map).map_err(|error| CaptureError::Map {
            ip: Ipv4Addr::UNSPECIFIED,
            error,
        })?;

        let mut capture = Capture {
            ebpf,
            enrolled_map,
            settings: settings.clone(),
            uplinks: BTreeMap::new(),
            pod_ifaces: BTreeMap::new(),
            enrolled: BTreeMap::new(),
            routing_installed: false,
            closed: false,
        };
        // From here on, an error drops `capture`, which undoes what was done.
        routes::install(settings.capture_mark, settings.route_table)?;
        capture.routing_installed = true;
        for uplink in &settings.uplinks {
            if capture.uplinks.contains_key(uplink) {
                continue;
            }
            let att = capture.attach(uplink)?;
            capture.uplinks.insert(uplink.clone(), att);
        }
        info!(
            uplinks = ?settings.uplinks,
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
    /// enrolled pods. Idempotent and cheap when nothing changed (one read of the routing table,
    /// one interface-index lookup per pod). A pod whose veth is not there yet is reported, not
    /// fatal: call again later. Returns `(pod name, problem)` pairs (the name is an interface
    /// for a failed detach, `*` if the routing table could not be read). Like `start`, call it
    /// from a thread in the node's network namespace.
    pub fn sync(&mut self, pods: &[LocalPod]) -> Vec<(String, CaptureError)> {
        let mut problems = Vec::new();
        let table = match RouteTable::read() {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(("*".to_string(), e));
                None
            }
        };

        // Desired interfaces (interface -> first pod using it, for reports).
        let mut wanted: BTreeMap<String, &LocalPod> = BTreeMap::new();
        if let Some(table) = &table {
            for pod in pods {
                match table.pod_interface(pod.ip, &self.settings.uplinks) {
                    Ok(iface) => {
                        wanted.entry(iface).or_insert(pod);
                    }
                    Err(reason) => problems.push((
                        pod.name.clone(),
                        CaptureError::NoPodInterface {
                            pod: pod.name.clone(),
                            ip: pod.ip,
                            reason,
                        },
                    )),
                }
            }
            // Without a routing table we cannot tell which veths are still in use: keep them.
            let gone: Vec<String> = self
                .pod_ifaces
                .keys()
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
            if let Err(e) = self.ensure_attached(iface) {
                problems.push((pod.name.clone(), e));
            }
        }

        self.sync_enrolled(pods, &mut problems);
        for (pod, problem) in &problems {
            debug!(pod = %pod, error = %problem, "capture sync problem");
        }
        problems
    }

    /// Interfaces the program is attached to now (uplinks and pod veths), for status and
    /// readiness.
    pub fn attached(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.uplinks.keys().chain(self.pod_ifaces.keys()).collect();
        set.into_iter().cloned().collect()
    }

    /// Pod IPs in the enrolled map (their traffic is captured), for status and metrics.
    pub fn enrolled(&self) -> Vec<Ipv4Addr> {
        self.enrolled.keys().copied().collect()
    }

    /// Detaches every program and removes the ip rule and route. Also done (best effort, errors
    /// only logged) when a `Capture` is dropped.
    pub fn shutdown(mut self) -> Result<(), CaptureError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), CaptureError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let mut first_err = None;
        let ifaces: Vec<String> = self.pod_ifaces.keys().cloned().collect();
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
        if self.routing_installed {
            match routes::remove(self.settings.capture_mark, self.settings.route_table) {
                Ok(()) => self.routing_installed = false,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        info!("capture stopped");
        first_err.map_or(Ok(()), Err)
    }

    /// Attaches to `iface` unless already attached to the interface of that name and index
    /// (a pod re-created with the same veth name gets a new index; its old link died with the
    /// old device).
    fn ensure_attached(&mut self, iface: &str) -> Result<(), CaptureError> {
        if self.uplinks.contains_key(iface) {
            return Ok(());
        }
        let idx = ifindex(iface)?;
        if let Some(att) = self.pod_ifaces.get(iface) {
            if att.ifindex == idx {
                return Ok(());
            }
            debug!(
                iface,
                old = att.ifindex,
                new = idx,
                "pod interface was re-created"
            );
            // Best effort: the old link is already defunct.
            let _ = self.detach_pod_iface(iface);
        }
        let att = self.attach(iface)?;
        self.pod_ifaces.insert(iface.to_string(), att);
        Ok(())
    }

    fn attach(&mut self, iface: &str) -> Result<Attachment, CaptureError> {
        let idx = ifindex(iface)?;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let attach_err = |error| CaptureError::Attach {
            iface: iface.to_string(),
            error,
        };
        if tcx {
            // Another live instance (e.g. an overlapping restart) would capture too.
            if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
                if progs.iter().any(|p| p.name_as_str() == Some(PROGRAM_NAME)) {
                    warn!(
                        iface,
                        "another {PROGRAM_NAME} program is already attached here (a second \
                         daemon instance?)"
                    );
                }
            }
        }
        let prog = program(&mut self.ebpf)?;
        let link = if tcx {
            // First in the TCX chain, so another program returning "pass" cannot bypass
            // capture; untouched packets continue to the next program (TCX_NEXT).
            prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
        } else {
            // Legacy clsact filter: survives the process, unlike a TCX link.
            if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
                debug!(iface, error = %e, "clsact qdisc not added (probably exists)");
            }
            prog.attach(iface, TcAttachType::Ingress)
        }
        .map_err(attach_err)?;
        info!(iface, ifindex = idx, tcx, "capture attached");
        Ok(Attachment { link, ifindex: idx })
    }

    fn detach_pod_iface(&mut self, iface: &str) -> Result<(), CaptureError> {
        match self.pod_ifaces.remove(iface) {
            Some(att) => self.detach_link(iface, att),
            None => Ok(()),
        }
    }

    fn detach_link(&mut self, iface: &str, att: Attachment) -> Result<(), CaptureError> {
        let prog = program(&mut self.ebpf)?;
        match prog.detach(att.link) {
            Ok(()) => {
                info!(iface, ifindex = att.ifindex, "capture detached");
                Ok(())
            }
            // The device is gone (pod deleted): nothing left to detach.
            Err(_) if ifindex(iface).map_or(true, |i| i != att.ifindex) => {
                info!(
                    iface,
                    ifindex = att.ifindex,
                    "capture detached (interface gone)"
                );
                Ok(())
            }
            Err(error) => Err(CaptureError::Detach {
                iface: iface.to_string(),
                error,
            }),
        }
    }

    /// Sets the enrolled map to exactly the enrolled pods' IPs and flags (diff against what we
    /// wrote).
    fn sync_enrolled(&mut self, pods: &[LocalPod], problems: &mut Vec<(String, CaptureError)>) {
        let want: BTreeMap<Ipv4Addr, (&str, u32)> = pods
            .iter()
            .filter(|p| p.enrolled)
            .map(|p| {
                let flags = POD_ENROLLED | if p.dns_capture { POD_DNS } else { 0 };
                (p.ip, (p.name.as_str(), flags))
            })
            .collect();
        let stale: Vec<Ipv4Addr> = self
            .enrolled
            .keys()
            .filter(|ip| !want.contains_key(*ip))
            .copied()
            .collect();
        for ip in stale {
            match self.enrolled_map.remove(&map_key(ip)) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.enrolled.remove(&ip);
                    info!(pod_ip = %ip, "capture: pod no longer enrolled");
                }
                Err(error) => problems.push((ip.to_string(), CaptureError::Map { ip, error })),
            }
        }
        for (ip, (name, flags)) in want {
            if self.enrolled.get(&ip) == Some(&flags) {
                continue;
            }
            match self.enrolled_map.insert(map_key(ip), flags, 0) {
                Ok(()) => {
                    self.enrolled.insert(ip, flags);
                    info!(
                        pod = name,
                        pod_ip = %ip,
                        dns_capture = flags & POD_DNS != 0,
                        "capture: pod enrolled"
                    );
                }
                Err(error) => problems.push((name.to_string(), CaptureError::Map { ip, error })),
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!(error = %e, "capture teardown incomplete");
        }
    }
}

/// The map key: the address as it sits in the packet (network byte order).
fn map_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, CaptureError> {
    let prog = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| CaptureError::ObjectMismatch(format!("program {PROGRAM_NAME}")))?;
    prog.try_into().map_err(|error| CaptureError::Program {
        program: PROGRAM_NAME,
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

    #[test]
    fn map_key_is_network_order() {
        assert_eq!(
            map_key(Ipv4Addr::new(10, 244, 1, 11)).to_ne_bytes(),
            [10, 244, 1, 11]
        );
    }
}
