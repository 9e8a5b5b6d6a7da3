//! `security.istio.io` kinds: `AuthorizationPolicy` and `PeerAuthentication`, in the shape
//! `kubectl get -o yaml` prints them.
//!
//! These types are deliberately lenient: every value that has rules beyond its YAML type
//! (actions, CIDRs, ports, modes) is kept as text here and checked when `authz` compiles the
//! policy, so a semantically wrong policy is dropped on its own with its name and field,
//! instead of failing the whole file the way a YAML type error does.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ObjectMeta;

/// `security.istio.io/v1` (or `v1beta1`) `AuthorizationPolicy`.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthorizationPolicyObject {
    /// Name, namespace and annotations (`istio.io/dry-run`).
    pub metadata: ObjectMeta,
    /// The policy; an absent spec is the empty spec (an ALLOW that matches nothing).
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Narrows the policy to workloads with these labels.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Attachment to a gateway or service: enforced by a waypoint, not here.
    #[serde(default)]
    pub target_ref: Option<serde_yaml_ng::Value>,
    /// Attachments to gateways or services: enforced by a waypoint, not here.
    #[serde(default)]
    pub target_refs: Vec<serde_yaml_ng::Value>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// Rules; absent and empty mean the same (no rule).
    #[serde(default)]
    pub rules: Option<Vec<RuleSpec>>,
}

/// `selector`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Every label must be present with this value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: `from` AND `to` AND `when`.
#[derive(Debug, Clone, Default, Deserialize)]
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
pub struct FromSpec {
    /// The source.
    #[serde(default)]
    pub source: SourceSpec,
}

/// `from[].source`: fields AND, values OR.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
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
pub struct ToSpec {
    /// The operation.
    #[serde(default)]
    pub operation: OperationSpec,
}

/// `to[].operation`. Only ports are L4; the rest needs an HTTP request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
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
#[serde(rename_all = "camelCase")]
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
#[derive(Debug, Clone, Deserialize)]
pub struct PeerAuthenticationObject {
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
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
pub struct MtlsSpec {
    /// `UNSET`, `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default)]
    pub mode: Option<String>,
}
