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
//! the maximum within a few windows of data (256 KiB to 8 MiB: 30 MiB moved).
//!
//! The window is the connection's (`SETTINGS_INITIAL_WINDOW_SIZE` moves the window of every
//! stream it carries, as the protocol defines it), so streams sharing a connection share its
//! size. It only grows. Shrinking it would strand streams: h2 applies a smaller setting to
//! the open streams without announcing the window they had freed but not yet announced (it
//! waits until that is half a window), so a stream whose data had all been read can be left
//! with no window on the sender's side and nothing more to read that would announce some; it
//! never moves again (the test `h2_strands_a_stream_when_its_window_shrinks`). So a flow that
//! was fast and then stops can hold up to the window its connection grew to; a pooled
//! connection that idles is released, and the next starts small again. The signal costs the
//! data path little: the copy loop's first write attempt reports whether the destination took
//! anything, a counter per flow is compared with the window once per chunk, and the kernel's
//! queue is read (one `ioctl`) only when a flow is about to double the window. With the start
//! window equal to the maximum nothing is tracked and the windows are fixed.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;

/// The window sizes a connection moves between (bytes, both within HTTP/2's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Where streams start.
    pub start: u32,
    /// The most a stream's window grows to.
    pub max: u32,
}

/// A connection's adaptive window, shared by its flows' copy loops, its pinger and its driver.
#[derive(Debug)]
pub struct Window {
    bounds: Bounds,
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

    /// At a keepalive tick: a window the driver could not put in force yet is asked for again.
    fn tick(&self) {
        if self.wanted.load(Ordering::Relaxed) != self.applied.load(Ordering::Relaxed) {
            self.wake_driver();
        }
    }

    fn wake_driver(&self) {
        self.resize.store(true, Ordering::Release);
        self.driver.wake();
    }
}

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

/// Pings the peer every `interval` (keepalive); at each answer, a `window` change the driver
/// could not put in force yet is asked for again. Returns when a PING goes unanswered within
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
