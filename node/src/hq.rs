//! Headquarters' side of site reports, served by `lanup origin --reports
//! DIR` beside the release folder: it takes signed reports
//! (`POST /_lanup/report`), keeps the newest per site and an append-only
//! history in `DIR`, and shows the fleet (`/_lanup/fleet.json` and a page
//! at `/_lanup/fleet`).
//!
//! `DIR/sites/SITE.json` holds what is kept of each site (its newest report
//! and the nodes and senders heard before), replaced atomically;
//! `DIR/history.jsonl` one line per report taken, with its signature, so it
//! can be checked again later. The history is rotated at
//! [`HISTORY_MAX_BYTES`] to `history.1.jsonl`, so the folder stays bounded.

use std::io::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::node::now_unix_ms;

use anyhow::{Context, Result};
use axum::http::StatusCode;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use lanup_protocol::fleet::{wave_progress, FleetFile, FleetState, FLEET_FILE};
use lanup_protocol::report::{self, Fleet, ReportRefusal, SiteRecord, SiteView};
use tracing::{info, warn};

/// Where sites post their reports.
pub const REPORT_PATH: &str = "/_lanup/report";
/// The fleet view as JSON.
pub const FLEET_JSON_PATH: &str = "/_lanup/fleet.json";
/// The fleet view as a page.
pub const FLEET_PAGE_PATH: &str = "/_lanup/fleet";
/// The history file's size at which it is rotated.
pub const HISTORY_MAX_BYTES: u64 = 16 << 20;
/// Reports one node key may post per minute (a site posts a few an hour;
/// a burst of [`REPORTS_BURST`] covers a rollout's changes).
const REPORTS_PER_MINUTE: u32 = 30;
const REPORTS_BURST: u32 = 20;
/// Posts one address may make per minute, whatever they hold: many sites
/// behind one NAT share an address, so this is far above one site's rate;
/// it bounds the signature checks one host can make headquarters do.
const ADDRESS_POSTS_PER_MINUTE: u32 = 600;
const ADDRESS_BURST: u32 = 200;

/// Why a report was not taken, as the HTTP answer says it.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
}

/// Headquarters' reports: the fleet in memory, its folder on disk.
pub struct Reports {
    dir: PathBuf,
    fleet: Mutex<Fleet>,
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_sender: DefaultKeyedRateLimiter<String>,
    stale_after: Duration,
    /// With admin keys, only enrolled members' reports count.
    admins: Vec<lanup_protocol::sign::PublicKey>,
}

impl Reports {
    /// Opens (creating) the reports folder and reads the sites kept there.
    pub fn open(dir: &Path, stale_after: Duration) -> Result<Reports> {
        let sites = dir.join("sites");
        std::fs::create_dir_all(&sites)
            .with_context(|| format!("reports folder {}", sites.display()))?;
        let fleet = load(dir)?;
        info!(dir = %dir.display(), sites = fleet.sites.len(), "taking site reports");
        let quota = |per_minute: u32, burst: u32| {
            Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        };
        Ok(Reports {
            dir: dir.to_path_buf(),
            fleet: Mutex::new(fleet),
            by_address: RateLimiter::keyed(quota(ADDRESS_POSTS_PER_MINUTE, ADDRESS_BURST)),
            by_sender: RateLimiter::keyed(quota(REPORTS_PER_MINUTE, REPORTS_BURST)),
            stale_after,
            admins: Vec::new(),
        })
    }

    /// Counts only reports from enrolled members of the site they name:
    /// signed by a node whose membership certificate one of `admins`
    /// signed (or vouched for). The fleet view and fleet rollouts then
    /// read only members' reports.
    pub fn members_only(mut self, admins: Vec<lanup_protocol::sign::PublicKey>) -> Reports {
        if !admins.is_empty() {
            info!(
                admins = admins.len(),
                "site reports count only from enrolled members"
            );
        }
        self.admins = admins;
        self
    }

