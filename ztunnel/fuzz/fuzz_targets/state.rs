//! Cluster state from user and API-server input: a state file's multi-document YAML through
//! `k8s::parse_file`, each document also as API-server JSON text through `k8s::from_json_text`, the
//! objects into `state::State::build` and the incremental `state::Model` (apply, snapshot,
//! delete), and the snapshot serialized as the admin API's config dump does.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serde::Deserialize as _;
use ztunnel::k8s::{self, Object};
use ztunnel::state::{Model, State};

const TD: &str = "cluster.local";

fn objects_from_json(text: &str) -> Vec<Object> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text).take(64) {
        let Ok(value) = serde_yaml_ng::Value::deserialize(doc) else {
            break;
        };
        let Ok(json) = serde_json::to_string(&value) else {
            continue;
        };
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("");
        if let Ok(Some(o)) = k8s::from_json_text(field("apiVersion"), field("kind"), &json) {
            out.push(o);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut objects = k8s::parse_file(Path::new("fuzz.yaml"), text).unwrap_or_default();
    objects.extend(objects_from_json(text));
    let state = State::build(1, TD, &objects);
    let _ = serde_json::to_string(&state);

    // The kube source's way: one object at a time, then every one deleted again.
    let mut model = Model::new(TD);
    for o in &objects {
        model.apply(o.clone());
    }
    let applied = model.snapshot(2);
    assert_eq!(applied.workloads.len(), state.workloads.len());
    assert_eq!(applied.services.len(), state.services.len());
    for o in &objects {
        let meta = o.meta();
        model.delete(
            o.kind(),
            meta.namespace.as_deref().unwrap_or(""),
            &meta.name,
        );
    }
    let empty = model.snapshot(3);
    assert!(
        empty.workloads.is_empty(),
        "workloads left after every object was deleted"
    );
    assert!(
        empty.services.is_empty(),
        "services left after every object was deleted"
    );
    assert!(
        empty.waypoints.is_empty(),
        "waypoints left after every object was deleted"
    );
    assert!(
        empty.authz.is_empty(),
        "policies left after every object was deleted"
    );
});
