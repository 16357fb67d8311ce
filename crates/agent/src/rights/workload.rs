//! The workload of this host's partitions (FIG. 4A's 440) and automatic
//! requests (FIG. 5, 510: "made by the partition management module ... in
//! response to high workload"): each tick the agent measures how busy each
//! partition's active modules are; a change of 10 points or more is written
//! to the table (donors are chosen by lowest workload), and a partition
//! that stays at or above `--rights-auto-above` percent for
//! `--rights-auto-after-secs` gets one more module.

use super::RightsManager;
use crate::error::AgentError;
use leasehold_core::rights::Slot;
use std::collections::BTreeMap;

/// Smallest change of a partition's workload written to the table.
pub const WORKLOAD_STEP_PERCENT: u32 = 10;

/// When automatic requests are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoRequest {
    pub above_percent: u32,
    pub after_ms: u64,
}

/// Workload in percent of `active` modules: `used_centicores` of them busy.
pub fn workload_percent(used_centicores: u64, active: u32) -> Option<u32> {
    if active == 0 {
        return None;
    }
    let percent = used_centicores.saturating_mul(100) / (u64::from(active) * 100);
    Some(percent.min(100) as u32)
}

impl RightsManager {
    /// Takes this tick's workloads (partition -> percent): writes those
    /// that moved by a step, and requests a module for a partition busy
    /// beyond the threshold for long enough.
    pub(crate) async fn observe_workloads(
        &self,
        workloads: &BTreeMap<u32, u32>,
        own_token: &str,
    ) -> Result<Vec<u32>, AgentError> {
        let now_ms = self.clock.now_ms();
        let due = self.busy_partitions_due(workloads, now_ms);
        let stored: BTreeMap<u32, u32> = self
            .copy()
            .and_then(|(g, _)| g.hosts.get(&self.host_id).cloned())
            .map(|h| {
                h.partitions
                    .iter()
                    .map(|(i, p)| (*i, p.workload_percent))
                    .collect()
            })
            .unwrap_or_default();
        let moved = workloads.iter().any(|(index, percent)| {
            stored
                .get(index)
                .is_some_and(|old| old.abs_diff(*percent) >= WORKLOAD_STEP_PERCENT)
        });
        if moved {
            let host_id = self.host_id.clone();
            self.update(None, |g, _| {
                if let Some(host) = g.hosts.get_mut(&host_id) {
                    for (index, percent) in workloads {
                        if let Some(partition) = host.partitions.get_mut(index) {
                            partition.workload_percent = *percent;
                        }
                    }
                }
                Ok(())
            })
            .await?;
        }
        for index in &due {
            let slot = Slot::new(self.host_id.clone(), *index);
            if let Err(error) = self.request(slot, 1, own_token).await {
                tracing::info!(%error, index, "an automatic request for a busy partition was refused");
            }
        }
        Ok(due)
    }

    /// Partitions busy at or above the threshold since long enough (their
    /// clocks restart once due); the others' clocks stop.
    fn busy_partitions_due(&self, workloads: &BTreeMap<u32, u32>, now_ms: u64) -> Vec<u32> {
        let Some(auto) = self.config.auto_request else {
            return Vec::new();
        };
        let mut busy_since = self.busy_since.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        for (index, percent) in workloads {
            if *percent < auto.above_percent {
                busy_since.remove(index);
                continue;
            }
            let since = *busy_since.entry(*index).or_insert(now_ms);
            if now_ms.saturating_sub(since) >= auto.after_ms {
                due.push(*index);
                busy_since.insert(*index, now_ms);
            }
        }
        due
    }
}
