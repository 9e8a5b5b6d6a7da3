//! Receive windows that grow for flows whose destination keeps up, and the connection's
//! keepalive.
//!
//! A stream's HTTP/2 receive window is what its sender may have outstanding before the
//! receiving daemon has passed it on. When the destination reads slowly (or not at all), that
//! much waits in the receiving daemon's memory, per stream. A bulk transfer needs a large window
//! (the data in the TCP buffers along the path counts against it: megabytes at these rates); a
//! destination that does not keep up gains nothing from one. So each connection's streams start
//! at `--hbone-stream-window-start`, and the window doubles, up to `--hbone-stream-window`,
//! each time one of its flows has passed two windows' worth of data on to a destination that
//! keeps up: its socket was never found still full (a write that took nothing), and when the
//! flow has moved its two windows, the kernel holds less than a window of it unacknowledged
//! by the destination. The second check matters because the kernel's buffers towards a pod
//! take megabytes before a write would block: a destination that stops reading would
//! otherwise look fast for several windows. So a flow whose destination does not keep up
//! keeps the start window, and that is what it may hold in this daemon; a bulk flow reaches
//! the maximum within a few windows of data (256 KiB to 8 MiB: 30 MiB moved). A destination
//! that kept up and then stops (a write to it waits 100 ms, [`STALLED_AFTER`]) puts the window
//! back to the start: what the sender already had in flight still arrives, but no more than
//! the start window follows it.
//!
//! The window is the connection's (`SETTINGS_INITIAL_WINDOW_SIZE` moves the window of every
//! stream it carries, as the protocol defines it), so streams sharing a connection share its
//! size. A connection that passed nothing on for a keepalive interval returns to the start
//! window. The signal costs the data path little: the copy loop's first write attempt
//! reports whether the destination took anything, a counter per flow is compared with the
//! window once per chunk, the kernel's queue is read (one `ioctl`) only when a flow is about
//! to double the window, and a timer runs only for a write that has to wait while the window
//! is above the start. With the start window equal to the maximum nothing is
//! tracked and the windows are fixed.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;

/// The window sizes a connection moves between (bytes, both within HTTP/2's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Where streams start, and where an idle connection returns.
    pub start: u32,
    /// The most a stream's window grows to.
    pub max: u32,
}

/// A connection's adaptive window, shared by its flows' copy loops, its pinger and its driver.
#[derive(Debug)]
pub struct Window {
    bounds: Bounds,
    /// Whether its flows passed anything on since the pinger's last tick.
    active: AtomicBool,
    /// The stream window wanted in force.
    wanted: AtomicU32,
    /// The stream window the driver last put in force.
    applied: AtomicU32,
    /// Set with `wanted`; the driver, woken through `driver`, takes it.
    resize: AtomicBool,
    driver: AtomicWaker,
}

/// One flow's progress towards a larger window: what it passed on since its destination last
/// refused data (or since the window last grew).
#[derive(Debug, Default)]
pub struct Progress {
    since: u64,
}

impl Window {
    /// A connection's shared state, with streams at `bounds.start`; `None` when the windows are
    /// fixed (start and maximum equal): nothing to track.
    pub fn new(bounds: Bounds) -> Option<Arc<Window>> {
        (bounds.start < bounds.max).then(|| {
            Arc::new(Window {
                bounds,
                active: AtomicBool::new(false),
                wanted: AtomicU32::new(bounds.start),
                applied: AtomicU32::new(bounds.start),
                resize: AtomicBool::new(false),
                driver: AtomicWaker::new(),
            })
        })
    }

