//! A site on loopback: one `lanup origin` and five `lanup node` processes
//! that know each other by static address. Exactly one of them downloads the
//! release; all stage it with the published hashes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

/// A free loopback TCP port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct NodeProc {
    state: PathBuf,
    _proc: Proc,
}

fn start_node(
    state: &Path,
    port: u16,
    peers: &[u16],
    origin: &str,
    publisher: &str,
    site: &str,
) -> NodeProc {
    let mut cmd = lanup();
    cmd.arg("node")
        .arg("--state")
        .arg(state)
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")])
        .args([
            "--origin",
            origin,
            "--trust-publisher",
            publisher,
            "--site",
            site,
        ])
        .args(["--poll-interval", "1h", "--no-mdns"])
        .env("LANUP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(state.with_extension("log")).expect("log file"),
        ));
    for p in peers {
        cmd.args(["--peer", &format!("/ip4/127.0.0.1/tcp/{p}")]);
    }
    NodeProc {
        state: state.to_owned(),
        _proc: Proc(cmd.spawn().expect("node starts")),
    }
}

#[test]
fn five_nodes_stage_a_release_that_crossed_the_uplink_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(5 * 1024 * 1024, 21));
    write(&app, "lib/data.bin", &pseudo_random(1_500_000, 22));
    write(&app, "etc/app.conf", b"port = 1\n");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let (key, public) = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, Some("32MiB"));
    run_ok(&[
        "publish",
        "--dir",
        s(&app),
        "--version",
        "1.0",
        "--app",
        "app",
        "--url",
        &origin.url,
        "--key",
        s(&key),
        "--out",
        s(&www),
    ]);
    let release_size: u64 = 5 * 1024 * 1024 + 1_500_000 + 9;
    let manifest_bytes = std::fs::metadata(www.join("AutoUpdater.xml"))
        .expect("manifest")
        .len()
        + std::fs::metadata(www.join("AutoUpdater.xml.sig"))
            .expect("sig")
            .len();

    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let site = format!("loop-{}", std::process::id());
    let nodes: Vec<NodeProc> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let others: Vec<u16> = ports.iter().copied().filter(|p| p != port).collect();
            start_node(
                &tmp.path().join(format!("node{i}")),
                *port,
                &others,
                &origin.url,
                &public,
                &site,
            )
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pending: Vec<&NodeProc> = nodes.iter().collect();
    while !pending.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        pending.retain(|n| {
            let staged = n.state.join("staging/1.0");
            !(staged.is_dir()
                && run(&[
                    "verify",
                    "--manifest",
                    s(&www),
                    "--dir",
                    s(&staged),
                    "--trust",
                    &public,
                ])
                .status
                .success())
        });
    }
    let logs: Vec<String> = nodes
        .iter()
        .map(|n| std::fs::read_to_string(n.state.with_extension("log")).unwrap_or_default())
        .collect();
    assert!(
        pending.is_empty(),
        "{} of 5 nodes did not stage; first node's log:\n{}",
        pending.len(),
        logs[0]
    );
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    let limit = (release_size as f64 * 1.02) as u64 + manifest_bytes * 10;
    assert!(
        served <= limit,
        "origin served {served} bytes for a {release_size}-byte release (limit {limit})"
    );
    assert_eq!(
        logs.iter()
            .filter(|l| l.contains("downloading release from the origin"))
            .count(),
        1,
        "exactly one node downloads from the origin"
    );
}
