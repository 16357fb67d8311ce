//! The fault injector: a `BrokerStore` wrapped around the broker writer's
//! store (through `BrokerConfig::store_layer`). The simulation arms one
//! fault before an operation; the next `apply` then crashes before writing,
//! or writes and loses the acknowledgement. Arming from the simulation's own
//! generator (never from inside the store) keeps a seed reproducible.

use leasehold_store::broker::BrokerWrite;
use leasehold_store::{BrokerStore, InterceptedStore, StoreError, StoreResult};
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
    /// Every release notice is stored with a broken signature: the list
    /// still names the right leases, so only an agent that verifies what
    /// it pulls can tell.
    GarbleReleaseNotice,
}

impl PlantedBug {
    /// Its name for `leasehold-sim --plant-bug`.
    pub fn flag_value(self) -> &'static str {
        match self {
            PlantedBug::DropOneTransferWrite => "drop-transfer",
            PlantedBug::DropLeaseReleaseWrite => "drop-release",
            PlantedBug::GarbleReleaseNotice => "garble-notice",
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
            let control = control.clone();
            Box::new(InterceptedStore::new(
                inner,
                Box::new(move |inner, writes| control.apply(incarnation, inner, writes)),
            ))
        })
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::DatabaseThread(format!("simulated: {what}"))
}

/// `writes` without the one write `bug` drops, if the batch has it, or
/// with the notices it garbles.
fn with_planted_bug(writes: &[BrokerWrite], bug: PlantedBug) -> Vec<BrokerWrite> {
    if bug == PlantedBug::GarbleReleaseNotice {
        return writes.iter().cloned().map(garbled).collect();
    }
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

/// A revocation row whose notice has the first character of its signature
/// changed (a whole base64 digit, so it still decodes and fails only as a
/// signature, whatever key the broker drew).
fn garbled(write: BrokerWrite) -> BrokerWrite {
    match write {
        BrokerWrite::InsertRevocation(mut row) => {
            if let Some(dot) = row.notice.rfind('.') {
                let first = row.notice[dot + 1..].chars().next();
                let other = if first == Some('A') { "B" } else { "A" };
                row.notice.replace_range(dot + 1..dot + 2, other);
            }
            BrokerWrite::InsertRevocation(row)
        }
        other => other,
    }
}

impl FaultControl {
    /// One `apply` of incarnation `incarnation`'s writer, as the armed
    /// fault and the planted bug say; everything else passes straight
    /// through the wrapper.
    fn apply(
        &self,
        incarnation: u64,
        inner: &mut dyn BrokerStore,
        writes: &[BrokerWrite],
    ) -> StoreResult<()> {
        let (fault, planted_bug) = {
            let mut state = self.lock();
            if state.live_incarnation != incarnation {
                return Err(injected("this broker process is dead"));
            }
            let fault = state.armed.take();
            state.fired = fault;
            (fault, state.planted_bug)
        };
        match fault {
            Some(Fault::CrashBeforeCommit) => Err(injected("crash before commit")),
            Some(Fault::AckLost) => {
                inner.apply(writes)?;
                Err(injected(
                    "the commit landed but its acknowledgement was lost",
                ))
            }
            None => match planted_bug {
                Some(bug) => inner.apply(&with_planted_bug(writes, bug)),
                None => inner.apply(writes),
            },
        }
    }
}
