//! A node's origin download against the real embedded origin over HTTP:
//! only missing chunks cross, every chunk is verified, files assemble to
//! their manifest hashes.

use std::path::Path;

use anyhow::Result;
use lanup_node::fetch::{assemble, fetch_missing};
use lanup_node::origin::Origin;
use lanup_node::release::{publish, verify_dir, ManifestSource, PublishOptions};
use lanup_node::store::ChunkStore;
use lanup_node::throttle::Throttle;
use lanup_protocol::manifest::{unique_chunks, Restart};
use lanup_protocol::plan::origin_requests;
use lanup_protocol::sign::SecretKey;
use lanup_protocol::Manifest;
use time::OffsetDateTime;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len.div_ceil(8))
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .take(len)
        .collect()
}

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
    let client = reqwest::Client::new();
    let source = ManifestSource::read(&base).await?;
    let m1 = source.authenticate(&[key.public()], OffsetDateTime::now_utc())?;
    assert_eq!(m1, v1);
    let manifest_bytes = stats.bytes_served();

    let report = fetch_missing(
        &client,
        &base,
        &m1,
        &store,
        &Throttle::default(),
        |_| false,
        |_| {},
    )
    .await?;
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
    let report = fetch_missing(
        &client,
        &base,
        &v2,
        &store,
        &Throttle::default(),
        |_| false,
        |_| {},
    )
    .await?;
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
    let err = fetch_missing(
        &client,
        &base,
        &v3,
        &store,
        &Throttle::default(),
        |_| false,
        |_| {},
    )
    .await
    .expect_err("corrupt origin file refused");
    assert!(format!("{err:#}").contains("x.bin"), "{err:#}");
    assert!(v3.files[0].chunks.iter().all(|c| !store.has(&c.hash)));

    let _ = stop.send(());
    server.await??;
    Ok(())
}
