//! Acceptance tests of `ztunnel ca serve` with daemons on `--ca-address`: a real kube-apiserver
//! (TokenReview, bound service-account tokens, RBAC from deploy/rbac) and the CA service in
//! the fabric namespace next to it, where every node reaches it over its uplink. The daemons
//! hold only the root certificate and their own node's token; the root key stays with the
//! CA service.
//!
//! The set-up (`mesh_tests::ca_service`) binds each daemon's token to a pod scheduled on its
//! node, so the CA can tell which node asks. The CA's outage is in faults.rs.
//!
//! Needs root, a built `ztunnel`, etcd and kube-apiserver 1.20 (`cargo xtask test` provides
//! them). Every test name contains `kube`.

use mesh_tests::ca_service::{cross_node_flow, issued_serial, setup, CLIENT, LOG_WAIT, SERVER};
use mesh_tests::cluster::{field, message};

#[test]
fn kube_ca_service_signs_only_for_pods_on_the_callers_node() {
    let s = setup("24h");
    let c = &s.cluster;

    // Both nodes hold their pod's certificate, signed by the CA service.
    issued_serial(c, 1, CLIENT);
    issued_serial(c, 2, SERVER);
    for (node, id) in [("node1", CLIENT), ("node2", SERVER)] {
        s.ca.wait_for(0, |l| {
            message(l) == "certificate request"
                && field(l, "decision") == "allow"
                && field(l, "caller") == "istio-system/ztunnel"
                && field(l, "node") == node
                && field(l, "requested") == id
        })
        .unwrap_or_else(|e| panic!("{node}'s request for {id} allowed: {e}"));
    }

    // A cross-node flow, both identities in the access logs.
    let skip = c.daemon(2).log_lines().len();
    cross_node_flow(c);
    let line = c
        .daemon(2)
        .wait_for_log_after(
            skip,
            |l| message(l) == "access" && field(l, "reporter") == "destination",
            LOG_WAIT,
        )
        .expect("node2 logs the inbound flow");
    assert_eq!(field(&line, "src_identity"), CLIENT, "{line}");
    assert_eq!(field(&line, "dst_identity"), SERVER, "{line}");

    // No node was given the root key: no --ca-dir, and nothing but the certificate and the
    // tokens in what the nodes were handed.
    for n in 1..=2 {
        let pid = c.daemon(n).pid().expect("daemon running");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains("--ca-dir"), "node{n}: {cmdline}");
        assert!(!cmdline.contains("ca-service"), "node{n}: {cmdline}");
    }
    let handed: Vec<String> = std::fs::read_dir(s.root_cert.parent().expect("dir"))
        .expect("trust dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        handed.iter().all(|f| !f.contains("key")),
        "node files: {handed:?}"
    );

    // node1's daemon asking for `server`, whose only pod runs on node2: PERMISSION_DENIED.
    let skip = s.ca.lines().len();
    let out = s.request(1, &s.tokens[0], SERVER);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    let denied =
        s.ca.wait_for(skip, |l| field(l, "decision") == "deny")
            .expect("the CA logs the refusal");
    assert_eq!(field(&denied, "caller"), "istio-system/ztunnel", "{denied}");
    assert_eq!(field(&denied, "node"), "node1", "{denied}");
    assert_eq!(field(&denied, "requested"), SERVER, "{denied}");
    // The same token for node1's own pod is fine.
    let out = s.request(1, &s.tokens[0], CLIENT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A token the API server rejects: UNAUTHENTICATED.
    let forged = c.workdir().join("forged-token");
    std::fs::write(&forged, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").expect("token file");
    let out = s.request(1, &forged, CLIENT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Unauthenticated"),
        "{stderr}"
    );
}
