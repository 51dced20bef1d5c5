//! Publisher keys and detached manifest signatures.
//!
//! Keys are ed25519 (libp2p-identity), text on disk and on the command line:
//!
//! * a public key is `ed25519:` followed by the key's 32 bytes as 64 lowercase
//!   hex digits; this one string is what `lanup keygen` prints and what
//!   `--trust` accepts;
//! * a secret key file holds `lanup-secret-key ed25519:` and the 32-byte
//!   secret as hex, on one line (the CLI writes it with mode 0600);
//! * `AutoUpdater.xml.sig` holds three lines:
//!
//! ```text
//! lanup-signature 1
//! key ed25519:<64 hex digits>
//! signature <128 hex digits>
//! ```
//!
//! The signature covers the exact bytes of `AutoUpdater.xml`; XML has no
//! canonical form, so a signed manifest is never re-serialised.

use std::fmt;
use std::str::FromStr;

use libp2p_identity::ed25519;

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "lanup-secret-key ed25519:";
const SIG_MAGIC: &str = "lanup-signature 1";

/// A publisher's (or administrator's) public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519::PublicKey);

/// A secret signing key.
#[derive(Clone)]
pub struct SecretKey(ed25519::Keypair);

/// A detached signature and the key that made it.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    pub key: PublicKey,
    bytes: [u8; 64],
}

/// Why a key or signature could not be read or is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("public key {0:?}: expected ed25519: followed by 64 hex digits")]
    MalformedPublicKey(String),
    #[error("secret key: expected one line `lanup-secret-key ed25519:` followed by 64 hex digits")]
    MalformedSecretKey,
    #[error("signature file is empty")]
    Empty,
    #[error("signature file is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("signed by {0}, which is not a trusted publisher key")]
    Untrusted(String),
    #[error("signature by {0} does not match the manifest bytes (changed after signing?)")]
    BadSignature(String),
    #[error("no trusted publisher key given; pass --trust with the publisher's public key")]
    NoTrustedKeys,
}

impl PublicKey {
    /// Whether `signature` over `message` was made by this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.0.verify(message, signature)
    }

    /// The key's 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key of the node whose PeerId is `peer` (an ed25519 PeerId holds
    /// its key), or `None` when `peer` is not one.
    pub fn from_peer_id(peer: &str) -> Option<PublicKey> {
        let peer: libp2p_identity::PeerId = peer.trim().parse().ok()?;
        // An identity multihash: code 0, the length, the key's protobuf.
        let bytes = peer.to_bytes();
        let digest = match bytes.as_slice() {
            [0, len, digest @ ..] if usize::from(*len) == digest.len() => digest,
            _ => return None,
        };
        libp2p_identity::PublicKey::try_decode_protobuf(digest)
            .ok()?
            .try_into_ed25519()
            .ok()
            .map(PublicKey)
    }

    /// The PeerId of a node whose key this is, as text.
    pub fn peer_id(&self) -> String {
        libp2p_identity::PublicKey::from(self.0.clone())
            .to_peer_id()
            .to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SignatureError::MalformedPublicKey(s.to_owned());
        let hex_part = s.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| bad())?;
        ed25519::PublicKey::try_from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| bad())
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        SecretKey(ed25519::Keypair::generate())
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.public())
    }

    /// Signs `message` (the exact manifest bytes).
    pub fn sign(&self, message: &[u8]) -> Signature {
        let sig = self.0.sign(message);
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(&sig);
        Signature {
            key: self.public(),
            bytes,
        }
    }

    /// The same key as a libp2p identity (a node's own key is both).
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        libp2p_identity::Keypair::from(self.0.clone())
    }

    /// The key file's text.
    pub fn to_text(&self) -> String {
        let secret = self.0.secret();
        format!("{SECRET_PREFIX}{}\n", hex::encode(secret.as_ref()))
    }

    /// Reads a key file's text.
    pub fn from_text(text: &str) -> Result<Self, SignatureError> {
        let hex_part = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SignatureError::MalformedSecretKey)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| SignatureError::MalformedSecretKey)?;
        let secret = ed25519::SecretKey::try_from_bytes(&mut bytes)
            .map_err(|_| SignatureError::MalformedSecretKey)?;
        Ok(SecretKey(ed25519::Keypair::from(secret)))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

impl Signature {
    /// The signature's 64 bytes in hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// The `.sig` file's text.
    pub fn to_text(&self) -> String {
        format!(
            "{SIG_MAGIC}\nkey {}\nsignature {}\n",
            self.key,
            hex::encode(self.bytes)
        )
    }

    /// Reads a `.sig` file's text.
    pub fn from_text(text: &str) -> Result<Self, SignatureError> {
        if text.trim().is_empty() {
            return Err(SignatureError::Empty);
        }
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(SIG_MAGIC) {
            return Err(SignatureError::Malformed(
                "first line is not `lanup-signature 1`",
            ));
        }
        let key = lines
            .next()
            .and_then(|l| l.strip_prefix("key "))
            .ok_or(SignatureError::Malformed("no `key` line"))?
            .parse::<PublicKey>()?;
        let sig_hex = lines
            .next()
            .and_then(|l| l.strip_prefix("signature "))
            .ok_or(SignatureError::Malformed("no `signature` line"))?;
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(sig_hex.trim(), &mut bytes)
            .map_err(|_| SignatureError::Malformed("signature is not 128 hex digits"))?;
        if lines.next().is_some() {
            return Err(SignatureError::Malformed(
                "unexpected text after the signature",
            ));
        }
        Ok(Signature { key, bytes })
    }

