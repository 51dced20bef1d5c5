//! Staging as chunks arrive: each verified chunk is written into the staged
//! file at its offset as soon as the node holds it, so that "staged"
//! follows the last chunk within milliseconds instead of after a pass that
//! reads, hashes, writes and syncs the whole release.
//!
//! One thread per release being staged, told each chunk the node gains
//! (32 bytes a message, at most one per chunk of the manifest). It reads the
//! chunk back from the store (just written: the page cache) and checks it,
//! writes it wherever the manifest places it, and feeds each file's hash in
//! order: a chunk that arrives in order is hashed from memory, one that
//! fills a gap has the chunks after it read back from the file. A file
//! whose every chunk is written is checked against the manifest's hash,
//! given its mode, synced and renamed from its hidden partial name to its
//! own; nothing under a listed name is ever partial.
//!
//! A file of the release that is byte for byte a file of a release already
//! staged here (same hash, size and mode: a delta's unchanged files) is
//! hard-linked, not written again; the apply checks every file it copies,
//! so a link to a file that rotted since is caught there.
//!
//! Any failure (a full disk, a chunk damaged in the store) ends the stager
//! with its error; the node then stages the release the old way, in one
//! pass once every chunk is held, after its usual wait.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lanup_protocol::hash::Hash;
use lanup_protocol::manifest::{release_folder, Manifest, UpdateFile};
use tracing::{debug, warn};

use crate::fetch::DamagedChunk;
use crate::store::ChunkStore;
use lanup_protocol::manifest::check_file_name;

/// The suffix of a file being staged (after a dot that hides it).
const PARTIAL: &str = "lanup-part";

/// Removes the partial files a stager left under `dest` (it stopped, or
/// the node did), so that only whole files remain.
pub fn clear_partial(dest: &Path) {
    let Ok(entries) = std::fs::read_dir(dest) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            clear_partial(&path);
        } else if e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with('.') && n.ends_with(&format!(".{PARTIAL}")))
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Bytes written to one file between syncs, and the longest a written
/// chunk waits for one, so that the sync once the last chunk arrives has
/// little left to write: at most a second of arrivals (a few MiB from an
/// uplink) or 16 MiB from the LAN. Left to the kernel, a file's dirty pages
/// wait up to 30 s, and the last sync would write most of the release.
const SYNC_EVERY: u64 = 16 << 20;
const SYNC_AFTER: Duration = Duration::from_secs(1);

/// The node's side of a stager: dropping it stops the thread.
pub struct Stager {
    tx: mpsc::Sender<Hash>,
}

impl Stager {
    /// The node holds `hash` now (verified, in the store).
    pub fn gained(&self, hash: Hash) {
        let _ = self.tx.send(hash);
    }
}

/// Whether `manifest` can be staged chunk by chunk: every file lists its
/// size, its hash and chunks that add up to its size.
pub fn fits(manifest: &Manifest) -> bool {
    manifest.files.iter().all(|f| {
        f.hash.is_some()
            && f.size
                .is_some_and(|size| f.chunks.iter().map(|c| c.size).sum::<u64>() == size)
    })
}

/// A staged release whose files the new one may link to: its manifest and
/// folder.
pub struct Staged {
    pub manifest: Arc<Manifest>,
    pub dir: PathBuf,
}

/// The releases staged under `state` (other than those in `except`) whose
/// manifest the node kept: what a new release may link its unchanged files
/// to. A manifest in `known` (the installed release's, which the node
/// holds) is taken as it is, not read again.
pub fn kept(state: &Path, except: &[String], known: &[Arc<Manifest>]) -> Vec<Staged> {
    let mut staged = Vec::new();
    let mut left = Vec::new();
    for (name, dir) in staged_dirs(state, except) {
        match known.iter().find(|m| m.release_folder() == name) {
            Some(manifest) => staged.push(Staged {
                manifest: manifest.clone(),
                dir,
            }),
            None => left.push((name, dir)),
        }
    }
    staged.extend(
        left.into_iter()
            .filter_map(|(name, dir)| read_staged(state, &name, dir)),
    );
    staged
}

