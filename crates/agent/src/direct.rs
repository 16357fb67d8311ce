//! Direct lending inside one organisation (the end of seed 000): an agent
//! started with `--direct` lends without any broker. The host's owner
//! grants borrowers a credential (`leasehold agent grant NAME`); a granted
//! borrower finds and leases partitions at the agent itself, which signs
//! the lease key with the owner's own key (`owner-signing-key` in the data
//! directory, 0600). Nothing is billed. The key checks and the fence are
//! the same as for a broker's keys: the owner's key is the one market of
//! the fixed partitions.
//!
//! Grants (by token hash) and leases live in the partition table's meta
//! rows as one small record, changed under one lock.

use crate::{Agent, AgentError};
use leasehold_api::{DirectGrant, DirectLeaseRequest, LeaseView, Offer};
use leasehold_core::fence::{FenceAction, FenceEvent, FencePhase};
use leasehold_core::key::{self, LeaseKeyClaims};
use leasehold_core::lease::LeaseState;
use leasehold_core::matching::{matches, FitKey};
use leasehold_core::{FieldError, PartitionRef, Requirements};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const BOOK_META_KEY: &str = "direct_book";
/// The owner's signing key, next to the partition table.
pub const OWNER_KEY_FILE: &str = "owner-signing-key";
/// The owner's credential for the lender interface, made on first start
/// unless one is given.
pub const OWNER_TOKEN_FILE: &str = "owner.token";
/// How long a directly leased key lasts unless asked otherwise.
pub const DEFAULT_DIRECT_KEY_TTL_SECS: u64 = 24 * 3600;
/// The most grants one agent keeps.
const MAX_GRANTS: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DirectLease {
    borrower: String,
    index: u32,
    epoch: u64,
    started_at_ms: u64,
    key_expires_at_ms: u64,
}

/// Who may lease here, and the leases concluded and not released.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DirectBook {
    /// Borrower name -> SHA-256 of its token.
    grants: BTreeMap<String, String>,
    leases: BTreeMap<u64, DirectLease>,
    last_lease_id: u64,
}

fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The owner's signing key, made on first start (a random seed, 0600).
pub fn load_or_create_owner_key(data_dir: &Path) -> Result<ed25519_dalek::SigningKey, AgentError> {
    let path = data_dir.join(OWNER_KEY_FILE);
    let internal = |e: String| AgentError::Internal(format!("{}: {e}", path.display()));
    if !path.exists() {
        let seed: [u8; 32] = rand::random();
        leasehold_store::private_fs::write_private_file(&path, hex::encode(seed).as_bytes())
            .map_err(|e| internal(e.to_string()))?;
    }
    let text = leasehold_store::private_fs::read_private_file(&path)
        .map_err(|e| internal(e.to_string()))?;
    let bytes = hex::decode(text.trim()).map_err(|e| internal(e.to_string()))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| internal("not a 32-byte seed".into()))?;
    Ok(key::signing_key_from_seed(seed))
}

/// The owner's token: the one in `data_dir/owner.token`, made on first
/// start (0600). Answers the token and the file.
pub fn load_or_create_owner_token(
    data_dir: &Path,
) -> Result<(String, std::path::PathBuf), AgentError> {
    leasehold_store::private_fs::ensure_private_dir(data_dir)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let path = data_dir.join(OWNER_TOKEN_FILE);
    if !path.exists() {
        let token = format!("lh_owner_{}", hex::encode(rand::random::<[u8; 24]>()));
        leasehold_store::private_fs::write_private_file(&path, token.as_bytes())
            .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?;
    }
    let token = leasehold_store::private_fs::read_private_file(&path)
        .map_err(|e| AgentError::Internal(format!("{}: {e}", path.display())))?;
    Ok((token.trim().to_string(), path))
}

