//! `meshload`: the load generator of `cargo xtask bench` and `cargo xtask overhead`, run
//! inside a client pod against `meshapp serve` (HELLO line, then echo).
//!
//! ```text
//! meshload rr  --to IP:PORT --size BYTES --secs S [--rate PER_SEC] [--warmup S]
//! meshload crr --to IP:PORT --secs S [--conns K]
//! meshload hold --to IP:PORT --conns K --secs S [--bytes N]
//! ```
//!
//! `rr`: one connection, a request of `size` bytes, wait for the whole echo, repeat. Without
//! `--rate` back-to-back; with it, requests are scheduled at fixed intervals and each latency is
//! measured from the *scheduled* send time, so a stall is not hidden by the requests it delayed
//! (no coordinated omission). Prints one JSON object: count, rate and p50/p90/p99/max in
//! microseconds. `crr`: `conns` threads each opening a connection, reading the HELLO line (so
//! the whole path, tunnel included, was set up) and closing normally, for `secs`; prints connections per
//! second and how many attempts failed (each failure costs its timeout, so failures also
//! lower the rate). `rr` exits non-zero on any I/O error: a broken path must not report.
//! `hold`: opens `conns` connections one after another, echoes `bytes` (default 256 KiB) on
//! each, as a connection that did some work before going idle (every buffer on the path has
//! been used), keeps them all open until `secs` after the start,
//! then closes them; prints how long opening took. The benchmark samples data-plane memory
//! while they are held: the cost of an open, idle connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::json;

type Res<T> = Result<T, String>;

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
}

#[derive(Debug, Clone, Copy, Args)]
struct HoldArgs {
    /// Server address (`meshapp serve`).
    #[arg(long)]
    to: SocketAddr,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 500)]
    conns: usize,
    /// Seconds from the start until they are closed.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bytes echoed on each before it idles (at most 1 MiB, so writing it all before reading
    /// cannot fill both directions' buffers).
    #[arg(long, default_value_t = 256 * 1024)]
    bytes: usize,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Rr(a) => rr(&a),
        Cmd::Crr(a) => crr(&a),
        Cmd::Hold(a) => hold(&a),
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
                // Sleep most of the way, spin the rest: a sleeping thread wakes tens of
                // microseconds late, which would be charged to every path alike as latency.
                let now = Instant::now();
                if at > now + SPIN {
                    std::thread::sleep(at - now - SPIN);
                }
                while Instant::now() < at {
                    std::hint::spin_loop();
                }
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
    lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_ns.is_empty() {
            return 0.0;
        }
        let idx = ((lat_ns.len() as f64 * p).ceil() as usize).clamp(1, lat_ns.len()) - 1;
        lat_ns[idx] as f64 / 1000.0
    };
    Ok(json!({
        "requests": lat_ns.len(),
        "secs": elapsed,
        "rps": lat_ns.len() as f64 / elapsed,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": pct(1.0),
    }))
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
    let CrrArgs { to, secs, conns } = *a;
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

fn hold(a: &HoldArgs) -> Res<serde_json::Value> {
    let HoldArgs {
        to,
        conns,
        secs,
        bytes,
    } = *a;
    if bytes > 1024 * 1024 {
        return Err(format!("--bytes {bytes}: at most 1 MiB"));
    }
    mesh_tests::raise_fd_limit();
    let start = Instant::now();
    let mut open_conns = Vec::with_capacity(conns);
    let data = vec![0x5au8; bytes];
    let mut echo = vec![0u8; bytes];
    for i in 0..conns {
        let mut s = open(to).map_err(|e| format!("connection {i}: {e}"))?;
        s.write_all(&data)
            .and_then(|()| s.read_exact(&mut echo))
            .map_err(|e| format!("connection {i}: echo: {e}"))?;
        if echo != data {
            return Err(format!("connection {i}: echo differs"));
        }
        open_conns.push(s);
    }
    let open_secs = start.elapsed().as_secs_f64();
    let end = start + Duration::from_secs_f64(secs);
    if let Some(left) = end.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    drop(open_conns);
    Ok(json!({ "conns": conns, "bytes": bytes, "open_secs": open_secs }))
}
