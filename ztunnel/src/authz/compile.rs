//! Validation: from the YAML shape ([`crate::k8s::security`]) to the compiled policy the evaluator
//! runs. Every mistake (a spec that does not type, unknown action, malformed CIDR, bad port,
//! unknown `when` key, contradictory fields) is reported with the object and the field, and the
//! policy is kept **failing closed** ([`super::Policy::invalid`]): an invalid ALLOW allows
//! nothing, an invalid DENY or CUSTOM denies everything it selects, an invalid
//! PeerAuthentication is read as STRICT. Rules that need L7 attributes are rewritten to fail
//! safe here (see [`super::Policy`]) and a caveat says so.
//!
//! [`head`] is the part the node daemon and the waypoint read the same way (action, dry run,
//! the first reason a policy is invalid); both compile the L4 fields with [`source`],
//! [`condition`] and [`port`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{
    Action, Attr, Cidr, Condition, Field, MtlsMode, Operation, PeerAuth, Policy, Rule, Source,
    StrMatch, DRY_RUN_ANNOTATION,
};
use crate::k8s::security::{
    AuthorizationPolicyObject, ConditionSpec, FromSpec, MtlsSpec, OperationSpec,
    PeerAuthenticationObject, RuleSpec, Scalar, SourceSpec, SpecError, ToSpec,
};

/// An invalid policy, naming the object and field; it is enforced failing closed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind} {namespace}/{name}: field `{field}`: {message}")]
pub struct PolicyError {
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: &'static str,
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// Dotted path of the offending field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A caveat: the dotted path it is about and what it means for traffic.
pub type Caveat = (String, String);

/// What compiling one authorization policy produced.
#[derive(Debug)]
pub enum Compiled {
    /// Enforced here (valid, or invalid and failing closed), with caveats to log (L7
    /// fail-safe rewrites, CUSTOM without an authorizer).
    Policy(Policy, Vec<Caveat>),
    /// Attached with `targetRef(s)`: a waypoint's business, not enforced by the node daemon.
    Waypoint,
    /// An invalid AUDIT policy: it decides nothing, so it is only reported.
    Ignored(SpecError),
}

/// A compiled part, or the dotted path of the offending field and what is wrong with it.
pub type FieldResult<T> = Result<T, (String, String)>;

/// What every enforcement point reads the same way before the rules.
#[derive(Debug, Clone)]
pub struct Head {
    /// The action; an unknown or unreadable one is read as DENY (the stricter reading).
    pub action: Action,
    /// `istio.io/dry-run: "true"` (a malformed annotation makes the policy invalid and
    /// enforced).
    pub dry_run: bool,
    /// The first reason the policy is invalid, if any.
    pub invalid: Option<SpecError>,
}

/// Reads the action, the dry-run annotation and the checks that do not depend on where the
/// policy is enforced: the spec typed ([`AuthorizationPolicyObject::spec_error`]), a known
/// action, no `selector` next to `targetRef(s)`.
pub fn head(obj: &AuthorizationPolicyObject) -> Head {
    let spec = &obj.spec;
    let mut invalid = obj.spec_error.clone();
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" | "" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => Action::Custom,
        other => {
            invalid.get_or_insert_with(|| {
                SpecError::new(
                    "spec.action",
                    format!(
                        "unknown action `{other}` (expected ALLOW, DENY, AUDIT or CUSTOM); read \
                         as DENY"
                    ),
                )
            });
            Action::Deny
        }
    };
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if targeted && spec.selector.is_some() {
        invalid.get_or_insert_with(|| {
            SpecError::new(
                "spec.selector",
                "cannot be combined with targetRef/targetRefs",
            )
        });
    }
    let dry_run = match dry_run(&obj.metadata) {
        Ok(d) => d,
        Err((field, message)) => {
            invalid.get_or_insert(SpecError { field, message });
            false
        }
    };
    Head {
        action,
        dry_run,
        invalid,
    }
}

