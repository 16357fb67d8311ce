//! Checking and unpacking image tars without letting them write outside
//! their target directory.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::chain;
use crate::ImageError;

/// What to do with one entry of an image tar.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// Device nodes and fifos: the container runtime makes its own /dev.
    Skip(&'static str),
}

/// Refuses absolute paths, `..` components, sparse files, hard links that
/// leave the archive, and entry types an image has no use for.
pub(crate) fn check_entry<R: Read>(
    entry: &tar::Entry<'_, R>,
    archive: &str,
) -> Result<Verdict, ImageError> {
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    let unsafe_entry = |reason: &str| ImageError::UnsafeEntry {
        archive: archive.to_string(),
        entry: name.clone(),
        reason: reason.to_string(),
    };
    let path = entry
        .path()
        .map_err(|e| unsafe_entry(&format!("has an unreadable path ({e})")))?;
    check_relative(&path).map_err(&unsafe_entry)?;

    let kind = entry.header().entry_type();
    if kind.is_gnu_sparse() {
        return Err(unsafe_entry(
            "is a sparse file, which images do not support; archive it without --sparse",
        ));
    }
    if kind.is_character_special() || kind.is_block_special() {
        return Ok(Verdict::Skip("device node"));
    }
    if kind.is_fifo() {
        return Ok(Verdict::Skip("fifo"));
    }
    if kind.is_hard_link() {
        let target = entry
            .link_name()
            .map_err(|e| unsafe_entry(&format!("has an unreadable link target ({e})")))?
            .ok_or_else(|| unsafe_entry("is a hard link without a target"))?;
        if check_relative(&target).is_err() {
            return Err(unsafe_entry(&format!(
                "is a hard link to '{}', outside the image",
                target.display()
            )));
        }
        return Ok(Verdict::Keep);
    }
    if kind.is_file()
        || kind.is_contiguous()
        || kind.is_dir()
        || kind.is_symlink()
        || kind.is_pax_global_extensions()
        || kind.is_pax_local_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink()
    {
        return Ok(Verdict::Keep);
    }
    Err(unsafe_entry(&format!(
        "has an entry type ({:?}) that images do not support",
        kind.as_byte() as char
    )))
}

/// `Err(reason)` if `path` is absolute or climbs with `..`.
fn check_relative(path: &Path) -> Result<(), &'static str> {
    for part in path.components() {
        match part {
            Component::Prefix(_) | Component::RootDir => {
                return Err("has an absolute path; image tars hold paths relative to the root")
            }
            Component::ParentDir => {
                return Err("has a '..' path component, which could write outside the image")
            }
            Component::CurDir | Component::Normal(_) => {}
        }
    }
    Ok(())
}

/// Reads a whole tar, checking every entry; returns how many entries it has.
pub(crate) fn verify_tar<R: Read>(reader: R, archive: &str) -> Result<u64, ImageError> {
    let mut tar = tar::Archive::new(reader);
    let corrupt = |e: std::io::Error| ImageError::Corrupt {
        path: archive.to_string(),
        reason: format!("it is not a readable tar ({})", chain(&e)),
    };
    let mut count = 0u64;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        check_entry(&entry, archive)?;
        // Read the data so that a truncated archive is noticed here.
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(corrupt)?;
        count += 1;
    }
    if count == 0 {
        return Err(ImageError::Corrupt {
            path: archive.to_string(),
            reason: "it holds no files (an empty file, or not a tar)".to_string(),
        });
    }
    Ok(count)
}

/// Permission bits never unpacked: setuid, setgid and sticky, and write for
/// group and others. An image's set-id binary would otherwise be a root shell
/// for any local user who can reach the cache, and a world-writable
/// directory a place for one partition to plant files for another.
pub(crate) const UNPACK_MODE_MASK: u32 = 0o7022;

