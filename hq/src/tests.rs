//! Headquarters on a real database in a temporary folder: what it keeps
//! across restarts, what it refuses, what it forgets, and what it shows.

use super::*;
use lanup_protocol::membership::Certificate;
use lanup_protocol::report::{sign, NodeState, Report};
use lanup_protocol::sign::SecretKey;

const NOW: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

fn node(id: &str, installed: &str, error: Option<&str>) -> NodeState {
    NodeState {
        id: id.into(),
        lanup: None,
        installed: Some(installed.into()),
        staged: None,
        state: "installed".into(),
        error: error.map(str::to_owned),
        failed: None,
    }
}

fn body(key: &SecretKey, site: &str, at: u64, nodes: Vec<NodeState>) -> Vec<u8> {
    let r = Report {
        site: site.into(),
        sender: key.public().peer_id(),
        sent_at_ms: at,
        nodes,
        rollout: None,
    };
    serde_json::to_vec(&sign(&r, key)).expect("json")
}

fn one(key: &SecretKey, site: &str, at: u64, installed: &str) -> Vec<u8> {
    body(
        key,
        site,
        at,
        vec![node(&key.public().peer_id(), installed, None)],
    )
}

fn settings(dir: &Path) -> Settings {
    Settings {
        dir: dir.to_owned(),
        releases: dir.to_owned(),
        stale_after: Duration::from_millis(report::STALE_AFTER_MS),
        keep: store::KEEP_HISTORY,
        max_sites: store::MAX_SITES,
        admins: Vec::new(),
    }
}

fn take(hq: &Headquarters, body: &[u8], from: &str, now: u64) -> Result<String, Refused> {
    hq.take(body, from.parse().expect("address"), now)
}

fn taken(hq: &Headquarters, body: &[u8], now: u64) -> Result<()> {
    take(hq, body, "192.0.2.7", now).map_err(|r| anyhow::anyhow!(r.message))?;
    Ok(())
}

/// Straight into the store, past the rate limits (they run on the real
/// clock, these reports on a made-up one).
fn kept(hq: &Headquarters, body: &[u8], now: u64) -> Result<()> {
    let checked = report::check(body, now)?;
    hq.store()
        .take(checked, std::str::from_utf8(body)?, None, now)??;
    Ok(())
}

#[test]
fn replays_and_out_of_order_reports_are_refused_across_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate();
    let hq = Headquarters::open(settings(dir.path()))?;
    taken(&hq, &one(&key, "a", NOW + 2, "1.1"), NOW + 2)?;
    // Sent before the one taken, arriving after it: out of order.
    let late = take(&hq, &one(&key, "a", NOW + 1, "1.0"), "192.0.2.7", NOW + 3);
    assert_eq!(late.expect_err("out of order").status, StatusCode::CONFLICT);
    drop(hq);

    let hq = Headquarters::open(settings(dir.path()))?;
    for at in [NOW + 1, NOW + 2] {
        let again = take(&hq, &one(&key, "a", at, "1.0"), "192.0.2.7", NOW + 4);
        assert_eq!(again.expect_err("replay").status, StatusCode::CONFLICT);
    }
    let (views, counts) = hq.views(NOW + 4, &Filter::default())?;
    assert_eq!(counts.sites, 1);
    assert_eq!(views[0].versions.get("1.1"), Some(&1), "{views:?}");
    taken(&hq, &one(&key, "a", NOW + 5, "1.2"), NOW + 5)?;
    Ok(())
}

