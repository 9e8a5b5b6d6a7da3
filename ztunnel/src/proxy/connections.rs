//! Open inbound flows, so a policy change can re-check them and close those now denied.
//!
//! Each inbound flow registers its authorization attributes before it is decided; the
//! [`Registration`] removes it again when the flow ends (drop). On every state change
//! [`Connections::recheck`] evaluates each open flow against the new policies and revokes the
//! denied ones: the flow's splice ends and resets its sockets, so both applications see a
//! failure rather than a clean end of data.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::authz::{self, Decision, Request};
use crate::identity::SpiffeId;
use crate::splice::Abort;
use crate::state::State;

/// What authorization looks at for one flow.
#[derive(Debug, Clone)]
pub struct FlowAttrs {
    /// Client address.
    pub src: SocketAddr,
    /// Peer certificate identity; `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    /// Destination pod address (pod IP and the pod's port).
    pub dst: SocketAddr,
    /// Arrived without mTLS (15006).
    pub plaintext: bool,
}

impl FlowAttrs {
    /// Decides this flow against `state`'s policies; `None` when the destination is no longer
    /// an enrolled pod (nothing to enforce).
    pub fn decide(&self, state: &State, root_ns: &str) -> Option<Decision> {
        let w = state.workload(self.dst.ip()).filter(|w| w.enrolled)?;
        let req = Request {
            src_ip: self.src.ip(),
            src_identity: self.src_identity.as_ref(),
            dst_namespace: &w.namespace,
            dst_labels: &w.labels,
            dst_ip: self.dst.ip(),
            dst_port: self.dst.port(),
        };
        Some(authz::evaluate(&state.authz, root_ns, &req, self.plaintext))
    }
}

#[derive(Debug)]
struct Entry {
    attrs: FlowAttrs,
    revoke: oneshot::Sender<String>,
}

/// The registry of open inbound flows.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl Connections {
    /// Registers a flow; it stays registered until the returned handle is dropped.
    pub fn register(self: &Arc<Self>, attrs: FlowAttrs) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, Entry { attrs, revoke: tx });
        Registration {
            id,
            conns: self.clone(),
            revoked: rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of open registered flows.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no flow is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Re-evaluates every open flow against `state` and revokes the denied ones. Returns how
    /// many were revoked.
    pub fn recheck(&self, state: &State, root_ns: &str) -> usize {
        let mut revoked = Vec::new();
        {
            let mut open = self.lock();
            let denied: Vec<u64> = open
                .iter()
                .filter_map(|(id, e)| {
                    let d = e.attrs.decide(state, root_ns)?;
                    (!d.allowed()).then_some((*id, d))
                })
                .map(|(id, d)| {
                    if let Some(e) = open.get(&id) {
                        tracing::info!(
                            src_addr = %e.attrs.src,
                            dst_addr = %e.attrs.dst,
                            policy = d.reason.policy().unwrap_or(""),
                            reason = %d.reason,
                            generation = state.generation,
                            "open connection denied by policy change; closing"
                        );
                    }
                    id
                })
                .collect();
            for id in denied {
                if let Some(e) = open.remove(&id) {
                    revoked.push(e);
                }
            }
        }
        let n = revoked.len();
        for e in revoked {
            let _ = e.revoke.send("denied by a policy change".to_string());
        }
        n
    }
}

/// A registered flow; deregisters on drop.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    conns: Arc<Connections>,
    revoked: oneshot::Receiver<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Registration {
    /// Ends the flow's splice when a policy change revokes the flow: its sockets are reset and
    /// its HTTP/2 stream, if any, cancelled ([`crate::splice::Abort`]); the splice's error
    /// then carries the reason ([`crate::splice::aborted`]).
    pub fn abort(&mut self) -> Abort<'_> {
        Abort::on(&mut self.revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn state(policies: &str) -> State {
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
             {{apiVersion: v1, kind: Pod, metadata: {{name: b, namespace: mesh}}, spec: {{nodeName: n1}}, status: {{podIP: 10.0.0.2, phase: Running}}}}\n{policies}"
        );
        let objs = crate::k8s::parse_file(Path::new("t.yaml"), &yaml).expect("parses");
        State::build(1, "cluster.local", &objs)
    }

    #[tokio::test]
    async fn recheck_revokes_only_denied_flows_and_registration_ends_on_drop() {
        let conns = Arc::new(Connections::default());
        let flow = |client: &str, src: &str| FlowAttrs {
            src: src.parse().expect("addr"),
            src_identity: Some(SpiffeId::new("cluster.local", "mesh", client)),
            dst: "10.0.0.2:8080".parse().expect("addr"),
            plaintext: false,
        };
        let mut denied = conns.register(flow("bad", "10.0.0.1:4000"));
        let mut kept = conns.register(flow("good", "10.0.0.3:4000"));
        assert_eq!(conns.len(), 2);
        assert_eq!(conns.recheck(&state(""), "istio-system"), 0);
        let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: mesh}\nspec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/bad]}}]}]}\n";
        assert_eq!(conns.recheck(&state(deny), "istio-system"), 1);
        let splice = |abort| async move {
            let (_client, a) = crate::splice::tests::pair().await;
            let (b, _server) = crate::splice::tests::pair().await;
            crate::splice::plain(a, b, &Default::default(), abort)
                .await
                .1
        };
        let err = splice(denied.abort()).await.expect("the denied flow ends");
        assert_eq!(
            crate::splice::aborted(&err),
            Some("denied by a policy change")
        );
        let kept_ended = tokio::time::timeout(Duration::from_millis(100), splice(kept.abort()));
        assert!(kept_ended.await.is_err(), "the allowed flow goes on");
        drop(kept);
        drop(denied);
        assert!(conns.is_empty());
    }
}
