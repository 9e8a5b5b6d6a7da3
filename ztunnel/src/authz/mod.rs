//! L4 authorization with Istio semantics, enforced at the destination.
//!
//! `AuthorizationPolicy` and `PeerAuthentication` objects come from the same Kubernetes YAML as
//! pods ([`crate::k8s::security`]), are validated and compiled ([`compile`]) into a [`Registry`] held by each
//! [`crate::state::State`] snapshot, and every new inbound flow asks [`evaluate`] for a
//! [`Decision`]. The same function serves the data path, the re-check of open connections on
//! policy change, and the `ztunnel authz check` command (`cli::authz_check`), so what the operator is
//! told is exactly what the daemon does.
//!
//! Semantics (Istio's): a matching DENY rejects; without an ALLOW policy in scope the flow is
//! allowed; otherwise one ALLOW must match. Rules OR; `from`/`to`/`when` AND; values OR;
//! `not*` values exclude. Identity attributes come from the peer certificate only.
//! Rules using L7 attributes fail safe: an ALLOW rule with them matches nothing, a DENY or AUDIT
//! rule ignores them and applies to all traffic matching its L4 parts. Neither can make the
//! daemon allow more than the author meant. A policy that fails validation is not dropped (that
//! would widen access): it fails closed ([`Policy::invalid`], [`PeerAuth::invalid`]) and is
//! listed in [`Registry::problems`].

pub mod compile;
mod registry;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_invalid;

pub use registry::{CompiledPolicy, Problem, Registry};

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::identity::SpiffeId;
use crate::k8s::security::SpecError;
use crate::k8s::Labels;

/// Annotation that makes a policy log its decision without enforcing it.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// How many policies a "no ALLOW policy matched" reason lists.
pub const MAX_LISTED: usize = 5;
/// Default Istio root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Delegates to an external authorizer; none is configured, so a match denies.
    Custom,
    /// Admit (at least one ALLOW must match when any ALLOW is in scope).
    Allow,
    /// Reject.
    Deny,
    /// Log only.
    Audit,
}

impl Action {
    /// The Istio spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Custom => "CUSTOM",
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// A string matcher with Istio's wildcard forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StrMatch {
    /// `*`: any non-empty value.
    Present,
    /// `abc*`.
    Prefix(String),
    /// `*abc`.
    Suffix(String),
    /// `abc`.
    Exact(String),
}

impl StrMatch {
    /// Whether `v` matches; the waypoint's L7 attributes use the same forms.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Present => !v.is_empty(),
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Exact(e) => v == e,
        }
    }
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// One attribute's values and `not*` values: matches when (no values or one matches) and no
/// not-value matches. An absent attribute matches no value and no not-value.
#[derive(Debug, Clone, Serialize)]
pub struct Field<T> {
    /// Any of these.
    pub values: Vec<T>,
    /// None of these.
    pub not_values: Vec<T>,
}

impl<T> Default for Field<T> {
    /// No constraint: matches anything.
    fn default() -> Self {
        Field::new(Vec::new(), Vec::new())
    }
}

impl<T> Field<T> {
    /// A field from its values and not-values.
    pub fn new(values: Vec<T>, not_values: Vec<T>) -> Self {
        Field { values, not_values }
    }

    /// Neither values nor not-values: the field constrains nothing.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// Matches when no value is given or `m` accepts one, and `m` accepts no not-value.
    pub fn check(&self, m: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&m)) && !self.not_values.iter().any(&m)
    }
}

/// `from[].source`, compiled. The default constrains nothing (matches every source).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Source {
    /// `principals` / `notPrincipals` (`<trust domain>/ns/<ns>/sa/<sa>`).
    pub principals: Field<StrMatch>,
    /// `namespaces` / `notNamespaces` (from the certificate).
    pub namespaces: Field<StrMatch>,
    /// `serviceAccounts` / `notServiceAccounts` (`<ns>/<sa>`, from the certificate).
    pub service_accounts: Field<String>,
    /// `ipBlocks` / `notIpBlocks` (source IP).
    pub ip_blocks: Field<Cidr>,
    /// `remoteIpBlocks` / `notRemoteIpBlocks` (at L4 the source IP too: pod IPs are preserved).
    pub remote_ip_blocks: Field<Cidr>,
}

