//! The platform seam on Windows. The calls the standard library lacks go
//! to the system through `windows-sys`; each `unsafe` block says why it is
//! sound.
#![allow(unsafe_code)]

pub mod app_service;
pub mod channel;
mod job;
mod security;
pub mod service;

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::fs::FileExt;
use std::os::windows::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use windows_sys::Win32::Foundation::{CloseHandle, HWND, LPARAM, WPARAM};
use windows_sys::Win32::Storage::FileSystem::{
    GetDiskFreeSpaceExW, GetVolumePathNameW, MoveFileExW, MOVEFILE_REPLACE_EXISTING,
    MOVEFILE_WRITE_THROUGH,
};
use windows_sys::Win32::System::Threading::{
    OpenProcess, TerminateProcess, CREATE_NEW_PROCESS_GROUP, CREATE_SUSPENDED, PROCESS_TERMINATE,
};
use windows_sys::Win32::UI::WindowsAndMessaging::{
    EnumWindows, GetWindowThreadProcessId, PostMessageW, WM_CLOSE,
};

use super::Space;

/// `path` as the system reports process paths: absolute, links resolved,
/// without the `\\?\` prefix `canonicalize` adds.
pub fn real_path(path: &Path) -> PathBuf {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let text = real.to_string_lossy();
    match text.strip_prefix(r"\\?\") {
        Some(rest) if !rest.starts_with("UNC") => PathBuf::from(rest),
        _ => real,
    }
}

/// Whether a process named `name` runs the program `wanted`: Windows
/// names processes by their file (`TIMS.exe`) and ignores case.
pub fn same_program(name: &str, wanted: &str) -> bool {
    let bare = |s: &str| {
        let lower = s.to_ascii_lowercase();
        lower
            .strip_suffix(".exe")
            .map(str::to_owned)
            .unwrap_or(lower)
    };
    bare(name) == bare(wanted)
}

/// Where a node keeps its state when nothing else is said (the
/// `%ProgramData%` of a standard installation).
pub const DEFAULT_STATE: &str = r"C:\ProgramData\lanup";
/// The configuration `lanup node` reads when given no `--config`.
pub const DEFAULT_CONFIG: &str = r"C:\ProgramData\lanup\lanup.toml";

/// Windows has no journal on stderr.
pub fn stderr_is_journal() -> bool {
    false
}

/// `s` as a NUL-terminated UTF-16 string, as the system's calls take it.
pub(crate) fn wide(s: impl AsRef<OsStr>) -> Vec<u16> {
    s.as_ref().encode_wide().chain(Some(0)).collect()
}

/// A file's permission bits, as a manifest records them (`Mode`). Windows
/// has none; a read-only file reads as 0o444, any other as 0o644.
pub fn mode(meta: &Metadata) -> u32 {
    if meta.permissions().readonly() {
        0o444
    } else {
        0o644
    }
}

