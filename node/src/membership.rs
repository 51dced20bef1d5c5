//! This node's membership of its site, and which peers are members.
//!
//! The node's certificate (`STATE/membership.json`, written by `lanup
//! setup --join`) travels in its heartbeats; a peer's is checked once per
//! distinct certificate against the trusted admin keys and the site's
//! revocation list. Once members only are admitted (`members_only_from`,
//! "now" or a date that gives an existing site time to enroll), a peer
//! without a valid certificate for this site gets no chunk, its heartbeats
//! (its candidacy, its suspicions, its status) and announcements are
//! ignored, and its requests are refused. The chunk server reads the
//! [`Admission`] through a `watch`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lanup_protocol::membership::{Certificate, MembershipError, Revocations};
use lanup_protocol::sign::PublicKey;
use libp2p::PeerId;
use tokio::sync::watch;
use tracing::{info, warn};

/// The most peers whose membership is remembered: a LAN full of strangers
/// cannot grow this without bound.
const MAX_KNOWN: usize = 4096;

/// Who may be served chunks.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Members only: everyone else is refused.
    pub enforcing: bool,
    pub members: HashSet<PeerId>,
}

impl Admission {
    pub fn admits(&self, peer: &PeerId) -> bool {
        !self.enforcing || self.members.contains(peer)
    }
}

pub fn certificate_path(state: &Path) -> PathBuf {
    state.join("membership.json")
}

/// The node's own certificate, if it was enrolled.
pub fn load(state: &Path) -> Result<Option<Certificate>> {
    let path = certificate_path(state);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{}: not a membership certificate", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn revocations_path(state: &Path) -> PathBuf {
    state.join("revocations.json")
}

