//! Small file helpers: bounded reads, atomic JSON writes, a lock file, a
//! hashing writer, and the index.json format shared by store and cache.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ImageEntry, ImageError, MAX_INDEX_BYTES};

pub(crate) const INDEX_VERSION: u32 = 1;

/// index.json of a store or a cache: name -> entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IndexFile {
    pub version: u32,
    pub images: BTreeMap<String, ImageEntry>,
}

impl Default for IndexFile {
    fn default() -> Self {
        IndexFile {
            version: INDEX_VERSION,
            images: BTreeMap::new(),
        }
    }
}

/// Reads index.json; a missing file is an empty index.
pub(crate) fn read_index(path: &Path) -> Result<IndexFile, ImageError> {
    let bytes = match read_bounded(path, MAX_INDEX_BYTES) {
        Ok(bytes) => bytes,
        Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(IndexFile::default())
        }
        Err(e) => return Err(e),
    };
    let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
        path: path.display().to_string(),
        reason: format!("the index does not parse ({e}); restore it from a backup or remove it and add the images again"),
    })?;
    if index.version != INDEX_VERSION {
        return Err(ImageError::Corrupt {
            path: path.display().to_string(),
            reason: format!(
                "index version {} is not supported (this build reads version {INDEX_VERSION}); use a matching leasehold",
                index.version
            ),
        });
    }
    Ok(index)
}

/// Writes index.json so that readers see the old or the new file, never half
/// of one, with permission bits `mode` (a store's index is public, a cache's
/// is not).
pub(crate) fn write_index(path: &Path, index: &IndexFile, mode: u32) -> Result<(), ImageError> {
    let bytes = serde_json::to_vec_pretty(index)
        .map_err(|e| ImageError::Internal(format!("cannot encode the index: {e}")))?;
    write_atomic(path, &bytes, mode)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".index-")
        .tempfile_in(dir)
        .map_err(|e| ImageError::io(dir, e))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| ImageError::io(tmp.path(), e))?;
    set_mode(tmp.path(), mode)?;
    tmp.persist(path)
        .map_err(|e| ImageError::io(path, e.error))?;
    sync_dir(dir);
    Ok(())
}

/// Best effort: makes a rename in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates `dir` and its missing parents with `mode`, and sets `mode` on
/// `dir` itself even if it existed (a cache made by an older build was 0755).
pub(crate) fn create_private_dir(dir: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| ImageError::io(dir, e))?;
    set_mode(dir, mode)
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(path, e))
}

/// Reads a whole file, refusing one over `limit` bytes.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(ImageError::TooLarge {
            what: path.display().to_string(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// An exclusive flock(2) on a lock file, released when dropped.
pub(crate) struct LockFile {
    _file: File,
}

impl LockFile {
    #[allow(unsafe_code)]
    pub(crate) fn acquire(path: &Path) -> Result<LockFile, ImageError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ImageError::io(path, e))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(LockFile { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(ImageError::io(path, e));
            }
        }
    }
}

#[allow(unsafe_code)]
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashingWriter<W> {
    pub inner: W,
    pub hasher: Sha256,
    pub bytes: u64,
}

impl<W> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Yields exactly `remaining` bytes of `inner`, failing if it ends sooner
/// (a file that shrank while it was being archived).
pub(crate) struct ExactReader<R> {
    pub inner: R,
    pub remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being archived; try again when nothing writes to it",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}
