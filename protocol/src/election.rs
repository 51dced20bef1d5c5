//! The fetcher election: which node of a site talks to the origin.
//!
//! Among the live nodes that have an origin configured, the one with the
//! lowest id fetches; every other node takes the release from its peers. A
//! node counts as live while its heartbeats arrive, directly or passed on by
//! others. Two rules keep the uplink busy with one copy only:
//!
//! - A fetcher that is *downloading* (acting, with a download from the
//!   origin under way and not failing) keeps the role: a node that joins
//!   with a lower id waits until that download is over, instead of
//!   stopping it and leaving the uplink idle while it starts its own.
//! - A node that has just started takes part only once it has *settled*:
//!   discovery has answered (every static peer connected, mDNS past its
//!   first queries and quiet for a moment, every peer it found connected) and
//!   each connected peer has sent a heartbeat, so that it does not fetch
//!   before it has heard of a lower one. A fixed grace is only the upper
//!   bound, for discovery that never answers.
//!
//! Heartbeats alone do not keep the role: a node whose origin keeps
//! failing, or that makes no progress while the site lacks chunks, is
//! *failing*, and a node that is not goes first; only when every candidate
//! is failing does the lowest id fetch (someone must keep trying). Pure:
//! the node and the simulator hand in what they heard and how long ago, in
//! milliseconds.

/// How often a node sends its heartbeat.
pub const HEARTBEAT_MS: u64 = 1000;

/// One node as the election sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<P> {
    pub id: P,
    /// It has an origin configured.
    pub has_origin: bool,
    /// Milliseconds since its last heartbeat (0 for the node deciding).
    pub silent_ms: u64,
    /// Its origin keeps failing (as it says).
    pub failing: bool,
    /// Nodes of the site could not reach it, or saw it make no origin
    /// progress while the site lacked chunks: worse than an origin that
    /// answers with an error (such a node retries; a suspected one may
    /// never be heard from).
    pub suspected: bool,
    /// It acts as the fetcher and its download from the origin is under
    /// way: it keeps the role while it is not failing.
    pub downloading: bool,
}

/// What a node's discovery has answered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Discovery {
    /// Peers configured or found and not connected yet: static addresses
    /// (a peer that refuses may be starting too), peers mDNS found and not
    /// connected (one that cannot be reached holds the election up for the
    /// grace at most); and peers connected that the node has not heard of
    /// yet.
    pub pending: usize,
    /// Milliseconds since discovery last found a peer (the node's uptime
    /// when it found none).
    pub quiet_ms: u64,
}

/// The rules' timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Election {
    /// After starting, the longest a node waits for discovery to answer
    /// before it may fetch.
    pub grace_ms: u64,
    /// The least a node waits after starting: discovery's first answers
    /// (mDNS queries at once and again after 0.5 s).
    pub first_answers_ms: u64,
    /// Discovery counts as answered once it found nothing new for this
    /// long.
    pub quiet_ms: u64,
    /// A node whose heartbeats stopped this long ago no longer counts.
    pub silent_ms: u64,
    /// A peer connected this long without a heartbeat no longer holds up
    /// the election.
    pub heartbeat_wait_ms: u64,
}

impl Election {
    /// The rules for a site whose nodes know each other by address: the
    /// site is known once every one is connected (milliseconds on a LAN),
    /// or the grace ran out (one is down).
    pub const STATIC_PEERS: Election = Election {
        grace_ms: 3000,
        first_answers_ms: 0,
        quiet_ms: 0,
        silent_ms: 5000,
        heartbeat_wait_ms: 3000,
    };
    /// With mDNS: past the first two queries' answers (the second query
    /// goes out 0.5 s after start; 200 ms for its answers) and quiet for
    /// half a second; the grace is longer, as peers found by multicast on
    /// a busy LAN can take a few seconds to appear.
    pub const MDNS: Election = Election {
        grace_ms: 6000,
        first_answers_ms: 700,
        quiet_ms: 500,
        ..Election::STATIC_PEERS
    };

