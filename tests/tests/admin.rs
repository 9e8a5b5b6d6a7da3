//! Acceptance tests of the admin (15000), metrics (15020) and readiness (15021) ports as HTTP
//! servers in a node's network namespace: `curl -I`, keep-alive (curl reuses its connection,
//! and two requests on one raw connection are both answered), 405 with `Allow`, 431 for an
//! oversized head, 413 for an oversized body, and the bound on clients that hold connections
//! without sending a request.
//!
//! Needs root, a built `ztunnel` and `curl`; `cargo xtask test` provides all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::bpf::in_netns;
use mesh_tests::cluster::{Cluster, ClusterSpec, PodSpec};
use mesh_tests::testkit::{node_http, start_with_daemons};

const ADMIN: u16 = 15000;
const METRICS: u16 = 15020;
const READINESS: u16 = 15021;

fn one_node() -> Cluster {
    start_with_daemons(
        ClusterSpec::new(1)
            .namespace("mesh", true)
            .pod(PodSpec::new("mesh/a", 1)),
    )
}

fn curl(c: &Cluster, args: &[&str]) -> (String, String) {
    mesh_tests::require_tool("curl", "curl").expect("curl present");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.node_netns(1),
            "curl",
            "--max-time",
            "10",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "curl {args:?}: {stderr}");
    (stdout, stderr)
}

/// A response read off a raw connection: status, head (lower-cased), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one response; `head_only` for a response to `HEAD`.
fn read_answer(s: &mut TcpStream, head_only: bool) -> Result<Answer> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            bail!(
                "EOF in a response head: {:?}",
                String::from_utf8_lossy(&raw)
            );
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status")?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .context("content-length")?;
    let mut body = vec![0u8; if head_only { 0 } else { len }];
    s.read_exact(&mut body)?;
    Ok(Answer { status, head, body })
}

/// Sends each request on one connection to `127.0.0.1:port` in the node, reading each answer
/// before the next request.
fn on_one_connection(c: &Cluster, port: u16, requests: &[&str]) -> Result<Vec<Answer>> {
    let requests: Vec<String> = requests.iter().map(|r| r.to_string()).collect();
    in_netns(&c.node_netns(1), move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut answers = Vec::new();
        for r in &requests {
            s.write_all(r.as_bytes())?;
            answers.push(read_answer(&mut s, r.starts_with("HEAD "))?);
        }
        Ok(answers)
    })
}

#[test]
fn ports_speak_http_with_keep_alive_head_405_431_and_413() {
    let c = one_node();

    let (head, _) = curl(&c, &["-sI", "http://127.0.0.1:15020/metrics"]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = head.to_lowercase();
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert!(head.contains("content-length: "), "{head}");

    // curl's own connection reuse: the second URL goes over the first connection.
    let (body, verbose) = curl(
        &c,
        &[
            "-sv",
            "--http1.1",
            "http://127.0.0.1:15021/healthz/ready",
            "http://127.0.0.1:15021/healthz/ready",
        ],
    );
    assert_eq!(body, "ready\nready\n");
    assert!(
        verbose.contains("existing connection"),
        "curl did not reuse its connection:\n{verbose}"
    );

    for (port, path) in [
        (METRICS, "/stats/prometheus"),
        (READINESS, "/healthz/ready"),
        (ADMIN, "/config_dump"),
    ] {
        let get = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let head = format!("HEAD {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let put = format!("PUT {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
        let answers = on_one_connection(&c, port, &[&get, &head, &put, &get])
            .unwrap_or_else(|e| panic!("port {port}: {e:#}"));
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses, [200, 200, 405, 200], "port {port}");
        assert!(
            answers[1].head.contains("content-length: "),
            "HEAD gives the length: {}",
            answers[1].head
        );
        assert!(
            answers[2].head.contains("allow: get, head"),
            "{}",
            answers[2].head
        );
        assert!(!answers[3].body.is_empty(), "port {port}: GET after HEAD");
    }

    let pad = "a".repeat(64 * 1024);
    let big_head = format!("GET /metrics HTTP/1.1\r\nhost: x\r\nx-pad: {pad}\r\n\r\n");
    let a = on_one_connection(&c, METRICS, &[&big_head]).expect("431");
    assert_eq!(a[0].status, 431, "an oversized head");
    let big_body = "POST /config_dump HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n";
    let a = on_one_connection(&c, ADMIN, &[big_body]).expect("413");
    assert_eq!(a[0].status, 413, "an oversized body");
    // The ports still answer.
    let (status, _) = node_http(&c, 1, METRICS, "GET", "/metrics").expect("scrape");
    assert_eq!(status, 200);
}

/// Connections that send nothing take the port's connection slots, but each for the head
/// deadline (10 s) at most: a probe behind them is answered once they are dropped, and the
/// daemon stays ready.
#[test]
fn silent_connections_delay_a_probe_by_the_head_deadline_at_most() {
    let c = one_node();
    let probe = in_netns(&c.node_netns(1), || {
        let addr = SocketAddr::from(([127, 0, 0, 1], READINESS));
        // More than the cap of 32 per port.
        let silent: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .collect::<std::io::Result<_>>()?;
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\n")?;
        let answer = read_answer(&mut s, false)?;
        let waited = started.elapsed();
        drop(silent);
        Ok((answer.status, waited))
    })
    .expect("probe answered");
    let (status, waited) = probe;
    assert_eq!(status, 200);
    assert!(
        waited > Duration::from_secs(5) && waited < Duration::from_secs(20),
        "the probe waited {waited:?}: the silent connections held every slot until the 10 s \
         head deadline dropped them"
    );
}
