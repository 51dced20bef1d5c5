//! Headquarters: sites on loopback report to one `lanup origin --reports`,
//! and `lanup fleet` shows them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lanup_protocol::report::{self, Report};
use lanup_protocol::sign::SecretKey;

use crate::apply::{app_tree, own_status, KillUnder};
use crate::common::*;
use crate::swarm::LoopSite;

/// `lanup origin --reports DIR` on loopback: releases and the fleet.
pub(crate) struct Hq {
    pub(crate) url: String,
    pub(crate) reports: PathBuf,
    _origin: OriginProc,
}

impl Hq {
    pub(crate) fn start(www: &Path, reports: &Path, stale_after: &str) -> Hq {
        let reports_arg = reports.to_str().expect("utf-8 path");
        let origin = OriginProc::start_with(
            www,
            &["--reports", reports_arg, "--stale-after", stale_after],
        );
        Hq {
            url: origin.url.clone(),
            reports: reports.to_owned(),
            _origin: origin,
        }
    }

    /// `lanup fleet --reports URL --json`.
    pub(crate) fn fleet(&self) -> serde_json::Value {
        serde_json::from_str(&run_ok(&["fleet", "--reports", &self.url, "--json"]))
            .expect("fleet JSON")
    }

    /// Waits until the fleet view satisfies `ok`; returns it.
    pub(crate) fn wait(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.fleet();
            if ok(&view) {
                return view;
            }
            assert!(Instant::now() < deadline, "{what}: never seen in\n{view:#}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// The row of `site` in a fleet view.
pub(crate) fn site<'a>(view: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    view["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["site"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// A site's nodes, each with the sample application in an install
/// directory of its own, reporting to headquarters every `interval`.
pub(crate) struct ReportingSite {
    pub(crate) nodes: LoopSite,
    pub(crate) configs: Vec<PathBuf>,
    _apps: Vec<KillUnder>,
}

impl ReportingSite {
    pub(crate) fn new(
        root: &Path,
        name: &str,
        n: usize,
        admin: &str,
        extra_config: &str,
    ) -> ReportingSite {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut nodes = LoopSite::new(&dir, n);
        nodes.site = name.to_owned();
        let mut configs = Vec::new();
        let mut apps = Vec::new();
        for i in 0..n {
            let install = dir.join(format!("install{i}"));
            std::fs::create_dir_all(&install).expect("mkdir");
            let config = dir.join(format!("node{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "trust_admin = [\"{admin}\"]\n{extra_config}[app]\nname = \"sample-app\"\ninstall_dir = \"{}\"\nstart = [\"bin/sample-app\"]\nhealth_after = \"500ms\"\n",
                    install.display()
                ),
            )
            .expect("config");
            configs.push(config);
            apps.push(KillUnder(install));
        }
        ReportingSite {
            nodes,
            configs,
            _apps: apps,
        }
    }

    /// Starts every node, reporting to `report_to` and polling the origin
    /// every `poll`.
    pub(crate) fn start(&mut self, origin: &str, publisher: &str, report_to: &str, poll: &str) {
        for i in 0..self.configs.len() {
            let base = self.nodes.command(i, Some(origin), publisher);
            let mut args: Vec<std::ffi::OsString> =
                base.get_args().map(std::ffi::OsStr::to_owned).collect();
            if let Some(at) = args.iter().position(|a| a == "--poll-interval") {
                args[at + 1] = poll.into();
            }
            let mut cmd = lanup();
            cmd.args(args)
                .env("LANUP_LOG", "info")
                .arg("--config")
                .arg(&self.configs[i])
                .args(["--report-to", report_to, "--report-interval", "2s"]);
            self.nodes.start(i, cmd);
        }
    }

    pub(crate) fn peer_id(&self, i: usize) -> String {
        own_status(&self.nodes.states[i])["peer_id"]
            .as_str()
            .expect("own peer id")
            .to_owned()
    }
}

#[test]
fn three_sites_report_to_headquarters_which_shows_versions_failures_and_stale_sites() {
    // 2.0.0 exits at once: its apply on one node of site-c rolls back.
    let mut f = FleetUnderTest::with(&[3, 2, 2], "6s", Some("exit"));
    let (hq, sites) = (&f.hq, &f.sites);
    let c0 = sites[2].nodes.states[0].clone();
    let out = run(&["apply", "2.0.0", "--state", s(&c0)]);
    assert_eq!(out.status.code(), Some(1), "the apply of 2.0.0 rolls back");
    let failing = sites[2].peer_id(0);

    let view = hq.wait(
        "every site, 1.0.0 everywhere, site-c's failure",
        Duration::from_secs(40),
        |v| {
            let a = site(v, "site-a");
            let b = site(v, "site-b");
            let c = site(v, "site-c");
            a["versions"]["1.0.0"] == 3
                && b["versions"]["1.0.0"] == 2
                && c["versions"]["1.0.0"] == 2
                && c["failed"][0]["node"] == failing.as_str()
        },
    );
    assert_eq!(view["sites"].as_array().map(Vec::len), Some(3), "{view:#}");
    let c = site(&view, "site-c");
    assert_eq!(c["failed"][0]["version"], "2.0.0", "{view:#}");
    let error = c["failed"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("2.0.0"), "the failure says why: {error}");
    for (name, n) in [("site-a", 3), ("site-b", 2)] {
        let row = site(&view, name);
        assert_eq!(row["nodes"], n, "{view:#}");
        assert_eq!(row["failed"], serde_json::json!([]), "{view:#}");
        assert_eq!(row["stale"], false, "{view:#}");
    }
    // Each site's report came from one of its own nodes.
    for (i, site_nodes) in sites.iter().enumerate() {
        let ids: Vec<String> = (0..site_nodes.configs.len())
            .map(|j| site_nodes.peer_id(j))
            .collect();
        let sender = site(&view, &site_nodes.nodes.site)["sender"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(ids.contains(&sender), "site {i}: {sender} not in {ids:?}");
    }

    // The same view from the folder, and as a table.
    let from_dir: serde_json::Value =
        serde_json::from_str(&run_ok(&["fleet", "--reports", s(&hq.reports), "--json"]))
            .expect("JSON");
    assert_eq!(
        site(&from_dir, "site-c")["failed"][0]["node"],
        failing.as_str()
    );
    let table = run_ok(&["fleet", "--reports", &hq.url]);
    for name in ["site-a", "site-b", "site-c"] {
        assert!(table.contains(name), "{table}");
    }
    assert!(
        table.contains(&format!("failed: {failing} (2.0.0)")),
        "{table}"
    );
    // site-c's timeline names its failure, from the URL and the folder
    // alike.
    for from in [hq.url.as_str(), s(&hq.reports)] {
        let history: serde_json::Value = serde_json::from_str(&run_ok(&[
            "fleet",
            "--reports",
            from,
            "--site",
            "site-c",
            "--history",
            "--json",
        ]))
        .expect("JSON");
        let events = history["events"].as_array().cloned().unwrap_or_default();
        assert!(
            events
                .iter()
                .any(|e| e["view"]["failed"][0]["node"] == failing.as_str()
                    && e["changes"]
                        .as_array()
                        .is_some_and(|c| c.contains(&"failed".into()))),
            "{history:#}"
        );
        assert_eq!(
            events.last().map(|e| &e["changes"][0]),
            Some(&"first report".into())
        );
    }
    let timeline = run_ok(&[
        "fleet",
        "--reports",
        &hq.url,
        "--site",
        "site-c",
        "--history",
    ]);
    assert!(
        timeline.contains(&format!(
            "failed: {} (2.0.0)",
            lanup_protocol::short_peer(&failing)
        )),
        "{timeline}"
    );

    // One node of site-a, not its reporter, goes down: headquarters names
    // it as missing from the site's report, in the view and in the table.
    let sender = site(&view, "site-a")["sender"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let down = (0..3)
        .find(|&j| f.sites[0].peer_id(j) != sender)
        .expect("a node that is not the reporter");
    let down_id = f.sites[0].peer_id(down);
    f.sites[0].nodes.procs[down] = None;
    let view = f.hq.wait(
        "site-a's stopped node missing",
        Duration::from_secs(30),
        |v| site(v, "site-a")["missing"] == serde_json::json!([down_id]),
    );
    assert_eq!(site(&view, "site-a")["nodes"], 2, "{view:#}");
    let table = run_ok(&["fleet", "--reports", &f.hq.url]);
    let row = table
        .lines()
        .find(|l| l.starts_with("site-a"))
        .unwrap_or_default();
    assert!(
        row.contains(&format!(
            "1 node(s) missing from its report: {}",
            lanup_protocol::short_peer(&down_id)
        )),
        "{table}"
    );
    let page = reqwest::blocking::get(format!("{}_lanup/fleet", f.hq.url))
        .and_then(|r| r.text())
        .expect("the fleet page");
    let tail = &down_id[down_id.len() - 8..];
    assert!(page.contains(&format!("1 missing: {tail}")), "{page}");

    // site-b goes dark: it is flagged stale, the others are not.
    for p in &mut f.sites[1].nodes.procs {
        *p = None;
    }
    let hq = &f.hq;
    let view = hq.wait("site-b stale", Duration::from_secs(30), |v| {
        site(v, "site-b")["stale"] == true
    });
    assert_eq!(site(&view, "site-a")["stale"], false, "{view:#}");
    assert_eq!(site(&view, "site-c")["stale"], false, "{view:#}");
    let table = run_ok(&["fleet", "--reports", &hq.url]);
    let row = table
        .lines()
        .find(|l| l.starts_with("site-b"))
        .unwrap_or_default();
    assert!(row.contains("STALE"), "{table}");
}

#[test]
fn headquarters_refuses_forged_oversized_and_flooding_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let hq = Hq::start(&www, &tmp.path().join("reports"), "1h");
    let (_, someone) = keygen(tmp.path(), "someone.key");
    let post = |body: Vec<u8>| {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{}_lanup/report", hq.url))
            .body(body)
            .send()
            .expect("origin answers");
        (resp.status().as_u16(), resp.text().unwrap_or_default())
    };
    let forged = serde_json::json!({
        "report": "{\"site\":\"x\",\"sender\":\"12D3KooW\",\"sent_at_ms\":1,\"nodes\":[]}",
        "key": someone,
        "signature": "00".repeat(64),
    });
    let (status, text) = post(forged.to_string().into_bytes());
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("signature"), "{text}");
    let (status, text) = post(vec![b' '; 200 * 1024]);
    assert_eq!(status, 413, "{text}");
    let (status, text) = post(b"{}".to_vec());
    assert_eq!(status, 400, "{text}");
    // Nothing refused was kept.
    assert_eq!(
        hq.fleet()["sites"],
        serde_json::json!([]),
        "refused reports show no site"
    );
    let none = run_fails(&[
        "fleet",
        "--reports",
        s(&tmp.path().join("reports")),
        "--site",
        "x",
        "--history",
    ]);
    assert!(none.contains("no timeline for site \"x\""), "{none}");
    // A node that floods is held back; another node posting from the same
    // address (sites behind one NAT) is not.
    let signed = |key: &SecretKey, site: &str, at: u64| {
        let r = Report {
            site: site.into(),
            sender: key.public().peer_id(),
            sent_at_ms: at,
            nodes: vec![],
            rollout: None,
        };
        serde_json::to_vec(&report::sign(&r, key)).expect("json")
    };
    let (flooder, quiet) = (SecretKey::generate(), SecretKey::generate());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let codes: Vec<u16> = (0..40)
        .map(|i| post(signed(&flooder, "flood", now + i)).0)
        .collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert_eq!(codes[0], 200, "{codes:?}");
    let (status, text) = post(signed(&quiet, "quiet", now));
    assert_eq!(status, 200, "{text}");
}

/// Sites reporting to headquarters (three of two nodes, unless said
/// otherwise), 1.0.0 installed and running everywhere, and 2.0.0 (behaving
/// as `v2_behaviour` says) published and staged at every node. Sites poll
/// every 2 s and report at least every 2 s.
struct FleetUnderTest {
    hq: Hq,
    sites: Vec<ReportingSite>,
    publisher: String,
    www: PathBuf,
    admin: (PathBuf, String),
    /// A second trusted admin key (sites that need two admins).
    other_admin: (PathBuf, String),
    _tmp: tempfile::TempDir,
}

impl FleetUnderTest {
    fn new(v2_behaviour: Option<&str>) -> FleetUnderTest {
        FleetUnderTest::with(&[2, 2, 2], "1h", v2_behaviour)
    }

    /// Sites `site-a`, `site-b` … of `sizes` nodes; headquarters flags a
    /// site stale after `stale_after`.
    fn with(sizes: &[usize], stale_after: &str, v2_behaviour: Option<&str>) -> FleetUnderTest {
        FleetUnderTest::with_threshold(sizes, stale_after, v2_behaviour, 1)
    }

    /// As [`FleetUnderTest::with`]; both admin keys are trusted and the
    /// sites need `threshold` of them for a rollout.
    fn with_threshold(
        sizes: &[usize],
        stale_after: &str,
        v2_behaviour: Option<&str>,
        threshold: usize,
    ) -> FleetUnderTest {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_owned();
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("mkdir");
        let publisher = keygen(&root, "publisher.key");
        let admin = keygen(&root, "admin.key");
        let other_admin = keygen(&root, "other-admin.key");
        let trusted = format!("{}\", \"{}", admin.1, other_admin.1);
        let extra = format!("admin_threshold = {threshold}\n");
        let hq = Hq::start(&www, &root.join("reports"), stale_after);
        let v1 = root.join("v1");
        app_tree(&v1, "1.0.0", None, &[]);
        let r1 = publish(&v1, "1.0.0", &hq.url, &publisher, &www);
        let mut sites: Vec<ReportingSite> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let name = format!("site-{}", char::from(b'a' + k as u8));
                ReportingSite::new(&root, &name, n, &trusted, &extra)
            })
            .collect();
        for site in &mut sites {
            site.start(&hq.url, &publisher.1, &hq.url, "2s");
        }
        let states: Vec<&Path> = sites.iter().flat_map(|s| s.nodes.state_refs()).collect();
        let pending = wait_staged(&states, "1.0.0", &r1, Duration::from_secs(60));
        assert!(pending.is_empty(), "1.0.0 not staged on {pending:?}");
        for state in &states {
            run_ok(&["apply", "1.0.0", "--state", s(state)]);
        }
        let v2 = root.join("v2");
        app_tree(&v2, "2.0.0", v2_behaviour, &[]);
        let r2 = publish(&v2, "2.0.0", &hq.url, &publisher, &www);
        let pending = wait_staged(&states, "2.0.0", &r2, Duration::from_secs(60));
        assert!(pending.is_empty(), "2.0.0 not staged on {pending:?}");
        hq.wait("every site on 1.0.0", Duration::from_secs(30), |v| {
            sites
                .iter()
                .all(|s| site(v, &s.nodes.site)["versions"]["1.0.0"] == s.configs.len())
        });
        FleetUnderTest {
            hq,
            sites,
            publisher: publisher.1,
            www,
            admin,
            other_admin,
            _tmp: tmp,
        }
    }

    /// `lanup rollout 2.0.0 --fleet --sites site-a,100% --wait` at
    /// headquarters.
    fn rollout(&self) -> std::process::Output {
        self.rollout_for("120s")
    }

    /// The same, giving up following after `timeout`.
    fn rollout_for(&self, timeout: &str) -> std::process::Output {
        run(&[
            "rollout",
            "2.0.0",
            "--fleet",
            "--key",
            s(&self.admin.0),
            "--publish-dir",
            s(&self.www),
            "--reports",
            &self.hq.url,
            "--sites",
            "site-a,100%",
            "--waves",
            "1,100%",
            "--wait",
            "--timeout",
            timeout,
        ])
    }

    /// The audit entries of node `i` of site `k` about 2.0.0 with `event`.
    fn events(&self, k: usize, i: usize, event: &str) -> Vec<serde_json::Value> {
        let out = run_ok(&[
            "history",
            "--state",
            s(&self.sites[k].nodes.states[i]),
            "--json",
        ]);
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("history JSON"))
            .filter(|e| e["event"] == event && e["version"] == "2.0.0")
            .collect()
    }
}

fn at_ms(e: &serde_json::Value) -> u64 {
    e["at_ms"].as_u64().expect("at_ms")
}

#[test]
fn a_fleet_rollout_installs_the_named_site_first_and_the_rest_only_once_it_is_healthy() {
    let f = FleetUnderTest::new(None);
    let out = f.rollout();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("fleet rollout of 2.0.0 done"), "{stdout}");
    // site-a applied before any other site heard of the release's rollout.
    let a_applied = (0..2)
        .flat_map(|i| f.events(0, i, "applying"))
        .map(|e| at_ms(&e))
        .max()
        .expect("site-a applied 2.0.0");
    for k in 1..3 {
        for i in 0..2 {
            let accepted = f.events(k, i, "accepted");
            let first = accepted
                .iter()
                .map(at_ms)
                .min()
                .unwrap_or_else(|| panic!("site {k} node {i} never took the rollout"));
            assert!(
                first > a_applied,
                "site {k} node {i} took the rollout at {first}, before site-a applied at {a_applied}"
            );
        }
    }
    let view = f.hq.wait("2.0.0 everywhere", Duration::from_secs(20), |v| {
        ["site-a", "site-b", "site-c"]
            .iter()
            .all(|n| site(v, n)["versions"]["2.0.0"] == 2)
    });
    assert_eq!(view["rollout"]["state"], "done", "{view:#}");
    assert_eq!(
        view["rollout"]["waves"][0]["sites"],
        serde_json::json!(["site-a"])
    );
    // The page shows the sites and the fleet rollout.
    let page = reqwest::blocking::get(format!("{}_lanup/fleet", f.hq.url))
        .and_then(|r| r.text())
        .expect("page");
    for text in [
        "site-a",
        "site-b",
        "site-c",
        "Fleet rollout of 2.0.0",
        "done",
    ] {
        assert!(page.contains(text), "{text} missing from the page:\n{page}");
    }
    browse_fleet_page(&f.hq.url);
}

