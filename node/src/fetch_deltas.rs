//! Taking a release from the origin the cheapest way: patches against files
//! this node holds, then runs of chunks compressed together, then packed
//! chunks, then bundles of small files, then plain Range requests
//! ([`crate::fetch::fetch_missing`]) for the rest.
//!
//! What to take is decided per file by `lanup_protocol::delta::plan_file`.
//! A patch or packed chunk is a blob named by its hash in the signed
//! manifest: it is checked against that hash before it is decoded, decoded
//! within the sizes the manifest names, and every chunk it yields is
//! checked against its own hash before it enters the store. A blob that
//! fails (base damaged, output wrong, decoder error, blob missing or
//! wrong) is reported once and its chunks are taken plainly; it is not
//! tried again for as long as the node runs.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use lanup_protocol::chunk::Chunk;
use lanup_protocol::delta::{
    bundles_to_fetch, patch_chunks, plan_file, run_pays, runs_to_fetch, ChunkOrder,
};
use lanup_protocol::manifest::{Blob, Bundle, Patch, Run, UpdateFile};
use lanup_protocol::{Hash, Manifest};
use reqwest::header::RANGE;
use reqwest::StatusCode;
use tracing::{info, warn};

use crate::fetch::{content_range_start, fetch_missing, file_url, FetchError, FetchReport, Origin};
use crate::release_store::STORE_DIR;
use crate::store::{ChunkStore, StoreError};

/// How many requests in a row for one blob may end with no byte before the
/// download gives up (as for chunks).
const QUIET_ATTEMPTS: u32 = 5;

/// How many fallbacks the node remembers to show.
const NOTES: usize = 8;

/// Files this node holds that patches may apply to, by BLAKE3: the
/// installed release's files and those of releases it staged.
///
/// One entry per distinct file, with its name in one string: about 70
/// bytes a file however many releases hold it (a map to full paths took
/// about 290 bytes a file, 28 MB for a release of 100,000 small files, for
/// as long as the node ran). No manifest is kept for it.
#[derive(Debug, Clone, Default)]
pub struct Bases {
    /// The folders the files are in.
    dirs: Vec<PathBuf>,
    /// (file hash, folder, name's start and length in `names`), sorted by
    /// hash, one per hash: the first folder added that holds it.
    files: Vec<(Hash, u32, u32, u32)>,
    names: String,
    /// The lanup binary this node runs.
    binary: Option<(Hash, PathBuf)>,
}

impl Bases {
    /// Adds the files of `manifest` found under `dir` (call
    /// [`Bases::index`] once all are added).
    fn add(&mut self, manifest: &Manifest, dir: PathBuf) {
        let d = self.dirs.len() as u32;
        for f in &manifest.files {
            let Some(hash) = f.hash else { continue };
            let start = self.names.len() as u32;
            self.names.push_str(&f.name);
            self.files.push((hash, d, start, f.name.len() as u32));
        }
        self.dirs.push(dir);
    }

    /// Sorts the files by hash, keeps the first of each, and packs their
    /// names.
    fn index(&mut self) {
        // Stable: of equal hashes, the folder added first comes first.
        self.files.sort_by_key(|(h, ..)| *h);
        self.files.dedup_by_key(|(h, ..)| *h);
        self.files.shrink_to_fit();
        let mut names = String::with_capacity(self.files.iter().map(|f| f.3 as usize).sum());
        for (_, _, start, len) in &mut self.files {
            let name = &self.names[*start as usize..(*start + *len) as usize];
            *start = names.len() as u32;
            names.push_str(name);
        }
        self.names = names;
    }

