//! Release directories: publishing one from a folder, reading a manifest and
//! its signature from a path or URL, and checking a folder against a
//! manifest.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lanup_protocol::chunk::{digest_bytes, digest_reader, SMALL_FILE};
use lanup_protocol::manifest::{
    check_file_name, Format, Restart, MANIFEST_FILE, MAX_FILES, MAX_MANIFEST_BYTES,
    MAX_PACKED_MANIFEST_BYTES,
};
use lanup_protocol::sign::{PublicKey, SecretKey, Signature};
use lanup_protocol::{Hash, Manifest, UpdateFile, Version};

use crate::manifest_text::{ManifestText, PlainWriter, PUBLISH_LEVEL};
use crate::release_store::{ReleaseStore, STORE_DIR};
use time::OffsetDateTime;

/// What `lanup publish` needs, resolved from flags and a classic manifest.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The folder holding the release's files as they are installed.
    pub dir: PathBuf,
    /// Where the release directory is written; must not be inside `dir`.
    pub out: PathBuf,
    pub version: Version,
    /// Base URL the release directory will be served under.
    pub url: String,
    pub update_time: OffsetDateTime,
    pub expires: Option<OffsetDateTime>,
    pub restart: Restart,
    /// Patches from earlier releases and packed chunks.
    pub deltas: crate::release_store::PublishDeltas,
    /// The release is for Linux nodes only: file names Windows cannot hold
    /// are allowed.
    pub linux_only: bool,
}

/// What a publish produced.
#[derive(Debug)]
pub struct Published {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub signed_by: PublicKey,
}

/// Builds a signed format-2 release directory: every regular file of
/// `opts.dir` is chunked, hashed and copied to `opts.out` at its `FileName`
/// path in one streaming pass, then `AutoUpdater.xml` and its signature are
/// written. Files are written under a temporary name and renamed into place,
/// so a reader never sees half a file.
/// An expiry date must lie ahead: every node would refuse the release.
fn check_expiry(expires: Option<OffsetDateTime>) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let Some(expires) = expires.filter(|at| *at <= now) else {
        return Ok(());
    };
    let rfc = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    bail!(
        "--expires {}: that date has passed (now is {}); every node would refuse the release as expired, so give a later date",
        rfc(expires),
        rfc(now)
    )
}

/// The files of the release folder `dir`, with their names in the
/// manifest: regular files only, names every node accepts (on Windows too,
/// unless `linux_only`).
fn sources(dir: &Path, linux_only: bool) -> Result<Vec<(PathBuf, String)>> {
    let mut sources = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry =
            entry.with_context(|| format!("cannot read release folder {}", dir.display()))?;
        let path = entry.path();
        let kind = entry.file_type();
        if kind.is_dir() {
            continue;
        }
        if kind.is_symlink() {
            bail!(
                "{}: is a symbolic link; lanup publishes regular files only (copy the target in)",
                path.display()
            );
        }
        if !kind.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        let name = file_name_of(dir, path)?;
        check_file_name(&name).with_context(|| format!("{}", path.display()))?;
        if name.split('/').next() == Some(STORE_DIR) {
            bail!(
                "{}: lanup keeps its patches and earlier releases in {STORE_DIR}/ beside a release; rename this folder",
                path.display()
            );
        }
        if !linux_only {
            if let Some(why) = lanup_protocol::manifest::windows_refuses(&name) {
                bail!(
                    "{}: {why}; a release installs on Windows nodes too, so rename it (or publish with --linux-only)",
                    path.display()
                );
            }
        }
        sources.push((path.to_owned(), name));
    }
    if !linux_only {
        if let Some((a, b)) =
            lanup_protocol::manifest::case_twins(sources.iter().map(|(_, n)| n.as_str()))
        {
            bail!(
                "{}: \"{a}\" and \"{b}\" differ only in case, and Windows keeps one file for both; rename one (or publish with --linux-only)",
                dir.display()
            );
        }
    }
    Ok(sources)
}

