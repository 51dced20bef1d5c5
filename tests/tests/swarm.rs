//! A site on loopback: one `lanup origin` and five `lanup node` processes
//! that know each other by static address. Exactly one of them downloads the
//! release; all stage it with the published hashes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

pub(crate) use crate::common::{free_port, LoopSite};

#[test]
fn five_nodes_stage_a_release_that_crossed_the_uplink_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(5 * 1024 * 1024, 21));
    write(&app, "lib/data.bin", &pseudo_random(1_500_000, 22));
    write(&app, "etc/app.conf", b"port = 1\n");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, Some("32MiB"));
    let release = publish(&app, "1.0", &origin.url, &key, &www);

    let mut site = LoopSite::new(tmp.path(), 5);
    for i in 0..5 {
        let cmd = site.command(i, Some(&origin.url), &release.public);
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &release, Duration::from_secs(90));
    assert!(
        pending.is_empty(),
        "{} of 5 nodes did not stage; first node's log:\n{}",
        pending.len(),
        node_log(&site.states[0])
    );
    let downloaders = site.downloaders();
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    let limit = (release.size as f64 * 1.02) as u64 + release.manifest_bytes * 10;
    assert!(
        served <= limit,
        "origin served {served} bytes for a {}-byte release (limit {limit}); {downloaders} nodes downloaded",
        release.size
    );
    assert!(downloaders >= 1, "no node logged its download");
    let status = wait_status_staged(&site.states[0], 5, "1.0", Duration::from_secs(5));
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 5, "{status}");
    for n in nodes {
        for field in [
            "peer_id",
            "installed_version",
            "state",
            "staged_version",
            "bytes_have",
            "bytes_total",
            "origin_bytes",
            "last_seen_ms",
        ] {
            assert!(n.get(field).is_some(), "status lacks {field}: {n}");
        }
        assert_eq!(n["state"], "staged", "{n}");
        assert_eq!(n["staged_version"], "1.0", "{n}");
    }
}

/// Node 0 knows node 1 by address and dials it before node 1 listens;
/// node 1 knows no peer. Node 0 dials again within the election's grace,
/// so the site elects one fetcher and one copy crosses the uplink (a
/// redial only after 5 s let each node fetch alone).
#[test]
fn a_static_peer_started_a_moment_later_is_dialled_again_before_the_election() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(2 * 1024 * 1024, 41));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);

    let mut site = LoopSite::new(tmp.path(), 2);
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    // Node 0's first dial is refused: nothing listens at node 1's port.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node_log(&site.states[0]).contains("listening for peers") {
        assert!(Instant::now() < deadline, "node 0 did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut cmd = node_command(
        &site.states[1],
        Some(&origin.url),
        &release.public,
        &site.site,
    );
    cmd.args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", site.ports[1])])
        .arg("--no-mdns");
    site.start(1, cmd);

    let pending = wait_staged(&site.state_refs(), "1.0", &release, Duration::from_secs(60));
    assert!(pending.is_empty(), "not staged: {pending:?}");
    let downloaders = site.downloaders();
    // One copy: two nodes fetching alone took two. (Node 1 may still take
    // the role over from node 0 as it joins, and the rest of the release
    // with it, which costs at most a chunk cut off in flight.)
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    assert!(
        served < release.size * 3 / 2,
        "origin served {served} bytes for a {}-byte release; {downloaders} nodes downloaded",
        release.size
    );
}

#[test]
fn lanup_check_on_any_node_has_the_site_pick_up_a_release() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(600_000, 31));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let v1 = publish(&app, "1.0", &origin.url, &key, &www);
    // Polling hourly (as every test node): only a check makes the site
    // look before then.
    let mut site = LoopSite::new(tmp.path(), 3);
    for i in 0..3 {
        let cmd = site.command(i, Some(&origin.url), &v1.public);
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let own = |state: &Path| -> serde_json::Value {
        let status: serde_json::Value =
            serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"]))
                .expect("status JSON");
        status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["self"] == true).cloned())
            .expect("own row")
    };
    let others: Vec<&PathBuf> = site
        .states
        .iter()
        .filter(|state| own(state)["fetcher"] == false)
        .collect();
    assert_eq!(others.len(), 2, "one fetcher in three nodes");
    // Twice, from each node that is not the fetcher.
    for (round, version, seed) in [(0, "2.0", 32), (1, "3.0", 33)] {
        write(&app, "bin/app", &pseudo_random(600_000, seed));
        let next = publish(&app, version, &origin.url, &key, &www);
        let said = run_ok(&["check", "--state", s(others[round])]);
        assert!(
            said.contains("the site's fetcher") && said.contains("polls the origin now"),
            "{said}"
        );
        let pending = wait_staged(&site.state_refs(), version, &next, Duration::from_secs(30));
        assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    }
    // The fetcher goes away; a check made at once still reaches the site's
    // origin, through the node that stands in (this one or the other).
    let fetcher = (0..3)
        .find(|&i| !others.contains(&&site.states[i]))
        .expect("the fetcher");
    let survivors: Vec<PathBuf> = others.iter().map(|p| p.to_path_buf()).collect();
    site.procs[fetcher] = None;
    write(&app, "bin/app", &pseudo_random(600_000, 34));
    let next = publish(&app, "4.0", &origin.url, &key, &www);
    // The stand-in may have found the release already as it took over (it
    // then polls again once that download ends).
    let said = run_ok(&["check", "--state", s(&survivors[0])]);
    assert!(said.contains("polls the origin"), "{said}");
    let survivors: Vec<&Path> = survivors.iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&survivors, "4.0", &next, Duration::from_secs(30));
    assert!(pending.is_empty(), "{}", node_log(survivors[0]));
}

/// A fetcher that stops answering (a frozen machine) does not leave
/// `lanup check` hanging or failing: the node asks again and, once the site
/// has passed over the silent fetcher, the stand-in polls.
#[test]
fn lanup_check_while_the_fetcher_is_frozen_reaches_the_stand_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 35));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let v1 = publish(&app, "1.0", &origin.url, &key, &www);
    let mut site = LoopSite::new(tmp.path(), 2);
    for i in 0..2 {
        let cmd = site.command(i, Some(&origin.url), &v1.public);
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let fetcher = (0..2)
        .find(|&i| node_log(&site.states[i]).contains("downloading release from the origin"))
        .expect("a fetcher");
    let other = 1 - fetcher;
    let pid = site.procs[fetcher].as_ref().expect("running").0.id();
    let stopped = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    write(&app, "bin/app", &pseudo_random(300_000, 36));
    let v2 = publish(&app, "2.0", &origin.url, &key, &www);
    let asked = std::time::Instant::now();
    let said = run_ok(&["check", "--state", s(&site.states[other])]);
    eprintln!("check took {:?}: {said}", asked.elapsed());
    assert!(said.contains("polls the origin"), "{said}");
    let pending = wait_staged(
        &[site.states[other].as_path()],
        "2.0",
        &v2,
        Duration::from_secs(30),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[other]));
    // Woken, so that the site's teardown stops it like any other node.
    let _ = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
}
