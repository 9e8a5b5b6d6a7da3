//! Where state comes from, behind one trait: [`StateSource`] delivers the first complete
//! [`State`] at start-up, then publishes every new one on a `watch` channel.
//!
//! The daemon only knows the trait and [`from_config`]; a source is a module here (today
//! [`file`], the Kubernetes YAML of `--state` watched by polling) plus one arm in
//! [`from_config`].

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::config::Config;
use crate::state::State;

pub mod file;

pub use file::FileSource;

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
}

/// A source of cluster state (workloads, services, policies).
///
/// Start-up calls [`initial`](StateSource::initial) once before any listener is bound, then
/// [`first_complete`](StateSource::first_complete) (racing it against shutdown signals, so a
/// source never handles signals itself), then spawns [`run`](StateSource::run) once the daemon
/// is ready. A state is published by replacing the channel's value; readers take snapshots.
pub trait StateSource: Send {
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
pub fn from_config(cfg: &Config) -> Box<dyn StateSource> {
    Box::new(FileSource::new(
        &cfg.state_path,
        &cfg.trust_domain,
        cfg.state_poll_interval,
    ))
}

/// The log line tests and operators watch for after each accepted change.
pub fn log_applied(state: &State) {
    tracing::info!(
        generation = state.generation,
        pods = state.workloads.len(),
        services = state.services.len(),
        enrolled = state.workloads.values().filter(|w| w.enrolled).count(),
        "state applied"
    );
}
