//! The node's configuration: a TOML file (see `lanup.sample.toml`) with
//! command-line flags that override it, resolved and checked in one place so
//! that a mistake is reported with the file, the key and the reason before
//! the node starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lanup_protocol::sign::PublicKey;
use lanup_protocol::units::Rate;
use libp2p::Multiaddr;
use serde::Deserialize;

/// Where a node keeps its identity, chunk store, staging area and control
/// socket when nothing else is said (`/var/lib/lanup`; on Windows
/// `C:\ProgramData\lanup`).
pub const DEFAULT_STATE: &str = crate::platform::DEFAULT_STATE;
/// The configuration `lanup node` reads when given no `--config`, as the
/// package installs it (`/etc/lanup/lanup.toml`; on Windows
/// `C:\ProgramData\lanup\lanup.toml`).
pub const DEFAULT_CONFIG: &str = crate::platform::DEFAULT_CONFIG;
/// The port nodes listen on by default, so static peer lists can name it.
pub const DEFAULT_PORT: u16 = 4710;

/// The TOML file as written. Unknown keys are an error: a misspelt key
/// silently ignored is a node that does not do what its operator thinks.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub state: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub peers: Option<Vec<String>>,
    pub origin: Option<String>,
    pub trust_publisher: Option<Vec<String>>,
    /// Admin keys whose signed rollout commands this node obeys.
    pub trust_admin: Option<Vec<String>>,
    pub site: Option<String>,
    pub psk: Option<PathBuf>,
    pub wan_rate: Option<String>,
    pub lan_rate: Option<String>,
    pub poll_interval: Option<String>,
    /// No byte from the origin for this long and a request is resumed
    /// (default 60s). Never a limit on a whole transfer.
    pub origin_stall_timeout: Option<String>,
    /// Find peers by mDNS on the LAN (default true).
    pub mdns: Option<bool>,
    /// How long a new lanup has to come up and hear the site again before
    /// the old one is put back (default 60s).
    pub self_update_timeout: Option<String>,
    /// Headquarters' `lanup origin --reports` URL: the site's fetcher
    /// posts a signed report of the site there.
    pub report_to: Option<String>,
    /// A report is sent at least this often, news or not (default 1h).
    pub report_interval: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
    pub metrics_listen: Option<String>,
    /// A PEM file of certificate authorities the origin and headquarters
    /// are checked against, beside the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// The HTTP proxy to the origin and headquarters (default: the
    /// environment's HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY).
    pub proxy: Option<String>,
    /// From when only enrolled members of the site are admitted: "now",
    /// or an RFC 3339 date that gives an existing site time to enroll.
    pub members_only_from: Option<String>,
    /// Distinct trusted admin keys a rollout or rollback needs (default 1).
    pub admin_threshold: Option<usize>,
    /// The same for an abort (default 1: one key may always stop a
    /// rollout).
    pub abort_threshold: Option<usize>,
    /// This node's redundancy group, its role in it (`standby` or
    /// `active`) and priority (lower first).
    pub group: Option<String>,
    pub role: Option<String>,
    pub priority: Option<i32>,
    /// Run before an active member stops its application (default timeout
    /// 60s).
    pub switchover_command: Option<Vec<String>>,
    pub switchover_timeout: Option<String>,
    /// When this node may apply, local time: `["Sat 22:00-Sun 04:00"]`.
    pub apply_window: Option<Vec<String>>,
    /// The uplink's rate by time of day:
    /// `[{ hours = "Mon-Fri 08:00-18:00", rate = "256kbit" }]`.
    pub wan_schedule: Option<Vec<crate::policy::ScheduleFile>>,
    /// The application this node installs and restarts.
    pub app: Option<AppFile>,
}

/// The `[app]` table as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    pub name: Option<String>,
    pub install_dir: Option<PathBuf>,
    pub start: Option<Vec<String>>,
    pub stop_timeout: Option<String>,
    pub health_after: Option<String>,
    pub health_command: Option<Vec<String>>,
    pub health_timeout: Option<String>,
    pub apply: Option<String>,
    pub pid_file: Option<PathBuf>,
    pub service: Option<String>,
}

/// When a staged release is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyPolicy {
    /// When an administrator asks (`lanup apply`, or a rollout).
    OnRollout,
    /// As soon as it is staged, when the manifest's RestartApp allows: the
    /// classic updater's behaviour.
    Auto,
}

