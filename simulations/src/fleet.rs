//! A fleet rollout from headquarters, in simulated time, driven by the
//! rules the real commands use: site waves from
//! [`lanup_protocol::fleet::assign_site_waves`], the next step from
//! [`lanup_protocol::fleet::next_step`] over the sites' reported state,
//! and each site's node waves from [`lanup_protocol::rollout`].
//!
//! What the model gives them in place of sockets and clocks:
//! * headquarters looks at the reports every 2 s (as `--wait` does) and
//!   opens the next wave when the rules say;
//! * a site learns of its wave at its fetcher's next poll (each site's
//!   polls fall at a phase of their own) plus one WAN round trip, and its
//!   nodes at once (gossip);
//! * a node applies for `apply` (stop, swap, start, health check), ± 20 %;
//!   the others hear it installed with its next heartbeat (1 s);
//! * the site reports a change one heartbeat plus up to 5 s later (the
//!   reporter's spread), and headquarters sees the state as reported.
//!
//! The release is taken to be staged at every site when the rollout
//! starts (sites download a release as soon as it is published; the
//! distribution itself is what [`crate::simulate_site`] models).

use std::collections::BTreeMap;

use lanup_protocol::fleet::{
    assign_site_waves, next_step, parse_site_waves, FleetFile, FleetState, FleetStep,
};
use lanup_protocol::report::SiteView;
use lanup_protocol::rollout::{assign_waves, evaluate, NodeReport, Stage, WaveSize};
use serde::{Deserialize, Serialize};

use crate::Rng;

/// What the fleet and its rollout are like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRolloutModel {
    pub sites: usize,
    pub nodes_per_site: usize,
    /// Site waves as given to `lanup rollout --fleet --sites`.
    pub site_waves: String,
    /// Node waves within each site (`--waves`).
    pub node_waves: Vec<WaveSize>,
    pub poll_interval_ms: u64,
    pub wan_rtt_ms: u64,
    pub apply_ms: u64,
}

/// When each site wave opened and was seen installed, in seconds from
/// the start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaveTimes {
    pub sites: usize,
    pub opened_s: f64,
    /// When headquarters saw every site of it installed.
    pub installed_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetRolloutResult {
    pub waves: Vec<WaveTimes>,
    /// From the start to headquarters seeing every site installed.
    pub total_s: f64,
    /// From the last node's install to headquarters seeing it.
    pub last_seen_after_s: f64,
}

const STEP_MS: u64 = 100;
const HQ_LOOK_MS: u64 = 2_000;
const HEARTBEAT_MS: u64 = 1_000;
const REPORT_SPREAD_MS: u64 = 5_000;

struct Site {
    name: String,
    nodes: Vec<String>,
    phase_ms: u64,
    /// When its command arrives, once its wave opened.
    command_at: Option<u64>,
    waves: Vec<Vec<String>>,
    applying_until: BTreeMap<String, u64>,
    installed_at: BTreeMap<String, u64>,
    report_at: Option<u64>,
    /// Nodes installed as headquarters last heard.
    reported: usize,
}

/// Runs the fleet rollout to its end (or for 24 simulated hours).
pub fn simulate_fleet_rollout(
    m: &FleetRolloutModel,
    seed: u64,
) -> Result<FleetRolloutResult, String> {
    let mut rng = Rng::new(seed);
    let names: Vec<String> = (0..m.sites).map(|i| format!("site-{i:04}")).collect();
    let id = format!("{seed:032x}");
    let waves = assign_site_waves(&id, &names, &parse_site_waves(&m.site_waves)?)?;
    let mut sites: Vec<Site> = names
        .iter()
        .map(|name| {
            let nodes: Vec<String> = (0..m.nodes_per_site)
                .map(|j| format!("{name}/node{j}"))
                .collect();
            Site {
                name: name.clone(),
                waves: assign_waves(name, &nodes, &m.node_waves),
                nodes,
                phase_ms: rng.next_u64() % m.poll_interval_ms.max(1),
                command_at: None,
                applying_until: BTreeMap::new(),
                installed_at: BTreeMap::new(),
                report_at: None,
                reported: 0,
            }
        })
        .collect();
    let index: BTreeMap<String, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    let mut file = FleetFile {
        id,
        version: "2".into(),
        key: String::new(),
        started_ms: 0,
        updated_ms: 0,
        waves,
        open: 0,
        state: FleetState::Running,
        commands: BTreeMap::new(),
        plan: None,
        approvals_needed: 1,
        valid_for_ms: None,
    };
    let mut times: Vec<WaveTimes> = Vec::new();
    let mut t = 0u64;
    let mut last_install = 0u64;
    while t < 24 * 3600 * 1000 {
        if t.is_multiple_of(HQ_LOOK_MS) {
            let views: Vec<SiteView> = sites.iter().map(|s| view(s, m.nodes_per_site)).collect();
            match next_step(&file, &views) {
                FleetStep::Open(n) => {
                    if let Some(before) = n.checked_sub(1).and_then(|b| times.get_mut(b)) {
                        before.installed_s = t as f64 / 1000.0;
                    }
                    file.open = n + 1;
                    times.push(WaveTimes {
                        sites: file.waves[n].len(),
                        opened_s: t as f64 / 1000.0,
                        installed_s: 0.0,
                    });
                    for name in &file.waves[n] {
                        let s = &mut sites[index[name]];
                        let p = m.poll_interval_ms.max(1);
                        let next_poll = s.phase_ms + t.saturating_sub(s.phase_ms).div_ceil(p) * p;
                        s.command_at = Some(next_poll + m.wan_rtt_ms);
                    }
                }
                FleetStep::Wait(_) => {}
                FleetStep::Done => {
                    if let Some(w) = times.last_mut() {
                        w.installed_s = t as f64 / 1000.0;
                    }
                    return Ok(FleetRolloutResult {
                        waves: times,
                        total_s: t as f64 / 1000.0,
                        last_seen_after_s: t.saturating_sub(last_install) as f64 / 1000.0,
                    });
                }
                FleetStep::Halt { site, reason } => {
                    return Err(format!("halted by {site}: {reason}"));
                }
            }
        }
        for s in &mut sites {
            let changed = step_site(s, t, m, &mut rng);
            if changed {
                last_install = t;
                if s.report_at.is_none() {
                    s.report_at = Some(t + HEARTBEAT_MS + rng.next_u64() % REPORT_SPREAD_MS);
                }
            }
            if s.report_at.is_some_and(|at| at <= t) {
                s.report_at = None;
                s.reported = s.installed_at.len();
            }
        }
        t += STEP_MS;
    }
    Err("not done after 24 simulated hours".into())
}

