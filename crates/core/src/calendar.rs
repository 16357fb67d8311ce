//! A partition's availability over time: the intervals it is leased or
//! reserved for, never two overlapping. Today every lease is one interval
//! from the moment it was concluded, open-ended until its release (which
//! ends and forgets it); reservations and future leases (seed 003) book
//! intervals with an end. Intervals are half-open, `[from_ms, to_ms)`, so
//! one that ends at `t` and one that starts at `t` are adjacent, not
//! overlapping. The free index still answers "free now" on its own; the
//! calendar is what a booking is checked against.

use crate::ids::LeaseId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What holds an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Booking {
    Leased { lease_id: LeaseId },
    Reserved { reservation_id: u64 },
}

impl Booking {
    /// The name stored in the database's `kind` column.
    pub fn kind_name(self) -> &'static str {
        match self {
            Booking::Leased { .. } => "leased",
            Booking::Reserved { .. } => "reserved",
        }
    }

    /// The lease or reservation id, stored beside the kind.
    pub fn holder_id(self) -> u64 {
        match self {
            Booking::Leased { lease_id } => lease_id,
            Booking::Reserved { reservation_id } => reservation_id,
        }
    }

    /// The booking a stored (kind, id) pair names; `None` for an unknown kind.
    pub fn from_stored(kind: &str, holder_id: u64) -> Option<Booking> {
        match kind {
            "leased" => Some(Booking::Leased {
                lease_id: holder_id,
            }),
            "reserved" => Some(Booking::Reserved {
                reservation_id: holder_id,
            }),
            _ => None,
        }
    }
}

/// `[from_ms, to_ms)`, or from `from_ms` on when `to_ms` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Interval {
    pub booking: Booking,
    pub from_ms: u64,
    pub to_ms: Option<u64>,
}

impl Interval {
    /// A lease as today's leases are: from its start until its release.
    pub fn lease_from(lease_id: LeaseId, from_ms: u64) -> Self {
        Interval {
            booking: Booking::Leased { lease_id },
            from_ms,
            to_ms: None,
        }
    }

    fn end_ms(&self) -> u64 {
        self.to_ms.unwrap_or(u64::MAX)
    }

    pub fn overlaps(&self, from_ms: u64, to_ms: Option<u64>) -> bool {
        self.from_ms < to_ms.unwrap_or(u64::MAX) && from_ms < self.end_ms()
    }

    pub fn contains(&self, at_ms: u64) -> bool {
        self.from_ms <= at_ms && at_ms < self.end_ms()
    }
}

/// The intervals of one partition, by start. Empty for a free partition,
/// and then it allocates nothing (a million partitions cost no more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calendar {
    by_start_ms: BTreeMap<u64, Interval>,
}

impl Calendar {
    pub fn is_empty(&self) -> bool {
        self.by_start_ms.is_empty()
    }

    pub fn intervals(&self) -> impl Iterator<Item = &Interval> {
        self.by_start_ms.values()
    }

    /// The first interval overlapping `[from_ms, to_ms)`, if any.
    pub fn first_overlap(&self, from_ms: u64, to_ms: Option<u64>) -> Option<&Interval> {
        // Only an interval starting before `to_ms` can overlap; of those,
        // the one starting last before `from_ms` and every later one.
        let before = self.by_start_ms.range(..=from_ms).next_back();
        let after = self
            .by_start_ms
            .range(from_ms..)
            .take_while(|(start, _)| **start < to_ms.unwrap_or(u64::MAX));
        before
            .into_iter()
            .chain(after)
            .map(|(_, interval)| interval)
            .find(|interval| interval.overlaps(from_ms, to_ms))
    }

    /// Books `interval` unless it overlaps one already booked (which it
    /// answers). An empty interval (`to_ms <= from_ms`) is refused as
    /// overlapping nothing: there is nothing to book.
    pub fn book(&mut self, interval: Interval) -> Result<(), Interval> {
        if interval
            .to_ms
            .is_some_and(|to_ms| to_ms <= interval.from_ms)
        {
            return Err(interval);
        }
        if let Some(existing) = self.first_overlap(interval.from_ms, interval.to_ms) {
            return Err(*existing);
        }
        self.by_start_ms.insert(interval.from_ms, interval);
        Ok(())
    }

