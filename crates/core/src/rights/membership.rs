//! Who is in the share group and who leads it: adding and removing hosts
//! (with their rights leaving, or handed over first), the primary manager
//! and its epoch (FIG. 7: an order carrying an older epoch is refused, so a
//! revived old primary cannot act), and seizure (FIG. 8): the rights of a
//! host unreachable beyond the grace period go to the others, and the host,
//! when it returns, learns it lost them and deactivates before anything
//! else.

use super::transfer::TransferPhase;
use super::{HostRights, RightsRefusal, ShareGroup, Slot};
use crate::error::FieldError;

impl ShareGroup {
    pub fn add_host(&mut self, host_id: &str, host: HostRights) -> Result<(), RightsRefusal> {
        if self.hosts.contains_key(host_id) {
            return Err(RightsRefusal::Invalid(FieldError::new(
                "host",
                format!("'{host_id}' is in the group already"),
            )));
        }
        self.hosts.insert(host_id.to_string(), host);
        Ok(())
    }

    /// Removes a host. Its pending transfers are aborted first; with
    /// `hand_over` its permanent rights go to the other hosts (the lowest
    /// workload first, as a request would place them), else they leave
    /// the group with it. Returns the rights that left.
    pub fn remove_host(
        &mut self,
        host_id: &str,
        hand_over: bool,
        now_ms: u64,
    ) -> Result<u32, RightsRefusal> {
        if !self.hosts.contains_key(host_id) {
            return Err(RightsRefusal::NoSuchSlot(Slot::new(host_id, 0)));
        }
        let mut next = self.clone();
        next.abort_transfers_of(host_id, now_ms)?;
        if hand_over {
            next.give_away(host_id, false, now_ms)?;
        }
        let host = next.hosts.remove(host_id).unwrap_or_default();
        let left = host.partitions.values().map(|p| p.rights(now_ms)).sum();
        *self = next;
        Ok(left)
    }

    /// FIG. 8: the rights of a host unreachable beyond the grace period are
    /// seized: its pending transfers abort, its permanent rights go to the
    /// other hosts, and its partitions keep none (so its modules must
    /// deactivate: see [`ShareGroup::deactivate_beyond_rights`]).
    pub fn seize(&mut self, host_id: &str, now_ms: u64) -> Result<u32, RightsRefusal> {
        if !self.hosts.contains_key(host_id) {
            return Err(RightsRefusal::NoSuchSlot(Slot::new(host_id, 0)));
        }
        let mut next = self.clone();
        next.abort_transfers_of(host_id, now_ms)?;
        let seized = next.give_away(host_id, true, now_ms)?;
        *self = next;
        Ok(seized)
    }

    /// What a returning host does first: it deactivates every module its
    /// rights (as the group now records them) no longer cover. Returns
    /// (partition, modules deactivated).
    pub fn deactivate_beyond_rights(&mut self, host_id: &str, now_ms: u64) -> Vec<(u32, u32)> {
        let Some(host) = self.hosts.get_mut(host_id) else {
            return Vec::new();
        };
        let mut deactivated = Vec::new();
        for (index, partition) in &mut host.partitions {
            let rights = partition.rights(now_ms);
            if partition.active > rights {
                deactivated.push((*index, partition.active - rights));
                partition.active = rights;
            }
        }
        deactivated
    }

    fn abort_transfers_of(&mut self, host_id: &str, now_ms: u64) -> Result<(), RightsRefusal> {
        let pending: Vec<u64> = self
            .transfers
            .values()
            .filter(|t| t.phase == TransferPhase::Pending)
            .filter(|t| t.from.host_id == host_id || t.to.host_id == host_id)
            .map(|t| t.transfer_id)
            .collect();
        for transfer_id in pending {
            self.abort_transfer(transfer_id, now_ms)?;
        }
        Ok(())
    }

    /// Moves every permanent right of `host_id` to partitions of other hosts
    /// with room, the lowest workload first (rights on the way keep their
    /// room). What the others cannot hold is refused, or with `keep_rest`
    /// (a seizure) kept by the group as unassigned.
    fn give_away(
        &mut self,
        host_id: &str,
        keep_rest: bool,
        now_ms: u64,
    ) -> Result<u32, RightsRefusal> {
        let total: u32 = self.hosts[host_id]
            .partitions
            .values()
            .map(|p| p.permanent)
            .sum();
        let mut receivers: Vec<(u32, Slot, u32)> = Vec::new();
        for (other_id, host) in self.hosts.iter().filter(|(id, _)| id.as_str() != host_id) {
            for (index, partition) in &host.partitions {
                let slot = Slot::new(other_id.clone(), *index);
                let room = self.room(&slot, now_ms)?;
                if room > 0 {
                    receivers.push((partition.workload_percent, slot, room));
                }
            }
        }
        receivers.sort();
        let capacity: u32 = receivers.iter().map(|r| r.2).sum();
        if capacity < total && !keep_rest {
            return Err(RightsRefusal::NotEnough {
                wanted: total,
                available: capacity,
            });
        }
        let mut left = total;
        for (_, slot, room) in receivers {
            if left == 0 {
                break;
            }
            let take = room.min(left);
            self.partition_mut(&slot)?.permanent += take;
            left -= take;
        }
        self.unassigned += left;
        if let Some(host) = self.hosts.get_mut(host_id) {
            for partition in host.partitions.values_mut() {
                partition.permanent = 0;
            }
        }
        Ok(total)
    }

    /// A new primary manager (FIG. 7), with the epoch its fenced lease in
    /// the shared store gave it; an epoch not above the current one is
    /// refused, so a revived old primary cannot take over again.
    pub fn set_primary(&mut self, host_id: &str, epoch: u64) -> Result<(), RightsRefusal> {
        if !self.hosts.contains_key(host_id) {
            return Err(RightsRefusal::NoSuchSlot(Slot::new(host_id, 0)));
        }
        if epoch <= self.primary_epoch {
            return Err(RightsRefusal::StaleEpoch {
                epoch,
                current: self.primary_epoch,
            });
        }
        self.primary_host = Some(host_id.to_string());
        self.primary_epoch = epoch;
        Ok(())
    }

    /// An order from a primary: accepted only at the current epoch.
    pub fn check_order_epoch(&self, epoch: u64) -> Result<(), RightsRefusal> {
        if epoch == self.primary_epoch {
            Ok(())
        } else {
            Err(RightsRefusal::StaleEpoch {
                epoch,
                current: self.primary_epoch,
            })
        }
    }
}
