//! The transfer scheduler: which chunk to ask for next, and from which peer.
//!
//! A pure state machine. The node feeds it what happens (a peer connected,
//! announced chunks, delivered one, sent garbage, went away) with the time in
//! milliseconds, and asks it for the next requests to send; the simulator in
//! `simulations/` drives the same code in simulated time.
//!
//! Policy:
//! * **rarest first**: among the chunks still wanted and not in flight, those
//!   held by the fewest usable peers go first, so rare chunks spread before
//!   the peers holding them leave, and every peer soon has something to
//!   offer the others; chunks equally rare go in an order of the node's own
//!   ([`Transfer::with_order`]), so that nodes that hear the same (all of a
//!   site, from the fetcher) do not all ask for the same chunk and have
//!   nothing to give each other;
//! * **spread the load**: a chunk goes to the holder with the fewest requests
//!   in flight, then the one asked least so far;
//! * **bounded**: at most `per_peer` requests in flight to one peer and
//!   `total` overall; a request unanswered after `request_timeout_ms` is
//!   given up and the chunk asked elsewhere;
//! * **distrust**: a peer that delivers bytes that do not match the chunk's
//!   hash is banned for `ban_ms` and everything in flight to it is asked
//!   elsewhere.
//!
//! Collections are ordered so that the same events give the same requests.

use std::collections::{BTreeMap, BTreeSet};

use fixedbitset::FixedBitSet;

use crate::hash::DigestMap;

use crate::Hash;

/// Bounds the scheduler keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight to one peer.
    pub per_peer: usize,
    /// Requests in flight in all.
    pub total: usize,
    /// A request unanswered this long is given up.
    pub request_timeout_ms: u64,
    /// How long a peer that sent a bad chunk is ignored.
    pub ban_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_peer: 4,
            total: 16,
            request_timeout_ms: 30_000,
            ban_ms: 10 * 60_000,
        }
    }
}

/// One request to send: ask `peer` for the chunk `hash` of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<P> {
    pub peer: P,
    pub hash: Hash,
    pub size: u64,
}

#[derive(Debug)]
struct PeerState {
    /// The wanted chunks it holds (only those: the keys come from the
    /// manifest, not from the peer), a bit a chunk by [`Chunks`] id.
    has: FixedBitSet,
    /// How many bits of `has` are set.
    held: usize,
    in_flight: usize,
    asked: u64,
    banned_until: Option<u64>,
    /// Banned for bad bytes, not only rested for slowness.
    distrusted: bool,
    /// Whether `has` counts in the holders of each chunk: not while banned.
    counted: bool,
}

impl Default for PeerState {
    fn default() -> Self {
        PeerState {
            has: FixedBitSet::new(),
            held: 0,
            in_flight: 0,
            asked: 0,
            banned_until: None,
            distrusted: false,
            counted: true,
        }
    }
}

impl PeerState {
    fn usable(&self, now: u64) -> bool {
        self.banned_until.is_none_or(|until| until <= now)
    }

    fn holds(&self, id: u32) -> bool {
        self.has.contains(id as usize)
    }

    /// Marks chunk `id` (of `ids`) held; whether it was not already.
    fn put(&mut self, id: u32, ids: usize) -> bool {
        if self.has.len() < ids {
            self.has.grow(ids);
        }
        let new = !self.has.put(id as usize);
        self.held += usize::from(new);
        new
    }

    /// Marks chunk `id` not held; whether it was.
    fn unput(&mut self, id: u32) -> bool {
        let had = self.holds(id);
        if had {
            self.has.remove(id as usize);
            self.held -= 1;
        }
        had
    }

    fn ids(&self) -> Vec<u32> {
        self.has.ones().map(|i| i as u32).collect()
    }
}

#[derive(Debug, Clone)]
struct InFlight<P> {
    peer: P,
    since: u64,
}

/// The chunks of a transfer, each by a dense id: those wanted at the start
/// in hash order, then any wanted again later ([`Transfer::lost`]). What
/// the scheduler keeps per chunk is an entry in a few arrays and an entry
/// of the ready set, under 80 bytes a chunk, and a bit per peer (maps by
/// hash and a list of holders' ids a chunk were several times that, for a
/// release of 100,000 small files).
#[derive(Debug, Default)]
struct Chunks {
    hashes: Vec<Hash>,
    /// How many of `hashes` are sorted (those given at the start).
    sorted: usize,
    /// The ids of chunks added later.
    later: DigestMap<u32>,
    sizes: Vec<u64>,
    /// Which are still wanted.
    wanted: FixedBitSet,
    /// For each wanted chunk, how many usable peers hold it.
    holders: Vec<u32>,
}

