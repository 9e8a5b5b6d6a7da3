//! Faults under a flow: what an application notices when the daemon at the other end dies in
//! the middle of a transfer, and when a daemon runs out of file descriptors.
//!
//! - The server node's daemon is SIGKILLed while a client streams through it: the client is
//!   reset within a second (never left hanging), the client node's HBONE pool lets the dead
//!   connection go, and once the daemon is restarted (as the harness starts it) new flows work.
//! - A daemon's `RLIMIT_NOFILE` is lowered to what it holds (`prlimit` on the running
//!   process): new flows are refused at once (reset, a warning, `ztunnel_accept_errors_total`),
//!   flows already open go on, the daemon does not spin, and new flows work again as soon as
//!   descriptors free up.
//!
//! Needs root, `prlimit` and `ss` (util-linux, iproute2). Without them the tests fail.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mesh_tests::app::SendOpts;
use mesh_tests::bpf::in_netns;
use mesh_tests::cluster::{field, message, Cluster, ClusterSpec, Pod, PodSpec};
use mesh_tests::testkit::{at, eventually, node_http, ok, start_with_daemons};
use serde_json::Value;

const PORT: u16 = 8080;
const CHUNK: usize = 16 * 1024;

fn two_pods() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1).sa("client"))
        .pod(PodSpec::new("mesh/b", 2).sa("server"))
}

/// A TCP connection from `pod` to `to` (made inside the pod's network namespace, so capture
/// takes it into the mesh), past the server's `HELLO` line; or how it failed.
fn try_open(pod: &Pod, to: SocketAddr) -> Result<TcpStream, String> {
    // A refusal can land before `connect` returns: the daemon accepts and resets so fast that
    // the reset is what the non-blocking connect's poll reports.
    let mut tcp = in_netns(&pod.netns, move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5)))
    })
    .map_err(|e| format!("connect: {e:#}"))?
    .map_err(|e| match e.kind() {
        ErrorKind::ConnectionReset => "reset".to_string(),
        _ => format!("connect: {e}"),
    })?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut hello = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        tcp.read_exact(&mut byte).map_err(|e| match e.kind() {
            ErrorKind::ConnectionReset => "reset".to_string(),
            ErrorKind::UnexpectedEof => "eof".to_string(),
            _ => format!("no HELLO: {e}"),
        })?;
        hello.push(byte[0]);
    }
    if !hello.starts_with(b"HELLO ") {
        return Err(format!("greeting {hello:?}"));
    }
    Ok(tcp)
}

/// [`try_open`], failing the test when the flow is not served.
fn open(pod: &Pod, to: SocketAddr) -> TcpStream {
    try_open(pod, to).unwrap_or_else(|e| panic!("flow from {} to {to}: {e}", pod.key()))
}

/// One echo round trip on an open connection.
fn echo(tcp: &mut TcpStream, what: &str) {
    let msg = b"still here\n";
    tcp.write_all(msg)
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut back = [0u8; 11];
    tcp.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(&back, msg, "{what}: echo");
}

