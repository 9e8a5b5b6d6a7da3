//! `cargo xtask bench waypoint [--rounds N] [--secs S] [--concurrency K] [--profile] [--no-build]`:
//! the L7 hop, this project's waypoint against Envoy configured as the same waypoint
//! ([`super::waypoint_envoy`]), in the same cluster, with the same pods and the same node
//! daemons (docs/BENCHMARKS.md, "Waypoint: this project's against Envoy").
//!
//! ```text
//! node1: client 10.244.1.11 (h2load), backend 10.244.1.12 (meshhttp)     node2: waypoint 10.244.2.11
//! client -> 10.96.0.30:80 (Service `backend`, istio.io/use-waypoint: waypoint)
//!   client's daemon --HBONE--> waypoint pod :15008 (the project's waypoint, or Envoy)
//!   --HBONE CONNECT 10.244.1.12:8080--> backend's daemon --> meshhttp
//! ```
//!
//! Each round runs both arms in turn (the waypoint process or Envoy in the waypoint pod, never
//! both); per arm and HTTP version (HTTP/1.1, h2c with prior knowledge), `h2load` measures
//! one request at a time (`rr`: latency of an unloaded hop) and `--concurrency` requests in
//! flight (`load`: requests per second). Memory of the L7 process is read idle and in the
//! middle of each loaded run; CPU over each loaded run. Medians over rounds. With `--profile`,
//! after the first round, `perf record` of each arm's process during an HTTP/1.1 loaded run
//! (the top of `perf report` printed and kept in the JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::{Cluster, ClusterSpec, Pod, PodSpec, SvcSpec, WaypointProc};
use serde_json::{json, Value};

use super::{probe, sidecar, waypoint_envoy};

const VIP: &str = "10.96.0.30";
const BACKEND_PORT: u16 = 8080;
const WAYPOINT_POD: &str = "bench/waypoint";
/// Envoy's count of HTTP requests completed by the waypoint's connection manager, and where
/// its admin port (in the waypoint pod) shows it.
const ENVOY_COMPLETED: &str = "http.waypoint.downstream_rq_completed";
const ENVOY_COMPLETED_URL: &str = "http://127.0.0.1:15000/stats?filter=downstream_rq_completed";

/// The waypoint's Gateway and the route the L7 hop applies (one backend: what is measured is
/// the hop, not the split).
const STATE_YAML: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 80}]
  rules:
  - backendRefs: [{name: backend, port: 80}]
"#;

/// The two L7 hops compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Arm {
    /// This project's `waypoint`.
    Waypoint,
    /// Envoy configured as the waypoint.
    Envoy,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Waypoint => "waypoint",
            Arm::Envoy => "envoy",
        }
    }
}

#[derive(Debug)]
struct Opts {
    rounds: usize,
    secs: f64,
    concurrency: usize,
    profile: bool,
    /// Measure the release binaries as they are, without `cargo build --release` first.
    no_build: bool,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        rounds: 3,
        secs: 5.0,
        concurrency: 16,
        profile: false,
        no_build: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<f64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} `{v}`"))
        };
        match a.as_str() {
            "--rounds" | "--runs" => o.rounds = val("--rounds")?.max(1.0) as usize,
            "--secs" => o.secs = val("--secs")?.max(1.0),
            "--concurrency" => o.concurrency = val("--concurrency")?.max(1.0) as usize,
            "--profile" => o.profile = true,
            "--no-build" => o.no_build = true,
            other => bail!(
                "unknown argument `{other}` (bench waypoint flags: --rounds N --secs S --concurrency K --profile --no-build)"
            ),
        }
    }
    Ok(o)
}

