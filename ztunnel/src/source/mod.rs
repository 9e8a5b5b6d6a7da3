//! Where state comes from, behind one trait: [`StateSource`] delivers the first complete
//! [`State`] at start-up, then publishes every new one on a `watch` channel.
//!
//! The daemon only knows the trait and [`from_config`]; a source is a module here ([`file`],
//! the Kubernetes YAML of `--state` watched by polling, and [`kube`], watches on the API
//! server) plus one arm in [`from_config`]. Each reports how current its view is through
//! [`SourceHealth`] (metrics, config dump, `ztunnel status`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{Config, SourceConfig};
use crate::state::State;

pub mod file;
pub mod kube;

pub use file::FileSource;
pub use kube::KubeSource;

/// Why the state source cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path vanished or is unreadable.
    #[error("state source {path}: {error}")]
    Read {
        /// File or directory.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A poll of the files did not finish (a bug: the poll panicked); the next one is tried.
    #[error("state source poll failed: {error}")]
    Poll {
        /// What the runtime reported.
        error: String,
    },
    /// The API server's client settings are unusable.
    #[error("kube source: {error}")]
    Kube {
        /// What is wrong, naming the file.
        error: String,
    },
}

/// A source of cluster state (workloads, services, policies).
///
/// Start-up calls [`initial`](StateSource::initial) once before any listener is bound, then
/// [`first_complete`](StateSource::first_complete) (racing it against shutdown signals, so a
/// source never handles signals itself), then spawns [`run`](StateSource::run) once the daemon
/// is ready. A state is published by replacing the channel's value; readers take snapshots.
pub trait StateSource: Send {
    /// How current the source's view is; shared with metrics and the admin API.
    fn health(&self) -> Arc<SourceHealth>;

    /// Reads the source once, at start-up. An error means the source is unusable and the
    /// daemon does not start; a state that is not complete yet is fine.
    fn initial(&mut self) -> Result<State, SourceError> {
        Ok(State::default())
    }

    /// Resolves once the source holds a complete state, the latest value of `tx` by then
    /// (the daemon is not ready before: a pod the source has not delivered yet would be
    /// unknown). States read meanwhile are published on `tx`; read errors are logged and
    /// retried, never returned.
    fn first_complete<'a>(&'a mut self, tx: &'a watch::Sender<Arc<State>>) -> BoxFuture<'a, ()>;

    /// Publishes every new state on `tx`, logged with [`log_applied`], forever. Read errors
    /// are logged and retried: the last good state stays in force.
    fn run(self: Box<Self>, tx: watch::Sender<Arc<State>>) -> BoxFuture<'static, ()>;
}

/// The state source `cfg` asks for.
/// The node daemon compiles policies and needs no copy of them as received
/// ([`crate::state::Model::keep_policy_objects`]).
pub fn from_config(cfg: &Config) -> Box<dyn StateSource> {
    open_with(&cfg.source, &cfg.trust_domain, false)
}

/// The state source `source` describes, with identities in `trust_domain`. Shared by the
/// daemon and the waypoint, so both follow the cluster the same way from the same flags.
/// Snapshots carry the AuthorizationPolicy objects as received (the waypoint compiles them).
pub fn open(source: &SourceConfig, trust_domain: &str) -> Box<dyn StateSource> {
    open_with(source, trust_domain, true)
}

fn open_with(
    source: &SourceConfig,
    trust_domain: &str,
    policy_objects: bool,
) -> Box<dyn StateSource> {
    match source {
        SourceConfig::File {
            path,
            poll_interval,
            max_file_size,
        } => {
            let s = FileSource::new(path, trust_domain, *poll_interval, *max_file_size);
            s.keep_policy_objects(policy_objects);
            Box::new(s)
        }
        SourceConfig::Kube { kubeconfig } => {
            let mut s = KubeSource::new(kubeconfig.clone(), trust_domain);
            s.keep_policy_objects(policy_objects);
            Box::new(s)
        }
    }
}

/// Whether a source's view is current, part by part (a kind of the API server, the files),
/// and for how long it has not been.
#[derive(Debug)]
pub struct SourceHealth {
    source: &'static str,
    parts: Mutex<BTreeMap<String, Part>>,
    stale_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    in_sync: Gauge,
}

/// One part's latest failure, if it is failing.
#[derive(Debug, Default, Clone)]
struct Part {
    /// Why it is failing.
    error: Option<String>,
    /// Since when.
    failing_since: Option<SystemTime>,
}

/// A failing part as the config dump shows it.
#[derive(Debug, Serialize)]
struct FailingPart {
    error: String,
    /// Unix seconds.
    failing_since: u64,
}

