//! Rollout commands: what an administrator signs on any node and every node
//! of the site checks before it acts, and the canary waves they run in.
//!
//! A command is JSON signed as it is sent: the signature covers the exact
//! bytes, as for manifests, so nothing is re-serialised before checking.
//! A node accepts a command only when a trusted admin key signed it, it names
//! this site, it is fresh ([`MAX_AGE`], with [`MAX_SKEW`] for clocks ahead),
//! and its id was not seen before (no replay). Waves are assigned from the
//! command's id and the nodes it names, so every node computes the same plan.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::sign::{PublicKey, SecretKey};

/// A command older than this is refused: it cannot be replayed later.
pub const MAX_AGE_MS: u64 = 10 * 60 * 1000;
/// A command from up to this far in the future is accepted (clock skew).
pub const MAX_SKEW_MS: u64 = 2 * 60 * 1000;

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Install `version` across the site, wave by wave.
    Rollout { version: String },
    /// Stop the rollout under way: no further wave applies.
    Abort,
    /// Return to `version`, which the nodes still hold (the only way to
    /// install an older release).
    Rollback { version: String },
    /// End the request `request` that waits for approvals (see
    /// [`crate::approval`]): it can no longer start.
    Reject { request: String },
}

/// A wave's size: a count of nodes, or a share of the site (cumulative:
/// `1,25%,100%` is one canary, then up to a quarter, then the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaveSize {
    Nodes(u32),
    Percent(u8),
}

impl FromStr for WaveSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || format!("wave {s:?}: expected a number of nodes (1) or a share (25%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(WaveSize::Nodes(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Nodes(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Reads `1,25%,100%`. The last wave always takes every node left.
pub fn parse_waves(text: &str) -> Result<Vec<WaveSize>, String> {
    let waves = text
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<WaveSize>, String>>()?;
    if waves.is_empty() {
        return Err("no waves given".into());
    }
    Ok(waves)
}

/// The command an administrator signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The site it is meant for: a command for another site is refused.
    pub site: String,
    #[serde(flatten)]
    pub action: Action,
    /// Milliseconds since the Unix epoch, by the issuing machine's clock.
    pub issued_at_ms: u64,
    /// 32 hex digits, random: what makes each command unique.
    pub id: String,
    /// Wave sizes (rollouts only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<WaveSize>,
    /// The site's nodes as the issuing node saw them (PeerIds). Nodes not
    /// named here join the last wave.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The fleet rollout this command is the site's part of (see
    /// [`crate::fleet`]): it stays valid for [`CATCH_UP_MAX_AGE_MS`], so a
    /// site offline when its wave opened catches up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// How long a fleet rollout's command stays valid for a site that was
    /// away (set at `lanup rollout --fleet --valid`; without it
    /// [`CATCH_UP_MAX_AGE_MS`], and never over [`MAX_FLEET_VALID_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for_ms: Option<u64>,
    /// Why: shown with the request while it waits for approval, and in
    /// the change's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Apply now, outside the nodes' apply windows (an admin's signed
    /// override).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub now: bool,
    /// The redundancy groups of the nodes named, as the issuing node heard
    /// them: every node orders the waves by them the same way.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, crate::group::Member>,
}

impl Command {
    /// A command with no waves, nodes, fleet, reason, override or groups:
    /// an abort, a rollback, or a rollout the caller fills in further.
    pub fn new(site: &str, action: Action, issued_at_ms: u64, id: &str) -> Command {
        Command {
            site: site.into(),
            action,
            issued_at_ms,
            id: id.into(),
            waves: Vec::new(),
            nodes: Vec::new(),
            fleet: None,
            valid_for_ms: None,
            reason: None,
            now: false,
            groups: BTreeMap::new(),
        }
    }
}

/// A command with its signature, as gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    /// The command's exact JSON text.
    pub command: String,
    /// The admin key that signed it (`ed25519:…`).
    pub key: String,
    /// 128 hex digits: ed25519 over the bytes of `command`.
    pub signature: String,
    /// Other admins' signatures over the same bytes, where the site needs
    /// more than one ([`crate::approval`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<crate::approval::Approval>,
    /// For a site's part of a fleet rollout: the fleet plan headquarters'
    /// admins requested and approved ([`crate::fleet::FleetPlan`], its
    /// text signed and approved like a command), whose signers count for
    /// this command too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Box<SignedCommand>>,
}

