//! Byte streams over HBONE: an HTTP/2 stream pair as `AsyncRead + AsyncWrite`, so hyper can
//! serve HTTP on an inbound CONNECT stream and speak HTTP over an outbound one, and protocol
//! sniffing of what a client sends first.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ztunnel::hbone::client::Flow;

/// The client preface of HTTP/2 with prior knowledge.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest HTTP/1 request line read before deciding the stream is not HTTP.
const MAX_REQUEST_LINE: usize = 8192;

/// One HBONE stream as a byte stream.
pub struct H2Io {
    halves: Halves,
    /// Data read from the stream but not yet returned (the sniffed prefix, or the rest of a
    /// DATA frame larger than the caller's buffer).
    pending: Bytes,
    /// The peer ended its side cleanly.
    eof: bool,
    shut: bool,
}

/// The two halves of the stream: bare (an inbound stream), or inside the pool's [`Flow`],
/// whose slot must live as long as the stream so the pool counts it and never releases its
/// connection as idle.
enum Halves {
    Pair(SendStream<Bytes>, RecvStream),
    Flow(Flow),
}

impl std::fmt::Debug for H2Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Io")
            .field("pending", &self.pending.len())
            .field("shut", &self.shut)
            .finish()
    }
}

impl H2Io {
    /// A byte stream over `send`/`recv` that first returns `prefix`.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, prefix: Bytes) -> H2Io {
        H2Io {
            halves: Halves::Pair(send, recv),
            pending: prefix,
            eof: false,
            shut: false,
        }
    }

    /// An outbound HBONE flow as a byte stream.
    pub fn from_flow(flow: Flow) -> H2Io {
        H2Io {
            halves: Halves::Flow(flow),
            pending: Bytes::new(),
            eof: false,
            shut: false,
        }
    }

    fn send(&mut self) -> &mut SendStream<Bytes> {
        match &mut self.halves {
            Halves::Pair(send, _) => send,
            Halves::Flow(f) => &mut f.send,
        }
    }

    fn recv(&mut self) -> &mut RecvStream {
        match &mut self.halves {
            Halves::Pair(_, recv) => recv,
            Halves::Flow(f) => &mut f.recv,
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    ztunnel::splice::h2_io(e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.recv().poll_data(cx)) {
                None => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(chunk)) => {
                    // An error only means the stream is gone; the next read reports it.
                    let _ = self.recv().flow_control().release_capacity(chunk.len());
                    self.pending = chunk;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send().reserve_capacity(buf.len());
        loop {
            let cap = self.send().capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                self.send()
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send().poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(_)) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send().send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        // Dropped after the peer's clean end: end ours too. Dropped in the middle: cut
        // short, so say so rather than leave the peer waiting for data that will not come.
        if !self.shut {
            if self.eof && self.pending.is_empty() {
                let _ = self.send().send_data(Bytes::new(), true);
            } else {
                self.send().send_reset(h2::Reason::CANCEL);
            }
        }
    }
}

/// What a stream's first bytes say it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Something else: forwarded as bytes.
    Opaque,
    /// Not enough bytes to tell yet.
    NeedMore,
}

/// Decides from the first bytes of a stream. HTTP/1 needs the whole request line
/// (`METHOD SP target SP HTTP/1.x CRLF`); anything that can no longer become one (or the
/// preface) is opaque at once, so a binary protocol is not held back waiting for more.
pub fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    let preface_possible = buf[..n] == H2_PREFACE[..n];
    if preface_possible {
        return if buf.len() >= H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let method_len = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    let method_ok = method_len > 0 && (method_len == line.len() || line[method_len] == b' ');
    match line_end {
        None if method_ok && buf.len() < MAX_REQUEST_LINE => Sniffed::NeedMore,
        None => Sniffed::Opaque,
        Some(_) => {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let http1 = method_ok
                && (line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"))
                && line.iter().filter(|&&b| b == b' ').count() == 2;
            if http1 {
                Sniffed::Http1
            } else {
                Sniffed::Opaque
            }
        }
    }
}

/// Reads from `recv` into `seen` until [`sniff`] decides or the stream ends (then: opaque).
/// The caller replays `seen`, which also keeps what was read when it gives up waiting.
pub async fn sniff_stream(
    recv: &mut RecvStream,
    seen: &mut BytesMut,
) -> Result<Sniffed, h2::Error> {
    loop {
        let Some(chunk) = recv.data().await.transpose()? else {
            return Ok(Sniffed::Opaque);
        };
        let _ = recv.flow_control().release_capacity(chunk.len());
        seen.extend_from_slice(&chunk);
        match sniff(seen) {
            Sniffed::NeedMore => continue,
            decided => return Ok(decided),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_http1_http2_and_opaque_apart_early() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST /a?b=c HTTP/1.0\n"), Sniffed::Http1);
        assert_eq!(sniff(H2_PREFACE), Sniffed::Http2);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HT"), Sniffed::NeedMore);
        assert_eq!(sniff(b"G"), Sniffed::NeedMore);
        assert_eq!(
            sniff(b"\x16\x03\x01\x02\x00"),
            Sniffed::Opaque,
            "a TLS hello"
        );
        assert_eq!(sniff(b"get / HTTP/1.1\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"GET / HTTP/2\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"HELLO world\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"GETX"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET\t"), Sniffed::Opaque);
        assert_eq!(sniff(&[b'A'; MAX_REQUEST_LINE]), Sniffed::Opaque);
    }
}
