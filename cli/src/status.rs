//! `lanup status` as a table: the site's head line (members, rollout),
//! waiting requests, clocks that disagree, and a row per node. A site of
//! more than [`ROWS`] nodes is summarised: how many nodes are in each
//! state, then the rows an operator must see (this node, the fetcher,
//! nodes with an error, nodes not heard lately, nodes not where most of
//! the site is), and how many more there are; `--all` lists every node,
//! `--json` gives them all.

use lanup_protocol::short_peer as short_id;
use lanup_protocol::units::format_bytes;

/// Rows shown before a site is summarised.
const ROWS: usize = 40;

/// A node not heard for this long is shown even in a summary.
const STALE_MS: u64 = 60_000;

/// Prints the status answer `answer`, every row when `all`.
pub(crate) fn print(answer: &serde_json::Value, all: bool) {
    let nodes = answer["nodes"].as_array().cloned().unwrap_or_default();
    println!("{}", head(answer, nodes.len()));
    crate::change::print_requests(answer);
    print_clocks(&nodes);
    if all || nodes.len() <= ROWS {
        print_rows(nodes.iter());
    } else {
        print_summary(&nodes);
    }
    println!("● this node   * the site's fetcher (the one node that talks to the origin)");
    crate::change::print_groups_and_waits(&nodes);
}

/// The head line: the site, its size, members only, the rollout.
fn head(answer: &serde_json::Value, count: usize) -> String {
    let mut head = format!(
        "site {}: {count} node{}",
        answer["site"].as_str().unwrap_or("?"),
        if count == 1 { "" } else { "s" }
    );
    let m = &answer["membership"];
    if m["members_only"] == true {
        let strangers = m["strangers"].as_array().map_or(0, Vec::len);
        head.push_str(" (members only");
        if m["enrolled"] != true {
            head.push_str("; this node is not enrolled");
        }
        if strangers > 0 {
            head.push_str(&format!("; {strangers} stranger(s) refused"));
        }
        head.push(')');
    }
    let r = &answer["rollout"];
    if let Some(version) = r["version"].as_str() {
        let what = match r["action"].as_str() {
            Some("rollback") => "rollback to",
            _ => "rollout of",
        };
        head.push_str(&format!(
            "; {what} {version}: {}",
            r["stage"].as_str().unwrap_or("?")
        ));
        if let Some(node) = r["halted_by"].as_str() {
            let by = if node.starts_with("12D3") {
                short_id(node)
            } else {
                node.to_owned()
            };
            head.push_str(&format!(
                " by {by}: {}",
                r["reason"].as_str().unwrap_or("no reason given")
            ));
        }
    }
    head
}

/// Clocks that disagree by more than a minute: freshness of commands is
/// judged by the site's clock, but an operator should fix them.
fn print_clocks(nodes: &[serde_json::Value]) {
    for n in nodes {
        let skew = n["clock_skew_ms"].as_i64().unwrap_or(0);
        if skew.unsigned_abs() > 60_000 {
            println!(
                "clock: {}'s clock is {} {} this node's",
                short_id(n["peer_id"].as_str().unwrap_or("?")),
                humantime::format_duration(std::time::Duration::from_secs(
                    skew.unsigned_abs() / 1000
                )),
                if skew > 0 { "ahead of" } else { "behind" }
            );
        }
    }
}

/// How many nodes do what, most first; then the rows that stand out, at
/// most [`ROWS`] of them, and how many are left out.
fn print_summary(nodes: &[serde_json::Value]) {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for n in nodes {
        let doing = summary_state(n);
        match counts.iter_mut().find(|(d, _)| *d == doing) {
            Some((_, c)) => *c += 1,
            None => counts.push((doing, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let most = counts.first().map(|(d, _)| d.clone()).unwrap_or_default();
    println!(
        "{}",
        counts
            .iter()
            .map(|(d, c)| format!("{c} {d}"))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    let stands_out = |n: &&serde_json::Value| {
        n["self"] == true
            || n["fetcher"] == true
            || n["last_error"].is_string()
            || n["last_seen_ms"].as_u64().is_some_and(|ms| ms >= STALE_MS)
            || summary_state(n) != most
    };
    let shown: Vec<&serde_json::Value> = nodes.iter().filter(stands_out).take(ROWS).collect();
    print_rows(shown.iter().copied());
    let left = nodes.len() - shown.len();
    if left > 0 {
        println!(
            "… and {left} more node{} {most} (lanup status --all lists every node; --json gives them all)",
            if left == 1 { "" } else { "s" }
        );
    }
}

/// What a node does, as the summary counts it: its state and the release
/// it is at, without progress or steps.
fn summary_state(n: &serde_json::Value) -> String {
    let state = n["state"].as_str().unwrap_or("?");
    match (
        state,
        n["release"].as_str(),
        n["installed_version"].as_str(),
    ) {
        ("installed", _, Some(v)) => format!("installed {v}"),
        (_, Some(r), _) => format!("{state} {r}"),
        _ => state.to_owned(),
    }
}

fn print_rows<'a>(nodes: impl Iterator<Item = &'a serde_json::Value>) {
    println!(
        "{:<13} {:<10} {:<8} {:<24} {:<18} {:>11} {:>10}  LAST ERROR",
        "NODE", "VERSION", "LANUP", "STATE", "PROGRESS", "FROM ORIGIN", "LAST SEEN"
    );
    for n in nodes {
        println!("{}", row(n));
    }
}

fn row(n: &serde_json::Value) -> String {
    let mut id = short_id(n["peer_id"].as_str().unwrap_or("?"));
    if n["fetcher"] == true {
        id.push_str(" *");
    }
    if n["self"] == true {
        id.push_str(" ●");
    }
    let have = n["bytes_have"].as_u64().unwrap_or(0);
    let total = n["bytes_total"].as_u64().unwrap_or(0);
    let progress = if total == 0 || (have == total && n["state"] != "fetching") {
        "-".to_owned()
    } else {
        format!(
            "{:.0}% of {}",
            have as f64 * 100.0 / total as f64,
            format_bytes(total)
        )
    };
    let seen = match n["last_seen_ms"].as_u64() {
        _ if n["self"] == true => "-".to_owned(),
        Some(ms) => format!("{:.1} s ago", ms as f64 / 1000.0),
        None => "never".to_owned(),
    };
    let error = n["last_error"]
        .as_str()
        .map_or("-".to_owned(), |e| format!("last apply failed: {e}"));
    format!(
        "{:<13} {:<10} {:<8} {:<24} {:<18} {:>11} {:>10}  {}",
        id,
        n["installed_version"].as_str().unwrap_or("-"),
        n["lanup_version"].as_str().unwrap_or("?"),
        node_doing(n),
        progress,
        format_bytes(n["origin_bytes"].as_u64().unwrap_or(0)),
        seen,
        error
    )
}

/// What a node is doing, in a few words: its state, the release it is
/// moving to, and the apply step under way.
fn node_doing(n: &serde_json::Value) -> String {
    let state = n["state"].as_str().unwrap_or("?");
    let release = n["release"].as_str();
    match (state, release) {
        ("applying", Some(r)) => {
            format!("applying {r}: {}", n["apply_step"].as_str().unwrap_or("?"))
        }
        ("fetching" | "staging" | "staged", Some(r)) => format!("{state} {r}"),
        _ => state.to_owned(),
    }
}
