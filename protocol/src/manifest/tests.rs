use super::*;

const LEGACY: &[u8] = include_bytes!("../../fixtures/AutoUpdater.legacy.xml");

fn chunk(size: u64, seed: &[u8]) -> Chunk {
    Chunk {
        size,
        hash: Hash::of(seed),
    }
}

fn sample() -> Manifest {
    Manifest {
        format: Format::V2,
        url: "https://updates.example.com/tims/".into(),
        update_time: parse_date("2026-11-20T08:00:00Z"),
        version: Some("1.0.0.2".parse().expect("version")),
        expires: parse_date("2027-02-20T00:00:00Z"),
        files: vec![
            UpdateFile {
                name: "bin/TIMS".into(),
                size: Some(3000),
                mode: Some(0o755),
                hash: Some(Hash::of(b"TIMS")),
                chunks: vec![chunk(1000, b"a"), chunk(2000, b"b")],
                ..Default::default()
            },
            UpdateFile {
                name: "share/données/été.txt".into(),
                size: Some(0),
                mode: None,
                hash: Some(Hash::of(b"")),
                chunks: vec![],
                ..Default::default()
            },
        ],
        restart: Restart {
            allow: true,
            app_name: Some("TIMS".into()),
            exe: Some("bin/TIMS".into()),
        },
        bundles: Vec::new(),
        runs: Vec::new(),
    }
}

fn parse_v2(m: &Manifest) -> Manifest {
    Manifest::parse(m.to_xml().expect("serialise").as_bytes()).expect("parse back")
}

#[test]
fn parses_the_classic_manifest_as_it_is() {
    let m = Manifest::parse(LEGACY).expect("legacy fixture parses");
    assert_eq!(m.format, Format::Legacy);
    assert_eq!(m.url, "http://192.168.198.113/vbroker/log/");
    assert_eq!(m.version, Some("1.0.0.1".parse().expect("version")));
    assert_eq!(m.update_time, parse_date("2005-02-02"));
    let names: Vec<_> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["aa.txt", "VB40.rar", "VB4-1.CAB"]);
    assert!(m.files.iter().all(|f| f.size.is_none() && f.hash.is_none()));
    assert_eq!(
        m.restart,
        Restart {
            allow: true,
            app_name: Some("TIMS.exe".into()),
            exe: None,
        }
    );
}

#[test]
fn legacy_is_refused_for_install_with_directions() {
    let m = Manifest::parse(LEGACY).expect("legacy fixture parses");
    let err = m.validate().expect_err("legacy must not validate");
    assert_eq!(err, ManifestError::Legacy);
    let msg = err.to_string();
    assert!(
        msg.contains("lanup publish") && msg.contains("--from-legacy"),
        "{msg}"
    );
}

#[test]
fn format_2_round_trips() {
    let m = sample();
    m.validate().expect("sample is valid");
    let xml = m.to_xml().expect("serialise");
    assert!(xml.contains("<AutoUpdater Format=\"2\">"), "{xml}");
    assert!(xml.contains("Mode=\"755\""), "{xml}");
    assert_eq!(parse_v2(&m), m);
}

#[test]
fn design_example_shape_parses() {
    let xml = format!(
        r#"<AutoUpdater Format="2">
  <URLAddres URL="https://updates.example.com/tims/"/>
  <UpdateInfo>
    <UpdateTime Date="2026-11-20T08:00:00Z"/>
    <Version Num="1.0.0.2"/>
    <Expires Date="2027-02-20T00:00:00Z"/>
    <Unknown Thing="ignored"/>
  </UpdateInfo>
  <UpdateFileList>
    <UpdateFile FileName="bin/TIMS" Size="5" Mode="755" Hash="{h}">
      <Chunk Size="5" Hash="{h}"/>
    </UpdateFile>
  </UpdateFileList>
  <RestartApp>
    <ReStart Allow="No"/>
    <AppName Name="TIMS"/>
  </RestartApp>
</AutoUpdater>"#,
        h = Hash::of(b"hello")
    );
    let m = Manifest::parse(xml.as_bytes()).expect("parses");
    m.validate().expect("valid");
    assert!(!m.restart.allow);
    assert_eq!(m.files[0].mode, Some(0o755));
    assert_eq!(m.total_size(), 5);
}

fn with_name(name: &str) -> ManifestError {
    let mut m = sample();
    m.files[0].name = name.into();
    m.validate().expect_err("bad name must be refused")
}

