//! `ztunnel analyze --state DIR`: lists every object of a state the daemon would reject or
//! apply with a caveat, with what it means for traffic, before it is deployed (or to explain a
//! running daemon's warnings). It reads the files as the daemon does and compiles the policies
//! with the same code ([`crate::authz::Registry::build`] through [`State::build`]), so the list
//! is the daemon's own.
//!
//! Exit status: 0 clean, 1 when any object is rejected or applied with a caveat, 2 when the
//! state cannot be read at all.

use std::path::PathBuf;

use clap::Args;

use super::authz_check::{read_file, state_files, CheckError};
use crate::authz::compile;
use crate::k8s::{self, Object};
use crate::state::State;

/// Arguments of `ztunnel analyze`.
#[derive(Debug, Clone, Args)]
pub struct AnalyzeArgs {
    /// File or directory of Kubernetes YAML, as given to the daemon's --state.
    #[arg(long)]
    pub state: PathBuf,
    /// SPIFFE trust domain of identities.
    #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `REJECTED` (not applied), `INVALID` (applied failing closed) or `CAVEAT`.
    pub status: &'static str,
    /// What it is about: `file: document N`, or `Kind namespace/name (ACTION)`.
    pub object: String,
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// What it means for traffic.
    pub means: String,
}

/// Reads the state and lists the findings, in file order then policy order.
pub fn analyze(args: &AnalyzeArgs) -> Result<Vec<Finding>, CheckError> {
    let mut findings = Vec::new();
    let mut objects = Vec::new();
    for f in state_files(&args.state)? {
        match k8s::parse_file(&f, &read_file(&f)?) {
            Ok(objs) => objects.extend(objs),
            Err(e) => findings.push(Finding {
                status: "REJECTED",
                object: format!("{}: document {}", e.file.display(), e.document),
                field: e.field,
                message: e.message,
                means: "no object of this file is applied: the daemon keeps the file's \
                        previous content (nothing, at start)"
                    .into(),
            }),
        }
    }
    // Waypoint-attached policies are compiled by the waypoint, not here; the checks both share
    // (the spec's shape, the action, dry run, selector with targetRefs) are reported anyway.
    for obj in objects.iter().filter_map(|o| match o {
        Object::AuthorizationPolicy(p) => Some(p),
        _ => None,
    }) {
        let spec = &obj.spec;
        if (spec.target_ref.is_none() && spec.target_refs.is_empty()) || spec.selector.is_some() {
            continue;
        }
        let head = compile::head(obj);
        if let Some(e) = head.invalid {
            findings.push(Finding {
                status: "INVALID",
                object: format!(
                    "AuthorizationPolicy {}/{} ({}, waypoint)",
                    obj.metadata.namespace.as_deref().unwrap_or_default(),
                    obj.metadata.name,
                    head.action.as_str()
                ),
                field: e.field,
                message: e.message,
                means: format!(
                    "enforced by the waypoint failing closed: {}",
                    compile::fail_closed_effect(head.action)
                ),
            });
        }
    }
    let state = State::build(0, &args.trust_domain, &objects);
    for p in &state.authz.problems {
        findings.push(Finding {
            status: if p.invalid { "INVALID" } else { "CAVEAT" },
            object: format!("{} {} ({})", p.kind, p.policy, p.action),
            field: p.field.clone(),
            message: p.message.clone(),
            means: p.effect.clone(),
        });
    }
    Ok(findings)
}

/// Runs the command; prints the findings and returns the exit status (0, 1 or 2).
pub fn run(args: &AnalyzeArgs) -> u8 {
    let findings = match analyze(args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ztunnel analyze: {e}");
            return 2;
        }
    };
    for f in &findings {
        println!(
            "{:<8}  {}: field `{}`: {}",
            f.status, f.object, f.field, f.message
        );
        println!("{:<8}  means: {}", "", f.means);
    }
    let count = |s: &str| findings.iter().filter(|f| f.status == s).count();
    println!(
        "{}: {} rejected, {} invalid (enforced failing closed), {} with a caveat",
        args.state.display(),
        count("REJECTED"),
        count("INVALID"),
        count("CAVEAT")
    );
    u8::from(!findings.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: mesh, labels: {app: b}}\nspec: {nodeName: n1, serviceAccountName: server}\nstatus: {podIP: 10.244.2.11, phase: Running}\n";

    fn policy(name: &str, spec: &str) -> String {
        format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: mesh}}\nspec: {spec}\n")
    }

    fn run_on(files: &[(&str, String)]) -> (u8, Vec<Finding>) {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let args = AnalyzeArgs {
            state: dir.path().to_path_buf(),
            trust_domain: "cluster.local".into(),
        };
        (run(&args), analyze(&args).expect("reads"))
    }

    #[test]
    fn clean_state_exits_0() {
        let (code, findings) = run_on(&[(
            "a.yaml",
            POD.to_string() + &policy("ok", "{rules: [{from: [{source: {namespaces: [mesh]}}]}]}"),
        )]);
        assert_eq!((code, findings), (0, Vec::new()));
    }

    #[test]
    fn rejected_invalid_and_caveats_exit_1_with_field_and_meaning() {
        let (code, findings) = run_on(&[
            (
                "a.yaml",
                POD.to_string()
                    + &policy(
                        "typo",
                        "{selector: {matchLabels: {app: b}}, rules: [{from: [{source: {principal: [x]}}]}]}",
                    )
                    + &policy("l7", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}")
                    + &policy(
                        "wp",
                        "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}], action: DENY, rules: [{bogus: 1}]}",
                    ),
            ),
            ("b.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: mesh}\nspec: {ports: [{port: abc}]}\n".into()),
        ]);
        assert_eq!(code, 1);
        let got: Vec<(&str, &str, &str)> = findings
            .iter()
            .skip(1)
            .map(|f| (f.status, f.object.as_str(), f.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "INVALID",
                    "AuthorizationPolicy mesh/wp (DENY, waypoint)",
                    "spec.rules[0].bogus"
                ),
                (
                    "CAVEAT",
                    "AuthorizationPolicy mesh/l7 (DENY)",
                    "spec.rules[0]"
                ),
                (
                    "INVALID",
                    "AuthorizationPolicy mesh/typo (ALLOW)",
                    "spec.rules[0].from[0].source.principal"
                ),
            ]
        );
        assert_eq!(
            (findings[0].status, findings[0].field.as_str()),
            ("REJECTED", "spec.ports[0].port")
        );
        assert!(findings[0].object.ends_with("b.yaml: document 0"));
        assert!(
            findings[3].means.starts_with("it allows nothing"),
            "{:?}",
            findings[3]
        );
        assert_eq!(
            findings[3].message,
            "unknown field `principal` (did you mean `principals`?)"
        );
    }

    #[test]
    fn unreadable_state_exits_2() {
        let args = AnalyzeArgs {
            state: PathBuf::from("/nonexistent/state"),
            trust_domain: "cluster.local".into(),
        };
        assert_eq!(run(&args), 2);
    }
}
