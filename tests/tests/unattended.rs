//! A node left alone at a remote site, on loopback: an uplink so slow that
//! one chunk outlasts any fixed timeout, an origin serving wrong bytes, a
//! chunk that rots on disk while its node is down, a peer that offers
//! chunks and never sends them, a runaway control client, and a flood of
//! idle connections. Each asserts what an operator cares about: the
//! release staged with its published hashes, the bytes the origin served,
//! what the status says, and the node's memory and file handles.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::swarm::LoopSite;

fn served(origin: &OriginProc) -> u64 {
    origin.stats()["bytes_served"].as_u64().expect("count")
}

fn requests(origin: &OriginProc) -> u64 {
    origin.stats()["requests"].as_u64().expect("count")
}

/// This node's own row of `lanup status --json` (null while the node is
/// not answering yet).
fn own_row(state: &Path) -> serde_json::Value {
    let out = run(&["status", "--state", s(state), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["self"] == true).cloned())
        .unwrap_or_default()
}

/// A `VmRSS`/`FDSize`-style figure of process `pid`: resident KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A release of `size` pseudo-random bytes (chunks of about 1 MiB), its
/// origin capped at `rate`, and a loopback site of `n` nodes.
fn setup(
    tmp: &Path,
    size: usize,
    rate: Option<&str>,
    n: usize,
) -> (OriginProc, Published, LoopSite) {
    let app = tmp.join("app");
    write(&app, "bin/app", &pseudo_random(size, 71));
    let www = tmp.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp, "publisher.key");
    let origin = OriginProc::start(&www, rate);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    (origin, release, LoopSite::new(tmp, n))
}

#[test]
fn a_chunk_slower_than_any_fixed_timeout_still_arrives_and_crosses_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 256 KiB/s: each ~1 MiB chunk takes about 4 s, four times the stall
    // timeout the node runs with. Only a timeout on progress lets it
    // through; a request cut and restarted would cost the uplink twice.
    let (origin, release, mut site) = setup(tmp.path(), 3 << 20, Some("256KiB"), 1);
    let mut cmd = site.command(0, Some(&origin.url), &release.public);
    cmd.args(["--origin-stall-timeout", "1s"]);
    site.start(0, cmd);
    let pending = wait_staged(&site.state_refs(), "1.0", &release, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "not staged:\n{}",
        node_log(&site.states[0])
    );
    let total = served(&origin);
    eprintln!(
        "slow origin: staged with {total} bytes served for S = {} ({:.4} x S)",
        release.size,
        total as f64 / release.size as f64
    );
    let limit = (release.size as f64 * 1.02) as u64 + release.manifest_bytes;
    assert!(
        total <= limit,
        "origin served {total} bytes for a {}-byte release (limit {limit})",
        release.size
    );
}

#[test]
fn an_origin_serving_wrong_bytes_is_backed_off_and_the_status_says_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (origin, release, mut site) = setup(tmp.path(), 2 << 20, None, 1);
    // The published file changed after signing (same size, other bytes).
    write(&release.www, "bin/app", &pseudo_random(2 << 20, 72));
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    let state = site.states[0].clone();
    wait_for("the refusal in the status", Duration::from_secs(30), || {
        own_row(&state)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("differs from its signed manifest"))
    });
    let first = Instant::now();
    let at_first = requests(&origin);
    std::thread::sleep(Duration::from_secs(16));
    let later = requests(&origin) - at_first;
    let row = own_row(&state);
    let error = row["last_error"].as_str().unwrap_or_default().to_owned();
    // Backing off from 5 s, doubling: at most three more downloads in 16 s
    // (one a second without it).
    assert!(
        later <= 3,
        "{later} more requests to the origin in {:?}; log:\n{}",
        first.elapsed(),
        node_log(&state)
    );
    assert!(error.contains("next try in"), "{error}");
    assert!(
        error.contains("bin/app"),
        "the status names the file: {error}"
    );
    let warnings = node_log(&state).matches("backing off").count();
    eprintln!("corrupting origin: {later} requests in the 16 s after the first refusal, {warnings} WARN lines; status: {error}");
    assert!(
        (1..=4).contains(&warnings),
        "one WARN per backoff step, {warnings} here"
    );
    assert!(!state.join("staging/1.0/bin/app").exists());
}

