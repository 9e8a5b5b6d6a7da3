//! Network namespaces, links and routes of the test cluster, driven through `ip`.
//!
//! Shelling out to iproute2 keeps every step visible and reproducible by hand (the commands are
//! the ones in CONTRACTS.md); the cost, a few milliseconds per command, is irrelevant next to a
//! test's runtime.

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use super::spec::{node_ip, node_ip6, pod_ip6, pod_net6, ClusterSpec};

/// Prefix of every namespace the harness creates: `zt<pid hex>x<sequence hex>`. The pid lets a
/// later run recognise namespaces whose creator died without cleaning up.
pub fn new_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("zt{:x}x{:x}", std::process::id(), seq)
}

/// The creating pid encoded in a harness namespace name, if it is one.
fn creator_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix("zt")?;
    let (prefix, _) = rest.split_once('-')?;
    let (pid, seq) = prefix.split_once('x')?;
    if seq.is_empty() || !seq.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

/// Runs `ip <args>`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// Runs a command, failing with the command line and stderr unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A command run inside network namespace `netns`.
pub fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program);
    cmd
}

/// Sets a sysctl inside `netns` (without needing procps' `sysctl`).
fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run(in_netns(netns, "sh").args(["-c", &format!("echo {value} > {path}")]))
        .map(drop)
        .with_context(|| format!("sysctl {key}={value} in {netns}"))
}

/// Lists the names of all named network namespaces.
pub fn list_netns() -> Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Removes namespaces left by harness runs whose process is gone.
pub fn remove_stale() {
    let names = match list_netns() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("mesh-tests: cannot list namespaces for stale cleanup: {e:#}");
            return;
        }
    };
    for name in names {
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("mesh-tests: removing stale namespace {name} (creator pid {pid} is gone)");
        delete_netns(&name);
    }
    // The bpf filesystems of clusters whose process died (their work directories stay, for
    // the logs).
    unmount_bpffs(|workdir| {
        creator_pid(&format!("{workdir}-"))
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    });
}

/// Removes every cluster this process created: its namespaces (killing what runs in them:
/// daemons, apps, Envoy, tcpdump, the API server) and its work directories. For an interrupted
/// `cargo xtask demo`/`bench`, whose clusters' `Drop` will never run because the process exits
/// on the signal.
pub fn remove_own() {
    let own = std::process::id();
    match list_netns() {
        Ok(names) => {
            for name in names.iter().filter(|n| creator_pid(n) == Some(own)) {
                delete_netns(name);
            }
        }
        Err(e) => eprintln!("mesh-tests: cannot list namespaces: {e:#}"),
    }
    let mine = format!("zt{own:x}x");
    unmount_bpffs(|name| name.starts_with(&mine));
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&mine) {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                eprintln!("mesh-tests: removing {}: {e}", entry.path().display());
            }
        }
    }
}

/// Unmounts the clusters' own bpf filesystems (`<workdir>/bpf`, holding the daemons' pinned
/// capture) whose work directory's name satisfies `pick`, so the directories can be removed
/// and the pinned programs and maps are freed.
fn unmount_bpffs(pick: impl Fn(&str) -> bool) {
    let tmp = std::env::temp_dir();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(target), Some("bpf")) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let target = std::path::Path::new(target);
        let Ok(rest) = target.strip_prefix(&tmp) else {
            continue;
        };
        let workdir = rest
            .iter()
            .next()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if pick(workdir) && target.ends_with("bpf") {
            if let Err(e) = run(Command::new("umount").arg("-l").arg(target)) {
                eprintln!("mesh-tests: {e:#}");
            }
        }
    }
}

/// Kills every process inside `netns` and deletes it. Never fails: teardown must get as far
/// as it can, so problems are logged and skipped.
pub fn delete_netns(netns: &str) {
    kill_all_in(netns);
    if let Err(e) = ip(&["netns", "del", netns]) {
        eprintln!("mesh-tests: teardown: {e:#}");
    }
}

