//! Istio's certificate protocol on the wire: the `istio.v1.auth.IstioCertificateService`
//! messages (ztunnel/proto/ca.proto) and the gRPC plumbing of its one method for both sides,
//! the daemon's [`super::RemoteCa`] and `ztunnel ca serve`.
//!
//! The messages are written with prost's derive rather than generated at build time, so that
//! building needs no `protoc`; the service glue is the few lines tonic's generator would write.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{Body, BoxFuture, Service, StdError};

/// Fully qualified gRPC service name.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
/// HTTP/2 path of `CreateCertificate`.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Request metadata key naming the identity a node daemon asks for on a workload's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM CSR; its one URI SAN is the identity asked for.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Wanted lifetime, seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Request attributes (`ImpersonatedIdentity`).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, the issued one first, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// The `ImpersonatedIdentity` metadata string, if present.
    pub fn impersonated_identity(&self) -> Option<&str> {
        let field = self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
        match field.kind.as_ref()? {
            prost_types::value::Kind::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// A request for `csr`, on behalf of `impersonated` when set.
    pub fn new(csr: String, ttl_secs: i64, impersonated: Option<String>) -> Self {
        let metadata = impersonated.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id)),
                },
            )]
            .into(),
        });
        IstioCertificateRequest {
            csr,
            validity_duration: ttl_secs,
            metadata,
        }
    }
}

/// Calls `CreateCertificate` on `channel`.
pub async fn create_certificate(
    channel: tonic::transport::Channel,
    request: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("CA unreachable: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
    let codec = tonic_prost::ProstCodec::default();
    Ok(grpc.unary(request, path, codec).await?.into_inner())
}

/// What serves `CreateCertificate` (the CA service's signer).
pub trait Signer: Send + Sync + 'static {
    /// Answers one request; the metadata carries the caller's bearer token. Takes an `Arc` so
    /// the answer can outlive the call that started it.
    fn create_certificate(
        self: Arc<Self>,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status>;
}

/// The gRPC service around a [`Signer`], for `tonic::transport::Server::add_service`.
pub struct CertificateServer<S> {
    signer: Arc<S>,
}

impl<S> CertificateServer<S> {
    /// Serves `signer`.
    pub fn new(signer: Arc<S>) -> Self {
        CertificateServer { signer }
    }
}

impl<S> Clone for CertificateServer<S> {
    fn clone(&self) -> Self {
        CertificateServer {
            signer: self.signer.clone(),
        }
    }
}

impl<S> tonic::server::NamedService for CertificateServer<S> {
    const NAME: &'static str = SERVICE;
}

/// One call of the method, as tonic's unary handler wants it.
struct Unary<S>(Arc<S>);

impl<S: Signer> tonic::server::UnaryService<IstioCertificateRequest> for Unary<S> {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status>;
    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        self.0.clone().create_certificate(request)
    }
}

impl<S, B> Service<http::Request<B>> for CertificateServer<S>
where
    S: Signer,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let signer = self.signer.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(Unary(signer), req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn request_round_trips_with_impersonation_metadata() {
        let req = IstioCertificateRequest::new(
            "csr".into(),
            3600,
            Some("spiffe://cluster.local/ns/a/sa/b".into()),
        );
        let bytes = req.encode_to_vec();
        // Field 1 (csr) is a length-delimited string: tag byte 0x0a.
        assert_eq!(bytes[0], 0x0a);
        let back = IstioCertificateRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, req);
        assert_eq!(
            back.impersonated_identity(),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );
        let plain = IstioCertificateRequest::new("csr".into(), 60, None);
        assert_eq!(plain.impersonated_identity(), None);
    }
}
