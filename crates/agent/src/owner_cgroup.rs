//! The owner's own work on an `oci` host (`--owner-cgroup PATH`): it runs
//! in a cgroup the agent manages. Its usage is measured from that cgroup
//! (memory in use, page cache included; CPU as the rate of its CPU time
//! between two samples), and what the broker guarantees is kept out of it
//! by lowering its limits: CPU at once (CFS throttling holds no state), but
//! memory one step per sample, never below the owner share, so the kernel
//! reclaims the owner's page cache gradually instead of killing its
//! processes (seed 003: why acquisition ramps). On v1 the hard limit is
//! `memory.limit_in_bytes` with `memory.soft_limit_in_bytes` at the goal
//! (reclaimed toward it under pressure); on v2 `memory.high` (throttles and
//! reclaims, never kills) and `cpu.max`; on both the owner keeps as many
//! whole cores (its `cpuset`) as its CPU limit rounds up to.

use crate::driver::cgroup::{Cgroups, CPU_PERIOD_US};
use crate::owner_load::OwnerLoadError;
use leasehold_core::reservation::Capacity;
use leasehold_core::HostCapacity;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

const MIB: u64 = 1024 * 1024;

/// The least memory step: small hosts still ramp in a few samples.
const MIN_MEMORY_STEP_MIB: u64 = 64;
/// Each sample lowers the owner's memory limit by at most the host's
/// memory over this.
const MEMORY_STEPS_PER_HOST: u64 = 16;

/// The owner's limits, CPU in centicores and memory in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerLimits {
    pub cpu_centicores: u64,
    pub memory_mib: u64,
}

/// The owner's cgroup: where it is, and what the agent last measured and
/// wrote.
pub struct OwnerCgroup {
    cgroups: Cgroups,
    /// Relative to each hierarchy's root, without a leading `/`.
    relative: String,
    state: Mutex<OwnerCgroupState>,
}

struct OwnerCgroupState {
    /// CPU time (ns) at the last measure, and when.
    cpu_mark: (u64, Instant),
    limits: OwnerLimits,
    /// Seed 004: the owner share's modules under a usage right, when the
    /// host's rights are managed; its cpuset never has more cores.
    active_modules: Option<u32>,
}

/// The limits that keep the owner out of what is lent and guaranteed, never
/// below its share.
pub fn owner_limits_goal(host: &HostCapacity, lent: Capacity, guaranteed: Capacity) -> OwnerLimits {
    let total = Capacity::new(host.cpu_centicores, host.memory_mib, host.disk_gib);
    let share = crate::owner_load::owner_share(host);
    let room = total
        .saturating_sub(lent)
        .saturating_sub(guaranteed)
        .max(share);
    OwnerLimits {
        cpu_centicores: room.cpu_centicores,
        memory_mib: room.memory_mib,
    }
}

/// The memory step for a host: a sixteenth of its memory, at least 64 MiB.
pub fn memory_step_mib(host: &HostCapacity) -> u64 {
    (host.memory_mib / MEMORY_STEPS_PER_HOST).max(MIN_MEMORY_STEP_MIB)
}

/// The next memory limit on the way from `current` to `goal`: up at once,
/// down by at most `step_mib`.
pub fn next_memory_limit_mib(current_mib: u64, goal_mib: u64, step_mib: u64) -> u64 {
    if goal_mib >= current_mib {
        return goal_mib;
    }
    current_mib.saturating_sub(step_mib).max(goal_mib)
}

/// The owner's cores: the first `n`, `n` its CPU limit rounded up to whole
/// cores (at least one, at most those online), so the cores a pool
/// guarantees are ones the owner's processes no longer run on.
/// The owner's cpuset: as many whole cores as its CPU limit rounds up to,
/// and no more than its active modules when rights are managed.
fn owner_cpus(cpu_centicores: u64, active_modules: Option<u32>) -> String {
    let limit = match active_modules {
        Some(active) => cpu_centicores.min(u64::from(active) * 100),
        None => cpu_centicores,
    };
    owner_cpuset(limit, online_cpus())
}

