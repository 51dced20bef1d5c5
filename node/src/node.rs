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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lanup_protocol::chunk::Chunk;
use lanup_protocol::manifest::unique_chunks;
use lanup_protocol::sign::{SecretKey, Signature};
use lanup_protocol::transfer::{Limits, Transfer};
use lanup_protocol::wire::{Announce, Request, Response};
use lanup_protocol::{Hash, Manifest, Version};
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::apply::{Applier, Ending, Event, Outcome, Release};
use crate::audit::{Audit, Entry};
use crate::chunks::{self, ChunkError};
use crate::config::NodeConfig;
use crate::control::ControlRequest;
use crate::fetch::fetch_missing;
use crate::network::{Network, NetworkClient, NetworkConfig, NetworkEvent, CHUNK_PROTOCOL};
use crate::release::{ManifestSource, Poll};
use crate::store::ChunkStore;
use crate::throttle::Throttle;
use lanup_protocol::election::{Candidate, Election};
use lanup_protocol::fetcher::{Job, OriginPlan, ReleaseView, Step, View};
use lanup_protocol::rollout::{
    assign_waves, evaluate, Action, Command, NodeReport, ReplayGuard, SignedCommand, Stage,
};

/// How often a node says it is alive, and re-announces its release.
const HEARTBEAT: Duration = Duration::from_millis(lanup_protocol::election::HEARTBEAT_MS);
/// How often a node asks its peers what chunks they gained.
const HAVE_INTERVAL: Duration = Duration::from_millis(250);
/// A peer silent this long is not asked for chunks, and no longer counts
/// for the fetcher election.
const PEER_SILENT: Duration = Duration::from_millis(Election::STATIC_PEERS.silent_ms);
/// How long a node whose origin failed (as it says, or as others saw it)
/// is passed over for the fetcher role; then it may try again.
const FAILING_FOR: Duration = Duration::from_secs(600);
/// Chunk requests to one peer that stall in a row before it is banned.
const STALLS_TO_DISTRUST: u32 = 3;
/// How long a node waits before it assembles a release again after that
/// failed (a full disk does not empty itself in 100 ms).
const STAGE_RETRY: Duration = Duration::from_secs(30);
/// How long a download from the origin may go on without the node
/// confirming (every heartbeat) that it is still the site's fetcher. A node
/// frozen for longer (a paused VM, a swap storm) wakes with its download
/// stopped, and learns what the site holds before it asks again.
const ORIGIN_LEASE: Duration = Duration::from_secs(3);

/// The heartbeat every node gossips.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat {
    has_origin: bool,
    /// `idle`, `fetching` or `staged`.
    state: String,
    release: Option<String>,
    staged_version: Option<String>,
    bytes_have: u64,
    bytes_total: u64,
    origin_bytes: u64,
    #[serde(default)]
    installed_version: Option<String>,
    /// `applying`, or how the last apply ended: `committed`,
    /// `rolled-back`, `failed`.
    #[serde(default)]
    apply: Option<String>,
    /// The step an apply under way is at.
    #[serde(default)]
    apply_step: Option<String>,
    /// Why the last apply did not commit.
    #[serde(default)]
    last_error: Option<String>,
    /// The release whose last apply here rolled back.
    #[serde(default)]
    failed_version: Option<String>,
    /// When the sender started (Unix ms) and how many heartbeats it sent
    /// since: gossip can deliver an old heartbeat after a newer one, and
    /// that must not turn back what the site knows of the sender.
    #[serde(default)]
    boot_ms: u64,
    #[serde(default)]
    seq: u64,
    /// The newest rollout command the sender follows (the abort, when it
    /// stopped the rollout): a node that does not know it asks for it.
    #[serde(default)]
    command_id: Option<String>,
    /// Bytes the sender received from the origin, counted as they arrive:
    /// others see from it whether the fetcher makes progress.
    #[serde(default)]
    origin_received: u64,
    /// The sender acts as the site's fetcher.
    #[serde(default)]
    acting_fetcher: bool,
    /// The sender's origin keeps failing, or it makes no progress: it
    /// gives the role to the next node.
    #[serde(default)]
    origin_failing: bool,
    /// Fetchers the sender saw make no progress lately: the site passes
    /// them over, and a node named here yields the role itself.
    #[serde(default)]
    suspects: Vec<String>,
    /// The sender's wall clock when it sent this (Unix ms): receivers
    /// measure the skew between their clocks from it.
    #[serde(default)]
    clock_ms: u64,
    /// The last rollout command the sender refused: (id, reason). A
    /// rollout one of its nodes refused cannot finish; it halts, saying
    /// why, instead of waiting for good.
    #[serde(default)]
    refused: Option<(String, String)>,
}

#[derive(Debug)]
struct PeerInfo {
    connected_at: Instant,
    heartbeat: Option<(Instant, Heartbeat)>,
    /// Connected but silent for [`PEER_SILENT`] (a frozen machine): not
    /// asked for chunks until it speaks again.
    silent: bool,
}

/// The release this node is moving towards.
struct Target {
    manifest: Manifest,
    xml: Vec<u8>,
    signature: String,
    hash: Hash,
    transfer: Transfer<PeerId>,
    held: HashSet<Hash>,
    /// `held` in the order chunks arrived, so peers can ask what is new.
    held_order: Vec<Hash>,
    /// Per peer, how many of its chunks this node has heard of.
    peer_since: BTreeMap<PeerId, u32>,
    bytes_total: u64,
    staged: bool,
    staging: bool,
    /// Why the last staging failed (a full disk, say), and when to try
    /// again.
    stage_failed: Option<(String, Instant)>,
    /// The release does not fit on this node's disks (the disk guard's
    /// message), and when to look again: nothing is fetched meanwhile.
    no_room: Option<(String, Instant)>,
    adopted_at: Instant,
}

enum Done {
    Chunk(Result<(PeerId, Hash), ChunkError>),
    /// A peer's answer to "which chunks do you hold", or `None` when the
    /// request failed.
    Have(PeerId, Hash, Option<(Vec<Hash>, u32)>),
    Manifest(PeerId, Hash, Result<(Vec<u8>, String)>),
    OriginChunk(Hash, u64),
    /// A poll or download of the origin ended; the number says which
    /// (answers of one that was stopped are ignored).
    OriginPoll(u64, Result<Poll>),
    OriginFinished(
        u64,
        Result<crate::fetch::FetchReport, crate::fetch::FetchError>,
    ),
    Staged(Hash, Result<PathBuf>),
    ApplyStep(Event),
    Applied(Outcome),
    Commands(PeerId, Vec<SignedCommand>),
}

struct Node {
    config: NodeConfig,
    net: NetworkClient,
    store: ChunkStore,
    local: PeerId,
    peers: BTreeMap<PeerId, PeerInfo>,
    target: Option<Target>,
    done_tx: mpsc::Sender<Done>,
    /// The poll or download running against the origin, if any.
    origin_task: Option<tokio::task::AbortHandle>,
    /// Chunk requests that stalled in a row, per peer: a peer that
    /// advertises chunks and never sends them is distrusted like one that
    /// sends bad ones.
    stalls: HashMap<PeerId, u32>,
    /// Peers asked which chunks they hold and not answered yet.
    have_pending: HashSet<PeerId>,
    /// Bytes received from the origin (counted by the download as they
    /// arrive), and when that count last grew.
    origin_received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    progress_seen: (u64, Instant),
    /// When the origin last failed.
    origin_failed_at: Option<Instant>,
    /// Fetchers this node saw make no progress, and when.
    suspects: HashMap<PeerId, Instant>,
    /// The fetcher this node follows, and since when.
    choice: Option<(PeerId, Instant)>,
    /// This node's own disk refused a chunk (read-only, full): transfers
    /// pause until then, longer each time, and the status says why.
    disk_failures: u32,
    disk_paused_until: Option<Instant>,
    disk_error: Option<String>,
    /// Whether this node was the fetcher at the last look (for the log).
    was_fetcher: bool,
    /// Bytes this node took from the origin, counted as chunks arrive.
    origin_bytes: u64,
    /// Of those, the bytes counted during the download now running.
    origin_counted: u64,
    /// The release being downloaded from the origin, and the bytes taken
    /// for it so far (for the log).
    downloading: Option<(Hash, u64)>,
    /// The origin manifest's ETag at the last poll, for a conditional GET.
    etag: Option<String>,
    /// When to poll and download, which job is current, and the backoff
    /// after failures: the fetcher's rules from `lanup_protocol::fetcher`.
    plan: OriginPlan,
    origin_error: Option<String>,
    /// Until when (ms since `started`) a download may go on; renewed by
    /// every heartbeat while this node is the fetcher.
    origin_lease: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The chunks no reachable peer holds, as the download sees them (it
    /// looks before every request).
    site_lacks: tokio::sync::watch::Sender<std::sync::Arc<std::collections::BTreeSet<Hash>>>,
    /// The last heartbeat tick, to notice a node that was frozen, and
    /// when it woke from that.
    last_tick: Instant,
    woke_at: Option<Instant>,
    wan: Throttle,
    started: Instant,
    http: reqwest::Client,
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
    /// The installed release's manifest.
    installed: Option<Manifest>,
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
    /// Rollout commands already seen, so none is obeyed twice.
    guard: ReplayGuard,
    /// The audit log's writer: a thread of its own appends and syncs each
    /// entry, so the node's loop never waits for the disk (a peer can make
    /// it refuse commands).
    audit: std::sync::mpsc::Sender<Entry>,
    /// The rollout this node follows.
    rollout: Option<Rollout>,
    /// The last rollout command this node refused: (id, reason).
    refused_command: Option<(String, String)>,
    /// Commands refused lately (by id and reason), so each is recorded once.
    refusals: HashMap<(Option<String>, String), Instant>,
    /// Commands named in peers' heartbeats that this node asked for, and
    /// when, so each is asked for again only after [`CATCH_UP_RETRY`].
    asked: HashMap<String, Instant>,
}

/// The newest heartbeat of one author.
#[derive(Debug, Clone)]
struct Heard {
    boot_seq: (u64, u64),
    at: Instant,
    has_origin: bool,
    /// When its count of bytes from the origin last grew (or it was first
    /// heard).
    progress_at: Instant,
    /// Its clock minus this node's, in ms, measured when its heartbeat
    /// arrived (LAN delays are milliseconds).
    skew_ms: Option<i64>,
    /// The heartbeat itself, for a node heard only through others.
    heartbeat: Heartbeat,
}

/// An accepted rollout (or rollback) command and where it stands.
struct Rollout {
    command: Command,
    signed: SignedCommand,
    /// The abort that stopped it, offered with it to nodes that catch up.
    abort: Option<SignedCommand>,
    version: String,
    /// A rollback: every node returns to `version` at once.
    back: bool,
    waves: Vec<Vec<String>>,
    /// Set once: the node that failed (or the admin that aborted) and why.
    halted: Option<(String, String)>,
    done: bool,
}

/// `STATE/rollout.json`: the rollout a node follows, so a restarted node
/// goes on with it (its signatures are checked again when it is read).
#[derive(Debug, Serialize, Deserialize)]
struct SavedRollout {
    /// The rollout or rollback, then its abort if any.
    commands: Vec<SignedCommand>,
    halted: Option<(String, String)>,
    done: bool,
}

const ROLLOUT_FILE: &str = "rollout.json";

/// How long a refused command stays refused without another log line.
const REFUSAL_QUIET: Duration = Duration::from_secs(600);

/// How long before a command a peer names, and that could not be had, is
/// asked for again.
const CATCH_UP_RETRY: Duration = Duration::from_secs(10);

impl Rollout {
    /// Follows an accepted command (a rollout or a rollback).
    fn new(command: Command, signed: SignedCommand) -> Option<Rollout> {
        let (version, back) = match &command.action {
            Action::Rollout { version } => (version.clone(), false),
            Action::Rollback { version } => (version.clone(), true),
            Action::Abort => return None,
        };
        // A rollback is one wave: every node returns at once.
        let sizes = if back {
            vec![lanup_protocol::rollout::WaveSize::Percent(100)]
        } else {
            command.waves.clone()
        };
        let waves = assign_waves(&command.id, &command.nodes, &sizes);
        Some(Rollout {
            version,
            back,
            waves,
            halted: None,
            done: false,
            abort: None,
            command,
            signed,
        })
    }

