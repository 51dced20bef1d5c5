//! Installing releases into a real running program: the sample application
//! (`src/bin/lanup-sample-app.rs`) runs from its install directory, a node
//! with an `[app]` table stages releases from a real origin, and
//! `lanup apply` stops the program, swaps its files, starts the new one and
//! checks it, or puts the old one back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::swarm::free_port;

/// The process name the node looks for, and the file that starts it.
const APP: &str = "sample-app";
const APP_EXE: &str = "bin/sample-app";

/// Files no release lists, put in the install directory before lanup
/// installs anything: they must come out of every apply untouched.
const UNLISTED: &[(&str, &[u8])] = &[
    ("conf/user.conf", b"colour = green\n"),
    ("notes.txt", b"the operator's notes\n"),
];

/// Writes the sample application's release folder for `version`.
pub(crate) fn app_tree(
    dir: &Path,
    version: &str,
    behaviour: Option<&str>,
    extra: &[(&str, Vec<u8>)],
) {
    let _ = std::fs::remove_dir_all(dir);
    let exe = dir.join(APP_EXE);
    std::fs::create_dir_all(exe.parent().expect("bin/")).expect("mkdir");
    std::fs::copy(env!("CARGO_BIN_EXE_lanup-sample-app"), &exe).expect("copy the sample app");
    write(dir, "VERSION", format!("{version}\n").as_bytes());
    if let Some(b) = behaviour {
        write(dir, "BEHAVIOUR", b.as_bytes());
    }
    for (name, bytes) in extra {
        write(dir, name, bytes);
    }
}

/// Kills every process running from under a folder, however it was
/// started: the tests start the application, the node starts it, and it
/// outlives both.
pub(crate) struct KillUnder(pub(crate) PathBuf);

impl KillUnder {
    pub(crate) fn kill_all(&self) {
        for pid in pids_under(&self.0) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for KillUnder {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Live processes whose working directory or executable is under `dir`.
pub(crate) fn pids_under(dir: &Path) -> Vec<i32> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let proc = entry.path();
        let zombie = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        let inside =
            |link: &str| std::fs::read_link(proc.join(link)).is_ok_and(|p| p.starts_with(&dir));
        if !zombie && (inside("cwd") || inside("exe")) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `pid` is a live (not zombie) process.
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// `lanup status --json` of the node at `state`: its own row.
pub(crate) fn own_status(state: &Path) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"]))
            .expect("status JSON");
    status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["self"] == true))
        .cloned()
        .expect("own row")
}

