//! `lanup setup`: a configuration written in one command, checked against
//! the real origin first; `lanup node` runs with it. Bad input is named
//! and nothing is written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[test]
fn setup_writes_a_configuration_a_node_runs_with_and_refuses_bad_input_writing_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(root, "publisher.key");
    let (_, stranger) = keygen(root, "stranger.key");
    let (_, admin) = keygen(root, "admin.key");
    let origin = OriginProc::start(&www, None);
    let app = root.join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 5));
    let release = publish(&app, "1.0.0", &origin.url, &key, &www);
    let install = root.join("install");
    std::fs::create_dir_all(&install).expect("mkdir");
    let state = root.join("node");
    let config = root.join("etc/lanup/lanup.toml");
    let setup = |config: &Path, changes: &[(&str, &str)]| {
        let mut args: Vec<String> = vec![
            "setup".into(),
            "--origin".into(),
            origin.url.clone(),
            "--trust-publisher".into(),
            key.1.clone(),
            "--trust-admin".into(),
            admin.clone(),
            "--site".into(),
            "branch-7".into(),
            "--app-name".into(),
            "app".into(),
            "--install-dir".into(),
            s(&install).into(),
            "--state".into(),
            s(&state).into(),
            "--config".into(),
            s(config).into(),
        ];
        for (flag, value) in changes {
            match args.iter().position(|a| a == flag) {
                Some(i) => args[i + 1] = (*value).into(),
                None => {
                    args.push((*flag).into());
                    if !value.is_empty() {
                        args.push((*value).into());
                    }
                }
            }
        }
        // --start goes last: every word after it is the command.
        args.extend(["--start", "bin/app", "--serve"].map(String::from));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&refs)
    };

    // The package's template is there, as after installing the package:
    // it sets nothing, so setup fills it in without --force.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    std::fs::copy(workspace.join("packaging/deb/lanup.toml"), &config).expect("template");
    let out = setup(&config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("it held only comments"), "{stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("systemctl enable --now lanup"), "{stdout}");
    assert!(stdout.contains("release 1.0.0 is signed"), "{stdout}");
    assert!(stdout.contains("not running"), "{stdout}");
    let text = std::fs::read_to_string(&config).expect("written");
    assert!(
        text.contains("start = [\"bin/app\", \"--serve\"]"),
        "{text}"
    );

    // The node runs with it: it takes the release from the origin, trusting
    // the key that setup checked.
    let log = std::fs::File::create(root.join("node.log")).expect("log");
    let _node = Proc(
        lanup()
            .args(["node", "--config", s(&config)])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .env("LANUP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("node starts"),
    );
    let pending = wait_staged(&[&state], "1.0.0", &release, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "{}",
        std::fs::read_to_string(root.join("node.log")).unwrap_or_default()
    );
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--state", s(&state), "--json"])).expect("json");
    assert_eq!(status["site"], "branch-7");

    // Bad input is named, and nothing is written.
    let missing = root.join("no-such-install");
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("--origin", "http://127.0.0.1:9/")],
            "--origin http://127.0.0.1:9/: unreachable".into(),
        ),
        (
            vec![("--trust-publisher", stranger.as_str())],
            "not signed by a key given with --trust-publisher".into(),
        ),
        (
            vec![("--install-dir", s(&missing))],
            format!("--install-dir {}: no such folder", missing.display()),
        ),
        (vec![("--site", "branch 7")], "site \"branch 7\"".into()),
        (
            vec![("--trust-publisher", "ed25519:00")],
            "--trust-publisher".into(),
        ),
    ];
    for (changes, expected) in cases {
        let fresh = root.join("fresh/lanup.toml");
        let out = setup(&fresh, &changes);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{changes:?} was accepted");
        assert!(stderr.contains(&expected), "{changes:?}: {stderr}");
        assert!(!fresh.exists(), "{changes:?} wrote {}", fresh.display());
    }

    // The same again changes nothing; something else is refused unless
    // --force, which keeps the old file.
    let out = setup(&config, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
    let out = setup(&config, &[("--site", "branch-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&config).expect("read"), text);
    let out = setup(&config, &[("--site", "branch-8"), ("--force", "")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&config)
        .expect("read")
        .contains("branch-8"));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/lanup/lanup.toml.bak")).expect("backup"),
        text
    );
}

/// `lanup node` with no flags at all reads /etc/lanup/lanup.toml. The file
/// is shown to that one process only: it runs in a mount namespace of its
/// own whose /etc is the machine's with the file laid over it (root).
#[test]
fn a_node_given_no_flags_reads_etc_lanup() {
    if !crate::testbed::available() {
        eprintln!("skipped: needs root for a mount namespace");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, publisher) = keygen(tmp.path(), "publisher.key");
    let upper = tmp.path().join("upper");
    let work = tmp.path().join("work");
    let state = tmp.path().join("node");
    std::fs::create_dir_all(upper.join("lanup")).expect("mkdir");
    std::fs::create_dir_all(&work).expect("mkdir");
    std::fs::write(
        upper.join("lanup/lanup.toml"),
        format!(
            "site = \"from-etc\"\ntrust_publisher = [\"{publisher}\"]\nstate = \"{}\"\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n",
            state.display()
        ),
    )
    .expect("config");
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc && exec \"$0\" node",
        upper.display(),
        work.display()
    );
    let _node = Proc(
        Command::new("unshare")
            .args(["--mount", "--", "sh", "-c", &script])
            .arg(lanup_bin())
            .env("LANUP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("unshare runs"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(&["status", "--state", s(&state), "--json"]);
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(status["site"], "from-etc");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never answered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !Path::new("/etc/lanup/lanup.toml").exists()
            || std::fs::read_to_string("/etc/lanup/lanup.toml")
                .is_ok_and(|t| !t.contains("from-etc")),
        "the machine's /etc was changed"
    );
}
