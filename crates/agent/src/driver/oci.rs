//! The `oci` driver: every partition is isolated with real kernel mechanisms.
//!
//! A partition is a cgroup with its limits (a cpuset of dedicated cores while
//! cores suffice, a CFS quota for the CPU cap, a hard memory limit without
//! swap, a pids limit) and a size-limited ext4 filesystem (a sparse image on
//! a loop device) that holds its `/work` directory between the jobs of one
//! lease. Each job is an OCI container run by `runc` in a child cgroup: its
//! own PID, mount, network (loopback only), UTS and IPC namespaces, the
//! image's root filesystem read-only, a writable `/work` and `/tmp`, an
//! unprivileged user with no capabilities, no new privileges, and a seccomp
//! profile that refuses mount, module loading, ptrace, keyctl, bpf and the
//! like. Wiping a partition removes its containers, cgroup, mount and files.

use super::cgroup::{Cgroups, PartitionLimits, CPU_PERIOD_US};
use super::{BoxFuture, DriverError, JobEnd, JobOutcome, JobSpec, PartitionDriver, PartitionSpec};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The user jobs run as inside their container.
const JOB_UID: u32 = 65534;
const JOB_GID: u32 = 65534;
/// Processes a partition may have at once.
pub const PIDS_PER_PARTITION: u64 = 256;
/// Size of each job's /tmp (it counts against the partition's memory).
const TMP_SIZE_MIB: u64 = 64;

/// Where the driver finds an image's unpacked root filesystem.
pub trait ImageSource: Send + Sync + 'static {
    /// The images this host offers.
    fn names(&self) -> Vec<String>;
    /// The root filesystem of `name`, fetched and unpacked if needed.
    fn rootfs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<PathBuf, DriverError>>;
}

pub struct OciDriver {
    root_dir: PathBuf,
    /// runc's state directory for this agent's containers.
    state_dir: PathBuf,
    /// A prefix unique to this agent, so two agents on one machine never
    /// share a container id or a cgroup.
    instance: String,
    cgroups: Cgroups,
    images: Arc<dyn ImageSource>,
    cores: Vec<u32>,
    /// Cores given to each partition.
    core_assignments: Mutex<HashMap<u32, Vec<u32>>>,
    job_counter: std::sync::atomic::AtomicU64,
}

fn run_quiet(program: &str, args: &[&str]) -> Result<String, String> {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn parse_cpu_list(text: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<u32>().ok()),
        }
    }
    cpus
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// The system calls a job may never make: mounting, loading kernel code,
/// tracing other processes, the kernel keyring, BPF, new namespaces, the
/// clock and the like. Everything else is allowed.
fn denied_syscalls() -> Vec<&'static str> {
    vec![
        "mount",
        "umount",
        "umount2",
        "pivot_root",
        "chroot",
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "kexec_file_load",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "perf_event_open",
        "swapon",
        "swapoff",
        "reboot",
        "setns",
        "unshare",
        "open_by_handle_at",
        "name_to_handle_at",
        "syslog",
        "acct",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "adjtimex",
        "userfaultfd",
        "iopl",
        "ioperm",
        "quotactl",
        "lookup_dcookie",
        "kcmp",
        "fanotify_init",
        "sethostname",
        "setdomainname",
        "fsopen",
        "fsmount",
        "fsconfig",
        "fspick",
        "move_mount",
        "open_tree",
        "mount_setattr",
        "personality",
        "vhangup",
        "nfsservctl",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "uselib",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "ustat",
        "sysfs",
        "_sysctl",
    ]
}

/// Namespace flags of clone(2): a job may not make namespaces (a new user
/// namespace would hand it a full set of capabilities inside it).
const CLONE_NAMESPACE_FLAGS: [u64; 8] = [
    0x0000_0080, // CLONE_NEWTIME
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The seccomp rules: the denied calls fail with EPERM; clone with any
/// namespace flag fails with EPERM; clone3, whose flags seccomp cannot read,
/// fails with ENOSYS so that libc falls back to clone, which is checked.
fn seccomp_rules() -> serde_json::Value {
    let mut rules = vec![
        json!({"names": denied_syscalls(), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        rules.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]
        }));
    }
    serde_json::Value::Array(rules)
}

/// Checks that this host can run the `oci` driver; the reason when not.
pub fn probe() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the oci driver needs root (cgroups, loop mounts, runc)".into());
    }
    run_quiet("runc", &["--version"])
        .map_err(|e| format!("runc is not usable ({e}); apt-get install runc"))?;
    run_quiet("mkfs.ext4", &["-V"])
        .map_err(|e| format!("mkfs.ext4 is not usable ({e}); apt-get install e2fsprogs"))?;
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control: loop devices are needed for partition disks".into());
    }
    Cgroups::detect().map(|_| ())
}