#[test]
fn a_chunk_rotten_on_the_only_reachable_peer_is_fetched_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (origin, release, mut site) = setup(tmp.path(), 4 << 20, None, 2);
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    let pending = wait_staged(
        &site.state_refs()[..1],
        "1.0",
        &release,
        Duration::from_secs(60),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    // The node stops; one byte of one stored chunk flips on its disk.
    site.procs[0] = None;
    let chunks = site.states[0].join("chunks");
    let rotten = std::fs::read_dir(&chunks)
        .expect("chunk store")
        .flatten()
        .filter(|d| d.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).expect("dir").flatten())
        .map(|e| e.path())
        .next()
        .expect("a stored chunk");
    let mut bytes = std::fs::read(&rotten).expect("chunk");
    bytes[100] ^= 0x40;
    std::fs::write(&rotten, &bytes).expect("rot");
    // `lanup verify --state` finds it, naming the file, and changes nothing.
    let verified = run(&["verify", "--state", s(&site.states[0])]);
    let said = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "{said}");
    assert!(
        said.contains("DAMAGED") && said.contains(rotten.to_str().expect("utf-8")),
        "{said}"
    );
    assert!(rotten.exists());
    let before = served(&origin);

    // Back up, with a newcomer that can reach only it.
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    let cmd = site.command(1, None, &release.public);
    site.start(1, cmd);
    let pending = wait_staged(
        &site.state_refs()[1..],
        "1.0",
        &release,
        Duration::from_secs(60),
    );
    assert!(
        pending.is_empty(),
        "the newcomer did not stage; its log:\n{}\nthe holder's:\n{}",
        node_log(&site.states[1]),
        node_log(&site.states[0])
    );
    assert!(
        node_log(&site.states[0]).contains("damaged on this node's disk"),
        "{}",
        node_log(&site.states[0])
    );
    // Only the rotten chunk (and the manifest) crossed again.
    let again = served(&origin) - before;
    eprintln!(
        "rotten chunk: {again} bytes served again for a {}-byte chunk",
        bytes.len()
    );
    assert!(
        again <= bytes.len() as u64 + 2 * release.manifest_bytes,
        "{again} bytes served after the restart for a {}-byte chunk",
        bytes.len()
    );
    // And the holder's store is whole again.
    let fixed = std::fs::read(&rotten).expect("fetched again");
    let name = rotten.file_name().and_then(|n| n.to_str()).expect("name");
    assert_eq!(blake3::hash(&fixed).to_hex().as_str(), name);
    run_ok(&["verify", "--state", s(&site.states[0])]);
}

#[test]
fn a_runaway_control_line_is_refused_in_bounded_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_origin, release, mut site) = setup(tmp.path(), 1 << 20, None, 1);
    let cmd = site.command(0, None, &release.public);
    site.start(0, cmd);
    let state = site.states[0].clone();
    wait_for("the node's control socket", Duration::from_secs(20), || {
        run(&["status", "--state", s(&state)]).status.success()
    });
    let pid = site.procs[0].as_ref().expect("running").0.id();
    let before = rss_kib(pid);
    let socket = state.join("control.sock");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
                let block = vec![b'x'; 1 << 20];
                // 100 MB with no newline; the node stops reading early.
                for _ in 0..100 {
                    if stream.write_all(&block).is_err() {
                        break;
                    }
                }
                let mut answer = String::new();
                let _ = BufReader::new(&stream).read_line(&mut answer);
                answer
            })
        })
        .collect();
    for client in clients {
        let answer = client.join().expect("client");
        assert!(
            answer.contains("longer than 65536 bytes"),
            "answer: {answer:?}"
        );
        assert!(answer.len() < 1024, "the line is not echoed back");
    }
    let after = rss_kib(pid);
    eprintln!("4 x 100 MB control lines: node RSS {before} KiB before, {after} KiB after");
    assert!(
        after < before + 32 * 1024,
        "RSS went from {before} KiB to {after} KiB"
    );
    run_ok(&["status", "--state", s(&state)]);
}

