//! The site swarm: libp2p transports, discovery and the small messages.
//!
//! One task owns the `Swarm` ([`Network::run`]); the rest of the node holds
//! a cheap [`NetworkClient`] that sends it commands, and reads
//! [`NetworkEvent`]s from a channel. Transports are TCP + noise + yamux, and
//! QUIC unless the site uses a pre-shared key (pnet does not cover QUIC).
//! Peers are found by mDNS on the LAN and by static addresses; of two peers
//! that find each other only the one with the lower PeerId dials, which
//! avoids the simultaneous-dial race that breaks noise handshakes.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lanup_protocol::wire::{Request, Response};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    gossipsub, identify, mdns, noise, quic, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
    Transport,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// The request/response protocol for manifests and chunk lists.
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/lanup/rpc/1");
/// The raw-stream protocol chunk bodies travel on.
pub const CHUNK_PROTOCOL: StreamProtocol = StreamProtocol::new("/lanup/chunk/1");

/// How the swarm is set up.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<Multiaddr>,
    pub psk: Option<PreSharedKey>,
    /// mDNS on every non-loopback interface.
    pub mdns: bool,
    /// The state directory, where the peers this node knew are kept
    /// ([`crate::remembered`]); None keeps none.
    pub state: Option<std::path::PathBuf>,
}

/// Connections a node seeks on its own: a node that knows fewer peers (a
/// site whose nodes know only a bootstrap node or two by address) dials
/// nodes it heard of in gossip, the lower PeerId dialling, until it has
/// this many, so that gossip has a mesh to travel.
pub const TARGET_PEERS: usize = 8;
/// Connection changes waiting for the node at most: four for each
/// connection the node may hold.
const MAX_BACKLOG: usize = 4 * MAX_CONNECTIONS as usize;
/// Peers mDNS found that are remembered at once: beyond any real LAN.
const MAX_DISCOVERED: usize = 1024;
/// How long after start the remembered peers that did not answer are
/// dialled (then they wait for the next start, or for mDNS).
const RECALL_FOR: Duration = Duration::from_secs(60);

/// Connections held at most, all peers together: a site is tens of nodes,
/// each with a connection or two to every other.
const MAX_CONNECTIONS: u32 = 256;
/// Incoming connections still in their handshake at once. A flood of raw
/// TCP connections that never speak is refused beyond this, and each one
/// is closed after [`HANDSHAKE_TIMEOUT`].
const MAX_PENDING_INCOMING: u32 = 32;
/// Connections per peer (a dial race can leave two for a moment).
const MAX_PER_PEER: u32 = 2;
/// How long after start static peers not connected are dialled every
/// second (then every 5 s).
const STATIC_EAGER: Duration = Duration::from_secs(10);
/// A connection that has not finished its security and multiplexing
/// handshake by then is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection no protocol uses for this long is closed. Peers at rest
/// say little (a heartbeat every tens of seconds, and only to their mesh),
/// so a connection is not closed for being quiet: pings tell a peer that
/// stopped answering, and only a connection unused for a day goes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Pings find a peer that stopped answering (a frozen machine, a cable
/// pulled without a reset); its connection is closed, not held for hours.
const PING_INTERVAL: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Mesh peers each node passes gossip to (gossipsub's D). With `mesh_n_low`
/// two below and the mesh grafted within a second of connecting, a site
/// of any size hears a message in a few LAN hops.
const MESH_N: usize = 6;
/// A message above this many bytes is announced to mesh peers as had
/// (IDONTWANT) once received, so that they do not send their copy: a
/// heartbeat is a few hundred bytes.
const IDONTWANT_FROM: usize = 200;

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: libp2p::connection_limits::Behaviour,
    ping: libp2p::ping::Behaviour,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: gossipsub::Behaviour,
    rpc: request_response::cbor::Behaviour<Request, Response>,
    stream: libp2p_stream::Behaviour,
}

