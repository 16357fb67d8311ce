//! Matching requirements against terms (seed 000, FIG. 8, S42-S43): which free
//! partitions meet a borrower's requirements, cheapest first, then best fit
//! (the smallest partition that is enough). When nothing matches, an
//! explanation in the manner of HTCondor's `-better-analyze`: how many
//! partitions each requirement ruled out, and the nearest misses.

use crate::ids::PartitionRef;
use crate::terms::{Requirements, Terms};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One requirement a partition can fail.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Requirement {
    MinVcpus,
    MinCpuCapPercent,
    MinMemoryMib,
    MinDiskGib,
    Image,
    MaxPricePerHourMicros,
    /// The partition is unisolated and the borrower did not opt in.
    AllowUnisolated,
}

impl Requirement {
    pub const ALL: [Requirement; 7] = [
        Requirement::MinVcpus,
        Requirement::MinCpuCapPercent,
        Requirement::MinMemoryMib,
        Requirement::MinDiskGib,
        Requirement::Image,
        Requirement::MaxPricePerHourMicros,
        Requirement::AllowUnisolated,
    ];

    pub fn field_name(self) -> &'static str {
        match self {
            Requirement::MinVcpus => "min_vcpus",
            Requirement::MinCpuCapPercent => "min_cpu_cap_percent",
            Requirement::MinMemoryMib => "min_memory_mib",
            Requirement::MinDiskGib => "min_disk_gib",
            Requirement::Image => "image",
            Requirement::MaxPricePerHourMicros => "max_price_per_hour_micros",
            Requirement::AllowUnisolated => "allow_unisolated",
        }
    }
}

/// The requirements `terms` fails, in a fixed order; empty means it matches.
pub fn failed_requirements(terms: &Terms, requirements: &Requirements) -> Vec<Requirement> {
    let mut failed = Vec::new();
    if requirements.min_vcpus.is_some_and(|v| terms.vcpus < v) {
        failed.push(Requirement::MinVcpus);
    }
    if requirements
        .min_cpu_cap_percent
        .is_some_and(|v| terms.cpu_cap_percent < v)
    {
        failed.push(Requirement::MinCpuCapPercent);
    }
    if requirements
        .min_memory_mib
        .is_some_and(|v| terms.memory_mib < v)
    {
        failed.push(Requirement::MinMemoryMib);
    }
    if requirements
        .min_disk_gib
        .is_some_and(|v| terms.disk_gib < v)
    {
        failed.push(Requirement::MinDiskGib);
    }
    if let Some(image) = &requirements.image {
        if !terms
            .images
            .iter()
            .any(|offered| crate::image_ref::offers_image(offered, image))
        {
            failed.push(Requirement::Image);
        }
    }
    if requirements
        .max_price_per_hour_micros
        .is_some_and(|v| terms.price_per_hour_micros > v)
    {
        failed.push(Requirement::MaxPricePerHourMicros);
    }
    if !requirements.allow_unisolated && terms.is_unisolated() {
        failed.push(Requirement::AllowUnisolated);
    }
    failed
}

pub fn matches(terms: &Terms, requirements: &Requirements) -> bool {
    failed_requirements(terms, requirements).is_empty()
}

/// The order of results: cheapest first, then the smallest partition that is
/// enough (best fit leaves the bigger partitions for bigger needs), then by
/// name so the order is total and stable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FitKey {
    pub price_per_hour_micros: u64,
    pub cpu_centicores: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub partition: PartitionRef,
}

impl FitKey {
    pub fn new(partition: PartitionRef, terms: &Terms) -> Self {
        FitKey {
            price_per_hour_micros: terms.price_per_hour_micros,
            cpu_centicores: terms.cpu_centicores(),
            memory_mib: terms.memory_mib,
            disk_gib: terms.disk_gib,
            partition,
        }
    }
}

/// The free partitions, ordered by [`FitKey`], so that a find walks them in
/// answer order and stops as soon as it has enough matches. Unisolated
/// partitions sit in a map of their own: a find without the opt-in never
/// walks them, and one with it merges the two maps in answer order.
#[derive(Debug, Default, Clone)]
pub struct FreeIndex {
    isolated_by_fit: BTreeMap<FitKey, Terms>,
    unisolated_by_fit: BTreeMap<FitKey, Terms>,
}

