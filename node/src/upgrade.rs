//! lanup updating lanup: a release whose application is `lanup` replaces
//! the node's own binary.
//!
//! It is staged and rolled out like any other release (waves, halts,
//! audit); when a node's wave comes, the node stops its parts (swarm,
//! chunk server, fetcher, control socket) and [`hand_over`] takes it from
//! there, in the same process:
//!
//! 1. the staged binary is checked against the manifest and copied next to
//!    the installed one; the journal (`STATE/upgrade/journal.json`, synced)
//!    says a trial is under way; the installed binary is hard-linked aside
//!    and the new one renamed over it, so at every moment the path holds
//!    exactly the old or exactly the new binary and the old one is kept;
//! 2. the new binary runs as a *trial* node (same arguments, `LANUP_TRIAL`
//!    set: it applies nothing and leaves the journal alone). It must answer
//!    on the control socket as the new version, and hear the site again if
//!    this node heard it before, within `self_update_timeout`;
//! 3. proven: the trial node is stopped, the journal committed and the old
//!    binary dropped, and this process executes the new binary (same pid, so
//!    a service manager sees the same service). Not proven (it exited, hung
//!    or stayed alone): it is killed, the old binary renamed back, the
//!    reason recorded (`STATE/upgrade/last.json`, audit log) and the old
//!    binary executed again. The restarted node reports the failure, which
//!    halts the rollout.
//!
//! A node that stopped in the middle (power cut, SIGKILL) finds the journal
//! when it starts, by whichever binary it started with, and puts the old
//! binary back unless the journal was committed. A node several releases
//! behind installs the newest one directly.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lanup_protocol::{Hash, Manifest};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::apply::{write_synced, Ending, Outcome, Release};
use crate::audit::{Audit, Entry};
use crate::control::{self, ControlRequest};

/// The application name that marks a release of lanup itself.
pub const LANUP_APP: &str = "lanup";

/// Set in the environment of a node on trial.
pub const TRIAL_ENV: &str = "LANUP_TRIAL";

/// The version of the running lanup.
///
/// Builds with the `fault-injection` feature (tests only) read a version
/// stamped at the end of their own executable (`\nLANUP-TEST-VERSION=X\n`,
/// bytes an ELF loader ignores), so a test can publish the binary it
/// built as a newer lanup without building a second one.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        #[cfg(feature = "fault-injection")]
        if let Some(v) = stamped_version() {
            return v;
        }
        env!("CARGO_PKG_VERSION").to_owned()
    })
}

#[cfg(feature = "fault-injection")]
fn stamped_version() -> Option<String> {
    use std::io::{Seek, SeekFrom};
    const MARK: &str = "\nLANUP-TEST-VERSION=";
    let mut file = std::fs::File::open(binary().ok()?).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    let at = tail.rfind(MARK)?;
    let v = tail[at + MARK.len()..].trim_end_matches('\n');
    (!v.is_empty() && !v.contains('\n')).then(|| v.to_owned())
}

/// Whether `manifest` is a release of lanup itself.
pub fn is_lanup(manifest: &Manifest) -> bool {
    manifest.restart.app_name.as_deref() == Some(LANUP_APP)
}

/// Whether this process is a new lanup on trial.
pub fn on_trial() -> bool {
    std::env::var_os(TRIAL_ENV).is_some()
}

/// Whether this is a trial node whose parent, the node that started it,
/// is gone (killed during the trial): it must stop too, or it would hold
/// the state directory against the node's next start.
pub fn orphaned() -> bool {
    let Some(parent) = std::env::var(TRIAL_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    crate::platform::parent_pid().and_then(|p| i32::try_from(p).ok()) != Some(parent)
}

/// The binary this process was started from, as it was named then: a swap
/// later renames the running inode, and this stays where lanup is
/// installed.
pub fn binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINARY
        .get_or_init(|| std::env::current_exe().ok())
        .clone()
        .context("cannot tell which file this lanup runs from")
}

fn dir(state: &Path) -> PathBuf {
    state.join("upgrade")
}

fn journal_path(state: &Path) -> PathBuf {
    dir(state).join("journal.json")
}

