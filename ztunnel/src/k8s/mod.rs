//! The Kubernetes object model: the subset of Kubernetes objects the daemon reads, typed once
//! and shared by every module that looks at cluster state.
//!
//! Only the fields the data plane needs are typed; everything else is ignored, so real cluster
//! dumps load as they are. [`core`] holds the core `v1` kinds (Namespace, Pod, Service),
//! [`security`] the `security.istio.io` policy kinds (AuthorizationPolicy, PeerAuthentication),
//! and [`gateway`] the Gateway API kinds of waypoints (Gateway, HTTPRoute). [`parse_file`] reads
//! them from multi-document YAML with file, document and field errors, [`from_json_text`] from the
//! JSON an API server sends; both go through one typed translation, so every source of cluster
//! state produces the same [`Object`]s.
//!
//! This module uses nothing else of the crate. What the objects mean (enrollment, endpoints,
//! compiled policies) is decided by `state` and `authz`, which build on it.

pub mod core;
pub mod gateway;
mod labels;
pub mod security;
mod yaml;

use std::collections::BTreeMap;

use serde::Deserialize;

pub use labels::{Interner, Labels, SharedStr};
pub use yaml::{parse_file, split_documents, ParseError};

/// Why one object sent by an API server does not fit its kind.
#[derive(Debug, Clone, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct ObjectError {
    /// Dotted path of the offending field, or `.` for the whole object.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Types one object of the kind `api`/`kind` from its JSON text, as an API server sends it.
/// The text is read once, straight into the typed object: fields the daemon does not use
/// (`managedFields`, container specs, status conditions) are skipped, not built, so typing an
/// object leaves almost nothing behind on the heap. Items of a list carry no `apiVersion` or
/// `kind`, so the caller names them.
pub fn from_json_text(api: &str, kind: &str, json: &str) -> Result<Option<Object>, ObjectError> {
    let mut de = serde_json::Deserializer::from_str(json);
    yaml::typed_object(api, kind, &mut de)
        .map_err(|(field, message)| ObjectError { field, message })
}

/// Object metadata the daemon uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Namespace (empty for cluster-scoped objects).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels; enrollment and selectors use them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Object UID, when the source has one.
    #[serde(default)]
    pub uid: Option<String>,
    /// Set once the object is being deleted (a terminating pod): it stops receiving new
    /// Service traffic, while its open flows finish.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    /// Owners (a pod's ReplicaSet, Job, StatefulSet…); telemetry derives the workload name
    /// from the controlling owner.
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    /// RFC 3339 creation time, when the source has one; the oldest HTTPRoute wins a
    /// precedence tie (the strings compare in time order, as the API server writes them).
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// `metadata.ownerReferences[]`: only what naming a workload needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// Owner kind, e.g. `ReplicaSet`.
    pub kind: String,
    /// Owner name, e.g. `reviews-v1-5d9f8c7b6`.
    pub name: String,
    /// Whether this owner is the managing controller.
    #[serde(default)]
    pub controller: Option<bool>,
}

/// Kubernetes `IntOrString`, used by `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    /// A port number.
    Int(u16),
    /// A named container port.
    String(String),
}

/// One object of a kind the daemon understands.
#[derive(Debug, Clone)]
pub enum Object {
    /// A namespace.
    Namespace(self::core::Namespace),
    /// A pod.
    Pod(self::core::Pod),
    /// A service.
    Service(self::core::Service),
    /// `security.istio.io` AuthorizationPolicy (validated further by `authz`).
    AuthorizationPolicy(security::AuthorizationPolicyObject),
    /// `security.istio.io` PeerAuthentication (validated further by `authz`).
    PeerAuthentication(security::PeerAuthenticationObject),
    /// Gateway API Gateway (a waypoint when its class is `istio-waypoint`).
    Gateway(gateway::Gateway),
    /// Gateway API HTTPRoute.
    HttpRoute(gateway::HttpRoute),
}

impl Object {
    /// The object's kind, as Kubernetes spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::PeerAuthentication(_) => "PeerAuthentication",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
        }
    }

    /// The object's metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
        }
    }
}
