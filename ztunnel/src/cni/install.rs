//! Installing `ztunnel-cni` on the node, as a CNI plugin is installed: the binary into the
//! runtime's CNI binary directory, the plugin's entry into the chain of the node's network
//! configuration ([`super::conflist`]), both written atomically (a temporary file in the same
//! directory, then a rename), so the runtime never reads half a file.
//!
//! The configuration belongs to the node's primary CNI, which may rewrite it at any time (at
//! its own start, on an upgrade) and drop the entry: the daemon (`--cni-install`) therefore
//! re-checks every [`CHECK_INTERVAL`] and adds the entry back ([`Keeper`]). The entry stays when
//! the daemon stops for a restart or an upgrade: the plugin fails closed, so new pods of the
//! node wait for the next daemon rather than start outside the mesh. When the daemon stops
//! because its DaemonSet was deleted (`--cni-owner`: the release was uninstalled), it removes
//! the plugin ([`Keeper::release_if_owner_gone`]). [`uninstall`] (`ztunnel uninstall`,
//! `ztunnel cni uninstall`) removes the entry and the binary, entry first.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tracing::{info, warn};

use super::conflist::{self, ConfigError, PLUGIN_TYPE};
use crate::config::{CniInstall, CniOwner};

/// How often the daemon checks that the plugin is still installed.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Why the plugin could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read or written.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error (in the message, not as a source, so a chain prints it once).
        error: std::io::Error,
    },
    /// The node's configuration cannot take the plugin; it was not changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The primary CNI has not written its configuration yet (the plugin is added once it has).
    #[error(
        "no CNI network configuration (*.conflist, *.conf, *.json) in {} yet: the node's \
         primary CNI writes one when it starts; ztunnel-cni is added to it then",
        dir.display()
    )]
    NoConfig {
        /// The configuration directory.
        dir: PathBuf,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |error| InstallError::Io {
        action,
        path,
        error,
    }
}

/// What one installation pass changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The binary in the CNI binary directory.
    pub binary: PathBuf,
    /// Whether it was (re)written.
    pub binary_written: bool,
    /// The configuration holding the entry.
    pub config: PathBuf,
    /// Whether it was (re)written.
    pub config_written: bool,
    /// A single-plugin file replaced by `config`.
    pub replaced: Option<PathBuf>,
}

/// How closely to compare the installed binary with the one to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryCheck {
    /// Byte for byte (at start, so an upgrade replaces the node's copy).
    Content,
    /// Present with the same size (the periodic check, which reads no binary).
    Size,
}

/// Installs the plugin: the binary first (the runtime must find it once the entry is there),
/// then the entry in the primary configuration. Changes nothing that is already in place.
pub fn install(s: &CniInstall, check: BinaryCheck) -> Result<Installed, InstallError> {
    let (binary, binary_written) = install_binary(s, check)?;
    let (config, config_written, replaced) = install_entry(s)?;
    Ok(Installed {
        binary,
        binary_written,
        config,
        config_written,
        replaced,
    })
}

/// Copies the plugin binary into the CNI binary directory unless it is there already: where,
/// and whether it was written.
pub fn install_binary(s: &CniInstall, check: BinaryCheck) -> Result<(PathBuf, bool), InstallError> {
    let source = match &s.plugin_binary {
        Some(p) => p.clone(),
        None => next_to_executable()?,
    };
    let binary = s.bin_dir.join(PLUGIN_TYPE);
    let written = copy_binary(&source, &binary, check)?;
    Ok((binary, written))
}

/// Adds the entry to the primary configuration unless it has it: the configuration, whether
/// it was written, and the single-plugin file it replaced.
pub fn install_entry(s: &CniInstall) -> Result<(PathBuf, bool, Option<PathBuf>), InstallError> {
    let (config, text) = primary(&s.conf_dir)?.ok_or_else(|| InstallError::NoConfig {
        dir: s.conf_dir.clone(),
    })?;
    let entry = conflist::plugin_entry(&s.socket, &s.exclude_namespaces);
    let Some(rewrite) = conflist::with_plugin(&config, &text, &entry)? else {
        return Ok((config, false, None));
    };
    let mode = file_mode(&config)?;
    write_atomically(&rewrite.path, &json_bytes(&rewrite.content), mode)?;
    if let Some(old) = &rewrite.replaces {
        std::fs::remove_file(old).map_err(io("removing the converted", old))?;
    }
    Ok((rewrite.path, true, rewrite.replaces))
}

/// What [`uninstall`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Configurations the entry was removed from.
    pub configs: Vec<PathBuf>,
    /// Whether the binary was there (and is gone).
    pub binary_removed: bool,
}

