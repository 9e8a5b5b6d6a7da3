//! Readiness (15021): `/healthz/ready` answers 200 once the daemon is ready, 503 before.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Reply;

/// Whether the daemon is ready: first state loaded, certificates issued, capture attached.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    /// Marks the daemon ready.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The readiness port's one route.
pub fn route(readiness: &Readiness, path: &str) -> Reply {
    match path {
        "/healthz/ready" if readiness.is_ready() => Reply::text(200, "ready\n"),
        "/healthz/ready" => Reply::text(503, "not ready\n"),
        _ => Reply::text(404, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_set() {
        let r = Readiness::default();
        assert_eq!(route(&r, "/healthz/ready").status, 503);
        r.set_ready();
        assert_eq!(route(&r, "/healthz/ready").status, 200);
        assert_eq!(route(&r, "/other").status, 404);
    }
}
