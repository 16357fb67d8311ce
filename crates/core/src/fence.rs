//! The agent's partition fence: one partition's lending state on its host
//! and every transition of it, decided in one pure function.
//!
//! The agent's three flows (reconcile at start, job submission, notices
//! from the broker) and the lender's alter and withdraw map what they learn
//! to a [`FenceEvent`], call [`on_event`] and carry out the returned
//! [`FenceAction`]s in order. Time comes in as `now_ms`; nothing here reads
//! a clock or touches a disk.
//!
//! The invariant the whole type exists for: once a release of epoch N is
//! known (`released_through_epoch >= N`), no key of epoch N or below is
//! accepted again, whatever events follow.

use crate::ids::LeaseId;
use crate::key::KeyRejection;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a partition is in its lending cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum FencePhase {
    /// Lent and free: no lease holds it and no borrower's files are on it.
    Free,
    /// Held by a lease at the fence's epoch. `built` once the driver built
    /// the partition for it; `key_expires_at_ms` unknown when the lease was
    /// learned from the broker's list at start rather than from a key or a
    /// notice.
    Leased {
        lease_id: LeaseId,
        key_expires_at_ms: Option<u64>,
        built: bool,
    },
    /// Its lease ended (released or key expired): no key of it passes, its
    /// jobs are being stopped, and its files wait to be wiped.
    Fenced,
    /// The wipe has begun (kept, so a crash in the middle wipes again).
    Wiping,
    /// The lender withdrew it; the row is gone.
    Withdrawn,
}

impl FencePhase {
    pub fn as_str(&self) -> &'static str {
        match self {
            FencePhase::Free => "free",
            FencePhase::Leased { .. } => "leased",
            FencePhase::Fenced => "fenced",
            FencePhase::Wiping => "wiping",
            FencePhase::Withdrawn => "withdrawn",
        }
    }
}

/// One partition's fence: its phase, the highest epoch the host has seen,
/// and the epoch through which every lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionFence {
    pub epoch: u64,
    pub released_through_epoch: u64,
    pub phase: FencePhase,
}

/// What happened to a partition, as far as its fence cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceEvent {
    /// A borrower presented a verified key for this partition with a job.
    KeyPresented {
        lease_id: LeaseId,
        epoch: u64,
        /// Before this the key is not valid yet (a lease booked ahead of
        /// its start; 0 for a lease from now).
        key_valid_from_ms: u64,
        key_expires_at_ms: u64,
    },
    /// The driver built the partition for this lease.
    Built { lease_id: LeaseId, epoch: u64 },
    /// The broker says a lease started (best-effort notice).
    LeaseStarted {
        lease_id: LeaseId,
        epoch: u64,
        key_expires_at_ms: u64,
    },
    /// The broker says a lease was released (pushed or pulled).
    LeaseReleased { lease_id: LeaseId, epoch: u64 },
    /// Time passed: a lease whose key expired can never run a job again.
    KeyExpiryCheck,
    /// The agent holds the partition's lock and starts wiping it.
    WipeStarted,
    /// The driver wiped the partition.
    WipeDone,
    /// The lender alters the partition's terms.
    Altered,
    /// The lender withdraws the partition.
    Withdrawn,
    /// At start: what the broker's record says about the partition.
    Reconcile {
        broker_epoch: u64,
        broker_lease_id: Option<LeaseId>,
    },
}

/// What the agent must do, in this order, after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceAction {
    /// Stop every job running on the partition (it belongs to an old lease).
    CancelJobsOfPartition,
    /// Stop the jobs of one lease (an older lease than the current one).
    CancelJobsOfLease(LeaseId),
    /// Wipe the partition now, under its lock, before anything else runs.
    Wipe,
    /// Write the new fence durably.
    Persist,
    /// Build the partition (the job's flow does it once the terms check).
    Build,
    /// Once its stopped jobs let go of the lock, wipe the partition
    /// (through [`FenceEvent::WipeStarted`] and [`FenceEvent::WipeDone`]).
    WipeWhenStopped,
    /// Wipe the partition, free what the driver holds for it (its cores)
    /// and delete its row.
    Remove,
}

/// Why an event was refused; the fence is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceRefusal {
    /// The key (or the lease a build was for) may not run a job here.
    Key(KeyRejection),
    /// A lease holds the partition; the lender cannot alter or withdraw it.
    Locked { lease_id: LeaseId },
    /// The partition was withdrawn.
    Gone,
}

impl fmt::Display for FenceRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceRefusal::Key(rejection) => rejection.fmt(f),
            FenceRefusal::Locked { lease_id } => write!(f, "leased by lease {lease_id}"),
            FenceRefusal::Gone => f.write_str("the partition was withdrawn"),
        }
    }
}

