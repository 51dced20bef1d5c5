//! Site reports: what one node of each site tells headquarters about the
//! site, and what headquarters makes of them (the fleet view).
//!
//! A report is JSON signed as it is sent, like a rollout command: the
//! signature covers the exact bytes. It is signed by the sending node's own
//! key (the one its PeerId is made of), and names that PeerId as its sender,
//! so headquarters knows which node spoke and tells a node it has heard
//! before from a new one. A report is re-signed at each attempt to send it,
//! so it is always fresh; one older than the newest already taken from the
//! same sender is a replay and is refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sign::{PublicKey, SecretKey};

/// Where sites post their reports to headquarters.
pub const REPORT_PATH: &str = "/_lanup/report";
/// Headquarters' fleet view as JSON.
pub const FLEET_JSON_PATH: &str = "/_lanup/fleet.json";
/// Headquarters' fleet view as a page.
pub const FLEET_PAGE_PATH: &str = "/_lanup/fleet";
/// One site's timeline at headquarters, as JSON (`?site=NAME`).
pub const HISTORY_JSON_PATH: &str = "/_lanup/fleet/history.json";

/// The largest report headquarters takes (a site of a few hundred nodes
/// fits).
pub const MAX_REPORT_BYTES: usize = 64 * 1024;
/// A report signed longer ago than this is refused (a sender re-signs at
/// each attempt).
pub const MAX_AGE_MS: u64 = 60 * 60 * 1000;
/// A report from up to this far in the future is taken (clock skew).
pub const MAX_SKEW_MS: u64 = crate::rollout::MAX_SKEW_MS;
/// A site sends a report at least this often, whether or not anything
/// changed.
pub const REFRESH_MS: u64 = 60 * 60 * 1000;
/// A site whose newest report is older than this is flagged stale: it
/// missed two hourly reports.
pub const STALE_AFTER_MS: u64 = 2 * REFRESH_MS + 10 * 60 * 1000;
/// Sites headquarters keeps at most: a key can sign a report for any site
/// name, so their number is capped.
pub const MAX_SITES: usize = 20_000;
/// Nodes one site may list (the rest are left out of the report).
pub const MAX_NODES: usize = 512;
/// Characters kept of a node's last error.
pub const MAX_ERROR_CHARS: usize = 300;
/// A node a site listed before and leaves out of its newest report is
/// shown as missing for this long after it was last listed (a node taken
/// out of service drops off the view after a week).
pub const MISSING_FOR_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// One node as its site hears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's PeerId.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<String>,
    /// idle, fetching, staging, staged, applying, installed, rolled-back,
    /// or unknown (not heard lately).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A release that did not install on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The site's rollout, as its nodes follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub id: String,
    /// rollout or rollback.
    pub action: String,
    pub version: String,
    /// `wave 2 of 3`, `done` or `halted`.
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a site says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub site: String,
    /// The sending node's PeerId: the key that signed the report must be
    /// its key.
    pub sender: String,
    /// Milliseconds since the Unix epoch, by the sender's clock.
    pub sent_at_ms: u64,
    pub nodes: Vec<NodeState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutState>,
}

impl Report {
    /// Whether `other` says the same about the site (the send time aside):
    /// a site reports when this changes.
    pub fn same_news(&self, other: &Report) -> bool {
        self.site == other.site && self.nodes == other.nodes && self.rollout == other.rollout
    }
}

/// A report with its signature, as posted to headquarters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReport {
    /// The report's exact JSON text.
    pub report: String,
    /// The sending node's public key (`ed25519:…`).
    pub key: String,
    /// 128 hex digits: ed25519 over the bytes of `report`.
    pub signature: String,
    /// The sending node's membership certificate for its site (its own
    /// admin signature makes it trustworthy; headquarters with trusted
    /// admin keys counts only reports that carry a valid one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<crate::membership::Certificate>,
}

