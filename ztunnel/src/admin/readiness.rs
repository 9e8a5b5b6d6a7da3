//! Readiness (15021): `/healthz/ready` answers 200 once the daemon is ready, 503 before, and
//! 503 while it hands its sockets over to a new daemon that is not ready yet (the port is
//! shared with that daemon, whose pod must not be taken for ready on this one's answer).

use std::sync::atomic::{AtomicBool, Ordering};

use super::{read_only, Reply, Request};

/// Whether the daemon is ready: first state loaded, certificates issued, capture attached.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool, AtomicBool);

impl Readiness {
    /// Marks a hand-over to a new daemon as in progress (`true`) or over (`false`).
    pub fn set_handing_over(&self, on: bool) {
        self.1.store(on, Ordering::Release);
    }
    /// Whether a hand-over is in progress.
    pub fn is_handing_over(&self) -> bool {
        self.1.load(Ordering::Acquire)
    }
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
pub fn route(readiness: &Readiness, req: &Request<'_>) -> Reply {
    match req.path {
        "/healthz/ready" => read_only(req, || {
            match (readiness.is_ready(), readiness.is_handing_over()) {
                (true, false) => Reply::text(200, "ready\n"),
                (true, true) => Reply::text(503, "handing over to a new daemon\n"),
                (false, _) => Reply::text(503, "not ready\n"),
            }
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
