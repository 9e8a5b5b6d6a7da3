//! What every report records about where it was measured: the machine (CPU, kernel, memory,
//! the network settings results depend on), its load (`uptime`, the machine is shared) and the
//! date.

use std::process::Command;

use serde_json::{json, Value};

/// `uptime` output, recorded with the results (the machine is shared).
pub fn uptime() -> String {
    Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Machine description for the report.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    // Results depend on these: a pacing congestion control without the fq qdisc costs every
    // path a timer per burst; a guest whose idle CPUs halt at once (no halt polling) pays tens
    // of microseconds for every wake-up that lands on another CPU (docs/BENCHMARKS.md).
    let sysctl = |path: &str| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
        "memory": mem_kb,
        "tcp_congestion_control": sysctl("/proc/sys/net/ipv4/tcp_congestion_control"),
        // The cluster's veths run `noqueue` whatever this says; it names what devices with a
        // queue get. Whether BBR can hand pacing to `fq` is `fq_qdisc`.
        "default_qdisc": sysctl("/proc/sys/net/core/default_qdisc"),
        "fq_qdisc": fq_qdisc(),
        "cpuidle_driver": sysctl("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": sysctl("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    })
}

/// Whether this kernel can attach the `fq` qdisc ("available", "unavailable", or "unknown"
/// when the probe cannot run), tried on a veth in a scratch network namespace. Without
/// it BBR paces inside TCP with a timer per burst, which is most of what the veth paths cost
/// here (docs/BENCHMARKS.md).
fn fq_qdisc() -> &'static str {
    let ns = format!("fqprobe{}", std::process::id());
    let run =
        |prog: &str, args: &[&str]| mesh_tests::cluster::run(Command::new(prog).args(args)).is_ok();
    if !run("ip", &["netns", "add", &ns]) {
        return "unknown";
    }
    let link = [
        "-n", &ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ];
    let verdict = if !run("ip", &link) {
        "unknown"
    } else if run(
        "tc",
        &["-n", &ns, "qdisc", "add", "dev", "v0", "root", "fq"],
    ) {
        "available"
    } else {
        "unavailable"
    };
    run("ip", &["netns", "del", &ns]);
    verdict
}

/// Seconds since the epoch rendered as an RFC 3339 UTC date.
pub fn now_utc() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
