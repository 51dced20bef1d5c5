//! When a node's heartbeat goes out, and how long its silence is borne.
//!
//! A node says something when it has something to say: a heartbeat goes out
//! within [`CHANGE_GAP_MS`] of a change the site must hear of (its state,
//! its release, an apply's step, an error), and otherwise only as a
//! keep-alive: once a second while it fetches from the origin (the site
//! watches that it makes progress), each second or a little slower while it
//! takes a release from its peers or applies one, and every ten seconds or
//! more at rest. The keep-alives of a large site are spread out further, so
//! that the whole site sends a bounded number a second whatever its size
//! ([`SITE_AT_REST`], [`SITE_AT_WORK`]). Each heartbeat says how soon the
//! next is due; its receivers count the sender as gone once that has passed
//! twice over ([`silent_after_ms`]). Pure: the node and the simulator use
//! the same rules.

use crate::election::HEARTBEAT_MS;

/// The least time between two heartbeats of one node: changes within it go
/// out together.
pub const CHANGE_GAP_MS: u64 = 50;
/// A node at rest sends a keep-alive at least this often ...
pub const AT_REST_MS: u64 = 10_000;
/// ... and at most this seldom (its receivers wait twice as long; pings
/// close the connection of a peer that stopped answering sooner).
pub const AT_REST_MAX_MS: u64 = 120_000;
/// Keep-alives a whole site at rest sends a second, at most.
pub const SITE_AT_REST: u64 = 4;
/// Keep-alives a whole site at work sends a second beyond one a second
/// per node (a site of more than this many nodes).
pub const SITE_AT_WORK: u64 = 32;
/// A node heard from at a heartbeat a second counts as gone after this.
pub const SILENT_MS: u64 = 5_000;

/// What a node is doing, as its cadence sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doing {
    /// It fetches from the origin: the site watches its progress.
    Downloading,
    /// It takes a release from its peers, or applies one.
    AtWork,
    /// Nothing moves.
    AtRest,
}

/// How soon a node's next heartbeat is due if nothing changes, in ms, at a
/// site of `site_nodes` live nodes (itself included).
pub fn every_ms(doing: Doing, site_nodes: u64) -> u64 {
    let site = site_nodes.max(1);
    match doing {
        Doing::Downloading => HEARTBEAT_MS,
        Doing::AtWork => HEARTBEAT_MS.max(site * 1000 / SITE_AT_WORK),
        Doing::AtRest => AT_REST_MS
            .max(site * 1000 / SITE_AT_REST)
            .min(AT_REST_MAX_MS),
    }
}

/// How long after a heartbeat that named cadence `every_ms` its sender
/// counts as gone: [`SILENT_MS`] for one sent each second, twice its cadence
/// and two seconds more for a slower one. A cadence above
/// [`AT_REST_MAX_MS`] is taken as that: a peer cannot buy itself a long
/// life.
pub fn silent_after_ms(every_ms: u64) -> u64 {
    SILENT_MS.max(every_ms.min(AT_REST_MAX_MS) * 2 + 2_000)
}

/// Keep-alives a site of `site_nodes` nodes all `doing` the same sends a
/// second.
pub fn site_rate(doing: Doing, site_nodes: u64) -> f64 {
    site_nodes as f64 * 1000.0 / every_ms(doing, site_nodes) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_at_rest_sends_a_bounded_number_of_keep_alives_whatever_its_size() {
        assert_eq!(every_ms(Doing::AtRest, 8), AT_REST_MS);
        assert!((site_rate(Doing::AtRest, 8) - 0.8).abs() < 1e-9);
        for n in [40, 64, 128, 256, 480] {
            let rate = site_rate(Doing::AtRest, n);
            assert!(rate <= SITE_AT_REST as f64 + 1e-9, "{n} nodes: {rate}/s");
        }
        // Beyond 480 nodes the longest keep-alive caps the spread.
        assert_eq!(every_ms(Doing::AtRest, 500), AT_REST_MAX_MS);
        assert!(site_rate(Doing::AtRest, 1000) < 8.4);
    }

    #[test]
    fn a_fetcher_beats_each_second_and_a_large_site_at_work_spreads_out() {
        assert_eq!(every_ms(Doing::Downloading, 500), HEARTBEAT_MS);
        assert_eq!(every_ms(Doing::AtWork, 16), HEARTBEAT_MS);
        assert_eq!(every_ms(Doing::AtWork, 64), 2_000);
        assert!(site_rate(Doing::AtWork, 500) <= SITE_AT_WORK as f64 + 1e-9);
    }

    #[test]
    fn silence_is_borne_twice_the_cadence_and_never_more_than_the_cap_allows() {
        assert_eq!(silent_after_ms(HEARTBEAT_MS), SILENT_MS);
        assert_eq!(silent_after_ms(10_000), 22_000);
        assert_eq!(silent_after_ms(u64::MAX), AT_REST_MAX_MS * 2 + 2_000);
    }
}
