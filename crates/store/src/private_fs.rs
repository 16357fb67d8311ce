//! Private files and directories: data directories are 0700, secrets and
//! databases 0600, and a directory or key file that group or others can
//! read is refused at start with the command that fixes it, as ssh does.
//! Every other local user of the machine is treated as hostile: a readable
//! signing key or database lets them forge lease keys.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a path is not private enough, or could not be made so.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFsError {
    #[error("refusing to use {path}: it is open to group or others (mode {mode:04o}); fix it with: chmod {fix:o} {path}")]
    OpenToOthers { path: String, mode: u32, fix: u32 },
    #[error("refusing to use {path}: it belongs to uid {owner}, not to this user (uid {me}); fix it with: chown {me} {path}")]
    WrongOwner { path: String, owner: u32, me: u32 },
    #[error("refusing to use {path}: it is not a {expected}")]
    WrongKind {
        path: String,
        expected: &'static str,
    },
    #[error("cannot use {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_error(path: &Path, source: std::io::Error) -> PrivateFsError {
    PrivateFsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `path` (and missing parents) as 0700, or checks that an existing
/// one is a directory of ours that group and others cannot open.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateFsError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => check_private(path, true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| io_error(path, e))?;
            // The umask may have narrowed the mode further, never widened it;
            // set it exactly so the check below and later starts agree.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io_error(path, e))
        }
        Err(error) => Err(io_error(path, error)),
    }
}

/// Checks a file that holds a secret (a key, a token): ours, a regular
/// file, and not readable by group or others. A missing file is fine.
pub fn check_private_file(path: &Path) -> Result<(), PrivateFsError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => check_private(path, false),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error(path, error)),
    }
}

fn check_private(path: &Path, directory: bool) -> Result<(), PrivateFsError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
    let kind_ok = if directory {
        metadata.is_dir()
    } else {
        metadata.is_file()
    };
    if !kind_ok {
        return Err(PrivateFsError::WrongKind {
            path: path.display().to_string(),
            expected: if directory {
                "directory"
            } else {
                "regular file"
            },
        });
    }
    let me = effective_uid();
    if metadata.uid() != me {
        return Err(PrivateFsError::WrongOwner {
            path: path.display().to_string(),
            owner: metadata.uid(),
            me,
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFsError::OpenToOthers {
            path: path.display().to_string(),
            mode,
            fix: if directory { 0o700 } else { 0o600 },
        });
    }
    Ok(())
}

fn effective_uid() -> u32 {
    // The owner of a file we just made is our effective uid; reading it from
    // /proc avoids an unsafe libc call in this crate.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2))
                .and_then(|uid| uid.parse().ok())
        })
        .unwrap_or(0)
}

/// Writes a secret to `path` as 0600, atomically: a temporary file in the
/// same directory, fsynced, then renamed over the target.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), PrivateFsError> {
    let temporary = temporary_sibling(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&temporary)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        io_error(path, e)
    })
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Reads a secret file after checking it is private; trims whitespace.
pub fn read_private_file(path: &Path) -> Result<String, PrivateFsError> {
    if !path.exists() {
        return Err(io_error(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    check_private_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    Ok(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_0700_and_passes_the_check() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        ensure_private_dir(&dir).unwrap();
    }

    #[test]
    fn a_directory_open_to_others_is_refused_with_the_fix() {
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = ensure_private_dir(top.path()).unwrap_err().to_string();
        assert!(error.contains("chmod 700"), "{error}");
        assert!(error.contains("0755"), "{error}");
    }

    #[test]
    fn a_secret_file_is_0600_and_a_readable_one_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let path = top.path().join("secret");
        write_private_file(&path, b"s3cret\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_private_file(&path).unwrap(), "s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let error = read_private_file(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }

    #[test]
    fn a_symlink_is_not_taken_for_a_directory() {
        let top = tempfile::tempdir().unwrap();
        let link = top.path().join("link");
        std::os::unix::fs::symlink(top.path(), &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link),
            Err(PrivateFsError::WrongKind { .. })
        ));
    }
}
