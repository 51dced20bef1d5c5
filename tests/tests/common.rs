//! Helpers shared by the workspace tests: the `lanup` binary, run as a real
//! separate process, and processes that are stopped when a test ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

/// The `lanup` binary, built once per test run with the same profile as the
/// tests (`cargo test` does not build binaries of other packages).
pub(crate) fn lanup_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ sits in the workspace");
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(workspace).args([
            "build",
            "--quiet",
            "-p",
            "lanup-cli",
            "--bin",
            "lanup",
            // The crash tests' hook; the same features the tests build
            // lanup-node with, so this build reuses theirs.
            "--features",
            "lanup-node/fault-injection",
        ]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        // Cargo gives the test process the tests crate's own variables; a
        // build script that watches one (ring watches CARGO_MANIFEST_DIR)
        // would rebuild, and the outer build after it, every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let per_crate = [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ];
            if per_crate.iter().any(|p| name.starts_with(p)) {
                build.env_remove(name.as_ref());
            }
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the lanup binary failed");
        // target/<profile>/deps/<test binary> -> target/<profile>/lanup
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        profile_dir.join("lanup")
    })
}

/// A `lanup` command ready to run.
pub(crate) fn lanup() -> Command {
    let mut cmd = Command::new(lanup_bin());
    cmd.env("LANUP_LOG", "warn");
    cmd
}

/// Runs `lanup ARGS` to completion.
pub(crate) fn run(args: &[&str]) -> Output {
    lanup().args(args).output().expect("lanup runs")
}

/// Runs `lanup ARGS` and insists it succeeds; returns stdout.
pub(crate) fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "lanup {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `lanup ARGS`, insists it fails, and returns its stderr.
pub(crate) fn run_fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        !out.status.success(),
        "lanup {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until `check` holds, or panics with `what` after `timeout`.
pub(crate) fn wait_for(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what} ({timeout:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A child process that is killed and reaped when dropped, even when the
/// test panics.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `lanup origin`.
pub(crate) struct OriginProc {
    pub(crate) url: String,
    _proc: Proc,
}

impl OriginProc {
    /// Starts `lanup origin --dir DIR` on a free loopback port.
    pub(crate) fn start(dir: &Path, rate: Option<&str>) -> OriginProc {
        match rate {
            Some(rate) => OriginProc::start_with(dir, &["--rate", rate]),
            None => OriginProc::start_with(dir, &[]),
        }
    }

    /// `lanup origin --dir DIR` on a free loopback port, with `args`.
    pub(crate) fn start_with(dir: &Path, args: &[&str]) -> OriginProc {
        let mut cmd = lanup();
        cmd.arg("origin")
            .arg("--dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        let mut child = Proc(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("origin starts"),
        );
        let stdout = child.0.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("origin prints its address");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_owned();
        OriginProc { url, _proc: child }
    }

    /// `/_lanup/stats` as JSON.
    pub(crate) fn stats(&self) -> serde_json::Value {
        reqwest::blocking::get(format!("{}_lanup/stats", self.url))
            .and_then(|r| r.text())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("stats answer is JSON")
    }
}

/// Deterministic incompressible bytes.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` at `dir/name`, creating folders.
pub(crate) fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// A publisher key in `dir`; returns (key file, public key string).
pub(crate) fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let public = run_ok(&["keygen", "--out", path.to_str().expect("utf-8 path")]);
    (path, public.trim().to_owned())
}

/// `Path` as `&str`, for argument lists.
pub(crate) fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A signed release published into `www` from `app`.
pub(crate) struct Published {
    pub(crate) www: PathBuf,
    pub(crate) public: String,
    /// Sum of the file sizes.
    pub(crate) size: u64,
    /// What a poll that finds a new manifest fetches: its compressed copy
    /// (or its text, where there is none) and its `.sig`.
    pub(crate) manifest_bytes: u64,
    /// The manifest's text, `AutoUpdater.xml`.
    pub(crate) manifest_text: u64,
}

/// The bytes a node fetches to read the manifest served from `www`: the
/// compressed copy when there is one, else the text, and the signature.
pub(crate) fn manifest_read(www: &Path) -> u64 {
    let len = |name: &str| std::fs::metadata(www.join(name)).map(|m| m.len());
    len("AutoUpdater.xml.zst")
        .or_else(|_| len("AutoUpdater.xml"))
        .expect("published manifest")
        + len("AutoUpdater.xml.sig").expect("published signature")
}

/// Runs `lanup publish --dir APP --version VERSION … --out WWW`.
pub(crate) fn publish(
    app: &Path,
    version: &str,
    url: &str,
    key: &(PathBuf, String),
    www: &Path,
) -> Published {
    publish_as("app", app, version, url, key, www)
}

/// [`publish`] with the application's name (AppName) `name`.
pub(crate) fn publish_as(
    name: &str,
    app: &Path,
    version: &str,
    url: &str,
    (key, public): &(PathBuf, String),
    www: &Path,
) -> Published {
    run_ok(&[
        "publish",
        "--dir",
        s(app),
        "--version",
        version,
        "--app",
        name,
        "--url",
        url,
        "--key",
        s(key),
        "--out",
        s(www),
    ]);
    let size = walk_size(app);
    let len = |name: &str| std::fs::metadata(www.join(name)).expect("published").len();
    Published {
        www: www.to_owned(),
        public: public.clone(),
        size,
        manifest_bytes: manifest_read(www),
        manifest_text: len("AutoUpdater.xml"),
    }
}

/// Total size of the files under `dir`.
pub(crate) fn walk_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        let meta = entry.metadata().expect("metadata");
        total += if meta.is_dir() {
            walk_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// `lanup node` for `state`, logging at INFO to `state.log`, polling hourly
/// (the first poll happens at start), with the origin when given.
pub(crate) fn node_command(
    state: &Path,
    origin: Option<&str>,
    publisher: &str,
    site: &str,
) -> Command {
    let mut cmd = lanup();
    cmd.arg("node")
        .arg("--state")
        .arg(state)
        .args(["--trust-publisher", publisher, "--site", site])
        .args(["--poll-interval", "1h"])
        .env("LANUP_LOG", "info");
    if let Some(origin) = origin {
        cmd.args(["--origin", origin]);
    }
    cmd
}

/// Whether `state/staging/VERSION` holds exactly the published release.
pub(crate) fn staged_ok(state: &Path, version: &str, release: &Published) -> bool {
    let staged = state.join("staging").join(version);
    staged.is_dir()
        && run(&[
            "verify",
            "--manifest",
            s(&release.www),
            "--dir",
            s(&staged),
            "--trust",
            &release.public,
        ])
        .status
        .success()
}

/// Waits until every state directory has `version` staged and verified, or
/// `timeout` passes; returns the ones that did not get there.
pub(crate) fn wait_staged<'a>(
    states: &[&'a Path],
    version: &str,
    release: &Published,
    timeout: std::time::Duration,
) -> Vec<&'a Path> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pending: Vec<&Path> = states.to_vec();
    while !pending.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(300));
        pending.retain(|state| !staged_ok(state, version, release));
    }
    pending
}

