//! lanup's headquarters: it takes the signed reports sites post, keeps
//! them with each site's timeline in SQLite ([`store`]), and shows the
//! fleet as JSON and as a page ([`page`]) beside the release folder that
//! `lanup origin --reports DIR` serves.
//!
//! It meets the site node only through the types of `lanup-protocol`: the
//! report, its signature and the membership certificate it carries, and
//! the fleet rollout file it reads from the release folder.

pub mod page;
pub mod store;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use lanup_protocol::fleet::{site_installed, wave_progress_of, FleetFile, FLEET_FILE};
use lanup_protocol::membership::{Revocations, Signed};
use lanup_protocol::report::{
    self, ReportRefusal, SiteView, FLEET_JSON_PATH, FLEET_PAGE_PATH, HISTORY_JSON_PATH,
    MAX_REPORT_BYTES, REPORT_PATH,
};
use lanup_protocol::sign::PublicKey;
use serde::Deserialize;
use tracing::{info, warn};

pub use store::{Counts, Event, Filter, Member, Store};

/// Reports one site may post per minute (a site posts a few an hour; a
/// burst of [`REPORTS_BURST`] covers a rollout's changes). With trusted
/// admin keys the limit is the enrolled site's, whichever of its nodes
/// sends; without, the sending node's.
const REPORTS_PER_MINUTE: u32 = 30;
const REPORTS_BURST: u32 = 20;
/// Refused posts one address may make per minute before it is held back
/// for a minute: what bounds the signature checks a host can make
/// headquarters do for nothing. Reports taken never count, so sites
/// behind one NAT share nothing.
const REFUSED_PER_MINUTE: u32 = 60;
const REFUSED_BURST: u32 = 30;
const HELD_BACK_FOR: Duration = Duration::from_secs(60);
/// Addresses and keys a limiter remembers before it forgets quiet ones.
const LIMITER_KEYS: usize = 50_000;
/// Timeline entries one history request returns at most.
pub const MAX_HISTORY: usize = 1_000;
/// How often old timeline entries and silent sites are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(10 * 60);

/// Milliseconds since the Unix epoch, by headquarters' clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How headquarters is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The reports folder (holds the database).
    pub dir: PathBuf,
    /// The release folder the origin serves (holds the fleet rollout file).
    pub releases: PathBuf,
    /// A site whose newest report is older is flagged stale.
    pub stale_after: Duration,
    /// How long the timeline and silent sites are kept.
    pub keep: Duration,
    pub max_sites: usize,
    /// With admin keys, only enrolled members' reports count.
    pub admins: Vec<PublicKey>,
}

/// Why a report was not taken, as the HTTP answer says it.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
}

/// Headquarters: its store, its limits and its settings.
pub struct Headquarters {
    store: Store,
    settings: Settings,
    by_site: DefaultKeyedRateLimiter<String>,
    refused_by_address: DefaultKeyedRateLimiter<IpAddr>,
    held_back: Mutex<HashMap<IpAddr, Instant>>,
    /// Reports taken at once (each on a blocking thread; they write one
    /// at a time, and check their signatures side by side).
    intake: tokio::sync::Semaphore,
    /// Views built at once.
    readers: tokio::sync::Semaphore,
}

/// Reports checked and kept at once.
const INTAKE_WORKERS: usize = 8;
/// Fleet views (page, JSON, timeline) built at once.
const VIEW_READERS: usize = 2;