pub fn owner_cpuset(cpu_centicores: u64, online_cpus: u64) -> String {
    let cores = cpu_centicores.div_ceil(100).clamp(1, online_cpus.max(1));
    if cores == 1 {
        "0".to_string()
    } else {
        format!("0-{}", cores - 1)
    }
}

fn online_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// CPU time used over wall time, in centicores (100 per busy core).
pub fn cpu_rate_centicores(used_ns: u64, wall_ns: u64) -> u64 {
    if wall_ns == 0 {
        return 0;
    }
    let rate = used_ns as u128 * 100 / wall_ns as u128;
    u64::try_from(rate).unwrap_or(u64::MAX)
}

fn cgroup_error(problem: impl std::fmt::Display) -> OwnerLoadError {
    OwnerLoadError::Cgroup(problem.to_string())
}

/// A cgroup path the agent may manage: relative, plain names, no `..`.
fn checked_relative(path: &str) -> Result<String, OwnerLoadError> {
    let relative = path.trim_matches('/');
    let plain = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if relative.is_empty() || !relative.split('/').all(plain) {
        return Err(cgroup_error(format!(
            "--owner-cgroup `{path}` must be a cgroup path such as `owner` or `/owner/work` (letters, digits, `-`, `_`, `.`; no `..`)"
        )));
    }
    Ok(relative.to_string())
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write(path: &std::path::Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

impl OwnerCgroup {
    /// Makes (or adopts) the owner's cgroup at `path` in the memory and CPU
    /// hierarchies; its memory limit starts at what it is, at most the host.
    pub fn open(path: &str, host: &HostCapacity) -> Result<OwnerCgroup, OwnerLoadError> {
        let relative = checked_relative(path)?;
        let cgroups = Cgroups::detect().map_err(cgroup_error)?;
        let owner = OwnerCgroup {
            cgroups,
            relative,
            state: Mutex::new(OwnerCgroupState {
                cpu_mark: (0, Instant::now()),
                limits: OwnerLimits {
                    cpu_centicores: host.cpu_centicores,
                    memory_mib: host.memory_mib,
                },
                active_modules: None,
            }),
        };
        owner.create().map_err(cgroup_error)?;
        let memory_limit_mib = read_u64(&owner.memory_limit_file())
            .map_or(host.memory_mib, |bytes| (bytes / MIB).min(host.memory_mib));
        let mut state = owner.state();
        state.cpu_mark = (owner.cpu_usage_ns(), Instant::now());
        state.limits.memory_mib = memory_limit_mib;
        drop(state);
        Ok(owner)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OwnerCgroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The owner's directory in a hierarchy (v1: by controller).
    fn dir(&self, controller: &str) -> PathBuf {
        match &self.cgroups {
            Cgroups::V1 { mounts, .. } => mounts[controller].join(&self.relative),
            Cgroups::V2 { root } => root.join(&self.relative),
        }
    }

    fn create(&self) -> Result<(), String> {
        let mkdir = |dir: PathBuf| {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("create cgroup {}: {e}", dir.display()))
        };
        match &self.cgroups {
            Cgroups::V1 { mounts, .. } => {
                for controller in ["cpu", "cpuacct", "memory"] {
                    mkdir(self.dir(controller))?;
                }
                // A v1 cpuset group needs cpus and mems before a task may
                // join it: each new level takes its parent's.
                let mut dir = mounts["cpuset"].clone();
                for part in self.relative.split('/') {
                    let parent = dir.clone();
                    dir = dir.join(part);
                    mkdir(dir.clone())?;
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let mine = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                        if mine.trim().is_empty() {
                            let theirs =
                                std::fs::read_to_string(parent.join(file)).unwrap_or_default();
                            write(&dir.join(file), theirs.trim())?;
                        }
                    }
                }
                write(
                    &self.dir("cpu").join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )
            }
            Cgroups::V2 { root } => {
                // Each ancestor hands the cpu and memory controllers down.
                let mut dir = root.clone();
                for part in self.relative.split('/') {
                    write(&dir.join("cgroup.subtree_control"), "+cpu +cpuset +memory")?;
                    dir = dir.join(part);
                    mkdir(dir.clone())?;
                }
                Ok(())
            }
        }
    }

    fn memory_limit_file(&self) -> PathBuf {
        match &self.cgroups {
            Cgroups::V1 { .. } => self.dir("memory").join("memory.limit_in_bytes"),
            Cgroups::V2 { .. } => self.dir("memory").join("memory.high"),
        }
    }

    fn cpu_usage_ns(&self) -> u64 {
        match &self.cgroups {
            Cgroups::V1 { .. } => read_u64(&self.dir("cpuacct").join("cpuacct.usage")).unwrap_or(0),
            Cgroups::V2 { .. } => {
                let stat = std::fs::read_to_string(self.dir("cpu").join("cpu.stat"));
                stat.ok()
                    .and_then(|text| {
                        text.lines()
                            .find_map(|line| line.strip_prefix("usage_usec "))
                            .and_then(|usec| usec.trim().parse::<u64>().ok())
                    })
                    .map_or(0, |usec| usec.saturating_mul(1000))
            }
        }
    }

    /// What the owner uses now: its memory (page cache included, in MiB,
    /// rounded up) and its CPU rate since the last measure; the disk is the
    /// owner share's (a cgroup does not measure it).
    pub fn measure(&self, host: &HostCapacity) -> Capacity {
        let memory_file = match &self.cgroups {
            Cgroups::V1 { .. } => self.dir("memory").join("memory.usage_in_bytes"),
            Cgroups::V2 { .. } => self.dir("memory").join("memory.current"),
        };
        let memory_mib = read_u64(&memory_file).unwrap_or(0).div_ceil(MIB);
        let usage_ns = self.cpu_usage_ns();
        let now = Instant::now();
        let mut state = self.state();
        let (last_usage_ns, last_at) = state.cpu_mark;
        let wall_ns = u64::try_from(now.duration_since(last_at).as_nanos()).unwrap_or(u64::MAX);
        let cpu_centicores = cpu_rate_centicores(usage_ns.saturating_sub(last_usage_ns), wall_ns);
        state.cpu_mark = (usage_ns, now);
        Capacity::new(cpu_centicores, memory_mib, host.owner_share_disk_gib)
    }

    /// Seed 004: `active` of the owner share's modules are under a usage
    /// right; its cpuset shrinks or grows to as many cores (live, at most
    /// what its CPU limit allows).
    pub fn set_active_modules(&self, active: u32) -> Result<(), String> {
        let mut state = self.state();
        state.active_modules = Some(active);
        let cpus = owner_cpus(state.limits.cpu_centicores, state.active_modules);
        write(&self.dir("cpuset").join("cpuset.cpus"), &cpus)
    }

    /// The limits written now.
    pub fn limits(&self) -> OwnerLimits {
        self.state().limits
    }

    /// Moves the owner's limits toward `goal`: CPU at once, memory by one
    /// step of `step_mib` down (or at once up). A limit the kernel refuses
    /// (v1 cannot reclaim enough yet: EBUSY) stays as it was, for the next
    /// sample to try again; the refusal is returned to be logged.
    pub fn enforce(&self, goal: OwnerLimits, step_mib: u64) -> Result<OwnerLimits, String> {
        let mut state = self.state();
        let next_memory_mib =
            next_memory_limit_mib(state.limits.memory_mib, goal.memory_mib, step_mib);
        let quota_us = goal.cpu_centicores.saturating_mul(CPU_PERIOD_US) / 100;
        let memory_bytes = next_memory_mib.saturating_mul(MIB).to_string();
        match &self.cgroups {
            Cgroups::V1 { .. } => {
                write(
                    &self.dir("cpu").join("cpu.cfs_quota_us"),
                    &quota_us.to_string(),
                )?;
                state.limits.cpu_centicores = goal.cpu_centicores;
                let memory = self.dir("memory");
                let goal_bytes = goal.memory_mib.saturating_mul(MIB).to_string();
                write(&memory.join("memory.soft_limit_in_bytes"), &goal_bytes)?;
                write(&memory.join("memory.limit_in_bytes"), &memory_bytes)?;
                let cpus = owner_cpus(goal.cpu_centicores, state.active_modules);
                write(&self.dir("cpuset").join("cpuset.cpus"), &cpus)?;
            }
            Cgroups::V2 { .. } => {
                write(
                    &self.dir("cpu").join("cpu.max"),
                    &format!("{quota_us} {CPU_PERIOD_US}"),
                )?;
                state.limits.cpu_centicores = goal.cpu_centicores;
                write(&self.dir("memory").join("memory.high"), &memory_bytes)?;
                let cpus = owner_cpus(goal.cpu_centicores, state.active_modules);
                write(&self.dir("cpuset").join("cpuset.cpus"), &cpus)?;
            }
        }
        state.limits.memory_mib = next_memory_mib;
        Ok(state.limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostCapacity {
        HostCapacity {
            cpu_centicores: 400,
            memory_mib: 8192,
            disk_gib: 20,
            owner_share_cpu_centicores: 50,
            owner_share_memory_mib: 512,
            owner_share_disk_gib: 1,
        }
    }

    #[test]
    fn the_goal_keeps_the_owner_out_of_lent_and_guaranteed_capacity_but_not_its_share() {
        let lent = Capacity::new(100, 1024, 2);
        assert_eq!(
            owner_limits_goal(&host(), lent, Capacity::new(100, 3072, 0)),
            OwnerLimits {
                cpu_centicores: 200,
                memory_mib: 4096
            }
        );
        assert_eq!(
            owner_limits_goal(&host(), lent, Capacity::new(400, 8192, 0)),
            OwnerLimits {
                cpu_centicores: 50,
                memory_mib: 512
            }
        );
    }

    #[test]
    fn memory_goes_down_one_step_per_sample_and_up_at_once() {
        let step = memory_step_mib(&host());
        assert_eq!(step, 512);
        let mut limit = 8192;
        let mut seen = Vec::new();
        while limit != 6000 {
            limit = next_memory_limit_mib(limit, 6000, step);
            seen.push(limit);
        }
        assert_eq!(seen, vec![7680, 7168, 6656, 6144, 6000]);
        assert_eq!(next_memory_limit_mib(6000, 8000, step), 8000);
        // A small host still steps by 64 MiB at least.
        let small = HostCapacity {
            memory_mib: 512,
            ..host()
        };
        assert_eq!(memory_step_mib(&small), 64);
    }

    #[test]
    fn the_owner_keeps_whole_cores_for_its_cpu_limit() {
        assert_eq!(owner_cpuset(150, 8), "0-1");
        assert_eq!(owner_cpuset(200, 8), "0-1");
        assert_eq!(owner_cpuset(0, 8), "0");
        assert_eq!(owner_cpuset(1600, 4), "0-3");
    }

    #[test]
    fn the_cpu_rate_is_cpu_time_over_wall_time_in_centicores() {
        assert_eq!(cpu_rate_centicores(1_500_000_000, 1_000_000_000), 150);
        assert_eq!(cpu_rate_centicores(0, 1_000_000_000), 0);
        assert_eq!(cpu_rate_centicores(5, 0), 0, "no time passed");
        assert_eq!(cpu_rate_centicores(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn only_plain_relative_cgroup_paths_are_managed() {
        assert_eq!(checked_relative("/owner/work/").unwrap(), "owner/work");
        for bad in ["", "/", "../etc", "owner/../..", "owner work", "a//b"] {
            assert!(checked_relative(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Needs root and cgroups: makes a cgroup of its own, steps its memory
    /// limit down to the goal and back up, and removes it.
    #[test]
    fn the_owner_cgroup_is_made_measured_and_its_limits_lowered_step_by_step() {
        use std::os::unix::fs::MetadataExt;
        let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !is_root || Cgroups::detect().is_err() {
            eprintln!("skipped: managing an owner cgroup needs root and cgroups");
            return;
        }
        let path = format!("leasehold-test-owner-{}", std::process::id());
        let owner = Removed(OwnerCgroup::open(&path, &host()).unwrap());
        let owner = &owner.0;
        // Empty: no memory charged, no CPU used.
        assert_eq!(owner.measure(&host()), Capacity::new(0, 0, 1));
        let goal = owner_limits_goal(&host(), Capacity::ZERO, Capacity::new(200, 6144, 0));
        let step = memory_step_mib(&host());
        let mut written = Vec::new();
        while owner.limits() != goal {
            written.push(owner.enforce(goal, step).unwrap().memory_mib);
            let on_disk = read_u64(&owner.memory_limit_file()).unwrap();
            assert_eq!(on_disk, written.last().unwrap() * MIB);
        }
        assert_eq!(
            written,
            vec![7680, 7168, 6656, 6144, 5632, 5120, 4608, 4096, 3584, 3072, 2560, 2048]
        );
        // The owner runs on as many whole cores as its CPU limit allows.
        let cpus = std::fs::read_to_string(owner.dir("cpuset").join("cpuset.cpus")).unwrap();
        assert_eq!(
            cpus.trim(),
            owner_cpuset(goal.cpu_centicores, online_cpus())
        );
        let raised = owner_limits_goal(&host(), Capacity::ZERO, Capacity::ZERO);
        assert_eq!(owner.enforce(raised, step).unwrap().memory_mib, 8192);
        // Seed 004: with one module active the owner runs on one core, and
        // the limit comes back when its modules do.
        let cpuset = || std::fs::read_to_string(owner.dir("cpuset").join("cpuset.cpus")).unwrap();
        owner.set_active_modules(1).unwrap();
        assert_eq!(cpuset().trim(), owner_cpuset(100, online_cpus()));
        owner.set_active_modules(64).unwrap();
        assert_eq!(
            cpuset().trim(),
            owner_cpuset(raised.cpu_centicores, online_cpus())
        );
    }

    /// Needs root and cgroup v1 (this machine): the owner writes 64 MiB of
    /// file, charged to its cgroup as page cache; each lower limit makes
    /// the kernel reclaim some of it, and nothing is killed.
    #[test]
    fn the_owners_page_cache_is_reclaimed_as_its_limit_steps_down() {
        use std::os::unix::fs::MetadataExt;
        let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !is_root || !matches!(Cgroups::detect(), Ok(Cgroups::V1 { .. })) {
            eprintln!("skipped: needs root and cgroup v1");
            return;
        }
        let small = HostCapacity {
            cpu_centicores: 100,
            memory_mib: 256,
            disk_gib: 1,
            owner_share_cpu_centicores: 10,
            owner_share_memory_mib: 16,
            owner_share_disk_gib: 0,
        };
        let path = format!("leasehold-test-owner-cache-{}", std::process::id());
        let owner = Removed(OwnerCgroup::open(&path, &small).unwrap());
        let owner = &owner.0;
        let files = tempfile::tempdir().unwrap();
        let procs = owner.dir("memory").join("cgroup.procs");
        let script = format!(
            "echo $$ > {} && dd if=/dev/zero of={} bs=1M count=64 conv=fsync 2>/dev/null",
            procs.display(),
            files.path().join("data").display()
        );
        let wrote = std::process::Command::new("sh")
            .args(["-c", &script])
            .status();
        assert!(wrote.unwrap().success(), "the owner's work ran");
        let before_mib = owner.measure(&small).memory_mib;
        assert!(
            before_mib >= 64,
            "the page cache is the owner's: {before_mib} MiB"
        );
        let goal = owner_limits_goal(&small, Capacity::ZERO, Capacity::new(0, 224, 0));
        let step = memory_step_mib(&small);
        let mut usage_mib = Vec::new();
        while owner.limits() != goal {
            let limits = owner.enforce(goal, step).unwrap();
            let used = owner.measure(&small).memory_mib;
            assert!(used <= limits.memory_mib, "{used} MiB above its limit");
            usage_mib.push(used);
        }
        assert_eq!(owner.limits().memory_mib, 32);
        assert!(
            usage_mib.last().is_some_and(|used| *used <= 32),
            "{usage_mib:?}"
        );
    }

    /// Removes the test's cgroup however the test ends.
    struct Removed(OwnerCgroup);

    impl Drop for Removed {
        fn drop(&mut self) {
            let mut dirs = ["cpu", "cpuacct", "cpuset", "memory"]
                .map(|c| self.0.dir(c))
                .to_vec();
            dirs.dedup();
            for dir in dirs {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}
