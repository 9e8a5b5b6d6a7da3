//! Acceptance tests of DNS capture and the DNS proxy as README.md and ARCHITECTURE.md
//! ("Data path decisions") describe them.
//!
//! The upstream resolver is a real dnsmasq running in a pod of the test cluster (namespace
//! `infra`, not in the mesh); nothing ever reaches the machine's resolver. Pods query with
//! `dig` (dnsutils): at an explicit resolver address (capture works for any address on port
//! 53), or through a pod-specific resolv.conf, which `ip netns exec` bind-mounts from
//! `/etc/netns/<netns>/resolv.conf`.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use mesh_tests::cluster::{
    field, message, render_docs, Cluster, ClusterSpec, Pod, PodSpec, SvcSpec,
};
use mesh_tests::testkit::node_http;
use serde_json::json;

/// The resolver address pods are told to use (no such host: only capture answers there).
const KUBE_DNS: &str = "10.96.0.10";
/// A name only dnsmasq knows.
const EXT_NAME: &str = "ext.example";
const EXT_IP: &str = "203.0.113.8";
/// dnsmasq's (wrong, on purpose) answer for the mesh service FQDN: seeing it proves that a
/// query was *not* captured.
const DNSMASQ_WEB_IP: &str = "198.51.100.1";
/// A pod hostname (kube-dns `pod` records) and an SRV record: only the cluster's DNS knows
/// them, the mesh does not.
const POD_HOSTNAME: &str = "10-244-1-13.mesh.pod.cluster.local";
const POD_HOSTNAME_IP: &str = "10.244.1.13";
const SRV_NAME: &str = "_http._tcp.web.mesh.svc.cluster.local";
/// A name whose TXT answer (6 strings of 250 bytes) does not fit in a 1232-byte datagram.
const BIG_TXT_NAME: &str = "big.example";

/// The strings of [`BIG_TXT_NAME`]'s TXT record: 250 `a`s, 250 `b`s, ...
fn big_txt_strings() -> Vec<String> {
    "abcdef"
        .chars()
        .map(|c| c.to_string().repeat(250))
        .collect()
}
const WEB_VIP: &str = "10.96.0.20";
const DB_VIP: &str = "10.96.0.30";

fn spec() -> ClusterSpec {
    ClusterSpec::new(1)
        .namespace("mesh", true)
        .namespace("other", false)
        .namespace("plain", false)
        .namespace("infra", false)
        .pod(PodSpec::new("mesh/client", 1)) // 10.244.1.11
        .pod(PodSpec::new("mesh/searcher", 1)) // .12, dnsConfig.searches
        .pod(PodSpec::new("mesh/web", 1)) // .13
        .pod(PodSpec::new("plain/outsider", 1)) // .14, not enrolled
        .pod(PodSpec::new("infra/dns", 1)) // .15, dnsmasq
        .pod(PodSpec::new("mesh/optout", 1)) // .16, annotation opt-out
        .pod(PodSpec::new("mesh/flooder", 1)) // .17, floods the DNS proxy
        .service(
            SvcSpec::new("mesh/web", WEB_VIP)
                .select("app", "web")
                .port(80, 8080),
        )
        .service(SvcSpec::new("other/db", DB_VIP).port(5432, 5432))
}

/// Objects the harness spec cannot express: a headless service, and two pods re-declared
/// (later files win) with DNS settings.
fn extra_state(c: &Cluster) -> String {
    let pod = |name: &str, extra_meta: serde_json::Value, extra_spec: serde_json::Value| {
        let p = c.pod(&format!("mesh/{name}"));
        let mut spec = json!({
            "nodeName": "node1",
            "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "meshapp"}],
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
            s.extend(e.clone());
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "mesh", "labels": {"app": name},
                         "annotations": extra_meta},
            "spec": spec,
            "status": {"phase": "Running", "podIP": p.ip.to_string()},
        })
    };
    render_docs([
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "hl", "namespace": "mesh"},
            "spec": {"clusterIP": "None", "selector": {"app": "web"},
                     "ports": [{"port": 80}]},
        }),
        pod(
            "searcher",
            json!({}),
            json!({"dnsPolicy": "None", "dnsConfig": {"searches": ["corp.example"]}}),
        ),
        pod(
            "optout",
            json!({"ambient.istio.io/dns-capture": "false"}),
            json!({}),
        ),
    ])
    .expect("render")
}