impl Headquarters {
    /// Opens (creating) the store in the reports folder.
    pub fn open(settings: Settings) -> Result<Headquarters> {
        let store = Store::open(&settings.dir, settings.keep, settings.max_sites)?;
        let quota = |per_minute: u32, burst: u32| {
            Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        };
        info!(
            db = %store.path().display(),
            members_only = !settings.admins.is_empty(),
            keep_days = settings.keep.as_secs() / 86_400,
            "taking site reports"
        );
        Ok(Headquarters {
            store,
            by_site: RateLimiter::keyed(quota(REPORTS_PER_MINUTE, REPORTS_BURST)),
            refused_by_address: RateLimiter::keyed(quota(REFUSED_PER_MINUTE, REFUSED_BURST)),
            held_back: Mutex::new(HashMap::new()),
            intake: tokio::sync::Semaphore::new(INTAKE_WORKERS),
            readers: tokio::sync::Semaphore::new(VIEW_READERS),
            settings,
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes one posted report from `from` at `now_ms`. Blocking (it
    /// writes the database).
    pub fn take(&self, body: &[u8], from: IpAddr, now_ms: u64) -> Result<String, Refused> {
        let now = Instant::now();
        {
            let mut held = self.held_back.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = held.get(&from).copied() {
                if until > now {
                    return Err(Refused {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        message: format!(
                            "{from} posted more than {REFUSED_PER_MINUTE} refused reports a minute; try again in {} s",
                            (until - now).as_secs() + 1
                        ),
                    });
                }
                held.remove(&from);
            }
        }
        let taken = self.check_and_keep(body, now_ms);
        if let Err(refused) = &taken {
            // What the sender did wrong counts against its address; a
            // site over its quota or headquarters' own trouble does not.
            let senders_fault = !matches!(
                refused.status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            );
            if senders_fault {
                warn!(%from, reason = %refused.message, "site report refused");
                if self.refused_by_address.check_key(&from).is_err() {
                    let mut held = self.held_back.lock().unwrap_or_else(|p| p.into_inner());
                    if held.len() >= LIMITER_KEYS {
                        held.retain(|_, until| *until > now);
                    }
                    held.insert(from, now + HELD_BACK_FOR);
                }
            }
        }
        // Keys quiet for a while are dropped, so the limiters stay as
        // small as the set of recent senders.
        if self.by_site.len() > LIMITER_KEYS {
            self.by_site.retain_recent();
        }
        if self.refused_by_address.len() > LIMITER_KEYS {
            self.refused_by_address.retain_recent();
        }
        taken
    }

    fn check_and_keep(&self, body: &[u8], now_ms: u64) -> Result<String, Refused> {
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
            Refused {
                status,
                message: format!("report refused: {e}"),
            }
        };
        let checked = report::check_member(body, now_ms, &self.settings.admins, |site| {
            self.revocations(site)
        })
        .map_err(refused)?;
        let site = checked.report.site.clone();
        let sender = checked.report.sender.clone();
        let (limited, who) = if checked.member.is_some() {
            (site.clone(), format!("site {site}"))
        } else {
            (sender.clone(), format!("node {sender}"))
        };
        if self.by_site.check_key(&limited).is_err() {
            return Err(Refused {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "{who} sent more than {REPORTS_PER_MINUTE} reports a minute; try again later"
                ),
            });
        }
        // The body parsed as JSON in the check; kept as text as posted.
        let signed = String::from_utf8_lossy(body);
        let accepted = self
            .store
            .take(checked.report, &signed, checked.member.as_ref(), now_ms)
            .map_err(|e| {
                warn!(%site, error = %format!("{e:#}"), "cannot keep a site's report");
                Refused {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: format!("headquarters cannot keep the report now: {e:#}"),
                }
            })?
            .map_err(refused)?;
        if accepted.new_site || accepted.new_sender || !accepted.new_nodes.is_empty() {
            info!(%site, %sender, new_site = accepted.new_site, new_sender = accepted.new_sender,
                new_nodes = accepted.new_nodes.len(), "site report from a node not heard before");
        }
        Ok(format!("taken: site {site}\n"))
    }

    /// Site `site`'s revocation list as published in the release folder
    /// (`lanup revoke --publish-dir`), when a trusted admin signed it.
    fn revocations(&self, site: &str) -> Option<Revocations> {
        let path = self
            .settings
            .releases
            .join(lanup_protocol::membership::revoked_file(site));
        let bytes = std::fs::read(&path).ok()?;
        let mut held = Revocations::default();
        let taken = serde_json::from_slice::<Signed>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|signed| {
                held.take(&signed, site, &self.settings.admins)
                    .map_err(|e| e.to_string())
            });
        match taken {
            Ok(_) => Some(held),
            Err(e) => {
                warn!(file = %path.display(), reason = %e, "a published revocation list is not taken");
                None
            }
        }
    }

    /// The sites `filter` asks for at `now_ms`, with the counts.
    pub fn views(&self, now_ms: u64, filter: &Filter) -> Result<(Vec<SiteView>, Counts)> {
        self.store.views(now_ms, self.stale_after_ms(), filter)
    }

    fn stale_after_ms(&self) -> u64 {
        self.settings.stale_after.as_millis() as u64
    }

    /// The fleet rollout in the release folder, if there is one.
    pub fn rollout(&self) -> Option<FleetFile> {
        read_rollout(&self.settings.releases)
    }

    /// Drops old timeline entries and silent sites every few minutes,
    /// for as long as headquarters runs.
    pub async fn upkeep(self: Arc<Self>) {
        let mut every = tokio::time::interval(PRUNE_EVERY);
        loop {
            every.tick().await;
            let hq = self.clone();
            match tokio::task::spawn_blocking(move || hq.store.prune(now_ms())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(error = %format!("{e:#}"), "cannot prune headquarters' store"),
                Err(e) => warn!(error = %e, "pruning headquarters' store failed"),
            }
        }
    }
}

/// The fleet rollout file in the release folder `root`, if there is one
/// that can be read.
pub fn read_rollout(root: &Path) -> Option<FleetFile> {
    let bytes = std::fs::read(root.join(FLEET_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// How far each wave of `file` is, from every site's row, read one at a
/// time.
pub fn progress(
    store: &Store,
    now_ms: u64,
    stale_after_ms: u64,
    file: &FleetFile,
) -> Result<Vec<(usize, usize)>> {
    let mut installed = std::collections::HashSet::new();
    store.each_view(now_ms, stale_after_ms, &Filter::default(), |v| {
        if site_installed(file, &v.site, &v) {
            installed.insert(v.site);
        }
    })?;
    Ok(wave_progress_of(file, |site| installed.contains(site)))
}

/// The fleet view as JSON text: the sites `filter` asks for, the counts,
/// and the fleet rollout when there is one. Written a site at a time: at
/// 20,000 sites the text is what is held, not the sites.
pub fn fleet_json(
    store: &Store,
    now_ms: u64,
    stale_after_ms: u64,
    filter: &Filter,
    rollout: Option<&FleetFile>,
) -> Result<String> {
    let rollout = rollout
        .map(|f| progress(store, now_ms, stale_after_ms, f).map(|p| rollout_json(f, &p)))
        .transpose()?;
    let mut out = b"{\"sites\":[".to_vec();
    let mut first = true;
    let counts = store.each_view(now_ms, stale_after_ms, filter, |v| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, &v);
    })?;
    let tail = serde_json::json!({
        "counts": counts,
        "stale": counts.stale,
        "rollout": rollout,
    });
    out.extend_from_slice(b"],");
    // The rest of the object, without its opening brace.
    out.extend_from_slice(tail.to_string().get(1..).unwrap_or("}").as_bytes());
    Ok(String::from_utf8(out)?)
}

/// A fleet rollout's progress: its state and, per site wave, its sites and
/// how many of them run the release.
pub fn rollout_json(file: &FleetFile, progress: &[(usize, usize)]) -> serde_json::Value {
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

/// The query of the fleet view and page: `?q=TEXT&problems=1&page=N`.
#[derive(Debug, Default, Deserialize)]
pub struct ViewQuery {
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub problems: Option<String>,
    /// 1-based; `fleet.json` without it returns every site.
    #[serde(default)]
    pub page: Option<usize>,
}

impl ViewQuery {
    fn filter(&self, whole: bool) -> Filter {
        let page = self.page.unwrap_or(1).max(1);
        let paged = !whole || self.page.is_some();
        Filter {
            search: self.q.trim().to_owned(),
            problems: self
                .problems
                .as_deref()
                .is_some_and(|p| !p.is_empty() && p != "0"),
            offset: if paged { (page - 1) * page::ROWS } else { 0 },
            limit: if paged { page::ROWS } else { 0 },
        }
    }
}

/// The routes headquarters adds to the origin: the report intake, the
/// fleet view (JSON and page) and a site's timeline.
pub fn routes(hq: Arc<Headquarters>) -> Router {
    Router::new()
        .route(
            REPORT_PATH,
            post(take_report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)),
        )
        .route(FLEET_JSON_PATH, get(fleet_json_route))
        .route(FLEET_PAGE_PATH, get(fleet_page_route))
        .route(HISTORY_JSON_PATH, get(history_route))
        .with_state(hq)
}

async fn take_report(
    State(hq): State<Arc<Headquarters>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let Ok(_turn) = hq.intake.acquire().await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "headquarters is stopping\n",
        )
            .into_response();
    };
    let taker = hq.clone();
    match tokio::task::spawn_blocking(move || taker.take(&body, from.ip(), now_ms())).await {
        Ok(Ok(said)) => (StatusCode::OK, said).into_response(),
        Ok(Err(refused)) => (refused.status, refused.message + "\n").into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "report lost\n").into_response(),
    }
}