/// Every regular file under `dir` with its BLAKE3 hash, by relative name.
pub(crate) fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if entry.file_type().expect("type").is_dir() {
                walk(root, &path, out);
            } else {
                let name = path.strip_prefix(root).expect("under root");
                let bytes = std::fs::read(&path).expect("read");
                out.insert(
                    name.to_string_lossy().into_owned(),
                    blake3::hash(&bytes).to_hex().to_string(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A one-node site with the sample application: an origin, a node with an
/// `[app]` table, and the install directory.
pub(crate) struct AppSite {
    pub(crate) node: Option<Proc>,
    pub(crate) origin: OriginProc,
    pub(crate) key: (PathBuf, String),
    pub(crate) www: PathBuf,
    pub(crate) state: PathBuf,
    pub(crate) install: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) root: PathBuf,
    site: String,
    /// Declared after `node`: fields drop in order, so the node is gone
    /// before its application is killed.
    pub(crate) apps: KillUnder,
    pub(crate) _tmp: tempfile::TempDir,
}

impl AppSite {
    /// `app` is the rest of the `[app]` table (after name, install_dir and
    /// start).
    pub(crate) fn new(app: &str) -> AppSite {
        AppSite::with_dirs(app, None, None)
    }

    /// As [`AppSite::new`], with the install and state directories
    /// elsewhere (on a small filesystem, say).
    pub(crate) fn with_dirs(app: &str, install: Option<&Path>, state: Option<&Path>) -> AppSite {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_owned();
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let key = keygen(&root, "publisher.key");
        let origin = OriginProc::start(&www, None);
        let install = install.map_or_else(|| root.join("install"), Path::to_owned);
        std::fs::create_dir_all(&install).expect("mkdir install");
        for (name, bytes) in UNLISTED {
            write(&install, name, bytes);
        }
        let config = root.join("lanup.toml");
        std::fs::write(
            &config,
            format!(
                "[app]\nname = \"{APP}\"\ninstall_dir = \"{}\"\nstart = [\"{APP_EXE}\"]\n{app}\n",
                install.display()
            ),
        )
        .expect("config");
        AppSite {
            node: None,
            origin,
            key,
            www,
            state: state.map_or_else(|| root.join("state"), Path::to_owned),
            apps: KillUnder(install.clone()),
            install,
            config,
            site: format!("apply-{}-{}", std::process::id(), free_port()),
            root,
            _tmp: tmp,
        }
    }

    /// Publishes the release folder `dir` as `version`.
    pub(crate) fn publish(&self, dir: &Path, version: &str) -> Published {
        publish(dir, version, &self.origin.url, &self.key, &self.www)
    }

    /// The node's command: this site's origin (when `origin`), config and
    /// state, loopback only.
    pub(crate) fn node_cmd(&self, origin: bool) -> Command {
        let url = origin.then_some(self.origin.url.as_str());
        let mut cmd = node_command(&self.state, url, &self.key.1, &self.site);
        cmd.arg("--config").arg(&self.config).args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ]);
        cmd
    }

    /// Starts the node (killing one already running) and waits until its
    /// control socket answers, which is after any interrupted apply was
    /// resolved. `fault` sets the crash hook.
    pub(crate) fn start_node(&mut self, origin: bool, fault: Option<&str>) {
        self.node = None;
        let mut cmd = self.node_cmd(origin);
        if let Some(point) = fault {
            cmd.env("LANUP_FAULT", point);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_extension("log"))
            .expect("log");
        cmd.stdout(Stdio::null()).stderr(Stdio::from(log));
        let mut proc = Proc(cmd.spawn().expect("node starts"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = proc.0.try_wait() {
                panic!("node exited {status} at start:\n{}", node_log(&self.state));
            }
            if run(&["status", "--state", s(&self.state)]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node did not answer:\n{}",
                node_log(&self.state)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.node = Some(proc);
    }

    /// Stops the node with SIGTERM, as systemd would, and waits for it.
    pub(crate) fn stop_node(&mut self) {
        if let Some(mut proc) = self.node.take() {
            let pid = rustix::process::Pid::from_raw(proc.0.id() as i32).expect("pid");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = proc.0.wait();
        }
    }

    /// Has the fetcher poll now and waits until `version` is staged.
    pub(crate) fn stage(&self, version: &str, release: &Published) {
        run_ok(&["check", "--state", s(&self.state)]);
        let pending = wait_staged(&[&self.state], version, release, Duration::from_secs(60));
        assert!(
            pending.is_empty(),
            "{version} not staged:\n{}",
            node_log(&self.state)
        );
    }

    /// `lanup apply VERSION`.
    pub(crate) fn apply(&self, version: &str) -> Output {
        run(&["apply", version, "--state", s(&self.state)])
    }

    /// `lanup apply VERSION`, which must commit.
    pub(crate) fn apply_ok(&self, version: &str) -> String {
        let out = self.apply(version);
        assert!(
            out.status.success(),
            "apply {version} failed:\n{}\n{}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            node_log(&self.state)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The version and pid the running application recorded, if that
    /// process is alive and runs from the install directory.
    pub(crate) fn running(&self) -> Option<(String, u32)> {
        let text = std::fs::read_to_string(self.install.join("var/current")).ok()?;
        let (version, pid) = text.trim().split_once(' ')?;
        let pid: u32 = pid.parse().ok()?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        (alive(pid) && cwd == std::fs::canonicalize(&self.install).ok()?)
            .then(|| (version.to_owned(), pid))
    }

    /// Waits until the application runs `version`.
    pub(crate) fn wait_running(&self, version: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.running() {
                Some((v, pid)) if v == version => return pid,
                other => assert!(
                    Instant::now() < deadline,
                    "the application does not run {version} (it runs {other:?}):\n{}",
                    node_log(&self.state)
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The install directory's files, without the application's own data
    /// (`var/`), which it writes as it runs.
    pub(crate) fn installed_tree(&self) -> BTreeMap<String, String> {
        let mut t = tree(&self.install);
        t.retain(|name, _| !name.starts_with("var/"));
        t
    }

    /// What the install directory must hold with release folder `dir`
    /// installed: its files plus the unlisted ones.
    pub(crate) fn expected_tree(dir: &Path) -> BTreeMap<String, String> {
        let mut t = tree(dir);
        for (name, bytes) in UNLISTED {
            t.insert((*name).to_owned(), blake3::hash(bytes).to_hex().to_string());
        }
        t
    }

    /// `lanup status --json`, this node's own row.
    pub(crate) fn own_status(&self) -> serde_json::Value {
        own_status(&self.state)
    }
}

/// The site with v1 installed by lanup and running, and v2 staged.
pub(crate) fn v1_running_v2_staged(
    app: &str,
    v2_behaviour: Option<&str>,
) -> (AppSite, PathBuf, PathBuf) {
    let mut site = AppSite::new(app);
    let v1 = install_v1(&mut site);
    let v2 = stage_v2(&site, v2_behaviour);
    (site, v1, v2)
}

/// The sample application's v1 release folder, with data beside it.
pub(crate) fn v1_tree(dir: &Path) {
    app_tree(
        dir,
        "1.0.0",
        None,
        &[
            ("lib/data.bin", pseudo_random(600_000, 1)),
            ("lib/old-only.bin", pseudo_random(70_000, 2)),
            ("share/doc.txt", b"v1 docs\n".to_vec()),
        ],
    );
}

/// Publishes v1, stages it and installs it; returns its release folder.
pub(crate) fn install_v1(site: &mut AppSite) -> PathBuf {
    let v1 = site.root.join("v1");
    v1_tree(&v1);
    let r1 = site.publish(&v1, "1.0.0");
    site.start_node(true, None);
    site.stage("1.0.0", &r1);
    let out = site.apply_ok("1.0.0");
    assert!(out.contains("committed"), "{out}");
    site.wait_running("1.0.0");
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
    v1
}

/// Publishes v2 (`lib/old-only.bin` gone, `plugins/new/` new, edits) and
/// stages it; returns its release folder.
pub(crate) fn stage_v2(site: &AppSite, v2_behaviour: Option<&str>) -> PathBuf {
    let (v2, r2) = publish_v2(site, v2_behaviour);
    site.stage("2.0.0", &r2);
    v2
}

/// Publishes v2; returns its release folder and the published release.
pub(crate) fn publish_v2(site: &AppSite, v2_behaviour: Option<&str>) -> (PathBuf, Published) {
    let v2 = site.root.join("v2");
    let mut data = pseudo_random(600_000, 1);
    data[1000..1100].fill(7);
    app_tree(
        &v2,
        "2.0.0",
        v2_behaviour,
        &[
            ("lib/data.bin", data),
            ("plugins/new/extra.bin", pseudo_random(50_000, 3)),
            ("share/doc.txt", b"v2 docs\n".to_vec()),
        ],
    );
    let r2 = site.publish(&v2, "2.0.0");
    (v2, r2)
}

#[test]
fn apply_replaces_the_running_release_and_keeps_unlisted_files() {
    let (site, _v1, v2) = v1_running_v2_staged("health_after = \"500ms\"", None);
    let (_, old_pid) = site.running().expect("v1 runs");
    let out = site.apply_ok("2.0.0");
    // Beside the Windows program's under Wine (tests/tests/windows.rs).
    if let Some(line) = out.lines().find(|l| l.contains("the application was down")) {
        eprintln!("Linux program: {}", line.trim());
    }
    for step in [
        "verify",
        "begin",
        "stop",
        "aside",
        "swapped",
        "start",
        "health",
        "committed",
    ] {
        assert!(out.contains(step), "apply output lacks {step}:\n{out}");
    }
    let new_pid = site.wait_running("2.0.0");
    assert_ne!(new_pid, old_pid);
    assert!(!alive(old_pid), "the v1 process {old_pid} still runs");
    assert_eq!(
        pids_under(&site.install),
        vec![new_pid as i32],
        "exactly one app process"
    );
    // Exactly v2's files (lib/old-only.bin is gone, plugins/new/ is there)
    // plus the files no release lists, with their content.
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v2));
    assert!(!site.install.join(".lanup-apply").exists());
    assert!(!site.install.join("lib/old-only.bin").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(site.install.join(APP_EXE))
            .expect("exe")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o755, "the manifest's mode is applied");
    run_ok(&["verify", "--state", s(&site.state)]);
    let me = site.own_status();
    assert_eq!(me["installed_version"], "2.0.0", "{me}");
    assert_eq!(me["apply"], "committed", "{me}");
    assert_eq!(me["state"], "installed", "{me}");
    // Nothing older is installed again, and nothing is applied twice.
    let again = site.apply("2.0.0");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not newer than the installed 2.0.0"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        site.wait_running("2.0.0"),
        new_pid,
        "a refused apply leaves the app alone"
    );
}

/// A release that only removes a file copies nothing into place: it
/// commits all the same (it once failed syncing a folder it never made).
#[test]
fn a_release_that_only_removes_a_file_is_installed() {
    let mut site = AppSite::new("health_after = \"300ms\"");
    let v1 = install_v1(&mut site);
    let v2 = site.root.join("v1.1");
    v1_tree(&v2);
    std::fs::remove_file(v2.join("lib/old-only.bin")).expect("rm");
    let r2 = site.publish(&v2, "1.1.0");
    site.stage("1.1.0", &r2);
    let out = site.apply_ok("1.1.0");
    assert!(out.contains("committed 1.1.0"), "{out}");
    assert!(!site.install.join("lib/old-only.bin").exists());
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v2));
    drop(v1);
}

#[test]
fn a_release_that_does_not_stay_up_is_rolled_back_and_the_old_one_runs() {
    let (site, v1, _v2) = v1_running_v2_staged("health_after = \"1s\"", Some("exit"));
    let (_, old_pid) = site.running().expect("v1 runs");
    let out = site.apply("2.0.0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rolled back") && stderr.contains("exited"),
        "{stderr}"
    );
    let pid = site.wait_running("1.0.0");
    assert_ne!(pid, old_pid, "the old release was started again");
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
    assert!(!site.install.join(".lanup-apply").exists());
    run_ok(&["verify", "--state", s(&site.state)]);
    let me = site.own_status();
    assert_eq!(me["installed_version"], "1.0.0", "{me}");
    assert_eq!(me["apply"], "rolled-back", "{me}");
    assert_eq!(me["state"], "rolled-back", "{me}");
    let error = me["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("2.0.0") && error.contains("exited"), "{me}");
    let table = run_ok(&["status", "--state", s(&site.state)]);
    assert!(table.contains("last apply failed: 2.0.0"), "{table}");
}

#[test]
fn an_app_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let mut site = AppSite::new("stop_timeout = \"1500ms\"\nhealth_after = \"300ms\"");
    let v1 = site.root.join("v1");
    app_tree(&v1, "1.0.0", Some("ignore-term"), &[]);
    let r1 = site.publish(&v1, "1.0.0");
    site.start_node(true, None);
    site.stage("1.0.0", &r1);
    site.apply_ok("1.0.0");
    let old_pid = site.wait_running("1.0.0");
    let v2 = site.root.join("v2");
    app_tree(&v2, "2.0.0", None, &[]);
    let r2 = site.publish(&v2, "2.0.0");
    site.stage("2.0.0", &r2);
    let started = Instant::now();
    let out = site.apply_ok("2.0.0");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{out}");
    assert!(
        out.contains("ignored the stop request and were ended"),
        "{out}"
    );
    assert!(!alive(old_pid));
    site.wait_running("2.0.0");
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v2));
}

