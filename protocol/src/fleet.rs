//! Fleet rollouts: a release rolled out site by site from headquarters.
//!
//! Headquarters writes [`FLEET_FILE`] beside the manifest. It holds, for
//! every site of the waves opened so far, an ordinary rollout command
//! signed by an admin key for that site (see [`crate::rollout`]): each
//! site's fetcher reads the file with its manifest poll and hands its own
//! site's command to its node, which checks it like one typed on its CLI
//! (trusted admin key, this site, freshness, no replay) and gossips it to
//! the site, whose node waves then run as for any rollout. A command of a
//! fleet rollout names the fleet rollout, and stays valid for the
//! rollout's validity (`lanup rollout --fleet --valid`, 14 days by
//! default, [`crate::rollout::FLEET_VALID_MS`]), so a site that was
//! offline for days when its wave opened catches up when it next polls;
//! nodes remember its id as long, so it is never taken twice.
//!
//! Headquarters opens the next site wave only when every site of the waves
//! before reports the release installed on every node; a site that halts
//! (a node failed the release) halts the fleet: no further site begins.
//!
//! Where sites need more than one admin (`admin_threshold`), the fleet
//! rollout is first a request: a [`FleetPlan`] signed by the admin who asks,
//! which others approve over its exact bytes; no site begins before enough
//! have. Each site command carries the plan, and a site counts the plan's
//! signers (its own trusted keys only) with the command's ([`endorsers`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::report::SiteView;
use crate::rollout::{Action, Command, SignedCommand, WaveSize};
use crate::sign::PublicKey;

/// The fleet rollout's file, beside `AutoUpdater.xml`.
pub const FLEET_FILE: &str = "fleet-rollout.json";
/// The largest fleet file a fetcher reads.
pub const MAX_FLEET_BYTES: usize = 4 << 20;

/// One site wave as given: a named site, or a cumulative share of the
/// sites that report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteWave {
    Site(String),
    Percent(u8),
}

/// Reads `lab-site,10%,100%`: named sites first (one wave each), then
/// shares. The last wave always takes every site left.
pub fn parse_site_waves(text: &str) -> Result<Vec<SiteWave>, String> {
    let mut waves = Vec::new();
    for item in text.split(',').map(str::trim) {
        let wave = match item.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => SiteWave::Percent(p),
                _ => return Err(format!("site wave {item:?}: a share is 1% to 100%")),
            },
            None if crate::report::valid_site(item) => SiteWave::Site(item.to_owned()),
            None => return Err(format!("site wave {item:?}: not a site name or a share")),
        };
        if matches!(wave, SiteWave::Site(_))
            && waves.iter().any(|w| matches!(w, SiteWave::Percent(_)))
        {
            return Err(format!(
                "site wave {item:?}: named sites come before the shares"
            ));
        }
        waves.push(wave);
    }
    if waves.is_empty() {
        return Err("no site waves given".into());
    }
    Ok(waves)
}

/// The sites of each wave: named sites first, then the others in an order
/// drawn from the rollout's `id`, each share cumulative over all `sites`.
/// A named site that does not report is an error: it would hold the
/// rollout for good.
pub fn assign_site_waves(
    id: &str,
    sites: &[String],
    waves: &[SiteWave],
) -> Result<Vec<Vec<String>>, String> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut taken: Vec<String> = Vec::new();
    for w in waves {
        if let SiteWave::Site(name) = w {
            if !sites.contains(name) {
                return Err(format!(
                    "site {name:?} has not reported to headquarters; known sites: {}",
                    sites.join(", ")
                ));
            }
            if !taken.contains(name) {
                taken.push(name.clone());
                out.push(vec![name.clone()]);
            }
        }
    }
    let mut rest: Vec<(blake3::Hash, &String)> = sites
        .iter()
        .filter(|s| !taken.contains(s))
        .map(|s| (blake3::hash(format!("{id}/{s}").as_bytes()), s))
        .collect();
    rest.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(b.1)));
    let shares: Vec<u8> = waves
        .iter()
        .filter_map(|w| match w {
            SiteWave::Percent(p) => Some(*p),
            SiteWave::Site(_) => None,
        })
        .collect();
    let total = sites.len();
    let mut next = 0;
    for (i, p) in shares.iter().enumerate() {
        let upto = if i + 1 == shares.len() {
            rest.len()
        } else {
            (total * *p as usize)
                .div_ceil(100)
                .saturating_sub(taken.len())
                .clamp(next, rest.len())
        };
        if upto > next {
            out.push(rest[next..upto].iter().map(|(_, s)| (*s).clone()).collect());
            next = upto;
        }
    }
    if next < rest.len() {
        // Only named waves were given: the rest go last.
        out.push(rest[next..].iter().map(|(_, s)| (*s).clone()).collect());
    }
    Ok(out)
}