fn failed(e: anyhow::Error) -> Response {
    warn!(error = %format!("{e:#}"), "cannot read headquarters' store");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("headquarters cannot read its store now: {e:#}\n"),
    )
        .into_response()
}

async fn fleet_json_route(
    State(hq): State<Arc<Headquarters>>,
    Query(query): Query<ViewQuery>,
) -> Response {
    let built = view_task(&hq, move |hq| {
        fleet_json(
            &hq.store,
            now_ms(),
            hq.stale_after_ms(),
            &query.filter(true),
            hq.rollout().as_ref(),
        )
    })
    .await;
    match built {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => failed(e),
    }
}

async fn fleet_page_route(
    State(hq): State<Arc<Headquarters>>,
    Query(query): Query<ViewQuery>,
) -> Response {
    let built = view_task(&hq, move |hq| {
        let now = now_ms();
        let (sites, counts) = hq.views(now, &query.filter(false))?;
        let rollout = hq
            .rollout()
            .map(|f| progress(&hq.store, now, hq.stale_after_ms(), &f).map(|p| (f, p)))
            .transpose()?;
        Ok(page::fleet_page(
            &sites,
            counts,
            &query,
            rollout.as_ref().map(|(f, p)| (f, p.as_slice())),
        ))
    })
    .await;
    match built {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => failed(e),
    }
}

