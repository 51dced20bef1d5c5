//! What `lanup publish` keeps beside a release folder so that the next
//! release can be sent as patches: `lanup-store/` in the output folder,
//! served with it by any static server.
//!
//! ```text
//! lanup-store/releases/<version>.xml   manifests of the releases kept as bases
//! lanup-store/files/<hash>             their files, by BLAKE3 (hard links to
//!                                      the published copies where it can)
//! lanup-store/blobs/<hash>             patches and packed chunks, by BLAKE3
//! ```
//!
//! Publishing writes, for every file that changed, patch segments from each
//! kept release that has a file of the same name (the newest
//! [`PublishDeltas::keep`] releases, and any `--base`), and a packed copy of
//! every chunk where compression saves bytes. The patches from a base are
//! kept only when, in all, they are smaller than the file's chunks. Blobs
//! no longer named by the new release or the one before it are removed,
//! and so are files of releases no longer kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lanup_protocol::delta::{segments, ChunkOrder, MAX_PATCH_REFERENCE};
use lanup_protocol::manifest::{Blob, Patch, MANIFEST_FILE};
use lanup_protocol::{Hash, Manifest};

use crate::delta;
use crate::release::hash_file;

/// The folder beside a release that holds the publisher's bases and blobs.
pub const STORE_DIR: &str = "lanup-store";

/// How a publish makes its deltas.
#[derive(Debug, Clone)]
pub struct PublishDeltas {
    /// How many earlier releases to keep as bases (0: no patches).
    pub keep: usize,
    /// Further bases: a folder of files as installed, or a published
    /// release's manifest (its files beside it).
    pub bases: Vec<PathBuf>,
    /// The zstd level for patches, packed chunks and bundles; None: the
    /// default ([`delta::DEFAULT_LEVEL`]), except for bundles beyond
    /// [`FAST_BUNDLES_ABOVE`] in one publish, which take
    /// [`delta::FAST_LEVEL`].
    pub level: Option<i32>,
    /// Whether to pack chunks at all.
    pub pack: bool,
}

impl Default for PublishDeltas {
    fn default() -> Self {
        PublishDeltas {
            keep: 2,
            bases: Vec::new(),
            level: None,
            pack: true,
        }
    }
}

/// A base release: its files by name, each with its hash and where its
/// bytes are.
#[derive(Debug, Clone)]
struct Base {
    name: String,
    files: HashMap<String, (Hash, PathBuf)>,
    /// By file name (the path's last part): each file's size, hash and
    /// where it is, for files whose folder was renamed.
    by_leaf: HashMap<String, Vec<(u64, Hash, PathBuf)>>,
}

impl Base {
    fn new(name: String, files: HashMap<String, (Hash, PathBuf)>) -> Base {
        let mut by_leaf: HashMap<String, Vec<(u64, Hash, PathBuf)>> = HashMap::new();
        for (file, (hash, path)) in &files {
            let leaf = file.rsplit('/').next().unwrap_or(file);
            if let Ok(meta) = fs::metadata(path) {
                by_leaf
                    .entry(leaf.to_owned())
                    .or_default()
                    .push((meta.len(), *hash, path.clone()));
            }
        }
        Base {
            name,
            files,
            by_leaf,
        }
    }

    /// The file of this base a new file `name` of `size` bytes is patched
    /// from: the one of the same name, else (a folder named after its
    /// version, as `app-1.2/` or `pkg-1.2.data/`) the one of the same file
    /// name whose size is closest, within a factor of two.
    fn counterpart(&self, name: &str, size: u64) -> Option<(Hash, PathBuf)> {
        if let Some(same) = self.files.get(name) {
            return Some(same.clone());
        }
        let leaf = name.rsplit('/').next()?;
        self.by_leaf
            .get(leaf)?
            .iter()
            .filter(|(len, _, _)| len / 2 <= size && size / 2 <= *len)
            .min_by_key(|(len, _, _)| len.abs_diff(size))
            .map(|(_, hash, path)| (*hash, path.clone()))
    }
}

