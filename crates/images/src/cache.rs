//! An agent's cache of unpacked images, fetched from a store over HTTP.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

use crate::client::{read_error, transport};
use crate::fsutil::{self, LockFile};
use crate::{digest_hex, digest_of, unpack, validate_name, ImageEntry, ImageError, MAX_BLOB_BYTES};

/// A download that sends nothing for this long is given up.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// `progress` is called at most once per this many bytes (and at the start and end).
const PROGRESS_EVERY: u64 = 1 << 20;

/// An unpacked image ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    pub entry: ImageEntry,
    /// CACHE/rootfs/<hex>: the root filesystem. Shared by every partition
    /// booting this image: mount it read-only or under an overlay.
    pub rootfs: PathBuf,
    /// Whether the image was already unpacked here (nothing was downloaded).
    pub cache_hit: bool,
}

/// An agent's cache of unpacked images, fetched from a store over HTTP.
///
/// CACHE/rootfs/<hex> holds the unpacked tar of digest <hex>, and
/// CACHE/index.json maps each name to the entry it was last fetched as.
/// Images are fetched by digest only (`name@sha256:<hex>`, as pinned in a
/// partition's terms): the blob's sha256 is checked against the digest
/// asked for, so an unauthenticated store cannot substitute another image.
/// A bare name is served only from what is already cached here; it is
/// resolved through the store only by `resolve`, when a partition is
/// registered. Downloads and unpacks happen under CACHE/tmp and the result is
/// renamed into place whole; tasks of one process fetching the same digest
/// wait for each other, and processes sharing a cache let the first rename
/// win. The cache directory is 0700 (root only): unpacked images stay
/// readable inside it, for the runtime that boots them.
#[derive(Debug)]
pub struct ImageCache {
    rootfs_dir: PathBuf,
    tmp: PathBuf,
    index: PathBuf,
    lock: PathBuf,
    store_url: Option<String>,
    client: reqwest::Client,
    digest_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Mode of the cache and its directories: only the agent's user traverses it.
pub const CACHE_DIR_MODE: u32 = 0o700;

impl ImageCache {
    /// Opens (creating if missing) the cache at `cache_dir`, and makes it and
    /// its directories 0700 (also when an older build made them 0755).
    /// `store_url` is the base URL of an image store (`http://host:port`);
    /// without one only images already cached can be used.
    pub fn new(cache_dir: &Path, store_url: Option<String>) -> Result<Self, ImageError> {
        Self::with_trust(
            cache_dir,
            store_url,
            &leasehold_api::ServerTrust::PublicRoots,
        )
    }

    /// [`ImageCache::new`], accepting only the store certificates `trust`
    /// allows on `https://`.
    pub fn with_trust(
        cache_dir: &Path,
        store_url: Option<String>,
        trust: &leasehold_api::ServerTrust,
    ) -> Result<Self, ImageError> {
        let store_url = store_url.map(|u| u.trim_end_matches('/').to_string());
        let client = crate::client::http_client(
            store_url.as_deref().unwrap_or("(no image store)"),
            trust,
            reqwest::Client::builder(),
        )?;
        let cache = ImageCache {
            rootfs_dir: cache_dir.join("rootfs"),
            tmp: cache_dir.join("tmp"),
            index: cache_dir.join("index.json"),
            lock: cache_dir.join(".lock"),
            store_url,
            client,
            digest_locks: Mutex::new(HashMap::new()),
        };
        for dir in [cache_dir, &cache.rootfs_dir, &cache.tmp] {
            fsutil::create_private_dir(dir, CACHE_DIR_MODE)?;
        }
        Ok(cache)
    }

    /// The digest `name` should be pinned to when a partition offering it is
    /// registered: the cached entry if this host has the image unpacked
    /// (it boots that one), otherwise the store's entry for the name.
    pub async fn resolve(&self, name: &str) -> Result<ImageEntry, ImageError> {
        validate_name(name)?;
        if let Some(hit) = self.lookup(name).await? {
            return Ok(hit.entry);
        }
        let base = self.store(name)?;
        crate::client::fetch_entry(&self.client, base, name).await
    }

