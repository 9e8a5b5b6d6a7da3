//! Keeps one certificate per local workload identity: issued when the first pod with that
//! identity appears on this node, renewed at half its lifetime, kept while renewal fails (with
//! backoff), dropped when the last such pod leaves. A daemon asks only for identities of pods
//! on its own node.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use serde::Serialize;
use tokio::sync::watch;

use super::{identity_of, CaHealth, CertificateAuthority, SpiffeId};

/// First retry after a failed issuance; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two attempts while the CA keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A workload certificate with its key, ready for rustls. The private key never leaves this
/// struct except inside the signing key rustls holds.
#[derive(Debug, Serialize)]
pub struct WorkloadCert {
    /// The identity in the certificate's URI SAN.
    pub identity: SpiffeId,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    #[serde(with = "unix_secs")]
    pub not_before: SystemTime,
    /// End of validity.
    #[serde(with = "unix_secs")]
    pub not_after: SystemTime,
    /// Chain and signing key for rustls.
    #[serde(skip)]
    pub certified: Arc<CertifiedKey>,
}

/// Why a certificate is not available.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The identity is not one of this node's workloads.
    #[error("no workload with identity {0} runs on this node")]
    NotLocal(SpiffeId),
    /// Issuance has not succeeded within the wait.
    #[error("certificate for {0} not issued yet (CA unreachable or refusing?)")]
    NotReady(SpiffeId),
    /// The CA's answer was unusable.
    #[error("CA returned an unusable certificate for {id}: {reason}")]
    BadIssue {
        /// Identity asked for.
        id: SpiffeId,
        /// What was wrong.
        reason: String,
    },
    /// The CA refused or failed.
    #[error(transparent)]
    Ca(#[from] super::CaError),
}

struct Entry {
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Issues and renews the certificates of this node's workloads.
pub struct CertManager {
    ca: Arc<dyn CertificateAuthority>,
    ttl: Duration,
    roots: Arc<RootCertStore>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    health: CaHealth,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").field("ca", &self.ca).finish()
    }
}

impl CertManager {
    /// A manager issuing from `ca` with lifetime `ttl`.
    pub fn new(ca: Arc<dyn CertificateAuthority>, ttl: Duration) -> Result<Arc<Self>, CertError> {
        let mut roots = RootCertStore::empty();
        let pem = ca.roots_pem();
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            let cert = cert.map_err(|e| CertError::BadIssue {
                id: SpiffeId::new("", "", ""),
                reason: format!("root certificate: {e}"),
            })?;
            roots.add(cert).map_err(|e| CertError::BadIssue {
                id: SpiffeId::new("", "", ""),
                reason: format!("root certificate: {e}"),
            })?;
        }
        Ok(Arc::new(CertManager {
            ca,
            ttl,
            roots: Arc::new(roots),
            entries: Mutex::new(HashMap::new()),
            health: CaHealth::default(),
        }))
    }

    /// How issuance is going (config dump, metrics).
    pub fn health(&self) -> &CaHealth {
        &self.health
    }

    /// Trust anchors peers must chain to.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Makes the managed set exactly `ids`: starts issuing for new identities and stops
    /// renewing (and forgets) those no longer on this node.
    pub fn set_identities(self: &Arc<Self>, ids: &BTreeSet<SpiffeId>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|id, e| {
            let keep = ids.contains(id);
            if !keep {
                e.task.abort();
                self.health.recovered(id);
                tracing::info!(identity = %id, "no local workload left; certificate dropped");
            }
            keep
        });
        for id in ids {
            if entries.contains_key(id) {
                continue;
            }
            let (tx, rx) = watch::channel(None);
            let task = tokio::spawn(self.clone().keep_fresh(id.clone(), tx));
            entries.insert(id.clone(), Entry { rx, task });
        }
    }

    /// Whether `id` is one of the identities managed now (its certificate issued or being
    /// issued), i.e. [`CertManager::fetch`] will not answer `NotLocal`.
    pub fn manages(&self, id: &SpiffeId) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.contains_key(id)
    }

    /// The current certificate, if issued.
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(id).and_then(|e| e.rx.borrow().clone())
    }

    /// The certificate, waiting up to `wait` for a first issuance in progress.
    pub async fn fetch(
        &self,
        id: &SpiffeId,
        wait: Duration,
    ) -> Result<Arc<WorkloadCert>, CertError> {
        let mut rx = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(id) {
                Some(e) => e.rx.clone(),
                None => return Err(CertError::NotLocal(id.clone())),
            }
        };
        let got = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match got {
            Ok(Ok(c)) => c.clone().ok_or_else(|| CertError::NotReady(id.clone())),
            _ => Err(CertError::NotReady(id.clone())),
        }
    }

    /// Every managed identity with its certificate, if issued.
    pub fn snapshot(&self) -> Vec<(SpiffeId, Option<Arc<WorkloadCert>>)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = entries
            .iter()
            .map(|(id, e)| (id.clone(), e.rx.borrow().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    async fn keep_fresh(
        self: Arc<Self>,
        id: SpiffeId,
        tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.issue(&id).await {
                Ok(cert) => {
                    let lifetime = cert
                        .not_after
                        .duration_since(cert.not_before)
                        .unwrap_or(self.ttl);
                    let renew_at = cert.not_before + lifetime / 2;
                    tracing::info!(identity = %id, serial = %cert.serial, "workload certificate issued");
                    if let Some((attempts, after)) = self.health.recovered(&id) {
                        tracing::info!(identity = %id, failed_attempts = attempts,
                            after_secs = after.as_secs_f64(), "certificate issuance recovered");
                    }
                    tx.send_replace(Some(Arc::new(cert)));
                    backoff = FIRST_BACKOFF;
                    // CAs backdate certificates (ours by a minute), so with a lifetime near
                    // the backdating the half-life is already past: without a floor, renewal
                    // would spin against the CA.
                    let wait = renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                        .max(self.ttl / 16);
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    let still_valid = tx
                        .borrow()
                        .as_ref()
                        .is_some_and(|c| c.not_after > SystemTime::now());
                    let attempts = self.health.failed(&id, &e.to_string(), backoff);
                    tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, attempts,
                        still_valid, "certificate issuance failed; keeping the current certificate");
                    if !still_valid {
                        tx.send_replace(None);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCert, CertError> {
        let bad = |reason: String| CertError::BadIssue {
            id: id.clone(),
            reason,
        };
        let (key, csr) = super::ca::new_key_and_csr(id)?;
        let issued = self.ca.sign(id, &csr, self.ttl).await?;
        let chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("chain is not PEM: {e}")))?;
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let got = identity_of(leaf).map_err(bad)?;
        if &got != id {
            return Err(bad(format!("leaf carries {got}")));
        }
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
        let validity = parsed.validity();
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0).unsigned_abs())
        };
        let serial = parsed
            .tbs_certificate
            .raw_serial_as_string()
            .replace(':', "");
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| bad(e.to_string()))?;
        Ok(WorkloadCert {
            identity: id.clone(),
            serial,
            not_before: to_system(validity.not_before),
            not_after: to_system(validity.not_after),
            certified: Arc::new(CertifiedKey::new(chain, signing)),
        })
    }
}

