//! Attaching the capture programs to interfaces: new TCX links (pinned, first in the chain),
//! links a previous daemon pinned (adopted with an atomic program swap), and detaching.
//!
//! Three kinds of attachment: `zt_capture` at the ingress of uplinks and `lo` (node
//! interfaces), `zt_capture` at the ingress of pod veths, `zt_host_redirect` at the egress of
//! pod veths (the node-local path; none with `exempt_node_traffic`).

use std::io;

use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use tracing::{debug, info, warn};

use super::pins::Hook;
use super::{
    ifindex, program, Attachment, Capture, CaptureError, Link, HOST_PROGRAM_NAME, PROGRAM_NAME,
};

/// Which set of attachments an interface belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Table {
    /// Uplinks and `lo`: `zt_capture` at ingress.
    Node,
    /// Pod veths: `zt_capture` at ingress.
    Pod,
    /// Pod veths: `zt_host_redirect` at egress.
    PodEgress,
}

impl Table {
    fn hook(self) -> Hook {
        match self {
            Table::Node | Table::Pod => Hook::Ingress,
            Table::PodEgress => Hook::Egress,
        }
    }
}

/// The program that runs on `hook`.
pub(super) fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => PROGRAM_NAME,
        Hook::Egress => HOST_PROGRAM_NAME,
    }
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::Ingress => TcAttachType::Ingress,
        Hook::Egress => TcAttachType::Egress,
    }
}

impl Capture {
    /// Pins the loaded program as `zt_capture` (replacing the previous daemon's), so that
    /// `bpftool prog show pinned <dir>/zt_capture` finds it. Best effort: the links hold it.
    pub(super) fn pin_program(&mut self) {
        for name in [PROGRAM_NAME, HOST_PROGRAM_NAME] {
            let path = self.pins.object(name);
            let _ = std::fs::remove_file(&path);
            let pinned = program(&mut self.ebpf, name).and_then(|p| {
                p.pin(&path).map_err(|e| CaptureError::Pin {
                    path: path.clone(),
                    error: io::Error::other(e.to_string()),
                })
            });
            if let Err(e) = pinned {
                warn!(program = name, error = %e, "capture program not pinned (links keep it attached)");
            }
        }
    }

    /// The attachments of `table`.
    pub(super) fn table(
        &mut self,
        table: Table,
    ) -> &mut std::collections::BTreeMap<String, Attachment> {
        match table {
            Table::Node => &mut self.uplinks,
            Table::Pod => &mut self.pod_ifaces,
            Table::PodEgress => &mut self.pod_egress,
        }
    }

    /// Takes over the links a previous daemon pinned: those of interfaces that still exist get
    /// this program (atomic replacement; the link keeps its place in the TCX chain), those of
    /// interfaces that are gone are unpinned. Returns how many were adopted.
    pub(super) fn adopt_links(&mut self) -> Result<usize, CaptureError> {
        let mut adopted = 0;
        for pin in self.pins.links()? {
            let unwanted = pin.hook == Hook::Egress && self.settings.exempt_node_traffic;
            if unwanted || ifindex(&pin.iface).ok() != Some(pin.ifindex) {
                debug!(iface = %pin.iface, ifindex = pin.ifindex, "stale capture link unpinned");
                std::fs::remove_file(&pin.path).map_err(|error| CaptureError::Pin {
                    path: pin.path.clone(),
                    error,
                })?;
                continue;
            }
            let link_err = |error| CaptureError::Link {
                iface: pin.iface.clone(),
                error,
            };
            let fd: FdLink = PinnedLink::from_pin(&pin.path).map_err(link_err)?.into();
            let link = SchedClassifierLink::try_from(fd).map_err(link_err)?;
            let prog = program(&mut self.ebpf, program_name(pin.hook))?;
            let id = prog
                .attach_to_link(link)
                .map_err(|error| CaptureError::Attach {
                    iface: pin.iface.clone(),
                    error,
                })?;
            let link = prog.take_link(id).map_err(|error| CaptureError::Attach {
                iface: pin.iface.clone(),
                error,
            })?;
            let link = FdLink::try_from(link).map_err(link_err)?;
            let att = Attachment {
                link: Link::Pinned {
                    link,
                    pin: pin.path,
                },
                ifindex: pin.ifindex,
                hook: pin.hook,
            };
            info!(iface = %pin.iface, ifindex = pin.ifindex, hook = ?pin.hook, "capture link adopted");
            let table = match pin.hook {
                Hook::Egress => Table::PodEgress,
                Hook::Ingress if self.is_node_iface(&pin.iface) => Table::Node,
                Hook::Ingress => Table::Pod,
            };
            self.table(table).insert(pin.iface, att);
            adopted += 1;
        }
        Ok(adopted)
    }

