//! Partition drivers (logical partition control unit 3): they build a
//! partition from its allocation (FIG. 5, S1-S8), run jobs in it, and wipe
//! it when its lease ends. All drivers sit behind [`PartitionDriver`], so
//! the agent's state machine, key check and lock are the same for each.

pub mod cgroup;
pub mod job_root;
pub mod oci;
pub mod process;
pub mod seccomp;
pub mod sim;
pub mod userns;
pub mod vm;

use leasehold_core::{Isolation, Terms};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Most bytes of stdout, and separately of stderr, kept per job.
pub const MAX_CAPTURED_OUTPUT_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    UnknownImage(String),
    #[error("cannot fetch image: {0}")]
    Image(String),
    #[error("cannot build partition {index}: {problem}")]
    Build { index: u32, problem: String },
    #[error("cannot start the job: {0}")]
    Start(String),
    #[error("cannot wipe partition {index}: {problem}")]
    Wipe { index: u32, problem: String },
    #[error("cannot change partition {index}'s active cores: {problem}")]
    Activate { index: u32, problem: String },
}

/// What a driver needs to know about a partition.
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    pub index: u32,
    pub terms: Terms,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Live output of a running job.
pub type OutputSender = tokio::sync::mpsc::Sender<(Stream, Vec<u8>)>;

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub partition: PartitionSpec,
    pub command: Vec<String>,
    pub timeout: Option<Duration>,
    /// The image to boot; the partition's first image when `None`.
    pub image: Option<String>,
    /// Becomes true when the job must stop (cancel, or its lease ended).
    pub cancel: tokio::sync::watch::Receiver<bool>,
    /// Where live output goes, if anyone is listening.
    pub output: Option<OutputSender>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    Exited(i32),
    /// Killed by a signal (number).
    Signalled(i32),
    TimedOut,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub end: JobEnd,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub wall_ms: u64,
    /// CPU time the job used, when the driver can measure it.
    pub cpu_ms: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub oom_killed: bool,
}

/// What a partition's jobs use now, read from its cgroup (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionUsage {
    /// CPU time used since the partition's cgroup was made.
    pub cpu_usage_ns: u64,
    /// Memory charged to the partition now (page cache included).
    pub memory_bytes: u64,
}

pub trait PartitionDriver: Send + Sync + 'static {
    /// The name shown to users (`process`, `sim`, ...).
    fn name(&self) -> &'static str;
    /// The images this driver can boot on this host.
    fn images(&self) -> Vec<String>;
    /// Builds (or rebuilds) the partition so jobs can run in it.
    fn build(&self, partition: &PartitionSpec) -> Result<(), DriverError>;
    /// Runs one job to completion in a built partition.
    fn run_job(&self, job: JobSpec) -> BoxFuture<'_, Result<JobOutcome, DriverError>>;
    /// Removes everything the last borrower left in the partition.
    fn wipe(&self, index: u32) -> Result<(), DriverError>;
    /// The partition is withdrawn: wipes it and frees what the driver kept
    /// for it across leases (the `oci` driver's cores).
    fn remove(&self, index: u32) -> Result<(), DriverError> {
        self.wipe(index)
    }
    /// The cores the driver gave a partition, for the agent to keep with
    /// the partition (`None`: this driver does not pin cores).
    fn cores_of(&self, _index: u32) -> Option<Vec<u32>> {
        None
    }
    /// At start: the cores each partition had, as the agent kept them.
    fn restore_cores(&self, _kept: &[(u32, Vec<u32>)]) {}

    /// Seed 004: `active` of the partition's modules (cores) are under a
    /// usage right now. The `oci` driver narrows or widens the
    /// partition's cpuset live; others only count (the rights manager
    /// keeps the counts).
    fn set_active_modules(&self, _index: u32, _active: u32) -> Result<(), DriverError> {
        Ok(())
    }
    /// What a built partition uses now, when the driver can measure it
    /// (`None`: not built, or a driver without partition cgroups).
    fn usage_of(&self, _index: u32) -> Option<PartitionUsage> {
        None
    }
    /// Cleans up what a crash of the agent left behind; says what it did.
    fn reconcile(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Which driver to use.
#[derive(Clone)]
pub enum DriverKind {
    Process {
        root_dir: PathBuf,
    },
    Sim {
        images: Vec<String>,
    },
    Oci {
        root_dir: PathBuf,
        /// Unique to this agent on this machine (container ids, cgroups).
        instance: String,
        images: std::sync::Arc<dyn oci::ImageSource>,
    },
    /// QEMU virtual machines booting OS images (kernel + initramfs) from
    /// the image store.
    Vm {
        root_dir: PathBuf,
        /// Unique to this agent on this machine (VM names, cgroups).
        instance: String,
        images: std::sync::Arc<dyn oci::ImageSource>,
        acceleration: vm::Acceleration,
    },
}

impl DriverKind {
    /// The isolation this driver gives its jobs: the agent writes it into
    /// every partition's terms, so no lender can claim more than it gives.
    pub fn isolation(&self) -> Isolation {
        match self {
            DriverKind::Process { .. } => Isolation::None,
            DriverKind::Sim { .. } => Isolation::Simulated,
            DriverKind::Oci { .. } => Isolation::Container,
            DriverKind::Vm { .. } => Isolation::VirtualMachine,
        }
    }
}

pub fn make_driver(kind: &DriverKind) -> Result<Box<dyn PartitionDriver>, String> {
    Ok(match kind {
        DriverKind::Process { root_dir } => Box::new(process::ProcessDriver::new(root_dir.clone())),
        DriverKind::Sim { images } => Box::new(sim::SimDriver::new(images.clone())),
        DriverKind::Oci {
            root_dir,
            instance,
            images,
        } => Box::new(oci::OciDriver::new(
            root_dir.clone(),
            instance.clone(),
            images.clone(),
        )?),
        DriverKind::Vm {
            root_dir,
            instance,
            images,
            acceleration,
        } => Box::new(vm::VmDriver::new(
            root_dir.clone(),
            instance.clone(),
            images.clone(),
            *acceleration,
        )?),
    })
}

/// Reads a job's output stream to its end: forwards each chunk live (if
/// anyone listens) and keeps the first [`MAX_CAPTURED_OUTPUT_BYTES`] + 1
/// bytes, so the caller can tell the output was cut. Never blocks the job on
/// a slow listener: a full channel drops the live copy, not the output.
pub(crate) async fn pump<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    live: Option<OutputSender>,
    stream: Stream,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(live) = &live {
            let _ = live.try_send((stream, buffer[..n].to_vec()));
        }
        if kept.len() <= MAX_CAPTURED_OUTPUT_BYTES {
            let room = MAX_CAPTURED_OUTPUT_BYTES + 1 - kept.len();
            kept.extend_from_slice(&buffer[..n.min(room)]);
        }
    }
    kept
}

