//! Change management across a site: changes that need two admins, and
//! (below) redundancy groups, apply windows and the record of a change.

use std::path::Path;
use std::time::{Duration, Instant};

use lanup_node::control::ControlRequest;
use lanup_protocol::rollout::{sign, Action, Command, SignedCommand};

use crate::common::*;
use crate::rollout::{history, now_ms, site_status, Fleet, FleetOptions};

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
    let out = run_ok(&[
        "rollout", "2.0.0", "--key", alice, "--state", s(&states[0]), "--waves", "100%",
        "--reason", "fixes ticket 42",
    ]);
    assert!(out.contains("waiting for approval, 1 of 2"), "{out}");
    let id = id_in(&out);
    // Every node holds it, with who asked and why, and says so.
    let deadline = Instant::now() + Duration::from_secs(15);
    while pending(&states[1], &id).is_none() {
        assert!(Instant::now() < deadline, "node 1 never heard the request");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = pending(&states[1], &id).expect("pending");
    assert_eq!(r["requested_by"], fleet.admins[0].1.as_str());
    assert_eq!(r["reason"], "fixes ticket 42");
    let table = run_ok(&["status", "--state", s(&states[1])]);
    assert!(
        table.contains("waiting for approval: rollout of 2.0.0")
            && table.contains("1 of 2 admins"),
        "{table}"
    );

    // Alice again counts once.
    let again = run(&["approve", &id, "--key", alice, "--state", s(&states[1])]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("approved already"));
    // An untrusted key does not count.
    let stranger = run(&["approve", &id, "--key", s(&mallory_file), "--state", s(&states[0])]);
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
    let site = site_status(&states[0])["site"].as_str().expect("site").to_owned();
    let old = Command {
        site: site.clone(),
        action: Action::Rollout {
            version: "2.0.0".into(),
        },
        issued_at_ms: now_ms() - 25 * 3_600_000,
        id: "0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld00".into(),
        waves: Vec::new(),
        nodes: Vec::new(),
        fleet: None,
        reason: None,
        now: false,
        groups: Default::default(),
    };
    let old = sign(&old, &alice_key);
    let approved_old = SignedCommand {
        approvals: vec![lanup_protocol::approval::approve(&old, &bob_key)],
        ..old
    };
    let answer = hand(&states[0], approved_old);
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains("expired")),
        "{answer}"
    );

    // A second request, rejected by Bob, can no longer be approved.
    let out = run_ok(&[
        "rollout", "2.0.0", "--key", alice, "--state", s(&states[0]), "--waves", "1,100%",
    ]);
    let second = id_in(&out);
    let out = run_ok(&[
        "reject", &second, "--key", bob, "--state", s(&states[0]), "--reason", "not before the audit",
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
    for i in 0..2 {
        fleet.wait_running(i, "2.0.0");
        let h = history(&states[i]);
        let of = |event: &str| h.iter().filter(|e| e["event"] == event && e["id"] == id.as_str()).count();
        assert_eq!(of("requested"), 1, "node {i}: {h:#?}");
        assert_eq!(of("approved"), 1, "node {i}: {h:#?}");
        let accepted = h
            .iter()
            .find(|e| e["event"] == "accepted" && e["id"] == id.as_str())
            .expect("accepted");
        assert!(
            accepted["reason"].as_str().is_some_and(|r| r.contains("approved by 2 of 2")),
            "{accepted}"
        );
        assert!(h.iter().any(|e| e["event"] == "rejected" && e["id"] == second.as_str()));
    }
    // The refused approvals were recorded where they were given.
    let h = history(&states[0]);
    let refused: Vec<&str> = h
        .iter()
        .filter(|e| e["event"] == "approval-refused")
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(
        refused.iter().any(|r| r.contains("not a trusted admin key"))
            && refused.iter().any(|r| r.contains("not over this request's bytes")),
        "{refused:?}"
    );
}
