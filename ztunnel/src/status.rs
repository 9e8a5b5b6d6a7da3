//! `ztunnel status`, `ztunnel workloads`, `ztunnel certificates`: operator views of a running
//! daemon, read from its admin socket (`/config_dump`; or with `--admin` from the read-only
//! TCP admin port, in the node's network namespace). Aligned tables by default, the raw JSON
//! parts with `-o json`. Also `ztunnel log-level` and `ztunnel quit`, which change the daemon
//! and so only work on the socket.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::config::DEFAULT_ADMIN_SOCKET;

/// Where the daemon's admin API is.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The daemon's admin socket (every admin route; needs the daemon's user, normally root).
    #[arg(long, env = "ZTUNNEL_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
    /// Use the TCP admin port at this address instead (e.g. `127.0.0.1:15000`, from the node's
    /// network namespace); it only reads.
    #[arg(long, env = "ZTUNNEL_ADMIN")]
    pub admin: Option<SocketAddr>,
}

/// Options shared by the status commands.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Where the admin API is.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Output format: `table` or `json`.
    #[arg(short = 'o', long = "output", default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// Which view to print.
#[derive(Debug, Clone, Copy)]
pub enum View {
    /// Summary.
    Status,
    /// Workloads table.
    Workloads,
    /// Certificates table.
    Certificates,
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin API could not be reached or answered badly.
    #[error("admin API at {endpoint}: {error} (is the daemon running? set --admin-socket, or --admin for the read-only TCP port)")]
    Fetch {
        /// The socket path or TCP address.
        endpoint: String,
        /// Cause.
        error: String,
    },
    /// The daemon refused the request.
    #[error("{endpoint}: {status}: {body}")]
    Refused {
        /// The socket path or TCP address.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// The daemon's explanation.
        body: String,
    },
}

/// Fetches `/config_dump` and prints `view` to stdout.
pub fn run(view: View, args: &StatusArgs) -> Result<(), StatusError> {
    let body = call(&args.admin, "GET", "/config_dump")?;
    let dump: Value = serde_json::from_str(&body).map_err(|e| StatusError::Fetch {
        endpoint: endpoint(&args.admin),
        error: format!("response is not JSON: {e}"),
    })?;
    let json = args.output == "json";
    let out = match view {
        View::Status if json => pretty(&summary(&dump)),
        View::Workloads if json => pretty(&dump["workloads"]),
        View::Certificates if json => pretty(&dump["certificates"]),
        View::Status => render_status(&dump),
        View::Workloads => render_workloads(&dump),
        View::Certificates => render_certificates(&dump),
    };
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}

/// `ztunnel log-level [FILTER]`: prints the log filter, or sets it first.
pub fn log_level(args: &AdminArgs, filter: Option<&str>) -> Result<(), StatusError> {
    let body = match filter {
        None => call(args, "GET", "/logging")?,
        Some(f) => {
            let encoded = percent_encoding::utf8_percent_encode(f, QUERY_VALUE);
            call(args, "POST", &format!("/logging?level={encoded}"))?
        }
    };
    print!("{body}");
    Ok(())
}

/// `ztunnel quit`: starts the daemon's drain, as SIGTERM does.
pub fn quit(args: &AdminArgs) -> Result<(), StatusError> {
    print!("{}", call(args, "POST", "/quitquitquit")?);
    Ok(())
}

/// What a query value must not carry unencoded.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b':');

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

fn endpoint(args: &AdminArgs) -> String {
    match args.admin {
        Some(addr) => addr.to_string(),
        None => args.admin_socket.display().to_string(),
    }
}

