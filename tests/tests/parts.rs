//! The node's parts and the risks its shape carried: each test here fails
//! without the fix it names.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::swarm::free_port;

fn start(state: &Path, publisher: &str, log: &Path) -> Child {
    let mut cmd = node_command(state, None, publisher, "one-state");
    cmd.args([
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        "--no-mdns",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::from(std::fs::File::create(log).expect("log")));
    cmd.spawn().expect("node starts")
}

/// Two nodes started at once on one state directory: the state
/// directory's lock, taken before recovery and the control channel, lets
/// one run and stops the other with the reason; the one that runs keeps
/// its channel. (Without the lock both passed the check for a live node,
/// and the second either failed to bind, or removed the first one's
/// socket as stale.)
#[test]
fn two_nodes_started_at_once_on_one_state_directory_one_runs_and_the_other_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, publisher) = keygen(tmp.path(), "publisher.key");
    for round in 0..8 {
        let state = tmp.path().join(format!("state-{round}"));
        let logs = [
            tmp.path().join(format!("{round}-a.log")),
            tmp.path().join(format!("{round}-b.log")),
        ];
        let mut nodes = [
            start(&state, &publisher, &logs[0]),
            start(&state, &publisher, &logs[1]),
        ];
        let deadline = Instant::now() + Duration::from_secs(20);
        let refused = loop {
            let exited: Vec<usize> = (0..2)
                .filter(|&i| nodes[i].try_wait().ok().flatten().is_some())
                .collect();
            if !exited.is_empty() {
                std::thread::sleep(Duration::from_millis(500));
                break exited;
            }
            assert!(Instant::now() < deadline, "round {round}: both nodes run");
            std::thread::sleep(Duration::from_millis(20));
        };
        let survivors: Vec<usize> = (0..2)
            .filter(|&i| nodes[i].try_wait().ok().flatten().is_none())
            .collect();
        let said: Vec<String> = refused
            .iter()
            .map(|&i| std::fs::read_to_string(&logs[i]).unwrap_or_default())
            .collect();
        assert_eq!(
            (refused.len(), survivors.len()),
            (1, 1),
            "round {round}: {said:?}"
        );
        assert!(
            said[0].contains(&format!("another node is running on {}", state.display())),
            "round {round}: the second node says why: {}",
            said[0]
        );
        // The one that runs answers on its channel (once it has started).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = run(&["status", "--state", s(&state), "--json"]);
            if status.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the running node has no channel: {}",
                String::from_utf8_lossy(&status.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for n in &mut nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

/// Whether process `pid` still runs (a zombie does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

/// A health (or switchover) command that starts a child and exits, or
/// that hangs past its timeout: the child does not outlive it. (Only the
/// command itself was killed, and only on a timeout.)
#[test]
fn a_health_command_leaves_no_process_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = lanup_node::app::App::new(
        lanup_node::config::AppConfig {
            name: Some("nothing".into()),
            install_dir: tmp.path().to_owned(),
            start: None,
            stop_timeout: Duration::from_secs(1),
            health_after: Duration::ZERO,
            health_command: None,
            health_timeout: Duration::from_secs(5),
            apply: lanup_node::config::ApplyPolicy::OnRollout,
            pid_file: None,
            service: None,
        },
        tmp.path().join("app.log"),
    );
    let child_of = |script: &str, timeout: Duration| {
        let argv: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
        let outcome = app.run_bounded(&argv, timeout, "health_timeout");
        let pid: i32 = std::fs::read_to_string(tmp.path().join("child.pid"))
            .expect("the command wrote its child's pid")
            .trim()
            .parse()
            .expect("a pid");
        std::fs::remove_file(tmp.path().join("child.pid")).expect("rm");
        (outcome, pid)
    };
    let gone = |pid: i32| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    };
    let (outcome, pid) = child_of(
        "sleep 300 & echo $! > child.pid; exit 0",
        Duration::from_secs(5),
    );
    assert_eq!(outcome, Ok(()));
    assert!(gone(pid), "the healthy command's child {pid} still runs");
    let (outcome, pid) = child_of(
        "sleep 300 & echo $! > child.pid; sleep 300",
        Duration::from_millis(500),
    );
    assert!(outcome.is_err_and(|e| e.contains("no answer")), "timed out");
    assert!(gone(pid), "the hung command's child {pid} still runs");
}

