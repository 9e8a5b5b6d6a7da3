//! `cargo xtask demo [--kube] [--once]`: the mesh at a glance.
//!
//! Two nodes; namespace `demo` (ambient) with `client` (node1), `server-1` (node2) and
//! `server-2` (node1) behind Service `server` (10.96.0.10:80 -> 8080); namespace `legacy`
//! (not enrolled) with `legacy` (node2). Traffic of each kind the daemon handles is driven
//! through it while the fabric is captured, and the report shows what a user would want to
//! verify: who answered, which source address the server saw, which identities the daemons
//! authenticated, and that nothing between enrolled pods crossed the wire in clear.
//!
//! Then the waypoint part (`demo_waypoint`): Service `reviews` goes through a waypoint that
//! splits it 90/10 between two versions and allows GET only; the report shows the split, an
//! allowed GET, a denied POST and the waypoint's access lines.
//!
//! With `--kube` the cluster's objects live in a real kube-apiserver (in the fabric namespace)
//! and the daemons follow it (`--source kube`); the demo then also enrolls namespace `legacy`
//! with a label applied through the API, and prints the `kubectl` commands to go on with.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{demo_up, interrupt};
use mesh_tests::app::{SendOpts, SendReport, Server};
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, PodSpec, SvcSpec};
use mesh_tests::pcap::Pcap;
use serde_json::Value;

const VIP: &str = "10.96.0.10:80";
const SECRET: &str = "DEMO-SECRET-PAYLOAD";
const LEGACY: &str = "DEMO-LEGACY-PAYLOAD";
const HBONE: u16 = 15008;

fn spec() -> ClusterSpec {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace("legacy", false)
        .pod(PodSpec::new("demo/client", 1).sa("client"))
        .pod(
            PodSpec::new("demo/server-1", 2)
                .sa("server")
                .label("app", "server"),
        )
        .pod(
            PodSpec::new("demo/server-2", 1)
                .sa("server")
                .label("app", "server"),
        )
        .pod(PodSpec::new("legacy/legacy", 2))
        .service(
            SvcSpec::new("demo/server", "10.96.0.10")
                .select("app", "server")
                .port(80, 8080),
        );
    super::demo_waypoint::add_to(spec)
}

/// Builds the debug binaries the demo runs (with `ZTUNNEL_BIN` set, it runs that daemon instead).
pub fn build() -> Result<()> {
    super::run_status(
        super::cargo()
            .args([
                "build",
                "-p",
                "ztunnel",
                "-p",
                "mesh-tests",
                "-p",
                "waypoint",
                "--bins",
            ])
            .current_dir(mesh_tests::workspace_root()),
    )
}

/// One driven flow and what was observed about it.
struct Flow {
    title: &'static str,
    from: String,
    from_ip: Ipv4Addr,
    to: String,
    report: SendReport,
    /// `(node, access line)` logged while the flow ran.
    access: Vec<(usize, Value)>,
}

