//! The `vm` driver: every job boots its partition's own OS kernel in a QEMU
//! virtual machine (seed 000 FIG. 5 S30-S32, FIG. 16: the OS image comes
//! from the image store by the digest in the signed terms, checked and
//! cached, and is booted directly with `-kernel`/`-initrd`).
//!
//! A VM has the partition's vCPUs (`-smp`) and memory (`-m`), its disk is
//! the partition's sparse ext4 image (a virtio disk the guest mounts at
//! /work, kept between the jobs of one lease), and it has no network
//! device. The QEMU process itself runs in the partition's cgroup (a `vm`
//! child of it, joined between fork and exec, before the guest starts), so
//! the CPU cap and the memory limit hold on the host side too: the limit is
//! the guest's memory plus [`VM_OVERHEAD_MIB`] for QEMU itself.
//!
//! The guest talks to the host only through serial ports (see the image
//! crate's `vm_initramfs`): the job's stdout and stderr stream live as the
//! job's output, and a trailer on a pipe of its own gives its exit code.
//! The command goes through fw_cfg, from a 0600 file, never on a command
//! line. Cancel, timeout, wipe and the agent's death (PR_SET_PDEATHSIG) kill
//! the VM; `reconcile` kills VMs of this agent left from a crash, found by
//! pidfile and by `/proc/PID/cmdline`.
// Unsafe: fork-exec hooks, a pipe, pidfds and geteuid; each block says why.
#![allow(unsafe_code)]

#[path = "vm_snapshot.rs"]
mod snapshot;

use super::cgroup::{Cgroups, PartitionLimits, CPU_PERIOD_US, ROOT_GROUP};
use super::oci::{CoreAssignments, ImageSource};
use super::{BoxFuture, DriverError, JobEnd, JobOutcome, JobSpec, PartitionDriver, PartitionSpec};
use leasehold_images::{
    VmManifest, ARGV_FILE_BYTES, ERROR_TRAILER_PREFIX, EXIT_TRAILER_PREFIX, FW_CFG_DIR,
    SEED_FILE_BYTES, TIME_FILE_BYTES,
};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The emulator; Debian's `qemu-system-x86`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Host memory a VM may use beyond its guest's RAM: QEMU's own heap, device
/// state and TCG's translation cache (capped at [`TCG_CACHE_MIB`]).
pub const VM_OVERHEAD_MIB: u64 = 192;
/// TCG's translation cache; QEMU's default (1 GiB) would not fit the limit.
const TCG_CACHE_MIB: u64 = 32;
/// The least guest memory the image's kernel boots with.
pub const MIN_GUEST_MEMORY_MIB: u64 = 96;
/// Threads QEMU may have (one per vCPU plus its own few).
const PIDS_PER_VM: u64 = 256;
/// The file descriptor QEMU writes the guest's exit trailer to.
const STATUS_FD: RawFd = 3;
/// Bytes of the trailer channel kept (the guest may write more).
const STATUS_BYTES_KEPT: usize = 4096;
/// The child cgroup of a partition that holds its QEMU (a cgroup v2 may not
/// hold processes beside children with controllers).
const VM_CHILD_GROUP: &str = "vm";
/// How long the KVM probe may take before KVM counts as not working.
const KVM_PROBE_SECONDS: u32 = 5;
/// Guest kernel arguments: a quiet boot with the console on ttyS0 (which
/// QEMU discards), a panic powers off at once, and boot work a one-job VM
/// does not need (crypto self-tests, watchdog, TSC checks) is skipped.
/// No Spectre mitigations inside the guest: they guard the guest kernel
/// from the guest's own processes, which are all the borrower's (the host
/// is guarded by QEMU and its own kernel), and cost much under TCG.
const GUEST_KERNEL_ARGUMENTS: &str = "console=ttyS0 quiet loglevel=1 panic=-1 cryptomgr.notests tsc=reliable no_timer_check random.trust_cpu=on nowatchdog audit=0 mitigations=off";