    /// What a node with state folder `state` holds: its installed
    /// release, the releases it staged, and the lanup binary it runs.
    /// Manifests the node holds already (`known`: installed or staged) are
    /// not read again; others are read one at a time.
    pub fn of_node(state: &Path, known: &[&Manifest]) -> Bases {
        let mut bases = Bases::default();
        let is_known = |name: &str| known.iter().find(|m| m.release_name() == name).copied();
        if let Ok(Some(record)) = crate::apply::read_install_record(state) {
            match is_known(&record.version) {
                Some(manifest) => bases.add(manifest, record.install_dir.clone()),
                None => {
                    if let Ok(Some(installed)) = crate::apply::read_installed(state) {
                        bases.add(&installed.manifest, installed.record.install_dir);
                    }
                }
            }
        }
        for manifest in known {
            let dir = state.join("staging").join(manifest.release_folder());
            if dir.is_dir() {
                bases.add(manifest, dir);
            }
        }
        let skip: Vec<String> = known.iter().map(|m| m.release_name()).collect();
        crate::stage::each_kept(state, &skip, |staged| {
            bases.add(&staged.manifest, staged.dir)
        });
        bases.index();
        // Hashed once: the binary a node runs does not change under it.
        static LANUP: std::sync::OnceLock<Option<(Hash, PathBuf)>> = std::sync::OnceLock::new();
        bases.binary = LANUP
            .get_or_init(|| {
                let binary = crate::upgrade::binary().ok()?;
                Some((crate::release::hash_file(&binary).ok()?, binary))
            })
            .clone();
        bases
    }

    /// Where this node holds a file with `hash` (as far as it knows: the
    /// file is checked before it is used).
    fn path(&self, hash: &Hash) -> Option<PathBuf> {
        if let Ok(at) = self.files.binary_search_by_key(hash, |(h, ..)| *h) {
            let (_, d, start, len) = self.files[at];
            let name = &self.names[start as usize..(start + len) as usize];
            return Some(self.dirs[d as usize].join(name));
        }
        self.binary
            .as_ref()
            .filter(|(h, _)| h == hash)
            .map(|(_, path)| path.clone())
    }

    /// Whether this node holds a file with `hash` (as far as it knows: the
    /// file is checked before it is used).
    pub fn holds(&self, hash: &Hash) -> bool {
        self.files.binary_search_by_key(hash, |(h, ..)| *h).is_ok()
            || self.binary.as_ref().is_some_and(|(h, _)| h == hash)
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.binary.is_none()
    }

    /// Bytes `offset..offset + length` of the base `hash`, after checking
    /// once that the whole file still hashes to it.
    fn read(
        &self,
        hash: &Hash,
        offset: u64,
        length: u64,
        checked: &Mutex<HashSet<Hash>>,
    ) -> Result<Vec<u8>, String> {
        let path = self
            .path(hash)
            .ok_or_else(|| format!("no file with hash {hash} here"))?;
        let path = &path;
        let known_good = checked.lock().map(|c| c.contains(hash)).unwrap_or(false);
        if !known_good {
            let actual = crate::release::hash_file(path)
                .map_err(|e| format!("cannot read the base {}: {e}", path.display()))?;
            if actual != *hash {
                return Err(format!(
                    "the base {} changed on disk (hashes to {actual})",
                    path.display()
                ));
            }
            if let Ok(mut c) = checked.lock() {
                c.insert(*hash);
            }
        }
        crate::release_store::read_range(path, offset, length)
            .map_err(|e| format!("the base: {e:#}"))
    }
}

/// Patches and packed chunks that failed on this node, so they are not
/// tried again, and the last few reasons, to show.
#[derive(Debug, Default)]
pub struct Fallbacks {
    /// (file hash, base hash) pairs whose patches failed.
    patches: HashSet<(Hash, Hash)>,
    /// Packed chunks, runs and bundles that failed, by blob.
    packed: HashSet<Hash>,
    notes: VecDeque<String>,
}

impl Fallbacks {
    fn note(&mut self, reason: String) {
        warn!(reason = %reason, "taking plain chunks instead");
        if self.notes.len() == NOTES {
            self.notes.pop_front();
        }
        self.notes.push_back(reason);
    }

    /// The last few reasons a patch or packed chunk was not used, oldest
    /// first.
    pub fn notes(&self) -> Vec<String> {
        self.notes.iter().cloned().collect()
    }
}

/// Why a blob could not be used.
enum BlobError {
    /// This blob will not help: its chunks are taken another way.
    Unusable(String),
    /// The origin or this node failed: the download stops (and backs off).
    Fetch(FetchError),
}