/// What an invalid policy with `action` does to traffic (the same wording for the log,
/// `ztunnel analyze`, `ztunnel authz check` and the waypoint).
pub fn fail_closed_effect(action: Action) -> &'static str {
    match action {
        Action::Allow => {
            "it allows nothing: the workloads it applies to are denied unless another ALLOW \
             policy admits the traffic"
        }
        Action::Deny | Action::Custom => "it denies all traffic to the workloads it applies to",
        Action::Audit => "it is ignored (an AUDIT policy decides nothing)",
    }
}

/// Compiles an `AuthorizationPolicy`. Never drops an enforced policy: an invalid one comes
/// back with [`Policy::invalid`] set and no rules.
pub fn authorization_policy(obj: &AuthorizationPolicyObject) -> Compiled {
    let spec = &obj.spec;
    let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    if targeted && spec.selector.is_none() {
        return Compiled::Waypoint;
    }
    let Head {
        action,
        dry_run,
        mut invalid,
    } = head(obj);
    let mut caveats = Vec::new();
    let mut rules = Vec::new();
    if invalid.is_none() {
        match compile_rules(obj, action) {
            Ok((r, c)) => (rules, caveats) = (r, c),
            Err((field, message)) => invalid = Some(SpecError { field, message }),
        }
    }
    if let Some(e) = invalid.as_ref().filter(|_| action == Action::Audit) {
        return Compiled::Ignored(e.clone());
    }
    if action == Action::Custom && invalid.is_none() {
        caveats.push((
            "spec.action".into(),
            "CUSTOM needs an external authorizer, which the node daemon does not have: \
             traffic its rules match is denied"
                .into(),
        ));
    }
    if invalid.is_some() {
        rules.clear();
    }
    Compiled::Policy(
        Policy {
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name: obj.metadata.name.clone(),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            action,
            rules,
            dry_run,
            invalid,
        },
        caveats,
    )
}

fn compile_rules(
    obj: &AuthorizationPolicyObject,
    action: Action,
) -> FieldResult<(Vec<Rule>, Vec<Caveat>)> {
    let mut caveats = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in obj.spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut l7 = Vec::new();
        let (from, to, when) = rule_parts(
            r,
            &at,
            &mut l7,
            |f, at, l7| source(&f.source, at, l7),
            |t, at, l7| operation(&t.operation, at, l7),
            condition,
        )?;
        let when = when.into_iter().flatten().collect();
        let never = !l7.is_empty() && action == Action::Allow;
        if !l7.is_empty() {
            caveats.push((
                at.clone(),
                if never {
                    format!(
                        "uses L7 attributes ({}) that the node daemon cannot see; this ALLOW \
                         rule matches nothing here (fail safe: traffic it was meant to allow is \
                         denied unless another rule allows it; use a waypoint for L7 policy)",
                        l7.join(", ")
                    )
                } else {
                    format!(
                        "uses L7 attributes ({}) that the node daemon cannot see; they are \
                         ignored, so this {} rule applies to all traffic matching its L4 parts \
                         (fail safe; use a waypoint for L7 policy)",
                        l7.join(", "),
                        action.as_str()
                    )
                },
            ));
        }
        // An entry made only of L7 fields keeps no L4 constraint: it matches every flow (in a
        // DENY that is the fail-safe reading; an ALLOW rule with L7 fields is `never` anyway).
        // Dropping it instead would narrow a DENY whose other entries are L4.
        rules.push(Rule {
            from: from.into_iter().map(Option::unwrap_or_default).collect(),
            to: to.into_iter().map(Option::unwrap_or_default).collect(),
            when,
            never,
        });
    }
    Ok((rules, caveats))
}

