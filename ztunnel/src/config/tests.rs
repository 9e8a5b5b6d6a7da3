//! Validation tests: defaults, the errors that name the setting, sizes and congestion control,
//! DNS settings, the config file under flags and environment, and the help text.

use clap::{CommandFactory, Parser};

use super::*;

/// A command line that flattens the daemon settings, as the binary's does.
#[derive(Debug, Parser)]
struct TestCli {
    #[command(flatten)]
    run: RunArgs,
}

/// The settings of `ztunnel <required flags> <extra>`, with the `--config` file if given.
fn args(extra: &[&str]) -> Result<RunArgs, ConfigError> {
    let tmp = std::env::temp_dir();
    let mut argv = vec!["ztunnel", "--node-name", "node1", "--ca-dir", "/tmp/ca"];
    argv.extend(["--state", tmp.to_str().expect("utf-8 temp dir")]);
    argv.extend(extra);
    parse::<TestCli>(argv).map(|c| c.run)
}

fn base() -> RunArgs {
    args(&[]).expect("valid")
}

/// Parses and validates `<required flags> <extra>`.
fn resolve(extra: &[&str]) -> Result<Config, ConfigError> {
    Config::resolve(args(extra)?)
}

#[test]
fn defaults_are_istio_ports() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.ports.hbone, 15008);
    assert_eq!(c.ports.outbound, 15001);
    assert_eq!(c.trust_domain, "cluster.local");
    assert_eq!(c.cert_ttl, Duration::from_secs(86400));
    assert!(c.release_code_pages);
    assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
}

#[test]
fn admin_socket_fits_a_unix_address() {
    let c = resolve(&["--admin-socket", "/tmp/x/admin.sock"]).expect("valid");
    assert_eq!(c.admin_socket, PathBuf::from("/tmp/x/admin.sock"));
    let long = format!("/{}", "a".repeat(107));
    let e = resolve(&["--admin-socket", &long])
        .expect_err("too long")
        .to_string();
    assert!(
        e.contains("--admin-socket") && e.contains("107 bytes"),
        "{e}"
    );
}

#[test]
fn handover_socket_is_on_by_default_checked_and_can_be_turned_off() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(
        c.handover_socket,
        Some(PathBuf::from(DEFAULT_HANDOVER_SOCKET))
    );
    let c = resolve(&["--handover-socket", "/tmp/x/h.sock"]).expect("valid");
    assert_eq!(c.handover_socket, Some(PathBuf::from("/tmp/x/h.sock")));
    let e = resolve(&["--handover-socket", DEFAULT_ADMIN_SOCKET])
        .expect_err("same as the admin socket")
        .to_string();
    assert!(
        e.contains("--handover-socket") && e.contains("--admin-socket"),
        "{e}"
    );
    let long = format!("/{}", "a".repeat(107));
    let e = resolve(&["--handover-socket", &long])
        .expect_err("too long")
        .to_string();
    assert!(e.contains("107 bytes"), "{e}");
    let c = resolve(&["--handover=false"]).expect("valid");
    assert_eq!(c.handover_socket, None);
}

#[test]
fn cni_socket_is_checked() {
    let c = Config::resolve(base()).expect("valid");
    let cni = c.cni.expect("on by default");
    assert_eq!(cni.socket, PathBuf::from(DEFAULT_CNI_SOCKET));
    assert_eq!(cni.pending_timeout, Duration::from_secs(120));
    assert!(resolve(&["--cni-socket", ""]).expect("valid").cni.is_none());
    for bad in [
        &["--cni-socket", "relative.sock"][..],
        &["--cni-socket", DEFAULT_ADMIN_SOCKET],
        &["--cni-pending-timeout", "100ms"],
    ] {
        let e = resolve(bad).expect_err("invalid").to_string();
        assert!(e.contains("--cni-"), "{bad:?}: {e}");
    }
}

