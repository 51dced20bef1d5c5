//! Chunk bodies between peers, over raw libp2p streams.
//!
//! The asker opens a stream and writes the 32-byte hash it wants; the holder
//! answers one status byte (`0` held, `1` not held) and, when held, the
//! chunk's length (8 bytes, little-endian) and its bytes. One chunk per
//! stream keeps the protocol trivial; yamux makes streams cheap. The asker
//! checks the length against the manifest and the bytes against the hash
//! before anything is stored.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{AsyncReadExt, AsyncWriteExt, StreamExt};
use lanup_protocol::chunk::{Chunk, MAX_CHUNK};
use lanup_protocol::Hash;
use libp2p::PeerId;
use tracing::{debug, warn};

use crate::network::CHUNK_PROTOCOL;
use crate::store::ChunkStore;
use crate::throttle::Throttle;

/// How long one chunk may take from request to last byte.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a chunk request is sent when the peer drops the stream
/// before answering.
const OPEN_ATTEMPTS: u64 = 4;

/// Why a chunk did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The peer sent bytes that are not the chunk: it must be distrusted.
    #[error("peer {peer} sent bytes that are not chunk {hash}")]
    Corrupt { peer: PeerId, hash: Hash },
    /// Anything else: the chunk can be asked again, there or elsewhere.
    #[error("chunk {hash} from {peer}: {reason:#}")]
    Failed {
        peer: PeerId,
        hash: Hash,
        reason: anyhow::Error,
    },
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
    let data = tokio::time::timeout(CHUNK_TIMEOUT, async {
        // A stream that arrives while the peer's accept queue is full is
        // dropped unanswered (libp2p-stream queues very few); asking again
        // at once is cheap, since nothing was sent yet.
        let mut attempt = 0;
        let (mut stream, status) = loop {
            attempt += 1;
            let opened = async {
                let mut stream = control
                    .open_stream(peer, CHUNK_PROTOCOL)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                stream.write_all(&chunk.hash.0).await?;
                stream.flush().await?;
                let mut status = [0u8; 1];
                stream.read_exact(&mut status).await?;
                anyhow::Ok((stream, status[0]))
            }
            .await;
            match opened {
                Ok(answer) => break answer,
                Err(e) if attempt >= OPEN_ATTEMPTS => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(5 * attempt)).await,
            }
        };
        if status != 0 {
            bail!("peer does not hold it");
        }
        let mut len = [0u8; 8];
        stream.read_exact(&mut len).await?;
        let len = u64::from_le_bytes(len);
        if len != chunk.size {
            // A wrong length is a lie about the chunk, not a hiccup.
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        Ok(Some(data))
    })
    .await
    .map_err(|_| failed(anyhow::anyhow!("timed out")))?
    .map_err(failed)?;
    let Some(data) = data else {
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
        Err(e) => Err(ChunkError::Failed {
            peer,
            hash: chunk.hash,
            reason: e.into(),
        }),
    }
}

/// Serves chunks from `store` to every peer that asks, no faster in total
/// than `lan` allows, until the stream of incoming streams ends.
pub async fn serve(mut incoming: libp2p_stream::IncomingStreams, store: ChunkStore, lan: Throttle) {
    let faulty = fault_corrupt_chunks();
    while let Some((peer, stream)) = incoming.next().await {
        let store = store.clone();
        let lan = lan.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &store, &lan, faulty).await {
                debug!(%peer, error = %format!("{e:#}"), "serving a chunk failed");
            }
        });
    }
}

/// Bytes written to a stream between two looks at the rate cap.
const SERVE_BLOCK: usize = 64 * 1024;

async fn serve_one(
    mut stream: libp2p::Stream,
    store: &ChunkStore,
    lan: &Throttle,
    faulty: bool,
) -> Result<()> {
    let mut hash = [0u8; 32];
    tokio::time::timeout(CHUNK_TIMEOUT, stream.read_exact(&mut hash))
        .await
        .context("request timed out")??;
    let hash = Hash(hash);
    let data = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.get_verified(&hash)).await?
    };
    match data {
        Ok(mut data) if data.len() <= MAX_CHUNK => {
            if faulty {
                if let Some(b) = data.last_mut() {
                    *b ^= 0xff;
                }
            }
            stream.write_all(&[0]).await?;
            stream.write_all(&(data.len() as u64).to_le_bytes()).await?;
            for block in data.chunks(SERVE_BLOCK) {
                lan.take(block.len()).await;
                stream.write_all(block).await?;
            }
        }
        _ => stream.write_all(&[1]).await?,
    }
    stream.close().await?;
    Ok(())
}

/// A fault for the tests, honoured by debug builds only: with
/// `LANUP_FAULT_CORRUPT_CHUNKS=1` the node flips a byte of every chunk it
/// serves, so the tests can watch its peers refuse the bytes and ban it.
fn fault_corrupt_chunks() -> bool {
    let on = cfg!(debug_assertions) && std::env::var_os("LANUP_FAULT_CORRUPT_CHUNKS").is_some();
    if on {
        warn!("fault injection: serving corrupted chunks (LANUP_FAULT_CORRUPT_CHUNKS)");
    }
    on
}
