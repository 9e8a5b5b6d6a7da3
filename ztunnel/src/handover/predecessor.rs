//! The running daemon's side: it answers on the hand-over socket, gives a successor of the
//! same node and network namespace its sockets, and stops accepting once the successor is
//! ready. One hand-over at a time.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::wire::{self, Conn, Entry, Hello, Ready, Reply, Stopped};
use super::{Serving, Stats};
use crate::drain::Drain;

/// How long a successor has to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the main task hears of a hand-over in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The sockets were sent; the successor is starting. Readiness answers 503 and capture
    /// is the successor's to change from now on.
    Started {
        /// The successor's process id.
        successor: u32,
    },
    /// The successor went away before it was ready; this daemon serves on.
    Aborted,
    /// The successor accepts; this daemon no longer does, and drains.
    Completed {
        /// The successor's process id.
        successor: u32,
    },
}

/// The sockets this daemon can hand over: a duplicate of each (the same kernel socket), in a
/// fixed order, taken when they were bound.
#[derive(Debug, Default)]
pub struct Offer {
    sockets: Vec<(Entry, OwnedFd)>,
}

impl Offer {
    /// Adds a duplicate of `sock` under `name`; `path` for unix sockets.
    pub fn add(&mut self, name: &str, path: Option<&std::path::Path>, sock: &impl AsFd) {
        match sock.as_fd().try_clone_to_owned() {
            Ok(fd) => self.sockets.push((
                Entry {
                    name: name.to_string(),
                    path: path.map(|p| p.display().to_string()),
                },
                fd,
            )),
            Err(error) => {
                tracing::warn!(socket = name, %error, "cannot keep a handle to hand over; a successor will bind it anew")
            }
        }
    }

    fn parts(&self) -> (Vec<Entry>, Vec<RawFd>) {
        self.sockets
            .iter()
            .map(|(e, fd)| (e.clone(), fd.as_raw_fd()))
            .unzip()
    }
}

/// What the hand-over server needs of the daemon.
#[derive(Debug)]
pub struct Predecessor {
    /// This daemon's node name.
    pub node: String,
    /// This daemon's network namespace ([`super::netns_id`]).
    pub netns: String,
    /// The sockets to give.
    pub offer: Offer,
    /// Closed when the successor is ready.
    pub serving: Serving,
    /// Flows in progress, reported to the successor.
    pub drain: Drain,
    /// Counted here.
    pub stats: Arc<Stats>,
    /// To the main task.
    pub events: mpsc::UnboundedSender<Event>,
}

impl Predecessor {
    /// Accepts on the hand-over socket while this daemon serves; each connection is a
    /// successor asking for the sockets.
    pub async fn serve(self, listener: UnixListener) {
        let this = Arc::new(self);
        let busy = Arc::new(AtomicBool::new(false));
        let serving = this.serving.clone();
        serving
            .run(async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok((s, _)) => s,
                        Err(error) => {
                            tracing::debug!(%error, "hand-over socket: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let conn = Conn::new(stream);
                    if busy.swap(true, Ordering::AcqRel) {
                        tokio::spawn(refuse(conn, "another hand-over is in progress"));
                        continue;
                    }
                    let (this, busy) = (this.clone(), busy.clone());
                    // Its own task: the session outlives this loop, which stops accepting
                    // when the session completes.
                    tokio::spawn(async move {
                        this.session(conn).await;
                        busy.store(false, Ordering::Release);
                    });
                }
            })
            .await;
    }

    async fn session(&self, mut conn: Conn) {
        let hello: Hello = match conn.recv(Some(HELLO_TIMEOUT)).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "hand-over socket: no valid request; ignored");
                return;
            }
        };
        if let Err(why) = self.check(&hello) {
            tracing::warn!(successor = hello.pid, node = %hello.node, reason = %why,
                "hand-over refused");
            self.stats.count("predecessor", "refused");
            let _ = conn.send(&Reply::Refused { refused: why }, &[]).await;
            return;
        }
        let (sockets, fds) = self.offer.parts();
        let names: Vec<&str> = sockets.iter().map(|e| e.name.as_str()).collect();
        let reply = Reply::Sockets {
            version: wire::VERSION,
            pid: std::process::id(),
            sockets: sockets.clone(),
        };
        if let Err(error) = conn.send(&reply, &fds).await {
            tracing::warn!(successor = hello.pid, %error, "hand-over: cannot send the sockets; serving on");
            self.stats.count("predecessor", "aborted");
            return;
        }
        tracing::info!(successor = hello.pid, sockets = ?names,
            "hand-over: listening sockets sent to a new daemon; serving on until it is ready");
        let _ = self.events.send(Event::Started {
            successor: hello.pid,
        });
        // As long as the successor needs to load its state, certificates and capture.
        match conn.recv::<Ready>(None).await {
            Ok(Some(r)) if r.ready => {}
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    _ => "it closed the connection".to_string(),
                };
                tracing::warn!(successor = hello.pid, reason = %why,
                    "hand-over aborted: the new daemon went away before it was ready; serving on");
                self.stats.count("predecessor", "aborted");
                let _ = self.events.send(Event::Aborted);
                return;
            }
        }
        // The successor accepts on the same sockets already: stop here, nothing waiting in
        // the queues is lost.
        self.serving.close();
        let active = self.drain.active();
        tracing::info!(
            successor = hello.pid,
            active,
            "handed over to the new daemon: no longer accepting; draining open flows"
        );
        self.stats.count("predecessor", "completed");
        let _ = self.events.send(Event::Completed {
            successor: hello.pid,
        });
        let _ = conn
            .send(
                &Stopped {
                    stopped: true,
                    active,
                },
                &[],
            )
            .await;
    }

    /// Why `hello` may not take this daemon's sockets, if it may not.
    fn check(&self, hello: &Hello) -> Result<(), String> {
        if hello.version != wire::VERSION {
            return Err(format!(
                "protocol version {} asked, this daemon speaks {}",
                hello.version,
                wire::VERSION
            ));
        }
        if hello.node != self.node {
            return Err(format!(
                "this daemon serves node {:?}, not {:?}; give each node's daemon its own \
                 --handover-socket",
                self.node, hello.node
            ));
        }
        if hello.netns != self.netns {
            return Err(
                "this daemon runs in another network namespace; give each node's daemon its \
                 own --handover-socket"
                    .to_string(),
            );
        }
        Ok(())
    }
}

async fn refuse(mut conn: Conn, why: &str) {
    let _: std::io::Result<Option<Hello>> = conn.recv(Some(HELLO_TIMEOUT)).await;
    let _ = conn
        .send(
            &Reply::Refused {
                refused: why.to_string(),
            },
            &[],
        )
        .await;
}
