//! lanup on Windows, under Wine, with real processes: `lanup.exe` (built
//! for `x86_64-pc-windows-gnu`) publishes what Linux publishes byte for
//! byte and checks Linux's releases; a Windows node stages a release from a
//! Linux origin and installs a real Windows program (`TIMS.exe`, built here
//! with mingw-w64 from `tests/windows/tims.c`), stopping it with a close
//! request, its windowless child with its job object, and rolls back a
//! release that fails its health check; the CLI talks to the node over its
//! named pipe; two Windows nodes and a Linux node make one site that takes
//! one copy from the origin; a Windows node replaces its own `lanup.exe`
//! and keeps the old one when the new one never answers.
//!
//! Needs `lanup.exe` (`LANUP_WINDOWS_EXE`, which `tests/run-all` builds),
//! Debian's `wine64`, `Xvfb` (Wine delivers window messages only with a
//! display) and mingw-w64's gcc. Without them each test says it is skipped
//! and why; `LANUP_WINE_REQUIRED=1` (set by `tests/run-all` once it has
//! built `lanup.exe`) turns a skip into a failure.
//!
//! What Wine cannot show is named where it matters: the Service Control
//! Manager's recovery actions and the named pipe's security descriptor are
//! Windows' own, and are not exercised here.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::apply::tree;
use crate::common::*;
use crate::swarm::free_port;

const WINE: &str = "/usr/lib/wine/wine64";
const WINESERVER: &str = "/usr/lib/wine/wineserver";
const MINGW: &str = "x86_64-w64-mingw32-gcc";

/// A Wine prefix with a display, shared by the tests that run at once and
/// torn down (every Wine process in it ended, the display stopped) when
/// the last of them ends.
struct Wine {
    exe: PathBuf,
    prefix: PathBuf,
    display: String,
    xvfb: Mutex<Child>,
    tims: PathBuf,
}

static SHARED: Mutex<Weak<Wine>> = Mutex::new(Weak::new());

/// The Wine set-up, or `None` (the test is skipped, and says why) where
/// this machine cannot run Windows programs.
fn wine() -> Option<Arc<Wine>> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(wine) = shared.upgrade() {
        return Some(wine);
    }
    match Wine::start() {
        Ok(wine) => {
            let wine = Arc::new(wine);
            *shared = Arc::downgrade(&wine);
            Some(wine)
        }
        Err(reason) => {
            assert!(
                std::env::var_os("LANUP_WINE_REQUIRED").is_none(),
                "the Windows tests cannot run: {reason}"
            );
            eprintln!("skipped: the Windows tests need {reason}");
            None
        }
    }
}

/// Runs `cmd` to completion within two minutes, its output through files
/// (see [`Wine::run`]).
fn finish(cmd: &mut Command, what: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let file = |p: &Path| Stdio::from(std::fs::File::create(p).expect("output file"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file(&out))
        .stderr(file(&err))
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not end within 120 s: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read(&err).unwrap_or_default(),
    }
}