/// Calls `each` with the releases staged under `state` (other than those
/// in `except`) whose manifest the node kept, reading one manifest at a
/// time: a manifest of 100,000 files is tens of megabytes in memory.
pub fn each_kept(state: &Path, except: &[String], mut each: impl FnMut(Staged)) {
    for (name, dir) in staged_dirs(state, except) {
        if let Some(staged) = read_staged(state, &name, dir) {
            each(staged);
        }
    }
}

/// Renames the release folders an older lanup named after a date-named
/// release as it is (`2026-11-20T08:00:00Z`) to the names Windows accepts
/// too ([`release_folder`]), so that a node upgraded in place keeps what
/// it staged. Run at start, before anything reads them.
pub fn rename_old_folders(state: &Path) {
    for sub in ["staging", "releases"] {
        let Ok(entries) = std::fs::read_dir(state.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let folder = release_folder(&name);
            if folder == name {
                continue;
            }
            let to = entry.path().with_file_name(&folder);
            let _ = std::fs::remove_dir_all(&to);
            match crate::platform::rename(&entry.path(), &to) {
                Ok(()) => debug!(from = %name, to = %folder, "renamed a release folder"),
                Err(e) => {
                    warn!(folder = %entry.path().display(), error = %e, "cannot rename a release folder")
                }
            }
        }
    }
}

/// The folders under `state`'s staging folder, by folder name, but those
/// of the releases named in `except`.
fn staged_dirs(state: &Path, except: &[String]) -> Vec<(String, PathBuf)> {
    let except: Vec<String> = except.iter().map(|n| release_folder(n)).collect();
    let Ok(entries) = std::fs::read_dir(state.join("staging")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .filter(|(name, _)| !except.contains(name))
        .collect()
}

/// The staged release `name` in `dir`, with the manifest the node kept
/// for it.
fn read_staged(state: &Path, name: &str, dir: PathBuf) -> Option<Staged> {
    let source =
        crate::release::ManifestSource::read_local(&state.join("releases").join(name)).ok()?;
    Some(Staged {
        manifest: Arc::new(source.parse().ok()?),
        dir,
    })
}

/// Starts staging `manifest` into `dest` (emptied first) from `store`, with
/// the chunks in `held` already there; `done` is called once, with the
/// folder when every file is in place, or with the error that stopped it.
/// Files that the staged releases `earlier` returns hold byte for byte are
/// linked.
pub fn start(
    manifest: Arc<Manifest>,
    store: ChunkStore,
    dest: PathBuf,
    earlier: impl FnOnce() -> Vec<Staged> + Send + 'static,
    held: Vec<Hash>,
    done: impl FnOnce(Result<PathBuf>) + Send + 'static,
) -> Stager {
    let (tx, rx) = mpsc::channel();
    for hash in held {
        let _ = tx.send(hash);
    }
    let name = manifest.release_name();
    let spawned = std::thread::Builder::new()
        .name("lanup-stage".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let result = stage(&manifest, &store, &dest, earlier(), &rx);
            match result {
                Ok(true) => {
                    debug!(release = %manifest.release_name(), took_ms = started.elapsed().as_millis() as u64, "every file staged");
                    done(Ok(dest));
                }
                // The node moved on to another release.
                Ok(false) => {}
                Err(e) => done(Err(e)),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(release = %name, error = %e, "cannot start staging as chunks arrive");
    }
    Stager { tx }
}

/// A file of more than one chunk being staged. It is opened for each
/// write, not held open: a file held open for writing keeps its filesystem
/// from being remounted (read-only, by an administrator fighting a failing
/// disk).
///
/// It names no path and copies no chunk list (both come from the manifest
/// when needed). A file of one chunk (most of a release of many small
/// files) has no part at all: it is written, checked and renamed as its
/// chunk comes.
struct Part {
    /// Which chunks are written.
    written: Vec<bool>,
    /// Where each chunk starts.
    offsets: Vec<u64>,
    remaining: usize,
    /// The file's hash over its first `hashed` chunks: boxed, as a hasher
    /// is two kilobytes.
    hasher: Option<Box<blake3::Hasher>>,
    hashed: usize,
    unsynced: u64,
    synced_at: Instant,
}

/// Which file and chunk of the manifest each chunk is written to, sorted
/// by hash: 40 bytes a chunk and no allocation of its own (a map of lists
/// took about 150 bytes a chunk, 15 MB for 100,000 small files).
struct Places(Vec<(Hash, u32, u32)>);

impl Places {
    fn of(&self, hash: &Hash) -> &[(Hash, u32, u32)] {
        let from = self.0.partition_point(|(h, ..)| h < hash);
        let to = from + self.0[from..].partition_point(|(h, ..)| h == hash);
        &self.0[from..to]
    }
}

/// The files still being staged: open (a bit a file) and, for those of
/// more than one chunk, their part.
struct Open {
    files: Vec<bool>,
    parts: HashMap<u32, Part>,
    count: usize,
}

impl Open {
    /// Whether chunk `j` of file `i` is still to be written.
    fn wants(&self, i: u32, j: u32) -> bool {
        self.files[i as usize] && self.parts.get(&i).is_none_or(|p| !p.written[j as usize])
    }
}

/// Stages until every file is in place (true), or the node drops its side
/// (false).
fn stage(
    manifest: &Manifest,
    store: &ChunkStore,
    dest: &Path,
    earlier: Vec<Staged>,
    rx: &mpsc::Receiver<Hash>,
) -> Result<bool> {
    // What a stager stopped half-way left is not used; complete files
    // already there are replaced, each by a rename.
    clear_partial(dest);
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let (mut open, places) = open_files(manifest, store, dest, &earlier)?;
    // The earlier releases' manifests are not needed any more.
    drop(earlier);
    while open.count > 0 {
        let Ok(hash) = rx.recv() else {
            return Ok(false);
        };
        let at = places.of(&hash);
        // Not needed (any more): a repeat, or a chunk of linked files.
        if !at.iter().any(|&(_, i, j)| open.wants(i, j)) {
            continue;
        }
        let data = store.get_verified(&hash).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                anyhow::Error::new(DamagedChunk(hash))
                    .context(format!("chunk {hash} was damaged in the store"))
            } else {
                anyhow::Error::new(e).context(format!("cannot read chunk {hash} from the store"))
            }
        })?;
        for &(_, i, j) in at {
            if open.wants(i, j) {
                write_chunk(&mut open, manifest, store, dest, (i, j), &data)?;
            }
        }
    }
    Ok(true)
}