/// The log a node started by the tests writes next to its state directory.
pub(crate) fn node_log(state: &Path) -> String {
    std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
}

/// `lanup status --json` of the node at `state`, asked until it lists `n`
/// nodes that all have `version` staged (heartbeats take a second to
/// arrive) or `timeout` passes; returns the last answer.
pub(crate) fn wait_status_staged(
    state: &Path,
    n: usize,
    version: &str,
    timeout: std::time::Duration,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"]))
                .expect("status JSON");
        let nodes = status["nodes"].as_array().map_or(&[][..], Vec::as_slice);
        let done = nodes.len() == n && nodes.iter().all(|n| n["staged_version"] == version);
        if done || std::time::Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A free loopback TCP port (bound, read, released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A site of `lanup node` processes on loopback with static peers (mDNS off:
/// it would multicast on the machine's real interface).
pub(crate) struct LoopSite {
    pub(crate) site: String,
    pub(crate) ports: Vec<u16>,
    pub(crate) states: Vec<PathBuf>,
    pub(crate) procs: Vec<Option<Proc>>,
}

impl LoopSite {
    /// Room for `n` nodes with state under `dir`; none started yet.
    pub(crate) fn new(dir: &Path, n: usize) -> LoopSite {
        LoopSite {
            site: format!("loop-{}-{}", std::process::id(), free_port()),
            ports: (0..n).map(|_| free_port()).collect(),
            states: (0..n).map(|i| dir.join(format!("node{i}"))).collect(),
            procs: (0..n).map(|_| None).collect(),
        }
    }

    /// `lanup node` for node `i`, knowing all the others by address.
    pub(crate) fn command(&self, i: usize, origin: Option<&str>, publisher: &str) -> Command {
        let others: Vec<usize> = (0..self.ports.len()).filter(|&j| j != i).collect();
        self.command_peering(i, &others, origin, publisher)
    }

    /// `lanup node` for node `i`, knowing nodes `peers` by address.
    pub(crate) fn command_peering(
        &self,
        i: usize,
        peers: &[usize],
        origin: Option<&str>,
        publisher: &str,
    ) -> Command {
        let mut cmd = node_command(&self.states[i], origin, publisher, &self.site);
        cmd.args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", self.ports[i])])
            .arg("--no-mdns");
        for &j in peers {
            cmd.args(["--peer", &format!("/ip4/127.0.0.1/tcp/{}", self.ports[j])]);
        }
        cmd
    }

    /// Starts node `i` from `cmd`, logging to its log file.
    pub(crate) fn start(&mut self, i: usize, mut cmd: Command) {
        let log = std::fs::File::create(self.states[i].with_extension("log")).expect("log");
        cmd.stdout(Stdio::null()).stderr(Stdio::from(log));
        self.procs[i] = Some(Proc(cmd.spawn().expect("node starts")));
    }

    /// How many nodes logged a download from the origin.
    pub(crate) fn downloaders(&self) -> usize {
        self.states
            .iter()
            .filter(|s| node_log(s).contains("downloading release from the origin"))
            .count()
    }

    /// The nodes' state directories.
    pub(crate) fn state_refs(&self) -> Vec<&Path> {
        self.states.iter().map(PathBuf::as_path).collect()
    }
}

/// A test that fails shows what each node logged last: a site's failure
/// under load (an election split, a peer gone silent) is read from there.
impl Drop for LoopSite {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, state) in self.states.iter().enumerate() {
            let log = node_log(state);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- node {i} ({}), last {} lines:",
                state.display(),
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// User plus system CPU time of process `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}
