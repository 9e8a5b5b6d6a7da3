//! Readiness (15021): `/healthz/ready` answers 200 once the daemon is ready, 503 before.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{read_only, Reply, Request};

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
pub fn route(readiness: &Readiness, req: &Request<'_>) -> Reply {
    match req.path {
        "/healthz/ready" => read_only(req, || match readiness.is_ready() {
            true => Reply::text(200, "ready\n"),
            false => Reply::text(503, "not ready\n"),
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
        let post = Request {
            method: &Method::POST,
            ..get("/healthz/ready")
        };
        let refused = route(&r, &post);
        assert_eq!((refused.status, refused.allow), (405, Some("GET, HEAD")));
    }
}
