//! Snapshots of booted VMs, so a job starts in well under a second instead
//! of a whole boot under TCG. The first job of a partition shape (image
//! digest, vCPUs, memory, disk size, acceleration) boots the image until its
//! init says it is ready (modules loaded, disk not read), has QEMU migrate
//! the running VM to a file through QMP, and stops it; every job of that
//! shape then resumes a copy (`-incoming file:`) with its own fw_cfg files:
//! `go` 1, its command, fresh randomness and the time. A snapshot holds only
//! what the image's boot made, never a borrower's data, so partitions of one
//! shape share it. Each copy gets a new VM generation id (QEMU's vmgenid),
//! on which the guest kernel reseeds its random generator, and mixes in a
//! seed of its own. Files are root's (0600 in a 0700 directory).

use super::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Longest a boot to a snapshot may take (TCG on a capped, busy core).
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);
/// How often the migration's progress is asked for.
const MIGRATION_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// What a snapshot is booted from.
pub(super) struct Boot<'a> {
    pub partition: &'a PartitionSpec,
    /// The image's directory in the cache, named by its digest.
    pub image_root: &'a Path,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub cgroup_procs: &'a [PathBuf],
}

/// The fw_cfg files of a VM booting for a snapshot: `go` 0 (wait), and
/// blanks of the sizes jobs will have; `go-1` is what jobs get.
pub(super) fn write_fixed_files(dir: &Path) -> Result<(), String> {
    write_private(&dir.join("go-0"), b"0")?;
    write_private(&dir.join("go-1"), b"1")?;
    write_private(&dir.join("argv-blank"), &vec![b' '; ARGV_FILE_BYTES])?;
    write_private(&dir.join("seed-blank"), &[0u8; SEED_FILE_BYTES])?;
    write_private(&dir.join("time-blank"), &[b' '; TIME_FILE_BYTES])
}

/// FNV-1a, to name a snapshot after what it depends on.
fn short_hash(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{:08x}", hash as u32)
}

impl VmDriver {
    /// The snapshot file for a shape: the image's digest, the terms QEMU
    /// is given, the acceleration and QEMU's own version and arguments.
    fn snapshot_path(&self, boot: &Boot<'_>) -> PathBuf {
        let terms = &boot.partition.terms;
        let image = boot
            .image_root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let depends_on = format!(
            "{}|{GUEST_KERNEL_ARGUMENTS}|{TCG_CACHE_MIB}|vmgenid|{}",
            self.qemu_version,
            boot.kernel.display()
        );
        self.snapshots_dir().join(format!(
            "{image}-c{}-m{}-d{}-{}-{}.state",
            terms.vcpus,
            terms.memory_mib,
            terms.disk_gib,
            self.acceleration.as_str(),
            short_hash(&depends_on)
        ))
    }

    /// The snapshot for the job's shape, made first if there is none.
    pub(super) async fn snapshot(&self, boot: &Boot<'_>) -> Result<PathBuf, DriverError> {
        let path = self.snapshot_path(boot);
        if path.is_file() {
            return Ok(path);
        }
        let _making = self.snapshot_lock.lock().await;
        if !path.is_file() {
            self.make_snapshot(boot, &path).await?;
        }
        Ok(path)
    }

