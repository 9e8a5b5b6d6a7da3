//! A pod of the test cluster: its address and network namespace, and running programs in it.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context, Result};

use super::net::in_netns;

/// One pod. Cheap to clone, so tests can keep pods while mutating the cluster.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Pod IP (`/32` on its `eth0`). An IPv6-only pod's is reserved for it but assigned
    /// nowhere (see [`Pod::addr`]).
    pub ip: Ipv4Addr,
    /// Dual-stack clusters: the pod's IPv6 address (`/128` on its `eth0`).
    pub ip6: Option<Ipv6Addr>,
    /// The pod has its IPv6 address alone ([`super::PodSpec::ipv6_only`]).
    pub ipv6_only: bool,
    /// Network namespace name.
    pub netns: String,
    /// Node, 1-based.
    pub node: usize,
    /// Directory for this pod's program logs (inside the cluster's work dir).
    pub(crate) logdir: PathBuf,
}

impl Pod {
    /// `"ns/name"`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The address other pods reach this one at: its IPv4 address, or an IPv6-only pod's
    /// IPv6 one.
    pub fn addr(&self) -> IpAddr {
        match self.ip6 {
            Some(v6) if self.ipv6_only => v6.into(),
            _ => self.ip.into(),
        }
    }

    /// A command that runs `program` inside the pod's network namespace. Put in its own process
    /// group so a terminal's Ctrl-C reaches only the harness, which then tears down.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = in_netns(&self.netns, program);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// Runs a program to completion inside the pod; the exit status is the caller's to judge.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in pod {}", self.key()))
    }

    /// Starts a program inside the pod with stdout and stderr piped. Teardown kills whatever
    /// is still running in the pod's namespace, so a forgotten child cannot outlive the cluster.
    pub fn spawn<I, S>(&self, program: &str, args: I) -> Result<Child>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} in pod {}", self.key()))
    }

    /// SPIFFE identity of this pod in trust domain `cluster.local`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}
