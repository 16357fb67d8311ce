//! The forecast of FIG. 14: from a host's recent samples, how fast capacity
//! frees up there, when a demand's target would be reached, and the largest
//! guarantee reachable by a given time.
//!
//! The trend is the rise from the oldest to the newest sample of the window,
//! per resource, never negative: capacity that shrinks gives no gain, so a
//! falling host forecasts "not on this trend" rather than a negative time.

use super::capacity::Capacity;
use super::SampleWindow;

/// A host's capacity for one demand and how it grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlook {
    pub now_ms: u64,
    /// What the demand could hold on the host now: available less what
    /// other pools hold there (its own acquisition included).
    pub ceiling_now: Capacity,
    /// The most it could ever hold there: the host's lendable capacity less
    /// lent partitions and other pools.
    pub room: Capacity,
    /// Gain of the ceiling per planning interval.
    pub gain_per_interval: Capacity,
    /// What the demand already holds there.
    pub acquired: Capacity,
    /// The ramp's step per interval.
    pub step: Capacity,
    pub interval_ms: u64,
}

/// Per resource, the gain per `interval_ms` over the window.
pub fn gain_per_interval(window: &SampleWindow, interval_ms: u64) -> Capacity {
    let (Some(oldest), Some(newest)) = (window.samples.front(), window.samples.back()) else {
        return Capacity::ZERO;
    };
    let span_ms = newest.at_ms.saturating_sub(oldest.at_ms);
    if span_ms == 0 {
        return Capacity::ZERO;
    }
    let rise = newest.available.saturating_sub(oldest.available);
    let per = |value: u64| -> u64 {
        ((u128::from(value) * u128::from(interval_ms.max(1))) / u128::from(span_ms)) as u64
    };
    Capacity::new(
        per(rise.cpu_centicores),
        per(rise.memory_mib),
        per(rise.disk_gib),
    )
}

fn div_ceil(value: u64, by: u64) -> u64 {
    value.div_ceil(by.max(1))
}

impl Outlook {
    /// When the demand's whole `target` would be held, or `None` when the
    /// host is too small or capacity does not free up fast enough ever.
    pub fn completion_ms(&self, target: Capacity) -> Option<u64> {
        if !target.fits_in(self.room) {
            return None;
        }
        let mut intervals_needed = 0u64;
        for (((_, want), (_, ceiling)), ((_, gain), ((_, held), (_, step)))) in target
            .named()
            .into_iter()
            .zip(self.ceiling_now.named())
            .zip(
                self.gain_per_interval
                    .named()
                    .into_iter()
                    .zip(self.acquired.named().into_iter().zip(self.step.named())),
            )
        {
            if want <= held {
                continue;
            }
            let for_capacity = if want <= ceiling {
                0
            } else if gain == 0 {
                return None;
            } else {
                div_ceil(want - ceiling, gain)
            };
            // The first step is taken now, so n steps end after n-1 intervals.
            let for_steps = div_ceil(want - held, step).saturating_sub(1);
            intervals_needed = intervals_needed.max(for_capacity).max(for_steps);
        }
        Some(
            self.now_ms
                .saturating_add(intervals_needed.saturating_mul(self.interval_ms)),
        )
    }

    /// The largest guarantee reachable by `at_ms` (never above `target`).
    pub fn reachable_by(&self, target: Capacity, at_ms: u64) -> Capacity {
        let intervals = at_ms.saturating_sub(self.now_ms) / self.interval_ms.max(1);
        let by_capacity = self
            .ceiling_now
            .saturating_add(scale(self.gain_per_interval, intervals));
        let by_steps = self
            .acquired
            .saturating_add(scale(self.step, intervals + 1));
        target
            .min(self.room)
            .min(by_capacity)
            .min(by_steps)
            .max(self.acquired.min(target))
    }
}

fn scale(capacity: Capacity, times: u64) -> Capacity {
    Capacity::new(
        capacity.cpu_centicores.saturating_mul(times),
        capacity.memory_mib.saturating_mul(times),
        capacity.disk_gib.saturating_mul(times),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::HostSample;

    fn window(points: &[(u64, u64)]) -> SampleWindow {
        let mut window = SampleWindow::default();
        for &(at_ms, memory_mib) in points {
            window.push(HostSample {
                at_ms,
                owner_used: Capacity::ZERO,
                available: Capacity::new(400, memory_mib, 10),
            });
        }
        window
    }

    #[test]
    fn gain_is_the_rise_over_the_window_per_interval() {
        let w = window(&[(0, 1024), (4_000, 2048), (8_000, 3072)]);
        assert_eq!(gain_per_interval(&w, 1_000), Capacity::new(0, 256, 0));
        let falling = window(&[(0, 3072), (8_000, 1024)]);
        assert_eq!(gain_per_interval(&falling, 1_000), Capacity::ZERO);
    }

    fn outlook(ceiling: u64, gain: u64, acquired: u64, step: u64) -> Outlook {
        Outlook {
            now_ms: 10_000,
            ceiling_now: Capacity::new(400, ceiling, 10),
            room: Capacity::new(400, 7680, 10),
            gain_per_interval: Capacity::new(0, gain, 0),
            acquired: Capacity::new(0, acquired, 0),
            step: Capacity::new(400, step, 10),
            interval_ms: 1_000,
        }
    }

    #[test]
    fn completion_waits_for_capacity_and_for_the_steps() {
        let target = Capacity::new(100, 6144, 1);
        // 4096 short at 256 per interval: 16 intervals.
        assert_eq!(
            outlook(2048, 256, 0, 8192).completion_ms(target),
            Some(26_000)
        );
        // Free now, but steps of 1024 from 2048: 4 steps, 3 intervals.
        assert_eq!(
            outlook(8000, 0, 2048, 1024).completion_ms(target),
            Some(13_000)
        );
        assert_eq!(outlook(2048, 0, 0, 8192).completion_ms(target), None);
        let too_big = Capacity::new(100, 9000, 1);
        assert_eq!(outlook(9000, 256, 0, 9000).completion_ms(too_big), None);
    }

    #[test]
    fn reachable_by_is_bounded_by_trend_steps_room_and_target() {
        let target = Capacity::new(100, 6144, 1);
        let o = outlook(2048, 256, 1024, 8192);
        assert_eq!(o.reachable_by(target, 14_000).memory_mib, 3072);
        assert_eq!(o.reachable_by(target, 100_000).memory_mib, 6144);
        assert_eq!(
            outlook(2048, 256, 0, 512)
                .reachable_by(target, 12_000)
                .memory_mib,
            1536
        );
    }
}
