//! A manifest's exact bytes, as a node holds them: compressed. A release of
//! 100,000 small files has a manifest of about 26 MB of text and 5 MB
//! compressed; a node keeps only the compressed copy, checks the signature
//! and parses the files as it decodes it, writes it to disk decoding as it
//! goes, and passes the compressed copy to its peers in parts
//! ([`PART`] bytes each). What the signature covers and what the
//! announcement names (the BLAKE3 of the text) stay the text's.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::Arc;

use lanup_protocol::manifest::{ManifestError, MAX_MANIFEST_BYTES, MAX_PACKED_MANIFEST_BYTES};
use lanup_protocol::sign::{PublicKey, Signature, SignatureError};
use lanup_protocol::{Hash, Manifest};

/// The zstd level a node compresses a manifest it got as text with;
/// `lanup publish` uses [`PUBLISH_LEVEL`].
pub(crate) const NODE_LEVEL: i32 = 3;
/// The level of the compressed copy `lanup publish` writes beside a
/// manifest of up to a mebibyte (larger ones get [`NODE_LEVEL`]).
pub const PUBLISH_LEVEL: i32 = 19;
/// The window the compressed copy is made with, and the largest a node
/// decodes (log2): a manifest repeats itself within an element, not across
/// megabytes, and the decoder's buffer is the window.
const WINDOW_LOG: u32 = 20;
/// The most of the compressed manifest one answer to a peer carries.
pub const PART: usize = 1 << 20;

/// A manifest's bytes, compressed, with the length and BLAKE3 of the text.
/// Cheap to clone.
#[derive(Clone)]
pub struct ManifestText {
    packed: Arc<[u8]>,
    len: u64,
    hash: Hash,
}

impl std::fmt::Debug for ManifestText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ManifestText({} bytes, {} compressed, {})",
            self.len,
            self.packed.len(),
            self.hash
        )
    }
}

