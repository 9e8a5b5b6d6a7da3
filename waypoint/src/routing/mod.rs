//! The routing engine: which HTTPRoute rule a request to a Service takes, and where it goes.
//!
//! Pure: HTTPRoutes in, a [`RouteTable`] out, then one lookup per request; no sockets, no
//! clocks, and the random roll of the weighted pick is passed in, so every decision is
//! unit-tested.
//!
//! Precedence follows the Gateway API: across every rule of every route attached to the same
//! Service port, an exact path beats any prefix, a longer prefix beats a shorter one, then a
//! match with a method beats one without, then more header conditions, then more query
//! conditions; what is still tied goes to the oldest route (`creationTimestamp`), then by
//! `namespace/name`, then by rule and match order within the route. Regular-expression paths
//! (ordered as the API leaves to implementations) come after every prefix, longer patterns
//! first.

mod compile;
pub mod filters;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use regex::Regex;

pub use compile::RouteError;
use filters::Filter;

/// The request attributes routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path, without the query.
    pub path: &'a str,
    /// Raw query string (after `?`), if any.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// A backend of a rule: a Service, its port, its share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `namespace/name` of the Service (the form `state::Service::key` uses).
    pub service: String,
    /// Service port; the request's when absent.
    pub port: Option<u16>,
    /// Relative weight.
    pub weight: u32,
}

/// What to do with a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Response codes that get another attempt (connect failures always do).
    pub codes: Vec<u16>,
    /// Pause before each retry.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    /// Two retries on 503 and on connect failures: what Istio's sidecars and waypoints do
    /// when a route says nothing, so a rolling restart does not surface as errors.
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            codes: vec![503],
            backoff: Duration::from_millis(25),
        }
    }
}

/// A compiled rule: everything a matched request needs.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the route, for logs.
    pub route: String,
    /// Index of the rule in the route.
    pub index: usize,
    /// Filters in order.
    pub filters: Vec<Filter>,
    /// Backends with a positive weight.
    pub backends: Vec<Backend>,
    /// `timeouts.request`: the whole request, retries included.
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each attempt.
    pub attempt_timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Why the rule answers 500 instead of routing (an unsupported filter, say), if it does.
    pub invalid: Option<String>,
}

impl Rule {
    /// The backend for `roll` (uniform over `u32`): each backend gets a share of rolls
    /// proportional to its weight. `None` when the rule has no backend with weight.
    pub fn pick_backend(&self, roll: u32) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        // Scaled into [0, total): the share of rolls each backend gets is its weight.
        let mut at = ((u128::from(roll) * u128::from(total)) >> 32) as u64;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if at < w {
                return Some(b);
            }
            at -= w;
        }
        self.backends.last()
    }
}

/// The path condition of a match.
#[derive(Debug, Clone)]
enum PathCond {
    Exact(String),
    /// Stored without its trailing `/`; empty matches every path.
    Prefix(String),
    Regex(Regex),
}

/// A header or query value condition.
#[derive(Debug, Clone)]
enum ValueCond {
    Exact(String),
    Regex(Regex),
}

impl ValueCond {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueCond::Exact(e) => e == v,
            ValueCond::Regex(r) => r.is_match(v),
        }
    }
}

/// Orders entries: smaller sorts first, so wins. Field order is the precedence order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 0 exact, 1 prefix, 2 regular expression.
    path_kind: u8,
    /// Negated length of the prefix (or pattern).
    path_len: std::cmp::Reverse<usize>,
    has_method: std::cmp::Reverse<bool>,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    /// Routes without a timestamp sort after those with one.
    created: (bool, String),
    route: String,
    rule: usize,
    matched: usize,
}

/// One match of one rule, with its place in the order.
#[derive(Debug)]
struct Entry {
    precedence: Precedence,
    path: PathCond,
    method: Option<Method>,
    headers: Vec<(http::HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
    /// Service port the route's parentRef names, `None` for all ports.
    port: Option<u16>,
    rule: Arc<Rule>,
}

impl Entry {
    fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let path_ok = match &self.path {
            PathCond::Exact(p) => req.path == p,
            PathCond::Prefix(p) => prefix_matches(p, req.path),
            PathCond::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, cond)| {
                let values: Vec<&str> = req
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                !values.is_empty() && cond.matches(&values.join(","))
            })
            && self
                .query
                .iter()
                .all(|(name, cond)| query_value(req.query, name).is_some_and(|v| cond.matches(&v)))
    }
}