pub type FenceOutcome = Result<(PartitionFence, Vec<FenceAction>), FenceRefusal>;

impl PartitionFence {
    /// A partition just lent: free, never leased.
    pub fn new_free() -> Self {
        PartitionFence {
            epoch: 0,
            released_through_epoch: 0,
            phase: FencePhase::Free,
        }
    }

    /// The lease holding the partition, if one does.
    pub fn lease_id(&self) -> Option<LeaseId> {
        match self.phase {
            FencePhase::Leased { lease_id, .. } => Some(lease_id),
            _ => None,
        }
    }

    pub fn key_expires_at_ms(&self) -> Option<u64> {
        match self.phase {
            FencePhase::Leased {
                key_expires_at_ms, ..
            } => key_expires_at_ms,
            _ => None,
        }
    }

    /// Whether the driver may hold files of the current lease.
    pub fn built(&self) -> bool {
        match self.phase {
            FencePhase::Leased { built, .. } => built,
            FencePhase::Fenced | FencePhase::Wiping => true,
            FencePhase::Free | FencePhase::Withdrawn => false,
        }
    }

    /// Whether a job of this lease and epoch may start now: the check a job
    /// makes after it registers, so a release that raced it stops it.
    pub fn admits_job(&self, lease_id: LeaseId, epoch: u64) -> bool {
        epoch > self.released_through_epoch
            && epoch == self.epoch
            && self.lease_id() == Some(lease_id)
    }

    /// Whether this release is already fenced, so applying it would
    /// change nothing.
    pub fn covers_release(&self, lease_id: LeaseId, epoch: u64) -> bool {
        self.phase == FencePhase::Withdrawn
            || (self.released_through_epoch >= epoch && self.lease_id() != Some(lease_id))
    }

    /// Whether a lease-started notice of this epoch is news to the host.
    pub fn is_newer(&self, epoch: u64) -> bool {
        epoch > self.epoch && epoch > self.released_through_epoch
    }

    fn with_phase(self, phase: FencePhase) -> Self {
        PartitionFence { phase, ..self }
    }
}

/// Decides one event against a partition's fence at `now_ms`.
pub fn on_event(fence: PartitionFence, event: FenceEvent, now_ms: u64) -> FenceOutcome {
    if fence.phase == FencePhase::Withdrawn {
        return Err(FenceRefusal::Gone);
    }
    match event {
        FenceEvent::KeyPresented {
            lease_id,
            epoch,
            key_valid_from_ms,
            key_expires_at_ms,
        } => {
            if now_ms < key_valid_from_ms {
                return Err(FenceRefusal::Key(KeyRejection::NotYetValid));
            }
            on_key_presented(fence, lease_id, epoch, key_expires_at_ms, now_ms)
        }
        FenceEvent::Built { lease_id, epoch } => on_built(fence, lease_id, epoch),
        FenceEvent::LeaseStarted {
            lease_id,
            epoch,
            key_expires_at_ms,
        } => Ok(on_lease_started(fence, lease_id, epoch, key_expires_at_ms)),
        FenceEvent::LeaseReleased { lease_id, epoch } => Ok(on_released(fence, lease_id, epoch)),
        FenceEvent::KeyExpiryCheck => Ok(on_expiry_check(fence, now_ms)),
        FenceEvent::WipeStarted => Ok(on_wipe_started(fence)),
        FenceEvent::WipeDone => Ok(on_wipe_done(fence)),
        FenceEvent::Altered => lender_may_change(fence).map(|()| (fence, vec![])),
        FenceEvent::Withdrawn => lender_may_change(fence).map(|()| {
            (
                fence.with_phase(FencePhase::Withdrawn),
                vec![FenceAction::Remove],
            )
        }),
        FenceEvent::Reconcile {
            broker_epoch,
            broker_lease_id,
        } => Ok(on_reconcile(fence, broker_epoch, broker_lease_id)),
    }
}

/// The epoch check of a key, in the order the reasons matter: released,
/// then stale, then expired, then another lease of the same epoch.
fn check_key(
    fence: &PartitionFence,
    lease_id: LeaseId,
    epoch: u64,
    key_expires_at_ms: u64,
    now_ms: u64,
) -> Result<(), KeyRejection> {
    if epoch <= fence.released_through_epoch {
        return Err(KeyRejection::Released);
    }
    if epoch < fence.epoch {
        return Err(KeyRejection::Stale);
    }
    if now_ms >= key_expires_at_ms {
        return Err(KeyRejection::Expired);
    }
    match fence.lease_id() {
        Some(held) if epoch == fence.epoch && held != lease_id => Err(KeyRejection::WrongLease),
        _ => Ok(()),
    }
}

