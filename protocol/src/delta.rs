//! What crosses the uplink for a file: patches against a release the site
//! holds, compressed chunks, or plain chunks, whichever is fewest bytes.
//!
//! A rebuilt program shares almost no content-defined chunk with its
//! previous build, yet a binary delta against that build is a tenth to a
//! hundredth of its size. So the publisher, which holds earlier releases,
//! writes for every changed file a patch from each release it keeps, and a
//! compressed copy of every chunk where compression pays; both are static
//! files named by their hash and listed in the signed manifest (`Patch`
//! elements, `Chunk@PackedSize`/`@PackedHash`).
//!
//! A patch is cut into segments: each rebuilds whole chunks, at most
//! [`MAX_PATCH_OUTPUT`] bytes of the new file, from at most
//! [`MAX_PATCH_REFERENCE`] bytes of the base (all of it when the base is
//! that small, else the part at the same relative place). A node decodes
//! one segment at a time, so its memory is bounded by those two sizes
//! whatever the file's; a file much larger than the reference window loses
//! only what moved further than the window reaches.
//!
//! Small files (under [`crate::chunk::MIN_CHUNK`], one chunk each) are
//! also compressed together in bundles: runs of consecutive files of up to
//! [`MAX_BUNDLE`] bytes, cut where the files' names and sizes say (see
//! [`bundle_runs`]), so a release that changes a few files of many keeps
//! most bundles as they were and the publisher reuses them. A tree of
//! 100,000 files of a few kilobytes crosses the uplink in a few hundred
//! requests of about a megabyte, not 100,000 of a few kilobytes.
//!
//! Chunks of larger files are also compressed together in runs: up to
//! [`MAX_RUN`] bytes of consecutive chunks, cut where the chunks' hashes
//! say (see [`run_spans`]). A node with no base for a file (a new program,
//! a node that joined late) takes it as a few zstd streams rather than
//! chunk by chunk: a chunk compressed alone starts with an empty window
//! and loses about a tenth (lanup's own binary: 1.084 x `zstd -19` in
//! chunks, 1.02 x in runs).
//!
//! This module decides; the node moves bytes and runs the codec.

use std::collections::BTreeMap;

use crate::chunk::Chunk;
use crate::manifest::{Blob, Patch, UpdateFile};
use crate::Hash;

/// The most bytes of a new file one patch segment rebuilds.
pub const MAX_PATCH_OUTPUT: u64 = 8 * 1024 * 1024;
/// The most bytes of a base file one patch segment refers to.
pub const MAX_PATCH_REFERENCE: u64 = 16 * 1024 * 1024;

/// The most bytes a bundle decodes to (what a node holds of one at once).
pub const MAX_BUNDLE: u64 = 4 * 1024 * 1024;
/// A bundle is cut no sooner than this many bytes of files...
const BUNDLE_MIN: u64 = 1024 * 1024;
/// ...and after that, after each file with a chance of its size in this
/// many bytes: bundles of about `BUNDLE_MIN + BUNDLE_SPREAD` on average
/// (a megabyte or so over the wire for text).
const BUNDLE_SPREAD: u64 = 3 * 1024 * 1024 / 2;

/// Whether a file goes into bundles: not empty and smaller than a chunk.
pub fn bundled(file: &UpdateFile) -> bool {
    file.chunks.len() == 1
        && file
            .size
            .is_some_and(|s| s < crate::chunk::MIN_CHUNK as u64)
}

/// The runs of files (first index, count) a publisher bundles: consecutive
/// [`bundled`] files, up to [`MAX_BUNDLE`] bytes each. A run ends after a
/// file whose name's hash falls under a threshold that grows with the
/// file's size, once it holds [`BUNDLE_MIN`]: where runs end depends on
/// the files near the end alone, so a changed file changes its own bundle
/// and not the ones after it.
pub fn bundle_runs(files: &[UpdateFile]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut first = 0;
    let mut bytes = 0u64;
    for (i, file) in files.iter().enumerate() {
        let size = file.size.unwrap_or_default();
        if !bundled(file) || bytes + size > MAX_BUNDLE {
            if i > first {
                runs.push((first, i - first));
            }
            first = i;
            bytes = 0;
            if !bundled(file) {
                first = i + 1;
                continue;
            }
        }
        bytes += size;
        let roll = Hash::of(file.name.as_bytes()).0[..8]
            .iter()
            .fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        let threshold = (u64::MAX / BUNDLE_SPREAD).saturating_mul(size);
        if bytes >= BUNDLE_MIN && roll < threshold {
            runs.push((first, i + 1 - first));
            first = i + 1;
            bytes = 0;
        }
    }
    if files.len() > first {
        runs.push((first, files.len() - first));
    }
    runs
}

