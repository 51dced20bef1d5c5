//! `lanup demo`: lanup's job end to end on one machine, with nothing but
//! the repository built. A sample application is published and signed, an
//! origin serves it behind a capped "uplink", and a node fetches the release
//! chunk by chunk, verifies and stages it; then a second version with a few
//! small edits shows that only the changed chunks cross the uplink.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lanup_node::fetch::{assemble, fetch_missing};
use lanup_node::keys;
use lanup_node::origin::{Origin, Stats};
use lanup_node::release::{self, ManifestSource, PublishOptions};
use lanup_node::store::ChunkStore;
use lanup_node::throttle::Throttle;
use lanup_protocol::manifest::Restart;
use lanup_protocol::units::{format_bytes, Rate};
use time::OffsetDateTime;

/// Demo settings, from the command line.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Size of the sample release.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = parse_size)]
    size: u64,
    /// The origin's uplink cap (bytes/s like 8MiB, or bits/s like 64mbit).
    #[arg(long, value_name = "RATE", default_value = "64mbit")]
    rate: Rate,
    /// Keep the demo's files in this folder instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    lanup_protocol::units::parse_size(s).map_err(|e| e.to_string())
}

struct Step {
    release: String,
    size: u64,
    uplink: u64,
    secs: f64,
}

pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    if args.size < 1024 * 1024 {
        bail!("--size must be at least 1MiB");
    }
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let app = root.join("sample-app");
    let www = root.join("origin");
    let state = root.join("node");
    std::fs::create_dir_all(&www)?;

    say(&format!("lanup demo in {}", root.display()));
    write_sample_app(&app, args.size)?;
    let key_path = root.join("publisher.key");
    let _ = std::fs::remove_file(&key_path);
    let public = keys::generate(&key_path)?;
    let key = keys::load_secret(&key_path)?;
    say(&format!("publisher key {public}"));

    let origin = Origin::bind(&www, "127.0.0.1:0", Some(args.rate)).await?;
    let base = format!("http://{}/", origin.local_addr()?);
    let stats = origin.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(origin.serve(async {
        let _ = stopped.await;
    }));
    say(&format!("origin at {base}, uplink capped at {}", args.rate));

    let store = ChunkStore::open(&state.join("chunks"))?;
    let client = reqwest::Client::new();
    let mut steps = Vec::new();
    for (version, edit) in [("1.0.0", false), ("1.1.0", true)] {
        if edit {
            edit_sample_app(&app)?;
            say("edited the sample app: three 64 KiB changes in bin/sample-app, one file added");
        }
        let published = release::publish(
            &PublishOptions {
                dir: app.clone(),
                out: www.clone(),
                version: version.parse()?,
                url: base.clone(),
                update_time: OffsetDateTime::now_utc(),
                expires: None,
                restart: Restart {
                    allow: true,
                    app_name: Some("sample-app".into()),
                    exe: Some("bin/sample-app".into()),
                },
            },
            &key,
        )?;
        let size = published.manifest.total_size();
        say(&format!(
            "published {version}: {} files, {}, signed",
            published.manifest.files.len(),
            format_bytes(size)
        ));

        let before = stats.bytes_served();
        let started = Instant::now();
        let source = ManifestSource::read(&base).await?;
        let manifest =
            source.authenticate(std::slice::from_ref(&public), OffsetDateTime::now_utc())?;
        let bar = progress(size);
        let report = fetch_missing(
            &client,
            &base,
            &manifest,
            &store,
            &Throttle::default(),
            |_| false,
            |c| bar.inc(c.size),
        )
        .await?;
        bar.finish_and_clear();
        let staging = state.join("staging").join(version);
        assemble(&manifest, &store, &staging)?;
        let mismatches = release::verify_dir(&manifest, &staging);
        if !mismatches.is_empty() {
            bail!("staged {version} does not match its manifest: {mismatches:?}");
        }
        let secs = started.elapsed().as_secs_f64();
        let uplink = stats.bytes_served() - before;
        say(&format!(
            "fetched {version}: {} over the uplink in {} Range requests ({} already held), staged and verified in {secs:.1} s",
            format_bytes(report.bytes),
            report.requests,
            format_bytes(report.already_held)
        ));
        steps.push(Step {
            release: version.into(),
            size,
            uplink,
            secs,
        });
    }
    let _ = stop.send(());
    server.await.context("origin task")??;
    report(&steps, &stats);
    Ok(())
}

fn say(line: &str) {
    println!("• {line}");
    let _ = std::io::stdout().flush();
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "  {bar:40} {bytes}/{total_bytes} {bytes_per_sec} (release bytes verified)",
    ) {
        bar.set_style(style);
    }
    bar
}

fn report(steps: &[Step], stats: &Stats) {
    println!();
    println!("release   size        over uplink   share of release   time");
    for s in steps {
        println!(
            "{:<9} {:<11} {:<13} {:>6.1}%            {:.1} s",
            s.release,
            format_bytes(s.size),
            format_bytes(s.uplink),
            s.uplink as f64 * 100.0 / s.size as f64,
            s.secs
        );
    }
    println!(
        "origin /_lanup/stats: {} bytes served in {} requests",
        stats.bytes_served(),
        stats.requests()
    );
}

/// Deterministic, incompressible sample content.
fn fill(out: &mut impl Write, mut len: u64, seed: u64) -> std::io::Result<()> {
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    while len > 0 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = len.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        len -= n as u64;
    }
    Ok(())
}

fn write_sample_app(app: &Path, size: u64) -> Result<()> {
    let _ = std::fs::remove_dir_all(app);
    for dir in ["bin", "lib", "etc"] {
        std::fs::create_dir_all(app.join(dir))?;
    }
    let exe = app.join("bin/sample-app");
    fill(
        &mut std::io::BufWriter::new(std::fs::File::create(&exe)?),
        size * 3 / 4,
        1,
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    fill(
        &mut std::fs::File::create(app.join("lib/assets.pak"))?,
        size / 4,
        2,
    )?;
    std::fs::write(app.join("etc/sample.conf"), "listen = 0.0.0.0:9000\n")?;
    Ok(())
}

fn edit_sample_app(app: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let exe = app.join("bin/sample-app");
    let len = std::fs::metadata(&exe)?.len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&exe)?;
    for (i, at) in [len / 5, len / 2, len * 4 / 5].into_iter().enumerate() {
        f.seek(SeekFrom::Start(at))?;
        fill(&mut f, 64 * 1024, 100 + i as u64)?;
    }
    fill(
        &mut std::fs::File::create(app.join("lib/plugin.so"))?,
        256 * 1024,
        3,
    )?;
    Ok(())
}
