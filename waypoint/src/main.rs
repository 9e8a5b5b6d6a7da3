//! `waypoint` binary: parse the command line, set up logging, run until SIGTERM; or run the
//! operator command `waypoint check` and exit.

use std::process::ExitCode;

use clap::Parser;
use waypoint::app::{run, Args};
use waypoint::check::CheckArgs;
use ztunnel::config::LogFormat;

fn main() -> ExitCode {
    // The operator command needs none of the daemon's settings, so it is parsed on its own.
    if std::env::args_os().nth(1).is_some_and(|a| a == "check") {
        let args = CheckArgs::parse_from(std::env::args_os().skip(1));
        return ExitCode::from(waypoint::check::run(&args));
    }
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
