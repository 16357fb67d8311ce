//! The `oci` driver's images: the agent's cache of the image store
//! (seed 000, FIG. 16: the OS image is fetched from the file server and
//! booted in the partition).

use crate::driver::oci::ImageSource;
use crate::driver::{BoxFuture, DriverError};
use leasehold_images::{ImageCache, ImageError};
use std::path::PathBuf;

pub struct CachedImages {
    cache: ImageCache,
    offered: Vec<String>,
}

impl CachedImages {
    /// `offered` are the images this host lends partitions with.
    pub fn new(cache: ImageCache, offered: Vec<String>) -> Self {
        CachedImages { cache, offered }
    }
}

impl ImageSource for CachedImages {
    fn names(&self) -> Vec<String> {
        self.offered.clone()
    }

    fn rootfs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<PathBuf, DriverError>> {
        Box::pin(async move {
            let progress = |done: u64, total: u64| {
                // Large downloads say how far they are, every 64 MiB.
                if total > 0 && done % (64 << 20) < (1 << 20) {
                    tracing::info!(
                        image = name,
                        done_mib = done >> 20,
                        total_mib = total >> 20,
                        "fetching image"
                    );
                }
            };
            match self.cache.rootfs(name, &progress).await {
                Ok(cached) => {
                    if !cached.cache_hit {
                        tracing::info!(image = name, digest = %cached.entry.digest, "fetched and verified image");
                    }
                    Ok(cached.rootfs)
                }
                Err(
                    error @ (ImageError::NotFound { .. }
                    | ImageError::InvalidName { .. }
                    | ImageError::NoStore { .. }),
                ) => Err(DriverError::UnknownImage(error.to_string())),
                Err(error) => Err(DriverError::Image(error.to_string())),
            }
        })
    }
}
