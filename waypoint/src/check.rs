//! `waypoint check`: explains what the waypoint would do with one request, without sending
//! it: the authorization decision and the deciding policy, then every backend the request
//! could be routed to with its weight (or the answer the waypoint would give instead).
//!
//! It builds the same [`Snapshot`] the waypoint builds from the same YAML and calls the same
//! functions the data path calls ([`crate::normalize::uri`], [`crate::forward::authorize`],
//! [`crate::forward::route`]), so what the operator is told is what the waypoint does.
//! Exit status: 0 allowed, 1 denied, 2 bad input.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use ztunnel::cli::authz_check::{read_objects, CheckError};
use ztunnel::k8s::Object;
use ztunnel::state::Workload;

use crate::forward::{authorize, route, Dest, Downstream, Routed, Target};
use crate::snapshot::Snapshot;
use crate::upstream::Proto;

/// Arguments of `waypoint check`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "waypoint check",
    about = "Explain a request through the waypoint: authorization decision, deciding policy, \
             and every backend it could be routed to. Exit status: 0 allowed, 1 denied, 2 bad input."
)]
pub struct CheckArgs {
    /// File or directory of Kubernetes YAML, as given to the waypoint's --state.
    #[arg(long)]
    pub state: PathBuf,
    /// The client: `namespace/pod`, or a pod's IP address.
    #[arg(long)]
    pub from: String,
    /// The destination, `HOST:PORT`: a Service VIP, a pod IP, or `name.namespace.svc.<domain>`.
    #[arg(long)]
    pub to: String,
    /// Request method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request path, with the query if any.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// A request header, `name: value`; repeatable. `Host` defaults to the HOST of --to.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// The waypoint's Gateway, `namespace/name`; by default the only `istio-waypoint`
    /// Gateway in the state.
    #[arg(long)]
    pub gateway: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, env = "WAYPOINT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Cluster DNS domain of Service names.
    #[arg(long, env = "WAYPOINT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

/// What a check found, ready to print.
#[derive(Debug)]
pub struct Outcome {
    /// The request may pass.
    pub allowed: bool,
    /// Lines for the operator.
    pub lines: Vec<String>,
}

/// Runs the check and prints it; returns the exit status (0, 1 or 2).
pub fn run(args: &CheckArgs) -> u8 {
    match check(args) {
        Ok(out) => {
            for l in &out.lines {
                println!("{l}");
            }
            if out.allowed {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("waypoint check: {e}");
            2
        }
    }
}

fn bad(flag: &'static str, value: &str, message: impl Into<String>) -> CheckError {
    CheckError::Arg {
        flag,
        value: value.to_string(),
        message: message.into(),
    }
}

/// Loads the state and explains the request.
pub fn check(args: &CheckArgs) -> Result<Outcome, CheckError> {
    let objects = read_objects(&args.state)?;
    let gateway = match &args.gateway {
        Some(g)
            if g.split_once('/')
                .is_some_and(|(n, m)| !n.is_empty() && !m.is_empty()) =>
        {
            g.clone()
        }
        Some(g) => return Err(bad("gateway", g, "expected `namespace/name`")),
        None => only_waypoint(&objects)?,
    };
    let snap = Snapshot::build(0, &args.trust_domain, &objects);
    let client = source(&snap, &args.from)?;
    let (dest, authority, host) = destination(&snap, &args.to, &args.cluster_domain)?;
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|_| bad("method", &args.method, "not an HTTP method"))?;
    let mut req = Request::builder()
        .method(method)
        .uri(args.path.as_str())
        .body(())
        .map_err(|e| bad("path", &args.path, e.to_string()))?;
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| bad("header", h, "expected `name: value`"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad("header", h, "not a header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| bad("header", h, "not a header value"))?;
        req.headers_mut().append(name, value);
    }
    if !req.headers().contains_key(http::header::HOST) {
        let value = HeaderValue::from_str(&host).map_err(|_| bad("to", &args.to, "bad host"))?;
        req.headers_mut().insert(http::header::HOST, value);
    }
    let (mut parts, ()) = req.into_parts();
    let down = Downstream {
        dest: dest.clone(),
        authority,
        client: SocketAddr::new(client.ip, 0),
        identity: (*client.identity).clone(),
        proto: Proto::Http1,
    };
    if !crate::normalize::uri(&mut parts.uri) {
        return Err(bad("path", &args.path, "cannot be normalized"));
    }
    let decision = authorize(&snap, &gateway, &down, &parts);
    let mut lines = vec![format!("{}: {}", decision.verdict, decision.reason)];
    if let Some(policy) = decision.reason.policy() {
        let rule = decision.reason.rule().map(|r| format!(" rule {r}"));
        lines.push(format!("policy: {policy}{}", rule.unwrap_or_default()));
    }
    if let Some((v, r)) = &decision.dry_run {
        lines.push(format!("dry-run policies would make it {v}: {r}"));
    }
    for a in &decision.audited {
        lines.push(format!("audited by {a}"));
    }
    lines.push(format!(
        "from: {} {} identity {}",
        client.key(),
        client.ip,
        client.identity
    ));
    lines.push(format!(
        "to:   {} ({authority}) through Gateway {gateway}",
        match &dest {
            Dest::Service { key, port } => format!("Service {key}:{port}"),
            Dest::Pod(addr) => format!("pod {addr}"),
        }
    ));
    lines.push(format!("request: {} {host} {}", parts.method, parts.uri));
    if !decision.allowed() {
        lines.push(format!("route: none (403 {})", crate::authz::DENIED_BODY));
        return Ok(Outcome {
            allowed: false,
            lines,
        });
    }
    lines.extend(routes(&snap, &mut parts, &down));
    Ok(Outcome {
        allowed: true,
        lines,
    })
}

/// The `route:` lines of an allowed request.
fn routes(snap: &Snapshot, parts: &mut http::request::Parts, down: &Downstream) -> Vec<String> {
    let endpoints = |key: &str, port: u16| {
        let ready = snap
            .state
            .services
            .get(key)
            .is_some_and(|s| s.ports.iter().any(|p| p.port == port) && !s.endpoints.is_empty());
        if ready {
            ""
        } else {
            " (no ready endpoint: 503)"
        }
    };
    match route(snap, parts, down) {
        Routed::Answer(resp, rule) => {
            let why = match resp.headers().get(http::header::LOCATION) {
                Some(l) => format!("redirect to {}", String::from_utf8_lossy(l.as_bytes())),
                None if resp.status() == http::StatusCode::NOT_FOUND => {
                    "no HTTPRoute rule matches".into()
                }
                None => rule
                    .as_ref()
                    .and_then(|r| r.invalid.clone())
                    .unwrap_or_else(|| "answered by the waypoint".into()),
            };
            let mut out = vec![format!("route: none ({} {why})", resp.status().as_u16())];
            out.extend(rule.map(|r| format!("rule: {}#{}", r.route, r.index)));
            out
        }
        Routed::Forward(fwd) => match (&fwd.rule, &fwd.target) {
            (Some(rule), _) => {
                let request_port = match &down.dest {
                    Dest::Service { port, .. } => *port,
                    Dest::Pod(addr) => addr.port(),
                };
                let mut out: Vec<String> = rule
                    .backends
                    .iter()
                    .map(|b| {
                        let port = b.port.unwrap_or(request_port);
                        format!(
                            "route: {}:{port} weight {}{}",
                            b.service,
                            b.weight,
                            endpoints(&b.service, port)
                        )
                    })
                    .collect();
                out.push(format!("rule: {}#{}", rule.route, rule.index));
                out
            }
            (_, Target::Service(key, port)) => vec![
                format!("route: {key}:{port} weight 1{}", endpoints(key, *port)),
                "rule: none (no HTTPRoute attached: the Service itself)".into(),
            ],
            (_, Target::Pod(addr)) => {
                let pod = snap
                    .state
                    .workload(addr.ip())
                    .map_or_else(|| "-".to_string(), |w| w.key());
                vec![format!("route: pod {pod} {addr} weight 1")]
            }
        },
    }
}

/// The only waypoint Gateway of the state, `namespace/name`.
fn only_waypoint(objects: &[Object]) -> Result<String, CheckError> {
    let gateways: Vec<String> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Gateway(g) if g.spec.gateway_class_name == "istio-waypoint" => Some(format!(
                "{}/{}",
                g.metadata.namespace.as_deref().unwrap_or_default(),
                g.metadata.name
            )),
            _ => None,
        })
        .collect();
    match &gateways[..] {
        [one] => Ok(one.clone()),
        [] => Err(bad(
            "gateway",
            "",
            "the state has no Gateway of class istio-waypoint; name one with --gateway",
        )),
        many => Err(bad(
            "gateway",
            "",
            format!(
                "the state has several waypoints ({}); pick one",
                many.join(", ")
            ),
        )),
    }
}

