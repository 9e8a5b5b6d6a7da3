//! One `ztunnel` process running in a node namespace, and its JSON log.
//!
//! The log file is the daemon's observable contract (CONTRACTS.md "Daemon log lines"): tests
//! wait for `ready`, `state applied`, `state rejected` and read `access` lines from it, so the
//! handle's main job is reading that file robustly (partial last lines, non-JSON panic output).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// How long a daemon may take to log `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGTERM may take before teardown escalates to SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// A daemon on one node. Methods take `&self` so tests can hold several handles while also
/// using the cluster; the process lives behind a mutex.
#[derive(Debug)]
pub struct Daemon {
    node: usize,
    netns: String,
    cmd: DaemonCmd,
    logdir: PathBuf,
    proc: Mutex<Proc>,
}

/// What a daemon runs: program, arguments and environment variables. Settings every build
/// understands go in `args`; newer ones the harness sets anyway go in `env` (`ZTUNNEL_*`),
/// which an older build ignores, so `ZTUNNEL_BIN=<older build>` still runs for an A/B.
#[derive(Debug, Clone)]
pub(crate) struct DaemonCmd {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(&'static str, OsString)>,
}

#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    log: PathBuf,
    /// A process was started since the last uninstall: capture may be pinned in the node.
    installed: bool,
}

impl Daemon {
    /// A daemon handle that has not started yet.
    fn new(node: usize, netns: &str, cmd: DaemonCmd, logdir: &Path) -> Daemon {
        Daemon {
            node,
            netns: netns.to_string(),
            cmd,
            logdir: logdir.to_path_buf(),
            proc: Mutex::new(Proc {
                child: None,
                log: PathBuf::new(),
                installed: false,
            }),
        }
    }

    /// Starts `ip netns exec <netns> setsid <program> <args>` and waits for `ready`.
    pub(crate) fn start(node: usize, netns: &str, cmd: DaemonCmd, logdir: &Path) -> Result<Daemon> {
        let d = Daemon::new(node, netns, cmd, logdir);
        d.spawn_and_wait_ready()?;
        Ok(d)
    }

    /// Like [`Daemon::start`] but returns as soon as the process runs (for readiness tests).
    pub(crate) fn spawn_unready(
        node: usize,
        netns: &str,
        cmd: DaemonCmd,
        logdir: &Path,
    ) -> Result<Daemon> {
        let d = Daemon::new(node, netns, cmd, logdir);
        d.spawn()?;
        Ok(d)
    }

    /// Waits until the daemon logs `ready`.
    pub fn wait_ready(&self) -> Result<()> {
        self.wait_ready_inner()
    }

