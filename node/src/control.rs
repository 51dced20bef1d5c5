//! The control channel: how the `lanup` CLI talks to the node running on
//! the same machine. A Unix socket in the state directory, mode 0600, or on
//! Windows a named pipe only SYSTEM, Administrators and the node's own user
//! may open (see [`crate::platform::channel`]); one JSON request per
//! connection, answered by one JSON line, or for a request that takes a
//! while (an apply) by a line per step and a last line with the result.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::{debug, warn};

use crate::platform::channel::{self, Stream};

/// The longest request line the node reads. Requests are small JSON
/// objects (a signed command is under 2 KiB); a longer line is refused
/// unread, so a runaway client cannot make the node buffer it.
pub const MAX_LINE: usize = 64 * 1024;

/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Control connections served at once; more are told the node is busy.
const MAX_CLIENTS: usize = 16;

/// What the CLI can ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlRequest {
    /// Every node of the site, from heartbeats.
    Status,
    /// The peers this node is connected to.
    Peers,
    /// Poll the origin now (on the fetcher).
    Check,
    /// Install a staged release now; answered step by step.
    Apply { version: String },
    /// A signed rollout command to check, follow and gossip to the site.
    Rollout {
        signed: lanup_protocol::rollout::SignedCommand,
    },
    /// Change `change` from request to result, from the audit logs of
    /// this node and its peers.
    History { change: String },
    /// An admin-signed revocation list to take and pass on to the site.
    Revoke {
        signed: lanup_protocol::membership::Signed,
    },
}

/// A request on its way to the node, with where to send the answer's
/// lines. The answer ends when the sender is dropped.
pub type Incoming = (ControlRequest, mpsc::Sender<serde_json::Value>);

/// The state directory's lock (`STATE/node.lock`), held for as long as
/// the node runs and released when dropped (or when the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// Takes the state directory's lock, or fails when another node holds it:
/// two nodes on one state directory would recover the same journal, take
/// each other's control channel and apply over each other. Taken before
/// anything else touches the directory.
pub fn lock_state(state: &Path) -> Result<StateLock> {
    let path = state.join("node.lock");
    // Held open read-only (made first if missing): a file open for
    // writing would keep the state's filesystem from being remounted
    // read-only.
    let file = match std::fs::File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            std::fs::File::open(&path)
        }
        opened => opened,
    }
    .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(StateLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another node is running on {}", state.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Listens on the state directory's channel; the future it returns accepts
/// clients and hands their requests to the node, until dropped.
pub fn listen(
    state: &Path,
    node: mpsc::Sender<Incoming>,
) -> Result<impl std::future::Future<Output = ()>> {
    let mut listener = channel::bind(state)?;
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    Ok(async move {
        loop {
            let stream = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file handles, say: wait rather than spin.
                    warn!(error = %e, "the control channel cannot accept");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                let busy = serde_json::json!({ "error": format!("the node is serving {MAX_CLIENTS} control connections already; try again") });
                channel::try_say(&stream, format!("{busy}\n").as_bytes());
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, node).await {
                    debug!(error = %format!("{e:#}"), "control request failed");
                }
                drop(slot);
            });
        }
    })
}

/// Reads the request line: at most [`MAX_LINE`] bytes, within
/// [`READ_TIMEOUT`].
async fn read_request(read: tokio::io::ReadHalf<Stream>) -> Result<ControlRequest, String> {
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
    let line = match tokio::time::timeout(READ_TIMEOUT, lines.next()).await {
        Err(_) => return Err(format!("no request line within {READ_TIMEOUT:?}")),
        Ok(None) => return Err("connection closed before a request".into()),
        Ok(Some(Err(LinesCodecError::MaxLineLengthExceeded))) => {
            return Err(format!(
                "control request longer than {MAX_LINE} bytes; refused unread"
            ))
        }
        Ok(Some(Err(LinesCodecError::Io(e)))) => return Err(format!("reading the request: {e}")),
        Ok(Some(Ok(line))) => line,
    };
    serde_json::from_str(line.trim()).map_err(|e| {
        let name: String = line.chars().take(40).collect();
        format!("malformed control request ({e}) starting {name:?}")
    })
}

async fn answer(stream: Stream, node: mpsc::Sender<Incoming>) -> Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let request = match read_request(read).await {
        Ok(r) => r,
        Err(reason) => {
            let line = serde_json::json!({ "error": reason });
            write.write_all(format!("{line}\n").as_bytes()).await?;
            anyhow::bail!(reason);
        }
    };
    let (tx, mut rx) = mpsc::channel(64);
    node.send((request, tx)).await.context("node stopped")?;
    while let Some(line) = rx.recv().await {
        write.write_all(line.to_string().as_bytes()).await?;
        write.write_all(b"\n").await?;
    }
    Ok(())
}

/// How long a node may take to say anything on its control socket: a node
/// whose loop is wedged must not hang the CLI. An apply sends a line per
/// step; its steps wait for the application ([`APPLY_LINE_TIMEOUT`]).
pub const LINE_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest an apply step may take: stopping the application, its
/// health wait and its health command, with room to spare.
pub const APPLY_LINE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the CLI keeps knocking on a socket that exists but refuses:
/// a node handing over to a new lanup, or restarted by its service
/// manager, listens again within moments, and a command given meanwhile
/// should reach it rather than fail.
pub const REFUSED_PATIENCE: Duration = Duration::from_secs(3);

/// Connects to the node on `state`, trying again for [`REFUSED_PATIENCE`]
/// while it refuses (no node ever listening there fails at once).
async fn connect(state: &Path) -> std::io::Result<Stream> {
    let until = tokio::time::Instant::now() + REFUSED_PATIENCE;
    loop {
        match channel::connect(state).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Sends `request` to the node whose state directory is `state`; returns
/// its answer (the last line, for an answer given step by step).
pub async fn ask(state: &Path, request: ControlRequest) -> Result<serde_json::Value> {
    ask_each(state, request, |_| {}).await
}

/// Sends `request` and hands every line of the answer to `each` as it
/// arrives; returns the last one. A node that says nothing for
/// [`LINE_TIMEOUT`] ([`APPLY_LINE_TIMEOUT`] during an apply) is reported,
/// not waited for.
pub async fn ask_each(
    state: &Path,
    request: ControlRequest,
    mut each: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value> {
    let address = channel::address(state);
    let patience = match request {
        ControlRequest::Apply { .. } => APPLY_LINE_TIMEOUT,
        _ => LINE_TIMEOUT,
    };
    let no_answer = || {
        anyhow::anyhow!(
            "the node on {} accepts connections but has not answered for {} s; it may be wedged (see its log; systemd's watchdog restarts a wedged node)",
            address,
            patience.as_secs()
        )
    };
    let stream = tokio::time::timeout(patience, connect(state))
        .await
        .map_err(|_| no_answer())?
        .with_context(|| {
            format!(
                "no node answers on {} (is `lanup node --state {}` running?)",
                address,
                state.display()
            )
        })?;
    let (read, mut write) = tokio::io::split(stream);
    tokio::time::timeout(
        patience,
        write.write_all(format!("{}\n", serde_json::to_string(&request)?).as_bytes()),
    )
    .await
    .map_err(|_| no_answer())??;
    let mut lines = BufReader::new(read).lines();
    let mut last = None;
    while let Some(line) = tokio::time::timeout(patience, lines.next_line())
        .await
        .map_err(|_| no_answer())??
    {
        let value: serde_json::Value =
            serde_json::from_str(line.trim()).context("malformed answer from the node")?;
        each(&value);
        last = Some(value);
    }
    last.context("the node closed the control connection without answering")
}
