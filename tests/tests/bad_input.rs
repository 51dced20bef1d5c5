//! Bad input: each case is refused with a message that names the input and
//! the reason, and nothing is written where it should not be.

use std::path::{Path, PathBuf};

use lanup_protocol::sign::SecretKey;

use crate::common::*;

struct Release {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    out: PathBuf,
    key: PathBuf,
    public: String,
    xml: String,
}

impl Release {
    fn new() -> Release {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("release");
        write(&dir, "app", &pseudo_random(600_000, 5));
        write(&dir, "etc/app.conf", b"x=1\n");
        let (key, public) = keygen(tmp.path(), "publisher.key");
        let out = tmp.path().join("out");
        run_ok(&[
            "publish",
            "--dir",
            s(&dir),
            "--version",
            "2.0",
            "--app",
            "app",
            "--url",
            "http://127.0.0.1/",
            "--key",
            s(&key),
            "--out",
            s(&out),
        ]);
        let xml = std::fs::read_to_string(out.join("AutoUpdater.xml")).expect("manifest");
        Release {
            _tmp: tmp,
            dir,
            out,
            key,
            public,
            xml,
        }
    }

    fn manifest(&self) -> PathBuf {
        self.out.join("AutoUpdater.xml")
    }

    /// Writes `xml` as the manifest and signs it with the publisher key, as
    /// a careless or hostile publisher could.
    fn write_signed(&self, xml: &str) {
        std::fs::write(self.manifest(), xml).expect("write manifest");
        let key = SecretKey::from_text(&std::fs::read_to_string(&self.key).expect("key"))
            .expect("key parses");
        std::fs::write(
            self.out.join("AutoUpdater.xml.sig"),
            key.sign(xml.as_bytes()).to_text(),
        )
        .expect("write sig");
    }

    /// `inspect --trust` and `verify --trust` both refuse, naming `expected`.
    fn assert_refused(&self, expected: &str) {
        let m = self.manifest();
        let inspect = run_fails(&["inspect", s(&m), "--trust", &self.public]);
        assert!(
            inspect.contains(expected),
            "inspect: {inspect:?} lacks {expected:?}"
        );
        let verify = run_fails(&[
            "verify",
            "--manifest",
            s(&m),
            "--dir",
            s(&self.dir),
            "--trust",
            &self.public,
        ]);
        assert!(
            verify.contains(expected),
            "verify: {verify:?} lacks {expected:?}"
        );
    }
}

#[test]
fn unsafe_file_names_are_refused() {
    let r = Release::new();
    let cases = [
        ("../app", "\"../app\": path leaves the install directory"),
        ("bin/../../app", "path leaves the install directory"),
        ("/etc/app", "\"/etc/app\": absolute path"),
        ("C:\\Windows\\app", "Windows drive letter"),
        ("a&#9;b", "NUL or control character"),
    ];
    for (name, expected) in cases {
        r.write_signed(
            &r.xml
                .replace("FileName=\"app\"", &format!("FileName=\"{name}\"")),
        );
        r.assert_refused(expected);
    }
    // NUL cannot appear in XML 1.0 at all.
    r.write_signed(&r.xml.replace("FileName=\"app\"", "FileName=\"a&#0;b\""));
    let err = run_fails(&["inspect", s(&r.manifest()), "--trust", &r.public]);
    assert!(
        err.contains("NUL") || err.contains("not well-formed XML"),
        "{err}"
    );
}

