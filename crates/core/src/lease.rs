//! The lease state machine (seed 000, S45-S48 and S58-S61) and the lock rule
//! (S23-S26): a partition is free, leased by exactly one lease, or withdrawn;
//! a lease is active until its release is requested, and is billed once.

use crate::ids::{LeaseId, PartitionRef};
use crate::money;
use crate::terms::Terms;
use crate::CoreError;
use serde::{Deserialize, Serialize};

/// The lending status (105) of a partition at the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum PartitionStatus {
    Free,
    Leased { lease_id: LeaseId },
    Withdrawn,
}

impl PartitionStatus {
    /// The status of a partition from what its row records: withdrawn, or
    /// leased by `lease_id`, or else free.
    pub fn of(withdrawn: bool, lease_id: Option<LeaseId>) -> Self {
        match (withdrawn, lease_id) {
            (true, _) => PartitionStatus::Withdrawn,
            (false, Some(lease_id)) => PartitionStatus::Leased { lease_id },
            (false, None) => PartitionStatus::Free,
        }
    }
}

/// Why a lease attempt did not conclude.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum LeaseRefusal {
    /// Someone else holds the partition.
    Conflict { lease_id: LeaseId },
    /// The lender withdrew the partition.
    Withdrawn,
    /// The partition runs jobs without isolation and the borrower did not
    /// opt in to that.
    Unisolated,
}

/// Can a new lease be concluded on a partition in this status?
pub fn decide_lease(status: PartitionStatus) -> Result<(), LeaseRefusal> {
    match status {
        PartitionStatus::Free => Ok(()),
        PartitionStatus::Leased { lease_id } => Err(LeaseRefusal::Conflict { lease_id }),
        PartitionStatus::Withdrawn => Err(LeaseRefusal::Withdrawn),
    }
}

/// No silent fallback to a weaker isolation: an unisolated partition (or
/// one whose isolation is unknown) is leased only by a borrower who asked
/// for that explicitly, even when it names the partition.
pub fn decide_isolation(terms: &Terms, allow_unisolated: bool) -> Result<(), LeaseRefusal> {
    if terms.is_unisolated() && !allow_unisolated {
        return Err(LeaseRefusal::Unisolated);
    }
    Ok(())
}

/// Why a lender may not alter or withdraw a partition now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlterRefusal {
    /// The partition is leased: it is locked until the lease is released.
    Locked {
        lease_id: LeaseId,
    },
    Withdrawn,
}

/// The lock rule: terms change only while nobody borrows the partition.
pub fn decide_alter(status: PartitionStatus) -> Result<(), AlterRefusal> {
    match status {
        PartitionStatus::Free => Ok(()),
        PartitionStatus::Leased { lease_id } => Err(AlterRefusal::Locked { lease_id }),
        PartitionStatus::Withdrawn => Err(AlterRefusal::Withdrawn),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Active,
    Released,
}

/// A borrowing contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub lease_id: LeaseId,
    pub partition: PartitionRef,
    pub borrower: String,
    pub lender: String,
    /// The terms in force when the lease was concluded; the bill uses these.
    pub terms: Terms,
    /// The partition's epoch for this lease; keys of older epochs are stale.
    pub epoch: u64,
    pub started_at_ms: u64,
    pub key_expires_at_ms: u64,
    pub state: LeaseState,
    pub release_requested_at_ms: Option<u64>,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub charge_micros: Option<u64>,
    /// A lease booked for a window (seed 003) ends here: its key expires
    /// and billing stops, even if it is released later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at_ms: Option<u64>,
}

/// The bill of a released lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bill {
    pub billable_seconds: u64,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub charge_micros: u64,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub lender_credit_micros: u64,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub commission_micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The lease ended now and must be billed with this bill.
    Released(Bill),
    /// The lease had ended already; nothing more is billed.
    AlreadyReleased,
}

