//! Who belongs to a site: membership certificates, the join tokens that
//! let a new machine obtain one, and revocations.
//!
//! A node is a member of a site because an administrator said so: a
//! [`Certificate`] names the node's key, the site and an expiry, and is
//! signed by a trusted admin key, or by a join token's key that a trusted
//! admin key vouched for ([`Delegation`]). The admin's secret key never
//! leaves the admin's machine: `lanup enroll` signs a delegation to a
//! fresh key, valid for a short while (an hour by default), and hands out
//! that key's secret as the join token; `lanup setup --join TOKEN` signs
//! the new node's certificate with it. A leaked token admits machines only
//! until it expires, and revoking the token's key removes every node it
//! admitted.
//!
//! A [`Revocations`] list, signed by a trusted admin, names node keys and
//! token keys that no longer belong; the newest list of a site wins.
//!
//! All texts are JSON signed byte for byte as they travel (the signature
//! covers the exact text, never a re-serialisation).

use serde::{Deserialize, Serialize};

use crate::sign::{PublicKey, SecretKey};

/// Why a certificate, token or revocation list is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("signed by {0}, which is not a trusted admin key")]
    Untrusted(String),
    #[error("the signature by {0} does not match")]
    BadSignature(String),
    #[error("it is for site {found:?}, not {wanted:?}")]
    OtherSite { found: String, wanted: String },
    #[error("it is for node {found}, not {wanted}")]
    OtherNode { found: String, wanted: String },
    #[error("it expired at {0} (Unix seconds)")]
    Expired(u64),
    #[error("the join token it was made with had expired when it was used")]
    TokenExpired,
    #[error("it outlasts what its join token allows")]
    TooLong,
    #[error("{0} is revoked")]
    Revoked(String),
}

/// A text and the signature over its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The exact JSON text signed.
    pub text: String,
    /// The signing key, `ed25519:…`.
    pub key: String,
    /// 128 hex digits.
    pub signature: String,
}

impl Signed {
    fn new<T: Serialize>(what: &T, key: &SecretKey) -> Signed {
        let text = serde_json::to_string(what).unwrap_or_default();
        let signature = key.sign(text.as_bytes()).to_hex();
        Signed {
            text,
            key: key.public().to_string(),
            signature,
        }
    }

    /// The signing key, once the signature holds.
    fn signer(&self) -> Result<PublicKey, MembershipError> {
        let key: PublicKey = self
            .key
            .parse()
            .map_err(|_| MembershipError::Malformed("signing key"))?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig)
            .map_err(|_| MembershipError::Malformed("signature"))?;
        if !key.verify(self.text.as_bytes(), &sig) {
            return Err(MembershipError::BadSignature(self.key.clone()));
        }
        Ok(key)
    }

    /// The signed text read as a `T` (`what` names it in the error); the
    /// signature is not checked.
    pub fn body<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
    ) -> Result<T, MembershipError> {
        serde_json::from_str(&self.text).map_err(|_| MembershipError::Malformed(what))
    }

    /// The signer, which must be one of `trusted`.
    fn by_trusted(&self, trusted: &[PublicKey]) -> Result<PublicKey, MembershipError> {
        let key = self.signer()?;
        if !trusted.contains(&key) {
            return Err(MembershipError::Untrusted(self.key.clone()));
        }
        Ok(key)
    }
}

/// What a certificate vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub site: String,
    /// The node's public key, `ed25519:…` (its libp2p identity).
    pub node: String,
    /// Unix seconds.
    pub issued: u64,
    /// Unix seconds.
    pub expires: u64,
}

/// An admin's leave for a join token's key to sign certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    pub site: String,
    /// The token's public key.
    pub key: String,
    /// Certificates signed after this (Unix seconds) are refused.
    pub until: u64,
    /// The longest membership a certificate it signs may give, in seconds.
    pub lasts: u64,
}

/// A node's membership of a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// A [`Grant`], signed by an admin or a join token's key.
    pub grant: Signed,
    /// With a token's signature: the admin's [`Delegation`] to that key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Signed>,
}