/// A peer floods the site with gossip while the site takes up a release:
/// the fetcher still pings its watchdog every second, fetches the release
/// (its duty) and says so in its heartbeat, and no other node takes over;
/// and the flood of forged commands is logged once, not once per command
/// (each forged id used to get its own warning and audit entry: tens of
/// thousands in seconds).
#[test]
fn a_gossip_flood_leaves_the_watchdog_the_heartbeat_and_the_fetchers_duty_on_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 81));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let v1 = publish(&app, "1.0", &origin.url, &key, &www);
    let (_, admin) = keygen(tmp.path(), "admin.key");
    let mut site = LoopSite::new(tmp.path(), 3);
    let flood = |i: usize| tmp.path().join(format!("flood-{i}"));
    let sockets: Vec<std::os::unix::net::UnixDatagram> = (0..3)
        .map(|i| {
            let path = tmp.path().join(format!("notify-{i}.sock"));
            let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
            let mut cmd = site.command(i, Some(&origin.url), &v1.public);
            cmd.args(["--trust-admin", &admin])
                .env("NOTIFY_SOCKET", &path)
                // Pings every heartbeat (1 s).
                .env("WATCHDOG_USEC", "1000000")
                .env("LANUP_FAULT_GOSSIP_FLOOD", flood(i));
            site.start(i, cmd);
            socket
        })
        .collect();
    let pending = wait_staged(&site.state_refs(), "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "1.0 not staged on {pending:?}");
    let fetcher = (0..3)
        .find(|&i| node_log(&site.states[i]).contains("downloading release from the origin"))
        .expect("a fetcher");
    let (flooder, watcher) = ((fetcher + 1) % 3, (fetcher + 2) % 3);

    write(tmp.path(), &format!("flood-{flooder}"), b"");
    wait_for("the flood to start", Duration::from_secs(10), || {
        node_log(&site.states[flooder]).contains("flooding the site")
    });
    std::thread::sleep(Duration::from_secs(2));
    write(&app, "bin/app", &pseudo_random(300_000, 82));
    let v2 = publish(&app, "2.0", &origin.url, &key, &www);
    let _ = crate::service::messages(&sockets[fetcher], Duration::from_millis(1));
    let asked = Instant::now();
    let said = run(&["check", "--state", s(&site.states[watcher])]);
    eprintln!(
        "check took {:?}: {}{}",
        asked.elapsed(),
        String::from_utf8_lossy(&said.stdout),
        String::from_utf8_lossy(&said.stderr)
    );

    // The watchdog: a ping about every second through the flood.
    let mut pings = vec![asked];
    while asked.elapsed() < Duration::from_secs(12) {
        let got = crate::service::messages(&sockets[fetcher], Duration::from_millis(100));
        pings.extend(
            got.iter()
                .filter(|m| *m == "WATCHDOG=1")
                .map(|_| Instant::now()),
        );
    }
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    eprintln!("{} pings in 12 s, longest gap {longest:?}", pings.len() - 1);
    assert!(
        pings.len() > 8 && longest < Duration::from_millis(2500),
        "the flooded fetcher's watchdog pings: {} in 12 s, longest gap {longest:?}",
        pings.len() - 1
    );

    // The duty and the heartbeat: the fetcher took 2.0 up and the
    // watcher heard it say so, while the flood went on.
    let pending = wait_staged(
        &[&site.states[fetcher], &site.states[watcher]],
        "2.0",
        &v2,
        Duration::from_secs(30),
    );
    assert!(
        pending.is_empty(),
        "2.0 not staged on {pending:?} under the flood"
    );
    let fetcher_id = crate::apply::own_status(&site.states[fetcher])["peer_id"].clone();
    wait_for(
        "the watcher to hear the fetcher staged 2.0",
        Duration::from_secs(10),
        || {
            crate::rollout::site_status(&site.states[watcher])["nodes"]
                .as_array()
                .is_some_and(|rows| {
                    rows.iter().any(|r| {
                        r["peer_id"] == fetcher_id && r["staged_version"].as_str() == Some("2.0")
                    })
                })
        },
    );
    assert!(
        flood(flooder).exists() && node_log(&site.states[flooder]).contains("flooding the site"),
        "the flood went on"
    );
    assert_eq!(
        site.downloaders(),
        1,
        "another node took the fetcher's duty over"
    );
    // Thousands of forged commands a second, from one peer: logged once
    // (with its reason), not once each.
    let flooded: u64 = node_log(&site.states[flooder])
        .lines()
        .filter_map(|l| l.split("sent=").nth(1)?.trim().parse::<u64>().ok())
        .sum();
    for i in [fetcher, watcher] {
        let log = node_log(&site.states[i]);
        let refused = log
            .lines()
            .filter(|l| l.contains("refused rollout command"))
            .count();
        assert!(
            flooded > 5_000 && (1..=2).contains(&refused),
            "node {i} logged {refused} refusals of the {flooded} forged commands"
        );
        assert!(
            log.contains("does not match the command"),
            "the reason is said"
        );
    }
}
