//! Usage rights (seed 004): a host's modules (CPU cores) are active only
//! under a usage right, and rights move between the partitions of a host
//! and between the hosts of a share group. This module is the pure model:
//! the rights table of FIG. 4A, the plan of a request (local first, S530 and
//! S580; else donors with the lowest workload, S550) and the two-phase
//! transfer (S560-S590), decided against a given time so temporary rights
//! expire on a simulated clock.
//!
//! Two rules hold at every instant, whatever order the phases arrive in:
//! - conservation: the rights of the group (in every partition, plus those
//!   in flight in pending transfers) change only by a grant, a revocation or
//!   an expiry;
//! - a partition's active modules never exceed its rights, so a right in
//!   flight activates a module nowhere and no core is active on two hosts.

pub mod ledger;
pub mod local;
pub mod membership;
pub mod orders;
pub mod transfer;

use crate::error::FieldError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The owner share counts as a partition: index 0.
pub const OWNER_SHARE_PARTITION: u32 = 0;

/// A partition of a host in a share group.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Slot {
    pub host_id: String,
    pub partition: u32,
}

impl Slot {
    pub fn new(host_id: impl Into<String>, partition: u32) -> Self {
        Slot {
            host_id: host_id.into(),
            partition,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host_id, self.partition)
    }
}

/// Rights bought for a while (seed 004's temporary capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemporaryRights {
    pub count: u32,
    pub expires_at_ms: u64,
}

/// A partition's row of FIG. 4A.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartitionRights {
    /// Its hardware modules (cores), active or not.
    pub modules: u32,
    pub permanent: u32,
    #[serde(default)]
    pub temporary: Vec<TemporaryRights>,
    /// Modules active now: never more than its rights.
    pub active: u32,
    /// Load of its active modules, in percent (FIG. 4A's 440).
    pub workload_percent: u32,
}

impl PartitionRights {
    /// Rights it holds at `now_ms`: permanent ones and unexpired temporary ones.
    pub fn rights(&self, now_ms: u64) -> u32 {
        self.permanent
            + self
                .temporary
                .iter()
                .filter(|t| t.expires_at_ms > now_ms)
                .map(|t| t.count)
                .sum::<u32>()
    }

    pub fn inactive(&self) -> u32 {
        self.modules - self.active
    }

    /// What it can give without starving its load: rights activating no
    /// module, plus active modules its workload does not need (it keeps at
    /// least one active module while it has load).
    pub fn spare(&self, now_ms: u64) -> u32 {
        let idle_rights = self.rights(now_ms).saturating_sub(self.active);
        let busy = (u64::from(self.active) * u64::from(self.workload_percent)).div_ceil(100) as u32;
        let needed = if self.workload_percent > 0 {
            busy.max(1)
        } else {
            0
        };
        // Only permanent rights move between partitions; temporary ones
        // stay where they were bought.
        (idle_rights + self.active.saturating_sub(needed)).min(self.permanent)
    }

    /// How many more rights it could hold (one per module).
    pub fn room(&self, now_ms: u64) -> u32 {
        self.modules.saturating_sub(self.rights(now_ms))
    }
}

/// A host of the group: its partitions and where its rights manager listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostRights {
    pub manager_url: String,
    pub partitions: BTreeMap<u32, PartitionRights>,
    /// The host's modules (whole cores). A right activates one of them, so
    /// the host never holds more rights than this, whichever partitions
    /// hold them; 0 (older tables): the sum of its partitions' modules.
    #[serde(default)]
    pub modules: u32,
    /// The last of the host's loans inside the host (FIG. 4B) this table
    /// holds: its manager commits them in its own database first and
    /// publishes them here after, each once.
    #[serde(default)]
    pub local_loans_through: u64,
}

impl HostRights {
    /// Modules of the host: its own count, else its partitions' sum.
    pub fn module_count(&self) -> u32 {
        if self.modules > 0 {
            self.modules
        } else {
            self.partitions.values().map(|p| p.modules).sum()
        }
    }

    /// Rights its partitions hold at `now_ms`.
    pub fn rights(&self, now_ms: u64) -> u32 {
        self.partitions.values().map(|p| p.rights(now_ms)).sum()
    }
}

/// How transfers between hosts are coordinated (claims 3 and 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// One primary manager coordinates; the others are secondaries.
    Centralized,
    /// The requesting host's manager acts as primary for its transfer.
    Federated,
}

/// Why a rights decision changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RightsRefusal {
    Invalid(FieldError),
    NoSuchSlot(Slot),
    /// Not enough spare rights in the group for the request.
    NotEnough {
        wanted: u32,
        available: u32,
    },
    NoSuchTransfer(u64),
    /// The writer may not make this change (not the group's lender, or
    /// adding rights without being an admin).
    Forbidden(String),
    /// An order or a leadership claim from an epoch that is not current.
    StaleEpoch {
        epoch: u64,
        current: u64,
    },
    /// The transfer already ended the other way (committed vs aborted).
    TransferEnded {
        transfer_id: u64,
        phase: transfer::TransferPhase,
    },
}

