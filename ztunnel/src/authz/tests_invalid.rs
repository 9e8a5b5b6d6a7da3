//! Policies the daemon cannot fully understand fail closed: an invalid ALLOW allows nothing, an
//! invalid DENY or CUSTOM denies everything it selects, an invalid PeerAuthentication is read
//! as STRICT; each is listed in `Registry::problems` with its field.

use super::tests::{ap, decide_in, pa, registry, Src};
use super::*;
use crate::k8s;

const UNKNOWN_PRINCIPAL: &str = "spec.rules[0].from[0].source.principal";

fn problems(reg: &Registry) -> Vec<(String, String, bool)> {
    reg.problems
        .iter()
        .map(|p| (p.policy.clone(), p.field.clone(), p.invalid))
        .collect()
}

#[test]
fn invalid_policies_are_kept_with_object_and_field() {
    let yaml = [
        ap("back", "bad-action", "{action: PERMIT}"),
        ap(
            "back",
            "bad-cidr",
            "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}",
        ),
        ap(
            "back",
            "bad-port",
            "{rules: [{to: [{operation: {ports: ['http']}}]}]}",
        ),
        ap(
            "back",
            "bad-port2",
            "{rules: [{to: [{operation: {notPorts: [70000]}}]}]}",
        ),
        ap(
            "back",
            "bad-key",
            "{rules: [{when: [{key: source.colour, values: [red]}]}]}",
        ),
        ap("back", "empty-source", "{rules: [{from: [{source: {}}]}]}"),
        ap(
            "back",
            "typo",
            "{rules: [{from: [{source: {principal: [cluster.local/ns/front/sa/client]}}]}]}",
        ),
        ap(
            "back",
            "wrong-type",
            "{rules: [{from: [{source: {principals: cluster.local/ns/front/sa/client}}]}]}",
        ),
        ap("back", "top-level", "{action: ALLOW, rule: [{}]}"),
        pa("back", "bad-mode", "{mtls: {mode: SOMETIMES}}"),
        ap(
            "back",
            "good",
            "{rules: [{from: [{source: {namespaces: [front]}}]}]}",
        ),
    ]
    .concat();
    let reg = registry(&yaml);
    let got: Vec<(String, String)> = reg
        .problems
        .iter()
        .map(|p| (p.policy.clone(), p.field.clone()))
        .collect();
    let want = [
        ("back/bad-action", "spec.action"),
        ("back/bad-cidr", "spec.rules[0].from[0].source.ipBlocks[0]"),
        ("back/bad-port", "spec.rules[0].to[0].operation.ports[0]"),
        (
            "back/bad-port2",
            "spec.rules[0].to[0].operation.notPorts[0]",
        ),
        ("back/bad-key", "spec.rules[0].when[0].key"),
        ("back/empty-source", "spec.rules[0].from[0].source"),
        ("back/typo", UNKNOWN_PRINCIPAL),
        ("back/wrong-type", "spec.rules[0].from[0].source.principals"),
        ("back/top-level", "spec.rule"),
        ("back/bad-mode", "spec.mtls.mode"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    assert_eq!(got, want);
    assert!(reg.problems.iter().all(|p| p.invalid));
    let typo = &reg.problems[6];
    assert!(
        typo.message.starts_with("unknown field `principal`"),
        "{typo:?}"
    );
    assert!(typo.effect.starts_with("it allows nothing"), "{typo:?}");
    // Every one stays in force (failing closed), next to the valid policy.
    assert_eq!(reg.len(), 10);
    assert_eq!(reg.peer_authentications["back"].len(), 1);
    // An unknown action is read as the stricter DENY.
    assert_eq!(reg.problems[0].action, "DENY");
    let counts = reg.invalid_counts();
    assert_eq!(counts[&("AuthorizationPolicy", "ALLOW")], 8);
    assert_eq!(counts[&("AuthorizationPolicy", "DENY")], 1);
    assert_eq!(counts[&("PeerAuthentication", "STRICT")], 1);
}

#[test]
fn principal_typo_allow_denies_the_client_it_meant_to_admit() {
    let typo = ap(
        "back",
        "allow-client",
        "{selector: {matchLabels: {app: db}}, rules: [{from: [{source: {principal: [cluster.local/ns/front/sa/client]}}]}]}",
    );
    let reg = registry(&typo);
    let d = decide_in(&reg, Src::Client, 5432);
    assert_eq!(d.verdict, Verdict::Deny);
    let text = d.reason.to_string();
    assert!(
        text.starts_with(&format!(
            "denied: policy back/allow-client failed validation (field `{UNKNOWN_PRINCIPAL}`: \
             unknown field `principal`"
        )),
        "{text}"
    );
    assert!(text.contains("; it allows nothing"), "{text}");
    assert_eq!(d.reason.policy(), Some("back/allow-client"));

    // A misspelled key next to a valid one does not leave a wider rule behind.
    let wider = ap(
        "back",
        "allow-client",
        "{rules: [{from: [{source: {principals: [cluster.local/ns/front/sa/client], namespace: [other]}}]}]}",
    );
    let reg = registry(&wider);
    assert_eq!(
        problems(&reg),
        [(
            "back/allow-client".into(),
            "spec.rules[0].from[0].source.namespace".into(),
            true
        )]
    );
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
    assert!(!decide_in(&reg, Src::Other, 5432).allowed());

    // Another valid ALLOW still admits what it matches.
    let both = typo
        + &ap(
            "back",
            "allow-other",
            "{rules: [{from: [{source: {namespaces: [other]}}]}]}",
        );
    let reg = registry(&both);
    assert!(decide_in(&reg, Src::Other, 5432).allowed());
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
}

#[test]
fn invalid_deny_denies_everything_it_selects() {
    let deny = |selector: &str| {
        ap(
            "back",
            "deny-bad",
            &format!("{{action: DENY, {selector} rules: [{{from: [{{source: {{ipBlock: [10.0.0.0/8]}}}}]}}]}}"),
        )
    };
    // Selects db: every flow to it is denied, whatever the source.
    let reg = registry(&deny("selector: {matchLabels: {app: db}},"));
    for src in [Src::Client, Src::Other, Src::Plain] {
        let d = decide_in(&reg, src, 5432);
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(matches!(d.reason, Reason::Invalid { .. }), "{:?}", d.reason);
        assert!(
            d.reason
                .to_string()
                .contains("it denies all traffic to the workloads it applies to"),
            "{}",
            d.reason
        );
    }
    // Selects another workload: db is not affected.
    let reg = registry(&deny("selector: {matchLabels: {app: web}},"));
    assert!(decide_in(&reg, Src::Client, 5432).allowed());
    // A selector that cannot be read is read as the whole namespace.
    let reg = registry(&deny("selector: {matchLabel: {app: web}},"));
    assert_eq!(reg.problems[0].field, "spec.selector.matchLabel");
    assert!(
        reg.problems[0]
            .effect
            .contains("every workload of its namespace"),
        "{:?}",
        reg.problems[0]
    );
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
    // A spec that is not a mapping has no readable action: read as DENY.
    let reg = registry(&ap("back", "junk", "[1, 2]"));
    assert_eq!(reg.problems[0].action, "DENY");
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
}

#[test]
fn custom_denies_what_its_rules_match() {
    let reg = registry(&ap(
        "back",
        "ext",
        "{action: CUSTOM, provider: {name: ext-authz}, rules: [{from: [{source: {namespaces: [other]}}]}]}",
    ));
    assert_eq!(
        problems(&reg),
        [("back/ext".into(), "spec.action".into(), false)]
    );
    let d = decide_in(&reg, Src::Other, 5432);
    assert_eq!(
        d.reason,
        Reason::Custom {
            policy: "back/ext".into(),
            rule: 0
        }
    );
    assert!(decide_in(&reg, Src::Client, 5432).allowed());
    // An invalid CUSTOM denies all.
    let reg = registry(&ap(
        "back",
        "ext",
        "{action: CUSTOM, rules: [{when: [{key: source.colour, values: [x]}]}]}",
    ));
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
}

#[test]
fn deny_entry_of_only_l7_fields_matches_all_traffic() {
    let reg = registry(&ap(
        "back",
        "deny",
        "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [other]}}]}]}",
    ));
    assert!(reg.problems.iter().all(|p| !p.invalid));
    for src in [Src::Client, Src::Other, Src::Plain] {
        let d = decide_in(&reg, src, 5432);
        assert_eq!(
            d.reason,
            Reason::Denied {
                policy: "back/deny".into(),
                rule: 0
            }
        );
    }
    let reg = registry(&ap(
        "back",
        "deny",
        "{action: DENY, rules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: [1]}}]}]}",
    ));
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
}

#[test]
fn invalid_audit_is_reported_only_and_dry_run_is_honoured() {
    let reg = registry(&ap(
        "back",
        "audit",
        "{action: AUDIT, rules: [{when: [{key: nope, values: [x]}]}]}",
    ));
    assert!(reg.is_empty());
    assert_eq!(reg.problems[0].action, "AUDIT");
    assert!(decide_in(&reg, Src::Client, 5432).allowed());

    let yaml = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: back, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{bogus: 1}]}\n";
    let reg = registry(yaml);
    let d = decide_in(&reg, Src::Client, 5432);
    assert!(d.allowed());
    assert!(matches!(
        d.dry_run,
        Some((Verdict::Deny, Reason::Invalid { .. }))
    ));
    // A malformed dry-run annotation makes the policy invalid and enforced.
    let yaml = yaml.replace("'true'", "'yes'");
    let reg = registry(&yaml);
    assert!(!decide_in(&reg, Src::Client, 5432).allowed());
}