impl OciDriver {
    pub fn new(
        root_dir: PathBuf,
        instance: String,
        images: Arc<dyn ImageSource>,
    ) -> Result<Self, String> {
        probe()?;
        let cgroups = Cgroups::detect()?;
        let cores = std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.cpus")
            .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/cpuset.cpus.effective"))
            .map(|t| parse_cpu_list(&t))
            .unwrap_or_default();
        let cores = if cores.is_empty() {
            (0..std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1))
                .collect()
        } else {
            cores
        };
        std::fs::create_dir_all(root_dir.join("runc"))
            .map_err(|e| format!("create {}: {e}", root_dir.display()))?;
        // Absolute, because mount points are compared with /proc/self/mountinfo.
        let root_dir = std::fs::canonicalize(&root_dir)
            .map_err(|e| format!("resolve {}: {e}", root_dir.display()))?;
        let state_dir = root_dir.join("runc");
        Ok(OciDriver {
            root_dir,
            state_dir,
            instance,
            cgroups,
            images,
            cores,
            core_assignments: Mutex::new(HashMap::new()),
            job_counter: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn partition_dir(&self, index: u32) -> PathBuf {
        self.root_dir.join(format!("partition-{index}"))
    }

    fn group_name(&self, index: u32) -> String {
        format!("{}-p{index}", self.instance)
    }

    fn container_prefix(&self, index: u32) -> String {
        format!("lh-{}-p{index}-", self.instance)
    }

    fn runc(&self, args: &[&str]) -> Result<String, String> {
        let state = self.state_dir.display().to_string();
        let mut all = vec!["--root", state.as_str()];
        all.extend_from_slice(args);
        run_quiet("runc", &all)
    }

    /// Gives a partition `count` cores, preferring the least shared ones, so
    /// partitions do not share cores while there are enough.
    fn assign_cores(&self, index: u32, count: u32) -> Vec<u32> {
        let mut assignments = self
            .core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A partition keeps its cores for as long as it has them.
        if let Some(cores) = assignments.get(&index) {
            if cores.len() == count.max(1) as usize {
                return cores.clone();
            }
        }
        assignments.remove(&index);
        let mut load: Vec<(usize, u32)> = self
            .cores
            .iter()
            .map(|core| {
                (
                    assignments.values().filter(|cs| cs.contains(core)).count(),
                    *core,
                )
            })
            .collect();
        load.sort();
        let mut chosen: Vec<u32> = load
            .iter()
            .take(count.max(1) as usize)
            .map(|(_, c)| *c)
            .collect();
        chosen.sort();
        assignments.insert(index, chosen.clone());
        chosen
    }

    fn release_cores(&self, index: u32) {
        self.core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
    }

    fn limits(&self, partition: &PartitionSpec) -> PartitionLimits {
        let cores = self.assign_cores(partition.index, partition.terms.vcpus);
        // The quota is what the terms promise (vCPUs x cap), never more than
        // the cores the partition may run on.
        let promised =
            partition.terms.vcpus as u64 * partition.terms.cpu_cap_percent as u64 * CPU_PERIOD_US
                / 100;
        let ceiling = cores.len() as u64 * CPU_PERIOD_US;
        PartitionLimits {
            cpuset_cpus: cores
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
            cpu_quota_us: promised.min(ceiling).max(1000),
            memory_bytes: partition.terms.memory_mib.saturating_mul(1024 * 1024),
            pids_max: PIDS_PER_PARTITION,
        }
    }

    /// Makes sure the partition's disk is mounted and its cgroup exists;
    /// after an agent restart both are recreated from what is on disk.
    fn ensure_ready(&self, partition: &PartitionSpec) -> Result<PathBuf, DriverError> {
        let fail = |problem: String| DriverError::Build {
            index: partition.index,
            problem,
        };
        let dir = self.partition_dir(partition.index);
        let image = dir.join("disk.img");
        let mount_point = dir.join("disk");
        std::fs::create_dir_all(&mount_point)
            .map_err(|e| fail(format!("create {}: {e}", mount_point.display())))?;
        if !image.exists() {
            let partial = dir.join("disk.img.partial");
            let file = std::fs::File::create(&partial)
                .map_err(|e| fail(format!("create {}: {e}", partial.display())))?;
            file.set_len(partition.terms.disk_gib.saturating_mul(1024 * 1024 * 1024))
                .map_err(|e| fail(format!("size {}: {e}", partial.display())))?;
            drop(file);
            let partial_text = partial.display().to_string();
            run_quiet(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-E",
                    &format!("root_owner={JOB_UID}:{JOB_GID}"),
                    &partial_text,
                ],
            )
            .map_err(fail)?;
            std::fs::rename(&partial, &image)
                .map_err(|e| fail(format!("rename {}: {e}", partial.display())))?;
        }
        if !mounts_under(&mount_point).contains(&mount_point) {
            let image_text = image.display().to_string();
            let mount_text = mount_point.display().to_string();
            run_quiet(
                "mount",
                &["-o", "loop,nosuid,nodev", &image_text, &mount_text],
            )
            .map_err(fail)?;
        }
        let work = mount_point.join("work");
        if !work.exists() {
            std::fs::create_dir(&work)
                .map_err(|e| fail(format!("create {}: {e}", work.display())))?;
            std::os::unix::fs::chown(&work, Some(JOB_UID), Some(JOB_GID))
                .map_err(|e| fail(format!("chown {}: {e}", work.display())))?;
        }
        self.cgroups
            .create_partition(&self.group_name(partition.index), &self.limits(partition))
            .map_err(|e| fail(e.to_string()))?;
        Ok(work)
    }

    fn config(
        &self,
        rootfs: &Path,
        work: &Path,
        command: &[String],
        cgroup_path: &str,
        hostname: &str,
    ) -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": JOB_UID, "gid": JOB_GID, "additionalGids": []},
                "args": command,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/work", "TERM=dumb"],
                "cwd": "/work",
                "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}, {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
                "noNewPrivileges": true
            },
            "root": {"path": rootfs, "readonly": true},
            "hostname": hostname,
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", TMP_SIZE_MIB)]},
                {"destination": "/work", "type": "bind", "source": work, "options": ["rbind", "rw", "nosuid", "nodev"]}
            ],
            "linux": {
                "cgroupsPath": cgroup_path,
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                                "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                "seccomp": {
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
                    "syscalls": seccomp_rules()
                }
            }
        })
    }

    async fn run(&self, job: JobSpec) -> Result<JobOutcome, DriverError> {
        let index = job.partition.index;
        let work = self.ensure_ready(&job.partition)?;
        let image = match &job.image {
            Some(image) => image.clone(),
            None => job
                .partition
                .terms
                .images
                .first()
                .cloned()
                .unwrap_or_default(),
        };
        let rootfs = self.images.rootfs(&image).await?;
        // runc resolves a relative root against the bundle: make it absolute.
        let rootfs = std::fs::canonicalize(&rootfs).map_err(|e| {
            DriverError::Image(format!("image '{image}' at {}: {e}", rootfs.display()))
        })?;
        let sequence = self
            .job_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!(
            "{}{}-{sequence}",
            self.container_prefix(index),
            std::process::id()
        );
        let bundle = self.partition_dir(index).join("bundles").join(&id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| DriverError::Start(format!("create {}: {e}", bundle.display())))?;
        let group = self.group_name(index);
        let config = self.config(
            &rootfs,
            &work,
            &job.command,
            &Cgroups::job_path(&group, &id),
            &format!("partition-{index}"),
        );
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).expect("config serializes"),
        )
        .map_err(|e| DriverError::Start(format!("write config.json: {e}")))?;
        self.cgroups.reset_peak(&group);
        let before = self.cgroups.counters(&group);
        let started = Instant::now();
        let mut child = match tokio::process::Command::new("runc")
            .arg("--root")
            .arg(&self.state_dir)
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(DriverError::Start(format!("cannot run runc: {error}")));
            }
        };
        let ended = match super::supervise(&mut child, &job).await {
            super::Supervised::Finished(status, out, err) => {
                status.map(|status| (JobEnd::Exited(status.code().unwrap_or(-1)), out, err))
            }
            super::Supervised::Stop(end) => {
                let _ = self.runc(&["kill", &id, "KILL"]);
                let _ = child.wait().await;
                Ok((end, Vec::new(), Vec::new()))
            }
        };
        let wall_ms = started.elapsed().as_millis() as u64;
        // The container and its bundle go whatever happened above.
        let _ = self.runc(&["delete", "--force", &id]);
        let _ = std::fs::remove_dir_all(&bundle);
        let (end, out, err) =
            ended.map_err(|e| DriverError::Start(format!("wait for runc: {e}")))?;
        let after = self.cgroups.counters(&group);
        // Nobody but the kernel sends SIGKILL to a job we did not stop; with
        // the partition's memory at its limit, that is the OOM killer.
        let limit = job.partition.terms.memory_mib.saturating_mul(1024 * 1024);
        let at_limit = after.peak_memory_bytes.saturating_add(1024 * 1024) >= limit;
        let oom_killed = after.oom_kills > before.oom_kills
            || (end == JobEnd::Exited(128 + libc::SIGKILL) && at_limit);
        Ok(JobOutcome {
            cpu_ms: Some(after.cpu_usage_ns.saturating_sub(before.cpu_usage_ns) / 1_000_000),
            peak_memory_bytes: Some(after.peak_memory_bytes),
            oom_killed,
            ..JobOutcome::captured(end, &out, &err, wall_ms)
        })
    }

    /// Deletes this agent's containers, unmounts its partition disks and
    /// removes its cgroups: what a crash may have left behind. Disk images
    /// stay, so a leased partition gets its files back at its next job.
    fn reconcile_now(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Ok(list) = self.runc(&["list", "-q"]) {
            for id in list
                .lines()
                .map(str::trim)
                .filter(|id| id.starts_with(&format!("lh-{}-", self.instance)))
            {
                match self.runc(&["delete", "--force", id]) {
                    Ok(_) => notes.push(format!("deleted leftover container {id}")),
                    Err(e) => notes.push(format!("could not delete leftover container {id}: {e}")),
                }
            }
        }
        for mount in mounts_under(&self.root_dir) {
            let text = mount.display().to_string();
            match run_quiet("umount", &[&text]) {
                Ok(_) => notes.push(format!("unmounted {text}")),
                Err(_) => {
                    let _ = run_quiet("umount", &["-l", &text]);
                    notes.push(format!("lazily unmounted busy {text}"));
                }
            }
        }
        let prefix = format!("{}-p", self.instance);
        for group in self
            .cgroups
            .partition_groups()
            .into_iter()
            .filter(|g| g.starts_with(&prefix))
        {
            match self.cgroups.remove_partition(&group) {
                Ok(()) => notes.push(format!("removed cgroup {group}")),
                Err(e) => notes.push(format!("could not remove cgroup {group}: {e}")),
            }
        }
        notes
    }
}

