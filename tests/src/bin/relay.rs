//! `relay`: a plain TCP relay, the floor the benchmarks measure the mesh against.
//!
//! ```text
//! relay [--threads N] LISTEN=TARGET...
//! ```
//!
//! Each `LISTEN=TARGET` pair (`ip:port=ip:port`) accepts connections on LISTEN and copies the
//! bytes both ways to a new connection to TARGET, half-closes included, and does nothing else:
//! no TLS, no HTTP/2, no policy, no connection pool, no logs per connection, no metrics. Two of
//! them where the mesh's two proxies sit (on the client's node and on the server's node) carry
//! a request through the same sockets, hops and wake-ups as the mesh, so what they cost is what
//! any user-space proxy on that path pays before it does any work of its own (`cargo xtask
//! bench --relay`). It is not a floor for new connections: without a pool, each one costs a
//! TCP handshake between the relays that a pooled HBONE connection does not.
//!
//! Each thread runs a single-threaded tokio runtime with listening sockets of its own
//! (`SO_REUSEPORT`: the kernel spreads new connections over the threads), as the daemon's
//! workers do.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A plain TCP relay: the cost of a user-space proxy that does nothing but copy.
#[derive(Debug, Parser)]
#[command(name = "relay")]
struct Cli {
    /// Threads, each with its own runtime and listening sockets.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// `LISTEN=TARGET` pairs, each `ip:port=ip:port`.
    #[arg(required = true, value_parser = parse_pair)]
    pairs: Vec<(SocketAddr, SocketAddr)>,
}

fn parse_pair(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, target) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected LISTEN=TARGET"))?;
    let addr = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("`{a}`: {e}"));
    Ok((addr(listen)?, addr(target)?))
}

/// Buffer per direction of a relayed connection, the size of the daemon's splice reads.
const BUF: usize = 64 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads: Vec<_> = (0..cli.threads.max(1))
        .map(|_| {
            let pairs = cli.pairs.clone();
            std::thread::spawn(move || serve(&pairs))
        })
        .collect();
    for t in threads {
        let err = match t.join() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => "a relay thread panicked".to_string(),
        };
        eprintln!("relay: {err}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// One thread: listens on every pair's address and relays what it accepts.
fn serve(pairs: &[(SocketAddr, SocketAddr)]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let mut loops = tokio::task::JoinSet::new();
        for &(listen, target) in pairs {
            loops.spawn(accept_loop(listener(listen)?, target));
        }
        // The loops run until the process is killed.
        while let Some(done) = loops.join_next().await {
            done.map_err(|e| format!("accept loop: {e}"))?;
        }
        Ok(())
    })
}

fn listener(addr: SocketAddr) -> Result<TcpListener, String> {
    let err = |e: std::io::Error| format!("listening on {addr}: {e}");
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.set_reuseport(true).map_err(err)?;
    // Copied by Linux to every accepted socket.
    sock.set_nodelay(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(1024).map_err(err)
}

/// Accepts for ever; a failed accept (out of descriptors, aborted by the peer) is reported and
/// the loop goes on.
async fn accept_loop(l: TcpListener, target: SocketAddr) {
    loop {
        match l.accept().await {
            Ok((a, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = relay(a, target).await {
                        eprintln!("relay: to {target}: {e}");
                    }
                });
            }
            Err(e) => eprintln!("relay: accept: {e}"),
        }
    }
}

async fn relay(mut a: TcpStream, target: SocketAddr) -> std::io::Result<()> {
    let mut b = TcpStream::connect(target).await?;
    b.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUF, BUF).await?;
    Ok(())
}