fn leftover_path(state: &Path) -> PathBuf {
    dir(state).join("leftover")
}

fn last_path(state: &Path) -> PathBuf {
    dir(state).join("last.json")
}

/// The files beside the installed binary: the new one being copied in,
/// and the old one kept until the new one is proven. Same folder, so
/// every move is a rename on one filesystem.
fn beside(binary: &Path, what: &str) -> PathBuf {
    let name = binary
        .file_name()
        .map_or_else(|| "lanup".into(), |n| n.to_string_lossy().into_owned());
    binary.with_file_name(format!(".{name}.lanup-{what}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Phase {
    /// The new binary may be in place; the old one is kept aside.
    Trial,
    /// The new binary is proven; only the clean-up is left.
    Committed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    from: String,
    to: String,
    binary: PathBuf,
    phase: Phase,
    /// The rollout command that asked for it, for the audit log.
    #[serde(default)]
    id: Option<String>,
}

/// How the last update of lanup itself ended, if there was one.
pub fn last(state: &Path) -> Option<Outcome> {
    serde_json::from_slice(&std::fs::read(last_path(state)).ok()?).ok()
}

fn finish(state: &Path, outcome: &Outcome, id: Option<String>) {
    if let Ok(text) = serde_json::to_vec_pretty(outcome) {
        if let Err(e) = write_synced(&last_path(state), &text) {
            warn!(error = %e, "cannot record how the update of lanup ended");
        }
    }
    let entry = Entry {
        event: match outcome.ending {
            Ending::Committed => "applied",
            Ending::RolledBack => "rolled-back",
            Ending::Failed => "apply-failed",
        }
        .into(),
        action: Some("rollout".into()),
        version: Some(outcome.version.clone()),
        id,
        reason: outcome.reason.clone(),
        ..Entry::default_at(crate::node::now_unix_ms())
    };
    if let Err(e) = Audit::new(state).append(&entry) {
        warn!(error = %format!("{e:#}"), "cannot write the audit log");
    }
}

fn write_journal(state: &Path, journal: &Journal) -> Result<()> {
    let path = journal_path(state);
    write_synced(&path, &serde_json::to_vec_pretty(journal)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Err(e) = crate::platform::sync_dir(dir) {
            warn!(dir = %dir.display(), error = %e, "cannot sync the folder");
        }
    }
}

/// Resolves an update of lanup that was cut short, before the node does
/// anything else: the old binary back unless the journal was committed.
/// When this process is the binary that was taken out, it runs the one now
/// installed instead (and does not return).
pub fn recover(state: &Path) -> Result<()> {
    let path = journal_path(state);
    let Ok(bytes) = std::fs::read(&path) else {
        remove_leftover(state);
        return Ok(());
    };
    let journal: Journal = serde_json::from_slice(&bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let ending = match journal.phase {
        Phase::Committed => {
            let _ = std::fs::remove_file(beside(&journal.binary, "new"));
            let _ = std::fs::remove_file(beside(&journal.binary, "old"));
            info!(release = %journal.to, "finished the update of lanup cut short after it was proven");
            Ending::Committed
        }
        Phase::Trial => {
            undo(&journal.binary)?;
            warn!(release = %journal.to, "an update of lanup was cut short before the new lanup was proven; lanup {} is back", journal.from);
            Ending::RolledBack
        }
    };
    let outcome = Outcome {
        version: journal.to.clone(),
        from: Some(journal.from.clone()),
        reason: (ending == Ending::RolledBack)
            .then(|| "the node stopped before the new lanup was proven".to_owned()),
        ending,
        downtime_ms: None,
        finished_at: crate::node::now_unix_ms() / 1000,
    };
    finish(state, &outcome, journal.id.clone());
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    let installed = if outcome.ending == Ending::Committed {
        &journal.to
    } else {
        &journal.from
    };
    if installed != version() {
        info!(binary = %journal.binary.display(), "running the lanup now installed");
        return Err(restart(&journal.binary));
    }
    Ok(())
}

/// Removes the old binary a finished update could not delete. On Windows
/// the old binary is the running program's image when the update commits,
/// and cannot be deleted until that process has ended: the update names
/// it in `STATE/upgrade/leftover`, and the new lanup removes it when it
/// starts.
fn remove_leftover(state: &Path) {
    let marker = leftover_path(state);
    let Ok(named) = std::fs::read_to_string(&marker) else {
        return;
    };
    let old = PathBuf::from(named);
    match std::fs::remove_file(&old) {
        Ok(()) => info!(file = %old.display(), "removed the lanup the last update replaced"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(file = %old.display(), error = %e, "cannot remove the lanup the last update replaced");
            return;
        }
    }
    let _ = std::fs::remove_file(&marker);
}

/// Puts the old binary back in place of the new one, if it was set aside.
fn undo(binary: &Path) -> Result<()> {
    let old = beside(binary, "old");
    let _ = std::fs::remove_file(beside(binary, "new"));
    if old.exists() {
        crate::platform::rename(&old, binary).with_context(|| {
            format!(
                "cannot put the old lanup {} back in place of {}",
                old.display(),
                binary.display()
            )
        })?;
        sync_dir(binary);
    }
    Ok(())
}

/// What can be told of a lanup release without reading it: one file, named
/// as the installed binary, with a size and hash; not a rollback. The node
/// checks it before it stops for the release.
pub fn check_shape(release: &Release) -> Result<()> {
    let binary = binary()?;
    let m = &release.manifest;
    let name = binary
        .file_name()
        .context("the installed lanup has no file name")?
        .to_string_lossy();
    let [file] = m.files.as_slice() else {
        bail!(
            "a lanup release holds exactly one file, the lanup binary ({name}); {} lists {}",
            m.release_name(),
            m.files.len()
        );
    };
    if file.name != name {
        bail!(
            "the release's file {:?} is not the installed lanup's name {name:?}",
            file.name
        );
    }
    if release.rollback {
        bail!("lanup is not rolled back by command: roll out a newer lanup release");
    }
    if file.size.is_none() || file.hash.is_none() {
        bail!("{}: the manifest gives no size or hash", file.name);
    }
    Ok(())
}

/// Checks a lanup release before anything changes: its shape, and the
/// staged copy matching the manifest.
fn check(release: &Release) -> Result<PathBuf> {
    check_shape(release)?;
    let [file] = release.manifest.files.as_slice() else {
        bail!("a lanup release holds exactly one file");
    };
    let staged = release.staged.join(&file.name);
    let (Some(size), Some(hash)) = (file.size, file.hash) else {
        bail!("{}: the manifest gives no size or hash", file.name);
    };
    let mut reader = std::fs::File::open(&staged)
        .with_context(|| format!("cannot read the staged {}", staged.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    if len != size || Hash(*hasher.finalize().as_bytes()) != hash {
        bail!(
            "the staged {} does not match the manifest",
            staged.display()
        );
    }
    Ok(staged)
}

/// What the node hands over when its wave of a lanup release comes.
#[derive(Debug)]
pub struct Handover {
    pub release: Release,
    /// The rollout command, for the audit log.
    pub id: Option<String>,
    /// Whether the node heard other nodes: then the new one must too.
    pub had_peers: bool,
    /// How long the new lanup has to prove itself.
    pub timeout: Duration,
}

/// Installs the lanup release of `handover` and runs it (see the module's
/// documentation). Returns `Ok` only when `stop` completed during the trial
/// (the old lanup is back and the node stays stopped), and an error when
/// neither the new nor the old lanup could be executed.
pub async fn hand_over(
    state: &Path,
    handover: Handover,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let binary = binary()?;
    let to = handover.release.manifest.release_name();
    let from = version().to_owned();
    let began = Instant::now();
    let fail = |reason: String, rolled_back: bool| {
        warn!(release = %to, %reason, "the new lanup is not installed; lanup {from} runs on");
        let outcome = Outcome {
            version: to.clone(),
            from: Some(from.clone()),
            ending: if rolled_back {
                Ending::RolledBack
            } else {
                Ending::Failed
            },
            reason: Some(reason),
            downtime_ms: None,
            finished_at: crate::node::now_unix_ms() / 1000,
        };
        finish(state, &outcome, handover.id.clone());
    };
    let staged = match check(&handover.release) {
        Ok(s) => s,
        Err(e) => {
            fail(format!("{e:#}"), false);
            return Err(restart(&binary));
        }
    };
    let journal = Journal {
        from: from.clone(),
        to: to.clone(),
        binary: binary.clone(),
        phase: Phase::Trial,
        id: handover.id.clone(),
    };
    if let Err(e) = swap(state, &journal, &staged) {
        return Err(give_up(state, &binary, || fail(format!("{e:#}"), true)));
    }
    info!(release = %to, binary = %binary.display(), "the new lanup is in place; trying it");
    match trial(state, &binary, &handover, &to, stop).await {
        Trial::Stopped => {
            let reason = "the node was stopped while it tried the new lanup".to_owned();
            undo(&binary)?;
            let _ = std::fs::remove_file(journal_path(state));
            fail(reason, true);
            return Ok(());
        }
        Trial::Proven => {
            let mut journal = journal;
            journal.phase = Phase::Committed;
            if let Err(e) = write_journal(state, &journal) {
                warn!(error = %format!("{e:#}"), "cannot commit the update of lanup; putting the old lanup back");
                return Err(give_up(state, &binary, || fail(format!("{e:#}"), true)));
            }
            remove_old(state, &binary);
            let outcome = Outcome {
                version: to.clone(),
                from: Some(from.clone()),
                ending: Ending::Committed,
                reason: None,
                downtime_ms: Some(began.elapsed().as_millis() as u64),
                finished_at: crate::node::now_unix_ms() / 1000,
            };
            finish(state, &outcome, handover.id.clone());
            let _ = std::fs::remove_file(journal_path(state));
            info!(release = %to, took_ms = began.elapsed().as_millis() as u64, "the new lanup proved itself; running it");
        }
        Trial::Failed(reason) => {
            return Err(give_up(state, &binary, || {
                fail(format!("{reason:#}"), true)
            }))
        }
    }
    Err(restart(&binary))
}

/// Removes the old binary once the new one is committed. On Windows it
/// is this process's image until it ends: the new lanup removes it.
fn remove_old(state: &Path, binary: &Path) {
    let old = beside(binary, "old");
    if std::fs::remove_file(&old).is_err() && old.exists() {
        let _ = write_synced(&leftover_path(state), old.to_string_lossy().as_bytes());
    }
}

/// How a trial of a new lanup ended.
enum Trial {
    /// It answered as the new version and heard the site.
    Proven,
    /// It exited, hung or stayed alone.
    Failed(anyhow::Error),
    /// The node was told to stop meanwhile.
    Stopped,
}

/// Puts the old lanup back, records why (`record`) and runs it. If the old
/// binary cannot be put back the journal stays, and the next start of the
/// node (by its service manager) retries.
fn give_up(state: &Path, binary: &Path, record: impl FnOnce()) -> anyhow::Error {
    if let Err(e) = undo(binary) {
        return e.context("the next start of the node retries");
    }
    let _ = std::fs::remove_file(journal_path(state));
    record();
    restart(binary)
}

fn swap(state: &Path, journal: &Journal, staged: &Path) -> Result<()> {
    let binary = &journal.binary;
    let new = beside(binary, "new");
    let old = beside(binary, "old");
    let _ = std::fs::remove_file(&new);
    std::fs::copy(staged, &new)
        .with_context(|| format!("cannot copy the new lanup to {}", new.display()))?;
    // Opened for writing: Windows flushes a file only through a handle
    // that may write it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&new)
        .and_then(|file| {
            crate::platform::set_mode(&file, 0o755)?;
            file.sync_all()
        })
        .with_context(|| format!("cannot make {} durable", new.display()))?;
    write_journal(state, journal)?;
    let _ = std::fs::remove_file(&old);
    crate::platform::replace_running(binary, &new, &old).with_context(|| {
        format!(
            "cannot put the new lanup {} in place of {}, keeping the old one as {}",
            new.display(),
            binary.display(),
            old.display()
        )
    })?;
    sync_dir(binary);
    Ok(())
}

/// Whether the trial node's status proves it: it runs lanup `to` and,
/// where the node had peers, hears one of them. Why not, if it does not.
fn proves(status: &serde_json::Value, to: &str, had_peers: bool) -> Result<(), String> {
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    let me = nodes.iter().find(|n| n["self"] == true);
    let running = me.and_then(|n| n["lanup_version"].as_str());
    if running != Some(to) {
        return Err(format!(
            "it says it runs lanup {}",
            running.unwrap_or("(none)")
        ));
    }
    let heard = nodes
        .iter()
        .filter(|n| n["self"] != true)
        .any(|n| n["last_seen_ms"].as_u64().is_some_and(|ms| ms < 5_000));
    if had_peers && !heard {
        return Err("it runs but has not heard any other node of the site".into());
    }
    Ok(())
}

/// Runs the new binary on trial until it answers as the new version and
/// hears the site, or the time is up, or `stop` completes.
async fn trial(
    state: &Path,
    binary: &Path,
    handover: &Handover,
    to: &str,
    stop: impl std::future::Future<Output = ()>,
) -> Trial {
    let mut notifier = crate::platform::Notifier::from_env();
    let mut command = std::process::Command::new(binary);
    command
        .args(std::env::args_os().skip(1))
        // The trial node stops by itself if this process is gone.
        .env(TRIAL_ENV, std::process::id().to_string())
        .stdin(std::process::Stdio::null());
    let began = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Trial::Failed(anyhow::anyhow!(
                "cannot start the new lanup {}: {e}",
                binary.display()
            ))
        }
    };
    // The crash tests' hook: the node killed during the trial.
    crate::apply::fault("lanup-trial");
    let proven = async {
        let mut last = String::from("it has not answered yet");
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            notifier.alive();
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the new lanup exited {status} {:.1?} after it started",
                    began.elapsed()
                );
            }
            if began.elapsed() > handover.timeout {
                bail!(
                    "the new lanup did not prove itself within {:?}: {last}",
                    handover.timeout
                );
            }
            let asked = tokio::time::timeout(
                Duration::from_secs(2),
                control::ask(state, ControlRequest::Status),
            )
            .await;
            let Ok(Ok(status)) = asked else { continue };
            match proves(&status, to, handover.had_peers) {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
        }
    };
    let ended = tokio::select! {
        proven = proven => match proven {
            Ok(()) => Trial::Proven,
            Err(e) => Trial::Failed(e),
        },
        () = stop => Trial::Stopped,
    };
    // Proven or not, the trial node stops: asked, then ended (at once where
    // it cannot be asked: a Windows process without a window).
    if !crate::platform::request_stop(child.id()) {
        let _ = child.kill();
    }
    let stopping = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if stopping.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ended
}

/// Executes the lanup installed at `binary` in this process, with this
/// process's arguments; returns only the reason it could not.
fn restart(binary: &Path) -> anyhow::Error {
    let error =
        crate::platform::run_again(binary, std::env::args_os().collect(), &[(TRIAL_ENV, None)]);
    anyhow::anyhow!("cannot run {}: {error}", binary.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_lanup_an_update_could_not_delete_is_removed_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir_all(super::dir(&state)).expect("mkdir");
        let old = dir.path().join(".lanup.exe.lanup-old");
        let other = dir.path().join("another-nodes.lanup-old");
        std::fs::write(&old, b"the replaced lanup").expect("write");
        std::fs::write(&other, b"not this node's").expect("write");
        std::fs::write(leftover_path(&state), old.to_string_lossy().as_bytes()).expect("marker");
        recover(&state).expect("recover");
        assert!(!old.exists(), "the named leftover is removed");
        assert!(!leftover_path(&state).exists(), "and the marker with it");
        assert!(other.exists(), "nothing else is touched");
        // Gone already (removed by hand): the marker goes, nothing fails.
        std::fs::write(leftover_path(&state), old.to_string_lossy().as_bytes()).expect("marker");
        recover(&state).expect("recover");
        assert!(!leftover_path(&state).exists());
    }
}
