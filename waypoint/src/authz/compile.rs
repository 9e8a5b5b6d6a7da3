//! From the YAML shape ([`ztunnel::k8s::security`]) to the waypoint's [`Policy`]: which
//! policies are attached to a waypoint or Service, their L4 parts compiled by the node
//! daemon's own functions ([`ztunnel::authz::compile`]), their L7 parts here.
//!
//! Nothing here fails a whole policy set: a policy with a semantic error is kept, marked
//! [`Policy::invalid`], and fails closed when evaluated; what cannot be evaluated is recorded
//! in [`Rule::unsupported`] and made fail-safe.

use http::HeaderName;
use serde_yaml_ng::Value;
use ztunnel::authz::compile::{self as l4, FieldResult};
use ztunnel::authz::{Field, StrMatch};
use ztunnel::k8s::security::{AuthorizationPolicyObject, ConditionSpec, OperationSpec, Scalar};

use super::{Action, Condition, Operation, Policy, Rule, Target};

/// Group of the Gateway kind a waypoint is.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What compiling one policy found worth telling the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The policy is invalid; it stays attached and fails closed.
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Applied with a caveat (an attribute the waypoint cannot see, a target it ignores).
    Caveat(String),
}

/// Compiles `obj` when it is attached to a waypoint or Service; `None` for the node daemons'
/// policies (no target, or only targets of kinds a waypoint does not serve).
pub fn policy(obj: &AuthorizationPolicyObject) -> (Option<Policy>, Vec<Problem>) {
    let namespace = obj.metadata.namespace.clone().unwrap_or_default();
    let spec = &obj.spec;
    let mut problems = Vec::new();
    let refs: Vec<(String, &Value)> = spec
        .target_ref
        .iter()
        .map(|v| ("spec.targetRef".to_string(), v))
        .chain(
            spec.target_refs
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("spec.targetRefs[{i}]"), v)),
        )
        .collect();
    if refs.is_empty() {
        return (None, problems);
    }
    let mut targets = Vec::new();
    let mut unreadable = None;
    for (at, v) in refs {
        match target(v, &namespace) {
            Ok(Some(t)) => targets.push(t),
            Ok(None) => {
                // What it names cannot be read: the widest reading, every waypoint and
                // Service of the policy's namespace, and the policy fails closed.
                targets.push(Target::Namespace(namespace.clone()));
                unreadable.get_or_insert((
                    at,
                    "cannot be read (needs a mapping with a non-empty `name`); the policy \
                     applies to every waypoint and Service of its namespace"
                        .to_string(),
                ));
            }
            Err(why) => problems.push(Problem::Caveat(format!("{at} ignored: {why}"))),
        }
    }
    if targets.is_empty() {
        return (None, problems);
    }
    // Action, dry run and the checks both enforcement points share (the spec typed, unknown
    // keys included; a known action; no selector next to targetRefs) are the node daemon's.
    let head = l4::head(obj);
    let mut policy = Policy {
        namespace: namespace.clone(),
        name: obj.metadata.name.clone(),
        action: head.action,
        rules: Vec::new(),
        dry_run: head.dry_run,
        targets,
        invalid: None,
    };
    let mut invalid = head.invalid.map(|e| (e.field, e.message)).or(unreadable);
    if invalid.is_none() {
        let rules = spec
            .rules
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule(r, &format!("spec.rules[{i}]"), head.action))
            .collect::<FieldResult<Vec<_>>>();
        match rules {
            Ok(rules) => policy.rules = rules,
            Err(e) => invalid = Some(e),
        }
    }
    if let Some((field, message)) = invalid {
        if policy.action == Action::Audit {
            // AUDIT decides nothing: an invalid one is only reported.
            problems.push(Problem::Invalid { field, message });
            return (None, problems);
        }
        policy.invalid = Some(format!("field `{field}`: {message}"));
        policy.rules.clear();
        problems.push(Problem::Invalid { field, message });
        return (Some(policy), problems);
    }
    for (i, r) in policy.rules.iter().enumerate() {
        if r.unsupported.is_empty() {
            continue;
        }
        problems.push(Problem::Caveat(if r.never {
            format!(
                "spec.rules[{i}] uses {} which the waypoint cannot evaluate; this ALLOW rule \
                 matches nothing (fail closed)",
                r.unsupported.join(", ")
            )
        } else {
            format!(
                "spec.rules[{i}] uses {} which the waypoint cannot evaluate; they are taken as \
                 matched, so this {} rule applies to every request matching its other fields \
                 (fail closed)",
                r.unsupported.join(", "),
                policy.action.as_str()
            )
        }));
    }
    (Some(policy), problems)
}

/// A `targetRef`: a Gateway (the waypoint) or a Service, in the policy's own namespace;
/// `Ok(None)` when it cannot be read (not a mapping, no name); `Err` for a well-formed
/// reference this waypoint does not serve (another kind, another namespace).
fn target(v: &Value, namespace: &str) -> Result<Option<Target>, String> {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let Some(name) = s("name").filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if let Some(ns) = s("namespace").filter(|n| *n != namespace) {
        return Err(format!(
            "namespace `{ns}` is not the policy's own ({namespace})"
        ));
    }
    let key = format!("{namespace}/{name}");
    match (s("kind"), s("group")) {
        (Some("Gateway"), None | Some(GATEWAY_GROUP)) => Ok(Some(Target::Gateway(key))),
        (Some("Service"), None | Some("") | Some("core")) => Ok(Some(Target::Service(key))),
        (kind, group) => Err(format!(
            "kind `{}` in group `{}` is not attached to waypoints (Gateway in {GATEWAY_GROUP}, \
             or Service in the core group)",
            kind.unwrap_or(""),
            group.unwrap_or("")
        )),
    }
}