#[test]
fn the_timeline_keeps_what_changed_survives_restarts_and_is_pruned_by_age() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate();
    let mut s = settings(dir.path());
    s.keep = Duration::from_millis(30 * DAY);
    let hq = Headquarters::open(s.clone())?;
    let me = key.public().peer_id();
    // A day of hourly reports saying the same, then a failure, then the fix.
    for h in 0..24 {
        kept(
            &hq,
            &one(&key, "plant", NOW + h * HOUR, "1.0"),
            NOW + h * HOUR,
        )?;
    }
    let failing = vec![
        node(&me, "1.0", None),
        node("b", "1.0", Some("health check failed: exit 3")),
    ];
    kept(&hq, &body(&key, "plant", NOW + DAY, failing), NOW + DAY)?;
    taken(
        &hq,
        &one(&key, "plant", NOW + DAY + HOUR, "1.1"),
        NOW + DAY + HOUR,
    )?;
    drop(hq);

    let hq = Headquarters::open(s.clone())?;
    let events = hq.store().history("plant", 100)?;
    let changes: Vec<Vec<String>> = events.iter().map(|e| e.changes.clone()).collect();
    assert_eq!(
        changes,
        vec![
            vec!["nodes".to_owned(), "installed".into(), "failed".into()],
            vec!["nodes".to_owned(), "installed".into(), "failed".into()],
            vec!["first report".to_owned()],
        ],
        "quiet hourly reports add nothing; newest first"
    );
    assert_eq!(
        events[1].view.failed[0].error,
        "health check failed: exit 3"
    );
    // The signed report is kept as posted, and still checks.
    let signed = serde_json::to_vec(events[0].signed.as_ref().expect("kept"))?;
    assert_eq!(report::check(&signed, NOW + DAY + HOUR)?.site, "plant");

    // 30 days on, the first day's entry is gone; the site stays while it
    // reports, and a site silent for 30 days goes with its timeline.
    let other = SecretKey::generate();
    kept(&hq, &one(&other, "closed", NOW, "1.0"), NOW)?;
    taken(
        &hq,
        &one(&key, "plant", NOW + 30 * DAY, "1.1"),
        NOW + 30 * DAY,
    )?;
    let pruned = hq.store().prune(NOW + 30 * DAY + HOUR / 2)?;
    assert_eq!(pruned.sites, 1);
    assert_eq!(hq.store().history("plant", 100)?.len(), 2);
    assert!(hq.store().history("closed", 100)?.is_empty());
    let (views, _) = hq.views(NOW + 30 * DAY, &Filter::default())?;
    assert_eq!(
        views.iter().map(|v| v.site.as_str()).collect::<Vec<_>>(),
        ["plant"]
    );
    Ok(())
}

#[test]
fn rate_limits_follow_the_enrolled_site_not_the_address() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let admin = SecretKey::generate();
    let mut s = settings(dir.path());
    s.admins = vec![admin.public()];
    let hq = Headquarters::open(s)?;
    let member = |site: &str| {
        let key = SecretKey::generate();
        let cert = Certificate::issue(&admin, site, &key.public(), NOW / 1000, 86_400);
        (key, cert)
    };
    let signed = |(key, cert): &(SecretKey, Certificate), site: &str, at: u64| {
        let mut signed: report::SignedReport =
            serde_json::from_slice(&one(key, site, at, "1.0")).expect("json");
        signed.membership = Some(cert.clone());
        serde_json::to_vec(&signed).expect("json")
    };
    // 300 sites behind one NAT address, each reporting: all taken.
    for i in 0..300 {
        let site = format!("branch-{i}");
        taken(&hq, &signed(&member(&site), &site, NOW), NOW)?;
    }
    // One site's two nodes share its quota: the site is held back, not
    // the address.
    let (a, b) = (member("plant"), member("plant"));
    let mut limited = 0;
    for i in 0..(REPORTS_BURST as u64 + 10) {
        let from = if i % 2 == 0 { &a } else { &b };
        if let Err(r) = take(&hq, &signed(from, "plant", NOW + i), "192.0.2.7", NOW + i) {
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.message);
            assert!(r.message.contains("site plant"), "{}", r.message);
            limited += 1;
        }
    }
    assert!(limited >= 9, "{limited} of the site's reports held back");
    taken(
        &hq,
        &signed(&member("branch-0"), "branch-0", NOW + 1),
        NOW + 1,
    )?;

    // A non-member naming a real site is refused and changes nothing.
    let stranger = SecretKey::generate();
    let refused = take(
        &hq,
        &one(&stranger, "branch-1", NOW + 2, "6.6"),
        "192.0.2.9",
        NOW + 2,
    );
    assert_eq!(refused.expect_err("stranger").status, StatusCode::FORBIDDEN);
    let (views, _) = hq.views(
        NOW + 2,
        &Filter {
            search: "branch-1".into(),
            ..Filter::default()
        },
    )?;
    assert!(views.iter().all(|v| !v.versions.contains_key("6.6")));
    assert_eq!(hq.store().history("branch-1", 10)?.len(), 1);

    // An address posting refused reports in a loop is held back; another
    // address, and the members behind the first one, are not held back
    // by what it did... once the flood stops counting against it.
    let flood = (0..REFUSED_BURST + 10)
        .filter(|_| {
            take(&hq, b"{}", "192.0.2.66", NOW + 3)
                .is_err_and(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        })
        .count();
    assert!(flood >= 9, "{flood} posts held back");
    let again = take(
        &hq,
        &signed(&member("x"), "x", NOW + 3),
        "192.0.2.66",
        NOW + 3,
    );
    assert_eq!(
        again.expect_err("held back").status,
        StatusCode::TOO_MANY_REQUESTS
    );
    taken(&hq, &signed(&member("y"), "y", NOW + 3), NOW + 3)?;
    assert_eq!(hq.store().members("branch-0")?.len(), 2);
    Ok(())
}