/// HBONE connections node `node` holds to `dst`'s port 15008.
fn hbone_conns(c: &Cluster, node: usize, dst: &Pod) -> usize {
    let d = dst.ip.to_string();
    let out = c
        .node_exec(
            node,
            "ss",
            &[
                "-tnH",
                "state",
                "established",
                "dst",
                &d,
                "dport",
                "=",
                ":15008",
            ],
        )
        .expect("ss runs");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// The pool's size in node `node`'s `/config_dump`.
fn pool_connections(c: &Cluster, node: usize) -> u64 {
    let (status, body) = node_http(c, node, 15000, "GET", "/config_dump").expect("admin answers");
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).expect("config_dump is JSON");
    dump["hbone_pool"]["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("no hbone_pool.connections in {dump}"))
}

/// How the client side of a streaming connection ended.
#[derive(Debug)]
struct Ended {
    /// Since the daemon was killed.
    after: Duration,
    error: Option<ErrorKind>,
}

#[test]
fn server_daemon_killed_mid_transfer() {
    let c = start_with_daemons(two_pods());
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _sb = b.serve(PORT, "b").expect("serve b");
    let to: SocketAddr = at(&b, PORT).parse().expect("addr");
    let tcp = open(&a, to);
    assert_eq!(
        pool_connections(&c, 1),
        1,
        "the flow rides one pooled connection"
    );

    // Stream both ways: a writer that never stops, a reader that counts the echo. Each reports
    // when and how its side of the connection ended.
    let (tx, rx) = mpsc::channel::<(&'static str, Instant, Option<ErrorKind>)>();
    let mut w = tcp.try_clone().expect("clone");
    let wtx = tx.clone();
    std::thread::spawn(move || {
        let chunk = vec![0x5a; CHUNK];
        let err = loop {
            if let Err(e) = w.write_all(&chunk) {
                break e.kind();
            }
        };
        let _ = wtx.send(("write", Instant::now(), Some(err)));
    });
    let (progress_tx, progress) = mpsc::channel::<u64>();
    let mut r = tcp;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let end = loop {
            match r.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    total += n as u64;
                    let _ = progress_tx.send(total);
                }
                Err(e) => break Some(e.kind()),
            }
        };
        let _ = tx.send(("read", Instant::now(), end));
    });
    // Mid-transfer: a few MiB have come back through both daemons.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut echoed = 0;
    while echoed < 4 << 20 {
        assert!(
            Instant::now() < deadline,
            "only {echoed} bytes echoed in 20 s"
        );
        echoed = progress
            .recv_timeout(Duration::from_secs(10))
            .expect("echo flows");
    }

    // Timed from just before the signal: `kill` also waits for the process to be reaped.
    let killed = Instant::now();
    c.daemon(2).kill().expect("SIGKILL node2's daemon");
    let mut ends = Vec::new();
    while ends.len() < 2 {
        let (side, at, error) = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("the client hangs: {ends:?} 5 s after the kill"));
        ends.push((
            side,
            Ended {
                after: at.saturating_duration_since(killed),
                error,
            },
        ));
    }
    eprintln!("after the SIGKILL: {ends:?}");
    let (_, read) = ends.iter().find(|(s, _)| *s == "read").expect("read side");
    let (_, write) = ends
        .iter()
        .find(|(s, _)| *s == "write")
        .expect("write side");
    // A reset. The kernel reports a socket's error once, to whichever call comes first: when
    // the writer gets ECONNRESET, the reader then sees the reset connection as EOF.
    assert!(
        matches!(read.error, Some(ErrorKind::ConnectionReset))
            || (read.error.is_none() && write.error.is_some()),
        "the client is told the transfer broke: {ends:?}"
    );
    for (side, e) in &ends {
        assert!(
            e.after <= Duration::from_secs(1),
            "the client's {side} side ended {:?} after the kill (at most 1 s)",
            e.after
        );
    }
    let access = c
        .daemon(1)
        .wait_for_log(
            |l| {
                message(l) == "access"
                    && field(l, "reporter") == "source"
                    && !field(l, "error").is_empty()
            },
            Duration::from_secs(5),
        )
        .expect("node1 logs the broken flow");
    assert!(
        field(&access, "dst_addr").starts_with(&b.ip.to_string()),
        "{access}"
    );

    // The client node's pool lets the dead connection go (its reaper runs at least every 5 s).
    eventually(
        Duration::from_secs(10),
        "node1's pool drops the dead connection",
        || pool_connections(&c, 1) == 0,
    );
    assert_eq!(
        hbone_conns(&c, 1, &b),
        0,
        "node1 holds no socket to b:15008"
    );

    c.daemon(2).restart().expect("node2's daemon restarts");
    let r = ok(
        a.send(&SendOpts::to(&at(&b, PORT)).conns(3).bytes(256 * 1024))
            .expect("meshapp runs"),
        "new flows after the restart",
    );
    assert_eq!(r.conns.len(), 3);
    assert!(
        c.daemon(1).is_running(),
        "node1's daemon survived the peer's death"
    );
}

