//! Patches and packed chunks over the uplink, on loopback: a C program
//! compiled twice with one function changed and a data file edited in
//! place. Nodes that hold the old release take the new one as patches,
//! within a tenth of what `zstd --patch-from` needs; patches that lie,
//! blobs cut short or swapped, and a node without the base all end with
//! the right files from chunks, the reason said, and no loop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::swarm::LoopSite;

/// A C program of `functions` functions; `changed` alters one early on, so
/// every later function moves, as a rebuilt program's code does.
fn c_program(functions: usize, changed: bool) -> String {
    let mut src = String::from("#include <stdio.h>\n#include <stdlib.h>\n");
    for i in 0..functions {
        let body = if i == 3 && changed {
            "int s = x * 7 + 2; for (int k = 0; k < (x & 31); k++) s ^= k * 2654435761u; return s - (x >> 1);".to_owned()
        } else {
            format!(
                "int s = x + {i}; switch (x % 5) {{ case 0: s *= {a}; break; case 1: s ^= {b}; break; case 2: s -= {c}; break; default: s += {i}; }} return s;",
                a = i * 3 + 1,
                b = i * 7 + 5,
                c = i * 11 + 3
            )
        };
        src.push_str(&format!("int f{i}(int x) {{ {body} }}\n"));
    }
    src.push_str("int main(int argc, char **argv) { long t = 0;\n");
    for i in 0..functions {
        src.push_str(&format!("  t += f{i}(argc + {i});\n"));
    }
    src.push_str("  printf(\"%ld\\n\", t); return 0; }\n");
    src
}

/// Compiles `src` into `out` with gcc.
fn compile(src: &str, out: &Path, dir: &Path) {
    let c = dir.join("prog.c");
    std::fs::write(&c, src).expect("write C source");
    std::fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
    let status = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(out)
        .arg(&c)
        .status()
        .expect("gcc runs (apt-get install gcc)");
    assert!(status.success(), "gcc failed");
}

/// Lines of text, one edited in place in the new version.
fn data_file(edited: bool) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..60_000 {
        if edited && i == 30_000 {
            out.push_str("this line was edited in place for the new release\n");
        } else {
            out.push_str(&format!(
                "record {i:06} value {} {}\n",
                i * 7919 % 10007,
                ["alpha", "beta", "gamma", "delta"][i % 4]
            ));
        }
    }
    out.into_bytes()
}

/// The release pair: (old folder, new folder).
fn release_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (v1, v2) = (dir.join("v1"), dir.join("v2"));
    compile(&c_program(1500, false), &v1.join("bin/app"), dir);
    compile(&c_program(1500, true), &v2.join("bin/app"), dir);
    write(&v1, "share/data.txt", &data_file(false));
    write(&v2, "share/data.txt", &data_file(true));
    write(&v1, "etc/app.conf", b"port = 1\n");
    write(&v2, "etc/app.conf", b"port = 1\n");
    (v1, v2)
}

/// What `zstd -19 --long --patch-from` needs for the new release over the
/// old one: per changed file, the patch (or the file compressed, when it
/// is new).
fn zstd_reference(old: &Path, new: &Path) -> u64 {
    let mut total = 0;
    for name in ["bin/app", "share/data.txt", "etc/app.conf"] {
        let (a, b) = (old.join(name), new.join(name));
        if std::fs::read(&a).ok() == std::fs::read(&b).ok() {
            continue;
        }
        let out = Command::new("zstd")
            .args(["-q", "-19", "--long=27", "-c"])
            .arg(format!("--patch-from={}", a.display()))
            .arg(&b)
            .output()
            .expect("zstd runs (apt-get install zstd)");
        assert!(out.status.success(), "zstd failed");
        total += out.stdout.len() as u64;
    }
    total
}

/// Bytes of the new release's chunks that the old one lacks: what today's
/// chunks alone would send.
fn plain_chunk_delta(old: &Path, new: &Path) -> u64 {
    let read = |p: &Path| {
        lanup_protocol::Manifest::parse(&std::fs::read(p).expect("manifest")).expect("parses")
    };
    let (a, b) = (read(old), read(new));
    let held = lanup_protocol::manifest::unique_chunks(&a.files);
    lanup_protocol::manifest::unique_chunks(&b.files)
        .into_iter()
        .filter(|(h, _)| !held.contains_key(h))
        .map(|(_, size)| size)
        .sum()
}