/// Why a manifest's bytes could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("manifest is more than the {MAX_MANIFEST_BYTES} bytes lanup accepts")]
    TooLarge,
    #[error(
        "compressed manifest is more than the {MAX_PACKED_MANIFEST_BYTES} bytes lanup accepts"
    )]
    PackedTooLarge,
    #[error("compressed manifest does not decode: {0}")]
    Corrupt(io::Error),
    #[error("manifest delta: {0}")]
    Delta(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ManifestText {
    /// The manifest whose text is `bytes`.
    pub fn from_plain(bytes: &[u8]) -> Result<ManifestText, TextError> {
        ManifestText::read_plain(bytes, NODE_LEVEL)
    }

    /// Reads the text from `reader` and compresses it at `level` as it
    /// goes, refusing more than [`MAX_MANIFEST_BYTES`].
    pub fn read_plain(reader: impl Read, level: i32) -> Result<ManifestText, TextError> {
        let mut writer = PlainWriter::new(level)?;
        let copied = io::copy(&mut reader.take(MAX_MANIFEST_BYTES + 1), &mut writer)?;
        if copied > MAX_MANIFEST_BYTES {
            return Err(TextError::TooLarge);
        }
        writer.finish()
    }

    /// The manifest whose compressed copy is `packed` (one or more zstd
    /// frames): decoded once, bounded, to learn its length and hash.
    pub fn from_packed(packed: Vec<u8>) -> Result<ManifestText, TextError> {
        if packed.len() as u64 > MAX_PACKED_MANIFEST_BYTES {
            return Err(TextError::PackedTooLarge);
        }
        let mut text = ManifestText {
            packed: packed.into(),
            len: 0,
            hash: Hash::of(b""),
        };
        let mut hasher = blake3::Hasher::new();
        let mut len = 0u64;
        {
            let mut reader = text.reader()?.take(MAX_MANIFEST_BYTES + 1);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(TextError::Corrupt(e)),
                };
                hasher.update(&buf[..n]);
                len += n as u64;
            }
        }
        if len > MAX_MANIFEST_BYTES {
            return Err(TextError::TooLarge);
        }
        text.len = len;
        text.hash = hasher.finalize().into();
        Ok(text)
    }

    /// BLAKE3 of the text: what announcements and peers name it by.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The text's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The compressed copy.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The text, decoded as it is read.
    pub fn reader(&self) -> io::Result<impl BufRead + '_> {
        let mut decoder = zstd::stream::read::Decoder::with_buffer(&self.packed[..])?;
        decoder.window_log_max(WINDOW_LOG)?;
        Ok(BufReader::with_capacity(64 * 1024, decoder))
    }

    /// The whole text (for small uses: display, tests).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len as usize);
        self.reader()?.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Writes the text to `writer`, decoding as it goes.
    pub fn write_to(&self, writer: &mut impl Write) -> io::Result<()> {
        io::copy(&mut self.reader()?, writer).map(drop)
    }

    /// Checks that a key in `trusted` signed the text, decoding as it
    /// goes.
    pub fn verify(
        &self,
        signature: &Signature,
        trusted: &[PublicKey],
    ) -> Result<(), SignatureError> {
        let mut check = signature.check(trusted)?;
        let mut reader = self
            .reader()
            .map_err(|_| SignatureError::BadSignature(signature.key.to_string()))?;
        loop {
            let buf = match reader.fill_buf() {
                Ok(buf) => buf,
                Err(_) => return Err(SignatureError::BadSignature(signature.key.to_string())),
            };
            if buf.is_empty() {
                break;
            }
            check.update(buf);
            let n = buf.len();
            reader.consume(n);
        }
        check.finish()
    }

    /// Parses the text as it is decoded.
    pub fn parse(&self) -> Result<Manifest, ManifestError> {
        let reader = self
            .reader()
            .map_err(|e| ManifestError::Read(e.to_string()))?;
        Manifest::parse_reader(reader)
    }

    /// Bytes `offset..` of the compressed copy, at most [`PART`] of them.
    pub fn part(&self, offset: u64) -> &[u8] {
        let start = (offset as usize).min(self.packed.len());
        let end = start.saturating_add(PART).min(self.packed.len());
        &self.packed[start..end]
    }

    /// Reads a manifest file (its text), compressing it as it is read.
    pub fn read_file(path: &Path) -> Result<ManifestText, TextError> {
        let file = File::open(path)?;
        if file.metadata()?.len() > MAX_MANIFEST_BYTES {
            return Err(TextError::TooLarge);
        }
        ManifestText::read_plain(file, NODE_LEVEL)
    }
}

/// What a manifest delta starts with.
const DELTA_MAGIC: &[u8; 8] = b"lanupMD1";
/// The longest a publish spends finding what two manifests share before
/// it settles for a coarser delta.
const DIFF_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
const OP_END: u8 = 0;
const OP_COPY: u8 = 1;
const OP_INSERT: u8 = 2;