/// Where a fleet rollout stands, as its file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum FleetState {
    Running,
    Halted { site: String, reason: String },
    Aborted { by: String },
    Done,
}

/// The fleet rollout file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetFile {
    /// 32 hex digits.
    pub id: String,
    pub version: String,
    /// The admin key that runs it.
    pub key: String,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// Sites per wave.
    pub waves: Vec<Vec<String>>,
    /// How many waves are open (their sites hold a command).
    pub open: usize,
    #[serde(flatten)]
    pub state: FleetState,
    /// Each site's signed command: its rollout, or its abort.
    pub commands: BTreeMap<String, SignedCommand>,
    /// The plan as requested and approved, where it needs approvals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<SignedCommand>,
    /// Distinct admin signatures on the plan before a site begins (1: the
    /// requester's alone).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub approvals_needed: usize,
    /// How long each site's command stays valid for a site that was away
    /// (ms; [`crate::rollout::FLEET_VALID_MS`] when not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for_ms: Option<u64>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// What the admins of a fleet rollout approve: the rollout, its release,
/// its site waves (by hash: a plan stays small whatever the fleet) and the
/// node waves of each site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPlan {
    pub fleet: String,
    pub version: String,
    /// BLAKE3 of the site waves' JSON.
    pub sites: String,
    pub node_waves: Vec<WaveSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub issued_at_ms: u64,
}

impl FleetPlan {
    /// The hash of `waves` as a plan names them.
    pub fn hash_sites(waves: &[Vec<String>]) -> String {
        blake3::hash(&serde_json::to_vec(waves).unwrap_or_default())
            .to_hex()
            .to_string()
    }
}

/// The keys among `trusted` that signed the plan `command` carries, when
/// that plan is the one of `command`'s fleet rollout and release; none
/// otherwise. An abort needs no plan (one key may always stop).
pub fn endorsers(
    signed: &SignedCommand,
    command: &Command,
    trusted: &[PublicKey],
) -> Vec<PublicKey> {
    let (Some(plan_signed), Some(fleet), Action::Rollout { version }) =
        (&signed.plan, &command.fleet, &command.action)
    else {
        return Vec::new();
    };
    let Ok(plan) = serde_json::from_str::<FleetPlan>(&plan_signed.command) else {
        return Vec::new();
    };
    if &plan.fleet != fleet || &plan.version != version {
        return Vec::new();
    }
    crate::approval::tally(plan_signed, &plan_signed.approvals, trusted, 1).keys
}

/// The distinct keys whose signatures over the plan hold, whoever they
/// are (headquarters keeps no list of trusted keys; the sites check them).
pub fn plan_signers(plan: &SignedCommand) -> Vec<PublicKey> {
    let keys: Vec<PublicKey> = std::iter::once(plan.key.as_str())
        .chain(plan.approvals.iter().map(|a| a.key.as_str()))
        .filter_map(|k| k.parse().ok())
        .collect();
    crate::approval::tally(plan, &plan.approvals, &keys, 1).keys
}

/// What headquarters should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetStep {
    /// Wave `n` (from 0) is under way: wait.
    Wait(usize),
    /// Every open wave is installed: open wave `n`.
    Open(usize),
    /// A site halted: no further site begins.
    Halt { site: String, reason: String },
    /// Every wave is installed everywhere.
    Done,
}

/// How far each site of a fleet rollout is: (sites installed, sites).
pub fn wave_progress(file: &FleetFile, views: &[SiteView]) -> Vec<(usize, usize)> {
    let installed: std::collections::BTreeSet<&str> = views
        .iter()
        .filter(|v| site_installed(file, &v.site, v))
        .map(|v| v.site.as_str())
        .collect();
    wave_progress_of(file, |site| installed.contains(site))
}

/// How far each wave is, given which sites run the release (see
/// [`site_installed`]): headquarters reads its sites one at a time.
pub fn wave_progress_of(file: &FleetFile, installed: impl Fn(&str) -> bool) -> Vec<(usize, usize)> {
    file.waves
        .iter()
        .map(|w| (w.iter().filter(|s| installed(s)).count(), w.len()))
        .collect()
}

/// Whether `site` runs the fleet rollout's release: its report is fresh
/// and lists every node on it, none failed it, and every node its command
/// named is among them. A site back from being offline may report before
/// its reporter hears its peers: a report listing the reporter alone does
/// not finish a site of several nodes.
pub fn site_installed(file: &FleetFile, site: &str, v: &SiteView) -> bool {
    v.installed(&file.version)
        && site_part(file, site).is_none_or(|c| c.nodes.iter().all(|n| v.node_ids.contains(n)))
}

