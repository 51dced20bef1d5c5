//! Installing a staged release: the replace-and-restart of the classic
//! updater, driven by the journal of `lanup_protocol::journal` so that a
//! crash, a kill or a power cut at any moment leaves exactly the old or
//! exactly the new installation once the node has started again.
//!
//! On disk:
//! - `STATE/installed/`: the installed release's `AutoUpdater.xml`, its
//!   signature and `install.json` (version and install directory), so
//!   `lanup verify --state` can check an install and no older release is
//!   offered as new;
//! - `STATE/apply/journal.json`: the journal of an apply under way, synced
//!   before every step that changes the install directory;
//! - `STATE/apply/next/`: the release being installed, promoted to
//!   `installed/` on commit;
//! - `STATE/apply/last.json`: how the last apply ended, and why;
//! - `INSTALL/.lanup-apply/{new,old}`: the new files, copied and checked
//!   before the application is stopped, and the replaced files, kept until
//!   the new release is proven. Both are inside the install directory, so
//!   every move of the swap is a rename on one filesystem.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use lanup_protocol::journal::{
    commit_plan, rollback_plan, Journal, Kind, Op, Phase, Place, Recovery,
};
use lanup_protocol::manifest::{check_file_name, Restart, MANIFEST_FILE, SIGNATURE_FILE};
use lanup_protocol::{Hash, Manifest};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::app::App;
use crate::config::AppConfig;
use crate::platform::sync_dir;

/// The apply's working folder inside the install directory. No release may
/// list a file under it.
pub const WORK_DIR: &str = ".lanup-apply";

/// Every point where the crash tests' fault hook can kill the node, in the
/// order an apply (then a rollback) passes them.
pub const FAULT_POINTS: &[&str] = &[
    "copied",
    "begin",
    "stopped",
    "aside-1",
    "aside",
    "in-1",
    "in",
    "swapped",
    "started",
    "healthy",
    "committed",
    "cleaned",
    "rollback-stopped",
    "rollback-files",
    "rollback-started",
    "rolled-back",
];

/// With the `fault-injection` feature (tests only), `LANUP_FAULT=POINT`
/// makes the node kill itself with SIGKILL when it reaches POINT: a crash
/// exactly there, with nothing flushed or cleaned up.
pub(crate) fn fault(point: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("LANUP_FAULT").is_ok_and(|p| p == point) {
        crate::platform::crash();
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

/// A release ready to install: its checked manifest and its staged files.
#[derive(Debug, Clone)]
pub struct Release {
    /// Shared with the node's target: a large release's manifest is held
    /// once.
    pub manifest: std::sync::Arc<Manifest>,
    /// The node's copy of the installed release's manifest, used when the
    /// record on disk names the same release (else it is read).
    pub installed: Option<std::sync::Arc<Manifest>>,
    pub text: crate::manifest_text::ManifestText,
    pub signature: String,
    /// `STATE/staging/<version>/`.
    pub staged: PathBuf,
    /// A signed rollback: the release must be older than the installed one
    /// (otherwise it must be newer).
    pub rollback: bool,
    /// Run before the application stops, so a standby can take over (an
    /// active member of a redundancy group): the program and arguments,
    /// and how long it may take. Its failure ends the apply before
    /// anything stopped.
    pub switchover: Option<(Vec<String>, Duration)>,
}

/// What `STATE/installed/install.json` records beside the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallRecord {
    pub version: String,
    pub install_dir: PathBuf,
    /// Seconds since the Unix epoch.
    pub installed_at: u64,
}

/// The installed release, as recorded.
#[derive(Debug, Clone)]
pub struct Installed {
    pub manifest: std::sync::Arc<Manifest>,
    pub record: InstallRecord,
}

/// How an apply ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// The new release is installed and healthy.
    Committed,
    /// The new release was tried and the old one put back.
    RolledBack,
    /// Refused or failed before the install directory was touched.
    Failed,
}

impl Ending {
    /// The name status, history and metrics use (as serialised).
    pub fn name(&self) -> &'static str {
        match self {
            Ending::Committed => "committed",
            Ending::RolledBack => "rolled-back",
            Ending::Failed => "failed",
        }
    }
}

/// The outcome of an apply, kept in `STATE/apply/last.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub version: String,
    pub from: Option<String>,
    pub ending: Ending,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Old application stopped → new application started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Seconds since the Unix epoch.
    pub finished_at: u64,
}

