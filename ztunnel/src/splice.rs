//! The one copy loop of every proxied flow: TCP to TCP (passthrough, plaintext inbound,
//! same-node) and TCP to an HBONE stream (outbound and inbound HBONE, and the waypoint).
//!
//! Both splices share the same contract, so every path behaves alike:
//! - bytes are counted per direction and added to a [`ByteSink`] (metric counters) as they move, so metrics
//!   advance during long transfers, and returned as [`Transferred`] at the end;
//! - a clean EOF on one side half-closes the other side, and the splice ends when both
//!   directions are done;
//! - an error on either side aborts both: TCP sockets are reset (RST, not FIN) and the HTTP/2
//!   stream is cancelled, so neither application mistakes a failure for a clean end of data;
//! - an [`Abort`] (a policy change revoking the flow) ends it the same way, from outside.
//!
//! Reads go through [`crate::burst::BurstReader`], whose buffer exists only while the socket
//! has data.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::burst::{BurstReader, Readable};
use crate::hbone::window::{Progress, Window};
use crate::socket::reset_on_close;

/// Length of an HTTP/2 frame header, which h2 writes in front of each DATA payload.
const DATA_FRAME_HEADER: usize = 9;

/// Bytes moved by a finished splice, counted from the side of its first socket: for a flow
/// whose first socket is the client, `to_tunnel` is what the client sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Read from the first TCP socket and forwarded.
    pub to_tunnel: u64,
    /// Forwarded to the first TCP socket.
    pub from_tunnel: u64,
}

impl Transferred {
    /// The same counts seen from the other end (the first socket was the server).
    pub fn reversed(self) -> Transferred {
        Transferred {
            to_tunnel: self.from_tunnel,
            from_tunnel: self.to_tunnel,
        }
    }
}

/// How a splice ended: the bytes moved, and the error that aborted it, if any.
pub type Outcome = (Transferred, Option<io::Error>);

/// Ends a splice before its flow does: when a reason arrives, the splice resets its sockets
/// (and cancels its stream) and returns an error that [`aborted`] recognises. The splice owns
/// its sockets to the end, so nothing else needs a handle to them for this.
#[derive(Debug)]
pub struct Abort<'a>(Option<&'a mut oneshot::Receiver<String>>);

impl<'a> Abort<'a> {
    /// For a flow nothing ends early.
    pub const NEVER: Abort<'static> = Abort(None);

