//! The node's CNI network configuration and the plugin's entry in it, as pure functions over
//! the file's bytes ([`super::install`] reads and writes the files).
//!
//! The runtime (containerd, CRI-O, the kubelet before them) uses the lexically first file of
//! its configuration directory whose name ends in `.conflist`, `.conf` or `.json`
//! ([`primary_config`]). A `.conflist` holds a chain (`plugins`); a `.conf` or `.json` holds a
//! single plugin, which [`with_plugin`] turns into a chain of one before appending ours, since
//! only a chain has room for a second plugin. The entry goes after every plugin already there
//! (the one that creates the pod's interface among them) and everything else is kept: other
//! plugins in their order, unknown keys, values. A file that is not JSON, or not a
//! configuration the runtime could load, is an error naming it and is never rewritten.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use ztunnel_cni::plugin::SUPPORTED_VERSIONS;

/// The plugin's `type` in the chain (and its binary's name in the CNI binary directory).
pub const PLUGIN_TYPE: &str = "ztunnel-cni";

/// Name endings of the files the runtime reads, as libcni lists them.
const CONFIG_EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// Why a configuration file cannot take the plugin (or give it back).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or not the shape the runtime loads. The file is left as it is.
    #[error(
        "{path} is not a usable CNI network configuration ({reason}); it was left untouched: \
         the node's primary CNI owns it, fix or regenerate it there"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A `cniVersion` the plugin does not speak: with the plugin in the chain, every pod of the
    /// node would fail to start.
    #[error(
        "{path} declares cniVersion {version:?}, which ztunnel-cni does not support ({}); it \
         was left untouched (adding the plugin would fail every pod's ADD)",
        SUPPORTED_VERSIONS.join(", ")
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its `cniVersion`.
        version: String,
    },
}

/// The configuration rewritten: where it goes, and the file it replaces (a `.conf` turned into
/// a `.conflist` next to it), if another.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// The file to write (the same file, or `<stem>.conflist` for a converted `.conf`).
    pub path: PathBuf,
    /// Its new content.
    pub content: Value,
    /// The single-plugin file to remove once `path` is written, so the runtime picks the chain.
    pub replaces: Option<PathBuf>,
}

/// The plugin's entry: the daemon's socket, the namespaces that never ask the daemon, and
/// `failOpen: false` written out, so whoever reads the node's file sees the rule.
pub fn plugin_entry(socket: &Path, exclude_namespaces: &[String]) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "socket": socket,
        "failOpen": false,
        "excludeNamespaces": exclude_namespaces,
    })
}

/// Whether the runtime reads a file of this name (`*.conflist`, `*.conf`, `*.json`, not hidden,
/// so the installer's own temporary files never count).
pub fn is_config_name(name: &str) -> bool {
    !name.starts_with('.')
        && Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
}

/// The configuration the runtime uses among `names` (file names of the directory): the
/// lexically first one it reads.
pub fn primary_config<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names.into_iter().filter(|n| is_config_name(n)).min()
}

/// The configuration at `path` (its bytes `text`) with `entry` in its chain, or `None` when it
/// already has exactly that entry. An entry of the plugin that differs (another socket, other
/// namespaces) is replaced where it stands; further ones are dropped.
pub fn with_plugin(
    path: &Path,
    text: &[u8],
    entry: &Value,
) -> Result<Option<Rewrite>, ConfigError> {
    let mut chain = parse_chain(path, text)?;
    let plugins = &mut chain.plugins;
    let ours: Vec<usize> = (0..plugins.len())
        .filter(|&i| is_ours(&plugins[i]))
        .collect();
    match ours.split_first() {
        Some((&first, [])) if plugins[first] == *entry && !chain.converted => return Ok(None),
        Some((&first, rest)) => {
            plugins[first] = entry.clone();
            for &i in rest.iter().rev() {
                plugins.remove(i);
            }
        }
        None => plugins.push(entry.clone()),
    }
    let (path, replaces) = match chain.converted {
        true => (path.with_extension("conflist"), Some(path.to_path_buf())),
        false => (path.to_path_buf(), None),
    };
    Ok(Some(Rewrite {
        path,
        content: chain.into_value(),
        replaces,
    }))
}

/// The configuration at `path` without the plugin, or `None` when it has no entry of it. A
/// single-plugin file cannot hold it and is never changed.
pub fn without_plugin(path: &Path, text: &[u8]) -> Result<Option<Value>, ConfigError> {
    let mut chain = parse_chain(path, text)?;
    if chain.converted {
        return Ok(None);
    }
    let before = chain.plugins.len();
    chain.plugins.retain(|p| !is_ours(p));
    Ok((chain.plugins.len() != before).then(|| chain.into_value()))
}