/// A node accepts at most so many files, and a manifest so large.
fn check_size(dir: &Path, manifest: &Manifest) -> Result<()> {
    if manifest.files.len() > MAX_FILES {
        bail!(
            "{}: {} files, over the {MAX_FILES} a node accepts in one release; publish fewer files (archive the small ones together)",
            dir.display(),
            manifest.files.len()
        );
    }
    let plain = manifest.to_xml()?.len() as u64;
    if plain > MAX_MANIFEST_BYTES {
        bail!(
            "{}: {} files make a {plain}-byte manifest, over the {MAX_MANIFEST_BYTES} bytes a node accepts; publish fewer files (archive the small ones together)",
            dir.display(),
            manifest.files.len()
        );
    }
    Ok(())
}

pub fn publish(opts: &PublishOptions, key: &SecretKey) -> Result<Published> {
    let dir = fs::canonicalize(&opts.dir)
        .with_context(|| format!("release folder {}", opts.dir.display()))?;
    if !dir.is_dir() {
        bail!("release folder {}: not a directory", dir.display());
    }
    check_expiry(opts.expires)?;
    let planned = resolved(&opts.out)?;
    if planned.starts_with(&dir) {
        bail!(
            "output folder {} is inside the release folder {}; choose an output folder elsewhere",
            planned.display(),
            dir.display()
        );
    }

    // Everything is read and checked before anything is written: a
    // release no node would accept leaves the output folder as it was.
    let sources = sources(&dir, opts.linux_only)?;
    let files = crate::parallel::map(&sources, |(path, name)| digest_file(path, name))?;

    let mut manifest = Manifest {
        format: Format::V2,
        url: opts.url.clone(),
        update_time: Some(opts.update_time),
        version: Some(opts.version.clone()),
        expires: opts.expires,
        files,
        restart: opts.restart.clone(),
        bundles: Vec::new(),
        runs: Vec::new(),
    };
    manifest
        .validate()
        .context("the release would not be installable")?;
    check_size(&dir, &manifest)?;

    fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create output folder {}", opts.out.display()))?;
    let out = fs::canonicalize(&opts.out)?;
    if out.starts_with(&dir) {
        bail!(
            "output folder {} is inside the release folder {}; choose an output folder elsewhere",
            out.display(),
            dir.display()
        );
    }
    // The release `out` serves now becomes a base before any of its files
    // is replaced.
    let store = ReleaseStore::open(&out)?;
    store.keep_current(&out)?;
    crate::parallel::map(
        &sources.iter().zip(&manifest.files).collect::<Vec<_>>(),
        |((path, _), file)| copy_checked(path, &out, file),
    )?;
    let recent = store.add_deltas(&out, &mut manifest, &opts.deltas)?;
    manifest
        .validate()
        .context("the release's patches would not be accepted")?;
    let xml = manifest.to_xml()?;
    if xml.len() as u64 > MAX_MANIFEST_BYTES {
        bail!(
            "{}: with its patches and packed chunks the manifest takes {} bytes, over the {MAX_MANIFEST_BYTES} bytes a node accepts; publish again with --keep-bases 0 --no-pack",
            dir.display(),
            xml.len()
        );
    }
    let manifest_path = out.join(MANIFEST_FILE);
    let bases: Vec<Vec<u8>> = recent.iter().filter_map(|p| fs::read(p).ok()).collect();
    write_manifest(&manifest_path, xml.as_bytes(), key, &bases)?;
    store.finish(&out, &manifest, xml.as_bytes(), opts.deltas.keep)?;
    Ok(Published {
        manifest,
        manifest_path,
        signed_by: key.public(),
    })
}

/// Dates `path` at least a second after `previous` (the manifest it
/// replaced), in whole seconds. Static servers derive their validators from
/// the modification time: nginx's ETag is its second and the size, so two
/// manifests of one size written within a second would share one and a
/// node polling with it would be told nothing changed.
fn newer_than(path: &Path, previous: Option<std::time::SystemTime>) -> Result<()> {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let seconds = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = seconds(SystemTime::now());
    let at = match previous {
        Some(p) if seconds(p) >= now => seconds(p) + 1,
        _ => now,
    };
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(UNIX_EPOCH + Duration::from_secs(at)))
        .with_context(|| format!("cannot date {}", path.display()))
}