impl Source {
    /// No L4 constraint at all.
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.ip_blocks.is_empty()
            && self.remote_ip_blocks.is_empty()
    }

    /// Whether the source of `r` is one of these; identity attributes come from the peer
    /// certificate only (`r.src_identity`).
    pub fn matches(&self, r: &Ctx<'_>) -> bool {
        let principal = r.principal.as_deref();
        let ns = r.src_identity.map(|i| i.namespace.as_str()).unwrap_or("");
        let sa = r.service_account.as_deref();
        self.principals
            .check(|m| principal.is_some_and(|p| m.matches(p)))
            && self
                .namespaces
                .check(|m| r.src_identity.is_some() && m.matches(ns))
            && self.service_accounts.check(|s| sa == Some(s.as_str()))
            && self.ip_blocks.check(|c| c.contains(r.src_ip))
            && self.remote_ip_blocks.check(|c| c.contains(r.src_ip))
    }
}

/// `to[].operation`, compiled: only ports exist at L4. The default matches every port.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Operation {
    /// `ports` / `notPorts`: the destination pod's port.
    pub ports: Field<u16>,
}

/// A `when` condition's attribute and values.
#[derive(Debug, Clone, Serialize)]
pub enum Attr {
    /// `source.ip` / `remote.ip`.
    SourceIp(Field<Cidr>),
    /// `source.namespace`.
    SourceNamespace(Field<StrMatch>),
    /// `source.principal`.
    SourcePrincipal(Field<StrMatch>),
    /// `destination.ip`.
    DestinationIp(Field<Cidr>),
    /// `destination.port`.
    DestinationPort(Field<u16>),
    /// `connection.sni`: the inner flow's TLS SNI is never seen by the node daemon, so values
    /// never match and not-values never exclude.
    Sni(Field<StrMatch>),
}

/// A `when` entry.
#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    /// What it tests.
    pub attr: Attr,
}

impl Condition {
    /// Whether `r` satisfies the condition.
    pub fn matches(&self, r: &Ctx<'_>) -> bool {
        match &self.attr {
            Attr::SourceIp(f) => f.check(|c| c.contains(r.src_ip)),
            Attr::DestinationIp(f) => f.check(|c| c.contains(r.dst_ip)),
            Attr::DestinationPort(f) => f.check(|p| *p == r.dst_port),
            Attr::SourceNamespace(f) => {
                f.check(|m| r.src_identity.is_some_and(|i| m.matches(&i.namespace)))
            }
            Attr::SourcePrincipal(f) => {
                let p = r.principal.as_deref();
                f.check(|m| p.is_some_and(|p| m.matches(p)))
            }
            Attr::Sni(f) => f.check(|_| false),
        }
    }
}

/// One rule: any source AND any operation AND every condition. Empty lists match anything.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// Sources (OR); empty = any.
    pub from: Vec<Source>,
    /// Operations (OR); empty = any.
    pub to: Vec<Operation>,
    /// Conditions (AND).
    pub when: Vec<Condition>,
    /// An ALLOW rule that used L7 attributes: it matches nothing here (fail safe).
    pub never: bool,
}

impl Rule {
    fn matches(&self, r: &Ctx<'_>) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.ports.check(|p| *p == r.dst_port)))
            && self.when.iter().all(|c| c.matches(r))
    }
}

/// A compiled `AuthorizationPolicy`.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// Namespace; the root namespace makes the policy mesh-wide.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `selector.matchLabels`; `None` = every workload in scope.
    pub selector: Option<BTreeMap<String, String>>,
    /// Action.
    pub action: Action,
    /// Rules. No rule: an ALLOW matches nothing (allow-nothing), a DENY never matches.
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
    /// Why the policy failed validation. It is enforced failing closed: an ALLOW matches
    /// nothing, a DENY or CUSTOM matches every flow to the workloads it selects.
    pub invalid: Option<SpecError>,
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Index of the first matching rule; an invalid DENY or CUSTOM matches as rule 0.
    fn matching_rule(&self, r: &Ctx<'_>) -> Option<usize> {
        if self.invalid.is_some() {
            return (self.action != Action::Allow).then_some(0);
        }
        self.rules.iter().position(|rule| rule.matches(r))
    }
}

/// PeerAuthentication mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// Plaintext accepted.
    Permissive,
    /// Plaintext refused.
    Strict,
    /// Parsed only to be ignored with a warning.
    Disable,
}

