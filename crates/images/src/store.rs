//! The store: tars under ROOT/blobs/sha256, names in ROOT/index.json.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::NamedTempFile;

use crate::fsutil::{self, ExactReader, HashingWriter, LockFile};
use crate::{digest_hex, digest_of, unpack, validate_name, ImageEntry, ImageError, MAX_BLOB_BYTES};

/// Where Debian's busybox-static puts its binary (merged /usr or not).
const BUSYBOX_PATHS: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];

/// The store on a file server (or the local machine):
/// ROOT/blobs/sha256/<hex>.tar and ROOT/index.json (name -> entry).
///
/// Several processes may add images to one store at once: blobs are written
/// to ROOT/tmp and renamed into place, and index.json is rewritten under an
/// flock(2) on ROOT/.lock by writing a new file and renaming it, so readers
/// (the HTTP server) never see half an index.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    index: PathBuf,
    lock: PathBuf,
}

impl ImageStore {
    /// Opens the store at `root`, creating its directories if missing.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = ImageStore {
            root: root.to_path_buf(),
            blobs: root.join("blobs").join("sha256"),
            tmp: root.join("tmp"),
            index: root.join("index.json"),
            lock: root.join(".lock"),
        };
        for dir in [&store.root, &store.blobs, &store.tmp] {
            fs::create_dir_all(dir).map_err(|e| ImageError::io(dir, e))?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where files being written wait (same filesystem as the blobs).
    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Archives `dir` deterministically (entries sorted by name, mtime 0,
    /// uid/gid 0 and no user names, permission bits kept, symlinks kept as
    /// symlinks, hard links stored as separate files) and adds it as `name`.
    /// The same tree always gives the same digest.
    pub fn add_dir(&self, name: &str, dir: &Path) -> Result<ImageEntry, ImageError> {
        validate_name(name)?;
        let meta = fs::metadata(dir).map_err(|e| ImageError::io(dir, e))?;
        if !meta.is_dir() {
            return Err(ImageError::Unsupported {
                path: dir.to_path_buf(),
                reason: "it is not a directory; give the directory holding the root filesystem"
                    .to_string(),
            });
        }
        let canonical = dir.canonicalize().map_err(|e| ImageError::io(dir, e))?;
        if let Ok(store_root) = self.root.canonicalize() {
            if store_root.starts_with(&canonical) {
                return Err(ImageError::Unsupported {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "it holds the image store itself ({}); give a directory outside the store",
                        self.root.display()
                    ),
                });
            }
        }
        let tmp = self.temp_blob()?;
        let file = tmp.reopen().map_err(|e| ImageError::io(tmp.path(), e))?;
        let writer = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        append_tree(&mut builder, dir, Path::new(""))?;
        let writer = builder
            .into_inner()
            .map_err(|e| ImageError::io(tmp.path(), e))?;
        let HashingWriter {
            inner,
            hasher,
            bytes,
        } = writer;
        let file = inner
            .into_inner()
            .map_err(|e| ImageError::io(tmp.path(), e.into_error()))?;
        file.sync_all().map_err(|e| ImageError::io(tmp.path(), e))?;
        self.commit(name, tmp, digest_of(hasher), bytes)
    }

    /// Adds an existing uncompressed tar as `name`, byte for byte, after
    /// checking that it reads as a tar and that no entry would land outside
    /// the root (absolute paths, `..`).
    pub fn add_tarball(&self, name: &str, tarball: &Path) -> Result<ImageEntry, ImageError> {
        validate_name(name)?;
        let mut source = File::open(tarball).map_err(|e| ImageError::io(tarball, e))?;
        let size = source
            .metadata()
            .map_err(|e| ImageError::io(tarball, e))?
            .len();
        if size > MAX_BLOB_BYTES {
            return Err(ImageError::TooLarge {
                what: tarball.display().to_string(),
                size,
                limit: MAX_BLOB_BYTES,
            });
        }
        let mut magic = [0u8; 6];
        let n = read_up_to(&mut source, &mut magic).map_err(|e| ImageError::io(tarball, e))?;
        if let Some(kind) = compression(&magic[..n]) {
            return Err(ImageError::Corrupt {
                path: tarball.display().to_string(),
                reason: format!(
                    "it is compressed with {kind}; the store keeps plain tars: decompress it first"
                ),
            });
        }
        let tmp = self.temp_blob()?;
        let file = tmp.reopen().map_err(|e| ImageError::io(tmp.path(), e))?;
        let mut writer = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        writer
            .write_all(&magic[..n])
            .map_err(|e| ImageError::io(tmp.path(), e))?;
        io::copy(&mut (&mut source).take(MAX_BLOB_BYTES + 1), &mut writer)
            .map_err(|e| ImageError::io(tarball, e))?;
        let HashingWriter {
            inner,
            hasher,
            bytes,
        } = writer;
        let file = inner
            .into_inner()
            .map_err(|e| ImageError::io(tmp.path(), e.into_error()))?;
        file.sync_all().map_err(|e| ImageError::io(tmp.path(), e))?;
        if bytes > MAX_BLOB_BYTES {
            return Err(ImageError::TooLarge {
                what: tarball.display().to_string(),
                size: bytes,
                limit: MAX_BLOB_BYTES,
            });
        }
        // Check what is stored, not the source, which may change under us.
        let stored = File::open(tmp.path()).map_err(|e| ImageError::io(tmp.path(), e))?;
        unpack::verify_tar(
            BufReader::with_capacity(1 << 20, stored),
            &tarball.display().to_string(),
        )?;
        self.commit(name, tmp, digest_of(hasher), bytes)
    }

    /// Builds a tiny root filesystem from Debian's busybox-static and adds it
    /// as `name`: bin/busybox and one symlink per applet in bin/, sbin,
    /// usr/bin and usr/sbin linking to bin, etc/passwd (root and nobody
    /// 65534), etc/group, and empty proc dev sys tmp work root.
    pub fn build_busybox(&self, name: &str) -> Result<ImageEntry, ImageError> {
        validate_name(name)?;
        let busybox = static_busybox()?;
        let busybox = busybox.as_path();
        let applets = busybox_applets(busybox)?;

        let work = tempfile::Builder::new()
            .prefix("busybox-")
            .tempdir_in(&self.tmp)
            .map_err(|e| ImageError::io(&self.tmp, e))?;
        let root = work.path();
        fsutil::set_mode(root, 0o755)?;
        for (dir, mode) in [
            ("bin", 0o755),
            ("etc", 0o755),
            ("proc", 0o555),
            ("dev", 0o755),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("work", 0o755),
            ("root", 0o700),
            ("usr", 0o755),
        ] {
            let path = root.join(dir);
            fs::create_dir(&path).map_err(|e| ImageError::io(&path, e))?;
            fsutil::set_mode(&path, mode)?;
        }
        let target = root.join("bin/busybox");
        fs::copy(busybox, &target).map_err(|e| ImageError::io(&target, e))?;
        fsutil::set_mode(&target, 0o755)?;
        for applet in &applets {
            let link = root.join("bin").join(applet);
            std::os::unix::fs::symlink("busybox", &link).map_err(|e| ImageError::io(&link, e))?;
        }
        for (link, to) in [
            ("sbin", "bin"),
            ("usr/bin", "../bin"),
            ("usr/sbin", "../bin"),
        ] {
            let link = root.join(link);
            std::os::unix::fs::symlink(to, &link).map_err(|e| ImageError::io(&link, e))?;
        }
        for (file, text) in [
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ] {
            let path = root.join(file);
            fs::write(&path, text).map_err(|e| ImageError::io(&path, e))?;
            fsutil::set_mode(&path, 0o644)?;
        }
        self.add_dir(name, root)
    }

    /// Every image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageEntry>, ImageError> {
        Ok(fsutil::read_index(&self.index)?
            .images
            .into_values()
            .collect())
    }

    pub fn get(&self, name: &str) -> Result<ImageEntry, ImageError> {
        validate_name(name)?;
        fsutil::read_index(&self.index)?
            .images
            .remove(name)
            .ok_or_else(|| ImageError::NotFound {
                name: name.to_string(),
                store: self.root.display().to_string(),
            })
    }

    /// Where the blob of `digest` is (or would be); checks the digest's form only.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest)?;
        Ok(self.blobs.join(format!("{hex}.tar")))
    }

    fn temp_blob(&self) -> Result<NamedTempFile, ImageError> {
        tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".tar.part")
            .tempfile_in(&self.tmp)
            .map_err(|e| ImageError::io(&self.tmp, e))
    }

    /// Moves a finished blob into place and points `name` at it.
    fn commit(
        &self,
        name: &str,
        tmp: NamedTempFile,
        digest: String,
        size_bytes: u64,
    ) -> Result<ImageEntry, ImageError> {
        let path = self.blob_path(&digest)?;
        if path.is_file() {
            // The same content is already stored; the temp file goes away.
            drop(tmp);
        } else {
            // The store is served over HTTP by its own process: no other
            // local user needs to read a blob.
            fsutil::set_mode(tmp.path(), 0o600)?;
            if let Err(e) = tmp.persist_noclobber(&path) {
                if e.error.kind() != io::ErrorKind::AlreadyExists {
                    return Err(ImageError::io(&path, e.error));
                }
            }
            fsutil::sync_dir(&self.blobs);
        }
        let entry = ImageEntry {
            name: name.to_string(),
            digest,
            size_bytes,
        };
        let _lock = LockFile::acquire(&self.lock)?;
        let mut index = fsutil::read_index(&self.index)?;
        index.images.insert(name.to_string(), entry.clone());
        fsutil::write_index(&self.index, &index, 0o600)?;
        tracing::info!(image = name, digest = %entry.digest, size_bytes, "image added");
        Ok(entry)
    }
}

