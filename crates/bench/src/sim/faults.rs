//! The fault injector: a `BrokerStore` wrapped around the broker writer's
//! store (through `BrokerConfig::store_layer`). The simulation arms one
//! fault before an operation; the next `apply` then crashes before writing,
//! or writes and loses the acknowledgement. Arming from the simulation's own
//! generator (never from inside the store) keeps a seed reproducible.

use leasehold_core::lease::Lease;
use leasehold_core::ledger::Transfer;
use leasehold_store::broker::{
    AssetBalance, BrokerSnapshot, BrokerWrite, LeaseFilter, ReleaseNoticeRow, RevocationRow,
};
use leasehold_store::{BrokerStore, StoreError, StoreResult};
use std::sync::{Arc, Mutex};

/// What the next `apply` does instead of committing normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails before writing anything: the process died before the commit.
    CrashBeforeCommit,
    /// Commits, then fails: the commit landed but its acknowledgement was lost.
    AckLost,
}

/// A deliberate bug, to show that the invariant checks catch one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Every batch loses its first ledger transfer and reports success.
    DropOneTransferWrite,
    /// Every batch loses the write that marks a lease released.
    DropLeaseReleaseWrite,
}

impl PlantedBug {
    /// Its name for `leasehold-sim --plant-bug`.
    pub fn flag_value(self) -> &'static str {
        match self {
            PlantedBug::DropOneTransferWrite => "drop-transfer",
            PlantedBug::DropLeaseReleaseWrite => "drop-release",
        }
    }
}

#[derive(Debug, Default)]
struct ControlState {
    armed: Option<Fault>,
    /// The fault the last `apply` carried out, taken by the simulation.
    fired: Option<Fault>,
    /// The broker incarnation whose writer may write; older ones are dead
    /// processes (their writer thread lingers in this process only).
    live_incarnation: u64,
    planted_bug: Option<PlantedBug>,
}

/// The simulation's handle on the injector, shared by every incarnation.
#[derive(Clone, Debug, Default)]
pub struct FaultControl {
    state: Arc<Mutex<ControlState>>,
}

impl FaultControl {
    pub fn new(planted_bug: Option<PlantedBug>) -> Self {
        let control = FaultControl::default();
        control.lock().planted_bug = planted_bug;
        control
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `apply` fails as `fault` says.
    pub fn arm(&self, fault: Fault) {
        let mut state = self.lock();
        state.armed = Some(fault);
        state.fired = None;
    }

    /// Disarms, and says which fault fired since it was armed (if any).
    pub fn take_fired(&self) -> Option<Fault> {
        let mut state = self.lock();
        state.armed = None;
        state.fired.take()
    }

    /// A new broker incarnation starts: the previous one is dead, and any
    /// write its lingering writer thread tries fails.
    pub fn next_incarnation(&self) -> u64 {
        let mut state = self.lock();
        state.live_incarnation += 1;
        state.live_incarnation
    }

    /// The store layer for `BrokerConfig::store_layer` of incarnation
    /// `incarnation`.
    pub fn layer(&self, incarnation: u64) -> leasehold_broker::StoreLayer {
        let control = self.clone();
        Arc::new(move |inner| {
            Box::new(FaultyStore {
                inner,
                control: control.clone(),
                incarnation,
            })
        })
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::DatabaseThread(format!("simulated: {what}"))
}

/// The wrapper: everything but `apply` passes straight through.
struct FaultyStore {
    inner: Box<dyn BrokerStore>,
    control: FaultControl,
    incarnation: u64,
}

/// `writes` without the one write `bug` drops, if the batch has it.
fn with_planted_bug(writes: &[BrokerWrite], bug: PlantedBug) -> Vec<BrokerWrite> {
    let victim = writes.iter().position(|write| match (bug, write) {
        (PlantedBug::DropOneTransferWrite, BrokerWrite::InsertTransfer(_)) => true,
        (PlantedBug::DropLeaseReleaseWrite, BrokerWrite::UpdateLease(lease)) => {
            lease.state == leasehold_core::lease::LeaseState::Released
        }
        _ => false,
    });
    let mut kept = writes.to_vec();
    if let Some(position) = victim {
        kept.remove(position);
    }
    kept
}

impl BrokerStore for FaultyStore {
    fn apply(&mut self, writes: &[BrokerWrite]) -> StoreResult<()> {
        let (fault, planted_bug) = {
            let mut state = self.control.lock();
            if state.live_incarnation != self.incarnation {
                return Err(injected("this broker process is dead"));
            }
            let fault = state.armed.take();
            state.fired = fault;
            (fault, state.planted_bug)
        };
        match fault {
            Some(Fault::CrashBeforeCommit) => Err(injected("crash before commit")),
            Some(Fault::AckLost) => {
                self.inner.apply(writes)?;
                Err(injected(
                    "the commit landed but its acknowledgement was lost",
                ))
            }
            None => match planted_bug {
                Some(bug) => self.inner.apply(&with_planted_bug(writes, bug)),
                None => self.inner.apply(writes),
            },
        }
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
}
