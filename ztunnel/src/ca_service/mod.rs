//! `ztunnel ca serve`: a CA service speaking Istio's certificate protocol, so that node daemons
//! get workload certificates without holding the mesh's root key.
//!
//! Each `CreateCertificate` call is authenticated by the caller's service-account token
//! (TokenReview against the API server) and authorized by [`authorize`]: a workload may have
//! its own identity, a node agent the identities of pods scheduled on its own node, as the
//! API server (not the agent) says. Only this process reads the root key (`--ca-dir`, a
//! directory or a mounted Secret); it serves TLS with a certificate it issues itself at start.

pub mod authorize;
mod kube;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::codegen::BoxFuture;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::config::{Dur, LogFormat, DEFAULT_CERT_TTL, DEFAULT_TRUST_DOMAIN};
use crate::identity::istio_ca::{
    CertificateServer, IstioCertificateRequest, IstioCertificateResponse, Signer,
};
use crate::identity::{csr_identity, CaError, FileCa};
use authorize::{Caller, Policy, Refusal};
pub use kube::KubeDirectory;

/// Istio's port for its CA (istiod's 15012), the default here too.
pub const DEFAULT_CA_PORT: u16 = 15012;
/// How long the service's own serving certificate is valid; it is issued again at each start.
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Settings of `ztunnel ca serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory (or mounted Secret) with root-cert.pem and root-key.pem; read only, never
    /// created (use `ztunnel ca init`).
    #[arg(long, env = "ZTUNNEL_CA_DIR")]
    pub ca_dir: PathBuf,
    /// Address to serve gRPC over TLS on.
    #[arg(long, env = "ZTUNNEL_CA_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_CA_PORT)))]
    pub listen: SocketAddr,
    /// DNS names or IP addresses clients reach the service by, put in its serving
    /// certificate (repeat or comma-separate).
    #[arg(long, env = "ZTUNNEL_CA_SAN", value_delimiter = ',', required = true)]
    pub san: Vec<String>,
    /// Kubeconfig for the TokenReviews and pod look-ups. Unset: the in-cluster service account.
    #[arg(long, env = "ZTUNNEL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The only trust domain signed.
    #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Service accounts (`namespace/name`) of node agents, which may ask for the identities
    /// of pods on their own node (repeat or comma-separate).
    #[arg(
        long,
        env = "ZTUNNEL_CA_NODE_AGENT",
        value_delimiter = ',',
        default_value = "istio-system/ztunnel"
    )]
    pub node_agent: Vec<String>,
    /// Longest certificate lifetime granted; longer requests are shortened.
    #[arg(long, env = "ZTUNNEL_CA_MAX_CERT_TTL", default_value_t = DEFAULT_CERT_TTL)]
    pub max_cert_ttl: Dur,
    /// Log format: `text` or `json`.
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`.
    #[arg(long, env = "ZTUNNEL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Why the CA service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The root or the serving certificate.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A setting is unusable.
    #[error("invalid setting --{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The API server client could not be built.
    #[error("API server: {0}")]
    Kube(String),
    /// Serving failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The runtime or signal handlers could not be set up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the service until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<(), ServeError> {
    crate::telemetry::init_logging(&args.log_level, args.log_format == LogFormat::Json);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

fn parse_agents(list: &[String]) -> Result<Vec<(String, String)>, ServeError> {
    list.iter()
        .map(|a| {
            a.split_once('/')
                .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
                .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
                .ok_or_else(|| ServeError::Invalid {
                    flag: "node-agent",
                    message: format!("`{a}`: expected namespace/service-account"),
                })
        })
        .collect()
}

