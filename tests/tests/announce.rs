//! Announcements a node must refuse, sent by a lying peer: a release signed
//! by a key the node does not trust, a signature that does not match the
//! manifest, an expired release, and one older than what the node has. The
//! liar is a libp2p peer in this test process (lanup's own network code
//! speaking lanup's protocol with made-up content); the node under test is a
//! real `lanup node` process, and a third node behind it shows what it
//! forwards.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lanup_node::network::{Network, NetworkConfig, NetworkEvent};
use lanup_protocol::sign::SecretKey;
use lanup_protocol::wire::{Announce, Request, Response};
use lanup_protocol::Hash;

use crate::common::*;
use crate::swarm::free_port;

/// A published manifest and its signature text.
#[derive(Clone)]
struct Signed {
    version: &'static str,
    xml: Vec<u8>,
    sig: String,
}

fn published(app: &Path, out: &Path, version: &'static str, key: &Path, extra: &[&str]) -> Signed {
    let mut args = vec![
        "publish",
        "--dir",
        s(app),
        "--version",
        version,
        "--app",
        "app",
        "--url",
        "http://origin.invalid/",
        "--key",
        s(key),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    run_ok(&args);
    Signed {
        version,
        xml: std::fs::read(out.join("AutoUpdater.xml")).expect("manifest"),
        sig: std::fs::read_to_string(out.join("AutoUpdater.xml.sig")).expect("signature"),
    }
}

/// Whether some line of `log` contains every one of `words`.
fn logged(log: &str, words: &[&str]) -> bool {
    log.lines().any(|l| words.iter().all(|w| l.contains(w)))
}

#[test]
fn a_node_refuses_and_does_not_forward_bad_announcements() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(300_000, 81));
    let (trusted_key, trusted) = keygen(tmp.path(), "trusted.key");
    let (stranger_key, _) = keygen(tmp.path(), "stranger.key");
    let dir = |name: &str| tmp.path().join(name);

    let untrusted = published(&app, &dir("u"), "6.6.6", &stranger_key, &[]);
    // Published with a date to come (publish refuses a past one), then
    // backdated by hand and signed again with the trusted key.
    let expired = {
        let out = dir("e");
        published(
            &app,
            &out,
            "7.7.7",
            &trusted_key,
            &["--expires", "2999-01-01"],
        );
        let manifest = out.join("AutoUpdater.xml");
        let xml = std::fs::read_to_string(&manifest).expect("manifest");
        assert!(xml.contains("2999-01-01"), "{xml}");
        std::fs::write(&manifest, xml.replace("2999-01-01", "2020-01-01")).expect("backdate");
        run_ok(&["sign", "--key", s(&trusted_key), s(&manifest)]);
        Signed {
            version: "7.7.7",
            xml: std::fs::read(&manifest).expect("manifest"),
            sig: std::fs::read_to_string(out.join("AutoUpdater.xml.sig")).expect("signature"),
        }
    };
    let good = published(&app, &dir("g"), "2.0", &trusted_key, &[]);
    let old = published(&app, &dir("o"), "1.0", &trusted_key, &[]);
    let other = published(&app, &dir("b"), "3.3.3", &trusted_key, &[]);
    // 3.3.3's manifest with 2.0's signature: a trusted key, the wrong bytes.
    let forged = Signed {
        version: "3.3.3",
        xml: other.xml.clone(),
        sig: good.sig.clone(),
    };

    let Liar {
        rt,
        net: liar,
        mut events,
        port: liar_port,
    } = Liar::start();
    let liar_id = liar.local_peer_id().to_string();
    let site = format!("liars-{}", std::process::id());
    let topic = format!("lanup/{site}/announce");
    rt.block_on(liar.subscribe(&topic)).expect("subscribe");

    // The liar answers manifest requests with whatever it announced, and
    // notes what it was asked for.
    let manifests: Arc<Mutex<HashMap<Hash, Signed>>> = Arc::default();
    let asked: Arc<Mutex<Vec<Hash>>> = Arc::default();
    {
        let (manifests, asked, liar) = (manifests.clone(), asked.clone(), liar.clone());
        rt.spawn(async move {
            while let Some(event) = events.recv().await {
                if let NetworkEvent::Request {
                    request, channel, ..
                } = event
                {
                    let response = match request {
                        Request::Manifest { manifest_hash } => {
                            asked.lock().expect("lock").push(manifest_hash);
                            match manifests.lock().expect("lock").get(&manifest_hash) {
                                Some(m) => Response::Manifest {
                                    xml: m.xml.clone(),
                                    signature: m.sig.clone(),
                                },
                                None => Response::Unknown,
                            }
                        }
                        _ => Response::Unknown,
                    };
                    let _ = liar.respond(channel, response).await;
                }
            }
        });
    }

    // The node under test, and a bystander that hears only through it.
    let (victim_port, bystander_port) = (free_port(), free_port());
    let victim = tmp.path().join("victim");
    let bystander = tmp.path().join("bystander");
    let mut cmd = node_command(&victim, None, &trusted, &site);
    cmd.args([
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{victim_port}"),
        "--no-mdns",
    ])
    .args([
        "--peer",
        &format!("/ip4/127.0.0.1/tcp/{liar_port}/p2p/{liar_id}"),
    ])
    .args(["--peer", &format!("/ip4/127.0.0.1/tcp/{bystander_port}")])
    // An older release passed over is expected traffic, logged at debug.
    .env("LANUP_LOG", "info,lanup_node::node::announce=debug");
    let _victim = spawn_logged(cmd, &victim);
    let mut cmd = node_command(&bystander, None, &trusted, &site);
    cmd.args([
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{bystander_port}"),
        "--no-mdns",
    ])
    .args(["--peer", &format!("/ip4/127.0.0.1/tcp/{victim_port}")]);
    let _bystander = spawn_logged(cmd, &bystander);

    // Announces `m` until the victim's log shows `words`.
    let announce_until = |m: &Signed, words: &[&str]| {
        let hash = Hash::of(&m.xml);
        manifests.lock().expect("lock").insert(hash, m.clone());
        let data = serde_json::to_vec(&Announce {
            release: m.version.into(),
            manifest_hash: hash,
            signature: m.sig.clone(),
            app: None,
        })
        .expect("JSON");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !logged(&node_log(&victim), words) {
            assert!(
                Instant::now() < deadline,
                "the node never logged {words:?} for {}:\n{}",
                m.version,
                node_log(&victim)
            );
            // Fails until the victim has subscribed; that is fine.
            let _ = rt.block_on(liar.publish(&topic, data.clone()));
            std::thread::sleep(Duration::from_millis(300));
        }
        hash
    };

    let untrusted_hash = announce_until(
        &untrusted,
        &["refused announcement", &liar_id, "6.6.6", "does not trust"],
    );
    announce_until(
        &forged,
        &[
            "refused release",
            &liar_id,
            "does not match the manifest bytes",
        ],
    );
    announce_until(&expired, &["refused release", &liar_id, "expired"]);
    announce_until(&good, &["release announced", "2.0"]);
    announce_until(
        &old,
        &[
            "passed over an announcement",
            &liar_id,
            "1.0",
            "not newer than 2.0",
        ],
    );

    // Nothing fetched: the untrusted manifest was never even asked for, and
    // no chunk reached the store.
    assert!(
        !asked.lock().expect("lock").contains(&untrusted_hash),
        "the node asked for a manifest signed by an untrusted key"
    );
    let chunks = victim.join("chunks");
    let stored = std::fs::read_dir(&chunks)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "chunks were stored from a lying peer");

    // The good announcement was forwarded to the bystander; the bad ones
    // were not.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !logged(&node_log(&bystander), &["release announced", "2.0"]) {
        assert!(
            Instant::now() < deadline,
            "the bystander never heard of 2.0:\n{}",
            node_log(&bystander)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let heard = node_log(&bystander);
    for bad in ["6.6.6", "3.3.3", "7.7.7"] {
        assert!(
            !heard.contains(bad),
            "the node forwarded the {bad} announcement:\n{heard}"
        );
    }
}