    /// Checks that a key in `trusted` made this signature over `message`.
    pub fn verify(&self, message: &[u8], trusted: &[PublicKey]) -> Result<(), SignatureError> {
        if trusted.is_empty() {
            return Err(SignatureError::NoTrustedKeys);
        }
        if !trusted.contains(&self.key) {
            return Err(SignatureError::Untrusted(self.key.to_string()));
        }
        if !self.key.verify(message, &self.bytes) {
            return Err(SignatureError::BadSignature(self.key.to_string()));
        }
        Ok(())
    }

    /// The same check as [`Signature::verify`] over a message fed in
    /// pieces ([`SignatureCheck::update`], then [`SignatureCheck::finish`]):
    /// a manifest of many files is checked as it is decoded, never held
    /// whole. Refuses an untrusted key before any byte is read.
    pub fn check(&self, trusted: &[PublicKey]) -> Result<SignatureCheck, SignatureError> {
        if trusted.is_empty() {
            return Err(SignatureError::NoTrustedKeys);
        }
        if !trusted.contains(&self.key) {
            return Err(SignatureError::Untrusted(self.key.to_string()));
        }
        let bad = || SignatureError::BadSignature(self.key.to_string());
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&self.key.to_bytes()).map_err(|_| bad())?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.bytes);
        let verifier = key.verify_stream(&signature).map_err(|_| bad())?;
        Ok(SignatureCheck {
            verifier,
            key: self.key.to_string(),
        })
    }
}

/// A signature check in progress over a message read in pieces.
pub struct SignatureCheck {
    verifier: ed25519_dalek::StreamVerifier,
    key: String,
}

impl SignatureCheck {
    /// Feeds the next bytes of the message.
    pub fn update(&mut self, bytes: &[u8]) {
        self.verifier.update(bytes);
    }

    /// Whether the signature holds over every byte fed.
    pub fn finish(self) -> Result<(), SignatureError> {
        self.verifier
            .finalize_and_verify()
            .map_err(|_| SignatureError::BadSignature(self.key))
    }
}

impl fmt::Debug for SignatureCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignatureCheck(by {})", self.key)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(by {})", self.key)
    }
}

#[cfg(test)]
mod peer_id_tests {
    use super::*;

    #[test]
    fn a_nodes_key_is_read_back_from_its_peer_id() {
        let key = SecretKey::generate().public();
        assert_eq!(PublicKey::from_peer_id(&key.peer_id()), Some(key));
        assert_eq!(PublicKey::from_peer_id("12D3KooWnot-a-peer"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_as_text() {
        let key = SecretKey::generate();
        let again = SecretKey::from_text(&key.to_text()).expect("reads back");
        assert_eq!(again.public(), key.public());
        let public = key.public().to_string();
        assert!(public.starts_with("ed25519:") && public.len() == 8 + 64);
        assert_eq!(public.parse::<PublicKey>(), Ok(key.public()));
    }

    #[test]
    fn a_signature_checked_in_pieces_holds_exactly_when_it_holds_whole() {
        let key = SecretKey::generate();
        let manifest: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let sig = key.sign(&manifest);
        let trusted = [key.public()];
        let mut check = sig.check(&trusted).expect("trusted");
        for piece in manifest.chunks(7_777) {
            check.update(piece);
        }
        check.finish().expect("holds in pieces");

        let mut changed = manifest.clone();
        changed[123_456] ^= 1;
        let mut check = sig.check(&trusted).expect("trusted");
        check.update(&changed);
        assert_eq!(
            check.finish(),
            Err(SignatureError::BadSignature(key.public().to_string()))
        );
        let mut check = sig.check(&trusted).expect("trusted");
        check.update(&manifest[..manifest.len() - 1]);
        assert!(check.finish().is_err(), "a message cut short fails");
        let other = SecretKey::generate().public();
        assert!(matches!(
            sig.check(&[other]),
            Err(SignatureError::Untrusted(_))
        ));
    }

    #[test]
    fn signature_verifies_only_the_exact_bytes_by_a_trusted_key() {
        let key = SecretKey::generate();
        let manifest = b"<AutoUpdater Format=\"2\"/>".to_vec();
        let sig = Signature::from_text(&key.sign(&manifest).to_text()).expect("parse sig");
        let trusted = [key.public()];
        sig.verify(&manifest, &trusted).expect("valid");

        let mut changed = manifest.clone();
        changed[3] ^= 1;
        assert_eq!(
            sig.verify(&changed, &trusted),
            Err(SignatureError::BadSignature(key.public().to_string()))
        );
        let other = SecretKey::generate().public();
        assert_eq!(
            sig.verify(&manifest, &[other]),
            Err(SignatureError::Untrusted(key.public().to_string()))
        );
        assert_eq!(
            sig.verify(&manifest, &[]),
            Err(SignatureError::NoTrustedKeys)
        );
    }

    #[test]
    fn empty_and_truncated_signature_files_are_refused() {
        let key = SecretKey::generate();
        let text = key.sign(b"m").to_text();
        assert_eq!(Signature::from_text(""), Err(SignatureError::Empty));
        assert_eq!(Signature::from_text("\n \n"), Err(SignatureError::Empty));
        for cut in [5, 20, 40, text.len() - 10] {
            assert!(
                matches!(
                    Signature::from_text(&text[..cut]),
                    Err(SignatureError::Malformed(_) | SignatureError::MalformedPublicKey(_))
                ),
                "cut at {cut} accepted"
            );
        }
    }

    #[test]
    fn malformed_keys_are_named() {
        let err = "ed25519:zz".parse::<PublicKey>().expect_err("bad");
        assert!(err.to_string().contains("ed25519:zz"));
        assert!(SecretKey::from_text("nonsense").is_err());
    }
}
