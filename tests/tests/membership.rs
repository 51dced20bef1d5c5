//! Who belongs to a site: nodes enrolled with `lanup enroll` and `lanup
//! setup --join` admit only members. A stranger on the LAN that claims the
//! fetcher role (the lowest key, an origin that never answers) is ignored,
//! so the release still arrives, and it gets no chunk; two sites of one
//! name on one LAN, each enrolled by its own administrator, each stage
//! their own release from their own origin with one copy.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::apply::own_status;
use crate::common::*;
use crate::swarm::{free_port, LoopSite};

/// An administrator's keys, a publisher's, and an origin serving `www`.
struct Org {
    admin: (PathBuf, String),
    publisher: (PathBuf, String),
    www: PathBuf,
    origin: OriginProc,
}

impl Org {
    fn new(root: &Path) -> Org {
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        Org {
            admin: keygen(root, "admin.key"),
            publisher: keygen(root, "publisher.key"),
            origin: OriginProc::start(&www, None),
            www,
        }
    }
}

/// `lanup enroll`'s token for `site`, signed by the admin key at `key`.
fn token(site: &str, key: &Path) -> String {
    run_ok(&["enroll", "--site", site, "--key", s(key), "--valid", "10m"])
        .trim()
        .to_owned()
}

/// Sets up node `state` with `lanup setup --join`, its configuration at
/// `state.toml`.
fn join(state: &Path, token: &str, origin: &str, publisher: &str) -> PathBuf {
    let config = state.with_extension("toml");
    let out = run_ok(&[
        "setup",
        "--join",
        token,
        "--origin",
        origin,
        "--trust-publisher",
        publisher,
        "--state",
        s(state),
        "--config",
        s(&config),
    ]);
    assert!(out.contains("enrolled this node"), "{out}");
    config
}

/// The node's own key (`STATE/identity.key`).
fn identity(state: &Path) -> lanup_protocol::sign::SecretKey {
    let text = std::fs::read_to_string(state.join("identity.key")).expect("identity.key");
    lanup_protocol::sign::SecretKey::from_text(&text).expect("key")
}

/// The node's public key bytes (their order is the PeerIds' order).
fn node_key(state: &Path) -> [u8; 32] {
    identity(state).public().to_bytes()
}

/// Gives the node at `state` an identity whose key sorts below those of
/// the nodes at `others` (so that, heard, it would be the site's fetcher).
fn lowest_identity(state: &Path, others: &[PathBuf]) -> lanup_protocol::sign::SecretKey {
    use std::os::unix::fs::OpenOptionsExt;
    let lowest = others.iter().map(|s| node_key(s)).min().expect("others");
    let key = loop {
        let key = lanup_protocol::sign::SecretKey::generate();
        if key.public().to_bytes() < lowest {
            break key;
        }
    };
    std::fs::create_dir_all(state).expect("mkdir");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(state.join("identity.key"))
        .expect("identity.key");
    std::io::Write::write_all(&mut file, key.to_text().as_bytes()).expect("write");
    key
}

