//! `cargo xtask bench [scenario...]` and `cargo xtask overhead`: the project's performance
//! method (docs/BENCHMARKS.md). Every scenario is measured on the shared test
//! cluster for three paths (four with `ISTIO_ZTUNNEL_BIN`) in the same run, round by round so
//! drift hits all of them alike:
//!
//! - `direct`: pod to pod, no data plane at all (daemons stopped, no sidecars);
//! - `ambient`: through this project's daemons (one per node, HBONE mTLS between nodes);
//! - `envoy`: through Envoy sidecars (one per pod; the client connects to its sidecar's
//!   loopback listener, so sidecar-mode iptables redirection is not part of the cost);
//! - `istio`, only when `ISTIO_ZTUNNEL_BIN` names a build of Istio's own ztunnel: one instance
//!   per pod in its dedicated mode, HBONE mTLS between them, the client pod's connections
//!   redirected to its instance by iptables ([`istio`]). The project's aims are ratios
//!   against this path.
//!
//! Results are medians over `--runs` rounds, with ratios to `direct` (and of `ambient` to
//! `istio`); a table on the terminal and a JSON file under `<target>/bench/`.

mod istio;
mod overhead;
mod probe;
mod report;
mod scale;
mod sched;
mod sidecar;
mod soak;
mod waypoint;
mod waypoint_envoy;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{Cluster, ClusterSpec, Pod, PodSpec};
use serde_json::{json, Value};

pub use overhead::run as overhead;
pub use soak::run as soak;

/// Ports of the server pod's applications (`overhead` uses the echo port as is). `bench` adds
/// [`Mode::port_offset`], so each path uses its own server ports: connections a stopped daemon
/// left in TIME_WAIT (transparent sockets holding the client's address in the node namespace)
/// would otherwise swallow, for 60 s, the direct path's packets of the same 4-tuple.
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 8080;
/// The daemon's default `--hbone-inbound-peer-max-streams`.
const PEER_MAX_STREAMS_DEFAULT: usize = 8192;
/// Sidecar loopback listeners in the client pod that lead to the two ports above.
const SIDECAR_IPERF: u16 = 15101;
const SIDECAR_ECHO: u16 = 15102;

/// The data-plane paths, in measuring order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// No data plane.
    Direct,
    /// This project's daemons.
    Ambient,
    /// One Envoy per pod.
    Envoy,
    /// One Istio ztunnel per pod, dedicated mode (opt-in, [`istio::BIN_ENV`]).
    Istio,
}

impl Mode {
    fn port_offset(self) -> u16 {
        match self {
            Mode::Direct => 0,
            Mode::Ambient => 1,
            Mode::Envoy => 2,
            Mode::Istio => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ambient => "ambient",
            Mode::Envoy => "envoy",
            Mode::Istio => "istio",
        }
    }
}

const SCENARIOS: &[&str] = &[
    "throughput",
    "latency",
    "connrate",
    "conns",
    "loaded",
    "stalled",
    "profile",
    "sched",
];
/// The scenarios run when none is named (`profile` and `sched` need perf and are asked for
/// explicitly).
const DEFAULT_SCENARIOS: usize = 6;

#[derive(Debug)]
struct Opts {
    scenarios: Vec<String>,
    runs: usize,
    secs: f64,
    rate: f64,
    /// Connections held open by the `conns` scenario.
    conns: usize,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        scenarios: Vec::new(),
        runs: 3,
        secs: 5.0,
        rate: 1000.0,
        conns: 500,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<f64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} `{v}`"))
        };
        match a.as_str() {
            "--runs" => o.runs = val("--runs")?.max(1.0) as usize,
            "--secs" => o.secs = val("--secs")?.max(1.0),
            "--rate" => o.rate = val("--rate")?.max(1.0),
            "--conns" => o.conns = val("--conns")?.max(1.0) as usize,
            s if SCENARIOS.contains(&s) => o.scenarios.push(s.to_string()),
            other => bail!(
                "unknown argument `{other}` (scenarios: {}; flags: --runs N --secs S --rate R --conns K; \
                 or `bench waypoint` alone)",
                SCENARIOS.join(" ")
            ),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = SCENARIOS[..DEFAULT_SCENARIOS]
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    Ok(o)
}