/// Keeps `cert` as the node's own certificate.
pub fn save(state: &Path, cert: &Certificate) -> Result<()> {
    std::fs::create_dir_all(state).with_context(|| format!("cannot create {}", state.display()))?;
    let path = certificate_path(state);
    crate::apply::write_synced(&path, &serde_json::to_vec_pretty(cert)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The node's identity key (`STATE/identity.key`), made on first use.
pub fn identity(state: &Path) -> Result<lanup_protocol::sign::SecretKey> {
    let path = state.join("identity.key");
    if !path.exists() {
        std::fs::create_dir_all(state)
            .with_context(|| format!("cannot create {}", state.display()))?;
        crate::keys::generate(&path)?;
    }
    crate::keys::load_secret(&path)
}

/// The PeerId of the node whose key is `key` (`ed25519:…`).
fn peer_of(key: &str) -> Option<PeerId> {
    key.parse::<PublicKey>().ok()?.peer_id().parse().ok()
}

/// What this node knows of its peers' membership.
pub struct Gate {
    site: String,
    /// This node's own key, `ed25519:…`.
    own: String,
    trusted: Vec<PublicKey>,
    /// From when (Unix seconds) only members are admitted; `None`: never.
    from: Option<u64>,
    revoked: Revocations,
    /// Each peer's last certificate checked (by digest), and until when it
    /// makes the peer a member (`None`: it did not hold).
    known: HashMap<PeerId, ([u8; 32], Option<u64>, u64)>,
    /// Bumped by each newer revocation list: a certificate checked before
    /// it is checked again at its node's next heartbeat.
    generation: u64,
    admission: watch::Sender<Admission>,
}

impl Gate {
    pub fn new(
        site: &str,
        own: &PublicKey,
        trusted: &[PublicKey],
        from: Option<u64>,
        now: u64,
    ) -> Gate {
        let (admission, _) = watch::channel(Admission {
            enforcing: from.is_some_and(|f| now >= f),
            members: HashSet::new(),
        });
        Gate {
            site: site.to_owned(),
            own: own.to_string(),
            trusted: trusted.to_vec(),
            from,
            revoked: Revocations::default(),
            known: HashMap::new(),
            generation: 0,
            admission,
        }
    }

    pub fn admission(&self) -> watch::Receiver<Admission> {
        self.admission.subscribe()
    }

    /// Whether only members are admitted at `now`.
    pub fn enforcing(&self, now: u64) -> bool {
        self.from.is_some_and(|f| now >= f)
    }

    /// Checks `author`'s certificate (once per distinct certificate) and
    /// records whether it is a member; returns whether it is one now.
    pub fn heard(&mut self, author: PeerId, cert: Option<&Certificate>, now: u64) -> bool {
        let Some(cert) = cert else {
            self.forget(author);
            return false;
        };
        let was = self.is_member(&author, now);
        let digest = cert.digest();
        let until = match self.known.get(&author) {
            Some((seen, until, generation))
                if *seen == digest && *generation == self.generation =>
            {
                *until
            }
            _ => {
                let until = match self.check(author, cert, now) {
                    Ok(until) => Some(until),
                    Err(e) => {
                        warn!(peer = %author, reason = %e, "a peer's membership certificate is not accepted");
                        None
                    }
                };
                if self.known.len() >= MAX_KNOWN && !self.known.contains_key(&author) {
                    // The oldest entry cannot be told cheaply; any one goes.
                    if let Some(drop) = self.known.keys().next().copied() {
                        self.known.remove(&drop);
                    }
                }
                self.known.insert(author, (digest, until, self.generation));
                until
            }
        };
        let member = until.is_some_and(|u| now < u);
        // The chunk server hears of changes only: every heartbeat of every
        // member passes here.
        if member != was {
            self.publish(now);
        }
        member
    }

    fn check(&self, author: PeerId, cert: &Certificate, now: u64) -> Result<u64, MembershipError> {
        let node: PublicKey =
            serde_json::from_str::<lanup_protocol::membership::Grant>(&cert.grant.text)
                .ok()
                .and_then(|g| g.node.parse().ok())
                .ok_or(MembershipError::Malformed("certificate"))?;
        if node.peer_id() != author.to_string() {
            return Err(MembershipError::OtherNode {
                found: node.peer_id(),
                wanted: author.to_string(),
            });
        }
        let grant = cert.check(&self.site, &node, &self.trusted, &self.revoked, now)?;
        Ok(grant.expires)
    }

    fn forget(&mut self, peer: PeerId) {
        if self.known.remove(&peer).is_some() {
            self.publish(crate::node::now_unix_ms() / 1000);
        }
    }

    /// Whether `peer` is a member at `now`.
    pub fn is_member(&self, peer: &PeerId, now: u64) -> bool {
        self.known
            .get(peer)
            .is_some_and(|(_, until, _)| until.is_some_and(|u| now < u))
    }

    /// Whether `peer` is admitted at `now`: a member, or anyone while
    /// members are not required.
    pub fn admits(&self, peer: &PeerId, now: u64) -> bool {
        !self.enforcing(now) || self.is_member(peer, now)
    }

    /// Takes a newer revocation list; members it names stop being members
    /// at once.
    pub fn revoke(
        &mut self,
        signed: &lanup_protocol::membership::Signed,
        now: u64,
    ) -> Result<bool, MembershipError> {
        let taken = self.revoked.take(signed, &self.site, &self.trusted)?;
        if taken {
            info!(
                keys = self.revoked.list.keys.len(),
                "took a newer revocation list"
            );
            // A node it names is out at once; every other certificate is
            // checked again against it at its node's next heartbeat (one
            // a token admitted is out then).
            for key in &self.revoked.list.keys {
                if let Some(peer) = peer_of(key) {
                    self.known.remove(&peer);
                }
            }
            self.generation += 1;
            self.publish(now);
        }
        Ok(taken)
    }

    /// The revocation list held, as signed.
    pub fn revocations(&self) -> Option<&lanup_protocol::membership::Signed> {
        self.revoked.signed.as_ref()
    }

    /// When the list held was signed (Unix seconds; 0: none).
    pub fn revocations_issued(&self) -> u64 {
        self.revoked.list.issued
    }

    /// Whether the site's revocation list names this node.
    pub fn revokes_self(&self) -> bool {
        self.revoked.names(&self.own)
    }

    /// The keys revoked.
    pub fn revoked_keys(&self) -> &[String] {
        &self.revoked.list.keys
    }

    /// Takes the list kept in `state`, if any.
    pub fn load_revocations(&mut self, state: &Path, now: u64) {
        let path = revocations_path(state);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        match serde_json::from_slice(&bytes) {
            Ok(signed) => {
                if let Err(e) = self.revoke(&signed, now) {
                    warn!(file = %path.display(), reason = %e, "the kept revocation list is not accepted");
                }
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "the kept revocation list is unreadable")
            }
        }
    }

    /// Takes `signed` when newer and keeps it in `state`; returns whether
    /// it was taken.
    pub fn take_revocations(
        &mut self,
        state: &Path,
        signed: &lanup_protocol::membership::Signed,
        now: u64,
    ) -> Result<bool, MembershipError> {
        let before = self.revoked.list.keys.clone();
        let taken = self.revoke(signed, now)?;
        if taken {
            // A newer list replaces the one held: a key it leaves out is
            // admitted again (revoked at a node, then a list published at
            // headquarters that did not know of it).
            let dropped: Vec<&String> = before.iter().filter(|k| !self.revoked.names(k)).collect();
            if !dropped.is_empty() {
                warn!(?dropped, "the site's newer revocation list no longer names keys the one before did; they are admitted again");
            }
            let path = revocations_path(state);
            let text = serde_json::to_vec_pretty(signed).unwrap_or_default();
            if let Err(e) = crate::apply::write_synced(&path, &text) {
                warn!(file = %path.display(), error = %e, "cannot keep the revocation list");
            }
        }
        Ok(taken)
    }

    /// Tells the chunk server who is admitted now.
    pub fn publish(&self, now: u64) {
        let enforcing = self.enforcing(now);
        let members: HashSet<PeerId> = self
            .known
            .iter()
            .filter(|(_, (_, until, _))| until.is_some_and(|u| now < u))
            .map(|(peer, _)| *peer)
            .collect();
        self.admission.send_if_modified(|a| {
            let changed = a.enforcing != enforcing || a.members != members;
            if changed {
                a.enforcing = enforcing;
                a.members = members;
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanup_protocol::sign::SecretKey;

    const NOW: u64 = 1_800_000_000;

    fn peer(key: &SecretKey) -> PeerId {
        key.to_libp2p().public().to_peer_id()
    }

    #[test]
    fn members_are_admitted_strangers_and_revoked_members_are_not() {
        let admin = SecretKey::generate();
        let (a, b, stranger) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let own = SecretKey::generate().public();
        let mut gate = Gate::new("plant", &own, &[admin.public()], Some(NOW), NOW);
        let admission = gate.admission();
        let cert_a = Certificate::issue(&admin, "plant", &a.public(), NOW, 3600);
        let cert_b = Certificate::issue(&admin, "plant", &b.public(), NOW, 3600);
        assert!(gate.heard(peer(&a), Some(&cert_a), NOW + 1));
        assert!(gate.heard(peer(&b), Some(&cert_b), NOW + 1));
        // A stranger: no certificate, or someone else's.
        assert!(!gate.heard(peer(&stranger), None, NOW + 1));
        assert!(!gate.heard(peer(&stranger), Some(&cert_a), NOW + 1));
        assert!(admission.borrow().admits(&peer(&a)));
        assert!(!admission.borrow().admits(&peer(&stranger)));
        // Revoked: out at once, and stays out.
        let list = Revocations::sign(&admin, "plant", vec![b.public().to_string()], NOW + 2);
        assert!(gate.revoke(&list, NOW + 2).expect("taken"));
        assert!(!gate.heard(peer(&b), Some(&cert_b), NOW + 3));
        assert!(gate.heard(peer(&a), Some(&cert_a), NOW + 3));
        assert!(!admission.borrow().admits(&peer(&b)));
        // Expired: no longer admitted.
        gate.publish(NOW + 3600);
        assert!(!gate.admits(&peer(&a), NOW + 3600));
        // Before `from`, everyone is admitted.
        let open = Gate::new("plant", &own, &[admin.public()], Some(NOW + 100), NOW);
        assert!(open.admits(&peer(&stranger), NOW));
        assert!(!open.admits(&peer(&stranger), NOW + 100));
    }
}
