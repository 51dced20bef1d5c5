//! Discrete-event simulation of lanup sites at fleet scale.
//!
//! Each simulated node runs the state machines the real node runs, from
//! `lanup-protocol`: the transfer scheduler ([`Transfer`]: which chunk from
//! which peer, rarest first, bans) and the fetcher election ([`Election`]).
//! What the real node gets from sockets and a clock, the simulator gives
//! them from a model, in simulated nanoseconds:
//!
//! * heartbeats every second, heard by every node of the site after the LAN
//!   latency; a node that stops sending them drops out of the election
//!   after [`Election::silent_ms`];
//! * the fetcher's manifest poll (one WAN round trip), its announcement and
//!   the peers' manifest request (LAN round trips);
//! * chunk lists asked of every peer every 250 ms, as the node does;
//! * transfers as flows sharing bandwidth: a flow from A to B gets
//!   `min(up(A) / flows out of A, down(B) / flows into B)`, recomputed
//!   whenever a flow starts or ends at either end; the origin is a source
//!   whose upload is the site's uplink, read by the fetcher when the node's
//!   own fetcher rules (`lanup_protocol::fetcher`: polls, waits, jobs,
//!   backoff) say so: one round trip, then every chunk no peer holds, one
//!   after the other as the node's pipelined Range requests bring them
//!   (cut-through: each chunk is offered to peers as it completes);
//! * assembling and checking the files once every chunk is there, at a
//!   fixed rate.
//!
//! Sites are independent (each has its own uplink), so they are simulated
//! one by one, on every core.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use lanup_protocol::election::{Candidate, Discovery, Election, HEARTBEAT_MS};
use lanup_protocol::transfer::{Limits, Transfer};
use lanup_protocol::Hash;
use serde::{Deserialize, Serialize};

pub mod fleet;
pub mod idle;
pub mod scenario;

/// Nanoseconds of simulated time.
pub type Ns = u64;

const MS: Ns = 1_000_000;
const SEC: Ns = 1_000_000_000;
/// The node's default poll interval (`poll_interval = "5m"`).
const POLL_INTERVAL_MS: u64 = 300_000;

use lanup_protocol::fetcher::{Job, OriginPlan, ReleaseView, Step, View};

/// What one simulated site is like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteModel {
    pub nodes: usize,
    /// The release's size in bytes.
    pub size: u64,
    /// The site's uplink from the origin, bytes per second.
    pub uplink: f64,
    /// Each node's LAN upload and download, bytes per second
    /// (`f64::INFINITY` for no limit).
    pub lan_up: f64,
    pub lan_down: f64,
    /// Each node's LAN rates are scaled by a factor drawn from
    /// `1 ± lan_jitter` (0 for identical nodes).
    pub lan_jitter: f64,
    /// One-way LAN latency of a message.
    pub latency: Ns,
    /// Round trip to the origin.
    pub wan_rtt: Ns,
    /// How often a node asks its peers for their new chunks; 0 for at once
    /// (a model without polling, for bounds).
    pub have_interval: Ns,
    /// Assembling and checking the files once all chunks are in, bytes
    /// per second.
    pub stage_rate: f64,
    /// Fraction of the release's chunks every node already holds (a delta
    /// release).
    pub shared: f64,
    /// Bytes over the uplink per byte of the chunks the site lacks: 1 for
    /// plain chunks, less where patches or packed chunks replace them
    /// (`lanup publish` prints it for each release; a rebuilt program
    /// with a patch is about 0.1). Peers still exchange whole chunks.
    pub wire: f64,
    /// Election timings: static peers or mDNS.
    pub mdns: bool,
    pub events: Vec<SiteEvent>,
}

impl Default for SiteModel {
    fn default() -> Self {
        SiteModel {
            nodes: 8,
            size: 64 << 20,
            uplink: 2e6,
            lan_up: 125e6,
            lan_down: 125e6,
            lan_jitter: 0.0,
            latency: MS / 5,
            wan_rtt: 50 * MS,
            have_interval: 250 * MS,
            stage_rate: 1e9,
            shared: 0.0,
            wire: 1.0,
            mdns: false,
            events: Vec::new(),
        }
    }
}

/// Something that happens to a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SiteEvent {
    /// The fetcher of the moment dies (kill -9, power cut) at `at`.
    FetcherDies { at: Ns },
    /// `nodes` more nodes start at `at`.
    Join { at: Ns, nodes: usize },
    /// `nodes` nodes serve corrupted chunks (they fetch like the others).
    BadPeers { nodes: usize },
}

