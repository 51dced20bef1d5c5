//! `lanup demo`: lanup's job end to end on one machine, with nothing but
//! the repository built. An origin serves a signed sample release behind a
//! capped "uplink"; a site of N nodes on loopback, each with the sample
//! application installed in its own folder, fetches it once over the uplink
//! and shares it among themselves; version 1 is rolled out, then a version 2
//! with small edits is fetched (only its changed chunks cross the uplink)
//! and rolled out in canary waves with a bar per node. A short report
//! compares the uplink bytes with what N separate downloads would cost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lanup_node::config::{AppFile, ConfigFile, NodeConfig};
use lanup_node::control::ControlRequest;
use lanup_node::keys;
use lanup_node::origin::Origin;
use lanup_node::release::{self, PublishOptions};
use lanup_protocol::manifest::Restart;
use lanup_protocol::rollout::{parse_waves, Action};
use lanup_protocol::units::{format_bytes, Rate};
use time::OffsetDateTime;

use crate::commands::LocalNode;
use crate::rollout::{follow, issue, Followed, RolloutBars};

/// Demo settings, from the command line.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// How many nodes the site has.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=32))]
    nodes: u16,
    /// Size of the sample release.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = parse_size)]
    size: u64,
    /// The origin's uplink cap (bytes/s like 8MiB, or bits/s like 64mbit).
    #[arg(long, value_name = "RATE", default_value = "64mbit")]
    rate: Rate,
    /// Canary waves for version 2.
    #[arg(long, value_name = "SIZES", default_value = "1,50%,100%")]
    waves: String,
    /// Keep the demo's files in this folder instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    lanup_protocol::units::parse_size(s).map_err(|e| e.to_string())
}

/// The sample application's process name.
const APP: &str = "demo-app";

/// One release's trip across the uplink.
struct Step {
    release: String,
    size: u64,
    uplink: u64,
    secs: f64,
}