#[test]
fn views_page_search_and_show_problems() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hq = Headquarters::open(settings(dir.path()))?;
    for i in 0..250u64 {
        let key = SecretKey::generate();
        let site = format!("shop-{i:03}");
        let version = if i % 50 == 0 { "2.0-rc1" } else { "1.9" };
        let mut nodes = vec![node(&key.public().peer_id(), version, None)];
        if i == 7 {
            nodes.push(node("b", "1.9", Some("<script>alert(1)</script>")));
        }
        // shop-249 reported three hours before the rest: stale.
        let at = if i == 249 { NOW - 3 * HOUR } else { NOW };
        taken(&hq, &body(&key, &site, at, nodes), at)?;
    }
    let (all, counts) = hq.views(NOW, &Filter::default())?;
    assert_eq!(
        (all.len(), counts.sites, counts.failed, counts.stale),
        (250, 250, 1, 1)
    );
    let page = |q: &str, problems: bool, offset: usize| {
        hq.views(
            NOW,
            &Filter {
                search: q.into(),
                problems,
                offset,
                limit: page::ROWS,
            },
        )
    };
    let (second, counts) = page("", false, page::ROWS)?;
    assert_eq!((second.len(), counts.matching), (100, 250));
    assert_eq!(second[0].site, "shop-100");
    let (rc, counts) = page("2.0-RC", false, 0)?;
    assert_eq!(counts.matching, 5);
    assert_eq!(
        rc.iter().map(|v| v.site.as_str()).collect::<Vec<_>>(),
        ["shop-000", "shop-050", "shop-100", "shop-150", "shop-200"]
    );
    let (bad, _) = page("", true, 0)?;
    assert_eq!(
        bad.iter().map(|v| v.site.as_str()).collect::<Vec<_>>(),
        ["shop-007", "shop-249"]
    );
    // LIKE's wildcards are taken as written.
    assert_eq!(page("%", false, 0)?.1.matching, 0);
    assert_eq!(page("shop_", false, 0)?.1.matching, 0);

    let query = ViewQuery {
        q: "shop".into(),
        problems: None,
        page: Some(2),
    };
    let (shops, counts) = page("shop", false, page::ROWS)?;
    let html = page::fleet_page(&shops, counts, &query, None);
    assert!(html.contains("sites 101–200 of 250"), "{html}");
    assert!(html.contains("href=\"?page=1&amp;q=shop\""), "{html}");
    assert!(html.contains("href=\"?page=3&amp;q=shop\""), "{html}");
    let (first, counts) = page("", false, 0)?;
    let html = page::fleet_page(&first, counts, &ViewQuery::default(), None);
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("<script>"));
    Ok(())
}

