//! A store whose commits go through a hook while every read and every other
//! call goes straight to the store beneath: how the simulation injects
//! faults and tests hold a commit, with the pass-through written once.

use crate::broker::{
    AssetBalance, BrokerSnapshot, BrokerWrite, LeaseFilter, ReleaseNoticeRow, RevocationRow,
};
use crate::{BrokerStore, StoreResult};
use leasehold_core::lease::Lease;
use leasehold_core::ledger::Transfer;

/// Decides one `apply`: given the store beneath and the batch, it may fail
/// before writing, write (all or part), then fail, or pass the batch on.
pub type ApplyHook = Box<dyn FnMut(&mut dyn BrokerStore, &[BrokerWrite]) -> StoreResult<()> + Send>;

/// `inner` with its `apply` routed through `hook`.
pub struct InterceptedStore {
    inner: Box<dyn BrokerStore>,
    hook: ApplyHook,
}

impl InterceptedStore {
    pub fn new(inner: Box<dyn BrokerStore>, hook: ApplyHook) -> Self {
        InterceptedStore { inner, hook }
    }
}

impl BrokerStore for InterceptedStore {
    fn apply(&mut self, writes: &[BrokerWrite]) -> StoreResult<()> {
        (self.hook)(self.inner.as_mut(), writes)
    }

    fn load(&mut self) -> StoreResult<BrokerSnapshot> {
        self.inner.load()
    }

    fn prune_idempotency(&mut self, before_ms: u64) -> StoreResult<usize> {
        self.inner.prune_idempotency(before_ms)
    }

    fn pending_outbox(&mut self) -> StoreResult<Vec<ReleaseNoticeRow>> {
        self.inner.pending_outbox()
    }

    fn revocations_after(
        &mut self,
        host_id: &str,
        after_seq: u64,
        now_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<RevocationRow>> {
        self.inner
            .revocations_after(host_id, after_seq, now_ms, limit)
    }

    fn prune_expired_notices(&mut self, now_ms: u64) -> StoreResult<usize> {
        self.inner.prune_expired_notices(now_ms)
    }

    fn lease(&mut self, lease_id: u64) -> StoreResult<Option<Lease>> {
        self.inner.lease(lease_id)
    }

    fn leases(&mut self, filter: &LeaseFilter, limit: u32) -> StoreResult<Vec<Lease>> {
        self.inner.leases(filter, limit)
    }

    fn transfers(
        &mut self,
        accounts: Option<&[String]>,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Transfer)>> {
        self.inner.transfers(accounts, limit)
    }

    fn lease_transfers(&mut self, lease_id: u64) -> StoreResult<Vec<Transfer>> {
        self.inner.lease_transfers(lease_id)
    }

    fn balances(&mut self) -> StoreResult<Vec<(String, i64)>> {
        self.inner.balances()
    }

    fn balances_by_asset(&mut self) -> StoreResult<Vec<AssetBalance>> {
        self.inner.balances_by_asset()
    }

    fn acquire_lease(
        &mut self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Option<u64>> {
        self.inner.acquire_lease(name, holder, ttl_ms, now_ms)
    }

    fn release_lease(&mut self, name: &str, holder: &str) -> StoreResult<bool> {
        self.inner.release_lease(name, holder)
    }

    fn asset_movements(
        &mut self,
        asset: &str,
        limit: u32,
    ) -> StoreResult<Vec<(u64, leasehold_core::ledger::Transfer)>> {
        self.inner.asset_movements(asset, limit)
    }

    fn share_groups(
        &mut self,
        limit: u32,
    ) -> StoreResult<Vec<(leasehold_core::rights::ShareGroup, u64)>> {
        self.inner.share_groups(limit)
    }

    fn lease_holder(&mut self, name: &str) -> StoreResult<Option<crate::LeaseHolder>> {
        self.inner.lease_holder(name)
    }

    fn share_group(
        &mut self,
        name: &str,
    ) -> StoreResult<Option<(leasehold_core::rights::ShareGroup, u64)>> {
        self.inner.share_group(name)
    }

    fn put_share_group(
        &mut self,
        group: &leasehold_core::rights::ShareGroup,
        expected_version: u64,
        movements: &[leasehold_core::ledger::Transfer],
    ) -> StoreResult<Option<u64>> {
        self.inner
            .put_share_group(group, expected_version, movements)
    }
}
