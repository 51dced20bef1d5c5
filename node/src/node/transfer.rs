//! The transfer part: the release this node is taking up (which of its
//! chunks it holds, which peers hold which, the questions peers hold open
//! for chunks it gains) and the health of the disk it writes chunks to. It
//! owns that state alone: the node hands it what happened (a chunk came, a
//! peer answered or left) and acts on what it answers (a peer to ban, a
//! question to answer). Nothing here does I/O, so its rules are tested
//! without a network.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use lanup_protocol::manifest::unique_chunks;
use lanup_protocol::transfer::{Limits, Transfer};
use lanup_protocol::wire::Response;
use lanup_protocol::{Hash, Manifest};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use crate::chunks::ChunkError;
use crate::manifest_text::ManifestText;

/// How long a node holds a peer's question about new chunks when it has
/// none to tell (within the request timeout of 30 s).
const HAVE_HOLD: Duration = Duration::from_secs(10);
/// Questions held at once, one per peer at most: beyond, they are answered
/// at once, as before long polls.
const HAVE_WAITING_MAX: usize = 256;
/// Chunk requests to one peer that stall in a row before it is rested.
const STALLS_TO_REST: u32 = 3;
/// How long a peer whose chunk requests stall again and again is not asked
/// for chunks (it stays connected: a busy machine is not a hostile one).
const STALL_REST: Duration = Duration::from_secs(60);

/// The release this node takes up, from its announcement to its staged
/// copy.
pub(super) struct Target {
    pub(super) manifest: std::sync::Arc<Manifest>,
    pub(super) text: ManifestText,
    pub(super) signature: String,
    pub(super) hash: Hash,
    pub(super) transfer: Transfer<PeerId>,
    /// Chunks of this release that this node holds, and the order it
    /// gained them in (peers read that list by position).
    pub(super) held: HashSet<Hash>,
    pub(super) held_order: Vec<Hash>,
    /// How much of each peer's list this node has read.
    pub(super) peer_since: BTreeMap<PeerId, u32>,
    pub(super) bytes_total: u64,
    pub(super) staged: bool,
    pub(super) staging: bool,
    pub(super) stager: Option<crate::stage::Stager>,
    pub(super) stager_failed: bool,
    pub(super) stage_failed: Option<(String, Instant)>,
    pub(super) no_room: Option<(String, Instant)>,
    pub(super) adopted_at: Instant,
}

impl Target {
    /// A release this node takes up, holding `held` of its chunks already,
    /// with `peers` connected. Equally rare chunks are fetched in an order
    /// of this node's own (from `local`), so that nodes fetch different
    /// ones first.
    pub(super) fn new(
        manifest: Manifest,
        text: ManifestText,
        signature: String,
        held: HashSet<Hash>,
        local: &PeerId,
        peers: impl Iterator<Item = PeerId>,
    ) -> Target {
        let chunks = unique_chunks(&manifest.files);
        let order = u64::from_le_bytes(
            Hash::of(&local.to_bytes()).0[..8]
                .try_into()
                .unwrap_or_default(),
        );
        let mut transfer = Transfer::new(
            chunks
                .iter()
                .filter(|(h, _)| !held.contains(*h))
                .map(|(h, s)| (*h, *s)),
            Limits::default(),
        )
        .with_order(order);
        for peer in peers {
            transfer.peer_connected(peer);
        }
        Target {
            hash: text.hash(),
            manifest: std::sync::Arc::new(manifest),
            text,
            signature,
            transfer,
            held_order: held.iter().copied().collect(),
            held,
            peer_since: BTreeMap::new(),
            bytes_total: chunks.values().sum(),
            staged: false,
            staging: false,
            stager: None,
            stager_failed: false,
            stage_failed: None,
            no_room: None,
            adopted_at: Instant::now(),
        }
    }

    /// Counts `chunk` as held here (offered to peers, and to staging);
    /// whether it is new.
    fn gain(&mut self, chunk: Hash) -> bool {
        self.transfer.obtained(&chunk);
        if !self.held.insert(chunk) {
            return false;
        }
        self.held_order.push(chunk);
        if let Some(s) = &self.stager {
            s.gained(chunk);
        }
        true
    }

    /// The chunks this node gained from position `since` of its list on.
    fn have_since(&self, since: u32) -> Response {
        let from = (since as usize).min(self.held_order.len());
        Response::Have {
            chunks: self.held_order[from..].to_vec(),
            total: self.held_order.len() as u32,
        }
    }
}

