//! Installing ztunnel on a cluster: the Helm chart of `deploy/charts/ztunnel/` and the OCI image
//! of `cargo xtask image`.
//!
//! Helm is driven through its Go SDK (the Python package `helm-sdkpy`, which needs Python 3.12
//! or newer: `tests/helm/helm_sdk.py`); it has no client-side rendering, so the chart is
//! installed into a real kube-apiserver 1.20 (`mesh_tests::kube`). No kubelet runs there: the
//! pods never start, but every object must be accepted, and the rendered manifest is then
//! checked offline against the Kubernetes 1.33 schemas (`kubernetes-validate --strict`) and
//! server-side applied with `--dry-run=server`. `cargo xtask test` installs both Python packages;
//! these tests fail (never skip) without them.
//!
//! The image tests build the image from the debug binary (`cargo xtask image` uses the release
//! one; a release build takes minutes here), unpack it and run its `ztunnel --version` in a
//! chroot, and run the daemon in it through a private containerd with the chart's security
//! context.
//!
//! Every test name contains `kube`, so `cargo xtask test -- kube` selects them with the other
//! API-server tests.
//!
//! This file holds what the tests share (driving helm, the API server, the manifest's
//! documents); the tests are in [`chart`] (the chart: lint, install, values, CRD copies) and
//! [`oci`] (the image: unpacked and run in a chroot, and run as the chart's DaemonSet container
//! through containerd on a [`node`] of the test's own).

mod chart;
mod node;
mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_tests::kube::{deploy_dir, ApiServer, Options};
use serde_json::Value;

const NAMESPACE: &str = "istio-system";
const RELEASE: &str = "ztunnel";

fn chart_dir() -> PathBuf {
    deploy_dir().join("charts/ztunnel")
}

/// Python 3.12 or newer with `helm_sdkpy`: `HELM_PYTHON`, else the newest pyenv 3.12+.
fn helm_python() -> PathBuf {
    if let Some(p) = std::env::var_os("HELM_PYTHON") {
        return PathBuf::from(p);
    }
    let found = mesh_tests::helm_python();
    found.unwrap_or_else(|| {
        panic!(
            "no Python >= 3.12 found (HELM_PYTHON, or ~/.pyenv/versions/3.1[2-9].*): helm-sdkpy \
             needs one; `cargo xtask test` installs helm-sdkpy into it"
        )
    })
}

/// Runs `tests/helm/helm_sdk.py <args>`; its JSON output.
fn helm(args: &[&str]) -> Value {
    helm_in(None, args)
}

/// Runs `tests/helm/helm_sdk.py <args>` (inside network namespace `netns`, when given), whatever
/// its outcome.
fn helm_output_in(netns: Option<&str>, args: &[&str]) -> std::process::Output {
    let script = mesh_tests::workspace_root().join("tests/helm/helm_sdk.py");
    let py = helm_python();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&py);
            c
        }
        None => Command::new(&py),
    };
    cmd.arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", py.display()))
}

/// [`helm_output_in`] without a namespace.
fn helm_output(args: &[&str]) -> std::process::Output {
    helm_output_in(None, args)
}

/// [`helm`] inside network namespace `netns` (where an API server of that namespace is).
fn helm_in(netns: Option<&str>, args: &[&str]) -> Value {
    let py = helm_python();
    let out = helm_output_in(netns, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}): {stderr}\n(helm-sdkpy missing? `{} -m pip install helm-sdkpy`)",
        out.status,
        py.display()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("helm {args:?}: output is not JSON ({e}): {stderr}"))
}

fn start_api(install_crds: bool) -> ApiServer {
    ApiServer::start_with(Options {
        install_crds,
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("the API server harness starts: {e:#}"))
}

/// Installs the chart into `api` with `values`; returns the rendered manifest.
fn install(api: &ApiServer, values: &Value) -> String {
    install_in(None, api, values);
    manifest(api)
}

/// Installs the chart with helm running in `netns`; the release.
fn install_in(netns: Option<&str>, api: &ApiServer, values: &Value) {
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let chart = chart_dir().to_string_lossy().into_owned();
    let values = values.to_string();
    let release = helm_in(
        netns,
        &["install", &kubeconfig, NAMESPACE, RELEASE, &chart, &values],
    );
    assert_eq!(
        release["info"]["status"]
            .as_str()
            .or(release["status"].as_str()),
        Some("deployed"),
        "release after install: {release}"
    );
}

fn manifest(api: &ApiServer) -> String {
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let status = helm(&["manifest", &kubeconfig, NAMESPACE, RELEASE]);
    status["manifest"]
        .as_str()
        .unwrap_or_else(|| panic!("release status has no manifest: {status}"))
        .to_string()
}

/// The YAML documents of `text` (skipping empty ones), as JSON values.
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|d| {
            let v = Value::deserialize(d).expect("valid YAML");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the documents"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("writing a file");
    p
}

/// `python3 -m kubernetes_validate -k 1.33.0 --strict <file>`: the offline schema check.
fn kubernetes_validate(file: &Path) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "-k", "1.33.0", "--strict"])
        .arg(file)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "kubernetes-validate {} failed (`python3 -m pip install kubernetes-validate`?):\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
