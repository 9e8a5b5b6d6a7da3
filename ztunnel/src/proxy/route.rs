//! Where a flow goes: pure decisions over a [`State`] snapshot, no sockets.
//!
//! The outbound and inbound paths call these first and then do the I/O the answer asks for,
//! so every routing rule can be tested in-process against a state built from YAML.
//!
//! A new kind of route is a new [`Route`] variant or a new way to fill [`HboneTarget`], decided
//! in [`outbound`], plus one match arm in `proxy::outbound` that does its I/O. The waypoint
//! hand-off ([`Route::Waypoint`]) is one: a waypoint is reached over HBONE like a pod, with
//! the original destination as the authority and the waypoint pod's identity expected.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::error::FlowError;
use crate::config::Config;
use crate::identity::SpiffeId;
use crate::state::{Destination, ResolveError, Service, State, Waypoint, Workload};

/// What routing needs to know of this daemon.
#[derive(Debug, Clone)]
pub struct Node {
    /// This node's Kubernetes name: pods with this `spec.nodeName` are local.
    pub name: String,
    /// The HBONE port, dialled on destination pods.
    pub hbone_port: u16,
    /// Ports of the daemon's own listeners. A tunnel whose authority names one of them would
    /// come back into the daemon instead of reaching an application.
    pub own_ports: Vec<u16>,
}

impl Node {
    /// The node as configured.
    pub fn from_config(cfg: &Config) -> Node {
        let p = cfg.ports;
        Node {
            name: cfg.node_name.clone(),
            hbone_port: p.hbone,
            own_ports: vec![p.outbound, p.inbound_plaintext, p.hbone, p.dns],
        }
    }

    /// The workload at `ip` when it is an enrolled pod of this node.
    pub fn local_enrolled(&self, state: &State, ip: IpAddr) -> Option<Arc<Workload>> {
        state
            .workload(ip)
            .filter(|w| w.enrolled && w.node == self.name)
            .cloned()
    }
}

/// Where a captured outbound connection goes.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The enrolled pod of this node the connection came from.
    pub source: Arc<Workload>,
    /// The service whose VIP was dialled, if any.
    pub service: Option<Arc<Service>>,
    /// Where to send it.
    pub route: Route,
    /// Why.
    pub reason: Reason,
}

/// The routes of an outbound flow.
#[derive(Debug, Clone)]
pub enum Route {
    /// Plain TCP from the pod's own IP: the destination is outside the mesh, or a pod that is
    /// not enrolled (`workload`).
    Passthrough {
        /// Where to connect.
        dst: SocketAddr,
        /// The destination pod, when it is a known (not enrolled) pod.
        workload: Option<Arc<Workload>>,
    },
    /// An enrolled pod of this node: handed to the inbound side in-process.
    SameNode {
        /// The destination pod.
        workload: Arc<Workload>,
        /// Its port (the service's target port for a VIP).
        port: u16,
    },
    /// An HBONE tunnel to another node.
    Hbone(HboneTarget),
    /// A hand-off to the destination's waypoint: HBONE to one of its pods, the `:authority`
    /// being the original destination (Service VIP and port, or pod IP and port), so the
    /// waypoint routes and authorizes the request and tunnels on to an endpoint itself. The
    /// target's `workload` is the waypoint pod.
    Waypoint {
        /// Where and how to tunnel.
        target: HboneTarget,
        /// The waypoint it belongs to.
        waypoint: Arc<Waypoint>,
    },
    /// Nowhere: a service without a ready endpoint for the port.
    NoRoute(ResolveError),
}

/// An HBONE tunnel to open: where to connect, what to ask for, whom to expect.
#[derive(Debug, Clone)]
pub struct HboneTarget {
    /// The pod the tunnel ends at: the destination pod, or a waypoint pod.
    pub workload: Arc<Workload>,
    /// `:authority` of the CONNECT: the pod's IP and target port (to a waypoint: the original
    /// destination).
    pub authority: SocketAddr,
    /// Where the TLS connection goes: the pod's IP and the HBONE port (the destination's
    /// daemon captures it; a waypoint pod listens on it itself).
    pub connect: SocketAddr,
    /// Identities the server may prove.
    pub identities: Vec<SpiffeId>,
}

/// Why a route was chosen, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The destination is a service VIP; an endpoint was picked.
    ServiceVip,
    /// The destination is a pod IP.
    PodIp,
    /// The destination pod is known but not enrolled.
    NotEnrolled,
    /// The destination is not known to the mesh.
    OutsideMesh,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::ServiceVip => "service VIP",
            Reason::PodIp => "pod IP",
            Reason::NotEnrolled => "destination pod not in the mesh",
            Reason::OutsideMesh => "destination outside the mesh",
        })
    }
}