#[test]
fn unsafe_file_names_are_refused_each_with_its_reason() {
    assert_eq!(
        with_name("../etc/passwd"),
        ManifestError::ParentDir("../etc/passwd".into())
    );
    assert_eq!(
        with_name("bin/../../x"),
        ManifestError::ParentDir("bin/../../x".into())
    );
    assert_eq!(with_name("..\\x"), ManifestError::ParentDir("..\\x".into()));
    assert_eq!(
        with_name("/etc/passwd"),
        ManifestError::AbsolutePath("/etc/passwd".into())
    );
    assert_eq!(
        with_name("\\\\server\\x"),
        ManifestError::AbsolutePath("\\\\server\\x".into())
    );
    assert_eq!(
        with_name("C:\\Windows\\x"),
        ManifestError::DriveLetter("C:\\Windows\\x".into())
    );
    assert_eq!(with_name("c:x"), ManifestError::DriveLetter("c:x".into()));
    assert_eq!(
        with_name("a\0b"),
        ManifestError::ControlCharacter("a\0b".into())
    );
    assert_eq!(
        with_name("a//b"),
        ManifestError::NotNormalised("a//b".into())
    );
    assert_eq!(with_name("./a"), ManifestError::NotNormalised("./a".into()));
    assert_eq!(with_name("a/"), ManifestError::NotNormalised("a/".into()));
    assert_eq!(
        with_name("bin\\TIMS"),
        ManifestError::NotNormalised("bin\\TIMS".into())
    );
    assert_eq!(with_name(""), ManifestError::EmptyPath("".into()));
    let msg = with_name("../x").to_string();
    assert_eq!(
        msg,
        "manifest UpdateFile \"../x\": path leaves the install directory (\"..\")"
    );
}

#[test]
fn a_nul_in_the_xml_is_refused() {
    // XML 1.0 cannot carry NUL, even as a character reference.
    let xml = sample()
        .to_xml()
        .expect("serialise")
        .replace("bin/TIMS", "bin/TI&#0;MS");
    let err = Manifest::parse(xml.as_bytes())
        .and_then(|m| m.validate())
        .expect_err("NUL refused");
    assert!(
        matches!(
            err,
            ManifestError::Xml(_) | ManifestError::ControlCharacter(_)
        ),
        "{err:?}"
    );
}

#[test]
fn size_must_be_the_sum_of_chunks() {
    let mut m = sample();
    m.files[0].size = Some(3001);
    let err = parse_v2(&m).validate().expect_err("size mismatch");
    assert_eq!(
        err,
        ManifestError::SizeMismatch {
            file: "bin/TIMS".into(),
            size: 3001,
            chunk_sum: 3000
        }
    );
    assert!(err.to_string().contains("bin/TIMS"));
}

#[test]
fn chunk_sizes_are_bounded() {
    let mut m = sample();
    m.files[0].chunks.push(chunk(0, b"c"));
    assert!(matches!(
        m.validate(),
        Err(ManifestError::ChunkSize {
            index: 2,
            size: 0,
            ..
        })
    ));
    let mut m = sample();
    m.files[0].chunks = vec![chunk(MAX_CHUNK as u64 + 1, b"c")];
    m.files[0].size = Some(MAX_CHUNK as u64 + 1);
    assert!(matches!(m.validate(), Err(ManifestError::ChunkSize { .. })));
}

#[test]
fn malformed_hashes_name_the_file() {
    let good = Hash::of(b"TIMS").to_string();
    let xml = sample().to_xml().expect("serialise");
    let bad = xml.replacen(&good, &good[..63], 1);
    let err = Manifest::parse(bad.as_bytes()).expect_err("short hash");
    assert!(
        matches!(&err, ManifestError::InvalidHash { file, .. } if file == "bin/TIMS"),
        "{err:?}"
    );
    let bad = xml.replacen(&good, &format!("z{}", &good[1..]), 1);
    let err = Manifest::parse(bad.as_bytes()).expect_err("non-hex hash");
    assert!(err.to_string().contains("bin/TIMS"), "{err}");
    assert!(err.to_string().contains("not hexadecimal"), "{err}");
}

#[test]
fn missing_required_elements_are_named() {
    let xml = sample().to_xml().expect("serialise");
    let start = xml.find("<URLAddres").expect("has URLAddres");
    let end = start + xml[start..].find("/>").expect("self-closed") + 2;
    let no_url = format!("{}{}", &xml[..start], &xml[end..]);
    assert_eq!(
        Manifest::parse(no_url.as_bytes()),
        Err(ManifestError::MissingElement("URLAddres"))
    );
    let start = xml.find("<UpdateFileList>").expect("list");
    let end = xml.find("</UpdateFileList>").expect("list end") + "</UpdateFileList>".len();
    let no_list = format!("{}{}", &xml[..start], &xml[end..]);
    let err = Manifest::parse(no_list.as_bytes()).expect_err("no list");
    assert_eq!(err, ManifestError::MissingElement("UpdateFileList"));
    assert_eq!(err.to_string(), "manifest has no UpdateFileList element");
}

