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
        ]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
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
        let mut cmd = lanup();
        cmd.arg("origin")
            .arg("--dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"]);
        if let Some(rate) = rate {
            cmd.args(["--rate", rate]);
        }
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
