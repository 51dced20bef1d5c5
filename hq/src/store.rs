//! Headquarters' store: one SQLite database, `DIR/hq.sqlite` in WAL mode,
//! with each site's newest report and what is remembered of it (the
//! replay guard, the nodes seen), the site's timeline, and the enrolled
//! members heard from.
//!
//! A report is taken in one transaction: the replay check against the
//! site's senders, the site's row and, when the report says something new,
//! its timeline entry with the signed report as posted, so that it can be
//! checked again later. The hourly report that says nothing new replaces
//! the site's row and adds no entry, so the database grows with what
//! happens at the sites, not with the hours. Entries and sites not heard
//! from are dropped by age ([`Store::prune`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use lanup_protocol::report::{Accepted, Enrolled, Report, ReportRefusal, SiteRecord, SiteView};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The database's file in the reports folder.
pub const DB_FILE: &str = "hq.sqlite";
/// How long the timeline keeps an entry, and a site not heard from is
/// kept, unless set otherwise.
pub const KEEP_HISTORY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Sites kept at most, unless set otherwise. Without trusted admin keys
/// any key can name a site, so their number is capped; sites not heard
/// from for the history's age are dropped, so the cap frees itself.
pub const MAX_SITES: usize = 50_000;
/// Timeline entries deleted per statement while pruning, so a prune never
/// holds the write lock for long.
const PRUNE_BATCH: usize = 5_000;

/// The schema's version (SQLite's `user_version`): a database from a newer
/// lanup is refused rather than misread.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    -- What is remembered of the site (SiteRecord as JSON): its newest
    -- report, its senders' newest send times, the nodes seen.
    record TEXT NOT NULL,
    -- The site's row of the fleet view at its newest report (SiteView).
    view TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    -- Lower-case site name and installed versions, for the page's search.
    search TEXT NOT NULL
) WITHOUT ROWID;
-- The fleet view's counts, filters and pages read this small index, and
-- a site's row only for the sites they show.
CREATE INDEX IF NOT EXISTS sites_list ON sites (name, search, failed, received_ms);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    sender TEXT NOT NULL,
    -- What changed, as words (Event::changes), as JSON.
    changes TEXT NOT NULL,
    -- The site's row of the fleet view this report made.
    view TEXT NOT NULL,
    -- The signed report exactly as posted.
    signed TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_site ON history (site, received_ms);
CREATE INDEX IF NOT EXISTS history_age ON history (received_ms);
CREATE TABLE IF NOT EXISTS members (
    site TEXT NOT NULL,
    node TEXT NOT NULL,
    -- The key that signed its certificate (an admin's, or a join token's).
    signer TEXT NOT NULL,
    expires_s INTEGER NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (site, node)
) WITHOUT ROWID;
";

/// One entry of a site's timeline: a report that said something new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When headquarters took the report, by its own clock.
    pub received_ms: u64,
    pub sender: String,
    /// What changed since the report before: `first report`, `sender`,
    /// `nodes`, `installed`, `failed`, `rollout`, `state`.
    pub changes: Vec<String>,
    /// The site as this report showed it.
    pub view: SiteView,
    /// The signed report as posted (its signature can be checked again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<serde_json::Value>,
}

/// An enrolled node heard from: who vouched for it and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's public key.
    pub node: String,
    /// The key that signed its certificate.
    pub signer: String,
    /// When its certificate expires (Unix seconds).
    pub expires_s: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Which sites a view asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Part of a site's name or of an installed version (any case).
    pub search: String,
    /// Only sites with failed nodes or a stale report.
    pub problems: bool,
    /// Sites to skip, and at most how many to return (0: all).
    pub offset: usize,
    pub limit: usize,
}

/// How many sites there are, and how many the filter matched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub sites: usize,
    pub failed: usize,
    pub stale: usize,
    pub matching: usize,
}

/// What a prune dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: usize,
    pub sites: usize,
}

/// The database, with one connection for writing and one for reading
/// (WAL lets a page be read while reports are written).
pub struct Store {
    path: PathBuf,
    write: Mutex<Connection>,
    read: Mutex<Connection>,
    keep_ms: u64,
    max_sites: usize,
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("headquarters' database {}", path.display()))?;
    // A writer waits for another's transaction rather than failing.
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

