//! A full disk (a small tmpfs, as root) while a release is staged and while
//! it is copied beside the install for the swap: a clear error, and the
//! installed release untouched and still running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::apply::*;
use crate::common::*;

/// tmpfs mounts that are unmounted when the test ends, even on panic.
pub(crate) struct Mounts {
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

impl Mounts {
    pub(crate) fn new() -> Mounts {
        Mounts {
            dirs: Vec::new(),
            _tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A fresh tmpfs of `bytes` (rounded up to pages).
    pub(crate) fn tmpfs(&mut self, name: &str, bytes: u64) -> PathBuf {
        let dir = self._tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={}k", bytes.div_ceil(4096) * 4),
            ])
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.dirs.push(dir.clone());
        dir
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for dir in self.dirs.drain(..).rev() {
            KillUnder(dir.clone()).kill_all();
            let ok = Command::new("umount")
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&dir).status();
            }
        }
    }
}

/// The size of the sample application's v1 release folder, made once to
/// size the filesystems.
fn v1_size() -> u64 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v1");
    v1_tree(&dir);
    walk_size(&dir)
}

fn available() -> bool {
    crate::testbed::available()
}

#[test]
fn no_room_to_copy_the_new_release_beside_the_install_changes_nothing() {
    if !available() {
        return;
    }
    let mut mounts = Mounts::new();
    let size = v1_size();
    // Room for v1 and v2's copy when v2 is fetched (the disk guard looks
    // then); the disk fills before the apply, leaving a third of what the
    // apply copies (the files v2 changes: lib/data.bin's 600 kB among them).
    let disk = mounts.tmpfs("install", 3 * size + (2 << 20));
    let install = disk.join("app");
    std::fs::create_dir_all(&install).expect("mkdir");
    let mut site = AppSite::with_dirs("health_after = \"300ms\"", Some(&install), None);
    let v1 = install_v1(&mut site);
    stage_v2(&site, None);
    fill_leaving(&disk, 200_000);
    let (_, pid) = site.running().expect("v1 runs");
    let out = site.apply("2.0.0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not installed") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(
        stderr.contains(".lanup-apply/new"),
        "the error names where: {stderr}"
    );
    // Never stopped, files as they were, and the partial copy gone.
    assert_eq!(site.running(), Some(("1.0.0".into(), pid)));
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
    assert!(!install.join(".lanup-apply").exists());
    let me = site.own_status();
    assert_eq!(me["installed_version"], "1.0.0", "{me}");
    assert_eq!(me["apply"], "failed", "{me}");
    assert!(
        me["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left"),
        "{me}"
    );
    run_ok(&["verify", "--state", s(&site.state)]);
}

