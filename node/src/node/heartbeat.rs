//! The heartbeat every node gossips: what it says, how this node builds
//! its own from what it is doing, when it sends it, and how it takes one
//! from a peer (the newest per author only; a command or request it names
//! that this node lacks is asked for; a silent peer that speaks again is
//! asked for chunks again).
//!
//! A node says something when it has something to say, and otherwise
//! sends slow keep-alives whose cadence it names: the rules are
//! [`lanup_protocol::cadence`]'s.

use super::*;

use lanup_protocol::cadence::{self, Doing};

/// The least time between two heartbeats of one node: changes within it
/// go out together.
pub(super) const CHANGE_GAP: Duration = Duration::from_millis(cadence::CHANGE_GAP_MS);
/// Authors of heartbeats remembered at most: ten times the largest site
/// lanup is built for.
const MAX_HEARD: usize = 5000;

/// A heartbeat's cadence when the sender does not say (an older lanup: one
/// a second).
fn every_second() -> u64 {
    lanup_protocol::election::HEARTBEAT_MS
}

/// The heartbeat every node gossips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Heartbeat {
    pub(super) has_origin: bool,
    /// `idle`, `fetching` or `staged`.
    pub(super) state: String,
    pub(super) release: Option<String>,
    pub(super) staged_version: Option<String>,
    pub(super) bytes_have: u64,
    pub(super) bytes_total: u64,
    pub(super) origin_bytes: u64,
    #[serde(default)]
    pub(super) installed_version: Option<String>,
    /// The lanup the sender runs.
    #[serde(default)]
    pub(super) lanup_version: Option<String>,
    /// `applying`, or how the last apply ended: `committed`,
    /// `rolled-back`, `failed`.
    #[serde(default)]
    pub(super) apply: Option<String>,
    /// The step an apply under way is at.
    #[serde(default)]
    pub(super) apply_step: Option<String>,
    /// Why the last apply did not commit.
    #[serde(default)]
    pub(super) last_error: Option<String>,
    /// The release whose last apply here rolled back.
    #[serde(default)]
    pub(super) failed_version: Option<String>,
    /// When the sender started (Unix ms) and how many heartbeats it sent
    /// since: gossip can deliver an old heartbeat after a newer one, and
    /// that must not turn back what the site knows of the sender.
    #[serde(default)]
    pub(super) boot_ms: u64,
    #[serde(default)]
    pub(super) seq: u64,
    /// The newest rollout command the sender follows (the abort, when it
    /// stopped the rollout): a node that does not know it asks for it.
    #[serde(default)]
    pub(super) command_id: Option<String>,
    /// Bytes the sender received from the origin, counted as they arrive:
    /// others see from it whether the fetcher makes progress.
    #[serde(default)]
    pub(super) origin_received: u64,
    /// The sender's origin keeps failing, or it makes no progress: it
    /// gives the role to the next node.
    #[serde(default)]
    pub(super) origin_failing: bool,
    /// The sender acts as the site's fetcher and its download from the
    /// origin is under way: it keeps the role (a lower newcomer waits).
    #[serde(default)]
    pub(super) downloading: bool,
    /// Fetchers the sender saw make no progress lately: the site passes
    /// them over, and a node named here yields the role itself.
    #[serde(default)]
    pub(super) suspects: Vec<String>,
    /// The sender's wall clock when it sent this (Unix ms): receivers
    /// measure the skew between their clocks from it.
    #[serde(default)]
    pub(super) clock_ms: u64,
    /// The last rollout command the sender refused: (id, reason). A
    /// rollout one of its nodes refused cannot finish; it halts, saying
    /// why, instead of waiting for good.
    #[serde(default)]
    pub(super) refused: Option<(String, String)>,
    /// The sender's redundancy group and its place in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) member: Option<lanup_protocol::group::Member>,
    /// What the sender's apply waits for (its window, its group), when its
    /// wave has come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) waiting: Option<String>,
    /// The requests the sender holds, waiting for approval: a node that
    /// missed one (it was away when it was made) asks for it, so an admin
    /// can approve it from any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) requests: Vec<String>,
    /// The sender's membership certificate for the site, if enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) membership: Option<lanup_protocol::membership::Certificate>,
    /// The site's newest revocation list the sender holds (admin-signed:
    /// taken from anyone, when newer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) revocations: Option<lanup_protocol::membership::Signed>,
    /// How soon the sender's next heartbeat is due, in ms, if nothing
    /// changes: its receivers count it as gone once twice that passed.
    #[serde(default = "every_second")]
    pub(super) every_ms: u64,
    /// The site's fetcher as the sender heard it (itself, or a node whose
    /// own heartbeat it heard), and whether it downloads: a node that
    /// hears few peers learns of it. Named only once the sender settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fetcher: Option<(String, bool)>,
    /// Where the sender listens: a node with too few peers dials nodes it
    /// heard of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) listen: Vec<libp2p::Multiaddr>,
}