impl FreeIndex {
    fn map_for(&mut self, terms: &Terms) -> &mut BTreeMap<FitKey, Terms> {
        if terms.is_unisolated() {
            &mut self.unisolated_by_fit
        } else {
            &mut self.isolated_by_fit
        }
    }

    pub fn insert(&mut self, partition: PartitionRef, terms: Terms) {
        let key = FitKey::new(partition, &terms);
        self.map_for(&terms).insert(key, terms);
    }

    pub fn remove(&mut self, partition: &PartitionRef, terms: &Terms) -> bool {
        let key = FitKey::new(partition.clone(), terms);
        self.map_for(terms).remove(&key).is_some()
    }

    pub fn len(&self) -> usize {
        self.isolated_by_fit.len() + self.unisolated_by_fit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` matching free partitions, in answer order.
    pub fn find(&self, requirements: &Requirements, limit: usize) -> Vec<(PartitionRef, Terms)> {
        self.find_where(requirements, limit, |_| true)
    }

    /// Like [`Self::find`], skipping partitions `keep` says no to (those an
    /// uncommitted batch changed, which it answers for itself).
    pub fn find_where(
        &self,
        requirements: &Requirements,
        limit: usize,
        keep: impl Fn(&PartitionRef) -> bool,
    ) -> Vec<(PartitionRef, Terms)> {
        let mut found = Vec::new();
        if limit == 0 {
            return found;
        }
        let isolated = self.isolated_by_fit.iter();
        let unisolated = requirements
            .allow_unisolated
            .then(|| self.unisolated_by_fit.iter())
            .into_iter()
            .flatten();
        // Prices above the maximum can never match: skip walking them.
        let max_price = requirements.max_price_per_hour_micros.unwrap_or(u64::MAX);
        for (key, terms) in merge_in_order(isolated, unisolated) {
            if key.price_per_hour_micros > max_price {
                break;
            }
            if keep(&key.partition) && matches(terms, requirements) {
                found.push((key.partition.clone(), terms.clone()));
                if found.len() == limit {
                    break;
                }
            }
        }
        found
    }
}

/// Merges two iterators sorted by key into one sorted by key.
fn merge_in_order<'a>(
    left: impl Iterator<Item = (&'a FitKey, &'a Terms)>,
    right: impl Iterator<Item = (&'a FitKey, &'a Terms)>,
) -> impl Iterator<Item = (&'a FitKey, &'a Terms)> {
    let mut left = left.peekable();
    let mut right = right.peekable();
    std::iter::from_fn(move || match (left.peek(), right.peek()) {
        (Some((l, _)), Some((r, _))) if r < l => right.next(),
        (Some(_), _) => left.next(),
        (None, _) => right.next(),
    })
}

/// The reference answer: filter everything, sort by [`FitKey`]. Used by tests
/// to hold [`FreeIndex::find`] to account.
pub fn naive_find<'a>(
    free: impl Iterator<Item = (&'a PartitionRef, &'a Terms)>,
    requirements: &Requirements,
    limit: usize,
) -> Vec<(PartitionRef, Terms)> {
    let mut all: Vec<(FitKey, Terms)> = free
        .filter(|(_, terms)| matches(terms, requirements))
        .map(|(p, t)| (FitKey::new(p.clone(), t), t.clone()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.into_iter()
        .take(limit)
        .map(|(k, t)| (k.partition, t))
        .collect()
}

/// Why a find came back empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NoMatchExplanation {
    /// Partitions registered (free or leased).
    pub partitions_considered: u64,
    /// Partitions that are leased at the moment and so not offered.
    pub leased: u64,
    /// For each requirement, how many partitions it rules out on its own.
    pub ruled_out_by: Vec<RuledOut>,
    /// The partitions that fail the fewest requirements, and which.
    pub nearest_misses: Vec<NearMiss>,
    /// Hosts that carve partitions out of a share, and why each could not
    /// carve this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<crate::share::ShareMiss>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuledOut {
    pub requirement: Requirement,
    pub partitions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NearMiss {
    pub partition: PartitionRef,
    pub terms: Terms,
    pub leased: bool,
    pub failed: Vec<Requirement>,
}

pub const NEAREST_MISSES_SHOWN: usize = 3;

/// Explains an empty answer over every registered partition.
pub fn explain_no_match<'a>(
    partitions: impl Iterator<Item = (&'a PartitionRef, &'a Terms, bool)>,
    requirements: &Requirements,
) -> NoMatchExplanation {
    let mut considered = 0u64;
    let mut leased_count = 0u64;
    let mut counts = [0u64; Requirement::ALL.len()];
    // (number of failures incl. leased, fit key) -> miss; kept small.
    let mut nearest: Vec<(usize, FitKey, NearMiss)> = Vec::new();
    for (partition, terms, leased) in partitions {
        considered += 1;
        if leased {
            leased_count += 1;
        }
        let failed = failed_requirements(terms, requirements);
        for requirement in &failed {
            let slot = Requirement::ALL
                .iter()
                .position(|r| r == requirement)
                .unwrap_or(0);
            counts[slot] += 1;
        }
        let distance = failed.len() + usize::from(leased);
        let key = FitKey::new(partition.clone(), terms);
        let worse_than_all = nearest.len() == NEAREST_MISSES_SHOWN
            && nearest
                .last()
                .is_some_and(|(d, k, _)| (distance, &key) >= (*d, k));
        if worse_than_all {
            continue;
        }
        nearest.push((
            distance,
            key,
            NearMiss {
                partition: partition.clone(),
                terms: terms.clone(),
                leased,
                failed,
            },
        ));
        nearest.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        nearest.truncate(NEAREST_MISSES_SHOWN);
    }
    NoMatchExplanation {
        partitions_considered: considered,
        leased: leased_count,
        ruled_out_by: Requirement::ALL
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| RuledOut {
                requirement: *r,
                partitions: n,
            })
            .collect(),
        nearest_misses: nearest.into_iter().map(|(_, _, m)| m).collect(),
        shares: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terms::{sample_terms, Isolation};
    use proptest::prelude::*;

    fn terms_strategy() -> impl Strategy<Value = Terms> {
        (
            1u32..8,
            1u32..=100,
            1u64..8192,
            1u64..100,
            0usize..3,
            0u64..50,
            0usize..4,
        )
            .prop_map(
                |(vcpus, cap, memory, disk, image, price, isolation)| Terms {
                    vcpus,
                    cpu_cap_percent: cap,
                    memory_mib: memory,
                    disk_gib: disk,
                    images: vec![["busybox", "debian", "alpine"][image].to_string()],
                    price_per_hour_micros: price * 1000,
                    isolation: [
                        None,
                        Some(Isolation::None),
                        Some(Isolation::Simulated),
                        Some(Isolation::Container),
                    ][isolation],
                },
            )
    }

    fn requirements_strategy() -> impl Strategy<Value = Requirements> {
        (
            proptest::option::of(1u32..8),
            proptest::option::of(1u32..=100),
            proptest::option::of(1u64..8192),
            proptest::option::of(1u64..100),
            proptest::option::of(0usize..4),
            proptest::option::of(0u64..50),
            any::<bool>(),
        )
            .prop_map(|(v, c, m, d, i, p, allow_unisolated)| Requirements {
                min_vcpus: v,
                min_cpu_cap_percent: c,
                min_memory_mib: m,
                min_disk_gib: d,
                image: i.map(|i| ["busybox", "debian", "alpine", "windows"][i].to_string()),
                max_price_per_hour_micros: p.map(|p| p * 1000),
                allow_unisolated,
            })
    }

    proptest! {
        #[test]
        fn index_agrees_with_naive_filter(
            all in proptest::collection::vec(terms_strategy(), 0..60),
            removed in proptest::collection::vec(any::<bool>(), 60),
            requirements in requirements_strategy(),
            limit in 1usize..10,
        ) {
            let mut index = FreeIndex::default();
            let mut free = Vec::new();
            for (n, terms) in all.iter().enumerate() {
                let partition = PartitionRef::new(format!("h{}", n % 7), n as u32);
                index.insert(partition.clone(), terms.clone());
                if removed[n] {
                    prop_assert!(index.remove(&partition, terms));
                } else {
                    free.push((partition, terms.clone()));
                }
            }
            let expected = naive_find(free.iter().map(|(p, t)| (p, t)), &requirements, limit);
            prop_assert_eq!(index.find(&requirements, limit), expected);
            prop_assert_eq!(index.len(), free.len());
        }

        #[test]
        fn explanation_counts_what_each_requirement_rules_out(
            all in proptest::collection::vec(terms_strategy(), 1..40),
            requirements in requirements_strategy(),
        ) {
            let refs: Vec<PartitionRef> = (0..all.len()).map(|n| PartitionRef::new("h", n as u32)).collect();
            let explanation = explain_no_match(
                refs.iter().zip(all.iter()).map(|(p, t)| (p, t, false)),
                &requirements,
            );
            prop_assert_eq!(explanation.partitions_considered, all.len() as u64);
            for ruled in &explanation.ruled_out_by {
                let naive = all.iter().filter(|t| failed_requirements(t, &requirements).contains(&ruled.requirement)).count() as u64;
                prop_assert_eq!(ruled.partitions, naive);
            }
            prop_assert!(explanation.nearest_misses.len() <= NEAREST_MISSES_SHOWN);
        }
    }

    #[test]
    fn cheapest_first_then_best_fit() {
        let mut index = FreeIndex::default();
        let mut big = sample_terms();
        big.vcpus = 8;
        let small = sample_terms();
        let mut cheap = sample_terms();
        cheap.vcpus = 16;
        cheap.price_per_hour_micros = 1;
        index.insert(PartitionRef::new("a", 1), big);
        index.insert(PartitionRef::new("a", 2), small);
        index.insert(PartitionRef::new("b", 1), cheap);
        let order: Vec<String> = index
            .find(&Requirements::default(), 10)
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect();
        assert_eq!(order, ["b/1", "a/2", "a/1"]);
    }

    #[test]
    fn explanation_names_nearest_miss() {
        let terms = sample_terms();
        let partition = PartitionRef::new("a", 1);
        let requirements = Requirements {
            min_vcpus: Some(4),
            ..Default::default()
        };
        let explanation =
            explain_no_match([(&partition, &terms, false)].into_iter(), &requirements);
        assert_eq!(
            explanation.ruled_out_by,
            vec![RuledOut {
                requirement: Requirement::MinVcpus,
                partitions: 1
            }]
        );
        assert_eq!(
            explanation.nearest_misses[0].failed,
            vec![Requirement::MinVcpus]
        );
    }

    fn with_isolation(isolation: Option<Isolation>, price: u64) -> Terms {
        Terms {
            isolation,
            price_per_hour_micros: price,
            ..sample_terms()
        }
    }

    #[test]
    fn unisolated_partitions_are_found_only_with_the_opt_in() {
        let mut index = FreeIndex::default();
        // The unisolated ones are the cheapest, so a find that walked them
        // without the opt-in would meet them first.
        index.insert(
            PartitionRef::new("p", 1),
            with_isolation(Some(Isolation::None), 1),
        );
        index.insert(PartitionRef::new("old", 1), with_isolation(None, 2));
        index.insert(
            PartitionRef::new("c", 1),
            with_isolation(Some(Isolation::Container), 3),
        );
        index.insert(
            PartitionRef::new("s", 1),
            with_isolation(Some(Isolation::Simulated), 4),
        );
        let names = |index: &FreeIndex, requirements: &Requirements| -> Vec<String> {
            index
                .find(requirements, 10)
                .into_iter()
                .map(|(p, _)| p.to_string())
                .collect()
        };
        assert_eq!(names(&index, &Requirements::default()), ["c/1", "s/1"]);
        let opted_in = Requirements {
            allow_unisolated: true,
            ..Default::default()
        };
        assert_eq!(names(&index, &opted_in), ["p/1", "old/1", "c/1", "s/1"]);
        assert_eq!(index.len(), 4);
        assert!(index.remove(
            &PartitionRef::new("p", 1),
            &with_isolation(Some(Isolation::None), 1)
        ));
        assert_eq!(names(&index, &opted_in), ["old/1", "c/1", "s/1"]);
    }

    #[test]
    fn explanation_counts_the_unisolated() {
        let unisolated = with_isolation(Some(Isolation::None), 1);
        let partition = PartitionRef::new("p", 1);
        let explanation = explain_no_match(
            [(&partition, &unisolated, false)].into_iter(),
            &Requirements::default(),
        );
        assert_eq!(
            explanation.ruled_out_by,
            vec![RuledOut {
                requirement: Requirement::AllowUnisolated,
                partitions: 1
            }]
        );
        assert_eq!(
            Requirement::AllowUnisolated.field_name(),
            "allow_unisolated"
        );
    }
}
