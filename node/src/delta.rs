//! The codec behind patches and packed chunks: zstd. A packed chunk is one
//! zstd frame of the chunk; a patch segment is one zstd frame compressed
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
