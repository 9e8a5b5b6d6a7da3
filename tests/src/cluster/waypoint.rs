//! A `waypoint` process running in a pod of the test cluster, and its JSON log.
//!
//! The pod is an ordinary pod of the spec; what makes it a waypoint's is its label
//! `gateway.networking.k8s.io/gateway-name: <gateway>` and a `Gateway` of class
//! `istio-waypoint` in the state, which the test writes. The process reads the pod's node's
//! state directory (the same YAML the node daemon reads) or, on a [`Cluster::start_kube`]
//! cluster, watches the API server as the pod's service account bound to the
//! `ztunnel-waypoint` ClusterRole of deploy/rbac/waypoint.yaml; it gets its certificate from
//! the cluster's file CA (unless `extra` names `--ca-address`), and listens for HBONE on the
//! pod's 15008: in a dual-stack cluster it is given both pod addresses and listens in both
//! families (the waypoint's default `--listen`).

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::daemon::message;
use super::{Cluster, Pod};
use crate::kube::RoleRef;

/// How long a waypoint may take to log `waypoint ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running waypoint; SIGKILLed on drop (cluster teardown kills it too).
#[derive(Debug)]
pub struct WaypointProc {
    child: Child,
    /// The pod it runs in.
    pub pod: Pod,
    /// stdout and stderr (JSON lines).
    pub log: PathBuf,
}

impl Cluster {
    /// Starts `waypoint` in pod `key` (identity from the pod's namespace and service account)
    /// with `extra` flags, and waits until it logs `waypoint ready`.
    pub fn start_waypoint(&mut self, key: &str, extra: &[&str]) -> Result<WaypointProc> {
        let pod = self.pod(key).clone();
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        match self.kube_api() {
            Some(cp) => {
                cp.route_pod(&self.fabric_netns(), &pod)?;
                let kubeconfig = cp
                    .api
                    .create_service_account(
                        &pod.namespace,
                        &pod.service_account,
                        RoleRef::ClusterRole("ztunnel-waypoint"),
                    )
                    .context("the waypoint's service account")?;
                args.extend(["--source".into(), "kube".into(), "--kubeconfig".into()]);
                args.push(kubeconfig.into());
            }
            None => {
                args.extend(["--state".into(), self.state_dir(pod.node).into()]);
            }
        }
        if !extra.contains(&"--ca-address") {
            args.extend(["--ca-dir".into(), self.ca_dir()?.into()]);
        }
        let log = pod.logdir.join("waypoint.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating log handle")?;
        let child = pod
            .command(crate::waypoint_bin())
            .args(&args)
            .args(["--namespace", &pod.namespace])
            .args(["--service-account", &pod.service_account])
            .args(["--pod-name", &pod.name])
            .args(["--pod-ip", &pod.ip.to_string()])
            .args(
                pod.ip6
                    .iter()
                    .flat_map(|ip6| ["--pod-ip".into(), ip6.to_string()]),
            )
            .args(["--metrics-listen", &format!("{}:15020", pod.ip)])
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting waypoint in {key}"))?;
        let mut w = WaypointProc { child, pod, log };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if w.log_lines().iter().any(|l| message(l) == "waypoint ready") {
                return Ok(w);
            }
            if let Some(status) = w.child.try_wait().context("waiting for waypoint")? {
                bail!("waypoint in {key} exited ({status}):\n{}", w.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint in {key} not ready within {READY_TIMEOUT:?}:\n{}",
                    w.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl WaypointProc {
    /// The waypoint's pid (`ip netns exec` execs it), whose CPU and memory a benchmark reads.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every complete JSON line of its log, in order.
    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// The per-request `access` lines (message `request`).
    pub fn requests(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| message(l) == "request")
            .collect()
    }

    /// The last `n` lines of its log, for messages.
    pub fn log_tail(&self, n: usize) -> String {
        crate::tail_file(&self.log, n)
    }

    /// Waits until the log has at least `n` request lines (it writes each when the response
    /// head is out, so a client may see its answer a moment before the line is written).
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint logged {} requests, expected {n}; tail:\n{}",
                    r.len(),
                    self.log_tail(10)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WaypointProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WaypointProc {
    /// `GET http://<addr><path>` from inside the waypoint's pod (its side ports): status and
    /// body.
    pub fn get(&self, addr: &str, path: &str) -> Result<(u16, String)> {
        self.pod.request(
            "GET",
            &format!("http://{addr}{path}"),
            &[],
            Duration::from_secs(10),
        )
    }

    /// The Prometheus text of its metrics port (`<pod ip>:15020/metrics`).
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = self.get(&format!("{}:15020", self.pod.ip), "/metrics")?;
        if status != 200 {
            bail!("waypoint /metrics answered {status}: {body}");
        }
        Ok(body)
    }

    /// Its `/config_dump` (admin port, loopback of its pod).
    pub fn config_dump(&self) -> Result<Value> {
        let (status, body) = self.get("127.0.0.1:15000", "/config_dump")?;
        if status != 200 {
            bail!("waypoint /config_dump answered {status}: {body}");
        }
        serde_json::from_str(&body).context("config dump is JSON")
    }
}