    /// The id peers are told about: the abort's once there is one.
    fn newest_id(&self) -> String {
        self.abort
            .as_ref()
            .and_then(|a| serde_json::from_str::<Command>(&a.command).ok())
            .map_or_else(|| self.command.id.clone(), |a| a.id)
    }

    fn commands(&self) -> Vec<SignedCommand> {
        std::iter::once(self.signed.clone())
            .chain(self.abort.clone())
            .collect()
    }

    /// Reads `STATE/rollout.json`, checking each command's signature again
    /// (the trusted keys may have changed); not its age.
    fn load(
        state: &std::path::Path,
        trusted: &[lanup_protocol::sign::PublicKey],
        site: &str,
    ) -> Option<Rollout> {
        let path = state.join(ROLLOUT_FILE);
        let bytes = std::fs::read(&path).ok()?;
        let saved: SavedRollout = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the saved rollout; not following it");
                return None;
            }
        };
        let mut commands = saved.commands.into_iter();
        let signed = commands.next()?;
        let checked = lanup_protocol::rollout::authenticate(&signed, trusted, site);
        let mut rollout = match checked.map(|c| Rollout::new(c, signed)) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                warn!(file = %path.display(), reason = %e, "the saved rollout no longer checks; not following it");
                return None;
            }
        };
        rollout.abort = commands
            .next()
            .filter(|a| lanup_protocol::rollout::authenticate(a, trusted, site).is_ok());
        rollout.halted = saved.halted;
        rollout.done = saved.done;
        Some(rollout)
    }
}

/// Loads or creates the node's identity in `state/identity.key`.
fn identity(state: &std::path::Path) -> Result<SecretKey> {
    let path = state.join("identity.key");
    if path.exists() {
        return crate::keys::load_secret(&path);
    }
    crate::keys::generate(&path)?;
    crate::keys::load_secret(&path)
}

/// Runs a node until `shutdown` completes.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    std::fs::create_dir_all(&config.state)
        .with_context(|| format!("cannot create state directory {}", config.state.display()))?;
    crate::control::ensure_alone(&config.state)?;
    let key = identity(&config.state)?;
    // An interrupted apply is resolved before anything else.
    let applier = config
        .app
        .clone()
        .map(|app| Applier::new(&config.state, app));
    if let Some(applier) = applier.clone() {
        let recovered = tokio::task::spawn_blocking(move || applier.recover(&mut |_| {}))
            .await
            .context("recovery task")??;
        if let Some(outcome) = recovered {
            info!(release = %outcome.version, ending = ?outcome.ending, "resolved an interrupted apply");
        }
    }
    let installed = crate::apply::read_installed(&config.state)?;
    let last_apply = applier.as_ref().and_then(Applier::last);
    let psk = match &config.psk {
        None => None,
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read psk {}", path.display()))?
                .parse::<libp2p::pnet::PreSharedKey>()
                .map_err(|e| anyhow::anyhow!("psk {}: {e}", path.display()))?,
        ),
    };
    let (network, net, mut events) = Network::new(
        key.to_libp2p(),
        NetworkConfig {
            listen: config.listen.clone(),
            peers: config.peers.clone(),
            psk,
            mdns: config.mdns,
        },
    )?;
    let local = net.local_peer_id();
    info!(peer = %local, site = %config.site, origin = ?config.origin, "node starting");
    tokio::spawn(network.run());
    let store = ChunkStore::open(&config.state.join("chunks"))?;
    let incoming = net.streams().accept(CHUNK_PROTOCOL)?;
    let (damaged_tx, mut damaged) = mpsc::channel::<Hash>(64);
    tokio::spawn(chunks::serve(
        incoming,
        store.clone(),
        Throttle::new(config.lan_rate),
        damaged_tx.clone(),
    ));

    let announce_topic = format!("lanup/{}/announce", config.site);
    let status_topic = format!("lanup/{}/status", config.site);
    let rollout_topic = format!("lanup/{}/rollout", config.site);
    net.subscribe(&announce_topic).await?;
    net.subscribe(&status_topic).await?;
    net.subscribe(&rollout_topic).await?;
    let audit = Audit::new(&config.state);
    let mut guard = ReplayGuard::default();
    for entry in audit.read()?.iter().filter(|e| e.event == "accepted") {
        if let (Some(id), Some(at)) = (&entry.id, entry.issued_at_ms) {
            guard.remember(id, at);
        }
    }
    let (audit_tx, audit_thread) = audit_writer(audit)?;
    let (done_tx, mut done) = mpsc::channel(1024);
    let (control_tx, mut control) = mpsc::channel::<crate::control::Incoming>(16);
    crate::control::listen(&config.state, control_tx)?;
    let wan = Throttle::new(config.wan_rate);
    let rollout = Rollout::load(&config.state, &config.trust_admin, &config.site);
    let config_stall = config.origin_stall;
    let config_poll_ms = config.poll_interval.as_millis() as u64;
    let mut node = Node {
        config,
        net,
        store,
        local,
        peers: BTreeMap::new(),
        target: None,
        done_tx,
        origin_task: None,
        stalls: HashMap::new(),
        have_pending: HashSet::new(),
        origin_received: Default::default(),
        progress_seen: (0, Instant::now()),
        origin_failed_at: None,
        suspects: HashMap::new(),
        choice: None,
        disk_failures: 0,
        disk_paused_until: None,
        disk_error: None,
        was_fetcher: false,
        origin_bytes: 0,
        origin_counted: 0,
        downloading: None,
        etag: None,
        plan: OriginPlan::new(config_poll_ms),
        origin_error: None,
        origin_lease: Default::default(),
        site_lacks: tokio::sync::watch::Sender::new(Default::default()),
        last_tick: Instant::now(),
        woke_at: None,
        wan,
        started: Instant::now(),
        http: crate::fetch::Origin::client(config_stall)?,
        announce_topic,
        status_topic,
        validating: HashMap::new(),
        refused: HashSet::new(),
        applier,
        installed: installed.map(|i| i.manifest),
        applying: None,
        failed_releases: last_apply
            .iter()
            .filter(|o| o.ending == Ending::RolledBack)
            .map(|o| o.version.clone())
            .collect(),
        last_apply,
        rollout_topic,
        heard: HashMap::new(),
        boot_ms: now_unix_ms(),
        heartbeats_sent: 0,
        rollout,
        guard,
        audit: audit_tx,
        asked: HashMap::new(),
        refusals: HashMap::new(),
        refused_command: None,
    };
    if let Some(r) = &node.rollout {
        info!(release = %r.version, id = %r.command.id, "following the rollout saved before the node stopped");
    }
    if let Some(m) = &node.installed {
        info!(release = %m.release_name(), "installed release");
    }
    node.load_staged();
    node.check_store(damaged_tx);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    // After a freeze, one tick (that notices it), not a burst of them.
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut schedule = tokio::time::interval(Duration::from_millis(100));
    let mut have = tokio::time::interval(HAVE_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(event) = events.recv() => node.on_network(event).await,
            Some(d) = done.recv() => node.on_done(d).await,
            Some((request, reply)) = control.recv() => node.control(request, reply),
            Some(hash) = damaged.recv() => node.chunk_lost(hash),
            _ = heartbeat.tick() => {
                node.notice_freeze();
                node.heartbeat().await;
                node.notice_silence();
                node.prune();
                node.watch_fetcher();
                node.fetcher_duties();
                node.rollout_duties();
            }
            _ = schedule.tick() => node.schedule(),
            _ = have.tick() => node.ask_have(),
        }
    }
    info!("node stopping");
    // What the audit log's writer still holds is written before the node
    // ends.
    drop(node);
    let _ = tokio::task::spawn_blocking(move || audit_thread.join()).await;
    Ok(())
}

impl Node {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn election(&self) -> Election {
        if self.config.mdns {
            Election::MDNS
        } else {
            Election::STATIC_PEERS
        }
    }

    /// Whether this node has heard from every peer it is connected to, so
    /// an election now would see the whole site.
    fn settled(&self) -> bool {
        let ms = |d: Duration| d.as_millis() as u64;
        self.election().settled(
            ms(self.started.elapsed()),
            self.peers.values().map(|p| {
                (
                    p.heartbeat.as_ref().map(|(at, _)| ms(at.elapsed())),
                    ms(p.connected_at.elapsed()),
                )
            }),
        )
    }