    /// Who holds the partition at `at_ms`.
    pub fn occupant_at(&self, at_ms: u64) -> Option<&Interval> {
        self.by_start_ms
            .range(..=at_ms)
            .next_back()
            .map(|(_, interval)| interval)
            .filter(|interval| interval.contains(at_ms))
    }

    /// Free at `at_ms`: nothing holds it then.
    pub fn is_free_at(&self, at_ms: u64) -> bool {
        self.occupant_at(at_ms).is_none()
    }

    /// Forgets `booking`'s interval (its lease was released, so the
    /// interval is over; its history is the lease's record).
    pub fn unbook(&mut self, booking: Booking) -> Option<Interval> {
        let start = self
            .by_start_ms
            .iter()
            .find(|(_, interval)| interval.booking == booking)
            .map(|(start, _)| *start)?;
        self.by_start_ms.remove(&start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserved(id: u64, from_ms: u64, to_ms: Option<u64>) -> Interval {
        Interval {
            booking: Booking::Reserved { reservation_id: id },
            from_ms,
            to_ms,
        }
    }

    #[test]
    fn overlapping_intervals_are_refused_and_adjacent_ones_allowed() {
        let mut calendar = Calendar::default();
        calendar.book(reserved(1, 100, Some(200))).unwrap();
        let check = |calendar: &mut Calendar, interval: Interval, expect_ok: bool| {
            let result = calendar.clone().book(interval);
            assert_eq!(result.is_ok(), expect_ok, "{interval:?}");
            if let Err(existing) = result {
                assert_eq!(existing.booking, Booking::Reserved { reservation_id: 1 });
            }
        };
        check(&mut calendar, reserved(2, 150, Some(160)), false); // inside
        check(&mut calendar, reserved(2, 50, Some(101)), false); // overlaps its start
        check(&mut calendar, reserved(2, 199, Some(300)), false); // overlaps its end
        check(&mut calendar, reserved(2, 0, None), false); // open-ended from before
        check(&mut calendar, reserved(2, 50, Some(250)), false); // around it
        check(&mut calendar, reserved(2, 200, Some(300)), true); // adjacent after
        check(&mut calendar, reserved(2, 0, Some(100)), true); // adjacent before
        check(&mut calendar, reserved(2, 200, None), true); // open-ended after
                                                            // An empty interval books nothing.
        assert!(calendar.book(reserved(3, 300, Some(300))).is_err());
    }

    #[test]
    fn an_open_ended_lease_holds_until_unbooked() {
        let mut calendar = Calendar::default();
        assert!(calendar.is_free_at(0));
        calendar.book(Interval::lease_from(7, 1_000)).unwrap();
        assert!(calendar.is_free_at(999));
        assert!(!calendar.is_free_at(1_000));
        assert!(!calendar.is_free_at(u64::MAX - 1));
        assert_eq!(
            calendar.occupant_at(5_000).map(|i| i.booking),
            Some(Booking::Leased { lease_id: 7 })
        );
        // Nothing can be booked after it while it is open-ended.
        assert!(calendar.book(reserved(1, 9_000, Some(10_000))).is_err());
        let removed = calendar.unbook(Booking::Leased { lease_id: 7 }).unwrap();
        assert_eq!(removed.from_ms, 1_000);
        assert!(calendar.is_empty());
        assert!(calendar.is_free_at(5_000));
        assert!(calendar.unbook(Booking::Leased { lease_id: 7 }).is_none());
    }

    #[test]
    fn free_now_looks_only_at_the_interval_holding_now() {
        let mut calendar = Calendar::default();
        calendar.book(reserved(1, 100, Some(200))).unwrap();
        calendar.book(reserved(2, 300, Some(400))).unwrap();
        for (at_ms, free) in [
            (99, true),
            (100, false),
            (199, false),
            (200, true),
            (299, true),
            (300, false),
            (400, true),
        ] {
            assert_eq!(calendar.is_free_at(at_ms), free, "at {at_ms}");
        }
        assert_eq!(calendar.intervals().count(), 2);
        let stored = Booking::from_stored("reserved", 2).unwrap();
        assert_eq!((stored.kind_name(), stored.holder_id()), ("reserved", 2));
        assert_eq!(Booking::from_stored("other", 2), None);
    }
}
