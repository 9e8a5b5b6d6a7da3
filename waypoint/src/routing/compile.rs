//! HTTPRoute objects to [`Entry`]s: regular expressions compiled, header names checked,
//! filters and backends resolved to their Service keys, each match given its precedence.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, Method};
use regex::Regex;
use ztunnel::k8s::gateway::{
    HttpRoute, HttpRouteMatch, HttpRouteRule, PathMatchType, ValueMatch, ValueMatchType,
};

use super::filters::{self, Filter};
use super::{Backend, Entry, PathCond, Precedence, RetryPolicy, Rule, ValueCond};

/// A part of a route the waypoint could not use, named like a load-time field error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("HTTPRoute {route}: field `{field}`: {message}")]
pub struct RouteError {
    /// `namespace/name`.
    pub route: String,
    /// Path of the field.
    pub field: String,
    /// What is wrong, and what the waypoint does instead.
    pub message: String,
}

/// Adds the entries of `route` to `out`, keyed by the `namespace/name` of each Service parent.
pub(super) fn route(
    route: &HttpRoute,
    out: &mut HashMap<String, Vec<Entry>>,
    errors: &mut Vec<RouteError>,
) {
    let ns = route.metadata.namespace.clone().unwrap_or_default();
    let key = format!("{ns}/{}", route.metadata.name);
    let parents: Vec<(String, Option<u16>)> = route
        .spec
        .parent_refs
        .iter()
        .filter(|p| p.is_service())
        .map(|p| {
            let pns = p.namespace.clone().unwrap_or_else(|| ns.clone());
            (format!("{pns}/{}", p.name), p.port)
        })
        .collect();
    if parents.is_empty() {
        return;
    }
    let created = match &route.metadata.creation_timestamp {
        Some(t) => (false, t.clone()),
        None => (true, String::new()),
    };
    let default_match = [HttpRouteMatch::default()];
    for (r, spec) in route.spec.rules.iter().enumerate() {
        let mut err = |field: String, message: String| {
            errors.push(RouteError {
                route: key.clone(),
                field: format!("spec.rules[{r}].{field}"),
                message,
            })
        };
        let rule = Arc::new(rule(&key, &ns, r, spec, &mut err));
        let matches = if spec.matches.is_empty() {
            &default_match[..]
        } else {
            &spec.matches[..]
        };
        for (m, spec_match) in matches.iter().enumerate() {
            let Some(compiled) = compile_match(spec_match, |f, msg| {
                err(
                    format!("matches[{m}].{f}"),
                    format!("{msg}; match left out"),
                )
            }) else {
                continue;
            };
            let (path, path_kind, path_len, method, headers, query) = compiled;
            for (parent, port) in &parents {
                let precedence = Precedence {
                    path_kind,
                    path_len: Reverse(path_len),
                    has_method: Reverse(method.is_some()),
                    headers: Reverse(headers.len()),
                    query: Reverse(query.len()),
                    created: created.clone(),
                    route: key.clone(),
                    rule: r,
                    matched: m,
                };
                out.entry(parent.clone()).or_default().push(Entry {
                    precedence,
                    path: path.clone(),
                    method: method.clone(),
                    headers: headers.clone(),
                    query: query.clone(),
                    port: *port,
                    rule: rule.clone(),
                });
            }
        }
    }
}

type CompiledMatch = (
    PathCond,
    u8,
    usize,
    Option<Method>,
    Vec<(HeaderName, ValueCond)>,
    Vec<(String, ValueCond)>,
);