/// The publisher's store in an output folder.
#[derive(Debug)]
pub struct ReleaseStore {
    root: PathBuf,
}

/// New bundles beyond this many bytes in one publish are compressed at
/// [`delta::FAST_LEVEL`] unless a level is given: the first publish of a
/// tree of 100,000 files takes seconds, not minutes (zstd's level 19 runs at
/// about a megabyte a second). Later releases reuse the bundles whose files
/// did not change and make the few others at the default level.
pub const FAST_BUNDLES_ABOVE: u64 = 64 * 1024 * 1024;

/// One piece of work for the encoder threads.
enum Job {
    /// A run of chunks: where each lies (file, offset, size).
    Run {
        pieces: Vec<(usize, u64, u64)>,
        key: Hash,
    },
    Bundle {
        first: usize,
        count: usize,
        key: Hash,
        level: i32,
    },
    Pack {
        file: usize,
        chunk: lanup_protocol::chunk::Chunk,
        offset: u64,
    },
    Patch {
        file: usize,
        base: Hash,
        base_path: PathBuf,
        segment: lanup_protocol::delta::Segment,
        index: usize,
    },
}

impl ReleaseStore {
    /// Opens (creating) the store of output folder `out`.
    pub fn open(out: &Path) -> Result<ReleaseStore> {
        let root = out.join(STORE_DIR);
        for sub in ["releases", "files", "blobs"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            crate::platform::set_path_mode(&dir, 0o755)?;
        }
        Ok(ReleaseStore { root })
    }

    /// Where a kept release's manifest is: named by application and
    /// version.
    fn release_path(&self, manifest: &Manifest) -> PathBuf {
        let app = manifest.restart.app_name.as_deref().unwrap_or("release");
        let app: String = app
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root
            .join("releases")
            .join(format!("{app}-{}.xml", manifest.release_folder()))
    }

    fn file_path(&self, hash: &Hash) -> PathBuf {
        self.root.join("files").join(hash.to_string())
    }

    fn blob_path(&self, hash: &Hash) -> PathBuf {
        self.root.join("blobs").join(hash.to_string())
    }

    /// Keeps the release `out` serves now (published before this store
    /// existed, or by hand) as a base: links its files into the store,
    /// after checking each hashes as its manifest says.
    pub fn keep_current(&self, out: &Path) -> Result<()> {
        let Ok(xml) = fs::read(out.join(MANIFEST_FILE)) else {
            return Ok(());
        };
        let Ok(manifest) = Manifest::parse(&xml) else {
            return Ok(());
        };
        if manifest.validate().is_err() {
            return Ok(());
        }
        let kept = self.release_path(&manifest);
        if kept.is_file() {
            return Ok(());
        }
        crate::parallel::map(&manifest.files, |file| match file.hash {
            Some(hash) => self.keep_file(&out.join(&file.name), &hash, true),
            None => Ok(false),
        })?;
        crate::apply::write_synced(&kept, &xml)
            .with_context(|| format!("cannot write {}", kept.display()))
    }

    /// Puts a file into the store under its hash (a hard link where it
    /// can, else a copy); with `check`, only if it hashes to `hash`.
    fn keep_file(&self, path: &Path, hash: &Hash, check: bool) -> Result<bool> {
        let dest = self.file_path(hash);
        if dest.is_file() {
            return Ok(true);
        }
        if check && hash_file(path).ok().as_ref() != Some(hash) {
            return Ok(false);
        }
        if fs::hard_link(path, &dest).is_err() {
            let tmp = dest.with_extension("part");
            fs::copy(path, &tmp).with_context(|| format!("cannot copy {}", path.display()))?;
            fs::rename(&tmp, &dest)?;
        }
        Ok(true)
    }