/// A resolv.conf for one pod, removed again on drop.
struct PodResolvConf(PathBuf);

impl PodResolvConf {
    fn write(pod: &Pod, text: &str) -> PodResolvConf {
        let dir = PathBuf::from("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<pod>");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
        PodResolvConf(dir)
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dig(pod: &Pod, args: &[&str]) -> Output {
    let mut all = vec!["+tries=1", "+timeout=3"];
    all.extend_from_slice(args);
    pod.exec("dig", &all).expect("dig runs")
}

/// `dig +short` answers as lines; panics on a failed dig.
fn short(pod: &Pod, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let out = dig(pod, &all);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("timed out"),
        "dig {args:?} from {} failed: {text}{}",
        pod.key(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// The `status:` of dig's full output, e.g. `NXDOMAIN`, and whether `aa` is set.
fn status(pod: &Pod, args: &[&str]) -> (String, bool, String) {
    let out = dig(pod, args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let st = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("dig {args:?} from {}: no status in {text}", pod.key()))
        .to_string();
    let aa = text
        .split("flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .is_some_and(|f| f.split_whitespace().any(|x| x == "aa"));
    (st, aa, text)
}

/// Starts dnsmasq in `infra/dns` and waits until it answers. It may reply to the node's
/// addresses (the daemon's upstream queries) through a route added in its namespace only.
fn start_dnsmasq(c: &Cluster) -> Dnsmasq {
    mesh_tests::require_tool("dnsmasq", "dnsmasq-base").expect("dnsmasq");
    mesh_tests::require_tool("dig", "dnsutils").expect("dig");
    let dns = c.pod("infra/dns");
    let route = dns
        .exec(
            "ip",
            [
                "route",
                "add",
                "192.168.200.0/24",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        )
        .expect("ip route");
    assert!(route.status.success(), "route: {route:?}");
    let log = c.workdir().join("dnsmasq.log");
    let pid = c.workdir().join("dnsmasq.pid");
    let dnsmasq = Dnsmasq(
        dns.spawn(
            "dnsmasq",
            [
                "--keep-in-foreground".to_string(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--user=root".into(),
                format!("--listen-address={}", dns.ip),
                "--bind-interfaces".into(),
                format!("--host-record={EXT_NAME},{EXT_IP}"),
                format!("--host-record=web.mesh.svc.cluster.local,{DNSMASQ_WEB_IP}"),
                format!("--host-record={POD_HOSTNAME},{POD_HOSTNAME_IP}"),
                format!("--srv-host={SRV_NAME},web.mesh.svc.cluster.local,80"),
                // The cluster domain is dnsmasq's own: unknown names there are NXDOMAIN.
                "--local=/cluster.local/".into(),
                format!(
                    "--txt-record={BIG_TXT_NAME},{}",
                    big_txt_strings().join(",")
                ),
                "--log-queries".into(),
                format!("--log-facility={}", log.display()),
                format!("--pid-file={}", pid.display()),
            ],
        )
        .expect("dnsmasq starts"),
    );
    let outsider = c.pod("plain/outsider");
    let at = format!("@{}", dns.ip);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = dig(outsider, &["+short", &at, EXT_NAME]);
        if String::from_utf8_lossy(&out.stdout).trim() == EXT_IP {
            return dnsmasq;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not come up: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The running dnsmasq; killed and reaped on drop (cluster teardown would kill it too).
struct Dnsmasq(std::process::Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cluster() -> (Cluster, Dnsmasq) {
    let mut c = Cluster::start(spec()).expect("cluster starts");
    c.write_state_file("zz-dns.yaml", &extra_state(&c))
        .expect("extra state");
    let dnsmasq = start_dnsmasq(&c);
    let upstream = c.pod("infra/dns").ip.to_string();
    c.start_daemon(1, &["--dns-upstream", &upstream])
        .expect("daemon ready");
    (c, dnsmasq)
}

#[test]
fn dns_answers_mesh_names_and_forwards_the_rest() {
    let (c, _dnsmasq) = cluster();
    let client = c.pod("mesh/client");
    let at = format!("@{KUBE_DNS}");
    let at = at.as_str();

    // Short, namespaced, .svc and FQDN forms, as dig sends them without a search list.
    for name in [
        "web",
        "web.mesh",
        "web.mesh.svc",
        "web.mesh.svc.cluster.local",
    ] {
        assert_eq!(short(client, &[at, name]), [WEB_VIP], "A {name}");
    }
    assert_eq!(short(client, &[at, "db.other.svc.cluster.local"]), [DB_VIP]);
    let (st, aa, text) = status(client, &[at, "web.mesh.svc.cluster.local"]);
    assert!(st == "NOERROR" && aa, "authoritative: {text}");
    let ttl_30 = text.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.len() == 5 && w[0] == "web.mesh.svc.cluster.local." && w[1] == "30" && w[3] == "A"
    });
    assert!(ttl_30, "TTL 30: {text}");

    // AAAA of an IPv4-only service: NOERROR, no answer.
    let (st, _, text) = status(client, &[at, "AAAA", "web.mesh.svc.cluster.local"]);
    assert!(st == "NOERROR" && text.contains("ANSWER: 0"), "{text}");

    // Headless: the ready pods' IPs.
    assert_eq!(
        short(client, &[at, "hl.mesh.svc.cluster.local"]),
        [c.pod("mesh/web").ip.to_string()]
    );

    // External name: answered by the upstream dnsmasq, through the daemon.
    assert_eq!(short(client, &[at, EXT_NAME]), [EXT_IP]);
    // TCP works too, for mesh and forwarded names.
    assert_eq!(short(client, &["+tcp", at, "web"]), [WEB_VIP]);
    assert_eq!(short(client, &["+tcp", at, EXT_NAME]), [EXT_IP]);
    // An answer too large for a datagram: the upstream truncates it over UDP, the daemon asks
    // again over TCP, and the pod (retrying over TCP itself) gets all of it.
    let quoted: Vec<String> = big_txt_strings()
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    assert_eq!(
        short(client, &[at, "TXT", BIG_TXT_NAME]),
        [quoted.join(" ")]
    );

    // Any resolver address is captured: asking dnsmasq's own address still gets the mesh
    // answer, not dnsmasq's.
    let dnsmasq_at = format!("@{}", c.pod("infra/dns").ip);
    assert_eq!(
        short(client, &[&dnsmasq_at, "web.mesh.svc.cluster.local"]),
        [WEB_VIP]
    );

    // The pod's own resolv.conf search list (what kubelet writes for ClusterFirst).
    let _rc = PodResolvConf::write(
        client,
        &format!(
            "nameserver {KUBE_DNS}\nsearch mesh.svc.cluster.local svc.cluster.local \
             cluster.local\noptions ndots:5\n"
        ),
    );
    assert_eq!(short(client, &["+search", "web"]), [WEB_VIP]);
    assert_eq!(short(client, &["+search", "db.other"]), [DB_VIP]);
}

#[test]
fn dns_forwards_cluster_names_the_mesh_does_not_know() {
    let (c, _dnsmasq) = cluster();
    let client = c.pod("mesh/client");
    let at = format!("@{KUBE_DNS}");
    let at = at.as_str();
    // A pod hostname and an SRV record of a mesh service: the cluster DNS's answers.
    assert_eq!(short(client, &[at, POD_HOSTNAME]), [POD_HOSTNAME_IP]);
    assert_eq!(
        short(client, &[at, "SRV", SRV_NAME]),
        ["0 0 80 web.mesh.svc.cluster.local."]
    );
    // An unknown service name: NXDOMAIN, and it is dnsmasq's (not authoritative from the
    // daemon, and in dnsmasq's query log).
    let (st, _, text) = status(client, &[at, "nope.mesh.svc.cluster.local"]);
    assert_eq!(st, "NXDOMAIN", "{text}");
    let log = std::fs::read_to_string(c.workdir().join("dnsmasq.log")).unwrap_or_default();
    for name in [POD_HOSTNAME, SRV_NAME, "nope.mesh.svc.cluster.local"] {
        assert!(
            log.lines()
                .any(|l| l.contains("query[") && l.contains(&format!("] {name} from"))),
            "{name} reached the upstream:\n{log}"
        );
    }
    // Mesh names are still the mesh's: the upstream's (wrong) address is never seen.
    assert_eq!(
        short(client, &[at, "web.mesh.svc.cluster.local"]),
        [WEB_VIP]
    );
}

#[test]
fn dns_uses_the_pods_search_list_and_respects_opt_outs() {
    let (c, _dnsmasq) = cluster();

    // dnsConfig.searches (dnsPolicy None): `web` is sent as `web.corp.example`, which the
    // daemon resolves through that pod's search list.
    let searcher = c.pod("mesh/searcher");
    let _rc = PodResolvConf::write(
        searcher,
        &format!("nameserver {KUBE_DNS}\nsearch corp.example\noptions ndots:5\n"),
    );
    assert_eq!(short(searcher, &["+search", "web"]), [WEB_VIP]);
    assert_eq!(short(searcher, &["web.corp.example"]), [WEB_VIP]);
    // The same name from a pod without that search domain is not a mesh name: forwarded,
    // and dnsmasq does not know it.
    let client = c.pod("mesh/client");
    let at = format!("@{KUBE_DNS}");
    let (st, aa, text) = status(client, &[&at, "web.corp.example"]);
    assert!(st != "NOERROR" || text.contains("ANSWER: 0"), "{text}");
    assert!(!aa, "{text}");

    // Not captured: a pod outside the mesh, and an enrolled pod with the annotation, reach
    // dnsmasq itself, which gives its own answer for the service name.
    let dnsmasq_at = format!("@{}", c.pod("infra/dns").ip);
    for key in ["plain/outsider", "mesh/optout"] {
        assert_eq!(
            short(c.pod(key), &[&dnsmasq_at, "web.mesh.svc.cluster.local"]),
            [DNSMASQ_WEB_IP],
            "{key} must not be captured"
        );
    }
}

#[test]
fn dns_keeps_serving_after_malformed_packets() {
    let (c, _dnsmasq) = cluster();
    let client = c.pod("mesh/client");
    // 300 datagrams: empty, short, random, and valid headers followed by garbage.
    let script = format!(
        "for i in $(seq 300); do \
           head -c $((i % 64)) /dev/urandom > /dev/udp/{KUBE_DNS}/53; \
           printf '\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\xff\\xff' \
             > /dev/udp/{KUBE_DNS}/53; \
         done"
    );
    let out = client.exec("bash", ["-c", &script]).expect("bash");
    assert!(out.status.success(), "sending garbage: {out:?}");
    // Garbage over TCP as well.
    let out = client
        .exec(
            "bash",
            [
                "-c",
                &format!("head -c 500 /dev/urandom > /dev/tcp/{KUBE_DNS}/53 || true"),
            ],
        )
        .expect("bash");
    assert!(out.status.success());

    let at = format!("@{KUBE_DNS}");
    assert_eq!(
        short(client, &[&at, "web.mesh.svc.cluster.local"]),
        [WEB_VIP]
    );
    assert_eq!(short(client, &["+tcp", &at, EXT_NAME]), [EXT_IP]);
    assert!(c.daemon(1).is_running(), "daemon survived");

    // The daemon saw them as malformed (FORMERR or dropped), not as lost packets.
    let dump = config_dump(&c);
    let malformed = dump["dns"]["malformed"].as_u64().unwrap_or(0);
    assert!(malformed >= 300, "dns counters: {}", dump["dns"]);

    // The same counters are exported on the metrics port.
    let (_, metrics) = node_http(&c, 1, 15020, "GET", "/metrics").expect("scrape");
    let exported = metrics
        .lines()
        .find_map(|l| l.strip_prefix("istio_dns_malformed_requests_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no istio_dns_malformed_requests_total in:\n{metrics}"));
    assert!(
        exported >= malformed as f64,
        "metric {exported} < dump {malformed}"
    );
    assert!(
        metrics.contains("istio_dns_requests_total ")
            && metrics.contains("istio_dns_upstream_request_duration_seconds_bucket"),
        "DNS request counter and upstream latency histogram exported"
    );
}

/// Sends DNS queries for `web` to the resolver address as fast as one socket can for `secs`
/// seconds, reading whatever answers come back; prints `sent received`.
const FLOOD: &str = r#"
import socket, struct, sys, time
dst, secs = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, 53))
s.setblocking(False)
q = b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01"
sent = received = 0
end = time.monotonic() + secs
while time.monotonic() < end:
    for i in range(256):
        try:
            s.send(struct.pack(">H", (sent + i) & 0xffff) + q)
        except BlockingIOError:
            pass
    sent += 256
    while True:
        try:
            s.recv(2048)
            received += 1
        except BlockingIOError:
            break
print(sent, received)
"#;

#[test]
fn dns_flood_from_one_pod_leaves_neighbours_answered() {
    mesh_tests::require_tool("python3", "python3").expect("python3");
    let (c, _dnsmasq) = cluster();
    let (client, flooder) = (c.pod("mesh/client"), c.pod("mesh/flooder"));
    let at = format!("@{KUBE_DNS}");
    let skip = c.daemon(1).log_lines().len();

    let flood_secs = 8;
    let flood = flooder
        .spawn("python3", ["-c", FLOOD, KUBE_DNS, &flood_secs.to_string()])
        .expect("flood starts");
    std::thread::sleep(Duration::from_millis(500));
    // The neighbour's lookups while the flood runs: a mesh name and a forwarded one, each
    // answered within dig's 2 s (one try).
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let name = if i % 2 == 0 { "web" } else { EXT_NAME };
        let want = if i % 2 == 0 { WEB_VIP } else { EXT_IP };
        let t = Instant::now();
        let out = client
            .exec("dig", ["+tries=1", "+timeout=2", "+short", &at, name])
            .expect("dig runs");
        slowest = slowest.max(t.elapsed());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            want,
            "lookup {i} of {name} during the flood: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = flood.wait_with_output().expect("flood ends");
    let counts = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "flood: {counts}{out:?}");
    let (sent, received) = counts
        .split_once(' ')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .unwrap_or_else(|| panic!("flood output: {counts}"));
    eprintln!("flood: {sent} queries in {flood_secs} s, {received} answered; slowest neighbour lookup {slowest:?}");
    assert!(sent > 50_000, "the flood was a flood: {sent}");

    // The flooder was held to its rate, counted by reason...
    let dump = config_dump(&c);
    let rate = dump["dns"]["refused"]["pod_rate"].as_u64().unwrap_or(0);
    assert!(rate > 0, "dns counters: {}", dump["dns"]);
    let (_, metrics) = node_http(&c, 1, 15020, "GET", "/metrics").expect("scrape");
    assert!(
        metrics.contains("ztunnel_dns_refused_total{reason=\"pod_rate\"}"),
        "refusals exported by reason"
    );
    // ... and logged at most once per 10 s for that pod, not per query.
    let warned: Vec<_> = c
        .daemon(1)
        .log_lines()
        .into_iter()
        .skip(skip)
        .filter(|l| message(l) == "dns: pod over its limits; queries refused")
        .collect();
    assert!(!warned.is_empty(), "the flood is logged");
    assert!(
        warned.len() <= flood_secs / 10 + 2,
        "rate-limited log: {warned:?}"
    );
    assert!(
        warned
            .iter()
            .all(|l| field(l, "src") == flooder.ip.to_string()),
        "only the flooder: {warned:?}"
    );
    // The neighbour was never refused.
    assert_eq!(short(client, &[&at, "web"]), [WEB_VIP]);
}

/// The admin `/config_dump` of node 1 (admin listens on the node's loopback).
fn config_dump(c: &Cluster) -> serde_json::Value {
    let (_, body) = node_http(c, 1, 15000, "GET", "/config_dump").expect("admin request");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("config_dump: {e}: {body}"))
}

#[test]
fn dns_capture_can_be_turned_off_per_daemon() {
    let mut c = Cluster::start(spec()).expect("cluster starts");
    let _dnsmasq = start_dnsmasq(&c);
    c.start_daemon(1, &["--dns-capture", "false"])
        .expect("daemon ready");
    let dnsmasq_at = format!("@{}", c.pod("infra/dns").ip);
    assert_eq!(
        short(
            c.pod("mesh/client"),
            &[&dnsmasq_at, "web.mesh.svc.cluster.local"]
        ),
        [DNSMASQ_WEB_IP]
    );
}

#[test]
fn dns_unreachable_upstream_gives_servfail() {
    let mut c = Cluster::start(spec()).expect("cluster starts");
    mesh_tests::require_tool("dig", "dnsutils").expect("dig");
    // 10.244.1.99 is no pod: nothing answers there.
    c.start_daemon(
        1,
        &[
            "--dns-upstream",
            "10.244.1.99",
            "--dns-upstream-timeout",
            "1s",
        ],
    )
    .expect("daemon ready");
    let client = c.pod("mesh/client");
    let at = format!("@{KUBE_DNS}");
    let (st, _, text) = status(client, &[&at, EXT_NAME]);
    assert_eq!(st, "SERVFAIL", "{text}");
    // Mesh names do not depend on the upstream.
    assert_eq!(short(client, &[&at, "web"]), [WEB_VIP]);
}