#[test]
fn missing_hash_or_size_is_named() {
    let mut m = sample();
    m.files[1].hash = None;
    assert_eq!(
        parse_v2(&m).validate(),
        Err(ManifestError::MissingAttribute {
            element: "UpdateFile \"share/données/été.txt\"".into(),
            attribute: "Hash"
        })
    );
}

#[test]
fn duplicates_and_file_folder_clashes_are_refused() {
    let mut m = sample();
    m.files[1].name = "bin/TIMS".into();
    assert_eq!(
        m.validate(),
        Err(ManifestError::DuplicateFile("bin/TIMS".into()))
    );
    let mut m = sample();
    m.files[1].name = "bin/TIMS/x".into();
    assert!(matches!(
        m.validate(),
        Err(ManifestError::FileIsFolder { .. })
    ));
}

#[test]
fn oversized_manifests_are_refused_before_parsing() {
    let big = vec![b' '; MAX_MANIFEST_BYTES as usize + 1];
    assert!(matches!(
        Manifest::parse(&big),
        Err(ManifestError::TooLarge { .. })
    ));
}

#[test]
fn a_streamed_manifest_reads_as_the_same_text_and_stops_at_the_bounds() {
    let m = sample();
    let text = m.to_xml().expect("writes");
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(text.as_bytes());
    for bytes in [text.as_bytes(), &bom[..]] {
        let streamed =
            Manifest::parse_reader(std::io::BufReader::with_capacity(7, bytes)).expect("streams");
        assert_eq!(streamed, Manifest::parse(bytes).expect("parses"));
    }

    // An endless comment: refused once the bound is read, not held.
    let head = std::io::Cursor::new(b"<AutoUpdater Format=\"2\"><!--".to_vec());
    let endless = std::io::Read::chain(head, std::io::repeat(b' '));
    let endless = std::io::BufReader::new(endless);
    assert!(matches!(
        Manifest::parse_reader(endless),
        Err(ManifestError::TooLarge { .. })
    ));

    // One file more than the format allows.
    let file = "<UpdateFile FileName=\"a\"/>";
    let mut listing = String::from("<AutoUpdater><URLAddres URL=\"http://o/\"/><UpdateFileList>");
    listing.push_str(&file.repeat(MAX_FILES + 1));
    listing.push_str("</UpdateFileList></AutoUpdater>");
    assert_eq!(
        Manifest::parse_reader(listing.as_bytes()),
        Err(ManifestError::TooManyFiles)
    );
}

#[test]
fn offers_must_be_newer_and_unexpired() {
    let installed = sample();
    let mut offer = sample();
    let now = parse_date("2026-12-01").expect("date");
    assert!(matches!(
        offer.check_offer(Some(&installed), now),
        Err(ManifestError::NotNewer { .. })
    ));
    offer.version = Some("1.0.0.10".parse().expect("version"));
    offer
        .check_offer(Some(&installed), now)
        .expect("newer is fine");
    let later = parse_date("2027-03-01").expect("date");
    assert!(matches!(
        offer.check_offer(Some(&installed), later),
        Err(ManifestError::Expired { .. })
    ));
}

#[test]
fn a_site_takes_up_the_greater_version_of_one_application_and_the_later_of_two() {
    let app = sample();
    let mut newer_app = app.clone();
    newer_app.version = Some("1.0.0.3".parse().expect("version"));
    newer_app.update_time = parse_date("2026-11-01");
    // Of one application, the version decides, whatever the dates.
    assert_eq!(newer_app.compare_succession(&app), Ordering::Greater);
    let mut lanup = app.clone();
    lanup.restart.app_name = Some("lanup".into());
    lanup.version = Some("0.2.0".parse().expect("version"));
    lanup.update_time = parse_date("2026-11-21");
    // lanup 0.2.0, published after the application's 1.0.0.2, comes next;
    // the application's next release, published later still, after it.
    assert_eq!(lanup.compare_succession(&app), Ordering::Greater);
    assert_eq!(app.compare_succession(&lanup), Ordering::Less);
    let mut later_app = newer_app.clone();
    later_app.update_time = parse_date("2026-11-22");
    assert_eq!(later_app.compare_succession(&lanup), Ordering::Greater);
}