impl Agent {
    fn direct_book(&self) -> Result<DirectBook, AgentError> {
        match self.db().meta(BOOK_META_KEY)? {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| AgentError::Internal(format!("corrupt direct lending record: {e}"))),
            None => Ok(DirectBook::default()),
        }
    }

    fn store_direct_book(&self, book: &DirectBook) -> Result<(), AgentError> {
        let json = serde_json::to_string(book).map_err(|e| AgentError::Internal(e.to_string()))?;
        self.db().put_meta(BOOK_META_KEY, &json)?;
        Ok(())
    }

    fn require_direct(&self) -> Result<(), AgentError> {
        if self.owner_key.is_some() {
            return Ok(());
        }
        Err(AgentError::NotFound(
            "this agent lends through brokers; direct lending needs `leasehold agent --direct`"
                .into(),
        ))
    }

    /// The granted borrower a token belongs to, if any.
    pub(crate) fn direct_borrower(&self, token: &str) -> Option<String> {
        self.owner_key.as_ref()?;
        let hash = token_sha256(token);
        let book = self.direct_book().ok()?;
        book.grants
            .iter()
            .find(|(_, granted)| crate::same_secret(granted, &hash))
            .map(|(name, _)| name.clone())
    }

    /// The owner grants `name` a credential to lease here (shown once);
    /// granting a name again replaces its credential.
    pub(crate) async fn grant(&self, name: &str) -> Result<DirectGrant, AgentError> {
        self.require_direct()?;
        leasehold_core::ids::validate_host_id("name", name)?;
        let _serial = self.direct_lock.lock().await;
        let mut book = self.direct_book()?;
        if book.grants.len() >= MAX_GRANTS && !book.grants.contains_key(name) {
            return Err(AgentError::Invalid(FieldError::new(
                "name",
                format!("this agent keeps at most {MAX_GRANTS} grants; revoke one first"),
            )));
        }
        let token = format!("lh_grant_{}", hex::encode(rand::random::<[u8; 24]>()));
        book.grants.insert(name.to_string(), token_sha256(&token));
        self.store_direct_book(&book)?;
        Ok(DirectGrant {
            name: name.to_string(),
            token: Some(token),
            leases_released: 0,
        })
    }

    /// The owner takes a grant back: its credential stops working and its
    /// leases end at once (fenced, then wiped).
    pub(crate) async fn revoke(self: &Arc<Self>, name: &str) -> Result<DirectGrant, AgentError> {
        self.require_direct()?;
        let lease_ids: Vec<u64> = {
            let _serial = self.direct_lock.lock().await;
            let mut book = self.direct_book()?;
            if book.grants.remove(name).is_none() {
                return Err(AgentError::NotFound(format!("no grant to '{name}'")));
            }
            self.store_direct_book(&book)?;
            (book.leases.iter())
                .filter(|(_, lease)| lease.borrower == name)
                .map(|(id, _)| *id)
                .collect()
        };
        for lease_id in &lease_ids {
            self.end_direct_lease(*lease_id, None).await?;
        }
        Ok(DirectGrant {
            name: name.to_string(),
            token: None,
            leases_released: lease_ids.len() as u64,
        })
    }

    /// Free partitions meeting `requirements`, cheapest and best fitting
    /// first.
    pub(crate) fn direct_offers(
        &self,
        requirements: &Requirements,
        limit: usize,
    ) -> Result<Vec<Offer>, AgentError> {
        self.require_direct()?;
        let mut free: Vec<Offer> = (self.db().partitions()?)
            .into_iter()
            .filter(|row| row.fence.phase == FencePhase::Free && row.registered)
            .filter(|row| matches(&row.terms, requirements))
            .map(|row| Offer {
                partition: PartitionRef::new(self.host_id(), row.index),
                terms: row.terms,
            })
            .collect();
        free.sort_by_cached_key(|offer| FitKey::new(offer.partition.clone(), &offer.terms));
        free.truncate(limit);
        Ok(free)
    }

    /// Leases a free partition to a granted borrower: the fence takes the
    /// lease first (so the partition is locked), then the owner signs its key.
    pub(crate) async fn direct_lease(
        &self,
        borrower: &str,
        request: &DirectLeaseRequest,
    ) -> Result<LeaseView, AgentError> {
        self.require_direct()?;
        let ttl_ms = request
            .key_ttl_secs
            .unwrap_or(DEFAULT_DIRECT_KEY_TTL_SECS)
            .clamp(1, 30 * 24 * 3600)
            * 1000;
        let _serial = self.direct_lock.lock().await;
        let index = self.direct_choice(request)?;
        let row = self.load(index)?;
        let mut book = self.direct_book()?;
        let lease_id = book.last_lease_id + 1;
        let epoch = row.fence.epoch.max(row.fence.released_through_epoch) + 1;
        let now_ms = self.config.clock.now_ms();
        let lease = DirectLease {
            borrower: borrower.to_string(),
            index,
            epoch,
            started_at_ms: now_ms,
            key_expires_at_ms: now_ms.saturating_add(ttl_ms),
        };
        self.drive_fence(
            index,
            FenceEvent::LeaseStarted {
                lease_id,
                epoch,
                key_expires_at_ms: lease.key_expires_at_ms,
            },
        )?;
        book.last_lease_id = lease_id;
        book.leases.insert(lease_id, lease.clone());
        self.store_direct_book(&book)?;
        Ok(self.direct_view(lease_id, &lease, LeaseState::Active, true))
    }

    /// The partition a direct lease takes: the one named, if free; else the
    /// best free one for the requirements.
    fn direct_choice(&self, request: &DirectLeaseRequest) -> Result<u32, AgentError> {
        match (request.partition, &request.best) {
            (Some(index), None) => {
                let row = self.load(index)?;
                if row.fence.phase != FencePhase::Free || !row.registered {
                    return Err(AgentError::Conflict(format!(
                        "partition {index} is not free"
                    )));
                }
                Ok(index)
            }
            (None, Some(requirements)) => {
                requirements
                    .validate()
                    .map_err(|e| FieldError::new(format!("best.{}", e.field), e.problem))?;
                let offers = self.direct_offers(requirements, 1)?;
                offers
                    .first()
                    .map(|offer| offer.partition.index)
                    .ok_or_else(|| {
                        AgentError::NoMatch("no free partition here meets the requirements".into())
                    })
            }
            _ => Err(AgentError::Invalid(FieldError::new(
                "partition",
                "give exactly one of 'partition' and 'best'",
            ))),
        }
    }

    /// A direct lease as a borrower sees it; the key only while active.
    fn direct_view(
        &self,
        lease_id: u64,
        lease: &DirectLease,
        state: LeaseState,
        with_key: bool,
    ) -> LeaseView {
        let terms = self.load(lease.index).map(|row| row.terms).ok();
        let owner = self.owner_key.as_ref();
        let lease_key = owner.filter(|_| with_key).map(|signing| {
            let claims = LeaseKeyClaims {
                lease_id,
                host_id: self.host_id().to_string(),
                partition_index: lease.index,
                epoch: lease.epoch,
                borrower: lease.borrower.clone(),
                issued_at_ms: lease.started_at_ms,
                expires_at_ms: lease.key_expires_at_ms,
                key_id: key::key_id(&signing.verifying_key()),
                terms: terms.clone(),
                not_before_ms: None,
            };
            key::sign(&claims, signing)
        });
        LeaseView {
            lease_id,
            partition: PartitionRef::new(self.host_id(), lease.index),
            borrower: lease.borrower.clone(),
            lender: "owner".into(),
            terms: terms.unwrap_or_else(|| leasehold_core::Terms {
                vcpus: 1,
                cpu_cap_percent: 100,
                memory_mib: 1,
                disk_gib: 1,
                images: Vec::new(),
                price_per_hour_micros: 0,
                isolation: None,
            }),
            epoch: lease.epoch,
            state,
            started_at_ms: lease.started_at_ms,
            key_expires_at_ms: lease.key_expires_at_ms,
            release_requested_at_ms: None,
            charge_micros: None,
            agent_url: Some(self.advertised_url()),
            lease_key,
        }
    }

    /// A granted borrower's own direct lease.
    pub(crate) fn direct_lease_view(
        &self,
        borrower: &str,
        lease_id: u64,
    ) -> Result<LeaseView, AgentError> {
        self.require_direct()?;
        let book = self.direct_book()?;
        match book.leases.get(&lease_id) {
            Some(lease) if lease.borrower == borrower => {
                Ok(self.direct_view(lease_id, lease, LeaseState::Active, true))
            }
            _ => Err(AgentError::NotFound(format!(
                "no lease {lease_id} of yours here"
            ))),
        }
    }

    /// The borrower releases a direct lease: fenced at once, then wiped.
    pub(crate) async fn direct_release(
        self: &Arc<Self>,
        borrower: &str,
        lease_id: u64,
    ) -> Result<LeaseView, AgentError> {
        self.require_direct()?;
        self.end_direct_lease(lease_id, Some(borrower)).await
    }

    async fn end_direct_lease(
        self: &Arc<Self>,
        lease_id: u64,
        borrower: Option<&str>,
    ) -> Result<LeaseView, AgentError> {
        let lease = {
            let _serial = self.direct_lock.lock().await;
            let mut book = self.direct_book()?;
            let owned = book
                .leases
                .get(&lease_id)
                .is_some_and(|lease| borrower.is_none_or(|b| b == lease.borrower));
            if !owned {
                return Err(AgentError::NotFound(format!(
                    "no lease {lease_id} of yours here"
                )));
            }
            let lease = book.leases.remove(&lease_id).expect("checked above");
            self.store_direct_book(&book)?;
            lease
        };
        let view = self.direct_view(lease_id, &lease, LeaseState::Released, false);
        let decided = self.drive_fence(
            lease.index,
            FenceEvent::LeaseReleased {
                lease_id,
                epoch: lease.epoch,
            },
        )?;
        self.cancel_jobs_of_lease(lease_id);
        if decided.must(FenceAction::WipeWhenStopped) {
            self.wipe_when_stopped(lease.index, Some(lease_id)).await;
        }
        Ok(view)
    }
}