/// A manifest delta: how to write `target` from `base`, as runs of
/// `base`'s lines copied in order and new bytes between them, compressed.
/// A node that holds `base` rebuilds `target` from it streaming, without
/// either text whole in memory: a release that changes a hundred of
/// 100,000 files sends tens of kilobytes instead of its manifest.
///
/// ```text
/// "lanupMD1", then one zstd frame of:
///   base length u64, base BLAKE3, target length u64, target BLAKE3
///   ops: 1 skip u64 length u64 (copy from base) | 2 length u64 bytes | 0
/// ```
pub fn make_delta(base: &[u8], target: &[u8]) -> io::Result<Vec<u8>> {
    let (base_ends, target_ends) = (line_ends(base), line_ends(target));
    let (old, new) = (
        line_slices(base, &base_ends),
        line_slices(target, &target_ends),
    );
    let start_of = |ends: &[usize], line: usize| if line == 0 { 0 } else { ends[line - 1] };
    let ops = similar::capture_diff_slices_deadline(
        similar::Algorithm::Patience,
        &old,
        &new,
        Some(std::time::Instant::now() + DIFF_DEADLINE),
    );
    let mut raw = Vec::with_capacity(128);
    raw.extend_from_slice(&(base.len() as u64).to_le_bytes());
    raw.extend_from_slice(&Hash::of(base).0);
    raw.extend_from_slice(&(target.len() as u64).to_le_bytes());
    raw.extend_from_slice(&Hash::of(target).0);
    // Where in the base the last copy ended, and the copy or insertion
    // still open (merged with the next one that continues it).
    let mut cursor = 0usize;
    let mut copy: Option<(usize, usize)> = None;
    let mut insert: Option<(usize, usize)> = None;
    let flush_copy = |raw: &mut Vec<u8>, copy: &mut Option<(usize, usize)>, cursor: &mut usize| {
        if let Some((from, to)) = copy.take() {
            raw.push(OP_COPY);
            raw.extend_from_slice(&((from - *cursor) as u64).to_le_bytes());
            raw.extend_from_slice(&((to - from) as u64).to_le_bytes());
            *cursor = to;
        }
    };
    let flush_insert = |raw: &mut Vec<u8>, insert: &mut Option<(usize, usize)>| {
        if let Some((from, to)) = insert.take() {
            raw.push(OP_INSERT);
            raw.extend_from_slice(&((to - from) as u64).to_le_bytes());
            raw.extend_from_slice(&target[from..to]);
        }
    };
    for op in ops {
        let (tag, old_range, new_range) = op.as_tag_tuple();
        if tag == similar::DiffTag::Equal {
            let from = start_of(&base_ends, old_range.start);
            let to = start_of(&base_ends, old_range.end);
            flush_insert(&mut raw, &mut insert);
            copy = match copy {
                Some((f, t)) if t == from => Some((f, to)),
                _ => {
                    flush_copy(&mut raw, &mut copy, &mut cursor);
                    Some((from, to))
                }
            };
        } else if !new_range.is_empty() {
            let from = start_of(&target_ends, new_range.start);
            let to = start_of(&target_ends, new_range.end);
            flush_copy(&mut raw, &mut copy, &mut cursor);
            insert = match insert {
                Some((f, t)) if t == from => Some((f, to)),
                _ => {
                    flush_insert(&mut raw, &mut insert);
                    Some((from, to))
                }
            };
        }
    }
    flush_copy(&mut raw, &mut copy, &mut cursor);
    flush_insert(&mut raw, &mut insert);
    raw.push(OP_END);
    compress_delta(&raw)
}

/// A delta's operations, compressed behind its magic.
fn compress_delta(raw: &[u8]) -> io::Result<Vec<u8>> {
    let level = if raw.len() <= 1 << 20 {
        PUBLISH_LEVEL
    } else {
        NODE_LEVEL
    };
    let mut out = DELTA_MAGIC.to_vec();
    let mut encoder = zstd::stream::write::Encoder::new(&mut out, level)?;
    encoder.window_log(WINDOW_LOG)?;
    encoder.write_all(raw)?;
    encoder.finish()?;
    Ok(out)
}

/// Where each line of `text` ends (past its newline; the last may have
/// none).
fn line_ends(text: &[u8]) -> Vec<usize> {
    let mut ends: Vec<usize> = newlines(text).map(|i| i + 1).collect();
    if ends.last().is_none_or(|&e| e < text.len()) {
        ends.push(text.len());
    }
    ends
}

fn line_slices<'a>(text: &'a [u8], ends: &[usize]) -> Vec<&'a [u8]> {
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let line = &text[start..end];
            start = end;
            line
        })
        .collect()
}

fn newlines(text: &[u8]) -> impl Iterator<Item = usize> + '_ {
    text.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
}