fn ran(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = finish(cmd, what);
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Wine {
    fn start() -> Result<Wine, String> {
        let exe = std::env::var_os("LANUP_WINDOWS_EXE")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or("lanup.exe: set LANUP_WINDOWS_EXE (tests/run-all builds it)")?;
        for (tool, package) in [
            (WINE, "wine64"),
            ("/usr/bin/Xvfb", "xvfb"),
            ("/usr/bin/x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64"),
        ] {
            if !Path::new(tool).exists() {
                return Err(format!("{tool} (Debian's {package})"));
            }
        }
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wine");
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        // A display of its own: the first number no X server uses.
        let number = (90..190)
            .find(|n| !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists())
            .ok_or("a free X display number")?;
        let display = format!(":{number}");
        let xvfb = Command::new("/usr/bin/Xvfb")
            .args([&display, "-nolisten", "tcp", "-screen", "0", "640x480x24"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("Xvfb: {e}"))?;
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{number}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let wine = Wine {
            exe,
            prefix: root.join("prefix"),
            display,
            xvfb: Mutex::new(xvfb),
            tims: root.join("TIMS.exe"),
        };
        wine.prepare(&root)?;
        Ok(wine)
    }

    /// Starts the prefix's server and boots the prefix (making it when it
    /// is new).
    fn boot(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.prefix).map_err(|e| e.to_string())?;
        // The prefix's server and its services, started here with no
        // standard handles of the tests', live until the last test ends.
        let server = self
            .env(&mut Command::new(WINESERVER))
            .arg("-p")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("wineserver: {e}"))?;
        if !server.success() {
            return Err(format!("wineserver -p exited {server}"));
        }
        ran(
            self.env(&mut Command::new(WINE)).arg("wineboot"),
            "starting the Wine prefix",
        )
    }

    /// Makes the prefix (once per target folder: Wine writes about 700 MB)
    /// and puts in what Debian's Wine 8.0 lacks; builds `TIMS.exe`.
    fn prepare(&self, root: &Path) -> Result<(), String> {
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("windows");
        // Making a fresh prefix on a loaded machine has failed once with
        // "could not load kernel32.dll": a second, from scratch, is tried.
        if let Err(first) = self.boot() {
            eprintln!("the Wine prefix did not start ({first}); making it again");
            let _ = self
                .env(&mut Command::new(WINESERVER))
                .arg("-k")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_secs(1));
            let _ = std::fs::remove_dir_all(&self.prefix);
            self.boot()?;
        }
        // Rust's standard library imports ProcessPrng from
        // bcryptprimitives.dll, which Windows 10 and later ship and Wine
        // 8.0 does not.
        let dll = self
            .prefix
            .join("drive_c/windows/system32/bcryptprimitives.dll");
        if !dll.exists() {
            ran(
                Command::new(MINGW)
                    .args(["-shared", "-O2", "-o"])
                    .arg(&dll)
                    .arg(sources.join("bcryptprimitives.c"))
                    .arg(sources.join("bcryptprimitives.def"))
                    .arg("-ladvapi32"),
                "building bcryptprimitives.dll",
            )?;
        }
        let tims = root.join("TIMS.exe");
        ran(
            Command::new(MINGW)
                .args(["-O2", "-o"])
                .arg(&tims)
                .arg(sources.join("tims.c")),
            "building TIMS.exe",
        )
    }

    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("WINEPREFIX", &self.prefix)
            .env("DISPLAY", &self.display)
            .env("WINEDEBUG", "-all")
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
    }

    /// `lanup.exe` under Wine.
    fn lanup(&self) -> Command {
        self.lanup_at(&self.exe)
    }

    /// A `lanup.exe` at `exe` under Wine.
    fn lanup_at(&self, exe: &Path) -> Command {
        let mut cmd = Command::new(WINE);
        self.env(&mut cmd).arg(exe).env("LANUP_LOG", "warn");
        cmd
    }

    /// Runs `lanup.exe ARGS` to completion (at most two minutes). Its
    /// output goes through files, not pipes: a Wine process may hand its
    /// standard handles on to processes that outlive it, and a pipe would
    /// then never reach its end.
    fn run(&self, args: &[&str]) -> Output {
        finish(self.lanup().args(args), &format!("lanup.exe {args:?}"))
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lanup.exe {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = self.env(&mut Command::new(WINESERVER)).arg("-k").status();
        if let Ok(mut xvfb) = self.xvfb.lock() {
            let _ = xvfb.kill();
            let _ = xvfb.wait();
        }
    }
}

/// `path` as Windows programs under Wine name it (drive Z: is `/`).
fn win(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}

/// Ends every Wine process whose command line names `dir` (the programs a
/// Windows node started outlive it, as on Windows), when dropped.
struct EndUnder(String);

impl EndUnder {
    fn new(dir: &Path) -> EndUnder {
        EndUnder(win(dir))
    }

    /// Live processes whose command line names the folder, with the line.
    fn processes(&self) -> Vec<(i32, String)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(line) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let line = String::from_utf8_lossy(&line).replace('\0', " ");
            if line.contains(&self.0) && crate::apply::alive(pid as u32) {
                found.push((pid, line));
            }
        }
        found
    }

    /// The running copies of `program` under the folder.
    fn running(&self, program: &str) -> Vec<String> {
        self.processes()
            .into_iter()
            .map(|(_, line)| line)
            .filter(|line| line.contains(program))
            .collect()
    }
}

