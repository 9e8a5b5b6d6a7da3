//! `cargo xtask link-order [--rounds N]`: regenerates `ztunnel/link-order.txt`, the functions
//! a ready daemon runs, which the release link places together at the start of `.text`
//! (`ztunnel/build.rs`, `link_order`).
//!
//! A round builds the release daemon with the current list, runs the demo (`demo --once`:
//! two nodes, every kind of traffic, admin and metrics requests) under `perf record`, and
//! appends the daemon functions whose code faulted in after the daemon dropped its start-up
//! code pages (the `madvise` of `memory::release_startup_memory`). A fault shows only the
//! first function touched in the 64 KiB the kernel maps around it, so functions next to one
//! already listed stay hidden until the listed ones move away: each round finds the next
//! layer, and the command stops when a round adds fewer than [`SETTLED`] names. Names the
//! build no longer has (renamed or inlined functions, another toolchain's hashes) are dropped.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A round that adds fewer new names than this leaves the layout as good as it gets.
const SETTLED: usize = 5;

/// `madvise` lengths at least this large are the daemon's release of its code pages (the
/// allocator's own `madvise` calls return a few pages of heap at a time).
const RELEASE_LEN: u64 = 1 << 20;

/// `cargo xtask link-order [--rounds N]` (module doc); `Ok(true)` once the list is written.
pub fn run(args: &[String]) -> Result<bool> {
    let mut rounds = 3;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                let v = it.next().context("--rounds needs a value")?;
                rounds = v.parse().with_context(|| format!("--rounds `{v}`"))?;
            }
            other => {
                bail!("unknown argument `{other}` (usage: cargo xtask link-order [--rounds N])")
            }
        }
    }
    mesh_tests::require_root()?;
    crate::test::install_packages(&["linux-perf", "binutils"])?;
    let root = mesh_tests::workspace_root();
    let list = root.join("ztunnel").join("link-order.txt");
    let data = crate::target_dir()?.join("link-order.perf.data");
    for round in 1..=rounds {
        let bin = crate::bench::build_release()?.join("ztunnel");
        let defined = defined_functions(&bin)?;
        // The listed names this build still has: the ones it laid out.
        let mut kept: Vec<String> = std::fs::read_to_string(&list)
            .unwrap_or_default()
            .lines()
            .filter(|s| defined.contains(*s))
            .map(str::to_string)
            .collect();
        record(&bin, &data)?;
        let seen = faulted_after_release(&data, &bin)?;
        let known: HashSet<String> = kept.iter().cloned().collect();
        let new: Vec<String> = seen.into_iter().filter(|s| !known.contains(s)).collect();
        let added = new.len();
        println!(
            "link-order: round {round}: {} listed names in this build, {added} new",
            kept.len()
        );
        kept.extend(new);
        let mut text = kept.join("\n");
        text.push('\n');
        std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
        if added < SETTLED {
            break;
        }
    }
    let _ = std::fs::remove_file(&data);
    println!(
        "link-order: {} written; rebuild the release daemon to use it",
        list.display()
    );
    Ok(true)
}

/// The names of the functions in `bin`'s symbol table.
fn defined_functions(bin: &Path) -> Result<HashSet<String>> {
    let out = Command::new("nm")
        .args(["--defined-only"])
        .arg(bin)
        .output()
        .context("running nm (binutils)")?;
    if !out.status.success() {
        bail!(
            "nm {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, kind, name) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_string())
        })
        .collect())
}

/// Runs the demo with the release daemon `bin` while `perf` records every page fault (with
/// its address) and every `madvise` on the machine into `data`.
fn record(bin: &Path, data: &Path) -> Result<()> {
    let xtask = std::env::current_exe().context("this program's path")?;
    // The demo builds its debug binaries first; build them outside the recording.
    crate::demo::build()?;
    crate::run_status(
        Command::new("perf")
            .args(["record", "-q", "-a", "-d", "-c", "1", "-e", "page-faults"])
            .args(["-e", "syscalls:sys_enter_madvise", "-o"])
            .arg(data)
            .arg("--")
            .arg(xtask)
            .args(["demo", "--once"])
            .env("ZTUNNEL_BIN", bin),
    )
}

