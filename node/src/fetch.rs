//! Downloading a release's missing chunks from the origin with HTTP Range
//! requests, and assembling verified files from the chunk store.
//!
//! What to ask for is decided in `lanup_protocol::plan`; this module moves
//! the bytes. Every chunk is checked against its hash before it is stored,
//! and a cut connection resumes from the first chunk not yet stored.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lanup_protocol::chunk::Chunk;
use lanup_protocol::manifest::check_file_name;
use lanup_protocol::plan::{origin_requests, RangeRequest};
use lanup_protocol::{Hash, Manifest};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::header::RANGE;
use reqwest::StatusCode;
use tracing::{debug, warn};

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

/// How many times one Range request is retried after a cut or an error.
const RETRIES: u32 = 5;

/// What a fetch took from the origin.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// Body bytes received from the origin.
    pub bytes: u64,
    /// Chunks fetched and stored.
    pub chunks: usize,
    /// Range requests planned.
    pub requests: usize,
    /// Bytes of the release already in the store before the fetch.
    pub already_held: u64,
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

/// Fetches every chunk of `manifest` that `store` lacks from the release
/// directory at `base`, except those `skip` says are to be had elsewhere,
/// no faster than `wan` allows. `on_chunk` is told of every chunk verified
/// and stored.
pub async fn fetch_missing(
    client: &reqwest::Client,
    base: &str,
    manifest: &Manifest,
    store: &ChunkStore,
    wan: &Throttle,
    skip: impl Fn(&Hash) -> bool,
    mut on_chunk: impl FnMut(&Chunk),
) -> Result<FetchReport> {
    let plan = origin_requests(manifest, |h| store.has(h) || skip(h));
    let missing: u64 = plan.iter().map(RangeRequest::len).sum();
    let unique: u64 = lanup_protocol::manifest::unique_chunks(&manifest.files)
        .values()
        .sum();
    let mut report = FetchReport {
        requests: plan.len(),
        already_held: unique - missing,
        ..FetchReport::default()
    };
    debug!(
        release = %manifest.release_name(),
        missing_bytes = missing,
        held_bytes = report.already_held,
        requests = plan.len(),
        "requesting chunks from the origin"
    );
    for request in &plan {
        let mut attempt = 0;
        loop {
            match fetch_range(
                client,
                base,
                request,
                store,
                wan,
                &mut report,
                &mut on_chunk,
            )
            .await
            {
                Ok(()) => break,
                // Wrong bytes from the origin are not a network hiccup: the
                // published folder differs from its manifest.
                Err(e) if e.downcast_ref::<StoreError>().is_some() => {
                    return Err(e.context(
                        "the origin serves a file that differs from its signed manifest; republish the release",
                    ));
                }
                Err(e) if attempt < RETRIES => {
                    attempt += 1;
                    warn!(file = %request.file, error = %format!("{e:#}"), attempt, "origin download interrupted; resuming");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    debug!(
        release = %manifest.release_name(),
        bytes = report.bytes,
        chunks = report.chunks,
        "origin requests done"
    );
    Ok(report)
}

/// Fetches the chunks of one planned request that the store still lacks
/// (after a cut, only those after the last stored one).
async fn fetch_range(
    client: &reqwest::Client,
    base: &str,
    request: &RangeRequest,
    store: &ChunkStore,
    wan: &Throttle,
    report: &mut FetchReport,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<()> {
    let mut start = request.start;
    let mut chunks = request.chunks.as_slice();
    while let Some((first, rest)) = chunks.split_first() {
        if !store.has(&first.hash) {
            break;
        }
        start += first.size;
        chunks = rest;
    }
    if chunks.is_empty() {
        return Ok(());
    }
    let url = file_url(base, &request.file);
    let mut resp = client
        .get(&url)
        .header(RANGE, format!("bytes={start}-{}", request.end - 1))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    // A server that ignores Range answers 200 with the whole file.
    let mut skip = match resp.status() {
        StatusCode::PARTIAL_CONTENT => 0,
        StatusCode::OK => start,
        status => bail!("GET {url}: origin answered {status}"),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(chunks.first().map_or(0, |c| c.size as usize));
    while let Some(body) = resp
        .chunk()
        .await
        .with_context(|| format!("reading {url}"))?
    {
        wan.take(body.len()).await;
        report.bytes += body.len() as u64;
        let mut body = &body[..];
        if skip > 0 {
            let n = skip.min(body.len() as u64) as usize;
            body = &body[n..];
            skip -= n as u64;
        }
        buf.extend_from_slice(body);
        while let Some(chunk) = chunks.first() {
            let size = chunk.size as usize;
            if buf.len() < size {
                break;
            }
            store
                .put(chunk, &buf[..size])
                .with_context(|| format!("{url} bytes {start}..{}", start + chunk.size))?;
            on_chunk(chunk);
            report.chunks += 1;
            start += chunk.size;
            buf.drain(..size);
            chunks = &chunks[1..];
        }
        if chunks.is_empty() {
            return Ok(());
        }
    }
    bail!(
        "{url}: body ended at byte {start}, before byte {}",
        request.end
    )
}

/// Assembles every file of `manifest` from `store` into `dest`, checking
/// each whole-file hash, and applies the manifest's modes. Each file is
/// written under a temporary name and renamed, so `dest` never holds a
/// partial file under a listed name.
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
            bail!(
                "{}: assembled file hashes to {hash}, not the manifest's hash",
                file.name
            );
        }
        if let Some(mode) = file.mode {
            out.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))?;
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
