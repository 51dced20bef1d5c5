//! What differs between the systems a node runs on, behind one interface,
//! so that the rest of the node needs no `cfg`: file modes, private files,
//! positioned reads and writes, durable renames, free space, the
//! application's processes, the control channel, the service manager and
//! running lanup again. Each side compiles for its own target, and CI
//! builds both; the Unix side is what the integration tests run, the
//! Windows side runs under Wine.

#[cfg(unix)]
#[path = "unix/mod.rs"]
mod sys;
#[cfg(windows)]
#[path = "windows/mod.rs"]
mod sys;

pub use sys::app_service;
pub use sys::channel;
pub use sys::service::{self, stop_requested, Notifier};
pub use sys::*;

/// The free and total space of one filesystem, and which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Tells filesystems apart: needs on one filesystem add up.
    pub filesystem: u64,
    /// Bytes an unprivileged process may still write.
    pub free: u64,
    pub total: u64,
}

/// An application's service as its service manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// Running, or on its way to it.
    pub running: bool,
    /// Its main process.
    pub pid: Option<u32>,
    /// The manager's words for its state and last exit, for messages.
    pub detail: String,
}