impl Store {
    /// Opens (creating) the database in `dir`. A folder written by an
    /// older lanup (`sites/*.json`) is taken in once.
    pub fn open(dir: &Path, keep: Duration, max_sites: usize) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("reports folder {}", dir.display()))?;
        let path = dir.join(DB_FILE);
        let fresh = !path.exists();
        let write = open_connection(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        // WAL: readers never block the writer; NORMAL: a commit is durable
        // at the next checkpoint, and a power cut loses at most the last
        // reports, which their sites send again (a report refused for
        // being a replay is never one headquarters lost).
        let version: i64 = write
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .with_context(|| format!("reading {}", path.display()))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "{}: written by a newer lanup (schema {version}; this one knows {SCHEMA_VERSION}): run that lanup, or move the file aside",
                path.display()
            );
        }
        write
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| write.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|()| write.execute_batch(SCHEMA))
            .and_then(|()| write.pragma_update(None, "user_version", SCHEMA_VERSION))
            .with_context(|| format!("preparing {}", path.display()))?;
        let read = open_connection(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let store = Store {
            path,
            write: Mutex::new(write),
            read: Mutex::new(read),
            keep_ms: keep.as_millis() as u64,
            max_sites,
        };
        if fresh {
            store.import_folder(dir)?;
        }
        Ok(store)
    }

    /// Opens the database in `dir` to read it (`lanup fleet --reports DIR`
    /// beside a running headquarters).
    pub fn open_read_only(dir: &Path) -> Result<Store> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            anyhow::bail!(
                "{}: no headquarters' database here (is this the folder given to `lanup origin --reports`?)",
                path.display()
            );
        }
        let open = || open_connection(&path, OpenFlags::SQLITE_OPEN_READ_ONLY);
        Ok(Store {
            write: Mutex::new(open()?),
            read: Mutex::new(open()?),
            path,
            keep_ms: KEEP_HISTORY.as_millis() as u64,
            max_sites: MAX_SITES,
        })
    }

    /// The database's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a checked report received at `now_ms`, posted as `signed`,
    /// from `member` when members alone count: the replay check, the
    /// site's row, its timeline entry and its member, in one transaction.
    /// The outer error is the database's; the inner one the report's.
    pub fn take(
        &self,
        report: Report,
        signed: &str,
        member: Option<&Enrolled>,
        now_ms: u64,
    ) -> Result<Result<Accepted, ReportRefusal>> {
        let mut conn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let kept: Option<String> = tx
            .query_row(
                "SELECT record FROM sites WHERE name = ?1",
                [&report.site],
                |row| row.get(0),
            )
            .optional()?;
        let before = match kept {
            Some(text) => Some(
                serde_json::from_str::<SiteRecord>(&text)
                    .with_context(|| format!("site {}'s row", report.site))?,
            ),
            None => {
                let sites: i64 = tx.query_row("SELECT count(*) FROM sites", [], |r| r.get(0))?;
                let sites = sites as usize;
                if sites >= self.max_sites {
                    return Ok(Err(ReportRefusal::TooManySites(sites)));
                }
                None
            }
        };
        let mut record = before
            .clone()
            .unwrap_or_else(|| SiteRecord::new(&report, now_ms));
        let mut accepted = match record.accept(report, now_ms) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        accepted.new_site = before.is_none();
        let view = SiteView::of(&record, now_ms, u64::MAX);
        let view_text = serde_json::to_string(&view)?;
        let search = std::iter::once(view.site.as_str())
            .chain(view.versions.keys().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        tx.execute(
            "INSERT INTO sites (name, record, view, received_ms, failed, search)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET record = ?2, view = ?3, received_ms = ?4,
                failed = ?5, search = ?6",
            params![
                view.site,
                serde_json::to_string(&record)?,
                view_text,
                int(now_ms),
                !view.failed.is_empty(),
                search
            ],
        )?;
        let changes = changes(before.as_ref(), &record, &accepted);
        if !changes.is_empty() {
            tx.execute(
                "INSERT INTO history (site, received_ms, sender, changes, view, signed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    view.site,
                    int(now_ms),
                    record.report.sender,
                    serde_json::to_string(&changes)?,
                    view_text,
                    signed
                ],
            )?;
        }
        if let Some(Enrolled { grant, signer }) = member {
            tx.execute(
                "INSERT INTO members (site, node, signer, expires_s, first_ms, last_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (site, node) DO UPDATE SET signer = ?3, expires_s = ?4, last_ms = ?5",
                params![
                    grant.site,
                    grant.node,
                    signer,
                    int(grant.expires),
                    int(now_ms)
                ],
            )?;
        }
        tx.commit()?;
        Ok(Ok(accepted))
    }

    /// The sites `filter` asks for, as seen at `now_ms`, in name order,
    /// with the counts over all sites.
    pub fn views(
        &self,
        now_ms: u64,
        stale_after_ms: u64,
        filter: &Filter,
    ) -> Result<(Vec<SiteView>, Counts)> {
        let mut views = Vec::new();
        let counts = self.each_view(now_ms, stale_after_ms, filter, |v| views.push(v))?;
        Ok((views, counts))
    }

    /// Hands each site `filter` asks for to `each`, one at a time and in
    /// name order (at 20,000 sites, no more than one is held); returns the
    /// counts over all sites.
    pub fn each_view(
        &self,
        now_ms: u64,
        stale_after_ms: u64,
        filter: &Filter,
        mut each: impl FnMut(SiteView),
    ) -> Result<Counts> {
        let conn = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let stale_before = now_ms.saturating_sub(stale_after_ms);
        let (sites, failed, stale): (i64, i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(failed), 0), coalesce(sum(received_ms < ?1), 0) FROM sites",
            [int(stale_before)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let pattern = format!("%{}%", like_escape(&filter.search.to_lowercase()));
        let matching_sql = "FROM sites WHERE search LIKE ?1 ESCAPE '\\'
              AND (?2 = 0 OR failed = 1 OR received_ms < ?3)";
        let matching: i64 = if filter == &Filter::default() {
            sites
        } else {
            conn.query_row(
                &format!("SELECT count(*) {matching_sql}"),
                params![pattern, filter.problems, int(stale_before)],
                |r| r.get(0),
            )?
        };
        let limit = if filter.limit == 0 {
            -1
        } else {
            filter.limit as i64
        };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT view, received_ms {matching_sql} ORDER BY name LIMIT ?4 OFFSET ?5"
        ))?;
        let mut rows = stmt.query(params![
            pattern,
            filter.problems,
            int(stale_before),
            limit,
            filter.offset as i64
        ])?;
        while let Some(row) = rows.next()? {
            let text = row.get_ref(0)?.as_str()?;
            match serde_json::from_str::<SiteView>(text) {
                Ok(mut view) => {
                    let age = now_ms.saturating_sub(uint(row.get(1)?));
                    view.last_report_s = age / 1000;
                    view.stale = age > stale_after_ms;
                    each(view);
                }
                Err(e) => warn!(error = %e, "skipping a site row that cannot be read"),
            }
        }
        Ok(Counts {
            sites: sites as usize,
            failed: failed as usize,
            stale: stale as usize,
            matching: matching as usize,
        })
    }

    /// Site `site`'s timeline, newest first, at most `limit` entries.
    pub fn history(&self, site: &str, limit: usize) -> Result<Vec<Event>> {
        let conn = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT received_ms, sender, changes, view, signed FROM history
             WHERE site = ?1 ORDER BY received_ms DESC, id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![site, limit as i64], |r| {
            Ok((
                uint(r.get(0)?),
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (received_ms, sender, changes, view, signed) = row?;
            events.push(Event {
                received_ms,
                sender,
                changes: serde_json::from_str(&changes).context("a timeline entry")?,
                view: serde_json::from_str(&view).context("a timeline entry")?,
                signed: serde_json::from_str(&signed).ok(),
            });
        }
        Ok(events)
    }

    /// Site `site`'s enrolled members heard from.
    pub fn members(&self, site: &str) -> Result<Vec<Member>> {
        let conn = self.read.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT node, signer, expires_s, first_ms, last_ms FROM members
             WHERE site = ?1 ORDER BY node",
        )?;
        let rows = stmt.query_map([site], |r| {
            Ok(Member {
                node: r.get(0)?,
                signer: r.get(1)?,
                expires_s: uint(r.get(2)?),
                first_ms: uint(r.get(3)?),
                last_ms: uint(r.get(4)?),
            })
        })?;
        rows.collect::<rusqlite::Result<_>>().map_err(Into::into)
    }

    /// Drops timeline entries older than the history's age at `now_ms`,
    /// and sites (with their members) not heard from for that long; a few
    /// thousand rows per transaction.
    pub fn prune(&self, now_ms: u64) -> Result<Pruned> {
        let before = now_ms.saturating_sub(self.keep_ms);
        let mut pruned = Pruned::default();
        loop {
            let conn = self.write.lock().unwrap_or_else(|p| p.into_inner());
            let n = conn.execute(
                "DELETE FROM history WHERE id IN
                   (SELECT id FROM history WHERE received_ms < ?1 LIMIT ?2)",
                params![int(before), PRUNE_BATCH as i64],
            )?;
            pruned.events += n;
            if n < PRUNE_BATCH {
                break;
            }
        }
        let mut conn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM members WHERE site IN (SELECT name FROM sites WHERE received_ms < ?1)",
            [int(before)],
        )?;
        pruned.sites = tx.execute("DELETE FROM sites WHERE received_ms < ?1", [int(before)])?;
        tx.commit()?;
        if pruned.events > 0 || pruned.sites > 0 {
            info!(
                events = pruned.events,
                sites = pruned.sites,
                "dropped timeline entries and sites older than the history's age"
            );
        }
        Ok(pruned)
    }

    /// Takes in the sites of a reports folder an older lanup wrote
    /// (`sites/SITE.json`); its `history.jsonl` stays beside, unread.
    fn import_folder(&self, dir: &Path) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(dir.join("sites")) else {
            return Ok(());
        };
        let mut conn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        let mut taken = 0;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let read = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<SiteRecord>(&b).map_err(Into::into));
            let record = match read {
                Ok(r) => r,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "skipping a site file that cannot be read");
                    continue;
                }
            };
            let view = SiteView::of(&record, record.received_ms, u64::MAX);
            tx.execute(
                "INSERT OR REPLACE INTO sites (name, record, view, received_ms, failed, search)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    view.site,
                    serde_json::to_string(&record)?,
                    serde_json::to_string(&view)?,
                    int(record.received_ms),
                    !view.failed.is_empty(),
                    view.site.to_lowercase()
                ],
            )?;
            taken += 1;
        }
        tx.commit()?;
        if taken > 0 {
            info!(sites = taken, dir = %dir.display(),
                "took in the sites an older lanup kept as files; history.jsonl stays beside");
        }
        Ok(())
    }
}