/// A peer's question for new chunks, held until there are some.
pub(super) struct HaveWaiter<C> {
    pub(super) peer: PeerId,
    pub(super) manifest_hash: Hash,
    pub(super) since: u32,
    pub(super) channel: C,
    pub(super) at: Instant,
}

/// What the node does after a chunk transfer ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterChunk {
    /// Nothing more than scheduling the next (a free slot is used at once).
    Schedule,
    /// The chunk was for a release no longer the target: nothing.
    Stale,
    /// The peer sent a chunk that is not what it claimed: ban it.
    Distrust(PeerId),
    /// This node's disk refused the chunk.
    DiskFailed(String),
}

/// The transfer part's state. `C` is how a held question is answered (a
/// libp2p response channel in the node).
pub(super) struct Transfers<C> {
    target: Option<Target>,
    stalls: HashMap<PeerId, u32>,
    /// Peers asked which chunks they gained, not answered yet.
    have_pending: HashSet<PeerId>,
    have_waiting: Vec<HaveWaiter<C>>,
    disk_failures: u32,
    disk_paused_until: Option<Instant>,
    disk_error: Option<String>,
}

impl<C> Default for Transfers<C> {
    fn default() -> Self {
        Transfers {
            target: None,
            stalls: HashMap::new(),
            have_pending: HashSet::new(),
            have_waiting: Vec::new(),
            disk_failures: 0,
            disk_paused_until: None,
            disk_error: None,
        }
    }
}

impl<C> Transfers<C> {
    pub(super) fn target(&self) -> Option<&Target> {
        self.target.as_ref()
    }

    /// The target, for staging and the disk guard (which change only its
    /// staging fields).
    pub(super) fn target_mut(&mut self) -> Option<&mut Target> {
        self.target.as_mut()
    }

    /// Takes up a new release; the previous one's chunks stay in the store.
    pub(super) fn take_up(&mut self, target: Target) {
        self.target = Some(target);
    }

    /// Whether `release` is the one this node takes up.
    pub(super) fn is_target(&self, release: &Hash) -> bool {
        self.target.as_ref().is_some_and(|t| t.hash == *release)
    }

    /// `chunk` of `release` is in the store (from the origin, or found
    /// there): held, if `release` is still the target. A chunk of a
    /// previous target is not held for this one (this one's own chunks are
    /// found in the store when it has them too). Whether it was new.
    pub(super) fn gained(&mut self, release: &Hash, chunk: Hash) -> bool {
        match self.target.as_mut().filter(|t| t.hash == *release) {
            Some(t) => t.gain(chunk),
            None => false,
        }
    }

    /// A chunk transfer from a peer for `release` ended.
    pub(super) fn chunk_done(
        &mut self,
        release: &Hash,
        result: Result<(PeerId, Hash), ChunkError>,
        now_ms: u64,
    ) -> AfterChunk {
        let Some(t) = self.target.as_mut().filter(|t| t.hash == *release) else {
            // For a release no longer the target: its chunk is in the
            // store, and the new one's transfer never asked.
            return AfterChunk::Stale;
        };
        match result {
            Ok((peer, hash)) => {
                t.transfer.delivered(&peer, &hash);
                t.gain(hash);
                self.stalls.remove(&peer);
                if self.disk_error.take().is_some() {
                    info!("this node's disk takes chunks again");
                }
                self.disk_failures = 0;
                AfterChunk::Schedule
            }
            Err(ChunkError::Corrupt { peer, hash }) => {
                t.transfer.corrupt(&peer, &hash, now_ms);
                AfterChunk::Distrust(peer)
            }
            Err(ChunkError::NotHeld { peer, hash }) => {
                debug!(%peer, chunk = %hash, "peer no longer holds a chunk it offered");
                t.transfer.not_held(&peer, &hash);
                AfterChunk::Schedule
            }
            Err(ChunkError::Stalled { peer, hash }) => {
                let stalls = self.stalls.entry(peer).or_default();
                *stalls += 1;
                if *stalls >= STALLS_TO_REST {
                    // Slow is not hostile: the peer stays connected and in
                    // the site's picture (its heartbeats, its part in
                    // rollouts); it is only not asked for chunks for a
                    // while.
                    t.transfer
                        .rest(&peer, &hash, now_ms, STALL_REST.as_millis() as u64);
                    self.stalls.remove(&peer);
                    warn!(%peer, rest = %humantime::format_duration(STALL_REST), "peer stopped sending chunks it offered, again and again; not asked for chunks for a while");
                } else {
                    debug!(%peer, chunk = %hash, "peer stopped sending a chunk; asking elsewhere");
                    t.transfer.failed(&peer, &hash);
                }
                AfterChunk::Schedule
            }
            Err(ChunkError::LocalDisk { peer, hash, reason }) => {
                t.transfer.failed(&peer, &hash);
                AfterChunk::DiskFailed(reason)
            }
            Err(ChunkError::Failed { peer, hash, .. }) => {
                t.transfer.failed(&peer, &hash);
                AfterChunk::Schedule
            }
        }
    }

