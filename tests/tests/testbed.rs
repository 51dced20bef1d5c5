//! The LAN testbed: one network namespace per host on a Linux bridge, and an
//! origin in a namespace of its own whose egress is shaped with `tbf`, the
//! site's slow uplink. Real mDNS crosses the bridge, as on a real LAN.
//!
//! Everything lives in namespaces named after this test run (`lt<pid>…`);
//! nothing is added to the machine's own network namespace, and the
//! testbed's processes only ever talk to its own 10.77.0.0/24 addresses.
//! Dropping the `Testbed` (also while a test panics) kills every process left
//! in its namespaces and deletes them.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::common::Proc;

/// One network namespace on the bridge.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    pub(crate) ns: String,
    pub(crate) ip: String,
}

/// A bridge, `hosts` LAN hosts and one origin host behind a shaped uplink.
pub(crate) struct Testbed {
    switch: String,
    pub(crate) origin: Host,
    pub(crate) hosts: Vec<Host>,
}

/// Runs `ip`/`tc` and insists it succeeds.
fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the testbed can be built here; when it cannot, says why. Inside
/// CI (root) it always can; a developer without root skips these tests.
pub(crate) fn available() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the LAN testbed tests need root in CI"
    );
    eprintln!("skipped: the LAN testbed needs root (network namespaces)");
    false
}

impl Testbed {
    /// Builds the testbed: `hosts` LAN hosts at 10.77.0.10.. and the origin
    /// at 10.77.0.2, whose link towards the LAN is shaped to `uplink` (a tc
    /// rate such as `16mbit`).
    pub(crate) fn new(hosts: usize, uplink: &str) -> Testbed {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "lt{}x{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        remove_stale();
        let mut bed = Testbed {
            switch: format!("{id}-sw"),
            origin: Host {
                ns: format!("{id}-o"),
                ip: "10.77.0.2".into(),
            },
            hosts: Vec::new(),
        };
        sh("ip", &["netns", "add", &bed.switch]);
        sh(
            "ip",
            &["-n", &bed.switch, "link", "add", "br0", "type", "bridge"],
        );
        sh("ip", &["-n", &bed.switch, "link", "set", "br0", "up"]);
        bed.attach(&bed.origin.clone(), "po");
        sh(
            "tc",
            &[
                "-n",
                &bed.origin.ns,
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                uplink,
                "burst",
                "32kb",
                "latency",
                "100ms",
            ],
        );
        for i in 0..hosts {
            let host = Host {
                ns: format!("{id}-h{i}"),
                ip: format!("10.77.0.{}", 10 + i),
            };
            bed.attach(&host, &format!("p{i}"));
            bed.hosts.push(host);
        }
        bed
    }

    /// Creates `host`'s namespace and plugs it into the bridge.
    fn attach(&self, host: &Host, port: &str) {
        sh("ip", &["netns", "add", &host.ns]);
        sh(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &host.ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &self.switch,
            ],
        );
        sh(
            "ip",
            &["-n", &self.switch, "link", "set", port, "master", "br0"],
        );
        sh("ip", &["-n", &self.switch, "link", "set", port, "up"]);
        let cidr = format!("{}/24", host.ip);
        sh("ip", &["-n", &host.ns, "addr", "add", &cidr, "dev", "eth0"]);
        sh("ip", &["-n", &host.ns, "link", "set", "eth0", "up"]);
        sh("ip", &["-n", &host.ns, "link", "set", "lo", "up"]);
        // A real host has a route for multicast (usually its default route);
        // without one, mDNS cannot send at all.
        sh(
            "ip",
            &["-n", &host.ns, "route", "add", "224.0.0.0/4", "dev", "eth0"],
        );
    }

    /// `cmd`, to be run inside `host`'s namespace.
    pub(crate) fn command(host: &Host, cmd: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &host.ns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped
    }

    /// Starts `cmd` inside `host`'s namespace (`ip netns exec` execs, so the
    /// child is the program itself).
    pub(crate) fn spawn(host: &Host, cmd: &Command, log: &std::path::Path) -> Proc {
        let log = std::fs::File::create(log).expect("log file");
        Proc(
            Testbed::command(host, cmd)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("process starts in its namespace"),
        )
    }

    /// A plain HTTP GET of `path` at `addr` from inside `host`'s namespace;
    /// returns the body.
    pub(crate) fn http_get(host: &Host, addr: &str, path: &str) -> std::io::Result<String> {
        let ns_file = format!("/run/netns/{}", host.ns);
        let addr = addr.to_owned();
        let path = path.to_owned();
        // Only this short-lived thread enters the namespace.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&ns_file).expect("namespace file");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("enter the namespace");
            let mut conn = std::net::TcpStream::connect(&addr)?;
            write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut response = String::new();
            conn.read_to_string(&mut response)?;
            Ok(response
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_owned())
                .unwrap_or_default())
        })
        .join()
        .expect("the GET thread")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let mut all: Vec<&str> = self.hosts.iter().map(|h| h.ns.as_str()).collect();
        all.push(&self.origin.ns);
        all.push(&self.switch);
        for ns in all {
            delete(ns);
        }
    }
}

/// Kills what still runs in `ns` and deletes it.
fn delete(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// Deletes testbed namespaces left by test runs that no longer exist (a run
/// killed with SIGKILL cannot clean up after itself).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("lt")
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete(name);
        }
    }
}
