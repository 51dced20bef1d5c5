//! `lanup demo` runs end to end with small settings, and what it reports
//! as uplink traffic is what the origin counted.

use crate::common::*;

#[test]
fn demo_completes_and_its_uplink_figures_add_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run_ok(&[
        "demo",
        "--size",
        "3MiB",
        "--rate",
        "400mbit",
        "--dir",
        s(tmp.path()),
    ]);
    assert_eq!(out.matches("staged and verified").count(), 2, "{out}");
    // The table's "over uplink" figures are origin counter deltas; the
    // counter's total must cover both releases and no more than twice v1.
    let served: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("origin /_lanup/stats: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stats line in {out}"));
    let v1 = 3 * 1024 * 1024;
    assert!(
        served > v1 && served < 2 * v1,
        "{served} bytes served\n{out}"
    );
    // The second release shares most chunks with the first.
    let v2_line = out
        .lines()
        .find(|l| l.starts_with("1.1.0"))
        .expect("v2 row");
    let share: f64 = v2_line
        .split_whitespace()
        .find_map(|w| w.strip_suffix('%'))
        .and_then(|p| p.parse().ok())
        .expect("share column");
    assert!(share < 100.0, "{v2_line}");
    // Staged files are the published ones.
    let staged = tmp.path().join("node/staging/1.1.0");
    run_ok(&[
        "verify",
        "--manifest",
        s(&tmp.path().join("origin")),
        "--dir",
        s(&staged),
    ]);
}
