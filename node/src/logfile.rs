//! Size-bounded log files: the audit log and the application's output are
//! rotated by size (`FILE`, then `FILE.1` … `FILE.N`, oldest last), so a
//! node left running for months keeps a bounded amount of history.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// `path` with `.n` appended (`path` itself for 0).
fn numbered(path: &Path, n: usize) -> PathBuf {
    if n == 0 {
        return path.to_owned();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The files of a log kept with `keep` rotated copies, oldest first (those
/// that exist).
pub fn files_oldest_first(path: &Path, keep: usize) -> Vec<PathBuf> {
    (0..=keep)
        .rev()
        .map(|n| numbered(path, n))
        .filter(|p| p.exists())
        .collect()
}

/// Moves `FILE.1` … to `FILE.2` …, dropping the oldest beyond `keep`.
fn shift(path: &Path, keep: usize) -> io::Result<()> {
    match fs::remove_file(numbered(path, keep)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    for n in (1..keep).rev() {
        match fs::rename(numbered(path, n), numbered(path, n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn too_big(path: &Path, max: u64) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() >= max)
}

/// Rotates a log nobody holds open for writing (renames it to `FILE.1`)
/// once it has reached `max` bytes. Returns whether it rotated.
pub fn rotate(path: &Path, max: u64, keep: usize) -> io::Result<bool> {
    if keep == 0 || !too_big(path, max) {
        return Ok(false);
    }
    shift(path, keep)?;
    fs::rename(path, numbered(path, 1))?;
    Ok(true)
}

/// Rotates a log a running process appends to (its output): copies it to
/// `FILE.1` and empties it in place, since the process keeps writing to
/// the file it opened. Lines written between the copy and the truncation
/// are lost, as with logrotate's `copytruncate`.
pub fn rotate_in_place(path: &Path, max: u64, keep: usize) -> io::Result<bool> {
    if keep == 0 || !too_big(path, max) {
        return Ok(false);
    }
    shift(path, keep)?;
    fs::copy(path, numbered(path, 1))?;
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// A log file this process writes, rotated by size as it grows: the node's
/// own log where no service manager keeps one (a Windows service).
#[derive(Debug)]
pub struct Rotating {
    path: PathBuf,
    max: u64,
    keep: usize,
    file: fs::File,
    len: u64,
}

impl Rotating {
    /// Opens `path` for appending, rotated at `max` bytes with `keep` older
    /// files.
    pub fn open(path: &Path, max: u64, keep: usize) -> io::Result<Rotating> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_owned(),
            max,
            keep,
            file,
            len,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        // Closed before it is renamed: Windows renames no file that is
        // open without shared delete access.
        let fresh = tempfile::tempfile()?;
        drop(std::mem::replace(&mut self.file, fresh));
        let rotated = rotate(&self.path, self.max, self.keep);
        self.file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.len = self.file.metadata()?.len();
        rotated.map(|_| ())
    }
}

impl io::Write for Rotating {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len >= self.max {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_by_size_and_keep_a_bounded_history() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("x.log");
        for i in 0..10u8 {
            fs::write(&log, [i; 100])?;
            assert!(rotate(&log, 100, 3)?);
        }
        assert!(!log.exists());
        let kept = files_oldest_first(&log, 3);
        let firsts: Vec<u8> = kept
            .iter()
            .map(|p| fs::read(p).map(|b| b[0]))
            .collect::<io::Result<_>>()?;
        assert_eq!(firsts, [7, 8, 9], "the newest three, oldest first");
        fs::write(&log, [1; 10])?;
        assert!(!rotate(&log, 100, 3)?, "small logs stay");

        let out = dir.path().join("app.log");
        fs::write(&out, [5; 200])?;
        let mut writer = fs::OpenOptions::new().append(true).open(&out)?;
        assert!(rotate_in_place(&out, 100, 2)?);
        std::io::Write::write_all(&mut writer, b"after")?;
        assert_eq!(
            fs::read(&out)?,
            b"after",
            "the writer goes on in the same file"
        );
        assert_eq!(fs::read(numbered(&out, 1))?.len(), 200);
        Ok(())
    }
}