fn on_key_presented(
    fence: PartitionFence,
    lease_id: LeaseId,
    epoch: u64,
    key_expires_at_ms: u64,
    now_ms: u64,
) -> FenceOutcome {
    check_key(&fence, lease_id, epoch, key_expires_at_ms, now_ms).map_err(FenceRefusal::Key)?;
    if let FencePhase::Leased {
        built,
        key_expires_at_ms: known_expiry,
        ..
    } = fence.phase
    {
        if epoch == fence.epoch {
            // The lease the host knows: build it once. A lease learned from
            // the broker's list at start learns its key's expiry here.
            let mut actions = Vec::new();
            let mut current = fence;
            if known_expiry.is_none() {
                current = fence.with_phase(FencePhase::Leased {
                    lease_id,
                    key_expires_at_ms: Some(key_expires_at_ms),
                    built,
                });
                actions.push(FenceAction::Persist);
            }
            if !built {
                actions.push(FenceAction::Build);
            }
            return Ok((current, actions));
        }
    }
    // A newer lease than the host knew (the broker signed it): adopt it.
    let (adopted, mut actions) = adopt(fence, lease_id, epoch, Some(key_expires_at_ms));
    actions.push(FenceAction::Build);
    Ok((adopted, actions))
}

/// Takes a lease of a newer epoch (or the current epoch when no lease holds
/// it): older leases are over, and whatever they left is wiped first.
fn adopt(
    fence: PartitionFence,
    lease_id: LeaseId,
    epoch: u64,
    key_expires_at_ms: Option<u64>,
) -> (PartitionFence, Vec<FenceAction>) {
    let mut actions = Vec::new();
    if fence.phase != FencePhase::Free {
        actions.push(FenceAction::CancelJobsOfPartition);
        actions.push(FenceAction::Wipe);
    }
    actions.push(FenceAction::Persist);
    let released_through_epoch = if epoch > fence.epoch {
        fence.released_through_epoch.max(fence.epoch)
    } else {
        fence.released_through_epoch
    };
    let adopted = PartitionFence {
        epoch,
        released_through_epoch,
        phase: FencePhase::Leased {
            lease_id,
            key_expires_at_ms,
            built: false,
        },
    };
    (adopted, actions)
}

fn on_built(fence: PartitionFence, lease_id: LeaseId, epoch: u64) -> FenceOutcome {
    if !fence.admits_job(lease_id, epoch) {
        let reason = if epoch <= fence.released_through_epoch || fence.lease_id().is_none() {
            KeyRejection::Released
        } else if epoch < fence.epoch {
            KeyRejection::Stale
        } else {
            KeyRejection::WrongLease
        };
        return Err(FenceRefusal::Key(reason));
    }
    let FencePhase::Leased {
        key_expires_at_ms,
        built: false,
        ..
    } = fence.phase
    else {
        return Ok((fence, vec![]));
    };
    let built = fence.with_phase(FencePhase::Leased {
        lease_id,
        key_expires_at_ms,
        built: true,
    });
    Ok((built, vec![FenceAction::Persist]))
}

fn on_lease_started(
    fence: PartitionFence,
    lease_id: LeaseId,
    epoch: u64,
    key_expires_at_ms: u64,
) -> (PartitionFence, Vec<FenceAction>) {
    if !fence.is_newer(epoch) {
        return (fence, vec![]);
    }
    adopt(fence, lease_id, epoch, Some(key_expires_at_ms))
}

fn on_released(
    fence: PartitionFence,
    lease_id: LeaseId,
    epoch: u64,
) -> (PartitionFence, Vec<FenceAction>) {
    if fence.covers_release(lease_id, epoch) {
        return (fence, vec![]);
    }
    let raised = PartitionFence {
        epoch: fence.epoch.max(epoch),
        released_through_epoch: fence.released_through_epoch.max(epoch),
        phase: fence.phase,
    };
    match fence.phase {
        // An older lease than the one holding the partition: only its
        // jobs stop (none should run; the newer lease's adoption wiped).
        FencePhase::Leased { .. } if epoch < fence.epoch => (
            raised,
            vec![
                FenceAction::Persist,
                FenceAction::CancelJobsOfLease(lease_id),
            ],
        ),
        // The holding lease, or a newer one the host never heard of: the
        // fence goes first, then its jobs stop, then the wipe.
        FencePhase::Leased { .. } | FencePhase::Fenced => (
            raised.with_phase(FencePhase::Fenced),
            vec![
                FenceAction::Persist,
                FenceAction::CancelJobsOfPartition,
                FenceAction::WipeWhenStopped,
            ],
        ),
        // Free: no key of that lease ever ran here, nothing to stop or wipe.
        // Wiping: the wipe under way finishes the job.
        FencePhase::Free | FencePhase::Wiping | FencePhase::Withdrawn => {
            (raised, vec![FenceAction::Persist])
        }
    }
}

