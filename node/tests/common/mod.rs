//! Helpers shared by the node crate's integration tests.

/// `len` bytes that do not compress and differ per `seed` (xorshift), so
/// releases made of them chunk like real binaries.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len.div_ceil(8))
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .take(len)
        .collect()
}
