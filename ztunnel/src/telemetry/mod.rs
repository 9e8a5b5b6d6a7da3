//! Logs and metrics. Logs go to stderr as text or as one JSON object per line with the event's
//! fields at the top level, which is what log pipelines and the tests parse; the log filter can
//! be changed at run time (admin `/logging?level=`). Metrics live in [`metrics`], the per-flow
//! record that feeds them and the access log in [`flow`].

pub mod flow;
pub mod metrics;
pub mod throttle;

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

pub use flow::{Failure, FlowReport};
pub use metrics::{
    ConnLabels, ConnMeter, Metrics, Protocol, Reporter, ResponseFlag, SecurityPolicy,
};

/// The handle that swaps the log filter and the directive it was built from; set once by
/// [`init_logging`].
static FILTER: OnceLock<(reload::Handle<Targets, Registry>, Mutex<String>)> = OnceLock::new();

/// Parses a log filter directive: `level` or `target=level` pairs separated by commas, as in
/// `RUST_LOG`. This is `tracing-subscriber`'s `Targets` filter rather than its `EnvFilter`:
/// span and field matching are not supported, and in exchange the daemon carries no regular
/// expression engine (a measurable share of its resident code).
pub fn parse_log_filter(directive: &str) -> Result<Targets, String> {
    directive.parse::<Targets>().map_err(|e| e.to_string())
}

/// Installs the global subscriber: `filter` as [`parse_log_filter`] takes it (`info` if it does
/// not parse; the daemon's configuration checked it already), lines as JSON objects when `json`.
pub fn init_logging(filter: &str, json: bool) {
    let (directive, filter) = match parse_log_filter(filter) {
        Ok(f) => (filter.to_string(), f),
        Err(_) => (
            "info".to_string(),
            Targets::new().with_default(tracing::Level::INFO),
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = if json {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set((handle, Mutex::new(directive)));
    }
}

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The directive does not parse (same syntax as `--log-level`).
    #[error("invalid log level `{directive}`: {error}")]
    Invalid {
        /// What was asked for.
        directive: String,
        /// Parser message.
        error: String,
    },
    /// Logging was not set up through [`init_logging`] (embedded use).
    #[error("log level cannot be changed: logging was not initialised by the daemon")]
    NotReloadable,
}

/// Replaces the log filter, e.g. `debug` or `info,ztunnel::hbone=trace`; returns the new one.
pub fn set_log_level(directive: &str) -> Result<String, LogLevelError> {
    let filter = parse_log_filter(directive).map_err(|error| LogLevelError::Invalid {
        directive: directive.to_string(),
        error,
    })?;
    let (handle, current) = FILTER.get().ok_or(LogLevelError::NotReloadable)?;
    let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
    handle
        .reload(filter)
        .map_err(|_| LogLevelError::NotReloadable)?;
    *current = directive.to_string();
    Ok(current.clone())
}

/// The filter in force, as the directive that set it.
pub fn current_log_level() -> Option<String> {
    let (_, current) = FILTER.get()?;
    let current = current.lock().unwrap_or_else(|p| p.into_inner());
    Some(current.clone())
}
