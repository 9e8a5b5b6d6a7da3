//! `security.istio.io` kinds: `AuthorizationPolicy` and `PeerAuthentication`, in the shape
//! `kubectl get -o yaml` prints them.
//!
//! Values that have rules beyond their YAML type (actions, CIDRs, ports, modes) are kept as
//! text here and checked when `authz` compiles the policy. The spec's shape, on the other
//! hand, is read strictly: an unknown key (`principal:` for `principals:`) or a value of the
//! wrong type anywhere under `spec` does not fail the file and is not skipped; the object is
//! kept with a [`SpecError`] naming the field, and `authz` enforces it failing closed. A
//! policy whose spec cannot be read fully must never be read as a wider one. Only `spec` is
//! policed: `status`, `metadata` and anything else an API server adds are read leniently.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_yaml_ng::Value;

use super::ObjectMeta;

/// Why a policy's `spec` does not fit its schema (an unknown key, a value of the wrong type).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpecError {
    /// Dotted path of the offending field, from the object's root (`spec.rules[0].from[0]
    /// .source.principal`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

/// The object as it arrives: metadata typed, the spec kept raw to be typed strictly.
#[derive(Deserialize)]
struct Raw {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<Value>,
}

/// Reads an object's metadata and types its spec strictly; when the spec does not type, the
/// parts `lenient` can read on their own come back with the error.
fn typed_spec<'de, D, T>(
    d: D,
    lenient: impl FnOnce(&Value) -> T,
) -> Result<(ObjectMeta, T, Option<SpecError>), D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let raw = Raw::deserialize(d)?;
    Ok(match strict(raw.spec.clone()) {
        Ok(spec) => (raw.metadata, spec, None),
        Err(e) => {
            let spec = lenient(raw.spec.as_ref().unwrap_or(&Value::Null));
            (raw.metadata, spec, Some(e))
        }
    })
}

/// Types `spec` strictly; on failure returns the error with the path from the object root.
fn strict<T: serde::de::DeserializeOwned + Default>(spec: Option<Value>) -> Result<T, SpecError> {
    match spec {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            SpecError {
                field: if path == "." {
                    "spec".into()
                } else {
                    format!("spec.{path}")
                },
                message: shorter(e.into_inner().to_string()),
            }
        }),
    }
}

/// serde's unknown-field message lists every known field; name the closest one instead
/// (`unknown field `principal` (did you mean `principals`?)`), or keep the list when none is
/// close.
fn shorter(message: String) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((name, expected)) = rest.split_once('`') else {
        return message;
    };
    let known: Vec<&str> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|k| !k.is_empty())
        .collect();
    let close = known
        .iter()
        .map(|k| {
            (
                distance(&name.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(d, _)| *d <= 2)
        .min();
    match close {
        Some((_, k)) => format!("unknown field `{name}` (did you mean `{k}`?)"),
        None if known.is_empty() => format!("unknown field `{name}`"),
        None => format!("unknown field `{name}` (known: {})", known.join(", ")),
    }
}

/// Levenshtein distance, for the field-name suggestion.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The selector of a spec that did not type, if it can be read on its own; otherwise `None`,
/// which reads the policy as covering every workload of its scope (the safest reading).
fn lenient_selector(spec: &Value) -> Option<WorkloadSelector> {
    spec.get("selector")
        .and_then(|v| serde_yaml_ng::from_value(v.clone()).ok())
}

/// The text of `spec.<key>` when it is a string; `Some("?")` when present but not a string,
/// so that it reads as an unknown value (which fails closed).
fn lenient_str(spec: &Value, key: &str) -> Option<String> {
    match spec.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => Some("?".into()),
    }
}

/// `security.istio.io/v1` (or `v1beta1`) `AuthorizationPolicy`.
#[derive(Debug, Clone)]
pub struct AuthorizationPolicyObject {
    /// Name, namespace and annotations (`istio.io/dry-run`).
    pub metadata: ObjectMeta,
    /// The policy; an absent spec is the empty spec (an ALLOW that matches nothing). When
    /// [`Self::spec_error`] is set, only what could be read on its own is here: `action`,
    /// `selector` (absent when unreadable), `targetRef(s)`; no rules.
    pub spec: AuthorizationPolicySpec,
    /// Why the spec did not type; the policy then fails closed.
    pub spec_error: Option<SpecError>,
}

impl<'de> Deserialize<'de> for AuthorizationPolicyObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (metadata, spec, spec_error) = typed_spec(d, |v| AuthorizationPolicySpec {
            selector: lenient_selector(v),
            target_ref: v.get("targetRef").filter(|t| !t.is_null()).cloned(),
            target_refs: match v.get("targetRefs") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Sequence(s)) => s.clone(),
                Some(other) => vec![other.clone()],
            },
            // A spec that is not a mapping has no readable action: read as unknown.
            action: if v.is_mapping() {
                lenient_str(v, "action")
            } else {
                Some("?".into())
            },
            ..Default::default()
        })?;
        Ok(AuthorizationPolicyObject {
            metadata,
            spec,
            spec_error,
        })
    }
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Narrows the policy to workloads with these labels.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Attachment to a gateway or service: enforced by a waypoint, not here.
    #[serde(default)]
    pub target_ref: Option<Value>,
    /// Attachments to gateways or services: enforced by a waypoint, not here.
    #[serde(default)]
    pub target_refs: Vec<Value>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// Rules; absent and empty mean the same (no rule).
    #[serde(default)]
    pub rules: Option<Vec<RuleSpec>>,
    /// The external authorizer of a CUSTOM policy; none is configured, so it is not read.
    #[serde(default)]
    pub provider: Option<Value>,
}

