//! The daemon's OCI image, built with umoci (apt `umoci`): no container engine, no registry, no
//! base image. Its root filesystem holds the `ztunnel` binary at `/usr/local/bin/ztunnel`, the
//! chained CNI plugin `ztunnel-cni` next to it (the daemon's `--cni-install` copies it onto the
//! node from there), the machine's `ip` (iproute2) at `/usr/bin/ip` (capture installs its
//! policy route by running `ip`: `ztunnel::capture::routes`), and exactly the shared objects
//! `ldd` says the three load (libc, libgcc_s and the dynamic loader for the daemon and the
//! plugin; libbpf, libelf, libmnl, libbsd, libcap, libz, libmd for `ip`), copied from this
//! machine at the paths they are looked up;
//! nothing else (no shell, no package manager). Entrypoint: the daemon. `cargo xtask image`
//! builds it from the release binary under `<target>/image/`; the image tests build it from the
//! debug binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where the binary lives in the image.
pub const BINARY_PATH: &str = "/usr/local/bin/ztunnel";
/// Where the CNI plugin lives in the image: next to the daemon, where `--cni-install` looks.
pub const CNI_PLUGIN_PATH: &str = "/usr/local/bin/ztunnel-cni";
/// Where `ip` lives in the image (on the image's `PATH`).
pub const IP_PATH: &str = "/usr/bin/ip";
/// The image's `PATH`.
pub const PATH: &str = "/usr/local/bin:/usr/bin";

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The `ztunnel` executable to put in the image.
    pub binary: PathBuf,
    /// The `ztunnel-cni` executable to put next to it.
    pub cni_plugin: PathBuf,
    /// Output directory: `<out>/ztunnel` (OCI layout) and `<out>/ztunnel-<tag>.oci.tar`.
    pub out_dir: PathBuf,
    /// The tag in the layout (and the version label).
    pub tag: String,
    /// `org.opencontainers.image.source`.
    pub source: String,
    /// `org.opencontainers.image.revision` (a commit), when known.
    pub revision: Option<String>,
}

/// A built image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// The same layout as one tar file (an `oci-archive`), for `podman load` / `ctr import`.
    pub archive: PathBuf,
    /// The tag inside the layout.
    pub tag: String,
    /// Paths of the files in the image's root filesystem, sorted.
    pub files: Vec<String>,
}

impl BuiltImage {
    /// `<layout>:<tag>`, the image reference umoci takes.
    pub fn umoci_ref(&self) -> String {
        format!("{}:{}", self.layout.display(), self.tag)
    }
}

/// The shared objects `binary` loads, as `ldd` resolves them on this machine, with the dynamic
/// loader under the path the binary names (its `PT_INTERP`). Empty for a static binary.
pub fn runtime_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_ldd(&text)
}