/// Checks a manifest's bundles: in file order, not overlapping, of
/// [`bundled`] files, at most [`MAX_BUNDLE`] bytes, each smaller than what
/// it holds. On error, the index of the offending `Bundle` and why.
pub fn check_bundles(manifest: &crate::Manifest) -> Result<(), (usize, String)> {
    let mut next = 0;
    for (i, b) in manifest.bundles.iter().enumerate() {
        if b.count == 0 {
            return Err((i, "holds no file".into()));
        }
        if b.first < next {
            return Err((
                i,
                format!(
                    "starts at file {}, before file {next} where the bundle before it ends",
                    b.first
                ),
            ));
        }
        let Some(files) = b
            .first
            .checked_add(b.count)
            .and_then(|end| manifest.files.get(b.first..end))
        else {
            return Err((
                i,
                format!(
                    "names files {} to {} of {}",
                    b.first,
                    b.first.saturating_add(b.count),
                    manifest.files.len()
                ),
            ));
        };
        if let Some(f) = files.iter().find(|f| !bundled(f)) {
            return Err((
                i,
                format!(
                    "holds \"{}\", which is empty or not smaller than a chunk",
                    f.name
                ),
            ));
        }
        let bytes: u64 = files.iter().filter_map(|f| f.size).sum();
        if bytes > MAX_BUNDLE {
            return Err((i, format!("holds {bytes} bytes, over {MAX_BUNDLE}")));
        }
        if b.blob.size >= bytes {
            return Err((
                i,
                format!(
                    "is {} bytes, not smaller than the {bytes} it holds",
                    b.blob.size
                ),
            ));
        }
        next = b.first + b.count;
    }
    Ok(())
}

/// The most bytes a run decodes to. A node decodes a run a chunk at a
/// time: it holds the compressed run, zstd's window (8 MiB at level 19)
/// and one chunk.
pub const MAX_RUN: u64 = 16 * 1024 * 1024;
/// A run is cut no sooner than this many bytes of chunks...
const RUN_MIN: u64 = 8 * 1024 * 1024;
/// ...and after that, after each chunk with a chance of its size in this
/// many bytes.
const RUN_SPREAD: u64 = 4 * 1024 * 1024;

/// Where each file's chunks start in the release's chunk order (file by
/// file, each file's chunks in order), which [`Run`](crate::manifest::Run)s
/// count in.
#[derive(Debug, Clone)]
pub struct ChunkOrder {
    /// The first chunk of each file, and the number of chunks at the end.
    starts: Vec<usize>,
}

impl ChunkOrder {
    pub fn new(files: &[UpdateFile]) -> ChunkOrder {
        let mut starts = Vec::with_capacity(files.len() + 1);
        let mut at = 0;
        for f in files {
            starts.push(at);
            at += f.chunks.len();
        }
        starts.push(at);
        ChunkOrder { starts }
    }

    /// Where file `file`'s first chunk is in the order.
    pub fn first_of(&self, file: usize) -> usize {
        self.starts[file]
    }

