//! The transport under TLS on HBONE connections: a TCP socket read through a buffer that exists
//! only while the socket has data.
//!
//! rustls asks its transport for 4 KiB at a time; unbuffered, that is one `read` syscall per
//! 4 KiB of tunnel data, so reads go through a 64 KiB buffer that feeds many records. A buffer
//! held for the connection's life, though, is 64 KiB per connection whether or not it ever
//! moves data: 2,000 peers holding TLS handshakes open cost 128 MiB of heap. Here the buffer is
//! taken when the socket becomes readable and let go once a short read has been handed out in
//! full (the socket is drained), as [`crate::burst`] does for the splices: a connection that
//! waits (in its handshake, or idle between flows) holds none, and a bulk transfer keeps one
//! while its reads come back full.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Read buffer size once the socket has data.
pub const READ_BUF: usize = 64 * 1024;

/// A TCP socket with a read buffer that lives for one burst (see the module doc).
#[derive(Debug)]
pub struct Transport {
    tcp: TcpStream,
    /// Empty (no allocation) between bursts.
    buf: Vec<u8>,
    /// Next unread byte of `buf`.
    pos: usize,
    /// Whether the last read filled the buffer (more data is likely waiting: keep it).
    full: bool,
}

impl Transport {
    /// Wraps `tcp`; no buffer is allocated until the socket has data.
    pub fn new(tcp: TcpStream) -> Transport {
        Transport {
            tcp,
            buf: Vec::new(),
            pos: 0,
            full: false,
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes of read buffer held now (0 between bursts).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Copies buffered bytes to `out`; lets the buffer go once it is drained after a short read.
    fn take_buffered(&mut self, out: &mut ReadBuf<'_>) {
        let n = (self.buf.len() - self.pos).min(out.remaining());
        out.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.buf.len() {
            self.pos = 0;
            if self.full {
                self.buf.clear();
            } else {
                self.buf = Vec::new();
            }
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.buf.len() {
            this.take_buffered(out);
            return Poll::Ready(Ok(()));
        }
        // A caller with room for a whole buffer reads directly.
        if out.remaining() >= READ_BUF {
            return Pin::new(&mut this.tcp).poll_read(cx, out);
        }
        if this.buf.capacity() == 0 {
            // Wait for data before taking a buffer.
            ready!(this.tcp.poll_read_ready(cx))?;
            this.buf.reserve_exact(READ_BUF);
        }
        this.buf.clear();
        // tokio's own read, into the spare capacity (no zeroing per read): after a short read
        // it marks the socket not ready, so the next call waits in `epoll_wait` instead of
        // trying a read that fails with `EAGAIN` (one syscall fewer per burst: a small request
        // is one burst).
        match pin!(this.tcp.read_buf(&mut this.buf)).poll(cx) {
            Poll::Ready(Ok(n)) => {
                this.full = n >= READ_BUF;
                if n == 0 {
                    this.buf = Vec::new();
                } else {
                    this.take_buffered(out);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.buf = Vec::new();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Readiness was stale; give the buffer back until data comes.
                this.buf = Vec::new();
                this.full = false;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let c = TcpStream::connect(addr).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    /// Small reads as rustls makes them: every byte arrives in order, and once the socket is
    /// drained after a short read no buffer is held.
    #[tokio::test]
    async fn small_reads_get_every_byte_and_hold_no_buffer_when_drained() {
        let (mut c, s) = pair().await;
        let mut t = Transport::new(s);
        assert_eq!(t.buffered_capacity(), 0, "no buffer before data");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            c.write_all(&sent).await.expect("write");
            c
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = t.read(&mut chunk).await.expect("read");
            assert!(n > 0, "early EOF");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data, "bytes differ");
        let mut c = writer.await.expect("writer");
        assert_eq!(t.buffered_capacity(), 0, "drained: buffer let go");
        c.write_all(b"x").await.expect("write");
        assert_eq!(t.read(&mut chunk).await.expect("read"), 1);
        assert_eq!(t.buffered_capacity(), 0);
        drop(c);
        assert_eq!(t.read(&mut chunk).await.expect("eof"), 0);
    }
}