/// One step of an apply, as it is reported to the CLI and the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub step: String,
    pub message: String,
    /// Milliseconds since the apply started.
    pub ms: u64,
}

/// Logs each step and hands it to `report`, timed from now.
fn narrator(report: &mut dyn FnMut(Event)) -> impl FnMut(&str, String) + '_ {
    let began = Instant::now();
    move |step: &str, message: String| {
        info!(step, "{message}");
        report(Event {
            step: step.to_owned(),
            message,
            ms: began.elapsed().as_millis() as u64,
        });
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `bytes` to `path` so that after a crash it holds either the old
/// or the new content, never a mix: a synced temporary file renamed over
/// it, and the folder synced.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_synced_with(path, |file| file.write_all(bytes))
}

/// [`write_synced`] for a manifest held compressed: its text is written
/// as it is decoded.
pub fn write_text_synced(path: &Path, text: &crate::manifest_text::ManifestText) -> io::Result<()> {
    write_synced_with(path, |file| {
        let mut writer = io::BufWriter::with_capacity(256 * 1024, file);
        text.write_to(&mut writer)?;
        writer.flush()
    })
}

/// Writes `path` through `write` into a temporary file beside it, synced
/// and renamed into place, and syncs the folder.
fn write_synced_with(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    let tmp = tmp.into_temp_path();
    crate::platform::rename(&tmp, path)?;
    // Renamed: nothing is left to remove.
    let _ = tmp.keep();
    sync_dir(dir)
}

