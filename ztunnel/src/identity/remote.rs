//! The daemon's client of a remote CA speaking Istio's certificate protocol (`ztunnel ca
//! serve`, istiod, cert-manager istio-csr): the node never holds the root key, it sends each
//! workload's CSR with its own service-account token and names the workload in the
//! `ImpersonatedIdentity` metadata. The CA decides whether this node may have it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::istio_ca::{self, IstioCertificateRequest};
use super::{CaError, CertificateAuthority, IssuedChain, SpiffeId};

/// How long dialling the CA (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one signing call may take, dial included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A CA reached over gRPC. The channel connects lazily and reconnects on its own, so a CA that
/// is down at start or restarts later costs failed calls (retried by the certificate manager
/// with backoff), never the daemon.
#[derive(Debug)]
pub struct RemoteCa {
    address: String,
    channel: Channel,
    token_path: PathBuf,
    roots_pem: String,
}

impl RemoteCa {
    /// A client of the CA at `address` (`https://host:port`) that trusts `root_cert` (PEM file)
    /// for both the CA's serving certificate and the mesh's workload certificates, and
    /// authenticates with the token in `token_path`, read again on every call because
    /// projected tokens are rotated on disk.
    pub fn new(address: &str, token_path: &Path, root_cert: &Path) -> Result<RemoteCa, CaError> {
        let roots_pem = std::fs::read_to_string(root_cert).map_err(|error| CaError::Io {
            path: root_cert.to_path_buf(),
            error,
        })?;
        let bad_root = |error: String| CaError::BadFile {
            path: root_cert.to_path_buf(),
            what: "certificate",
            error,
        };
        let count = rustls_pemfile::certs(&mut roots_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_root(e.to_string()))?
            .len();
        if count == 0 {
            return Err(bad_root("no certificate in the file".into()));
        }
        let bad_address = |error: String| CaError::Address {
            address: address.to_string(),
            error,
        };
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&roots_pem));
        let channel = Endpoint::from_shared(address.to_string())
            .map_err(|e| bad_address(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tls_config(tls)
            .map_err(|e| bad_address(e.to_string()))?
            .connect_lazy();
        Ok(RemoteCa {
            address: address.to_string(),
            channel,
            token_path: token_path.to_path_buf(),
            roots_pem,
        })
    }

    async fn call(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        // A few hundred bytes from a tmpfs: not worth a blocking-pool hop.
        let token = std::fs::read_to_string(&self.token_path).map_err(|error| CaError::Io {
            path: self.token_path.clone(),
            error,
        })?;
        let token = token.trim();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let mut request = tonic::Request::new(IstioCertificateRequest::new(
            csr_pem.to_string(),
            ttl_secs,
            Some(id.to_string()),
        ));
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CaError::Token {
                path: self.token_path.clone(),
                error: "the token is not a valid header value".into(),
            })?;
        request.metadata_mut().insert("authorization", bearer);
        let response = istio_ca::create_certificate(self.channel.clone(), request)
            .await
            .map_err(|status| {
                tracing::warn!(ca = %self.address, identity = %id, code = ?status.code(),
                    message = status.message(), "the CA refused or failed");
                CaError::Remote {
                    address: self.address.clone(),
                    code: status.code(),
                    message: status.message().to_string(),
                }
            })?;
        let mut chain = response.cert_chain;
        // The protocol puts the root last; peers are given the chain without it, as they
        // hold the root already.
        if chain.len() > 1 {
            chain.pop();
        }
        if chain.is_empty() {
            return Err(CaError::Remote {
                address: self.address.clone(),
                code: tonic::Code::Internal,
                message: "empty certificate chain".into(),
            });
        }
        tracing::info!(ca = %self.address, identity = %id, "certificate signed by the remote CA");
        let mut chain_pem = String::new();
        for pem in chain {
            chain_pem.push_str(pem.trim_end());
            chain_pem.push('\n');
        }
        Ok(IssuedChain { chain_pem })
    }
}

impl CertificateAuthority for RemoteCa {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedChain, CaError>> + Send + 'a>> {
        Box::pin(self.call(id, csr_pem, ttl))
    }

    fn roots_pem(&self) -> String {
        self.roots_pem.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::istio_ca::{CertificateServer, IstioCertificateResponse, Signer};
    use crate::identity::{CertManager, FileCa};
    use std::sync::Arc;
    use tonic::codegen::BoxFuture;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Identity, Server, ServerTlsConfig};

    /// A CA service stand-in over the real wire (gRPC, TLS): it accepts the token "good", signs
    /// the impersonated identity with a file CA and answers leaf + root, as the protocol says.
    struct Stub {
        ca: FileCa,
    }

    impl Signer for Stub {
        fn create_certificate(
            self: Arc<Self>,
            request: tonic::Request<IstioCertificateRequest>,
        ) -> BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status> {
            Box::pin(async move {
                let auth = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if auth != "Bearer good" {
                    return Err(tonic::Status::unauthenticated("bad token"));
                }
                let body = request.into_inner();
                let id = body
                    .impersonated_identity()
                    .and_then(|s| SpiffeId::parse(s).ok())
                    .ok_or_else(|| tonic::Status::invalid_argument("no ImpersonatedIdentity"))?;
                let ttl = Duration::from_secs(u64::try_from(body.validity_duration).unwrap_or(60));
                let leaf = self
                    .ca
                    .sign_for(&id, &body.csr, ttl)
                    .map_err(|e| tonic::Status::permission_denied(e.to_string()))?;
                Ok(tonic::Response::new(IstioCertificateResponse {
                    cert_chain: vec![leaf.chain_pem, self.ca.root_pem().to_string()],
                }))
            })
        }
    }

    #[tokio::test]
    async fn signs_over_grpc_and_tls_with_the_token_and_drops_the_root_from_the_chain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = FileCa::load_or_create(&dir.path().join("ca"), "cluster.local").expect("CA");
        let (cert, key) = ca
            .issue_serving(&["127.0.0.1".into()], Duration::from_secs(3600))
            .expect("serving certificate");
        let root = dir.path().join("root.pem");
        std::fs::write(&root, ca.root_pem()).expect("root file");
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = incoming.local_addr().expect("local addr");
        let server = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .expect("TLS")
            .add_service(CertificateServer::new(Arc::new(Stub { ca })))
            .serve_with_incoming(incoming);
        let server = tokio::spawn(server);

        let token = dir.path().join("token");
        std::fs::write(&token, "good\n").expect("token file");
        let remote = RemoteCa::new(&format!("https://{addr}"), &token, &root).expect("client");
        let manager =
            CertManager::new(Arc::new(remote), Duration::from_secs(3600)).expect("manager");
        let id = SpiffeId::new("cluster.local", "mesh", "client");
        manager.set_identities(&[id.clone()].into());
        let cert = manager
            .fetch(&id, Duration::from_secs(10))
            .await
            .expect("issued through the CA service");
        assert_eq!(cert.identity, id);
        assert_eq!(
            cert.certified.cert.len(),
            1,
            "the root is not sent to peers"
        );

        std::fs::write(&token, "forged").expect("token file");
        let remote = RemoteCa::new(&format!("https://{addr}"), &token, &root).expect("client");
        let (_key, csr) = super::super::ca::new_key_and_csr(&id).expect("csr");
        let err = remote
            .sign(&id, &csr, Duration::from_secs(60))
            .await
            .expect_err("a forged token is refused");
        assert!(
            matches!(
                &err,
                CaError::Remote {
                    code: tonic::Code::Unauthenticated,
                    ..
                }
            ),
            "{err}"
        );
        server.abort();
    }
}
