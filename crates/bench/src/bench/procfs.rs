//! What the kernel says about a process and the machine: CPU time, memory,
//! and how the machine's CPUs spent a run (busy, waiting on the disk).

use std::collections::BTreeMap;

/// Clock ticks per second of /proc's CPU times. Linux fixes USER_HZ at 100
/// in its user-space ABI on every architecture we run on, so no sysconf call
/// (and no unsafe code) is needed.
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU time of process `pid` (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds of process `root` and its direct children (PostgreSQL's
/// postmaster and its backends, checkpointer and WAL writer).
pub fn process_and_children_cpu_seconds(root: u32) -> Option<f64> {
    let mut total = cpu_seconds(root)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent's pid is the second field after the command name.
        let parent = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(root) {
            total += stat_cpu_seconds(&stat).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// CPU seconds of each kind of thread of process `pid`, by thread name
/// (the broker's `leasehold-write` writer, its `tokio-rt-worker`s), so a
/// run can say whether the single writer is the one that is saturated.
pub fn cpu_seconds_by_thread_name(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some(seconds) = stat_cpu_seconds(&stat) {
            *by_name.entry(name.trim().to_string()).or_insert(0.0) += seconds;
        }
    }
    by_name
}

/// utime + stime of a /proc `stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
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

/// The broker's and the machine's CPU counters at one moment.
pub struct BrokerSample {
    at: std::time::Instant,
    cpu_seconds: Option<f64>,
    /// The database server's processes (a throw-away PostgreSQL's).
    database_cpu_seconds: Option<f64>,
    threads: BTreeMap<String, f64>,
    machine: MachineTicks,
}

/// CPU use between two samples, in percent of one core (200 = both cores
/// of this machine).
#[derive(Debug, serde::Serialize)]
pub struct Usage {
    #[serde(skip)]
    pub seconds: f64,
    pub broker_cpu_percent: Option<f64>,
    /// The PostgreSQL server's processes (null for SQLite, inside the
    /// broker, or a database the benchmark did not start).
    pub database_cpu_percent: Option<f64>,
    /// By thread name: `leasehold-write` is the single writer (at 100 it is
    /// CPU-bound), `tokio-rt-worker` the HTTP handlers.
    pub broker_thread_cpu_percent: BTreeMap<String, f64>,
    /// All CPUs of the machine: busy, and idle waiting on I/O.
    pub machine_busy_percent: f64,
    pub machine_iowait_percent: f64,
}

impl BrokerSample {
    pub fn take(pid: u32, database_pid: Option<u32>) -> BrokerSample {
        BrokerSample {
            at: std::time::Instant::now(),
            cpu_seconds: cpu_seconds(pid),
            database_cpu_seconds: database_pid.and_then(process_and_children_cpu_seconds),
            threads: cpu_seconds_by_thread_name(pid),
            machine: MachineTicks::now(),
        }
    }

    pub fn usage_since(&self, earlier: &BrokerSample) -> Usage {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let percent = |cpu: f64| crate::stats::round1(100.0 * cpu / seconds);
        let (machine_busy_percent, machine_iowait_percent) =
            self.machine.busy_and_iowait_percent_since(&earlier.machine);
        Usage {
            seconds,
            broker_cpu_percent: self
                .cpu_seconds
                .zip(earlier.cpu_seconds)
                .map(|(now, then)| percent(now - then)),
            database_cpu_percent: self
                .database_cpu_seconds
                .zip(earlier.database_cpu_seconds)
                .map(|(now, then)| percent(now - then)),
            broker_thread_cpu_percent: self
                .threads
                .iter()
                .map(|(name, now)| {
                    let then = earlier.threads.get(name).copied().unwrap_or(0.0);
                    (name.clone(), percent(now - then))
                })
                .filter(|(_, p)| *p > 0.0)
                .collect(),
            machine_busy_percent,
            machine_iowait_percent,
        }
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
        let threads = cpu_seconds_by_thread_name(pid);
        assert!(!threads.is_empty(), "a live process has threads");
        assert!(threads.values().all(|s| *s >= 0.0));
        assert!(cpu_seconds_by_thread_name(u32::MAX).is_empty());
        // This test's process has no children: its tree is itself.
        let tree = process_and_children_cpu_seconds(pid).unwrap();
        assert!(tree >= cpu_seconds(pid).unwrap() - 0.05, "{tree}");
        assert!(process_and_children_cpu_seconds(u32::MAX).is_none());
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