    /// A chunk this node held was found damaged (and removed): no longer
    /// offered, and fetched again. Whether it was held for the target.
    pub(super) fn lost(&mut self, hash: Hash) -> bool {
        let Some(t) = &mut self.target else {
            return false;
        };
        if !t.held.remove(&hash) {
            return false;
        }
        let size = unique_chunks(&t.manifest.files)
            .get(&hash)
            .copied()
            .unwrap_or_default();
        // `held_order` stays as it is (peers read it by position); a peer
        // that asks for the chunk now is told it is not held.
        t.transfer.lost(hash, size);
        t.peer_since.clear();
        t.adopted_at = Instant::now();
        true
    }

    /// Peers' lists are read afresh (what they said they hold was kept
    /// only for chunks this node wanted then), and nodes that did not
    /// speak since count as gone sooner.
    pub(super) fn read_lists_afresh(&mut self) {
        if let Some(t) = &mut self.target {
            t.peer_since.clear();
            t.adopted_at = Instant::now();
        }
    }

    pub(super) fn peer_connected(&mut self, peer: PeerId) {
        if let Some(t) = &mut self.target {
            t.transfer.peer_connected(peer);
        }
    }

    /// A peer that went silent is not asked for chunks.
    pub(super) fn peer_silent(&mut self, peer: &PeerId) {
        if let Some(t) = &mut self.target {
            t.transfer.peer_disconnected(peer);
        }
    }

    /// A peer that was silent speaks again: its list is asked afresh.
    pub(super) fn peer_speaks_again(&mut self, peer: PeerId) {
        if let Some(t) = &mut self.target {
            t.transfer.peer_connected(peer);
            t.peer_since.remove(&peer);
        }
    }