/// Builds the release daemon and test programs the benchmarks run; returns their directory.
/// `cargo xtask link-order` lays out the daemon this builds, with the same features.
pub fn build_release() -> Result<PathBuf> {
    crate::run_status(
        crate::cargo()
            .args([
                "build",
                "--release",
                "-p",
                "ztunnel",
                "-p",
                "mesh-tests",
                "--bins",
            ])
            .current_dir(mesh_tests::workspace_root()),
    )?;
    Ok(crate::target_dir()?.join("release"))
}

/// Installs the tools (iperf3, perf, Envoy), builds release binaries and points the harness
/// at them. Returns the Envoy binary.
fn prepare(perf: bool) -> Result<PathBuf> {
    mesh_tests::require_root()?;
    let mut pkgs = vec!["iperf3", "iproute2"];
    if perf {
        pkgs.push("linux-perf");
    }
    crate::test::install_packages(&pkgs)?;
    crate::test::install_missing_pip_packages()?;
    let envoy = sidecar::envoy_binary()?;
    let rel = build_release()?;
    // Read by mesh_tests::{ztunnel_bin, meshapp_bin} and by meshload_bin below. A daemon
    // binary given in ZTUNNEL_BIN is measured instead of this tree's (an A/B against another
    // build, with everything else the same).
    match std::env::var_os("ZTUNNEL_BIN") {
        Some(bin) => eprintln!("bench: daemon {}", PathBuf::from(bin).display()),
        None => std::env::set_var("ZTUNNEL_BIN", rel.join("ztunnel")),
    }
    std::env::set_var("MESHAPP_BIN", rel.join("meshapp"));
    std::env::set_var("MESHLOAD_BIN", rel.join("meshload"));
    Ok(envoy)
}

