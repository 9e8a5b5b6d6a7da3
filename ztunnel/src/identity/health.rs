//! How certificate issuance is going: which identities the CA is failing for, since when,
//! how many attempts, and the next retry. The config dump shows it (so `ztunnel status` names a
//! CA problem while the certificates still in use have not expired yet) and
//! `ztunnel_certificate_issuance_failures_total` counts every failed attempt.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::SpiffeId;

/// Failing issuance per identity, and the failure counter.
#[derive(Debug, Default)]
pub struct CaHealth {
    failures: Counter,
    failing: Mutex<BTreeMap<SpiffeId, Failing>>,
}

#[derive(Debug, Clone)]
struct Failing {
    error: String,
    since: SystemTime,
    attempts: u64,
    retry_at: SystemTime,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl CaHealth {
    fn failing(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, Failing>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed attempt for `id`, retried after `retry_in`. Returns the number of
    /// attempts that have failed in a row.
    pub fn failed(&self, id: &SpiffeId, error: &str, retry_in: Duration) -> u64 {
        self.failures.inc();
        let now = SystemTime::now();
        let mut failing = self.failing();
        let f = failing.entry(id.clone()).or_insert(Failing {
            error: String::new(),
            since: now,
            attempts: 0,
            retry_at: now,
        });
        f.error = error.to_string();
        f.attempts += 1;
        f.retry_at = now + retry_in;
        f.attempts
    }

    /// Records that `id` was issued (or is no longer managed). Returns how many attempts had
    /// failed before and for how long, when it was failing.
    pub fn recovered(&self, id: &SpiffeId) -> Option<(u64, Duration)> {
        let f = self.failing().remove(id)?;
        Some((f.attempts, f.since.elapsed().unwrap_or_default()))
    }

    /// Whether issuance is failing for no identity.
    pub fn in_sync(&self) -> bool {
        self.failing().is_empty()
    }

    /// For the config dump: `{"in_sync", "failed_attempts_total", "failing": {identity:
    /// {"error", "failing_since", "attempts", "next_retry"}}}` (times in Unix seconds).
    pub fn snapshot(&self) -> serde_json::Value {
        let failing: serde_json::Map<String, serde_json::Value> = self
            .failing()
            .iter()
            .map(|(id, f)| {
                (
                    id.to_string(),
                    serde_json::json!({
                        "error": f.error,
                        "failing_since": unix(f.since),
                        "attempts": f.attempts,
                        "next_retry": unix(f.retry_at),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "in_sync": failing.is_empty(),
            "failed_attempts_total": self.failures.get(),
            "failing": failing,
        })
    }

    /// Registers `ztunnel_certificate_issuance_failures_total`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ztunnel_certificate_issuance_failures",
            "Certificate issuance or renewal attempts that failed (CA unreachable, refusing, or \
             an unusable answer); each is retried with backoff",
            self.failures.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_identity_until_recovered() {
        let h = CaHealth::default();
        let a = SpiffeId::new("cluster.local", "ns", "a");
        assert!(h.in_sync());
        assert_eq!(h.failed(&a, "unreachable", Duration::from_secs(1)), 1);
        assert_eq!(h.failed(&a, "refused", Duration::from_secs(2)), 2);
        let snap = h.snapshot();
        assert_eq!(snap["in_sync"], false);
        assert_eq!(snap["failed_attempts_total"], 2);
        let f = &snap["failing"][a.to_string()];
        assert_eq!(
            (f["attempts"].as_u64(), f["error"].as_str()),
            (Some(2), Some("refused"))
        );
        assert_eq!(h.recovered(&a).map(|r| r.0), Some(2));
        assert!(h.in_sync() && h.recovered(&a).is_none());
        assert_eq!(
            h.snapshot()["failed_attempts_total"],
            2,
            "the counter stays"
        );
    }
}