/// What the swarm tells the node.
#[derive(Debug)]
pub enum NetworkEvent {
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
    /// A gossip message on `topic`. The node must answer with
    /// [`NetworkClient::validate`], or it is neither forwarded nor dropped.
    Gossip {
        topic: String,
        /// The peer that passed the message on (validation answers it).
        from: PeerId,
        /// The peer that wrote and signed the message, which may be
        /// further away than `from`.
        author: Option<PeerId>,
        id: gossipsub::MessageId,
        data: Vec<u8>,
    },
    /// A peer asks something; answer with [`NetworkClient::respond`].
    Request {
        from: PeerId,
        request: Request,
        channel: ResponseChannel<Response>,
    },
}

enum Command {
    Subscribe(String),
    /// Answered at once: the swarm's task runs.
    Alive(oneshot::Sender<()>),
    /// A node heard of in gossip, and where it says it listens.
    HeardOf {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    Validate {
        id: gossipsub::MessageId,
        from: PeerId,
        accept: gossipsub::MessageAcceptance,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response>>,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Ban {
        peer: PeerId,
        until: std::time::Instant,
    },
}

/// A handle on the swarm task.
#[derive(Clone)]
pub struct NetworkClient {
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    local: PeerId,
    discovery: tokio::sync::watch::Receiver<Discovered>,
    listening: tokio::sync::watch::Receiver<Vec<Multiaddr>>,
}

/// What discovery has answered so far: the election waits for it at start
/// instead of a fixed grace.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// Static addresses whose peer is not connected yet.
    pub static_dialling: usize,
    /// Peers mDNS found that are not connected, and when each was found.
    pub found: Vec<(PeerId, std::time::Instant)>,
    /// When discovery last found a peer (or a static dial ended).
    pub last_found: Option<std::time::Instant>,
    /// The peers connected now. The node hears of each through an event
    /// that may still be queued: one it has not heard of yet is not
    /// answered yet.
    pub connected: Vec<PeerId>,
}

/// The swarm and its task; [`Network::run`] drives it.
pub struct Network {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    static_peers: Vec<Multiaddr>,
    /// Which peer answers at each static address, once known (from the
    /// connection we dialled, or from the addresses the peer says it
    /// listens on): an address is dialled again while its peer is not
    /// connected, whatever other connections this node has.
    static_known: std::collections::HashMap<Multiaddr, PeerId>,
    /// Static addresses with a dial of ours under way: not dialled again
    /// until it ends (a second connection to one peer would be closed,
    /// taking its streams with it).
    static_dialling: std::collections::HashMap<Multiaddr, ConnectionId>,
    pending: std::collections::HashMap<OutboundRequestId, oneshot::Sender<Result<Response>>>,
    connected: HashSet<PeerId>,
    /// Peers refused until the given time (they sent bad chunks).
    banned: std::collections::HashMap<PeerId, std::time::Instant>,
    /// Connection changes the node has not taken yet (its queue was
    /// full): they are never dropped, only delayed, and bounded by the
    /// connection limits.
    backlog: std::collections::VecDeque<NetworkEvent>,
    /// Gossip messages and requests dropped because the node lagged (each
    /// sender tries again: heartbeats every second, requests on timeout).
    shed: u64,
    /// Nodes heard of in gossip and where they listen: dialled while this
    /// node has fewer than [`TARGET_PEERS`] connections.
    heard_of: std::collections::HashMap<PeerId, Vec<Multiaddr>>,
    /// Where this node listens, for its heartbeats.
    listening: tokio::sync::watch::Sender<Vec<Multiaddr>>,
    /// The peers this node knew, kept across restarts.
    remembered: crate::remembered::Remembered,
    /// Remembered peers dialled since start and not connected yet (they
    /// sit in `discovered` meanwhile, as if mDNS had found them).
    recalled: HashSet<PeerId>,
    started: std::time::Instant,
    /// Peers mDNS found, their addresses and when: dialled again while
    /// they stay unconnected (a first dial can fail, and mDNS reports a
    /// peer once per record, not again minutes later).
    discovered: std::collections::HashMap<PeerId, (Vec<Multiaddr>, std::time::Instant)>,
    discovery: tokio::sync::watch::Sender<Discovered>,
}

fn transport(key: &Keypair, psk: Option<PreSharedKey>) -> Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let noise = noise::Config::new(key).context("noise setup")?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
        None => {
            let tcp = tcp
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(HANDSHAKE_TIMEOUT);
            let quic = quic::tokio::Transport::new(quic::Config::new(key));
            OrTransport::new(quic, tcp)
                .map(|either, _| match either {
                    futures_util::future::Either::Left((peer, conn)) => {
                        (peer, StreamMuxerBox::new(conn))
                    }
                    futures_util::future::Either::Right((peer, conn)) => {
                        (peer, StreamMuxerBox::new(conn))
                    }
                })
                .boxed()
        }
    })
}

