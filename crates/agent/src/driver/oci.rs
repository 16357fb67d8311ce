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
//! allow-list (`seccomp`) that leaves out mount, module loading, ptrace,
//! keyctl, bpf and the like. Each partition also has its own user namespace
//! mapped to its own host uid/gid range (`userns`), so jobs of two partitions
//! never share a host uid: they cannot read, signal or exhaust each other's
//! per-user resources. The partition's directory and disk image are root's
//! alone (0700/0600). Wiping a partition removes its containers, cgroup,
//! mount, files and its claim on a uid range.
// Unsafe: geteuid and rlimits for runc; each block says why it is sound.
#![allow(unsafe_code)]

use super::cgroup::{Cgroups, PartitionLimits, CPU_PERIOD_US};
use super::job_root::{roots_dir, JobRoot};
use super::userns::{IdRange, NamespaceHolder};
use super::{BoxFuture, DriverError, JobEnd, JobOutcome, JobSpec, PartitionDriver, PartitionSpec};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The user jobs run as inside their user namespace (`nobody` of the
/// image); on the host it is the partition's own id (see `userns`).
const JOB_UID_INSIDE: u32 = 65534;
const JOB_GID_INSIDE: u32 = 65534;
/// Processes a partition may have at once.
pub const PIDS_PER_PARTITION: u64 = 256;
/// Open files each process of a job may have.
const OPEN_FILES_PER_JOB: u64 = 4096;
/// Size of each job's /tmp (it counts against the partition's memory).
const TMP_SIZE_MIB: u64 = 64;

/// Where the driver finds an image's unpacked root filesystem.
pub trait ImageSource: Send + Sync + 'static {
    /// The images this host offers.
    fn names(&self) -> Vec<String>;
    /// The root filesystem of `name`, fetched and unpacked if needed.
    fn rootfs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<PathBuf, DriverError>>;
}

/// What one job's runc config is made of.
struct ContainerJob<'a> {
    rootfs: &'a Path,
    work: &'a Path,
    command: &'a [String],
    cgroup_path: &'a str,
    hostname: &'a str,
    ids: IdRange,
    user_namespace: &'a str,
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
    /// The machine-wide claims of partitions' uid ranges.
    claims_dir: PathBuf,
    /// Cores given to each partition, kept across its leases and (by the
    /// agent, with the partition) across restarts; freed when it is removed.
    core_assignments: Mutex<CoreAssignments>,
    job_counter: std::sync::atomic::AtomicU64,
}

pub(super) fn run_quiet(program: &str, args: &[&str]) -> Result<String, String> {
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

/// The cores partitions may be given: the root cpuset's, or all of them.
pub(super) fn machine_cores() -> Vec<u32> {
    let cores = std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.cpus")
        .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/cpuset.cpus.effective"))
        .map(|t| parse_cpu_list(&t))
        .unwrap_or_default();
    if !cores.is_empty() {
        return cores;
    }
    (0..std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1))
        .collect()
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
    if !Path::new("/proc/self/ns/user").exists() {
        return Err("the kernel has no user namespaces: partitions would share a uid".into());
    }
    // The agent makes each job's user namespace as the partition's
    // unprivileged host uid (see `userns`), which these settings forbid.
    for (setting, fix) in [
        (
            "/proc/sys/kernel/unprivileged_userns_clone",
            "sysctl kernel.unprivileged_userns_clone=1",
        ),
        (
            "/proc/sys/user/max_user_namespaces",
            "sysctl user.max_user_namespaces=15000",
        ),
    ] {
        if std::fs::read_to_string(setting).is_ok_and(|value| value.trim() == "0") {
            return Err(format!("{setting} is 0: user namespaces are off ({fix})"));
        }
    }
    Cgroups::detect().map(|_| ())
}

/// Sets the permission bits of `path`.
pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {}: {e}", path.display()))
}

/// Makes a sparse ext4 image of `disk_gib`, readable by root only, under a
/// temporary name first so a crash never leaves a half-made disk in place.
pub(super) fn make_disk_image(dir: &Path, image: &Path, disk_gib: u64) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = dir.join("disk.img.partial");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| format!("create {}: {e}", partial.display()))?;
    file.set_len(disk_gib.saturating_mul(1024 * 1024 * 1024))
        .map_err(|e| format!("size {}: {e}", partial.display()))?;
    drop(file);
    let partial_text = partial.display().to_string();
    run_quiet(
        "mkfs.ext4",
        &["-q", "-F", "-m", "0", "-E", "root_owner=0:0", &partial_text],
    )?;
    std::fs::rename(&partial, image).map_err(|e| format!("rename {}: {e}", partial.display()))
}