    /// The kept releases, newest first.
    fn kept(&self) -> Vec<(Manifest, PathBuf)> {
        let mut kept: Vec<(Manifest, PathBuf)> = fs::read_dir(self.root.join("releases"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let xml = fs::read(e.path()).ok()?;
                Some((Manifest::parse(&xml).ok()?, e.path()))
            })
            .collect();
        kept.sort_by(|a, b| b.0.compare_release(&a.0));
        kept
    }

    /// The bases a new release is patched from: the newest `keep` kept
    /// releases of the same application other than itself, and the
    /// `--base` ones.
    fn bases(&self, new: &Manifest, opts: &PublishDeltas) -> Result<Vec<Base>> {
        let mut bases: Vec<Base> = self
            .kept()
            .into_iter()
            .filter(|(m, _)| {
                m.restart.app_name == new.restart.app_name && m.release_name() != new.release_name()
            })
            .take(opts.keep)
            .map(|(m, _)| {
                let files = m
                    .files
                    .iter()
                    .filter_map(|f| {
                        let hash = f.hash?;
                        let path = self.file_path(&hash);
                        path.is_file().then(|| (f.name.clone(), (hash, path)))
                    })
                    .collect();
                Base::new(m.release_name(), files)
            })
            .collect();
        for given in &opts.bases {
            bases.push(read_base(given)?);
        }
        Ok(bases)
    }

    /// Adds patches and packed chunks to `manifest`, whose files are
    /// published in `out`, and writes their blobs. Returns where the last
    /// two releases' manifests are kept: the ones a node most likely holds,
    /// for manifest deltas.
    pub fn add_deltas(
        &self,
        out: &Path,
        manifest: &mut Manifest,
        opts: &PublishDeltas,
    ) -> Result<Vec<PathBuf>> {
        let bases = if opts.keep == 0 && opts.bases.is_empty() {
            Vec::new()
        } else {
            self.bases(manifest, opts)?
        };
        // The last two releases, read once (a large tree's manifest takes
        // a second to parse): their packed chunks, bundles and runs are
        // reused.
        let (recent, recent_paths): (Vec<Manifest>, Vec<PathBuf>) =
            self.kept().into_iter().take(2).unzip();
        let mut plan = DeltaPlan::default();
        for m in &recent {
            for f in &m.files {
                plan.earlier.extend(f.packed.iter().map(|(c, b)| (*c, *b)));
            }
        }
        if opts.pack {
            self.plan_bundles(&recent, manifest, opts, &mut plan);
            self.plan_runs(&recent, manifest, &mut plan);
        }
        self.plan_files(manifest, opts, &bases, &mut plan)?;
        let level = opts.level.unwrap_or(delta::DEFAULT_LEVEL);
        let jobs = std::mem::take(&mut plan.jobs);
        let results = self.run_jobs(out, manifest, jobs, level)?;
        let (packed, patches) = plan.take(results);
        let packed = self.with_earlier(packed, &plan.earlier);
        plan.record_bundles_and_runs(manifest);
        for file in &mut manifest.files {
            if opts.pack && lanup_protocol::delta::bundled(file) {
                continue;
            }
            for chunk in &file.chunks {
                if let Some(blob) = packed.get(&chunk.hash).filter(|b| b.size < chunk.size) {
                    file.packed.insert(chunk.hash, *blob);
                }
            }
        }
        record_patches(manifest, patches);
        Ok(recent_paths)
    }

    /// Packed copies of earlier releases' chunks whose blobs are still
    /// stored serve this release too.
    fn with_earlier(
        &self,
        mut packed: HashMap<Hash, Blob>,
        earlier: &HashMap<Hash, Blob>,
    ) -> HashMap<Hash, Blob> {
        for (chunk, blob) in earlier {
            if self.blob_path(&blob.hash).is_file() {
                packed.entry(*chunk).or_insert(*blob);
            }
        }
        packed
    }

    /// Whether a blob made for an earlier release is still stored.
    fn still_made(&self, blob: Option<&Blob>) -> bool {
        blob.is_some_and(|b| self.blob_path(&b.hash).is_file())
    }

