//! A node's origin download against the real embedded origin over HTTP:
//! only missing chunks cross, every chunk is verified, files assemble to
//! their manifest hashes.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use common::pseudo_random;
use lanup_node::fetch::{assemble, fetch_missing, FetchError};
use lanup_node::origin::Origin;
use lanup_node::release::{publish, verify_dir, ManifestSource, PublishOptions};
use lanup_node::store::ChunkStore;
use lanup_node::throttle::Throttle;
use lanup_protocol::manifest::{unique_chunks, Restart};
use lanup_protocol::plan::origin_requests;
use lanup_protocol::sign::SecretKey;
use lanup_protocol::Manifest;
use time::OffsetDateTime;

fn publish_dir(
    app: &Path,
    www: &Path,
    version: &str,
    base: &str,
    key: &SecretKey,
) -> Result<Manifest> {
    Ok(publish(
        &PublishOptions {
            dir: app.to_owned(),
            out: www.to_owned(),
            version: version.parse()?,
            url: base.to_owned(),
            update_time: OffsetDateTime::now_utc(),
            expires: None,
            restart: Restart::default(),
            deltas: Default::default(),
            linux_only: false,
        },
        key,
    )?
    .manifest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_missing_chunks_cross_and_files_assemble() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (app, www, state) = (
        tmp.path().join("app"),
        tmp.path().join("www"),
        tmp.path().join("state"),
    );
    std::fs::create_dir_all(app.join("bin"))?;
    std::fs::create_dir_all(&www)?;
    let mut big = pseudo_random(12 << 20, 1);
    std::fs::write(app.join("bin/app"), &big)?;
    std::fs::write(app.join("same-as-part.bin"), &big[..3 << 20])?;
    std::fs::write(app.join("empty"), b"")?;

    let origin = Origin::bind(&www, "127.0.0.1:0", None).await?;
    let base = format!("http://{}/", origin.local_addr()?);
    let stats = origin.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(origin.serve(async {
        let _ = stopped.await;
    }));

    let key = SecretKey::generate();
    let v1 = publish_dir(&app, &www, "1", &base, &key)?;
    let store = ChunkStore::open(&state.join("chunks"))?;
    let from_origin = lanup_node::fetch::Origin {
        client: lanup_node::fetch::Origin::client(Duration::from_secs(10))?,
        base: base.clone(),
        wan: Throttle::default(),
        stall: Duration::from_secs(10),
        received: Default::default(),
    };
    let source = ManifestSource::read(&base).await?;
    let m1 = source.authenticate(&[key.public()], OffsetDateTime::now_utc())?;
    assert_eq!(m1, v1);
    let manifest_bytes = stats.bytes_served();

    let report = fetch_missing(&from_origin, &m1, &store, |_| true, |_| {}).await?;
    let unique: u64 = unique_chunks(&m1.files).values().sum();
    assert_eq!(report.bytes, unique);
    assert_eq!(stats.bytes_served() - manifest_bytes, unique);
    assemble(&m1, &store, &state.join("staging/1"))?;
    assert!(verify_dir(&m1, &state.join("staging/1")).is_empty());

    // v2: three 64 KiB edits and a new file; only chunks v1 lacks cross.
    for at in [2 << 20, 6 << 20, 10 << 20] {
        for b in &mut big[at..at + 65536] {
            *b = b.wrapping_add(1);
        }
    }
    std::fs::write(app.join("bin/app"), &big)?;
    std::fs::write(app.join("new.dat"), pseudo_random(300_000, 7))?;
    let v2 = publish_dir(&app, &www, "2", &base, &key)?;
    let expected: u64 = origin_requests(&v2, |h| store.has(h))
        .iter()
        .map(|r| r.len())
        .sum();
    let before = stats.bytes_served();
    let report = fetch_missing(&from_origin, &v2, &store, |_| true, |_| {}).await?;
    assert_eq!(report.bytes, expected);
    assert_eq!(stats.bytes_served() - before, expected);
    assert!(
        expected < unique / 2,
        "a small edit cost {expected} of {unique} bytes"
    );
    assemble(&v2, &store, &state.join("staging/2"))?;
    assert!(verify_dir(&v2, &state.join("staging/2")).is_empty());

    // A file changed at the origin after publishing: the chunk is refused,
    // nothing wrong is stored, and the error names the file.
    let v3_app = tmp.path().join("app3");
    std::fs::create_dir_all(&v3_app)?;
    std::fs::write(v3_app.join("x.bin"), pseudo_random(500_000, 9))?;
    let www3 = tmp.path().join("www3");
    std::fs::create_dir_all(&www3)?;
    let v3 = publish_dir(&v3_app, &www3, "3", &base, &key)?;
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("x.bin"), pseudo_random(500_000, 10))?;
    let err = fetch_missing(&from_origin, &v3, &store, |_| true, |_| {})
        .await
        .expect_err("corrupt origin file refused");
    assert!(format!("{err:#}").contains("x.bin"), "{err:#}");
    assert!(matches!(err, FetchError::Mismatch { .. }), "{err:?}");
    assert!(v3.files[0].chunks.iter().all(|c| !store.has(&c.hash)));

    let _ = stop.send(());
    server.await??;
    Ok(())
}

/// How the misbehaving test origin answers.
#[derive(Clone, Copy, Debug)]
enum Misbehave {
    /// The first answer stops after this many body bytes and then sends
    /// nothing, its connection open; later answers are whole.
    StallOnceAfter(u64),
    /// Every answer is 200 with the whole file, whatever the Range said.
    IgnoreRange,
}