/// Why a node refused a command. Each message says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("not signed: no signature")]
    Unsigned,
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("signed by {0}, which is not a trusted admin key")]
    UntrustedKey(String),
    #[error("the signature by {0} does not match the command (changed after signing?)")]
    BadSignature(String),
    #[error("meant for site {0:?}, not this one")]
    OtherSite(String),
    #[error("issued {0} s ago, more than the {1} s a command stays valid")]
    Stale(u64, u64),
    #[error("issued {0} s in the future (check this machine's clock)")]
    Future(u64),
    #[error("command {0} was already received (a replay)")]
    Replayed(String),
}

impl Refusal {
    /// What is wrong with a command no trusted admin signed (unsigned,
    /// malformed, an untrusted key, a bad signature); `None` for one a
    /// trusted admin signed that came at the wrong time, for another site,
    /// or again.
    pub fn forgery(&self) -> Option<&'static str> {
        match self {
            Refusal::Unsigned => Some("unsigned"),
            Refusal::Malformed(_) => Some("malformed"),
            Refusal::UntrustedKey(_) => Some("untrusted key"),
            Refusal::BadSignature(_) => Some("bad signature"),
            _ => None,
        }
    }
}

/// Signs `command` with an admin key.
pub fn sign(command: &Command, key: &SecretKey) -> SignedCommand {
    let text = serde_json::to_string(command).unwrap_or_default();
    let signature = key.sign(text.as_bytes());
    SignedCommand {
        command: text,
        key: key.public().to_string(),
        signature: signature.to_hex(),
        approvals: Vec::new(),
        plan: None,
    }
}

/// A node that was away when a command was issued (a late joiner, a node
/// restarted) takes the command its peers follow from them, up to this old:
/// a rollout's later waves can run for hours.
pub const CATCH_UP_MAX_AGE_MS: u64 = 24 * 60 * 60 * 1000;

/// A fleet rollout's default validity: a site offline for days (a closed
/// branch, a cut line) catches up when it returns.
pub const FLEET_VALID_MS: u64 = 14 * 24 * 60 * 60 * 1000;

/// The longest validity a fleet command may claim.
pub const MAX_FLEET_VALID_MS: u64 = 90 * 24 * 60 * 60 * 1000;

impl Command {
    /// How old this command may be when a node that was away takes it.
    pub fn catch_up_ms(&self) -> u64 {
        match (&self.fleet, self.valid_for_ms) {
            (Some(_), Some(valid)) => valid.clamp(CATCH_UP_MAX_AGE_MS, MAX_FLEET_VALID_MS),
            _ => CATCH_UP_MAX_AGE_MS,
        }
    }

    /// Until when (Unix ms) a node must remember its id to refuse it
    /// again.
    pub fn remember_until_ms(&self) -> u64 {
        self.issued_at_ms
            .saturating_add(self.catch_up_ms())
            .saturating_add(MAX_SKEW_MS)
    }
}

/// Checks who signed `signed` and for which site, but not when: a trusted
/// admin key, a signature over the exact text, and this site.
pub fn authenticate(
    signed: &SignedCommand,
    trusted: &[PublicKey],
    site: &str,
) -> Result<Command, Refusal> {
    if signed.signature.trim().is_empty() || signed.key.trim().is_empty() {
        return Err(Refusal::Unsigned);
    }
    let key: PublicKey = signed
        .key
        .parse()
        .map_err(|_| Refusal::Malformed(format!("key {:?}", signed.key)))?;
    if !trusted.contains(&key) {
        return Err(Refusal::UntrustedKey(key.to_string()));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(signed.signature.trim(), &mut sig)
        .map_err(|_| Refusal::Malformed("signature is not 128 hex digits".into()))?;
    if !key.verify(signed.command.as_bytes(), &sig) {
        return Err(Refusal::BadSignature(key.to_string()));
    }
    let command: Command =
        serde_json::from_str(&signed.command).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if command.site != site {
        return Err(Refusal::OtherSite(command.site));
    }
    Ok(command)
}

/// The ids of commands a node accepted, so none is acted on twice, each
/// kept until the command is too old to be taken anyway
/// ([`Command::remember_until_ms`]: a day, or a fleet rollout's validity).
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    /// Id, and when it may be forgotten (Unix ms).
    seen: BTreeMap<String, u64>,
}

