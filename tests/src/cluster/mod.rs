//! The network-namespace test cluster (topology in docs/CONTRACTS.md).
//!
//! [`Cluster::start`] builds fabric, nodes and pods and writes the Kubernetes state; daemons are
//! started per node on demand. Dropping the cluster tears everything down, also when the test
//! panicked; the work dir (state, logs, captures) is kept after a panic or when
//! `MESH_KEEP_WORKDIR=1`, and its path printed, so a failure can be investigated.

mod ca_service;
mod capture;
mod cni;
mod daemon;
mod kube;
mod net;
mod pod;
mod spec;
mod waypoint;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};

pub use ca_service::{CaService, CA_PORT};
pub use capture::Capture;
pub use cni::{CniOutput, CniSandbox, CNI_BIN_DIR};
use daemon::DaemonCmd;
pub use daemon::{field, message, Daemon, READY_TIMEOUT};
pub use kube::{ControlPlane, API_ADDRESS};
pub use net::{in_netns, remove_own, remove_stale, run};
pub use pod::Pod;
pub use spec::{
    node_ip, node_ip6, pod_ip, pod_ip6, render_docs, split_key, vip6, ClusterSpec, NsSpec, PodSpec,
    SvcSpec, DATAPLANE_MODE, NAMESPACES_FILE, PODS_FILE, SERVICES_FILE,
};
pub use waypoint::WaypointProc;

/// A running test cluster. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    names: net::Names,
    spec: ClusterSpec,
    workdir: PathBuf,
    /// Namespaces in creation order; teardown deletes them in reverse.
    created: Vec<String>,
    pods: Vec<Pod>,
    /// Index = node - 1.
    daemons: Vec<Option<Daemon>>,
    ca_initialised: bool,
    captures: AtomicUsize,
    /// With [`Cluster::start_kube`]: the API server the daemons follow.
    kube: Option<ControlPlane>,
    /// The cluster's own bpffs mount (`<workdir>/bpf`), holding each node's pinned capture.
    bpffs: Option<PathBuf>,
}

impl Cluster {
    /// Builds the cluster described by `spec`. Fails (never skips) without root or tools.
    pub fn start(spec: ClusterSpec) -> Result<Cluster> {
        Cluster::build(spec, false)
    }

    /// Builds the cluster with a Kubernetes API server in the fabric namespace holding its
    /// objects; daemons then run with `--source kube` (see [`ControlPlane`]). The state files
    /// are still written, so a test can compare, but the daemons do not read them.
    pub fn start_kube(spec: ClusterSpec) -> Result<Cluster> {
        Cluster::build(spec, true)
    }

