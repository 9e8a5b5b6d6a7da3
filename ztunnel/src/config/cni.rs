//! The `--cni-*` settings: the node-local endpoint the chained CNI plugin announces new pods
//! on ([`crate::cni`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::{duration_str, invalid, ConfigError};

/// The CNI endpoint's settings; `None` in [`super::Config::cni`] when `--cni-socket` is empty.
#[derive(Debug, Clone, Serialize)]
pub struct CniConfig {
    /// The unix socket (mode 0600) the plugin connects to.
    pub socket: PathBuf,
    /// How long an announced pod stays captured without appearing in the state.
    #[serde(with = "duration_str")]
    pub pending_timeout: Duration,
}

/// Checks `--cni-socket` (absolute, fits a unix socket address, not the admin socket) and
/// `--cni-pending-timeout` (at least a second).
pub(super) fn cni_config(
    socket: &Path,
    pending_timeout: Duration,
    admin_socket: &Path,
) -> Result<Option<CniConfig>, ConfigError> {
    if socket.as_os_str().is_empty() {
        return Ok(None);
    }
    if !socket.is_absolute() || socket.as_os_str().len() > 107 {
        return Err(invalid(
            "cni-socket",
            "must be an absolute path of at most 107 bytes (the limit of a unix socket \
             address), or empty to turn the CNI endpoint off",
        ));
    }
    if socket == admin_socket {
        return Err(invalid(
            "cni-socket",
            format!("{} is also --admin-socket", socket.display()),
        ));
    }
    if pending_timeout < Duration::from_secs(1) {
        return Err(invalid(
            "cni-pending-timeout",
            "must be at least 1s: an announced pod needs time to appear in the state",
        ));
    }
    Ok(Some(CniConfig {
        socket: socket.to_path_buf(),
        pending_timeout,
    }))
}
