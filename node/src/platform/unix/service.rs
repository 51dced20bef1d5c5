//! The service manager's side of a node on Linux: systemd's notify
//! protocol.
//!
//! Under `Type=notify` systemd passes a datagram socket in `NOTIFY_SOCKET`
//! and, with `WatchdogSec=`, the watchdog period in `WATCHDOG_USEC`. A node
//! says `READY=1` once it has recovered its state, listens on its control
//! socket and runs its swarm; it says `WATCHDOG=1` from its own loop, and
//! only while its parts answer, so a wedged node is restarted by systemd
//! rather than left running; it says `STOPPING=1` when it stops. Without
//! those variables (a node started by hand) it says nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// The node's line to systemd; silent when there is none.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half the watchdog period: how often the node pings.
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (a
    /// watchdog meant for another process is not this one's).
    /// A new lanup on trial says nothing: the node that started it is the
    /// service until the new one is proven.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET")
            .filter(|_| !crate::upgrade::on_trial())
            .and_then(|path| {
                let path = path.to_string_lossy().into_owned();
                let address = match path.strip_prefix('@') {
                    Some(name) => abstract_address(name),
                    None => SocketAddr::from_pathname(&path).ok(),
                };
                let socket = UnixDatagram::unbound().ok()?;
                socket.set_nonblocking(true).ok()?;
                match address {
                    Some(address) => Some((socket, address)),
                    None => {
                        warn!(socket = %path, "NOTIFY_SOCKET is not an address this node can use");
                        None
                    }
                }
            });
        let ours = std::env::var("WATCHDOG_PID")
            .map_or(true, |pid| pid.trim() == std::process::id().to_string());
        let every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(|usec| Duration::from_micros(usec) / 2);
        Notifier {
            socket,
            every,
            last: None,
        }
    }

    /// The node is up: its state recovered, its control socket listening,
    /// its swarm running.
    pub fn ready(&mut self) {
        self.send(&format!(
            "READY=1\nSTATUS=running lanup {}",
            crate::upgrade::version()
        ));
    }

    /// The node's parts answered: pings the watchdog when one is due.
    pub fn alive(&mut self) {
        let Some(every) = self.every else { return };
        if self.last.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        self.send("WATCHDOG=1");
    }

    /// A line for `systemctl status`.
    pub fn status(&mut self, text: &str) {
        self.send(&format!("STATUS={text}"));
    }

    pub fn stopping(&mut self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        let Some((socket, address)) = &self.socket else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), address) {
            debug!(error = %e, message, "could not notify the service manager");
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes()).ok()
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_: &str) -> Option<SocketAddr> {
    None
}

/// Completes when the node is asked to stop: SIGTERM or Ctrl-C.
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The Windows service's entry; on Linux systemd runs `lanup node` as it
/// is.
pub fn run_as_service(_body: impl FnOnce() -> i32 + Send + 'static) -> anyhow::Result<i32> {
    anyhow::bail!("--windows-service is for the Windows Service Control Manager; on Linux systemd runs `lanup node` (lanup.service)")
}

const SYSTEMD: &str = "on Linux the Debian package installs lanup.service for systemd (`systemctl enable --now lanup`); `lanup service` registers the Windows service";

/// Registers the Windows service; on Linux the package's systemd unit is
/// the service.
pub fn install(
    _binary: &std::path::Path,
    _config: &std::path::Path,
    _start: bool,
) -> anyhow::Result<()> {
    anyhow::bail!(SYSTEMD)
}

/// Enables the Windows service; see [`install`].
pub fn enable() -> anyhow::Result<()> {
    anyhow::bail!(SYSTEMD)
}

/// Removes the Windows service; see [`install`].
pub fn uninstall() -> anyhow::Result<()> {
    anyhow::bail!(SYSTEMD)
}
