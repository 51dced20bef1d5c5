//! `lanup history --change ID`: one change from request to result, put
//! together from the audit logs of the site's nodes (the local node asks
//! its peers), as text, JSON, or a Markdown report.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Result};
use lanup_node::audit::Entry;
use lanup_node::control::ControlRequest;

use crate::commands::{short_id, LocalNode};

/// The events about the command itself: each node records them, the
/// record shows each once.
const COMMAND_EVENTS: [&str; 7] = [
    "requested",
    "expired",
    "approved",
    "approval-refused",
    "rejected",
    "accepted",
    "refused",
];

fn when(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(lanup_protocol::manifest::format_date)
        .unwrap_or_default()
}

/// A node's name as status shows it, or the text as it is.
fn name(node: &str) -> String {
    if node.starts_with("12D3") {
        short_id(node)
    } else {
        node.to_owned()
    }
}

/// One change's record.
struct Record {
    id: String,
    entries: Vec<Entry>,
    not_answered: Vec<String>,
}

impl Record {
    fn from_answer(answer: &serde_json::Value) -> Result<Record> {
        let entries: Vec<Entry> = serde_json::from_value(answer["entries"].clone())?;
        Ok(Record {
            id: answer["id"].as_str().unwrap_or("?").to_owned(),
            not_answered: answer["not_answered"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect(),
            entries,
        })
    }

    /// The entries a reader needs: the command's own events once each
    /// (the earliest), every node's own steps.
    fn steps(&self) -> Vec<&Entry> {
        let mut seen = BTreeSet::new();
        self.entries
            .iter()
            .filter(|e| {
                !COMMAND_EVENTS.contains(&e.event.as_str())
                    || seen.insert((e.event.clone(), e.key.clone(), e.reason.clone()))
            })
            .collect()
    }

    fn first(&self, event: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.event == event)
    }

    fn what(&self) -> String {
        let e = self
            .entries
            .iter()
            .find(|e| e.action.is_some() && e.event != "rejected");
        match e {
            Some(e) => format!(
                "{}{}",
                e.action.as_deref().unwrap_or("change"),
                e.version
                    .as_deref()
                    .map(|v| format!(" of {v}"))
                    .unwrap_or_default()
            ),
            None => "change".into(),
        }
    }

    /// How the change ended, or where it stands.
    fn outcome(&self) -> String {
        if let Some(e) = self.first("rejected") {
            return format!(
                "rejected by {}: {}",
                e.key.as_deref().unwrap_or("?"),
                e.reason.as_deref().unwrap_or("no reason given")
            );
        }
        if let Some(e) = self.first("halted") {
            return format!(
                "halted by {}: {}",
                name(e.from.as_deref().unwrap_or("?")),
                e.reason.as_deref().unwrap_or("?")
            );
        }
        if self.first("done").is_some() {
            return "done: every node runs it".into();
        }
        if self.first("accepted").is_some() {
            return "under way".into();
        }
        if self.first("expired").is_some() {
            return "expired: not approved within 24 h".into();
        }
        if self.first("requested").is_some() {
            return "waiting for approval".into();
        }
        "nothing recorded".into()
    }

