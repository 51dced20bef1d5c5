//! Messages nodes exchange. Small ones go over gossipsub (announcements,
//! heartbeats) or request/response (manifests, chunk lists); chunk bodies go
//! over raw streams (see `lanup-node`'s transfer), never through these types.

use serde::{Deserialize, Serialize};

use crate::rollout::SignedCommand;
use crate::Hash;

/// Gossiped by a node that holds a verified release: small enough for
/// gossipsub, the manifest itself is fetched from the announcer by RPC and
/// checked against `manifest_hash` and `signature`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The release's name (version, or date).
    pub release: String,
    /// BLAKE3 of the exact manifest bytes.
    pub manifest_hash: Hash,
    /// The `.sig` file's text.
    pub signature: String,
    /// The release's application (AppName): releases are compared only
    /// with releases of the same application (an application's and lanup's
    /// own move through a site side by side in time). Absent from older
    /// nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// Requests a node answers for its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The manifest with this hash and its signature, as text. Answered
    /// only for manifests of up to [`MAX_PLAIN_MANIFEST_ANSWER`] bytes;
    /// nodes ask for [`Request::ManifestPart`]s first and this of peers
    /// that do not know those.
    Manifest { manifest_hash: Hash },
    /// Part of the compressed copy of the manifest with this hash (its
    /// hash is the text's), from byte `offset` on, and its signature.
    ManifestPart { manifest_hash: Hash, offset: u64 },
    /// Which chunks of this release the peer holds, from the `since`-th it
    /// gained on (0 for all): asked often, answered with what is new.
    Have { manifest_hash: Hash, since: u32 },
    /// The signed rollout commands the peer follows, when its heartbeat
    /// names command `id` (a node that was away catches up).
    Commands { id: String },
    /// An administrator on another node asks the site's fetcher to poll
    /// the origin now (`lanup check`).
    Check,
    /// What the peer's audit log records about change `id`
    /// (`lanup history --change`).
    Audit { id: String },
}

/// The largest manifest text a node sends whole ([`Request::Manifest`]):
/// an answer must stay under the request-response cap of 10 MiB.
pub const MAX_PLAIN_MANIFEST_ANSWER: u64 = 8 << 20;

/// The most audit entries one peer sends about one change.
pub const MAX_AUDIT_ENTRIES: usize = 256;

/// Answers to [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Manifest {
        #[serde(with = "serde_bytes")]
        xml: Vec<u8>,
        signature: String,
    },
    /// Bytes of a compressed manifest from the offset asked for (at most
    /// a mebibyte), how many it has in all, and the signature of its text.
    ManifestPart {
        #[serde(with = "serde_bytes")]
        packed: Vec<u8>,
        total: u64,
        signature: String,
    },
    Have {
        /// The chunks gained from `since` on, in the order they were gained.
        chunks: Vec<Hash>,
        /// How many the peer holds in all: the next `since`.
        total: u32,
    },
    /// The command a peer follows and, if it was aborted, the abort: in
    /// the order they were issued.
    Commands { commands: Vec<SignedCommand> },
    /// The answer to [`Request::Check`]: whether the peer is the site's
    /// fetcher (only then does it poll) and whether it polls at once (not
    /// while a download runs: it polls when that ends).
    Check { fetcher: bool, polling: bool },
    /// The peer's audit entries about a change, one JSON object each,
    /// oldest first (at most [`MAX_AUDIT_ENTRIES`]).
    Audit { entries: Vec<String> },
    /// The peer does not know that release (or command).
    Unknown,
}