/// Loads the fleet page in headless Chromium (Debian's `chromium`): the
/// DOM it renders has a row per site and the rollout's waves, and a
/// screenshot of it is a real image. With `LANUP_FLEET_SCREENSHOT=FILE`
/// the screenshot is kept there (docs/fleet.png is made so).
fn browse_fleet_page(url: &str) {
    let page = format!("{url}_lanup/fleet");
    let chromium = |args: &[&str]| chromium(&page, args);
    let dom = String::from_utf8(chromium(&["--dump-dom"])).expect("DOM text");
    for site in ["site-a", "site-b", "site-c"] {
        assert!(
            dom.contains(&format!("<td>{site}</td>")),
            "no row for {site} in the rendered page:\n{dom}"
        );
    }
    assert!(dom.contains("wave 2"), "{dom}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let shot = tmp.path().join("fleet.png");
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1100,520",
    ]);
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot: {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("LANUP_FLEET_SCREENSHOT") {
        std::fs::write(keep, &png).expect("keep the screenshot");
    }
}

/// Runs headless Chromium (Debian's `chromium`) on `page` with `args`;
/// returns what it printed.
fn chromium(page: &str, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            // A container's /dev/shm is small.
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(args)
        .arg(page)
        .output()
        .expect("chromium runs (apt-get install chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Site `i` of the many-site headquarters below.
fn many_site(i: usize) -> String {
    format!("site-{i:05}")
}

#[test]
fn the_fleet_page_of_thousands_of_sites_pages_and_searches_in_a_browser() {
    const SITES: usize = 3_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let (admin_key, admin) = keygen(tmp.path(), "admin.key");
    let admin_secret = lanup_node::keys::load_secret(&admin_key).expect("admin key");
    let reports = tmp.path().join("reports");
    let origin = OriginProc::start_with(&www, &["--reports", s(&reports), "--trust-admin", &admin]);
    let url = origin.url.clone();
    let now = crate::rollout::now_ms();
    // Every site an enrolled node of its own, posting over four
    // connections; site-00007 has a failed node, every 500th runs a
    // release candidate.
    let post = |part: usize| {
        let client = reqwest::blocking::Client::new();
        for i in (part..SITES).step_by(4) {
            let key = SecretKey::generate();
            let id = key.public().peer_id();
            let mut node = report::NodeState {
                id: id.clone(),
                lanup: None,
                installed: Some(if i % 500 == 0 { "2.0-rc1" } else { "1.9.4" }.into()),
                staged: None,
                state: "installed".into(),
                error: None,
                failed: None,
            };
            if i == 7 {
                node.failed = Some("2.0".into());
                node.error = Some("health check failed: exit 3".into());
            }
            let r = Report {
                site: many_site(i),
                sender: id,
                sent_at_ms: now,
                nodes: vec![node],
                rollout: None,
            };
            let mut signed = report::sign(&r, &key);
            signed.membership = Some(lanup_protocol::membership::Certificate::issue(
                &admin_secret,
                &r.site,
                &key.public(),
                now / 1000,
                86_400,
            ));
            let resp = client
                .post(format!("{url}_lanup/report"))
                .body(serde_json::to_vec(&signed).expect("json"))
                .send()
                .expect("headquarters answers");
            assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text());
        }
    };
    std::thread::scope(|scope| {
        for part in 0..4 {
            scope.spawn(move || post(part));
        }
    });
    let fleet = format!("{url}_lanup/fleet");
    let dom = |query: &str| {
        let started = Instant::now();
        let dom = String::from_utf8(chromium(&format!("{fleet}{query}"), &["--dump-dom"]))
            .expect("DOM text");
        eprintln!(
            "fleet page{query}: rendered in a browser in {:?}",
            started.elapsed()
        );
        dom
    };
    let rows = |dom: &str| dom.matches("<tr class=").count();

    let first = dom("");
    assert!(
        first.contains("3000 sites, 1 with failed nodes, 0 stale"),
        "{first}"
    );
    assert_eq!(rows(&first), 100);
    assert!(first.contains("sites 1–100 of 3000"), "{first}");
    assert!(first.contains("page 1 of 30"), "{first}");
    assert!(first.contains(&format!("<td>{}</td>", many_site(99))));
    assert!(!first.contains(&format!("<td>{}</td>", many_site(100))));
    // The "next" link, as the browser parsed it, leads to the next page.
    let next = first
        .split("<a href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a link to the next page")
        .replace("&amp;", "&");
    assert_eq!(next, "?page=2");
    let second = dom(&next);
    assert_eq!(rows(&second), 100);
    assert!(second.contains(&format!("<td>{}</td>", many_site(100))));
    assert!(second.contains("page 2 of 30"), "{second}");

    // What the search form sends: a name, a version, problems only.
    let one = dom("?q=site-02345");
    assert_eq!(rows(&one), 1, "{one}");
    assert!(one.contains(&format!("<td>{}</td>", many_site(2345))));
    let rc = dom("?q=2.0-RC");
    assert_eq!(rows(&rc), SITES / 500, "{rc}");
    assert!(rc.contains("sites 1–6 of 6"), "{rc}");
    let bad = dom("?q=&problems=1");
    assert_eq!(rows(&bad), 1, "{bad}");
    assert!(bad.contains("health check failed: exit 3"), "{bad}");
    assert!(bad.contains("checked"), "the form keeps its choice: {bad}");
    let none = dom("?q=%3Cscript%3E");
    assert!(none.contains("no site matches"), "{none}");
    assert!(none.contains("value=\"&lt;script&gt;\""), "{none}");

    // fleet.json still holds every site (fleet rollouts read them all),
    // and a page of them when asked.
    let json = |path: &str| -> serde_json::Value {
        let text = reqwest::blocking::get(format!("{url}{path}"))
            .and_then(|r| r.text())
            .expect("fleet.json");
        serde_json::from_str(&text).expect("JSON")
    };
    let all = json("_lanup/fleet.json");
    assert_eq!(all["sites"].as_array().map(Vec::len), Some(SITES));
    let paged = json("_lanup/fleet.json?page=3&q=site-01");
    assert_eq!(paged["sites"][0]["site"], many_site(1200));
    assert_eq!(paged["counts"]["matching"], 1000);
}

#[test]
fn a_release_that_fails_at_the_first_site_halts_the_fleet_and_no_other_site_begins() {
    let f = FleetUnderTest::new(Some("exit"));
    let out = f.rollout();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("halted by site site-a"), "{stderr}");
    for k in 1..3 {
        for i in 0..2 {
            assert!(
                f.events(k, i, "accepted").is_empty(),
                "site {k} node {i} began a rollout of 2.0.0"
            );
            assert_eq!(
                own_status(&f.sites[k].nodes.states[i])["installed_version"],
                "1.0.0"
            );
        }
    }
    let view = f.hq.fleet();
    assert_eq!(view["rollout"]["state"], "halted", "{view:#}");
    assert_eq!(view["rollout"]["site"], "site-a", "{view:#}");
    // Running it again does not go on: the fleet rollout stays halted.
    let again = f.rollout();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        !text.contains("wave 2 of 2 open"),
        "a halted fleet rollout opened its next wave:\n{text}"
    );
}

