//! Command-line flags and what each command does with them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lanup_node::control::{self, ControlRequest};
use lanup_node::keys;
use lanup_node::origin::Origin;
use lanup_node::release::{self, ManifestSource, PublishOptions};
use lanup_protocol::manifest::{format_date, parse_date, unique_chunks, Format, Restart};
use lanup_protocol::sign::PublicKey;
use lanup_protocol::units::{format_bytes, Rate};
use lanup_protocol::{Manifest, Version};
use time::OffsetDateTime;

use crate::rollout::{follow, follow_exit, issue};

/// lanup: one download per site, verified peer-to-peer distribution, and
/// crash-safe replace-and-restart of an application across a fleet.
#[derive(Debug, Parser)]
#[command(name = "lanup", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The demo narrates for itself; other commands log at INFO.
    /// Whether this command runs a node (a process that lives for months).
    pub(crate) fn is_node(&self) -> bool {
        matches!(self.command, Command::Node(_))
    }

    /// The state directory of a node the Windows Service Control Manager
    /// runs: its log goes to a rotated file there, since a service has no
    /// console.
    pub(crate) fn service_state(&self) -> Option<PathBuf> {
        match &self.command {
            Command::Node(args) if args.windows_service => Some(
                args.state
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(lanup_node::config::DEFAULT_STATE)),
            ),
            _ => None,
        }
    }

    pub(crate) fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Demo(_) => "error",
            _ => "info",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run lanup's job end to end on this machine: an origin behind a capped
    /// uplink and a site of nodes on loopback, each with a sample app; v1 is
    /// fetched once for the site and rolled out, then v2 (small edits) is
    /// rolled out in canary waves; a report compares the uplink bytes with N
    /// separate downloads.
    Demo(crate::demo::DemoArgs),
    /// Run a node in the foreground: find the site's peers, fetch releases
    /// (one node per site from the origin, the rest from each other),
    /// verify and stage them.
    Node(NodeArgs),
    /// Register this machine's node with its service manager (Windows: the
    /// `lanup` service, under the Service Control Manager), or remove it.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Configure this machine's node in one command: writes
    /// /etc/lanup/lanup.toml after checking the origin, the publisher key
    /// and the install directory, and says how to start the service.
    Setup(crate::setup::SetupArgs),
    /// Issue a join token: a new machine's `lanup setup --join TOKEN`
    /// enrolls its node as a member of the site, with a certificate signed
    /// by the token, which this admin key vouches for. The admin key stays
    /// here; the token admits machines only until it expires.
    Enroll(crate::setup::EnrollArgs),
    /// Remove nodes (or every node a join token admitted) from the site: a
    /// revocation list signed here with an admin key, adding KEYs to the
    /// one the local node holds, taken by every node of the site at once.
    Revoke {
        /// What to revoke: a node, by its PeerId (as `lanup status` lists
        /// it) or its public key (`ed25519:…`), or a join token, by the key
        /// `lanup enroll` printed.
        #[arg(required = true, value_name = "NODE_OR_KEY", value_parser = node_or_key)]
        keys: Vec<PublicKey>,
        /// The admin's secret key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Publish the site's list in this release folder instead (at
        /// headquarters): the site's fetcher reads it at its next poll,
        /// the site's nodes pass it on, and headquarters refuses the
        /// revoked nodes' reports. Needs --site.
        #[arg(long, value_name = "WWW", requires = "site")]
        publish_dir: Option<PathBuf>,
        /// With --publish-dir: the site the keys are revoked from.
        #[arg(long, value_name = "NAME", requires = "publish_dir")]
        site: Option<String>,
        #[command(flatten)]
        node: LocalNode,
    },
    /// Show every node of the site, as the local node hears them (a site
    /// of more than 40 is summarised: counts by state, then the nodes that
    /// stand out).
    Status {
        #[command(flatten)]
        node: LocalNode,
        /// Print one JSON object (every node) instead of a table.
        #[arg(long)]
        json: bool,
        /// List every node, however large the site.
        #[arg(long)]
        all: bool,
    },
    /// Show every site that reports to headquarters: nodes, installed
    /// releases, failed nodes with their errors, the age of each site's last
    /// report (stale ones flagged) and its rollout.
    Fleet(crate::fleet::FleetArgs),
    /// List the peers the local node is connected to.
    Peers {
        #[command(flatten)]
        node: LocalNode,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the site's fetcher to poll the origin now.
    Check {
        #[command(flatten)]
        node: LocalNode,
    },
    /// Install a staged release on this node now: stop the application,
    /// swap its files, start it and check its health; roll back to the old
    /// release if anything fails. Prints each step; exits 0 when the new
    /// release is committed, 1 when it was rolled back or refused.
    Apply {
        /// The staged release, e.g. 1.0.0.2.
        version: String,
        #[command(flatten)]
        node: LocalNode,
        /// Print each step and the outcome as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Roll a staged release out across the site in canary waves, by a
    /// command signed here with an admin key and gossiped to every node.
    /// A wave starts when every node of the one before is healthy; any
    /// failure halts the rollout.
    Rollout(RolloutArgs),
    /// Return every node of the site to an older release it still holds,
    /// by a command signed here with an admin key: the only way to install
    /// an older release. All nodes at once; each checks the release's
    /// files and rolls back by itself if the old release is not healthy.
    Rollback(RollbackArgs),
    /// Approve a change another admin requested, where the site needs more
    /// than one admin (admin_threshold): signs the request's exact bytes
    /// here. The change starts once enough distinct trusted keys signed.
    Approve(crate::change::ApproveArgs),
    /// End a change that waits for approval: it can no longer start.
    Reject(crate::change::RejectArgs),
    /// Show the rollout commands this node accepted or refused, and what
    /// it did about them.
    History {
        #[command(flatten)]
        node: LocalNode,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// One change from request to result, from the audit logs of every
        /// node of the site (the local node asks its peers).
        #[arg(long, value_name = "ID")]
        change: Option<String>,
        /// With --change: `text` or `md` (a Markdown report).
        #[arg(long, value_name = "FORMAT", default_value = "text", requires = "change", value_parser = ["text", "md"])]
        format: String,
    },
    /// Create a signing key (publisher or admin); prints its public key.
    Keygen {
        /// Where to write the secret key (mode 0600; never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Build a signed format-2 release directory from a folder.
    Publish(PublishArgs),
    /// (Re)sign a manifest that was edited by hand.
    Sign {
        /// The publisher's secret key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The AutoUpdater.xml to sign; the signature goes next to it.
        manifest: PathBuf,
    },
    /// Show what a manifest holds; with --trust, check it as a node would.
    Inspect {
        /// A manifest file, a release folder, or an http(s) URL.
        manifest: String,
        /// A publisher public key to trust (ed25519:<64 hex digits>);
        /// repeatable. With it, the signature and the validation rules are
        /// checked and a failure exits non-zero.
        #[arg(long, value_name = "PUBKEY")]
        trust: Vec<PublicKey>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check that a folder holds every file of a manifest with the right
    /// size and hash.
    ///
    /// With --state instead, checks the install directory of the node's
    /// application against the release recorded as installed there.
    Verify {
        /// A manifest file, a release folder, or an http(s) URL.
        #[arg(long, value_name = "MANIFEST", required_unless_present = "state")]
        manifest: Option<String>,
        /// The folder to check (an install or a release directory).
        #[arg(long, value_name = "DIR", required_unless_present = "state")]
        dir: Option<PathBuf>,
        /// A node's state directory: check its recorded install.
        #[arg(long, value_name = "DIR", conflicts_with = "manifest")]
        state: Option<PathBuf>,
        /// A publisher public key to trust; repeatable. With it, the
        /// manifest's signature is checked first.
        #[arg(long, value_name = "PUBKEY")]
        trust: Vec<PublicKey>,
    },
    /// Serve a release folder over HTTP (GET/HEAD, Range, ETag), with a
    /// byte count at /_lanup/stats and an optional rate cap.
    Origin(OriginArgs),
}

#[derive(Debug, clap::Args)]
struct OriginArgs {
    /// The folder to serve.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:8080 (port 0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Cap on the total send rate: bytes per second (2MiB, 500KB) or
    /// bits per second (16mbit).
    #[arg(long, value_name = "RATE")]
    rate: Option<Rate>,
    /// Take signed site reports (POST /_lanup/report), keep them in this
    /// folder, and show the fleet at /_lanup/fleet and
    /// /_lanup/fleet.json.
    #[arg(long, value_name = "DIR")]
    reports: Option<PathBuf>,
    /// A site whose newest report is older than this is flagged stale.
    #[arg(long, value_name = "DURATION", default_value = "2h10m", value_parser = humantime::parse_duration)]
    stale_after: std::time::Duration,
    /// With --reports: count only reports from enrolled members of the
    /// site they name, whose certificates this admin key signed
    /// (repeatable; the sites' trust_admin keys).
    #[arg(long, value_name = "KEY", requires = "reports")]
    trust_admin: Vec<PublicKey>,
    /// With --reports: how long each site's timeline is kept, and a
    /// site that stops reporting.
    #[arg(long, value_name = "DURATION", default_value = "90d", value_parser = humantime::parse_duration, requires = "reports")]
    keep_history: std::time::Duration,
    /// With --reports: sites kept at most (a new site beyond is
    /// refused).
    #[arg(long, value_name = "N", default_value_t = lanup_hq::store::MAX_SITES, requires = "reports")]
    max_sites: usize,
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    /// The folder holding the release's files as they are installed.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The release's version, e.g. 1.0.0.2 (compared part by part).
    #[arg(long, value_name = "V")]
    version: Version,
    /// The application's process name (AppName). Taken from --from-legacy
    /// when not given.
    #[arg(long, value_name = "NAME")]
    app: Option<String>,
    /// Base URL the output folder will be served under (URLAddres).
    #[arg(long, value_name = "BASE")]
    url: String,
    /// The publisher's secret key file.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Where to write the release directory (not inside --dir).
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
    /// Whether nodes restart the application after installing (default:
    /// from --from-legacy, else yes).
    #[arg(long, value_enum)]
    restart: Option<YesNo>,
    /// The listed file that starts the application, e.g. bin/TIMS.
    #[arg(long, value_name = "NAME")]
    app_exe: Option<String>,
    /// Release date (UpdateTime): 2026-11-20 or 2026-11-20T08:00:00Z.
    /// Default: now.
    #[arg(long, value_name = "DATE")]
    date: Option<String>,
    /// Date after which nodes refuse the release.
    #[arg(long, value_name = "DATE")]
    expires: Option<String>,
    /// A classic AutoUpdater.xml to take the app name and restart policy
    /// from.
    #[arg(long, value_name = "XML")]
    from_legacy: Option<PathBuf>,
    /// How many earlier releases published into --out to keep and write
    /// patches from (0: none). A site that holds one of them fetches only
    /// the patches of the files that changed.
    #[arg(long, value_name = "N", default_value_t = 2)]
    keep_bases: usize,
    /// A further release to write patches from: a folder of its files as
    /// installed, or its published manifest (repeatable).
    #[arg(long, value_name = "DIR|MANIFEST")]
    base: Vec<PathBuf>,
    /// zstd level for patches, packed chunks and bundles of small files
    /// (1-22; higher is smaller and slower to publish, equally fast to
    /// decode). Default: 19, and 1 for bundles when a publish makes over
    /// 64 MiB of new ones (a large tree's first release)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=22))]
    level: Option<i32>,
    /// Write no compressed copies of chunks and no bundles.
    #[arg(long)]
    no_pack: bool,
    /// The release is for Linux nodes only: allow file names Windows
    /// cannot hold (device names such as CON or aux.c, a part ending in a
    /// dot or a space, < > : " | ? *, names that differ only in case)
    #[arg(long)]
    linux_only: bool,
}

#[derive(Debug, clap::Args)]
struct RolloutArgs {
    /// The release to roll out, e.g. 1.0.0.2.
    #[arg(required_unless_present = "abort")]
    version: Option<String>,
    /// The admin's secret key file (the command is signed here; nodes
    /// never see the secret).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[command(flatten)]
    node: LocalNode,
    /// Wave sizes, cumulative: a count of nodes or a share of the site.
    #[arg(long, value_name = "SIZES", default_value = "1,25%,100%")]
    waves: String,
    /// Stop the rollout under way: no further wave applies.
    #[arg(long, conflicts_with = "version")]
    abort: bool,
    #[command(flatten)]
    change: ChangeArgs,
    /// Follow the rollout until every node is done (exit 0) or it halts
    /// (exit 1).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up following after this long (exit 2, naming the
    /// nodes not there yet and why); the rollout itself goes on.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Roll out across the fleet from headquarters, site wave by site
    /// wave: writes a signed fleet rollout beside the manifest in
    /// --publish-dir, which each site's fetcher reads with its poll, and
    /// opens the next site wave once every site before reports the
    /// release installed (--reports). Run again, or with --wait, to go on.
    #[arg(long, requires_all = ["publish_dir", "reports"])]
    fleet: bool,
    /// With --fleet: the release folder the origin serves.
    #[arg(long, value_name = "DIR")]
    publish_dir: Option<PathBuf>,
    /// With --fleet: headquarters' origin URL or reports folder.
    #[arg(long, value_name = "URL|DIR")]
    reports: Option<String>,
    /// With --fleet: site waves, named sites first, then cumulative shares
    /// of the sites that report, e.g. lab-site,10%,100% [default: 100%].
    #[arg(long, value_name = "WAVES")]
    sites: Option<String>,
    /// With --fleet: distinct admins who must sign the fleet rollout before
    /// any site begins (the requester counts; others run `lanup approve ID
    /// --fleet`). Set it to the sites' admin_threshold.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "fleet")]
    approvals: usize,
    /// With --fleet: how long each site's command stays valid, so that a
    /// site offline for days takes it when it returns (at most 90d).
    #[arg(long, value_name = "DURATION", default_value = "14d", value_parser = humantime::parse_duration, requires = "fleet")]
    valid: std::time::Duration,
}

#[derive(Debug, clap::Args)]
struct RollbackArgs {
    /// The older release to return to, e.g. 1.0.0.1.
    version: String,
    /// The admin's secret key file.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[command(flatten)]
    node: LocalNode,
    #[command(flatten)]
    change: ChangeArgs,
    /// Follow the rollback until every node is done (exit 0) or it halts
    /// (exit 1).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up following after this long (exit 2).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

/// What every change may carry besides its action.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ChangeArgs {
    /// Why: shown while the change waits for approval, and in its record.
    #[arg(long, value_name = "TEXT")]
    pub(crate) reason: Option<String>,
    /// Apply now, outside the nodes' apply windows.
    #[arg(long)]
    pub(crate) now: bool,
}

/// Which local node a command talks to.
#[derive(Debug, clap::Args)]
pub(crate) struct LocalNode {
    /// The local node's state directory.
    #[arg(long, value_name = "DIR", default_value = lanup_node::config::DEFAULT_STATE)]
    pub(crate) state: PathBuf,
}

impl LocalNode {
    /// Sends one request over the node's control socket.
    pub(crate) fn ask(&self, request: ControlRequest) -> Result<serde_json::Value> {
        runtime()?.block_on(control::ask(&self.state, request))
    }
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// The node's TOML configuration (see lanup.sample.toml); flags override
    /// it [default: /etc/lanup/lanup.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory: identity, chunk store, staging [default: /var/lib/lanup].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4710.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// A static peer (repeatable), for networks that drop multicast.
    #[arg(long, value_name = "MULTIADDR")]
    peer: Vec<String>,
    /// Base URL of the published release directory.
    #[arg(long, value_name = "URL")]
    origin: Option<String>,
    /// A publisher key to trust (repeatable).
    #[arg(long, value_name = "KEY")]
    trust_publisher: Vec<String>,
    /// An admin key whose signed rollout commands this node obeys
    /// (repeatable).
    #[arg(long, value_name = "KEY")]
    trust_admin: Vec<String>,
    /// Site name; nodes of different sites ignore each other's gossip.
    #[arg(long, value_name = "NAME")]
    site: Option<String>,
    /// Pre-shared key file for a private swarm (TCP only).
    #[arg(long, value_name = "FILE")]
    psk: Option<PathBuf>,
    /// Cap on this site's origin downloads (e.g. 16mbit).
    #[arg(long, value_name = "RATE")]
    wan_rate: Option<String>,
    /// Cap on this node's LAN traffic.
    #[arg(long, value_name = "RATE")]
    lan_rate: Option<String>,
    /// How often the site's fetcher polls the origin [default: 1m].
    #[arg(long, value_name = "DURATION")]
    poll_interval: Option<String>,
    /// No byte from the origin for this long and a request is resumed where
    /// it stopped (default 60s; never a limit on a whole transfer).
    #[arg(long, value_name = "DURATION")]
    origin_stall_timeout: Option<String>,
    /// Do not look for peers by mDNS (static --peer addresses only).
    #[arg(long)]
    no_mdns: bool,
    /// How long a new lanup has to come up and hear the site again before
    /// the old one is put back (default 60s).
    #[arg(long, value_name = "DURATION")]
    self_update_timeout: Option<String>,
    /// Headquarters' `lanup origin --reports` URL: the site's fetcher posts
    /// a signed report of the site there when it changes, at least hourly.
    #[arg(long, value_name = "URL")]
    report_to: Option<String>,
    /// A site report is sent at least this often, news or not [default: 1h].
    #[arg(long, value_name = "DURATION")]
    report_interval: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9184 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// A PEM file of certificate authorities the origin and headquarters
    /// may be signed by, beside the system's trust store.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The HTTP proxy to the origin and headquarters, e.g.
    /// http://proxy:3128 [default: HTTPS_PROXY/HTTP_PROXY/NO_PROXY].
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Run as the Windows service the Service Control Manager started
    /// (`lanup service install` registers the node so).
    #[arg(long, hide = true)]
    windows_service: bool,
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Register `lanup node` as a service. Windows: the `lanup` service,
    /// LocalSystem, restarted by the SCM after a failure, reading
    /// the configuration at --config; disabled until --start.
    Install {
        #[arg(long, value_name = "FILE", default_value = lanup_node::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Start the service with the machine (and now).
        #[arg(long)]
        start: bool,
    },
    /// Start the service with the machine, and now (once the node is
    /// configured: the MSI registers it disabled).
    Enable,
    /// Stop and remove the service.
    Uninstall,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum YesNo {
    Yes,
    No,
}

pub(crate) fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => {
            crate::demo::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(args) => node(args),
        Command::Service(command) => service(command),
        Command::Setup(args) => crate::setup::run(args),
        Command::Enroll(args) => crate::setup::enroll(args),
        Command::Revoke {
            keys,
            key,
            publish_dir: Some(dir),
            site: Some(site),
            ..
        } => publish_revocations(&keys, &key, &dir, &site),
        Command::Revoke {
            keys, key, node, ..
        } => revoke(&keys, &key, &node),
        Command::Status { node, json, all } => status(&node, json, all),
        Command::Peers { node, json } => peers(&node, json),
        Command::Check { node } => check(&node),
        Command::Keygen { out } => {
            let public = keys::generate(&out)?;
            eprintln!("secret key written to {} (mode 0600)", out.display());
            println!("{public}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(args) => publish(args),
        Command::Sign { key, manifest } => {
            let key = keys::load_secret(&key)?;
            let sig = release::sign_manifest(&manifest, &key)?;
            eprintln!("signed by {}", key.public());
            println!("{}", sig.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            manifest,
            trust,
            json,
        } => runtime()?.block_on(inspect(&manifest, &trust, json)),
        Command::Verify {
            manifest,
            dir,
            state,
            trust,
        } => {
            let (manifest, dir) = match (state, manifest, dir) {
                (Some(state), _, dir) => return verify_state(&state, dir, &trust),
                (None, Some(manifest), Some(dir)) => (manifest, dir),
                _ => bail!("give --manifest and --dir, or --state"),
            };
            runtime()?.block_on(verify(&manifest, &dir, &trust))
        }
        Command::Apply {
            version,
            node,
            json,
        } => apply(&node, &version, json),
        Command::Rollout(args) => rollout(args),
        Command::Rollback(args) => rollback(args),
        Command::Approve(args) => crate::change::approve(args),
        Command::Reject(args) => crate::change::reject(args),
        Command::History {
            node,
            json,
            change: Some(id),
            format,
        } => crate::record::show(&node, &id, json, format == "md"),
        Command::History { node, json, .. } => history(&node.state, json),
        Command::Fleet(args) => crate::fleet::run(args),
        Command::Origin(args) => serve_origin(args),
    }
}

fn node(args: NodeArgs) -> Result<ExitCode> {
    let default = Path::new(lanup_node::config::DEFAULT_CONFIG);
    let file = args
        .config
        .as_deref()
        .or_else(|| default.exists().then_some(default));
    let config = lanup_node::config::NodeConfig::resolve(
        file,
        lanup_node::config::Overrides {
            state: args.state,
            listen: Some(args.listen),
            peers: Some(args.peer),
            origin: args.origin,
            trust_publisher: Some(args.trust_publisher),
            trust_admin: Some(args.trust_admin),
            site: args.site,
            psk: args.psk,
            wan_rate: args.wan_rate,
            lan_rate: args.lan_rate,
            poll_interval: args.poll_interval,
            origin_stall_timeout: args.origin_stall_timeout,
            mdns: args.no_mdns.then_some(false),
            self_update_timeout: args.self_update_timeout,
            report_to: args.report_to,
            report_interval: args.report_interval,
            metrics_listen: args.metrics_listen,
            ca_file: args.ca_file,
            proxy: args.proxy,
            ..lanup_node::config::Overrides::default()
        },
    )?;
    if args.windows_service {
        return run_as_service(config);
    }
    run_node(config)
}

fn status(node: &LocalNode, json: bool, all: bool) -> Result<ExitCode> {
    let answer = node.ask(ControlRequest::Status)?;
    if json {
        println!("{answer}");
    } else {
        crate::status::print(&answer, all);
    }
    Ok(ExitCode::SUCCESS)
}

fn peers(node: &LocalNode, json: bool) -> Result<ExitCode> {
    let answer = node.ask(ControlRequest::Peers)?;
    if json {
        println!("{answer}");
    } else {
        for p in answer["peers"].as_array().into_iter().flatten() {
            println!("{}", p.as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lanup check`: the site's fetcher polls the origin now.
fn check(node: &LocalNode) -> Result<ExitCode> {
    let answer = node.ask(ControlRequest::Check)?;
    if let Some(e) = answer["error"].as_str() {
        bail!("{e}");
    }
    let when = if answer["polling"] == true {
        "now"
    } else {
        "as soon as its download ends"
    };
    match answer["asked"].as_str() {
        Some(fetcher) => println!(
            "the site's fetcher {} polls the origin {when}",
            short_id(fetcher)
        ),
        None => println!("this node is the site's fetcher; it polls the origin {when}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn rollback(args: RollbackArgs) -> Result<ExitCode> {
    let version = args.version.clone();
    let action = lanup_protocol::rollout::Action::Rollback { version };
    let sent = issue(&args.node, &args.key, action, Vec::new(), &args.change)?;
    if !crate::change::said_waiting(&sent, &args.node) {
        println!(
            "rollback to {} sent (id {}, signed by {}): every node at once",
            args.version, sent.id, sent.key
        );
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow_exit(follow(&args.node, args.timeout, Some(&sent.id))?)
}

fn serve_origin(args: OriginArgs) -> Result<ExitCode> {
    let hq = args
        .reports
        .map(|r| {
            lanup_hq::Headquarters::open(lanup_hq::Settings {
                dir: r,
                releases: args.dir.clone(),
                stale_after: args.stale_after,
                keep: args.keep_history,
                max_sites: args.max_sites,
                admins: args.trust_admin,
            })
        })
        .transpose()?;
    runtime()?.block_on(origin(&args.dir, &args.listen, args.rate, hq))
}

fn rollout(args: RolloutArgs) -> Result<ExitCode> {
    use lanup_protocol::rollout::{parse_waves, Action};
    let waves = parse_waves(&args.waves).map_err(|e| anyhow::anyhow!("--waves: {e}"))?;
    if let (true, Some(publish_dir), Some(reports)) = (args.fleet, &args.publish_dir, &args.reports)
    {
        return crate::fleet::rollout(crate::fleet::FleetRollout {
            version: args.version.as_deref(),
            key: &args.key,
            publish_dir,
            reports,
            sites: args.sites.as_deref(),
            node_waves: waves,
            abort: args.abort,
            wait: args.wait,
            timeout: args.timeout,
            approvals: args.approvals,
            reason: args.change.reason.clone(),
            valid: args.valid,
        });
    }
    let action = match &args.version {
        Some(version) if !args.abort => Action::Rollout {
            version: version.clone(),
        },
        _ => Action::Abort,
    };
    if args.abort {
        let sent = issue(&args.node, &args.key, action, Vec::new(), &args.change)?;
        if !crate::change::said_waiting(&sent, &args.node) {
            println!("abort sent (id {}, signed by {})", sent.id, sent.key);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let sent = issue(&args.node, &args.key, action, waves, &args.change)?;
    if crate::change::said_waiting(&sent, &args.node) {
        if !args.wait {
            return Ok(ExitCode::SUCCESS);
        }
        return follow_exit(follow(&args.node, args.timeout, Some(&sent.id))?);
    }
    let r = &sent.rollout;
    println!(
        "rollout of {} sent (id {}, signed by {}); waves:",
        r["version"].as_str().unwrap_or("?"),
        sent.id,
        sent.key
    );
    for (i, wave) in r["waves"].as_array().into_iter().flatten().enumerate() {
        let ids: Vec<&str> = wave
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str())
            .collect();
        println!("  {}: {}", i + 1, ids.join(" "));
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow_exit(follow(&args.node, args.timeout, Some(&sent.id))?)
}

fn history(state: &Path, json: bool) -> Result<ExitCode> {
    let entries = lanup_node::audit::read(&state.join(lanup_node::audit::AUDIT_FILE))?;
    for e in &entries {
        if json {
            println!("{}", serde_json::to_string(e)?);
            continue;
        }
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.at_ms) * 1_000_000)
            .map(format_date)
            .unwrap_or_default();
        println!(
            "{at}  {:<11} {:<8} {:<10} {}{}",
            e.event,
            e.action.as_deref().unwrap_or("-"),
            e.version.as_deref().unwrap_or("-"),
            e.key
                .as_deref()
                .map(|k| format!("by {k} "))
                .unwrap_or_default(),
            e.reason
                .as_deref()
                .map(|r| format!("({r})"))
                .unwrap_or_default()
        );
    }
    if entries.is_empty() && !json {
        println!("no rollout commands recorded in {}", state.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn apply(node: &LocalNode, version: &str, json: bool) -> Result<ExitCode> {
    let request = ControlRequest::Apply {
        version: version.to_owned(),
    };
    let last = runtime()?.block_on(control::ask_each(&node.state, request, |line| {
        if json {
            println!("{line}");
        } else if let Some(e) = line.get("event") {
            println!(
                "{:>7} ms  {:<11} {}",
                e["ms"].as_u64().unwrap_or(0),
                e["step"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            );
        }
    }))?;
    if let Some(e) = last.get("error").and_then(|e| e.as_str()) {
        bail!("{version}: {e}");
    }
    if last["event"]["step"] == "hand-over" {
        return follow_hand_over(node, version);
    }
    let outcome = &last["outcome"];
    match outcome["ending"].as_str() {
        Some("committed") => Ok(ExitCode::SUCCESS),
        Some(ending) => {
            eprintln!(
                "lanup: {version} {}: {}",
                if ending == "failed" {
                    "not installed"
                } else {
                    "rolled back"
                },
                outcome["reason"].as_str().unwrap_or("no reason given")
            );
            Ok(ExitCode::from(1))
        }
        None => bail!("the node's answer has no outcome: {last}"),
    }
}

/// Waits for a node that stopped to try lanup `version` to answer again,
/// and says how it went: 0 when it runs `version`, 1 when it put the old
/// lanup back.
fn follow_hand_over(node: &LocalNode, version: &str) -> Result<ExitCode> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let Ok(status) = node.ask(ControlRequest::Status) else {
            continue;
        };
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        let Some(me) = nodes.iter().find(|n| n["self"] == true) else {
            continue;
        };
        if me["lanup_version"] == version {
            println!("committed: this node runs lanup {version}");
            return Ok(ExitCode::SUCCESS);
        }
        if me["failed_version"] == version {
            eprintln!(
                "lanup: lanup {version} rolled back: {}",
                me["last_error"].as_str().unwrap_or("no reason given")
            );
            return Ok(ExitCode::from(1));
        }
    }
    bail!("the node did not say within 10 minutes how its update to lanup {version} went")
}

pub(crate) use lanup_protocol::short_peer as short_id;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn date_arg(flag: &str, value: &str) -> Result<OffsetDateTime> {
    parse_date(value).with_context(|| {
        format!("{flag} {value:?}: not a date (use 2026-11-20 or 2026-11-20T08:00:00Z)")
    })
}

/// A classic manifest to publish from (`--from-legacy`).
fn read_legacy(path: &Path) -> Result<Manifest> {
    let source = ManifestSource {
        location: path.display().to_string(),
        text: lanup_node::manifest_text::ManifestText::read_file(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        signature: None,
        signature_location: String::new(),
    };
    source.parse()
}

/// The release time of one published now into `out`: now, to the second.
/// Releases of different applications on one origin are ordered by this
/// time: a release published in the same second as the one it replaces is
/// dated a second later, or nodes would take it for no newer and pass it
/// over.
fn next_update_time(out: &Path) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let previous = std::fs::read(out.join(lanup_protocol::manifest::MANIFEST_FILE))
        .ok()
        .and_then(|xml| Manifest::parse(&xml).ok())
        .and_then(|m| m.update_time);
    match previous {
        Some(at) if at >= now => at + time::Duration::SECOND,
        _ => now,
    }
}

/// Warns of files the classic manifest lists that the release folder does
/// not hold.
fn warn_unlisted(legacy: &Manifest, manifest: &Manifest, args: &PublishArgs) {
    let listed: std::collections::HashSet<_> =
        manifest.files.iter().map(|f| f.name.as_str()).collect();
    for f in legacy
        .files
        .iter()
        .filter(|f| !listed.contains(f.name.as_str()))
    {
        eprintln!(
            "warning: {} lists {:?}, which is not in {}",
            args.from_legacy
                .as_deref()
                .unwrap_or(Path::new(""))
                .display(),
            f.name,
            args.dir.display()
        );
    }
}

fn publish(args: PublishArgs) -> Result<ExitCode> {
    let legacy = args.from_legacy.as_deref().map(read_legacy).transpose()?;
    let app_name = args
        .app
        .clone()
        .or_else(|| legacy.as_ref().and_then(|l| l.restart.app_name.clone()))
        .context("--app NAME is required (or --from-legacy with an AppName)")?;
    let allow = match args.restart {
        Some(YesNo::Yes) => true,
        Some(YesNo::No) => false,
        None => legacy.as_ref().is_none_or(|l| l.restart.allow),
    };
    if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
        bail!(
            "--url {:?}: expected an http:// or https:// base URL",
            args.url
        );
    }
    let mut url = args.url.clone();
    if !url.ends_with('/') {
        url.push('/');
    }
    let update_time = match &args.date {
        Some(d) => date_arg("--date", d)?,
        None => next_update_time(&args.out),
    };
    let expires = args
        .expires
        .as_deref()
        .map(|d| date_arg("--expires", d))
        .transpose()?;
    let key = keys::load_secret(&args.key)?;
    let opts = PublishOptions {
        dir: args.dir.clone(),
        out: args.out.clone(),
        version: args.version.clone(),
        url,
        update_time,
        expires,
        restart: Restart {
            allow,
            app_name: Some(app_name),
            exe: args.app_exe.clone(),
        },
        deltas: lanup_node::release_store::PublishDeltas {
            keep: args.keep_bases,
            bases: args.base.clone(),
            level: args.level,
            pack: !args.no_pack,
        },
        linux_only: args.linux_only,
    };
    let published = release::publish(&opts, &key)?;
    if let Some(legacy) = &legacy {
        warn_unlisted(legacy, &published.manifest, &args);
    }
    let m = &published.manifest;
    eprintln!(
        "published {} {}: {} files, {} in {} chunks, signed by {}",
        m.restart.app_name.as_deref().unwrap_or(""),
        m.release_name(),
        m.files.len(),
        format_bytes(m.total_size()),
        m.files.iter().map(|f| f.chunks.len()).sum::<usize>(),
        published.signed_by
    );
    let packed: u64 = lanup_protocol::delta::cheapest_without_base(m);
    let patched = m.files.iter().filter(|f| !f.patches.is_empty()).count();
    eprintln!(
        "  over a site's uplink: {} with no earlier release, compressed ({:.3} of the release); patches for {patched} changed files",
        format_bytes(packed),
        packed as f64 / m.total_size().max(1) as f64,
    );
    println!("{}", published.manifest_path.display());
    Ok(ExitCode::SUCCESS)
}

async fn inspect(location: &str, trust: &[PublicKey], json: bool) -> Result<ExitCode> {
    let source = ManifestSource::read(location).await?;
    let (manifest, checked) = if trust.is_empty() {
        (source.parse()?, false)
    } else {
        (source.authenticate(trust, OffsetDateTime::now_utc())?, true)
    };
    let signer = source.signature().ok().map(|s| s.key);
    if json {
        println!(
            "{}",
            manifest_json(&source.location, &manifest, signer.as_ref(), checked)
        );
    } else {
        print_manifest(&source.location, &manifest, signer.as_ref(), checked);
    }
    Ok(ExitCode::SUCCESS)
}

fn manifest_json(
    location: &str,
    m: &Manifest,
    signer: Option<&PublicKey>,
    checked: bool,
) -> serde_json::Value {
    let files: Vec<_> = m
        .files
        .iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name,
                "size": f.size,
                "mode": f.mode.map(|m| format!("{m:o}")),
                "hash": f.hash.map(|h| h.to_string()),
                "chunks": f.chunks.iter().map(|c| serde_json::json!({
                    "size": c.size, "hash": c.hash.to_string()
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "source": location,
        "format": match m.format { Format::Legacy => 1, Format::V2 => 2 },
        "version": m.version.as_ref().map(ToString::to_string),
        "update_time": m.update_time.map(format_date),
        "expires": m.expires.map(format_date),
        "url": m.url,
        "restart": {
            "allow": m.restart.allow,
            "app_name": m.restart.app_name,
            "exe": m.restart.exe,
        },
        "total_size": m.total_size(),
        "chunk_count": m.files.iter().map(|f| f.chunks.len()).sum::<usize>(),
        "unique_chunks": unique_chunks(&m.files).len(),
        "files": files,
        "signature": {
            "key": signer.map(ToString::to_string),
            "verified": checked,
        },
    })
}

fn print_manifest(location: &str, m: &Manifest, signer: Option<&PublicKey>, checked: bool) {
    let mut out = std::io::stdout().lock();
    let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
    let chunk_count: usize = m.files.iter().map(|f| f.chunks.len()).sum();
    let _ = writeln!(out, "manifest   {location}");
    let _ = writeln!(
        out,
        "format     {}",
        match m.format {
            Format::V2 => "2",
            Format::Legacy => "classic (file names only; cannot be installed as it is)",
        }
    );
    let _ = writeln!(
        out,
        "version    {}",
        or_dash(m.version.as_ref().map(ToString::to_string))
    );
    let _ = writeln!(
        out,
        "released   {}",
        or_dash(m.update_time.map(format_date))
    );
    let _ = writeln!(out, "expires    {}", or_dash(m.expires.map(format_date)));
    let _ = writeln!(out, "url        {}", m.url);
    let _ = writeln!(
        out,
        "restart    {} (app {}, started by {})",
        if m.restart.allow { "yes" } else { "no" },
        or_dash(m.restart.app_name.clone()),
        or_dash(m.restart.exe.clone().or_else(|| m.restart.app_name.clone()))
    );
    let _ = writeln!(
        out,
        "files      {} files, {} in {chunk_count} chunks ({} unique)",
        m.files.len(),
        format_bytes(m.total_size()),
        unique_chunks(&m.files).len()
    );
    let sig = match (signer, checked) {
        (Some(k), true) => format!("valid, by trusted key {k}"),
        (Some(k), false) => format!("by {k}, not checked (pass --trust KEY)"),
        (None, _) => "none".into(),
    };
    let _ = writeln!(out, "signature  {sig}");
    for f in &m.files {
        let _ = writeln!(
            out,
            "  {:>4} {:>12} {} {}",
            f.mode.map_or("-".into(), |m| format!("{m:o}")),
            f.size.map_or("-".into(), |s| s.to_string()),
            f.hash
                .map_or("-".repeat(16), |h| h.to_string()[..16].to_owned()),
            f.name
        );
    }
}

/// `lanup verify --state`: the install against the release recorded as
/// installed, every staged release against its manifest, and every chunk
/// in the store against its hash. Nothing is changed; exit 1 on any
/// mismatch.
fn verify_state(state: &Path, dir: Option<PathBuf>, trust: &[PublicKey]) -> Result<ExitCode> {
    let mut ok = true;
    let mut checked_any = false;
    let rt = runtime()?;
    if let Some(installed) = lanup_node::apply::read_installed(state)? {
        let manifest = state.join("installed").display().to_string();
        let dir = dir.unwrap_or(installed.record.install_dir);
        ok &= rt.block_on(verify(&manifest, &dir, trust))? == ExitCode::SUCCESS;
        checked_any = true;
    }
    let releases = state.join("releases");
    let mut staged: Vec<PathBuf> = std::fs::read_dir(&releases)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    staged.sort();
    for release in staged {
        let Some(name) = release.file_name() else {
            continue;
        };
        let staging = state.join("staging").join(name);
        let manifest = release.display().to_string();
        ok &= rt.block_on(verify(&manifest, &staging, trust))? == ExitCode::SUCCESS;
        checked_any = true;
    }
    let chunks = state.join("chunks");
    if chunks.is_dir() {
        let store = lanup_node::store::ChunkStore::open(&chunks)?;
        let (count, bytes, damaged) = store
            .scan()
            .with_context(|| format!("cannot read the chunk store {}", chunks.display()))?;
        for path in &damaged {
            println!("DAMAGED {}: does not hash to its name", path.display());
        }
        if damaged.is_empty() {
            println!(
                "ok: chunk store {} holds {count} chunks ({}), each matching its hash",
                chunks.display(),
                format_bytes(bytes)
            );
        } else {
            eprintln!(
                "lanup: {} of {count} chunks in {} are damaged (the node fetches them again when it finds them)",
                damaged.len(),
                chunks.display()
            );
            ok = false;
        }
        checked_any = true;
    }
    if !checked_any {
        bail!(
            "{}: no installed release, staged release or chunk store to check",
            state.display()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn verify(location: &str, dir: &Path, trust: &[PublicKey]) -> Result<ExitCode> {
    let source = ManifestSource::read(location).await?;
    let manifest = if trust.is_empty() {
        let m = source.parse()?;
        m.validate().with_context(|| source.location.clone())?;
        m
    } else {
        source.authenticate(trust, OffsetDateTime::now_utc())?
    };
    let mismatches = release::verify_dir(&manifest, dir);
    if mismatches.is_empty() {
        println!(
            "ok: {} holds all {} files of {} {} ({})",
            dir.display(),
            manifest.files.len(),
            manifest.restart.app_name.as_deref().unwrap_or("release"),
            manifest.release_name(),
            format_bytes(manifest.total_size())
        );
        return Ok(ExitCode::SUCCESS);
    }
    for (name, why) in &mismatches {
        println!("MISMATCH {name}: {why}");
    }
    eprintln!(
        "lanup: {} of {} files in {} do not match {}",
        mismatches.len(),
        manifest.files.len(),
        dir.display(),
        source.location
    );
    Ok(ExitCode::from(1))
}

async fn origin(
    dir: &Path,
    listen: &str,
    rate: Option<Rate>,
    hq: Option<lanup_hq::Headquarters>,
) -> Result<ExitCode> {
    let mut origin = Origin::bind(dir, listen, rate).await?;
    let addr = origin.local_addr()?;
    let mut said = format!(
        "lanup origin: serving {} at http://{addr}/\n",
        dir.display()
    );
    let hq = hq.map(std::sync::Arc::new);
    if let Some(hq) = &hq {
        origin = origin.with_routes(lanup_hq::routes(hq.clone()));
        said.push_str(&format!(
            "lanup origin: taking site reports; the fleet at http://{addr}/_lanup/fleet\n"
        ));
    }
    // Said once, and never a reason to stop: whoever started the origin
    // may have stopped reading after the address.
    let mut out = std::io::stdout();
    let _ = out.write_all(said.as_bytes()).and_then(|()| out.flush());
    let upkeep = async move {
        match hq {
            Some(hq) => hq.upkeep().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        served = origin.serve(shutdown_signal()) => served?,
        () = upkeep => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    lanup_node::platform::stop_requested().await;
}

/// Runs a node until it is asked to stop, or hands over to a new lanup.
fn run_node(config: lanup_node::config::NodeConfig) -> Result<ExitCode> {
    let state = config.state.clone();
    let rt = runtime()?;
    match rt.block_on(lanup_node::node::run(config, shutdown_signal()))? {
        lanup_node::node::Exit::Stopped => Ok(ExitCode::SUCCESS),
        // Returns only when stopped during the trial, or when no lanup
        // could be executed.
        lanup_node::node::Exit::Update(handover) => {
            rt.block_on(lanup_node::upgrade::hand_over(
                &state,
                *handover,
                shutdown_signal(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_as_service(config: lanup_node::config::NodeConfig) -> Result<ExitCode> {
    let code = lanup_node::platform::service::run_as_service(move || match run_node(config) {
        Ok(_) => 0,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the node stopped");
            1
        }
    })?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn service(command: ServiceCommand) -> Result<ExitCode> {
    use lanup_node::platform::service;
    match command {
        ServiceCommand::Install { config, start } => {
            let binary = lanup_node::upgrade::binary()?;
            service::install(&binary, &config, start)?;
            println!(
                "registered the lanup service ({}), {}",
                binary.display(),
                if start {
                    "started with the machine"
                } else {
                    "disabled until configured: then `lanup service enable`"
                }
            );
        }
        ServiceCommand::Enable => {
            service::enable()?;
            println!("the lanup service starts with the machine, and runs now");
        }
        ServiceCommand::Uninstall => {
            service::uninstall()?;
            println!("removed the lanup service");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lanup revoke`: the node's revocation list with `keys` added, signed
/// with the admin key at `key` and handed to the local node.
fn revoke(keys: &[PublicKey], key: &Path, node: &LocalNode) -> Result<ExitCode> {
    let admin = lanup_node::keys::load_secret(key)?;
    let status = node.ask(ControlRequest::Status)?;
    let site = status["site"]
        .as_str()
        .context("the node did not say its site")?
        .to_owned();
    let mut revoked: Vec<String> = status["membership"]["revoked"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    for k in keys {
        let k = k.to_string();
        if !revoked.contains(&k) {
            revoked.push(k);
        }
    }
    // Stamped after the list held, even when this machine's clock is
    // behind the one that signed it.
    let now = (lanup_node::node::now_unix_ms() / 1000)
        .max(status["membership"]["revoked_issued"].as_u64().unwrap_or(0) + 1);
    let signed = lanup_protocol::membership::Revocations::sign(&admin, &site, revoked.clone(), now);
    let answer = node.ask(ControlRequest::Revoke { signed })?;
    if let Some(e) = answer["error"].as_str() {
        bail!("{e}");
    }
    println!(
        "site {site:?}: {} key(s) revoked; every node takes the list with the next heartbeats",
        revoked.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `lanup revoke --publish-dir WWW --site SITE`: the site's published
/// revocation list with `keys` added, signed with the admin key at `key`.
fn publish_revocations(keys: &[PublicKey], key: &Path, dir: &Path, site: &str) -> Result<ExitCode> {
    use lanup_protocol::membership::{revoked_file, RevocationList, Revocations, Signed};
    if !lanup_protocol::report::valid_site(site) {
        bail!("--site {site:?}: not a site name");
    }
    let admin = lanup_node::keys::load_secret(key)?;
    let path = dir.join(revoked_file(site));
    // The list published before, whoever signed it: its keys stay revoked.
    let before: Option<RevocationList> = match std::fs::read(&path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<Signed>(&bytes)
                .ok()
                .and_then(|s| s.body::<RevocationList>("revocation list").ok())
                .with_context(|| format!("{}: not a revocation list", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut revoked = before.as_ref().map(|b| b.keys.clone()).unwrap_or_default();
    for k in keys {
        let k = k.to_string();
        if !revoked.contains(&k) {
            revoked.push(k);
        }
    }
    let now = (lanup_node::node::now_unix_ms() / 1000).max(before.map_or(0, |b| b.issued + 1));
    let signed = Revocations::sign(&admin, site, revoked.clone(), now);
    let parent = path.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    serde_json::to_writer_pretty(&mut tmp, &signed)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "site {site:?}: {} key(s) revoked, published at {}; the site takes it at its next poll",
        revoked.len(),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn node_or_key(text: &str) -> Result<PublicKey, String> {
    text.parse::<PublicKey>()
        .ok()
        .or_else(|| PublicKey::from_peer_id(text))
        .ok_or_else(|| format!("{text:?}: expected a node's PeerId (12D3KooW…) or a public key (ed25519: and 64 hex digits)"))
}
