//! Applications as they really run: a program that forks and whose
//! launcher exits. Debian's nginx with its default `daemon on;` is the
//! application: the process lanup starts exits 0 at once, and the nginx
//! master it left (named by `app.pid_file`) is the one stopped, judged and
//! rolled back.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

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
    assert_eq!(served(port), "2.0");
    let third = master(&site).expect("2.0's nginx runs again");
    assert_ne!(third, second);
    assert!(!alive(second));
    site.stop_node();
}
