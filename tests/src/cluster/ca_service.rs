//! `ztunnel ca serve` next to the API server of a [`Cluster::start_kube`] cluster, in the
//! fabric namespace on [`API_ADDRESS`]:[`CA_PORT`], where every node (and a pod given a route
//! there, [`super::ControlPlane::route_pod`]) reaches it. It signs from a file CA directory
//! and asks the API server who holds a token, as the `istio-system/ztunnel-ca` service account
//! of deploy/rbac/ztunnel-ca.yaml.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{in_netns, message, Cluster, API_ADDRESS};

/// The CA service's port.
pub const CA_PORT: u16 = 15012;
const LOG_WAIT: Duration = Duration::from_secs(15);

/// The CA service process, stopped on drop.
#[derive(Debug)]
pub struct CaService {
    dir: PathBuf,
    kubeconfig: PathBuf,
    fabric: String,
    log: PathBuf,
    child: Option<Child>,
}

impl CaService {
    /// A CA service of `cluster` signing from the file CA in `dir` (not started yet).
    pub fn new(cluster: &Cluster, dir: PathBuf) -> Result<CaService> {
        let kubeconfig = cluster
            .kube()
            .api
            .service_account_kubeconfig("istio-system", "ztunnel-ca")
            .context("the CA's service account (deploy/rbac/ztunnel-ca.yaml)")?;
        Ok(CaService {
            dir,
            kubeconfig,
            fabric: cluster.fabric_netns(),
            log: cluster.workdir().join("ca-service.log"),
            child: None,
        })
    }

    /// `https://<API_ADDRESS>:<CA_PORT>`, what `--ca-address` takes.
    pub fn address() -> String {
        format!("https://{API_ADDRESS}:{CA_PORT}")
    }

    /// Starts it and waits until it logs `CA service ready`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "CA service already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("CA log file");
        let skip = self.lines().len();
        let listen = format!("{API_ADDRESS}:{CA_PORT}");
        let child = in_netns(&self.fabric, crate::ztunnel_bin())
            .args(["ca", "serve", "--ca-dir"])
            .arg(&self.dir)
            .args(["--listen", &listen, "--san", &API_ADDRESS.to_string()])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("ztunnel ca serve starts");
        self.child = Some(child);
        self.wait_for(skip, |l| message(l) == "CA service ready")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every JSON line of its log.
    pub fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first line after `skip` that satisfies `pred`, waiting up to 15 s.
    pub fn wait_for(&self, skip: usize, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            if let Some(l) = self.lines().into_iter().skip(skip).find(|l| pred(l)) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("CA service log never matched; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        self.stop();
    }
}
