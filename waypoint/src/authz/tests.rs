//! The waypoint's authorization semantics, one table row per rule of Istio's documented
//! behaviour, plus the fail-closed handling of what the waypoint cannot evaluate.

use std::path::Path;

use http::{HeaderMap, HeaderValue};
use ztunnel::identity::SpiffeId;
use ztunnel::k8s::{self, Object};

use super::compile::Problem;
use super::*;

const GATEWAY: &str = "mesh/waypoint";

/// A request; by default `GET /public/page` from `mesh/a` to `reviews` (VIP 10.96.0.10:80).
#[derive(Clone)]
struct Req {
    principal: (&'static str, &'static str),
    src_ip: &'static str,
    dst: &'static str,
    service: Option<&'static str>,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    /// Not HTTP: an opaque stream.
    opaque: bool,
}

fn get() -> Req {
    Req {
        principal: ("mesh", "a"),
        src_ip: "10.0.1.1",
        dst: "10.96.0.10:80",
        service: Some("mesh/reviews"),
        method: "GET",
        host: "reviews.mesh.svc.cluster.local",
        path: "/public/page",
        headers: Vec::new(),
        opaque: false,
    }
}

impl Req {
    fn from(mut self, ns: &'static str, sa: &'static str, ip: &'static str) -> Req {
        self.principal = (ns, sa);
        self.src_ip = ip;
        self
    }
    fn method(mut self, m: &'static str) -> Req {
        self.method = m;
        self
    }
    fn path(mut self, p: &'static str) -> Req {
        self.path = p;
        self
    }
    fn host(mut self, h: &'static str) -> Req {
        self.host = h;
        self
    }
    fn header(mut self, n: &'static str, v: &'static str) -> Req {
        self.headers.push((n, v));
        self
    }
    fn opaque(mut self) -> Req {
        self.opaque = true;
        self
    }
    fn to(mut self, dst: &'static str, service: Option<&'static str>) -> Req {
        self.dst = dst;
        self.service = service;
        self
    }
}

fn policies(yaml: &str) -> (PolicySet, Vec<Problem>) {
    let objs = k8s::parse_file(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let mut all = Vec::new();
    let mut problems = Vec::new();
    for o in &objs {
        if let Object::AuthorizationPolicy(p) = o {
            let (c, p) = compile::policy(p);
            all.extend(c);
            problems.extend(p);
        }
    }
    (PolicySet::new(all), problems)
}

fn decide(yaml: &str, r: &Req) -> Decision {
    let (set, _) = policies(yaml);
    let id = SpiffeId::new("cluster.local", r.principal.0, r.principal.1);
    let mut headers = HeaderMap::new();
    for (n, v) in &r.headers {
        headers.append(*n, HeaderValue::from_static(v));
    }
    let h = Request {
        src_ip: r.src_ip.parse().expect("ip"),
        src_identity: Some(&id),
        dst: r.dst.parse().expect("addr"),
        service: r.service,
        http: (!r.opaque).then_some(Http {
            method: r.method,
            host: r.host,
            path: r.path,
            headers: &headers,
        }),
    };
    evaluate(&set, GATEWAY, &h)
}

/// An AuthorizationPolicy in `mesh` attached to the waypoint's Gateway.
fn gw(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: mesh}}\n\
         spec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  {spec}\n"
    )
}

/// An ALLOW with one rule.
fn allow(rule: &str) -> String {
    gw("allow", &format!("rules: [{rule}]"))
}

/// A DENY with one rule.
fn deny(rule: &str) -> String {
    gw("deny", &format!("action: DENY\n  rules: [{rule}]"))
}

fn check(cases: &[(&str, String, Req, bool)]) {
    let mut failed = Vec::new();
    for (name, yaml, req, allowed) in cases {
        let d = decide(yaml, req);
        if d.allowed() != *allowed {
            failed.push(format!("{name}: expected allowed={allowed}, got {d:?}"));
        }
    }
    assert!(failed.is_empty(), "\n{}", failed.join("\n"));
}

