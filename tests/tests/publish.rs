//! Publish → inspect → verify round trips, over files and over HTTP.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// The release folder the round trip uses: nested folders, an empty file,
/// a 50 MiB file, names outside ASCII.
fn sample_release(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert("bin/TIMS".to_owned(), pseudo_random(3_000_000, 1));
    files.insert(
        "big/data.bin".to_owned(),
        pseudo_random(50 * 1024 * 1024, 2),
    );
    files.insert("empty.cfg".to_owned(), Vec::new());
    files.insert(
        "share/données/été €.txt".to_owned(),
        "bonjour\n".as_bytes().to_vec(),
    );
    files.insert("a/b/c/d/deep.dat".to_owned(), pseudo_random(70_000, 3));
    for (name, bytes) in &files {
        write(dir, name, bytes);
    }
    files
}

#[test]
fn publish_inspect_verify_round_trip() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rel = tmp.path().join("release");
    let out = tmp.path().join("out");
    let files = sample_release(&rel);
    let (key, public) = keygen(tmp.path(), "publisher.key");

    run_ok(&[
        "publish",
        "--dir",
        s(&rel),
        "--version",
        "1.0.0.2",
        "--app",
        "TIMS",
        "--app-exe",
        "bin/TIMS",
        "--url",
        "http://127.0.0.1/tims",
        "--key",
        s(&key),
        "--out",
        s(&out),
    ]);

    // inspect --trust accepts it and reports what it holds.
    let json = run_ok(&[
        "inspect",
        s(&out.join("AutoUpdater.xml")),
        "--trust",
        &public,
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_str(&json).expect("inspect --json is JSON");
    assert_eq!(m["version"], "1.0.0.2");
    assert_eq!(m["url"], "http://127.0.0.1/tims/");
    assert_eq!(m["signature"]["verified"], true);
    assert_eq!(m["restart"]["exe"], "bin/TIMS");
    let listed = m["files"].as_array().expect("files");
    assert_eq!(listed.len(), files.len());

    // Every listed file: the hash is what b3sum prints, the chunks
    // concatenated are the file, and the published copy is byte-identical.
    for f in listed {
        let name = f["name"].as_str().expect("name");
        let original = &files[name];
        assert_eq!(f["size"], original.len() as u64, "{name}");
        assert_eq!(
            f["hash"],
            blake3::hash(original).to_hex().as_str(),
            "{name}"
        );
        let mut offset = 0usize;
        for c in f["chunks"].as_array().expect("chunks") {
            let size = c["size"].as_u64().expect("size") as usize;
            let piece = &original[offset..offset + size];
            assert_eq!(
                c["hash"],
                blake3::hash(piece).to_hex().as_str(),
                "{name} @{offset}"
            );
            offset += size;
        }
        assert_eq!(offset, original.len(), "{name}: chunks cover the file");
        assert_eq!(
            &std::fs::read(out.join(name)).expect("published copy"),
            original
        );
    }
    let big_chunks = listed
        .iter()
        .find(|f| f["name"] == "big/data.bin")
        .and_then(|f| f["chunks"].as_array())
        .map_or(0, Vec::len);
    assert!(
        (20..=120).contains(&big_chunks),
        "50 MiB in {big_chunks} chunks"
    );

    // verify: both the source folder and the published folder match.
    let ok = run_ok(&[
        "verify",
        "--manifest",
        s(&out),
        "--dir",
        s(&rel),
        "--trust",
        &public,
    ]);
    assert!(ok.starts_with("ok:"), "{ok}");
    run_ok(&[
        "verify",
        "--manifest",
        s(&out),
        "--dir",
        s(&out),
        "--trust",
        &public,
    ]);

    // ...and over HTTP from a real origin.
    let origin = OriginProc::start(&out, None);
    let text = run_ok(&["inspect", &origin.url, "--trust", &public]);
    assert!(text.contains("valid, by trusted key"), "{text}");
    run_ok(&[
        "verify",
        "--manifest",
        &origin.url,
        "--dir",
        s(&rel),
        "--trust",
        &public,
    ]);

    // A changed, a missing and a truncated file are each named.
    std::fs::write(rel.join("bin/TIMS"), b"tampered").expect("write");
    std::fs::remove_file(rel.join("empty.cfg")).expect("rm");
    let deep = rel.join("a/b/c/d/deep.dat");
    let mut bytes = std::fs::read(&deep).expect("read");
    bytes[100] ^= 1;
    std::fs::write(&deep, bytes).expect("write");
    let out_v = run(&[
        "verify",
        "--manifest",
        s(&out),
        "--dir",
        s(&rel),
        "--trust",
        &public,
    ]);
    assert_eq!(out_v.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out_v.stdout);
    assert!(
        report.contains("MISMATCH bin/TIMS: size 8, expected 3000000"),
        "{report}"
    );
    assert!(report.contains("MISMATCH empty.cfg: missing"), "{report}");
    assert!(
        report.contains("MISMATCH a/b/c/d/deep.dat: hash"),
        "{report}"
    );
    assert_eq!(report.lines().count(), 3, "{report}");
}

#[test]
fn from_legacy_takes_app_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rel = tmp.path().join("release");
    for name in ["aa.txt", "VB40.rar", "VB4-1.CAB"] {
        write(&rel, name, name.as_bytes());
    }
    let legacy = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/fixtures/AutoUpdater.legacy.xml"),
    )
    .expect("fixture")
    .replace("Allow = \"Yes\"", "Allow = \"No\"");
    let legacy_path = tmp.path().join("AutoUpdater.xml");
    std::fs::write(&legacy_path, legacy).expect("write");
    let (key, public) = keygen(tmp.path(), "k");
    let out = tmp.path().join("out");
    run_ok(&[
        "publish",
        "--dir",
        s(&rel),
        "--version",
        "1.0.0.2",
        "--url",
        "https://updates.example/tims/",
        "--key",
        s(&key),
        "--out",
        s(&out),
        "--from-legacy",
        s(&legacy_path),
        "--date",
        "2026-11-20",
        "--expires",
        "2099-01-01",
    ]);
    let json = run_ok(&["inspect", s(&out), "--trust", &public, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(m["restart"]["app_name"], "TIMS.exe");
    assert_eq!(m["restart"]["allow"], false);
    assert_eq!(m["update_time"], "2026-11-20T00:00:00Z");
    assert_eq!(m["expires"], "2099-01-01T00:00:00Z");
    assert_eq!(m["files"].as_array().map(Vec::len), Some(3));
}

#[test]
fn sign_re_signs_a_hand_edited_manifest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rel = tmp.path().join("release");
    write(&rel, "app", b"v1");
    let (key, public) = keygen(tmp.path(), "k");
    let out = tmp.path().join("out");
    run_ok(&[
        "publish",
        "--dir",
        s(&rel),
        "--version",
        "1",
        "--app",
        "app",
        "--url",
        "http://a/",
        "--key",
        s(&key),
        "--out",
        s(&out),
    ]);
    let manifest = out.join("AutoUpdater.xml");
    let edited = std::fs::read_to_string(&manifest)
        .expect("read")
        .replace("http://a/", "http://b/");
    std::fs::write(&manifest, edited).expect("write");
    let err = run_fails(&["inspect", s(&manifest), "--trust", &public]);
    assert!(err.contains("does not match the manifest bytes"), "{err}");
    run_ok(&["sign", "--key", s(&key), s(&manifest)]);
    let text = run_ok(&["inspect", s(&manifest), "--trust", &public]);
    assert!(text.contains("http://b/"), "{text}");
}