impl Chunks {
    fn id(&self, hash: &Hash) -> Option<u32> {
        match self.hashes[..self.sorted].binary_search(hash) {
            Ok(at) => Some(at as u32),
            Err(_) => self.later.get(hash).copied(),
        }
    }

    /// The id of `hash` if it is wanted.
    fn wanted_id(&self, hash: &Hash) -> Option<u32> {
        self.id(hash).filter(|&id| self.is_wanted(id))
    }

    fn is_wanted(&self, id: u32) -> bool {
        self.wanted.contains(id as usize)
    }

    fn hash(&self, id: u32) -> Hash {
        self.hashes[id as usize]
    }

    fn len(&self) -> usize {
        self.hashes.len()
    }
}

/// The scheduler for one release at one node.
///
/// What a poll needs is kept up to date as events come, so a poll costs
/// about the requests it makes, not the size of the release times the size
/// of the site: every wanted chunk's count of usable holders, and the
/// chunks that could be asked for now ordered rarest first.
#[derive(Debug)]
pub struct Transfer<P> {
    limits: Limits,
    chunks: Chunks,
    /// How many chunks this node still lacks, and their bytes.
    wanted: usize,
    missing: u64,
    peers: BTreeMap<P, PeerState>,
    in_flight: DigestMap<InFlight<P>>,
    /// Wanted chunks not in flight that a usable peer holds: rarest first,
    /// then in this node's order.
    ready: BTreeSet<Key>,
    /// Sets this node's order among equally rare chunks.
    salt: u64,
}

/// How many of the rarest ready chunks a pick looks through before it
/// takes any a peer with room holds (see [`Transfer::next_pick`]).
const RAREST_SCAN: usize = 512;

/// A ready chunk's place, in one number: its holders, then a tie-break,
/// then its id.
type Key = u128;

fn key_id(key: Key) -> u32 {
    key as u32
}