/// The files of `new` that the install directory already holds as `new`
/// lists them: the installed release lists the same bytes and mode, and the
/// file on disk still has them (checked by hash, before the application is
/// stopped, so a file changed or rotted on disk is replaced, not kept).
fn unchanged_files(install: &Path, old: &Manifest, new: &Manifest) -> Result<HashSet<String>> {
    let listed: std::collections::HashMap<&str, &lanup_protocol::UpdateFile> =
        old.files.iter().map(|f| (f.name.as_str(), f)).collect();
    let candidates: Vec<&lanup_protocol::UpdateFile> = new
        .files
        .iter()
        .filter(|f| {
            listed.get(f.name.as_str()).is_some_and(|o| {
                o.hash == f.hash && o.size == f.size && o.mode == f.mode && f.hash.is_some()
            })
        })
        .collect();
    let kept = crate::parallel::map(&candidates, |f| {
        let path = install.join(&f.name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return Ok(false);
        };
        let mode_ok = f.mode.is_none_or(|m| crate::platform::mode(&meta) == m);
        Ok(meta.is_file()
            && Some(meta.len()) == f.size
            && mode_ok
            && crate::release::hash_file(&path).ok() == f.hash)
    })?;
    Ok(candidates
        .into_iter()
        .zip(kept)
        .filter(|(_, k)| *k)
        .map(|(f, _)| f.name.clone())
        .collect())
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The applier of one node: its state directory and its application.
#[derive(Debug, Clone)]
pub struct Applier {
    state: PathBuf,
    app: App,
}

impl Applier {
    pub fn new(state: &Path, config: AppConfig) -> Applier {
        Applier {
            state: state.to_owned(),
            app: App::new(config, state.join("app.log")),
        }
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    fn install_dir(&self) -> &Path {
        &self.app.config.install_dir
    }

    fn work(&self) -> PathBuf {
        self.install_dir().join(WORK_DIR)
    }

    fn place(&self, place: Place) -> PathBuf {
        match place {
            Place::Install => self.install_dir().to_owned(),
            Place::New => self.work().join("new"),
            Place::Old => self.work().join("old"),
        }
    }

    fn journal_path(&self) -> PathBuf {
        self.state.join("apply").join("journal.json")
    }

    fn next_dir(&self) -> PathBuf {
        self.state.join("apply").join("next")
    }

    fn last_path(&self) -> PathBuf {
        self.state.join("apply").join("last.json")
    }

    /// The installed release as recorded in `STATE/installed/`.
    pub fn installed(&self) -> Result<Option<Installed>> {
        read_installed(&self.state)
    }

    /// The installed release, with the manifest `known` (the node's copy)
    /// when the record names that release, read again otherwise.
    fn installed_as(&self, known: Option<&std::sync::Arc<Manifest>>) -> Result<Option<Installed>> {
        let Some(record) = read_install_record(&self.state)? else {
            return Ok(None);
        };
        match known {
            Some(m) if m.release_name() == record.version => Ok(Some(Installed {
                manifest: m.clone(),
                record,
            })),
            _ => self.installed(),
        }
    }

    /// How the last apply ended, if there was one.
    /// Rotates the application's output log if it grew past its bound.
    pub fn rotate_app_log(&self) -> std::io::Result<bool> {
        self.app.rotate_log()
    }

    pub fn last(&self) -> Option<Outcome> {
        let text = fs::read(self.last_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Whether an apply was interrupted and waits for [`Applier::recover`].
    pub fn pending(&self) -> bool {
        self.journal_path().exists()
    }

    fn write_journal(&self, journal: &Journal) -> Result<()> {
        let path = self.journal_path();
        let text = serde_json::to_vec_pretty(journal)?;
        write_synced(&path, &text).with_context(|| format!("cannot write {}", path.display()))
    }

    fn finish(&self, outcome: &Outcome) {
        if let Ok(text) = serde_json::to_vec_pretty(outcome) {
            if let Err(e) = write_synced(&self.last_path(), &text) {
                warn!(error = %e, "cannot record how the apply ended");
            }
        }
    }

    /// Installs `release`, reporting each step. Ends committed, rolled back
    /// (the old release back in place and started), or failed before the
    /// install directory was touched.
    pub fn apply(&self, release: &Release, report: &mut dyn FnMut(Event)) -> Outcome {
        let mut say = narrator(report);
        let version = release.manifest.release_name();
        let installed = match self.installed_as(release.installed.as_ref()) {
            Ok(i) => i,
            Err(e) => return self.failed(&version, None, format!("{e:#}"), &mut say),
        };
        let from = installed.as_ref().map(|i| i.manifest.release_name());
        let journal = match self.prepare(release, installed.as_ref(), &mut say) {
            Ok(j) => j,
            Err(e) => {
                let _ = fs::remove_dir_all(self.work());
                let _ = fs::remove_dir_all(self.next_dir());
                return self.failed(&version, from, format!("{e:#}"), &mut say);
            }
        };
        say(
            "begin",
            format!(
                "journal begin: {} → {version}, {} files in, {} aside",
                from.as_deref().unwrap_or("nothing installed"),
                journal.new_files.len(),
                journal.aside.len()
            ),
        );
        fault("begin");
        let old_name = installed
            .as_ref()
            .and_then(|i| i.manifest.restart.app_name.clone());
        let name = self.app.name(old_name.as_deref());
        if let Err(reason) = self.switch_over(release, &mut say) {
            return self.failed(&version, from, reason, &mut say);
        }
        let stopped = match self.app.stop(name) {
            Ok(s) => s,
            Err(e) => return self.roll_back(journal, format!("{e}"), &mut say),
        };
        let stopped_at = Instant::now();
        say("stop", stop_said(&stopped));
        fault("stopped");
        if let Err(e) = self.swap(&journal, &mut say) {
            return self.roll_back(journal, format!("{e:#}"), &mut say);
        }
        let mut journal = journal;
        journal.phase = Phase::Swapped;
        if let Err(e) = self.write_journal(&journal) {
            return self.roll_back(journal, format!("{e:#}"), &mut say);
        }
        say(
            "swapped",
            "journal swapped: the new files are in place".into(),
        );
        fault("swapped");
        let downtime = if journal.start_new {
            match self.start_and_check(release, &stopped, stopped_at, &mut say) {
                Ok(downtime) => downtime,
                Err(reason) => return self.roll_back(journal, reason, &mut say),
            }
        } else {
            say(
                "start",
                "not started: the release's RestartApp says no".into(),
            );
            None
        };
        journal.phase = Phase::Committed;
        if let Err(e) = self.write_journal(&journal) {
            return self.roll_back(journal, format!("{e:#}"), &mut say);
        }
        fault("committed");
        self.finish_commit(&journal);
        fault("cleaned");
        self.committed(version, from, downtime, &mut say)
    }

    /// The active member of a redundancy group hands over to its standby
    /// before it stops what it runs: why it could not (nothing was moved
    /// and nothing stopped, so the application runs on untouched).
    fn switch_over(
        &self,
        release: &Release,
        say: &mut dyn FnMut(&str, String),
    ) -> Result<(), String> {
        let Some((argv, timeout)) = &release.switchover else {
            return Ok(());
        };
        if let Err(e) = self.app.run_bounded(argv, *timeout, "switchover_timeout") {
            let _ = ignore_missing(fs::remove_file(self.journal_path()));
            let _ = fs::remove_dir_all(self.work());
            let _ = fs::remove_dir_all(self.next_dir());
            return Err(format!(
                "the switchover command `{}` failed: {e}",
                argv.join(" ")
            ));
        }
        say(
            "switchover",
            format!("ran the switchover command `{}`", argv.join(" ")),
        );
        Ok(())
    }

    /// Starts the new release and checks its health: how long the
    /// application was down (if it ran before), or why it must roll back.
    fn start_and_check(
        &self,
        release: &Release,
        stopped: &crate::app::Stopped,
        stopped_at: Instant,
        say: &mut dyn FnMut(&str, String),
    ) -> Result<Option<Duration>, String> {
        let version = release.manifest.release_name();
        let restart = &release.manifest.restart;
        let new_name = restart.app_name.as_deref();
        let started = self
            .app
            .start(restart.exe.as_deref(), new_name)
            .map_err(|e| e.to_string())?;
        let downtime = (!stopped.pids.is_empty()).then(|| stopped_at.elapsed());
        say("start", format!("started {version} ({started})"));
        fault("started");
        self.app.check_health(&started).map_err(|e| e.to_string())?;
        say(
            "health",
            format!(
                "healthy: still running after {:?}{}",
                self.app.config.health_after,
                if self.app.config.health_command.is_some() {
                    " and the health command passed"
                } else {
                    ""
                }
            ),
        );
        fault("healthy");
        Ok(downtime)
    }

    /// The apply committed: its outcome, recorded, and the journal gone.
    fn committed(
        &self,
        version: String,
        from: Option<String>,
        downtime: Option<Duration>,
        say: &mut dyn FnMut(&str, String),
    ) -> Outcome {
        let outcome = Outcome {
            version: version.clone(),
            from,
            ending: Ending::Committed,
            reason: None,
            downtime_ms: downtime.map(|d| d.as_millis() as u64),
            finished_at: unix_now(),
        };
        say(
            "committed",
            match downtime {
                Some(d) => format!(
                    "committed {version}; the application was down {} ms",
                    d.as_millis()
                ),
                None => format!("committed {version}"),
            },
        );
        self.finish(&outcome);
        let _ = ignore_missing(fs::remove_file(self.journal_path()));
        outcome
    }

    fn failed(
        &self,
        version: &str,
        from: Option<String>,
        reason: String,
        say: &mut dyn FnMut(&str, String),
    ) -> Outcome {
        say(
            "failed",
            format!("not installed, nothing changed: {reason}"),
        );
        let outcome = Outcome {
            version: version.to_owned(),
            from,
            ending: Ending::Failed,
            reason: Some(reason),
            downtime_ms: None,
            finished_at: unix_now(),
        };
        self.finish(&outcome);
        outcome
    }

    /// Everything before the first change to the install directory: checks,
    /// the copy of the new files next to it, the journal's `begin`.
    fn prepare(
        &self,
        release: &Release,
        installed: Option<&Installed>,
        say: &mut dyn FnMut(&str, String),
    ) -> Result<Journal> {
        let manifest = &release.manifest;
        let version = manifest.release_name();
        self.check_release(release, installed)?;
        let install = self.install_dir();
        let old_name = installed.and_then(|i| i.manifest.restart.app_name.as_deref());
        // Anything there is left from a copy that was cut short.
        ignore_missing(fs::remove_dir_all(self.work()))
            .with_context(|| format!("cannot clear {}", self.work().display()))?;
        let unchanged = match installed {
            Some(i) => unchanged_files(install, &i.manifest, manifest)?,
            None => HashSet::new(),
        };
        let copied = self.copy_new(release, &unchanged)?;
        say(
            "verify",
            format!(
                "checked and copied {} files ({}) into {}; {} unchanged files stay in place",
                manifest.files.len() - unchanged.len(),
                lanup_protocol::units::format_bytes(copied),
                self.place(Place::New).display(),
                unchanged.len()
            ),
        );
        fault("copied");
        self.record_next(release)?;
        // The swap moves only what changes: files the installed release
        // has and the new one does not, and files whose bytes or mode
        // differ.
        let old_files: BTreeSet<String> = installed
            .map(|i| {
                i.manifest
                    .files
                    .iter()
                    .filter(|f| !unchanged.contains(&f.name))
                    .map(|f| f.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        let new_files = manifest
            .files
            .iter()
            .filter(|f| !unchanged.contains(&f.name))
            .map(|f| f.name.clone())
            .collect();
        let kind = |name: &str| match fs::symlink_metadata(install.join(name)) {
            Ok(m) if m.is_dir() => Kind::Dir,
            Ok(_) => Kind::File,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Kind::Missing,
            Err(_) => Kind::File,
        };
        let mut journal = Journal::begin(
            installed.map(|i| i.manifest.release_name()),
            version,
            &old_files,
            new_files,
            kind,
        )?;
        journal.was_running = !self.app.processes(self.app.name(old_name)).is_empty();
        journal.start_new = manifest.restart.allow;
        self.write_journal(&journal)?;
        Ok(journal)
    }

    /// Checks before anything is copied: no apply unfinished, a release in
    /// the right direction, processes it can tell as the application's, an
    /// install directory, and files it may write.
    fn check_release(&self, release: &Release, installed: Option<&Installed>) -> Result<()> {
        let manifest = &release.manifest;
        let version = manifest.release_name();
        if self.pending() {
            bail!(
                "an earlier apply is unfinished ({}); the node resolves it when it starts",
                self.journal_path().display()
            );
        }
        if let Some(i) = installed {
            let order = manifest.compare_release(&i.manifest);
            let installed = i.manifest.release_name();
            match (release.rollback, order) {
                (false, std::cmp::Ordering::Greater) | (true, std::cmp::Ordering::Less) => {}
                (false, _) => bail!("{version} is not newer than the installed {installed}"),
                (true, _) => bail!(
                    "{version} is not older than the installed {installed}: a rollback returns to an older release"
                ),
            }
        }
        let old_name = installed.and_then(|i| i.manifest.restart.app_name.as_deref());
        let unnamed = self.app.name(old_name).is_none()
            || self
                .app
                .name(manifest.restart.app_name.as_deref())
                .is_none();
        if unnamed && !self.app.is_service() {
            bail!("cannot tell which processes are the application's: set app.name, or publish the release with an AppName");
        }
        let install = self.install_dir();
        if !install.is_dir() {
            fs::create_dir_all(install).with_context(|| {
                format!("cannot create install directory {}", install.display())
            })?;
        }
        for file in &manifest.files {
            check_file_name(&file.name)?;
            if file.name == WORK_DIR || file.name.starts_with(&format!("{WORK_DIR}/")) {
                bail!(
                    "{}: lanup keeps its own work in {WORK_DIR}; a release cannot list it",
                    file.name
                );
            }
            if file.hash.is_none() || file.size.is_none() {
                bail!(
                    "{}: the manifest gives no size or hash to check it by",
                    file.name
                );
            }
        }
        Ok(())
    }

    /// The release being installed, recorded before the journal names it.
    fn record_next(&self, release: &Release) -> Result<()> {
        let next = self.next_dir();
        let _ = fs::remove_dir_all(&next);
        write_text_synced(&next.join(MANIFEST_FILE), &release.text)?;
        write_synced(&next.join(SIGNATURE_FILE), release.signature.as_bytes())?;
        let record = InstallRecord {
            version: release.manifest.release_name(),
            install_dir: self.install_dir().to_owned(),
            installed_at: unix_now(),
        };
        write_synced(
            &next.join("install.json"),
            &serde_json::to_vec_pretty(&record)?,
        )?;
        Ok(())
    }

    /// Copies every staged file but the `unchanged` ones into `new`,
    /// checking its size and hash on the way and giving it the manifest's
    /// mode, then syncs it all. Returns the bytes copied.
    fn copy_new(&self, release: &Release, unchanged: &HashSet<String>) -> Result<u64> {
        let new = self.place(Place::New);
        // A release that only removes files, or changes none, copies
        // nothing: the folder is still made, so that syncing it holds.
        fs::create_dir_all(&new).with_context(|| format!("cannot create {}", new.display()))?;
        let mut dirs = BTreeSet::new();
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 20];
        for file in &release.manifest.files {
            if unchanged.contains(&file.name) {
                continue;
            }
            let src = release.staged.join(&file.name);
            let dest = new.join(&file.name);
            let dir = dest.parent().unwrap_or(&new).to_owned();
            fs::create_dir_all(&dir).with_context(|| {
                format!(
                    "cannot create {} (on the install directory's filesystem)",
                    dir.display()
                )
            })?;
            let mut input = File::open(&src)
                .with_context(|| format!("staged file {}: cannot read it", src.display()))?;
            let mut output =
                File::create(&dest).with_context(|| format!("cannot write {}", dest.display()))?;
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                let n = input
                    .read(&mut buf)
                    .with_context(|| format!("staged file {}: read failed", src.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                output.write_all(&buf[..n]).with_context(|| {
                    format!(
                        "cannot write {} ({} bytes of the release must fit beside the install)",
                        dest.display(),
                        release.manifest.total_size()
                    )
                })?;
                size += n as u64;
            }
            let hash: Hash = hasher.finalize().into();
            if Some(size) != file.size || Some(hash) != file.hash {
                bail!(
                    "staged file {}: {size} bytes hashing to {hash}, not what the manifest lists; it is staged again at the next fetch",
                    file.name
                );
            }
            if let Some(mode) = file.mode {
                crate::platform::set_mode(&output, mode)?;
            }
            output
                .sync_all()
                .with_context(|| format!("cannot write {}", dest.display()))?;
            total += size;
            dirs.insert(dir);
        }
        for dir in dirs.iter().chain([&new, &self.work()]) {
            sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
        }
        if let Some(parent) = self.install_dir().parent() {
            let _ = sync_dir(parent);
        }
        sync_dir(self.install_dir())?;
        Ok(total)
    }

    fn run_op(&self, op: &Op) -> io::Result<()> {
        match op {
            Op::Move { name, from, to } => {
                let src = self.place(*from).join(name);
                let dest = self.place(*to).join(name);
                match fs::symlink_metadata(&src) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(e),
                    // The journal moves files only; a folder here is not
                    // one the apply put aside.
                    Ok(m) if m.is_dir() => {
                        return Err(io::Error::other(format!(
                            "{} is a folder, not the file the journal names",
                            src.display()
                        )))
                    }
                    Ok(_) => {}
                }
                if *to != Place::Install {
                    if let Some(dir) = dest.parent() {
                        fs::create_dir_all(dir)?;
                    }
                }
                crate::platform::rename(&src, &dest).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot move {} to {}: {e}", src.display(), dest.display()),
                    )
                })
            }
            Op::Remove { name } => ignore_missing(fs::remove_file(self.install_dir().join(name))),
            Op::MakeDir { name } => match fs::create_dir(self.install_dir().join(name)) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                r => r,
            },
            Op::RemoveDir { name } => match fs::remove_dir(self.install_dir().join(name)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                    warn!(dir = %name, "folder is not empty; left in place");
                    Ok(())
                }
                r => r,
            },
        }
    }

    /// Syncs every folder the journal's names live in, in all three places.
    fn sync_places(&self, journal: &Journal) {
        let mut dirs = BTreeSet::new();
        for name in journal.aside.iter().chain(&journal.new_files) {
            for place in [Place::Install, Place::Old, Place::New] {
                if let Some(dir) = self.place(place).join(name).parent() {
                    dirs.insert(dir.to_owned());
                }
            }
        }
        for dir in dirs {
            if let Err(e) = ignore_missing(sync_dir(&dir)) {
                warn!(dir = %dir.display(), error = %e, "cannot sync folder");
            }
        }
    }

    fn swap(&self, journal: &Journal, say: &mut dyn FnMut(&str, String)) -> Result<()> {
        let plan = journal.swap_plan();
        let (mut aside, mut moved_in) = (0, 0);
        for op in &plan {
            self.run_op(op)?;
            match op {
                Op::Move { to: Place::Old, .. } => {
                    aside += 1;
                    if aside == 1 {
                        fault("aside-1");
                    }
                    if aside == journal.aside.len() {
                        say("aside", format!("moved {aside} old files aside"));
                        fault("aside");
                    }
                }
                Op::Move {
                    to: Place::Install, ..
                } => {
                    moved_in += 1;
                    if moved_in == 1 {
                        fault("in-1");
                    }
                }
                _ => {}
            }
        }
        self.sync_places(journal);
        say("in", format!("moved {moved_in} new files in"));
        fault("in");
        Ok(())
    }

    /// Stops the new release's process (if it started) and the old one's
    /// (`old_name`), before a rollback moves files back.
    fn stop_both(&self, old_name: Option<String>) {
        let new_name = self.next_name();
        for name in [new_name.as_deref(), old_name.as_deref()] {
            if let Err(e) = self.app.stop(self.app.name(name)) {
                warn!(error = %e, "cannot stop the application before the rollback");
            }
            if self.app.config.name.is_some() {
                break;
            }
        }
    }

    /// Puts the old release back: stops whatever runs, undoes the moves,
    /// starts the old application again if it was running, and records
    /// why. A rollback that cannot finish leaves the journal for the next
    /// start to try again.
    fn roll_back(
        &self,
        mut journal: Journal,
        reason: String,
        say: &mut dyn FnMut(&str, String),
    ) -> Outcome {
        say("rollback", format!("rolling back: {reason}"));
        let installed = self.installed().ok().flatten();
        let old = installed.as_ref().map(|i| &i.manifest.restart);
        self.stop_both(old.and_then(|r| r.app_name.clone()));
        fault("rollback-stopped");
        let mut undone = Ok(());
        for op in rollback_plan(&journal) {
            if let Err(e) = self.run_op(&op) {
                undone = Err(e);
                break;
            }
        }
        self.sync_places(&journal);
        let _ = sync_dir(self.install_dir());
        fault("rollback-files");
        let version = journal.to.clone();
        if let Err(e) = undone {
            let reason = format!(
                "{reason}; and the rollback failed ({e}); the node tries again when it next starts"
            );
            say("rolled-back", reason.clone());
            return Outcome {
                version,
                from: journal.from.clone(),
                ending: Ending::RolledBack,
                reason: Some(reason),
                downtime_ms: None,
                finished_at: unix_now(),
            };
        }
        if journal.was_running {
            let restart = old.cloned().unwrap_or_default();
            let what = format!(
                "{} again",
                journal.from.as_deref().unwrap_or("the old release")
            );
            self.start_quietly(&restart, &what, say);
        }
        fault("rollback-started");
        journal.phase = Phase::RolledBack;
        journal.reason = Some(reason.clone());
        if let Err(e) = self.write_journal(&journal) {
            warn!(error = %format!("{e:#}"), "cannot record the rollback in the journal");
        }
        fault("rolled-back");
        self.clean_up();
        let outcome = Outcome {
            version,
            from: journal.from.clone(),
            ending: Ending::RolledBack,
            reason: Some(reason.clone()),
            downtime_ms: None,
            finished_at: unix_now(),
        };
        say(
            "rolled-back",
            format!(
                "rolled back to {}: {reason}",
                journal.from.as_deref().unwrap_or("nothing installed")
            ),
        );
        self.finish(&outcome);
        let _ = ignore_missing(fs::remove_file(self.journal_path()));
        outcome
    }

    /// The app name of the release being installed, from `apply/next`.
    fn next_name(&self) -> Option<String> {
        parse_file(&self.next_dir().join(MANIFEST_FILE))
            .ok()?
            .restart
            .app_name
    }

    /// Removes the work folder and the record of the release that was not
    /// installed.
    fn clean_up(&self) {
        if let Err(e) = ignore_missing(fs::remove_dir_all(self.work())) {
            warn!(dir = %self.work().display(), error = %e, "cannot remove the apply's work folder");
        }
        let _ = fs::remove_dir_all(self.next_dir());
    }

    /// After `committed`: the new release becomes the recorded one, the
    /// folders only the old release used go, and so does the backup.
    fn finish_commit(&self, journal: &Journal) {
        if let Err(e) = promote(&self.state, &self.next_dir()) {
            warn!(error = %e, "cannot record the installed release");
        }
        for op in commit_plan(journal) {
            if let Err(e) = self.run_op(&op) {
                warn!(error = %e, "cannot remove a folder the old release used");
            }
        }
        if let Err(e) = ignore_missing(fs::remove_dir_all(self.work())) {
            warn!(dir = %self.work().display(), error = %e, "cannot remove the old release's backup");
        }
        let _ = sync_dir(self.install_dir());
    }

    /// Resolves what an interrupted apply left, before the node does
    /// anything else: a committed apply is finished, anything earlier is
    /// rolled back and the old application started. Returns how it ended,
    /// or `None` when there was nothing to resolve.
    pub fn recover(&self, report: &mut dyn FnMut(Event)) -> Result<Option<Outcome>> {
        let path = self.journal_path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A copy cut short before `begin` touched nothing else.
                if self.work().exists() {
                    info!(dir = %self.work().display(), "removing an unfinished copy of a release (the install was not touched)");
                    self.clean_up();
                }
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let journal: Journal = serde_json::from_slice(&text).with_context(|| {
            format!(
                "{}: unreadable apply journal; check {} by hand, then remove it",
                path.display(),
                self.install_dir().display()
            )
        })?;
        let mut say = narrator(report);
        let outcome = match journal.recovery() {
            Recovery::RollBack => {
                let phase = journal.phase.as_str();
                let reason = format!(
                    "the node stopped during the apply (at journal {phase}); the old release was put back when it started again"
                );
                self.roll_back(journal, reason, &mut say)
            }
            Recovery::CleanUp => {
                let ending = if journal.phase == Phase::Committed {
                    self.finish_commit(&journal);
                    say(
                        "committed",
                        format!("finished the committed install of {}", journal.to),
                    );
                    Ending::Committed
                } else {
                    self.clean_up();
                    Ending::RolledBack
                };
                let outcome = Outcome {
                    version: journal.to.clone(),
                    from: journal.from.clone(),
                    ending,
                    reason: journal.reason.clone(),
                    downtime_ms: None,
                    finished_at: unix_now(),
                };
                self.ensure_running(&journal, &mut say);
                self.finish(&outcome);
                let _ = ignore_missing(fs::remove_file(&path));
                outcome
            }
        };
        Ok(Some(outcome))
    }

    /// After a crash past the apply's last start: the application that
    /// should run (the new one if committed, the old one if it was running)
    /// is started if it does not.
    fn ensure_running(&self, journal: &Journal, say: &mut dyn FnMut(&str, String)) {
        let should = match journal.phase {
            Phase::Committed => journal.start_new,
            _ => journal.was_running,
        };
        let Ok(Some(installed)) = self.installed() else {
            return;
        };
        let restart = &installed.manifest.restart;
        let name = self.app.name(restart.app_name.as_deref());
        if !should || !self.app.processes(name).is_empty() {
            return;
        }
        self.start_quietly(restart, &installed.manifest.release_name(), say);
    }

    /// Starts the application of a release that is already in place (no
    /// health check: there is nothing left to fall back to).
    fn start_quietly(&self, restart: &Restart, what: &str, say: &mut dyn FnMut(&str, String)) {
        match self
            .app
            .start(restart.exe.as_deref(), restart.app_name.as_deref())
        {
            Ok(s) => say("start", format!("started {what} ({s})")),
            Err(e) => warn!(error = %e, "cannot start {what}"),
        }
    }
}

/// Makes `next` the recorded installed release. Each step can be run again
/// after a crash.
fn promote(state: &Path, next: &Path) -> io::Result<()> {
    if !next.exists() {
        return Ok(());
    }
    let installed = state.join("installed");
    let prev = state.join("installed.prev");
    if installed.exists() {
        ignore_missing(fs::remove_dir_all(&prev))?;
        crate::platform::rename(&installed, &prev)?;
    }
    crate::platform::rename(next, &installed)?;
    sync_dir(state)?;
    ignore_missing(fs::remove_dir_all(&prev))
}

/// Reads `STATE/installed/`: the installed release's manifest and record.
pub fn read_installed(state: &Path) -> Result<Option<Installed>> {
    let Some(record) = read_install_record(state)? else {
        return Ok(None);
    };
    let manifest = parse_file(&state.join("installed").join(MANIFEST_FILE))?.into();
    Ok(Some(Installed { manifest, record }))
}

/// What `STATE/installed/install.json` records, without the manifest.
pub fn read_install_record(state: &Path) -> Result<Option<InstallRecord>> {
    let record_path = state.join("installed").join("install.json");
    let record = match fs::read(&record_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", record_path.display())),
    };
    serde_json::from_slice(&record)
        .map(Some)
        .with_context(|| format!("{}: not an install record", record_path.display()))
}

/// The manifest in the file at `path`, parsed as it is read: the text of
/// a large release (27 MB for 100,000 files) is never held whole.
pub fn parse_file(path: &Path) -> Result<Manifest> {
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    Manifest::parse_reader(io::BufReader::with_capacity(1 << 16, file))
        .with_context(|| format!("{}", path.display()))
}

/// What stopping the application did, as the apply's record says it.
fn stop_said(stopped: &crate::app::Stopped) -> String {
    if stopped.pids.is_empty() {
        "the application was not running".to_owned()
    } else {
        let mut said = format!("stopped the application (pids {:?}", stopped.pids);
        if !stopped.killed.is_empty() {
            said += &format!(
                "; {:?} ignored the stop request and were ended",
                stopped.killed
            );
        }
        if !stopped.ended.is_empty() {
            said += &format!(
                "; {:?} had no window to close and were ended",
                stopped.ended
            );
        }
        said + ")"
    }
}