/// The site: nodes running in this process, each with its own state and
/// install folder, stopped (and their applications with them) on drop.
struct Site {
    rt: tokio::runtime::Runtime,
    states: Vec<PathBuf>,
    installs: Vec<PathBuf>,
    /// Each node's `[app]`, as its node runs with it.
    apps: Vec<lanup_node::config::AppConfig>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl Site {
    fn start(
        rt: tokio::runtime::Runtime,
        root: &Path,
        n: usize,
        origin: &str,
        publisher: &str,
        admin: &str,
    ) -> Result<Site> {
        let ports = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0")?.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut site = Site {
            rt,
            states: (0..n).map(|i| root.join(format!("node{i}"))).collect(),
            installs: (0..n).map(|i| root.join(format!("install{i}"))).collect(),
            apps: Vec::new(),
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        for i in 0..n {
            std::fs::create_dir_all(&site.installs[i])?;
            let addr = |a: &std::net::SocketAddr| format!("/ip4/127.0.0.1/tcp/{}", a.port());
            let config = NodeConfig::resolve(
                None,
                ConfigFile {
                    state: Some(site.states[i].clone()),
                    listen: Some(vec![addr(&ports[i])]),
                    peers: Some(
                        (0..n)
                            .filter(|&j| j != i)
                            .map(|j| addr(&ports[j]))
                            .collect(),
                    ),
                    origin: Some(origin.to_owned()),
                    trust_publisher: Some(vec![publisher.to_owned()]),
                    trust_admin: Some(vec![admin.to_owned()]),
                    site: Some("demo".into()),
                    poll_interval: Some("1h".into()),
                    mdns: Some(false),
                    app: Some(AppFile {
                        name: Some(APP.into()),
                        install_dir: Some(std::path::absolute(&site.installs[i])?),
                        start: Some(vec![format!("bin/{APP}")]),
                        stop_timeout: Some("5s".into()),
                        health_after: Some("1s".into()),
                        ..AppFile::default()
                    }),
                    ..ConfigFile::default()
                },
            )?;
            site.apps.extend(config.app.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            site.stops.push(stop);
            site.tasks.push(site.rt.spawn(async move {
                lanup_node::node::run(config, async {
                    let _ = stopped.await;
                })
                .await
                .map(|_| ())
            }));
        }
        Ok(site)
    }

    fn node(&self, i: usize) -> LocalNode {
        LocalNode {
            state: self.states[i].clone(),
        }
    }

    fn status(&self) -> Result<serde_json::Value> {
        self.node(0).ask(ControlRequest::Status)
    }

    /// Waits until every node has `version` staged, drawing a bar per node.
    fn wait_staged(&self, version: &str) -> Result<()> {
        let mut bars = RolloutBars::default();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let status = self.status()?;
            bars.update(&status);
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            let staged = nodes
                .iter()
                .filter(|n| n["staged_version"] == version)
                .count();
            if staged == self.states.len() {
                bars.finish();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{version} not staged on every node after 300 s: {status}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the nodes, then the applications they started.
    fn stop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        let tasks: Vec<_> = self.tasks.drain(..).collect();
        self.rt.block_on(async {
            for task in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
        });
        for (state, config) in self.states.iter().zip(&self.apps) {
            let app = lanup_node::app::App::new(config.clone(), state.join("app.log"));
            let _ = app.stop(Some(APP));
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    if args.size < 1024 * 1024 {
        bail!("--size must be at least 1MiB");
    }
    let waves = parse_waves(&args.waves).map_err(|e| anyhow::anyhow!("--waves: {e}"))?;
    let began = Instant::now();
    let (root, _tmp) = demo_root(args.dir.as_deref())?;
    let n = usize::from(args.nodes);
    let app = root.join("sample-app");
    let www = root.join("origin");
    std::fs::create_dir_all(&www)?;
    say(&format!("lanup demo in {}", root.display()));
    write_sample_app(&app, args.size)?;
    let publisher_path = root.join("publisher.key");
    let publisher = keys::generate(&publisher_path)?;
    let key = keys::load_secret(&publisher_path)?;
    let admin_path = root.join("admin.key");
    let admin = keys::generate(&admin_path)?;
    say(&format!("publisher key {publisher}, admin key {admin}"));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let origin = rt.block_on(Origin::bind(&www, "127.0.0.1:0", Some(args.rate)))?;
    let base = format!("http://{}/", origin.local_addr()?);
    let (stop_origin, origin_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(origin.serve(async {
        let _ = origin_stopped.await;
    }));
    say(&format!("origin at {base}, uplink capped at {}", args.rate));
    let mut site = Site::start(
        rt,
        &root,
        n,
        &base,
        &publisher.to_string(),
        &admin.to_string(),
    )?;
    say(&format!(
        "{n} nodes on loopback, each with {APP} to install in its own folder"
    ));

    let mut steps = Vec::new();
    for (version, edit) in [("1.0.0", false), ("2.0.0", true)] {
        if edit {
            edit_sample_app(&app, version)?;
            say("edited the sample app: three 64 KiB changes in lib/engine.bin, one file added");
        }
        let published = publish_version(&app, &www, &base, version, &key)?;
        steps.push(stage_everywhere(&site, &base, version, &published)?);
        let (waves, how) = if edit {
            (waves.clone(), format!("in waves {}", args.waves))
        } else {
            (
                parse_waves("100%").map_err(anyhow::Error::msg)?,
                "on every node at once".into(),
            )
        };
        roll_out(&site, &admin_path, version, waves, &how)?;
    }
    let stats = served_stats(&site, &base)?;
    let results = node_results(&site)?;
    let counted = origin_bytes_counted(&site)?;
    site.stop();
    let _ = stop_origin.send(());
    let _ = site.rt.block_on(server);
    report(
        &steps,
        n,
        &stats,
        counted,
        &results,
        began.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// What the nodes themselves counted as taken from the origin.
fn origin_bytes_counted(site: &Site) -> Result<u64> {
    Ok(site.status()?["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["origin_bytes"].as_u64())
        .sum())
}

/// The folder the demo works in: `dir` (empty or new), else a temporary
/// one, removed when the returned guard drops.
fn demo_root(dir: Option<&Path>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "--dir {}: not empty (the demo starts from nothing)",
                    d.display()
                );
            }
            std::fs::create_dir_all(d)?;
            Ok((d.to_owned(), None))
        }
        None => {
            let tmp = tempfile::tempdir()?;
            Ok((tmp.path().to_owned(), Some(tmp)))
        }
    }
}

/// Publishes the sample app as `version` into the origin's folder.
fn publish_version(
    app: &Path,
    www: &Path,
    base: &str,
    version: &str,
    key: &lanup_protocol::sign::SecretKey,
) -> Result<release::Published> {
    let published = release::publish(
        &PublishOptions {
            dir: app.to_owned(),
            out: www.to_owned(),
            version: version.parse()?,
            url: base.to_owned(),
            update_time: OffsetDateTime::now_utc(),
            expires: None,
            restart: Restart {
                allow: true,
                app_name: Some(APP.into()),
                exe: Some(format!("bin/{APP}")),
            },
            deltas: Default::default(),
            linux_only: false,
        },
        key,
    )?;
    say(&format!(
        "published {version}: {} files, {}, signed",
        published.manifest.files.len(),
        format_bytes(published.manifest.total_size())
    ));
    Ok(published)
}

/// Has the site check the origin and waits until every node staged
/// `version`: how long that took and what crossed the uplink.
fn stage_everywhere(
    site: &Site,
    base: &str,
    version: &str,
    published: &release::Published,
) -> Result<Step> {
    let n = site.states.len();
    let before = served(site, base)?;
    let started = Instant::now();
    for i in 0..n {
        // Only the site's fetcher polls; the others say so.
        site.node(i).ask(ControlRequest::Check)?;
    }
    site.wait_staged(version)?;
    let secs = started.elapsed().as_secs_f64();
    let uplink = served(site, base)? - before;
    say(&format!(
        "{version} staged and verified on all {n} nodes in {secs:.1} s; {} crossed the uplink",
        format_bytes(uplink)
    ));
    Ok(Step {
        release: version.into(),
        size: published.manifest.total_size(),
        uplink,
        secs,
    })
}

/// Rolls `version` out in `waves`, signed by the admin key, from the last
/// node's CLI, and follows it to its end.
fn roll_out(
    site: &Site,
    admin_path: &Path,
    version: &str,
    waves: Vec<lanup_protocol::rollout::WaveSize>,
    how: &str,
) -> Result<()> {
    let last = site.node(site.states.len() - 1);
    let sent = issue(
        &last,
        admin_path,
        Action::Rollout {
            version: version.into(),
        },
        waves,
        &crate::commands::ChangeArgs::default(),
    )?;
    say(&format!(
        "rollout of {version} {how}, signed by the admin key (id {})",
        sent.id
    ));
    let waited = follow(&last, std::time::Duration::from_secs(600), Some(&sent.id))?;
    if waited != Followed::Done {
        bail!("the rollout of {version} halted");
    }
    Ok(())
}

/// `GET /_lanup/stats` from the origin, over HTTP like any client.
fn served_stats(site: &Site, base: &str) -> Result<serde_json::Value> {
    let url = format!("{base}_lanup/stats");
    site.rt.block_on(async {
        let stats = reqwest::get(&url)
            .await
            .with_context(|| url.clone())?
            .error_for_status()?
            .bytes()
            .await?;
        Ok(serde_json::from_slice(&stats)?)
    })
}

fn served(site: &Site, base: &str) -> Result<u64> {
    served_stats(site, base)?["bytes_served"]
        .as_u64()
        .context("the origin's stats have no bytes_served")
}

/// Per node: its id, the installed version and how its last apply went.
struct NodeResult {
    peer: String,
    installed: String,
    downtime_ms: Option<u64>,
    pid: Option<u32>,
}

fn node_results(site: &Site) -> Result<Vec<NodeResult>> {
    let mut results = Vec::new();
    for (i, state) in site.states.iter().enumerate() {
        let status = site.node(i).ask(ControlRequest::Status)?;
        let own = status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["self"] == true).cloned())
            .unwrap_or_default();
        let config = &site.apps[i];
        let app = lanup_node::app::App::new(config.clone(), state.join("app.log"));
        let last = lanup_node::apply::Applier::new(state, config.clone()).last();
        results.push(NodeResult {
            peer: own["peer_id"].as_str().unwrap_or("?").to_owned(),
            installed: own["installed_version"].as_str().unwrap_or("-").to_owned(),
            downtime_ms: last.and_then(|o| o.downtime_ms),
            pid: app.processes(Some(APP)).first().map(|p| p.pid),
        });
    }
    Ok(results)
}

fn say(line: &str) {
    println!("• {line}");
    let _ = std::io::stdout().flush();
}

fn report(
    steps: &[Step],
    n: usize,
    stats: &serde_json::Value,
    counted: u64,
    results: &[NodeResult],
    secs: f64,
) {
    println!();
    println!("release   size        over the uplink   {n} separate downloads   saved   time");
    for s in steps {
        let separate = s.size * n as u64;
        println!(
            "{:<9} {:<11} {:<17} {:<22} {:>5.1}%  {:.1} s",
            s.release,
            format_bytes(s.size),
            format_bytes(s.uplink),
            format_bytes(separate),
            100.0 - s.uplink as f64 * 100.0 / separate as f64,
            s.secs
        );
    }
    let total: u64 = steps.iter().map(|s| s.uplink).sum();
    let served = stats["bytes_served"].as_u64().unwrap_or(0);
    println!(
        "uplink total: {total} bytes; the origin's /_lanup/stats says {served} bytes in {} requests{}",
        stats["requests"],
        if total == served { " (they agree)" } else { " (they DISAGREE)" }
    );
    println!(
        "the nodes counted {counted} bytes of chunks taken from the origin; the other {} bytes are manifests and signatures",
        served.saturating_sub(counted)
    );
    println!();
    println!("node       installed  app pid   downtime");
    for r in results {
        println!(
            "{:<10} {:<10} {:<9} {}",
            crate::commands::short_id(&r.peer),
            r.installed,
            r.pid.map_or("-".to_owned(), |p| p.to_string()),
            r.downtime_ms
                .map_or("-".to_owned(), |ms| format!("{ms} ms"))
        );
    }
    println!("demo finished in {secs:.1} s; the nodes and their applications are stopped");
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

/// The sample application: a program that runs until it is told to stop
/// (it records its version and pid in `var/`), and data files that make up
/// the release's size.
fn write_sample_app(app: &Path, size: u64) -> Result<()> {
    for dir in ["bin", "lib", "etc"] {
        std::fs::create_dir_all(app.join(dir))?;
    }
    let exe = app.join("bin").join(APP);
    std::fs::write(
        &exe,
        "#!/bin/sh\n\
         # lanup's demo application: runs until SIGTERM.\n\
         mkdir -p var\n\
         echo \"$(cat VERSION) $$\" > var/current\n\
         trap 'kill $s 2>/dev/null; exit 0' TERM INT\n\
         while :; do sleep 1 & s=$!; wait $s; done\n",
    )?;
    lanup_node::platform::set_path_mode(&exe, 0o755)?;
    std::fs::write(app.join("VERSION"), "1.0.0\n")?;
    fill(
        &mut std::io::BufWriter::new(std::fs::File::create(app.join("lib/engine.bin"))?),
        size * 3 / 4,
        1,
    )?;
    fill(
        &mut std::io::BufWriter::new(std::fs::File::create(app.join("lib/assets.pak"))?),
        size / 4,
        2,
    )?;
    std::fs::write(app.join("etc/demo.conf"), "listen = 0.0.0.0:9000\n")?;
    Ok(())
}

fn edit_sample_app(app: &Path, version: &str) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let engine = app.join("lib/engine.bin");
    let len = std::fs::metadata(&engine)?.len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&engine)?;
    for (i, at) in [len / 5, len / 2, len * 4 / 5].into_iter().enumerate() {
        f.seek(SeekFrom::Start(at))?;
        fill(&mut f, 64 * 1024, 100 + i as u64)?;
    }
    fill(
        &mut std::fs::File::create(app.join("lib/plugin.so"))?,
        256 * 1024,
        3,
    )?;
    std::fs::write(app.join("VERSION"), format!("{version}\n"))?;
    Ok(())
}