    /// Whether a node up for `up_ms` has heard enough of the site to take
    /// part: discovery answered (or the grace ran out), and for each
    /// connected peer (`heard_ms_ago`, `connected_ms_ago`) a heartbeat, or
    /// long enough waited for one.
    pub fn settled(
        &self,
        up_ms: u64,
        discovery: Discovery,
        connected: impl IntoIterator<Item = (Option<u64>, u64)>,
    ) -> bool {
        let answered = up_ms >= self.first_answers_ms
            && discovery.pending == 0
            && discovery.quiet_ms >= self.quiet_ms;
        (answered || up_ms >= self.grace_ms)
            && connected
                .into_iter()
                .all(|(heard, since)| heard.is_some() || since >= self.heartbeat_wait_ms)
    }

    /// The site's fetcher as node `me` (with an origin, if `has_origin`)
    /// sees it, given the other nodes it heard of: (id, has an origin, ms
    /// since its last heartbeat). None when no live node has an origin.
    pub fn fetcher<P: Ord>(
        &self,
        me: P,
        has_origin: bool,
        others: impl IntoIterator<Item = (P, bool, u64)>,
    ) -> Option<P> {
        let me = Candidate {
            id: me,
            has_origin,
            silent_ms: 0,
            failing: false,
            suspected: false,
            downloading: false,
        };
        let others = others
            .into_iter()
            .map(|(id, has_origin, silent_ms)| Candidate {
                id,
                has_origin,
                silent_ms,
                failing: false,
                suspected: false,
                downloading: false,
            });
        self.choose(std::iter::once(me).chain(others))
    }

    /// The fetcher among `candidates` (this node among them): the lowest
    /// live one with an origin that is downloading and not failing, else
    /// the lowest live one with an origin that is not failing, else the
    /// lowest live one with an origin. None when no live node has an
    /// origin.
    pub fn choose<P: Ord>(&self, candidates: impl IntoIterator<Item = Candidate<P>>) -> Option<P> {
        let mut downloading: Option<P> = None;
        let mut healthy: Option<P> = None;
        let mut failing: Option<P> = None;
        let mut suspected: Option<P> = None;
        for c in candidates {
            if !c.has_origin || c.silent_ms >= self.silent_ms {
                continue;
            }
            let best = match (c.suspected, c.failing, c.downloading) {
                (true, _, _) => &mut suspected,
                (false, true, _) => &mut failing,
                (false, false, true) => &mut downloading,
                (false, false, false) => &mut healthy,
            };
            if best.as_ref().is_none_or(|b| c.id < *b) {
                *best = Some(c.id);
            }
        }
        downloading.or(healthy).or(failing).or(suspected)
    }

