//! The hand-over protocol on the wire: one JSON object per line over a unix stream socket, the
//! listening sockets riding as `SCM_RIGHTS` with the line that names them.
//!
//! ```text
//! successor -> predecessor   {"version":1,"node":"n1","netns":"dev:ino","pid":42}
//! predecessor -> successor   {"version":1,"pid":7,"sockets":[{"name":"hbone"},...]}  + fds
//!                        or  {"refused":"why"}
//! successor -> predecessor   {"ready":true}          (once it accepts on them)
//! predecessor -> successor   {"stopped":true,"active":3}   (it no longer accepts; draining)
//! ```
//!
//! A successor that goes away before `ready` (EOF) aborts the hand-over: the predecessor
//! goes on serving on the sockets it never stopped holding.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The protocol version both sides must speak.
pub const VERSION: u32 = 1;
/// A line longer than this is not a hand-over message.
const MAX_LINE: usize = 64 * 1024;
/// Descriptors one message may carry (the kernel's `SCM_MAX_FD` is 253).
const MAX_FDS: usize = 32;

/// The successor's first line: who asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u32,
    /// The node the successor serves (`--node-name`).
    pub node: String,
    /// The successor's network namespace, `dev:inode` of `/proc/self/ns/net`.
    pub netns: String,
    /// The successor's process id (in its own pid namespace; for logs).
    pub pid: u32,
}

/// One handed-over socket, in the order of the descriptors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// What it is (`outbound`, `hbone`, `dns-udp`, `admin-socket`, ...).
    pub name: String,
    /// For unix sockets: the path it serves (a renamed socket's own address is not it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The predecessor's answer to [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Reply {
    /// The sockets follow (as descriptors of this line).
    Sockets {
        /// Protocol version.
        version: u32,
        /// The predecessor's process id.
        pid: u32,
        /// One per descriptor, in order.
        sockets: Vec<Entry>,
    },
    /// No hand-over, and why.
    Refused {
        /// The reason, for the successor's error message.
        refused: String,
    },
}

/// The successor's second line: it accepts on the sockets now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// Always true.
    pub ready: bool,
}

/// The predecessor's last line: it no longer accepts, and drains.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stopped {
    /// Always true.
    pub stopped: bool,
    /// Flows it still serves.
    pub active: usize,
}

/// One end of a hand-over connection: line framing, and the descriptors that came with it.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    /// Bytes read past the last line.
    buf: Vec<u8>,
    /// Descriptors received and not yet taken.
    fds: Vec<OwnedFd>,
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Sends `msg` as one line, with `fds` attached to it.
    pub async fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut sent = 0;
        while sent < line.len() {
            let rest = &line[sent..];
            // The descriptors go with the first byte only.
            let attach = if sent == 0 { fds } else { &[] };
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(rest)];
                    let cmsg = [ControlMessage::ScmRights(attach)];
                    let cmsgs: &[ControlMessage<'_>] = if attach.is_empty() { &[] } else { &cmsg };
                    sendmsg::<()>(
                        self.stream.as_raw_fd(),
                        &iov,
                        cmsgs,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        Ok(())
    }

    /// The next line as `T`, within `timeout` (`None`: however long it takes); `Ok(None)` on
    /// EOF before a line.
    pub async fn recv<T: for<'de> Deserialize<'de>>(
        &mut self,
        timeout: Option<Duration>,
    ) -> io::Result<Option<T>> {
        let line = match timeout {
            None => self.read_line().await?,
            Some(t) => match tokio::time::timeout(t, self.read_line()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {t:?}"),
                    ))
                }
            },
        };
        let Some(line) = line else { return Ok(None) };
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The descriptors received so far, in order.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    async fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "hand-over message too long",
                ));
            }
            let mut chunk = [0u8; 4096];
            let (n, fds) = self
                .stream
                .async_io(Interest::READABLE, || {
                    recv_with_fds(self.stream.as_raw_fd(), &mut chunk)
                })
                .await?;
            self.fds.extend(fds);
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One `recvmsg`: bytes into `buf`, and the descriptors that came with them (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel has just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "hand-over message carried more descriptors than expected",
        ));
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real socket pair: a line and two descriptors cross, the descriptors still work.
    #[tokio::test]
    async fn a_line_carries_descriptors() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (a, mut b) = (Conn::new(a), Conn::new(b));
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let reply = Reply::Sockets {
            version: VERSION,
            pid: 7,
            sockets: vec![
                Entry {
                    name: "hbone".into(),
                    path: None,
                },
                Entry {
                    name: "dns-udp".into(),
                    path: None,
                },
            ],
        };
        a.send(&reply, &[l.as_raw_fd(), u.as_raw_fd()])
            .await
            .expect("send");
        a.send(&Ready { ready: true }, &[]).await.expect("send");
        let got: Reply = b
            .recv(Some(Duration::from_secs(5)))
            .await
            .expect("recv")
            .expect("line");
        assert_eq!(got, reply);
        let fds = b.take_fds();
        assert_eq!(fds.len(), 2);
        let got = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(got.local_addr().expect("addr"), addr);
        let ready: Ready = b
            .recv(Some(Duration::from_secs(5)))
            .await
            .expect("recv")
            .expect("line");
        assert!(ready.ready);
        drop(a);
        assert!(b
            .recv::<Ready>(Some(Duration::from_secs(5)))
            .await
            .expect("eof")
            .is_none());
    }

    #[tokio::test]
    async fn a_refusal_parses_as_one() {
        let r: Reply = serde_json::from_str(r#"{"refused":"other node"}"#).expect("json");
        assert_eq!(
            r,
            Reply::Refused {
                refused: "other node".into()
            }
        );
    }
}
