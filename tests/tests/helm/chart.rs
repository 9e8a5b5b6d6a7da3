//! The Helm chart: `helm lint`, the chart installed into the API server with its defaults and
//! with other values (manifest checked offline and by a server-side dry run), and its CRDs kept
//! equal to `deploy/crds/`.

use std::path::PathBuf;

use mesh_tests::kube::deploy_dir;
use serde_json::{json, Value};

use super::{
    chart_dir, documents, find, helm, helm_output, install, kubernetes_validate, manifest,
    start_api, write, NAMESPACE, RELEASE,
};

#[test]
fn helm_lint_passes_kube() {
    let result = helm(&["lint", &chart_dir().to_string_lossy()]);
    assert!(result["Errors"].is_null(), "helm lint errors: {result}");
    // Severity 1 is INFO (e.g. "icon is recommended"); 2 WARNING, 3 ERROR.
    for m in result["Messages"].as_array().into_iter().flatten() {
        assert!(m["Severity"].as_u64() < Some(2), "helm lint: {m}");
    }
}

#[test]
fn helm_chart_installs_into_the_api_server_kube() {
    // Without the harness's CRDs: the chart's crds/ directory must install them.
    let api = start_api(false);
    api.ensure_namespace(NAMESPACE)
        .expect("creating the namespace");
    let text = install(&api, &json!({"drainTimeout": 20}));
    let docs = documents(&text);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
    ] {
        assert!(kinds.contains(&kind), "{kind} rendered: {kinds:?}");
    }
    assert!(
        !kinds.contains(&"Deployment"),
        "no CA Deployment in file mode"
    );

    // What the server stored.
    let ds = api
        .kubectl_json(&["get", "daemonset", "ztunnel", "-n", NAMESPACE])
        .expect("reading the DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "ztunnel");
    assert_eq!(pod["terminationGracePeriodSeconds"], 25, "drain 20 s + 5 s");
    // The hand-over socket on a hostPath the old and the new pod of a node both see. This API
    // server (1.20) cannot surge a DaemonSet (1.22 can), so the chart keeps one node at a
    // time there, and declares its ports; from 1.22 it renders maxSurge 1, maxUnavailable 0
    // and no (host) ports, which would keep the second pod off the node.
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );
    let run = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "run")
        .expect("the run volume");
    assert_eq!(
        run["hostPath"],
        json!({"path": "/run/ztunnel", "type": "DirectoryOrCreate"})
    );
    assert_eq!(pod["containers"][0]["ports"][0]["containerPort"], 15008);
    // The node's CNI directories, where the daemon installs ztunnel-cni (cni.enabled).
    for (name, path) in [("cni-bin", "/opt/cni/bin"), ("cni-conf", "/etc/cni/net.d")] {
        let v = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"));
        assert_eq!(
            v["hostPath"],
            json!({"path": path, "type": "DirectoryOrCreate"})
        );
    }
    let c = &pod["containers"][0];
    for (name, path) in [
        ("cni-bin", "/host/opt/cni/bin"),
        ("cni-conf", "/host/etc/cni/net.d"),
        ("run", "/run/ztunnel"),
    ] {
        assert!(
            c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|m| m["name"] == name && m["mountPath"] == path),
            "{name} at {path}: {}",
            c["volumeMounts"]
        );
    }
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args are a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for pair in [
        ["--source", "kube"],
        ["--drain-timeout", "20s"],
        ["--handover-socket", "/run/ztunnel/handover.sock"],
        ["--cni-socket", "/run/ztunnel/cni.sock"],
        ["--cni-bin-dir", "/host/opt/cni/bin"],
        ["--cni-conf-dir", "/host/etc/cni/net.d"],
        ["--cni-exclude-namespaces", "kube-system,istio-system"],
        ["--cni-owner", "istio-system/ztunnel"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "{pair:?} in the args: {args:?}"
        );
    }
    assert!(args.contains(&"--cni-install"), "{args:?}");
    assert_eq!(
        c["env"][0],
        json!({"name": "ZTUNNEL_NODE_NAME",
               "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/healthz/ready",
        "{c}"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        sc["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN", "BPF", "PERFMON"]})
    );
    assert_eq!(c["resources"]["requests"]["memory"], "32Mi");
    // The CA directory is writable scratch with the Secret's two files on top.
    let mounts = &c["volumeMounts"];
    assert_eq!(
        mounts[0],
        json!({"name": "ca-dir", "mountPath": "/var/lib/ztunnel/ca"})
    );
    assert_eq!(mounts[2]["subPath"], "root-key.pem");
    assert_eq!(mounts[2]["readOnly"], true);

    // The chart's ClusterRole is the one of deploy/rbac/ztunnel.yaml, rule for rule.
    let rbac_file = std::fs::read_to_string(deploy_dir().join("rbac/ztunnel.yaml"))
        .expect("reading deploy/rbac/ztunnel.yaml");
    let rbac = documents(&rbac_file);
    assert_eq!(
        find(&docs, "ClusterRole", "ztunnel")["rules"],
        find(&rbac, "ClusterRole", "ztunnel")["rules"],
        "chart and deploy/rbac/ztunnel.yaml grant the same"
    );
    for kind in ["ClusterRoleBinding", "ServiceAccount"] {
        let (chart, file) = (find(&docs, kind, "ztunnel"), find(&rbac, kind, "ztunnel"));
        for field in ["roleRef", "subjects"] {
            assert_eq!(chart[field], file[field], "{kind} {field}");
        }
        assert_eq!(
            chart["metadata"]["namespace"],
            file["metadata"]["namespace"]
        );
    }
    // The installed account reads what the daemon watches, and no secrets.
    let zt = api
        .service_account_kubeconfig(NAMESPACE, "ztunnel")
        .expect("a service-account kubeconfig");
    api.kubectl_as(&zt, &["get", "pods,services,namespaces", "-A"])
        .expect("the chart's account lists pods, services, namespaces");
    api.kubectl_as(
        &zt,
        &["get", "authorizationpolicies,peerauthentications", "-A"],
    )
    .expect("the chart's account lists the Istio policies (CRDs from the chart)");
    api.kubectl_as(&zt, &["get", "daemonset", "ztunnel", "-n", NAMESPACE])
        .expect("the chart's account reads its DaemonSet (--cni-owner)");
    let denied = api
        .kubectl_output(&zt, &["get", "secrets", "-n", NAMESPACE], None)
        .expect("running kubectl");
    assert!(!denied.status.success(), "secrets are not readable");

    // Offline: the Kubernetes 1.33 schemas, unknown fields rejected; the chart's CRDs too.
    let dir = tempfile::tempdir().expect("temporary directory");
    let rendered = write(dir.path(), "rendered.yaml", &text);
    kubernetes_validate(&rendered);
    for crd in std::fs::read_dir(chart_dir().join("crds")).expect("listing the chart CRDs") {
        kubernetes_validate(&crd.expect("a directory entry").path());
    }
    // Server-side apply of the rendered manifest (a dry run).
    let out = api
        .kubectl(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager",
            "helm-test",
            "-f",
            &rendered.to_string_lossy(),
        ])
        .expect("server-side dry-run apply of the rendered manifest");
    assert!(out.contains("daemonset.apps/ztunnel"), "{out}");

    // An upgrade with another drain timeout rolls the grace period along; without the CNI
    // plugin, the daemon neither installs it nor mounts the node's CNI directories.
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let chart = chart_dir().to_string_lossy().into_owned();
    helm(&[
        "upgrade",
        &kubeconfig,
        NAMESPACE,
        RELEASE,
        &chart,
        r#"{"drainTimeout": 60, "cni": {"enabled": false}}"#,
    ]);
    let ds = api
        .kubectl_json(&["get", "daemonset", "ztunnel", "-n", NAMESPACE])
        .expect("reading the DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 65);
    let text = pod.to_string();
    assert!(
        !text.contains("cni-bin") && !text.contains("cni-conf") && !text.contains("--cni-"),
        "no CNI installation left: {pod}"
    );
    kubernetes_validate(&write(dir.path(), "no-cni.yaml", &manifest(&api)));
    helm(&["uninstall", &kubeconfig, NAMESPACE, RELEASE]);
    let gone = api
        .kubectl_output(
            api.kubeconfig(),
            &["get", "daemonset", "ztunnel", "-n", NAMESPACE],
            None,
        )
        .expect("running kubectl");
    assert!(!gone.status.success(), "uninstall removes the DaemonSet");
    api.stop().expect("stopping the API server");
}