/// The application a node installs and restarts, resolved.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The process name to look for; the manifest's AppName when not set.
    pub name: Option<String>,
    /// Absolute: a daemon has no meaningful working directory.
    pub install_dir: PathBuf,
    /// The command that starts the application; relative program paths
    /// resolve inside `install_dir`. When not set, the manifest's
    /// `AppName@Exe` (or `AppName@Name`) inside `install_dir`.
    pub start: Option<Vec<String>>,
    /// How long a polite SIGTERM gets before SIGKILL.
    pub stop_timeout: Duration,
    /// The new process must still be alive this long after its start.
    pub health_after: Duration,
    /// Run after `health_after` in `install_dir`; exit 0 means healthy.
    pub health_command: Option<Vec<String>>,
    /// How long `health_command` may run before it counts as a failure.
    pub health_timeout: Duration,
    pub apply: ApplyPolicy,
    /// The file a forking application (a launcher, a daemon) writes its
    /// main process's pid to; relative paths resolve inside `install_dir`.
    /// That process, not the launcher, is the one judged and stopped.
    pub pid_file: Option<PathBuf>,
    /// The service the application is (a systemd unit, a Windows service
    /// name): stopped, started and judged through its service manager.
    pub service: Option<String>,
}

/// Values given on the command line; each one that is set replaces the
/// file's.
pub type Overrides = ConfigFile;

/// The resolved configuration a node runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub state: PathBuf,
    pub listen: Vec<Multiaddr>,
    /// Static peers, for networks that drop multicast.
    pub peers: Vec<Multiaddr>,
    /// Base URL of a published release directory; without it the node never
    /// contacts an origin.
    pub origin: Option<String>,
    pub trust_publisher: Vec<PublicKey>,
    pub trust_admin: Vec<PublicKey>,
    /// Namespaces the gossip topics so two sites on one LAN do not mix.
    pub site: String,
    /// A private swarm's pre-shared key file (TCP only).
    pub psk: Option<PathBuf>,
    pub wan_rate: Option<Rate>,
    pub lan_rate: Option<Rate>,
    pub poll_interval: Duration,
    /// How long the origin may send nothing before a request is resumed.
    pub origin_stall: Duration,
    /// mDNS discovery on every non-loopback interface.
    pub mdns: bool,
    /// How long a new lanup has to prove itself.
    pub self_update_timeout: Duration,
    /// Where the site's fetcher posts the site's reports (the report path
    /// under headquarters' origin URL).
    pub report_to: Option<String>,
    pub report_interval: Duration,
    /// Where the node serves its Prometheus metrics, if anywhere.
    pub metrics_listen: Option<String>,
    /// Whom the origin's and headquarters' certificates may be signed by,
    /// and the proxy to them.
    pub http: crate::http::Settings,
    /// From when (Unix seconds) only members of the site are admitted.
    pub members_only_from: Option<u64>,
    /// Approvals, redundancy group, apply windows, uplink schedule.
    pub policy: crate::policy::Policy,
    pub app: Option<AppConfig>,
}

impl NodeConfig {
    /// Reads `file` when given, applies `overrides`, and checks the result.
    pub fn resolve(file: Option<&Path>, overrides: Overrides) -> Result<NodeConfig> {
        let (raw, origin_of) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?;
                let raw: ConfigFile =
                    toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
                (raw, format!("config {}", path.display()))
            }
            None => (ConfigFile::default(), "flags".to_owned()),
        };
        let merged = merge(raw, overrides);
        resolve(merged).with_context(|| origin_of)
    }
}

