//! Partition cgroups for the `oci` driver, on cgroup v1 (these machines) or
//! v2 (elsewhere). A partition is one cgroup that carries its limits (cpuset,
//! CFS quota, memory, pids); each job is a runc container in a child cgroup,
//! so the limits hold for the partition as a whole and the partition's
//! counters (CPU time, peak memory, OOM kills) measure its jobs.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// The parent of every partition cgroup.
pub const ROOT_GROUP: &str = "leasehold";

/// The limits of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLimits {
    /// Cores the partition may run on, e.g. "0,2".
    pub cpuset_cpus: String,
    /// CFS quota per 100 ms period, in microseconds.
    pub cpu_quota_us: u64,
    pub memory_bytes: u64,
    pub pids_max: u64,
}

pub const CPU_PERIOD_US: u64 = 100_000;

/// Counters of a partition cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupCounters {
    pub cpu_usage_ns: u64,
    pub peak_memory_bytes: u64,
    /// OOM kills counted in this cgroup. On v1 the kernel counts them in the
    /// victim's own (job) cgroup, which runc removes when the job ends, so
    /// there the driver also reads a SIGKILL with the partition at its
    /// memory limit as an OOM kill.
    pub oom_kills: u64,
}

#[derive(Debug, Clone)]
pub enum Cgroups {
    /// Controller name -> mount point; and every cgroup mount point (runc
    /// makes a job's cgroup in each hierarchy, so cleanup visits them all).
    V1 {
        mounts: HashMap<String, PathBuf>,
        all_mounts: Vec<PathBuf>,
    },
    V2 {
        root: PathBuf,
    },
}

const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "cpuset", "memory", "pids"];
const V2_CONTROLLERS: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
}

fn mkdir(path: &Path) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io::Error::new(
            e.kind(),
            format!("create cgroup {}: {e}", path.display()),
        )),
        _ => Ok(()),
    }
}