#[test]
fn invalid_peer_authentication_is_read_as_strict() {
    for spec in [
        "{mtls: {mode: STRCT}}",
        "{mtls: {mode: PERMISSIVE, extra: 1}}",
        "{mtls: {mod: STRICT}}",
        "{mtls: {mode: PERMISSIVE}, portLevelMtls: {5432: {mode: STRICT}}}",
        "{selector: {matchLabels: {app: db}}, portLevelMtls: {5432: {mode: STRICT, x: 1}}}",
    ] {
        let reg = registry(&pa("back", "mtls", spec));
        assert_eq!(reg.problems.len(), 1, "{spec}");
        let d = decide_in(&reg, Src::Plain, 5432);
        assert_eq!(d.verdict, Verdict::Deny, "{spec}");
        let text = d.reason.to_string();
        assert!(
            text.starts_with("plaintext refused: PeerAuthentication back/mtls failed validation"),
            "{spec}: {text}"
        );
        assert!(text.ends_with("it is read as STRICT"), "{text}");
        // HBONE flows are mTLS anyway.
        assert!(decide_in(&reg, Src::Client, 5432).allowed(), "{spec}");
    }
    // Next to a valid PERMISSIVE of the same scope, the invalid one wins.
    let yaml = pa("back", "a-permissive", "{mtls: {mode: PERMISSIVE}}")
        + &pa("back", "b-broken", "{mtls: {mode: STRICT, extra: 1}}");
    let reg = registry(&yaml);
    assert!(!decide_in(&reg, Src::Plain, 5432).allowed());
}

