//! The audit log: every rollout command a node accepted or refused (who
//! signed it, what it asked, when, and why it was refused), and what the
//! node did about it, one JSON line each in `STATE/audit.jsonl`. It is only
//! appended to and survives restarts; `lanup history` reads it. At
//! [`MAX_BYTES`] it is rotated (`audit.jsonl.1` … `.3` kept), so the
//! history a node keeps is bounded and still readable whole.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The log's file name in the state directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// The size at which the audit log is rotated: thousands of commands.
pub const MAX_BYTES: u64 = 1 << 20;

/// Rotated audit logs kept beside the current one.
pub const KEEP: usize = 3;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Milliseconds since the Unix epoch, by this node's clock.
    pub at_ms: u64,
    /// `accepted`, `refused`, or what the node did: `applied`,
    /// `rolled-back`, `halted`, `done`.
    pub event: String,
    /// The command's action (`rollout`, `abort`, `rollback`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The command's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The admin key that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Where it came from: `this node's CLI` or the peer that sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Milliseconds since the Unix epoch when it was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at_ms: Option<u64>,
    /// Why it was refused, or what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long the application was down, for an apply that committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// The node that recorded it, when entries of several nodes are put
    /// together (`lanup history --change`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For a command valid longer than a day (a fleet rollout's): until
    /// when its id must be remembered to refuse it again (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget_at_ms: Option<u64>,
}

impl Entry {
    /// An entry at `at_ms` with nothing else filled in.
    pub fn default_at(at_ms: u64) -> Entry {
        Entry {
            at_ms,
            event: String::new(),
            action: None,
            version: None,
            id: None,
            key: None,
            from: None,
            issued_at_ms: None,
            reason: None,
            downtime_ms: None,
            node: None,
            forget_at_ms: None,
        }
    }
}

/// The audit log of one state directory.
#[derive(Debug, Clone)]
pub struct Audit {
    path: PathBuf,
    max_bytes: u64,
}

impl Audit {
    pub fn new(state: &Path) -> Audit {
        Audit {
            path: state.join(AUDIT_FILE),
            max_bytes: MAX_BYTES,
        }
    }

    /// The same log, rotated at `max_bytes` (for tests).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Audit {
        self.max_bytes = max_bytes;
        self
    }

    /// Appends `entry` and syncs it: an audit line that a crash can take
    /// back is not much of a record.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        crate::logfile::rotate(&self.path, self.max_bytes, KEEP)
            .with_context(|| format!("cannot rotate {}", self.path.display()))?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.write_all(&line)?;
        file.sync_data()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Every entry, oldest first. A line that does not parse (a torn last
    /// line after a power cut) is skipped.
    pub fn read(&self) -> Result<Vec<Entry>> {
        read(&self.path)
    }
}

/// Reads an audit log and its rotated files, oldest first; a missing log
/// is an empty one.
pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for file in crate::logfile::files_oldest_first(path, KEEP) {
        entries.extend(read_one(&file)?);
    }
    Ok(entries)
}

fn read_one(path: &Path) -> Result<Vec<Entry>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut entries = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if let Ok(entry) = serde_json::from_str(&line) {
            entries.push(entry);
        }
    }
    Ok(entries)
}

/// The entries about change `id` in the log at `path`, oldest first, at
/// most `max` (the newest kept).
pub fn about(path: &Path, id: &str, max: usize) -> Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = read(path)?
        .into_iter()
        .filter(|e| e.id.as_deref() == Some(id))
        .collect();
    let extra = entries.len().saturating_sub(max);
    entries.drain(..extra);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_history_is_rotated_and_read_back_in_order() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let audit = Audit::new(dir.path()).with_max_bytes(1000);
        for i in 0..100u64 {
            let mut e = Entry::default_at(i);
            e.event = "refused".into();
            e.reason = Some(format!("number {i}"));
            audit.append(&e)?;
        }
        let total: u64 = crate::logfile::files_oldest_first(&dir.path().join(AUDIT_FILE), KEEP)
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        assert!(total <= 4 * 1000 + 200, "{total} bytes kept");
        let read = audit.read()?;
        let at: Vec<u64> = read.iter().map(|e| e.at_ms).collect();
        assert_eq!(at.last(), Some(&99));
        assert!(
            at.windows(2).all(|w| w[1] == w[0] + 1),
            "oldest first, none missing in between: {at:?}"
        );
        assert!(at.len() < 100, "the oldest were dropped");
        Ok(())
    }
}
