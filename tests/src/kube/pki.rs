//! The API server's certificates and keys (generated with rcgen) and kubeconfig files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Files in the pki dir.
#[derive(Debug)]
pub(super) struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    /// Service-account token signing key (PKCS#8) and its public key.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

/// Who a kubeconfig authenticates as.
pub(super) enum Credentials {
    /// The admin client certificate (group `system:masters`).
    Admin,
    /// A bearer token.
    Token(String),
}

/// The names the serving certificate carries besides the bind address: those a client inside
/// a cluster would use.
const SERVICE_NAMES: &[&str] = &[
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];
/// The `kubernetes` service's cluster IP (first address of `--service-cluster-ip-range`).
const SERVICE_IP: [u8; 4] = [10, 96, 0, 1];

impl Pki {
    fn paths(dir: &Path) -> Pki {
        Pki {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        }
    }

    /// The files of an earlier [`Pki::generate`] in `dir`.
    pub fn load(dir: &Path) -> Result<Pki> {
        let pki = Pki::paths(dir);
        if !pki.ca_cert.is_file() {
            anyhow::bail!("{} is missing", pki.ca_cert.display());
        }
        Ok(pki)
    }

    /// A new CA, serving certificate for `address`, admin client certificate and
    /// service-account key, written to `dir` (keys mode 0600).
    pub fn generate(dir: &Path, address: IpAddr) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki::paths(dir);
        let sign = |e: rcgen::Error| anyhow::anyhow!("generating test certificates: {e}");

        let ca_key = KeyPair::generate().map_err(sign)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "mesh-tests kube CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(sign)?;
        let issuer = Issuer::new(ca, ca_key);
        write(&pki.ca_cert, &ca_cert.pem(), 0o644)?;

        let key = KeyPair::generate().map_err(sign)?;
        let mut serving = CertificateParams::new(
            SERVICE_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .map_err(sign)?;
        serving.subject_alt_names.push(SanType::IpAddress(address));
        serving
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::from(SERVICE_IP)));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = serving.signed_by(&key, &issuer).map_err(sign)?;
        write(&pki.serving_cert, &cert.pem(), 0o644)?;
        write(&pki.serving_key, &key.serialize_pem(), 0o600)?;

        let key = KeyPair::generate().map_err(sign)?;
        let mut admin = CertificateParams::default();
        admin
            .distinguished_name
            .push(DnType::CommonName, "mesh-tests-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = admin.signed_by(&key, &issuer).map_err(sign)?;
        write(&pki.admin_cert, &cert.pem(), 0o644)?;
        write(&pki.admin_key, &key.serialize_pem(), 0o600)?;

        let sa = KeyPair::generate().map_err(sign)?;
        write(&pki.sa_key, &sa.serialize_pem(), 0o600)?;
        write(&pki.sa_pub, &sa.public_key_pem(), 0o644)?;
        Ok(pki)
    }

    /// Writes a kubeconfig for `server` with the CA (and client certificate) embedded.
    pub fn write_kubeconfig(&self, path: &Path, server: &str, who: &Credentials) -> Result<()> {
        let b64 = |p: &Path| -> Result<String> {
            let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(base64::engine::general_purpose::STANDARD.encode(data))
        };
        let (user, auth) = match who {
            Credentials::Admin => (
                "admin".to_string(),
                format!(
                    "    client-certificate-data: {}\n    client-key-data: {}\n",
                    b64(&self.admin_cert)?,
                    b64(&self.admin_key)?
                ),
            ),
            Credentials::Token(token) => ("token".to_string(), format!("    token: {token}\n")),
        };
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: mesh
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
{auth}contexts:
- name: mesh
  context:
    cluster: mesh
    user: {user}
current-context: mesh
",
            ca = b64(&self.ca_cert)?
        );
        write(path, &text, 0o600)
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
