//! L7 authorization: the `AuthorizationPolicy` objects attached to this waypoint, decided per
//! HTTP request.
//!
//! A policy belongs to the waypoint when its `targetRefs` (or `targetRef`) name the waypoint's
//! own `Gateway` (group `gateway.networking.k8s.io`) or a `Service` (core group) that is the
//! request's original destination. Policies with a workload `selector` or without a target are
//! the node daemons' (L4) business and are ignored here.
//!
//! The parts an L4 flow and an HTTP request share (principals, namespaces, service accounts,
//! ipBlocks, remoteIpBlocks, ports, and the `when` keys on those) are compiled and matched by
//! the node daemon's own code ([`ztunnel::authz`]), so both proxies read them the same way; the
//! HTTP parts (hosts, methods, paths, `request.headers[...]`) are added here.
//!
//! Decision order: a matching CUSTOM policy denies (no external authorizer is configured, so
//! the request cannot be checked by one), then a matching DENY denies; with no ALLOW policy
//! attached the request is allowed, otherwise one ALLOW rule must match. AUDIT policies are
//! reported, never enforced; `istio.io/dry-run` policies are evaluated and logged only.
//!
//! Whatever the waypoint cannot evaluate (JWT attributes, `connection.sni`, path templates,
//! `experimental.*` keys) never widens access: an ALLOW rule that uses it matches nothing, and
//! a DENY or CUSTOM rule treats it as matched. A policy that fails validation stays attached
//! and fails closed too: an invalid ALLOW allows nothing, any other invalid policy denies
//! every request it is attached to.

pub mod compile;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderMap;
use serde::Serialize;
use ztunnel::authz::{Ctx, Field, Source, StrMatch, Verdict, MAX_LISTED};
use ztunnel::identity::SpiffeId;

/// The body of the 403 a denied request gets (what Istio's proxies answer, so clients and
/// tests that look for it keep working).
pub const DENIED_BODY: &str = "RBAC: access denied";

/// What a policy does when one of its rules matches: the node daemon's actions (CUSTOM
/// included: no external authorizer is configured, so a match denies).
pub use ztunnel::authz::Action;

/// What a policy is attached to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Target {
    /// A waypoint's `Gateway`, `namespace/name`.
    Gateway(String),
    /// A `Service`, `namespace/name`: requests whose original destination it is.
    Service(String),
    /// Every waypoint and Service of a namespace: the reading of a policy whose target
    /// cannot be read (it is then invalid and fails closed).
    Namespace(String),
}

/// `to[].operation`, compiled. Empty fields constrain nothing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Operation {
    /// `ports` / `notPorts`: the port the client addressed (the Service port, or the pod's).
    pub ports: Field<u16>,
    /// `hosts` / `notHosts`, lower-cased: compared with the request's host without regard to
    /// case; a value without a port also matches the host with any port.
    pub hosts: Field<StrMatch>,
    /// `methods` / `notMethods`.
    pub methods: Field<StrMatch>,
    /// `paths` / `notPaths`: the normalized path, without the query.
    pub paths: Field<StrMatch>,
}

impl Operation {
    /// Whether `r` is this operation. Without an HTTP request (an opaque stream) the HTTP
    /// fields cannot be seen: they fail an ALLOW (`allow`) and are taken as matched otherwise.
    fn matches(&self, r: &Request<'_>, allow: bool) -> bool {
        if !self.ports.check(|p| *p == r.dst.port()) {
            return false;
        }
        let Some(h) = &r.http else {
            let http_fields =
                !self.hosts.is_empty() || !self.methods.is_empty() || !self.paths.is_empty();
            return !(allow && http_fields);
        };
        let host = h.host.to_ascii_lowercase();
        let bare = host_without_port(&host);
        self.hosts
            .check(|m| m.matches(&host) || bare.is_some_and(|b| m.matches(b)))
            && self.methods.check(|m| m.matches(h.method))
            && self.paths.check(|m| m.matches(h.path))
    }
}

/// `host` without its `:port`, when it has one (`[v6]:port` included).
fn host_without_port(host: &str) -> Option<&str> {
    let (name, port) = host.rsplit_once(':')?;
    let bracketed = name.starts_with('[') && name.ends_with(']');
    let plain = !name.contains(':');
    (port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() && (bracketed || plain))
        .then_some(name)
}

/// A `when` condition.
#[derive(Debug, Clone, Serialize)]
pub enum Condition {
    /// A key the node daemon knows too (`source.ip`, `source.principal`, `destination.port`,
    /// …), matched by its code.
    L4(ztunnel::authz::Condition),
    /// `request.headers[<name>]`: the header's values joined with `,`; an absent header
    /// matches no value (and so is not excluded by `notValues`).
    Header {
        /// Lower-case header name.
        name: String,
        /// Values / not-values.
        values: Field<StrMatch>,
    },
}

