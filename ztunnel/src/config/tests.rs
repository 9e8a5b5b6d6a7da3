//! Validation tests: defaults, the errors that name the setting, sizes and congestion control,
//! DNS settings, and flags taking precedence over the file.

use super::*;

fn base() -> RunArgs {
    RunArgs {
        node_name: Some("node1".into()),
        state: Some(std::env::temp_dir()),
        ca_dir: Some("/tmp/ca".into()),
        ..Default::default()
    }
}

#[test]
fn defaults_are_istio_ports() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.ports.hbone, 15008);
    assert_eq!(c.ports.outbound, 15001);
    assert_eq!(c.trust_domain, "cluster.local");
    assert_eq!(c.cert_ttl, Duration::from_secs(86400));
}

#[test]
fn errors_name_the_setting() {
    let mut a = base();
    a.hbone_port = Some(15001);
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

    let mut a = base();
    a.connect_timeout = Some("5 parsecs".into());
    let e = Config::resolve(a).expect_err("bad duration").to_string();
    assert!(e.contains("--connect-timeout"), "{e}");
}

#[test]
fn flow_control_windows() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.hbone.stream_window, 8 << 20);
    assert_eq!(c.hbone.connection_window, 32 << 20);

    let mut a = base();
    a.hbone_stream_window = Some("512KiB".into());
    a.hbone_connection_window = Some("1048576".into());
    let c = Config::resolve(a).expect("valid");
    assert_eq!(
        (c.hbone.stream_window, c.hbone.connection_window),
        (512 << 10, 1 << 20)
    );

    for bad in ["4MB", "1000", "2048MiB", "", "MiB"] {
        let mut a = base();
        a.hbone_stream_window = Some(bad.into());
        let e = Config::resolve(a).expect_err(bad).to_string();
        assert!(e.contains("--hbone-stream-window"), "{bad}: {e}");
    }
    let mut a = base();
    a.hbone_stream_window = Some("64MiB".into());
    let e = Config::resolve(a)
        .expect_err("connection < stream")
        .to_string();
    assert!(e.contains("--hbone-connection-window"), "{e}");
}

#[test]
fn hbone_spread() {
    assert_eq!(Config::resolve(base()).expect("valid").hbone.spread, 4);
    let mut a = base();
    a.hbone_spread = Some(0);
    let e = Config::resolve(a).expect_err("zero").to_string();
    assert!(e.contains("--hbone-spread"), "{e}");
}

#[test]
fn hbone_notsent_lowat() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.hbone.notsent_lowat, Some(128 << 10));
    for (v, want) in [("0", None), ("16KiB", Some(16 << 10)), ("4096", Some(4096))] {
        let mut a = base();
        a.hbone_notsent_lowat = Some(v.into());
        assert_eq!(
            Config::resolve(a).expect(v).hbone.notsent_lowat,
            want,
            "{v}"
        );
    }
    for bad in ["128KB", "2048MiB", "-1"] {
        let mut a = base();
        a.hbone_notsent_lowat = Some(bad.into());
        let e = Config::resolve(a).expect_err(bad).to_string();
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

    let mut a = base();
    a.pod_tcp_congestion = Some("default".into());
    a.hbone_tcp_congestion = Some("bbr".into());
    let c = Config::resolve(a).expect("valid");
    assert_eq!(c.pod_tcp_congestion, None);
    assert_eq!(c.hbone.tcp_congestion.as_deref(), Some("bbr"));

    let mut a = base();
    a.hbone_tcp_congestion = Some("cubic; rm".into());
    let e = Config::resolve(a).expect_err("bad name").to_string();
    assert!(e.contains("--hbone-tcp-congestion"), "{e}");
}

#[test]
fn dns_settings() {
    let c = Config::resolve(base()).expect("valid");
    assert_eq!(c.ports.dns, 15053);
    let d = c.dns.expect("dns capture on by default");
    assert!(d.upstreams.is_empty(), "resolv.conf is read at start");

    let mut a = base();
    a.dns_upstream = vec!["10.0.0.53".into(), "10.0.0.54:5353".into()];
    let d = Config::resolve(a).expect("valid").dns.expect("on");
    assert_eq!(d.upstreams[1], "10.0.0.54:5353".parse().expect("addr"));
    assert_eq!(d.upstreams[0].port(), 53);

    let mut a = base();
    a.dns_upstream = vec!["resolver".into()];
    let e = Config::resolve(a).expect_err("bad").to_string();
    assert!(
        e.contains("--dns-upstream") && e.contains("ZTUNNEL_DNS_UPSTREAM"),
        "{e}"
    );

    let mut a = base();
    a.dns_port = Some(15008);
    assert!(Config::resolve(a).is_err(), "port clash with hbone");

    let mut a = base();
    a.dns_capture = Some(false);
    assert!(Config::resolve(a).expect("valid").dns.is_none());
}

#[test]
fn file_is_overridden_by_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.yaml");
    std::fs::write(&path, "hbone-port: 16008\nadmin-port: 16000\n").expect("write");
    let mut a = base();
    a.config = Some(path.clone());
    a.admin_port = Some(17000);
    let c = Config::resolve(a).expect("valid");
    assert_eq!(c.ports.hbone, 16008);
    assert_eq!(c.ports.admin, 17000);

    std::fs::write(
        &path,
        "hbone-stream-window: 1048576\nhbone-connection-window: 64MiB\n",
    )
    .expect("write");
    let mut a = base();
    a.config = Some(path.clone());
    let c = Config::resolve(a).expect("valid");
    assert_eq!(c.hbone.stream_window, 1 << 20);
    assert_eq!(c.hbone.connection_window, 64 << 20);

    std::fs::write(&path, "hbone-prot: 1\n").expect("write");
    let mut a = base();
    a.config = Some(path);
    let e = Config::resolve(a).expect_err("unknown key").to_string();
    assert!(e.contains("z.yaml") && e.contains("hbone-prot"), "{e}");
}