#[test]
fn no_room_to_fetch_a_release_leaves_the_installed_one_running() {
    if !available() {
        return;
    }
    let mut mounts = Mounts::new();
    let size = v1_size();
    // The chunk store and staged copy of v1, v2's few new chunks, and half
    // of v2's staged copy.
    let state = mounts.tmpfs("state", 2 * size + size / 2 + (1 << 20));
    let state = state.join("node");
    let mut site = AppSite::with_dirs("health_after = \"300ms\"", None, Some(&state));
    let v1 = install_v1(&mut site);
    let (_, pid) = site.running().expect("v1 runs");
    let (v2, _) = publish_v2(&site, None);
    run_ok(&["check", "--state", s(&site.state)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        let me = site.own_status();
        if let Some(e) = me["last_error"].as_str() {
            break e.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no staging error: {me}\n{}",
            node_log(&site.state)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The disk guard refuses the release before anything is fetched.
    assert!(
        error.contains("not enough disk space for 2.0.0") && error.contains("staged copy"),
        "{error}"
    );
    assert!(
        node_log(&site.state).contains("it does not fit on this node's disk"),
        "{}",
        node_log(&site.state)
    );
    let refused = site.apply("2.0.0");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not staged yet"));
    assert_eq!(site.running(), Some(("1.0.0".into(), pid)));
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
    // What was assembled before the disk filled is whole; nothing partial
    // sits under a listed name.
    let want = tree(&v2);
    for (name, hash) in tree_or_empty(&site.state.join("staging/2.0.0")) {
        assert_eq!(want.get(&name), Some(&hash), "staged {name} is partial");
    }
}

/// Fills the filesystem of `dir` with a file until `left` bytes are free.
fn fill_leaving(dir: &Path, left: u64) {
    let stat = rustix::fs::statvfs(dir).expect("statvfs");
    let free = stat.f_bavail * stat.f_frsize;
    let filler = free.saturating_sub(left);
    std::fs::write(dir.join("filler.bin"), vec![0u8; filler as usize]).expect("filler");
}

#[test]
fn a_release_larger_than_the_disk_is_refused_before_any_download() {
    if !available() {
        return;
    }
    let mut mounts = Mounts::new();
    let state = mounts.tmpfs("state", 4 << 20).join("node");
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(8 << 20, 81));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    let mut node = node_command(&state, Some(&origin.url), &release.public, "guard");
    node.args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]);
    std::fs::create_dir_all(&state).expect("mkdir");
    let log = std::fs::File::create(state.with_extension("log")).expect("log");
    let _node = Proc(
        node.stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("node starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let error = loop {
        let status = run(&["status", "--state", s(&state), "--json"]);
        let row: Option<serde_json::Value> =
            serde_json::from_slice(&status.stdout)
                .ok()
                .and_then(|v: serde_json::Value| {
                    v["nodes"].as_array().and_then(|n| n.first().cloned())
                });
        if let Some(e) = row.as_ref().and_then(|r| r["last_error"].as_str()) {
            break e.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no refusal:\n{}",
            node_log(&state)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(error.contains("not enough disk space for 1.0"), "{error}");
    assert!(
        error.contains("needs 16.0 MiB") && error.contains("free"),
        "both numbers: {error}"
    );
    // A few seconds more: still nothing but the manifest crossed.
    std::thread::sleep(Duration::from_secs(3));
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    assert!(
        served <= 2 * release.manifest_bytes,
        "{served} bytes served for a release refused before download"
    );
    assert!(!state.join("staging/1.0").exists());
}

/// The files under `dir`, none when it does not exist.
fn tree_or_empty(dir: &Path) -> std::collections::BTreeMap<String, String> {
    if dir.exists() {
        tree(dir)
    } else {
        Default::default()
    }
}

/// `mount -o remount,MODE dir`, retried while files are open for writing.
fn remount(dir: &Path, mode: &str) {
    for _ in 0..50 {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot remount {} {mode}", dir.display());
}

#[test]
fn a_state_directory_turned_read_only_is_reported_and_backs_off_on_every_node() {
    if !available() {
        return;
    }
    let mut mounts = Mounts::new();
    let disks = [mounts.tmpfs("a", 64 << 20), mounts.tmpfs("b", 64 << 20)];
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(24 << 20, 91));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, Some("1MiB"));
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    let mut site = crate::swarm::LoopSite::new(tmp.path(), 2);
    site.states = disks.iter().map(|d| d.join("node")).collect();
    for i in 0..2 {
        std::fs::create_dir_all(&site.states[i]).expect("mkdir");
        // The log lives off the failing disk (a file open for writing
        // would keep it from being remounted read-only).
        std::os::unix::fs::symlink(
            tmp.path().join(format!("node{i}.log")),
            site.states[i].with_extension("log"),
        )
        .expect("symlink");
        let cmd = site.command(i, Some(&origin.url), &release.public);
        site.start(i, cmd);
    }
    let served = || origin.stats()["bytes_served"].as_u64().expect("count");
    let deadline = Instant::now() + Duration::from_secs(60);
    while served() < 3 << 20 {
        assert!(Instant::now() < deadline, "the download did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetcher = (0..2)
        .find(|&i| node_log(&site.states[i]).contains("downloading release from the origin"))
        .expect("a fetcher");
    let other = 1 - fetcher;
    let pids: Vec<u32> = site
        .procs
        .iter()
        .map(|p| p.as_ref().expect("running").0.id())
        .collect();
    let read_only = |i: usize| {
        let row = own_status(&site.states[i]);
        let error = row["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains("Read-only file system"),
            "node {i} does not say its disk is read-only: {row}\n{}",
            node_log(&site.states[i])
        );
        assert!(
            !error.contains("differs from its signed manifest"),
            "node {i} blames the origin: {error}"
        );
    };
    // First the disk of a node that takes chunks from the fetcher fails:
    // it says so and pauses, no storm of requests on the LAN.
    remount(&disks[other], "ro");
    let ticks = cpu_ticks(pids[other]);
    std::thread::sleep(Duration::from_secs(6));
    read_only(other);
    let used = cpu_ticks(pids[other]) - ticks;
    eprintln!("read-only disk on a node: {used} CPU ticks in 6 s");
    assert!(
        used < 150,
        "node {other} used {used} ticks of CPU in 6 s with a read-only disk"
    );
    // Then the fetcher's: it says so and backs off from the origin.
    remount(&disks[fetcher], "ro");
    let requests = || origin.stats()["requests"].as_u64().expect("count");
    std::thread::sleep(Duration::from_secs(3));
    let at_ro = requests();
    let ticks = cpu_ticks(pids[fetcher]);
    std::thread::sleep(Duration::from_secs(12));
    let more = requests() - at_ro;
    read_only(fetcher);
    let used = cpu_ticks(pids[fetcher]) - ticks;
    eprintln!("read-only disk on the fetcher: {more} origin requests and {used} CPU ticks in 12 s");
    assert!(used < 300, "the fetcher used {used} ticks of CPU in 12 s");
    assert!(
        more <= 3,
        "{more} requests to the origin in 12 s while the fetcher's disk was read-only"
    );
    // The disks come back: the site stages, and the uplink paid little
    // for the outage.
    for disk in &disks {
        remount(disk, "rw");
    }
    let pending = wait_staged(
        &site.state_refs(),
        "1.0",
        &release,
        Duration::from_secs(120),
    );
    assert!(
        pending.is_empty(),
        "not staged after the disks came back:\n{}",
        node_log(pending[0])
    );
    let total = served();
    eprintln!(
        "read-only disks: the site staged with {:.3} x S from the origin",
        total as f64 / release.size as f64
    );
    assert!(
        total <= release.size * 3 / 2,
        "origin served {total} bytes for a {}-byte release",
        release.size
    );
    drop(site);
}