fn behaviour(key: &Keypair, mdns_on: bool) -> Result<Behaviour> {
    // Gossip travels the mesh: each node passes a message on to a few
    // peers (not to every peer it is connected to, which at a site of
    // hundreds would have each node receive and check every message
    // hundreds of times). An author sends its own to every peer it is
    // connected to (so a peer that just connected hears it at once); each
    // copy costs its receiver a signature check, and a node that got a
    // message tells its mesh peers not to send it again.
    let gossip = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .heartbeat_initial_delay(Duration::from_millis(100))
        .mesh_n(MESH_N)
        .mesh_n_low(MESH_N - 2)
        .mesh_n_high(MESH_N * 2)
        .mesh_outbound_min(2)
        .gossip_lazy(MESH_N)
        .flood_publish(true)
        .idontwant_message_size_threshold(IDONTWANT_FROM)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .build()
        .context("gossipsub config")?;
    let mdns = if mdns_on {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())
                .context("mDNS")?,
        )
    } else {
        None
    };
    let limits = libp2p::connection_limits::ConnectionLimits::default()
        .with_max_established(Some(MAX_CONNECTIONS))
        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
        .with_max_established_per_peer(Some(MAX_PER_PEER));
    Ok(Behaviour {
        limits: libp2p::connection_limits::Behaviour::new(limits),
        ping: libp2p::ping::Behaviour::new(
            libp2p::ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        ),
        identify: identify::Behaviour::new(identify::Config::new(
            "/lanup/1.0.0".into(),
            key.public(),
        )),
        mdns: Toggle::from(mdns),
        gossipsub: gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip,
        )
        .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?,
        rpc: request_response::cbor::Behaviour::new(
            [(RPC_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
        ),
        stream: libp2p_stream::Behaviour::new(),
    })
}

impl Network {
    /// Builds the swarm, starts listening, and returns it with its client
    /// and event stream.
    pub fn new(
        key: Keypair,
        config: NetworkConfig,
    ) -> Result<(Network, NetworkClient, mpsc::Receiver<NetworkEvent>)> {
        let local = key.public().to_peer_id();
        let transport = transport(&key, config.psk)?;
        let behaviour = behaviour(&key, config.mdns)?;
        let mut swarm = Swarm::new(
            transport,
            behaviour,
            local,
            libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(IDLE_TIMEOUT),
        );
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let streams = swarm.behaviour().stream.new_control();
        let (commands_tx, commands) = mpsc::channel(256);
        let (events, events_rx) = mpsc::channel(1024);
        // Every static peer counts as not answered yet until the swarm has
        // run: a node that looked before would think itself alone.
        let (listening, listening_rx) = tokio::sync::watch::channel(Vec::new());
        let (discovery, discovery_rx) = tokio::sync::watch::channel(Discovered {
            static_dialling: config.peers.len(),
            ..Discovered::default()
        });
        let network = Network {
            swarm,
            commands,
            events,
            static_peers: config.peers,
            static_known: Default::default(),
            static_dialling: Default::default(),
            pending: Default::default(),
            connected: HashSet::new(),
            discovered: std::collections::HashMap::new(),
            remembered: crate::remembered::Remembered::load(
                config.state.as_deref(),
                crate::node::now_unix_ms() / 1000,
            ),
            recalled: HashSet::new(),
            heard_of: Default::default(),
            listening,
            started: std::time::Instant::now(),
            banned: Default::default(),
            backlog: Default::default(),
            shed: 0,
            discovery,
        };
        Ok((
            network,
            NetworkClient {
                commands: commands_tx,
                streams,
                local,
                discovery: discovery_rx,
                listening: listening_rx,
            },
            events_rx,
        ))
    }

