//! rustls configurations for HBONE: TLS 1.3 only, mutual, ALPN `h2`, no session resumption.
//!
//! Names in certificates are SPIFFE URIs, which webpki's host-name checks do not cover, so
//! both verifiers check the chain with webpki and then the URI SAN themselves:
//! - the client accepts a server only if its identity is in the expected set (the destination
//!   workload's, or its waypoint's);
//! - the server accepts any client chaining to its roots whose identity is in its trust domain;
//!   authorization decides the rest.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::identity::{identity_of, SpiffeId};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    ring::default_provider().signature_verification_algorithms
}

/// TLS client config presenting `cert` and accepting only a server whose identity is one of
/// `expected`.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, Error> {
    let verifier = Arc::new(SpiffeServerVerifier { roots, expected });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedCert(cert)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    Ok(cfg)
}

/// TLS server config presenting `cert` and requiring a client certificate from `trust_domain`.
pub fn server_config(
    cert: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<ServerConfig, Error> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(cert)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The identity in a peer's leaf certificate (already verified by the handshake).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| identity_of(leaf).ok())
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let id = identity_of(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                IdentityError(e),
            ))))
        })?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            let want: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
            Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityError(format!(
                    "server identity {id} is not the expected {}",
                    want.join(" or ")
                )))),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let other = |msg: String| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                IdentityError(msg),
            ))))
        };
        let id = identity_of(end_entity).map_err(other)?;
        if id.trust_domain != self.trust_domain {
            return Err(other(format!(
                "client identity {id} is outside trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An identity check failure carried inside a rustls error.
#[derive(Debug)]
struct IdentityError(String);

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityError {}

#[cfg(test)]
mod tests {
    //! Real TLS handshakes over an in-memory pipe (no sockets), with certificates from the
    //! real file CA.
    use super::*;
    use crate::identity::{CertManager, FileCa};
    use std::time::Duration;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    async fn manager(dir: &std::path::Path, td: &str, ids: &[&SpiffeId]) -> Arc<CertManager> {
        let ca = FileCa::load_or_create(dir, td).expect("ca");
        let m = CertManager::new(Arc::new(ca), Duration::from_secs(3600)).expect("manager");
        m.set_identities(&ids.iter().map(|i| (*i).clone()).collect());
        m
    }

    async fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> (
        Result<Option<SpiffeId>, String>,
        Result<Option<SpiffeId>, String>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = TlsConnector::from(Arc::new(client));
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
        let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
        (
            c.map(|t| peer_identity(t.get_ref().1.peer_certificates()))
                .map_err(|e| e.to_string()),
            s.map(|t| peer_identity(t.get_ref().1.peer_certificates()))
                .map_err(|e| e.to_string()),
        )
    }

    #[tokio::test]
    async fn identities_are_checked_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client_id = SpiffeId::new("cluster.local", "a", "client");
        let server_id = SpiffeId::new("cluster.local", "b", "server");
        let other_id = SpiffeId::new("cluster.local", "b", "other");
        let m = manager(dir.path(), "cluster.local", &[&client_id, &server_id]).await;
        let wait = Duration::from_secs(5);
        let cc = m
            .fetch(&client_id, wait)
            .await
            .expect("client cert")
            .certified
            .clone();
        let sc = m
            .fetch(&server_id, wait)
            .await
            .expect("server cert")
            .certified
            .clone();

        // Expected identity: both sides see each other.
        let client = client_config(cc.clone(), m.roots(), vec![server_id.clone()]).expect("cfg");
        let server = server_config(sc.clone(), m.roots(), "cluster.local").expect("cfg");
        let (c, s) = handshake(client, server).await;
        assert_eq!(c.expect("client ok"), Some(server_id.clone()));
        assert_eq!(s.expect("server ok"), Some(client_id.clone()));

        // Client expects X, server presents Y: refused by the client.
        let client = client_config(cc.clone(), m.roots(), vec![other_id]).expect("cfg");
        let server = server_config(sc.clone(), m.roots(), "cluster.local").expect("cfg");
        let (c, _) = handshake(client, server).await;
        let err = c.expect_err("wrong server identity refused");
        assert!(err.contains("is not the expected"), "{err}");

        // Server in another trust domain refuses the client.
        let server = server_config(sc.clone(), m.roots(), "other.local").expect("cfg");
        let client = client_config(cc, m.roots(), vec![server_id.clone()]).expect("cfg");
        let (_, s) = handshake(client, server).await;
        let err = s.expect_err("foreign trust domain refused");
        assert!(err.contains("outside trust domain"), "{err}");
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused() {
        let dir_a = tempfile::tempdir().expect("tempdir");
        let dir_b = tempfile::tempdir().expect("tempdir");
        let id = SpiffeId::new("cluster.local", "a", "x");
        let a = manager(dir_a.path(), "cluster.local", &[&id]).await;
        let b = manager(dir_b.path(), "cluster.local", &[&id]).await;
        let wait = Duration::from_secs(5);
        let ca = a.fetch(&id, wait).await.expect("cert a").certified.clone();
        let cb = b.fetch(&id, wait).await.expect("cert b").certified.clone();
        let client = client_config(ca, a.roots(), vec![id.clone()]).expect("cfg");
        let server = server_config(cb, b.roots(), "cluster.local").expect("cfg");
        let (c, _) = handshake(client, server).await;
        assert!(c.is_err(), "chain to an unknown root must fail");
    }
}