#[test]
fn cni_install_is_checked() {
    let cni = Config::resolve(base()).expect("valid").cni.expect("on");
    assert_eq!(cni.install, None, "off by default");
    let cni = resolve(&["--cni-install"]).expect("valid").cni.expect("on");
    assert_eq!(
        cni.install,
        Some(CniInstall {
            bin_dir: DEFAULT_CNI_BIN_DIR.into(),
            conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            plugin_binary: None,
            socket: DEFAULT_CNI_SOCKET.into(),
            exclude_namespaces: vec!["kube-system".into()],
            owner: None,
        })
    );
    // Only checked to exist.
    let kubeconfig =
        std::env::temp_dir().join(format!("cni-owner-{}.kubeconfig", std::process::id()));
    std::fs::write(&kubeconfig, "").expect("kubeconfig");
    let kc = kubeconfig.to_str().expect("utf-8");
    let kube_args = |extra: &[&str]| {
        let kube = ["--cni-install", "--source", "kube", "--kubeconfig", kc];
        let mut a = args(&[&kube[..], extra].concat()).expect("parses");
        a.state = None;
        Config::resolve(a)
    };
    let kube = kube_args(&["--cni-owner", "istio-system/ztunnel"]).expect("valid");
    assert_eq!(
        kube.cni.and_then(|c| c.install?.owner),
        Some(CniOwner {
            namespace: "istio-system".into(),
            name: "ztunnel".into(),
            kubeconfig: Some(kubeconfig.clone()),
        })
    );
    let cni = resolve(&[
        "--cni-install=true",
        "--cni-exclude-namespaces",
        "istio-system,kube-system,istio-system",
        "--cni-conf-dir",
        "/host/etc/cni/net.d",
    ])
    .expect("valid")
    .cni
    .expect("on");
    let install = cni.install.expect("install");
    assert_eq!(install.exclude_namespaces, ["istio-system", "kube-system"]);
    assert_eq!(install.conf_dir, PathBuf::from("/host/etc/cni/net.d"));
    for (bad, names) in [
        (&["--cni-install", "--cni-socket", ""][..], "--cni-install"),
        (&["--cni-install", "--cni-bin-dir", "bin"], "--cni-bin-dir"),
        (&["--cni-owner", "ns/ds"], "--cni-owner"),
        (&["--cni-install", "--cni-owner", "ns/ds"], "--source kube"),
        (
            &["--cni-install", "--cni-exclude-namespaces", "Kube_System"],
            "--cni-exclude-namespaces",
        ),
    ] {
        let e = resolve(bad).expect_err("invalid").to_string();
        assert!(e.contains(names), "{bad:?}: {e}");
    }
    for bad in ["ztunnel", "/ztunnel", "a/b/c"] {
        let e = kube_args(&["--cni-owner", bad]).expect_err("invalid");
        assert!(e.to_string().contains("--cni-owner"), "{bad}: {e}");
    }
    let _ = std::fs::remove_file(&kubeconfig);
}

#[test]
fn errors_name_the_setting() {
    let mut a = base();
    a.hbone_port = 15001;
    let e = Config::resolve(a).expect_err("port clash").to_string();
    assert!(
        e.contains("--hbone-port") && e.contains("ZTUNNEL_HBONE_PORT"),
        "{e}"
    );
    assert!(e.contains("--outbound-port"), "{e}");

    let mut a = base();
    a.node_name = None;
    let e = Config::resolve(a).expect_err("missing").to_string();
    assert!(e.contains("--node-name"), "{e}");

    let e = resolve(&["--connect-timeout", "5 parsecs"])
        .expect_err("bad duration")
        .to_string();
    assert!(e.contains("--connect-timeout"), "{e}");
    assert_eq!(
        e,
        "invalid setting --connect-timeout (env ZTUNNEL_CONNECT_TIMEOUT, config key \
         `connect-timeout`): `5 parsecs`: expected a duration such as 500ms, 30s, 5m or 24h"
    );

    // clap's own parsers (numbers, booleans) get the same shape.
    for (flag, bad) in [("--hbone-port", "http"), ("--capture", "maybe")] {
        let e = resolve(&[flag, bad]).expect_err(bad).to_string();
        assert!(
            e.starts_with(&format!("invalid setting {flag} (env ZTUNNEL_"))
                && e.contains(&format!("`{bad}`: ")),
            "{e}"
        );
    }
}

