//! HTTPRoute filters, compiled once (header names and values checked) and applied per
//! request as pure functions over headers and paths.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use ztunnel::k8s::gateway::{self as api, HttpRouteFilter, PathModifierType};

/// A compiled filter.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Edits the forwarded request's headers.
    RequestHeaders(HeaderEdit),
    /// Edits the response's headers.
    ResponseHeaders(HeaderEdit),
    /// Answers with a redirect instead of forwarding.
    Redirect(Redirect),
    /// Changes the forwarded request's host or path.
    Rewrite(Rewrite),
}

/// Header edits in the API's order: set, then add, then remove.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdit {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdit {
    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// A new path for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    /// The whole path.
    Full(String),
    /// The part the `PathPrefix` match matched.
    Prefix(String),
}

impl PathChange {
    /// The path after the change; `prefix` is what the match matched (without trailing
    /// `/`). The rest of the path keeps its segments: `/foo` → `/bar` turns `/foo/x` into
    /// `/bar/x`, and `/foo` → `/` turns it into `/x`.
    pub fn apply(&self, path: &str, prefix: Option<&str>) -> String {
        match self {
            PathChange::Full(p) => p.clone(),
            PathChange::Prefix(replacement) => {
                let rest = prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
                let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
                if joined.is_empty() {
                    "/".into()
                } else {
                    joined
                }
            }
        }
    }
}

/// `RequestRedirect`.
#[derive(Debug, Clone)]
pub struct Redirect {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathChange>,
    port: Option<u16>,
    /// 301 or 302.
    pub status: StatusCode,
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// New host (the `Host` header / `:authority` sent to the backend).
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathChange>,
}

/// What a redirect needs of the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestUrl<'a> {
    /// `http` (the waypoint receives plaintext HTTP inside the tunnel).
    pub scheme: &'a str,
    /// Host without port.
    pub host: &'a str,
    /// The Service port the request was sent to (the "listener" port of a waypoint).
    pub port: u16,
    /// Path.
    pub path: &'a str,
    /// Query, without `?`.
    pub query: Option<&'a str>,
}

impl Redirect {
    /// The `Location` of the redirect. A scheme named by the filter brings its well-known
    /// port unless a port is named too; otherwise the request's port stays. Well-known ports
    /// are left out of the URL.
    pub fn location(&self, req: &RequestUrl<'_>, prefix: Option<&str>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let host = self.hostname.as_deref().unwrap_or(req.host);
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) => well_known_port(s),
            (None, None) => req.port,
        };
        let path = match &self.path {
            Some(change) => change.apply(req.path, prefix),
            None => req.path.to_string(),
        };
        let mut url = format!("{scheme}://{host}");
        if port != well_known_port(scheme) {
            url += &format!(":{port}");
        }
        url += &path;
        if let Some(q) = req.query {
            url += "?";
            url += q;
        }
        url
    }
}

fn well_known_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

/// Compiles one filter, or says why the rule cannot use it.
pub fn compile(f: &HttpRouteFilter) -> Result<Filter, String> {
    let missing = |field: &str| format!("{field} is required for type {}", f.kind);
    Ok(match f.kind.as_str() {
        "RequestHeaderModifier" => Filter::RequestHeaders(header_edit(
            f.request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("requestHeaderModifier"))?,
        )?),
        "ResponseHeaderModifier" => Filter::ResponseHeaders(header_edit(
            f.response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("responseHeaderModifier"))?,
        )?),
        "RequestRedirect" => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            let status = StatusCode::from_u16(r.status_code.unwrap_or(302))
                .ok()
                .filter(|s| matches!(s.as_u16(), 301 | 302))
                .ok_or_else(|| "redirect status must be 301 or 302".to_string())?;
            Filter::Redirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(path_change).transpose()?,
                port: r.port,
                status,
            })
        }
        "URLRewrite" => {
            let r = f
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            Filter::Rewrite(Rewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(path_change).transpose()?,
            })
        }
        other => return Err(format!("filter type {other} is not supported")),
    })
}

fn path_change(p: &api::PathModifier) -> Result<PathChange, String> {
    match p.kind {
        PathModifierType::ReplaceFullPath => p
            .replace_full_path
            .clone()
            .map(PathChange::Full)
            .ok_or_else(|| "replaceFullPath is required".into()),
        PathModifierType::ReplacePrefixMatch => p
            .replace_prefix_match
            .clone()
            .map(PathChange::Prefix)
            .ok_or_else(|| "replacePrefixMatch is required".into()),
    }
}

fn header_edit(m: &api::HeaderModifier) -> Result<HeaderEdit, String> {
    let pair = |h: &api::HeaderValue| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            name(&h.name)?,
            HeaderValue::from_str(&h.value)
                .map_err(|_| format!("`{}` is not a valid header value", h.value))?,
        ))
    };
    Ok(HeaderEdit {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
    })
}

fn name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("`{n}` is not a header name"))
}