#[test]
fn a_site_offline_when_its_wave_opens_catches_up_and_the_fleet_rollout_goes_on() {
    let mut f = FleetUnderTest::new(None);
    // site-c goes dark (its nodes stop; its application keeps running).
    for p in &mut f.sites[2].nodes.procs {
        *p = None;
    }
    let out = f.rollout_for("25s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the wave with site-c cannot finish while it is away:\n{stdout}"
    );
    assert!(stdout.contains("wave 2 of 2 open"), "{stdout}");
    let view = f.hq.fleet();
    assert_eq!(site(&view, "site-b")["versions"]["2.0.0"], 2, "{view:#}");
    assert_eq!(site(&view, "site-c")["versions"]["1.0.0"], 2, "{view:#}");
    // site-c comes back: its fetcher reads the fleet rollout with its first
    // poll, and the site installs.
    let (url, publisher) = (f.hq.url.clone(), f.publisher.clone());
    f.sites[2].start(&url, &publisher, &url, "2s");
    let out = f.rollout();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("going on with fleet rollout"), "{stdout}");
    assert!(stdout.contains("fleet rollout of 2.0.0 done"), "{stdout}");
    for i in 0..2 {
        let accepted = f.events(2, i, "accepted");
        assert_eq!(accepted.len(), 1, "site-c node {i}: {accepted:?}");
        assert_eq!(
            own_status(&f.sites[2].nodes.states[i])["installed_version"],
            "2.0.0"
        );
    }
}