    /// Boots the image for a snapshot and saves it to `target`.
    async fn make_snapshot(&self, boot: &Boot<'_>, target: &Path) -> Result<(), DriverError> {
        let fail =
            |problem: String| DriverError::Start(format!("cannot snapshot the VM: {problem}"));
        let index = boot.partition.index;
        let dir = self.snapshots_dir();
        let partial = target.with_extension("partial");
        // A disk of the partition's size (the guest sees its capacity);
        // sparse and never written: the guest does not read it yet.
        let disk = dir.join(format!("disk-{}.img", std::process::id()));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(boot.partition.terms.disk_gib.saturating_mul(1 << 30)))
            .map_err(|e| fail(format!("make {}: {e}", disk.display())))?;
        let launch = VmLaunch {
            terms: &boot.partition.terms,
            name: self.vm_name(index),
            kernel: boot.kernel.to_path_buf(),
            initramfs: boot.initramfs.to_path_buf(),
            disk: disk.clone(),
            files: FwCfgFiles {
                go: dir.join("go-0"),
                argv: dir.join("argv-blank"),
                seed: dir.join("seed-blank"),
                time: dir.join("time-blank"),
            },
            start: VmStart::Boot,
            cgroup_procs: boot.cgroup_procs.to_vec(),
        };
        let started = Instant::now();
        let made = match self.spawn_qemu(&launch) {
            Ok((mut child, status)) => {
                self.write_pidfile(index, child.id());
                let saved = tokio::time::timeout(
                    SNAPSHOT_TIMEOUT,
                    save_when_ready(&mut child, status, &partial),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(format!("the VM was not ready within {SNAPSHOT_TIMEOUT:?}"))
                });
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = std::fs::remove_file(self.pidfile(index));
                saved
            }
            Err(error) => Err(error.to_string()),
        };
        let _ = std::fs::remove_file(&disk);
        if let Err(problem) = made {
            let _ = std::fs::remove_file(&partial);
            return Err(fail(problem));
        }
        crate::driver::oci::set_mode(&partial, 0o600).map_err(&fail)?;
        std::fs::rename(&partial, target).map_err(|e| fail(format!("rename: {e}")))?;
        tracing::info!(
            snapshot = %target.display(),
            took_ms = started.elapsed().as_millis() as u64,
            "booted a VM and saved its snapshot"
        );
        Ok(())
    }
}

/// Waits for the guest's ready line on the trailer pipe, then migrates the
/// VM to `file` through QMP on QEMU's stdio and quits QEMU.
async fn save_when_ready(
    child: &mut tokio::process::Child,
    status: OwnedFd,
    file: &Path,
) -> Result<(), String> {
    wait_until_ready(status).await?;
    let stdin = child.stdin.take().ok_or("QEMU's stdin is not piped")?;
    let stdout = child.stdout.take().ok_or("QEMU's stdout is not piped")?;
    let mut qmp = Qmp {
        stdin,
        lines: tokio::io::BufReader::new(stdout).lines(),
    };
    qmp.call(serde_json::json!({"execute": "qmp_capabilities"}))
        .await?;
    let uri = format!("file:{}", file.display());
    qmp.call(serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}))
        .await?;
    loop {
        let answer = qmp
            .call(serde_json::json!({"execute": "query-migrate"}))
            .await?;
        match answer["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(format!(
                    "the migration to {} failed: {answer}",
                    file.display()
                ))
            }
            _ => tokio::time::sleep(MIGRATION_POLL).await,
        }
    }
    let _ = qmp.call(serde_json::json!({"execute": "quit"})).await;
    Ok(())
}

/// Reads the trailer pipe until the guest says it is ready.
async fn wait_until_ready(status: OwnedFd) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(status)
        .map_err(|e| format!("read the VM's trailer pipe: {e}"))?;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 256];
    loop {
        let n = pipe
            .read(&mut buffer)
            .await
            .map_err(|e| format!("read the VM's trailer pipe: {e}"))?;
        if n == 0 {
            let said = String::from_utf8_lossy(&seen).trim().to_string();
            return Err(format!("the VM stopped before it was ready ({said})"));
        }
        if seen.len() < STATUS_BYTES_KEPT {
            seen.extend_from_slice(&buffer[..n]);
        }
        if String::from_utf8_lossy(&seen).contains(leasehold_images::READY_TRAILER) {
            return Ok(());
        }
    }
}

/// QEMU's machine protocol on its stdio: one JSON object a line.
struct Qmp {
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Qmp {
    /// Sends a command and answers its `return`, skipping the greeting and
    /// events; an `error` answer is an error.
    async fn call(&mut self, command: serde_json::Value) -> Result<serde_json::Value, String> {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let Some(answer) = self
                .lines
                .next_line()
                .await
                .map_err(|e| format!("QMP read: {e}"))?
            else {
                return Err("QEMU closed its QMP channel".into());
            };
            let Ok(answer) = serde_json::from_str::<serde_json::Value>(&answer) else {
                continue;
            };
            if let Some(result) = answer.get("return") {
                return Ok(result.clone());
            }
            if let Some(error) = answer.get("error") {
                return Err(format!("QMP {command}: {error}"));
            }
        }
    }
}
