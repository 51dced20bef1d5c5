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
//! checked in `state/staging/<release>/`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lanup_protocol::chunk::Chunk;
use lanup_protocol::manifest::unique_chunks;
use lanup_protocol::sign::{SecretKey, Signature};
use lanup_protocol::transfer::{Limits, Transfer};
use lanup_protocol::wire::{Announce, Request, Response};
use lanup_protocol::{Hash, Manifest};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::chunks::{self, ChunkError};
use crate::config::NodeConfig;
use crate::control::ControlRequest;
use crate::fetch::fetch_missing;
use crate::network::{Network, NetworkClient, NetworkConfig, NetworkEvent, CHUNK_PROTOCOL};
use crate::release::ManifestSource;
use crate::store::ChunkStore;

/// How often a node says it is alive, and re-announces its release.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a node asks its peers what chunks they gained.
const HAVE_INTERVAL: Duration = Duration::from_millis(250);
/// A peer silent this long no longer counts for the fetcher election.
const PEER_SILENT: Duration = Duration::from_secs(5);

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
}

#[derive(Debug)]
struct PeerInfo {
    heartbeat: Option<(Instant, Heartbeat)>,
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
}

enum Done {
    Chunk(Result<(PeerId, Hash), ChunkError>),
    Have(PeerId, Hash, Vec<Hash>, u32),
    Manifest(PeerId, Result<(Vec<u8>, String)>),
    OriginChunk(Hash),
    OriginManifest(Result<ManifestSource>),
    OriginFinished(Result<u64>),
    Staged(Hash, Result<PathBuf>),
}

struct Node {
    config: NodeConfig,
    net: NetworkClient,
    store: ChunkStore,
    local: PeerId,
    peers: BTreeMap<PeerId, PeerInfo>,
    target: Option<Target>,
    done_tx: mpsc::Sender<Done>,
    origin_busy: bool,
    origin_bytes: u64,
    started: Instant,
    http: reqwest::Client,
    announce_topic: String,
    status_topic: String,
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
    let key = identity(&config.state)?;
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
    tokio::spawn(chunks::serve(incoming, store.clone()));

    let announce_topic = format!("lanup/{}/announce", config.site);
    let status_topic = format!("lanup/{}/status", config.site);
    net.subscribe(&announce_topic).await?;
    net.subscribe(&status_topic).await?;
    let (done_tx, mut done) = mpsc::channel(1024);
    let (control_tx, mut control) = mpsc::channel::<crate::control::Incoming>(16);
    crate::control::listen(&config.state, control_tx)?;
    let mut node = Node {
        config,
        net,
        store,
        local,
        peers: BTreeMap::new(),
        target: None,
        done_tx,
        origin_busy: false,
        origin_bytes: 0,
        started: Instant::now(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?,
        announce_topic,
        status_topic,
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut schedule = tokio::time::interval(Duration::from_millis(100));
    let mut have = tokio::time::interval(HAVE_INTERVAL);
    let mut last_poll: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(event) = events.recv() => node.on_network(event).await,
            Some(d) = done.recv() => node.on_done(d).await,
            Some((request, reply)) = control.recv() => {
                let _ = reply.send(node.control(request));
            }
            _ = heartbeat.tick() => {
                node.heartbeat().await;
                // Give peers a moment to connect before deciding who fetches.
                let due = last_poll.is_none_or(|t| t.elapsed() >= node.config.poll_interval);
                if node.started.elapsed() >= Duration::from_secs(3) && node.is_fetcher() {
                    if due && !node.origin_busy {
                        last_poll = Some(Instant::now());
                        node.poll_origin();
                    } else {
                        node.resume_origin_download();
                    }
                }
            }
            _ = schedule.tick() => node.schedule(),
            _ = have.tick() => node.ask_have(),
        }
    }
    info!("node stopping");
    Ok(())
}

impl Node {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Among live nodes with an origin, the lowest PeerId fetches.
    fn is_fetcher(&self) -> bool {
        if self.config.origin.is_none() {
            return false;
        }
        !self.peers.iter().any(|(peer, info)| {
            *peer < self.local
                && info
                    .heartbeat
                    .as_ref()
                    .is_some_and(|(at, hb)| hb.has_origin && at.elapsed() < PEER_SILENT)
        })
    }