/// `selector`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Every label must be present with this value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Sources (OR).
    #[serde(default)]
    pub from: Option<Vec<FromSpec>>,
    /// Operations (OR).
    #[serde(default)]
    pub to: Option<Vec<ToSpec>>,
    /// Conditions (AND).
    #[serde(default)]
    pub when: Option<Vec<ConditionSpec>>,
}

/// `from[]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    /// The source.
    #[serde(default)]
    pub source: SourceSpec,
}

/// `from[].source`: fields AND, values OR.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals: L7 (needs a request).
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    /// The operation.
    #[serde(default)]
    pub operation: OperationSpec,
}

/// `to[].operation`. Only ports are L4; the rest needs an HTTP request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(missing_docs)]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<Scalar>,
    #[serde(default)]
    pub not_ports: Vec<Scalar>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `when[]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    /// Attribute name (`source.ip`, `destination.port`, …).
    #[serde(default)]
    pub key: String,
    /// Matches when the attribute equals any of these.
    #[serde(default)]
    pub values: Vec<Scalar>,
    /// Matches when the attribute equals none of these.
    #[serde(default)]
    pub not_values: Vec<Scalar>,
}

/// A YAML scalar that may be written as a number or a string (`ports: [8080]` and
/// `ports: ["8080"]` are both seen in the wild).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// A number.
    Int(i64),
    /// A string.
    Str(String),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Str(s) => f.write_str(s),
        }
    }
}

/// `security.istio.io/v1` (or `v1beta1`) `PeerAuthentication`.
#[derive(Debug, Clone)]
pub struct PeerAuthenticationObject {
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The policy. When [`Self::spec_error`] is set, only the selector (when it can be read
    /// on its own) is here.
    pub spec: PeerAuthenticationSpec,
    /// Why the spec did not type; the policy is then read as STRICT.
    pub spec_error: Option<SpecError>,
}

impl<'de> Deserialize<'de> for PeerAuthenticationObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (metadata, spec, spec_error) = typed_spec(d, |v| PeerAuthenticationSpec {
            selector: lenient_selector(v),
            ..Default::default()
        })?;
        Ok(PeerAuthenticationObject {
            metadata,
            spec,
            spec_error,
        })
    }
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Narrows the policy to workloads with these labels.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Mode for all ports.
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Mode per workload port (keys are port numbers).
    #[serde(default)]
    pub port_level_mtls: Option<serde_yaml_ng::Mapping>,
}

/// `mtls` / `portLevelMtls.<port>`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    /// `UNSET`, `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default)]
    pub mode: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_messages_suggest_the_closest_name() {
        let m = "unknown field `principal`, expected one of `principals`, `notPrincipals`";
        assert_eq!(
            shorter(m.into()),
            "unknown field `principal` (did you mean `principals`?)"
        );
        let m = "unknown field `colour`, expected `key` or `values`";
        assert_eq!(
            shorter(m.into()),
            "unknown field `colour` (known: key, values)"
        );
        assert_eq!(shorter("invalid type: map".into()), "invalid type: map");
        assert_eq!(distance("ipBlock", "ipBlocks"), 1);
    }
}