impl ReplayGuard {
    /// Remembers `id` of an ordinary command issued at `issued_at_ms`.
    pub fn remember(&mut self, id: &str, issued_at_ms: u64) {
        self.remember_until(
            id,
            issued_at_ms
                .saturating_add(CATCH_UP_MAX_AGE_MS)
                .saturating_add(MAX_SKEW_MS),
        );
    }

    /// Remembers `id` until `forget_at_ms`.
    pub fn remember_until(&mut self, id: &str, forget_at_ms: u64) {
        let at = self.seen.entry(id.to_owned()).or_insert(0);
        *at = (*at).max(forget_at_ms);
    }

    /// Whether `id` was accepted before.
    pub fn seen(&self, id: &str) -> bool {
        self.seen.contains_key(id)
    }

    /// Checks `signed` as it arrives by gossip or from the CLI, as a node
    /// of `site` whose trusted admin keys are `trusted`, at `now_ms`: it
    /// must also be fresh ([`MAX_AGE_MS`]). An accepted command is
    /// remembered.
    pub fn check(
        &mut self,
        signed: &SignedCommand,
        trusted: &[PublicKey],
        site: &str,
        now_ms: u64,
    ) -> Result<Command, Refusal> {
        self.check_within(signed, trusted, site, now_ms, MAX_AGE_MS)
    }

    /// Like [`ReplayGuard::check`] for a command a peer says the site
    /// follows, which may be up to [`CATCH_UP_MAX_AGE_MS`] old.
    pub fn check_catch_up(
        &mut self,
        signed: &SignedCommand,
        trusted: &[PublicKey],
        site: &str,
        now_ms: u64,
    ) -> Result<Command, Refusal> {
        let command = authenticate(signed, trusted, site)?;
        self.check_within(signed, trusted, site, now_ms, command.catch_up_ms())
    }

    /// The one freshness rule, whatever path a command arrives by (gossip,
    /// the CLI, a peer offering what the site follows): at `site_now_ms`,
    /// the site's clock (this node's corrected by the skew it measured to
    /// its peers), a command may be [`MAX_AGE_MS`] old; only a node that
    /// was away when it was issued (it started at `started_ms`, site clock,
    /// after the command was issued) takes one up to
    /// [`CATCH_UP_MAX_AGE_MS`] old. A node that was up is never let past
    /// the freshness check by a peer's offer.
    pub fn check_arrival(
        &mut self,
        signed: &SignedCommand,
        trusted: &[PublicKey],
        site: &str,
        site_now_ms: u64,
        started_ms: u64,
    ) -> Result<Command, Refusal> {
        let command = authenticate(signed, trusted, site)?;
        let away = started_ms > command.issued_at_ms;
        let max_age = if away || command.fleet.is_some() {
            command.catch_up_ms()
        } else {
            MAX_AGE_MS
        };
        self.check_within(signed, trusted, site, site_now_ms, max_age)
    }

    fn check_within(
        &mut self,
        signed: &SignedCommand,
        trusted: &[PublicKey],
        site: &str,
        now_ms: u64,
        max_age_ms: u64,
    ) -> Result<Command, Refusal> {
        let command = authenticate(signed, trusted, site)?;
        if command.issued_at_ms + max_age_ms < now_ms {
            return Err(Refusal::Stale(
                (now_ms - command.issued_at_ms) / 1000,
                max_age_ms / 1000,
            ));
        }
        if command.issued_at_ms > now_ms + MAX_SKEW_MS {
            return Err(Refusal::Future((command.issued_at_ms - now_ms) / 1000));
        }
        self.seen.retain(|_, forget_at| *forget_at >= now_ms);
        if self.seen.contains_key(&command.id) {
            return Err(Refusal::Replayed(command.id));
        }
        self.remember_until(&command.id, command.remember_until_ms());
        Ok(command)
    }
}