const GET_PUBLIC_FOR_A: &str = "{from: [{source: {principals: [cluster.local/ns/mesh/sa/a]}}], to: [{operation: {methods: [GET], paths: [/public/*]}}]}";

#[test]
fn attachment_only_targets_of_this_waypoint_or_the_destination_service() {
    let deny_all = |targets: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: d, namespace: mesh}}\n\
             spec: {{action: DENY, rules: [{{}}]{targets}}}\n"
        )
    };
    check(&[
        ("no policy", String::new(), get(), true),
        (
            "selector: the node's",
            deny_all(", selector: {matchLabels: {app: reviews}}"),
            get(),
            true,
        ),
        ("no target: the node's", deny_all(""), get(), true),
        (
            "this Gateway",
            deny_all(
                ", targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]",
            ),
            get(),
            false,
        ),
        (
            "singular targetRef",
            deny_all(
                ", targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}",
            ),
            get(),
            false,
        ),
        (
            "another Gateway",
            deny_all(
                ", targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]",
            ),
            get(),
            true,
        ),
        (
            "Gateway in another group",
            deny_all(", targetRefs: [{kind: Gateway, group: example.com, name: waypoint}]"),
            get(),
            true,
        ),
        (
            "the destination Service",
            deny_all(", targetRefs: [{kind: Service, group: '', name: reviews}]"),
            get(),
            false,
        ),
        (
            "another Service",
            deny_all(", targetRefs: [{kind: Service, group: '', name: ratings}]"),
            get(),
            true,
        ),
        (
            "a pod destination has no Service",
            deny_all(", targetRefs: [{kind: Service, group: '', name: reviews}]"),
            get().to("10.0.3.3:9080", None),
            true,
        ),
        (
            "cross-namespace targetRef",
            deny_all(", targetRefs: [{kind: Service, group: '', name: reviews, namespace: other}]"),
            get(),
            true,
        ),
    ]);
}

#[test]
fn operations_methods_paths_hosts_ports() {
    let a_public = allow(GET_PUBLIC_FOR_A);
    let op = |o: &str| allow(&format!("{{to: [{{operation: {{{o}}}}}]}}"));
    check(&[
        ("GET /public/* by a", a_public.clone(), get(), true),
        ("POST", a_public.clone(), get().method("POST"), false),
        (
            "other path",
            a_public.clone(),
            get().path("/private"),
            false,
        ),
        (
            "prefix includes the bare prefix",
            a_public.clone(),
            get().path("/public/"),
            true,
        ),
        (
            "another principal",
            a_public.clone(),
            get().from("other", "b", "10.0.2.2"),
            false,
        ),
        (
            "exact path",
            op("paths: [/exact]"),
            get().path("/exact"),
            true,
        ),
        (
            "exact path is exact",
            op("paths: [/exact]"),
            get().path("/exact/more"),
            false,
        ),
        (
            "suffix path",
            op("paths: ['*.js']"),
            get().path("/static/app.js"),
            true,
        ),
        (
            "presence path",
            op("paths: ['*']"),
            get().path("/anything"),
            true,
        ),
        (
            "paths are case-sensitive",
            op("paths: [/Public]"),
            get().path("/public"),
            false,
        ),
        (
            "notPaths excludes",
            op("notPaths: [/admin*]"),
            get().path("/admin/users"),
            false,
        ),
        (
            "notPaths spares others",
            op("notPaths: [/admin*]"),
            get().path("/home"),
            true,
        ),
        ("methods OR", op("methods: [PUT, GET]"), get(), true),
        ("notMethods", op("notMethods: [GET]"), get(), false),
        (
            "hosts ignore case",
            op("hosts: [Reviews.Mesh.svc.cluster.local]"),
            get(),
            true,
        ),
        (
            "host value without port matches host:port",
            op("hosts: [reviews.mesh.svc.cluster.local]"),
            get().host("reviews.mesh.svc.cluster.local:80"),
            true,
        ),
        (
            "host value with port is exact",
            op("hosts: ['reviews:8080']"),
            get().host("reviews:80"),
            false,
        ),
        (
            "host suffix",
            op("hosts: ['*.svc.cluster.local']"),
            get(),
            true,
        ),
        ("host prefix", op("hosts: ['reviews.*']"), get(), true),
        (
            "notHosts",
            op("notHosts: ['*.cluster.local']"),
            get(),
            false,
        ),
        (
            "ports: the addressed port",
            op("ports: ['80']"),
            get(),
            true,
        ),
        ("ports: another", op("ports: [9000]"), get(), false),
        ("notPorts", op("notPorts: [80]"), get(), false),
        (
            "fields of one operation AND",
            op("methods: [GET], paths: [/nope]"),
            get(),
            false,
        ),
        (
            "operations OR",
            allow("{to: [{operation: {paths: [/nope]}}, {operation: {methods: [GET]}}]}"),
            get(),
            true,
        ),
    ]);
}