/// The release pair, an origin serving `www`, and 1.0 published there.
struct Setup {
    tmp: tempfile::TempDir,
    v1: PathBuf,
    v2: PathBuf,
    www: PathBuf,
    key: (PathBuf, String),
    origin: OriginProc,
    first: Published,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (v1, v2) = release_pair(tmp.path());
        let www = tmp.path().join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let key = keygen(tmp.path(), "publisher.key");
        let origin = OriginProc::start(&www, None);
        let first = publish(&v1, "1.0", &origin.url, &key, &www);
        Setup {
            tmp,
            v1,
            v2,
            www,
            key,
            origin,
            first,
        }
    }
}

#[test]
fn nodes_holding_the_old_release_take_the_new_one_as_patches() {
    let Setup {
        tmp,
        v1,
        v2,
        www,
        key,
        origin,
        first,
    } = Setup::new();
    let old_manifest = tmp.path().join("v1.xml");
    std::fs::copy(www.join("AutoUpdater.xml"), &old_manifest).expect("copy");

    let mut site = LoopSite::new(tmp.path(), 2);
    for i in 0..2 {
        let cmd = site.command(i, Some(&origin.url), &first.public);
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &first, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "1.0 not staged:\n{}",
        node_log(&site.states[0])
    );
    let served_before = origin.stats()["bytes_served"].as_u64().expect("count");

    let second = publish(&v2, "2.0", &origin.url, &key, &www);
    run_ok(&["check", "--state", s(&site.states[1])]);
    let pending = wait_staged(&site.state_refs(), "2.0", &second, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "2.0 not staged:\n{}",
        node_log(&site.states[0])
    );

    // What the origin sent, less the new manifest and its signature.
    let served = origin.stats()["bytes_served"].as_u64().expect("count") - served_before;
    let took = served.saturating_sub(second.manifest_bytes);
    let reference = zstd_reference(&v1, &v2);
    let plain = plain_chunk_delta(&old_manifest, &www.join("AutoUpdater.xml"));
    eprintln!(
        "2.0 over the uplink: {took} bytes of blobs and chunks ({served} with the manifest); zstd --patch-from {reference}; plain chunks {plain}; release {}",
        second.size
    );
    assert!(
        took < plain,
        "{took} bytes is not below the plain chunk delta {plain}"
    );
    assert!(
        took as f64 <= reference as f64 * 1.10,
        "{took} bytes is more than 1.10 x zstd --patch-from's {reference}"
    );
    let logs: String = site.states.iter().map(|s| node_log(s)).collect();
    assert!(
        logs.contains("took patches, runs, packed chunks and bundles"),
        "{logs}"
    );
}

/// Edits the signed manifest in `www` with `edit` and signs it again, as a
/// publisher that made a mistake would.
fn resign(www: &Path, key: &(PathBuf, String), edit: impl FnOnce(&str) -> String) {
    let path = www.join("AutoUpdater.xml");
    let xml = std::fs::read_to_string(&path).expect("manifest");
    std::fs::write(&path, edit(&xml)).expect("write manifest");
    run_ok(&["sign", "--key", s(&key.0), s(&path)]);
}

/// The `Hash` attribute values of every `Patch` element, in order.
fn patch_hashes(xml: &str) -> Vec<String> {
    xml.lines()
        .filter(|l| l.trim_start().starts_with("<Patch "))
        .filter_map(|l| l.split(" Hash=\"").nth(1))
        .map(|h| h[..64].to_owned())
        .collect()
}

/// The `Hash` attribute values of every `Bundle` element.
fn bundle_hashes(xml: &str) -> Vec<String> {
    xml.lines()
        .filter(|l| l.trim_start().starts_with("<Bundle "))
        .filter_map(|l| l.split(" Hash=\"").nth(1))
        .map(|h| h[..64].to_owned())
        .collect()
}

/// The `PackedHash` attribute values.
fn packed_hashes(xml: &str) -> Vec<String> {
    xml.split("PackedHash=\"")
        .skip(1)
        .map(|h| h[..64].to_owned())
        .collect()
}