/// What happened at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteResult {
    /// Bytes the origin sent to the site (partial transfers included).
    pub uplink_bytes: u64,
    /// The first announcement of the release, from the fetcher.
    pub announced_s: f64,
    /// From the announcement until every live node is staged.
    pub staged_s: f64,
    /// Times (from the start) a node became the site's fetcher, and which.
    pub fetchers: Vec<(f64, usize)>,
    /// Peers banned for bad chunks, as (time, banning node, bad node).
    pub bans: usize,
    /// Nodes that ended staged, of those alive at the end.
    pub staged_nodes: usize,
    pub live_nodes: usize,
    /// Bytes each node sent to its peers.
    pub served: Vec<u64>,
}

/// The lower bound on the time to have every node staged (performance
/// model): `max(S/W, S/d_min, N·S/(W + Σu))`.
pub fn bound_s(m: &SiteModel) -> f64 {
    let s = m.size as f64 * (1.0 - m.shared);
    let n = m.nodes as f64;
    let d_min = m.lan_down * (1.0 - m.lan_jitter);
    let sum_up = m.lan_up * n;
    let serve = if sum_up.is_infinite() {
        0.0
    } else {
        n * s / (m.uplink + sum_up)
    };
    (s * m.wire / m.uplink).max(s / d_min).max(serve)
}

/// Every node downloading the release itself through the site's uplink.
pub fn naive_s(m: &SiteModel) -> f64 {
    m.nodes as f64 * m.size as f64 / m.uplink
}

/// A small, fast, seeded generator (xorshift64*): sites must be
/// reproducible from their seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Chunk sizes as the content-defined chunker makes them: at least
/// `MIN_CHUNK`, at most `MAX_CHUNK`, `AVG_CHUNK` on average, adding up to
/// `size`.
pub fn chunk_sizes(size: u64, seed: u64) -> Vec<u64> {
    use lanup_protocol::chunk::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
    let (min, avg, max) = (MIN_CHUNK as f64, AVG_CHUNK as f64, MAX_CHUNK as u64);
    let mut rng = Rng::new(seed);
    let mut sizes = Vec::new();
    let mut left = size;
    while left > 0 {
        let draw = min - (avg - min) * (1.0 - rng.unit()).ln();
        let c = (draw as u64).clamp(MIN_CHUNK as u64, max).min(left);
        sizes.push(c);
        left -= c;
    }
    sizes
}

/// Node index; the origin is one more "node" after the site's.
type Idx = usize;