/// Why headquarters refused a report. Each message says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportRefusal {
    #[error("{0} bytes, more than the {MAX_REPORT_BYTES} a report may have")]
    TooLarge(usize),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("the signature by {0} does not match the report (changed after signing?)")]
    BadSignature(String),
    #[error("signed by {key}, which is not the key of its sender {sender}")]
    NotSender { key: String, sender: String },
    #[error("site name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.'")]
    BadSite(String),
    #[error("sent {0} s ago, more than the {1} s a report stays valid")]
    Stale(u64, u64),
    #[error("sent {0} s in the future (check the sender's clock)")]
    Future(u64),
    #[error("not newer than the report already taken from {0} (a replay)")]
    Replayed(String),
    #[error("{0} sites are known already; a new site is refused")]
    TooManySites(usize),
    #[error("its sender is not an enrolled member of site {site:?}: {reason}")]
    NotMember { site: String, reason: String },
}

/// Signs `report` with the sending node's key.
pub fn sign(report: &Report, key: &SecretKey) -> SignedReport {
    let text = serde_json::to_string(report).unwrap_or_default();
    SignedReport {
        signature: key.sign(text.as_bytes()).to_hex(),
        report: text,
        key: key.public().to_string(),
        membership: None,
    }
}

/// Whether `site` may name a site (and a file at headquarters).
pub fn valid_site(site: &str) -> bool {
    (1..=64).contains(&site.len())
        && !site.starts_with('.')
        && site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks a posted report's bytes at `now_ms`: its size, that its sender's
/// key signed its exact text, its site name and its age. Replays are for
/// [`Fleet::accept`], which knows what was taken before.
pub fn check(body: &[u8], now_ms: u64) -> Result<Report, ReportRefusal> {
    check_member(body, now_ms, &[], |_| None).map(|c| c.report)
}

/// A report that passed [`check_member`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub report: Report,
    /// The sender's membership, when members' reports alone count.
    pub member: Option<Enrolled>,
}

/// A reporting node's membership, as its certificate showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub grant: crate::membership::Grant,
    /// The key that signed the grant: an admin's, or a join token's.
    pub signer: String,
}

/// [`check`], and, with `admins` (headquarters' trusted admin keys), that
/// the sender is an enrolled member of the site it reports for: a
/// certificate for its key and that site, signed by one of them (or by a
/// join token one of them vouched for), not expired, and neither it nor
/// its token in the site's revocation list (`revoked(site)`).
pub fn check_member(
    body: &[u8],
    now_ms: u64,
    admins: &[PublicKey],
    revoked: impl Fn(&str) -> Option<crate::membership::Revocations>,
) -> Result<Checked, ReportRefusal> {
    if body.len() > MAX_REPORT_BYTES {
        return Err(ReportRefusal::TooLarge(body.len()));
    }
    let signed: SignedReport =
        serde_json::from_slice(body).map_err(|e| ReportRefusal::Malformed(e.to_string()))?;
    let key: PublicKey = signed
        .key
        .parse()
        .map_err(|_| ReportRefusal::Malformed(format!("key {:?}", signed.key)))?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(signed.signature.trim(), &mut sig)
        .map_err(|_| ReportRefusal::Malformed("signature is not 128 hex digits".into()))?;
    if !key.verify(signed.report.as_bytes(), &sig) {
        return Err(ReportRefusal::BadSignature(key.to_string()));
    }
    let report: Report = serde_json::from_str(&signed.report)
        .map_err(|e| ReportRefusal::Malformed(e.to_string()))?;
    if report.sender != key.peer_id() {
        return Err(ReportRefusal::NotSender {
            key: key.to_string(),
            sender: report.sender,
        });
    }
    if !valid_site(&report.site) {
        return Err(ReportRefusal::BadSite(report.site));
    }
    let mut member = None;
    if !admins.is_empty() {
        let not_member = |reason: String| ReportRefusal::NotMember {
            site: report.site.clone(),
            reason,
        };
        let cert = signed
            .membership
            .as_ref()
            .ok_or_else(|| not_member("it carries no membership certificate".into()))?;
        let grant = cert
            .check(
                &report.site,
                &key,
                admins,
                &revoked(&report.site).unwrap_or_default(),
                now_ms / 1000,
            )
            .map_err(|e| not_member(e.to_string()))?;
        member = Some(Enrolled {
            grant,
            signer: cert.grant.key.clone(),
        });
    }
    if report.sent_at_ms > now_ms + MAX_SKEW_MS {
        return Err(ReportRefusal::Future((report.sent_at_ms - now_ms) / 1000));
    }
    if now_ms.saturating_sub(report.sent_at_ms) > MAX_AGE_MS {
        return Err(ReportRefusal::Stale(
            (now_ms - report.sent_at_ms) / 1000,
            MAX_AGE_MS / 1000,
        ));
    }
    Ok(Checked { report, member })
}