impl Heartbeat {
    /// What of the heartbeat the site must hear at once when it changes:
    /// everything but counters, clocks and the cadence.
    pub(super) fn digest(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut quiet = self.clone();
        quiet.seq = 0;
        quiet.clock_ms = 0;
        quiet.every_ms = 0;
        quiet.bytes_have = 0;
        quiet.origin_bytes = 0;
        quiet.origin_received = 0;
        // An origin error's countdown to the next try ticks every second.
        if let Some(e) = &mut quiet.last_error {
            if let Some(cut) = e.find(" (next try in ") {
                e.truncate(cut);
            }
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_vec(&quiet).unwrap_or_default().hash(&mut h);
        h.finish()
    }

    /// How long after this heartbeat its sender counts as gone.
    pub(super) fn silent_after(&self) -> Duration {
        Duration::from_millis(cadence::silent_after_ms(self.every_ms))
    }
}

/// The heartbeat this node sent last: when, and what it said.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent {
    pub(super) at: Instant,
    pub(super) digest: u64,
}

/// The newest heartbeat of one author.
#[derive(Debug, Clone)]
pub(super) struct Heard {
    pub(super) boot_seq: (u64, u64),
    pub(super) at: Instant,
    pub(super) has_origin: bool,
    /// When its count of bytes from the origin last grew (or it was first
    /// heard).
    pub(super) progress_at: Instant,
    /// Its clock minus this node's, in ms, measured when its heartbeat
    /// arrived (LAN delays are milliseconds).
    pub(super) skew_ms: Option<i64>,
    /// The heartbeat itself, for a node heard only through others.
    pub(super) heartbeat: Heartbeat,
}

impl Node {
    /// How soon this node's next heartbeat is due if nothing changes.
    pub(super) fn heartbeat_every(&self) -> Duration {
        let doing = if self.downloading() {
            Doing::Downloading
        } else if self.moving() || self.applying.is_some() {
            Doing::AtWork
        } else {
            Doing::AtRest
        };
        Duration::from_millis(cadence::every_ms(doing, self.live_nodes() as u64 + 1))
    }

    /// The fetcher this node names in its heartbeat, and whether it
    /// downloads (as that node said, or as this one does).
    fn named_fetcher(&self) -> Option<(String, bool)> {
        if !self.has_settled.get() {
            return None;
        }
        let id = self.fetcher_heard()?;
        let downloading = if id == self.local {
            self.downloading()
        } else {
            self.heard.get(&id).is_some_and(|h| h.heartbeat.downloading)
        };
        Some((id.to_string(), downloading))
    }

    /// The other nodes this node counts as live.
    pub(super) fn live_nodes(&self) -> usize {
        let now_s = now_unix_ms() / 1000;
        self.heard
            .iter()
            .filter(|(author, h)| **author != self.local && self.live(author, h.at, &h.heartbeat))
            .filter(|(author, _)| self.gate.admits(author, now_s))
            .count()
    }

    /// Whether `author`, last heard at `at` saying `hb`, still counts as
    /// live: its next heartbeat is not overdue; it answered what it was
    /// asked since it spoke (a frozen machine keeps its connections but
    /// answers nothing); and, once this node took up a release the author
    /// did not name, it spoke since (every live node says so within
    /// milliseconds of taking it up, so one at rest that froze is passed
    /// over in seconds, not at its next keep-alive).
    pub(super) fn live(&self, author: &PeerId, at: Instant, hb: &Heartbeat) -> bool {
        if at.elapsed() >= hb.silent_after() {
            return false;
        }
        if self.unanswered.get(author).is_some_and(|since| *since > at) {
            return false;
        }
        match self.transfer.target() {
            Some(t) if at < t.adopted_at && t.adopted_at.elapsed() >= PEER_SILENT => {
                hb.release.as_deref() == Some(t.manifest.release_name().as_str())
            }
            _ => true,
        }
    }