/// Removes the plugin's entry from every configuration of `conf_dir` that has one (the
/// primary may have changed since it was added), then the binary from `bin_dir`. Absent
/// directories and files are not errors. A configuration naming the plugin that cannot be
/// parsed is an error (and left as it is).
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Uninstalled, InstallError> {
    let mut out = Uninstalled::default();
    for name in config_names(conf_dir)? {
        let path = conf_dir.join(&name);
        let text = std::fs::read(&path).map_err(io("reading", &path))?;
        if !String::from_utf8_lossy(&text).contains(PLUGIN_TYPE) {
            continue;
        }
        if let Some(content) = conflist::without_plugin(&path, &text)? {
            write_atomically(&path, &json_bytes(&content), file_mode(&path)?)?;
            out.configs.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&binary) {
        Ok(()) => out.binary_removed = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing", &binary)(e)),
    }
    Ok(out)
}

/// Installation health for the metrics: whether the last check found (or put) the plugin in
/// place, and how often the daemon had to write it.
#[derive(Debug, Clone, Default)]
pub struct InstallStats {
    installed: Gauge,
    writes: Family<WriteLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct WriteLabels {
    file: &'static str,
}

impl InstallStats {
    /// Adds the metrics to the daemon's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztunnel_cni_plugin_installed",
            "1 when the last check (every 2s) found ztunnel-cni installed on the node or \
             installed it, 0 when it could not (new pods of the node then start outside the \
             mesh; the daemon's log says why)",
            self.installed.clone(),
        );
        registry.register(
            "ztunnel_cni_install_writes",
            "Writes of the plugin onto the node, by file (binary, config): more than the first \
             of each means something removed it, such as the primary CNI rewriting its config",
            self.writes.clone(),
        );
    }
}

/// The daemon's installation (`--cni-install`): [`Keeper::spawn`] starts the task that keeps
/// the plugin in place; [`Keeper::release_if_owner_gone`] removes it at exit when the release
/// was uninstalled.
#[derive(Debug, Clone)]
pub struct Keeper {
    settings: CniInstall,
    /// Held by each installation pass; `true` once the plugin was removed at exit, after which
    /// no pass writes anything.
    released: Arc<Mutex<bool>>,
}

impl Keeper {
    /// Starts keeping the plugin installed (see [`keep_installed`]).
    pub fn spawn(settings: CniInstall, stats: InstallStats) -> Keeper {
        let keeper = Keeper {
            settings,
            released: Arc::default(),
        };
        tokio::spawn(keep_installed(keeper.clone(), stats));
        keeper
    }

    /// At exit (not after a hand-over): with `--cni-owner`, asks the API server for the
    /// DaemonSet running the daemon, and when it is gone or being deleted (see [`owner_gone`])
    /// removes the plugin from the node (entry, then binary) and stops the keeper. Otherwise (a restart, an
    /// upgrade, an API server that does not answer) the plugin stays: the next daemon of the
    /// node serves it.
    pub async fn release_if_owner_gone(&self) {
        let Some(owner) = &self.settings.owner else {
            return;
        };
        let gone = tokio::time::timeout(OWNER_CHECK_TIMEOUT, owner_gone(owner)).await;
        let key = format!("{}/{}", owner.namespace, owner.name);
        let reason = match gone {
            Ok(Ok(None)) => {
                info!(daemonset = %key, "cni install: the DaemonSet remains; ztunnel-cni stays on the node");
                return;
            }
            Ok(Err(e)) => {
                warn!(daemonset = %key, error = %e, "cni install: cannot tell whether the DaemonSet remains; ztunnel-cni stays on the node");
                return;
            }
            Err(_) => {
                warn!(daemonset = %key, timeout = ?OWNER_CHECK_TIMEOUT, "cni install: no answer about the DaemonSet; ztunnel-cni stays on the node");
                return;
            }
            Ok(Ok(Some(reason))) => reason,
        };
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        *released = true;
        match uninstall(&self.settings.bin_dir, &self.settings.conf_dir) {
            Ok(gone) => info!(
                daemonset = %key,
                reason,
                configs = ?gone.configs,
                binary_removed = gone.binary_removed,
                "cni install: the DaemonSet is gone; ztunnel-cni removed from the node"
            ),
            Err(e) => {
                warn!(daemonset = %key, error = %e, "cni install: removing ztunnel-cni failed")
            }
        }
    }
}

