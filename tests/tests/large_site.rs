//! A large site on loopback: 48 `lanup node` processes, each knowing only
//! two bootstrap nodes by address (as a site behind a router without
//! multicast). One fetcher, one copy from the origin, every node in every
//! node's `lanup status`, and at rest a cost per node that does not grow
//! with the site (checked against a generous bound: the test watches the
//! order of growth, not the machine). Also: a node restarted where no
//! multicast and no static peer would find anyone dials the peers it knew.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

fn status(state: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"])).expect("status JSON")
}

/// Mean idle CPU per node, in percent of one core, that a site of 48 must
/// stay under. Measured on the build machine: 0.9 to 1.1 % here (debug
/// build, with another test running); `tests/bench/idle.sh` (release)
/// gave 0.94 % at 32 and at 64 nodes, against 2.16 % and 3.02 % for a
/// heartbeat a second passed on to every peer, which grows with the site.
const IDLE_CPU_BOUND: f64 = 2.0;

#[test]
fn a_site_of_48_hears_every_node_fetches_once_and_rests_quietly() {
    const N: usize = 48;
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(400_000, 48));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);

    // The site forms first, then the release is published and the
    // fetcher asked to poll (a site of 48 starting on two cores with a
    // release already waiting can elect two fetchers for a moment: the
    // cold start is measured apart).
    let mut site = LoopSite::new(tmp.path(), N);
    for i in 0..N {
        let bootstraps: Vec<usize> = [0, 1].into_iter().filter(|&j| j != i).collect();
        let cmd = site.command_peering(i, &bootstraps, Some(&origin.url), &key.1);
        site.start(i, cmd);
    }
    wait_for("node 0 to hear all 48", Duration::from_secs(120), || {
        status(&site.states[0])["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == N)
    });
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    // Asked on a bootstrap node: it is connected to the fetcher.
    run_ok(&["check", "--state", s(&site.states[0])]);
    let pending = wait_staged(
        &site.state_refs(),
        "1.0",
        &release,
        Duration::from_secs(240),
    );
    assert!(
        pending.is_empty(),
        "{} of {N} nodes did not stage",
        pending.len()
    );
    assert_eq!(site.downloaders(), 1, "one fetcher for the site");
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    let limit = (release.size as f64 * 1.02) as u64 + release.manifest_bytes * 10;
    assert!(
        served <= limit,
        "origin served {served} bytes for a {}-byte release (limit {limit})",
        release.size
    );

    // Every node is in the status of a bootstrap node, of a node that
    // knows only the bootstraps, and of the last node started.
    for i in [0, 7, N - 1] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = status(&site.states[i]);
            let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
            let staged = nodes
                .iter()
                .filter(|n| n["staged_version"] == "1.0")
                .count();
            if nodes.len() == N && staged == N {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} sees {} nodes, {staged} staged; expected {N}",
                nodes.len()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    // The table of a site this large is a summary; --all lists everyone.
    let table = run_ok(&["status", "--state", s(&site.states[0])]);
    assert!(table.contains(&format!("{N} staged 1.0")), "{table}");
    // At most 40 rows: the nodes that stand out (an origin error each
    // node met before the release was published counts).
    assert!(table.lines().count() <= 40 + 6, "{table}");
    let all = run_ok(&["status", "--state", s(&site.states[0]), "--all"]);
    assert!(all.lines().count() > N, "{all}");

    // At rest: the CPU of every node over 20 s, after 10 s to settle.
    std::thread::sleep(Duration::from_secs(10));
    let pids: Vec<u32> = site
        .procs
        .iter()
        .map(|p| p.as_ref().expect("running").0.id())
        .collect();
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let secs = measured.elapsed().as_secs_f64();
    let used: Vec<u64> = pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| cpu_ticks(p).saturating_sub(*b))
        .collect();
    let hz = clock_ticks_per_second() as f64;
    let mean = used.iter().sum::<u64>() as f64 * 100.0 / (hz * secs * N as f64);
    let busiest = *used.iter().max().unwrap_or(&0) as f64 * 100.0 / (hz * secs);
    eprintln!("idle at {N} nodes: {mean:.2} % of a core per node, busiest {busiest:.2} %");
    assert!(
        mean < IDLE_CPU_BOUND,
        "a site of {N} at rest costs each node {mean:.2} % of a core (bound {IDLE_CPU_BOUND} %); busiest {busiest:.2} %"
    );
    // And it still hears everyone after resting past several keep-alives.
    let st = status(&site.states[N / 2]);
    assert_eq!(st["nodes"].as_array().map_or(0, Vec::len), N, "{st}");
}

/// Node 1 knows node 0 by address; node 0 knows no one (no static peer,
/// no multicast). Node 0 is restarted: it dials node 1 from memory, hears
/// the site, and a release published while it was away is fetched once.
#[test]
fn a_restarted_node_without_multicast_or_static_peers_dials_the_peers_it_knew() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 61));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let v1 = publish(&app, "1.0", &origin.url, &key, &www);
    let mut site = LoopSite::new(tmp.path(), 2);
    // Node 1 knows node 0; node 0 knows no one.
    let command = |site: &LoopSite, i: usize| {
        let peers: &[usize] = if i == 1 { &[0] } else { &[] };
        site.command_peering(i, peers, Some(&origin.url), &v1.public)
    };
    for i in 0..2 {
        let cmd = command(&site, i);
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let kept = site.states[0].join("peers.json");
    // Written within seconds of the first peer connecting.
    wait_for("node 0 to keep its peers", Duration::from_secs(15), || {
        kept.exists()
    });
    site.procs[0] = None;
    let text = std::fs::read_to_string(&kept).expect("node 0 kept its peers");
    assert!(
        text.contains(&format!("/tcp/{}", site.ports[1])),
        "peers.json names node 1's address: {text}"
    );

    // A new release while node 0 is away; node 1 stages it.
    write(&app, "bin/app", &pseudo_random(300_000, 62));
    let v2 = publish(&app, "2.0", &origin.url, &key, &www);
    run_ok(&["check", "--state", s(&site.states[1])]);
    let pending = wait_staged(
        &[site.states[1].as_path()],
        "2.0",
        &v2,
        Duration::from_secs(60),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[1]));
    let before = origin.stats()["bytes_served"].as_u64().expect("count");

    // Node 0 again, still with no static peer: it finds node 1 from
    // memory and takes 2.0 from it, not from the origin.
    std::fs::rename(
        site.states[0].with_extension("log"),
        site.states[0].with_extension("log.1"),
    )
    .expect("keep the first log");
    let cmd = command(&site, 0);
    site.start(0, cmd);
    let pending = wait_staged(
        &[site.states[0].as_path()],
        "2.0",
        &v2,
        Duration::from_secs(60),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let log = node_log(&site.states[0]);
    assert!(log.contains("dialling the peers this node knew"), "{log}");
    assert!(
        !log.contains("downloading release from the origin"),
        "{log}"
    );
    let after = origin.stats()["bytes_served"].as_u64().expect("count");
    assert!(
        after - before < v2.size / 10,
        "the restarted node took {} bytes from the origin for a {}-byte release",
        after - before,
        v2.size
    );
}