/// What headquarters keeps of one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// The newest report.
    pub report: Report,
    /// When headquarters took it, by its own clock.
    pub received_ms: u64,
    /// Every node the site has ever listed, with when it was first listed.
    pub first_seen_ms: BTreeMap<String, u64>,
    /// When each node was last listed, for [`MISSING_FOR_MS`].
    #[serde(default)]
    pub last_listed_ms: BTreeMap<String, u64>,
    /// Every node that has sent a report for the site, with the send time
    /// of its newest (what a replay is checked against).
    pub senders: BTreeMap<String, u64>,
    /// Nodes vouched for: those the site's first report listed, and those
    /// listed later by a vouched-for sender. A key that lists itself does
    /// not vouch for itself.
    #[serde(default)]
    pub vouched: std::collections::BTreeSet<String>,
    /// The newest report came from a node not vouched for: any key can
    /// sign a report naming any site, so the view says so.
    #[serde(default)]
    pub unlisted_sender: bool,
}

/// What a report taken brought that headquarters had not heard before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// The site was not known.
    pub new_site: bool,
    /// Nodes listed for the first time.
    pub new_nodes: Vec<String>,
    /// The sender had not sent for this site before (a new fetcher, or a
    /// node headquarters has never heard of).
    pub new_sender: bool,
}

/// Every site's newest report: headquarters' state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    pub sites: BTreeMap<String, SiteRecord>,
}

impl SiteRecord {
    /// What headquarters keeps of a site after its first report.
    pub fn new(report: &Report, now_ms: u64) -> SiteRecord {
        SiteRecord {
            report: report.clone(),
            received_ms: now_ms,
            first_seen_ms: BTreeMap::new(),
            last_listed_ms: BTreeMap::new(),
            senders: BTreeMap::new(),
            vouched: std::iter::once(report.sender.clone())
                .chain(report.nodes.iter().map(|n| n.id.clone()))
                .collect(),
            unlisted_sender: false,
        }
    }

    /// Takes a checked report for this site received at `now_ms`; refuses
    /// a replay (a report not newer than its sender's newest taken).
    pub fn accept(&mut self, report: Report, now_ms: u64) -> Result<Accepted, ReportRefusal> {
        let mut accepted = Accepted::default();
        match self.senders.get(&report.sender) {
            Some(&last) if report.sent_at_ms <= last => {
                return Err(ReportRefusal::Replayed(report.sender));
            }
            Some(_) => {}
            None => accepted.new_sender = true,
        }
        let unlisted = !self.vouched.contains(&report.sender);
        if !unlisted {
            self.vouched
                .extend(report.nodes.iter().map(|n| n.id.clone()));
        }
        // The senders' newest times are kept for the site's listed nodes and
        // any recent sender, so the map stays bounded.
        self.senders
            .insert(report.sender.clone(), report.sent_at_ms);
        for node in &report.nodes {
            if !self.first_seen_ms.contains_key(&node.id) {
                self.first_seen_ms.insert(node.id.clone(), now_ms);
                accepted.new_nodes.push(node.id.clone());
            }
            self.last_listed_ms.insert(node.id.clone(), now_ms);
        }
        let listed: std::collections::BTreeSet<&str> =
            report.nodes.iter().map(|n| n.id.as_str()).collect();
        self.last_listed_ms
            .retain(|_, at| *at + MISSING_FOR_MS > now_ms);
        if self.last_listed_ms.len() > 4 * MAX_NODES {
            self.last_listed_ms
                .retain(|id, _| listed.contains(id.as_str()));
        }
        self.senders
            .retain(|s, at| listed.contains(s.as_str()) || *at + MAX_AGE_MS > report.sent_at_ms);
        if self.first_seen_ms.len() > 4 * MAX_NODES {
            self.first_seen_ms
                .retain(|id, _| listed.contains(id.as_str()));
        }
        if self.vouched.len() > 4 * MAX_NODES {
            self.vouched.retain(|id| listed.contains(id.as_str()));
        }
        self.report = report;
        self.received_ms = now_ms;
        self.unlisted_sender = unlisted;
        Ok(accepted)
    }
}

