//! Which eBPF programs are attached inside a network namespace.
//!
//! Debian 12's bpftool (7.1) predates TCX: `bpftool net show` lists classic tc (clsact) and XDP
//! attachments but not the TCX links aya 0.14 creates on this kernel, so an "is everything
//! detached?" check built on it alone would pass vacuously. This module asks the kernel
//! directly (`BPF_PROG_QUERY` for TCX on every interface and for `sk_lookup` on the namespace)
//! and adds bpftool's tc/XDP view when bpftool is installed.

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::CloneFlags;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_SK_LOOKUP: u32 = 36;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// One attachment point with programs on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Where: `tcx/ingress eth0`, `sk_lookup`, or bpftool's `tc`/`xdp` entry.
    pub hook: String,
    /// Program ids (empty for bpftool entries, whose ids are in `hook`).
    pub prog_ids: Vec<u32>,
}

/// Runs `f` on a fresh thread that has joined network namespace `netns` (`/run/netns/<name>`).
/// setns(CLONE_NEWNET) affects only the calling thread, so the caller stays where it was.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("thread inside {netns} panicked"))?
}

/// Programs per TCX hook inside `netns` (`tcx/ingress veth0` -> 1): how many programs capture
/// has on each interface.
pub fn tcx_programs(netns: &str) -> Result<std::collections::BTreeMap<String, usize>> {
    Ok(netns_programs(netns)?
        .into_iter()
        .filter(|a| a.hook.starts_with("tcx/"))
        .map(|a| (a.hook, a.prog_ids.len()))
        .collect())
}

/// Every eBPF attachment inside `netns`: TCX on each interface, sk_lookup on the namespace,
/// and (if bpftool is installed) classic tc and XDP.
pub fn netns_programs(netns: &str) -> Result<Vec<Attachment>> {
    let ns_path = format!("/run/netns/{netns}");
    let mut out = in_netns(netns, move || {
        let mut out = Vec::new();
        for (index, name) in interfaces()? {
            for (at, dir) in [(BPF_TCX_INGRESS, "ingress"), (BPF_TCX_EGRESS, "egress")] {
                let ids = prog_query(index, at).with_context(|| format!("tcx/{dir} on {name}"))?;
                if !ids.is_empty() {
                    out.push(Attachment {
                        hook: format!("tcx/{dir} {name}"),
                        prog_ids: ids,
                    });
                }
            }
        }
        let ns = File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
        let fd = u32::try_from(ns.as_raw_fd()).context("fd")?;
        let ids = prog_query(fd, BPF_SK_LOOKUP).context("sk_lookup query")?;
        if !ids.is_empty() {
            out.push(Attachment {
                hook: "sk_lookup".into(),
                prog_ids: ids,
            });
        }
        Ok(out)
    })?;
    if crate::find_tool("bpftool").is_some() {
        let o = crate::cluster::run(
            crate::cluster::in_netns(netns, "bpftool").args(["-j", "net", "show"]),
        )?;
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).context("parsing bpftool -j net show")?;
        for section in v.as_array().into_iter().flatten() {
            for key in ["tc", "xdp"] {
                for entry in section[key].as_array().into_iter().flatten() {
                    out.push(Attachment {
                        hook: format!("{key} {entry}"),
                        prog_ids: Vec::new(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// `(ifindex, name)` of the current thread's network namespace.
fn interfaces() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, or null on error;
    // it is read only up to that entry and freed exactly once with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error()).context("if_nameindex");
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// The `query` member of `union bpf_attr` (kernel >= 6.6 layout).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// BPF_PROG_QUERY: program ids attached at (`target`, `attach_type`).
fn prog_query(target: u32, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: 64,
        ..Default::default()
    };
    let size = std::mem::size_of::<QueryAttr>();
    // SAFETY: attr is a valid, initialised bpf_attr prefix of `size` bytes; the kernel writes
    // at most prog_cnt (64) ids into `ids`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            size,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // ENOENT: nothing was ever attached there.
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(Vec::new());
        }
        bail!("BPF_PROG_QUERY(attach type {attach_type}): {e}");
    }
    let n = usize::try_from(attr.prog_cnt).unwrap_or(0).min(ids.len());
    Ok(ids[..n].to_vec())
}