/// Splits the site into waves: `nodes` ordered by a hash of the command id
/// and the node (the same order on every node, a different one for every
/// rollout), cut at the cumulative sizes; the last wave takes the rest.
pub fn assign_waves(id: &str, nodes: &[String], sizes: &[WaveSize]) -> Vec<Vec<String>> {
    let mut order: Vec<(blake3::Hash, &String)> = nodes
        .iter()
        .map(|n| (blake3::hash(format!("{id}/{n}").as_bytes()), n))
        .collect();
    order.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(b.1)));
    order.dedup_by(|a, b| a.1 == b.1);
    let total = order.len();
    let mut waves = Vec::new();
    let mut taken = 0;
    for (i, size) in sizes.iter().enumerate() {
        let upto = if i + 1 == sizes.len() {
            total
        } else {
            match size {
                WaveSize::Nodes(n) => taken + *n as usize,
                WaveSize::Percent(p) => (total * *p as usize).div_ceil(100),
            }
            .clamp(taken, total)
        };
        if upto > taken || i + 1 == sizes.len() {
            waves.push(
                order[taken..upto]
                    .iter()
                    .map(|(_, n)| (*n).clone())
                    .collect(),
            );
            taken = upto;
        }
    }
    waves.retain(|w: &Vec<String>| !w.is_empty());
    waves
}

/// What one node reports about the rollout's release.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeReport {
    pub installed: Option<String>,
    /// How its last apply of the rollout's release ended, if it tried.
    pub failed: Option<String>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Wave `n` (from 0) may apply; the ones before it are healthy.
    Wave(usize),
    /// A node failed: nothing more applies.
    Halted { node: String, reason: String },
    /// Every wave is healthy on the new release.
    Done,
}

