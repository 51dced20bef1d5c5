//! What a site does when things go wrong, on loopback: the fetcher dies
//! halfway, a node joins late, a peer serves corrupted chunks, and a second
//! release shares most of its bytes with the first.

use std::path::Path;
use std::time::{Duration, Instant};

use lanup_protocol::manifest::unique_chunks;
use lanup_protocol::Manifest;

use crate::common::*;
use crate::swarm::LoopSite;

/// The origin's byte counter.
fn served(origin: &OriginProc) -> u64 {
    origin.stats()["bytes_served"].as_u64().expect("count")
}

/// The nodes whose logs say they downloaded from the origin.
fn downloaders(site: &LoopSite) -> Vec<usize> {
    (0..site.states.len())
        .filter(|&i| node_log(&site.states[i]).contains("downloading release from the origin"))
        .collect()
}

/// This node's own PeerId, from its status.
fn peer_id(state: &Path) -> String {
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"])).expect("JSON");
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["self"] == true))
        .and_then(|n| n["peer_id"].as_str())
        .expect("status names this node")
        .to_owned()
}

fn assert_staged(site: &LoopSite, which: &[usize], version: &str, release: &Published) {
    let states: Vec<&Path> = which.iter().map(|&i| site.states[i].as_path()).collect();
    let pending = wait_staged(&states, version, release, Duration::from_secs(90));
    assert!(
        pending.is_empty(),
        "{} nodes did not stage {version}; a log:\n{}",
        pending.len(),
        pending.first().map(|p| node_log(p)).unwrap_or_default()
    );
}

/// How the fetcher is lost halfway through the download.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// SIGKILL: its connections close at once.
    Killed,
    /// SIGSTOP: it stays connected but falls silent.
    Stalled,
    /// SIGSTOP, and SIGCONT once the others have staged (a paused VM that
    /// resumes): it must not fetch again what its stand-in fetched.
    FrozenThenWoken,
}

/// Four nodes fetch a 24 MiB release through a 4 MiB/s uplink; halfway the
/// fetcher is lost. Checks that another node takes over within 10 s and the
/// survivors stage; returns (origin bytes, release size).
/// A site of four (`started` of them running) fetching a release of
/// `mib` MiB through a 4 MiB/s uplink, once `1 / part` of it has crossed.
struct Downloading {
    _tmp: tempfile::TempDir,
    origin: OriginProc,
    release: Published,
    site: LoopSite,
}

impl Downloading {
    fn new(mib: usize, seed: u64, started: usize, part: u64) -> Downloading {
        let tmp = tempfile::tempdir().expect("tempdir");
        let app = tmp.path().join("app");
        write(&app, "bin/app", &pseudo_random(mib << 20, seed));
        write(&app, "etc/app.conf", b"mode = fast\n");
        let www = tmp.path().join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let key = keygen(tmp.path(), "publisher.key");
        let origin = OriginProc::start(&www, Some("4MiB"));
        let release = publish(&app, "1.0", &origin.url, &key, &www);
        let mut site = LoopSite::new(tmp.path(), 4);
        for i in 0..started {
            let cmd = site.command(i, Some(&origin.url), &release.public);
            site.start(i, cmd);
        }
        wait_for(
            "a part of the release to cross the uplink",
            Duration::from_secs(60),
            || served(&origin) >= release.size / part,
        );
        Downloading {
            _tmp: tmp,
            origin,
            release,
            site,
        }
    }
}

fn site_loses_its_fetcher(loss: Loss) -> (u64, u64) {
    let Downloading {
        _tmp,
        origin,
        release,
        mut site,
    } = Downloading::new(24, 41, 4, 2);
    let first = downloaders(&site);
    assert!(
        first.len() == 1,
        "one fetcher at a time: {first:?}; their logs:\n{}",
        first
            .iter()
            .map(|&i| node_log(&site.states[i]))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    let lost = first[0];
    let survivors: Vec<usize> = (0..4).filter(|&i| i != lost).collect();
    let took_over = |site: &LoopSite| -> usize {
        survivors
            .iter()
            .map(|&i| {
                node_log(&site.states[i])
                    .matches("this node is now the site's fetcher")
                    .count()
            })
            .sum()
    };
    // Counted before the loss: a survivor can take over within
    // milliseconds of its fetcher's connection closing.
    let before = took_over(&site);
    match loss {
        Loss::Killed => site.procs[lost] = None, // SIGKILL, then reaped
        Loss::Stalled | Loss::FrozenThenWoken => {
            let pid = site.procs[lost].as_ref().expect("running").0.id();
            let stopped = std::process::Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .expect("kill runs");
            assert!(stopped.success());
        }
    }
    let at_loss = served(&origin);
    let lost_at = Instant::now();
    wait_for("another node to take over", Duration::from_secs(30), || {
        took_over(&site) > before
    });
    let takeover = lost_at.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "the next fetcher took over {takeover:?} after the fetcher was {loss:?}"
    );

    assert_staged(&site, &survivors, "1.0", &release);
    if let Loss::FrozenThenWoken = loss {
        let at_wake = served(&origin);
        let pid = site.procs[lost].as_ref().expect("running").0.id();
        let woken = std::process::Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(woken.success());
        assert_staged(&site, &[lost], "1.0", &release);
        let after = served(&origin) - at_wake;
        assert!(
            after <= 4 * release.manifest_bytes,
            "the woken fetcher took {after} more bytes from the origin; its log:\n{}",
            node_log(&site.states[lost])
        );
    }
    let resumed: Vec<usize> = downloaders(&site)
        .into_iter()
        .filter(|&i| i != lost)
        .collect();
    assert_eq!(resumed.len(), 1, "one survivor resumed: {resumed:?}");
    let total = served(&origin);
    eprintln!(
        "fetcher {loss:?} at {at_loss} of {} bytes; another took over after {takeover:?}; origin served {total} ({:.3} x S)",
        release.size,
        total as f64 / release.size as f64
    );
    (total, release.size + release.manifest_bytes * 10)
}