/// The client pod.
fn source(snap: &Snapshot, from: &str) -> Result<Arc<Workload>, CheckError> {
    let found = match from.parse::<IpAddr>() {
        Ok(ip) => snap.state.workload(ip).cloned(),
        Err(_) => from.split_once('/').and_then(|(ns, name)| {
            snap.state
                .workloads
                .values()
                .find(|w| w.namespace == ns && w.name == name)
                .cloned()
        }),
    };
    found.ok_or_else(|| {
        bad(
            "from",
            from,
            "no running pod with this namespace/name or IP in the state",
        )
    })
}

/// The destination of `HOST:PORT`: what the waypoint would route, the CONNECT authority a
/// node daemon would send, and the host the request names.
fn destination(
    snap: &Snapshot,
    to: &str,
    cluster_domain: &str,
) -> Result<(Dest, SocketAddr, String), CheckError> {
    let (host, port) = to
        .rsplit_once(':')
        .ok_or_else(|| bad("to", to, "expected `HOST:PORT`"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("to", to, format!("`{port}` is not a port number")))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let authority = match bare.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => {
            let suffix = format!(".svc.{cluster_domain}");
            let key = host
                .strip_suffix(&suffix)
                .and_then(|n| n.split_once('.'))
                .filter(|(name, ns)| !name.is_empty() && !ns.is_empty() && !ns.contains('.'))
                .map(|(name, ns)| format!("{ns}/{name}"))
                .ok_or_else(|| {
                    bad(
                        "to",
                        to,
                        format!("HOST must be an IP address or `<service>.<namespace>{suffix}`"),
                    )
                })?;
            let svc = snap
                .state
                .services
                .get(&key)
                .ok_or_else(|| bad("to", to, format!("no Service {key} in the state")))?;
            let vip = svc
                .vips
                .first()
                .ok_or_else(|| bad("to", to, format!("Service {key} is headless (no VIP)")))?;
            SocketAddr::new(*vip, port)
        }
    };
    let dest = crate::server::destination(&snap.state, authority).ok_or_else(|| {
        bad(
            "to",
            to,
            "not a port of a Service nor a pod the waypoint knows (the waypoint refuses the \
             stream with 503)",
        )
    })?;
    Ok((dest, authority, host.to_string()))
}
