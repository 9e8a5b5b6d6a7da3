//! Measurements: data-plane process CPU and memory from `/proc`, and the load tools (iperf3
//! for bulk throughput, `meshload` for request/response and connection rate) run in pods.

use std::process::{Child, Stdio};

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Pod;
use serde_json::Value;

/// Linux reports utime/stime in USER_HZ ticks, which is 100 on every architecture we run on.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (did the process exit?)"))?;
    // Fields after the `(comm)` which may contain spaces: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {i}"))
    };
    Ok((ticks(14)? + ticks(15)?) / USER_HZ)
}

/// Sum of [`cpu_secs`] over processes.
pub fn cpu_total(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_secs(p)).sum()
}

/// Machine-wide CPU time and context switches (`/proc/stat`). How much of the machine a path
/// leaves idle while it moves bulk data tells whether it is CPU-bound or waiting on something
/// else (what it waits on is in docs/BENCHMARKS.md: not the wake-ups, as was first thought).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SystemCpu {
    /// Ticks spent running anything (user, system, interrupts, steal).
    busy: f64,
    /// Ticks idle (idle + iowait).
    idle: f64,
    /// Context switches since boot.
    ctxt: f64,
}

impl SystemCpu {
    /// Idle share of all CPUs since `earlier`, in percent.
    pub fn idle_pct_since(&self, earlier: &SystemCpu) -> f64 {
        let idle = self.idle - earlier.idle;
        let total = idle + self.busy - earlier.busy;
        if total > 0.0 {
            idle / total * 100.0
        } else {
            f64::NAN
        }
    }

    /// Context switches since `earlier`.
    pub fn switches_since(&self, earlier: &SystemCpu) -> f64 {
        self.ctxt - earlier.ctxt
    }
}

/// Reads [`SystemCpu`] now.
pub fn system_cpu() -> Result<SystemCpu> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

fn parse_proc_stat(text: &str) -> Result<SystemCpu> {
    let nums = |line: &str| -> Vec<f64> {
        line.split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let cpu = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(nums)
        .context("/proc/stat has no `cpu` line")?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    if cpu.len() < 8 {
        bail!(
            "/proc/stat `cpu` line has {} fields, expected 8 or more",
            cpu.len()
        );
    }
    let ctxt = text
        .lines()
        .find(|l| l.starts_with("ctxt "))
        .map(nums)
        .and_then(|v| v.first().copied())
        .context("/proc/stat has no `ctxt` line")?;
    Ok(SystemCpu {
        busy: cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu[7],
        idle: cpu[3] + cpu[4],
        ctxt,
    })
}

/// Memory of one process in MiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// Resident set.
    pub rss: f64,
    /// Resident anonymous memory (heap, stacks): what the process itself costs.
    pub anon: f64,
    /// Proportional set size: shared pages (the binary) divided among their users.
    pub pss: f64,
}

impl std::ops::Add for Mem {
    type Output = Mem;
    fn add(self, o: Mem) -> Mem {
        Mem {
            rss: self.rss + o.rss,
            anon: self.anon + o.anon,
            pss: self.pss + o.pss,
        }
    }
}

/// Reads `/proc/<pid>/smaps_rollup` (Rss, Pss, Anonymous).
pub fn mem(pid: u32) -> Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let kb = |key: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/smaps_rollup has no `{key}`"))
    };
    Ok(Mem {
        rss: kb("Rss:")? / 1024.0,
        anon: kb("Anonymous:")? / 1024.0,
        pss: kb("Pss:")? / 1024.0,
    })
}