/// Compiles the `from`, `to` and `when` entries of rule `r` (at `at`) with the given
/// compilers, each called with the entry's path (`<at>.from[j].source`,
/// `<at>.to[j].operation`, `<at>.when[j]`) and the list of L7 or unsupported fields to add
/// to. The node daemon and the waypoint walk a rule the same way with their own compilers.
#[allow(clippy::type_complexity)]
pub fn rule_parts<S, O, C>(
    r: &RuleSpec,
    at: &str,
    l7: &mut Vec<String>,
    mut from: impl FnMut(&FromSpec, &str, &mut Vec<String>) -> FieldResult<S>,
    mut to: impl FnMut(&ToSpec, &str, &mut Vec<String>) -> FieldResult<O>,
    mut when: impl FnMut(&ConditionSpec, &str, &mut Vec<String>) -> FieldResult<C>,
) -> FieldResult<(Vec<S>, Vec<O>, Vec<C>)> {
    let mut sources = Vec::new();
    for (j, f) in r.from.iter().flatten().enumerate() {
        sources.push(from(f, &format!("{at}.from[{j}].source"), l7)?);
    }
    let mut operations = Vec::new();
    for (j, t) in r.to.iter().flatten().enumerate() {
        operations.push(to(t, &format!("{at}.to[{j}].operation"), l7)?);
    }
    let mut conditions = Vec::new();
    for (j, c) in r.when.iter().flatten().enumerate() {
        conditions.push(when(c, &format!("{at}.when[{j}]"), l7)?);
    }
    Ok((sources, operations, conditions))
}

/// The `istio.io/dry-run` annotation: `true`, `false` or absent (false).
pub fn dry_run(meta: &crate::k8s::ObjectMeta) -> FieldResult<bool> {
    match meta.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err((
            format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
            format!("`{other}`: expected \"true\" or \"false\""),
        )),
    }
}

/// Compiles a source; `None` when all its fields were L7 (nothing left to match at L4). The
/// L7 fields found are pushed to `l7` as `<at>.<field>`.
pub fn source(s: &SourceSpec, at: &str, l7: &mut Vec<String>) -> FieldResult<Option<Source>> {
    let strs = |v: &[String], f: &str| -> FieldResult<Vec<StrMatch>> {
        v.iter()
            .enumerate()
            .map(|(k, x)| str_match(x).map_err(|m| (format!("{at}.{f}[{k}]"), m)))
            .collect()
    };
    let cidrs = |v: &[String], f: &str| -> FieldResult<Vec<Cidr>> {
        v.iter()
            .enumerate()
            .map(|(k, x)| Cidr::parse(x).map_err(|m| (format!("{at}.{f}[{k}]"), m)))
            .collect()
    };
    let sas = |v: &[String], f: &str| -> FieldResult<Vec<String>> {
        for (k, x) in v.iter().enumerate() {
            let ok = x
                .split_once('/')
                .is_some_and(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'));
            if !ok {
                return Err((
                    format!("{at}.{f}[{k}]"),
                    format!("`{x}`: expected `<namespace>/<service account>`"),
                ));
            }
        }
        Ok(v.to_vec())
    };
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_pn = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if has_sa && has_pn {
        return Err((
            format!("{at}.serviceAccounts"),
            "cannot be combined with principals or namespaces".into(),
        ));
    }
    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
        l7.push(format!("{at}.requestPrincipals"));
    }
    let src = Source {
        principals: Field::new(
            strs(&s.principals, "principals")?,
            strs(&s.not_principals, "notPrincipals")?,
        ),
        namespaces: Field::new(
            strs(&s.namespaces, "namespaces")?,
            strs(&s.not_namespaces, "notNamespaces")?,
        ),
        service_accounts: Field::new(
            sas(&s.service_accounts, "serviceAccounts")?,
            sas(&s.not_service_accounts, "notServiceAccounts")?,
        ),
        ip_blocks: Field::new(
            cidrs(&s.ip_blocks, "ipBlocks")?,
            cidrs(&s.not_ip_blocks, "notIpBlocks")?,
        ),
        remote_ip_blocks: Field::new(
            cidrs(&s.remote_ip_blocks, "remoteIpBlocks")?,
            cidrs(&s.not_remote_ip_blocks, "notRemoteIpBlocks")?,
        ),
    };
    let l4_empty = src.is_empty();
    if l4_empty && l7.iter().all(|f| !f.starts_with(at)) {
        return Err((at.to_string(), "must set at least one field".into()));
    }
    Ok((!l4_empty).then_some(src))
}

