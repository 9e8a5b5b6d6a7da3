//! Logs and metrics. Logs go to stderr as text or as one JSON object per line with the event's
//! fields at the top level, which is what log pipelines and the tests parse; the log filter can
//! be changed at run time (admin `/logging?level=`). Metrics live in [`metrics`].

pub mod metrics;

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::Config;

pub use metrics::{ByteSink, ConnLabels, ConnMeter, Metrics};

/// The handle that swaps the log filter; set once by [`init_logging`].
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. The filter was validated with the rest of the config.
pub fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = if cfg.log_json {
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
        let _ = FILTER.set(handle);
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
    let filter = EnvFilter::try_new(directive).map_err(|e| LogLevelError::Invalid {
        directive: directive.to_string(),
        error: e.to_string(),
    })?;
    let handle = FILTER.get().ok_or(LogLevelError::NotReloadable)?;
    handle
        .reload(filter)
        .map_err(|_| LogLevelError::NotReloadable)?;
    Ok(current_log_level().unwrap_or_default())
}

/// The filter in force, as text.
pub fn current_log_level() -> Option<String> {
    FILTER
        .get()
        .and_then(|h| h.with_current(|f| f.to_string()).ok())
}
