//! The control channel on Unix: a socket in the state directory, mode
//! 0600, so only the node's owner (and root) may use it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio::net::{UnixListener, UnixStream};

/// One control connection.
pub type Stream = UnixStream;

/// The socket's file name in the state directory.
const SOCKET: &str = "control.sock";

fn path(state: &Path) -> PathBuf {
    state.join(SOCKET)
}

/// Where the node on `state` listens, for messages.
pub fn address(state: &Path) -> String {
    path(state).display().to_string()
}

/// Whether a live node answers on `state`'s channel.
pub fn answers(state: &Path) -> bool {
    let path = path(state);
    path.exists() && std::os::unix::net::UnixStream::connect(&path).is_ok()
}

/// The node's end of the channel.
#[derive(Debug)]
pub struct Listener(UnixListener);

/// Listens on `state`'s channel. A socket left by a node that died is
/// removed; one a live node answers on is not.
pub fn bind(state: &Path) -> Result<Listener> {
    let path = path(state);
    if path.exists() {
        if answers(state) {
            bail!("another node is running on {}", state.display());
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(Listener(listener))
}

impl Listener {
    /// The next client.
    pub async fn accept(&mut self) -> io::Result<Stream> {
        self.0.accept().await.map(|(stream, _)| stream)
    }
}

/// Writes what fits of `bytes` now, without waiting (a last word to a
/// client that is turned away).
pub fn try_say(stream: &Stream, bytes: &[u8]) {
    let _ = stream.try_write(bytes);
}

/// Connects to `state`'s channel once: `NotFound` when no node ever
/// listened there, `ConnectionRefused` while one is starting or stopping.
pub async fn connect(state: &Path) -> io::Result<Stream> {
    UnixStream::connect(path(state)).await
}
