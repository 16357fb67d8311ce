//! What managers and admins order on a group's table beyond one transfer:
//! partitions joining and leaving a host's rows, rights released back to
//! the owner share or revoked, a request begun on every donor at once (the
//! coordinator's first half, S550-S560), the clean-up of transfers a dead
//! coordinator left pending, and the rule a shared store's gatekeeper
//! applies to a member's write.

use super::transfer::{plan_request, TransferPhase};
use super::{PartitionRights, RightsRefusal, ShareGroup, Slot, OWNER_SHARE_PARTITION};
use crate::error::FieldError;

/// Ended transfers kept in the table, for a repeated commit or abort and
/// for `rights show` (the ledger keeps every movement). Every write of the
/// table carries them, so they are few: with 256 a local loan wrote 48 KB
/// (12 WAL pages) and took about 2.7 ms; with 16, about 0.6-0.9 ms.
pub const MAX_ENDED_TRANSFERS: usize = 16;

fn invalid(field: &str, message: impl Into<String>) -> RightsRefusal {
    RightsRefusal::Invalid(FieldError::new(field, message))
}

impl ShareGroup {
    /// A new partition of a host joins its rows with no rights: its
    /// modules stay inactive until rights are released to it, requested or
    /// granted. It may grow to any core of its host. A repeat changes
    /// nothing.
    pub fn add_partition(&mut self, host_id: &str, index: u32) -> Result<(), RightsRefusal> {
        let host = self
            .hosts
            .get_mut(host_id)
            .ok_or_else(|| RightsRefusal::NoSuchSlot(Slot::new(host_id, index)))?;
        let modules = host.module_count();
        host.partitions
            .entry(index)
            .or_insert_with(|| PartitionRights {
                modules,
                ..PartitionRights::default()
            });
        Ok(())
    }

    /// A withdrawn partition leaves the rows; its pending transfers abort
    /// and its rights go back to the owner share (idle there). Returns the
    /// rights given back.
    pub fn remove_partition(
        &mut self,
        host_id: &str,
        index: u32,
        now_ms: u64,
    ) -> Result<u32, RightsRefusal> {
        let slot = Slot::new(host_id, index);
        if index == OWNER_SHARE_PARTITION {
            return Err(invalid(
                "partition",
                "the owner share stays while the host is in the group",
            ));
        }
        if self.partition(&slot).is_err() {
            return Ok(0);
        }
        let mut next = self.clone();
        let pending: Vec<u64> = next
            .transfers
            .values()
            .filter(|t| t.phase == TransferPhase::Pending && (t.from == slot || t.to == slot))
            .map(|t| t.transfer_id)
            .collect();
        for transfer_id in pending {
            next.abort_transfer(transfer_id, now_ms)?;
        }
        let removed = next
            .hosts
            .get_mut(host_id)
            .and_then(|h| h.partitions.remove(&index))
            .unwrap_or_default();
        let owner_share = next.partition_mut(&Slot::new(host_id, OWNER_SHARE_PARTITION))?;
        owner_share.permanent += removed.permanent;
        let given_back = removed.rights(now_ms);
        owner_share.temporary.extend(removed.temporary);
        *self = next;
        Ok(given_back)
    }

    /// Takes `count` permanent rights away from a partition (an admin's
    /// order: licences returned): idle rights first, then modules
    /// deactivate. Returns the modules deactivated.
    pub fn revoke(&mut self, slot: &Slot, count: u32, now_ms: u64) -> Result<u32, RightsRefusal> {
        let partition = self.partition_mut(slot)?;
        if count == 0 || count > partition.permanent {
            return Err(invalid(
                "modules",
                format!(
                    "{slot} holds {} permanent rights; revoke 1 to that many",
                    partition.permanent
                ),
            ));
        }
        partition.permanent -= count;
        let rights = partition.rights(now_ms);
        let deactivated = partition.active.saturating_sub(rights);
        partition.active -= deactivated;
        Ok(deactivated)
    }

