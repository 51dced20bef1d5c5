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

/// The first Range request [`origin_requests`] would plan, without planning
/// the rest: what a fetcher asks for next, decided afresh before every
/// request so that chunks that reached the site meanwhile are left out.
pub fn next_request(manifest: &Manifest, have: impl Fn(&Hash) -> bool) -> Option<RangeRequest> {
    let mut seen: HashSet<Hash> = HashSet::new();
    for file in &manifest.files {
        let mut offset = 0u64;
        let mut current: Option<RangeRequest> = None;
        for chunk in &file.chunks {
            let wanted = !have(&chunk.hash) && seen.insert(chunk.hash);
            match &mut current {
                Some(r) if wanted && r.end == offset && r.len() + chunk.size <= MAX_SPAN => {
                    r.end += chunk.size;
                    r.chunks.push(*chunk);
                }
                Some(_) => return current,
                None if wanted => {
                    current = Some(RangeRequest {
                        file: file.name.clone(),
                        start: offset,
                        end: offset + chunk.size,
                        chunks: vec![*chunk],
                    })
                }
                None => {}
            }
            offset += chunk.size;
        }
        if current.is_some() {
            return current;
        }
    }
    None
}

/// Cuts the chunks out of an HTTP body as its bytes arrive.
///
/// It is set up with the body's first byte offset in the file and the
/// file's chunks from there on, each marked whether it is wanted; bytes of
/// unwanted chunks are skipped, not kept. The same cursor reads a 206
/// answer (the requested chunks, resumed inside the first one with the
/// bytes kept from before a cut) and a 200 answer from an origin that
/// ignores Range (the whole file, taking every chunk the site lacks), so a
/// file is never read twice for one download. Bytes of a chunk cut off
/// mid-way stay in the cursor: a resumed request starts at
/// [`Cursor::position`].
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// (offset in the file, chunk, wanted), in file order.
    items: std::collections::VecDeque<(u64, Chunk, bool)>,
    /// The file offset of the next body byte.
    pos: u64,
    /// Bytes of the front chunk received so far (wanted chunks only).
    partial: Vec<u8>,
}

impl Cursor {
    /// A cursor for the bytes of a file from `items`' first offset on.
    pub fn new(items: impl IntoIterator<Item = (u64, Chunk, bool)>) -> Cursor {
        let items: std::collections::VecDeque<_> = items.into_iter().collect();
        let pos = items.front().map_or(0, |(offset, _, _)| *offset);
        Cursor {
            items,
            pos,
            partial: Vec::new(),
        }
    }

    /// The cursor for one planned request.
    pub fn for_request(request: &RangeRequest) -> Cursor {
        let mut offset = request.start;
        Cursor::new(request.chunks.iter().map(|c| {
            let item = (offset, *c, true);
            offset += c.size;
            item
        }))
    }

    /// The cursor for a whole file, wanting the chunks `want` names (each
    /// hash once).
    pub fn for_file(file: &crate::UpdateFile, want: impl Fn(&Hash) -> bool) -> Cursor {
        let mut offset = 0;
        let mut taken = HashSet::new();
        let mut cursor = Cursor::new(file.chunks.iter().map(|c| {
            let item = (offset, *c, want(&c.hash) && taken.insert(c.hash));
            offset += c.size;
            item
        }));
        cursor.pos = 0;
        cursor
    }

    /// The file offset of the next byte this cursor expects.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The file offset one past the last wanted byte (where a Range request
    /// for what is left ends), or `None` when nothing more is wanted.
    pub fn end(&self) -> Option<u64> {
        self.items
            .iter()
            .rev()
            .find(|(_, _, want)| *want)
            .map(|(offset, c, _)| offset + c.size)
    }

    /// Bytes still wanted, counting the kept part of the front chunk as had.
    pub fn wanted_bytes(&self) -> u64 {
        let all: u64 = self
            .items
            .iter()
            .filter(|(_, _, w)| *w)
            .map(|(_, c, _)| c.size)
            .sum();
        all - self.partial.len() as u64
    }

