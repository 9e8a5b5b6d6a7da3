//! Certificate authorities behind one trait: the built-in file CA (root key on the machine: the
//! single-machine bench, the demo, and the signer inside `ztunnel ca serve`) and the remote CA
//! of [`super::RemoteCa`] (Istio's gRPC `CreateCertificate`). The trait has the shape of that
//! protocol: the identity, a CSR in PEM and a requested lifetime in, a PEM chain out.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// A certificate authority failure, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing the CA files failed.
    #[error("CA file {path}: {error}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A CA file exists but is not a usable certificate or key.
    #[error("CA file {path} is not a valid PEM {what}: {error}")]
    BadFile {
        /// File concerned.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// Parser error.
        error: String,
    },
    /// Signing failed (malformed CSR, or a CSR asking for something not allowed).
    #[error("signing refused: {0}")]
    Sign(String),
    /// The remote CA's address is not a usable URL.
    #[error("CA address {address:?}: {error}")]
    Address {
        /// The address as configured.
        address: String,
        /// What is wrong with it.
        error: String,
    },
    /// The token to present to the remote CA is unusable.
    #[error("CA token {path}: {error}")]
    Token {
        /// Token file.
        path: PathBuf,
        /// What is wrong with it.
        error: String,
    },
    /// The remote CA refused, failed or could not be reached.
    #[error("CA {address}: {code:?}: {message}")]
    Remote {
        /// The CA's address.
        address: String,
        /// gRPC status code (`Unavailable` when unreachable).
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
}

/// What a CA returns for a CSR: the leaf first, then intermediates, all PEM.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// PEM certificates, leaf first.
    pub chain_pem: String,
}

/// A source of workload certificates. Implementations sign CSRs; they never see private keys.
pub trait CertificateAuthority: Send + Sync + std::fmt::Debug {
    /// Signs a PEM CSR whose one SAN is `id`, valid for `ttl`. A remote CA is told `id` apart
    /// from the CSR: a node daemon asks on behalf of its workloads.
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedChain, CaError>> + Send + 'a>>;
    /// PEM root certificates peers must chain to.
    fn roots_pem(&self) -> String;
}

/// The built-in CA for local and development clusters: a root key and certificate in a
/// directory, created on first start. Every node of a cluster must share the directory (for
/// example from one Secret), or their certificates will not verify each other.
#[derive(Debug)]
pub struct FileCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";