#[test]
fn broken_patches_and_blobs_and_a_node_without_the_base_end_with_the_right_files() {
    let Setup {
        tmp,
        v1: _,
        v2,
        www,
        key,
        origin,
        first,
    } = Setup::new();

    // Node 0 holds 1.0; node 1 joins later with nothing.
    let mut site = LoopSite::new(tmp.path(), 2);
    let cmd = site.command(0, Some(&origin.url), &first.public);
    site.start(0, cmd);
    let pending = wait_staged(
        &site.state_refs()[..1],
        "1.0",
        &first,
        Duration::from_secs(60),
    );
    assert!(
        pending.is_empty(),
        "1.0 not staged:\n{}",
        node_log(&site.states[0])
    );

    let second = publish(&v2, "2.0", &origin.url, &key, &www);
    let xml = std::fs::read_to_string(www.join("AutoUpdater.xml")).expect("manifest");
    let patches = patch_hashes(&xml);
    assert_eq!(
        patches.len(),
        2,
        "a patch each for bin/app and data.txt:\n{xml}"
    );
    // Both patches are signed but lie: each names the other's bytes, so
    // it decodes (if at all) to something else. bin/app then comes from
    // its bundle, which is cut short on the origin; data.txt from its
    // packed copies: one cut short, every other one swapped for other
    // bytes. Everything ends as plain chunks.
    let (a, b) = (&patches[0], &patches[1]);
    let size_of = |h: &str| {
        std::fs::metadata(www.join("lanup-store/blobs").join(h))
            .expect("blob")
            .len()
    };
    let (size_a, size_b) = (size_of(a), size_of(b));
    resign(&www, &key, |xml| {
        xml.replace(
            &format!("Size=\"{size_a}\" Hash=\"{a}\""),
            "Size=\"A\" Hash=\"A\"",
        )
        .replace(
            &format!("Size=\"{size_b}\" Hash=\"{b}\""),
            &format!("Size=\"{size_a}\" Hash=\"{a}\""),
        )
        .replace(
            "Size=\"A\" Hash=\"A\"",
            &format!("Size=\"{size_b}\" Hash=\"{b}\""),
        )
    });
    let blobs = www.join("lanup-store/blobs");
    let xml = std::fs::read_to_string(www.join("AutoUpdater.xml")).expect("manifest");
    let packed = packed_hashes(&xml);
    assert!(!packed.is_empty(), "no packed chunks:\n{xml}");
    for (i, h) in packed.iter().enumerate() {
        let path = blobs.join(h);
        let bytes = std::fs::read(&path).expect("packed blob");
        if i == 0 {
            std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        } else {
            std::fs::write(&path, pseudo_random(bytes.len(), 5)).expect("swap");
        }
    }
    let bundles = bundle_hashes(&xml);
    assert!(!bundles.is_empty(), "no bundle:\n{xml}");
    for h in &bundles {
        let path = blobs.join(h);
        let bytes = std::fs::read(&path).expect("bundle blob");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    }
    let second = Published {
        manifest_bytes: manifest_read(&www),
        ..second
    };

    run_ok(&["check", "--state", s(&site.states[0])]);
    let cmd = site.command(1, Some(&origin.url), &first.public);
    site.start(1, cmd);
    let pending = wait_staged(&site.state_refs(), "2.0", &second, Duration::from_secs(90));
    assert!(
        pending.is_empty(),
        "2.0 not staged with broken patches:\n{}",
        node_log(&site.states[0])
    );
    let log = node_log(&site.states[0]) + &node_log(&site.states[1]);
    assert!(log.contains("did not rebuild it"), "{log}");
    assert!(log.contains("packed copy"), "{log}");
    assert!(log.contains("the bundle of 2 files"), "{log}");
    // No loop: each broken blob is asked for a bounded number of times.
    let requests = origin.stats()["requests"].as_u64().expect("count");
    assert!(requests < 60, "{requests} requests to the origin");
    // The whole release still crossed at most once.
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    assert!(
        served < first.size + 2 * second.size,
        "origin served {served} bytes"
    );
}

/// About `len` bytes of log-like text, different for each `seed`: it
/// compresses, and compressing it whole beats compressing it in pieces.
fn log_text(len: usize, seed: u64) -> Vec<u8> {
    let words = ["open", "read", "close", "retry", "sync", "flush", "stat"];
    let noise = pseudo_random(len / 8, seed);
    let mut out = String::with_capacity(len + 100);
    let mut i = 0usize;
    while out.len() < len {
        let n = u64::from(noise[i % noise.len()]) * 257 + u64::from(noise[(i * 7) % noise.len()]);
        out.push_str(&format!(
            "{:08} worker-{} {} /srv/data/{:05}.db took {} ms\n",
            i,
            n % 13,
            words[(n % 7) as usize],
            n % 20011,
            n % 997
        ));
        i += 1;
    }
    out.into_bytes()
}

