//! What an accept loop does when `accept` fails, shared by every listener of the data plane.
//!
//! The failure that matters is running out of descriptors (`EMFILE`: the process's
//! `RLIMIT_NOFILE`; `ENFILE`: the system's). The kernel has already completed the client's
//! handshake, so the connection waits in the listen backlog: retrying at once spins on the
//! same error (the listener stays readable), and only sleeping leaves the client connected to
//! nobody until it gives up. Instead a descriptor is held in reserve from the start; on
//! `EMFILE` it is let go, the waiting connection is accepted into it and reset (the client
//! learns at once), and the reserve is taken again. Flows already open keep their descriptors
//! and go on; once descriptors are free again, accepts succeed as before.
//!
//! Every failure is counted (`ztunnel_accept_errors_total{listener, reason}`) and logged at
//! most once a second per listener and reason, with the number of failures since.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::socket::reset_on_close;

/// Pause after a failure that retrying at once would only repeat (no reserve to shed with, no
/// memory, an unknown error).
const BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per listener and reason in this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Why an accept failed, as the metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `EMFILE` / `ENFILE`: no descriptor for the connection.
    FdLimit,
    /// `ENOBUFS` / `ENOMEM`: the kernel could not allocate for it.
    NoMemory,
    /// The connection failed before it was accepted (`ECONNABORTED`, a pending network
    /// error); the next one is unaffected.
    Aborted,
    /// Anything else.
    Other,
}

impl Reason {
    /// Classifies an error of `accept`.
    pub fn of(e: &io::Error) -> Reason {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Reason::FdLimit,
            Some(libc::ENOBUFS | libc::ENOMEM) => Reason::NoMemory,
            // accept(2): "Linux accept() passes already-pending network errors on the new
            // socket as an error code from accept()"; retry as for EAGAIN.
            Some(
                libc::ECONNABORTED
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH,
            ) => Reason::Aborted,
            _ => Reason::Other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FdLimit => "fd_limit",
            Reason::NoMemory => "no_memory",
            Reason::Aborted => "aborted",
            Reason::Other => "other",
        }
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(e, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    listener: &'static str,
    reason: Reason,
}

/// What a failed accept led to, for the caller's information (and the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A waiting connection was taken off the backlog and reset.
    Shed,
    /// Nothing was waiting, or nothing could be done; the loop paused before accepting again
    /// (not after `Aborted`).
    Retried,
}

/// Accept-failure handling of a process's listeners: the reserve descriptor, the counter and
/// the log rate limit. One per process (`Arc`), shared by its accept loops.
#[derive(Debug)]
pub struct AcceptErrors {
    reserve: Mutex<Option<File>>,
    errors: Family<Labels, Counter>,
    /// Per listener and reason: when the last line was logged, failures since.
    logged: Mutex<HashMap<Labels, (Option<Instant>, u64)>>,
}

impl AcceptErrors {
    /// Takes the reserve descriptor (`/dev/null`); without one (already out of descriptors),
    /// a failed accept pauses instead of shedding until one can be taken.
    pub fn new() -> Arc<AcceptErrors> {
        Arc::new(AcceptErrors {
            reserve: Mutex::new(open_reserve()),
            errors: Family::default(),
            logged: Mutex::new(HashMap::new()),
        })
    }