fn merge(file: ConfigFile, flags: Overrides) -> ConfigFile {
    fn list(flag: Option<Vec<String>>, file: Option<Vec<String>>) -> Option<Vec<String>> {
        flag.filter(|v| !v.is_empty()).or(file)
    }
    ConfigFile {
        state: flags.state.or(file.state),
        listen: list(flags.listen, file.listen),
        peers: list(flags.peers, file.peers),
        origin: flags.origin.or(file.origin),
        trust_publisher: list(flags.trust_publisher, file.trust_publisher),
        trust_admin: list(flags.trust_admin, file.trust_admin),
        site: flags.site.or(file.site),
        psk: flags.psk.or(file.psk),
        wan_rate: flags.wan_rate.or(file.wan_rate),
        lan_rate: flags.lan_rate.or(file.lan_rate),
        poll_interval: flags.poll_interval.or(file.poll_interval),
        origin_stall_timeout: flags.origin_stall_timeout.or(file.origin_stall_timeout),
        mdns: flags.mdns.or(file.mdns),
        self_update_timeout: flags.self_update_timeout.or(file.self_update_timeout),
        report_to: flags.report_to.or(file.report_to),
        report_interval: flags.report_interval.or(file.report_interval),
        metrics_listen: flags.metrics_listen.or(file.metrics_listen),
        ca_file: flags.ca_file.or(file.ca_file),
        proxy: flags.proxy.or(file.proxy),
        members_only_from: flags.members_only_from.or(file.members_only_from),
        admin_threshold: flags.admin_threshold.or(file.admin_threshold),
        abort_threshold: flags.abort_threshold.or(file.abort_threshold),
        group: flags.group.or(file.group),
        role: flags.role.or(file.role),
        priority: flags.priority.or(file.priority),
        switchover_command: flags.switchover_command.or(file.switchover_command),
        switchover_timeout: flags.switchover_timeout.or(file.switchover_timeout),
        apply_window: list(flags.apply_window, file.apply_window),
        wan_schedule: flags.wan_schedule.or(file.wan_schedule),
        app: flags.app.or(file.app),
    }
}

fn multiaddrs(key: &str, values: Vec<String>) -> Result<Vec<Multiaddr>> {
    values
        .into_iter()
        .map(|v| {
            v.parse::<Multiaddr>().with_context(|| {
                format!("{key} {v:?}: not a multiaddr (e.g. /ip4/10.0.0.5/tcp/{DEFAULT_PORT})")
            })
        })
        .collect()
}

fn rate(key: &str, value: Option<String>) -> Result<Option<Rate>> {
    value
        .map(|v| v.parse::<Rate>().with_context(|| key.to_owned()))
        .transpose()
}

fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v)
            .with_context(|| format!("{key} {v:?}: expected a duration like 10s or 500ms")),
    }
}

fn command(key: &str, value: Option<Vec<String>>) -> Result<Option<Vec<String>>> {
    match value {
        Some(v) if v.first().is_none_or(|p| p.is_empty()) => {
            bail!("{key}: expected a program and its arguments, e.g. [\"bin/app\", \"--serve\"]")
        }
        v => Ok(v),
    }
}

fn resolve_app(a: AppFile) -> Result<AppConfig> {
    let install_dir = a
        .install_dir
        .context("app.install_dir: required (the folder the application is installed in)")?;
    if !install_dir.is_absolute() {
        bail!(
            "app.install_dir {:?}: must be an absolute path",
            install_dir.display()
        );
    }
    let apply = match a.apply.as_deref() {
        None | Some("on-rollout") => ApplyPolicy::OnRollout,
        Some("auto") => ApplyPolicy::Auto,
        Some(other) => bail!("app.apply {other:?}: expected \"on-rollout\" or \"auto\""),
    };
    let pid_file = a.pid_file.map(|p| install_dir.join(p));
    let service = a.service.filter(|s| !s.is_empty());
    if service.is_some() && (a.start.is_some() || pid_file.is_some()) {
        bail!("app.service: its service manager starts the application; app.start and app.pid_file do not go with it");
    }
    Ok(AppConfig {
        name: a.name.filter(|n| !n.is_empty()),
        install_dir,
        start: command("app.start", a.start)?,
        stop_timeout: duration("app.stop_timeout", a.stop_timeout, Duration::from_secs(10))?,
        health_after: duration("app.health_after", a.health_after, Duration::from_secs(3))?,
        health_command: command("app.health_command", a.health_command)?,
        health_timeout: duration(
            "app.health_timeout",
            a.health_timeout,
            Duration::from_secs(30),
        )?,
        apply,
        pid_file,
        service,
    })
}

/// Public keys named in the configuration's `what`.
fn keys(what: &str, keys: Option<&[String]>) -> Result<Vec<PublicKey>> {
    keys.unwrap_or_default()
        .iter()
        .map(|k| k.parse::<PublicKey>().context(what.to_owned()))
        .collect()
}

