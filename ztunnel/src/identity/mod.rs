//! Workload identity: SPIFFE IDs, certificate authorities and the per-node certificate manager.

mod ca;
mod health;
pub mod istio_ca;
mod manager;
mod remote;

pub use ca::{csr_identity, issue_to_files, CaError, CertificateAuthority, FileCa, IssuedChain};
pub use health::CaHealth;
pub use manager::{CertError, CertManager, WorkloadCert};
pub use remote::RemoteCa;

use std::fmt;

use serde::Serialize;

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the only identity form the
/// mesh uses (Istio's convention).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Trust domain.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

/// A URI SAN that is not a mesh identity.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a SPIFFE identity of the form spiffe://<trust-domain>/ns/<ns>/sa/<sa>")]
pub struct BadSpiffeId(pub String);

impl SpiffeId {
    /// Builds an identity.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses a URI SAN.
    pub fn parse(uri: &str) -> Result<Self, BadSpiffeId> {
        let bad = || BadSpiffeId(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Reads the single SPIFFE URI SAN of a DER certificate. Mesh certificates carry exactly one;
/// anything else is refused so that identity is never ambiguous.
pub fn identity_of(cert_der: &[u8]) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or_else(|| "certificate has no subjectAltName".to_string())?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|e| e.to_string()),
        [] => Err("certificate has no URI SAN".into()),
        many => Err(format!(
            "certificate has {} URI SANs; exactly one is allowed",
            many.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_rejects_other_forms() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").expect("valid");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        for bad in [
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "https://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
