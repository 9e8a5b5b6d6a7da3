//! `ztunnel status`, `ztunnel workloads`, `ztunnel certificates`: operator views of a running
//! daemon, read from its admin API (`/config_dump` on 15000, loopback: run them in the node's
//! network namespace). Aligned tables by default, the raw JSON parts with `-o json`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Options shared by the status commands.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Admin API of the daemon.
    #[arg(long, env = "ZTUNNEL_ADMIN", default_value_t = (Ipv4Addr::LOCALHOST, crate::config::DEFAULT_ADMIN_PORT).into())]
    pub admin: SocketAddr,
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

/// Why a status command failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin API could not be reached or answered badly.
    #[error("admin API at {addr}: {error} (is the daemon running in this network namespace? set --admin)")]
    Fetch {
        /// Admin address.
        addr: SocketAddr,
        /// Cause.
        error: String,
    },
}

/// Fetches `/config_dump` and prints `view` to stdout.
pub fn run(view: View, args: &StatusArgs) -> Result<(), StatusError> {
    let dump = fetch(args.admin, "/config_dump")?;
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

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Minimal HTTP/1.1 GET; the admin server closes after each answer.
fn fetch(addr: SocketAddr, path: &str) -> Result<Value, StatusError> {
    let err = |error: String| StatusError::Fetch { addr, error };
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| err(e.to_string()))?;
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| err(e.to_string()))?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| err("malformed HTTP response".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(err(head.lines().next().unwrap_or("").to_string()));
    }
    serde_json::from_str(body).map_err(|e| err(format!("response is not JSON: {e}")))
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
        "draining": d["draining"],
        "active_flows": d["active_flows"],
        "generation": d["generation"],
        "workloads": d["workloads"].as_array().map_or(0, Vec::len),
        "services": d["services"].as_object().map_or(0, serde_json::Map::len),
        "enrolled_pods": d["enrolled_pods"],
        "certificates": d["certificates"],
        "hbone_pool": d["hbone_pool"],
        "capture": d["capture"],
        "source": d["source"],
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
        "node: {}\nready: {}\ndraining: {}\nactive flows: {}\nstate source: {}\nstate generation: {}\nworkloads: {}  services: {}\nhbone pool: {} connections, {} streams\ncapture attached to: {}\n\nENROLLED PODS\n",
        s(&d["node"]),
        s(&d["ready"]),
        s(&d["draining"]),
        s(&d["active_flows"]),
        render_source(&d["source"]),
        s(&d["generation"]),
        d["workloads"].as_array().map_or(0, Vec::len),
        d["services"].as_object().map_or(0, serde_json::Map::len),
        s(&d["hbone_pool"]["connections"]),
        s(&d["hbone_pool"]["streams"]),
        d["capture"]["attached_interfaces"]
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
            ]
        })
        .collect();
    out += &table(&["POD", "IP", "ENROLLED", "CAPTURED", "IDENTITY"], &rows);
    out += "\nCERTIFICATES\n";
    out += &render_certificates(d);
    out
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
}
