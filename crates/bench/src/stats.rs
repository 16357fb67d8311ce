//! Measurement helpers: latency samples and their percentiles, error
//! accounting, and the process's memory from /proc.

use leasehold_api::ApiError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Latency samples in microseconds. Every sample is kept (a few hundred
/// thousand u64s at most) so percentiles are exact rather than estimated.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// Records the time since `started`.
    pub fn since(&mut self, started: Instant) {
        self.0.push(started.elapsed().as_micros() as u64);
    }

    pub fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// Nearest-rank percentile (`p` in 0..=100); `None` without samples, which
    /// the report shows as null rather than a misleading zero.
    pub fn percentile(&mut self, p: f64) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        Some(self.0[rank.clamp(1, self.0.len()) - 1])
    }

    pub fn max(&self) -> Option<u64> {
        self.0.iter().copied().max()
    }
}

/// Errors seen in one phase. A few are printed in full so an odd run can be
/// diagnosed from its stderr; the rest are only counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Errors {
    pub total: u64,
    /// Answers with a 5xx status: the broker failed, not the request.
    pub server: u64,
    /// No answer at all (connection refused or reset, timeout).
    pub unreachable: u64,
}

/// How many errors have been printed so far, over the whole run.
static PRINTED_ERRORS: AtomicUsize = AtomicUsize::new(0);
const MAX_PRINTED_ERRORS: usize = 20;

impl Errors {
    pub fn record(&mut self, what: &str, error: &ApiError) {
        self.total += 1;
        match error {
            ApiError::Status { status, .. } if *status >= 500 => self.server += 1,
            ApiError::Unreachable { .. } => self.unreachable += 1,
            _ => {}
        }
        let printed = PRINTED_ERRORS.fetch_add(1, Ordering::Relaxed);
        if printed < MAX_PRINTED_ERRORS {
            let status = error.status().map_or("-".to_string(), |s| s.to_string());
            eprintln!("error during {what}: status {status}: {error}");
        } else if printed == MAX_PRINTED_ERRORS {
            eprintln!("(further errors are counted, not printed)");
        }
    }

    pub fn merge(&mut self, other: Errors) {
        self.total += other.total;
        self.server += other.server;
        self.unreachable += other.unreachable;
    }
}

/// Total size of the files directly in `dir` (the database, its WAL and
/// shared-memory file), in MiB.
pub fn dir_size_mib(dir: &std::path::Path) -> Option<f64> {
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(dir).ok()? {
        let metadata = entry.ok()?.metadata().ok()?;
        if metadata.is_file() {
            bytes += metadata.len();
        }
    }
    Some(round1(bytes as f64 / (1024.0 * 1024.0)))
}

pub fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies((1..=100).rev().collect());
        assert_eq!(l.percentile(50.0), Some(50));
        assert_eq!(l.percentile(99.0), Some(99));
        assert_eq!(l.percentile(100.0), Some(100));
        assert_eq!(l.percentile(0.0), Some(1));
        assert_eq!(l.max(), Some(100));
        assert_eq!(Latencies::default().percentile(50.0), None);
    }
}