/// HTTP version h2load speaks.
#[derive(Debug, Clone, Copy)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
        }
    }

    /// h2load arguments for `inflight` requests in flight: HTTP/1.1 one per connection (no
    /// pipelining), HTTP/2 four streams per connection.
    fn load_args(self, inflight: usize) -> Vec<String> {
        let (conns, streams) = match self {
            Proto::H1 => (inflight, 1),
            Proto::H2 => (inflight.div_ceil(4), inflight.min(4)),
        };
        let mut a = vec![
            "-c".to_string(),
            conns.to_string(),
            "-m".into(),
            streams.to_string(),
        ];
        if let Proto::H1 = self {
            a.push("--h1".into());
        }
        a
    }
}

/// What one h2load run measured.
#[derive(Debug, Clone, Copy)]
struct LoadResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    failed: f64,
}

/// Installs h2load (Debian's `nghttp2-client`) and the rest, builds the release binaries
/// (unless `no_build`) and points the harness at them. Returns the Envoy binary.
fn prepare(no_build: bool) -> Result<PathBuf> {
    mesh_tests::require_root()?;
    crate::test::install_packages(&["nghttp2-client", "iproute2", "linux-perf"])?;
    crate::test::install_missing_pip_packages()?;
    let envoy = sidecar::envoy_binary()?;
    if !no_build {
        crate::run_status(
            crate::cargo()
                .args(["build", "--release", "-p", "ztunnel", "-p", "mesh-tests"])
                .args(["-p", "waypoint", "--bins"])
                .current_dir(mesh_tests::workspace_root()),
        )?;
    }
    let rel = crate::target_dir()?.join("release");
    for (var, bin) in [
        ("ZTUNNEL_BIN", "ztunnel"),
        ("WAYPOINT_BIN", "waypoint"),
        ("MESHHTTP_BIN", "meshhttp"),
    ] {
        match std::env::var_os(var) {
            // Another build's binary, measured instead of this tree's (an A/B).
            Some(b) if var != "MESHHTTP_BIN" => {
                eprintln!("bench: {bin} {}", PathBuf::from(b).display())
            }
            _ => std::env::set_var(var, rel.join(bin)),
        }
    }
    Ok(envoy)
}

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("bench", true)
        .pod(PodSpec::new("bench/client", 1).sa("client"))
        .pod(
            PodSpec::new("bench/backend", 1)
                .sa("backend")
                .label("app", "backend"),
        )
        .pod(
            PodSpec::new(WAYPOINT_POD, 2)
                .sa("waypoint")
                .label("gateway.networking.k8s.io/gateway-name", "waypoint"),
        )
        .service(
            SvcSpec::new("bench/backend", VIP)
                .select("app", "backend")
                .port(80, BACKEND_PORT)
                .label("istio.io/use-waypoint", "waypoint"),
        )
}

/// The L7 process of one arm while it runs (killed on drop).
enum Hop {
    Waypoint(WaypointProc),
    Envoy {
        _proc: sidecar::Sidecar,
        pid: u32,
        pod: Pod,
        access_log: PathBuf,
    },
}

impl Hop {
    fn pid(&self) -> u32 {
        match self {
            Hop::Waypoint(w) => w.pid(),
            Hop::Envoy { pid, .. } => *pid,
        }
    }

    /// The end of the hop's access log, for messages.
    fn log_tail(&self) -> String {
        match self {
            Hop::Waypoint(w) => w.log_tail(5),
            Hop::Envoy { access_log, .. } => mesh_tests::tail_file(access_log, 5),
        }
    }

    /// Requests the hop has logged so far.
    fn logged(&self) -> usize {
        match self {
            Hop::Waypoint(w) => w.requests().len(),
            // Envoy writes its access log in batches (every 10 s by default), so its own
            // counter of completed requests is read from the admin port instead.
            Hop::Envoy { pod, .. } => pod
                .exec("curl", ["-s", ENVOY_COMPLETED_URL])
                .ok()
                .and_then(|o| {
                    let text = String::from_utf8_lossy(&o.stdout).into_owned();
                    text.lines()
                        .find_map(|l| l.strip_prefix(ENVOY_COMPLETED))
                        .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
                })
                .unwrap_or(0),
        }
    }
}

