//! Lease keys (lending key 44/104): a token the broker signs with ed25519 and
//! the agent verifies offline with the broker's public key (S52-S54).
//!
//! Format: `lk1.<base64url(claims JSON)>.<base64url(signature)>`. Each lease
//! gets a new key bound to its lease, host, partition and the partition's
//! epoch; the agent fences keys of older epochs and of released leases.
//!
//! Keys and notices name the broker key that signed them (`key_id`), so a
//! broker can rotate its signing key: the agent trusts a set of keys, each
//! new one endorsed (signed) by one it already trusts, and keys signed with
//! an old key keep verifying until they expire.

use crate::ids::LeaseId;
use crate::terms::Terms;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

const PREFIX: &str = "lk1";
/// Keys longer than this are refused before any parsing (the sold terms
/// ride in the key, with up to 32 images pinned by digest).
pub const MAX_KEY_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseKeyClaims {
    pub lease_id: LeaseId,
    pub host_id: String,
    pub partition_index: u32,
    pub epoch: u64,
    pub borrower: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The broker key that signed this key (empty: a key made before key
    /// ids existed, tried against every trusted key).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// The terms the broker sold (and bills): the agent builds exactly
    /// these, after checking that they fit the partition it lent. Absent in
    /// keys made before terms were carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<Terms>,
    /// A lease booked ahead (seed 003): the key works from this time only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
}

/// Why a key was refused. Each variant is a distinct, explainable refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyRejection {
    Malformed,
    BadSignature,
    WrongHost,
    WrongPartition,
    WrongLease,
    Expired,
    /// A newer lease holds the partition (the key's epoch is older).
    Stale,
    /// The key's lease was released.
    Released,
    /// The key's lease starts later (a lease booked ahead).
    NotYetValid,
    /// Signed by a broker this host lends through, but not the one that
    /// manages the key's partition (seed 000, FIG. 10: each partition's
    /// keys come from its managing broker only).
    WrongBroker,
}

impl fmt::Display for KeyRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            KeyRejection::Malformed => "the lease key is malformed",
            KeyRejection::BadSignature => {
                "the lease key's signature does not verify with the broker's public key"
            }
            KeyRejection::WrongHost => "the lease key was issued for another host",
            KeyRejection::WrongPartition => "the lease key was issued for another partition",
            KeyRejection::WrongLease => "the lease key was issued for another lease",
            KeyRejection::Expired => "the lease key has expired",
            KeyRejection::Stale => "the lease key is stale: a newer lease holds this partition",
            KeyRejection::Released => "the lease key belongs to a lease that was released",
            KeyRejection::NotYetValid => {
                "the lease key is not valid yet: its lease was booked for a later start"
            }
            KeyRejection::WrongBroker => {
                "the lease key is signed by a broker that does not manage this partition"
            }
        };
        f.write_str(text)
    }
}

/// Makes a signing key from 32 bytes of seed; the caller supplies randomness.
pub fn signing_key_from_seed(seed: [u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&seed)
}