impl Drop for EndUnder {
    fn drop(&mut self) {
        for (pid, _) in self.processes() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A file a program wrote, trimmed ("" when missing).
fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn a_release_published_on_windows_is_the_one_published_on_linux_and_each_checks_the_other() {
    let Some(wine) = wine() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/TIMS.exe", &pseudo_random(300_000, 7));
    write(&app, "lib/engine.dll", &pseudo_random(1_200_000, 8));
    write(&app, "cab/data.cab", &pseudo_random(90_000, 9));
    write(&app, "VERSION", b"1.0\n");
    let key = keygen(tmp.path(), "publisher.key");
    let publish_args = |out: &Path, paths: &dyn Fn(&Path) -> String| {
        [
            "publish".to_owned(),
            "--dir".to_owned(),
            paths(&app),
            "--version".to_owned(),
            "1.0".to_owned(),
            "--app".to_owned(),
            "TIMS".to_owned(),
            "--app-exe".to_owned(),
            "bin/TIMS.exe".to_owned(),
            "--url".to_owned(),
            "http://127.0.0.1:9/tims/".to_owned(),
            "--key".to_owned(),
            paths(&key.0),
            "--out".to_owned(),
            paths(out),
            "--date".to_owned(),
            "2026-12-01T08:00:00Z".to_owned(),
        ]
    };
    let linux = tmp.path().join("linux");
    let windows = tmp.path().join("windows");
    let args = publish_args(&linux, &|p| s(p).to_owned());
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = publish_args(&windows, &win);
    wine.run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let (linux_tree, windows_tree) = (tree(&linux), tree(&windows));
    assert_eq!(
        linux_tree.get("AutoUpdater.xml"),
        windows_tree.get("AutoUpdater.xml"),
        "the manifests differ"
    );
    assert_eq!(
        linux_tree, windows_tree,
        "lanup.exe and lanup publish different release folders"
    );
    // Each checks the other's release against the publisher's key.
    for (dir, name) in [(&linux, "Linux"), (&windows, "Windows")] {
        let manifest = dir.join("AutoUpdater.xml");
        wine.run_ok(&[
            "verify",
            "--manifest",
            &win(&manifest),
            "--dir",
            &win(&app),
            "--trust",
            &key.1,
        ]);
        run_ok(&[
            "verify",
            "--manifest",
            s(&manifest),
            "--dir",
            s(&app),
            "--trust",
            &key.1,
        ]);
        eprintln!("{name}'s release verified on both");
    }
    // A file changed on disk is caught by lanup.exe too.
    write(&app, "lib/engine.dll", &pseudo_random(1_200_000, 99));
    let out = wine.run(&[
        "verify",
        "--manifest",
        &win(&linux.join("AutoUpdater.xml")),
        "--dir",
        &win(&app),
        "--trust",
        &key.1,
    ]);
    assert!(!out.status.success(), "a changed file must fail verify");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("engine.dll"), "{said}");
}

/// A Windows node under Wine, its state, log and the command that starts
/// it.
struct WinNode {
    state: PathBuf,
    proc: Option<Proc>,
}

impl WinNode {
    fn start(wine: &Wine, state: &Path, args: &[&str]) -> WinNode {
        WinNode::start_from(wine, &wine.exe, state, args)
    }