/// Fetches what `store` lacks of `manifest` and `wanted` still asks for,
/// the cheapest way: patches from `bases`, runs, packed chunks, bundles,
/// then plain chunks. `on_chunk` is told of every chunk stored.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_release(
    origin: &Origin,
    manifest: &Manifest,
    store: &ChunkStore,
    bases: &Bases,
    fallbacks: &Mutex<Fallbacks>,
    wanted: impl Fn(&Hash) -> bool,
    mut on_chunk: impl FnMut(&Chunk),
) -> Result<FetchReport, FetchError> {
    let src = Inputs {
        origin,
        manifest,
        store,
        bases,
        fallbacks,
    };
    let mut t = Tally::default();
    // Patches first: against a base, a changed file costs a fraction of
    // any compressed copy.
    patch_pass(&src, &mut t, &wanted, &mut on_chunk).await?;
    // Then runs: what the site has no base for, compressed as a stream.
    run_pass(&src, &mut t, &wanted, &mut on_chunk).await?;
    // Then each chunk still lacking, packed where that pays.
    packed_pass(&src, &mut t, &wanted, &mut on_chunk).await?;
    bundle_pass(&src, &mut t, &wanted, &mut on_chunk).await?;
    let mut report = t.report;
    let plain = fetch_missing(origin, manifest, store, &wanted, &mut on_chunk).await?;
    report.bytes += plain.bytes;
    report.chunks += plain.chunks;
    report.requests += plain.requests;
    report.already_held = plain.already_held.saturating_sub(t.gained);
    if report.patches + report.runs + report.packed + report.bundles > 0 {
        info!(
            patches = report.patches,
            runs = report.runs,
            packed = report.packed,
            bundles = report.bundles,
            bytes = report.bytes,
            "took patches, runs, packed chunks and bundles from the origin"
        );
    }
    Ok(report)
}

/// What every pass of a download reads.
struct Inputs<'a> {
    origin: &'a Origin,
    manifest: &'a Manifest,
    store: &'a ChunkStore,
    bases: &'a Bases,
    fallbacks: &'a Mutex<Fallbacks>,
}

impl Inputs<'_> {
    /// How to take what `file` lacks: from bases this node holds, but not
    /// by a patch that failed before.
    fn plan(
        &self,
        file: &UpdateFile,
        file_hash: Hash,
        lacking: impl Fn(&Hash) -> bool,
    ) -> Result<lanup_protocol::delta::FilePlan, FetchError> {
        let failed = self.fallbacks.lock().map_err(|_| poisoned())?;
        Ok(plan_file(file, lacking, |b| {
            self.bases.holds(b) && !failed.patches.contains(&(file_hash, *b))
        }))
    }

    /// Whether a compressed blob proved unusable before (its chunks are
    /// taken another way).
    fn gave_up_on(&self, blob: &Blob) -> Result<bool, FetchError> {
        let f = self.fallbacks.lock().map_err(|_| poisoned())?;
        Ok(f.packed.contains(&blob.hash))
    }

    /// A compressed blob proved unusable: not asked for again, and `why`
    /// is shown.
    fn give_up(&self, blob: &Blob, why: String) -> Result<(), FetchError> {
        let mut f = self.fallbacks.lock().map_err(|_| poisoned())?;
        f.packed.insert(blob.hash);
        f.note(why);
        Ok(())
    }
}

/// What the passes took: the report, and the bytes of chunks rebuilt or
/// unpacked here (which the plain pass then finds held).
#[derive(Default)]
struct Tally {
    report: FetchReport,
    gained: u64,
}

