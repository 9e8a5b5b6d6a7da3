//! The server's contract over real loopback connections: keep-alive, `HEAD`, 405, the size
//! limits (431, 413) and the deadlines and connection cap that bound a client.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Short deadlines, so the tests that wait for them are quick.
const TEST_LIMITS: Limits = Limits {
    max_connections: 4,
    header_timeout: Duration::from_millis(300),
    idle_timeout: Duration::from_millis(1500),
    body_timeout: Duration::from_millis(300),
    write_stall: Duration::from_millis(300),
    max_header_bytes: 8 * 1024,
    max_body_bytes: 4 * 1024,
};

fn route(req: &Request<'_>) -> Reply {
    match req.path {
        "/hello" => super::super::read_only(req, || Reply::text(200, "hello\n")),
        // Far more than the socket buffers hold: a client that does not read stalls the write.
        "/big" => Reply::text(200, "x".repeat(32 << 20)),
        _ => Reply::not_found(),
    }
}

async fn server(limits: Limits) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, "test", limits, route));
    addr
}

/// A response read off the stream: status, head (lower-cased), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one response; `head_only` for a response to `HEAD`, which has no body.
async fn answer(s: &mut TcpStream, head_only: bool) -> Answer {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read head");
        assert_eq!(
            n,
            1,
            "EOF inside a response head: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = vec![0u8; if head_only { 0 } else { len }];
    s.read_exact(&mut body).await.expect("body");
    Answer { status, head, body }
}

/// Whether the server closes `s` (EOF or reset) within 5 s without sending anything more.
async fn closed(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    ended.is_ok() && rest.is_empty()
}

#[tokio::test]
async fn keep_alive_head_and_405() {
    let addr = server(TEST_LIMITS).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let a = answer(&mut s, false).await;
        assert_eq!((a.status, a.body.as_slice()), (200, &b"hello\n"[..]));
    }
    s.write_all(b"HEAD /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let a = answer(&mut s, true).await;
    assert_eq!(a.status, 200);
    assert!(a.head.contains("content-length: 6"), "{}", a.head);
    s.write_all(b"DELETE /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let a = answer(&mut s, false).await;
    assert_eq!(a.status, 405);
    assert!(a.head.contains("allow: get, head"), "{}", a.head);
    // Still the same connection: nothing above closed it, and HEAD sent no body.
    s.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(answer(&mut s, false).await.body, b"hello\n");
}

#[tokio::test]
async fn oversized_head_is_431_and_oversized_body_413() {
    let addr = server(TEST_LIMITS).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let big = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    s.write_all(big.as_bytes()).await.expect("write");
    assert_eq!(answer(&mut s, false).await.status, 431);
    assert!(closed(&mut s).await);

    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n")
        .await
        .expect("write");
    let a = answer(&mut s, false).await;
    assert_eq!(a.status, 413);
    assert!(a.head.contains("connection: close"), "{}", a.head);

    // Chunked, so the size shows only while reading.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let chunk = "b".repeat(3000);
    let req = format!(
        "POST /hello HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
         bb8\r\n{chunk}\r\nbb8\r\n{chunk}\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    assert_eq!(answer(&mut s, false).await.status, 413);

    // A small body is read and the request answered (here: 405, the path only reads).
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
        .await
        .expect("write");
    assert_eq!(answer(&mut s, false).await.status, 405);
}

#[tokio::test]
async fn a_silent_or_slow_client_is_dropped_but_keep_alive_may_idle_longer() {
    let addr = server(TEST_LIMITS).await;
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut partial = TcpStream::connect(addr).await.expect("connect");
    partial
        .write_all(b"GET /hello HTTP/1.1\r\n")
        .await
        .expect("write");
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    answer(&mut idle, false).await;

    assert!(closed(&mut silent).await);
    assert!(closed(&mut partial).await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    // Longer than the head deadline, shorter than the idle one: still usable.
    tokio::time::sleep(Duration::from_millis(500)).await;
    idle.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(answer(&mut idle, false).await.status, 200);
    assert!(closed(&mut idle).await, "closed after the idle deadline");
}

#[tokio::test]
async fn the_cap_queues_clients_until_a_slot_frees() {
    let limits = Limits {
        max_connections: 1,
        ..TEST_LIMITS
    };
    let addr = server(limits).await;
    // Holds the only slot with a response it never reads.
    let mut hog = TcpStream::connect(addr).await.expect("connect");
    hog.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = tokio::time::Instant::now();
    let mut next = TcpStream::connect(addr).await.expect("connect (backlog)");
    next.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let a = tokio::time::timeout(Duration::from_secs(5), answer(&mut next, false))
        .await
        .expect("answered once the stalled write gave up");
    assert_eq!(a.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "answered after {:?}, before the stall deadline freed the slot",
        started.elapsed()
    );
}
