//! lanup updating lanup on loopback nodes: a release whose application is
//! lanup is staged and rolled out like any other; each node swaps its own
//! binary, tries the new one and keeps it only once it came up and heard
//! the site. A lanup that exits at once leaves every node on the old one,
//! running, with the reason in status and history.
//!
//! The new lanup is this test's own binary with a version stamped at its
//! end (fault-injection builds read it), so no second build is needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::swarm::LoopSite;

/// This build's binary, stripped of debug information (a release is
/// published, staged and copied three times per node), with `stamp`
/// appended when given.
fn lanup_binary(out: &Path, stamp: Option<&str>) {
    std::fs::create_dir_all(out.parent().expect("has a parent")).expect("mkdir");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(out)
        .arg(lanup_bin())
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(lanup_bin(), out).expect("copy lanup");
    }
    if let Some(version) = stamp {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(out)
            .expect("open");
        write!(f, "\nLANUP-TEST-VERSION={version}\n").expect("stamp");
    }
}

fn hash(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).expect("read"))
        .to_hex()
        .to_string()
}

fn status(state: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"])).expect("status JSON")
}

fn own(state: &Path) -> serde_json::Value {
    let status = status(state);
    status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["self"] == true).cloned())
        .unwrap_or_else(|| panic!("no own row: {status}"))
}

