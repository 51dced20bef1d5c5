//! Change management across a site: changes that need two admins, and
//! (below) redundancy groups, apply windows and the record of a change.

use std::path::Path;
use std::time::{Duration, Instant};

use lanup_node::control::ControlRequest;
use lanup_protocol::rollout::{sign, Action, Command, SignedCommand};

use crate::common::*;
use crate::rollout::{history, now_ms, site_status, Fleet, FleetOptions, LIBFAKETIME};

/// Hands `signed` to node `state` as the CLI would; its answer.
fn hand(state: &Path, signed: SignedCommand) -> serde_json::Value {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(lanup_node::control::ask(
            state,
            ControlRequest::Rollout { signed },
        ))
        .expect("the node answers")
}

/// The id in `lanup rollout`'s "(id …)".
fn id_in(out: &str) -> String {
    out.split("(id ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no id in {out:?}"))
        .to_owned()
}

fn pending(state: &Path, id: &str) -> Option<serde_json::Value> {
    site_status(state)["requests"]["pending"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
}

/// `admin`'s request to roll out 2.0.0 given on node 0, once node 1 holds
/// it: its id and what the CLI said.
fn request(states: &[std::path::PathBuf], admin: &str, reason: &str) -> (String, String) {
    let out = run_ok(&[
        "rollout",
        "2.0.0",
        "--key",
        admin,
        "--state",
        s(&states[0]),
        "--waves",
        "100%",
        "--reason",
        reason,
    ]);
    let id = id_in(&out);
    let deadline = Instant::now() + Duration::from_secs(15);
    while pending(&states[1], &id).is_none() {
        assert!(Instant::now() < deadline, "node 1 never heard the request");
        std::thread::sleep(Duration::from_millis(200));
    }
    (id, out)
}

#[test]
fn a_change_needs_two_admins_and_counts_each_trusted_key_once_over_the_same_bytes() {
    let fleet = Fleet::build_with(
        2,
        FleetOptions {
            admins: 2,
            extra: &|_| "admin_threshold = 2".into(),
            ..FleetOptions::default()
        },
    );
    let states = &fleet.site.states;
    let (alice, bob) = (s(&fleet.admins[0].0), s(&fleet.admins[1].0));
    let (mallory_file, _) = keygen(&fleet.root, "mallory.key");

    // Alice asks: a request, nothing applies.
    let (id, out) = request(states, alice, "fixes ticket 42");
    assert!(out.contains("waiting for approval, 1 of 2"), "{out}");
    // Every node holds it, with who asked and why, and says so.
    let r = pending(&states[1], &id).expect("pending");
    assert_eq!(r["requested_by"], fleet.admins[0].1.as_str());
    assert_eq!(r["reason"], "fixes ticket 42");
    let table = run_ok(&["status", "--state", s(&states[1])]);
    assert!(
        table.contains("waiting for approval: rollout of 2.0.0") && table.contains("1 of 2 admins"),
        "{table}"
    );

    // Alice again counts once.
    let again = run(&["approve", &id, "--key", alice, "--state", s(&states[1])]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("approved already"));
    // An untrusted key does not count.
    let stranger = run(&[
        "approve",
        &id,
        "--key",
        s(&mallory_file),
        "--state",
        s(&states[0]),
    ]);
    assert!(!stranger.status.success());
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("not a trusted admin key"));
    // Bob's signature over other bytes does not count either.
    let request: SignedCommand =
        serde_json::from_value(r["signed"].clone()).expect("the request's bytes");
    let bob_key = lanup_node::keys::load_secret(Path::new(bob)).expect("bob");
    let mut other = request.clone();
    other.command = other.command.replace("fixes ticket 42", "fixes ticket 43");
    let forged = SignedCommand {
        approvals: vec![lanup_protocol::approval::approve(&other, &bob_key)],
        ..request.clone()
    };
    let answer = hand(&states[0], forged);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("not over this request's bytes")),
        "{answer}"
    );

    // A request older than a day can no longer be approved.
    let alice_key = lanup_node::keys::load_secret(Path::new(alice)).expect("alice");
    let site = site_status(&states[0])["site"]
        .as_str()
        .expect("site")
        .to_owned();
    let old = Command::new(
        &site,
        Action::Rollout {
            version: "2.0.0".into(),
        },
        now_ms() - 25 * 3_600_000,
        "0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld00",
    );
    let old = sign(&old, &alice_key);
    let approved_old = SignedCommand {
        approvals: vec![lanup_protocol::approval::approve(&old, &bob_key)],
        ..old
    };
    let answer = hand(&states[0], approved_old);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("expired")),
        "{answer}"
    );

    // A request with seconds left is held, then dropped when its time is
    // up, and the drop is recorded.
    let ttl = lanup_protocol::approval::REQUEST_TTL_MS;
    let near = Command {
        issued_at_ms: now_ms() - ttl + 6_000,
        id: "e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1".into(),
        ..serde_json::from_str::<Command>(&request.command).expect("the request")
    };
    let answer = hand(&states[0], sign(&near, &alice_key));
    assert_eq!(answer["waiting"], true, "{answer}");

    // A second request, rejected by Bob, can no longer be approved.
    let out = run_ok(&[
        "rollout",
        "2.0.0",
        "--key",
        alice,
        "--state",
        s(&states[0]),
        "--waves",
        "1,100%",
    ]);
    let second = id_in(&out);
    let out = run_ok(&[
        "reject",
        &second,
        "--key",
        bob,
        "--state",
        s(&states[0]),
        "--reason",
        "not before the audit",
    ]);
    assert!(out.contains("rejected"), "{out}");
    let late = run(&["approve", &second, "--key", bob, "--state", s(&states[0])]);
    assert!(!late.status.success());
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("rejected by"),
        "{}",
        String::from_utf8_lossy(&late.stderr)
    );

    // Nothing applied so far, on either node.
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..2 {
        assert_eq!(fleet.running(i).as_deref(), Some("1.0.0"), "node {i}");
        assert!(fleet.at(i, "applying").is_none(), "node {i} applied");
    }

    // Bob approves the first on the other node: every node installs it.
    let out = run_ok(&["approve", &id, "--key", bob, "--state", s(&states[1])]);
    assert!(out.contains("the change starts"), "{out}");
    for (i, state) in states.iter().enumerate() {
        fleet.wait_running(i, "2.0.0");
        let h = history(state);
        let of = |event: &str| {
            h.iter()
                .filter(|e| e["event"] == event && e["id"] == id.as_str())
                .count()
        };
        assert_eq!(of("requested"), 1, "node {i}: {h:#?}");
        assert_eq!(of("approved"), 1, "node {i}: {h:#?}");
        let accepted = h
            .iter()
            .find(|e| e["event"] == "accepted" && e["id"] == id.as_str())
            .expect("accepted");
        assert!(
            accepted["reason"]
                .as_str()
                .is_some_and(|r| r.contains("approved by 2 of 2")),
            "{accepted}"
        );
        assert!(h
            .iter()
            .any(|e| e["event"] == "rejected" && e["id"] == second.as_str()));
    }
    // The request near its end expired on the node that held it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pending(&states[0], &near.id).is_some() {
        assert!(Instant::now() < deadline, "the request never expired");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(history(&states[0])
        .iter()
        .any(|e| e["event"] == "expired" && e["id"] == near.id.as_str()));
    // The refused approvals were recorded where they were given.
    let h = history(&states[0]);
    let refused: Vec<&str> = h
        .iter()
        .filter(|e| e["event"] == "approval-refused")
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        refused
            .iter()
            .any(|r| r.contains("not a trusted admin key"))
            && refused
                .iter()
                .any(|r| r.contains("not over this request's bytes")),
        "{refused:?}"
    );
}