    /// Keeps what the node remembers per peer bounded: authors not heard
    /// for ten minutes, catch-up questions past their retry, and (beyond a
    /// thousand) the refusals remembered to warn once are forgotten.
    fn prune(&mut self) {
        const FORGET: Duration = Duration::from_secs(600);
        // Once a minute, the application's output log is kept bounded.
        if self.heartbeats_sent.is_multiple_of(60) {
            if let Some(applier) = self.applier.clone() {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = applier.rotate_app_log() {
                        warn!(error = %e, "cannot rotate the application's log");
                    }
                });
            }
        }
        self.heard.retain(|_, h| h.at.elapsed() < FORGET);
        self.asked.retain(|_, at| at.elapsed() < CATCH_UP_RETRY);
        self.refusals.retain(|_, at| at.elapsed() < REFUSAL_QUIET);
        self.suspects.retain(|_, at| at.elapsed() < FAILING_FOR);
        if self.refused.len() > 1024 {
            self.refused.clear();
        }
    }

    /// Peers that stopped talking without disconnecting (a frozen machine)
    /// are no longer asked for chunks; what is in flight to them is asked
    /// elsewhere, and the fetcher treats their chunks as missing.
    fn notice_silence(&mut self) {
        for (peer, info) in &mut self.peers {
            let last = info
                .heartbeat
                .as_ref()
                .map_or(info.connected_at, |(at, _)| *at);
            if !info.silent && last.elapsed() >= PEER_SILENT {
                info.silent = true;
                warn!(%peer, "peer connected but silent for 5 s; not asking it for chunks");
                if let Some(t) = &mut self.target {
                    t.transfer.peer_disconnected(peer);
                }
            }
        }
    }

    /// The fetcher polls the origin when a poll is due and downloads what
    /// no node at the site holds; a node that stops being the fetcher (a
    /// lower PeerId appeared) stops its download, and the chunks it got stay
    /// at the site.
    fn fetcher_duties(&mut self) {
        let woke = self
            .woke_at
            .is_some_and(|at| at.elapsed().as_millis() < u128::from(self.election().grace_ms));
        let fetcher = self.is_fetcher() && self.settled() && !woke;
        if fetcher != self.was_fetcher {
            self.was_fetcher = fetcher;
            if fetcher {
                info!("this node is now the site's fetcher");
            } else if self.stop_origin() {
                info!("another node is the site's fetcher now; stopped talking to the origin");
            }
        }
        let lease = if fetcher {
            self.now_ms() + ORIGIN_LEASE.as_millis() as u64
        } else {
            0
        };
        self.origin_lease
            .store(lease, std::sync::atomic::Ordering::Relaxed);
        self.origin_step();
    }

    /// Asks the fetcher's rules what to do now and does it: poll, download
    /// what the site lacks, or stop the job under way.
    fn origin_step(&mut self) {
        let now = self.now_ms();
        let view = View {
            acting: self.was_fetcher && self.config.origin.is_some(),
            release: self.target.as_ref().map(|t| ReleaseView {
                lacking: !t.transfer.is_done() && !t.transfer.unavailable(now).is_empty(),
                heard_all: self
                    .peers
                    .iter()
                    .all(|(p, info)| info.silent || t.peer_since.contains_key(p)),
                adopted_ms_ago: t.adopted_at.elapsed().as_millis() as u64,
                blocked: t.no_room.is_some(),
            }),
        };
        match self.plan.step(now, &view) {
            Step::Idle => {}
            Step::Stop(_) => self.abort_origin_task(),
            Step::Start(epoch, Job::Poll) => self.poll_origin(epoch),
            Step::Start(epoch, Job::Download) => self.download(epoch),
        }
    }

    fn origin_busy(&self) -> bool {
        self.plan.running().is_some()
    }

    fn abort_origin_task(&mut self) {
        if let Some(task) = self.origin_task.take() {
            task.abort();
        }
        self.reconcile_store();
    }

    /// Stops the poll or download under way, if any; its late answers are
    /// ignored. Returns whether one was running.
    fn stop_origin(&mut self) -> bool {
        let stopped = self.plan.stop().is_some();
        self.abort_origin_task();
        stopped
    }

    /// Notices that this node was frozen (no heartbeat tick for several
    /// seconds: a paused VM, SIGSTOP, a swap storm). What it knew of the
    /// site is old: its download stops, it asks every peer afresh what it
    /// holds, and it does not act as the fetcher until it has heard the
    /// site again, so it never fetches what a stand-in fetched meanwhile.
    fn notice_freeze(&mut self) {
        let gap = self.last_tick.elapsed();
        self.last_tick = Instant::now();
        if gap < HEARTBEAT * 3 {
            return;
        }
        warn!(
            frozen_s = gap.as_secs(),
            "this node was frozen; it listens to the site again before it talks to the origin"
        );
        self.origin_lease
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.stop_origin();
        self.was_fetcher = false;
        self.woke_at = Some(Instant::now());
        if let Some(t) = &mut self.target {
            t.peer_since.clear();
            t.adopted_at = Instant::now();
        }
    }

    /// The origin answered as it should.
    fn origin_ok(&mut self) {
        if self.origin_error.take().is_some() {
            info!("the origin answers again");
        }
    }

    /// The origin (or this node's disk, holding what it sent) failed; the
    /// fetcher's rules wait longer each time in a row (5 s doubling, with
    /// jitter, at most the poll interval or 5 minutes) before the origin is
    /// asked anything again. One WARN per wait; the reason is in the
    /// status.
    fn origin_failed(&mut self, what: &str, reason: String) {
        let wait = self.plan.retry_in_ms(self.now_ms()).unwrap_or_default();
        warn!(error = %reason, retry_in = %humantime::format_duration(Duration::from_secs(wait / 1000)), "{what}; backing off");
        self.origin_failed_at = Some(Instant::now());
        self.origin_error = Some(reason);
    }

    /// Chunk notices from a download are best effort (a full queue drops
    /// them); the store is the truth.
    fn reconcile_store(&mut self) {
        let Some(t) = &mut self.target else { return };
        for hash in unique_chunks(&t.manifest.files).keys() {
            if !t.held.contains(hash) && self.store.has(hash) {
                t.transfer.obtained(hash);
                t.held.insert(*hash);
                t.held_order.push(*hash);
            }
        }
    }

    /// Keeps the store bounded: once a release is staged, chunks and staged
    /// folders of other releases go, except the installed release's staged
    /// folder and manifest: with them the site can roll back to it.
    fn collect_garbage(&self) {
        let Some(t) = self.target.as_ref().filter(|t| t.staged) else {
            return;
        };
        let keep: HashSet<Hash> = unique_chunks(&t.manifest.files).into_keys().collect();
        let store = self.store.clone();
        let staging = self.config.state.join("staging");
        let releases = self.config.state.join("releases");
        let current = t.manifest.release_name();
        let installed = self.installed_name();
        let keep_dir = move |name: Option<&str>| {
            name.is_some_and(|n| n == current || installed.as_deref() == Some(n))
        };
        tokio::task::spawn_blocking(move || {
            match store.retain(&keep) {
                Ok((0, _)) => {}
                Ok((chunks, bytes)) => {
                    info!(chunks, bytes, "removed chunks no staged release needs")
                }
                Err(e) => warn!(error = %e, "cannot clean the chunk store"),
            }
            if let Ok(entries) = std::fs::read_dir(&releases) {
                for entry in entries.flatten() {
                    if !keep_dir(entry.file_name().to_str()) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            let Ok(entries) = std::fs::read_dir(&staging) else {
                return;
            };
            for entry in entries.flatten() {
                if !keep_dir(entry.file_name().to_str()) {
                    let path = entry.path();
                    match std::fs::remove_dir_all(&path) {
                        Ok(()) => info!(dir = %path.display(), "removed an older staged release"),
                        Err(e) => {
                            warn!(dir = %path.display(), error = %e, "cannot remove an older staged release")
                        }
                    }
                }
            }
        });
    }

    /// The site's fetcher as this node sees it: among live nodes with an
    /// origin, the lowest PeerId. A node heard only through others (not
    /// connected to this one yet, as happens while mDNS is still finding the
    /// site) counts as much as a peer: two nodes that have not met must not
    /// both download. A peer this node banned for bad chunks does not
    /// count: a fetcher that serves garbage would otherwise stall the site.
    fn fetcher(&self) -> Option<PeerId> {
        let ms = |at: &Instant| at.elapsed().as_millis() as u64;
        let by_site = self.suspected_by_site();
        let suspect = |peer: &PeerId, hb: &Heartbeat| {
            hb.origin_failing
                || by_site.contains(peer)
                || self
                    .suspects
                    .get(peer)
                    .is_some_and(|at| at.elapsed() < FAILING_FOR)
        };
        let peers = self.peers.iter().filter_map(|(peer, info)| {
            let (at, hb) = info.heartbeat.as_ref()?;
            Some(Candidate {
                id: *peer,
                has_origin: hb.has_origin,
                silent_ms: ms(at),
                failing: suspect(peer, hb),
            })
        });
        let heard = self.heard.iter().map(|(author, h)| Candidate {
            id: *author,
            has_origin: h.has_origin,
            silent_ms: ms(&h.at),
            failing: suspect(author, &h.heartbeat),
        });
        let now = self.now_ms();
        let banned = |peer: &PeerId| {
            self.target
                .as_ref()
                .is_some_and(|t| t.transfer.is_banned(peer, now))
        };
        let me = Candidate {
            id: self.local,
            has_origin: self.config.origin.is_some(),
            silent_ms: 0,
            failing: self.origin_failing() || by_site.contains(&self.local),
        };
        self.election()
            .choose(std::iter::once(me).chain(peers.chain(heard).filter(|c| !banned(&c.id))))
    }

    /// How far the site's clock is from this node's, in ms: the median of
    /// the skews measured to the live nodes it hears (and 0 for itself; the
    /// mean of the middle two for an even count). A node whose clock is off
    /// sees the others agree against it, so freshness is judged by the
    /// site's time, not by one machine's wrong clock.
    fn site_offset_ms(&self) -> i64 {
        let mut skews: Vec<i64> = self
            .heard
            .iter()
            .filter(|(author, h)| **author != self.local && h.at.elapsed() < PEER_SILENT)
            .filter_map(|(_, h)| h.skew_ms)
            .chain([0])
            .collect();
        skews.sort_unstable();
        let n = skews.len();
        if n % 2 == 1 {
            skews[n / 2]
        } else {
            (skews[n / 2 - 1] + skews[n / 2]) / 2
        }
    }

    /// Nodes that live nodes of the site say they saw make no progress as
    /// the fetcher.
    fn suspected_by_site(&self) -> HashSet<PeerId> {
        self.heard
            .values()
            .filter(|h| h.at.elapsed() < PEER_SILENT)
            .flat_map(|h| h.heartbeat.suspects.iter())
            .filter_map(|id| id.parse().ok())
            .collect()
    }

    /// Whether this node's origin failed in the last [`FAILING_FOR`] (an
    /// error, or a download that received nothing for twice the stall
    /// timeout): it then gives the fetcher role to the next node.
    fn origin_failing(&self) -> bool {
        self.origin_error.is_some()
            && self
                .origin_failed_at
                .is_some_and(|at| at.elapsed() < FAILING_FOR)
    }

    /// Watches the fetcher this node would follow: while the site lacks
    /// chunks only the origin has, a fetcher whose byte count from the
    /// origin does not grow for four stall timeouts (its route to the
    /// origin is down, it froze, or it lies about its role) is suspected
    /// for [`FAILING_FOR`], and the next node takes over. Heartbeats alone
    /// do not keep the role.
    fn watch_fetcher(&mut self) {
        let own = self
            .origin_received
            .load(std::sync::atomic::Ordering::Relaxed);
        if own != self.progress_seen.0 {
            self.progress_seen = (own, Instant::now());
        }
        // This node's own download that receives nothing (its route to the
        // origin is gone) is an origin failure like any other: it stops,
        // backs off, and says so, so the role moves on and stays moved.
        let quiet = self.progress_seen.1.elapsed();
        if self.plan.running() == Some(Job::Download) && quiet >= self.config.origin_stall * 2 {
            self.stop_origin();
            self.plan.failed(self.now_ms(), random());
            self.origin_failed(
                "the download from the origin makes no progress",
                format!("no byte from the origin for {} s", quiet.as_secs()),
            );
        }
        let choice = self.fetcher();
        if self.choice.as_ref().map(|(p, _)| *p) != choice {
            self.choice = choice.map(|p| (p, Instant::now()));
        }
        let (Some((fetcher, since)), Some(t)) = (self.choice, &self.target) else {
            return;
        };
        if fetcher == self.local || t.transfer.is_done() {
            return;
        }
        let now = self.now_ms();
        if t.transfer.unavailable(now).is_empty() {
            return;
        }
        let Some(heard) = self.heard.get(&fetcher) else {
            return;
        };
        let patience = self.config.origin_stall * 4;
        let quiet = [heard.progress_at, t.adopted_at, since]
            .iter()
            .map(Instant::elapsed)
            .min()
            .unwrap_or_default();
        if quiet >= patience {
            warn!(peer = %fetcher, quiet_s = quiet.as_secs(), "the site's fetcher takes nothing from the origin while the site lacks chunks; the next node takes over");
            self.suspects.insert(fetcher, Instant::now());
        }
    }

    fn is_fetcher(&self) -> bool {
        self.fetcher() == Some(self.local)
    }

    fn installed_name(&self) -> Option<String> {
        self.installed.as_ref().map(Manifest::release_name)
    }

    fn own_heartbeat(&self) -> Heartbeat {
        let t = self.target.as_ref();
        let installed = self.installed_name();
        let last = self.last_apply.as_ref();
        let target_failed = t.is_some_and(|t| {
            last.is_some_and(|o| {
                o.ending == Ending::RolledBack && o.version == t.manifest.release_name()
            })
        });
        Heartbeat {
            has_origin: self.config.origin.is_some(),
            state: match t {
                _ if self.applying.is_some() => "applying",
                Some(t) if installed.as_ref() == Some(&t.manifest.release_name()) => "installed",
                Some(_) if target_failed => "rolled-back",
                None if installed.is_some() => "installed",
                None => "idle",
                Some(t) if t.staged => "staged",
                Some(t) if t.staging => "staging",
                Some(_) => "fetching",
            }
            .into(),
            installed_version: installed,
            apply: match &self.applying {
                Some(_) => Some("applying".into()),
                None => last.map(|o| {
                    match o.ending {
                        Ending::Committed => "committed",
                        Ending::RolledBack => "rolled-back",
                        Ending::Failed => "failed",
                    }
                    .to_owned()
                }),
            },
            apply_step: self.applying.as_ref().map(|(_, step)| step.clone()),
            // A release that did not install (rolled back, or refused
            // before anything changed) halts a rollout of it.
            failed_version: last
                .filter(|o| o.ending != Ending::Committed)
                .map(|o| o.version.clone()),
            boot_ms: self.boot_ms,
            seq: self.heartbeats_sent,
            command_id: self.rollout.as_ref().map(Rollout::newest_id),
            last_error: self
                .disk_error
                .as_ref()
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
                    let retry = self.plan.retry_in_ms(self.now_ms()).unwrap_or(0) / 1000;
                    self.origin_error
                        .as_ref()
                        .map(|e| format!("origin: {e} (next try in {retry} s)"))
                })
                .or_else(|| {
                    last.filter(|o| o.ending != Ending::Committed)
                        .and_then(|o| o.reason.as_ref())
                        .map(|r| format!("{}: {r}", last.map_or("", |o| o.version.as_str())))
                }),
            release: t.map(|t| t.manifest.release_name()),
            staged_version: t.filter(|t| t.staged).map(|t| t.manifest.release_name()),
            bytes_have: t.map_or(0, |t| t.bytes_total - t.transfer.missing_bytes()),
            bytes_total: t.map_or(0, |t| t.bytes_total),
            origin_bytes: self.origin_bytes,
            origin_received: self
                .origin_received
                .load(std::sync::atomic::Ordering::Relaxed),
            acting_fetcher: self.was_fetcher,
            origin_failing: self.origin_failing(),
            clock_ms: now_unix_ms(),
            refused: self.refused_command.clone(),
            suspects: self
                .suspects
                .iter()
                .filter(|(_, at)| at.elapsed() < FAILING_FOR)
                .map(|(peer, _)| peer.to_string())
                .collect(),
        }
    }

    /// Answers the CLI: one line, or for an apply a line per step.
    fn control(&mut self, request: ControlRequest, reply: mpsc::Sender<serde_json::Value>) {
        if let ControlRequest::Rollout { signed } = request {
            let answer = match self.on_cli_command(signed.clone()) {
                Ok(()) => {
                    let net = self.net.clone();
                    let topic = self.rollout_topic.clone();
                    if let Ok(data) = serde_json::to_vec(&signed) {
                        tokio::spawn(async move {
                            let _ = net.publish(&topic, data).await;
                        });
                    }
                    serde_json::json!({ "accepted": true, "rollout": self.rollout_json() })
                }
                Err(reason) => serde_json::json!({ "error": format!("refused: {reason}") }),
            };
            let _ = reply.try_send(answer);
            return;
        }
        if let ControlRequest::Apply { version } = request {
            if let Err(e) = self.start_apply(&version, Some(reply.clone())) {
                let _ = reply.try_send(serde_json::json!({ "error": format!("{e:#}") }));
            }
            return;
        }
        let answer = self.answer(request);
        let _ = reply.try_send(answer);
    }

    fn answer(&mut self, request: ControlRequest) -> serde_json::Value {
        let row = |peer: &PeerId, hb: Option<&Heartbeat>, last_seen_ms: Option<u64>| {
            serde_json::json!({
                "peer_id": peer.to_string(),
                "installed_version": hb.and_then(|h| h.installed_version.clone()),
                "apply": hb.and_then(|h| h.apply.clone()),
                "apply_step": hb.and_then(|h| h.apply_step.clone()),
                "last_error": hb.and_then(|h| h.last_error.clone()),
                "failed_version": hb.and_then(|h| h.failed_version.clone()),
                "state": hb.map_or("unknown", |h| h.state.as_str()),
                "release": hb.and_then(|h| h.release.clone()),
                "staged_version": hb.and_then(|h| h.staged_version.clone()),
                "bytes_have": hb.map_or(0, |h| h.bytes_have),
                "bytes_total": hb.map_or(0, |h| h.bytes_total),
                "origin_bytes": hb.map_or(0, |h| h.origin_bytes),
                "last_seen_ms": last_seen_ms,
                "fetcher": false,
            })
        };
        match request {
            ControlRequest::Status => {
                let own = self.own_heartbeat();
                let mut mine = row(&self.local, Some(&own), Some(0));
                let fetcher = self.fetcher();
                // This node says it is the fetcher only once it has heard
                // the site (settled), as it acts.
                mine["fetcher"] =
                    serde_json::json!(fetcher == Some(self.local) && self.was_fetcher);
                mine["self"] = serde_json::json!(true);
                let mut nodes = vec![mine];
                for (peer, info) in &self.peers {
                    let (hb, seen) = match &info.heartbeat {
                        Some((at, hb)) => (Some(hb), Some(at.elapsed().as_millis() as u64)),
                        None => (None, None),
                    };
                    let mut r = row(peer, hb, seen);
                    r["fetcher"] = serde_json::json!(fetcher == Some(*peer));
                    nodes.push(r);
                }
                for (author, heard) in self.heard_only() {
                    let seen = heard.at.elapsed().as_millis() as u64;
                    let mut r = row(author, Some(&heard.heartbeat), Some(seen));
                    r["fetcher"] = serde_json::json!(fetcher == Some(*author));
                    r["via_gossip"] = serde_json::json!(true);
                    nodes.push(r);
                }
                for row in &mut nodes {
                    let peer = row["peer_id"]
                        .as_str()
                        .and_then(|p| p.parse::<PeerId>().ok());
                    let skew = match peer {
                        Some(p) if p == self.local => Some(0),
                        Some(p) => self.heard.get(&p).and_then(|h| h.skew_ms),
                        None => None,
                    };
                    row["clock_skew_ms"] = serde_json::json!(skew);
                }
                serde_json::json!({
                    "site": self.config.site,
                    "nodes": nodes,
                    "rollout": self.rollout_json(),
                    "site_clock_offset_ms": self.site_offset_ms(),
                })
            }
            ControlRequest::Peers => serde_json::json!({
                "peers": self.peers.keys().map(ToString::to_string).collect::<Vec<_>>()
            }),
            ControlRequest::Check => {
                let fetcher = self.is_fetcher();
                let polling = fetcher && !self.origin_busy();
                if polling {
                    // An admin asking is a retry now, backoff or not.
                    self.plan.poll_now(self.now_ms());
                    self.origin_step();
                }
                serde_json::json!({ "fetcher": fetcher, "polling": polling })
            }
            ControlRequest::Apply { .. } | ControlRequest::Rollout { .. } => {
                serde_json::json!({ "error": "not here" })
            }
        }
    }

    fn audit_entry(&self, entry: Entry) {
        if self.audit.send(entry).is_err() {
            warn!("the audit log's writer has stopped; an entry was not recorded");
        }
    }
}

