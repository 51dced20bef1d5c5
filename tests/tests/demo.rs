//! `lanup demo` runs end to end with small settings: one copy of each
//! release crosses the capped uplink for the whole site, every node ends on
//! version 2 with its application stopped at the end, and what the demo
//! reports as uplink traffic is what the origin counted.

use crate::common::*;

/// The number after `prefix` in `out`'s line that contains it.
fn number_after(out: &str, prefix: &str) -> u64 {
    out.lines()
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
}

#[test]
fn a_demo_site_of_three_rolls_out_two_releases_that_each_crossed_the_uplink_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    let size: u64 = 3 * 1024 * 1024;
    let out = run_ok(&[
        "demo",
        "--nodes",
        "3",
        "--size",
        "3MiB",
        "--rate",
        "400mbit",
        "--dir",
        s(&dir),
    ]);
    assert_eq!(out.matches("done: every node runs").count(), 2, "{out}");
    let total = number_after(&out, "uplink total: ");
    let served = number_after(&out, "/_lanup/stats says ");
    assert_eq!(total, served, "the report's uplink is the origin's count");
    // One copy of v1 and v2's changed chunks, not one per node.
    assert!(
        served > size && served < 2 * size,
        "{served} bytes over the uplink for 3 nodes of a {size}-byte release:\n{out}"
    );
    // The nodes' own count of chunk bytes from the origin accounts for all
    // but the manifests and signatures.
    let counted = number_after(&out, "the nodes counted ");
    assert!(
        counted <= served && served - counted < 64 * 1024,
        "{counted} counted by the nodes, {served} served\n{out}"
    );
    for i in 0..3 {
        let state = dir.join(format!("node{i}"));
        let verify = run_ok(&["verify", "--state", s(&state)]);
        assert!(verify.contains("2.0.0"), "node {i}: {verify}");
        let install = dir.join(format!("install{i}"));
        let version = std::fs::read_to_string(install.join("VERSION")).expect("VERSION");
        assert_eq!(version.trim(), "2.0.0");
        // The demo's application ran 2.0.0 and was stopped at the end.
        let ran = std::fs::read_to_string(install.join("var/current")).expect("var/current");
        assert!(ran.starts_with("2.0.0 "), "{ran}");
        assert_eq!(crate::apply::pids_under(&install), Vec::<i32>::new());
    }
}