    fn build(spec: ClusterSpec, kube: bool) -> Result<Cluster> {
        crate::require_root()?;
        crate::require_tool("ip", "iproute2")?;
        crate::require_tool("setsid", "util-linux")?;
        spec.validate()?;
        net::remove_stale();

        let names = net::Names {
            prefix: net::new_prefix(),
        };
        let workdir = std::env::temp_dir().join(&names.prefix);
        if workdir.exists() {
            // Left by an earlier process with the same pid; its namespaces are gone already.
            std::fs::remove_dir_all(&workdir)
                .with_context(|| format!("removing old {}", workdir.display()))?;
        }
        std::fs::create_dir_all(&workdir)
            .with_context(|| format!("creating {}", workdir.display()))?;

        let placements: Vec<(PodSpec, usize, std::net::Ipv4Addr)> = spec
            .placements()
            .into_iter()
            .map(|(p, j, ip)| (p.clone(), j, ip))
            .collect();
        let mut cluster = Cluster {
            daemons: (0..spec.nodes).map(|_| None).collect(),
            names,
            spec,
            workdir,
            created: Vec::new(),
            pods: Vec::new(),
            ca_initialised: false,
            captures: AtomicUsize::new(0),
            kube: None,
            bpffs: None,
        };
        // The daemons pin capture here (not under /sys/fs/bpf: `ip netns exec` gives each one
        // a fresh /sys). Mounted before any daemon starts, so every daemon's mount namespace
        // shares this one bpffs instance and a restarted daemon finds what the last one left.
        let bpf = cluster.workdir.join("bpf");
        std::fs::create_dir_all(&bpf).with_context(|| format!("creating {}", bpf.display()))?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpf))
            .context("mounting a bpf filesystem for the daemons' pins")?;
        cluster.bpffs = Some(bpf);
        let dual = cluster.spec.dual_stack;
        for (p, j, ip) in placements {
            let logdir = cluster
                .workdir
                .join("pods")
                .join(format!("{}-{}", p.namespace, p.name));
            std::fs::create_dir_all(&logdir)
                .with_context(|| format!("creating {}", logdir.display()))?;
            cluster.pods.push(Pod {
                netns: cluster.names.pod(p.node, j),
                name: p.name,
                namespace: p.namespace,
                service_account: p.service_account,
                ip,
                ip6: dual.then(|| spec::pod_ip6(p.node, j)),
                ipv6_only: p.ipv6_only,
                node: p.node,
                logdir,
            });
        }
        for node in 1..=cluster.spec.nodes {
            let dir = cluster.state_dir(node);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        cluster.write_all_state()?;
        // On error `cluster` is dropped here, which removes whatever was created.
        net::build(&cluster.names, &cluster.spec, &mut cluster.created)
            .context("building the cluster's namespaces")?;
        if kube {
            let cp =
                ControlPlane::start(&cluster.names.fabric()).context("starting the API server")?;
            cp.apply_spec(&cluster.spec, true)
                .context("creating the cluster's objects in the API server")?;
            cluster.kube = Some(cp);
        }
        Ok(cluster)
    }

    /// The API server and daemon credentials of a [`Cluster::start_kube`] cluster. Panics on a
    /// file-source cluster: that is a mistake in the test.
    pub fn kube(&self) -> &ControlPlane {
        self.kube
            .as_ref()
            .expect("the cluster has no API server; use Cluster::start_kube")
    }

    /// The API server, if the cluster has one.
    pub fn kube_api(&self) -> Option<&ControlPlane> {
        self.kube.as_ref()
    }

    /// [`Cluster::kube`], mutable (to stop and restart the API server).
    pub fn kube_mut(&mut self) -> &mut ControlPlane {
        self.kube
            .as_mut()
            .expect("the cluster has no API server; use Cluster::start_kube")
    }

    /// The run prefix shared by all namespace names.
    pub fn prefix(&self) -> &str {
        &self.names.prefix
    }

    /// The spec as currently written to the state files.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Work dir: state, CA, logs, captures.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The fabric namespace (bridge `br0`).
    pub fn fabric_netns(&self) -> String {
        self.names.fabric()
    }

    /// Node i's namespace.
    pub fn node_netns(&self, node: usize) -> String {
        self.names.node(node)
    }

    /// Runs a program inside node i's namespace (e.g. `ss`, `bpftool`).
    pub fn node_exec(&self, node: usize, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = in_netns(&self.node_netns(node), program);
        // iproute2 (`tc ... bpf obj`) keeps its own pins on the first bpffs it finds mounted,
        // which may be another test's cluster: point it at this cluster's.
        if let Some(bpffs) = &self.bpffs {
            cmd.env("TC_BPF_MNT", bpffs);
        }
        cmd.args(args)
            .output()
            .with_context(|| format!("running {program} in node{node}"))
    }

    /// A pod by `"ns/name"`. Panics if there is none: that is a mistake in the test.
    pub fn pod(&self, key: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.key() == key)
            .unwrap_or_else(|| {
                let known: Vec<String> = self.pods.iter().map(Pod::key).collect();
                panic!("no pod `{key}` in the cluster (pods: {known:?})")
            })
    }

    /// All pods.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The state directory node i's daemon reads (`--state`). Each node has its own, so a test
    /// can give one node a different view ([`Cluster::write_node_state_file`]).
    pub fn state_dir(&self, node: usize) -> PathBuf {
        self.workdir.join("state").join(format!("node{node}"))
    }

    /// Path of state file `name` as node i's daemon sees it (what `state rejected` names).
    pub fn state_path(&self, node: usize, name: &str) -> PathBuf {
        self.state_dir(node).join(name)
    }

    /// Writes state file `name` for every node.
    pub fn write_state_file(&self, name: &str, yaml: &str) -> Result<()> {
        (1..=self.spec.nodes).try_for_each(|n| self.write_node_state_file(n, name, yaml))
    }

    /// Writes state file `name` for node i only. Atomic (write to a dot-file, then rename), so
    /// a polling daemon never reads half a file; the daemon ignores dot-files.
    pub fn write_node_state_file(&self, node: usize, name: &str, yaml: &str) -> Result<()> {
        let dir = self.state_dir(node);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("renaming {} into place", tmp.display()))
    }

    /// Writes every state file and, with an API server, applies the objects there.
    fn write_all_state(&self) -> Result<()> {
        for (name, text) in self.spec.render_all()? {
            self.write_state_file(name, &text)?;
        }
        match &self.kube {
            Some(cp) => cp.apply_spec(&self.spec, false),
            None => Ok(()),
        }
    }

    /// Changes labels, service accounts or services and rewrites every node's state files.
    /// Pods and namespaces cannot be added or moved: their network namespaces already exist.
    pub fn update_spec(&mut self, change: impl FnOnce(&mut ClusterSpec)) -> Result<()> {
        let mut next = self.spec.clone();
        change(&mut next);
        let layout = |s: &ClusterSpec| -> Vec<(String, String, usize)> {
            s.pods
                .iter()
                .map(|p| (p.namespace.clone(), p.name.clone(), p.node))
                .collect()
        };
        if layout(&next) != layout(&self.spec) || next.nodes != self.spec.nodes {
            bail!("update_spec cannot add, remove or move pods or nodes");
        }
        next.validate()?;
        self.spec = next;
        self.write_all_state()
    }

    /// Sets (`Some`) or removes (`None`) a namespace label and rewrites the state.
    pub fn set_namespace_label(&mut self, ns: &str, key: &str, value: Option<&str>) -> Result<()> {
        if !self.spec.namespaces.iter().any(|n| n.name == ns) {
            bail!("no namespace `{ns}` in the cluster");
        }
        self.update_spec(|s| {
            if let Some(n) = s.namespaces.iter_mut().find(|n| n.name == ns) {
                match value {
                    Some(v) => n.labels.insert(key.to_string(), v.to_string()),
                    None => n.labels.remove(key),
                };
            }
        })
    }

    /// The CA directory, initialised with `ztunnel ca init` on first use. Lazy so that tests
    /// without daemons do not need the daemon binary.
    pub fn ca_dir(&mut self) -> Result<PathBuf> {
        let dir = self.workdir.join("ca");
        if !self.ca_initialised {
            let bin = crate::ztunnel_bin();
            // Run in the fabric namespace: it binds nothing, but nothing of ours runs in the
            // root namespace.
            run(in_netns(&self.fabric_netns(), &bin)
                .args(["ca", "init", "--ca-dir"])
                .arg(&dir))
            .context("initialising the cluster CA")?;
            self.ca_initialised = true;
        }
        Ok(dir)
    }

    /// Starts node i's daemon with the standard flags plus `extra` and waits for `ready`.
    /// A stopped daemon of that node is replaced; a running one is an error.
    pub fn start_daemon(&mut self, node: usize, extra: &[&str]) -> Result<&Daemon> {
        self.launch_daemon(node, extra, true)
    }

    /// Starts node i's daemon like [`Cluster::start_daemon`] without waiting for `ready`.
    pub fn start_daemon_unready(&mut self, node: usize, extra: &[&str]) -> Result<&Daemon> {
        self.launch_daemon(node, extra, false)
    }

    fn launch_daemon(&mut self, node: usize, extra: &[&str], wait: bool) -> Result<&Daemon> {
        if !(1..=self.spec.nodes).contains(&node) {
            bail!("node {node} does not exist");
        }
        let idx = node - 1;
        if self.daemons[idx].as_ref().is_some_and(Daemon::is_running) {
            bail!("node{node} daemon is already running");
        }
        // The new daemon adopts whatever capture the stopped one left; dropping the old handle
        // must not uninstall it.
        if let Some(old) = self.daemons[idx].take() {
            old.hand_over_capture();
        }
        let cmd = self.daemon_cmd(node, extra)?;
        let logdir = self.workdir.join("logs");
        let netns = self.node_netns(node);
        let daemon = if wait {
            Daemon::start(node, &netns, cmd, &logdir)?
        } else {
            Daemon::spawn_unready(node, &netns, cmd, &logdir)?
        };
        Ok(self.daemons[idx].insert(daemon))
    }

    /// A rolling restart of node i's daemon: starts a second daemon (the standard flags plus
    /// `extra`) next to the running one, which hands it its listening sockets over the
    /// node's hand-over socket, and waits for the new one's `ready`. The new daemon is node
    /// i's daemon from then on; the old one, returned, drains and exits on its own (SIGTERM
    /// it as the orchestrator would; its handle no longer uninstalls capture, which the new
    /// daemon adopted).
    pub fn start_successor(&mut self, node: usize, extra: &[&str]) -> Result<Daemon> {
        if !(1..=self.spec.nodes).contains(&node) {
            bail!("node {node} does not exist");
        }
        let idx = node - 1;
        if !self.daemons[idx].as_ref().is_some_and(Daemon::is_running) {
            bail!("node{node} has no running daemon to take over from");
        }
        let cmd = self.daemon_cmd(node, extra)?;
        let logdir = self.workdir.join("logs");
        let new = Daemon::start(node, &self.node_netns(node), cmd, &logdir)?;
        let old = self.daemons[idx]
            .replace(new)
            .context("the running daemon's handle")?;
        old.hand_over_capture();
        Ok(old)
    }

    /// Starts a second daemon for node i next to the running one like
    /// [`Cluster::start_successor`], without waiting for `ready`, and returns its handle; the
    /// running daemon stays node i's (for hand-overs that do not complete). Dropping the
    /// handle stops the process and never uninstalls capture, which stays the running one's.
    pub fn spawn_successor_unready(&mut self, node: usize, extra: &[&str]) -> Result<Daemon> {
        if !(1..=self.spec.nodes).contains(&node) {
            bail!("node {node} does not exist");
        }
        let cmd = self.daemon_cmd(node, extra)?;
        let logdir = self.workdir.join("logs");
        let new = Daemon::spawn_unready(node, &self.node_netns(node), cmd, &logdir)?;
        new.hand_over_capture();
        Ok(new)
    }

    /// The command of node i's daemon: the standard flags plus `extra`.
    fn daemon_cmd(&mut self, node: usize, extra: &[&str]) -> Result<DaemonCmd> {
        // A daemon given a CA service (`--ca-address`) gets no file CA: the root key stays
        // with the service.
        let ca = if extra.contains(&"--ca-address") {
            None
        } else {
            Some(self.ca_dir()?)
        };
        let mut args: Vec<OsString> = vec!["--node-name".into(), format!("node{node}").into()];
        match &self.kube {
            Some(cp) => {
                args.extend(["--source".into(), "kube".into()]);
                // A test may give a daemon other credentials.
                if !extra.contains(&"--kubeconfig") {
                    args.extend(["--kubeconfig".into(), cp.daemon_kubeconfig.clone().into()]);
                }
            }
            None => args.extend(["--state".into(), self.state_dir(node).into()]),
        }
        if let Some(ca) = ca {
            args.extend(["--ca-dir".into(), ca.into()]);
        }
        // No `--uplink`: the daemon finds eth0 from the routes (a test may name one).
        args.extend(["--log-format".into(), "json".into()]);
        // Short drain by default so teardown's SIGTERM is quick; a test may set its own.
        if !extra.iter().any(|a| a.starts_with("--drain-timeout")) {
            args.extend(["--drain-timeout".into(), "3s".into()]);
        }
        args.extend(extra.iter().map(OsString::from));
        let logdir = self.workdir.join("logs");
        std::fs::create_dir_all(&logdir)
            .with_context(|| format!("creating {}", logdir.display()))?;
        Ok(DaemonCmd {
            program: crate::ztunnel_bin(),
            args,
            // The nodes share this machine's file system: each daemon gets its own admin and
            // hand-over sockets (a flag in `extra` overrides them).
            env: vec![
                ("ZTUNNEL_ADMIN_SOCKET", self.admin_socket(node).into()),
                ("ZTUNNEL_HANDOVER_SOCKET", self.handover_socket(node).into()),
                ("ZTUNNEL_BPF_PIN_DIR", self.pin_dir(node).into()),
                ("ZTUNNEL_CNI_SOCKET", self.cni_socket(node).into()),
                // Never the host's CNI directories (`--cni-install`, `ztunnel uninstall`).
                ("ZTUNNEL_CNI_CONF_DIR", self.cni_conf_dir(node).into()),
                ("ZTUNNEL_CNI_BIN_DIR", self.cni_bin_dir(node).into()),
            ],
        })
    }

    /// A host-network process of node i, as a [`Pod`]: programs run in the node's namespace,
    /// and `ip` is the source its connections to the node's pods carry (`169.254.1.1`, the
    /// node-side address pods route through). Its key is `host/node<i>`.
    pub fn host_network(&self, node: usize) -> Pod {
        Pod {
            name: format!("node{node}"),
            namespace: "host".into(),
            service_account: String::new(),
            ip: std::net::Ipv4Addr::new(169, 254, 1, 1),
            ip6: None,
            ipv6_only: false,
            netns: self.node_netns(node),
            node,
            logdir: self.workdir.join("logs"),
        }
    }

    /// Node i's capture pin directory (`--bpf-pin-dir`), on the cluster's own bpffs.
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.workdir.join("bpf").join(format!("node{node}"))
    }

    /// Every pin left on the cluster's bpffs (empty once all captures are uninstalled). The
    /// kernel's own `maps.debug` / `progs.debug` of a fresh bpffs are not pins.
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = e.path();
                if path.is_dir() {
                    walk(&path, out);
                }
                out.push(path);
            }
        }
        let mut out = Vec::new();
        if let Some(dir) = &self.bpffs {
            walk(dir, &mut out);
            out.retain(|p| p.parent() != Some(dir) || p.extension().is_none_or(|e| e != "debug"));
        }
        out
    }

    /// Node i's admin socket (`--admin-socket`): every admin route, the changing ones included;
    /// `ztunnel status` finds it through `ZTUNNEL_ADMIN_SOCKET`.
    pub fn admin_socket(&self, node: usize) -> PathBuf {
        self.workdir
            .join("run")
            .join(format!("node{node}-admin.sock"))
    }

    /// Node i's hand-over socket (`--handover-socket`): where a new daemon of the node asks
    /// the running one for its listening sockets.
    pub fn handover_socket(&self, node: usize) -> PathBuf {
        self.workdir
            .join("run")
            .join(format!("node{node}-handover.sock"))
    }

    /// Node i's CNI endpoint (`--cni-socket`), where its conflist's `ztunnel-cni` announces
    /// pods ([`Cluster::cni_add`]).
    pub fn cni_socket(&self, node: usize) -> PathBuf {
        self.workdir
            .join("run")
            .join(format!("node{node}-cni.sock"))
    }

    /// Starts every node's daemon with the standard flags.
    pub fn start_all_daemons(&mut self) -> Result<()> {
        for node in 1..=self.spec.nodes {
            self.start_daemon(node, &[])?;
        }
        Ok(())
    }

    /// Node i's daemon. Panics if it was never started: that is a mistake in the test.
    pub fn daemon(&self, node: usize) -> &Daemon {
        self.daemons
            .get(node.wrapping_sub(1))
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("node{node} has no daemon; call start_daemon first"))
    }

    /// Issues `identity` from the cluster's file CA into `<workdir>/<name>.{crt,key}`, for a
    /// test's own TLS peer (Envoy, an attacking client): (cert, key) paths.
    pub fn issue_cert(&mut self, name: &str, identity: &str) -> Result<(PathBuf, PathBuf)> {
        let ca = self.ca_dir()?;
        let (cert, key) = (
            self.workdir.join(format!("{name}.crt")),
            self.workdir.join(format!("{name}.key")),
        );
        run(Command::new(crate::ztunnel_bin())
            .args(["ca", "issue", "--ca-dir"])
            .arg(&ca)
            .args(["--identity", identity, "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key))
        .context("ztunnel ca issue")?;
        Ok((cert, key))
    }

    /// Starts a capture on the fabric bridge (`filter`: pcap expression, "" for all).
    pub fn capture_fabric(&self, filter: &str) -> Result<Capture> {
        let n = self.captures.fetch_add(1, Ordering::Relaxed);
        let path = self.workdir.join(format!("fabric-{n}.pcap"));
        Capture::start(&self.fabric_netns(), "br0", filter, &path)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            for d in self.daemons.iter().flatten() {
                eprintln!(
                    "----- node{} daemon log tail ({}):\n{}",
                    d.node(),
                    d.log_path().display(),
                    d.log_tail(40)
                );
            }
        }
        for d in self.daemons.iter_mut().filter_map(Option::take) {
            d.shutdown();
        }
        if let Some(cp) = self.kube.take() {
            if panicking {
                eprintln!(
                    "----- kube-apiserver log tail ({}):\n{}",
                    cp.api.log_path().display(),
                    cp.api.log_tail(20)
                );
            }
            drop(cp);
        }
        let left = self.pins();
        if !left.is_empty() {
            eprintln!("mesh-tests: teardown: pins left after uninstall: {left:?}");
        }
        for ns in self.created.drain(..).rev() {
            net::delete_netns(&ns);
        }
        if let Some(bpf) = self.bpffs.take() {
            if let Err(e) = run(Command::new("umount").arg(&bpf)) {
                eprintln!("mesh-tests: teardown: {e:#}");
            }
        }
        let keep = std::env::var("MESH_KEEP_WORKDIR").is_ok_and(|v| v == "1");
        if panicking || keep {
            eprintln!("mesh-tests: kept work dir {}", self.workdir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
            eprintln!(
                "mesh-tests: teardown: removing {}: {e}",
                self.workdir.display()
            );
        }
    }
}
