//! Downloading a release's missing chunks from the origin with HTTP Range
//! requests, and assembling verified files from the chunk store.
//!
//! What to ask for is decided in `lanup_protocol::plan`; this module moves
//! the bytes. Every chunk is checked against its hash before it is stored.
//! Timeouts are on progress only (no byte for [`Origin::stall`]), a cut
//! request resumes at the byte where it stopped, the next request is sent
//! before the current one ends, and an origin that ignores Range is read
//! once per file.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lanup_protocol::chunk::Chunk;
use lanup_protocol::manifest::check_file_name;
use lanup_protocol::plan::{next_request, Cursor};
use lanup_protocol::{Hash, Manifest};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tracing::{debug, info};

use crate::store::{ChunkStore, StoreError};
use crate::throttle::Throttle;

/// Characters escaped in one URL path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// How many requests in a row may end with no byte received before a
/// download gives up (and the node backs off). A request that received
/// anything resets the count: on a slow or flaky link progress, not time,
/// decides.
const QUIET_ATTEMPTS: u32 = 5;

/// How many wanted bytes may be left of the request being read when the
/// next one is sent, so that the uplink does not idle for a round trip
/// between requests. The two answers share the link for that long.
const PIPELINE_AHEAD: u64 = 256 * 1024;

/// What a fetch took from the origin.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// Body bytes received from the origin.
    pub bytes: u64,
    /// Chunks fetched and stored.
    pub chunks: usize,
    /// HTTP requests sent (resumes and pipelined ones included).
    pub requests: usize,
    /// Bytes of the release already in the store before the fetch.
    pub already_held: u64,
    /// Patch segments applied, packed chunks and bundles decoded.
    pub patches: usize,
    pub packed: usize,
    pub bundles: usize,
    /// Runs of chunks taken compressed together.
    pub runs: usize,
}

