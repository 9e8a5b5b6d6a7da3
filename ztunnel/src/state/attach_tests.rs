//! Waypoint attachment as the snapshot shows it: which pods are a waypoint's, which waypoint
//! each Service and pod uses (precedence, opt-out, other namespaces, `waypoint-for`), and
//! that the model re-derives it as objects change one at a time.

use std::net::IpAddr;
use std::path::Path;

use super::{Model, State, TrafficKind};
use crate::k8s::Object;

fn objects(yaml: &str) -> Vec<Object> {
    crate::k8s::parse_file(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn state(yaml: &str) -> State {
    State::build(1, "cluster.local", &objects(yaml))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Namespace `app` uses waypoint `ns-wp` (workload traffic too); `infra` holds a shared
/// waypoint `shared` for services; `plain` has no label.
const BASE: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ns-wp}}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: infra, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}}
---
{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: ns-wp, namespace: app, labels: {istio.io/waypoint-for: all}}, spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}}
---
{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: own-wp, namespace: app}, spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}}
---
{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: shared, namespace: infra}, spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15009, protocol: HBONE}]}}
---
{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: ingress, namespace: app}, spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}}
---
{apiVersion: v1, kind: Pod, metadata: {name: wp-1, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: ns-wp}}, spec: {nodeName: n1, serviceAccountName: ns-wp}, status: {podIP: 10.0.0.100, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: shared-1, namespace: infra, labels: {gateway.networking.k8s.io/gateway-name: shared}}, spec: {nodeName: n2, serviceAccountName: shared}, status: {podIP: 10.0.9.100, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: ingress-1, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: ingress}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.101, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: a, namespace: app, labels: {app: a}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.1, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: own, namespace: app, labels: {app: a, istio.io/use-waypoint: own-wp}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.2, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: out, namespace: app, labels: {app: a, istio.io/use-waypoint: none}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.3, phase: Running}}
---
{apiVersion: v1, kind: Pod, metadata: {name: p, namespace: plain, labels: {app: p}}, spec: {nodeName: n1}, status: {podIP: 10.0.1.1, phase: Running}}
---
{apiVersion: v1, kind: Service, metadata: {name: by-ns, namespace: app}, spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: own, namespace: app, labels: {istio.io/use-waypoint: own-wp}}, spec: {clusterIP: 10.96.0.2, selector: {app: a}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: opted-out, namespace: app, labels: {istio.io/use-waypoint: none}}, spec: {clusterIP: 10.96.0.3, selector: {app: a}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: cross, namespace: plain, labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra}}, spec: {clusterIP: 10.96.1.1, selector: {app: p}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: none, namespace: plain}, spec: {clusterIP: 10.96.1.2, selector: {app: p}, ports: [{port: 80}]}}
---
{apiVersion: v1, kind: Service, metadata: {name: ns-wp, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: ns-wp}}, spec: {clusterIP: 10.96.0.9, selector: {gateway.networking.k8s.io/gateway-name: ns-wp}, ports: [{port: 15008}]}}
"#;

/// The waypoint key a Service uses, as the data path resolves it.
fn svc_waypoint(s: &State, key: &str) -> Option<String> {
    let svc = s
        .services
        .get(key)
        .unwrap_or_else(|| panic!("service {key}"));
    s.service_waypoint(svc).map(|w| w.key())
}

fn pod_waypoint(s: &State, addr: &str) -> Option<String> {
    let w = s.workload(ip(addr)).unwrap_or_else(|| panic!("pod {addr}"));
    s.workload_waypoint(w).map(|w| w.key())
}

#[test]
fn a_services_own_label_wins_over_its_namespace_and_none_opts_out() {
    let s = state(BASE);
    assert_eq!(svc_waypoint(&s, "app/by-ns").as_deref(), Some("app/ns-wp"));
    assert_eq!(svc_waypoint(&s, "app/own").as_deref(), Some("app/own-wp"));
    assert_eq!(svc_waypoint(&s, "app/opted-out"), None);
    assert_eq!(svc_waypoint(&s, "plain/none"), None);
    assert_eq!(
        svc_waypoint(&s, "plain/cross").as_deref(),
        Some("infra/shared"),
        "use-waypoint-namespace names a waypoint elsewhere"
    );
    assert_eq!(
        svc_waypoint(&s, "app/ns-wp"),
        None,
        "a waypoint's own Service has no waypoint"
    );
}

#[test]
fn a_pods_own_label_wins_and_waypoint_for_decides_whether_it_applies() {
    let s = state(BASE);
    // ns-wp is `all`: the namespace's pods use it for traffic addressed to them.
    assert_eq!(pod_waypoint(&s, "10.0.0.1").as_deref(), Some("app/ns-wp"));
    assert_eq!(pod_waypoint(&s, "10.0.0.3"), None, "pod opted out");
    // own-wp takes service traffic only (the default): attached, but not for pod traffic.
    let own = s.workload(ip("10.0.0.2")).expect("own");
    assert_eq!(
        own.waypoint.as_ref().map(|r| r.key()).as_deref(),
        Some("app/own-wp")
    );
    assert_eq!(pod_waypoint(&s, "10.0.0.2"), None);
    assert_eq!(pod_waypoint(&s, "10.0.1.1"), None, "no label anywhere");
}

