//! The node: one actor that ties the swarm, the chunk store, the transfer
//! scheduler and the origin fetcher together.
//!
//! Every node gossips a heartbeat saying whether it has an origin; among the
//! live nodes that have one, the lowest PeerId is the site's fetcher. The
//! fetcher polls the origin, verifies the manifest, announces it, and
//! downloads the chunks no peer at the site holds. Every node (the fetcher
//! too) asks its peers which chunks they hold and pulls the missing ones,
//! rarest first (`lanup_protocol::transfer`), verifying each before storing
//! and serving it. When every chunk is here the release is assembled and
//! checked in `state/staging/<release>/`. A node with an `[app]` installs
//! a staged release ([`crate::apply`]) when asked, by itself (`auto`), or
//! when its wave of a signed rollout command has come
//! (`lanup_protocol::rollout`), and records every command in its audit
//! log ([`crate::audit`]).
//!
//! The node's parts run as children of [`run`], stopped together by one
//! cancellation token: the swarm ([`crate::network`]), the chunk server
//! ([`crate::chunks`]), the origin fetcher ([`crate::fetcher`]), the
//! control socket (the audit log's writer is a thread, joined when the
//! node stops, so no entry is lost). None waits for this loop:
//! the swarm drops what a lagging loop cannot take (counting it), the
//! fetcher is told its duty through a watch channel, and every chunk
//! request, staging and apply runs as a task that reports back. This loop
//! owns the site's picture (peers, the release under way, the rollout) and
//! is split by concern: `announce` (checking and adopting releases),
//! `election` (who fetches, what the fetcher is told), `storage` (disk
//! guard, store checks, damaged chunks), `install` (applies), `rollout`
//! (commands, waves, the audit log), `heartbeat` (the node's own, and
//! taking its peers'), `status` (clocks, the control socket's answers,
//! site reports); this file keeps the wiring, the event dispatch,
//! transfers between peers and staging.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lanup_protocol::chunk::Chunk;
use lanup_protocol::manifest::unique_chunks;
use lanup_protocol::sign::{SecretKey, Signature};
use lanup_protocol::transfer::Limits;
use lanup_protocol::wire::{Announce, Request, Response};
use lanup_protocol::{Hash, Manifest, Version};
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::apply::{Applier, Ending, Event, Outcome, Release};
use crate::audit::{Audit, Entry};
use crate::chunks::{self, ChunkError};
use crate::config::NodeConfig;
use crate::control::ControlRequest;
use crate::fetcher::{random, Duty, Fetcher, FetcherEvent, FetcherHandle, Wanted, FAILING_FOR};
use crate::manifest_text::ManifestText;
use crate::network::{Network, NetworkClient, NetworkConfig, NetworkEvent, CHUNK_PROTOCOL};
use crate::release::ManifestSource;
use crate::store::ChunkStore;
use crate::throttle::Throttle;
use lanup_protocol::election::{Candidate, Discovery, Election};
use lanup_protocol::rollout::{
    assign_waves, evaluate, Action, Command, NodeReport, ReplayGuard, SignedCommand, Stage,
};

mod announce;
mod approvals;
mod election;
mod gates;
mod heartbeat;
mod install;
mod record;
mod rollout;
mod start;
mod status;
mod storage;
mod transfer;

use heartbeat::{Heard, Heartbeat};
use libp2p::request_response::ResponseChannel;
use transfer::{AfterChunk, Target, Transfers};

use rollout::{audit_writer, Rollout};

/// How often a node says it is alive.
const HEARTBEAT: Duration = Duration::from_millis(lanup_protocol::election::HEARTBEAT_MS);
/// Heartbeats between re-announcements of a release nobody new needs:
/// each announcement is checked by every node of the site (a signature per
/// copy), so an idle site sends few.
const ANNOUNCE_EVERY: u64 = 10;
/// How often a node asks its peers what chunks they gained (those it is
/// not waiting on already: a peer holds a question until it gains a chunk,
/// for seconds).
const HAVE_INTERVAL: Duration = Duration::from_millis(250);
/// How often a starting node looks whether it has settled.
const QUICK_TICK: Duration = Duration::from_millis(50);
/// How long after a peer connects the node sends it a heartbeat: time for
/// the peer's gossip subscription to arrive, so that the heartbeat reaches
/// it.
const EARLY_HEARTBEAT: Duration = Duration::from_millis(200);
/// A peer silent this long is not asked for chunks, and no longer counts
/// for the fetcher election.
const PEER_SILENT: Duration = Duration::from_millis(Election::STATIC_PEERS.silent_ms);
/// How long a node waits before it assembles a release again after that
/// failed (a full disk does not empty itself in 100 ms).
const STAGE_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct PeerInfo {
    connected_at: Instant,
    heartbeat: Option<(Instant, Heartbeat)>,
    /// Connected but silent for [`PEER_SILENT`] (a frozen machine): not
    /// asked for chunks until it speaks again.
    silent: bool,
}