    /// Bundles of small files: those an earlier release made are reused,
    /// the rest are jobs (at a faster level when many bytes are new).
    fn plan_bundles(
        &self,
        recent: &[Manifest],
        manifest: &Manifest,
        opts: &PublishDeltas,
        plan: &mut DeltaPlan,
    ) {
        for m in recent {
            for b in &m.bundles {
                if let Some(files) = m.files.get(b.first..b.first + b.count) {
                    plan.made.insert(bundle_key(files), b.blob);
                }
            }
        }
        let runs = lanup_protocol::delta::bundle_runs(&manifest.files);
        let new_bytes: u64 = runs
            .iter()
            .filter(|(first, count)| {
                let key = bundle_key(&manifest.files[*first..first + count]);
                !self.still_made(plan.made.get(&key))
            })
            .flat_map(|(first, count)| &manifest.files[*first..first + count])
            .filter_map(|f| f.size)
            .sum();
        let level = opts.level.unwrap_or(if new_bytes > FAST_BUNDLES_ABOVE {
            delta::FAST_LEVEL
        } else {
            delta::DEFAULT_LEVEL
        });
        for (first, count) in runs {
            let key = bundle_key(&manifest.files[first..first + count]);
            plan.bundles.push((first, count, key));
            if self.still_made(plan.made.get(&key)) {
                continue;
            }
            plan.jobs.push(Job::Bundle {
                first,
                count,
                key,
                level,
            });
        }
    }

    /// Runs of chunks packed together: those an earlier release made are
    /// reused, the rest are jobs.
    fn plan_runs(&self, recent: &[Manifest], manifest: &Manifest, plan: &mut DeltaPlan) {
        for m in recent {
            let order = ChunkOrder::new(&m.files);
            for r in &m.runs {
                plan.made_runs
                    .insert(run_key(order.span(&m.files, r.first, r.count)), r.blob);
            }
        }
        let order = ChunkOrder::new(&manifest.files);
        // Where each file's chunks lie in it.
        let offsets: Vec<Vec<u64>> = manifest
            .files
            .iter()
            .map(|f| {
                f.chunks
                    .iter()
                    .scan(0, |at, c| {
                        *at += c.size;
                        Some(*at - c.size)
                    })
                    .collect()
            })
            .collect();
        for (first, count) in lanup_protocol::delta::run_spans(&manifest.files) {
            let key = run_key(order.span(&manifest.files, first, count));
            plan.runs.push((first, count, key));
            if self.still_made(plan.made_runs.get(&key)) {
                continue;
            }
            let pieces = (first..)
                .zip(order.span(&manifest.files, first, count))
                .map(|(at, (f, c))| (f, offsets[f][at - order.first_of(f)], c.size))
                .collect();
            plan.jobs.push(Job::Run { pieces, key });
        }
    }

    /// Each file's chunks to pack (once each, not those an earlier
    /// release packed) and its patches from every base that holds a
    /// different copy of it.
    fn plan_files(
        &self,
        manifest: &Manifest,
        opts: &PublishDeltas,
        bases: &[Base],
        plan: &mut DeltaPlan,
    ) -> Result<()> {
        let mut packed_seen = HashSet::new();
        for (i, file) in manifest.files.iter().enumerate() {
            let size = file.size.unwrap_or_default();
            let mut offset = 0;
            // A bundled file's chunk crosses in its bundle.
            let chunks = if opts.pack && lanup_protocol::delta::bundled(file) {
                &[][..]
            } else {
                &file.chunks[..]
            };
            for chunk in chunks {
                let here = offset;
                offset += chunk.size;
                if !opts.pack || !packed_seen.insert(chunk.hash) {
                    continue;
                }
                if self.still_made(plan.earlier.get(&chunk.hash)) {
                    continue;
                }
                plan.jobs.push(Job::Pack {
                    file: i,
                    chunk: *chunk,
                    offset: here,
                });
            }
            let mut from = HashSet::new();
            for base in bases {
                let Some((hash, path)) = base.counterpart(&file.name, size) else {
                    continue;
                };
                if Some(hash) == file.hash || !from.insert(hash) {
                    continue;
                }
                let base_size = fs::metadata(&path)?.len();
                for (index, segment) in segments(&file.chunks, base_size).into_iter().enumerate() {
                    plan.jobs.push(Job::Patch {
                        file: i,
                        base: hash,
                        base_path: path.clone(),
                        segment,
                        index,
                    });
                }
                tracing::debug!(file = %file.name, base = %base.name, "patching");
            }
        }
        Ok(())
    }

