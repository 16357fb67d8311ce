//! Orders that change one host's rows or the group's members: rights
//! granted (bought) and revoked (an admin's), released back to the owner
//! share, partitions joining and leaving their host's rows as the lender
//! adds and withdraws them, and hosts added to and removed from the group.

use super::RightsManager;
use crate::error::AgentError;
use leasehold_api::rights::RightsOrderAnswer;
use leasehold_core::rights::{HostRights, Slot};

fn answer(version: u64) -> RightsOrderAnswer {
    RightsOrderAnswer {
        committed: vec![],
        aborted: vec![],
        version,
        lent_inside_host: vec![],
    }
}

impl RightsManager {
    /// Rights bought for a partition. Written as the admin who ordered it:
    /// a store's gatekeeper lets only an admin add rights to a group.
    pub(crate) async fn grant(
        &self,
        slot: Slot,
        modules: u32,
        expires_at_ms: Option<u64>,
        admin_token: &str,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let (_, group, version) = self
            .update(Some(admin_token), |g, now| {
                // Rights are bought to be used: their modules go on.
                g.grant(&slot, modules, expires_at_ms, now)?;
                g.activate(&slot, modules, now)
            })
            .await?;
        self.poke(&group, &slot.host_id, version).await;
        Ok(answer(version))
    }

    pub(crate) async fn revoke(
        &self,
        slot: Slot,
        modules: u32,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let (_, group, version) = self
            .update(None, |g, now| g.revoke(&slot, modules, now))
            .await?;
        self.poke(&group, &slot.host_id, version).await;
        Ok(answer(version))
    }

    /// A partition gives rights back to its host's owner share.
    pub(crate) async fn release(
        &self,
        slot: Slot,
        modules: u32,
    ) -> Result<RightsOrderAnswer, AgentError> {
        // FIG. 4B: inside the host, committed in its own database.
        if slot.host_id == self.host_id {
            if let Some(answer) = self.give_back_inside_host(slot.partition, modules) {
                return answer;
            }
        }
        let (id, group, version) = self
            .update(None, |g, now| g.release_to_owner_share(&slot, modules, now))
            .await?;
        self.poke(&group, &slot.host_id, version).await;
        Ok(RightsOrderAnswer {
            committed: vec![id],
            aborted: vec![],
            version,
            lent_inside_host: vec![],
        })
    }

    /// Rights this host holds now, in all its partitions (from the copy).
    pub(crate) fn host_rights_now(&self) -> u32 {
        let now_ms = self.clock.now_ms();
        self.copy()
            .and_then(|(group, _)| group.hosts.get(&self.host_id).map(|h| h.rights(now_ms)))
            .unwrap_or(0)
    }

    /// Makes sure `index` has `vcpus` modules active before a job runs
    /// there, requesting the missing rights (inside the host first).
    pub(crate) async fn ensure_active(
        &self,
        index: u32,
        vcpus: u32,
        own_token: &str,
    ) -> Result<(), AgentError> {
        // What is switched on now, this host's loans included.
        let active = self.applied().active.get(&index).copied().unwrap_or(0);
        if active >= vcpus {
            return Ok(());
        }
        let slot = Slot::new(self.host_id.clone(), index);
        self.request(slot, vcpus - active, own_token)
            .await
            .map(|_| ())
    }

    /// A partition the lender added joins this host's rows, with no rights.
    pub(crate) async fn partition_added(&self, index: u32) -> Result<(), AgentError> {
        let host_id = self.host_id.clone();
        self.update(None, |g, _| g.add_partition(&host_id, index))
            .await
            .map(|_| ())
    }

    /// A withdrawn partition leaves the rows; its rights go to the owner share.
    pub(crate) async fn partition_withdrawn(&self, index: u32) -> Result<(), AgentError> {
        let host_id = self.host_id.clone();
        self.update(None, |g, now| g.remove_partition(&host_id, index, now))
            .await
            .map(|_| ())
    }

    /// A host joins the group's table before its manager starts (its
    /// manager fills in its owner share and address when it joins).
    pub(crate) async fn add_host(
        &self,
        host_id: &str,
        modules: u32,
    ) -> Result<RightsOrderAnswer, AgentError> {
        leasehold_core::ids::validate_host_id("host_id", host_id)?;
        let host = HostRights {
            modules,
            ..HostRights::default()
        };
        let (_, _, version) = self
            .update(None, |g, _| g.add_host(host_id, host.clone()))
            .await?;
        Ok(answer(version))
    }

    /// A host leaves; with `hand_over` its rights go to the others first,
    /// else they leave with it.
    pub(crate) async fn remove_host(
        &self,
        host_id: &str,
        hand_over: bool,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let (_, group, version) = self
            .update(None, |g, now| g.remove_host(host_id, hand_over, now))
            .await?;
        for other in group.hosts.keys() {
            self.poke(&group, other, version).await;
        }
        Ok(answer(version))
    }
}
