//! `meshload`: the load generator of `cargo xtask bench` and `cargo xtask overhead`, run
//! inside a client pod against `meshapp serve` (HELLO line, then echo).
//!
//! ```text
//! meshload rr  --to IP:PORT --size BYTES --secs S [--rate PER_SEC] [--warmup S]
//! meshload crr --to IP:PORT --secs S [--conns K | --rate PER_SEC]
//! meshload hold --to IP:PORT --conns K --secs S [--bytes N]
//! meshload churn --to IP:PORT --rate PER_SEC --secs S [--bytes N] [--threads T]
//! meshload seal [--record BYTES] [--secs S]
//! ```
//!
//! `rr`: one connection, a request of `size` bytes, wait for the whole echo, repeat. Without
//! `--rate` back-to-back; with it, requests are scheduled at fixed intervals and each latency is
//! measured from the *scheduled* send time, so a stall is not hidden by the requests it delayed
//! (no coordinated omission). Prints one JSON object: count, rate and p50/p90/p99/max in
//! microseconds. `crr`: `conns` threads each opening a connection, reading the HELLO line (so
//! the whole path, tunnel included, was set up) and closing normally, for `secs`; prints connections per
//! second and how many attempts failed (each failure costs its timeout, so failures also
//! lower the rate). `crr --rate`: one thread opening connections on a fixed schedule instead,
//! each timed from its scheduled start to its HELLO line: the set-up latency of a new flow
//! (p50/p90/p99/max) at a load that leaves the path otherwise idle. `rr` exits non-zero on any I/O error: a broken path must not report.
//! `hold`: opens `conns` connections one after another, echoes `bytes` (default 256 KiB) on
//! each, as a connection that did some work before going idle (every buffer on the path has
//! been used); prints a first JSON line once all are open (`opened`, `failed`, `open_secs`),
//! holds them `secs` longer, then echoes 64 bytes on each (a connection that no longer
//! carries data is `lost`) and closes them; the last JSON line has the counts. The benchmark
//! samples data-plane memory while they are held: the cost of an open, idle connection.
//! `churn`: new connections on a fixed schedule of `rate` per second for `secs`, each echoing
//! `bytes` of a pattern of its own, compared, then closed normally: the steady load of a soak
//! run; prints how many succeeded and failed (exit 0 either way: the caller judges).
//! `seal`: no network; seals TLS 1.3 records with the daemons' cipher for `secs` on one thread
//! and prints GB of payload per second: the cipher's share of the per-byte cost.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::json;

type Res<T> = Result<T, String>;

/// `hold` gives up after this many failed connections (each may have cost a timeout).
const MAX_HOLD_FAILURES: usize = 100;

/// The load generator of the benchmarks (flags through clap: `--help`, and a misspelt flag is
/// an error, exit 2).
#[derive(Debug, Parser)]
#[command(name = "meshload")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Request/response on one connection: latency percentiles.
    Rr(RrArgs),
    /// Connect, read HELLO, close, repeat: connections per second.
    Crr(CrrArgs),
    /// Open connections, echo on each, hold them all: the cost of idle connections.
    Hold(HoldArgs),
    /// Short connections at a steady rate, each echoing and checking a few KiB.
    Churn(ChurnArgs),
    /// Seal TLS 1.3 records as the daemons do: GB of payload per second on one thread.
    Seal(SealArgs),
}

#[derive(Debug, Clone, Copy, Args)]
struct SealArgs {
    /// Payload bytes per record (TLS allows at most 16 KiB).
    #[arg(long, default_value_t = 16384)]
    record: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
}

#[derive(Debug, Clone, Copy, Args)]
struct ChurnArgs {
    /// Server address (`meshapp serve`).
    #[arg(long)]
    to: SocketAddr,
    /// New connections per second, on a fixed schedule.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Bytes echoed and compared on each connection.
    #[arg(long, default_value_t = 4096)]
    bytes: usize,
    /// Threads sharing the schedule (a slow connection delays only its own thread's next).
    #[arg(long, default_value_t = 16)]
    threads: usize,
}