/// The PeerIds a node lists in `lanup status --json`.
fn listed(state: &Path) -> Vec<String> {
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"])).expect("JSON");
    status["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|n| n["peer_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_stranger_that_claims_the_fetcher_role_is_ignored_and_gets_no_chunk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let Org {
        admin,
        publisher,
        www,
        origin,
    } = Org::new(root);
    let app = root.join("app");
    write(&app, "bin/app", &pseudo_random(2_000_000, 5));
    let release = publish(&app, "1.0", &origin.url, &publisher, &www);

    // Three members and a stranger, all peered with each other.
    let mut site = LoopSite::new(root, 4);
    let token = token(&site.site, &admin.0);
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| join(&site.states[i], &token, &origin.url, &publisher.1))
        .collect();
    // The stranger's key sorts below every member's: without membership
    // it would be the site's fetcher. Its origin accepts connections and
    // never answers.
    let stranger = site.states[3].clone();
    let stranger_key = lowest_identity(&stranger, &site.states[..3]);
    let hang = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hang_url = format!("http://{}/", hang.local_addr().expect("addr"));
    let cmd = site.command(3, Some(&hang_url), &publisher.1);
    site.start(3, cmd);
    for (i, config) in configs.iter().enumerate() {
        let mut cmd = site.command(i, Some(&origin.url), &publisher.1);
        cmd.arg("--config").arg(config);
        site.start(i, cmd);
    }
    let members: Vec<&Path> = site.states[..3].iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&members, "1.0", &release, Duration::from_secs(60));
    assert!(
        pending.is_empty(),
        "not staged on {pending:?}:\n{}",
        site.states
            .iter()
            .map(|s| format!("--- {}\n{}", s.display(), node_log(s)))
            .collect::<String>()
    );
    let served = origin.stats()["bytes_served"].as_u64().expect("bytes");
    assert!(
        served < release.size * 3 / 2,
        "one copy: the origin served {served} bytes of a {} byte release",
        release.size
    );
    // The stranger heard of the release and was refused every chunk; no
    // member lists it.
    assert!(
        !staged_ok(&stranger, "1.0", &release),
        "{}",
        node_log(&stranger)
    );
    let stranger_id = stranger_key.public().peer_id();
    for state in &members {
        let listed = listed(state);
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert!(!listed.contains(&stranger_id), "{listed:?}");
    }
    // The stranger's own view: it did not get the chunks it asked for.
    let held = std::fs::read_dir(stranger.join("chunks"))
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!("the stranger holds {held} chunk files");
    drop(hang);
}

#[test]
fn two_sites_of_one_name_on_one_lan_each_take_their_own_release_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    // One LAN: four nodes peered with each other, all named site "plant".
    let mut lan = LoopSite::new(root, 4);
    lan.site = format!("plant-{}", free_port());
    let mut sites = Vec::new();
    for (n, nodes) in [(0usize, 0..2usize), (1, 2..4)] {
        let dir = root.join(format!("company{n}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let admin = keygen(&dir, "admin.key");
        let publisher = keygen(&dir, "publisher.key");
        let www = dir.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let origin = OriginProc::start(&www, None);
        let app = dir.join("app");
        write(&app, "bin/app", &pseudo_random(1_500_000, 40 + n as u64));
        let release = publish(&app, "1.0", &origin.url, &publisher, &www);
        let token = token(&lan.site, &admin.0);
        for i in nodes.clone() {
            let config = join(&lan.states[i], &token, &origin.url, &publisher.1);
            let mut cmd: Command = lan.command(i, Some(&origin.url), &publisher.1);
            cmd.arg("--config").arg(config);
            lan.start(i, cmd);
        }
        sites.push((nodes, origin, release));
    }
    for (nodes, origin, release) in &sites {
        let states: Vec<&Path> = lan.states[nodes.clone()]
            .iter()
            .map(PathBuf::as_path)
            .collect();
        let pending = wait_staged(&states, "1.0", release, Duration::from_secs(60));
        assert!(
            pending.is_empty(),
            "not staged on {pending:?}:\n{}",
            lan.states
                .iter()
                .map(|s| format!("--- {}\n{}", s.display(), node_log(s)))
                .collect::<String>()
        );
        let served = origin.stats()["bytes_served"].as_u64().expect("bytes");
        assert!(
            served < release.size * 3 / 2,
            "one copy per site: its origin served {served} of {}",
            release.size
        );
        for state in &states {
            assert_eq!(listed(state).len(), 2, "{}", state.display());
        }
    }
}

/// `lanup status --json`'s membership part.
fn membership(state: &Path) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--state", s(state), "--json"])).expect("JSON");
    status["membership"].clone()
}