/// When only members are admitted: now (0), from a date, or never.
fn members_only_from(date: Option<&str>) -> Result<Option<u64>> {
    Ok(match date {
        None => None,
        Some("now") => Some(0),
        Some(date) => Some(
            humantime::parse_rfc3339(date)
                .map_err(|e| anyhow::anyhow!("members_only_from {date:?}: expected \"now\" or a date like 2027-01-15T00:00:00Z ({e})"))?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
    })
}

/// What the node reaches over the network can be reached: its
/// authorities and proxy, its origin and headquarters, and a private swarm
/// only over TCP.
fn check_network(c: &ConfigFile, listen: &[Multiaddr], peers: &[Multiaddr]) -> Result<()> {
    crate::http::check(&crate::http::Settings {
        ca_file: c.ca_file.clone(),
        proxy: c.proxy.clone(),
    })?;
    check_urls(c.origin.as_deref(), c.report_to.as_deref())?;
    if c.psk.is_some() {
        check_no_quic(listen.iter().chain(peers))?;
    }
    Ok(())
}

/// The origin and headquarters are reached over HTTP(S).
fn check_urls(origin: Option<&str>, report_to: Option<&str>) -> Result<()> {
    if let Some(origin) = origin {
        if !(origin.starts_with("http://") || origin.starts_with("https://")) {
            bail!("origin {origin:?}: expected an http:// or https:// URL of a release directory");
        }
    }
    if let Some(to) = report_to {
        if !(to.starts_with("http://") || to.starts_with("https://")) {
            bail!("report_to {to:?}: expected the http:// or https:// URL of headquarters' lanup origin");
        }
    }
    Ok(())
}

/// A private swarm (psk) runs over TCP only: QUIC would let peers without
/// the key in.
fn check_no_quic<'a>(mut addrs: impl Iterator<Item = &'a Multiaddr>) -> Result<()> {
    if let Some(quic) = addrs.find(|a| {
        a.iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
    }) {
        bail!("{quic}: a private swarm (psk) runs over TCP only; QUIC would let peers without the key in");
    }
    Ok(())
}

/// The site's name: it names its gossip topics and files.
fn site_name(site: Option<String>) -> Result<String> {
    let site = site.unwrap_or_else(|| "default".into());
    if site.is_empty()
        || !site
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        bail!("site {site:?}: use letters, digits, '-', '_' or '.'");
    }
    Ok(site)
}

