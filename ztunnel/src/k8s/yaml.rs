//! Multi-document YAML in the shape `kubectl get -o yaml` prints (single objects or
//! `kind: List`) to [`Object`]s.
//!
//! A document that does not fit is reported with the file, its 0-based document index and the
//! path of the offending field, which is what an operator needs to fix it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::core::{Pod, Service};
use super::gateway::{validate_route, Gateway, HttpRoute};
use super::security::{AuthorizationPolicyObject, PeerAuthenticationObject};
use super::{IntOrString, Object, ObjectMeta};

/// Why a document was rejected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: document {document}: field `{field}`: {message}", file.display())]
pub struct ParseError {
    /// File the document came from.
    pub file: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    /// Dotted path of the offending field (`spec.ports[0].port`), or `.` for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Parses every document of one file. Kinds the daemon does not use are skipped; the first
/// document that does not parse fails the whole file, so a half-applied file never happens.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<Object>, ParseError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let err = |field: String, message: String| ParseError {
            file: file.to_path_buf(),
            document: index,
            field,
            message,
        };
        let value = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|e| err(".".into(), format!("not valid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind == "List" {
            let items = match value.get("items") {
                Some(serde_yaml_ng::Value::Sequence(items)) => items.clone(),
                None | Some(serde_yaml_ng::Value::Null) => Vec::new(),
                Some(_) => return Err(err("items".into(), "must be a list".into())),
            };
            for (i, item) in items.into_iter().enumerate() {
                if let Some(obj) =
                    parse_object(item).map_err(|(f, m)| err(format!("items[{i}].{f}"), m))?
                {
                    out.push(obj);
                }
            }
        } else if let Some(obj) = parse_object(value).map_err(|(f, m)| err(f, m))? {
            out.push(obj);
        }
    }
    Ok(out)
}

/// The YAML documents of a file, each as its own text (starting with its `---` marker), split
/// where a line starts a document (`---` alone or followed by a space or tab: YAML forbids
/// such a line inside a document). What lets the file source parse only the documents that
/// changed; each parses with [`parse_file`] to what the whole file gives for it. Text before
/// the first marker is a document only if it holds more than blank lines and comments.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && offset > 0 {
            out.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    out.push(&text[start..]);
    let blank = |t: &str| {
        t.lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    };
    if out.len() > 1 && blank(out[0]) {
        out.remove(0);
    }
    out
}

type FieldError = (String, String);

fn parse_object(value: serde_yaml_ng::Value) -> Result<Option<Object>, FieldError> {
    let kind = match value.get("kind") {
        Some(serde_yaml_ng::Value::String(k)) => k.clone(),
        _ => return Err(("kind".into(), "missing or not a string".into())),
    };
    let api = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    typed_object(&api, &kind, value)
}

/// Types one object of kind `api`/`kind` from any self-describing value (a YAML document of a
/// state file, or the JSON an API server sent): the one translation every source shares.
/// `Ok(None)` for kinds the daemon does not use.
pub(super) fn typed_object<'de, D>(
    api: &str,
    kind: &str,
    value: D,
) -> Result<Option<Object>, FieldError>
where
    D: serde::Deserializer<'de>,
{
    let obj = match (api, kind) {
        ("v1", "Namespace") => Object::Namespace(typed(value)?),
        ("v1", "Pod") => {
            let pod: Pod = typed(value)?;
            require_namespace(&pod.metadata)?;
            Object::Pod(pod)
        }
        ("v1", "Service") => {
            let svc: Service = typed(value)?;
            require_namespace(&svc.metadata)?;
            check_service(&svc)?;
            Object::Service(svc)
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
            let p: AuthorizationPolicyObject = typed(value)?;
            require_namespace(&p.metadata)?;
            Object::AuthorizationPolicy(p)
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
            let p: PeerAuthenticationObject = typed(value)?;
            require_namespace(&p.metadata)?;
            Object::PeerAuthentication(p)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
            let g: Gateway = typed(value)?;
            require_namespace(&g.metadata)?;
            Object::Gateway(g)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            let r: HttpRoute = typed(value)?;
            require_namespace(&r.metadata)?;
            validate_route(&r)?;
            Object::HttpRoute(r)
        }
        _ => {
            tracing::debug!(
                kind,
                api,
                "skipping object of a kind the daemon does not use"
            );
            return Ok(None);
        }
    };
    Ok(Some(obj))
}

fn typed<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(value: D) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        (path, e.into_inner().to_string())
    })
}

fn require_namespace(meta: &ObjectMeta) -> Result<(), FieldError> {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => Ok(()),
        _ => Err(("metadata.namespace".into(), "is required".into())),
    }
}

