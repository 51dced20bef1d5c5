//! Which byte ranges to ask the origin for: the chunks a node lacks, as few
//! HTTP Range requests as possible.
//!
//! Chunks a node already holds (from an earlier release, or from a peer) are
//! never asked for again; a chunk that appears in several places is asked
//! for once; runs of missing chunks that are adjacent in a file become one
//! request, up to [`MAX_SPAN`] bytes so that a cut connection costs little.

use std::collections::HashSet;

use crate::chunk::Chunk;
use crate::{Hash, Manifest};

/// The most the fetcher asks the origin for at once. Between batches it
/// looks again at what its peers hold, so chunks that reached the site some
/// other way (an earlier fetcher, a node that joined) are not fetched twice.
pub const ORIGIN_BATCH: u64 = 8 << 20;
/// After adopting a release, how long the fetcher waits at most for its
/// peers' chunk lists before it goes to the origin.
pub const HAVE_WAIT_MS: u64 = 2000;

/// Largest single Range request. Big enough to make request overhead
/// negligible; small enough that a cut mid-request loses little, since the
/// chunks before the cut are kept.
pub const MAX_SPAN: u64 = 16 * 1024 * 1024;

/// One Range request: `[start, end)` of the published file `file`, holding
/// `chunks` back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    pub file: String,
    pub start: u64,
    pub end: u64,
    pub chunks: Vec<Chunk>,
}

impl RangeRequest {
    /// The request's length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the request is empty (never true for planned requests).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Plans the Range requests that fetch every chunk of `manifest` for which
/// `have` is false, each chunk once.
pub fn origin_requests(manifest: &Manifest, have: impl Fn(&Hash) -> bool) -> Vec<RangeRequest> {
    let mut planned: HashSet<Hash> = HashSet::new();
    let mut requests = Vec::new();
    for file in &manifest.files {
        let mut offset = 0u64;
        let mut current: Option<RangeRequest> = None;
        for chunk in &file.chunks {
            let wanted = !have(&chunk.hash) && planned.insert(chunk.hash);
            if wanted {
                match &mut current {
                    Some(r) if r.end == offset && r.len() + chunk.size <= MAX_SPAN => {
                        r.end += chunk.size;
                        r.chunks.push(*chunk);
                    }
                    _ => {
                        requests.extend(current.take());
                        current = Some(RangeRequest {
                            file: file.name.clone(),
                            start: offset,
                            end: offset + chunk.size,
                            chunks: vec![*chunk],
                        });
                    }
                }
            }
            offset += chunk.size;
        }
        requests.extend(current);
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Format, Restart};
    use crate::UpdateFile;

    fn file(name: &str, chunks: &[(u64, u8)]) -> UpdateFile {
        let chunks: Vec<Chunk> = chunks
            .iter()
            .map(|&(size, tag)| Chunk {
                size,
                hash: Hash::of(&[tag]),
            })
            .collect();
        UpdateFile {
            name: name.into(),
            size: Some(chunks.iter().map(|c| c.size).sum()),
            mode: None,
            hash: Some(Hash::of(name.as_bytes())),
            chunks,
        }
    }

    fn manifest(files: Vec<UpdateFile>) -> Manifest {
        Manifest {
            format: Format::V2,
            url: "http://o/".into(),
            update_time: None,
            version: "1".parse().ok(),
            expires: None,
            files,
            restart: Restart::default(),
        }
    }

    #[test]
    fn adjacent_missing_chunks_become_one_request() {
        let m = manifest(vec![file("a", &[(10, 1), (20, 2), (30, 3), (40, 4)])]);
        let held = Hash::of(&[3]);
        let plan = origin_requests(&m, |h| *h == held);
        let spans: Vec<_> = plan
            .iter()
            .map(|r| (r.start, r.end, r.chunks.len()))
            .collect();
        assert_eq!(spans, [(0, 30, 2), (60, 100, 1)]);
    }

    #[test]
    fn chunks_held_or_repeated_are_not_fetched_again() {
        let m = manifest(vec![
            file("a", &[(10, 1), (10, 2)]),
            file("b", &[(10, 2), (10, 1), (5, 9)]),
        ]);
        let plan = origin_requests(&m, |_| false);
        let total: u64 = plan.iter().map(RangeRequest::len).sum();
        assert_eq!(total, 25);
        assert!(origin_requests(&m, |_| true).is_empty());
    }

    #[test]
    fn spans_are_capped() {
        let big = (MAX_SPAN / 2, 0u8);
        let m = manifest(vec![file("a", &[big, (MAX_SPAN / 2, 1), (1, 2)])]);
        let plan = origin_requests(&m, |_| false);
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|r| r.len() <= MAX_SPAN));
    }
}
