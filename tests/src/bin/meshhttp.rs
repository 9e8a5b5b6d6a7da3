//! `meshhttp`: the HTTP backend the waypoint tests run in pods, and an HTTP/2 client.
//!
//! ```text
//! meshhttp serve --listen IP:PORT [--listen IP:PORT]... --name N
//! meshhttp get   --url http://IP:PORT/PATH --count N [--http2 true] [--timeout SECS]
//! ```
//!
//! Serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, because a waypoint
//! speaks to a backend in the version its client spoke. Every answer carries `x-backend: <N>`
//! and the body `<N>\n`, so a client can count which backend a request reached. Two paths
//! behave differently, for the retry and timeout tests:
//!
//! - `/flaky/<key>`: the first request for a key is answered 503, later ones 200;
//! - `/slow/<ms>`: answered 200 after `<ms>` milliseconds;
//! - `/echo`: the request body is the answer's body, so a client can check its bytes came
//!   through intact.
//!
//! Prints `listening` once bound and one JSON line per request (`path`, `version`, `status`,
//! `peer`, `body_bytes`), which the tests read to see what reached the backend.
//!
//! `get` sends `count` requests one after the other on one connection (paths `PATH1` ..
//! `PATHN`) and prints `<status> <x-backend>` per request (status 0 when none came). The tests
//! use curl for HTTP/1.1; Debian 12's curl (7.88) fails every request after the first on a
//! reused HTTP/2 prior-knowledge connection ("Error in the HTTP2 framing layer", against any
//! server), so many HTTP/2 requests on one connection are sent with this instead.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

/// What to run.
#[derive(Debug, clap::Parser)]
#[command(
    name = "meshhttp",
    about = "HTTP backend and HTTP/2 client of the waypoint tests"
)]
enum Cmd {
    /// Serve HTTP/1.1 and h2c on one port.
    Serve {
        /// Address to listen on; repeated for a dual-stack pod (its IPv4 and IPv6 addresses).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Name answered in `x-backend` and the body.
        #[arg(long, default_value = "meshhttp")]
        name: String,
    },
    /// Send requests one after the other on one connection.
    Get {
        /// `http://IP:PORT/PATH`.
        #[arg(long)]
        url: http::Uri,
        /// How many requests.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// HTTP/2 with prior knowledge instead of HTTP/1.1.
        #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
        http2: bool,
        /// Seconds for the whole run.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
}

fn main() -> ExitCode {
    let cmd = <Cmd as clap::Parser>::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshhttp: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let done = runtime.block_on(async {
        match cmd {
            Cmd::Serve { listen, name } => serve(listen, name).await,
            Cmd::Get {
                url,
                count,
                http2,
                timeout,
            } => tokio::time::timeout(Duration::from_secs_f64(timeout), get(url, count, http2))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        }
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshhttp: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(listen: Vec<SocketAddr>, name: String) -> std::io::Result<()> {
    let mut listeners = Vec::new();
    for addr in &listen {
        listeners.push(tokio::net::TcpListener::bind(addr).await?);
    }
    let list: Vec<String> = listen.iter().map(ToString::to_string).collect();
    println!("listening on {}", list.join(" "));
    let name: Arc<str> = name.into();
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        loops.spawn(accept_loop(listener, name.clone(), seen.clone()));
    }
    match loops.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(std::io::Error::other(e)),
        None => Ok(()),
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    name: Arc<str>,
    seen: Arc<Mutex<HashSet<String>>>,
) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let (name, seen) = (name.clone(), seen.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (name, seen) = (name.clone(), seen.clone());
                async move { Ok::<_, Infallible>(answer(&name, &seen, peer, req).await) }
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                eprintln!("meshhttp: connection from {peer}: {e}");
            }
        });
    }
}

async fn answer(
    name: &str,
    seen: &Mutex<HashSet<String>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    if let Some(key) = path.strip_prefix("/flaky/") {
        let first = seen
            .lock()
            .map(|mut s| s.insert(key.to_string()))
            .unwrap_or(false);
        if first {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        let ms = ms.parse().unwrap_or(0u64);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if path == "/echo" {
        let version = req.version();
        return match req.into_body().collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                log_request(&path, version, status, peer, body.len());
                Response::new(Full::new(body))
            }
            Err(e) => {
                eprintln!("meshhttp: reading the body from {peer}: {e}");
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                resp
            }
        };
    }
    log_request(&path, req.version(), status, peer, 0);
    let mut resp = Response::new(Full::new(Bytes::from(format!("{name}\n"))));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

/// The request's JSON line on stdout (`body_bytes`: the body's length, read only by `/echo`).
fn log_request(
    path: &str,
    version: http::Version,
    status: StatusCode,
    peer: SocketAddr,
    body_bytes: usize,
) {
    println!(
        "{}",
        json!({
            "path": path,
            "version": format!("{version:?}"),
            "status": status.as_u16(),
            "peer": peer.to_string(),
            "body_bytes": body_bytes,
        })
    );
}

/// `count` GETs on one connection; one `<status> <x-backend>` line each.
async fn get(url: http::Uri, count: usize, http2: bool) -> std::io::Result<()> {
    use http_body_util::Empty;
    let err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let authority = url
        .authority()
        .ok_or_else(|| err(&"the URL has no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((authority.host(), port)).await?;
    let io = TokioIo::new(tcp);
    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    }
    let mut sender = if http2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| err(&e))?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| err(&e))?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    for i in 1..=count {
        let req = Request::get(format!("{}{i}", url.path()))
            .header("host", authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| err(&e))?;
        let sent = match &mut sender {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        };
        match sent {
            Ok(resp) => {
                let backend = resp
                    .headers()
                    .get("x-backend")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let status = resp.status().as_u16();
                resp.into_body().collect().await.map_err(|e| err(&e))?;
                println!("{status} {backend}");
            }
            Err(e) => {
                println!("0 ");
                eprintln!("meshhttp: request {i}: {e}");
                return Err(err(&e));
            }
        }
    }
    Ok(())
}