#[test]
fn a_flood_of_idle_connections_is_shed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_origin, release, mut site) = setup(tmp.path(), 1 << 20, None, 1);
    let cmd = site.command(0, None, &release.public);
    site.start(0, cmd);
    let state = site.states[0].clone();
    wait_for("the node", Duration::from_secs(20), || {
        run(&["status", "--state", s(&state)]).status.success()
    });
    let pid = site.procs[0].as_ref().expect("running").0.id();
    let baseline = open_files(pid);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", site.ports[0])
        .parse()
        .expect("addr");
    // 3,000 TCP connections that never say a word.
    let mut idle = Vec::new();
    for _ in 0..3000 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            idle.push(c);
        }
    }
    assert!(idle.len() > 100, "only {} connections opened", idle.len());
    // Handshakes time out after 10 s; beyond 32 at once none is taken.
    std::thread::sleep(Duration::from_secs(13));
    let held = open_files(pid);
    eprintln!(
        "{} idle connections opened: node holds {held} file handles ({baseline} before)",
        idle.len()
    );
    assert!(
        held < baseline + 40,
        "the node holds {held} file handles ({baseline} before) with {} idle connections open",
        idle.len()
    );
    run_ok(&["status", "--state", s(&state)]);
}

#[test]
fn a_peer_that_offers_chunks_and_never_sends_them_costs_seconds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (origin, release, mut site) = setup(tmp.path(), 8 << 20, None, 3);
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    // Node 1 takes the release like any node, then serves nothing.
    let mut liar = site.command(1, None, &release.public);
    liar.env("LANUP_FAULT_SILENT_CHUNKS", "1");
    site.start(1, liar);
    let pending = wait_staged(
        &site.state_refs()[..2],
        "1.0",
        &release,
        Duration::from_secs(60),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[1]));

    let started = Instant::now();
    let cmd = site.command(2, None, &release.public);
    site.start(2, cmd);
    let pending = wait_staged(
        &site.state_refs()[2..],
        "1.0",
        &release,
        Duration::from_secs(60),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[2]));
    let took = started.elapsed();
    eprintln!("a silent peer among two holders: the newcomer staged 8 MiB in {took:?}");
    let log = node_log(&site.states[2]);
    assert!(
        log.contains("stopped sending chunks it offered"),
        "the newcomer did not give up on the silent peer:\n{log}"
    );
    assert!(took < Duration::from_secs(40), "staging took {took:?}");
}

#[test]
fn a_static_peer_that_was_down_at_first_is_dialled_again_while_others_are_connected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_origin, release, mut site) = setup(tmp.path(), 1 << 20, None, 3);
    // Node 0 knows 1 and 2 by address; 2 is not up yet, so its first dial
    // fails, while 1 connects.
    let cmd = site.command(0, None, &release.public);
    site.start(0, cmd);
    let cmd = site.command(1, None, &release.public);
    site.start(1, cmd);
    let first = site.states[0].clone();
    let peers = move |_: usize| -> usize {
        let out = run(&["peers", "--state", s(&first), "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["peers"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    wait_for("nodes 0 and 1 to meet", Duration::from_secs(20), || {
        peers(0) == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    // Node 2 comes up knowing nobody: only node 0 dialling again joins it.
    let mut lonely = node_command(&site.states[2], None, &release.public, &site.site);
    lonely
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", site.ports[2])])
        .arg("--no-mdns");
    site.start(2, lonely);
    wait_for(
        "node 0 to dial node 2 again",
        Duration::from_secs(20),
        || peers(0) == 2,
    );
}