    /// The unpacked root filesystem of `reference`. Pinned
    /// (`name@sha256:<hex>`): CACHE/rootfs/<hex>, else the blob is downloaded
    /// by digest while hashing (calling `progress(bytes_done, bytes_total)`
    /// at most about every MiB), refused on a digest or size mismatch,
    /// unpacked into a temp dir and renamed into place. A bare name: only
    /// from the cache (`NotPinned` otherwise); the store is never asked what
    /// a name means here.
    pub async fn rootfs(
        &self,
        reference: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<CachedImage, ImageError> {
        let parsed =
            leasehold_core::image_ref::parse_image_reference("image", reference).map_err(|e| {
                ImageError::InvalidName {
                    name: reference.chars().take(200).collect(),
                    reason: e.problem,
                }
            })?;
        validate_name(parsed.name)?;
        let Some(digest) = parsed.digest else {
            return self
                .lookup(parsed.name)
                .await?
                .ok_or_else(|| ImageError::NotPinned {
                    name: parsed.name.to_string(),
                });
        };
        let hex = digest_hex(digest)?.to_string();
        let final_dir = self.rootfs_dir.join(&hex);
        let lock = self.digest_lock(digest);
        let _guard = lock.lock().await;
        if let Some(hit) = self.cached_digest(parsed.name, digest, &final_dir).await? {
            return Ok(hit);
        }
        let base = self.store(reference)?;
        let (blob, size_bytes) = self.download(base, parsed.name, digest, progress).await?;
        let entry = ImageEntry {
            name: parsed.name.to_string(),
            digest: digest.to_string(),
            size_bytes,
        };
        let (tmp, rootfs_dir, target) =
            (self.tmp.clone(), self.rootfs_dir.clone(), final_dir.clone());
        let label = format!("image '{reference}'");
        blocking(move || unpack_into_place(blob, &tmp, &rootfs_dir, &target, &label)).await?;
        self.record(entry.clone()).await?;
        tracing::info!(image = parsed.name, digest, rootfs = %final_dir.display(), "image unpacked");
        Ok(CachedImage {
            entry,
            rootfs: final_dir,
            cache_hit: false,
        })
    }

    /// A digest already unpacked (under this name or another): a hit, with
    /// the name recorded so that a later bare lookup finds it.
    async fn cached_digest(
        &self,
        name: &str,
        digest: &str,
        final_dir: &Path,
    ) -> Result<Option<CachedImage>, ImageError> {
        if !final_dir.is_dir() {
            return Ok(None);
        }
        let index = self.index.clone();
        let known = blocking(move || Ok(fsutil::read_index(&index)?.images)).await?;
        let size_bytes = known
            .values()
            .find(|e| e.digest == digest)
            .map_or(0, |e| e.size_bytes);
        let entry = ImageEntry {
            name: name.to_string(),
            digest: digest.to_string(),
            size_bytes,
        };
        if known.get(name) != Some(&entry) {
            self.record(entry.clone()).await?;
        }
        Ok(Some(CachedImage {
            entry,
            rootfs: final_dir.to_path_buf(),
            cache_hit: true,
        }))
    }

    fn store(&self, reference: &str) -> Result<&str, ImageError> {
        self.store_url
            .as_deref()
            .ok_or_else(|| ImageError::NoStore {
                name: reference.to_string(),
            })
    }

    /// The images unpacked here, sorted by name.
    pub fn cached(&self) -> Result<Vec<ImageEntry>, ImageError> {
        let index = fsutil::read_index(&self.index)?;
        Ok(index
            .images
            .into_values()
            .filter(|e| {
                digest_hex(&e.digest)
                    .map(|hex| self.rootfs_dir.join(hex).is_dir())
                    .unwrap_or(false)
            })
            .collect())
    }

    async fn lookup(&self, name: &str) -> Result<Option<CachedImage>, ImageError> {
        let (index, rootfs_dir, name) = (
            self.index.clone(),
            self.rootfs_dir.clone(),
            name.to_string(),
        );
        blocking(move || {
            let Some(entry) = fsutil::read_index(&index)?.images.remove(&name) else {
                return Ok(None);
            };
            let Ok(hex) = digest_hex(&entry.digest) else {
                return Ok(None);
            };
            let rootfs = rootfs_dir.join(hex);
            Ok(rootfs.is_dir().then_some(CachedImage {
                entry,
                rootfs,
                cache_hit: true,
            }))
        })
        .await
    }

    /// Records name -> entry in CACHE/index.json.
    async fn record(&self, entry: ImageEntry) -> Result<(), ImageError> {
        let (index, lock) = (self.index.clone(), self.lock.clone());
        blocking(move || {
            let _lock = LockFile::acquire(&lock)?;
            let mut file = fsutil::read_index(&index)?;
            if file.images.get(&entry.name) == Some(&entry) {
                return Ok(());
            }
            file.images.insert(entry.name.clone(), entry);
            fsutil::write_index(&index, &file, 0o600)
        })
        .await
    }

    fn digest_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .digest_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(digest.to_string()).or_default().clone()
    }