    /// Runs the encoder over every job on every core; each result's blob
    /// is written to the store.
    fn run_jobs(
        &self,
        out: &Path,
        manifest: &Manifest,
        jobs: Vec<Job>,
        level: i32,
    ) -> Result<Vec<Done>> {
        let done = crate::parallel::map(&jobs, |job| self.run_job(out, manifest, job, level))?;
        Ok(done.into_iter().flatten().collect())
    }

    fn run_job(
        &self,
        out: &Path,
        manifest: &Manifest,
        job: &Job,
        level: i32,
    ) -> Result<Option<Done>> {
        match *job {
            Job::Run { ref pieces, key } => {
                let mut data = Vec::with_capacity(pieces.iter().map(|p| p.2 as usize).sum());
                for &(file, offset, size) in pieces {
                    let path = out.join(&manifest.files[file].name);
                    data.extend_from_slice(&read_range(&path, offset, size)?);
                }
                let packed = delta::pack(&data, level)?;
                if packed.len() >= data.len() {
                    return Ok(None);
                }
                let blob = self.write_blob(&packed)?;
                Ok(Some(Done::Run { key, blob }))
            }
            Job::Bundle {
                first,
                count,
                key,
                level,
            } => {
                let data = read_bundled(out, &manifest.files[first..first + count])?;
                let packed = delta::pack(&data, level)?;
                let blob = self.write_blob(&packed)?;
                Ok(Some(Done::Bundle { key, blob }))
            }
            Job::Pack {
                file,
                chunk,
                offset,
            } => {
                let path = out.join(&manifest.files[file].name);
                let data = read_range(&path, offset, chunk.size)?;
                let packed = delta::pack(&data, level)?;
                // Worth a request of its own only when it saves a few
                // percent.
                if packed.len() as u64 >= chunk.size - chunk.size / 32 {
                    return Ok(None);
                }
                let blob = self.write_blob(&packed)?;
                Ok(Some(Done::Packed {
                    chunk: chunk.hash,
                    blob,
                }))
            }
            Job::Patch {
                file,
                base,
                ref base_path,
                segment,
                index,
            } => {
                let f = &manifest.files[file];
                let target = read_range(&out.join(&f.name), segment.offset, segment.length)?;
                let reference = read_range(base_path, segment.base_offset, segment.base_length)?;
                let patch = delta::make_patch(&reference, &target, level)?;
                let blob = self.write_blob(&patch)?;
                Ok(Some(Done::Patch {
                    file,
                    base,
                    index,
                    patch: Patch {
                        from: base,
                        offset: segment.offset,
                        length: segment.length,
                        base_offset: segment.base_offset,
                        base_length: segment.base_length,
                        blob,
                    },
                }))
            }
        }
    }

    fn write_blob(&self, bytes: &[u8]) -> Result<Blob> {
        let hash = Hash::of(bytes);
        let path = self.blob_path(&hash);
        if !path.is_file() {
            crate::release::write_atomically(&path, bytes)?;
        }
        Ok(Blob {
            size: bytes.len() as u64,
            hash,
        })
    }

