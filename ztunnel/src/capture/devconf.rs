//! `net.ipv4.conf.lo.accept_local = 1`, set through rtnetlink (`RTM_SETLINK` with
//! `IFLA_AF_SPEC` / `AF_INET` / `IFLA_INET_CONF`) rather than `/proc/sys`, which a container
//! (the DaemonSet) normally sees read-only; netlink needs only `CAP_NET_ADMIN` in the node's
//! network namespace, which capture needs anyway.
//!
//! Why: the node-local path hands the node's own packets to `lo`'s ingress; the redirect drops
//! their route, so IP looks one up again, and their source is one of the node's addresses,
//! which the input route check rejects on a device without `accept_local`.

use std::io;

/// `lo` has index 1 in every network namespace.
const LOOPBACK_IFINDEX: i32 = 1;
const RTM_SETLINK: u16 = 19;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET_CONF: u16 = 1;
/// `IPV4_DEVCONF_ACCEPT_LOCAL` (linux/ip.h).
const IPV4_DEVCONF_ACCEPT_LOCAL: u16 = 23;

/// One netlink attribute header + payload (payloads here are multiples of 4 bytes).
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out
}

/// The `RTM_SETLINK` request that sets `lo`'s `accept_local` to 1.
fn request() -> Vec<u8> {
    let conf = attr(IPV4_DEVCONF_ACCEPT_LOCAL, &1u32.to_ne_bytes());
    let inet = attr(IFLA_INET_CONF, &conf);
    let af = attr(libc::AF_INET as u16, &inet);
    let spec = attr(IFLA_AF_SPEC, &af);
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifinfo = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    ifinfo.extend_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
    ifinfo.extend_from_slice(&[0; 8]);
    let len = u32::try_from(16 + ifinfo.len() + spec.len()).unwrap_or(u32::MAX);
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg.extend_from_slice(&ifinfo);
    msg.extend_from_slice(&spec);
    msg
}

/// The error code of a netlink ACK (`NLMSG_ERROR`, 0 = success).
fn ack_error(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?))
}

/// Sets `accept_local` on `lo` in the calling thread's network namespace.
pub(crate) fn accept_local_on_loopback() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the descriptor is owned by `fd` right after.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own exclusively.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let msg = request();
    // SAFETY: `msg` is a valid buffer of `msg.len()` bytes for the duration of the call; an
    // unconnected netlink socket sends to the kernel.
    let sent = unsafe { libc::send(raw, msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: `reply` is a writable buffer of `reply.len()` bytes for the duration of the call.
    let got = unsafe { libc::recv(raw, reply.as_mut_ptr().cast(), reply.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = usize::try_from(got).unwrap_or(0);
    match ack_error(&reply[..got]) {
        Some(0) => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(-e)),
        None => Err(io::Error::other("unexpected netlink reply to RTM_SETLINK")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = request();
        assert_eq!(m.len(), 16 + 16 + 20);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().expect("4 bytes")) as usize,
            m.len()
        );
        // IFLA_AF_SPEC > AF_INET > IFLA_INET_CONF > ACCEPT_LOCAL = 1.
        assert_eq!(&m[32..36], &[20, 0, 26, 0]);
        assert_eq!(&m[36..40], &[16, 0, 2, 0]);
        assert_eq!(&m[40..44], &[12, 0, 1, 0]);
        assert_eq!(&m[44..52], &[8, 0, 23, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn reads_acks() {
        let mut ok = vec![0u8; 36];
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(ack_error(&ok), Some(0));
        ok[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(ack_error(&ok), Some(-1));
        assert_eq!(ack_error(&[0; 8]), None);
    }
}