/// Patches, file by file; one that fails is planned again without its
/// base.
async fn patch_pass(
    src: &Inputs<'_>,
    t: &mut Tally,
    wanted: &impl Fn(&Hash) -> bool,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<(), FetchError> {
    let checked = Mutex::new(HashSet::new());
    let lacking = |h: &Hash| wanted(h) && !src.store.has(h);
    for file in &src.manifest.files {
        // Every file of a validated manifest has its hash.
        let Some(file_hash) = file.hash else { continue };
        // Planned again after a patch fails: the next base, if any.
        'plan: loop {
            if !file.chunks.iter().any(|c| lacking(&c.hash)) {
                break;
            }
            let plan = src.plan(file, file_hash, lacking)?;
            for &i in &plan.patches {
                let patch = &file.patches[i];
                if !patch_chunks(file, patch).any(|c| lacking(&c.hash)) {
                    continue;
                }
                match apply_one(
                    src.origin,
                    file,
                    patch,
                    src.store,
                    src.bases,
                    &checked,
                    &mut t.report,
                )
                .await
                {
                    Ok(stored) => {
                        t.report.patches += 1;
                        t.gained += took(&stored, &mut t.report, on_chunk);
                    }
                    Err(BlobError::Fetch(e)) => return Err(e),
                    Err(BlobError::Unusable(reason)) => {
                        let mut f = src.fallbacks.lock().map_err(|_| poisoned())?;
                        f.patches.insert((file_hash, patch.from));
                        f.note(format!(
                            "{}: the patch from {} did not rebuild it: {reason}",
                            file.name, patch.from
                        ));
                        continue 'plan;
                    }
                }
            }
            break;
        }
    }
    Ok(())
}

/// Runs of chunks compressed as a stream, while they still pay.
async fn run_pass(
    src: &Inputs<'_>,
    t: &mut Tally,
    wanted: &impl Fn(&Hash) -> bool,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<(), FetchError> {
    let lacking = |h: &Hash| wanted(h) && !src.store.has(h);
    if !src.manifest.runs.is_empty() {
        let order = ChunkOrder::new(&src.manifest.files);
        for i in runs_to_fetch(src.manifest, &order, lacking) {
            let run = &src.manifest.runs[i];
            // Asked again: what a peer or an earlier run brought meanwhile
            // may make the chunks left cheaper one by one.
            if !run_pays(src.manifest, &order, run, lacking) {
                continue;
            }
            if src.gave_up_on(&run.blob)? {
                continue;
            }
            match unrun_one(
                src.origin,
                src.manifest,
                &order,
                run,
                src.store,
                &lacking,
                &mut t.report,
            )
            .await
            {
                Ok(stored) => {
                    t.report.runs += 1;
                    t.gained += took(&stored, &mut t.report, on_chunk);
                }
                Err(BlobError::Fetch(e)) => return Err(e),
                Err(BlobError::Unusable(reason)) => {
                    let name = order
                        .span(&src.manifest.files, run.first, 1)
                        .next()
                        .map_or("", |(f, _)| src.manifest.files[f].name.as_str());
                    let why = format!(
                        "the run of {} chunks from \"{name}\" is unusable: {reason}",
                        run.count
                    );
                    src.give_up(&run.blob, why)?;
                }
            }
        }
    }
    Ok(())
}

/// Each chunk still lacking, packed where that pays.
async fn packed_pass(
    src: &Inputs<'_>,
    t: &mut Tally,
    wanted: &impl Fn(&Hash) -> bool,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<(), FetchError> {
    let lacking = |h: &Hash| wanted(h) && !src.store.has(h);
    for file in &src.manifest.files {
        let Some(file_hash) = file.hash else { continue };
        if !file.chunks.iter().any(|c| lacking(&c.hash)) {
            continue;
        }
        let plan = src.plan(file, file_hash, lacking)?;
        for (chunk, blob) in &plan.packed {
            if !lacking(&chunk.hash) || src.gave_up_on(blob)? {
                continue;
            }
            match unpack_one(src.origin, chunk, blob, src.store, &mut t.report).await {
                Ok(()) => {
                    t.report.packed += 1;
                    t.report.chunks += 1;
                    t.gained += chunk.size;
                    on_chunk(chunk);
                }
                Err(BlobError::Fetch(e)) => return Err(e),
                Err(BlobError::Unusable(reason)) => {
                    let why = format!(
                        "{}: the packed copy of chunk {} is unusable: {reason}",
                        file.name, chunk.hash
                    );
                    src.give_up(blob, why)?;
                }
            }
        }
    }
    Ok(())
}

/// Bundles of small files still lacking.
async fn bundle_pass(
    src: &Inputs<'_>,
    t: &mut Tally,
    wanted: &impl Fn(&Hash) -> bool,
    on_chunk: &mut impl FnMut(&Chunk),
) -> Result<(), FetchError> {
    let lacking: HashSet<Hash> = src
        .manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.hash))
        .filter(|h| wanted(h) && !src.store.has(h))
        .collect();
    for i in bundles_to_fetch(src.manifest, &lacking) {
        let bundle = &src.manifest.bundles[i];
        if src.gave_up_on(&bundle.blob)? {
            continue;
        }
        match unbundle_one(
            src.origin,
            src.manifest,
            bundle,
            src.store,
            &lacking,
            &mut t.report,
        )
        .await
        {
            Ok(stored) => {
                t.report.bundles += 1;
                t.gained += took(&stored, &mut t.report, on_chunk);
            }
            Err(BlobError::Fetch(e)) => return Err(e),
            Err(BlobError::Unusable(reason)) => {
                let why = format!(
                    "the bundle of {} files from \"{}\" is unusable: {reason}",
                    bundle.count, src.manifest.files[bundle.first].name
                );
                src.give_up(&bundle.blob, why)?;
            }
        }
    }
    Ok(())
}