    /// Records the new release as a base for the next ones (its files
    /// linked in from `out`), then removes what is no longer needed: files
    /// of releases beyond the newest `keep`, and blobs that neither this
    /// release nor the one before it names.
    pub fn finish(&self, out: &Path, manifest: &Manifest, xml: &[u8], keep: usize) -> Result<()> {
        crate::parallel::map(&manifest.files, |file| match file.hash {
            Some(hash) => self.keep_file(&out.join(&file.name), &hash, false),
            None => Ok(false),
        })?;
        let path = self.release_path(manifest);
        crate::apply::write_synced(&path, xml)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let kept = self.kept();
        let mut files = HashSet::new();
        let mut blobs = HashSet::new();
        // Counted per application: lanup's own releases and the
        // application's may share a folder.
        let mut of_app: HashMap<Option<String>, usize> = HashMap::new();
        for (m, path) in &kept {
            let i = {
                let n = of_app.entry(m.restart.app_name.clone()).or_default();
                *n += 1;
                *n - 1
            };
            if i >= keep.max(1) {
                let _ = fs::remove_file(path);
                continue;
            }
            files.extend(m.files.iter().filter_map(|f| f.hash));
            if i < 2 {
                blobs.extend(m.bundles.iter().map(|b| b.blob.hash));
                blobs.extend(m.runs.iter().map(|r| r.blob.hash));
                for f in &m.files {
                    blobs.extend(f.packed.values().map(|b| b.hash));
                    blobs.extend(f.patches.iter().map(|p| p.blob.hash));
                }
            }
        }
        prune(&self.root.join("files"), &files)?;
        prune(&self.root.join("blobs"), &blobs)?;
        Ok(())
    }
}

/// What a run holds, for finding it again in a later release: its chunks,
/// in order.
fn run_key<'a>(chunks: impl Iterator<Item = (usize, &'a lanup_protocol::chunk::Chunk)>) -> Hash {
    let mut hasher = blake3::Hasher::new();
    for (_, c) in chunks {
        hasher.update(&c.hash.0);
        hasher.update(&c.size.to_le_bytes());
    }
    Hash::from(hasher.finalize())
}

/// What a bundle holds, for finding it again in a later release: the
/// hashes of its files, in order.
fn bundle_key(files: &[lanup_protocol::UpdateFile]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    for f in files {
        hasher.update(&f.hash.map_or([0; 32], |h| h.0));
    }
    Hash::from(hasher.finalize())
}

/// What one job produced.
enum Done {
    Run {
        key: Hash,
        blob: Blob,
    },
    Bundle {
        key: Hash,
        blob: Blob,
    },
    Packed {
        chunk: Hash,
        blob: Blob,
    },
    Patch {
        file: usize,
        base: Hash,
        index: usize,
        patch: Patch,
    },
}

/// Removes every file in `dir` not named by a hash in `keep`.
fn prune(dir: &Path, keep: &HashSet<Hash>) -> Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let named = name.to_str().and_then(|n| n.parse::<Hash>().ok());
        if !named.is_some_and(|h| keep.contains(&h)) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// `length` bytes of `path` from `offset` (a patch's reference or
/// target); the size is bounded by the segment sizes.
pub(crate) fn read_range(path: &Path, offset: u64, length: u64) -> Result<Vec<u8>> {
    if length > MAX_PATCH_REFERENCE {
        bail!("{}: a range of {length} bytes is too large", path.display());
    }
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::with_capacity(length as usize);
    file.take(length).read_to_end(&mut data)?;
    if data.len() as u64 != length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{} is shorter than byte {}",
                path.display(),
                offset + length
            ),
        )
        .into());
    }
    Ok(data)
}