/// Releases of two applications published into one origin folder within
/// a second are still ordered: the later is dated later (nodes compare
/// releases of different applications by that date), so none is passed
/// over as "not newer".
#[test]
fn releases_published_in_one_second_are_dated_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", b"one");
    let www = tmp.path().join("www");
    let key = keygen(tmp.path(), "k");
    let mut dates = Vec::new();
    for (name, version) in [("app", "1.0.0"), ("lanup", "0.2.0"), ("app", "1.0.1")] {
        publish_as(name, &app, version, "http://origin.invalid/", &key, &www);
        let shown: serde_json::Value = serde_json::from_str(&run_ok(&[
            "inspect",
            s(&www.join("AutoUpdater.xml")),
            "--json",
        ]))
        .expect("inspect JSON");
        dates.push(shown["update_time"].as_str().expect("a date").to_owned());
    }
    assert!(
        dates.windows(2).all(|w| w[0] < w[1]),
        "dates not in order: {dates:?}"
    );
}

#[test]
fn keygen_writes_a_private_key_and_prints_one_public_string() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "k");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        public.starts_with("ed25519:") && public.len() == 72,
        "{public}"
    );
    let err = run_fails(&["keygen", "--out", s(&key)]);
    assert!(err.contains("cannot create key file"), "{err}");
}

