//! Data-plane worker threads: one single-threaded async runtime per thread, each flow served
//! start to finish on one of them.
//!
//! Why not one work-stealing runtime: a proxied chunk passes between two tasks (the flow's
//! splice and the HTTP/2 connection that carries it) and, on a work-stealing runtime, often
//! between two threads, so requests and responses paid cross-thread wake-ups (futex, and on a
//! VM an inter-processor interrupt). Here a 64-byte round trip costs each daemon no futex at all
//! (strace in docs/BENCHMARKS.md). Envoy serves a connection on one worker for the same reason.
//!
//! Placement: the accept loops run on the control runtime and hand each accepted socket to a
//! worker. Outbound flows are placed by (source pod, original destination), so flows that share
//! a pooled HBONE connection (same source and destination) run on the worker that drives it;
//! inbound connections round-robin. Anything still works across workers (h2 and the pool are
//! thread-safe); placement only decides what is local.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// The worker runtimes. Threads run until the process exits.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` worker threads (`n` at least 1).
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("ztunnel-dp-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The worker for `key`: equal keys always get the same worker.
    fn by_key(&self, key: (IpAddr, IpAddr)) -> &Handle {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.handles[(h.finish() % self.handles.len() as u64) as usize]
    }

    /// The next worker in turn.
    fn round_robin(&self) -> &Handle {
        &self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()]
    }

    /// Serves `tcp` with `serve` on the worker chosen by `flow`, (source IP, original
    /// destination IP), or round-robin for `None`. The socket moves to that worker's I/O
    /// driver, so all its readiness events arrive there.
    pub fn serve<F, Fut>(&self, flow: Option<(IpAddr, IpAddr)>, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let worker = match flow {
            Some(k) => self.by_key(k),
            None => self.round_robin(),
        };
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker; dropped");
                return;
            }
        };
        worker.spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => {
                    tracing::warn!(error = %e, "worker cannot register a connection; dropped")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_is_served_on_a_worker_thread() {
        let workers = Workers::start(2).expect("workers");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut c = TcpStream::connect(addr).await.expect("connect");
            let mut s = String::new();
            c.read_to_string(&mut s).await.expect("read");
            s
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let flow = Some(("10.0.0.1".parse().expect("ip"), addr.ip()));
        workers.serve(flow, tcp, |mut tcp| async move {
            use tokio::io::AsyncWriteExt;
            let name = std::thread::current().name().unwrap_or("").to_string();
            tcp.write_all(name.as_bytes()).await.expect("write");
        });
        let name = client.await.expect("client");
        assert!(name.starts_with("ztunnel-dp-"), "served on {name:?}");
    }

    #[test]
    fn equal_keys_get_the_same_worker() {
        let workers = Workers::start(4).expect("workers");
        let flow = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.1.2".parse().expect("ip"),
        );
        let a = workers.by_key(flow) as *const Handle;
        let b = workers.by_key(flow) as *const Handle;
        assert_eq!(a, b);
    }
}