    /// The hashes still wanted.
    pub fn wanted(&self) -> impl Iterator<Item = Hash> + '_ {
        self.items
            .iter()
            .filter(|(_, _, w)| *w)
            .map(|(_, c, _)| c.hash)
    }

    /// Whether every wanted chunk has been cut out.
    pub fn is_done(&self) -> bool {
        self.end().is_none()
    }

    /// Marks chunks no longer wanted (they reached the node another way).
    pub fn unwant(&mut self, have: impl Fn(&Hash) -> bool) {
        for (i, (_, c, want)) in self.items.iter_mut().enumerate() {
            if *want && have(&c.hash) {
                *want = false;
                if i == 0 {
                    self.partial.clear();
                }
            }
        }
    }

    /// Where a request for what is left starts and ends (`[start, end)`),
    /// after a cut: unwanted chunks in front are dropped, and the kept
    /// bytes of a chunk cut mid-way are not asked for again. `None` when
    /// nothing more is wanted.
    pub fn resume(&mut self) -> Option<(u64, u64)> {
        while self.items.front().is_some_and(|(_, _, want)| !*want) {
            self.items.pop_front();
        }
        let end = self.end()?;
        let (offset, _, _) = self.items.front()?;
        self.pos = offset + self.partial.len() as u64;
        Some((self.pos, end))
    }

    /// Feeds body bytes; returns the wanted chunks they completed, with
    /// their offsets in the file and their bytes (not yet checked against
    /// their hashes).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<(u64, Chunk, Vec<u8>)> {
        let mut done = Vec::new();
        while !bytes.is_empty() {
            let Some(&(offset, chunk, want)) = self.items.front() else {
                break;
            };
            let chunk_end = offset + chunk.size;
            if self.pos < offset {
                // A gap (bytes before the first item): skipped.
                let n = (offset - self.pos).min(bytes.len() as u64) as usize;
                self.pos += n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (chunk_end - self.pos).min(bytes.len() as u64) as usize;
            if want {
                // One allocation per chunk, not one per body read.
                self.partial.reserve_exact((chunk_end - self.pos) as usize);
                self.partial.extend_from_slice(&bytes[..n]);
            }
            self.pos += n as u64;
            bytes = &bytes[n..];
            if self.pos == chunk_end {
                self.items.pop_front();
                let data = std::mem::take(&mut self.partial);
                if want {
                    done.push((offset, chunk, data));
                }
            }
        }
        done
    }
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
            ..Default::default()
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
            bundles: Vec::new(),
            runs: Vec::new(),
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

    #[test]
    fn the_next_request_is_the_first_of_the_plan() {
        let m = manifest(vec![
            file("a", &[(10, 1), (20, 2), (30, 3), (40, 4)]),
            file("b", &[(5, 5)]),
        ]);
        let held = [Hash::of(&[1]), Hash::of(&[3])];
        let plan = origin_requests(&m, |h| held.contains(h));
        assert_eq!(
            next_request(&m, |h| held.contains(h)).as_ref(),
            plan.first()
        );
        let all_a = [1, 2, 3, 4].map(|t| Hash::of(&[t]));
        let next = next_request(&m, |h| all_a.contains(h)).expect("b's chunk");
        assert_eq!((next.file.as_str(), next.start, next.end), ("b", 0, 5));
        assert!(next_request(&m, |_| true).is_none());
    }

    #[test]
    fn a_cursor_cuts_chunks_and_resumes_inside_one() {
        let data: Vec<u8> = (0..60u8).collect();
        let chunk = |range: std::ops::Range<usize>| Chunk {
            size: range.len() as u64,
            hash: Hash::of(&data[range]),
        };
        let (a, b, c) = (chunk(0..10), chunk(10..30), chunk(30..60));
        let request = RangeRequest {
            file: "f".into(),
            start: 10,
            end: 60,
            chunks: vec![b, c],
        };
        let mut cursor = Cursor::for_request(&request);
        assert_eq!(cursor.position(), 10);
        assert!(cursor.feed(&data[10..25]).is_empty());
        // Cut after byte 25: the next request starts there.
        assert_eq!(cursor.resume(), Some((25, 60)));
        assert_eq!(cursor.wanted_bytes(), 35);
        let got = cursor.feed(&data[25..40]);
        assert_eq!(got.len(), 1);
        assert!(got[0] == (10, b, data[10..30].to_vec()));
        let got = cursor.feed(&data[40..60]);
        assert!(got[0] == (30, c, data[30..60].to_vec()));
        assert!(cursor.is_done());

        // A whole-file answer: only the wanted chunks are kept.
        let f = crate::UpdateFile {
            name: "f".into(),
            size: Some(60),
            mode: None,
            hash: None,
            chunks: vec![a, b, c],
            ..Default::default()
        };
        let mut cursor = Cursor::for_file(&f, |h| *h != b.hash);
        let mut got = Vec::new();
        for piece in data.chunks(7) {
            got.extend(cursor.feed(piece));
        }
        let hashes: Vec<Hash> = got.iter().map(|(_, c, _)| c.hash).collect();
        assert_eq!(hashes, [a.hash, c.hash]);
        assert!(got.iter().all(|(_, c, bytes)| c.matches(bytes)));

        // A chunk obtained elsewhere mid-way is dropped, kept bytes too.
        let mut cursor = Cursor::for_request(&request);
        cursor.feed(&data[10..15]);
        cursor.unwant(|h| *h == b.hash);
        assert_eq!((cursor.wanted_bytes(), cursor.end()), (30, Some(60)));
        assert_eq!(cursor.resume(), Some((30, 60)));
        let got = cursor.feed(&data[30..60]);
        assert_eq!(got.len(), 1);
        assert!(got[0].1 == c);
    }
}