/// Counts the chunks a patch or bundle yielded and tells `on_chunk` of
/// each; returns their bytes.
fn took(stored: &[Chunk], report: &mut FetchReport, on_chunk: &mut impl FnMut(&Chunk)) -> u64 {
    report.chunks += stored.len();
    stored.iter().for_each(on_chunk);
    stored.iter().map(|c| c.size).sum()
}

fn poisoned() -> FetchError {
    FetchError::Network(anyhow::anyhow!("the fetcher's fallback record is poisoned"))
}

/// Fetches one patch segment, rebuilds its chunks from the base and stores
/// them; returns the chunks stored.
async fn apply_one(
    origin: &Origin,
    file: &UpdateFile,
    patch: &Patch,
    store: &ChunkStore,
    bases: &Bases,
    checked: &Mutex<HashSet<Hash>>,
    report: &mut FetchReport,
) -> Result<Vec<Chunk>, BlobError> {
    // The base first: a damaged base costs no download.
    let reference = bases
        .read(&patch.from, patch.base_offset, patch.base_length, checked)
        .map_err(BlobError::Unusable)?;
    let blob = fetch_blob(origin, &patch.blob, report).await?;
    let chunks: Vec<Chunk> = patch_chunks(file, patch).collect();
    let store = store.clone();
    let length = patch.length;
    tokio::task::spawn_blocking(move || {
        let rebuilt = crate::delta::apply_patch(&reference, &blob, length)
            .map_err(|e| BlobError::Unusable(e.to_string()))?;
        drop(reference);
        let mut at = 0usize;
        for chunk in &chunks {
            let end = at + chunk.size as usize;
            match store.put(chunk, &rebuilt[at..end]) {
                Ok(()) => {}
                Err(StoreError::Corrupt { .. }) => {
                    return Err(BlobError::Unusable(format!(
                        "its output is not chunk {} (bytes {at}..{end})",
                        chunk.hash
                    )))
                }
                Err(e) => return Err(BlobError::Fetch(FetchError::LocalDisk(e))),
            }
            at = end;
        }
        Ok(chunks)
    })
    .await
    .map_err(|e| BlobError::Fetch(FetchError::Network(e.into())))?
}

/// Fetches one packed chunk, decodes it and stores it.
async fn unpack_one(
    origin: &Origin,
    chunk: &Chunk,
    blob: &Blob,
    store: &ChunkStore,
    report: &mut FetchReport,
) -> Result<(), BlobError> {
    let bytes = fetch_blob(origin, blob, report).await?;
    let store = store.clone();
    let chunk = *chunk;
    tokio::task::spawn_blocking(move || {
        let data = crate::delta::unpack(&bytes, chunk.size)
            .map_err(|e| BlobError::Unusable(e.to_string()))?;
        match store.put(&chunk, &data) {
            Ok(()) => Ok(()),
            Err(StoreError::Corrupt { .. }) => Err(BlobError::Unusable(
                "it decodes to other bytes than the chunk".into(),
            )),
            Err(e) => Err(BlobError::Fetch(FetchError::LocalDisk(e))),
        }
    })
    .await
    .map_err(|e| BlobError::Fetch(FetchError::Network(e.into())))?
}

