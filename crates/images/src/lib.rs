//! The image store of seed 000 FIG. 16 ("OS images on a file server,
//! network boot"): root filesystems stored as uncompressed tars addressed by
//! their sha256, an HTTP server for them, and the agent's cache of unpacked
//! images that the `oci` driver boots.
//!
//! Layout of a store (on the file server or the local machine):
//!
//! ```text
//! ROOT/index.json                  {"version":1,"images":{name: entry}}
//! ROOT/blobs/sha256/<hex>.tar      the root filesystem, as a tar
//! ROOT/tmp/                        files being written (same filesystem, renamed into place)
//! ROOT/.lock                       flock(2) held while index.json is rewritten
//! ```
//!
//! Layout of an agent's cache:
//!
//! ```text
//! CACHE/                           0700: no other local user traverses it
//! CACHE/index.json                 {"version":1,"images":{name: entry}}, 0600
//! CACHE/rootfs/<hex>/              an unpacked root filesystem (appears whole, by rename)
//! CACHE/tmp/                       downloads and unpacks in progress
//! ```
//!
//! Images are fetched by digest (`name@sha256:<hex>`, as pinned in a
//! partition's terms) and checked against it; the store is asked what a name
//! means only when a partition is registered (`ImageCache::resolve`,
//! `StoreClient`). Unpacking drops setuid, setgid and sticky bits and write
//! for group and others, and skips device nodes and fifos. Publish a changed
//! image under a new name (e.g. `debian:12.6`): a cached name keeps its digest.
//!
//! Dependencies added by this crate (all other dependencies are the workspace's):
//! - tar: reads and writes tar archives, and unpacks them refusing paths that leave the target directory.
//! - xz2: decompresses the xz-compressed kernel inside Debian's bzImage for the `vm` image (liblzma).
//! - futures-util: `stream::try_unfold` to stream a blob file as an HTTP body without loading it into memory.
//!
//! Workspace dependencies used in a new way here:
//! - tempfile (a normal dependency here, not only dev): temp files and dirs that delete themselves on every error path.
//! - libc: flock(2) on the store index and geteuid(2) to preserve ownership only when unpacking as root.
//! - reqwest: `Response::chunk` streams a download without the "stream" feature.

mod cache;
mod client;
mod error;
mod fsutil;
mod http;
mod store;
mod unpack;
mod vm_initramfs;
mod vm_kernel;
mod vm_recipe;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use cache::{CachedImage, ImageCache, CACHE_DIR_MODE};
pub use client::StoreClient;
pub use error::ImageError;
pub use store::ImageStore;
pub use vm_initramfs::{
    ARGV_FILE_BYTES, ERROR_TRAILER_PREFIX, EXIT_TRAILER_PREFIX, FW_CFG_DIR, READY_TRAILER,
    SEED_FILE_BYTES, TIME_FILE_BYTES,
};
pub use vm_recipe::{VmManifest, VM_MANIFEST_FILE};

/// Largest image blob accepted: stored, served or downloaded.
pub const MAX_BLOB_BYTES: u64 = 8 << 30;
/// Largest index.json read (store or cache).
pub const MAX_INDEX_BYTES: u64 = 16 << 20;
/// Largest JSON answer read from a store for one entry or the list.
pub const MAX_ENTRY_RESPONSE_BYTES: u64 = 16 << 20;

/// One image: a root filesystem stored as an uncompressed tar, addressed by sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub name: String,
    /// `sha256:` followed by 64 lowercase hex digits: the sha256 of the tar.
    pub digest: String,
    pub size_bytes: u64,
}

/// The answer of `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageEntry>,
}

/// Checks an image name: 1..=64 chars of `[A-Za-z0-9-_.:]`
/// (`leasehold_core::terms::validate_image_name`), and not `.` or `..`,
/// which cannot travel in a URL path.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    if let Err(e) = leasehold_core::terms::validate_image_name("image", name) {
        return Err(ImageError::InvalidName {
            name: name.to_string(),
            reason: e.problem,
        });
    }
    if name == "." || name == ".." {
        return Err(ImageError::InvalidName {
            name: name.to_string(),
            reason: format!("'{name}' is not an image name (it cannot be only dots)"),
        });
    }
    Ok(())
}

/// Unpacks an image tar from `reader` into `dst` (an existing, empty
/// directory) exactly as the cache does: unsafe entries refuse the archive,
/// set-id, sticky and group/other write bits are dropped, device nodes and
/// fifos skipped. On error `dst` may hold a partial tree; remove it. Public
/// for the fuzz targets (`fuzz/`); the agent goes through [`ImageCache`].
pub fn unpack_tar_into<R: std::io::Read>(
    reader: R,
    dst: &std::path::Path,
) -> Result<(), ImageError> {
    unpack::unpack_safely(reader, dst, "tar")
}

/// Reads a whole tar and checks every entry as [`ImageStore::add_tarball`]
/// does; returns how many entries it holds. Public for the fuzz targets.
pub fn verify_tar<R: std::io::Read>(reader: R) -> Result<u64, ImageError> {
    unpack::verify_tar(reader, "tar")
}

/// Checks a digest (`sha256:<64 lowercase hex>`) and returns its hex part.
pub fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    hex.ok_or_else(|| ImageError::InvalidDigest {
        digest: digest.chars().take(100).collect(),
    })
}

fn digest_of(hasher: sha2::Sha256) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(hasher.finalize()))
}