pub fn public_key_hex(key: &SigningKey) -> String {
    key.verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn verifying_key_from_hex(text: &str) -> Option<VerifyingKey> {
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (n, chunk) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        bytes[n] = u8::from_str_radix(pair, 16).ok()?;
    }
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Signs claims into a key. The domain prefix is signed too, so that a key
/// can never be confused with any other signed message of the broker.
pub fn sign(claims: &LeaseKeyClaims, key: &SigningKey) -> String {
    sign_with_prefix(PREFIX, claims, key)
}

/// Checks the format and signature and returns the claims. Binding to host
/// and partition is the agent's check; to lease, time and epoch, the
/// partition's fence's (`fence::on_event` with a presented key), the one
/// place that rule is written.
pub fn decode_and_verify(token: &str, key: &VerifyingKey) -> Result<LeaseKeyClaims, KeyRejection> {
    decode_with_prefix(PREFIX, token, &TrustedKeys::single(*key))
}

/// Like [`decode_and_verify`], with the key named by the token's `key_id`
/// taken from a set of trusted broker keys.
pub fn decode_and_verify_trusted(
    token: &str,
    keys: &TrustedKeys,
) -> Result<LeaseKeyClaims, KeyRejection> {
    decode_with_prefix(PREFIX, token, keys)
}

/// The id of a broker key: the first 16 hex digits of its public key, enough
/// to tell a handful of keys apart (the signature, not the id, is checked).
pub fn key_id(key: &VerifyingKey) -> String {
    hex_of(&key.to_bytes())[..16].to_string()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The broker keys an agent trusts, by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustedKeys {
    pub fn single(key: VerifyingKey) -> Self {
        let mut keys = TrustedKeys::default();
        keys.insert(key);
        keys
    }

    pub fn insert(&mut self, key: VerifyingKey) {
        self.keys.insert(key_id(&key), key);
    }

    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The public keys as hex, for storing the set.
    pub fn public_keys_hex(&self) -> Vec<String> {
        self.keys.values().map(|k| hex_of(&k.to_bytes())).collect()
    }

    /// The keys a token naming `key_id` may be signed with: that key, or,
    /// for a token from before key ids, every trusted key.
    fn candidates(&self, key_id: &str) -> Vec<&VerifyingKey> {
        if key_id.is_empty() {
            self.keys.values().collect()
        } else {
            self.keys.get(key_id).into_iter().collect()
        }
    }
}

const ENDORSEMENT_PREFIX: &str = "lke1";

/// Signs a new broker public key with a key the agents already trust, so
/// they can extend their trust to it over an unauthenticated channel.
pub fn endorse(new_key: &VerifyingKey, by: &SigningKey) -> String {
    let message = format!("{ENDORSEMENT_PREFIX}.{}", hex_of(&new_key.to_bytes()));
    URL_SAFE_NO_PAD.encode(by.sign(message.as_bytes()).to_bytes())
}

/// Checks an endorsement made by [`endorse`].
pub fn verify_endorsement(new_key: &VerifyingKey, endorsement: &str, by: &VerifyingKey) -> bool {
    let message = format!("{ENDORSEMENT_PREFIX}.{}", hex_of(&new_key.to_bytes()));
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(endorsement) else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(&bytes) else {
        return false;
    };
    by.verify(message.as_bytes(), &signature).is_ok()
}

fn sign_with_prefix<T: Serialize>(prefix: &str, claims: &T, key: &SigningKey) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let message = format!("{prefix}.{body}");
    let signature = key.sign(message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

fn decode_with_prefix<T: serde::de::DeserializeOwned>(
    expected_prefix: &str,
    token: &str,
    keys: &TrustedKeys,
) -> Result<T, KeyRejection> {
    if token.len() > MAX_KEY_LEN {
        return Err(KeyRejection::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(prefix), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(KeyRejection::Malformed);
    };
    if prefix != expected_prefix {
        return Err(KeyRejection::Malformed);
    }
    let signature_bytes = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| KeyRejection::Malformed)?;
    let signature = Signature::from_slice(&signature_bytes).map_err(|_| KeyRejection::Malformed)?;
    let claims_bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| KeyRejection::Malformed)?;
    // The key id is read before the signature is checked only to pick the
    // key; nothing else of the unverified body is used.
    let named: KeyIdOnly =
        serde_json::from_slice(&claims_bytes).map_err(|_| KeyRejection::Malformed)?;
    let message = format!("{prefix}.{body}");
    let verified = keys
        .candidates(&named.key_id)
        .into_iter()
        .any(|key| key.verify(message.as_bytes(), &signature).is_ok());
    if !verified {
        return Err(KeyRejection::BadSignature);
    }
    serde_json::from_slice(&claims_bytes).map_err(|_| KeyRejection::Malformed)
}

#[derive(Deserialize)]
struct KeyIdOnly {
    #[serde(default)]
    key_id: String,
}

const NOTICE_PREFIX: &str = "ln1";

/// What the broker tells an agent about one of its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    LeaseStarted,
    LeaseReleased,
}

/// A signed notice from the broker to an agent (lock on lease, fence on
/// release). Signed like a key, with its own prefix so one is never taken
/// for the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeClaims {
    pub kind: NoticeKind,
    pub host_id: String,
    pub partition_index: u32,
    pub lease_id: LeaseId,
    pub epoch: u64,
    pub key_expires_at_ms: u64,
    /// The broker key that signed this notice (empty: made before key ids).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_id: String,
}

pub fn sign_notice(claims: &NoticeClaims, key: &SigningKey) -> String {
    sign_with_prefix(NOTICE_PREFIX, claims, key)
}

