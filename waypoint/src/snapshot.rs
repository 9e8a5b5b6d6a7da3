//! What the waypoint knows of the cluster: the daemon's [`State`] (Services, their VIPs and
//! ready endpoints, workloads and identities) plus the compiled [`RouteTable`] and the
//! attached authorization policies ([`PolicySet`]), built together from one delivery of the
//! state source so a request never sees routes or policies of one version and endpoints of
//! another.
//!
//! The state comes from the node daemon's own sources (`ztunnel::source`: the YAML of
//! `--state`, or watches on the API server), which carry the HTTPRoute and
//! AuthorizationPolicy objects in every [`State`]. [`follow`] turns each delivered state into
//! a [`Snapshot`]; routes and policies are compiled again only when their objects changed
//! (the state shares them by `Arc` until then).

use std::sync::Arc;

use tokio::sync::watch;
use ztunnel::k8s::Object;
use ztunnel::state::State;

use crate::authz::compile::Problem;
use crate::authz::PolicySet;
use crate::routing::RouteTable;

/// One consistent view of endpoints, routes and policies.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads and Services, as the node daemon builds them.
    pub state: Arc<State>,
    /// HTTPRoutes attached to Services.
    pub routes: Arc<RouteTable>,
    /// AuthorizationPolicies attached to waypoints and Services.
    pub policies: Arc<PolicySet>,
}

impl Snapshot {
    /// Builds a snapshot from `objects` (tests and `waypoint check`).
    pub fn build(generation: u64, trust_domain: &str, objects: &[Object]) -> Snapshot {
        Snapshot::from_state(
            Arc::new(State::build(generation, trust_domain, objects)),
            None,
        )
    }

    /// The snapshot of a delivered `state`. Routes and policies are taken over from
    /// `previous` when the state carries the same objects (the same `Arc`), else compiled
    /// again, logging each part of a route or policy that cannot be used.
    pub fn from_state(state: Arc<State>, previous: Option<&Snapshot>) -> Snapshot {
        let routes = match previous {
            Some(p) if Arc::ptr_eq(&p.state.http_routes, &state.http_routes) => p.routes.clone(),
            _ => Arc::new(compile_routes(&state)),
        };
        let policies = match previous {
            Some(p) if Arc::ptr_eq(&p.state.authz_policies, &state.authz_policies) => {
                p.policies.clone()
            }
            _ => Arc::new(compile_policies(&state)),
        };
        Snapshot {
            state,
            routes,
            policies,
        }
    }
}

fn compile_routes(state: &State) -> RouteTable {
    let http_routes: Vec<_> = state.http_routes.values().map(|r| &**r).collect();
    let (routes, errors) = RouteTable::build(&http_routes);
    for e in &errors {
        tracing::warn!(route = %e.route, field = %e.field, error = %e.message, "route rejected in part");
    }
    routes
}

fn compile_policies(state: &State) -> PolicySet {
    let mut policies = Vec::new();
    for ((namespace, name), obj) in state.authz_policies.iter() {
        let (compiled, problems) = crate::authz::compile::policy(obj);
        let key = format!("{namespace}/{name}");
        for p in problems {
            match p {
                Problem::Invalid { field, message } => tracing::warn!(
                    kind = "AuthorizationPolicy", policy = %key, field = %field, error = %message,
                    "policy rejected; it fails closed (an ALLOW allows nothing, a DENY or CUSTOM denies all)"
                ),
                Problem::Caveat(message) => tracing::warn!(
                    kind = "AuthorizationPolicy", policy = %key, caveat = %message,
                    "policy applied with a caveat"
                ),
            }
        }
        policies.extend(compiled);
    }
    PolicySet::new(policies)
}

/// Turns every state `states` delivers into a [`Snapshot`] published on `tx`, until the
/// source goes away.
pub async fn follow(mut states: watch::Receiver<Arc<State>>, tx: watch::Sender<Arc<Snapshot>>) {
    while states.changed().await.is_ok() {
        let state = states.borrow_and_update().clone();
        let previous = tx.borrow().clone();
        let snap = Snapshot::from_state(state, Some(&previous));
        if !Arc::ptr_eq(&snap.routes, &previous.routes)
            || !Arc::ptr_eq(&snap.policies, &previous.policies)
        {
            tracing::info!(
                generation = snap.state.generation,
                routed_services = snap.routes.services(),
                policies = snap.policies.policies.len(),
                "routes and policies compiled"
            );
        }
        tx.send_replace(Arc::new(snap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
{apiVersion: v1, kind: Service, metadata: {name: svc, namespace: ns}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules: [{backendRefs: [{name: svc, port: 80}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  targetRefs: [{kind: Service, group: "", name: svc}]
  rules: [{}]
"#;

    #[test]
    fn routes_and_policies_are_compiled_again_only_when_their_objects_change() {
        let objs = ztunnel::k8s::parse_file(std::path::Path::new("t.yaml"), YAML)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut model = ztunnel::state::Model::new("cluster.local");
        for o in objs {
            model.apply(o);
        }
        let first = Snapshot::from_state(Arc::new(model.snapshot(1)), None);
        assert_eq!(first.routes.services(), 1);
        assert_eq!(first.policies.policies.len(), 1);

        // A pod arrives: routes and policies are the same objects.
        let pod = "{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: ns}, spec: {nodeName: n}, status: {podIP: 10.0.0.1, phase: Running}}";
        for o in ztunnel::k8s::parse_file(std::path::Path::new("p.yaml"), pod)
            .unwrap_or_else(|e| panic!("{e}"))
        {
            model.apply(o);
        }
        let second = Snapshot::from_state(Arc::new(model.snapshot(2)), Some(&first));
        assert!(Arc::ptr_eq(&first.routes, &second.routes));
        assert!(Arc::ptr_eq(&first.policies, &second.policies));
        assert_eq!(second.state.workloads.len(), 1);

        // The route goes: compiled again, the policies still shared.
        model.delete("HTTPRoute", "ns", "r");
        let third = Snapshot::from_state(Arc::new(model.snapshot(3)), Some(&second));
        assert_eq!(third.routes.services(), 0);
        assert!(Arc::ptr_eq(&second.policies, &third.policies));
        model.delete("AuthorizationPolicy", "ns", "p");
        let fourth = Snapshot::from_state(Arc::new(model.snapshot(4)), Some(&third));
        assert!(fourth.policies.policies.is_empty());
    }
}