#[test]
fn the_fetcher_killed_halfway_is_replaced_and_the_site_still_takes_one_copy() {
    let (total, size) = site_loses_its_fetcher(Loss::Killed);
    let limit = (size as f64 * 1.10) as u64;
    assert!(
        total <= limit,
        "origin served {total} bytes for a release of about {size} after the fetcher died (limit {limit})"
    );
}

#[test]
fn a_stalled_fetcher_is_replaced() {
    let (total, size) = site_loses_its_fetcher(Loss::Stalled);
    // The stalled fetcher's socket buffers hold bytes the origin counted as
    // sent; they are lost with it.
    let limit = (size as f64 * 1.5) as u64;
    assert!(
        total <= limit,
        "origin served {total} bytes for a release of about {size} after the fetcher stalled (limit {limit})"
    );
}

#[test]
fn a_frozen_fetcher_that_wakes_fetches_nothing_its_stand_in_fetched() {
    let (total, size) = site_loses_its_fetcher(Loss::FrozenThenWoken);
    let limit = (size as f64 * 1.5) as u64;
    assert!(
        total <= limit,
        "origin served {total} bytes (limit {limit})"
    );
}

#[test]
fn a_late_node_catches_up_from_its_peers_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(6 << 20, 51));
    write(&app, "share/help.txt", b"press any key\n");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, Some("32MiB"));
    let release = publish(&app, "1.0", &origin.url, &key, &www);

    let mut site = LoopSite::new(tmp.path(), 4);
    for i in 0..3 {
        let cmd = site.command(i, Some(&origin.url), &release.public);
        site.start(i, cmd);
    }
    assert_staged(&site, &[0, 1, 2], "1.0", &release);
    let before = served(&origin);
    // The late node has the origin too; it must not need it.
    let cmd = site.command(3, Some(&origin.url), &release.public);
    site.start(3, cmd);
    assert_staged(&site, &[3], "1.0", &release);
    let after = served(&origin);
    // At most a look at the manifest (if the late node's id makes it the
    // fetcher); no release bytes.
    assert!(
        after - before <= release.manifest_bytes,
        "the origin served {} bytes for a node that joined late",
        after - before
    );
    assert!(
        !node_log(&site.states[3]).contains("downloading release from the origin"),
        "the late node downloaded from the origin"
    );
}

/// A node that starts while the fetcher is downloading neither takes the
/// role (whatever its PeerId) nor makes the fetcher pause: chunks in flight
/// are not lost, the uplink carries the release once.
#[test]
fn a_node_joining_mid_download_costs_the_uplink_nothing() {
    let Downloading {
        _tmp,
        origin,
        release,
        mut site,
    } = Downloading::new(12, 53, 3, 3);
    let cmd = site.command(3, Some(&origin.url), &release.public);
    site.start(3, cmd);
    assert_staged(&site, &[0, 1, 2, 3], "1.0", &release);
    let fetchers = downloaders(&site);
    assert_eq!(fetchers.len(), 1, "one fetcher: {fetchers:?}");
    // A newcomer with a lower PeerId takes the role once the download is
    // over, not before.
    let log = node_log(&site.states[fetchers[0]]);
    let finished = log
        .find("download from the origin finished")
        .expect("the fetcher's download finished");
    let gave_up = log.find("another node is the site's fetcher now");
    assert!(
        gave_up.is_none_or(|at| at > finished),
        "the fetcher gave up its role while downloading:\n{log}"
    );
    let total = served(&origin);
    assert!(
        total <= release.size + 4 * release.manifest_bytes,
        "the origin served {total} bytes for a release of {} ({:.3} x S)",
        release.size,
        total as f64 / release.size as f64
    );
}