impl PartitionDriver for OciDriver {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn images(&self) -> Vec<String> {
        self.images.names()
    }

    fn build(&self, partition: &PartitionSpec) -> Result<(), DriverError> {
        self.ensure_ready(partition).map(|_| ())
    }

    fn run_job(&self, job: JobSpec) -> BoxFuture<'_, Result<JobOutcome, DriverError>> {
        Box::pin(self.run(job))
    }

    fn wipe(&self, index: u32) -> Result<(), DriverError> {
        let fail = |problem: String| DriverError::Wipe { index, problem };
        if let Ok(list) = self.runc(&["list", "-q"]) {
            for id in list
                .lines()
                .map(str::trim)
                .filter(|id| id.starts_with(&self.container_prefix(index)))
            {
                let _ = self.runc(&["delete", "--force", id]);
            }
        }
        let dir = self.partition_dir(index);
        for mount in mounts_under(&dir) {
            let text = mount.display().to_string();
            if run_quiet("umount", &[&text]).is_err() {
                run_quiet("umount", &["-l", &text]).map_err(fail)?;
            }
        }
        let group = self.group_name(index);
        if self.cgroups.partition_groups().contains(&group) {
            self.cgroups
                .remove_partition(&group)
                .map_err(|e| fail(e.to_string()))?;
        }
        self.release_cores(index);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fail(format!("{}: {e}", dir.display()))),
        }
    }

    fn reconcile(&self) -> Vec<String> {
        self.reconcile_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seccomp_profile_refuses_what_a_job_must_not_do() {
        // The config is data: check the profile itself, on any machine.
        let denied = denied_syscalls();
        let rules = seccomp_rules().to_string();
        assert!(rules.contains("\"clone3\"") && rules.contains("SCMP_CMP_MASKED_EQ"));
        assert!(
            rules.contains(&format!("{}", 0x1000_0000u64)),
            "CLONE_NEWUSER is filtered"
        );
        for syscall in [
            "mount",
            "umount2",
            "ptrace",
            "init_module",
            "finit_module",
            "delete_module",
            "keyctl",
            "bpf",
            "kexec_load",
            "unshare",
            "setns",
        ] {
            assert!(denied.contains(&syscall), "{syscall} must be denied");
        }
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,6"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1\n"), vec![1]);
        assert!(parse_cpu_list("").is_empty());
    }
}