#[test]
fn published_files_are_readable_by_everyone_and_a_past_expiry_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let rel = tmp.path().join("release");
    write(&rel, "bin/app", b"#!/bin/sh\n");
    write(&rel, "etc/secret.conf", b"owner only\n");
    std::fs::set_permissions(
        rel.join("etc/secret.conf"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let (key, _) = keygen(tmp.path(), "publisher.key");
    let out = tmp.path().join("out");
    let args = |out: &Path, expires: Option<&str>| {
        let mut args = vec![
            "publish".to_owned(),
            "--dir".into(),
            s(&rel).into(),
            "--version".into(),
            "1.0".into(),
            "--app".into(),
            "app".into(),
            "--url".into(),
            "http://origin.invalid/app/".into(),
            "--key".into(),
            s(&key).into(),
            "--out".into(),
            s(out).into(),
        ];
        if let Some(date) = expires {
            args.extend(["--expires".into(), date.into()]);
        }
        args
    };
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    run_ok(&refs(&args(&out, None)));
    let mode = |name: &str| {
        std::fs::metadata(out.join(name))
            .expect("published")
            .permissions()
            .mode()
            & 0o777
    };
    // A web server running as its own user can read every published file.
    for name in [
        "AutoUpdater.xml",
        "AutoUpdater.xml.sig",
        "bin/app",
        "etc/secret.conf",
    ] {
        assert_eq!(mode(name) & 0o444, 0o444, "{name} mode {:o}", mode(name));
    }
    // The manifest keeps the mode the file is installed with.
    let shown = run_ok(&["inspect", s(&out), "--json"]);
    assert!(shown.contains(r#""mode":"600""#), "{shown}");
    // The secret key stays the owner's.
    let key_mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);

    let late = tmp.path().join("late");
    let err = run_fails(&refs(&args(&late, Some("2001-01-01T00:00:00Z"))));
    assert!(
        err.contains("--expires") && err.contains("has passed"),
        "{err}"
    );
    assert!(!late.join("AutoUpdater.xml").exists());
}

#[test]
fn a_published_release_is_served_by_nginx_running_as_its_own_user() {
    use std::os::unix::fs::PermissionsExt;
    if !Path::new("/usr/sbin/nginx").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the nginx test needs nginx in CI (.ci/run installs nginx-light)"
        );
        eprintln!("nginx is not installed (apt-get install nginx-light); skipped");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // The web server's user must be able to reach the folder at all.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(2 << 20, 61));
    write(&app, "etc/app.conf", b"level = 1\n");
    let www = tmp.path().join("www");
    let port = crate::swarm::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let key = keygen(tmp.path(), "publisher.key");
    let release = publish(&app, "1.0", &url, &key, &www);
    let (_nginx, manifest) = start_nginx(tmp.path(), &www, port);
    assert_eq!(
        manifest.status().as_u16(),
        200,
        "nginx (as www-data) could not read the manifest"
    );
    // A node fetches the whole release from it (Range requests included).
    let mut site = crate::swarm::LoopSite::new(tmp.path(), 1);
    let cmd = site.command(0, Some(&url), &release.public);
    site.start(0, cmd);
    let pending = wait_staged(
        &site.state_refs(),
        "1.0",
        &release,
        std::time::Duration::from_secs(60),
    );
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
}

/// The manifest's ETag as nginx gives it now.
fn etag(url: &str) -> String {
    reqwest::blocking::Client::new()
        .head(format!("{url}AutoUpdater.xml"))
        .send()
        .ok()
        .and_then(|r| r.headers().get("etag")?.to_str().ok().map(str::to_owned))
        .expect("nginx gives an ETag")
}

/// Sleeps until the wall clock starts a new second.
fn at_a_new_second() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    std::thread::sleep(std::time::Duration::from_nanos(
        u64::from(1_000_000_000 - nanos) + 5_000_000,
    ));
}