    /// Attaches to `iface` unless already attached to the interface of that name and index
    /// (a pod re-created with the same veth name gets a new index; its old link died with the
    /// old device). A node interface (`uplink`) that was attached as a pod veth is moved over
    /// (and loses its egress program); a pod veth that is a node interface is left to that.
    pub(super) fn ensure_attached(
        &mut self,
        iface: &str,
        uplink: bool,
    ) -> Result<(), CaptureError> {
        let idx = ifindex(iface)?;
        if uplink {
            if let Some(att) = self.pod_ifaces.remove(iface) {
                self.uplinks.insert(iface.to_string(), att);
            }
            if let Some(att) = self.pod_egress.remove(iface) {
                let _ = self.detach_link(iface, att);
            }
            return self.ensure_in(Table::Node, iface, idx);
        }
        if self.uplinks.contains_key(iface) {
            return Ok(());
        }
        self.ensure_in(Table::Pod, iface, idx)?;
        if !self.settings.exempt_node_traffic {
            self.ensure_in(Table::PodEgress, iface, idx)?;
        }
        Ok(())
    }

    fn ensure_in(&mut self, table: Table, iface: &str, idx: u32) -> Result<(), CaptureError> {
        if let Some(att) = self.table(table).get(iface) {
            if att.ifindex == idx {
                return Ok(());
            }
            debug!(
                iface,
                old = att.ifindex,
                new = idx,
                "interface was re-created"
            );
            // Best effort: the old link is already defunct.
            if let Some(old) = self.table(table).remove(iface) {
                let _ = self.detach_link(iface, old);
            }
        }
        let att = self.attach(iface, idx, table.hook())?;
        self.table(table).insert(iface.to_string(), att);
        Ok(())
    }

    pub(super) fn attach(
        &mut self,
        iface: &str,
        idx: u32,
        hook: Hook,
    ) -> Result<Attachment, CaptureError> {
        let name = program_name(hook);
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let attach_err = |error| CaptureError::Attach {
            iface: iface.to_string(),
            error,
        };
        if tcx {
            // Another live instance (e.g. an overlapping restart) would capture too.
            if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, attach_type(hook)) {
                if progs.iter().any(|p| p.name_as_str() == Some(name)) {
                    warn!(
                        iface,
                        program = name,
                        "another capture program is already attached here (a second daemon \
                         instance, or one with another --bpf-pin-dir?)"
                    );
                }
            }
        }
        let prog = program(&mut self.ebpf, name)?;
        let link = if tcx {
            // First in the TCX chain, so another program returning "pass" cannot bypass
            // capture; every packet it does not drop, captured or not, continues to the next
            // program (TCX_NEXT), so a CNI's policy program still applies.
            let id = prog
                .attach_with_options(
                    iface,
                    attach_type(hook),
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let link_err = |error| CaptureError::Link {
                iface: iface.to_string(),
                error,
            };
            let fd = FdLink::try_from(link).map_err(link_err)?;
            let pin = self.pins.link(idx, iface, hook);
            // A pin left for this very interface by a daemon that crashed mid-attach.
            let _ = std::fs::remove_file(&pin);
            let pinned = fd.pin(&pin).map_err(|e| CaptureError::Pin {
                path: pin.clone(),
                error: io::Error::other(e.to_string()),
            })?;
            Link::Pinned {
                link: pinned.into(),
                pin,
            }
        } else {
            // Legacy clsact filter: owned by the loaded program, so it goes with the daemon
            // (capture fails closed only with TCX, kernel >= 6.6).
            if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
                debug!(iface, error = %e, "clsact qdisc not added (probably exists)");
            }
            Link::Netlink(prog.attach(iface, attach_type(hook)).map_err(attach_err)?)
        };
        info!(iface, ifindex = idx, tcx, ?hook, "capture attached");
        Ok(Attachment {
            link,
            ifindex: idx,
            hook,
        })
    }

    /// Detaches both programs of a pod veth (the first error wins; both are tried).
    pub(super) fn detach_pod_iface(&mut self, iface: &str) -> Result<(), CaptureError> {
        let egress = match self.pod_egress.remove(iface) {
            Some(att) => self.detach_link(iface, att),
            None => Ok(()),
        };
        let ingress = match self.pod_ifaces.remove(iface) {
            Some(att) => self.detach_link(iface, att),
            None => Ok(()),
        };
        egress.and(ingress)
    }

    pub(super) fn detach_link(&mut self, iface: &str, att: Attachment) -> Result<(), CaptureError> {
        match att.link {
            Link::Pinned { link, pin } => {
                // The link goes when both the pin and our descriptor are gone.
                match std::fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(CaptureError::Pin { path: pin, error }),
                }
                drop(link);
            }
            Link::Netlink(id) => {
                let prog = program(&mut self.ebpf, program_name(att.hook))?;
                match prog.detach(id) {
                    Ok(()) => {}
                    // The device is gone (pod deleted): nothing left to detach.
                    Err(_) if ifindex(iface).map_or(true, |i| i != att.ifindex) => {}
                    Err(error) => {
                        return Err(CaptureError::Detach {
                            iface: iface.to_string(),
                            error,
                        })
                    }
                }
            }
        }
        info!(iface, ifindex = att.ifindex, hook = ?att.hook, "capture detached");
        Ok(())
    }
}