/// One request, `connection: close`, on the socket or the TCP port; the body of a 200.
///
/// Hand-written rather than an HTTP client: a command makes one request and reads to EOF, and
/// the daemon answers with a `content-length` body, so this is all the protocol it needs.
fn call(args: &AdminArgs, method: &str, path: &str) -> Result<String, StatusError> {
    let endpoint = endpoint(args);
    let err = |error: String| StatusError::Fetch {
        endpoint: endpoint.clone(),
        error,
    };
    let timeout = Some(Duration::from_secs(10));
    let raw = match args.admin {
        Some(addr) => {
            let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| err(e.to_string()))?;
            tcp.set_read_timeout(timeout)
                .map_err(|e| err(e.to_string()))?;
            exchange(&mut tcp, method, path)
        }
        None => {
            let mut unix = UnixStream::connect(&args.admin_socket).map_err(|e| {
                err(match e.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        format!("{e}: run as the daemon's user (root)")
                    }
                    _ => e.to_string(),
                })
            })?;
            unix.set_read_timeout(timeout)
                .map_err(|e| err(e.to_string()))?;
            exchange(&mut unix, method, path)
        }
    }
    .map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| err("malformed HTTP response".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            err(format!(
                "malformed status line `{}`",
                head.lines().next().unwrap_or("")
            ))
        })?;
    if status != 200 {
        return Err(StatusError::Refused {
            endpoint,
            status,
            body: body.trim_end().to_string(),
        });
    }
    Ok(body.to_string())
}

