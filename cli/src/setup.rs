//! `lanup setup`: a node's configuration in one command, checked against
//! the real origin and the machine before anything is written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lanup_node::config::{NodeConfig, Overrides, DEFAULT_CONFIG};
use lanup_node::release::ManifestSource;
use lanup_protocol::membership::{Certificate, Grant, JoinToken};
use lanup_protocol::sign::PublicKey;

/// Write the node's configuration (by default /etc/lanup/lanup.toml) after
/// checking what can be checked: the origin answers and its release is
/// signed by a trusted publisher key, the install directory exists, the
/// application is running or not. Nothing is written when a check fails,
/// and a different existing configuration is kept unless --force.
#[derive(Debug, clap::Args)]
pub(crate) struct SetupArgs {
    /// Base URL of the published release directory.
    #[arg(long, value_name = "URL")]
    origin: String,
    /// A publisher key whose releases this node accepts (repeatable).
    #[arg(long, value_name = "KEY", required = true)]
    trust_publisher: Vec<PublicKey>,
    /// The site's name: nodes of one site share releases (with --join:
    /// the token's site).
    #[arg(long, value_name = "NAME", required_unless_present = "join")]
    site: Option<String>,
    /// An admin key whose signed rollouts this node obeys (repeatable;
    /// with --join, the token must come from one of them, and without any
    /// the key that issued the token is trusted).
    #[arg(long, value_name = "KEY")]
    trust_admin: Vec<PublicKey>,
    /// Enroll this machine's node as a member of the site with a token
    /// from `lanup enroll`, and admit only members from now on.
    #[arg(long, value_name = "TOKEN")]
    join: Option<String>,
    /// The application's process name.
    #[arg(long, value_name = "NAME", requires = "install_dir")]
    app_name: Option<String>,
    /// The folder the application is installed in (must exist).
    #[arg(long, value_name = "DIR")]
    install_dir: Option<PathBuf>,
    /// Cap on the site's downloads from the origin (e.g. 256kbit).
    #[arg(long, value_name = "RATE")]
    wan_rate: Option<String>,
    /// A PEM file of certificate authorities the origin may be signed by,
    /// beside the system's trust store (a company's own authority).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The HTTP proxy to the origin, e.g. http://proxy:3128 [default:
    /// HTTPS_PROXY/HTTP_PROXY/NO_PROXY from the environment].
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// The node's state directory [default: /var/lib/lanup].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Where to write the configuration.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Replace an existing configuration that differs (kept as FILE.bak).
    #[arg(long)]
    force: bool,
    /// The command that starts the application, relative to --install-dir.
    /// Put it last: every word after --start is part of the command.
    #[arg(long, value_name = "CMD", num_args = 1.., allow_hyphen_values = true, requires = "install_dir")]
    start: Vec<String>,
}

fn quoted(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn list<T: ToString>(values: &[T]) -> String {
    let items: Vec<String> = values.iter().map(|v| quoted(&v.to_string())).collect();
    format!("[{}]", items.join(", "))
}

/// The configuration file's text.
fn render(args: &SetupArgs, install_dir: Option<&Path>) -> String {
    let mut text = String::from(
        "# lanup node configuration, written by `lanup setup`.\n\
         # Every key is explained in lanup.sample.toml; flags of `lanup node`\n\
         # override it.\n",
    );
    text.push_str(&format!(
        "site = {}\n",
        quoted(args.site.as_deref().unwrap_or_default())
    ));
    text.push_str(&format!("origin = {}\n", quoted(&args.origin)));
    text.push_str(&format!(
        "trust_publisher = {}\n",
        list(&args.trust_publisher)
    ));
    if !args.trust_admin.is_empty() {
        text.push_str(&format!("trust_admin = {}\n", list(&args.trust_admin)));
    }
    if args.join.is_some() {
        text.push_str("members_only_from = \"now\"\n");
    }
    if let Some(rate) = &args.wan_rate {
        text.push_str(&format!("wan_rate = {}\n", quoted(rate)));
    }
    if let Some(file) = &args.ca_file {
        text.push_str(&format!(
            "ca_file = {}\n",
            quoted(&file.display().to_string())
        ));
    }
    if let Some(proxy) = &args.proxy {
        text.push_str(&format!("proxy = {}\n", quoted(proxy)));
    }
    if let Some(state) = &args.state {
        text.push_str(&format!(
            "state = {}\n",
            quoted(&state.display().to_string())
        ));
    }
    if let Some(dir) = install_dir {
        text.push_str("\n[app]\n");
        if let Some(name) = &args.app_name {
            text.push_str(&format!("name = {}\n", quoted(name)));
        }
        text.push_str(&format!(
            "install_dir = {}\n",
            quoted(&dir.display().to_string())
        ));
        if !args.start.is_empty() {
            text.push_str(&format!("start = {}\n", list(&args.start)));
        }
    }
    text
}

/// Checks the origin: it answers, and what it publishes is signed by a
/// trusted key. An origin with nothing published yet is fine.
fn check_origin(args: &SetupArgs) -> Result<String> {
    let mut url = args.origin.clone();
    if !url.ends_with('/') {
        url.push('/');
    }
    lanup_node::http::configure(lanup_node::http::Settings {
        ca_file: args.ca_file.clone(),
        proxy: args.proxy.clone(),
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let read = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), ManifestSource::read(&url)).await
    });
    let source = match read {
        Err(_) => bail!("--origin {url}: no answer within 20 s"),
        Ok(Err(e)) if format!("{e:#}").contains("not found") => {
            return Ok(format!(
                "origin {url} answers; nothing is published there yet (nodes take up the first release published)"
            ))
        }
        Ok(Err(e)) => match e.chain().find_map(lanup_node::http::explain) {
            Some(why) => bail!("--origin {url}: {why} ({e:#})"),
            None => bail!("--origin {url}: unreachable or not a release directory: {e:#}"),
        },
        Ok(Ok(source)) => source,
    };
    source
        .signature()
        .and_then(|sig| Ok(source.text.verify(&sig, &args.trust_publisher)?))
        .with_context(|| {
            format!(
                "--origin {url}: its release is not signed by a key given with --trust-publisher"
            )
        })?;
    let manifest = source
        .parse()
        .with_context(|| format!("--origin {url}: its manifest"))?;
    let mut said = format!(
        "origin {url} answers; its release {} is signed by a trusted publisher key",
        manifest.release_name()
    );
    if let (Some(name), Some(published)) = (&args.app_name, &manifest.restart.app_name) {
        if name != published && published != lanup_node::upgrade::LANUP_APP {
            said.push_str(&format!(
                "\nnote: the release names its application {published:?}, not {name:?}"
            ));
        }
    }
    Ok(said)
}

