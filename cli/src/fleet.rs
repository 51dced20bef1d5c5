//! `lanup fleet`: headquarters' view of every site in the terminal, from
//! `lanup origin --reports`' URL or straight from its reports folder.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use lanup_protocol::report::SiteView;

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
}

/// The fleet view as JSON, from a URL or a folder.
pub(crate) fn fetch_view(reports: &str, stale_after: Duration) -> Result<serde_json::Value> {
    if reports.starts_with("http://") || reports.starts_with("https://") {
        let url = format!(
            "{}/{}",
            reports.trim_end_matches('/'),
            lanup_node::hq::FLEET_JSON_PATH.trim_start_matches('/')
        );
        let resp = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?
            .get(&url)
            .send()
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().with_context(|| format!("reading {url}"))?;
        if !status.is_success() {
            anyhow::bail!("{url} answered {status}: {}", text.trim());
        }
        return serde_json::from_str(&text).with_context(|| format!("{url}: not a fleet view"));
    }
    let fleet = lanup_node::hq::load(Path::new(reports))?;
    let sites = fleet.view(lanup_node::hq::now_ms(), stale_after.as_millis() as u64);
    Ok(lanup_node::hq::fleet_json(&sites))
}

pub(crate) fn run(args: FleetArgs) -> Result<ExitCode> {
    let view = fetch_view(&args.reports, args.stale_after)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    let sites: Vec<SiteView> =
        serde_json::from_value(view["sites"].clone()).context("the fleet view's sites")?;
    print!("{}", table(&sites));
    Ok(ExitCode::SUCCESS)
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
