//! `lanup-sim`: what lanup does at fleet scale, in simulated time, with the
//! node's own scheduler and election (see the library's docs for the model).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use lanup_simulations::fleet::{simulate_fleet_rollout, FleetRolloutModel};
use lanup_simulations::scenario::ScenarioFile;
use lanup_simulations::{simulate_fleet, Report};

mod plot;

/// Simulates sites of lanup nodes: uplink bytes and time until every node
/// has a release staged, against the lower bound and the naive case (every
/// node downloading it itself).
#[derive(Debug, Parser)]
#[command(name = "lanup-sim", version)]
struct Args {
    /// A scenario file (TOML); flags override its keys.
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    #[arg(long, value_name = "N")]
    sites: Option<usize>,
    #[arg(long, value_name = "M")]
    nodes_per_site: Option<usize>,
    /// The release's size (64MiB, 1GiB).
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Each site's uplink from the origin (16mbit, 2MiB).
    #[arg(long, value_name = "RATE")]
    uplink: Option<String>,
    /// Each node's LAN upload and download (1gbit, inf).
    #[arg(long, value_name = "RATE")]
    lan: Option<String>,
    /// Each node's LAN upload, when it differs from its download.
    #[arg(long, value_name = "RATE")]
    lan_up: Option<String>,
    /// Each node's LAN download, when it differs from its upload.
    #[arg(long, value_name = "RATE")]
    lan_down: Option<String>,
    /// One-way LAN latency (200us).
    #[arg(long, value_name = "DURATION")]
    latency: Option<String>,
    /// Fraction of the release's chunks the nodes already hold (a delta).
    #[arg(long, value_name = "FRACTION")]
    shared: Option<f64>,
    /// Uplink bytes per byte of the chunks a site lacks: 1 for plain
    /// chunks, about 0.1 for a rebuilt program sent as a patch.
    #[arg(long, value_name = "FRACTION")]
    wire: Option<f64>,
    /// Seed of the first site (each site draws its own from it).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Draw the time to all staged against nodes per site (1 to M), with
    /// the bound and the naive case, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Simulate a fleet rollout from headquarters over the scenario's sites
    /// instead: site waves as `lanup rollout --fleet --sites` takes them,
    /// with sites named site-0000 … (site-0000,10%,100%).
    #[arg(long, value_name = "WAVES")]
    fleet_rollout: Option<String>,
    /// With --fleet-rollout: node waves within each site.
    #[arg(long, value_name = "SIZES", default_value = "1,25%,100%")]
    node_waves: String,
    /// With --fleet-rollout: each site's poll interval.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration)]
    poll_interval: std::time::Duration,
    /// Model a site at rest instead, at each of these sizes (8,32,64,128):
    /// each node's CPU and LAN bytes, as lanup runs it and as it ran
    /// with a heartbeat a second passed on to every peer.
    #[arg(long, value_name = "SIZES", value_delimiter = ',')]
    idle: Vec<u64>,
    /// With --fleet-rollout: one node's apply (stop, swap, start, health
    /// check).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    apply_time: std::time::Duration,
}