/// Starts the thread that appends audit entries; it ends when the node's
/// sender is dropped.
fn audit_writer(
    audit: Audit,
) -> Result<(std::sync::mpsc::Sender<Entry>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel::<Entry>();
    let writer = std::thread::Builder::new()
        .name("lanup-audit".into())
        .spawn(move || {
            for entry in rx {
                if let Err(e) = audit.append(&entry) {
                    warn!(error = %format!("{e:#}"), "cannot write the audit log");
                }
            }
        })
        .context("cannot start the audit log's writer")?;
    Ok((tx, writer))
}

impl Node {
    fn refuse_command(&mut self, from: &str, command: Option<&SignedCommand>, reason: &str) {
        let parsed = command.and_then(|c| serde_json::from_str::<Command>(&c.command).ok());
        // A command peers keep offering is refused once: one WARN and one
        // audit line per command and reason every ten minutes, however
        // often it comes.
        let key = (parsed.as_ref().map(|c| c.id.clone()), reason.to_owned());
        if self
            .refusals
            .get(&key)
            .is_some_and(|at| at.elapsed() < REFUSAL_QUIET)
        {
            return;
        }
        self.refusals.insert(key, Instant::now());
        warn!(source = from, reason, "refused rollout command");
        self.audit_entry(Entry {
            event: "refused".into(),
            key: command.map(|c| c.key.clone()),
            from: Some(from.to_owned()),
            reason: Some(reason.to_owned()),
            ..command_fields(parsed.as_ref())
        });
    }

    /// Checks a rollout command (signature, trusted admin key, this site,
    /// freshness, never seen), records the verdict, and follows it. One a
    /// peer offered for catch-up may be older ([`CATCH_UP_MAX_AGE_MS`]).
    fn on_command(
        &mut self,
        from: &str,
        signed: SignedCommand,
        catch_up: bool,
    ) -> Result<(), String> {
        // One freshness rule for every path, by the site's clock.
        let offset = self.site_offset_ms();
        let site_now = now_unix_ms().saturating_add_signed(offset);
        let started = self.boot_ms.saturating_add_signed(offset);
        let (trusted, site) = (&self.config.trust_admin, &self.config.site);
        let checked = self
            .guard
            .check_arrival(&signed, trusted, site, site_now, started);
        let command = match checked {
            Ok(c) => c,
            Err(refusal) => {
                let mut reason = refusal.to_string();
                if offset.unsigned_abs() > 60_000 {
                    reason.push_str(&format!(
                        " (by the site's clock; this node's own clock is {} s {} it)",
                        offset.unsigned_abs() / 1000,
                        if offset < 0 { "ahead of" } else { "behind" }
                    ));
                }
                self.refuse_command(from, Some(&signed), &reason);
                // A genuine command (a trusted key signed it) refused for its
                // time: the rollout it starts cannot finish here, and the
                // site is told why. Not for forgeries or replays.
                let timing = matches!(
                    refusal,
                    lanup_protocol::rollout::Refusal::Stale(..)
                        | lanup_protocol::rollout::Refusal::Future(..)
                );
                let parsed = serde_json::from_str::<Command>(&signed.command).ok();
                if let Some(c) = parsed.filter(|c| timing && c.action != Action::Abort) {
                    self.refused_command = Some((c.id, reason.clone()));
                }
                return Err(reason);
            }
        };
        let catch_up = catch_up && command.issued_at_ms < started;
        info!(source = from, key = %signed.key, action = ?command.action, catch_up, "accepted rollout command");
        self.audit_entry(Entry {
            event: "accepted".into(),
            key: Some(signed.key.clone()),
            from: Some(from.to_owned()),
            reason: catch_up.then(|| "caught up: issued while this node was away".to_owned()),
            ..command_fields(Some(&command))
        });
        match &command.action {
            Action::Abort => {
                let issued = command.issued_at_ms;
                if let Some(r) = self
                    .rollout
                    .as_mut()
                    .filter(|r| r.command.issued_at_ms <= issued && r.abort.is_none())
                {
                    r.abort = Some(signed.clone());
                    if r.halted.is_none() && !r.done {
                        r.halted = Some((format!("admin {}", signed.key), "aborted".into()));
                    }
                }
            }
            Action::Rollout { version } => {
                // An admin asking again is a retry: a release that rolled
                // back here may be tried once more.
                self.failed_releases.remove(version);
                self.rollout = Rollout::new(command.clone(), signed);
            }
            Action::Rollback { .. } => self.rollout = Rollout::new(command.clone(), signed),
        }
        self.save_rollout();
        self.rollout_duties();
        Ok(())
    }

