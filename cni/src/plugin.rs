//! The plugin's logic, as the CNI specification has a chained plugin behave: the network
//! configuration (with `prevResult`) on stdin, the command and the pod in the environment, the
//! `prevResult` passed on as the result, errors as `{"cniVersion", "code", "msg", "details"}`
//! on stdout with a non-zero exit.
//!
//! **When the daemon cannot be reached** (no socket, nobody listening, no answer in time) the
//! plugin cannot tell whether the pod's namespace is enrolled: that is in the daemon's state.
//! The rule is therefore to fail closed: the ADD (and CHECK) fails with code 11 ("try again
//! later") naming the socket and the cause, and the runtime retries the sandbox until the
//! daemon answers. A pod of an enrolled namespace thus never starts uncaptured. Two settings
//! of the network configuration relax it, both chosen by the operator in the conflist:
//! `excludeNamespaces` (pods of these namespaces never ask the daemon, for the namespaces that
//! must start while the daemon is down, e.g. `kube-system`; they are never enrolled through
//! the plugin, only through the state as before) and `failOpen: true` (an unreachable daemon
//! lets every pod start, accepting a plaintext window for enrolled ones until the daemon is
//! back and sees them). A daemon that answers but cannot capture the pod always fails the ADD.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Action, Reply, Request, DEFAULT_SOCKET};

/// CNI versions this plugin speaks (the result is the previous plugin's, passed on).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// How long the daemon has to answer unless the configuration says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// CNI error codes used here (the specification's well-known ones).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// The daemon answered that the pod cannot be captured (plugin-specific, >= 100).
    pub const NOT_CAPTURED: u32 = 100;
}

/// The plugin's part of the network configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The configuration's CNI version; the result is given in it.
    #[serde(default)]
    pub cni_version: String,
    /// The daemon's socket (default [`DEFAULT_SOCKET`]).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Seconds the daemon has to answer (default 10).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Let pods start when the daemon cannot be reached (default false: fail closed).
    #[serde(default)]
    pub fail_open: bool,
    /// Namespaces whose pods never ask the daemon.
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    /// The previous plugin's result.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

