//! Data-plane worker threads: one single-threaded async runtime per thread, each flow served
//! start to finish on one of them.
//!
//! Why not one work-stealing runtime: a proxied chunk passes between two tasks (the flow's
//! splice and the HTTP/2 connection that carries it) and, on a work-stealing runtime, often
//! between two threads, so requests and responses paid cross-thread wake-ups (futex, and on a
//! VM an inter-processor interrupt). Here a 64-byte round trip costs each daemon no futex at all
//! (strace in docs/BENCHMARKS.md). Envoy serves a connection on one worker for the same reason.
//!
//! Placement: the accept loops run on the first worker ([`Workers::spawn_acceptor`]) and hand
//! each accepted socket to the worker serving the fewest connections at that moment (ties go
//! to the lowest index, so a quiet daemon keeps its flows, and their pooled HBONE connections,
//! on one worker). A socket placed on the first worker is served by the task that accepted
//! it, with no hand-over: a new connection to a quiet daemon wakes one thread, where accepting
//! on the control thread woke two (the control thread, then the worker it handed the socket
//! to, re-registering the socket with that worker's `epoll`). A pooled
//! HBONE connection is driven by the worker that dialed it, and the pool prefers connections
//! driven by the flow's own worker ([`current`]). So a request flow and a bulk transfer
//! between the same two pods run on different workers when there is more than one, instead of
//! the request waiting behind the transfer's chunks on a shared thread (docs/BENCHMARKS.md, "A
//! request next to a bulk transfer"). Anything still works across workers (h2 and the pool are
//! thread-safe); placement only decides what is local.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

use crate::accept::AcceptErrors;
use crate::drain::{Drain, FlowGuard};
use crate::socket::reset_on_close;

thread_local! {
    /// Index of the worker this thread is, on worker threads.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker the calling thread is (`None` off the data-plane workers).
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The worker runtimes. Threads run until the process exits.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// Failed accepts of every accept loop: the reserve descriptor, counter and log limit.
    accept_errors: Arc<AcceptErrors>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Connections this worker is serving now.
    live: Arc<AtomicUsize>,
}

