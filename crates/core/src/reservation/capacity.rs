//! A vector of resources: CPU in centicores (hundredths of a core, as the
//! host capacity counts it), memory in MiB and disk in GiB. Every planning
//! figure of seed 003 (allocated, requested, acquired, target, available,
//! not yet acquired) is one of these, compared resource by resource.

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Capacity {
    pub cpu_centicores: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Capacity {
    pub const ZERO: Capacity = Capacity {
        cpu_centicores: 0,
        memory_mib: 0,
        disk_gib: 0,
    };

    pub fn new(cpu_centicores: u64, memory_mib: u64, disk_gib: u64) -> Self {
        Capacity {
            cpu_centicores,
            memory_mib,
            disk_gib,
        }
    }

    fn zip(self, other: Capacity, op: impl Fn(u64, u64) -> u64) -> Capacity {
        Capacity {
            cpu_centicores: op(self.cpu_centicores, other.cpu_centicores),
            memory_mib: op(self.memory_mib, other.memory_mib),
            disk_gib: op(self.disk_gib, other.disk_gib),
        }
    }

    pub fn saturating_add(self, other: Capacity) -> Capacity {
        self.zip(other, u64::saturating_add)
    }

    pub fn saturating_sub(self, other: Capacity) -> Capacity {
        self.zip(other, u64::saturating_sub)
    }

    pub fn min(self, other: Capacity) -> Capacity {
        self.zip(other, u64::min)
    }

    pub fn max(self, other: Capacity) -> Capacity {
        self.zip(other, u64::max)
    }

    /// Every resource of `self` is at most that of `other`.
    pub fn fits_in(self, other: Capacity) -> bool {
        self.cpu_centicores <= other.cpu_centicores
            && self.memory_mib <= other.memory_mib
            && self.disk_gib <= other.disk_gib
    }

    pub fn is_zero(self) -> bool {
        self == Capacity::ZERO
    }

    /// The resources as (name, value) pairs, for messages and loops.
    pub fn named(self) -> [(&'static str, u64); 3] {
        [
            ("cpu_centicores", self.cpu_centicores),
            ("memory_mib", self.memory_mib),
            ("disk_gib", self.disk_gib),
        ]
    }

    /// The first resource of `self` above that of `other`, with both values.
    pub fn first_excess(self, other: Capacity) -> Option<(&'static str, u64, u64)> {
        self.named()
            .into_iter()
            .zip(other.named())
            .find(|((_, mine), (_, theirs))| mine > theirs)
            .map(|((name, mine), (_, theirs))| (name, mine, theirs))
    }

    pub fn sum<'a>(items: impl IntoIterator<Item = &'a Capacity>) -> Capacity {
        items
            .into_iter()
            .fold(Capacity::ZERO, |total, item| total.saturating_add(*item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_per_resource_and_saturates() {
        let a = Capacity::new(100, 2048, 10);
        let b = Capacity::new(300, 1024, 0);
        assert_eq!(a.saturating_add(b), Capacity::new(400, 3072, 10));
        assert_eq!(a.saturating_sub(b), Capacity::new(0, 1024, 10));
        assert_eq!(a.min(b), Capacity::new(100, 1024, 0));
        assert!(!a.fits_in(b));
        assert!(Capacity::new(100, 1024, 0).fits_in(a));
        assert_eq!(a.first_excess(b), Some(("memory_mib", 2048, 1024)));
        assert_eq!(Capacity::sum(&[a, b]), Capacity::new(400, 3072, 10));
    }
}
