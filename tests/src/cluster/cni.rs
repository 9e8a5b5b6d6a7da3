//! Pods created through real CNI plugins, as a container runtime creates them: the runtime
//! makes the pod's network namespace, then runs each plugin of the node's conflist in turn
//! (ADD) with the specification's environment (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_PATH`, `CNI_ARGS`) and the plugin's configuration on stdin, each given
//! the previous one's result as `prevResult`; DEL runs them in reverse order with the ADD's
//! result.
//!
//! Each node has its own CNI directories under the work dir ([`Cluster::cni_conf_dir`],
//! [`Cluster::cni_bin_dir`]; never the host's), which its daemon is given as `--cni-conf-dir`
//! and `--cni-bin-dir`. The node's primary CNI is Debian's `containernetworking-plugins`
//! (`ptp` with `host-local` IPAM, in [`CNI_BIN_DIR`]): [`Cluster::cni_primary`] writes its
//! conflist, and `ztunnel-cni` joins the chain the way it does on a real node, through the
//! installer (`ztunnel cni install`, [`Cluster::cni_install`], or the daemon's
//! `--cni-install`). The chain that runs is the one the runtime would pick: the lexically first
//! configuration of the node's directory, each plugin found on `CNI_PATH` (the node's binary
//! directory, then [`CNI_BIN_DIR`]). Node i's pods get `10.244.<i>.224`-`.254` (the node's pod
//! range, which the other nodes route to it; above the harness's own pods), a `/24` on `eth0`
//! with routes to the pod and service ranges through the host side of their veth
//! (`10.244.<i>.1`), and the node a host route to them: the same shape as the harness's
//! hand-made pods, with another gateway. No default route.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::net::in_netns;
use super::{Cluster, Pod, PodSpec};

/// Where Debian's `containernetworking-plugins` installs the plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A pod sandbox: its network namespace, made before any plugin runs, and the last ADD's
/// result (DEL is given it as `prevResult`).
#[derive(Debug, Clone)]
pub struct CniSandbox {
    /// The pod, as the state will show it (`node`, service account, labels).
    pub spec: PodSpec,
    /// Network namespace name (under `/run/netns`).
    pub netns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The chain's ADD result, once it succeeded.
    pub result: Option<Value>,
}

/// What one plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct CniOutput {
    /// The plugin's `type`.
    pub plugin: String,
    /// Exit status 0.
    pub success: bool,
    /// stdout (a result, or an error object).
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl CniOutput {
    /// The error object's `code` and `msg`, when stdout holds one.
    pub fn error(&self) -> Option<(u64, String)> {
        let v: Value = serde_json::from_str(&self.stdout).ok()?;
        Some((v["code"].as_u64()?, v["msg"].as_str()?.to_string()))
    }
}

impl Cluster {
    /// Node i's CNI configuration directory (the daemon's `--cni-conf-dir`).
    pub fn cni_conf_dir(&self, node: usize) -> PathBuf {
        self.workdir
            .join("cni")
            .join(format!("node{node}"))
            .join("net.d")
    }

    /// Node i's CNI binary directory (the daemon's `--cni-bin-dir`), first on `CNI_PATH`.
    pub fn cni_bin_dir(&self, node: usize) -> PathBuf {
        self.workdir
            .join("cni")
            .join(format!("node{node}"))
            .join("bin")
    }