/// How long the exit check waits for the API server.
const OWNER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the DaemonSet counts as gone (`None`: it remains). `helm uninstall` deletes the
/// DaemonSet, the daemon's ServiceAccount and its ClusterRoleBinding together, so by the time a
/// daemon stops its credentials may be refused: a 401 (the account is gone) or a 403 (the
/// binding is gone) on a read it was allowed at start counts as gone as well. A wrong guess
/// there costs little: the next daemon of the node installs the plugin again at start. An API
/// server that cannot be reached is no answer (an error): the plugin stays.
async fn owner_gone(owner: &CniOwner) -> Result<Option<&'static str>, String> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let client = crate::source::kube::client(owner.kubeconfig.as_deref()).await?;
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, &owner.namespace);
    match api.get_opt(&owner.name).await {
        Ok(None) => Ok(Some("not found")),
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => Ok(Some("being deleted")),
        Ok(Some(_)) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 401 => Ok(Some(
            "the daemon's service account is no longer accepted (401)",
        )),
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(Some(
            "the daemon may no longer read it (403: its binding is gone)",
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The keeper's task: installs the plugin, then checks every [`CHECK_INTERVAL`] that it is
/// still in place and puts it back, on a blocking thread. Logs each write, and each new error
/// once (an error repeats every check until resolved).
async fn keep_installed(keeper: Keeper, stats: InstallStats) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = BinaryCheck::Content;
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let k = keeper.clone();
        let result = tokio::task::spawn_blocking(move || {
            let released = k.released.lock().unwrap_or_else(|e| e.into_inner());
            if *released {
                return None;
            }
            let binary = install_binary(&k.settings, check);
            // The entry only once the runtime can find the binary it names.
            let entry = binary.as_ref().ok().map(|_| install_entry(&k.settings));
            Some((binary, entry))
        })
        .await;
        let (binary, entry) = match result {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "cni install: the check did not finish");
                continue;
            }
        };
        if let Ok((path, true)) = &binary {
            stats
                .writes
                .get_or_create(&WriteLabels { file: "binary" })
                .inc();
            info!(path = %path.display(), "cni install: plugin binary written");
        }
        if binary.is_ok() {
            check = BinaryCheck::Size;
        }
        if let Some(Ok((path, true, replaced))) = &entry {
            stats
                .writes
                .get_or_create(&WriteLabels { file: "config" })
                .inc();
            info!(
                path = %path.display(),
                replaced = replaced.as_ref().map(|p| p.display().to_string()),
                "cni install: ztunnel-cni added to the node's CNI configuration"
            );
        }
        match binary.err().or(entry.and_then(Result::err)) {
            None => {
                last_error = None;
                stats.installed.set(1);
            }
            Some(e) => {
                stats.installed.set(0);
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    warn!(error = %message, "cni install: ztunnel-cni is not installed on the node");
                    last_error = Some(message);
                }
            }
        }
    }
}

/// `ztunnel-cni` in the directory of the running executable (from `/proc/self/exe`, else from
/// the path it was started by, as in a chroot without `/proc`).
fn next_to_executable() -> Result<PathBuf, InstallError> {
    let exe = std::env::current_exe().or_else(|e| {
        std::env::args_os()
            .next()
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .ok_or(e)
    });
    let exe = exe.map_err(io("finding", Path::new("the running executable")))?;
    Ok(exe.with_file_name(PLUGIN_TYPE))
}