/// Where `hash` goes among equally rare chunks for a node with `salt`.
fn tie(hash: &Hash, salt: u64) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&hash.0[..8]);
    (u64::from_le_bytes(head) ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl<P: Ord + Clone + std::hash::Hash> Transfer<P> {
    /// A transfer of the chunks in `wanted` (hash, size).
    pub fn new(wanted: impl IntoIterator<Item = (Hash, u64)>, limits: Limits) -> Self {
        let mut list: Vec<(Hash, u64)> = wanted.into_iter().collect();
        list.sort_by_key(|(h, _)| *h);
        list.dedup_by_key(|(h, _)| *h);
        let n = list.len();
        let mut wanted = FixedBitSet::with_capacity(n);
        wanted.insert_range(..);
        let (hashes, sizes): (Vec<Hash>, Vec<u64>) = list.into_iter().unzip();
        Transfer {
            limits,
            missing: sizes.iter().sum(),
            wanted: n,
            chunks: Chunks {
                hashes,
                sorted: n,
                later: DigestMap::default(),
                sizes,
                wanted,
                holders: vec![0; n],
            },
            peers: BTreeMap::new(),
            in_flight: DigestMap::default(),
            ready: BTreeSet::new(),
            salt: 0,
        }
    }

    /// Orders equally rare chunks by `salt` (each node its own, from its
    /// id) instead of all the same way.
    pub fn with_order(mut self, salt: u64) -> Self {
        self.salt = salt;
        let ready = std::mem::take(&mut self.ready);
        self.ready = ready
            .into_iter()
            .map(|k| {
                let id = key_id(k);
                self.key(self.chunks.holders[id as usize], id)
            })
            .collect();
        self
    }

    fn key(&self, count: u32, id: u32) -> Key {
        (u128::from(count) << 96)
            | (u128::from(tie(&self.chunks.hash(id), self.salt)) << 32)
            | u128::from(id)
    }

    /// Counts one more usable holder of chunk `id` (if still wanted), or
    /// one fewer.
    fn count(&mut self, id: u32, holds: bool) {
        if !self.chunks.is_wanted(id) {
            return;
        }
        let old = self.chunks.holders[id as usize];
        let count = if holds {
            old + 1
        } else {
            old.saturating_sub(1)
        };
        self.chunks.holders[id as usize] = count;
        self.ready.remove(&self.key(old, id));
        if count > 0 && !self.in_flight.contains_key(&self.chunks.hash(id)) {
            self.ready.insert(self.key(count, id));
        }
    }

    /// `hash` is no longer in flight: it may be asked again.
    fn make_ready(&mut self, hash: &Hash) {
        if let Some(id) = self.chunks.wanted_id(hash) {
            let count = self.chunks.holders[id as usize];
            if count > 0 && !self.in_flight.contains_key(hash) {
                self.ready.insert(self.key(count, id));
            }
        }
    }

    fn unwant(&mut self, hash: &Hash) {
        let Some(id) = self.chunks.wanted_id(hash) else {
            return;
        };
        let count = self.chunks.holders[id as usize];
        self.ready.remove(&self.key(count, id));
        self.chunks.wanted.remove(id as usize);
        self.chunks.holders[id as usize] = 0;
        self.wanted -= 1;
        self.missing -= self.chunks.sizes[id as usize];
        // A peer's `has` stays the wanted chunks it holds.
        for state in self.peers.values_mut() {
            state.unput(id);
        }
    }

    /// Stops counting `peer`'s chunks (it is banned or gone).
    fn uncount(&mut self, peer: &P) {
        let Some(state) = self.peers.get_mut(peer).filter(|s| s.counted) else {
            return;
        };
        state.counted = false;
        for id in state.ids() {
            self.count(id, false);
        }
    }

    /// Counts again the chunks of peers whose ban ended by `now`.
    fn end_bans(&mut self, now: u64) {
        let ended: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, s)| !s.counted && s.usable(now))
            .map(|(p, _)| p.clone())
            .collect();
        for peer in ended {
            let Some(state) = self.peers.get_mut(&peer) else {
                continue;
            };
            state.counted = true;
            for id in state.ids() {
                self.count(id, true);
            }
        }
    }

    /// A peer is connected and may be asked once it says what it holds.
    pub fn peer_connected(&mut self, peer: P) {
        self.peers.entry(peer).or_default();
    }

    /// A peer is gone: what was in flight to it is asked elsewhere. Its ban,
    /// if any, is forgotten with it only when it was not banned.
    pub fn peer_disconnected(&mut self, peer: &P) {
        self.uncount(peer);
        let lost: Vec<Hash> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.peer == *peer)
            .map(|(h, _)| *h)
            .collect();
        for h in &lost {
            self.in_flight.remove(h);
            self.make_ready(h);
        }
        match self.peers.get_mut(peer) {
            Some(state) if state.banned_until.is_some() => {
                state.has.clear();
                state.held = 0;
                state.in_flight = 0;
                // Nothing left to count; its ban still runs.
                state.counted = false;
            }
            _ => {
                self.peers.remove(peer);
            }
        }
    }

    /// A peer announced that it holds these chunks (all of them, or the
    /// ones it gained since its last announcement).
    pub fn peer_has(&mut self, peer: &P, hashes: impl IntoIterator<Item = Hash>) {
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        let chunks = &self.chunks;
        let new: Vec<u32> = hashes
            .into_iter()
            .filter_map(|h| chunks.wanted_id(&h))
            .filter(|&id| state.put(id, chunks.len()))
            .collect();
        if state.counted {
            for id in new {
                self.count(id, true);
            }
        }
    }

    /// This node obtained `hash` some other way (the origin, another
    /// release): it is no longer wanted.
    pub fn obtained(&mut self, hash: &Hash) {
        self.unwant(hash);
    }

    /// `peer` delivered `hash` and it matched.
    pub fn delivered(&mut self, peer: &P, hash: &Hash) {
        self.release(peer, hash);
        self.unwant(hash);
    }

    /// Asking `peer` for `hash` failed (an error, a closed stream): the chunk
    /// is asked elsewhere, or again later.
    pub fn failed(&mut self, peer: &P, hash: &Hash) {
        self.release(peer, hash);
    }

    /// `peer` answered that it does not hold `hash` (after saying it did:
    /// the chunk rotted on its disk, say). It is no longer counted as a
    /// holder of it, so the chunk is not asked of it again at once; a later
    /// announcement that it holds it counts again.
    pub fn not_held(&mut self, peer: &P, hash: &Hash) {
        self.release(peer, hash);
        let Some(id) = self.chunks.id(hash) else {
            return;
        };
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        if state.unput(id) && state.counted {
            self.count(id, false);
        }
    }

    /// A chunk this node had is gone (found damaged on its disk): it is
    /// wanted again. Peers' earlier announcements of it were not kept, so
    /// the node asks them afresh what they hold.
    pub fn lost(&mut self, hash: Hash, size: u64) {
        let chunks = &mut self.chunks;
        let id = match chunks.id(&hash) {
            Some(id) if chunks.is_wanted(id) => {
                self.missing = self.missing - chunks.sizes[id as usize] + size;
                chunks.sizes[id as usize] = size;
                return;
            }
            Some(id) => {
                chunks.sizes[id as usize] = size;
                id
            }
            None => {
                let id = chunks.len() as u32;
                chunks.hashes.push(hash);
                chunks.sizes.push(size);
                chunks.holders.push(0);
                chunks.wanted.grow(chunks.len());
                chunks.later.insert(hash, id);
                id
            }
        };
        chunks.wanted.insert(id as usize);
        chunks.holders[id as usize] = 0;
        self.wanted += 1;
        self.missing += size;
    }

    /// `peer` sent bytes that are not `hash`: it is banned until
    /// `now + ban_ms` and everything in flight to it is asked elsewhere.
    /// Returns the chunks that were in flight to it.
    pub fn corrupt(&mut self, peer: &P, hash: &Hash, now: u64) -> Vec<Hash> {
        self.exclude(peer, hash, now + self.limits.ban_ms, true)
    }

    /// `peer` stopped sending chunks it offered, again and again (a machine
    /// too busy to serve, a link too slow): it is not asked for chunks until
    /// `now + rest_ms`, and everything in flight to it is asked elsewhere.
    /// Unlike [`Transfer::corrupt`] this says nothing against its honesty.
    /// Returns the chunks that were in flight to it.
    pub fn rest(&mut self, peer: &P, hash: &Hash, now: u64, rest_ms: u64) -> Vec<Hash> {
        self.exclude(peer, hash, now + rest_ms, false)
    }

    fn exclude(&mut self, peer: &P, hash: &Hash, until: u64, distrusted: bool) -> Vec<Hash> {
        self.release(peer, hash);
        let mut dropped: Vec<Hash> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.peer == *peer)
            .map(|(h, _)| *h)
            .collect();
        dropped.sort();
        for h in &dropped {
            self.in_flight.remove(h);
        }
        if let Some(state) = self.peers.get_mut(peer) {
            state.in_flight = 0;
            state.banned_until = Some(until);
            state.distrusted = distrusted;
        }
        self.uncount(peer);
        for h in &dropped {
            self.make_ready(h);
        }
        dropped
    }

    /// Whether `peer` is not asked for chunks at `now` (banned or rested).
    pub fn is_banned(&self, peer: &P, now: u64) -> bool {
        self.peers.get(peer).is_some_and(|s| !s.usable(now))
    }

    /// Whether `peer` is banned at `now` for bytes that were not what they
    /// claimed to be (not merely rested for slowness).
    pub fn is_distrusted(&self, peer: &P, now: u64) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|s| s.distrusted && !s.usable(now))
    }

    fn release(&mut self, peer: &P, hash: &Hash) {
        if self.in_flight.get(hash).is_some_and(|f| f.peer == *peer) {
            self.in_flight.remove(hash);
            if let Some(state) = self.peers.get_mut(peer) {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
            self.make_ready(hash);
        }
    }

    /// The size of `hash` if it is wanted, else 0.
    fn size(&self, hash: &Hash) -> u64 {
        self.chunks
            .wanted_id(hash)
            .map_or(0, |id| self.chunks.sizes[id as usize])
    }

    /// Gives up requests older than the timeout (returned, so the node can
    /// drop them), then decides which requests to send now.
    pub fn poll(&mut self, now: u64) -> (Vec<Request<P>>, Vec<Request<P>>) {
        self.end_bans(now);
        let timeout = self.limits.request_timeout_ms;
        let mut expired: Vec<Request<P>> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now.saturating_sub(f.since) >= timeout)
            .map(|(h, f)| Request {
                peer: f.peer.clone(),
                hash: *h,
                size: self.size(h),
            })
            .collect();
        expired.sort_by_key(|r| r.hash);
        for r in &expired {
            self.release(&r.peer, &r.hash);
        }
        (self.assign(now), expired)
    }

    /// The rarest ready chunk a peer with room holds, and that peer: the
    /// one with the fewest requests in flight, then the one asked least so
    /// far. This looks at the rarest [`RAREST_SCAN`] chunks in order until
    /// one has a holder with room. Past them, the rarest chunks are all
    /// held by busy peers (a fetcher that alone holds most of a large
    /// release, say): rather than walk the whole release at every chunk
    /// that arrives, it takes any ready chunk a peer with room holds.
    fn next_pick(&self, now: u64) -> Option<(Key, P)> {
        let per_peer = self.limits.per_peer;
        // A peer that holds no wanted chunk has nothing to offer; with no
        // peer that can be asked, nothing is looked through.
        let room = |s: &PeerState| s.usable(now) && s.in_flight < per_peer && s.held > 0;
        if !self.peers.values().any(room) {
            return None;
        }
        let pick = |key: Key| {
            let id = key_id(key);
            let peer = self
                .peers
                .iter()
                .filter(|(_, s)| s.counted && room(s) && s.holds(id))
                .map(|(p, s)| (s.in_flight, s.asked, p));
            peer.min().map(|(_, _, p)| (key, p.clone()))
        };
        if let Some(found) = self.ready.iter().take(RAREST_SCAN).find_map(|k| pick(*k)) {
            return Some(found);
        }
        if self.ready.len() <= RAREST_SCAN {
            return None;
        }
        // Every wanted chunk a usable peer holds is in flight or ready.
        self.peers
            .values()
            .filter(|s| room(s))
            .flat_map(|s| s.has.ones())
            .map(|id| id as u32)
            .filter(|&id| {
                self.chunks.is_wanted(id) && !self.in_flight.contains_key(&self.chunks.hash(id))
            })
            .find_map(|id| pick(self.key(self.chunks.holders[id as usize], id)))
    }

    /// Rarest first: the rarest ready chunk that a peer with room holds
    /// goes to the holder with the fewest requests in flight, then the one
    /// asked least so far; again, until the limits or the chunks run out.
    fn assign(&mut self, now: u64) -> Vec<Request<P>> {
        let mut requests = Vec::new();
        let mut room = self.limits.total.saturating_sub(self.in_flight.len());
        while room > 0 {
            let Some((key, peer)) = self.next_pick(now) else {
                break;
            };
            let id = key_id(key);
            let hash = self.chunks.hash(id);
            self.ready.remove(&key);
            self.in_flight.insert(
                hash,
                InFlight {
                    peer: peer.clone(),
                    since: now,
                },
            );
            if let Some(state) = self.peers.get_mut(&peer) {
                state.in_flight += 1;
                state.asked += 1;
            }
            requests.push(Request {
                peer,
                hash,
                size: self.chunks.sizes[id as usize],
            });
            room -= 1;
        }
        requests
    }

    /// Whether every wanted chunk is here.
    pub fn is_done(&self) -> bool {
        self.wanted == 0
    }

    /// Bytes still wanted.
    pub fn missing_bytes(&self) -> u64 {
        self.missing
    }

    /// Wanted chunks that no usable peer holds: what only the origin can
    /// provide, in hash order.
    pub fn unavailable(&self, now: u64) -> BTreeSet<Hash> {
        let unbanned: Vec<&PeerState> = self
            .peers
            .values()
            .filter(|s| !s.counted && s.usable(now))
            .collect();
        self.chunks
            .wanted
            .ones()
            .map(|id| id as u32)
            .filter(|&id| {
                self.chunks.holders[id as usize] == 0 && !unbanned.iter().any(|s| s.holds(id))
            })
            .map(|id| self.chunks.hash(id))
            .collect()
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        Hash::of(&[n])
    }

    fn limits() -> Limits {
        Limits {
            per_peer: 2,
            total: 4,
            request_timeout_ms: 1000,
            ban_ms: 5000,
        }
    }

    fn transfer(chunks: &[u8]) -> Transfer<&'static str> {
        Transfer::new(chunks.iter().map(|&n| (h(n), 100 + n as u64)), limits())
    }

    #[test]
    fn rarest_chunks_go_first_and_load_spreads() {
        let mut t = transfer(&[1, 2, 3]);
        for p in ["a", "b", "c"] {
            t.peer_connected(p);
        }
        t.peer_has(&"a", [h(1), h(2), h(3)]);
        t.peer_has(&"b", [h(1), h(2)]);
        t.peer_has(&"c", [h(1)]);
        let (reqs, _) = t.poll(0);
        // 3 has one holder, 2 has two, 1 has three.
        let order: Vec<Hash> = reqs.iter().map(|r| r.hash).collect();
        assert_eq!(order, [h(3), h(2), h(1)]);
        let peers: Vec<&str> = reqs.iter().map(|r| r.peer).collect();
        assert_eq!(peers, ["a", "b", "c"], "each chunk to a different holder");
        assert_eq!(reqs[0].size, 103);
    }

    #[test]
    fn nodes_with_the_same_view_ask_for_different_chunks_first() {
        let firsts: std::collections::BTreeSet<Hash> = (0..8u64)
            .map(|salt| {
                let mut t =
                    Transfer::new((0..32u8).map(|n| (h(n), 100)), limits()).with_order(salt);
                t.peer_connected("fetcher");
                t.peer_has(&"fetcher", (0..32u8).map(h));
                t.poll(0).0[0].hash
            })
            .collect();
        assert!(
            firsts.len() >= 6,
            "eight nodes, {} distinct first chunks",
            firsts.len()
        );
    }

    #[test]
    fn limits_are_kept() {
        let mut t = transfer(&[1, 2, 3, 4, 5, 6]);
        t.peer_connected("a");
        t.peer_has(&"a", (1..=6).map(h));
        let (reqs, _) = t.poll(0);
        assert_eq!(reqs.len(), 2, "per-peer limit");
        t.peer_connected("b");
        t.peer_has(&"b", (1..=6).map(h));
        let (more, _) = t.poll(0);
        assert_eq!(more.len(), 2, "total limit");
        assert_eq!(t.in_flight(), 4);
        assert!(t.poll(0).0.is_empty());
        t.delivered(&"a", &reqs[0].hash);
        let (next, _) = t.poll(1);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].peer, "a");
    }

    #[test]
    fn a_lost_peer_s_requests_go_elsewhere() {
        let mut t = transfer(&[1]);
        t.peer_connected("a");
        t.peer_connected("b");
        t.peer_has(&"a", [h(1)]);
        t.peer_has(&"b", [h(1)]);
        let (reqs, _) = t.poll(0);
        assert_eq!(reqs[0].peer, "a");
        t.peer_disconnected(&"a");
        let (again, _) = t.poll(1);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].peer, "b");
        t.delivered(&"b", &h(1));
        assert!(t.is_done());
        assert_eq!(t.missing_bytes(), 0);
    }

    #[test]
    fn a_corrupting_peer_is_banned_and_the_chunk_fetched_elsewhere() {
        let mut t = transfer(&[1, 2]);
        t.peer_connected("bad");
        t.peer_connected("good");
        t.peer_has(&"bad", [h(1), h(2)]);
        let (reqs, _) = t.poll(0);
        assert!(reqs.iter().all(|r| r.peer == "bad"));
        let dropped = t.corrupt(&"bad", &reqs[0].hash, 10);
        assert_eq!(dropped, vec![reqs[1].hash]);
        assert!(t.is_banned(&"bad", 10));
        assert!(t.poll(20).0.is_empty(), "nobody else holds the chunks yet");
        assert_eq!(
            t.unavailable(20).len(),
            2,
            "the origin is the only source now"
        );
        t.peer_has(&"good", [h(1), h(2)]);
        let (reqs, _) = t.poll(30);
        assert_eq!(reqs.len(), 2);
        assert!(reqs.iter().all(|r| r.peer == "good"));
        // The ban outlives a reconnect and ends after ban_ms.
        t.peer_disconnected(&"bad");
        t.peer_connected("bad");
        assert!(t.is_banned(&"bad", 5009));
        assert!(t.is_distrusted(&"bad", 5009));
        assert!(!t.is_banned(&"bad", 5010));
    }

    #[test]
    fn a_peer_that_stalls_is_rested_not_distrusted() {
        let mut t = transfer(&[1, 2]);
        t.peer_connected("busy");
        t.peer_connected("good");
        t.peer_has(&"busy", [h(1), h(2)]);
        let (reqs, _) = t.poll(0);
        assert!(reqs.iter().all(|r| r.peer == "busy"));
        let dropped = t.rest(&"busy", &reqs[0].hash, 10, 100);
        assert_eq!(dropped, vec![reqs[1].hash]);
        assert!(t.is_banned(&"busy", 109), "not asked while it rests");
        assert!(!t.is_distrusted(&"busy", 50), "a slow peer is not a liar");
        t.peer_has(&"good", [h(1), h(2)]);
        let (reqs, _) = t.poll(30);
        assert!(reqs.iter().all(|r| r.peer == "good"));
        assert!(!t.is_banned(&"busy", 110));
    }

    #[test]
    fn unanswered_requests_time_out_and_are_asked_again() {
        let mut t = transfer(&[1]);
        t.peer_connected("slow");
        t.peer_connected("other");
        t.peer_has(&"slow", [h(1)]);
        let (reqs, _) = t.poll(0);
        assert_eq!(reqs[0].peer, "slow");
        let (none, expired) = t.poll(999);
        assert!(none.is_empty() && expired.is_empty());
        t.peer_has(&"other", [h(1)]);
        let (again, expired) = t.poll(1000);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].peer, "slow");
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].peer, "other",
            "the slow peer was asked more already"
        );
        // A late answer from the slow peer is ignored for bookkeeping.
        t.failed(&"slow", &h(1));
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn chunks_obtained_elsewhere_are_not_asked_for() {
        let mut t = transfer(&[1, 2]);
        t.peer_connected("a");
        t.peer_has(&"a", [h(1), h(2)]);
        t.obtained(&h(1));
        let (reqs, _) = t.poll(0);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].hash, h(2));
        assert_eq!(t.missing_bytes(), 102);
    }

    /// A fetcher alone holds most of a release of many small chunks and
    /// is always busy; a second peer holds a part the fetcher holds too.
    /// The second peer is kept busy all along (it is not left idle until
    /// the rare chunks run out), and every pick costs about the requests
    /// in flight, not the release: 60,000 chunks delivered one at a time
    /// take a moment where a walk of the release at every chunk took
    /// minutes.
    #[test]
    fn a_busy_holder_of_the_rarest_chunks_leaves_the_others_asked() {
        let hash = |i: u32| Hash::of(&i.to_le_bytes());
        let n = 60_000u32;
        let mut t = Transfer::new((0..n).map(|i| (hash(i), 1000)), Limits::default());
        t.peer_connected("fetcher");
        t.peer_connected("peer");
        t.peer_has(&"fetcher", (0..n).map(hash));
        t.peer_has(&"peer", (0..n / 3).map(hash));
        let mut in_flight: Vec<Request<&str>> = Vec::new();
        let mut from_peer = 0;
        let mut rounds = 0;
        while !t.is_done() {
            let (asked, expired) = t.poll(0);
            assert!(expired.is_empty());
            in_flight.extend(asked);
            if rounds < n / 3 && rounds % 100 == 0 {
                let busy = |p| in_flight.iter().filter(|r| r.peer == p).count();
                assert_eq!(
                    busy("peer"),
                    4,
                    "the second peer is asked at round {rounds}"
                );
            }
            let r = in_flight.remove(0);
            from_peer += usize::from(r.peer == "peer");
            t.delivered(&r.peer, &r.hash);
            rounds += 1;
        }
        assert_eq!(rounds, n);
        assert!(
            from_peer > 1000,
            "the second peer served {from_peer} chunks"
        );
    }

    /// Random events (peers coming and going, announcing, delivering,
    /// failing, corrupting, timing out, chunks obtained elsewhere): the
    /// incremental scheduler asks for exactly what the plain one asks for.
    #[test]
    fn the_incremental_scheduler_makes_the_same_requests_as_the_plain_one() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut made = 0;
        for run in 0..200u64 {
            let chunks: Vec<(Hash, u64)> = (0..40u8).map(|n| (h(n), 100 + n as u64)).collect();
            let limits = Limits {
                per_peer: 1 + (run % 4) as usize,
                total: 2 + (run % 7) as usize,
                request_timeout_ms: 50,
                ban_ms: 80,
            };
            let mut fast = Transfer::new(chunks.clone(), limits).with_order(run);
            let mut plain = reference::Reference::new(chunks, limits).with_order(run);
            let mut now = 0;
            let mut asked: Vec<Request<u8>> = Vec::new();
            for _ in 0..400 {
                now += next(5);
                let peer = next(6) as u8;
                match next(10) {
                    0 => {
                        fast.peer_connected(peer);
                        plain.peer_connected(peer);
                    }
                    1 if next(4) == 0 => {
                        fast.peer_disconnected(&peer);
                        plain.peer_disconnected(&peer);
                    }
                    2 | 3 => {
                        let has: Vec<Hash> = (0..next(6)).map(|_| h(next(40) as u8)).collect();
                        fast.peer_has(&peer, has.clone());
                        plain.peer_has(&peer, has);
                    }
                    4 if !asked.is_empty() => {
                        let r = asked.swap_remove(next(asked.len() as u64) as usize);
                        match next(8) {
                            0 => {
                                let a = fast.corrupt(&r.peer, &r.hash, now);
                                assert_eq!(a, plain.corrupt(&r.peer, &r.hash, now));
                            }
                            1 | 2 => {
                                fast.failed(&r.peer, &r.hash);
                                plain.failed(&r.peer, &r.hash);
                            }
                            _ => {
                                fast.delivered(&r.peer, &r.hash);
                                plain.delivered(&r.peer, &r.hash);
                            }
                        }
                    }
                    5 if next(5) == 0 => {
                        let c = h(next(40) as u8);
                        fast.obtained(&c);
                        plain.obtained(&c);
                    }
                    _ => {
                        let got = fast.poll(now);
                        assert_eq!(got, plain.poll(now), "run {run} at {now}");
                        made += got.0.len();
                        asked.extend(got.0);
                    }
                }
                assert_eq!(fast.unavailable(now), plain.unavailable(now), "run {run}");
                assert_eq!(fast.in_flight(), plain.in_flight());
                assert_eq!(fast.missing_bytes(), plain.missing_bytes());
                assert_eq!(fast.is_done(), plain.is_done());
                assert_eq!(fast.is_banned(&peer, now), plain.is_banned(&peer, now));
            }
        }
        assert!(made > 5000, "the runs made requests: {made}");
    }

    #[test]
    fn a_chunk_a_peer_no_longer_holds_is_not_asked_of_it_again() {
        let mut t = transfer(&[1, 2]);
        t.peer_connected("a");
        t.peer_connected("b");
        t.peer_has(&"a", [h(1), h(2)]);
        t.peer_has(&"b", [h(2)]);
        let (asked, _) = t.poll(0);
        let to_a: Vec<Hash> = asked
            .iter()
            .filter(|r| r.peer == "a")
            .map(|r| r.hash)
            .collect();
        assert!(to_a.contains(&h(1)));
        t.not_held(&"a", &h(1));
        let (again, _) = t.poll(1);
        assert!(
            again.iter().all(|r| r.hash != h(1)),
            "nobody else holds 1: {again:?}"
        );
        assert_eq!(t.unavailable(1), BTreeSet::from([h(1)]));
        // Announced again (fetched anew): it counts again.
        t.peer_has(&"a", [h(1)]);
        let (again, _) = t.poll(2);
        assert!(again.iter().any(|r| r.hash == h(1) && r.peer == "a"));

        // A chunk this node lost is wanted again.
        t.delivered(&"a", &h(1));
        assert!(t.unavailable(3).is_empty());
        t.lost(h(1), 10);
        assert!(!t.is_done());
        assert_eq!(t.unavailable(3), BTreeSet::from([h(1)]));
        t.peer_has(&"b", [h(1)]);
        let (again, _) = t.poll(4);
        assert!(again.iter().any(|r| r.hash == h(1) && r.peer == "b"));
    }
}