fn bring_up(cluster: &mut Cluster, envoy: &Path, arm: Arm) -> Result<Hop> {
    match arm {
        Arm::Waypoint => Ok(Hop::Waypoint(cluster.start_waypoint(WAYPOINT_POD, &[])?)),
        Arm::Envoy => {
            let pod = cluster.pod(WAYPOINT_POD).clone();
            let backend = cluster.pod("bench/backend").clone();
            let ca = cluster.ca_dir()?;
            let dir = cluster.workdir().join("waypoint-envoy");
            sidecar::issue_cert(&pod, &ca, &dir)?;
            let access_log = dir.join("access.log");
            let _ = std::fs::remove_file(&access_log);
            let cfg = waypoint_envoy::config(
                pod.ip,
                &dir,
                &waypoint_envoy::Backend {
                    endpoint: std::net::SocketAddrV4::new(backend.ip, BACKEND_PORT),
                    identity: backend.identity(),
                },
                &access_log,
            );
            let cfg_path = dir.join("envoy.json");
            std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)
                .with_context(|| format!("writing {}", cfg_path.display()))?;
            let base_id = std::process::id() % 10_000 * 100 + 99;
            // Istio's default waypoint concurrency (its proxies' default CPU limit of 2).
            let want = [format!("{}:15008", pod.ip)];
            let proc = sidecar::run_envoy(envoy, &pod, &cfg_path, 2, base_id, &want)?;
            Ok(Hop::Envoy {
                pid: proc.pid,
                pod,
                _proc: proc,
                access_log,
            })
        }
    }
}

