//! The `profile` scenario: `perf record` of the data plane during a transfer and the top of
//! `perf report`; `bench waypoint` profiles through the same two steps.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Pod;

use super::{probe, Dataplane, Mode, Opts, IPERF_PORT};

/// `perf record` of all data-plane processes during a single-stream transfer; returns the
/// top of `perf report` by symbol.
pub(super) fn run_profile(o: &Opts, dp: &Dataplane, client: &Pod, server: &Pod) -> Result<String> {
    let data = crate::target_dir()?.join("bench").join("perf.data");
    std::fs::create_dir_all(data.parent().context("perf.data path")?)?;
    let port = IPERF_PORT + Mode::Ambient.port_offset();
    let child = probe::iperf_spawn(client, &server.ip.to_string(), port, 1, o.secs)?;
    std::thread::sleep(Duration::from_millis(500));
    let rec = perf_record(&dp.pids, &data, (o.secs - 1.0).max(1.0));
    probe::iperf_result(child)?;
    rec?;
    perf_top(&data, 40)
}

/// `perf record -g` (cpu-clock, 999 Hz) of `pids` for `secs` into `data`.
pub(super) fn perf_record(pids: &[u32], data: &std::path::Path, secs: f64) -> Result<()> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let rec = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
        .arg(pids.join(","))
        .arg("-o")
        .arg(data)
        .args(["--", "sleep", &format!("{secs}")])
        .output()
        .context("running perf record (apt linux-perf)")?;
    if !rec.status.success() {
        bail!("perf record: {}", String::from_utf8_lossy(&rec.stderr));
    }
    Ok(())
}

/// The first `lines` of `perf report --sort dso,symbol` (no call graphs) of `data`.
pub(super) fn perf_top(data: &std::path::Path, lines: usize) -> Result<String> {
    let rep = Command::new("perf")
        .arg("report")
        .arg("-i")
        .arg(data)
        .args(["--stdio", "--no-children", "--sort", "dso,symbol"])
        .args(["--percent-limit", "1", "-g", "none"])
        .output()
        .context("running perf report")?;
    let text = String::from_utf8_lossy(&rep.stdout);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        // `-g none` leaves empty call-graph columns ("-  -") at the end of each line.
        .map(|l| l.trim_end().trim_end_matches(['-', ' ']))
        .take(lines)
        .collect::<Vec<_>>()
        .join("\n"))
}
