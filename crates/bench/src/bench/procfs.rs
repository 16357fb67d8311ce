//! What the kernel says about a process and the machine: CPU time, memory,
//! and how the machine's CPUs spent a run (busy, waiting on the disk).

/// Clock ticks per second of /proc's CPU times. Linux fixes USER_HZ at 100
/// in its user-space ABI on every architecture we run on, so no sysconf call
/// (and no unsafe code) is needed.
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU time of process `pid` (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after
    // the last ')' are fixed: state is field 3, utime 14 and stime 15.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// A `Vm*` field of /proc/PID/status (`VmRSS`, `VmHWM`) in MiB, rounded to
/// 0.1 MiB; `pid` may be "self".
pub fn status_mib(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: f64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(crate::stats::round1(kib / 1024.0))
}

/// The machine's CPU time counters from the first line of /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTicks {
    total: u64,
    idle: u64,
    iowait: u64,
}

impl MachineTicks {
    pub fn now() -> MachineTicks {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let numbers: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|n| n.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already counted in user).
        let total = numbers.iter().take(8).sum();
        MachineTicks {
            total,
            idle: numbers.get(3).copied().unwrap_or(0),
            iowait: numbers.get(4).copied().unwrap_or(0),
        }
    }

    /// Percent of all CPUs' time since `earlier` that was busy, and that was
    /// idle waiting for the disk.
    pub fn busy_and_iowait_percent_since(&self, earlier: &MachineTicks) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let idle = self.idle.saturating_sub(earlier.idle) as f64;
        let iowait = self.iowait.saturating_sub(earlier.iowait) as f64;
        let busy = total - idle - iowait;
        (
            crate::stats::round1(100.0 * busy / total),
            crate::stats::round1(100.0 * iowait / total),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time_and_memory() {
        // Burn a little CPU so the counter is not trivially zero forever.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed().as_millis() < 30 {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(cpu_seconds(u32::MAX).is_none());
        assert!(status_mib("self", "VmRSS").unwrap() > 0.0);
        assert!(status_mib(&pid.to_string(), "VmHWM").unwrap() > 0.0);
        assert!(status_mib("self", "NoSuchField").is_none());
    }

    #[test]
    fn machine_percentages_stay_in_range() {
        let before = MachineTicks::now();
        assert!(before.total > 0);
        let after = MachineTicks::now();
        let (busy, iowait) = after.busy_and_iowait_percent_since(&before);
        assert!((0.0..=100.0).contains(&busy), "busy {busy}");
        assert!((0.0..=100.0).contains(&iowait), "iowait {iowait}");
    }
}
