//! Applications as they really run: a program that forks and whose
//! launcher exits, and one that is a systemd unit. Debian's nginx with its
//! default `daemon on;` is the first: the process lanup starts exits 0 at
//! once, and the nginx master it left (named by `app.pid_file`) is the one
//! stopped, judged and rolled back. The second runs under Debian's systemd
//! booted as PID 1 of a container of the test's own, where lanup itself
//! runs from the shipped unit file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::apply::{alive, AppSite};
use crate::common::*;
use crate::swarm::free_port;

const NGINX: &str = "/usr/sbin/nginx";

/// A release of the site nginx serves: its configuration (daemon on, its
/// pid in logs/nginx.pid) and a page saying `version`, or none.
fn nginx_release(dir: &Path, port: u16, version: Option<&str>) {
    let _ = std::fs::remove_dir_all(dir);
    write(
        dir,
        "conf/nginx.conf",
        format!(
            "daemon on;\npid logs/nginx.pid;\nerror_log logs/error.log;\nworker_processes 1;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off;\n  server {{ listen 127.0.0.1:{port}; root html; }}\n}}\n"
        )
        .as_bytes(),
    );
    write(dir, "logs/README", b"nginx writes its pid and log here\n");
    if let Some(version) = version {
        write(dir, "html/version.txt", format!("{version}\n").as_bytes());
    }
}

/// What nginx serves at /version.txt ("" when it does not answer 200).
fn served(port: u16) -> String {
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.write_all(b"GET /version.txt HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.trim().to_owned(),
        _ => String::new(),
    }
}