#[test]
fn bounds_and_cross_checks() {
    for (extra, flag) in [
        (&["--hbone-port", "0"][..], "--hbone-port"),
        (&["--cert-ttl", "59s"], "--cert-ttl"),
        (&["--route-table", "254"], "--route-table"),
        (&["--capture-mark", "0x539"], "--capture-mark"),
        (&["--capture-mark", "0"], "--capture-mark"),
        (&["--daemon-mark", "0x"], "--daemon-mark"),
        (&["--hbone-max-streams", "0"], "--hbone-max-streams"),
        (&["--worker-threads", "0"], "--worker-threads"),
        (&["--log-format", "xml"], "--log-format"),
        (&["--log-level", "ztunnel=loud"], "--log-level"),
        (&["--uplink", "a-very-long-interface"], "--uplink"),
        (&["--drain-timeout", "0s"], "--drain-timeout"),
    ] {
        let e = resolve(extra).expect_err(flag).to_string();
        assert!(e.starts_with(&format!("invalid setting {flag} ")), "{e}");
    }
    // Without capture, capture settings are not checked.
    resolve(&["--capture", "false", "--capture-mark", "0x539"]).expect("capture off");
    let c = resolve(&["--capture-mark", "8192", "--daemon-mark", "0x1"]).expect("valid");
    assert_eq!(c.capture.expect("on").capture_mark, 0x2000);
    assert_eq!(c.daemon_mark, 1);
}

#[test]
fn flow_control_windows() {
    // A connection's window holds the whole window of every stream it may carry.
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.hbone.stream_window, 8 << 20);
    assert_eq!(c.hbone.connection_window, 100 * (8 << 20));

    let c = resolve(&["--hbone-stream-window", "512KiB"]).expect("valid");
    assert_eq!(c.hbone.stream_window, 512 << 10);
    assert_eq!(c.hbone.connection_window, 100 * (512 << 10));
    let c = resolve(&["--hbone-inbound-max-streams", "200"]).expect("valid");
    assert_eq!(c.hbone.connection_window, 200 * (8 << 20));

    for bad in ["4MB", "1000", "2048MiB", "", "MiB"] {
        let e = resolve(&["--hbone-stream-window", bad])
            .expect_err(bad)
            .to_string();
        assert!(e.contains("--hbone-stream-window"), "{bad}: {e}");
    }
    // 100 streams of 64 MiB: more than a window can be.
    let e = resolve(&["--hbone-stream-window", "64MiB"])
        .expect_err("streams x window > 2 GiB")
        .to_string();
    assert!(
        e.contains("--hbone-stream-window") && e.contains("2 GiB"),
        "{e}"
    );
    let c = resolve(&[
        "--hbone-stream-window",
        "64MiB",
        "--hbone-max-streams",
        "16",
        "--hbone-inbound-max-streams",
        "16",
    ])
    .expect("16 streams of 64 MiB fit");
    assert_eq!(c.hbone.connection_window, 16 * (64 << 20));
    assert_eq!(super::connection_window(32, 64 << 20), None);
    assert_eq!(super::connection_window(0, 1 << 20), Some(1 << 20));
}

#[test]
fn stream_windows_start_small_and_grow_to_the_stream_window() {
    let c = Config::resolve(base()).expect("valid");
    let b = c.hbone.window_bounds();
    assert_eq!((b.start, b.max), (256 << 10, 8 << 20));
    let c = resolve(&["--hbone-stream-window-start", "8MiB"]).expect("valid");
    assert_eq!(c.hbone.stream_window_start, 8 << 20, "fixed windows");
    let c = resolve(&["--hbone-stream-window", "128KiB"]).expect("valid");
    assert_eq!(
        c.hbone.stream_window_start,
        128 << 10,
        "a start above the maximum is the maximum"
    );
    let e = resolve(&["--hbone-stream-window-start", "1000"])
        .expect_err("below the protocol's minimum")
        .to_string();
    assert!(e.contains("--hbone-stream-window-start"), "{e}");
}

#[test]
fn hbone_send_buffer() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.hbone.send_buffer, 256 << 10);
    let c = resolve(&["--hbone-send-buffer", "0"]).expect("valid");
    assert_eq!(
        c.hbone.send_buffer, c.hbone.stream_window,
        "0: the stream window"
    );
    let e = resolve(&["--hbone-send-buffer", "4096"])
        .expect_err("too small")
        .to_string();
    assert!(e.contains("--hbone-send-buffer"), "{e}");
}

#[test]
fn hbone_spread() {
    assert_eq!(Config::resolve(base()).expect("valid").hbone.spread, 4);
    let mut a = base();
    a.hbone_spread = 0;
    let e = Config::resolve(a).expect_err("zero").to_string();
    assert!(e.contains("--hbone-spread"), "{e}");
}