/// Fetches one run, decodes it and stores its chunks this node lacks;
/// returns the chunks stored.
async fn unrun_one(
    origin: &Origin,
    manifest: &Manifest,
    order: &ChunkOrder,
    run: &Run,
    store: &ChunkStore,
    lacking: &impl Fn(&Hash) -> bool,
    report: &mut FetchReport,
) -> Result<Vec<Chunk>, BlobError> {
    let mut seen = HashSet::new();
    let chunks: Vec<(Chunk, bool)> = order
        .span(&manifest.files, run.first, run.count)
        .map(|(_, c)| (*c, lacking(&c.hash) && seen.insert(c.hash)))
        .collect();
    // A validated manifest's run holds at most `MAX_RUN` bytes.
    let total: u64 = chunks.iter().map(|(c, _)| c.size).sum();
    let bytes = fetch_blob(origin, &run.blob, report).await?;
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let unusable = |e: crate::delta::DecodeError| BlobError::Unusable(e.to_string());
        let mut pieces = crate::delta::Pieces::new(&bytes, total).map_err(unusable)?;
        let mut stored = Vec::new();
        let mut at = 0u64;
        for (chunk, lacks) in chunks {
            let data = pieces.next(chunk.size).map_err(unusable)?;
            if lacks {
                match store.put(&chunk, data) {
                    Ok(()) => stored.push(chunk),
                    Err(StoreError::Corrupt { .. }) => {
                        return Err(BlobError::Unusable(format!(
                            "its bytes {at}..{} are not chunk {}",
                            at + chunk.size,
                            chunk.hash
                        )))
                    }
                    Err(e) => return Err(BlobError::Fetch(FetchError::LocalDisk(e))),
                }
            }
            at += chunk.size;
        }
        pieces.finish().map_err(unusable)?;
        Ok(stored)
    })
    .await
    .map_err(|e| BlobError::Fetch(FetchError::Network(e.into())))?
}

/// Fetches one bundle, decodes it and stores the chunks of its files that
/// are in `lacking`; returns the chunks stored.
async fn unbundle_one(
    origin: &Origin,
    manifest: &Manifest,
    bundle: &Bundle,
    store: &ChunkStore,
    lacking: &HashSet<Hash>,
    report: &mut FetchReport,
) -> Result<Vec<Chunk>, BlobError> {
    // A validated manifest's bundle holds files of one chunk each.
    let files: Vec<(String, Option<Chunk>, u64)> = manifest.files
        [bundle.first..bundle.first + bundle.count]
        .iter()
        .map(|f| {
            (
                f.name.clone(),
                f.chunks.first().copied(),
                f.size.unwrap_or_default(),
            )
        })
        .collect();
    let total: u64 = files.iter().map(|(_, _, size)| size).sum();
    let bytes = fetch_blob(origin, &bundle.blob, report).await?;
    let store = store.clone();
    let lacking: Vec<bool> = files
        .iter()
        .map(|(_, c, _)| c.is_some_and(|c| lacking.contains(&c.hash)))
        .collect();
    tokio::task::spawn_blocking(move || {
        let data =
            crate::delta::unpack(&bytes, total).map_err(|e| BlobError::Unusable(e.to_string()))?;
        drop(bytes);
        let mut stored = Vec::new();
        let mut at = 0usize;
        for ((name, chunk, size), lacks) in files.iter().zip(lacking) {
            let end = at + *size as usize;
            if let (Some(chunk), true) = (chunk, lacks) {
                match store.put(chunk, &data[at..end]) {
                    Ok(()) => stored.push(*chunk),
                    Err(StoreError::Corrupt { .. }) => {
                        return Err(BlobError::Unusable(format!(
                            "its bytes for \"{name}\" are not that file"
                        )))
                    }
                    Err(e) => return Err(BlobError::Fetch(FetchError::LocalDisk(e))),
                }
            }
            at = end;
        }
        Ok(stored)
    })
    .await
    .map_err(|e| BlobError::Fetch(FetchError::Network(e.into())))?
}

/// The URL of a blob beside the release.
pub fn blob_url(base: &str, hash: &Hash) -> String {
    file_url(base, &format!("{STORE_DIR}/blobs/{hash}"))
}

