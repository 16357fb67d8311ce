//! Which broker keys the agent trusts. The first contact pins the broker's
//! first key (trust on first use); after that a key is trusted only when a
//! trusted key endorsed it, so `leasehold broker rotate-key` reaches agents
//! over plain HTTP without letting anyone else slip in a key of their own.

use crate::AgentError;
use leasehold_api::BrokerInfo;
use leasehold_core::key::{self, TrustedKeys};
use leasehold_store::agent::AgentDb;

/// Where the trusted set is kept in the partition table's meta rows.
const TRUSTED_META_KEY: &str = "broker_trusted_keys";
/// Where versions before key rotation pinned their one key.
const LEGACY_META_KEY: &str = "broker_public_key_hex";

/// Where the keys of the market at `position` (0: the first `--broker`)
/// are pinned; the first keeps the key of the one-broker versions.
pub(crate) fn meta_key_of_market(position: usize, url: &str) -> String {
    if position == 0 {
        TRUSTED_META_KEY.to_string()
    } else {
        format!("{TRUSTED_META_KEY}:{url}")
    }
}

/// The keys pinned under `meta_key` (empty on first contact).
pub(crate) fn load_pinned_as(db: &AgentDb, meta_key: &str) -> Result<TrustedKeys, AgentError> {
    let mut keys = TrustedKeys::default();
    let mut hexes: Vec<String> = match db.meta(meta_key)? {
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| AgentError::Internal(format!("corrupt trusted broker keys: {e}")))?,
        None => Vec::new(),
    };
    if meta_key == TRUSTED_META_KEY {
        hexes.extend(db.meta(LEGACY_META_KEY)?);
    }
    for hex in hexes {
        let key = key::verifying_key_from_hex(&hex)
            .ok_or_else(|| AgentError::Internal("a pinned broker key is malformed".into()))?;
        keys.insert(key);
    }
    Ok(keys)
}

pub(crate) fn store_pinned_as(
    db: &AgentDb,
    meta_key: &str,
    keys: &TrustedKeys,
) -> Result<(), AgentError> {
    let json = serde_json::to_string(&keys.public_keys_hex())
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    db.put_meta(meta_key, &json)?;
    Ok(())
}

/// Extends `pinned` with the broker's keys that a trusted key endorsed (on
/// first contact, with the broker's first key), and checks that the key the
/// broker signs with now is among them.
pub(crate) fn extend_trust(pinned: &TrustedKeys, info: &BrokerInfo) -> Result<TrustedKeys, String> {
    let mut offered = info.keys.clone();
    if offered.is_empty() {
        // A broker from before key rotation publishes only its one key.
        let current = key::verifying_key_from_hex(&info.public_key_hex)
            .ok_or("the broker's public key is malformed")?;
        offered.push(leasehold_api::BrokerPublicKey {
            key_id: key::key_id(&current),
            public_key_hex: info.public_key_hex.clone(),
            endorsed_by: None,
            endorsement: None,
        });
    }
    let mut trusted = pinned.clone();
    if trusted.is_empty() {
        let first = key::verifying_key_from_hex(&offered[0].public_key_hex)
            .ok_or("the broker's first key is malformed")?;
        trusted.insert(first);
    }
    // Endorsements form a chain (each key endorsed by the one before), so
    // one pass in order suffices; a second catches any other order.
    for _ in 0..2 {
        for candidate in &offered {
            let Some(new_key) = key::verifying_key_from_hex(&candidate.public_key_hex) else {
                continue;
            };
            let (Some(endorser_id), Some(endorsement)) =
                (&candidate.endorsed_by, &candidate.endorsement)
            else {
                continue;
            };
            let endorser = offered
                .iter()
                .find(|k| &k.key_id == endorser_id && trusted.contains(&k.key_id))
                .and_then(|k| key::verifying_key_from_hex(&k.public_key_hex));
            if let Some(endorser) = endorser {
                if key::verify_endorsement(&new_key, endorsement, &endorser) {
                    trusted.insert(new_key);
                }
            }
        }
    }
    let current = key::verifying_key_from_hex(&info.public_key_hex)
        .ok_or("the broker's public key is malformed")?;
    if !trusted.contains(&key::key_id(&current)) {
        return Err(format!(
            "the broker signs with key {} ({}), which no key this agent trusts has endorsed",
            key::key_id(&current),
            info.public_key_hex
        ));
    }
    Ok(trusted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use leasehold_api::BrokerPublicKey;

    fn published(key: &SigningKey, endorser: Option<&SigningKey>) -> BrokerPublicKey {
        BrokerPublicKey {
            key_id: key::key_id(&key.verifying_key()),
            public_key_hex: key::public_key_hex(key),
            endorsed_by: endorser.map(|e| key::key_id(&e.verifying_key())),
            endorsement: endorser.map(|e| key::endorse(&key.verifying_key(), e)),
        }
    }

    fn info(current: &SigningKey, keys: Vec<BrokerPublicKey>) -> BrokerInfo {
        BrokerInfo {
            version: "test".into(),
            public_key_hex: key::public_key_hex(current),
            commission_basis_points: 0,
            keys,
        }
    }

    #[test]
    fn a_rotated_key_endorsed_by_a_pinned_one_is_trusted_and_a_stranger_is_not() {
        let first = key::signing_key_from_seed([1; 32]);
        let second = key::signing_key_from_seed([2; 32]);
        let stranger = key::signing_key_from_seed([3; 32]);
        let pinned = extend_trust(
            &TrustedKeys::default(),
            &info(&first, vec![published(&first, None)]),
        )
        .unwrap();
        assert_eq!(pinned.len(), 1);
        let rotated = info(
            &second,
            vec![published(&first, None), published(&second, Some(&first))],
        );
        let trusted = extend_trust(&pinned, &rotated).unwrap();
        assert!(trusted.contains(&key::key_id(&second.verifying_key())));
        // A broker that swapped in a key of its own, self-endorsed or not.
        for forged in [
            info(&stranger, vec![published(&stranger, None)]),
            info(
                &stranger,
                vec![
                    published(&first, None),
                    published(&stranger, Some(&stranger)),
                ],
            ),
        ] {
            assert!(extend_trust(&pinned, &forged).is_err());
        }
        // An endorsement copied from another key does not carry over.
        let mut copied = published(&stranger, Some(&first));
        copied.endorsement = published(&second, Some(&first)).endorsement;
        let spliced = info(&stranger, vec![published(&first, None), copied]);
        assert!(extend_trust(&pinned, &spliced).is_err());
    }
}