    /// The number of chunks in the release (counted with repeats).
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunks `first .. first + count` with the index of their file; fewer
    /// where the release has fewer.
    pub fn span<'a>(
        &'a self,
        files: &'a [UpdateFile],
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = (usize, &'a Chunk)> + 'a {
        // The last file starting at or before `first`: an empty file shares
        // its start with the next, and holds none of the chunks.
        let file = self
            .starts
            .partition_point(|&s| s <= first)
            .saturating_sub(1);
        files
            .iter()
            .enumerate()
            .skip(file)
            .flat_map(|(i, f)| f.chunks.iter().map(move |c| (i, c)))
            .skip(first.saturating_sub(self.starts.get(file).copied().unwrap_or_default()))
            .take(count)
    }
}

/// The runs of chunks (first, count in [`ChunkOrder`]) a publisher
/// compresses together: consecutive chunks of files that are not
/// [`bundled`], up to [`MAX_RUN`] bytes each, cut after a chunk whose hash
/// falls under a threshold that grows with its size once a run holds
/// [`RUN_MIN`]: where runs end depends on the chunks near the end alone,
/// so what did not change keeps its runs. Runs of one chunk are left out
/// (its packed copy is the same).
pub fn run_spans(files: &[UpdateFile]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut at = 0;
    let mut first = 0;
    let mut bytes = 0u64;
    let mut push = |first: usize, end: usize| {
        if end > first + 1 {
            runs.push((first, end - first));
        }
    };
    for file in files {
        if bundled(file) {
            push(first, at);
            at += file.chunks.len();
            first = at;
            bytes = 0;
            continue;
        }
        for chunk in &file.chunks {
            if bytes + chunk.size > MAX_RUN {
                push(first, at);
                first = at;
                bytes = 0;
            }
            at += 1;
            bytes += chunk.size;
            let roll = chunk.hash.0[..8]
                .iter()
                .fold(0u64, |acc, b| acc << 8 | u64::from(*b));
            let threshold = (u64::MAX / RUN_SPREAD).saturating_mul(chunk.size);
            if bytes >= RUN_MIN && roll < threshold {
                push(first, at);
                first = at;
                bytes = 0;
            }
        }
    }
    push(first, at);
    runs
}

/// Checks a manifest's runs: in chunk order, not overlapping, within the
/// release, at most [`MAX_RUN`] bytes, each smaller than what it holds. On
/// error, the index of the offending `Run` and why.
pub fn check_runs(manifest: &crate::Manifest) -> Result<(), (usize, String)> {
    if manifest.runs.is_empty() {
        return Ok(());
    }
    let order = ChunkOrder::new(&manifest.files);
    let mut next = 0;
    for (i, r) in manifest.runs.iter().enumerate() {
        if r.count == 0 {
            return Err((i, "holds no chunk".into()));
        }
        if r.first < next {
            return Err((
                i,
                format!(
                    "starts at chunk {}, before chunk {next} where the run before it ends",
                    r.first
                ),
            ));
        }
        if r.first
            .checked_add(r.count)
            .is_none_or(|end| end > order.len())
        {
            return Err((
                i,
                format!(
                    "names chunks {} to {} of {}",
                    r.first,
                    r.first.saturating_add(r.count),
                    order.len()
                ),
            ));
        }
        let bytes: u64 = order
            .span(&manifest.files, r.first, r.count)
            .map(|(_, c)| c.size)
            .sum();
        if bytes > MAX_RUN {
            return Err((i, format!("holds {bytes} bytes, over {MAX_RUN}")));
        }
        if r.blob.size >= bytes {
            return Err((
                i,
                format!(
                    "is {} bytes, not smaller than the {bytes} it holds",
                    r.blob.size
                ),
            ));
        }
        next = r.first + r.count;
    }
    Ok(())
}

/// The runs worth fetching for a node that lacks `lacking`: those smaller
/// than what their lacking chunks would cost one by one (packed or
/// plain), in chunk order.
pub fn runs_to_fetch(
    manifest: &crate::Manifest,
    order: &ChunkOrder,
    lacking: impl Fn(&Hash) -> bool,
) -> Vec<usize> {
    manifest
        .runs
        .iter()
        .enumerate()
        .filter(|(_, r)| run_pays(manifest, order, r, &lacking))
        .map(|(i, _)| i)
        .collect()
}

/// Whether `run` costs less than its chunks in `lacking` one by one.
pub fn run_pays(
    manifest: &crate::Manifest,
    order: &ChunkOrder,
    run: &crate::manifest::Run,
    lacking: impl Fn(&Hash) -> bool,
) -> bool {
    let mut seen = std::collections::HashSet::new();
    let alone: u64 = order
        .span(&manifest.files, run.first, run.count)
        .filter(|(_, c)| lacking(&c.hash) && seen.insert(c.hash))
        .map(|(f, c)| chunk_cost(&manifest.files[f], c))
        .sum();
    run.blob.size < alone
}

/// The bundles worth fetching for a node that lacks `lacking`: those
/// smaller than what the lacking chunks of their files would cost one by
/// one (packed or plain), in manifest order.
pub fn bundles_to_fetch(
    manifest: &crate::Manifest,
    lacking: &std::collections::HashSet<Hash>,
) -> Vec<usize> {
    manifest
        .bundles
        .iter()
        .enumerate()
        .filter(|(_, b)| {
            let mut seen = std::collections::HashSet::new();
            let alone: u64 = manifest.files[b.first..b.first + b.count]
                .iter()
                .flat_map(|f| f.chunks.iter().map(move |c| (f, c)))
                .filter(|(_, c)| lacking.contains(&c.hash) && seen.insert(c.hash))
                .map(|(f, c)| chunk_cost(f, c))
                .sum();
            b.blob.size < alone
        })
        .map(|(i, _)| i)
        .collect()
}

/// The part of a new file one patch segment rebuilds, and the part of the
/// base it refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub length: u64,
    pub base_offset: u64,
    pub base_length: u64,
}

