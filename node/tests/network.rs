//! Two swarms on loopback with a static peer: they connect, gossip reaches
//! the other side, a request gets its answer, and a raw stream carries bytes.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{AsyncReadExt, AsyncWriteExt, StreamExt};
use lanup_node::network::{Network, NetworkClient, NetworkConfig, NetworkEvent, CHUNK_PROTOCOL};
use lanup_protocol::wire::{Request, Response};
use lanup_protocol::Hash;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use tokio::sync::mpsc;

async fn start(
    peers: Vec<Multiaddr>,
) -> Result<(NetworkClient, mpsc::Receiver<NetworkEvent>, Multiaddr)> {
    let (network, client, events) = Network::new(
        Keypair::generate_ed25519(),
        NetworkConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            peers,
            psk: None,
            mdns: false,
            state: None,
        },
    )?;
    tokio::spawn(network.run());
    let mut addr = None;
    for _ in 0..50 {
        if let Some(a) = client.listen_addrs().await?.into_iter().next() {
            addr = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = addr.context("no listen address")?;
    let with_id = addr.with(libp2p::multiaddr::Protocol::P2p(client.local_peer_id()));
    Ok((client, events, with_id))
}

async fn next<T>(events: &mut mpsc::Receiver<T>, mut pick: impl FnMut(&T) -> bool) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.context("event stream ended")?;
            if pick(&e) {
                return Ok(e);
            }
        }
    })
    .await
    .context("timed out waiting for an event")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_connect_gossip_ask_and_stream() -> Result<()> {
    let (a, mut a_events, a_addr) = start(vec![]).await?;
    let (b, mut b_events, _) = start(vec![a_addr]).await?;
    next(
        &mut a_events,
        |e| matches!(e, NetworkEvent::PeerConnected(p) if *p == b.local_peer_id()),
    )
    .await?;
    next(
        &mut b_events,
        |e| matches!(e, NetworkEvent::PeerConnected(p) if *p == a.local_peer_id()),
    )
    .await?;

    // Gossip: publishing fails until the subscription has crossed; retry.
    a.subscribe("lanup/test/announce").await?;
    b.subscribe("lanup/test/announce").await?;
    let mut published = false;
    for _ in 0..100 {
        if b.publish("lanup/test/announce", b"hello site".to_vec())
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "gossip never found a subscribed peer");
    let NetworkEvent::Gossip {
        from,
        id,
        data,
        topic,
        ..
    } = next(&mut a_events, |e| matches!(e, NetworkEvent::Gossip { .. })).await?
    else {
        unreachable!()
    };
    assert_eq!(
        (data.as_slice(), topic.as_str(), from),
        (&b"hello site"[..], "lanup/test/announce", b.local_peer_id())
    );
    a.validate(id, from, libp2p::gossipsub::MessageAcceptance::Accept)
        .await?;

    // Request/response: b asks a, a answers.
    let hash = Hash::of(b"manifest");
    let asker = {
        let b = b.clone();
        let peer = a.local_peer_id();
        tokio::spawn(async move {
            b.request(
                peer,
                Request::Have {
                    manifest_hash: hash,
                    since: 0,
                },
            )
            .await
        })
    };
    let NetworkEvent::Request {
        request, channel, ..
    } = next(&mut a_events, |e| matches!(e, NetworkEvent::Request { .. })).await?
    else {
        unreachable!()
    };
    assert_eq!(
        request,
        Request::Have {
            manifest_hash: hash,
            since: 0,
        }
    );
    a.respond(
        channel,
        Response::Have {
            chunks: vec![hash],
            total: 1,
        },
    )
    .await?;
    assert_eq!(
        asker.await??,
        Response::Have {
            chunks: vec![hash],
            total: 1
        }
    );

    // A raw stream carries a chunk-sized body.
    let mut incoming = a.streams().accept(CHUNK_PROTOCOL)?;
    let body: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let sender = {
        let mut control = b.streams();
        let peer = a.local_peer_id();
        let body = body.clone();
        tokio::spawn(async move {
            let mut s = control
                .open_stream(peer, CHUNK_PROTOCOL)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            s.write_all(&body).await?;
            s.close().await?;
            anyhow::Ok(())
        })
    };
    let (_, mut stream) = tokio::time::timeout(Duration::from_secs(20), incoming.next())
        .await?
        .context("no inbound stream")?;
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await?;
    sender.await??;
    assert_eq!(got, body);
    Ok(())
}
