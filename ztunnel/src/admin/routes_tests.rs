//! The admin routes on the port and on the socket: what each may do, and the dump's content.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::watch;

use super::*;
use crate::identity::FileCa;
use crate::socket::PlainSockets;

fn routes(dir: &std::path::Path) -> AdminRoutes {
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let ca_dir = dir.join("ca");
    let argv = [
        "ztunnel",
        "--node-name",
        "node1",
        "--state",
        state_dir.to_str().expect("utf-8"),
        "--ca-dir",
        ca_dir.to_str().expect("utf-8"),
        "--admin-socket",
        "/run/test/admin.sock",
    ];
    let cli: crate::cli::Cli = crate::config::parse(argv).expect("settings");
    let cfg = Arc::new(Config::resolve(cli.run).expect("valid"));
    let ca = FileCa::load_or_create(&ca_dir, "cluster.local").expect("CA");
    let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600)).expect("certs");
    let sockets = Arc::new(PlainSockets {
        connect_timeout: Duration::from_secs(1),
    });
    AdminRoutes {
        pool: Pool::new(cfg.hbone.clone(), certs.clone(), sockets),
        cfg,
        state: watch::channel(Arc::new(State::build(1, "cluster.local", &[]))).1,
        certs,
        capture: Arc::default(),
        readiness: Arc::default(),
        drain: Drain::default(),
        dns: Arc::default(),
        source: Arc::new(crate::source::SourceHealth::new(
            "file",
            ["files"].into_iter(),
        )),
    }
}

fn req<'a>(method: &'a Method, path: &'a str, query: &'a str) -> Request<'a> {
    Request {
        method,
        path,
        query,
    }
}

/// (Async: the pool spawns its reaper.)
#[tokio::test]
async fn the_port_only_reads_and_the_socket_takes_post() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = routes(dir.path());
    for method in [Method::GET, Method::POST, Method::PUT] {
        let refused = r.route(&req(&method, "/quitquitquit", ""), Via::Port);
        assert_eq!(refused.status, 403, "{method} /quitquitquit on the port");
        assert!(
            refused.body.contains("/run/test/admin.sock"),
            "{}",
            refused.body
        );
    }
    let refused = r.route(&req(&Method::POST, "/logging", "level=debug"), Via::Port);
    assert_eq!(refused.status, 403);
    let refused = r.route(&req(&Method::GET, "/logging", "level=debug"), Via::Port);
    assert_eq!(refused.status, 403, "a GET that would change the level");
    assert!(
        !r.drain.is_draining(),
        "nothing on the port started the drain"
    );

    let shown = r.route(&req(&Method::GET, "/logging", ""), Via::Port);
    assert_eq!(shown.status, 200, "the level can be read on the port");

    let get = r.route(&req(&Method::GET, "/quitquitquit", ""), Via::Socket);
    assert_eq!((get.status, get.allow), (405, Some("POST")));
    let get = r.route(&req(&Method::GET, "/logging", "level=debug"), Via::Socket);
    assert_eq!((get.status, get.allow), (405, Some("GET, HEAD, POST")));
    let missing = r.route(&req(&Method::POST, "/logging", ""), Via::Socket);
    assert_eq!(missing.status, 400);
    assert!(!r.drain.is_draining());
    let quit = r.route(&req(&Method::POST, "/quitquitquit", ""), Via::Socket);
    assert_eq!(quit.status, 200);
    assert!(r.drain.is_draining(), "POST on the socket starts the drain");

    for via in [Via::Port, Via::Socket] {
        assert_eq!(r.route(&req(&Method::GET, "/nope", ""), via).status, 404);
        let post = r.route(&req(&Method::POST, "/config_dump", ""), via);
        assert_eq!((post.status, post.allow), (405, Some("GET, HEAD")));
    }
}

#[tokio::test]
async fn the_config_dump_holds_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = routes(dir.path());
    let dump = r.route(&req(&Method::GET, "/config_dump", ""), Via::Port);
    assert_eq!(dump.status, 200);
    let body = dump.body.to_lowercase();
    for secret in ["-----begin", "private", "token", "password"] {
        assert!(
            !body.contains(secret),
            "`{secret}` in the dump:\n{}",
            dump.body
        );
    }
    let json: serde_json::Value = serde_json::from_str(&dump.body).expect("JSON");
    assert_eq!(json["config"]["admin_socket"], "/run/test/admin.sock");
}

#[test]
fn query_values_decode_as_before() {
    assert_eq!(decode("info%2Cztunnel%3Ddebug"), "info,ztunnel=debug");
    assert_eq!(decode("a+b"), "a b");
    assert_eq!(decode("a%2Bb"), "a+b");
    assert_eq!(decode("bad%zz"), "bad%zz");
    // A `%` without two bytes after it stays as is.
    assert_eq!(decode("x%4"), "x%4");
    assert_eq!(decode("x%41"), "xA");
    assert_eq!(level("a=1&level=debug").as_deref(), Some("debug"));
    assert_eq!(level("levels=1"), None);
}