#[test]
fn a_revoked_member_is_cut_off_at_once_and_the_rest_of_the_site_carries_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let Org {
        admin,
        publisher,
        www,
        origin,
    } = Org::new(root);
    let app = root.join("app");
    write(&app, "bin/app", &pseudo_random(1_000_000, 8));
    let v1 = publish(&app, "1.0", &origin.url, &publisher, &www);
    let mut site = LoopSite::new(root, 3);
    let token = token(&site.site, &admin.0);
    for i in 0..3 {
        let config = join(&site.states[i], &token, &origin.url, &publisher.1);
        let mut cmd = site.command(i, Some(&origin.url), &publisher.1);
        cmd.arg("--config").arg(config);
        site.start(i, cmd);
    }
    let states: Vec<&Path> = site.states.iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&states, "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "not staged on {pending:?}");

    // The site's fetcher is revoked, by its PeerId, from another node's
    // CLI: the others pass it over at once, not when what it last said
    // (its keep-alive at rest) runs out.
    let ids: Vec<String> = (0..3)
        .map(|i| identity(&site.states[i]).public().peer_id())
        .collect();
    let fetcher = (0..3)
        .find(|&i| own_status(states[i])["fetcher"] == true)
        .expect("a fetcher among the three");
    let (cut, rest) = (fetcher, [(fetcher + 1) % 3, (fetcher + 2) % 3]);
    let revoked = ids[cut].clone();
    let out = run_ok(&[
        "revoke",
        &revoked,
        "--key",
        s(&admin.0),
        "--state",
        s(states[rest[0]]),
    ]);
    assert!(out.contains("1 key(s) revoked"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let cut_off = rest.iter().all(|&i| {
            let m = membership(states[i]);
            listed(states[i]).len() == 2
                && m["strangers"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|p| p == revoked.as_str()))
        });
        let told = membership(states[cut])["revoked"]
            .as_array()
            .is_some_and(|r| r.len() == 1);
        if cut_off && told {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fetcher is not cut off: {} {} {}",
            membership(states[rest[0]]),
            membership(states[rest[1]]),
            membership(states[cut])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every node keeps the list for its next start.
    assert!(site.states[rest[1]].join("revocations.json").exists());

    // The next release reaches the two members, once; not the revoked one.
    let before = origin.stats()["bytes_served"].as_u64().expect("bytes");
    write(&app, "bin/app", &pseudo_random(1_000_000, 9));
    let v2 = publish(&app, "2.0", &origin.url, &publisher, &www);
    run_ok(&["check", "--state", s(states[rest[0]])]);
    let members = [states[rest[0]], states[rest[1]]];
    let pending = wait_staged(&members, "2.0", &v2, Duration::from_secs(60));
    assert!(pending.is_empty(), "not staged on {pending:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !staged_ok(states[cut], "2.0", &v2),
        "{}",
        node_log(states[cut])
    );
    let served = origin.stats()["bytes_served"].as_u64().expect("bytes") - before;
    assert!(
        served < v2.size * 3 / 2,
        "one copy of 2.0: {served} of {}",
        v2.size
    );
    assert!(node_log(states[cut]).contains("this node is revoked from its site"));
}

#[test]
fn headquarters_that_trusts_admin_keys_counts_only_members_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let admin = keygen(root, "admin.key");
    let publisher = keygen(root, "publisher.key");
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let reports = root.join("reports");
    let hq = OriginProc::start_with(&www, &["--reports", s(&reports), "--trust-admin", &admin.1]);
    let app = root.join("app");
    write(&app, "bin/app", &pseudo_random(200_000, 3));
    let v1 = publish(&app, "1.0", &hq.url, &publisher, &www);
    // An enrolled site of one node reports; its report counts.
    let mut site = LoopSite::new(root, 1);
    let token = token(&site.site, &admin.0);
    let config = join(&site.states[0], &token, &hq.url, &publisher.1);
    let mut cmd = site.command(0, Some(&hq.url), &publisher.1);
    cmd.arg("--config")
        .arg(config)
        .args(["--report-to", &hq.url, "--report-interval", "1s"]);
    site.start(0, cmd);
    let pending = wait_staged(&[&site.states[0]], "1.0", &v1, Duration::from_secs(60));
    assert!(pending.is_empty(), "{}", node_log(&site.states[0]));
    let fleet = || -> serde_json::Value {
        serde_json::from_str(&run_ok(&["fleet", "--reports", &hq.url, "--json"])).expect("JSON")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = fleet();
        let reported = view["sites"].as_array().is_some_and(|sites| {
            sites
                .iter()
                .any(|s| s["site"] == site.site.as_str() && s["nodes"] == 1)
        });
        if reported {
            break view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{view:#}\n{}",
            node_log(&site.states[0])
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    // A validly signed report for the same site from a key no admin
    // enrolled: refused, and the view does not change.
    let stranger = lanup_protocol::sign::SecretKey::generate();
    let forged = lanup_protocol::report::Report {
        site: site.site.clone(),
        sender: stranger.public().peer_id(),
        sent_at_ms: lanup_node::node::now_unix_ms(),
        nodes: vec![],
        rollout: None,
    };
    let body = serde_json::to_vec(&lanup_protocol::report::sign(&forged, &stranger)).expect("json");
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}_lanup/report", hq.url))
        .body(body)
        .send()
        .expect("headquarters answers");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("not an enrolled member"), "{text}");
    let sites = |v: &serde_json::Value| v["sites"].as_array().map_or(0, Vec::len);
    let after = fleet();
    assert_eq!(sites(&after), sites(&view));
    let ours = |v: &serde_json::Value| {
        v["sites"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["site"] == site.site.as_str()).cloned())
            .map(|s| (s["node_ids"].clone(), s["sender"].clone()))
    };
    assert_eq!(
        ours(&after),
        ours(&view),
        "the forged report changed nothing"
    );

    // The admin revokes the site's node at headquarters, reaching no node:
    // the list published beside the releases reaches the node at its next
    // poll (it then fetches and reports nothing), and headquarters refuses
    // what the revoked key still signs, certificate and all.
    let secret = identity(&site.states[0]);
    let peer = secret.public().peer_id();
    let out = run_ok(&[
        "revoke",
        &peer,
        "--key",
        s(&admin.0),
        "--publish-dir",
        s(&www),
        "--site",
        &site.site,
    ]);
    assert!(out.contains("1 key(s) revoked, published"), "{out}");
    // Its next poll (polls are an hour apart here).
    run_ok(&["check", "--state", s(&site.states[0])]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while membership(&site.states[0])["revoked"]
        .as_array()
        .is_none_or(|r| r.len() != 1)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the revocation published at headquarters did not reach the node:\n{}",
            node_log(&site.states[0])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(node_log(&site.states[0]).contains("source=the origin"));
    let cert = lanup_node::membership::load(&site.states[0])
        .expect("membership.json")
        .expect("a certificate");
    let mine = lanup_protocol::report::Report {
        site: site.site.clone(),
        sender: peer.clone(),
        sent_at_ms: lanup_node::node::now_unix_ms(),
        nodes: vec![],
        rollout: None,
    };
    let mut signed = lanup_protocol::report::sign(&mine, &secret);
    signed.membership = Some(cert);
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}_lanup/report", hq.url))
        .body(serde_json::to_vec(&signed).expect("json"))
        .send()
        .expect("headquarters answers");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("revoked"), "{text}");
    assert_eq!(
        ours(&fleet()),
        ours(&view),
        "the revoked node's report changed nothing"
    );
}

