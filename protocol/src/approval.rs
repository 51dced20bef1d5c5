//! Two-person approval: a change (a rollout, rollback or abort command)
//! starts only once `threshold` distinct trusted admin keys have signed its
//! exact bytes, before the request expires.
//!
//! The requester's signature is the first approval; `lanup approve` adds
//! another over the same bytes. The same key twice counts once; a
//! signature over other bytes, or by a key that is not trusted, does not
//! count and is reported with its reason. This module has no clock: the
//! time is passed in.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::rollout::SignedCommand;
use crate::sign::{PublicKey, SecretKey};

/// How long a request waits for its approvals by default.
pub const REQUEST_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// One admin's signature over a request's exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// `ed25519:…`
    pub key: String,
    /// 128 hex digits.
    pub signature: String,
}

/// Signs the request `command` (its exact text) as an approval.
pub fn approve(command: &SignedCommand, key: &SecretKey) -> Approval {
    Approval {
        key: key.public().to_string(),
        signature: key.sign(command.command.as_bytes()).to_hex(),
    }
}

/// Why an approval does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCounted {
    #[error("{0} is not a trusted admin key")]
    Untrusted(String),
    #[error("the signature by {0} is not over this request's bytes")]
    OtherBytes(String),
    #[error("malformed approval: {0}")]
    Malformed(String),
    #[error("{0} approved already (a key counts once)")]
    Again(String),
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// The distinct trusted keys whose signatures over the request count.
    pub keys: Vec<PublicKey>,
    /// How many are needed.
    pub threshold: usize,
    /// The approvals that do not count, and why.
    pub refused: Vec<NotCounted>,
}

impl Tally {
    /// Enough distinct trusted keys signed.
    pub fn approved(&self) -> bool {
        self.keys.len() >= self.threshold.max(1)
    }
}

/// Counts the requester's signature on `request` and `approvals` against
/// `trusted` keys and `threshold`.
pub fn tally(
    request: &SignedCommand,
    approvals: &[Approval],
    trusted: &[PublicKey],
    threshold: usize,
) -> Tally {
    let requester = Approval {
        key: request.key.clone(),
        signature: request.signature.clone(),
    };
    let mut seen = BTreeSet::new();
    let mut keys = Vec::new();
    let mut refused = Vec::new();
    for a in std::iter::once(&requester).chain(approvals) {
        match counts(request, a, trusted) {
            Ok(key) if seen.insert(key.to_bytes()) => keys.push(key),
            Ok(key) => refused.push(NotCounted::Again(key.to_string())),
            Err(e) => refused.push(e),
        }
    }
    Tally {
        keys,
        threshold,
        refused,
    }
}

/// Whether one approval is by a trusted key over `request`'s exact bytes;
/// the key it counts for.
pub fn counts(
    request: &SignedCommand,
    a: &Approval,
    trusted: &[PublicKey],
) -> Result<PublicKey, NotCounted> {
    let key: PublicKey = a
        .key
        .parse()
        .map_err(|_| NotCounted::Malformed(format!("key {:?}", a.key)))?;
    if !trusted.contains(&key) {
        return Err(NotCounted::Untrusted(key.to_string()));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(a.signature.trim(), &mut sig)
        .map_err(|_| NotCounted::Malformed("signature is not 128 hex digits".into()))?;
    if !key.verify(request.command.as_bytes(), &sig) {
        return Err(NotCounted::OtherBytes(key.to_string()));
    }
    Ok(key)
}

/// Whether a request issued at `issued_at_ms` may still be approved at
/// `now_ms`, given its time to live.
pub fn open(issued_at_ms: u64, ttl_ms: u64, now_ms: u64) -> bool {
    now_ms <= issued_at_ms.saturating_add(ttl_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{sign, Action, Command};

    fn request(by: &SecretKey, id: &str) -> SignedCommand {
        sign(
            &Command::new(
                "s",
                Action::Rollout {
                    version: "2.0".into(),
                },
                1,
                id,
            ),
            by,
        )
    }

    #[test]
    fn a_second_trusted_key_over_the_same_bytes_makes_two() {
        let (alice, bob, mallory) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let trusted = vec![alice.public(), bob.public()];
        let req = request(&alice, "r1");
        // The request alone: one of two.
        let t = tally(&req, &[], &trusted, 2);
        assert_eq!((t.keys.len(), t.approved()), (1, false));
        // The same key again counts once.
        let t = tally(&req, &[approve(&req, &alice)], &trusted, 2);
        assert!(!t.approved());
        assert!(matches!(t.refused[..], [NotCounted::Again(_)]));
        // An untrusted key, and a trusted key over other bytes, do not count.
        let other = request(&alice, "r2");
        let t = tally(
            &req,
            &[approve(&req, &mallory), approve(&other, &bob)],
            &trusted,
            2,
        );
        assert!(!t.approved());
        assert!(matches!(
            t.refused[..],
            [NotCounted::Untrusted(_), NotCounted::OtherBytes(_)]
        ));
        // Bob over the same bytes: approved.
        let t = tally(&req, &[approve(&req, &bob)], &trusted, 2);
        assert!(t.approved());
        assert_eq!(t.keys, vec![alice.public(), bob.public()]);
        // A threshold of one: the request alone.
        assert!(tally(&req, &[], &trusted, 1).approved());
    }

    #[test]
    fn an_expired_request_cannot_be_approved() {
        assert!(open(1_000, REQUEST_TTL_MS, 1_000 + REQUEST_TTL_MS));
        assert!(!open(1_000, REQUEST_TTL_MS, 1_001 + REQUEST_TTL_MS));
    }
}
