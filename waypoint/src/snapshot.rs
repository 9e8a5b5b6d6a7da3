//! What the waypoint knows of the cluster: the daemon's [`State`] (Services, their VIPs and
//! ready endpoints, workloads and identities) plus the compiled [`RouteTable`] and the
//! attached authorization policies ([`PolicySet`]), built together from the same Kubernetes
//! objects so a request never sees routes or policies of one version and endpoints of another.
//!
//! [`FileWatch`] reads them from the `--state` YAML (a file, or every `.yaml`/`.yml`/`.json`
//! file of a directory) by polling, as the daemon does; a file that fails to parse keeps its
//! last good objects in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use ztunnel::k8s::{self, Object};
use ztunnel::state::State;

use crate::authz::compile::Problem;
use crate::authz::PolicySet;
use crate::routing::RouteTable;

/// One consistent view of endpoints and routes.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads and Services, as the node daemon builds them.
    pub state: State,
    /// HTTPRoutes attached to Services.
    pub routes: RouteTable,
    /// AuthorizationPolicies attached to waypoints and Services.
    pub policies: PolicySet,
}

impl Snapshot {
    /// Builds both halves from `objects`, logging each part of a route that cannot be used.
    pub fn build(generation: u64, trust_domain: &str, objects: &[Object]) -> Snapshot {
        let state = State::build(generation, trust_domain, objects);
        let http_routes: Vec<_> = objects
            .iter()
            .filter_map(|o| match o {
                Object::HttpRoute(r) => Some(r),
                _ => None,
            })
            .collect();
        let (routes, errors) = RouteTable::build(&http_routes);
        for e in &errors {
            tracing::warn!(route = %e.route, field = %e.field, error = %e.message, "route rejected in part");
        }
        let mut policies = Vec::new();
        for obj in objects.iter().filter_map(|o| match o {
            Object::AuthorizationPolicy(p) => Some(p),
            _ => None,
        }) {
            let (compiled, problems) = crate::authz::compile::policy(obj);
            let key = format!(
                "{}/{}",
                obj.metadata.namespace.as_deref().unwrap_or_default(),
                obj.metadata.name
            );
            for p in problems {
                match p {
                    Problem::Invalid { field, message } => tracing::warn!(
                        kind = "AuthorizationPolicy", policy = %key, field = %field, error = %message,
                        "policy rejected; it fails closed (an ALLOW allows nothing, a DENY or CUSTOM denies all)"
                    ),
                    Problem::Caveat(message) => tracing::warn!(
                        kind = "AuthorizationPolicy", policy = %key, caveat = %message,
                        "policy applied with a caveat"
                    ),
                }
            }
            policies.extend(compiled);
        }
        Snapshot {
            state,
            routes,
            policies: PolicySet::new(policies),
        }
    }
}

/// Why the state path cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("state {path}: {error}")]
pub struct ReadError {
    /// File or directory.
    pub path: PathBuf,
    /// Cause.
    pub error: std::io::Error,
}

/// Polls the state path and publishes a new [`Snapshot`] when any file's content changes.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    trust_domain: String,
    generation: u64,
    /// Per file: its last content, and the objects of its last good content.
    files: BTreeMap<PathBuf, (String, Vec<Object>)>,
}

impl FileWatch {
    /// A watch of `path` (not read yet).
    pub fn new(path: &Path, trust_domain: &str) -> FileWatch {
        FileWatch {
            path: path.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            generation: 0,
            files: BTreeMap::new(),
        }
    }

    fn list(&self) -> Result<Vec<PathBuf>, ReadError> {
        let err = |error| ReadError {
            path: self.path.clone(),
            error,
        };
        if !self.path.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(err)? {
            let p = entry.map_err(err)?.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if p.is_file() && matches!(ext, "yaml" | "yml" | "json") {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads every file; returns a new snapshot when something changed (always on the first
    /// call). Unparseable files are logged and keep their previous objects.
    pub fn poll(&mut self) -> Result<Option<Snapshot>, ReadError> {
        let paths = self.list()?;
        let mut changed = self.generation == 0 || paths.len() != self.files.len();
        let mut next = BTreeMap::new();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|error| ReadError {
                path: p.clone(),
                error,
            })?;
            let previous = self.files.remove(&p);
            let entry = match previous {
                Some((old, objs)) if old == text => (old, objs),
                previous => {
                    changed = true;
                    match k8s::parse_file(&p, &text) {
                        Ok(objs) => (text, objs),
                        Err(e) => {
                            tracing::warn!(error = %e, "state rejected; the file's last good content stays");
                            (text, previous.map(|(_, o)| o).unwrap_or_default())
                        }
                    }
                }
            };
            next.insert(p, entry);
        }
        self.files = next;
        if !changed {
            return Ok(None);
        }
        self.generation += 1;
        let objects: Vec<Object> = self.files.values().flat_map(|(_, o)| o.clone()).collect();
        let snap = Snapshot::build(self.generation, &self.trust_domain, &objects);
        tracing::info!(
            generation = self.generation,
            services = snap.state.services.len(),
            routed_services = snap.routes.services(),
            "state applied"
        );
        Ok(Some(snap))
    }

    /// Polls every `interval` forever, publishing each new snapshot on `tx`.
    pub async fn run(mut self, interval: Duration, tx: watch::Sender<Arc<Snapshot>>) {
        loop {
            tokio::time::sleep(interval).await;
            match self.poll() {
                Ok(Some(snap)) => {
                    tx.send_replace(Arc::new(snap));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "state unreadable; the last state stays"),
            }
        }
    }
}