enum Done {
    /// A chunk from a peer is in the store (or why not), fetched for the
    /// release with this manifest hash.
    Chunk(Hash, Result<(PeerId, Hash), ChunkError>),
    /// A peer's answer to "which chunks do you hold", or `None` when the
    /// request failed.
    Have(PeerId, Hash, Option<(Vec<Hash>, u32)>),
    Manifest(PeerId, Hash, Result<(ManifestText, String)>),
    /// Chunks of the release (by manifest hash) found in the store.
    Held(Hash, Vec<Hash>),
    Staged(Hash, Result<PathBuf>),
    ApplyStep(Event),
    Applied(Outcome),
    Commands(PeerId, Vec<SignedCommand>),
    /// The site's fetcher's answer to a `lanup check` passed on to it.
    Checked(PeerId, Result<bool, status::CheckError>),
}

struct Node {
    /// Which peers are members of the site, and whether only members are
    /// admitted.
    gate: crate::membership::Gate,
    /// This node's certificate, sent with its heartbeats.
    own_certificate: Option<lanup_protocol::membership::Certificate>,
    /// What the node shows Prometheus.
    metrics: crate::metrics::Metrics,
    /// Posts the site's reports to headquarters, while this node is the
    /// site's fetcher.
    reporter: Option<crate::report::Reporter>,
    /// A `lanup check` (or several) still to reach the site's fetcher.
    check: Option<status::PendingCheck>,
    /// Set when this node's wave of a lanup release came: the node stops
    /// and hands over to the new lanup.
    leaving: Option<crate::upgrade::Handover>,
    config: NodeConfig,
    net: NetworkClient,
    store: ChunkStore,
    local: PeerId,
    peers: BTreeMap<PeerId, PeerInfo>,
    done_tx: mpsc::Sender<Done>,
    /// The release this node takes up, its chunks and their peers.
    transfer: Transfers<ResponseChannel<Response>>,
    /// Fetchers this node saw make no progress, and when.
    suspects: HashMap<PeerId, Instant>,
    /// The fetcher this node follows, and since when.
    choice: Option<(PeerId, Instant)>,
    /// Whether this node acts as the site's fetcher (it is elected, and has
    /// heard the site since it started or woke): the fetcher's duty.
    was_fetcher: bool,
    /// The last heartbeat tick, to notice a node that was frozen, and
    /// when it woke from that.
    last_tick: Instant,
    woke_at: Option<Instant>,
    /// This node has settled once (see [`Node::settled`]); it stays so.
    has_settled: std::cell::Cell<bool>,
    /// A peer connected: a heartbeat goes out then, not up to a second
    /// later, so that a starting node hears the site (and settles) sooner.
    early_heartbeat: Option<Instant>,
    started: Instant,
    /// The actor that talks to the origin, told what to do through a
    /// channel it never makes this loop wait on.
    fetcher: FetcherHandle,
    announce_topic: String,
    status_topic: String,
    /// Announcements held back from forwarding until their manifest has
    /// been fetched and checked, by manifest hash.
    validating: HashMap<Hash, Vec<(MessageId, PeerId)>>,
    /// (peer, manifest) pairs already refused, so a peer that keeps
    /// announcing is warned about once.
    refused: HashSet<(PeerId, Hash)>,
    /// Installs releases into the configured `[app]`; none without one.
    applier: Option<Applier>,
    /// The installed release's manifest (the target's, when the node
    /// installed it: held once).
    installed: Option<std::sync::Arc<Manifest>>,
    /// The files this node holds that patches from the origin may apply
    /// to (installed, staged, lanup itself), found again after each
    /// install.
    bases: std::sync::Arc<crate::fetch_deltas::Bases>,
    /// The apply under way: its release and the step it is at.
    applying: Option<(String, String)>,
    last_apply: Option<Outcome>,
    /// Releases that rolled back here: not applied again automatically.
    failed_releases: HashSet<String>,
    rollout_topic: String,
    /// Per heartbeat author, directly connected or not: its newest (boot,
    /// sequence), when that came, and whether it has an origin.
    heard: HashMap<PeerId, Heard>,
    /// When this node started (Unix ms), and its heartbeats since.
    boot_ms: u64,
    heartbeats_sent: u64,
    last_sent: Option<heartbeat::Sent>,
    /// The node's short tasks (a chunk, a question to a peer, a manifest
    /// read): ended with the node, reaped each second.
    tasks: tokio::task::JoinSet<()>,
    /// The lack last handed to the fetcher, for the release with this
    /// manifest hash.
    lacking: Option<(Hash, std::sync::Arc<std::collections::BTreeSet<Hash>>)>,
    /// Peers that left a request unanswered or disconnected, and when: not
    /// live until they speak again (forgotten when they speak, or with the
    /// authors not heard for ten minutes).
    unanswered: HashMap<PeerId, Instant>,
    /// Seconds ticked since the node started (housekeeping runs on them).
    ticks: u64,
    /// Announce the release with every heartbeat up to this one (after it
    /// was adopted, or a peer connected), then every
    /// [`ANNOUNCE_EVERY`]th.
    announce_until: u64,
    /// Rollout commands already seen, so none is obeyed twice.
    guard: ReplayGuard,
    /// The audit log's writer: a thread of its own appends and syncs each
    /// entry, so the node's loop never waits for the disk (a peer can make
    /// it refuse commands).
    audit: std::sync::mpsc::SyncSender<Entry>,
    /// The rollout this node follows.
    rollout: Option<Rollout>,
    /// Changes waiting for approvals, by id.
    pending: BTreeMap<String, approvals::Pending>,
    /// Requests rejected lately, oldest first.
    rejected: Vec<approvals::Rejected>,
    /// What this node's apply waits for, when its wave has come.
    waiting: Option<String>,
    /// The health check's verdict in the apply under way.
    health_said: Option<String>,
    /// Bounds the peers' questions about changes answered at once.
    audit_answers: std::sync::Arc<tokio::sync::Semaphore>,
    /// The last rollout command this node refused: (id, reason).
    refused_command: Option<(String, String)>,
    /// Commands refused lately, so each is recorded once.
    refusals: rollout::Refusals,
    /// Commands named in peers' heartbeats that this node asked for, and
    /// when, so each is asked for again only after [`CATCH_UP_RETRY`].
    asked: HashMap<String, Instant>,
}