#[test]
fn hbone_notsent_lowat() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.hbone.notsent_lowat, Some(128 << 10));
    for (v, want) in [("0", None), ("16KiB", Some(16 << 10)), ("4096", Some(4096))] {
        assert_eq!(
            resolve(&["--hbone-notsent-lowat", v])
                .expect(v)
                .hbone
                .notsent_lowat,
            want,
            "{v}"
        );
    }
    for bad in ["128KB", "2048MiB", "-1"] {
        let flag = format!("--hbone-notsent-lowat={bad}");
        let e = resolve(&[&flag]).expect_err(bad).to_string();
        assert!(e.contains("--hbone-notsent-lowat"), "{bad}: {e}");
    }
}

#[test]
fn congestion_control_settings() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.pod_tcp_congestion.as_deref(), Some("cubic"));
    assert_eq!(
        c.hbone.tcp_congestion, None,
        "HBONE keeps the node's by default"
    );

    let c = resolve(&[
        "--pod-tcp-congestion",
        "default",
        "--hbone-tcp-congestion",
        "bbr",
    ])
    .expect("valid");
    assert_eq!(c.pod_tcp_congestion, None);
    assert_eq!(c.hbone.tcp_congestion.as_deref(), Some("bbr"));

    let e = resolve(&["--hbone-tcp-congestion", "cubic; rm"])
        .expect_err("bad name")
        .to_string();
    assert!(e.contains("--hbone-tcp-congestion"), "{e}");
}

#[test]
fn dns_settings() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.ports.dns, 15053);
    let d = c.dns.expect("dns capture on by default");
    assert!(d.upstreams.is_empty(), "resolv.conf is read at start");

    let d = resolve(&["--dns-upstream", "10.0.0.53,10.0.0.54:5353"])
        .expect("valid")
        .dns
        .expect("on");
    assert_eq!(d.upstreams[1], "10.0.0.54:5353".parse().expect("addr"));
    assert_eq!(d.upstreams[0].port(), 53);

    let e = resolve(&["--dns-upstream", "resolver"])
        .expect_err("bad")
        .to_string();
    assert!(
        e.contains("--dns-upstream") && e.contains("ZTUNNEL_DNS_UPSTREAM"),
        "{e}"
    );

    let mut a = base();
    a.dns_port = 15008;
    assert!(Config::resolve(a).is_err(), "port clash with hbone");

    let mut a = base();
    a.dns_capture = false;
    assert!(Config::resolve(a).expect("valid").dns.is_none());
}

#[test]
fn file_is_overridden_by_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.yaml");
    let file = path.to_str().expect("utf-8");
    std::fs::write(&path, "hbone-port: 16008\nadmin-port: 16000\n").expect("write");
    let c = resolve(&["--config", file, "--admin-port", "17000"]).expect("valid");
    assert_eq!(c.ports.hbone, 16008);
    assert_eq!(c.ports.admin, 17000);

    std::fs::write(
        &path,
        "hbone-stream-window: 1048576\nhbone-inbound-max-streams: 200\n",
    )
    .expect("write");
    let c = resolve(&["--config", file]).expect("valid");
    assert_eq!(c.hbone.stream_window, 1 << 20);
    assert_eq!(c.hbone.connection_window, 200 << 20);

    std::fs::write(&path, "hbone-prot: 1\n").expect("write");
    let e = resolve(&["--config", file])
        .expect_err("unknown key")
        .to_string();
    assert!(e.contains("z.yaml") && e.contains("hbone-prot"), "{e}");
}

