//! `cargo xtask demo --up` / `--down`: the demo cluster left running in the background for a
//! user to poke at, and removed again.
//!
//! `--up` builds in the foreground (so build errors show), then starts this program again in
//! its own session (`demo --background`), which runs the demo as usual, writes a description of
//! the cluster to [`DESCRIPTION`] and waits for SIGTERM. The foreground prints the background
//! run's report and exits once the description exists. `--down` sends that process SIGTERM, so
//! it tears down in order (daemons stop, namespaces and files go), and removes the description.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::Cluster;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// Where the running cluster is described; root-only, like the cluster itself.
pub const DIR: &str = "/run/ztunnel-demo";

fn description() -> PathBuf {
    Path::new(DIR).join("cluster.json")
}

fn log_file() -> PathBuf {
    Path::new(DIR).join("demo.log")
}

/// How long the background demo may take to come up (the API server start included).
const UP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an orderly teardown may take before `--down` kills what is left.
const DOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// The pid of a background demo that is still running, from its description.
fn running() -> Option<(i32, Value)> {
    let text = std::fs::read_to_string(description()).ok()?;
    let desc: Value = serde_json::from_str(&text).ok()?;
    let pid = i32::try_from(desc["pid"].as_i64()?).ok()?;
    alive(pid).then_some((pid, desc))
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Starts the demo in the background and returns once it is up, with whether its checks passed.
pub fn up(kube: bool) -> Result<bool> {
    if let Some((pid, _)) = running() {
        bail!(
            "a demo cluster is already up (pid {pid}, described in {}); `cargo xtask demo --down` first",
            description().display()
        );
    }
    std::fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let _ = std::fs::remove_file(description());
    let log = std::fs::File::create(log_file())
        .with_context(|| format!("creating {}", log_file().display()))?;
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd = Command::new("setsid");
    cmd.arg(exe).args(["demo", "--background"]);
    if kube {
        cmd.arg("--kube");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the background demo (setsid, from util-linux)")?;
    crate::interrupt::stop_with_me(child.id());
    println!(
        "demo: starting in the background (log: {}) ...",
        log_file().display()
    );
    let deadline = Instant::now() + UP_TIMEOUT;
    let desc = loop {
        if let Some((_, desc)) = running() {
            break desc;
        }
        if let Some(status) = child.try_wait()? {
            print_log();
            bail!("the background demo exited ({status}) before the cluster was up");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            print_log();
            bail!("the background demo was not up after {UP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    crate::interrupt::stop_with_me(0);
    print_log();
    println!(
        "\nThe cluster runs in the background (pid {}). Its description (namespaces, pod IPs, \
         daemon ports and logs): {}\nRemove it with `cargo xtask demo --down`.",
        desc["pid"],
        description().display()
    );
    Ok(desc["checks_passed"].as_bool().unwrap_or(false))
}

fn print_log() {
    match std::fs::read_to_string(log_file()) {
        Ok(text) => print!("{text}"),
        Err(e) => eprintln!("demo: reading {}: {e}", log_file().display()),
    }
}

/// In the background process, once the demo ran: describes the cluster for `--up`/`--down`.
pub fn write_description(
    cluster: &Cluster,
    checks_passed: bool,
    commands: &[String],
) -> Result<()> {
    let nodes: Vec<Value> = (1..=cluster.spec().nodes)
        .map(|n| {
            let d = cluster.daemon(n);
            json!({
                "node": n,
                "netns": cluster.node_netns(n),
                "daemon_pid": d.pid(),
                "log": d.log_path(),
                "admin_socket": cluster.admin_socket(n),
                // The harness leaves the daemons' ports at their defaults.
                "ports": {"admin": "127.0.0.1:15000", "metrics": 15020, "readiness": 15021,
                          "hbone": 15008, "outbound": 15001, "inbound_plaintext": 15006,
                          "dns": 15053},
            })
        })
        .collect();
    let pods: Vec<Value> = cluster
        .pods()
        .iter()
        .map(|p| {
            json!({"key": p.key(), "ip": p.ip, "node": p.node, "netns": p.netns,
                   "service_account": p.service_account})
        })
        .collect();
    let services: Vec<Value> = cluster
        .spec()
        .services
        .iter()
        .map(|s| json!({"name": format!("{}/{}", s.namespace, s.name), "vip": s.cluster_ip, "ports": s.ports}))
        .collect();
    let kube = cluster.kube_api().map(|cp| {
        json!({"server": cp.api.server_url(), "kubeconfig": cp.api.kubeconfig(),
               "kubectl": cp.api.kubectl_bin()})
    });
    let desc = json!({
        "pid": std::process::id(),
        "prefix": cluster.prefix(),
        "workdir": cluster.workdir(),
        "fabric_netns": cluster.fabric_netns(),
        "checks_passed": checks_passed,
        "nodes": nodes,
        "pods": pods,
        "services": services,
        "kube": kube,
        "try": commands,
        "log": log_file(),
    });
    let tmp = description().with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&desc)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, description())
        .with_context(|| format!("writing {}", description().display()))
}

/// In the background process, after teardown.
pub fn remove_description() {
    let _ = std::fs::remove_file(description());
}

/// Stops the background demo and waits until everything it made is gone.
pub fn down() -> Result<bool> {
    mesh_tests::require_root()?;
    let desc: Option<Value> = std::fs::read_to_string(description())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    match running() {
        Some((pid, _)) => {
            println!("demo: stopping the background demo (pid {pid}) ...");
            kill(Pid::from_raw(pid), Signal::SIGTERM).context("signalling the background demo")?;
            let deadline = Instant::now() + DOWN_TIMEOUT;
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                eprintln!("demo: pid {pid} still runs after {DOWN_TIMEOUT:?}; killing it");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        None => println!("demo: no background demo is running"),
    }
    // After an orderly teardown there is nothing left; after a crash or SIGKILL, this removes
    // the namespaces (their creator is gone) and the work directory.
    mesh_tests::cluster::remove_stale();
    if let Some(dir) = desc.as_ref().and_then(|d| d["workdir"].as_str()) {
        if Path::new(dir).exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir}"))?;
        }
    }
    let _ = std::fs::remove_file(description());
    println!("demo: the cluster is gone");
    Ok(true)
}