/// Routes a connection captured leaving the pod at `src` for `orig_dst`. Fails only when the
/// source is not an enrolled pod of this node: capture steers only those here, so anything
/// else is a stale map entry or a direct connection to the port, and is refused.
///
/// A destination with a waypoint goes to the waypoint: a Service VIP whose Service has one
/// that takes service traffic (`waypoint-for` `service`/`all`), else a pod (addressed
/// directly, or picked behind a VIP without a waypoint) whose waypoint takes workload traffic.
/// A waypoint without a ready pod fails the flow (its policies are never bypassed). A flow
/// from one of the waypoint's own pods is never handed back to it; such pods are not captured
/// at all, the check keeps the rule true whatever capture does.
pub fn outbound(
    state: &State,
    node: &Node,
    src: IpAddr,
    orig_dst: SocketAddr,
) -> Result<Outbound, FlowError> {
    let source = node
        .local_enrolled(state, src)
        .ok_or(FlowError::UnknownSource(src))?;
    let service = state.service_by_vip(orig_dst.ip()).cloned();
    let via_vip = service.is_some();
    let handed_off = service.as_ref().and_then(|svc| {
        let serves_port = svc.ports.iter().any(|p| p.port == orig_dst.port());
        let wp = state.service_waypoint(svc).filter(|wp| !wp.has_pod(src))?;
        serves_port.then(|| hand_off(wp, orig_dst, svc.key()))
    });
    if let Some(route) = handed_off {
        return Ok(Outbound {
            source,
            service,
            route,
            reason: Reason::ServiceVip,
        });
    }
    let vip_or_pod = if via_vip {
        Reason::ServiceVip
    } else {
        Reason::PodIp
    };
    let resolved = state.resolve(orig_dst);
    if let Ok(Destination::Workload(w, port)) = &resolved {
        if let Some(wp) = state.workload_waypoint(w).filter(|wp| !wp.has_pod(src)) {
            let dst = SocketAddr::new(w.dial_ip(orig_dst.ip()), *port);
            return Ok(Outbound {
                source,
                service,
                route: hand_off(wp, dst, dst.to_string()),
                reason: vip_or_pod,
            });
        }
    }
    let (route, reason) = match resolved {
        Err(e) => (Route::NoRoute(e), Reason::ServiceVip),
        Ok(Destination::External(dst)) => (
            Route::Passthrough {
                dst,
                workload: None,
            },
            Reason::OutsideMesh,
        ),
        Ok(Destination::Workload(w, port)) if !w.enrolled => (
            Route::Passthrough {
                dst: SocketAddr::new(w.dial_ip(orig_dst.ip()), port),
                workload: Some(w),
            },
            Reason::NotEnrolled,
        ),
        Ok(Destination::Workload(w, port)) => {
            let reason = vip_or_pod;
            let route = if w.node == node.name {
                Route::SameNode { workload: w, port }
            } else {
                let ip = w.dial_ip(orig_dst.ip());
                Route::Hbone(HboneTarget {
                    authority: SocketAddr::new(ip, port),
                    connect: SocketAddr::new(ip, node.hbone_port),
                    identities: vec![(*w.identity).clone()],
                    workload: w,
                })
            };
            (route, reason)
        }
    };
    Ok(Outbound {
        source,
        service,
        route,
        reason,
    })
}

/// The route to `wp` for a flow to `authority` (`target` names what it fronts, for errors):
/// one of its pods with an address in the flow's family (the flow is dialled from the source
/// pod's address of that family), dialled at that address.
fn hand_off(wp: &Arc<Waypoint>, authority: SocketAddr, target: String) -> Route {
    let like = authority.ip();
    match wp.pick_like(like) {
        Some(pod) => Route::Waypoint {
            target: HboneTarget {
                authority,
                connect: SocketAddr::new(pod.dial_ip(like), wp.port),
                identities: vec![(*pod.identity).clone()],
                workload: pod,
            },
            waypoint: wp.clone(),
        },
        None if wp.endpoints.is_empty() => Route::NoRoute(ResolveError::NoWaypointPod {
            waypoint: wp.key(),
            target,
        }),
        None => Route::NoRoute(ResolveError::NoWaypointPodInFamily {
            waypoint: wp.key(),
            target,
            family: if like.is_ipv6() { "IPv6" } else { "IPv4" },
        }),
    }
}

/// Checks an HBONE stream that arrived on a connection to `local` (a pod IP and the HBONE
/// port) asking for `authority`, and returns the local pod it is for.
///
/// The authority must be an enrolled pod of this node (else 503), the very pod whose
/// certificate the connection was given (else 400: one pod's certificate never opens a flow to
/// another), and not one of the daemon's own ports (else 400: the flow would loop back in).
pub fn inbound_hbone(
    state: &State,
    node: &Node,
    local: SocketAddr,
    authority: SocketAddr,
) -> Result<Arc<Workload>, FlowError> {
    let pod = node
        .local_enrolled(state, authority.ip())
        .ok_or(FlowError::NotLocal(authority))?;
    if authority.ip() != local.ip() {
        return Err(FlowError::AuthorityMismatch { authority, local });
    }
    if node.own_ports.contains(&authority.port()) {
        return Err(FlowError::Loop(authority));
    }
    Ok(pod)
}

/// Checks a plaintext connection captured for `dst` and returns the local pod it is for.
pub fn inbound_plaintext(
    state: &State,
    node: &Node,
    dst: SocketAddr,
) -> Result<Arc<Workload>, FlowError> {
    node.local_enrolled(state, dst.ip())
        .ok_or(FlowError::NotLocal(dst))
}
