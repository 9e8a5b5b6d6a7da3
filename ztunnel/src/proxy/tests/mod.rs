//! In-process tests of the flow layer, as a normal user: no root, no namespaces, no eBPF.
//!
//! `route` checks the pure decisions against states built from Kubernetes YAML. `flows` runs
//! real flows: two daemons' proxies in one process, real TLS and HTTP/2 between them, with
//! [`crate::socket::PlainSockets`] and every pod on a loopback address of its own, so source
//! addresses are kept end to end as they are in a cluster. What they cannot show (the capture
//! itself, transparent sockets, marks) is covered by the namespace tests in `tests/`.

mod flows;
mod handoff;
mod route;

use std::path::Path;

use crate::state::State;

/// A state from multi-document Kubernetes YAML.
fn state(yaml: &str) -> State {
    let objs = crate::k8s::parse_file(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    State::build(1, "cluster.local", &objs)
}

/// A pod document: `name` in `ns` on `node` at `ip`, with extra `labels` (a YAML flow map
/// body) and named container ports (`name: port` pairs).
fn pod(name: &str, ns: &str, node: &str, ip: &str, labels: &str, ports: &[(&str, u16)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p)| format!("{{name: {n}, containerPort: {p}}}"))
        .collect();
    format!(
        "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}, \
         spec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{ports: [{}]}}]}}, \
         status: {{podIP: \"{ip}\", phase: Running}}}}\n",
        ports.join(", ")
    )
}

/// A ClusterIP service document selecting `app: <selector>`, with `(port, targetPort)` pairs
/// (a target port is a number or a container port name).
fn service(name: &str, ns: &str, vip: &str, selector: &str, ports: &[(u16, &str)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(p, t)| format!("{{port: {p}, targetPort: {t}}}"))
        .collect();
    format!(
        "---\n{{apiVersion: v1, kind: Service, metadata: {{name: {name}, namespace: {ns}}}, \
         spec: {{clusterIP: \"{vip}\", selector: {{app: {selector}}}, ports: [{}]}}}}\n",
        ports.join(", ")
    )
}

/// The namespaces every test uses: `mesh` (ambient) and `plain` (not enrolled).
const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
";