/// The node's own certificate, checked: one for another site or another
/// key is an error the operator sees at start, an expired one a warning
/// (the node runs, and is a stranger to members-only peers).
fn own_certificate(
    config: &NodeConfig,
    key: &SecretKey,
) -> Result<Option<lanup_protocol::membership::Certificate>> {
    let Some(cert) = crate::membership::load(&config.state)? else {
        if config.members_only_from.is_some() {
            warn!("this node holds no membership certificate: members-only peers ignore it (lanup setup --join TOKEN enrolls it)");
        }
        return Ok(None);
    };
    let none = lanup_protocol::membership::Revocations::default();
    match cert.check(
        &config.site,
        &key.public(),
        &config.trust_admin,
        &none,
        now_unix_ms() / 1000,
    ) {
        Ok(grant) => info!(
            expires = grant.expires,
            "this node is an enrolled member of its site"
        ),
        Err(lanup_protocol::membership::MembershipError::Expired(at)) => {
            warn!(expired = at, "this node's membership certificate has expired: enroll it again (lanup setup --join TOKEN)")
        }
        Err(e) => anyhow::bail!(
            "{}: this node's membership certificate does not hold for site {:?}: {e}",
            crate::membership::certificate_path(&config.state).display(),
            config.site
        ),
    }
    Ok(Some(cert))
}

/// Why a node stopped.
#[derive(Debug)]
pub enum Exit {
    /// It was asked to.
    Stopped,
    /// Its wave of a lanup release came: the caller hands over to the new
    /// lanup with [`crate::upgrade::hand_over`].
    Update(Box<crate::upgrade::Handover>),
}