/// Makes `dir` and everything in it belong to `uid`:`gid`, unless it already
/// does: a partition's files follow it when its id range changes (a disk
/// made before ranges existed, or a lost claim).
fn give_to(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let metadata =
        std::fs::symlink_metadata(dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
    if metadata.uid() == uid && metadata.gid() == gid {
        return Ok(());
    }
    // coreutils' chown walks with openat and never follows a symlink (-P is
    // its default with -R; -h changes links, not their targets), so files
    // the job made cannot lead root's chown out of /work.
    let dir_text = dir.display().to_string();
    run_quiet(
        "chown",
        &["-R", "-h", "-P", &format!("{uid}:{gid}"), "--", &dir_text],
    )
    .map(|_| ())
}

impl OciDriver {
    pub fn new(
        root_dir: PathBuf,
        instance: String,
        images: Arc<dyn ImageSource>,
    ) -> Result<Self, String> {
        probe()?;
        let cgroups = Cgroups::detect()?;
        let cores = machine_cores();
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
            claims_dir: PathBuf::from(super::userns::SLOT_CLAIMS_DIR),
            core_assignments: Mutex::new(CoreAssignments::default()),
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

    fn assign_cores(&self, index: u32, count: u32) -> Vec<u32> {
        self.core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .assign(&self.cores, index, count)
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

    /// Makes sure the partition's disk is mounted, its `/work` belongs to
    /// the partition's own host uid and its cgroup exists; after an agent
    /// restart all are recreated from what is on disk. Answers the `/work`
    /// directory and the partition's id range.
    fn ensure_ready(&self, partition: &PartitionSpec) -> Result<(PathBuf, IdRange), DriverError> {
        let fail = |problem: String| DriverError::Build {
            index: partition.index,
            problem,
        };
        let dir = self.partition_dir(partition.index);
        let mount_point = dir.join("disk");
        std::fs::create_dir_all(&mount_point)
            .map_err(|e| fail(format!("create {}: {e}", mount_point.display())))?;
        // Only root may enter: the disk image and the bundles are the
        // partition's alone (a job reaches its /work through its mount).
        set_mode(&dir, 0o700).map_err(&fail)?;
        let image = dir.join("disk.img");
        if !image.exists() {
            make_disk_image(&dir, &image, partition.terms.disk_gib).map_err(&fail)?;
        }
        set_mode(&image, 0o600).map_err(&fail)?;
        if !mounts_under(&mount_point).contains(&mount_point) {
            let image_text = image.display().to_string();
            let mount_text = mount_point.display().to_string();
            run_quiet(
                "mount",
                &["-o", "loop,nosuid,nodev", &image_text, &mount_text],
            )
            .map_err(&fail)?;
        }
        let range = super::userns::claim_slot(&self.claims_dir, &dir).map_err(&fail)?;
        let work = mount_point.join("work");
        if !work.exists() {
            std::fs::create_dir(&work)
                .map_err(|e| fail(format!("create {}: {e}", work.display())))?;
        }
        give_to(
            &work,
            range.host_id(JOB_UID_INSIDE),
            range.host_id(JOB_GID_INSIDE),
        )
        .map_err(&fail)?;
        self.cgroups
            .create_partition(&self.group_name(partition.index), &self.limits(partition))
            .map_err(|e| fail(e.to_string()))?;
        Ok((work, range))
    }

    fn config(&self, job: &ContainerJob<'_>) -> serde_json::Value {
        let (rootfs, work, command) = (job.rootfs, job.work, job.command);
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": JOB_UID_INSIDE, "gid": JOB_GID_INSIDE, "additionalGids": []},
                "args": command,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/work", "TERM=dumb"],
                "cwd": "/work",
                "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
                "noNewPrivileges": true
            },
            "root": {"path": rootfs, "readonly": true},
            "hostname": job.hostname,
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
                "cgroupsPath": job.cgroup_path,
                // The user namespace is made by the agent (see `userns`);
                // runc still needs the mappings to know who root is.
                "namespaces": [{"type": "user", "path": job.user_namespace}, {"type": "pid"}, {"type": "network"},
                               {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "uidMappings": job.ids.mapping(),
                "gidMappings": job.ids.mapping(),
                "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                                "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                "seccomp": super::seccomp::profile()
            }
        })
    }

    /// The absolute root filesystem of the job's image in the cache (0700:
    /// runc reaches it through a `JobRoot` bind mount).
    async fn job_rootfs(&self, job: &JobSpec) -> Result<PathBuf, DriverError> {
        let image = match &job.image {
            Some(image) => image.clone(),
            None => job
                .partition
                .terms
                .default_image()
                .unwrap_or_default()
                .to_string(),
        };
        let rootfs = self.images.rootfs(&image).await?;
        // runc resolves a relative root against the bundle: make it absolute.
        std::fs::canonicalize(&rootfs).map_err(|e| {
            DriverError::Image(format!("image '{image}' at {}: {e}", rootfs.display()))
        })
    }

    /// Writes a job's bundle (its config.json); answers the container id
    /// and the bundle directory.
    fn write_bundle(
        &self,
        job: &JobSpec,
        rootfs: &Path,
        work: &Path,
        ids: IdRange,
        holder: &NamespaceHolder,
    ) -> Result<(String, PathBuf), DriverError> {
        let index = job.partition.index;
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
        let config = self.config(&ContainerJob {
            rootfs,
            work,
            command: &job.command,
            cgroup_path: &Cgroups::job_path(&self.group_name(index), &id),
            hostname: &format!("partition-{index}"),
            ids,
            user_namespace: &holder.namespace_path(),
        });
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).expect("config serializes"),
        )
        .map_err(|e| DriverError::Start(format!("write config.json: {e}")))?;
        Ok((id, bundle))
    }

    async fn run(&self, job: JobSpec) -> Result<JobOutcome, DriverError> {
        let (work, ids) = self.ensure_ready(&job.partition)?;
        let image_rootfs = self.job_rootfs(&job).await?;
        let root_name = format!(
            "{}{}-r{}",
            self.container_prefix(job.partition.index),
            std::process::id(),
            self.job_counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        // Both live until the job ends: the root stays mounted and the
        // namespace stays there for runc to join.
        let job_root = JobRoot::mount(&roots_dir(&self.instance), &root_name, &image_rootfs)
            .map_err(DriverError::Image)?;
        let holder = NamespaceHolder::start(ids).map_err(DriverError::Start)?;
        let (id, bundle) = self.write_bundle(&job, job_root.path(), &work, ids, &holder)?;
        let group = self.group_name(job.partition.index);
        self.cgroups.reset_peak(&group);
        let before = self.cgroups.counters(&group);
        let started = Instant::now();
        let mut child = match self.spawn_runc(&bundle, &id) {
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
        drop(holder);
        drop(job_root);
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

    /// Starts `runc run` for a job. The job's rlimits are set on runc
    /// itself and inherited: runc's own way (prlimit on the job from
    /// outside) needs CAP_SYS_RESOURCE over the job's user namespace, which
    /// an agent in a sandbox may lack; lowering one's own limits needs none.
    fn spawn_runc(&self, bundle: &Path, id: &str) -> std::io::Result<tokio::process::Child> {
        let mut command = tokio::process::Command::new("runc");
        command
            .arg("--root")
            .arg(&self.state_dir)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only setrlimit, async-signal-safe, runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                for (resource, limit) in [
                    (libc::RLIMIT_NOFILE, OPEN_FILES_PER_JOB),
                    (libc::RLIMIT_CORE, 0),
                ] {
                    let value = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(resource, &value) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command.spawn()
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
        let roots = roots_dir(&self.instance);
        for root in mounts_under(&roots) {
            super::job_root::unmount_detached(&root);
            let _ = std::fs::remove_dir(&root);
            notes.push(format!("unmounted leftover job root {}", root.display()));
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
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(format!("{}: {e}", dir.display()))),
        }
        super::userns::release_slot(&self.claims_dir, &dir).map_err(fail)
    }

    fn reconcile(&self) -> Vec<String> {
        self.reconcile_now()
    }

    fn remove(&self, index: u32) -> Result<(), DriverError> {
        self.wipe(index)?;
        self.core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(index);
        Ok(())
    }

    fn usage_of(&self, index: u32) -> Option<super::PartitionUsage> {
        self.cgroups.usage(&self.group_name(index))
    }

    fn set_active_modules(&self, index: u32, active: u32) -> Result<(), DriverError> {
        let Some(cores) = self.cores_of(index) else {
            return Ok(());
        };
        activate_cores(
            &self.cgroups,
            &self.group_name(index),
            index,
            &cores,
            active,
        )
    }

    fn cores_of(&self, index: u32) -> Option<Vec<u32>> {
        self.core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .of(index)
    }

    fn restore_cores(&self, kept: &[(u32, Vec<u32>)]) {
        self.core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&self.cores, kept);
    }
}

/// Narrows or widens a partition's cpuset to its first `active` cores
/// (seed 004's active modules), for the oci and vm drivers. A cpuset cannot
/// be empty while processes are in it: with no module active the partition
/// keeps its first core (its jobs are only started once their modules are
/// active).
pub(super) fn activate_cores(
    cgroups: &Cgroups,
    group: &str,
    index: u32,
    cores: &[u32],
    active: u32,
) -> Result<(), DriverError> {
    let count = (active as usize).clamp(1, cores.len().max(1));
    let cpus: Vec<String> = cores.iter().take(count).map(u32::to_string).collect();
    cgroups
        .set_cpus(group, &cpus.join(","))
        .map_err(|e| DriverError::Activate {
            index,
            problem: e.to_string(),
        })
}

/// Which cores each partition runs on. A partition gets `vcpus` cores, the
/// least shared first, so partitions do not share cores while there are
/// enough, and keeps them for as long as it exists with that many vCPUs.
#[derive(Debug, Default)]
pub struct CoreAssignments {
    by_partition: HashMap<u32, Vec<u32>>,
}

impl CoreAssignments {
    /// The partition's cores, choosing them if it has none (or the wrong
    /// number, after its terms were altered).
    pub fn assign(&mut self, machine_cores: &[u32], index: u32, count: u32) -> Vec<u32> {
        let wanted = count.max(1) as usize;
        if let Some(cores) = self.by_partition.get(&index) {
            if cores.len() == wanted {
                return cores.clone();
            }
        }
        self.by_partition.remove(&index);
        let mut load: Vec<(usize, u32)> = machine_cores
            .iter()
            .map(|core| {
                let sharing = self
                    .by_partition
                    .values()
                    .filter(|cores| cores.contains(core))
                    .count();
                (sharing, *core)
            })
            .collect();
        load.sort();
        let mut chosen: Vec<u32> = load.iter().take(wanted).map(|(_, c)| *c).collect();
        chosen.sort();
        self.by_partition.insert(index, chosen.clone());
        chosen
    }

    pub fn of(&self, index: u32) -> Option<Vec<u32>> {
        self.by_partition.get(&index).cloned()
    }

    pub fn release(&mut self, index: u32) {
        self.by_partition.remove(&index);
    }

    /// Takes back what the agent kept; cores this machine no longer has
    /// (the cpuset shrank) drop the partition's claim, to be chosen again.
    pub fn restore(&mut self, machine_cores: &[u32], kept: &[(u32, Vec<u32>)]) {
        for (index, cores) in kept {
            if !cores.is_empty() && cores.iter().all(|c| machine_cores.contains(c)) {
                self.by_partition.insert(*index, cores.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_keep_their_cores_across_a_restart_and_a_removed_one_frees_them() {
        let machine = [0, 1, 2, 3];
        let mut before = CoreAssignments::default();
        // Built in this order, partitions 1..3 take the least shared cores.
        assert_eq!(before.assign(&machine, 1, 2), vec![0, 1]);
        assert_eq!(before.assign(&machine, 2, 1), vec![2]);
        assert_eq!(before.assign(&machine, 3, 1), vec![3]);
        let kept: Vec<(u32, Vec<u32>)> = [1, 2, 3]
            .iter()
            .map(|i| (*i, before.of(*i).unwrap()))
            .collect();
        // After a restart the agent gives back what it kept; built again in
        // another order, each partition gets the same cores.
        let mut after = CoreAssignments::default();
        after.restore(&machine, &kept);
        assert_eq!(after.assign(&machine, 3, 1), vec![3]);
        assert_eq!(after.assign(&machine, 2, 1), vec![2]);
        assert_eq!(after.assign(&machine, 1, 2), vec![0, 1]);
        // Without what was kept, the first built would take core 0.
        assert_eq!(CoreAssignments::default().assign(&machine, 3, 1), vec![0]);
        // A removed partition frees its cores for the next one.
        after.release(2);
        assert_eq!(after.of(2), None);
        assert_eq!(after.assign(&machine, 4, 1), vec![2]);
        // Cores the machine lost are not restored.
        let mut shrunk = CoreAssignments::default();
        shrunk.restore(&[0, 1], &kept);
        assert_eq!(shrunk.of(1), Some(vec![0, 1]));
        assert_eq!(shrunk.of(3), None);
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,6"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1\n"), vec![1]);
        assert!(parse_cpu_list("").is_empty());
    }
}