    /// Adds `ztunnel_accept_errors_total{listener, reason}` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztunnel_accept_errors",
            "Failed accepts on the daemon's listeners, by listener and reason (fd_limit: out of \
             file descriptors, the waiting connection was reset)",
            self.errors.clone(),
        );
    }

    /// Failures counted for `listener` and `reason` so far.
    pub fn count(&self, listener: &'static str, reason: Reason) -> u64 {
        self.errors
            .get_or_create(&Labels { listener, reason })
            .get()
    }

    /// Handles `error` from `listener.accept()` on the listener named `name`; returns when the
    /// loop should accept again.
    pub async fn handle(
        &self,
        listener: &TcpListener,
        name: &'static str,
        error: io::Error,
    ) -> Outcome {
        let reason = Reason::of(&error);
        let labels = Labels {
            listener: name,
            reason,
        };
        self.errors.get_or_create(&labels).inc();
        let outcome = match reason {
            Reason::Aborted => Outcome::Retried,
            Reason::FdLimit if self.shed(listener) => Outcome::Shed,
            _ => {
                tokio::time::sleep(BACKOFF).await;
                Outcome::Retried
            }
        };
        if let Some(since) = self.due(labels) {
            match reason {
                Reason::FdLimit => tracing::warn!(
                    listener = name,
                    reason = reason.as_str(),
                    %error,
                    failures = since,
                    "connection refused: out of file descriptors (raise the daemon's open-file \
                     limit, RLIMIT_NOFILE); open connections go on"
                ),
                Reason::Aborted => {
                    tracing::debug!(listener = name, %error, failures = since, "accept failed")
                }
                _ => tracing::warn!(
                    listener = name,
                    reason = reason.as_str(),
                    %error,
                    failures = since,
                    "accept failed"
                ),
            }
        }
        outcome
    }

    /// Lets the reserve descriptor go, accepts one waiting connection into it and resets it,
    /// then takes the reserve again. False when there was no reserve or nothing waiting.
    fn shed(&self, listener: &TcpListener) -> bool {
        let mut reserve = lock(&self.reserve);
        if reserve.take().is_none() {
            *reserve = open_reserve();
            return false;
        }
        // The listener is still readable (the failed accept did not clear that), so a waiting
        // connection is accepted in this one poll; `None` means nothing is waiting.
        let shed = match listener.accept().now_or_never() {
            Some(Ok((tcp, _peer))) => {
                reset_on_close(&tcp);
                true
            }
            Some(Err(_)) | None => false,
        };
        *reserve = open_reserve();
        shed
    }

    /// The failures to report if a line for `labels` is due now (and resets the count).
    fn due(&self, labels: Labels) -> Option<u64> {
        let now = Instant::now();
        let mut logged = lock(&self.logged);
        let entry = logged.entry(labels).or_insert((None, 0));
        entry.1 += 1;
        if entry
            .0
            .is_some_and(|last| now.duration_since(last) < LOG_EVERY)
        {
            return None;
        }
        let since = entry.1;
        *entry = (Some(now), 0);
        Some(since)
    }
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere while holding the lock leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn errors_are_classified() {
        let of = |n| Reason::of(&io::Error::from_raw_os_error(n));
        assert_eq!(of(libc::EMFILE), Reason::FdLimit);
        assert_eq!(of(libc::ENFILE), Reason::FdLimit);
        assert_eq!(of(libc::ENOBUFS), Reason::NoMemory);
        assert_eq!(of(libc::ECONNABORTED), Reason::Aborted);
        assert_eq!(of(libc::EINVAL), Reason::Other);
    }

    /// Out of descriptors with a client waiting: the client is reset at once, the failure is
    /// counted, and the listener accepts normally afterwards.
    #[tokio::test]
    async fn a_waiting_connection_is_reset_and_the_listener_goes_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let errors = AcceptErrors::new();
        let mut waiting = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Let the handshake complete into the backlog.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let outcome = errors.handle(&listener, "test", emfile()).await;
        assert_eq!(outcome, Outcome::Shed);
        let read = tokio::time::timeout(Duration::from_secs(1), waiting.read(&mut [0u8; 1]))
            .await
            .expect("the client learns at once");
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "reset, got {read:?}"
        );
        assert_eq!(errors.count("test", Reason::FdLimit), 1);

        // Nothing waiting: no shedding, a short pause, and the reserve is still there.
        assert_eq!(
            errors.handle(&listener, "test", emfile()).await,
            Outcome::Retried
        );
        assert!(lock(&errors.reserve).is_some());
        let _next = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = tokio::time::timeout(Duration::from_secs(1), listener.accept()).await;
        assert!(matches!(accepted, Ok(Ok(_))), "accepts again");
    }

    #[tokio::test]
    async fn log_lines_are_rate_limited() {
        let errors = AcceptErrors::new();
        let l = Labels {
            listener: "x",
            reason: Reason::Other,
        };
        assert_eq!(errors.due(l.clone()), Some(1));
        assert_eq!(errors.due(l.clone()), None);
        assert_eq!(errors.due(l), None);
    }
}
