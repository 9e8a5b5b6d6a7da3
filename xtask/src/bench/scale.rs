//! `cargo xtask bench scale [--source file|kube] [--one-file] [--changes N] [--churn-secs S]`
//! (also `cargo xtask scale`): what a large cluster costs the daemon.
//!
//! The state: 10,000 pods in 200 namespaces (100 of them on this node), 2,000 Services and
//! 1,000 AuthorizationPolicies. For each source (state files: one file per namespace, or with
//! `--one-file` all of it in one 3.6 MB file rewritten whole on every change; or a real
//! kube-apiserver holding the objects) a release daemon follows it on a one-node namespace
//! cluster, and the run reports: the time to ready, memory once ready
//! (RSS and anonymous, and the allocator's heap in use and free), the time from a change (a
//! pod relabelled, a namespace label flipped, a policy edited) to the daemon logging it
//! applied, split into the daemon's own work (`took_us` of its `state applied` line) and the
//! whole path, memory 2 s after the changes, the daemon's CPU while pods are updated at 50 per
//! second, memory 2 s after that churn, and the set-up latency of new flows through the
//! daemon, quiet and during the churn.
//! Results: a table on stdout and JSON in target/bench/.
//!
//! Capture is on. The 100 pods of the state on this node are addresses only, routed in the
//! node's namespace to one interface (`scale0`, a veth whose peer stays in the node's
//! namespace too: this kernel has no dummy devices), as a CNI routes each pod to its veth:
//! capture attaches there and enrolls them, so the daemon becomes ready as on a real node. Two
//! real pods (`flow/client`, `flow/server`, an ambient namespace of their own) carry the flows:
//! `meshload crr --rate 100`, each new connection timed from its scheduled start to the
//! server's first line, through the daemon's outbound capture, its state lookups and policy
//! check against the 1,000 policies, and the same-node inbound path.
//!
//! The end-to-end figure starts before the change is made: for files, before the file is
//! written (the daemon polls every 500 ms, so half a poll interval on average is part of it);
//! for the API server, before `curl` is started to server-side apply the one changed object
//! (curl's start and TLS handshake are part of it). The daemon's part is `took_us`. For files
//! the daemon also logs `since_write_us`, from the newest modification time of the files it
//! read to the change in force: file written to in force, measured by the daemon's clock.
//! The daemon binary is `ZTUNNEL_BIN` when set (an A/B against another build).

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::{message, Cluster, ClusterSpec, PodSpec};
use serde_json::{json, Value};

use super::probe;

const NAMESPACES: usize = 200;
const PODS: usize = 10_000;
const SERVICES: usize = 2_000;
const POLICIES: usize = 1_000;
/// Pods whose `nodeName` is the measured daemon's node.
const LOCAL_PODS: usize = 100;

#[derive(Debug)]
struct Opts {
    sources: Vec<&'static str>,
    changes: usize,
    churn_secs: f64,
    one_file: bool,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        sources: vec!["file", "kube"],
        changes: 10,
        churn_secs: 10.0,
        one_file: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<String> {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--source" => {
                o.sources = match val("--source")?.as_str() {
                    "file" => vec!["file"],
                    "kube" => vec!["kube"],
                    other => bail!("--source: `{other}` is not file or kube"),
                }
            }
            "--one-file" => o.one_file = true,
            "--changes" => o.changes = val("--changes")?.parse().context("--changes")?,
            "--churn-secs" => o.churn_secs = val("--churn-secs")?.parse().context("--churn-secs")?,
            other => bail!(
                "unknown argument `{other}`; usage: cargo xtask bench scale [--source file|kube] [--one-file] [--changes N] [--churn-secs S]"
            ),
        }
    }
    Ok(o)
}

