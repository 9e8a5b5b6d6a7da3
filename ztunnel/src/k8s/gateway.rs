//! Gateway API kinds (`gateway.networking.k8s.io`): `Gateway`, which names a waypoint, and
//! `HTTPRoute`, which routes HTTP requests to a Service's backends (GAMMA: a route whose
//! parent is a Service applies to traffic addressed to that Service).
//!
//! Only the fields a waypoint acts on are typed. Values that serde cannot check on its own
//! (a filter whose `type` names a field that is missing, a path that does not start with `/`,
//! a duration out of the API's grammar) are checked by [`validate_route`], so a bad route is
//! rejected at load time with the path of the offending field, like every other kind.
//! Regular expressions are compiled by the waypoint, which owns the regex engine.

use std::time::Duration;

use serde::Deserialize;

use super::ObjectMeta;

/// `gatewayClassName` of a waypoint Gateway.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Gateway label saying which traffic the waypoint serves.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";

/// `gateway.networking.k8s.io/v1` Gateway.
#[derive(Debug, Clone, Deserialize)]
pub struct Gateway {
    /// Metadata; labels carry [`WAYPOINT_FOR_LABEL`].
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: GatewaySpec,
}

/// The parts of a Gateway spec a waypoint needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// `istio-waypoint` for a waypoint; other classes belong to other controllers.
    pub gateway_class_name: String,
    /// Listeners; a waypoint has one on 15008 with protocol `HBONE`.
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

/// A Gateway listener.
#[derive(Debug, Clone, Deserialize)]
pub struct Listener {
    /// Listener name, the `sectionName` routes may attach to.
    pub name: String,
    /// Port.
    pub port: u16,
    /// `HBONE`, `HTTP`, `TCP`, ….
    pub protocol: String,
}

/// Which traffic a waypoint serves (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic addressed to Services (the default).
    Service,
    /// Traffic addressed to pods directly.
    Workload,
    /// Both.
    All,
    /// Neither (the Gateway exists but takes no traffic).
    None,
}

impl Gateway {
    /// Whether this Gateway is a waypoint (its class is [`WAYPOINT_CLASS`]).
    pub fn is_waypoint(&self) -> bool {
        self.spec.gateway_class_name == WAYPOINT_CLASS
    }

    /// The `istio.io/waypoint-for` label; absent or unknown values mean `service`, so a typo
    /// never widens what the waypoint takes.
    pub fn waypoint_for(&self) -> WaypointFor {
        match self
            .metadata
            .labels
            .get(WAYPOINT_FOR_LABEL)
            .map(String::as_str)
        {
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            _ => WaypointFor::Service,
        }
    }
}

/// `gateway.networking.k8s.io/v1` HTTPRoute.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpRoute {
    /// Metadata; `creationTimestamp` breaks precedence ties between routes.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: HttpRouteSpec,
}

/// The routing part of an HTTPRoute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// What the route attaches to: a Service (GAMMA) or a Gateway.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names; ignored for Service parents, where the Service is the host.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, in the order that breaks ties inside one route.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// `parentRefs[]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// API group; `""` (core) for a Service, `gateway.networking.k8s.io` (the default) for
    /// a Gateway.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` or `Gateway` (the default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Parent name.
    pub name: String,
    /// Parent namespace; defaults to the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Listener name of a Gateway parent.
    #[serde(default)]
    pub section_name: Option<String>,
    /// Service port the route applies to; all ports when absent.
    #[serde(default)]
    pub port: Option<u16>,
}

impl ParentRef {
    /// Whether the parent is a Service (GAMMA): kind `Service` in the core group.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), None | Some("") | Some("core"))
    }
}

/// One rule: when it matches, what it does, where it sends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these matches selects the rule; none at all means every request (prefix `/`).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied to matched requests, in order.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retry policy (Gateway API's experimental `retry` field).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

/// A match: every condition given must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path condition; `PathPrefix /` when absent.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Header conditions (names case-insensitive).
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions (names case-sensitive).
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// HTTP method.
    #[serde(default)]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Debug, Clone, Deserialize)]
pub struct PathMatch {
    /// How `value` is compared.
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    /// The path, prefix or expression; `/` when absent.
    #[serde(default = "slash")]
    pub value: String,
}

fn slash() -> String {
    "/".into()
}

/// Path match types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum PathMatchType {
    /// The whole path.
    Exact,
    /// Whole path segments: `/a` matches `/a` and `/a/b`, not `/ab`.
    #[default]
    PathPrefix,
    /// A regular expression over the whole path.
    RegularExpression,
}

/// A header or query parameter condition.
#[derive(Debug, Clone, Deserialize)]
pub struct ValueMatch {
    /// How `value` is compared.
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    /// Header or parameter name.
    pub name: String,
    /// Value or expression.
    pub value: String,
}

/// Header and query parameter match types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ValueMatchType {
    /// Equal values.
    #[default]
    Exact,
    /// A regular expression over the whole value.
    RegularExpression,
}

/// `filters[]`: the `type` names which of the other fields applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`, or
    /// a type the waypoint does not implement (the rule then answers 500, as the API asks).
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// For `URLRewrite`.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
}

