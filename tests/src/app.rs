//! Typed wrappers around `meshapp` (tests/src/bin/meshapp.rs) running inside pods.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cluster::Pod;

/// A `meshapp serve` in a pod; killed on drop (and by cluster teardown in any case).
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Pod it runs in (`"ns/name"`).
    pub pod: String,
    /// Listening port.
    pub port: u16,
    /// Name it greets with.
    pub name: String,
    /// stdout+stderr of the server (one line per finished connection).
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options of `meshapp send`.
#[derive(Debug, Clone)]
pub struct SendOpts {
    /// Destination.
    pub to: SocketAddr,
    /// Bytes per connection (echoed back and compared).
    pub bytes: u64,
    /// String repeated throughout the payload, to look for in captures.
    pub marker: String,
    /// Concurrent connections.
    pub conns: usize,
    /// Seconds each connection stays open after the echo.
    pub hold: f64,
    /// Per-operation timeout in seconds.
    pub timeout: f64,
    /// Bytes per second each connection sends at most (`None`: unpaced).
    pub rate: Option<u64>,
}

impl SendOpts {
    /// One connection of 1 KiB to `to` (`"ip:port"`; panics on a malformed literal, which is a
    /// mistake in the test).
    pub fn to(to: &str) -> SendOpts {
        SendOpts {
            to: to
                .parse()
                .unwrap_or_else(|e| panic!("bad address `{to}`: {e}")),
            bytes: 1024,
            marker: String::new(),
            conns: 1,
            hold: 0.0,
            timeout: 20.0,
            rate: None,
        }
    }
    /// Sets the byte count.
    pub fn bytes(mut self, n: u64) -> Self {
        self.bytes = n;
        self
    }
    /// Sets the marker.
    pub fn marker(mut self, m: &str) -> Self {
        self.marker = m.to_string();
        self
    }
    /// Sets the connection count.
    pub fn conns(mut self, k: usize) -> Self {
        self.conns = k;
        self
    }
    /// Sets the hold time.
    pub fn hold(mut self, secs: f64) -> Self {
        self.hold = secs;
        self
    }
    /// Sets the timeout.
    pub fn timeout(mut self, secs: f64) -> Self {
        self.timeout = secs;
        self
    }
    /// Paces each connection to `bytes_per_sec`, so a transfer lasts `bytes / rate` seconds.
    pub fn rate(mut self, bytes_per_sec: u64) -> Self {
        self.rate = Some(bytes_per_sec);
        self
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "send".to_string(),
            "--to".into(),
            self.to.to_string(),
            "--bytes".into(),
            self.bytes.to_string(),
            "--conns".into(),
            self.conns.to_string(),
            "--hold".into(),
            self.hold.to_string(),
            "--timeout".into(),
            self.timeout.to_string(),
        ];
        if !self.marker.is_empty() {
            a.extend(["--marker".to_string(), self.marker.clone()]);
        }
        if let Some(r) = self.rate {
            a.extend(["--rate".to_string(), r.to_string()]);
        }
        a
    }
}

/// One connection's result, as `meshapp send` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnReport {
    /// Index of the connection.
    #[serde(default)]
    pub conn: usize,
    /// Name of the server that answered.
    #[serde(default)]
    pub server: Option<String>,
    /// The client address the server saw.
    #[serde(default)]
    pub peer_seen: Option<String>,
    /// The client's local address.
    #[serde(default)]
    pub local: Option<String>,
    /// Bytes sent (and expected back).
    #[serde(default)]
    pub bytes: u64,
    /// All bytes echoed intact.
    pub ok: bool,
    /// What went wrong.
    #[serde(default)]
    pub error: Option<String>,
}

impl ConnReport {
    /// The IP part of `peer_seen`.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        self.peer_seen
            .as_deref()
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
    }
}

/// The outcome of one `meshapp send`.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// Exit status was 0 (every connection ok).
    pub success: bool,
    /// Per-connection results.
    pub conns: Vec<ConnReport>,
    /// meshapp's stderr.
    pub stderr: String,
}

