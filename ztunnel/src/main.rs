//! `ztunnel` binary: parse the command line, validate configuration, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use ztunnel::config::{CaCommand, Cli, Command, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Ca(CaCommand::Init {
        ca_dir,
        trust_domain,
    })) = cli.command
    {
        return match ztunnel::identity::FileCa::load_or_create(&ca_dir, &trust_domain) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ztunnel: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Authz(ztunnel::authz::check::AuthzCommand::Check(args))) = &cli.command {
        // Policy rejections and caveats are logged while the state is built: show them.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_target(false)
            .without_time()
            .with_ansi(false)
            .try_init();
        return ExitCode::from(ztunnel::authz::check::run(args));
    }
    let cfg = match Config::resolve(cli.run) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            return ExitCode::from(2);
        }
    };
    ztunnel::telemetry::init_logging(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
