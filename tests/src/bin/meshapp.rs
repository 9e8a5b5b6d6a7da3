//! `meshapp`: the application the acceptance tests, the demo and the benchmarks run in pods.
//!
//! ```text
//! meshapp serve   --port P --name N
//! meshapp send    --to IP:PORT --bytes N [--marker STR] [--conns K] [--hold SECS] [--timeout SECS]
//!                 [--rate BYTES_PER_SEC]
//! meshapp connect --to IP:PORT [--timeout SECS]
//! ```
//!
//! `serve` greets every connection with `HELLO <name> <peer ip:port as seen>\n` and then echoes
//! until EOF: the greeting tells the client which endpoint answered and which source address
//! the server saw (the mesh must preserve it), the echo lets the client verify every byte.
//! `send` prints one JSON object per connection and exits 0 only when all were intact.
//! `connect` reports how a single connection attempt ended (hello, refused, reset, eof,
//! timeout, unreachable), for tests that expect a failure.
//!
//! Plain std threads: a handful of connections per run, and nothing here should be harder to
//! trust than the thing it tests. Flags through clap, so `--help` lists them and a misspelt
//! one is an error (exit 2) rather than ignored.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

type Res<T> = Result<T, String>;

/// The test application of the mesh tests, the demo and the benchmarks.
#[derive(Debug, Parser)]
#[command(name = "meshapp")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Greet each connection with `HELLO <name> <peer as seen>`, then echo until EOF.
    Serve(ServeArgs),
    /// Send the pattern on `--conns` connections, check the echo; one JSON line each.
    Send(SendArgs),
    /// One connection attempt; a JSON line saying how it ended.
    Connect(ConnectArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Port to listen on (all addresses).
    #[arg(long)]
    port: u16,
    /// Name in the greeting.
    #[arg(long, default_value = "meshapp")]
    name: String,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Server address.
    #[arg(long)]
    to: SocketAddr,
    /// Bytes to send (and expect echoed) per connection.
    #[arg(long, default_value_t = 1024)]
    bytes: u64,
    /// Text the pattern is built from, so a capture of plaintext would show it.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    marker: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Seconds to keep each connection open after its echo.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Seconds any connect, read or write may take.
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
    /// Bytes per second each connection sends at most (0: as fast as it can), so that a
    /// transfer lasts `bytes / rate` seconds, e.g. across a daemon restart.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// Server address.
    #[arg(long)]
    to: SocketAddr,
    /// Seconds the connect and the greeting may take.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Serve(a) => serve(&a),
        Cmd::Send(a) => send(&a),
        Cmd::Connect(a) => connect(&a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meshapp: {e}");
            ExitCode::from(2)
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

// ---------------------------------------------------------------- serve

fn serve(args: &ServeArgs) -> Res<bool> {
    let (port, name) = (args.port, args.name.clone());
    // One descriptor per client connection; benchmarks hold thousands.
    mesh_tests::raise_fd_limit();
    // `[::]` takes IPv4 too (as IPv4-mapped addresses, printed back as IPv4 below); a host
    // without IPv6 gets `0.0.0.0`.
    let listener = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| format!("bind :{port}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {local}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let name = name.clone();
                std::thread::spawn(move || {
                    let peer = s.peer_addr().map(|p| canonical(p).to_string());
                    let peer = peer.unwrap_or_default();
                    match echo(s, &name) {
                        Ok(n) => eprintln!("conn from {peer}: echoed {n} bytes"),
                        Err(e) => eprintln!("conn from {peer}: {e}"),
                    }
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
    Ok(true)
}

/// An IPv4 client of the `[::]` listener as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn echo(mut s: TcpStream, name: &str) -> std::io::Result<u64> {
    let peer = canonical(s.peer_addr()?);
    s.write_all(format!("HELLO {name} {peer}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(total)
}

// ---------------------------------------------------------------- send

/// The bytes a client sends: a fixed block repeated, built from the marker so that a capture
/// of plaintext would contain it many times. Byte `o` of the stream is `block[o % len]`.
struct Pattern(Vec<u8>);

impl Pattern {
    fn new(marker: &str) -> Pattern {
        let mut block = Vec::new();
        if marker.is_empty() {
            block.extend((0..65521u32).map(|i| ((i * 7 + 3) % 251) as u8));
        } else {
            let mut k = 0u32;
            while block.len() < 64 * 1024 {
                block.extend_from_slice(format!("{marker}#{k:06}.").as_bytes());
                k += 1;
            }
        }
        Pattern(block)
    }

    fn fill(&self, offset: u64, out: &mut [u8]) {
        let len = self.0.len() as u64;
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.0[((offset + i as u64) % len) as usize];
        }
    }
}

fn send(args: &SendArgs) -> Res<bool> {
    let (to, bytes, conns) = (args.to, args.bytes, args.conns);
    let (hold, timeout, rate) = (secs(args.hold), secs(args.timeout), args.rate);
    let pattern = std::sync::Arc::new(Pattern::new(&args.marker));
    let handles: Vec<_> = (0..conns)
        .map(|i| {
            let pattern = pattern.clone();
            std::thread::spawn(move || one_conn(i, to, bytes, &pattern, hold, timeout, rate))
        })
        .collect();
    let mut all_ok = true;
    for h in handles {
        let report = h
            .join()
            .unwrap_or_else(|_| json!({"ok": false, "error": "connection thread panicked"}));
        all_ok &= report["ok"].as_bool() == Some(true);
        println!("{report}");
    }
    Ok(all_ok)
}

fn one_conn(
    conn: usize,
    to: SocketAddr,
    bytes: u64,
    pattern: &Pattern,
    hold: Duration,
    timeout: Duration,
    rate: f64,
) -> serde_json::Value {
    let mut report = json!({"conn": conn, "to": to.to_string(), "bytes": bytes, "ok": false});
    let mut fill = |key: &str, v: String| report[key] = json!(v);
    let result = (|| -> Res<()> {
        let s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
        fill(
            "local",
            s.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        );
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let hello = read_line(&s).map_err(|e| format!("reading HELLO: {e}"))?;
        let mut parts = hello.split_whitespace();
        if parts.next() != Some("HELLO") {
            return Err(format!("unexpected greeting `{hello}`"));
        }
        fill("server", parts.next().unwrap_or_default().to_string());
        fill("peer_seen", parts.next().unwrap_or_default().to_string());
        exchange(&s, bytes, pattern, rate)?;
        std::thread::sleep(hold);
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut rest = Vec::new();
        (&s).read_to_end(&mut rest)
            .map_err(|e| format!("waiting for the server's EOF: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} unexpected bytes after the echo", rest.len()));
        }
        Ok(())
    })();
    match result {
        Ok(()) => report["ok"] = json!(true),
        Err(e) => report["error"] = json!(e),
    }
    report
}

/// Writes `bytes` of the pattern from a second thread (at most `rate` bytes a second when
/// above 0) while reading the echo here, so neither side's buffers can fill up and deadlock;
/// compares every byte read.
fn exchange(s: &TcpStream, bytes: u64, pattern: &Pattern, rate: f64) -> Res<()> {
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> Res<()> {
            let mut w = s;
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            let start = std::time::Instant::now();
            while off < bytes {
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(off as f64 / rate);
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                }
                let n = (bytes - off).min(buf.len() as u64) as usize;
                pattern.fill(off, &mut buf[..n]);
                w.write_all(&buf[..n])
                    .map_err(|e| format!("write at {off}: {e}"))?;
                off += n as u64;
            }
            Ok(())
        });
        let mut r = s;
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        let read_result = loop {
            if off >= bytes {
                break Ok(());
            }
            let cap = (bytes - off).min(buf.len() as u64) as usize;
            match r.read(&mut buf[..cap]) {
                Ok(0) => break Err(format!("EOF after {off} of {bytes} echoed bytes")),
                Ok(n) => {
                    pattern.fill(off, &mut want[..n]);
                    if buf[..n] != want[..n] {
                        break Err(format!("echoed bytes differ near offset {off}"));
                    }
                    off += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("read at {off} of {bytes}: {e}")),
            }
        };
        if read_result.is_err() {
            // Unblock the writer so the scope can end.
            let _ = s.shutdown(Shutdown::Both);
        }
        let write_result = writer
            .join()
            .unwrap_or_else(|_| Err("writer thread panicked".to_string()));
        read_result.and(write_result)
    })
}

/// Reads one `\n`-terminated line byte by byte, so no echoed data is consumed with it.
fn read_line(mut s: &TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "EOF")),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if line.len() > 1024 {
            return Err(std::io::Error::new(ErrorKind::InvalidData, "line too long"));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

// ---------------------------------------------------------------- connect

fn connect(args: &ConnectArgs) -> Res<bool> {
    let (to, timeout) = (args.to, secs(args.timeout));
    let (result, detail) = match TcpStream::connect_timeout(&to, timeout) {
        Err(e) => (classify(&e), e.to_string()),
        Ok(s) => {
            let _ = s.set_read_timeout(Some(timeout));
            match read_line(&s) {
                Ok(line) => ("hello", line),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => ("eof", e.to_string()),
                Err(e) => (classify(&e), e.to_string()),
            }
        }
    };
    let report = if result == "hello" {
        json!({"to": to.to_string(), "result": result, "hello": detail})
    } else {
        json!({"to": to.to_string(), "result": result, "error": detail})
    };
    println!("{report}");
    Ok(result == "hello")
}

fn classify(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "reset",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => "unreachable",
        _ => "error",
    }
}
