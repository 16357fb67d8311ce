//! Signed notices from the broker: a lease started (adopt it, best-effort)
//! or was released (fence it, stop its jobs, wipe the partition).

use crate::{Agent, AgentError};
use leasehold_core::fence::{FenceAction, FenceEvent};
use leasehold_core::key::{KeyRejection, NoticeClaims, NoticeKind};
use std::sync::Arc;

impl Agent {
    /// A signed notice from the broker, pushed or pulled.
    pub(crate) async fn apply_notice(self: &Arc<Self>, notice: &str) -> Result<(), AgentError> {
        let claims = self
            .verify_notice(notice)
            .map_err(AgentError::KeyRejected)?;
        if claims.host_id != self.host_id() {
            return Err(AgentError::KeyRejected(KeyRejection::WrongHost));
        }
        match claims.kind {
            NoticeKind::LeaseReleased => self.apply_release(&claims).await,
            NoticeKind::LeaseStarted => self.apply_lease_started(&claims).await,
        }
    }

    /// The fence goes first, durably, without waiting for the partition's
    /// lock: from here on no job of this lease (or an older one) passes the
    /// key check, even one already queued. Then its jobs stop, now rather
    /// than when they finish; then the wipe, once they let go.
    async fn apply_release(self: &Arc<Self>, claims: &NoticeClaims) -> Result<(), AgentError> {
        let index = claims.partition_index;
        let decided = self.drive_fence(
            index,
            FenceEvent::LeaseReleased {
                lease_id: claims.lease_id,
                epoch: claims.epoch,
            },
        )?;
        if decided.must(FenceAction::WipeWhenStopped) {
            self.wipe_when_stopped(index, Some(claims.lease_id)).await;
        }
        Ok(())
    }

    /// A newer lease: whatever still runs there belongs to an older one and
    /// stops before the lock is taken; the adoption (and the wipe of what
    /// older leases left) happens under the lock.
    async fn apply_lease_started(&self, claims: &NoticeClaims) -> Result<(), AgentError> {
        let index = claims.partition_index;
        if !self.load(index)?.fence.is_newer(claims.epoch) {
            return Ok(());
        }
        self.cancel_jobs_of_partition(index);
        let lock = self.partition_lock(index);
        let _guard = lock.lock().await;
        self.drive_fence(
            index,
            FenceEvent::LeaseStarted {
                lease_id: claims.lease_id,
                epoch: claims.epoch,
                key_expires_at_ms: claims.key_expires_at_ms,
            },
        )?;
        Ok(())
    }
}