/// Writes a manifest's deltas from `bases` (earlier manifests a node may
/// hold), its compressed copy, its text and its signature, in that order,
/// each in one step: a node reading between two of the steps finds a delta
/// or copy the signature does not cover and reads the text, or the text
/// the earlier signature does not cover and tries again at its next poll.
/// Deltas from other manifests are removed.
fn write_manifest(
    manifest_path: &Path,
    xml: &[u8],
    key: &SecretKey,
    bases: &[Vec<u8>],
) -> Result<()> {
    let packed_path = packed_path_for(manifest_path);
    // Level 19 takes 14 s over the 26 MB manifest of 100,000 files for a
    // copy a fifth smaller than level 3's (0.1 s): small manifests get it.
    let level = if xml.len() <= 1 << 20 {
        PUBLISH_LEVEL
    } else {
        crate::manifest_text::NODE_LEVEL
    };
    let text = ManifestText::read_plain(xml, level)
        .with_context(|| format!("cannot compress {}", manifest_path.display()))?;
    let mut made = HashSet::new();
    for base in bases {
        let hash = Hash::of(base);
        if base.as_slice() == xml || !made.insert(hash) {
            continue;
        }
        let delta = crate::manifest_text::make_delta(base, xml)
            .with_context(|| format!("cannot write a delta of {}", manifest_path.display()))?;
        // Worth a request only when it saves most of the compressed copy.
        if delta.len() * 2 < text.packed().len() {
            write_atomically(&delta_path_for(manifest_path, &hash), &delta)?;
        } else {
            made.remove(&hash);
        }
    }
    remove_deltas_except(manifest_path, &made)?;
    let previous = |path: &Path| fs::metadata(path).and_then(|m| m.modified()).ok();
    let signature_path = signature_path_for(manifest_path);
    let (packed_before, plain_before, signed_before) = (
        previous(&packed_path),
        previous(manifest_path),
        previous(&signature_path),
    );
    write_atomically(&packed_path, text.packed())?;
    newer_than(&packed_path, packed_before)?;
    write_atomically(manifest_path, xml)?;
    newer_than(manifest_path, plain_before)?;
    let signature = key.sign(xml);
    // Every signature file has the same size: dated a second later than
    // the one it replaces, its validator changes too (nodes poll it).
    write_atomically(&signature_path, signature.to_text().as_bytes())?;
    newer_than(&signature_path, signed_before)
}

/// Where the delta that rebuilds a manifest from the one whose text
/// hashes to `base` is kept: beside it, `AutoUpdater.xml.from-HASH.zst`.
pub fn delta_path_for(manifest_path: &Path, base: &Hash) -> PathBuf {
    let mut name = manifest_path.as_os_str().to_owned();
    name.push(format!(".from-{base}.zst"));
    PathBuf::from(name)
}

