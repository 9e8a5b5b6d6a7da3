//! The `ztunnel` command line: the daemon's settings ([`RunArgs`]) or one of the operator
//! commands, which run here and exit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{
    CniDirArgs, CniInstallArgs, ConfigError, Dur, Mark, RunArgs, DEFAULT_CERT_TTL,
    DEFAULT_TRUST_DOMAIN,
};
use crate::status::{AdminArgs, StatusArgs, View};
use authz_check::AuthzCommand;

pub mod analyze;
pub mod authz_check;

/// Command line of the `ztunnel` binary.
#[derive(Debug, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Node-level ambient mesh tunnel daemon: captures enrolled pods' traffic with eBPF and \
             carries it between nodes in HBONE (HTTP/2 CONNECT over mutual TLS 1.3).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Operator commands; without one, the daemon runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Daemon settings.
    #[command(flatten)]
    pub run: RunArgs,
}

impl Cli {
    /// Parses the process's arguments and environment, and the `--config` file when the daemon
    /// is to run ([`crate::config::parse`]).
    pub fn from_env() -> Result<Cli, ConfigError> {
        crate::config::parse(std::env::args_os())
    }
}

/// Subcommands besides running the daemon.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The built-in file certificate authority, and the CA service serving from it.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Summary of a running daemon: readiness, pods, captures, certificates, HBONE pool.
    Status(StatusArgs),
    /// Workloads a running daemon knows, with enrollment and capture state.
    Workloads(StatusArgs),
    /// Workload certificates a running daemon holds: identity, serial, expiry.
    Certificates(StatusArgs),
    /// Print a running daemon's log filter, or set it (on the admin socket).
    LogLevel {
        /// New filter, e.g. `debug` or `info,ztunnel::hbone=debug`; without it, print the
        /// current one.
        filter: Option<String>,
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make a running daemon drain and exit, as SIGTERM does (on the admin socket).
    Quit(AdminArgs),
    /// Explain authorization decisions (AuthorizationPolicy, PeerAuthentication).
    #[command(subcommand)]
    Authz(AuthzCommand),
    /// List every object of a state that would be rejected, or applied with a caveat (an
    /// invalid policy enforced failing closed, an L7 rule the node cannot see), and what it
    /// means for traffic. Exit status: 0 clean, 1 findings, 2 bad input.
    Analyze(analyze::AnalyzeArgs),
    /// Remove what a daemon left in place on the node: the CNI plugin it installed
    /// (--cni-install: its entry in the node's CNI configuration, then its binary; new pods
    /// then start without asking a daemon) and the capture (it stopped without
    /// --detach-on-exit, or was killed: detaches the eBPF programs, removes their pins and the
    /// ip rule and route; enrolled pods' traffic then flows directly, outside the mesh). Run it
    /// in the node's network namespace with the daemon's --node-name / --bpf-pin-dir,
    /// --capture-mark, --route-table and --cni-*-dir, and no daemon running there (one with
    /// --cni-install would add the plugin back).
    Uninstall(UninstallArgs),
    /// Install the chained CNI plugin on the node, or remove it (what the daemon's
    /// --cni-install does at start, once).
    #[command(subcommand)]
    Cni(CniCommand),
}

/// `ztunnel cni …`
#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Copy `ztunnel-cni` into --cni-bin-dir and add it (talking to --cni-socket) to the chain
    /// of the node's CNI configuration in --cni-conf-dir; nothing is written that is already
    /// in place. Fails, changing no configuration, while there is none or it is malformed.
    Install {
        /// The daemon's CNI endpoint, written into the entry.
        #[arg(long, env = "ZTUNNEL_CNI_SOCKET", default_value = crate::config::DEFAULT_CNI_SOCKET)]
        cni_socket: PathBuf,
        /// What is installed, and where.
        #[command(flatten)]
        install: CniInstallArgs,
    },
    /// Remove the plugin's entry from the node's CNI configuration, then its binary.
    Uninstall(CniDirArgs),
}

