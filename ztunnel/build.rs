//! Compiles the eBPF programs (`ebpf/*.bpf.c`) with clang into `OUT_DIR/<name>.bpf.o`, which
//! `src/capture` embeds with `include_bytes_aligned!`.
//!
//! The build fails (never silently skips) when clang or the headers are missing: a daemon
//! without its capture programs would start and quietly capture nothing.
//!
//! Environment:
//! - `CLANG`: the clang binary (default `clang`);
//! - `ZTUNNEL_EBPF_DIR`: where the `*.bpf.c` files are (default `<crate>/../ebpf`; lets a crate
//!   outside the workspace reuse this build script);
//! - `ZTUNNEL_LINK_ORDER=off`: link a release daemon without `link-order.txt` (see
//!   [`link_order`]; needed only with a linker other than LLD).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(msg) = run() {
        // A panic message is what cargo shows most prominently for a failed build script.
        panic!("\n\nztunnel build: {msg}\n\n");
    }
}

fn run() -> Result<(), String> {
    link_order();
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=ZTUNNEL_EBPF_DIR");

    let manifest_dir =
        env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?;
    let ebpf_dir = match env::var_os("ZTUNNEL_EBPF_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(&manifest_dir).join("..").join("ebpf"),
    };
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());

    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&ebpf_dir)
        .map_err(|e| {
            format!(
                "cannot read eBPF source directory {}: {e}",
                ebpf_dir.display()
            )
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no *.bpf.c files in {}", ebpf_dir.display()));
    }
    // Headers next to the programs (shared definitions) also trigger a rebuild.
    if let Ok(entries) = std::fs::read_dir(&ebpf_dir) {
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.extension().is_some_and(|x| x == "h") {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }

    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "`{clang} --version` failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => {
            return Err(format!(
                "clang is required to compile the eBPF capture programs in {} but `{clang}` \
                 could not be run ({e}).\nInstall it: apt-get install -y clang libbpf-dev \
                 (or set CLANG=/path/to/clang)",
                ebpf_dir.display()
            ))
        }
    }

    // Debian keeps <asm/types.h> (pulled in by <linux/bpf.h>) under the multiarch directory.
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_string());
    let multiarch = match target_arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        other => other,
    };

    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let file = src
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(|| format!("bad file name {}", src.display()))?;
        let stem = file.trim_end_matches(".c");
        let obj = out_dir.join(format!("{stem}.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg("-I")
            .arg(&ebpf_dir)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&obj)
            .output()
            .map_err(|e| format!("running {clang}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "compiling {} with clang failed ({}).\nIf headers such as <bpf/bpf_helpers.h> or \
                 <asm/types.h> are missing: apt-get install -y libbpf-dev linux-libc-dev\n{}",
                src.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let warnings = String::from_utf8_lossy(&output.stderr);
        for line in warnings.lines().filter(|l| !l.trim().is_empty()) {
            println!("cargo:warning={line}");
        }
    }
    Ok(())
}

/// Lays out the code a running daemon uses together at the start of its `.text`.
///
/// The daemon drops its code pages once it is ready (`memory::release_startup_memory`); what
/// it runs afterwards faults back in, and the kernel maps the 64 KiB around each fault.
/// Scattered over 11 MiB of code, the few hundred functions an idle or serving daemon runs
/// kept more than half of `.text` resident. `link-order.txt` lists them
/// (mangled, in first-use order; `cargo xtask link-order` regenerates it), and LLD's
/// `--symbol-ordering-file` places them first. Names it no longer finds only cost the layout,
/// never the link: LLD is told not to warn about them. Release builds of the `ztunnel` binary
/// for x86-64 Linux only, the target whose default linker is LLD.
fn link_order() {
    println!("cargo:rerun-if-env-changed=ZTUNNEL_LINK_ORDER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld_target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = env::var("ZTUNNEL_LINK_ORDER").is_ok_and(|v| v == "off");
    let Ok(manifest_dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let file = Path::new(&manifest_dir).join("link-order.txt");
    if release && lld_target && !off && file.exists() {
        println!("cargo:rerun-if-changed={}", file.display());
        println!(
            "cargo:rustc-link-arg-bin=ztunnel=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,--no-warn-symbol-ordering");
    }
}