/// A `--base`: a folder of files as installed, or a published release's
/// manifest (or its folder) with its files beside it.
fn read_base(given: &Path) -> Result<Base> {
    let manifest_path = if given.is_dir() {
        given.join(MANIFEST_FILE)
    } else {
        given.to_owned()
    };
    if manifest_path.is_file() {
        let source = crate::release::ManifestSource::read_local(&manifest_path)?;
        let manifest = source.parse()?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let files = manifest
            .files
            .iter()
            .filter_map(|f| Some((f.name.clone(), (f.hash?, dir.join(&f.name)))))
            .filter(|(_, (_, p))| p.is_file())
            .collect();
        return Ok(Base::new(manifest.release_name(), files));
    }
    if !given.is_dir() {
        bail!(
            "--base {}: neither a folder nor a release manifest",
            given.display()
        );
    }
    let mut files = HashMap::new();
    for entry in walkdir::WalkDir::new(given) {
        let entry = entry.with_context(|| format!("--base {}", given.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(given)?;
        let Some(name) = rel.to_str().map(|s| s.replace('\\', "/")) else {
            continue;
        };
        let hash = hash_file(entry.path())
            .with_context(|| format!("cannot read {}", entry.path().display()))?;
        files.insert(name, (hash, entry.path().to_owned()));
    }
    Ok(Base::new(given.display().to_string(), files))
}

/// The bytes of `files`, published in `out`, one after the other.
fn read_bundled(out: &Path, files: &[lanup_protocol::manifest::UpdateFile]) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    for f in files {
        let path = out.join(&f.name);
        let start = data.len();
        fs::File::open(&path)
            .and_then(|mut r| r.read_to_end(&mut data))
            .with_context(|| format!("cannot read {}", path.display()))?;
        if Some((data.len() - start) as u64) != f.size {
            bail!("{}: changed while it was being published", path.display());
        }
    }
    Ok(data)
}

/// What a publish packs and patches: the jobs to run, and the bundles and
/// runs of this release with those made before.
#[derive(Default)]
struct DeltaPlan {
    jobs: Vec<Job>,
    /// This release's bundles and runs: first file or chunk, count, key.
    bundles: Vec<(usize, usize, Hash)>,
    runs: Vec<(usize, usize, Hash)>,
    /// Bundles and runs made (for earlier releases, or now), by key.
    made: HashMap<Hash, Blob>,
    made_runs: HashMap<Hash, Blob>,
    /// Packed copies made for earlier releases, by chunk.
    earlier: HashMap<Hash, Blob>,
}

/// Patches made, by file and base: each segment's, in order.
type Patches = BTreeMap<(usize, Hash), Vec<(usize, Patch)>>;

impl DeltaPlan {
    /// Takes the jobs' results: bundles and runs join those made; packed
    /// chunks and patches are returned.
    fn take(&mut self, results: Vec<Done>) -> (HashMap<Hash, Blob>, Patches) {
        let mut packed: HashMap<Hash, Blob> = HashMap::new();
        let mut patches = Patches::new();
        for result in results {
            match result {
                Done::Run { key, blob } => {
                    self.made_runs.insert(key, blob);
                }
                Done::Bundle { key, blob } => {
                    self.made.insert(key, blob);
                }
                Done::Packed { chunk, blob } => {
                    packed.insert(chunk, blob);
                }
                Done::Patch {
                    file,
                    base,
                    index,
                    patch,
                } => patches
                    .entry((file, base))
                    .or_default()
                    .push((index, patch)),
            }
        }
        (packed, patches)
    }

    /// Names in `manifest` each bundle and run smaller than what it holds.
    fn record_bundles_and_runs(&self, manifest: &mut Manifest) {
        for (first, count, key) in &self.bundles {
            let (first, count) = (*first, *count);
            let Some(blob) = self.made.get(key) else {
                continue;
            };
            let holds: u64 = manifest.files[first..first + count]
                .iter()
                .filter_map(|f| f.size)
                .sum();
            if blob.size < holds {
                manifest.bundles.push(lanup_protocol::manifest::Bundle {
                    first,
                    count,
                    blob: *blob,
                });
            }
        }
        let order = ChunkOrder::new(&manifest.files);
        let mut runs = Vec::new();
        for (first, count, key) in &self.runs {
            let (first, count) = (*first, *count);
            let Some(blob) = self.made_runs.get(key) else {
                continue;
            };
            let holds: u64 = order
                .span(&manifest.files, first, count)
                .map(|(_, c)| c.size)
                .sum();
            if blob.size < holds {
                runs.push(lanup_protocol::manifest::Run {
                    first,
                    count,
                    blob: *blob,
                });
            }
        }
        manifest.runs.extend(runs);
    }
}

/// Names in `manifest` each file's patches, where all of them together
/// cost less than its chunks.
fn record_patches(manifest: &mut Manifest, patches: Patches) {
    for ((i, _), mut set) in patches {
        let file = &mut manifest.files[i];
        set.sort_by_key(|(index, _)| *index);
        let total: u64 = set.iter().map(|(_, p)| p.blob.size).sum();
        let by_chunks: u64 = file
            .chunks
            .iter()
            .map(|c| lanup_protocol::delta::chunk_cost(file, c))
            .sum();
        let fits = set.iter().all(|(_, p)| p.blob.size <= p.length);
        if fits && total < by_chunks {
            file.patches.extend(set.into_iter().map(|(_, p)| p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{publish, PublishOptions};
    use lanup_protocol::manifest::Restart;
    use lanup_protocol::sign::SecretKey;

    /// Bytes that compress and patch like a program: numbered records.
    fn program(seed: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut i = 0u64;
        while out.len() < len {
            out.extend_from_slice(
                format!("sym_{i:07} -> {:016x}\n", i.wrapping_mul(seed)).as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    fn release(dir: &Path, files: &[(&str, Vec<u8>)]) {
        let _ = fs::remove_dir_all(dir);
        for (name, bytes) in files {
            let path = dir.join(name);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, bytes).expect("write");
        }
    }

    fn publish_as(app: &str, dir: &Path, out: &Path, version: &str, key: &SecretKey) -> Manifest {
        let opts = PublishOptions {
            dir: dir.to_owned(),
            out: out.to_owned(),
            version: version.parse().expect("version"),
            url: "http://origin.invalid/".into(),
            update_time: time::OffsetDateTime::now_utc(),
            expires: None,
            restart: Restart {
                allow: true,
                app_name: Some(app.into()),
                exe: None,
            },
            deltas: PublishDeltas {
                level: Some(3),
                ..PublishDeltas::default()
            },
            linux_only: false,
        };
        publish(&opts, key).expect("publish").manifest
    }

    #[test]
    fn patches_come_from_the_same_application_and_a_renamed_version_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dir, out) = (tmp.path().join("dir"), tmp.path().join("www"));
        let key = SecretKey::generate();
        let old = program(3, 200_000);
        let mut new = old.clone();
        new.splice(5000..5000, b"one more symbol".iter().copied());
        release(&dir, &[("app-1.0/bin/tool", old.clone())]);
        let first = publish_as("tool", &dir, &out, "1.0", &key);
        // lanup's own release in the same folder in between: its file is
        // no base for the application's.
        release(&dir, &[("lanup", program(5, 100_000))]);
        publish_as("lanup", &dir, &out, "0.2.0", &key);
        release(&dir, &[("app-2.0/bin/tool", new)]);
        let second = publish_as("tool", &dir, &out, "2.0", &key);
        let file = &second.files[0];
        assert_eq!(file.patches.len(), 1, "{:?}", file.patches);
        assert_eq!(Some(file.patches[0].from), first.files[0].hash);
        assert!(file.patches[0].blob.size < 1000, "{:?}", file.patches[0]);
        let blob = out
            .join(STORE_DIR)
            .join("blobs")
            .join(file.patches[0].blob.hash.to_string());
        let rebuilt = delta::apply_patch(
            &old,
            &fs::read(blob).expect("blob"),
            file.size.expect("size"),
        )
        .expect("the patch applies");
        assert_eq!(Hash::of(&rebuilt), file.hash.expect("hash"));
        // Both applications' releases are kept as bases.
        let kept = fs::read_dir(out.join(STORE_DIR).join("releases"))
            .expect("releases")
            .count();
        assert_eq!(kept, 3);
    }
}