impl Fleet {
    /// Takes a checked report received at `now_ms`; refuses a replay, and
    /// a new site beyond [`MAX_SITES`].
    pub fn accept(&mut self, report: Report, now_ms: u64) -> Result<Accepted, ReportRefusal> {
        let new_site = !self.sites.contains_key(&report.site);
        if new_site && self.sites.len() >= MAX_SITES {
            return Err(ReportRefusal::TooManySites(self.sites.len()));
        }
        let record = self
            .sites
            .entry(report.site.clone())
            .or_insert_with(|| SiteRecord::new(&report, now_ms));
        let mut accepted = record.accept(report, now_ms)?;
        accepted.new_site = new_site;
        Ok(accepted)
    }

    /// The fleet as headquarters shows it at `now_ms`.
    pub fn view(&self, now_ms: u64, stale_after_ms: u64) -> Vec<SiteView> {
        self.sites
            .values()
            .map(|r| SiteView::of(r, now_ms, stale_after_ms))
            .collect()
    }
}

/// A node that did not install a release, or reports an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedNode {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub error: String,
}

/// One row of the fleet view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteView {
    pub site: String,
    pub nodes: usize,
    /// The nodes' PeerIds (a fleet rollout names them in each site's
    /// command, for its node waves).
    #[serde(default)]
    pub node_ids: Vec<String>,
    /// Installed release → nodes running it (`none` for nodes with none).
    pub versions: BTreeMap<String, usize>,
    /// lanup version → nodes running it.
    pub lanup_versions: BTreeMap<String, usize>,
    pub failed: Vec<FailedNode>,
    /// Seconds since the newest report arrived.
    pub last_report_s: u64,
    pub stale: bool,
    /// Nodes first listed in the newest report.
    pub new_nodes: Vec<String>,
    /// Nodes listed within [`MISSING_FOR_MS`] that the newest report
    /// leaves out: the reporter has not heard them (yet), or they are gone.
    #[serde(default)]
    pub missing: Vec<String>,
    pub sender: String,
    /// The newest report came from a node the site's earlier reports never
    /// listed (a new node that took over reporting, or a key that is not
    /// the site's).
    #[serde(default)]
    pub unlisted_sender: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutState>,
}

