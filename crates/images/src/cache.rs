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

use crate::error::chain;
use crate::fsutil::{self, LockFile};
use crate::{
    digest_hex, digest_of, unpack, validate_name, ImageEntry, ImageError, MAX_BLOB_BYTES,
    MAX_ENTRY_RESPONSE_BYTES,
};

/// How long to wait to connect to a store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an entry lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A download that sends nothing for this long is given up.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
/// `progress` is called at most once per this many bytes (and at the start and end).
const PROGRESS_EVERY: u64 = 1 << 20;
/// Largest error body read from a store.
const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;

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
/// CACHE/index.json maps each name to the entry it was fetched as, and
/// CACHE/rootfs/<hex> holds the unpacked tar. A name, once cached, is
/// served from the cache without asking the store (pull if not present).
/// Downloads and unpacks happen under CACHE/tmp and the result is renamed
/// into place whole; tasks of one process fetching the same digest wait for
/// each other, and processes sharing a cache let the first rename win.
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

impl ImageCache {
    /// Opens (creating if missing) the cache at `cache_dir`. `store_url` is
    /// the base URL of an image store (`http://host:port`); without one only
    /// images already cached can be used.
    pub fn new(cache_dir: &Path, store_url: Option<String>) -> Result<Self, ImageError> {
        let cache = ImageCache {
            rootfs_dir: cache_dir.join("rootfs"),
            tmp: cache_dir.join("tmp"),
            index: cache_dir.join("index.json"),
            lock: cache_dir.join(".lock"),
            store_url: store_url.map(|u| u.trim_end_matches('/').to_string()),
            client: reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .build()
                .map_err(|e| ImageError::Internal(format!("cannot make an HTTP client: {e}")))?,
            digest_locks: Mutex::new(HashMap::new()),
        };
        for dir in [cache_dir, &cache.rootfs_dir, &cache.tmp] {
            fs::create_dir_all(dir).map_err(|e| ImageError::io(dir, e))?;
        }
        Ok(cache)
    }