#[derive(Debug, Clone, Copy, Args)]
struct RrArgs {
    /// Server address (`meshapp serve`).
    #[arg(long)]
    to: SocketAddr,
    /// Request (and echo) size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Seconds of requests before measuring.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Requests per second on a fixed schedule; 0 sends back to back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

#[derive(Debug, Clone, Copy, Args)]
struct CrrArgs {
    /// Server address (`meshapp serve`).
    #[arg(long)]
    to: SocketAddr,
    /// Seconds to run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// New connections per second on a fixed schedule, one thread, each timed; 0: as fast as
    /// `conns` threads can.
    #[arg(long, default_value_t = 0.0, conflicts_with = "conns")]
    rate: f64,
}

#[derive(Debug, Clone, Copy, Args)]
struct HoldArgs {
    /// Server address (`meshapp serve`).
    #[arg(long)]
    to: SocketAddr,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 500)]
    conns: usize,
    /// Seconds to hold them once all are open (then each echoes once more and is closed).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bytes echoed on each before it idles (at most 1 MiB, so writing it all before reading
    /// cannot fill both directions' buffers).
    #[arg(long, default_value_t = 256 * 1024)]
    bytes: usize,
    /// Once all are open, write to each without ever reading the echo, until the path takes no
    /// more: a destination that stops reading, whose flows fill every buffer on the way. At
    /// the end each reads back everything it wrote before the last echo.
    #[arg(long)]
    stall: bool,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Rr(a) => rr(&a),
        Cmd::Crr(a) => crr(&a),
        Cmd::Hold(a) => hold(&a),
        Cmd::Churn(a) => churn(&a),
        Cmd::Seal(a) => seal(&a),
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects and consumes the server's HELLO line.
fn open(to: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    let mut n = 0;
    loop {
        match (&s).read(&mut b) {
            Ok(0) => return Err(format!("{to}: EOF before HELLO")),
            Ok(_) if b[0] == b'\n' => return Ok(s),
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{to}: reading HELLO: {e}")),
        }
        if n > 1024 {
            return Err(format!("{to}: HELLO line too long"));
        }
    }
}

fn rr(a: &RrArgs) -> Res<serde_json::Value> {
    let RrArgs {
        to,
        size,
        secs,
        warmup,
        rate,
    } = *a;
    let mut s = open(to)?;
    let req = vec![0x5au8; size.max(1)];
    let mut resp = vec![0u8; req.len()];
    let mut one = |s: &mut TcpStream| -> Res<()> {
        s.write_all(&req).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut resp).map_err(|e| format!("read: {e}"))
    };
    let warm_end = Instant::now() + Duration::from_secs_f64(warmup);
    while Instant::now() < warm_end {
        one(&mut s)?;
    }
    let mut lat_ns: Vec<u64> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    if interval.is_some() {
        precise_timers();
    }
    let mut i: u32 = 0;
    loop {
        let scheduled = match interval {
            Some(iv) => {
                let at = start + iv * i;
                wait_until(at);
                at
            }
            None => Instant::now(),
        };
        if scheduled >= end {
            break;
        }
        one(&mut s)?;
        lat_ns.push(scheduled.elapsed().as_nanos() as u64);
        i += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let requests = lat_ns.len();
    let mut report = percentiles(lat_ns);
    report["requests"] = json!(requests);
    report["secs"] = json!(elapsed);
    report["rps"] = json!(requests as f64 / elapsed);
    Ok(report)
}

/// How much of the wait before a scheduled request is spun rather than slept.
const SPIN: Duration = Duration::from_micros(200);

/// Timer slack of 1 ns (default 50 us), so sleeps end when asked. Best effort.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