async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let node_agents = parse_agents(&args.node_agent)?;
    let ca = FileCa::load(&args.ca_dir)?;
    let (cert, key) = ca.issue_serving(&args.san, SERVING_CERT_TTL)?;
    let directory = KubeDirectory::connect(args.kubeconfig.as_deref())
        .await
        .map_err(ServeError::Kube)?;
    let service = Arc::new(CaService {
        ca,
        policy: Policy {
            trust_domain: args.trust_domain.clone(),
            node_agents,
        },
        directory,
        max_ttl: args.max_cert_ttl.0,
    });
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("CA service stopping");
    };
    tracing::info!(listen = %args.listen, sans = ?args.san, trust_domain = %args.trust_domain,
        node_agents = ?args.node_agent, "CA service ready");
    Server::builder()
        .tls_config(tls)?
        .add_service(CertificateServer::new(service))
        .serve_with_shutdown(args.listen, shutdown)
        .await?;
    Ok(())
}

/// The signer behind the gRPC method.
struct CaService {
    ca: FileCa,
    policy: Policy,
    directory: KubeDirectory,
    max_ttl: Duration,
}

impl Signer for CaService {
    fn create_certificate(
        self: Arc<Self>,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        Box::pin(async move {
            let peer = request.remote_addr();
            let token = bearer(&request);
            let body = request.into_inner();
            self.handle(peer, token, body)
                .await
                .map(tonic::Response::new)
                .map_err(|r| r.status())
        })
    }
}

/// The bearer token of the `authorization` metadata.
fn bearer(request: &tonic::Request<IstioCertificateRequest>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?
        .trim();
    (!token.is_empty()).then(|| token.to_string())
}

impl CaService {
    async fn handle(
        &self,
        peer: Option<SocketAddr>,
        token: Option<String>,
        body: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        let impersonated = body.impersonated_identity().map(str::to_string);
        let caller = match self.authenticate(token).await {
            Ok(c) => c,
            Err(refusal) => {
                tracing::warn!(peer, impersonated = impersonated.as_deref().unwrap_or(""),
                    decision = "deny", reason = %refusal, "certificate request");
                return Err(refusal);
            }
        };
        let caller_pod = caller
            .pod
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let csr_id = csr_identity(&body.csr).map_err(|e| {
            let refusal = Refusal::InvalidArgument(e.to_string());
            tracing::warn!(peer, caller = %caller, caller_pod, decision = "deny",
                reason = %refusal, "certificate request");
            refusal
        })?;
        let decision = authorize::authorize(
            &self.policy,
            &caller,
            &csr_id,
            impersonated.as_deref(),
            &self.directory,
        )
        .await;
        let requested = decision
            .requested
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let node = decision.node.clone().unwrap_or_default();
        let id = match decision.result {
            Ok(id) => id,
            Err(refusal) => {
                tracing::warn!(peer, caller = %caller, caller_pod, node, requested,
                    decision = "deny", reason = %refusal, "certificate request");
                return Err(refusal);
            }
        };
        let wanted = u64::try_from(body.validity_duration).unwrap_or(0);
        let ttl = match wanted {
            0 => self.max_ttl,
            s => Duration::from_secs(s).min(self.max_ttl),
        };
        let issued = self.ca.sign_for(&id, &body.csr, ttl).map_err(|e| {
            let refusal = Refusal::InvalidArgument(e.to_string());
            tracing::warn!(peer, caller = %caller, caller_pod, node, requested,
                decision = "deny", reason = %refusal, "certificate request");
            refusal
        })?;
        tracing::info!(peer, caller = %caller, caller_pod, node, requested,
            ttl = ?ttl, decision = "allow", "certificate request");
        Ok(IstioCertificateResponse {
            cert_chain: vec![issued.chain_pem, self.ca.root_pem().to_string()],
        })
    }

    async fn authenticate(&self, token: Option<String>) -> Result<Caller, Refusal> {
        let token = token.ok_or_else(|| {
            Refusal::Unauthenticated("no `authorization: Bearer <token>` metadata".into())
        })?;
        let review = self.directory.review(&token).await?;
        authorize::caller_of(&review)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_agents_parse_as_namespace_and_account() {
        let agents = parse_agents(&["istio-system/ztunnel".into()]).expect("valid");
        assert_eq!(agents, vec![("istio-system".into(), "ztunnel".into())]);
        for bad in ["ztunnel", "/ztunnel", "a/b/c", "ns/"] {
            assert!(parse_agents(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
