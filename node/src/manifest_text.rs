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
}