    /// A flow passed `n` bytes on to its destination, whose socket took some at once
    /// (`refused` false) or was still full. Grows the connection's window when the flow has
    /// moved two windows without a refusal and `queued()`, the bytes the kernel holds towards
    /// the destination (asked only then), is less than a window.
    pub fn passed_on(
        &self,
        progress: &mut Progress,
        n: usize,
        refused: bool,
        queued: impl FnOnce() -> Option<usize>,
    ) {
        // Loaded first so that a busy connection does not write the shared line per chunk.
        if n > 0 && !self.active.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::Relaxed);
        }
        if refused {
            progress.since = 0;
            return;
        }
        progress.since += n as u64;
        let now = self.wanted.load(Ordering::Relaxed);
        if let Some(next) = grown(now, progress.since, self.bounds) {
            progress.since = 0;
            if queued().is_none_or(|q| q >= now as usize) {
                return;
            }
            // Another flow may have grown it meanwhile; never shrink it here.
            if self.wanted.fetch_max(next, Ordering::Relaxed) < next {
                self.wake_driver();
            }
        }
    }

    /// Whether the window has grown: only then is a destination's stall worth watching for.
    pub fn grown(&self) -> bool {
        self.wanted.load(Ordering::Relaxed) > self.bounds.start
    }

    /// A flow's destination has taken nothing for [`STALLED_AFTER`]: back to the start window,
    /// since more window would only let more wait in this daemon.
    pub fn stalled(&self) {
        if self.grown() {
            self.wanted.store(self.bounds.start, Ordering::Relaxed);
            self.wake_driver();
        }
    }

    /// Ready when a different stream window is wanted in force; the driver then calls
    /// [`Window::apply`]. Polled by the connection's driver each time it runs, so it costs an
    /// atomic load when nothing changed.
    pub fn poll_resize(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.resize.load(Ordering::Acquire) && self.resize.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.driver.register(cx.waker());
        if self.resize.swap(false, Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// [`Window::poll_resize`] as a future.
    pub async fn resized(&self) {
        poll_fn(|cx| self.poll_resize(cx)).await;
    }

    /// Puts the wanted stream window in force with `set` (the h2 connection's
    /// `set_initial_window_size`); a refusal (its previous SETTINGS not yet acknowledged) is
    /// retried at the pinger's next tick.
    pub fn apply<E: std::fmt::Display>(&self, set: impl FnOnce(u32) -> Result<(), E>) {
        let want = self.wanted.load(Ordering::Relaxed);
        if want == self.applied.load(Ordering::Relaxed) {
            return;
        }
        match set(want) {
            Ok(()) => {
                self.applied.store(want, Ordering::Relaxed);
                tracing::debug!(window = want, "HBONE stream window changed");
            }
            Err(error) => {
                tracing::debug!(%error, window = want, "HBONE stream window not changed yet");
            }
        }
    }

    /// At a keepalive tick: back to the start window if nothing was passed on since the last
    /// one; a window the driver could not put in force yet is asked for again.
    fn tick(&self) {
        let idle = !self.active.swap(false, Ordering::Relaxed);
        if idle && self.wanted.load(Ordering::Relaxed) != self.bounds.start {
            self.wanted.store(self.bounds.start, Ordering::Relaxed);
            self.wake_driver();
        } else if self.wanted.load(Ordering::Relaxed) != self.applied.load(Ordering::Relaxed) {
            self.wake_driver();
        }
    }

    fn wake_driver(&self) {
        self.resize.store(true, Ordering::Release);
        self.driver.wake();
    }
}

/// How long a write to a flow's destination may wait before the destination counts as
/// stalled ([`Window::stalled`]): far longer than a reading application's scheduling delays.
pub const STALLED_AFTER: Duration = Duration::from_millis(100);

/// The window after a flow moved `since` bytes without a refusal, or `None` to keep `now`:
/// doubled (up to the maximum) once it moved two windows.
fn grown(now: u32, since: u64, bounds: Bounds) -> Option<u32> {
    (now < bounds.max && since >= 2 * u64::from(now)).then(|| now.saturating_mul(2).min(bounds.max))
}

/// [`Window::resized`] of a connection's window, if it has one; never otherwise.
pub async fn resized(window: Option<&Window>) {
    match window {
        Some(w) => w.resized().await,
        None => std::future::pending().await,
    }
}

/// How a connection's pinger ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A PING went unanswered for the keepalive timeout: the peer or the path is gone.
    Silent,
    /// The connection itself has ended.
    Closed,
}

/// Pings the peer every `interval` (keepalive); at each answer, a `window` that passed nothing
/// on since the previous one returns to its start. Returns when a PING goes unanswered within
/// `timeout` or the connection ends.
pub async fn pinger(
    mut ping: h2::PingPong,
    window: Option<Arc<Window>>,
    interval: Duration,
    timeout: Duration,
) -> Ended {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Ended::Closed,
            Err(_) => return Ended::Silent,
        }
        if let Some(w) = &window {
            w.tick();
        }
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