#[test]
fn without_versions_the_date_decides() {
    let mut old = sample();
    old.version = None;
    let mut new = old.clone();
    new.update_time = parse_date("2026-11-21");
    assert_eq!(new.compare_release(&old), Ordering::Greater);
    let no_version = Manifest::parse(
        br#"<AutoUpdater><URLAddres URL="x"/><UpdateInfo><UpdateTime Date = "2005-02-03"/></UpdateInfo><UpdateFileList/></AutoUpdater>"#,
    )
    .expect("parses");
    assert_eq!(no_version.version, None);
    assert_eq!(no_version.release_name(), "2005-02-03T00:00:00Z");
}

#[test]
fn bad_values_are_named() {
    let xml = sample().to_xml().expect("serialise");
    let cases = [
        (
            xml.replace("Num=\"1.0.0.2\"", "Num=\"1.x\""),
            "Version Num=\"1.x\"",
        ),
        (
            xml.replace("Date=\"2026-11-20T08:00:00Z\"", "Date=\"yesterday\""),
            "UpdateTime Date=\"yesterday\"",
        ),
        (
            xml.replace("Mode=\"755\"", "Mode=\"4755\""),
            "Mode=\"4755\"",
        ),
        (xml.replace("Size=\"3000\"", "Size=\"3k\""), "Size=\"3k\""),
        (xml.replace("Format=\"2\"", "Format=\"3\""), "Format=\"3\""),
        (
            xml.replace("Allow=\"Yes\"", "Allow=\"maybe\""),
            "Allow=\"maybe\"",
        ),
    ];
    for (bad, expected) in cases {
        let err = Manifest::parse(bad.as_bytes()).expect_err(expected);
        assert!(err.to_string().contains(expected), "{err} lacks {expected}");
    }
    assert_eq!(Manifest::parse(b"\xff\xfe"), Err(ManifestError::NotUtf8));
    assert!(matches!(
        Manifest::parse(b"<AutoUpdater"),
        Err(ManifestError::Xml(_))
    ));
}

#[test]
fn the_start_file_must_be_listed() {
    let mut m = sample();
    m.restart.exe = Some("bin/missing".into());
    let err = parse_v2(&m).validate().expect_err("unknown exe");
    assert_eq!(err, ManifestError::UnknownExe("bin/missing".into()));
}

/// The sample with a compressed copy of a chunk and a patch from an
/// earlier build of `bin/TIMS`.
fn with_deltas() -> Manifest {
    let mut m = sample();
    let f = &mut m.files[0];
    let first = f.chunks[0];
    f.packed.insert(
        first.hash,
        Blob {
            size: 400,
            hash: Hash::of(b"packed"),
        },
    );
    f.patches.push(Patch {
        from: Hash::of(b"TIMS 1.0.0.1"),
        offset: 0,
        length: 3000,
        base_offset: 0,
        base_length: 2900,
        blob: Blob {
            size: 120,
            hash: Hash::of(b"patch"),
        },
    });
    m
}

#[test]
fn patches_and_packed_chunks_round_trip() {
    let m = with_deltas();
    m.validate().expect("valid");
    let xml = m.to_xml().expect("serialise");
    assert!(xml.contains("PackedSize=\"400\""), "{xml}");
    assert!(xml.contains("<Patch From="), "{xml}");
    assert_eq!(parse_v2(&m), m);
}

#[test]
fn a_packed_copy_no_smaller_than_its_chunk_is_refused() {
    let mut m = with_deltas();
    let first = m.files[0].chunks[0];
    m.files[0].packed.insert(
        first.hash,
        Blob {
            size: first.size,
            hash: Hash::of(b"packed"),
        },
    );
    assert!(matches!(
        m.validate(),
        Err(ManifestError::BadPacked { index: 0, .. })
    ));
    let mut m = with_deltas();
    m.files[0].patches[0].length = 2999;
    let err = m.validate().expect_err("a patch that misses a byte");
    assert!(err.to_string().contains("Patch 0"), "{err}");
}

/// What a reader that predates patches sees: the same files and chunks.
#[test]
fn the_delta_elements_leave_the_files_and_chunks_as_they_were() {
    let m = with_deltas();
    let xml = m.to_xml().expect("serialise");
    #[derive(serde::Deserialize)]
    struct OldChunk {
        #[serde(rename = "@Hash")]
        hash: String,
    }
    #[derive(serde::Deserialize)]
    struct OldFile {
        #[serde(rename = "Chunk", default)]
        chunks: Vec<OldChunk>,
    }
    #[derive(serde::Deserialize)]
    struct OldList {
        #[serde(rename = "UpdateFile")]
        files: Vec<OldFile>,
    }
    #[derive(serde::Deserialize)]
    struct Old {
        #[serde(rename = "UpdateFileList")]
        list: OldList,
    }
    let old: Old = quick_xml::de::from_str(&xml).expect("an old reader parses it");
    let hashes: Vec<&str> = old.list.files[0]
        .chunks
        .iter()
        .map(|c| c.hash.as_str())
        .collect();
    let expected: Vec<String> = m.files[0]
        .chunks
        .iter()
        .map(|c| c.hash.to_string())
        .collect();
    assert_eq!(hashes, expected);
}