/// Compiles an operation; `None` when all its fields were L7.
fn operation(o: &OperationSpec, at: &str, l7: &mut Vec<String>) -> FieldResult<Option<Operation>> {
    let ports = |v: &[Scalar], f: &str| -> FieldResult<Vec<u16>> {
        v.iter()
            .enumerate()
            .map(|(k, x)| port(x).map_err(|m| (format!("{at}.{f}[{k}]"), m)))
            .collect()
    };
    let op = Operation {
        ports: Field::new(ports(&o.ports, "ports")?, ports(&o.not_ports, "notPorts")?),
    };
    let l7_fields = [
        ("hosts", o.hosts.len() + o.not_hosts.len()),
        ("methods", o.methods.len() + o.not_methods.len()),
        ("paths", o.paths.len() + o.not_paths.len()),
    ];
    let mut any_l7 = false;
    for (f, n) in l7_fields {
        if n > 0 {
            any_l7 = true;
            l7.push(format!("{at}.{f}"));
        }
    }
    let l4_empty = op.ports.is_empty();
    if l4_empty && !any_l7 {
        return Err((at.to_string(), "must set at least one field".into()));
    }
    Ok((!l4_empty).then_some(op))
}

/// Compiles a `when` condition; `None` for an L7 key (`request.*`, `experimental.*`), which
/// is pushed to `l7`.
pub fn condition(
    c: &ConditionSpec,
    at: &str,
    l7: &mut Vec<String>,
) -> FieldResult<Option<Condition>> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((at.to_string(), "must set values or notValues".into()));
    }
    let vals = |f: &str, list: &[Scalar]| -> Vec<(String, String)> {
        list.iter()
            .enumerate()
            .map(|(k, v)| (format!("{at}.{f}[{k}]"), v.to_string()))
            .collect()
    };
    let (v, nv) = (vals("values", &c.values), vals("notValues", &c.not_values));
    fn each<T>(
        v: &[(String, String)],
        f: impl Fn(&str) -> Result<T, String>,
    ) -> FieldResult<Vec<T>> {
        v.iter()
            .map(|(field, x)| f(x).map_err(|m| (field.clone(), m)))
            .collect()
    }
    let attr = match c.key.as_str() {
        "source.ip" | "remote.ip" => {
            Attr::SourceIp(Field::new(each(&v, Cidr::parse)?, each(&nv, Cidr::parse)?))
        }
        "destination.ip" => {
            Attr::DestinationIp(Field::new(each(&v, Cidr::parse)?, each(&nv, Cidr::parse)?))
        }
        "destination.port" => Attr::DestinationPort(Field::new(
            each(&v, |x| port(&Scalar::Str(x.into())))?,
            each(&nv, |x| port(&Scalar::Str(x.into())))?,
        )),
        "source.namespace" => {
            Attr::SourceNamespace(Field::new(each(&v, str_match)?, each(&nv, str_match)?))
        }
        "source.principal" => {
            Attr::SourcePrincipal(Field::new(each(&v, str_match)?, each(&nv, str_match)?))
        }
        "connection.sni" => Attr::Sni(Field::new(each(&v, str_match)?, each(&nv, str_match)?)),
        k if k.starts_with("request.") || k.starts_with("experimental.") => {
            l7.push(format!("{at}.key={k}"));
            return Ok(None);
        }
        "" => return Err((format!("{at}.key"), "is required".into())),
        other => {
            return Err((
                format!("{at}.key"),
                format!(
                    "unknown key `{other}` (L4 keys: source.ip, remote.ip, source.namespace, \
                     source.principal, destination.ip, destination.port, connection.sni)"
                ),
            ))
        }
    };
    Ok(Some(Condition { attr }))
}

/// A port number 1-65535, written as a number or a string.
pub fn port(x: &Scalar) -> Result<u16, String> {
    let n = match x {
        Scalar::Int(i) => *i,
        Scalar::Str(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("`{s}` is not a port number"))?,
    };
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{n} is not a port number (1-65535)")),
    }
}