    /// Downloads the blob of `digest` into a temp file under CACHE/tmp,
    /// checking its length against Content-Length and `MAX_BLOB_BYTES`, and
    /// its sha256 against `digest`; returns the file and its size. The temp
    /// file is deleted on any error.
    async fn download(
        &self,
        base: &str,
        name: &str,
        digest: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(NamedTempFile, u64), ImageError> {
        let url = format!("{base}/v1/blobs/{digest}");
        let mut response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| transport(base, &url, e))?;
        let status = response.status();
        if !status.is_success() {
            let (code, message) = read_error(&mut response, base, &url).await;
            if status == reqwest::StatusCode::NOT_FOUND && code == "blob_not_found" {
                return Err(ImageError::NotFound {
                    name: format!("{name}@{digest}"),
                    store: base.to_string(),
                });
            }
            return Err(ImageError::Http {
                url,
                message: format!("it answered {status} for image '{name}' ({digest}): {message}"),
            });
        }
        let total = response.content_length().unwrap_or(0);
        if total > MAX_BLOB_BYTES {
            return Err(ImageError::TooLarge {
                what: format!("image '{name}' ({digest})"),
                size: total,
                limit: MAX_BLOB_BYTES,
            });
        }
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".tar.part")
            .tempfile_in(&self.tmp)
            .map_err(|e| ImageError::io(&self.tmp, e))?;
        let (hasher, done) = self
            .stream_to_file(&mut response, &tmp, base, digest, total, progress)
            .await?;
        let actual = digest_of(hasher);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok((tmp, done))
    }

    /// Writes the body of `response` to `tmp` while hashing it; `total` is
    /// the announced length (0 if none), which the body must match exactly.
    async fn stream_to_file(
        &self,
        response: &mut reqwest::Response,
        tmp: &NamedTempFile,
        base: &str,
        digest: &str,
        total: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(Sha256, u64), ImageError> {
        let limit = if total > 0 { total } else { MAX_BLOB_BYTES };
        let mismatch = |actual: u64| ImageError::SizeMismatch {
            digest: digest.to_string(),
            expected: total,
            actual,
        };
        let std_file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| ImageError::io(tmp.path(), e))?;
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let (mut done, mut reported) = (0u64, 0u64);
        progress(0, total);
        loop {
            let chunk = tokio::time::timeout(STALL_TIMEOUT, response.chunk())
                .await
                .map_err(|_| ImageError::Unreachable {
                    url: base.to_string(),
                    reason: format!(
                        "the download of {digest} sent nothing for {} s",
                        STALL_TIMEOUT.as_secs()
                    ),
                })?
                .map_err(|e| transport(base, base, e))?; // (the blob URL is in the error)
            let Some(chunk) = chunk else { break };
            done += chunk.len() as u64;
            if done > limit && total == 0 {
                return Err(ImageError::TooLarge {
                    what: format!("the download of {digest}"),
                    size: done,
                    limit,
                });
            }
            if done > limit {
                return Err(mismatch(done));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ImageError::io(tmp.path(), e))?;
            if done - reported >= PROGRESS_EVERY {
                progress(done, total);
                reported = done;
            }
        }
        file.flush()
            .await
            .map_err(|e| ImageError::io(tmp.path(), e))?;
        if total > 0 && done != total {
            return Err(mismatch(done));
        }
        if reported != done {
            progress(done, total);
        }
        Ok((hasher, done))
    }
}

/// Unpacks `blob` into a fresh dir under `tmp` and renames it to `target`.
/// If `target` appeared meanwhile (another process), the new copy is removed.
fn unpack_into_place(
    blob: NamedTempFile,
    tmp: &Path,
    rootfs_dir: &Path,
    target: &Path,
    label: &str,
) -> Result<(), ImageError> {
    let work = tempfile::Builder::new()
        .prefix("unpack-")
        .tempdir_in(tmp)
        .map_err(|e| ImageError::io(tmp, e))?;
    let file = File::open(blob.path()).map_err(|e| ImageError::io(blob.path(), e))?;
    unpack::unpack_safely(BufReader::with_capacity(1 << 20, file), work.path(), label)?;
    drop(blob);
    fsutil::set_mode(work.path(), 0o755)?;
    let work = work.keep();
    match fs::rename(&work, target) {
        Ok(()) => {
            fsutil::sync_dir(rootfs_dir);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            if target.is_dir() {
                Ok(())
            } else {
                Err(ImageError::io(target, e))
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Internal(format!("an image task failed: {e}")))?
}