    fn approvers(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.event == "approved")
            .filter_map(|e| e.key.clone())
            .collect();
        keys.dedup();
        let mut seen = BTreeSet::new();
        keys.retain(|k| seen.insert(k.clone()));
        keys
    }

    /// One node's apply in one line: began, how it ended, downtime,
    /// health.
    fn applies(&self) -> Vec<(String, String, String, String)> {
        let mut nodes: Vec<String> = self.entries.iter().filter_map(|e| e.node.clone()).collect();
        let mut seen = BTreeSet::new();
        nodes.retain(|n| seen.insert(n.clone()));
        nodes
            .into_iter()
            .filter_map(|node| {
                let mine = |event: &str| {
                    self.entries
                        .iter()
                        .find(|e| e.node.as_deref() == Some(&node) && e.event == event)
                };
                let began = mine("applying");
                let ended = ["applied", "rolled-back", "apply-failed"]
                    .into_iter()
                    .find_map(mine);
                if began.is_none() && ended.is_none() {
                    return None;
                }
                let result = match ended {
                    Some(e) => match e.event.as_str() {
                        "applied" => format!(
                            "committed {}{}",
                            when(e.at_ms),
                            e.downtime_ms
                                .map(|d| format!(", down {d} ms"))
                                .unwrap_or_default()
                        ),
                        other => format!("{other} {}", when(e.at_ms)),
                    },
                    None => "under way".into(),
                };
                let health = ended
                    .and_then(|e| e.reason.clone())
                    .unwrap_or_else(|| "-".into());
                Some((
                    name(&node),
                    began.map_or("-".into(), |e| when(e.at_ms)),
                    result,
                    health,
                ))
            })
            .collect()
    }

    fn detail(e: &Entry) -> String {
        let mut parts = Vec::new();
        if let Some(k) = &e.key {
            parts.push(format!("by {k}"));
        }
        if let Some(r) = &e.reason {
            parts.push(r.clone());
        }
        if let Some(d) = e.downtime_ms {
            parts.push(format!("down {d} ms"));
        }
        if let (Some(f), true) = (&e.from, e.event == "halted") {
            parts.push(format!("failed on {}", name(f)));
        }
        parts.join("; ")
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "change {}: {}", self.id, self.what());
        for e in self.steps() {
            let _ = writeln!(
                out,
                "{}  {:<13} {:<16} {}",
                when(e.at_ms),
                name(e.node.as_deref().unwrap_or("-")),
                e.event,
                Record::detail(e)
            );
        }
        let _ = writeln!(out, "outcome: {}", self.outcome());
        for n in &self.not_answered {
            let _ = writeln!(out, "not answered: {} (its entries are missing)", name(n));
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Change {}: {}\n", self.id, self.what());
        let requested = self.first("requested").or(self.first("accepted"));
        if let Some(r) = requested {
            let _ = writeln!(
                out,
                "- **Requested** {} by `{}`",
                when(r.issued_at_ms.unwrap_or(r.at_ms)),
                r.key.as_deref().unwrap_or("?")
            );
            if let Some(why) = self.first("requested").and_then(|r| r.reason.as_deref()) {
                let _ = writeln!(out, "- **Reason:** {}", cell(why));
            }
        }
        let approvers = self.approvers();
        if !approvers.is_empty() {
            let _ = writeln!(
                out,
                "- **Approved** by {}",
                approvers
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(a) = self.first("accepted") {
            let _ = writeln!(
                out,
                "- **Started** {}{}",
                when(a.at_ms),
                a.reason
                    .as_deref()
                    .map(|r| format!(" ({})", cell(r)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(out, "- **Outcome:** {}\n", cell(&self.outcome()));
        self.markdown_applies(&mut out);
        let _ = writeln!(out, "## Every step\n");
        let _ = writeln!(out, "| Time | Node | Step | Details |");
        let _ = writeln!(out, "|---|---|---|---|");
        for e in self.steps() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                when(e.at_ms),
                cell(&name(e.node.as_deref().unwrap_or("-"))),
                e.event,
                cell(&Record::detail(e))
            );
        }
        if !self.not_answered.is_empty() {
            let _ = writeln!(
                out,
                "\nNot answered (their entries are missing): {}",
                self.not_answered
                    .iter()
                    .map(|n| name(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out
    }

    /// The table of each node's apply, if any applied.
    fn markdown_applies(&self, out: &mut String) {
        let applies = self.applies();
        if applies.is_empty() {
            return;
        }
        let _ = writeln!(out, "## Each node's apply\n");
        let _ = writeln!(out, "| Node | Began | Result | Health |");
        let _ = writeln!(out, "|---|---|---|---|");
        for (node, began, result, health) in applies {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                cell(&node),
                cell(&began),
                cell(&result),
                cell(&health)
            );
        }
        let _ = writeln!(out);
    }
}

/// `lanup history --change ID`.
pub(crate) fn show(node: &LocalNode, id: &str, json: bool, markdown: bool) -> Result<ExitCode> {
    let answer = node.ask(ControlRequest::History {
        change: id.to_owned(),
    })?;
    if let Some(e) = answer["error"].as_str() {
        bail!("{e}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    let record = Record::from_answer(&answer)?;
    if record.entries.is_empty() {
        bail!("no node of the site recorded a change {id}");
    }
    print!(
        "{}",
        if markdown {
            record.markdown()
        } else {
            record.text()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Text made safe for a Markdown table's cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}