    /// Ends the splice when `reason` receives one; a dropped sender never ends it.
    pub fn on(reason: &'a mut oneshot::Receiver<String>) -> Abort<'a> {
        Abort(Some(reason))
    }

    async fn wait(self) -> io::Error {
        if let Some(rx) = self.0 {
            if let Ok(reason) = rx.await {
                return io::Error::new(io::ErrorKind::ConnectionAborted, Aborted(reason));
            }
        }
        std::future::pending().await
    }
}

/// The error of a splice that an [`Abort`] ended, with the abort's reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Aborted(String);

/// The reason, when `err` is the error of a splice an [`Abort`] ended.
pub fn aborted(err: &io::Error) -> Option<&str> {
    let inner = err.get_ref()?.downcast_ref::<Aborted>()?;
    Some(&inner.0)
}

/// Copies both ways between two TCP sockets (`a` is the side [`Transferred::to_tunnel`] is
/// read from), reporting bytes to `sink` as they move, until both are done or `abort` ends it.
pub async fn plain(
    mut a: TcpStream,
    mut b: TcpStream,
    sink: &ByteSink,
    abort: Abort<'_>,
) -> Outcome {
    let mut bytes = Transferred::default();
    let err = {
        let (ar, mut aw) = a.split();
        let (br, mut bw) = b.split();
        let up = pin!(copy(ar, &mut bw, &mut bytes.to_tunnel, |n| sink.to_tunnel(n)));
        let down = pin!(copy(br, &mut aw, &mut bytes.from_tunnel, |n| {
            sink.from_tunnel(n)
        }));
        both(up, down, abort).await
    };
    if err.is_some() {
        reset_on_close(&a);
        reset_on_close(&b);
    }
    (bytes, err)
}

/// Copies both ways between a TCP socket and an HTTP/2 stream (an HBONE flow), reporting
/// bytes to `sink` as they move, and to the connection's adaptive `window` (if any) whether
/// the socket took what came from the tunnel at once; until both directions are done or
/// `abort` ends it.
pub async fn hbone(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    window: Option<&Window>,
    sink: &ByteSink,
    abort: Abort<'_>,
) -> Outcome {
    let (mut rd, mut wr) = tcp.into_split();
    let mut bytes = Transferred::default();
    let err = {
        let up = pin!(async {
            let mut reader = BurstReader::with_header(&mut rd, DATA_FRAME_HEADER);
            while let Some(chunk) = reader.next().await? {
                send_all(&mut send, chunk, &mut bytes.to_tunnel, sink).await?;
            }
            send.send_data(Bytes::new(), true).map_err(h2_io)
        });
        let down = pin!(async {
            let mut progress = Progress::default();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.map_err(h2_io)?;
                let refused = write_refused(&mut wr, &chunk).await?;
                if let Some(w) = window {
                    let queued = || crate::socket::unacked_bytes(wr.as_ref()).ok();
                    w.passed_on(&mut progress, chunk.len(), refused, queued);
                }
                bytes.from_tunnel += chunk.len() as u64;
                sink.from_tunnel(chunk.len());
                // An error here only means the stream is already gone; data() reports it next.
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            wr.shutdown().await
        });
        both(up, down, abort).await
    };
    if err.is_some() {
        send.send_reset(h2::Reason::CANCEL);
        if let Ok(tcp) = rd.reunite(wr) {
            reset_on_close(&tcp);
        }
    }
    (bytes, err)
}

/// Byte counters a copy loop adds to as data moves, in the splice's own directions
/// (`to_tunnel`: read from its TCP socket; `from_tunnel`: written to it). Allocation-free on
/// the data path: one atomic add per counter per chunk.
#[derive(Debug, Default, Clone)]
pub struct ByteSink {
    to_tunnel: Vec<Counter>,
    from_tunnel: Vec<Counter>,
}

impl ByteSink {
    /// A sink adding what is read from the TCP socket to `to_tunnel` and what is written to
    /// it to `from_tunnel`.
    pub fn new(to_tunnel: Vec<Counter>, from_tunnel: Vec<Counter>) -> ByteSink {
        ByteSink {
            to_tunnel,
            from_tunnel,
        }
    }

    /// Adds `other`'s counters (a same-node flow reports for both reporters).
    pub fn join(mut self, other: ByteSink) -> ByteSink {
        self.to_tunnel.extend(other.to_tunnel);
        self.from_tunnel.extend(other.from_tunnel);
        self
    }

    /// `n` bytes read from the TCP socket were forwarded.
    pub fn to_tunnel(&self, n: usize) {
        for c in &self.to_tunnel {
            c.inc_by(n as u64);
        }
    }