fn on_expiry_check(fence: PartitionFence, now_ms: u64) -> (PartitionFence, Vec<FenceAction>) {
    match fence.phase {
        FencePhase::Leased {
            key_expires_at_ms: Some(expires_at_ms),
            ..
        } if now_ms >= expires_at_ms => (
            PartitionFence {
                epoch: fence.epoch,
                released_through_epoch: fence.epoch,
                phase: FencePhase::Fenced,
            },
            vec![
                FenceAction::Persist,
                FenceAction::CancelJobsOfPartition,
                FenceAction::WipeWhenStopped,
            ],
        ),
        _ => (fence, vec![]),
    }
}

fn on_wipe_started(fence: PartitionFence) -> (PartitionFence, Vec<FenceAction>) {
    match fence.phase {
        FencePhase::Fenced | FencePhase::Wiping => (
            fence.with_phase(FencePhase::Wiping),
            vec![FenceAction::Persist, FenceAction::Wipe],
        ),
        // Clean already, or a newer lease adopted it (and wiped first).
        _ => (fence, vec![]),
    }
}

fn on_wipe_done(fence: PartitionFence) -> (PartitionFence, Vec<FenceAction>) {
    match fence.phase {
        FencePhase::Wiping => (
            fence.with_phase(FencePhase::Free),
            vec![FenceAction::Persist],
        ),
        _ => (fence, vec![]),
    }
}

/// The lender's alter and withdraw follow the broker's lock rule
/// (`lease::decide_alter`), the one place it is written.
fn lender_may_change(fence: PartitionFence) -> Result<(), FenceRefusal> {
    let status = match fence.lease_id() {
        Some(lease_id) => crate::lease::PartitionStatus::Leased { lease_id },
        None => crate::lease::PartitionStatus::Free,
    };
    crate::lease::decide_alter(status).map_err(|refusal| match refusal {
        crate::lease::AlterRefusal::Locked { lease_id } => FenceRefusal::Locked { lease_id },
        crate::lease::AlterRefusal::Withdrawn => FenceRefusal::Gone,
    })
}

