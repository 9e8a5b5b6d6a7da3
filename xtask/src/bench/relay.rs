//! The `relay` path (`cargo xtask bench --relay`): the floor of any user-space proxy on the
//! mesh's path.
//!
//! A plain TCP relay (tests/src/bin/relay.rs) runs where the daemons run, in the client's and
//! the server's node namespaces, with two threads each (the workers the other data planes get on
//! this host). The client
//! connects to its node's relay at `169.254.1.1` (the node's address toward its pods), which
//! connects to the server node's relay on the fabric, which connects to the server pod: the
//! same sockets, veths, bridge and wake-ups as the ambient path, with nothing done in user
//! space but copying. What the relays cost per request or per byte is what the path costs any
//! proxy before TLS, HTTP/2 and policy; how far a data plane is above it is its own work.
//! Without a connection pool each new connection also costs a handshake between the relays,
//! so its connection figures are not a floor.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::cluster::{in_netns, node_ip, Cluster, Pod};

use super::{KillOnDrop, Mode, ECHO_PORT, IPERF_PORT};

/// The client node's relay listens here: the node's own address toward its pods.
pub const CLIENT_SIDE: &str = "169.254.1.1";

/// The relay binary `prepare` built.
fn binary() -> std::path::PathBuf {
    super::meshload_bin().with_file_name("relay")
}

/// Starts both relays for `client` to `server` on the relay path's two ports; returns them
/// once each listens.
pub fn start(cluster: &Cluster, client: &Pod, server: &Pod) -> Result<Vec<KillOnDrop>> {
    let off = Mode::Relay.port_offset();
    let far = node_ip(server.node);
    let mut relays = Vec::new();
    for (node, listen, target) in [
        (client.node, CLIENT_SIDE.to_string(), far.to_string()),
        (server.node, far.to_string(), server.ip.to_string()),
    ] {
        let ports = [ECHO_PORT + off, IPERF_PORT + off];
        let want: Vec<String> = ports.iter().map(|p| format!("{listen}:{p}")).collect();
        let log = cluster.workdir().join(format!("relay-node{node}.log"));
        let child = in_netns(&cluster.node_netns(node), binary())
            .args(["--threads", &super::istio::WORKER_THREADS.to_string()])
            .args(ports.iter().map(|p| format!("{listen}:{p}={target}:{p}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?)
            .spawn()
            .with_context(|| format!("starting the relay in node{node}"))?;
        let mut child = KillOnDrop(child);
        super::wait_listening(
            &format!("the relay in node{node}"),
            || cluster.node_exec(node, "ss", &["-Htln"]),
            &want,
            &mut child.0,
            &log,
            Duration::from_secs(10),
        )?;
        relays.push(child);
    }
    Ok(relays)
}
