//! What a node gives the DaemonSet container test ([`super::oci`]): a private containerd, the
//! node's network namespace, a bpffs, and the capabilities a container gets by default.

use std::path::PathBuf;
use std::process::Command;

use super::write;

/// A private containerd (apt `containerd`, which brings runc) with its own root, state and
/// socket in a temporary directory: what a node's kubelet runs containers with.
pub(crate) struct Containerd {
    child: std::process::Child,
    address: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    pub(crate) fn start() -> Containerd {
        mesh_tests::require_tool("containerd", "containerd").expect("containerd");
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = write(
            dir.path(),
            "config.toml",
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        );
        let address = dir.path().join("containerd.sock");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&address)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            child,
            address,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        c
    }

    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    pub(crate) fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.command().args(args).output().expect("running ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM, so it unmounts its snapshots before the directory goes.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A network namespace with an `eth0` (one end of a veth pair), removed on drop.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    pub(crate) fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        for args in [
            vec!["netns", "add", &name],
            vec![
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
            ],
            vec!["-n", &name, "link", "set", "eth0", "up"],
            vec!["-n", &name, "link", "set", "eth0p", "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let ok = Command::new("ip").args(&args).status().expect("running ip");
            assert!(ok.success(), "ip {args:?}");
        }
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The capabilities containerd hands a container by default, all dropped as the chart's
/// `drop: [ALL]` does.
pub(crate) const CONTAINERD_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Capability numbers (linux/capability.h) of those the chart may add.
pub(crate) fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("unexpected capability {other} in values.yaml"),
    }
}

/// A bpffs mounted for one test (the host's /sys/fs/bpf of a real node), unmounted on drop.
pub(crate) struct Bpffs(pub(crate) std::path::PathBuf);

impl Bpffs {
    pub(crate) fn mount(&self) -> &std::path::Path {
        std::fs::create_dir_all(&self.0).expect("bpffs dir");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.0)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount -t bpf");
        &self.0
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
