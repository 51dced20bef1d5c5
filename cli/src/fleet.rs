//! `lanup fleet`: headquarters' view of every site in the terminal, from
//! `lanup origin --reports`' URL or straight from its reports folder.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use lanup_node::node::now_unix_ms as now_ms;
use lanup_protocol::fleet::{
    assign_site_waves, next_step, parse_site_waves, wave_progress, FleetFile, FleetState,
    FleetStep, FLEET_FILE,
};
use lanup_protocol::report::SiteView;
use lanup_protocol::rollout::{sign, Action, Command, SignedCommand, WaveSize};
use lanup_protocol::sign::SecretKey;

/// Arguments of `lanup fleet`.
#[derive(Debug, clap::Args)]
pub(crate) struct FleetArgs {
    /// Headquarters' origin URL (it serves /_lanup/fleet.json), or its
    /// reports folder.
    #[arg(long, value_name = "URL|DIR")]
    reports: String,
    /// Print the view as JSON.
    #[arg(long)]
    json: bool,
    /// With a folder: a site whose newest report is older than this is
    /// flagged stale (a URL uses the origin's own setting).
    #[arg(long, value_name = "DURATION", default_value = "2h10m", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// Show this site alone; with --history, its timeline.
    #[arg(long, value_name = "NAME")]
    site: Option<String>,
    /// With --site: the site's timeline, newest first (what changed at
    /// each report: versions, failures, rollouts, nodes, senders), and its
    /// enrolled members.
    #[arg(long, requires = "site")]
    history: bool,
    /// With --history: at most this many entries.
    #[arg(long, value_name = "N", default_value_t = 50)]
    limit: usize,
}

/// The fleet view as JSON, from a URL or a folder.
pub(crate) fn fetch_view(reports: &str, stale_after: Duration) -> Result<serde_json::Value> {
    if reports.starts_with("http://") || reports.starts_with("https://") {
        let url = format!(
            "{}/{}",
            reports.trim_end_matches('/'),
            lanup_protocol::report::FLEET_JSON_PATH.trim_start_matches('/')
        );
        return get_json(&url, "a fleet view");
    }
    let store = lanup_hq::Store::open_read_only(Path::new(reports))?;
    let json = lanup_hq::fleet_json(
        &store,
        now_ms(),
        stale_after.as_millis() as u64,
        &lanup_hq::Filter::default(),
        None,
    )?;
    Ok(serde_json::from_str(&json)?)
}

fn get_json(url: &str, what: &str) -> Result<serde_json::Value> {
    let resp = lanup_node::http::blocking_builder()?
        .timeout(Duration::from_secs(60))
        .build()?
        .get(url)
        .send()
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {}", text.trim());
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: not {what}"))
}

/// A site's timeline and members as JSON, from a URL or a folder.
fn fetch_history(reports: &str, site: &str, limit: usize) -> Result<serde_json::Value> {
    if reports.starts_with("http://") || reports.starts_with("https://") {
        let url = format!(
            "{}/{}?site={}&limit={limit}",
            reports.trim_end_matches('/'),
            lanup_protocol::report::HISTORY_JSON_PATH.trim_start_matches('/'),
            site
        );
        return get_json(&url, "a site's timeline");
    }
    let store = lanup_hq::Store::open_read_only(Path::new(reports))?;
    let events = store.history(site, limit)?;
    if events.is_empty() {
        anyhow::bail!("no timeline for site {site:?}: it has not reported within the history kept");
    }
    Ok(serde_json::json!({
        "site": site,
        "events": events,
        "members": store.members(site)?,
    }))
}