    /// A node run from the `lanup.exe` at `exe`, in the folder above its
    /// state.
    fn start_from(wine: &Wine, exe: &Path, state: &Path, args: &[&str]) -> WinNode {
        let folder = state.parent().expect("parent");
        std::fs::create_dir_all(folder).expect("mkdir");
        let log = std::fs::File::create(state.with_extension("log")).expect("log");
        let child = wine
            .lanup_at(exe)
            .current_dir(folder)
            .arg("node")
            .args(["--state", &win(state), "--poll-interval", "1h", "--no-mdns"])
            .args(args)
            .env("LANUP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("wine starts the node");
        WinNode {
            state: state.to_owned(),
            proc: Some(Proc(child)),
        }
    }

    /// Waits until the node answers on its named pipe.
    fn wait_up(&self, wine: &Wine) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if wine
                .run(&["status", "--state", &win(&self.state), "--json"])
                .status
                .success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Windows node did not answer on its pipe: {}",
                node_log(&self.state)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The downtime `lanup apply` reported, in ms.
fn downtime(out: &str) -> Option<u64> {
    let at = out.find("the application was down ")?;
    out[at + 25..].split_whitespace().next()?.parse().ok()
}

#[test]
fn a_windows_node_stops_replaces_and_restarts_a_windows_program_and_rolls_back_a_broken_one() {
    let Some(wine) = wine() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let key = keygen(root, "publisher.key");
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let origin = OriginProc::start(&www, None);
    let install = root.join("install");
    std::fs::create_dir_all(&install).expect("mkdir");
    let programs = EndUnder::new(root);
    let release = |version: &str, says: &str| {
        let app = root.join(format!("app-{version}"));
        std::fs::create_dir_all(app.join("bin")).expect("mkdir");
        std::fs::copy(&wine.tims, app.join("bin/TIMS.exe")).expect("copy TIMS.exe");
        write(&app, "VERSION", format!("{says}\n").as_bytes());
        write(&app, "spawn-child", b"");
        write(
            &app,
            "lib/data.bin",
            &pseudo_random(200_000, version.len() as u64),
        );
        publish_as("TIMS", &app, version, &origin.url, &key, &www)
    };
    let config = root.join("lanup.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\nname = \"TIMS\"\ninstall_dir = '{}'\nstart = [\"bin/TIMS.exe\"]\nstop_timeout = \"10s\"\nhealth_after = \"2s\"\n",
            win(&install)
        ),
    )
    .expect("config");
    let v1 = release("1.0", "1.0");
    let state = root.join("node/state");
    let mut node = WinNode::start(
        &wine,
        &state,
        &[
            "--trust-publisher",
            &key.1,
            "--site",
            &format!("win-{}", free_port()),
            "--origin",
            &origin.url,
            "--config",
            &win(&config),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    node.wait_up(&wine);
    let pending = wait_staged(&[&state], "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "not staged: {}", node_log(&state));
    let out = wine.run_ok(&["apply", "1.0", "--state", &win(&state)]);
    assert!(out.contains("committed 1.0"), "{out}");
    let var = install.join("var");
    wait_for(
        "TIMS 1.0 and its child run",
        Duration::from_secs(20),
        || read(&var.join("current")).starts_with("1.0 ") && !read(&var.join("child")).is_empty(),
    );
    assert_eq!(programs.running("TIMS.exe").len(), 2, "TIMS and its child");
    let first = read(&var.join("current"));

    // 2.0: TIMS 1.0 is asked to close (its window gets WM_CLOSE) and
    // does; its child, which has no window, ends with the job object.
    let v2 = release("2.0", "2.0");
    wine.run_ok(&["check", "--state", &win(&state)]);
    let pending = wait_staged(&[&state], "2.0", &v2, Duration::from_secs(60));
    assert!(pending.is_empty(), "2.0 not staged: {}", node_log(&state));
    let child_before = read(&var.join("child"));
    let out = wine.run_ok(&["apply", "2.0", "--state", &win(&state)]);
    assert!(out.contains("committed 2.0"), "{out}");
    assert!(out.contains("had no window to close"), "{out}");
    assert!(!out.contains("ignored the stop request"), "{out}");
    assert_eq!(
        read(&var.join("closed")),
        first,
        "TIMS 1.0 closed itself on the close request"
    );
    wait_for("TIMS 2.0 runs", Duration::from_secs(20), || {
        read(&var.join("current")).starts_with("2.0 ") && read(&var.join("child")) != child_before
    });
    let running = programs.running("TIMS.exe");
    assert_eq!(running.len(), 2, "only 2.0 and its child: {running:?}");
    assert_eq!(read(&install.join("VERSION")), "2.0");
    eprintln!(
        "Windows program under Wine: the application was down {:?} ms",
        downtime(&out)
    );
    let second = read(&var.join("current"));

    // 3.0 exits at once: rolled back, 2.0 runs again, no child of 3.0 or
    // of the first 2.0 left.
    let v3 = release("3.0", "3.0 broken");
    wine.run_ok(&["check", "--state", &win(&state)]);
    let pending = wait_staged(&[&state], "3.0", &v3, Duration::from_secs(60));
    assert!(pending.is_empty(), "3.0 not staged: {}", node_log(&state));
    let child_before = read(&var.join("child"));
    let out = wine.run(&["apply", "3.0", "--state", &win(&state)]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "a broken release is refused: {said}");
    assert!(said.contains("rolled back"), "{said}");
    assert_eq!(read(&install.join("VERSION")), "2.0");
    // TIMS records itself, then starts its child: both are waited for.
    wait_for(
        "TIMS 2.0 and its child run again",
        Duration::from_secs(20),
        || {
            let now = read(&var.join("current"));
            now.starts_with("2.0 ") && now != second && read(&var.join("child")) != child_before
        },
    );
    let running = programs.running("TIMS.exe");
    assert_eq!(running.len(), 2, "2.0 again and its child: {running:?}");
    // The installed files are 2.0's, byte for byte.
    let installed = tree(&install);
    let published = tree(&root.join("app-2.0"));
    for (name, hash) in &published {
        assert_eq!(installed.get(name), Some(hash), "{name}");
    }
    drop(node.proc.take());
}

#[test]
fn two_windows_nodes_and_a_linux_node_are_one_site_that_takes_one_copy() {
    let Some(wine) = wine() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let _programs = EndUnder::new(root);
    let app = root.join("app");
    write(&app, "bin/TIMS.exe", &pseudo_random(1_500_000, 51));
    write(&app, "lib/engine.dll", &pseudo_random(500_000, 52));
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(root, "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    let site = format!("mixed-{}", free_port());
    let ports = [free_port(), free_port(), free_port()];
    let address = |i: usize| format!("/ip4/127.0.0.1/tcp/{}", ports[i]);
    let states: Vec<PathBuf> = (0..3).map(|i| root.join(format!("n{i}/state"))).collect();

    std::fs::create_dir_all(root.join("n0")).expect("mkdir");
    let log = std::fs::File::create(states[0].with_extension("log"));
    let mut linux = node_command(&states[0], Some(&origin.url), &release.public, &site);
    linux
        .args(["--listen", &address(0), "--no-mdns"])
        .args(["--peer", &address(1), "--peer", &address(2)])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.expect("log")));
    let _linux = Proc(linux.spawn().expect("linux node"));
    let windows: Vec<WinNode> = (1..3)
        .map(|i| {
            let others: Vec<String> = (0..3).filter(|j| *j != i).map(address).collect();
            let mut args = vec![
                "--trust-publisher",
                &release.public,
                "--site",
                &site,
                "--origin",
                &origin.url,
                "--listen",
            ];
            let own = address(i);
            args.push(&own);
            for other in &others {
                args.extend(["--peer", other.as_str()]);
            }
            WinNode::start(&wine, &states[i], &args)
        })
        .collect();
    let refs: Vec<&Path> = states.iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&refs, "1.0", &release, Duration::from_secs(120));
    assert!(
        pending.is_empty(),
        "not staged on {pending:?}:\n{}\n{}\n{}",
        node_log(&states[0]),
        node_log(&states[1]),
        node_log(&states[2])
    );
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    assert!(
        served < release.size * 3 / 2,
        "origin served {served} bytes for a {}-byte release to a site of 3",
        release.size
    );
    // Each Windows node hears the whole site, over its named pipe.
    for node in &windows {
        let status: serde_json::Value =
            serde_json::from_str(&wine.run_ok(&["status", "--state", &win(&node.state), "--json"]))
                .expect("status JSON");
        let nodes = status["nodes"].as_array().map_or(0, Vec::len);
        assert_eq!(nodes, 3, "{status}");
    }
    let mut log = String::new();
    for state in &states[1..] {
        let _ = std::fs::File::open(state.with_extension("log"))
            .and_then(|mut f| f.read_to_string(&mut log));
    }
    assert!(!log.contains("panicked"), "{log}");
}

/// Runs a Windows program of the prefix (`net`, `sc`, `reg`, `msiexec`).
fn system(wine: &Wine, args: &[&str]) -> Output {
    finish(
        wine.env(&mut Command::new(WINE)).args(args),
        &format!("{args:?}"),
    )
}

/// The product codes of the lanup packages installed in the prefix.
fn installed_lanups(wine: &Wine) -> Vec<String> {
    let uninstall = r"HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall";
    let listed = said(&system(wine, &["reg", "query", uninstall, "/s"]));
    let mut products = Vec::new();
    let mut key = "";
    for line in listed.lines() {
        if line.starts_with("HKEY_") {
            key = line.trim();
        } else if line.split_whitespace().next() == Some("DisplayName")
            && line.split_whitespace().last() == Some("lanup")
        {
            if let Some(code) = key.rsplit('\\').next().filter(|c| c.starts_with('{')) {
                products.push(code.to_owned());
            }
        }
    }
    products
}

/// The `Start` value of a service's registry key as `reg query` shows it.
fn start_type(registered: &str) -> String {
    registered
        .lines()
        .find(|l| l.split_whitespace().next() == Some("Start"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_owned()
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn the_msi_registers_a_disabled_service_that_the_scm_then_runs_and_stops_and_keeps_lanup_toml() {
    let Some(wine) = wine() else { return };
    if !Path::new("/usr/bin/wixl").exists() {
        assert!(
            std::env::var_os("LANUP_WINE_REQUIRED").is_none(),
            "the MSI test needs wixl (Debian's wixl)"
        );
        eprintln!("skipped: the MSI test needs wixl (Debian's wixl)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let out = finish(
        Command::new(workspace.join("packaging/windows/build.sh"))
            .arg("--exe")
            .arg(&wine.exe)
            .arg("--out")
            .arg(tmp.path()),
        "packaging/windows/build.sh",
    );
    assert!(out.status.success(), "{}", said(&out));
    let msi = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    eprintln!(
        "the MSI: {} bytes",
        std::fs::metadata(&msi).expect("msi").len()
    );
    let drive = wine.prefix.join("drive_c");
    let service_key = r"HKLM\System\CurrentControlSet\Services\lanup";
    // What an earlier run cut short may have left: its lanup installed
    // (a second product sharing the component would keep the file).
    let _ = system(&wine, &["net", "stop", "lanup"]);
    for product in installed_lanups(&wine) {
        let out = system(&wine, &["msiexec", "/x", &product, "/qn"]);
        assert!(out.status.success(), "msiexec /x {product}: {}", said(&out));
    }
    let _ = system(&wine, &["sc", "delete", "lanup"]);
    let data = drive.join("ProgramData/lanup");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).expect("mkdir");
    let config = format!(
        "listen = [\"/ip4/127.0.0.1/tcp/0\"]\ntrust_publisher = [\"{}\"]\nsite = \"msi-{}\"\nmdns = false\n",
        keygen(tmp.path(), "publisher.key").1,
        free_port()
    );
    std::fs::write(data.join("lanup.toml"), &config).expect("config");

    let out = system(&wine, &["msiexec", "/i", &win(&msi), "/qn"]);
    assert!(out.status.success(), "msiexec /i: {}", said(&out));
    assert!(drive.join("Program Files/lanup/lanup.exe").is_file());
    assert!(drive
        .join("Program Files/lanup/lanup.sample.toml")
        .is_file());
    let registered = said(&system(&wine, &["reg", "query", service_key]));
    assert!(
        registered.contains(r"lanup\lanup.exe node --windows-service"),
        "{registered}"
    );
    // Disabled until configured: the SCM will not start it.
    assert_eq!(start_type(&registered), "0x4", "{registered}");
    let refused = system(&wine, &["net", "start", "lanup"]);
    assert!(said(&refused).contains("disabled"), "{}", said(&refused));

    // Enabled, the SCM runs the node from its default configuration, and
    // the CLI finds it at the default state.
    let out = wine.run_ok(&["service", "enable"]);
    assert!(out.contains("starts with the machine"), "{out}");
    let registered = said(&system(&wine, &["reg", "query", service_key]));
    assert_eq!(start_type(&registered), "0x2", "automatic: {registered}");
    wait_for("the service runs", Duration::from_secs(30), || {
        said(&system(&wine, &["sc", "query", "lanup"])).contains("RUNNING")
    });
    let status: serde_json::Value =
        serde_json::from_str(&wine.run_ok(&["status", "--json"])).expect("status JSON");
    assert!(
        status["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["self"] == true)),
        "{status}"
    );
    let out = system(&wine, &["net", "stop", "lanup"]);
    assert!(
        said(&out).contains("stopped successfully"),
        "{}",
        said(&out)
    );
    let stopped = said(&system(&wine, &["sc", "query", "lanup"]));
    assert!(stopped.contains("STOPPED"), "{stopped}");
    assert!(stopped.contains("WIN32_EXIT_CODE    : 0"), "{stopped}");
    let log = std::fs::read_to_string(data.join("lanup.log")).expect("the service's log");
    assert!(log.contains("node starting"), "{log}");
    assert!(log.contains("node stopping"), "{log}");

    // Removed: the program and the service go, the configuration stays.
    let out = system(&wine, &["msiexec", "/x", &win(&msi), "/qn"]);
    assert!(out.status.success(), "msiexec /x: {}", said(&out));
    assert!(!drive.join("Program Files/lanup/lanup.exe").exists());
    assert!(!system(&wine, &["reg", "query", service_key])
        .status
        .success());
    assert_eq!(
        std::fs::read_to_string(data.join("lanup.toml")).expect("kept"),
        config
    );
}

/// Removes a Windows service of the prefix when dropped.
struct ServiceGuard<'a>(&'a Wine, String);

impl Drop for ServiceGuard<'_> {
    fn drop(&mut self) {
        let _ = system(self.0, &["net", "stop", &self.1]);
        let _ = system(self.0, &["sc", "delete", &self.1]);
    }
}

#[test]
fn an_application_that_is_a_windows_service_is_stopped_started_and_judged_through_the_scm() {
    let Some(wine) = wine() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let _programs = EndUnder::new(root);
    let key = keygen(root, "publisher.key");
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let origin = OriginProc::start(&www, None);
    let install = root.join("install");
    std::fs::create_dir_all(&install).expect("mkdir");
    let name = format!("lanup-tims-{}", free_port());
    let binary = format!("{} --service", win(&install.join("bin/TIMS.exe")));
    let out = system(&wine, &["sc", "create", &name, "binpath=", &binary]);
    assert!(out.status.success(), "sc create: {}", said(&out));
    let _service = ServiceGuard(&wine, name.clone());
    let release = |version: &str, says: &str| {
        let app = root.join(format!("app-{version}"));
        std::fs::create_dir_all(app.join("bin")).expect("mkdir");
        std::fs::copy(&wine.tims, app.join("bin/TIMS.exe")).expect("copy TIMS.exe");
        write(&app, "VERSION", format!("{says}\n").as_bytes());
        publish_as("TIMS", &app, version, &origin.url, &key, &www)
    };
    let config = root.join("lanup.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\nservice = \"{name}\"\ninstall_dir = '{}'\nhealth_after = \"2s\"\n",
            win(&install)
        ),
    )
    .expect("config");
    let v1 = release("1.0", "1.0");
    let state = root.join("node/state");
    let mut node = WinNode::start(
        &wine,
        &state,
        &[
            "--trust-publisher",
            &key.1,
            "--site",
            &format!("winsvc-{}", free_port()),
            "--origin",
            &origin.url,
            "--config",
            &win(&config),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    node.wait_up(&wine);
    let var = install.join("var");
    let running = || said(&system(&wine, &["sc", "query", &name])).contains("RUNNING");
    let install_release = |version: &str, published: &Published| {
        let pending = wait_staged(&[&state], version, published, Duration::from_secs(60));
        assert!(
            pending.is_empty(),
            "{version} not staged: {}",
            node_log(&state)
        );
        let before = read(&var.join("current"));
        let out = wine.run_ok(&["apply", version, "--state", &win(&state)]);
        assert!(out.contains(&format!("committed {version}")), "{out}");
        assert!(running(), "the service runs {version}");
        assert!(read(&var.join("current")).starts_with(&format!("{version} ")));
        if !before.is_empty() {
            assert_eq!(
                read(&var.join("closed")),
                before,
                "the SCM stopped the old one"
            );
        }
    };
    install_release("1.0", &v1);
    let v2 = release("2.0", "2.0");
    wine.run_ok(&["check", "--state", &win(&state)]);
    install_release("2.0", &v2);
    let second = read(&var.join("current"));
    // 3.0 reports itself stopped at once: rolled back, 2.0 runs again.
    let v3 = release("3.0", "3.0 broken");
    wine.run_ok(&["check", "--state", &win(&state)]);
    let pending = wait_staged(&[&state], "3.0", &v3, Duration::from_secs(60));
    assert!(pending.is_empty(), "3.0 not staged: {}", node_log(&state));
    let out = wine.run(&["apply", "3.0", "--state", &win(&state)]);
    let told = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "a broken service is refused: {told}");
    assert!(told.contains("rolled back"), "{told}");
    assert!(told.contains(&name), "{told}");
    wait_for(
        "the 2.0 service runs again",
        Duration::from_secs(20),
        || {
            let now = read(&var.join("current"));
            now.starts_with("2.0 ") && now != second && running()
        },
    );
    assert_eq!(read(&install.join("VERSION")), "2.0");
    drop(node.proc.take());
}

/// The own row of `lanup.exe status --json` at `state`.
fn own_row(wine: &Wine, state: &Path) -> serde_json::Value {
    let out = wine.run(&["status", "--state", &win(state), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["self"] == true).cloned())
        .unwrap_or_default()
}

#[test]
fn a_windows_node_replaces_its_own_lanup_exe_and_keeps_the_old_one_when_the_new_one_never_answers()
{
    let Some(wine) = wine() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (publisher, admin) = (keygen(root, "publisher.key"), keygen(root, "admin.key"));
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let origin = OriginProc::start(&www, None);
    let programs = EndUnder::new(root);
    // The node runs lanup.exe from a folder of its own, as from Program
    // Files.
    let bin = root.join("bin/lanup.exe");
    std::fs::create_dir_all(bin.parent().expect("bin")).expect("mkdir");
    std::fs::copy(&wine.exe, &bin).expect("copy lanup.exe");
    let old_hash = blake3::hash(&std::fs::read(&bin).expect("read"))
        .to_hex()
        .to_string();
    let state = root.join("node/state");
    let node = WinNode::start_from(
        &wine,
        &bin,
        &state,
        &[
            "--trust-publisher",
            &publisher.1,
            "--trust-admin",
            &admin.1,
            "--site",
            &format!("win-self-{}", free_port()),
            "--origin",
            &origin.url,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--self-update-timeout",
            "20s",
        ],
    );
    node.wait_up(&wine);
    assert_eq!(
        own_row(&wine, &state)["lanup_version"],
        env!("CARGO_PKG_VERSION")
    );
    let roll_out = |version: &str, dir: &Path| {
        let release = publish_as("lanup", dir, version, &origin.url, &publisher, &www);
        wine.run_ok(&["check", "--state", &win(&state)]);
        let pending = wait_staged(&[&state], version, &release, Duration::from_secs(90));
        assert!(
            pending.is_empty(),
            "{version} not staged: {}",
            node_log(&state)
        );
        let out = wine.run(&[
            "rollout",
            version,
            "--key",
            &win(&admin.0),
            "--state",
            &win(&state),
            "--waves",
            "1,100%",
            "--wait",
            "--timeout",
            "100s",
        ]);
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        (out.status.success(), said.into_owned())
    };

    // A newer lanup.exe (this one, with a version stamped at its end):
    // renamed aside while it runs, the new one in place, tried, proven and
    // run; the new process removes the old file once the old process is
    // gone.
    let good = root.join("good");
    std::fs::create_dir_all(&good).expect("mkdir");
    let mut exe = std::fs::read(&wine.exe).expect("read lanup.exe");
    exe.extend_from_slice(b"\nLANUP-TEST-VERSION=9.0.0\n");
    std::fs::write(good.join("lanup.exe"), &exe).expect("write");
    let new_hash = blake3::hash(&exe).to_hex().to_string();
    let (ok, said) = roll_out("9.0.0", &good);
    assert!(
        ok,
        "rollout of lanup.exe 9.0.0: {said}\n{}",
        node_log(&state)
    );
    wait_for(
        "the node runs lanup.exe 9.0.0",
        Duration::from_secs(60),
        || own_row(&wine, &state)["lanup_version"] == "9.0.0",
    );
    let on_disk = || {
        blake3::hash(&std::fs::read(&bin).expect("read"))
            .to_hex()
            .to_string()
    };
    assert_eq!(
        on_disk(),
        new_hash,
        "the installed lanup.exe is the new one"
    );
    assert_ne!(old_hash, new_hash);
    wait_for(
        "only lanup.exe is left in its folder",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(bin.parent().expect("bin"))
                .expect("read_dir")
                .count()
                == 1
        },
    );

    eprintln!(
        "lanup.exe 9.0.0 in place: {}",
        if node_log(&state).contains("removed the lanup the last update replaced") {
            "the new process removed the old lanup.exe"
        } else {
            "the old process could delete its own image (Wine allows it; Windows does not)"
        }
    );

    // A lanup.exe that starts and never answers (a Windows program that
    // is not lanup at all): given up after the node's
    // self_update_timeout, ended, and the old lanup.exe back and running.
    let hangs = root.join("hangs");
    std::fs::create_dir_all(&hangs).expect("mkdir");
    std::fs::copy(&wine.tims, hangs.join("lanup.exe")).expect("copy TIMS.exe");
    let (ok, said) = roll_out("9.1.0", &hangs);
    assert!(!ok, "a lanup.exe that never answers is refused: {said}");
    assert!(
        said.contains("did not prove itself within 20s"),
        "{said}\n{}",
        node_log(&state)
    );
    wait_for(
        "the node runs lanup.exe 9.0.0 again",
        Duration::from_secs(60),
        || own_row(&wine, &state)["lanup_version"] == "9.0.0",
    );
    assert_eq!(
        on_disk(),
        new_hash,
        "the installed lanup.exe is 9.0.0's again"
    );
    // The one tried was ended: one lanup.exe node runs, the old one.
    let nodes: Vec<String> = programs
        .running("lanup.exe")
        .into_iter()
        .filter(|line| line.contains(" node "))
        .collect();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}