impl Condition {
    /// Whether `r` satisfies the condition; a header condition on an opaque stream fails an
    /// ALLOW (`allow`) and is taken as met otherwise.
    fn matches(&self, ctx: &Ctx<'_>, r: &Request<'_>, allow: bool) -> bool {
        match self {
            Condition::L4(c) => c.matches(ctx),
            Condition::Header { name, values } => {
                let Some(h) = &r.http else {
                    return !allow;
                };
                let joined = header_value(h.headers, name);
                values.check(|m| match (m, &joined) {
                    (StrMatch::Present, Some(_)) => true,
                    (m, Some(v)) => m.matches(v),
                    (_, None) => false,
                })
            }
        }
    }
}

/// All values of header `name`, joined with `,`; `None` when it is absent.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    Some(
        values
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// One rule: any source AND any operation AND every condition. Empty lists match anything.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rule {
    /// Sources (OR); empty = any. Matched by the node daemon's code.
    pub from: Vec<Source>,
    /// Operations (OR); empty = any.
    pub to: Vec<Operation>,
    /// Conditions (AND).
    pub when: Vec<Condition>,
    /// Fields the waypoint cannot evaluate (left out of `from`/`to`/`when`: treated as
    /// matched), for the config dump and the warning.
    pub unsupported: Vec<String>,
    /// An ALLOW rule with [`Rule::unsupported`] fields: it matches nothing.
    pub never: bool,
}

impl Rule {
    fn matches(&self, ctx: &Ctx<'_>, r: &Request<'_>, allow: bool) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(ctx)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r, allow)))
            && self.when.iter().all(|c| c.matches(ctx, r, allow))
    }
}

/// A compiled `AuthorizationPolicy` attached to a waypoint or a Service.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Action.
    pub action: Action,
    /// Rules. No rule: an ALLOW matches nothing, a DENY or CUSTOM never matches.
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
    /// What it is attached to.
    pub targets: Vec<Target>,
    /// Why the policy failed validation: it then fails closed (an ALLOW matches nothing,
    /// anything else matches every request).
    pub invalid: Option<String>,
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The first matching rule; an invalid non-ALLOW policy matches as rule 0.
    fn matching_rule(&self, ctx: &Ctx<'_>, r: &Request<'_>) -> Option<usize> {
        let allow = self.action == Action::Allow;
        if self.invalid.is_some() {
            return (!allow).then_some(0);
        }
        self.rules
            .iter()
            .position(|rule| rule.matches(ctx, r, allow))
    }
}

/// The policies of one snapshot, indexed by what they are attached to.
#[derive(Debug, Default, Serialize)]
pub struct PolicySet {
    /// Every attached policy, by `namespace/name`.
    pub policies: Vec<Arc<Policy>>,
    #[serde(skip)]
    by_target: BTreeMap<Target, Vec<usize>>,
}

impl PolicySet {
    /// Indexes `policies` by their targets.
    pub fn new(mut policies: Vec<Policy>) -> PolicySet {
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut by_target: BTreeMap<Target, Vec<usize>> = BTreeMap::new();
        for (i, p) in policies.iter().enumerate() {
            for t in &p.targets {
                by_target.entry(t.clone()).or_default().push(i);
            }
        }
        PolicySet {
            policies: policies.into_iter().map(Arc::new).collect(),
            by_target,
        }
    }

    /// The policies that apply to a request through the waypoint `gateway` (`namespace/name`)
    /// to `service` (`namespace/name` of the original destination, if a Service), each once,
    /// in name order.
    pub fn attached(&self, gateway: &str, service: Option<&str>) -> Vec<&Policy> {
        let mut idx: Vec<usize> = self
            .by_target
            .get(&Target::Gateway(gateway.to_string()))
            .into_iter()
            .chain(service.and_then(|s| self.by_target.get(&Target::Service(s.to_string()))))
            .chain(
                [Some(gateway), service]
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.split_once('/'))
                    .filter_map(|(ns, _)| self.by_target.get(&Target::Namespace(ns.to_string()))),
            )
            .flatten()
            .copied()
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.policies[i].as_ref()).collect()
    }
}

/// The attributes of one request (or opaque stream) at the waypoint.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The original client's address (HBONE `forwarded`, pod IPs are preserved).
    pub src_ip: IpAddr,
    /// The client's identity, from its HBONE peer certificate.
    pub src_identity: Option<&'a SpiffeId>,
    /// The original destination (the CONNECT authority: a Service VIP and port, or a pod).
    pub dst: SocketAddr,
    /// `namespace/name` of the destination Service, when the destination is one.
    pub service: Option<&'a str>,
    /// The HTTP request; `None` for a stream that is not HTTP, decided on its L4 attributes
    /// as a node daemon would (rules on HTTP attributes fail closed).
    pub http: Option<Http<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Debug, Clone)]
pub struct Http<'a> {
    /// Method.
    pub method: &'a str,
    /// Host (`:authority` or `Host`), as sent.
    pub host: &'a str,
    /// Path without the query, normalized.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
}