/// What a report changed, in words; none for a report that only says
/// again what the site said before.
fn changes(before: Option<&SiteRecord>, after: &SiteRecord, accepted: &Accepted) -> Vec<String> {
    let Some(before) = before else {
        return vec!["first report".into()];
    };
    let (old, new) = (&before.report, &after.report);
    let mut words = Vec::new();
    let mut say = |changed: bool, word: &str| {
        if changed {
            words.push(word.to_owned());
        }
    };
    say(old.sender != new.sender || accepted.new_sender, "sender");
    let ids = |r: &Report| r.nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>();
    say(ids(old) != ids(new), "nodes");
    let installed = |r: &Report| {
        r.nodes
            .iter()
            .map(|n| n.installed.clone())
            .collect::<Vec<_>>()
    };
    say(installed(old) != installed(new), "installed");
    let failed = |r: &Report| {
        r.nodes
            .iter()
            .map(|n| (n.failed.clone(), n.error.clone()))
            .collect::<Vec<_>>()
    };
    say(failed(old) != failed(new), "failed");
    say(old.rollout != new.rollout, "rollout");
    if words.is_empty() && !old.same_news(new) {
        words.push("state".into());
    }
    words
}

/// SQLite's integers are signed.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `text` with LIKE's wildcards taken literally.
fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