/// Windows files keep their default access: permission bits have no
/// counterpart, and a read-only file could not be replaced by the next
/// release.
pub fn set_mode(_file: &File, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// As [`set_mode`]: nothing to do on Windows.
pub fn set_path_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Creates a file for writing that must not exist yet (`mode` has no
/// counterpart).
pub fn create_new(path: &Path, _mode: u32) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

/// Creates a new file only its owner, Administrators and SYSTEM may open
/// (a secret key): its inherited access list is replaced before anything
/// is written to it.
pub fn create_private(path: &Path) -> io::Result<File> {
    let file = create_new(path, 0o600)?;
    let private = security::Descriptor::from_sddl(security::OWNER_ADMINS_SYSTEM)
        .and_then(|d| d.apply_to(path));
    if let Err(e) = private {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Why others could read the private file at `path`. Windows keys are
/// made private by [`create_private`]; their access list is not read back.
pub fn exposed(path: &Path) -> io::Result<Option<String>> {
    std::fs::metadata(path).map(|_| None)
}

/// Writes all of `buf` at `offset` (Windows moves the file's cursor too).
pub fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset` (Windows moves the file's
/// cursor too).
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Renames `from` to `to`, replacing `to`, and returns once the move is on
/// disk (`MoveFileEx` with write-through): Windows cannot sync a folder,
/// so each rename is made durable by itself.
///
/// A file whose program has just ended (or that a virus scanner or the
/// search indexer has open for a moment) refuses to move with "access
/// denied" or "sharing violation" for a while: those are tried again, for
/// up to two seconds, before the error is returned.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    const ACCESS_DENIED: i32 = 5;
    const SHARING_VIOLATION: i32 = 32;
    let (from_w, to_w) = (wide(from.as_os_str()), wide(to.as_os_str()));
    let mut tries = 0;
    loop {
        // SAFETY: both names are NUL-terminated and alive for the call.
        let ok = unsafe {
            MoveFileExW(
                from_w.as_ptr(),
                to_w.as_ptr(),
                MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH,
            )
        };
        if ok != 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        let busy = matches!(
            error.raw_os_error(),
            Some(ACCESS_DENIED | SHARING_VIOLATION)
        );
        if !busy || tries == 20 {
            return Err(error);
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Nothing to do: Windows opens no folder for syncing, and [`rename`]
/// writes each move through.
pub fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Puts `new` in place of the running program `binary`, keeping the
/// running one as `old`. Windows will not replace a running executable
/// but will rename it: the running one is moved aside, then the new one
/// moved in, each move written through.
pub fn replace_running(binary: &Path, new: &Path, old: &Path) -> io::Result<()> {
    rename(binary, old)?;
    if let Err(e) = rename(new, binary) {
        let _ = rename(old, binary);
        return Err(e);
    }
    Ok(())
}

/// The space of the volume holding `path` (which must exist).
pub fn space(path: &Path) -> io::Result<Space> {
    let name = wide(path.as_os_str());
    let (mut free, mut total, mut all_free) = (0u64, 0u64, 0u64);
    // SAFETY: `name` is NUL-terminated; the three outputs are valid u64s.
    let ok = unsafe { GetDiskFreeSpaceExW(name.as_ptr(), &mut free, &mut total, &mut all_free) };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut volume = vec![0u16; 1024];
    // SAFETY: `volume` has room for the length passed.
    let ok = unsafe { GetVolumePathNameW(name.as_ptr(), volume.as_mut_ptr(), volume.len() as u32) };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    let end = volume.iter().position(|&c| c == 0).unwrap_or(volume.len());
    let bytes: Vec<u8> = volume[..end].iter().flat_map(|c| c.to_le_bytes()).collect();
    let hash = blake3::hash(&bytes);
    let mut id = [0u8; 8];
    id.copy_from_slice(&hash.as_bytes()[..8]);
    Ok(Space {
        filesystem: u64::from_le_bytes(id),
        free,
        total,
    })
}

/// Prepares `command` to start an application that outlives the node: its
/// own console process group, and held suspended until [`adopt`] has put
/// it in a job object, so not even its first child escapes the job.
pub fn detach(command: &mut Command) {
    command.creation_flags(CREATE_NEW_PROCESS_GROUP | CREATE_SUSPENDED);
}

/// Puts `child`, started by a [`detach`]ed command, in a job object kept
/// as the process tree of `key`, then lets it run.
pub fn adopt(child: &Child, key: &Path) -> io::Result<()> {
    job::adopt(child, key)
}

/// Ends whatever is left of the process tree this node started for `key`
/// (its job object), and forgets it.
pub fn stop_tree(key: &Path, _stopped: &[u32]) {
    job::terminate(key);
}

/// Asks a process to stop: a close request (`WM_CLOSE`) to each of its
/// top-level windows. Returns whether it has any to ask; a program
/// without a window cannot be asked, only ended.
pub fn request_stop(pid: u32) -> bool {
    struct Search {
        pid: u32,
        windows: Vec<HWND>,
    }
    unsafe extern "system" fn each(window: HWND, param: LPARAM) -> i32 {
        // SAFETY: `param` is the `Search` below, alive during EnumWindows.
        let search = unsafe { &mut *(param as *mut Search) };
        let mut owner = 0u32;
        // SAFETY: `window` is a window EnumWindows hands over.
        unsafe { GetWindowThreadProcessId(window, &mut owner) };
        if owner == search.pid {
            search.windows.push(window);
        }
        1
    }
    let mut search = Search {
        pid,
        windows: Vec::new(),
    };
    // SAFETY: `each` only reads windows' owners and writes to `search`,
    // which outlives the call.
    unsafe { EnumWindows(Some(each), &mut search as *mut Search as LPARAM) };
    for window in &search.windows {
        // SAFETY: posting to a window that has gone is a harmless failure.
        unsafe { PostMessageW(*window, WM_CLOSE, 0 as WPARAM, 0) };
    }
    !search.windows.is_empty()
}

/// Ends a process at once (`TerminateProcess`).
pub fn kill(pid: u32) {
    // SAFETY: a handle opened here and closed here; a pid that has gone
    // yields a null handle and nothing is done.
    unsafe {
        let process = OpenProcess(PROCESS_TERMINATE, 0, pid);
        if !process.is_null() {
            TerminateProcess(process, 1);
            CloseHandle(process);
        }
    }
}

/// The process that started this one, if it still runs.
pub fn parent_pid() -> Option<u32> {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let me = Pid::from_u32(std::process::id());
    let mut sys = System::new();
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[me]),
        true,
        ProcessRefreshKind::nothing(),
    );
    let parent = sys.process(me)?.parent()?;
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[parent]),
        true,
        ProcessRefreshKind::nothing(),
    );
    sys.process(parent).map(|_| parent.as_u32())
}

/// Ends this process at once, with nothing flushed (the crash tests).
pub fn crash() {
    kill(std::process::id());
}

/// Starts lanup again from `binary`. Windows cannot replace a process's
/// program in place: under the Service Control Manager the service stops
/// with a failure, and the SCM's recovery action starts the service again
/// from its (now new) binary; started by hand, the new binary is started
/// with the same arguments and this process ends. Returns only the reason
/// it could not.
pub fn run_again(binary: &Path, args: Vec<OsString>, env: &[(&str, Option<&str>)]) -> io::Error {
    if service::running_as_service() {
        service::exit_for_restart();
    }
    let mut again = Command::new(binary);
    again.args(args.into_iter().skip(1));
    for (key, value) in env {
        match value {
            Some(v) => again.env(key, v),
            None => again.env_remove(key),
        };
    }
    match again.spawn() {
        Ok(_) => std::process::exit(0),
        Err(e) => e,
    }
}