/// At start, with no job running: the broker's record of the lease wins
/// where it is newer, a lease that ended while the agent was away is
/// fenced, and leftovers of ended leases are wiped now.
fn on_reconcile(
    fence: PartitionFence,
    broker_epoch: u64,
    broker_lease_id: Option<LeaseId>,
) -> (PartitionFence, Vec<FenceAction>) {
    if broker_epoch > fence.epoch && broker_epoch > fence.released_through_epoch {
        if let Some(lease_id) = broker_lease_id {
            return adopt(fence, lease_id, broker_epoch, None);
        }
    }
    let released_through_epoch = if broker_epoch > fence.epoch {
        fence.released_through_epoch.max(broker_epoch)
    } else {
        fence.released_through_epoch
    };
    let mut settled = PartitionFence {
        epoch: fence.epoch.max(broker_epoch),
        released_through_epoch,
        phase: fence.phase,
    };
    // Ended while the agent was away: the broker has no lease, or a newer
    // epoch without one.
    let lease_over = matches!(fence.phase, FencePhase::Leased { .. })
        && (broker_lease_id.is_none() || broker_epoch > fence.epoch);
    if lease_over {
        settled.released_through_epoch = settled.released_through_epoch.max(fence.epoch);
    }
    let leftovers = lease_over || matches!(fence.phase, FencePhase::Fenced | FencePhase::Wiping);
    if leftovers {
        return (
            settled.with_phase(FencePhase::Free),
            vec![FenceAction::Wipe, FenceAction::Persist],
        );
    }
    if settled != fence {
        return (settled, vec![FenceAction::Persist]);
    }
    (fence, vec![])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW_MS: u64 = 1_000;
    const LATER_MS: u64 = 9_000;

    fn leased(built: bool) -> FencePhase {
        FencePhase::Leased {
            lease_id: 50,
            key_expires_at_ms: Some(5_000),
            built,
        }
    }

    /// Every phase, at epoch 5 (leased by lease 50), released through 2;
    /// the fenced phases have released their epoch.
    fn states() -> Vec<(&'static str, PartitionFence)> {
        let at = |released_through_epoch, phase| PartitionFence {
            epoch: 5,
            released_through_epoch,
            phase,
        };
        vec![
            ("free", at(2, FencePhase::Free)),
            ("leased", at(2, leased(false))),
            ("built", at(2, leased(true))),
            ("fenced", at(5, FencePhase::Fenced)),
            ("wiping", at(5, FencePhase::Wiping)),
            ("withdrawn", at(5, FencePhase::Withdrawn)),
        ]
    }

    fn key(lease_id: LeaseId, epoch: u64, key_expires_at_ms: u64) -> FenceEvent {
        FenceEvent::KeyPresented {
            lease_id,
            epoch,
            key_valid_from_ms: 0,
            key_expires_at_ms,
        }
    }

    /// Every event, with the variations that decide differently.
    fn events() -> Vec<(&'static str, FenceEvent, u64)> {
        vec![
            ("key current", key(50, 5, 5_000), NOW_MS),
            ("key newer", key(60, 6, 6_000), NOW_MS),
            ("key older", key(40, 3, 6_000), NOW_MS),
            ("key released", key(20, 2, 6_000), NOW_MS),
            ("key expired", key(50, 5, 5_000), LATER_MS),
            ("key other lease", key(51, 5, 6_000), NOW_MS),
            (
                "built current",
                FenceEvent::Built {
                    lease_id: 50,
                    epoch: 5,
                },
                NOW_MS,
            ),
            (
                "built older",
                FenceEvent::Built {
                    lease_id: 40,
                    epoch: 3,
                },
                NOW_MS,
            ),
            (
                "started newer",
                FenceEvent::LeaseStarted {
                    lease_id: 60,
                    epoch: 6,
                    key_expires_at_ms: 6_000,
                },
                NOW_MS,
            ),
            (
                "started known",
                FenceEvent::LeaseStarted {
                    lease_id: 50,
                    epoch: 5,
                    key_expires_at_ms: 5_000,
                },
                NOW_MS,
            ),
            (
                "released current",
                FenceEvent::LeaseReleased {
                    lease_id: 50,
                    epoch: 5,
                },
                NOW_MS,
            ),
            (
                "released older",
                FenceEvent::LeaseReleased {
                    lease_id: 40,
                    epoch: 3,
                },
                NOW_MS,
            ),
            (
                "released again",
                FenceEvent::LeaseReleased {
                    lease_id: 20,
                    epoch: 2,
                },
                NOW_MS,
            ),
            (
                "released newer",
                FenceEvent::LeaseReleased {
                    lease_id: 60,
                    epoch: 6,
                },
                NOW_MS,
            ),
            ("expiry check early", FenceEvent::KeyExpiryCheck, NOW_MS),
            ("expiry check late", FenceEvent::KeyExpiryCheck, LATER_MS),
            ("wipe started", FenceEvent::WipeStarted, NOW_MS),
            ("wipe done", FenceEvent::WipeDone, NOW_MS),
            ("altered", FenceEvent::Altered, NOW_MS),
            ("withdrawn", FenceEvent::Withdrawn, NOW_MS),
            (
                "reconcile same lease",
                FenceEvent::Reconcile {
                    broker_epoch: 5,
                    broker_lease_id: Some(50),
                },
                NOW_MS,
            ),
            (
                "reconcile no lease",
                FenceEvent::Reconcile {
                    broker_epoch: 5,
                    broker_lease_id: None,
                },
                NOW_MS,
            ),
            (
                "reconcile newer lease",
                FenceEvent::Reconcile {
                    broker_epoch: 7,
                    broker_lease_id: Some(70),
                },
                NOW_MS,
            ),
            (
                "reconcile newer free",
                FenceEvent::Reconcile {
                    broker_epoch: 7,
                    broker_lease_id: None,
                },
                NOW_MS,
            ),
        ]
    }

    fn describe(outcome: &FenceOutcome) -> String {
        match outcome {
            Err(refusal) => format!("refused {refusal:?}"),
            Ok((fence, actions)) => {
                let phase = match fence.phase {
                    FencePhase::Leased {
                        lease_id, built, ..
                    } => format!("leased {lease_id}{}", if built { " built" } else { "" }),
                    other => other.as_str().to_string(),
                };
                format!(
                    "{phase} e{} r{} {actions:?}",
                    fence.epoch, fence.released_through_epoch
                )
            }
        }
    }

    #[test]
    fn every_phase_meets_every_event() {
        let expected = EXPECTED_TRANSITIONS;
        let mut checked = 0;
        for (state_name, state) in states() {
            for (event_name, event, now_ms) in events() {
                let row = expected
                    .iter()
                    .find(|(s, e, _)| *s == state_name && *e == event_name)
                    .unwrap_or_else(|| panic!("no expectation for {state_name} x {event_name}"));
                assert_eq!(
                    describe(&on_event(state, event, now_ms)),
                    row.2,
                    "{state_name} x {event_name}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, expected.len(), "every expectation is walked");
        assert_eq!(checked, states().len() * events().len());
    }

    /// (phase, event, outcome): each state of [`states`] meets each event of
    /// [`events`], and is accepted (new phase, epoch, released-through
    /// epoch, actions in order) or refused with its reason.
    const EXPECTED_TRANSITIONS: &[(&str, &str, &str)] = &[
        ("free", "key current", "leased 50 e5 r2 [Persist, Build]"),
        ("free", "key newer", "leased 60 e6 r5 [Persist, Build]"),
        ("free", "key older", "refused Key(Stale)"),
        ("free", "key released", "refused Key(Released)"),
        ("free", "key expired", "refused Key(Expired)"),
        (
            "free",
            "key other lease",
            "leased 51 e5 r2 [Persist, Build]",
        ),
        ("free", "built current", "refused Key(Released)"),
        ("free", "built older", "refused Key(Released)"),
        ("free", "started newer", "leased 60 e6 r5 [Persist]"),
        ("free", "started known", "free e5 r2 []"),
        ("free", "released current", "free e5 r5 [Persist]"),
        ("free", "released older", "free e5 r3 [Persist]"),
        ("free", "released again", "free e5 r2 []"),
        ("free", "released newer", "free e6 r6 [Persist]"),
        ("free", "expiry check early", "free e5 r2 []"),
        ("free", "expiry check late", "free e5 r2 []"),
        ("free", "wipe started", "free e5 r2 []"),
        ("free", "wipe done", "free e5 r2 []"),
        ("free", "altered", "free e5 r2 []"),
        ("free", "withdrawn", "withdrawn e5 r2 [Remove]"),
        ("free", "reconcile same lease", "free e5 r2 []"),
        ("free", "reconcile no lease", "free e5 r2 []"),
        ("free", "reconcile newer lease", "leased 70 e7 r5 [Persist]"),
        ("free", "reconcile newer free", "free e7 r7 [Persist]"),
        ("leased", "key current", "leased 50 e5 r2 [Build]"),
        (
            "leased",
            "key newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist, Build]",
        ),
        ("leased", "key older", "refused Key(Stale)"),
        ("leased", "key released", "refused Key(Released)"),
        ("leased", "key expired", "refused Key(Expired)"),
        ("leased", "key other lease", "refused Key(WrongLease)"),
        ("leased", "built current", "leased 50 built e5 r2 [Persist]"),
        ("leased", "built older", "refused Key(Stale)"),
        (
            "leased",
            "started newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        ("leased", "started known", "leased 50 e5 r2 []"),
        (
            "leased",
            "released current",
            "fenced e5 r5 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        (
            "leased",
            "released older",
            "leased 50 e5 r3 [Persist, CancelJobsOfLease(40)]",
        ),
        ("leased", "released again", "leased 50 e5 r2 []"),
        (
            "leased",
            "released newer",
            "fenced e6 r6 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        ("leased", "expiry check early", "leased 50 e5 r2 []"),
        (
            "leased",
            "expiry check late",
            "fenced e5 r5 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        ("leased", "wipe started", "leased 50 e5 r2 []"),
        ("leased", "wipe done", "leased 50 e5 r2 []"),
        ("leased", "altered", "refused Locked { lease_id: 50 }"),
        ("leased", "withdrawn", "refused Locked { lease_id: 50 }"),
        ("leased", "reconcile same lease", "leased 50 e5 r2 []"),
        ("leased", "reconcile no lease", "free e5 r5 [Wipe, Persist]"),
        (
            "leased",
            "reconcile newer lease",
            "leased 70 e7 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        (
            "leased",
            "reconcile newer free",
            "free e7 r7 [Wipe, Persist]",
        ),
        ("built", "key current", "leased 50 built e5 r2 []"),
        (
            "built",
            "key newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist, Build]",
        ),
        ("built", "key older", "refused Key(Stale)"),
        ("built", "key released", "refused Key(Released)"),
        ("built", "key expired", "refused Key(Expired)"),
        ("built", "key other lease", "refused Key(WrongLease)"),
        ("built", "built current", "leased 50 built e5 r2 []"),
        ("built", "built older", "refused Key(Stale)"),
        (
            "built",
            "started newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        ("built", "started known", "leased 50 built e5 r2 []"),
        (
            "built",
            "released current",
            "fenced e5 r5 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        (
            "built",
            "released older",
            "leased 50 built e5 r3 [Persist, CancelJobsOfLease(40)]",
        ),
        ("built", "released again", "leased 50 built e5 r2 []"),
        (
            "built",
            "released newer",
            "fenced e6 r6 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        ("built", "expiry check early", "leased 50 built e5 r2 []"),
        (
            "built",
            "expiry check late",
            "fenced e5 r5 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        ("built", "wipe started", "leased 50 built e5 r2 []"),
        ("built", "wipe done", "leased 50 built e5 r2 []"),
        ("built", "altered", "refused Locked { lease_id: 50 }"),
        ("built", "withdrawn", "refused Locked { lease_id: 50 }"),
        ("built", "reconcile same lease", "leased 50 built e5 r2 []"),
        ("built", "reconcile no lease", "free e5 r5 [Wipe, Persist]"),
        (
            "built",
            "reconcile newer lease",
            "leased 70 e7 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        (
            "built",
            "reconcile newer free",
            "free e7 r7 [Wipe, Persist]",
        ),
        ("fenced", "key current", "refused Key(Released)"),
        (
            "fenced",
            "key newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist, Build]",
        ),
        ("fenced", "key older", "refused Key(Released)"),
        ("fenced", "key released", "refused Key(Released)"),
        ("fenced", "key expired", "refused Key(Released)"),
        ("fenced", "key other lease", "refused Key(Released)"),
        ("fenced", "built current", "refused Key(Released)"),
        ("fenced", "built older", "refused Key(Released)"),
        (
            "fenced",
            "started newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        ("fenced", "started known", "fenced e5 r5 []"),
        ("fenced", "released current", "fenced e5 r5 []"),
        ("fenced", "released older", "fenced e5 r5 []"),
        ("fenced", "released again", "fenced e5 r5 []"),
        (
            "fenced",
            "released newer",
            "fenced e6 r6 [Persist, CancelJobsOfPartition, WipeWhenStopped]",
        ),
        ("fenced", "expiry check early", "fenced e5 r5 []"),
        ("fenced", "expiry check late", "fenced e5 r5 []"),
        ("fenced", "wipe started", "wiping e5 r5 [Persist, Wipe]"),
        ("fenced", "wipe done", "fenced e5 r5 []"),
        ("fenced", "altered", "fenced e5 r5 []"),
        ("fenced", "withdrawn", "withdrawn e5 r5 [Remove]"),
        (
            "fenced",
            "reconcile same lease",
            "free e5 r5 [Wipe, Persist]",
        ),
        ("fenced", "reconcile no lease", "free e5 r5 [Wipe, Persist]"),
        (
            "fenced",
            "reconcile newer lease",
            "leased 70 e7 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        (
            "fenced",
            "reconcile newer free",
            "free e7 r7 [Wipe, Persist]",
        ),
        ("wiping", "key current", "refused Key(Released)"),
        (
            "wiping",
            "key newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist, Build]",
        ),
        ("wiping", "key older", "refused Key(Released)"),
        ("wiping", "key released", "refused Key(Released)"),
        ("wiping", "key expired", "refused Key(Released)"),
        ("wiping", "key other lease", "refused Key(Released)"),
        ("wiping", "built current", "refused Key(Released)"),
        ("wiping", "built older", "refused Key(Released)"),
        (
            "wiping",
            "started newer",
            "leased 60 e6 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        ("wiping", "started known", "wiping e5 r5 []"),
        ("wiping", "released current", "wiping e5 r5 []"),
        ("wiping", "released older", "wiping e5 r5 []"),
        ("wiping", "released again", "wiping e5 r5 []"),
        ("wiping", "released newer", "wiping e6 r6 [Persist]"),
        ("wiping", "expiry check early", "wiping e5 r5 []"),
        ("wiping", "expiry check late", "wiping e5 r5 []"),
        ("wiping", "wipe started", "wiping e5 r5 [Persist, Wipe]"),
        ("wiping", "wipe done", "free e5 r5 [Persist]"),
        ("wiping", "altered", "wiping e5 r5 []"),
        ("wiping", "withdrawn", "withdrawn e5 r5 [Remove]"),
        (
            "wiping",
            "reconcile same lease",
            "free e5 r5 [Wipe, Persist]",
        ),
        ("wiping", "reconcile no lease", "free e5 r5 [Wipe, Persist]"),
        (
            "wiping",
            "reconcile newer lease",
            "leased 70 e7 r5 [CancelJobsOfPartition, Wipe, Persist]",
        ),
        (
            "wiping",
            "reconcile newer free",
            "free e7 r7 [Wipe, Persist]",
        ),
        ("withdrawn", "key current", "refused Gone"),
        ("withdrawn", "key newer", "refused Gone"),
        ("withdrawn", "key older", "refused Gone"),
        ("withdrawn", "key released", "refused Gone"),
        ("withdrawn", "key expired", "refused Gone"),
        ("withdrawn", "key other lease", "refused Gone"),
        ("withdrawn", "built current", "refused Gone"),
        ("withdrawn", "built older", "refused Gone"),
        ("withdrawn", "started newer", "refused Gone"),
        ("withdrawn", "started known", "refused Gone"),
        ("withdrawn", "released current", "refused Gone"),
        ("withdrawn", "released older", "refused Gone"),
        ("withdrawn", "released again", "refused Gone"),
        ("withdrawn", "released newer", "refused Gone"),
        ("withdrawn", "expiry check early", "refused Gone"),
        ("withdrawn", "expiry check late", "refused Gone"),
        ("withdrawn", "wipe started", "refused Gone"),
        ("withdrawn", "wipe done", "refused Gone"),
        ("withdrawn", "altered", "refused Gone"),
        ("withdrawn", "withdrawn", "refused Gone"),
        ("withdrawn", "reconcile same lease", "refused Gone"),
        ("withdrawn", "reconcile no lease", "refused Gone"),
        ("withdrawn", "reconcile newer lease", "refused Gone"),
        ("withdrawn", "reconcile newer free", "refused Gone"),
    ];

    #[test]
    fn a_lease_adopted_at_start_learns_its_key_expiry_from_the_first_key() {
        let adopted = PartitionFence {
            epoch: 5,
            released_through_epoch: 4,
            phase: FencePhase::Leased {
                lease_id: 50,
                key_expires_at_ms: None,
                built: true,
            },
        };
        let (after, actions) = on_event(adopted, key(50, 5, 5_000), NOW_MS).unwrap();
        assert_eq!(after.key_expires_at_ms(), Some(5_000));
        assert_eq!(actions, vec![FenceAction::Persist]);
        let (expired, _) = on_event(after, FenceEvent::KeyExpiryCheck, LATER_MS).unwrap();
        assert_eq!(expired.phase, FencePhase::Fenced);
    }

    fn arbitrary_event() -> impl Strategy<Value = (FenceEvent, u64)> {
        let epoch = 0u64..8;
        // Lease ids mostly follow their epoch, as the broker's do, and
        // sometimes do not, as a confused or forged history would.
        let lease = prop_oneof![3 => Just(None), 1 => (0u64..4).prop_map(Some)];
        let shape = 0u8..10;
        (shape, epoch, lease, 0u64..20, 0u64..20).prop_map(|(shape, epoch, lease, a, b)| {
            let lease_id = lease.unwrap_or(epoch * 10);
            let event = match shape {
                0 | 1 => FenceEvent::KeyPresented {
                    lease_id,
                    epoch,
                    key_valid_from_ms: 0,
                    key_expires_at_ms: a,
                },
                2 => FenceEvent::Built { lease_id, epoch },
                3 => FenceEvent::LeaseStarted {
                    lease_id,
                    epoch,
                    key_expires_at_ms: a,
                },
                4 => FenceEvent::LeaseReleased { lease_id, epoch },
                5 => FenceEvent::KeyExpiryCheck,
                6 => FenceEvent::WipeStarted,
                7 => FenceEvent::WipeDone,
                8 => FenceEvent::Altered,
                _ => FenceEvent::Reconcile {
                    broker_epoch: epoch,
                    broker_lease_id: (a % 2 == 0).then_some(lease_id),
                },
            };
            (event, b)
        })
    }

    proptest::proptest! {
        /// No sequence of events lets a key of an epoch at or below a
        /// released epoch run a job: once a release of epoch N was applied,
        /// every key of epoch N or below is refused and no job of such an
        /// epoch passes the check made after it registers.
        #[test]
        fn no_released_epoch_ever_runs_a_job(
            steps in proptest::collection::vec(arbitrary_event(), 1..60)
        ) {
            let mut fence = PartitionFence::new_free();
            let mut released_max = 0u64;
            for (event, now_ms) in steps {
                let before = fence;
                let outcome = on_event(fence, event, now_ms);
                if let FenceEvent::KeyPresented { epoch, .. } = event {
                    if epoch <= released_max {
                        proptest::prop_assert!(outcome.is_err(), "{before:?} accepted {event:?}");
                    }
                }
                if let Ok((after, _)) = outcome {
                    fence = after;
                }
                if let FenceEvent::LeaseReleased { epoch, .. } = event {
                    released_max = released_max.max(epoch);
                }
                released_max = released_max.max(fence.released_through_epoch);
                proptest::prop_assert!(fence.released_through_epoch >= before.released_through_epoch);
                proptest::prop_assert!(fence.epoch >= before.epoch);
                proptest::prop_assert!(fence.released_through_epoch >= released_max);
                for epoch in 0..=released_max {
                    for lease_id in 0..80 {
                        proptest::prop_assert!(!fence.admits_job(lease_id, epoch));
                    }
                }
            }
        }
    }
}
