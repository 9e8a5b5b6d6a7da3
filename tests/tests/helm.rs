//! Installing ztunnel on a cluster: the Helm chart of `deploy/charts/ztunnel/` and the OCI image
//! of `cargo xtask image`.
//!
//! Helm is driven through its Go SDK (the Python package `helm-sdkpy`, which needs Python 3.12
//! or newer: `tests/helm/helm_sdk.py`); it has no client-side rendering, so the chart is
//! installed into a real kube-apiserver 1.20 (`mesh_tests::kube`). No kubelet runs there: the
//! pods never start, but every object must be accepted, and the rendered manifest is then
//! checked offline against the Kubernetes 1.33 schemas (`kubernetes-validate --strict`) and
//! server-side applied with `--dry-run=server`. `cargo xtask test` installs both Python packages;
//! these tests fail (never skip) without them.
//!
//! The image tests build the image from the debug binary (`cargo xtask image` uses the release
//! one; a release build takes minutes here), unpack it and run its `ztunnel --version` in a
//! chroot, and run the daemon in it through a private containerd with the chart's security
//! context.
//!
//! Every test name contains `kube`, so `cargo xtask test -- kube` selects them with the other
//! API-server tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_tests::image::{self, ImageSpec};
use mesh_tests::kube::{deploy_dir, ApiServer, Options};
use serde_json::{json, Value};

const NAMESPACE: &str = "istio-system";
const RELEASE: &str = "ztunnel";

fn chart_dir() -> PathBuf {
    deploy_dir().join("charts/ztunnel")
}

/// Python 3.12 or newer with `helm_sdkpy`: `HELM_PYTHON`, else the newest pyenv 3.12+.
fn helm_python() -> PathBuf {
    if let Some(p) = std::env::var_os("HELM_PYTHON") {
        return PathBuf::from(p);
    }
    let found = mesh_tests::helm_python();
    found.unwrap_or_else(|| {
        panic!(
            "no Python >= 3.12 found (HELM_PYTHON, or ~/.pyenv/versions/3.1[2-9].*): helm-sdkpy \
             needs one; `cargo xtask test` installs helm-sdkpy into it"
        )
    })
}

/// Runs `tests/helm/helm_sdk.py <args>`; its JSON output.
fn helm(args: &[&str]) -> Value {
    helm_in(None, args)
}

/// Runs `tests/helm/helm_sdk.py <args>` (inside network namespace `netns`, when given), whatever
/// its outcome.
fn helm_output_in(netns: Option<&str>, args: &[&str]) -> std::process::Output {
    let script = mesh_tests::workspace_root().join("tests/helm/helm_sdk.py");
    let py = helm_python();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&py);
            c
        }
        None => Command::new(&py),
    };
    cmd.arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", py.display()))
}

/// [`helm_output_in`] without a namespace.
fn helm_output(args: &[&str]) -> std::process::Output {
    helm_output_in(None, args)
}

/// [`helm`] inside network namespace `netns` (where an API server of that namespace is).
fn helm_in(netns: Option<&str>, args: &[&str]) -> Value {
    let py = helm_python();
    let out = helm_output_in(netns, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}): {stderr}\n(helm-sdkpy missing? `{} -m pip install helm-sdkpy`)",
        out.status,
        py.display()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("helm {args:?}: output is not JSON ({e}): {stderr}"))
}

fn start_api(install_crds: bool) -> ApiServer {
    ApiServer::start_with(Options {
        install_crds,
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("the API server harness starts: {e:#}"))
}

/// Installs the chart into `api` with `values`; returns the rendered manifest.
fn install(api: &ApiServer, values: &Value) -> String {
    install_in(None, api, values);
    manifest(api)
}

/// Installs the chart with helm running in `netns`; the release.
fn install_in(netns: Option<&str>, api: &ApiServer, values: &Value) {
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let chart = chart_dir().to_string_lossy().into_owned();
    let values = values.to_string();
    let release = helm_in(
        netns,
        &["install", &kubeconfig, NAMESPACE, RELEASE, &chart, &values],
    );
    assert_eq!(
        release["info"]["status"]
            .as_str()
            .or(release["status"].as_str()),
        Some("deployed"),
        "release after install: {release}"
    );
}

fn manifest(api: &ApiServer) -> String {
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let status = helm(&["manifest", &kubeconfig, NAMESPACE, RELEASE]);
    status["manifest"]
        .as_str()
        .unwrap_or_else(|| panic!("release status has no manifest: {status}"))
        .to_string()
}

/// The YAML documents of `text` (skipping empty ones), as JSON values.
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|d| {
            let v = Value::deserialize(d).expect("valid YAML");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the documents"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("writing a file");
    p
}

/// `python3 -m kubernetes_validate -k 1.33.0 --strict <file>`: the offline schema check.
fn kubernetes_validate(file: &Path) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "-k", "1.33.0", "--strict"])
        .arg(file)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "kubernetes-validate {} failed (`python3 -m pip install kubernetes-validate`?):\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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

