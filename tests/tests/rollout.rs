//! Rollout commands across a site: only commands signed by a trusted admin
//! key, for this site, fresh and never seen before are obeyed; every other
//! one is refused by every node and recorded in its history.

use std::path::Path;
use std::time::{Duration, Instant};

use lanup_protocol::rollout::{sign, Action, Command, SignedCommand};
use lanup_protocol::sign::SecretKey;

use crate::announce::{spawn_logged, Liar};
use crate::apply::own_status;
use crate::common::*;
use crate::swarm::free_port;

/// `lanup status --json` of a node: the whole site and the rollout.
pub(crate) fn site_status(state: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"])).expect("JSON")
}

/// `lanup history --json` of a node, one entry per line.
pub(crate) fn history(state: &Path) -> Vec<serde_json::Value> {
    run_ok(&["history", "--state", s(state), "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("history JSON"))
        .collect()
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn command(site: &str, action: Action, id: &str) -> Command {
    Command::new(site, action, now_ms(), id)
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
        let status = site_status(state);
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

/// A site of `n` nodes on loopback, each with the sample application in
/// its own install directory, v1 installed and running on all of them and
/// v2 published and staged.
pub(crate) struct Fleet {
    pub(crate) site: crate::swarm::LoopSite,
    pub(crate) origin: OriginProc,
    publisher: String,
    configs: Vec<std::path::PathBuf>,
    pub(crate) installs: Vec<std::path::PathBuf>,
    pub(crate) admin: (std::path::PathBuf, String),
    /// Every trusted admin key, `admin` first.
    pub(crate) admins: Vec<(std::path::PathBuf, String)>,
    pub(crate) root: std::path::PathBuf,
    _apps: Vec<crate::apply::KillUnder>,
    _tmp: tempfile::TempDir,
}

/// How a [`Fleet`] is made beyond its size.
pub(crate) struct FleetOptions<'a> {
    pub(crate) v2_behaviour: Option<&'a str>,
    pub(crate) health_after: &'a str,
    pub(crate) away: Option<usize>,
    pub(crate) skewed: Option<usize>,
    /// Trusted admin keys (at least one).
    pub(crate) admins: usize,
    /// Top-level config lines for node `i`.
    pub(crate) extra: &'a dyn Fn(usize) -> String,
    /// `[app]` lines for node `i`.
    pub(crate) app_extra: &'a dyn Fn(usize) -> String,
}

impl Default for FleetOptions<'_> {
    fn default() -> Self {
        FleetOptions {
            v2_behaviour: None,
            health_after: "500ms",
            away: None,
            skewed: None,
            admins: 1,
            extra: &|_| String::new(),
            app_extra: &|_| String::new(),
        }
    }
}

impl Fleet {
    fn new(n: usize, v2_behaviour: Option<&str>) -> Fleet {
        Fleet::with_health_after(n, v2_behaviour, "500ms")
    }

    fn with_health_after(n: usize, v2_behaviour: Option<&str>, health_after: &str) -> Fleet {
        Fleet::build(n, v2_behaviour, health_after, None)
    }

    /// As [`Fleet::new`]; node `away`, if any, is stopped once v1 runs
    /// everywhere, so it misses v2 (its application keeps running).
    fn build(
        n: usize,
        v2_behaviour: Option<&str>,
        health_after: &str,
        away: Option<usize>,
    ) -> Fleet {
        Fleet::build_skewed(n, v2_behaviour, health_after, away, None)
    }

    /// As [`Fleet::build`]; node `skewed`, if any, runs with its clock
    /// 15 minutes ahead (libfaketime).
    fn build_skewed(
        n: usize,
        v2_behaviour: Option<&str>,
        health_after: &str,
        away: Option<usize>,
        skewed: Option<usize>,
    ) -> Fleet {
        Fleet::build_with(
            n,
            FleetOptions {
                v2_behaviour,
                health_after,
                away,
                skewed,
                ..FleetOptions::default()
            },
        )
    }

    pub(crate) fn build_with(n: usize, o: FleetOptions<'_>) -> Fleet {
        use crate::apply::{app_tree, KillUnder};
        let FleetOptions {
            v2_behaviour,
            health_after,
            away,
            skewed,
            admins,
            extra,
            app_extra,
        } = o;
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_owned();
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let key = keygen(&root, "publisher.key");
        let admins: Vec<_> = (0..admins.max(1))
            .map(|i| keygen(&root, &format!("admin{i}.key")))
            .collect();
        let admin = admins[0].clone();
        let trusted: Vec<String> = admins.iter().map(|a| format!("\"{}\"", a.1)).collect();
        let origin = OriginProc::start(&www, None);
        let mut site = crate::swarm::LoopSite::new(&root, n);
        let installs: Vec<_> = (0..n).map(|i| root.join(format!("install{i}"))).collect();
        let apps = installs.iter().map(|d| KillUnder(d.clone())).collect();
        let v1 = root.join("v1");
        app_tree(&v1, "1.0.0", None, &[]);
        let r1 = publish(&v1, "1.0.0", &origin.url, &key, &www);
        let configs: Vec<_> = (0..n).map(|i| root.join(format!("node{i}.toml"))).collect();
        for (i, install) in installs.iter().enumerate() {
            let config = &configs[i];
            std::fs::write(
                config,
                format!(
                    "trust_admin = [{}]\n{}\n[app]\nname = \"sample-app\"\ninstall_dir = \"{}\"\nstart = [\"bin/sample-app\"]\nhealth_after = \"{health_after}\"\n{}\n",
                    trusted.join(", "),
                    extra(i),
                    install.display(),
                    app_extra(i)
                ),
            )
            .expect("config");
            let mut cmd = site.command(i, Some(&origin.url), &key.1);
            cmd.arg("--config").arg(config);
            if skewed == Some(i) {
                fast_clock(&mut cmd);
            }
            site.start(i, cmd);
        }
        let pending = wait_staged(&site.state_refs(), "1.0.0", &r1, Duration::from_secs(60));
        assert!(
            pending.is_empty(),
            "v1 not staged:\n{}",
            node_log(&site.states[0])
        );
        for state in &site.states {
            run_ok(&["apply", "1.0.0", "--state", s(state)]);
        }
        if let Some(j) = away {
            site.procs[j] = None;
        }
        let here: Vec<&Path> = (0..n)
            .filter(|&i| Some(i) != away)
            .map(|i| site.states[i].as_path())
            .collect();
        let v2 = root.join("v2");
        app_tree(
            &v2,
            "2.0.0",
            v2_behaviour,
            &[("lib/new.bin", pseudo_random(10_000, 9))],
        );
        let r2 = publish(&v2, "2.0.0", &origin.url, &key, &www);
        for state in &here {
            run_ok(&["check", "--state", s(state)]);
        }
        let pending = wait_staged(&here, "2.0.0", &r2, Duration::from_secs(60));
        assert!(
            pending.is_empty(),
            "v2 not staged:\n{}",
            node_log(&site.states[0])
        );
        Fleet {
            site,
            origin,
            publisher: key.1,
            configs,
            installs,
            admin,
            admins,
            root,
            _apps: apps,
            _tmp: tmp,
        }
    }

    /// Stops node `i`.
    pub(crate) fn stop(&mut self, i: usize) {
        self.site.procs[i] = None;
    }

    /// Starts node `i` (again).
    pub(crate) fn start(&mut self, i: usize) {
        let mut cmd = self
            .site
            .command(i, Some(&self.origin.url), &self.publisher);
        cmd.arg("--config").arg(&self.configs[i]);
        self.site.start(i, cmd);
    }

    /// Stops node `i` and starts it again with `env` set (a faked clock).
    pub(crate) fn restart_with_env(&mut self, i: usize, env: &[(&str, String)]) {
        self.site.procs[i] = None;
        let mut cmd = self
            .site
            .command(i, Some(&self.origin.url), &self.publisher);
        cmd.arg("--config").arg(&self.configs[i]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.site.start(i, cmd);
    }

    /// Waits until node `i` hears exactly `n` nodes (itself included).
    pub(crate) fn wait_site_size(&self, i: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = site_status(&self.site.states[i]);
            if status["nodes"].as_array().map(Vec::len) == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} never saw {n} nodes: {status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until install `i` runs `version`, committed.
    pub(crate) fn wait_running(&self, i: usize, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let committed = || {
            let own = own_status(&self.site.states[i]);
            own["installed_version"] == version && own["apply"] == "committed"
        };
        while self.running(i).as_deref() != Some(version) || !committed() {
            assert!(
                Instant::now() < deadline,
                "node {i} never ran {version}: {:?}\n{}",
                self.running(i),
                node_log(&self.site.states[i])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `lanup rollout 2.0.0 --waves WAVES --wait` from node `from`.
    pub(crate) fn rollout_wait(&self, from: usize, waves: &str) -> std::process::Output {
        run(&[
            "rollout",
            "2.0.0",
            "--key",
            s(&self.admin.0),
            "--state",
            s(&self.site.states[from]),
            "--waves",
            waves,
            "--wait",
        ])
    }

    /// A node that is not the site's fetcher.
    pub(crate) fn not_the_fetcher(&self) -> usize {
        (0..self.site.states.len())
            .find(|&i| own_status(&self.site.states[i])["fetcher"] == false)
            .expect("a node that is not the fetcher")
    }

    /// This node's PeerId.
    pub(crate) fn peer_id(&self, i: usize) -> String {
        own_status(&self.site.states[i])["peer_id"]
            .as_str()
            .expect("own peer id")
            .to_owned()
    }

    /// The version the application in install `i` runs, if it runs.
    pub(crate) fn running(&self, i: usize) -> Option<String> {
        let text = std::fs::read_to_string(self.installs[i].join("var/current")).ok()?;
        let (version, pid) = text.trim().split_once(' ')?;
        crate::apply::alive(pid.parse().ok()?).then(|| version.to_owned())
    }

    /// `at_ms` of the first history entry of node `i` with `event`.
    pub(crate) fn at(&self, i: usize, event: &str) -> Option<u64> {
        history(&self.site.states[i])
            .iter()
            .find(|e| e["event"] == event && e["version"] == "2.0.0")
            .and_then(|e| e["at_ms"].as_u64())
    }

    /// [`Fleet::at`], waiting up to `timeout` for the entry: a node writes
    /// its audit log on a thread of its own, so the entry may land a little
    /// after what it records is seen in status.
    pub(crate) fn wait_at(&self, i: usize, event: &str, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let at = self.at(i, event);
            if at.is_some() || Instant::now() > deadline {
                return at;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// libfaketime, which puts a process's wall clock elsewhere (faketime).
pub(crate) const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Runs `cmd` with its wall clock 15 minutes ahead (libfaketime; timers
/// and the monotonic clock untouched), as on a machine whose clock is off.
fn fast_clock(cmd: &mut std::process::Command) {
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", "+15m")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
}

#[test]
fn clocks_that_disagree_are_shown_and_do_not_stop_rollouts_from_or_to_the_skewed_node() {
    if !Path::new(LIBFAKETIME).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the clock test needs libfaketime in CI (.ci/run installs faketime)"
        );
        eprintln!("libfaketime is not installed (apt-get install faketime); skipped");
        return;
    }
    // Node 2's clock is 15 minutes ahead of the others'.
    let fleet = Fleet::build_skewed(3, None, "500ms", None, Some(2));
    let fast = fleet.peer_id(2);
    let status = site_status(&fleet.site.states[0]);
    let row = status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["peer_id"] == fast.as_str()))
        .cloned()
        .expect("the fast node in status");
    let skew = row["clock_skew_ms"].as_i64().expect("skew measured");
    assert!(
        (895_000..905_000).contains(&skew),
        "node 2 is measured {skew} ms ahead: {row}"
    );
    let text = run_ok(&["status", "--state", s(&fleet.site.states[0])]);
    assert!(text.contains("ahead of this node's"), "{text}");

    // A rollout issued from the fast node, by an admin on that machine
    // (whose own clock is as fast).
    let mut rollout = lanup();
    rollout.args([
        "rollout",
        "2.0.0",
        "--key",
        s(&fleet.admin.0),
        "--state",
        s(&fleet.site.states[2]),
        "--waves",
        "1,100%",
        "--wait",
        "--timeout",
        "90s",
    ]);
    fast_clock(&mut rollout);
    let out = rollout.output().expect("lanup runs");
    assert!(
        out.status.success(),
        "{}
{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        assert_eq!(fleet.running(i).as_deref(), Some("2.0.0"), "node {i}");
    }
    // And a rollback issued from a node with a right clock reaches it.
    let back = run(&[
        "rollback",
        "1.0.0",
        "--key",
        s(&fleet.admin.0),
        "--state",
        s(&fleet.site.states[0]),
        "--wait",
        "--timeout",
        "90s",
    ]);
    assert!(
        back.status.success(),
        "{}
{}",
        String::from_utf8_lossy(&back.stdout),
        String::from_utf8_lossy(&back.stderr)
    );
    for i in 0..3 {
        assert_eq!(fleet.running(i).as_deref(), Some("1.0.0"), "node {i}");
        // Nothing refused, and nothing let in as "caught up" by a node
        // that was never away.
        for entry in history(&fleet.site.states[i]) {
            assert_ne!(entry["event"], "refused", "node {i}: {entry}");
            assert!(
                !entry["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("caught up"),
                "node {i}: {entry}"
            );
        }
    }
    let _ = &fleet.origin;
}

#[test]
fn a_rollout_from_any_node_reaches_every_node_wave_after_wave() {
    let fleet = Fleet::new(3, None);
    let from = fleet.not_the_fetcher();
    let out = fleet.rollout_wait(from, "1,100%");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node_log(&fleet.site.states[from])
    );
    assert!(stdout.contains("done"), "{stdout}");
    for i in 0..3 {
        assert_eq!(fleet.running(i).as_deref(), Some("2.0.0"), "node {i}");
        run_ok(&["verify", "--state", s(&fleet.site.states[i])]);
    }
    // The canary applied first; the others began only once it was healthy.
    let canary_id = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("1: "))
        .expect("wave 1 listed")
        .trim()
        .to_owned();
    let canary = (0..3)
        .find(|&i| fleet.peer_id(i) == canary_id)
        .expect("canary is a node");
    let canary_done = fleet.at(canary, "applied").expect("canary applied");
    for i in (0..3).filter(|&i| i != canary) {
        let began = fleet.at(i, "applying").expect("applying recorded");
        assert!(
            began >= canary_done,
            "node {i} began at {began}, before the canary was done at {canary_done}"
        );
    }
    let _ = &fleet.origin;
}

#[test]
fn a_canary_that_fails_halts_the_rollout_and_the_rest_stay_on_the_old_release() {
    let fleet = Fleet::new(3, Some("exit"));
    let out = fleet.rollout_wait(0, "1,100%");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rollout halted by"), "{stderr}");
    let halted_by = stderr
        .split("halted by ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .expect("node named")
        .to_owned();
    for i in 0..3 {
        // Everyone on v1, checked against the recorded install.
        assert_eq!(fleet.running(i).as_deref(), Some("1.0.0"), "node {i}");
        let verify = run_ok(&["verify", "--state", s(&fleet.site.states[i])]);
        assert!(verify.contains("1.0.0"), "{verify}");
        if fleet.peer_id(i) != halted_by {
            assert!(
                fleet.at(i, "applying").is_none(),
                "node {i} ({}) applied after the halt by {halted_by}: {:#?}\n{stderr}",
                fleet.peer_id(i),
                history(&fleet.site.states[i])
            );
        }
        // Each node hears of the failure by the canary's next heartbeats.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let status = site_status(&fleet.site.states[i]);
            if status["rollout"]["stage"] == "halted" || Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(status["rollout"]["stage"], "halted", "{status}");
        assert_eq!(
            status["rollout"]["halted_by"],
            halted_by.as_str(),
            "{status}"
        );
        // The table says it at a glance: the halt, who, and the reason on
        // the failing node's row.
        let table = run_ok(&["status", "--state", s(&fleet.site.states[i])]);
        let short = &halted_by[halted_by.len() - 8..];
        assert!(
            table.contains(&format!("rollout of 2.0.0: halted by …{short}")),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("…{short}")))
            .unwrap_or_else(|| panic!("no row for the canary:\n{table}"));
        assert!(
            row.contains("1.0.0") && row.contains("last apply failed: 2.0.0"),
            "{table}"
        );
    }
}

#[test]
fn an_aborted_rollout_applies_no_further_wave() {
    // The canary takes 3 s to be judged healthy; the abort comes first.
    let fleet = Fleet::with_health_after(3, None, "3s");
    let state = s(&fleet.site.states[0]);
    let key = s(&fleet.admin.0);
    run_ok(&[
        "rollout", "2.0.0", "--key", key, "--state", state, "--waves", "1,100%",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let out = run_ok(&["rollout", "--abort", "--key", key, "--state", state]);
    assert!(out.contains("abort sent"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0..3 {
        loop {
            let status = site_status(&fleet.site.states[i]);
            if status["rollout"]["reason"] == "aborted" {
                break;
            }
            assert!(Instant::now() < deadline, "node {i} not aborted: {status}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(history(&fleet.site.states[i])
            .iter()
            .any(|e| e["event"] == "accepted" && e["action"] == "abort"));
    }
    // Long after the canary would have been healthy, nobody else began.
    std::thread::sleep(Duration::from_secs(5));
    let began: Vec<usize> = (0..3)
        .filter(|&i| fleet.at(i, "applying").is_some())
        .collect();
    assert!(
        began.len() <= 1,
        "only the canary may have begun: {began:?}"
    );
    let on_v1 = (0..3)
        .filter(|&i| fleet.running(i).as_deref() == Some("1.0.0"))
        .count();
    assert!(on_v1 >= 2, "the rest stay on 1.0.0");
}

#[test]
fn a_node_away_during_a_rollout_catches_up_stages_and_applies_when_it_is_back() {
    let mut fleet = Fleet::build(3, None, "500ms", Some(2));
    fleet.wait_site_size(0, 2);
    let out = fleet.rollout_wait(0, "1,100%");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fleet.running(2).as_deref(),
        Some("1.0.0"),
        "away: untouched"
    );
    fleet.start(2);
    fleet.wait_running(2, "2.0.0");
    let state = &fleet.site.states[2];
    let verify = run_ok(&["verify", "--state", s(state)]);
    assert!(verify.contains("2.0.0"), "{verify}");
    let h = history(state);
    let accepted = h
        .iter()
        .find(|e| e["event"] == "accepted" && e["action"] == "rollout")
        .unwrap_or_else(|| panic!("no rollout accepted: {h:#?}"));
    assert!(
        accepted["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("caught up"),
        "{accepted}"
    );
    assert!(accepted["from"]
        .as_str()
        .unwrap_or_default()
        .contains("peer"));
    assert!(fleet.at(2, "applied").is_some(), "{h:#?}");
    // It staged 2.0.0 only after it came back, then applied it.
    let log = node_log(state);
    let staged = log.rfind("release staged and verified").expect("staged");
    let applied = log.rfind("release installed").expect("installed");
    assert!(staged < applied, "{log}");
    for i in 0..3 {
        assert_eq!(fleet.running(i).as_deref(), Some("2.0.0"), "node {i}");
    }
}

#[test]
fn a_signed_rollback_returns_every_node_to_the_release_it_still_holds() {
    // The install's files, without what the running app writes in var/.
    let files = |dir: &Path| {
        let mut t = crate::apply::tree(dir);
        t.retain(|name, _| !name.starts_with("var/"));
        t
    };
    let fleet = Fleet::new(2, None);
    let key = s(&fleet.admin.0);
    let state = s(&fleet.site.states[1]);
    let v1 = files(&fleet.installs[0]);
    let out = fleet.rollout_wait(1, "100%");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..2 {
        assert_eq!(
            fleet.running(i).as_deref(),
            Some("2.0.0"),
            "node {i}; the rollout said:\n{}\nnode 0:\n{}\nnode 1:\n{}",
            String::from_utf8_lossy(&out.stdout),
            node_log(&fleet.site.states[0]),
            node_log(&fleet.site.states[1])
        );
    }
    // An older release cannot be applied, only rolled back to.
    let out = run(&["apply", "1.0.0", "--state", state]);
    assert!(!out.status.success());
    // One the nodes no longer hold is refused before it is sent.
    let out = run(&["rollback", "0.9.0", "--key", key, "--state", state]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("0.9.0 is no longer in this node's store")
            && stderr.contains("1.0.0, 2.0.0"),
        "{stderr}"
    );
    let out = run(&[
        "rollback", "1.0.0", "--key", key, "--state", state, "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node_log(&fleet.site.states[0])
    );
    assert!(stdout.contains("every node runs 1.0.0"), "{stdout}");
    for i in 0..2 {
        let st = &fleet.site.states[i];
        assert_eq!(fleet.running(i).as_deref(), Some("1.0.0"), "node {i}");
        let verify = run_ok(&["verify", "--state", s(st)]);
        assert!(verify.contains("1.0.0"), "{verify}");
        // Exactly v1's files again: 2.0.0's new file is gone.
        assert_eq!(files(&fleet.installs[i]), v1, "node {i}");
        let h = history(st);
        assert!(
            h.iter()
                .any(|e| e["event"] == "applied" && e["action"] == "rollback"),
            "{h:#?}"
        );
        assert_eq!(own_status(st)["installed_version"], "1.0.0");
    }
}