impl Certificate {
    /// An admin's certificate for `node` in `site`, `lasts` seconds from
    /// `now`.
    pub fn issue(
        admin: &SecretKey,
        site: &str,
        node: &PublicKey,
        now: u64,
        lasts: u64,
    ) -> Certificate {
        let grant = Grant {
            site: site.to_owned(),
            node: node.to_string(),
            issued: now,
            expires: now.saturating_add(lasts),
        };
        Certificate {
            grant: Signed::new(&grant, admin),
            delegation: None,
        }
    }

    /// Checks that this certifies `node` as a member of `site` at `now`
    /// for one of the `trusted` admin keys, and that neither the node nor
    /// the token that admitted it is in `revoked`. Returns the grant.
    pub fn check(
        &self,
        site: &str,
        node: &PublicKey,
        trusted: &[PublicKey],
        revoked: &Revocations,
        now: u64,
    ) -> Result<Grant, MembershipError> {
        let grant: Grant = self.grant.body("certificate")?;
        match &self.delegation {
            None => {
                self.grant.by_trusted(trusted)?;
            }
            Some(delegation) => {
                delegation.by_trusted(trusted)?;
                let leave: Delegation = delegation.body("delegation")?;
                if leave.key != self.grant.key {
                    return Err(MembershipError::Malformed(
                        "certificate: not signed by its token",
                    ));
                }
                self.grant.signer()?;
                if leave.site != site {
                    return Err(MembershipError::OtherSite {
                        found: leave.site,
                        wanted: site.to_owned(),
                    });
                }
                if grant.issued > leave.until {
                    return Err(MembershipError::TokenExpired);
                }
                if grant.expires > grant.issued.saturating_add(leave.lasts) {
                    return Err(MembershipError::TooLong);
                }
                if revoked.names(&leave.key) {
                    return Err(MembershipError::Revoked(format!(
                        "the join token {}",
                        leave.key
                    )));
                }
            }
        }
        if grant.site != site {
            return Err(MembershipError::OtherSite {
                found: grant.site,
                wanted: site.to_owned(),
            });
        }
        let wanted = node.to_string();
        if grant.node != wanted {
            return Err(MembershipError::OtherNode {
                found: grant.node,
                wanted,
            });
        }
        if now >= grant.expires {
            return Err(MembershipError::Expired(grant.expires));
        }
        if revoked.names(&grant.node) {
            return Err(MembershipError::Revoked(format!("node {}", grant.node)));
        }
        Ok(grant)
    }

    /// A short digest, to check each distinct certificate once.
    pub fn digest(&self) -> [u8; 32] {
        let text = serde_json::to_vec(self).unwrap_or_default();
        *blake3::hash(&text).as_bytes()
    }
}

const TOKEN_PREFIX: &str = "lanup-join-1.";

/// The largest published revocation list a node or headquarters reads.
pub const MAX_REVOCATION_BYTES: usize = 256 * 1024;

/// Where a site's revocation list is published in the release folder,
/// beside the fleet rollout file: the site's fetcher reads it as it polls,
/// and headquarters as it takes the site's reports. `site` is a valid site
/// name (letters, digits, '-', '_', '.'; no leading '.').
pub fn revoked_file(site: &str) -> String {
    format!("revoked/{site}.json")
}

/// What a join token carries: the admin's delegation and the secret of
/// the key it vouches for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenBody {
    delegation: Signed,
    secret: String,
}

/// A join token: lets its holder sign one membership certificate for a
/// machine of the site until it expires.
#[derive(Clone)]
pub struct JoinToken {
    delegation: Signed,
    leave: Delegation,
    key: SecretKey,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JoinToken({:?})", self.leave)
    }
}

impl JoinToken {
    /// A token for `site` usable until `now + valid`, giving memberships
    /// of at most `lasts` seconds.
    pub fn new(admin: &SecretKey, site: &str, now: u64, valid: u64, lasts: u64) -> JoinToken {
        let key = SecretKey::generate();
        let leave = Delegation {
            site: site.to_owned(),
            key: key.public().to_string(),
            until: now.saturating_add(valid),
            lasts,
        };
        JoinToken {
            delegation: Signed::new(&leave, admin),
            leave,
            key,
        }
    }

