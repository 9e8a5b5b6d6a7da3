//! Route precedence, weighted picks and filters, on routes written as YAML.

use std::path::Path;

use http::{HeaderMap, HeaderValue, Method};
use ztunnel::k8s::{parse_file, Object};

use super::filters::{Filter, PathChange, RequestUrl};
use super::*;

fn table(yaml: &str) -> (RouteTable, Vec<RouteError>) {
    let objs = parse_file(Path::new("routes.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    let routes: Vec<_> = objs
        .iter()
        .filter_map(|o| match o {
            Object::HttpRoute(r) => Some(r),
            _ => None,
        })
        .collect();
    RouteTable::build(&routes)
}

/// A route `name` (created at `created`, seconds into a day) on Service `svc`, with rules
/// given as YAML flow sequences; each rule sends to the backend named after its match.
fn route(name: &str, created: u32, rules: &[&str]) -> String {
    let rules: Vec<String> = rules
        .iter()
        .map(|m| {
            format!(
                "  - matches: [{m}]\n    backendRefs: [{{name: {}, port: 80}}]\n",
                tag(m)
            )
        })
        .collect();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: ns, creationTimestamp: \"2024-01-01T00:00:{created:02}Z\"}}\n\
         spec:\n  parentRefs: [{{kind: Service, group: \"\", name: svc}}]\n  rules:\n{}",
        rules.concat()
    )
}

/// Route `r` on Service `svc` with `rules` (YAML list items indented by two).
fn svc_route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: r, namespace: ns}}\n\
         spec:\n  parentRefs: [{{kind: Service, name: svc}}]\n  rules:{rules}"
    )
}

/// A backend name derived from a match's text, so a test can tell which rule won.
fn tag(m: &str) -> String {
    m.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_lowercase()
}

struct Req {
    method: Method,
    path: &'static str,
    query: Option<&'static str>,
    headers: HeaderMap,
}

fn get(path: &'static str) -> Req {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    Req {
        method: Method::GET,
        path,
        query,
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn header(mut self, n: &'static str, v: &'static str) -> Req {
        self.headers.append(n, HeaderValue::from_static(v));
        self
    }
    fn method(mut self, m: Method) -> Req {
        self.method = m;
        self
    }
}

/// The backend the table picks for `req` on port 80, `404` for no match, `default` for
/// no route.
fn pick(t: &RouteTable, req: &Req) -> String {
    let info = RequestInfo {
        method: &req.method,
        path: req.path,
        query: req.query,
        headers: &req.headers,
    };
    match t.lookup("ns/svc", 80, &info) {
        Lookup::NoRoutes => "default".into(),
        Lookup::NoMatch => "404".into(),
        Lookup::Matched(m) => m
            .rule
            .pick_backend(0)
            .map(|b| b.service.trim_start_matches("ns/").to_string())
            .unwrap_or_else(|| "none".into()),
    }
}

#[test]
fn exact_beats_prefix_and_longer_prefix_beats_shorter() {
    let yaml = route(
        "r",
        0,
        &[
            "{path: {type: PathPrefix, value: /}}",
            "{path: {type: PathPrefix, value: /api}}",
            "{path: {type: PathPrefix, value: /api/v1/}}",
            "{path: {type: Exact, value: /api/v1/x}}",
            "{path: {type: RegularExpression, value: '/api/v[0-9]+/x.*'}}",
        ],
    );
    let (t, errors) = table(&yaml);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(pick(&t, &get("/api/v1/x")), "pathtypeexactvalueapiv1x");
    assert_eq!(pick(&t, &get("/api/v1/xy")), "pathtypepathprefixvalueapiv1");
    assert_eq!(pick(&t, &get("/api/v1")), "pathtypepathprefixvalueapiv1");
    assert_eq!(pick(&t, &get("/api/v2/x")), "pathtypepathprefixvalueapi");
    assert_eq!(pick(&t, &get("/apix")), "pathtypepathprefixvalue");
    assert_eq!(pick(&t, &get("/")), "pathtypepathprefixvalue");
}

