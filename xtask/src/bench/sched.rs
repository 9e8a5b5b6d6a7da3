//! The `sched` scenario: where a request's time goes at a fixed rate, hop by hop.
//!
//! At a fixed request rate every hop of a request finds its thread asleep, so a request's
//! latency is mostly wake-ups: each process on the path is woken by the previous one, waits to
//! be scheduled (on this kind of VM, an idle vCPU must first be woken by the hypervisor), runs
//! and wakes the next. `perf sched record` (all CPUs) catches every switch while `meshload rr
//! --rate` runs 64 B requests; `perf sched timehist` gives, for each time a thread ran, how
//! long it waited between its wake-up and running (`sch delay`) and how long it ran. Threads
//! are grouped by role: the client (`meshload`), the server (`meshapp`), and the data-plane
//! process of the client's side (`dp1`: node 1's daemon, or the client's sidecar) and of the
//! server's side (`dp2`). Reported per role: median and p99 scheduling delay, median run time
//! and runs per request (a hop that runs twice per request, once each way, shows 2).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Pod;

use super::probe;

/// One run of a thread, from `perf sched timehist`.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    comm: String,
    pid: u32,
    /// From wake-up to running, µs.
    delay_us: f64,
    /// Time on the CPU, µs.
    run_us: f64,
}

/// Parses one line of `perf sched timehist`:
/// `   79371.874569 [0011]  comm[tid/pid]   0.014   0.000   1.148` (times in ms). The task
/// name may contain spaces, so it is what lies between the CPU and the last three numbers.
fn parse_line(line: &str) -> Option<Run> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 6 || !fields[1].starts_with('[') {
        return None;
    }
    let n = fields.len();
    let num = |s: &str| s.parse::<f64>().ok();
    let (_wait, delay, run) = (
        num(fields[n - 3])?,
        num(fields[n - 2])?,
        num(fields[n - 1])?,
    );
    num(fields[0])?;
    let task = fields[2..n - 3].join(" ");
    let open = task.rfind('[')?;
    let ids = task[open + 1..].strip_suffix(']')?;
    let pid = ids.rsplit('/').next()?.parse().ok()?;
    Some(Run {
        comm: task[..open].to_string(),
        pid,
        delay_us: delay * 1e3,
        run_us: run * 1e3,
    })
}

/// The role of a run's thread on the request path, if it has one.
fn role(r: &Run, dp_pids: &[u32]) -> Option<String> {
    if let Some(i) = dp_pids.iter().position(|p| *p == r.pid) {
        return Some(format!("dp{}", i + 1));
    }
    if r.comm.starts_with("meshload") {
        return Some("client".into());
    }
    if r.comm.starts_with("meshapp") {
        return Some("server".into());
    }
    None
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Summaries per role, as `(metric, value)`.
fn summarize(runs: &[Run], dp_pids: &[u32], requests: f64) -> Vec<(String, f64)> {
    let mut by_role: BTreeMap<String, Vec<&Run>> = BTreeMap::new();
    for r in runs {
        if let Some(role) = role(r, dp_pids) {
            by_role.entry(role).or_default().push(r);
        }
    }
    let mut out = Vec::new();
    for (role, rs) in by_role {
        let mut delay: Vec<f64> = rs.iter().map(|r| r.delay_us).collect();
        let mut run: Vec<f64> = rs.iter().map(|r| r.run_us).collect();
        delay.sort_by(f64::total_cmp);
        run.sort_by(f64::total_cmp);
        out.push((
            format!("sched_{role}_delay_p50_us"),
            percentile(&delay, 0.5),
        ));
        out.push((
            format!("sched_{role}_delay_p99_us"),
            percentile(&delay, 0.99),
        ));
        out.push((format!("sched_{role}_run_p50_us"), percentile(&run, 0.5)));
        out.push((
            format!("sched_{role}_runs_per_req"),
            rs.len() as f64 / requests.max(1.0),
        ));
    }
    out
}

/// Runs 64 B requests at `rate` per second from `client` to `echo` for about `secs` and
/// records the scheduler meanwhile; `dp_pids` are the data-plane processes, client side
/// first. `data` is where perf writes (kept for `perf sched timehist -i` by hand).
pub fn hops(
    client: &Pod,
    echo: &str,
    secs: f64,
    rate: f64,
    dp_pids: &[u32],
    data: &std::path::Path,
) -> Result<Vec<(String, f64)>> {
    if let Some(dir) = data.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let load = probe::meshload_spawn(client, &probe::rr_args(echo, 64, secs + 1.5, Some(rate)))?;
    // The recording covers the middle of the load: past meshload's warm-up, before its end.
    std::thread::sleep(Duration::from_millis(800));
    let recorded = Command::new("perf")
        .args(["sched", "record", "-a", "-o"])
        .arg(data)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running perf sched record (linux-perf)")?;
    probe::meshload_result(load)?;
    if !recorded.status.success() {
        bail!(
            "perf sched record: {}",
            String::from_utf8_lossy(&recorded.stderr).trim()
        );
    }
    let hist = Command::new("perf")
        .args(["sched", "timehist", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("running perf sched timehist")?;
    if !hist.status.success() {
        bail!("perf sched timehist failed on {}", data.display());
    }
    let text = String::from_utf8_lossy(&hist.stdout);
    let runs: Vec<Run> = text.lines().filter_map(parse_line).collect();
    if runs.is_empty() {
        bail!("perf sched timehist gave no runs for {}", data.display());
    }
    Ok(summarize(&runs, dp_pids, rate * secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timehist_lines_are_read_from_both_ends() {
        let r =
            parse_line("   79371.874569 [0001]  ztunnel-dp-0[4242/4200]   0.014   0.031   0.009")
                .expect("a run");
        assert_eq!(
            r,
            Run {
                comm: "ztunnel-dp-0".into(),
                pid: 4200,
                delay_us: 31.0,
                run_us: 9.0
            }
        );
        let r = parse_line("  5.000001 [0000]  kworker/u8:1-ev[77]  0.100  0.002  0.050")
            .expect("single-threaded task");
        assert_eq!((r.comm.as_str(), r.pid), ("kworker/u8:1-ev", 77));
        let r = parse_line("  5.1 [0000]  Web Content[10/9]  1.0  0.5  0.25").expect("spaces");
        assert_eq!(r.comm, "Web Content");
        assert!(
            parse_line("           time    cpu  task name   wait time  sch delay   run time")
                .is_none()
        );
        assert!(parse_line("--------------- ------  ------").is_none());
    }

    #[test]
    fn runs_are_summarized_per_role() {
        let run = |comm: &str, pid, delay_us, run_us| Run {
            comm: comm.into(),
            pid,
            delay_us,
            run_us,
        };
        let runs = [
            run("meshload", 1, 0.0, 5.0),
            run("ztunnel-dp-0", 10, 40.0, 8.0),
            run("ztunnel-dp-0", 10, 20.0, 6.0),
            run("ztunnel-dp-1", 20, 30.0, 7.0),
            run("swapper", 0, 0.0, 100.0),
        ];
        let m: BTreeMap<String, f64> = summarize(&runs, &[10, 20], 1.0).into_iter().collect();
        assert_eq!(m["sched_dp1_delay_p50_us"], 20.0);
        assert_eq!(m["sched_dp1_delay_p99_us"], 40.0);
        assert_eq!(m["sched_dp1_runs_per_req"], 2.0);
        assert_eq!(m["sched_dp2_run_p50_us"], 7.0);
        assert_eq!(m["sched_client_runs_per_req"], 1.0);
        assert!(!m.keys().any(|k| k.contains("swapper")));
    }
}