#[test]
fn a_peer_serving_corrupted_chunks_is_banned_and_nothing_wrong_is_staged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(10 << 20, 61));
    write(&app, "lib/a.so", &pseudo_random(700_000, 62));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, Some("32MiB"));
    let release = publish(&app, "1.0", &origin.url, &key, &www);

    // Node 0 fetches; node 1 holds the release but flips a byte of every
    // chunk it serves. Nodes 2 and 3 join once both hold it, so they have
    // two sources and ask both.
    let mut site = LoopSite::new(tmp.path(), 4);
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    let mut faulty = site.command(1, None, &release.public);
    faulty.env("LANUP_FAULT_CORRUPT_CHUNKS", "1");
    site.start(1, faulty);
    assert_staged(&site, &[0, 1], "1.0", &release);
    let liar = peer_id(&site.states[1]);
    for i in 2..4 {
        let cmd = site.command(i, None, &release.public);
        site.start(i, cmd);
    }
    assert_staged(&site, &[2, 3], "1.0", &release);

    let logs: Vec<String> = [2, 3].iter().map(|&i| node_log(&site.states[i])).collect();
    assert!(
        logs.iter().any(|l| l
            .lines()
            .any(|line| line.contains("bad chunk") && line.contains(&liar))),
        "no node reported the corrupting peer {liar}:\n{}",
        logs.join("\n----\n")
    );
    // Whoever caught it no longer talks to it.
    for (i, log) in [2, 3].iter().zip(&logs) {
        if log.contains(&liar) && log.contains("bad chunk") {
            let peers = run_ok(&["peers", "--state", s(&site.states[*i]), "--json"]);
            assert!(
                !peers.contains(&liar),
                "node {i} still connected to {liar}: {peers}"
            );
        }
    }
    let total = served(&origin);
    let limit = (release.size as f64 * 1.02) as u64 + release.manifest_bytes * 10;
    assert!(
        total <= limit,
        "bad chunks sent the site back to the origin: {total} bytes"
    );
}

#[test]
fn a_delta_release_costs_the_uplink_only_its_new_chunks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    let mut big = pseudo_random(12 << 20, 71);
    write(&app, "bin/app", &big);
    write(&app, "etc/app.conf", b"level = 1\n");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, Some("32MiB"));
    let v1 = publish(&app, "1.0", &origin.url, &key, &www);
    let v1_manifest = std::fs::read(www.join("AutoUpdater.xml")).expect("manifest");

    let mut site = LoopSite::new(tmp.path(), 3);
    for i in 0..3 {
        let cmd = site.command(i, Some(&origin.url), &v1.public);
        site.start(i, cmd);
    }
    assert_staged(&site, &[0, 1, 2], "1.0", &v1);
    let before = served(&origin);

    // Three 64 KiB edits inside the big file, and one new file.
    for at in [1 << 20, 5 << 20, 9 << 20] {
        big[at..at + 65536].copy_from_slice(&pseudo_random(65536, at as u64));
    }
    write(&app, "bin/app", &big);
    write(&app, "share/new.dat", &pseudo_random(256 * 1024, 72));
    let v2 = publish(&app, "2.0", &origin.url, &key, &www);
    for state in &site.states {
        // Only the fetcher polls; the others say so.
        run_ok(&["check", "--state", s(state)]);
    }
    assert_staged(&site, &[0, 1, 2], "2.0", &v2);

    let old = Manifest::parse(&v1_manifest).expect("v1 parses");
    let new = Manifest::parse(&std::fs::read(www.join("AutoUpdater.xml")).expect("v2"))
        .expect("v2 parses");
    let old_chunks = unique_chunks(&old.files);
    let new_bytes: u64 = unique_chunks(&new.files)
        .iter()
        .filter(|(h, _)| !old_chunks.contains_key(*h))
        .map(|(_, size)| size)
        .sum();
    let cost = served(&origin) - before;
    let limit = (new_bytes as f64 * 1.05) as u64 + v2.manifest_bytes * 4;
    assert!(
        cost <= limit,
        "v2 cost {cost} bytes over the uplink; its new chunks are {new_bytes} bytes (limit {limit})"
    );
    // v1's staged copy is gone once v2 is staged; the store keeps only v2.
    wait_for(
        "the older staged release to be removed",
        Duration::from_secs(10),
        || site.states.iter().all(|s| !s.join("staging/1.0").exists()),
    );
    eprintln!(
        "v2: {new_bytes} bytes of new chunks, the uplink carried {cost} ({:.3} x)",
        cost as f64 / new_bytes as f64
    );
}