/// How QEMU runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceleration {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Acceleration {
    pub fn as_str(self) -> &'static str {
        match self {
            Acceleration::Kvm => "kvm",
            Acceleration::Tcg => "tcg",
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Checks that this host can run the `vm` driver; the reason when not.
pub fn probe() -> Result<(), String> {
    if !is_root() {
        return Err("the vm driver needs root (cgroups for the VMs)".into());
    }
    super::oci::run_quiet(QEMU_BINARY, &["--version"]).map_err(|e| {
        format!("{QEMU_BINARY} is not usable ({e}); apt-get install qemu-system-x86")
    })?;
    super::oci::run_quiet("mkfs.ext4", &["-V"])
        .map_err(|e| format!("mkfs.ext4 is not usable ({e}); apt-get install e2fsprogs"))?;
    Cgroups::detect().map(|_| ())
}

/// KVM where /dev/kvm is hardware-backed and starts a VM within a bounded
/// time, TCG otherwise; and why, for the ready lines. A nested "PVM"
/// /dev/kvm (the `kvm_pvm` module) boots stock kernels far slower than TCG
/// or not at all, so it counts as no KVM.
pub fn detect_acceleration() -> (Acceleration, String) {
    let tcg = |why: String| {
        (
            Acceleration::Tcg,
            format!("TCG (software emulation): {why}"),
        )
    };
    if !Path::new("/dev/kvm").exists() {
        return tcg("there is no /dev/kvm".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return tcg(
            "/dev/kvm is a nested PVM device, which boots stock kernels slowly or not at all"
                .into(),
        );
    }
    match kvm_starts() {
        Ok(()) => (Acceleration::Kvm, "KVM: /dev/kvm works".into()),
        Err(reason) => tcg(format!("KVM did not start ({reason})")),
    }
}

/// Starts QEMU on KVM with no guest and quits it through its monitor,
/// within [`KVM_PROBE_SECONDS`].
fn kvm_starts() -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("timeout")
        .arg(KVM_PROBE_SECONDS.to_string())
        .args([QEMU_BINARY, "-M", "none", "-accel", "kvm", "-nodefaults"])
        .args(["-no-user-config", "-display", "none", "-monitor", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {QEMU_BINARY}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(stderr
        .lines()
        .last()
        .unwrap_or("no answer in time")
        .trim()
        .to_string())
}

pub struct VmDriver {
    root_dir: PathBuf,
    /// Held while a snapshot is made, so one shape is booted once.
    snapshot_lock: tokio::sync::Mutex<()>,
    /// Unique to this agent on this machine: VM names, cgroups.
    instance: String,
    cgroups: Cgroups,
    images: Arc<dyn ImageSource>,
    acceleration: Acceleration,
    /// `qemu-system-x86_64 --version`: a snapshot is only resumed by the
    /// QEMU that made it.
    qemu_version: String,
    cores: Vec<u32>,
    core_assignments: Mutex<CoreAssignments>,
}

/// How QEMU starts the guest.
enum VmStart {
    /// Boots the kernel, to be snapshotted when ready (QMP on stdio).
    Boot,
    /// Resumes a snapshot (`-incoming file:`), for a job.
    Restore(PathBuf),
}

/// The fw_cfg files the guest reads (see the image's init): `go`, `argv`,
/// `seed`, `time`, with the sizes the guest learnt before its snapshot.
struct FwCfgFiles {
    go: PathBuf,
    argv: PathBuf,
    seed: PathBuf,
    time: PathBuf,
}

/// What one VM is started with.
struct VmLaunch<'a> {
    terms: &'a leasehold_core::Terms,
    name: String,
    kernel: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
    files: FwCfgFiles,
    start: VmStart,
    /// The cgroup.procs files QEMU joins before it execs.
    cgroup_procs: Vec<PathBuf>,
}

impl VmDriver {
    pub fn new(
        root_dir: PathBuf,
        instance: String,
        images: Arc<dyn ImageSource>,
        acceleration: Acceleration,
    ) -> Result<Self, String> {
        probe()?;
        let cgroups = Cgroups::detect()?;
        for dir in [root_dir.join("pids"), root_dir.join("snapshots")] {
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        super::oci::set_mode(&root_dir, 0o700)?;
        snapshot::write_fixed_files(&root_dir.join("snapshots"))?;
        let root_dir = std::fs::canonicalize(&root_dir)
            .map_err(|e| format!("resolve {}: {e}", root_dir.display()))?;
        Ok(VmDriver {
            root_dir,
            snapshot_lock: tokio::sync::Mutex::new(()),
            instance,
            cgroups,
            images,
            acceleration,
            qemu_version: super::oci::run_quiet(QEMU_BINARY, &["--version"])?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            cores: super::oci::machine_cores(),
            core_assignments: Mutex::new(CoreAssignments::default()),
        })
    }

    fn partition_dir(&self, index: u32) -> PathBuf {
        self.root_dir.join(format!("partition-{index}"))
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root_dir.join("snapshots")
    }

    fn pidfile(&self, index: u32) -> PathBuf {
        self.root_dir
            .join("pids")
            .join(format!("partition-{index}.pid"))
    }

    fn group_name(&self, index: u32) -> String {
        format!("{}-p{index}", self.instance)
    }

    /// QEMU's `-name`: how this agent's VMs are told apart in /proc.
    fn vm_name(&self, index: u32) -> String {
        format!("{}{index}", self.vm_name_prefix())
    }

    fn vm_name_prefix(&self) -> String {
        format!("lh-vm-{}-p", self.instance)
    }

    fn limits(&self, partition: &PartitionSpec) -> PartitionLimits {
        let terms = &partition.terms;
        let cores = self
            .core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .assign(&self.cores, partition.index, terms.vcpus);
        let promised = terms.vcpus as u64 * terms.cpu_cap_percent as u64 * CPU_PERIOD_US / 100;
        let ceiling = cores.len() as u64 * CPU_PERIOD_US;
        let cpus: Vec<String> = cores.iter().map(u32::to_string).collect();
        PartitionLimits {
            cpuset_cpus: cpus.join(","),
            cpu_quota_us: promised.min(ceiling).max(1000),
            memory_bytes: terms
                .memory_mib
                .saturating_add(VM_OVERHEAD_MIB)
                .saturating_mul(1024 * 1024),
            pids_max: PIDS_PER_VM,
        }
    }

    /// Makes sure the partition's disk image and cgroup exist (after a
    /// restart too); answers the disk image.
    fn ensure_ready(&self, partition: &PartitionSpec) -> Result<PathBuf, DriverError> {
        let fail = |problem: String| DriverError::Build {
            index: partition.index,
            problem,
        };
        if partition.terms.memory_mib < MIN_GUEST_MEMORY_MIB {
            return Err(fail(format!(
                "a vm partition needs memory_mib of at least {MIN_GUEST_MEMORY_MIB} (its kernel's own), not {}",
                partition.terms.memory_mib
            )));
        }
        let dir = self.partition_dir(partition.index);
        std::fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
        super::oci::set_mode(&dir, 0o700).map_err(&fail)?;
        let disk = dir.join("disk.img");
        if !disk.exists() {
            super::oci::make_disk_image(&dir, &disk, partition.terms.disk_gib).map_err(&fail)?;
        }
        super::oci::set_mode(&disk, 0o600).map_err(&fail)?;
        self.cgroups
            .create_partition(&self.group_name(partition.index), &self.limits(partition))
            .map_err(|e| fail(e.to_string()))?;
        Ok(disk)
    }

    /// The `vm` child of the partition's cgroup in every hierarchy, made if
    /// missing; answers the cgroup.procs files QEMU joins.
    fn vm_cgroup(&self, index: u32) -> Result<Vec<PathBuf>, String> {
        let relative = format!("{ROOT_GROUP}/{}", self.group_name(index));
        let mut parents: Vec<PathBuf> = match &self.cgroups {
            Cgroups::V1 { mounts, .. } => mounts.values().map(|m| m.join(&relative)).collect(),
            Cgroups::V2 { root } => vec![root.join(&relative)],
        };
        parents.sort();
        parents.dedup();
        let mut procs = Vec::new();
        for parent in parents {
            let child = parent.join(VM_CHILD_GROUP);
            match std::fs::create_dir(&child) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(format!("create cgroup {}: {e}", child.display()))
                }
                _ => {}
            }
            // A v1 cpuset child starts empty: it takes its parent's sets.
            if self.cgroups.version() == 1 && parent.join("cpuset.cpus").exists() {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let value = std::fs::read_to_string(parent.join(file))
                        .map_err(|e| format!("read {}: {e}", parent.join(file).display()))?;
                    std::fs::write(child.join(file), value.trim())
                        .map_err(|e| format!("write {}: {e}", child.join(file).display()))?;
                }
            }
            procs.push(child.join("cgroup.procs"));
        }
        Ok(procs)
    }

    /// The kernel and initramfs of the job's image, fetched from the store
    /// by digest and checked when this host lacks them (network boot).
    async fn boot_files(&self, job: &JobSpec) -> Result<(PathBuf, PathBuf, PathBuf), DriverError> {
        let image = match &job.image {
            Some(image) => image.clone(),
            None => job
                .partition
                .terms
                .default_image()
                .unwrap_or_default()
                .to_string(),
        };
        let root = self.images.rootfs(&image).await?;
        let manifest = VmManifest::read(&root).map_err(|e| {
            DriverError::UnknownImage(format!(
                "image '{image}' is not a vm image (build one with `leasehold images build debian-vm`): {e}"
            ))
        })?;
        let (kernel, initramfs) = (root.join(&manifest.kernel), root.join(&manifest.initramfs));
        Ok((root, kernel, initramfs))
    }

    /// Writes a job's fw_cfg files (0600, in the partition's directory):
    /// its command (each argument base64, joined by commas, padded with
    /// spaces), fresh randomness and the time of day.
    fn write_job_files(&self, job: &JobSpec) -> Result<FwCfgFiles, DriverError> {
        use base64::Engine;
        let encoded: Vec<String> = job
            .command
            .iter()
            .map(|a| base64::engine::general_purpose::STANDARD.encode(a))
            .collect();
        let argv = encoded.join(",");
        if argv.len() > ARGV_FILE_BYTES {
            return Err(DriverError::Start(format!(
                "the command is {} bytes encoded for the VM, over {ARGV_FILE_BYTES}",
                argv.len()
            )));
        }
        let seed: Vec<u8> = (0..SEED_FILE_BYTES).map(|_| rand::random::<u8>()).collect();
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dir = self.partition_dir(job.partition.index);
        let files = FwCfgFiles {
            go: self.snapshots_dir().join("go-1"),
            argv: dir.join("argv"),
            seed: dir.join("seed"),
            time: dir.join("time"),
        };
        for (path, bytes) in [
            (&files.argv, padded(argv.into_bytes(), ARGV_FILE_BYTES)),
            (&files.seed, seed),
            (
                &files.time,
                padded(now_secs.to_string().into_bytes(), TIME_FILE_BYTES),
            ),
        ] {
            write_private(path, &bytes).map_err(DriverError::Start)?;
        }
        Ok(files)
    }

    fn qemu_arguments(&self, launch: &VmLaunch<'_>) -> Vec<String> {
        let accel = match self.acceleration {
            Acceleration::Kvm => "kvm".to_string(),
            Acceleration::Tcg => format!("tcg,tb-size={TCG_CACHE_MIB}"),
        };
        // QEMU's option parser reads a comma as a separator unless doubled.
        let escape = |path: &Path| path.display().to_string().replace(',', ",,");
        let mut args: Vec<String> = vec![
            "-name".into(),
            launch.name.clone(),
            "-M".into(),
            "pc".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-accel".into(),
            accel,
            "-smp".into(),
            launch.terms.vcpus.to_string(),
            "-m".into(),
            format!("{}M", launch.terms.memory_mib),
            "-kernel".into(),
            launch.kernel.display().to_string(),
            "-initrd".into(),
            launch.initramfs.display().to_string(),
            "-append".into(),
            GUEST_KERNEL_ARGUMENTS.into(),
            "-drive".into(),
            format!("file={},if=virtio,format=raw", escape(&launch.disk)),
            "-nic".into(),
            "none".into(),
            // A new VM generation id in each resumed copy: the guest kernel
            // reseeds its random generator, so copies of one snapshot never
            // share random numbers.
            "-device".into(),
            "vmgenid,guid=auto".into(),
        ];
        let files = &launch.files;
        for (name, path) in [
            ("go", &files.go),
            ("argv", &files.argv),
            ("seed", &files.seed),
            ("time", &files.time),
        ] {
            args.push("-fw_cfg".into());
            args.push(format!("name={FW_CFG_DIR}/{name},file={}", escape(path)));
        }
        // ttyS0 the guest's console (dropped), ttyS1 stdout (QMP has stdio
        // while booting for a snapshot), ttyS2 stderr, ttyS3 the trailers.
        let stdout_serial = match launch.start {
            VmStart::Boot => "null",
            VmStart::Restore(_) => "stdio",
        };
        for serial in [
            "null".to_string(),
            stdout_serial.to_string(),
            "file:/proc/self/fd/2".to_string(),
            format!("file:/proc/self/fd/{STATUS_FD}"),
        ] {
            args.push("-serial".into());
            args.push(serial);
        }
        if self.acceleration == Acceleration::Kvm {
            args.extend(["-cpu".to_string(), "host".to_string()]);
        }
        match &launch.start {
            VmStart::Boot => args.extend(["-qmp".to_string(), "stdio".to_string()]),
            VmStart::Restore(state) => {
                args.extend(["-incoming".to_string(), format!("file:{}", state.display())])
            }
        }
        args
    }
}