/// Compiles one rule. Unsupported fields are recorded; an ALLOW rule with any is `never`.
fn rule(r: &ztunnel::k8s::security::RuleSpec, at: &str, action: Action) -> FieldResult<Rule> {
    let mut unsupported = Vec::new();
    // The node's compiler reports requestPrincipals (JWT) as L7: unsupported here too.
    let (from, to, when) = l4::rule_parts(
        r,
        at,
        &mut unsupported,
        |f, at, u| Ok(l4::source(&f.source, at, u)?.unwrap_or_default()),
        |t, at, u| operation(&t.operation, at, u),
        condition,
    )?;
    let when = when.into_iter().flatten().collect();
    let never = action == Action::Allow && !unsupported.is_empty();
    Ok(Rule {
        from,
        to,
        when,
        unsupported,
        never,
    })
}

fn strs(
    v: &[String],
    at: &str,
    field: &str,
    f: impl Fn(&str) -> String,
) -> FieldResult<Vec<StrMatch>> {
    v.iter()
        .enumerate()
        .map(|(k, x)| l4::str_match(&f(x)).map_err(|m| (format!("{at}.{field}[{k}]"), m)))
        .collect()
}

/// Compiles an operation. Path templates (`{*}`, `{**}`) are not supported: the `paths` or
/// `notPaths` list holding one is left out and recorded.
fn operation(o: &OperationSpec, at: &str, unsupported: &mut Vec<String>) -> FieldResult<Operation> {
    let ports = |v: &[Scalar], f: &str| -> FieldResult<Vec<u16>> {
        v.iter()
            .enumerate()
            .map(|(k, x)| l4::port(x).map_err(|m| (format!("{at}.{f}[{k}]"), m)))
            .collect()
    };
    let same = |s: &str| s.to_string();
    let lower = |s: &str| s.to_ascii_lowercase();
    let mut paths = |v: &[String], f: &str| -> FieldResult<Vec<StrMatch>> {
        if v.iter().any(|p| p.contains('{') || p.contains('}')) {
            unsupported.push(format!("{at}.{f} (path template)"));
            return Ok(Vec::new());
        }
        strs(v, at, f, same)
    };
    let op = Operation {
        ports: Field::new(ports(&o.ports, "ports")?, ports(&o.not_ports, "notPorts")?),
        hosts: Field::new(
            strs(&o.hosts, at, "hosts", lower)?,
            strs(&o.not_hosts, at, "notHosts", lower)?,
        ),
        methods: Field::new(
            strs(&o.methods, at, "methods", same)?,
            strs(&o.not_methods, at, "notMethods", same)?,
        ),
        paths: Field::new(paths(&o.paths, "paths")?, paths(&o.not_paths, "notPaths")?),
    };
    let given = [
        o.ports.len() + o.not_ports.len(),
        o.hosts.len() + o.not_hosts.len(),
        o.methods.len() + o.not_methods.len(),
        o.paths.len() + o.not_paths.len(),
    ];
    if given.iter().all(|n| *n == 0) {
        return Err((at.to_string(), "must set at least one field".into()));
    }
    Ok(op)
}

/// `when` keys the node daemon's compiler handles.
const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Compiles a `when` condition; `None` for a key the waypoint cannot evaluate (recorded).
fn condition(
    c: &ConditionSpec,
    at: &str,
    unsupported: &mut Vec<String>,
) -> FieldResult<Option<Condition>> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((at.to_string(), "must set values or notValues".into()));
    }
    let key = c.key.as_str();
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            (
                format!("{at}.key"),
                format!("`{name}` is not a header name"),
            )
        })?;
        let vals = |list: &[Scalar], f: &str| -> FieldResult<Vec<StrMatch>> {
            let text: Vec<String> = list.iter().map(ToString::to_string).collect();
            strs(&text, at, f, |s| s.to_string())
        };
        return Ok(Some(Condition::Header {
            name: header.as_str().to_string(),
            values: Field::new(
                vals(&c.values, "values")?,
                vals(&c.not_values, "notValues")?,
            ),
        }));
    }
    if key.starts_with("request.auth.")
        || key.starts_with("experimental.")
        || key == "connection.sni"
    {
        // JWT claims need request authentication, which the waypoint does not do; the SNI of
        // the application's own TLS and Envoy-specific attributes are not seen either.
        unsupported.push(format!("{at}.key={key}"));
        return Ok(None);
    }
    if L4_KEYS.contains(&key) {
        let mut l7 = Vec::new();
        return Ok(l4::condition(c, at, &mut l7)?.map(Condition::L4));
    }
    if key.is_empty() {
        return Err((format!("{at}.key"), "is required".into()));
    }
    Err((
        format!("{at}.key"),
        format!(
            "unknown key `{key}` (supported: request.headers[<name>], {}; request.auth.*, \
             connection.sni and experimental.* are recognised but not evaluated)",
            L4_KEYS.join(", ")
        ),
    ))
}
