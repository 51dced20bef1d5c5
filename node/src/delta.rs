//! The codec behind patches, packed chunks and runs: zstd. A packed chunk
//! is one zstd frame of the chunk, a run one frame of its chunks (decoded
//! a chunk at a time, [`Pieces`]); a patch segment is one zstd frame compressed
//! with a part of the base file as its reference prefix and long-distance
//! matching, as `zstd --long --patch-from` does.
//!
//! Decoding is bounded by the signed manifest: the output may be exactly
//! the size it names and no more (a frame that would grow past it is an
//! error, not an allocation), and the decoder refuses a window larger than
//! the reference and the output together. A segment decodes in one call
//! into a buffer of its size, so a node holds at most the reference, the
//! patch and the output of one segment
//! ([`lanup_protocol::delta::MAX_PATCH_REFERENCE`] +
//! 2 × [`lanup_protocol::delta::MAX_PATCH_OUTPUT`]).

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter};

/// The zstd level `lanup publish` compresses with unless told otherwise.
pub const DEFAULT_LEVEL: i32 = 19;
/// The level of bundles when a publish makes many at once (see
/// [`crate::release_store::FAST_BUNDLES_ABOVE`]): the level of `zstd -1`: hundreds of MB/s a core,
/// within a tenth of level 19's size on source trees.
pub const FAST_LEVEL: i32 = 1;

/// Why a patch or packed chunk did not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error("decoded to {got} bytes where the manifest names {expected}")]
    Size { got: u64, expected: u64 },
    #[error("zstd: {0}")]
    Stream(String),
}

/// Encoding failed (zstd's reason).
#[derive(Debug, thiserror::Error)]
#[error("zstd: {0}")]
pub struct EncodeError(&'static str);

fn zstd_error(code: usize) -> &'static str {
    zstd_safe::get_error_name(code)
}

/// The window a frame over `bytes` of reference and output needs:
/// log2, rounded up, within what zstd allows.
fn window_log(bytes: u64) -> u32 {
    let log = 64 - bytes.saturating_sub(1).leading_zeros();
    log.clamp(10, 30)
}

/// One zstd frame of `data` at `level`.
pub fn pack(data: &[u8], level: i32) -> Result<Vec<u8>, EncodeError> {
    encode(&[], data, level)
}

/// The chunk in `blob`, which must decode to exactly `size` bytes.
pub fn unpack(blob: &[u8], size: u64) -> Result<Vec<u8>, DecodeError> {
    decode(&[], blob, size)
}

/// A patch: `target` compressed with `reference` as its prefix.
pub fn make_patch(reference: &[u8], target: &[u8], level: i32) -> Result<Vec<u8>, EncodeError> {
    encode(reference, target, level)
}

/// Rebuilds `size` bytes from `patch` and the `reference` it was made
/// against.
pub fn apply_patch(reference: &[u8], patch: &[u8], size: u64) -> Result<Vec<u8>, DecodeError> {
    decode(reference, patch, size)
}

fn encode(reference: &[u8], data: &[u8], level: i32) -> Result<Vec<u8>, EncodeError> {
    let mut cctx = CCtx::create();
    let set = |cctx: &mut CCtx, p| cctx.set_parameter(p).map(drop).map_err(zstd_error);
    set(&mut cctx, CParameter::CompressionLevel(level)).map_err(EncodeError)?;
    if !reference.is_empty() {
        let log = window_log(reference.len() as u64 + data.len() as u64);
        set(&mut cctx, CParameter::WindowLog(log)).map_err(EncodeError)?;
        set(&mut cctx, CParameter::EnableLongDistanceMatching(true)).map_err(EncodeError)?;
        cctx.ref_prefix(reference)
            .map(drop)
            .map_err(|c| EncodeError(zstd_error(c)))?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data)
        .map_err(|c| EncodeError(zstd_error(c)))?;
    Ok(out)
}

fn decode(reference: &[u8], frame: &[u8], size: u64) -> Result<Vec<u8>, DecodeError> {
    let zstd = |c| DecodeError::Zstd(zstd_error(c));
    let mut dctx = DCtx::create();
    let log = window_log(reference.len() as u64 + size);
    dctx.set_parameter(DParameter::WindowLogMax(log))
        .map_err(zstd)?;
    if !reference.is_empty() {
        dctx.ref_prefix(reference).map_err(zstd)?;
    }
    let size_usize = usize::try_from(size).map_err(|_| DecodeError::Size {
        got: u64::MAX,
        expected: size,
    })?;
    // Exactly the signed size: zstd stops with an error rather than write
    // past the buffer, so a frame that claims more cannot grow it.
    let mut out = Vec::with_capacity(size_usize);
    let got = dctx.decompress(&mut out, frame).map_err(zstd)?;
    if got as u64 != size {
        return Err(DecodeError::Size {
            got: got as u64,
            expected: size,
        });
    }
    Ok(out)
}

/// A run's frame decoded piece by piece (its chunks, in order): a node
/// holds the frame, the decoder's window and one piece, however long the
/// run.
pub struct Pieces<'a> {
    decoder: zstd::stream::read::Decoder<'a, &'a [u8]>,
    total: u64,
    read: u64,
    piece: Vec<u8>,
}

