//! What a site at rest costs each node, modelled: the keep-alives the whole
//! site sends ([`lanup_protocol::cadence`], the node's own rules), the
//! copies of each that reach a node over the gossip mesh, and the CPU and
//! LAN bytes those copies cost, beside the cost of a node that hears no
//! one. The per-copy and per-connection costs are calibrated on this
//! machine by `tests/bench/idle.sh` (see [`Costs::MEASURED`]); the model
//! then predicts sites the testbed does not hold (256, 500 nodes), and the
//! gossip every node sent before (a heartbeat a second, passed on to every
//! connected peer).

use lanup_protocol::cadence::{self, Doing};
use serde::Serialize;

/// Gossip mesh peers each node passes a message to (the node's `MESH_N`).
pub const MESH_N: u64 = 6;

/// Connections of a node at a site whose nodes know two bootstrap nodes
/// (the node seeks 8, and others seek it).
pub const SEEKING: u64 = 12;

/// How the nodes of a site are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Topology {
    /// Every node knows two bootstrap nodes by address.
    Star,
    /// Every node is connected to every other (mDNS on a LAN).
    Full,
}

/// What one node pays, measured on this machine.
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    /// CPU a node at rest uses hearing no one (timers, housekeeping), in
    /// percent of a core.
    pub base_cpu_pct: f64,
    /// CPU per gossip copy received (decoding, a signature check, the
    /// node's handling), in microseconds.
    pub per_copy_us: f64,
    /// CPU per connection a second (pings, the mesh's upkeep), in
    /// microseconds.
    pub per_connection_us: f64,
    /// Bytes of one heartbeat on the wire (JSON, gossip envelope and
    /// signature, framing).
    pub copy_bytes: f64,
    /// LAN bytes a second per connection (pings, gossip control).
    pub per_connection_bytes: f64,
}

impl Costs {
    /// Calibrated by `tests/bench/idle.sh` on the build machine (release
    /// build, loopback): the base from 8 nodes, the per-copy cost from the
    /// flooding gossip of 32 fully connected nodes before the change, the
    /// per-connection cost from 64 fully connected nodes after it, the
    /// bytes from 32 of them.
    pub const MEASURED: Costs = Costs {
        base_cpu_pct: 0.45,
        per_copy_us: 60.0,
        per_connection_us: 90.0,
        copy_bytes: 900.0,
        per_connection_bytes: 40.0,
    };
}

/// The model's answer for one site.
#[derive(Debug, Clone, Serialize)]
pub struct IdleCost {
    pub nodes: u64,
    pub topology: Topology,
    /// A node's keep-alive cadence, ms.
    pub every_ms: u64,
    /// Keep-alives the whole site sends a second.
    pub site_rate: f64,
    /// Copies of heartbeats a typical node receives a second.
    pub copies_per_node: f64,
    pub cpu_pct_per_node: f64,
    pub cpu_pct_busiest: f64,
    pub lan_bytes_per_node: f64,
}

/// Connections of a typical node and of the busiest one.
/// `seeking`: nodes dial the nodes they hear of (lanup now; before, a
/// node that knew two bootstrap nodes stayed with them).
fn degrees(nodes: u64, topology: Topology, seeking: bool) -> (u64, u64) {
    match topology {
        // A node that knows two bootstrap nodes dials nodes it hears of
        // until it has 8 peers, and is dialled by some: about 12.
        Topology::Star if seeking => (SEEKING.min(nodes - 1), nodes - 1),
        Topology::Star => (2.min(nodes - 1), nodes - 1),
        Topology::Full => (nodes - 1, nodes - 1),
    }
}

/// A site of `nodes` at rest, as lanup runs it now.
pub fn at_rest(nodes: u64, topology: Topology, costs: Costs) -> IdleCost {
    let nodes = nodes.max(2);
    // Each distinct message reaches a node once from each mesh peer that
    // passes it on, at most MESH_N of them.
    cost(
        nodes,
        topology,
        costs,
        cadence::every_ms(Doing::AtRest, nodes),
        true,
        |degree| degree.min(MESH_N),
    )
}

/// A site of `nodes` at rest as lanup ran it before: a heartbeat a second
/// from every node, passed on to every connected peer.
pub fn flooding(nodes: u64, topology: Topology, costs: Costs) -> IdleCost {
    let nodes = nodes.max(2);
    cost(
        nodes,
        topology,
        costs,
        lanup_protocol::election::HEARTBEAT_MS,
        false,
        |degree| degree,
    )
}

/// What a site whose nodes beat every `every_ms` costs, when a node with
/// `degree` connections receives `copies(degree)` copies of each message
/// (`seeking`: see [`degrees`]).
fn cost(
    nodes: u64,
    topology: Topology,
    costs: Costs,
    every_ms: u64,
    seeking: bool,
    copies: impl Fn(u64) -> u64,
) -> IdleCost {
    let site_rate = nodes as f64 * 1000.0 / every_ms as f64;
    let (typical, busiest) = degrees(nodes, topology, seeking);
    let received = |degree: u64| site_rate * copies(degree) as f64;
    let cpu = |degree: u64| {
        costs.base_cpu_pct
            + (received(degree) * costs.per_copy_us + degree as f64 * costs.per_connection_us)
                / 10_000.0
    };
    IdleCost {
        nodes,
        topology,
        every_ms,
        site_rate,
        copies_per_node: received(typical),
        cpu_pct_per_node: cpu(typical),
        cpu_pct_busiest: cpu(busiest),
        lan_bytes_per_node: received(typical) * costs.copy_bytes
            + typical as f64 * costs.per_connection_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_at_rest_stops_growing_once_the_site_outgrows_its_keep_alive_budget() {
        let c = Costs::MEASURED;
        let at = |n| at_rest(n, Topology::Full, c).cpu_pct_per_node;
        // Beyond 40 nodes the site's keep-alives are spread: a node's
        // copies stop growing, only its connections add.
        let copies = |n| at_rest(n, Topology::Full, c).copies_per_node;
        assert_eq!(copies(64), copies(480));
        // What still grows is a node's connections: a small constant each.
        let per_peer = (at(480) - at(64)) / (480.0 - 64.0);
        assert!(per_peer < 0.01, "{per_peer} % per peer");
        // Before, a full site's cost grew with the square of its size.
        let before = |n| flooding(n, Topology::Full, c).cpu_pct_per_node;
        assert!(before(64) > 10.0 * at(64), "{} vs {}", before(64), at(64));
        assert!(
            before(128) > 50.0 * at(128),
            "{} vs {}",
            before(128),
            at(128)
        );
    }
}