#[derive(Debug)]
struct Node {
    id: u64,
    up: f64,
    down: f64,
    start: Option<Ns>,
    alive: bool,
    bad: bool,
    last_heartbeat: Option<Ns>,
    transfer: Option<Transfer<Idx>>,
    adopted: Option<Ns>,
    /// Chunks held, in the order gained (what peers ask for).
    held: Vec<u32>,
    has: Vec<bool>,
    /// Per peer: how many of its chunks this node has heard of, and
    /// whether it answered since the release was adopted.
    since: Vec<u32>,
    answered: Vec<bool>,
    staged: Option<Ns>,
    /// The origin download under way (its epoch), if any.
    origin: Option<u64>,
    /// The fetcher's rules, the node's own (`lanup_protocol::fetcher`).
    plan: OriginPlan,
    was_fetcher: bool,
    /// Once settled, a node stays so: a peer joining later does not make
    /// the running fetcher pause (as in the node).
    settled: std::cell::Cell<bool>,
    served: f64,
    flows_out: Vec<usize>,
    flows_in: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Flow {
    src: Idx,
    dst: Idx,
    chunk: u32,
    size: f64,
    left: f64,
    rate: f64,
    at: Ns,
    version: u32,
    /// When the event queued for its end is due.
    due: Ns,
    live: bool,
    /// For origin flows: the download's chunks after this one, and its
    /// epoch.
    rest: Vec<u32>,
    epoch: u64,
}

#[derive(Debug)]
enum Ev {
    Start(Idx),
    Heartbeat(Idx),
    Adopt(Idx),
    HaveTick(Idx),
    HaveArrive(Idx, Vec<(Idx, Vec<u32>, u32)>),
    Begin(Idx, Idx, u32),
    OriginBegin(Idx, Vec<u32>, u64),
    /// A poll of the origin's manifest answered (a round trip after it
    /// was sent).
    PollDone(Idx, u64),
    FlowDone(usize, u32),
    Staged,
    FetcherDies,
}

/// An event's place in the queue: when it is due, the order it was pushed
/// in, and its slot in the event slab (the queue moves small entries).
#[derive(Debug)]
struct Due {
    at: Ns,
    seq: u64,
    slot: u32,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Sim<'m> {
    m: &'m SiteModel,
    election: Election,
    now: Ns,
    seq: u64,
    queue: BinaryHeap<Reverse<Due>>,
    slab: Vec<Option<Ev>>,
    free_slots: Vec<u32>,
    done: bool,
    nodes: Vec<Node>,
    origin: Idx,
    origin_up: f64,
    origin_flows: Vec<usize>,
    flows: Vec<Flow>,
    free_flows: Vec<usize>,
    scratch: Vec<usize>,
    sizes: Vec<u64>,
    hashes: Vec<Hash>,
    index: HashMap<Hash, u32>,
    uplink_bytes: f64,
    announced: Option<Ns>,
    fetchers: Vec<(f64, usize)>,
    bans: usize,
}

impl<'m> Sim<'m> {
    fn push(&mut self, at: Ns, ev: Ev) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(ev);
                slot
            }
            None => {
                self.slab.push(Some(ev));
                (self.slab.len() - 1) as u32
            }
        };
        self.queue.push(Reverse(Due {
            at,
            seq: self.seq,
            slot,
        }));
    }

    fn ms(&self) -> u64 {
        self.now / MS
    }

    fn live(&self, i: Idx) -> bool {
        self.nodes[i].alive && self.nodes[i].start.is_some()
    }

    /// ms since node `j`'s newest heartbeat reached the others.
    fn heard_ago(&self, j: Idx) -> Option<u64> {
        let sent = self.nodes[j].last_heartbeat?;
        let lat = self.m.latency;
        let arrived = if sent + lat <= self.now {
            sent + lat
        } else {
            (sent + lat).checked_sub(HEARTBEAT_MS * MS)?
        };
        (arrived <= self.now).then(|| (self.now - arrived) / MS)
    }

    /// Whether node `j` acts as the fetcher with a download from the
    /// origin under way (what its heartbeat says).
    fn downloading(&self, j: Idx) -> bool {
        let n = &self.nodes[j];
        n.was_fetcher && n.plan.running() == Some(Job::Download)
    }

    fn is_fetcher(&self, i: Idx) -> bool {
        let n = &self.nodes[i];
        let Some(start) = n.start else { return false };
        let lat = self.m.latency;
        let connected = (0..self.nodes.len())
            .filter(|&j| j != i && self.live(j))
            .map(|j| {
                let since = self
                    .now
                    .saturating_sub(start.max(self.nodes[j].start.unwrap_or(0)));
                (self.heard_ago(j), since / MS)
            });
        // Discovery answers a round trip after a node starts, or after a
        // peer that starts later appears.
        let last_found = (0..self.nodes.len())
            .filter(|&j| j != i && self.live(j))
            .filter_map(|j| self.nodes[j].start)
            .map(|s| s.max(start) + 2 * lat)
            .max()
            .unwrap_or(start + 2 * lat);
        let discovery = Discovery {
            pending: usize::from(last_found > self.now),
            quiet_ms: self.now.saturating_sub(last_found) / MS,
        };
        if !n.settled.get() {
            if !self
                .election
                .settled((self.now - start) / MS, discovery, connected)
            {
                return false;
            }
            n.settled.set(true);
        }
        // As in the node: a peer banned for bad chunks does not count.
        let now_ms = self.ms();
        let banned = |j: Idx| {
            n.transfer
                .as_ref()
                .is_some_and(|t| t.is_distrusted(&j, now_ms))
        };
        let others = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].start.is_some() && !banned(j))
            .filter_map(|j| {
                Some(Candidate {
                    id: self.nodes[j].id,
                    has_origin: true,
                    silent_ms: self.heard_ago(j)?,
                    failing: false,
                    suspected: false,
                    downloading: self.downloading(j),
                })
            });
        let me = Candidate {
            id: n.id,
            has_origin: true,
            silent_ms: 0,
            failing: false,
            suspected: false,
            downloading: self.downloading(i),
        };
        self.election.choose(std::iter::once(me).chain(others)) == Some(n.id)
    }

    /// Runs until every live node is staged, or `limit` of simulated time.
    fn run(&mut self, limit: Ns) {
        while let Some(Reverse(Due { at, slot, .. })) = self.queue.pop() {
            if at > limit || self.done {
                break;
            }
            let Some(ev) = self.slab[slot as usize].take() else {
                continue;
            };
            self.free_slots.push(slot);
            self.now = at;
            self.handle(ev);
        }
    }

    /// Every live node staged, and no join still to come.
    fn finished(&self) -> bool {
        let pending_join = self.nodes.iter().any(|n| n.start.is_none() && n.alive);
        !pending_join
            && self.announced.is_some()
            && self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .all(|n| n.staged.is_some_and(|s| s <= self.now))
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(i) => {
                self.nodes[i].start = Some(self.now);
                self.nodes[i].settled.set(false);
                self.push(self.now, Ev::Heartbeat(i));
            }
            Ev::Heartbeat(i) => {
                if !self.nodes[i].alive {
                    return;
                }
                self.nodes[i].last_heartbeat = Some(self.now);
                self.push(self.now + HEARTBEAT_MS * MS, Ev::Heartbeat(i));
                // A node holding the release re-announces it with its
                // heartbeat; those that lack it ask for the manifest.
                if self.nodes[i].adopted.is_some() {
                    let lat = self.m.latency;
                    for j in 0..self.nodes.len() {
                        if j != i && self.live(j) && self.nodes[j].adopted.is_none() {
                            self.nodes[j].adopted = Some(Ns::MAX);
                            self.push(self.now + 3 * lat, Ev::Adopt(j));
                        }
                    }
                }
                self.fetcher_duties(i);
            }
            Ev::Adopt(i) => self.adopt(i),
            Ev::HaveTick(i) => self.have_tick(i),
            Ev::HaveArrive(i, replies) => {
                if !self.nodes[i].alive {
                    return;
                }
                for (p, chunks, total) in replies {
                    if !self.nodes[p].alive {
                        continue;
                    }
                    let hashes: Vec<Hash> =
                        chunks.iter().map(|&c| self.hashes[c as usize]).collect();
                    let n = &mut self.nodes[i];
                    n.since[p] = total;
                    n.answered[p] = true;
                    if let Some(t) = &mut n.transfer {
                        t.peer_connected(p);
                        t.peer_has(&p, hashes);
                    }
                }
                self.resume_origin(i);
                self.schedule(i);
            }
            Ev::Begin(src, dst, chunk) => {
                if !self.nodes[dst].alive {
                    return;
                }
                if !self.nodes[src].alive {
                    let h = self.hashes[chunk as usize];
                    if let Some(t) = &mut self.nodes[dst].transfer {
                        t.failed(&src, &h);
                    }
                    self.schedule(dst);
                    return;
                }
                self.start_flow(src, dst, chunk, Vec::new(), 0);
            }
            Ev::PollDone(i, epoch) => {
                let now_ms = self.ms();
                if !self.nodes[i].alive || !self.nodes[i].plan.finished(epoch, true, now_ms, 0) {
                    return;
                }
                if self.nodes[i].adopted.is_none() {
                    self.nodes[i].adopted = Some(Ns::MAX);
                    self.adopt(i);
                } else {
                    self.resume_origin(i);
                }
            }
            Ev::OriginBegin(dst, mut chunks, epoch) => {
                if !self.nodes[dst].alive || self.nodes[dst].origin != Some(epoch) {
                    return;
                }
                let first = chunks.remove(0);
                self.start_flow(self.origin, dst, first, chunks, epoch);
            }
            Ev::FlowDone(f, version) => {
                if !self.flows[f].live || self.flows[f].version != version {
                    return;
                }
                self.retime_left(f);
                let fl = &mut self.flows[f];
                if fl.left > 0.5 {
                    // Slowed down since this event was queued.
                    fl.version += 1;
                    fl.due = self.now + flow_time(fl.left, fl.rate);
                    let (due, version) = (fl.due, fl.version);
                    self.push(due, Ev::FlowDone(f, version));
                    return;
                }
                self.finish_flow(f);
            }
            Ev::Staged => self.done = self.finished(),
            Ev::FetcherDies => {
                if let Some(f) =
                    (0..self.nodes.len()).find(|&i| self.live(i) && self.nodes[i].was_fetcher)
                {
                    self.kill(f);
                }
                self.done = self.finished();
            }
        }
    }

    fn fetcher_duties(&mut self, i: Idx) {
        let fetcher = self.is_fetcher(i);
        let n = &mut self.nodes[i];
        if fetcher != n.was_fetcher {
            n.was_fetcher = fetcher;
            if fetcher {
                let at = self.now as f64 / SEC as f64;
                self.fetchers.push((at, i));
            }
        }
        self.resume_origin(i);
    }

    fn adopt(&mut self, i: Idx) {
        if !self.nodes[i].alive {
            return;
        }
        if self.announced.is_none() {
            self.announced = Some(self.now);
        }
        let wanted: Vec<(Hash, u64)> = (0..self.sizes.len())
            .filter(|&c| !self.nodes[i].has[c])
            .map(|c| (self.hashes[c], self.sizes[c]))
            .collect();
        let mut t = Transfer::new(wanted, Limits::default()).with_order(self.nodes[i].id);
        for j in 0..self.nodes.len() {
            if j != i && self.live(j) {
                t.peer_connected(j);
            }
        }
        let done = t.is_done();
        let n = &mut self.nodes[i];
        n.transfer = Some(t);
        n.adopted = Some(self.now);
        if done {
            self.stage(i);
        } else if self.m.have_interval > 0 {
            self.push(self.now, Ev::HaveTick(i));
        } else {
            // Without polling: learn at once what every peer holds now
            // (nothing, from those without the release yet); later chunks
            // are pushed as they arrive.
            let replies: Vec<_> = (0..self.nodes.len())
                .filter(|&p| p != i && self.live(p))
                .map(|p| {
                    let peer = &self.nodes[p];
                    if peer.adopted.is_some_and(|a| a <= self.now) {
                        (p, peer.held.clone(), peer.held.len() as u32)
                    } else {
                        (p, Vec::new(), 0)
                    }
                })
                .collect();
            self.push(self.now + self.m.latency, Ev::HaveArrive(i, replies));
        }
        // Peers that adopted before now learn of this node's chunks.
        if self.m.have_interval == 0 {
            let held = self.nodes[i].held.clone();
            for p in 0..self.nodes.len() {
                if p != i && self.live(p) && self.nodes[p].transfer.is_some() {
                    let total = held.len() as u32;
                    self.push(
                        self.now + self.m.latency,
                        Ev::HaveArrive(p, vec![(i, held.clone(), total)]),
                    );
                }
            }
        }
        self.resume_origin(i);
    }

    fn have_tick(&mut self, i: Idx) {
        let n = &self.nodes[i];
        if !n.alive || n.transfer.as_ref().is_none_or(Transfer::is_done) {
            return;
        }
        let replies: Vec<_> = (0..self.nodes.len())
            .filter(|&p| p != i && self.live(p))
            .map(|p| {
                let peer = &self.nodes[p];
                if peer.adopted.is_some_and(|a| a <= self.now) {
                    let from = (n.since[p] as usize).min(peer.held.len());
                    (p, peer.held[from..].to_vec(), peer.held.len() as u32)
                } else {
                    (p, Vec::new(), n.since[p])
                }
            })
            .collect();
        self.push(self.now + 2 * self.m.latency, Ev::HaveArrive(i, replies));
        self.push(self.now + self.m.have_interval, Ev::HaveTick(i));
    }

    /// The node's fetcher rules decide: poll the origin (one round trip),
    /// download every chunk no peer holds (a round trip, then the chunks
    /// back to back, as the node's pipelined requests arrive), or stop.
    fn resume_origin(&mut self, i: Idx) {
        let n = &self.nodes[i];
        // Only a fetcher with nothing running has anything to decide (the
        // view below costs a look at every chunk).
        let idle = n.plan.running().is_none();
        if !n.alive || (!n.was_fetcher && idle) || (n.was_fetcher && !idle) {
            return;
        }
        let now_ms = self.ms();
        let live: Vec<Idx> = (0..self.nodes.len())
            .filter(|&p| p != i && self.live(p))
            .collect();
        let n = &self.nodes[i];
        let release = match (&n.transfer, n.adopted) {
            (Some(t), Some(adopted)) if adopted != Ns::MAX => Some(ReleaseView {
                lacking: !t.is_done() && !t.unavailable(now_ms).is_empty(),
                heard_all: live.iter().all(|&p| n.answered[p]),
                adopted_ms_ago: self.now.saturating_sub(adopted) / MS,
                blocked: false,
            }),
            _ => None,
        };
        let view = View {
            acting: n.was_fetcher,
            release,
        };
        match self.nodes[i].plan.step(now_ms, &view) {
            Step::Idle => {}
            Step::Stop(_) => {
                if let Some(epoch) = self.nodes[i].origin.take() {
                    self.cancel_origin(i, epoch);
                }
            }
            Step::Start(epoch, Job::Poll) => {
                self.push(self.now + self.m.wan_rtt, Ev::PollDone(i, epoch));
            }
            Step::Start(epoch, Job::Download) => {
                let Some(t) = &self.nodes[i].transfer else {
                    return;
                };
                let mut missing: Vec<u32> = t
                    .unavailable(now_ms)
                    .iter()
                    .filter_map(|h| self.index.get(h).copied())
                    .collect();
                missing.sort_unstable();
                if missing.is_empty() {
                    self.nodes[i].plan.finished(epoch, true, now_ms, 0);
                    return;
                }
                self.nodes[i].origin = Some(epoch);
                self.push(
                    self.now + self.m.wan_rtt,
                    Ev::OriginBegin(i, missing, epoch),
                );
            }
        }
    }

    fn cancel_origin(&mut self, i: Idx, epoch: u64) {
        let flows: Vec<usize> = self.nodes[i]
            .flows_in
            .iter()
            .copied()
            .filter(|&f| self.flows[f].src == self.origin && self.flows[f].epoch == epoch)
            .collect();
        for f in flows {
            self.end_flow(f);
        }
    }

    fn schedule(&mut self, i: Idx) {
        let now_ms = self.ms();
        let Some(t) = self.nodes[i].transfer.as_mut() else {
            return;
        };
        let (requests, _expired) = t.poll(now_ms);
        for r in requests {
            let chunk = self.index[&r.hash];
            self.push(self.now + self.m.latency, Ev::Begin(r.peer, i, chunk));
        }
    }

    fn rate(&self, f: &Flow) -> f64 {
        let up = if f.src == self.origin {
            self.origin_up / self.origin_flows.len().max(1) as f64
        } else {
            self.nodes[f.src].up / self.nodes[f.src].flows_out.len().max(1) as f64
        };
        let down = self.nodes[f.dst].down / self.nodes[f.dst].flows_in.len().max(1) as f64;
        up.min(down)
    }

    /// Brings flow `f` up to now and gives it its current rate.
    fn retime(&mut self, f: usize) {
        let rate = self.rate(&self.flows[f]);
        let now = self.now;
        self.retime_left(f);
        let fl = &mut self.flows[f];
        fl.rate = rate;
        let end = now + flow_time(fl.left, rate);
        // A later end is found when the queued event comes; only a sooner
        // one needs an event of its own.
        if end < fl.due {
            fl.version += 1;
            fl.due = end;
            let version = fl.version;
            self.push(end, Ev::FlowDone(f, version));
        }
    }

    /// Retimes every flow out of `src` and into `dst` (a flow between
    /// the two is retimed twice, which changes nothing).
    fn retime_ends(&mut self, src: Idx, dst: Idx) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        if src == self.origin {
            scratch.extend(&self.origin_flows);
        } else {
            scratch.extend(&self.nodes[src].flows_out);
        }
        scratch.extend(&self.nodes[dst].flows_in);
        for &g in &scratch {
            self.retime(g);
        }
        self.scratch = scratch;
    }

    fn start_flow(&mut self, src: Idx, dst: Idx, chunk: u32, rest: Vec<u32>, epoch: u64) {
        let wire = if src == self.origin { self.m.wire } else { 1.0 };
        let size = self.sizes[chunk as usize] as f64 * wire;
        let flow = Flow {
            src,
            dst,
            chunk,
            size,
            left: size,
            rate: 0.0,
            at: self.now,
            version: 0,
            due: Ns::MAX,
            live: true,
            rest,
            epoch,
        };
        let f = match self.free_flows.pop() {
            Some(f) => {
                let version = self.flows[f].version;
                self.flows[f] = Flow { version, ..flow };
                f
            }
            None => {
                self.flows.push(flow);
                self.flows.len() - 1
            }
        };
        if src == self.origin {
            self.origin_flows.push(f);
        } else {
            self.nodes[src].flows_out.push(f);
        }
        self.nodes[dst].flows_in.push(f);
        self.retime_ends(src, dst);
    }

    /// Removes flow `f` (done or cut), counting origin bytes, and retimes
    /// the flows that shared its ends.
    fn end_flow(&mut self, f: usize) {
        self.retime_left(f);
        let fl = &mut self.flows[f];
        fl.live = false;
        fl.version += 1;
        let (src, dst) = (fl.src, fl.dst);
        let sent = fl.size - fl.left;
        if src == self.origin {
            self.uplink_bytes += sent;
            self.origin_flows.retain(|&g| g != f);
        } else {
            self.nodes[src].served += sent;
            self.nodes[src].flows_out.retain(|&g| g != f);
        }
        self.nodes[dst].flows_in.retain(|&g| g != f);
        self.free_flows.push(f);
        self.retime_ends(src, dst);
    }

    fn retime_left(&mut self, f: usize) {
        let now = self.now;
        let fl = &mut self.flows[f];
        if fl.rate.is_infinite() {
            fl.left = 0.0;
        } else if fl.rate > 0.0 {
            fl.left = (fl.left - fl.rate * (now - fl.at) as f64 / SEC as f64).max(0.0);
        }
        fl.at = now;
    }

    fn finish_flow(&mut self, f: usize) {
        self.retime_left(f);
        self.flows[f].left = 0.0;
        let Flow {
            src,
            dst,
            chunk,
            ref rest,
            epoch,
            ..
        } = self.flows[f];
        let rest = rest.clone();
        self.end_flow(f);
        let h = self.hashes[chunk as usize];
        if src == self.origin {
            if let Some(t) = &mut self.nodes[dst].transfer {
                t.obtained(&h);
            }
            self.gain(dst, chunk);
            if rest.is_empty() {
                if self.nodes[dst].origin == Some(epoch) {
                    self.nodes[dst].origin = None;
                    let now_ms = self.ms();
                    self.nodes[dst].plan.finished(epoch, true, now_ms, 0);
                }
                self.resume_origin(dst);
            } else if self.nodes[dst].origin == Some(epoch) {
                let mut rest = rest;
                let next = rest.remove(0);
                self.start_flow(self.origin, dst, next, rest, epoch);
            }
            self.schedule(dst);
            return;
        }
        if self.nodes[src].bad {
            // The chunk does not match its hash: the peer is banned and
            // disconnected, what was in flight to it is asked elsewhere.
            self.bans += 1;
            let now_ms = self.ms();
            if let Some(t) = &mut self.nodes[dst].transfer {
                t.corrupt(&src, &h, now_ms);
                t.peer_disconnected(&src);
            }
            let cut: Vec<usize> = self.nodes[dst]
                .flows_in
                .iter()
                .copied()
                .filter(|&g| self.flows[g].src == src)
                .collect();
            for g in cut {
                self.end_flow(g);
            }
        } else {
            if let Some(t) = &mut self.nodes[dst].transfer {
                t.delivered(&src, &h);
            }
            self.gain(dst, chunk);
        }
        self.schedule(dst);
    }

    /// Node `i` now holds `chunk`.
    fn gain(&mut self, i: Idx, chunk: u32) {
        let n = &mut self.nodes[i];
        if n.has[chunk as usize] {
            return;
        }
        n.has[chunk as usize] = true;
        n.held.push(chunk);
        let total = n.held.len() as u32;
        if n.transfer.as_ref().is_some_and(Transfer::is_done) {
            self.stage(i);
        }
        if self.m.have_interval == 0 {
            for p in 0..self.nodes.len() {
                if p != i
                    && self.live(p)
                    && self.nodes[p]
                        .transfer
                        .as_ref()
                        .is_some_and(|t| !t.is_done())
                {
                    self.push(
                        self.now + self.m.latency,
                        Ev::HaveArrive(p, vec![(i, vec![chunk], total)]),
                    );
                }
            }
        }
    }

    fn stage(&mut self, i: Idx) {
        if self.nodes[i].staged.is_some() {
            return;
        }
        let dt = if self.m.stage_rate.is_infinite() {
            0
        } else {
            (self.m.size as f64 / self.m.stage_rate * SEC as f64) as Ns
        };
        self.nodes[i].staged = Some(self.now + dt);
        self.push(self.now + dt, Ev::Staged);
    }

    fn kill(&mut self, i: Idx) {
        self.nodes[i].alive = false;
        let flows: Vec<usize> = self.nodes[i]
            .flows_in
            .iter()
            .chain(&self.nodes[i].flows_out)
            .copied()
            .collect();
        for f in flows {
            if self.flows[f].live {
                self.end_flow(f);
            }
        }
        for j in 0..self.nodes.len() {
            if j != i && self.live(j) {
                if let Some(t) = &mut self.nodes[j].transfer {
                    t.peer_disconnected(&i);
                }
                self.schedule(j);
            }
        }
    }
}