/// Runs a node until `shutdown` completes, or until it must hand over to a
/// new lanup.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Exit> {
    crate::http::configure(config.http.clone())?;
    let mut notifier = crate::platform::Notifier::from_env();
    let (mut node, mut wiring) = Node::start(config).await?;
    // Recovered, listening on the control socket, the swarm running.
    notifier.ready();
    let failure = node.run_loop(&mut wiring, &mut notifier, shutdown).await;
    let leaving = node.leaving.take();
    if leaving.is_some() {
        // The service goes on in this process with the new lanup (or the
        // old one again): systemd must not see it stopping.
        info!("node stopping to hand over to a new lanup");
        notifier.status("handing over to a new lanup");
    } else {
        info!("node stopping");
        notifier.stopping();
    }
    wiring.cancel.cancel();
    // What the audit log's writer still holds is written before the node
    // ends.
    drop(node);
    let audit_thread = wiring.audit_thread;
    let _ = tokio::task::spawn_blocking(move || audit_thread.join()).await;
    if tokio::time::timeout(Duration::from_secs(5), wiring.children.shutdown())
        .await
        .is_err()
    {
        warn!("parts of the node did not stop within 5 s");
    }
    match (failure, leaving) {
        (Some(e), _) => Err(e),
        (None, Some(handover)) => Ok(Exit::Update(Box::new(handover))),
        (None, None) => Ok(Exit::Stopped),
    }
}

