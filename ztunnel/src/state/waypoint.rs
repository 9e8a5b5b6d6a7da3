//! Waypoint attachment: which Services and pods hand their traffic to which waypoint.
//!
//! A waypoint is a Gateway API `Gateway` of class `istio-waypoint`; its pods are those of the
//! Gateway's namespace labelled [`GATEWAY_NAME_LABEL`] with the Gateway's name (the label
//! Istio's gateway controller puts on the Deployment, its pod template and the Service it
//! creates for a Gateway). A Namespace, Service or Pod names its waypoint with
//! [`USE_WAYPOINT_LABEL`] (and [`USE_WAYPOINT_NAMESPACE_LABEL`] for one in another namespace);
//! the Service's or Pod's own label wins over its Namespace's, and the value `none` opts out.
//! The Gateway's `istio.io/waypoint-for` label says whether it takes traffic addressed to
//! Services, to pods, to both or to neither.
//!
//! Attachment is kept by name ([`WaypointRef`]) on each Service and Workload, and the
//! waypoints themselves (with their ready pods) in one index of the snapshot, so a waypoint's
//! pods coming and going re-derives only the waypoint's own namespace, never every namespace
//! that points at it.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::Workload;
use crate::k8s::gateway::WaypointFor;
use crate::k8s::SharedStr;

/// Label on a Namespace, Service or Pod naming the waypoint its traffic goes through (`none`:
/// none, even when the namespace has one).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label next to [`USE_WAYPOINT_LABEL`] naming the waypoint's namespace when it is not the
/// labelled object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Pod label carrying the name of the Gateway a pod serves: how a waypoint's pods are found.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label Istio's gateway controller puts on the waypoints it deploys, with value
/// [`MESH_CONTROLLER`]. A pod carrying it is a waypoint pod even before its Gateway is known,
/// so it is never captured.
pub const GATEWAY_MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// Value of [`GATEWAY_MANAGED_LABEL`] on waypoints.
pub const MESH_CONTROLLER: &str = "istio.io-mesh-controller";
/// HBONE port of a waypoint whose Gateway lists no HBONE listener.
pub const DEFAULT_WAYPOINT_PORT: u16 = 15008;

/// A waypoint named by an attachment label: `namespace/name` of its Gateway.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WaypointRef {
    /// The Gateway's namespace (shared: every pod of a namespace with a waypoint holds one).
    pub namespace: SharedStr,
    /// The Gateway's name.
    pub name: SharedStr,
}

impl WaypointRef {
    /// `namespace/name`, the key of [`super::State::waypoints`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What an object's own labels say about its waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UseWaypoint {
    /// No label: the namespace decides (for a namespace: no waypoint).
    #[default]
    Unset,
    /// `none`: no waypoint, whatever the namespace says.
    OptOut,
    /// This waypoint.
    Waypoint(WaypointRef),
}

impl UseWaypoint {
    /// Reads [`USE_WAYPOINT_LABEL`] and [`USE_WAYPOINT_NAMESPACE_LABEL`] of an object in
    /// namespace `ns`. An empty value counts as unset.
    pub fn from_labels(labels: &std::collections::BTreeMap<String, String>, ns: &str) -> Self {
        match labels.get(USE_WAYPOINT_LABEL).map(|v| v.trim()) {
            None | Some("") => UseWaypoint::Unset,
            Some("none") => UseWaypoint::OptOut,
            Some(name) => UseWaypoint::Waypoint(WaypointRef {
                namespace: labels
                    .get(USE_WAYPOINT_NAMESPACE_LABEL)
                    .map(|v| v.trim())
                    .filter(|v| !v.is_empty())
                    .unwrap_or(ns)
                    .into(),
                name: name.into(),
            }),
        }
    }

    /// The waypoint of an object with these labels in a namespace with `namespace`'s: the
    /// object's own label wins, `none` opts out, else the namespace's.
    pub fn resolve(&self, namespace: &UseWaypoint) -> Option<WaypointRef> {
        match (self, namespace) {
            (UseWaypoint::Waypoint(r), _) => Some(r.clone()),
            (UseWaypoint::OptOut, _) => None,
            (UseWaypoint::Unset, UseWaypoint::Waypoint(r)) => Some(r.clone()),
            (UseWaypoint::Unset, _) => None,
        }
    }
}

/// Which traffic a flow to a waypoint-attached destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficKind {
    /// Addressed to a Service VIP.
    Service,
    /// Addressed to a pod IP.
    Workload,
}