    /// A peer disconnected: what it was asked and what it asked go.
    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
        self.stalls.remove(peer);
        self.have_pending.remove(peer);
        self.have_waiting.retain(|w| w.peer != *peer);
        if let Some(t) = &mut self.target {
            t.transfer.peer_disconnected(peer);
        }
    }

    /// Which of `speaking` to ask for the chunks they gained, with the
    /// target and where each list is read up to: one question per peer at
    /// a time (a slow peer is not asked again before it answered).
    pub(super) fn have_questions(
        &mut self,
        speaking: impl Iterator<Item = PeerId>,
    ) -> Vec<(PeerId, Hash, u32)> {
        let Some(t) = self.target.as_ref().filter(|t| !t.transfer.is_done()) else {
            return Vec::new();
        };
        let asked: Vec<_> = speaking
            .filter(|peer| !self.have_pending.contains(peer))
            .map(|peer| (peer, t.hash, t.peer_since.get(&peer).copied().unwrap_or(0)))
            .collect();
        self.have_pending
            .extend(asked.iter().map(|(peer, _, _)| *peer));
        asked
    }

    /// `peer` answered which chunks of `release` it gained (None: it could
    /// not be asked). Whether it gained any (it is then asked again at
    /// once, and its chunks asked for).
    pub(super) fn have_answered(
        &mut self,
        peer: PeerId,
        release: &Hash,
        answer: Option<(Vec<Hash>, u32)>,
        silent: bool,
    ) -> Option<bool> {
        self.have_pending.remove(&peer);
        let (chunks, total) = answer?;
        let t = self
            .target
            .as_mut()
            .filter(|t| t.hash == *release && !silent)?;
        let gained = !chunks.is_empty();
        t.transfer.peer_connected(peer);
        t.transfer.peer_has(&peer, chunks);
        t.peer_since.insert(peer, total);
        Some(gained)
    }

    /// A peer asks which chunks of `release` this node gained since
    /// position `since`: the answer now, or None when the question is held
    /// until there is one (nothing new yet).
    pub(super) fn ask_held(
        &mut self,
        peer: PeerId,
        release: Hash,
        since: u32,
        channel: C,
    ) -> Result<(), (C, Response)> {
        let Some(t) = self.target.as_ref().filter(|t| t.hash == release) else {
            return Err((channel, Response::Unknown));
        };
        let waiting = self.have_waiting.iter().any(|w| w.peer == peer);
        if since as usize >= t.held_order.len()
            && !waiting
            && self.have_waiting.len() < HAVE_WAITING_MAX
        {
            self.have_waiting.push(HaveWaiter {
                peer,
                manifest_hash: release,
                since,
                channel,
                at: Instant::now(),
            });
            return Ok(());
        }
        Err((channel, t.have_since(since)))
    }

    /// The held questions that now have an answer: chunks gained since, a
    /// release that changed, or a hold that ran out.
    pub(super) fn due_answers(&mut self) -> Vec<(C, Response)> {
        if self.have_waiting.is_empty() {
            return Vec::new();
        }
        let (hash, gained) = self
            .target
            .as_ref()
            .map_or((None, 0), |t| (Some(t.hash), t.held_order.len()));
        let due = |w: &HaveWaiter<C>| {
            Some(w.manifest_hash) != hash
                || (w.since as usize) < gained
                || w.at.elapsed() >= HAVE_HOLD
        };
        if !self.have_waiting.iter().any(due) {
            return Vec::new();
        }
        let (answer, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.have_waiting)
            .into_iter()
            .partition(due);
        self.have_waiting = keep;
        answer
            .into_iter()
            .map(|w| {
                let response = match &self.target {
                    Some(t) if t.hash == w.manifest_hash => t.have_since(w.since),
                    _ => Response::Unknown,
                };
                (w.channel, response)
            })
            .collect()
    }

    /// Whether transfers from peers pause for a disk that refused chunks.
    pub(super) fn disk_paused(&self) -> bool {
        self.disk_paused_until.is_some_and(|at| Instant::now() < at)
    }

    /// Why this node's disk refuses chunks, while it does.
    pub(super) fn disk_error(&self) -> Option<&str> {
        self.disk_error.as_deref()
    }

    /// This node's disk refused a chunk: transfers from peers pause (5 s
    /// doubling, with jitter, at most 5 minutes) instead of asking again
    /// at once, and the status says why.
    pub(super) fn disk_failed(&mut self, reason: String, jitter: u64) {
        if self.disk_paused() {
            return;
        }
        // The same waits as after origin failures.
        self.disk_failures = self.disk_failures.saturating_add(1);
        let wait = Duration::from_millis(lanup_protocol::fetcher::backoff_ms(
            self.disk_failures,
            lanup_protocol::fetcher::BACKOFF_MAX_MS,
            jitter,
        ));
        warn!(error = %reason, retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())), "this node cannot store chunks on its own disk; pausing transfers");
        self.disk_paused_until = Some(Instant::now() + wait);
        self.disk_error = Some(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release of `files` one-chunk files; `salt` makes its chunks its
    /// own.
    fn release(version: &str, files: usize, salt: u8) -> Target {
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<AutoUpdater Format=\"2\">\n  <URLAddres URL=\"http://origin/\"/>\n  <UpdateInfo><Version Num=\"{version}\"/></UpdateInfo>\n  <UpdateFileList>\n"
        );
        for i in 0..files {
            let hash = Hash::of(&[salt, i as u8]);
            xml.push_str(&format!(
                "    <UpdateFile FileName=\"f{i}\" Size=\"2\" Mode=\"644\" Hash=\"{hash}\">\n      <Chunk Size=\"2\" Hash=\"{hash}\"/>\n    </UpdateFile>\n"
            ));
        }
        xml.push_str("  </UpdateFileList>\n</AutoUpdater>\n");
        let text = ManifestText::from_plain(xml.as_bytes()).expect("manifest text");
        let manifest = text.parse().expect("manifest");
        let local = PeerId::random();
        Target::new(
            manifest,
            text,
            String::new(),
            HashSet::new(),
            &local,
            std::iter::empty(),
        )
    }

    fn chunks(t: &Target) -> Vec<Hash> {
        unique_chunks(&t.manifest.files).into_keys().collect()
    }

    /// What this node offers a peer that asks from the start.
    fn offered(part: &mut Transfers<u8>, release: Hash) -> Vec<Hash> {
        match part.ask_held(PeerId::random(), release, 0, 0) {
            Err((_, Response::Have { chunks, .. })) => chunks,
            Ok(()) => Vec::new(),
            Err((_, other)) => panic!("not a list: {other:?}"),
        }
    }

    #[test]
    fn a_chunk_that_arrives_for_the_previous_release_is_neither_held_nor_offered() {
        let mut part = Transfers::<u8>::default();
        let old = release("1.0", 3, 1);
        let (old_hash, old_chunks) = (old.hash, chunks(&old));
        part.take_up(old);
        let peer = PeerId::random();
        // Asked for while 1.0 was the target; 2.0 is taken up meanwhile.
        let new = release("2.0", 3, 2);
        let (new_hash, new_chunks) = (new.hash, chunks(&new));
        part.take_up(new);
        let after = part.chunk_done(&old_hash, Ok((peer, old_chunks[0])), 0);
        assert_eq!(after, AfterChunk::Stale);
        assert!(!part.gained(&old_hash, old_chunks[1]));
        let t = part.target().expect("target");
        assert!(t.held.is_empty(), "{:?}", t.held);
        assert!(offered(&mut part, new_hash).is_empty());
        // The new release's own chunks are held and offered.
        assert_eq!(
            part.chunk_done(&new_hash, Ok((peer, new_chunks[0])), 0),
            AfterChunk::Schedule
        );
        assert!(part.gained(&new_hash, new_chunks[1]));
        assert_eq!(offered(&mut part, new_hash), new_chunks[..2].to_vec());
        // A question about the old release is told it is unknown.
        assert!(matches!(
            part.ask_held(peer, old_hash, 0, 0),
            Err((_, Response::Unknown))
        ));
    }

    #[test]
    fn a_bad_chunk_bans_its_peer_and_stalls_rest_it() {
        let mut part = Transfers::<u8>::default();
        let t = release("1.0", 2, 3);
        let (hash, c) = (t.hash, chunks(&t));
        part.take_up(t);
        let (liar, slow) = (PeerId::random(), PeerId::random());
        let corrupt = ChunkError::Corrupt {
            peer: liar,
            hash: c[0],
        };
        assert_eq!(
            part.chunk_done(&hash, Err(corrupt), 0),
            AfterChunk::Distrust(liar)
        );
        for _ in 0..STALLS_TO_REST {
            let stalled = ChunkError::Stalled {
                peer: slow,
                hash: c[1],
            };
            assert_eq!(
                part.chunk_done(&hash, Err(stalled), 0),
                AfterChunk::Schedule
            );
        }
        assert!(
            part.stalls.is_empty(),
            "the count starts again after a rest"
        );
    }

    #[test]
    fn a_held_question_is_answered_when_a_chunk_comes_or_the_release_changes() {
        let mut part = Transfers::<u8>::default();
        let t = release("1.0", 2, 4);
        let (hash, c) = (t.hash, chunks(&t));
        part.take_up(t);
        let peer = PeerId::random();
        assert!(part.ask_held(peer, hash, 0, 7).is_ok(), "held: nothing yet");
        assert!(part.due_answers().is_empty());
        part.gained(&hash, c[0]);
        let answers = part.due_answers();
        assert_eq!(answers.len(), 1);
        assert!(
            matches!(&answers[0], (7, Response::Have { chunks, total: 1 }) if chunks == &[c[0]])
        );
        // Held again past what it read; the release changes.
        assert!(part.ask_held(peer, hash, 1, 8).is_ok());
        part.take_up(release("2.0", 1, 5));
        assert!(matches!(
            part.due_answers().as_slice(),
            [(8, Response::Unknown)]
        ));
        // A peer that leaves takes its question with it.
        let hash = part.target().expect("target").hash;
        assert!(part.ask_held(peer, hash, 0, 9).is_ok());
        part.peer_gone(&peer);
        part.take_up(release("3.0", 1, 6));
        assert!(part.due_answers().is_empty());
    }
}