/// `bytes` padded with spaces to `size` (the guest reads fixed sizes).
fn padded(mut bytes: Vec<u8>, size: usize) -> Vec<u8> {
    bytes.resize(size.max(bytes.len()), b' ');
    bytes
}

/// Writes a file only root can read, whole.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// A pipe for the guest's exit trailer: the read end (non-blocking, for
/// tokio) and the write end QEMU gets as fd [`STATUS_FD`].
fn status_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor this function owns.
    let flags = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok((read, write))
}

/// Between fork and exec of QEMU, with only async-signal-safe calls: join
/// the partition's cgroup (writing "0" moves the writer itself), put the
/// trailer pipe on fd 3, die with the agent, and dump no core (it would
/// hold the guest's memory).
fn prepare_qemu_child(cgroup_procs: &[CString], status_fd: RawFd) -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    for path in cgroup_procs {
        // SAFETY: a NUL-terminated path; the descriptor is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return fail();
        }
        // SAFETY: writes one byte from a static buffer to the open fd.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(fd) };
        if written != 1 {
            return fail();
        }
    }
    // SAFETY: dup2/fcntl/prctl/setrlimit on this process only.
    unsafe {
        if status_fd == STATUS_FD {
            if libc::fcntl(STATUS_FD, libc::F_SETFD, 0) < 0 {
                return fail();
            }
        } else if libc::dup2(status_fd, STATUS_FD) < 0 {
            return fail();
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return fail();
        }
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            return fail();
        }
    }
    Ok(())
}