fn resolve(c: ConfigFile) -> Result<NodeConfig> {
    let listen = multiaddrs(
        "listen",
        c.listen
            .clone()
            .unwrap_or_else(|| vec![format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}")]),
    )?;
    let peers = multiaddrs("peers", c.peers.clone().unwrap_or_default())?;
    let trust_publisher = keys("trust_publisher", c.trust_publisher.as_deref())?;
    let trust_admin = keys("trust_admin", c.trust_admin.as_deref())?;
    if trust_publisher.is_empty() {
        bail!("no trusted publisher key: set trust_publisher (or --trust-publisher KEY); a node accepts only releases signed by a key it trusts");
    }
    let members_only_from = members_only_from(c.members_only_from.as_deref())?;
    if members_only_from.is_some() && trust_admin.is_empty() {
        bail!("members_only_from: membership certificates are signed by admin keys; set trust_admin too");
    }
    check_network(&c, &listen, &peers)?;
    let site = site_name(c.site)?;
    // A release is picked up within about a minute; a conditional poll of
    // the manifest and the fleet rollout file that finds neither changed
    // was 0.9 KB on the wire (tests/bench/poll_cost.sh): 1.3 MB a day,
    // 0.18 % of a 64 kbit/s link.
    let poll_interval = duration("poll_interval", c.poll_interval, Duration::from_secs(60))?;
    let policy = crate::policy::Policy::resolve(
        crate::policy::PolicyFile {
            admin_threshold: c.admin_threshold,
            abort_threshold: c.abort_threshold,
            group: c.group,
            role: c.role,
            priority: c.priority,
            switchover_command: c.switchover_command,
            switchover_timeout: c.switchover_timeout,
            apply_window: c.apply_window,
            wan_schedule: c.wan_schedule,
        },
        trust_admin.len(),
    )?;
    Ok(NodeConfig {
        state: c.state.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE)),
        listen,
        peers,
        origin: c.origin,
        trust_publisher,
        trust_admin,
        site,
        psk: c.psk,
        wan_rate: rate("wan_rate", c.wan_rate)?,
        lan_rate: rate("lan_rate", c.lan_rate)?,
        poll_interval,
        origin_stall: duration(
            "origin_stall_timeout",
            c.origin_stall_timeout,
            Duration::from_secs(60),
        )?,
        mdns: c.mdns.unwrap_or(true),
        self_update_timeout: duration(
            "self_update_timeout",
            c.self_update_timeout,
            Duration::from_secs(60),
        )?,
        report_to: c.report_to.as_deref().map(crate::report::report_url),
        report_interval: duration(
            "report_interval",
            c.report_interval,
            Duration::from_millis(lanup_protocol::report::REFRESH_MS),
        )?,
        metrics_listen: c.metrics_listen,
        http: crate::http::Settings {
            ca_file: c.ca_file,
            proxy: c.proxy,
        },
        members_only_from,
        policy,
        app: c.app.map(resolve_app).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ed25519:d55f9c6ed8104035677cbfed33d8dc2d9c79626c165522c37244bf0e9803fb5d";

    fn sample() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lanup.sample.toml");
        std::fs::read_to_string(path).expect("sample config is in the repo")
    }

    #[test]
    fn the_sample_config_resolves() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("lanup.toml");
        std::fs::write(&path, sample())?;
        let c = NodeConfig::resolve(Some(&path), Overrides::default())?;
        assert_eq!(c.site, "head-office");
        assert_eq!(c.poll_interval, Duration::from_secs(60));
        assert_eq!(c.wan_rate.map(Rate::bytes_per_sec), Some(2_000_000));
        assert!(c.origin.is_some());
        let app = c.app.expect("the sample has an [app] table");
        assert_eq!(app.install_dir, PathBuf::from("/opt/tims"));
        assert_eq!(app.stop_timeout, Duration::from_secs(10));
        assert_eq!(app.health_after, Duration::from_secs(3));
        assert_eq!(app.apply, ApplyPolicy::OnRollout);
        assert_eq!(app.start.as_deref().map(<[String]>::len), Some(2));
        Ok(())
    }

    #[test]
    fn flags_override_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("lanup.toml");
        std::fs::write(&path, sample())?;
        let c = NodeConfig::resolve(
            Some(&path),
            Overrides {
                site: Some("branch-7".into()),
                peers: Some(vec!["/ip4/127.0.0.2/tcp/4710".into()]),
                ..Overrides::default()
            },
        )?;
        assert_eq!(c.site, "branch-7");
        assert_eq!(c.peers.len(), 1);
        Ok(())
    }

    #[test]
    fn mistakes_name_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lanup.toml");
        let cases = [
            (format!("trust_publisher = [\"{KEY}\"]\nlisten = [\"tcp/1\"]"), "listen \"tcp/1\""),
            (format!("trust_publisher = [\"{KEY}\"]\nwan_rate = \"fast\""), "wan_rate"),
            (format!("trust_publisher = [\"{KEY}\"]\npoll_intervall = \"5m\""), "poll_intervall"),
            ("site = \"x\"".to_owned(), "no trusted publisher key"),
            (
                format!("trust_publisher = [\"{KEY}\"]\npsk = \"k\"\nlisten = [\"/ip4/0.0.0.0/udp/1/quic-v1\"]"),
                "TCP only",
            ),
            (format!("trust_publisher = [\"{KEY}\"]\n[app]\ninstall_dir = \"opt/x\""), "absolute"),
            (format!("trust_publisher = [\"{KEY}\"]\n[app]\nname = \"x\""), "app.install_dir"),
            (
                format!("trust_publisher = [\"{KEY}\"]\n[app]\ninstall_dir = \"/opt/x\"\nstop_timeout = \"soon\""),
                "app.stop_timeout",
            ),
            (
                format!("trust_publisher = [\"{KEY}\"]\n[app]\ninstall_dir = \"/opt/x\"\napply = \"now\""),
                "app.apply",
            ),
            (
                format!("trust_publisher = [\"{KEY}\"]\n[app]\ninstall_dir = \"/opt/x\"\nservice = \"tims.service\"\nstart = [\"bin/tims\"]"),
                "app.service",
            ),
            (
                format!("trust_publisher = [\"{KEY}\"]\n[app]\ninstall_dir = \"/opt/x\"\nstart = []"),
                "app.start",
            ),
            (
                format!("trust_publisher = [\"{KEY}\"]\n[app]\ninstall_dir = \"/opt/x\"\nhealth_afterr = \"1s\""),
                "health_afterr",
            ),
        ];
        for (text, expected) in cases {
            std::fs::write(&path, text).expect("write");
            let err = NodeConfig::resolve(Some(&path), Overrides::default()).expect_err(expected);
            let msg = format!("{err:#}");
            assert!(
                msg.contains(expected) && msg.contains("lanup.toml"),
                "{msg}"
            );
        }
    }
}
