//! The platform seam on Linux (and other Unix systems).

pub mod app_service;
pub mod channel;
pub mod service;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;

use super::Space;

/// `path` as the kernel reports process paths: symbolic links resolved.
pub fn real_path(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Whether a process named `name` runs the program `wanted`, beyond the
/// names being equal (Windows drops `.exe`).
pub fn same_program(_name: &str, _wanted: &str) -> bool {
    false
}

/// Where a node keeps its state when nothing else is said.
pub const DEFAULT_STATE: &str = "/var/lib/lanup";
/// The configuration `lanup node` reads when given no `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/lanup/lanup.toml";

/// Whether stderr is the stream systemd connected to the journal: its
/// device and inode are the ones `JOURNAL_STREAM` names.
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// A file's permission bits, as a manifest records them (`Mode`).
pub fn mode(meta: &Metadata) -> u32 {
    meta.permissions().mode() & 0o777
}

/// Gives an open file the permission bits `mode`.
pub fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(mode))
}

/// Gives the file or folder at `path` the permission bits `mode`.
pub fn set_path_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Creates a file for writing that must not exist yet, with the
/// permission bits `mode` from its first moment.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

/// Creates a new file only its owner can read or write (a secret key).
pub fn create_private(path: &Path) -> io::Result<File> {
    create_new(path, 0o600)
}

/// Why others could read the private file at `path`, if they could.
pub fn exposed(path: &Path) -> io::Result<Option<String>> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then(|| {
        format!(
            "it is readable by others (mode {mode:o}); run `chmod 600 {}`",
            path.display()
        )
    }))
}

/// Writes all of `buf` at `offset`.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    FileExt::write_all_at(file, buf, offset)
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    FileExt::read_exact_at(file, buf, offset)
}

/// Renames `from` to `to`, replacing `to`. Durable once the folders are
/// synced ([`sync_dir`]).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)
}

/// Syncs a folder, so renames and new names in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Puts `new` in place of the running program `binary`, keeping the
/// running one as `old`: a hard link, then a rename over it, so `binary`
/// always names exactly the old or exactly the new program.
pub fn replace_running(binary: &Path, new: &Path, old: &Path) -> io::Result<()> {
    fs::hard_link(binary, old)?;
    sync_dir(binary.parent().unwrap_or(Path::new(".")))?;
    fs::rename(new, binary)
}

/// The space of the filesystem holding `path` (which must exist).
pub fn space(path: &Path) -> io::Result<Space> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(Space {
        filesystem: fs::metadata(path)?.dev(),
        free: stat.f_bavail.saturating_mul(stat.f_frsize),
        total: stat.f_blocks.saturating_mul(stat.f_frsize),
    })
}

/// The process groups of applications the node started, by the key
/// (install directory) they were started for.
static GROUPS: Mutex<Option<HashMap<PathBuf, u32>>> = Mutex::new(None);

/// Prepares `command` to start an application that outlives the node: in
/// a process group of its own, so a signal to the node's group (Ctrl-C)
/// does not reach it and [`stop_tree`] reaches all of it.
pub fn detach(command: &mut Command) {
    command.process_group(0);
}

/// Records `child`, started by a [`detach`]ed command, as the process tree
/// of `key`.
pub fn adopt(child: &Child, key: &Path) -> io::Result<()> {
    if let Ok(mut groups) = GROUPS.lock() {
        groups
            .get_or_insert_with(HashMap::new)
            .insert(key.to_owned(), child.id());
    }
    Ok(())
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Asks a process to stop: SIGTERM. Returns whether it could be asked
/// (always, on Unix).
pub fn request_stop(pid: u32) -> bool {
    signal(pid, rustix::process::Signal::TERM);
    true
}

/// Ends a process at once: SIGKILL.
pub fn kill(pid: u32) {
    signal(pid, rustix::process::Signal::KILL);
}

/// Ends whatever is left of the process tree this node started for `key`
/// (its process group), and forgets it. `stopped` are the application's
/// processes just stopped: the group is ended only when its leader was one
/// of them, so a group id that a long-gone application left behind, and
/// the system has since given to another process, is never signalled.
pub fn stop_tree(key: &Path, stopped: &[u32]) {
    let group = GROUPS
        .lock()
        .ok()
        .and_then(|mut g| g.as_mut().and_then(|g| g.remove(key)))
        .filter(|leader| stopped.contains(leader));
    if let Some(pid) = group
        .and_then(|g| i32::try_from(g).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// The process that started this one, if it still runs.
pub fn parent_pid() -> Option<u32> {
    rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
}

/// Ends this process at once, with nothing flushed (the crash tests).
pub fn crash() {
    kill(std::process::id());
}

/// Runs `binary` in place of this process, with `args` (the first is the
/// name it runs as) and `env` changes; returns only the reason it could
/// not. The pid stays, so a service manager sees the same service.
pub fn run_again(binary: &Path, args: Vec<OsString>, env: &[(&str, Option<&str>)]) -> io::Error {
    let mut args = args.into_iter();
    let mut again = Command::new(binary);
    if let Some(arg0) = args.next() {
        again.arg0(arg0);
    }
    again.args(args);
    for (key, value) in env {
        match value {
            Some(v) => again.env(key, v),
            None => again.env_remove(key),
        };
    }
    again.exec()
}