    /// Takes one posted report from `from`: rate limited per address
    /// (loosely, as sites share NATs) and per signing node, checked, kept.
    /// Blocking (it writes files).
    pub fn take(&self, body: &[u8], from: IpAddr) -> Result<String, Refused> {
        let too_many = |message: String| Refused {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
        };
        if self.by_address.check_key(&from).is_err() {
            return Err(too_many(format!(
                "{from} posted more than {ADDRESS_POSTS_PER_MINUTE} reports a minute; try again later"
            )));
        }
        // Keys quiet for a while are dropped, so the limiters stay as
        // small as the set of recent senders.
        if self.by_address.len() > 10_000 {
            self.by_address.retain_recent();
        }
        if self.by_sender.len() > 10_000 {
            self.by_sender.retain_recent();
        }
        let now = now_unix_ms();
        let refused = |e: ReportRefusal| {
            let status = match e {
                ReportRefusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                ReportRefusal::BadSignature(_)
                | ReportRefusal::NotSender { .. }
                | ReportRefusal::NotMember { .. } => StatusCode::FORBIDDEN,
                ReportRefusal::Replayed(_) => StatusCode::CONFLICT,
                ReportRefusal::TooManySites(_) => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::BAD_REQUEST,
            };
            warn!(%from, reason = %e, "site report refused");
            Refused {
                status,
                message: format!("report refused: {e}"),
            }
        };
        let checked = report::check_member(body, now, &self.admins).map_err(refused)?;
        if self.by_sender.check_key(&checked.sender).is_err() {
            return Err(too_many(format!(
                "node {} sent more than {REPORTS_PER_MINUTE} reports a minute; try again later",
                checked.sender
            )));
        }
        let mut fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
        let site = checked.site.clone();
        let sender = checked.sender.clone();
        let accepted = fleet.accept(checked, now).map_err(refused)?;
        let record = fleet.sites.get(&site).cloned();
        drop(fleet);
        let kept = record
            .ok_or_else(|| anyhow::anyhow!("site {site} vanished"))
            .and_then(|r| self.keep(&r, body, now, &accepted.new_nodes));
        if let Err(e) = kept {
            // Taken in memory; the file catches up with the next report.
            warn!(%site, error = %format!("{e:#}"), "cannot write the site's report to the reports folder");
        }
        if accepted.new_site || accepted.new_sender || !accepted.new_nodes.is_empty() {
            info!(%site, %sender, new_site = accepted.new_site, new_sender = accepted.new_sender,
                new_nodes = accepted.new_nodes.len(), "site report from a node not heard before");
        }
        Ok(format!("taken: site {site}\n"))
    }

    fn keep(&self, record: &SiteRecord, body: &[u8], now: u64, new_nodes: &[String]) -> Result<()> {
        let sites = self.dir.join("sites");
        let mut tmp = tempfile::NamedTempFile::new_in(&sites)?;
        serde_json::to_writer(&mut tmp, record)?;
        tmp.as_file().sync_data()?;
        tmp.persist(sites.join(format!("{}.json", record.report.site)))?;
        let history = self.dir.join("history.jsonl");
        if std::fs::metadata(&history).is_ok_and(|m| m.len() >= HISTORY_MAX_BYTES) {
            std::fs::rename(&history, self.dir.join("history.1.jsonl"))?;
        }
        let signed: serde_json::Value = serde_json::from_slice(body)?;
        let line = serde_json::json!({
            "received_ms": now,
            "site": record.report.site,
            "sender": record.report.sender,
            "new_nodes": new_nodes,
            "signed": signed,
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&history)?;
        writeln!(file, "{line}")?;
        Ok(())
    }

    /// Every site as headquarters shows it now.
    pub fn view(&self) -> Vec<SiteView> {
        let fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
        fleet.view(now_unix_ms(), self.stale_after.as_millis() as u64)
    }
}

/// Reads the sites kept in a reports folder. A site file that cannot be
/// read is named and skipped: its site shows again with its next report.
pub fn load(dir: &Path) -> Result<Fleet> {
    let sites = dir.join("sites");
    let mut fleet = Fleet::default();
    for entry in std::fs::read_dir(&sites)
        .with_context(|| format!("cannot read the reports folder {}", sites.display()))?
    {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let read = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<SiteRecord>(&b).map_err(Into::into));
        match read {
            Ok(r) => {
                fleet.sites.insert(r.report.site.clone(), r);
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "skipping a site file that cannot be read")
            }
        }
    }
    Ok(fleet)
}

/// The fleet view's JSON: every site, and the fleet rollout when there is
/// one.
pub fn fleet_json(sites: &[SiteView], rollout: Option<&FleetFile>) -> serde_json::Value {
    serde_json::json!({
        "sites": sites,
        "stale": sites.iter().filter(|s| s.stale).count(),
        "rollout": rollout.map(|f| rollout_json(f, sites)),
    })
}

/// A fleet rollout's progress: its state and, per site wave, its sites and
/// how many of them run the release.
pub fn rollout_json(file: &FleetFile, sites: &[SiteView]) -> serde_json::Value {
    let progress = wave_progress(file, sites);
    let mut json = serde_json::json!({
        "id": file.id,
        "version": file.version,
        "open": file.open,
        "started_ms": file.started_ms,
        "waves": file.waves.iter().zip(progress).enumerate().map(|(i, (w, (done, of)))| serde_json::json!({
            "sites": w,
            "installed": done,
            "of": of,
            "open": i < file.open,
        })).collect::<Vec<_>>(),
    });
    // `state`, and with it the halting site and reason, or who aborted.
    if let (Some(out), Ok(serde_json::Value::Object(state))) =
        (json.as_object_mut(), serde_json::to_value(&file.state))
    {
        out.extend(state);
    }
    if let Some(plan) = &file.plan {
        json["approvals"] = serde_json::json!({
            "needed": file.approvals_needed,
            "signed_by": lanup_protocol::fleet::plan_signers(plan)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        });
    }
    json
}