#[test]
fn headquarters_that_never_answers_holds_up_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("app");
    write(&app, "bin/app", &pseudo_random(2 * 1024 * 1024, 3));
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("mkdir");
    let key = keygen(tmp.path(), "publisher.key");
    let origin = OriginProc::start(&www, None);
    let release = publish(&app, "1.0", &origin.url, &key, &www);
    // Headquarters takes connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let hq = format!("http://{}/", silent.local_addr().expect("addr"));
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(16) {
            conns.push(c);
        }
    });
    let mut site = LoopSite::new(tmp.path(), 3);
    for i in 0..3 {
        let mut cmd = site.command(i, Some(&origin.url), &release.public);
        cmd.args(["--report-to", &hq, "--report-interval", "1s"]);
        site.start(i, cmd);
    }
    let started = Instant::now();
    let pending = wait_staged(&site.state_refs(), "1.0", &release, Duration::from_secs(30));
    assert!(
        pending.is_empty(),
        "not staged while headquarters hangs: {pending:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&run_ok(&[
        "status",
        "--state",
        s(&site.states[0]),
        "--json",
    ]))
    .expect("status JSON");
    assert_eq!(
        status["nodes"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    eprintln!("staged in {:?} with headquarters silent", started.elapsed());
    drop(site);
    drop(held);
}

#[test]
fn an_aborted_fleet_rollout_opens_no_further_wave() {
    let f = FleetUnderTest::new(None);
    let fleet = |extra: &[&str]| {
        let mut args = vec![
            "rollout",
            "--fleet",
            "--key",
            s(&f.admin.0),
            "--publish-dir",
            s(&f.www),
            "--reports",
            &f.hq.url,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    // One run without --wait opens the first wave and returns.
    let out = fleet(&["2.0.0", "--sites", "site-a,100%", "--waves", "1,100%"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("wave 1 of 2 open: site-a"), "{stdout}");
    f.hq.wait("site-a began", Duration::from_secs(20), |v| {
        site(v, "site-a")["rollout"]["version"] == "2.0.0"
    });
    let out = fleet(&["--abort"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("aborted"), "{stdout}");
    // site-a got its abort with its next poll; a later run opens nothing.
    let view =
        f.hq.wait("site-a took the abort", Duration::from_secs(20), |v| {
            let r = &site(v, "site-a")["rollout"];
            r["stage"] == "done" || r["stage"] == "halted"
        });
    assert_eq!(view["rollout"]["state"], "aborted", "{view:#}");
    let again = fleet(&["--abort"]);
    assert_eq!(again.status.code(), Some(1), "nothing left to abort");
    std::thread::sleep(Duration::from_secs(5));
    for k in 1..3 {
        for i in 0..2 {
            assert!(
                f.events(k, i, "accepted").is_empty(),
                "site {k} node {i} began after the abort"
            );
        }
    }
    for i in 0..2 {
        let accepted = f.events(0, i, "accepted");
        assert!(!accepted.is_empty(), "site-a node {i} never heard of it");
    }
}

#[test]
fn a_fleet_rollout_for_sites_that_need_two_admins_begins_nowhere_before_the_second_approves() {
    let f = FleetUnderTest::with_threshold(&[2, 2], "1h", None, 2);
    let fleet_args = |key: &Path| -> Vec<String> {
        [
            "rollout",
            "2.0.0",
            "--fleet",
            "--approvals",
            "2",
            "--reason",
            "quarterly",
            "--key",
            s(key),
            "--publish-dir",
            s(&f.www),
            "--reports",
            &f.hq.url,
            "--sites",
            "site-a,100%",
            "--waves",
            "100%",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
    };
    let args = fleet_args(&f.admin.0);
    let out = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("waiting for approval, 1 of 2"), "{out}");
    let id = out
        .split("fleet rollout ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("fleet id")
        .to_owned();
    // Asked again, it still waits: no site holds a command.
    let again = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.contains("waiting for approval"), "{again}");
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.www.join("fleet-rollout.json")).expect("fleet file"),
    )
    .expect("JSON");
    assert_eq!(file["commands"], serde_json::json!({}), "{file:#}");
    // Headquarters' view says so.
    let view = run_ok(&["fleet", "--reports", &f.hq.url]);
    assert!(
        view.contains(&format!(
            "fleet rollout {id} of 2.0.0: waiting for approval, 1 of 2"
        )),
        "{view}"
    );
    // The same admin again does not count.
    let approve = |key: &Path| {
        run(&[
            "approve",
            &id,
            "--fleet",
            "--publish-dir",
            s(&f.www),
            "--key",
            s(key),
        ])
    };
    let twice = approve(&f.admin.0);
    assert!(!twice.status.success());
    std::thread::sleep(Duration::from_secs(3));
    for (k, site) in f.sites.iter().enumerate() {
        for i in 0..2 {
            assert!(
                f.events(k, i, "accepted").is_empty(),
                "site {k} node {i} began"
            );
            assert_eq!(
                own_status(&site.nodes.states[i])["installed_version"],
                "1.0.0"
            );
        }
    }
    // The second admin approves; headquarters goes on; every site, which
    // needs two admins, takes its part on the plan's two signatures.
    let out = approve(&f.other_admin.0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("2 of 2"),
        "{stdout}"
    );
    let mut args = fleet_args(&f.admin.0);
    args.extend(["--wait".into(), "--timeout".into(), "120s".into()]);
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in 0..2 {
        for i in 0..2 {
            let accepted = f.events(k, i, "accepted");
            assert!(
                accepted.iter().any(|e| e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("approved by 2 of 2"))),
                "site {k} node {i}: {accepted:?}"
            );
        }
    }
}