pub(crate) fn run(args: FleetArgs) -> Result<ExitCode> {
    if let Some(site) = args.site.as_deref().filter(|_| args.history) {
        if !lanup_protocol::report::valid_site(site) {
            anyhow::bail!("--site {site:?}: not a site name");
        }
        let history = fetch_history(&args.reports, site, args.limit)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&history)?);
        } else {
            print!("{}", timeline(&history)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut view = fetch_view(&args.reports, args.stale_after)?;
    if let Some(site) = &args.site {
        let one: Vec<serde_json::Value> = view["sites"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["site"].as_str() == Some(site))
            .cloned()
            .collect();
        if one.is_empty() {
            anyhow::bail!("site {site:?}: headquarters has no report from it");
        }
        view["sites"] = serde_json::Value::Array(one);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    let sites: Vec<SiteView> =
        serde_json::from_value(view["sites"].clone()).context("the fleet view's sites")?;
    let r = &view["rollout"];
    if let Some(id) = r["id"].as_str() {
        let signed = r["approvals"]["signed_by"].as_array().map_or(0, Vec::len);
        let needed = r["approvals"]["needed"].as_u64().unwrap_or(1) as usize;
        let state = match r["state"].as_str() {
            Some("running") if signed < needed && r["approvals"].is_object() => {
                format!("waiting for approval, {signed} of {needed} admins have signed")
            }
            Some(state) => state.to_owned(),
            None => "?".into(),
        };
        println!(
            "fleet rollout {id} of {}: {state}",
            r["version"].as_str().unwrap_or("?")
        );
    }
    print!("{}", table(&sites));
    Ok(ExitCode::SUCCESS)
}

/// A site's timeline: one line per entry, newest first, then its members.
fn timeline(history: &serde_json::Value) -> Result<String> {
    let events: Vec<lanup_hq::Event> =
        serde_json::from_value(history["events"].clone()).context("the site's timeline")?;
    let members: Vec<lanup_hq::Member> =
        serde_json::from_value(history["members"].clone()).unwrap_or_default();
    let mut out = format!(
        "{:<20}  {:<10} {:>5}  {:<24} {:<22} {}\n",
        "RECEIVED (UTC)", "SENDER", "NODES", "INSTALLED", "ROLLOUT", "CHANGED"
    );
    for e in &events {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(e.received_ms);
        let at = humantime::format_rfc3339_seconds(at).to_string();
        let v = &e.view;
        let versions = v
            .versions
            .iter()
            .map(|(v, n)| format!("{v}×{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let rollout = v
            .rollout
            .as_ref()
            .map(|r| format!("{} {} {}", r.action, r.version, r.stage))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20}  {:<10} {:>5}  {:<24} {:<22} {}\n",
            at.trim_end_matches('Z').replace('T', " "),
            lanup_protocol::short_peer(&e.sender),
            v.nodes,
            versions,
            rollout,
            e.changes.join(", ")
        ));
        for f in &v.failed {
            out.push_str(&format!(
                "    failed: {}{}: {}\n",
                lanup_protocol::short_peer(&f.node),
                f.version
                    .as_ref()
                    .map(|v| format!(" ({v})"))
                    .unwrap_or_default(),
                f.error
            ));
        }
    }
    out.push_str(&format!(
        "{} entries shown for site {}\n",
        events.len(),
        history["site"].as_str().unwrap_or("?")
    ));
    if !members.is_empty() {
        let now = now_ms() / 1000;
        let soonest = members.iter().map(|m| m.expires_s).min().unwrap_or(0);
        out.push_str(&format!(
            "{} enrolled member(s) heard from; the first certificate to expire does so in {} days\n",
            members.len(),
            soonest.saturating_sub(now) / 86_400
        ));
    }
    Ok(out)
}

/// One line per site, then one per failed node.
fn table(sites: &[SiteView]) -> String {
    let mut out = format!(
        "{:<20} {:>5}  {:<28} {:<22} {}\n",
        "SITE", "NODES", "INSTALLED", "ROLLOUT", "LAST REPORT"
    );
    for s in sites {
        let versions = s
            .versions
            .iter()
            .map(|(v, n)| format!("{v}×{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let rollout = s
            .rollout
            .as_ref()
            .map(|r| format!("{} {}", r.version, r.stage))
            .unwrap_or_else(|| "-".into());
        let mut last = format!("{} s ago", s.last_report_s);
        if s.stale {
            last.push_str("  STALE");
        }
        if !s.new_nodes.is_empty() {
            last.push_str(&format!("  {} new node(s)", s.new_nodes.len()));
        }
        if !s.missing.is_empty() {
            last.push_str(&format!(
                "  {} node(s) missing from its report: {}",
                s.missing.len(),
                s.missing
                    .iter()
                    .map(|id| lanup_protocol::short_peer(id))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if s.unlisted_sender {
            last.push_str(&format!(
                "  reported by {}, a node the site never listed",
                s.sender
            ));
        }
        out.push_str(&format!(
            "{:<20} {:>5}  {:<28} {:<22} {last}\n",
            s.site, s.nodes, versions, rollout
        ));
        for f in &s.failed {
            out.push_str(&format!(
                "    failed: {}{}: {}\n",
                f.node,
                f.version
                    .as_ref()
                    .map(|v| format!(" ({v})"))
                    .unwrap_or_default(),
                f.error
            ));
        }
    }
    let stale = sites.iter().filter(|s| s.stale).count();
    let failed = sites.iter().filter(|s| !s.failed.is_empty()).count();
    out.push_str(&format!(
        "{} sites, {failed} with failed nodes, {stale} stale\n",
        sites.len()
    ));
    out
}

/// `lanup rollout VERSION --fleet …` at headquarters.
pub(crate) struct FleetRollout<'a> {
    pub(crate) version: Option<&'a str>,
    pub(crate) key: &'a Path,
    pub(crate) publish_dir: &'a Path,
    pub(crate) reports: &'a str,
    pub(crate) sites: Option<&'a str>,
    pub(crate) node_waves: Vec<WaveSize>,
    pub(crate) abort: bool,
    pub(crate) wait: bool,
    pub(crate) timeout: Duration,
    pub(crate) approvals: usize,
    pub(crate) reason: Option<String>,
    /// How long each site's command stays valid for a site that was away.
    pub(crate) valid: Duration,
}

/// How often a waiting fleet rollout reads the reports again.
const FLEET_LOOK: Duration = Duration::from_secs(2);

/// One site's part: an ordinary rollout command for `site`, naming the
/// fleet rollout, signed here.
fn site_command(
    key: &SecretKey,
    site: &str,
    action: Action,
    node_waves: &[WaveSize],
    nodes: Vec<String>,
    file: &FleetFile,
) -> SignedCommand {
    let abort = action == Action::Abort;
    let fleet = &file.id;
    let mut signed = sign(
        &Command {
            site: site.to_owned(),
            action,
            issued_at_ms: now_ms(),
            id: crate::rollout::new_id(),
            waves: if abort {
                Vec::new()
            } else {
                node_waves.to_vec()
            },
            nodes: if abort { Vec::new() } else { nodes },
            fleet: Some(fleet.to_owned()),
            valid_for_ms: Some(
                file.valid_for_ms
                    .unwrap_or(lanup_protocol::rollout::FLEET_VALID_MS),
            ),
            reason: None,
            now: false,
            groups: Default::default(),
        },
        key,
    );
    // The plan the admins approved goes with every site's part of it.
    if !abort {
        signed.plan = file.plan.clone().map(Box::new);
    }
    signed
}

fn read_file(path: &Path) -> Result<Option<FleetFile>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("fleet rollout file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Replaces the file at once (the origin serves it to sites as they poll).
fn write_file(path: &Path, file: &FleetFile) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    serde_json::to_writer_pretty(&mut tmp, file)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn site_views(reports: &str) -> Result<Vec<SiteView>> {
    let view = fetch_view(
        reports,
        Duration::from_millis(lanup_protocol::report::STALE_AFTER_MS),
    )?;
    serde_json::from_value(view["sites"].clone()).context("the fleet view's sites")
}

/// Starts, goes on with, or aborts the fleet rollout in `--publish-dir`.
/// Each run opens every wave whose turn has come; with `--wait` it follows
/// until the rollout is done (exit 0), halts (exit 1) or `--timeout`
/// passes (exit 2; the rollout stays as it is, and a later run goes on).
pub(crate) fn rollout(r: FleetRollout<'_>) -> Result<ExitCode> {
    let key = lanup_node::keys::load_secret(r.key)?;
    let path = r.publish_dir.join(FLEET_FILE);
    let existing = read_file(&path)?;
    if r.abort {
        return abort(&key, &path, existing, r.publish_dir);
    }
    let version = r.version.context("a release to roll out is needed")?;
    let mut file = match existing {
        Some(f) if f.state == FleetState::Running && f.version == version => {
            println!("going on with fleet rollout {} of {version}", f.id);
            f
        }
        Some(f) if f.state == FleetState::Running => anyhow::bail!(
            "fleet rollout {} of {} is running; abort it first (--abort)",
            f.id,
            f.version
        ),
        _ => new_rollout(&key, version, &r)?,
    };
    let deadline = std::time::Instant::now() + r.timeout;
    if let Some(exit) = wait_for_approval(&mut file, &r, &path, deadline)? {
        return Ok(exit);
    }
    let bars = Bars::new(r.wait, &file);
    loop {
        let views = site_views(r.reports)?;
        bars.show(&file, &views);
        match next_step(&file, &views) {
            FleetStep::Open(n) => {
                open_wave(&mut file, n, &views, &key, &r)?;
                bars.say(&format!(
                    "wave {} of {} open: {}",
                    n + 1,
                    file.waves.len(),
                    file.waves[n].join(", ")
                ));
            }
            FleetStep::Wait(n) => {
                if !r.wait {
                    println!(
                        "wave {} of {} under way; run this again (or with --wait) to go on once its sites report {version} installed",
                        n + 1,
                        file.waves.len()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                if std::time::Instant::now() > deadline {
                    bars.say(&format!(
                        "gave up waiting after {}; the fleet rollout stays at wave {} (run again to go on)",
                        humantime::format_duration(r.timeout),
                        n + 1
                    ));
                    return Ok(ExitCode::from(2));
                }
                std::thread::sleep(FLEET_LOOK);
            }
            FleetStep::Halt { site, reason } => {
                let halted = FleetState::Halted {
                    site: site.clone(),
                    reason: reason.clone(),
                };
                end(&path, &mut file, halted)?;
                bars.finish();
                eprintln!("fleet rollout of {version} halted by site {site}: {reason}; no further site begins");
                return Ok(ExitCode::from(1));
            }
            FleetStep::Done => {
                end(&path, &mut file, FleetState::Done)?;
                bars.finish();
                println!(
                    "fleet rollout of {version} done: every site of {} waves runs it",
                    file.waves.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// Writes the fleet rollout's end to its file.
fn end(path: &Path, file: &mut FleetFile, state: FleetState) -> Result<()> {
    file.state = state;
    file.updated_ms = now_ms();
    write_file(path, file)
}

/// Aborts the running fleet rollout: no further site begins, and those
/// begun are told to stop.
fn abort(
    key: &SecretKey,
    path: &Path,
    existing: Option<FleetFile>,
    publish_dir: &Path,
) -> Result<ExitCode> {
    let Some(mut file) = existing.filter(|f| f.state == FleetState::Running) else {
        anyhow::bail!("no fleet rollout is running in {}", publish_dir.display());
    };
    let opened: Vec<String> = file
        .waves
        .iter()
        .take(file.open)
        .flatten()
        .cloned()
        .collect();
    for site in &opened {
        let abort = site_command(key, site, Action::Abort, &[], Vec::new(), &file);
        file.commands.insert(site.clone(), abort);
    }
    file.state = FleetState::Aborted {
        by: key.public().to_string(),
    };
    file.updated_ms = now_ms();
    write_file(path, &file)?;
    println!(
        "fleet rollout {} of {} aborted: no further site begins; the {} sites begun are told to stop",
        file.id,
        file.version,
        opened.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Waits until enough admins signed the plan (no site begins before):
/// an exit code when this run ends here (not waiting, or out of time).
fn wait_for_approval(
    file: &mut FleetFile,
    r: &FleetRollout<'_>,
    path: &Path,
    deadline: std::time::Instant,
) -> Result<Option<ExitCode>> {
    let mut said = 0;
    while let Some(plan) = file.plan.as_ref() {
        let have = lanup_protocol::fleet::plan_signers(plan).len();
        if have >= file.approvals_needed {
            break;
        }
        if have != said {
            println!(
                "fleet rollout {} of {}: waiting for approval, {have} of {} admins have signed; another admin approves it with: lanup approve {} --fleet --publish-dir {} --key FILE",
                file.id,
                file.version,
                file.approvals_needed,
                file.id,
                r.publish_dir.display()
            );
            said = have;
        }
        if !r.wait {
            return Ok(Some(ExitCode::SUCCESS));
        }
        if std::time::Instant::now() > deadline {
            return Ok(Some(ExitCode::from(2)));
        }
        std::thread::sleep(FLEET_LOOK);
        // Approvals are written to the file by `lanup approve --fleet`.
        match read_file(path)? {
            Some(f) if f.id == file.id && f.state == FleetState::Running => *file = f,
            _ => anyhow::bail!(
                "fleet rollout {} was ended while it waited for approval",
                file.id
            ),
        }
    }
    Ok(None)
}

/// Opens wave `n`: each of its sites gets its rollout command, signed
/// here, in the fleet file.
fn open_wave(
    file: &mut FleetFile,
    n: usize,
    views: &[SiteView],
    key: &SecretKey,
    r: &FleetRollout<'_>,
) -> Result<()> {
    for site in &file.waves[n] {
        let nodes = views
            .iter()
            .find(|v| &v.site == site)
            .map(|v| v.node_ids.clone())
            .unwrap_or_default();
        let action = Action::Rollout {
            version: file.version.clone(),
        };
        let signed = site_command(key, site, action, &r.node_waves, nodes, file);
        file.commands.insert(site.clone(), signed);
    }
    file.open = n + 1;
    file.updated_ms = now_ms();
    write_file(&r.publish_dir.join(FLEET_FILE), file)
}

fn new_rollout(key: &SecretKey, version: &str, r: &FleetRollout<'_>) -> Result<FleetFile> {
    let manifest = r.publish_dir.join(lanup_protocol::manifest::MANIFEST_FILE);
    let offered = std::fs::read(&manifest)
        .with_context(|| format!("--publish-dir: cannot read {}", manifest.display()))
        .and_then(|b| lanup_protocol::Manifest::parse(&b).map_err(Into::into))
        .with_context(|| format!("--publish-dir: {}", manifest.display()))?
        .release_name();
    if offered != version {
        anyhow::bail!(
            "--publish-dir {} offers {offered}, not {version}: publish {version} there first",
            r.publish_dir.display()
        );
    }
    let views = site_views(r.reports)?;
    let names: Vec<String> = views.iter().map(|v| v.site.clone()).collect();
    if names.is_empty() {
        anyhow::bail!(
            "--reports {}: no site has reported yet; a fleet rollout goes to the sites that report",
            r.reports
        );
    }
    let sites = r.sites.unwrap_or("100%");
    let id = crate::rollout::new_id();
    let waves = parse_site_waves(sites)
        .and_then(|w| assign_site_waves(&id, &names, &w))
        .map_err(|e| anyhow::anyhow!("--sites: {e}"))?;
    println!(
        "fleet rollout {id} of {version} over {} sites in {} waves (signed by {})",
        names.len(),
        waves.len(),
        key.public()
    );
    for (i, w) in waves.iter().enumerate() {
        println!("  {}: {}", i + 1, w.join(" "));
    }
    let approvals_needed = r.approvals.max(1);
    let plan = (approvals_needed > 1).then(|| {
        let plan = lanup_protocol::fleet::FleetPlan {
            fleet: id.clone(),
            version: version.to_owned(),
            sites: lanup_protocol::fleet::FleetPlan::hash_sites(&waves),
            node_waves: r.node_waves.clone(),
            reason: r.reason.clone(),
            issued_at_ms: now_ms(),
        };
        let text = serde_json::to_string(&plan).unwrap_or_default();
        SignedCommand {
            signature: key.sign(text.as_bytes()).to_hex(),
            key: key.public().to_string(),
            command: text,
            approvals: Vec::new(),
            plan: None,
        }
    });
    let file = FleetFile {
        id,
        version: version.to_owned(),
        key: key.public().to_string(),
        started_ms: now_ms(),
        updated_ms: now_ms(),
        waves,
        open: 0,
        state: FleetState::Running,
        commands: Default::default(),
        plan,
        approvals_needed,
        valid_for_ms: Some(r.valid.as_millis() as u64),
    };
    // A request is written at once, so other admins can approve it.
    if file.plan.is_some() {
        write_file(&r.publish_dir.join(FLEET_FILE), &file)?;
    }
    Ok(file)
}

/// One bar per site wave while following; plain lines otherwise.
struct Bars {
    multi: Option<indicatif::MultiProgress>,
    bars: Vec<indicatif::ProgressBar>,
}

impl Bars {
    fn new(wait: bool, file: &FleetFile) -> Bars {
        if !wait {
            return Bars {
                multi: None,
                bars: Vec::new(),
            };
        }
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} sites {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = file
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let bar = multi.add(indicatif::ProgressBar::new(w.len() as u64));
                bar.set_style(style.clone());
                bar.set_prefix(format!("wave {}", i + 1));
                bar
            })
            .collect();
        Bars {
            multi: Some(multi),
            bars,
        }
    }

    fn show(&self, file: &FleetFile, views: &[SiteView]) {
        for (i, (done, _)) in wave_progress(file, views).into_iter().enumerate() {
            if let Some(bar) = self.bars.get(i) {
                bar.set_position(done as u64);
                bar.set_message(if i < file.open { "" } else { "(waiting)" });
            }
        }
    }

    fn say(&self, line: &str) {
        match &self.multi {
            Some(m) if !m.is_hidden() => {
                let _ = m.println(line);
            }
            _ => println!("{line}"),
        }
    }

    fn finish(&self) {
        for bar in &self.bars {
            bar.abandon();
        }
    }
}

/// `lanup approve ID --fleet --publish-dir DIR --key FILE`: signs the plan
/// of the fleet rollout waiting there.
pub(crate) fn approve(id: &str, publish_dir: &Path, key: &Path) -> Result<ExitCode> {
    let key = lanup_node::keys::load_secret(key)?;
    let path = publish_dir.join(FLEET_FILE);
    let Some(mut file) = read_file(&path)? else {
        anyhow::bail!("no fleet rollout in {}", publish_dir.display());
    };
    if file.id != id {
        anyhow::bail!(
            "{} holds fleet rollout {}, not {id}",
            path.display(),
            file.id
        );
    }
    if file.state != FleetState::Running {
        anyhow::bail!("fleet rollout {id} is no longer running ({:?})", file.state);
    }
    let Some(plan) = file.plan.as_mut() else {
        anyhow::bail!("fleet rollout {id} needs no approval");
    };
    let before = lanup_protocol::fleet::plan_signers(plan);
    if before.contains(&key.public()) {
        anyhow::bail!("{} approved already (a key counts once)", key.public());
    }
    plan.approvals
        .push(lanup_protocol::approval::approve(plan, &key));
    let have = lanup_protocol::fleet::plan_signers(plan).len();
    let needed = file.approvals_needed;
    println!(
        "approved fleet rollout {id} of {} by {}: {have} of {needed}{}",
        file.version,
        key.public(),
        if have >= needed {
            "; its sites begin when headquarters next goes on (lanup rollout --fleet)"
        } else {
            ""
        }
    );
    file.updated_ms = now_ms();
    write_file(&path, &file)?;
    Ok(ExitCode::SUCCESS)
}