/// Whether the fleet rollout still waits for its admins' approvals, and
/// how many have signed.
fn awaiting(file: &FleetFile) -> Option<(usize, usize)> {
    let plan = file.plan.as_ref()?;
    let have = lanup_protocol::fleet::plan_signers(plan).len();
    (file.state == FleetState::Running && have < file.approvals_needed)
        .then_some((have, file.approvals_needed))
}

/// The fleet rollout file in the release folder `root`, if there is one
/// that can be read.
pub fn read_rollout(root: &Path) -> Option<FleetFile> {
    let bytes = std::fs::read(root.join(FLEET_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The fleet page: the fleet rollout's waves, then one row per site,
/// refreshed by itself every 10 s; no script, no external assets.
pub fn fleet_page(sites: &[SiteView], rollout: Option<&FleetFile>) -> String {
    let rollout_html = rollout.map_or_else(String::new, |f| {
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
            .zip(wave_progress(f, sites))
            .enumerate()
            .map(|(i, (w, (done, of)))| {
                let pct = (done * 100).checked_div(of).unwrap_or(0);
                format!(
                    "<tr><td>wave {}</td><td><div class=bar><div style=\"width:{pct}%\"></div></div></td><td>{done}/{of} sites{}</td><td>{}</td></tr>",
                    i + 1,
                    if i < f.open { "" } else { " (waiting)" },
                    esc(&w.join(", "))
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
    let failed_sites = sites.iter().filter(|s| !s.failed.is_empty()).count();
    let stale = sites.iter().filter(|s| s.stale).count();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="10">
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
</style></head><body>
<h1>lanup fleet</h1>
<p>{} sites, {} with failed nodes, {} stale. This page refreshes itself every 10 s.</p>
{rollout_html}<h2>Sites</h2>
<table>
<tr><th>site</th><th>nodes</th><th>installed</th><th>failed</th><th>site rollout</th><th>last report</th></tr>
{rows}</table>
</body></html>
"#,
        sites.len(),
        failed_sites,
        stale
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use lanup_protocol::report::{sign, NodeState, Report};
    use lanup_protocol::sign::SecretKey;

    fn body(key: &SecretKey, site: &str, at: u64, error: Option<&str>) -> Vec<u8> {
        let r = Report {
            site: site.into(),
            sender: key.public().peer_id(),
            sent_at_ms: at,
            nodes: vec![NodeState {
                id: key.public().peer_id(),
                lanup: None,
                installed: Some("1.0".into()),
                staged: None,
                state: "installed".into(),
                error: error.map(str::to_owned),
                failed: None,
            }],
            rollout: None,
        };
        serde_json::to_vec(&sign(&r, key)).expect("json")
    }

    #[test]
    fn reports_are_kept_across_restarts_with_a_history_and_a_rate_limit() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let key = SecretKey::generate();
        let from: IpAddr = "192.0.2.7".parse()?;
        let reports = Reports::open(dir.path(), Duration::from_secs(60))?;
        let t = now_unix_ms();
        reports
            .take(&body(&key, "a", t, Some("<script>")), from)
            .map_err(|r| anyhow::anyhow!(r.message))?;
        let replay = reports
            .take(&body(&key, "a", t, None), from)
            .expect_err("replay");
        assert_eq!(replay.status, StatusCode::CONFLICT);
        drop(reports);

        let reports = Reports::open(dir.path(), Duration::from_secs(60))?;
        let view = reports.view();
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].failed[0].error, "<script>");
        assert!(fleet_page(&view, None).contains("&lt;script&gt;"));
        // The replay is still known after the restart.
        let again = reports
            .take(&body(&key, "a", t, None), from)
            .expect_err("replay after a restart");
        assert_eq!(again.status, StatusCode::CONFLICT);
        let history = std::fs::read_to_string(dir.path().join("history.jsonl"))?;
        assert_eq!(history.lines().count(), 1);

        // One node posting in a loop is held back; another node at the
        // same address (sites behind one NAT) is not.
        let mut limited = 0;
        for i in 1..=(REPORTS_BURST + 5) {
            if let Err(r) = reports.take(&body(&key, "a", t + u64::from(i), None), from) {
                assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.message);
                assert!(r.message.contains("node "), "{}", r.message);
                limited += 1;
            }
        }
        assert!(limited >= 5, "{limited} reports refused for their rate");
        let other = SecretKey::generate();
        reports
            .take(&body(&other, "b", t, None), from)
            .map_err(|r| anyhow::anyhow!(r.message))?;
        // An address posting far beyond any site's rate is held back,
        // whatever it posts; another address is not.
        let flood = (0..ADDRESS_BURST + 10)
            .filter(|_| {
                reports
                    .take(b"{}", from)
                    .is_err_and(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
            })
            .count();
        assert!(
            flood >= 10,
            "{flood} posts refused for their address's rate"
        );
        assert!(reports
            .take(&body(&other, "b", t + 1, None), "192.0.2.8".parse()?)
            .is_ok());
        Ok(())
    }
}
