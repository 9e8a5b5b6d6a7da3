//! Acceptance tests of what operators observe: Istio-named metrics with exact counts and
//! labels on both reporters, a real `promtool` and a real Prometheus scraping the daemon, the
//! admin API and the status commands, readiness, and the graceful drain on SIGTERM and on the
//! admin socket. (The HTTP behaviour of the ports themselves: tests/tests/admin.rs.)
//!
//! Needs root, a built `ztunnel`, and Debian's `prometheus` package (`promtool`,
//! `prometheus`); `cargo xtask test` provides all. Missing tools fail the test, never skip it.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{message, Cluster, ClusterSpec, PodSpec, SvcSpec, PODS_FILE};
use mesh_tests::testkit::{admin_socket_http, node_http as http, promtool_check, ztunnel_cli};
use serde_json::Value;

const METRICS: u16 = 15020;
const ADMIN: u16 = 15000;
const READINESS: u16 = 15021;
const WAIT: Duration = Duration::from_secs(15);

fn two_node_spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(
            PodSpec::new("mesh/a", 1)
                .sa("client")
                .label("version", "v1"),
        )
        .pod(PodSpec::new("mesh/b", 2).sa("server"))
        .service(
            SvcSpec::new("mesh/b-svc", "10.96.0.20")
                .select("app", "b")
                .port(80, 8080),
        )
}

fn scrape(c: &Cluster, node: usize) -> String {
    let (status, body) = http(c, node, METRICS, "GET", "/metrics").expect("scrape");
    assert_eq!(status, 200, "{body}");
    body
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let value: f64 = value.parse().unwrap_or(f64::NAN);
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((k, after)) = rest.split_once("=\"") {
            let end = after.find('"').unwrap_or(after.len());
            map.insert(
                k.trim_start_matches(',').to_string(),
                after[..end].to_string(),
            );
            rest = after.get(end + 1..).unwrap_or("");
        }
        out.push((name.to_string(), map, value));
    }
    out
}

