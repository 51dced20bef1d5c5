//! The fetcher election: which node of a site talks to the origin.
//!
//! Among the live nodes that have an origin configured, the one with the
//! lowest id fetches; every other node takes the release from its peers. A
//! node counts as live while its heartbeats arrive, directly or passed on by
//! others. A node that has just started waits a grace period first, and for
//! a heartbeat from each node it is connected to, so that it does not fetch
//! before it has heard of a lower one (which would cost the uplink a second
//! copy). Pure: the node and the simulator hand in what they heard and how
//! long ago, in milliseconds.

/// How often a node sends its heartbeat.
pub const HEARTBEAT_MS: u64 = 1000;

/// The rules' timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Election {
    /// After starting, how long a node waits before it may fetch.
    pub grace_ms: u64,
    /// A node whose heartbeats stopped this long ago no longer counts.
    pub silent_ms: u64,
    /// A peer connected this long without a heartbeat no longer holds up
    /// the election.
    pub heartbeat_wait_ms: u64,
}

impl Election {
    /// The rules for a site whose nodes know each other by address.
    pub const STATIC_PEERS: Election = Election {
        grace_ms: 3000,
        silent_ms: 5000,
        heartbeat_wait_ms: 3000,
    };
    /// With mDNS the grace is longer: peers found by multicast on a busy LAN
    /// can take a few seconds to appear.
    pub const MDNS: Election = Election {
        grace_ms: 6000,
        ..Election::STATIC_PEERS
    };

    /// Whether a node up for `up_ms` has heard enough of the site to take
    /// part: past the grace, and for each connected peer (`heard_ms_ago`,
    /// `connected_ms_ago`) a heartbeat, or long enough waited for one.
    pub fn settled(
        &self,
        up_ms: u64,
        connected: impl IntoIterator<Item = (Option<u64>, u64)>,
    ) -> bool {
        up_ms >= self.grace_ms
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
        let live = others
            .into_iter()
            .filter(|(_, origin, ago)| *origin && *ago < self.silent_ms)
            .map(|(id, _, _)| id);
        has_origin.then_some(me).into_iter().chain(live).min()
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
    fn a_new_node_waits_for_the_grace_and_its_peers_heartbeats() {
        let e = Election::STATIC_PEERS;
        assert!(!e.settled(2999, []));
        assert!(e.settled(3000, []));
        assert!(!e.settled(4000, [(Some(10), 4000), (None, 1000)]));
        assert!(e.settled(4000, [(Some(10), 4000), (None, 3000)]));
        assert!(!Election::MDNS.settled(5000, []));
    }
}
