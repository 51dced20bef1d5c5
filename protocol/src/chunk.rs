//! Content-defined chunking and BLAKE3 hashing of release files.
//!
//! Files are cut with FastCDC (the 2020 variant, normalisation level 1) into
//! chunks of [`MIN_CHUNK`] to [`MAX_CHUNK`] bytes, [`AVG_CHUNK`] on average.
//! Because cut points depend on content, not offsets, an edit moves only the
//! boundaries near it: the next version of a file shares every chunk that the
//! edit did not touch, and only changed chunks cross a site's uplink.
//!
//! The sizes are a trade. About 1 MiB on average keeps a 1 GiB release near
//! a thousand chunks, so manifests stay around a hundred kilobytes and the
//! per-chunk cost of a request is small next to the chunk, while a small edit
//! still costs only a megabyte or two over the uplink. The minimum, half the
//! average (as restic uses), stops content with many cut candidates from
//! producing floods of small chunks, and FastCDC skips the first `MIN_CHUNK`
//! bytes of every chunk when it looks for a cut, which saves about a fifth of
//! the chunking time against a quarter-average minimum; in exchange chunks
//! average about 1.4 MiB on incompressible data. The maximum (four times the
//! average) bounds what a node holds in memory for one chunk and what a
//! lying peer can make it download before the hash check catches it. A
//! file's last chunk may be smaller than the minimum; an empty file has no
//! chunks.
//!
//! Everything here streams: a file passes through at most three buffers of
//! twice the maximum chunk size (one being cut, one being hashed, one
//! changing hands) and is never held in memory whole.

use std::io::{self, Read};
use std::sync::mpsc;

use crate::Hash;

/// Smallest chunk FastCDC cuts (except a file's last chunk).
pub const MIN_CHUNK: usize = 512 * 1024;
/// Average chunk size FastCDC aims for.
pub const AVG_CHUNK: usize = 1024 * 1024;
/// Largest chunk FastCDC cuts, and the largest a manifest may list.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

/// One chunk of a file: its length and the BLAKE3 hash of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub size: u64,
    pub hash: Hash,
}

impl Chunk {
    /// Whether `data` is exactly this chunk.
    pub fn matches(&self, data: &[u8]) -> bool {
        data.len() as u64 == self.size && Hash::of(data) == self.hash
    }
}

/// What chunking a file yields: its size, whole-file hash and chunks in
/// order. The chunks concatenated are the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    /// BLAKE3 of the whole file, as `b3sum` prints it.
    pub hash: Hash,
    pub chunks: Vec<Chunk>,
}

/// Bytes asked for per `read` call.
const READ_BLOCK: usize = 1024 * 1024;

/// Size of each read buffer: room for the look-ahead FastCDC needs plus
/// enough more that buffers are handed over (and their tails copied) rarely.
const BUFFER: usize = 2 * MAX_CHUNK;

/// A filled buffer and the chunks cut from it, on their way to hashing.
struct Batch {
    buf: Vec<u8>,
    cuts: Vec<(usize, usize)>,
}