/// A node with no earlier release takes a large file as runs of chunks
/// compressed together: within 1.05 x `zstd -19` of the file. A run cut
/// short or swapped for other bytes ends, like any broken blob, with the
/// right file from chunks and the reason said.
#[test]
fn a_node_without_a_base_takes_runs_and_broken_runs_end_in_chunks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (v1, v2) = (tmp.path().join("v1"), tmp.path().join("v2"));
    write(&v1, "share/events.log", &log_text(6 << 20, 3));
    // 2.0 names another file: no base to patch it from.
    write(&v2, "share/events-2.log", &log_text(6 << 20, 4));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let first = publish(&v1, "1.0", &origin.url, &key, &www);
    let xml = std::fs::read_to_string(www.join("AutoUpdater.xml")).expect("manifest");
    assert!(xml.contains("<Run "), "no runs:\n{xml}");

    let mut site = LoopSite::new(tmp.path(), 1);
    let cmd = site.command(0, Some(&origin.url), &first.public);
    site.start(0, cmd);
    let pending = wait_staged(&site.state_refs(), "1.0", &first, Duration::from_secs(60));
    assert!(pending.is_empty(), "1.0 not staged");
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    let took = served.saturating_sub(first.manifest_bytes);
    let out = Command::new("zstd")
        .args(["-q", "-19", "-c"])
        .arg(v1.join("share/events.log"))
        .output()
        .expect("zstd runs (apt-get install zstd)");
    let reference = out.stdout.len() as u64;
    eprintln!(
        "1.0 over the uplink: {took} bytes; zstd -19 {reference}; release {}",
        first.size
    );
    assert!(
        took as f64 <= reference as f64 * 1.05,
        "{took} bytes is more than 1.05 x zstd -19's {reference}"
    );
    assert!(
        node_log(&site.states[0]).contains("runs="),
        "{}",
        node_log(&site.states[0])
    );

    let second = publish(&v2, "2.0", &origin.url, &key, &www);
    let xml = std::fs::read_to_string(www.join("AutoUpdater.xml")).expect("manifest");
    let runs: Vec<String> = xml
        .lines()
        .filter(|l| l.trim_start().starts_with("<Run "))
        .filter_map(|l| l.split(" Hash=\"").nth(1))
        .map(|h| h[..64].to_owned())
        .collect();
    assert!(!runs.is_empty(), "no runs:\n{xml}");
    let blobs = www.join("lanup-store/blobs");
    for (i, h) in runs.iter().enumerate() {
        let path = blobs.join(h);
        let bytes = std::fs::read(&path).expect("run blob");
        if i == 0 {
            std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        } else {
            std::fs::write(&path, pseudo_random(bytes.len(), 9)).expect("swap");
        }
    }
    let before = origin.stats()["requests"].as_u64().expect("count");
    run_ok(&["check", "--state", s(&site.states[0])]);
    let pending = wait_staged(&site.state_refs(), "2.0", &second, Duration::from_secs(60));
    assert!(pending.is_empty(), "2.0 not staged with broken runs");
    let log = node_log(&site.states[0]);
    assert!(log.contains("the run of"), "{log}");
    let requests = origin.stats()["requests"].as_u64().expect("count") - before;
    assert!(requests < 40, "{requests} requests to the origin");
}

/// The last lanup before patches and packed chunks, from this repository's
/// history.
const PREVIOUS: &str = "4d87ba074a9e592970437d045632f709f5f9aded";

