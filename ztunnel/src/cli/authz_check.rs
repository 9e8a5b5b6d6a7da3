//! `ztunnel authz check`: explains the decision the daemon would make for a flow, without
//! sending traffic, by running the same [`crate::authz::evaluate`] on a state loaded from the same
//! YAML the daemon reads.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::authz::{evaluate, Request, DEFAULT_ROOT_NAMESPACE};
use crate::k8s;
use crate::state::{State, Workload};

/// `ztunnel authz …`
#[derive(Debug, Subcommand)]
pub enum AuthzCommand {
    /// Print ALLOW or DENY for a flow and the policy (or default) that decided it.
    /// Exit status: 0 ALLOW, 1 DENY, 2 bad input.
    Check(CheckArgs),
}

/// Arguments of `ztunnel authz check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// File or directory of Kubernetes YAML, as given to the daemon's --state.
    #[arg(long)]
    pub state: PathBuf,
    /// Source: `namespace/pod` or an IP address.
    #[arg(long)]
    pub from: String,
    /// Destination: `namespace/pod:port` (or `ip:port`); the port is the pod's port.
    #[arg(long)]
    pub to: String,
    /// The flow arrives in plaintext (no peer certificate), as from a non-enrolled source.
    /// Implied when the source is not an enrolled pod.
    #[arg(long)]
    pub plaintext: bool,
    /// SPIFFE trust domain of identities.
    #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Istio root namespace: policies there apply mesh-wide.
    #[arg(long, env = "ZTUNNEL_ROOT_NAMESPACE", default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
}

/// Why the check could not be made (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The state could not be read.
    #[error("--state {path}: {error}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// A state file has a bad document.
    #[error("--state: {0}")]
    Parse(#[from] k8s::ParseError),
    /// An argument does not name what it should.
    #[error("--{flag} `{value}`: {message}")]
    Arg {
        /// Flag name.
        flag: &'static str,
        /// Value given.
        value: String,
        /// What is wrong.
        message: String,
    },
}

/// The result of a check, ready to print.
#[derive(Debug)]
pub struct CheckOutcome {
    /// The decision.
    pub decision: crate::authz::Decision,
    /// Human-readable lines explaining it.
    pub lines: Vec<String>,
}

/// Runs the check; prints the outcome and returns the exit status (0, 1 or 2).
pub fn run(args: &CheckArgs) -> u8 {
    match check(args) {
        Ok(out) => {
            for l in &out.lines {
                println!("{l}");
            }
            if out.decision.allowed() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("ztunnel authz check: {e}");
            2
        }
    }
}