    /// Whether node `me` is the fetcher (see [`Election::fetcher`]).
    pub fn is_fetcher<P: Ord + Clone>(
        &self,
        me: &P,
        has_origin: bool,
        others: impl IntoIterator<Item = (P, bool, u64)>,
    ) -> bool {
        self.fetcher(me.clone(), has_origin, others).as_ref() == Some(me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_live_node_with_an_origin_fetches() {
        let e = Election::STATIC_PEERS;
        assert!(e.is_fetcher(&5, true, []));
        assert!(!e.is_fetcher(&5, false, []), "no origin, never");
        assert!(!e.is_fetcher(&5, true, [(3, true, 100)]));
        assert!(e.is_fetcher(&5, true, [(3, false, 100)]), "3 has no origin");
        assert!(e.is_fetcher(&5, true, [(3, true, 5000)]), "3 went silent");
        assert!(e.is_fetcher(&5, true, [(7, true, 0)]));
        assert_eq!(e.fetcher(5, false, [(7, true, 0), (9, true, 0)]), Some(7));
        assert_eq!(e.fetcher(5, false, [(7, false, 0)]), None);
    }

    #[test]
    fn a_new_node_settles_once_discovery_answered_and_its_peers_spoke() {
        let e = Election::STATIC_PEERS;
        let answered = |quiet_ms| Discovery {
            pending: 0,
            quiet_ms,
        };
        let dialling = Discovery {
            pending: 1,
            quiet_ms: 0,
        };
        // Every static peer answered: no fixed wait.
        assert!(e.settled(20, answered(20), []));
        assert!(!e.settled(20, dialling, []), "a dial still under way");
        assert!(e.settled(3000, dialling, []), "the grace bounds the wait");
        assert!(!e.settled(40, answered(40), [(Some(10), 30), (None, 30)]));
        assert!(e.settled(40, answered(40), [(Some(10), 30), (Some(5), 30)]));
        assert!(e.settled(4000, answered(4000), [(Some(10), 4000), (None, 3000)]));
        // mDNS: past its first queries, quiet for a moment.
        let m = Election::MDNS;
        assert!(
            !m.settled(600, answered(600), []),
            "before the second query's answers"
        );
        assert!(m.settled(700, answered(700), []));
        assert!(!m.settled(1500, answered(100), []), "just found a peer");
        assert!(m.settled(1500, answered(500), []));
        assert!(!m.settled(5999, dialling, []));
        assert!(m.settled(6000, dialling, []));
    }

    #[test]
    fn a_downloading_fetcher_keeps_the_role_against_a_lower_newcomer() {
        let e = Election::STATIC_PEERS;
        let c = |id: u32, failing: bool, downloading: bool| Candidate {
            id,
            has_origin: true,
            silent_ms: 0,
            failing,
            suspected: false,
            downloading,
        };
        assert_eq!(e.choose([c(5, false, true), c(3, false, false)]), Some(5));
        assert_eq!(
            e.choose([c(5, false, true), c(7, false, true)]),
            Some(5),
            "two that both started: the lower goes on"
        );
        assert_eq!(
            e.choose([c(5, true, true), c(3, false, false)]),
            Some(3),
            "a failing download does not keep the role"
        );
        assert_eq!(
            e.choose([c(5, false, false), c(3, false, false)]),
            Some(3),
            "once its download is over the lowest takes the role back"
        );
    }

    #[test]
    fn a_failing_fetcher_gives_way_to_the_next_node_unless_all_fail() {
        let e = Election::STATIC_PEERS;
        let c = |id: u32, failing: bool| Candidate {
            id,
            has_origin: true,
            silent_ms: 0,
            failing,
            suspected: false,
            downloading: false,
        };
        assert_eq!(e.choose([c(5, false), c(3, true), c(7, false)]), Some(5));
        assert_eq!(
            e.choose([c(5, true), c(3, true), c(7, true)]),
            Some(3),
            "someone keeps trying"
        );
        assert_eq!(e.choose([c(3, false), c(5, false)]), Some(3));
        let silent = Candidate {
            silent_ms: 5000,
            ..c(1, false)
        };
        let no_origin = Candidate {
            has_origin: false,
            ..c(2, false)
        };
        assert_eq!(e.choose([silent, no_origin, c(9, true)]), Some(9));
        assert_eq!(e.choose([silent, no_origin]), None);
    }

    #[test]
    fn a_node_the_site_cannot_reach_comes_after_nodes_whose_origin_failed() {
        // Every node polled an origin with nothing published yet (an
        // error), and the lowest cannot be reached: the next one fetches,
        // not the one no one hears from.
        let e = Election::STATIC_PEERS;
        let c = |id: u32, suspected: bool| Candidate {
            id,
            has_origin: true,
            silent_ms: 0,
            failing: true,
            suspected,
            downloading: false,
        };
        assert_eq!(e.choose([c(3, true), c(5, false), c(7, false)]), Some(5));
        let downloading = Candidate {
            downloading: true,
            failing: false,
            ..c(2, true)
        };
        assert_eq!(
            e.choose([downloading, c(5, false)]),
            Some(5),
            "a suspected download does not keep the role"
        );
        assert_eq!(e.choose([c(3, true)]), Some(3), "all suspected: someone");
    }
}