impl CniCommand {
    fn run(self) -> anyhow::Result<()> {
        use crate::cni::install;
        match self {
            CniCommand::Install {
                cni_socket,
                install: args,
            } => {
                if !cni_socket.is_absolute() {
                    anyhow::bail!("--cni-socket must be an absolute path");
                }
                let settings = args.resolve(&cni_socket)?;
                let done = install::install(&settings, install::BinaryCheck::Content)?;
                let state = |written| if written { "written" } else { "unchanged" };
                println!(
                    "cni plugin installed: {} {}, {} {}",
                    done.binary.display(),
                    state(done.binary_written),
                    done.config.display(),
                    state(done.config_written),
                );
            }
            CniCommand::Uninstall(dirs) => print_cni_uninstalled(&dirs)?,
        }
        Ok(())
    }
}

/// Removes the plugin from the node and says what was removed.
fn print_cni_uninstalled(dirs: &CniDirArgs) -> anyhow::Result<()> {
    let gone = crate::cni::install::uninstall(&dirs.cni_bin_dir, &dirs.cni_conf_dir)?;
    let configs: Vec<String> = gone
        .configs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "cni plugin uninstalled: entry removed from [{}], binary {}",
        configs.join(", "),
        if gone.binary_removed {
            "removed"
        } else {
            "was not there"
        }
    );
    Ok(())
}

/// `ztunnel uninstall`: where the daemon's capture state is (the daemon's own settings).
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The node's name; the pin directory defaults to `/sys/fs/bpf/ztunnel/<node-name>`.
    #[arg(long, env = "ZTUNNEL_NODE_NAME")]
    node_name: Option<String>,
    /// The daemon's --bpf-pin-dir.
    #[arg(long, env = "ZTUNNEL_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,
    /// The daemon's --capture-mark (its ip rule is removed).
    #[arg(long, env = "ZTUNNEL_CAPTURE_MARK", default_value_t = Mark(0x2000))]
    capture_mark: Mark,
    /// The daemon's --route-table (its local route is removed).
    #[arg(long, env = "ZTUNNEL_ROUTE_TABLE", default_value_t = 1501)]
    route_table: u32,
    /// Where the daemon's --cni-install put the CNI plugin.
    #[command(flatten)]
    cni: CniDirArgs,
}

impl UninstallArgs {
    fn run(self) -> anyhow::Result<()> {
        let dir = match (self.bpf_pin_dir, self.node_name) {
            (Some(dir), _) => dir,
            (None, Some(node)) => PathBuf::from(format!("/sys/fs/bpf/ztunnel/{node}")),
            (None, None) => anyhow::bail!("give --bpf-pin-dir or --node-name"),
        };
        // The plugin first: new pods stop waiting for a daemon before capture goes.
        print_cni_uninstalled(&self.cni)?;
        let removed =
            crate::capture::uninstall_pinned(&dir, self.capture_mark.0, self.route_table)?;
        println!(
            "capture uninstalled: {removed} pins removed from {}, ip rule and route removed",
            dir.display()
        );
        Ok(())
    }
}

/// The certificate `ca issue` and `ca request` obtain, and where they write it.
#[derive(Debug, Clone, clap::Args)]
pub struct CertOut {
    /// SPIFFE identity, spiffe://<trust-domain>/ns/<ns>/sa/<sa> (for `ca request`, sent as the
    /// CSR's SAN and as `ImpersonatedIdentity`).
    #[arg(long)]
    identity: String,
    /// Where to write the PEM certificate chain.
    #[arg(long)]
    cert: PathBuf,
    /// Where to write the PEM private key (mode 0600).
    #[arg(long)]
    key: PathBuf,
    /// Certificate lifetime (asked for, with `ca request`).
    #[arg(long, default_value_t = DEFAULT_CERT_TTL)]
    ttl: Dur,
}

