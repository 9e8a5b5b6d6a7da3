//! `cargo xtask image [--debug]`: the daemon's OCI image (`mesh_tests::image`), built with umoci
//! from the release binaries of the daemon and the CNI plugin (`--debug`: the debug ones, for a
//! quick try), written to
//! `<target>/image/ztunnel/` (OCI image layout, tag = the workspace version) and
//! `<target>/image/ztunnel-<version>.oci.tar` (the same as one archive).

use std::process::Command;

use anyhow::{bail, Result};
use mesh_tests::image::{self, ImageSpec};

pub fn run(args: &[String]) -> Result<bool> {
    let mut debug = false;
    for a in args {
        match a.as_str() {
            "--debug" => debug = true,
            other => bail!("image: unknown argument `{other}` (usage: image [--debug])"),
        }
    }
    mesh_tests::require_root()?;
    super::test::install_packages(&["umoci"])?;
    let root = mesh_tests::workspace_root();
    let mut build = super::cargo();
    build.args([
        "build",
        "-p",
        "ztunnel",
        "--bin",
        "ztunnel",
        "-p",
        "ztunnel-cni",
    ]);
    if !debug {
        build.arg("--release");
    }
    super::run_status(build.current_dir(&root))?;
    let target = super::target_dir()?;
    let out = target.join(if debug { "debug" } else { "release" });
    let binary = out.join("ztunnel");
    let version = env!("CARGO_PKG_VERSION").to_string();
    let spec = ImageSpec {
        binary,
        cni_plugin: out.join("ztunnel-cni"),
        out_dir: target.join("image"),
        tag: version.clone(),
        source: source_url(&root),
        revision: git(&root, &["rev-parse", "HEAD"]),
    };
    let built = image::build(&spec)?;
    println!(
        "image localhost/ztunnel:{version} ({} files: {})\n  OCI layout:  {}  (tag {version})\n  \
         OCI archive: {}\n  load it:     ctr -n k8s.io images import --base-name \
         localhost/ztunnel {}\n               skopeo copy oci-archive:{} \
         containers-storage:localhost/ztunnel:{version}",
        built.files.len(),
        built.files.join(" "),
        built.layout.display(),
        built.archive.display(),
        built.archive.display(),
        built.archive.display(),
    );
    Ok(true)
}

/// The repository's `origin` remote when it has one, else the working copy as a `file:` URL.
fn source_url(root: &std::path::Path) -> String {
    git(root, &["config", "--get", "remote.origin.url"])
        .unwrap_or_else(|| format!("file://{}", root.display()))
}

fn git(root: &std::path::Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}