/// A configuration as a chain: its keys but `plugins`, and the plugins.
struct Chain {
    /// Every key of the chain but `plugins`.
    keys: Map<String, Value>,
    plugins: Vec<Value>,
    /// Made from a single-plugin file.
    converted: bool,
}

impl Chain {
    fn into_value(mut self) -> Value {
        self.keys
            .insert("plugins".into(), Value::Array(self.plugins));
        Value::Object(self.keys)
    }
}

/// The file as a chain (a single plugin becomes a chain of one).
fn parse_chain(path: &Path, text: &[u8]) -> Result<Chain, ConfigError> {
    let malformed = |reason: String| ConfigError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let value: Value =
        serde_json::from_slice(text).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(malformed("not a JSON object".into()));
    };
    let version = match obj.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        Some(_) => return Err(malformed("`cniVersion` is not a string".into())),
        // libcni reads a missing version as the oldest one.
        None => "0.1.0".into(),
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(ConfigError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    if path.extension().and_then(|e| e.to_str()) == Some("conflist") {
        let plugins = match obj.remove("plugins") {
            Some(Value::Array(plugins)) if plugins.iter().all(Value::is_object) => plugins,
            Some(_) => return Err(malformed("`plugins` is not a list of objects".into())),
            None => return Err(malformed("a .conflist without `plugins`".into())),
        };
        return Ok(Chain {
            keys: obj,
            plugins,
            converted: false,
        });
    }
    // A single plugin: the chain of one the runtime would make of it (libcni keeps the
    // plugin's object whole; the chain takes its version and name).
    if !matches!(obj.get("type"), Some(Value::String(_))) {
        return Err(malformed(
            "a single-plugin configuration without `type`".into(),
        ));
    }
    let mut keys = Map::new();
    keys.insert("cniVersion".into(), Value::String(version));
    if let Some(name) = obj.get("name") {
        keys.insert("name".into(), name.clone());
    }
    // A runtime-level setting of a single plugin belongs to the chain.
    if let Some(v) = obj.remove("disableCheck") {
        keys.insert("disableCheck".into(), v);
    }
    Ok(Chain {
        keys,
        plugins: vec![Value::Object(obj)],
        converted: true,
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        plugin_entry(Path::new("/run/ztunnel/cni.sock"), &["kube-system".into()])
    }

    fn ptp() -> Value {
        json!({"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}})
    }

    #[test]
    fn appends_after_the_chain_keeping_others_in_order() {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "k8s",
            "x-vendor": {"keep": true},
            "plugins": [ptp(), {"type": "portmap", "capabilities": {"portMappings": true}}],
        });
        let path = Path::new("/etc/cni/net.d/10-calico.conflist");
        let out = with_plugin(path, conf.to_string().as_bytes(), &entry())
            .expect("merges")
            .expect("changed");
        assert_eq!(out.path, path);
        assert_eq!(out.replaces, None);
        let plugins = out.content["plugins"].as_array().expect("list");
        let types: Vec<_> = plugins.iter().map(|p| p["type"].as_str()).collect();
        assert_eq!(types, [Some("ptp"), Some("portmap"), Some(PLUGIN_TYPE)]);
        assert_eq!(plugins[0], ptp());
        assert_eq!(out.content["x-vendor"], json!({"keep": true}));
        assert_eq!(out.content["name"], "k8s");
        assert_eq!(plugins[2]["failOpen"], false);
        assert_eq!(plugins[2]["excludeNamespaces"], json!(["kube-system"]));
        assert_eq!(plugins[2]["socket"], "/run/ztunnel/cni.sock");
    }

    #[test]
    fn already_present_is_unchanged_and_a_stale_entry_is_replaced_in_place() {
        let path = Path::new("/etc/cni/net.d/10-mesh.conflist");
        let conf = json!({"cniVersion": "0.4.0", "name": "m", "plugins": [ptp(), entry()]});
        assert_eq!(
            with_plugin(path, conf.to_string().as_bytes(), &entry()).expect("ok"),
            None
        );
        // Another socket, and a second copy: one entry, where the first stood, now current.
        let stale = json!({"type": PLUGIN_TYPE, "socket": "/old.sock"});
        let conf = json!({
            "cniVersion": "1.0.0", "name": "m",
            "plugins": [ptp(), stale.clone(), {"type": "bandwidth"}, stale],
        });
        let out = with_plugin(path, conf.to_string().as_bytes(), &entry())
            .expect("ok")
            .expect("changed");
        assert_eq!(
            out.content["plugins"],
            json!([ptp(), entry(), {"type": "bandwidth"}])
        );
        // And installing what was written changes nothing.
        let again = serde_json::to_vec(&out.content).expect("json");
        assert_eq!(with_plugin(path, &again, &entry()).expect("ok"), None);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let mut single = ptp();
        single["cniVersion"] = json!("0.3.1");
        single["name"] = json!("bridge-net");
        let path = Path::new("/etc/cni/net.d/10-bridge.conf");
        let out = with_plugin(path, single.to_string().as_bytes(), &entry())
            .expect("ok")
            .expect("changed");
        assert_eq!(out.path, Path::new("/etc/cni/net.d/10-bridge.conflist"));
        assert_eq!(out.replaces.as_deref(), Some(path));
        assert_eq!(out.content["cniVersion"], "0.3.1");
        assert_eq!(out.content["name"], "bridge-net");
        assert_eq!(out.content["plugins"], json!([single, entry()]));
        // A .json file is read as a single plugin too.
        let json_path = Path::new("/etc/cni/net.d/05-x.json");
        let out = with_plugin(json_path, single.to_string().as_bytes(), &entry())
            .expect("ok")
            .expect("changed");
        assert_eq!(out.path, Path::new("/etc/cni/net.d/05-x.conflist"));
        // Uninstalling leaves a single-plugin file alone.
        assert_eq!(
            without_plugin(path, single.to_string().as_bytes()).expect("ok"),
            None
        );
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let path = Path::new("/etc/cni/net.d/10-broken.conflist");
        for (text, why) in [
            (r#"{"cniVersion": "1.0.0", "plugins": ["#, "not JSON"),
            ("[]", "not a JSON object"),
            (
                r#"{"cniVersion": "1.0.0", "name": "x"}"#,
                "without `plugins`",
            ),
            (r#"{"cniVersion": "1.0.0", "plugins": {}}"#, "not a list"),
            (r#"{"cniVersion": 1, "plugins": []}"#, "not a string"),
        ] {
            let text = text.as_bytes();
            let err = with_plugin(path, text, &entry()).expect_err("malformed");
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::Malformed { .. }), "{msg}");
            assert!(
                msg.contains("10-broken.conflist") && msg.contains(why),
                "{msg}"
            );
            assert!(msg.contains("left untouched"), "{msg}");
            assert!(without_plugin(path, text).is_err());
        }
        let conf_path = Path::new("/etc/cni/net.d/10-x.conf");
        let err = with_plugin(
            conf_path,
            br#"{"cniVersion": "1.0.0", "name": "x"}"#,
            &entry(),
        )
        .expect_err("no type");
        assert!(err.to_string().contains("without `type`"), "{err}");
    }

    #[test]
    fn an_unsupported_version_is_refused() {
        let path = Path::new("/etc/cni/net.d/10-new.conflist");
        let conf = json!({"cniVersion": "1.1.0", "name": "x", "plugins": [ptp()]});
        let err = with_plugin(path, conf.to_string().as_bytes(), &entry()).expect_err("refused");
        assert!(
            matches!(&err, ConfigError::UnsupportedVersion { version, .. } if version == "1.1.0"),
            "{err}"
        );
        assert!(err.to_string().contains("10-new.conflist"), "{err}");
    }

    #[test]
    fn removal_keeps_the_rest() {
        let path = Path::new("/etc/cni/net.d/10-mesh.conflist");
        let conf = json!({
            "cniVersion": "1.0.0", "name": "m",
            "plugins": [ptp(), entry(), {"type": "bandwidth"}],
        });
        let out = without_plugin(path, conf.to_string().as_bytes())
            .expect("ok")
            .expect("changed");
        assert_eq!(out["plugins"], json!([ptp(), {"type": "bandwidth"}]));
        assert_eq!(
            without_plugin(path, out.to_string().as_bytes()).expect("ok"),
            None
        );
    }

    #[test]
    fn the_primary_is_the_lexically_first_config() {
        let names = [
            "99-loopback.conf",
            ".10-a.conflist.ztunnel-tmp",
            "20-b.conflist",
            "10-calico.conflist",
            "00-readme.txt",
            "10-calico.conflist.bak",
        ];
        assert_eq!(primary_config(names), Some("10-calico.conflist"));
        assert_eq!(primary_config(["a.txt", ".b.conf"]), None);
        // A .conf sorts before the .conflist of the same stem.
        assert_eq!(
            primary_config(["10-x.conflist", "10-x.conf"]),
            Some("10-x.conf")
        );
    }
}