/// The image (built here from the debug binary, to keep the test short; `cargo xtask image`
/// uses the release build) unpacks to a root filesystem where the daemon runs.
#[test]
fn oci_image_unpacks_and_runs_kube() {
    mesh_tests::require_root().expect("root");
    let dir = tempfile::tempdir().expect("temporary directory");
    let binary = mesh_tests::ztunnel_bin();
    let plugin = mesh_tests::cni_plugin_bin();
    let built = image::build(&ImageSpec {
        binary: binary.clone(),
        cni_plugin: plugin.clone(),
        out_dir: dir.path().to_path_buf(),
        tag: env!("CARGO_PKG_VERSION").into(),
        source: "file:///ztunnel".into(),
        revision: Some("test".into()),
    })
    .unwrap_or_else(|e| panic!("building the image: {e:#}"));
    assert!(built.archive.is_file(), "the oci-archive is written");

    // Exactly the daemon, the CNI plugin, `ip` and what the three link.
    let ip = mesh_tests::find_tool("ip").expect("ip (iproute2)");
    let mut expected = vec![
        image::BINARY_PATH.to_string(),
        image::CNI_PLUGIN_PATH.to_string(),
        image::IP_PATH.to_string(),
    ];
    expected.extend(
        image::image_libraries(&[&binary, &plugin, &ip])
            .expect("ldd")
            .iter()
            .map(|p| p.to_string_lossy().into_owned()),
    );
    expected.sort();
    assert_eq!(built.files, expected);
    assert!(
        expected.iter().any(|f| f.contains("libc.so")),
        "{expected:?}"
    );

    let config = image::image_config(&built.layout, &built.tag).expect("reading the image config");
    assert_eq!(config["config"]["Entrypoint"], json!([image::BINARY_PATH]));
    let labels = &config["config"]["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.source"], "file:///ztunnel");

    let bundle = dir.path().join("bundle");
    image::unpack(&built.umoci_ref(), &bundle).expect("umoci unpack");
    let chroot = mesh_tests::find_tool("chroot").expect("chroot (coreutils)");
    let out = Command::new(chroot)
        .arg(bundle.join("rootfs"))
        .args([image::BINARY_PATH, "--version"])
        .env_clear()
        .output()
        .expect("running chroot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ztunnel --version in the image: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        format!("ztunnel {}", env!("CARGO_PKG_VERSION"))
    );

    // The image installs its own plugin: `ztunnel cni install` (the binary found next to the
    // daemon) into a node's directories, and the installed plugin runs there.
    let rootfs = bundle.join("rootfs");
    let conf_dir = rootfs.join("host/etc/cni/net.d");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::create_dir_all(rootfs.join("host/opt/cni/bin")).expect("bin dir");
    let primary = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp"}]});
    write(&conf_dir, "10-k8s.conflist", &primary.to_string());
    let chroot_run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(mesh_tests::find_tool("chroot").expect("chroot"))
            .arg(&rootfs)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running chroot");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?} in the image: {text}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = chroot_run(
        &[
            image::BINARY_PATH,
            "cni",
            "install",
            "--cni-bin-dir",
            "/host/opt/cni/bin",
            "--cni-conf-dir",
            "/host/etc/cni/net.d",
        ],
        &[],
    );
    assert!(out.contains("cni plugin installed"), "{out}");
    let list: Value = serde_json::from_str(
        &std::fs::read_to_string(conf_dir.join("10-k8s.conflist")).expect("conflist"),
    )
    .expect("json");
    assert_eq!(list["plugins"][1]["type"], "ztunnel-cni", "{list}");
    assert_eq!(
        std::fs::read(rootfs.join("host/opt/cni/bin/ztunnel-cni")).expect("installed"),
        std::fs::read(&plugin).expect("built plugin")
    );
    let out = chroot_run(
        &["/host/opt/cni/bin/ztunnel-cni"],
        &[("CNI_COMMAND", "VERSION")],
    );
    let versions: Value = serde_json::from_str(&out).expect("a CNI version result");
    assert!(
        versions["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.0.0"))),
        "{versions}"
    );
}

