//! The `conns` and `stalled` scenarios: connections held open (idle, or stalled with both
//! directions full) while the data plane's memory is sampled, per connection.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Pod;
use serde_json::Value;

use super::measure::num;
use super::{probe, push, Dataplane, Mode, Opts, Samples};

/// Flows the `stalled` scenario holds.
const STALLED_FLOWS: usize = 16;

/// What `held_connections` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// `conns`: this many idle connections.
    Idle(usize),
    /// `stalled`: [`STALLED_FLOWS`] flows whose client writes until the path takes no more
    /// and never reads the echo, so the echo server stops reading too: both directions of
    /// every flow hold what each hop lets them.
    Stalled,
}

/// `conns`: what an open, idle connection costs the data plane. `--conns` connections are
/// opened (256 KiB echoed on each, so they have carried data) and held; memory of the
/// data-plane processes is sampled half-way through the hold and compared with just before,
/// per connection. Connections that failed to open or stopped carrying data while held are
/// counted (`conns_failed`, `conns_lost`); the report checks both are 0.
///
/// `holders` are (client pod, echo address) pairs sharing the connections. In ambient mode
/// there are two, one each way between the nodes, so that each daemon terminates half and
/// stays well inside the common limit of 20,000 open files (a daemon holds a descriptor per
/// inbound flow and keeps 2,048 free). The memory per connection (both nodes summed) is the
/// same either way.
///
/// `stalled` ([`Hold::Stalled`]) reports the same per flow as `stalled_mem_per_conn_*_kb`,
/// and the bytes each client got the path to take before it stopped, `stalled_taken_mib`.
pub(super) fn held_connections(
    o: &Opts,
    mode: Mode,
    dp: &Dataplane,
    holders: &[(&Pod, String)],
    hold_kind: Hold,
    s: &mut Samples,
) -> Result<()> {
    use std::io::BufRead;
    let hold = o.secs.max(3.0);
    let mem_all =
        || -> Result<Vec<probe::Mem>> { dp.pids.iter().map(|&p| probe::mem(p)).collect() };
    let before = mem_all()?;
    let (conns, stall) = match hold_kind {
        Hold::Idle(n) => (n, false),
        Hold::Stalled => (STALLED_FLOWS, true),
    };
    let n = holders.len().max(1);
    let mut running = Vec::new();
    for (i, (pod, echo)) in holders.iter().enumerate() {
        let share = conns / n + usize::from(i < conns % n);
        let mut args: Vec<String> = [
            "hold",
            "--to",
            echo,
            "--conns",
            &share.to_string(),
            "--secs",
            &hold.to_string(),
        ]
        .map(String::from)
        .into();
        if stall {
            args.extend([
                "--stall".to_string(),
                "--bytes".to_string(),
                "1024".to_string(),
            ]);
        }
        let mut child = probe::meshload_spawn(pod, &args)?;
        let out = std::io::BufReader::new(child.stdout.take().context("meshload stdout")?);
        running.push((child, out));
    }
    let (mut open_secs, mut taken): (f64, f64) = (0.0, 0.0);
    for (child, out) in &mut running {
        let mut first = String::new();
        out.read_line(&mut first).context("reading meshload")?;
        let opened: Value = match serde_json::from_str(first.trim()) {
            Ok(v) => v,
            Err(_) => {
                // It failed before all were open: its error is on stderr.
                let _ = child.wait();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "meshload hold ended before opening its connections: {}",
                    err.trim()
                );
            }
        };
        open_secs = open_secs.max(num(&opened, "open_secs")?);
        taken += num(&opened, "stalled_bytes")?;
    }
    std::thread::sleep(Duration::from_secs_f64(hold / 2.0));
    let during = mem_all()?;
    let (mut failed, mut lost, mut last_error) = (0.0, 0.0, Value::Null);
    for (mut child, mut out) in running {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).context("reading meshload")?;
        let status = child.wait().context("waiting for meshload")?;
        let v: Value = rest
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("meshload hold ({status}) printed no result: {rest}"))?;
        failed += num(&v, "failed")?;
        lost += num(&v, "lost")?;
        if v["last_error"].as_str().is_some_and(|e| !e.is_empty()) {
            last_error = v["last_error"].clone();
        }
    }
    if failed > 0.0 || lost > 0.0 {
        eprintln!(
            "bench: {} path: {failed} of {} connections failed to open and {lost} held ones were \
             lost (last error: {last_error})",
            mode.name(),
            conns,
        );
    }
    let prefix = if stall { "stalled_" } else { "" };
    if stall {
        push(s, mode, "stalled_failed", failed);
        push(s, mode, "stalled_lost", lost);
        push(
            s,
            mode,
            "stalled_taken_mib",
            taken / conns as f64 / 1048576.0,
        );
    } else {
        push(s, mode, "conns_open_s", open_secs);
        push(s, mode, "conns_failed", failed);
        push(s, mode, "conns_lost", lost);
    }
    let sum = |m: &[probe::Mem]| m.iter().fold(probe::Mem::default(), |a, &b| a + b);
    let (during_all, before_all) = (sum(&during), sum(&before));
    // MiB over all processes -> KiB per connection.
    for (kind, now, then) in [
        ("rss", during_all.rss, before_all.rss),
        ("anon", during_all.anon, before_all.anon),
        ("pss", during_all.pss, before_all.pss),
    ] {
        let per_conn = (now - then) * 1024.0 / conns as f64;
        push(
            s,
            mode,
            &format!("{prefix}mem_per_conn_{kind}_kb"),
            per_conn,
        );
    }
    if stall {
        return Ok(());
    }
    // Each process on its own (for the daemons, N is the node).
    for (i, (d, b)) in during.iter().zip(&before).enumerate() {
        push(s, mode, &format!("mem_held_rss_mb_{}", i + 1), d.rss);
        push(s, mode, &format!("mem_held_anon_mb_{}", i + 1), d.anon);
        push(
            s,
            mode,
            &format!("mem_before_hold_anon_mb_{}", i + 1),
            b.anon,
        );
    }
    Ok(())
}