/// Nanoseconds to move `bytes` at `rate` bytes per second.
fn flow_time(bytes: f64, rate: f64) -> Ns {
    if rate.is_infinite() || bytes <= 0.0 {
        0
    } else {
        (bytes / rate * SEC as f64).ceil() as Ns
    }
}

/// Simulates one site from `seed` (node ids, jitter, chunk sizes).
pub fn simulate_site(m: &SiteModel, seed: u64) -> SiteResult {
    let mut rng = Rng::new(seed);
    let sizes = chunk_sizes(m.size, 0x5eed);
    let hashes: Vec<Hash> = (0..sizes.len() as u64)
        .map(|c| Hash::of(&c.to_le_bytes()))
        .collect();
    let index = hashes
        .iter()
        .enumerate()
        .map(|(c, h)| (*h, c as u32))
        .collect();
    let joins: Vec<(Ns, usize)> = m
        .events
        .iter()
        .filter_map(|e| match e {
            SiteEvent::Join { at, nodes } => Some((*at, *nodes)),
            _ => None,
        })
        .collect();
    let bad: usize = m
        .events
        .iter()
        .map(|e| match e {
            SiteEvent::BadPeers { nodes } => *nodes,
            _ => 0,
        })
        .sum();
    let total = m.nodes + joins.iter().map(|j| j.1).sum::<usize>();
    let shared = (sizes.len() as f64 * m.shared).round() as usize;
    let nodes: Vec<Node> = (0..total)
        .map(|i| {
            let scale = 1.0 + m.lan_jitter * (2.0 * rng.unit() - 1.0);
            let mut has = vec![false; sizes.len()];
            // The shared chunks are spread over the release.
            let held: Vec<u32> = (0..shared)
                .map(|k| (k * sizes.len() / shared.max(1)) as u32)
                .collect();
            for &c in &held {
                has[c as usize] = true;
            }
            Node {
                id: rng.next_u64(),
                up: m.lan_up * scale,
                down: m.lan_down * scale,
                start: None,
                alive: true,
                // The bad ones are the last of the first wave of nodes.
                bad: i >= m.nodes.saturating_sub(bad) && i < m.nodes,
                last_heartbeat: None,
                transfer: None,
                adopted: None,
                held,
                has,
                since: vec![0; total],
                answered: vec![false; total],
                staged: None,
                origin: None,
                was_fetcher: false,
                settled: Default::default(),
                plan: OriginPlan::new(POLL_INTERVAL_MS),
                served: 0.0,
                flows_out: Vec::new(),
                flows_in: Vec::new(),
            }
        })
        .collect();
    let mut sim = Sim {
        m,
        election: if m.mdns {
            Election::MDNS
        } else {
            Election::STATIC_PEERS
        },
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        slab: Vec::new(),
        free_slots: Vec::new(),
        done: false,
        origin: total,
        origin_up: m.uplink,
        origin_flows: Vec::new(),
        nodes,
        flows: Vec::new(),
        free_flows: Vec::new(),
        scratch: Vec::new(),
        sizes,
        hashes,
        index,
        uplink_bytes: 0.0,
        announced: None,
        fetchers: Vec::new(),
        bans: 0,
    };
    // Nodes come up within the first 100 ms, in no particular order.
    for i in 0..m.nodes {
        let at = (rng.unit() * 100.0 * MS as f64) as Ns;
        sim.push(at, Ev::Start(i));
    }
    let mut next = m.nodes;
    for (at, n) in joins {
        for i in next..next + n {
            sim.push(at, Ev::Start(i));
        }
        next += n;
    }
    for e in &m.events {
        if let SiteEvent::FetcherDies { at } = e {
            sim.push(*at, Ev::FetcherDies);
        }
    }
    // Far beyond any sensible outcome: a site that stalls ends here.
    let limit = (20.0 * naive_s(m) * SEC as f64) as Ns + 600 * SEC;
    sim.run(limit);
    let announced = sim.announced.unwrap_or(0);
    let live: Vec<&Node> = sim.nodes.iter().filter(|n| n.alive).collect();
    let end = live
        .iter()
        .filter_map(|n| n.staged)
        .max()
        .unwrap_or(announced);
    SiteResult {
        uplink_bytes: sim.uplink_bytes.round() as u64,
        announced_s: announced as f64 / SEC as f64,
        staged_s: end.saturating_sub(announced) as f64 / SEC as f64,
        fetchers: sim.fetchers,
        bans: sim.bans,
        staged_nodes: live.iter().filter(|n| n.staged.is_some()).count(),
        live_nodes: live.len(),
        served: sim.nodes.iter().map(|n| n.served.round() as u64).collect(),
    }
}

