//! Graceful drain: on SIGTERM or admin `/quitquitquit` the daemon stops taking new connections
//! (listeners stay bound so captured SYNs are still steered to the daemon, which then resets
//! them instead of letting them bypass the mesh), tells HBONE peers with GOAWAY, and waits for
//! the flows in progress, up to `--drain-timeout`, before it detaches capture and exits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Drain state shared by the listeners, the flows and the main task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drain {
    draining: Arc<watch::Sender<bool>>,
    active: Arc<AtomicUsize>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: Arc::new(watch::channel(false).0),
            active: Arc::default(),
        }
    }
}

/// Held by every flow in progress; dropping it ends the flow for [`Drain::wait_idle`].
#[derive(Debug)]
pub struct FlowGuard(Arc<AtomicUsize>);

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drain {
    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Whether draining has started; accept loops refuse new connections then.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Registers a flow in progress.
    pub fn guard(&self) -> FlowGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        FlowGuard(self.active.clone())
    }

    /// Flows in progress.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until no flow is in progress or `timeout` passes; returns the flows left.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.active();
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