/// Why a verdict was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// No ALLOW policy is attached: allowed by default.
    NoAllowPolicy,
    /// An ALLOW policy's rule matched.
    Allowed {
        /// `namespace/name`.
        policy: String,
        /// 0-based rule index.
        rule: usize,
    },
    /// A DENY policy's rule matched.
    Denied {
        /// `namespace/name`.
        policy: String,
        /// 0-based rule index.
        rule: usize,
    },
    /// A CUSTOM policy's rule matched; without an external authorizer the request is denied.
    Custom {
        /// `namespace/name`.
        policy: String,
        /// 0-based rule index.
        rule: usize,
    },
    /// An invalid DENY or CUSTOM policy is attached: it denies everything (fail closed).
    Invalid {
        /// `namespace/name`.
        policy: String,
        /// What is wrong with it.
        error: String,
    },
    /// ALLOW policies are attached and none matched.
    NoAllowMatched {
        /// The ALLOW policies attached (at most [`MAX_LISTED`]).
        checked: Vec<String>,
    },
}

impl Reason {
    /// The deciding policy's `namespace/name`, if a policy decided.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Reason::Allowed { policy, .. }
            | Reason::Denied { policy, .. }
            | Reason::Custom { policy, .. }
            | Reason::Invalid { policy, .. } => Some(policy),
            Reason::NoAllowPolicy | Reason::NoAllowMatched { .. } => None,
        }
    }

    /// The deciding rule's index, if a rule decided.
    pub fn rule(&self) -> Option<usize> {
        match self {
            Reason::Allowed { rule, .. }
            | Reason::Denied { rule, .. }
            | Reason::Custom { rule, .. } => Some(*rule),
            _ => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoAllowPolicy => f.write_str("no ALLOW policy attached (default allow)"),
            Reason::Allowed { policy, rule } => write!(f, "allowed by {policy} rule {rule}"),
            Reason::Denied { policy, rule } => write!(f, "denied by {policy} rule {rule}"),
            Reason::Custom { policy, rule } => write!(
                f,
                "denied by CUSTOM {policy} rule {rule} (no external authorizer is configured)"
            ),
            Reason::Invalid { policy, error } => {
                write!(
                    f,
                    "denied by invalid policy {policy} (fails closed: {error})"
                )
            }
            Reason::NoAllowMatched { checked } => {
                write!(
                    f,
                    "no ALLOW policy matched (attached: {}",
                    checked.join(", ")
                )?;
                if checked.len() >= MAX_LISTED {
                    f.write_str(", …")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What to do.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// When dry-run policies are attached and would change the outcome: what they would do.
    pub dry_run: Option<(Verdict, Reason)>,
    /// AUDIT policies that matched (`namespace/name`).
    pub audited: Vec<String>,
}

impl Decision {
    /// The request may proceed.
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

fn decide(policies: &[&Policy], ctx: &Ctx<'_>, h: &Request<'_>) -> (Verdict, Reason) {
    for action in [Action::Custom, Action::Deny] {
        for p in policies.iter().filter(|p| p.action == action) {
            let Some(rule) = p.matching_rule(ctx, h) else {
                continue;
            };
            let (policy, error) = (p.key(), p.invalid.clone());
            let reason = match (error, action) {
                (Some(error), _) => Reason::Invalid { policy, error },
                (None, Action::Custom) => Reason::Custom { policy, rule },
                (None, _) => Reason::Denied { policy, rule },
            };
            return (Verdict::Deny, reason);
        }
    }
    let mut checked = Vec::new();
    for p in policies.iter().filter(|p| p.action == Action::Allow) {
        if checked.len() < MAX_LISTED {
            checked.push(p.key());
        }
        if let Some(rule) = p.matching_rule(ctx, h) {
            let policy = p.key();
            return (Verdict::Allow, Reason::Allowed { policy, rule });
        }
    }
    if checked.is_empty() {
        (Verdict::Allow, Reason::NoAllowPolicy)
    } else {
        (Verdict::Deny, Reason::NoAllowMatched { checked })
    }
}

/// Labels of no workload: the waypoint's policies have no selector.
static NO_LABELS: std::sync::LazyLock<ztunnel::k8s::Labels> =
    std::sync::LazyLock::new(ztunnel::k8s::Labels::default);

/// Decides one request (or opaque stream) against the policies attached to `gateway`
/// (`namespace/name`) and to its Service. The one function the data path and `waypoint
/// check` call.
pub fn evaluate(set: &PolicySet, gateway: &str, h: &Request<'_>) -> Decision {
    let l4 = ztunnel::authz::Request {
        src_ip: h.src_ip,
        src_identity: h.src_identity,
        dst_namespace: "",
        dst_labels: &NO_LABELS,
        dst_ip: h.dst.ip(),
        dst_port: h.dst.port(),
    };
    let ctx = Ctx::new(&l4);
    let attached = set.attached(gateway, h.service);
    let audited = attached
        .iter()
        .filter(|p| p.action == Action::Audit && p.matching_rule(&ctx, h).is_some())
        .map(|p| p.key())
        .collect();
    let enforced: Vec<&Policy> = attached.iter().copied().filter(|p| !p.dry_run).collect();
    let (verdict, reason) = decide(&enforced, &ctx, h);
    let dry_run = if attached.iter().any(|p| p.dry_run) {
        let shadow = decide(&attached, &ctx, h);
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