    fn own_heartbeat(&self) -> Heartbeat {
        let t = self.target.as_ref();
        Heartbeat {
            has_origin: self.config.origin.is_some(),
            state: match t {
                None => "idle",
                Some(t) if t.staged => "staged",
                Some(_) => "fetching",
            }
            .into(),
            release: t.map(|t| t.manifest.release_name()),
            staged_version: t.filter(|t| t.staged).map(|t| t.manifest.release_name()),
            bytes_have: t.map_or(0, |t| t.bytes_total - t.transfer.missing_bytes()),
            bytes_total: t.map_or(0, |t| t.bytes_total),
            origin_bytes: self.origin_bytes,
        }
    }

    /// Answers the CLI.
    fn control(&mut self, request: ControlRequest) -> serde_json::Value {
        let row = |peer: &PeerId, hb: Option<&Heartbeat>, last_seen_ms: Option<u64>| {
            serde_json::json!({
                "peer_id": peer.to_string(),
                "installed_version": null,
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
                mine["fetcher"] = serde_json::json!(self.is_fetcher());
                mine["self"] = serde_json::json!(true);
                let mut nodes = vec![mine];
                for (peer, info) in &self.peers {
                    let (hb, seen) = match &info.heartbeat {
                        Some((at, hb)) => (Some(hb), Some(at.elapsed().as_millis() as u64)),
                        None => (None, None),
                    };
                    nodes.push(row(peer, hb, seen));
                }
                serde_json::json!({ "site": self.config.site, "nodes": nodes })
            }
            ControlRequest::Peers => serde_json::json!({
                "peers": self.peers.keys().map(ToString::to_string).collect::<Vec<_>>()
            }),
            ControlRequest::Check => {
                let fetcher = self.is_fetcher();
                if fetcher && !self.origin_busy {
                    self.poll_origin();
                }
                serde_json::json!({ "fetcher": fetcher, "polling": fetcher })
            }
        }
    }

    async fn heartbeat(&mut self) {
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
        for peer in self.peers.keys().copied() {
            let net = self.net.clone();
            let tx = self.done_tx.clone();
            let hash = t.hash;
            let since = t.peer_since.get(&peer).copied().unwrap_or(0);
            tokio::spawn(async move {
                if let Ok(Response::Have { chunks, total }) = net
                    .request(
                        peer,
                        Request::Have {
                            manifest_hash: hash,
                            since,
                        },
                    )
                    .await
                {
                    let _ = tx.send(Done::Have(peer, hash, chunks, total)).await;
                }
            });
        }
    }

    async fn on_network(&mut self, event: NetworkEvent) {
        match event {
            NetworkEvent::PeerConnected(peer) => {
                self.peers.insert(peer, PeerInfo { heartbeat: None });
                if let Some(t) = &mut self.target {
                    t.transfer.peer_connected(peer);
                }
            }
            NetworkEvent::PeerDisconnected(peer) => {
                self.peers.remove(&peer);
                if let Some(t) = &mut self.target {
                    t.transfer.peer_disconnected(&peer);
                }
            }
            NetworkEvent::Gossip {
                topic,
                from,
                id,
                data,
            } => {
                let accept = if topic == self.status_topic {
                    match serde_json::from_slice::<Heartbeat>(&data) {
                        Ok(hb) => {
                            if let Some(info) = self.peers.get_mut(&from) {
                                info.heartbeat = Some((Instant::now(), hb));
                            }
                            true
                        }
                        Err(_) => false,
                    }
                } else if topic == self.announce_topic {
                    self.on_announce(from, &data)
                } else {
                    false
                };
                let _ = self.net.validate(id, from, accept).await;
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
                    _ => Response::Unknown,
                };
                let _ = self.net.respond(channel, response).await;
            }
        }
    }

