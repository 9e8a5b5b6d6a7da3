//! Cost of one authorization decision with 10,000 AuthorizationPolicies in the registry.
//!
//! `cargo bench -p ztunnel --bench authz` (optionally `-- <iterations>`). Prints the median
//! and 99th percentile of single decisions for two layouts:
//!
//! - `spread`: 10,000 policies over 100 namespaces (100 each, selectors on 10 apps), plus 10
//!   mesh-wide ones in the root namespace: the realistic case, where the namespace index
//!   leaves ~110 candidates and the selectors ~20.
//! - `one-namespace`: all 10,000 in the destination's namespace without selectors, the
//!   flow matched by none until the last: the worst case, a full scan of every rule.
//!
//! No criterion: the figure is what matters (recorded in docs/AUTHZ.md), and a plain loop
//! around `Instant` over the public `evaluate` is enough to measure it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Instant;

use ztunnel::authz::{evaluate, Registry, Request, DEFAULT_ROOT_NAMESPACE};
use ztunnel::identity::SpiffeId;
use ztunnel::k8s::{self, Object};

fn policy(out: &mut String, ns: &str, name: &str, selector: Option<&str>, i: usize, action: &str) {
    let sel = selector
        .map(|app| format!("selector: {{matchLabels: {{app: {app}}}}}, "))
        .unwrap_or_default();
    let _ = write!(
        out,
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{{sel}action: {action}, rules: [\
         {{from: [{{source: {{principals: [cluster.local/ns/src{i}/sa/a, 'cluster.local/ns/pre{i}/*']}}}}], to: [{{operation: {{ports: ['{p}']}}}}]}}, \
         {{from: [{{source: {{namespaces: [other{i}], ipBlocks: [10.{a}.{b}.0/24]}}}}]}}, \
         {{when: [{{key: source.ip, values: [172.16.{a}.{b}]}}]}}]}}\n",
        p = 1000 + i % 60000,
        a = i / 256 % 256,
        b = i % 256,
    );
}

fn registry(yaml: &str) -> Registry {
    let objs = k8s::parse_file(Path::new("bench.yaml"), yaml).expect("bench YAML parses");
    let ap: Vec<_> = objs
        .iter()
        .filter_map(|o| match o {
            Object::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    let reg = Registry::build(ap, std::iter::empty());
    assert!(reg.problems.is_empty(), "{:?}", reg.problems);
    reg
}

fn measure(name: &str, reg: &Registry, iterations: usize, want_allow: bool) {
    let id = SpiffeId::new("cluster.local", "client-ns", "client");
    let labels: BTreeMap<String, String> = [("app".to_string(), "app3".to_string())].into();
    let req = Request {
        src_ip: "10.250.1.1".parse().expect("ip"),
        src_identity: Some(&id),
        dst_namespace: "ns7",
        dst_labels: &ztunnel::k8s::Labels::from(&labels),
        dst_ip: "10.244.7.7".parse().expect("ip"),
        dst_port: 8080,
    };
    // Warm up, and check the decision is the intended one (a full evaluation, not a shortcut).
    let d = evaluate(reg, DEFAULT_ROOT_NAMESPACE, &req, false);
    assert_eq!(d.allowed(), want_allow, "{name}: {d:?}");
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let d = evaluate(reg, DEFAULT_ROOT_NAMESPACE, &req, false);
        times.push(t.elapsed());
        std::hint::black_box(d);
    }
    times.sort();
    let pct = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!(
        "authz/{name}: policies={} decision median={:?} p99={:?} ({} iterations)",
        reg.len(),
        pct(0.5),
        pct(0.99),
        iterations
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a number sets the iteration count.
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);

    let mut spread = String::new();
    for ns in 0..100 {
        for j in 0..100 {
            let i = ns * 100 + j;
            let app = format!("app{}", j % 10);
            policy(
                &mut spread,
                &format!("ns{ns}"),
                &format!("p{j}"),
                Some(&app),
                i,
                "ALLOW",
            );
        }
    }
    for j in 0..10 {
        policy(
            &mut spread,
            DEFAULT_ROOT_NAMESPACE,
            &format!("mesh{j}"),
            None,
            20_000 + j,
            "DENY",
        );
    }
    let t = Instant::now();
    let reg = registry(&spread);
    println!(
        "authz/spread: parsed and compiled {} policies in {:?}",
        reg.len(),
        t.elapsed()
    );
    // ALLOW policies select app3 but none matches the client: the default-deny path, which
    // evaluates every candidate.
    measure("spread", &reg, iterations, false);

    let mut one = String::new();
    for i in 0..10_000 {
        policy(&mut one, "ns7", &format!("p{i:05}"), None, i, "ALLOW");
    }
    let reg = registry(&one);
    measure("one-namespace", &reg, (iterations / 10).max(50), false);
}
