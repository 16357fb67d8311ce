//! The `process` driver: each job is a real child process of the agent, run
//! in the partition's own working directory under the partition's limits
//! where the kernel allows without containers: address space (memory), file
//! size (disk), no core dumps, its own session so a timeout kills the whole
//! process group, and, when the agent runs as root, an unprivileged user
//! with a process-count limit. CPU caps are not enforced here (the `oci`
//! driver enforces them with cgroups). It is for development and for trusted
//! lending inside one organisation, not for strangers.

use super::{BoxFuture, DriverError, JobEnd, JobOutcome, JobSpec, PartitionDriver, PartitionSpec};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

/// The user jobs run as when the agent is root: `nobody`.
const UNPRIVILEGED_UID: u32 = 65534;
const UNPRIVILEGED_GID: u32 = 65534;
/// Processes a job may have at once when it runs as the unprivileged user.
const MAX_PROCESSES: u64 = 256;

pub struct ProcessDriver {
    root_dir: PathBuf,
    run_as_unprivileged: bool,
}

impl ProcessDriver {
    pub fn new(root_dir: PathBuf) -> Self {
        // SAFETY: geteuid has no preconditions.
        let is_root = unsafe { libc::geteuid() } == 0;
        ProcessDriver {
            root_dir,
            run_as_unprivileged: is_root,
        }
    }