/// The share group's table (FIG. 4A) and its transfers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShareGroup {
    pub name: String,
    pub mode: GroupMode,
    /// The primary manager's host (centralized), with the epoch of its
    /// leadership (from the shared store's fenced lease).
    pub primary_host: Option<String>,
    pub primary_epoch: u64,
    pub hosts: BTreeMap<String, HostRights>,
    pub transfers: BTreeMap<u64, transfer::Transfer>,
    pub last_transfer_id: u64,
    /// Rights the group owns that no partition holds: seized from a dead
    /// host when the others had no module free for them.
    #[serde(default)]
    pub unassigned: u32,
    /// The lender whose hosts form the group (set by the store's gatekeeper
    /// on the first write); `None` in a store the managers share directly.
    #[serde(default)]
    pub owner: Option<String>,
}

impl ShareGroup {
    pub fn new(name: impl Into<String>, mode: GroupMode) -> Self {
        ShareGroup {
            name: name.into(),
            mode,
            primary_host: None,
            primary_epoch: 0,
            hosts: BTreeMap::new(),
            transfers: BTreeMap::new(),
            last_transfer_id: 0,
            unassigned: 0,
            owner: None,
        }
    }

    pub fn partition(&self, slot: &Slot) -> Result<&PartitionRights, RightsRefusal> {
        self.hosts
            .get(&slot.host_id)
            .and_then(|h| h.partitions.get(&slot.partition))
            .ok_or_else(|| RightsRefusal::NoSuchSlot(slot.clone()))
    }

    pub(crate) fn partition_mut(
        &mut self,
        slot: &Slot,
    ) -> Result<&mut PartitionRights, RightsRefusal> {
        self.hosts
            .get_mut(&slot.host_id)
            .and_then(|h| h.partitions.get_mut(&slot.partition))
            .ok_or_else(|| RightsRefusal::NoSuchSlot(slot.clone()))
    }

    /// Every right of the group at `now_ms`: held by partitions, or in
    /// flight in a pending transfer.
    pub fn total_rights(&self, now_ms: u64) -> u64 {
        let held: u64 = self
            .hosts
            .values()
            .flat_map(|h| h.partitions.values())
            .map(|p| u64::from(p.rights(now_ms)))
            .sum();
        let in_flight: u64 = self
            .transfers
            .values()
            .map(|t| u64::from(t.in_flight()))
            .sum();
        held + in_flight + u64::from(self.unassigned)
    }

    /// Temporary rights past their expiry go, and the modules they
    /// activated deactivate (a partition never has more active modules
    /// than rights). Returns the slots whose active count fell.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(Slot, u32)> {
        let mut deactivated = Vec::new();
        for (host_id, host) in &mut self.hosts {
            for (index, partition) in &mut host.partitions {
                partition.temporary.retain(|t| t.expires_at_ms > now_ms);
                let rights = partition.rights(now_ms);
                if partition.active > rights {
                    deactivated.push((
                        Slot::new(host_id.clone(), *index),
                        partition.active - rights,
                    ));
                    partition.active = rights;
                }
            }
        }
        deactivated
    }

    /// Adds rights to a partition (bought: permanent, or temporary until
    /// `expires_at_ms`), never more than it has modules.
    pub fn grant(
        &mut self,
        slot: &Slot,
        count: u32,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), RightsRefusal> {
        let room = self.room(slot, now_ms)?;
        let partition = self.partition_mut(slot)?;
        if count == 0 || count > room {
            return Err(RightsRefusal::Invalid(FieldError::new(
                "modules",
                format!(
                    "must be 1 to {} (the partition's modules without a right)",
                    room
                ),
            )));
        }
        match expires_at_ms {
            Some(at) if at <= now_ms => {
                return Err(RightsRefusal::Invalid(FieldError::new(
                    "expires",
                    "is in the past",
                )))
            }
            Some(expires_at_ms) => partition.temporary.push(TemporaryRights {
                count,
                expires_at_ms,
            }),
            None => partition.permanent += count,
        }
        Ok(())
    }

    /// Activates up to `count` modules the partition has rights for.
    pub fn activate(&mut self, slot: &Slot, count: u32, now_ms: u64) -> Result<u32, RightsRefusal> {
        let partition = self.partition_mut(slot)?;
        let can = partition
            .rights(now_ms)
            .saturating_sub(partition.active)
            .min(partition.inactive());
        let activated = count.min(can);
        partition.active += activated;
        Ok(activated)
    }
}

#[cfg(test)]
mod tests;
