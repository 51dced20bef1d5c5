//! The node's content-addressed chunk store: every chunk it holds, of every
//! release, once, named by its BLAKE3 hash. A chunk is checked against its
//! hash before it is stored, so the store only ever holds good bytes.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use lanup_protocol::chunk::Chunk;
use lanup_protocol::Hash;

/// Chunks on disk under one folder: `<root>/<first two hex digits>/<hash>`.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
}

/// Why a chunk was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("chunk {expected}: received {len} bytes that do not hash to it")]
    Corrupt { expected: Hash, len: usize },
    #[error("chunk store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ChunkStore {
    /// Opens (creating) a store at `root`.
    pub fn open(root: &Path) -> Result<ChunkStore, StoreError> {
        fs::create_dir_all(root).map_err(|source| StoreError::Io {
            path: root.to_owned(),
            source,
        })?;
        Ok(ChunkStore {
            root: root.to_owned(),
        })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_string();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Whether the store holds `hash`.
    pub fn has(&self, hash: &Hash) -> bool {
        self.path(hash).is_file()
    }

    /// Stores `data` as `chunk` after checking it hashes to it. Written
    /// under a temporary name and renamed, so a crash never leaves a partial
    /// chunk under a real name.
    pub fn put(&self, chunk: &Chunk, data: &[u8]) -> Result<(), StoreError> {
        if !chunk.matches(data) {
            return Err(StoreError::Corrupt {
                expected: chunk.hash,
                len: data.len(),
            });
        }
        let path = self.path(&chunk.hash);
        if path.is_file() {
            return Ok(());
        }
        let io_err = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io_err)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err)?;
        tmp.write_all(data).map_err(io_err)?;
        tmp.persist(&path).map(drop).map_err(|e| io_err(e.error))
    }

    /// Reads a stored chunk whole (chunks are at most 4 MiB).
    pub fn get(&self, hash: &Hash) -> io::Result<Vec<u8>> {
        fs::read(self.path(hash))
    }

    /// Reads a stored chunk and checks it still hashes to its name; a chunk
    /// damaged on disk is removed (it is fetched again when needed) rather
    /// than handed on.
    pub fn get_verified(&self, hash: &Hash) -> io::Result<Vec<u8>> {
        let data = self.get(hash)?;
        if Hash::of(&data) == *hash {
            return Ok(data);
        }
        let path = self.path(hash);
        tracing::warn!(path = %path.display(), "chunk damaged on disk; removed");
        let _ = fs::remove_file(&path);
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} does not hash to its name", path.display()),
        ))
    }

    /// Every stored chunk's file, with the hash it is named by (temporary
    /// files of a `put` under way are not chunks and are left out).
    fn chunk_files(&self) -> io::Result<Vec<(Hash, PathBuf)>> {
        let mut files = Vec::new();
        for dir in fs::read_dir(&self.root)? {
            let dir = dir?;
            if !dir.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(dir.path())? {
                let entry = entry?;
                let name = entry.file_name();
                if let Some(hash) = name.to_str().and_then(|n| n.parse::<Hash>().ok()) {
                    files.push((hash, entry.path()));
                }
            }
        }
        Ok(files)
    }

    /// Reads every stored chunk and checks it against its name, changing
    /// nothing (a node may be running on the store). Returns the chunks
    /// and bytes checked and the files that do not hash to their names.
    pub fn scan(&self) -> io::Result<(usize, u64, Vec<PathBuf>)> {
        let (mut count, mut bytes, mut damaged) = (0, 0, Vec::new());
        for (hash, path) in self.chunk_files()? {
            let data = match fs::read(&path) {
                Ok(d) => d,
                // Removed by the node meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            count += 1;
            bytes += data.len() as u64;
            if Hash::of(&data) != hash {
                damaged.push(path);
            }
        }
        Ok((count, bytes, damaged))
    }

    /// Removes every chunk not in `keep`; returns how many chunks and bytes
    /// were freed.
    pub fn retain(&self, keep: &std::collections::HashSet<Hash>) -> io::Result<(usize, u64)> {
        let mut freed = (0, 0);
        for (hash, path) in self.chunk_files()? {
            if keep.contains(&hash) {
                continue;
            }
            let len = fs::metadata(&path)?.len();
            fs::remove_file(&path)?;
            freed.0 += 1;
            freed.1 += len;
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_only_bytes_that_match_their_hash() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|source| StoreError::Io {
            path: PathBuf::new(),
            source,
        })?;
        let store = ChunkStore::open(dir.path())?;
        let data = b"chunk bytes";
        let chunk = Chunk {
            size: data.len() as u64,
            hash: Hash::of(data),
        };
        assert!(!store.has(&chunk.hash));
        assert!(matches!(
            store.put(&chunk, b"chunk bytez"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(!store.has(&chunk.hash));
        store.put(&chunk, data)?;
        assert!(store.has(&chunk.hash));
        assert_eq!(store.get(&chunk.hash).ok().as_deref(), Some(&data[..]));
        Ok(())
    }

    #[test]
    fn damaged_chunks_are_not_served_and_collection_keeps_what_is_asked() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = ChunkStore::open(dir.path())?;
        let chunk = |data: &[u8]| Chunk {
            size: data.len() as u64,
            hash: Hash::of(data),
        };
        let (a, b, c) = (chunk(b"aaaa"), chunk(b"bbbbbb"), chunk(b"cc"));
        store.put(&a, b"aaaa")?;
        store.put(&b, b"bbbbbb")?;
        store.put(&c, b"cc")?;

        fs::write(store.path(&c.hash), b"cd")?;
        assert!(store.get_verified(&c.hash).is_err());
        assert!(!store.has(&c.hash), "a damaged chunk is removed");
        assert_eq!(store.get_verified(&a.hash)?, b"aaaa");

        let keep = std::collections::HashSet::from([a.hash]);
        assert_eq!(store.retain(&keep)?, (1, 6));
        assert!(store.has(&a.hash));
        assert!(!store.has(&b.hash));
        Ok(())
    }
}
