//! The agent's side of the partition fence: every flow (reconcile at start,
//! job submission, notices, the key-expiry sweep, the lender's alter and
//! withdraw) turns what it learned into a [`FenceEvent`]; this module
//! decides it with the one pure state machine (`leasehold_core::fence`)
//! and carries out the actions that belong to the fence itself.

use crate::{Agent, AgentError};
use leasehold_core::fence::{self, FenceAction, FenceEvent, FenceRefusal, PartitionFence};
use std::sync::Arc;

/// How often an event is decided again when the fence moved between the
/// read and the write (a notice landing while a job adopts a lease).
const MAX_FENCE_RACES: u32 = 16;

/// A decided event: the fence it left, and the actions left to the caller
/// (build, wipe once the jobs stopped, remove).
pub(crate) struct Decided {
    pub fence: PartitionFence,
    pub left: Vec<FenceAction>,
}

impl Decided {
    pub fn must(&self, action: FenceAction) -> bool {
        self.left.contains(&action)
    }
}

impl Agent {
    /// Decides `event` against the partition's fence and carries out, in
    /// order, what the fence does itself: stop jobs, wipe now, persist.
    /// Persisting swaps the fence only if it is still the one decided on;
    /// if another flow moved it meanwhile the event is decided again, so a
    /// stale copy never overwrites a newer fence.
    pub(crate) fn drive_fence(&self, index: u32, event: FenceEvent) -> Result<Decided, AgentError> {
        for _ in 0..MAX_FENCE_RACES {
            let before = self.load(index)?.fence;
            let now_ms = self.config.clock.now_ms();
            let (after, actions) = fence::on_event(before, event, now_ms)
                .map_err(|refusal| self.fence_refusal(index, refusal))?;
            if let Some(left) = self.carry_out(index, &before, &after, actions)? {
                return Ok(Decided { fence: after, left });
            }
        }
        Err(AgentError::Internal(format!(
            "partition {index}: its fence kept moving while an event was applied"
        )))
    }

    /// `None` when the fence moved before it could be persisted.
    fn carry_out(
        &self,
        index: u32,
        before: &PartitionFence,
        after: &PartitionFence,
        actions: Vec<FenceAction>,
    ) -> Result<Option<Vec<FenceAction>>, AgentError> {
        let mut left = Vec::new();
        for action in actions {
            match action {
                FenceAction::CancelJobsOfPartition => self.cancel_jobs_of_partition(index),
                FenceAction::CancelJobsOfLease(lease_id) => self.cancel_jobs_of_lease(lease_id),
                FenceAction::Wipe => self.driver.wipe(index)?,
                FenceAction::Persist => {
                    if !self.swap_fence(index, before, after)? {
                        return Ok(None);
                    }
                }
                FenceAction::Build | FenceAction::WipeWhenStopped | FenceAction::Remove => {
                    left.push(action)
                }
            }
        }
        Ok(Some(left))
    }

    /// Writes `new` if the stored fence is still `expected`; both under the
    /// table's lock, so nothing lands in between.
    fn swap_fence(
        &self,
        index: u32,
        expected: &PartitionFence,
        new: &PartitionFence,
    ) -> Result<bool, AgentError> {
        let db = self.db();
        match db.partition(index)? {
            Some(row) if row.fence == *expected => {
                db.update_fence(index, new)?;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(self.no_partition(index)),
        }
    }

    pub(crate) fn fence_refusal(&self, index: u32, refusal: FenceRefusal) -> AgentError {
        match refusal {
            FenceRefusal::Key(rejection) => AgentError::KeyRejected(rejection),
            FenceRefusal::Locked { lease_id } => AgentError::Locked { index, lease_id },
            FenceRefusal::Gone => self.no_partition(index),
        }
    }

    pub(crate) fn no_partition(&self, index: u32) -> AgentError {
        AgentError::NotFound(format!("no partition {index} on host {}", self.host_id()))
    }

    /// Wipes a fenced partition once its stopped jobs let go of its lock.
    /// In a task of its own, so that the wipe completes even if whoever
    /// asked (the broker waiting for a notice's answer) stops waiting.
    /// `lease_id` is the lease that ended, for the log.
    pub(crate) async fn wipe_when_stopped(self: &Arc<Self>, index: u32, lease_id: Option<u64>) {
        let agent = self.clone();
        let wipe = tokio::spawn(async move {
            let lock = agent.partition_lock(index);
            let _guard = lock.lock().await;
            agent.drive_fence(index, FenceEvent::WipeStarted)?;
            agent.drive_fence(index, FenceEvent::WipeDone).map(|_| ())
        });
        if let Ok(Err(error)) = wipe.await {
            // The fence stays wiping; the next lease's first job (or the
            // next start) wipes it before anything runs.
            tracing::warn!(partition = index, ?lease_id, %error, "cannot wipe a released partition yet");
        }
    }

    /// Fences the leases whose keys expired: no key of theirs can run a job
    /// again, and a release notice for them may never come (the broker
    /// stops delivering at the key's expiry). Answers the wipes under way.
    pub(crate) fn fence_expired_keys(
        self: &Arc<Self>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, AgentError> {
        let now_ms = self.config.clock.now_ms();
        let expired: Vec<(u32, Option<u64>)> = self
            .db()
            .partitions()?
            .iter()
            .filter(|row| row.fence.key_expires_at_ms().is_some_and(|at| now_ms >= at))
            .map(|row| (row.index, row.fence.lease_id()))
            .collect();
        let mut wipes = Vec::new();
        for (index, lease_id) in expired {
            let decided = self.drive_fence(index, FenceEvent::KeyExpiryCheck)?;
            if decided.must(FenceAction::WipeWhenStopped) {
                tracing::info!(
                    partition = index,
                    ?lease_id,
                    "the lease's key expired; fenced"
                );
                // Not awaited: a job slow to stop must not hold up the
                // sweep of the other partitions, nor the next poll.
                let agent = self.clone();
                wipes.push(tokio::spawn(async move {
                    agent.wipe_when_stopped(index, lease_id).await
                }));
            }
        }
        Ok(wipes)
    }
}