/// A private containerd (apt `containerd`, which brings runc) with its own root, state and
/// socket in a temporary directory: what a node's kubelet runs containers with.
struct Containerd {
    child: std::process::Child,
    address: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        mesh_tests::require_tool("containerd", "containerd").expect("containerd");
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = write(
            dir.path(),
            "config.toml",
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        );
        let address = dir.path().join("containerd.sock");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&address)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            child,
            address,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        c
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.command().args(args).output().expect("running ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM, so it unmounts its snapshots before the directory goes.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// A network namespace with an `eth0` (one end of a veth pair), removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        for args in [
            vec!["netns", "add", &name],
            vec![
                "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
            ],
            vec!["-n", &name, "link", "set", "eth0", "up"],
            vec!["-n", &name, "link", "set", "eth0p", "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let ok = Command::new("ip").args(&args).status().expect("running ip");
            assert!(ok.success(), "ip {args:?}");
        }
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The capabilities containerd hands a container by default, all dropped as the chart's
/// `drop: [ALL]` does.
const CONTAINERD_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Capability numbers (linux/capability.h) of those the chart may add.
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("unexpected capability {other} in values.yaml"),
    }
}

/// The chart's DaemonSet container, as the API server stored it, run from the image through
/// containerd the way a kubelet would: the DaemonSet's args (`--source kube`, in-cluster), its
/// capabilities (every other one dropped), read-only root, seccomp profile and volume mounts (the
/// CA directory as memory scratch with the certificate and key read-only on top, a memory /tmp),
/// the chart's service account's token where a pod gets it, the node's network namespace. The
/// daemon lists every kind through the chart's RBAC, loads and attaches capture, gets ready, holds
/// exactly the chart's capabilities, and on SIGTERM detaches and exits 0.
#[test]
fn oci_image_runs_the_chart_daemonset_container_kube() {
    mesh_tests::require_root().expect("root");
    let dir = tempfile::tempdir().expect("temporary directory");
    let version = env!("CARGO_PKG_VERSION");
    let built = image::build(&ImageSpec {
        binary: mesh_tests::ztunnel_bin(),
        cni_plugin: mesh_tests::cni_plugin_bin(),
        out_dir: dir.path().join("image"),
        tag: version.into(),
        source: "file:///ztunnel".into(),
        revision: None,
    })
    .unwrap_or_else(|e| panic!("building the image: {e:#}"));
    let ctrd = Containerd::start();
    let archive = built.archive.to_string_lossy().into_owned();
    let out = ctrd.ctr(&[
        "images",
        "import",
        "--base-name",
        "localhost/ztunnel",
        &archive,
    ]);
    assert!(
        out.status.success(),
        "ctr images import: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The node's network namespace, with the API server on the node's address.
    let netns = Netns::new(format!("ztimg{}", std::process::id()));
    let node_ip = "10.250.0.1";
    let ok = Command::new("ip")
        .args([
            "-n",
            &netns.0,
            "addr",
            "add",
            "10.250.0.1/24",
            "dev",
            "eth0",
        ])
        .status()
        .expect("ip addr add");
    assert!(ok.success());
    let api = ApiServer::start_with(Options {
        netns: Some(netns.0.clone()),
        address: node_ip.parse().expect("an address"),
        install_crds: false,
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("the API server harness starts: {e:#}"));
    api.ensure_namespace(NAMESPACE)
        .expect("creating the namespace");
    install_in(Some(&netns.0), &api, &json!({"drainTimeout": 2}));
    let ds = api
        .kubectl_json(&["get", "daemonset", "ztunnel", "-n", NAMESPACE])
        .expect("reading the DaemonSet");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        format!("localhost/ztunnel:{version}"),
        "the chart runs the image `cargo xtask image` builds"
    );

    // What the kubelet would provide: the CA Secret's files, the service-account token.
    let ca = dir.path().join("ca");
    let ok = Command::new(mesh_tests::ztunnel_bin())
        .args(["ca", "init", "--ca-dir"])
        .arg(&ca)
        .output()
        .expect("ztunnel ca init");
    assert!(ok.status.success(), "ztunnel ca init");
    let sa = dir.path().join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("token dir");
    let token = api
        .service_account_token(NAMESPACE, "ztunnel", std::time::Duration::from_secs(3600))
        .expect("a token of the chart's service account");
    write(&sa, "token", &token);
    write(&sa, "namespace", NAMESPACE);
    std::fs::copy(api.ca_cert(), sa.join("ca.crt")).expect("copying the cluster CA");

    let bpffs = Bpffs(dir.path().join("bpffs"));
    // The node's CNI directories, with the primary CNI's conflist.
    let cni_bin = dir.path().join("cni-bin");
    let cni_conf = dir.path().join("cni-conf");
    std::fs::create_dir_all(&cni_bin).expect("cni bin dir");
    std::fs::create_dir_all(&cni_conf).expect("cni conf dir");
    let primary = json!({"cniVersion": "0.4.0", "name": "k8s", "plugins": [{"type": "ptp"}]});
    write(&cni_conf, "10-k8s.conflist", &primary.to_string());
    let sc = &container["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let caps: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .map(|c| c.as_str().expect("a name").to_string())
        .collect();
    let reference = format!("localhost/ztunnel:{version}");
    let mut cmd = ctrd.command();
    cmd.args(["run", "--rm"]);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    cmd.arg("--read-only");
    match sc["seccompProfile"]["type"].as_str() {
        Some("RuntimeDefault") => drop(cmd.arg("--seccomp")),
        Some("Unconfined") => {}
        other => panic!("seccompProfile {other:?}"),
    }
    for c in CONTAINERD_DEFAULT_CAPS {
        cmd.args(["--cap-drop", &format!("CAP_{c}")]);
    }
    for c in &caps {
        cmd.args(["--cap-add", &format!("CAP_{c}")]);
    }
    for m in container["volumeMounts"].as_array().expect("volumeMounts") {
        let dst = m["mountPath"].as_str().expect("mountPath");
        let mount = match (m["name"].as_str(), m["subPath"].as_str()) {
            // `run` is the node's /run/ztunnel, shared with the next pod (hand-over): one
            // container here, so a tmpfs of its own.
            (Some("ca-dir" | "tmp" | "run"), None) => format!("type=tmpfs,src=tmpfs,dst={dst}"),
            (Some("ca"), Some(file)) => format!(
                "type=bind,src={},dst={dst},options=rbind:ro",
                ca.join(file).display()
            ),
            // The host's bpffs: a bpffs of this test's own, where capture pins its state.
            (Some("bpffs"), None) => {
                let bpf = bpffs.mount();
                format!("type=bind,src={},dst={dst},options=rbind:rw", bpf.display())
            }
            // The node's CNI directories (hostPath): this test's own.
            (Some(name @ ("cni-bin" | "cni-conf")), None) => {
                let src = if name == "cni-bin" {
                    &cni_bin
                } else {
                    &cni_conf
                };
                format!("type=bind,src={},dst={dst},options=rbind:rw", src.display())
            }
            other => panic!("a volume mount this test does not know: {other:?}"),
        };
        cmd.args(["--mount", &mount]);
    }
    cmd.arg("--mount").arg(format!(
        "type=bind,src={},dst=/var/run/secrets/kubernetes.io/serviceaccount,options=rbind:ro",
        sa.display()
    ));
    for e in container["env"].as_array().expect("env") {
        match (e["name"].as_str(), &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Some(name), Value::String(f)) if f == "spec.nodeName" => {
                cmd.args(["--env", &format!("{name}=node1")]);
            }
            other => panic!("an env var this test does not know: {other:?}"),
        }
    }
    cmd.args(["--env", &format!("KUBERNETES_SERVICE_HOST={node_ip}")])
        .args(["--env", &format!("KUBERNETES_SERVICE_PORT={}", api.port())])
        .arg("--with-ns")
        .arg(format!("network:/var/run/netns/{}", netns.0))
        .args([&reference, "ztunnel-image-test", image::BINARY_PATH]);
    // The DaemonSet's args, but JSON logs (the env var loses to the flag).
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string"))
        .collect();
    for (i, a) in args.iter().enumerate() {
        if i > 0 && args[i - 1] == "--log-format" {
            cmd.arg("json");
        } else {
            cmd.arg(a);
        }
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("ctr run");

    // Wait for "ready" in the daemon's log (stdout or stderr).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    let stdout: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("stdout"));
    let stderr: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("stderr"));
    for pipe in [stdout, stderr] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        }));
    }
    drop(tx);
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let ready = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let is_ready =
                    serde_json::from_str::<Value>(&line).is_ok_and(|v| v["message"] == "ready");
                log.push(line);
                if is_ready {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    if !ready {
        let _ = child.kill();
        panic!(
            "the daemon in the container did not get ready:\n{}",
            log.join("\n")
        );
    }

    // The container's process holds exactly the chart's capabilities.
    let tasks = ctrd.ctr(&["tasks", "ls"]);
    let tasks = String::from_utf8_lossy(&tasks.stdout);
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with("ztunnel-image-test"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("task pid in {tasks}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    let want = caps.iter().fold(0u64, |m, c| m | 1 << cap_bit(c));
    assert_eq!(cap_eff, want, "effective capabilities {cap_eff:#x}");

    // The daemon installed the image's plugin on the "node", with the chart's settings and no
    // capability beyond the chart's.
    let conflist = cni_conf.join("10-k8s.conflist");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let entry = loop {
        let list: Value = std::fs::read_to_string(&conflist)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        if list["plugins"][1]["type"] == "ztunnel-cni" {
            break list["plugins"][1].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ztunnel-cni entry in {list}:\n{}",
            log.join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(entry["socket"], "/run/ztunnel/cni.sock", "{entry}");
    assert_eq!(entry["failOpen"], false, "{entry}");
    assert_eq!(
        entry["excludeNamespaces"],
        json!(["kube-system", NAMESPACE]),
        "{entry}"
    );
    assert_eq!(
        std::fs::read(cni_bin.join("ztunnel-cni")).expect("the installed plugin"),
        std::fs::read(mesh_tests::cni_plugin_bin()).expect("the built plugin")
    );

    // `kubectl exec <pod> -- ztunnel status`: the image's binary reads the admin API.
    let status = ctrd.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "status",
        "ztunnel-image-test",
        image::BINARY_PATH,
        "status",
    ]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("node1"),
        "ztunnel status in the container: {text}{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let killed = ctrd.ctr(&["tasks", "kill", "--signal", "SIGTERM", "ztunnel-image-test"]);
    assert!(killed.status.success(), "ctr tasks kill");
    let exit = child.wait().expect("ctr run exits");
    for r in readers {
        let _ = r.join();
    }
    log.extend(rx.try_iter());
    let log = log.join("\n");
    assert!(exit.success(), "the daemon exits 0 after SIGTERM:\n{log}");
    for line in ["capture attached", "capture left in place"] {
        assert!(log.contains(line), "{line:?} in the log:\n{log}");
    }
    // Capture outlived the container (fail closed); `ztunnel uninstall` in the node removes it.
    let pins = bpffs.0.join("ztunnel/node1");
    assert!(pins.join("zt_enrolled").exists(), "pinned map in {pins:?}");
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.0])
        .arg(mesh_tests::ztunnel_bin())
        .args(["uninstall", "--bpf-pin-dir"])
        .arg(&pins)
        .output()
        .expect("ztunnel uninstall");
    assert!(
        out.status.success(),
        "ztunnel uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists(), "pins removed");
}

/// A bpffs mounted for one test (the host's /sys/fs/bpf of a real node), unmounted on drop.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn mount(&self) -> &std::path::Path {
        std::fs::create_dir_all(&self.0).expect("bpffs dir");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.0)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount -t bpf");
        &self.0
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