mod unix_secs {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        s.serialize_u64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CaError, FileCa, IssuedChain};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// The real file CA behind a switch that makes it refuse, standing in for a remote CA
    /// (istiod) that becomes unreachable; there is no such CA on this machine to unplug.
    #[derive(Debug)]
    struct Switchable {
        inner: FileCa,
        down: AtomicBool,
        calls: AtomicUsize,
    }

    impl CertificateAuthority for Switchable {
        fn sign<'a>(
            &'a self,
            id: &'a SpiffeId,
            csr_pem: &'a str,
            ttl: Duration,
        ) -> Pin<Box<dyn Future<Output = Result<IssuedChain, CaError>> + Send + 'a>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(async { Err(CaError::Sign("CA unreachable".into())) });
            }
            self.inner.sign(id, csr_pem, ttl)
        }
        fn roots_pem(&self) -> String {
            self.inner.roots_pem()
        }
    }

    #[tokio::test]
    async fn renews_at_half_life_and_keeps_a_valid_certificate_while_the_ca_is_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(Switchable {
            inner: FileCa::load_or_create(dir.path(), "cluster.local").expect("ca"),
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        // Certificates are backdated one minute by the CA, so a 64 s lifetime reaches its
        // half-life (renewal) about two seconds after issuance.
        let m = CertManager::new(ca.clone(), Duration::from_secs(64)).expect("manager");
        let id = SpiffeId::new("cluster.local", "a", "b");
        m.set_identities(&[id.clone()].into());
        let first = m.fetch(&id, Duration::from_secs(5)).await.expect("issued");

        ca.down.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ca.calls.load(Ordering::SeqCst) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "renewal never attempted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Two failed renewals in: the old, still valid certificate is still served.
        let kept = m
            .get(&id)
            .expect("still valid certificate kept while renewal fails");
        assert_eq!(kept.serial, first.serial);
        let health = m.health().snapshot();
        assert_eq!(health["in_sync"], false, "{health}");
        let failing = &health["failing"][id.to_string()];
        assert!(failing["attempts"].as_u64() >= Some(2), "{health}");
        assert!(
            failing["error"]
                .as_str()
                .is_some_and(|e| e.contains("CA unreachable")),
            "{health}"
        );

        ca.down.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = m.get(&id).expect("certificate");
            if now.serial != first.serial {
                assert_eq!(now.identity, id);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no renewal after the CA recovered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(m.health().in_sync(), "{}", m.health().snapshot());

        m.set_identities(&BTreeSet::new());
        assert!(
            m.get(&id).is_none(),
            "identity without local pods is dropped"
        );
    }

    #[tokio::test]
    async fn a_lifetime_within_the_backdating_does_not_make_renewal_spin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(Switchable {
            inner: FileCa::load_or_create(dir.path(), "cluster.local").expect("ca"),
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        // Backdated a minute, a 60 s certificate is past its half-life when it arrives.
        let m = CertManager::new(ca.clone(), Duration::from_secs(60)).expect("manager");
        let id = SpiffeId::new("cluster.local", "a", "b");
        m.set_identities(&[id.clone()].into());
        m.fetch(&id, Duration::from_secs(5)).await.expect("issued");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let calls = ca.calls.load(Ordering::SeqCst);
        assert!(calls <= 2, "{calls} issuances in a second");
        m.set_identities(&BTreeSet::new());
    }
}
