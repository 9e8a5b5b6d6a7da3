//! The OCI image: built from the debug binary, unpacked and run in a chroot (its own CNI plugin
//! installed from it), and run as the chart's DaemonSet container through containerd on a node
//! of the test's own ([`super::node`]).

use std::process::Command;

use mesh_tests::image::{self, ImageSpec};
use mesh_tests::kube::{ApiServer, Options};
use serde_json::{json, Value};

use super::node::{cap_bit, Bpffs, Containerd, Netns, CONTAINERD_DEFAULT_CAPS};
use super::{install_in, write, NAMESPACE};

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