/// Counts a connection as live on its worker until dropped.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` worker threads (`n` at least 1).
    pub fn start(n: usize, accept_errors: Arc<AcceptErrors>) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.push(Worker {
                handle: rt.handle().clone(),
                live: Arc::new(AtomicUsize::new(0)),
            });
            std::thread::Builder::new()
                .name(format!("ztunnel-dp-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(i)));
                    rt.block_on(std::future::pending::<()>())
                })?;
        }
        Ok(Workers {
            workers,
            accept_errors,
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Connections each worker is serving now, by worker index (a gauge on the metrics port:
    /// how evenly the data plane's load is spread).
    pub fn loads(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect()
    }

    /// The index of the worker serving the fewest connections (the first of equals).
    fn least_busy(&self) -> usize {
        self.workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.live.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i)
    }

    /// Runs `accept`, an accept loop over `listener`, on the first worker, for as long as
    /// `accept` runs: the listener moves to that worker's I/O driver, so a new connection
    /// wakes the worker that (in a quiet daemon) also serves it.
    pub fn spawn_acceptor<F, Fut>(&self, listener: TcpListener, accept: F) -> io::Result<()>
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = listener.into_std()?;
        self.workers[0].handle.spawn(async move {
            match TcpListener::from_std(std) {
                Ok(listener) => accept(listener).await,
                Err(e) => tracing::error!(error = %e, "worker cannot register a listener"),
            }
        });
        Ok(())
    }

    /// Accepts on `listener` for as long as the process runs and serves each connection with
    /// `serve` on the least busy worker, with a [`FlowGuard`] taken at accept (so no drain
    /// can start between the accept and the guard; `serve` drops it when the connection stops
    /// counting as a flow in progress). While `drain` is on, new connections are reset
    /// instead: the listener stays bound so capture keeps steering here, and the client learns
    /// at once rather than starting a flow the drain would cut. A failed accept goes to
    /// [`AcceptErrors::handle`] (out of descriptors: the waiting client is reset, open flows go
    /// on). `name` labels the log lines and metrics.
    pub async fn accept_loop<F, Fut>(
        &self,
        listener: TcpListener,
        name: &'static str,
        drain: &Drain,
        serve: F,
    ) where
        F: Fn(TcpStream, SocketAddr, FlowGuard) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let admit = |_: SocketAddr| Some(());
        let serve = move |tcp, peer, guard, ()| serve(tcp, peer, guard);
        self.accept_loop_admitting(listener, name, drain, admit, serve)
            .await
    }

    /// [`Workers::accept_loop`] with admission at accept: `admit` decides, on this thread and
    /// before the socket is handed to a worker, whether the connection from `peer` is served
    /// (`Some`, passed on to `serve`) or reset at once (`None`; `admit` counts and logs it).
    pub async fn accept_loop_admitting<A, T, F, Fut>(
        &self,
        listener: TcpListener,
        name: &'static str,
        drain: &Drain,
        admit: A,
        serve: F,
    ) where
        A: Fn(SocketAddr) -> Option<T>,
        T: Send + 'static,
        F: Fn(TcpStream, SocketAddr, FlowGuard, T) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    if drain.is_draining() {
                        reset_on_close(&tcp);
                        continue;
                    }
                    let Some(admitted) = admit(peer) else {
                        reset_on_close(&tcp);
                        continue;
                    };
                    let (guard, serve) = (drain.guard(), serve.clone());
                    self.serve(tcp, move |tcp| serve(tcp, peer, guard, admitted));
                }
                Err(e) => {
                    self.accept_errors.handle(&listener, name, e).await;
                }
            }
        }
    }

    /// Serves `tcp` with `serve` on the least busy worker. The socket moves to that worker's
    /// I/O driver (unless it is there already: accepted on that worker), so all its readiness
    /// events arrive there.
    pub fn serve<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.least_busy();
        let worker = &self.workers[index];
        worker.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(worker.live.clone());
        if current() == Some(index) {
            // Already on this worker's driver: served here, without a hand-over.
            tokio::spawn(async move {
                let _live = live;
                serve(tcp).await
            });
            return;
        }
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker; dropped");
                return;
            }
        };
        worker.handle.spawn(async move {
            let _live = live;
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
    use crate::socket::{Leg, SocketFactory};

    /// A connected loopback pair: (client side, accepted side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (client, accepted)
    }

    /// Serves `tcp` on `workers` with a task that reports where it runs and then stays live
    /// until its client side closes.
    fn serve_and_report(
        workers: &Workers,
        tcp: TcpStream,
    ) -> std::sync::mpsc::Receiver<(Option<usize>, String)> {
        let (tx, rx) = std::sync::mpsc::channel();
        workers.serve(tcp, move |mut tcp| async move {
            use tokio::io::AsyncReadExt;
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = tx.send((current(), name));
            let _ = tcp.read(&mut [0u8; 1]).await;
        });
        rx
    }

    #[tokio::test]
    async fn a_socket_is_served_on_a_worker_thread() {
        let workers = Workers::start(2, AcceptErrors::new()).expect("workers");
        let (_client, accepted) = pair().await;
        let (index, name) = serve_and_report(&workers, accepted).recv().expect("report");
        assert!(name.starts_with("ztunnel-dp-"), "served on {name:?}");
        assert_eq!(index, Some(0), "an idle daemon serves on its first worker");
        assert_eq!(current(), None, "the test thread is no worker");
    }

    /// The accept loop runs on the first worker; a connection it places there is served by
    /// the same thread, the next one (the first worker now busier) on the second worker. Each
    /// accepted socket has Nagle's algorithm off, inherited from the factory's listener.
    #[tokio::test]
    async fn accepting_runs_on_the_first_worker_which_serves_what_it_keeps() {
        let workers = Arc::new(Workers::start(2, AcceptErrors::new()).expect("workers"));
        let listener = crate::socket::PlainSockets {
            connect_timeout: std::time::Duration::from_secs(1),
        }
        .listen(Leg::Pod, "127.0.0.1:0".parse().expect("addr"), false)
        .expect("listen");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = std::sync::mpsc::channel();
        let w = workers.clone();
        workers
            .spawn_acceptor(listener, move |l| async move {
                let drain = Drain::default();
                let serve = move |mut tcp: TcpStream, _, guard| {
                    let tx = tx.clone();
                    async move {
                        use tokio::io::AsyncReadExt;
                        let _ = tx.send((current(), tcp.nodelay().ok()));
                        let _ = tcp.read(&mut [0u8; 1]).await;
                        drop(guard);
                    }
                };
                w.accept_loop(l, "test", &drain, serve).await
            })
            .expect("acceptor");
        let _first = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(rx.recv().expect("served"), (Some(0), Some(true)));
        let _second = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(rx.recv().expect("served"), (Some(1), Some(true)));
        assert_eq!(workers.loads(), vec![1, 1]);
    }

    #[tokio::test]
    async fn a_new_connection_goes_to_the_least_busy_worker() {
        let workers = Workers::start(2, AcceptErrors::new()).expect("workers");
        let (held, a) = pair().await;
        let first = serve_and_report(&workers, a).recv().expect("report").0;
        let (_held_too, b) = pair().await;
        let second = serve_and_report(&workers, b).recv().expect("report").0;
        assert_eq!((first, second), (Some(0), Some(1)));
        assert_eq!(workers.loads(), vec![1, 1]);
        // When the first connection ends its worker is free again and is chosen next.
        drop(held);
        for _ in 0..200 {
            if workers.loads()[0] == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let (_c, c) = pair().await;
        assert_eq!(
            serve_and_report(&workers, c).recv().expect("report").0,
            Some(0)
        );
    }
}