/// Appends the contents of `root/rel` to the archive, sorted by name, recursively.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<HashingWriter<W>>,
    root: &Path,
    rel: &Path,
) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let mut names: Vec<OsString> = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))? {
        names.push(entry.map_err(|e| ImageError::io(&dir, e))?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let rel = rel.join(&name);
        let full = root.join(&rel);
        let meta = fs::symlink_metadata(&full).map_err(|e| ImageError::io(&full, e))?;
        let kind = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.mode() & 0o7777);
        let io_err = |e| ImageError::io(&full, e);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(io_err)?;
            append_tree(builder, root, &rel)?;
        } else if kind.is_file() {
            let size = meta.len();
            let so_far = builder.get_ref().bytes;
            if so_far.saturating_add(size) > MAX_BLOB_BYTES {
                return Err(ImageError::TooLarge {
                    what: format!("the image of {} (at {})", root.display(), full.display()),
                    size: so_far.saturating_add(size),
                    limit: MAX_BLOB_BYTES,
                });
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let file = File::open(&full).map_err(io_err)?;
            let data = ExactReader {
                inner: file,
                remaining: size,
            };
            builder
                .append_data(&mut header, &rel, data)
                .map_err(io_err)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&full).map_err(io_err)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder
                .append_link(&mut header, &rel, &target)
                .map_err(io_err)?;
        } else {
            return Err(ImageError::Unsupported {
                path: full,
                reason: "it is a device, fifo or socket; an image holds only files, directories and symlinks (the runtime makes /dev)".to_string(),
            });
        }
    }
    Ok(())
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Names the compression of a file from its first bytes, if any.
fn compression(magic: &[u8]) -> Option<&'static str> {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Some("gzip (gunzip it)")
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz (unxz it)")
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd (unzstd it)")
    } else if magic.starts_with(b"BZh") {
        Some("bzip2 (bunzip2 it)")
    } else {
        None
    }
}