/// A compiled `PeerAuthentication`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerAuth {
    /// Namespace; the root namespace makes it mesh-wide.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `selector.matchLabels`.
    pub selector: Option<BTreeMap<String, String>>,
    /// `mtls.mode`; `None` = UNSET (inherit).
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`, by workload port.
    pub ports: BTreeMap<u16, MtlsMode>,
    /// Why the policy failed validation; it is then read as STRICT on every port.
    pub invalid: Option<SpecError>,
}

impl PeerAuth {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &Labels) -> bool {
    selector.as_ref().is_none_or(|s| labels.matches(s))
}

/// The attributes of one flow at the destination.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Source IP (pod IPs are preserved end to end).
    pub src_ip: IpAddr,
    /// Peer certificate identity; `None` for plaintext.
    pub src_identity: Option<&'a SpiffeId>,
    /// Destination workload's namespace.
    pub dst_namespace: &'a str,
    /// Destination workload's labels (for selectors).
    pub dst_labels: &'a Labels,
    /// Destination pod IP.
    pub dst_ip: IpAddr,
    /// Destination pod port (the real target port).
    pub dst_port: u16,
}

/// A request with the derived strings computed once per decision, not once per policy. Public
/// so that an L7 evaluator (the waypoint) can match the same [`Source`]s and [`Condition`]s.
pub struct Ctx<'a> {
    req: &'a Request<'a>,
    /// `<trust domain>/ns/<ns>/sa/<sa>`.
    principal: Option<String>,
    /// `<ns>/<sa>`.
    service_account: Option<String>,
}

impl<'a> std::ops::Deref for Ctx<'a> {
    type Target = Request<'a>;
    fn deref(&self) -> &Request<'a> {
        self.req
    }
}

impl<'a> Ctx<'a> {
    /// Derives the principal and service-account strings of `req` once.
    pub fn new(req: &'a Request<'a>) -> Self {
        Ctx {
            req,
            principal: req.src_identity.map(|i| {
                format!(
                    "{}/ns/{}/sa/{}",
                    i.trust_domain, i.namespace, i.service_account
                )
            }),
            service_account: req
                .src_identity
                .map(|i| format!("{}/{}", i.namespace, i.service_account)),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Let the flow through.
    Allow,
    /// Refuse it.
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        })
    }
}

/// Why a verdict was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// No ALLOW policy applies to the workload: allowed by default.
    NoAllowPolicy,
    /// This ALLOW policy's rule matched.
    Allowed {
        /// `namespace/name`.
        policy: String,
        /// 0-based rule index.
        rule: usize,
    },
    /// This DENY policy's rule matched.
    Denied {
        /// `namespace/name`.
        policy: String,
        /// 0-based rule index.
        rule: usize,
    },
    /// This CUSTOM policy's rule matched; without an external authorizer the flow is denied.
    Custom {
        /// `namespace/name`.
        policy: String,
        /// 0-based rule index.
        rule: usize,
    },
    /// An invalid DENY or CUSTOM policy applies: it denies everything (fail closed).
    Invalid {
        /// `namespace/name`.
        policy: String,
        /// What is wrong with it.
        error: SpecError,
    },
    /// ALLOW policies apply and none matched.
    NoAllowMatched {
        /// The ALLOW policies in scope (`namespace/name`, at most [`MAX_LISTED`]), so the
        /// operator sees which ones were expected to admit the flow.
        checked: Vec<String>,
        /// The first invalid ALLOW in scope (it allows nothing), named because it is the
        /// likely reason the flow was expected to be admitted.
        invalid: Option<(String, SpecError)>,
    },
    /// Plaintext refused by a STRICT PeerAuthentication.
    StrictMtls {
        /// `namespace/name`.
        policy: String,
        /// Set when the PeerAuthentication failed validation and is read as STRICT.
        invalid: Option<SpecError>,
    },
}

impl Reason {
    /// The deciding policy's `namespace/name`, if a policy decided.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Reason::Allowed { policy, .. }
            | Reason::Denied { policy, .. }
            | Reason::Custom { policy, .. }
            | Reason::Invalid { policy, .. }
            | Reason::StrictMtls { policy, .. } => Some(policy),
            Reason::NoAllowMatched {
                invalid: Some((policy, _)),
                ..
            } => Some(policy),
            Reason::NoAllowPolicy | Reason::NoAllowMatched { .. } => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoAllowPolicy => f.write_str("no ALLOW policy applies (default allow)"),
            Reason::Allowed { policy, rule } => write!(f, "allowed by {policy} rule {rule}"),
            Reason::Denied { policy, rule } => write!(f, "denied by {policy} rule {rule}"),
            Reason::Custom { policy, rule } => write!(
                f,
                "denied by CUSTOM {policy} rule {rule} (no external authorizer is configured)"
            ),
            Reason::Invalid { policy, error } => write!(
                f,
                "denied: policy {policy} failed validation ({error}); it denies all traffic to \
                 the workloads it applies to"
            ),
            Reason::NoAllowMatched { checked, invalid } => {
                if let Some((policy, error)) = invalid {
                    write!(
                        f,
                        "denied: policy {policy} failed validation ({error}); it allows nothing \
                         ("
                    )?;
                }
                write!(
                    f,
                    "no ALLOW policy matched (in scope: {}",
                    checked.join(", ")
                )?;
                if checked.len() >= MAX_LISTED {
                    f.write_str(", …")?;
                }
                f.write_str(if invalid.is_some() { "))" } else { ")" })
            }
            Reason::StrictMtls {
                policy,
                invalid: None,
            } => write!(
                f,
                "plaintext refused: PeerAuthentication {policy} requires mTLS (STRICT)"
            ),
            Reason::StrictMtls {
                policy,
                invalid: Some(error),
            } => write!(
                f,
                "plaintext refused: PeerAuthentication {policy} failed validation ({error}); \
                 it is read as STRICT"
            ),
        }
    }
}

/// The outcome for one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What to do.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// When dry-run policies are in scope and would change the outcome: what they would do.
    pub dry_run: Option<(Verdict, Reason)>,
    /// AUDIT policies that matched (`namespace/name`).
    pub audited: Vec<String>,
}

impl Decision {
    /// The flow may proceed.
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

fn decide<'a>(
    policies: impl Iterator<Item = &'a Arc<Policy>> + Clone,
    r: &Ctx<'_>,
) -> (Verdict, Reason) {
    for action in [Action::Custom, Action::Deny] {
        for p in policies.clone().filter(|p| p.action == action) {
            let Some(rule) = p.matching_rule(r) else {
                continue;
            };
            let policy = p.key();
            let reason = match (&p.invalid, action) {
                (Some(error), _) => Reason::Invalid {
                    policy,
                    error: error.clone(),
                },
                (None, Action::Custom) => Reason::Custom { policy, rule },
                (None, _) => Reason::Denied { policy, rule },
            };
            return (Verdict::Deny, reason);
        }
    }
    let mut checked = Vec::new();
    let mut invalid = None;
    for p in policies.filter(|p| p.action == Action::Allow) {
        if checked.len() < MAX_LISTED {
            checked.push(p.key());
        }
        if let (None, Some(e)) = (&invalid, &p.invalid) {
            invalid = Some((p.key(), e.clone()));
        }
        if let Some(rule) = p.matching_rule(r) {
            return (
                Verdict::Allow,
                Reason::Allowed {
                    policy: p.key(),
                    rule,
                },
            );
        }
    }
    if !checked.is_empty() || invalid.is_some() {
        (Verdict::Deny, Reason::NoAllowMatched { checked, invalid })
    } else {
        (Verdict::Allow, Reason::NoAllowPolicy)
    }
}

/// Decides one flow. `plaintext` flows (inbound 15006) are first checked against
/// PeerAuthentication; every flow then against the AuthorizationPolicies in scope: those of the
/// root namespace and of the destination's namespace whose selector matches its labels.
pub fn evaluate(reg: &Registry, root_ns: &str, req: &Request<'_>, plaintext: bool) -> Decision {
    let ctx = Ctx::new(req);
    let r = &ctx;
    let audited = reg
        .in_scope(root_ns, r.dst_namespace, r.dst_labels)
        .filter(|p| p.action == Action::Audit && p.matching_rule(r).is_some())
        .map(|p| p.key())
        .collect();
    if plaintext {
        if let (MtlsMode::Strict, pa) =
            reg.mtls_mode(root_ns, r.dst_namespace, r.dst_labels, r.dst_port)
        {
            return Decision {
                verdict: Verdict::Deny,
                reason: Reason::StrictMtls {
                    policy: pa.as_ref().map(|p| p.key()).unwrap_or_default(),
                    invalid: pa.and_then(|p| p.invalid.clone()),
                },
                dry_run: None,
                audited,
            };
        }
    }
    let scope = reg.in_scope(root_ns, r.dst_namespace, r.dst_labels);
    let (verdict, reason) = decide(scope.clone().filter(|p| !p.dry_run), r);
    let dry_run = if scope.clone().any(|p| p.dry_run) {
        let shadow = decide(scope, r);
        (shadow.0 != verdict || shadow.1 != reason).then_some(shadow)
    } else {
        None
    };
    Decision {
        verdict,
        reason,
        dry_run,
        audited,
    }
}