/// Reads the trailer channel to its end, keeping its first bytes.
async fn read_status(reader: OwnedFd) -> String {
    use tokio::io::AsyncReadExt;
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(reader) else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buffer = [0u8; 1024];
    while let Ok(n) = pipe.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let room = STATUS_BYTES_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// How the job ended, from the guest's trailer and QEMU's exit: the
/// trailer's exit code; a QEMU killed by a signal (the host's OOM killer)
/// as that signal; otherwise an error saying why there is no exit code.
fn job_end(
    trailer: &str,
    qemu: std::process::ExitStatus,
    stderr: &[u8],
) -> Result<JobEnd, DriverError> {
    use std::os::unix::process::ExitStatusExt;
    for line in trailer.lines().rev() {
        if let Some(code) = line.trim().strip_prefix(EXIT_TRAILER_PREFIX.trim_end()) {
            if let Ok(code) = code.trim().parse::<i32>() {
                return Ok(JobEnd::Exited(code));
            }
        }
        if let Some(reason) = line.strip_prefix(ERROR_TRAILER_PREFIX) {
            return Err(DriverError::Start(format!(
                "the guest could not run the job: {}",
                reason.trim()
            )));
        }
    }
    if let Some(signal) = qemu.signal() {
        return Ok(JobEnd::Signalled(signal));
    }
    let last_error = String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .chars()
        .take(300)
        .collect::<String>();
    Err(DriverError::Start(format!(
        "the VM stopped without reporting the job's exit code ({qemu}){}{last_error}",
        if last_error.is_empty() { "" } else { ": " }
    )))
}

impl VmDriver {
    /// Starts QEMU for a job, inside the partition's cgroup from its first
    /// instruction; answers it and the read end of its trailer pipe.
    fn spawn_qemu(
        &self,
        launch: &VmLaunch<'_>,
    ) -> Result<(tokio::process::Child, OwnedFd), DriverError> {
        let start = |what: &str, e: std::io::Error| DriverError::Start(format!("{what}: {e}"));
        let (status_read, status_write) = status_pipe().map_err(|e| start("make a pipe", e))?;
        let procs: Vec<CString> = launch
            .cgroup_procs
            .iter()
            .map(|p| CString::new(p.display().to_string()))
            .collect::<Result<_, _>>()
            .map_err(|e| DriverError::Start(format!("a cgroup path has a NUL: {e}")))?;
        let status_fd = status_write.as_raw_fd();
        let mut command = tokio::process::Command::new(QEMU_BINARY);
        let stdin = match launch.start {
            VmStart::Boot => Stdio::piped(),
            VmStart::Restore(_) => Stdio::null(),
        };
        command
            .args(self.qemu_arguments(launch))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the hook makes only async-signal-safe calls (see
        // prepare_qemu_child) on data made before the fork.
        unsafe {
            command.pre_exec(move || prepare_qemu_child(&procs, status_fd));
        }
        let child = command
            .spawn()
            .map_err(|e| start(&format!("cannot run {QEMU_BINARY}"), e))?;
        // Only QEMU holds the write end now: the pipe ends when it exits.
        drop(status_write);
        Ok((child, status_read))
    }

    fn write_pidfile(&self, index: u32, pid: Option<u32>) {
        if let Some(pid) = pid {
            let path = self.pidfile(index);
            if let Err(error) = std::fs::write(&path, pid.to_string()) {
                tracing::warn!(path = %path.display(), %error, "cannot write the VM's pidfile");
            }
        }
    }

    async fn run(&self, job: JobSpec) -> Result<JobOutcome, DriverError> {
        let index = job.partition.index;
        let disk = self.ensure_ready(&job.partition)?;
        let (image_root, kernel, initramfs) = self.boot_files(&job).await?;
        let cgroup_procs = self.vm_cgroup(index).map_err(DriverError::Start)?;
        let boot = snapshot::Boot {
            partition: &job.partition,
            image_root: &image_root,
            kernel: &kernel,
            initramfs: &initramfs,
            cgroup_procs: &cgroup_procs,
        };
        let state = self.snapshot(&boot).await?;
        let launch = VmLaunch {
            terms: &job.partition.terms,
            name: self.vm_name(index),
            kernel,
            initramfs,
            disk,
            files: self.write_job_files(&job)?,
            start: VmStart::Restore(state),
            cgroup_procs,
        };
        let group = self.group_name(index);
        self.cgroups.reset_peak(&group);
        let before = self.cgroups.counters(&group);
        let started = Instant::now();
        let (mut child, status_read) = self.spawn_qemu(&launch)?;
        self.write_pidfile(index, child.id());
        let status = tokio::spawn(read_status(status_read));
        let ended = match super::supervise(&mut child, &job).await {
            super::Supervised::Finished(Ok(qemu), out, err) => {
                let trailer = status.await.unwrap_or_default();
                if trailer.trim().is_empty() && qemu.code().is_some() {
                    // QEMU could not resume it: the next job makes it anew.
                    if let VmStart::Restore(state) = &launch.start {
                        let _ = std::fs::remove_file(state);
                    }
                }
                job_end(&trailer, qemu, &err).map(|end| (end, out, err))
            }
            super::Supervised::Finished(Err(e), _, _) => {
                Err(DriverError::Start(format!("wait for {QEMU_BINARY}: {e}")))
            }
            super::Supervised::Stop(end) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Ok((end, Vec::new(), Vec::new()))
            }
        };
        let _ = std::fs::remove_file(self.pidfile(index));
        let (end, out, err) = ended?;
        let wall_ms = started.elapsed().as_millis() as u64;
        let after = self.cgroups.counters(&group);
        let oom_killed = after.oom_kills > before.oom_kills
            || (end == JobEnd::Signalled(libc::SIGKILL)
                && after.peak_memory_bytes.saturating_add(1 << 20)
                    >= self.limits(&job.partition).memory_bytes);
        Ok(JobOutcome {
            cpu_ms: Some(after.cpu_usage_ns.saturating_sub(before.cpu_usage_ns) / 1_000_000),
            peak_memory_bytes: Some(after.peak_memory_bytes),
            oom_killed,
            ..JobOutcome::captured(end, &out, &err, wall_ms)
        })
    }
}

/// The arguments of a process, from /proc/PID/cmdline.
fn process_arguments(pid: i32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `arguments` are those of a QEMU this driver started with a
/// `-name` beginning with `name_prefix`.
fn is_our_vm(arguments: &[String], name_prefix: &str) -> bool {
    let is_qemu = arguments
        .first()
        .is_some_and(|program| program.ends_with(QEMU_BINARY));
    is_qemu
        && arguments
            .windows(2)
            .any(|pair| pair[0] == "-name" && pair[1].starts_with(name_prefix))
}

/// Kills process `pid` if it is one of our VMs, and waits (at most 5 s)
/// until it is gone. Through a pidfd, so a pid reused meanwhile by another
/// process is never signalled. Says what it did, if anything.
fn kill_vm(pid: i32, name_prefix: &str) -> Option<String> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if raw < 0 {
        return None;
    }
    // SAFETY: the descriptor was just made and is owned here.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Checked after the pidfd is held: the pidfd names this very process.
    if !process_arguments(pid).is_some_and(|a| is_our_vm(&a, name_prefix)) {
        return None;
    }
    // SAFETY: signals the process the pidfd refers to; no other pointers.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if sent != 0 {
        return Some(format!(
            "could not kill leftover VM process {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut wait = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one pollfd that lives on this stack frame.
    let ready = unsafe { libc::poll(&mut wait, 1, 5000) };
    Some(if ready == 1 {
        format!("killed leftover VM process {pid}")
    } else {
        format!("sent SIGKILL to leftover VM process {pid}; it had not ended after 5 s")
    })
}

/// Every process on this machine now.
fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

impl VmDriver {
    /// Kills the partition's VM, if one runs (a wipe while a job runs).
    fn kill_partition_vm(&self, index: u32) {
        let pidfile = self.pidfile(index);
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            // The exact name: partition 1 must not match partition 12.
            if let Some(note) = kill_vm_named(pid, &self.vm_name(index)) {
                tracing::info!(partition = index, "{note}");
            }
        }
        let _ = std::fs::remove_file(pidfile);
    }

    /// Kills this agent's VMs that a crash left running: those its pidfiles
    /// name and any other QEMU with this agent's VM names, then removes
    /// its partition cgroups (rebuilt at the next job).
    fn reconcile_now(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let prefix = self.vm_name_prefix();
        let pids_dir = self.root_dir.join("pids");
        let mut candidates: Vec<i32> = std::fs::read_dir(&pids_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|t| t.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        candidates.extend(all_pids());
        candidates.sort_unstable();
        candidates.dedup();
        notes.extend(
            candidates
                .into_iter()
                .filter_map(|pid| kill_vm(pid, &prefix)),
        );
        if let Ok(entries) = std::fs::read_dir(&pids_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let group_prefix = format!("{}-p", self.instance);
        for group in self
            .cgroups
            .partition_groups()
            .into_iter()
            .filter(|g| g.starts_with(&group_prefix))
        {
            match self.cgroups.remove_partition(&group) {
                Ok(()) => notes.push(format!("removed cgroup {group}")),
                Err(e) => notes.push(format!("could not remove cgroup {group}: {e}")),
            }
        }
        notes
    }
}

/// [`kill_vm`] for one VM name exactly.
fn kill_vm_named(pid: i32, name: &str) -> Option<String> {
    let exact = process_arguments(pid)?
        .windows(2)
        .any(|pair| pair[0] == "-name" && pair[1] == name);
    if exact {
        kill_vm(pid, name)
    } else {
        None
    }
}

impl PartitionDriver for VmDriver {
    fn name(&self) -> &'static str {
        "vm"
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
        self.kill_partition_vm(index);
        let group = self.group_name(index);
        if self.cgroups.partition_groups().contains(&group) {
            self.cgroups
                .remove_partition(&group)
                .map_err(|e| fail(e.to_string()))?;
        }
        let dir = self.partition_dir(index);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fail(format!("{}: {e}", dir.display()))),
        }
    }

    fn remove(&self, index: u32) -> Result<(), DriverError> {
        self.wipe(index)?;
        self.core_assignments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(index);
        Ok(())
    }

    fn reconcile(&self) -> Vec<String> {
        self.reconcile_now()
    }

    fn usage_of(&self, index: u32) -> Option<super::PartitionUsage> {
        self.cgroups.usage(&self.group_name(index))
    }

    fn set_active_modules(&self, index: u32, active: u32) -> Result<(), DriverError> {
        let Some(cores) = self.cores_of(index) else {
            return Ok(());
        };
        // As the oci driver: never an empty cpuset while QEMU runs in it.
        super::oci::activate_cores(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn the_trailer_gives_the_exit_code_and_its_absence_is_an_error_naming_qemu() {
        let end = job_end("leasehold-vm-exit 7\n", exited(0), b"").unwrap();
        assert_eq!(end, JobEnd::Exited(7));
        // The last trailer counts (a job may have written an earlier one).
        let end = job_end("leasehold-vm-exit 0\nleasehold-vm-exit 3\n", exited(0), b"").unwrap();
        assert_eq!(end, JobEnd::Exited(3));
        let error = job_end(
            "leasehold-vm-error cannot mount the partition's disk\n",
            exited(0),
            b"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("cannot mount the partition's disk"),
            "{error}"
        );
        let error = job_end(
            "",
            exited(1),
            b"qemu-system-x86_64: -kernel x: No such file\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("without reporting the job's exit code"),
            "{error}"
        );
        assert!(error.contains("No such file"), "{error}");
        // Killed from outside (the host's OOM killer): the signal.
        let killed = std::process::ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(
            job_end("", killed, b"").unwrap(),
            JobEnd::Signalled(libc::SIGKILL)
        );
    }

    #[test]
    fn only_qemu_with_this_agents_vm_name_counts_as_ours() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ours = args(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "lh-vm-local-1a2b3c4d-p3",
            "-M",
            "pc",
        ]);
        assert!(is_our_vm(&ours, "lh-vm-local-1a2b3c4d-p"));
        assert!(!is_our_vm(&ours, "lh-vm-other-99999999-p"));
        let not_qemu = args(&["/bin/sleep", "-name", "lh-vm-local-1a2b3c4d-p3"]);
        assert!(!is_our_vm(&not_qemu, "lh-vm-local-1a2b3c4d-p"));
        let unnamed = args(&["qemu-system-x86_64", "-M", "pc"]);
        assert!(!is_our_vm(&unnamed, "lh-vm-local-1a2b3c4d-p"));
    }
}