#[test]
fn sources_reuse_the_node_semantics() {
    let src = |s: &str| allow(&format!("{{from: [{{source: {{{s}}}}}]}}"));
    let other = || get().from("other", "b", "10.0.2.2");
    check(&[
        (
            "principals",
            src("principals: [cluster.local/ns/mesh/sa/a]"),
            get(),
            true,
        ),
        (
            "principals other",
            src("principals: [cluster.local/ns/mesh/sa/a]"),
            other(),
            false,
        ),
        (
            "principal suffix",
            src("principals: ['*/sa/a']"),
            get(),
            true,
        ),
        (
            "notPrincipals",
            src("notPrincipals: ['*/sa/b']"),
            other(),
            false,
        ),
        ("namespaces", src("namespaces: [mesh]"), get(), true),
        ("notNamespaces", src("notNamespaces: [mesh]"), get(), false),
        (
            "serviceAccounts",
            src("serviceAccounts: [other/b]"),
            other(),
            true,
        ),
        ("ipBlocks", src("ipBlocks: [10.0.1.0/24]"), get(), true),
        (
            "ipBlocks other",
            src("ipBlocks: [10.0.1.0/24]"),
            other(),
            false,
        ),
        (
            "notIpBlocks",
            src("notIpBlocks: [10.0.2.2]"),
            other(),
            false,
        ),
        (
            "remoteIpBlocks",
            src("remoteIpBlocks: [10.0.0.0/16]"),
            other(),
            true,
        ),
        (
            "sources OR",
            allow("{from: [{source: {namespaces: [x]}}, {source: {namespaces: [other]}}]}"),
            other(),
            true,
        ),
    ]);
}

#[test]
fn when_conditions_headers_and_l4_keys() {
    let when = |c: &str| allow(&format!("{{when: [{c}]}}"));
    check(&[
        ("header value", when("{key: 'request.headers[x-user]', values: [alice]}"), get().header("x-user", "alice"), true),
        ("header other value", when("{key: 'request.headers[x-user]', values: [alice]}"), get().header("x-user", "bob"), false),
        ("header absent", when("{key: 'request.headers[x-user]', values: [alice]}"), get(), false),
        ("header name ignores case", when("{key: 'request.headers[X-User]', values: [alice]}"), get().header("x-user", "alice"), true),
        ("header prefix", when("{key: 'request.headers[x-user]', values: ['ali*']}"), get().header("x-user", "alice"), true),
        ("header presence", when("{key: 'request.headers[x-user]', values: ['*']}"), get().header("x-user", "z"), true),
        ("header notValues", when("{key: 'request.headers[x-user]', notValues: [bob]}"), get().header("x-user", "bob"), false),
        ("header notValues, absent header", when("{key: 'request.headers[x-user]', notValues: [bob]}"), get(), true),
        ("source.ip", when("{key: source.ip, values: [10.0.1.0/24]}"), get(), true),
        ("source.principal", when("{key: source.principal, values: [cluster.local/ns/other/sa/b]}"), get(), false),
        ("source.namespace", when("{key: source.namespace, values: [mesh]}"), get(), true),
        ("destination.ip: the original destination", when("{key: destination.ip, values: [10.96.0.10]}"), get(), true),
        ("destination.port", when("{key: destination.port, values: ['9000']}"), get(), false),
        ("conditions AND", allow("{when: [{key: source.namespace, values: [mesh]}, {key: 'request.headers[x-user]', values: [a]}]}"), get(), false),
    ]);
}