/// SIGKILLs every process whose network namespace is `netns`.
pub fn kill_all_in(netns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // Already-exited processes give ESRCH, which is what we wanted anyway.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Creates a namespace with `lo` up, and records it in `created` before touching it so that
/// teardown removes it even when a later step fails.
fn add_netns(name: &str, dual_stack: bool, created: &mut Vec<String>) -> Result<()> {
    ip(&["netns", "add", name])?;
    created.push(name.to_string());
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    if dual_stack {
        return ipv6_sysctls(name);
    }
    // Interfaces created later get no IPv6: nothing here uses it, and link-local chatter
    // (router solicitations, MLD) would only clutter captures. `lo` keeps ::1.
    sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")
}

/// Dual stack: interfaces created later get IPv6 at once (no duplicate address detection,
/// which would hold every address tentative for a second or more) and never ask for or take
/// router advertisements: all routes are static, none default.
fn ipv6_sysctls(netns: &str) -> Result<()> {
    for conf in ["all", "default"] {
        sysctl(netns, &format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
        sysctl(netns, &format!("net.ipv6.conf.{conf}.accept_ra"), "0")?;
    }
    sysctl(netns, "net.ipv6.conf.default.router_solicitations", "0")
}

/// Dual stack, node `i`: its fabric address, forwarding, and a route to every other node's
/// pod prefix via that node.
fn add_node_ipv6(node: &str, i: usize, nodes: usize) -> Result<()> {
    sysctl(node, "net.ipv6.conf.all.forwarding", "1")?;
    let addr = format!("{}/64", node_ip6(i));
    ip(&["-n", node, "addr", "add", &addr, "dev", "eth0", "nodad"])?;
    for k in (1..=nodes).filter(|&k| k != i) {
        let (net, via) = (pod_net6(k), node_ip6(k).to_string());
        ip(&[
            "-n", node, "-6", "route", "add", &net, "via", &via, "dev", "eth0",
        ])?;
    }
    Ok(())
}

/// Dual stack, pod j of node i: its `/128` on `eth0`, routes to pods, Service VIPs and the
/// nodes' addresses (a node's own connections to its pods leave from its fabric address) via
/// the node's `fe80::1` on the veth, and the node's route to the pod.
fn add_pod_ipv6(node: &str, pod: &str, veth: &str, ip6: std::net::Ipv6Addr) -> Result<()> {
    ip(&[
        "-n",
        node,
        "addr",
        "add",
        "fe80::1/64",
        "dev",
        veth,
        "nodad",
    ])?;
    let addr = format!("{ip6}/128");
    ip(&["-n", pod, "addr", "add", &addr, "dev", "eth0", "nodad"])?;
    for net in [
        "fd00:10:244::/48",
        "fd00:10:96::/64",
        "fd00:192:168:200::/64",
    ] {
        ip(&[
            "-n", pod, "-6", "route", "add", net, "via", "fe80::1", "dev", "eth0",
        ])?;
    }
    ip(&["-n", node, "-6", "route", "add", &addr, "dev", veth])
}

/// Names of a cluster's namespaces.
#[derive(Debug, Clone)]
pub struct Names {
    /// Run prefix.
    pub prefix: String,
}

impl Names {
    /// The fabric (bridge) namespace.
    pub fn fabric(&self) -> String {
        format!("{}-fab", self.prefix)
    }
    /// Node i's namespace.
    pub fn node(&self, node: usize) -> String {
        format!("{}-n{node}", self.prefix)
    }
    /// Pod j of node i.
    pub fn pod(&self, node: usize, j: usize) -> String {
        format!("{}-n{node}p{j}", self.prefix)
    }
}

/// Builds fabric, nodes and pods as CONTRACTS.md describes. Every namespace is appended to
/// `created` as soon as it exists.
pub fn build(names: &Names, spec: &ClusterSpec, created: &mut Vec<String>) -> Result<()> {
    let fab = names.fabric();
    let dual = spec.dual_stack;
    add_netns(&fab, false, created)?;
    // No multicast snooping: a snooping bridge joins the all-snoopers group and announces it
    // (IGMP from 0.0.0.0), noise in captures that are meant to show only the cluster's traffic.
    ip(&[
        "-n",
        &fab,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])?;
    ip(&["-n", &fab, "link", "set", "br0", "up"])?;

    for i in 1..=spec.nodes {
        let node = names.node(i);
        add_netns(&node, dual, created)?;
        ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", "lo"])?;
        sysctl(&node, "net.ipv4.ip_forward", "1")?;
        sysctl(&node, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&node, "net.ipv4.conf.default.rp_filter", "0")?;
        let uplink = format!("n{i}");
        ip(&[
            "-n", &fab, "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns",
            &node,
        ])?;
        ip(&["-n", &fab, "link", "set", &uplink, "master", "br0", "up"])?;
        let addr = format!("{}/24", node_ip(i));
        ip(&["-n", &node, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &node, "link", "set", "eth0", "up"])?;
        for k in (1..=spec.nodes).filter(|&k| k != i) {
            let cidr = format!("10.244.{k}.0/24");
            let via = node_ip(k).to_string();
            ip(&[
                "-n", &node, "route", "add", &cidr, "via", &via, "dev", "eth0",
            ])?;
        }
        if dual {
            add_node_ipv6(&node, i, spec.nodes)?;
        }
    }

    for (pod, j, pod_ip) in spec.placements() {
        let ip6 = dual.then(|| pod_ip6(pod.node, j));
        let pod_ip = (!pod.ipv6_only).then_some(pod_ip);
        add_pod(names, pod.node, j, pod_ip, ip6, created)
            .with_context(|| format!("creating pod {}/{}", pod.namespace, pod.name))?;
    }
    Ok(())
}

/// Pod j of node i: its namespace and veth pair, and each address it has (an IPv6-only pod
/// has no IPv4 address or route).
fn add_pod(
    names: &Names,
    i: usize,
    j: usize,
    pod_ip: Option<Ipv4Addr>,
    ip6: Option<std::net::Ipv6Addr>,
    created: &mut Vec<String>,
) -> Result<()> {
    let node = names.node(i);
    let pod = names.pod(i, j);
    add_netns(&pod, ip6.is_some(), created)?;
    let veth = format!("veth{j}");
    ip(&[
        "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod,
    ])?;
    ip(&["-n", &node, "link", "set", &veth, "up"])?;
    ip(&["-n", &pod, "link", "set", "eth0", "up"])?;
    if let Some(pod_ip) = pod_ip {
        add_pod_ipv4(&node, &pod, &veth, pod_ip)?;
    }
    if let Some(ip6) = ip6 {
        add_pod_ipv6(&node, &pod, &veth, ip6)?;
    }
    Ok(())
}

/// Pod j of node i, IPv4: its `/32` on `eth0`, routes to pods and Service VIPs via the node's
/// `169.254.1.1`, and the node's route to the pod.
fn add_pod_ipv4(node: &str, pod: &str, veth: &str, pod_ip: Ipv4Addr) -> Result<()> {
    ip(&[
        "-n",
        pod,
        "addr",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        pod,
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    for cidr in ["10.244.0.0/16", "10.96.0.0/16"] {
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            cidr,
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
    }
    let host = format!("{pod_ip}/32");
    ip(&[
        "-n", node, "route", "add", &host, "dev", veth, "scope", "link",
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips_the_pid() {
        let p = new_prefix();
        assert_eq!(creator_pid(&format!("{p}-n1p2")), Some(std::process::id()));
        assert_eq!(creator_pid("zt12x-fab"), None);
        assert_eq!(creator_pid("other-ns"), None);
        assert_eq!(creator_pid("zt1fx3-n1"), Some(0x1f));
    }
}
