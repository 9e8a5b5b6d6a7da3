//! Installing `ztunnel-cni` on the node, as a CNI plugin is installed: the binary into the
//! runtime's CNI binary directory, the plugin's entry into the chain of the node's network
//! configuration ([`super::conflist`]), both written atomically (a temporary file in the same
//! directory, then a rename), so the runtime never reads half a file.
//!
//! The configuration belongs to the node's primary CNI, which may rewrite it at any time (at
//! its own start, on an upgrade) and drop the entry: the daemon (`--cni-install`) therefore
//! re-checks every [`CHECK_INTERVAL`] and adds the entry back ([`keep_installed`]). The entry
//! stays when the daemon stops: the plugin fails closed, so new pods of the node wait for the
//! next daemon rather than start outside the mesh. [`uninstall`] (`ztunnel uninstall`, `ztunnel
//! cni uninstall`) removes the entry and the binary, entry first.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tracing::{info, warn};

use super::conflist::{self, ConfigError, PLUGIN_TYPE};
use crate::config::CniInstall;

/// How often the daemon checks that the plugin is still installed.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Why the plugin could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
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
    move |source| InstallError::Io {
        action,
        path,
        source,
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
    let source = match &s.plugin_binary {
        Some(p) => p.clone(),
        None => next_to_executable()?,
    };
    let binary = s.bin_dir.join(PLUGIN_TYPE);
    let binary_written = copy_binary(&source, &binary, check)?;
    let (config, text) = primary(&s.conf_dir)?.ok_or_else(|| InstallError::NoConfig {
        dir: s.conf_dir.clone(),
    })?;
    let entry = conflist::plugin_entry(&s.socket, &s.exclude_namespaces);
    let Some(rewrite) = conflist::with_plugin(&config, &text, &entry)? else {
        return Ok(Installed {
            binary,
            binary_written,
            config,
            config_written: false,
            replaced: None,
        });
    };
    let mode = file_mode(&config)?;
    write_atomically(&rewrite.path, &json_bytes(&rewrite.content), mode)?;
    if let Some(old) = &rewrite.replaces {
        std::fs::remove_file(old).map_err(io("removing the converted", old))?;
    }
    Ok(Installed {
        binary,
        binary_written,
        config: rewrite.path,
        config_written: true,
        replaced: rewrite.replaces,
    })
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

/// The daemon's part (`--cni-install`): installs the plugin, then checks every
/// [`CHECK_INTERVAL`] that it is still in place and puts it back, on a blocking thread. Logs
/// each write, and each new error once (an error repeats every check until resolved).
pub async fn keep_installed(settings: CniInstall, stats: InstallStats) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = BinaryCheck::Content;
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let s = settings.clone();
        let result = tokio::task::spawn_blocking(move || install(&s, check)).await;
        match result {
            Ok(Ok(done)) => {
                check = BinaryCheck::Size;
                last_error = None;
                stats.installed.set(1);
                report(&done, &stats);
            }
            Ok(Err(e)) => {
                stats.installed.set(0);
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    warn!(error = %message, "cni install: ztunnel-cni is not installed on the node");
                    last_error = Some(message);
                }
            }
            Err(e) => warn!(error = %e, "cni install: the check did not finish"),
        }
    }
}

fn report(done: &Installed, stats: &InstallStats) {
    if done.binary_written {
        stats
            .writes
            .get_or_create(&WriteLabels { file: "binary" })
            .inc();
        info!(path = %done.binary.display(), "cni install: plugin binary written");
    }
    if done.config_written {
        stats
            .writes
            .get_or_create(&WriteLabels { file: "config" })
            .inc();
        info!(
            path = %done.config.display(),
            replaced = done.replaced.as_ref().map(|p| p.display().to_string()),
            "cni install: ztunnel-cni added to the node's CNI configuration"
        );
    }
}

/// `ztunnel-cni` in the directory of the running executable.
fn next_to_executable() -> Result<PathBuf, InstallError> {
    let exe =
        std::env::current_exe().map_err(io("finding", Path::new("the running executable")))?;
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
        assert_eq!(gone.configs, [conf.clone()]);
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