/// The objects of namespace `ns`: the namespace, its pods, services and policies.
/// `pod_label` and `policy_port` let a change rewrite one of them.
fn namespace_yaml(
    ns: usize,
    ambient: bool,
    pod_label: Option<(usize, &str)>,
    policy_port: u16,
    with_status: bool,
) -> String {
    let mut y = String::new();
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    let _ = writeln!(y, "---\n{{apiVersion: v1, kind: Namespace, metadata: {{name: scale-{ns}, labels: {labels}}}}}");
    for i in (ns..PODS).step_by(NAMESPACES) {
        let app = match pod_label {
            Some((p, l)) if p == i => l.to_string(),
            _ => format!("app{}", i % 10),
        };
        // Every 100th pod runs on node1, the measured node.
        let node = if i % (PODS / LOCAL_PODS) == 0 {
            "node1".to_string()
        } else {
            format!("node{}", 2 + i % 99)
        };
        let _ = writeln!(
            y,
            "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: scale-{ns}, labels: {{app: {app}, version: v1}}}}, \
             spec: {{nodeName: {node}, serviceAccountName: sa{sa}, containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]}}{status}}}",
            sa = i % 10,
            status = if with_status {
                format!(", status: {{phase: Running, podIP: {}, conditions: [{{type: Ready, status: 'True'}}]}}", pod_ip(i))
            } else {
                String::new()
            },
        );
    }
    for i in (ns..SERVICES).step_by(NAMESPACES) {
        let _ = writeln!(
            y,
            "---\n{{apiVersion: v1, kind: Service, metadata: {{name: s{i}, namespace: scale-{ns}}}, spec: {{clusterIP: 10.100.{a}.{b}, selector: {{app: app{app}}}, ports: [{{port: 80, targetPort: http, protocol: TCP}}]}}}}",
            a = i / 250,
            b = 1 + i % 250,
            app = i % 10,
        );
    }
    for i in (ns..POLICIES).step_by(NAMESPACES) {
        let _ = writeln!(
            y,
            "---\n{{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: ap{i}, namespace: scale-{ns}}}, \
             spec: {{selector: {{matchLabels: {{app: app{app}}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/scale-{ns}/sa/sa1]}}}}], to: [{{operation: {{ports: ['{port}']}}}}]}}]}}}}",
            app = i % 10,
            port = policy_port,
        );
    }
    y
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 120 + i / 65_000, i / 250 % 260, 1 + i % 250)
}

/// Pod status documents of namespace `ns` (for the API server's status subresource).
fn status_yaml(ns: usize) -> String {
    let mut y = String::new();
    for i in (ns..PODS).step_by(NAMESPACES) {
        let _ = writeln!(
            y,
            "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: scale-{ns}}}, \
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: 'True'}}]}}}}",
            ip = pod_ip(i),
        );
    }
    y
}

/// How a source is fed: state files (one per namespace, or all namespaces' texts in one
/// file), or the API server (statuses set once, at load).
#[derive(Clone, Copy)]
enum Feed<'a> {
    Files(&'a Cluster),
    OneFile(&'a Cluster, &'a std::sync::Mutex<Vec<String>>),
    Api(&'a Cluster),
}

impl Feed<'_> {
    /// Writes or applies namespace `ns`'s objects ([`namespace_yaml`]).
    /// Files get the namespace's whole file rewritten (as a config tool would); the API
    /// server gets only the object that `changed` names (`Namespace`, `Pod`,
    /// `AuthorizationPolicy`, or `*` for all), as `kubectl apply` of one object would.
    fn put(
        self,
        ns: usize,
        ambient: bool,
        pod_label: Option<(usize, &str)>,
        port: u16,
        changed: &str,
    ) -> Result<()> {
        match self {
            Feed::Files(c) => c.write_node_state_file(
                1,
                &format!("scale-{ns}.yaml"),
                &namespace_yaml(ns, ambient, pod_label, port, true),
            ),
            Feed::OneFile(c, texts) => {
                let mut texts = texts.lock().unwrap_or_else(|p| p.into_inner());
                texts[ns] = namespace_yaml(ns, ambient, pod_label, port, true);
                c.write_node_state_file(1, "scale.yaml", &texts.concat())
            }
            Feed::Api(c) => {
                let all = namespace_yaml(ns, ambient, pod_label, port, false);
                let name = match (changed, pod_label) {
                    ("Pod", Some((p, _))) => format!("name: p{p},"),
                    ("AuthorizationPolicy", _) => format!("name: ap{ns},"),
                    _ => String::new(),
                };
                let docs: Vec<&str> = all
                    .split("---\n")
                    .filter(|d| {
                        changed == "*"
                            || (d.contains(&format!("kind: {changed},")) && d.contains(&name))
                    })
                    .collect();
                let path = match (changed, pod_label) {
                    ("Namespace", _) => format!("/api/v1/namespaces/scale-{ns}"),
                    ("Pod", Some((p, _))) => format!("/api/v1/namespaces/scale-{ns}/pods/p{p}"),
                    ("AuthorizationPolicy", _) => format!(
                        "/apis/security.istio.io/v1/namespaces/scale-{ns}/authorizationpolicies/ap{ns}"
                    ),
                    _ => {
                        return c
                            .kube()
                            .api
                            .apply(&format!("---\n{}", docs.join("---\n")))
                            .map(drop)
                    }
                };
                server_side_apply(c, &path, docs.concat().trim())
            }
        }
    }
}