pub fn run(args: &[String]) -> Result<bool> {
    let (mut once, mut kube, mut up, mut background) = (false, false, false, false);
    for a in args {
        match a.as_str() {
            "--once" => once = true,
            "--kube" => kube = true,
            "--up" => up = true,
            "--down" => return demo_up::down(),
            // `--up`'s own process, after the foreground prepared and built.
            "--background" => background = true,
            _ => bail!("usage: cargo xtask demo [--kube] [--once | --up | --down]"),
        }
    }
    mesh_tests::require_root()?;
    if !background {
        super::test::prepare_machine(kube)?;
        build()?;
    }
    if up {
        return demo_up::up(kube);
    }

    let mut cluster = if kube {
        println!("starting etcd and kube-apiserver ...");
        Cluster::start_kube(spec())?
    } else {
        Cluster::start(spec())?
    };
    println!("cluster {} created; starting daemons ...", cluster.prefix());
    cluster.start_all_daemons()?;
    let _servers: Vec<Server> = ["demo/server-1", "demo/server-2", "legacy/legacy"]
        .iter()
        .map(|key| {
            let pod = cluster.pod(key);
            pod.serve(8080, &pod.name)
        })
        .collect::<Result<_>>()?;
    let waypoint = super::demo_waypoint::start(&mut cluster)?;

    let capture = cluster.capture_fabric("")?;
    let ip = |key: &str| cluster.pod(key).ip;
    let s1 = format!("{}:8080", ip("demo/server-1"));
    let plan = [
        (
            "client -> server-1 by pod IP (HBONE across nodes)",
            "demo/client",
            s1.clone(),
            SECRET,
            1,
        ),
        (
            "client -> Service VIP (load-balanced, port 80 -> 8080)",
            "demo/client",
            VIP.into(),
            SECRET,
            8,
        ),
        (
            "client -> legacy (not enrolled: passthrough)",
            "demo/client",
            format!("{}:8080", ip("legacy/legacy")),
            LEGACY,
            1,
        ),
        (
            "legacy -> server-1 (plaintext inbound)",
            "legacy/legacy",
            s1,
            LEGACY,
            1,
        ),
    ];
    let mut flows = Vec::new();
    for (title, from, to, marker, conns) in plan {
        let pod = cluster.pod(from).clone();
        let before: Vec<usize> = (1..=2)
            .map(|n| cluster.daemon(n).log_lines().len())
            .collect();
        let opts = SendOpts::to(&to)
            .bytes(64 * 1024)
            .marker(marker)
            .conns(conns);
        let report = pod.send(&opts)?;
        let access = settle_access(&cluster, &before);
        flows.push(Flow {
            title,
            from: pod.key(),
            from_ip: pod.ip,
            to,
            report,
            access,
        });
    }
    let pcap = capture.stop()?;
    let l7 = super::demo_waypoint::drive(&cluster, &waypoint)?;

    for (i, f) in flows.iter().enumerate() {
        print_flow(i + 1, f);
    }
    let enrolled: BTreeSet<Ipv4Addr> = ["demo/client", "demo/server-1", "demo/server-2"]
        .iter()
        .map(|k| ip(k))
        .collect();
    let leaks = print_fabric(&pcap, &enrolled);
    super::demo_waypoint::print(&l7);
    let mut checks = checks(&cluster, &flows, &pcap, &leaks);
    checks.extend(super::demo_waypoint::checks(&l7));
    if kube {
        checks.extend(kube_checks(&mut cluster));
    }
    println!("\nChecks");
    for (ok, what) in &checks {
        println!("  [{}] {what}", if *ok { "PASS" } else { "FAIL" });
    }
    let all_ok = checks.iter().all(|(ok, _)| *ok);
    println!(
        "\n{} of {} checks passed.",
        checks.iter().filter(|(ok, _)| *ok).count(),
        checks.len()
    );
    if once {
        println!("Tearing down (--once).");
        return Ok(all_ok);
    }
    let commands = poke(&cluster);
    if background {
        demo_up::write_description(&cluster, all_ok, &commands)?;
        println!("\n`cargo xtask demo --down` tears it down.");
    } else {
        println!("\nPress Ctrl-C to tear down.");
    }
    let sig = interrupt::wait();
    println!("\n(received {}) Tearing down ...", interrupt::name(sig));
    drop(cluster);
    demo_up::remove_description();
    Ok(all_ok)
}

/// Waits until the daemons' logs stop growing (access lines are written when connections
/// close, a moment after the client returns), then returns the new access lines.
fn settle_access(cluster: &Cluster, before: &[usize]) -> Vec<(usize, Value)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last: Vec<usize> = Vec::new();
    let mut stable_since = Instant::now();
    loop {
        let now: Vec<usize> = (1..=2)
            .map(|n| cluster.daemon(n).log_lines().len())
            .collect();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_millis(400) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Vec::new();
    for n in 1..=2 {
        let skip = before.get(n - 1).copied().unwrap_or(0);
        for l in cluster.daemon(n).log_lines().into_iter().skip(skip) {
            if message(&l) == "access" {
                out.push((n, l));
            }
        }
    }
    out
}

fn print_flow(i: usize, f: &Flow) {
    println!("\n[{i}] {}", f.title);
    println!("    source      {} ({})", f.from, f.from_ip);
    println!("    destination {}", f.to);
    let ok = f.report.conns.iter().filter(|c| c.ok).count();
    println!(
        "    result      {ok}/{} connections intact, {} B each way",
        f.report.conns.len(),
        f.report.conns.first().map_or(0, |c| c.bytes)
    );
    for c in &f.report.conns {
        match (&c.server, &c.error) {
            (Some(s), None) => println!(
                "      answered by {s:<9} which saw the client as {}",
                c.peer_seen.as_deref().unwrap_or("?")
            ),
            (_, Some(e)) => println!("      FAILED: {e}"),
            (None, None) => println!("      no answer"),
        }
    }
    if f.access.is_empty() {
        println!("    access log  (none)");
    }
    for (node, l) in &f.access {
        let id = |k: &str| match field(l, k) {
            "" => "-".to_string(),
            s => s.to_string(),
        };
        let err = match field(l, "error") {
            "" => String::new(),
            e => format!("  error: {e}"),
        };
        println!(
            "    access log  node{node} {:<11} {:<5} {} -> {}{err}",
            field(l, "reporter"),
            field(l, "protocol"),
            id("src_identity"),
            id("dst_identity"),
        );
    }
}