/// GETs a blob whole, resuming a cut request where it stopped, never
/// holding more than its signed size, and checks its hash.
/// Whether an answer for a blob carries on from the `data` held (a whole
/// answer starts it again; a range from elsewhere does not serve), or why
/// the blob cannot be had.
fn takes_up(
    response: &reqwest::Response,
    data: &mut Vec<u8>,
    url: &str,
    blob: &Blob,
) -> Result<bool, BlobError> {
    match response.status() {
        StatusCode::OK => data.clear(),
        StatusCode::PARTIAL_CONTENT => {
            if content_range_start(response) != Some(data.len() as u64) {
                data.clear();
                return Ok(false);
            }
        }
        StatusCode::NOT_FOUND => {
            return Err(BlobError::Unusable(format!(
                "{url}: the origin does not have it"
            )))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(BlobError::Unusable(format!(
                "{url}: shorter than the {} bytes the manifest names",
                blob.size
            )))
        }
        status => {
            return Err(BlobError::Fetch(FetchError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            }))
        }
    }
    Ok(true)
}

/// Reads an answer's body into `data`, at the uplink's pace, until it
/// ends (true), is cut or stalls (false: asked again from there).
async fn read_body(
    origin: &Origin,
    mut response: reqwest::Response,
    data: &mut Vec<u8>,
    url: &str,
    blob: &Blob,
    report: &mut FetchReport,
) -> Result<bool, BlobError> {
    loop {
        match tokio::time::timeout(origin.stall, response.chunk()).await {
            Ok(Ok(Some(body))) => {
                origin.wan.take(body.len()).await;
                report.bytes += body.len() as u64;
                origin
                    .received
                    .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if (data.len() + body.len()) as u64 > blob.size {
                    return Err(BlobError::Unusable(format!(
                        "{url}: more than the {} bytes the manifest names",
                        blob.size
                    )));
                }
                data.extend_from_slice(&body);
            }
            Ok(Ok(None)) => return Ok(true),
            // Cut or stalled: asked again from where it stopped.
            Ok(Err(_)) | Err(_) => return Ok(false),
        }
    }
}

async fn fetch_blob(
    origin: &Origin,
    blob: &Blob,
    report: &mut FetchReport,
) -> Result<Vec<u8>, BlobError> {
    let url = blob_url(&origin.base, &blob.hash);
    let mut data: Vec<u8> = Vec::with_capacity(blob.size as usize);
    let mut quiet = 0;
    let network = |e: anyhow::Error| BlobError::Fetch(FetchError::Network(e));
    while (data.len() as u64) < blob.size {
        if quiet >= QUIET_ATTEMPTS {
            return Err(network(anyhow::anyhow!(
                "{url}: {quiet} requests in a row to the origin received nothing"
            )));
        }
        if quiet > 0 {
            tokio::time::sleep(Duration::from_millis(500 << quiet)).await;
        }
        let mut request = origin.client.get(&url);
        if !data.is_empty() {
            request = request.header(RANGE, format!("bytes={}-", data.len()));
        }
        report.requests += 1;
        let before = data.len();
        let response = match tokio::time::timeout(origin.stall, request.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                quiet += 1;
                info!(url = %url, error = %e, "origin request cut; resuming where it stopped");
                continue;
            }
            Err(_) => {
                quiet += 1;
                continue;
            }
        };
        if !takes_up(&response, &mut data, &url, blob)? {
            quiet += 1;
            continue;
        }
        let ended = read_body(origin, response, &mut data, &url, blob, report).await?;
        if ended && (data.len() as u64) < blob.size {
            // The whole answer came and it is short: the origin's copy is.
            return Err(BlobError::Unusable(format!(
                "{url}: {} bytes, fewer than the {} the manifest names",
                data.len(),
                blob.size
            )));
        }
        if data.len() > before {
            quiet = 0;
        } else {
            quiet += 1;
        }
    }
    if Hash::of(&data) != blob.hash {
        return Err(BlobError::Unusable(format!(
            "{url}: its bytes do not hash to the manifest's {}",
            blob.hash
        )));
    }
    Ok(data)
}
