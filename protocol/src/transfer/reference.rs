//! The scheduler's first, plain version, kept for the tests: the
//! incremental one must make exactly the same requests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{Limits, Request};
use crate::Hash;

#[derive(Debug, Default)]
struct PeerState {
    has: HashSet<Hash>,
    in_flight: usize,
    asked: u64,
    banned_until: Option<u64>,
}

impl PeerState {
    fn usable(&self, now: u64) -> bool {
        self.banned_until.is_none_or(|until| until <= now)
    }
}

#[derive(Debug, Clone)]
struct InFlight<P> {
    peer: P,
    since: u64,
}

/// The scheduler as first written: every poll looks at every wanted chunk
/// and every peer.
#[derive(Debug)]
pub(super) struct Reference<P> {
    limits: Limits,
    /// Chunks this node still lacks, with their sizes.
    wanted: BTreeMap<Hash, u64>,
    peers: BTreeMap<P, PeerState>,
    in_flight: HashMap<Hash, InFlight<P>>,
    salt: u64,
}

impl<P: Ord + Clone + std::hash::Hash> Reference<P> {
    /// A transfer of the chunks in `wanted` (hash, size).
    pub(super) fn new(wanted: impl IntoIterator<Item = (Hash, u64)>, limits: Limits) -> Self {
        Reference {
            limits,
            wanted: wanted.into_iter().collect(),
            peers: BTreeMap::new(),
            in_flight: HashMap::new(),
            salt: 0,
        }
    }

    pub(super) fn with_order(mut self, salt: u64) -> Self {
        self.salt = salt;
        self
    }

    /// A peer is connected and may be asked once it says what it holds.
    pub(super) fn peer_connected(&mut self, peer: P) {
        self.peers.entry(peer).or_default();
    }

    /// A peer is gone: what was in flight to it is asked elsewhere. Its ban,
    /// if any, is forgotten with it only when it was not banned.
    pub(super) fn peer_disconnected(&mut self, peer: &P) {
        self.in_flight.retain(|_, f| f.peer != *peer);
        match self.peers.get_mut(peer) {
            Some(state) if state.banned_until.is_some() => {
                state.has.clear();
                state.in_flight = 0;
            }
            _ => {
                self.peers.remove(peer);
            }
        }
    }

    /// A peer announced that it holds these chunks (all of them, or the
    /// ones it gained since its last announcement).
    pub(super) fn peer_has(&mut self, peer: &P, hashes: impl IntoIterator<Item = Hash>) {
        if let Some(state) = self.peers.get_mut(peer) {
            state.has.extend(hashes);
        }
    }

    /// This node obtained `hash` some other way (the origin, another
    /// release): it is no longer wanted.
    pub(super) fn obtained(&mut self, hash: &Hash) {
        self.wanted.remove(hash);
    }

    /// `peer` delivered `hash` and it matched.
    pub(super) fn delivered(&mut self, peer: &P, hash: &Hash) {
        self.release(peer, hash);
        self.wanted.remove(hash);
    }

    /// Asking `peer` for `hash` failed (an error, a closed stream): the chunk
    /// is asked elsewhere, or again later.
    pub(super) fn failed(&mut self, peer: &P, hash: &Hash) {
        self.release(peer, hash);
    }

    /// `peer` sent bytes that are not `hash`: it is banned until
    /// `now + ban_ms` and everything in flight to it is asked elsewhere.
    /// Returns the chunks that were in flight to it.
    pub(super) fn corrupt(&mut self, peer: &P, hash: &Hash, now: u64) -> Vec<Hash> {
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
            state.banned_until = Some(now + self.limits.ban_ms);
        }
        dropped
    }

    /// Whether `peer` is banned at `now`.
    pub(super) fn is_banned(&self, peer: &P, now: u64) -> bool {
        self.peers.get(peer).is_some_and(|s| !s.usable(now))
    }

    fn release(&mut self, peer: &P, hash: &Hash) {
        if self.in_flight.get(hash).is_some_and(|f| f.peer == *peer) {
            self.in_flight.remove(hash);
            if let Some(state) = self.peers.get_mut(peer) {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
        }
    }

    /// Gives up requests older than the timeout (returned, so the node can
    /// drop them), then decides which requests to send now.
    pub(super) fn poll(&mut self, now: u64) -> (Vec<Request<P>>, Vec<Request<P>>) {
        let timeout = self.limits.request_timeout_ms;
        let mut expired: Vec<Request<P>> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now.saturating_sub(f.since) >= timeout)
            .map(|(h, f)| Request {
                peer: f.peer.clone(),
                hash: *h,
                size: self.wanted.get(h).copied().unwrap_or(0),
            })
            .collect();
        expired.sort_by_key(|r| r.hash);
        for r in &expired {
            self.release(&r.peer, &r.hash);
        }
        (self.assign(now), expired)
    }

    fn assign(&mut self, now: u64) -> Vec<Request<P>> {
        let mut requests = Vec::new();
        let mut room = self.limits.total.saturating_sub(self.in_flight.len());
        if room == 0 {
            return requests;
        }
        // Rarest first: (holders, hash) for every wanted chunk not in flight
        // that some usable peer holds.
        let mut candidates: Vec<(usize, Hash)> = self
            .wanted
            .keys()
            .filter(|h| !self.in_flight.contains_key(h))
            .map(|h| {
                let holders = self
                    .peers
                    .values()
                    .filter(|s| s.usable(now) && s.has.contains(h))
                    .count();
                (holders, *h)
            })
            .filter(|(holders, _)| *holders > 0)
            .collect();
        candidates.sort_by_key(|(holders, h)| (*holders, super::tie(h, self.salt), *h));
        for (_, hash) in candidates {
            if room == 0 {
                break;
            }
            let per_peer = self.limits.per_peer;
            let best = self
                .peers
                .iter()
                .filter(|(_, s)| s.usable(now) && s.in_flight < per_peer && s.has.contains(&hash))
                .min_by_key(|(p, s)| (s.in_flight, s.asked, (*p).clone()))
                .map(|(p, _)| p.clone());
            let Some(peer) = best else { continue };
            if let Some(state) = self.peers.get_mut(&peer) {
                state.in_flight += 1;
                state.asked += 1;
            }
            self.in_flight.insert(
                hash,
                InFlight {
                    peer: peer.clone(),
                    since: now,
                },
            );
            requests.push(Request {
                peer,
                hash,
                size: self.wanted.get(&hash).copied().unwrap_or(0),
            });
            room -= 1;
        }
        requests
    }

    /// Whether every wanted chunk is here.
    pub(super) fn is_done(&self) -> bool {
        self.wanted.is_empty()
    }

    /// Bytes still wanted.
    pub(super) fn missing_bytes(&self) -> u64 {
        self.wanted.values().sum()
    }

    /// Wanted chunks that no usable peer holds: what only the origin can
    /// provide, in hash order.
    pub(super) fn unavailable(&self, now: u64) -> BTreeSet<Hash> {
        self.wanted
            .keys()
            .filter(|h| {
                !self
                    .peers
                    .values()
                    .any(|s| s.usable(now) && s.has.contains(h))
            })
            .copied()
            .collect()
    }

    /// Requests in flight now.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}