    /// Sends this node's heartbeat when one is due: something the site
    /// must hear changed (and [`CHANGE_GAP`] passed since the last), the
    /// keep-alive's time came, or `now` (a peer connected, a release was
    /// taken up). Whether a change is still to be sent (it came within
    /// the gap).
    pub(super) async fn heartbeat(&mut self, now: bool) -> bool {
        // Memberships expire and members-only may begin: the chunk server
        // learns of it here.
        self.gate.publish(now_unix_ms() / 1000);
        let hb = self.own_heartbeat();
        let digest = hb.digest();
        let due = now
            || self.last_sent.is_none_or(|sent| {
                let since = sent.at.elapsed();
                since >= self.heartbeat_every() || (sent.digest != digest && since >= CHANGE_GAP)
            });
        if !due {
            return self.last_sent.is_some_and(|sent| sent.digest != digest);
        }
        self.heartbeats_sent += 1;
        self.last_sent = Some(Sent {
            at: Instant::now(),
            digest,
        });
        if let Ok(data) = serde_json::to_vec(&hb) {
            let _ = self.net.publish(&self.status_topic, data).await;
        }
        let announce = self.heartbeats_sent <= self.announce_until
            || self.heartbeats_sent.is_multiple_of(ANNOUNCE_EVERY);
        if let Some(t) = self.transfer.target().filter(|_| announce) {
            let announce = Announce {
                release: t.manifest.release_name(),
                manifest_hash: t.hash,
                signature: t.signature.clone(),
                app: t.manifest.restart.app_name.clone(),
            };
            if let Ok(data) = serde_json::to_vec(&announce) {
                let _ = self.net.publish(&self.announce_topic, data).await;
            }
        }
        false
    }

    pub(super) fn own_heartbeat(&self) -> Heartbeat {
        let t = self.transfer.target();
        let installed = self.installed_name();
        let last = self.last_apply.as_ref();
        Heartbeat {
            has_origin: self.config.origin.is_some(),
            state: self.own_state().into(),
            installed_version: installed,
            lanup_version: Some(crate::upgrade::version().to_owned()),
            apply: match &self.applying {
                Some(_) => Some("applying".into()),
                None => last.map(|o| o.ending.name().to_owned()),
            },
            apply_step: self.applying.as_ref().map(|(_, step)| step.clone()),
            // A release that did not install (rolled back, or refused
            // before anything changed) halts a rollout of it.
            failed_version: last
                .filter(|o| o.ending != Ending::Committed)
                .map(|o| o.version.clone()),
            boot_ms: self.boot_ms,
            seq: self.heartbeats_sent + 1,
            every_ms: self.heartbeat_every().as_millis() as u64,
            listen: crate::remembered::usable(&self.net.listening()),
            fetcher: self.named_fetcher(),
            command_id: self.rollout.as_ref().map(Rollout::newest_id),
            requests: self.pending.keys().cloned().collect(),
            membership: self.own_certificate.clone(),
            revocations: self.gate.revocations().cloned(),
            last_error: self.own_error(),
            release: t.map(|t| t.manifest.release_name()),
            staged_version: t.filter(|t| t.staged).map(|t| t.manifest.release_name()),
            bytes_have: t.map_or(0, |t| t.bytes_total - t.transfer.missing_bytes()),
            bytes_total: t.map_or(0, |t| t.bytes_total),
            origin_bytes: self
                .fetcher
                .origin_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            origin_received: self
                .fetcher
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
            origin_failing: self.origin_failing(),
            downloading: self.downloading(),
            clock_ms: now_unix_ms(),
            refused: self.refused_command.clone(),
            member: self.config.policy.member.clone(),
            waiting: self.waiting.clone(),
            suspects: self
                .suspects
                .iter()
                .filter(|(_, at)| at.elapsed() < FAILING_FOR)
                .map(|(peer, _)| peer.to_string())
                .collect(),
        }
    }

