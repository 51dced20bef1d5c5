//! The crash matrix: the node is killed with SIGKILL at every step of the
//! apply journal (through the fault hook the tests build in) and at random
//! moments during an apply; once it has started again the install
//! directory holds exactly v1 or exactly v2, and that release's
//! application runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lanup_node::apply::FAULT_POINTS;

use crate::apply::*;
use crate::common::*;

/// v1 installed and running, v2 staged, and a copy of that state to go
/// back to before every crash.
struct Matrix {
    site: AppSite,
    v1: std::collections::BTreeMap<String, String>,
    v2: std::collections::BTreeMap<String, String>,
    snap: PathBuf,
}

/// How one crash ended once the node was back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    V1,
    V2,
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

impl Matrix {
    fn new() -> Matrix {
        let (mut site, v1, v2) =
            v1_running_v2_staged("health_after = \"300ms\"\nstop_timeout = \"3s\"", None);
        site.stop_node();
        let snap = site.root.join("snap");
        std::fs::create_dir_all(&snap).expect("mkdir");
        site.apps.kill_all();
        copy_tree(&site.install, &snap.join("install"));
        copy_tree(&site.state.join("installed"), &snap.join("installed"));
        Matrix {
            v1: AppSite::expected_tree(&v1),
            v2: AppSite::expected_tree(&v2),
            site,
            snap,
        }
    }

    /// Back to v1 installed and running (started as a service manager
    /// would, not by the node), v2 staged, no apply under way.
    fn reset(&mut self) {
        let site = &mut self.site;
        site.node = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pids_under(&site.install).is_empty() {
            site.apps.kill_all();
            assert!(Instant::now() < deadline, "the application does not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        copy_tree(&self.snap.join("install"), &site.install);
        for dir in ["installed", "installed.prev", "apply"] {
            let _ = std::fs::remove_dir_all(site.state.join(dir));
        }
        copy_tree(&self.snap.join("installed"), &site.state.join("installed"));
        start_detached(&site.install);
        site.wait_running("1.0.0");
    }

    /// A node that is expected to die (its fault hook fires at start);
    /// waits until it has.
    fn crash_at_start(&mut self, point: &str) {
        let mut cmd = self.site.node_cmd(false);
        cmd.env("LANUP_FAULT", point)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut proc = Proc(cmd.spawn().expect("node starts"));
        wait_exit(
            &mut proc,
            &format!("the node to crash at {point} while recovering"),
        );
    }

    /// After a crash: start the node, and check the install and the app.
    fn recover_and_check(&mut self, what: &str) -> Ended {
        let site = &mut self.site;
        site.start_node(false, None);
        let tree = site.installed_tree();
        let ended = if tree == self.v1 {
            Ended::V1
        } else if tree == self.v2 {
            Ended::V2
        } else {
            panic!(
                "after {what} the install is neither v1 nor v2:\n{tree:#?}\nnode log:\n{}",
                node_log(&site.state)
            );
        };
        let version = if ended == Ended::V1 { "1.0.0" } else { "2.0.0" };
        site.wait_running(version);
        let me = site.own_status();
        assert_eq!(me["installed_version"], version, "after {what}: {me}");
        assert!(
            run(&["verify", "--state", s(&site.state)]).status.success(),
            "after {what}: lanup verify --state fails"
        );
        site.stop_node();
        ended
    }
}

/// Starts the sample application from `install` in its own process group,
/// reaped by a thread of the test.
fn start_detached(install: &Path) {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(install.join("bin/sample-app"))
        .current_dir(install)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("the sample app starts");
    std::thread::spawn(move || child.wait());
}

fn wait_exit(proc: &mut Proc, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.0.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `lanup apply 2.0.0` in the background.
fn spawn_apply(site: &AppSite) -> Proc {
    Proc(
        lanup()
            .args(["apply", "2.0.0", "--state", s(&site.state)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("lanup apply runs"),
    )
}

#[test]
fn a_node_killed_at_any_journal_step_comes_back_as_exactly_v1_or_v2() {
    let mut m = Matrix::new();
    let rollback_points: Vec<&str> = FAULT_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("rollback") || *p == "rolled-back")
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for point in FAULT_POINTS.iter().copied() {
        m.reset();
        if rollback_points.contains(&point) {
            // Killed once with the new release started, then again while
            // the next start rolls it back.
            m.site.start_node(false, Some("started"));
        } else {
            m.site.start_node(false, Some(point));
        }
        let mut apply = spawn_apply(&m.site);
        let mut node = m.site.node.take().expect("node");
        wait_exit(&mut node, &format!("the node to crash at {point}"));
        wait_exit(&mut apply, "lanup apply to end");
        if rollback_points.contains(&point) {
            m.crash_at_start(point);
        }
        let ended = m.recover_and_check(&format!("a crash at {point}"));
        // Before the commit the old release must come back; from it on,
        // the new one must stay.
        let committed = ["committed", "cleaned"].contains(&point);
        let want = if committed { Ended::V2 } else { Ended::V1 };
        assert_eq!(ended, want, "crash at {point}");
        counts.insert(point, ended);
    }
    let v2 = counts.values().filter(|e| **e == Ended::V2).count();
    println!(
        "crash matrix, journal steps: {} kills, {} ended on exactly v1, {v2} on exactly v2: {counts:?}",
        counts.len(),
        counts.len() - v2
    );
}

#[test]
fn a_node_killed_at_random_moments_of_an_apply_comes_back_as_exactly_v1_or_v2() {
    let mut m = Matrix::new();
    // How long a whole apply takes here, measured without a crash.
    m.reset();
    m.site.start_node(false, None);
    let started = Instant::now();
    let mut apply = spawn_apply(&m.site);
    wait_exit(&mut apply, "an apply without a crash");
    let span = started.elapsed();
    assert_eq!(m.recover_and_check("an apply without a crash"), Ended::V2);

    let seed = std::env::var("LANUP_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let kills = 50;
    let (mut v1, mut v2) = (0, 0);
    for i in 0..kills {
        m.reset();
        m.site.start_node(false, None);
        // Uniform over the apply and a little past it.
        let at = span.mul_f64((next() % 1100) as f64 / 1000.0);
        let mut apply = spawn_apply(&m.site);
        std::thread::sleep(at);
        m.site.node = None; // Proc's drop is SIGKILL
        wait_exit(&mut apply, "lanup apply to end");
        match m.recover_and_check(&format!("kill {i} at {at:?} (seed {seed})")) {
            Ended::V1 => v1 += 1,
            Ended::V2 => v2 += 1,
        }
    }
    println!(
        "crash matrix, random moments (seed {seed}, apply takes {span:?}): {kills} kills, {v1} ended on exactly v1, {v2} on exactly v2"
    );
}