#[test]
fn bundles_round_trip_and_a_malformed_one_is_named() {
    let mut m = sample();
    m.files[1] = UpdateFile {
        name: "etc/a.conf".into(),
        size: Some(900),
        mode: None,
        hash: Some(Hash::of(b"a")),
        chunks: vec![chunk(900, b"a")],
        ..Default::default()
    };
    m.files.push(UpdateFile {
        name: "etc/b.conf".into(),
        size: Some(700),
        mode: None,
        hash: Some(Hash::of(b"b")),
        chunks: vec![chunk(700, b"b")],
        ..Default::default()
    });
    m.bundles.push(crate::manifest::Bundle {
        first: 1,
        count: 2,
        blob: crate::manifest::Blob {
            size: 600,
            hash: Hash::of(b"bundle"),
        },
    });
    m.validate().expect("valid");
    let xml = m.to_xml().expect("serialise");
    assert!(
        xml.contains("<Bundle First=\"1\" Count=\"2\" Size=\"600\""),
        "{xml}"
    );
    assert_eq!(parse_v2(&m), m);
    let bad = xml.replace("Count=\"2\"", "Count=\"two\"");
    let e = Manifest::parse(bad.as_bytes()).expect_err("malformed");
    assert_eq!(
        e.to_string(),
        "manifest Bundle 0: Count=\"two\" is not a number"
    );
    let mut overrun = m.clone();
    overrun.bundles[0].count = 3;
    assert!(overrun.validate().is_err());
}

#[test]
fn runs_round_trip_unknown_elements_are_ignored_and_a_malformed_run_is_named() {
    let mut m = sample();
    m.runs.push(crate::manifest::Run {
        first: 0,
        count: 2,
        blob: crate::manifest::Blob {
            size: 2500,
            hash: Hash::of(b"run"),
        },
    });
    m.validate().expect("valid");
    let xml = m.to_xml().expect("serialise");
    assert!(
        xml.contains("<Run First=\"0\" Count=\"2\" Size=\"2500\""),
        "{xml}"
    );
    assert_eq!(parse_v2(&m), m);
    // A reader ignores an element it does not know, as a node before
    // runs does with `Runs`.
    let later = xml.replace("<Runs>", "<Later><Run First=\"x\"/></Later><Runs>");
    assert_eq!(Manifest::parse(later.as_bytes()).expect("parses"), m);
    let bad = xml.replace("Size=\"2500\"", "Size=\"lots\"");
    let e = Manifest::parse(bad.as_bytes()).expect_err("malformed");
    assert_eq!(
        e.to_string(),
        "manifest Run 0: Size=\"lots\" is not a number"
    );
    let mut big = m.clone();
    big.runs[0].blob.size = 3000;
    assert!(big.validate().is_err(), "a run no smaller than its chunks");
}

#[test]
fn names_windows_cannot_hold_are_named_with_the_reason() {
    for ok in [
        "bin/TIMS.exe",
        "share/données/été €.txt",
        "console.log",
        "com10.txt",
        "a.b.c",
        "auxiliary/x",
    ] {
        assert_eq!(windows_refuses(ok), None, "{ok}");
    }
    for (bad, says) in [
        ("logs/2026-11-20T08:00:00Z.txt", "':'"),
        ("what?.txt", "'?'"),
        ("a/b*/c", "'*'"),
        ("pipe|d", "'|'"),
        ("dir./file", "ends in a dot"),
        ("file ", "ends in a dot or a space"),
        ("CON", "device CON"),
        ("drivers/aux.c", "device AUX"),
        ("nul.tar.gz", "device NUL"),
        ("Lpt1", "device LPT1"),
        ("conout$.txt", "device CONOUT$"),
    ] {
        let why = windows_refuses(bad).unwrap_or_default();
        assert!(why.contains(says), "{bad}: {why:?}");
    }
    assert_eq!(case_twins(["a/x", "a/y", "b/x"]), None);
    assert_eq!(
        case_twins(["a/x", "A/y", "Docs/Read.me", "docs/read.ME"]),
        Some(("Docs/Read.me", "docs/read.ME"))
    );
}