/// Whether an ELF executable asks for a program interpreter (is dynamically
/// linked). A static-pie binary has no PT_INTERP and counts as static.
/// This machine's static busybox (Debian's busybox-static), which runs
/// alone in an image.
pub(crate) fn static_busybox() -> Result<PathBuf, ImageError> {
    let busybox = BUSYBOX_PATHS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::BusyboxMissing {
            reason: format!("there is no busybox at {}", BUSYBOX_PATHS.join(" or ")),
        })?;
    match elf_is_dynamic(busybox) {
        Ok(false) => Ok(busybox.to_path_buf()),
        Ok(true) => Err(ImageError::BusyboxMissing {
            reason: format!(
                "{} is dynamically linked (Debian's 'busybox' package) and would not run alone in an image",
                busybox.display()
            ),
        }),
        Err(reason) => Err(ImageError::BusyboxMissing {
            reason: format!("{}: {reason}", busybox.display()),
        }),
    }
}

pub(crate) fn elf_is_dynamic(path: &Path) -> Result<bool, String> {
    let bytes = fsutil::read_bounded(path, 256 << 20).map_err(|e| e.to_string())?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("it is not an ELF executable".to_string());
    }
    let little = match bytes[5] {
        1 => true,
        2 => false,
        _ => return Err("it has an unknown ELF byte order".to_string()),
    };
    let u16_at = |at: usize| -> Option<u64> {
        let b: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
        Some(u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }))
    };
    let u32_at = |at: usize| -> Option<u64> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u64::from(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }))
    };
    let u64_at = |at: usize| -> Option<u64> {
        let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
        Some(if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let (phoff, phentsize, phnum) = match bytes[4] {
        1 => (u32_at(0x1c), u16_at(0x2a), u16_at(0x2c)),
        2 => (u64_at(0x20), u16_at(0x36), u16_at(0x38)),
        _ => return Err("it has an unknown ELF class".to_string()),
    };
    let bad = || "its ELF program headers are damaged".to_string();
    let (phoff, phentsize, phnum) = (
        phoff.ok_or_else(bad)?,
        phentsize.ok_or_else(bad)?,
        phnum.ok_or_else(bad)?,
    );
    const PT_INTERP: u64 = 3;
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or_else(bad)?;
        if u32_at(at).ok_or_else(bad)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The applet names of `busybox --list`, without busybox itself.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let output =
        Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(|e| ImageError::BusyboxMissing {
                reason: format!("cannot run {} --list: {e}", busybox.display()),
            })?;
    if !output.status.success() {
        return Err(ImageError::BusyboxMissing {
            reason: format!(
                "{} --list failed ({}): {}",
                busybox.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "." && *a != ".." && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    if !applets.iter().any(|a| a == "sh") {
        return Err(ImageError::BusyboxMissing {
            reason: format!("{} --list names no 'sh' applet", busybox.display()),
        });
    }
    Ok(applets)
}
