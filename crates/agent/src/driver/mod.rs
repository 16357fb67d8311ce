//! Partition drivers (logical partition control unit 3): they build a
//! partition from its allocation (FIG. 5, S1-S8), run jobs in it, and wipe
//! it when its lease ends. All drivers sit behind [`PartitionDriver`], so
//! the agent's state machine, key check and lock are the same for each.

pub mod process;
pub mod sim;

use leasehold_core::Terms;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Most bytes of stdout, and separately of stderr, kept per job.
pub const MAX_CAPTURED_OUTPUT_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot build partition {index}: {problem}")]
    Build { index: u32, problem: String },
    #[error("cannot start the job: {0}")]
    Start(String),
    #[error("cannot wipe partition {index}: {problem}")]
    Wipe { index: u32, problem: String },
}

/// What a driver needs to know about a partition.
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    pub index: u32,
    pub terms: Terms,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub partition: PartitionSpec,
    pub command: Vec<String>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    Exited(i32),
    /// Killed by a signal (number).
    Signalled(i32),
    TimedOut,
}

#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub end: JobEnd,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub wall_ms: u64,
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
}

/// Which driver to use.
#[derive(Debug, Clone)]
pub enum DriverKind {
    Process { root_dir: PathBuf },
    Sim { images: Vec<String> },
}

pub fn make_driver(kind: &DriverKind) -> Box<dyn PartitionDriver> {
    match kind {
        DriverKind::Process { root_dir } => Box::new(process::ProcessDriver::new(root_dir.clone())),
        DriverKind::Sim { images } => Box::new(sim::SimDriver::new(images.clone())),
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