    fn lock(&self) -> MutexGuard<'_, Proc> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.proc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_and_wait_ready(&self) -> Result<()> {
        self.spawn()?;
        self.wait_ready_inner()
    }

    fn spawn(&self) -> Result<()> {
        {
            let mut p = self.lock();
            if p.child.is_some() {
                bail!("node{} daemon is already running", self.node);
            }
            // node<i>.log, then node<i>.2.log ...: a restart, or a new daemon for the same
            // node, never overwrites an earlier process's log.
            p.log = (1..)
                .map(|n| match n {
                    1 => self.logdir.join(format!("node{}.log", self.node)),
                    n => self.logdir.join(format!("node{}.{n}.log", self.node)),
                })
                .find(|path| !path.exists())
                .context("no free log file name")?;
            let log =
                File::create(&p.log).with_context(|| format!("creating {}", p.log.display()))?;
            let log2 = log.try_clone().context("duplicating log file handle")?;
            // setsid: the daemon gets its own session, so a terminal's Ctrl-C reaches the
            // harness (which then tears down) rather than killing daemons behind its back.
            let child = Command::new("ip")
                .args(["netns", "exec", &self.netns, "setsid"])
                .arg(&self.cmd.program)
                .args(&self.cmd.args)
                .envs(self.cmd.env.iter().map(|(k, v)| (k, v)))
                .env("RUST_BACKTRACE", "1")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .with_context(|| format!("spawning {}", self.cmd.program.display()))?;
            p.child = Some(child);
            p.installed = true;
        }
        Ok(())
    }

    fn wait_ready_inner(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.log_lines().iter().any(|l| message(l) == "ready") {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "node{} daemon exited ({status}) before logging `ready`; log tail:\n{}",
                    self.node,
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "node{} daemon did not log `ready` within {READY_TIMEOUT:?}; log tail:\n{}",
                    self.node,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let mut p = self.lock();
        let Some(child) = p.child.as_mut() else {
            bail!("node{} daemon is not running", self.node);
        };
        let status = child.try_wait().context("waiting for daemon")?;
        if status.is_some() {
            p.child = None;
        }
        Ok(status)
    }

    /// Node number (1-based).
    pub fn node(&self) -> usize {
        self.node
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.lock().child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive.
    pub fn is_running(&self) -> bool {
        let mut p = self.lock();
        match p.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                p.child = None;
                false
            }
            None => false,
        }
    }

    /// Log file of the current (or last) process; each restart starts a new file.
    pub fn log_path(&self) -> PathBuf {
        self.lock().log.clone()
    }

    /// Raw log text of the current process.
    pub fn log_text(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        crate::tail_file(&self.log_path(), n)
    }

    /// Every complete JSON line of the current process's log, in order. Non-JSON lines (panic
    /// messages, a partially written last line) are skipped.
    pub fn log_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// The `access` lines.
    pub fn access_logs(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| message(l) == "access")
            .collect()
    }

    /// Waits until some log line satisfies `pred` and returns it.
    pub fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        self.wait_for_log_after(0, pred, timeout)
    }

    /// Like [`Daemon::wait_for_log`], ignoring the first `skip` lines (take `log_lines().len()`
    /// before an action to wait only for what the action caused).
    pub fn wait_for_log_after(
        &self,
        skip: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines().into_iter().skip(skip).find(|l| pred(l)) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "node{}: no matching log line within {timeout:?}; log tail:\n{}",
                    self.node,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit status.
    pub fn terminate(&self) -> Result<ExitStatus> {
        self.sigterm()?;
        self.wait_exit(TERM_GRACE)
    }

    /// Sends SIGTERM and returns at once.
    pub fn sigterm(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Waits up to `timeout` for the process to exit, and returns its status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "node{} daemon still running after {timeout:?}; log tail:\n{}",
                    self.node,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        let mut p = self.lock();
        if let Some(mut child) = p.child.take() {
            child.wait().context("reaping killed daemon")?;
        }
        Ok(())
    }

    /// Starts the same command again (after `kill` or `terminate`; a running daemon is
    /// SIGKILLed first) and waits for `ready`. The new process logs to a new file.
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.kill()?;
        }
        self.spawn_and_wait_ready()
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("node{} daemon is not running", self.node))?;
        let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        match kill(pid, sig) {
            // Exited on its own but not yet reaped: the wait that follows collects it.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("sending {sig} to node{}", self.node)),
        }
    }

    /// Runs `ztunnel uninstall` in the node (with the daemon's pin directory, capture mark and
    /// route table): removes the capture a stopped daemon left in place. Fails while the
    /// daemon runs (it would go on without capture) and when the command fails; returns its
    /// output line.
    pub fn uninstall(&self) -> Result<String> {
        if self.is_running() {
            bail!("node{} daemon is running; stop it first", self.node);
        }
        let mut args: Vec<OsString> = vec!["uninstall".into()];
        let mut it = self.cmd.args.iter();
        while let Some(a) = it.next() {
            let s = a.to_string_lossy();
            for flag in [
                "--capture-mark",
                "--route-table",
                "--node-name",
                "--bpf-pin-dir",
            ] {
                if s == flag {
                    args.push(a.clone());
                    args.extend(it.next().cloned());
                } else if s.starts_with(&format!("{flag}=")) {
                    args.push(a.clone());
                }
            }
        }
        let out = super::run(
            super::in_netns(&self.netns, &self.cmd.program)
                .args(&args)
                .envs(self.cmd.env.iter().map(|(k, v)| (k, v))),
        )
        .with_context(|| format!("uninstalling node{}'s capture", self.node))?;
        self.lock().installed = false;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Forgets the capture this (stopped) daemon left, so that dropping the handle does not
    /// uninstall it: the next daemon of the node adopts it.
    pub(crate) fn hand_over_capture(&self) {
        self.lock().installed = false;
    }

    /// Best-effort stop for teardown: SIGTERM, then SIGKILL after a grace period, then
    /// `ztunnel uninstall` (a stopped daemon leaves capture pinned, failing closed), so no
    /// program, pin or route outlives the cluster. Never fails.
    pub(crate) fn shutdown(&self) {
        self.stop();
        if self.lock().installed {
            if let Err(e) = self.uninstall() {
                eprintln!("mesh-tests: teardown: node{}: {e:#}", self.node);
            }
        }
    }

    fn stop(&self) {
        if !self.is_running() {
            return;
        }
        if self.signal(Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && self.is_running() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.is_running() {
            if let Err(e) = self.kill() {
                eprintln!("mesh-tests: teardown: node{}: {e:#}", self.node);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The `message` field of a log line ("" when absent).
pub fn message(line: &Value) -> &str {
    line.get("message").and_then(Value::as_str).unwrap_or("")
}

/// A string field of a log line ("" when absent).
pub fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line.get(name).and_then(Value::as_str).unwrap_or("")
}