    /// Checks an announcement before it is forwarded; fetches the manifest
    /// when it is new. Returns whether to forward it.
    fn on_announce(&mut self, from: PeerId, data: &[u8]) -> bool {
        let announce = match serde_json::from_slice::<Announce>(data) {
            Ok(a) => a,
            Err(e) => {
                warn!(peer = %from, error = %e, "refused announcement: not readable");
                return false;
            }
        };
        let signature = match Signature::from_text(&announce.signature) {
            Ok(s) => s,
            Err(e) => {
                warn!(peer = %from, release = %announce.release, error = %e, "refused announcement");
                return false;
            }
        };
        if !self.config.trust_publisher.contains(&signature.key) {
            warn!(peer = %from, release = %announce.release, key = %signature.key, "refused announcement: signed by a key this node does not trust");
            return false;
        }
        if self
            .target
            .as_ref()
            .is_some_and(|t| t.hash == announce.manifest_hash)
        {
            return true;
        }
        let net = self.net.clone();
        let tx = self.done_tx.clone();
        let hash = announce.manifest_hash;
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
            let _ = tx.send(Done::Manifest(from, result)).await;
        });
        true
    }

    /// Adopts a manifest after checking it as `lanup inspect --trust` does.
    fn adopt(&mut self, from: &str, xml: Vec<u8>, signature: String) {
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
                    return;
                }
            };
        let hash = Hash::of(&source.bytes);
        if let Some(t) = &self.target {
            if t.hash == hash
                || manifest.compare_release(&t.manifest) != std::cmp::Ordering::Greater
            {
                return;
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
        );
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
        });
    }

    fn poll_origin(&mut self) {
        let Some(origin) = self.config.origin.clone() else {
            return;
        };
        self.origin_busy = true;
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Done::OriginManifest(ManifestSource::read(&origin).await))
                .await;
        });
    }

    /// The fetcher downloads what no peer at the site holds.
    fn resume_origin_download(&mut self) {
        let (Some(origin), Some(t)) = (self.config.origin.clone(), &self.target) else {
            return;
        };
        if self.origin_busy || t.transfer.is_done() {
            return;
        }
        let now = self.now_ms();
        let nobody_has = t.transfer.unavailable(now);
        if nobody_has.is_empty() {
            return;
        }
        self.origin_busy = true;
        let manifest = t.manifest.clone();
        let store = self.store.clone();
        let http = self.http.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let chunk_tx = tx.clone();
            let result = fetch_missing(
                &http,
                &origin,
                &manifest,
                &store,
                |h| !nobody_has.contains(h),
                |c: &Chunk| {
                    let _ = chunk_tx.try_send(Done::OriginChunk(c.hash));
                },
            )
            .await
            .map(|r| r.bytes);
            let _ = tx.send(Done::OriginFinished(result)).await;
        });
    }

    fn schedule(&mut self) {
        let now = self.now_ms();
        let Some(t) = &mut self.target else { return };
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
        if t.transfer.is_done() && !t.staged && !t.staging {
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
                    }
                    Err(ChunkError::Corrupt { peer, hash }) => {
                        warn!(%peer, chunk = %hash, "peer sent a bad chunk; banning it for a while");
                        t.transfer.corrupt(&peer, &hash, now);
                    }
                    Err(ChunkError::Failed { peer, hash, .. }) => t.transfer.failed(&peer, &hash),
                }
            }
            Done::Have(peer, hash, chunks, total) => {
                if let Some(t) = self.target.as_mut().filter(|t| t.hash == hash) {
                    t.transfer.peer_connected(peer);
                    t.transfer.peer_has(&peer, chunks);
                    t.peer_since.insert(peer, total);
                }
            }
            Done::Manifest(peer, result) => match result {
                Ok((xml, sig)) => self.adopt(&format!("peer {peer}"), xml, sig),
                Err(e) => {
                    warn!(%peer, error = %format!("{e:#}"), "could not fetch an announced manifest")
                }
            },
            Done::OriginManifest(result) => {
                self.origin_busy = false;
                match result {
                    Ok(source) => {
                        let Some(sig) = source
                            .signature
                            .clone()
                            .and_then(|s| String::from_utf8(s).ok())
                        else {
                            warn!(origin = %source.location, "origin has no readable signature file");
                            return;
                        };
                        let location = source.location.clone();
                        self.adopt(&location, source.bytes, sig);
                        self.resume_origin_download();
                    }
                    Err(e) => warn!(error = %format!("{e:#}"), "cannot read the origin's manifest"),
                }
            }
            Done::OriginChunk(hash) => {
                if let Some(t) = &mut self.target {
                    t.transfer.obtained(&hash);
                    if t.held.insert(hash) {
                        t.held_order.push(hash);
                    }
                }
            }
            Done::OriginFinished(result) => {
                self.origin_busy = false;
                // Chunk notices are best effort (a full queue drops them);
                // the store is the truth.
                if let Some(t) = &mut self.target {
                    for hash in unique_chunks(&t.manifest.files).keys() {
                        if !t.held.contains(hash) && self.store.has(hash) {
                            t.transfer.obtained(hash);
                            t.held.insert(*hash);
                            t.held_order.push(*hash);
                        }
                    }
                }
                match result {
                    Ok(bytes) => self.origin_bytes += bytes,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "download from the origin failed; will resume")
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
                        info!(release = %t.manifest.release_name(), dir = %dir.display(), "release staged and verified");
                    }
                    Err(e) => warn!(error = %format!("{e:#}"), "staging failed"),
                }
            }
        }
    }
}