/// Every value form the file takes: strings, numbers, booleans, lists for settings that repeat;
/// an empty file is no settings.
#[test]
fn file_value_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.yaml");
    let file = path.to_str().expect("utf-8");
    std::fs::write(
        &path,
        "# daemon settings\n\
         capture: false\n\
         uplink: [eth1, eth2]\n\
         dns-upstream:\n  - 10.0.0.53\n  - 10.0.0.54:5353\n\
         cert-ttl: 1h\n\
         daemon-mark: 0x10\n\
         log-format: json\n\
         worker-threads: 3\n\
         release-code-pages: false\n\
         trust-domain: null\n",
    )
    .expect("write");
    let a = args(&["--config", file]).expect("valid");
    assert_eq!(a.uplink, ["eth1", "eth2"]);
    let c = Config::resolve(a).expect("valid");
    assert!(c.capture.is_none());
    assert_eq!(c.dns.expect("on").upstreams.len(), 2);
    assert_eq!(c.cert_ttl, Duration::from_secs(3600));
    assert_eq!(c.daemon_mark, 0x10, "a YAML hex number");
    assert!(c.log_json);
    assert_eq!(c.worker_threads, 3);
    assert!(!c.release_code_pages);
    assert_eq!(c.trust_domain, DEFAULT_TRUST_DOMAIN, "null is unset");

    std::fs::write(&path, "uplink: eth3,eth4\n").expect("write");
    let a = args(&["--config", file]).expect("valid");
    assert_eq!(a.uplink, ["eth3", "eth4"], "comma-separated as in the flag");

    std::fs::write(&path, "").expect("write");
    resolve(&["--config", file]).expect("empty file");
}

#[test]
fn bad_file_names_the_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.yaml");
    let file = path.to_str().expect("utf-8");
    let error = |yaml: &str, extra: &[&str]| {
        std::fs::write(&path, yaml).expect("write");
        let mut argv = vec!["--config", file];
        argv.extend(extra);
        resolve(&argv).expect_err(yaml).to_string()
    };

    let e = error("cert-ttl: 5 parsecs\n", &[]);
    assert_eq!(
        e,
        format!(
            "config file {file}: invalid setting --cert-ttl (env ZTUNNEL_CERT_TTL, config key \
             `cert-ttl`): `5 parsecs`: expected a duration such as 500ms, 30s, 5m or 24h"
        )
    );
    let e = error("hbone-port: 70000\n", &[]);
    assert!(e.starts_with(&format!("config file {file}: invalid setting --hbone-port")));
    let e = error("hbone-port: [1, 2]\n", &[]);
    assert!(e.contains(file) && e.contains("`hbone-port`"), "{e}");
    let e = error("uplink: {eth0: 1}\n", &[]);
    assert!(e.contains(file) && e.contains("`uplink`"), "{e}");
    // `config` itself is not a file setting.
    let e = error("config: other.yaml\n", &[]);
    assert!(
        e.contains(file) && e.contains("unknown key `config`"),
        "{e}"
    );
    let e = error("- hbone-port\n", &[]);
    assert!(e.contains(file), "{e}");
    let e = error("hbone-port: [\n", &[]);
    assert!(e.contains(file), "{e}");
    // A bad flag is the flag's error, not the file's.
    let e = error("cert-ttl: 1h\n", &["--cert-ttl", "soon"]);
    assert!(e.starts_with("invalid setting --cert-ttl"), "{e}");
    // A flag covers a bad value in the file: the file's value is never used.
    std::fs::write(&path, "cert-ttl: soon\n").expect("write");
    resolve(&["--config", file, "--cert-ttl", "1h"]).expect("flag wins");

    let e = resolve(&["--config", "/nonexistent/z.yaml"])
        .expect_err("missing file")
        .to_string();
    assert!(e.starts_with("config file /nonexistent/z.yaml: "), "{e}");
}

/// flag > environment > file > default, for two settings. The environment is the process's,
/// so this test runs itself again in a child process with the variables set rather than
/// change the environment of the tests running beside it.
#[test]
fn precedence_flag_env_file_default() {
    const CHILD: &str = "ZTUNNEL_CONFIG_TEST_CHILD";
    let dir = std::env::var_os(CHILD);
    let Some(dir) = dir else {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("z.yaml"),
            "admin-port: 16000\nmetrics-port: 16020\nreadiness-port: 16021\n\
             hbone-idle-timeout: 2m\nconnect-timeout: 2s\ndrain-timeout: 3s\n",
        )
        .expect("write");
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", "config::tests::precedence_flag_env_file_default"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .env("ZTUNNEL_ADMIN_PORT", "17000")
            .env("ZTUNNEL_METRICS_PORT", "17020")
            .env("ZTUNNEL_CONNECT_TIMEOUT", "3s")
            .env("ZTUNNEL_HBONE_IDLE_TIMEOUT", "3m")
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    let file = std::path::Path::new(&dir).join("z.yaml");
    let file = file.to_str().expect("utf-8");
    let c = resolve(&[
        "--config",
        file,
        "--admin-port",
        "18000",
        "--connect-timeout",
        "4s",
    ])
    .expect("valid");
    // flag over env over file
    assert_eq!(c.ports.admin, 18000);
    assert_eq!(c.hbone.connect_timeout, Duration::from_secs(4));
    // env over file
    assert_eq!(c.ports.metrics, 17020);
    assert_eq!(c.hbone.idle_timeout, Duration::from_secs(180));
    // file over default
    assert_eq!(c.ports.readiness, 16021);
    assert_eq!(c.drain_timeout, Duration::from_secs(3));
    // default
    assert_eq!(c.ports.hbone, 15008);
    assert!(matches!(
        c.source,
        SourceConfig::File { poll_interval, .. } if poll_interval == Duration::from_millis(500)
    ));
}