/// Proves requests pass the hop: a few requests must all answer 200 (the first after a switch
/// of arms may find the client daemon's old HBONE connection gone, so a short retry) and show
/// up in the hop's access log.
fn check_path(client: &Client, hop: &Hop, arm: Arm) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = hop.logged();
    loop {
        let r = h2load(client, &["-n", "20", "-c", "1", "--h1"], None)?;
        if r.0.failed == 0.0 && r.1.get(&200).copied() == Some(20) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} check: 20 requests through the hop got {:?}",
                arm.name(),
                r.1
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while hop.logged() < before + 20 {
        if Instant::now() > deadline {
            bail!(
                "{} check: the requests are not in the hop's access log ({} requests, {before} before):\n{}",
                arm.name(),
                hop.logged(),
                hop.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The client pod and where its h2load runs write their per-request logs.
struct Client {
    pod: Pod,
    logdir: PathBuf,
}

/// Runs h2load in `client` against the Service (`args` choose the load; with `secs` a timed
/// run, else a request count given in `args`). Returns the result and the answers per status.
fn h2load(
    client: &Client,
    args: &[&str],
    secs: Option<f64>,
) -> Result<(LoadResult, BTreeMap<u16, usize>)> {
    let child = h2load_spawn(client, args, secs)?;
    h2load_result(child)
}

/// A running h2load and the per-request log it writes.
struct H2load {
    child: Child,
    log: PathBuf,
}

fn h2load_spawn(client: &Client, args: &[&str], secs: Option<f64>) -> Result<H2load> {
    let log = client
        .logdir
        .join(format!("h2load-{}-{}.tsv", std::process::id(), now_nanos()));
    let mut cmd = client.pod.command("h2load");
    cmd.args(args);
    if let Some(s) = secs {
        // One second of warm-up: connections are set up and the pools warm before counting.
        cmd.args(["-D", &format!("{s}"), "--warm-up-time", "1"]);
    }
    let child = cmd
        .arg("--log-file")
        .arg(&log)
        .arg(format!("http://{VIP}/bench"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting h2load (apt nghttp2-client)")?;
    Ok(H2load { child, log })
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn h2load_result(run: H2load) -> Result<(LoadResult, BTreeMap<u16, usize>)> {
    let out = run.child.wait_with_output().context("waiting for h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed ({}): {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = std::fs::read_to_string(&run.log)
        .with_context(|| format!("reading h2load's log {}", run.log.display()))?;
    let _ = std::fs::remove_file(&run.log);
    parse_h2load(&text, &log)
}

/// Parses h2load's summary (`finished in 5.00s, 1234.5 req/s`, `requests: … N failed, N
/// errored, N timeout`) and its per-request log (start µs, status, µs to the end of the
/// response) into rates, percentiles and answers per status.
fn parse_h2load(stdout: &str, log: &str) -> Result<(LoadResult, BTreeMap<u16, usize>)> {
    let rps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("h2load printed no `finished in … req/s`:\n{stdout}"))?;
    let requests = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .with_context(|| format!("h2load printed no `requests:` line:\n{stdout}"))?;
    let count = |what: &str| -> f64 {
        requests
            .split(", ")
            .find_map(|f| f.strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let failed = count(" failed") + count(" errored") + count(" timeout");
    let mut statuses = BTreeMap::new();
    let mut micros = Vec::new();
    for row in log.lines() {
        let cols: Vec<&str> = row.split('\t').collect();
        let (Some(status), Some(us)) = (cols.get(1), cols.get(2)) else {
            continue;
        };
        if let Ok(s) = status.parse::<u16>() {
            *statuses.entry(s).or_insert(0) += 1;
        }
        if let Ok(us) = us.parse::<f64>() {
            micros.push(us);
        }
    }
    micros.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if micros.is_empty() {
            return f64::NAN;
        }
        let i = ((micros.len() as f64 - 1.0) * p).round() as usize;
        micros[i.min(micros.len() - 1)]
    };
    Ok((
        LoadResult {
            rps,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            failed,
        },
        statuses,
    ))
}

type Samples = BTreeMap<(Arm, String), Vec<f64>>;

fn push(s: &mut Samples, arm: Arm, metric: &str, v: f64) {
    s.entry((arm, metric.to_string())).or_default().push(v);
}

/// One arm, one round: idle memory, then per HTTP version one request at a time and
/// `concurrency` in flight.
fn measure(o: &Opts, arm: Arm, hop: &Hop, client: &Client, s: &mut Samples) -> Result<()> {
    let pid = hop.pid();
    std::thread::sleep(Duration::from_secs(1));
    let idle = probe::mem(pid)?;
    push(s, arm, "mem_idle_rss_mb", idle.rss);
    push(s, arm, "mem_idle_anon_mb", idle.anon);
    let mut load_mem = probe::Mem::default();
    for proto in [Proto::H1, Proto::H2] {
        let p = proto.name();
        let one: Vec<String> = proto.load_args(1);
        let one: Vec<&str> = one.iter().map(String::as_str).collect();
        let (rr, _) = h2load(client, &one, Some(o.secs))?;
        push(s, arm, &format!("{p}_rr_rps"), rr.rps);
        push(s, arm, &format!("{p}_rr_p50_us"), rr.p50_us);
        push(s, arm, &format!("{p}_rr_p99_us"), rr.p99_us);

        let many = proto.load_args(o.concurrency);
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let cpu0 = probe::cpu_secs(pid)?;
        let run = h2load_spawn(client, &many, Some(o.secs))?;
        // Half-way through the measured part (after the second of warm-up).
        std::thread::sleep(Duration::from_secs_f64(1.0 + o.secs / 2.0));
        let m = probe::mem(pid)?;
        let (load, statuses) = h2load_result(run)?;
        let cpu = probe::cpu_secs(pid)? - cpu0;
        load_mem.rss = load_mem.rss.max(m.rss);
        load_mem.anon = load_mem.anon.max(m.anon);
        push(s, arm, &format!("{p}_load_rps"), load.rps);
        push(s, arm, &format!("{p}_load_p50_us"), load.p50_us);
        push(s, arm, &format!("{p}_load_p99_us"), load.p99_us);
        push(s, arm, &format!("{p}_failed"), rr.failed + load.failed);
        let done = statuses.values().sum::<usize>().max(1) as f64;
        // The warm-up second is not in h2load's count: CPU per request over the measured
        // seconds only.
        let measured_share = o.secs / (o.secs + 1.0);
        push(
            s,
            arm,
            &format!("{p}_cpu_ms_per_1k_req"),
            cpu * measured_share / done * 1e6,
        );
        let non_200: usize = statuses
            .iter()
            .filter(|(code, _)| **code != 200)
            .map(|(_, n)| n)
            .sum();
        push(s, arm, &format!("{p}_non_200"), non_200 as f64);
    }
    push(s, arm, "mem_load_rss_mb", load_mem.rss);
    push(s, arm, "mem_load_anon_mb", load_mem.anon);
    Ok(())
}

/// `perf record` of the hop's process while h2load keeps `--concurrency` HTTP/1.1 requests
/// in flight; the top of `perf report` by symbol.
fn profile(o: &Opts, arm: Arm, hop: &Hop, client: &Client) -> Result<String> {
    let data = crate::target_dir()?
        .join("bench")
        .join(format!("waypoint-{}.perf.data", arm.name()));
    std::fs::create_dir_all(data.parent().context("perf.data path")?)?;
    let args = Proto::H1.load_args(o.concurrency);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = h2load_spawn(client, &args, Some(o.secs))?;
    std::thread::sleep(Duration::from_secs(1));
    let rec = super::perf_record(&[hop.pid()], &data, (o.secs - 0.5).max(1.0));
    h2load_result(run)?;
    rec?;
    super::perf_top(&data, 30)
}

pub fn run(args: &[String]) -> Result<bool> {
    let o = parse(args)?;
    let envoy = prepare(o.no_build)?;
    let load_before = super::uptime();
    let mut cluster = Cluster::start(spec())?;
    cluster.write_state_file("waypoint.yaml", STATE_YAML)?;
    cluster.start_all_daemons()?;
    let backend = cluster.pod("bench/backend").clone();
    let _server = backend.serve_http(BACKEND_PORT, "backend")?;
    let client = Client {
        pod: cluster.pod("bench/client").clone(),
        logdir: cluster.workdir().join("h2load"),
    };
    std::fs::create_dir_all(&client.logdir)?;

    let mut samples = Samples::new();
    let mut profiles = BTreeMap::new();
    for round in 1..=o.rounds {
        for arm in [Arm::Waypoint, Arm::Envoy] {
            eprintln!("bench waypoint: round {round}/{}: {}", o.rounds, arm.name());
            let hop = bring_up(&mut cluster, &envoy, arm)?;
            check_path(&client, &hop, arm)
                .and_then(|()| measure(&o, arm, &hop, &client, &mut samples))
                .and_then(|()| {
                    if o.profile && round == 1 {
                        profiles.insert(arm.name(), profile(&o, arm, &hop, &client)?);
                    }
                    Ok(())
                })
                .with_context(|| format!("{} arm, round {round}", arm.name()))?;
            drop(hop);
        }
    }
    let load_after = super::uptime();
    let (table, mut doc) = report(&o, &samples);
    doc["load_before"] = json!(load_before);
    doc["load_after"] = json!(load_after);
    for (arm, top) in &profiles {
        println!(
            "\nProfile of the {arm} process, HTTP/1.1, {} in flight:\n{top}",
            o.concurrency
        );
    }
    if !profiles.is_empty() {
        doc["profile"] = json!(profiles);
    }
    let dir = crate::target_dir()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("waypoint.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    println!("{table}");
    println!("load before: {load_before}\nload after:  {load_after}");
    println!("JSON: {}", path.display());
    Ok(true)
}

/// The table (Markdown) and the JSON document: medians, ratios, every sample, the targets.
fn report(o: &Opts, s: &Samples) -> (String, Value) {
    let mut metrics: Vec<&String> = s.keys().map(|(_, m)| m).collect();
    metrics.sort();
    metrics.dedup();
    let med = |arm: Arm, m: &str| s.get(&(arm, m.to_string())).map(|v| probe::median(v));
    let cell = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    let mut t = format!(
        "\n| metric (median of {} rounds) | waypoint | envoy | waypoint/envoy |\n|---|---|---|---|\n",
        o.rounds
    );
    let mut jm = serde_json::Map::new();
    for m in &metrics {
        let (w, e) = (med(Arm::Waypoint, m), med(Arm::Envoy, m));
        let ratio = match (w, e) {
            (Some(w), Some(e)) if e != 0.0 => format!("{:.2}", w / e),
            _ => "-".into(),
        };
        t.push_str(&format!("| {m} | {} | {} | {ratio} |\n", cell(w), cell(e)));
        let samples = |arm: Arm| s.get(&(arm, m.to_string())).cloned().unwrap_or_default();
        jm.insert(
            m.to_string(),
            json!({"waypoint": w, "envoy": e,
                   "samples": {"waypoint": samples(Arm::Waypoint), "envoy": samples(Arm::Envoy)}}),
        );
    }
    let ratio = |m: &str| match (med(Arm::Waypoint, m), med(Arm::Envoy, m)) {
        (Some(w), Some(e)) if e != 0.0 => Some(w / e),
        _ => None,
    };
    let mut targets = super::report::Targets::default();
    for p in ["h1", "h2"] {
        targets.check(
            &format!("{p} requests/s under load, waypoint / envoy"),
            ratio(&format!("{p}_load_rps")),
            |v| v > 1.0,
            "> 1",
        );
        targets.check(
            &format!("{p} p50 one at a time, waypoint / envoy"),
            ratio(&format!("{p}_rr_p50_us")),
            |v| v < 1.0,
            "< 1",
        );
    }
    for m in ["anon", "rss"] {
        targets.check(
            &format!("memory under load ({m}), waypoint / envoy"),
            ratio(&format!("mem_load_{m}_mb")),
            |v| v <= 1.0 / 3.0,
            "<= 0.33",
        );
    }
    t.push_str(&targets.text());
    let doc = json!({
        "date": super::now_utc(),
        "machine": super::machine(),
        "rounds": o.rounds,
        "secs": o.secs,
        "concurrency": o.concurrency,
        "envoy_concurrency": 2,
        "metrics": jm,
        "targets": targets.json(),
    });
    (t, doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_and_log_give_rate_percentiles_and_statuses() {
        let out = "finished in 3.00s, 25236.00 req/s, 665.45KB/s\n\
                   requests: 100 total, 100 started, 98 done, 97 succeeded, 1 failed, 2 errored, 0 timeout\n";
        let log: String = (1..=100)
            .map(|i| {
                format!(
                    "1796535117357759\t{}\t{}\n",
                    if i == 7 { 403 } else { 200 },
                    i * 10
                )
            })
            .collect();
        let (r, st) = parse_h2load(out, &log).expect("parse");
        assert_eq!(r.rps, 25236.0);
        assert_eq!(r.failed, 3.0);
        assert_eq!(r.p50_us, 510.0);
        assert_eq!(r.p99_us, 990.0);
        assert_eq!(st.get(&200), Some(&99));
        assert_eq!(st.get(&403), Some(&1));
        assert!(parse_h2load("nothing", "").is_err());
    }

    #[test]
    fn load_shapes_keep_the_same_requests_in_flight() {
        assert_eq!(Proto::H1.load_args(16), ["-c", "16", "-m", "1", "--h1"]);
        assert_eq!(Proto::H2.load_args(16), ["-c", "4", "-m", "4"]);
        assert_eq!(Proto::H2.load_args(1), ["-c", "1", "-m", "1"]);
    }
}
