//! The compiled policies of one state, indexed by namespace, and what was wrong with them
//! ([`Problem`]): every invalid policy stays in force failing closed and is listed here, so the
//! log, the metrics, `ztunnel status` and `ztunnel analyze` report the same list.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::compile::{self, Compiled};
use super::{selects, Action, MtlsMode, PeerAuth, Policy};
use crate::k8s::security::{AuthorizationPolicyObject, PeerAuthenticationObject, SpecError};
use crate::k8s::Labels;

/// An object applied failing closed (`invalid`) or with a caveat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub policy: String,
    /// The action as enforced (`ALLOW`, `DENY`, `CUSTOM`, `AUDIT`); for a PeerAuthentication
    /// the mode an invalid one is read as (`STRICT`), or `-` for a caveat.
    pub action: &'static str,
    /// The policy failed validation (true) or applies with a caveat (false).
    pub invalid: bool,
    /// Dotted path of the field concerned.
    pub field: String,
    /// What is wrong (invalid) or what the caveat is.
    pub message: String,
    /// What it means for traffic.
    pub effect: String,
}

impl Problem {
    fn invalid(kind: &'static str, policy: String, action: &'static str, e: &SpecError) -> Self {
        Problem {
            kind,
            policy,
            action,
            invalid: true,
            field: e.field.clone(),
            message: e.message.clone(),
            effect: String::new(),
        }
    }
}

/// The scope an invalid policy's unreadable selector leaves: every workload of its namespace
/// (of the mesh, for a policy in the root namespace), the widest it could have meant.
fn scope_note(e: &SpecError) -> &'static str {
    if e.field.starts_with("spec.selector") {
        "; its selector could not be read, so it applies to every workload of its namespace \
         (of the mesh, in the root namespace)"
    } else {
        ""
    }
}

/// All enforced policies, by namespace.
#[derive(Debug, Default, Serialize)]
pub struct Registry {
    /// Authorization policies by namespace, in name order.
    pub policies: HashMap<String, Vec<Arc<Policy>>>,
    /// PeerAuthentications by namespace: invalid ones (read as STRICT) first, then in name
    /// order.
    pub peer_authentications: HashMap<String, Vec<Arc<PeerAuth>>>,
    /// Policies left to a waypoint (`targetRefs`), for the operator's information.
    pub waypoint_policies: Vec<String>,
    /// Invalid policies and caveats, in the order the objects were compiled.
    pub problems: Vec<Problem>,
}

/// One policy object compiled: what it contributes to a [`Registry`]. Kept per object by the
/// state model, so a change to one policy compiles that policy only and the registry is
/// assembled again from the others' entries (pointer copies).
#[derive(Debug, Default)]
pub struct CompiledPolicy {
    policy: Option<Arc<Policy>>,
    peer: Option<Arc<PeerAuth>>,
    /// `namespace/name` of a policy left to a waypoint.
    waypoint: Option<String>,
    /// Its problems (invalid, caveats), in the order found.
    pub problems: Vec<Problem>,
}

impl CompiledPolicy {
    /// Compiles one AuthorizationPolicy (an invalid one fails closed, with its problem).
    pub fn authorization_policy(obj: &AuthorizationPolicyObject) -> CompiledPolicy {
        let key = format!(
            "{}/{}",
            obj.metadata.namespace.as_deref().unwrap_or_default(),
            obj.metadata.name
        );
        const AP: &str = "AuthorizationPolicy";
        let mut out = CompiledPolicy::default();
        match compile::authorization_policy(obj) {
            Compiled::Policy(p, caveats) => {
                if let Some(e) = &p.invalid {
                    let mut pr = Problem::invalid(AP, key.clone(), p.action.as_str(), e);
                    pr.effect = format!(
                        "{}{}{}",
                        compile::fail_closed_effect(p.action),
                        scope_note(e),
                        if p.dry_run {
                            " (dry run: logged, not enforced)"
                        } else {
                            ""
                        }
                    );
                    out.problems.push(pr);
                }
                for (field, message) in caveats {
                    out.problems.push(Problem {
                        kind: AP,
                        policy: key.clone(),
                        action: p.action.as_str(),
                        invalid: false,
                        field,
                        message,
                        effect: "applied with this caveat (never allows more than written)".into(),
                    });
                }
                out.policy = Some(Arc::new(p));
            }
            Compiled::Waypoint => out.waypoint = Some(key),
            Compiled::Ignored(e) => {
                let mut pr = Problem::invalid(AP, key, Action::Audit.as_str(), &e);
                pr.effect = compile::fail_closed_effect(Action::Audit).into();
                out.problems.push(pr);
            }
        }
        out
    }