impl Lease {
    /// Ends the lease at `now_ms` (the moment the release was requested, S61)
    /// and computes its bill. Releasing twice bills once.
    pub fn release(
        &mut self,
        now_ms: u64,
        commission_basis_points: u32,
    ) -> Result<ReleaseOutcome, CoreError> {
        if self.state == LeaseState::Released {
            return Ok(ReleaseOutcome::AlreadyReleased);
        }
        let billed_until_ms = self.ends_at_ms.map_or(now_ms, |end| now_ms.min(end));
        // A lease booked ahead and released before its start costs nothing.
        let seconds = if billed_until_ms <= self.started_at_ms && self.ends_at_ms.is_some() {
            0
        } else {
            money::billable_seconds(self.started_at_ms, billed_until_ms)
        };
        let charge = money::charge_micros(self.terms.price_per_hour_micros, seconds)?;
        let (lender_credit, commission) = money::split_commission(charge, commission_basis_points);
        self.state = LeaseState::Released;
        self.release_requested_at_ms = Some(now_ms);
        self.charge_micros = Some(charge);
        Ok(ReleaseOutcome::Released(Bill {
            billable_seconds: seconds,
            charge_micros: charge,
            lender_credit_micros: lender_credit,
            commission_micros: commission,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terms::sample_terms;

    fn lease() -> Lease {
        Lease {
            lease_id: 7,
            partition: PartitionRef::new("a", 1),
            borrower: "bob".into(),
            lender: "alice".into(),
            terms: sample_terms(),
            epoch: 3,
            started_at_ms: 10_000,
            key_expires_at_ms: 1_000_000,
            state: LeaseState::Active,
            release_requested_at_ms: None,
            charge_micros: None,
            ends_at_ms: None,
        }
    }

    #[test]
    fn lease_and_alter_decisions() {
        assert_eq!(decide_lease(PartitionStatus::Free), Ok(()));
        assert_eq!(
            decide_lease(PartitionStatus::Leased { lease_id: 4 }),
            Err(LeaseRefusal::Conflict { lease_id: 4 })
        );
        assert_eq!(
            decide_lease(PartitionStatus::Withdrawn),
            Err(LeaseRefusal::Withdrawn)
        );
        assert_eq!(
            decide_alter(PartitionStatus::Leased { lease_id: 4 }),
            Err(AlterRefusal::Locked { lease_id: 4 })
        );
        assert_eq!(decide_alter(PartitionStatus::Free), Ok(()));
    }

    #[test]
    fn unisolated_partitions_need_the_opt_in() {
        use crate::terms::Isolation;
        let check =
            |isolation: Option<Isolation>, allow: bool, expect: Result<(), LeaseRefusal>| {
                let terms = Terms {
                    isolation,
                    ..sample_terms()
                };
                assert_eq!(
                    decide_isolation(&terms, allow),
                    expect,
                    "{isolation:?} {allow}"
                );
            };
        check(Some(Isolation::None), false, Err(LeaseRefusal::Unisolated));
        // An unknown isolation (a row from before it was recorded) is no
        // excuse to hand out an unisolated partition.
        check(None, false, Err(LeaseRefusal::Unisolated));
        check(Some(Isolation::None), true, Ok(()));
        check(None, true, Ok(()));
        check(Some(Isolation::Container), false, Ok(()));
        check(Some(Isolation::Simulated), false, Ok(()));
    }

    #[test]
    fn release_bills_once() {
        let mut lease = lease();
        // 100_000 micros per hour for 36 seconds is 1000 micros.
        let outcome = lease.release(46_000, 1000).unwrap();
        assert_eq!(
            outcome,
            ReleaseOutcome::Released(Bill {
                billable_seconds: 36,
                charge_micros: 1000,
                lender_credit_micros: 900,
                commission_micros: 100
            })
        );
        assert_eq!(lease.state, LeaseState::Released);
        assert_eq!(
            lease.release(99_000, 1000).unwrap(),
            ReleaseOutcome::AlreadyReleased
        );
        assert_eq!(lease.charge_micros, Some(1000));
        assert_eq!(lease.release_requested_at_ms, Some(46_000));
    }
}