    /// What this node is doing, as `lanup status` names it.
    fn own_state(&self) -> &'static str {
        let t = self.transfer.target();
        let installed = self.installed_name();
        let target_failed = t.is_some_and(|t| {
            self.last_apply.as_ref().is_some_and(|o| {
                o.ending == Ending::RolledBack && o.version == t.manifest.release_name()
            })
        });
        match t {
            _ if self.applying.is_some() => "applying",
            Some(t) if self.runs(&t.manifest) => "installed",
            Some(_) if target_failed => "rolled-back",
            None if installed.is_some() => "installed",
            None => "idle",
            Some(t) if t.staged => "staged",
            Some(t) if t.staging => "staging",
            Some(_) => "fetching",
        }
    }

    /// The error this node shows the site, the most pressing first: its
    /// disk, room for the release, staging, the origin, the last apply, a
    /// patch that did not serve.
    fn own_error(&self) -> Option<String> {
        let t = self.transfer.target();
        let last = self.last_apply.as_ref();
        self.transfer
            .disk_error()
            .map(|e| format!("this node's disk: {e}"))
            .or_else(|| t.and_then(|t| t.no_room.as_ref().map(|(r, _)| r.clone())))
            .or_else(|| {
                t.and_then(|t| {
                    t.stage_failed.as_ref().map(|(reason, _)| {
                        format!("staging {} failed: {reason}", t.manifest.release_name())
                    })
                })
            })
            .or_else(|| {
                let fetcher = self.fetcher.status();
                let retry = fetcher.retry_at.map_or(0, |at| {
                    at.saturating_duration_since(Instant::now()).as_secs()
                });
                // A node that no longer fetches does not try again: its
                // error is what it saw while it fetched, kept as long as
                // it counts in the election.
                let counts = self.was_fetcher || fetcher.failing();
                let error = fetcher.error.filter(|_| counts);
                error.map(|e| match self.was_fetcher {
                    true => format!("origin: {e} (next try in {retry} s)"),
                    false => format!("origin, when this node last fetched: {e}"),
                })
            })
            .or_else(|| {
                last.filter(|o| o.ending != Ending::Committed)
                    .and_then(|o| o.reason.as_ref())
                    .map(|r| format!("{}: {r}", last.map_or("", |o| o.version.as_str())))
            })
            .or_else(|| {
                // A patch or packed chunk that did not serve, while
                // the release it was for is being staged.
                t.filter(|t| !t.staged)?;
                let note = self.fetcher.status().fallbacks.pop()?;
                Some(format!("took plain chunks: {note}"))
            })
    }

    /// Takes a heartbeat gossiped by `author` (passed on by `from`): only
    /// the newest from each author counts, as gossip can bring an old one
    /// after a newer one. A command or request it names that this node
    /// lacks is asked of `from`; a silent peer that speaks again is asked
    /// for chunks again.
    pub(super) fn on_heartbeat(
        &mut self,
        from: PeerId,
        author: Option<PeerId>,
        data: &[u8],
    ) -> MessageAcceptance {
        let Ok(hb) = serde_json::from_slice::<Heartbeat>(data) else {
            return MessageAcceptance::Reject;
        };
        // Once only members are admitted, a heartbeat counts only from a
        // member (its candidacy, suspicions and status), passed on by a
        // member or by its author.
        let now_s = now_unix_ms() / 1000;
        if let Some(list) = &hb.revocations {
            let _ = self.take_revocations(list, &format!("peer {from}"));
        }
        let author = author.unwrap_or(from);
        let member = self.gate.heard(author, hb.membership.as_ref(), now_s);
        if self.gate.enforcing(now_s)
            && !(member && (from == author || self.gate.is_member(&from, now_s)))
        {
            return MessageAcceptance::Ignore;
        }
        // Gossip can bring an author's old heartbeat after a newer one;
        // only the newest counts.
        let fresh = self
            .heard
            .get(&author)
            .is_none_or(|old| (hb.boot_ms, hb.seq) > old.boot_seq);
        if !fresh {
            return MessageAcceptance::Accept;
        }
        self.remember_heard(author, &hb);
        // A command the author follows is asked of the peer that passed
        // the heartbeat on (it knows the command, or will).
        if let Some(id) = hb.command_id.as_deref() {
            self.maybe_catch_up(from, id);
        }
        if !self.peers.contains_key(&author)
            && self.peers.len() < crate::network::TARGET_PEERS
            && !hb.listen.is_empty()
        {
            self.net
                .heard_of(author, crate::remembered::usable(&hb.listen));
        }
        self.unanswered.remove(&author);
        self.catch_up_requests(from, &hb.requests);
        // The author's own record when it is a peer; one heard only
        // through others is kept in `heard`.
        if let Some(info) = self.peers.get_mut(&author) {
            info.heartbeat = Some((Instant::now(), hb));
            if std::mem::take(&mut info.silent) {
                info!(peer = %author, "peer speaks again");
                // Its chunk list is asked afresh.
                self.transfer.peer_speaks_again(author);
            }
        }
        MessageAcceptance::Accept
    }

    /// Keeps `author`'s newest heartbeat, with when it last made progress
    /// downloading; the map stays bounded.
    fn remember_heard(&mut self, author: PeerId, hb: &Heartbeat) {
        let progress_at = match self.heard.get(&author) {
            Some(old) if old.heartbeat.origin_received == hb.origin_received => old.progress_at,
            _ => Instant::now(),
        };
        if !self.heard.contains_key(&author) && self.heard.len() >= MAX_HEARD {
            // Beyond any real site: the author heard longest ago makes
            // room (a flood of made-up authors cannot grow the map).
            let oldest = self.heard.iter().min_by_key(|(_, h)| h.at).map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.heard.remove(&oldest);
            }
        }
        self.heard.insert(
            author,
            Heard {
                boot_seq: (hb.boot_ms, hb.seq),
                at: Instant::now(),
                has_origin: hb.has_origin,
                progress_at,
                skew_ms: (hb.clock_ms > 0).then(|| hb.clock_ms as i64 - now_unix_ms() as i64),
                heartbeat: hb.clone(),
            },
        );
    }
}

