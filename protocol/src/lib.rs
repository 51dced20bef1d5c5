//! lanup's pure core: everything that can be decided without sockets, a
//! runtime or a clock.
//!
//! # The release manifest
//!
//! A release is a directory that any static HTTP server can serve: the files
//! of the application at their `FileName` paths, `AutoUpdater.xml` describing
//! them, and `AutoUpdater.xml.sig`, a detached ed25519 signature over the
//! exact bytes of `AutoUpdater.xml`.
//!
//! `AutoUpdater.xml` keeps the shape of the classic single-machine updater's
//! manifest (`URLAddres`, `UpdateInfo`, `UpdateFileList`, `RestartApp`) and
//! adds, in format 2, what a site needs to move a release between peers and
//! trust it: per-file size, mode and BLAKE3 hash, and the file's
//! content-defined chunks with their own sizes and hashes. See
//! [`manifest`] for the model and its validation rules, [`chunk`] for how
//! files are cut, and [`sign`] for keys and signature files.
//!
//! Goals: a manifest any node can check on its own before it writes a byte;
//! chunks that stay the same across versions where the content does, so a
//! new version moves only what changed; a format a person can still read.
//!
//! Non-goals: canonical XML (signatures cover the exact bytes, so a manifest
//! is never re-serialised after signing), encryption of release contents,
//! and key distribution (operators configure which publisher keys to trust).

pub mod approval;
pub mod cadence;
pub mod chunk;
pub mod delta;
pub mod election;
pub mod fetcher;
pub mod fleet;
pub mod group;
pub mod hash;
pub mod journal;
pub mod manifest;
pub mod membership;
pub mod plan;
pub mod report;
pub mod rollout;
pub mod sign;
pub mod transfer;
pub mod units;
pub mod version;
pub mod window;
pub mod wire;

pub use hash::Hash;
pub use manifest::{Manifest, ManifestError, UpdateFile};
pub use version::Version;

/// A PeerId as status and records show it: its last 8 characters, enough
/// to tell a site's nodes apart.
pub fn short_peer(id: &str) -> String {
    let start = id.char_indices().rev().nth(7).map_or(0, |(i, _)| i);
    format!("…{}", &id[start..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_short_peer_is_its_last_eight_characters() {
        assert_eq!(
            super::short_peer("12D3KooWKAvnm3k8K8nbBtnsud8FAbdpVpdcPRXa9jUfr7YtYdQE"),
            "…r7YtYdQE"
        );
        assert_eq!(super::short_peer("abc"), "…abc");
    }
}
