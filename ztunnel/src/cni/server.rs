//! The CNI endpoint's socket: one request line from the plugin, one answer line back, per
//! connection. The socket file is mode 0600 in a 0700 directory (bound like the admin socket,
//! [`crate::admin::socket::bind`]), so only root on the node (the runtime that runs the
//! plugin) can announce pods; a pod cannot reach it, as it is not in any network namespace.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use ztunnel_cni::{Reply, Request};

use super::Announcement;

/// Longest request line accepted (a request is a few hundred bytes).
const MAX_REQUEST: u64 = 64 * 1024;
/// A plugin that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the main task.
const QUEUE: usize = 64;

/// Serves the plugin's requests on `listener` (a task of the calling runtime); each one
/// arrives on the returned channel for the main task, which owns capture, to answer.
pub fn spawn(
    listener: std::os::unix::net::UnixListener,
    serving: crate::handover::Serving,
) -> std::io::Result<mpsc::Receiver<Announcement>> {
    let listener = UnixListener::from_std(listener)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(serving.run(accept_loop(listener, tx)));
    Ok(rx)
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Announcement>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cni: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<Announcement>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(request) => forward(request, &tx).await,
            Err(e) => Reply::Failed {
                message: format!("unreadable request: {e}"),
                retry: false,
            },
        },
        Ok(Ok(_)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cni: reading a request failed");
            return;
        }
        Err(_) => {
            tracing::debug!("cni: no request within {REQUEST_TIMEOUT:?}");
            return;
        }
    };
    if let Err(e) = write.write_all(reply.to_line().as_bytes()).await {
        tracing::debug!(error = %e, "cni: the plugin left before its answer");
    }
}

/// Hands the request to the main task and waits for its answer.
async fn forward(request: Request, tx: &mpsc::Sender<Announcement>) -> Reply {
    let (reply, answer) = oneshot::channel();
    let stopping = || Reply::Failed {
        message: "the daemon is stopping".into(),
        retry: true,
    };
    if tx.send(Announcement { request, reply }).await.is_err() {
        return stopping();
    }
    answer.await.unwrap_or_else(|_| stopping())
}