#[test]
fn unsupported_attributes_never_widen_access() {
    let claim = "{key: 'request.auth.claims[iss]', values: [issuer]}";
    check(&[
        // ALLOW: a rule with an attribute the waypoint cannot see matches nothing.
        (
            "JWT claim in ALLOW",
            allow(&format!("{{when: [{claim}]}}")),
            get(),
            false,
        ),
        (
            "requestPrincipals in ALLOW",
            allow("{from: [{source: {requestPrincipals: ['*']}}]}"),
            get(),
            false,
        ),
        (
            "connection.sni in ALLOW",
            allow("{when: [{key: connection.sni, notValues: [x]}]}"),
            get(),
            false,
        ),
        (
            "experimental key in ALLOW",
            allow("{when: [{key: experimental.envoy.filters.x, values: [y]}]}"),
            get(),
            false,
        ),
        (
            "path template in ALLOW",
            allow("{to: [{operation: {paths: ['/public/{*}']}}]}"),
            get(),
            false,
        ),
        // ... while another rule may still allow.
        (
            "other rule still allows",
            gw(
                "allow",
                &format!(
                    "rules: [{{when: [{claim}]}}, {{to: [{{operation: {{methods: [GET]}}}}]}}]"
                ),
            ),
            get(),
            true,
        ),
        // DENY: the attribute is taken as matched.
        (
            "JWT claim in DENY",
            deny(&format!("{{when: [{claim}]}}")),
            get(),
            false,
        ),
        (
            "notRequestPrincipals in DENY",
            deny("{from: [{source: {notRequestPrincipals: ['*']}}]}"),
            get(),
            false,
        ),
        (
            "path template in DENY, other fields still apply",
            deny("{to: [{operation: {methods: [POST], notPaths: ['/x/{**}']}}]}"),
            get(),
            true,
        ),
        (
            "path template in DENY",
            deny("{to: [{operation: {methods: [GET], notPaths: ['/x/{**}']}}]}"),
            get(),
            false,
        ),
    ]);
}

#[test]
fn actions_precedence_audit_dry_run() {
    let custom = gw(
        "c",
        "action: CUSTOM\n  rules: [{to: [{operation: {paths: [/ext*]}}]}]",
    );
    let allow_all = gw("z-allow", "rules: [{}]");
    check(&[
        (
            "empty ALLOW allows nothing",
            gw("none", "action: ALLOW"),
            get(),
            false,
        ),
        ("rules [{}] allows all", allow_all.clone(), get(), true),
        (
            "DENY without rules never matches",
            gw("d", "action: DENY"),
            get(),
            true,
        ),
        (
            "DENY beats ALLOW",
            format!(
                "{allow_all}{}",
                deny("{to: [{operation: {methods: [GET]}}]}")
            ),
            get(),
            false,
        ),
        (
            "DENY not matching",
            format!(
                "{allow_all}{}",
                deny("{to: [{operation: {methods: [POST]}}]}")
            ),
            get(),
            true,
        ),
        (
            "CUSTOM matching denies first",
            format!("{allow_all}{custom}"),
            get().path("/ext/a"),
            false,
        ),
        (
            "CUSTOM not matching",
            format!("{allow_all}{custom}"),
            get(),
            true,
        ),
        (
            "AUDIT decides nothing",
            gw("a", "action: AUDIT\n  rules: [{}]"),
            get(),
            true,
        ),
        (
            "some ALLOW must match",
            format!(
                "{}{}",
                allow(GET_PUBLIC_FOR_A),
                gw("b", "rules: [{to: [{operation: {paths: [/b]}}]}]")
            ),
            get().path("/b"),
            true,
        ),
    ]);
    let d = decide(&format!("{allow_all}{custom}"), &get().path("/ext/a"));
    assert_eq!(
        d.reason,
        Reason::Custom {
            policy: "mesh/c".into(),
            rule: 0
        }
    );
    let d = decide(&gw("a", "action: AUDIT\n  rules: [{}]"), &get());
    assert_eq!(d.audited, vec!["mesh/a".to_string()]);
    let dry = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
               metadata: {name: dry, namespace: mesh, annotations: {istio.io/dry-run: 'true'}}\n\
               spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], action: DENY, rules: [{}]}\n";
    let d = decide(dry, &get());
    assert!(d.allowed(), "{d:?}");
    assert_eq!(
        d.dry_run,
        Some((
            Verdict::Deny,
            Reason::Denied {
                policy: "mesh/dry".into(),
                rule: 0
            }
        ))
    );
}