pub fn decode_notice(token: &str, key: &VerifyingKey) -> Result<NoticeClaims, KeyRejection> {
    decode_with_prefix(NOTICE_PREFIX, token, &TrustedKeys::single(*key))
}

pub fn decode_notice_trusted(
    token: &str,
    keys: &TrustedKeys,
) -> Result<NoticeClaims, KeyRejection> {
    decode_with_prefix(NOTICE_PREFIX, token, keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> LeaseKeyClaims {
        LeaseKeyClaims {
            not_before_ms: None,
            lease_id: 9,
            host_id: "alpha".into(),
            partition_index: 2,
            epoch: 5,
            borrower: "bob".into(),
            issued_at_ms: 1000,
            expires_at_ms: 10_000,
            key_id: String::new(),
            terms: None,
        }
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let key = signing_key_from_seed([7; 32]);
        let other = signing_key_from_seed([8; 32]);
        let token = sign(&claims(), &key);
        assert_eq!(
            decode_and_verify(&token, &key.verifying_key()),
            Ok(claims())
        );
        assert_eq!(
            decode_and_verify(&token, &other.verifying_key()),
            Err(KeyRejection::BadSignature)
        );
        let forged = sign(&claims(), &other);
        assert_eq!(
            decode_and_verify(&forged, &key.verifying_key()),
            Err(KeyRejection::BadSignature)
        );
        // Swap in another body under the original signature.
        let mut changed = claims();
        changed.partition_index = 3;
        let changed_token = sign(&changed, &key);
        let spliced = format!(
            "{}.{}",
            changed_token.rsplit_once('.').unwrap().0,
            token.rsplit_once('.').unwrap().1
        );
        assert_eq!(
            decode_and_verify(&spliced, &key.verifying_key()),
            Err(KeyRejection::BadSignature)
        );
        for garbage in ["", "lk1", "lk1.a.b", "xx.yy.zz", "lk1..", &"a".repeat(5000)] {
            assert!(decode_and_verify(garbage, &key.verifying_key()).is_err());
        }
        let hex = public_key_hex(&key);
        assert_eq!(verifying_key_from_hex(&hex), Some(key.verifying_key()));
        assert_eq!(verifying_key_from_hex("zz"), None);
    }

    #[test]
    fn a_rotated_key_verifies_beside_the_old_one_and_is_picked_by_its_id() {
        let old = signing_key_from_seed([1; 32]);
        let new = signing_key_from_seed([2; 32]);
        let stranger = signing_key_from_seed([3; 32]);
        let mut trusted = TrustedKeys::single(old.verifying_key());
        let endorsement = endorse(&new.verifying_key(), &old);
        assert!(verify_endorsement(
            &new.verifying_key(),
            &endorsement,
            &old.verifying_key()
        ));
        assert!(!verify_endorsement(
            &stranger.verifying_key(),
            &endorsement,
            &old.verifying_key()
        ));
        let forged = endorse(&stranger.verifying_key(), &stranger);
        assert!(!verify_endorsement(
            &stranger.verifying_key(),
            &forged,
            &old.verifying_key()
        ));
        trusted.insert(new.verifying_key());
        let mut by_old = claims();
        by_old.key_id = key_id(&old.verifying_key());
        let mut by_new = claims();
        by_new.key_id = key_id(&new.verifying_key());
        assert_eq!(
            decode_and_verify_trusted(&sign(&by_old, &old), &trusted),
            Ok(by_old.clone())
        );
        assert_eq!(
            decode_and_verify_trusted(&sign(&by_new, &new), &trusted),
            Ok(by_new.clone())
        );
        // A key that names the new key but is signed by the old one fails.
        assert_eq!(
            decode_and_verify_trusted(&sign(&by_new, &old), &trusted),
            Err(KeyRejection::BadSignature)
        );
        // A key from before key ids verifies against any trusted key.
        assert_eq!(
            decode_and_verify_trusted(&sign(&claims(), &old), &trusted),
            Ok(claims())
        );
        let mut by_stranger = claims();
        by_stranger.key_id = key_id(&stranger.verifying_key());
        assert_eq!(
            decode_and_verify_trusted(&sign(&by_stranger, &stranger), &trusted),
            Err(KeyRejection::BadSignature)
        );
        assert_eq!(
            decode_and_verify_trusted(&sign(&claims(), &stranger), &trusted),
            Err(KeyRejection::BadSignature)
        );
    }
}
