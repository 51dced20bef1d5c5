//! Job objects: the whole process tree of an application the node started,
//! so that stopping it leaves no child running.

use std::collections::HashMap;
use std::io;
use std::os::windows::io::AsRawHandle;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::System::Diagnostics::ToolHelp::{
    CreateToolhelp32Snapshot, Thread32First, Thread32Next, TH32CS_SNAPTHREAD, THREADENTRY32,
};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, TerminateJobObject,
};
use windows_sys::Win32::System::Threading::{OpenThread, ResumeThread, THREAD_SUSPEND_RESUME};

/// A job object handle, closed on drop (which leaves its processes
/// running: an application outlives the node that started it).
#[derive(Debug)]
struct Job(HANDLE);

// SAFETY: a kernel handle may be used and closed from any thread.
unsafe impl Send for Job {}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: the handle is this value's own.
        unsafe { CloseHandle(self.0) };
    }
}

/// The jobs of the applications this node started, by install directory.
static JOBS: Mutex<Option<HashMap<PathBuf, Job>>> = Mutex::new(None);

/// Puts the suspended `child` in a new job kept for `key`, then resumes
/// its threads. On failure the caller ends the child.
pub(super) fn adopt(child: &Child, key: &Path) -> io::Result<()> {
    // SAFETY: no attributes and no name: a private job this node owns.
    let handle = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
    if handle.is_null() {
        return Err(io::Error::last_os_error());
    }
    let job = Job(handle);
    // SAFETY: both handles are valid for the call (the child's is kept by
    // `child`).
    if unsafe { AssignProcessToJobObject(job.0, child.as_raw_handle() as HANDLE) } == 0 {
        return Err(io::Error::last_os_error());
    }
    if let Ok(mut jobs) = JOBS.lock() {
        jobs.get_or_insert_with(HashMap::new)
            .insert(key.to_owned(), job);
    }
    resume(child.id())
}

/// Resumes every thread of process `pid` (a process started suspended has
/// one).
fn resume(pid: u32) -> io::Result<()> {
    // SAFETY: a snapshot handle opened and closed here.
    let snapshot = unsafe { CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0) };
    if snapshot == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: THREADENTRY32 is plain data; its size field is set as the
    // calls require.
    let mut entry: THREADENTRY32 = unsafe { std::mem::zeroed() };
    entry.dwSize = std::mem::size_of::<THREADENTRY32>() as u32;
    let mut resumed = 0;
    // SAFETY: `snapshot` is valid and `entry` sized; each thread handle is
    // opened and closed within the loop.
    unsafe {
        let mut more = Thread32First(snapshot, &mut entry) != 0;
        while more {
            if entry.th32OwnerProcessID == pid {
                let thread = OpenThread(THREAD_SUSPEND_RESUME, 0, entry.th32ThreadID);
                if !thread.is_null() {
                    if ResumeThread(thread) != u32::MAX {
                        resumed += 1;
                    }
                    CloseHandle(thread);
                }
            }
            more = Thread32Next(snapshot, &mut entry) != 0;
        }
        CloseHandle(snapshot);
    }
    if resumed == 0 {
        return Err(io::Error::other(format!(
            "cannot resume process {pid}: none of its threads was found"
        )));
    }
    Ok(())
}

/// Ends every process in the job kept for `key`, and forgets the job.
pub(super) fn terminate(key: &Path) {
    let job = JOBS
        .lock()
        .ok()
        .and_then(|mut jobs| jobs.as_mut().and_then(|j| j.remove(key)));
    if let Some(job) = job {
        // SAFETY: the handle is valid until `job` drops.
        unsafe { TerminateJobObject(job.0, 1) };
    }
}
