//! The site on the LAN testbed (root): nodes in their own network
//! namespaces on a bridge find each other by real mDNS, with no static
//! peers; the origin sits behind a `tbf`-shaped uplink.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::testbed::{self, Host, Testbed};

const ORIGIN_PORT: u16 = 8080;

/// A running origin on the testbed.
pub(crate) struct LanOrigin {
    pub(crate) url: String,
    addr: String,
    /// The host the test asks the origin's byte counter from.
    pub(crate) via: Host,
    _proc: Proc,
}

impl LanOrigin {
    /// Starts `lanup origin` in the origin namespace and waits until it
    /// answers.
    pub(crate) fn start(bed: &Testbed, www: &Path, log: &Path) -> LanOrigin {
        let addr = format!("{}:{ORIGIN_PORT}", bed.origin.ip);
        let mut cmd = lanup();
        cmd.arg("origin")
            .arg("--dir")
            .arg(www)
            .args(["--listen", &addr]);
        let proc = Testbed::spawn(&bed.origin, &cmd, log);
        let origin = LanOrigin {
            url: format!("http://{addr}/"),
            addr,
            via: bed.hosts[0].clone(),
            _proc: proc,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Testbed::http_get(&origin.via, &origin.addr, "/_lanup/stats").is_err() {
            assert!(Instant::now() < deadline, "the origin did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        origin
    }

    /// Body bytes the origin has served so far.
    pub(crate) fn bytes_served(&self) -> u64 {
        let body =
            Testbed::http_get(&self.via, &self.addr, "/_lanup/stats").expect("origin answers");
        serde_json::from_str::<serde_json::Value>(&body).expect("stats are JSON")["bytes_served"]
            .as_u64()
            .expect("a byte count")
    }
}

/// One `lanup node` per testbed host, state under `dir`, with `extra`
/// flags; returns the state directories and the processes.
fn start_nodes(
    bed: &Testbed,
    dir: &Path,
    origin: &str,
    publisher: &str,
    site: &str,
    extra: &[&str],
) -> (Vec<PathBuf>, Vec<Proc>) {
    let states: Vec<PathBuf> = (0..bed.hosts.len())
        .map(|i| dir.join(format!("node{i}")))
        .collect();
    let nodes = bed
        .hosts
        .iter()
        .zip(&states)
        .map(|(host, state)| {
            let mut cmd = node_command(state, Some(origin), publisher, site);
            cmd.args(extra);
            Testbed::spawn(host, &cmd, &state.with_extension("log"))
        })
        .collect();
    (states, nodes)
}

#[test]
fn lan_site_finds_its_peers_by_mdns_and_takes_one_copy_over_the_uplink() {
    if !testbed::available() {
        return;
    }
    let bed = Testbed::new(5, "32mbit");
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(6 * 1024 * 1024, 31));
    write(&app, "lib/data.bin", &pseudo_random(1_000_000, 32));
    write(&app, "etc/app.conf", b"port = 1\n");
    let www = tmp.path().join("www");
    let key = keygen(tmp.path(), "publisher.key");
    let url = format!("http://{}:{ORIGIN_PORT}/", bed.origin.ip);
    let release = publish(&app, "1.0", &url, &key, &www);
    let origin = LanOrigin::start(&bed, &www, &tmp.path().join("origin.log"));

    let site = format!("lan-{}", std::process::id());
    let (states, _nodes) = start_nodes(&bed, tmp.path(), &origin.url, &release.public, &site, &[]);

    let refs: Vec<&Path> = states.iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&refs, "1.0", &release, Duration::from_secs(90));
    assert!(
        pending.is_empty(),
        "{} of {} nodes did not stage; a node's log:\n{}",
        pending.len(),
        states.len(),
        node_log(pending.first().copied().unwrap_or(&states[0]))
    );

    // A node that fetched before it heard of a lower PeerId hands over; the
    // uplink still carries one copy.
    let downloaders = states
        .iter()
        .filter(|s| node_log(s).contains("downloading release from the origin"))
        .count();
    let served = origin.bytes_served();
    let limit = (release.size as f64 * 1.02) as u64 + release.manifest_bytes * 10;
    assert!(
        served <= limit,
        "origin served {served} bytes for a {}-byte release (limit {limit}); {downloaders} nodes downloaded; their logs:\n{}",
        release.size,
        states
            .iter()
            .filter(|s| node_log(s).contains("downloading release from the origin"))
            .map(|s| node_log(s))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    // Every node found the four others by mDNS alone.
    let status = wait_status_staged(&states[0], 5, "1.0", Duration::from_secs(5));
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 5, "status lists the whole site: {status}");
    assert!(
        nodes.iter().all(|n| n["state"] == "staged"),
        "all staged in status: {status}"
    );
}

#[test]
fn a_fetcher_cut_off_from_the_origin_is_replaced_while_its_heartbeats_go_on() {
    if !testbed::available() {
        return;
    }
    let bed = Testbed::new(3, "8mbit");
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(8 << 20, 33));
    let www = tmp.path().join("www");
    let key = keygen(tmp.path(), "publisher.key");
    let url = format!("http://{}:{ORIGIN_PORT}/", bed.origin.ip);
    let release = publish(&app, "1.0", &url, &key, &www);
    let mut origin = LanOrigin::start(&bed, &www, &tmp.path().join("origin.log"));
    let site = format!("cut-{}", std::process::id());
    let (states, _nodes) = start_nodes(
        &bed,
        tmp.path(),
        &origin.url,
        &release.public,
        &site,
        &["--origin-stall-timeout", "2s"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while origin.bytes_served() < 2 << 20 {
        assert!(Instant::now() < deadline, "the download did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetcher = (0..states.len())
        .find(|&i| node_log(&states[i]).contains("downloading release from the origin"))
        .expect("a fetcher");
    // The byte counter is read through a host that keeps its route.
    origin.via = bed.hosts[(fetcher + 1) % bed.hosts.len()].clone();
    // Its route to the origin is gone; the LAN (and its heartbeats) stay.
    let cut = std::process::Command::new("ip")
        .args(["-n", &bed.hosts[fetcher].ns, "route", "add", "blackhole"])
        .arg(format!("{}/32", bed.origin.ip))
        .status()
        .expect("ip runs");
    assert!(cut.success());
    let at = Instant::now();
    let took_over = || {
        (0..states.len())
            .filter(|&i| i != fetcher)
            .any(|i| node_log(&states[i]).contains("this node is now the site's fetcher"))
    };
    while !took_over() {
        assert!(
            at.elapsed() < Duration::from_secs(40),
            "no node took over from the cut-off fetcher; its log:\n{}",
            node_log(&states[fetcher])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let takeover = at.elapsed();
    let refs: Vec<&Path> = states.iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&refs, "1.0", &release, Duration::from_secs(90));
    assert!(
        pending.is_empty(),
        "not staged; a log:\n{}",
        node_log(pending.first().copied().unwrap_or(&states[0]))
    );
    let served = origin.bytes_served();
    // What the origin had written into the cut-off fetcher's connection
    // (its socket buffer and the shaped link's queue) is counted as served
    // and lost with it, as with a fetcher that stalls.
    let limit = release.size * 3 / 2 + release.manifest_bytes * 10;
    assert!(
        served <= limit,
        "origin served {served} bytes for a {}-byte release (limit {limit})",
        release.size
    );
    eprintln!(
        "fetcher cut off; another took over after {takeover:?}; origin served {:.3} x S",
        served as f64 / release.size as f64
    );
}