#[test]
fn two_releases_of_one_size_published_within_a_second_behind_nginx_are_both_picked_up() {
    use std::os::unix::fs::PermissionsExt;
    if !Path::new("/usr/sbin/nginx").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the nginx test needs nginx in CI (tests/run-all installs nginx-light)"
        );
        eprintln!("nginx is not installed (apt-get install nginx-light); skipped");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = |n: u64| {
        let dir = tmp.path().join(format!("app{n}"));
        write(&dir, "bin/app", &pseudo_random(300_000, 70 + n));
        dir
    };
    let www = tmp.path().join("www");
    let port = crate::swarm::free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let key = keygen(tmp.path(), "publisher.key");
    let release = publish(&app(0), "1.0", &url, &key, &www);
    let (_nginx, _) = start_nginx(tmp.path(), &www, port);
    let mut site = crate::swarm::LoopSite::new(tmp.path(), 1);
    let cmd = site.command(0, Some(&url), &release.public);
    site.start(0, cmd);
    let state = site.states[0].clone();
    let staged = |version: &str, release: &Published| {
        wait_staged(
            &[&state],
            version,
            release,
            std::time::Duration::from_secs(60),
        )
        .is_empty()
    };
    assert!(staged("1.0", &release), "{}", node_log(&state));

    // 1.1 and 1.2: manifests of one size, written within one second; the
    // node reads 1.1's (and its ETag) in between.
    at_a_new_second();
    let first = publish(&app(1), "1.1", &url, &key, &www);
    let etag_1 = etag(&url);
    run_ok(&["check", "--state", s(&state)]);
    let seen = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !node_log(&state).contains("release=1.1") && std::time::Instant::now() < seen {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = publish(&app(2), "1.2", &url, &key, &www);
    assert_eq!(
        first.manifest_text, second.manifest_text,
        "the two manifests are of one size"
    );
    let etag_2 = etag(&url);
    assert_ne!(etag_1, etag_2, "nginx gave both manifests one ETag");
    assert!(
        node_log(&state).contains("release=1.1"),
        "the node did not see 1.1:\n{}",
        node_log(&state)
    );
    run_ok(&["check", "--state", s(&state)]);
    assert!(
        staged("1.2", &second),
        "1.2 was missed:\n{}",
        node_log(&state)
    );
}

/// nginx as www-data serving `www` on `port`, with its first answer for
/// the manifest.
fn start_nginx(dir: &Path, www: &Path, port: u16) -> (Nginx, reqwest::blocking::Response) {
    let url = format!("http://127.0.0.1:{port}/");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nuser www-data;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {dir}/tmp; \
             server {{ listen 127.0.0.1:{port}; root {www}; }} }}\n",
            dir = dir.display(),
            www = www.display()
        ),
    )
    .expect("nginx.conf");
    let nginx = Nginx(
        std::process::Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let manifest = loop {
        if let Ok(r) = reqwest::blocking::get(format!("{url}AutoUpdater.xml")) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nginx did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    (nginx, manifest)
}

/// An nginx master process, stopped with its workers when dropped (a
/// SIGKILL to the master alone would leave the workers running).
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        for _ in 0..50 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fetcher polls now and then without the origin's validator, in case
/// it hid a change (as nginx's does for equal-sized manifests written
/// within a second). With the manifest unchanged, that poll reads the
/// signature alone, not the manifest again: a large tree's manifest is
/// megabytes, and the uplink is the scarce part.
#[test]
fn a_poll_without_the_validator_reads_only_the_signature_of_an_unchanged_manifest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 91));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    let (_site, state) = one_node_staged(tmp.path(), &origin, "1.0", &release);

    let size = |name: &str| std::fs::metadata(www.join(name)).expect("published").len();
    let (packed, signature) = (size("AutoUpdater.xml.zst"), size("AutoUpdater.xml.sig"));
    let served = || origin.stats()["bytes_served"].as_u64().expect("count");
    let before = served();
    // Polled until one poll without the validator has read something (one
    // in UNCONDITIONAL_EVERY; a poll a second at most, however often
    // asked): the others are answered 304, with no body.
    let most = 4 * lanup_node::fetcher::UNCONDITIONAL_EVERY;
    let mut polls = 0;
    while served() - before < signature && polls < most {
        run_ok(&["check", "--state", s(&state)]);
        std::thread::sleep(Duration::from_millis(1100));
        polls += 1;
    }
    let grew = served() - before;
    eprintln!("{polls} polls read {grew} bytes");
    assert!(
        grew >= signature && grew < packed,
        "{polls} polls of an unchanged manifest read {grew} bytes (signature {signature}, \
         compressed manifest {packed}):\n{}",
        node_log(&state)
    );
}