/// The shared objects of the image's executables (the daemon, the plugin, `ip`) together, each
/// once.
pub fn image_libraries(executables: &[&Path]) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for exe in executables {
        libs.extend(runtime_libraries(exe)?);
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// Parses `ldd` output: `name => /path (0x...)` and `/lib64/ld-linux-x86-64.so.2 (0x...)`.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let target = rest.split_whitespace().next().unwrap_or("");
                if target == "not" {
                    bail!("ldd: {} is not found on this machine", name.trim());
                }
                target
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        // The vDSO is the kernel's, not a file.
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// Builds the image (see the module docs). Needs root (umoci unpacks with real ownership).
pub fn build(spec: &ImageSpec) -> Result<BuiltImage> {
    crate::require_tool("umoci", "umoci")?;
    let layout = spec.out_dir.join("ztunnel");
    let archive = spec.out_dir.join(format!("ztunnel-{}.oci.tar", spec.tag));
    std::fs::create_dir_all(&spec.out_dir)
        .with_context(|| format!("creating {}", spec.out_dir.display()))?;
    for old in [&layout, &archive] {
        if old.is_dir() {
            std::fs::remove_dir_all(old)?;
        } else if old.exists() {
            std::fs::remove_file(old)?;
        }
    }
    let image = format!("{}:{}", layout.display(), spec.tag);
    let work = tempfile::Builder::new()
        .prefix("ztunnel-image-")
        .tempdir_in(&spec.out_dir)
        .context("temporary bundle directory")?;
    let bundle = work.path().join("bundle");

    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle.to_string_lossy()])?;

    let rootfs = bundle.join("rootfs");
    let mut files = Vec::new();
    let mut put = |src: &Path, dest: &str, mode: u32| -> Result<()> {
        let target = rootfs.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("absolute path"))?;
        // `copy` follows symlinks: the image gets the files' contents under the looked-up names.
        std::fs::copy(src, &target)
            .with_context(|| format!("copying {} into the image", src.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        files.push(dest.to_string());
        Ok(())
    };
    let ip = crate::find_tool("ip").context("`ip` not found; install iproute2")?;
    put(&spec.binary, BINARY_PATH, 0o755)?;
    put(&spec.cni_plugin, CNI_PLUGIN_PATH, 0o755)?;
    put(&ip, IP_PATH, 0o755)?;
    for lib in image_libraries(&[&spec.binary, &spec.cni_plugin, &ip])? {
        put(&lib, &lib.to_string_lossy(), 0o755)?;
    }
    // Mount points the pod fills (scratch space, the CA directory); empty in the image.
    for dir in ["tmp", "var/lib/ztunnel/ca"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    umoci(&["repack", "--image", &image, &bundle.to_string_lossy()])?;

    let mut config = vec![
        "config".to_string(),
        "--image".into(),
        image.clone(),
        "--config.entrypoint".into(),
        BINARY_PATH.into(),
        "--config.user".into(),
        "0:0".into(),
        "--config.workingdir".into(),
        "/".into(),
        "--config.env".into(),
        format!("PATH={PATH}"),
        "--os".into(),
        "linux".into(),
        "--architecture".into(),
        oci_arch().into(),
    ];
    let mut labels = vec![
        ("org.opencontainers.image.title", "ztunnel".to_string()),
        ("org.opencontainers.image.version", spec.tag.clone()),
        ("org.opencontainers.image.source", spec.source.clone()),
        (
            "org.opencontainers.image.licenses",
            "Apache-2.0".to_string(),
        ),
    ];
    if let Some(rev) = &spec.revision {
        labels.push(("org.opencontainers.image.revision", rev.clone()));
    }
    for (k, v) in &labels {
        config.push("--config.label".into());
        config.push(format!("{k}={v}"));
        config.push("--manifest.annotation".into());
        config.push(format!("{k}={v}"));
    }
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    umoci(&config)?;
    umoci(&["gc", "--layout", &layout.to_string_lossy()])?;
    drop(work);

    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar of {} failed ({status})", layout.display());
    }
    files.sort();
    Ok(BuiltImage {
        layout,
        archive,
        tag: spec.tag.clone(),
        files,
    })
}

/// Unpacks `image` (`<layout>:<tag>`) into the runtime bundle `bundle` (`rootfs/`,
/// `config.json`).
pub fn unpack(image: &str, bundle: &Path) -> Result<()> {
    umoci(&["unpack", "--image", image, &bundle.to_string_lossy()])
}

/// The image configuration (`config` of the OCI image config blob) of the layout's `tag`.
pub fn image_config(layout: &Path, tag: &str) -> Result<Value> {
    let read = |p: PathBuf| -> Result<Value> {
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let blob = |digest: &str| {
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        layout.join("blobs").join(alg).join(hex)
    };
    let index = read(layout.join("index.json"))?;
    let manifest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("no tag {tag} in {}", layout.display()))?;
    let manifest = read(blob(manifest["digest"].as_str().unwrap_or_default()))?;
    let config = read(blob(
        manifest["config"]["digest"].as_str().unwrap_or_default(),
    ))?;
    Ok(config)
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn umoci(args: &[&str]) -> Result<()> {
    let out = Command::new("umoci")
        .args(args)
        .output()
        .context("running umoci")?;
    if !out.status.success() {
        bail!(
            "umoci {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        let libs = parse_ldd(text).expect("parses");
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