    /// Drives the swarm until every client is dropped.
    pub async fn run(mut self) {
        self.recall();
        self.redial_static(true);
        self.publish_discovery(false);
        // Static peers are redialled while they are not connected: every
        // second while the node starts (a peer started a moment later
        // refused the first dial, and the election's grace is 3 s: both
        // would fetch alone), then every few seconds.
        let started = tokio::time::Instant::now();
        let every = Duration::from_secs(5);
        let mut redial = tokio::time::interval_at(started + every, every);
        let found_every = Duration::from_secs(1);
        let mut redial_found =
            tokio::time::interval_at(tokio::time::Instant::now() + found_every, found_every);
        loop {
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(c) => self.command(c),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = redial.tick() => {
                    self.redial_static(false);
                    self.seek_peers();
                    self.remembered.save_if_due(false);
                    self.end_recall();
                    self.flush_backlog();
                    // Bans that ran out are forgotten.
                    let now = std::time::Instant::now();
                    self.banned.retain(|_, until| *until > now);
                }
                _ = redial_found.tick() => {
                    self.redial_discovered();
                    if started.elapsed() < STATIC_EAGER {
                        self.redial_static(false);
                    }
                }
            }
        }
        self.remembered.save_if_due(true);
    }

    /// Dials the peers this node remembers, as if mDNS had found them (the
    /// lower PeerId first: see the module docs): they count as found and
    /// not connected yet, so that the election waits for them (for its
    /// grace at most).
    fn recall(&mut self) {
        let now = std::time::Instant::now();
        for (peer, addrs) in self.remembered.peers() {
            if self.discovered.len() >= MAX_DISCOVERED {
                break;
            }
            self.discovered.entry(peer).or_insert((addrs, now));
            self.recalled.insert(peer);
        }
        if !self.recalled.is_empty() {
            info!(
                peers = self.recalled.len(),
                "dialling the peers this node knew"
            );
        }
        self.redial_discovered();
    }

    /// Dials nodes heard of in gossip while this node has fewer than
    /// [`TARGET_PEERS`] connections (the lower PeerId dials, as with mDNS).
    fn seek_peers(&mut self) {
        if dials_only_static() {
            return;
        }
        let local = *self.swarm.local_peer_id();
        let mut want = TARGET_PEERS.saturating_sub(self.connected.len());
        if want == 0 {
            return;
        }
        self.heard_of
            .retain(|peer, _| !self.connected.contains(peer));
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .heard_of
            .iter()
            .filter(|(peer, _)| local < **peer && !self.is_banned(peer))
            .map(|(peer, addrs)| (*peer, addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            if want == 0 {
                break;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            match self.swarm.dial(opts) {
                Ok(()) => want -= 1,
                Err(e) => debug!(%peer, error = %e, "dial of a node heard of failed"),
            }
        }
    }

    /// Remembered peers that did not answer within [`RECALL_FOR`] are no
    /// longer dialled.
    fn end_recall(&mut self) {
        if self.recalled.is_empty() || self.started.elapsed() < RECALL_FOR {
            return;
        }
        for peer in std::mem::take(&mut self.recalled) {
            if !self.connected.contains(&peer) {
                self.discovered.remove(&peer);
            }
        }
        self.publish_discovery(false);
    }

    /// Dials again the peers mDNS found that are still not connected: the
    /// lower PeerId (whose job it is) every tick; the higher one too once
    /// the lower has had 4 s, in case the lower one cannot reach it.
    fn redial_discovered(&mut self) {
        let local = *self.swarm.local_peer_id();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .discovered
            .iter()
            .filter(|(peer, (_, at))| {
                !self.connected.contains(peer)
                    && !self.is_banned(peer)
                    && (local < **peer || at.elapsed() >= Duration::from_secs(1))
            })
            .map(|(peer, (addrs, _))| (*peer, addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            debug!(%peer, "dialling a peer mDNS found and that is not connected yet");
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "dial failed");
            }
        }
    }

    /// Dials every static address whose peer is not connected (or not
    /// known yet): a first dial that failed is tried again every few
    /// seconds, so a node never lives with part of its intended mesh.
    /// A dial that cannot start (an address no transport takes) is
    /// warned of the `first` time, then only logged at debug level.
    fn redial_static(&mut self, first: bool) {
        for addr in &self.static_peers {
            if self.static_dialling.contains_key(addr) {
                continue;
            }
            let known = addr
                .iter()
                .find_map(|p| match p {
                    libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                    _ => None,
                })
                .or_else(|| self.static_known.get(addr).copied());
            if known.is_some_and(|id| self.connected.contains(&id) || self.is_banned(&id)) {
                continue;
            }
            let opts = match known {
                Some(id) => DialOpts::peer_id(id)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.static_dialling.insert(addr.clone(), id);
                }
                Err(e) if first => warn!(%addr, error = %e, "cannot dial static peer"),
                Err(e) => debug!(%addr, error = %e, "cannot dial static peer"),
            }
        }
    }

    fn command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Subscribe(topic) => {
                if let Err(e) = b.gossipsub.subscribe(&gossipsub::IdentTopic::new(topic)) {
                    warn!(error = %e, "cannot subscribe");
                }
            }
            Command::Alive(reply) => {
                let _ = reply.send(());
            }
            Command::HeardOf { peer, addrs } => {
                if self.heard_of.len() < MAX_DISCOVERED || self.heard_of.contains_key(&peer) {
                    self.heard_of.insert(peer, addrs);
                }
                self.seek_peers();
            }
            Command::Publish { topic, data, reply } => {
                let result = b
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(topic), data)
                    .map(drop)
                    .map_err(|e| anyhow::anyhow!("gossip publish: {e}"));
                let _ = reply.send(result);
            }
            Command::Validate { id, from, accept } => {
                b.gossipsub
                    .report_message_validation_result(&id, &from, accept);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = b.rpc.send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                let _ = b.rpc.send_response(channel, response);
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Ban { peer, until } => {
                self.banned.insert(peer, until);
                self.remembered.forget(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Tells the node what discovery has answered; `found` when it just
    /// found a peer (or a first dial ended).
    fn publish_discovery(&mut self, found: bool) {
        let pending: Vec<(PeerId, std::time::Instant)> = self
            .discovered
            .iter()
            .filter(|(peer, _)| !self.connected.contains(peer) && !self.is_banned(peer))
            .map(|(peer, (_, at))| (*peer, *at))
            .collect();
        // A static peer counts as found once connected: one that refuses
        // may be starting too (the grace bounds the wait for one that is
        // down).
        let dialling = self
            .static_peers
            .iter()
            .filter(|addr| {
                let known = addr
                    .iter()
                    .find_map(|p| match p {
                        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                        _ => None,
                    })
                    .or_else(|| self.static_known.get(*addr).copied());
                known.is_none_or(|id| !self.connected.contains(&id))
            })
            .count();
        self.discovery.send_modify(|d| {
            d.static_dialling = dialling;
            d.found = pending;
            d.connected = self.connected.iter().copied().collect();
            if found {
                d.last_found = Some(std::time::Instant::now());
            }
        });
    }

    fn peer_connected(&mut self, peer: PeerId, addr: &Multiaddr) {
        self.connected.insert(peer);
        info!(%peer, %addr, "peer found");
        self.emit(NetworkEvent::PeerConnected(peer));
    }

    /// Hands the node an event without ever waiting for it: the swarm
    /// (and every chunk stream on it) must not stop because the node lags.
    /// Connection changes wait in a backlog; gossip and requests beyond
    /// the queue are dropped and counted.
    fn emit(&mut self, event: NetworkEvent) {
        let changed = match &event {
            NetworkEvent::PeerConnected(p) | NetworkEvent::PeerDisconnected(p) => Some(*p),
            _ => None,
        };
        if let Some(peer) = changed {
            if self.backlog.len() >= MAX_BACKLOG {
                // A peer that comes and goes faster than the node takes
                // it in: its older changes go, its newest stays.
                self.backlog.retain(|e| {
                    !matches!(e, NetworkEvent::PeerConnected(p) | NetworkEvent::PeerDisconnected(p) if *p == peer)
                });
                if self.backlog.len() >= MAX_BACKLOG {
                    self.backlog.pop_front();
                    self.shed += 1;
                }
            }
            self.backlog.push_back(event);
            self.flush_backlog();
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
            self.shed += 1;
            if self.shed.is_power_of_two() {
                warn!(dropped = self.shed, "the node is lagging behind the network; dropping gossip and requests it would answer late");
            }
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(event) = self.backlog.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.backlog.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned
            .get(peer)
            .is_some_and(|until| *until > std::time::Instant::now())
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.flush_backlog();
        if let SwarmEvent::ConnectionEstablished { connection_id, .. }
        | SwarmEvent::OutgoingConnectionError { connection_id, .. } = &event
        {
            self.static_dialling.retain(|_, id| id != connection_id);
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening for peers");
                self.listening.send_modify(|l| {
                    if !l.contains(&address) {
                        l.push(address);
                    }
                });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.send_modify(|l| l.retain(|a| *a != address));
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } if self.is_banned(&peer_id) => {
                debug!(peer = %peer_id, "refused a connection from a banned peer");
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => self.established(peer_id, endpoint.get_remote_address(), endpoint.is_dialer()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } if num_established == 0 && self.connected.remove(&peer_id) => {
                info!(peer = %peer_id, "peer lost");
                self.emit(NetworkEvent::PeerDisconnected(peer_id));
                self.publish_discovery(false);
            }
            SwarmEvent::Behaviour(event) => self.behaviour(event),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            _ => {}
        }
    }

    fn behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.identified(peer_id, &info.listen_addrs)
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => self.mdns_found(found),
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => self.mdns_expired(gone),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.emit(NetworkEvent::Gossip {
                    author: message.source,
                    topic: message.topic.into_string(),
                    from: propagation_source,
                    id: message_id,
                    data: message.data,
                });
            }
            BehaviourEvent::Rpc(request_response::Event::Message { peer, message, .. }) => {
                self.rpc_message(peer, message)
            }
            BehaviourEvent::Rpc(request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            }) => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(anyhow::anyhow!("request to {peer} failed: {error}")));
                }
            }
            BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                connection,
                result: Err(error),
            }) => {
                info!(%peer, %error, "peer stopped answering pings; closing its connection");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }

    fn established(&mut self, peer_id: PeerId, addr: &Multiaddr, dialer: bool) {
        if dialer && self.static_peers.contains(addr) {
            self.static_known.insert(addr.clone(), peer_id);
        }
        let new = !self.connected.contains(&peer_id);
        if self.recalled.remove(&peer_id) {
            // Found again: it is a peer like any other now.
            self.discovered.remove(&peer_id);
        }
        if new {
            self.peer_connected(peer_id, addr);
            self.publish_discovery(true);
        }
    }

    /// A peer said where it listens (identify): remembered, and matched to
    /// the static peers dialled at those addresses.
    fn identified(&mut self, peer_id: PeerId, listen_addrs: &[Multiaddr]) {
        if !self.is_banned(&peer_id) {
            self.remembered
                .connected(peer_id, listen_addrs, crate::node::now_unix_ms() / 1000);
        }
        let mut known = false;
        for addr in listen_addrs {
            if self.static_peers.contains(addr) {
                known |= self.static_known.insert(addr.clone(), peer_id).is_none();
            }
        }
        if known {
            self.publish_discovery(true);
        }
    }

    fn mdns_found(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        let local = *self.swarm.local_peer_id();
        let mut new = false;
        for (peer, addr) in found {
            // mDNS found it: it is dialled and expired as mDNS says.
            self.recalled.remove(&peer);
            if !self.discovered.contains_key(&peer) && self.discovered.len() >= MAX_DISCOVERED {
                continue;
            }
            new |= !self.discovered.contains_key(&peer);
            let entry = self
                .discovered
                .entry(peer)
                .or_insert_with(|| (Vec::new(), std::time::Instant::now()));
            if !entry.0.contains(&addr) {
                entry.0.push(addr.clone());
            }
            // Only the lower PeerId dials (see the module docs).
            if local < peer && !self.connected.contains(&peer) && !self.is_banned(&peer) {
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    debug!(%peer, error = %e, "dial after mDNS discovery failed");
                }
            }
        }
        if new {
            self.publish_discovery(true);
        }
    }

    fn mdns_expired(&mut self, gone: Vec<(PeerId, Multiaddr)>) {
        for (peer, addr) in gone {
            if let Some((addrs, _)) = self.discovered.get_mut(&peer) {
                addrs.retain(|a| *a != addr);
                if addrs.is_empty() {
                    self.discovered.remove(&peer);
                }
            }
        }
        self.publish_discovery(false);
    }

    fn rpc_message(&mut self, peer: PeerId, message: request_response::Message<Request, Response>) {
        match message {
            request_response::Message::Request {
                request, channel, ..
            } => {
                self.emit(NetworkEvent::Request {
                    from: peer,
                    request,
                    channel,
                });
            }
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
        }
    }
}

