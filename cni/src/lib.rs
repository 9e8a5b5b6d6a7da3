//! The chained CNI plugin `ztunnel-cni` and the wire format it speaks with the node daemon.
//!
//! A container runtime runs the plugin after the network plugin that gave the pod its
//! interface and address (`ptp`, `bridge`, ...). At ADD the plugin tells the daemon on the node,
//! over a unix socket only root may open, which pod this is (namespace and name from
//! `CNI_ARGS`), its addresses (from `prevResult`) and its node-side interface, and returns only
//! once the daemon has the pod captured (or has said that its namespace is not enrolled), so
//! the pod's first packet is already in the mesh. Without an answer from the daemon it fails
//! the ADD (see [`plugin`] for the rule), so a pod is never started outside the mesh by
//! accident. DEL tells the daemon to forget what ADD announced and never fails.
//!
//! The daemon side is `ztunnel::cni`; both sides share [`Request`] and [`Reply`] from here, one
//! JSON line each way per connection.

pub mod plugin;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the daemon listens unless configured otherwise (daemon `--cni-socket`, plugin
/// `socket` in the network configuration).
pub const DEFAULT_SOCKET: &str = "/run/ztunnel/cni.sock";

/// What the runtime asked the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A pod's network was just set up: capture it before returning.
    Add,
    /// A pod's network is being torn down: forget what ADD announced.
    Del,
    /// Is the pod still captured as ADD left it?
    Check,
}

/// One request from the plugin to the daemon (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// ADD, DEL or CHECK.
    pub action: Action,
    /// `CNI_CONTAINERID`: the sandbox, which DEL names again.
    pub container_id: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// The pod's addresses from `prevResult` (empty for a DEL without one).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The node-side interface from `prevResult` (the one without a `sandbox`), when the
    /// previous plugin reported it; else the daemon finds it from its route to the pod.
    #[serde(default)]
    pub host_interface: Option<String>,
    /// `CNI_NETNS`, for the daemon's logs.
    #[serde(default)]
    pub netns: Option<String>,
}

/// The daemon's answer (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// The pod is enrolled and capture is in place: its address is in the enrolled map with
    /// this interface, and the program is attached to it.
    Captured {
        /// The pod's node-side interface.
        interface: String,
        /// Its index, as the enrolled map holds it.
        ifindex: u32,
    },
    /// The pod is not captured, and need not be.
    NotCaptured {
        /// Why (namespace not enrolled, capture off on this node).
        reason: String,
    },
    /// DEL done (also when there was nothing to remove).
    Removed,
    /// The pod should be captured but is not: the ADD or CHECK must fail.
    Failed {
        /// What went wrong, for the runtime's error and the pod's events.
        message: String,
        /// A transient condition (the namespace not yet known to the daemon, say): the
        /// runtime should try again later (CNI error code 11).
        retry: bool,
    },
}

impl Request {
    /// The request as one line of JSON.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

impl Reply {
    /// The reply as one line of JSON.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let req = Request {
            action: Action::Add,
            container_id: "c1".into(),
            namespace: "mesh".into(),
            name: "a".into(),
            ips: vec!["10.244.1.224".parse().expect("ip")],
            host_interface: Some("veth1".into()),
            netns: None,
        };
        let line = req.to_line();
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).expect("parses"), req);
        let reply = Reply::Failed {
            message: "x".into(),
            retry: true,
        };
        let line = reply.to_line();
        assert!(line.contains(r#""result":"failed""#), "{line}");
        assert_eq!(serde_json::from_str::<Reply>(&line).expect("parses"), reply);
    }
}
