//! Image tars: the agent unpacks tars from an image store it does not
//! control, as root. Arbitrary bytes as a tar, unpacked into a fresh
//! directory with `leasehold_images::unpack_tar_into`:
//!
//! - never panics (nor does the store's `verify_tar`);
//! - writes nothing outside the directory: the sandbox around it holds only
//!   the image directory and a canary file, whose content, mode and link
//!   count (a hard link to it from inside would raise it) never change;
//! - leaves no device node, fifo or socket in the tree, and, when it
//!   succeeds, no setuid, setgid or sticky bit nor group/other write, with
//!   umask 0 (so it does not rely on the umask);
//! - whatever it unpacks whole, the store's check accepts too.
//!
//! The sandbox is at a fixed path (`SANDBOX`) so that seeds can aim absolute
//! symlinks and hard links at the canary; run one fuzzing process at a time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const SANDBOX: &str = "/tmp/leasehold-fuzz-unpack";
const CANARY_NAME: &str = "canary";
const CANARY_TEXT: &[u8] = b"written only by the fuzz target\n";
const CANARY_MODE: u32 = 0o644;
const FORBIDDEN_MODE_BITS: u32 = 0o7022;

fn sandbox() -> &'static Path {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        // The most permissive umask (the `leasehold` binary sets 077): the
        // unpacker must not rely on the umask to keep modes safe.
        // SAFETY: umask only sets this process's file mode mask.
        unsafe { libc::umask(0) };
        let _ = fs::remove_dir_all(SANDBOX);
        fs::create_dir_all(SANDBOX).expect("create the sandbox");
        let canary = Path::new(SANDBOX).join(CANARY_NAME);
        fs::write(&canary, CANARY_TEXT).expect("write the canary");
        fs::set_permissions(&canary, fs::Permissions::from_mode(CANARY_MODE))
            .expect("chmod the canary");
    });
    Path::new(SANDBOX)
}

/// The sandbox directory's mode and owner once set up: an entry that reaches
/// it through a symlink could chmod or chown it. (Its mtime changes with
/// every run, as the image directory is made and removed.)
fn sandbox_stat() -> &'static (u32, u32, u32) {
    static STAT: std::sync::OnceLock<(u32, u32, u32)> = std::sync::OnceLock::new();
    STAT.get_or_init(|| {
        let meta = fs::symlink_metadata(sandbox()).expect("stat the sandbox");
        (meta.mode() & 0o7777, meta.uid(), meta.gid())
    })
}

fuzz_target!(|data: &[u8]| {
    let sandbox = sandbox();
    sandbox_stat();
    let image = sandbox.join("image");
    remove_tree(&image);
    // As the cache's work directory (a tempdir): 0700 whatever the umask.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&image)
        .expect("create the image directory");

    let unpacked = leasehold_images::unpack_tar_into(data, &image);
    let verified = leasehold_images::verify_tar(data);
    if unpacked.is_ok() {
        assert!(
            verified.is_ok(),
            "the cache unpacked a tar the store refuses: {verified:?}"
        );
    }
    check_sandbox(sandbox);
    // A refused tar's partial tree is removed by the cache unused, so its
    // modes matter only when the unpack succeeded.
    check_tree(&image, unpacked.is_ok());
    remove_tree(&image);
});

/// Nothing beside the image directory, and the canary untouched.
fn check_sandbox(sandbox: &Path) {
    let mut names: Vec<String> = fs::read_dir(sandbox)
        .expect("list the sandbox")
        .map(|e| {
            e.expect("sandbox entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["canary", "image"],
        "something was written beside the image"
    );
    let meta = fs::symlink_metadata(sandbox).expect("stat the sandbox");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        *sandbox_stat(),
        "the sandbox directory's mode or owner changed"
    );
    let canary = sandbox.join(CANARY_NAME);
    let meta = fs::symlink_metadata(&canary).expect("stat the canary");
    assert!(meta.file_type().is_file(), "the canary was replaced");
    assert_eq!(
        meta.nlink(),
        1,
        "the image holds a hard link to a file outside it"
    );
    assert_eq!(
        meta.mode() & 0o7777,
        CANARY_MODE,
        "the canary's mode changed"
    );
    assert_eq!(
        fs::read(&canary).expect("read the canary"),
        CANARY_TEXT,
        "the canary was overwritten"
    );
}

/// Every entry under `dir`: a file, directory or symlink, and when
/// `check_modes`, without forbidden bits.
fn check_tree(dir: &Path, check_modes: bool) {
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).expect("stat an unpacked entry");
        let kind = meta.file_type();
        assert!(
            !(kind.is_block_device()
                || kind.is_char_device()
                || kind.is_fifo()
                || kind.is_socket()),
            "{} is a device node, fifo or socket",
            path.display()
        );
        if kind.is_symlink() {
            continue; // Symlinks are always 0777 and their mode is never used.
        }
        let mode = meta.mode() & 0o7777;
        if check_modes {
            assert_eq!(
                mode & FORBIDDEN_MODE_BITS,
                0,
                "{} has mode {mode:o}: set-id, sticky or group/other write survived",
                path.display()
            );
        }
        if kind.is_dir() {
            for entry in fs::read_dir(&path).expect("list an unpacked directory") {
                pending.push(entry.expect("directory entry").path());
            }
        }
    }
}

/// Removes a tree even when the image left directories without write or
/// search permission for the owner (when not running as root).
fn remove_tree(dir: &Path) {
    if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_dir() {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
            if let Ok(entries) = fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    fs::remove_dir_all(dir).expect("remove the image directory");
}