/// The allocator's heap of the daemon on `node` (MiB): `(in use, free)` from its
/// `ztunnel_heap_bytes` gauges on the metrics port; NaN where the scrape or the gauge failed.
pub fn heap(cluster: &mesh_tests::cluster::Cluster, node: usize) -> (f64, f64) {
    let text = mesh_tests::testkit::node_http(cluster, node, 15020, "GET", "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let mib = |state: &str| heap_gauge(&text, state).map_or(f64::NAN, |b| b / 1048576.0);
    (mib("in_use"), mib("free"))
}

/// `ztunnel_heap_bytes{state="<state>"}` of a Prometheus text, in bytes.
fn heap_gauge(metrics: &str, state: &str) -> Option<f64> {
    let prefix = format!("ztunnel_heap_bytes{{state=\"{state}\"}} ");
    let line = metrics.lines().find(|l| l.starts_with(&prefix))?;
    line[prefix.len()..].trim().parse().ok()
}

/// Sum of [`mem`] over processes.
pub fn mem_total(pids: &[u32]) -> Result<Mem> {
    pids.iter()
        .map(|&p| mem(p))
        .try_fold(Mem::default(), |a, m| Ok(a + m?))
}

/// Starts `iperf3 -s` in a pod (killed when the child is dropped by the caller).
pub fn iperf_server(pod: &Pod, port: u16) -> Result<Child> {
    let child = pod
        .command("iperf3")
        .args(["-s", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    // iperf3 binds at once; give it a moment so the first client does not race it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok(child)
}

/// Starts an iperf3 client run (JSON output); finish with [`iperf_result`].
pub fn iperf_spawn(pod: &Pod, to: &str, port: u16, streams: u32, secs: f64) -> Result<Child> {
    pod.command("iperf3")
        .args(["-c", to, "-p", &port.to_string(), "-J"])
        .args(["-P", &streams.to_string(), "-t", &format!("{secs}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iperf3 -c")
}

/// Waits for an iperf3 client: (received bits per second, bytes received).
pub fn iperf_result(child: Child) -> Result<(f64, f64)> {
    let out = child.wait_with_output().context("waiting for iperf3")?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) => Ok((bps, bytes)),
        _ => bail!("iperf3 JSON lacks end.sum_received"),
    }
}

/// What iperf3 answers when a client arrives before its server has finished the previous test.
const IPERF_BUSY: &str = "server is busy running a test";

/// Runs `attempt` (one whole measurement around an iperf3 client) again, up to five times one
/// second apart, while it fails because the iperf3 server is still busy: through a data plane
/// the server may see the previous test's connections close a moment after the client did.
/// Each attempt starts its own counters, so a retried sample measures one transfer only.
pub fn retry_busy<T>(mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    for _ in 1..5 {
        match attempt() {
            Err(e) if format!("{e:#}").contains(IPERF_BUSY) => {
                eprintln!(
                    "bench: iperf3 server still busy with the previous test; retrying in 1 s"
                );
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            r => return r,
        }
    }
    attempt()
}

/// Starts `meshload <args>` in a pod; finish with [`meshload_result`].
pub fn meshload_spawn(pod: &Pod, args: &[String]) -> Result<Child> {
    pod.command(crate::bench::meshload_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshload")
}

/// Waits for meshload and parses its JSON report.
pub fn meshload_result(child: Child) -> Result<Value> {
    let out = child.wait_with_output().context("waiting for meshload")?;
    if !out.status.success() {
        bail!(
            "meshload failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("meshload JSON")
}

/// `meshload seal` on the host, one second: GB of payload per second that one thread seals
/// into TLS records as the daemons do.
pub fn tls_seal_gb_per_s() -> Result<f64> {
    let child = std::process::Command::new(crate::bench::meshload_bin())
        .args(["seal", "--secs", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshload seal")?;
    super::measure::num(&meshload_result(child)?, "gb_per_s")
}

/// `meshload crr` arguments: connections back to back, or with `rate` on a fixed schedule,
/// each timed.
pub fn crr_args(to: &str, secs: f64, rate: Option<f64>) -> Vec<String> {
    meshload_args("crr", to, &[], secs, rate)
}

/// `meshload rr` arguments.
pub fn rr_args(to: &str, size: usize, secs: f64, rate: Option<f64>) -> Vec<String> {
    meshload_args("rr", to, &["--size".into(), size.to_string()], secs, rate)
}

/// `meshload <kind> --to <to> <extra...> --secs <secs> [--rate <rate>]`.
fn meshload_args(
    kind: &str,
    to: &str,
    extra: &[String],
    secs: f64,
    rate: Option<f64>,
) -> Vec<String> {
    let mut a = vec![kind.to_string(), "--to".into(), to.into()];
    a.extend_from_slice(extra);
    a.extend(["--secs".into(), secs.to_string()]);
    if let Some(r) = rate {
        a.extend(["--rate".to_string(), r.to_string()]);
    }
    a
}

/// Median of samples (mean of the middle two for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_gauges_are_read_from_the_metrics_text() {
        let text = "# TYPE ztunnel_heap_bytes gauge\nztunnel_heap_bytes{state=\"in_use\"} 2097152\nztunnel_heap_bytes{state=\"free\"} 524288\n";
        assert_eq!(heap_gauge(text, "in_use"), Some(2097152.0));
        assert_eq!(heap_gauge(text, "free"), Some(524288.0));
        assert_eq!(heap_gauge("", "free"), None);
    }

    #[test]
    fn busy_iperf_server_is_retried_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retry_busy(|| {
            calls += 1;
            if calls == 1 {
                bail!("envoy path: iperf3: the {IPERF_BUSY}. try again later");
            }
            Ok(calls)
        });
        assert_eq!(r.ok(), Some(2));
        let mut calls = 0;
        let r: Result<()> = retry_busy(|| {
            calls += 1;
            bail!("iperf3: unable to connect to server")
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn proc_stat_idle_share_and_switches() {
        let a = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\nctxt 1000\n")
            .expect("parse");
        let b = parse_proc_stat("cpu  160 0 90 870 50 0 0 0 0 0\nctxt 4000\n").expect("parse");
        assert_eq!(b.idle_pct_since(&a), 70.0 / 170.0 * 100.0);
        assert_eq!(b.switches_since(&a), 3000.0);
        assert!(parse_proc_stat("cpu  1 2 3\nctxt 1\n").is_err());
        assert!(parse_proc_stat("intr 5\n").is_err());
        let now = system_cpu().expect("this machine's /proc/stat");
        assert!(now.ctxt > 0.0);
    }

    #[test]
    fn median_and_own_process_stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let me = std::process::id();
        assert!(cpu_secs(me).expect("cpu") >= 0.0);
        let m = mem(me).expect("mem");
        assert!(m.rss > 0.0 && m.pss > 0.0 && m.anon > 0.0, "{m:?}");
    }
}