/// One object server-side applied with curl (a request of its own, started in a few
/// milliseconds; kubectl's start-up alone takes longer than the daemon's part of a change).
fn server_side_apply(c: &Cluster, path: &str, yaml: &str) -> Result<()> {
    let api = &c.kube().api;
    let pki = api.workdir().join("pki");
    let url = format!(
        "{}{path}?fieldManager=mesh-tests&force=true",
        api.server_url()
    );
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.fabric_netns(),
            "curl",
            "-sS",
            "--fail-with-body",
        ])
        .arg("--cacert")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("admin.crt"))
        .arg("--key")
        .arg(pki.join("admin.key"))
        .args([
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/apply-patch+yaml",
        ])
        .args(["--data-binary", "@-", "-o", "/dev/null", &url])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting curl")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(yaml.as_bytes())
            .context("writing to curl")?;
    }
    let status = child.wait().context("waiting for curl")?;
    if !status.success() {
        bail!("curl PATCH {path}: {status}");
    }
    Ok(())
}

/// Applies every namespace's objects to the API server, four kubectl processes at a time
/// (kubectl sends one request per object).
fn load_api(c: &Cluster) -> Result<()> {
    let api = &c.kube().api;
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                s.spawn(move || -> Result<()> {
                    for ns in (w..NAMESPACES).step_by(4) {
                        api.apply(&namespace_yaml(ns, true, None, 8080, false))?;
                        api.kubectl_output(
                            api.kubeconfig(),
                            &[
                                "apply",
                                "--server-side",
                                "--force-conflicts",
                                "--field-manager",
                                "scale-kubelet",
                                "--subresource=status",
                                "-f",
                                "-",
                            ],
                            Some(&status_yaml(ns)),
                        )
                        .and_then(|o| {
                            if o.status.success() {
                                Ok(())
                            } else {
                                bail!("status apply: {}", String::from_utf8_lossy(&o.stderr))
                            }
                        })?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a loader thread panicked"))??;
        }
        Ok(())
    })?;
    eprintln!(
        "scale: {} objects in the API server after {:.0} s",
        NAMESPACES + PODS + SERVICES + POLICIES,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One change and what it took (ms).
struct Took {
    /// From before the change was made to the daemon's `state applied` line.
    e2e: f64,
    /// The daemon's own work (`took_us`).
    own: f64,
    /// File written to in force (`since_write_us`; NaN for the API server).
    since_write: f64,
}

fn change(
    c: &Cluster,
    feed: Feed<'_>,
    ns: usize,
    ambient: bool,
    pod_label: Option<(usize, &str)>,
    port: u16,
    changed: &str,
) -> Result<Took> {
    let d = c.daemon(1);
    let skip = d.log_lines().len();
    let t0 = SystemTime::now();
    feed.put(ns, ambient, pod_label, port, changed)?;
    let line = d.wait_for_log_after(
        skip,
        |l| message(l) == "state applied",
        Duration::from_secs(30),
    )?;
    let logged = line["timestamp"]
        .as_str()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .context("`state applied` has no RFC 3339 timestamp")?;
    let t0 = time::OffsetDateTime::from(t0);
    let e2e = (logged - t0).as_seconds_f64() * 1e3;
    let own = line["took_us"].as_f64().unwrap_or(f64::NAN) / 1e3;
    let since_write = line["since_write_us"].as_f64().unwrap_or(f64::NAN) / 1e3;
    Ok(Took {
        e2e,
        own,
        since_write,
    })
}

fn took_json(t: &[Took]) -> Value {
    let pick = |f: fn(&Took) -> f64| -> Vec<f64> { t.iter().map(f).collect() };
    let mut v = json!({"end_to_end": stats(&pick(|t| t.e2e)), "daemon": stats(&pick(|t| t.own))});
    let w = pick(|t| t.since_write);
    if w.iter().all(|x| x.is_finite()) {
        v["file_write_to_in_force"] = stats(&w);
    }
    v
}

fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({"median": probe::median(&s), "max": s.last().copied().unwrap_or(f64::NAN), "n": s.len()})
}

/// New connections per second of the flow-latency probe: enough samples for a p99 in a few
/// seconds, little enough load that it measures set-up latency, not a queue.
const FLOW_RATE: f64 = 100.0;
/// Where the flow probe's server listens.
const FLOW_PORT: u16 = 8080;

/// `meshload crr --rate` from `flow/client` to `flow/server` for `secs`: set-up latency
/// percentiles of new flows (µs). Started and collected separately so that it can run while
/// the churn runs.
fn flow_probe(cluster: &Cluster, secs: f64) -> Result<std::process::Child> {
    let to = format!("{}:{FLOW_PORT}", cluster.pod("flow/server").ip);
    let args = probe::crr_args(&to, secs, Some(FLOW_RATE));
    probe::meshload_spawn(cluster.pod("flow/client"), &args)
}

fn flow_result(child: std::process::Child) -> Result<Value> {
    let v = probe::meshload_result(child)?;
    if v["failed"].as_f64().unwrap_or(1.0) > 0.0 {
        bail!("flow probe: new connections failed: {v}");
    }
    Ok(
        json!({"p50_us": v["p50_us"], "p90_us": v["p90_us"], "p99_us": v["p99_us"], "max_us": v["max_us"], "n": v["connections"]}),
    )
}

/// Routes the addresses of the state's pods on this node to one veth in node 1's
/// namespace (see the module doc).
fn route_local_pods(cluster: &Cluster) -> Result<()> {
    for args in [
        &[
            "link", "add", "scale0", "type", "veth", "peer", "name", "scale0p",
        ][..],
        &["link", "set", "scale0", "up"],
        &["link", "set", "scale0p", "up"],
        &["route", "add", "10.120.0.0/16", "dev", "scale0"],
    ] {
        let out = cluster.node_exec(1, "ip", args)?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

fn measure(o: &Opts, source: &str) -> Result<Value> {
    let spec = ClusterSpec::new(1)
        .namespace("flow", true)
        .pod(PodSpec::new("flow/client", 1).sa("client"))
        .pod(PodSpec::new("flow/server", 1).sa("server"));
    let mut cluster = match source {
        "kube" => Cluster::start_kube(spec)?,
        _ => Cluster::start(spec)?,
    };
    route_local_pods(&cluster)?;
    let _server = cluster.pod("flow/server").serve(FLOW_PORT, "server")?;
    let kube = source == "kube";
    let texts = std::sync::Mutex::new(vec![String::new(); NAMESPACES]);
    if kube {
        load_api(&cluster)?;
    } else if o.one_file {
        let mut all = texts.lock().unwrap_or_else(|p| p.into_inner());
        for (ns, t) in all.iter_mut().enumerate() {
            *t = namespace_yaml(ns, true, None, 8080, true);
        }
        cluster.write_node_state_file(1, "scale.yaml", &all.concat())?;
        eprintln!(
            "scale: one state file of {:.1} MB",
            all.iter().map(String::len).sum::<usize>() as f64 / 1e6
        );
    } else {
        for ns in 0..NAMESPACES {
            Feed::Files(&cluster).put(ns, true, None, 8080, "*")?;
        }
    }
    let t = Instant::now();
    cluster.start_daemon(1, &["--dns-capture=false"])?;
    let ready = t.elapsed().as_secs_f64();
    let pid = cluster.daemon(1).pid().context("daemon pid")?;
    std::thread::sleep(Duration::from_secs(2));
    let mem_ready = probe::mem(pid)?;
    let mem_ready_heap = probe::heap(&cluster, 1);
    let feed = if kube {
        Feed::Api(&cluster)
    } else if o.one_file {
        Feed::OneFile(&cluster, &texts)
    } else {
        Feed::Files(&cluster)
    };

    let mut took: [Vec<Took>; 3] = Default::default();
    for r in 0..o.changes {
        let ns = (r * 7) % NAMESPACES;
        let label = if r % 2 == 0 { "moved-a" } else { "moved-b" };
        let pod = Some((ns, label));
        took[0].push(change(&cluster, feed, ns, true, pod, 8080, "Pod")?);
        took[1].push(change(&cluster, feed, ns, false, pod, 8080, "Namespace")?);
        let port = 9000 + u16::try_from(r % 1000).unwrap_or(0);
        took[2].push(change(
            &cluster,
            feed,
            ns,
            true,
            pod,
            port,
            "AuthorizationPolicy",
        )?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let mem_after = probe::mem(pid)?;
    let mem_after_heap = probe::heap(&cluster, 1);
    let flow_quiet = flow_result(flow_probe(&cluster, o.churn_secs)?)?;

    // Churn: 50 pod updates per second (five per 100 ms tick), the daemon's CPU meanwhile.
    let flows = flow_probe(&cluster, o.churn_secs)?;
    let cpu0 = probe::cpu_secs(pid)?;
    let start = Instant::now();
    let mut updates = 0usize;
    let mut tick = 0usize;
    while start.elapsed().as_secs_f64() < o.churn_secs {
        let due = start + Duration::from_millis(100 * tick as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // One namespace file (or apply) carries 50 pods; relabel one of them per update,
        // five namespaces per tick.
        std::thread::scope(|s| -> Result<()> {
            let puts: Vec<_> = (0..5)
                .map(|k| {
                    let ns = (tick * 5 + k) % NAMESPACES;
                    let label = format!("churn{}", tick % 3);
                    s.spawn(move || feed.put(ns, true, Some((ns, &label)), 8080, "Pod"))
                })
                .collect();
            for p in puts {
                p.join()
                    .map_err(|_| anyhow::anyhow!("a churn thread panicked"))??;
            }
            Ok(())
        })?;
        updates += 5;
        tick += 1;
    }
    let churn_secs = start.elapsed().as_secs_f64();
    let cpu = probe::cpu_secs(pid)? - cpu0;
    let flow_churn = flow_result(flows)?;
    // As after the changes: memory once the daemon has settled (its heap trim trails the last
    // change by a second), not in the middle of the last update.
    std::thread::sleep(Duration::from_secs(2));
    let mem_churn = probe::mem(pid)?;
    let mem_churn_heap = probe::heap(&cluster, 1);
    drop(cluster);
    Ok(json!({
        "source": if o.one_file && !kube { "one-file" } else { source },
        "daemon": std::env::var("ZTUNNEL_BIN").unwrap_or_default(),
        "ready_secs": ready,
        "mem_ready_mib": {"rss": mem_ready.rss, "anon": mem_ready.anon, "heap_in_use": mem_ready_heap.0, "heap_free": mem_ready_heap.1},
        "mem_after_changes_mib": {"rss": mem_after.rss, "anon": mem_after.anon, "heap_in_use": mem_after_heap.0, "heap_free": mem_after_heap.1},
        "mem_after_churn_mib": {"rss": mem_churn.rss, "anon": mem_churn.anon, "heap_in_use": mem_churn_heap.0, "heap_free": mem_churn_heap.1},
        "pod_relabel_ms": took_json(&took[0]),
        "namespace_label_ms": took_json(&took[1]),
        "policy_edit_ms": took_json(&took[2]),
        "churn": {"updates_per_sec": updates as f64 / churn_secs, "daemon_cpu_pct": 100.0 * cpu / churn_secs},
        "new_flow_setup_us": {"quiet": flow_quiet, "churn": flow_churn, "rate_per_sec": FLOW_RATE},
    }))
}

pub fn run(args: &[String]) -> Result<bool> {
    let o = parse(args)?;
    mesh_tests::require_root()?;
    crate::test::prepare_machine(o.sources.contains(&"kube"))?;
    super::prepare(false)?;
    let load_before = super::uptime();
    let mut results = Vec::new();
    for source in &o.sources {
        eprintln!("scale: measuring the {source} source");
        let r = measure(&o, source)?;
        eprintln!("scale: {source}: {}", serde_json::to_string(&r)?);
        results.push(r);
    }
    println!("\n| source | ready s | RSS / anon MiB ready | after changes | after churn | pod relabel ms (e2e / daemon) | namespace label ms | policy edit ms | churn: updates/s, daemon CPU % | new flow p50 / p99 µs, quiet -> churn |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let m = |k: &str| {
            format!(
                "{:.1} / {:.1} (heap {:.1} + {:.1} free)",
                r[k]["rss"].as_f64().unwrap_or(0.0),
                r[k]["anon"].as_f64().unwrap_or(0.0),
                r[k]["heap_in_use"].as_f64().unwrap_or(f64::NAN),
                r[k]["heap_free"].as_f64().unwrap_or(f64::NAN)
            )
        };
        let c = |k: &str| {
            let mut t = format!(
                "{:.1} / {:.2}",
                r[k]["end_to_end"]["median"].as_f64().unwrap_or(0.0),
                r[k]["daemon"]["median"].as_f64().unwrap_or(0.0)
            );
            if let Some(w) = r[k]["file_write_to_in_force"]["median"].as_f64() {
                t += &format!(" (written to in force {w:.1})");
            }
            t
        };
        let f = |k: &str, p: &str| r["new_flow_setup_us"][k][p].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {:.0}, {:.1} | {:.0} / {:.0} -> {:.0} / {:.0} |",
            r["source"].as_str().unwrap_or(""),
            r["ready_secs"].as_f64().unwrap_or(0.0),
            m("mem_ready_mib"),
            m("mem_after_changes_mib"),
            m("mem_after_churn_mib"),
            c("pod_relabel_ms"),
            c("namespace_label_ms"),
            c("policy_edit_ms"),
            r["churn"]["updates_per_sec"].as_f64().unwrap_or(0.0),
            r["churn"]["daemon_cpu_pct"].as_f64().unwrap_or(0.0),
            f("quiet", "p50_us"),
            f("quiet", "p99_us"),
            f("churn", "p50_us"),
            f("churn", "p99_us"),
        );
    }
    let out = json!({
        "command": format!("cargo xtask bench scale {}", args.join(" ")),
        "uptime_before": load_before,
        "uptime_after": super::uptime(),
        "state": {"namespaces": NAMESPACES, "pods": PODS, "local_pods": LOCAL_PODS, "services": SERVICES, "policies": POLICIES},
        "machine": super::machine(),
        "when": super::now_utc(),
        "results": results,
    });
    let dir = crate::target_dir()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("\nJSON: {}", path.display());
    Ok(true)
}