/// Starts `cmd`, logging to `state.log`.
/// A libp2p peer in the test process that speaks lanup's protocol with
/// whatever content a test makes up.
pub(crate) struct Liar {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) net: lanup_node::network::NetworkClient,
    pub(crate) events: tokio::sync::mpsc::Receiver<NetworkEvent>,
    pub(crate) port: u16,
}

impl Liar {
    pub(crate) fn start() -> Liar {
        Liar::dialing(&[])
    }

    /// A liar that dials `peers` (multiaddrs) itself.
    pub(crate) fn dialing(peers: &[String]) -> Liar {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let port = free_port();
        let (network, net, events) = {
            let _guard = rt.enter();
            Network::new(
                SecretKey::generate().to_libp2p(),
                NetworkConfig {
                    listen: vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")],
                    peers: peers.iter().map(|p| p.parse().expect("addr")).collect(),
                    psk: None,
                    mdns: false,
                    state: None,
                },
            )
            .expect("the liar's swarm")
        };
        rt.spawn(network.run());
        Liar {
            rt,
            net,
            events,
            port,
        }
    }

    /// The address a node dials to reach it.
    pub(crate) fn addr(&self) -> String {
        format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{}",
            self.port,
            self.net.local_peer_id()
        )
    }
}

pub(crate) fn spawn_logged(mut cmd: std::process::Command, state: &Path) -> Proc {
    let log = std::fs::File::create(state.with_extension("log")).expect("log");
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log));
    Proc(cmd.spawn().expect("node starts"))
}
