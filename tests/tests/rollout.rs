//! Rollout commands across a site: only commands signed by a trusted admin
//! key, for this site, fresh and never seen before are obeyed; every other
//! one is refused by every node and recorded in its history.

use std::path::Path;
use std::time::{Duration, Instant};

use lanup_protocol::rollout::{sign, Action, Command, SignedCommand};
use lanup_protocol::sign::SecretKey;

use crate::announce::{spawn_logged, Liar};
use crate::common::*;
use crate::swarm::free_port;

/// `lanup history --json` of a node, one entry per line.
fn history(state: &Path) -> Vec<serde_json::Value> {
    run_ok(&["history", "--state", s(state), "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("history JSON"))
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn command(site: &str, action: Action, id: &str) -> Command {
    Command {
        site: site.into(),
        action,
        issued_at_ms: now_ms(),
        id: id.into(),
        waves: Vec::new(),
        nodes: Vec::new(),
    }
}

#[test]
fn unsigned_wrong_key_tampered_and_replayed_commands_are_refused_by_every_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, publisher) = keygen(tmp.path(), "publisher.key");
    let (admin_file, admin) = keygen(tmp.path(), "admin.key");
    let admin_key = lanup_node::keys::load_secret(&admin_file).expect("admin key");
    let stranger = SecretKey::generate();
    let site = format!("rollout-{}-{}", std::process::id(), free_port());
    let liar = Liar::start();
    let topic = format!("lanup/{site}/rollout");
    liar.rt
        .block_on(liar.net.subscribe(&topic))
        .expect("subscribe");

    let ports = [free_port(), free_port()];
    let states = [tmp.path().join("a"), tmp.path().join("b")];
    let _nodes: Vec<Proc> = (0..2)
        .map(|i| {
            let mut cmd = node_command(&states[i], None, &publisher, &site);
            cmd.args(["--trust-admin", &admin, "--no-mdns"])
                .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", ports[i])])
                .args(["--peer", &liar.addr()])
                .args(["--peer", &format!("/ip4/127.0.0.1/tcp/{}", ports[1 - i])]);
            spawn_logged(cmd, &states[i])
        })
        .collect();

    // Sends `c` until both nodes have `want` more entries refusing or
    // accepting it (publishing fails until the nodes have subscribed).
    let send_until = |c: &SignedCommand, event: &str, reason: &str| {
        let data = serde_json::to_vec(c).expect("JSON");
        let deadline = Instant::now() + Duration::from_secs(30);
        let seen = |state: &Path| {
            history(state).iter().any(|e| {
                e["event"] == event && e["reason"].as_str().unwrap_or_default().contains(reason)
            })
        };
        while !states.iter().all(|st| seen(st)) {
            assert!(
                Instant::now() < deadline,
                "not every node recorded {event} {reason:?}:\n{}",
                node_log(&states[0])
            );
            let _ = liar.rt.block_on(liar.net.publish(&topic, data.clone()));
            std::thread::sleep(Duration::from_millis(300));
        }
    };

    let rollout = |id: &str| {
        command(
            &site,
            Action::Rollout {
                version: "9.9.9".into(),
            },
            id,
        )
    };
    let mut unsigned = sign(&rollout("u1"), &admin_key);
    unsigned.signature.clear();
    send_until(&unsigned, "refused", "not signed");
    send_until(
        &sign(&rollout("w1"), &stranger),
        "refused",
        "not a trusted admin key",
    );
    let mut tampered = sign(&rollout("t1"), &admin_key);
    tampered.command = tampered.command.replace("9.9.9", "9.9.10");
    send_until(&tampered, "refused", "does not match the command");
    let other_site = sign(&command("elsewhere", Action::Abort, "o1"), &admin_key);
    send_until(&other_site, "refused", "meant for site \"elsewhere\"");
    // A good command is obeyed once; the same bytes again are a replay.
    let good = sign(&command(&site, Action::Abort, "g1"), &admin_key);
    let data = serde_json::to_vec(&good).expect("JSON");
    liar.rt
        .block_on(liar.net.publish(&topic, data))
        .expect("publish");
    send_until(&good, "refused", "already received (a replay)");

    for state in &states {
        let h = history(state);
        let accepted: Vec<_> = h.iter().filter(|e| e["event"] == "accepted").collect();
        assert_eq!(accepted.len(), 1, "only the good command: {h:#?}");
        assert_eq!(accepted[0]["id"], "g1");
        assert_eq!(accepted[0]["key"], admin.as_str());
        assert!(accepted[0]["from"]
            .as_str()
            .unwrap_or_default()
            .contains("peer"));
        // Nothing was applied or followed.
        assert!(
            h.iter()
                .all(|e| e["event"] == "accepted" || e["event"] == "refused"),
            "{h:#?}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"]))
                .expect("JSON");
        assert!(status["rollout"].is_null(), "{status}");
        // The table says who and why.
        let table = run_ok(&["history", "--state", s(state)]);
        assert!(
            table.contains("refused") && table.contains("a replay"),
            "{table}"
        );
    }
    // The CLI's own path: a command the local node refuses is not sent on.
    let out = run(&[
        "rollout",
        "2.0",
        "--key",
        s(&tmp.path().join("publisher.key")),
        "--state",
        s(&states[0]),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a trusted admin key"), "{stderr}");
}