impl SiteView {
    /// The row of the site kept in `r`, as seen at `now_ms`.
    pub fn of(r: &SiteRecord, now_ms: u64, stale_after_ms: u64) -> SiteView {
        let mut versions = BTreeMap::new();
        let mut lanup_versions = BTreeMap::new();
        let mut failed = Vec::new();
        for n in &r.report.nodes {
            let v = n.installed.clone().unwrap_or_else(|| "none".into());
            *versions.entry(v).or_insert(0) += 1;
            if let Some(l) = &n.lanup {
                *lanup_versions.entry(l.clone()).or_insert(0) += 1;
            }
            if n.failed.is_some() || n.error.is_some() {
                failed.push(FailedNode {
                    node: n.id.clone(),
                    version: n.failed.clone(),
                    error: n
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("{} did not install", n.state)),
                });
            }
        }
        let age = now_ms.saturating_sub(r.received_ms);
        let listed: std::collections::BTreeSet<&str> =
            r.report.nodes.iter().map(|n| n.id.as_str()).collect();
        SiteView {
            site: r.report.site.clone(),
            nodes: r.report.nodes.len(),
            node_ids: r.report.nodes.iter().map(|n| n.id.clone()).collect(),
            versions,
            lanup_versions,
            failed,
            last_report_s: age / 1000,
            stale: age > stale_after_ms,
            new_nodes: r
                .first_seen_ms
                .iter()
                .filter(|(_, &at)| at == r.received_ms)
                .map(|(id, _)| id.clone())
                .collect(),
            missing: r
                .last_listed_ms
                .iter()
                .filter(|(id, &at)| at + MISSING_FOR_MS > now_ms && !listed.contains(id.as_str()))
                .map(|(id, _)| id.clone())
                .collect(),
            sender: r.report.sender.clone(),
            unlisted_sender: r.unlisted_sender,
            rollout: r.report.rollout.clone(),
        }
    }

    /// Whether every node of the site runs `version`, none failed it, and
    /// the site's report is not stale.
    pub fn installed(&self, version: &str) -> bool {
        !self.stale
            && self.nodes > 0
            && self.versions.get(version) == Some(&self.nodes)
            && self.failed.iter().all(|f| f.version.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, installed: &str) -> NodeState {
        NodeState {
            id: id.into(),
            lanup: Some("0.1.0".into()),
            installed: Some(installed.into()),
            staged: None,
            state: "installed".into(),
            error: None,
            failed: None,
        }
    }

    fn report(key: &SecretKey, site: &str, at: u64, nodes: Vec<NodeState>) -> Vec<u8> {
        let r = Report {
            site: site.into(),
            sender: key.public().peer_id(),
            sent_at_ms: at,
            nodes,
            rollout: None,
        };
        serde_json::to_vec(&sign(&r, key)).expect("json")
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn with_admin_keys_only_an_enrolled_member_of_the_named_site_reports() {
        use crate::membership::Certificate;
        let admin = SecretKey::generate();
        let admins = [admin.public()];
        let node = SecretKey::generate();
        let with = |cert: Option<Certificate>| {
            let r = Report {
                site: "plant".into(),
                sender: node.public().peer_id(),
                sent_at_ms: NOW,
                nodes: vec![],
                rollout: None,
            };
            let mut signed = sign(&r, &node);
            signed.membership = cert;
            serde_json::to_vec(&signed).expect("json")
        };
        let not_member = |body: Vec<u8>| {
            matches!(
                check_member(&body, NOW, &admins, |_| None),
                Err(ReportRefusal::NotMember { .. })
            )
        };
        let year = 365 * 86_400;
        // No certificate, another admin's, another node's, another site's.
        assert!(not_member(with(None)));
        let other_admin = SecretKey::generate();
        assert!(not_member(with(Some(Certificate::issue(
            &other_admin,
            "plant",
            &node.public(),
            NOW / 1000,
            year
        )))));
        let other_node = SecretKey::generate().public();
        assert!(not_member(with(Some(Certificate::issue(
            &admin,
            "plant",
            &other_node,
            NOW / 1000,
            year
        )))));
        assert!(not_member(with(Some(Certificate::issue(
            &admin,
            "other",
            &node.public(),
            NOW / 1000,
            year
        )))));
        // A member's report counts; without admin keys anyone's does.
        let member = with(Some(Certificate::issue(
            &admin,
            "plant",
            &node.public(),
            NOW / 1000,
            year,
        )));
        assert!(check_member(&member, NOW, &admins, |_| None).is_ok());
        assert!(check(&with(None), NOW).is_ok());
    }

    #[test]
    fn a_signed_report_is_taken_and_shown() -> Result<(), ReportRefusal> {
        let key = SecretKey::generate();
        let me = key.public().peer_id();
        let body = report(
            &key,
            "branch-7",
            NOW,
            vec![node(&me, "1.0"), node("b", "1.1")],
        );
        let mut fleet = Fleet::default();
        let got = fleet.accept(check(&body, NOW)?, NOW)?;
        assert!(got.new_site && got.new_sender);
        assert_eq!(got.new_nodes, vec![me.clone(), "b".to_owned()]);
        let view = fleet.view(NOW + 5_000, STALE_AFTER_MS);
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].versions.get("1.0"), Some(&1));
        assert_eq!(view[0].versions.get("1.1"), Some(&1));
        assert_eq!(view[0].last_report_s, 5);
        assert!(!view[0].stale);
        assert!(fleet.view(NOW + STALE_AFTER_MS + 1, STALE_AFTER_MS)[0].stale);
        // The next report lists one node more: only it is new.
        let body = report(
            &key,
            "branch-7",
            NOW + 1,
            vec![node(&me, "1.1"), node("b", "1.1"), node("c", "1.1")],
        );
        let got = fleet.accept(check(&body, NOW + 10)?, NOW + 10)?;
        assert!(!got.new_site && !got.new_sender);
        assert_eq!(got.new_nodes, vec!["c".to_owned()]);
        let view = fleet.view(NOW + 10, STALE_AFTER_MS);
        assert_eq!(view[0].new_nodes, vec!["c".to_owned()]);
        assert!(view[0].installed("1.1"));
        assert!(!view[0].installed("1.0"));
        assert!(!view[0].unlisted_sender);
        // A key the site never listed that names it is shown as such.
        let stranger = SecretKey::generate();
        let body = report(&stranger, "branch-7", NOW + 2, vec![node("c", "6.6")]);
        let got = fleet.accept(check(&body, NOW + 20)?, NOW + 20)?;
        assert!(got.new_sender);
        assert!(fleet.view(NOW + 20, STALE_AFTER_MS)[0].unlisted_sender);
        // Listing itself does not vouch for it.
        let body = report(
            &stranger,
            "branch-7",
            NOW + 3,
            vec![node(&stranger.public().peer_id(), "6.6")],
        );
        fleet.accept(check(&body, NOW + 30)?, NOW + 30)?;
        let body = report(&stranger, "branch-7", NOW + 4, vec![]);
        fleet.accept(check(&body, NOW + 40)?, NOW + 40)?;
        assert!(fleet.view(NOW + 40, STALE_AFTER_MS)[0].unlisted_sender);
        // The site's own reporter again: not flagged.
        let body = report(
            &key,
            "branch-7",
            NOW + 5,
            vec![node(&me, "1.1"), node("c", "1.1")],
        );
        fleet.accept(check(&body, NOW + 50)?, NOW + 50)?;
        assert!(!fleet.view(NOW + 50, STALE_AFTER_MS)[0].unlisted_sender);
        Ok(())
    }

    #[test]
    fn forged_replayed_oversized_and_stale_reports_are_refused() -> Result<(), ReportRefusal> {
        let key = SecretKey::generate();
        let other = SecretKey::generate();
        let me = key.public().peer_id();
        let mut fleet = Fleet::default();
        let body = report(&key, "s", NOW, vec![node(&me, "1.0")]);
        fleet.accept(check(&body, NOW)?, NOW)?;

        // The same bytes again, and an older report: replays.
        let again = check(&body, NOW + 1)?;
        assert_eq!(
            fleet.accept(again, NOW + 1),
            Err(ReportRefusal::Replayed(me.clone()))
        );
        let older = check(&report(&key, "s", NOW - 1, vec![]), NOW)?;
        assert!(matches!(
            fleet.accept(older, NOW),
            Err(ReportRefusal::Replayed(_))
        ));

        // A byte changed after signing.
        let mut signed: SignedReport = serde_json::from_slice(&body).expect("json");
        signed.report = signed.report.replace("1.0", "6.6");
        let forged = serde_json::to_vec(&signed).expect("json");
        assert!(matches!(
            check(&forged, NOW),
            Err(ReportRefusal::BadSignature(_))
        ));

        // Signed well, by a key that is not the named sender's.
        let mut r: Report = serde_json::from_str(&signed.report).expect("json");
        r.sender = me.clone();
        let stolen = serde_json::to_vec(&sign(&r, &other)).expect("json");
        assert!(matches!(
            check(&stolen, NOW),
            Err(ReportRefusal::NotSender { .. })
        ));

        let big = vec![b' '; MAX_REPORT_BYTES + 1];
        assert_eq!(
            check(&big, NOW),
            Err(ReportRefusal::TooLarge(MAX_REPORT_BYTES + 1))
        );
        assert!(matches!(
            check(&report(&key, "s", NOW - MAX_AGE_MS - 1, vec![]), NOW),
            Err(ReportRefusal::Stale(..))
        ));
        assert!(matches!(
            check(&report(&key, "s", NOW + MAX_SKEW_MS + 1, vec![]), NOW),
            Err(ReportRefusal::Future(_))
        ));
        for bad in ["", "../etc", ".hidden", "a b", &"x".repeat(65)] {
            assert!(
                matches!(
                    check(&report(&key, bad, NOW, vec![]), NOW),
                    Err(ReportRefusal::BadSite(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check(b"{not json", NOW),
            Err(ReportRefusal::Malformed(_))
        ));
        Ok(())
    }

    #[test]
    fn failed_nodes_show_with_their_error_and_hold_the_site_back() -> Result<(), ReportRefusal> {
        let key = SecretKey::generate();
        let me = key.public().peer_id();
        let mut bad = node("b", "1.0");
        bad.state = "rolled-back".into();
        bad.failed = Some("1.1".into());
        bad.error = Some("health check failed: exit 3".into());
        let body = report(&key, "s", NOW, vec![node(&me, "1.1"), bad]);
        let mut fleet = Fleet::default();
        fleet.accept(check(&body, NOW)?, NOW)?;
        let view = &fleet.view(NOW, STALE_AFTER_MS)[0];
        assert_eq!(
            view.failed,
            vec![FailedNode {
                node: "b".into(),
                version: Some("1.1".into()),
                error: "health check failed: exit 3".into()
            }]
        );
        assert!(!view.installed("1.1"));
        Ok(())
    }

    #[test]
    fn a_node_left_out_of_the_newest_report_is_shown_missing_for_a_week(
    ) -> Result<(), ReportRefusal> {
        let key = SecretKey::generate();
        let me = key.public().peer_id();
        let mut fleet = Fleet::default();
        let both = report(&key, "s", NOW, vec![node(&me, "1.0"), node("b", "1.0")]);
        fleet.accept(check(&both, NOW)?, NOW)?;
        assert!(fleet.view(NOW, STALE_AFTER_MS)[0].missing.is_empty());
        // Back from being offline, the reporter has not heard b yet: the
        // site looks like one node on 1.1, and b is named as missing.
        let alone = report(&key, "s", NOW + 1, vec![node(&me, "1.1")]);
        fleet.accept(check(&alone, NOW + 10)?, NOW + 10)?;
        let view = &fleet.view(NOW + 10, STALE_AFTER_MS)[0];
        assert_eq!(view.missing, vec!["b".to_owned()]);
        assert_eq!(view.nodes, 1);
        // Heard again, it is no longer missing.
        let again = report(&key, "s", NOW + 2, vec![node(&me, "1.1"), node("b", "1.1")]);
        fleet.accept(check(&again, NOW + 20)?, NOW + 20)?;
        assert!(fleet.view(NOW + 20, STALE_AFTER_MS)[0].missing.is_empty());
        // A node gone for good drops off the view a week after it was last
        // listed, and headquarters forgets when that was.
        let later = NOW + 30;
        let body = report(&key, "s", later, vec![node(&me, "1.1")]);
        fleet.accept(check(&body, later)?, later)?;
        let view = &fleet.view(later + MISSING_FOR_MS - 1_000, u64::MAX)[0];
        assert_eq!(view.missing, vec!["b".to_owned()]);
        let week = later + MISSING_FOR_MS;
        let body = report(&key, "s", week, vec![node(&me, "1.1")]);
        fleet.accept(check(&body, week)?, week)?;
        assert!(fleet.view(week, STALE_AFTER_MS)[0].missing.is_empty());
        assert!(!fleet.sites["s"].last_listed_ms.contains_key("b"));
        Ok(())
    }

    #[test]
    fn a_new_site_beyond_the_cap_is_refused() {
        let mut fleet = Fleet::default();
        let key = SecretKey::generate();
        let r = |site: &str| Report {
            site: site.into(),
            sender: key.public().peer_id(),
            sent_at_ms: NOW,
            nodes: vec![],
            rollout: None,
        };
        for i in 0..MAX_SITES {
            fleet
                .accept(r(&format!("s{i}")), NOW)
                .expect("under the cap");
        }
        assert_eq!(
            fleet.accept(r("one-more"), NOW),
            Err(ReportRefusal::TooManySites(MAX_SITES))
        );
        // A known site still reports.
        let mut again = r("s0");
        again.sent_at_ms += 1;
        assert!(fleet.accept(again, NOW).is_ok());
    }
}
