//! `cargo xtask fuzz TARGET [--secs N]` and `cargo xtask fuzz --list`: the libFuzzer targets of
//! `ztunnel/fuzz/` (the parsers fed by the network or by users), run with cargo-fuzz on the
//! nightly toolchain. The product stays on stable; only this command needs nightly.
//!
//! Each run reads the checked-in seeds (`ztunnel/fuzz/seeds/TARGET/`, small real inputs) and a
//! working corpus that grows between runs (`ztunnel/fuzz/corpus/TARGET/`, not checked in). A
//! crash stops the run; libFuzzer writes the input under `ztunnel/fuzz/artifacts/TARGET/`.
//! The last line printed is the run's summary: the figures docs/RELIABILITY.md records.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: fuzz TARGET [--secs N] | fuzz --list";
/// Default run length: long enough to get past the seeds' neighbourhood.
const DEFAULT_SECS: u64 = 60;

fn fuzz_dir() -> PathBuf {
    mesh_tests::workspace_root().join("ztunnel").join("fuzz")
}

/// The targets (`fuzz_targets/*.rs`) with the first line of each one's doc comment.
fn targets(dir: &Path) -> Result<Vec<(String, String)>> {
    let src = dir.join("fuzz_targets");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let (Some(stem), Some("rs")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let about = text
            .lines()
            .find_map(|l| l.strip_prefix("//! "))
            .unwrap_or("")
            .to_string();
        out.push((stem.to_string(), about));
    }
    out.sort();
    Ok(out)
}

pub fn run(args: &[String]) -> Result<bool> {
    let dir = fuzz_dir();
    let mut target = None;
    let mut secs = DEFAULT_SECS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--list" => {
                for (name, about) in targets(&dir)? {
                    println!("{name:16} {about}");
                }
                return Ok(true);
            }
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("--secs needs a number of seconds ({USAGE})"))?;
            }
            other if other.starts_with('-') => bail!("fuzz: unknown argument `{other}` ({USAGE})"),
            other if target.is_none() => target = Some(other.to_string()),
            other => bail!("fuzz: one target at a time, got `{other}` too ({USAGE})"),
        }
    }
    let Some(target) = target else {
        bail!("fuzz: which target? ({USAGE}; `cargo xtask fuzz --list` names them)");
    };
    let known = targets(&dir)?;
    if !known.iter().any(|(n, _)| *n == target) {
        let names: Vec<&str> = known.iter().map(|(n, _)| n.as_str()).collect();
        bail!("fuzz: no target `{target}` (targets: {})", names.join(", "));
    }
    require_nightly()?;
    ensure_cargo_fuzz()?;

    let corpus = dir.join("corpus").join(&target);
    let seeds = dir.join("seeds").join(&target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = nightly_cargo();
    // Release with debug assertions and overflow checks: fast, and an overflow is a finding.
    cmd.args(["fuzz", "run", "--fuzz-dir"])
        .arg(&dir)
        .args(["-O", "-a", &target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg("-print_final_stats=1")
        .current_dir(&dir)
        .stderr(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting cargo fuzz")?;
    let mut executions = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading cargo fuzz output")?;
            eprintln!("{line}");
            if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
                executions = v.trim().parse::<u64>().ok();
            }
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    let files = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let crashes = files(&dir.join("artifacts").join(&target));
    println!(
        "fuzz {target}: {:.0} s, {} executions, corpus {} files (+{} seeds), {} crash artifacts, {}",
        started.elapsed().as_secs_f64(),
        executions.map_or("?".to_string(), |n| n.to_string()),
        files(&corpus),
        files(&seeds),
        crashes,
        if status.success() { "no crash" } else { "FAILED" },
    );
    Ok(status.success())
}

/// `cargo +nightly` through rustup, without the variables of the stable cargo that runs us:
/// build scripts declare some of them (`CARGO_PKG_*`, `CARGO_MANIFEST_DIR`) as inputs, so
/// passing `cargo run`'s values on would rebuild the whole instrumented tree on every run.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly");
    for (var, _) in std::env::vars_os() {
        let Some(name) = var.to_str() else { continue };
        let ours = (name.starts_with("CARGO_") && name != "CARGO_HOME")
            || ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN"].contains(&name);
        if ours {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn require_nightly() -> Result<()> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (the fuzz targets need rustup's nightly toolchain)")?;
    let list = String::from_utf8_lossy(&out.stdout);
    if !list.lines().any(|l| l.starts_with("nightly")) {
        bail!("fuzz: no nightly toolchain (rustup toolchain list: {list:?}); install it with `rustup toolchain install nightly`");
    }
    Ok(())
}

/// Installs cargo-fuzz when `cargo fuzz` is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        super::run_status(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    Ok(())
}
