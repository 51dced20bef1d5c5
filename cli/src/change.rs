//! Changes that need more than one admin: `lanup approve` and
//! `lanup reject`, and how a request waiting for approval is told to the
//! admin who made it and to `--wait`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use lanup_node::control::ControlRequest;
use lanup_node::keys;
use lanup_protocol::rollout::{Action, SignedCommand};

use crate::commands::{ChangeArgs, LocalNode};
use crate::rollout::{issue, Sent};

#[derive(Debug, clap::Args)]
pub(crate) struct ApproveArgs {
    /// The change's id, as `lanup status` lists it under "waiting for
    /// approval".
    id: String,
    /// The approving admin's secret key file (it signs here).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[command(flatten)]
    node: LocalNode,
    /// Approve a fleet rollout headquarters holds in --publish-dir.
    #[arg(long, requires = "publish_dir")]
    fleet: bool,
    /// With --fleet: the release folder the origin serves.
    #[arg(long, value_name = "DIR")]
    publish_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RejectArgs {
    /// The change's id.
    id: String,
    /// An admin's secret key file: one trusted key may end a request.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Why it is rejected (kept in the change's record).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[command(flatten)]
    node: LocalNode,
}

/// A request as status lists it, in one line.
fn describe(r: &serde_json::Value) -> String {
    format!(
        "{} {}requested by {}{}",
        r["action"].as_str().unwrap_or("change"),
        r["version"]
            .as_str()
            .map(|v| format!("of {v} "))
            .unwrap_or_default(),
        r["requested_by"].as_str().unwrap_or("?"),
        r["reason"]
            .as_str()
            .map(|why| format!(" ({why})"))
            .unwrap_or_default(),
    )
}

fn count(r: &serde_json::Value) -> (usize, u64) {
    (
        r["approved_by"].as_array().map_or(0, Vec::len),
        r["needed"].as_u64().unwrap_or(1),
    )
}

/// When the change just sent waits for approvals, says so (and how to
/// approve it) and returns true.
pub(crate) fn said_waiting(sent: &Sent, node: &LocalNode) -> bool {
    let Some(r) = &sent.waiting else {
        return false;
    };
    let (have, needed) = count(r);
    println!(
        "{} (id {}): waiting for approval, {have} of {needed} admins have signed",
        describe(r),
        sent.id
    );
    println!(
        "another admin approves it with: lanup approve {} --key FILE --state {}",
        sent.id,
        node.state.display()
    );
    true
}

/// What `--wait` says while change `id` is not yet the rollout the node
/// follows: `Ok(line)` while it waits for approvals, `Err(why)` once it was
/// rejected or expired; `None` when the node knows nothing of it (yet).
pub(crate) fn waiting_for(status: &serde_json::Value, id: &str) -> Option<Result<String, String>> {
    let requests = &status["requests"];
    if let Some(r) = requests["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["id"] == id)
    {
        return Some(Err(format!(
            "change {id} was rejected by {}: {}",
            r["key"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("?")
        )));
    }
    let r = requests["pending"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["id"] == id)?;
    let now = lanup_node::node::now_unix_ms();
    if r["expires_at_ms"].as_u64().is_some_and(|at| at < now) {
        return Some(Err(format!("change {id} expired before it was approved")));
    }
    let (have, needed) = count(r);
    Some(Ok(format!(
        "waiting for approval: {have} of {needed} admins have signed"
    )))
}

/// The request `id` waiting on the local node, with its exact bytes.
fn pending(node: &LocalNode, id: &str) -> Result<(serde_json::Value, SignedCommand)> {
    let status = node.ask(ControlRequest::Status)?;
    if let Some(Err(ended)) = waiting_for(&status, id) {
        bail!("{ended}");
    }
    let list = status["requests"]["pending"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(r) = list.iter().find(|r| r["id"] == id) else {
        let ids: Vec<&str> = list.iter().filter_map(|r| r["id"].as_str()).collect();
        bail!(
            "no change {id} waits for approval on this node (waiting: {})",
            if ids.is_empty() {
                "none".to_owned()
            } else {
                ids.join(", ")
            }
        );
    };
    let signed: SignedCommand = serde_json::from_value(r["signed"].clone())?;
    Ok((r.clone(), signed))
}

pub(crate) fn approve(args: ApproveArgs) -> Result<ExitCode> {
    if let (true, Some(dir)) = (args.fleet, &args.publish_dir) {
        return crate::fleet::approve(&args.id, dir, &args.key);
    }
    let key = keys::load_secret(&args.key)?;
    let (r, request) = pending(&args.node, &args.id)?;
    println!("approving {} (id {})", describe(&r), args.id);
    let signed = SignedCommand {
        approvals: vec![lanup_protocol::approval::approve(&request, &key)],
        ..request
    };
    let answer = args.node.ask(ControlRequest::Rollout { signed })?;
    if let Some(e) = answer["error"].as_str() {
        bail!("approval by {} not counted: {e}", key.public());
    }
    if answer["waiting"] == true {
        let r = answer["requests"]["pending"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == args.id.as_str())
            .cloned()
            .unwrap_or_default();
        let (have, needed) = count(&r);
        println!(
            "approved by {}: {have} of {needed}; it waits for more",
            key.public()
        );
    } else {
        println!("approved by {}: the change starts", key.public());
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn reject(args: RejectArgs) -> Result<ExitCode> {
    let (r, _) = pending(&args.node, &args.id)?;
    let change = ChangeArgs {
        reason: Some(args.reason.clone()),
        now: false,
    };
    let action = Action::Reject {
        request: args.id.clone(),
    };
    let sent = issue(&args.node, &args.key, action, Vec::new(), &change)?;
    println!(
        "rejected {} (id {}) by {}: {}",
        describe(&r),
        args.id,
        sent.key,
        args.reason
    );
    Ok(ExitCode::SUCCESS)
}

/// The changes waiting for approval, and those rejected, for
/// `lanup status`.
pub(crate) fn print_requests(status: &serde_json::Value) {
    for r in status["requests"]["pending"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (have, needed) = count(r);
        println!(
            "waiting for approval: {} (id {}), {have} of {needed} admins have signed{}",
            describe(r),
            r["id"].as_str().unwrap_or("?"),
            r["refused"]
                .as_array()
                .filter(|v| !v.is_empty())
                .map(|v| format!(
                    "; refused: {}",
                    v.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
                .unwrap_or_default()
        );
    }
}

/// The site's redundancy groups (members in the order they update) and
/// what each waiting node waits for, below `lanup status`'s table.
pub(crate) fn print_groups_and_waits(nodes: &[serde_json::Value]) {
    let mut groups: std::collections::BTreeMap<&str, Vec<(u8, i64, String)>> =
        std::collections::BTreeMap::new();
    for n in nodes {
        let Some(group) = n["group"].as_str() else {
            continue;
        };
        let role = n["role"].as_str();
        let rank = match role {
            Some("standby") => 0,
            Some("active") => 2,
            _ => 1,
        };
        let id = crate::commands::short_id(n["peer_id"].as_str().unwrap_or("?"));
        let priority = n["priority"].as_i64().unwrap_or(0);
        let shown = match role {
            Some(role) => format!("{id} ({role})"),
            None => format!("{id} (priority {priority})"),
        };
        groups
            .entry(group)
            .or_default()
            .push((rank, priority, shown));
    }
    for (group, mut members) in groups {
        members.sort();
        let order: Vec<String> = members.into_iter().map(|(_, _, m)| m).collect();
        println!("group {group}: {}", order.join(", then "));
    }
    for n in nodes {
        if let Some(why) = n["waiting"].as_str() {
            println!(
                "{} waits: {why}",
                crate::commands::short_id(n["peer_id"].as_str().unwrap_or("?"))
            );
        }
    }
}
