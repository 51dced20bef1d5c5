//! The Debian package: built from this build's binary by
//! `packaging/deb/build.sh`, it holds the binary, the unit and the conffile,
//! unpacks into a scratch root whose binary runs and says the package's
//! version, and its default configuration starts nothing unconfigured.

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_debian_package_holds_the_binary_unit_and_conffile_and_its_binary_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let built = output(
        Command::new(workspace.join("packaging/deb/build.sh"))
            .arg("--binary")
            .arg(lanup_bin())
            .arg("--out")
            .arg(tmp.path())
            // xz takes 12 s here; the format is dpkg-deb's business.
            .args(["--compress", "zstd"]),
    );
    let deb = Path::new(built.trim());
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        deb.ends_with(format!(
            "lanup_{version}_{}.deb",
            output(Command::new("dpkg").arg("--print-architecture")).trim()
        )),
        "{}",
        deb.display()
    );
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb));
    for (path, mode) in [
        ("./usr/bin/lanup", "-rwxr-xr-x"),
        ("./lib/systemd/system/lanup.service", "-rw-r--r--"),
        ("./etc/lanup/lanup.toml", "-rw-r--r--"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.contains("root/root") && l.ends_with(path)),
            "{path} ({mode}, root) not in:\n{listing}"
        );
    }
    let field = |name: &str| output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name));
    assert_eq!(field("Version").trim(), version);
    assert!(field("Depends").contains("libc6"));
    let scratch = tmp.path().join("control");
    output(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&scratch));
    assert_eq!(
        std::fs::read_to_string(scratch.join("conffiles")).expect("conffiles"),
        "/etc/lanup/lanup.toml\n"
    );
    // The maintainer scripts enable and start nothing; an upgrade restarts
    // only a node that runs.
    for script in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(scratch.join(script)).expect("script");
        let commands: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("systemctl"))
            .collect();
        assert!(
            commands
                .iter()
                .all(|c| !c.contains(" enable") && !c.contains(" start")),
            "{script}: {commands:?}"
        );
    }

    let root = tmp.path().join("root");
    output(Command::new("dpkg").arg("-x").arg(deb).arg(&root));
    let lanup = root.join("usr/bin/lanup");
    assert_eq!(
        output(Command::new(&lanup).arg("--version")).trim(),
        format!("lanup {version}")
    );
    assert!(output(Command::new(&lanup).args(["node", "--version"])).contains(version));
    assert_eq!(
        std::fs::read(root.join("lib/systemd/system/lanup.service")).expect("unit"),
        std::fs::read(workspace.join("packaging/systemd/lanup.service")).expect("unit")
    );
    // As installed, the configuration names no publisher: a node refuses
    // to start, saying why, rather than trusting anything.
    let state = tmp.path().join("state");
    let out = Command::new(&lanup)
        .args(["node", "--config"])
        .arg(root.join("etc/lanup/lanup.toml"))
        .arg("--state")
        .arg(&state)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no trusted publisher key") && stderr.contains("lanup.toml"),
        "{stderr}"
    );
}