/// Removes the deltas beside a manifest other than those from `keep`.
fn remove_deltas_except(manifest_path: &Path, keep: &HashSet<Hash>) -> Result<()> {
    let (Some(dir), Some(name)) = (manifest_path.parent(), manifest_path.file_name()) else {
        return Ok(());
    };
    let prefix = format!("{}.from-", name.to_string_lossy());
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries.flatten() {
        let entry_name = entry.file_name();
        let Some(base) = entry_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".zst"))
        else {
            continue;
        };
        if base.parse::<Hash>().is_ok_and(|h| !keep.contains(&h)) {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Re-signs a manifest edited by hand, after checking it still parses and
/// validates (a signature over a manifest no node would accept helps
/// nobody), and writes its compressed copy anew.
pub fn sign_manifest(manifest_path: &Path, key: &SecretKey) -> Result<PathBuf> {
    let text = ManifestText::read_file(manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = text
        .parse()
        .with_context(|| format!("{}", manifest_path.display()))?;
    manifest
        .validate()
        .with_context(|| format!("{}", manifest_path.display()))?;
    let xml = text
        .to_vec()
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    write_manifest(manifest_path, &xml, key, &[])?;
    Ok(signature_path_for(manifest_path))
}

/// The compressed copy (`.zst`) that belongs to a manifest file.
pub fn packed_path_for(manifest_path: &Path) -> PathBuf {
    let mut name = manifest_path.as_os_str().to_owned();
    name.push(".zst");
    PathBuf::from(name)
}

/// The `.sig` file that belongs to a manifest file.
pub fn signature_path_for(manifest_path: &Path) -> PathBuf {
    let mut name = manifest_path.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

fn file_name_of(root: &Path, path: &Path) -> Result<String> {
    let rel = path.strip_prefix(root)?;
    let parts = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_str()
                .with_context(|| format!("{}: file name is not UTF-8", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(parts.join("/"))
}

/// `path` with symbolic links resolved, whether or not it exists yet: its
/// longest existing part made canonical, the rest appended.
fn resolved(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        rest.push(name);
        existing = parent;
    }
    let mut out = fs::canonicalize(existing).with_context(|| format!("{}", existing.display()))?;
    out.extend(rest.iter().rev());
    Ok(out)
}

/// Digests one file of the release folder: small files are read whole,
/// larger ones streamed.
fn digest_file(src: &Path, name: &str) -> Result<UpdateFile> {
    let mut reader = File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
    let meta = reader.metadata()?;
    let digest = if meta.len() <= SMALL_FILE {
        let mut data = Vec::with_capacity(meta.len() as usize);
        reader
            .read_to_end(&mut data)
            .with_context(|| format!("cannot read {}", src.display()))?;
        digest_bytes(&data)
    } else {
        digest_reader(reader, |_| Ok(()))
            .with_context(|| format!("cannot read {}", src.display()))?
    };
    Ok(UpdateFile {
        name: name.to_owned(),
        size: Some(digest.size),
        mode: Some(crate::platform::mode(&meta)),
        hash: Some(digest.hash),
        chunks: digest.chunks,
        ..Default::default()
    })
}

/// Copies a file of the release folder to its place in `out`, checking on
/// the way that it is still the file `file` describes. A file already there
/// with the same bytes is left as it is (publishing a release that changes
/// a few files of many writes only those). One that differs is replaced by
/// a rename, so a client of the release being replaced never reads half a
/// file; where there was none, the file is written in its place at once (no
/// manifest names it before the new one is written).
fn copy_checked(src: &Path, out: &Path, file: &UpdateFile) -> Result<()> {
    let dest = out.join(&file.name);
    let mode = file.mode.unwrap_or(0o644) | PUBLISHED_MODE;
    let present = match fs::symlink_metadata(&dest) {
        Ok(meta) if meta.is_file() && Some(meta.len()) == file.size => {
            if file.hash.is_some() && hash_file(&dest).ok() == file.hash {
                if crate::platform::mode(&meta) != mode {
                    crate::platform::set_path_mode(&dest, mode)?;
                }
                return Ok(());
            }
            true
        }
        Ok(_) => true,
        Err(_) => false,
    };
    let parent = dest.parent().unwrap_or(out);
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let reader = File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
    let mut temporary = None;
    let mut writer = if present {
        let t = tempfile::Builder::new()
            .tempfile_in(parent)
            .with_context(|| format!("cannot write in {}", parent.display()))?;
        let writer = t.reopen()?;
        temporary = Some(t);
        writer
    } else {
        crate::platform::create_new(&dest, mode)
            .with_context(|| format!("cannot write {}", dest.display()))?
    };
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    // A buffer the file's size, up to a mebibyte: a tree of 100,000 small
    // files is not 100,000 mebibytes allocated and freed.
    let capacity = file.size.unwrap_or(0).clamp(8 << 10, 1 << 20) as usize;
    let mut reader = io::BufReader::with_capacity(capacity, reader);
    loop {
        let data = reader.fill_buf()?;
        if data.is_empty() {
            break;
        }
        hasher.update(data);
        writer
            .write_all(data)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        let n = data.len();
        size += n as u64;
        reader.consume(n);
    }
    if Some(size) != file.size || file.hash != Some(Hash::from(hasher.finalize())) {
        if temporary.is_none() {
            let _ = fs::remove_file(&dest);
        }
        bail!(
            "{}: changed while it was being published; publish again once it is complete",
            src.display()
        );
    }
    // The published copy is readable by everyone (a web server serving the
    // folder runs as its own user, and the umask may have narrowed the
    // mode); the manifest records the mode the file is installed with.
    crate::platform::set_mode(&writer, mode)?;
    if let Some(t) = temporary {
        t.persist(&dest)
            .with_context(|| format!("cannot rename into {}", dest.display()))?;
    }
    Ok(())
}

/// The permission bits every published file has at least: readable by
/// everyone, so nginx or Apache running as their own user can serve them.
const PUBLISHED_MODE: u32 = 0o444;

/// Writes a published file (manifest, signature) in one step, readable by
/// everyone ([`PUBLISHED_MODE`], writable by its owner).
pub(crate) fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<()> {
    crate::apply::write_synced(dest, bytes)
        .and_then(|()| crate::platform::set_path_mode(dest, 0o644))
        .with_context(|| format!("cannot write {}", dest.display()))
}

/// A manifest's bytes and its signature file's, as read from disk or HTTP.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    /// Where the manifest came from, for messages.
    pub location: String,
    /// The manifest's exact bytes, held compressed.
    pub text: ManifestText,
    /// The `.sig` file's text, when there is one.
    pub signature: Option<Vec<u8>>,
    /// Where the signature was looked for.
    pub signature_location: String,
}

/// The most bytes of a `.sig` file read.
const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;

impl ManifestSource {
    /// Reads a manifest from a file, a release folder, or an http(s) URL (a
    /// URL ending in `/` names a release directory). Manifests over
    /// [`MAX_MANIFEST_BYTES`] are refused once that much is read.
    pub async fn read(location: &str) -> Result<ManifestSource> {
        if location.starts_with("http://") || location.starts_with("https://") {
            let client = crate::fetch::Origin::client(std::time::Duration::from_secs(60))?;
            return match ManifestSource::poll(&client, location, None, None).await? {
                Poll::Changed { source, .. } => Ok(source),
                Poll::Unchanged { .. } => {
                    bail!("{location}: origin answered 304 to an unconditional GET")
                }
            };
        }
        ManifestSource::read_local(Path::new(location))
    }

    /// Reads a manifest file, or a release folder's, and its signature if
    /// there is one; the same bound as [`ManifestSource::read`].
    pub fn read_local(location: &Path) -> Result<ManifestSource> {
        let mut path = location.to_owned();
        if path.is_dir() {
            path = path.join(MANIFEST_FILE);
        }
        let text = ManifestText::read_file(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let sig_path = signature_path_for(&path);
        let signature = match fs::read(&sig_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", sig_path.display())),
        };
        Ok(ManifestSource {
            location: path.display().to_string(),
            text,
            signature,
            signature_location: sig_path.display().to_string(),
        })
    }

    /// Polls an origin for the manifest at `location` (a URL ending in `/`
    /// names a release directory), conditionally when an ETag from the
    /// last poll is given.
    ///
    /// Holding a manifest from an earlier poll (`known`), it asks for the
    /// signature alone first, with the ETag: a manifest is signed
    /// deterministically, so the same signature is the same manifest, and
    /// a poll of an unchanged release costs a hundred bytes at most. When
    /// the signature changed, the delta that rebuilds the new manifest
    /// from the one held (`AutoUpdater.xml.from-HASH.zst`, see
    /// [`delta_path_for`]) is asked for next, and taken when the signature
    /// holds over what it rebuilds: a release changing a few files of a
    /// large tree costs kilobytes instead of its whole manifest. The ETag
    /// returned is then the signature's.
    ///
    /// Else, and when there is no such delta, the compressed copy beside
    /// the manifest (`AutoUpdater.xml.zst`) is asked for, and taken when
    /// the signature holds over what it decodes to; an origin without one,
    /// or with one left over from an earlier manifest, gets the text asked
    /// for next.
    pub async fn poll(
        client: &reqwest::Client,
        location: &str,
        etag: Option<&str>,
        known: Option<&Known>,
    ) -> Result<Poll> {
        let url = if location.ends_with('/') {
            format!("{location}{MANIFEST_FILE}")
        } else {
            location.to_owned()
        };
        let sig_url = format!("{url}.sig");
        let Some(known) = known else {
            return read_whole(client, url, sig_url, etag, None).await;
        };
        let (signature, sig_etag) =
            match http_get_bounded(client, &sig_url, etag, MAX_SIGNATURE_BYTES).await? {
                Got::NotModified => return Ok(Poll::Unchanged { etag: None }),
                Got::Body(bytes, etag) => (Some(bytes), etag),
                Got::NotFound => (None, None),
            };
        if signature.as_deref() == Some(&known.signature[..]) {
            return Ok(Poll::Unchanged { etag: sig_etag });
        }
        if let (Some(sig), Some(held)) = (signature.clone(), &known.text) {
            let delta_url = format!("{url}.from-{}.zst", held.hash());
            match http_get_bounded(client, &delta_url, None, MAX_PACKED_MANIFEST_BYTES).await {
                Ok(Got::Body(delta, _)) => {
                    let held = held.clone();
                    let rebuilt = tokio::task::spawn_blocking(move || {
                        let text = held.apply_delta(&delta)?;
                        holds_over(&text, &sig)?;
                        anyhow::Ok(text)
                    })
                    .await?;
                    match rebuilt {
                        Ok(text) => {
                            return Ok(Poll::Changed {
                                source: ManifestSource {
                                    location: delta_url,
                                    text,
                                    signature,
                                    signature_location: sig_url,
                                },
                                etag: sig_etag,
                                signed: true,
                            })
                        }
                        Err(e) => tracing::warn!(
                            url = %delta_url,
                            reason = %format!("{e:#}"),
                            "the manifest delta does not rebuild the signed manifest; reading the manifest whole"
                        ),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(url = %delta_url, error = %format!("{e:#}"), "no manifest delta; reading the manifest whole")
                }
            }
        }
        let poll = read_whole(client, url, sig_url, None, Some(signature)).await?;
        Ok(match poll {
            Poll::Changed { source, signed, .. } => Poll::Changed {
                source,
                etag: sig_etag,
                signed,
            },
            unchanged => unchanged,
        })
    }

    /// The signature, parsed; an error names the file and the reason.
    pub fn signature(&self) -> Result<Signature> {
        let Some(bytes) = &self.signature else {
            bail!("{}: no signature file", self.signature_location);
        };
        let text = std::str::from_utf8(bytes)
            .with_context(|| format!("{}: not text", self.signature_location))?;
        Signature::from_text(text).with_context(|| self.signature_location.clone())
    }

    /// Checks, in this order, that a trusted key signed these exact bytes,
    /// that they parse, and that the manifest is installable at `now`.
    pub fn authenticate(&self, trusted: &[PublicKey], now: OffsetDateTime) -> Result<Manifest> {
        self.text
            .verify(&self.signature()?, trusted)
            .with_context(|| self.location.clone())?;
        let manifest = self.parse()?;
        manifest
            .check_offer(None, now)
            .with_context(|| self.location.clone())?;
        Ok(manifest)
    }

    /// Parses without any trust check (for display).
    pub fn parse(&self) -> Result<Manifest> {
        self.text.parse().with_context(|| self.location.clone())
    }
}

/// The compressed manifest, if the signature (read now unless it was)
/// holds over it, with the ETag to poll with; None when it does not (the
/// manifest itself is read then).
async fn signed_packed(
    client: &reqwest::Client,
    packed: Vec<u8>,
    mut etag: Option<String>,
    signature: &mut Option<Option<Vec<u8>>>,
    (url, sig_url): (&str, &str),
) -> Result<Option<(ManifestText, Option<String>)>> {
    if signature.is_none() {
        let (read, sig_etag) = get_signature(client, sig_url).await?;
        *signature = Some(read);
        etag = sig_etag;
    }
    let sig = signature.clone().flatten();
    let checked = tokio::task::spawn_blocking(move || {
        let text = ManifestText::from_packed(packed)?;
        holds_over(&text, &sig.unwrap_or_default())?;
        anyhow::Ok(text)
    })
    .await?;
    match checked {
        Ok(text) => Ok(Some((text, etag))),
        Err(e) => {
            tracing::warn!(
                %url,
                reason = %format!("{e:#}"),
                "the compressed manifest is not the signed one; reading the manifest itself (publish again, or `lanup sign` the manifest, to write it anew)"
            );
            Ok(None)
        }
    }
}

/// Reads a manifest whole (conditionally, given an ETag): the compressed
/// copy first, taken when the signature holds over it, else the text. The
/// signature is read after the manifest unless it was read already
/// (`signature`); the ETag returned is then the signature's, which the
/// next polls ask with.
async fn read_whole(
    client: &reqwest::Client,
    url: String,
    sig_url: String,
    etag: Option<&str>,
    mut signature: Option<Option<Vec<u8>>>,
) -> Result<Poll> {
    let packed_url = format!("{url}.zst");
    match http_get_bounded(client, &packed_url, etag, MAX_PACKED_MANIFEST_BYTES).await? {
        Got::NotModified => return Ok(Poll::Unchanged { etag: None }),
        Got::NotFound => {}
        Got::Body(packed, etag) => {
            let read = signed_packed(
                client,
                packed,
                etag,
                &mut signature,
                (&packed_url, &sig_url),
            )
            .await?;
            if let Some((text, etag)) = read {
                return Ok(Poll::Changed {
                    source: ManifestSource {
                        location: packed_url,
                        text,
                        signature: signature.flatten(),
                        signature_location: sig_url,
                    },
                    etag,
                    signed: true,
                });
            }
        }
    }
    let (text, mut etag) = match http_get_text(client, &url, etag).await? {
        Got::Body(text, etag) => (text, etag),
        Got::NotModified => return Ok(Poll::Unchanged { etag: None }),
        Got::NotFound => bail!("{url}: not found"),
    };
    let signature = match signature {
        Some(read) => read,
        None => {
            let (read, sig_etag) = get_signature(client, &sig_url).await?;
            etag = sig_etag;
            read
        }
    };
    let source = ManifestSource {
        location: url,
        text,
        signature,
        signature_location: sig_url,
    };
    // Read while a publish replaced the files, the two may not belong
    // together; the node refuses such a pair, and neither is taken as
    // what the origin serves.
    let (source, signed) = tokio::task::spawn_blocking(move || {
        let signed = source
            .signature
            .as_deref()
            .is_some_and(|sig| holds_over(&source.text, sig).is_ok());
        (source, signed)
    })
    .await?;
    Ok(Poll::Changed {
        source,
        etag,
        signed,
    })
}

/// Checks that `signature` (a `.sig` file's bytes) holds over `text` by the
/// key it names, trusted or not: whether a manifest and a signature read
/// from an origin belong together. Whether the key is trusted is the
/// node's to check.
fn holds_over(text: &ManifestText, signature: &[u8]) -> Result<()> {
    let sig = Signature::from_text(std::str::from_utf8(signature)?)?;
    text.verify(&sig, std::slice::from_ref(&sig.key))?;
    Ok(())
}

/// What a fetcher holds of what it last read from the origin.
#[derive(Debug, Clone)]
pub struct Known {
    /// The signature file's bytes, as last read.
    pub signature: Vec<u8>,
    /// The last signed manifest read: the next one may come as a delta
    /// from it.
    pub text: Option<ManifestText>,
}

/// GETs a `.sig` file, with its ETag: `None` when there is none.
async fn get_signature(
    client: &reqwest::Client,
    url: &str,
) -> Result<(Option<Vec<u8>>, Option<String>)> {
    Ok(
        match http_get_bounded(client, url, None, MAX_SIGNATURE_BYTES).await? {
            Got::Body(bytes, etag) => (Some(bytes), etag),
            Got::NotFound | Got::NotModified => (None, None),
        },
    )
}

/// What a conditional poll of the origin found.
#[derive(Debug)]
pub enum Poll {
    /// The manifest is as it was at the last poll (HTTP 304, or the same
    /// signature), with the validator to poll with from now on, if new.
    Unchanged { etag: Option<String> },
    /// The manifest and signature as served now, with the manifest's ETag.
    Changed {
        source: ManifestSource,
        etag: Option<String>,
        /// Whether the signature holds over the manifest (by the key it
        /// names, trusted or not): a pair read half-way through a publish
        /// does not, and its signature is not remembered as the origin's.
        signed: bool,
    },
}

/// What one bounded GET returned.
pub(crate) enum Got<T = Vec<u8>> {
    Body(T, Option<String>),
    NotModified,
    NotFound,
}

/// Sends a GET of `url` (conditionally, given an ETag); `Err` for an
/// answer other than success, 304 or 404.
async fn http_get(
    client: &reqwest::Client,
    url: &str,
    etag: Option<&str>,
) -> Result<Got<reqwest::Response>> {
    let mut request = client.get(url);
    if let Some(etag) = etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    let resp = request
        .send()
        .await
        .with_context(|| format!("cannot fetch {url}"))?;
    match resp.status() {
        reqwest::StatusCode::NOT_FOUND => Ok(Got::NotFound),
        reqwest::StatusCode::NOT_MODIFIED => Ok(Got::NotModified),
        s if !s.is_success() => bail!("{url}: origin answered {s}"),
        _ => {
            let etag = resp
                .headers()
                .get(reqwest::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok(Got::Body(resp, etag))
        }
    }
}

/// GETs `url` (conditionally, given an ETag), refusing bodies over `max`
/// bytes.
pub(crate) async fn http_get_bounded(
    client: &reqwest::Client,
    url: &str,
    etag: Option<&str>,
    max: u64,
) -> Result<Got> {
    let (mut resp, etag) = match http_get(client, url, etag).await? {
        Got::Body(resp, etag) => (resp, etag),
        Got::NotModified => return Ok(Got::NotModified),
        Got::NotFound => return Ok(Got::NotFound),
    };
    if let Some(len) = resp.content_length() {
        if len > max {
            bail!("{url}: {len} bytes, more than the {max} bytes lanup accepts here");
        }
    }
    // Sized once when the length is known (checked above): a manifest of
    // many files is megabytes, and doubling would hold up to twice that.
    let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("reading {url}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > max {
            bail!("{url}: more than the {max} bytes lanup accepts here");
        }
    }
    Ok(Got::Body(body, etag))
}

/// GETs a manifest's text, compressing it as it arrives (the text of a
/// manifest of many files is never held whole).
async fn http_get_text(
    client: &reqwest::Client,
    url: &str,
    etag: Option<&str>,
) -> Result<Got<ManifestText>> {
    let (mut resp, etag) = match http_get(client, url, etag).await? {
        Got::Body(resp, etag) => (resp, etag),
        Got::NotModified => return Ok(Got::NotModified),
        Got::NotFound => return Ok(Got::NotFound),
    };
    if let Some(len) = resp.content_length() {
        if len > MAX_MANIFEST_BYTES {
            bail!("{url}: manifest is {len} bytes, more than the {MAX_MANIFEST_BYTES} bytes lanup accepts");
        }
    }
    let mut writer = PlainWriter::new(crate::manifest_text::NODE_LEVEL)?;
    while let Some(chunk) = resp
        .chunk()
        .await
        .with_context(|| format!("reading {url}"))?
    {
        writer
            .write_all(&chunk)
            .with_context(|| format!("reading {url}"))?;
    }
    let text = writer.finish().with_context(|| url.to_owned())?;
    Ok(Got::Body(text, etag))
}

/// How one file on disk differs from its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Missing,
    NotAFile,
    Size { expected: u64, actual: u64 },
    Hash { expected: Hash, actual: Hash },
    Unreadable(String),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Missing => f.write_str("missing"),
            Mismatch::NotAFile => f.write_str("not a regular file"),
            Mismatch::Size { expected, actual } => {
                write!(f, "size {actual}, expected {expected}")
            }
            Mismatch::Hash { expected, actual } => {
                write!(f, "hash {actual}, expected {expected}")
            }
            Mismatch::Unreadable(e) => write!(f, "unreadable: {e}"),
        }
    }
}

/// Checks that `dir` holds every file `manifest` lists with the right size
/// and hash. Returns each mismatching file with how it differs; empty means
/// all match. Files the manifest does not list are not looked at.
pub fn verify_dir(manifest: &Manifest, dir: &Path) -> Vec<(String, Mismatch)> {
    manifest
        .files
        .iter()
        .filter_map(|file| verify_file(file, dir).err().map(|m| (file.name.clone(), m)))
        .collect()
}

fn verify_file(file: &UpdateFile, dir: &Path) -> Result<(), Mismatch> {
    let path = dir.join(&file.name);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Mismatch::Missing),
        Err(e) => return Err(Mismatch::Unreadable(e.to_string())),
    };
    if !meta.is_file() {
        return Err(Mismatch::NotAFile);
    }
    if let Some(expected) = file.size {
        if meta.len() != expected {
            return Err(Mismatch::Size {
                expected,
                actual: meta.len(),
            });
        }
    }
    if let Some(expected) = file.hash {
        let actual = hash_file(&path).map_err(|e| Mismatch::Unreadable(e.to_string()))?;
        if actual != expected {
            return Err(Mismatch::Hash { expected, actual });
        }
    }
    Ok(())
}

/// BLAKE3 of a file, streamed.
pub fn hash_file(path: &Path) -> io::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize().into())
}
