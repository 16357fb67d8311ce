//! Host uid/gid ranges for `oci` partitions, and the user namespaces jobs
//! run in.
//!
//! Each partition owns a slot: host ids `FIRST_HOST_ID + slot x IDS_PER_SLOT`
//! onwards, mapped to ids 0..65536 inside its jobs' user namespace, so no two
//! partitions (of this agent or of any other on the machine) share a host
//! uid. Slots are claimed in one machine-wide directory: a claim is a symlink
//! named after the slot that points at the partition's directory, made under
//! a lock; a claim whose partition directory is gone (wiped, or its agent's
//! data removed) is stale and is taken over. A partition keeps its slot, and
//! so its files' owner, across agent restarts.
//!
//! The range starts at 2^30: far above the ranges Debian hands out in
//! /etc/subuid (100000 onwards, 65536 per user) and below 2^31, which some
//! tools read as a negative id.
//!
//! The user namespace of a job is made by the agent, not by runc: a holder
//! process that already runs as the partition's host root id makes it, so the
//! namespace is *owned* by that id. The kernel charges per-user limits (such
//! as inotify instances) to the namespace's owner in the parent namespace;
//! had runc made it as root, every partition would share (and could exhaust)
//! root's count. runc then joins the namespace by path.
// Unsafe: fork/exec of the namespace holder and its id maps; each block says why it is sound.
#![allow(unsafe_code)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where every agent of this machine claims its partitions' id ranges.
pub const SLOT_CLAIMS_DIR: &str = "/var/lib/leasehold/uid-slots";
/// The first host uid/gid given to partitions.
pub const FIRST_HOST_ID: u32 = 1 << 30;
/// Ids per partition: a full 16-bit range, so images' usual ids all map.
pub const IDS_PER_SLOT: u32 = 65536;
/// Slots on one machine (ids up to 2^30 + 2^28, well below 2^31).
pub const MAX_SLOTS: u32 = 4096;

/// The host ids of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub slot: u32,
}

impl IdRange {
    /// The host id that id 0 inside the namespace maps to.
    pub fn first_host_id(&self) -> u32 {
        FIRST_HOST_ID + self.slot * IDS_PER_SLOT
    }

    /// The host id of `inside_id` in the partition's namespace.
    pub fn host_id(&self, inside_id: u32) -> u32 {
        self.first_host_id() + inside_id
    }

    /// runc's `uidMappings`/`gidMappings` entry.
    pub fn mapping(&self) -> serde_json::Value {
        serde_json::json!([{"containerID": 0, "hostID": self.first_host_id(), "size": IDS_PER_SLOT}])
    }
}

/// Holds the machine-wide claims lock while alive.
struct ClaimsLock {
    _file: std::fs::File,
}

fn lock_claims(dir: &Path) -> Result<ClaimsLock, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // The claims name every partition directory of the machine: root's only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; it is released when the
    // file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(ClaimsLock { _file: file })
}

/// The claims: slot and the partition directory it points at.
fn read_claims(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let slot = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((slot, std::fs::read_link(entry.path()).ok()?))
        })
        .collect()
}

/// The slot of the partition in `partition_dir` (which must exist): the one
/// it already holds, else the lowest free or stale one.
pub fn claim_slot(claims_dir: &Path, partition_dir: &Path) -> Result<IdRange, String> {
    let _lock = lock_claims(claims_dir)?;
    let claims = read_claims(claims_dir);
    if let Some((slot, _)) = claims.iter().find(|(_, target)| target == partition_dir) {
        return Ok(IdRange { slot: *slot });
    }
    for slot in 0..MAX_SLOTS {
        let taken = claims
            .iter()
            .any(|(claimed, target)| *claimed == slot && target.exists());
        if taken {
            continue;
        }
        let link = claims_dir.join(slot.to_string());
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("remove stale claim {}: {e}", link.display()))
            }
            _ => {}
        }
        std::os::unix::fs::symlink(partition_dir, &link)
            .map_err(|e| format!("claim {}: {e}", link.display()))?;
        return Ok(IdRange { slot });
    }
    Err(format!(
        "all {MAX_SLOTS} uid ranges of this machine are taken ({})",
        claims_dir.display()
    ))
}

/// Gives up the slot of `partition_dir`, if it holds one.
pub fn release_slot(claims_dir: &Path, partition_dir: &Path) -> Result<(), String> {
    if !claims_dir.exists() {
        return Ok(());
    }
    let _lock = lock_claims(claims_dir)?;
    for (slot, target) in read_claims(claims_dir) {
        if target == partition_dir {
            let link = claims_dir.join(slot.to_string());
            std::fs::remove_file(&link).map_err(|e| format!("remove {}: {e}", link.display()))?;
        }
    }
    Ok(())
}

/// A process that holds a fresh user namespace, owned by the partition's
/// host root id and mapped to its range, for runc to join. The namespace
/// lives on in the job's processes once runc has joined it; the holder is
/// killed when this is dropped (and exits by itself if the agent dies, as
/// its stdin closes).
pub struct NamespaceHolder {
    child: Child,
}

impl NamespaceHolder {
    pub fn start(range: IdRange) -> Result<NamespaceHolder, String> {
        let host_root = range.first_host_id();
        let mut command = Command::new("cat");
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe system calls
        // run, touching no memory shared with other threads.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(host_root, host_root, host_root) != 0
                    || libc::setresuid(host_root, host_root, host_root) != 0
                    || libc::unshare(libc::CLONE_NEWUSER) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start the user namespace holder (cat): {e}"))?;
        let holder = NamespaceHolder { child };
        let map = format!("0 {host_root} {IDS_PER_SLOT}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{file}", holder.child.id());
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(map.as_bytes()))
                .map_err(|e| format!("write {path}: {e}"))?;
        }
        Ok(holder)
    }

    /// The path runc joins.
    pub fn namespace_path(&self) -> String {
        format!("/proc/{}/ns/user", self.child.id())
    }
}

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_do_not_overlap_and_stay_below_two_to_the_31() {
        let first = IdRange { slot: 0 };
        let second = IdRange { slot: 1 };
        assert_eq!(first.host_id(IDS_PER_SLOT - 1) + 1, second.first_host_id());
        let last = IdRange {
            slot: MAX_SLOTS - 1,
        };
        assert!((last.host_id(IDS_PER_SLOT - 1) as u64) < (1u64 << 31));
        assert!(
            first.first_host_id() > 100_000 + 65536 * 1000,
            "above /etc/subuid ranges"
        );
    }

    #[test]
    fn partitions_get_distinct_slots_keep_them_and_stale_claims_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let claims = dir.path().join("claims");
        let a = dir.path().join("agent-1/partition-1");
        let b = dir.path().join("agent-2/partition-1");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let slot_a = claim_slot(&claims, &a).unwrap();
        let slot_b = claim_slot(&claims, &b).unwrap();
        assert_ne!(slot_a, slot_b);
        assert_eq!(claim_slot(&claims, &a).unwrap(), slot_a, "kept");
        // A's partition is wiped without releasing: its claim is stale.
        std::fs::remove_dir_all(&a).unwrap();
        let c = dir.path().join("agent-3/partition-7");
        std::fs::create_dir_all(&c).unwrap();
        assert_eq!(
            claim_slot(&claims, &c).unwrap(),
            slot_a,
            "stale slot reused"
        );
        release_slot(&claims, &b).unwrap();
        assert!(!claims.join(slot_b.slot.to_string()).exists());
    }
}