    /// The text an administrator hands out.
    pub fn to_text(&self) -> String {
        let body = TokenBody {
            delegation: self.delegation.clone(),
            secret: self.key.to_text().trim().to_owned(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        format!(
            "{TOKEN_PREFIX}{}",
            data_encoding::BASE64URL_NOPAD.encode(&json)
        )
    }

    /// Reads a token (it is checked against trusted keys when it is used).
    pub fn from_text(text: &str) -> Result<JoinToken, MembershipError> {
        let bad = MembershipError::Malformed(
            "join token: expected the lanup-join-1.… text `lanup enroll` printed",
        );
        let encoded = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(bad.clone())?;
        let json = data_encoding::BASE64URL_NOPAD
            .decode(encoded.as_bytes())
            .map_err(|_| bad.clone())?;
        let body: TokenBody = serde_json::from_slice(&json).map_err(|_| bad.clone())?;
        let key = SecretKey::from_text(&body.secret).map_err(|_| bad.clone())?;
        let leave: Delegation = body.delegation.body("join token")?;
        body.delegation.signer()?;
        if leave.key != key.public().to_string() {
            return Err(bad);
        }
        Ok(JoinToken {
            delegation: body.delegation,
            leave,
            key,
        })
    }

    pub fn site(&self) -> &str {
        &self.leave.site
    }

    /// The admin key that vouched for the token.
    pub fn admin(&self) -> &str {
        &self.delegation.key
    }

    /// Unix seconds after which the token admits no one.
    pub fn until(&self) -> u64 {
        self.leave.until
    }

    /// The token's public key (what revoking the token names).
    pub fn key(&self) -> String {
        self.key.public().to_string()
    }

    /// The certificate for `node`, signed at `now`, lasting as long as
    /// the token allows.
    pub fn admit(&self, node: &PublicKey, now: u64) -> Result<Certificate, MembershipError> {
        if now > self.leave.until {
            return Err(MembershipError::TokenExpired);
        }
        let grant = Grant {
            site: self.leave.site.clone(),
            node: node.to_string(),
            issued: now,
            expires: now.saturating_add(self.leave.lasts),
        };
        Ok(Certificate {
            grant: Signed::new(&grant, &self.key),
            delegation: Some(self.delegation.clone()),
        })
    }
}

/// Keys that no longer belong to a site: nodes, and the join tokens that
/// admitted them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub site: String,
    /// Unix seconds; the newest list of a site replaces older ones.
    pub issued: u64,
    pub keys: Vec<String>,
}

/// A site's revocation list as held: the signed text, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    pub list: RevocationList,
    pub signed: Option<Signed>,
}

impl Revocations {
    /// An admin's list for `site`.
    pub fn sign(admin: &SecretKey, site: &str, keys: Vec<String>, now: u64) -> Signed {
        Signed::new(
            &RevocationList {
                site: site.to_owned(),
                issued: now,
                keys,
            },
            admin,
        )
    }

    /// Takes `signed` when a trusted admin signed it for `site` and it is
    /// newer than the list held; returns whether it was taken.
    pub fn take(
        &mut self,
        signed: &Signed,
        site: &str,
        trusted: &[PublicKey],
    ) -> Result<bool, MembershipError> {
        // The list held, as every heartbeat brings it: nothing to read.
        if self.signed.as_ref() == Some(signed) {
            return Ok(false);
        }
        let list: RevocationList = signed.body("revocation list")?;
        // Not newer: nothing to check.
        if self.signed.is_some() && list.issued <= self.list.issued {
            return Ok(false);
        }
        signed.by_trusted(trusted)?;
        if list.site != site {
            return Err(MembershipError::OtherSite {
                found: list.site,
                wanted: site.to_owned(),
            });
        }
        self.list = list;
        self.signed = Some(signed.clone());
        Ok(true)
    }