/// The file names of `dir` the runtime reads, sorted (none for a missing directory).
fn config_names(dir: &Path) -> Result<Vec<String>, InstallError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("listing", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if conflist::is_config_name(name) && entry.path().is_file() {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The configuration the runtime uses, and its bytes.
fn primary(dir: &Path) -> Result<Option<(PathBuf, Vec<u8>)>, InstallError> {
    let names = config_names(dir)?;
    let Some(name) = conflist::primary_config(names.iter().map(String::as_str)) else {
        return Ok(None);
    };
    let path = dir.join(name);
    let text = std::fs::read(&path).map_err(io("reading", &path))?;
    Ok(Some((path, text)))
}

/// Copies `source` to `target` (mode 0755) unless the same binary is there already; whether it
/// wrote.
fn copy_binary(source: &Path, target: &Path, check: BinaryCheck) -> Result<bool, InstallError> {
    let current = match check {
        BinaryCheck::Size => {
            let want =
                std::fs::metadata(source).map_err(io("reading the plugin binary", source))?;
            match std::fs::metadata(target) {
                Ok(have) if have.len() == want.len() => return Ok(false),
                _ => None,
            }
        }
        BinaryCheck::Content => std::fs::read(target).ok(),
    };
    let bytes = std::fs::read(source).map_err(io("reading the plugin binary", source))?;
    if current.as_deref() == Some(bytes.as_slice()) {
        return Ok(false);
    }
    write_atomically(target, &bytes, 0o755)?;
    Ok(true)
}

fn file_mode(path: &Path) -> Result<u32, InstallError> {
    let meta = std::fs::metadata(path).map_err(io("reading the mode of", path))?;
    Ok(meta.permissions().mode() & 0o7777)
}

fn json_bytes(v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Writes `bytes` to a hidden temporary file next to `path` (a name the runtime does not
/// read), flushes it and renames it over `path`: a reader sees the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.ztunnel-tmp"));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given at creation is filtered by the umask, and an old temporary file keeps
        // its own.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("renaming into place", path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Node {
        dir: PathBuf,
        s: CniInstall,
    }

    fn node(tag: &str) -> Node {
        let dir =
            std::env::temp_dir().join(format!("ztunnel-cni-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["bin", "net.d", "src"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        let plugin = dir.join("src").join(PLUGIN_TYPE);
        std::fs::write(&plugin, b"#!plugin v1").expect("plugin");
        let s = CniInstall {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            plugin_binary: Some(plugin),
            socket: "/run/ztunnel/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
            owner: None,
        };
        Node { dir, s }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ptp_list() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp"}]})
    }

    #[test]
    fn installs_once_keeps_mode_and_uninstalls() {
        let n = node("cycle");
        let conf = n.s.conf_dir.join("10-k8s.conflist");
        std::fs::write(&conf, ptp_list().to_string()).expect("write");
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(n.s.conf_dir.join("99-loopback.conf"), b"not even json").expect("write");

        let done = install(&n.s, BinaryCheck::Content).expect("installs");
        assert!(done.binary_written && done.config_written, "{done:?}");
        assert_eq!(done.config, conf);
        let bin = n.s.bin_dir.join(PLUGIN_TYPE);
        assert_eq!(std::fs::read(&bin).expect("binary"), b"#!plugin v1");
        assert_eq!(file_mode(&bin).expect("mode"), 0o755);
        assert_eq!(file_mode(&conf).expect("mode"), 0o600);
        let v: Value = serde_json::from_slice(&std::fs::read(&conf).expect("read")).expect("json");
        assert_eq!(v["plugins"][1]["type"], PLUGIN_TYPE);
        // Idempotent, by content and by size; no temporary file left behind.
        for check in [BinaryCheck::Content, BinaryCheck::Size] {
            let again = install(&n.s, check).expect("again");
            assert!(!again.binary_written && !again.config_written, "{again:?}");
        }
        let names: Vec<_> = std::fs::read_dir(&n.s.conf_dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A new binary is picked up at start (content check).
        std::fs::write(n.s.plugin_binary.as_ref().expect("set"), b"#!plugin v2").expect("v2");
        assert!(
            install(&n.s, BinaryCheck::Content)
                .expect("v2")
                .binary_written
        );

        let gone = uninstall(&n.s.bin_dir, &n.s.conf_dir).expect("uninstalls");
        assert_eq!(gone.configs, std::slice::from_ref(&conf));
        assert!(gone.binary_removed && !bin.exists());
        let v: Value = serde_json::from_slice(&std::fs::read(&conf).expect("read")).expect("json");
        assert_eq!(v, ptp_list());
        assert_eq!(file_mode(&conf).expect("mode"), 0o600);
        assert_eq!(
            uninstall(&n.s.bin_dir, &n.s.conf_dir).expect("again"),
            Uninstalled::default()
        );
    }

    #[test]
    fn converts_a_conf_and_refuses_a_malformed_primary() {
        let n = node("conf");
        let single = json!({"cniVersion": "0.4.0", "name": "br", "type": "bridge"});
        let conf = n.s.conf_dir.join("10-br.conf");
        std::fs::write(&conf, single.to_string()).expect("write");
        let done = install(&n.s, BinaryCheck::Content).expect("installs");
        let list = n.s.conf_dir.join("10-br.conflist");
        assert_eq!(done.config, list);
        assert_eq!(done.replaced.as_deref(), Some(conf.as_path()));
        assert!(!conf.exists());
        let v: Value = serde_json::from_slice(&std::fs::read(&list).expect("read")).expect("json");
        assert_eq!(v["plugins"][0], single);

        // A broken primary: an error naming it, and the file is untouched.
        let broken = n.s.conf_dir.join("05-broken.conflist");
        std::fs::write(&broken, b"{\"plugins\": [").expect("write");
        let err = install(&n.s, BinaryCheck::Size).expect_err("malformed");
        assert!(err.to_string().contains("05-broken.conflist"), "{err}");
        assert_eq!(std::fs::read(&broken).expect("read"), b"{\"plugins\": [");
        std::fs::remove_file(&broken).expect("rm");

        // No configuration at all: the primary CNI has not written one yet.
        std::fs::remove_file(&list).expect("rm");
        let err = install(&n.s, BinaryCheck::Size).expect_err("none");
        assert!(matches!(err, InstallError::NoConfig { .. }), "{err}");
    }
}