pub(crate) fn run(mut args: SetupArgs) -> Result<ExitCode> {
    let token = match args.join.clone() {
        None => None,
        Some(text) => Some(take_token(&mut args, &text)?),
    };
    // The configuration names the authorities' file absolutely: the node
    // runs from another folder.
    if let Some(file) = &args.ca_file {
        args.ca_file = Some(
            std::path::absolute(file).with_context(|| format!("--ca-file {}", file.display()))?,
        );
    }
    if !args.start.is_empty() && args.start[0].is_empty() {
        bail!("--start: expected a program and its arguments");
    }
    let install_dir = match &args.install_dir {
        None => None,
        Some(dir) => {
            let dir = std::path::absolute(dir)
                .with_context(|| format!("--install-dir {}", dir.display()))?;
            if !dir.is_dir() {
                bail!(
                    "--install-dir {}: no such folder (install the application there first, or create it)",
                    dir.display()
                );
            }
            Some(dir)
        }
    };
    let text = render(&args, install_dir.as_deref());
    // The text is checked as `lanup node` will read it.
    let scratch = tempfile::tempdir()?;
    let draft = scratch.path().join("lanup.toml");
    std::fs::write(&draft, &text)?;
    let config = NodeConfig::resolve(Some(&draft), Overrides::default())
        .map_err(|e| anyhow::anyhow!("{:#}", e).context("the configuration would not be valid"))?;
    let mut notes = vec![check_origin(&args)?];
    if let (Some(app), Some(name)) = (&config.app, &args.app_name) {
        let app = lanup_node::app::App::new(app.clone(), scratch.path().join("app.log"));
        let running = app.processes(Some(name));
        notes.push(if running.is_empty() {
            format!(
                "application {name:?}: not running from {} now; lanup starts it after it installs a release",
                app.config.install_dir.display()
            )
        } else {
            let pids: Vec<u32> = running.iter().map(|p| p.pid).collect();
            format!("application {name:?}: running (pids {pids:?})")
        });
    }
    notes.push(write_config(&args.config, &text, args.force)?);
    if let Some(token) = &token {
        notes.push(enroll_with(token, &config)?);
    }
    for note in notes {
        println!("{note}");
    }
    let path = &args.config;
    let flag = if path == Path::new(DEFAULT_CONFIG) {
        String::new()
    } else {
        format!(
            " (the unit reads {DEFAULT_CONFIG}; this file is {})",
            path.display()
        )
    };
    println!("next, as root{flag}:");
    println!("  systemctl enable --now lanup");
    println!("  systemctl status lanup");
    println!("  lanup status");
    Ok(ExitCode::SUCCESS)
}

