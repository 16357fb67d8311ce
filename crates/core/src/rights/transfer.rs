//! A request for rights (FIG. 5) and the two-phase transfer that carries it
//! out. `plan_request` picks donors: spare rights inside the requesting
//! host first (S530, S580), else other hosts' partitions by lowest workload
//! (S550). `begin` is the donor's half (S560): it deactivates the modules
//! and the rights leave it, in flight in the pending transfer; `commit` is
//! the requester's half (S570-S590): the rights arrive and their modules
//! activate; `abort` gives them back to the donor. Each is idempotent: a
//! repeated phase answers as the first did and changes nothing.

use super::{RightsRefusal, ShareGroup, Slot};
use crate::error::FieldError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferPhase {
    Pending,
    Committed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transfer {
    pub transfer_id: u64,
    pub from: Slot,
    pub to: Slot,
    pub modules: u32,
    /// Modules the donor had active for these rights (re-activated on abort).
    pub deactivated: u32,
    pub phase: TransferPhase,
    pub created_at_ms: u64,
}

impl Transfer {
    /// Rights that are in neither partition while it is pending.
    pub fn in_flight(&self) -> u32 {
        if self.phase == TransferPhase::Pending {
            self.modules
        } else {
            0
        }
    }
}

/// Donors for `modules` more rights for `to`: (donor, count) pairs, local
/// first, then by lowest workload, then by slot.
pub fn plan_request(
    group: &ShareGroup,
    to: &Slot,
    modules: u32,
    now_ms: u64,
) -> Result<Vec<(Slot, u32)>, RightsRefusal> {
    // Rights from inside the host leave the host's total as it is: only
    // those from other hosts need room in the host.
    let room = group.partition_room(to, now_ms)?;
    if modules == 0 || modules > room {
        return Err(RightsRefusal::Invalid(FieldError::new(
            "modules",
            format!("must be 1 to {room} (the partition's modules without a right, counting rights on their way)"),
        )));
    }
    let host_room = group.host_room(&to.host_id, now_ms);
    let mut donors: Vec<(bool, u32, Slot, u32)> = group
        .hosts
        .iter()
        .flat_map(|(host_id, host)| {
            host.partitions
                .iter()
                .map(move |(index, p)| (Slot::new(host_id.clone(), *index), p))
        })
        .filter(|(slot, _)| slot != to)
        .map(|(slot, p)| {
            (
                slot.host_id != to.host_id,
                p.workload_percent,
                slot,
                p.spare(now_ms),
            )
        })
        .filter(|(_, _, _, spare)| *spare > 0)
        .collect();
    // Local donors first (S530): the request never leaves the host when
    // the host can meet it.
    let local: u32 = donors.iter().filter(|d| !d.0).map(|d| d.3).sum();
    if local >= modules {
        donors.retain(|d| !d.0);
    }
    donors.sort();
    let available: u32 = donors.iter().map(|d| d.3).sum();
    if available < modules {
        return Err(RightsRefusal::NotEnough {
            wanted: modules,
            available,
        });
    }
    let mut left = modules;
    let mut from_other_hosts = 0;
    let mut plan = Vec::new();
    for (other_host, _, slot, spare) in donors {
        if left == 0 {
            break;
        }
        let mut take = spare.min(left);
        if other_host {
            take = take.min(host_room - from_other_hosts);
            from_other_hosts += take;
        }
        if take > 0 {
            plan.push((slot, take));
            left -= take;
        }
    }
    if left > 0 {
        return Err(RightsRefusal::NotEnough {
            wanted: modules,
            available: modules - left,
        });
    }
    Ok(plan)
}

impl ShareGroup {
    /// The donor's half: its rights leave it (deactivating what they
    /// activated) and wait in a pending transfer.
    pub fn begin_transfer(
        &mut self,
        from: &Slot,
        to: &Slot,
        modules: u32,
        now_ms: u64,
    ) -> Result<u64, RightsRefusal> {
        let room = if from.host_id == to.host_id {
            self.partition_room(to, now_ms)?
        } else {
            self.room(to, now_ms)?
        };
        if modules > room {
            return Err(RightsRefusal::Invalid(FieldError::new(
                "modules",
                format!("{to} has room for {room} more rights (one per module, counting those on their way)"),
            )));
        }
        let donor = self.partition_mut(from)?;
        let permanent = donor.permanent;
        if modules == 0 || modules > permanent {
            return Err(RightsRefusal::Invalid(FieldError::new(
                "modules",
                format!(
                    "{from} holds {permanent} permanent rights; a transfer moves 1 to that many"
                ),
            )));
        }
        donor.permanent -= modules;
        // Rights idle first; then modules are deactivated.
        let rights_left = donor.rights(now_ms);
        let deactivated = donor.active.saturating_sub(rights_left);
        donor.active -= deactivated;
        self.last_transfer_id += 1;
        let transfer = Transfer {
            transfer_id: self.last_transfer_id,
            from: from.clone(),
            to: to.clone(),
            modules,
            deactivated,
            phase: TransferPhase::Pending,
            created_at_ms: now_ms,
        };
        self.transfers.insert(transfer.transfer_id, transfer);
        Ok(self.last_transfer_id)
    }

    /// The requester's half: the rights arrive and activate their modules.
    pub fn commit_transfer(&mut self, transfer_id: u64, now_ms: u64) -> Result<(), RightsRefusal> {
        let transfer = self.pending(transfer_id, TransferPhase::Committed)?;
        let Some(transfer) = transfer else {
            return Ok(());
        };
        let receiver = self.partition_mut(&transfer.to)?;
        receiver.permanent += transfer.modules;
        self.activate(&transfer.to, transfer.modules, now_ms)?;
        self.set_phase(transfer_id, TransferPhase::Committed);
        Ok(())
    }

    /// Gives a pending transfer's rights back to its donor, re-activating
    /// what it deactivated.
    pub fn abort_transfer(&mut self, transfer_id: u64, now_ms: u64) -> Result<(), RightsRefusal> {
        let transfer = self.pending(transfer_id, TransferPhase::Aborted)?;
        let Some(transfer) = transfer else {
            return Ok(());
        };
        let donor = self.partition_mut(&transfer.from)?;
        donor.permanent += transfer.modules;
        self.activate(&transfer.from, transfer.deactivated, now_ms)?;
        self.set_phase(transfer_id, TransferPhase::Aborted);
        Ok(())
    }

    /// The pending transfer to end as `ending`; `None` when it already
    /// ended that way (a repeat), a refusal when it ended the other way.
    fn pending(
        &self,
        transfer_id: u64,
        ending: TransferPhase,
    ) -> Result<Option<Transfer>, RightsRefusal> {
        let transfer = self
            .transfers
            .get(&transfer_id)
            .ok_or(RightsRefusal::NoSuchTransfer(transfer_id))?;
        match transfer.phase {
            TransferPhase::Pending => Ok(Some(transfer.clone())),
            phase if phase == ending => Ok(None),
            phase => Err(RightsRefusal::TransferEnded { transfer_id, phase }),
        }
    }

    fn set_phase(&mut self, transfer_id: u64, phase: TransferPhase) {
        if let Some(transfer) = self.transfers.get_mut(&transfer_id) {
            transfer.phase = phase;
        }
    }

    /// A whole request at once (a local loan, or one manager coordinating
    /// both halves): each planned donor's transfer begun and committed.
    /// All or nothing: a refusal halfway leaves the group as it was.
    pub fn request(
        &mut self,
        to: &Slot,
        modules: u32,
        now_ms: u64,
    ) -> Result<Vec<u64>, RightsRefusal> {
        let mut next = self.clone();
        let ids = next.begin_request(to, modules, now_ms)?;
        for id in &ids {
            next.commit_transfer(*id, now_ms)?;
        }
        *self = next;
        Ok(ids)
    }

    /// How many more rights `slot` may take now: one per module, less
    /// those it holds and those in flight to it or from it (an abort brings
    /// the latter back).
    pub fn room(&self, slot: &Slot, now_ms: u64) -> Result<u32, RightsRefusal> {
        let partition_room = self.partition_room(slot, now_ms)?;
        Ok(partition_room.min(self.host_room(&slot.host_id, now_ms)))
    }

    /// How many more rights `slot` may take from inside its own host: one
    /// per module of the partition, less what it holds and what is in
    /// flight to or from it.
    pub fn partition_room(&self, slot: &Slot, now_ms: u64) -> Result<u32, RightsRefusal> {
        let in_flight: u32 = self
            .transfers
            .values()
            .filter(|t| &t.to == slot || &t.from == slot)
            .map(Transfer::in_flight)
            .sum();
        Ok(self.partition(slot)?.room(now_ms).saturating_sub(in_flight))
    }

    /// How many more rights the host may take: one per module of the
    /// host, less those its partitions hold and those in flight to or from
    /// it (counted once for a transfer inside the host).
    pub fn host_room(&self, host_id: &str, now_ms: u64) -> u32 {
        let Some(host) = self.hosts.get(host_id) else {
            return 0;
        };
        let in_flight: u32 = self
            .transfers
            .values()
            .filter(|t| t.to.host_id == host_id || t.from.host_id == host_id)
            .map(Transfer::in_flight)
            .sum();
        host.module_count()
            .saturating_sub(host.rights(now_ms))
            .saturating_sub(in_flight)
    }
}