/// The origin a node downloads from, and how.
#[derive(Debug, Clone)]
pub struct Origin {
    pub client: reqwest::Client,
    /// The release directory's URL.
    pub base: String,
    /// The uplink cap (`--wan-rate`).
    pub wan: Throttle,
    /// No byte for this long and a request is given up and resumed at the
    /// byte where it stopped. There is no limit on a whole request: on a
    /// 64 kbit/s link one 4 MiB chunk takes nine minutes.
    pub stall: Duration,
    /// Body bytes received, counted as they arrive (not per chunk): the
    /// node's measure of progress on a slow link.
    pub received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Origin {
    /// An HTTP client for an origin: connections and every wait for bytes
    /// are bounded by `stall`, whole transfers by nothing.
    pub fn client(stall: Duration) -> anyhow::Result<reqwest::Client> {
        Ok(crate::http::builder()?
            .connect_timeout(stall)
            .read_timeout(stall)
            .build()?)
    }
}

/// Why a download from the origin stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The origin's bytes are not the signed release: asking again gets
    /// the same bytes.
    #[error("the origin serves a file that differs from its signed manifest ({url} bytes {start}..{end} are not chunk {hash}); republish the release")]
    Mismatch {
        url: String,
        start: u64,
        end: u64,
        hash: Hash,
    },
    /// This node cannot write what it received: its own disk, not the
    /// origin, is at fault.
    #[error("cannot store chunks from the origin on this node: {0}")]
    LocalDisk(#[source] StoreError),
    /// The origin answered with an error status.
    #[error("{url}: origin answered {status}")]
    Status { url: String, status: u16 },
    /// Requests kept ending without a byte (a stalled or unreachable
    /// origin).
    #[error("{0:#}")]
    Network(anyhow::Error),
}

/// The URL of a published file: `base` + the file name, each part escaped.
pub fn file_url(base: &str, name: &str) -> String {
    let mut url = base.trim_end_matches('/').to_owned();
    for part in name.split('/') {
        url.push('/');
        url.extend(utf8_percent_encode(part, SEGMENT));
    }
    url
}

/// One request's answer on its way: sent, headers awaited in a task of its
/// own so that the next request can be under way while this one is read.
struct Sent {
    file: String,
    cursor: Cursor,
    /// The byte the request starts at.
    start: u64,
    answer: tokio::task::JoinHandle<Result<reqwest::Response, Attempt>>,
}

/// How one request ended when it did not finish.
enum Attempt {
    /// Cut off or stalled: resumed where it stopped.
    Cut(anyhow::Error),
    /// Asking again will not help (for now): the download stops.
    Fatal(FetchError),
}

impl Origin {
    /// Sends a Range request for `[start, end)` of `file`.
    fn send(&self, file: &str, cursor: Cursor, start: u64, end: u64) -> Sent {
        let url = file_url(&self.base, file);
        let request = self
            .client
            .get(&url)
            .header(RANGE, format!("bytes={start}-{}", end - 1));
        let stall = self.stall;
        let answer = tokio::spawn(async move {
            let response = tokio::time::timeout(stall, request.send())
                .await
                .map_err(|_| Attempt::Cut(anyhow::anyhow!("GET {url}: no answer for {stall:?}")))?
                .map_err(|e| Attempt::Cut(anyhow::Error::new(e).context(format!("GET {url}"))))?;
            match response.status() {
                StatusCode::PARTIAL_CONTENT | StatusCode::OK => Ok(response),
                status => Err(Attempt::Fatal(FetchError::Status {
                    url,
                    status: status.as_u16(),
                })),
            }
        });
        Sent {
            file: file.to_owned(),
            cursor,
            start,
            answer,
        }
    }
}

/// Fetches every chunk of `manifest` that `store` lacks and `wanted` still
/// asks for, no faster than the origin's cap allows. `wanted` is asked
/// afresh before every request and as bytes arrive, so chunks that reach
/// the site another way meanwhile (or a role that ends) stop the download
/// of them. `on_chunk` is told of every chunk verified and stored.
///
/// Requests are Range requests of neighbouring missing chunks; the next is
/// sent before the current one ends. A cut or stalled request is resumed at
/// the byte where it stopped (the bytes of a chunk cut mid-way are kept).
/// An origin that ignores Range (answers 200) is read once, front to back,
/// taking every missing chunk of the file from that one answer.
pub async fn fetch_missing(
    origin: &Origin,
    manifest: &Manifest,
    store: &ChunkStore,
    wanted: impl Fn(&Hash) -> bool,
    mut on_chunk: impl FnMut(&Chunk),
) -> Result<FetchReport, FetchError> {
    let (mut held, mut report) = already_held(manifest, store).await?;
    let mut retry: Option<(String, Cursor)> = None;
    let mut ahead: Option<Sent> = None;
    let mut quiet = 0;
    loop {
        let held_now = &held;
        let sent = match next_sent(origin, manifest, &mut retry, &mut ahead, |h| {
            !held_now.contains(h) && wanted(h)
        }) {
            Next::Read(sent) => sent,
            Next::Again => continue,
            Next::Done => break,
        };
        report.requests += 1;
        let file = sent.file.clone();
        let mut cursor = sent.cursor.clone();
        let before = report.bytes;
        let read = read_answer(
            origin,
            manifest,
            store,
            sent,
            &mut cursor,
            &mut held,
            &wanted,
            &mut ahead,
            &mut report,
            &mut on_chunk,
        )
        .await;
        match read {
            Ok(()) => quiet = 0,
            Err(Attempt::Fatal(e)) => {
                if let Some(a) = ahead.take() {
                    a.answer.abort();
                }
                return Err(e);
            }
            Err(Attempt::Cut(e)) => {
                quiet = if report.bytes > before { 0 } else { quiet + 1 };
                if quiet >= QUIET_ATTEMPTS {
                    if let Some(a) = ahead.take() {
                        a.answer.abort();
                    }
                    let why = format!("{quiet} requests in a row to the origin received nothing");
                    return Err(FetchError::Network(e.context(why)));
                }
                info!(file = %file, at = cursor.position(), error = %format!("{e:#}"), "origin request cut; resuming where it stopped");
                if quiet > 0 {
                    tokio::time::sleep(Duration::from_millis(500 << quiet)).await;
                }
                retry = Some((file, cursor));
            }
        }
    }
    debug!(
        release = %manifest.release_name(),
        bytes = report.bytes,
        chunks = report.chunks,
        requests = report.requests,
        "origin requests done"
    );
    Ok(report)
}

/// The chunks of `manifest` the store holds (looked at off the node's
/// task), and a report that counts their bytes.
async fn already_held(
    manifest: &Manifest,
    store: &ChunkStore,
) -> Result<(HashSet<Hash>, FetchReport), FetchError> {
    let chunks = lanup_protocol::manifest::unique_chunks(&manifest.files);
    let store = store.clone();
    let hashes: Vec<Hash> = chunks.keys().copied().collect();
    let held: HashSet<Hash> =
        tokio::task::spawn_blocking(move || hashes.into_iter().filter(|h| store.has(h)).collect())
            .await
            .map_err(|e| FetchError::Network(e.into()))?;
    let report = FetchReport {
        already_held: held.iter().filter_map(|h| chunks.get(h)).sum(),
        ..FetchReport::default()
    };
    Ok((held, report))
}

/// What a download reads next.
enum Next {
    Read(Sent),
    /// Nothing to read from this one (what it held came another way).
    Again,
    /// Nothing wanted is left.
    Done,
}

/// The next answer to read: a cut request resumed where it stopped, the
/// request sent ahead, or a new one for the next chunks `want`ed.
fn next_sent(
    origin: &Origin,
    manifest: &Manifest,
    retry: &mut Option<(String, Cursor)>,
    ahead: &mut Option<Sent>,
    want: impl Fn(&Hash) -> bool,
) -> Next {
    match (retry.take(), ahead.take()) {
        (Some((file, mut cursor)), _) => {
            cursor.unwant(|h| !want(h));
            let Some((start, end)) = cursor.resume() else {
                return Next::Again;
            };
            Next::Read(origin.send(&file, cursor, start, end))
        }
        (None, Some(mut sent)) => {
            sent.cursor.unwant(|h| !want(h));
            if sent.cursor.is_done() {
                sent.answer.abort();
                return Next::Again;
            }
            Next::Read(sent)
        }
        (None, None) => {
            let Some(request) = next_request(manifest, |h| !want(h)) else {
                return Next::Done;
            };
            let cursor = Cursor::for_request(&request);
            Next::Read(origin.send(&request.file, cursor, request.start, request.end))
        }
    }
}

/// Reads one answer, storing every wanted chunk it completes; sends the
/// next request (into `ahead`) when this one nears its end. On a cut,
/// `cursor` holds where it stopped.
#[allow(clippy::too_many_arguments)]
async fn read_answer(
    origin: &Origin,
    manifest: &Manifest,
    store: &ChunkStore,
    sent: Sent,
    cursor: &mut Cursor,
    held: &mut HashSet<Hash>,
    wanted: &impl Fn(&Hash) -> bool,
    ahead: &mut Option<Sent>,
    report: &mut FetchReport,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<(), Attempt> {
    let url = file_url(&origin.base, &sent.file);
    let mut response = match sent.answer.await {
        Ok(answer) => answer?,
        Err(e) => return Err(Attempt::Cut(e.into())),
    };
    let whole = response.status() == StatusCode::OK;
    if whole {
        // An origin that ignores Range answers 200 with the whole file:
        // read it once, taking every chunk of it this node still lacks.
        *cursor = whole_file(manifest, &sent.file, |h| !held.contains(h) && wanted(h))?;
        if let Some(a) = ahead.take() {
            a.answer.abort();
        }
    } else if let Some(first) = content_range_start(&response) {
        if first != sent.start {
            return Err(Attempt::Fatal(FetchError::Network(anyhow::anyhow!(
                "{url}: asked for bytes from {}, the origin sent them from {first}",
                sent.start
            ))));
        }
    }
    loop {
        let Some(body) = next_body(origin, &mut response, &url, cursor.position()).await? else {
            break;
        };
        origin.wan.take(body.len()).await;
        report.bytes += body.len() as u64;
        origin
            .received
            .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
        store_completed(store, cursor.feed(&body), &url, held, report, on_chunk).await?;
        // Chunks that reached the node another way, or a role that ended:
        // what is no longer wanted is not read.
        cursor.unwant(|h| held.contains(h) || !wanted(h));
        if cursor.is_done() {
            return Ok(());
        }
        if !whole && ahead.is_none() && cursor.wanted_bytes() <= PIPELINE_AHEAD {
            let reading: HashSet<Hash> = cursor.wanted().collect();
            let next = next_request(manifest, |h| {
                held.contains(h) || reading.contains(h) || !wanted(h)
            });
            if let Some(request) = next {
                let next_cursor = Cursor::for_request(&request);
                *ahead = Some(origin.send(&request.file, next_cursor, request.start, request.end));
            }
        }
    }
    if cursor.is_done() {
        return Ok(());
    }
    Err(Attempt::Cut(anyhow::anyhow!(
        "{url}: body ended at byte {}, before byte {}",
        cursor.position(),
        cursor.end().unwrap_or_default()
    )))
}

/// The next piece of an answer's body: None at its end; a cut when the
/// origin sent nothing for the stall timeout or the connection broke.
async fn next_body(
    origin: &Origin,
    response: &mut reqwest::Response,
    url: &str,
    at: u64,
) -> Result<Option<bytes::Bytes>, Attempt> {
    match tokio::time::timeout(origin.stall, response.chunk()).await {
        Err(_) => Err(Attempt::Cut(anyhow::anyhow!(
            "{url}: no byte from the origin for {:?} (at byte {at})",
            origin.stall
        ))),
        Ok(Err(e)) => Err(Attempt::Cut(
            anyhow::Error::new(e).context(format!("reading {url}")),
        )),
        Ok(Ok(body)) => Ok(body),
    }
}

/// A cursor over the whole of `file`, for an origin that answered a range
/// with all of it.
fn whole_file(
    manifest: &Manifest,
    file: &str,
    wanted: impl Fn(&Hash) -> bool,
) -> Result<Cursor, Attempt> {
    let Some(entry) = manifest.files.iter().find(|f| f.name == file) else {
        return Err(Attempt::Fatal(FetchError::Network(anyhow::anyhow!(
            "{file} is not in the manifest"
        ))));
    };
    Ok(Cursor::for_file(entry, wanted))
}

/// Stores the chunks an answer completed (each verified by the store),
/// counting them and telling `on_chunk`.
async fn store_completed(
    store: &ChunkStore,
    completed: Vec<(u64, Chunk, Vec<u8>)>,
    url: &str,
    held: &mut HashSet<Hash>,
    report: &mut FetchReport,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<(), Attempt> {
    for (at, chunk, data) in completed {
        let stored = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.put(&chunk, &data))
                .await
                .map_err(|e| Attempt::Cut(e.into()))?
        };
        match stored {
            Ok(()) => {}
            Err(StoreError::Corrupt { .. }) => {
                return Err(Attempt::Fatal(FetchError::Mismatch {
                    url: url.to_owned(),
                    start: at,
                    end: at + chunk.size,
                    hash: chunk.hash,
                }))
            }
            Err(e) => return Err(Attempt::Fatal(FetchError::LocalDisk(e))),
        }
        held.insert(chunk.hash);
        report.chunks += 1;
        on_chunk(&chunk);
    }
    Ok(())
}

/// The first byte a 206 answer holds, from its `Content-Range`.
pub(crate) fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// A chunk found damaged in the store while assembling (and removed from
/// it): it must be fetched again.
#[derive(Debug, thiserror::Error)]
#[error("chunk {0} was damaged on disk and has been removed")]
pub struct DamagedChunk(pub Hash);

/// Assembles every file of `manifest` from `store` into `dest`, checking
/// each whole-file hash, and applies the manifest's modes. Each file is
/// written under a temporary name and renamed, so `dest` never holds a
/// partial file under a listed name.
/// A file that did not hash right: finds a chunk of it that rotted in the
/// store since it was checked and names it, so it is fetched again.
pub fn find_damaged(file: &lanup_protocol::manifest::UpdateFile, store: &ChunkStore) -> Result<()> {
    for chunk in &file.chunks {
        if let Err(e) = store.get_verified(&chunk.hash) {
            if e.kind() == std::io::ErrorKind::InvalidData {
                return Err(
                    anyhow::Error::new(DamagedChunk(chunk.hash)).context(format!(
                        "{}: a chunk of it was damaged in the store",
                        file.name
                    )),
                );
            }
        }
    }
    Ok(())
}

pub fn assemble(manifest: &Manifest, store: &ChunkStore, dest: &Path) -> Result<()> {
    for file in &manifest.files {
        check_file_name(&file.name)?;
        let target = dest.join(&file.name);
        let dir = target.parent().unwrap_or(dest);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut out = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let mut hasher = blake3::Hasher::new();
        for chunk in &file.chunks {
            let data = store.get(&chunk.hash).with_context(|| {
                format!("{}: chunk {} is not in the store", file.name, chunk.hash)
            })?;
            hasher.update(&data);
            out.write_all(&data)?;
        }
        let hash: Hash = hasher.finalize().into();
        if Some(hash) != file.hash {
            find_damaged(file, store)?;
            bail!(
                "{}: assembled file hashes to {hash}, not the manifest's hash",
                file.name
            );
        }
        if let Some(mode) = file.mode {
            crate::platform::set_mode(out.as_file(), mode)?;
        }
        out.as_file().sync_all()?;
        out.persist(&target)
            .with_context(|| format!("cannot rename into {}", target.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_escape_each_part() {
        assert_eq!(
            file_url("http://o:1/rel/", "données/été #1.txt"),
            "http://o:1/rel/donn%C3%A9es/%C3%A9t%C3%A9%20%231.txt"
        );
        assert_eq!(file_url("http://o", "a/b"), "http://o/a/b");
    }
}
