//! Hand-over of the listening sockets from a running daemon to its successor on the same node
//! (a rolling restart or upgrade), so that no connection is refused while the daemons change
//! and the old one's open flows finish on it.
//!
//! The running daemon (the predecessor, [`predecessor`]) listens on the hand-over socket
//! (`--handover-socket`, a unix socket of mode 0600). A new daemon (the successor,
//! [`successor`]) connects to it before binding anything and receives, as `SCM_RIGHTS`,
//! duplicates of every socket the predecessor serves: the captured ports, DNS, the admin,
//! metrics and readiness ports, the admin socket and the hand-over socket itself ([`wire`]).
//! Both processes then hold the *same* kernel sockets, with one accept queue each: a
//! connection waiting there is accepted by whichever process accepts next, never reset (as
//! it would be in the queue of a closing `SO_REUSEPORT` twin).
//!
//! The successor loads its state, certificates and capture (adopting the pinned programs)
//! without accepting ([`Serving`] closed); the predecessor serves on meanwhile, its readiness
//! answering 503 so that the successor's pod is not taken for ready on the shared port. Once
//! ready, the successor accepts and tells the predecessor, which stops accepting (its queue
//! is the successor's too) and drains: open flows go on to their end or `--drain-timeout`,
//! HBONE peers get GOAWAY and open new connections, which the successor accepts. A successor
//! that dies before it is ready aborts the hand-over: the predecessor serves on as before.
//! Without a predecessor (first start, or it was killed) the successor binds as usual.

pub mod predecessor;
pub mod successor;
pub mod wire;

use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use predecessor::{Event, Offer};
pub use successor::{take_over, Inherited};

/// Names of the handed-over sockets (the `name` of each [`wire::Entry`]).
pub mod names {
    /// Outbound capture (15001).
    pub const OUTBOUND: &str = "outbound";
    /// Inbound plaintext capture (15006).
    pub const INBOUND_PLAINTEXT: &str = "inbound-plaintext";
    /// HBONE (15008).
    pub const HBONE: &str = "hbone";
    /// DNS proxy, UDP (15053).
    pub const DNS_UDP: &str = "dns-udp";
    /// DNS proxy, TCP (15053).
    pub const DNS_TCP: &str = "dns-tcp";
    /// Admin port (15000).
    pub const ADMIN: &str = "admin";
    /// Metrics (15020).
    pub const METRICS: &str = "metrics";
    /// Readiness (15021).
    pub const READINESS: &str = "readiness";
    /// The admin socket.
    pub const ADMIN_SOCKET: &str = "admin-socket";
    /// The hand-over socket itself, for the next hand-over.
    pub const HANDOVER: &str = "handover";
    /// The CNI endpoint.
    pub const CNI: &str = "cni";
    /// The IPv6 twins of the captured ports and the DNS proxy (`[::1]`, HBONE `[::]`), when
    /// the node has IPv6.
    pub const OUTBOUND6: &str = "outbound6";
    /// See [`OUTBOUND6`].
    pub const INBOUND_PLAINTEXT6: &str = "inbound-plaintext6";
    /// See [`OUTBOUND6`].
    pub const HBONE6: &str = "hbone6";
    /// See [`OUTBOUND6`].
    pub const DNS_UDP6: &str = "dns-udp6";
    /// See [`OUTBOUND6`].
    pub const DNS_TCP6: &str = "dns-tcp6";
}

/// Why a hand-over could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Talking to the daemon on the hand-over socket failed.
    #[error("hand-over socket {path}: {what}: {error}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        error: io::Error,
    },
    /// The running daemon closed the connection without answering.
    #[error("hand-over socket {path}: the running daemon closed the connection without handing over; is it shutting down? start again once it has exited")]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
    /// The running daemon refused.
    #[error("hand-over socket {path}: the running daemon refused: {reason}")]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// Its reason.
        reason: String,
    },
    /// The answer was not what this version understands.
    #[error("hand-over socket {path}: {message}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// Whether this process accepts on its listeners. Every accept loop runs inside
/// [`Serving::run`]: a successor's stay closed until it is ready, a predecessor's stop once
/// its successor is. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Serving(Arc<watch::Sender<bool>>);

impl Serving {
    /// Open (accepting) or closed from the start.
    pub fn new(open: bool) -> Serving {
        Serving(Arc::new(watch::channel(open).0))
    }

    /// Starts accepting.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Stops accepting, for good: loops that stopped do not start again.
    pub fn close(&self) {
        self.0.send_replace(false);
    }

    /// Whether open.
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    /// Runs `accept_loop` once open, until it ends or `close` is called; then drops it (and
    /// with it this process's handle of the listener, which the successor holds on to). The
    /// check comes before every poll of the loop, so once closed it never accepts again, and
    /// a connection it had accepted is already handed to its flow (no accept loop holds one
    /// across an await).
    pub async fn run<F: Future<Output = ()>>(self, accept_loop: F) {
        let mut rx = self.0.subscribe();
        if rx.wait_for(|open| *open).await.is_err() {
            return;
        }
        tokio::select! {
            biased;
            _ = rx.wait_for(|open| !*open) => {}
            () = accept_loop => {}
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    role: &'static str,
    result: &'static str,
}

/// `ztunnel_handovers_total{role, result}`: hand-overs this process took part in.
#[derive(Debug, Default)]
pub struct Stats {
    total: Family<Labels, Counter>,
}

impl Stats {
    /// Adds the counter to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztunnel_handovers",
            "Hand-overs of the listening sockets between daemons of this node, by this \
             process's role (successor: took them over; predecessor: handed them over) and \
             result (completed, aborted: the successor went away before it was ready, refused)",
            self.total.clone(),
        );
    }

    fn count(&self, role: &'static str, result: &'static str) {
        self.total.get_or_create(&Labels { role, result }).inc();
    }

    /// The count for `role` and `result` (tests).
    pub fn get(&self, role: &'static str, result: &'static str) -> u64 {
        self.total.get_or_create(&Labels { role, result }).get()
    }
}

/// This process's network namespace as `dev:inode` of `/proc/self/ns/net`: a daemon hands
/// its sockets only to one in the same namespace (one hand-over path shared by two nodes'
/// daemons on one machine would otherwise swap their ports).
pub fn netns_id() -> io::Result<String> {
    let m = std::fs::metadata("/proc/self/ns/net")?;
    Ok(format!("{}:{}", m.dev(), m.ino()))
}
