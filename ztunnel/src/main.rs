//! `ztunnel` binary: parse the command line, validate configuration, set up logging, run.

use std::process::ExitCode;

use ztunnel::cli::Cli;
use ztunnel::config::{Config, ConfigError, RunArgs};

fn main() -> ExitCode {
    let cli = match Cli::from_env() {
        Ok(cli) => cli,
        Err(ConfigError::Usage(e)) => e.exit(),
        Err(e) => return invalid_config(&e),
    };
    match cli.command {
        None => run_daemon(cli.run),
        Some(command) => command.run(),
    }
}

/// Exit 2 for invalid configuration, before anything is bound.
fn invalid_config(e: &ConfigError) -> ExitCode {
    eprintln!("ztunnel: {e}");
    ExitCode::from(2)
}

/// Runs the daemon: exit 1 when it stops on an error, 0 after a clean shutdown.
fn run_daemon(args: RunArgs) -> ExitCode {
    let cfg = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => return invalid_config(&e),
    };
    ztunnel::telemetry::init_logging(&cfg.log_level, cfg.log_json);
    // The control plane (state, certificates, DNS, admin, accept loops) needs little and runs
    // on this thread; flows run on the data-plane workers (ztunnel::workers).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztunnel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ztunnel::app::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ztunnel stopped");
            eprintln!("ztunnel: {e}");
            ExitCode::FAILURE
        }
    }
}