fn compile_match(m: &HttpRouteMatch, mut err: impl FnMut(String, String)) -> Option<CompiledMatch> {
    let (path, kind, len) = match &m.path {
        None => (PathCond::Prefix(String::new()), 1, 0),
        Some(p) => match p.kind {
            PathMatchType::Exact => (PathCond::Exact(p.value.clone()), 0, p.value.len()),
            PathMatchType::PathPrefix => {
                let trimmed = p.value.trim_end_matches('/').to_string();
                let len = trimmed.len();
                (PathCond::Prefix(trimmed), 1, len)
            }
            PathMatchType::RegularExpression => match whole(&p.value) {
                Ok(r) => (PathCond::Regex(r), 2, p.value.len()),
                Err(e) => {
                    err("path.value".into(), e);
                    return None;
                }
            },
        },
    };
    let method = match &m.method {
        None => None,
        Some(s) => match Method::from_bytes(s.as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                err("method".into(), format!("`{s}` is not an HTTP method"));
                return None;
            }
        },
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            err(
                format!("headers[{i}].name"),
                format!("`{}` is not a header name", h.name),
            );
            return None;
        };
        // Only the first condition on a name counts.
        if headers.iter().any(|(n, _)| n == name) {
            continue;
        }
        headers.push((
            name,
            value_cond(h)
                .map_err(|e| err(format!("headers[{i}].value"), e))
                .ok()?,
        ));
    }
    let mut query = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        if query.iter().any(|(n, _)| n == &q.name) {
            continue;
        }
        let cond = value_cond(q)
            .map_err(|e| err(format!("queryParams[{i}].value"), e))
            .ok()?;
        query.push((q.name.clone(), cond));
    }
    Some((path, kind, len, method, headers, query))
}

fn value_cond(v: &ValueMatch) -> Result<ValueCond, String> {
    Ok(match v.kind {
        ValueMatchType::Exact => ValueCond::Exact(v.value.clone()),
        ValueMatchType::RegularExpression => ValueCond::Regex(whole(&v.value)?),
    })
}

/// A regular expression that must match the whole input.
fn whole(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regular expression: {e}"))
}

fn rule(
    key: &str,
    ns: &str,
    index: usize,
    spec: &HttpRouteRule,
    err: &mut impl FnMut(String, String),
) -> Rule {
    let mut invalid = None;
    let mut filters = Vec::new();
    for (f, filter) in spec.filters.iter().enumerate() {
        match filters::compile(filter) {
            Ok(compiled) => filters.push(compiled),
            Err(e) => {
                err(
                    format!("filters[{f}]"),
                    format!("{e}; the rule answers 500"),
                );
                invalid.get_or_insert(e);
            }
        }
    }
    let mut backends = Vec::new();
    for (b, backend) in spec.backend_refs.iter().enumerate() {
        let kind_ok = backend.kind.as_deref().is_none_or(|k| k == "Service")
            && matches!(backend.group.as_deref(), None | Some("") | Some("core"));
        if !kind_ok {
            err(
                format!("backendRefs[{b}]"),
                "only Service backends are supported; its share answers 500".into(),
            );
        }
        if backend.weight == 0 {
            continue;
        }
        let bns = backend.namespace.as_deref().unwrap_or(ns);
        backends.push(Backend {
            // An unsupported kind keeps its share, and a key no Service has, so its share of
            // requests fails as the API asks rather than moving to the other backends.
            service: if kind_ok {
                format!("{bns}/{}", backend.name)
            } else {
                format!("unsupported:{bns}/{}", backend.name)
            },
            port: backend.port,
            weight: backend.weight,
        });
    }
    let redirects = filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
    if backends.is_empty() && !redirects && invalid.is_none() && !spec.backend_refs.is_empty() {
        // Every backend has weight 0: the API says such a rule answers 500.
        invalid = Some("every backend has weight 0".into());
    }
    let timeouts = spec.timeouts.clone().unwrap_or_default();
    let retry = match &spec.retry {
        None => RetryPolicy::default(),
        Some(r) => RetryPolicy {
            attempts: r.attempts.unwrap_or(RetryPolicy::default().attempts),
            codes: if r.codes.is_empty() {
                RetryPolicy::default().codes
            } else {
                r.codes.clone()
            },
            backoff: r.backoff.unwrap_or(RetryPolicy::default().backoff),
        },
    };
    Rule {
        route: key.to_string(),
        index,
        filters,
        backends,
        timeout: timeouts.request.filter(|d| !d.is_zero()),
        attempt_timeout: timeouts.backend_request.filter(|d| !d.is_zero()),
        retry,
        invalid,
    }
}