/// `ztunnel ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the root key and certificate in --ca-dir unless they already exist.
    Init {
        /// Directory holding root-cert.pem and root-key.pem.
        #[arg(long, env = "ZTUNNEL_CA_DIR")]
        ca_dir: PathBuf,
        /// Trust domain written into the root certificate's subject.
        #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a workload certificate to files, for a peer outside the daemon (an Envoy sidecar
    /// joining the mesh, a test client). Creates the CA if absent.
    Issue {
        /// Directory holding root-cert.pem and root-key.pem.
        #[arg(long, env = "ZTUNNEL_CA_DIR")]
        ca_dir: PathBuf,
        #[command(flatten)]
        out: CertOut,
    },
    /// Serve Istio's certificate protocol (gRPC over TLS) from the root in --ca-dir, so node
    /// daemons (`--ca-address`) get certificates without the root key: each caller is
    /// authenticated by a TokenReview and a node daemon gets only identities of pods on its
    /// own node.
    Serve(crate::ca_service::ServeArgs),
    /// Ask a CA service (`ztunnel ca serve`, istiod) for a certificate, as a daemon would, and
    /// write it and its key to files: to obtain a sidecar's certificate, or to see what the CA
    /// grants a token (the refusal's gRPC code is printed).
    Request {
        /// The CA service, https://host:port.
        #[arg(long, env = "ZTUNNEL_CA_ADDRESS")]
        ca_address: String,
        /// Root certificate (PEM) the CA's serving certificate chains to.
        #[arg(long, env = "ZTUNNEL_CA_ROOT_CERT")]
        ca_root_cert: PathBuf,
        /// Service-account token to present.
        #[arg(long, env = "ZTUNNEL_CA_TOKEN_PATH", default_value = crate::config::DEFAULT_CA_TOKEN_PATH)]
        ca_token_path: PathBuf,
        #[command(flatten)]
        out: CertOut,
    },
}

impl Command {
    /// Runs the operator command; its exit code.
    pub fn run(self) -> ExitCode {
        let result = match self {
            Command::Ca(ca) => ca.run(),
            Command::Status(a) => crate::status::run(View::Status, &a).map_err(Into::into),
            Command::Workloads(a) => crate::status::run(View::Workloads, &a).map_err(Into::into),
            Command::Certificates(a) => {
                crate::status::run(View::Certificates, &a).map_err(Into::into)
            }
            Command::LogLevel { filter, admin } => {
                crate::status::log_level(&admin, filter.as_deref()).map_err(Into::into)
            }
            Command::Quit(a) => crate::status::quit(&a).map_err(Into::into),
            Command::Uninstall(a) => a.run(),
            Command::Cni(c) => c.run(),
            Command::Authz(AuthzCommand::Check(args)) => {
                // Policy rejections and caveats are logged while the state is built: show them.
                let _ = tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .without_time()
                    .with_ansi(false)
                    .try_init();
                // Exit codes are part of the command's contract: 0 ALLOW, 1 DENY, 2 bad input.
                return ExitCode::from(authz_check::run(&args));
            }
            // Exit codes are part of the command's contract: 0 clean, 1 findings, 2 bad input.
            Command::Analyze(args) => return ExitCode::from(analyze::run(&args)),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ztunnel: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

impl CaCommand {
    /// File CA maintenance, no daemon needed.
    fn run(self) -> anyhow::Result<()> {
        use crate::identity::{FileCa, SpiffeId};
        match self {
            CaCommand::Init {
                ca_dir,
                trust_domain,
            } => {
                FileCa::load_or_create(&ca_dir, &trust_domain)?;
            }
            CaCommand::Issue { ca_dir, out } => {
                let id = SpiffeId::parse(&out.identity)?;
                let ca = FileCa::load_or_create(&ca_dir, &id.trust_domain)?;
                ca.issue_to_files(&id, out.ttl.0, &out.cert, &out.key)?;
            }
            CaCommand::Serve(args) => crate::ca_service::run(args)?,
            CaCommand::Request {
                ca_address,
                ca_root_cert,
                ca_token_path,
                out,
            } => {
                let id = SpiffeId::parse(&out.identity)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let ca =
                        crate::identity::RemoteCa::new(&ca_address, &ca_token_path, &ca_root_cert)?;
                    crate::identity::issue_to_files(&ca, &id, out.ttl.0, &out.cert, &out.key).await
                })?;
            }
        }
        Ok(())
    }
}
