//! Table-driven tests of the evaluator against Istio's documented L4 semantics. Each case
//! names the Istio rule it checks in the comment above it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use super::*;
use crate::k8s::{self, Object};

const CLIENT_IP: &str = "10.0.1.1"; // front/client
const OTHER_IP: &str = "10.0.2.2"; // other/default
const PLAIN_IP: &str = "192.168.0.5"; // outside the mesh, no identity
const DST_IP: &str = "10.0.3.3"; // back/db, labels app=db

#[derive(Clone, Copy)]
pub(super) enum Src {
    Client,
    Other,
    Plain,
}

pub(super) fn registry(yaml: &str) -> Registry {
    let objs = k8s::parse_file(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let ap: Vec<_> = objs
        .iter()
        .filter_map(|o| match o {
            Object::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    let pa: Vec<_> = objs
        .iter()
        .filter_map(|o| match o {
            Object::PeerAuthentication(p) => Some(p),
            _ => None,
        })
        .collect();
    Registry::build(ap, pa)
}

fn decide(yaml: &str, from: Src, port: u16) -> Decision {
    let reg = registry(yaml);
    let invalid: Vec<_> = reg.problems.iter().filter(|p| p.invalid).collect();
    assert!(
        invalid.is_empty(),
        "unexpected invalid policies: {invalid:?}"
    );
    decide_in(&reg, from, port)
}

/// Decides a flow from `from` to back/db (labels app=db) on `port`.
pub(super) fn decide_in(reg: &Registry, from: Src, port: u16) -> Decision {
    let client = SpiffeId::new("cluster.local", "front", "client");
    let other = SpiffeId::new("cluster.local", "other", "default");
    let (ip, id, plaintext) = match from {
        Src::Client => (CLIENT_IP, Some(&client), false),
        Src::Other => (OTHER_IP, Some(&other), false),
        Src::Plain => (PLAIN_IP, None, true),
    };
    let labels: BTreeMap<String, String> = [("app".to_string(), "db".to_string())].into();
    let req = Request {
        src_ip: ip.parse::<IpAddr>().expect("ip"),
        src_identity: id,
        dst_namespace: "back",
        dst_labels: &crate::k8s::Labels::from(&labels),
        dst_ip: DST_IP.parse().expect("ip"),
        dst_port: port,
    };
    evaluate(reg, DEFAULT_ROOT_NAMESPACE, &req, plaintext)
}

/// An AuthorizationPolicy document in namespace `ns`.
pub(super) fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// A PeerAuthentication document in namespace `ns`.
pub(super) fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

struct Case {
    name: &'static str,
    yaml: String,
    from: Src,
    port: u16,
    allow: bool,
    /// Deciding policy `namespace/name` (None: a default decided).
    policy: Option<&'static str>,
}

fn case(
    name: &'static str,
    yaml: impl Into<String>,
    from: Src,
    port: u16,
    allow: bool,
    policy: Option<&'static str>,
) -> Case {
    Case {
        name,
        yaml: yaml.into(),
        from,
        port,
        allow,
        policy,
    }
}

#[test]
fn istio_l4_semantics_table() {
    use Src::*;
    let allow_client = ap(
        "back",
        "allow-client",
        "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/front/sa/client]}}]}]}",
    );
    let src = |field: &str| {
        ap(
            "back",
            "p",
            &format!("{{action: ALLOW, rules: [{{from: [{{source: {{{field}}}}}]}}]}}"),
        )
    };
    let deny_src = |field: &str| {
        ap(
            "back",
            "d",
            &format!("{{action: DENY, rules: [{{from: [{{source: {{{field}}}}}]}}]}}"),
        )
    };
    let when = |cond: &str| ap("back", "w", &format!("{{rules: [{{when: [{cond}]}}]}}"));
    let cases = vec![
        // No AuthorizationPolicy in scope: the default is ALLOW.
        case("no policy", "", Client, 5432, true, None),
        // An ALLOW policy with an empty spec matches nothing: allow-nothing for its scope.
        case("empty spec = allow nothing", ap("back", "none", "{}"), Client, 5432, false, None),
        // An ALLOW policy with `rules: [{}]` has one rule that matches everything: allow-all.
        case("rules [{}] ALLOW = allow all", ap("back", "all", "{rules: [{}]}"), Plain, 5432, true, Some("back/all")),
        // A DENY policy with `rules: [{}]` matches everything: deny-all.
        case("rules [{}] DENY = deny all", ap("back", "d", "{action: DENY, rules: [{}]}"), Client, 5432, false, Some("back/d")),
        // A DENY policy without rules never matches (and is not an ALLOW: default allow).
        case("DENY without rules never matches", ap("back", "d", "{action: DENY}"), Client, 5432, true, None),
        // principals: exact match on `<trust domain>/ns/<ns>/sa/<sa>` from the peer certificate.
        case("principals exact admits named client", allow_client.clone(), Client, 5432, true, Some("back/allow-client")),
        // Once an ALLOW applies, a request it does not match is denied.
        case("principals exact refuses another", allow_client.clone(), Other, 5432, false, None),
        // principals: prefix match `abc*`.
        case("principals prefix", src("principals: [cluster.local/ns/front/*]"), Client, 5432, true, Some("back/p")),
        // principals: suffix match `*abc`.
        case("principals suffix", src("principals: ['*/sa/client']"), Client, 5432, true, Some("back/p")),
        // principals: `*` means any authenticated peer; plaintext has none.
        case("principals * refuses plaintext", src("principals: ['*']"), Plain, 5432, false, None),
        // principals: `*` admits any mTLS peer.
        case("principals * admits any mTLS peer", src("principals: ['*']"), Other, 5432, true, Some("back/p")),
        // DENY notPrincipals ["*"]: Istio's recipe to deny plaintext (no principal).
        case("DENY notPrincipals * denies plaintext", deny_src("notPrincipals: ['*']"), Plain, 5432, false, Some("back/d")),
        // ... and leaves authenticated peers alone.
        case("DENY notPrincipals * spares mTLS", deny_src("notPrincipals: ['*']"), Client, 5432, true, None),
        // namespaces: the source namespace from the certificate.
        case("namespaces match", src("namespaces: [front]"), Client, 5432, true, Some("back/p")),
        // namespaces: another namespace does not match.
        case("namespaces miss", src("namespaces: [front]"), Other, 5432, false, None),
        // notNamespaces: excluded namespace does not match.
        case("notNamespaces excludes", src("notNamespaces: [front]"), Client, 5432, false, None),
        // notNamespaces: others match.
        case("notNamespaces admits others", src("notNamespaces: [front]"), Other, 5432, true, Some("back/p")),
        // serviceAccounts: `<ns>/<sa>` from the certificate.
        case("serviceAccounts match", src("serviceAccounts: [front/client]"), Client, 5432, true, Some("back/p")),
        // serviceAccounts: another account does not match.
        case("serviceAccounts miss", src("serviceAccounts: [front/client]"), Other, 5432, false, None),
        // notServiceAccounts in a DENY: everyone but the named account is denied.
        case("DENY notServiceAccounts denies others", deny_src("notServiceAccounts: [front/client]"), Other, 5432, false, Some("back/d")),
        // ipBlocks: source IP in the block.
        case("ipBlocks match", src("ipBlocks: [10.0.1.0/24]"), Client, 5432, true, Some("back/p")),
        // ipBlocks: source IP outside.
        case("ipBlocks miss", src("ipBlocks: [10.0.1.0/24]"), Other, 5432, false, None),
        // notIpBlocks in a DENY: sources outside the block are denied.
        case("DENY notIpBlocks", deny_src("notIpBlocks: [10.0.0.0/8]"), Plain, 5432, false, Some("back/d")),
        // remoteIpBlocks: at L4 the (preserved) source IP.
        case("remoteIpBlocks match", src("remoteIpBlocks: [192.168.0.0/16]"), Plain, 5432, true, Some("back/p")),
        // notRemoteIpBlocks: excluded source does not match the ALLOW.
        case("notRemoteIpBlocks excludes", src("notRemoteIpBlocks: [192.168.0.0/16]"), Plain, 5432, false, None),
        // to.operation.ports: the destination pod's port.
        case("ports match", ap("back", "p", "{rules: [{to: [{operation: {ports: ['5432']}}]}]}"), Client, 5432, true, Some("back/p")),
        // ports: other port does not match.
        case("ports miss", ap("back", "p", "{rules: [{to: [{operation: {ports: ['5432']}}]}]}"), Client, 8080, false, None),
        // notPorts in a DENY: every other port is denied.
        case("DENY notPorts denies other port", ap("back", "d", "{action: DENY, rules: [{to: [{operation: {notPorts: [5432]}}]}]}"), Client, 8080, false, Some("back/d")),
        // notPorts in a DENY: the excluded port passes.
        case("DENY notPorts spares its port", ap("back", "d", "{action: DENY, rules: [{to: [{operation: {notPorts: [5432]}}]}]}"), Client, 5432, true, None),
        // when source.ip.
        case("when source.ip", when("{key: source.ip, values: [10.0.1.1]}"), Client, 5432, true, Some("back/w")),
        // when source.namespace notValues excludes.
        case("when source.namespace notValues", when("{key: source.namespace, notValues: [front]}"), Client, 5432, false, None),
        // when source.principal with a prefix.
        case("when source.principal", when("{key: source.principal, values: ['cluster.local/ns/other/*']}"), Other, 5432, true, Some("back/w")),
        // when destination.ip.
        case("when destination.ip", when("{key: destination.ip, values: [10.0.3.0/24]}"), Client, 5432, true, Some("back/w")),
        // when destination.port.
        case("when destination.port miss", when("{key: destination.port, values: ['8080']}"), Client, 5432, false, None),
        // when connection.sni: the inner SNI is not visible at L4, so values never match.
        case("when connection.sni never matches", when("{key: connection.sni, values: [db.back]}"), Client, 5432, false, None),
        // from, to and when of one rule are ANDed.
        case("from AND to", ap("back", "p", "{rules: [{from: [{source: {namespaces: [front]}}], to: [{operation: {ports: ['8080']}}]}]}"), Client, 5432, false, None),
        // values within a field are ORed.
        case("values OR", src("principals: [cluster.local/ns/x/sa/y, cluster.local/ns/front/sa/client]"), Client, 5432, true, Some("back/p")),
        // rules are ORed; the deciding rule index is reported.
        case("rules OR", ap("back", "p", "{rules: [{from: [{source: {namespaces: [x]}}]}, {from: [{source: {namespaces: [front]}}]}]}"), Client, 5432, true, Some("back/p")),
        // fields within one source are ANDed.
        case("source fields AND", src("namespaces: [front], ipBlocks: [10.0.2.0/24]"), Client, 5432, false, None),
        // DENY is evaluated before ALLOW: a matching DENY wins over a matching ALLOW.
        case("DENY beats ALLOW", format!("{}{}", ap("back", "all", "{rules: [{}]}"), deny_src("namespaces: [front]")), Client, 5432, false, Some("back/d")),
        // A policy applies only to its own namespace.
        case("other namespace out of scope", ap("front", "none", "{}"), Client, 5432, true, None),
        // A policy in the root namespace applies mesh-wide.
        case("root namespace is mesh-wide", ap("istio-system", "none", "{}"), Client, 5432, false, None),
        // selector.matchLabels narrows to matching workloads: not this one.
        case("selector not matching", ap("back", "none", "{selector: {matchLabels: {app: web}}}"), Client, 5432, true, None),
        // selector.matchLabels matching this workload.
        case("selector matching", ap("back", "none", "{selector: {matchLabels: {app: db}}}"), Client, 5432, false, None),
        // Root namespace policy with a selector applies to matching workloads in every namespace.
        case("root selector", ap("istio-system", "d", "{action: DENY, selector: {matchLabels: {app: db}}, rules: [{}]}"), Client, 5432, false, Some("istio-system/d")),
        // targetRefs attach to a waypoint/service: enforced by the waypoint, not by the node.
        case("targetRefs left to waypoint", ap("back", "wp", "{targetRefs: [{kind: Service, group: '', name: db}], rules: [{}], action: DENY}"), Client, 5432, true, None),
        // L7 fail-safe: an ALLOW rule with L7 attributes (methods) matches nothing at L4.
        case("L7 ALLOW fails safe", ap("back", "l7", "{rules: [{from: [{source: {namespaces: [front]}}], to: [{operation: {methods: [GET]}}]}]}"), Client, 5432, false, None),
        // L7 fail-safe: a DENY rule's L7 parts are ignored, its L4 parts still deny.
        case("L7 DENY applies L4 parts", ap("back", "l7", "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}], to: [{operation: {paths: [/admin]}}]}]}"), Other, 5432, false, Some("back/l7")),
        // ... and traffic not matching the L4 parts is untouched.
        case("L7 DENY spares others", ap("back", "l7", "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}], to: [{operation: {paths: [/admin]}}]}]}"), Client, 5432, true, None),
        // L7 fail-safe: a DENY `from` entry made only of L7 fields matches every source, so the
        // other entries of the same rule cannot narrow the deny.
        case("L7-only DENY entry matches all", ap("back", "l7", "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [front]}}]}]}"), Other, 5432, false, Some("back/l7")),
        // ... and the same for a `to` entry made only of L7 fields.
        case("L7-only DENY to entry matches all", ap("back", "l7", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}, {operation: {ports: ['1']}}]}]}"), Client, 5432, false, Some("back/l7")),
        // L7 fail-safe: a `when` on request.* in an ALLOW matches nothing.
        case("L7 when in ALLOW", when("{key: 'request.headers[x-user]', values: [me]}"), Client, 5432, false, None),
        // L7 fail-safe: requestPrincipals (JWT) in an ALLOW matches nothing.
        case("requestPrincipals ALLOW", src("requestPrincipals: ['*']"), Client, 5432, false, None),
        // AUDIT never changes the decision.
        case("AUDIT does not enforce", ap("back", "a", "{action: AUDIT, rules: [{}]}"), Client, 5432, true, None),
        // istio.io/dry-run: the policy is logged, not enforced.
        case("dry-run not enforced", "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: back, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{}]}\n", Client, 5432, true, None),
        // PeerAuthentication STRICT (namespace): plaintext refused.
        case("STRICT refuses plaintext", pa("back", "strict", "{mtls: {mode: STRICT}}"), Plain, 5432, false, Some("back/strict")),
        // STRICT does not affect mTLS (HBONE) peers.
        case("STRICT admits mTLS", pa("back", "strict", "{mtls: {mode: STRICT}}"), Client, 5432, true, None),
        // PERMISSIVE admits plaintext.
        case("PERMISSIVE admits plaintext", pa("back", "p", "{mtls: {mode: PERMISSIVE}}"), Plain, 5432, true, None),
        // Namespace PeerAuthentication overrides the mesh-wide one.
        case("namespace overrides mesh", format!("{}{}", pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"), pa("back", "ns", "{mtls: {mode: PERMISSIVE}}")), Plain, 5432, true, None),
        // Mesh-wide STRICT applies where nothing narrower is set.
        case("mesh-wide STRICT", pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"), Plain, 5432, false, Some("istio-system/mesh")),
        // portLevelMtls on a workload policy overrides for that port.
        case("portLevelMtls override", format!("{}{}", pa("back", "ns", "{mtls: {mode: STRICT}}"), pa("back", "db", "{selector: {matchLabels: {app: db}}, portLevelMtls: {5432: {mode: PERMISSIVE}}}")), Plain, 5432, true, None),
        // ... other ports fall back to the namespace mode.
        case("portLevelMtls other port", format!("{}{}", pa("back", "ns", "{mtls: {mode: STRICT}}"), pa("back", "db", "{selector: {matchLabels: {app: db}}, portLevelMtls: {5432: {mode: PERMISSIVE}}}")), Plain, 8080, false, Some("back/ns")),
        // DISABLE is ignored (ambient always uses mTLS): the mesh-wide STRICT still applies.
        case("DISABLE ignored", format!("{}{}", pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"), pa("back", "off", "{mtls: {mode: DISABLE}}")), Plain, 5432, false, Some("istio-system/mesh")),
    ];
    assert!(cases.len() >= 40, "the table must keep at least 40 cases");
    let mut failures = Vec::new();
    for c in &cases {
        let d = decide(&c.yaml, c.from, c.port);
        if d.allowed() != c.allow || d.reason.policy() != c.policy {
            failures.push(format!(
                "{}: got {} ({}), want allow={} policy={:?}",
                c.name, d.verdict, d.reason, c.allow, c.policy
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decision_details() {
    let d = decide(
        &ap("back", "p", "{rules: [{from: [{source: {namespaces: [x]}}]}, {from: [{source: {namespaces: [front]}}]}]}"),
        Src::Client,
        5432,
    );
    assert_eq!(
        d.reason,
        Reason::Allowed {
            policy: "back/p".into(),
            rule: 1
        }
    );
    let d = decide(
        &ap("back", "a", "{action: AUDIT, rules: [{}]}"),
        Src::Client,
        5432,
    );
    assert_eq!(d.audited, vec!["back/a".to_string()]);
    let yaml = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: back, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{}]}\n";
    let d = decide(yaml, Src::Client, 5432);
    assert_eq!(
        d.dry_run,
        Some((
            Verdict::Deny,
            Reason::Denied {
                policy: "back/d".into(),
                rule: 0
            }
        ))
    );
    let d = decide(&ap("back", "none", "{}"), Src::Client, 5432);
    assert_eq!(
        d.reason.to_string(),
        "no ALLOW policy matched (in scope: back/none)"
    );
}

/// IPv6 blocks match IPv6 sources (and destinations) and never IPv4 ones; a block of the
/// other family is simply not matched, so a dual-stack policy lists both.
#[test]
fn ipv6_blocks_match_ipv6_sources() {
    let labels: BTreeMap<String, String> = [("app".to_string(), "db".to_string())].into();
    let id = SpiffeId::new("cluster.local", "front", "client");
    let decide6 = |spec: &str, src: &str, dst: &str| {
        let reg = registry(&ap("back", "p", spec));
        assert!(reg.problems.iter().all(|p| !p.invalid), "{spec}");
        let req = Request {
            src_ip: src.parse().expect("ip"),
            src_identity: Some(&id),
            dst_namespace: "back",
            dst_labels: &crate::k8s::Labels::from(&labels),
            dst_ip: dst.parse().expect("ip"),
            dst_port: 5432,
        };
        evaluate(&reg, DEFAULT_ROOT_NAMESPACE, &req, false).allowed()
    };
    let allow = |blocks: &str| format!("{{rules: [{{from: [{{source: {{{blocks}}}}}]}}]}}");
    let v6 = allow("ipBlocks: [\"fd00:10:244::/48\"]");
    assert!(decide6(&v6, "fd00:10:244:1::11", "fd00:10:244:3::3"));
    assert!(!decide6(&v6, "fd00:10:245::1", "fd00:10:244:3::3"));
    assert!(!decide6(&v6, "10.0.1.1", DST_IP), "never across families");
    let both = allow("ipBlocks: [\"10.0.1.0/24\", \"fd00:10:244::/48\"]");
    assert!(decide6(&both, "10.0.1.1", DST_IP));
    assert!(decide6(&both, "fd00:10:244:1::11", "fd00:10:244:3::3"));
    let not = allow("notIpBlocks: [\"fd00:10:244:1::/64\"]");
    assert!(!decide6(&not, "fd00:10:244:1::11", "fd00:10:244:3::3"));
    assert!(decide6(&not, "fd00:10:244:2::11", "fd00:10:244:3::3"));
    let remote = allow("remoteIpBlocks: [\"fd00:10:244:1::11/128\"]");
    assert!(decide6(&remote, "fd00:10:244:1::11", "fd00:10:244:3::3"));
    assert!(!decide6(&remote, "fd00:10:244:1::12", "fd00:10:244:3::3"));
    let dst = "{rules: [{when: [{key: destination.ip, values: [\"fd00:10:244:3::/64\"]}]}]}";
    assert!(decide6(dst, "fd00:10:244:1::11", "fd00:10:244:3::3"));
    assert!(!decide6(dst, "10.0.1.1", DST_IP));
    assert!(Cidr::parse("fd00::/129").is_err(), "prefix over 128");
    assert_eq!(
        Cidr::parse("fd00::1").map(|c| c.prefix),
        Ok(128),
        "a bare address is a /128"
    );
}