/// An HTTP/1.1 origin that misbehaves as told, serving `www`; returns its
/// base URL, the Range starts it was asked for (`None`: no Range), and the
/// body bytes it sent.
async fn misbehaving_origin(
    www: &Path,
    how: Misbehave,
) -> Result<(String, Arc<Mutex<Vec<Option<u64>>>>, Arc<Mutex<u64>>)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/", listener.local_addr()?);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(0u64));
    let www = www.to_owned();
    let (asked2, sent2) = (asked.clone(), sent.clone());
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let stall = match how {
                Misbehave::StallOnceAfter(n) if std::mem::take(&mut first) => Some(n),
                _ => None,
            };
            let (www, asked, sent) = (www.clone(), asked2.clone(), sent2.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let Ok(Some(request)) = lines.next_line().await else {
                    return;
                };
                let path = request.split(' ').nth(1).unwrap_or("/").to_owned();
                let mut range = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.is_empty() {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        let mut parts = r.split('-');
                        let a = parts.next().and_then(|v| v.parse::<u64>().ok());
                        let b = parts.next().and_then(|v| v.parse::<u64>().ok());
                        range = a.zip(b);
                    }
                }
                let Ok(body) = std::fs::read(www.join(path.trim_start_matches('/'))) else {
                    let _ = write
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                };
                asked.lock().expect("lock").push(range.map(|(a, _)| a));
                let (status, part) = match (how, range) {
                    (Misbehave::IgnoreRange, _) | (_, None) => ("200 OK", &body[..]),
                    (_, Some((a, b))) => ("206 Partial Content", &body[a as usize..=b as usize]),
                };
                let mut head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
                    part.len()
                );
                if let (Some((a, b)), "206 Partial Content") = (range, status) {
                    head.push_str(&format!("content-range: bytes {a}-{b}/{}\r\n", body.len()));
                }
                head.push_str("\r\n");
                if write.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let part = match stall {
                    Some(n) => &part[..(n as usize).min(part.len())],
                    None => part,
                };
                for block in part.chunks(16 * 1024) {
                    if write.write_all(block).await.is_err() {
                        return;
                    }
                    *sent.lock().expect("lock") += block.len() as u64;
                }
                if stall.is_some() {
                    // Nothing more, and the connection stays open.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
    });
    Ok((base, asked, sent))
}

/// Publishes one 6 MiB file to `www` (chunks of about 1 MiB) and serves it
/// with `how`; returns the manifest, the served base URL and the counters.
async fn misbehaving_setup(
    tmp: &Path,
    how: Misbehave,
) -> Result<(
    Manifest,
    lanup_node::fetch::Origin,
    Arc<Mutex<Vec<Option<u64>>>>,
    Arc<Mutex<u64>>,
)> {
    let (app, www) = (tmp.join("app"), tmp.join("www"));
    std::fs::create_dir_all(&app)?;
    std::fs::create_dir_all(&www)?;
    std::fs::write(app.join("big.bin"), pseudo_random(6 << 20, 3))?;
    let key = SecretKey::generate();
    let (base, asked, sent) = misbehaving_origin(&www, how).await?;
    let manifest = publish_dir(&app, &www, "1", &base, &key)?;
    let stall = Duration::from_millis(700);
    let origin = lanup_node::fetch::Origin {
        client: lanup_node::fetch::Origin::client(stall)?,
        base,
        wan: Throttle::default(),
        stall,
        received: Default::default(),
    };
    Ok((manifest, origin, asked, sent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_resumes_at_the_byte_where_it_stopped() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // 1.5 MiB and a bit: the cut falls inside a chunk.
    let cut = (3 << 19) + 12_345;
    let (manifest, origin, asked, sent) =
        misbehaving_setup(tmp.path(), Misbehave::StallOnceAfter(cut)).await?;
    let store = ChunkStore::open(&tmp.path().join("chunks"))?;
    let report = fetch_missing(&origin, &manifest, &store, |_| true, |_| {}).await?;
    let size = manifest.files[0].size.unwrap_or_default();
    let asked = asked.lock().expect("lock").clone();
    assert_eq!(asked[0], Some(0));
    assert_eq!(
        asked[1],
        Some(cut),
        "the second request starts at the first byte not received; asked: {asked:?}"
    );
    assert_eq!(report.bytes, size, "no byte twice");
    assert_eq!(*sent.lock().expect("lock"), size);
    assemble(&manifest, &store, &tmp.path().join("staged"))?;
    assert!(verify_dir(&manifest, &tmp.path().join("staged")).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_ignores_range_is_read_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (manifest, origin, asked, sent) =
        misbehaving_setup(tmp.path(), Misbehave::IgnoreRange).await?;
    let store = ChunkStore::open(&tmp.path().join("chunks"))?;
    let chunks = &manifest.files[0].chunks;
    assert!(chunks.len() >= 4, "{} chunks", chunks.len());
    let report = fetch_missing(&origin, &manifest, &store, |_| true, |_| {}).await?;
    let size = manifest.files[0].size.unwrap_or_default();
    assert_eq!(report.bytes, size);
    assert_eq!(*sent.lock().expect("lock"), size, "the file crossed once");
    assert_eq!(asked.lock().expect("lock").len(), 1, "one request");
    assert!(chunks.iter().all(|c| store.has(&c.hash)));
    Ok(())
}