impl ManifestText {
    /// The manifest `delta` ([`make_delta`]) makes of this one, rebuilt
    /// streaming and bounded: the delta must name this manifest as its
    /// base and end in exactly the text it names as its target.
    pub fn apply_delta(&self, delta: &[u8]) -> Result<ManifestText, TextError> {
        let bad = |why: &str| TextError::Delta(why.to_owned());
        let body = delta
            .strip_prefix(DELTA_MAGIC)
            .ok_or_else(|| bad("not a lanup manifest delta"))?;
        let mut decoder = zstd::stream::read::Decoder::with_buffer(body)?;
        decoder.window_log_max(WINDOW_LOG)?;
        let mut ops = BufReader::new(decoder);
        let corrupt = |e: io::Error| TextError::Delta(format!("does not decode: {e}"));
        let u64_at = |ops: &mut BufReader<_>| -> Result<u64, TextError> {
            let mut b = [0u8; 8];
            ops.read_exact(&mut b).map_err(corrupt)?;
            Ok(u64::from_le_bytes(b))
        };
        let hash_at = |ops: &mut BufReader<_>| -> Result<Hash, TextError> {
            let mut b = [0u8; 32];
            ops.read_exact(&mut b).map_err(corrupt)?;
            Ok(Hash(b))
        };
        let (base_len, base_hash) = (u64_at(&mut ops)?, hash_at(&mut ops)?);
        let (target_len, target_hash) = (u64_at(&mut ops)?, hash_at(&mut ops)?);
        if (base_len, base_hash) != (self.len, self.hash) {
            return Err(bad("made against another manifest than the one held"));
        }
        if target_len > MAX_MANIFEST_BYTES {
            return Err(TextError::TooLarge);
        }
        let mut base = self.reader()?;
        let mut out = PlainWriter::new(NODE_LEVEL)?;
        loop {
            let mut op = [0u8; 1];
            ops.read_exact(&mut op).map_err(corrupt)?;
            let (from, len) = match op[0] {
                OP_END => break,
                OP_COPY => (Some(u64_at(&mut ops)?), u64_at(&mut ops)?),
                OP_INSERT => (None, u64_at(&mut ops)?),
                other => return Err(bad(&format!("unknown operation {other}"))),
            };
            if out.len.saturating_add(len) > target_len {
                return Err(bad("writes more than the text it names"));
            }
            let copied = match from {
                Some(skip) => {
                    let skipped = io::copy(&mut (&mut base).take(skip), &mut io::sink())?;
                    if skipped != skip {
                        return Err(bad("reads past the end of the manifest held"));
                    }
                    io::copy(&mut (&mut base).take(len), &mut out)?
                }
                None => io::copy(&mut (&mut ops).take(len), &mut out).map_err(corrupt)?,
            };
            if copied != len {
                return Err(bad("ends inside an operation"));
            }
        }
        let text = out.finish()?;
        if (text.len, text.hash) != (target_len, target_hash) {
            return Err(bad("rebuilds another text than the one it names"));
        }
        Ok(text)
    }
}

/// Takes a manifest's text in pieces (an HTTP body as it arrives) and
/// compresses it as it goes, never holding the text whole.
pub struct PlainWriter {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    hasher: blake3::Hasher,
    len: u64,
}

impl PlainWriter {
    /// A writer that compresses at `level`.
    pub fn new(level: i32) -> io::Result<PlainWriter> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), level)?;
        encoder.window_log(WINDOW_LOG)?;
        Ok(PlainWriter {
            encoder,
            hasher: blake3::Hasher::new(),
            len: 0,
        })
    }

    /// The manifest written so far.
    pub fn finish(self) -> Result<ManifestText, TextError> {
        if self.len > MAX_MANIFEST_BYTES {
            return Err(TextError::TooLarge);
        }
        let packed = self.encoder.finish()?;
        Ok(ManifestText {
            packed: packed.into(),
            len: self.len,
            hash: self.hasher.finalize().into(),
        })
    }
}