#[test]
fn invalid_policies_fail_closed() {
    let cases = [
        ("bad CIDR in ALLOW", allow("{from: [{source: {ipBlocks: [10.0.0.300]}}]}"), "spec.rules[0].from[0].source.ipBlocks[0]"),
        ("bad port in DENY", deny("{to: [{operation: {ports: ['0']}}]}"), "spec.rules[0].to[0].operation.ports[0]"),
        ("unknown action", gw("x", "action: MAYBE\n  rules: [{}]"), "spec.action"),
        ("unknown when key", deny("{when: [{key: request.body, values: [x]}]}"), "spec.rules[0].when[0].key"),
        ("empty operation", deny("{to: [{operation: {}}]}"), "spec.rules[0].to[0].operation"),
        ("selector with targetRefs", gw("s", "action: DENY\n  selector: {matchLabels: {app: x}}\n  rules: [{to: [{operation: {paths: [/never]}}]}]"), "spec.selector"),
        // Unknown keys are invalid, as at the node daemon: never a wider rule.
        ("misspelled source key", allow("{from: [{source: {principal: [cluster.local/ns/mesh/sa/a]}}]}"), "spec.rules[0].from[0].source.principal"),
        ("misspelled key next to a valid one", allow("{to: [{operation: {methods: [GET], path: [/public/*]}}]}"), "spec.rules[0].to[0].operation.path"),
        ("misspelled DENY key", deny("{to: [{operation: {method: [POST]}}]}"), "spec.rules[0].to[0].operation.method"),
        ("unknown spec key", gw("u", "action: DENY\n  rule: [{}]"), "spec.rule"),
        ("wrong type", deny("{from: [{source: {principals: x}}]}"), "spec.rules[0].from[0].source.principals"),
    ];
    for (name, yaml, field) in cases {
        let (_, problems) = policies(&yaml);
        assert!(
            problems
                .iter()
                .any(|p| matches!(p, Problem::Invalid { field: f, .. } if f == field)),
            "{name}: {problems:?}"
        );
        let d = decide(&yaml, &get());
        assert!(
            !d.allowed(),
            "{name}: an invalid policy fails closed: {d:?}"
        );
    }
    let d = decide(&deny("{to: [{operation: {ports: ['0']}}]}"), &get());
    assert!(matches!(d.reason, Reason::Invalid { ref policy, .. } if policy == "mesh/deny"));
    let d = decide(
        &allow("{from: [{source: {principal: [cluster.local/ns/mesh/sa/a]}}]}"),
        &get(),
    );
    assert!(
        matches!(d.reason, Reason::NoAllowMatched { ref checked } if checked == &["mesh/allow".to_string()]),
        "{d:?}"
    );
    // A dry-run annotation is honoured on an invalid policy: logged as a denial, not enforced.
    let dry = deny("{to: [{operation: {method: [POST]}}]}").replace(
        "metadata: {name: deny, namespace: mesh}",
        "metadata: {name: deny, namespace: mesh, annotations: {istio.io/dry-run: 'true'}}",
    );
    let d = decide(&dry, &get());
    assert!(d.allowed(), "{d:?}");
    assert!(
        matches!(d.dry_run, Some((Verdict::Deny, Reason::Invalid { .. }))),
        "{d:?}"
    );
    // An invalid AUDIT decides nothing.
    let d = decide(
        &gw(
            "a",
            "action: AUDIT\n  rules: [{to: [{operation: {ports: ['0']}}]}]",
        ),
        &get(),
    );
    assert!(d.allowed());
}

