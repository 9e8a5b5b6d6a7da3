//! [`CaptureError`]: every way capture can fail, each phrased for the operator (what to
//! mount, which capability or flag is missing).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use aya::maps::MapError;
use aya::programs::links::LinkError;
use aya::programs::ProgramError;
use aya::EbpfError;

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
        /// The pod address whose route was looked up.
        ip: IpAddr,
        /// Why the route did not identify a veth.
        reason: String,
    },
    /// A dual-stack pod's IPv4 and IPv6 routes lead to different node interfaces. Both
    /// addresses are bound to the IPv4 route's interface, so the pod's IPv6 packets, which
    /// enter through the other one, are dropped as spoofed until the routes agree.
    #[error(
        "pod {pod}: the route to {ipv4} leads to {iface4} but the route to {ipv6} to \
         {iface6}; capture binds both to {iface4}, so its IPv6 traffic is dropped until the \
         CNI routes both addresses to one interface"
    )]
    InterfaceMismatch {
        /// `ns/name`.
        pod: String,
        /// The pod's IPv4 address.
        ipv4: Ipv4Addr,
        /// Where its route leads.
        iface4: String,
        /// The pod's IPv6 address.
        ipv6: Ipv6Addr,
        /// Where its route leads.
        iface6: String,
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
    /// Updating the IPv6 enrolled-pod map failed.
    #[error(
        "cannot update the IPv6 enrolled-pod eBPF map for {ip}: {error} (map holds at most 4096 pods)"
    )]
    MapV6 {
        /// Pod IPv6 address.
        ip: Ipv6Addr,
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
    /// The pin directory is not on a bpf filesystem, so pins could not outlive the daemon.
    #[error(
        "{path} is not on a bpf filesystem: mount one where it outlives the daemon (`mount -t \
         bpf bpf /sys/fs/bpf` in the host's mount namespace; in a pod, a hostPath volume of \
         /sys/fs/bpf), or point --bpf-pin-dir at one"
    )]
    NotBpffs {
        /// The configured pin directory.
        path: PathBuf,
    },
    /// Creating, reading or removing a pin failed.
    #[error("bpffs pin {path}: {error}")]
    Pin {
        /// The pin or directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// A pinned link could not be pinned, opened or given the new program.
    #[error("capture link of interface {iface}: {error}")]
    Link {
        /// Interface name.
        iface: String,
        /// What aya reported.
        error: LinkError,
    },
    /// A setting of the node's interfaces the node-local path needs could not be made.
    #[error(
        "cannot set {path} = 1 (rtnetlink): {error}; the node's own traffic to enrolled pods \
         needs it (CAP_NET_ADMIN in the node's network namespace), or set --exempt-node-traffic"
    )]
    Sysctl {
        /// The setting, in sysctl notation.
        path: String,
        /// Write error.
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
