//! Policy compilation: AuthorizationPolicy and PeerAuthentication objects from YAML compiled by
//! `authz::compile` (through `authz::Registry::build`, as every state does), then flows to the
//! workloads the policies select decided by `authz::evaluate`, plaintext and mTLS, with and
//! without a client identity. The value parsers the compiler uses (`Cidr::parse`,
//! `compile::str_match`, `compile::port`) also get each input line.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ztunnel::authz::{self, compile, Registry, Request};
use ztunnel::identity::SpiffeId;
use ztunnel::k8s::security::Scalar;
use ztunnel::k8s::{self, Object};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines().take(64) {
        let _ = authz::Cidr::parse(line);
        let _ = compile::str_match(line);
        let _ = compile::port(&Scalar::Str(line.to_string()));
    }
    let Ok(objects) = k8s::parse_file(Path::new("fuzz.yaml"), text) else {
        return;
    };
    let (mut ap, mut pa) = (Vec::new(), Vec::new());
    for o in &objects {
        match o {
            Object::AuthorizationPolicy(p) => ap.push(p),
            Object::PeerAuthentication(p) => pa.push(p),
            _ => {}
        }
    }
    let reg = Registry::build(ap.iter().copied(), pa.iter().copied());

    // Destinations: each policy's namespace with the labels its selector asks for.
    let mut targets: Vec<(String, BTreeMap<String, String>)> =
        vec![("default".into(), BTreeMap::new())];
    for p in &ap {
        let labels = p
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default();
        targets.push((p.metadata.namespace.clone().unwrap_or_default(), labels));
    }
    let client = SpiffeId::new("cluster.local", "default", "sleep");
    let sources: [(IpAddr, Option<&SpiffeId>); 2] = [
        ("10.0.0.1".parse().expect("ip"), Some(&client)),
        ("192.168.1.7".parse().expect("ip"), None),
    ];
    for (ns, labels) in targets.iter().take(16) {
        let labels = k8s::Labels::from(labels);
        for (src_ip, src_identity) in sources {
            for dst_port in [80, 8080] {
                let req = Request {
                    src_ip,
                    src_identity,
                    dst_namespace: ns,
                    dst_labels: &labels,
                    dst_ip: "10.0.0.2".parse().expect("ip"),
                    dst_port,
                };
                let d = authz::evaluate(&reg, "istio-system", &req, src_identity.is_none());
                // Without any policy (PeerAuthentication STRICT refuses plaintext on its own).
                if reg.is_empty() && pa.is_empty() {
                    assert!(d.allowed(), "no policy, yet {req:?} was denied");
                }
            }
        }
    }
});