/// Prints what crossed the fabric; returns the flows between enrolled pods not on 15008.
fn print_fabric(pcap: &Pcap, enrolled: &BTreeSet<Ipv4Addr>) -> Vec<String> {
    println!("\nFabric capture ({})", pcap.path.display());
    print!("{}", pcap.summary());
    let flows = pcap.flows();
    let ports: BTreeSet<u16> = flows
        .iter()
        .filter(|f| f.payload_bytes > 0)
        .map(|f| f.server.port())
        .collect();
    println!("  server ports that carried payload: {ports:?}");
    let leaks: Vec<String> = flows
        .iter()
        .filter(|f| f.payload_bytes > 0 && f.server.port() != HBONE)
        .filter(|f| enrolled.contains(f.client.ip()) && enrolled.contains(f.server.ip()))
        .map(|f| format!("{} -> {}", f.client, f.server))
        .collect();
    println!(
        "  between enrolled pods, payload on anything but TCP {HBONE}: {}",
        if leaks.is_empty() {
            "none".to_string()
        } else {
            leaks.join(", ")
        }
    );
    println!(
        "  secret marker `{SECRET}` in clear: {}",
        yes_no(pcap.contains(SECRET.as_bytes()))
    );
    println!(
        "  legacy marker `{LEGACY}` in clear: {} (expected: legacy is not in the mesh)",
        yes_no(pcap.contains(LEGACY.as_bytes()))
    );
    leaks
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn checks(cluster: &Cluster, flows: &[Flow], pcap: &Pcap, leaks: &[String]) -> Vec<(bool, String)> {
    let pod = |k: &str| cluster.pod(k).clone();
    let (client, server1, legacy) = (
        pod("demo/client"),
        pod("demo/server-1"),
        pod("legacy/legacy"),
    );
    let saw_only = |f: &Flow, ip: Ipv4Addr| f.report.peer_ips() == [IpAddr::from(ip)].into();
    let intact = |f: &Flow| f.report.check().is_ok();
    let logged = |f: &Flow, node: usize, pred: &dyn Fn(&Value) -> bool| {
        f.access.iter().any(|(n, l)| *n == node && pred(l))
    };
    let mut out = Vec::new();
    if let [direct, vip, passthrough, inbound] = flows {
        out.push((
            intact(direct),
            "client -> server-1: all bytes echoed intact".into(),
        ));
        out.push((
            saw_only(direct, client.ip),
            format!(
                "client -> server-1: server saw the client's own IP {}",
                client.ip
            ),
        ));
        out.push((
            logged(direct, server1.node, &|l| {
                field(l, "reporter") == "destination"
                    && field(l, "src_identity") == client.identity()
            }),
            format!(
                "server's node authenticated the client as {}",
                client.identity()
            ),
        ));
        out.push((
            logged(direct, client.node, &|l| {
                field(l, "reporter") == "source" && field(l, "dst_identity") == server1.identity()
            }),
            format!(
                "client's node authenticated the server as {}",
                server1.identity()
            ),
        ));
        out.push((
            intact(vip),
            "client -> Service VIP: all connections intact".into(),
        ));
        out.push((
            vip.report.servers() == ["server-1".to_string(), "server-2".to_string()].into(),
            "client -> Service VIP: both endpoints (one per node) answered on targetPort 8080"
                .into(),
        ));
        out.push((
            intact(passthrough) && saw_only(passthrough, client.ip),
            "client -> legacy: passthrough works, legacy saw the client's IP".into(),
        ));
        out.push((
            intact(inbound) && saw_only(inbound, legacy.ip),
            "legacy -> server-1: plaintext inbound works, server saw legacy's IP".into(),
        ));
        out.push((
            logged(inbound, server1.node, &|l| {
                field(l, "reporter") == "destination" && field(l, "protocol") == "TCP"
            }),
            "legacy -> server-1: logged as plaintext (protocol TCP) by the server's node".into(),
        ));
    }
    out.push((
        leaks.is_empty(),
        format!("only HBONE (TCP {HBONE}) carried payload between enrolled pods"),
    ));
    out.push((
        !pcap.contains(SECRET.as_bytes()),
        "the enrolled pods' payload never crossed the fabric in clear".into(),
    ));
    out
}

/// Prints the pods and commands to try on the running cluster, and returns the commands (the
/// background demo also puts them in its description).
fn poke(cluster: &Cluster) -> Vec<String> {
    let meshapp = mesh_tests::meshapp_bin();
    let client = cluster.pod("demo/client");
    println!("\nThe cluster keeps running. Pods:");
    for p in cluster.pods() {
        println!(
            "  {:<16} {:<12} node{}  netns {}",
            p.key(),
            p.ip,
            p.node,
            p.netns
        );
    }
    let mut commands = vec![
        format!(
            "ip netns exec {} {} send --to {VIP} --bytes 1000 --conns 4",
            client.netns,
            meshapp.display()
        ),
        format!(
            "ip netns exec {} {} connect --to {}:8080",
            client.netns,
            meshapp.display(),
            cluster.pod("legacy/legacy").ip
        ),
    ];
    commands.extend(super::demo_waypoint::poke(cluster));
    commands.extend([
        format!("ip netns exec {} tcpdump -ni br0", cluster.fabric_netns()),
        format!("ip netns exec {} ss -tnp", cluster.node_netns(1)),
        format!(
            "{} status --admin-socket {}",
            mesh_tests::ztunnel_bin().display(),
            cluster.admin_socket(1).display()
        ),
        format!("tail -f {}/logs/node1.log", cluster.workdir().display()),
    ]);
    println!("\nTry:");
    for c in &commands {
        println!("  {c}");
    }
    if let Some(cp) = cluster.kube_api() {
        let kubectl = format!(
            "ip netns exec {} {} --kubeconfig {}",
            cluster.fabric_netns(),
            cp.api.kubectl_bin().display(),
            cp.api.kubeconfig().display()
        );
        println!(
            "\nThe API server (https://{}) holds the objects; the daemons follow it:",
            cp.api.server_url().trim_start_matches("https://")
        );
        let kube_commands = [
            format!("{kubectl} get namespaces,pods,services -A -o wide"),
            format!("{kubectl} label namespace legacy istio.io/dataplane-mode-"),
            format!(
                "{kubectl} apply -f - <<'EOF'\n\
                 apiVersion: security.istio.io/v1\n\
                 kind: AuthorizationPolicy\n\
                 metadata: {{name: only-client, namespace: demo}}\n\
                 spec: {{selector: {{matchLabels: {{app: server}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]}}]}}\n\
                 EOF"
            ),
        ];
        for c in &kube_commands {
            println!("  {c}");
        }
        println!("  (`status` above shows 'state source: kube, in sync')");
        commands.extend(kube_commands);
    }
    commands
}

/// With the API server: a label applied through it enrolls `legacy` on both nodes within a
/// second, and both daemons say their view is current.
fn kube_checks(cluster: &mut Cluster) -> Vec<(bool, String)> {
    let before: Vec<usize> = (1..=2)
        .map(|n| cluster.daemon(n).log_lines().len())
        .collect();
    let start = Instant::now();
    let labelled = cluster.set_namespace_label(
        "legacy",
        mesh_tests::cluster::DATAPLANE_MODE,
        Some("ambient"),
    );
    let enrolled = labelled.is_ok()
        && (1..=2).all(|n| {
            cluster
                .daemon(n)
                .wait_for_log_after(
                    before[n - 1],
                    // The five enrolled pods of `demo` (a waypoint's pod never is) and legacy.
                    |l| message(l) == "state applied" && l["enrolled"].as_u64() == Some(6),
                    Duration::from_secs(5),
                )
                .is_ok()
        });
    let took = start.elapsed();
    let in_sync = (1..=2).all(|n| {
        mesh_tests::testkit::node_http(cluster, n, 15000, "GET", "/config_dump")
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .is_some_and(|d| d["source"]["source"] == "kube" && d["source"]["in_sync"] == true)
    });
    vec![
        (
            in_sync,
            "both daemons follow the API server and are in sync (--source kube)".to_string(),
        ),
        (
            enrolled && took < Duration::from_secs(1),
            format!(
                "`kubectl label namespace legacy istio.io/dataplane-mode=ambient` enrolled it on both nodes {} ms after kubectl started",
                took.as_millis()
            ),
        ),
    ]
}