    /// Whether `key` is revoked.
    pub fn names(&self, key: &str) -> bool {
        self.list.keys.iter().any(|k| k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    #[test]
    fn an_admins_certificate_admits_its_node_to_its_site_until_it_expires() {
        let admin = SecretKey::generate();
        let node = SecretKey::generate().public();
        let none = Revocations::default();
        let cert = Certificate::issue(&admin, "plant-7", &node, NOW, 30 * DAY);
        let trusted = [admin.public()];
        let grant = cert
            .check("plant-7", &node, &trusted, &none, NOW + 1)
            .expect("member");
        assert_eq!(grant.expires, NOW + 30 * DAY);
        // Another site of the same name with another admin, another node,
        // later, or an untrusted admin: refused.
        let other_admin = [SecretKey::generate().public()];
        assert!(matches!(
            cert.check("plant-7", &node, &other_admin, &none, NOW),
            Err(MembershipError::Untrusted(_))
        ));
        assert!(matches!(
            cert.check("plant-8", &node, &trusted, &none, NOW),
            Err(MembershipError::OtherSite { .. })
        ));
        let stranger = SecretKey::generate().public();
        assert!(matches!(
            cert.check("plant-7", &stranger, &trusted, &none, NOW),
            Err(MembershipError::OtherNode { .. })
        ));
        assert!(matches!(
            cert.check("plant-7", &node, &trusted, &none, NOW + 30 * DAY),
            Err(MembershipError::Expired(_))
        ));
        // A changed byte breaks the signature.
        let mut forged = cert.clone();
        forged.grant.text = forged.grant.text.replace("plant-7", "plant-9");
        assert!(matches!(
            forged.check("plant-9", &node, &trusted, &none, NOW),
            Err(MembershipError::BadSignature(_))
        ));
    }

    #[test]
    fn a_join_token_admits_machines_while_it_is_valid_and_revoking_it_removes_them() {
        let admin = SecretKey::generate();
        let trusted = [admin.public()];
        let token = JoinToken::new(&admin, "plant-7", NOW, 3600, 365 * DAY);
        let token = JoinToken::from_text(&token.to_text()).expect("round trip");
        assert_eq!(token.site(), "plant-7");
        assert_eq!(token.admin(), admin.public().to_string());
        let node = SecretKey::generate().public();
        let cert = token.admit(&node, NOW + 60).expect("within the hour");
        let mut revoked = Revocations::default();
        cert.check("plant-7", &node, &trusted, &revoked, NOW + 100)
            .expect("member");
        assert!(matches!(
            token.admit(&node, NOW + 3601),
            Err(MembershipError::TokenExpired)
        ));
        // A certificate the token's holder signs later than the token's
        // end, or for longer than it allows, is refused even if made by
        // hand.
        let mut late = token.clone();
        late.leave.until = NOW + 10 * DAY;
        let late_cert = late.admit(&node, NOW + 2 * DAY).expect("signs");
        assert_eq!(
            late_cert.check("plant-7", &node, &trusted, &revoked, NOW + 2 * DAY),
            Err(MembershipError::TokenExpired)
        );
        let mut long = token.clone();
        long.leave.lasts = 10 * 365 * DAY;
        let long_cert = long.admit(&node, NOW + 60).expect("signs");
        assert_eq!(
            long_cert.check("plant-7", &node, &trusted, &revoked, NOW + 100),
            Err(MembershipError::TooLong)
        );
        // Revoking the token removes the node it admitted; revoking the
        // node alone does too.
        let list = Revocations::sign(&admin, "plant-7", vec![token.key()], NOW + 200);
        assert!(revoked.take(&list, "plant-7", &trusted).expect("taken"));
        assert!(matches!(
            cert.check("plant-7", &node, &trusted, &revoked, NOW + 300),
            Err(MembershipError::Revoked(_))
        ));
        let list = Revocations::sign(&admin, "plant-7", vec![node.to_string()], NOW + 400);
        assert!(revoked.take(&list, "plant-7", &trusted).expect("taken"));
        assert!(cert
            .check("plant-7", &node, &trusted, &revoked, NOW + 500)
            .is_err());
        // An older list does not replace a newer one; a stranger's is refused.
        let older = Revocations::sign(&admin, "plant-7", vec![], NOW + 300);
        assert!(!revoked.take(&older, "plant-7", &trusted).expect("older"));
        let stranger = Revocations::sign(&SecretKey::generate(), "plant-7", vec![], NOW + 900);
        assert!(revoked.take(&stranger, "plant-7", &trusted).is_err());
        assert!(revoked.names(&node.to_string()));
    }

    #[test]
    fn a_damaged_token_is_refused_naming_what_is_expected() {
        for text in ["", "lanup-join-1.", "lanup-join-1.!!!", "eyJhIjoxfQ"] {
            let err = JoinToken::from_text(text).expect_err("refused");
            assert!(err.to_string().contains("join token"), "{err}");
        }
    }
}
