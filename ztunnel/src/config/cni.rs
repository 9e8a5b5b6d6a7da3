//! The `--cni-*` settings: the node-local endpoint the chained CNI plugin announces new pods
//! on ([`crate::cni`]), and where the daemon installs the plugin on the node
//! ([`crate::cni::install`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, Args};
use serde::Serialize;

use super::{duration_str, invalid, ConfigError, SourceConfig};

/// The runtime's usual CNI binary directory.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The runtime's usual CNI configuration directory.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// The CNI endpoint's settings; `None` in [`super::Config::cni`] when `--cni-socket` is empty.
#[derive(Debug, Clone, Serialize)]
pub struct CniConfig {
    /// The unix socket (mode 0600) the plugin connects to.
    pub socket: PathBuf,
    /// How long an announced pod stays captured without appearing in the state.
    #[serde(with = "duration_str")]
    pub pending_timeout: Duration,
    /// Where the daemon installs the plugin and keeps it installed (`--cni-install`), if it
    /// does.
    pub install: Option<CniInstall>,
}

/// The node's CNI directories, as the container runtime is configured with them: where the
/// plugin is installed (`--cni-install`, `ztunnel cni install`) and removed from (`ztunnel
/// uninstall`, `ztunnel cni uninstall`).
#[derive(Debug, Clone, Args)]
pub struct CniDirArgs {
    /// The node's CNI binary directory (the runtime's plugin path), where `ztunnel-cni` is
    /// copied.
    #[arg(long, env = "ZTUNNEL_CNI_BIN_DIR", default_value = DEFAULT_CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory: the plugin joins the chain of the file the
    /// runtime uses, the lexically first `*.conflist`, `*.conf` or `*.json` (a single-plugin
    /// file becomes a `.conflist`).
    #[arg(long, env = "ZTUNNEL_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
}

/// What is installed: the directories, the binary copied, the entry's settings.
#[derive(Debug, Clone, Args)]
pub struct CniInstallArgs {
    /// The node's CNI directories.
    #[command(flatten)]
    pub dirs: CniDirArgs,
    /// The `ztunnel-cni` binary to copy onto the node. Unset: `ztunnel-cni` next to this
    /// executable (as the image has it).
    #[arg(long, env = "ZTUNNEL_CNI_PLUGIN_BINARY")]
    pub cni_plugin_binary: Option<PathBuf>,
    /// Namespaces whose pods the installed plugin lets start without asking the daemon
    /// (`excludeNamespaces`: those that must start while the daemon is down, such as the
    /// daemon's own and the CNI's), comma-separated.
    #[arg(
        long,
        env = "ZTUNNEL_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system",
        action = ArgAction::Append
    )]
    pub cni_exclude_namespaces: Vec<String>,
}

/// The plugin's installation on the node, checked: absolute directories and the entry's
/// settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniInstall {
    /// The CNI binary directory.
    pub bin_dir: PathBuf,
    /// The CNI configuration directory.
    pub conf_dir: PathBuf,
    /// The binary copied (`None`: `ztunnel-cni` next to the running executable).
    pub plugin_binary: Option<PathBuf>,
    /// The daemon's socket, written into the entry as the plugin's `socket`.
    pub socket: PathBuf,
    /// The entry's `excludeNamespaces`.
    pub exclude_namespaces: Vec<String>,
    /// The DaemonSet whose deletion removes the plugin when the daemon stops (`--cni-owner`).
    pub owner: Option<CniOwner>,
}

/// The DaemonSet running the daemon, and how to ask the API server about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniOwner {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The daemon's `--kubeconfig` (`None`: the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
}

impl CniInstallArgs {
    /// Checks the settings for an installation talking to the daemon at `socket`.
    pub fn resolve(&self, socket: &Path) -> Result<CniInstall, ConfigError> {
        for (flag, dir) in [
            ("cni-bin-dir", &self.dirs.cni_bin_dir),
            ("cni-conf-dir", &self.dirs.cni_conf_dir),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(flag, "must be an absolute path"));
            }
        }
        let mut exclude = Vec::new();
        for ns in &self.cni_exclude_namespaces {
            let ns = ns.trim();
            if ns.is_empty() {
                continue;
            }
            if ns.len() > 63
                || !ns
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(invalid(
                    "cni-exclude-namespaces",
                    format!("{ns:?} is not a namespace name"),
                ));
            }
            if !exclude.iter().any(|e| e == ns) {
                exclude.push(ns.to_string());
            }
        }
        Ok(CniInstall {
            bin_dir: self.dirs.cni_bin_dir.clone(),
            conf_dir: self.dirs.cni_conf_dir.clone(),
            plugin_binary: self.cni_plugin_binary.clone(),
            socket: socket.to_path_buf(),
            exclude_namespaces: exclude,
            owner: None,
        })
    }
}

/// Checks `--cni-socket` (absolute, fits a unix socket address, not the admin socket),
/// `--cni-pending-timeout` (at least a second) and, with `install`, the installation's
/// settings (which need the endpoint).
pub(super) fn cni_config(
    socket: &Path,
    pending_timeout: Duration,
    admin_socket: &Path,
    install: Option<&CniInstallArgs>,
    owner: Option<&str>,
    source: &SourceConfig,
) -> Result<Option<CniConfig>, ConfigError> {
    if socket.as_os_str().is_empty() {
        if install.is_some() {
            return Err(invalid(
                "cni-install",
                "needs the CNI endpoint (--cni-socket): the installed plugin would find no \
                 daemon and fail every pod's ADD",
            ));
        }
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
    let mut install = install.map(|i| i.resolve(socket)).transpose()?;
    if let Some(owner) = owner.filter(|o| !o.is_empty()) {
        let Some(install) = &mut install else {
            return Err(invalid(
                "cni-owner",
                "only means something with --cni-install",
            ));
        };
        let SourceConfig::Kube { kubeconfig } = source else {
            return Err(invalid(
                "cni-owner",
                "needs --source kube: the DaemonSet is looked up on the API server",
            ));
        };
        let Some((namespace, name)) = owner
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        else {
            return Err(invalid(
                "cni-owner",
                format!("{owner:?} is not <namespace>/<daemonset>"),
            ));
        };
        install.owner = Some(CniOwner {
            namespace: namespace.into(),
            name: name.into(),
            kubeconfig: kubeconfig.clone(),
        });
    }
    Ok(Some(CniConfig {
        socket: socket.to_path_buf(),
        pending_timeout,
        install,
    }))
}
