//! Benchmark: chunk throughput between two nodes' swarms on loopback, one
//! chunk stream at a time and with the four in flight a node uses per peer.
//! Each chunk is read and re-checked by the server, and checked and stored by
//! the receiver, as in a real transfer.
//!
//!   cargo run --release -p lanup-node --example chunk_stream [MIB]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::stream::{self, StreamExt};
use lanup_node::chunks;
use lanup_node::network::{Network, NetworkConfig, NetworkEvent, CHUNK_PROTOCOL};
use lanup_node::store::ChunkStore;
use lanup_node::throttle::Throttle;
use lanup_protocol::chunk::Chunk;
use lanup_protocol::sign::SecretKey;
use lanup_protocol::Hash;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LANUP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(256);
    let dir = tempfile::tempdir()?;
    let (server_store, client_root) = (
        ChunkStore::open(&dir.path().join("server"))?,
        dir.path().join("client"),
    );
    // 1 MiB chunks (the average size) of incompressible bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunks = Vec::new();
    for _ in 0..mib {
        let data: Vec<u8> = (0..(1 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        let chunk = Chunk {
            size: data.len() as u64,
            hash: Hash::of(&data),
        };
        server_store.put(&chunk, &data)?;
        chunks.push(chunk);
    }

    let (server_net, server, _server_events) = Network::new(
        SecretKey::generate().to_libp2p(),
        NetworkConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            peers: vec![],
            psk: None,
            mdns: false,
            state: None,
        },
    )?;
    tokio::spawn(server_net.run());
    let incoming = server.streams().accept(CHUNK_PROTOCOL)?;
    // Damaged chunks would be reported here; the example's store is fresh.
    let (damaged, _) = tokio::sync::mpsc::channel(1);
    tokio::spawn(chunks::serve(
        incoming,
        server_store,
        Throttle::default(),
        damaged,
        lanup_node::metrics::Metrics::new(),
        // Everyone is admitted: the example has no site.
        tokio::sync::watch::channel(lanup_node::membership::Admission::default()).1,
    ));
    let mut addr = None;
    for _ in 0..100 {
        addr = server.listen_addrs().await?.into_iter().next();
        if addr.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = addr.context("server has no address")?;
    let (client_net, client, mut events) = Network::new(
        SecretKey::generate().to_libp2p(),
        NetworkConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            peers: vec![addr.with(libp2p::multiaddr::Protocol::P2p(server.local_peer_id()))],
            psk: None,
            mdns: false,
            state: None,
        },
    )?;
    tokio::spawn(client_net.run());
    let peer = server.local_peer_id();
    while let Some(e) = events.recv().await {
        if matches!(e, NetworkEvent::PeerConnected(p) if p == peer) {
            break;
        }
    }

    for in_flight in [1usize, 4] {
        let root = client_root.join(in_flight.to_string());
        let store = ChunkStore::open(&root)?;
        let start = Instant::now();
        let results: Vec<_> = stream::iter(chunks.iter().copied())
            .map(|chunk| chunks::fetch(client.streams(), peer, chunk, store.clone()))
            .buffer_unordered(in_flight)
            .collect()
            .await;
        let secs = start.elapsed().as_secs_f64();
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if let Some(e) = failed.first() {
            anyhow::bail!("{} chunks failed, the first: {e}", failed.len());
        }
        println!(
            "{in_flight} stream(s) in flight: {mib} MiB in {secs:.2} s = {:.0} MiB/s",
            mib as f64 / secs
        );
    }
    Ok(())
}
