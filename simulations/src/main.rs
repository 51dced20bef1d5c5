//! `lanup-sim`: what lanup does at fleet scale, in simulated time, with the
//! node's own scheduler and election (see the library's docs for the model).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
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