impl Write for PlainWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.len += buf.len() as u64;
        if self.len > MAX_MANIFEST_BYTES {
            return Err(io::Error::other(TextError::TooLarge));
        }
        self.hasher.update(buf);
        self.encoder.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanup_protocol::sign::SecretKey;

    fn sample_text(files: usize) -> Vec<u8> {
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<AutoUpdater Format=\"2\">\n  <URLAddres URL=\"http://origin/\"/>\n  <UpdateInfo><Version Num=\"1.0\"/></UpdateInfo>\n  <UpdateFileList>\n",
        );
        for i in 0..files {
            let hash = Hash::of(i.to_string().as_bytes());
            xml.push_str(&format!(
                "    <UpdateFile FileName=\"d{}/f{i}.txt\" Size=\"3\" Mode=\"644\" Hash=\"{hash}\">\n      <Chunk Size=\"3\" Hash=\"{hash}\"/>\n    </UpdateFile>\n",
                i % 100
            ));
        }
        xml.push_str("  </UpdateFileList>\n</AutoUpdater>\n");
        xml.into_bytes()
    }

    #[test]
    fn a_manifest_held_compressed_hashes_verifies_and_parses_as_its_text() {
        let plain = sample_text(5_000);
        let key = SecretKey::generate();
        let signature = key.sign(&plain);
        let text = ManifestText::from_plain(&plain).expect("packs");
        assert_eq!(text.hash(), Hash::of(&plain));
        assert_eq!(text.len(), plain.len() as u64);
        assert!(
            text.packed().len() * 3 < plain.len(),
            "{} of {}",
            text.packed().len(),
            plain.len()
        );
        assert_eq!(text.to_vec().expect("decodes"), plain);
        text.verify(&signature, &[key.public()]).expect("verifies");
        assert_eq!(
            text.parse().expect("parses"),
            Manifest::parse(&plain).expect("parses")
        );

        // Passed on in parts and put back together, it is the same.
        let mut joined = Vec::new();
        while joined.len() < text.packed().len() {
            joined.extend_from_slice(text.part(joined.len() as u64));
        }
        let again = ManifestText::from_packed(joined).expect("decodes");
        assert_eq!(again.hash(), text.hash());

        // Another text under the same signature fails.
        let mut other = plain.clone();
        other[200] ^= 1;
        let other = ManifestText::from_plain(&other).expect("packs");
        assert!(other.verify(&signature, &[key.public()]).is_err());
    }

    #[test]
    fn a_compressed_manifest_that_lies_or_explodes_is_refused() {
        let plain = sample_text(100);
        let text = ManifestText::from_plain(&plain).expect("packs");
        let mut cut = text.packed().to_vec();
        cut.truncate(cut.len() / 2);
        assert!(matches!(
            ManifestText::from_packed(cut),
            Err(TextError::Corrupt(_))
        ));
        assert!(matches!(
            ManifestText::from_packed(b"not zstd at all".to_vec()),
            Err(TextError::Corrupt(_))
        ));
        // A frame of more text than a manifest may hold (zeros compress
        // a thousandfold): refused once the bound is decoded.
        let mut writer = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("encoder");
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..=(MAX_MANIFEST_BYTES >> 20) {
            writer.write_all(&zeros).expect("writes");
        }
        let bomb = writer.finish().expect("finishes");
        assert!(bomb.len() < 1 << 20);
        assert!(matches!(
            ManifestText::from_packed(bomb),
            Err(TextError::TooLarge)
        ));
    }

    /// 5,000 files, of which the next release changes 20, drops 3 and adds
    /// 5, with a new version line.
    fn release_pair() -> (Vec<u8>, Vec<u8>) {
        let old = sample_text(5_000);
        let text = String::from_utf8(old.clone()).expect("utf-8");
        let mut lines: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
        for l in lines.iter_mut() {
            if l.contains("Version Num") {
                *l = l.replace("1.0", "2.0");
            }
        }
        for i in 0..20 {
            let at = 5 + 3 * (i * 240) + 1;
            lines[at] = format!(
                "      <Chunk Size=\"3\" Hash=\"{}\"/>\n",
                Hash::of(&[i as u8; 9])
            );
        }
        lines.drain(50..59);
        let end = lines.len() - 2;
        for i in 0..5 {
            lines.insert(
                end,
                format!(
                    "    <UpdateFile FileName=\"new/{i}\" Size=\"0\" Mode=\"644\" Hash=\"{}\"/>\n",
                    Hash::of(b"")
                ),
            );
        }
        (old, lines.concat().into_bytes())
    }

    #[test]
    fn a_manifest_delta_rebuilds_the_next_manifest_from_the_one_held() {
        let (old, new) = release_pair();
        let held = ManifestText::from_plain(&old).expect("packs");
        let delta = make_delta(&old, &new).expect("delta");
        let whole = ManifestText::from_plain(&new).expect("packs");
        assert!(
            delta.len() * 20 < whole.packed().len(),
            "delta {} B against {} B compressed",
            delta.len(),
            whole.packed().len()
        );
        let rebuilt = held.apply_delta(&delta).expect("applies");
        assert_eq!(rebuilt.hash(), Hash::of(&new));
        assert_eq!(rebuilt.to_vec().expect("decodes"), new);

        // Whole rewrites, empty texts and a text without a final newline
        // come through too.
        for (a, b) in [
            (&b""[..], &b"<x/>"[..]),
            (b"a\nb\nc", b"a\nc\nb"),
            (b"one\n", b""),
        ] {
            let d = make_delta(a, b).expect("delta");
            let got = ManifestText::from_plain(a)
                .expect("packs")
                .apply_delta(&d)
                .expect("applies");
            assert_eq!(got.to_vec().expect("decodes"), b);
        }
    }

    #[test]
    fn a_manifest_delta_for_another_base_or_damaged_is_refused() {
        let (old, new) = release_pair();
        let delta = make_delta(&old, &new).expect("delta");
        // Held: another manifest.
        let other = ManifestText::from_plain(&new).expect("packs");
        let e = other.apply_delta(&delta).expect_err("another base");
        assert!(e.to_string().contains("another manifest"), "{e}");
        let held = ManifestText::from_plain(&old).expect("packs");
        // Cut short, or a byte changed anywhere: refused, never a wrong
        // text.
        assert!(held.apply_delta(&delta[..delta.len() / 2]).is_err());
        assert!(held.apply_delta(b"lanupMD0 something else").is_err());
        for at in (8..delta.len()).step_by(7) {
            let mut bad = delta.clone();
            bad[at] ^= 0x20;
            if let Ok(text) = held.apply_delta(&bad) {
                assert_eq!(text.hash(), Hash::of(&new), "flip at {at}");
            }
        }
        // A delta that writes more than the text it names (or more than a
        // manifest may be) is cut off at that bound.
        let mut raw = Vec::new();
        raw.extend_from_slice(&(old.len() as u64).to_le_bytes());
        raw.extend_from_slice(&Hash::of(&old).0);
        raw.extend_from_slice(&4u64.to_le_bytes());
        raw.extend_from_slice(&Hash::of(b"abcd").0);
        raw.push(OP_INSERT);
        raw.extend_from_slice(&5u64.to_le_bytes());
        raw.extend_from_slice(b"abcde");
        raw.push(OP_END);
        let forge = |raw: &[u8]| {
            let mut forged = DELTA_MAGIC.to_vec();
            let mut encoder = zstd::stream::write::Encoder::new(&mut forged, 3).expect("encoder");
            encoder.window_log(WINDOW_LOG).expect("window");
            encoder.write_all(raw).expect("packs");
            encoder.finish().expect("packs");
            forged
        };
        let e = held.apply_delta(&forge(&raw)).expect_err("over its length");
        assert!(e.to_string().contains("more than"), "{e}");
        raw[40..48].copy_from_slice(&(MAX_MANIFEST_BYTES + 1).to_le_bytes());
        assert!(matches!(
            held.apply_delta(&forge(&raw)),
            Err(TextError::TooLarge)
        ));
    }
}