#[test]
fn with_apply_auto_a_staged_release_is_installed_at_once_and_a_failed_one_once() {
    let mut site = AppSite::new("health_after = \"300ms\"\napply = \"auto\"");
    let v1 = site.root.join("v1");
    app_tree(&v1, "1.0.0", None, &[]);
    site.publish(&v1, "1.0.0");
    site.start_node(true, None);
    // Nobody asks: staged, then installed and started by the node.
    site.wait_running("1.0.0");
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
    publish_v2(&site, Some("exit"));
    run_ok(&["check", "--state", s(&site.state)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while site.own_status()["apply"] != "rolled-back" {
        assert!(Instant::now() < deadline, "{}", node_log(&site.state));
        std::thread::sleep(Duration::from_millis(100));
    }
    site.wait_running("1.0.0");
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
    // A release that rolled back is not tried again and again.
    std::thread::sleep(Duration::from_secs(2));
    let history = std::fs::read_to_string(site.install.join("var/history")).expect("history");
    assert_eq!(history.matches("2.0.0 ").count(), 1, "{history}");
}

#[test]
fn a_failing_health_command_rolls_the_release_back() {
    // Healthy means the running application reports the release on disk.
    let (site, v1, _v2) = v1_running_v2_staged(
        "health_after = \"200ms\"\nhealth_command = [\"/bin/sh\", \"-c\", \"grep -q 1.0.0 var/current\"]\nhealth_timeout = \"5s\"",
        None,
    );
    let out = site.apply("2.0.0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("health command") && stderr.contains("exited with status 1"),
        "{stderr}"
    );
    site.wait_running("1.0.0");
    assert_eq!(site.installed_tree(), AppSite::expected_tree(&v1));
}