fn history(state: &Path) -> Vec<serde_json::Value> {
    run_ok(&["history", "--state", s(state), "--json"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A site of nodes that each run lanup from their own copy, its origin,
/// and the keys that publish to it and roll out on it.
struct Site {
    nodes: LoopSite,
    www: PathBuf,
    url: String,
    publisher: (PathBuf, String),
    admin: (PathBuf, String),
}

impl Site {
    /// `n` nodes (none started) and a running origin, under `root`.
    fn new(root: &Path, n: usize) -> (Site, OriginProc) {
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let origin = OriginProc::start(&www, None);
        let site = Site {
            nodes: LoopSite::new(root, n),
            www,
            url: origin.url.clone(),
            publisher: keygen(root, "publisher.key"),
            admin: keygen(root, "admin.key"),
        };
        (site, origin)
    }

    /// `lanup node` for node `i`, run from `bin`, obeying the site's admin.
    fn command(&self, i: usize, bin: &Path) -> Command {
        let args = self.nodes.command(i, Some(&self.url), &self.publisher.1);
        let mut cmd = Command::new(bin);
        cmd.args(args.get_args())
            .args(["--trust-admin", &self.admin.1])
            .env("LANUP_LOG", "info");
        cmd
    }

    /// Publishes `dir` (holding the file `lanup`) as lanup `version`, has
    /// every node poll for it and waits until all staged it.
    fn release(&self, dir: &Path, version: &str) {
        self.release_as("lanup", dir, version);
    }

    /// Publishes `dir` (holding the file `lanup`) as lanup `version` on the
    /// site's origin; no node is asked to look.
    fn publish_lanup(&self, dir: &Path, version: &str) {
        publish_as("lanup", dir, version, &self.url, &self.publisher, &self.www);
    }

    /// [`Site::release`] of application `name`.
    fn release_as(&self, name: &str, dir: &Path, version: &str) {
        publish_as(name, dir, version, &self.url, &self.publisher, &self.www);
        // The site's fetcher polls (the others say they are not it).
        for state in &self.nodes.states {
            let _ = run(&["check", "--state", s(state)]);
        }
        wait_all(&self.nodes.states, &format!("staged {version}"), |me| {
            me["staged_version"] == version
        });
    }

    /// `lanup rollout VERSION --waves 1,100% --wait` from node `from`.
    fn roll_out(&self, version: &str, from: usize) -> std::process::Output {
        run(&[
            "rollout",
            version,
            "--key",
            s(&self.admin.0),
            "--state",
            s(&self.nodes.states[from]),
            "--waves",
            "1,100%",
            "--wait",
            "--timeout",
            "120s",
        ])
    }
}

/// Waits until every node's own status satisfies `done`.
fn wait_all(states: &[PathBuf], what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for state in states {
        loop {
            let row = run(&["status", "--state", s(state), "--json"]);
            let row: Option<serde_json::Value> = serde_json::from_slice(&row.stdout).ok();
            let me = row.as_ref().and_then(|r| {
                r["nodes"]
                    .as_array()
                    .and_then(|n| n.iter().find(|n| n["self"] == true).cloned())
            });
            if me.as_ref().is_some_and(&done) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: never {what}: {me:?}\n{}",
                state.display(),
                states
                    .iter()
                    .map(|s| format!("--- {}\n{}", s.display(), node_log(s)))
                    .collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

#[test]
fn a_lanup_release_replaces_every_nodes_lanup_and_a_broken_one_leaves_the_old_one_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let n = 3;
    let (mut site, _origin) = Site::new(root, n);
    // Each node runs lanup from its own folder, as from /usr/bin.
    let bins: Vec<PathBuf> = (0..n)
        .map(|i| root.join(format!("bin{i}")).join("lanup"))
        .collect();
    for (i, bin) in bins.iter().enumerate() {
        lanup_binary(bin, None);
        let mut cmd = site.command(i, bin);
        cmd.args(["--self-update-timeout", "8s"]);
        site.nodes.start(i, cmd);
    }
    let states = site.nodes.states.clone();
    let pids: Vec<u32> = site
        .nodes
        .procs
        .iter()
        .map(|p| p.as_ref().expect("started").0.id())
        .collect();
    let old_hash = hash(&bins[0]);
    // Every node runs the installed binary in the process it started in
    // (the service manager's main pid), and that binary is `hash`.
    let runs = |hash_wanted: &str, version: &str| {
        for (i, state) in states.iter().enumerate() {
            // A node's trial of a new lanup answers for it a moment before
            // the node itself runs the new binary.
            let exe = format!("/proc/{}/exe", pids[i]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_link(&exe).ok().as_ref() != Some(&bins[i])
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            assert_eq!(own(state)["lanup_version"], version, "node {i}'s lanup");
            assert_eq!(hash(&bins[i]), hash_wanted, "node {i}'s binary on disk");
            let exe = std::fs::read_link(format!("/proc/{}/exe", pids[i])).expect("exe");
            assert_eq!(exe, bins[i], "node {i}'s process runs the installed binary");
            let left = std::fs::read_dir(bins[i].parent().expect("dir"))
                .expect("read_dir")
                .count();
            assert_eq!(left, 1, "node {i} left files beside lanup");
        }
    };
    // The site's application has a release with a greater version than
    // lanup's: releases of the two are compared by when they were
    // published, not by version.
    let app = root.join("app");
    write(&app, "bin/app", &pseudo_random(200_000, 41));
    site.release_as("app", &app, "1.0.0");
    let good = root.join("good");
    lanup_binary(&good.join("lanup"), Some("0.2.0"));
    site.release(&good, "0.2.0");
    runs(&old_hash, env!("CARGO_PKG_VERSION"));

    // The good release, in two waves.
    let began = Instant::now();
    let out = site.roll_out("0.2.0", 0);
    let took = began.elapsed();
    assert!(
        out.status.success(),
        "rollout of lanup 0.2.0: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node_log(&states[0])
    );
    eprintln!("lanup 0.2.0 rolled out to {n} nodes in {took:.1?}");
    wait_all(&states, "running lanup 0.2.0", |me| {
        me["lanup_version"] == "0.2.0"
    });
    let new_hash = hash(&good.join("lanup"));
    runs(&new_hash, "0.2.0");
    for (i, state) in states.iter().enumerate() {
        assert!(
            history(state)
                .iter()
                .any(|e| e["event"] == "applied" && e["version"] == "0.2.0"),
            "node {i}'s history: {:?}",
            history(state)
        );
        assert_eq!(own(state)["state"], "installed");
    }
    assert_eq!(
        run_ok(&["--version"]).trim(),
        format!("lanup {}", env!("CARGO_PKG_VERSION"))
    );
    let v = Command::new(&bins[0])
        .args(["node", "--version"])
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&v.stdout).contains("0.2.0"));

    // A lanup that exits as soon as it starts.
    let broken = root.join("broken");
    write(
        &broken,
        "lanup",
        b"#!/bin/sh\necho 'this lanup is broken' >&2\nexit 3\n",
    );
    site.release(&broken, "0.3.0");
    let out = site.roll_out("0.3.0", 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "halted: {stderr}");
    assert!(stderr.contains("exited"), "{stderr}");
    runs(&new_hash, "0.2.0");
    let mut tried = 0;
    for state in &states {
        let me = own(state);
        let h = history(state);
        if let Some(e) = h
            .iter()
            .find(|e| e["event"] == "rolled-back" && e["version"] == "0.3.0")
        {
            tried += 1;
            assert!(
                e["reason"].as_str().is_some_and(|r| r.contains("exited")),
                "{e}"
            );
            assert_eq!(me["failed_version"], "0.3.0", "{me}");
            assert!(
                me["last_error"]
                    .as_str()
                    .is_some_and(|r| r.contains("exited")),
                "{me}"
            );
        }
    }
    assert_eq!(tried, 1, "only the canary tried the broken lanup");
    // Every node halts once it hears the canary again.
    for (i, state) in states.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = status(state);
            if status["rollout"]["stage"] == "halted" && status["rollout"]["version"] == "0.3.0" {
                break;
            }
            assert!(Instant::now() < deadline, "node {i}: {status}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // A lanup that starts but never joins the site: given up after the
    // node's self_update_timeout (8 s here), the old one back.
    let hangs = root.join("hangs");
    write(&hangs, "lanup", b"#!/bin/sh\nexec sleep 600\n");
    site.release(&hangs, "0.4.0");
    let out = site.roll_out("0.4.0", 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "halted: {stderr}");
    assert!(
        stderr.contains("did not prove itself within 8s"),
        "{stderr}"
    );
    runs(&new_hash, "0.2.0");

    // A lanup release that is not one binary is refused by the canary
    // before it stops anything.
    let handovers = |state: &Path| node_log(state).matches("stopping to hand over").count();
    let before: Vec<usize> = states.iter().map(|s| handovers(s)).collect();
    let two = root.join("two");
    lanup_binary(&two.join("lanup"), Some("0.5.0"));
    write(&two, "lanup.conf", b"extra\n");
    site.release(&two, "0.5.0");
    let out = site.roll_out("0.5.0", 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "halted: {stderr}");
    assert!(stderr.contains("exactly one file"), "{stderr}");
    let after: Vec<usize> = states.iter().map(|s| handovers(s)).collect();
    assert_eq!(before, after, "a node stopped for the refused release");
    runs(&new_hash, "0.2.0");

    // The application's next release, published after lanup's, is the
    // site's next.
    write(&app, "bin/app", &pseudo_random(200_000, 42));
    site.release_as("app", &app, "1.0.1");
}

#[test]
fn a_node_killed_while_it_tries_a_new_lanup_comes_back_on_the_old_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (mut site, _origin) = Site::new(root, 1);
    let bin = root.join("bin").join("lanup");
    lanup_binary(&bin, None);
    let old_hash = hash(&bin);
    let good = root.join("good");
    lanup_binary(&good.join("lanup"), Some("0.2.0"));
    site.publish_lanup(&good, "0.2.0");
    let mut cmd = site.command(0, &bin);
    cmd.env("LANUP_FAULT", "lanup-trial");
    site.nodes.start(0, cmd);
    let state = site.nodes.states[0].clone();
    wait_all(std::slice::from_ref(&state), "staged 0.2.0", |me| {
        me["staged_version"] == "0.2.0"
    });
    run_ok(&[
        "rollout",
        "0.2.0",
        "--key",
        s(&site.admin.0),
        "--state",
        s(&state),
        "--waves",
        "100%",
    ]);
    // The node kills itself once the new binary is in place and its trial
    // runs; the trial node sees it is alone and stops too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let proc = site.nodes.procs[0].as_mut().expect("started");
    while proc.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the fault never fired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(hash(&bin), old_hash, "the new binary was in place");
    while run(&["status", "--state", s(&state)]).status.success() {
        assert!(Instant::now() < deadline, "the orphaned trial node runs on");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Started again, by the binary now in place (the new one), as a
    // service manager would: the old lanup is put back and runs.
    let cmd = site.command(0, &bin);
    site.nodes.start(0, cmd);
    let pid = site.nodes.procs[0].as_ref().expect("started").0.id();
    wait_all(
        std::slice::from_ref(&state),
        "back on the old lanup",
        |me| me["lanup_version"] == env!("CARGO_PKG_VERSION") && me["failed_version"] == "0.2.0",
    );
    assert_eq!(hash(&bin), old_hash, "the old binary is back");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert_eq!(exe, bin, "the process runs the installed binary");
    let me = own(&state);
    assert!(
        me["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped before the new lanup was proven")),
        "{me}"
    );
    let left = std::fs::read_dir(bin.parent().expect("dir"))
        .expect("read_dir")
        .count();
    assert_eq!(left, 1, "nothing left beside lanup");
    assert!(history(&state)
        .iter()
        .any(|e| e["event"] == "rolled-back" && e["version"] == "0.2.0"));

    // An admin tries it again on this node by hand: `lanup apply` waits
    // for the node to come back and says how it went.
    let out = run(&["apply", "0.2.0", "--state", s(&state)]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("this node runs lanup 0.2.0"));
    assert_eq!(own(&state)["lanup_version"], "0.2.0");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"),
        bin
    );
}

#[test]
fn a_new_lanup_that_does_not_fit_beside_the_old_one_changes_nothing() {
    if !crate::testbed::available() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (mut site, _origin) = Site::new(root, 1);
    let good = root.join("good");
    lanup_binary(&good.join("lanup"), Some("0.2.0"));
    site.publish_lanup(&good, "0.2.0");
    // lanup lives on a filesystem with room for itself and 4 MiB more.
    let size = std::fs::metadata(good.join("lanup")).expect("size").len();
    let mut mounts = crate::diskfull::Mounts::new();
    let bin = mounts.tmpfs("bin", size + (4 << 20)).join("lanup");
    lanup_binary(&bin, None);
    let old_hash = hash(&bin);
    let cmd = site.command(0, &bin);
    site.nodes.start(0, cmd);
    let pid = site.nodes.procs[0].as_ref().expect("started").0.id();
    let state = site.nodes.states[0].clone();
    wait_all(std::slice::from_ref(&state), "staged 0.2.0", |me| {
        me["staged_version"] == "0.2.0"
    });
    let out = run(&[
        "rollout",
        "0.2.0",
        "--key",
        s(&site.admin.0),
        "--state",
        s(&state),
        "--waves",
        "100%",
        "--wait",
        "--timeout",
        "60s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "halted: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let me = own(&state);
    assert_eq!(me["lanup_version"], env!("CARGO_PKG_VERSION"), "{me}");
    assert_eq!(me["failed_version"], "0.2.0", "{me}");
    assert_eq!(hash(&bin), old_hash, "the old binary is untouched");
    let left = std::fs::read_dir(bin.parent().expect("dir"))
        .expect("read_dir")
        .count();
    assert_eq!(left, 1, "nothing left beside lanup");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"),
        bin
    );
    drop(site);
}