/// Header edits: set (replace), add (append), remove.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HeaderModifier {
    /// Headers replaced or created.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Headers appended.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Header names removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, Deserialize)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A redirect answered by the waypoint itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`; the request's when absent.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host; the request's when absent.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change; the request's path when absent.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port; the scheme's default when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// 301 or 302 (the default).
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// A rewrite of the forwarded request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UrlRewrite {
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// Which replacement.
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch` (only with a `PathPrefix` match).
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// Path modifier types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PathModifierType {
    /// Replace the whole path.
    ReplaceFullPath,
    /// Replace the part the `PathPrefix` match matched.
    ReplacePrefixMatch,
}

/// `backendRefs[]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// API group (core for Services).
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (the default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Backend name.
    pub name: String,
    /// Backend namespace; defaults to the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative share of requests; 1 when absent, 0 sends none.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `timeouts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included; 504 when it passes.
    #[serde(default, deserialize_with = "api_duration")]
    pub request: Option<Duration>,
    /// Each attempt to a backend.
    #[serde(default, deserialize_with = "api_duration")]
    pub backend_request: Option<Duration>,
}

/// `retry`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpRouteRetry {
    /// Response codes worth another attempt (connect failures always are).
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Pause before each retry.
    #[serde(default, deserialize_with = "api_duration")]
    pub backoff: Option<Duration>,
}

/// Parses the Gateway API duration form: one to four `<digits><unit>` parts, units `h`, `m`,
/// `s`, `ms` (`1h30m`, `500ms`, `0s`).
pub fn parse_api_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration like `10s`, `500ms` or `1h30m`");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.as_bytes().first() {
                Some(b'h') => (Duration::from_secs(3600), 1),
                Some(b'm') => (Duration::from_secs(60), 1),
                Some(b's') => (Duration::from_secs(1), 1),
                _ => return Err(bad()),
            }
        };
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        rest = &rest[len..];
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

fn api_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_api_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// Checks what the types alone cannot: each filter carries the field its `type` names, paths
/// start with `/`, `ReplacePrefixMatch` only follows a prefix match, redirect codes are 301
/// or 302. Returns the offending field's path and what is wrong.
pub fn validate_route(route: &HttpRoute) -> Result<(), (String, String)> {
    for (p, parent) in route.spec.parent_refs.iter().enumerate() {
        if parent.name.is_empty() {
            return Err((format!("spec.parentRefs[{p}].name"), "is required".into()));
        }
    }
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = |f: String| format!("spec.rules[{r}].{f}");
        let mut prefix_only = !rule.matches.is_empty();
        for (m, mat) in rule.matches.iter().enumerate() {
            if let Some(path) = &mat.path {
                if path.kind != PathMatchType::RegularExpression && !path.value.starts_with('/') {
                    return Err((
                        at(format!("matches[{m}].path.value")),
                        "must start with `/`".into(),
                    ));
                }
                prefix_only &= path.kind == PathMatchType::PathPrefix;
            }
        }
        if rule.matches.iter().all(|m| m.path.is_none()) {
            prefix_only = true;
        }
        for (f, filter) in rule.filters.iter().enumerate() {
            let at = |field: &str| at(format!("filters[{f}].{field}"));
            let (field, present, path) = match filter.kind.as_str() {
                "RequestHeaderModifier" => (
                    "requestHeaderModifier",
                    filter.request_header_modifier.is_some(),
                    None,
                ),
                "ResponseHeaderModifier" => (
                    "responseHeaderModifier",
                    filter.response_header_modifier.is_some(),
                    None,
                ),
                "RequestRedirect" => {
                    let code = filter.request_redirect.as_ref().and_then(|r| r.status_code);
                    if !matches!(code, None | Some(301) | Some(302)) {
                        return Err((
                            at("requestRedirect.statusCode"),
                            "must be 301 or 302".into(),
                        ));
                    }
                    (
                        "requestRedirect",
                        filter.request_redirect.is_some(),
                        filter
                            .request_redirect
                            .as_ref()
                            .and_then(|r| r.path.as_ref()),
                    )
                }
                "URLRewrite" => (
                    "urlRewrite",
                    filter.url_rewrite.is_some(),
                    filter.url_rewrite.as_ref().and_then(|r| r.path.as_ref()),
                ),
                _ => continue,
            };
            if !present {
                return Err((at(field), format!("is required for type {}", filter.kind)));
            }
            if let Some(path) = path {
                let (name, value) = match path.kind {
                    PathModifierType::ReplaceFullPath => {
                        ("replaceFullPath", path.replace_full_path.as_ref())
                    }
                    PathModifierType::ReplacePrefixMatch => {
                        if !prefix_only {
                            return Err((
                                at(&format!("{field}.path.type")),
                                "ReplacePrefixMatch needs PathPrefix matches".into(),
                            ));
                        }
                        ("replacePrefixMatch", path.replace_prefix_match.as_ref())
                    }
                };
                match value {
                    Some(v) if v.starts_with('/') => {}
                    Some(_) => {
                        return Err((
                            at(&format!("{field}.path.{name}")),
                            "must start with `/`".into(),
                        ))
                    }
                    None => {
                        return Err((at(&format!("{field}.path.{name}")), "is required".into()))
                    }
                }
            }
        }
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            if backend.name.is_empty() {
                return Err((at(format!("backendRefs[{b}].name")), "is required".into()));
            }
            if backend.weight > 1_000_000 {
                return Err((
                    at(format!("backendRefs[{b}].weight")),
                    "must be at most 1000000".into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_the_api_grammar() {
        assert_eq!(parse_api_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_api_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_api_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_api_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1d", "1.5s", "123456s", "1h1h1h1h1h"] {
            assert!(parse_api_duration(bad).is_err(), "{bad}");
        }
    }
}