impl FileCa {
    /// Loads the CA from `dir`, creating the root key (mode 0600) and a 10-year root
    /// certificate when they are absent. A lock file serialises concurrent first starts, so
    /// two daemons sharing the directory never end up with different roots.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<FileCa, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| CaError::Io { path, error }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(".lock");
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;

        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if !cert_path.exists() || !key_path.exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| CaError::Sign(e.to_string()))?;
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::OrganizationName, trust_domain);
            params
                .distinguished_name
                .push(DnType::CommonName, "ztunnel file CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params
                .self_signed(&key)
                .map_err(|e| CaError::Sign(e.to_string()))?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(dir = %dir.display(), "created file CA root");
        }
        // Read back under the lock: a root another daemon just wrote is complete.
        let ca = FileCa::load(dir);
        drop(lock);
        ca
    }

    /// Loads an existing CA from `dir` without writing anything there, so the directory may be
    /// a read-only Secret mount (`ztunnel ca serve`). Both files must exist.
    pub fn load(dir: &Path) -> Result<FileCa, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| CaError::Io { path, error }
        };
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let root_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadFile {
            path: key_path.clone(),
            what: "private key",
            error: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| CaError::BadFile {
            path: cert_path.clone(),
            what: "certificate",
            error: e.to_string(),
        })?;
        Ok(FileCa { issuer, root_pem })
    }

    /// Signs `csr_pem` only if its one SAN is exactly `id`: the CA service's last check, after
    /// it has decided that the caller may have `id`.
    pub fn sign_for(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let asked = csr_identity(csr_pem)?;
        if &asked != id {
            return Err(CaError::Sign(format!("the CSR asks for {asked}, not {id}")));
        }
        self.sign_now(csr_pem, ttl)
    }

    /// A TLS serving certificate and its PEM key for the CA service itself, issued from the
    /// root with `sans` (DNS names or IP addresses) and valid for `ttl`. The key lives only in
    /// memory of the process that asked.
    pub fn issue_serving(
        &self,
        sans: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let sign_err = |e: rcgen::Error| CaError::Sign(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(sign_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ztunnel CA service");
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn sign_now(&self, csr_pem: &str, ttl: Duration) -> Result<IssuedChain, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Sign(format!("malformed CSR: {e}")))?;
        let uris = csr
            .params
            .subject_alt_names
            .iter()
            .filter(|s| matches!(s, rcgen::SanType::URI(_)))
            .count();
        if uris != 1 || csr.params.subject_alt_names.len() != 1 {
            return Err(CaError::Sign(
                "CSR must carry exactly one SAN, the SPIFFE URI".into(),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + ttl;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        p.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(IssuedChain {
            chain_pem: cert.pem(),
        })
    }
}

impl FileCa {
    /// Issues a certificate for `id` and writes the chain and the key (mode 0600) to files:
    /// for peers outside the daemon, such as an Envoy sidecar that must join the mesh.
    pub fn issue_to_files(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), CaError> {
        let (key, csr) = new_key_and_csr(id)?;
        let chain = self.sign_now(&csr, ttl)?;
        write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(cert_path, chain.chain_pem.as_bytes(), 0o644)
    }
}

/// Issues a certificate for `id` from any CA and writes the chain and the key (mode 0600).
pub async fn issue_to_files(
    ca: &dyn CertificateAuthority,
    id: &SpiffeId,
    ttl: Duration,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CaError> {
    let (key, csr) = new_key_and_csr(id)?;
    let chain = ca.sign(id, &csr, ttl).await?;
    write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert_path, chain.chain_pem.as_bytes(), 0o644)
}

impl CertificateAuthority for FileCa {
    fn sign<'a>(
        &'a self,
        _id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<IssuedChain, CaError>> + Send + 'a>> {
        Box::pin(async move { self.sign_now(csr_pem, ttl) })
    }

    fn roots_pem(&self) -> String {
        self.root_pem.clone()
    }
}

/// A fresh ECDSA P-256 key and a PEM CSR for `id` (its only SAN). Keys are generated where
/// they are used and never sent anywhere; only the CSR goes to the CA.
pub(crate) fn new_key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), CaError> {
    let sign_err = |e: rcgen::Error| CaError::Sign(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.to_string().try_into().map_err(sign_err)?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(sign_err)?;
    Ok((key, csr))
}

/// The one SPIFFE URI SAN of a PEM CSR; anything else (no SAN, several, another kind) is
/// refused, so a CSR never names more than the identity it was checked for.
pub fn csr_identity(csr_pem: &str) -> Result<SpiffeId, CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::Sign(format!("malformed CSR: {e}")))?;
    match csr.params.subject_alt_names.as_slice() {
        [rcgen::SanType::URI(uri)] => {
            SpiffeId::parse(uri.as_str()).map_err(|e| CaError::Sign(e.to_string()))
        }
        _ => Err(CaError::Sign(
            "CSR must carry exactly one SAN, the SPIFFE URI".into(),
        )),
    }
}

/// 16 random bytes with the top bit clear (serials must be positive).
fn random_serial() -> [u8; 16] {
    let mut b = [0u8; 16];
    // ring's SystemRandom is already a dependency through rustls.
    let _ = ring_fill(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    b
}

fn ring_fill(b: &mut [u8]) -> Result<(), rustls::Error> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(b)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let io = |error| CaError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_once_with_private_key_mode_0600_and_reloads_same_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = FileCa::load_or_create(dir.path(), "cluster.local").expect("create");
        let mode = std::fs::metadata(dir.path().join(ROOT_KEY))
            .expect("key exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = FileCa::load_or_create(dir.path(), "cluster.local").expect("load");
        assert_eq!(a.roots_pem(), b.roots_pem());
    }

    #[test]
    fn refuses_csr_with_extra_sans() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = FileCa::load_or_create(dir.path(), "cluster.local").expect("create");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["example.com".to_string()]).expect("params");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().expect("ia5"),
        ));
        let csr = params.serialize_request(&key).expect("csr");
        let err = ca
            .sign_now(&csr.pem().expect("pem"), Duration::from_secs(60))
            .expect_err("two SANs refused");
        assert!(err.to_string().contains("exactly one SAN"), "{err}");
    }
}