/// Opens every file of the release to be written as its chunks come (a
/// file an earlier staged release holds alike is linked in at once); the
/// files still open, and where each chunk goes.
fn open_files(
    manifest: &Manifest,
    store: &ChunkStore,
    dest: &Path,
    earlier: &[Staged],
) -> Result<(Open, Places)> {
    let mut open = Open {
        files: vec![false; manifest.files.len()],
        parts: HashMap::new(),
        count: 0,
    };
    let mut places = Vec::new();
    let index = index_earlier(earlier);
    for (i, file) in manifest.files.iter().enumerate() {
        check_file_name(&file.name)?;
        let target = dest.join(&file.name);
        let dir = target.parent().unwrap_or(dest);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let part = part_path(&target);
        if let Some(same) = same_file(file, earlier, &index) {
            let _ = std::fs::remove_file(&part);
            if std::fs::hard_link(&same, &part).is_ok() {
                crate::platform::rename(&part, &target)
                    .with_context(|| format!("cannot rename into {}", target.display()))?;
                continue;
            }
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .with_context(|| format!("cannot write {}", part.display()))?;
        let size = file.size.unwrap_or(0);
        f.set_len(size)
            .with_context(|| format!("cannot size {}", part.display()))?;
        drop(f);
        let n = file.chunks.len();
        if n == 0 {
            finish(None, file, dest, store)?;
            continue;
        }
        for (j, c) in file.chunks.iter().enumerate() {
            places.push((c.hash, i as u32, j as u32));
        }
        open.files[i] = true;
        open.count += 1;
        if n > 1 {
            let offsets = file
                .chunks
                .iter()
                .scan(0, |at, c| {
                    let start = *at;
                    *at += c.size;
                    Some(start)
                })
                .collect();
            open.parts.insert(
                i as u32,
                Part {
                    written: vec![false; n],
                    offsets,
                    remaining: n,
                    hasher: None,
                    hashed: 0,
                    unsynced: 0,
                    synced_at: Instant::now(),
                },
            );
        }
    }
    places.sort_unstable();
    Ok((open, Places(places)))
}

/// Writes chunk `j` of file `i` into its part file; a file whose last chunk
/// it was is finished (checked, synced, renamed into place).
fn write_chunk(
    open: &mut Open,
    manifest: &Manifest,
    store: &ChunkStore,
    dest: &Path,
    (i, j): (u32, u32),
    data: &[u8],
) -> Result<()> {
    let file = &manifest.files[i as usize];
    let path = part_path(&dest.join(&file.name));
    let Some(p) = open.parts.get_mut(&i) else {
        // A file of one chunk is its chunk.
        crate::platform::write_all_at(&open_part(&path, true)?, data, 0)
            .with_context(|| format!("cannot write {}", path.display()))?;
        finish(None, file, dest, store)?;
        open.files[i as usize] = false;
        open.count -= 1;
        return Ok(());
    };
    let j = j as usize;
    crate::platform::write_all_at(&open_part(&path, true)?, data, p.offsets[j])
        .with_context(|| format!("cannot write {}", path.display()))?;
    p.written[j] = true;
    p.remaining -= 1;
    p.unsynced += data.len() as u64;
    if p.hashed == j {
        p.hasher.get_or_insert_with(Default::default).update(data);
        p.hashed += 1;
    }
    advance(p, file, &path)?;
    if (p.unsynced >= SYNC_EVERY || p.synced_at.elapsed() >= SYNC_AFTER) && p.remaining > 0 {
        open_part(&path, true)?
            .sync_data()
            .with_context(|| format!("cannot sync {}", path.display()))?;
        p.unsynced = 0;
        p.synced_at = Instant::now();
    }
    if p.remaining == 0 {
        let mut p = open.parts.remove(&i).expect("the part being finished");
        finish(Some(&mut p), file, dest, store)?;
        open.files[i as usize] = false;
        open.count -= 1;
    }
    Ok(())
}

/// Where a file is written before it is complete: a hidden name beside
/// `target`.
fn part_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    target.with_file_name(format!(".{name}.{PARTIAL}"))
}