/// Test builds only: with `LANUP_FAULT_NO_DIAL_OUT=1` the node dials its
/// static peers alone, never a node it heard of (a machine whose firewall
/// lets it reach those and no other).
fn dials_only_static() -> bool {
    #[cfg(feature = "fault-injection")]
    {
        std::env::var("LANUP_FAULT_NO_DIAL_OUT").is_ok_and(|v| v == "1")
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        false
    }
}

impl NetworkClient {
    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// What discovery has answered so far.
    pub fn discovered(&self) -> Discovered {
        self.discovery.borrow().clone()
    }

    async fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .await
            .map_err(|_| anyhow::anyhow!("the network task has stopped"))
    }

    /// Joins a gossip topic.
    pub async fn subscribe(&self, topic: &str) -> Result<()> {
        self.send(Command::Subscribe(topic.to_owned())).await
    }

    /// Where this node listens (its heartbeats say so).
    pub fn listening(&self) -> Vec<Multiaddr> {
        self.listening.borrow().clone()
    }

    /// Tells the swarm of a node heard of in gossip and where it listens:
    /// dialled if this node has too few peers. Never waits (a full queue
    /// drops it: the node's next heartbeat names it again).
    pub fn heard_of(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.commands.try_send(Command::HeardOf { peer, addrs });
    }

    /// Whether the swarm's task answers (the watchdog's proof that the
    /// network runs, between heartbeats).
    pub async fn alive(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Alive(reply)).await.is_ok() && rx.await.is_ok()
    }

    /// Gossips `data` on `topic`.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish {
            topic: topic.to_owned(),
            data,
            reply,
        })
        .await?;
        rx.await.context("the network task has stopped")?
    }

    /// Accepts (forwards) or rejects a gossip message.
    pub async fn validate(
        &self,
        id: gossipsub::MessageId,
        from: PeerId,
        accept: gossipsub::MessageAcceptance,
    ) -> Result<()> {
        self.send(Command::Validate { id, from, accept }).await
    }

    /// Asks `peer` something and waits for the answer.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.context("the network task has stopped")?
    }

    /// Answers a peer's request.
    pub async fn respond(
        &self,
        channel: ResponseChannel<Response>,
        response: Response,
    ) -> Result<()> {
        self.send(Command::Respond { channel, response }).await
    }

    /// Disconnects `peer` and refuses its connections for `duration`.
    pub async fn ban(&self, peer: PeerId, duration: Duration) -> Result<()> {
        let until = std::time::Instant::now() + duration;
        self.send(Command::Ban { peer, until }).await
    }

    /// Addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ListenAddrs(reply)).await?;
        rx.await.context("the network task has stopped")
    }

    /// A handle for opening and accepting raw streams (chunk bodies).
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's loop may look before the swarm's task has run: every
    /// static peer must already count as not answered, or a node started
    /// on a busy machine thinks itself alone and fetches.
    #[tokio::test]
    async fn static_peers_count_as_unanswered_before_the_swarm_runs() {
        let config = NetworkConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            peers: vec![
                "/ip4/127.0.0.1/tcp/9".parse().expect("addr"),
                "/ip4/127.0.0.1/tcp/10".parse().expect("addr"),
            ],
            psk: None,
            mdns: false,
            state: None,
        };
        let (_network, client, _events) =
            Network::new(Keypair::generate_ed25519(), config).expect("swarm");
        assert_eq!(client.discovered().static_dialling, 2);
    }
}