#[test]
fn a_waypoints_pods_are_its_endpoints_and_are_not_enrolled() {
    let s = state(BASE);
    let wp = &s.waypoints["app/ns-wp"];
    let pods: Vec<&str> = wp.endpoints.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(pods, ["wp-1"]);
    assert_eq!(wp.port, 15008);
    assert!(wp.takes(TrafficKind::Service) && wp.takes(TrafficKind::Workload));
    assert_eq!(
        s.waypoints["infra/shared"].port, 15009,
        "the HBONE listener's port"
    );
    assert!(s.waypoints["app/own-wp"].endpoints.is_empty());
    let w = s.workload(ip("10.0.0.100")).expect("waypoint pod");
    assert!(!w.enrolled, "a waypoint pod is never captured");
    assert!(w.waypoint.is_none(), "nor handed to a waypoint");
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/app/sa/ns-wp"
    );
    // A Gateway of another class names no waypoint; its pods stay ordinary pods.
    assert!(!s.waypoints.contains_key("app/ingress"));
    assert!(s.workload(ip("10.0.0.101")).expect("ingress pod").enrolled);
    assert!(s.workload(ip("10.0.0.1")).expect("a").enrolled);
}

#[test]
fn a_label_naming_no_gateway_attaches_nothing() {
    let mut y = BASE.to_string();
    y += "---\n{apiVersion: v1, kind: Service, metadata: {name: typo, namespace: plain, labels: {istio.io/use-waypoint: nope}}, spec: {clusterIP: 10.96.1.3, selector: {app: p}, ports: [{port: 80}]}}\n";
    let s = state(&y);
    assert_eq!(svc_waypoint(&s, "plain/typo"), None);
}

#[test]
fn controller_managed_pods_are_waypoint_pods_before_their_gateway_is_known() {
    let y = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}}
---
{apiVersion: v1, kind: Pod, metadata: {name: wp-1, namespace: app, labels: {gateway.istio.io/managed: istio.io-mesh-controller, gateway.networking.k8s.io/gateway-name: wp}}, spec: {nodeName: n1}, status: {podIP: 10.0.0.100, phase: Running}}
"#;
    let w = state(y).workload(ip("10.0.0.100")).cloned().expect("pod");
    assert!(!w.enrolled && w.waypoint.is_none());
}

fn apply(m: &mut Model, yaml: &str) {
    for o in objects(yaml) {
        m.apply(o);
    }
}

#[test]
fn the_model_rederives_attachment_as_objects_change() {
    let mut m = Model::new("cluster.local");
    apply(&mut m, BASE);
    let s = m.snapshot(1);
    assert_eq!(svc_waypoint(&s, "app/by-ns").as_deref(), Some("app/ns-wp"));

    // The namespace drops its label: its Services and pods follow.
    apply(
        &mut m,
        "{apiVersion: v1, kind: Namespace, metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}}",
    );
    let s = m.snapshot(2);
    assert_eq!(svc_waypoint(&s, "app/by-ns"), None);
    assert_eq!(pod_waypoint(&s, "10.0.0.1"), None);
    assert_eq!(svc_waypoint(&s, "app/own").as_deref(), Some("app/own-wp"));

    // The Service labels itself instead.
    apply(
        &mut m,
        "{apiVersion: v1, kind: Service, metadata: {name: by-ns, namespace: app, labels: {istio.io/use-waypoint: ns-wp}}, spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80}]}}",
    );
    assert_eq!(
        svc_waypoint(&m.snapshot(3), "app/by-ns").as_deref(),
        Some("app/ns-wp")
    );

    // The waypoint's Gateway goes: the pod it had becomes an ordinary enrolled pod and the
    // label attaches nothing; it comes back: the pod is the waypoint's again.
    m.delete("Gateway", "app", "ns-wp");
    let s = m.snapshot(4);
    assert_eq!(svc_waypoint(&s, "app/by-ns"), None);
    assert!(s.workload(ip("10.0.0.100")).expect("pod").enrolled);
    apply(
        &mut m,
        "{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: ns-wp, namespace: app}, spec: {gatewayClassName: istio-waypoint}}",
    );
    let s = m.snapshot(5);
    assert_eq!(svc_waypoint(&s, "app/by-ns").as_deref(), Some("app/ns-wp"));
    assert!(!s.workload(ip("10.0.0.100")).expect("pod").enrolled);
    assert_eq!(s.waypoints["app/ns-wp"].endpoints.len(), 1);

    // A waypoint pod of another namespace going away empties that waypoint, and the Service
    // pointing at it from `plain` sees it without being re-derived.
    m.delete("Pod", "infra", "shared-1");
    let s = m.snapshot(6);
    let cross = &s.services["plain/cross"];
    let wp = s.service_waypoint(cross).expect("still attached");
    assert!(wp.endpoints.is_empty());

    // A Gateway changing class stops being a waypoint.
    apply(
        &mut m,
        "{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {name: ns-wp, namespace: app}, spec: {gatewayClassName: istio}}",
    );
    let s = m.snapshot(7);
    assert!(!s.waypoints.contains_key("app/ns-wp"));
    assert_eq!(svc_waypoint(&s, "app/by-ns"), None);
}