/// That lanup, built once beside the current one: its source taken from
/// git into `target/previous-src`, its binary renamed `lanup-previous` so
/// that it shares the target folder (and every built dependency) without
/// touching the current `lanup`.
/// `None` when this checkout has no history to take it from (not a git
/// clone, or a shallow one).
fn previous_lanup() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()
    };
    let present = git(&["cat-file", "-e", &format!("{PREVIOUS}^{{commit}}")])
        .is_some_and(|o| o.status.success());
    if !present {
        let shallow = git(&["rev-parse", "--is-shallow-repository"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        assert!(
            shallow.as_deref() != Some("false"),
            "commit {PREVIOUS} is missing from this repository's history"
        );
        return None;
    }
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let target = workspace.join("target");
        let src = target.join("previous-src");
        let marker = src.join(".commit");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(PREVIOUS) {
            let _ = std::fs::remove_dir_all(&src);
            std::fs::create_dir_all(&src).expect("mkdir");
            let archive = Command::new("git")
                .arg("-C")
                .arg(workspace)
                .args(["archive", PREVIOUS])
                .output()
                .expect("git runs");
            assert!(
                archive.status.success(),
                "git archive {PREVIOUS} failed (a clone with its history is needed): {}",
                String::from_utf8_lossy(&archive.stderr)
            );
            let mut tar = Command::new("tar")
                .arg("-x")
                .arg("-C")
                .arg(&src)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("tar runs");
            std::io::Write::write_all(tar.stdin.as_mut().expect("stdin"), &archive.stdout)
                .expect("tar reads");
            assert!(tar.wait().expect("tar ends").success(), "tar failed");
            // Packages of other names (their crates keep theirs): Cargo
            // names a path package's artifacts after its name, not its
            // folder, so same-named ones would overwrite the current ones.
            let edit = |file: &str, edits: &[(&str, &str)]| {
                let path = src.join(file);
                let mut text = std::fs::read_to_string(&path).expect("Cargo.toml");
                for (from, to) in edits {
                    assert!(text.contains(from), "{file} has no {from:?}");
                    text = text.replacen(from, to, 1);
                }
                std::fs::write(&path, text).expect("edit Cargo.toml");
            };
            edit(
                "Cargo.toml",
                &[
                    (
                        "lanup-protocol = { path = \"protocol\" }",
                        "lanup-protocol = { path = \"protocol\", package = \"lanup-previous-protocol\" }",
                    ),
                    (
                        "lanup-node = { path = \"node\" }",
                        "lanup-node = { path = \"node\", package = \"lanup-previous-node\" }",
                    ),
                ],
            );
            edit(
                "protocol/Cargo.toml",
                &[(
                    "name = \"lanup-protocol\"\n",
                    "name = \"lanup-previous-protocol\"\n",
                )],
            );
            edit(
                "node/Cargo.toml",
                &[("name = \"lanup-node\"\n", "name = \"lanup-previous-node\"\n")],
            );
            edit(
                "cli/Cargo.toml",
                &[
                    ("name = \"lanup-cli\"\n", "name = \"lanup-previous-cli\"\n"),
                    ("name = \"lanup\"\n", "name = \"lanup-previous\"\n"),
                ],
            );
            for (file, lib) in [
                ("protocol/Cargo.toml", "lanup_protocol"),
                ("node/Cargo.toml", "lanup_node"),
            ] {
                let path = src.join(file);
                let mut text = std::fs::read_to_string(&path).expect("Cargo.toml");
                text.push_str(&format!("\n[lib]\nname = \"{lib}\"\n"));
                std::fs::write(&path, text).expect("edit Cargo.toml");
            }
            std::fs::write(&marker, PREVIOUS).expect("marker");
        }
        let mut build = Command::new(env!("CARGO"));
        // Cargo's settings for this test are not the previous build's; its
        // target folder is set after, so that one set outside (a
        // CARGO_TARGET_DIR of the run's) does not send it elsewhere.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_") && name != "CARGO_HOME" {
                build.env_remove(name.as_ref());
            }
        }
        build
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--quiet", "--offline", "-p", "lanup-previous-cli"])
            .args(["--bin", "lanup-previous"]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo runs").success(),
            "building the previous lanup failed"
        );
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        target.join(profile).join("lanup-previous")
    });
    Some(bin.clone())
}

#[test]
fn a_node_running_the_previous_lanup_stages_a_release_with_patches_by_its_chunks() {
    let Some(previous) = previous_lanup() else {
        eprintln!(
            "this checkout has no history (not a git clone, or a shallow one): the previous lanup cannot be built; skipped"
        );
        return;
    };
    let Setup {
        tmp,
        v1: _,
        v2,
        www,
        key,
        origin,
        first,
    } = Setup::new();

    // One site: node 0 runs the previous lanup, node 1 this one.
    let mut site = LoopSite::new(tmp.path(), 2);
    for i in 0..2 {
        let current = site.command(i, Some(&origin.url), &first.public);
        let mut cmd = if i == 0 {
            Command::new(&previous)
        } else {
            Command::new(current.get_program())
        };
        cmd.args(current.get_args());
        for (k, v) in current.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        site.start(i, cmd);
    }
    let pending = wait_staged(&site.state_refs(), "1.0", &first, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "1.0 not staged:\n{}",
        node_log(&site.states[0])
    );
    let second = publish(&v2, "2.0", &origin.url, &key, &www);
    let xml = std::fs::read_to_string(www.join("AutoUpdater.xml")).expect("manifest");
    assert!(
        xml.contains("<Patch ") && xml.contains("PackedHash="),
        "{xml}"
    );
    run_ok(&["check", "--state", s(&site.states[1])]);
    let pending = wait_staged(&site.state_refs(), "2.0", &second, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "2.0 not staged by the previous lanup:\n{}",
        node_log(&site.states[0])
    );
}