impl Cgroups {
    /// Finds the cgroup controllers this host offers, or says what is missing.
    pub fn detect() -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mut v1 = HashMap::new();
        let mut all_mounts = Vec::new();
        let mut v2_root = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).unwrap_or("");
            let mut right_fields = right.split_whitespace();
            let fs_type = right_fields.next().unwrap_or("");
            let super_options = right_fields.nth(1).unwrap_or("");
            match fs_type {
                "cgroup" => {
                    all_mounts.push(PathBuf::from(mount_point));
                    for option in super_options.split(',') {
                        if V1_CONTROLLERS.contains(&option) {
                            v1.insert(option.to_string(), PathBuf::from(mount_point));
                        }
                    }
                }
                "cgroup2" if mount_point == "/sys/fs/cgroup" => {
                    v2_root = Some(PathBuf::from(mount_point))
                }
                // The v2 hierarchy of a hybrid setup: runc makes cgroups there too.
                "cgroup2" => all_mounts.push(PathBuf::from(mount_point)),
                _ => {}
            }
        }
        if V1_CONTROLLERS.iter().all(|c| v1.contains_key(*c)) {
            return Ok(Cgroups::V1 {
                mounts: v1,
                all_mounts,
            });
        }
        if let Some(root) = v2_root {
            let available = read_trimmed(&root.join("cgroup.controllers")).unwrap_or_default();
            let missing: Vec<&str> = V2_CONTROLLERS
                .iter()
                .filter(|c| !available.split_whitespace().any(|a| a == **c))
                .copied()
                .collect();
            if missing.is_empty() {
                return Ok(Cgroups::V2 { root });
            }
            return Err(format!(
                "cgroup v2 lacks the controllers {}",
                missing.join(", ")
            ));
        }
        let missing: Vec<&str> = V1_CONTROLLERS
            .iter()
            .filter(|c| !v1.contains_key(**c))
            .copied()
            .collect();
        Err(format!("no usable cgroups: the v1 controllers {} are not mounted and there is no cgroup v2 at /sys/fs/cgroup", missing.join(", ")))
    }

    pub fn version(&self) -> u8 {
        match self {
            Cgroups::V1 { .. } => 1,
            Cgroups::V2 { .. } => 2,
        }
    }

    fn v1(&self, controller: &str, relative: &str) -> PathBuf {
        match self {
            Cgroups::V1 { mounts, .. } => mounts[controller].join(relative),
            Cgroups::V2 { root } => root.join(relative),
        }
    }

    /// The cgroup path runc is given for a job of this partition.
    pub fn job_path(partition_group: &str, job: &str) -> String {
        format!("/{ROOT_GROUP}/{partition_group}/{job}")
    }

    /// Creates (or updates) a partition's cgroup with its limits.
    pub fn create_partition(&self, name: &str, limits: &PartitionLimits) -> io::Result<()> {
        let relative = format!("{ROOT_GROUP}/{name}");
        match self {
            Cgroups::V1 { mounts, .. } => self.create_partition_v1(mounts, &relative, limits),
            Cgroups::V2 { root } => create_partition_v2(root, &relative, limits),
        }
    }

    fn create_partition_v1(
        &self,
        mounts: &HashMap<String, PathBuf>,
        relative: &str,
        limits: &PartitionLimits,
    ) -> io::Result<()> {
        for controller in V1_CONTROLLERS {
            mkdir(&mounts[controller].join(ROOT_GROUP))?;
            mkdir(&mounts[controller].join(relative))?;
        }
        // cpuset: a v1 cpuset cgroup must have cpus and mems before
        // anything can join it, parents included.
        let cpuset_root = &mounts["cpuset"];
        let mems = read_trimmed(&cpuset_root.join("cpuset.mems"))?;
        let all_cpus = read_trimmed(&cpuset_root.join("cpuset.cpus"))?;
        let parent = cpuset_root.join(ROOT_GROUP);
        if read_trimmed(&parent.join("cpuset.cpus"))?.is_empty() {
            write(&parent.join("cpuset.cpus"), &all_cpus)?;
        }
        if read_trimmed(&parent.join("cpuset.mems"))?.is_empty() {
            write(&parent.join("cpuset.mems"), &mems)?;
        }
        write(
            &self.v1("cpuset", relative).join("cpuset.cpus"),
            &limits.cpuset_cpus,
        )?;
        write(&self.v1("cpuset", relative).join("cpuset.mems"), &mems)?;
        let cpu = self.v1("cpu", relative);
        write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write(
            &cpu.join("cpu.cfs_quota_us"),
            &limits.cpu_quota_us.to_string(),
        )?;
        let memory = self.v1("memory", relative);
        // memsw must stay >= the memory limit, so order the writes
        // to never cross it.
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        let current: u64 = read_trimmed(&memory.join("memory.limit_in_bytes"))?
            .parse()
            .unwrap_or(u64::MAX);
        if limits.memory_bytes < current {
            write(
                &memory.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?;
            if memsw.exists() {
                write(&memsw, &limits.memory_bytes.to_string())?;
            }
        } else {
            if memsw.exists() {
                write(&memsw, &limits.memory_bytes.to_string())?;
            }
            write(
                &memory.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?;
        }
        write(
            &self.v1("pids", relative).join("pids.max"),
            &limits.pids_max.to_string(),
        )?;
        Ok(())
    }

    /// Sets, live, the cores a partition's processes run on: its cgroup's
    /// cpuset and its jobs' (seed 004's activation). A child's cpuset must
    /// stay within its parent's, so the jobs change first when the set
    /// shrinks and last when it grows. Nothing to do for a partition that
    /// is not built.
    pub fn set_cpus(&self, name: &str, cpus: &str) -> io::Result<()> {
        let relative = format!("{ROOT_GROUP}/{name}");
        let partition = self.v1("cpuset", &relative);
        if !partition.exists() {
            return Ok(());
        }
        let jobs: Vec<PathBuf> = std::fs::read_dir(&partition)?
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .map(|entry| entry.path())
            .collect();
        let current = read_trimmed(&partition.join("cpuset.cpus"))?;
        let shrinking = cpu_count(cpus) < cpu_count(&current);
        if !shrinking {
            write(&partition.join("cpuset.cpus"), cpus)?;
        }
        for job in &jobs {
            // A job may end (and its cgroup go) meanwhile.
            let _ = write(&job.join("cpuset.cpus"), cpus);
        }
        if shrinking {
            write(&partition.join("cpuset.cpus"), cpus)?;
        }
        Ok(())
    }

    /// Resets the peak-memory mark before a job (v1; on v2 a reset needs a
    /// recent kernel, and is tried).
    pub fn reset_peak(&self, name: &str) {
        let relative = format!("{ROOT_GROUP}/{name}");
        match self {
            Cgroups::V1 { .. } => {
                let _ = write(
                    &self
                        .v1("memory", &relative)
                        .join("memory.max_usage_in_bytes"),
                    "0",
                );
            }
            Cgroups::V2 { root } => {
                let _ = write(&root.join(&relative).join("memory.peak"), "0");
            }
        }
    }

    pub fn counters(&self, name: &str) -> CgroupCounters {
        let relative = format!("{ROOT_GROUP}/{name}");
        match self {
            Cgroups::V1 { .. } => CgroupCounters {
                cpu_usage_ns: read_trimmed(&self.v1("cpuacct", &relative).join("cpuacct.usage"))
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                peak_memory_bytes: read_trimmed(
                    &self
                        .v1("memory", &relative)
                        .join("memory.max_usage_in_bytes"),
                )
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
                oom_kills: read_keyed(
                    &self.v1("memory", &relative).join("memory.oom_control"),
                    "oom_kill",
                )
                .unwrap_or(0),
            },
            Cgroups::V2 { root } => {
                let group = root.join(&relative);
                CgroupCounters {
                    cpu_usage_ns: read_keyed(&group.join("cpu.stat"), "usage_usec").unwrap_or(0)
                        * 1000,
                    peak_memory_bytes: read_trimmed(&group.join("memory.peak"))
                        .or_else(|_| read_trimmed(&group.join("memory.current")))
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                    oom_kills: read_keyed(&group.join("memory.events"), "oom_kill").unwrap_or(0),
                }
            }
        }
    }

    /// What a partition uses now: its CPU time and the memory charged to
    /// it, read from its cgroup at the time of asking; `None` when the
    /// partition has no cgroup (not built, or wiped).
    pub fn usage(&self, name: &str) -> Option<super::PartitionUsage> {
        let relative = format!("{ROOT_GROUP}/{name}");
        let read_number = |path: PathBuf| -> Option<u64> { read_trimmed(&path).ok()?.parse().ok() };
        match self {
            Cgroups::V1 { .. } => Some(super::PartitionUsage {
                cpu_usage_ns: read_number(self.v1("cpuacct", &relative).join("cpuacct.usage"))?,
                memory_bytes: read_number(
                    self.v1("memory", &relative).join("memory.usage_in_bytes"),
                )?,
            }),
            Cgroups::V2 { root } => {
                let group = root.join(&relative);
                Some(super::PartitionUsage {
                    cpu_usage_ns: read_keyed(&group.join("cpu.stat"), "usage_usec")? * 1000,
                    memory_bytes: read_number(group.join("memory.current"))?,
                })
            }
        }
    }

    /// Removes a partition's cgroup (and any job cgroups left in it).
    pub fn remove_partition(&self, name: &str) -> io::Result<()> {
        let relative = format!("{ROOT_GROUP}/{name}");
        let dirs: Vec<PathBuf> = match self {
            Cgroups::V1 { all_mounts, .. } => {
                all_mounts.iter().map(|m| m.join(&relative)).collect()
            }
            Cgroups::V2 { root } => vec![root.join(&relative)],
        };
        for dir in dirs {
            if !dir.exists() {
                continue;
            }
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    if child.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
            }
            std::fs::remove_dir(&dir).map_err(|e| {
                io::Error::new(e.kind(), format!("remove cgroup {}: {e}", dir.display()))
            })?;
        }
        Ok(())
    }

    /// The partition cgroups that exist now (to reconcile after a restart).
    pub fn partition_groups(&self) -> Vec<String> {
        let dir = match self {
            Cgroups::V1 { mounts, .. } => mounts["memory"].join(ROOT_GROUP),
            Cgroups::V2 { root } => root.join(ROOT_GROUP),
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }
}

/// Creates (or updates) a partition's cgroup on cgroup v2.
fn create_partition_v2(root: &Path, relative: &str, limits: &PartitionLimits) -> io::Result<()> {
    let enable = V2_CONTROLLERS
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    write(&root.join("cgroup.subtree_control"), &enable)?;
    mkdir(&root.join(ROOT_GROUP))?;
    write(
        &root.join(ROOT_GROUP).join("cgroup.subtree_control"),
        &enable,
    )?;
    let group = root.join(relative);
    mkdir(&group)?;
    write(&group.join("cpuset.cpus"), &limits.cpuset_cpus)?;
    write(
        &group.join("cpu.max"),
        &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
    )?;
    write(&group.join("memory.max"), &limits.memory_bytes.to_string())?;
    let _ = write(&group.join("memory.swap.max"), "0");
    write(&group.join("pids.max"), &limits.pids_max.to_string())?;
    // Jobs are children: the partition itself holds no processes.
    write(&group.join("cgroup.subtree_control"), &enable)?;
    Ok(())
}

/// How many CPUs a cpuset list names ("0-3,6" is 5).
pub fn cpu_count(list: &str) -> usize {
    list.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| match part.trim().split_once('-') {
            Some((from, to)) => match (from.parse::<usize>(), to.parse::<usize>()) {
                (Ok(from), Ok(to)) if to >= from => to - from + 1,
                _ => 0,
            },
            None => 1,
        })
        .sum()
}