/// Group config for the five-node site: two groups of a standby and an
/// active, and one lone node. Each active's switchover command records
/// that its application still ran when it was called.
fn grouped(i: usize, log: &Path) -> String {
    let (group, role) = match i {
        0 => ("line-1", "standby"),
        1 => ("line-1", "active"),
        2 => ("line-2", "standby"),
        3 => ("line-2", "active"),
        _ => return String::new(),
    };
    format!(
        "group = \"{group}\"\nrole = \"{role}\"\nswitchover_command = [\"/bin/sh\", \"-c\", \"pid=$(cut -d' ' -f2 var/current) && kill -0 $pid && echo \\\"{i} $(cat var/current)\\\" >> {}\"]\nswitchover_timeout = \"10s\"",
        log.display()
    )
}

#[test]
fn redundant_pairs_update_standby_first_and_are_never_down_together() {
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("switchover.log");
    let extra = |i: usize| grouped(i, &log);
    let fleet = Fleet::build_with(
        5,
        FleetOptions {
            health_after: "1s",
            extra: &extra,
            ..FleetOptions::default()
        },
    );
    let states = &fleet.site.states;
    // Status shows the groups, standby first.
    fleet.wait_site_size(4, 5);
    let table = run_ok(&["status", "--state", s(&states[4])]);
    assert!(
        table.contains("group line-1: ") && table.contains("(standby), then "),
        "{table}"
    );
    let mut rollout = std::process::Command::new(lanup_bin());
    rollout.args([
        "rollout",
        "2.0.0",
        "--key",
        s(&fleet.admin.0),
        "--state",
        s(&states[4]),
        "--waves",
        "1,100%",
        "--wait",
        "--timeout",
        "2m",
    ]);
    rollout
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let peers: Vec<String> = (0..5).map(|i| fleet.peer_id(i)).collect();
    let child = rollout.spawn().expect("rollout runs");
    // Sample every 100 ms: never both members of a pair without their
    // application, never both applying.
    let pairs = [(0, 1), (2, 3)];
    let mut samples = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (0..5).any(|i| fleet.running(i).as_deref() != Some("2.0.0")) {
        assert!(Instant::now() < deadline, "the rollout did not finish");
        let nodes = site_status(&states[4])["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let applying = |i: usize| {
            nodes
                .iter()
                .any(|n| n["peer_id"] == peers[i].as_str() && n["state"] == "applying")
        };
        for (a, b) in pairs {
            assert!(
                fleet.running(a).is_some() || fleet.running(b).is_some(),
                "both members of the pair ({a}, {b}) are down"
            );
            assert!(!(applying(a) && applying(b)), "({a}, {b}) apply together");
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("rollout ends");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(samples > 10, "only {samples} samples");
    for (standby, active) in pairs {
        let began = fleet.at(active, "applying").expect("the active applied");
        let standby_done = fleet.at(standby, "applied").expect("the standby applied");
        assert!(
            began >= standby_done,
            "active {active} began at {began}, before standby {standby} was done at {standby_done}"
        );
    }
    // Each active's switchover ran while its old application still ran;
    // no standby's did.
    let ran = std::fs::read_to_string(&log).expect("switchover log");
    let mut who: Vec<&str> = ran.lines().filter_map(|l| l.split(' ').next()).collect();
    who.sort_unstable();
    assert_eq!(who, ["1", "3"], "{ran}");
    assert!(ran.lines().all(|l| l.contains(" 1.0.0 ")), "{ran}");
}

#[test]
fn a_standby_whose_release_fails_halts_its_group_and_the_active_is_untouched() {
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("switchover.log");
    let extra = |i: usize| grouped(i, &log);
    let fleet = Fleet::build_with(
        2,
        FleetOptions {
            v2_behaviour: Some("exit"),
            extra: &extra,
            ..FleetOptions::default()
        },
    );
    let pid_before = std::fs::read_to_string(fleet.installs[1].join("var/current")).expect("pid");
    let out = fleet.rollout_wait(1, "100%");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rollout halted by"), "{stderr}");
    // The standby rolled back; the active never began and its application
    // was never stopped.
    assert!(fleet
        .wait_at(0, "rolled-back", Duration::from_secs(10))
        .is_some());
    assert_eq!(fleet.at(1, "applying"), None);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.at(1, "applying"), None);
    let pid_after = std::fs::read_to_string(fleet.installs[1].join("var/current")).expect("pid");
    assert_eq!(pid_before, pid_after);
    assert_eq!(fleet.running(1).as_deref(), Some("1.0.0"));
    assert!(!log.exists(), "no switchover ran");
}

/// A site of one redundant pair: node 0 the standby, node 1 the active
/// (with `active_extra` in its configuration).
fn pair(active_extra: &str) -> Fleet {
    let extra = |i: usize| match i {
        0 => "group = \"g\"\nrole = \"standby\"".to_owned(),
        _ => format!("group = \"g\"\nrole = \"active\"\n{active_extra}"),
    };
    Fleet::build_with(
        2,
        FleetOptions {
            extra: &extra,
            ..FleetOptions::default()
        },
    )
}

#[test]
fn a_failing_switchover_ends_the_actives_apply_before_its_application_stops() {
    let fleet = pair("switchover_command = [\"/bin/false\"]");
    let pid_before = std::fs::read_to_string(fleet.installs[1].join("var/current")).expect("pid");
    let out = fleet.rollout_wait(0, "100%");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("switchover command `/bin/false` failed"),
        "{stderr}"
    );
    assert_eq!(fleet.running(0).as_deref(), Some("2.0.0"));
    assert_eq!(fleet.running(1).as_deref(), Some("1.0.0"));
    let pid_after = std::fs::read_to_string(fleet.installs[1].join("var/current")).expect("pid");
    assert_eq!(
        pid_before, pid_after,
        "the active's application was never stopped"
    );
}