    fn work_dir(&self, index: u32) -> PathBuf {
        self.root_dir
            .join(format!("partition-{index}"))
            .join("work")
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; it is async-signal-safe.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl PartitionDriver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn images(&self) -> Vec<String> {
        // Jobs run on the host's own operating system.
        vec!["host".to_string()]
    }

    fn build(&self, partition: &PartitionSpec) -> Result<(), DriverError> {
        let dir = self.work_dir(partition.index);
        let fail = |problem: String| DriverError::Build {
            index: partition.index,
            problem,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
        if self.run_as_unprivileged {
            std::os::unix::fs::chown(&dir, Some(UNPRIVILEGED_UID), Some(UNPRIVILEGED_GID))
                .map_err(|e| fail(format!("chown {}: {e}", dir.display())))?;
            // The path down to the work directory must be traversable.
            let mut parent = dir.parent();
            while let Some(p) = parent {
                if p == self.root_dir.parent().unwrap_or(&self.root_dir) {
                    break;
                }
                use std::os::unix::fs::PermissionsExt;
                if let Ok(meta) = std::fs::metadata(p) {
                    let mut perms = meta.permissions();
                    perms.set_mode(perms.mode() | 0o711);
                    let _ = std::fs::set_permissions(p, perms);
                }
                parent = p.parent();
            }
        }
        Ok(())
    }

    fn run_job(&self, job: JobSpec) -> BoxFuture<'_, Result<JobOutcome, DriverError>> {
        Box::pin(async move {
            let dir = self.work_dir(job.partition.index);
            if !dir.is_dir() {
                return Err(DriverError::Start(format!(
                    "partition {} is not built",
                    job.partition.index
                )));
            }
            let memory_bytes = job.partition.terms.memory_mib.saturating_mul(1024 * 1024);
            let file_bytes = job
                .partition
                .terms
                .disk_gib
                .saturating_mul(1024 * 1024 * 1024);
            let unprivileged = self.run_as_unprivileged;
            let mut command = tokio::process::Command::new(&job.command[0]);
            command
                .args(&job.command[1..])
                .current_dir(&dir)
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
                .env("HOME", &dir)
                .env("LEASEHOLD_PARTITION", job.partition.index.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            // SAFETY: the closure only calls async-signal-safe libc functions.
            unsafe {
                command.pre_exec(move || {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    set_limit(libc::RLIMIT_AS, memory_bytes)?;
                    set_limit(libc::RLIMIT_FSIZE, file_bytes)?;
                    set_limit(libc::RLIMIT_CORE, 0)?;
                    if unprivileged {
                        set_limit(libc::RLIMIT_NPROC, MAX_PROCESSES)?;
                        if libc::setgroups(0, std::ptr::null()) != 0
                            || libc::setgid(UNPRIVILEGED_GID) != 0
                            || libc::setuid(UNPRIVILEGED_UID) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            let started = Instant::now();
            let mut child = command
                .spawn()
                .map_err(|e| DriverError::Start(format!("{}: {e}", job.command[0])))?;
            let pid = child.id();
            let (end, out, err) = match super::supervise(&mut child, &job).await {
                super::Supervised::Finished(status, out, err) => {
                    let status = status.map_err(|e| DriverError::Start(format!("wait: {e}")))?;
                    use std::os::unix::process::ExitStatusExt;
                    let end = match (status.code(), status.signal()) {
                        (Some(code), _) => JobEnd::Exited(code),
                        (None, Some(signal)) => JobEnd::Signalled(signal),
                        (None, None) => JobEnd::Exited(-1),
                    };
                    (end, out, err)
                }
                super::Supervised::Stop(end) => {
                    if let Some(pid) = pid {
                        // SAFETY: kill with a negative pid signals the job's process group.
                        unsafe {
                            libc::kill(-(pid as i32), libc::SIGKILL);
                        }
                    }
                    let _ = child.wait().await;
                    (end, Vec::new(), Vec::new())
                }
            };
            Ok(JobOutcome::captured(
                end,
                &out,
                &err,
                started.elapsed().as_millis() as u64,
            ))
        })
    }

    fn wipe(&self, index: u32) -> Result<(), DriverError> {
        let dir = self.root_dir.join(format!("partition-{index}"));
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::Wipe {
                index,
                problem: format!("{}: {e}", dir.display()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::Terms;

    fn spec(index: u32) -> PartitionSpec {
        PartitionSpec {
            index,
            terms: Terms {
                vcpus: 1,
                cpu_cap_percent: 50,
                memory_mib: 512,
                disk_gib: 1,
                images: vec!["host".into()],
                price_per_hour_micros: 1,
                isolation: None,
            },
        }
    }

    fn job(index: u32, command: &[&str], timeout_ms: Option<u64>) -> JobSpec {
        JobSpec {
            partition: spec(index),
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_ms.map(std::time::Duration::from_millis),
            image: None,
            cancel: tokio::sync::watch::channel(false).1,
            output: None,
        }
    }

    #[tokio::test]
    async fn runs_in_its_own_directory_with_exit_code_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let driver = ProcessDriver::new(dir.path().to_path_buf());
        driver.build(&spec(1)).unwrap();
        let outcome = driver
            .run_job(job(
                1,
                &[
                    "sh",
                    "-c",
                    "echo out; echo err >&2; touch made; pwd; exit 3",
                ],
                None,
            ))
            .await
            .unwrap();
        assert_eq!(outcome.end, JobEnd::Exited(3));
        assert!(outcome.stdout.starts_with("out\n"));
        assert!(
            outcome.stdout.trim_end().ends_with("partition-1/work"),
            "{}",
            outcome.stdout
        );
        assert_eq!(outcome.stderr, "err\n");
        assert!(dir.path().join("partition-1/work/made").exists());
        driver.wipe(1).unwrap();
        assert!(!dir.path().join("partition-1").exists());
        assert!(driver.run_job(job(1, &["true"], None)).await.is_err());
    }

    #[tokio::test]
    async fn file_size_limit_and_timeout_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let driver = ProcessDriver::new(dir.path().to_path_buf());
        driver.build(&spec(2)).unwrap();
        // 1 GiB limit: writing past it fails with "File too large". The
        // file is sparse up to the seek, so the test writes only 2 MiB.
        let outcome = driver
            .run_job(job(
                2,
                &[
                    "sh",
                    "-c",
                    "dd if=/dev/zero of=big bs=1M seek=1023 count=2 2>/dev/null; echo rc=$?",
                ],
                None,
            ))
            .await
            .unwrap();
        assert!(
            outcome.stdout.contains("rc=") && !outcome.stdout.contains("rc=0"),
            "{outcome:?}"
        );
        let size = std::fs::metadata(dir.path().join("partition-2/work/big"))
            .unwrap()
            .len();
        assert!(size <= 1024 * 1024 * 1024);
        let outcome = driver
            .run_job(job(2, &["sleep", "30"], Some(200)))
            .await
            .unwrap();
        assert_eq!(outcome.end, JobEnd::TimedOut);
    }
}