/// The whole fleet: `sites` sites like `m`, each drawn from its own seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub sites: usize,
    pub nodes_per_site: usize,
    pub size: u64,
    /// Median over sites.
    pub uplink_bytes_per_site: u64,
    pub uplink_bytes_max: u64,
    pub staged_p50_s: f64,
    pub staged_p99_s: f64,
    pub bound_s: f64,
    pub naive_s: f64,
    /// Sites where not every live node staged (should be none).
    pub unfinished_sites: usize,
    /// The first site in full.
    pub first_site: SiteResult,
    /// Wall-clock seconds the simulation took.
    pub wall_s: f64,
}

/// Simulates `sites` sites on every core.
pub fn simulate_fleet(m: &SiteModel, sites: usize, seed: u64) -> Report {
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(sites.max(1));
    let mut results: Vec<(usize, SiteResult)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..sites)
                        .step_by(threads)
                        .map(|s| {
                            (
                                s,
                                simulate_site(m, seed ^ (s as u64).wrapping_mul(0x1000_0001)),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    results.sort_by_key(|(s, _)| *s);
    let mut staged: Vec<f64> = results.iter().map(|(_, r)| r.staged_s).collect();
    staged.sort_by(f64::total_cmp);
    let mut uplink: Vec<u64> = results.iter().map(|(_, r)| r.uplink_bytes).collect();
    uplink.sort_unstable();
    let pick = |q: f64| -> usize { ((staged.len() as f64 - 1.0) * q).round() as usize };
    Report {
        sites,
        nodes_per_site: m.nodes,
        size: m.size,
        uplink_bytes_per_site: uplink.get(uplink.len() / 2).copied().unwrap_or(0),
        uplink_bytes_max: uplink.last().copied().unwrap_or(0),
        staged_p50_s: staged.get(pick(0.5)).copied().unwrap_or(0.0),
        staged_p99_s: staged.get(pick(0.99)).copied().unwrap_or(0.0),
        bound_s: bound_s(m),
        naive_s: naive_s(m),
        unfinished_sites: results
            .iter()
            .filter(|(_, r)| r.staged_nodes < r.live_nodes)
            .count(),
        first_site: results
            .into_iter()
            .next()
            .map(|(_, r)| r)
            .unwrap_or_else(|| simulate_site(m, seed)),
        wall_s: started.elapsed().as_secs_f64(),
    }
}