/// One node of its own site, polling `origin`, once it staged `release`
/// as `version` (the site stops its node when dropped).
fn one_node_staged(
    dir: &Path,
    origin: &OriginProc,
    version: &str,
    release: &Published,
) -> (crate::swarm::LoopSite, std::path::PathBuf) {
    let mut site = crate::swarm::LoopSite::new(dir, 1);
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    let state = site.states[0].clone();
    let pending = wait_staged(&[&state], version, release, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&state));
    (site, state)
}

/// A poll that lands half-way through a publish reads a manifest and a
/// signature that do not belong together: the node refuses that pair, and
/// once the publish is done the same manifest, now with its signature, is
/// taken (it was once dropped as "already told to the node", and the
/// release was never staged). A node holding the earlier manifest asks for
/// the signature first and reads no torn pair: this one starts while the
/// origin is half-way.
#[test]
fn a_manifest_read_half_way_through_a_publish_is_taken_once_the_publish_is_done() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 93));
    let www = tmp.path().join("www");
    let next = tmp.path().join("next");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    // 2.0, published elsewhere: its files reach the origin one by one.
    write(&app, "bin/app", &pseudo_random(300_000, 94));
    let copied = std::process::Command::new("cp")
        .args(["-a", s(&www), s(&next)])
        .status()
        .expect("cp runs");
    assert!(copied.success());
    let second = publish(&app, "2.0", &origin.url, &key, &next);

    // 2.0's files and manifest are there; its signature is not yet (1.0's
    // is).
    let copied = std::process::Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -mindepth 1 -maxdepth 1 ! -name 'AutoUpdater.xml*' -exec cp -a {} \"$2\"/ ';'")
        .args(["sh", s(&next), s(&www)])
        .status()
        .expect("cp runs");
    assert!(copied.success());
    let take = |name: &str| std::fs::copy(next.join(name), www.join(name)).expect("copy");
    take("AutoUpdater.xml");
    take("AutoUpdater.xml.zst");
    let mut site = crate::swarm::LoopSite::new(tmp.path(), 1);
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    let state = site.states[0].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node_log(&state).contains("refused release") {
        assert!(
            std::time::Instant::now() < deadline,
            "the torn pair was not refused:\n{}",
            node_log(&state)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    take("AutoUpdater.xml.sig");
    // The manifest did not change, so its validator does not show the
    // signature that did; the signature's does.
    let staged = (0..2 * lanup_node::fetcher::UNCONDITIONAL_EVERY).any(|_| {
        run_ok(&["check", "--state", s(&state)]);
        wait_staged(&[&state], "2.0", &second, Duration::from_millis(1100)).is_empty()
    });
    assert!(
        staged,
        "2.0 was not staged once its publish was done:\n{}",
        node_log(&state)
    );
}

/// A release changing two of 400 files reaches a node that holds the one
/// before as a manifest delta: the origin serves less than the new
/// manifest's compressed copy for manifest and files together. A delta
/// that does not rebuild the signed manifest is refused, said once, and
/// the manifest is read whole.
#[test]
fn a_node_holding_the_last_manifest_takes_the_next_as_a_delta_and_a_broken_one_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    let edition = |n: u64| {
        for i in 0..400u64 {
            let seed = if i % 200 == 7 { 1000 * n + i } else { i };
            write(
                &app,
                &format!("d{}/f{i}.txt", i % 10),
                &pseudo_random(600, seed),
            );
        }
    };
    edition(1);
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    let (mut site, state) = one_node_staged(tmp.path(), &origin, "1.0", &release);
    let served = || origin.stats()["bytes_served"].as_u64().expect("count");
    let requests = || origin.stats()["requests"].as_u64().expect("count");
    let packed = || {
        std::fs::metadata(www.join("AutoUpdater.xml.zst"))
            .expect("published")
            .len()
    };
    let deltas = || {
        std::fs::read_dir(&www)
            .expect("www")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("AutoUpdater.xml.from-"))
            .collect::<Vec<_>>()
    };
    let take = |version: &str, n: u64| {
        edition(n);
        let next = publish(&app, version, &origin.url, &key, &www);
        let before = served();
        run_ok(&["check", "--state", s(&state)]);
        let pending = wait_staged(&[&state], version, &next, Duration::from_secs(60));
        assert!(pending.is_empty(), "{version}: {}", node_log(&state));
        served() - before
    };

    let two = take("2.0", 2);
    let from = deltas();
    assert_eq!(from.len(), 1, "one delta, from 1.0: {from:?}");
    let delta = std::fs::metadata(&from[0]).expect("delta").len();
    eprintln!(
        "2.0: origin served {two} B; manifest compressed {} B, delta {delta} B",
        packed()
    );
    assert!(
        two < packed(),
        "origin served {two} B for 2.0, its compressed manifest alone is {} B:\n{}",
        packed(),
        node_log(&state)
    );

    // 3.0's delta from 2.0 is damaged: a byte in it changed.
    edition(3);
    let third = publish(&app, "3.0", &origin.url, &key, &www);
    let from = deltas();
    assert_eq!(from.len(), 2, "deltas from 1.0 and 2.0: {from:?}");
    for path in &from {
        let mut bytes = std::fs::read(path).expect("delta");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x55;
        std::fs::write(path, bytes).expect("damaged");
    }
    let before = served();
    run_ok(&["check", "--state", s(&state)]);
    let pending = wait_staged(&[&state], "3.0", &third, Duration::from_secs(60));
    assert!(pending.is_empty(), "3.0: {}", node_log(&state));
    let three = served() - before;
    let log = node_log(&state);
    assert_eq!(
        log.matches("the manifest delta does not rebuild").count(),
        1,
        "{log}"
    );
    assert!(three >= packed(), "3.0 read whole: {three} B served");

    // Restarted, the node takes 3.0 up from its state, and its first poll
    // of the unchanged origin reads the signature alone.
    site.procs[0] = None;
    let (before, asked) = (served(), requests());
    let cmd = site.command(0, Some(&origin.url), &release.public);
    site.start(0, cmd);
    run_ok(&["check", "--state", s(&state)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while requests() == asked {
        assert!(
            std::time::Instant::now() < deadline,
            "no poll after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let restarted = served() - before;
    assert!(
        restarted * 4 < packed(),
        "the first poll after a restart read {restarted} B ({} requests); the manifest is {} B:\n{}",
        requests() - asked,
        packed(),
        node_log(&state)
    );
}

/// A release installs on Windows nodes too: a name Windows cannot hold, or
/// two names that differ only in case, are refused before anything is
/// written, with the file and the reason; `--linux-only` allows them.
#[test]
fn names_windows_cannot_hold_are_refused_unless_the_release_is_for_linux_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, _) = keygen(tmp.path(), "publisher.key");
    let attempt = |tree: &[&str], extra: &[&str]| {
        let app = tmp.path().join(format!("app{}", tree.len() + extra.len()));
        let _ = std::fs::remove_dir_all(&app);
        for name in tree {
            write(&app, name, name.as_bytes());
        }
        let out = tmp.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        let mut args = vec![
            "publish",
            "--dir",
            s(&app),
            "--version",
            "1.0",
            "--app",
            "app",
            "--url",
            "http://origin.invalid/",
            "--key",
            s(&key),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        let output = run(&args);
        let written = out.join("AutoUpdater.xml").exists();
        (output, written)
    };
    for (tree, says) in [
        (&["bin/app", "drivers/aux.c"][..], "device AUX"),
        (&["bin/app", "logs/08:00.txt"][..], "':'"),
        (&["bin/app", "notes."][..], "ends in a dot"),
        (
            &["bin/app", "Readme.txt", "README.txt"][..],
            "differ only in case",
        ),
    ] {
        let (output, written) = attempt(tree, &[]);
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{tree:?} published");
        assert!(
            err.contains(says) && err.contains("--linux-only"),
            "{tree:?}: {err}"
        );
        assert!(!written, "{tree:?}: a manifest was written");
        let (output, written) = attempt(tree, &["--linux-only"]);
        assert!(
            output.status.success() && written,
            "{tree:?} with --linux-only: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