/// Cuts a file of `chunks` into patch segments against a base of
/// `base_size` bytes: consecutive whole chunks up to [`MAX_PATCH_OUTPUT`]
/// each, referring to all of the base when it fits in
/// [`MAX_PATCH_REFERENCE`], else to the window of that size around the same
/// relative place.
pub fn segments(chunks: &[Chunk], base_size: u64) -> Vec<Segment> {
    let total: u64 = chunks.iter().map(|c| c.size).sum();
    let mut out = Vec::new();
    let mut offset = 0;
    let mut length = 0;
    let close = |offset: u64, length: u64, out: &mut Vec<Segment>| {
        if length == 0 {
            return;
        }
        let (base_offset, base_length) = if base_size <= MAX_PATCH_REFERENCE {
            (0, base_size)
        } else {
            // The middle of this segment, at the same relative place in
            // the base.
            let middle =
                ((offset + length / 2) as u128 * base_size as u128 / total.max(1) as u128) as u64;
            let start = middle
                .saturating_sub(MAX_PATCH_REFERENCE / 2)
                .min(base_size - MAX_PATCH_REFERENCE);
            (start, MAX_PATCH_REFERENCE)
        };
        out.push(Segment {
            offset,
            length,
            base_offset,
            base_length,
        });
    };
    for chunk in chunks {
        if length + chunk.size > MAX_PATCH_OUTPUT {
            close(offset, length, &mut out);
            offset += length;
            length = 0;
        }
        length += chunk.size;
    }
    close(offset, length, &mut out);
    out
}

/// Checks a file's patches: from each base they cover the file whole, in
/// order, each ending on a chunk boundary, within the segment bounds, and
/// no larger than the bytes they rebuild. On error, the index of the
/// offending `Patch` and why.
pub fn check_patches(file: &UpdateFile) -> Result<(), (usize, String)> {
    if file.patches.is_empty() {
        return Ok(());
    }
    let size = file.size.unwrap_or_default();
    let mut boundaries = std::collections::HashSet::with_capacity(file.chunks.len() + 1);
    let mut at = 0u64;
    boundaries.insert(0);
    for c in &file.chunks {
        at += c.size;
        boundaries.insert(at);
    }
    // Where the next patch from each base must start.
    let mut next: BTreeMap<Hash, u64> = BTreeMap::new();
    for (i, p) in file.patches.iter().enumerate() {
        if Some(p.from) == file.hash {
            return Err((i, "patches the file from itself".into()));
        }
        let expected = next.entry(p.from).or_insert(0);
        if p.offset != *expected {
            return Err((
                i,
                format!(
                    "starts at byte {}, where the patches from its base reach byte {expected}",
                    p.offset
                ),
            ));
        }
        let end = p.offset.checked_add(p.length).filter(|e| *e <= size);
        let Some(end) = end.filter(|_| p.length > 0) else {
            return Err((i, format!("Length={} does not fit the file", p.length)));
        };
        if !boundaries.contains(&end) {
            return Err((i, format!("ends at byte {end}, not a chunk boundary")));
        }
        if p.length > MAX_PATCH_OUTPUT {
            return Err((
                i,
                format!("rebuilds {} bytes, more than {MAX_PATCH_OUTPUT}", p.length),
            ));
        }
        if p.base_length > MAX_PATCH_REFERENCE || p.base_offset.checked_add(p.base_length).is_none()
        {
            return Err((
                i,
                format!(
                    "refers to {} bytes of its base, more than {MAX_PATCH_REFERENCE}",
                    p.base_length
                ),
            ));
        }
        if p.blob.size > p.length {
            return Err((
                i,
                format!(
                    "is {} bytes, more than the {} bytes it rebuilds",
                    p.blob.size, p.length
                ),
            ));
        }
        *expected = end;
    }
    if let Some((from, reach)) = next.iter().find(|(_, reach)| **reach != size) {
        return Err((
            file.patches.len() - 1,
            format!("the patches from {from} stop at byte {reach} of {size}"),
        ));
    }
    Ok(())
}

/// The bytes that bring one chunk in: its compressed copy when there is
/// one, else the chunk itself.
pub fn chunk_cost(file: &UpdateFile, chunk: &Chunk) -> u64 {
    file.packed.get(&chunk.hash).map_or(chunk.size, |b| b.size)
}

/// How a file's lacking chunks come in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilePlan {
    /// The base the patches apply to.
    pub base: Option<Hash>,
    /// Patch segments to fetch and apply (indexes into `file.patches`).
    pub patches: Vec<usize>,
    /// Chunks to fetch compressed.
    pub packed: Vec<(Chunk, Blob)>,
    /// Chunks to fetch plain (by Range request).
    pub plain: Vec<Chunk>,
}

impl FilePlan {
    /// Bytes this plan takes over the uplink.
    pub fn cost(&self, file: &UpdateFile) -> u64 {
        self.patches
            .iter()
            .map(|&i| file.patches[i].blob.size)
            .sum::<u64>()
            + self.packed.iter().map(|(_, b)| b.size).sum::<u64>()
            + self.plain.iter().map(|c| c.size).sum::<u64>()
    }
}

