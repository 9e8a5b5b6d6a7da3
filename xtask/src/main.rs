//! `cargo xtask <command>`: project automation that needs more than a cargo invocation.
//!
//! - `test [cargo-test-args] [-- test-binary-args]`: as root, install the system packages the
//!   tests need (only the missing ones), build everything, run the whole test suite.
//! - `demo [--once]`: build, start a two-node demo cluster, drive traffic through it and print
//!   a report with PASS/FAIL checks; then keep it running for poking until Ctrl-C (or, with
//!   `--once`, tear down and exit non-zero if a check failed).
//! - `bench [scenario...] [--runs N] [--secs S] [--rate R] [--conns K]`: direct vs ambient vs Envoy
//!   sidecars on the test cluster (docs/BENCHMARKS.md).
//! - `bench waypoint [--rounds N] [--secs S] [--concurrency K] [--profile] [--no-build]`: the
//!   L7 hop, this project's waypoint vs Envoy as the same waypoint: HTTP/1.1 and HTTP/2
//!   requests/s, p50/p99, memory.
//! - `overhead [--pods N] [--secs S] [--rate R]`: N pods per node in sidecar and in ambient
//!   mode under the same load: memory, CPU, added latency; table, JSON and SVG chart.
//! - `soak [--minutes N] [--rate R]`: a two-node cluster under steady connection churn and long
//!   transfers for N minutes; passes when no connection failed and both daemons' descriptors
//!   and memory stay flat (docs/RELIABILITY.md, "Soak").
//! - `image [--debug]`: the daemon's OCI image with umoci, under `<target>/image/`.
//! - `fuzz TARGET [--secs N]`, `fuzz --list`: a libFuzzer target of `ztunnel/fuzz/` with
//!   cargo-fuzz on the nightly toolchain (docs/RELIABILITY.md, "Fuzzing").
//! - `link-order [--rounds N]`: the functions a ready daemon runs, from the demo under `perf`,
//!   into `ztunnel/link-order.txt`, which the release link lays out together.

mod bench;
mod demo;
mod demo_up;
mod demo_waypoint;
mod fuzz;
mod image;
mod interrupt;
mod link_order;
mod test;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

fn main() -> ExitCode {
    // Before any thread exists: changing the environment is not thread-safe.
    forget_cargo_run_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The commands that build clusters clean up after Ctrl-C or SIGTERM at any point.
    if matches!(
        args.first().map(String::as_str),
        Some("demo" | "bench" | "overhead" | "scale" | "soak")
    ) {
        if let Err(e) = interrupt::install() {
            eprintln!("xtask: error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match args.split_first() {
        Some((cmd, rest)) => match cmd.as_str() {
            "test" => test::run(rest),
            "demo" => demo::run(rest),
            "bench" => bench::run(rest),
            "overhead" => bench::overhead(rest),
            "scale" => bench::scale(rest),
            "soak" => bench::soak(rest),
            "image" => image::run(rest),
            "fuzz" => fuzz::run(rest),
            "link-order" => link_order::run(rest),
            "help" | "-h" | "--help" => {
                usage();
                Ok(true)
            }
            other => {
                usage();
                Err(anyhow::anyhow!("unknown command `{other}`"))
            }
        },
        None => {
            usage();
            Ok(false)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage() {
    eprintln!(
        "usage: cargo xtask <command>\n\
         \n  test [cargo-test-args] [-- test-args]   install test tools, build, run all tests (root)\
         \n  demo [--kube] [--once|--up|--down]      run the demo cluster and its checks (root); --up leaves it\
         \n                                          running in the background, --down removes it\
         \n  bench [throughput|latency|connrate|conns|profile...] [--runs N] [--secs S] [--rate R] [--conns K]\
         \n                                          direct vs ambient vs Envoy sidecars (root)\
         \n  bench waypoint [--rounds N] [--secs S] [--concurrency K] [--profile] [--no-build]\
         \n                                          the waypoint vs Envoy as the L7 hop (root)\
         \n  overhead [--pods N] [--secs S] [--rate R]\
         \n                                          sidecar vs ambient cost at N pods/node (root)\
         \n  soak [--minutes N] [--rate R]           N minutes of churn + long transfers; descriptors and\
         \n                                          memory of both daemons must stay flat (root)\
         \n  image [--debug]                         OCI image of the release (or debug) binary under target/image/ (root)\
         \n  fuzz TARGET [--secs N] | fuzz --list    run a fuzz target of ztunnel/fuzz/ (nightly, cargo-fuzz)\
         \n  link-order [--rounds N]                 regenerate ztunnel/link-order.txt, the release daemon's\
         \n                                          code layout, from the demo under perf (root)"
    );
}

/// The cargo that runs us (so toolchain overrides carry over).
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Forgets the variables `cargo run` set for this binary (`CARGO_PKG_NAME=xtask`,
/// `CARGO_MANIFEST_DIR`, ...), so that the commands it starts do not inherit them. Build
/// scripts such as ring's rerun when those change: a build started from here would otherwise
/// rebuild such dependencies, and the next plain `cargo build` would rebuild them again.
fn forget_cargo_run_env() {
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            std::env::remove_var(name);
        }
    }
}

/// Runs a command, failing unless it exits 0.
fn run_status(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Cargo's target directory, as cargo itself resolves it (CARGO_TARGET_DIR, config, default).
fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(mesh_tests::workspace_root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata")?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// Points the harness at the binaries of this build (read by `mesh_tests::*_bin`).
fn binaries_env(cmd: &mut Command) -> Result<()> {
    let debug = target_dir()?.join("debug");
    cmd.env("ZTUNNEL_BIN", debug.join("ztunnel"))
        .env("MESHAPP_BIN", debug.join("meshapp"))
        .env("MESHHTTP_BIN", debug.join("meshhttp"))
        .env("WAYPOINT_BIN", debug.join("waypoint"))
        .env("ZTUNNEL_CNI_BIN", debug.join("ztunnel-cni"));
    Ok(())
}
