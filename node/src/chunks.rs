//! Chunk bodies between peers, over raw libp2p streams.
//!
//! The asker opens a stream and writes the 32-byte hash it wants; the holder
//! answers one status byte (`0` held, `1` not held) and, when held, the
//! chunk's length (8 bytes, little-endian) and its bytes. One chunk per
//! stream keeps the protocol trivial; yamux makes streams cheap. The asker
//! checks the length against the manifest and the bytes against the hash
//! before anything is stored.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{AsyncReadExt, AsyncWriteExt, StreamExt};
use lanup_protocol::chunk::{Chunk, MAX_CHUNK};
use lanup_protocol::Hash;
use libp2p::PeerId;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn};

use crate::network::CHUNK_PROTOCOL;
use crate::store::ChunkStore;
use crate::throttle::Throttle;

/// How long a peer may send nothing (no answer, no body byte) before the
/// request is given up and the chunk asked elsewhere. A peer that is slow
/// but sending is waited for; one that stopped is not.
pub const CHUNK_STALL: Duration = Duration::from_secs(5);

/// Chunks served at once; further requests wait (and beyond libp2p's small
/// queue of incoming streams, are dropped: the asker tries again). Each
/// holds up to a chunk (4 MiB) in memory.
pub const MAX_SERVING: usize = 16;

/// Bytes read from a peer between two looks at the stall timer.
const READ_BLOCK: usize = 64 * 1024;

/// How many times a chunk request is sent when the peer drops the stream
/// before answering.
const OPEN_ATTEMPTS: u64 = 4;

/// Why a chunk did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The peer sent bytes that are not the chunk: it must be distrusted.
    #[error("peer {peer} sent bytes that are not chunk {hash}")]
    Corrupt { peer: PeerId, hash: Hash },
    /// The peer says it does not hold the chunk (any more).
    #[error("peer {peer} does not hold chunk {hash}")]
    NotHeld { peer: PeerId, hash: Hash },
    /// The peer stopped sending for [`CHUNK_STALL`].
    #[error("peer {peer} stopped sending chunk {hash}")]
    Stalled { peer: PeerId, hash: Hash },
    /// This node could not store the chunk: its own disk is at fault, and
    /// asking again (anyone) will not help until that changes.
    #[error("cannot store chunk {hash}: {reason}")]
    LocalDisk {
        peer: PeerId,
        hash: Hash,
        reason: String,
    },
    /// Anything else: the chunk can be asked again, there or elsewhere.
    #[error("chunk {hash} from {peer}: {reason:#}")]
    Failed {
        peer: PeerId,
        hash: Hash,
        reason: anyhow::Error,
    },
}

/// Reads a chunk's length and bytes from `stream`, each read within
/// [`CHUNK_STALL`]; None for a length other than the chunk's (a lie
/// about it, not a hiccup).
async fn read_body(
    stream: &mut libp2p::Stream,
    chunk: &Chunk,
    failed: &impl Fn(anyhow::Error) -> ChunkError,
    stalled: &impl Fn() -> ChunkError,
) -> Result<Option<Vec<u8>>, ChunkError> {
    let mut len = [0u8; 8];
    tokio::time::timeout(CHUNK_STALL, stream.read_exact(&mut len))
        .await
        .map_err(|_| stalled())?
        .map_err(|e| failed(e.into()))?;
    let len = u64::from_le_bytes(len);
    if len != chunk.size {
        return Ok(None);
    }
    let mut data = vec![0u8; len as usize];
    let mut at = 0;
    while at < data.len() {
        let end = (at + READ_BLOCK).min(data.len());
        let n = tokio::time::timeout(CHUNK_STALL, stream.read(&mut data[at..end]))
            .await
            .map_err(|_| stalled())?
            .map_err(|e| failed(e.into()))?;
        if n == 0 {
            return Err(failed(anyhow::anyhow!(
                "stream ended after {at} of {len} bytes"
            )));
        }
        at += n;
    }
    Ok(Some(data))
}