/// The nginx master the pid file names, if it runs.
fn master(site: &AppSite) -> Option<u32> {
    let pid = std::fs::read_to_string(site.install.join("logs/nginx.pid")).ok()?;
    let pid: u32 = pid.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

#[test]
fn nginx_with_daemon_on_is_updated_restarted_and_rolled_back() {
    if !Path::new(NGINX).exists() {
        panic!("{NGINX} is missing (apt-get install nginx-light)");
    }
    let port = free_port();
    let mut site = AppSite::new("");
    let install = site.install.clone();
    // The health check asks nginx for the page the release carries.
    std::fs::write(
        &site.config,
        format!(
            "[app]\nname = \"nginx\"\ninstall_dir = \"{dir}\"\n\
             start = [\"{NGINX}\", \"-p\", \"{dir}\", \"-c\", \"conf/nginx.conf\"]\n\
             pid_file = \"logs/nginx.pid\"\nhealth_after = \"1s\"\nstop_timeout = \"10s\"\n\
             health_command = [\"/bin/bash\", \"-c\", \"exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /version.txt HTTP/1.0\\\\r\\\\n\\\\r\\\\n' >&3 && grep -q ' 200 ' <&3\"]\n",
            dir = install.display()
        ),
    )
    .expect("config");
    let tree = site.root.join("release");
    nginx_release(&tree, port, Some("1.0"));
    let v1 = site.publish(&tree, "1.0");
    site.start_node(true, None);
    site.stage("1.0", &v1);
    let out = site.apply_ok("1.0");
    assert!(out.contains("committed 1.0"), "{out}");
    assert_eq!(served(port), "1.0");
    let first = master(&site).expect("the nginx master runs");

    nginx_release(&tree, port, Some("2.0"));
    let v2 = site.publish(&tree, "2.0");
    site.stage("2.0", &v2);
    let out = site.apply_ok("2.0");
    assert!(out.contains("committed 2.0"), "{out}");
    assert_eq!(served(port), "2.0");
    let second = master(&site).expect("the new nginx master runs");
    assert_ne!(first, second, "nginx was restarted");
    assert!(!alive(first), "the old master is gone");
    assert!(
        node_log(&site.state).contains("judging the process it left running"),
        "{}",
        node_log(&site.state)
    );

    // 3.0 serves no page: its health check fails, 2.0 is put back and
    // started again, and serves.
    nginx_release(&tree, port, None);
    let v3 = site.publish(&tree, "3.0");
    site.stage("3.0", &v3);
    let out = site.apply("3.0");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "3.0 must be refused: {said}");
    assert!(said.contains("rolled back"), "{said}");
    // The rollback ends once 2.0's launcher has exited; its master then
    // takes a moment to serve (long on a loaded machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while served(port) != "2.0" {
        assert!(
            std::time::Instant::now() < deadline,
            "2.0 does not serve after the rollback: {said}\nnode log:\n{}\nnginx:\n{}",
            node_log(&site.state),
            std::fs::read_to_string(install.join("logs/error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let third = master(&site).expect("2.0's nginx runs again");
    assert_ne!(third, second);
    assert!(!alive(second));
    site.stop_node();
}

/// Debian's systemd booted as PID 1 of new PID, mount, UTS and IPC
/// namespaces (a container made with `unshare`), with a /run of its own
/// holding the test's units, starting `target` only. Dropping it kills its
/// PID 1, which ends every process in the container.
struct Systemd {
    unshare: Child,
    pid1: u32,
}

const SYSTEMD: &str = "/lib/systemd/systemd";

impl Systemd {
    /// Boots with the unit files in `units` and waits until systemd
    /// answers.
    fn boot(units: &Path, target: &str) -> Systemd {
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/system; \
             cp '{}'/* /run/systemd/system/; \
             exec {SYSTEMD} --system --unit={target} --log-target=console",
            units.display()
        );
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--fork",
                "--mount-proc",
            ])
            .args(["--propagation", "private", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare starts");
        let mut boxed = Systemd { unshare, pid1: 0 };
        let children = format!("/proc/{0}/task/{0}/children", boxed.unshare.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if boxed.pid1 == 0 {
                let said = std::fs::read_to_string(&children).unwrap_or_default();
                boxed.pid1 = said
                    .split_whitespace()
                    .next()
                    .map_or(0, |p| p.parse().unwrap_or(0));
            }
            if boxed.pid1 != 0
                && boxed
                    .systemctl(&["show", "--property=Version"])
                    .status
                    .success()
            {
                return boxed;
            }
            if let Ok(Some(status)) = boxed.unshare.try_wait() {
                panic!("systemd in its container exited {status} at boot");
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `systemctl ARGS` against this systemd.
    fn systemctl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-m", "-p", "--", "systemctl"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter runs")
    }

    /// A property of a unit, as `systemctl show` gives it.
    fn property(&self, unit: &str, property: &str) -> String {
        let out = self.systemctl(&["show", "--value", &format!("--property={property}"), unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid1 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// The shipped unit file, running `node` (the test's node command) with
/// its log in `log`; what ties it to a real machine (its boot ordering,
/// the state and configuration directories under /var/lib and /etc) left
/// out, and the rest (Type=notify, the watchdog, the hardening) as shipped.
fn lanup_unit(node: &Command, log: &Path) -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/lanup.service"),
    )
    .expect("packaging/systemd/lanup.service");
    let quote = |arg: &std::ffi::OsStr| {
        let arg = arg.to_str().expect("UTF-8 argument");
        assert!(!arg.contains(['"', '\\', '\n']), "{arg}");
        format!("\"{}\"", arg.replace('%', "%%").replace('$', "$$"))
    };
    let exec = std::iter::once(node.get_program())
        .chain(node.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut env = String::new();
    for (key, value) in node.get_envs() {
        let (key, value) = (
            key.to_str().expect("key"),
            value.and_then(|v| v.to_str()).unwrap_or(""),
        );
        env.push_str(&format!("Environment=\"{key}={value}\"\n"));
    }
    let mut out = String::new();
    for line in unit.lines() {
        let line = match line.split_once('=').map(|(k, _)| k) {
            Some("Wants" | "After") => continue,
            Some("StateDirectory" | "StateDirectoryMode" | "ConfigurationDirectory") => continue,
            Some("ExecStart") => format!(
                "ExecStart={exec}\n{env}StandardOutput=append:{log}\nStandardError=append:{log}",
                log = log.display()
            ),
            _ => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
        if line == "[Unit]" {
            out.push_str("DefaultDependencies=no\n");
        }
    }
    assert!(
        out.contains("Type=notify") && out.contains("WatchdogSec="),
        "{out}"
    );
    out
}

#[test]
fn an_application_that_is_a_systemd_unit_is_updated_restarted_and_rolled_back() {
    for program in [
        SYSTEMD,
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
        "/usr/bin/systemctl",
    ] {
        assert!(
            Path::new(program).exists(),
            "{program} is missing (apt-get install systemd util-linux)"
        );
    }
    let site = AppSite::new("");
    let install = site.install.clone();
    std::fs::write(
        &site.config,
        format!(
            "[app]\nname = \"sample-app\"\ninstall_dir = \"{}\"\nservice = \"sample-app.service\"\n\
             health_after = \"1s\"\nstop_timeout = \"10s\"\n",
            install.display()
        ),
    )
    .expect("config");
    let units: PathBuf = site.root.join("units");
    write(
        &units,
        "sample-app.service",
        format!(
            "[Unit]\nDescription=the application lanup updates\nDefaultDependencies=no\n\
             [Service]\nWorkingDirectory={0}\nExecStart={0}/bin/sample-app\n",
            install.display()
        )
        .as_bytes(),
    );
    let log = site.state.with_extension("log");
    write(
        &units,
        "lanup.service",
        lanup_unit(&site.node_cmd(true), &log).as_bytes(),
    );
    write(
        &units,
        "lanup-test.target",
        b"[Unit]\nDefaultDependencies=no\nWants=lanup.service\n",
    );
    let systemd = Systemd::boot(&units, "lanup-test.target");
    // The node is up once systemd has its READY=1 and it answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(systemd.property("lanup.service", "ActiveState") == "active"
        && run(&["status", "--state", s(&site.state)]).status.success())
    {
        assert!(
            Instant::now() < deadline,
            "lanup.service did not come up: {}\n{}",
            systemd.property("lanup.service", "ActiveState"),
            node_log(&site.state)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        systemd.property("sample-app.service", "ActiveState"),
        "inactive"
    );

    // What the application recorded (its version and pid) against the unit's
    // main pid: the release that runs is the one systemd runs.
    let current = || {
        let said = std::fs::read_to_string(install.join("var/current")).unwrap_or_default();
        let (version, pid) = said.trim().split_once(' ').unwrap_or_default();
        (version.to_owned(), pid.to_owned())
    };
    let tree = site.root.join("release");
    let mut pids = Vec::new();
    for version in ["1.0", "2.0"] {
        crate::apply::app_tree(&tree, version, None, &[]);
        let release = site.publish(&tree, version);
        site.stage(version, &release);
        let out = site.apply_ok(version);
        assert!(out.contains(&format!("committed {version}")), "{out}");
        let (running, pid) = current();
        assert_eq!(running, version);
        assert_eq!(systemd.property("sample-app.service", "MainPID"), pid);
        assert_eq!(
            systemd.property("sample-app.service", "ActiveState"),
            "active"
        );
        assert_eq!(
            crate::apply::pids_under(&install).len(),
            1,
            "one application process"
        );
        pids.push(pid);
    }
    assert_ne!(pids[0], pids[1], "2.0 is a new process");

    // 3.0 exits at once: systemd's start succeeds, the unit then fails, and
    // 2.0 is put back and started by systemd again.
    crate::apply::app_tree(&tree, "3.0", Some("exit"), &[]);
    let v3 = site.publish(&tree, "3.0");
    site.stage("3.0", &v3);
    let out = site.apply("3.0");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "3.0 must be refused: {said}");
    assert!(said.contains("rolled back"), "{said}");
    let (running, pid) = current();
    assert_eq!(running, "2.0", "{said}");
    assert_eq!(systemd.property("sample-app.service", "MainPID"), pid);
    assert_eq!(
        systemd.property("sample-app.service", "ActiveState"),
        "active"
    );
    assert!(!pids.contains(&pid), "2.0 was started again");
    // lanup's own unit stayed up throughout: the watchdog was fed.
    assert_eq!(systemd.property("lanup.service", "ActiveState"), "active");
    assert_eq!(systemd.property("lanup.service", "NRestarts"), "0");
}
