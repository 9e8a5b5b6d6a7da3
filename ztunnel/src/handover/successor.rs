//! The new daemon's side: ask the running daemon for its sockets before binding anything, use
//! those that match this daemon's settings, and tell it when this daemon accepts.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Socket, Type};
use tokio::net::UnixStream;

use super::wire::{self, Conn, Entry, Hello, Ready, Reply, Stopped};
use super::{HandoverError, Stats};

/// How long the running daemon has to answer with its sockets.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long it has to confirm it stopped accepting.
const STOPPED_TIMEOUT: Duration = Duration::from_secs(30);

/// The sockets received from the running daemon, and the connection to it (held until this
/// daemon is ready: closing it earlier aborts the hand-over).
#[derive(Debug)]
pub struct Inherited {
    conn: Conn,
    path: PathBuf,
    /// The predecessor's process id.
    pub predecessor: u32,
    sockets: Vec<(Entry, Option<OwnedFd>)>,
}

/// Asks the daemon answering on `path` for its sockets. `Ok(None)` when none answers (first
/// start, or it was killed: the socket file is stale), and this daemon binds its own.
pub async fn take_over(path: &Path, node: &str) -> Result<Option<Inherited>, HandoverError> {
    let err = |what, error| HandoverError::Io {
        path: path.to_path_buf(),
        what,
        error,
    };
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::debug!(path = %path.display(), "no running daemon to take over from");
            return Ok(None);
        }
        Err(e) => return Err(err("connecting", e)),
    };
    let mut conn = Conn::new(stream);
    let hello = Hello {
        version: wire::VERSION,
        node: node.to_string(),
        netns: super::netns_id().map_err(|e| err("reading /proc/self/ns/net", e))?,
        pid: std::process::id(),
    };
    conn.send(&hello, &[])
        .await
        .map_err(|e| err("sending the request", e))?;
    let reply: Reply = conn
        .recv(Some(REPLY_TIMEOUT))
        .await
        .map_err(|e| err("waiting for the sockets", e))?
        .ok_or_else(|| HandoverError::Closed {
            path: path.to_path_buf(),
        })?;
    let (pid, entries) = match reply {
        Reply::Refused { refused } => {
            return Err(HandoverError::Refused {
                path: path.to_path_buf(),
                reason: refused,
            })
        }
        Reply::Sockets {
            version,
            pid,
            sockets,
        } => {
            if version != wire::VERSION {
                return Err(HandoverError::Protocol {
                    path: path.to_path_buf(),
                    message: format!("answered in protocol version {version}"),
                });
            }
            (pid, sockets)
        }
    };
    let fds = conn.take_fds();
    if fds.len() != entries.len() {
        return Err(HandoverError::Protocol {
            path: path.to_path_buf(),
            message: format!(
                "{} sockets named but {} descriptors received",
                entries.len(),
                fds.len()
            ),
        });
    }
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    tracing::info!(predecessor = pid, sockets = ?names,
        "taking over the running daemon's listening sockets; it serves until this one is ready");
    Ok(Some(Inherited {
        conn,
        path: path.to_path_buf(),
        predecessor: pid,
        sockets: entries
            .into_iter()
            .zip(fds)
            .map(|(e, fd)| (e, Some(fd)))
            .collect(),
    }))
}

impl Inherited {
    /// The socket named `name` if it is of type `ty` and, for TCP, listening; `None`
    /// otherwise or when already taken.
    fn take(&mut self, name: &str, ty: Type) -> Option<Socket> {
        let (_, fd) = self.sockets.iter_mut().find(|(e, _)| e.name == name)?;
        let sock = Socket::from(fd.take()?);
        let right_type = sock.r#type().is_ok_and(|t| t == ty);
        let listening = ty != Type::STREAM || sock.is_listener().unwrap_or(false);
        if right_type && listening {
            Some(sock)
        } else {
            tracing::warn!(
                socket = name,
                "received socket is not what its name says; binding anew"
            );
            None
        }
    }

    /// The TCP listener `name`, when it listens on `addr` (a port changed by the upgrade is
    /// bound anew; the old one closes with the predecessor).
    pub fn tcp(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let sock = self.take(name, Type::STREAM)?;
        let at = sock.local_addr().ok().and_then(|a| a.as_socket());
        if at == Some(addr) {
            return Some(sock.into());
        }
        tracing::info!(socket = name, was = ?at, now = %addr,
            "not taking over a listener whose address changed; binding anew");
        None
    }

    /// The UDP socket `name`, when bound to `addr`.
    pub fn udp(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::UdpSocket> {
        let sock = self.take(name, Type::DGRAM)?;
        let at = sock.local_addr().ok().and_then(|a| a.as_socket());
        if at == Some(addr) {
            return Some(sock.into());
        }
        tracing::info!(socket = name, was = ?at, now = %addr,
            "not taking over a socket whose address changed; binding anew");
        None
    }

    /// The unix listener `name`, when it serves `path`.
    pub fn unix(&mut self, name: &str, path: &Path) -> Option<std::os::unix::net::UnixListener> {
        let served = self
            .sockets
            .iter()
            .find(|(e, _)| e.name == name)
            .and_then(|(e, _)| e.path.clone());
        if served.as_deref().map(Path::new) != Some(path) {
            tracing::info!(socket = name, was = ?served, now = %path.display(),
                "not taking over a unix socket whose path changed; binding anew");
            return None;
        }
        let sock = self.take(name, Type::STREAM)?;
        let fd: OwnedFd = sock.into();
        Some(fd.into())
    }

    /// This daemon accepts on the sockets now: tells the predecessor, which stops accepting
    /// and drains, and logs its answer. Sockets not taken are closed here.
    pub fn complete(self, stats: Arc<Stats>) {
        let Inherited {
            mut conn,
            path,
            predecessor,
            sockets,
        } = self;
        drop(sockets);
        tokio::spawn(async move {
            if let Err(error) = conn.send(&Ready { ready: true }, &[]).await {
                tracing::warn!(predecessor, %error, path = %path.display(),
                    "cannot tell the previous daemon that this one is ready; it accepts \
                     alongside this one until it stops");
                stats.count("successor", "aborted");
                return;
            }
            match conn.recv::<Stopped>(Some(STOPPED_TIMEOUT)).await {
                Ok(Some(s)) if s.stopped => {
                    tracing::info!(
                        predecessor,
                        active = s.active,
                        "hand-over complete: the previous daemon no longer accepts and drains \
                         its open flows"
                    );
                    stats.count("successor", "completed");
                }
                outcome => {
                    tracing::warn!(
                        predecessor,
                        ?outcome,
                        "the previous daemon did not confirm the hand-over; it may accept \
                         alongside this one until it stops"
                    );
                    stats.count("successor", "aborted");
                }
            }
        });
    }
}