/// `ztunnel_accept_errors_total{listener, reason}` on node `node`'s metrics port.
fn accept_errors(c: &Cluster, node: usize, listener: &str, reason: &str) -> u64 {
    let (status, body) = node_http(c, node, 15020, "GET", "/metrics").expect("metrics answer");
    assert_eq!(status, 200);
    let (l, r) = (
        format!("listener=\"{listener}\""),
        format!("reason=\"{reason}\""),
    );
    body.lines()
        .filter(|line| line.starts_with("ztunnel_accept_errors_total{"))
        .filter(|line| line.contains(&l) && line.contains(&r))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Open descriptors of a process: (count, highest number).
fn fds(pid: u32) -> (usize, u32) {
    let nums: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (nums.len(), nums.iter().copied().max().unwrap_or(0))
}

/// Sets a running process's open-file limit (soft and hard) with `prlimit`.
fn set_nofile(pid: u32, limit: u64) {
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .expect("prlimit runs");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// User plus system CPU time of a process, from `/proc/PID/stat`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start at index 2 (`state`).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

#[test]
fn open_file_limit_refuses_new_flows_and_recovers() {
    mesh_tests::require_tool("prlimit", "util-linux").expect("prlimit");
    let mut c = Cluster::start(two_pods()).expect("cluster starts");
    // One pooled HBONE connection for all of a's flows: each new flow then needs exactly one
    // new descriptor on node1, the accepted socket.
    c.start_daemon(1, &["--hbone-spread", "1"])
        .expect("node1 ready");
    c.start_daemon(2, &[]).expect("node2 ready");
    let (a, b) = (c.pod("mesh/a").clone(), c.pod("mesh/b").clone());
    let _sb = b.serve(PORT, "b").expect("serve b");
    let to: SocketAddr = at(&b, PORT).parse().expect("addr");
    let pid = c.daemon(1).pid().expect("node1 daemon pid");

    let mut held = vec![open(&a, to), open(&a, to)];
    // Only the descriptors it holds now: every new one fails with EMFILE. Descriptors closed
    // earlier leave gaps below the highest number, which new flows fill first (and hold).
    let (count, highest) = fds(pid);
    set_nofile(pid, u64::from(highest) + 1);
    let log_mark = c.daemon(1).log_lines().len();
    let mut refused = 0;
    for attempt in 0..(highest as usize + 1 - count + 10) {
        let started = Instant::now();
        match try_open(&a, to) {
            Ok(tcp) => held.push(tcp),
            Err(e) if e == "reset" || e == "eof" => {
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "attempt {attempt}: refused only after {:?}",
                    started.elapsed()
                );
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            Err(e) => panic!("attempt {attempt}: at the limit a flow is refused at once, got: {e}"),
        }
    }
    eprintln!(
        "limit {}: {count} descriptors open (highest {highest}), {} flows held, {refused} refused",
        highest + 1,
        held.len()
    );
    assert_eq!(refused, 3, "new flows are refused at the open-file limit");
    c.daemon(1)
        .wait_for_log_after(
            log_mark,
            |l| {
                field(l, "listener") == "outbound"
                    && message(l).starts_with("connection refused: out of file descriptors")
            },
            Duration::from_secs(5),
        )
        .expect("the refusal is logged");
    for (i, tcp) in held.iter_mut().enumerate() {
        echo(tcp, &format!("held flow {i} at the limit"));
    }
    // Nothing arriving: the accept loops wait rather than spin.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid) - before;
    eprintln!("CPU idle at the limit: {ticks} ticks in 2 s");
    assert!(
        ticks <= 20,
        "the daemon used {ticks} ticks of CPU in 2 s idle at the limit"
    );
    assert!(c.daemon(1).is_running(), "the daemon survives the limit");

    // Flows end, their descriptors free up, and new flows are served again.
    drop(held);
    eventually(
        Duration::from_secs(10),
        "a new flow is served once descriptors free up",
        || {
            a.connect(to, Duration::from_secs(3))
                .map(|r| r.result == "hello")
                .unwrap_or(false)
        },
    );
    ok(
        a.send(&SendOpts::to(&at(&b, PORT)).bytes(256 * 1024))
            .expect("meshapp runs"),
        "a transfer after the limit",
    );
    let counted = accept_errors(&c, 1, "outbound", "fd_limit");
    assert!(
        counted >= 3,
        "ztunnel_accept_errors_total{{listener=outbound,reason=fd_limit}} = {counted}"
    );
}