/// How a supervised job's process ended.
pub(crate) enum Supervised {
    /// It exited by itself: its status and its captured output.
    Finished(std::io::Result<std::process::ExitStatus>, Vec<u8>, Vec<u8>),
    /// It must be stopped (timeout or cancel); the caller kills it.
    Stop(JobEnd),
}

/// Runs a job's process to its end, pumping its output, and stops waiting
/// at the job's timeout or when it is cancelled. Shared by the drivers that
/// run a real process (`process` runs the job, `oci` runs `runc run`).
pub(crate) async fn supervise(child: &mut tokio::process::Child, job: &JobSpec) -> Supervised {
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Supervised::Finished(
            Err(std::io::Error::other("the job's output is not piped")),
            Vec::new(),
            Vec::new(),
        );
    };
    let read_out = pump(&mut stdout, job.output.clone(), Stream::Stdout);
    let read_err = pump(&mut stderr, job.output.clone(), Stream::Stderr);
    let wait = async { tokio::join!(child.wait(), read_out, read_err) };
    let mut cancel = job.cancel.clone();
    let limit = job.timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
    tokio::select! {
        (status, out, err) = wait => Supervised::Finished(status, out, err),
        _ = tokio::time::sleep(limit) => Supervised::Stop(JobEnd::TimedOut),
        _ = cancelled(&mut cancel) => Supervised::Stop(JobEnd::Cancelled),
    }
}

/// Resolves when the job is told to stop.
pub(crate) async fn cancelled(cancel: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *cancel.borrow() {
            return;
        }
        if cancel.changed().await.is_err() {
            // The sender is gone: nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

impl JobOutcome {
    /// The outcome of a job from its end and captured output, each stream
    /// kept to [`MAX_CAPTURED_OUTPUT_BYTES`]; resource figures unknown.
    pub(crate) fn captured(end: JobEnd, stdout: &[u8], stderr: &[u8], wall_ms: u64) -> Self {
        let (stdout, out_cut) = capped_text(stdout);
        let (stderr, err_cut) = capped_text(stderr);
        JobOutcome {
            end,
            stdout,
            stderr,
            output_truncated: out_cut || err_cut,
            wall_ms,
            cpu_ms: None,
            peak_memory_bytes: None,
            oom_killed: false,
        }
    }
}

/// Keeps at most [`MAX_CAPTURED_OUTPUT_BYTES`], cut at a character boundary.
pub(crate) fn capped_text(bytes: &[u8]) -> (String, bool) {
    if bytes.len() <= MAX_CAPTURED_OUTPUT_BYTES {
        return (String::from_utf8_lossy(bytes).into_owned(), false);
    }
    let text = String::from_utf8_lossy(&bytes[..MAX_CAPTURED_OUTPUT_BYTES]).into_owned();
    (text, true)
}