/// Plans the cheapest way to bring in a file's chunks that `lacking` says
/// the site lacks: per patch segment, the segment if it is smaller than
/// its lacking chunks (compressed where that pays), against the base
/// (`holds`, and not `failed`) that costs least in all; every other lacking
/// chunk compressed or plain. Never more than the plain chunks.
pub fn plan_file(
    file: &UpdateFile,
    lacking: impl Fn(&Hash) -> bool,
    usable_base: impl Fn(&Hash) -> bool,
) -> FilePlan {
    // Chunks by their offset, to find those in a segment.
    let mut at = 0u64;
    let placed: Vec<(u64, Chunk)> = file
        .chunks
        .iter()
        .map(|c| {
            let start = at;
            at += c.size;
            (start, *c)
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let wanted: Vec<(u64, Chunk)> = placed
        .into_iter()
        .filter(|(_, c)| lacking(&c.hash) && seen.insert(c.hash))
        .collect();
    let chunks_only = || {
        let mut plan = FilePlan::default();
        for (_, c) in &wanted {
            match file.packed.get(&c.hash) {
                Some(b) => plan.packed.push((*c, *b)),
                None => plan.plain.push(*c),
            }
        }
        plan
    };
    let mut best = chunks_only();
    let mut best_cost = best.cost(file);
    let bases: std::collections::BTreeSet<Hash> = file
        .patches
        .iter()
        .map(|p| p.from)
        .filter(|h| usable_base(h))
        .collect();
    for base in bases {
        let mut plan = FilePlan {
            base: Some(base),
            ..FilePlan::default()
        };
        let mut covered = std::collections::HashSet::new();
        for (i, p) in file
            .patches
            .iter()
            .enumerate()
            .filter(|(_, p)| p.from == base)
        {
            let inside: Vec<&(u64, Chunk)> = wanted
                .iter()
                .filter(|(start, _)| *start >= p.offset && *start < p.offset + p.length)
                .collect();
            if inside.is_empty() {
                continue;
            }
            let by_chunks: u64 = inside.iter().map(|(_, c)| chunk_cost(file, c)).sum();
            if p.blob.size < by_chunks {
                plan.patches.push(i);
                covered.extend(inside.iter().map(|(_, c)| c.hash));
            }
        }
        if plan.patches.is_empty() {
            continue;
        }
        for (_, c) in wanted.iter().filter(|(_, c)| !covered.contains(&c.hash)) {
            match file.packed.get(&c.hash) {
                Some(b) => plan.packed.push((*c, *b)),
                None => plan.plain.push(*c),
            }
        }
        let cost = plan.cost(file);
        if cost < best_cost {
            best = plan;
            best_cost = cost;
        }
    }
    best
}

/// Bytes a site that holds nothing of a release takes over the uplink:
/// the bundles worth it, then every other chunk once, compressed where it
/// can be.
pub fn cheapest_without_base(manifest: &crate::Manifest) -> u64 {
    let all: std::collections::HashSet<Hash> = manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.hash))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    let order = ChunkOrder::new(&manifest.files);
    for i in runs_to_fetch(manifest, &order, |h| all.contains(h)) {
        let r = &manifest.runs[i];
        bytes += r.blob.size;
        seen.extend(
            order
                .span(&manifest.files, r.first, r.count)
                .map(|(_, c)| c.hash),
        );
    }
    for i in bundles_to_fetch(manifest, &all) {
        let b = &manifest.bundles[i];
        bytes += b.blob.size;
        for f in &manifest.files[b.first..b.first + b.count] {
            seen.extend(f.chunks.iter().map(|c| c.hash));
        }
    }
    bytes
        + manifest
            .files
            .iter()
            .flat_map(|f| f.chunks.iter().map(move |c| (f, c)))
            .filter(|(_, c)| seen.insert(c.hash))
            .map(|(f, c)| chunk_cost(f, c))
            .sum::<u64>()
}