    /// Compiles one PeerAuthentication (an invalid one is read as STRICT, with its problem).
    pub fn peer_authentication(obj: &PeerAuthenticationObject) -> CompiledPolicy {
        let (p, caveats) = compile::peer_authentication(obj);
        const PA: &str = "PeerAuthentication";
        let mut out = CompiledPolicy::default();
        if let Some(e) = &p.invalid {
            let mut pr = Problem::invalid(PA, p.key(), "STRICT", e);
            pr.effect = format!(
                "it is read as STRICT on every port: plaintext to the workloads it applies \
                 to is refused{}",
                scope_note(e)
            );
            out.problems.push(pr);
        }
        for (field, message) in caveats {
            out.problems.push(Problem {
                kind: PA,
                policy: p.key(),
                action: "-",
                invalid: false,
                field,
                message,
                effect: "applied with this caveat".into(),
            });
        }
        out.peer = Some(Arc::new(p));
        out
    }
}

impl Registry {
    /// Compiles every policy; invalid ones are kept failing closed and reported, with the
    /// caveats, in [`Registry::problems`].
    pub fn build<'a>(
        authz: impl IntoIterator<Item = &'a AuthorizationPolicyObject>,
        peer: impl IntoIterator<Item = &'a PeerAuthenticationObject>,
    ) -> Registry {
        let entries: Vec<CompiledPolicy> = authz
            .into_iter()
            .map(CompiledPolicy::authorization_policy)
            .chain(peer.into_iter().map(CompiledPolicy::peer_authentication))
            .collect();
        Registry::assemble(entries.iter())
    }

    /// The registry of objects compiled one by one ([`CompiledPolicy`]), in the order given (the
    /// order of [`Registry::problems`]); costs pointer copies, no compiling.
    pub fn assemble<'a>(entries: impl IntoIterator<Item = &'a CompiledPolicy>) -> Registry {
        let mut reg = Registry::default();
        for e in entries {
            reg.problems.extend(e.problems.iter().cloned());
            if let Some(p) = &e.policy {
                reg.policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone());
            }
            if let Some(p) = &e.peer {
                reg.peer_authentications
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone());
            }
            if let Some(k) = &e.waypoint {
                reg.waypoint_policies.push(k.clone());
            }
        }
        for v in reg.policies.values_mut() {
            v.sort_by(|a, b| a.name.cmp(&b.name));
        }
        for v in reg.peer_authentications.values_mut() {
            v.sort_by(|a, b| (a.invalid.is_none(), &a.name).cmp(&(b.invalid.is_none(), &b.name)));
        }
        reg
    }

    /// Number of authorization policies enforced here.
    pub fn len(&self) -> usize {
        self.policies.values().map(Vec::len).sum()
    }

    /// No authorization policy at all.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Invalid policies in force, by (kind, action): what the `ztunnel_policies_invalid` gauge
    /// shows.
    pub fn invalid_counts(&self) -> BTreeMap<(&'static str, &'static str), usize> {
        let mut out = BTreeMap::new();
        for p in self.problems.iter().filter(|p| p.invalid) {
            *out.entry((p.kind, p.action)).or_default() += 1;
        }
        out
    }

    pub(super) fn in_scope<'a>(
        &'a self,
        root_ns: &'a str,
        dst_ns: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a Arc<Policy>> + Clone + 'a {
        let root = self.policies.get(root_ns).into_iter().flatten();
        let local = (dst_ns != root_ns)
            .then(|| self.policies.get(dst_ns))
            .flatten()
            .into_iter()
            .flatten();
        root.chain(local)
            .filter(move |p| selects(&p.selector, labels))
    }

    /// The effective mTLS mode for a workload port and the PeerAuthentication that set it:
    /// workload policy (port level first), then namespace, then mesh-wide; PERMISSIVE when
    /// nothing says otherwise. At each level an invalid policy (read as STRICT) comes first.
    pub fn mtls_mode(
        &self,
        root_ns: &str,
        dst_ns: &str,
        labels: &Labels,
        port: u16,
    ) -> (MtlsMode, Option<Arc<PeerAuth>>) {
        let list = |ns: &str| self.peer_authentications.get(ns).into_iter().flatten();
        let workload =
            list(dst_ns).filter(|p| p.selector.is_some() && selects(&p.selector, labels));
        for p in workload {
            if let Some(m) = p.ports.get(&port) {
                return (*m, Some(p.clone()));
            }
            if let Some(m) = p.mode {
                return (m, Some(p.clone()));
            }
        }
        let ns_wide = |ns: &str| list(ns).find(|p| p.selector.is_none()).cloned();
        for p in [ns_wide(dst_ns), ns_wide(root_ns)].into_iter().flatten() {
            if let Some(m) = p.mode {
                return (m, Some(p));
            }
        }
        (MtlsMode::Permissive, None)
    }
}