/// Values other than the defaults render objects the server accepts too: the CA service mode
/// (its Deployment, Service and RBAC; the daemons on `--ca-address`), SYS_ADMIN added for an old kernel, bpffs, extra flags and environment, hand-over off.
#[test]
fn helm_ca_service_mode_and_other_values_install_kube() {
    let api = start_api(true);
    api.ensure_namespace(NAMESPACE)
        .expect("creating the namespace");
    let text = install(
        &api,
        &json!({
            "ca": {"mode": "service", "service": {"args": ["--max-cert-ttl", "12h"]}},
            "capabilities": ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"],
            "mountBpffs": true,
            "extraArgs": ["--worker-threads", "2"],
            "extraEnv": [{"name": "ZTUNNEL_LOG_LEVEL", "value": "debug"}],
            "podAnnotations": {"example.com/note": "x"},
            "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}},
            "handover": {"enabled": false, "hostPath": "/var/run/mesh"},
            "cni": {
                "binDir": "/home/kubernetes/bin",
                "confDir": "/etc/cni/net.d",
                "excludeNamespaces": ["kube-system", "calico-system", "istio-system"],
            },
        }),
    );
    let docs = documents(&text);
    let ca = find(&docs, "Deployment", "ztunnel-ca");
    let args: Vec<&str> = ca["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[..2], ["ca", "serve"]);
    for pair in [
        ["--node-agent", "istio-system/ztunnel"],
        ["--san", "ztunnel-ca.istio-system.svc"],
        ["--max-cert-ttl", "12h"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    // The CA's account has the rules of deploy/rbac/ztunnel-ca.yaml.
    let rbac_file =
        std::fs::read_to_string(deploy_dir().join("rbac/ztunnel-ca.yaml")).expect("reading it");
    let rbac = documents(&rbac_file);
    assert_eq!(
        find(&docs, "ClusterRole", "ztunnel-ca")["rules"],
        find(&rbac, "ClusterRole", "ztunnel-ca")["rules"]
    );
    assert_eq!(
        find(&docs, "ClusterRoleBinding", "ztunnel-ca")["subjects"],
        find(&rbac, "ClusterRoleBinding", "ztunnel-ca")["subjects"]
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    kubernetes_validate(&write(dir.path(), "rendered.yaml", &text));
    api.kubectl_json(&["get", "deployment", "ztunnel-ca", "-n", NAMESPACE])
        .expect("the CA Deployment is stored");
    let ds = api
        .kubectl_json(&["get", "daemonset", "ztunnel", "-n", NAMESPACE])
        .expect("the DaemonSet is stored");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], true);
    let args = c["args"].as_array().expect("args");
    assert_eq!(
        args[args.len() - 2..],
        [json!("--worker-threads"), json!("2")]
    );
    // The daemons reach the CA service and never mount the root key.
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--ca-address" && w[1] == "https://ztunnel-ca.istio-system.svc:15012"),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a == "--ca-dir"), "{args:?}");
    let pod = &ds["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "ca")
        .expect("the ca volume");
    assert_eq!(
        volume["secret"]["items"],
        json!([{"key": "root-cert.pem", "path": "root-cert.pem"}])
    );
    // Without hand-over: the old pod goes first, the ports are declared; the node's socket
    // directory is still shared, for the CNI socket, which the plugin's entry names by its
    // host path (mounted there too).
    assert!(args.iter().any(|a| a == "--handover=false"), "{args:?}");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        json!({"maxUnavailable": 1})
    );
    assert_eq!(c["ports"][0]["containerPort"], 15008);
    let run = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "run")
        .expect("the run volume, for the CNI socket");
    assert_eq!(run["hostPath"]["path"], "/var/run/mesh");
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .collect();
    for want in [("run", "/run/ztunnel"), ("run", "/var/run/mesh")] {
        assert!(mounts.contains(&want), "{want:?} in {mounts:?}");
    }
    for pair in [
        ["--cni-socket", "/var/run/mesh/cni.sock"],
        [
            "--cni-exclude-namespaces",
            "kube-system,calico-system,istio-system",
        ],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    let bin = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "cni-bin")
        .expect("the cni-bin volume");
    assert_eq!(bin["hostPath"]["path"], "/home/kubernetes/bin");
    // A relative CNI directory is refused at render time.
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let chart = chart_dir().to_string_lossy().into_owned();
    let refused = helm_output(&[
        "upgrade",
        &kubeconfig,
        NAMESPACE,
        RELEASE,
        &chart,
        r#"{"cni": {"confDir": "etc/cni/net.d"}}"#,
    ]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("cni.confDir must be an absolute"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    api.stop().expect("stopping the API server");
}

/// The chart ships copies of `deploy/crds/` (a chart must be self-contained to be packaged or
/// copied on its own); they must not drift.
#[test]
fn helm_chart_crds_are_copies_of_deploy_crds_kube() {
    let names = |dir: PathBuf| {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                e.expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    };
    let deploy = names(deploy_dir().join("crds"));
    assert_eq!(deploy, names(chart_dir().join("crds")));
    for name in deploy {
        let a = std::fs::read(deploy_dir().join("crds").join(&name)).expect("reading a CRD");
        let b = std::fs::read(chart_dir().join("crds").join(&name)).expect("reading a chart CRD");
        assert!(
            a == b,
            "deploy/charts/ztunnel/crds/{name} differs from deploy/crds/{name}: copy it again"
        );
    }
}