fn check_service(svc: &Service) -> Result<(), FieldError> {
    let vips = svc
        .spec
        .cluster_ip
        .iter()
        .chain(&svc.spec.cluster_ips)
        .enumerate();
    for (i, ip) in vips {
        if ip.is_empty() || ip == "None" || ip.parse::<IpAddr>().is_ok() {
            continue;
        }
        let field = if i == 0 && svc.spec.cluster_ip.is_some() {
            "spec.clusterIP".to_string()
        } else {
            format!(
                "spec.clusterIPs[{}]",
                i - usize::from(svc.spec.cluster_ip.is_some())
            )
        };
        return Err((field, format!("`{ip}` is not an IP address or `None`")));
    }
    for (i, p) in svc.spec.ports.iter().enumerate() {
        if p.port == 0 {
            return Err((format!("spec.ports[{i}].port"), "must not be 0".into()));
        }
        if p.target_port == Some(IntOrString::Int(0)) {
            return Err((
                format!("spec.ports[{i}].targetPort"),
                "must not be 0".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: demo, labels: {app: a}}
  spec: {nodeName: node1, serviceAccountName: sa, containers: [{ports: [{name: http, containerPort: 8080}]}]}
  status: {podIP: 10.244.1.11, phase: Running}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ignored, namespace: demo}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: demo}
spec: {clusterIP: 10.96.0.10, selector: {app: a}, ports: [{port: 80, targetPort: http}]}
"#;

    #[test]
    fn parses_kinds_and_lists() {
        let objs = parse_file(Path::new("x.yaml"), GOOD).expect("parses");
        assert_eq!(objs.len(), 3);
        let Object::Service(svc) = &objs[2] else {
            panic!("third object is the service")
        };
        assert_eq!(
            svc.spec.ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let bad = GOOD.replace("port: 80", "port: abc");
        let e = parse_file(Path::new("/s/x.yaml"), &bad).expect_err("bad port");
        assert_eq!(e.document, 2);
        assert_eq!(e.field, "spec.ports[0].port");
        assert!(e
            .to_string()
            .starts_with("/s/x.yaml: document 2: field `spec.ports[0].port`"));

        let bad = GOOD.replace("podIP: 10.244.1.11", "podIP: 10.244.1");
        let e = parse_file(Path::new("x.yaml"), &bad).expect_err("bad ip");
        assert_eq!((e.document, e.field.as_str()), (1, "items[0].status.podIP"));

        let bad = GOOD.replace("clusterIP: 10.96.0.10", "clusterIP: ten");
        let e = parse_file(Path::new("x.yaml"), &bad).expect_err("bad vip");
        assert_eq!(e.field, "spec.clusterIP");

        let e = parse_file(Path::new("x.yaml"), "a: [1,\n").expect_err("syntax");
        assert_eq!((e.document, e.field.as_str()), (0, "."));
    }

    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: demo, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-version, value: v2}]
      queryParams: [{type: RegularExpression, name: debug, value: "1|true"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-c]}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs: [{name: reviews-v2, port: 9080, weight: 10}]
    timeouts: {request: 1500ms}
    retry: {codes: [503], attempts: 2, backoff: 10ms}
"#;

    #[test]
    fn gateway_api_kinds_parse_with_defaults() {
        use crate::k8s::gateway::{PathMatchType, WaypointFor};
        let objs = parse_file(Path::new("r.yaml"), ROUTES).expect("parses");
        let Object::Gateway(gw) = &objs[0] else {
            panic!("first object is the gateway")
        };
        assert!(gw.is_waypoint());
        assert_eq!(gw.waypoint_for(), WaypointFor::Service);
        assert_eq!(gw.spec.listeners[0].port, 15008);
        let Object::HttpRoute(r) = &objs[1] else {
            panic!("second object is the route")
        };
        assert!(r.spec.parent_refs[0].is_service());
        assert_eq!(
            r.metadata.creation_timestamp.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        let rule = &r.spec.rules[0];
        let path = rule.matches[0].path.as_ref().expect("path");
        assert_eq!(path.kind, PathMatchType::PathPrefix);
        assert_eq!(rule.backend_refs[0].weight, 10);
        let timeouts = rule.timeouts.as_ref().expect("timeouts");
        assert_eq!(
            timeouts.request,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(rule.retry.as_ref().and_then(|r| r.attempts), Some(2));
    }

    #[test]
    fn route_errors_name_the_field() {
        let cases = [
            (
                "value: /api}",
                "value: api}",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "request: 1500ms",
                "request: 1.5s",
                "spec.rules[0].timeouts.request",
            ),
            (
                "type: RequestHeaderModifier\n",
                "type: RequestHeaderModifier\n      x: {}\n",
                "",
            ),
            (
                "requestHeaderModifier: {set",
                "responseHeaderModifier: {set",
                "spec.rules[0].filters[0].requestHeaderModifier",
            ),
            (
                "type: PathPrefix, value: /api",
                "type: Exact, value: /api",
                "spec.rules[0].filters[1].urlRewrite.path.type",
            ),
            (
                "weight: 10",
                "weight: -1",
                "spec.rules[0].backendRefs[0].weight",
            ),
        ];
        for (from, to, field) in cases {
            let bad = ROUTES.replace(from, to);
            match parse_file(Path::new("r.yaml"), &bad) {
                Err(e) => assert_eq!((e.document, e.field.as_str()), (1, field), "{to}"),
                Ok(_) => assert!(field.is_empty(), "{to} should be rejected"),
            }
        }
    }

    #[test]
    fn split_documents_matches_the_documents_of_the_whole_file() {
        let text =
            "# header\n\n---\na: 1\n---   \n---\tb: 2\nc: |\n  --- not a marker\n--- {d: 3}\n";
        let docs = super::split_documents(text);
        assert_eq!(
            docs,
            [
                "---\na: 1\n",
                "---   \n",
                "---\tb: 2\nc: |\n  --- not a marker\n",
                "--- {d: 3}\n"
            ]
        );
        assert_eq!(
            super::split_documents("a: 1\n---\nb: 2"),
            ["a: 1\n", "---\nb: 2"]
        );
        assert_eq!(super::split_documents("{\"a\": 1}"), ["{\"a\": 1}"]);
    }
}
