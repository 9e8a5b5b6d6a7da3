//! Test infrastructure shared by the acceptance tests, `cargo xtask demo` and the benchmarks.
//!
//! - [`cluster`]: a Kubernetes-like cluster built from Linux network namespaces (fabric bridge,
//!   nodes, pods), the YAML state the daemons read, the daemons themselves and fabric captures.
//! - [`kube`]: a real Kubernetes API server (etcd + kube-apiserver) with the repository's CRDs.
//! - [`app`]: typed wrappers around the `meshapp` test application running inside pods.
//! - [`bpf`]: which eBPF programs are attached in a namespace (cleanup checks).
//! - [`ca_service`]: the CA service next to the API server, daemons on `--ca-address`.
//! - [`image`]: the daemon's OCI image (umoci), for `cargo xtask image` and its test.
//! - [`pcap`]: a small reader for the captures, so assertions need no external dissector.
//! - [`web`]: HTTP in pods (the `meshhttp` backend, `curl`), for the waypoint tests.
//! - [`waypoint_mesh`]: the mesh the waypoint tests share (daemons, a waypoint, backends).
//!
//! Everything here needs root. Missing privileges or tools are reported as errors naming what
//! to do; nothing is ever skipped silently, so a green test run always means the checks ran.

pub mod app;
pub mod bpf;
pub mod ca_service;
pub mod cluster;
pub mod image;
pub mod kube;
pub mod pcap;
pub mod testkit;
pub mod waypoint_mesh;
pub mod web;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Raises this process's soft limit on open files to the hard limit, for the load tools that
/// hold many sockets (`meshload hold`, `meshapp serve` with many clients). Best effort.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Fails unless the process runs as root. Tests call this (via [`cluster::Cluster::start`]) so
/// that an unprivileged run fails loudly instead of passing without having checked anything.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the mesh test cluster needs root (network namespaces, eBPF); run as root, e.g. \
             `sudo -E cargo xtask test`. Refusing to skip: a skipped test would look like a pass."
        );
    }
    Ok(())
}

/// Finds `tool` on `PATH` (plus the sbin directories, which a non-login root shell may lack).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Fails with the apt package to install when `tool` is missing.
pub fn require_tool(tool: &str, apt_package: &str) -> Result<()> {
    if find_tool(tool).is_none() {
        bail!(
            "`{tool}` not found; install it with `apt-get install -y {apt_package}` \
             (or run `cargo xtask test`, which installs the test tools)"
        );
    }
    Ok(())
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else derived from the running
/// executable (`<target>/debug/deps/<test>` or `<target>/debug/xtask`), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        let profile = exe.ancestors().find(|p| {
            p.file_name()
                .is_some_and(|n| n == "debug" || n == "release")
        });
        if let Some(parent) = profile.and_then(Path::parent) {
            return parent.to_path_buf();
        }
    }
    workspace_root().join("target")
}

/// The workspace root (parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The last `lines` lines of a log file ("" when unreadable), for error messages.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The daemon binary: `ZTUNNEL_BIN`, else `<target>/debug/ztunnel`.
///
/// Panics when it does not exist: every caller is a test or the demo, and the fix (build the
/// workspace) is the same for all of them.
pub fn ztunnel_bin() -> PathBuf {
    binary("ZTUNNEL_BIN", "ztunnel", "cargo build -p ztunnel")
}

/// The test application: `MESHAPP_BIN`, else `<target>/debug/meshapp`. Panics when missing.
pub fn meshapp_bin() -> PathBuf {
    binary("MESHAPP_BIN", "meshapp", "cargo build -p mesh-tests --bins")
}

/// The waypoint: `WAYPOINT_BIN`, else `<target>/debug/waypoint`. Panics when missing.
pub fn waypoint_bin() -> PathBuf {
    binary("WAYPOINT_BIN", "waypoint", "cargo build -p waypoint")
}

/// The HTTP test backend: `MESHHTTP_BIN`, else `<target>/debug/meshhttp`. Panics when missing.
pub fn meshhttp_bin() -> PathBuf {
    binary(
        "MESHHTTP_BIN",
        "meshhttp",
        "cargo build -p mesh-tests --bins",
    )
}

/// The load generator, for tests that need many short connections on a schedule (`meshload
/// churn`): `MESHLOAD_BIN`, else `<target>/debug/meshload`. Panics when missing.
pub fn meshload_bin() -> PathBuf {
    binary(
        "MESHLOAD_BIN",
        "meshload",
        "cargo build -p mesh-tests --bins",
    )
}

/// The chained CNI plugin: `ZTUNNEL_CNI_BIN`, else `<target>/debug/ztunnel-cni`. Panics when
/// missing.
pub fn cni_plugin_bin() -> PathBuf {
    binary(
        "ZTUNNEL_CNI_BIN",
        "ztunnel-cni",
        "cargo build -p ztunnel-cni",
    )
}

/// The misbehaving HBONE client of the limits tests: `HBONESTRESS_BIN`, else
/// `<target>/debug/hbonestress`. Panics when missing.
pub fn hbonestress_bin() -> PathBuf {
    binary(
        "HBONESTRESS_BIN",
        "hbonestress",
        "cargo build -p mesh-tests --bins",
    )
}

fn binary(env: &str, name: &str, build: &str) -> PathBuf {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join(name),
    };
    assert!(
        path.is_file(),
        "{name} binary not found at {} (set {env} or run `{build}`)",
        path.display()
    );
    path
}

/// A Python 3.12 or newer (what `helm-sdkpy` needs; the system's may be older): of
/// `$PYENV_ROOT/versions/3.N.*` (default `~/.pyenv`) with N >= 12 the lowest N (its newest
/// patch release), else `python3.N` on `PATH`.
pub fn helm_python() -> Option<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .unwrap_or_default();
    let minor_patch = |name: &str| -> Option<(u32, std::cmp::Reverse<u32>)> {
        let mut parts = name.split('.');
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next()?.parse().ok()?;
        let patch: u32 = parts.next()?.parse().ok()?;
        (major == 3 && minor >= 12 && parts.next().is_none())
            .then_some((minor, std::cmp::Reverse(patch)))
    };
    let pyenv = std::fs::read_dir(root.join("versions"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let python = e.path().join("bin/python3");
            Some((minor_patch(&name)?, python)).filter(|(_, p)| p.is_file())
        })
        .min()
        .map(|(_, p)| p);
    pyenv.or_else(|| (12..=20).find_map(|m| find_tool(&format!("python3.{m}"))))
}
