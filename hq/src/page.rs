//! Headquarters' fleet page: the fleet rollout's waves, then the sites a
//! page at a time, searchable by site name and installed version, or only
//! those with problems. Plain HTML with no script and no external assets,
//! refreshed by itself; at 20,000 sites a page still holds
//! [`ROWS`] of them.

use lanup_protocol::fleet::{FleetFile, FleetState};
use lanup_protocol::report::SiteView;

use crate::{Counts, ViewQuery};

/// Sites on one page.
pub const ROWS: usize = 100;
/// Site names shown per wave before "and N more".
const WAVE_NAMES: usize = 12;

/// Whether the fleet rollout still waits for its admins' approvals, and
/// how many have signed.
fn awaiting(file: &FleetFile) -> Option<(usize, usize)> {
    let plan = file.plan.as_ref()?;
    let have = lanup_protocol::fleet::plan_signers(plan).len();
    (file.state == FleetState::Running && have < file.approvals_needed)
        .then_some((have, file.approvals_needed))
}

/// The fleet page: the fleet rollout's waves with their progress
/// ([`crate::progress`]), then `sites`, the page of them `query` asks
/// for, refreshed by itself every 30 s.
pub fn fleet_page(
    sites: &[SiteView],
    counts: Counts,
    query: &ViewQuery,
    rollout: Option<(&FleetFile, &[(usize, usize)])>,
) -> String {
    let rollout_html = rollout.map_or_else(String::new, |(f, progress)| {
        let state = match &f.state {
            FleetState::Running if awaiting(f).is_some() => {
                let (have, needed) = awaiting(f).unwrap_or_default();
                format!("waiting for approval: {have} of {needed} admins")
            }
            FleetState::Running => "running".to_owned(),
            FleetState::Done => "done".to_owned(),
            FleetState::Halted { site, reason } => format!("halted by {site}: {reason}"),
            FleetState::Aborted { by } => format!("aborted by {by}"),
        };
        let waves = f
            .waves
            .iter()
            .zip(progress.iter().copied())
            .enumerate()
            .map(|(i, (w, (done, of)))| {
                let pct = (done * 100).checked_div(of).unwrap_or(0);
                format!(
                    "<tr><td>wave {}</td><td><div class=bar><div style=\"width:{pct}%\"></div></div></td><td>{done}/{of} sites{}</td><td>{}</td></tr>",
                    i + 1,
                    if i < f.open { "" } else { " (waiting)" },
                    esc(&names(w))
                )
            })
            .collect::<String>();
        format!(
            "<h2>Fleet rollout of {} <span class=state>{}</span></h2>\n<table class=waves>{waves}</table>\n",
            esc(&f.version),
            esc(&state)
        )
    });
    let mut rows = String::new();
    for s in sites {
        let versions = s
            .versions
            .iter()
            .map(|(v, n)| format!("{} × {n}", esc(v)))
            .collect::<Vec<_>>()
            .join("<br>");
        let failed = s
            .failed
            .iter()
            .map(|f| {
                format!(
                    "<b>{}</b>{}: {}",
                    esc(short(&f.node)),
                    f.version
                        .as_ref()
                        .map(|v| format!(" ({})", esc(v)))
                        .unwrap_or_default(),
                    esc(&f.error)
                )
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let rollout = s
            .rollout
            .as_ref()
            .map(|r| format!("{} {}: {}", esc(&r.action), esc(&r.version), esc(&r.stage)))
            .unwrap_or_default();
        let mut new = if s.new_nodes.is_empty() {
            String::new()
        } else {
            format!(" <span class=new>{} new</span>", s.new_nodes.len())
        };
        if !s.missing.is_empty() {
            new.push_str(&format!(
                " <span class=failed>{} missing: {}</span>",
                s.missing.len(),
                s.missing
                    .iter()
                    .map(|id| esc(short(id)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if s.unlisted_sender {
            new.push_str(&format!(
                " <span class=failed>reported by {}, a node the site never listed</span>",
                esc(short(&s.sender))
            ));
        }
        rows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}{new}</td><td>{versions}</td><td class=failed>{failed}</td><td>{rollout}</td><td>{}{}</td></tr>\n",
            if s.stale { "stale" } else if s.failed.is_empty() { "ok" } else { "bad" },
            esc(&s.site),
            s.nodes,
            age(s.last_report_s),
            if s.stale { " <b>stale</b>" } else { "" },
        ));
    }
    let page = query.page.unwrap_or(1).max(1);
    let pages = counts.matching.div_ceil(ROWS).max(1);
    let first = (page - 1) * ROWS;
    let shown = if sites.is_empty() {
        "no site matches".to_owned()
    } else {
        format!(
            "sites {}–{} of {}",
            first + 1,
            first + sites.len(),
            counts.matching
        )
    };
    let link = |to: usize, text: &str| {
        let mut href = format!("?page={to}");
        if !query.q.is_empty() {
            href.push_str(&format!("&amp;q={}", esc(&url_encode(&query.q))));
        }
        if problems(query) {
            href.push_str("&amp;problems=1");
        }
        format!("<a href=\"{href}\">{text}</a>")
    };
    let mut nav = String::new();
    if page > 1 {
        nav.push_str(&link(page - 1, "&larr; previous"));
        nav.push(' ');
    }
    nav.push_str(&format!("page {page} of {pages}"));
    if page < pages {
        nav.push(' ');
        nav.push_str(&link(page + 1, "next &rarr;"));
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="30">
<title>lanup fleet</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222 }}
table {{ border-collapse: collapse; width: 100% }}
th, td {{ text-align: left; padding: .35em .7em; border-bottom: 1px solid #ddd; vertical-align: top }}
th {{ background: #f3f3f3 }}
tr.bad td:first-child {{ border-left: 4px solid #c0392b }}
tr.stale td:first-child {{ border-left: 4px solid #e67e22 }}
tr.ok td:first-child {{ border-left: 4px solid #27ae60 }}
td.failed {{ color: #c0392b }}
.new {{ color: #2471a3; font-size: 90% }}
.bar {{ width: 16em; height: .9em; background: #eee; border-radius: 3px }}
.bar div {{ height: 100%; background: #27ae60; border-radius: 3px }}
table.waves {{ width: auto; margin-bottom: 1.5em }}
.state {{ font-weight: normal; color: #555 }}
form {{ margin: .5em 0 1em }}
nav {{ margin: .7em 0 }}
</style></head><body>
<h1>lanup fleet</h1>
<p id=counts>{} sites, {} with failed nodes, {} stale. This page refreshes itself every 30 s.</p>
{rollout_html}<h2>Sites</h2>
<form method=get>
<input type=search name=q value="{}" placeholder="site or version" aria-label="site or version">
<label><input type=checkbox name=problems value=1{}> only failed or stale</label>
<button>show</button>
</form>
<nav><span id=shown>{shown}</span> · {nav}</nav>
<table id=sites>
<tr><th>site</th><th>nodes</th><th>installed</th><th>failed</th><th>site rollout</th><th>last report</th></tr>
{rows}</table>
<nav>{nav}</nav>
</body></html>
"#,
        counts.sites,
        counts.failed,
        counts.stale,
        esc(&query.q),
        if problems(query) { " checked" } else { "" },
    )
}

fn problems(query: &ViewQuery) -> bool {
    query
        .problems
        .as_deref()
        .is_some_and(|p| !p.is_empty() && p != "0")
}

/// A wave's sites, the first few by name.
fn names(wave: &[String]) -> String {
    let mut text = wave
        .iter()
        .take(WAVE_NAMES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if wave.len() > WAVE_NAMES {
        text.push_str(&format!(" and {} more", wave.len() - WAVE_NAMES));
    }
    text
}

/// `text` as a URL query value.
fn url_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn short(peer: &str) -> &str {
    peer.get(peer.len().saturating_sub(8)..).unwrap_or(peer)
}

fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
