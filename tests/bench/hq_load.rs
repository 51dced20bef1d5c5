//! Headquarters under a fleet's load: `lanup origin --reports DIR
//! --trust-admin KEY` as its own process, and 20,000 simulated sites, each
//! an enrolled node reporting for a site of several nodes, signed and
//! posted over HTTP as a real site posts them.
//!
//! Phases, one run:
//!   first     every site's first report, as fast as headquarters takes
//!             them (64 at a time): the sustained rate;
//!   day       23 more rounds of every site's unchanged hourly report (a
//!             day of them, compressed): the rate, and what a quiet day
//!             adds to the database;
//!   hourly    60 s at the rate 20,000 hourly reports give (5.6/s):
//!             latency at the real rate;
//!   rollout   2,000 sites report a rollout within one minute, four
//!             changed reports each (staged, applying, installed, done),
//!             paced over 60 s; then 2,000 at once;
//!   views     the fleet page (first page, a search, problems only) and
//!             fleet.json whole, with a fleet rollout over every site in
//!             the release folder: median of 5 each.
//! Then the database's size per site (and per site per day) and the
//! origin's peak RSS.
//!
//!   cargo run --release -p lanup-tests --example hq_load -- LANUP [SITES] [NODES] [ROUNDS]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lanup_protocol::fleet::{FleetFile, FleetState, FLEET_FILE};
use lanup_protocol::membership::Certificate;
use lanup_protocol::report::{self, NodeState, Report, RolloutState};
use lanup_protocol::sign::SecretKey;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A simulated site: its reporting node's key and certificate, and the
/// other nodes' ids.
struct Site {
    name: String,
    key: SecretKey,
    cert: Certificate,
    others: Vec<String>,
}

impl Site {
    fn body(&self, installed: &str, state: &str, rollout: Option<&str>) -> Vec<u8> {
        let node = |id: &str| NodeState {
            id: id.to_owned(),
            lanup: Some("0.1.0".into()),
            installed: Some(installed.into()),
            staged: (state == "staged").then(|| "2.0.0".into()),
            state: state.into(),
            error: None,
            failed: None,
        };
        let me = self.key.public().peer_id();
        let r = Report {
            site: self.name.clone(),
            sender: me.clone(),
            sent_at_ms: now_ms(),
            nodes: std::iter::once(me.as_str())
                .chain(self.others.iter().map(String::as_str))
                .map(node)
                .collect(),
            rollout: rollout.map(|stage| RolloutState {
                id: "0".repeat(32),
                action: "rollout".into(),
                version: "2.0.0".into(),
                stage: stage.into(),
                reason: None,
            }),
        };
        let mut signed = report::sign(&r, &self.key);
        signed.membership = Some(self.cert.clone());
        serde_json::to_vec(&signed).unwrap_or_default()
    }
}

/// Latencies of one phase.
struct Phase {
    name: &'static str,
    took: Duration,
    latencies: Vec<Duration>,
    failed: usize,
}