/// Whether `prefix` (without trailing `/`) matches `path` on segment boundaries.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// No route is attached to the Service port: send to the Service's own endpoints.
    NoRoutes,
    /// Routes are attached but none matches: 404, as the Gateway API asks.
    NoMatch,
    /// A rule matched.
    Matched(Matched),
}

/// A matched rule and what its path modifiers need.
#[derive(Debug, Clone)]
pub struct Matched {
    /// The rule.
    pub rule: Arc<Rule>,
    /// The prefix a `PathPrefix` match matched (without trailing `/`), for
    /// `ReplacePrefixMatch`.
    pub prefix: Option<String>,
}

/// Every attached rule, by Service, in precedence order.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_service: HashMap<String, Vec<Entry>>,
}

impl RouteTable {
    /// Compiles `routes` (those whose parentRefs are not Services are skipped). A match
    /// that cannot be compiled (a bad regular expression) is left out and reported; a rule
    /// with an unusable filter stays in the order but answers 500, as the API asks.
    pub fn build(routes: &[&ztunnel::k8s::gateway::HttpRoute]) -> (RouteTable, Vec<RouteError>) {
        let mut table = RouteTable::default();
        let mut errors = Vec::new();
        for route in routes {
            compile::route(route, &mut table.by_service, &mut errors);
        }
        for entries in table.by_service.values_mut() {
            entries.sort_by(|a, b| a.precedence.cmp(&b.precedence));
        }
        (table, errors)
    }

    /// The rule for a request to `service` (`namespace/name`) on `port`.
    pub fn lookup(&self, service: &str, port: u16, req: &RequestInfo<'_>) -> Lookup {
        let Some(entries) = self.by_service.get(service) else {
            return Lookup::NoRoutes;
        };
        let mut attached = false;
        for e in entries.iter().filter(|e| e.port.is_none_or(|p| p == port)) {
            attached = true;
            if e.matches(req) {
                let prefix = match &e.path {
                    PathCond::Prefix(p) => Some(p.clone()),
                    _ => None,
                };
                return Lookup::Matched(Matched {
                    rule: e.rule.clone(),
                    prefix,
                });
            }
        }
        if attached {
            Lookup::NoMatch
        } else {
            Lookup::NoRoutes
        }
    }

    /// Number of Services with routes attached.
    pub fn services(&self) -> usize {
        self.by_service.len()
    }

    /// The compiled table for the admin port's `/config_dump`: per Service, its matches in
    /// precedence order, each with the rule it leads to, so an operator sees which rule a
    /// request takes without reading every route.
    pub fn dump(&self) -> serde_json::Value {
        use serde_json::json;
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let value = |c: &ValueCond| match c {
            ValueCond::Exact(v) => json!({"exact": v}),
            ValueCond::Regex(r) => json!({"regex": r.as_str()}),
        };
        let mut services: Vec<_> = self.by_service.iter().collect();
        services.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = serde_json::Map::new();
        for (service, entries) in services {
            let list: Vec<_> = entries
                .iter()
                .map(|e| {
                    let r = &e.rule;
                    json!({
                        "route": r.route,
                        "rule": r.index,
                        "port": e.port,
                        "path": match &e.path {
                            PathCond::Exact(p) => json!({"exact": p}),
                            PathCond::Prefix(p) => json!({"prefix": format!("{p}/")}),
                            PathCond::Regex(re) => json!({"regex": re.as_str()}),
                        },
                        "method": e.method.as_ref().map(Method::as_str),
                        "headers": e.headers.iter()
                            .map(|(n, c)| json!({"name": n.as_str(), "value": value(c)}))
                            .collect::<Vec<_>>(),
                        "query": e.query.iter()
                            .map(|(n, c)| json!({"name": n, "value": value(c)}))
                            .collect::<Vec<_>>(),
                        "backends": r.backends.iter()
                            .map(|b| json!({"service": b.service, "port": b.port, "weight": b.weight}))
                            .collect::<Vec<_>>(),
                        "filters": r.filters.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
                        "timeout_ms": ms(r.timeout),
                        "backend_timeout_ms": ms(r.attempt_timeout),
                        "retry": {
                            "attempts": r.retry.attempts,
                            "codes": r.retry.codes,
                            "backoff_ms": r.retry.backoff.as_millis() as u64,
                        },
                        "invalid": r.invalid,
                    })
                })
                .collect();
            out.insert(service.clone(), serde_json::Value::Array(list));
        }
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests;