/// The chunks a patch segment rebuilds: those starting inside it, in order.
pub fn patch_chunks<'a>(file: &'a UpdateFile, patch: &Patch) -> impl Iterator<Item = Chunk> + 'a {
    let (start, end) = (patch.offset, patch.offset + patch.length);
    let mut at = 0u64;
    file.chunks.iter().filter_map(move |c| {
        let here = at;
        at += c.size;
        (here >= start && here < end).then_some(*c)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(size: u64, seed: u8) -> Chunk {
        Chunk {
            size,
            hash: Hash::of(&[seed]),
        }
    }

    const MIB: u64 = 1024 * 1024;

    fn file(chunks: Vec<Chunk>) -> UpdateFile {
        let size = chunks.iter().map(|c| c.size).sum();
        UpdateFile {
            name: "bin/app".into(),
            size: Some(size),
            hash: Some(Hash::of(b"new")),
            chunks,
            ..UpdateFile::default()
        }
    }

    fn with_patches(mut f: UpdateFile, base: Hash, base_size: u64, sizes: &[u64]) -> UpdateFile {
        for (i, s) in segments(&f.chunks, base_size).into_iter().enumerate() {
            f.patches.push(Patch {
                from: base,
                offset: s.offset,
                length: s.length,
                base_offset: s.base_offset,
                base_length: s.base_length,
                blob: Blob {
                    size: sizes[i],
                    hash: Hash::of(&[i as u8, 9]),
                },
            });
        }
        f
    }

    #[test]
    fn segments_hold_whole_chunks_and_bounded_references() {
        let chunks: Vec<Chunk> = (0..20).map(|i| chunk(3 * MIB, i)).collect();
        let small = segments(&chunks, 10 * MIB);
        // 3 MiB chunks, at most 8 MiB a segment: two chunks each.
        assert_eq!(small.len(), 10);
        assert!(small.iter().all(|s| s.length == 6 * MIB));
        assert!(small
            .iter()
            .all(|s| (s.base_offset, s.base_length) == (0, 10 * MIB)));
        let big = segments(&chunks, 120 * MIB);
        assert!(big.iter().all(|s| s.base_length == MAX_PATCH_REFERENCE));
        assert_eq!(big[0].base_offset, 0);
        assert_eq!(big[9].base_offset, 120 * MIB - MAX_PATCH_REFERENCE);
        // The middle segment refers to the middle of the base.
        let mid = big[5];
        let centre = mid.base_offset + mid.base_length / 2;
        assert!(centre.abs_diff(66 * MIB) <= MIB, "{mid:?}");
        let f = with_patches(file(chunks), Hash::of(b"old"), 120 * MIB, &[MIB; 10]);
        assert_eq!(check_patches(&f), Ok(()));
    }

    #[test]
    fn patches_that_leave_a_gap_or_overrun_are_refused() {
        let chunks: Vec<Chunk> = (0..6).map(|i| chunk(3 * MIB, i)).collect();
        let good = with_patches(file(chunks), Hash::of(b"old"), 10 * MIB, &[MIB; 3]);
        let mut gap = good.clone();
        gap.patches.remove(1);
        assert!(check_patches(&gap)
            .expect_err("refused")
            .1
            .contains("where the patches"));
        let mut short = good.clone();
        short.patches.pop();
        assert!(check_patches(&short)
            .expect_err("refused")
            .1
            .contains("stop at byte"));
        let mut mid_chunk = good.clone();
        mid_chunk.patches[0].length -= 1;
        assert!(check_patches(&mid_chunk).is_err());
        let mut big = good.clone();
        big.patches[0].blob.size = big.patches[0].length + 1;
        assert!(check_patches(&big)
            .expect_err("refused")
            .1
            .contains("more than the"));
        let mut wide = good.clone();
        wide.patches[0].base_length = MAX_PATCH_REFERENCE + 1;
        assert!(check_patches(&wide).is_err());
        let mut itself = good;
        itself.patches[0].from = itself.hash.expect("hash");
        assert!(check_patches(&itself).is_err());
    }

    #[test]
    fn the_plan_takes_the_patch_only_where_it_is_cheaper() {
        let base = Hash::of(b"old");
        let chunks: Vec<Chunk> = (0..6).map(|i| chunk(3 * MIB, i)).collect();
        let mut f = with_patches(file(chunks.clone()), base, 10 * MIB, &[MIB, 7 * MIB, 100]);
        f.packed.insert(
            chunks[2].hash,
            Blob {
                size: MIB,
                hash: Hash::of(b"z"),
            },
        );
        let all = |_: &Hash| true;
        let plan = plan_file(&f, all, |h| *h == base);
        assert_eq!(plan.base, Some(base));
        // Segment 1 (7 MiB) loses to its chunks (1 MiB packed + 3 MiB).
        assert_eq!(plan.patches, vec![0, 2]);
        assert_eq!(plan.packed.len(), 1);
        assert_eq!(plan.plain, vec![chunks[3]]);
        assert_eq!(plan.cost(&f), MIB + 100 + MIB + 3 * MIB);
        // Without the base: chunks only, compressed where they can be.
        let without = plan_file(&f, all, |_| false);
        assert_eq!(without.base, None);
        assert_eq!(without.cost(&f), 5 * 3 * MIB + MIB);
        // Only what the site lacks: a segment whose chunks are all held
        // is not fetched.
        let lacking = |h: &Hash| *h == chunks[5].hash;
        let plan = plan_file(&f, lacking, |h| *h == base);
        assert_eq!(plan.patches, vec![2]);
        assert!(plan.plain.is_empty() && plan.packed.is_empty());
        assert_eq!(
            patch_chunks(&f, &f.patches[2]).collect::<Vec<_>>(),
            chunks[4..]
        );
    }

    fn small(name: &str, size: u64) -> UpdateFile {
        UpdateFile {
            name: name.into(),
            size: Some(size),
            hash: Some(Hash::of(name.as_bytes())),
            chunks: vec![Chunk {
                size,
                hash: Hash::of(name.as_bytes()),
            }],
            ..UpdateFile::default()
        }
    }

    fn tree(sizes: impl IntoIterator<Item = u64>) -> Vec<UpdateFile> {
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, size)| small(&format!("d{}/f{i:06}", i % 7), size))
            .collect()
    }

    #[test]
    fn small_files_bundle_in_runs_that_a_changed_file_does_not_move() {
        let files = tree((0..4000).map(|i| 1000 + (i * 37 % 3000)));
        let runs = bundle_runs(&files);
        // Every file in one run, in order, none over the limit.
        let mut next = 0;
        for &(first, count) in &runs {
            assert_eq!(first, next);
            let bytes: u64 = files[first..first + count]
                .iter()
                .filter_map(|f| f.size)
                .sum();
            assert!(bytes <= MAX_BUNDLE);
            next = first + count;
        }
        assert_eq!(next, files.len());
        let total: u64 = files.iter().filter_map(|f| f.size).sum();
        let average = total / runs.len() as u64;
        assert!(
            (BUNDLE_MIN..=BUNDLE_MIN + 3 * BUNDLE_SPREAD).contains(&average),
            "{} runs of {average} bytes on average",
            runs.len()
        );
        // A file changed (other bytes, other size) moves only its run's
        // end: every run before it and all but one after it stay.
        let mut changed = files.clone();
        changed[2000] = small("d5/f002000", 2222);
        changed[2000].hash = Some(Hash::of(b"new bytes"));
        let after = bundle_runs(&changed);
        let same = after.iter().filter(|r| runs.contains(r)).count();
        assert!(same + 2 >= runs.len(), "{same} of {} runs kept", runs.len());
    }

    #[test]
    fn a_large_or_empty_file_ends_a_run_and_is_not_bundled() {
        let mut files = tree([100, 200, 300]);
        files.insert(1, small("big", crate::chunk::MIN_CHUNK as u64));
        files.push(UpdateFile {
            name: "empty".into(),
            size: Some(0),
            hash: Some(Hash::of(b"")),
            ..UpdateFile::default()
        });
        assert_eq!(bundle_runs(&files), vec![(0, 1), (2, 2)]);
    }

    fn manifest(files: Vec<UpdateFile>, bundles: Vec<(usize, usize, u64)>) -> crate::Manifest {
        crate::Manifest {
            format: crate::manifest::Format::V2,
            url: "http://o/".into(),
            update_time: None,
            version: "1".parse().ok(),
            expires: None,
            files,
            restart: Default::default(),
            bundles: bundles
                .into_iter()
                .map(|(first, count, size)| crate::manifest::Bundle {
                    first,
                    count,
                    blob: Blob {
                        size,
                        hash: Hash::of(&[first as u8]),
                    },
                })
                .collect(),
            runs: Vec::new(),
        }
    }

    /// Files `name{i}` of the given chunk sizes (seeds from `seed`).
    fn big_files(sizes: &[&[u64]], seed: u8) -> Vec<UpdateFile> {
        let mut n = seed;
        sizes
            .iter()
            .enumerate()
            .map(|(i, sizes)| {
                let chunks = sizes
                    .iter()
                    .map(|s| {
                        n = n.wrapping_add(1);
                        chunk(*s, n)
                    })
                    .collect();
                UpdateFile {
                    name: format!("name{i}"),
                    ..file(chunks)
                }
            })
            .collect()
    }

    #[test]
    fn runs_hold_consecutive_chunks_of_large_files_within_the_bound() {
        let mut files = big_files(&[&[MIB; 10], &[], &[3 * MIB, 2 * MIB], &[MIB; 3]], 0);
        // A small file between them: it crosses in a bundle.
        files.insert(2, small("small", 1000));
        let order = ChunkOrder::new(&files);
        assert_eq!(order.len(), 16);
        let runs = run_spans(&files);
        assert!(!runs.is_empty());
        let mut next = 0;
        for &(first, count) in &runs {
            assert!(first >= next && count >= 2, "{runs:?}");
            let span: Vec<_> = order.span(&files, first, count).collect();
            assert_eq!(span.len(), count);
            assert!(span.iter().map(|(_, c)| c.size).sum::<u64>() <= MAX_RUN);
            assert!(span.iter().all(|(f, _)| !bundled(&files[*f])), "{runs:?}");
            next = first + count;
        }
        // The small file's chunk (index 10, after the empty file) is in
        // none; the chunks after it are.
        assert!(runs.iter().all(|&(f, c)| !(f..f + c).contains(&10)));
        let covered: usize = runs.iter().map(|(_, c)| c).sum();
        assert!(covered >= 13, "{runs:?}");
        // Spans across an empty file and into the next file's chunks.
        let across: Vec<(usize, u64)> =
            order.span(&files, 9, 4).map(|(f, c)| (f, c.size)).collect();
        assert_eq!(
            across,
            vec![(0, MIB), (2, 1000), (3, 3 * MIB), (3, 2 * MIB)]
        );
        // A changed chunk at the start leaves the later runs where they
        // were.
        let long = big_files(&[&[MIB; 40]], 0);
        let mut changed = long.clone();
        changed[0].chunks[0] = chunk(MIB, 200);
        let (a, b) = (run_spans(&long), run_spans(&changed));
        assert!(a.len() >= 3, "{a:?}");
        assert_eq!(a[1..], b[1..]);
    }

    #[test]
    fn runs_that_overlap_overrun_or_do_not_save_are_refused() {
        let files = big_files(&[&[2 * MIB; 4], &[2 * MIB; 6]], 0);
        let with = |runs: Vec<(usize, usize, u64)>| {
            let mut m = manifest(files.clone(), vec![]);
            m.runs = runs
                .into_iter()
                .map(|(first, count, size)| crate::manifest::Run {
                    first,
                    count,
                    blob: Blob {
                        size,
                        hash: Hash::of(&[first as u8, 7]),
                    },
                })
                .collect();
            check_runs(&m)
        };
        assert_eq!(with(vec![(0, 3, 500), (3, 5, 500)]), Ok(()));
        assert_eq!(
            with(vec![(0, 3, 500), (2, 2, 500)]).expect_err("overlap").0,
            1
        );
        assert!(with(vec![(8, 3, 5)])
            .expect_err("out")
            .1
            .contains("names chunks 8 to 11 of 10"));
        assert!(with(vec![(0, 0, 5)])
            .expect_err("none")
            .1
            .contains("no chunk"));
        assert!(with(vec![(0, 9, 5)]).expect_err("big").1.contains("over"));
        assert!(with(vec![(0, 2, 4 * MIB)])
            .expect_err("no saving")
            .1
            .contains("not smaller"));
    }

    #[test]
    fn a_run_is_fetched_only_when_it_costs_less_than_its_lacking_chunks() {
        let files = big_files(&[&[MIB; 6]], 0);
        let mut m = manifest(files, vec![]);
        m.runs = vec![crate::manifest::Run {
            first: 0,
            count: 6,
            blob: Blob {
                size: 2 * MIB,
                hash: Hash::of(b"run"),
            },
        }];
        let order = ChunkOrder::new(&m.files);
        let all: std::collections::HashSet<Hash> =
            m.files[0].chunks.iter().map(|c| c.hash).collect();
        assert_eq!(runs_to_fetch(&m, &order, |h| all.contains(h)), vec![0]);
        let one = m.files[0].chunks[2].hash;
        assert!(runs_to_fetch(&m, &order, |h| *h == one).is_empty());
        // Packed copies that cost less than the run, together.
        for c in m.files[0].chunks.clone() {
            m.files[0].packed.insert(
                c.hash,
                Blob {
                    size: MIB / 4,
                    hash: Hash::of(&c.hash.0),
                },
            );
        }
        assert!(runs_to_fetch(&m, &order, |h| all.contains(h)).is_empty());
    }

    #[test]
    fn bundles_that_overlap_overrun_or_do_not_save_are_refused() {
        let files = || tree([1000, 1000, 1000, 1000]);
        assert_eq!(
            check_bundles(&manifest(files(), vec![(0, 2, 500), (2, 2, 500)])),
            Ok(())
        );
        let refused = |bundles| check_bundles(&manifest(files(), bundles)).expect_err("refused");
        assert_eq!(refused(vec![(0, 2, 500), (1, 2, 500)]).0, 1);
        assert!(refused(vec![(3, 2, 500)])
            .1
            .contains("names files 3 to 5 of 4"));
        assert!(refused(vec![(0, 0, 1)]).1.contains("no file"));
        assert!(refused(vec![(0, 1, 1000)]).1.contains("not smaller"));
        let mut with_big = files();
        with_big[1] = small("big", crate::chunk::MIN_CHUNK as u64);
        let e = check_bundles(&manifest(with_big, vec![(0, 2, 10)])).expect_err("big");
        assert!(e.1.contains("\"big\""), "{e:?}");
    }

    #[test]
    fn a_bundle_is_fetched_when_it_costs_less_than_its_lacking_files() {
        let files = tree([1000, 1000, 1000, 1000]);
        let m = manifest(files.clone(), vec![(0, 4, 1500)]);
        let all: std::collections::HashSet<Hash> = files.iter().map(|f| f.chunks[0].hash).collect();
        assert_eq!(bundles_to_fetch(&m, &all), vec![0]);
        assert_eq!(cheapest_without_base(&m), 1500);
        // One file lacking: 1000 bytes plain beat the 1500-byte bundle.
        let one: std::collections::HashSet<Hash> = [files[2].chunks[0].hash].into();
        assert!(bundles_to_fetch(&m, &one).is_empty());
    }
}