    /// The unpacked root filesystem of `name`, fetching it if needed: look up
    /// the entry, download the blob to a temp file while hashing it (calling
    /// `progress(bytes_done, bytes_total)` at most about every MiB), refuse a
    /// digest or size mismatch, unpack into a temp dir and rename it to
    /// CACHE/rootfs/<hex>, then record name -> entry so that later calls are
    /// cache hits even with the store unreachable.
    pub async fn rootfs(
        &self,
        name: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<CachedImage, ImageError> {
        validate_name(name)?;
        if let Some(hit) = self.lookup(name).await? {
            return Ok(hit);
        }
        let base = self
            .store_url
            .as_deref()
            .ok_or_else(|| ImageError::NoStore {
                name: name.to_string(),
            })?;
        let entry = self.fetch_entry(base, name).await?;
        let hex = digest_hex(&entry.digest)?.to_string();
        let final_dir = self.rootfs_dir.join(&hex);

        let lock = self.digest_lock(&entry.digest);
        let _guard = lock.lock().await;
        if final_dir.is_dir() {
            // Unpacked already, under another name or by another task.
            self.record(entry.clone()).await?;
            return Ok(CachedImage {
                entry,
                rootfs: final_dir,
                cache_hit: true,
            });
        }
        let blob = self.download(base, &entry, progress).await?;
        let (tmp, rootfs_dir, target) =
            (self.tmp.clone(), self.rootfs_dir.clone(), final_dir.clone());
        let label = format!("image '{name}' ({})", entry.digest);
        blocking(move || unpack_into_place(blob, &tmp, &rootfs_dir, &target, &label)).await?;
        self.record(entry.clone()).await?;
        tracing::info!(image = name, digest = %entry.digest, rootfs = %final_dir.display(), "image unpacked");
        Ok(CachedImage {
            entry,
            rootfs: final_dir,
            cache_hit: false,
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
            fsutil::write_index(&index, &file)
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

    async fn fetch_entry(&self, base: &str, name: &str) -> Result<ImageEntry, ImageError> {
        let url = format!("{base}/v1/images/{name}");
        let mut response = self
            .client
            .get(&url)
            .timeout(LOOKUP_TIMEOUT)
            .send()
            .await
            .map_err(|e| transport(base, &url, e))?;
        let status = response.status();
        if !status.is_success() {
            let (code, message) = read_error(&mut response, base, &url).await;
            if status == reqwest::StatusCode::NOT_FOUND && code == "image_not_found" {
                return Err(ImageError::NotFound {
                    name: name.to_string(),
                    store: base.to_string(),
                });
            }
            return Err(ImageError::Http {
                url,
                message: format!("it answered {status}: {message}"),
            });
        }
        let body = read_body(&mut response, MAX_ENTRY_RESPONSE_BYTES, base, &url).await?;
        let entry: ImageEntry = serde_json::from_slice(&body).map_err(|e| ImageError::Http {
            url: url.clone(),
            message: format!("its answer is not an image entry ({e}); is this an image store?"),
        })?;
        if entry.name != name {
            return Err(ImageError::Http {
                url,
                message: format!("it answered with image '{}' for '{name}'", entry.name),
            });
        }
        digest_hex(&entry.digest)?;
        if entry.size_bytes > MAX_BLOB_BYTES {
            return Err(ImageError::TooLarge {
                what: format!("image '{name}'"),
                size: entry.size_bytes,
                limit: MAX_BLOB_BYTES,
            });
        }
        Ok(entry)
    }

    /// Downloads the blob of `entry` into a temp file under CACHE/tmp,
    /// checking its size and sha256. The temp file is deleted on any error.
    async fn download(
        &self,
        base: &str,
        entry: &ImageEntry,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<NamedTempFile, ImageError> {
        let url = format!("{base}/v1/blobs/{}", entry.digest);
        let total = entry.size_bytes;
        let mut response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| transport(base, &url, e))?;
        let status = response.status();
        if !status.is_success() {
            let (_, message) = read_error(&mut response, base, &url).await;
            return Err(ImageError::Http {
                url,
                message: format!(
                    "it lists image '{}' but answered {status} for its blob: {message}",
                    entry.name
                ),
            });
        }
        let mismatch = |actual: u64| ImageError::SizeMismatch {
            digest: entry.digest.clone(),
            expected: total,
            actual,
        };
        if let Some(length) = response.content_length() {
            if length != total {
                return Err(mismatch(length));
            }
        }

        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".tar.part")
            .tempfile_in(&self.tmp)
            .map_err(|e| ImageError::io(&self.tmp, e))?;
        let std_file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| ImageError::io(tmp.path(), e))?;
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let mut reported = 0u64;
        progress(0, total);
        loop {
            let chunk = tokio::time::timeout(STALL_TIMEOUT, response.chunk())
                .await
                .map_err(|_| ImageError::Unreachable {
                    url: base.to_string(),
                    reason: format!(
                        "the download of {} sent nothing for {} s",
                        entry.digest,
                        STALL_TIMEOUT.as_secs()
                    ),
                })?
                .map_err(|e| transport(base, &url, e))?;
            let Some(chunk) = chunk else { break };
            done += chunk.len() as u64;
            if done > total {
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
        drop(file);
        if done != total {
            return Err(mismatch(done));
        }
        if reported != done {
            progress(done, total);
        }
        let actual = digest_of(hasher);
        if actual != entry.digest {
            return Err(ImageError::DigestMismatch {
                expected: entry.digest.clone(),
                actual,
            });
        }
        Ok(tmp)
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

fn transport(base: &str, url: &str, error: reqwest::Error) -> ImageError {
    if error.is_connect() || error.is_timeout() {
        ImageError::Unreachable {
            url: base.to_string(),
            reason: chain(&error),
        }
    } else {
        ImageError::Http {
            url: url.to_string(),
            message: chain(&error),
        }
    }
}

async fn read_body(
    response: &mut reqwest::Response,
    limit: u64,
    base: &str,
    url: &str,
) -> Result<Vec<u8>, ImageError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport(base, url, e))?
    {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ImageError::TooLarge {
                what: format!("the answer of {url}"),
                size: (body.len() + chunk.len()) as u64,
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The code and message of a store's error answer, or a snippet of the body.
async fn read_error(response: &mut reqwest::Response, base: &str, url: &str) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: String,
        message: String,
    }
    match read_body(response, MAX_ERROR_BODY_BYTES, base, url).await {
        Ok(bytes) => match serde_json::from_slice::<Body>(&bytes) {
            Ok(body) => (body.error.code, body.error.message),
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes);
                let text: String = text.trim().chars().take(200).collect();
                if text.is_empty() {
                    (
                        String::new(),
                        "no error body; is this an image store?".to_string(),
                    )
                } else {
                    (String::new(), text)
                }
            }
        },
        Err(e) => (String::new(), e.to_string()),
    }
}