/// Sum of `name` over samples whose labels include all of `want`.
fn total(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_connections_and_bytes_on_both_reporters() {
    let mut c = Cluster::start(two_node_spec()).expect("cluster");
    c.start_all_daemons().expect("daemons");
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _srv = b.serve(8080, "b").expect("serve");
    const CONNS: usize = 3;
    const BYTES: u64 = 200_000;
    let report = a
        .send(&SendOpts::to("10.96.0.20:80").bytes(BYTES).conns(CONNS))
        .expect("send runs");
    report.check().expect("send ok");
    // What the server sent back per connection: its greeting, then the echo.
    let sent: u64 = report
        .conns
        .iter()
        .map(|r| {
            let peer = r.peer_seen.as_deref().expect("peer_seen");
            format!("HELLO b {peer}\n").len() as u64 + BYTES
        })
        .sum();
    let received = BYTES * CONNS as u64;

    let labels = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "a"),
            ("source_workload_namespace", "mesh"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/mesh/sa/client",
            ),
            ("source_app", "a"),
            ("source_version", "v1"),
            ("source_cluster", "Kubernetes"),
            ("destination_service", "b-svc.mesh.svc.cluster.local"),
            ("destination_service_name", "b-svc"),
            ("destination_service_namespace", "mesh"),
            ("destination_workload", "b"),
            ("destination_workload_namespace", "mesh"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/mesh/sa/server",
            ),
            ("destination_app", "b"),
            ("destination_version", "latest"),
            ("destination_cluster", "Kubernetes"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    for (node, reporter) in [(1, "source"), (2, "destination")] {
        let want = labels(reporter);
        // The close is counted when the flow ends on that daemon, a moment after the client
        // has its echo; wait for it, then require exact figures.
        let samples = wait_until(&format!("{CONNS} closed connections on node{node}"), || {
            let s = parse_metrics(&scrape(&c, node));
            (total(
                &s,
                "istio_tcp_connections_closed_total",
                &[("reporter", reporter)],
            ) >= CONNS as f64)
                .then_some(s)
        });
        let all = [("reporter", reporter)];
        for (name, expect) in [
            ("istio_tcp_connections_opened_total", CONNS as f64),
            ("istio_tcp_connections_closed_total", CONNS as f64),
            ("istio_tcp_received_bytes_total", received as f64),
            ("istio_tcp_sent_bytes_total", sent as f64),
        ] {
            assert_eq!(
                total(&samples, name, &all),
                expect,
                "node{node} {name} (all {reporter} series)"
            );
            assert_eq!(
                total(&samples, name, &want),
                expect,
                "node{node} {name} with labels {want:?}; samples: {:?}",
                samples.iter().filter(|s| s.0 == name).collect::<Vec<_>>()
            );
        }
        assert_eq!(
            total(&samples, "istio_build", &[("component", "ztunnel")]),
            1.0,
            "build info on node{node}"
        );
        assert_eq!(
            total(&samples, "ztunnel_capture_enrolled_pods", &[]),
            1.0,
            "node{node} captures its one enrolled pod"
        );
        assert!(
            total(&samples, "ztunnel_capture_attached_programs", &[]) >= 2.0,
            "node{node}: uplink and pod veth attached"
        );
        let expiry = total(
            &samples,
            "ztunnel_workload_certificate_expiry_timestamp_seconds",
            &[],
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(
            expiry > now,
            "node{node} certificate expiry {expiry} in the future"
        );
    }
    let pool = parse_metrics(&scrape(&c, 1));
    assert_eq!(
        total(&pool, "ztunnel_hbone_pool_streams", &[]),
        0.0,
        "no flows left on node1's pool"
    );
    assert!(
        total(&pool, "ztunnel_hbone_pool_connections", &[]) >= 1.0,
        "node1 keeps its pooled HBONE connection"
    );
}

/// Concurrent flows are spread over the data-plane workers (each accepted socket goes to the
/// least busy one), and the per-worker gauge shows it while they are held.
#[test]
fn worker_gauge_shows_held_flows_spread_over_the_workers() {
    let mut c = Cluster::start(two_node_spec()).expect("cluster");
    for node in 1..=2 {
        c.start_daemon(node, &["--worker-threads", "2"])
            .expect("daemon");
    }
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _srv = b.serve(8080, "b").expect("serve");
    let held = a
        .spawn_send(&SendOpts::to(&format!("{}:8080", b.ip)).conns(6).hold(6.0))
        .expect("send starts");
    let per_worker = |samples: &[Sample]| -> Vec<f64> {
        ["0", "1"]
            .iter()
            .map(|w| total(samples, "ztunnel_worker_connections", &[("worker", w)]))
            .collect()
    };
    let loads = wait_until("6 held flows on node1's workers", || {
        let loads = per_worker(&parse_metrics(&scrape(&c, 1)));
        (loads.iter().sum::<f64>() >= 6.0).then_some(loads)
    });
    assert_eq!(
        loads,
        vec![3.0, 3.0],
        "node1 serves the 6 concurrent flows 3 per worker"
    );
    let report = held.wait().expect("send finishes");
    report.check().expect("held flows end cleanly");
    let after = wait_until("node1's workers idle again", || {
        let loads = per_worker(&parse_metrics(&scrape(&c, 1)));
        (loads.iter().sum::<f64>() == 0.0).then_some(loads)
    });
    assert_eq!(after, vec![0.0, 0.0]);
}

#[test]
fn byte_counters_advance_during_a_long_transfer() {
    let mut c = Cluster::start(two_node_spec()).expect("cluster");
    c.start_all_daemons().expect("daemons");
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _srv = b.serve(8080, "b").expect("serve");
    const BYTES: u64 = 4 * 1024 * 1024;
    let pending = a
        .spawn_send(
            &SendOpts::to(&format!("{}:8080", b.ip))
                .bytes(BYTES)
                .hold(4.0),
        )
        .expect("send starts");
    // While the connection is still open (held), the counters already show the bytes.
    let samples = wait_until("received bytes while the connection is open", || {
        let s = parse_metrics(&scrape(&c, 2));
        (total(&s, "istio_tcp_received_bytes_total", &[]) >= BYTES as f64).then_some(s)
    });
    assert_eq!(
        total(&samples, "istio_tcp_connections_closed_total", &[]),
        0.0,
        "the connection is still open"
    );
    assert_eq!(
        total(&samples, "istio_tcp_connections_opened_total", &[]),
        1.0
    );
    pending.wait().expect("send").check().expect("send ok");
}

fn require(tool: &str) {
    mesh_tests::require_tool(tool, "prometheus").expect("tool present");
}

#[test]
fn promtool_accepts_the_scrape_and_prometheus_scrapes_the_daemon() {
    require("promtool");
    require("prometheus");
    let mut c = Cluster::start(two_node_spec()).expect("cluster");
    c.start_all_daemons().expect("daemons");
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _srv = b.serve(8080, "b").expect("serve");
    a.send(&SendOpts::to("10.96.0.20:80"))
        .expect("send")
        .check()
        .expect("send ok");
    wait_until("a closed connection on node1", || {
        let s = parse_metrics(&scrape(&c, 1));
        (total(&s, "istio_tcp_connections_closed_total", &[]) >= 1.0).then_some(())
    });

    let text = scrape(&c, 1);
    promtool_check(&text, &[]);

    // A real Prometheus inside node1's namespace, scraping the daemon every second.
    let dir = c.workdir().join("prometheus");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: ztunnel\n  metrics_path: /stats/prometheus\n  \
             static_configs: [{{targets: ['127.0.0.1:{METRICS}']}}]\n"
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let prom = Command::new("ip")
        .args(["netns", "exec", &c.node_netns(1), "prometheus"])
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .args(["--web.listen-address=127.0.0.1:19090"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(prom);
    let query = |q: &str| -> Option<Vec<Value>> {
        let (status, body) = http(&c, 1, 19090, "GET", &format!("/api/v1/query?query={q}")).ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"].as_array().cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let up = query("up%7Bjob%3D%22ztunnel%22%7D");
        let opened = query("istio_tcp_connections_opened_total%7Breporter%3D%22source%22%7D");
        if let (Some(up), Some(opened)) = (up, opened) {
            if up.first().and_then(|u| u["value"][1].as_str()) == Some("1") && !opened.is_empty() {
                break opened;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the daemon; log:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let metric = &result[0]["metric"];
    assert_eq!(metric["destination_workload"], "b", "{result:?}");
    assert_eq!(metric["source_workload"], "a", "{result:?}");
    assert_eq!(result[0]["value"][1], "1", "{result:?}");
}

#[test]
fn config_dump_status_commands_and_log_level() {
    let mut c = Cluster::start(two_node_spec()).expect("cluster");
    c.start_all_daemons().expect("daemons");
    let (status, body) = http(&c, 1, ADMIN, "GET", "/config_dump").expect("config_dump");
    assert_eq!(status, 200);
    assert!(!body.contains("PRIVATE KEY"), "config_dump leaks a key");
    let dump: Value = serde_json::from_str(&body).expect("config_dump is JSON");
    let pods = dump["enrolled_pods"].as_array().expect("enrolled_pods");
    let a = pods
        .iter()
        .find(|p| p["pod"] == "mesh/a")
        .unwrap_or_else(|| panic!("mesh/a in {pods:?}"));
    assert_eq!(a["captured"], true, "{a}");
    assert_eq!(a["enrolled"], true, "{a}");
    let certs = dump["certificates"].as_array().expect("certificates");
    let cert = certs
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/mesh/sa/client")
        .unwrap_or_else(|| panic!("client certificate in {certs:?}"));
    assert!(
        cert["serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{cert}"
    );
    assert!(cert["not_after"].as_u64().is_some(), "{cert}");
    assert!(dump["workloads"].as_array().is_some_and(|w| w.len() == 2));
    assert!(
        dump["services"]["mesh/b-svc"].is_object(),
        "{}",
        dump["services"]
    );

    let table = ztunnel_cli(&c, 1, &["status"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("mesh/a "))
        .unwrap_or_else(|| panic!("status lists mesh/a:\n{table}"));
    assert!(row.contains("10.244.1.11") && row.contains("true"), "{row}");
    assert!(table.contains("ready: true"), "{table}");
    let header = table
        .lines()
        .find(|l| l.starts_with("POD "))
        .expect("table header");
    assert_eq!(
        header.find("IDENTITY"),
        row.find("spiffe://"),
        "columns align:\n{table}"
    );
    let workloads: Value =
        serde_json::from_str(&ztunnel_cli(&c, 1, &["workloads", "-o", "json"])).expect("JSON");
    assert_eq!(workloads.as_array().map(Vec::len), Some(2), "{workloads}");
    let certs = ztunnel_cli(&c, 1, &["certificates"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/mesh/sa/client") && certs.contains("issued"),
        "{certs}"
    );
    // The same view from the read-only TCP port (the expiry countdown aside).
    let over_tcp = ztunnel_cli(&c, 1, &["certificates", "--admin", "127.0.0.1:15000"]);
    let identity_and_serial = |table: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(identity_and_serial(&over_tcp), identity_and_serial(&certs));

    // Log level at run time: node2 logs the HBONE connection at debug only after the change,
    // which only the admin socket takes.
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _srv = b.serve(8080, "b").expect("serve");
    let d = c.daemon(2);
    let (status, body) = http(&c, 2, ADMIN, "POST", "/logging?level=debug").expect("logging");
    assert_eq!(status, 403, "the TCP port refuses a change: {body}");
    assert!(
        body.contains(&c.admin_socket(2).display().to_string()),
        "{body}"
    );
    assert_eq!(ztunnel_cli(&c, 2, &["log-level"]), "level: info\n");
    let body = ztunnel_cli(&c, 2, &["log-level", "debug"]);
    assert!(body.contains("debug"), "{body}");
    let skip = d.log_lines().len();
    a.send(&SendOpts::to(&format!("{}:8080", b.ip)))
        .expect("send")
        .check()
        .expect("send ok");
    d.wait_for_log_after(
        skip,
        |l| l["level"] == "DEBUG" && message(l) == "HBONE connection accepted",
        WAIT,
    )
    .expect("debug lines after /logging?level=debug");
    let (status, _) =
        admin_socket_http(&c, 2, "POST", "/logging?level=bogus%3D%3D").expect("logging");
    assert_eq!(status, 400, "a bad level is refused");
}

#[test]
fn readiness_is_503_until_the_state_loads() {
    let spec = ClusterSpec::new(1)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1));
    let mut c = Cluster::start(spec).expect("cluster");
    // The pod file is broken when the daemon starts: the state is not loaded.
    c.write_node_state_file(1, PODS_FILE, "apiVersion: v1\nkind: Pod\nmetadata: [\n")
        .expect("write");
    c.start_daemon_unready(1, &[]).expect("daemon spawns");
    c.daemon(1)
        .wait_for_log(|l| message(l) == "state rejected", WAIT)
        .expect("state rejected");
    let status = wait_until("readiness listener", || {
        http(&c, 1, READINESS, "GET", "/healthz/ready").ok()
    });
    assert_eq!(status.0, 503, "not ready before the state loads");
    std::thread::sleep(Duration::from_secs(1));
    let again = http(&c, 1, READINESS, "GET", "/healthz/ready").expect("probe");
    assert_eq!(again.0, 503, "still not ready");

    let good = c.spec().render_pods().expect("render");
    c.write_node_state_file(1, PODS_FILE, &good).expect("write");
    c.daemon(1)
        .wait_ready()
        .expect("ready after the state loads");
    let status = http(&c, 1, READINESS, "GET", "/healthz/ready").expect("probe");
    assert_eq!(status.0, 200, "{}", status.1);
}

#[test]
fn sigterm_drains_a_long_transfer_and_refuses_new_connections() {
    let mut c = Cluster::start(two_node_spec()).expect("cluster");
    c.start_daemon(1, &[]).expect("node1");
    c.start_daemon(2, &["--drain-timeout", "20s"])
        .expect("node2");
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _srv = b.serve(8080, "b").expect("serve");
    let to = format!("{}:8080", b.ip);
    let pending = a
        .spawn_send(&SendOpts::to(&to).bytes(1024 * 1024).hold(4.0).timeout(30.0))
        .expect("send starts");
    wait_until("the long flow is open on node2", || {
        let s = parse_metrics(&scrape(&c, 2));
        (total(&s, "istio_tcp_connections_opened_total", &[]) >= 1.0).then_some(())
    });

    let d2 = c.daemon(2);
    let skip = d2.log_lines().len();
    let exit = std::thread::scope(|s| {
        let term = s.spawn(|| d2.terminate());
        d2.wait_for_log_after(skip, |l| message(l).starts_with("draining"), WAIT)
            .expect("drain starts");
        let attempt = a
            .connect(to.parse().expect("addr"), Duration::from_secs(3))
            .expect("connect runs");
        assert_ne!(
            attempt.result, "hello",
            "a new connection during the drain must be refused: {attempt:?}"
        );
        let report = pending.wait().expect("send finishes");
        report
            .check()
            .expect("the long transfer completes during the drain");
        term.join().expect("terminate thread")
    })
    .expect("daemon exits");
    assert!(exit.success(), "exit status {exit}");
    let lines = d2.log_lines();
    let done = lines
        .iter()
        .find(|l| message(l) == "drain finished")
        .expect("drain finished logged");
    assert_eq!(done["left"], 0, "every flow finished: {done}");
    if let Some(l) = lines
        .iter()
        .find(|l| message(l) == "access" && l["error"].as_str().is_some_and(|e| !e.is_empty()))
    {
        panic!("the drained flow ended with an error: {l}");
    }
}

/// Any process in the node's network namespace reaches the TCP admin port: there
/// `/quitquitquit` is refused and the daemon goes on; on the admin socket it drains and exits.
#[test]
fn quitquitquit_only_on_the_admin_socket() {
    let spec = ClusterSpec::new(1)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1));
    let mut c = Cluster::start(spec).expect("cluster");
    c.start_all_daemons().expect("daemon");
    let d = c.daemon(1);
    for method in ["POST", "GET"] {
        let (status, body) = http(&c, 1, ADMIN, method, "/quitquitquit").expect("quit over TCP");
        assert_eq!(
            status, 403,
            "{method} /quitquitquit on the TCP port: {body}"
        );
        assert!(body.contains("admin socket"), "{body}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.is_running(), "the TCP port stopped the daemon");
    let (status, _) = http(&c, 1, READINESS, "GET", "/healthz/ready").expect("probe");
    assert_eq!(status, 200, "still ready after the refused quits");
    assert!(
        !d.log_lines()
            .iter()
            .any(|l| message(l).starts_with("drain")),
        "no drain started"
    );

    let socket = c.admin_socket(1);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket).expect("socket").permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "only the daemon's user may open the socket"
    );
    let (status, _) = admin_socket_http(&c, 1, "GET", "/quitquitquit").expect("GET on the socket");
    assert_eq!(status, 405, "a change takes POST");
    let (status, _) = admin_socket_http(&c, 1, "POST", "/quitquitquit").expect("quit");
    assert_eq!(status, 200);
    d.wait_for_log(|l| message(l).starts_with("capture left in place"), WAIT)
        .expect("exits after the drain");
    wait_until("process exit", || (!d.is_running()).then_some(()));
    assert!(!socket.exists(), "the socket file is removed on exit");
}