/// `--help` shows every setting's default (or says what leaving it unset means), and its
/// environment variable, which follows the flag's name (errors from [`Config::resolve`] name it
/// the same way).
#[test]
fn help_shows_each_default() {
    let help = TestCli::command().render_long_help().to_string();
    for shown in [
        "[default: 500ms]",
        "[default: 24h]",
        "[default: 30s]",
        "[default: 1m]",
        "[default: 0x2000]",
        "[default: 0x539]",
        "[default: 15008]",
        "[default: 8MiB]",
        "[default: 128KiB]",
        "[default: text]",
        "[default: info]",
        "[default: cubic]",
        "[default: default]",
        "[default: istio-system]",
    ] {
        assert!(help.contains(shown), "{shown} in:\n{help}");
    }
    let without_default = [
        "config",
        "node-name",
        "state",
        "ca-dir",
        "ca-address",
        "ca-root-cert",
    ];
    let unset_means = [
        "dns-upstream",
        "worker-threads",
        "kubeconfig",
        "bpf-pin-dir",
        "uplink",
        "cni-plugin-binary",
        "cni-owner",
    ];
    let settings = parse::settings();
    for arg in settings.get_arguments() {
        let long = arg.get_long().expect("long flag");
        let env = format!("ZTUNNEL_{}", long.replace('-', "_").to_uppercase());
        assert_eq!(arg.get_env(), Some(env.as_ref()), "--{long}");
        let doc = arg
            .get_long_help()
            .or(arg.get_help())
            .expect("help")
            .to_string();
        match arg.get_default_values() {
            [] if unset_means.contains(&long) => assert!(doc.contains("Unset: "), "--{long}"),
            [] => assert!(without_default.contains(&long), "--{long} has no default"),
            values => {
                let values: Vec<_> = values.iter().map(|v| v.to_string_lossy()).collect();
                let shown = format!("[default: {}]", values.join(", "));
                assert!(help.contains(&shown), "--{long}: {shown}");
                assert!(
                    !doc.contains("[default:"),
                    "--{long}: default typed by hand"
                );
            }
        }
    }
}

/// Each value type prints in a form it parses back from (clap relies on it for defaults).
#[test]
fn values_print_as_written() {
    for d in ["500ms", "30s", "1m", "90s", "24h", "1500ms"] {
        assert_eq!(d.parse::<Dur>().expect(d).to_string(), d);
    }
    assert_eq!("60s".parse::<Dur>().expect("60s").to_string(), "1m");
    for s in ["0", "1000", "128KiB", "8MiB", "65535"] {
        assert_eq!(s.parse::<Size>().expect(s).to_string(), s);
    }
    assert_eq!("2048KiB".parse::<Size>().expect("kib").to_string(), "2MiB");
    assert_eq!(
        "1337".parse::<Mark>().expect("decimal").to_string(),
        "0x539"
    );
    for c in ["default", "cubic", "bbr"] {
        assert_eq!(c.parse::<Congestion>().expect(c).to_string(), c);
    }
    for u in ["10.0.0.1", "10.0.0.1:5353", "[fd00::1]:5353", "fd00::1"] {
        assert_eq!(u.parse::<Upstream>().expect(u).to_string(), u);
    }
    for f in ["text", "json"] {
        assert_eq!(f.parse::<LogFormat>().expect(f).to_string(), f);
    }
}