#[test]
fn then_method_then_more_headers_then_more_query_params() {
    let yaml = route(
        "r",
        0,
        &[
            "{path: {value: /a}}",
            "{path: {value: /a}, queryParams: [{name: q, value: '1'}]}",
            "{path: {value: /a}, headers: [{name: x-h, value: h}]}",
            "{path: {value: /a}, headers: [{name: x-h, value: h}, {name: x-i, value: i}]}",
            "{path: {value: /a}, method: POST}",
        ],
    );
    let (t, _) = table(&yaml);
    let both = || get("/a?q=1").header("x-h", "h").header("x-i", "i");
    assert_eq!(
        pick(&t, &both().method(Method::POST)),
        "pathvalueamethodpost"
    );
    assert_eq!(
        pick(&t, &both()),
        "pathvalueaheadersnamexhvaluehnamexivaluei"
    );
    assert_eq!(
        pick(&t, &get("/a?q=1").header("x-h", "h")),
        "pathvalueaheadersnamexhvalueh"
    );
    assert_eq!(
        pick(&t, &get("/a?x=2&q=1")),
        "pathvalueaqueryparamsnameqvalue1"
    );
    assert_eq!(pick(&t, &get("/a?q=2")), "pathvaluea");
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_then_rule_order() {
    let same = "{path: {value: /t}}";
    let yaml = route("b-new", 5, &[same]).replace("name: pathvaluet", "name: newer")
        + &route("c-old", 1, &[same]).replace("name: pathvaluet", "name: later-name")
        + &route("a-old", 1, &[same, same])
            .replacen("name: pathvaluet", "name: first", 1)
            .replacen("name: pathvaluet", "name: second", 1);
    let (t, _) = table(&yaml);
    assert_eq!(pick(&t, &get("/t")), "first");
    let newer_first = route("a-new", 5, &[same]).replace("name: pathvaluet", "name: newer")
        + &route("z-old", 1, &[same]).replace("name: pathvaluet", "name: older");
    let (t, _) = table(&newer_first);
    assert_eq!(pick(&t, &get("/t")), "older");
}

#[test]
fn no_route_is_the_default_and_no_match_is_404() {
    let (t, _) = table(&route("r", 0, &["{path: {type: Exact, value: /only}}"]));
    assert_eq!(pick(&t, &get("/other")), "404");
    let info = RequestInfo {
        method: &Method::GET,
        path: "/only",
        query: None,
        headers: &HeaderMap::new(),
    };
    assert!(matches!(t.lookup("ns/other", 80, &info), Lookup::NoRoutes));
    let on_port =
        route("r", 0, &["{path: {value: /}}"]).replace("name: svc}", "name: svc, port: 81}");
    let (t, _) = table(&on_port);
    assert_eq!(
        pick(&t, &get("/")),
        "default",
        "route attached to another port"
    );
}

#[test]
fn a_bad_regex_drops_its_match_and_says_where() {
    let (t, errors) = table(&route(
        "r",
        0,
        &["{path: {type: RegularExpression, value: '/('}}"],
    ));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "spec.rules[0].matches[0].path.value");
    assert_eq!(pick(&t, &get("/(")), "default");
}

#[test]
fn header_and_query_regexes_match_whole_values() {
    let yaml = route(
        "r",
        0,
        &["{headers: [{type: RegularExpression, name: X-User, value: 'a.*'}], queryParams: [{name: 'k v', value: 'a b'}]}"],
    );
    let (t, _) = table(&yaml);
    assert_eq!(pick(&t, &get("/?k%20v=a%20b").header("x-user", "alice")), tag("{headers: [{type: RegularExpression, name: X-User, value: 'a.*'}], queryParams: [{name: 'k v', value: 'a b'}]}"));
    assert_eq!(
        pick(&t, &get("/?k%20v=a%20b").header("x-user", "bob-a")),
        "404"
    );
}