impl Node {
    /// Takes a site revocation list `source` passed on, when it is newer
    /// than the one held and a trusted admin signed it.
    pub(super) fn take_revocations(
        &mut self,
        list: &lanup_protocol::membership::Signed,
        source: &str,
    ) -> Result<bool, String> {
        let now_s = now_unix_ms() / 1000;
        match self.gate.take_revocations(&self.config.state, list, now_s) {
            Ok(true) => {
                info!(%source, revoked = ?self.gate.revoked_keys(), "took the site's newer revocation list");
                if self.revoked_here() {
                    warn!("this node is revoked from its site: it fetches and serves nothing for it; an administrator enrolls it again with a new token");
                }
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                debug!(%source, reason = %e, "a revocation list is not accepted");
                Err(e.to_string())
            }
        }
    }
}

/// With the `fault-injection` feature (tests only),
/// `LANUP_FAULT_GOSSIP_FLOOD=PATH` has the node, while `PATH` exists,
/// gossip forged rollout commands (each new, claiming a trusted admin's
/// key, with a signature that does not verify) as fast as its swarm takes
/// them: a peer that floods the site with what costs every receiver most.
#[cfg(feature = "fault-injection")]
impl Node {
    pub(super) fn flood_fault(&mut self) {
        use lanup_protocol::rollout::{Action, Command};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        static FLOODING: AtomicBool = AtomicBool::new(false);
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let Some(path) = std::env::var_os("LANUP_FAULT_GOSSIP_FLOOD") else {
            return;
        };
        if !std::path::Path::new(&path).exists() || FLOODING.swap(true, Ordering::SeqCst) {
            return;
        }
        warn!("fault injected: flooding the site with forged commands");
        let key = self.config.trust_admin.first().map(ToString::to_string);
        let (net, topic, site) = (
            self.net.clone(),
            self.rollout_topic.clone(),
            self.config.site.clone(),
        );
        // A second's worth at a time, then the next tick looks again.
        self.tasks.spawn(async move {
            let until = Instant::now() + HEARTBEAT;
            let mut sent = 0u64;
            while Instant::now() < until {
                let id = format!("{:032x}", SEQ.fetch_add(1, Ordering::Relaxed));
                let command = Command::new(&site, Action::Abort, now_unix_ms(), &id);
                let forged = SignedCommand {
                    command: serde_json::to_string(&command).unwrap_or_default(),
                    key: key.clone().unwrap_or_default(),
                    signature: "ab".repeat(64),
                    approvals: Vec::new(),
                    plan: None,
                };
                if let Ok(data) = serde_json::to_vec(&forged) {
                    sent += u64::from(net.publish(&topic, data).await.is_ok());
                }
            }
            info!(sent, "fault injected: flooded the site for a second");
            FLOODING.store(false, Ordering::SeqCst);
        });
    }
}

#[cfg(not(feature = "fault-injection"))]
impl Node {
    pub(super) fn flood_fault(&mut self) {}
}