/// Reads `--join`'s token: it names the site, and its admin key is
/// trusted (or must be one of the keys given).
fn take_token(args: &mut SetupArgs, text: &str) -> Result<JoinToken> {
    let token = JoinToken::from_text(text).context("--join")?;
    if args
        .site
        .as_deref()
        .is_some_and(|site| site != token.site())
    {
        bail!(
            "--join: the token is for site {:?}, not --site {:?}",
            token.site(),
            args.site.as_deref().unwrap_or_default()
        );
    }
    let now = lanup_node::node::now_unix_ms() / 1000;
    if now > token.until() {
        bail!("--join: the token expired {} s ago; ask the administrator for a new one (lanup enroll)", now - token.until());
    }
    args.site = Some(token.site().to_owned());
    let admin: PublicKey = token.admin().parse().context("--join: its admin key")?;
    // Given admin keys, the token must come from one of them;
    // given none, the token's key is trusted (and named below).
    if args.trust_admin.is_empty() {
        args.trust_admin.push(admin);
    } else if !args.trust_admin.contains(&admin) {
        bail!("--join: the token was issued with admin key {admin}, which is not one of the --trust-admin keys");
    }
    Ok(token)
}

/// Writes the configuration to `path`, keeping what is there unless it
/// says nothing (the package's template) or `force`: what was done.
fn write_config(path: &Path, text: &str, force: bool) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(existing) if existing == *text => {
            Ok(format!("{} already says this; unchanged", path.display()))
        }
        // The package's template: comments only, nothing to lose.
        Ok(existing) if unset(&existing) => {
            write(path, text)?;
            Ok(format!("wrote {} (it held only comments)", path.display()))
        }
        Ok(_) if !force => bail!(
            "{} exists and says something else; nothing written (pass --force to replace it; the old one is kept as {}.bak)",
            path.display(),
            path.display()
        ),
        Ok(existing) => {
            let backup = PathBuf::from(format!("{}.bak", path.display()));
            std::fs::write(&backup, existing)
                .with_context(|| format!("cannot keep the old {}", backup.display()))?;
            write(path, text)?;
            Ok(format!(
                "replaced {} (the old one is {})",
                path.display(),
                backup.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write(path, text)?;
            Ok(format!("wrote {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Enrolls this node with `token`: its membership certificate, written to
/// its state; what was done.
fn enroll_with(token: &JoinToken, config: &NodeConfig) -> Result<String> {
    let key = lanup_node::membership::identity(&config.state)?;
    let now = lanup_node::node::now_unix_ms() / 1000;
    let cert = token.admit(&key.public(), now).context("--join")?;
    lanup_node::membership::save(&config.state, &cert)?;
    Ok(format!(
            "enrolled this node ({}) as a member of site {:?} until {} (certificate in {}); it admits only members, and trusts admin key {}",
            key.public().peer_id(),
            token.site(),
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(now + (cert_lasts(&cert)))),
            lanup_node::membership::certificate_path(&config.state).display(),
            token.admin()
        ))
}

/// Whether a configuration sets nothing: blank lines and comments only, as
/// the package installs it.
fn unset(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#'))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    lanup_node::apply::write_synced(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    lanup_node::platform::set_path_mode(path, 0o644)
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// How long a certificate lasts from its issue, in seconds.
fn cert_lasts(cert: &Certificate) -> u64 {
    serde_json::from_str::<Grant>(&cert.grant.text)
        .map(|g| g.expires.saturating_sub(g.issued))
        .unwrap_or(0)
}

/// `lanup enroll`: a join token for the site.
#[derive(Debug, clap::Args)]
pub(crate) struct EnrollArgs {
    /// The site the token admits machines to.
    #[arg(long, value_name = "NAME")]
    site: String,
    /// The admin's secret key file (`lanup keygen`); nodes of the site
    /// trust its public key (trust_admin).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// How long the token admits machines [default: 1h].
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    valid: String,
    /// How long a membership it gives lasts [default: 365d].
    #[arg(long, value_name = "DURATION", default_value = "365d")]
    lasts: String,
}

pub(crate) fn enroll(args: EnrollArgs) -> Result<ExitCode> {
    let admin = lanup_node::keys::load_secret(&args.key)?;
    let secs = |flag: &str, v: &str| -> Result<u64> {
        Ok(humantime::parse_duration(v)
            .with_context(|| format!("--{flag} {v:?}: expected a duration like 1h or 30d"))?
            .as_secs())
    };
    let (valid, lasts) = (secs("valid", &args.valid)?, secs("lasts", &args.lasts)?);
    if valid == 0 || lasts == 0 {
        bail!("--valid and --lasts must be longer than a second");
    }
    let now = lanup_node::node::now_unix_ms() / 1000;
    let token = JoinToken::new(&admin, &args.site, now, valid, lasts);
    println!("{}", token.to_text());
    eprintln!(
        "a join token for site {:?}, admitting machines until {} (memberships of {}); on each new machine:\n  lanup setup --join TOKEN --origin URL --trust-publisher KEY ...\nrevoking the token's key {} removes every node it admitted",
        args.site,
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(token.until())),
        args.lasts,
        token.key()
    );
    Ok(ExitCode::SUCCESS)
}