/// Loads the state and decides the flow.
pub fn check(args: &CheckArgs) -> Result<CheckOutcome, CheckError> {
    let state = load(&args.state, &args.trust_domain)?;
    let bad = |flag, value: &str, message: String| CheckError::Arg {
        flag,
        value: value.to_string(),
        message,
    };
    let (src_ip, src_w) = match args.from.parse::<IpAddr>() {
        Ok(ip) => (ip, state.workload(ip).cloned()),
        Err(_) => {
            let w = find(&state, &args.from).ok_or_else(|| {
                bad(
                    "from",
                    &args.from,
                    "no running pod with this namespace/name (or not an IP address)".into(),
                )
            })?;
            (w.ip, Some(w))
        }
    };
    let (dst, port) = args
        .to
        .rsplit_once(':')
        .ok_or_else(|| bad("to", &args.to, "expected `namespace/pod:port`".into()))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("to", &args.to, format!("`{port}` is not a port number")))?;
    let dst_w = match dst.parse::<IpAddr>() {
        Ok(ip) => state.workload(ip).cloned(),
        Err(_) => find(&state, dst),
    }
    .ok_or_else(|| {
        bad(
            "to",
            &args.to,
            "no running pod with this namespace/name or IP".into(),
        )
    })?;

    let mut lines = Vec::new();
    let enrolled_src = src_w.as_ref().filter(|w| w.enrolled);
    let plaintext = args.plaintext || enrolled_src.is_none();
    let src_identity = if plaintext {
        None
    } else {
        enrolled_src.map(|w| &w.identity)
    };
    lines.push(format!(
        "from: {} {} {}",
        src_w
            .as_deref()
            .map(Workload::key)
            .unwrap_or_else(|| "-".into()),
        src_ip,
        match src_identity {
            Some(id) => format!("identity {id} (HBONE)"),
            None => "no identity (plaintext)".into(),
        }
    ));
    lines.push(format!("to:   {} {}:{port}", dst_w.key(), dst_w.ip));
    if !dst_w.enrolled {
        let decision = crate::authz::Decision {
            verdict: crate::authz::Verdict::Allow,
            reason: crate::authz::Reason::NoAllowPolicy,
            dry_run: None,
            audited: Vec::new(),
        };
        lines.insert(
            0,
            "ALLOW: destination is not enrolled in the mesh; no policy is enforced".into(),
        );
        return Ok(CheckOutcome { decision, lines });
    }
    let req = Request {
        src_ip,
        src_identity: src_identity.map(|i| &**i),
        dst_namespace: &dst_w.namespace,
        dst_labels: &dst_w.labels,
        dst_ip: dst_w.ip,
        dst_port: port,
    };
    let decision = evaluate(&state.authz, &args.root_namespace, &req, plaintext);
    lines.insert(0, format!("{}: {}", decision.verdict, decision.reason));
    if let Some((v, r)) = &decision.dry_run {
        lines.push(format!("dry-run policies would make it {v}: {r}"));
    }
    for a in &decision.audited {
        lines.push(format!("audited by {a}"));
    }
    // Invalid policies of the destination's namespaces that did not decide, for the operator
    // who expected them to.
    let decided = decision.reason.policy();
    for p in state.authz.problems.iter().filter(|p| {
        let ns = p.policy.split('/').next().unwrap_or("");
        p.invalid
            && Some(p.policy.as_str()) != decided
            && (ns == dst_w.namespace || ns == args.root_namespace)
    }) {
        lines.push(format!(
            "note: {} {} failed validation (field `{}`: {}); {}",
            p.kind, p.policy, p.field, p.message, p.effect
        ));
    }
    Ok(CheckOutcome { decision, lines })
}

fn find(state: &State, key: &str) -> Option<std::sync::Arc<Workload>> {
    let (ns, name) = key.split_once('/')?;
    state
        .workloads
        .values()
        .find(|w| w.namespace == ns && w.name == name)
        .cloned()
}

/// Reads the state like the daemon does, but any bad document is an error here.
fn load(path: &Path, trust_domain: &str) -> Result<State, CheckError> {
    Ok(State::build(0, trust_domain, &read_objects(path)?))
}

/// The objects of a state file or directory (its `.yaml`, `.yml` and `.json` files in name
/// order), strictly: unlike the daemon, which keeps a bad file's last good content, an
/// operator command reports the first bad document. Shared with `waypoint check`.
pub fn read_objects(path: &Path) -> Result<Vec<k8s::Object>, CheckError> {
    let mut objects = Vec::new();
    for f in state_files(path)? {
        objects.extend(k8s::parse_file(&f, &read_file(&f)?)?);
    }
    Ok(objects)
}

/// The state files a `--state` path names, as the daemon reads them: the path itself, or a
/// directory's `.yaml`, `.yml` and `.json` files (not hidden ones) in name order.
pub fn state_files(path: &Path) -> Result<Vec<PathBuf>, CheckError> {
    let read_err = |error| CheckError::Read {
        path: path.to_path_buf(),
        error,
    };
    if !std::fs::metadata(path).map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(path).map_err(read_err)? {
        let p = e.map_err(read_err)?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
        if yaml && !name.starts_with('.') && p.is_file() {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// One state file's text.
pub fn read_file(f: &Path) -> Result<String, CheckError> {
    std::fs::read_to_string(f).map_err(|error| CheckError::Read {
        path: f.to_path_buf(),
        error,
    })
}