    /// A partition gives `count` of its rights back to its host's owner
    /// share (a loan inside the host, both phases at once).
    pub fn release_to_owner_share(
        &mut self,
        slot: &Slot,
        count: u32,
        now_ms: u64,
    ) -> Result<u64, RightsRefusal> {
        if slot.partition == OWNER_SHARE_PARTITION {
            return Err(invalid(
                "partition",
                "the owner share releases rights by a transfer",
            ));
        }
        let owner_share = Slot::new(slot.host_id.clone(), OWNER_SHARE_PARTITION);
        let mut next = self.clone();
        let transfer_id = next.begin_transfer(slot, &owner_share, count, now_ms)?;
        next.commit_transfer(transfer_id, now_ms)?;
        *self = next;
        Ok(transfer_id)
    }

    /// The coordinator's first half of a request (S550-S560): the plan's
    /// donors, local first, each give their rights into a pending
    /// transfer. All or nothing. Returns the transfers begun.
    pub fn begin_request(
        &mut self,
        to: &Slot,
        modules: u32,
        now_ms: u64,
    ) -> Result<Vec<u64>, RightsRefusal> {
        let plan = plan_request(self, to, modules, now_ms)?;
        let mut next = self.clone();
        let mut begun = Vec::new();
        for (from, count) in plan {
            begun.push(next.begin_transfer(&from, to, count, now_ms)?);
        }
        *self = next;
        Ok(begun)
    }

    /// Transfers pending since before `before_ms`: their coordinator died
    /// or lost its way, and any manager may abort them (the requester never
    /// activated what a pending transfer carries, so an abort is safe).
    pub fn stale_pending(&self, before_ms: u64) -> Vec<u64> {
        self.transfers
            .values()
            .filter(|t| t.phase == TransferPhase::Pending && t.created_at_ms < before_ms)
            .map(|t| t.transfer_id)
            .collect()
    }

    /// Forgets the oldest ended transfers beyond [`MAX_ENDED_TRANSFERS`],
    /// so the table stays bounded (pending ones are always kept).
    pub fn prune_ended_transfers(&mut self) {
        let ended: Vec<u64> = self
            .transfers
            .values()
            .filter(|t| t.phase != TransferPhase::Pending)
            .map(|t| t.transfer_id)
            .collect();
        let excess = ended.len().saturating_sub(MAX_ENDED_TRANSFERS);
        for transfer_id in ended.into_iter().take(excess) {
            self.transfers.remove(&transfer_id);
        }
    }
}

/// Who writes a group's table through a gatekeeper (the broker, when the
/// managers do not share a store directly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupWriter {
    /// The lender (a host credential writes as its lender).
    pub name: String,
    pub is_admin: bool,
}

/// The gatekeeper's rule for a write of a group's table: the group belongs
/// to the lender who first wrote it (only they, their hosts' managers and
/// admins write it after), its name does not change, and only an admin's
/// write may add rights (grants); managers only move, expire, seize or
/// remove them. Returns the table to store (with its owner set).
pub fn check_group_write(
    stored: Option<&ShareGroup>,
    mut next: ShareGroup,
    name: &str,
    writer: &GroupWriter,
    now_ms: u64,
) -> Result<ShareGroup, RightsRefusal> {
    if next.name != name {
        return Err(invalid(
            "group.name",
            format!("must be '{name}', the group written"),
        ));
    }
    let owner = stored.and_then(|g| g.owner.clone());
    match &owner {
        Some(owner) if owner != &writer.name && !writer.is_admin => {
            return Err(RightsRefusal::Forbidden(format!(
                "the share group '{name}' belongs to '{owner}'"
            )))
        }
        _ => {}
    }
    next.owner = owner.or_else(|| (!writer.is_admin).then(|| writer.name.clone()));
    let before = stored.map_or(0, |g| g.total_rights(now_ms));
    let after = next.total_rights(now_ms);
    if after > before && !writer.is_admin {
        return Err(RightsRefusal::Forbidden(format!(
            "only an admin may add rights to the group ({before} held, {after} written)"
        )));
    }
    Ok(next)
}
