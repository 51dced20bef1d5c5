//! A full disk (a small tmpfs, as root) while a release is staged and while
//! it is copied beside the install for the swap: a clear error, and the
//! installed release untouched and still running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::apply::*;
use crate::common::*;

/// tmpfs mounts that are unmounted when the test ends, even on panic.
struct Mounts {
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

impl Mounts {
    fn new() -> Mounts {
        Mounts {
            dirs: Vec::new(),
            _tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A fresh tmpfs of `bytes` (rounded up to pages).
    fn tmpfs(&mut self, name: &str, bytes: u64) -> PathBuf {
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
    // v1 fits, and half of v2's copy next to it.
    let install = mounts.tmpfs("install", size + size / 2 + (256 << 10));
    let mut site = AppSite::with_dirs("health_after = \"300ms\"", Some(&install), None);
    let v1 = install_v1(&mut site);
    stage_v2(&site, None);
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
fn no_room_to_stage_a_release_leaves_the_installed_one_running() {
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
    assert!(
        error.contains("staging 2.0.0 failed") && error.contains("No space left on device"),
        "{error}"
    );
    assert!(
        node_log(&site.state).contains("staging failed; the installed release is untouched"),
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

/// The files under `dir`, none when it does not exist.
fn tree_or_empty(dir: &Path) -> std::collections::BTreeMap<String, String> {
    if dir.exists() {
        tree(dir)
    } else {
        Default::default()
    }
}
