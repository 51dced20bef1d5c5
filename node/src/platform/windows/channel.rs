//! The control channel on Windows: a named pipe, named after the state
//! directory, that only SYSTEM, Administrators and the node's own user may
//! open, local clients only: what the socket's mode 0600 is on Linux.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::windows::named_pipe::{
    ClientOptions, NamedPipeClient, NamedPipeServer, ServerOptions,
};
use windows_sys::Win32::Foundation::{ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY};

use super::security::{self, Descriptor};

/// The pipe of the node on `state`: one per state directory, as the
/// socket is on Linux.
fn name(state: &Path) -> String {
    let dir = std::path::absolute(state).unwrap_or_else(|_| state.to_owned());
    let key = dir.to_string_lossy().to_lowercase();
    let hash = blake3::hash(key.as_bytes()).to_hex();
    format!(r"\\.\pipe\lanup-{}", &hash[..16])
}

/// Where the node on `state` listens, for messages.
pub fn address(state: &Path) -> String {
    format!("{} (the pipe of {})", name(state), state.display())
}

/// Whether a live node answers on `state`'s channel: its pipe exists
/// (busy counts: it is serving others).
pub fn answers(state: &Path) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name(state))
    {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32),
    }
}

/// One control connection, either end.
#[derive(Debug)]
pub enum Stream {
    Server(NamedPipeServer),
    Client(NamedPipeClient),
}

/// The node's end of the channel: the pipe instance the next client
/// connects to.
#[derive(Debug)]
pub struct Listener {
    name: String,
    descriptor: Descriptor,
    next: NamedPipeServer,
}

fn create(name: &str, descriptor: &Descriptor, first: bool) -> io::Result<NamedPipeServer> {
    let mut attributes = descriptor.attributes();
    // SAFETY: `attributes` points at `descriptor`, both alive for the call.
    unsafe {
        ServerOptions::new()
            .first_pipe_instance(first)
            .reject_remote_clients(true)
            .create_with_security_attributes_raw(name, security::raw(&mut attributes))
    }
}

/// Listens on `state`'s channel. The first instance of a pipe can be made
/// once: a second node on the same state directory is refused.
pub fn bind(state: &Path) -> Result<Listener> {
    let name = name(state);
    let descriptor = Descriptor::from_sddl(security::OWNER_ADMINS_SYSTEM)
        .context("cannot make the control pipe's security descriptor")?;
    let next = match create(&name, &descriptor, true) {
        Ok(server) => server,
        Err(e) if e.raw_os_error() == Some(ERROR_ACCESS_DENIED as i32) => {
            bail!("another node is running on {} ({name})", state.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot listen on {name}")),
    };
    Ok(Listener {
        name,
        descriptor,
        next,
    })
}

impl Listener {
    /// The next client. A new instance is made for the one after before
    /// this one is handed over, so the pipe never vanishes between them.
    pub async fn accept(&mut self) -> io::Result<Stream> {
        self.next.connect().await?;
        let after = create(&self.name, &self.descriptor, false)?;
        Ok(Stream::Server(std::mem::replace(&mut self.next, after)))
    }
}

/// Writes what fits of `bytes` now, without waiting (a last word to a
/// client that is turned away).
pub fn try_say(stream: &Stream, bytes: &[u8]) {
    let _ = match stream {
        Stream::Server(s) => s.try_write(bytes),
        Stream::Client(c) => c.try_write(bytes),
    };
}

/// Connects to `state`'s channel once: `NotFound` when no node listens
/// there, `ConnectionRefused` while every instance is busy.
pub async fn connect(state: &Path) -> io::Result<Stream> {
    match ClientOptions::new().open(name(state)) {
        Ok(client) => Ok(Stream::Client(client)),
        Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) => {
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, e))
        }
        Err(e) => Err(e),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Server(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Client(c) => Pin::new(c).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Server(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Client(c) => Pin::new(c).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Server(s) => Pin::new(s).poll_flush(cx),
            Stream::Client(c) => Pin::new(c).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Server(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Client(c) => Pin::new(c).poll_shutdown(cx),
        }
    }
}