/// The idle model's table (or JSON) for each size and topology.
fn print_idle(sizes: &[u64], json: bool) -> Result<()> {
    use lanup_simulations::idle::{at_rest, flooding, Costs, Topology};
    let c = Costs::MEASURED;
    let rows: Vec<_> = [Topology::Star, Topology::Full]
        .into_iter()
        .flat_map(|t| {
            sizes
                .iter()
                .map(move |&n| (at_rest(n, t, c), flooding(n, t, c)))
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>6} {:<8} {:>10} {:>10} {:>12} {:>10} {:>12} | before: {:>10} {:>10} {:>12}",
        "nodes",
        "topology",
        "every",
        "site/s",
        "copies/node",
        "cpu/node%",
        "busiest%",
        "cpu/node%",
        "busiest%",
        "LAN B/s"
    );
    for (now, before) in rows {
        println!(
            "{:>6} {:<8} {:>8} s {:>10.1} {:>12.1} {:>10.2} {:>12.2} | {:>18.2} {:>10.2} {:>12.0}   LAN B/s now {:.0}",
            now.nodes,
            format!("{:?}", now.topology).to_lowercase(),
            now.every_ms / 1000,
            now.site_rate,
            now.copies_per_node,
            now.cpu_pct_per_node,
            now.cpu_pct_busiest,
            before.cpu_pct_per_node,
            before.cpu_pct_busiest,
            before.lan_bytes_per_node,
            now.lan_bytes_per_node,
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lanup-sim: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<()> {
    if !args.idle.is_empty() {
        return print_idle(&args.idle, args.json);
    }
    let file = match &args.scenario {
        Some(path) => ScenarioFile::read(path)?,
        None => ScenarioFile::default(),
    };
    let flags = ScenarioFile {
        sites: args.sites,
        nodes_per_site: args.nodes_per_site,
        size: args.size.clone(),
        uplink: args.uplink.clone(),
        lan: args.lan.clone(),
        lan_up: args.lan_up.clone(),
        lan_down: args.lan_down.clone(),
        latency: args.latency.clone(),
        shared: args.shared,
        wire: args.wire,
        seed: args.seed,
        ..ScenarioFile::default()
    };
    let fleet = file
        .merge(flags)
        .resolve()
        .with_context(|| match &args.scenario {
            Some(p) => format!("scenario {}", p.display()),
            None => "flags".to_owned(),
        })?;
    if let Some(waves) = &args.fleet_rollout {
        let model = FleetRolloutModel {
            sites: fleet.sites,
            nodes_per_site: fleet.site.nodes,
            site_waves: waves.clone(),
            node_waves: lanup_protocol::rollout::parse_waves(&args.node_waves)
                .map_err(|e| anyhow::anyhow!("--node-waves: {e}"))?,
            poll_interval_ms: args.poll_interval.as_millis() as u64,
            wan_rtt_ms: fleet.site.wan_rtt / 1_000_000,
            apply_ms: args.apply_time.as_millis() as u64,
        };
        let r = simulate_fleet_rollout(&model, fleet.seed).map_err(|e| anyhow::anyhow!(e))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!(
            "fleet rollout {waves} over {} sites × {} nodes (node waves {}, polls every {}, apply {})",
            model.sites,
            model.nodes_per_site,
            args.node_waves,
            humantime::format_duration(args.poll_interval),
            humantime::format_duration(args.apply_time)
        );
        for (i, w) in r.waves.iter().enumerate() {
            println!(
                "  wave {}: {} sites, opened at {:.1} s, seen installed at {:.1} s ({:.1} s)",
                i + 1,
                w.sites,
                w.opened_s,
                w.installed_s,
                w.installed_s - w.opened_s
            );
        }
        println!(
            "every site installed, as headquarters sees it: {:.1} s ({:.1} min); the last install seen {:.1} s after it happened",
            r.total_s,
            r.total_s / 60.0,
            r.last_seen_after_s
        );
        return Ok(());
    }
    let report = simulate_fleet(&fleet.site, fleet.sites, fleet.seed);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(fleet.about.as_deref(), &report);
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &fleet)?;
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_report(about: Option<&str>, r: &Report) {
    if let Some(about) = about {
        println!("{about}");
    }
    println!(
        "{} sites × {} nodes, release {}",
        r.sites,
        r.nodes_per_site,
        mib(r.size)
    );
    println!(
        "uplink per site: {} median, {} at most ({:.3} × the release)",
        mib(r.uplink_bytes_per_site),
        mib(r.uplink_bytes_max),
        r.uplink_bytes_max as f64 / r.size as f64
    );
    println!(
        "all nodes staged, from the announcement: p50 {:.2} s, p99 {:.2} s",
        r.staged_p50_s, r.staged_p99_s
    );
    println!(
        "lower bound {:.2} s (p50 = {:.2} × bound); naive, every node from the origin: {:.2} s ({:.1} × lanup's p50)",
        r.bound_s,
        r.staged_p50_s / r.bound_s,
        r.naive_s,
        r.naive_s / r.staged_p50_s
    );
    let first = &r.first_site;
    for (at, node) in &first.fetchers {
        println!("site 0: node {node} became the fetcher at {at:.2} s");
    }
    if first.bans > 0 {
        println!("site 0: {} bad chunks refused, the peer banned", first.bans);
    }
    if r.unfinished_sites > 0 {
        println!("{} sites did not get every node staged", r.unfinished_sites);
    }
    println!("simulated in {:.2} s of wall time", r.wall_s);
}
