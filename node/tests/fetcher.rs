//! The origin fetcher as an actor, against the real embedded origin over
//! HTTP: it does what its duty says and nothing else. It polls only while
//! this node acts as the site's fetcher, downloads only what the site
//! lacks, stops the moment the role is gone, and never downloads on a lease
//! the node did not renew (a node that was frozen).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::pseudo_random;
use lanup_node::fetcher::{Duty, Fetcher, FetcherEvent, Wanted};
use lanup_node::origin::Origin;
use lanup_node::release::{publish, PublishOptions};
use lanup_node::store::ChunkStore;
use lanup_node::throttle::Throttle;
use lanup_protocol::manifest::{unique_chunks, Restart};
use lanup_protocol::sign::SecretKey;
use lanup_protocol::units::Rate;
use lanup_protocol::{Hash, Manifest};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The next event within `wait`, or why none came.
async fn next(events: &mut mpsc::Receiver<FetcherEvent>, wait: Duration) -> Result<FetcherEvent> {
    match tokio::time::timeout(wait, events.recv()).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => bail!("the fetcher stopped"),
        Err(_) => bail!("no event from the fetcher within {wait:?}"),
    }
}

fn wanted(manifest: &Arc<Manifest>, lacking: BTreeSet<Hash>) -> Wanted {
    Wanted {
        hash: Hash::of(b"release"),
        manifest: manifest.clone(),
        lacking: Arc::new(lacking),
        heard_all: true,
        adopted_at: Instant::now(),
        blocked: false,
        bases: Arc::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn does_its_duty_and_stops_when_the_role_or_the_lease_is_gone() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (app, www) = (tmp.path().join("app"), tmp.path().join("www"));
    std::fs::create_dir_all(&app)?;
    std::fs::create_dir_all(&www)?;
    std::fs::write(app.join("a.bin"), pseudo_random(9 << 20, 7))?;
    // 2 MiB/s: a release of 9 MiB takes seconds, long enough to stop one.
    let origin = Origin::bind(&www, "127.0.0.1:0", Some(Rate::from_bytes_per_sec(2 << 20))).await?;
    let base = format!("http://{}/", origin.local_addr()?);
    let stats = origin.stats();
    let server = tokio::spawn(origin.serve(std::future::pending()));
    let key = SecretKey::generate();
    publish(
        &PublishOptions {
            dir: app.clone(),
            out: www.clone(),
            version: "1.0".parse()?,
            url: base.clone(),
            update_time: OffsetDateTime::now_utc(),
            expires: None,
            restart: Restart::default(),
            deltas: Default::default(),
            linux_only: false,
        },
        &key,
    )?;

    let store = ChunkStore::open(&tmp.path().join("chunks"))?;
    let (fetcher, handle, mut events) = Fetcher::new(
        Some(base),
        Duration::from_secs(10),
        Throttle::new(None),
        store.clone(),
        Duration::from_secs(3600),
    )?;
    let cancel = CancellationToken::new();
    let actor = tokio::spawn(fetcher.run(cancel.clone()));

    // Not the site's fetcher: the origin hears nothing.
    handle.assign(Duty::default());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats.requests(), 0, "a node that is not the fetcher polled");

    // The fetcher: it polls and hands over the manifest.
    let acting = |release: Option<Wanted>| Duty {
        acting: true,
        confirmed: Some(Instant::now()),
        release,
        serial: 0,
    };
    handle.assign(acting(None));
    let FetcherEvent::Manifest { text, .. } = next(&mut events, Duration::from_secs(10)).await?
    else {
        bail!("expected the origin's manifest first");
    };
    let manifest = Arc::new(text.parse()?);
    let chunks = unique_chunks(&manifest.files);
    assert!(chunks.len() >= 3, "the release should span several chunks");
    let all: BTreeSet<Hash> = chunks.keys().copied().collect();

    // It downloads what the site lacks; the role ends midway: it stops at
    // once and tells the node, and the origin sends no more.
    handle.assign(acting(Some(wanted(&manifest, all.clone()))));
    loop {
        if let FetcherEvent::Chunk { .. } = next(&mut events, Duration::from_secs(20)).await? {
            break;
        }
    }
    handle.assign(Duty::default());
    let stopped_at = Instant::now();
    loop {
        if let FetcherEvent::Ended = next(&mut events, Duration::from_secs(5)).await? {
            break;
        }
    }
    assert!(
        stopped_at.elapsed() < Duration::from_secs(2),
        "the download stopped {:?} after the role was gone",
        stopped_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = stats.bytes_served();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stats.bytes_served(),
        served,
        "the origin kept sending after the role was gone"
    );
    let size: u64 = chunks.values().sum();
    assert!(served < size, "the whole release crossed before the stop");

    // A duty whose lease the node did not renew (it was frozen) starts
    // nothing.
    let lacking: BTreeSet<Hash> = all.iter().filter(|h| !store.has(h)).copied().collect();
    handle.assign(Duty {
        acting: true,
        confirmed: Instant::now().checked_sub(Duration::from_secs(10)),
        release: Some(wanted(&manifest, lacking)),
        serial: 0,
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stats.bytes_served(),
        served,
        "a download started on a lapsed lease"
    );

    // Renewed: it takes only what is still lacking, and the release is
    // whole in the store. The origin sent it about once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !all.iter().all(|h| store.has(h)) {
        if Instant::now() > deadline {
            bail!("the release was not fetched within 30 s");
        }
        // As the node does: what the store lacks now, renewed often.
        let lacking = all.iter().filter(|h| !store.has(h)).copied().collect();
        handle.assign(acting(Some(wanted(&manifest, lacking))));
        tokio::time::sleep(Duration::from_millis(200)).await;
        while events.try_recv().is_ok() {}
    }
    let total = stats.bytes_served();
    assert!(
        (total as f64) < size as f64 * 1.05 + 64.0 * 1024.0,
        "the origin served {total} bytes for a release of {size}"
    );
    // A duty out of date (the node has not looked at its store yet)
    // starts at most one download, which finds everything held: not a
    // loop of them.
    while events.try_recv().is_ok() {}
    handle.assign(acting(Some(wanted(&manifest, all.clone()))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut ended = 0;
    while let Ok(event) = events.try_recv() {
        ended += usize::from(matches!(event, FetcherEvent::Ended));
    }
    assert!(ended <= 1, "{ended} downloads for one duty");
    assert_eq!(stats.bytes_served(), total, "the origin sent more");
    let status = handle.status();
    assert!(status.error.is_none(), "error: {:?}", status.error);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), actor)
        .await
        .context("the fetcher did not stop when cancelled")??;
    server.abort();
    Ok(())
}
