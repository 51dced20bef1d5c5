//! The node's Prometheus endpoint, read by Prometheus' own text-format
//! parser (Debian's python3-prometheus-client).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::swarm::{free_port, LoopSite};

/// Every sample of an OpenMetrics text, by name and labels, as parsed by
/// the reference parser; a text it cannot parse fails the test.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (apt-get install python3-prometheus-client)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("parser runs");
    assert!(
        out.status.success(),
        "the metrics do not parse: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|r| r.text())
        .expect("metrics answer");
    parse(&text)
}

#[test]
fn metrics_parse_and_their_byte_counters_match_the_origin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(3 * 1024 * 1024, 5));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    let mut site = LoopSite::new(tmp.path(), 2);
    let ports = [free_port(), free_port()];
    for (i, port) in ports.iter().enumerate() {
        let mut cmd = site.command(i, Some(&origin.url), &release.public);
        cmd.args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &release, Duration::from_secs(60));
    assert!(pending.is_empty(), "not staged: {pending:?}");

    // Counters are brought up to date at each heartbeat (1 s).
    let served = origin.stats()["bytes_served"]
        .as_u64()
        .expect("bytes_served");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (a, b) = loop {
        let (a, b) = (scrape(ports[0]), scrape(ports[1]));
        let from_origin =
            a["lanup_origin_received_bytes_total"] + b["lanup_origin_received_bytes_total"];
        // Each node shows the release staged once its next heartbeat
        // brought its gauges up to date.
        let current = [&a, &b]
            .iter()
            .all(|m| m.contains_key("lanup_release{kind=staged,version=1.0}"));
        if current && from_origin as u64 + release.manifest_bytes == served
            || Instant::now() > deadline
        {
            break (a, b);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let from_origin =
        a["lanup_origin_received_bytes_total"] + b["lanup_origin_received_bytes_total"];
    assert_eq!(
        from_origin as u64 + release.manifest_bytes,
        served,
        "the nodes' origin bytes plus the manifest are what the origin served\n{a:?}\n{b:?}"
    );
    // What one node got from its peer is what the other served it, and
    // together with the origin's part, the release.
    assert_eq!(
        a["lanup_peer_received_bytes_total"], b["lanup_served_bytes_total"],
        "{a:?}\n{b:?}"
    );
    assert_eq!(
        b["lanup_peer_received_bytes_total"], a["lanup_served_bytes_total"],
        "{a:?}\n{b:?}"
    );
    for m in [&a, &b] {
        assert_eq!(
            (m["lanup_origin_received_bytes_total"] + m["lanup_peer_received_bytes_total"]) as u64,
            release.size,
            "{m:?}"
        );
        assert_eq!(m["lanup_peers"], 1.0, "{m:?}");
        assert_eq!(m["lanup_peer_bans_total"], 0.0, "{m:?}");
    }
}