impl<'a> Pieces<'a> {
    /// The frame in `blob`, which must decode to exactly `total` bytes.
    pub fn new(blob: &'a [u8], total: u64) -> Result<Pieces<'a>, DecodeError> {
        let io = |e: std::io::Error| DecodeError::Stream(e.to_string());
        let mut decoder = zstd::stream::read::Decoder::with_buffer(blob)
            .map_err(io)?
            .single_frame();
        decoder.window_log_max(window_log(total)).map_err(io)?;
        Ok(Pieces {
            decoder,
            total,
            read: 0,
            piece: Vec::new(),
        })
    }

    /// The next `size` bytes of the output: an error if the frame ends
    /// sooner or if they would pass the total.
    pub fn next(&mut self, size: u64) -> Result<&[u8], DecodeError> {
        use std::io::Read;
        if self.read + size > self.total {
            return Err(DecodeError::Size {
                got: self.read + size,
                expected: self.total,
            });
        }
        self.piece.resize(size as usize, 0);
        let mut at = 0;
        while at < self.piece.len() {
            match self.decoder.read(&mut self.piece[at..]) {
                Ok(0) => {
                    return Err(DecodeError::Size {
                        got: self.read + at as u64,
                        expected: self.total,
                    })
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DecodeError::Stream(e.to_string())),
            }
        }
        self.read += size;
        Ok(&self.piece)
    }

    /// Checks that the frame ends where the total says.
    pub fn finish(mut self) -> Result<(), DecodeError> {
        use std::io::Read;
        let mut one = [0u8; 1];
        match self.decoder.read(&mut one) {
            Ok(0) if self.read == self.total => Ok(()),
            Ok(0) => Err(DecodeError::Size {
                got: self.read,
                expected: self.total,
            }),
            Ok(_) => Err(DecodeError::Size {
                got: self.read + 1,
                expected: self.total,
            }),
            Err(e) => Err(DecodeError::Stream(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that look like a program: repeated records with counters.
    fn program(seed: u32, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut i = 0u32;
        while out.len() < len {
            out.extend_from_slice(
                format!("fn_{i:06}: call {:08x}; ", i.wrapping_mul(seed)).as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_patch_rebuilds_the_new_bytes_and_is_small() {
        let old = program(7, 300_000);
        let mut new = old.clone();
        new.splice(1000..1000, b"a new function inserted".iter().copied());
        new[200_000] ^= 0xff;
        let patch = make_patch(&old, &new, 19).expect("patch");
        assert!(patch.len() < 200, "{} bytes", patch.len());
        let rebuilt = apply_patch(&old, &patch, new.len() as u64).expect("apply");
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn decoding_is_bounded_by_the_signed_size() {
        let data = vec![0u8; 1 << 20];
        let packed = pack(&data, 3).expect("pack");
        assert!(packed.len() < 1000);
        assert_eq!(unpack(&packed, 1 << 20).expect("unpack"), data);
        // A bomb: the frame holds more than the manifest names.
        assert!(unpack(&packed, 1000).is_err());
        // Less than named is an error too.
        assert!(matches!(
            unpack(&packed, 2 << 20),
            Err(DecodeError::Size { .. })
        ));
        // Truncated and foreign bytes are decoder errors.
        assert!(unpack(&packed[..packed.len() / 2], 1 << 20).is_err());
        assert!(unpack(b"not zstd at all", 15).is_err());
    }

    #[test]
    fn a_run_decodes_piece_by_piece_within_its_signed_size() {
        let data = program(5, 3 << 20);
        let frame = pack(&data, 3).expect("pack");
        let sizes = [1 << 20, 1 << 19, (3 << 20) - (1 << 20) - (1 << 19)];
        let mut pieces = Pieces::new(&frame, 3 << 20).expect("frame");
        let mut at = 0;
        for size in sizes {
            let piece = pieces.next(size).expect("piece");
            assert_eq!(piece, &data[at..at + size as usize]);
            at += size as usize;
        }
        pieces.finish().expect("ends where it should");
        // The frame holds more than the manifest names.
        let mut short = Pieces::new(&frame, 2 << 20).expect("frame");
        short.next(2 << 20).expect("the named part");
        assert!(short.finish().is_err());
        assert!(Pieces::new(&frame, 2 << 20)
            .expect("frame")
            .next(3 << 20)
            .is_err());
        // Less than named, cut short, foreign bytes.
        assert!(Pieces::new(&frame, 4 << 20)
            .expect("frame")
            .next(4 << 20)
            .is_err());
        let cut = &frame[..frame.len() / 2];
        assert!(Pieces::new(cut, 3 << 20)
            .and_then(|mut p| p.next(3 << 20).map(drop))
            .is_err());
        assert!(Pieces::new(b"not zstd at all", 15)
            .and_then(|mut p| p.next(15).map(drop))
            .is_err());
    }

    #[test]
    fn a_patch_against_the_wrong_base_does_not_rebuild_the_file() {
        let old = program(7, 100_000);
        let new = program(9, 100_000);
        let patch = make_patch(&old, &new, 19).expect("patch");
        let other = program(11, 100_000);
        if let Ok(bytes) = apply_patch(&other, &patch, new.len() as u64) {
            assert_ne!(bytes, new);
        }
    }
}
