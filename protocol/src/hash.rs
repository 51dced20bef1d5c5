//! BLAKE3 digests as they appear in manifests: 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

/// A BLAKE3-256 digest of a chunk or a whole file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Hashes `data` in one go.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }
}

/// Hashes a [`Hash`] for a hash map by its first eight bytes: a BLAKE3
/// digest is already uniform, so hashing it again (SipHash over 32 bytes)
/// only costs time. For maps whose keys come from a checked manifest, not
/// from peers (a peer could choose keys that collide).
#[derive(Debug, Clone, Copy, Default)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut head = [0u8; 8];
        let n = bytes.len().min(8);
        head[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(head);
    }

    // The array's length, written before its bytes: the same for all.
    fn write_usize(&mut self, _: usize) {}
}

/// A map keyed by digests, hashed with [`DigestHasher`].
pub type DigestMap<V> =
    std::collections::HashMap<Hash, V, std::hash::BuildHasherDefault<DigestHasher>>;
/// A set of digests, hashed with [`DigestHasher`].
pub type DigestSet = std::collections::HashSet<Hash, std::hash::BuildHasherDefault<DigestHasher>>;

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// Why a string is not a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HashParseError {
    #[error("expected 64 hex digits, found {0} characters")]
    Length(usize),
    #[error("not hexadecimal")]
    NotHex,
}

impl FromStr for Hash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(HashParseError::Length(s.chars().count()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| HashParseError::NotHex)?;
        Ok(Hash(out))
    }
}

/// On the wire a hash is 32 raw bytes.
impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&self.0).serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_bytes::ByteArray::<32>::deserialize(deserializer).map(|b| Hash(b.into_array()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_hex() {
        let h = Hash::of(b"lanup");
        assert_eq!(h.to_string().parse::<Hash>(), Ok(h));
        assert_eq!(h.to_string(), blake3::hash(b"lanup").to_hex().as_str());
    }

    #[test]
    fn rejects_malformed_hex() {
        assert_eq!("abc".parse::<Hash>(), Err(HashParseError::Length(3)));
        let bad = "g".repeat(64);
        assert_eq!(bad.parse::<Hash>(), Err(HashParseError::NotHex));
    }
}