/// The config dump shows durations as they are written.
#[test]
fn config_dump_is_readable() {
    let c = Config::resolve(base()).expect("valid");
    let dump = serde_json::to_value(&c).expect("serialize");
    assert_eq!(dump["cert_ttl"], "24h");
    assert_eq!(dump["source"]["kind"], "file");
    assert_eq!(dump["source"]["poll_interval"], "500ms");
    assert_eq!(dump["hbone"]["idle_timeout"], "1m");
    assert_eq!(dump["hbone"]["stream_window"], 8 << 20);
}

#[test]
fn file_ca_and_ca_service_are_mutually_exclusive() {
    let e = resolve(&["--ca-address", "https://ca:15012"])
        .expect_err("both CAs")
        .to_string();
    assert!(e.contains("--ca-address") && e.contains("--ca-dir"), "{e}");

    let root = tempfile::NamedTempFile::new().expect("temp file");
    let root_path = root.path().to_str().expect("utf-8");
    let mut a = base();
    a.ca_dir = None;
    a.ca_address = Some("https://ca:15012".into());
    let e = Config::resolve(a.clone()).expect_err("no root").to_string();
    assert!(e.contains("--ca-root-cert"), "{e}");
    a.ca_root_cert = Some(root_path.into());
    let c = Config::resolve(a.clone()).expect("remote CA");
    match c.ca {
        CaConfig::Remote {
            address,
            token_path,
            ..
        } => {
            assert_eq!(address, "https://ca:15012");
            assert_eq!(token_path, PathBuf::from(DEFAULT_CA_TOKEN_PATH));
        }
        other => panic!("expected the CA service, got {other:?}"),
    }
    a.ca_address = Some("ca:15012".into());
    let e = Config::resolve(a).expect_err("not https").to_string();
    assert!(e.contains("https://"), "{e}");

    let mut a = base();
    a.ca_dir = None;
    let e = Config::resolve(a).expect_err("no CA").to_string();
    assert!(e.contains("--ca-dir") && e.contains("--ca-address"), "{e}");
}

/// The HBONE server's limits: documented defaults, each settable from the file and by flag,
/// and the values that cannot work refused with the setting named.
#[test]
fn inbound_limits() {
    let c = Config::resolve(base()).expect("valid");
    let l = &c.hbone_inbound;
    assert_eq!(
        (l.max_handshakes, l.max_connections, l.max_streams),
        (1024, 16384, 100)
    );
    assert_eq!((l.peer_max_connections, l.peer_max_streams), (1024, 8192));
    assert_eq!((l.fd_headroom, l.max_header_list_size), (2048, 64 * 1024));
    assert_eq!(l.handshake_timeout, Duration::from_secs(5));
    assert_eq!(
        (l.keepalive_interval, l.keepalive_timeout, l.tcp_keepalive),
        (
            Duration::from_secs(30),
            Duration::from_secs(10),
            Duration::from_secs(60)
        )
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.yaml");
    let file = path.to_str().expect("utf-8");
    std::fs::write(
        &path,
        "hbone-inbound-max-streams: 50\nhbone-inbound-max-header-list-size: 32KiB\n",
    )
    .expect("write");
    let c = resolve(&["--config", file, "--hbone-inbound-fd-headroom", "100"]).expect("valid");
    let l = &c.hbone_inbound;
    assert_eq!(
        (l.max_streams, l.max_header_list_size, l.fd_headroom),
        (50, 32 * 1024, 100)
    );

    for (extra, flag) in [
        (
            &["--hbone-inbound-max-streams", "0"][..],
            "--hbone-inbound-max-streams",
        ),
        (
            &["--hbone-inbound-peer-max-streams", "0"],
            "--hbone-inbound-peer-max-streams",
        ),
        (
            &[
                "--hbone-inbound-max-handshakes",
                "20",
                "--hbone-inbound-max-connections",
                "10",
            ],
            "--hbone-inbound-max-handshakes",
        ),
        (
            &["--hbone-inbound-max-header-list-size", "1KiB"],
            "--hbone-inbound-max-header-list-size",
        ),
        (
            &["--hbone-inbound-keepalive-timeout", "1m"],
            "--hbone-inbound-keepalive-timeout",
        ),
    ] {
        let e = resolve(extra).expect_err(flag).to_string();
        assert!(e.starts_with(&format!("invalid setting {flag} ")), "{e}");
    }
}
