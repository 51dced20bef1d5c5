//! Issuing a rollout, rollback or abort from this machine, and following
//! one to its end: the command signed here and handed to the local node,
//! then the site's progress drawn until it is done, halted or the wait ends.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use lanup_node::control::ControlRequest;
use lanup_node::keys;
use lanup_protocol::sign::PublicKey;

use crate::commands::{short_id, ChangeArgs, LocalNode};

/// A command as sent: its id and the key that signed it.
pub(crate) struct Sent {
    pub(crate) id: String,
    pub(crate) key: PublicKey,
    pub(crate) rollout: serde_json::Value,
    /// The node's answer when the change waits for approvals.
    pub(crate) waiting: Option<serde_json::Value>,
}

/// A new command's id: 128 random bits from the OS (as for a key), in hex.
pub(crate) fn new_id() -> String {
    hex::encode(
        &lanup_protocol::sign::SecretKey::generate()
            .public()
            .to_bytes()[..16],
    )
}

/// Signs a rollout command here and hands it to the local node, which
/// checks it like any other and gossips it to the site.
pub(crate) fn issue(
    node: &LocalNode,
    key: &Path,
    action: lanup_protocol::rollout::Action,
    waves: Vec<lanup_protocol::rollout::WaveSize>,
    change: &ChangeArgs,
) -> Result<Sent> {
    use lanup_protocol::rollout::{sign, Action, Command as RolloutCommand};
    let key = keys::load_secret(key)?;
    let status = node.ask(ControlRequest::Status)?;
    let site = status["site"].as_str().unwrap_or("default").to_owned();
    let nodes: Vec<String> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["peer_id"].as_str().map(str::to_owned))
        .collect();
    let abort = matches!(action, Action::Abort | Action::Reject { .. });
    // The nodes' redundancy groups, so every node orders the waves alike.
    let groups = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let member = lanup_protocol::group::Member {
                group: n["group"].as_str()?.to_owned(),
                role: n["role"].as_str().map(str::to_owned),
                priority: n["priority"].as_i64().unwrap_or(0) as i32,
            };
            Some((n["peer_id"].as_str()?.to_owned(), member))
        })
        .collect();
    let command = RolloutCommand {
        site,
        action,
        // Stamped by the site's clock (this machine's, corrected by the
        // skew its node measured to the others), so a machine whose clock
        // is off still issues a command the site takes as fresh.
        issued_at_ms: lanup_node::node::now_unix_ms()
            .saturating_add_signed(status["site_clock_offset_ms"].as_i64().unwrap_or(0)),
        id: new_id(),
        waves,
        nodes: if abort { Vec::new() } else { nodes },
        fleet: None,
        valid_for_ms: None,
        reason: change.reason.clone(),
        now: change.now,
        groups: if abort { Default::default() } else { groups },
    };
    let signed = sign(&command, &key);
    let answer = node.ask(ControlRequest::Rollout { signed })?;
    if let Some(e) = answer["error"].as_str() {
        bail!("{e}");
    }
    let waiting = (answer["waiting"] == true).then(|| {
        answer["requests"]["pending"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == command.id.as_str())
            .cloned()
            .unwrap_or_default()
    });
    Ok(Sent {
        id: command.id,
        key: key.public(),
        rollout: answer["rollout"].clone(),
        waiting,
    })
}

/// How following a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Followed {
    /// Every node runs the release.
    Done,
    /// A node failed, or an admin aborted it.
    Halted,
    /// The wait ran out; the rollout goes on.
    TimedOut,
}

pub(crate) fn follow_exit(followed: Followed) -> Result<ExitCode> {
    Ok(match followed {
        Followed::Done => ExitCode::SUCCESS,
        Followed::Halted => ExitCode::from(1),
        Followed::TimedOut => ExitCode::from(2),
    })
}

