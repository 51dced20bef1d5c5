//! The peers a node remembers: who it was connected to and where they said
//! they listen, kept in `STATE/peers.json` so that a node restarted on a
//! network where multicast is dropped (and with no static peer) dials the
//! site it knew instead of finding no one and fetching its own copy.
//!
//! Bounded: [`MAX_PEERS`] peers of [`MAX_ADDRS`] addresses each, and a peer
//! not connected for [`FORGET_AFTER`] is forgotten. The file is written
//! when what it says changes, at most once a [`WRITE_EVERY`], replaced
//! whole (a torn write leaves the old one). A file that cannot be read is
//! named in a warning and started afresh: it is a hint, never the truth.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Peers remembered at most (the longest unseen goes first).
pub const MAX_PEERS: usize = 512;
/// Addresses remembered per peer.
pub const MAX_ADDRS: usize = 4;
/// A peer not connected for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(14 * 24 * 3600);
/// The file is written at most this often.
pub const WRITE_EVERY: Duration = Duration::from_secs(60);
/// The file's name in the state directory.
pub const FILE: &str = "peers.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    addrs: Vec<Multiaddr>,
    /// When it was last connected (Unix seconds).
    seen_s: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    peers: HashMap<PeerId, Entry>,
}

/// The peers this node remembers.
#[derive(Debug)]
pub struct Remembered {
    path: Option<PathBuf>,
    peers: HashMap<PeerId, Entry>,
    /// What changed since the file was written (a new peer or address:
    /// written at the next chance; only a newer `seen_s`: written with the
    /// next change or after [`FORGET_AFTER`] / 14).
    changed: bool,
    seen_changed: bool,
    written: Option<Instant>,
    /// The write under way off the swarm's task (its disk may be slow).
    writing: Option<tokio::task::JoinHandle<()>>,
}

impl Remembered {
    /// Reads `STATE/peers.json` (none kept when `state` is None), dropping
    /// the peers forgotten by `now_s`.
    pub fn load(state: Option<&Path>, now_s: u64) -> Remembered {
        let path = state.map(|s| s.join(FILE));
        let mut peers = HashMap::new();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                    Ok(saved) => peers = saved.peers,
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "the remembered peers cannot be read; starting afresh")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "the remembered peers cannot be read; starting afresh")
                }
            }
        }
        let mut r = Remembered {
            path,
            peers,
            changed: false,
            seen_changed: false,
            written: None,
            writing: None,
        };
        r.bound(now_s);
        r
    }

    /// The remembered peers and their addresses, most recently seen first.
    pub fn peers(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut all: Vec<(&PeerId, &Entry)> = self.peers.iter().collect();
        all.sort_by(|a, b| b.1.seen_s.cmp(&a.1.seen_s).then(a.0.cmp(b.0)));
        all.into_iter()
            .map(|(p, e)| (*p, e.addrs.clone()))
            .collect()
    }

    /// Notes that `peer` is connected and listens on `addrs` (as it said):
    /// loopback and unspecified addresses are kept only when they are all
    /// it gave.
    pub fn connected(&mut self, peer: PeerId, addrs: &[Multiaddr], now_s: u64) {
        let usable = usable(addrs);
        if usable.is_empty() {
            return;
        }
        match self.peers.get_mut(&peer) {
            Some(e) if e.addrs == usable => {
                if e.seen_s != now_s {
                    e.seen_s = now_s;
                    self.seen_changed = true;
                }
            }
            _ => {
                self.peers.insert(
                    peer,
                    Entry {
                        addrs: usable,
                        seen_s: now_s,
                    },
                );
                self.changed = true;
                self.bound(now_s);
            }
        }
    }

    /// Forgets `peer` (banned: it lied).
    pub fn forget(&mut self, peer: &PeerId) {
        self.changed |= self.peers.remove(peer).is_some();
    }

    /// Writes the file when it is due: something changed and
    /// [`WRITE_EVERY`] passed since the last write (or none was made), or
    /// only the times seen changed and a day passed; or, `at_exit`,
    /// anything changed.
    ///
    /// Inside a runtime the file is written on a blocking thread (one
    /// write at a time), so that the swarm's task never waits on the
    /// disk; at exit, or outside a runtime, here.
    pub fn save_if_due(&mut self, at_exit: bool) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| !at_exit);
        if let Some(w) = self.writing.as_ref().filter(|w| !w.is_finished()) {
            if runtime.is_some() {
                return;
            }
            // At exit the last write lands last: the one under way (an
            // older list) ends first.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let since = self.written.map(|at| at.elapsed());
        let due = match since {
            _ if at_exit => self.changed || self.seen_changed,
            None => self.changed || self.seen_changed,
            Some(since) => {
                (self.changed && since >= WRITE_EVERY)
                    || (self.seen_changed && since >= FORGET_AFTER / 14)
            }
        };
        if !due {
            return;
        }
        let saved = Saved {
            peers: self.peers.clone(),
        };
        let bytes = serde_json::to_vec(&saved).unwrap_or_default();
        let write = move || {
            if let Err(e) = crate::apply::write_synced(&path, &bytes) {
                warn!(file = %path.display(), error = %e, "cannot keep the remembered peers");
            }
        };
        match runtime {
            Some(runtime) => self.writing = Some(runtime.spawn_blocking(write)),
            None => write(),
        }
        self.written = Some(Instant::now());
        self.changed = false;
        self.seen_changed = false;
    }

    fn bound(&mut self, now_s: u64) {
        let before = self.peers.len();
        self.peers
            .retain(|_, e| now_s.saturating_sub(e.seen_s) < FORGET_AFTER.as_secs());
        while self.peers.len() > MAX_PEERS {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(p, e)| (e.seen_s, **p))
                .map(|(p, _)| *p);
            match oldest {
                Some(p) => self.peers.remove(&p),
                None => break,
            };
        }
        self.changed |= self.peers.len() != before;
    }
}