impl SourceHealth {
    /// Health of `source` (`file`, `kube`) with these parts, none failing.
    pub fn new<'a>(source: &'static str, parts: impl Iterator<Item = &'a str>) -> SourceHealth {
        SourceHealth {
            source,
            parts: Mutex::new(parts.map(|p| (p.to_string(), Part::default())).collect()),
            stale_seconds: Gauge::default(),
            in_sync: Gauge::default(),
        }
    }

    fn parts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Part>> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `part` fails with `error`. True when this is news (first failure or a
    /// different error): the caller logs it then, so a retry loop logs once per change.
    pub fn set_error(&self, part: &str, error: &str) -> bool {
        let news = {
            let mut parts = self.parts();
            let p = parts.entry(part.to_string()).or_default();
            let news = p.error.as_deref() != Some(error);
            p.error = Some(error.to_string());
            p.failing_since.get_or_insert_with(SystemTime::now);
            news
        };
        self.refresh();
        news
    }

    /// Records that `part` is current again (logged when it was failing).
    pub fn set_ok(&self, part: &str) {
        let was = self.parts().insert(part.to_string(), Part::default());
        if let Some(Part {
            error: Some(e),
            failing_since: Some(since),
        }) = was
        {
            let after = since.elapsed().unwrap_or_default();
            tracing::info!(source = self.source, part, after_secs = after.as_secs_f64(), previous_error = %e, "state source current again");
        }
        self.refresh();
    }

    /// How long the longest-failing part has been failing (zero when all are current): how
    /// much older than the cluster the daemon's view may be.
    pub fn stale_for(&self) -> Duration {
        let oldest = self.parts().values().filter_map(|p| p.failing_since).min();
        oldest.map_or(Duration::ZERO, |t| t.elapsed().unwrap_or_default())
    }

    /// Whether no part is failing.
    pub fn in_sync(&self) -> bool {
        self.parts().values().all(|p| p.error.is_none())
    }

    /// Updates the gauges (called on changes and every second by the source).
    pub fn refresh(&self) {
        self.stale_seconds.set(self.stale_for().as_secs_f64());
        self.in_sync.set(i64::from(self.in_sync()));
    }

    /// Registers `ztunnel_state_source_stale_seconds` and `ztunnel_state_source_in_sync`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ztunnel_state_source_stale_seconds",
            "How long the state source has failed to confirm the daemon's view (0: current)",
            self.stale_seconds.clone(),
        );
        r.register(
            "ztunnel_state_source_in_sync",
            "1 while every part of the state source (each watched kind, or the files) is current",
            self.in_sync.clone(),
        );
    }

    /// For the config dump and `ztunnel status`.
    pub fn snapshot(&self) -> serde_json::Value {
        let failing: BTreeMap<String, FailingPart> = self
            .parts()
            .iter()
            .filter_map(|(name, p)| {
                let since = p.failing_since.unwrap_or(SystemTime::UNIX_EPOCH);
                Some((
                    name.clone(),
                    FailingPart {
                        error: p.error.clone()?,
                        failing_since: since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    },
                ))
            })
            .collect();
        serde_json::json!({
            "source": self.source,
            "in_sync": failing.is_empty(),
            "stale_seconds": self.stale_for().as_secs(),
            "failing": failing,
        })
    }
}

/// The log line tests and operators watch for after each accepted change: the state of
/// `generation` is in force (published to the data path) from this line on.
/// `took`: the daemon's own work for the change, from the source seeing it (a file read, the
/// first watch event of a burst) to the new snapshot being published; `took_us` in the line.
/// `since_write`: for the file source, from the newest modification time of the files this
/// change read to now (file written to change in force, the poll interval included);
/// `since_write_us` in the line.
pub fn log_applied(state: &State, took: Option<Duration>, since_write: Option<Duration>) {
    let (pods, enrolled) = state
        .pods()
        .fold((0, 0), |(n, e), w| (n + 1, e + usize::from(w.enrolled)));
    let (generation, services) = (state.generation, state.services.len());
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    match (took, since_write) {
        (Some(t), Some(w)) => tracing::info!(
            generation,
            pods,
            services,
            enrolled,
            took_us = us(t),
            since_write_us = us(w),
            "state applied"
        ),
        (Some(t), None) => tracing::info!(
            generation,
            pods,
            services,
            enrolled,
            took_us = us(t),
            "state applied"
        ),
        _ => tracing::info!(generation, pods, services, enrolled, "state applied"),
    }
}
