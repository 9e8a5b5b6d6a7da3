//! The admin (15000, loopback), metrics (15020) and readiness (15021) ports.
//!
//! A deliberately tiny HTTP/1.1 responder ([`serve`]): one request per connection, GET only, a
//! few fixed paths. It serves probes and operators, never the data path, so it need not be
//! fast, and keeping it small avoids pulling an HTTP server framework into the daemon. The
//! routes of each port live in their own module: [`routes`] (admin: `/config_dump`,
//! `/logging`, `/quitquitquit`), [`metrics`] (`/metrics`, `/stats/prometheus`) and
//! [`readiness`] (`/healthz/ready`).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod metrics;
pub mod readiness;
pub mod routes;

pub use readiness::Readiness;

/// What the admin API and metrics show of capture; written by the main task after each sync.
#[derive(Debug, Default)]
pub struct CaptureView(Mutex<CaptureSnapshot>);

/// Capture as last synced.
#[derive(Debug, Default, Clone)]
pub struct CaptureSnapshot {
    /// Interfaces with programs attached.
    pub interfaces: Vec<String>,
    /// Pod IPs in the enrolled map.
    pub enrolled: Vec<Ipv4Addr>,
}

impl CaptureView {
    /// A copy of the last recorded sync.
    pub fn snapshot(&self) -> CaptureSnapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a sync; returns whether the attached interfaces differ from the last one.
    pub fn update(&self, interfaces: Vec<String>, enrolled: Vec<Ipv4Addr>) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.interfaces != interfaces;
        *last = CaptureSnapshot {
            interfaces,
            enrolled,
        };
        changed
    }
}

/// A response: status, content type, body.
#[derive(Debug)]
pub struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    /// A JSON 200.
    pub fn json(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body,
        }
    }
    /// A reply with any content type.
    pub fn new(status: u16, content_type: &'static str, body: String) -> Reply {
        Reply {
            status,
            content_type,
            body,
        }
    }
    /// A plain-text reply.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Serves `route(path)` on `listener` forever.
pub async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(tcp, &*route)).await;
        });
    }
}

async fn answer<F: Fn(&str) -> Reply>(mut tcp: TcpStream, route: &F) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let reply = match (parts.next(), parts.next()) {
        (Some("GET") | Some("POST"), Some(path)) => route(path),
        _ => Reply::text(400, "bad request\n"),
    };
    let reason = match reply.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "",
    };
    let msg = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    tcp.write_all(msg.as_bytes()).await?;
    tcp.shutdown().await
}