impl Phase {
    fn print(&mut self) {
        self.latencies.sort();
        let at = |q: f64| {
            self.latencies
                .get(((self.latencies.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{:<26} {:>7} reports in {:>7.1} s = {:>7.1}/s   p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.1} ms   refused {}",
            self.name,
            self.latencies.len(),
            self.took.as_secs_f64(),
            self.latencies.len() as f64 / self.took.as_secs_f64(),
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            at(1.0).as_secs_f64() * 1e3,
            self.failed
        );
    }
}

/// A report's body, made when its turn comes, and when it is due.
type Job = (Duration, Box<dyn FnOnce() -> Vec<u8> + Send>);

/// Posts `bodies` (made when their turn comes) `parallel` at a time, each
/// no earlier than its start time when paced.
async fn post_all(
    name: &'static str,
    client: &reqwest::Client,
    url: &str,
    jobs: Vec<Job>,
    parallel: usize,
) -> Phase {
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for (at, make) in jobs {
        let wait = (started + at).saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let permit = limit.clone().acquire_owned().await;
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move {
            let _permit = permit;
            let body = make();
            let sent = Instant::now();
            let ok = client
                .post(&url)
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (sent.elapsed(), ok)
        });
    }
    let mut phase = Phase {
        name,
        took: Duration::ZERO,
        latencies: Vec::new(),
        failed: 0,
    };
    while let Some(done) = tasks.join_next().await {
        if let Ok((latency, ok)) = done {
            phase.latencies.push(latency);
            phase.failed += usize::from(!ok);
        }
    }
    phase.took = started.elapsed();
    phase.print();
    phase
}

fn db_bytes(dir: &Path) -> u64 {
    ["hq.sqlite", "hq.sqlite-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn say_rss(pid: u32, after: &str) {
    println!(
        "    headquarters' RSS after {after}: {:.1} MiB (peak {:.1} MiB)",
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
}

async fn time_get(client: &reqwest::Client, url: &str) -> (Duration, usize) {
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let body = match client.get(url).send().await {
            Ok(r) => r.bytes().await.map(|b| b.len()).unwrap_or(0),
            Err(_) => 0,
        };
        times.push(started.elapsed());
        size = body;
    }
    times.sort();
    (times[2], size)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lanup = args.first().map_or("target/release/lanup", String::as_str);
    let sites_n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let nodes_n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(24);
    let tmp = tempfile::tempdir()?;
    let (www, reports) = (tmp.path().join("www"), tmp.path().join("reports"));
    std::fs::create_dir_all(&www)?;
    let admin = SecretKey::generate();

    print!("making {sites_n} sites of {nodes_n} nodes, each reporter enrolled … ");
    let made = Instant::now();
    let now_s = now_ms() / 1000;
    let sites: Arc<Vec<Site>> = Arc::new(
        (0..sites_n)
            .map(|i| {
                let key = SecretKey::generate();
                let name = format!("site-{i:05}");
                Site {
                    cert: Certificate::issue(&admin, &name, &key.public(), now_s, 365 * 86_400),
                    name,
                    key,
                    others: (1..nodes_n)
                        .map(|_| SecretKey::generate().public().peer_id())
                        .collect(),
                }
            })
            .collect(),
    );
    println!("{:.1} s", made.elapsed().as_secs_f64());

    let mut origin = Command::new(lanup)
        .args(["origin", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&www)
        .arg("--reports")
        .arg(&reports)
        .args(["--trust-admin", &admin.public().to_string()])
        .env("LANUP_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = origin.id();
    let mut line = String::new();
    std::io::BufReader::new(
        origin
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?,
    )
    .read_line(&mut line)?;
    let base = line
        .split("at ")
        .nth(1)
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("origin said {line:?}"))?
        .to_owned();
    let url = format!("{base}_lanup/report");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    println!("headquarters at {base} (pid {pid})\n");

    let round = || {
        let sites = sites.clone();
        (0..sites_n)
            .map(move |i| {
                let sites = sites.clone();
                let make: Box<dyn FnOnce() -> Vec<u8> + Send> =
                    Box::new(move || sites[i].body("1.0.0", "installed", None));
                (Duration::ZERO, make)
            })
            .collect::<Vec<_>>()
    };
    post_all("first reports", &client, &url, round(), 64).await;
    say_rss(pid, "the first reports");
    let after_first = db_bytes(&reports);
    let mut day = Phase {
        name: "a day of hourly rounds",
        took: Duration::ZERO,
        latencies: Vec::new(),
        failed: 0,
    };
    for _ in 1..rounds {
        let mut p = post_all("  one hourly round", &client, &url, round(), 64).await;
        day.took += p.took;
        day.latencies.append(&mut p.latencies);
        day.failed += p.failed;
    }
    day.print();
    say_rss(pid, "a day of rounds");
    let after_day = db_bytes(&reports);

    // At the real hourly rate for a minute.
    let every = Duration::from_secs(3600).as_secs_f64() / sites_n as f64;
    let paced: Vec<_> = (0..(60.0 / every) as usize)
        .map(|k| {
            let sites = sites.clone();
            let make: Box<dyn FnOnce() -> Vec<u8> + Send> =
                Box::new(move || sites[k % sites_n].body("1.0.0", "installed", None));
            (Duration::from_secs_f64(k as f64 * every), make)
        })
        .collect();
    post_all("hourly rate, 60 s", &client, &url, paced, 64).await;

    // 2,000 sites report a rollout, four changes each, within a minute.
    let burst_n = 2_000.min(sites_n);
    let steps = [
        ("2.0.0", "staged", "1.0.0", Some("wave 1 of 2")),
        ("2.0.0", "applying", "1.0.0", Some("wave 1 of 2")),
        ("2.0.0", "installed", "2.0.0", Some("wave 2 of 2")),
        ("2.0.0", "installed", "2.0.0", Some("done")),
    ];
    let rollout: Vec<_> = (0..burst_n * steps.len())
        .map(|k| {
            let (site, step) = (k % burst_n, k / burst_n);
            let (_, state, installed, stage) = steps[step];
            let sites = sites.clone();
            let make: Box<dyn FnOnce() -> Vec<u8> + Send> =
                Box::new(move || sites[site].body(installed, state, stage));
            let at = Duration::from_secs_f64(60.0 * k as f64 / (burst_n * steps.len()) as f64);
            (at, make)
        })
        .collect();
    post_all("rollout, 2,000 sites, 60 s", &client, &url, rollout, 64).await;
    let at_once: Vec<_> = (burst_n..2 * burst_n)
        .map(|k| {
            let sites = sites.clone();
            let make: Box<dyn FnOnce() -> Vec<u8> + Send> =
                Box::new(move || sites[k % sites_n].body("2.0.0", "installed", Some("done")));
            (Duration::ZERO, make)
        })
        .collect();
    post_all("2,000 sites at once", &client, &url, at_once, 256).await;
    say_rss(pid, "the rollout");
    let after_rollout = db_bytes(&reports);

    // A fleet rollout over every site, as the page shows it.
    let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    let cut = names.len() / 10;
    let file = FleetFile {
        id: "0".repeat(32),
        version: "2.0.0".into(),
        key: admin.public().to_string(),
        started_ms: now_ms(),
        updated_ms: now_ms(),
        waves: vec![names[..cut].to_vec(), names[cut..].to_vec()],
        open: 1,
        state: FleetState::Running,
        commands: Default::default(),
        plan: None,
        approvals_needed: 1,
        valid_for_ms: None,
    };
    std::fs::write(www.join(FLEET_FILE), serde_json::to_vec(&file)?)?;
    println!();
    for (what, path) in [
        ("fleet page, first page", "_lanup/fleet"),
        ("fleet page, a search", "_lanup/fleet?q=site-1234"),
        ("fleet page, problems only", "_lanup/fleet?problems=1"),
        ("fleet.json, every site", "_lanup/fleet.json"),
        ("fleet.json, one page", "_lanup/fleet.json?page=7"),
    ] {
        let (median, size) = time_get(&client, &format!("{base}{path}")).await;
        println!(
            "{what:<28} median {:>7.1} ms  {:>10} bytes",
            median.as_secs_f64() * 1e3,
            size
        );
        say_rss(pid, what);
    }
    // The page as an operator's browser renders it (Debian's chromium),
    // beside the browser's own start on a blank page.
    for query in ["about:blank", "", "?q=site-1234", "?page=150"] {
        let started = Instant::now();
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-gpu",
                "--dump-dom",
            ])
            .arg(if query == "about:blank" {
                query.to_owned()
            } else {
                format!("{base}_lanup/fleet{query}")
            })
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let dom = String::from_utf8_lossy(&out.stdout);
                println!(
                    "{:<28} {:>7.0} ms in headless Chromium, {} site rows",
                    if query == "about:blank" {
                        "a blank page".to_owned()
                    } else {
                        format!("fleet page{query}")
                    },
                    started.elapsed().as_secs_f64() * 1e3,
                    dom.matches("<tr class=").count()
                );
            }
            _ => println!("(no chromium here: the page was not rendered in a browser)"),
        }
    }
    std::fs::remove_file(www.join(FLEET_FILE))?;
    let (median, size) = time_get(&client, &format!("{base}_lanup/fleet")).await;
    println!(
        "{:<28} median {:>7.1} ms  {:>10} bytes",
        "fleet page, no rollout",
        median.as_secs_f64() * 1e3,
        size
    );

    println!();
    let per_site = |b: u64| b as f64 / sites_n as f64;
    println!(
        "database after first reports: {:.1} MB, {:.0} B a site",
        after_first as f64 / 1e6,
        per_site(after_first)
    );
    println!(
        "a quiet day (23 more hourly rounds) added {:.1} MB, {:.0} B a site",
        after_day.saturating_sub(after_first) as f64 / 1e6,
        per_site(after_day.saturating_sub(after_first))
    );
    println!(
        "a day with a rollout at {burst_n} sites added {:.1} MB: {:.0} B a rolling site",
        after_rollout.saturating_sub(after_day) as f64 / 1e6,
        after_rollout.saturating_sub(after_day) as f64 / burst_n as f64
    );
    println!(
        "headquarters' RSS: now {:.1} MiB, peak {:.1} MiB",
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    let _ = origin.kill();
    let _ = origin.wait();
    Ok(())
}