#[cfg(test)]
mod usage_tests {
    use super::*;
    use crate::driver::PartitionUsage;

    fn write_file(path: PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn v2_usage_reads_cpu_time_and_current_memory_and_none_without_a_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let cgroups = Cgroups::V2 {
            root: root.path().to_path_buf(),
        };
        assert_eq!(cgroups.usage("agent-p1"), None);
        let group = root.path().join(ROOT_GROUP).join("agent-p1");
        write_file(group.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n");
        write_file(group.join("memory.current"), "4096\n");
        let expected = PartitionUsage {
            cpu_usage_ns: 1_500_000,
            memory_bytes: 4096,
        };
        assert_eq!(cgroups.usage("agent-p1"), Some(expected));
    }

    #[test]
    fn v1_usage_reads_cpuacct_and_the_memory_controller() {
        let root = tempfile::tempdir().unwrap();
        let mounts: HashMap<String, PathBuf> = ["cpuacct", "memory"]
            .map(|name| (name.to_string(), root.path().join(name)))
            .into();
        let cgroups = Cgroups::V1 {
            mounts,
            all_mounts: Vec::new(),
        };
        assert_eq!(cgroups.usage("agent-p2"), None);
        let relative = format!("{ROOT_GROUP}/agent-p2");
        let cpuacct = root.path().join("cpuacct").join(&relative);
        write_file(cpuacct.join("cpuacct.usage"), "2000000000\n");
        let memory = root.path().join("memory").join(&relative);
        write_file(memory.join("memory.usage_in_bytes"), "8192\n");
        let expected = PartitionUsage {
            cpu_usage_ns: 2_000_000_000,
            memory_bytes: 8192,
        };
        assert_eq!(cgroups.usage("agent-p2"), Some(expected));
    }
}
