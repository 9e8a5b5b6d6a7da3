//! Logs (and, later, metrics). Logs go to stderr as text or as one JSON object per line with
//! the event's fields at the top level, which is what log pipelines and the tests parse.

use tracing_subscriber::EnvFilter;

use crate::config::Config;

/// Installs the global subscriber. The filter was validated with the rest of the config.
pub fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}