/// The command `site` was sent as its part of the fleet rollout, once its
/// wave opened.
fn site_part(file: &FleetFile, site: &str) -> Option<Command> {
    file.commands
        .get(site)
        .and_then(|c| serde_json::from_str::<Command>(&c.command).ok())
}

/// The next step of a running fleet rollout, from the sites' reports.
pub fn next_step(file: &FleetFile, views: &[SiteView]) -> FleetStep {
    let by_name: BTreeMap<&str, &SiteView> = views.iter().map(|v| (v.site.as_str(), v)).collect();
    for site in file.waves.iter().take(file.open).flatten() {
        let Some(v) = by_name.get(site.as_str()) else {
            continue;
        };
        if let Some(f) = v
            .failed
            .iter()
            .find(|f| f.version.as_deref() == Some(&file.version))
        {
            return FleetStep::Halt {
                site: site.clone(),
                reason: format!(
                    "node {} did not install {}: {}",
                    f.node, file.version, f.error
                ),
            };
        }
        let command_id = site_part(file, site).map(|c| c.id);
        if let Some(r) = v
            .rollout
            .as_ref()
            .filter(|r| Some(&r.id) == command_id.as_ref())
        {
            if r.stage == "halted" {
                return FleetStep::Halt {
                    site: site.clone(),
                    reason: r
                        .reason
                        .clone()
                        .unwrap_or_else(|| "its rollout halted".into()),
                };
            }
        }
    }
    let progress = wave_progress(file, views);
    for (i, (done, of)) in progress.iter().enumerate().take(file.open) {
        if done < of {
            return FleetStep::Wait(i);
        }
    }
    if file.open < file.waves.len() {
        FleetStep::Open(file.open)
    } else {
        FleetStep::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{FailedNode, RolloutState};

    fn sites(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("site-{i:03}")).collect()
    }

    #[test]
    fn a_sites_part_counts_the_plans_trusted_signers_for_its_own_fleet_and_release() {
        use crate::sign::SecretKey;
        let (alice, bob, mallory) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let plan = |fleet: &str, version: &str| {
            let text = serde_json::to_string(&FleetPlan {
                fleet: fleet.into(),
                version: version.into(),
                sites: FleetPlan::hash_sites(&[sites(3)]),
                node_waves: Vec::new(),
                reason: None,
                issued_at_ms: 1,
            })
            .expect("JSON");
            let mut p = crate::rollout::sign(&Command::new("", Action::Abort, 0, ""), &alice);
            p.signature = alice.sign(text.as_bytes()).to_hex();
            p.command = text;
            p.approvals = vec![
                crate::approval::approve(&p, &bob),
                crate::approval::approve(&p, &mallory),
            ];
            p
        };
        let part = |fleet: &str, version: &str, with: SignedCommand| {
            let command = Command {
                fleet: Some(fleet.into()),
                valid_for_ms: None,
                ..Command::new(
                    "s",
                    Action::Rollout {
                        version: version.into(),
                    },
                    1,
                    "c",
                )
            };
            let mut signed = crate::rollout::sign(&command, &alice);
            signed.plan = Some(Box::new(with));
            (signed, command)
        };
        let trusted = vec![alice.public(), bob.public()];
        let (signed, command) = part("f1", "2.0", plan("f1", "2.0"));
        // Mallory signed the plan but is not trusted here.
        assert_eq!(
            endorsers(&signed, &command, &trusted),
            vec![alice.public(), bob.public()]
        );
        // A plan of another fleet rollout, or another release, counts for
        // nothing.
        let (signed, command) = part("f1", "2.0", plan("f2", "2.0"));
        assert!(endorsers(&signed, &command, &trusted).is_empty());
        let (signed, command) = part("f1", "2.0", plan("f1", "3.0"));
        assert!(endorsers(&signed, &command, &trusted).is_empty());
        // Headquarters counts every valid signature.
        assert_eq!(plan_signers(&plan("f1", "2.0")).len(), 3);
    }

    #[test]
    fn named_sites_go_first_then_cumulative_shares_of_the_rest() -> Result<(), String> {
        let waves = parse_site_waves("site-007,10%,100%")?;
        let w = assign_site_waves("abc", &sites(50), &waves)?;
        assert_eq!(w[0], vec!["site-007".to_owned()]);
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 4, 45]);
        let mut all: Vec<String> = w.concat();
        all.sort();
        assert_eq!(all, sites(50), "every site once");
        assert_eq!(w, assign_site_waves("abc", &sites(50), &waves)?);
        assert_ne!(w, assign_site_waves("abd", &sites(50), &waves)?);
        // A named site that never reported would hold the rollout forever.
        assert!(assign_site_waves("x", &sites(3), &parse_site_waves("lab,100%")?).is_err());
        assert!(parse_site_waves("10%,lab").is_err());
        assert!(parse_site_waves("0%").is_err());
        assert!(parse_site_waves("../x").is_err());
        // Only a named wave: the others follow in one wave.
        let w = assign_site_waves("x", &sites(3), &parse_site_waves("site-001")?)?;
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 2]);
        Ok(())
    }

    fn view(site: &str, installed: &str, n: usize) -> SiteView {
        SiteView {
            site: site.into(),
            nodes: n,
            node_ids: vec![],
            versions: [(installed.to_owned(), n)].into(),
            lanup_versions: BTreeMap::new(),
            failed: vec![],
            last_report_s: 1,
            stale: false,
            new_nodes: vec![],
            missing: vec![],
            sender: "x".into(),
            unlisted_sender: false,
            rollout: None,
        }
    }

    fn file(open: usize) -> FleetFile {
        FleetFile {
            id: "f".into(),
            version: "2.0".into(),
            key: "k".into(),
            started_ms: 0,
            updated_ms: 0,
            waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
            open,
            state: FleetState::Running,
            commands: BTreeMap::new(),
            plan: None,
            approvals_needed: 1,
            valid_for_ms: None,
        }
    }

    #[test]
    fn the_next_wave_opens_only_when_every_site_before_installed() {
        let f = file(1);
        let old = [
            view("a", "1.0", 2),
            view("b", "1.0", 2),
            view("c", "1.0", 1),
        ];
        assert_eq!(next_step(&f, &old), FleetStep::Wait(0));
        let a_done = [
            view("a", "2.0", 2),
            view("b", "1.0", 2),
            view("c", "1.0", 1),
        ];
        assert_eq!(next_step(&f, &a_done), FleetStep::Open(1));
        let f = file(2);
        let b_done = [
            view("a", "2.0", 2),
            view("b", "2.0", 2),
            view("c", "1.0", 1),
        ];
        assert_eq!(next_step(&f, &b_done), FleetStep::Wait(1));
        assert_eq!(wave_progress(&f, &b_done), vec![(1, 1), (1, 2)]);
        let all = [
            view("a", "2.0", 2),
            view("b", "2.0", 2),
            view("c", "2.0", 1),
        ];
        assert_eq!(next_step(&f, &all), FleetStep::Done);
        // A stale site is not counted as installed.
        let mut stale = all.clone();
        stale[2].stale = true;
        assert_eq!(next_step(&f, &stale), FleetStep::Wait(1));
    }

    #[test]
    fn a_site_whose_report_leaves_out_a_node_its_command_named_is_not_done() {
        let mut f = file(2);
        let mut part = Command::new(
            "c",
            Action::Rollout {
                version: "2.0".into(),
            },
            1,
            "x",
        );
        part.nodes = vec!["n1".into(), "n2".into()];
        let signed = crate::rollout::sign(&part, &crate::sign::SecretKey::generate());
        f.commands.insert("c".into(), signed);
        let mut c = view("c", "2.0", 1);
        // Back from being offline, its reporter has not heard n2 yet.
        c.node_ids = vec!["n1".into()];
        let sites = [view("a", "2.0", 2), view("b", "2.0", 2), c.clone()];
        assert_eq!(next_step(&f, &sites), FleetStep::Wait(1));
        assert_eq!(wave_progress(&f, &sites), vec![(1, 1), (1, 2)]);
        c.node_ids.push("n2".into());
        c.nodes = 2;
        c.versions = [("2.0".to_owned(), 2)].into();
        let sites = [view("a", "2.0", 2), view("b", "2.0", 2), c];
        assert_eq!(next_step(&f, &sites), FleetStep::Done);
    }

    #[test]
    fn a_failed_node_or_a_halted_site_rollout_halts_the_fleet() {
        let f = file(1);
        let mut a = view("a", "1.0", 2);
        a.failed.push(FailedNode {
            node: "n1".into(),
            version: Some("2.0".into()),
            error: "health check failed".into(),
        });
        match next_step(&f, &[a]) {
            FleetStep::Halt { site, reason } => {
                assert_eq!(site, "a");
                assert!(reason.contains("health check failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // An older failure (another version) does not count.
        let mut a = view("a", "1.0", 2);
        a.failed.push(FailedNode {
            node: "n1".into(),
            version: Some("1.5".into()),
            error: "x".into(),
        });
        assert_eq!(next_step(&f, &[a]), FleetStep::Wait(0));
        // A site not opened yet is not looked at.
        let mut c = view("c", "1.0", 1);
        c.rollout = Some(RolloutState {
            id: "other".into(),
            action: "rollout".into(),
            version: "2.0".into(),
            stage: "halted".into(),
            reason: None,
        });
        assert_eq!(next_step(&f, &[view("a", "1.0", 2), c]), FleetStep::Wait(0));
    }
}