impl SendReport {
    /// Names of the servers that answered.
    pub fn servers(&self) -> BTreeSet<String> {
        self.conns.iter().filter_map(|c| c.server.clone()).collect()
    }

    /// Source IPs the servers saw.
    pub fn peer_ips(&self) -> BTreeSet<IpAddr> {
        self.conns.iter().filter_map(ConnReport::peer_ip).collect()
    }

    /// Fails with every connection's error unless all succeeded.
    pub fn check(&self) -> Result<&Self> {
        if self.success && !self.conns.is_empty() && self.conns.iter().all(|c| c.ok) {
            return Ok(self);
        }
        bail!("meshapp send failed: {self}")
    }
}

impl std::fmt::Display for SendReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.conns {
            writeln!(
                f,
                "  conn {}: ok={} server={} peer_seen={} local={} error={}",
                c.conn,
                c.ok,
                c.server.as_deref().unwrap_or("-"),
                c.peer_seen.as_deref().unwrap_or("-"),
                c.local.as_deref().unwrap_or("-"),
                c.error.as_deref().unwrap_or("-")
            )?;
        }
        if !self.stderr.trim().is_empty() {
            writeln!(f, "  stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

/// A `meshapp send` running in the background.
#[derive(Debug)]
pub struct PendingSend {
    child: Child,
}

impl PendingSend {
    /// Whether it is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self
            .child
            .try_wait()
            .context("checking on meshapp send")?
            .is_none())
    }

    /// Waits for it to finish and parses its report.
    pub fn wait(self) -> Result<SendReport> {
        let out = self
            .child
            .wait_with_output()
            .context("waiting for meshapp send")?;
        parse_send(out)
    }
}

fn parse_send(out: std::process::Output) -> Result<SendReport> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let conns = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("meshapp output `{l}`")))
        .collect::<Result<Vec<ConnReport>>>()?;
    Ok(SendReport {
        success: out.status.success(),
        conns,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// How a `meshapp connect` attempt ended.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectReport {
    /// `hello`, `refused`, `reset`, `eof`, `timeout`, `unreachable` or `error`.
    pub result: String,
    /// The greeting, when one arrived.
    #[serde(default)]
    pub hello: Option<String>,
    /// The error otherwise.
    #[serde(default)]
    pub error: Option<String>,
}

impl Pod {
    /// Starts `meshapp serve --port <port> --name <name>` and waits until it listens.
    pub fn serve(&self, port: u16, name: &str) -> Result<Server> {
        let log = self.logdir.join(format!("serve-{name}-{port}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log handle")?;
        let mut child = self
            .command(crate::meshapp_bin())
            .args(["serve", "--port", &port.to_string(), "--name", name])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting meshapp serve in {}", self.key()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening") {
                break;
            }
            if let Some(status) = child.try_wait().context("waiting for meshapp serve")? {
                bail!(
                    "meshapp serve in {} exited ({status}): {}",
                    self.key(),
                    text.trim()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("meshapp serve in {} did not listen within 10 s", self.key());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Server {
            child,
            pod: self.key(),
            port,
            name: name.to_string(),
            log,
        })
    }

    /// Runs `meshapp send` to completion. A failed transfer is a normal report
    /// (`success == false`); only a failure to run meshapp at all is an error.
    pub fn send(&self, opts: &SendOpts) -> Result<SendReport> {
        self.spawn_send(opts)?.wait()
    }

    /// Starts `meshapp send` in the background (for held connections).
    pub fn spawn_send(&self, opts: &SendOpts) -> Result<PendingSend> {
        let child = self
            .command(crate::meshapp_bin())
            .args(opts.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting meshapp send in {}", self.key()))?;
        Ok(PendingSend { child })
    }

    /// One `meshapp connect` attempt.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> Result<ConnectReport> {
        let out = self
            .command(crate::meshapp_bin())
            .args(["connect", "--to", &to.to_string(), "--timeout"])
            .arg(timeout.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running meshapp connect in {}", self.key()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .with_context(|| {
                format!(
                    "meshapp connect printed no report: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        serde_json::from_str(line).with_context(|| format!("meshapp output `{line}`"))
    }
}