#[test]
fn inconsistent_or_incomplete_manifests_are_refused() {
    let r = Release::new();
    let size_attr = r
        .xml
        .split("FileName=\"app\" Size=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("app has a Size")
        .to_owned();
    let size: u64 = size_attr.parse().expect("number");
    r.write_signed(&r.xml.replace(
        &format!("FileName=\"app\" Size=\"{size}\""),
        &format!("FileName=\"app\" Size=\"{}\"", size + 1),
    ));
    r.assert_refused("UpdateFile \"app\": Size is");

    let hash_start = r.xml.find("Hash=\"").expect("a hash") + 6;
    let mut bad_hash = r.xml.clone();
    bad_hash.replace_range(hash_start..hash_start + 2, "zz");
    r.write_signed(&bad_hash);
    r.assert_refused("is malformed: not hexadecimal");

    let url = r
        .xml
        .lines()
        .find(|l| l.contains("<URLAddres"))
        .expect("url line");
    r.write_signed(&r.xml.replace(url, ""));
    r.assert_refused("manifest has no URLAddres element");

    let start = r.xml.find("<UpdateFileList>").expect("list");
    let end = r.xml.find("</UpdateFileList>").expect("list end") + "</UpdateFileList>".len();
    r.write_signed(&format!("{}{}", &r.xml[..start], &r.xml[end..]));
    r.assert_refused("manifest has no UpdateFileList element");

    r.write_signed(&r.xml.replace(
        "<UpdateInfo>",
        "<UpdateInfo>\n    <Expires Date=\"2001-01-01\"/>",
    ));
    r.assert_refused("expired at 2001-01-01T00:00:00Z");
}

#[test]
fn signature_problems_are_refused() {
    let r = Release::new();
    let sig_path = r.out.join("AutoUpdater.xml.sig");
    let good_sig = std::fs::read_to_string(&sig_path).expect("sig");

    // One byte changed after signing.
    let mut bytes = r.xml.clone().into_bytes();
    let at = r.xml.find("Version Num=\"2.0\"").expect("version") + 13;
    bytes[at] = b'9';
    std::fs::write(r.manifest(), &bytes).expect("write");
    r.assert_refused("does not match the manifest bytes");
    std::fs::write(r.manifest(), &r.xml).expect("restore");

    // A key nobody trusts.
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, stranger) = keygen(tmp.path(), "stranger");
    let err = run_fails(&["inspect", s(&r.manifest()), "--trust", &stranger]);
    assert!(
        err.contains("which is not a trusted publisher key"),
        "{err}"
    );

    // Empty, truncated and missing signature files.
    std::fs::write(&sig_path, "").expect("write");
    r.assert_refused("AutoUpdater.xml.sig: signature file is empty");
    std::fs::write(&sig_path, &good_sig[..good_sig.len() / 2]).expect("write");
    r.assert_refused("AutoUpdater.xml.sig: signature file is truncated or malformed");
    std::fs::write(&sig_path, &good_sig[..good_sig.len() - 20]).expect("write");
    r.assert_refused("AutoUpdater.xml.sig: signature file is truncated or malformed");
    std::fs::remove_file(&sig_path).expect("rm");
    r.assert_refused("AutoUpdater.xml.sig: no signature file");

    // A malformed --trust value is a usage error naming it.
    let err = run_fails(&["inspect", s(&r.manifest()), "--trust", "ed25519:1234"]);
    assert!(err.contains("ed25519:1234"), "{err}");
}

#[test]
fn oversized_manifest_is_refused_before_parsing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("AutoUpdater.xml");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(512 * 1024 * 1024 + 1)
        .expect("sparse 512 MiB + 1");
    let err = run_fails(&["inspect", s(&path)]);
    assert!(
        err.contains("more than the 536870912 bytes lanup accepts"),
        "{err}"
    );
}

#[test]
fn legacy_manifest_is_refused_for_install_with_directions() {
    let legacy =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/fixtures/AutoUpdater.legacy.xml");
    let tmp = tempfile::tempdir().expect("tempdir");
    // inspect shows it...
    let text = run_ok(&["inspect", s(&legacy)]);
    assert!(text.contains("classic"), "{text}");
    // ...anything that would install from it refuses, saying what to do.
    let err = run_fails(&["verify", "--manifest", s(&legacy), "--dir", s(tmp.path())]);
    assert!(
        err.contains("lanup publish") && err.contains("--from-legacy"),
        "{err}"
    );
    let (key, public) = keygen(tmp.path(), "k");
    let err = run_fails(&["inspect", s(&legacy), "--trust", &public]);
    assert!(err.contains("no signature file"), "{err}");
    let copy = tmp.path().join("AutoUpdater.xml");
    std::fs::copy(&legacy, &copy).expect("copy");
    let err = run_fails(&["sign", "--key", s(&key), s(&copy)]);
    assert!(err.contains("lanup publish"), "{err}");
    assert!(!tmp.path().join("AutoUpdater.xml.sig").exists());
}

#[test]
fn publish_refuses_unsafe_sources_and_writes_no_manifest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, _) = keygen(tmp.path(), "k");
    let publish = |dir: &Path, out: &Path| {
        run_fails(&[
            "publish",
            "--dir",
            s(dir),
            "--version",
            "1",
            "--app",
            "a",
            "--url",
            "http://x/",
            "--key",
            s(&key),
            "--out",
            s(out),
        ])
    };

    let dir = tmp.path().join("backslash");
    write(&dir, "ok", b"1");
    write(&dir, "a\\b", b"2");
    let out = tmp.path().join("out1");
    let err = publish(&dir, &out);
    assert!(err.contains("\"a\\b\": not a normalised path"), "{err}");
    assert!(!out.join("AutoUpdater.xml").exists());

    let dir = tmp.path().join("symlink");
    write(&dir, "ok", b"1");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("passwd")).expect("symlink");
    let out = tmp.path().join("out2");
    let err = publish(&dir, &out);
    assert!(err.contains("is a symbolic link"), "{err}");
    assert!(!out.join("AutoUpdater.xml").exists());

    let err = publish(&dir, &dir.join("out"));
    assert!(err.contains("is inside the release folder"), "{err}");
    assert!(!dir.join("out/AutoUpdater.xml").exists());

    let err = run_fails(&[
        "publish",
        "--dir",
        s(&dir),
        "--version",
        "1.x",
        "--app",
        "a",
        "--url",
        "http://x/",
        "--key",
        s(&key),
        "--out",
        s(&out),
    ]);
    assert!(err.contains("1.x") || err.contains("\"x\""), "{err}");
}