/// The release `meshload` that [`prepare`] built.
pub fn meshload_bin() -> PathBuf {
    std::env::var_os("MESHLOAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| mesh_tests::target_dir().join("release").join("meshload"))
}

/// A child process killed on drop (servers in pods).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The data plane of one mode while it is up: whose CPU and memory count.
struct Dataplane {
    pids: Vec<u32>,
    _sidecars: Vec<sidecar::Sidecar>,
    _istio: Option<istio::Mesh>,
}

/// Brings up `mode`'s data plane for client/server pairs and checks it really carries traffic.
/// `daemon_args` are extra flags for the daemons (ambient only).
fn bring_up(
    cluster: &mut Cluster,
    envoy: &std::path::Path,
    mode: Mode,
    pairs: &[(Pod, Pod)],
    routes: &dyn Fn(&Pod) -> Vec<sidecar::Route>,
    daemon_args: &[String],
) -> Result<Dataplane> {
    match mode {
        Mode::Direct => Ok(Dataplane {
            pids: Vec::new(),
            _sidecars: Vec::new(),
            _istio: None,
        }),
        Mode::Ambient => {
            let nodes = cluster.spec().nodes;
            let args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
            for n in 1..=nodes {
                cluster.start_daemon(n, &args)?;
            }
            let pids = (1..=nodes)
                .map(|n| cluster.daemon(n).pid().context("daemon has no pid"))
                .collect::<Result<Vec<u32>>>()?;
            // Prove the path is meshed: a transfer must show up in the client node's access log.
            let (c, s) = &pairs[0];
            let before = cluster.daemon(c.node).access_logs().len();
            let port = ECHO_PORT + Mode::Ambient.port_offset();
            c.send(&SendOpts::to(&format!("{}:{port}", s.ip)))?
                .check()?;
            std::thread::sleep(Duration::from_millis(300));
            if cluster.daemon(c.node).access_logs().len() <= before {
                bail!("ambient check: the transfer did not pass the client node's daemon");
            }
            Ok(Dataplane {
                pids,
                _sidecars: Vec::new(),
                _istio: None,
            })
        }
        Mode::Envoy => {
            let ca = cluster.ca_dir()?;
            let workdir = cluster.workdir().to_path_buf();
            let mut sidecars = Vec::new();
            let mut pods: Vec<&Pod> = pairs.iter().flat_map(|(c, s)| [c, s]).collect();
            pods.dedup_by_key(|p| p.key());
            for (i, pod) in pods.into_iter().enumerate() {
                let base_id = std::process::id() % 10_000 * 100 + i as u32;
                sidecars.push(sidecar::start(
                    envoy,
                    &ca,
                    &workdir,
                    pod,
                    &routes(pod),
                    base_id,
                )?);
            }
            let pids = sidecars.iter().map(|s| s.pid).collect();
            Ok(Dataplane {
                pids,
                _sidecars: sidecars,
                _istio: None,
            })
        }
        Mode::Istio => {
            let bin = istio::binary()?.with_context(|| format!("{} is unset", istio::BIN_ENV))?;
            let off = Mode::Istio.port_offset();
            let ports = [IPERF_PORT + off, ECHO_PORT + off];
            let mesh = istio::bring_up(&bin, cluster.workdir(), pairs, &ports)?;
            Ok(Dataplane {
                pids: mesh.pids(),
                _sidecars: Vec::new(),
                _istio: Some(mesh),
            })
        }
    }
}

/// Takes `mode`'s data plane down again (sidecars are dropped by the caller). A stopped daemon
/// leaves capture in place (it fails closed), so the next mode's traffic would be held: each
/// node's capture is uninstalled too.
fn bring_down(cluster: &Cluster, mode: Mode) -> Result<()> {
    if mode == Mode::Ambient {
        for n in 1..=cluster.spec().nodes {
            cluster.daemon(n).terminate()?;
            cluster.daemon(n).uninstall()?;
        }
    }
    Ok(())
}

/// Samples per (mode, metric).
type Samples = BTreeMap<(Mode, String), Vec<f64>>;

fn push(s: &mut Samples, mode: Mode, metric: &str, v: f64) {
    s.entry((mode, metric.to_string())).or_default().push(v);
}

/// `cargo xtask bench [scenario...] [--runs N] [--secs S] [--rate R]`.
/// `cargo xtask scale` (also `cargo xtask bench scale`): see [`scale`].
pub fn scale(args: &[String]) -> Result<bool> {
    scale::run(args)
}

pub fn run(args: &[String]) -> Result<bool> {
    if args.first().is_some_and(|a| a == "waypoint") {
        return waypoint::run(&args[1..]);
    }
    if args.first().is_some_and(|a| a == "scale") {
        return scale::run(&args[1..]);
    }
    let o = parse(args)?;
    let profile = o.scenarios.iter().any(|s| s == "profile" || s == "sched");
    let istio_bin = istio::binary()?;
    let envoy = prepare(profile)?;
    let mut modes = vec![Mode::Direct, Mode::Ambient, Mode::Envoy];
    if let Some(bin) = &istio_bin {
        eprintln!("bench: istio path with {}", bin.display());
        istio::prepare()?;
        modes.push(Mode::Istio);
    }
    let load_before = uptime();
    let spec = ClusterSpec::new(2)
        .namespace("bench", true)
        .pod(PodSpec::new("bench/client", 1).sa("client"))
        .pod(PodSpec::new("bench/server", 2).sa("server"));
    let mut cluster = Cluster::start(spec)?;
    let client = cluster.pod("bench/client").clone();
    // The connection scenarios open tens of thousands of connections to one server address;
    // the client closes first, so each leaves a TIME_WAIT socket in the client pod for 60 s,
    // and once most local ports hold one, every connect() searches the port space for a free
    // one (milliseconds each: 3.2 ms at the median for the direct path). Reusing TIME_WAIT
    // ports for new outgoing connections (safe with TCP timestamps) keeps that search out of
    // the figures; the Envoy path, whose client connects over loopback, always had it (the
    // kernel's default reuses on loopback only).
    let out = client.exec("sysctl", ["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    if !out.status.success() {
        bail!(
            "sysctl net.ipv4.tcp_tw_reuse=1 in the client pod: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let server = cluster.pod("bench/server").clone();
    let mut servers = Vec::new();
    let mut iperfs = Vec::new();
    for &m in &modes {
        servers.push(server.serve(ECHO_PORT + m.port_offset(), "server")?);
        if m == Mode::Ambient {
            // `conns` holds half its connections the other way (see `held_connections`).
            servers.push(client.serve(ECHO_PORT + m.port_offset(), "client")?);
        }
        iperfs.push(KillOnDrop(probe::iperf_server(
            &server,
            IPERF_PORT + m.port_offset(),
        )?));
    }
    let server_id = server.identity();
    let routes = move |p: &Pod| -> Vec<sidecar::Route> {
        if p.key() != "bench/client" {
            return Vec::new();
        }
        let off = Mode::Envoy.port_offset();
        [
            (SIDECAR_IPERF, IPERF_PORT + off),
            (SIDECAR_ECHO, ECHO_PORT + off),
        ]
        .into_iter()
        .map(|(local, port)| sidecar::Route {
            local_port: local,
            target: std::net::SocketAddrV4::new(server.ip, port),
            identity: server_id.clone(),
        })
        .collect()
    };
    let server = cluster.pod("bench/server").clone();
    let pairs = vec![(client.clone(), server.clone())];

    // One client identity may hold 8,192 inbound streams on a node by default (a bound against
    // one peer taking every descriptor); `conns` beyond that, from the one client pod, needs
    // the bound raised or the excess is refused.
    let daemon_args: Vec<String> = if o.conns + 1024 > PEER_MAX_STREAMS_DEFAULT {
        vec![
            "--hbone-inbound-peer-max-streams".into(),
            (o.conns + 1024).to_string(),
        ]
    } else {
        Vec::new()
    };
    let mut samples = Samples::new();
    let mut profile_report = None;
    for round in 1..=o.runs {
        for &mode in &modes {
            if profile && mode != Mode::Ambient && o.scenarios.len() == 1 {
                continue;
            }
            eprintln!("bench: round {round}/{}: {}", o.runs, mode.name());
            let dp = bring_up(&mut cluster, &envoy, mode, &pairs, &routes, &daemon_args)?;
            let result = measure(&o, mode, &dp, &client, &server, &mut samples);
            let result = result.and_then(|()| {
                if profile && mode == Mode::Ambient && round == 1 {
                    profile_report = Some(run_profile(&o, &dp, &client, &server)?);
                }
                Ok(())
            });
            drop(dp);
            bring_down(&cluster, mode)?;
            result.with_context(|| format!("{} path, round {round}", mode.name()))?;
        }
    }
    let load_after = uptime();
    let report = report::report(&o, &samples, &load_before, &load_after);
    let dir = crate::target_dir()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut doc = report.json;
    if let Some(p) = &profile_report {
        doc["profile"] = json!(p);
        println!("\nHot-path profile (ambient, 1 stream, both daemons):\n{p}");
    }
    let path = dir.join("bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    println!("{}", report.table);
    println!("JSON: {}", path.display());
    Ok(true)
}

/// Runs the selected scenarios once for `mode`, adding samples.
fn measure(
    o: &Opts,
    mode: Mode,
    dp: &Dataplane,
    client: &Pod,
    server: &Pod,
    s: &mut Samples,
) -> Result<()> {
    let (host, iperf_port, echo) = match mode {
        Mode::Envoy => (
            "127.0.0.1".to_string(),
            SIDECAR_IPERF,
            format!("127.0.0.1:{SIDECAR_ECHO}"),
        ),
        _ => (
            server.ip.to_string(),
            IPERF_PORT + mode.port_offset(),
            format!("{}:{}", server.ip, ECHO_PORT + mode.port_offset()),
        ),
    };
    let per_proc = |m: probe::Mem| {
        let n = dp.pids.len().max(1) as f64;
        (m.rss / n, m.anon / n, m.pss / n)
    };
    let has_dp = !dp.pids.is_empty();
    if has_dp {
        std::thread::sleep(Duration::from_secs(1));
        let (rss, anon, pss) = per_proc(probe::mem_total(&dp.pids)?);
        push(s, mode, "mem_idle_rss_mb", rss);
        push(s, mode, "mem_idle_anon_mb", anon);
        push(s, mode, "mem_idle_pss_mb", pss);
    }
    let want = |name: &str| o.scenarios.iter().any(|x| x == name);
    if want("throughput") {
        for streams in [1u32, 4] {
            let t = probe::retry_busy(|| transfer(o, dp, client, &host, iperf_port, streams))?;
            push(s, mode, &format!("tput_{streams}_gbps"), t.bps / 1e9);
            // The whole machine: a CPU-bound path leaves little idle; one that waits (on
            // TCP transmission, wake-ups) leaves more (docs/BENCHMARKS.md, "Keeping the
            // daemons awake").
            push(
                s,
                mode,
                &format!("sys_idle_pct_{streams}"),
                t.sys_after.idle_pct_since(&t.sys_before),
            );
            push(
                s,
                mode,
                &format!("ctxt_per_s_{streams}"),
                t.sys_after.switches_since(&t.sys_before) / t.secs,
            );
            if has_dp {
                push(
                    s,
                    mode,
                    &format!("cpu_s_per_gb_{streams}"),
                    t.cpu / (t.bytes / 1e9),
                );
                if streams == 4 {
                    let (rss, anon, pss) = per_proc(t.load_mem);
                    push(s, mode, "mem_load_rss_mb", rss);
                    push(s, mode, "mem_load_anon_mb", anon);
                    push(s, mode, "mem_load_pss_mb", pss);
                }
            }
        }
    }
    if want("latency") {
        for size in [64usize, 1024] {
            for rate in [None, Some(o.rate)] {
                let tag = match rate {
                    None => format!("rr{size}"),
                    Some(_) => format!("rr{size}_fixed"),
                };
                let cpu0 = probe::cpu_total(&dp.pids)?;
                let child =
                    probe::meshload_spawn(client, &probe::rr_args(&echo, size, o.secs, rate))?;
                let v = probe::meshload_result(child)?;
                let cpu = probe::cpu_total(&dp.pids)? - cpu0;
                for p in ["p50", "p90", "p99"] {
                    push(
                        s,
                        mode,
                        &format!("{tag}_{p}_us"),
                        num(&v, &format!("{p}_us"))?,
                    );
                }
                if rate.is_none() {
                    push(s, mode, &format!("{tag}_rps"), num(&v, "rps")?);
                    if has_dp {
                        let req = num(&v, "requests")?.max(1.0);
                        push(
                            s,
                            mode,
                            &format!("cpu_s_per_1k_req_{size}"),
                            cpu / req * 1e3,
                        );
                    }
                }
            }
        }
    }
    if want("sched") {
        let data = crate::target_dir()?
            .join("bench")
            .join(format!("sched-{}.data", mode.name()));
        for (k, v) in sched::hops(client, &echo, o.secs.min(3.0), o.rate, &dp.pids, &data)? {
            push(s, mode, &k, v);
        }
    }
    if want("connrate") {
        // First new connections at a fixed 200/s, each timed to the server's first line: what
        // one new flow waits for its path (capture, tunnel, policy) on an otherwise idle path.
        // Before the back-to-back run, whose thousands of closed connections leave TIME_WAIT
        // sockets behind in whichever namespace connects to the server (the client pod, the
        // server node for ambient, the server's sidecar), so that every later connect()
        // searches the local ports for a free one: milliseconds per connection.
        let args = probe::crr_args(&echo, o.secs, Some(200.0));
        let v = probe::meshload_result(probe::meshload_spawn(client, &args)?)?;
        for p in ["p50", "p99"] {
            push(
                s,
                mode,
                &format!("conn_setup_{p}_us"),
                num(&v, &format!("{p}_us"))?,
            );
        }
        let failed = num(&v, "failed")?;
        let args = probe::crr_args(&echo, o.secs, None);
        let v = probe::meshload_result(probe::meshload_spawn(client, &args)?)?;
        push(s, mode, "conn_per_s", num(&v, "cps")?);
        push(s, mode, "conn_failed", failed + num(&v, "failed")?);
    }
    if want("loaded") {
        // 64 B requests back to back while one bulk stream runs between the same two pods:
        // what an RPC sees when a transfer shares its path, and in ambient its pooled HBONE
        // connection. Back to back, because at a fixed rate one slow round trip delays every
        // request scheduled after it and the percentiles measure the backlog instead.
        let (v, bps) = probe::retry_busy(|| {
            let bulk = probe::iperf_spawn(client, &host, iperf_port, 1, o.secs + 2.0)?;
            std::thread::sleep(Duration::from_secs(1));
            let rr = probe::rr_args(&echo, 64, o.secs, None);
            let v = probe::meshload_result(probe::meshload_spawn(client, &rr)?)?;
            Ok((v, probe::iperf_result(bulk)?.0))
        })?;
        for p in ["p50", "p90", "p99"] {
            push(
                s,
                mode,
                &format!("loaded_rr64_{p}_us"),
                num(&v, &format!("{p}_us"))?,
            );
        }
        push(s, mode, "loaded_tput_gbps", bps / 1e9);
    }
    if want("conns") && has_dp {
        let mut holders = vec![(client, echo.clone())];
        if mode == Mode::Ambient {
            let back = format!("{}:{}", client.ip, ECHO_PORT + mode.port_offset());
            holders.push((server, back));
        }
        held_connections(o, mode, dp, &holders, Hold::Idle(o.conns), s)?;
    }
    if want("stalled") && has_dp {
        held_connections(o, mode, dp, &[(client, echo)], Hold::Stalled, s)?;
    }
    Ok(())
}

/// Flows the `stalled` scenario holds.
const STALLED_FLOWS: usize = 16;

/// What `held_connections` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// `conns`: this many idle connections.
    Idle(usize),
    /// `stalled`: [`STALLED_FLOWS`] flows whose client writes until the path takes no more
    /// and never reads the echo, so the echo server stops reading too: both directions of
    /// every flow hold what each hop lets them.
    Stalled,
}

/// One iperf3 transfer with what was measured around it.
struct Transfer {
    bps: f64,
    bytes: f64,
    /// Data-plane CPU seconds during the transfer.
    cpu: f64,
    /// Data-plane memory half-way through.
    load_mem: probe::Mem,
    sys_before: probe::SystemCpu,
    sys_after: probe::SystemCpu,
    secs: f64,
}

fn transfer(
    o: &Opts,
    dp: &Dataplane,
    client: &Pod,
    host: &str,
    port: u16,
    streams: u32,
) -> Result<Transfer> {
    let cpu0 = probe::cpu_total(&dp.pids)?;
    let (sys_before, t0) = (probe::system_cpu()?, std::time::Instant::now());
    let child = probe::iperf_spawn(client, host, port, streams, o.secs)?;
    std::thread::sleep(Duration::from_secs_f64(o.secs / 2.0));
    let load_mem = probe::mem_total(&dp.pids)?;
    let (bps, bytes) = probe::iperf_result(child)?;
    Ok(Transfer {
        bps,
        bytes,
        cpu: probe::cpu_total(&dp.pids)? - cpu0,
        load_mem,
        sys_before,
        sys_after: probe::system_cpu()?,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// `conns`: what an open, idle connection costs the data plane. `--conns` connections are
/// opened (256 KiB echoed on each, so they have carried data) and held; memory of the
/// data-plane processes is sampled half-way through the hold and compared with just before,
/// per connection. Connections that failed to open or stopped carrying data while held are
/// counted (`conns_failed`, `conns_lost`); the report checks both are 0.
///
/// `holders` are (client pod, echo address) pairs sharing the connections. In ambient mode
/// there are two, one each way between the nodes: a daemon holds two descriptors per inbound
/// flow and keeps 2,048 free, so under the common limit of 20,000 open files one daemon can
/// terminate about 8,900 flows, and 10,000 fit only when each node's daemon terminates half.
/// The memory per connection (both nodes summed) is the same either way.
///
/// `stalled` ([`Hold::Stalled`]) reports the same per flow as `stalled_mem_per_conn_*_kb`,
/// and the bytes each client got the path to take before it stopped, `stalled_taken_mib`.
fn held_connections(
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

fn num(v: &Value, key: &str) -> Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("meshload report lacks `{key}`: {v}"))
}

/// `perf record` of all data-plane processes during a single-stream transfer; returns the
/// top of `perf report` by symbol.
fn run_profile(o: &Opts, dp: &Dataplane, client: &Pod, server: &Pod) -> Result<String> {
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
fn perf_record(pids: &[u32], data: &std::path::Path, secs: f64) -> Result<()> {
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
fn perf_top(data: &std::path::Path, lines: usize) -> Result<String> {
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