/// The addresses of `addrs` worth dialling, at most [`MAX_ADDRS`]:
/// loopback and unspecified ones only when they are all there is.
pub fn usable(addrs: &[Multiaddr]) -> Vec<Multiaddr> {
    let mut usable: Vec<Multiaddr> = addrs.iter().filter(|a| routable(a)).cloned().collect();
    if usable.is_empty() {
        usable = addrs.iter().filter(|a| !unspecified(a)).cloned().collect();
    }
    usable.truncate(MAX_ADDRS);
    usable
}

fn unspecified(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

fn routable(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    !unspecified(addr)
        && !addr.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn peers_survive_a_restart_bounded_and_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = 1_800_000_000;
        let mut r = Remembered::load(Some(dir.path()), now);
        let a = PeerId::random();
        r.connected(
            a,
            &[
                addr("/ip4/127.0.0.1/tcp/4001"),
                addr("/ip4/10.0.0.5/tcp/4001"),
                addr("/ip4/0.0.0.0/tcp/4001"),
            ],
            now,
        );
        // Only loopback: kept, as it is all the peer gave.
        let b = PeerId::random();
        r.connected(b, &[addr("/ip4/127.0.0.1/tcp/4002")], now - 10);
        r.save_if_due(false);
        let again = Remembered::load(Some(dir.path()), now + 60);
        assert_eq!(
            again.peers(),
            vec![
                (a, vec![addr("/ip4/10.0.0.5/tcp/4001")]),
                (b, vec![addr("/ip4/127.0.0.1/tcp/4002")]),
            ]
        );
        // Two weeks on, both are forgotten.
        let later = Remembered::load(Some(dir.path()), now + FORGET_AFTER.as_secs());
        assert!(later.peers().is_empty());

        // Never more than MAX_PEERS: the longest unseen go.
        let mut many = Remembered::load(None, now);
        for i in 0..(MAX_PEERS as u64 + 10) {
            many.connected(PeerId::random(), &[addr("/ip4/10.0.0.9/tcp/1")], now + i);
        }
        assert_eq!(many.peers().len(), MAX_PEERS);
        assert!(many.peers().iter().all(|(_, a)| a.len() <= MAX_ADDRS));
    }

    #[test]
    fn a_damaged_file_is_started_afresh_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), b"{\"peers\": [garbage").expect("write");
        let mut r = Remembered::load(Some(dir.path()), 1_800_000_000);
        assert!(r.peers().is_empty());
        r.connected(
            PeerId::random(),
            &[addr("/ip4/10.0.0.7/tcp/4001")],
            1_800_000_000,
        );
        r.save_if_due(false);
        assert_eq!(
            Remembered::load(Some(dir.path()), 1_800_000_000)
                .peers()
                .len(),
            1
        );
    }
}