fn crr(a: &CrrArgs) -> Res<serde_json::Value> {
    let CrrArgs {
        to,
        secs,
        conns,
        rate,
    } = *a;
    if rate > 0.0 {
        return crr_timed(to, secs, rate);
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..conns.max(1))
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut last_error) = (0u64, 0u64, String::new());
                while Instant::now() < end {
                    // A normal close (FIN). Not RST: Envoy treats streams reset right after
                    // opening as a rapid-reset attack and closes the whole HTTP/2 connection.
                    match open(to) {
                        Ok(s) => {
                            drop(s);
                            ok += 1;
                        }
                        Err(e) => {
                            failed += 1;
                            last_error = e;
                        }
                    }
                }
                (ok, failed, last_error)
            })
        })
        .collect();
    let (mut total, mut failed, mut last_error) = (0u64, 0u64, String::new());
    for h in handles {
        let (ok, bad, err) = h
            .join()
            .map_err(|_| "connection thread panicked".to_string())?;
        total += ok;
        failed += bad;
        if !err.is_empty() {
            last_error = err;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if total == 0 {
        return Err(format!("no connection succeeded: {last_error}"));
    }
    Ok(
        json!({"connections": total, "failed": failed, "last_error": last_error,
              "secs": elapsed, "cps": total as f64 / elapsed}),
    )
}

/// `crr --rate`: new connections on a schedule, each timed from its scheduled start until its
/// HELLO line arrived (the tunnel, if any, is up). A failure is counted and the schedule goes
/// on; the caller judges.
fn crr_timed(to: SocketAddr, secs: f64, rate: f64) -> Res<serde_json::Value> {
    precise_timers();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut lat_ns: Vec<u64> = Vec::new();
    let (mut failed, mut last_error) = (0u64, String::new());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    for i in 0u32.. {
        let at = start + interval * i;
        if at >= end {
            break;
        }
        wait_until(at);
        match open(to) {
            Ok(s) => {
                lat_ns.push(at.elapsed().as_nanos() as u64);
                drop(s);
            }
            Err(e) => {
                failed += 1;
                last_error = e;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let connections = lat_ns.len();
    let mut report = percentiles(lat_ns);
    report["connections"] = json!(connections);
    report["failed"] = json!(failed);
    report["last_error"] = json!(last_error);
    report["secs"] = json!(elapsed);
    Ok(report)
}

/// Sleeps most of the way to `at`, then spins the rest: a sleeping thread wakes tens of
/// microseconds late, which would be charged to every path alike as latency.
fn wait_until(at: Instant) {
    let now = Instant::now();
    if at > now + SPIN {
        std::thread::sleep(at - now - SPIN);
    }
    while Instant::now() < at {
        std::hint::spin_loop();
    }
}

/// p50/p90/p99/max in microseconds of latencies in nanoseconds.
fn percentiles(mut lat_ns: Vec<u64>) -> serde_json::Value {
    lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_ns.is_empty() {
            return 0.0;
        }
        let idx = ((lat_ns.len() as f64 * p).ceil() as usize).clamp(1, lat_ns.len()) - 1;
        lat_ns[idx] as f64 / 1000.0
    };
    json!({
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": pct(1.0),
    })
}

fn hold(a: &HoldArgs) -> Res<serde_json::Value> {
    let HoldArgs {
        to,
        conns,
        secs,
        bytes,
        stall,
    } = *a;
    if bytes > 1024 * 1024 {
        return Err(format!("--bytes {bytes}: at most 1 MiB"));
    }
    mesh_tests::raise_fd_limit();
    let start = Instant::now();
    let mut open_conns = Vec::with_capacity(conns);
    let data = vec![0x5au8; bytes];
    let mut echo = vec![0u8; bytes];
    let (mut failed, mut last_error) = (0usize, String::new());
    for i in 0..conns {
        let one = open(to).and_then(|mut s| {
            s.write_all(&data)
                .and_then(|()| s.read_exact(&mut echo))
                .map_err(|e| format!("echo: {e}"))?;
            if echo != data {
                return Err("echo differs".to_string());
            }
            Ok(s)
        });
        match one {
            Ok(s) => open_conns.push(s),
            Err(e) => {
                failed += 1;
                last_error = format!("connection {i}: {e}");
                // Each failure may cost a timeout: a broken path is reported, not waited out.
                if failed >= MAX_HOLD_FAILURES {
                    return Err(format!("{failed} connections failed; last: {last_error}"));
                }
            }
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    let stalled = if stall {
        fill(&mut open_conns).map_err(|e| format!("stalling: {e}"))?
    } else {
        vec![0; open_conns.len()]
    };
    let stalled_total: usize = stalled.iter().sum();
    // The first line tells the caller that all are open (it samples memory meanwhile).
    println!(
        "{}",
        json!({"opened": open_conns.len(), "failed": failed, "open_secs": open_secs,
               "stalled_bytes": stalled_total})
    );
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs_f64(secs));
    // Every held connection must still carry data: one that a data plane dropped while idle
    // is lost.
    let probe = [0xa5u8; 64];
    let mut back = [0u8; 64];
    let mut lost = 0usize;
    for (i, (s, &n)) in open_conns.iter_mut().zip(&stalled).enumerate() {
        let ok = drain_echo(s, n)
            .and_then(|()| s.write_all(&probe))
            .and_then(|()| s.read_exact(&mut back))
            .map(|()| back == probe);
        match ok {
            Ok(true) => {}
            Ok(false) => {
                lost += 1;
                last_error = format!("held connection {i}: echo differs");
            }
            Err(e) => {
                lost += 1;
                last_error = format!("held connection {i}: {e}");
            }
        }
    }
    drop(open_conns);
    Ok(json!({
        "conns": conns, "bytes": bytes, "open_secs": open_secs, "opened": conns - failed,
        "failed": failed, "lost": lost, "last_error": last_error,
        "stalled_bytes": stalled_total,
    }))
}

/// Writes a pattern to every connection without reading, until none has taken anything for
/// half a second; returns what each took.
fn fill(conns: &mut [TcpStream]) -> std::io::Result<Vec<usize>> {
    let chunk = vec![0x3cu8; 64 * 1024];
    let mut taken = vec![0usize; conns.len()];
    for s in conns.iter() {
        s.set_nonblocking(true)?;
    }
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(500) {
        let mut any = false;
        for (s, t) in conns.iter_mut().zip(&mut taken) {
            match s.write(&chunk) {
                Ok(n) => {
                    *t += n;
                    any |= n > 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if any {
            quiet_since = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for s in conns.iter() {
        s.set_nonblocking(false)?;
    }
    Ok(taken)
}

/// Reads back `n` bytes of echo of what [`fill`] wrote, checking the pattern.
fn drain_echo(s: &mut TcpStream, mut n: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let k = s.read(&mut buf[..n.min(64 * 1024)])?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..k].iter().any(|&b| b != 0x3c) {
            return Err(std::io::Error::other("stalled data came back changed"));
        }
        n -= k;
    }
    Ok(())
}

/// One churn connection: open, echo `bytes` of a pattern that depends on `seq`, compare.
fn churn_one(to: SocketAddr, seq: u64, bytes: usize) -> Res<()> {
    let mut s = open(to)?;
    let data: Vec<u8> = (0..bytes)
        .map(|i| (seq as usize).wrapping_add(i).wrapping_mul(31) as u8)
        .collect();
    let mut back = vec![0u8; bytes];
    s.write_all(&data)
        .and_then(|()| s.read_exact(&mut back))
        .map_err(|e| format!("echo: {e}"))?;
    if back != data {
        return Err("echo differs".to_string());
    }
    Ok(())
}

fn churn(a: &ChurnArgs) -> Res<serde_json::Value> {
    let ChurnArgs {
        to,
        rate,
        secs,
        bytes,
        threads,
    } = *a;
    if bytes > 1024 * 1024 {
        return Err(format!("--bytes {bytes}: at most 1 MiB"));
    }
    mesh_tests::raise_fd_limit();
    let rate = rate.max(0.1);
    let threads = threads.max(1) as u64;
    let start = Instant::now();
    let total = (rate * secs).floor() as u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut late, mut last_error) =
                    (0u64, 0u64, 0u64, String::new());
                for seq in (t..total).step_by(threads as usize) {
                    let at = start + Duration::from_secs_f64(seq as f64 / rate);
                    match at.checked_duration_since(Instant::now()) {
                        Some(wait) => std::thread::sleep(wait),
                        // More than a second behind: the host (or the path) cannot keep up.
                        None if at.elapsed() > Duration::from_secs(1) => late += 1,
                        None => {}
                    }
                    match churn_one(to, seq, bytes) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            last_error = format!("connection {seq}: {e}");
                        }
                    }
                }
                (ok, failed, late, last_error)
            })
        })
        .collect();
    let (mut ok, mut failed, mut late, mut last_error) = (0u64, 0u64, 0u64, String::new());
    for h in handles {
        let (o, f, l, e) = h
            .join()
            .map_err(|_| "connection thread panicked".to_string())?;
        ok += o;
        failed += f;
        late += l;
        if !e.is_empty() {
            last_error = e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "connections": ok, "failed": failed, "late": late, "last_error": last_error,
        "secs": elapsed, "cps": ok as f64 / elapsed, "bytes": bytes,
    }))
}

