//! lanup as a system service: the unit file systemd would load, and the
//! node's side of `Type=notify` against a notify socket of the test's own
//! (what systemd would pass in `NOTIFY_SOCKET`).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{keygen, lanup_bin, node_command, s, Proc};

/// Datagrams that arrive on `socket` within `wait`.
pub(crate) fn messages(socket: &UnixDatagram, wait: Duration) -> Vec<String> {
    messages_until(socket, wait, |_| false)
}

/// Datagrams that arrive on `socket` within `wait`, up to the first one
/// `last` accepts.
fn messages_until(
    socket: &UnixDatagram,
    wait: Duration,
    last: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        match socket.recv(&mut buf) {
            Ok(n) => {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if got.last().is_some_and(|m| last(m)) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    got
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/lanup.service"),
    )
    .expect("packaging/systemd/lanup.service");
    // `verify` checks that ExecStart's program exists: the one just built
    // stands in for /usr/bin/lanup; the rest of the unit is as shipped.
    assert!(unit.contains("ExecStart=/usr/bin/lanup node"), "{unit}");
    let here = tmp.path().join("lanup.service");
    std::fs::write(
        &here,
        unit.replace("/usr/bin/lanup", &lanup_bin().display().to_string()),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (package systemd) is needed; .ci/run installs it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains("lanup.service"),
        "systemd-analyze warns about the unit: {stderr}"
    );
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "KillMode=process",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
}

#[test]
fn a_node_is_ready_once_it_answers_and_pings_the_watchdog_until_wedged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("node");
    let (_, publisher) = keygen(tmp.path(), "publisher");
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let log = std::fs::File::create(state.with_extension("log")).expect("log");
    // Its stderr is "the journal": the stream JOURNAL_STREAM names.
    let journal = {
        use std::os::unix::fs::MetadataExt;
        let meta = log.metadata().expect("metadata");
        format!("{}:{}", meta.dev(), meta.ino())
    };
    let node = Proc(
        node_command(&state, None, &publisher, "service")
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .env("NOTIFY_SOCKET", &socket_path)
            // Pings every half period: every heartbeat (1 s) here.
            .env("WATCHDOG_USEC", "1000000")
            .env("LANUP_FAULT_WEDGE_AFTER_S", "8")
            .env("JOURNAL_STREAM", &journal)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start node"),
    );
    let started = Instant::now();

    // READY=1 comes first, and once it has come the node answers on its
    // control socket.
    let first = messages_until(&socket, Duration::from_secs(10), |m| {
        m.lines().any(|l| l == "READY=1")
    });
    let ready = first.iter().position(|m| m.lines().any(|l| l == "READY=1"));
    let Some(ready) = ready else {
        panic!("no READY=1 within 10 s; got {first:?}");
    };
    assert!(
        first[..ready].iter().all(|m| !m.contains("WATCHDOG=1")),
        "watchdog pings before READY=1: {first:?}"
    );
    // Bounded: a node wedged meanwhile would not answer at all.
    let status = Command::new("timeout")
        .arg("5")
        .arg(lanup_bin())
        .args(["status", "--state", s(&state), "--json"])
        .output()
        .expect("timeout lanup status");
    assert!(
        status.status.success(),
        "READY=1 sent before the control socket answers: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Alive: the watchdog is pinged about every second.
    let alive = messages(&socket, Duration::from_secs(3));
    let pings = alive.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    assert!(pings >= 2, "{pings} watchdog pings in 3 s: {alive:?}");

    // Wedged (its loop blocked for good 8 s after start): the pings stop
    // while the process still runs, so systemd would restart it.
    let wedged_at = Duration::from_secs(8) + Duration::from_millis(1500);
    std::thread::sleep(wedged_at.saturating_sub(started.elapsed()));
    let _ = messages(&socket, Duration::from_millis(10));
    let after = messages(&socket, Duration::from_secs(4));
    assert!(
        after.iter().all(|m| m != "WATCHDOG=1"),
        "a wedged node still pings the watchdog: {after:?}"
    );
    let mut node = node;
    assert!(
        node.0.try_wait().expect("try_wait").is_none(),
        "the node exited instead of wedging"
    );
    let log = std::fs::read_to_string(state.with_extension("log")).unwrap_or_default();
    assert!(log.contains("wedged"), "the wedge was not injected: {log}");
    // Each line carries its level as a syslog priority for journald.
    let line = |what: &str| {
        log.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} in {log}"))
    };
    assert!(line("node starting").starts_with("<6>"), "{log}");
    assert!(line("wedged").starts_with("<4>"), "{log}");

    // An operator asking a wedged node is told so, in bounded time, rather
    // than left waiting.
    let asked = Instant::now();
    let out = Command::new("timeout")
        .arg("40")
        .arg(lanup_bin())
        .args(["status", "--state", s(&state)])
        .output()
        .expect("timeout lanup status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("may be wedged"), "{stderr}");
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
}
