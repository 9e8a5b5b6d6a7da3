//! HTTP in pods: the `meshhttp` backend (tests/src/bin/meshhttp.rs), `curl` as the client, and
//! `meshhttp get` for many HTTP/2 requests on one connection.
//!
//! curl is an HTTP implementation independent of the waypoint's (hyper), so a request that
//! passes shows the waypoint speaks HTTP/1.1 and HTTP/2 as other clients do.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cluster::Pod;

/// A `meshhttp serve` in a pod; killed on drop.
#[derive(Debug)]
pub struct HttpServer {
    child: Child,
    /// Its name (the `x-backend` header and body it answers with).
    pub name: String,
    /// One JSON line per request it answered.
    pub log: PathBuf,
}

impl HttpServer {
    /// The requests it answered (`path`, `version`, `status`, `peer`).
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HTTP version curl speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c), as mesh clients speak it.
    Http2,
}

/// What one curl run got: per request, the status and the `x-backend` header.
#[derive(Debug, Clone, Default)]
pub struct CurlRun {
    /// `(status, x-backend)` in request order (status 0: no response).
    pub answers: Vec<(u16, String)>,
    /// curl's stderr.
    pub stderr: String,
}

impl CurlRun {
    /// Requests per status.
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut m = BTreeMap::new();
        for (s, _) in &self.answers {
            *m.entry(*s).or_default() += 1;
        }
        m
    }

    /// Requests per backend that answered.
    pub fn backends(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, b) in self.answers.iter().filter(|(_, b)| !b.is_empty()) {
            *m.entry(b.clone()).or_default() += 1;
        }
        m
    }
}

impl Pod {
    /// Starts `meshhttp serve` on `0.0.0.0:<port>` (and, in a dual-stack cluster, on the pod's
    /// IPv6 address too) answering as `name`; waits until it listens.
    pub fn serve_http(&self, port: u16, name: &str) -> Result<HttpServer> {
        let log = self.logdir.join(format!("http-{name}-{port}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log handle")?;
        let mut listen = vec![format!("0.0.0.0:{port}")];
        if let Some(ip6) = self.ip6 {
            listen.push(format!("[{ip6}]:{port}"));
        }
        let mut child = self
            .command(crate::meshhttp_bin())
            .arg("serve")
            .args(listen.iter().flat_map(|l| ["--listen", l.as_str()]))
            .args(["--name", name])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting meshhttp in {}", self.key()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening") {
                break;
            }
            if let Some(status) = child.try_wait().context("waiting for meshhttp")? {
                bail!(
                    "meshhttp in {} exited ({status}): {}",
                    self.key(),
                    text.trim()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("meshhttp in {} did not listen within 10 s", self.key());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(HttpServer {
            child,
            name: name.to_string(),
            log,
        })
    }

    /// `count` GET requests from this pod to `base` + `path` (one connection, reused), each
    /// allowed `timeout`. With `count > 1` the paths get a suffix `1..=count` (curl's URL
    /// globbing), so every request is distinct in logs.
    pub fn curl(
        &self,
        version: HttpVersion,
        url: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<CurlRun> {
        crate::require_tool("curl", "curl")?;
        let url = if count > 1 {
            format!("{url}[1-{count}]")
        } else {
            url.to_string()
        };
        let proto = match version {
            HttpVersion::Http1 => "--http1.1",
            HttpVersion::Http2 => "--http2-prior-knowledge",
        };
        let out = self
            .command("curl")
            .args(["-sS", proto, "--max-time"])
            .arg(timeout.as_secs_f64().to_string())
            .args([
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %header{x-backend}\\n",
            ])
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running curl in {}", self.key()))?;
        Ok(parse_answers(&out))
    }

    /// Like [`Pod::curl`] with `meshhttp get`: `count` requests on one connection, paths
    /// suffixed `1..=count`. For many HTTP/2 requests on one connection, which Debian 12's
    /// curl cannot send (see tests/src/bin/meshhttp.rs).
    pub fn http_get(
        &self,
        version: HttpVersion,
        url: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<CurlRun> {
        let out = self
            .command(crate::meshhttp_bin())
            .args(["get", "--url", url, "--count", &count.to_string()])
            .args([
                "--http2",
                if version == HttpVersion::Http2 {
                    "true"
                } else {
                    "false"
                },
            ])
            .args(["--timeout", &timeout.as_secs_f64().to_string()])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running meshhttp get in {}", self.key()))?;
        Ok(parse_answers(&out))
    }
}

impl Pod {
    /// One request with curl from this pod: `method` to `url` with `headers` (`name: value`),
    /// allowed `timeout`; the status and the response body. A request that gets no answer is
    /// an error naming curl's complaint.
    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[&str],
        timeout: Duration,
    ) -> Result<(u16, String)> {
        crate::require_tool("curl", "curl")?;
        let mut cmd = self.command("curl");
        cmd.args(["-sS", "--http1.1", "-X", method, "--max-time"])
            .arg(timeout.as_secs_f64().to_string())
            .args(["-w", "\n%{http_code}"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running curl in {}", self.key()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        match code.trim().parse::<u16>() {
            Ok(code) if code != 0 => Ok((code, body.to_string())),
            _ => bail!(
                "{method} {url} from {}: no answer: {}",
                self.key(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }
}

/// `<status> <backend>` lines of stdout, and stderr.
fn parse_answers(out: &std::process::Output) -> CurlRun {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answers = stdout
        .lines()
        .filter_map(|l| {
            let (code, backend) = l.split_once(' ').unwrap_or((l, ""));
            Some((code.trim().parse().ok()?, backend.trim().to_string()))
        })
        .collect();
    CurlRun {
        answers,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