    /// `n` bytes were written to the TCP socket.
    pub fn from_tunnel(&self, n: usize) {
        for c in &self.from_tunnel {
            c.inc_by(n as u64);
        }
    }
}

/// Runs both directions to the end; the first error, or `abort`, ends both and is returned.
/// The two come pinned by the caller, so each is stored once, in the caller's state: futures
/// taken by value would be kept twice in every held flow's task.
async fn both(
    mut up: Pin<&mut impl Future<Output = io::Result<()>>>,
    mut down: Pin<&mut impl Future<Output = io::Result<()>>>,
    abort: Abort<'_>,
) -> Option<io::Error> {
    let mut abort = pin!(abort.wait());
    let (mut up_done, mut down_done) = (false, false);
    poll_fn(|cx| {
        if let Poll::Ready(e) = abort.as_mut().poll(cx) {
            return Poll::Ready(Some(e));
        }
        if let Some(e) = poll_half(&mut up_done, up.as_mut(), cx) {
            return Poll::Ready(Some(e));
        }
        if let Some(e) = poll_half(&mut down_done, down.as_mut(), cx) {
            return Poll::Ready(Some(e));
        }
        if up_done && down_done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Polls one direction of [`both`] unless it is `done`; sets `done` when it ends cleanly and
/// returns its error.
fn poll_half(
    done: &mut bool,
    half: Pin<&mut impl Future<Output = io::Result<()>>>,
    cx: &mut std::task::Context<'_>,
) -> Option<io::Error> {
    if *done {
        return None;
    }
    match half.poll(cx) {
        Poll::Ready(Ok(())) => {
            *done = true;
            None
        }
        Poll::Ready(Err(e)) => Some(e),
        Poll::Pending => None,
    }
}

/// One direction of a plain splice: read, write all, count, until EOF; then half-close.
async fn copy<R: Readable, W: AsyncWrite + Unpin>(
    rd: R,
    wr: &mut W,
    total: &mut u64,
    count: impl Fn(usize),
) -> io::Result<()> {
    let mut reader = BurstReader::new(rd);
    while let Some(chunk) = reader.next().await? {
        wr.write_all(&chunk).await?;
        *total += chunk.len() as u64;
        count(chunk.len());
    }
    wr.shutdown().await
}

/// Writes all of `chunk`; true when the socket took none of it at first (still full of the
/// data before: the destination is not keeping up). A partial write is not a refusal: a large
/// chunk may not fit a buffer that a fast reader is draining. The first attempt is the write
/// `write_all` would make, so this costs no extra syscall.
async fn write_refused(wr: &mut OwnedWriteHalf, chunk: &[u8]) -> io::Result<bool> {
    let n = match wr.try_write(chunk) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if n < chunk.len() {
        wr.write_all(&chunk[n..]).await?;
    }
    Ok(n == 0 && !chunk.is_empty())
}

/// Sends one chunk on an HTTP/2 stream as flow control allows.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut chunk: Bytes,
    total: &mut u64,
    sink: &ByteSink,
) -> io::Result<()> {
    // Each pass reserves the rest of the chunk and sends all the capacity granted: h2's
    // poll_capacity wakes only when capacity *increases*, so granted capacity left unsent here
    // would never be reported again and the flow would stall.
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        };
        if cap == 0 {
            continue;
        }
        let part = chunk.split_to(cap.min(chunk.len()));
        *total += part.len() as u64;
        sink.to_tunnel(part.len());
        send.send_data(part, false).map_err(h2_io)?;
    }
    Ok(())
}

/// An h2 error as an I/O error, keeping the underlying I/O error when there is one.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected loopback pair: (client side, accepted side).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    /// Real loopback sockets: bytes cross both ways intact and counted, and each side's EOF
    /// reaches the other as a half-close, after which the other direction still flows.
    #[tokio::test]
    async fn plain_copies_both_ways_with_half_close() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let splice =
            tokio::spawn(async move { plain(a, b, &ByteSink::default(), Abort::NEVER).await });
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        client.write_all(&up).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read to EOF");
        assert!(got == up, "upstream bytes differ");
        server.write_all(b"reply after EOF").await.expect("write");
        server.shutdown().await.expect("close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"reply after EOF");
        let (bytes, err) = splice.await.expect("splice");
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            bytes,
            Transferred {
                to_tunnel: up.len() as u64,
                from_tunnel: 15
            }
        );
    }

    /// A reset on one side is passed on as a reset, not a clean EOF.
    #[tokio::test]
    async fn plain_propagates_a_reset() {
        let (client, a) = pair().await;
        let (b, mut server) = pair().await;
        let splice =
            tokio::spawn(async move { plain(a, b, &ByteSink::default(), Abort::NEVER).await });
        reset_on_close(&client);
        drop(client);
        let mut buf = [0u8; 16];
        let r = server.read(&mut buf).await;
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the server must see the client's reset"
        );
        assert!(splice.await.expect("splice").1.is_some());
    }

    /// An abort ends a splice that both sides keep open: each side gets a reset, and the
    /// splice's error carries the reason, after the bytes that had already crossed.
    #[tokio::test]
    async fn an_abort_resets_both_sides_and_names_its_reason() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (tx, mut rx) = oneshot::channel();
        let splice =
            tokio::spawn(
                async move { plain(a, b, &ByteSink::default(), Abort::on(&mut rx)).await },
            );
        client.write_all(b"before").await.expect("write");
        let mut buf = [0u8; 6];
        server.read_exact(&mut buf).await.expect("read");
        tx.send("revoked for the test".to_string()).expect("send");
        let (bytes, err) = splice.await.expect("splice");
        let err = err.expect("an aborted splice reports an error");
        assert_eq!(aborted(&err), Some("revoked for the test"));
        assert_eq!(bytes.to_tunnel, 6);
        for side in [&mut client, &mut server] {
            let r = side.read(&mut buf).await;
            assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        }
    }
}
