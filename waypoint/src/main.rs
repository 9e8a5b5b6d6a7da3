//! `waypoint` binary: parse the command line, set up logging, run until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use waypoint::app::{run, Args};
use ztunnel::config::LogFormat;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = ztunnel::telemetry::parse_log_filter(&args.log_level) {
        eprintln!("waypoint: invalid --log-level `{}`: {e}", args.log_level);
        return ExitCode::from(2);
    }
    ztunnel::telemetry::init_logging(&args.log_level, args.log_format == LogFormat::Json);
    // One thread: a waypoint scales by replicas, and the HBONE pool and hyper both run on a
    // single-threaded runtime (tokio is built without the multi-threaded scheduler).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("waypoint: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "waypoint stopped");
            ExitCode::from(1)
        }
    }
}