/// The CNI environment (`CNI_*` variables).
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl Env {
    /// From the process environment.
    pub fn from_process() -> Env {
        let var = |k| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Printed on stdout (a result, an error object, or nothing).
    pub stdout: String,
    /// Printed on stderr (the runtime logs it).
    pub stderr: String,
    /// Process exit code.
    pub exit: i32,
}

/// Why the daemon gave no answer.
#[derive(Debug)]
pub struct Unreachable(pub String);

/// Asks the daemon at `socket`: one request line, one reply line, within `timeout`.
pub fn ask_daemon(socket: &Path, timeout: Duration, req: &Request) -> Result<Reply, Unreachable> {
    let at = |what: &str, e: std::io::Error| Unreachable(format!("{what}: {e}"));
    let mut stream = UnixStream::connect(socket).map_err(|e| at("connecting", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| at("setting timeouts", e))?;
    stream
        .write_all(req.to_line().as_bytes())
        .map_err(|e| at("sending the request", e))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| at("waiting for the answer", e))?;
    if line.is_empty() {
        return Err(Unreachable(
            "the daemon closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&line).map_err(|e| Unreachable(format!("unreadable answer: {e}")))
}

/// Runs one CNI command. `talk` reaches the daemon ([`ask_daemon`] in the binary).
pub fn run(
    env: &Env,
    stdin: &[u8],
    talk: impl FnOnce(&Path, Duration, &Request) -> Result<Reply, Unreachable>,
) -> Outcome {
    let conf: Result<NetConf, _> = serde_json::from_slice(stdin);
    let version = conf
        .as_ref()
        .map(|c| c.cni_version.clone())
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "1.0.0".to_string());
    let fail = |code, msg: String, details: String| Outcome {
        stdout: error_json(&version, code, &msg, &details),
        stderr: format!("ztunnel-cni: {msg}{}\n", suffix(&details)),
        exit: 1,
    };
    if env.command == "VERSION" {
        return Outcome {
            stdout: json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
                .to_string(),
            stderr: String::new(),
            exit: 0,
        };
    }
    let action = match env.command.as_str() {
        "ADD" => Action::Add,
        "DEL" => Action::Del,
        "CHECK" => Action::Check,
        other => {
            return fail(
                code::INVALID_ENV,
                format!("unsupported CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK or VERSION".into(),
            )
        }
    };
    let conf = match conf {
        Ok(c) => c,
        // DEL never fails the pod's deletion, whatever came in.
        Err(e) if action == Action::Del => return del_done(format!("unreadable config: {e}")),
        Err(e) => {
            return fail(
                code::DECODE,
                "cannot read the network configuration".into(),
                e.to_string(),
            )
        }
    };
    if action != Action::Del && !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return fail(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        );
    }
    let (namespace, name) = match pod_args(&env.args) {
        Some(p) => p,
        None => {
            // Not a Kubernetes pod (no K8S_POD_* arguments): nothing of the mesh applies.
            return pass(
                action,
                &conf,
                &version,
                "no K8S_POD_NAMESPACE/K8S_POD_NAME; not a pod",
            );
        }
    };
    if conf.exclude_namespaces.contains(&namespace) {
        return pass(
            action,
            &conf,
            &version,
            "namespace excluded by excludeNamespaces",
        );
    }
    let prev = conf.prev_result.clone();
    if action != Action::Del && prev.is_none() {
        return fail(
            code::INVALID_CONFIG,
            "no prevResult: ztunnel-cni is a chained plugin".into(),
            "list it after the plugin that creates the pod's interface in the conflist".into(),
        );
    }
    let (ips, host_interface) = prev.as_ref().map(addresses).unwrap_or_default();
    let req = Request {
        action,
        container_id: env.container_id.clone(),
        namespace,
        name,
        ips,
        host_interface,
        netns: Some(env.netns.clone()).filter(|n| !n.is_empty()),
    };
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = conf
        .timeout
        .filter(|t| t.is_finite() && *t > 0.0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64);
    let pod = format!("{}/{}", req.namespace, req.name);
    let answer = talk(&socket, timeout, &req);
    if action == Action::Del {
        return match answer {
            Ok(_) => del_done(String::new()),
            Err(Unreachable(e)) => del_done(format!(
                "daemon at {} not told ({e}); it drops the pod when its state does",
                socket.display()
            )),
        };
    }
    match answer {
        Ok(Reply::Captured { interface, ifindex }) => pass(
            action,
            &conf,
            &version,
            &format!("{pod} captured on {interface} (ifindex {ifindex})"),
        ),
        Ok(Reply::NotCaptured { reason }) => pass(action, &conf, &version, &reason),
        Ok(Reply::Removed) => pass(action, &conf, &version, "nothing to do"),
        Ok(Reply::Failed { message, retry }) => fail(
            if retry {
                code::TRY_AGAIN
            } else {
                code::NOT_CAPTURED
            },
            format!("ztunnel cannot capture pod {pod}: {message}"),
            String::new(),
        ),
        Err(Unreachable(e)) if conf.fail_open => pass(
            action,
            &conf,
            &version,
            &format!(
                "daemon at {} unreachable ({e}); failOpen lets the pod start uncaptured",
                socket.display()
            ),
        ),
        Err(Unreachable(e)) => fail(
            code::TRY_AGAIN,
            format!(
                "ztunnel daemon unreachable at {}: {e}; pod {pod} not started so it cannot \
                 send in clear",
                socket.display()
            ),
            "the plugin fails closed while the node's ztunnel is not running; the runtime \
             retries. Set failOpen or excludeNamespaces in the conflist to let pods start \
             without it"
                .into(),
        ),
    }
}

/// Success: ADD prints the previous result (in the configuration's version), CHECK nothing.
fn pass(action: Action, conf: &NetConf, version: &str, note: &str) -> Outcome {
    let stdout = match (action, &conf.prev_result) {
        (Action::Add, Some(prev)) => {
            let mut r = prev.clone();
            if let Some(o) = r.as_object_mut() {
                o.insert("cniVersion".into(), Value::String(version.to_string()));
            }
            r.to_string()
        }
        // A first plugin in the chain (no prevResult) has nothing to pass on.
        (Action::Add, None) => json!({"cniVersion": version}).to_string(),
        _ => String::new(),
    };
    Outcome {
        stdout,
        stderr: format!("ztunnel-cni: {note}\n"),
        exit: 0,
    }
}

fn del_done(note: String) -> Outcome {
    Outcome {
        stdout: String::new(),
        stderr: if note.is_empty() {
            String::new()
        } else {
            format!("ztunnel-cni: DEL: {note}\n")
        },
        exit: 0,
    }
}

fn suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

fn error_json(version: &str, code: u32, msg: &str, details: &str) -> String {
    json!({"cniVersion": version, "code": code, "msg": msg, "details": details}).to_string()
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`).
pub fn pod_args(args: &str) -> Option<(String, String)> {
    let get = |key: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    };
    Some((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
}

/// The pod's addresses and the node-side interface from a result (0.3.0 and later: `ips`
/// with `address` in CIDR form; `interfaces`, the host's being the one without `sandbox`).
pub fn addresses(result: &Value) -> (Vec<IpAddr>, Option<String>) {
    let ips = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    let host = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().unwrap_or_default().is_empty())
        .and_then(|i| i["name"].as_str())
        .map(str::to_string);
    (ips, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1","mac":"aa"},{"name":"eth0","sandbox":"/run/netns/p"}],"ips":[{"interface":1,"address":"10.244.1.224/24","gateway":"10.244.1.1"}],"routes":[{"dst":"10.244.0.0/16"}],"dns":{}}"#;

    fn conf(extra: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"1.0.0","name":"mesh","type":"ztunnel-cni","socket":"/x.sock"{extra},"prevResult":{PREV}}}"#).into_bytes()
    }

    fn env(cmd: &str) -> Env {
        Env {
            command: cmd.into(),
            container_id: "c1".into(),
            netns: "/run/netns/p".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=a".into(),
        }
    }

    #[test]
    fn add_announces_the_pod_and_passes_prev_result_on() {
        let out = run(&env("ADD"), &conf(""), |sock, _, req| {
            assert_eq!(sock, Path::new("/x.sock"));
            assert_eq!(req.ips, vec!["10.244.1.224".parse::<IpAddr>().expect("ip")]);
            assert_eq!(req.host_interface.as_deref(), Some("veth1"));
            assert_eq!((req.namespace.as_str(), req.name.as_str()), ("mesh", "a"));
            Ok(Reply::Captured {
                interface: "veth1".into(),
                ifindex: 7,
            })
        });
        assert_eq!(out.exit, 0, "{out:?}");
        let result: Value = serde_json::from_str(&out.stdout).expect("json");
        let prev: Value = serde_json::from_str(PREV).expect("json");
        assert_eq!(result, prev);
    }

    #[test]
    fn unreachable_daemon_fails_closed_unless_configured() {
        let down = |_: &Path, _, _: &Request| Err(Unreachable("connecting: No such file".into()));
        let out = run(&env("ADD"), &conf(""), down);
        assert_eq!(out.exit, 1);
        let e: Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(e["code"], 11);
        assert!(
            e["msg"].as_str().is_some_and(|m| m.contains("/x.sock")),
            "{e}"
        );
        assert_eq!(run(&env("ADD"), &conf(r#","failOpen":true"#), down).exit, 0);
        let excluded = conf(r#","excludeNamespaces":["mesh"]"#);
        assert_eq!(
            run(&env("ADD"), &excluded, |_, _, _| panic!("asked")).exit,
            0
        );
        // DEL never fails.
        let out = run(&env("DEL"), &conf(""), down);
        assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
        assert_eq!(run(&env("DEL"), b"not json", down).exit, 0);
    }

    #[test]
    fn refusals_and_bad_input_are_cni_errors() {
        let out = run(&env("ADD"), &conf(""), |_, _, _| {
            Ok(Reply::Failed {
                message: "no route".into(),
                retry: false,
            })
        });
        assert_eq!(out.exit, 1);
        assert!(out.stdout.contains(r#""code":100"#), "{}", out.stdout);
        let out = run(&env("ADD"), b"{", |_, _, _| panic!("asked"));
        assert!(out.stdout.contains(r#""code":6"#), "{}", out.stdout);
        let no_prev = br#"{"cniVersion":"1.0.0","name":"m","type":"ztunnel-cni"}"#;
        let out = run(&env("ADD"), no_prev, |_, _, _| panic!("asked"));
        assert!(out.stdout.contains(r#""code":7"#), "{}", out.stdout);
        let out = run(&env("VERSION"), b"", |_, _, _| panic!("asked"));
        assert!(out.stdout.contains("supportedVersions"), "{}", out.stdout);
    }

    #[test]
    fn pod_args_parse() {
        assert_eq!(
            pod_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
            Some(("ns".into(), "p".into()))
        );
        assert_eq!(pod_args("K8S_POD_NAMESPACE=ns"), None);
    }
}
