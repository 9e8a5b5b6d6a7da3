//! Ctrl-C and SIGTERM for the commands that build clusters (`demo`, `bench`, `overhead`,
//! `scale`, `soak`). A signal can arrive at any point: while namespaces are being created, while
//! traffic runs, while Envoy starts. Unwinding every one of those paths to run the clusters'
//! `Drop` is not possible from a signal, so a watcher thread does the teardown itself: it kills
//! what runs in this process's namespaces, deletes them and their work directories, and exits.
//!
//! A command that waits for the user on purpose (the demo once its report is printed) calls
//! [`wait`] instead, and then tears down in order as usual.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Where a signal goes while a command is in [`wait`]; `None` means "tear down and exit".
static WAITER: OnceLock<Mutex<Option<mpsc::Sender<i32>>>> = OnceLock::new();

/// A process that owns clusters on this one's behalf (the background demo while `--up` waits
/// for it); a signal stops it too, and waits for its orderly teardown.
static DELEGATE: AtomicI32 = AtomicI32::new(0);

/// Makes a signal also stop `pid` (see [`DELEGATE`]).
pub fn stop_with_me(pid: u32) {
    DELEGATE.store(i32::try_from(pid).unwrap_or(0), Ordering::Relaxed);
}

fn stop_delegate() {
    use nix::sys::signal::{kill, Signal};
    let pid = DELEGATE.load(Ordering::Relaxed);
    if pid <= 0 {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    // It is this process's child: reap it, or it would linger as a zombie and look alive.
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while Instant::now() < deadline {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(100)),
            _ => return,
        }
    }
}

fn waiter() -> &'static Mutex<Option<mpsc::Sender<i32>>> {
    WAITER.get_or_init(|| Mutex::new(None))
}

/// Starts the watcher thread. Handlers (unlike a blocked signal mask) are reset on exec, so
/// the daemons and apps this process starts still see SIGTERM normally.
pub fn install() -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("xtask-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let waiting = waiter().lock().map(|mut w| w.take()).unwrap_or(None);
                if let Some(tx) = waiting {
                    if tx.send(sig).is_ok() {
                        continue;
                    }
                }
                eprintln!(
                    "\nxtask: {} received: removing this run's namespaces, processes and files ...",
                    name(sig)
                );
                stop_delegate();
                // Twice: the main thread keeps running meanwhile and may have created one
                // more namespace after the first listing.
                mesh_tests::cluster::remove_own();
                std::thread::sleep(Duration::from_millis(300));
                mesh_tests::cluster::remove_own();
                eprintln!("xtask: cleaned up");
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Blocks until SIGINT or SIGTERM and returns it, leaving teardown to the caller. Without
/// [`install`] it never returns.
pub fn wait() -> i32 {
    let (tx, rx) = mpsc::channel();
    if let Ok(mut w) = waiter().lock() {
        *w = Some(tx);
    }
    rx.recv().unwrap_or(SIGTERM)
}

/// `SIGINT` or `SIGTERM`, for messages.
pub fn name(sig: i32) -> &'static str {
    if sig == SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}
