//! `ztunnel` binary: parse the command line, validate configuration, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use ztunnel::authz::check::AuthzCommand;
use ztunnel::config::{CaCommand, Cli, Command, Config};
use ztunnel::status::{self, View};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => return run_daemon(cli.run),
        Some(Command::Ca(ca)) => run_ca(ca),
        Some(Command::Status(a)) => status::run(View::Status, &a).map_err(Into::into),
        Some(Command::Workloads(a)) => status::run(View::Workloads, &a).map_err(Into::into),
        Some(Command::Certificates(a)) => status::run(View::Certificates, &a).map_err(Into::into),
        Some(Command::Authz(AuthzCommand::Check(args))) => {
            // Policy rejections and caveats are logged while the state is built: show them.
            let _ = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_target(false)
                .without_time()
                .with_ansi(false)
                .try_init();
            // Exit codes are part of the command's contract: 0 ALLOW, 1 DENY, 2 bad input.
            return ExitCode::from(ztunnel::authz::check::run(&args));
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the daemon: exit 2 for invalid configuration (before anything is bound), 1 when it
/// stops on an error, 0 after a clean shutdown.
fn run_daemon(args: ztunnel::config::RunArgs) -> ExitCode {
    let cfg = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            return ExitCode::from(2);
        }
    };
    ztunnel::telemetry::init_logging(&cfg);
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

/// `ztunnel ca …`: file CA maintenance, no daemon needed.
fn run_ca(cmd: CaCommand) -> anyhow::Result<()> {
    use ztunnel::identity::{FileCa, SpiffeId};
    match cmd {
        CaCommand::Init {
            ca_dir,
            trust_domain,
        } => {
            FileCa::load_or_create(&ca_dir, &trust_domain)?;
        }
        CaCommand::Issue {
            ca_dir,
            identity,
            cert,
            key,
            ttl,
        } => {
            let id = SpiffeId::parse(&identity)?;
            let ttl = ztunnel::config::parse_duration(&ttl)
                .ok_or_else(|| anyhow::anyhow!("--ttl `{ttl}`: expected e.g. 30m or 24h"))?;
            let ca = FileCa::load_or_create(&ca_dir, &id.trust_domain)?;
            ca.issue_to_files(&id, ttl, &cert, &key)?;
        }
    }
    Ok(())
}