fn open_part(path: &Path, write: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Feeds the file's hash the chunks written after the ones hashed so far,
/// reading them back from the part at `path` (the page cache).
fn advance(p: &mut Part, file: &UpdateFile, path: &Path) -> Result<()> {
    let n = file.chunks.len();
    if p.hashed >= n || !p.written[p.hashed] {
        return Ok(());
    }
    let f = open_part(path, false)?;
    let mut buf = Vec::new();
    let mut offset = p.offsets[p.hashed];
    while p.hashed < n && p.written[p.hashed] {
        let size = file.chunks[p.hashed].size;
        buf.resize(size as usize, 0);
        crate::platform::read_exact_at(&f, &mut buf, offset)
            .with_context(|| format!("cannot read back {}", path.display()))?;
        offset += size;
        p.hasher.get_or_insert_with(Default::default).update(&buf);
        p.hashed += 1;
    }
    Ok(())
}

/// Checks a file whose every chunk is written (its part, if it has more
/// than one), gives it its mode, syncs it and renames it to its name.
fn finish(p: Option<&mut Part>, file: &UpdateFile, dest: &Path, store: &ChunkStore) -> Result<()> {
    let target = dest.join(&file.name);
    let part = part_path(&target);
    let hash: Hash = match (p, file.chunks.as_slice()) {
        (_, [only]) => only.hash,
        (Some(p), _) => {
            advance(p, file, &part)?;
            match &p.hasher {
                Some(h) => h.finalize().into(),
                None => blake3::Hasher::new().finalize().into(),
            }
        }
        (None, _) => blake3::Hasher::new().finalize().into(),
    };
    if Some(hash) != file.hash {
        crate::fetch::find_damaged(file, store)?;
        bail!(
            "{}: staged file hashes to {hash}, not the manifest's hash",
            file.name
        );
    }
    let f = open_part(&part, true)?;
    if let Some(mode) = file.mode {
        crate::platform::set_mode(&f, mode)
            .with_context(|| format!("cannot set the mode of {}", part.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("cannot sync {}", part.display()))?;
    crate::platform::rename(&part, &target)
        .with_context(|| format!("cannot rename into {}", target.display()))?;
    Ok(())
}

/// The files of earlier staged releases by hash, size and mode: (release,
/// file) of the first of each, looked up once per file of the new release
/// (a scan per file took 35 s for 100,000 files).
type Earlier = HashMap<(Hash, u64, Option<u32>), (usize, usize)>;

fn index_earlier(earlier: &[Staged]) -> Earlier {
    let mut index = Earlier::new();
    for (r, s) in earlier.iter().enumerate() {
        for (i, f) in s.manifest.files.iter().enumerate() {
            if let (Some(hash), Some(size)) = (f.hash, f.size) {
                index.entry((hash, size, f.mode)).or_insert((r, i));
            }
        }
    }
    index
}

/// A file of an earlier staged release with `file`'s hash, size and mode.
fn same_file(file: &UpdateFile, earlier: &[Staged], index: &Earlier) -> Option<PathBuf> {
    let key = (file.hash?, file.size?, file.mode);
    let &(r, i) = index.get(&key)?;
    let s = &earlier[r];
    Some(s.dir.join(&s.manifest.files[i].name)).filter(|path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && Some(m.len()) == file.size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanup_protocol::chunk::Chunk;

    fn release(files: &[(&str, &[u8], u32)], chunk: usize) -> (Manifest, Vec<(Hash, Vec<u8>)>) {
        let mut m = Manifest {
            format: lanup_protocol::manifest::Format::V2,
            url: "http://origin/".into(),
            update_time: None,
            version: None,
            expires: None,
            files: Vec::new(),
            restart: Default::default(),
            bundles: Vec::new(),
            runs: Vec::new(),
        };
        let mut data = Vec::new();
        for (name, bytes, mode) in files {
            let chunks: Vec<Chunk> = bytes
                .chunks(chunk)
                .map(|c| {
                    data.push((Hash::of(c), c.to_vec()));
                    Chunk {
                        size: c.len() as u64,
                        hash: Hash::of(c),
                    }
                })
                .collect();
            m.files.push(UpdateFile {
                name: (*name).into(),
                size: Some(bytes.len() as u64),
                mode: Some(*mode),
                hash: Some(Hash::of(bytes)),
                chunks,
                ..Default::default()
            });
        }
        (m, data)
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 7) as u8)
            .collect()
    }

    fn put(store: &ChunkStore, data: &[(Hash, Vec<u8>)]) {
        for (h, d) in data {
            store
                .put(
                    &Chunk {
                        size: d.len() as u64,
                        hash: *h,
                    },
                    d,
                )
                .expect("put");
        }
    }

    fn run(
        m: Manifest,
        store: &ChunkStore,
        dest: &Path,
        earlier: Vec<Staged>,
        held: Vec<Hash>,
        later: &[Hash],
    ) -> Result<PathBuf> {
        let (tx, rx) = mpsc::channel();
        let stager = start(
            Arc::new(m),
            store.clone(),
            dest.to_owned(),
            move || earlier,
            held,
            move |r| {
                let _ = tx.send(r);
            },
        );
        for h in later {
            stager.gained(*h);
        }
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the stager answers")
    }

    #[test]
    fn folders_named_after_a_date_are_renamed_to_names_windows_accepts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path();
        let old = "2026-11-20T08:00:00Z";
        for sub in ["staging", "releases"] {
            std::fs::create_dir_all(state.join(sub).join(old)).expect("mkdir");
            std::fs::write(state.join(sub).join(old).join("f"), sub).expect("write");
            std::fs::create_dir_all(state.join(sub).join("1.0")).expect("mkdir");
        }
        rename_old_folders(state);
        for sub in ["staging", "releases"] {
            let mut names: Vec<String> = std::fs::read_dir(state.join(sub))
                .expect("read_dir")
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            names.sort();
            assert_eq!(names, ["1.0", "2026-11-20T08.00.00Z"], "{sub}");
            let kept = std::fs::read_to_string(state.join(sub).join("2026-11-20T08.00.00Z/f"));
            assert_eq!(kept.expect("moved with its files"), sub);
        }
    }

    #[test]
    fn chunks_in_any_order_make_every_file_with_its_mode_and_nothing_partial() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(&tmp.path().join("chunks")).expect("store");
        let a = bytes(10_000, 1);
        let b = bytes(3_000, 2);
        let (m, data) = release(
            &[
                ("bin/a", &a, 0o755),
                ("b.txt", &b, 0o644),
                ("empty", b"", 0o644),
            ],
            1000,
        );
        put(&store, &data);
        let mut order: Vec<Hash> = data.iter().map(|(h, _)| *h).collect();
        order.reverse();
        // The same chunk twice (a repeat notice) changes nothing.
        order.push(order[0]);
        let dest = tmp.path().join("staging/1.0");
        let dir = run(m.clone(), &store, &dest, Vec::new(), Vec::new(), &order).expect("staged");
        assert_eq!(std::fs::read(dir.join("bin/a")).expect("a"), a);
        assert_eq!(std::fs::read(dir.join("b.txt")).expect("b"), b);
        assert_eq!(std::fs::read(dir.join("empty")).expect("empty"), b"");
        let mode = |p: &str| crate::platform::mode(&std::fs::metadata(dir.join(p)).expect("meta"));
        assert_eq!(mode("bin/a"), 0o755);
        assert!(crate::release::verify_dir(&m, &dir).is_empty());
        let stray: Vec<_> = walk(&dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("lanup-part"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn a_delta_links_its_unchanged_files_and_writes_only_the_changed_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(&tmp.path().join("chunks")).expect("store");
        let same = bytes(8_000, 3);
        let (m1, d1) = release(
            &[("same.bin", &same, 0o644), ("x", &bytes(4_000, 4), 0o644)],
            1000,
        );
        put(&store, &d1);
        let held: Vec<Hash> = d1.iter().map(|(h, _)| *h).collect();
        let old = run(
            m1.clone(),
            &store,
            &tmp.path().join("s/1"),
            Vec::new(),
            held,
            &[],
        )
        .expect("v1 staged");
        let (m2, d2) = release(
            &[("same.bin", &same, 0o644), ("x", &bytes(4_000, 5), 0o644)],
            1000,
        );
        put(&store, &d2);
        let new_chunks: Vec<Hash> = d2
            .iter()
            .map(|(h, _)| *h)
            .filter(|h| !d1.iter().any(|(o, _)| o == h))
            .collect();
        let earlier = vec![Staged {
            manifest: Arc::new(m1),
            dir: old.clone(),
        }];
        let dir = run(
            m2.clone(),
            &store,
            &tmp.path().join("s/2"),
            earlier,
            Vec::new(),
            &new_chunks,
        )
        .expect("v2 staged");
        use std::os::unix::fs::MetadataExt;
        let ino = |p: PathBuf| p.metadata().expect("meta").ino();
        assert_eq!(
            ino(dir.join("same.bin")),
            ino(old.join("same.bin")),
            "linked"
        );
        assert_ne!(ino(dir.join("x")), ino(old.join("x")));
        assert!(crate::release::verify_dir(&m2, &dir).is_empty());
    }

    #[test]
    fn a_chunk_damaged_in_the_store_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("chunks");
        let store = ChunkStore::open(&root).expect("store");
        let (m, data) = release(&[("f", &bytes(3_000, 6), 0o644)], 1000);
        put(&store, &data);
        // A byte flipped at rest.
        let victim = walk(&root)
            .into_iter()
            .find(|p| p.to_string_lossy().contains(&data[1].0.to_string()))
            .expect("the chunk's file");
        let mut bytes = std::fs::read(&victim).expect("read");
        bytes[10] ^= 1;
        std::fs::write(&victim, bytes).expect("write");
        let all: Vec<Hash> = data.iter().map(|(h, _)| *h).collect();
        let err = run(m, &store, &tmp.path().join("s"), Vec::new(), all, &[]).expect_err("damaged");
        assert_eq!(
            err.downcast_ref::<DamagedChunk>().map(|d| d.0),
            Some(data[1].0)
        );
    }

    #[test]
    fn a_stager_the_node_drops_stops_without_a_word() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(&tmp.path().join("chunks")).expect("store");
        let (m, _) = release(&[("f", &bytes(3_000, 7), 0o644)], 1000);
        let (tx, rx) = mpsc::channel();
        let stager = start(
            Arc::new(m),
            store,
            tmp.path().join("s"),
            Vec::new,
            Vec::new(),
            move |r| {
                let _ = tx.send(r);
            },
        );
        drop(stager);
        assert!(matches!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ));
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