/// Istio's string forms: `*` (present), `abc*`, `*abc`, `abc`; empty is an error.
pub fn str_match(s: &str) -> Result<StrMatch, String> {
    Ok(if s == "*" {
        StrMatch::Present
    } else if let Some(rest) = s.strip_prefix('*') {
        StrMatch::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*') {
        StrMatch::Prefix(rest.to_string())
    } else if s.is_empty() {
        return Err("empty value; use `*` to require presence".into());
    } else {
        StrMatch::Exact(s.to_string())
    })
}

fn mode(m: &MtlsSpec, field: &str) -> FieldResult<Option<MtlsMode>> {
    match m.mode.as_deref().unwrap_or("UNSET") {
        "UNSET" | "" => Ok(None),
        "PERMISSIVE" => Ok(Some(MtlsMode::Permissive)),
        "STRICT" => Ok(Some(MtlsMode::Strict)),
        "DISABLE" => Ok(Some(MtlsMode::Disable)),
        other => Err((
            field.to_string(),
            format!("unknown mode `{other}` (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
        )),
    }
}

/// Compiles a `PeerAuthentication`; caveats to log come back with it. An invalid one is kept,
/// read as STRICT on every port (the strict reading: an invalid STRICT never becomes
/// PERMISSIVE), with [`PeerAuth::invalid`] set.
pub fn peer_authentication(obj: &PeerAuthenticationObject) -> (PeerAuth, Vec<Caveat>) {
    let mut caveats = Vec::new();
    let compiled = match &obj.spec_error {
        Some(e) => Err((e.field.clone(), e.message.clone())),
        None => peer_modes(obj, &mut caveats),
    };
    let (mode, ports, invalid) = match compiled {
        Ok((mode, ports)) => (mode, ports, None),
        Err((field, message)) => {
            caveats.clear();
            let e = SpecError { field, message };
            (Some(MtlsMode::Strict), BTreeMap::new(), Some(e))
        }
    };
    (
        PeerAuth {
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name: obj.metadata.name.clone(),
            selector: obj.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            mode,
            ports,
            invalid,
        },
        caveats,
    )
}

type Modes = (Option<MtlsMode>, BTreeMap<u16, MtlsMode>);

fn peer_modes(obj: &PeerAuthenticationObject, caveats: &mut Vec<Caveat>) -> FieldResult<Modes> {
    let spec = &obj.spec;
    let mut disable = |f: &str, m: Option<MtlsMode>| -> Option<MtlsMode> {
        if m == Some(MtlsMode::Disable) {
            caveats.push((
                f.to_string(),
                "DISABLE is ignored (the tunnel always uses mTLS); treated as unset".into(),
            ));
            None
        } else {
            m
        }
    };
    let whole = match &spec.mtls {
        Some(m) => mode(m, "spec.mtls.mode")?,
        None => None,
    };
    let whole = disable("spec.mtls.mode", whole);
    let mut ports = BTreeMap::new();
    if let Some(map) = &spec.port_level_mtls {
        if spec.selector.is_none() {
            return Err((
                "spec.portLevelMtls".into(),
                "needs a selector (ports are workload ports)".into(),
            ));
        }
        for (k, v) in map {
            let key = match k {
                serde_yaml_ng::Value::Number(n) => n.to_string(),
                serde_yaml_ng::Value::String(s) => s.clone(),
                _ => String::from("?"),
            };
            let field = format!("spec.portLevelMtls.{key}");
            let p = port(&Scalar::Str(key.clone())).map_err(|m| (field.clone(), m))?;
            let m: MtlsSpec = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                let at = e.path().to_string();
                let at = if at == "." {
                    field.clone()
                } else {
                    format!("{field}.{at}")
                };
                (at, e.into_inner().to_string())
            })?;
            let m = mode(&m, &format!("{field}.mode"))?;
            if let Some(m) = disable(&field, m) {
                ports.insert(p, m);
            }
        }
    }
    Ok((whole, ports))
}

impl Cidr {
    /// Parses `a.b.c.d`, `a.b.c.d/n` or the IPv6 forms.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: prefix length must be 0-{max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }
}