/// The next `weekday hour:00` in `tz` after now, as Unix ms.
fn next_local(tz: &str, weekday: jiff::civil::Weekday, hour: i8) -> (u64, String) {
    let zone = jiff::tz::TimeZone::get(tz).expect("tzdata");
    let now = jiff::Timestamp::now().to_zoned_datetime(zone.clone());
    let mut day = now.date();
    loop {
        day = day.tomorrow().expect("a day");
        if day.weekday() == weekday {
            break;
        }
    }
    let at = day
        .at(hour, 0, 0, 0)
        .to_zoned_datetime(zone)
        .expect("a local time");
    (
        at.timestamp().as_millisecond() as u64,
        at.strftime("%a %H:%M %:z").to_string(),
    )
}

#[test]
fn a_node_outside_its_apply_window_waits_for_it_and_says_when() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "the apply-window test needs libfaketime (apt-get install faketime)"
    );
    let mut fleet = Fleet::build_with(
        1,
        FleetOptions {
            extra: &|_| "apply_window = [\"Sat 22:00-Sun 04:00\"]".into(),
            ..FleetOptions::default()
        },
    );
    // The node's clock is put 12 s before its window opens, Saturday
    // 22:00 in Berlin (libfaketime; its zone by TZ).
    let (opens, shown) = next_local("Europe/Berlin", jiff::civil::Weekday::Saturday, 22);
    let offset_ms = opens - 12_000 - now_ms();
    fleet.restart_with_env(
        0,
        &[
            ("LD_PRELOAD", LIBFAKETIME.into()),
            ("FAKETIME", format!("+{}", offset_ms / 1000)),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
            ("TZ", "Europe/Berlin".into()),
        ],
    );
    let state = fleet.site.states[0].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while run(&["status", "--state", s(&state), "--json"])
        .status
        .code()
        != Some(0)
    {
        assert!(Instant::now() < deadline, "the node did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A rollout stamped by the node's (faked) clock.
    let site = site_status(&state)["site"]
        .as_str()
        .expect("site")
        .to_owned();
    let admin = lanup_node::keys::load_secret(&fleet.admin.0).expect("admin key");
    let command = Command {
        waves: lanup_protocol::rollout::parse_waves("100%").expect("waves"),
        ..Command::new(
            &site,
            Action::Rollout {
                version: "2.0.0".into(),
            },
            now_ms() + offset_ms,
            "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1",
        )
    };
    let answer = hand(&state, sign(&command, &admin));
    assert_eq!(answer["accepted"], true, "{answer}");
    // It waits, and says until when.
    let deadline = Instant::now() + Duration::from_secs(5);
    let waiting = loop {
        let own = crate::apply::own_status(&state);
        if let Some(w) = own["waiting"].as_str() {
            break w.to_owned();
        }
        assert!(Instant::now() < deadline, "no wait said: {own}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        waiting.contains("outside its apply window") && waiting.contains(&shown),
        "{waiting} (expected {shown})"
    );
    assert_eq!(fleet.running(0).as_deref(), Some("1.0.0"));
    // Once the window opens, it applies.
    fleet.wait_running(0, "2.0.0");
    let began = fleet.at(0, "applying").expect("applying recorded");
    assert!(
        began >= opens,
        "began at {began}, before the window opened at {opens}"
    );
}

#[test]
fn a_changes_record_names_who_asked_who_approved_each_nodes_apply_and_the_outcome() {
    // Node 2's health check fails on 2.0.0: it rolls back, the others
    // commit.
    let fleet = Fleet::build_with(
        3,
        FleetOptions {
            admins: 2,
            extra: &|_| "admin_threshold = 2".into(),
            app_extra: &|i| {
                if i == 2 {
                    "health_command = [\"/bin/sh\", \"-c\", \"! grep -q 2.0.0 var/current\"]".into()
                } else {
                    String::new()
                }
            },
            ..FleetOptions::default()
        },
    );
    let states = &fleet.site.states;
    let (alice, bob) = (s(&fleet.admins[0].0), s(&fleet.admins[1].0));
    let (id, _) = request(states, alice, "monthly release");
    run_ok(&["approve", &id, "--key", bob, "--state", s(&states[1])]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while site_status(&states[0])["rollout"]["stage"] != "halted"
        || (0..2).any(|i| fleet.running(i).as_deref() != Some("2.0.0"))
    {
        assert!(Instant::now() < deadline, "{}", site_status(&states[0]));
        std::thread::sleep(Duration::from_millis(300));
    }
    let peers: Vec<String> = (0..3).map(|i| fleet.peer_id(i)).collect();
    let short = |p: &String| format!("…{}", &p[p.len() - 8..]);
    // Asked on any node, the record holds every node's entries.
    let md = run_ok(&[
        "history",
        "--change",
        &id,
        "--format",
        "md",
        "--state",
        s(&states[1]),
    ]);
    if let Ok(path) = std::env::var("LANUP_RECORD_SAMPLE") {
        std::fs::write(path, &md).expect("write the sample record");
    }
    for needed in [
        format!("# Change {id}: rollout of 2.0.0"),
        "**Requested** ".into(),
        format!("by `{}`", fleet.admins[0].1),
        "**Reason:** monthly release".into(),
        format!("**Approved** by `{}`", fleet.admins[1].1),
        "approved by 2 of 2".into(),
        format!("**Outcome:** halted by {}", short(&peers[2])),
    ] {
        assert!(md.contains(&needed), "{needed:?} missing:\n{md}");
    }
    for (i, peer) in peers.iter().enumerate() {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", short(peer))))
            .unwrap_or_else(|| panic!("no apply row for node {i}:\n{md}"));
        if i == 2 {
            assert!(
                row.contains("rolled-back") && row.contains("grep -q 2.0.0"),
                "{row}"
            );
        } else {
            assert!(
                row.contains("committed") && row.contains("down ") && row.contains("healthy"),
                "{row}"
            );
        }
    }
    let json: serde_json::Value = serde_json::from_str(&run_ok(&[
        "history",
        "--change",
        &id,
        "--json",
        "--state",
        s(&states[0]),
    ]))
    .expect("JSON");
    let nodes: std::collections::BTreeSet<&str> = json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["node"].as_str())
        .collect();
    assert_eq!(nodes.len(), 3, "{json}");
    let text = run_ok(&["history", "--change", &id, "--state", s(&states[2])]);
    assert!(text.contains("outcome: halted by"), "{text}");
}

#[test]
fn an_admins_signed_now_overrides_the_apply_window() {
    // A window that opens in an hour, in this machine's zone (the node's).
    let zone = jiff::tz::TimeZone::system();
    let now = jiff::Timestamp::now().to_zoned_datetime(zone);
    let at = |minutes: i64| {
        let t = now
            .checked_add(jiff::Span::new().minutes(minutes))
            .expect("a time");
        t.strftime("%H:%M").to_string()
    };
    let window = format!("daily {}-{}", at(60), at(120));
    let extra = move |_: usize| format!("apply_window = [\"{window}\"]");
    let fleet = Fleet::build_with(
        1,
        FleetOptions {
            extra: &extra,
            ..FleetOptions::default()
        },
    );
    let state = &fleet.site.states[0];
    let key = s(&fleet.admin.0);
    // --wait says what the node waits for, and gives up waiting (exit 2)
    // with the rollout still standing.
    let out = run(&[
        "rollout",
        "2.0.0",
        "--key",
        key,
        "--state",
        s(state),
        "--waves",
        "100%",
        "--wait",
        "--timeout",
        "4s",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("waits: outside its apply window"),
        "{stdout}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = run_ok(&["status", "--state", s(state)]);
        if table.contains("waits: outside its apply window") {
            break;
        }
        assert!(Instant::now() < deadline, "no wait shown:\n{table}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fleet.running(0).as_deref(), Some("1.0.0"));
    // The same release again, signed with --now: it applies at once.
    let out = run(&[
        "rollout",
        "2.0.0",
        "--now",
        "--key",
        key,
        "--state",
        s(state),
        "--waves",
        "100%",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fleet.running(0).as_deref(), Some("2.0.0"));
}

#[test]
fn a_changes_record_comes_back_naming_a_peer_that_never_answers() {
    let fleet = Fleet::build_with(2, FleetOptions::default());
    let out = fleet.rollout_wait(0, "100%");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = history(&fleet.site.states[0])
        .iter()
        .find(|e| e["event"] == "accepted")
        .and_then(|e| e["id"].as_str().map(str::to_owned))
        .expect("the rollout's id");
    // A peer that connects and never answers a request.
    let liar =
        crate::announce::Liar::dialing(&[format!("/ip4/127.0.0.1/tcp/{}", fleet.site.ports[0])]);
    let liar_id = liar.net.local_peer_id().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !run_ok(&["peers", "--state", s(&fleet.site.states[0])]).contains(&liar_id) {
        assert!(Instant::now() < deadline, "the liar never connected");
        std::thread::sleep(Duration::from_millis(200));
    }
    let json: serde_json::Value = serde_json::from_str(&run_ok(&[
        "history",
        "--change",
        &id,
        "--json",
        "--state",
        s(&fleet.site.states[0]),
    ]))
    .expect("JSON");
    assert_eq!(json["not_answered"], serde_json::json!([liar_id]), "{json}");
    let nodes: std::collections::BTreeSet<&str> = json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["node"].as_str())
        .collect();
    assert_eq!(nodes.len(), 2, "both real nodes answered: {json}");
    let text = run_ok(&[
        "history",
        "--change",
        &id,
        "--state",
        s(&fleet.site.states[0]),
    ]);
    assert!(text.contains("not answered: …"), "{text}");
    assert!(text.contains("outcome: done"), "{text}");
}

#[test]
fn a_standby_drawn_after_its_active_goes_first_all_the_same() {
    // The command names no groups (its issuer had not heard them) and its
    // waves put the active in wave 1, its standby in wave 2.
    let fleet = pair("");
    let (standby, active) = (fleet.peer_id(0), fleet.peer_id(1));
    let nodes = vec![standby.clone(), active.clone()];
    let waves = lanup_protocol::rollout::parse_waves("1,100%").expect("waves");
    let id = (0..1000)
        .map(|n| format!("{n:032x}"))
        .find(|id| lanup_protocol::rollout::assign_waves(id, &nodes, &waves)[0] == [active.clone()])
        .expect("an id that draws the active first");
    let state = &fleet.site.states[0];
    let site = site_status(state)["site"]
        .as_str()
        .expect("site")
        .to_owned();
    let admin = lanup_node::keys::load_secret(&fleet.admin.0).expect("admin key");
    let command = Command {
        waves,
        nodes,
        ..Command::new(
            &site,
            Action::Rollout {
                version: "2.0.0".into(),
            },
            now_ms(),
            &id,
        )
    };
    let answer = hand(state, sign(&command, &admin));
    assert_eq!(answer["accepted"], true, "{answer}");
    fleet.wait_running(0, "2.0.0");
    fleet.wait_running(1, "2.0.0");
    let standby_done = fleet.at(0, "applied").expect("the standby applied");
    let active_began = fleet.at(1, "applying").expect("the active applied");
    assert!(
        active_began >= standby_done,
        "the active began at {active_began}, before its standby was done at {standby_done}"
    );
}

#[test]
fn a_node_that_was_away_when_a_change_was_requested_learns_it_and_can_approve_it() {
    let mut fleet = Fleet::build_with(
        3,
        FleetOptions {
            admins: 2,
            extra: &|_| "admin_threshold = 2".into(),
            ..FleetOptions::default()
        },
    );
    let states = fleet.site.states.clone();
    let (alice, bob) = (fleet.admins[0].0.clone(), fleet.admins[1].0.clone());
    let (alice, bob) = (s(&alice), s(&bob));
    // Node 2 is away while Alice asks.
    fleet.stop(2);
    let (id, _) = request(&states, alice, "asked while node 2 was down");
    // Back, node 2 learns the request from its peers' heartbeats ...
    fleet.start(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        // (The node may not answer yet while it starts.)
        let out = run(&["status", "--state", s(&states[2]), "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let found = status["requests"]["pending"]
            .as_array()
            .and_then(|p| p.iter().find(|r| r["id"] == id.as_str()).cloned());
        if let Some(r) = found {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 never learned the request it missed:\n{}",
            node_log(&states[2])
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(held["requested_by"], fleet.admins[0].1.as_str());
    assert_eq!(held["reason"], "asked while node 2 was down");
    // ... and Bob approves it there: every node installs the release.
    let out = run_ok(&["approve", &id, "--key", bob, "--state", s(&states[2])]);
    assert!(out.contains("the change starts"), "{out}");
    for i in 0..3 {
        fleet.wait_running(i, "2.0.0");
    }
}
