//! The daemon under a container runtime's open-file limits. Runtimes commonly start processes
//! with a soft `RLIMIT_NOFILE` of 1024 and a much higher hard limit; every proxied flow holds a
//! descriptor in each daemon, so a daemon that kept the soft limit would stop accepting flows
//! after a few hundred. The daemon raises its soft limit to the hard one at start.
//!
//! A test binary of its own: it lowers its own soft limit while the daemons start (children
//! inherit it), which must not affect the processes of other tests. Needs root.

use mesh_tests::app::SendOpts;
use mesh_tests::cluster::{Cluster, ClusterSpec, PodSpec, SvcSpec};
use mesh_tests::testkit::ok;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Soft limit the daemons are started with: below the number of flows the test opens.
const LOW_SOFT_LIMIT: u64 = 256;
/// Concurrent connections, each held open while the others are opened.
const CONNS: usize = 300;

/// `Max open files` soft and hard limits of a running process.
fn limits_of(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let mut w = line.split_whitespace().skip(3);
    (
        w.next().unwrap_or_default().to_string(),
        w.next().unwrap_or_default().to_string(),
    )
}

#[test]
fn daemon_raises_a_low_open_file_limit() {
    mesh_tests::require_root().expect("root");
    let spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .pod(PodSpec::new("mesh/a", 1))
        .pod(PodSpec::new("mesh/b", 2))
        .service(
            SvcSpec::new("mesh/b-svc", "10.96.0.20")
                .select("app", "b")
                .port(80, 8080),
        );
    let mut c = Cluster::start(spec).expect("cluster starts");
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= 4 * CONNS as u64,
        "the test needs a hard open-file limit of at least {}, this process has {hard}",
        4 * CONNS,
    );
    setrlimit(Resource::RLIMIT_NOFILE, LOW_SOFT_LIMIT, hard).expect("lower the soft limit");
    let started = c
        .start_daemon(1, &[])
        .map(|_| ())
        .and_then(|()| c.start_daemon(2, &[]).map(|_| ()));
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the soft limit");
    started.expect("daemons ready");

    for node in 1..=2 {
        let pid = c.daemon(node).pid().expect("daemon pid");
        let (soft, hard) = limits_of(pid);
        assert_eq!(soft, hard, "node{node} daemon's open-file soft limit");
    }
    let _srv = c.pod("mesh/b").serve(8080, "b").expect("serve");
    let report = ok(
        c.pod("mesh/a")
            .send(&SendOpts::to("10.96.0.20:80").conns(CONNS).hold(1.0))
            .expect("meshapp runs"),
        "connections beyond the inherited soft limit",
    );
    assert_eq!(report.conns.len(), CONNS);
}
