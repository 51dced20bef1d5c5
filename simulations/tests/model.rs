//! The simulator against what can be worked out by hand: the lower bound in
//! the trivial cases, one copy over the uplink, takeover after the
//! fetcher dies, bad peers banned, deltas.

use lanup_simulations::{bound_s, simulate_fleet, simulate_site, SiteEvent, SiteModel};

const S: u64 = 64 << 20;

/// A site with nothing but the transfers: no latency, no WAN round trip,
/// no polling delay, instant staging.
fn ideal(nodes: usize) -> SiteModel {
    SiteModel {
        nodes,
        size: S,
        uplink: 2e6,
        lan_up: f64::INFINITY,
        lan_down: f64::INFINITY,
        latency: 0,
        wan_rtt: 0,
        have_interval: 0,
        stage_rate: f64::INFINITY,
        ..SiteModel::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[test]
fn one_node_takes_exactly_s_over_w() {
    let m = SiteModel {
        lan_up: 125e6,
        lan_down: 125e6,
        ..ideal(1)
    };
    let r = simulate_site(&m, 7);
    assert_eq!(r.uplink_bytes, S);
    assert!(
        close(r.staged_s, bound_s(&m)),
        "{} s against the bound {} s",
        r.staged_s,
        bound_s(&m)
    );
    assert!(close(bound_s(&m), S as f64 / 2e6));
}

#[test]
fn with_an_infinite_lan_a_site_of_any_size_takes_exactly_s_over_w() {
    for nodes in [2, 8, 20] {
        let m = ideal(nodes);
        let r = simulate_site(&m, nodes as u64);
        assert_eq!(r.uplink_bytes, S, "{nodes} nodes: one copy");
        assert_eq!(r.staged_nodes, nodes);
        assert!(
            close(r.staged_s, S as f64 / 2e6),
            "{nodes} nodes: {} s",
            r.staged_s
        );
    }
}

#[test]
fn a_real_lan_stays_near_the_bound_and_far_below_naive() {
    let m = SiteModel {
        nodes: 20,
        ..SiteModel::default()
    };
    let r = simulate_fleet(&m, 4, 3);
    assert_eq!(r.uplink_bytes_max, S, "one copy per site");
    assert!(r.staged_p99_s >= r.bound_s, "never better than the bound");
    assert!(
        r.staged_p99_s < 1.2 * r.bound_s,
        "{} s against the bound {} s",
        r.staged_p99_s,
        r.bound_s
    );
    assert!(r.naive_s > 15.0 * r.staged_p50_s);
}

#[test]
fn when_the_fetcher_dies_another_node_takes_over_and_every_survivor_stages() {
    let m = SiteModel {
        events: vec![SiteEvent::FetcherDies { at: 15_000_000_000 }],
        ..SiteModel::default()
    };
    let r = simulate_site(&m, 11);
    assert_eq!(r.fetchers.len(), 2, "{:?}", r.fetchers);
    let (first, second) = (r.fetchers[0], r.fetchers[1]);
    assert_ne!(first.1, second.1, "another node");
    // Heartbeats stop at the death; the others drop it from the election
    // once it is silent for 5 s, at their next heartbeat.
    assert!(
        second.0 > 15.0 && second.0 < 15.0 + 5.0 + 1.5,
        "took over at {} s",
        second.0
    );
    assert_eq!((r.live_nodes, r.staged_nodes), (7, 7));
    // What the dead fetcher had not passed on yet is fetched again.
    assert!(
        r.uplink_bytes >= S && r.uplink_bytes < S + S / 5,
        "{}",
        r.uplink_bytes
    );
}

/// A LAN barely faster than the uplink, so the fetcher alone cannot serve
/// everyone and peers take chunks from each other; one of them is bad.
fn slow_lan_with_a_bad_peer() -> SiteModel {
    SiteModel {
        lan_up: 3e6,
        lan_down: 3e6,
        events: vec![SiteEvent::BadPeers { nodes: 1 }],
        ..SiteModel::default()
    }
}

#[test]
fn a_peer_serving_bad_chunks_is_banned_and_the_site_still_stages() {
    let r = simulate_site(&slow_lan_with_a_bad_peer(), 5);
    assert!(r.bans > 0, "{r:?}");
    // The bad peer is banned by each node at its first bad chunk.
    assert!(r.bans <= 7 * 4, "{r:?}");
    assert_eq!(r.staged_nodes, 8);
    assert_eq!(r.uplink_bytes, S);
}

#[test]
fn a_fetcher_serving_bad_chunks_is_banned_and_another_node_fetches() {
    // Over many sites the bad node is sometimes the fetcher: each node that
    // banned it counts it out of the election, so the site still stages.
    let r = simulate_fleet(&slow_lan_with_a_bad_peer(), 30, 9);
    assert_eq!(r.unfinished_sites, 0, "{r:?}");
    assert!(r.uplink_bytes_max < 3 * S, "{r:?}");
}

#[test]
fn late_joiners_and_deltas() {
    let m = SiteModel {
        events: vec![SiteEvent::Join {
            at: 60_000_000_000,
            nodes: 2,
        }],
        ..SiteModel::default()
    };
    let r = simulate_site(&m, 2);
    assert_eq!(r.staged_nodes, 10);
    assert_eq!(r.uplink_bytes, S, "the late nodes take it from their peers");
    let delta = SiteModel {
        shared: 0.9,
        ..SiteModel::default()
    };
    let r = simulate_site(&delta, 2);
    assert!(
        r.uplink_bytes < S / 5 && r.uplink_bytes > S / 20,
        "{} bytes for a 10% delta",
        r.uplink_bytes
    );
}

#[test]
fn a_node_joining_mid_download_never_idles_the_uplink() {
    // 64 MiB at 2 MB/s: the download runs from about 0 to 34 s; a node
    // joins at 10 s. Whatever its id (over several seeds it is the lowest
    // of the site at least once), the running download goes on.
    let base = SiteModel {
        nodes: 4,
        ..SiteModel::default()
    };
    let joined = SiteModel {
        events: vec![SiteEvent::Join {
            at: 10_000_000_000,
            nodes: 1,
        }],
        ..base.clone()
    };
    for seed in 0..8 {
        let alone = simulate_site(&base, seed);
        let r = simulate_site(&joined, seed);
        assert_eq!(r.staged_nodes, 5, "seed {seed}");
        assert_eq!(r.uplink_bytes, S, "seed {seed}: one copy, nothing cut off");
        assert!(
            r.staged_s <= alone.staged_s + 0.5,
            "seed {seed}: {} s with the joiner, {} s without",
            r.staged_s,
            alone.staged_s
        );
    }
}

#[test]
fn patches_take_their_share_of_the_uplink_and_peers_still_move_whole_chunks() {
    let plain = ideal(4);
    let patched = SiteModel {
        wire: 0.1,
        lan_up: 125e6,
        lan_down: 125e6,
        ..ideal(4)
    };
    let r = simulate_site(&patched, 7);
    // Every chunk crosses once, at a tenth of its size.
    assert!(
        (r.uplink_bytes as f64 - S as f64 * 0.1).abs() <= 2.0,
        "{} bytes over the uplink",
        r.uplink_bytes
    );
    assert_eq!(r.staged_nodes, 4);
    // The uplink was the bound; now it is a tenth of it.
    assert!(bound_s(&patched) < bound_s(&plain) / 5.0);
    assert!(r.staged_s < simulate_site(&plain, 7).staged_s / 5.0);
}
