//! The broker's signing keys, each in its own 0600 file under
//! `<data-dir>/keys/`, never in the database (a database copy, a backup or a
//! replica must not be enough to forge lease keys).
//!
//! The newest key signs new lease keys and notices; older keys stay
//! published so that keys they signed keep verifying until they expire.
//! Every key after the first carries an endorsement by its predecessor, so
//! an agent that trusts one key can extend its trust to the next.

use crate::BrokerError;
use ed25519_dalek::SigningKey;
use leasehold_api::BrokerPublicKey;
use leasehold_core::key;
use leasehold_store::private_fs;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What one key file holds.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    key_id: String,
    seed_hex: String,
    created_at_ms: u64,
    #[serde(default)]
    endorsed_by: Option<String>,
    #[serde(default)]
    endorsement: Option<String>,
}

/// The broker's keys: the current one and every published one.
pub struct BrokerKeys {
    current: SigningKey,
    current_id: String,
    published: Vec<BrokerPublicKey>,
}

impl BrokerKeys {
    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    pub fn current_id(&self) -> &str {
        &self.current_id
    }

    pub fn published(&self) -> &[BrokerPublicKey] {
        &self.published
    }
}

pub fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

fn io(path: &Path, error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Internal(format!("signing key {}: {error}", path.display()))
}

/// Loads the keys in `data_dir/keys`, or makes the first one from
/// `legacy_seed` (a seed that used to live in the database) or `fresh_seed`.
pub fn load_or_create(
    data_dir: &Path,
    legacy_seed: Option<[u8; 32]>,
    fresh_seed: [u8; 32],
    now_ms: u64,
) -> Result<BrokerKeys, BrokerError> {
    let dir = keys_dir(data_dir);
    private_fs::ensure_private_dir(&dir).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let mut files = read_key_files(&dir)?;
    if files.is_empty() {
        let seed = legacy_seed.unwrap_or(fresh_seed);
        files.push(write_key_file(&dir, seed, now_ms, None)?);
    }
    Ok(assemble(files))
}

/// Adds a new key, endorsed by the current one; it becomes the current key.
pub fn rotate(
    data_dir: &Path,
    fresh_seed: [u8; 32],
    now_ms: u64,
) -> Result<BrokerKeys, BrokerError> {
    let dir = keys_dir(data_dir);
    private_fs::ensure_private_dir(&dir).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let mut files = read_key_files(&dir)?;
    let Some(previous) = files.last() else {
        return Err(BrokerError::Internal(format!(
            "no signing key in {} to rotate from; start the broker once first",
            dir.display()
        )));
    };
    let (previous, previous_key) = previous;
    // Strictly later than the previous key, so the order never ties.
    let created_at_ms = now_ms.max(previous.created_at_ms + 1);
    files.push(write_key_file(
        &dir,
        fresh_seed,
        created_at_ms,
        Some(previous_key),
    )?);
    Ok(assemble(files))
}

/// The key files in `dir`, oldest first, each with its checked key.
fn read_key_files(dir: &Path) -> Result<Vec<(KeyFile, SigningKey)>, BrokerError> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("key") {
            continue;
        }
        let text = private_fs::read_private_file(&path)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| io(&path, e))?;
        let signing = signing_key_of(&file, &path)?;
        files.push((file, signing));
    }
    files.sort_by(|(a, _), (b, _)| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
    Ok(files)
}

fn signing_key_of(file: &KeyFile, path: &Path) -> Result<SigningKey, BrokerError> {
    let bytes = hex::decode(&file.seed_hex).map_err(|e| io(path, e))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| io(path, "the seed is not 32 bytes"))?;
    let signing = key::signing_key_from_seed(seed);
    if key::key_id(&signing.verifying_key()) != file.key_id {
        return Err(io(path, "the key id does not match the key"));
    }
    Ok(signing)
}

fn write_key_file(
    dir: &Path,
    seed: [u8; 32],
    created_at_ms: u64,
    endorser: Option<&SigningKey>,
) -> Result<(KeyFile, SigningKey), BrokerError> {
    let signing = key::signing_key_from_seed(seed);
    let key_id = key::key_id(&signing.verifying_key());
    let file = KeyFile {
        key_id: key_id.clone(),
        seed_hex: hex::encode(seed),
        created_at_ms,
        endorsed_by: endorser.map(|e| key::key_id(&e.verifying_key())),
        endorsement: endorser.map(|e| key::endorse(&signing.verifying_key(), e)),
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| io(dir, e))?;
    let path = dir.join(format!("{key_id}.key"));
    private_fs::write_private_file(&path, text.as_bytes())
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    Ok((file, signing))
}

fn assemble(keys: Vec<(KeyFile, SigningKey)>) -> BrokerKeys {
    let published = keys
        .iter()
        .map(|(file, signing)| BrokerPublicKey {
            key_id: file.key_id.clone(),
            public_key_hex: key::public_key_hex(signing),
            endorsed_by: file.endorsed_by.clone(),
            endorsement: file.endorsement.clone(),
        })
        .collect();
    let (newest, current) = keys.last().expect("at least one key file");
    BrokerKeys {
        current: current.clone(),
        current_id: newest.key_id.clone(),
        published,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_first_key_is_made_once_in_a_private_file_and_rotation_endorses_the_next() {
        let data = tempfile::tempdir().unwrap();
        let first = load_or_create(data.path(), None, [5; 32], 1000).unwrap();
        let again = load_or_create(data.path(), None, [6; 32], 2000).unwrap();
        assert_eq!(first.current_id(), again.current_id());
        let file = keys_dir(data.path()).join(format!("{}.key", first.current_id()));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let rotated = rotate(data.path(), [7; 32], 500).unwrap();
        assert_ne!(rotated.current_id(), first.current_id());
        assert_eq!(rotated.published().len(), 2);
        let newest = &rotated.published()[1];
        assert_eq!(newest.endorsed_by.as_deref(), Some(first.current_id()));
        assert!(key::verify_endorsement(
            &rotated.current().verifying_key(),
            newest.endorsement.as_deref().unwrap(),
            &first.current().verifying_key()
        ));
        let reloaded = load_or_create(data.path(), None, [8; 32], 3000).unwrap();
        assert_eq!(reloaded.current_id(), rotated.current_id());
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let keys = load_or_create(data.path(), Some([9; 32]), [1; 32], 1).unwrap();
        assert_eq!(
            keys.current_id(),
            key::key_id(&key::signing_key_from_seed([9; 32]).verifying_key())
        );
        let file = keys_dir(data.path()).join(format!("{}.key", keys.current_id()));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = load_or_create(data.path(), None, [1; 32], 2).err().unwrap();
        assert!(error.to_string().contains("chmod 600"), "{error}");
    }
}