/// Evaluates a rollout of `version` over `waves` from the nodes' reports.
/// A node that reports nothing yet is not done; a failure anywhere halts.
/// A node that reports but is not named in the waves (it joined after the
/// command was issued) belongs to the last wave: the rollout is done only
/// once it runs the release too.
pub fn evaluate(
    waves: &[Vec<String>],
    version: &str,
    reports: &BTreeMap<String, NodeReport>,
) -> Stage {
    for (node, report) in reports {
        if let Some(reason) = &report.failed {
            return Stage::Halted {
                node: node.clone(),
                reason: reason.clone(),
            };
        }
    }
    let named: std::collections::BTreeSet<&String> = waves.iter().flatten().collect();
    let unnamed = reports.keys().filter(|n| !named.contains(n));
    let installed = |n: &String| {
        reports
            .get(n)
            .is_some_and(|r| r.installed.as_deref() == Some(version))
    };
    for (i, wave) in waves.iter().enumerate() {
        let last = i + 1 == waves.len();
        let healthy = wave.iter().all(installed) && (!last || unnamed.clone().all(installed));
        if !healthy {
            return Stage::Wave(i);
        }
    }
    Stage::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node{i}")).collect()
    }

    fn command(site: &str, at: u64, id: &str) -> Command {
        Command {
            waves: parse_waves("1,25%,100%").expect("waves"),
            nodes: nodes(3),
            ..Command::new(
                site,
                Action::Rollout {
                    version: "2.0.0".into(),
                },
                at,
                id,
            )
        }
    }

    #[test]
    fn waves_are_cumulative_deterministic_and_cover_every_node_once() {
        let sizes = parse_waves("1,25%,100%").expect("waves");
        let w = assign_waves("abc", &nodes(8), &sizes);
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 6]);
        assert_eq!(w, assign_waves("abc", &nodes(8), &sizes));
        let mut all: Vec<String> = w.concat();
        all.sort();
        assert_eq!(all, {
            let mut n = nodes(8);
            n.sort();
            n
        });
        assert_ne!(
            w,
            assign_waves("abd", &nodes(8), &sizes),
            "each rollout draws anew"
        );
        assert_eq!(assign_waves("x", &nodes(1), &sizes), vec![nodes(1)]);
        assert_eq!(
            assign_waves("x", &nodes(20), &parse_waves("2,50%,100%").expect("w"))
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            vec![2, 8, 10]
        );
        assert!(
            parse_waves("0").is_err() && parse_waves("101%").is_err() && parse_waves("x").is_err()
        );
    }

    #[test]
    fn only_fresh_commands_signed_by_a_trusted_admin_for_this_site_pass_once() {
        let admin = SecretKey::generate();
        let other = SecretKey::generate();
        let trusted = vec![admin.public()];
        let now = 1_800_000_000_000;
        let mut guard = ReplayGuard::default();
        let good = sign(&command("s", now - 1000, "id1"), &admin);
        assert!(guard.check(&good, &trusted, "s", now).is_ok());
        assert_eq!(
            guard.check(&good, &trusted, "s", now + 5000),
            Err(Refusal::Replayed("id1".into()))
        );
        let wrong_key = sign(&command("s", now, "id2"), &other);
        assert!(matches!(
            guard.check(&wrong_key, &trusted, "s", now),
            Err(Refusal::UntrustedKey(_))
        ));
        let mut tampered = sign(&command("s", now, "id3"), &admin);
        tampered.command = tampered.command.replace("2.0.0", "9.0.0");
        assert!(matches!(
            guard.check(&tampered, &trusted, "s", now),
            Err(Refusal::BadSignature(_))
        ));
        let mut unsigned = sign(&command("s", now, "id4"), &admin);
        unsigned.signature.clear();
        assert_eq!(
            guard.check(&unsigned, &trusted, "s", now),
            Err(Refusal::Unsigned)
        );
        let stale = sign(&command("s", now - MAX_AGE_MS - 1000, "id5"), &admin);
        assert!(matches!(
            guard.check(&stale, &trusted, "s", now),
            Err(Refusal::Stale(..))
        ));
        let future = sign(&command("s", now + MAX_SKEW_MS + 1000, "id6"), &admin);
        assert!(matches!(
            guard.check(&future, &trusted, "s", now),
            Err(Refusal::Future(_))
        ));
        let elsewhere = sign(&command("t", now, "id7"), &admin);
        assert_eq!(
            guard.check(&elsewhere, &trusted, "s", now),
            Err(Refusal::OtherSite("t".into()))
        );
    }

    #[test]
    fn a_node_that_was_away_takes_a_day_old_command_from_its_peers_once() {
        let admin = SecretKey::generate();
        let trusted = vec![admin.public()];
        let now = 1_800_000_000_000;
        let mut guard = ReplayGuard::default();
        let hour_old = sign(&command("s", now - 3_600_000, "late"), &admin);
        assert!(matches!(
            guard.check(&hour_old, &trusted, "s", now),
            Err(Refusal::Stale(3600, 600))
        ));
        assert!(guard.check_catch_up(&hour_old, &trusted, "s", now).is_ok());
        assert!(guard.seen("late"));
        assert_eq!(
            guard.check_catch_up(&hour_old, &trusted, "s", now),
            Err(Refusal::Replayed("late".into()))
        );
        let too_old = sign(
            &command("s", now - CATCH_UP_MAX_AGE_MS - 1000, "old"),
            &admin,
        );
        assert!(matches!(
            guard.check_catch_up(&too_old, &trusted, "s", now),
            Err(Refusal::Stale(..))
        ));
        let mut forged = hour_old.clone();
        forged.command = forged.command.replace("late", "lat3");
        assert!(matches!(
            guard.check_catch_up(&forged, &trusted, "s", now),
            Err(Refusal::BadSignature(_))
        ));
    }

    fn report(installed: &str, failed: Option<&str>) -> NodeReport {
        NodeReport {
            installed: Some(installed.into()),
            failed: failed.map(Into::into),
        }
    }

    #[test]
    fn a_wave_starts_when_the_one_before_is_healthy_and_a_failure_halts() {
        let waves = vec![vec!["a".to_string()], vec!["b".into(), "c".into()]];
        let mut reports = BTreeMap::new();
        assert_eq!(evaluate(&waves, "2", &reports), Stage::Wave(0));
        reports.insert("a".to_string(), report("2", None));
        assert_eq!(evaluate(&waves, "2", &reports), Stage::Wave(1));
        reports.insert("b".to_string(), report("2", None));
        assert_eq!(evaluate(&waves, "2", &reports), Stage::Wave(1));
        reports.insert("c".to_string(), report("1", Some("exited")));
        assert_eq!(
            evaluate(&waves, "2", &reports),
            Stage::Halted {
                node: "c".into(),
                reason: "exited".into()
            }
        );
        reports.get_mut("c").expect("c").failed = None;
        reports.get_mut("c").expect("c").installed = Some("2".into());
        assert_eq!(evaluate(&waves, "2", &reports), Stage::Done);
        // A node that joined later is in the last wave.
        reports.insert("late".to_string(), NodeReport::default());
        assert_eq!(evaluate(&waves, "2", &reports), Stage::Wave(1));
        reports.get_mut("late").expect("late").installed = Some("2".into());
        assert_eq!(evaluate(&waves, "2", &reports), Stage::Done);
    }

    #[test]
    fn one_freshness_rule_whatever_the_path() {
        let admin = SecretKey::generate();
        let trusted = vec![admin.public()];
        let now = 1_800_000_000_000;
        let mut guard = ReplayGuard::default();
        let hour_old = sign(&command("s", now - 3_600_000, "h"), &admin);
        // Up since before it was issued: an hour-old command is stale,
        // however it arrives.
        assert!(matches!(
            guard.check_arrival(&hour_old, &trusted, "s", now, now - 7_200_000),
            Err(Refusal::Stale(3600, 600))
        ));
        // Started after it was issued (it was away): taken up.
        assert!(guard
            .check_arrival(&hour_old, &trusted, "s", now, now - 60_000)
            .is_ok());
        let fresh = sign(&command("s", now - 5_000, "f"), &admin);
        assert!(guard
            .check_arrival(&fresh, &trusted, "s", now, now - 7_200_000)
            .is_ok());
    }

    #[test]
    fn a_fleet_rollout_valid_for_two_weeks_reaches_a_site_back_after_days_and_only_once() {
        let admin = SecretKey::generate();
        let trusted = vec![admin.public()];
        let day = 24 * 3_600_000;
        let now = 1_800_000_000_000;
        let issued = now - 5 * day;
        let mut c = command("s", issued, "fleet-14d");
        c.fleet = Some("f2".into());
        c.valid_for_ms = Some(FLEET_VALID_MS);
        let part = sign(&c, &admin);
        // A site offline for five days takes it when it returns.
        let mut guard = ReplayGuard::default();
        assert!(guard
            .check_arrival(&part, &trusted, "s", now, now - 10 * day)
            .is_ok());
        // Again, a week later: refused as a replay, still remembered.
        assert!(matches!(
            guard.check_arrival(&part, &trusted, "s", now + 7 * day, now - 10 * day),
            Err(Refusal::Replayed(_))
        ));
        // A node restarted rebuilds its memory from its audit log's
        // forget_at_ms and refuses it too.
        let mut restarted = ReplayGuard::default();
        restarted.remember_until(&c.id, c.remember_until_ms());
        assert!(matches!(
            restarted.check_arrival(&part, &trusted, "s", now + 7 * day, now + 7 * day),
            Err(Refusal::Replayed(_))
        ));
        // After its validity, nobody takes it.
        let mut late = ReplayGuard::default();
        assert!(matches!(
            late.check_arrival(&part, &trusted, "s", issued + FLEET_VALID_MS + 60_000, now),
            Err(Refusal::Stale(..))
        ));
        // A validity over the bound is held to it; an ordinary command's
        // own claim changes nothing.
        c.valid_for_ms = Some(10 * MAX_FLEET_VALID_MS);
        assert_eq!(c.catch_up_ms(), MAX_FLEET_VALID_MS);
        c.fleet = None;
        assert_eq!(c.catch_up_ms(), CATCH_UP_MAX_AGE_MS);
    }

    #[test]
    fn a_sites_part_of_a_fleet_rollout_is_taken_for_a_day_and_once() {
        let admin = SecretKey::generate();
        let trusted = vec![admin.public()];
        let now = 1_800_000_000_000;
        let up_since = now - 10 * 3_600_000;
        let mut guard = ReplayGuard::default();
        // The site was offline (its uplink down, its nodes up) when its
        // wave opened five hours ago: it catches up when it next polls.
        let mut c = command("s", now - 5 * 3_600_000, "fleet-part");
        c.fleet = Some("f1".into());
        let part = sign(&c, &admin);
        assert!(guard
            .check_arrival(&part, &trusted, "s", now, up_since)
            .is_ok());
        assert!(matches!(
            guard.check_arrival(&part, &trusted, "s", now, up_since),
            Err(Refusal::Replayed(_))
        ));
        // Not after a day.
        let mut c = command("s", now - CATCH_UP_MAX_AGE_MS - 1, "fleet-old");
        c.fleet = Some("f1".into());
        assert!(matches!(
            guard.check_arrival(&sign(&c, &admin), &trusted, "s", now, up_since),
            Err(Refusal::Stale(..))
        ));
        // The same command without the fleet mark is stale after 10 min.
        let plain = sign(&command("s", now - 5 * 3_600_000, "plain"), &admin);
        assert!(matches!(
            guard.check_arrival(&plain, &trusted, "s", now, up_since),
            Err(Refusal::Stale(..))
        ));
    }
}