#[test]
fn caveats_name_the_unsupported_fields() {
    let (_, problems) = policies(&allow(
        "{when: [{key: 'request.auth.claims[iss]', values: [x]}]}",
    ));
    assert!(
        matches!(&problems[..], [Problem::Caveat(m)] if m.contains("request.auth.claims[iss]") && m.contains("matches nothing")),
        "{problems:?}"
    );
}

#[test]
fn reasons_name_policy_and_rule() {
    let yaml = format!(
        "{}{}",
        allow(GET_PUBLIC_FOR_A),
        deny("{when: [{key: 'request.headers[x-block]', values: ['yes']}]}")
    );
    let d = decide(&yaml, &get().header("x-block", "yes"));
    assert_eq!(d.reason.to_string(), "denied by mesh/deny rule 0");
    assert_eq!(d.reason.policy(), Some("mesh/deny"));
    let d = decide(&yaml, &get().method("POST"));
    assert_eq!(
        d.reason.to_string(),
        "no ALLOW policy matched (attached: mesh/allow)"
    );
    let d = decide(&yaml, &get());
    assert_eq!(
        (d.reason.policy(), d.reason.rule()),
        (Some("mesh/allow"), Some(0))
    );
}

#[test]
fn opaque_streams_are_decided_on_l4_attributes_and_fail_closed_on_http_ones() {
    let a_public = allow(GET_PUBLIC_FOR_A);
    let header_deny = deny("{from: [{source: {namespaces: [mesh]}}], when: [{key: 'request.headers[x-block]', values: ['yes']}]}");
    check(&[
        (
            "an ALLOW on HTTP fields matches no stream",
            a_public,
            get().opaque(),
            false,
        ),
        (
            "an ALLOW on L4 fields",
            allow("{from: [{source: {namespaces: [mesh]}}], to: [{operation: {ports: ['9000']}}]}"),
            get().to("10.96.0.10:9000", Some("mesh/reviews")).opaque(),
            true,
        ),
        (
            "notPaths in an ALLOW does not match a stream",
            allow("{to: [{operation: {notPaths: [/admin]}}]}"),
            get().opaque(),
            false,
        ),
        (
            "a DENY on a header denies the stream",
            header_deny.clone(),
            get().opaque(),
            false,
        ),
        (
            "... on its L4 parts only",
            header_deny,
            get().from("other", "b", "10.0.2.2").opaque(),
            true,
        ),
        (
            "a DENY on methods applies on ports",
            deny("{to: [{operation: {methods: [POST], ports: ['80']}}]}"),
            get().opaque(),
            false,
        ),
    ]);
}

#[test]
fn unreadable_target_applies_to_the_namespace_and_fails_closed() {
    let yaml = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: mesh}\n\
                spec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, nme: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n";
    let (_, problems) = policies(yaml);
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::Invalid { field, .. } if field == "spec.targetRefs[0]")),
        "{problems:?}"
    );
    let d = decide(yaml, &get());
    assert!(
        matches!(d.reason, Reason::Invalid { ref policy, .. } if policy == "mesh/d"),
        "{d:?}"
    );
    // A well-formed reference to a kind the waypoint does not serve is still only ignored.
    let other = yaml.replace(
        "kind: Gateway, group: gateway.networking.k8s.io, nme: waypoint",
        "kind: ServiceEntry, group: networking.istio.io, name: ext",
    );
    assert!(decide(&other, &get()).allowed());
}