fn exchange<S: Read + Write>(s: &mut S, method: &str, path: &str) -> std::io::Result<Vec<u8>> {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(raw)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn summary(d: &Value) -> Value {
    serde_json::json!({
        "node": d["node"],
        "ready": d["ready"],
        "not_ready_reason": d["not_ready_reason"],
        "draining": d["draining"],
        "active_flows": d["active_flows"],
        "generation": d["generation"],
        "workloads": d["workloads"].as_array().map_or(0, Vec::len),
        "services": d["services"].as_object().map_or(0, serde_json::Map::len),
        "enrolled_pods": d["enrolled_pods"],
        "certificates": d["certificates"],
        "ca": d["ca"],
        "hbone_pool": d["hbone_pool"],
        "capture": d["capture"],
        "source": d["source"],
        "policy_problems": d["policy_problems"],
    })
}

/// `kube, in sync` or `kube, stale for 12s (Pod: <error>; ...)`.
fn render_source(src: &Value) -> String {
    let name = s(&src["source"]);
    if src["in_sync"].as_bool().unwrap_or(true) {
        return format!("{name}, in sync");
    }
    let failing: Vec<String> = src["failing"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(part, p)| format!("{part}: {}", s(&p["error"])))
        .collect();
    format!(
        "{name}, stale for {}s ({})",
        s(&src["stale_seconds"]),
        failing.join("; ")
    )
}

/// `in sync`, or `failing for 1 identity (spiffe://...: <error>, 4 attempts, next retry in
/// 8s; ...)`: the CA's trouble shows here before any certificate expires.
fn render_ca(ca: &Value) -> String {
    if ca["in_sync"].as_bool().unwrap_or(true) {
        return "in sync".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let failing: Vec<String> = ca["failing"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, f)| {
            let next = f["next_retry"].as_u64().unwrap_or(0).saturating_sub(now);
            format!(
                "{id}: {}, {} attempts, failing for {}s, next retry in {next}s",
                s(&f["error"]),
                s(&f["attempts"]),
                now.saturating_sub(f["failing_since"].as_u64().unwrap_or(now)),
            )
        })
        .collect();
    let n = failing.len();
    let plural = if n == 1 { "identity" } else { "identities" };
    format!("failing for {n} {plural} ({})", failing.join("; "))
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn render_status(d: &Value) -> String {
    let mut out = format!(
        "node: {}\nready: {}{}\ndraining: {}\nactive flows: {}\nstate source: {}\ncertificate authority: {}\nstate generation: {}\nworkloads: {}  services: {}\nhbone pool: {} connections, {} streams\ncapture attached to: {}\ncapture uplinks: {}\n\nENROLLED PODS\n",
        s(&d["node"]),
        s(&d["ready"]),
        d["not_ready_reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        s(&d["draining"]),
        s(&d["active_flows"]),
        render_source(&d["source"]),
        render_ca(&d["ca"]),
        s(&d["generation"]),
        d["workloads"].as_array().map_or(0, Vec::len),
        d["services"].as_object().map_or(0, serde_json::Map::len),
        s(&d["hbone_pool"]["connections"]),
        s(&d["hbone_pool"]["streams"]),
        d["capture"]["attached_interfaces"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        d["capture"]["uplinks"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
    );
    let rows: Vec<Vec<String>> = d["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                s(&p["pod"]),
                s(&p["ip"]),
                s(&p["enrolled"]),
                s(&p["captured"]),
                s(&p["identity"]),
                s(&p["capture_problem"]),
            ]
        })
        .collect();
    out += &table(
        &[
            "POD",
            "IP",
            "ENROLLED",
            "CAPTURED",
            "IDENTITY",
            "CAPTURE PROBLEM",
        ],
        &rows,
    );
    out += "\nCERTIFICATES\n";
    out += &render_certificates(d);
    out += &render_policy_problems(d);
    out
}

/// Invalid policies (enforced failing closed) and caveats; nothing when there are none.
fn render_policy_problems(d: &Value) -> String {
    let problems = d["policy_problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        return "\nPOLICIES: no invalid policy, no caveat\n".into();
    }
    let invalid = problems.iter().filter(|p| p["invalid"] == true).count();
    let rows: Vec<Vec<String>> = problems
        .iter()
        .map(|p| {
            let state = if p["invalid"] == true {
                "INVALID"
            } else {
                "CAVEAT"
            };
            vec![
                state.to_string(),
                s(&p["kind"]),
                s(&p["policy"]),
                s(&p["action"]),
                s(&p["field"]),
                format!("{} ({})", s(&p["effect"]), s(&p["message"])),
            ]
        })
        .collect();
    format!(
        "\nPOLICY PROBLEMS ({invalid} invalid, enforced failing closed; {} with a caveat)\n{}",
        problems.len() - invalid,
        table(
            &["STATE", "KIND", "POLICY", "ACTION", "FIELD", "MEANING"],
            &rows
        )
    )
}

fn render_workloads(d: &Value) -> String {
    let rows: Vec<Vec<String>> = d["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            vec![
                format!("{}/{}", s(&w["namespace"]), s(&w["name"])),
                s(&w["ip"]),
                s(&w["node"]),
                s(&w["workload_name"]),
                s(&w["enrolled"]),
                s(&w["identity"]),
            ]
        })
        .collect();
    table(
        &["POD", "IP", "NODE", "WORKLOAD", "ENROLLED", "IDENTITY"],
        &rows,
    )
}

fn render_certificates(d: &Value) -> String {
    let rows: Vec<Vec<String>> = d["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["identity"]),
                s(&c["state"]),
                s(&c["serial"]),
                s(&c["not_after"]),
                s(&c["expires_in_secs"]),
            ]
        })
        .collect();
    table(
        &["IDENTITY", "STATE", "SERIAL", "NOT_AFTER", "EXPIRES_IN_S"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["long-value".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A           BB");
        assert_eq!(lines[1], "long-value  x");
        assert_eq!(lines[2], "y           z");
    }

    #[test]
    fn ca_trouble_is_named() {
        assert_eq!(render_ca(&serde_json::json!({"in_sync": true})), "in sync");
        assert_eq!(render_ca(&Value::Null), "in sync", "an older daemon's dump");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ca = serde_json::json!({"in_sync": false, "failing": {"spiffe://td/ns/a/sa/b": {
            "error": "CA unreachable", "attempts": 3, "failing_since": now - 7,
            "next_retry": now + 4}}});
        let text = render_ca(&ca);
        assert!(
            text.starts_with(
                "failing for 1 identity (spiffe://td/ns/a/sa/b: CA unreachable, 3 attempts"
            ) && text.contains("failing for 7s"),
            "{text}"
        );
    }
}