/// Draws the site's progress until the rollout (or rollback) the local
/// node follows is done or halted, or `timeout` passes; then it names the
/// nodes that are not there yet, with what they are doing and their last
/// error, so a wait never ends (or hangs) without saying why.
pub(crate) fn follow(
    node: &LocalNode,
    timeout: std::time::Duration,
    id: Option<&str>,
) -> Result<Followed> {
    let mut bars = RolloutBars::default();
    let mut last_stage = String::new();
    let deadline = std::time::Instant::now() + timeout;
    // A node that installs a new lanup is away for a few seconds.
    const AWAY: std::time::Duration = std::time::Duration::from_secs(90);
    let mut answered = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let status = match node.ask(ControlRequest::Status) {
            Ok(status) => {
                answered = std::time::Instant::now();
                status
            }
            Err(e) if answered.elapsed() < AWAY && std::time::Instant::now() < deadline => {
                tracing::debug!(error = %format!("{e:#}"), "the node does not answer; asking again");
                continue;
            }
            Err(e) => return Err(e),
        };
        if std::time::Instant::now() >= deadline {
            bars.finish();
            say_not_there(&status, timeout);
            return Ok(Followed::TimedOut);
        }
        if let Some(id) = id.filter(|id| status["rollout"]["id"] != *id) {
            match crate::change::waiting_for(&status, id) {
                Some(Err(ended)) => {
                    bars.finish();
                    eprintln!("lanup: {ended}");
                    return Ok(Followed::Halted);
                }
                Some(Ok(line)) if line != last_stage => {
                    bars.println(&line);
                    last_stage = line;
                }
                _ => {}
            }
            continue;
        }
        let r = &status["rollout"];
        bars.update(&status);
        let stage = r["stage"].as_str().unwrap_or("?").to_owned();
        if stage != last_stage {
            bars.println(&format!(
                "{}: {stage}",
                r["action"].as_str().unwrap_or("rollout")
            ));
            last_stage = stage;
        }
        match r["stage"].as_str() {
            Some("done") => {
                bars.finish();
                println!(
                    "done: every node runs {}",
                    r["version"].as_str().unwrap_or("?")
                );
                return Ok(Followed::Done);
            }
            Some("halted") => {
                bars.finish();
                eprintln!(
                    "lanup: {} halted by {}: {}",
                    r["action"].as_str().unwrap_or("rollout"),
                    r["halted_by"].as_str().unwrap_or("?"),
                    r["reason"].as_str().unwrap_or("?")
                );
                return Ok(Followed::Halted);
            }
            _ => {}
        }
    }
}

/// Names the nodes not on the rollout's release yet, with what they are
/// doing and their last error, once a wait gave up.
fn say_not_there(status: &serde_json::Value, timeout: std::time::Duration) {
    let version = status["rollout"]["version"].as_str().unwrap_or("?");
    eprintln!(
        "lanup: gave up waiting after {} at {}; the {} goes on. Nodes not on {version}:",
        humantime::format_duration(timeout),
        status["rollout"]["stage"].as_str().unwrap_or("?"),
        status["rollout"]["action"].as_str().unwrap_or("rollout"),
    );
    for n in status["nodes"].as_array().into_iter().flatten() {
        if runs(status, n) {
            continue;
        }
        eprintln!(
            "  {}  {}  {}",
            short_id(n["peer_id"].as_str().unwrap_or("?")),
            n["state"].as_str().unwrap_or("?"),
            n["last_error"].as_str().unwrap_or("no error reported"),
        );
    }
}

/// Whether node `n` of a status answer runs the release its rollout
/// installs (its application's, or for a lanup release its lanup's).
fn runs(status: &serde_json::Value, n: &serde_json::Value) -> bool {
    let r = &status["rollout"];
    let field = if r["lanup"] == true {
        "lanup_version"
    } else {
        "installed_version"
    };
    r["version"].is_string() && n[field] == r["version"]
}

/// One progress bar per node while a rollout runs: the release's bytes as
/// they arrive, then the apply's steps. On a terminal only; elsewhere each
/// node's changes are printed as lines.
#[derive(Default)]
pub(crate) struct RolloutBars {
    multi: Option<indicatif::MultiProgress>,
    bars: std::collections::BTreeMap<String, indicatif::ProgressBar>,
    said: std::collections::BTreeMap<String, String>,
}

impl RolloutBars {
    fn println(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => println!("{line}"),
        }
    }

    /// Leaves the bars drawn as they are.
    pub(crate) fn finish(&self) {
        for bar in self.bars.values() {
            bar.abandon();
        }
    }

    pub(crate) fn update(&mut self, status: &serde_json::Value) {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let version = status["rollout"]["version"].as_str().unwrap_or("");
        for n in status["nodes"].as_array().into_iter().flatten() {
            let id = n["peer_id"].as_str().unwrap_or("?").to_owned();
            let short = short_id(&id);
            let what = if runs(status, n) {
                format!("installed {version}")
            } else if let Some(step) = n["apply_step"].as_str() {
                format!("applying: {step}")
            } else if let Some(why) = n["waiting"].as_str() {
                format!("waits: {why}")
            } else if n["failed_version"] == version || n["state"] == "rolled-back" {
                format!("rolled back: {}", n["last_error"].as_str().unwrap_or("?"))
            } else {
                n["state"].as_str().unwrap_or("?").to_owned()
            };
            if !terminal {
                if self.said.get(&id) != Some(&what) {
                    println!("  {short}  {what}");
                    self.said.insert(id, what);
                }
                continue;
            }
            let multi = self.multi.get_or_insert_with(indicatif::MultiProgress::new);
            let bar = self.bars.entry(id).or_insert_with(|| {
                let bar = multi.add(indicatif::ProgressBar::new(1));
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "  {prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}",
                ) {
                    bar.set_style(style);
                }
                bar.set_prefix(short);
                bar
            });
            bar.set_length(n["bytes_total"].as_u64().unwrap_or(0).max(1));
            bar.set_position(n["bytes_have"].as_u64().unwrap_or(0));
            bar.set_message(what);
        }
    }
}
