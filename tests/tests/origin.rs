//! The embedded origin: exact bytes for Range requests, resumable
//! downloads, ETags, a byte count, a rate cap, and no way out of its folder.

use std::io::{Read, Write};
use std::time::Instant;

use reqwest::blocking::Client;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_NONE_MATCH, RANGE};
use reqwest::StatusCode;

use crate::common::*;

fn setup(len: usize, rate: Option<&str>) -> (tempfile::TempDir, Vec<u8>, OriginProc) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = pseudo_random(len, 9);
    write(tmp.path(), "bin/file.bin", &data);
    write(tmp.path(), "données/été.txt", b"accent\n");
    let origin = OriginProc::start(tmp.path(), rate);
    (tmp, data, origin)
}

#[test]
fn range_requests_get_exact_bytes() {
    let (_tmp, data, origin) = setup(1_000_000, None);
    let url = format!("{}bin/file.bin", origin.url);
    let client = Client::new();
    let len = data.len();
    let cases: [(String, usize, usize); 4] = [
        ("bytes=0-0".into(), 0, 1),
        ("bytes=1000-1999".into(), 1000, 2000),
        (format!("bytes={}-", len - 10), len - 10, len),
        ("bytes=-500".into(), len - 500, len),
    ];
    for (range, start, end) in cases {
        let resp = client.get(&url).header(RANGE, &range).send().expect("GET");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        let cr = resp.headers()[CONTENT_RANGE]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(cr, format!("bytes {start}-{}/{len}", end - 1), "{range}");
        assert_eq!(
            resp.bytes().expect("body").as_ref(),
            &data[start..end],
            "{range}"
        );
    }
    let resp = client
        .get(&url)
        .header(RANGE, format!("bytes={len}-"))
        .send()
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        resp.headers()[CONTENT_RANGE],
        format!("bytes */{len}").as_str()
    );

    let whole = client.get(&url).send().expect("GET");
    assert_eq!(whole.status(), StatusCode::OK);
    let etag = whole.headers()[ETAG].clone();
    assert_eq!(whole.bytes().expect("body").as_ref(), &data[..]);
    let again = client
        .get(&url)
        .header(IF_NONE_MATCH, etag)
        .send()
        .expect("GET");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let head = client.head(&url).send().expect("HEAD");
    assert_eq!(
        head.headers()[reqwest::header::CONTENT_LENGTH],
        len.to_string().as_str()
    );

    let accent = client
        .get(format!("{}donn%C3%A9es/%C3%A9t%C3%A9.txt", origin.url))
        .send()
        .expect("GET");
    assert_eq!(accent.bytes().expect("body").as_ref(), b"accent\n");

    // 1 + 1000 + 10 + 500 + whole file + 7; nothing for 416, 304 and HEAD.
    let expected = 1 + 1000 + 10 + 500 + len as u64 + 7;
    assert_eq!(origin.stats()["bytes_served"], expected);
    assert_eq!(origin.stats()["requests"], 9);
}

#[test]
fn a_cut_download_resumes_to_the_exact_file() {
    let (_tmp, data, origin) = setup(4 * 1024 * 1024, Some("8MiB"));
    let url = format!("{}bin/file.bin", origin.url);
    let mut got = Vec::new();
    {
        let mut resp = reqwest::blocking::get(&url).expect("GET");
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < 1_500_000 {
            let n = resp.read(&mut buf).expect("read");
            assert!(n > 0, "body ended early");
            got.extend_from_slice(&buf[..n]);
        }
        // Dropping the response cuts the connection mid-body.
    }
    let rest = Client::new()
        .get(&url)
        .header(RANGE, format!("bytes={}-", got.len()))
        .send()
        .expect("resume");
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    got.extend_from_slice(&rest.bytes().expect("body"));
    assert_eq!(blake3::hash(&got), blake3::hash(&data));
    let served = origin.stats()["bytes_served"].as_u64().expect("count");
    // The cut stream may have had some blocks in flight when it was dropped.
    assert!(
        served >= data.len() as u64 && served < data.len() as u64 + 2 * 1024 * 1024,
        "{served}"
    );
}

#[test]
fn the_rate_cap_holds_the_uplink_down() {
    // An upper bound on speed only: a slow machine cannot make this fail.
    let (_tmp, data, origin) = setup(3 * 1024 * 1024, Some("1MiB"));
    let started = Instant::now();
    let body = reqwest::blocking::get(format!("{}bin/file.bin", origin.url))
        .and_then(|r| r.bytes())
        .expect("GET");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(body.len(), data.len());
    let rate = data.len() as f64 / secs / 1048576.0;
    assert!(rate <= 1.15, "{rate:.2} MiB/s through a 1 MiB/s cap");
}

#[test]
fn no_path_leaves_the_folder() {
    let (tmp, _data, origin) = setup(10, None);
    let outside = tmp
        .path()
        .parent()
        .expect("parent")
        .join("lanup-origin-secret");
    std::fs::write(&outside, b"secret").expect("write");
    std::os::unix::fs::symlink(&outside, tmp.path().join("link")).expect("symlink");
    let addr = origin
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    for path in [
        "/../lanup-origin-secret",
        "/bin/../../lanup-origin-secret",
        "/%2e%2e/lanup-origin-secret",
        "/bin/..%2f..%2flanup-origin-secret",
        "/link",
        "/bin",
    ] {
        // A raw request: HTTP clients normalise `..` away before sending.
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("read");
        assert!(
            answer.starts_with("HTTP/1.1 404") || answer.starts_with("HTTP/1.1 400"),
            "{path}: {answer}"
        );
        assert!(
            !answer.contains("secret\n") && !answer.ends_with("secret"),
            "{path} leaked"
        );
    }
    let _ = std::fs::remove_file(outside);
}
