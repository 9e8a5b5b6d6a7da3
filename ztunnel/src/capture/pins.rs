//! The capture's pinned state in bpffs, which outlives the daemon so that capture fails closed.
//!
//! One directory per node (`--bpf-pin-dir`, default `/sys/fs/bpf/ztunnel/<node-name>`):
//!
//! | entry | what |
//! |---|---|
//! | `zt_enrolled`, `zt_stats` | the maps (enrolled pods, drop counters); a restarted daemon reuses them, so enrollment has no gap |
//! | `zt_capture` | the program last loaded (for `bpftool prog show pinned …`) |
//! | `link_<ifindex>_<ifname>` | one TCX link per interface (ingress); keeps the program attached while no daemon runs |
//! | `link_out_<ifindex>_<ifname>` | one TCX egress link per pod veth (`zt_host_redirect`, the node-local path) |
//!
//! A restarted daemon finds the links of interfaces that still exist (same name and index) and
//! swaps its freshly loaded program into them (`BPF_LINK_UPDATE`, atomic: no packet sees no
//! program, and no interface gets a second one); links of interfaces that are gone are removed.
//! Only an explicit uninstall removes the directory.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;

use super::CaptureError;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Prefix of link pins.
const LINK_PREFIX: &str = "link_";
/// After [`LINK_PREFIX`]: an egress link.
const EGRESS_PREFIX: &str = "out_";

/// Which TC hook a link is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Hook {
    /// `zt_capture`: where traffic enters the node's namespace (pod veths, uplinks, lo).
    Ingress,
    /// `zt_host_redirect`: pod veths, for what the node itself sends to a pod.
    Egress,
}

/// Where the pins of one node live. Only the calling thread's network namespace matters for
/// interfaces; the directory is shared by every process of the machine's mount namespace.
#[derive(Clone, Debug)]
pub(crate) struct PinDir {
    dir: PathBuf,
}

/// A pinned link found in the directory.
#[derive(Debug)]
pub(crate) struct LinkPin {
    pub path: PathBuf,
    pub ifindex: u32,
    pub iface: String,
    pub hook: Hook,
}

fn pin_err(path: &Path, error: io::Error) -> CaptureError {
    CaptureError::Pin {
        path: path.to_path_buf(),
        error,
    }
}

/// Whether `path` is on a bpf filesystem.
fn on_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is NUL-terminated and outlives the call; `st` is a plain struct the kernel
    // fills in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statfs only writes into `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

impl PinDir {
    /// The directory, created (inside an existing bpffs mount) when absent.
    pub fn open(dir: &Path) -> Result<PinDir, CaptureError> {
        let existing = dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        match on_bpffs(existing) {
            Ok(true) => {}
            Ok(false) => {
                return Err(CaptureError::NotBpffs {
                    path: dir.to_path_buf(),
                })
            }
            Err(error) => return Err(pin_err(existing, error)),
        }
        std::fs::create_dir_all(dir).map_err(|e| pin_err(dir, e))?;
        Ok(PinDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory, if it exists (for uninstall).
    pub fn existing(dir: &Path) -> Option<PinDir> {
        dir.is_dir().then(|| PinDir {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of a map or program pin.
    pub fn object(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Path of the link pin for interface `iface` with index `ifindex` on `hook`.
    pub fn link(&self, ifindex: u32, iface: &str, hook: Hook) -> PathBuf {
        let dir = match hook {
            Hook::Ingress => "",
            Hook::Egress => EGRESS_PREFIX,
        };
        self.dir
            .join(format!("{LINK_PREFIX}{dir}{ifindex}_{iface}"))
    }

    /// Every link pin in the directory.
    pub fn links(&self) -> Result<Vec<LinkPin>, CaptureError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| pin_err(&self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((ifindex, iface, hook)) = parse_link_name(&name) {
                out.push(LinkPin {
                    path: entry.path(),
                    ifindex,
                    iface,
                    hook,
                });
            }
        }
        Ok(out)
    }

    /// Removes a pinned map whose shape differs from what this build expects (an upgrade
    /// that changed it); the loader then creates and pins a new one. Returns whether it did.
    pub fn drop_incompatible_map(
        &self,
        name: &str,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Result<bool, CaptureError> {
        let path = self.object(name);
        if !path.exists() {
            return Ok(false);
        }
        let same = MapInfo::from_pin(&path).is_ok_and(|i| {
            i.key_size() == key_size
                && i.value_size() == value_size
                && i.max_entries() == max_entries
        });
        if same {
            return Ok(false);
        }
        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
        Ok(true)
    }

    /// Removes every pin and the directory itself: programs whose links were pinned here are
    /// detached as the last reference goes. Returns how many pins were removed.
    pub fn remove_all(self) -> Result<usize, CaptureError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| pin_err(&self.dir, e))?;
        let mut n = 0;
        // Links first, so the program stops running before its maps go.
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort_by_key(|p| {
            !p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(LINK_PREFIX))
        });
        for path in paths {
            std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
            n += 1;
        }
        std::fs::remove_dir(&self.dir).map_err(|e| pin_err(&self.dir, e))?;
        Ok(n)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// `link_<ifindex>_<ifname>` -> (ifindex, ifname, ingress); `link_out_…` -> egress.
fn parse_link_name(name: &str) -> Option<(u32, String, Hook)> {
    let rest = name.strip_prefix(LINK_PREFIX)?;
    let (rest, hook) = match rest.strip_prefix(EGRESS_PREFIX) {
        Some(r) => (r, Hook::Egress),
        None => (rest, Hook::Ingress),
    };
    let (idx, iface) = rest.split_once('_')?;
    let idx: u32 = idx.parse().ok()?;
    (!iface.is_empty()).then(|| (idx, iface.to_string(), hook))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        let d = PinDir {
            dir: PathBuf::from("/x"),
        };
        for hook in [Hook::Ingress, Hook::Egress] {
            let p = d.link(42, "veth_a1", hook);
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert_eq!(
                parse_link_name(name),
                Some((42, "veth_a1".to_string(), hook))
            );
        }
        assert_eq!(parse_link_name("zt_enrolled"), None);
        assert_eq!(parse_link_name("link_x_eth0"), None);
        assert_eq!(parse_link_name("link_3_"), None);
    }
}