/// Unpacks an image tar into `dst` (which must exist and be empty), keeping
/// permissions minus `UNPACK_MODE_MASK`, and ownership only when running as
/// root. Device nodes and fifos are skipped. Refuses the whole archive on the
/// first unsafe entry; the caller removes `dst` on error.
pub(crate) fn unpack_safely<R: Read>(
    reader: R,
    dst: &Path,
    archive: &str,
) -> Result<(), ImageError> {
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_mask(UNPACK_MODE_MASK);
    tar.set_preserve_ownerships(crate::fsutil::is_root());
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    tar.set_unpack_xattrs(false);
    let dst = dst.canonicalize().map_err(|e| ImageError::io(dst, e))?;
    let corrupt = |e: std::io::Error| ImageError::Corrupt {
        path: archive.to_string(),
        reason: format!("it is not a readable tar ({})", chain(&e)),
    };

    let mut directories = Vec::new();
    let mut count = 0u64;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        count += 1;
        if let Verdict::Skip(what) = check_entry(&entry, archive)? {
            tracing::warn!(
                archive,
                entry = %String::from_utf8_lossy(&entry.path_bytes()),
                "skipping a {what} in an image"
            );
            continue;
        }
        // Directories last, deepest first, so that a read-only directory does
        // not stop its own contents from being written (as tar::Archive::unpack).
        if entry.header().entry_type().is_dir() {
            directories.push(entry);
            continue;
        }
        unpack_one(&mut entry, &dst, archive)?;
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    let mut named_directories = std::collections::HashSet::new();
    for mut dir in directories {
        named_directories.insert(normalized(&dir.path_bytes()));
        unpack_one(&mut dir, &dst, archive)?;
    }
    if count == 0 {
        return Err(ImageError::Corrupt {
            path: archive.to_string(),
            reason: "it holds no files (an empty file, or not a tar)".to_string(),
        });
    }
    strip_masked_bits(&dst, &named_directories)
}

/// A tar path as a relative path without `./` or a trailing slash.
fn normalized(path_bytes: &[u8]) -> PathBuf {
    let text = String::from_utf8_lossy(path_bytes);
    Path::new(text.as_ref())
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// Drops `UNPACK_MODE_MASK` from every entry under `dst` but symlinks (whose
/// mode is unused, and which are not followed). The tar crate makes the
/// directories a tar names only as parents of other entries with the
/// process's umask, not the tar's modes: those become 0755, as OCI image
/// tools make them, so that neither a permissive umask (0) leaves them
/// world-writable nor the agent's umask (077) shuts a job out of them.
fn strip_masked_bits(
    dst: &Path,
    named_directories: &std::collections::HashSet<PathBuf>,
) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![dst.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| ImageError::io(&path, e))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let relative = path.strip_prefix(dst).unwrap_or(&path);
        let implicit_directory = meta.is_dir()
            && !relative.as_os_str().is_empty()
            && !named_directories.contains(relative);
        let wanted = if implicit_directory {
            0o755
        } else {
            mode & !UNPACK_MODE_MASK
        };
        if wanted != mode {
            let kept = std::fs::Permissions::from_mode(wanted);
            std::fs::set_permissions(&path, kept).map_err(|e| ImageError::io(&path, e))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| ImageError::io(&path, e))? {
                pending.push(entry.map_err(|e| ImageError::io(&path, e))?.path());
            }
        }
    }
    Ok(())
}

fn unpack_one<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dst: &Path,
    archive: &str,
) -> Result<(), ImageError> {
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    match entry.unpack_in(dst) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ImageError::UnsafeEntry {
            archive: archive.to_string(),
            entry: name,
            reason: "would be written outside the image".to_string(),
        }),
        Err(e) => {
            let text = chain(&e);
            if text.contains("outside of destination") {
                Err(ImageError::UnsafeEntry {
                    archive: archive.to_string(),
                    entry: name,
                    reason: "would be written through a symlink or link outside the image"
                        .to_string(),
                })
            } else {
                Err(ImageError::Corrupt {
                    path: archive.to_string(),
                    reason: format!("cannot unpack entry '{name}': {text}"),
                })
            }
        }
    }
}