#[test]
fn only_spec_is_policed() {
    // Fields an API server adds (status, metadata extras, apiVersion details) are normal.
    let json = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "back", "resourceVersion": "7",
                     "managedFields": [{"manager": "kubectl"}], "generation": 2},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]},
        "status": {"validationMessages": [{"type": {"code": "IST0001"}}]},
    });
    let Ok(Some(k8s::Object::AuthorizationPolicy(p))) = k8s::from_json_text(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        &json.to_string(),
    ) else {
        panic!("types");
    };
    assert_eq!(p.spec_error, None);
    // The same object from the API server with a misspelled key: kept, with the field.
    let mut bad = json;
    bad["spec"]["rules"][0]["from"][0]["source"]["namespace"] = serde_json::json!(["x"]);
    let Ok(Some(k8s::Object::AuthorizationPolicy(p))) = k8s::from_json_text(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        &bad.to_string(),
    ) else {
        panic!("types");
    };
    let e = p.spec_error.expect("unknown field found");
    assert_eq!(e.field, "spec.rules[0].from[0].source.namespace");
    assert_eq!(p.spec.action.as_deref(), Some("DENY"));
}

#[test]
fn l7_rules_are_caveats_not_errors() {
    let reg = registry(&ap(
        "back",
        "l7",
        "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
    ));
    assert_eq!(reg.problems.len(), 1);
    let p = &reg.problems[0];
    assert!(!p.invalid);
    assert_eq!(p.field, "spec.rules[0]");
    assert!(p.message.contains("matches nothing"), "{p:?}");
}