/// Chunks and hashes everything `reader` yields. `on_chunk` sees each
/// chunk's bytes, in order, so a caller can copy or store the file in the
/// same pass.
///
/// Hashing runs on a second thread: this thread reads and finds cut points;
/// when a buffer is used up it hands the whole buffer over, with the cuts
/// made in it, and carries on in a recycled one. The other thread hashes
/// each chunk and the whole file. On two cores the three passes over the
/// data (cut points, chunk hash, file hash) cost about two in wall time,
/// and no chunk is copied.
pub fn digest_reader<R: Read>(
    mut reader: R,
    mut on_chunk: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<FileDigest> {
    let (mask_s, mask_l) =
        fastcdc::v2020::select_masks(AVG_CHUNK, fastcdc::v2020::Normalization::Level1);
    std::thread::scope(|scope| {
        // A rendezvous channel: at most one buffer being cut, one being
        // hashed and one changing hands, so memory stays bounded.
        let (to_hasher, batches) = mpsc::sync_channel::<Batch>(0);
        let (recycle, spare) = mpsc::channel::<Vec<u8>>();
        let hasher = scope.spawn(move || {
            let mut file = blake3::Hasher::new();
            let mut chunks = Vec::new();
            for batch in batches {
                for &(at, len) in &batch.cuts {
                    let data = &batch.buf[at..at + len];
                    file.update(data);
                    chunks.push(Chunk {
                        size: len as u64,
                        hash: Hash::of(data),
                    });
                }
                // The reader may be gone already; then the buffer is dropped.
                let _ = recycle.send(batch.buf);
            }
            (Hash::from(file.finalize()), chunks)
        });
        let hand_over = |batch: Batch| {
            to_hasher
                .send(batch)
                .map_err(|_| io::Error::other("chunk hashing thread stopped"))
        };

        let mut buf = vec![0u8; BUFFER];
        let mut cuts = Vec::new();
        let (mut start, mut end, mut eof) = (0usize, 0usize, false);
        let mut size = 0u64;
        loop {
            // FastCDC needs MAX_CHUNK bytes ahead (or the end of the file)
            // to place a cut where a whole-file pass would.
            while !eof && end - start < MAX_CHUNK {
                if end == buf.len() {
                    let mut next = spare.try_recv().unwrap_or_else(|_| vec![0u8; BUFFER]);
                    next[..end - start].copy_from_slice(&buf[start..end]);
                    let full = std::mem::replace(&mut buf, next);
                    hand_over(Batch {
                        buf: full,
                        cuts: std::mem::take(&mut cuts),
                    })?;
                    end -= start;
                    start = 0;
                }
                let limit = buf.len().min(end + READ_BLOCK);
                match reader.read(&mut buf[end..limit]) {
                    Ok(0) => eof = true,
                    Ok(n) => end += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if start == end {
                break;
            }
            let (_, len) = fastcdc::v2020::cut(
                &buf[start..end],
                MIN_CHUNK,
                AVG_CHUNK,
                MAX_CHUNK,
                mask_s,
                mask_l,
                mask_s << 1,
                mask_l << 1,
            );
            on_chunk(&buf[start..start + len])?;
            cuts.push((start, len));
            size += len as u64;
            start += len;
        }
        hand_over(Batch { buf, cuts })?;
        drop(to_hasher);
        let (hash, chunks) = hasher
            .join()
            .map_err(|_| io::Error::other("chunk hashing thread panicked"))?;
        Ok(FileDigest { size, hash, chunks })
    })
}

/// Files up to this size are best read whole and digested with
/// [`digest_bytes`]: no hashing thread, no read buffers.
pub const SMALL_FILE: u64 = BUFFER as u64;

/// Chunks and hashes a file held in memory, as [`digest_reader`] does (the
/// same cuts, hashes and order), on this thread: for the many small files
/// of an application tree, where a thread and two buffers per file would
/// cost more than the file.
pub fn digest_bytes(data: &[u8]) -> FileDigest {
    let chunks = fastcdc::v2020::FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| Chunk {
            size: c.length as u64,
            hash: Hash::of(&data[c.offset..c.offset + c.length]),
        })
        .collect::<Vec<_>>();
    let hash = match chunks.as_slice() {
        [one] => one.hash,
        _ => Hash::of(data),
    };
    FileDigest {
        size: data.len() as u64,
        hash,
        chunks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic incompressible bytes (xorshift), so cut points are
    /// spread as they are for real binaries.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn chunks_concatenate_to_the_file_and_match_one_pass_fastcdc() {
        let data = pseudo_random(9 * 1024 * 1024 + 12345, 7);
        let mut joined = Vec::new();
        let digest = digest_reader(&data[..], |bytes| {
            joined.extend_from_slice(bytes);
            Ok(())
        })
        .expect("in-memory read");
        let mut offset = 0;
        for chunk in &digest.chunks {
            assert!(chunk.matches(&data[offset..offset + chunk.size as usize]));
            offset += chunk.size as usize;
        }
        assert_eq!(joined, data);
        assert_eq!(digest.size, data.len() as u64);
        assert_eq!(digest.hash, Hash::of(&data));
        let whole: Vec<u64> = fastcdc::v2020::FastCDC::new(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| c.length as u64)
            .collect();
        let streamed: Vec<u64> = digest.chunks.iter().map(|c| c.size).collect();
        assert_eq!(streamed, whole);
        for c in &digest.chunks[..digest.chunks.len() - 1] {
            assert!((MIN_CHUNK as u64..=MAX_CHUNK as u64).contains(&c.size));
        }
    }

    /// Files whose ends fall on, just before and just after the reader's
    /// buffer boundaries chunk as one FastCDC pass does and hash as BLAKE3
    /// does.
    #[test]
    fn files_ending_at_any_buffer_boundary_digest_right() {
        let data = pseudo_random(3 * BUFFER + 3000, 9);
        for size in [
            1,
            MIN_CHUNK,
            BUFFER - 1,
            BUFFER,
            BUFFER + 1,
            2 * BUFFER,
            2 * BUFFER + MIN_CHUNK + 7,
            3 * BUFFER + 3000,
        ] {
            let file = &data[..size];
            let digest = digest_reader(file, |_| Ok(())).expect("read");
            assert_eq!(digest.hash, Hash::of(file), "{size} bytes");
            let whole: Vec<u64> =
                fastcdc::v2020::FastCDC::new(file, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    .map(|c| c.length as u64)
                    .collect();
            let streamed: Vec<u64> = digest.chunks.iter().map(|c| c.size).collect();
            assert_eq!(streamed, whole, "{size} bytes");
            let mut at = 0;
            for c in &digest.chunks {
                assert!(c.matches(&file[at..at + c.size as usize]), "{size} bytes");
                at += c.size as usize;
            }
        }
    }

    /// A read that fails midway is the caller's error, and no thread is
    /// left waiting.
    #[test]
    fn a_read_error_is_returned() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk says no"));
                }
                let n = out.len().min(self.0);
                out[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let e = digest_reader(Failing(10 * BUFFER + 5), |_| Ok(())).expect_err("fails");
        assert_eq!(e.to_string(), "disk says no");
        let e = digest_reader(&pseudo_random(3 * BUFFER, 4)[..], |_| {
            Err(io::Error::other("disk full"))
        })
        .expect_err("fails");
        assert_eq!(e.to_string(), "disk full");
    }

    #[test]
    fn small_reads_cut_in_the_same_places() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(self.0.len()).min(4099);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = pseudo_random(6 * 1024 * 1024, 3);
        let a = digest_reader(&data[..], |_| Ok(())).expect("read");
        let b = digest_reader(Trickle(&data), |_| Ok(())).expect("read");
        assert_eq!(a, b);
    }

    #[test]
    fn a_file_digested_in_memory_is_digested_as_when_streamed() {
        let data = pseudo_random(BUFFER + 4321, 5);
        for size in [0, 1, 4096, MIN_CHUNK - 1, MAX_CHUNK + 1, BUFFER + 4321] {
            let file = &data[..size];
            assert_eq!(
                digest_bytes(file),
                digest_reader(file, |_| Ok(())).expect("read"),
                "{size} bytes"
            );
        }
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let d = digest_reader(&b""[..], |_| Ok(())).expect("read");
        assert_eq!(d.size, 0);
        assert!(d.chunks.is_empty());
        assert_eq!(d.hash, Hash::of(b""));
    }

    #[test]
    fn an_edit_changes_only_nearby_chunks() {
        let mut data = pseudo_random(16 * 1024 * 1024, 11);
        let before = digest_reader(&data[..], |_| Ok(())).expect("read");
        for b in &mut data[8_000_000..8_000_100] {
            *b ^= 0xff;
        }
        let after = digest_reader(&data[..], |_| Ok(())).expect("read");
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let new_bytes: u64 = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .map(|c| c.size)
            .sum();
        assert!(new_bytes <= 2 * MAX_CHUNK as u64, "{new_bytes} new bytes");
    }
}