/// Functions of `bin` whose code faulted in after their process released its code pages, in
/// the order they first did.
fn faulted_after_release(data: &Path, bin: &Path) -> Result<Vec<String>> {
    let out = Command::new("perf")
        .args(["script", "--no-demangle", "-i"])
        .arg(data)
        .args(["-F", "sw:pid,time,addr,ip,sym,dso"])
        .args(["-F", "trace:pid,time,trace"])
        .output()
        .context("running perf script")?;
    if !out.status.success() {
        bail!("perf script: {}", String::from_utf8_lossy(&out.stderr));
    }
    let bin = bin.canonicalize().unwrap_or_else(|_| PathBuf::from(bin));
    parse_script(&String::from_utf8_lossy(&out.stdout), &bin).with_context(|| {
        format!(
            "perf recorded no release of the daemon's code pages: did the demo start {}?",
            bin.display()
        )
    })
}

/// [`faulted_after_release`] on `perf script`'s text; `None` when no process of `bin`
/// released its code pages.
fn parse_script(text: &str, bin: &Path) -> Option<Vec<String>> {
    let dso = format!("({})", bin.display());
    let mut released: HashMap<&str, f64> = HashMap::new();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(pid), Some(time)) = (f.next(), f.next()) else {
            continue;
        };
        let Ok(time) = time.trim_end_matches(':').parse::<f64>() else {
            continue;
        };
        let rest: Vec<&str> = f.collect();
        if let Some(len) = madvise_len(&rest) {
            if len >= RELEASE_LEN {
                released.insert(pid, time);
            }
            continue;
        }
        // A page fault: `addr addr-sym (addr-dso) ip sym (dso)`; kept when it is in the
        // daemon's own code after its release.
        let [addr, _, _, ip, sym, file] = rest[..] else {
            continue;
        };
        if file != dso || released.get(pid).is_none_or(|&t| time < t) {
            continue;
        }
        let (Ok(addr), Ok(ip)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(ip, 16))
        else {
            continue;
        };
        // An instruction fetch faults on the page of the instruction itself; a data fault
        // (constants, relocated pointers) names the code that read, not code to lay out.
        if addr >> 12 != ip >> 12 || sym == "[unknown]" {
            continue;
        }
        if seen.insert(sym.to_string()) {
            order.push(sym.to_string());
        }
    }
    (!released.is_empty()).then_some(order)
}

/// The length of a `syscalls:sys_enter_madvise` record (`start: 0x.., len_in: 0x.., ...`).
fn madvise_len(fields: &[&str]) -> Option<u64> {
    let i = fields.iter().position(|f| *f == "len_in:")?;
    let v = fields.get(i + 1)?.trim_end_matches(',');
    u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_faults_after_the_release_in_first_use_order() {
        let text = "\
 7  10.0: 55aa00001000 early (/t/ztunnel)     55aa00001000 early (/t/ztunnel)
 7  10.1: start: 0x7f0000002000, len_in: 0x00003000, behavior: 0x00000004
 7  10.2: start: 0x55aa00000000, len_in: 0x00b27000, behavior: 0x00000004
 7  10.3: 55aa00002010 hot (/t/ztunnel)     55aa00002000 hot (/t/ztunnel)
 7  10.4: 55aa00009000 [unknown] (/t/ztunnel)     55aa00002004 reads (/t/ztunnel)
 8  10.5: 55aa00003000 other (/t/ztunnel)     55aa00003000 other (/t/ztunnel)
 7  10.6: 7f0000005000 f (/usr/lib/libc.so.6)     7f0000005000 f (/usr/lib/libc.so.6)
 7  10.7: 55aa00004000 next (/t/ztunnel)     55aa00004000 next (/t/ztunnel)
 7  10.8: 55aa00002000 hot (/t/ztunnel)     55aa00002000 hot (/t/ztunnel)
";
        // Before the release, a small madvise, a data fault, another process that never
        // released, another file, and a repeat: none of them count.
        assert_eq!(
            parse_script(text, Path::new("/t/ztunnel")),
            Some(vec!["hot".to_string(), "next".to_string()])
        );
        assert_eq!(
            parse_script(text, Path::new("/t/other")).map(|v| v.len()),
            Some(0)
        );
        assert_eq!(parse_script(" 7  1.0: x\n", Path::new("/t/ztunnel")), None);
    }
}
