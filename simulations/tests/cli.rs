//! `lanup-sim` as a user runs it: a checked-in scenario, JSON with the
//! fields the issue names, a plot, and clear errors for bad input.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lanup-sim"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("lanup-sim runs")
}

#[test]
fn a_scenario_file_gives_json_with_the_figures_and_a_plot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let svg = tmp.path().join("plot.svg");
    let out = sim(&[
        "--scenario",
        "scenarios/testbed.toml",
        "--sites",
        "3",
        "--json",
        "--plot",
        svg.to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for key in [
        "uplink_bytes_per_site",
        "staged_p50_s",
        "staged_p99_s",
        "bound_s",
        "naive_s",
    ] {
        assert!(r[key].is_number(), "{key} in {r}");
    }
    assert_eq!(r["uplink_bytes_per_site"], 64 << 20);
    let staged = r["staged_p50_s"].as_f64().expect("p50");
    let bound = r["bound_s"].as_f64().expect("bound");
    assert!(staged >= bound && staged < r["naive_s"].as_f64().expect("naive"));
    let drawn = std::fs::read_to_string(&svg).expect("plot written");
    assert!(drawn.starts_with("<svg") && drawn.contains("lower bound") && drawn.contains("naive"));
}

#[test]
fn bad_input_names_the_key_and_the_reason() {
    let out = sim(&["--uplink", "fast"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uplink \"fast\""), "{err}");
    let out = sim(&["--scenario", "no/such.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no/such.toml"),
        "{err}"
    );
    let out = sim(&["--shared", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("shared 2"), "{err}");
}