/// A waypoint and its ready pods, as the node daemons hand flows to it.
#[derive(Debug, Serialize)]
pub struct Waypoint {
    /// The Gateway's name.
    pub name: String,
    /// The Gateway's namespace.
    pub namespace: String,
    /// Which traffic it takes (`istio.io/waypoint-for`).
    #[serde(serialize_with = "ser_for")]
    pub traffic: WaypointFor,
    /// The HBONE port its pods listen on (the Gateway's HBONE listener, else 15008).
    pub port: u16,
    /// Ready, non-terminating pods labelled with the Gateway's name, by IP.
    pub endpoints: Vec<Arc<Workload>>,
    /// Round-robin cursor over endpoints.
    #[serde(skip)]
    pub(super) next: AtomicUsize,
}

fn ser_for<S: serde::Serializer>(f: &WaypointFor, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match f {
        WaypointFor::Service => "service",
        WaypointFor::Workload => "workload",
        WaypointFor::All => "all",
        WaypointFor::None => "none",
    })
}

impl Waypoint {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it takes traffic of `kind`.
    pub fn takes(&self, kind: TrafficKind) -> bool {
        matches!(
            (self.traffic, kind),
            (WaypointFor::All, _)
                | (WaypointFor::Service, TrafficKind::Service)
                | (WaypointFor::Workload, TrafficKind::Workload)
        )
    }

    /// Whether the pod at `ip` is one of this waypoint's: its own flows never come back to it.
    pub fn has_pod(&self, ip: std::net::IpAddr) -> bool {
        self.endpoints.iter().any(|w| w.has_ip(ip))
    }

    /// The next pod to hand a flow to (round robin), `None` when it has no ready pod with an
    /// address in the family of `like` (the flow's original destination): the source pod dials
    /// from its address of that family, so an IPv6 flow reaches the waypoint at an IPv6
    /// address, as it would reach a pod.
    pub fn pick_like(&self, like: std::net::IpAddr) -> Option<Arc<Workload>> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|w| w.ip_like(like).is_some())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn wp(ns: &str, name: &str) -> WaypointRef {
        WaypointRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn labels_name_a_waypoint_in_the_own_or_another_namespace() {
        let own = UseWaypoint::from_labels(&labels(&[(USE_WAYPOINT_LABEL, "wp")]), "app");
        assert_eq!(own, UseWaypoint::Waypoint(wp("app", "wp")));
        let other = UseWaypoint::from_labels(
            &labels(&[
                (USE_WAYPOINT_LABEL, "wp"),
                (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
            ]),
            "app",
        );
        assert_eq!(other, UseWaypoint::Waypoint(wp("infra", "wp")));
        let ns_only =
            UseWaypoint::from_labels(&labels(&[(USE_WAYPOINT_NAMESPACE_LABEL, "infra")]), "app");
        assert_eq!(
            ns_only,
            UseWaypoint::Unset,
            "a namespace alone names nothing"
        );
        assert_eq!(
            UseWaypoint::from_labels(&labels(&[(USE_WAYPOINT_LABEL, "none")]), "app"),
            UseWaypoint::OptOut
        );
        assert_eq!(
            UseWaypoint::from_labels(&labels(&[(USE_WAYPOINT_LABEL, "")]), "app"),
            UseWaypoint::Unset
        );
    }

    #[test]
    fn the_objects_label_wins_and_none_opts_out() {
        let ns = UseWaypoint::Waypoint(wp("app", "ns-wp"));
        let own = UseWaypoint::Waypoint(wp("app", "own"));
        assert_eq!(own.resolve(&ns), Some(wp("app", "own")));
        assert_eq!(UseWaypoint::Unset.resolve(&ns), Some(wp("app", "ns-wp")));
        assert_eq!(UseWaypoint::OptOut.resolve(&ns), None);
        assert_eq!(UseWaypoint::Unset.resolve(&UseWaypoint::Unset), None);
        assert_eq!(UseWaypoint::Unset.resolve(&UseWaypoint::OptOut), None);
        assert_eq!(
            own.resolve(&UseWaypoint::OptOut),
            Some(wp("app", "own")),
            "a pod or service may use a waypoint its namespace opted out of"
        );
    }

    #[test]
    fn waypoint_for_decides_the_traffic_taken() {
        let w = |traffic| Waypoint {
            name: "wp".into(),
            namespace: "app".into(),
            traffic,
            port: DEFAULT_WAYPOINT_PORT,
            endpoints: Vec::new(),
            next: AtomicUsize::new(0),
        };
        use TrafficKind::{Service, Workload};
        let cases = [
            (WaypointFor::Service, true, false),
            (WaypointFor::Workload, false, true),
            (WaypointFor::All, true, true),
            (WaypointFor::None, false, false),
        ];
        for (f, svc, wl) in cases {
            assert_eq!(
                (w(f).takes(Service), w(f).takes(Workload)),
                (svc, wl),
                "{f:?}"
            );
        }
        assert!(
            w(WaypointFor::All)
                .pick_like(std::net::Ipv4Addr::LOCALHOST.into())
                .is_none(),
            "no pods, no pick"
        );
    }
}