impl Node {
    /// The node's second: notices a freeze, sends the heartbeat if due,
    /// tells the watchdog that the loop, the swarm and the fetcher answer,
    /// and does each part's housekeeping. An error ends the node.
    async fn tick(&mut self, notifier: &mut crate::platform::Notifier) -> Option<anyhow::Error> {
        self.ticks += 1;
        while let Some(ended) = self.tasks.try_join_next() {
            if let Err(e) = ended {
                warn!(error = %e, "a task of the node failed");
            }
        }
        self.notice_freeze();
        wedge_fault(&self.started);
        self.flood_fault();
        self.heartbeat(false).await;
        if crate::upgrade::orphaned() {
            return Some(anyhow::anyhow!(
                "the node that started this trial of a new lanup is gone"
            ));
        }
        // The swarm answering proves its task runs.
        if self.net.alive().await && self.fetcher.answers() {
            notifier.alive();
        }
        self.notice_silence();
        self.prune();
        self.watch_fetcher();
        self.fetcher_duties();
        self.expire_requests();
        self.rollout_duties();
        self.maybe_auto_apply();
        self.report_duties();
        None
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether a release is on its way here (chunks to fetch, or to
    /// assemble): only then do the transfer's ticks run.
    fn moving(&self) -> bool {
        self.transfer
            .target()
            .is_some_and(|t| !t.staged || !t.transfer.is_done())
    }

    /// The files this node holds that patches may apply to, from the
    /// manifests it holds (the target's once it is staged) and those of
    /// its other staged releases.
    fn find_bases(&self) -> std::sync::Arc<crate::fetch_deltas::Bases> {
        let known: Vec<&Manifest> = self
            .installed
            .iter()
            .chain(
                self.transfer
                    .target()
                    .into_iter()
                    .filter(|t| t.staged)
                    .map(|t| &t.manifest),
            )
            .map(|m| &**m)
            .collect();
        std::sync::Arc::new(crate::fetch_deltas::Bases::of_node(
            &self.config.state,
            &known,
        ))
    }

    fn installed_name(&self) -> Option<String> {
        self.installed.as_ref().map(|m| m.release_name())
    }

    /// Whether this node runs `manifest`'s release: lanup's own version for
    /// a lanup release, the installed application's otherwise.
    fn runs(&self, manifest: &Manifest) -> bool {
        if crate::upgrade::is_lanup(manifest) {
            manifest.release_name() == crate::upgrade::version()
        } else {
            self.installed_name() == Some(manifest.release_name())
        }
    }

    /// Whether the release `version` this node knows of is lanup's own.
    fn is_lanup_release(&self, version: &str) -> bool {
        self.transfer
            .target()
            .filter(|t| t.manifest.release_name() == version)
            .is_some_and(|t| crate::upgrade::is_lanup(&t.manifest))
    }
}

impl Node {
    /// Asks every peer which chunks it gained since last time: that is how
    /// chunks fetched from the origin or from others become visible here,
    /// a fraction of a second after they arrive (cut-through).
    fn ask_have(&mut self) {
        let speaking = self
            .peers
            .iter()
            .filter(|(_, p)| !p.silent)
            .map(|(peer, _)| *peer);
        for (peer, hash, since) in self.transfer.have_questions(speaking) {
            let net = self.net.clone();
            let tx = self.done_tx.clone();
            self.tasks.spawn(async move {
                let answer = net
                    .request(
                        peer,
                        Request::Have {
                            manifest_hash: hash,
                            since,
                        },
                    )
                    .await;
                let answer = match answer {
                    Ok(Response::Have { chunks, total }) => Some((chunks, total)),
                    // It does not have the release (yet): nothing to offer.
                    Ok(_) => Some((Vec::new(), since)),
                    Err(_) => None,
                };
                let _ = tx.send(Done::Have(peer, hash, answer)).await;
            });
        }
    }

    /// Answers the held questions about new chunks that now have an answer:
    /// chunks gained since, a release that changed, or a hold that ran out.
    async fn answer_have_waiting(&mut self) {
        for (channel, response) in self.transfer.due_answers() {
            let _ = self.net.respond(channel, response).await;
        }
    }

    async fn on_network(&mut self, event: NetworkEvent) {
        match event {
            NetworkEvent::PeerConnected(peer) => self.peer_connected(peer),
            NetworkEvent::PeerDisconnected(peer) => self.peer_disconnected(peer),
            NetworkEvent::Gossip {
                topic,
                from,
                author,
                id,
                data,
            } => {
                if let Some(verdict) = self.on_gossip(&topic, from, author, id.clone(), &data) {
                    let _ = self.net.validate(id, from, verdict).await;
                }
            }
            NetworkEvent::Request {
                from,
                request,
                channel,
            } => self.on_peer_request(from, request, channel).await,
        }
    }

    fn peer_connected(&mut self, peer: PeerId) {
        // A newcomer learns the release from the next few heartbeats
        // (gossip keeps no history).
        self.announce_until = self.heartbeats_sent + 3;
        self.early_heartbeat
            .get_or_insert(Instant::now() + EARLY_HEARTBEAT);
        self.peers.insert(
            peer,
            PeerInfo {
                connected_at: Instant::now(),
                heartbeat: None,
                silent: false,
            },
        );
        self.transfer.peer_connected(peer);
    }

    fn peer_disconnected(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        // Gone from here: not live until it is heard again (through
        // others, if it still talks to them).
        self.unanswered.insert(peer, Instant::now());
        self.transfer.peer_gone(&peer);
    }

    /// A gossip message's verdict (None: decided later, once an announced
    /// manifest is fetched).
    fn on_gossip(
        &mut self,
        topic: &str,
        from: PeerId,
        author: Option<PeerId>,
        id: MessageId,
        data: &[u8],
    ) -> Option<MessageAcceptance> {
        if topic == self.status_topic {
            Some(self.on_heartbeat(from, author, data))
        } else if topic == self.announce_topic {
            if self.gate.admits(&from, now_unix_ms() / 1000) {
                self.on_announce(from, id, data)
            } else {
                Some(MessageAcceptance::Ignore)
            }
        } else if topic == self.rollout_topic && !self.gate.admits(&from, now_unix_ms() / 1000) {
            // Admin-signed, but a stranger's would only fill the
            // audit log with refusals.
            Some(MessageAcceptance::Ignore)
        } else if topic == self.rollout_topic {
            let verdict = match serde_json::from_slice::<SignedCommand>(data) {
                Ok(signed) => self
                    .on_command(&format!("peer {from}"), signed, false)
                    .is_ok(),
                Err(e) => {
                    let reason = format!("malformed: {e}");
                    self.refuse_command(&format!("peer {from}"), None, &reason, Some("malformed"));
                    false
                }
            };
            Some(if verdict {
                MessageAcceptance::Accept
            } else {
                MessageAcceptance::Reject
            })
        } else {
            Some(MessageAcceptance::Ignore)
        }
    }

    async fn on_peer_request(
        &mut self,
        from: PeerId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) {
        // A stranger, once only members are admitted, learns nothing.
        if !self.gate.admits(&from, now_unix_ms() / 1000) {
            debug!(peer = %from, "refused a request from a peer that is not a member of the site");
            let _ = self.net.respond(channel, Response::Unknown).await;
            return;
        }
        let (channel, response) = match request {
            // Nothing new for a peer that asks which chunks this node
            // gained: it is answered as soon as there is (a long poll), so
            // the last chunk spreads at LAN speed, not at a polling
            // interval.
            Request::Have {
                manifest_hash,
                since,
            } => match self.transfer.ask_held(from, manifest_hash, since, channel) {
                Ok(()) => return,
                Err(answer) => answer,
            },
            Request::Audit { id } => {
                self.answer_audit(id, channel);
                return;
            }
            request => (channel, self.answer_peer(&request)),
        };
        let _ = self.net.respond(channel, response).await;
    }

    /// The answer to a peer's request that is answered at once.
    fn answer_peer(&mut self, request: &Request) -> Response {
        match (request, self.transfer.target()) {
            (
                Request::ManifestPart {
                    manifest_hash,
                    offset,
                },
                Some(t),
            ) if *manifest_hash == t.hash => Response::ManifestPart {
                packed: t.text.part(*offset).to_vec(),
                total: t.text.packed().len() as u64,
                signature: t.signature.clone(),
            },
            (Request::Manifest { manifest_hash }, Some(t))
                if *manifest_hash == t.hash
                    && t.text.len() <= lanup_protocol::wire::MAX_PLAIN_MANIFEST_ANSWER =>
            {
                match t.text.to_vec() {
                    Ok(xml) => Response::Manifest {
                        xml,
                        signature: t.signature.clone(),
                    },
                    Err(_) => Response::Unknown,
                }
            }
            (Request::Check, _) => {
                let fetcher = self.is_fetcher();
                Response::Check {
                    fetcher,
                    polling: fetcher && self.poll_now(),
                }
            }
            (Request::Commands { id }, _) => match &self.rollout {
                Some(r) if r.command.id == *id || r.newest_id() == *id => Response::Commands {
                    commands: r.commands(),
                },
                _ => match self.pending.get(id) {
                    Some(p) => Response::Commands {
                        commands: vec![p.signed.clone()],
                    },
                    None => Response::Unknown,
                },
            },
            _ => Response::Unknown,
        }
    }

    /// Bans `peer` for [`Limits::ban_ms`] and disconnects it.
    async fn distrust(&mut self, peer: PeerId, why: &str) {
        let ban = Duration::from_millis(Limits::default().ban_ms);
        warn!(%peer, ban = %humantime::format_duration(ban), "peer {why}; disconnected and banned");
        self.metrics.bans.inc();
        let _ = self.net.ban(peer, ban).await;
    }

    fn schedule(&mut self) {
        let now = self.now_ms();
        if self.transfer.disk_paused() {
            return;
        }
        // A release refused for want of room is looked at again (every
        // STAGE_RETRY, not every tick: that costs statvfs calls).
        if self.transfer.target().is_some_and(|t| t.no_room.is_some()) {
            self.check_room();
            if self.transfer.target().is_some_and(|t| t.no_room.is_some()) {
                return;
            }
        }
        let Some(t) = self.transfer.target_mut() else {
            return;
        };
        let (requests, _expired) = t.transfer.poll(now);
        for r in requests {
            let control = self.net.streams();
            let store = self.store.clone();
            let tx = self.done_tx.clone();
            let chunk = Chunk {
                size: r.size,
                hash: r.hash,
            };
            let peer_bytes = self.metrics.peer_bytes.clone();
            let release = t.hash;
            self.tasks.spawn(async move {
                let result = chunks::fetch(control, r.peer, chunk, store)
                    .await
                    .map(|()| {
                        peer_bytes.inc_by(r.size);
                        (r.peer, r.hash)
                    });
                let _ = tx.send(Done::Chunk(release, result)).await;
            });
        }
        self.start_staging();
    }

    /// Stages the target as its chunks come (the stager follows them), or
    /// assembles it once all are held (after a stager failed, or for a
    /// release too large to stage as it comes).
    fn start_staging(&mut self) {
        let Some(t) = self.transfer.target_mut() else {
            return;
        };
        let dest = self
            .config
            .state
            .join("staging")
            .join(t.manifest.release_folder());
        let tx = self.done_tx.clone();
        let hash = t.hash;
        if !t.staged
            && !t.staging
            && !t.stager_failed
            && t.no_room.is_none()
            && crate::stage::fits(&t.manifest)
        {
            t.staging = true;
            let manifest = t.manifest.clone();
            let name = manifest.release_name();
            let state = self.config.state.clone();
            let installed: Vec<_> = self.installed.iter().cloned().collect();
            t.stager = Some(crate::stage::start(
                manifest,
                self.store.clone(),
                dest.clone(),
                move || crate::stage::kept(&state, &[name], &installed),
                t.held_order.clone(),
                move |result| {
                    let _ = tx.blocking_send(Done::Staged(hash, result));
                },
            ));
            return;
        }
        let retry = t
            .stage_failed
            .as_ref()
            .is_none_or(|(_, at)| Instant::now() >= *at);
        if t.transfer.is_done() && !t.staged && !t.staging && retry {
            t.staging = true;
            let manifest = t.manifest.clone();
            let store = self.store.clone();
            self.tasks.spawn(async move {
                let result = tokio::task::spawn_blocking(move || {
                    crate::stage::clear_partial(&dest);
                    crate::fetch::assemble(&manifest, &store, &dest).map(|()| dest)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
                let _ = tx.send(Done::Staged(hash, result)).await;
            });
        }
    }

    /// What the fetcher found at the origin.
    fn on_fetcher(&mut self, found: FetcherEvent) {
        match found {
            FetcherEvent::Manifest {
                location,
                text,
                signature,
            } => {
                let _ = self.adopt(&location, text, signature);
                self.assign_duty();
            }
            FetcherEvent::Chunk {
                release,
                chunk: hash,
            } => {
                // A chunk of a release no longer the target is in the
                // store, but not held for this one (its own is found
                // there if it has it too).
                if let Some(t) = self.transfer.target_mut().filter(|t| t.hash == release) {
                    t.transfer.obtained(&hash);
                    if t.held.insert(hash) {
                        t.held_order.push(hash);
                        if let Some(s) = &t.stager {
                            s.gained(hash);
                        }
                    }
                }
            }
            // The fetcher hears what the site lacks once the store was
            // looked at (`Done::Held`), so it does not ask the origin
            // again for chunks whose notices were dropped.
            FetcherEvent::Ended => self.reconcile_store(),
            FetcherEvent::Fleet(bytes) => self.on_fleet(&bytes),
            FetcherEvent::Revocations(bytes) => {
                match serde_json::from_slice::<lanup_protocol::membership::Signed>(&bytes) {
                    Ok(list) => {
                        let _ = self.take_revocations(&list, "the origin");
                    }
                    Err(e) => {
                        warn!(error = %e, "the site's published revocation list cannot be read; ignored")
                    }
                }
            }
        }
    }

    async fn on_done(&mut self, done: Done) {
        match done {
            Done::Chunk(release, result) => {
                match self.transfer.chunk_done(&release, result, self.now_ms()) {
                    AfterChunk::Stale => return,
                    AfterChunk::Schedule => {}
                    AfterChunk::Distrust(peer) => self.distrust(peer, "sent a bad chunk").await,
                    AfterChunk::DiskFailed(reason) => self.transfer.disk_failed(reason, random()),
                }
                // A free slot is used at once, not at the next tick.
                self.schedule();
            }
            Done::Have(peer, hash, answer) => {
                let silent = self.peers.get(&peer).is_none_or(|p| p.silent);
                let Some(gained) = self.transfer.have_answered(peer, &hash, answer, silent) else {
                    return;
                };
                if self.was_fetcher {
                    self.assign_duty();
                }
                if gained {
                    // Asked again at once (it holds the question until it
                    // gains more), and what it has is asked for now.
                    self.ask_have();
                    self.schedule();
                }
            }
            Done::Manifest(peer, hash, result) => self.manifest_fetched(peer, hash, result).await,
            Done::Held(hash, held) => {
                if !self.transfer.is_target(&hash) {
                    return;
                }
                for chunk in held {
                    self.transfer.gained(&hash, chunk);
                }
                self.assign_duty();
            }
            Done::Staged(hash, result) => self.staged(hash, result),
            Done::Commands(peer, commands) => self.catch_up(peer, commands),
            Done::Checked(fetcher, answer) => self.checked(fetcher, answer),
            Done::ApplyStep(event) => self.apply_step(event),
            Done::Applied(outcome) => self.applied(outcome),
        }
    }

    /// An announced manifest came from the peer that announced it (or did
    /// not): the announcement's verdict, for every copy that waited on it.
    async fn manifest_fetched(
        &mut self,
        peer: PeerId,
        hash: Hash,
        result: Result<(ManifestText, String)>,
    ) {
        let waiting = self.validating.remove(&hash).unwrap_or_default();
        let verdict = match result {
            Ok((text, _)) if text.hash() != hash => {
                warn!(%peer, "refused announcement: the manifest it sent is not the one it announced");
                MessageAcceptance::Reject
            }
            Ok((text, sig)) => self.adopt(&format!("peer {peer}"), text, sig),
            Err(e) => {
                warn!(%peer, error = %format!("{e:#}"), "could not fetch an announced manifest");
                MessageAcceptance::Ignore
            }
        };
        if verdict == MessageAcceptance::Reject {
            self.refused.insert((peer, hash));
        }
        for (id, from) in waiting {
            let _ = self.net.validate(id, from, verdict).await;
        }
    }

    /// Staging of the release `hash` ended.
    fn staged(&mut self, hash: Hash, result: Result<PathBuf>) {
        let Some(t) = self.transfer.target_mut().filter(|t| t.hash == hash) else {
            return;
        };
        t.staging = false;
        if t.stager.take().is_some() && result.is_err() {
            t.stager_failed = true;
        }
        match result {
            Ok(dir) => {
                t.staged = true;
                t.stage_failed = None;
                info!(release = %t.manifest.release_name(), dir = %dir.display(), "release staged and verified");
                let keep = self
                    .config
                    .state
                    .join("releases")
                    .join(t.manifest.release_folder());
                let written = crate::apply::write_text_synced(
                    &keep.join(lanup_protocol::manifest::MANIFEST_FILE),
                    &t.text,
                )
                .and_then(|()| {
                    crate::apply::write_synced(
                        &keep.join(lanup_protocol::manifest::SIGNATURE_FILE),
                        t.signature.as_bytes(),
                    )
                });
                if let Err(e) = written {
                    warn!(dir = %keep.display(), error = %e, "cannot keep the staged release's manifest");
                }
                self.collect_garbage();
                self.bases = self.find_bases();
                self.maybe_auto_apply();
            }
            Err(e) if e.downcast_ref::<crate::fetch::DamagedChunk>().is_some() => {
                if let Some(damaged) = e.downcast_ref::<crate::fetch::DamagedChunk>() {
                    let hash = damaged.0;
                    self.chunk_lost(hash);
                }
            }
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(release = %t.manifest.release_name(), error = %reason, retry_in = ?STAGE_RETRY, "staging failed; the installed release is untouched");
                t.stage_failed = Some((reason, Instant::now() + STAGE_RETRY));
            }
        }
    }

    /// A step of the apply under way (the steps a change's record names:
    /// the hand-over and the health check).
    fn apply_step(&mut self, event: Event) {
        // The steps a change's record names: the hand-over and the
        // health check.
        match event.step.as_str() {
            "health" => self.health_said = Some(event.message.clone()),
            "switchover" => {
                if let Some(r) = &self.rollout {
                    self.audit_entry(Entry {
                        event: "switchover".into(),
                        action: Some(if r.back { "rollback" } else { "rollout" }.into()),
                        version: Some(r.version.clone()),
                        id: Some(r.command.id.clone()),
                        reason: Some(event.message.clone()),
                        ..Entry::default_at(now_unix_ms())
                    });
                }
            }
            _ => {}
        }
        if let Some((_, step)) = &mut self.applying {
            *step = event.step;
        }
    }

    /// An apply ended.
    fn applied(&mut self, outcome: Outcome) {
        self.applying = None;
        let health = self.health_said.take();
        match outcome.ending {
            Ending::Committed => {
                self.installed = match self.transfer.target() {
                    Some(t) if t.manifest.release_name() == outcome.version => {
                        Some(t.manifest.clone())
                    }
                    _ => crate::apply::read_installed(&self.config.state)
                        .ok()
                        .flatten()
                        .map(|i| i.manifest),
                };
                self.bases = self.find_bases();
                info!(release = %outcome.version, downtime_ms = ?outcome.downtime_ms, "release installed");
            }
            Ending::RolledBack => {
                self.failed_releases.insert(outcome.version.clone());
                warn!(release = %outcome.version, reason = ?outcome.reason, "release rolled back");
            }
            Ending::Failed => {
                warn!(release = %outcome.version, reason = ?outcome.reason, "release not installed")
            }
        }
        if let Some(r) = self
            .rollout
            .as_ref()
            .filter(|r| r.version == outcome.version)
        {
            self.audit_entry(Entry {
                event: match outcome.ending {
                    Ending::Committed => "applied",
                    Ending::RolledBack => "rolled-back",
                    Ending::Failed => "apply-failed",
                }
                .into(),
                action: Some(if r.back { "rollback" } else { "rollout" }.into()),
                version: Some(outcome.version.clone()),
                id: Some(r.command.id.clone()),
                // A commit says how its health was judged.
                reason: outcome.reason.clone().or(health),
                downtime_ms: outcome.downtime_ms,
                ..Entry::default_at(now_unix_ms())
            });
        }
        self.metrics.applied(outcome.ending.name());
        self.last_apply = Some(outcome);
        // A release staged while this apply ran is next.
        self.maybe_auto_apply();
        self.rollout_duties();
    }
}

/// With the `fault-injection` feature (tests only),
/// `LANUP_FAULT_WEDGE_AFTER_S=N` blocks the node's loop for good N seconds
/// after it started: a wedged node, which must stop pinging the watchdog.
fn wedge_fault(started: &Instant) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("LANUP_FAULT_WEDGE_AFTER_S")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
    {
        warn!("fault injected: the node's loop is wedged");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = started;
}

/// Runs `part` until it ends or `cancel` fires.
async fn until(cancel: tokio_util::sync::CancellationToken, part: impl std::future::Future) {
    tokio::select! {
        () = cancel.cancelled() => {}
        _ = part => {}
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