/// Asks `peer` for `chunk`, checks it, and stores it.
pub async fn fetch(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    chunk: Chunk,
    store: ChunkStore,
) -> Result<(), ChunkError> {
    let failed = |reason: anyhow::Error| ChunkError::Failed {
        peer,
        hash: chunk.hash,
        reason,
    };
    let stalled = || ChunkError::Stalled {
        peer,
        hash: chunk.hash,
    };
    // A stream that arrives while the peer's accept queue is full is
    // dropped unanswered (libp2p-stream queues very few); asking again at
    // once is cheap, since nothing was sent yet.
    let mut attempt = 0;
    let (mut stream, status) = loop {
        attempt += 1;
        let opened = tokio::time::timeout(CHUNK_STALL, async {
            let mut stream = control
                .open_stream(peer, CHUNK_PROTOCOL)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            stream.write_all(&chunk.hash.0).await?;
            stream.flush().await?;
            let mut status = [0u8; 1];
            stream.read_exact(&mut status).await?;
            anyhow::Ok((stream, status[0]))
        })
        .await
        .map_err(|_| stalled())?;
        match opened {
            Ok(answer) => break answer,
            Err(e) if attempt >= OPEN_ATTEMPTS => return Err(failed(e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(5 * attempt)).await,
        }
    };
    if status != 0 {
        return Err(ChunkError::NotHeld {
            peer,
            hash: chunk.hash,
        });
    }
    let Some(data) = read_body(&mut stream, &chunk, &failed, &stalled).await? else {
        return Err(ChunkError::Corrupt {
            peer,
            hash: chunk.hash,
        });
    };
    let stored = tokio::task::spawn_blocking(move || store.put(&chunk, &data))
        .await
        .map_err(|e| ChunkError::Failed {
            peer,
            hash: chunk.hash,
            reason: e.into(),
        })?;
    match stored {
        Ok(()) => Ok(()),
        Err(crate::store::StoreError::Corrupt { .. }) => Err(ChunkError::Corrupt {
            peer,
            hash: chunk.hash,
        }),
        Err(e) => Err(ChunkError::LocalDisk {
            peer,
            hash: chunk.hash,
            reason: e.to_string(),
        }),
    }
}

/// Serves chunks from `store` to every peer that asks and is admitted
/// (a member of the site, once only members are), no faster in total
/// than `lan` allows and at most [`MAX_SERVING`] at once, until the stream
/// of incoming streams ends. A chunk found damaged on disk is removed, the
/// asker told it is not held, and `damaged` told of it (so the node stops
/// offering it and fetches it again).
pub async fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    store: ChunkStore,
    lan: Throttle,
    damaged: mpsc::Sender<Hash>,
    metrics: crate::metrics::Metrics,
    admission: tokio::sync::watch::Receiver<crate::membership::Admission>,
) {
    let faulty = fault_corrupt_chunks();
    let slots = Arc::new(Semaphore::new(MAX_SERVING));
    while let Some((peer, stream)) = incoming.next().await {
        if !admission.borrow().admits(&peer) {
            // Dropped unanswered: a stranger gets no chunk.
            debug!(%peer, "refused a chunk request from a peer that is not a member of the site");
            drop(stream);
            continue;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let store = store.clone();
        let lan = lan.clone();
        let damaged = damaged.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match serve_one(stream, &store, &lan, faulty, &damaged).await {
                Ok(Some(bytes)) => {
                    metrics.chunks_served.inc();
                    metrics.bytes_served.inc_by(bytes);
                }
                Ok(None) => {}
                Err(e) => debug!(%peer, error = %format!("{e:#}"), "serving a chunk failed"),
            }
            drop(slot);
        });
    }
}

/// Bytes written to a stream between two looks at the rate cap.
const SERVE_BLOCK: usize = 64 * 1024;

async fn serve_one(
    mut stream: libp2p::Stream,
    store: &ChunkStore,
    lan: &Throttle,
    faulty: Fault,
    damaged: &mpsc::Sender<Hash>,
) -> Result<Option<u64>> {
    let mut hash = [0u8; 32];
    tokio::time::timeout(CHUNK_STALL, stream.read_exact(&mut hash))
        .await
        .context("request timed out")??;
    let hash = Hash(hash);
    if faulty == Fault::Silent {
        // The lying peer of the tests: it offered the chunk, took the
        // request, and never answers.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(None);
    }
    let data = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.get_verified(&hash)).await?
    };
    let mut sent = None;
    match data {
        Ok(mut data) if data.len() <= MAX_CHUNK => {
            if faulty == Fault::Corrupt {
                if let Some(b) = data.last_mut() {
                    *b ^= 0xff;
                }
            }
            write(&mut stream, &[0]).await?;
            write(&mut stream, &(data.len() as u64).to_le_bytes()).await?;
            for block in data.chunks(SERVE_BLOCK) {
                lan.take(block.len()).await;
                write(&mut stream, block).await?;
            }
            sent = Some(data.len() as u64);
        }
        Ok(_) => write(&mut stream, &[1]).await?,
        // Damaged (and now removed) or gone: the node offered it, so it
        // must stop offering it and fetch it again.
        Err(_) => {
            let _ = damaged.try_send(hash);
            write(&mut stream, &[1]).await?;
        }
    }
    tokio::time::timeout(CHUNK_STALL, stream.close())
        .await
        .context("the asker stopped reading")??;
    Ok(sent)
}

/// Writes `bytes`, giving up when the asker reads nothing for
/// [`CHUNK_STALL`].
async fn write(stream: &mut libp2p::Stream, bytes: &[u8]) -> Result<()> {
    tokio::time::timeout(CHUNK_STALL, stream.write_all(bytes))
        .await
        .context("the asker stopped reading")??;
    Ok(())
}

/// A fault for the tests, honoured by debug builds only: with
/// `LANUP_FAULT_CORRUPT_CHUNKS=1` the node flips a byte of every chunk it
/// serves, with `LANUP_FAULT_SILENT_CHUNKS=1` it takes requests and never
/// answers them, so the tests can watch its peers refuse it and ban it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Corrupt,
    Silent,
}

fn fault_corrupt_chunks() -> Fault {
    let on = |name| cfg!(debug_assertions) && std::env::var_os(name).is_some();
    if on("LANUP_FAULT_CORRUPT_CHUNKS") {
        warn!("fault injection: serving corrupted chunks (LANUP_FAULT_CORRUPT_CHUNKS)");
        Fault::Corrupt
    } else if on("LANUP_FAULT_SILENT_CHUNKS") {
        warn!("fault injection: never answering chunk requests (LANUP_FAULT_SILENT_CHUNKS)");
        Fault::Silent
    } else {
        Fault::None
    }
}
