//! What the CNI endpoint ([`crate::cni`]) asks of capture before it answers the plugin: is a
//! pod's address (either family) in the enrolled map with the index of the interface the plugin named, and is
//! the program attached there.

use std::net::IpAddr;

use super::{ifindex, Capture, CaptureError, POD_ENROLLED};

impl Capture {
    /// The interface index the enrolled map of `ip`'s family holds for it, when the pod is
    /// enrolled (0 while its interface is not known).
    pub fn enrolled_ifindex(&self, ip: IpAddr) -> Option<u32> {
        self.written(ip)
            .filter(|v| v[0] & POD_ENROLLED != 0)
            .map(|v| v[1])
    }

    /// The pod interface with index `index` the program is attached to, if any.
    pub fn attached_interface(&self, index: u32) -> Option<&str> {
        self.pod_ifaces
            .iter()
            .find(|(_, a)| a.ifindex == index)
            .map(|(name, _)| name.as_str())
    }
}

/// The index of interface `iface` in this network namespace.
pub fn interface_index(iface: &str) -> Result<u32, CaptureError> {
    ifindex(iface)
}