    /// A command given on this node's CLI. A rollback is refused here,
    /// before it reaches the site, when this node no longer holds the
    /// release.
    fn on_cli_command(&mut self, signed: SignedCommand) -> Result<(), String> {
        let parsed = serde_json::from_str::<Command>(&signed.command);
        if let Ok(Command {
            action: Action::Rollback { version },
            ..
        }) = &parsed
        {
            if let Err(e) = self.stored_release(version) {
                return Err(format!("{e:#}"));
            }
        }
        self.on_command("this node's CLI", signed, false)
    }

    /// Writes `STATE/rollout.json`.
    fn save_rollout(&self) {
        let Some(r) = &self.rollout else { return };
        let saved = SavedRollout {
            commands: r.commands(),
            halted: r.halted.clone(),
            done: r.done,
        };
        let path = self.config.state.join(ROLLOUT_FILE);
        let written = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::apply::write_synced(&path, &bytes));
        if let Err(e) = written {
            warn!(file = %path.display(), error = %e, "cannot save the rollout this node follows");
        }
    }

    /// Asks `peer` for the command its heartbeat names, unless this node
    /// follows it (or a newer one) or asked lately.
    fn maybe_catch_up(&mut self, peer: PeerId, id: &str) {
        let known = self.guard.seen(id)
            || self.rollout.as_ref().is_some_and(|r| r.newest_id() == id)
            || self
                .refused_command
                .as_ref()
                .is_some_and(|(refused, _)| refused == id);
        let lately = self
            .asked
            .get(id)
            .is_some_and(|at| at.elapsed() < CATCH_UP_RETRY);
        if known || lately {
            return;
        }
        self.asked.insert(id.to_owned(), Instant::now());
        let net = self.net.clone();
        let tx = self.done_tx.clone();
        let request = Request::Commands { id: id.to_owned() };
        tokio::spawn(async move {
            if let Ok(Response::Commands { commands }) = net.request(peer, request).await {
                let _ = tx.send(Done::Commands(peer, commands)).await;
            }
        });
    }

    /// Takes up the commands a peer follows: a rollout issued while this
    /// node was away (or before it joined), and its abort.
    fn catch_up(&mut self, peer: PeerId, commands: Vec<SignedCommand>) {
        for signed in commands {
            let parsed = serde_json::from_str::<Command>(&signed.command).ok();
            let Some(command) = parsed else {
                self.refuse_command(&format!("peer {peer}"), Some(&signed), "malformed");
                continue;
            };
            // Already followed, or older than what this node follows.
            let older = self.rollout.as_ref().is_some_and(|r| {
                command.action != Action::Abort && r.command.issued_at_ms >= command.issued_at_ms
            });
            if self.guard.seen(&command.id) || older {
                continue;
            }
            let _ = self.on_command(&format!("peer {peer}"), signed, true);
        }
    }

    /// What every node of the site reports about `version`.
    fn reports(&self, version: &str, id: &str) -> BTreeMap<String, NodeReport> {
        let report = |hb: &Heartbeat| NodeReport {
            installed: hb.installed_version.clone(),
            failed: (hb.failed_version.as_deref() == Some(version))
                .then(|| {
                    hb.last_error
                        .clone()
                        .unwrap_or_else(|| "rolled back".into())
                })
                .or_else(|| {
                    hb.refused
                        .as_ref()
                        .filter(|(refused, _)| refused == id)
                        .map(|(_, why)| format!("refused the command: {why}"))
                }),
        };
        let mut reports = BTreeMap::new();
        reports.insert(self.local.to_string(), report(&self.own_heartbeat()));
        for (peer, info) in &self.peers {
            if let Some((_, hb)) = &info.heartbeat {
                reports.insert(peer.to_string(), report(hb));
            }
        }
        for (author, heard) in self.heard_only() {
            reports.insert(author.to_string(), report(&heard.heartbeat));
        }
        reports
    }

    /// Nodes heard lately only through others: not connected to this one.
    fn heard_only(&self) -> impl Iterator<Item = (&PeerId, &Heard)> {
        self.heard.iter().filter(|(author, h)| {
            **author != self.local
                && !self.peers.contains_key(author)
                && h.at.elapsed() < PEER_SILENT
        })
    }

    /// Follows the rollout: halts it when a node failed, and installs its
    /// release here when this node's wave has come. A node the command does
    /// not name (it joined later) is in the last wave.
    fn rollout_duties(&mut self) {
        let Some(r) = &self.rollout else { return };
        if r.halted.is_some() {
            return;
        }
        let version = r.version.clone();
        let stage = evaluate(&r.waves, &version, &self.reports(&version, &r.command.id));
        let me = self.local.to_string();
        let my_wave = r
            .waves
            .iter()
            .position(|w| w.contains(&me))
            .unwrap_or(r.waves.len().saturating_sub(1));
        let (id, back, waves_len, was_done) = (r.command.id.clone(), r.back, r.waves.len(), r.done);
        let action = if back { "rollback" } else { "rollout" };
        let due = match stage {
            Stage::Halted { node, reason } => {
                warn!(release = %version, %node, reason, "{action} halted: a node failed; no further wave applies");
                self.audit_entry(Entry {
                    event: "halted".into(),
                    action: Some(action.into()),
                    version: Some(version.clone()),
                    id: Some(id),
                    from: Some(node.clone()),
                    reason: Some(reason.clone()),
                    ..Entry::default_at(now_unix_ms())
                });
                if let Some(r) = &mut self.rollout {
                    r.halted = Some((node, reason));
                }
                self.save_rollout();
                return;
            }
            Stage::Done => {
                if !was_done {
                    info!(release = %version, "{action} done: every node runs it");
                    if let Some(r) = &mut self.rollout {
                        r.done = true;
                    }
                    self.save_rollout();
                }
                true
            }
            Stage::Wave(wave) => wave >= my_wave,
        };
        let installed = self.installed_name().as_deref() == Some(version.as_str());
        if !due || installed || self.applying.is_some() || self.failed_releases.contains(&version) {
            return;
        }
        let release = if back {
            self.stored_release(&version)
        } else {
            match self.staged_release(&version) {
                Ok(r) => Ok(r),
                // Still fetching: the wave waits for it.
                Err(_) => return,
            }
        };
        info!(release = %version, wave = my_wave + 1, "this node's {action} wave has come");
        let started = release.and_then(|release| self.start_apply_release(release, None));
        match started {
            Ok(()) => self.audit_entry(Entry {
                event: "applying".into(),
                action: Some(action.into()),
                version: Some(version.clone()),
                id: Some(id),
                reason: Some(format!("wave {} of {}", my_wave + 1, waves_len)),
                ..Entry::default_at(now_unix_ms())
            }),
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(error = %reason, "cannot install the {action}'s release");
                // Reported as an apply that failed before changing
                // anything, so the rollout halts and says why.
                self.failed_releases.insert(version.clone());
                self.last_apply = Some(Outcome {
                    version: version.clone(),
                    from: self.installed_name(),
                    ending: Ending::Failed,
                    reason: Some(reason.clone()),
                    downtime_ms: None,
                    finished_at: now_unix_ms() / 1000,
                });
                self.audit_entry(Entry {
                    event: "apply-failed".into(),
                    action: Some(action.into()),
                    version: Some(version),
                    id: Some(id),
                    reason: Some(reason),
                    ..Entry::default_at(now_unix_ms())
                });
            }
        }
    }

    fn rollout_json(&self) -> serde_json::Value {
        let Some(r) = &self.rollout else {
            return serde_json::Value::Null;
        };
        let mut halted = r.halted.clone();
        let stage = match (&halted, r.done) {
            (Some(_), _) => "halted".to_owned(),
            (None, true) => "done".to_owned(),
            (None, false) => match evaluate(
                &r.waves,
                &r.version,
                &self.reports(&r.version, &r.command.id),
            ) {
                Stage::Wave(w) => format!("wave {} of {}", w + 1, r.waves.len()),
                Stage::Halted { node, reason } => {
                    halted = Some((node, reason));
                    "halted".to_owned()
                }
                Stage::Done => "done".to_owned(),
            },
        };
        serde_json::json!({
            "id": r.command.id,
            "action": if r.back { "rollback" } else { "rollout" },
            "version": r.version,
            "key": r.signed.key,
            "issued_at_ms": r.command.issued_at_ms,
            "waves": r.waves,
            "stage": stage,
            "halted_by": halted.as_ref().map(|(n, _)| n.clone()),
            "reason": halted.as_ref().map(|(_, why)| why.clone()),
        })
    }

    /// The staged release `version`, ready to install.
    fn staged_release(&self, version: &str) -> Result<Release> {
        let t = self
            .target
            .as_ref()
            .filter(|t| t.manifest.release_name() == version);
        match t {
            Some(t) if t.staged => Ok(Release {
                manifest: t.manifest.clone(),
                xml: t.xml.clone(),
                signature: t.signature.clone(),
                staged: self.config.state.join("staging").join(version),
                rollback: false,
            }),
            Some(_) => anyhow::bail!("{version} is not staged yet (it is still being fetched)"),
            None => anyhow::bail!(
                "{version} is not staged on this node ({})",
                match &self.target {
                    Some(t) if t.staged => format!("staged: {}", t.manifest.release_name()),
                    Some(t) => format!("fetching: {}", t.manifest.release_name()),
                    None => "nothing staged".into(),
                }
            ),
        }
    }

    /// The manifest kept in `dir` (under `STATE/releases/`), checked again
    /// as a node checks any: its bytes and signature text with it.
    fn stored_manifest(&self, dir: &std::path::Path) -> Result<(Manifest, Vec<u8>, String)> {
        let source = ManifestSource::read_local(dir)?;
        let manifest =
            source.authenticate(&self.config.trust_publisher, OffsetDateTime::now_utc())?;
        let signature = String::from_utf8(source.signature.unwrap_or_default())
            .with_context(|| format!("{}: signature is not text", source.signature_location))?;
        Ok((manifest, source.bytes, signature))
    }

    /// A release this node still holds (`STATE/releases/` and
    /// `STATE/staging/`), older than the installed one, to roll back to. Its
    /// manifest is checked again; its files are checked as they are copied.
    fn stored_release(&self, version: &str) -> Result<Release> {
        let dir = self.config.state.join("releases").join(version);
        let staged = self.config.state.join("staging").join(version);
        let held = || {
            let mut names: Vec<String> = std::fs::read_dir(self.config.state.join("releases"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect();
            names.sort();
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        if !dir.is_dir() || !staged.is_dir() {
            anyhow::bail!(
                "{version} is no longer in this node's store (it holds: {})",
                held()
            );
        }
        let (manifest, xml, signature) = self
            .stored_manifest(&dir)
            .with_context(|| format!("cannot roll back to {version}"))?;
        if let Some(installed) = &self.installed {
            if manifest.compare_release(installed) != std::cmp::Ordering::Less {
                anyhow::bail!(
                    "{version} is not older than the installed {}: a rollback returns to an older release",
                    installed.release_name()
                );
            }
        }
        Ok(Release {
            manifest,
            xml,
            signature,
            staged,
            rollback: true,
        })
    }

    /// Starts installing the staged release `version` in the background;
    /// each step goes to the log, the status, and `reply` when a CLI asked.
    fn start_apply(
        &mut self,
        version: &str,
        reply: Option<mpsc::Sender<serde_json::Value>>,
    ) -> Result<()> {
        let release = self.staged_release(version)?;
        self.start_apply_release(release, reply)
    }

    /// Starts installing `release` (see [`Node::start_apply`]).
    fn start_apply_release(
        &mut self,
        release: Release,
        reply: Option<mpsc::Sender<serde_json::Value>>,
    ) -> Result<()> {
        let Some(applier) = self.applier.clone() else {
            anyhow::bail!(
                "this node has no [app] in its configuration, so it stages releases but does not install them"
            );
        };
        if let Some((running, _)) = &self.applying {
            anyhow::bail!("an apply of {running} is under way");
        }
        let version = release.manifest.release_name();
        info!(release = %version, rollback = release.rollback, "installing the release");
        self.applying = Some((version, "verify".into()));
        let tx = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = applier.apply(&release, &mut |event| {
                if let Some(reply) = &reply {
                    let _ = reply.blocking_send(serde_json::json!({ "event": event }));
                }
                let _ = tx.blocking_send(Done::ApplyStep(event));
            });
            if let Some(reply) = &reply {
                let _ = reply.blocking_send(serde_json::json!({ "outcome": outcome }));
            }
            let _ = tx.blocking_send(Done::Applied(outcome));
        });
        Ok(())
    }

    /// With `apply = "auto"`, a staged release newer than the installed
    /// one is installed at once, when its RestartApp allows, unless it
    /// already rolled back here.
    fn maybe_auto_apply(&mut self) {
        let auto = self
            .config
            .app
            .as_ref()
            .is_some_and(|a| a.apply == crate::config::ApplyPolicy::Auto);
        let Some(t) = self.target.as_ref().filter(|t| t.staged) else {
            return;
        };
        let version = t.manifest.release_name();
        let newer = self
            .installed
            .as_ref()
            .is_none_or(|i| t.manifest.compare_release(i) == std::cmp::Ordering::Greater);
        // After a rollback the site stays on the older release until an
        // admin rolls a release out again.
        let held = self.rollout.as_ref().is_some_and(|r| r.back);
        if !auto
            || !newer
            || held
            || self.applying.is_some()
            || self.failed_releases.contains(&version)
        {
            return;
        }
        if !t.manifest.restart.allow {
            info!(release = %version, "staged; not installed automatically because its RestartApp says no (use lanup apply)");
            self.failed_releases.insert(version);
            return;
        }
        if let Err(e) = self.start_apply(&version, None) {
            warn!(error = %format!("{e:#}"), "cannot install the staged release");
        }
    }

    /// Checks every chunk of the release this node holds against its hash,
    /// in the background (one core reading and hashing at disk speed: about
    /// 8 s for 10 GiB here), so that chunks that rotted while the node was
    /// down are neither offered to peers nor used. Damaged ones go to
    /// `damaged`, as chunks found damaged while serving do.
    fn check_store(&self, damaged: mpsc::Sender<Hash>) {
        let Some(t) = &self.target else { return };
        let hashes: Vec<Hash> = t.held.iter().copied().collect();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut bad = 0;
            for hash in &hashes {
                if store.get_verified(hash).is_err() {
                    bad += 1;
                    let _ = damaged.blocking_send(*hash);
                }
            }
            info!(
                chunks = hashes.len(),
                damaged = bad,
                took_ms = started.elapsed().as_millis() as u64,
                "checked the chunk store"
            );
        });
    }

    /// Takes up the release staged before the node last stopped, so it can
    /// be served and installed without fetching it again.
    fn load_staged(&mut self) {
        let releases = self.config.state.join("releases");
        let Ok(entries) = std::fs::read_dir(&releases) else {
            return;
        };
        let mut found: Vec<(Manifest, Vec<u8>, String)> = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            match self.stored_manifest(&dir) {
                Ok(found_here) => found.push(found_here),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %format!("{e:#}"), "not taking up a stored release")
                }
            }
        }
        found.sort_by(|a, b| a.0.compare_release(&b.0));
        let Some((manifest, xml, sig)) = found.pop() else {
            return;
        };
        let location = releases.join(manifest.release_name());
        if self.adopt(&location.display().to_string(), xml, sig) != MessageAcceptance::Accept {
            return;
        }
        let staging = self
            .config
            .state
            .join("staging")
            .join(manifest.release_name());
        let complete = manifest.files.iter().all(|f| {
            std::fs::metadata(staging.join(&f.name)).is_ok_and(|m| Some(m.len()) == f.size)
        });
        if let Some(t) = self
            .target
            .as_mut()
            .filter(|t| complete && t.transfer.is_done())
        {
            t.staged = true;
            info!(release = %manifest.release_name(), "release staged before the node stopped; taken up again");
            self.maybe_auto_apply();
        }
    }

    async fn heartbeat(&mut self) {
        self.heartbeats_sent += 1;
        let hb = self.own_heartbeat();
        if let Ok(data) = serde_json::to_vec(&hb) {
            let _ = self.net.publish(&self.status_topic, data).await;
        }
        if let Some(t) = &self.target {
            let announce = Announce {
                release: t.manifest.release_name(),
                manifest_hash: t.hash,
                signature: t.signature.clone(),
            };
            if let Ok(data) = serde_json::to_vec(&announce) {
                let _ = self.net.publish(&self.announce_topic, data).await;
            }
        }
    }

    /// Asks every peer which chunks it gained since last time: that is how
    /// chunks fetched from the origin or from others become visible here,
    /// a fraction of a second after they arrive (cut-through).
    fn ask_have(&mut self) {
        let Some(t) = &self.target else { return };
        if t.transfer.is_done() {
            return;
        }
        // One question per peer at a time: a slow peer is not asked again
        // before it answered.
        let pending = &self.have_pending;
        let speaking: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(peer, p)| !p.silent && !pending.contains(*peer))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in speaking {
            self.have_pending.insert(peer);
            let net = self.net.clone();
            let tx = self.done_tx.clone();
            let hash = t.hash;
            let since = t.peer_since.get(&peer).copied().unwrap_or(0);
            tokio::spawn(async move {
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

    async fn on_network(&mut self, event: NetworkEvent) {
        match event {
            NetworkEvent::PeerConnected(peer) => {
                self.peers.insert(
                    peer,
                    PeerInfo {
                        connected_at: Instant::now(),
                        heartbeat: None,
                        silent: false,
                    },
                );
                if let Some(t) = &mut self.target {
                    t.transfer.peer_connected(peer);
                }
            }
            NetworkEvent::PeerDisconnected(peer) => {
                self.peers.remove(&peer);
                self.stalls.remove(&peer);
                self.have_pending.remove(&peer);
                if let Some(t) = &mut self.target {
                    t.transfer.peer_disconnected(&peer);
                }
            }
            NetworkEvent::Gossip {
                topic,
                from,
                author,
                id,
                data,
            } => {
                let verdict = if topic == self.status_topic {
                    match serde_json::from_slice::<Heartbeat>(&data) {
                        Ok(hb) => {
                            // Gossip can bring an author's old heartbeat after
                            // a newer one; only the newest counts.
                            let author = author.unwrap_or(from);
                            let fresh = self
                                .heard
                                .get(&author)
                                .is_none_or(|old| (hb.boot_ms, hb.seq) > old.boot_seq);
                            if fresh {
                                let progress_at = match self.heard.get(&author) {
                                    Some(old)
                                        if old.heartbeat.origin_received == hb.origin_received =>
                                    {
                                        old.progress_at
                                    }
                                    _ => Instant::now(),
                                };
                                self.heard.insert(
                                    author,
                                    Heard {
                                        boot_seq: (hb.boot_ms, hb.seq),
                                        at: Instant::now(),
                                        has_origin: hb.has_origin,
                                        progress_at,
                                        skew_ms: (hb.clock_ms > 0)
                                            .then(|| hb.clock_ms as i64 - now_unix_ms() as i64),
                                        heartbeat: hb.clone(),
                                    },
                                );
                            }
                            // A command the author follows is asked of the
                            // peer that passed the heartbeat on (it knows
                            // the command, or will).
                            if let Some(id) = hb.command_id.as_deref().filter(|_| fresh) {
                                self.maybe_catch_up(from, id);
                            }
                            // The author's own record when it is a peer; one
                            // heard only through others is kept in `heard`.
                            let from = author;
                            if let Some(info) = self.peers.get_mut(&from).filter(|_| fresh) {
                                info.heartbeat = Some((Instant::now(), hb));
                                if std::mem::take(&mut info.silent) {
                                    info!(peer = %from, "peer speaks again");
                                    if let Some(t) = &mut self.target {
                                        // Its chunk list is asked afresh.
                                        t.transfer.peer_connected(from);
                                        t.peer_since.remove(&from);
                                    }
                                }
                            }
                            Some(MessageAcceptance::Accept)
                        }
                        Err(_) => Some(MessageAcceptance::Reject),
                    }
                } else if topic == self.announce_topic {
                    self.on_announce(from, id.clone(), &data)
                } else if topic == self.rollout_topic {
                    let verdict = match serde_json::from_slice::<SignedCommand>(&data) {
                        Ok(signed) => self
                            .on_command(&format!("peer {from}"), signed, false)
                            .is_ok(),
                        Err(e) => {
                            self.refuse_command(
                                &format!("peer {from}"),
                                None,
                                &format!("malformed: {e}"),
                            );
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
                };
                if let Some(verdict) = verdict {
                    let _ = self.net.validate(id, from, verdict).await;
                }
            }
            NetworkEvent::Request {
                from: _,
                request,
                channel,
            } => {
                let response = match (&request, &self.target) {
                    (Request::Manifest { manifest_hash }, Some(t)) if *manifest_hash == t.hash => {
                        Response::Manifest {
                            xml: t.xml.clone(),
                            signature: t.signature.clone(),
                        }
                    }
                    (
                        Request::Have {
                            manifest_hash,
                            since,
                        },
                        Some(t),
                    ) if *manifest_hash == t.hash => {
                        let from = (*since as usize).min(t.held_order.len());
                        Response::Have {
                            chunks: t.held_order[from..].to_vec(),
                            total: t.held_order.len() as u32,
                        }
                    }
                    (Request::Commands { id }, _) => match &self.rollout {
                        Some(r) if r.command.id == *id || r.newest_id() == *id => {
                            Response::Commands {
                                commands: r.commands(),
                            }
                        }
                        _ => Response::Unknown,
                    },
                    _ => Response::Unknown,
                };
                let _ = self.net.respond(channel, response).await;
            }
        }
    }

    /// Warns once per peer and manifest about a refused announcement.
    fn refuse(&mut self, from: PeerId, hash: Hash, release: &str, reason: &str) {
        if self.refused.insert((from, hash)) {
            warn!(peer = %from, release, reason, "refused announcement");
        }
    }

    /// Checks an announcement before it is forwarded. A new release's
    /// manifest is fetched from the announcer and checked first; the
    /// verdict then comes later (`None` now).
    fn on_announce(
        &mut self,
        from: PeerId,
        id: MessageId,
        data: &[u8],
    ) -> Option<MessageAcceptance> {
        let announce = match serde_json::from_slice::<Announce>(data) {
            Ok(a) => a,
            Err(e) => {
                warn!(peer = %from, error = %e, "refused announcement: not readable");
                return Some(MessageAcceptance::Reject);
            }
        };
        let hash = announce.manifest_hash;
        if self.target.as_ref().is_some_and(|t| t.hash == hash) {
            return Some(MessageAcceptance::Accept);
        }
        let signature = match Signature::from_text(&announce.signature) {
            Ok(s) => s,
            Err(e) => {
                self.refuse(from, hash, &announce.release, &format!("{e:#}"));
                return Some(MessageAcceptance::Reject);
            }
        };
        if !self.config.trust_publisher.contains(&signature.key) {
            let reason = format!(
                "signed by {}, a key this node does not trust",
                signature.key
            );
            self.refuse(from, hash, &announce.release, &reason);
            return Some(MessageAcceptance::Reject);
        }
        if let (Some(t), Ok(announced)) = (&self.target, announce.release.parse::<Version>()) {
            if t.manifest
                .version
                .as_ref()
                .is_some_and(|have| announced <= *have)
            {
                let reason = format!(
                    "not newer than {}, which this node has",
                    t.manifest.release_name()
                );
                self.refuse(from, hash, &announce.release, &reason);
                // An honest peer that lags behind: not forwarded, not held
                // against it.
                return Some(MessageAcceptance::Ignore);
            }
        }
        if let (Some(installed), Ok(announced)) =
            (&self.installed, announce.release.parse::<Version>())
        {
            if installed
                .version
                .as_ref()
                .is_some_and(|have| announced < *have)
            {
                let reason = format!(
                    "older than {}, which is installed here",
                    installed.release_name()
                );
                self.refuse(from, hash, &announce.release, &reason);
                return Some(MessageAcceptance::Ignore);
            }
        }
        if self.refused.contains(&(from, hash)) {
            return Some(MessageAcceptance::Reject);
        }
        if let Some(waiting) = self.validating.get_mut(&hash) {
            waiting.push((id, from));
            return None;
        }
        self.validating.insert(hash, vec![(id, from)]);
        let net = self.net.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let result = match net
                .request(
                    from,
                    Request::Manifest {
                        manifest_hash: hash,
                    },
                )
                .await
            {
                Ok(Response::Manifest { xml, signature }) => Ok((xml, signature)),
                Ok(_) => Err(anyhow::anyhow!("peer does not have the manifest")),
                Err(e) => Err(e),
            };
            let _ = tx.send(Done::Manifest(from, hash, result)).await;
        });
        None
    }

    /// Adopts a manifest after checking it as `lanup inspect --trust` does,
    /// if it is newer than what this node has. Returns whether an
    /// announcement of it may be forwarded.
    fn adopt(&mut self, from: &str, xml: Vec<u8>, signature: String) -> MessageAcceptance {
        let source = ManifestSource {
            location: from.to_owned(),
            bytes: xml,
            signature: Some(signature.clone().into_bytes()),
            signature_location: format!("{from} (signature)"),
        };
        let manifest =
            match source.authenticate(&self.config.trust_publisher, OffsetDateTime::now_utc()) {
                Ok(m) => m,
                Err(e) => {
                    warn!(source = from, error = %format!("{e:#}"), "refused release");
                    return MessageAcceptance::Reject;
                }
            };
        let hash = Hash::of(&source.bytes);
        if let Some(installed) = &self.installed {
            if manifest.compare_release(installed) == std::cmp::Ordering::Less {
                warn!(source = from, release = %manifest.release_name(), installed = %installed.release_name(), "refused release: older than the installed one");
                return MessageAcceptance::Ignore;
            }
        }
        if let Some(t) = &self.target {
            if t.hash == hash {
                return MessageAcceptance::Accept;
            }
            if manifest.compare_release(&t.manifest) != std::cmp::Ordering::Greater {
                warn!(source = from, release = %manifest.release_name(), have = %t.manifest.release_name(), "refused release: not newer than the one this node has");
                return MessageAcceptance::Ignore;
            }
        }
        let chunks = unique_chunks(&manifest.files);
        let bytes_total = chunks.values().sum();
        let held: HashSet<Hash> = chunks
            .keys()
            .filter(|h| self.store.has(h))
            .copied()
            .collect();
        let mut transfer = Transfer::new(
            chunks
                .iter()
                .filter(|(h, _)| !held.contains(*h))
                .map(|(h, s)| (*h, *s)),
            Limits::default(),
        )
        // Equally rare chunks in this node's own order, from its PeerId.
        .with_order(u64::from_le_bytes(
            Hash::of(&self.local.to_bytes()).0[..8]
                .try_into()
                .unwrap_or_default(),
        ));
        for peer in self.peers.keys() {
            transfer.peer_connected(*peer);
        }
        info!(release = %manifest.release_name(), source = from, bytes = bytes_total, "release announced; fetching it");
        self.target = Some(Target {
            manifest,
            xml: source.bytes,
            signature,
            hash,
            transfer,
            held_order: held.iter().copied().collect(),
            held,
            peer_since: BTreeMap::new(),
            bytes_total,
            staged: false,
            staging: false,
            stage_failed: None,
            no_room: None,
            adopted_at: Instant::now(),
        });
        self.check_room();
        self.ask_have();
        MessageAcceptance::Accept
    }

    fn poll_origin(&mut self, epoch: u64) {
        let Some(origin) = self.config.origin.clone() else {
            return;
        };
        let tx = self.done_tx.clone();
        let http = self.http.clone();
        let etag = self.etag.clone();
        let task = tokio::spawn(async move {
            let result = ManifestSource::poll(&http, &origin, etag.as_deref()).await;
            let _ = tx.send(Done::OriginPoll(epoch, result)).await;
        });
        self.origin_task = Some(task.abort_handle());
    }

    /// The fetcher downloads what no peer at the site holds (the rules
    /// decided it is time: job `epoch`).
    fn download(&mut self, epoch: u64) {
        let (Some(origin), Some(t)) = (self.config.origin.clone(), &self.target) else {
            self.plan.finished(epoch, true, self.now_ms(), random());
            return;
        };
        let now = self.now_ms();
        let nobody_has = t.transfer.unavailable(now);
        if self.downloading.is_none_or(|(hash, _)| hash != t.hash) {
            let sizes = unique_chunks(&t.manifest.files);
            let missing: u64 = nobody_has.iter().filter_map(|h| sizes.get(h)).sum();
            info!(release = %t.manifest.release_name(), missing_bytes = missing, held_bytes = t.bytes_total - missing, "downloading release from the origin");
            self.downloading = Some((t.hash, 0));
        }
        self.site_lacks
            .send_replace(std::sync::Arc::new(nobody_has));
        let manifest = t.manifest.clone();
        let store = self.store.clone();
        let source = crate::fetch::Origin {
            client: self.http.clone(),
            base: origin,
            wan: self.wan.clone(),
            stall: self.config.origin_stall,
            received: self.origin_received.clone(),
        };
        self.progress_seen = (
            self.origin_received
                .load(std::sync::atomic::Ordering::Relaxed),
            Instant::now(),
        );
        let tx = self.done_tx.clone();
        self.origin_counted = 0;
        let lacks = self.site_lacks.subscribe();
        let lease = self.origin_lease.clone();
        let started = self.started;
        // Asked before every request and as bytes arrive: a chunk a peer
        // now holds, or a role that lapsed, stops the download of it.
        let wanted = move |h: &Hash| {
            let now = started.elapsed().as_millis() as u64;
            now < lease.load(std::sync::atomic::Ordering::Relaxed) && lacks.borrow().contains(h)
        };
        let task = tokio::spawn(async move {
            let chunk_tx = tx.clone();
            let result = fetch_missing(&source, &manifest, &store, wanted, |c: &Chunk| {
                let _ = chunk_tx.try_send(Done::OriginChunk(c.hash, c.size));
            })
            .await;
            let _ = tx.send(Done::OriginFinished(epoch, result)).await;
        });
        self.origin_task = Some(task.abort_handle());
    }

    /// The disk guard: whether the release being fetched fits on this
    /// node's disks (new chunks and the staged copy under the state
    /// directory, the apply's copy beside the install directory). While it
    /// does not, nothing is fetched; it is looked at again every
    /// [`STAGE_RETRY`].
    fn check_room(&mut self) {
        let Some(t) = self.target.as_mut().filter(|t| !t.staged) else {
            return;
        };
        if t.no_room
            .as_ref()
            .is_some_and(|(_, at)| Instant::now() < *at)
        {
            return;
        }
        let release = t.manifest.release_name();
        let staged_size: u64 = t.manifest.files.iter().filter_map(|f| f.size).sum();
        let mut needs = vec![
            crate::disk::Need {
                path: self.config.state.join("chunks"),
                bytes: t.transfer.missing_bytes(),
                what: "new chunks",
            },
            crate::disk::Need {
                path: self.config.state.join("staging"),
                bytes: staged_size,
                what: "staged copy",
            },
        ];
        if let Some(app) = &self.config.app {
            needs.push(crate::disk::Need {
                path: app.install_dir.clone(),
                bytes: staged_size,
                what: "copy beside the installed application while applying",
            });
        }
        match crate::disk::check_room(&release, &needs) {
            Ok(()) => {
                if t.no_room.take().is_some() {
                    info!(release, "there is room for the release now; fetching it");
                }
            }
            Err(reason) => {
                if t.no_room.is_none() {
                    warn!(release, error = %reason, "release refused for now: it does not fit on this node's disk");
                }
                t.no_room = Some((reason, Instant::now() + STAGE_RETRY));
            }
        }
    }

    /// Bans `peer` for [`Limits::ban_ms`] and disconnects it.
    async fn distrust(&mut self, peer: PeerId, why: &str) {
        let ban = Duration::from_millis(Limits::default().ban_ms);
        warn!(%peer, ban = %humantime::format_duration(ban), "peer {why}; disconnected and banned");
        let _ = self.net.ban(peer, ban).await;
    }

    /// This node's disk refused a chunk: transfers from peers pause (5 s
    /// doubling, with jitter, at most 5 minutes) instead of asking again
    /// at once, and the status says why.
    fn disk_failed(&mut self, reason: String) {
        if self.disk_paused_until.is_some_and(|at| Instant::now() < at) {
            return;
        }
        // The same waits as after origin failures.
        self.disk_failures = self.disk_failures.saturating_add(1);
        let wait = Duration::from_millis(lanup_protocol::fetcher::backoff_ms(
            self.disk_failures,
            lanup_protocol::fetcher::BACKOFF_MAX_MS,
            random(),
        ));
        warn!(error = %reason, retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())), "this node cannot store chunks on its own disk; pausing transfers");
        self.disk_paused_until = Some(Instant::now() + wait);
        self.disk_error = Some(reason);
    }

    /// A chunk this node held was found damaged on its disk (and removed):
    /// it is no longer offered as held here, and is fetched again, from a
    /// peer or else the origin.
    fn chunk_lost(&mut self, hash: Hash) {
        let Some(t) = &mut self.target else { return };
        if !t.held.remove(&hash) {
            return;
        }
        let size = unique_chunks(&t.manifest.files)
            .get(&hash)
            .copied()
            .unwrap_or_default();
        warn!(chunk = %hash, "a chunk was damaged on this node's disk; removed, and fetched again");
        // `held_order` stays as it is (peers read it by position); a peer
        // that asks for the chunk now is told it is not held.
        t.transfer.lost(hash, size);
        // Peers' lists are asked afresh: what they said they hold was kept
        // only for chunks this node wanted then.
        t.peer_since.clear();
        t.adopted_at = Instant::now();
    }

    fn schedule(&mut self) {
        let now = self.now_ms();
        let downloading = self.origin_busy();
        if self.disk_paused_until.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.check_room();
        if self.target.as_ref().is_some_and(|t| t.no_room.is_some()) {
            return;
        }
        let Some(t) = &mut self.target else { return };
        if downloading {
            self.site_lacks
                .send_replace(std::sync::Arc::new(t.transfer.unavailable(now)));
        }
        let (requests, _expired) = t.transfer.poll(now);
        for r in requests {
            let control = self.net.streams();
            let store = self.store.clone();
            let tx = self.done_tx.clone();
            let chunk = Chunk {
                size: r.size,
                hash: r.hash,
            };
            tokio::spawn(async move {
                let result = chunks::fetch(control, r.peer, chunk, store)
                    .await
                    .map(|()| (r.peer, r.hash));
                let _ = tx.send(Done::Chunk(result)).await;
            });
        }
        let retry = t
            .stage_failed
            .as_ref()
            .is_none_or(|(_, at)| Instant::now() >= *at);
        if t.transfer.is_done() && !t.staged && !t.staging && retry {
            t.staging = true;
            let manifest = t.manifest.clone();
            let store = self.store.clone();
            let dest = self
                .config
                .state
                .join("staging")
                .join(manifest.release_name());
            let tx = self.done_tx.clone();
            let hash = t.hash;
            tokio::spawn(async move {
                let result = tokio::task::spawn_blocking(move || {
                    crate::fetch::assemble(&manifest, &store, &dest).map(|()| dest)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
                let _ = tx.send(Done::Staged(hash, result)).await;
            });
        }
    }

    async fn on_done(&mut self, done: Done) {
        match done {
            Done::Chunk(result) => {
                let now = self.now_ms();
                let Some(t) = &mut self.target else { return };
                match result {
                    Ok((peer, hash)) => {
                        t.transfer.delivered(&peer, &hash);
                        if t.held.insert(hash) {
                            t.held_order.push(hash);
                        }
                        self.stalls.remove(&peer);
                        if self.disk_error.take().is_some() {
                            info!("this node's disk takes chunks again");
                        }
                        self.disk_failures = 0;
                    }
                    Err(ChunkError::Corrupt { peer, hash }) => {
                        t.transfer.corrupt(&peer, &hash, now);
                        self.distrust(peer, "sent a bad chunk").await;
                    }
                    Err(ChunkError::NotHeld { peer, hash }) => {
                        debug!(%peer, chunk = %hash, "peer no longer holds a chunk it offered");
                        t.transfer.not_held(&peer, &hash);
                    }
                    Err(ChunkError::Stalled { peer, hash }) => {
                        let stalls = self.stalls.entry(peer).or_default();
                        *stalls += 1;
                        if *stalls >= STALLS_TO_DISTRUST {
                            t.transfer.corrupt(&peer, &hash, now);
                            self.stalls.remove(&peer);
                            self.distrust(
                                peer,
                                "stopped sending chunks it offered, again and again",
                            )
                            .await;
                        } else {
                            debug!(%peer, chunk = %hash, "peer stopped sending a chunk; asking elsewhere");
                            t.transfer.failed(&peer, &hash);
                        }
                    }
                    Err(ChunkError::LocalDisk { peer, hash, reason }) => {
                        t.transfer.failed(&peer, &hash);
                        self.disk_failed(reason);
                    }
                    Err(ChunkError::Failed { peer, hash, .. }) => t.transfer.failed(&peer, &hash),
                }
                // A free slot is used at once, not at the next tick.
                self.schedule();
            }
            Done::Have(peer, hash, answer) => {
                self.have_pending.remove(&peer);
                let Some((chunks, total)) = answer else {
                    return;
                };
                let silent = self.peers.get(&peer).is_none_or(|p| p.silent);
                if let Some(t) = self.target.as_mut().filter(|t| t.hash == hash && !silent) {
                    t.transfer.peer_connected(peer);
                    t.transfer.peer_has(&peer, chunks);
                    t.peer_since.insert(peer, total);
                    self.origin_step();
                }
            }
            Done::Manifest(peer, hash, result) => {
                let waiting = self.validating.remove(&hash).unwrap_or_default();
                let verdict = match result {
                    Ok((xml, _)) if Hash::of(&xml) != hash => {
                        warn!(%peer, "refused announcement: the manifest it sent is not the one it announced");
                        MessageAcceptance::Reject
                    }
                    Ok((xml, sig)) => self.adopt(&format!("peer {peer}"), xml, sig),
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
            Done::OriginPoll(epoch, result) => {
                let signed = |source: &ManifestSource| {
                    source
                        .signature
                        .clone()
                        .and_then(|s| String::from_utf8(s).ok())
                };
                let ok = match &result {
                    Ok(Poll::Unchanged) => true,
                    Ok(Poll::Changed { source, .. }) => signed(source).is_some(),
                    Err(_) => false,
                };
                if !self.plan.finished(epoch, ok, self.now_ms(), random()) {
                    return;
                }
                self.origin_task = None;
                match result {
                    Ok(Poll::Unchanged) => {
                        self.origin_ok();
                        self.origin_step();
                    }
                    Ok(Poll::Changed { source, etag }) => {
                        let Some(sig) = source
                            .signature
                            .clone()
                            .and_then(|s| String::from_utf8(s).ok())
                        else {
                            self.origin_failed(
                                "the origin's release is not signed",
                                format!(
                                    "{}: no readable signature file beside it",
                                    source.location
                                ),
                            );
                            return;
                        };
                        self.etag = etag;
                        self.origin_ok();
                        let location = source.location.clone();
                        let _ = self.adopt(&location, source.bytes, sig);
                        self.origin_step();
                    }
                    Err(e) => {
                        self.origin_failed("cannot read the origin's manifest", format!("{e:#}"));
                    }
                }
            }
            Done::OriginChunk(hash, size) => {
                self.origin_bytes += size;
                self.origin_counted += size;
                if let Some(t) = &mut self.target {
                    t.transfer.obtained(&hash);
                    if t.held.insert(hash) {
                        t.held_order.push(hash);
                    }
                }
            }
            Done::OriginFinished(epoch, result) => {
                let now = self.now_ms();
                if !self.plan.finished(epoch, result.is_ok(), now, random()) {
                    return;
                }
                self.origin_task = None;
                self.reconcile_store();
                match result {
                    Ok(report) => {
                        // The exact count, including bytes that were not a
                        // whole chunk.
                        self.origin_bytes = self.origin_bytes - self.origin_counted + report.bytes;
                        self.origin_counted = 0;
                        if let Some((_, total)) = &mut self.downloading {
                            *total += report.bytes;
                        }
                        self.origin_ok();
                        let lacking = self
                            .target
                            .as_ref()
                            .is_some_and(|t| !t.transfer.unavailable(now).is_empty());
                        if !lacking {
                            if let Some((_, bytes)) = self.downloading.take() {
                                let release =
                                    self.target.as_ref().map(|t| t.manifest.release_name());
                                info!(release = ?release, bytes, "download from the origin finished");
                            }
                        }
                        // What is still missing, if anything.
                        self.origin_step();
                    }
                    Err(e) => {
                        let what = match &e {
                            crate::fetch::FetchError::LocalDisk(_) => {
                                "this node cannot store what the origin sends"
                            }
                            crate::fetch::FetchError::Mismatch { .. } => {
                                "the origin's files differ from its signed manifest"
                            }
                            _ => "download from the origin failed",
                        };
                        self.origin_failed(what, format!("{e:#}"));
                    }
                }
            }
            Done::Staged(hash, result) => {
                let Some(t) = self.target.as_mut().filter(|t| t.hash == hash) else {
                    return;
                };
                t.staging = false;
                match result {
                    Ok(dir) => {
                        t.staged = true;
                        t.stage_failed = None;
                        info!(release = %t.manifest.release_name(), dir = %dir.display(), "release staged and verified");
                        let keep = self
                            .config
                            .state
                            .join("releases")
                            .join(t.manifest.release_name());
                        let written = crate::apply::write_synced(
                            &keep.join(lanup_protocol::manifest::MANIFEST_FILE),
                            &t.xml,
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
            Done::Commands(peer, commands) => self.catch_up(peer, commands),
            Done::ApplyStep(event) => {
                if let Some((_, step)) = &mut self.applying {
                    *step = event.step;
                }
            }
            Done::Applied(outcome) => {
                self.applying = None;
                match outcome.ending {
                    Ending::Committed => {
                        self.installed = crate::apply::read_installed(&self.config.state)
                            .ok()
                            .flatten()
                            .map(|i| i.manifest);
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
                        reason: outcome.reason.clone(),
                        ..Entry::default_at(now_unix_ms())
                    });
                }
                self.last_apply = Some(outcome);
                // A release staged while this apply ran is next.
                self.maybe_auto_apply();
                self.rollout_duties();
            }
        }
    }
}

/// A random number for the fetcher's jitter.
fn random() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The audit fields a command fills in.
fn command_fields(command: Option<&Command>) -> Entry {
    let mut entry = Entry::default_at(now_unix_ms());
    if let Some(c) = command {
        let (action, version) = match &c.action {
            Action::Rollout { version } => ("rollout", Some(version.clone())),
            Action::Abort => ("abort", None),
            Action::Rollback { version } => ("rollback", Some(version.clone())),
        };
        entry.action = Some(action.into());
        entry.version = version;
        entry.id = Some(c.id.clone());
        entry.issued_at_ms = Some(c.issued_at_ms);
    }
    entry
}