    /// Writes node i's primary CNI configuration, `10-mesh.conflist` with `ptp` (+
    /// `host-local`) alone, as the node's network plugin would (over the file, as a CNI does
    /// when it starts), and returns it.
    pub fn cni_primary(&self, node: usize) -> Result<Value> {
        let ipam_dir = self.workdir.join("cni").join(format!("node{node}-ipam"));
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "mesh",
            "plugins": [
                {
                    "type": "ptp",
                    "ipam": {
                        "type": "host-local",
                        "dataDir": ipam_dir,
                        "ranges": [[{
                            "subnet": format!("10.244.{node}.0/24"),
                            "rangeStart": format!("10.244.{node}.224"),
                            "rangeEnd": format!("10.244.{node}.254"),
                            "gateway": format!("10.244.{node}.1"),
                        }]],
                        "routes": [{"dst": "10.244.0.0/16"}, {"dst": "10.96.0.0/16"}],
                    },
                },
            ],
        });
        let dir = self.cni_conf_dir(node);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("10-mesh.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(&conf)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(conf)
    }

    /// Runs the installer, `ztunnel cni install`, for node i (its directories, its daemon's
    /// socket, the built `ztunnel-cni`), as an operator or an init container would; its output
    /// line.
    pub fn cni_install(&self, node: usize) -> Result<String> {
        std::fs::create_dir_all(self.cni_bin_dir(node)).context("creating the CNI bin dir")?;
        let out = super::run(
            Command::new(crate::ztunnel_bin())
                .args(["cni", "install", "--cni-socket"])
                .arg(self.cni_socket(node))
                .arg("--cni-conf-dir")
                .arg(self.cni_conf_dir(node))
                .arg("--cni-bin-dir")
                .arg(self.cni_bin_dir(node))
                .arg("--cni-plugin-binary")
                .arg(crate::cni_plugin_bin()),
        )
        .with_context(|| format!("ztunnel cni install on node{node}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Node i's chain, as the runtime reads it: the lexically first `*.conflist` of its
    /// configuration directory.
    pub fn cni_conflist(&self, node: usize) -> Result<Value> {
        let dir = self.cni_conf_dir(node);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.') && n.ends_with(".conflist"))
            .collect();
        names.sort();
        let name = names
            .first()
            .with_context(|| format!("no conflist in {}", dir.display()))?;
        let path = dir.join(name);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Makes the network namespace of a new pod (what a runtime does before the plugins run).
    /// The pod is not in the state until [`Cluster::publish_cni_pod`].
    pub fn cni_sandbox(&mut self, spec: PodSpec) -> Result<CniSandbox> {
        if crate::find_tool("ptp").is_none() && !PathBuf::from(CNI_BIN_DIR).join("ptp").is_file() {
            bail!(
                "{CNI_BIN_DIR}/ptp not found; install the CNI plugins with `apt-get install -y \
                 containernetworking-plugins` (or run `cargo xtask test`, which installs them)"
            );
        }
        // A node whose CNI is not set up yet gets it now: the primary conflist, then the
        // installer (a test of the installer itself sets the node up before).
        if self.cni_conflist(spec.node).is_err() {
            self.cni_primary(spec.node)?;
            self.cni_install(spec.node)?;
        }
        let k = self.created.len();
        let netns = format!("{}-n{}c{k}", self.names.prefix, spec.node);
        super::net::ip(&["netns", "add", &netns])?;
        self.created.push(netns.clone());
        super::net::ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(CniSandbox {
            container_id: format!("{netns}-sandbox"),
            netns,
            spec,
            result: None,
        })
    }

    /// Runs the node's chain with `CNI_COMMAND=ADD` for `sandbox`, stopping at the first plugin
    /// that fails (whose output is returned last). On success the sandbox keeps the result.
    pub fn cni_add(&self, sandbox: &mut CniSandbox) -> Result<Vec<CniOutput>> {
        let conf = self.cni_conflist(sandbox.spec.node)?;
        let mut prev: Option<Value> = None;
        let mut outs = Vec::new();
        for plugin in conf["plugins"].as_array().into_iter().flatten() {
            let out = self.run_plugin("ADD", sandbox, &conf, plugin, prev.as_ref())?;
            let success = out.success;
            if success {
                prev = Some(
                    serde_json::from_str(&out.stdout)
                        .with_context(|| format!("{} printed no result: {out:?}", out.plugin))?,
                );
            }
            outs.push(out);
            if !success {
                return Ok(outs);
            }
        }
        sandbox.result = prev;
        Ok(outs)
    }

    /// Runs the chain with `CNI_COMMAND=DEL`, last plugin first, each with the ADD's result
    /// (as a runtime does after a failed ADD too). Every plugin runs, whatever the others did.
    pub fn cni_del(&self, sandbox: &CniSandbox) -> Result<Vec<CniOutput>> {
        let conf = self.cni_conflist(sandbox.spec.node)?;
        let plugins: Vec<&Value> = conf["plugins"].as_array().into_iter().flatten().collect();
        plugins
            .into_iter()
            .rev()
            .map(|p| self.run_plugin("DEL", sandbox, &conf, p, sandbox.result.as_ref()))
            .collect()
    }

    /// The pod of a sandbox whose ADD succeeded: its address from the result.
    pub fn cni_pod(&self, sandbox: &CniSandbox) -> Result<Pod> {
        let result = sandbox
            .result
            .as_ref()
            .context("the sandbox has no ADD result")?;
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next()?.parse().ok())
            .with_context(|| format!("no IPv4 address in the result {result}"))?;
        let spec = &sandbox.spec;
        let logdir = self
            .workdir
            .join("pods")
            .join(format!("{}-{}", spec.namespace, spec.name));
        std::fs::create_dir_all(&logdir)
            .with_context(|| format!("creating {}", logdir.display()))?;
        Ok(Pod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            service_account: spec.service_account.clone(),
            ip,
            // The chain's IPAM here gives IPv4 only.
            ip6: None,
            ipv6_only: false,
            netns: sandbox.netns.clone(),
            node: spec.node,
            logdir,
        })
    }

    /// Adds the pod of `sandbox` to the state (every node's pods file, and the API server's),
    /// as the kubelet's status update would.
    pub fn publish_cni_pod(&mut self, sandbox: &CniSandbox) -> Result<Pod> {
        let pod = self.cni_pod(sandbox)?;
        self.spec.cni_pods.push((sandbox.spec.clone(), pod.ip));
        self.write_all_state()?;
        Ok(pod)
    }

    fn run_plugin(
        &self,
        command: &str,
        sandbox: &CniSandbox,
        conf: &Value,
        plugin: &Value,
        prev: Option<&Value>,
    ) -> Result<CniOutput> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let mut input = plugin.clone();
        input["cniVersion"] = conf["cniVersion"].clone();
        input["name"] = conf["name"].clone();
        if let Some(prev) = prev {
            input["prevResult"] = prev.clone();
        }
        let spec = &sandbox.spec;
        // Found on CNI_PATH as the runtime finds it: the node's directory (where the installer
        // put ztunnel-cni), then the distribution's plugins.
        let path = [self.cni_bin_dir(spec.node), PathBuf::from(CNI_BIN_DIR)];
        let bin = path
            .iter()
            .map(|d| d.join(&kind))
            .find(|b| b.is_file())
            .with_context(|| format!("CNI plugin {kind} is in none of {path:?}"))?;
        let cni_path = std::env::join_paths(&path).context("CNI_PATH")?;
        // Plugins run in the node's network namespace, as the runtime does on a node.
        let mut cmd: Command = in_netns(&self.node_netns(spec.node), &bin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", sandbox.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &cni_path)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={}",
                    spec.namespace, spec.name, sandbox.container_id
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running CNI plugin {}", bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(&serde_json::to_vec(&input)?)
                .with_context(|| format!("writing {kind}'s configuration"))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for CNI plugin {kind}"))?;
        Ok(CniOutput {
            plugin: kind,
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
