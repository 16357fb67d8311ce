//! The synthetic market: a seeded generator and the terms, host capacities and
//! requirements drawn from it. Everything is derived from `--seed` and a
//! stream number (a host index, a client number), never from task scheduling,
//! so two runs with the same seed register the same partitions and ask the
//! same questions even though requests interleave differently.

use leasehold_core::{HostCapacity, Requirements, Terms};

/// The images partitions offer. Short and fixed so that every image is offered
/// by many partitions and a find naming one never fails as "unknown image".
pub const IMAGES: [&str; 3] = ["busybox", "debian-12", "ubuntu-24.04"];
const CPU_CAPS: [u32; 3] = [25, 50, 100];
/// Powers of two from 512 MiB to 64 GiB.
const MEMORY_MIB: [u64; 8] = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];
const MAX_TERM_VCPUS: u64 = 16;
const MIN_DISK_GIB: u64 = 10;
const MAX_DISK_GIB: u64 = 500;
const MIN_PRICE_MICROS: u64 = 10_000;
const MAX_PRICE_MICROS: u64 = 5_000_000;

/// The share of each host its owner keeps; small, but not zero, so the
/// broker's owner-share arithmetic is exercised.
const OWNER_SHARE_CPU_CENTICORES: u64 = 100;
const OWNER_SHARE_MEMORY_MIB: u64 = 1024;
const OWNER_SHARE_DISK_GIB: u64 = 10;

/// The broker refuses hosts above 1024 cores; with the largest term
/// (16 vCPUs at 100 %) per partition this bounds partitions per host.
pub const MAX_PARTITIONS_PER_HOST: u32 =
    ((1024 * 100 - OWNER_SHARE_CPU_CENTICORES) / (MAX_TERM_VCPUS * 100)) as u32;

/// SplitMix64: tiny, fast, and good enough for picking workload parameters.
/// (Not for anything secret.)
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for one independent stream of the run seeded by `seed`.
    pub fn stream(seed: u64, stream: u64) -> Self {
        // Spread stream numbers apart by the golden-ratio increment, then
        // step once so neighbouring streams do not start on related values.
        let mut rng = SplitMix64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`. The modulo bias is negligible for these ranges.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64 - 1) as usize]
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.next_u64() % denominator < numerator
    }
}

/// The name of the `index`-th host (0-based). Zero-padded so hosts sort in
/// registration order in the broker's listings.
pub fn host_id(index: usize) -> String {
    format!("bench-h{index:06}")
}

/// Terms for one partition: every field varies so finds with different
/// requirements match different slices of the table.
pub fn random_terms(rng: &mut SplitMix64) -> Terms {
    // A non-empty subset of IMAGES, kept in IMAGES order so no image repeats.
    let mask = rng.range(1, (1 << IMAGES.len()) - 1);
    let images = IMAGES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, image)| image.to_string())
        .collect();
    Terms {
        vcpus: rng.range(1, MAX_TERM_VCPUS) as u32,
        cpu_cap_percent: *rng.pick(&CPU_CAPS),
        memory_mib: *rng.pick(&MEMORY_MIB),
        disk_gib: rng.range(MIN_DISK_GIB, MAX_DISK_GIB),
        images,
        price_per_hour_micros: rng.range(MIN_PRICE_MICROS, MAX_PRICE_MICROS),
        isolation: Some(leasehold_core::Isolation::Simulated),
    }
}

/// A host big enough for `partitions` of the largest terms `random_terms`
/// draws, so registration never fails on capacity and the benchmark measures
/// the broker, not the generator's luck.
pub fn host_capacity(partitions: u32) -> HostCapacity {
    let partitions = partitions as u64;
    HostCapacity {
        cpu_centicores: partitions * MAX_TERM_VCPUS * 100 + OWNER_SHARE_CPU_CENTICORES,
        memory_mib: partitions * MEMORY_MIB[MEMORY_MIB.len() - 1] + OWNER_SHARE_MEMORY_MIB,
        disk_gib: partitions * MAX_DISK_GIB + OWNER_SHARE_DISK_GIB,
        owner_share_cpu_centicores: OWNER_SHARE_CPU_CENTICORES,
        owner_share_memory_mib: OWNER_SHARE_MEMORY_MIB,
        owner_share_disk_gib: OWNER_SHARE_DISK_GIB,
    }
}

/// Requirements a borrower might send: each field present about half the time
/// (the rarer ones a quarter), with thresholds that leave most queries
/// answerable but some selective enough to make the broker walk its index.
pub fn random_requirements(rng: &mut SplitMix64) -> Requirements {
    Requirements {
        min_vcpus: rng.chance(1, 2).then(|| rng.range(1, 8) as u32),
        min_cpu_cap_percent: rng.chance(1, 4).then(|| *rng.pick(&CPU_CAPS)),
        // Up to 16 GiB: asking for the very largest partitions is rare.
        min_memory_mib: rng.chance(1, 2).then(|| *rng.pick(&MEMORY_MIB[..6])),
        min_disk_gib: rng.chance(1, 4).then(|| rng.range(MIN_DISK_GIB, 250)),
        image: rng.chance(1, 2).then(|| rng.pick(&IMAGES).to_string()),
        max_price_per_hour_micros: rng
            .chance(1, 2)
            .then(|| rng.range(50_000, MAX_PRICE_MICROS)),
        allow_unisolated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map(|_| SplitMix64::stream(7, 1).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            SplitMix64::stream(7, 1).next_u64(),
            SplitMix64::stream(7, 2).next_u64()
        );
    }

    #[test]
    fn generated_terms_and_requirements_are_valid_and_fit() {
        let mut rng = SplitMix64::stream(42, 0);
        let capacity = host_capacity(MAX_PARTITIONS_PER_HOST);
        assert!(capacity.cpu_centicores <= 1024 * 100);
        let terms: Vec<Terms> = (0..MAX_PARTITIONS_PER_HOST)
            .map(|_| random_terms(&mut rng))
            .collect();
        for t in &terms {
            t.validate(None).unwrap();
        }
        let (last, others) = terms.split_last().unwrap();
        capacity.admits(others.iter(), last).unwrap();
        for _ in 0..1000 {
            random_requirements(&mut rng).validate().unwrap();
        }
    }
}
