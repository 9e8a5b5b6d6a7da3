//! Packet capture on the fabric bridge: everything that crosses between nodes, as an attacker
//! on the network would see it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::net::in_netns;
use crate::pcap::Pcap;

/// A running tcpdump. Stopped (and its file kept) by [`Capture::stop`]; killed on drop.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i <iface>` in `netns`, writing `path`, and waits until it listens.
    /// `filter` is a pcap filter expression ("" for everything).
    pub(crate) fn start(netns: &str, iface: &str, filter: &str, path: &Path) -> Result<Capture> {
        crate::require_tool("tcpdump", "tcpdump")?;
        let log = path.with_extension("tcpdump.log");
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = in_netns(netns, "tcpdump");
        // -Z root: Debian's tcpdump otherwise drops to user `tcpdump` before opening the file,
        // which cannot write into the harness's root-owned work dir. --immediate-mode: without
        // it libpcap hands packets over a ring block at a time, and whatever still sits in the
        // ring when tcpdump is stopped is lost. -U: write each packet out at once.
        cmd.args([
            "-i",
            iface,
            "-n",
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-B",
            "8192",
        ])
        .args(["-Z", "root", "-w"])
        .arg(path);
        if !filter.trim().is_empty() {
            cmd.arg(filter);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("starting tcpdump")?;
        let mut cap = Capture {
            child: Some(child),
            path: path.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&cap.log).unwrap_or_default();
            if text.contains("listening on") {
                return Ok(cap);
            }
            if let Some(child) = cap.child.as_mut() {
                if let Some(status) = child.try_wait().context("waiting for tcpdump")? {
                    cap.child = None;
                    bail!(
                        "tcpdump exited ({status}) before listening: {}",
                        text.trim()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "tcpdump did not start listening within 10 s: {}",
                    text.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the capture is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops tcpdump (after a short pause so the last packets, FINs included, are written) and
    /// parses the file.
    pub fn stop(mut self) -> Result<Pcap> {
        std::thread::sleep(Duration::from_millis(300));
        self.halt()?;
        Pcap::open(&self.path)
    }

    fn halt(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().context("waiting for tcpdump")?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait().context("reaping tcpdump")?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.halt() {
            eprintln!("mesh-tests: stopping capture: {e:#}");
        }
    }
}
