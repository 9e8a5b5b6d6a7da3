//! Readiness (15021): `/healthz/ready` answers 200 once the daemon is ready, 503 before, and
//! 503 again while something that readiness promised is missing (an enrolled pod whose
//! capture is not in place), with the reason in the body,
//! and 503 while it hands its sockets over to a new daemon that is not ready yet (the port is
//! shared with that daemon, whose pod must not be taken for ready on this one's answer).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{read_only, Reply, Request};

/// Whether the daemon is ready: first state loaded, certificates issued, capture attached
/// (start-up, [`Readiness::set_ready`]) and nothing missing now ([`Readiness::set_blockers`]).
#[derive(Debug, Default)]
pub struct Readiness {
    started: AtomicBool,
    /// A hand-over to a new daemon is in progress.
    handing_over: AtomicBool,
    /// Why the daemon is not ready although start-up finished (one line each).
    blockers: Mutex<Vec<String>>,
}

impl Readiness {
    /// Marks a hand-over to a new daemon as in progress (`true`) or over (`false`).
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::Release);
    }
    /// Whether a hand-over is in progress.
    pub fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }
    /// Marks start-up complete.
    pub fn set_ready(&self) {
        self.started.store(true, Ordering::Release);
    }
    /// Replaces what keeps the daemon from being ready (empty: nothing).
    pub fn set_blockers(&self, blockers: Vec<String>) {
        *self.blockers.lock().unwrap_or_else(|p| p.into_inner()) = blockers;
    }
    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }
    /// Why not ready, or `None` when ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.started.load(Ordering::Acquire) {
            return Some("starting".to_string());
        }
        let blockers = self.blockers.lock().unwrap_or_else(|p| p.into_inner());
        (!blockers.is_empty()).then(|| blockers.join("; "))
    }
}

/// The readiness port's one route.
pub fn route(readiness: &Readiness, req: &Request<'_>) -> Reply {
    match req.path {
        "/healthz/ready" => read_only(req, || match readiness.not_ready_reason() {
            None if readiness.is_handing_over() => {
                Reply::text(503, "handing over to a new daemon\n")
            }
            None => Reply::text(200, "ready\n"),
            Some(reason) => Reply::text(503, format!("not ready: {reason}\n")),
        }),
        _ => Reply::not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hyper::Method;

    fn get(path: &str) -> Request<'_> {
        Request {
            method: &Method::GET,
            path,
            query: "",
        }
    }

    #[test]
    fn ready_only_once_set() {
        let r = Readiness::default();
        assert_eq!(route(&r, &get("/healthz/ready")).status, 503);
        r.set_ready();
        assert_eq!(route(&r, &get("/healthz/ready")).status, 200);
        r.set_blockers(vec!["capture of pod ns/a not in place".into()]);
        let reply = route(&r, &get("/healthz/ready"));
        assert_eq!(reply.status, 503);
        assert!(reply.body.contains("ns/a"), "{}", reply.body);
        r.set_blockers(Vec::new());
        assert_eq!(route(&r, &get("/healthz/ready")).status, 200);
        assert_eq!(route(&r, &get("/other")).status, 404);
        r.set_handing_over(true);
        assert_eq!(route(&r, &get("/healthz/ready")).status, 503);
        r.set_handing_over(false);
        assert_eq!(route(&r, &get("/healthz/ready")).status, 200);
        let post = Request {
            method: &Method::POST,
            ..get("/healthz/ready")
        };
        let refused = route(&r, &post);
        assert_eq!((refused.status, refused.allow), (405, Some("GET, HEAD")));
    }
}