#[test]
fn weighted_backends_split_by_weight() {
    let yaml = &svc_route(
        r#"
  - backendRefs: [{name: v1, weight: 90}, {name: v2, weight: 10}, {name: v3, weight: 0}]
"#,
    );
    let (t, _) = table(yaml);
    let info = RequestInfo {
        method: &Method::GET,
        path: "/",
        query: None,
        headers: &HeaderMap::new(),
    };
    let Lookup::Matched(m) = t.lookup("ns/svc", 80, &info) else {
        panic!("matches")
    };
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..1000u32 {
        // Rolls spread evenly over u32: the middle of each thousandth.
        let roll = u32::try_from(((2 * u64::from(i) + 1) << 31) / 1000).expect("fits");
        let b = m.rule.pick_backend(roll).expect("backend");
        *counts.entry(b.service.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("ns/v1"), Some(&900));
    assert_eq!(counts.get("ns/v2"), Some(&100));
    assert_eq!(counts.get("ns/v3"), None);
    assert_eq!(
        m.rule.pick_backend(u32::MAX).map(|b| b.service.as_str()),
        Some("ns/v2")
    );
}

#[test]
fn filters_edit_headers_and_paths_and_unsupported_ones_answer_500() {
    let yaml = &svc_route(
        r#"
  - matches: [{path: {value: /old}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-s, value: s}], add: [{name: x-a, value: a}], remove: [x-r]}}
    - {type: URLRewrite, urlRewrite: {hostname: new.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
    backendRefs: [{name: v1}]
  - matches: [{path: {value: /mirror}}]
    filters: [{type: RequestMirror}]
    backendRefs: [{name: v1}]
"#,
    );
    let (t, errors) = table(yaml);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let headers = HeaderMap::new();
    let info = |path| RequestInfo {
        method: &Method::GET,
        path,
        query: None,
        headers: &headers,
    };
    let Lookup::Matched(m) = t.lookup("ns/svc", 80, &info("/old/page")) else {
        panic!("matches")
    };
    let mut h = HeaderMap::new();
    h.insert("x-s", HeaderValue::from_static("old"));
    h.insert("x-a", HeaderValue::from_static("first"));
    h.insert("x-r", HeaderValue::from_static("gone"));
    let Filter::RequestHeaders(edit) = &m.rule.filters[0] else {
        panic!("header filter first")
    };
    edit.apply(&mut h);
    assert_eq!(h.get("x-s").map(|v| v.as_bytes()), Some(&b"s"[..]));
    assert_eq!(h.get_all("x-a").iter().count(), 2);
    assert!(h.get("x-r").is_none());
    let Filter::Rewrite(rw) = &m.rule.filters[1] else {
        panic!("rewrite second")
    };
    let change = rw.path.as_ref().expect("path");
    assert_eq!(change.apply("/old/page", m.prefix.as_deref()), "/new/page");
    assert_eq!(change.apply("/old", m.prefix.as_deref()), "/new");
    assert_eq!(rw.hostname.as_deref(), Some("new.example"));
    let Lookup::Matched(m) = t.lookup("ns/svc", 80, &info("/mirror")) else {
        panic!("matches")
    };
    assert!(m.rule.invalid.is_some());
}

#[test]
fn prefix_replacement_keeps_segments_and_redirects_build_urls() {
    let p = PathChange::Prefix("/".into());
    assert_eq!(p.apply("/foo/bar", Some("/foo")), "/bar");
    assert_eq!(p.apply("/foo", Some("/foo")), "/");
    let p = PathChange::Prefix("/x/".into());
    assert_eq!(p.apply("/foo/bar", Some("/foo")), "/x/bar");
    assert_eq!(PathChange::Full("/f".into()).apply("/a/b", None), "/f");

    let yaml = &svc_route(
        r#"
  - filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]
  - matches: [{path: {value: /p}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: h, path: {type: ReplaceFullPath, replaceFullPath: /q}}}]
"#,
    );
    let (t, errors) = table(yaml);
    assert!(errors.is_empty(), "{errors:?}");
    let headers = HeaderMap::new();
    let url = |path: &'static str| {
        let info = RequestInfo {
            method: &Method::GET,
            path,
            query: Some("a=1"),
            headers: &headers,
        };
        let Lookup::Matched(m) = t.lookup("ns/svc", 8080, &info) else {
            panic!("matches")
        };
        let Filter::Redirect(r) = &m.rule.filters[0] else {
            panic!("redirect")
        };
        let req = RequestUrl {
            scheme: "http",
            host: "svc.ns",
            port: 8080,
            path,
            query: Some("a=1"),
        };
        (r.status.as_u16(), r.location(&req, m.prefix.as_deref()))
    };
    assert_eq!(url("/x"), (301, "https://svc.ns/x?a=1".to_string()));
    assert_eq!(url("/p/1"), (302, "http://h:8080/q?a=1".to_string()));
}

#[test]
fn retry_and_timeouts_come_from_the_rule_with_defaults() {
    let yaml = &svc_route(
        r#"
  - matches: [{path: {value: /a}}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 0}
    backendRefs: [{name: v1}]
  - backendRefs: [{name: v1}]
"#,
    );
    let (t, _) = table(yaml);
    let headers = HeaderMap::new();
    let rule = |path| {
        let info = RequestInfo {
            method: &Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        match t.lookup("ns/svc", 80, &info) {
            Lookup::Matched(m) => m.rule,
            other => panic!("{other:?}"),
        }
    };
    let a = rule("/a");
    assert_eq!(a.timeout, Some(Duration::from_secs(2)));
    assert_eq!(a.attempt_timeout, Some(Duration::from_millis(500)));
    assert_eq!(a.retry.attempts, 0);
    assert_eq!(a.retry.codes, vec![503]);
    let other = rule("/b");
    assert_eq!(other.timeout, None);
    assert_eq!(other.retry, RetryPolicy::default());
}
