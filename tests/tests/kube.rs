//! The Kubernetes API-server harness (`mesh_tests::kube`) against a real kube-apiserver 1.20
//! and etcd: the repository's CRDs are accepted and serve both versions, the ztunnel RBAC of
//! `deploy/rbac/` reads what the daemon needs and nothing else, and an API-server outage keeps
//! the stored objects. No daemon involved: if these fail, no daemon test against the API
//! server means anything.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use mesh_tests::cluster::{run, Cluster, ClusterSpec};
use mesh_tests::kube::{deploy_dir, ApiServer, Options, RoleRef};
use serde_json::{json, Value};

const POLICY_V1: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-a
  namespace: mesh
spec:
  action: ALLOW
  selector:
    matchLabels:
      app: b
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/mesh/sa/a]
    to:
    - operation:
        ports: [\"8080\"]
    futureField: kept
";

const POLICY_V1BETA1: &str = "\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-c
  namespace: mesh
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: [other]
";

fn start() -> ApiServer {
    match ApiServer::start() {
        Ok(s) => s,
        Err(e) => panic!("the API server harness starts: {e:#}"),
    }
}

/// The `.spec` of `kind/name` in namespace `mesh`, read through the admin kubeconfig.
fn spec_of(api: &ApiServer, resource: &str, name: &str) -> Value {
    api.kubectl_json(&["get", resource, name, "-n", "mesh"])
        .unwrap_or_else(|e| panic!("reading {resource} {name}: {e:#}"))["spec"]
        .clone()
}

#[test]
fn kube_crds_established_and_serve_both_versions() {
    let api = start();
    let crds = api
        .kubectl_json(&["get", "crd"])
        .expect("list CRDs")
        .clone();
    let mut established: Vec<String> = crds["items"]
        .as_array()
        .expect("CRD list has items")
        .iter()
        .filter(|crd| {
            crd["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
        .filter_map(|crd| crd["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    established.sort();
    assert_eq!(
        established,
        [
            "authorizationpolicies.security.istio.io",
            "gateways.gateway.networking.k8s.io",
            "httproutes.gateway.networking.k8s.io",
            "peerauthentications.security.istio.io",
        ]
    );

    api.ensure_namespace("mesh").expect("namespace mesh");
    api.apply(POLICY_V1)
        .expect("apply a v1 AuthorizationPolicy");
    api.apply(POLICY_V1BETA1)
        .expect("apply a v1beta1 AuthorizationPolicy");

    // Each reads back through both versions, unchanged, unknown fields included.
    for version in ["v1", "v1beta1"] {
        let resource = format!("authorizationpolicies.{version}.security.istio.io");
        let a = spec_of(&api, &resource, "allow-a");
        assert_eq!(a["action"], "ALLOW", "{version}: {a}");
        assert_eq!(
            a["rules"][0]["from"][0]["source"]["principals"],
            json!(["cluster.local/ns/mesh/sa/a"])
        );
        assert_eq!(
            a["rules"][0]["to"][0]["operation"]["ports"],
            json!(["8080"])
        );
        assert_eq!(
            a["rules"][0]["futureField"], "kept",
            "unknown fields are kept"
        );
        let c = spec_of(&api, &resource, "deny-c");
        assert_eq!(c["action"], "DENY", "{version}: {c}");
        assert_eq!(
            c["rules"][0]["from"][0]["source"]["namespaces"],
            json!(["other"])
        );
    }
    let list = api
        .kubectl(&["get", "ap", "-n", "mesh", "-o", "name"])
        .expect("list by short name");
    assert_eq!(
        list.lines().collect::<Vec<_>>(),
        [
            "authorizationpolicy.security.istio.io/allow-a",
            "authorizationpolicy.security.istio.io/deny-c"
        ]
    );

    // The schema refuses what the daemon could not read.
    let bad = POLICY_V1.replace("action: ALLOW", "action: PERMIT");
    let err = api
        .apply(&bad)
        .expect_err("an unknown action is refused")
        .to_string();
    assert!(err.contains("spec.action"), "{err}");

    // The other kinds: PeerAuthentication, Gateway and HTTPRoute, in both versions.
    api.apply(
        "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec:
  mtls: {mode: STRICT}
  portLevelMtls:
    \"9090\": {mode: PERMISSIVE}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: waypoint, namespace: mesh}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-b, namespace: mesh}
spec:
  parentRefs:
  - {group: \"\", kind: Service, name: b, port: 8080}
  hostnames: [b.mesh.svc.cluster.local]
  rules:
  - backendRefs:
    - {name: b, port: 8080}
",
    )
    .expect("apply PeerAuthentication, Gateway, HTTPRoute");
    let pa = spec_of(&api, "peerauthentications.v1.security.istio.io", "strict");
    assert_eq!(pa["mtls"]["mode"], "STRICT");
    assert_eq!(pa["portLevelMtls"]["9090"]["mode"], "PERMISSIVE");
    let gw = spec_of(&api, "gateways.v1.gateway.networking.k8s.io", "waypoint");
    assert_eq!(gw["listeners"][0]["port"], 15008);
    let route = spec_of(&api, "httproutes.v1beta1.gateway.networking.k8s.io", "to-b");
    assert_eq!(route["rules"][0]["backendRefs"][0]["name"], "b");
    let err = api
        .apply(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: no-listeners, namespace: mesh}
spec: {gatewayClassName: istio}
",
        )
        .expect_err("a Gateway without listeners is refused")
        .to_string();
    assert!(err.contains("listeners"), "{err}");
}

#[test]
fn kube_ztunnel_service_account_reads_only_what_it_needs() {
    let api = start();
    api.ensure_namespace("istio-system").expect("istio-system");
    api.apply_path(&deploy_dir().join("rbac").join("ztunnel.yaml"))
        .expect("apply deploy/rbac/ztunnel.yaml");
    let ztunnel = api
        .service_account_kubeconfig("istio-system", "ztunnel")
        .expect("a kubeconfig with a bound token of istio-system/ztunnel");

    // A pod whose status the test sets, as a kubelet would.
    api.ensure_namespace("mesh").expect("namespace mesh");
    api.apply(
        "apiVersion: v1
kind: Pod
metadata: {name: a, namespace: mesh, labels: {app: a}}
spec:
  nodeName: node1
  containers: [{name: app, image: meshapp}]
",
    )
    .expect("create pod mesh/a");
    let pod = api
        .patch_status(
            "pods",
            "mesh",
            "a",
            &json!({"status": {"phase": "Running", "podIP": "10.244.1.11",
                               "podIPs": [{"ip": "10.244.1.11"}]}}),
        )
        .expect("patch the pod's status subresource");
    assert_eq!(pod["status"]["podIP"], "10.244.1.11");

    let pods = api
        .kubectl_as(
            &ztunnel,
            &[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={.items[*].status.podIP}",
            ],
        )
        .expect("ztunnel lists pods in every namespace");
    assert_eq!(pods.trim(), "10.244.1.11");
    for resource in [
        "services",
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "gateways.gateway.networking.k8s.io",
        "httproutes.gateway.networking.k8s.io",
    ] {
        api.kubectl_as(&ztunnel, &["get", resource, "-A"])
            .unwrap_or_else(|e| panic!("ztunnel lists {resource}: {e:#}"));
    }

    // A real watch: the initial events of every namespace, then the server ends it.
    let watch = api
        .kubectl_as(
            &ztunnel,
            &[
                "get",
                "--raw",
                "/api/v1/namespaces?watch=1&timeoutSeconds=1",
            ],
        )
        .expect("ztunnel watches namespaces");
    let events: Vec<Value> = watch
        .lines()
        .map(|l| serde_json::from_str(l).expect("a watch event is JSON"))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "ADDED" && e["object"]["metadata"]["name"] == "istio-system"),
        "{watch}"
    );

    // Secrets: refused by the API server, not just absent.
    let out = api
        .kubectl_output(&ztunnel, &["get", "secrets", "-n", "istio-system"], None)
        .expect("run kubectl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ztunnel read secrets");
    assert!(stderr.contains("Forbidden"), "{stderr}");
    assert!(
        stderr.contains("system:serviceaccount:istio-system:ztunnel"),
        "refused as the service account: {stderr}"
    );
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("watch", "secrets"),
        ("create", "pods"),
        ("update", "authorizationpolicies.security.istio.io"),
        ("delete", "namespaces"),
        ("list", "configmaps"),
    ] {
        let out = api
            .kubectl_output(&ztunnel, &["auth", "can-i", verb, resource, "-A"], None)
            .expect("run kubectl auth can-i");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "ztunnel may {verb} {resource}"
        );
    }
    for (verb, resource) in [("watch", "namespaces"), ("list", "pods")] {
        let out = api
            .kubectl_output(&ztunnel, &["auth", "can-i", verb, resource, "-A"], None)
            .expect("run kubectl auth can-i");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
    }

    // A service account bound by the harness to a namespaced role sees only its namespace.
    api.apply(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: mesh}
rules:
- {apiGroups: [\"\"], resources: [pods], verbs: [get, list, watch]}
",
    )
    .expect("role pod-reader");
    let reader = api
        .create_service_account("mesh", "reader", RoleRef::Role("pod-reader"))
        .expect("service account bound to pod-reader in mesh");
    api.kubectl_as(&reader, &["get", "pods", "-n", "mesh"])
        .expect("reader lists pods in mesh");
    let err = api
        .kubectl_as(&reader, &["get", "pods", "-n", "istio-system"])
        .expect_err("reader is refused elsewhere")
        .to_string();
    assert!(err.contains("Forbidden"), "{err}");
}

#[test]
fn kube_apiserver_outage_keeps_objects() {
    let mut api = start();
    api.ensure_namespace("mesh").expect("namespace mesh");
    api.apply(POLICY_V1).expect("apply");
    api.ensure_namespace("istio-system").expect("istio-system");
    api.apply_path(&deploy_dir().join("rbac"))
        .expect("apply deploy/rbac");
    let ztunnel = api
        .service_account_kubeconfig("istio-system", "ztunnel")
        .expect("ztunnel kubeconfig");
    let port = api.port();
    let first_log = api.log_path().to_path_buf();

    api.stop_apiserver().expect("stop kube-apiserver");
    assert!(!api.apiserver_running());
    let out = api
        .kubectl_output(
            api.kubeconfig(),
            &["get", "ns", "--request-timeout=3s"],
            None,
        )
        .expect("run kubectl");
    assert!(!out.status.success(), "the API server still answers");
    // What the daemon tests do: leave it down for a while, then bring it back.
    std::thread::sleep(Duration::from_secs(2));
    api.restart_apiserver().expect("restart kube-apiserver");
    assert_eq!(api.port(), port, "same port");

    let a = spec_of(
        &api,
        "authorizationpolicies.v1beta1.security.istio.io",
        "allow-a",
    );
    assert_eq!(a["action"], "ALLOW");
    // The token issued before the outage is still valid (same signing key, same etcd).
    api.kubectl_as(
        &ztunnel,
        &[
            "get",
            "authorizationpolicies.security.istio.io",
            "-n",
            "mesh",
        ],
    )
    .expect("the ztunnel token survives the restart");
    assert_ne!(
        api.log_path(),
        first_log,
        "the restart logs to a file of its own"
    );
}

#[test]
fn kube_start_failure_names_the_cause() {
    let opts = Options {
        extra_args: vec!["--no-such-flag=1".into()],
        install_crds: false,
        ..Options::default()
    };
    let err = ApiServer::start_with(opts).expect_err("an unknown flag fails the start");
    let err = format!("{err:#}");
    assert!(err.contains("kube-apiserver exited"), "{err}");
    assert!(
        err.contains("no-such-flag"),
        "the log tail is in the error: {err}"
    );
    // The work dir stays for inspection and is named; this failure was the point, so go.
    let kept = err
        .split("work dir kept: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("the error names the kept work dir: {err}"));
    assert!(std::path::Path::new(kept)
        .join("kube-apiserver.log")
        .is_file());
    std::fs::remove_dir_all(kept).expect("remove the kept work dir");
}

/// The daemons of a test cluster run in node namespaces, where the test process's loopback is
/// out of reach: the API server can run inside the fabric namespace instead, on an address of
/// its bridge, and the nodes reach it over the fabric with TLS naming that address.
#[test]
fn kube_apiserver_inside_a_test_namespace() {
    let cluster = Cluster::start(ClusterSpec::new(1)).expect("cluster starts");
    let fabric = cluster.fabric_netns();
    run(Command::new("ip").args([
        "-n",
        &fabric,
        "addr",
        "add",
        "192.168.200.250/24",
        "dev",
        "br0",
    ]))
    .expect("an address on the fabric bridge");
    let address: IpAddr = "192.168.200.250".parse().expect("address");
    let api = ApiServer::start_with(Options {
        netns: Some(fabric),
        address,
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("the API server starts in the fabric namespace: {e:#}"));
    assert_eq!(
        api.server_url(),
        format!("https://192.168.200.250:{}", api.port())
    );
    api.kubectl(&["get", "crd", "authorizationpolicies.security.istio.io"])
        .expect("kubectl reaches it (run in the fabric namespace)");

    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let cache = api.workdir().join("node1-kubectl-cache");
    let out = cluster
        .node_exec(
            1,
            &api.kubectl_bin().to_string_lossy(),
            &[
                "--kubeconfig",
                &kubeconfig,
                "--cache-dir",
                &cache.to_string_lossy(),
                "get",
                "--raw",
                "/readyz",
            ],
        )
        .expect("run kubectl in node1");
    assert!(
        out.status.success(),
        "node1 reaches the API server over the fabric: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