/// How fast one thread seals TLS 1.3 records with the daemons' provider (rustls with ring) and
/// the suite their HBONE connections negotiate (TLS13_AES_256_GCM_SHA384, the first offered).
/// Every byte through the mesh is sealed by one daemon and opened by the other at about the
/// same speed, so 2 / this figure is the CPU seconds per GB that any HBONE data plane pays on
/// top of a plain relay before it does anything else (docs/BENCHMARKS.md).
fn seal(a: &SealArgs) -> Res<serde_json::Value> {
    use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
    use rustls::{ContentType, ProtocolVersion};
    if a.record == 0 || a.record > 16 * 1024 {
        return Err(format!("--record {}: 1 to 16384 bytes", a.record));
    }
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
        .tls13()
        .ok_or("TLS13_AES_256_GCM_SHA384 is not a TLS 1.3 suite")?;
    let mut enc = suite
        .aead_alg
        .encrypter(AeadKey::from([7u8; 32]), Iv::new([1u8; 12]));
    let payload = vec![0x5a_u8; a.record];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.secs);
    let mut records = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            let msg = OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&payload),
            };
            let sealed = enc.encrypt(msg, records).map_err(|e| e.to_string())?;
            std::hint::black_box(sealed);
            records += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = records * a.record as u64;
    Ok(json!({
        "suite": "TLS13_AES_256_GCM_SHA384", "record": a.record, "records": records,
        "secs": secs, "gb_per_s": bytes as f64 / secs / 1e9,
    }))
}