/// One step of a site's own rollout; true when a node finished its apply.
fn step_site(s: &mut Site, t: u64, m: &FleetRolloutModel, rng: &mut Rng) -> bool {
    if s.command_at.is_none_or(|at| t < at) {
        return false;
    }
    let mut changed = false;
    let done: Vec<String> = s
        .applying_until
        .iter()
        .filter(|(_, &until)| until <= t)
        .map(|(n, _)| n.clone())
        .collect();
    for n in done {
        s.applying_until.remove(&n);
        s.installed_at.insert(n, t);
        changed = true;
    }
    // What the nodes hear of each other: an install, one heartbeat later.
    let heard: BTreeMap<String, NodeReport> = s
        .nodes
        .iter()
        .map(|n| {
            let installed = s
                .installed_at
                .get(n)
                .filter(|&&at| at + HEARTBEAT_MS <= t)
                .map(|_| "2".to_owned());
            (
                n.clone(),
                NodeReport {
                    installed,
                    failed: None,
                },
            )
        })
        .collect();
    if let Stage::Wave(w) = evaluate(&s.waves, "2", &heard) {
        for n in s.waves.iter().take(w + 1).flatten() {
            if !s.installed_at.contains_key(n) && !s.applying_until.contains_key(n) {
                let jitter = 0.8 + 0.4 * rng.unit();
                let took = (m.apply_ms as f64 * jitter) as u64;
                s.applying_until.insert(n.clone(), t + took);
            }
        }
    }
    changed
}

fn view(s: &Site, nodes: usize) -> SiteView {
    let mut versions = BTreeMap::new();
    if s.reported > 0 {
        versions.insert("2".to_owned(), s.reported);
    }
    if s.reported < nodes {
        versions.insert("1".to_owned(), nodes - s.reported);
    }
    SiteView {
        site: s.name.clone(),
        nodes,
        node_ids: Vec::new(),
        versions,
        lanup_versions: BTreeMap::new(),
        failed: Vec::new(),
        last_report_s: 0,
        stale: false,
        new_nodes: Vec::new(),
        missing: Vec::new(),
        sender: String::new(),
        unlisted_sender: false,
        rollout: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanup_protocol::rollout::parse_waves;

    fn model(sites: usize) -> FleetRolloutModel {
        FleetRolloutModel {
            sites,
            nodes_per_site: 5,
            site_waves: "site-0000,10%,100%".into(),
            node_waves: parse_waves("1,100%").expect("waves"),
            poll_interval_ms: 60_000,
            wan_rtt_ms: 200,
            apply_ms: 5_000,
        }
    }

    #[test]
    fn each_wave_opens_after_the_one_before_is_seen_installed() -> Result<(), String> {
        let r = simulate_fleet_rollout(&model(40), 7)?;
        assert_eq!(
            r.waves.iter().map(|w| w.sites).collect::<Vec<_>>(),
            vec![1, 3, 36]
        );
        for pair in r.waves.windows(2) {
            assert!(pair[1].opened_s >= pair[0].installed_s, "{r:?}");
        }
        // Each wave waits for a poll (under a minute), two node waves of
        // about 5 s, and the reports.
        for w in &r.waves {
            let took = w.installed_s - w.opened_s;
            assert!((10.0..80.0).contains(&took), "{r:?}");
        }
        assert!(r.last_seen_after_s <= 8.0, "{r:?}");
        Ok(())
    }
}