/// Runs `read` on a blocking thread, [`VIEW_READERS`] at a time: each
/// reads every site, so their number bounds headquarters' memory.
async fn view_task<T: Send + 'static>(
    hq: &Arc<Headquarters>,
    read: impl FnOnce(&Headquarters) -> Result<T> + Send + 'static,
) -> Result<T> {
    let _turn = hq.readers.acquire().await?;
    let hq = hq.clone();
    tokio::task::spawn_blocking(move || read(&hq)).await?
}

/// The query of a site's timeline: `?site=NAME&limit=N`.
#[derive(Debug, Deserialize)]
struct HistoryQuery {
    site: String,
    #[serde(default)]
    limit: Option<usize>,
}

async fn history_route(
    State(hq): State<Arc<Headquarters>>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(200).min(MAX_HISTORY);
    let site = query.site.clone();
    let built = view_task(&hq, move |hq| {
        let events = hq.store.history(&query.site, limit)?;
        let members = hq.store.members(&query.site)?;
        anyhow::Ok(serde_json::json!({
            "site": query.site,
            "events": events,
            "members": members,
        }))
    })
    .await;
    match built {
        Ok(json) if !json["events"].as_array().is_some_and(Vec::is_empty) => (
            [(header::CONTENT_TYPE, "application/json")],
            json.to_string(),
        )
            .into_response(),
        Ok(_) => (
            StatusCode::NOT_FOUND,
            format!("no timeline for site {site:?}: it has not reported within the history kept\n"),
        )
            .into_response(),
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests;