#[test]
fn a_member_that_claims_the_fetcher_role_and_cannot_be_reached_is_passed_over_in_seconds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let Org {
        admin,
        publisher,
        www,
        origin,
    } = Org::new(root);
    let mut site = LoopSite::new(root, 4);
    let token = token(&site.site, &admin.0);
    // Node 3 is an enrolled member with the lowest key whose origin never
    // answers; it knows node 0 alone, and no other node has its address:
    // nodes 1 and 2 hear it only through node 0's gossip.
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| join(&site.states[i], &token, &origin.url, &publisher.1))
        .collect();
    let claimer = site.states[3].clone();
    let lowest = lowest_identity(&claimer, &site.states[..3]);
    let hang = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hang_url = format!("http://{}/", hang.local_addr().expect("addr"));
    let config = join(&claimer, &token, &origin.url, &publisher.1);
    for (i, config) in configs.iter().enumerate() {
        let mut cmd = node_command(&site.states[i], Some(&origin.url), &publisher.1, &site.site);
        cmd.arg("--config")
            .arg(config)
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", site.ports[i])])
            .arg("--no-mdns");
        for j in (0..3).filter(|&j| j != i) {
            cmd.args(["--peer", &format!("/ip4/127.0.0.1/tcp/{}", site.ports[j])]);
        }
        site.start(i, cmd);
        // Each member polls the origin before the next one comes (a node
        // that hears only failing peers fetches): nothing is published
        // yet, so every member counts its origin as failing. The claimer
        // the site cannot reach must still come after them.
        wait_for(
            "a member to poll the empty origin",
            Duration::from_secs(30),
            || node_log(&site.states[i]).contains("cannot read the origin's manifest"),
        );
    }
    let mut cmd = node_command(&claimer, Some(&hang_url), &publisher.1, &site.site);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", site.ports[3])])
        .args(["--peer", &format!("/ip4/127.0.0.1/tcp/{}", site.ports[0])])
        .arg("--no-mdns")
        // Its firewall lets it reach node 0 alone (the others, higher,
        // leave the dialling to it).
        .env("LANUP_FAULT_NO_DIAL_OUT", "1");
    site.start(3, cmd);
    // Every member takes node 3 for the site's fetcher.
    let claimer_id = lowest.public().peer_id();
    let fetcher_of = |state: &Path| -> Option<String> {
        let out = run(&["status", "--state", s(state), "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["fetcher"] == true)
            .and_then(|n| n["peer_id"].as_str().map(str::to_owned))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(0..3).all(|i| fetcher_of(&site.states[i]).as_deref() == Some(claimer_id.as_str())) {
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 is not the site's fetcher: {:?}",
            (0..3)
                .map(|i| fetcher_of(&site.states[i]))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let app = root.join("app");
    write(&app, "bin/app", &pseudo_random(500_000, 12));
    let release = publish(&app, "1.0", &origin.url, &publisher, &www);
    let began = std::time::Instant::now();
    // An administrator on node 2 asks for the release: node 2 cannot
    // reach the fetcher it hears of, so the site passes it over.
    let _ = run(&["check", "--state", s(&site.states[2])]);
    let members: Vec<&Path> = site.states[..3].iter().map(PathBuf::as_path).collect();
    let pending = wait_staged(&members, "1.0", &release, Duration::from_secs(30));
    assert!(
        pending.is_empty(),
        "not staged on {pending:?}:\n{}",
        site.states
            .iter()
            .map(|s| format!("--- {}\n{}", s.display(), node_log(s)))
            .collect::<String>()
    );
    eprintln!(
        "staged on the three reachable members {:.1?} after the check",
        began.elapsed()
    );
    assert!(node_log(&site.states[2]).contains("the site's fetcher cannot be reached"));
    drop(hang);
}

#[test]
fn a_join_token_from_an_untrusted_admin_an_expired_one_or_a_damaged_one_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let admin = keygen(root, "admin.key");
    let other = keygen(root, "other.key");
    let (_, publisher) = keygen(root, "publisher.key");
    let (state, config) = (root.join("state"), root.join("lanup.toml"));
    let setup = |token: &str, extra: &[&str]| {
        let mut args = vec![
            "setup",
            "--join",
            token,
            "--origin",
            "http://127.0.0.1:9/",
            "--trust-publisher",
            &publisher,
            "--state",
            s(&state),
            "--config",
            s(&config),
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let good = token("plant", &admin.0);
    let said = setup(&good, &["--trust-admin", &other.1]);
    assert!(said.contains("not one of the --trust-admin keys"), "{said}");
    let said = setup(&good, &["--site", "another-plant"]);
    assert!(said.contains("the token is for site \"plant\""), "{said}");
    let short = run_ok(&[
        "enroll",
        "--site",
        "plant",
        "--key",
        s(&admin.0),
        "--valid",
        "1s",
    ]);
    std::thread::sleep(Duration::from_millis(2100));
    let said = setup(short.trim(), &[]);
    assert!(said.contains("expired"), "{said}");
    let said = setup(&good[..good.len() - 9], &[]);
    assert!(said.contains("join token"), "{said}");
    assert!(!root.join("lanup.toml").exists(), "nothing is written");
    assert!(!root.join("state/membership.json").exists());
}
