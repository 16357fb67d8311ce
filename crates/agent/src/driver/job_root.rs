//! Where runc finds a job's root filesystem. runc mounts the root from
//! inside the job's user namespace, as the partition's host root id, which
//! may not pass through the agent's data directory or the image cache (both
//! 0700: no local user may read them). So each job gets a read-only bind
//! mount of its image under `/run/leasehold/<instance>/roots/`, a runtime
//! directory that every user may traverse but not list; the image files are
//! content-addressed public data without set-id bits, and the data directory
//! keeps its 0700.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The runtime directory of an agent instance's job roots.
pub fn roots_dir(instance: &str) -> PathBuf {
    PathBuf::from("/run/leasehold").join(instance).join("roots")
}

/// A job's root: a read-only bind mount, undone when dropped.
pub struct JobRoot {
    target: PathBuf,
}

impl JobRoot {
    /// Bind-mounts `image_rootfs` read-only at `roots_dir/<job id>`.
    pub fn mount(roots_dir: &Path, job_id: &str, image_rootfs: &Path) -> Result<JobRoot, String> {
        make_traversable_dirs(roots_dir)?;
        let target = roots_dir.join(job_id);
        std::fs::create_dir_all(&target)
            .map_err(|e| format!("create {}: {e}", target.display()))?;
        let root = JobRoot { target };
        bind_read_only(image_rootfs, &root.target)?;
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for JobRoot {
    fn drop(&mut self) {
        unmount_detached(&self.target);
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// Creates `dir` and its missing parents as root's, 0711: traversable by
/// everyone (runc inside a user namespace), listable by nobody else.
fn make_traversable_dirs(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    for ancestor in dir.ancestors().take_while(|a| *a != Path::new("/run")) {
        std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("chmod 711 {}: {e}", ancestor.display()))?;
    }
    Ok(())
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))
}

fn bind_read_only(source: &Path, target: &Path) -> Result<(), String> {
    let source_c = c_path(source)?;
    let target_c = c_path(target)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the
    // calls; a NULL filesystem type and data are allowed for bind mounts.
    let bound = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if bound != 0 {
        return Err(format!(
            "bind {} at {}: {}",
            source.display(),
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    // A bind mount takes its flags from a remount: read-only, no set-id, no
    // devices, whatever the image holds.
    let flags =
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: as above; the target is the mount made just now.
    let remounted = unsafe {
        libc::mount(
            std::ptr::null(),
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if remounted != 0 {
        let error = std::io::Error::last_os_error();
        unmount_detached(target);
        return Err(format!("remount {} read-only: {error}", target.display()));
    }
    Ok(())
}

/// Unmounts `target` (lazily, so a straggler cannot keep it busy).
pub fn unmount_detached(target: &Path) {
    if let Ok(target_c) = c_path(target) {
        // SAFETY: a valid NUL-terminated path; failure is harmless here.
        unsafe {
            libc::umount2(target_c.as_ptr(), libc::MNT_DETACH);
        }
    }
}
