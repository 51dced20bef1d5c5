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