#[test]
fn a_folder_kept_by_an_older_lanup_is_taken_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate();
    let report = report::check(&one(&key, "old-site", NOW, "1.0"), NOW)?;
    let mut fleet = report::Fleet::default();
    fleet.accept(report, NOW)?;
    std::fs::create_dir_all(dir.path().join("sites"))?;
    std::fs::write(
        dir.path().join("sites/old-site.json"),
        serde_json::to_vec(&fleet.sites["old-site"])?,
    )?;
    std::fs::write(dir.path().join("sites/broken.json"), b"{not json")?;
    let hq = Headquarters::open(settings(dir.path()))?;
    let (views, _) = hq.views(NOW, &Filter::default())?;
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].site, "old-site");
    // Its replay guard came along.
    let replay = take(&hq, &one(&key, "old-site", NOW, "1.0"), "192.0.2.7", NOW);
    assert_eq!(replay.expect_err("replay").status, StatusCode::CONFLICT);
    Ok(())
}

#[test]
fn a_damaged_database_or_one_from_a_newer_lanup_is_refused_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join(store::DB_FILE),
        b"not a database at all, 64 bytes of it, and then some more text",
    )?;
    let err = format!(
        "{:#}",
        Headquarters::open(settings(dir.path()))
            .err()
            .expect("refused")
    );
    assert!(
        err.contains("hq.sqlite") && err.contains("not a database"),
        "{err}"
    );

    let dir = tempfile::tempdir()?;
    drop(Headquarters::open(settings(dir.path()))?);
    let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE))?;
    conn.pragma_update(None, "user_version", 99)?;
    drop(conn);
    let err = format!(
        "{:#}",
        Headquarters::open(settings(dir.path()))
            .err()
            .expect("refused")
    );
    assert!(err.contains("newer lanup"), "{err}");
    Ok(())
}

#[test]
fn a_published_revocation_list_revokes_and_a_damaged_or_forged_one_is_passed_over() -> Result<()> {
    use lanup_protocol::membership::{revoked_file, Revocations};
    let dir = tempfile::tempdir()?;
    let admin = SecretKey::generate();
    let mut s = settings(dir.path());
    s.admins = vec![admin.public()];
    let hq = Headquarters::open(s)?;
    let key = SecretKey::generate();
    let cert = Certificate::issue(&admin, "plant", &key.public(), NOW / 1000, 86_400);
    let signed = |at: u64| {
        let mut signed: report::SignedReport =
            serde_json::from_slice(&one(&key, "plant", at, "1.0")).expect("json");
        signed.membership = Some(cert.clone());
        serde_json::to_vec(&signed).expect("json")
    };
    let list = dir.path().join(revoked_file("plant"));
    std::fs::create_dir_all(list.parent().expect("parent"))?;
    // Damaged, then signed by a key headquarters does not trust: the
    // member still reports.
    std::fs::write(&list, b"{\"text\": 12")?;
    taken(&hq, &signed(NOW), NOW)?;
    let stranger = SecretKey::generate();
    let forged = Revocations::sign(
        &stranger,
        "plant",
        vec![key.public().to_string()],
        NOW / 1000,
    );
    std::fs::write(&list, serde_json::to_vec(&forged)?)?;
    taken(&hq, &signed(NOW + 1), NOW + 1)?;
    // The admin's list: refused, by name.
    let real = Revocations::sign(&admin, "plant", vec![key.public().to_string()], NOW / 1000);
    std::fs::write(&list, serde_json::to_vec(&real)?)?;
    let refused = take(&hq, &signed(NOW + 2), "192.0.2.7", NOW + 2).expect_err("revoked");
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.message.contains("revoked"), "{}", refused.message);
    Ok(())
}
